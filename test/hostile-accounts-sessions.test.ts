// Hostile clients against sessions, profiles and presence (issue 9): sids stored as
// hashes, a cap on sessions and on connections per user, expired sessions swept and
// enforced on live connections, concurrent profile writes leaving no stale index
// entry, and re-authentication announcing no presence. Real servers over TCP.
import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, removeDir, serveForFile, startTestServer, tempDir, uniqueName } from "./helpers.js";
import type { BatchOp } from "../src/storage/db.js";
import type { RunningServer } from "../src/server.js";
import { heldGate, waitFor, wrapCalls } from "./pipeline-helpers.js";

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

const sha256 = (s: string) => createHash("sha256").update(s).digest("hex");

/**
 * A password auth of `login` on a new connection, reset once the server reaches `gate`
 * (a wrapped call, undone by `undo`); returns when the server has seen the reset and
 * the gate is open again.
 */
async function resetLogin(server: RunningServer, login: string, gate: ReturnType<typeof heldGate>, undo: () => void): Promise<void> {
  const c = await Client.connect(server.port);
  try {
    c.write(JSON.stringify({ action: "auth", data: { login, pass: "secret" } }) + "\n");
    await gate.reached;
    const open = server.listener.connections.size;
    c.socket.resetAndDestroy();
    await waitFor(() => server.listener.connections.size < open, 5000, "the server to see the reset");
  } finally {
    undo();
    gate.open();
  }
}

