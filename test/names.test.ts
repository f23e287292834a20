// Logins and nicks are one namespace: the seed TCP doors show a user by the nick, which
// their clients take for a login (they register with nick = login), so a native user
// whose nick was another user's login passed for that user there (a review: "author":
// "realbob" on the rust door, "sender":"realbob" on the rooms door, from login "evil").

import { describe, expect, it } from "vitest";
import { admin } from "./admin-helpers.js";
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

  it("a nick or login that reads as another account's login or nick is taken (1)", async () => {
    const bob = await registerUser(srv.port, uniqueName("bob"), "secret", uniqueName("Bob"));
    const taken = { status: 1, error: "that nick is already taken" };
    // Zero-width space, zero-width joiner, soft hyphen, a bidi mark, a variation selector.
    for (const hidden of ["\u200b", "\u200d", "\u00ad", "\u200e", "\ufe0f"]) {
      expect(await register(uniqueName("evil"), bob.nick + hidden)).toEqual(taken);
      expect(await register(uniqueName("evil"), bob.nick.slice(0, 2) + hidden + bob.nick.slice(2))).toEqual(taken);
    }
    expect(await register(uniqueName("evil"), fullwidth(bob.nick))).toEqual(taken);
    // Across the namespace: a nick that reads as bob's login, a login that reads as bob's nick.
    expect(await register(uniqueName("evil"), fullwidth(bob.login))).toEqual(taken);
    expect(await register(fullwidth(bob.nick), uniqueName("Other"))).toEqual({ status: 1, error: "that login is already taken" });
    expect(await register(fullwidth(bob.login), uniqueName("Other"))).toEqual({ status: 1, error: "that login is already taken" });
    // A combining grapheme joiner between a letter and its accent reads as the letter with it.
    const zoe = await registerUser(srv.port, uniqueName("zoe"), "secret", `zoë${Date.now() % 100000}`);
    expect(await register(uniqueName("evil"), zoe.nick.replace("ë", "e\u034f\u0308"))).toEqual(taken);
    for (const x of [bob, zoe]) x.client.close();
  });

  it("a new login that reads as a banned one is refused (15), as the banned one is", async () => {
    // An account banned, then deleted: its login stays banned, and free.
    const evil = uniqueName("evil");
    const account = await registerUser(srv.port, evil, "pw");
    account.client.close();
    expect((await admin(srv.server.adminPort as number, "POST", "/ban", { login: evil, reason: "spam" })).status).toBe(200);
    expect((await admin(srv.server.adminPort as number, "POST", "/users/delete", { user: evil })).status).toBe(200);
    const banned = { status: 15, error: "that login is banned on this server" };
    expect(await register(evil, uniqueName("N"))).toEqual(banned);
    expect(await register(fullwidth(evil), uniqueName("N"))).toEqual(banned);
    expect(await register(evil.toUpperCase(), uniqueName("N"))).toEqual(banned);
    // Lifted: the name is free again, in either form.
    expect((await admin(srv.server.adminPort as number, "POST", "/unban", { login: evil })).status).toBe(200);
    expect((await register(fullwidth(evil), uniqueName("N"))).status).toBe(0);
  });

  it("a nick of invisible characters only is refused (3); one with a joiner inside letters is a nick", async () => {
    expect(await register(uniqueName("ghost"), "\u200b\u200c")).toMatchObject({ status: 3, error: expect.stringMatching(/must show something/) });
    // Persian with a zero-width non-joiner: a nick, one with the same letters without it.
    const word = `می\u200cخواهم${Date.now() % 100000}`;
    expect((await register(uniqueName("fa"), word)).status).toBe(0);
    expect(await register(uniqueName("fa"), word.replace("\u200c", ""))).toEqual({ status: 1, error: "that nick is already taken" });
  });

  it("layout 5 to 6: names are indexed as they read; accounts that read alike both stay, and their names stay taken until both are gone", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir });
    try {
      const bob = await registerUser(server.port, uniqueName("bob"), "secret", uniqueName("Bob"));
      const twin = await registerUser(server.port, uniqueName("twin"), "secret", uniqueName("Twin"));
      for (const x of [bob, twin]) x.client.close();
      // As a layout-5 server could leave them: twin's nick bob's with a zero-width space
      // (keyed by its lower case), no name keys, and a name key of an account deleted
      // by an older server run on the data dir part-way through a first migration.
      const sp = server.services.storage.spaces;
      const rec = (await sp.users.get(twin.uid)) as Record<string, unknown>;
      const twinNick = bob.nick + "\u200b";
      await sp.nick.del(String(rec.nick).toLowerCase());
      await sp.nick.put(twinNick.toLowerCase(), twin.uid);
      await sp.users.put(twin.uid, { ...rec, nick: twinNick });
      await sp.namekeys.clear();
      const ghost = uniqueName("ghost");
      await sp.namekeys.put(`${ghost}\u0000000000000000`, 1);
      await sp.meta.put("layout", 5);
      await server.stop();
      server = await startTestServer({ dataDir });
      // (and on to 7: the channels' names, next test)
      expect(await server.services.storage.spaces.meta.get("layout")).toBe(7);
      const reg = async (login: string, nick: string) => {
        const c = await Client.connect(server.port);
        try {
          return await c.request("register", { login, pass: "pw", nick });
        } finally {
          c.close();
        }
      };
      const taken = { status: 1, error: "that nick is already taken" };
      expect(await reg(uniqueName("evil"), bob.nick + "\u200d")).toEqual(taken);
      // The stale key is gone: its name is free.
      expect((await reg(uniqueName("x"), ghost)).status).toBe(0);
      // Both accounts work; deleting one leaves the name taken by the other.
      for (const who of [twin, bob]) {
        const c = await Client.connect(server.port);
        expect((await c.request("auth", { login: who.login, pass: "secret" })).status).toBe(0);
        expect((await c.request("deleteaccount", { pass: "secret" })).status).toBe(0);
        c.close();
        if (who === twin) expect(await reg(uniqueName("evil"), bob.nick + "\u2060")).toEqual(taken);
      }
      // Both gone: the name is free.
      expect((await reg(uniqueName("new"), bob.nick)).status).toBe(0);
    } finally {
      await server.stop();
      removeDir(dataDir);
    }
  });
});

