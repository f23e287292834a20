// searchuser and ev_presence (spec §4), against a real server over TCP.
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, uniqueName, type Account, serveForFile } from "./helpers.js";
import { heldGate, sleep, waitFor, wrapCalls } from "./pipeline-helpers.js";


const shared = serveForFile();

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

/** A user who is offline, and another, online, who lists them. */
async function offlineAndLister(): Promise<[Account, Account]> {
  const listed = await registerUser(shared.port);
  await closeAll(listed.client);
  const lister = await registerUser(shared.port);
  expect((await lister.client.request("addcontact", { uid: listed.uid })).status).toBe(0);
  return [listed, lister];
}

async function search(who: Client, q: string): Promise<{ uid: string; nick: string }[]> {
  const r = await who.request("searchuser", { q });
  expect(r).toMatchObject({ status: 0, error: "OK" });
  expect(Array.isArray(r.list)).toBe(true);
  return r.list;
}

const uids = (list: { uid: string }[]) => list.map((x) => x.uid).sort();

describe("searchuser", () => {
  it("matches a prefix of the nick or of the login, whatever the case", async () => {
    const tag = `${uniqueName("q")}_`;
    // login and nick deliberately unalike, so each index is tested on its own
    const u = await registerUser(shared.port, `lg${tag}zz`, "secret", `Nick${tag}Mixed`);
    const other = await registerUser(shared.port, `other${tag}`, "secret", `Someone${tag}`);
    const me = await registerUser(shared.port);

    for (const q of [`nick${tag}`, `NICK${tag}`, `Nick${tag}m`, `nICK${tag}MIXED`, `lg${tag}`, `LG${tag}Z`, `Lg${tag}zz`]) {
      expect(await search(me.client, q), q).toEqual([{ uid: u.uid, nick: u.nick }]);
    }
    // not a prefix: nothing
    for (const q of [`${tag}`, `Mixed`, `ick${tag}`, `g${tag}`, `lg${tag}zzz`, `nick${tag}mixedx`]) {
      expect(await search(me.client, q), q).toEqual([]);
    }
    expect(await search(me.client, `someone${tag}`)).toEqual([{ uid: other.uid, nick: other.nick }]);
    expect(await search(me.client, `OTHER${tag}`)).toEqual([{ uid: other.uid, nick: other.nick }]);
    // a user whose login and nick both match is listed once
    const both = await registerUser(shared.port, `dup${tag}`, "secret", `dup${tag}`);
    expect(await search(me.client, `dup${tag}`)).toEqual([{ uid: both.uid, nick: both.nick }]);
    await closeAll(u.client, other.client, me.client, both.client);
  });

  it("answers at most 50 users", async () => {
    const tag = `${uniqueName("many")}_`;
    const made: Account[] = [];
    for (let i = 0; i < 60; i++) {
      // half match by nick, half by login
      const a = i % 2 ? await registerUser(shared.port, `${tag}L${i}`, "s", `n${i}${tag}`) : await registerUser(shared.port, `x${i}${tag}`, "s", `${tag}N${i}`);
      made.push(a);
    }
    const me = await registerUser(shared.port);
    const list = await search(me.client, tag);
    expect(list).toHaveLength(50);
    const all = new Set(made.map((a) => a.uid));
    for (const x of list) expect(all.has(x.uid)).toBe(true);
    expect(new Set(list.map((x) => x.uid)).size).toBe(50);
    // a narrower prefix still finds exactly its matches
    expect(uids(await search(me.client, `${tag}N1`))).toEqual(
      made.filter((_, i) => i % 2 === 0 && String(i).startsWith("1")).map((a) => a.uid).sort(),
    );
    await closeAll(me.client, ...made.map((a) => a.client));
  });

  it("never shows email or phone, even when set", async () => {
    const tag = `${uniqueName("priv")}_`;
    const u = await registerUser(shared.port, `${tag}`, "secret", `${tag}nick`);
    const email = `${tag}@mail.example`;
    const phone = `+1555${String(process.pid).padStart(7, "0").slice(-7)}`;
    expect((await u.client.request("setuserinfo", { email, phone, user_status: "here" })).status).toBe(0);
    expect((await u.client.request("userinfo", { user: u.uid })).email).toBe(email);
    const me = await registerUser(shared.port);
    const r = await me.client.request("searchuser", { q: tag });
    expect(r.list).toEqual([{ uid: u.uid, nick: u.nick }]);
    for (const entry of r.list) expect(Object.keys(entry).sort()).toEqual(["nick", "uid"]);
    const raw = me.client.lines.find((l) => l.startsWith('{"action":"searchuser"')) as string;
    expect(raw).not.toContain(email);
    expect(raw).not.toContain(phone.slice(1));
    expect(raw).not.toContain('"email"');
    expect(raw).not.toContain('"phone"');
    // searching by the email or phone finds nothing
    expect(await search(me.client, email)).toEqual([]);
    expect(await search(me.client, phone)).toEqual([]);
    await closeAll(u.client, me.client);
  });

  it("never matches a login that is an address (an account's email), by any prefix of it, and reads past such logins", async () => {
    const tag = `${uniqueName("addr")}_`;
    const me = await registerUser(shared.port);
    // The HTTP/WS chat door's accounts log in by their email: their login is one.
    const mailed = await registerUser(shared.port, `${tag}x@mail.example`, "secret", `N${tag}`);
    for (const q of [tag, `${tag}x`, `${tag}x@`, `${tag}x@mail.example`]) expect(await search(me.client, q), q).toEqual([]);
    expect(await search(me.client, `n${tag}`)).toEqual([{ uid: mailed.uid, nick: mailed.nick }]);
    // 60 address logins sort before a plain one with the same prefix: it is still found.
    const hidden: Account[] = [];
    for (let i = 0; i < 60; i++) hidden.push(await registerUser(shared.port, `${tag}a${String(i).padStart(2, "0")}@mail.example`, "s", `h${i}${tag}`));
    const plain = await registerUser(shared.port, `${tag}b`, "s", `p${tag}`);
    expect(await search(me.client, tag)).toEqual([{ uid: plain.uid, nick: plain.nick }]);
    await closeAll(me.client, mailed.client, plain.client, ...hidden.map((a) => a.client));
  });

  it("answers 4 for an empty or missing q, 3 for a q that is not a string, 6 before auth", async () => {
    const me = await registerUser(shared.port);
    expect((await me.client.request("searchuser", { q: "" })).status).toBe(4);
    expect((await me.client.request("searchuser", {})).status).toBe(4);
    expect((await me.client.request("searchuser", { q: 5 })).status).toBe(3);
    const anon = await Client.connect(shared.port);
    expect((await anon.request("searchuser", { q: "a" })).status).toBe(6);
    await closeAll(me.client, anon);
  });
});