describe("stored sessions", () => {
  it("the database holds a hash of each sid, never the sid; a plain sid from an older version is migrated at start-up", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir });
    const a = await registerUser(server.port);
    const spaces = server.services.storage.spaces;
    expect(await spaces.sessions.get(a.sid)).toBeUndefined();
    const keys = (await spaces.sessions.keys().all()) as string[];
    expect(keys).not.toContain(a.sid);
    expect(keys).toContain(sha256(a.sid));
    const ukeys = (await spaces.usessions.keys().all()) as string[];
    expect(ukeys.some((k) => k.includes(a.sid))).toBe(false);
    // A session as an older version stored it: the plain sid as the key (and no mark
    // that the sessions were migrated).
    await spaces.meta.del("sessions-hashed");
    const plain = "0123456789abcdef0123456789abcdef";
    const now = Math.floor(Date.now() / 1000);
    await spaces.sessions.put(plain, { uid: a.uid, created: now, expires: now + 3600 });
    await spaces.usessions.put(`${a.uid}!${plain}`, now + 3600);
    a.client.close();
    await server.stop();
    server = await startTestServer({ dataDir });
    const sp = server.services.storage.spaces;
    expect(await sp.sessions.get(plain)).toBeUndefined();
    const c = await Client.connect(server.port);
    expect((await c.request("auth", { sid: plain })).status).toBe(0);
    expect((await c.request("auth", { sid: a.sid })).status).toBe(0);
    c.close();
    await server.stop();
    removeDir(dataDir);
  });

  it("past --max-sessions-per-user the oldest session is revoked and its connection logged out", async () => {
    const server = await startTestServer({ maxSessionsPerUser: 3 });
    const a = await registerUser(server.port);
    const devices = [];
    for (let i = 0; i < 3; i++) devices.push(await login(server.port, a.login));
    // 4 sessions were issued: the first (register's) is gone.
    const ev = await a.client.event("ev_logout");
    expect(ev.reason).toMatch(/session/);
    expect((await a.client.request("userinfo", { user: a.uid })).status).toBe(6);
    const c = await Client.connect(server.port);
    expect((await c.request("auth", { sid: a.sid })).status).toBe(2);
    for (const d of devices) {
      const c2 = await Client.connect(server.port);
      expect((await c2.request("auth", { sid: d.auth.sid })).status).toBe(0);
      c2.close();
    }
    expect((await server.services.storage.spaces.usessions.keys().all()).length).toBe(3);
    await closeAll(c, a.client, ...devices.map((d) => d.client));
    await server.stop();
  });

  it("a login whose connection is reset while its session is stored leaves no session behind", async () => {
    const server = await startTestServer();
    const a = await registerUser(server.port);
    await closeAll(a.client);
    const { storage } = server.services;
    const sessionsOf = async () => ((await storage.spaces.usessions.keys().all()) as string[]).filter((k) => k.startsWith(`${a.uid}!`)).length;
    expect(await sessionsOf()).toBe(1); // register's
    // The commit that stores the new session waits until the server has seen the reset.
    const gate = heldGate();
    const undo = wrapCalls(storage, "commit", async (ops: BatchOp[]) => ops.some((o) => o.key.startsWith(storage.spaces.usessions.prefix)) && (await gate.pass()));
    await resetLogin(server, a.login, gate, undo);
    // A login of the same user waits for that one's lock: whatever it stored is settled.
    const d = await login(server.port, a.login);
    expect(await sessionsOf()).toBe(2); // register's and d's
    expect((await d.client.request("userinfo", { user: a.uid })).status).toBe(0);
    await closeAll(d.client);
    await server.stop();
  });

  it("a login whose connection is reset while the user's sessions are read evicts no session past the cap", async () => {
    const server = await startTestServer({ maxSessionsPerUser: 1 });
    const a = await registerUser(server.port);
    const { sessions } = server.services;
    // The new login's read of the user's sessions (to evict past the cap) waits until
    // the server has seen its connection reset.
    const gate = heldGate();
    const undo = wrapCalls(sessions, "list", async (uid: string) => uid === a.uid && (await gate.pass()));
    await resetLogin(server, a.login, gate, undo);
    // The device that was logged in still is, on the same session.
    expect(await a.client.quiet(300, (f) => f.action === "ev_logout")).toBe(true);
    expect((await a.client.request("userinfo", { user: a.uid })).status).toBe(0);
    const again = await Client.connect(server.port);
    expect((await again.request("auth", { sid: a.sid })).status).toBe(0);
    await closeAll(again, a.client);
    await server.stop();
  });

  it("an expired session is swept from the database and its live connection is told and closed", async () => {
    const server = await startTestServer({ sessionTtl: 1 });
    const a = await registerUser(server.port);
    const ev = await a.client.event("ev_logout", () => true, 10_000);
    expect(ev.reason).toMatch(/expired/);
    await a.client.closed;
    const keys = await server.services.storage.spaces.sessions.keys().all();
    expect(keys).toEqual([]);
    await server.stop();
  });

  it("an auth with an expired sid ends the connections still on it (the sweep no longer finds it)", async () => {
    const server = await startTestServer({ sessionTtl: 5 });
    try {
      // The sweep runs every 5 s from the start: a session made in the start's second
      // (expiries are in whole seconds) was due at the first sweep, which then found it
      // as soon as the polling auths could (CI: the sweep won, and closed the asking
      // connection). Made a second later, it is due between two sweeps.
      await new Promise((r) => setTimeout(r, 1100));
      const a = await registerUser(server.port);
      const logout = a.client.event("ev_logout", () => true, 20_000);
      const other = await Client.connect(server.port);
      // Asked again and again from the moment it expires: an auth rather than the sweep
      // (every 5 s here) finds it first.
      let status = 0;
      while (status === 0) {
        await new Promise((r) => setTimeout(r, 100));
        status = (await other.request("auth", { sid: a.sid })).status;
      }
      expect(status).toBe(2);
      const ev = await Promise.race([logout, new Promise((r) => setTimeout(() => r("still logged in"), 3000))]);
      expect(ev).toMatchObject({ reason: expect.stringMatching(/expired/) });
      await a.client.closed;
      // The asking connection (logged in on it by the tries before it expired) is told
      // by the reply, and is no longer logged in.
      expect((await other.request("contactlist")).status).toBe(6);
      await closeAll(other);
    } finally {
      await server.stop();
    }
  });

  it("expired sessions left in the database are swept at start-up", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir, sessionTtl: 1 });
    const a = await registerUser(server.port);
    a.client.close();
    await server.stop();
    await new Promise((r) => setTimeout(r, 2100));
    server = await startTestServer({ dataDir });
    const spaces = server.services.storage.spaces;
    expect(await spaces.sessions.keys().all()).toEqual([]);
    expect(await spaces.usessions.keys().all()).toEqual([]);
    await server.stop();
    removeDir(dataDir);
  });

  it("past --max-connections-per-user an auth gets 13", async () => {
    const server = await startTestServer({ maxConnectionsPerUser: 2 });
    const a = await registerUser(server.port);
    const second = await Client.connect(server.port);
    expect((await second.request("auth", { sid: a.sid })).status).toBe(0);
    const third = await Client.connect(server.port);
    expect((await third.request("auth", { sid: a.sid })).status).toBe(13);
    expect((await third.request("auth", { login: a.login, pass: "secret" })).status).toBe(13);
    // re-authenticating on a connection already counted is not refused
    expect((await second.request("auth", { sid: a.sid })).status).toBe(0);
    second.close();
    await second.closed;
    // The server sees the close a little later than the client.
    while (server.services.router.sessions(a.uid).length > 1) await new Promise((r) => setTimeout(r, 10));
    expect((await third.request("auth", { sid: a.sid })).status).toBe(0);
    await closeAll(a.client, third);
    await server.stop();
  });
});