describe("name keys and the runtime's Unicode tables", () => {
  it("built with another Unicode version: both indexes are built again at start-up (a stale key freed, the names still taken); with this one, left as they are", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir });
    try {
      const bob = await registerUser(server.port, uniqueName("bob"), "secret", uniqueName("Bob"));
      bob.client.close();
      const chan = `agora${Date.now() % 1e8}`;
      const owner = await registerUser(server.port);
      expect((await owner.client.request("createchannel", { name: chan })).status).toBe(0);
      owner.client.close();
      const sp = server.services.storage.spaces;
      expect(await sp.meta.get("unicode")).toBe(process.versions.unicode);
      // Keys another runtime's tables could have made: a name and a channel name
      // nobody holds, each kept taken by its stale entry.
      const ghost = uniqueName("ghost");
      const ghostChan = `ghost${Date.now() % 1e8}`;
      await sp.namekeys.put(`${ghost}\u0000000000000000`, 1);
      await sp.chreads.put(`${ghostChan}\u00009999999`, 1);
      const reg = async (port: number, login: string, nick = login) => {
        const c = await Client.connect(port);
        try {
          return await c.request("register", { login, pass: "pw", nick });
        } finally {
          c.close();
        }
      };
      // Same Unicode version: nothing is built again, the stale keys stay.
      await server.stop();
      server = await startTestServer({ dataDir });
      expect((await reg(server.port, ghost)).status).toBe(1);
      // Another one recorded: both built again from the accounts and the channels.
      await server.services.storage.spaces.meta.put("unicode", "1.0.0");
      await server.stop();
      server = await startTestServer({ dataDir });
      expect(await server.services.storage.spaces.meta.get("unicode")).toBe(process.versions.unicode);
      expect((await reg(server.port, ghost)).status).toBe(0);
      const c = await registerUser(server.port);
      expect((await c.client.request("createchannel", { name: ghostChan })).status).toBe(0);
      // What real accounts and channels hold is taken as before.
      expect(await reg(server.port, uniqueName("x"), bob.nick + "\u200b")).toEqual({ status: 1, error: "that nick is already taken" });
      expect(await c.client.request("createchannel", { name: chan + "\u200b" })).toEqual({ status: 1, error: `a channel whose name reads as '${chan}\u200b' already exists` });
      c.client.close();
    } finally {
      await server.stop();
      removeDir(dataDir);
    }
  });
});

