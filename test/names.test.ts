// Logins and nicks are one namespace: the seed TCP doors show a user by the nick, which
// their clients take for a login (they register with nick = login), so a native user
// whose nick was another user's login passed for that user there (a review: "author":
// "realbob" on the rust door, "sender":"realbob" on the rooms door, from login "evil").

import { describe, expect, it } from "vitest";
import { Client, registerUser, removeDir, serveForFile, startTestServer, tempDir, uniqueName } from "./helpers.js";

const srv = serveForFile();

async function register(login: string, nick: string): Promise<{ status: number; error: string }> {
  const c = await Client.connect(srv.port);
  try {
    return await c.request("register", { login, pass: "pw", nick });
  } finally {
    c.close();
  }
}

describe("logins and nicks share one namespace", () => {
  it("a nick may not be another user's login, nor a login another user's nick (case-insensitively)", async () => {
    const bob = await registerUser(srv.port, uniqueName("realbob"), "secret", uniqueName("Bobby"));
    expect(await register(uniqueName("evil"), bob.login.toUpperCase())).toEqual({ status: 1, error: "that nick is already taken" });
    expect(await register(bob.nick.toLowerCase(), uniqueName("Someone"))).toEqual({ status: 1, error: "that login is already taken" });
    // One's own login as one's nick is fine (the seed doors register that way).
    const same = uniqueName("same");
    expect((await register(same, same)).status).toBe(0);
    bob.client.close();
  });
});

describe("names that read alike are one name", () => {
  /** `text` in fullwidth forms (ASCII letters and digits: U+FF01 onwards). */
  const fullwidth = (text: string) => [...text].map((ch) => (ch >= "!" && ch <= "~" ? String.fromCodePoint(ch.codePointAt(0)! + 0xfee0) : ch)).join("");

  it("a nick or login that differs from a taken one by invisible characters or compatibility forms is taken (1)", async () => {
    const bob = await registerUser(srv.port, uniqueName("bob"), "secret", uniqueName("Bob"));
    const taken = { status: 1, error: "that nick is already taken" };
    // Zero-width space, zero-width joiner, soft hyphen, a bidi mark, a variation selector.
    for (const hidden of ["\u200b", "\u200d", "\u00ad", "\u200e", "\ufe0f"]) {
      expect(await register(uniqueName("evil"), bob.nick + hidden)).toEqual(taken);
      expect(await register(uniqueName("evil"), bob.nick.slice(0, 2) + hidden + bob.nick.slice(2))).toEqual(taken);
    }
    expect(await register(uniqueName("evil"), fullwidth(bob.nick))).toEqual(taken);
    expect(await register(uniqueName("evil"), fullwidth(bob.login))).toEqual(taken);
    expect(await register(fullwidth(bob.login), uniqueName("Other"))).toEqual({ status: 1, error: "that login is already taken" });
    // Its owner logs in by the login as it reads.
    const c = await Client.connect(srv.port);
    expect((await c.request("auth", { login: fullwidth(bob.login), pass: "secret" })).uid).toBe(bob.uid);
    c.close();
    bob.client.close();
  });

  it("a nick of invisible characters only is refused (3); one with a joiner inside letters is a nick", async () => {
    expect(await register(uniqueName("ghost"), "\u200b\u200c")).toMatchObject({ status: 3, error: expect.stringMatching(/must show something/) });
    // Persian with a zero-width non-joiner: a nick, one with the same letters without it.
    const word = `می\u200cخواهم${Date.now() % 100000}`;
    expect((await register(uniqueName("fa"), word)).status).toBe(0);
    expect(await register(uniqueName("fa"), word.replace("\u200c", ""))).toEqual({ status: 1, error: "that nick is already taken" });
  });

  it("a layout-5 index (lower case only) is re-keyed at start-up (layout 6); a name that reads as an older account's keeps its key, and its account works", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir });
    try {
      const port = () => server.port;
      const bob = await registerUser(port(), uniqueName("bob"), "secret", uniqueName("Bob"));
      const zoe = await registerUser(port(), uniqueName("zoe"), "secret", uniqueName("Zoe"));
      const twin = await registerUser(port(), uniqueName("twin"), "secret", uniqueName("Twin"));
      for (const x of [bob, zoe, twin]) x.client.close();
      // As an older version left them: zoe's nick in fullwidth forms, and twin's nick
      // bob's with a zero-width space, each keyed by its lower case alone.
      const sp = server.services.storage.spaces;
      const older = async (uid: string, nick: string) => {
        const rec = (await sp.users.get(uid)) as Record<string, unknown>;
        await sp.nick.del(String(rec.nick).toLowerCase());
        await sp.nick.put(nick.toLowerCase(), uid);
        await sp.users.put(uid, { ...rec, nick });
      };
      await older(zoe.uid, fullwidth(zoe.nick));
      await older(twin.uid, bob.nick + "\u200b");
      await sp.meta.put("layout", 5);
      await server.stop();
      server = await startTestServer({ dataDir });
      const reg = async (login: string, nick: string) => {
        const c = await Client.connect(port());
        try {
          return await c.request("register", { login, pass: "pw", nick });
        } finally {
          c.close();
        }
      };
      expect(await server.services.storage.spaces.meta.get("layout")).toBe(6);
      // zoe's name is under its new key: its plain spelling is taken.
      expect(await reg(uniqueName("evil"), zoe.nick)).toEqual({ status: 1, error: "that nick is already taken" });
      expect(await server.services.storage.spaces.nick.get(zoe.nick.toLowerCase())).toBe(zoe.uid);
      // twin's kept its key (bob's holds the new one), and both stay taken.
      const twinRec = (await server.services.storage.spaces.users.get(twin.uid)) as { apart?: string[] };
      expect(twinRec.apart).toEqual(["nick"]);
      expect(await reg(uniqueName("evil"), bob.nick + "\u200b")).toEqual({ status: 1, error: "that nick is already taken" });
      expect(await reg(uniqueName("evil"), bob.nick)).toEqual({ status: 1, error: "that nick is already taken" });
      // Deleting twin removes its own entry, not bob's.
      const t = await Client.connect(port());
      expect((await t.request("auth", { login: twin.login, pass: "secret" })).status).toBe(0);
      expect((await t.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      t.close();
      expect(await server.services.storage.spaces.nick.get(bob.nick.toLowerCase())).toBe(bob.uid);
      expect(await server.services.storage.spaces.nick.get((bob.nick + "\u200b").toLowerCase())).toBeUndefined();
      expect(await reg(uniqueName("evil"), bob.nick)).toEqual({ status: 1, error: "that nick is already taken" });
    } finally {
      await server.stop();
      removeDir(dataDir);
    }
  });
});