describe("profile races", () => {
  const shared = serveForFile();

  it("two connections setting email and phone at once leave only the final values indexed", async () => {
    const u = await registerUser(shared.port);
    const u2 = (await login(shared.port, u.login)).client;
    const other = await registerUser(shared.port);
    const t = uniqueName("m").replace(/\D/g, "").slice(-6);
    const emails: string[] = [];
    const phones: string[] = [];
    for (let i = 0; i < 30; i++) {
      emails.push(`e${i}x${t}@race.example`);
      phones.push(`+7${t}${String(i).padStart(3, "0")}`);
    }
    for (let i = 0; i < 30; i++) {
      (i % 2 ? u.client : u2).send("setuserinfo", { email: emails[i], phone: phones[i] });
    }
    await Promise.all([
      ...Array.from({ length: 15 }, () => u.client.reply("setuserinfo", 20_000)),
      ...Array.from({ length: 15 }, () => u2.reply("setuserinfo", 20_000)),
    ]);
    const final = await other.client.request("userinfo", { user: u.uid });
    const contacts = emails.map((email, i) => ({ myid: i, email, phone: phones[i] }));
    const found = (await other.client.request("import", { contacts })).list;
    expect(found.map((x: any) => x.uid)).toEqual([u.uid]);
    expect(found[0].email).toBe(final.email);
    // Only the final email and phone are taken: the others are free for someone else.
    for (let i = 0; i < 30; i++) {
      if (emails[i] === final.email) continue;
      const r = await other.client.request("setuserinfo", { email: emails[i] });
      expect(r.status, `email ${emails[i]} still points at the user`).toBe(0);
    }
    for (let i = 0; i < 30; i++) {
      if (phones[i] === final.phone) continue;
      const r = await other.client.request("setuserinfo", { phone: phones[i] });
      expect(r.status, `phone ${phones[i]} still points at the user`).toBe(0);
    }
    await closeAll(u.client, u2, other.client);
  });

  it("changepassword racing setuserinfo keeps the new email in the record and the index", async () => {
    const u = await registerUser(shared.port, uniqueName("pw"), "p0");
    const u2 = (await login(shared.port, u.login, "p0")).client;
    const other = await registerUser(shared.port);
    const t = uniqueName("r").replace(/\D/g, "").slice(-6);
    u.client.send("changepassword", { pass: "p0", newpass: "p1" });
    u2.send("setuserinfo", { email: `pw${t}@race.example` });
    await u.client.reply("changepassword");
    const set = await Promise.race([u2.reply("setuserinfo").then((f) => f.data.status), u2.closed.then(() => -1)]);
    const info = await other.client.request("userinfo", { user: u.uid });
    const found = (await other.client.request("import", { contacts: [{ myid: 1, email: `pw${t}@race.example` }] })).list;
    if (set === 0) {
      expect(info.email).toBe(`pw${t}@race.example`);
      expect(found.map((x: any) => x.uid)).toEqual([u.uid]);
    } else {
      expect(info.email).toBe("");
      expect(found).toEqual([]);
    }
    // Either way the record and the index agree.
    expect(found.length === 1).toBe(info.email !== "");
    await closeAll(u.client, u2, other.client);
  });
});