describe("public channel names that read alike are one name", () => {
  const fullwidth = (s: string) => [...s].map((ch) => (/[a-z]/.test(ch) ? String.fromCodePoint(ch.codePointAt(0)! + 0xfee0) : ch)).join("");

  it("a name in fullwidth letters, with a zero-width space or a joiner, or in another case is taken; private names are not; freed with the channel", async () => {
    const a = await registerUser(srv.port);
    const b = await registerUser(srv.port);
    const name = `plaza${Date.now() % 1e8}`;
    const made = await a.client.request("createchannel", { name });
    expect(made.status).toBe(0);
    expect(await b.client.request("createchannel", { name: name.toUpperCase() })).toEqual({ status: 1, error: `a channel named '${name.toUpperCase()}' already exists` });
    for (const alike of [fullwidth(name), name.slice(0, 2) + "\u200b" + name.slice(2), name + "\u2060", name.replace("a", "\uff41")]) {
      expect(await b.client.request("createchannel", { name: alike })).toEqual({ status: 1, error: `a channel whose name reads as '${alike}' already exists` });
    }
    // Private channels' names are not unique, alike or not.
    expect((await b.client.request("createchannel", { name: fullwidth(name), private: true })).status).toBe(0);
    // A public name that shows nothing is refused; a private channel's is its members' affair
    // (the seed doors name rooms after their members' logins).
    expect(await b.client.request("createchannel", { name: "\u200b\u2060" })).toEqual({ status: 3, error: "'name' must show something: it holds only invisible characters" });
    expect((await b.client.request("createchannel", { name: "\u200b\u2060", private: true })).status).toBe(0);
    expect((await a.client.request("deletechannel", { channel: made.chid })).status).toBe(0);
    expect((await b.client.request("createchannel", { name: fullwidth(name) })).status).toBe(0);
    for (const x of [a, b]) x.client.close();
  });

  it("layout 6 to 7: public names are indexed as they read; channels whose names read alike both stay, and the name stays taken until both are gone", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir });
    try {
      const a = await registerUser(server.port);
      const name = `agora${Date.now() % 1e8}`;
      const first = (await a.client.request("createchannel", { name })).chid as string;
      const second = (await a.client.request("createchannel", { name: `${name}-2` })).chid as string;
      a.client.close();
      // As a layout-6 server could leave them: the second named as the first with a
      // zero-width space (its own lower-case chname entry), no chreads entries, and a
      // stale one (an older server run on the data dir part-way through a migration).
      const sp = server.services.storage.spaces;
      const rec = (await sp.channels.get(second)) as Record<string, unknown>;
      const twin = `${name}\u200b`;
      await sp.chname.del(String(rec.name).toLowerCase());
      await sp.chname.put(twin.toLowerCase(), second);
      await sp.channels.put(second, { ...rec, name: twin });
      await sp.chreads.clear();
      const ghost = `ghost${Date.now() % 1e8}`;
      await sp.chreads.put(`${ghost}\u00009999999`, 1);
      await sp.meta.put("layout", 6);
      await server.stop();
      server = await startTestServer({ dataDir });
      expect(await server.services.storage.spaces.meta.get("layout")).toBe(7);
      const c = await Client.connect(server.port);
      expect((await c.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
      const alike = `${name.toUpperCase()}\u200d`;
      const refused = { status: 1, error: `a channel whose name reads as '${alike}' already exists` };
      expect(await c.request("createchannel", { name: alike })).toEqual(refused);
      // The stale entry is gone: its name is free.
      expect((await c.request("createchannel", { name: ghost })).status).toBe(0);
      // Both channels stay; deleting one leaves the name taken by the other.
      expect((await c.request("deletechannel", { channel: first })).status).toBe(0);
      expect(await c.request("createchannel", { name: alike })).toEqual(refused);
      expect((await c.request("deletechannel", { channel: second })).status).toBe(0);
      expect((await c.request("createchannel", { name: alike })).status).toBe(0);
      c.close();
    } finally {
      await server.stop();
      removeDir(dataDir);
    }
  });
});