describe("ev_presence", () => {
  const isPresence = (f: { action: string }) => f.action === "ev_presence";

  it("tells the users who list someone when their first connection opens and their last closes", async () => {
    const a = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port); // also lists b
    const d = await registerUser(shared.port); // does not list b
    const e = await registerUser(shared.port); // listed by b, does not list b
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    expect((await c.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    expect((await b.client.request("addcontact", { uid: e.uid })).status).toBe(0);

    // b's only connection closes: offline
    await closeAll(b.client);
    for (const x of [a.client, a2.client, c.client]) {
      expect(await x.event("ev_presence")).toEqual({ uid: b.uid, online: false });
    }
    // b's first connection opens (by password): online
    const b1 = await login(shared.port, b.login);
    expect(b1.auth.status).toBe(0);
    for (const x of [a.client, a2.client, c.client]) {
      expect(await x.event("ev_presence")).toEqual({ uid: b.uid, online: true });
    }
    // a second device opening and closing: nothing
    const b2 = await login(shared.port, b.login);
    expect(b2.auth.status).toBe(0);
    await closeAll(b2.client);
    expect(await a.client.quiet(300, isPresence)).toBe(true);
    // the last one closing: offline
    await closeAll(b1.client);
    for (const x of [a.client, a2.client, c.client]) {
      expect(await x.event("ev_presence")).toEqual({ uid: b.uid, online: false });
    }
    // resuming the session by sid counts as a first connection too
    const b3 = await Client.connect(shared.port);
    expect((await b3.request("auth", { sid: b.sid })).status).toBe(0);
    expect(await a.client.event("ev_presence")).toEqual({ uid: b.uid, online: true });

    // nobody else heard anything: not someone who does not list b, not the users b
    // lists, not b itself
    for (const x of [d.client, e.client, b3]) expect(await x.quiet(150, isPresence)).toBe(true);
    expect(await c.client.event("ev_presence")).toEqual({ uid: b.uid, online: true });
    expect(await a2.client.event("ev_presence")).toEqual({ uid: b.uid, online: true });
    for (const x of [a.client, a2.client, c.client]) expect(await x.quiet(100, isPresence)).toBe(true);
    await closeAll(a.client, a2.client, b3, c.client, d.client, e.client);
  });

  it("arrive in the order they happened, even when the first one's audience is slow to read", async () => {
    const alice = await registerUser(shared.port);
    await closeAll(alice.client);
    const bob = await registerUser(shared.port);
    expect((await bob.client.request("addcontact", { uid: alice.uid })).status).toBe(0);
    // The read of who lists alice takes 300 ms the first time (her coming online).
    let first = true;
    const undo = wrapCalls(shared.server.services.contacts, "listedBy", async (uid: string) => {
      if (uid !== alice.uid || !first) return;
      first = false;
      await sleep(300);
    });
    try {
      const a = await login(shared.port, alice.login);
      a.client.close();
      expect(await bob.client.event("ev_presence")).toEqual({ uid: alice.uid, online: true });
      expect(await bob.client.event("ev_presence")).toEqual({ uid: alice.uid, online: false });
    } finally {
      undo();
    }
    await closeAll(bob.client);
  });

  it("changes that come while one is told are folded into the latest: a connect-and-close loop is not told change by change", async () => {
    const [alice, bob] = await offlineAndLister();
    const sv = shared.server.services;
    // The read of who lists alice for her coming online waits at the gate while she
    // connects and closes ten more times.
    const gate = heldGate();
    let first = true;
    const undo = wrapCalls(sv.contacts, "listedBy", async (uid: string) => {
      if (uid !== alice.uid || !first) return;
      first = false;
      await gate.pass();
    });
    try {
      let a = await login(shared.port, alice.login);
      await gate.reached;
      for (let i = 0; i < 10; i++) {
        await closeAll(a.client);
        await waitFor(() => !sv.router.isOnline(alice.uid), 5000, "alice offline");
        a = await login(shared.port, alice.login);
      }
      await closeAll(a.client);
      await waitFor(() => !sv.router.isOnline(alice.uid), 5000, "alice offline");
    } finally {
      gate.open();
      undo();
    }
    // Told: online (the change held at the gate), then where she ended (offline).
    expect(await bob.client.event("ev_presence")).toEqual({ uid: alice.uid, online: true });
    expect(await bob.client.event("ev_presence")).toEqual({ uid: alice.uid, online: false });
    expect(await bob.client.quiet(300, (f) => f.action === "ev_presence")).toBe(true);
    await closeAll(bob.client);
  });

  it("a second device connecting while the first stays connected says nothing", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    const devices = [];
    for (let i = 0; i < 3; i++) devices.push(await login(shared.port, b.login));
    await closeAll(...devices.map((x) => x.client));
    expect(await a.client.quiet(300, isPresence)).toBe(true);
    // the original connection is still open: b is online
    const list = (await a.client.request("contactlist")).list;
    expect(list.find((x: any) => x.uid === b.uid)?.online).toBe(true);
    await closeAll(b.client);
    expect(await a.client.event("ev_presence")).toEqual({ uid: b.uid, online: false });
    await closeAll(a.client);
  });

  it("a deleted account goes offline for those who listed it, once, and an offline one says nothing", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const b2 = await login(shared.port, b.login);
    const c = await registerUser(shared.port);
    for (const who of [b, c]) expect((await a.client.request("addcontact", { uid: who.uid })).status).toBe(0);
    expect((await b.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    expect(await a.client.event("ev_presence")).toEqual({ uid: b.uid, online: false });
    await b2.client.closed;
    expect(await a.client.quiet(300, isPresence)).toBe(true);
    // c is offline when an operator deletes it: nothing to hear
    await closeAll(c.client);
    expect(await a.client.event("ev_presence")).toEqual({ uid: c.uid, online: false });
    expect(await shared.server.admin.deleteUser(c.uid)).toEqual({ uid: c.uid });
    expect(await a.client.quiet(300, isPresence)).toBe(true);
    expect((await a.client.request("contactlist")).list).toEqual([]);
    await closeAll(a.client, b.client);
  });

  it("a deletion folded behind a change being told still reaches those who listed the account", async () => {
    const [u, w] = await offlineAndLister();
    const sv = shared.server.services;
    // u's coming online is told to those the read found (w), after a gate; u's account is
    // deleted meanwhile (its listers come with the deletion, their entries gone).
    const gate = heldGate();
    const listedBy = sv.contacts.listedBy.bind(sv.contacts);
    let first = true;
    (sv.contacts as { listedBy: typeof listedBy }).listedBy = async (uid: string) => {
      const found = await listedBy(uid);
      if (uid === u.uid && first) {
        first = false;
        await gate.pass();
      }
      return found;
    };
    try {
      const again = await login(shared.port, u.login);
      await gate.reached;
      expect((await again.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      await closeAll(again.client);
    } finally {
      gate.open();
      delete (sv.contacts as { listedBy?: unknown }).listedBy;
    }
    expect(await w.client.event("ev_presence")).toEqual({ uid: u.uid, online: true });
    expect(await w.client.event("ev_presence")).toEqual({ uid: u.uid, online: false });
    await closeAll(w.client);
  });

  it("stops after delcontact and starts after addcontact", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    // not listed yet: nothing
    const b2 = await login(shared.port, b.login);
    await closeAll(b.client, b2.client);
    expect(await a.client.quiet(200, isPresence)).toBe(true);
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    const b3 = await login(shared.port, b.login);
    expect(await a.client.event("ev_presence")).toEqual({ uid: b.uid, online: true });
    expect((await a.client.request("delcontact", { uid: b.uid })).status).toBe(0);
    await closeAll(b3.client);
    expect(await a.client.quiet(200, isPresence)).toBe(true);
    await closeAll(a.client);
  });
});