describe("changes waiting behind the password change that ends their session", () => {
  const shared = serveForFile();

  it("setuserinfo and addcontact queued on the user's lock change nothing once it has answered", async () => {
    const u = await registerUser(shared.port, uniqueName("pw"), "p0");
    let pass = "p0";
    const other = await registerUser(shared.port);
    const sv = shared.server.services;
    const t = uniqueName("r").replace(/\D/g, "").slice(-6);
    const email = `late${t}@race.example`;
    const tries: [string, Record<string, unknown>][] = [
      ["setuserinfo", { email }],
      ["addcontact", { uid: other.uid }],
    ];
    for (const [action, data] of tries) {
      const b = (await login(shared.port, u.login, pass)).client;
      // The password change holds the user's lock at its commit; the other device's
      // change then queues on that lock (seen by locks.run) before the commit goes on.
      const commitGate = heldGate();
      let armed = true;
      const undoCommit = wrapCalls(sv.storage, "commit", async (ops: BatchOp[]) => {
        if (armed && ops.some((o) => o.key.startsWith(sv.storage.spaces.users.prefix))) {
          armed = false;
          await commitGate.pass();
        }
      });
      const queued = heldGate();
      const undoLock = wrapCalls(sv.locks, "run", async (key: string) => {
        if (key === `user:${u.uid}`) void queued.pass();
      });
      try {
        const next = pass === "p0" ? "p1" : "p0";
        u.client.send("changepassword", { pass, newpass: next });
        await commitGate.reached;
        b.send(action, data);
        await queued.reached;
        commitGate.open();
        expect((await u.client.reply("changepassword")).data.status).toBe(0);
        pass = next;
        const answered = await Promise.race([b.reply(action).then((f) => f.data.status), b.closed.then(() => "closed")]);
        expect(answered, `${action} after its session ended`).not.toBe(0);
      } finally {
        undoLock();
        undoCommit();
        commitGate.open();
      }
      await b.closed;
    }
    // Nothing of either landed: no email (record or index), no contact.
    expect((await other.client.request("userinfo", { user: u.uid })).email).toBe("");
    expect((await other.client.request("import", { contacts: [{ myid: 1, email }] })).list).toEqual([]);
    expect((await u.client.request("contactlist")).list).toEqual([]);
    for (const a of [u, other]) a.client.close();
    await Promise.all([u.client.closed, other.client.closed]);
  });
});

describe("presence on re-authentication", () => {
  const shared = serveForFile();

  it("re-authenticating on the same connection announces nothing to contacts", async () => {
    const u = await registerUser(shared.port);
    const watcher = await registerUser(shared.port);
    expect((await watcher.client.request("addcontact", { uid: u.uid })).status).toBe(0);
    for (let i = 0; i < 10; i++) {
      expect((await u.client.request("auth", { sid: u.sid })).status).toBe(0);
      expect((await u.client.request("auth", { login: u.login, pass: "secret" })).status).toBe(0);
    }
    expect(await watcher.client.quiet(300, (f) => f.action === "ev_presence")).toBe(true);
    // The real transition is still announced.
    u.client.close();
    expect(await watcher.client.event("ev_presence")).toEqual({ uid: u.uid, online: false });
    await closeAll(watcher.client);
  });
});

describe("a connection that closes while its password is checked", () => {
  it("is not logged in: the user does not stay online", async () => {
    const server = await startTestServer({ bcryptCost: 10 });
    const u = await registerUser(server.port);
    u.client.close();
    await u.client.closed;
    for (let i = 0; i < 5; i++) {
      const c = await Client.connect(server.port);
      c.send("auth", { login: u.login, pass: "secret" });
      await new Promise((r) => setTimeout(r, 10));
      c.socket.resetAndDestroy(); // a reset: the server's socket closes at once
      await c.closed;
    }
    // Every check has finished well within this (bcrypt cost 10: tens of ms each),
    // and with it the attempts counted against the login.
    await new Promise((r) => setTimeout(r, 1500));
    const check = await Client.connect(server.port);
    expect((await check.request("auth", { login: u.login, pass: "secret" })).status).toBe(0);
    check.close();
    await check.closed;
    await new Promise((r) => setTimeout(r, 200));
    expect(server.services.router.isOnline(u.uid)).toBe(false);
    expect(server.services.router.sessions(u.uid)).toHaveLength(0);
    await server.stop();
  });
});

describe("a session that ends while its messages wait", () => {
  it("messages in flight when a password change elsewhere ends the session are refused (6), never stored or sent under no name", async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ dataDir });
    const a = await registerUser(server.port);
    const chids: string[] = [];
    for (let i = 0; i < 60; i++) chids.push((await a.client.request("createchannel", { name: uniqueName("ended") })).chid);
    await closeAll(a.client);
    await server.stop();
    // After a restart no channel's members are in memory: each first message to one
    // reads them (its handler waits), and the session ends while they do.
    server = await startTestServer({ dataDir });
    const c = await Client.connect(server.port);
    expect((await c.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    const other = await Client.connect(server.port);
    expect((await other.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    for (const chid of chids) c.send("message", { channel: chid, body: `to ${chid}` });
    other.send("changepassword", { pass: "secret", newpass: "secret2" });
    await c.closed;
    // Every frame the server sent was JSON (the client parses each line; a bad one throws).
    const replies = c.lines.map((l) => JSON.parse(l)).filter((f) => f.action === "message");
    expect(replies.every((f) => f.data.status === 0 || f.data.status === 6)).toBe(true);
    // What was acknowledged is stored, in the sender's name; nothing else is.
    for (const [i, chid] of chids.entries()) {
      const hist = await other.request("history", { channel: chid, limit: 10 });
      for (const m of hist.messages) expect(m).toMatchObject({ from: a.uid, nick: a.nick });
      if (replies[i]?.data.status === 0) expect(hist.messages).toHaveLength(1);
    }
    await closeAll(other);
    await server.stop();
    removeDir(dataDir);
  });
});

describe("other users' requests naming a user", () => {
  const server = serveForFile({});

  it("a flood of addcontact/delcontact naming a user does not queue that user's login behind it", async () => {
    // Each add holds its two users' links locks for a synced commit. Under their user
    // locks (before), 40 connections looping add/del on the victim put 40 adds ahead of
    // every login of the victim: its auth came back after 79-82 of their replies. Under
    // links locks it waits for none of them: 6-7 replies (about two per batch written
    // meanwhile: the adds go one at a time).
    const victim = await registerUser(server.port);
    victim.client.close();
    // One user each: a user's two connections adding one contact at once get 0 and 1.
    const conns = (await Promise.all(Array.from({ length: 40 }, () => registerUser(server.port)))).map((a) => a.client);
    let replies = 0;
    let stop = false;
    const loops = conns.map(async (c) => {
      while (!stop) {
        expect((await c.request("addcontact", { uid: victim.uid })).status).toBe(0);
        replies++;
        expect((await c.request("delcontact", { uid: victim.uid })).status).toBe(0);
        replies++;
      }
    });
    try {
      await waitFor(() => replies >= 400, 20_000, "the flood to be under way");
      for (let i = 0; i < 3; i++) {
        const c = await Client.connect(server.port);
        const before = replies;
        expect((await c.request("auth", { login: victim.login, pass: "secret" })).status).toBe(0);
        const during = replies - before;
        expect(during).toBeLessThan(30);
        c.close();
      }
    } finally {
      stop = true;
      await Promise.all(loops);
      await closeAll(...conns);
    }
  });
});
