// Hostile clients against accounts (issue 9): credentials revoked while an auth is in
// flight, failed logins counted when they start, password hashing shared fairly
// between addresses, register and successful logins throttled, and a second user on
// an authenticated connection refused. Real servers over TCP.
import net from "node:net";
import { once } from "node:events";
import { describe, expect, it } from "vitest";
import { Client, registerUser, serveForFile, startTestServer, uniqueName } from "./helpers.js";

/** A client whose connection comes from `localAddress` (any 127.x.y.z is loopback on Linux). */
async function connectFrom(port: number, localAddress: string): Promise<Client> {
  const socket = net.connect({ port, host: "127.0.0.1", localAddress });
  await once(socket, "connect");
  const c = new (Client as unknown as new (s: net.Socket) => Client)(socket);
  await c.next((f) => f.action === "welcome");
  return c;
}

/**
 * Whether `c` is still logged in: an action that needs auth answers something other
 * than 6 (userinfo of an unknown uid: 8), and the connection is open.
 */
async function loggedIn(c: Client): Promise<boolean> {
  if (c.isClosed) return false;
  c.send("userinfo", { user: "000000000000" });
  const r = await Promise.race([c.reply("userinfo", 10_000).then((f) => f.data.status as number), c.closed.then(() => -1)]);
  return r !== 6 && r !== -1;
}

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

describe("credentials revoked while an auth is in flight", () => {
  const shared = serveForFile({ authFailLogin: 1_000_000, authFailAddr: 1_000_000, authRate: 1_000_000, authBurst: 1_000_000 });

  it("changepassword: no auth with the old password or an old sid stays valid once it has answered", async () => {
    for (let round = 0; round < 3; round++) {
      const a = await registerUser(shared.port, uniqueName("cp"), "old");
      const twin = await registerUser(shared.port); // unrelated: keeps the server busy too
      const oldSids: string[] = [];
      for (let i = 0; i < 5; i++) {
        const c = await Client.connect(shared.port);
        oldSids.push((await c.request("auth", { login: a.login, pass: "old" })).sid);
        c.close();
      }
      const racers: Client[] = [];
      for (let i = 0; i < 40; i++) racers.push(await Client.connect(shared.port));
      // The change and 40 logins with the old credentials, all at once.
      a.client.send("changepassword", { pass: "old", newpass: "new" });
      racers.forEach((c, i) => c.send("auth", i % 2 ? { login: a.login, pass: "old" } : { sid: oldSids[i % oldSids.length] }));
      expect((await a.client.reply("changepassword")).data.status).toBe(0);
      const replies = await Promise.all(
        racers.map((c) => Promise.race([c.reply("auth", 20_000).then((f) => f.data), c.closed.then(() => ({ status: -1 }))])),
      );
      const issued = new Set<string>(oldSids);
      for (const r of replies) if (r.status === 0) issued.add(r.sid);
      // Every session the old credentials got is revoked, and no connection is still on one.
      for (const sid of issued) {
        const c = await Client.connect(shared.port);
        expect((await c.request("auth", { sid })).status, `sid ${sid} still works`).toBe(2);
        c.close();
      }
      for (const c of racers) expect(await loggedIn(c), "a connection stayed logged in with the old credentials").toBe(false);
      // The caller's own session and the new password work.
      expect(await loggedIn(a.client)).toBe(true);
      const fresh = await Client.connect(shared.port);
      expect((await fresh.request("auth", { login: a.login, pass: "new" })).status).toBe(0);
      await closeAll(fresh, a.client, twin.client, ...racers);
    }
  });

  it("logout: no connection resuming the sid at the same moment stays logged in", async () => {
    for (let round = 0; round < 3; round++) {
      const a = await registerUser(shared.port);
      const racers: Client[] = [];
      for (let i = 0; i < 40; i++) racers.push(await Client.connect(shared.port));
      a.client.send("logout");
      for (const c of racers) c.send("auth", { sid: a.sid });
      expect((await a.client.reply("logout")).data.status).toBe(0);
      await Promise.all(racers.map((c) => c.reply("auth", 20_000)));
      for (const c of racers) expect(await loggedIn(c), "a connection kept a logged-out sid").toBe(false);
      const c = await Client.connect(shared.port);
      expect((await c.request("auth", { sid: a.sid })).status).toBe(2);
      await closeAll(c, a.client, ...racers);
    }
  });

  it("deleteaccount: no login in flight gets a session of the deleted account", async () => {
    const a = await registerUser(shared.port, uniqueName("del"), "pw");
    const racers: Client[] = [];
    for (let i = 0; i < 40; i++) racers.push(await Client.connect(shared.port));
    a.client.send("deleteaccount", { pass: "pw" });
    racers.forEach((c, i) => c.send("auth", i % 2 ? { login: a.login, pass: "pw" } : { sid: a.sid }));
    expect((await a.client.reply("deleteaccount")).data.status).toBe(0);
    await Promise.all(racers.map((c) => Promise.race([c.reply("auth", 20_000), c.closed])));
    for (const c of racers) expect(await loggedIn(c), "a connection is logged in as a deleted account").toBe(false);
    await closeAll(a.client, ...racers);
  });
});

describe("failed logins are counted when they start", () => {
  const shared = serveForFile({ authFailLogin: 5, authFailAddr: 1_000_000 });

  it("50 concurrent wrong guesses for one login: 5 are checked, 45 get 13", async () => {
    const a = await registerUser(shared.port);
    const cs: Client[] = [];
    for (let i = 0; i < 50; i++) cs.push(await Client.connect(shared.port));
    cs.forEach((c, i) => c.send("auth", { login: a.login, pass: `guess${i}` }));
    const statuses = (await Promise.all(cs.map((c) => c.reply("auth", 20_000)))).map((f) => f.data.status as number);
    expect(statuses.filter((s) => s === 2)).toHaveLength(5);
    expect(statuses.filter((s) => s === 13)).toHaveLength(45);
    await closeAll(a.client, ...cs);
  });

  it("guesses from another address do not lock the account: a login backs off per address", async () => {
    const victim = await registerUser(shared.port);
    const attacker = await Client.connect(shared.port, { from: "127.0.0.2" });
    for (let i = 0; i < 5; i++) expect((await attacker.request("auth", { login: victim.login, pass: `guess${i}` })).status).toBe(2);
    expect(await attacker.request("auth", { login: victim.login, pass: "secret" })).toMatchObject({ status: 13, error: expect.stringMatching(/^too many failed logins/) });
    // The victim, from their own address, with the right password.
    const own = await Client.connect(shared.port);
    expect((await own.request("auth", { login: victim.login.toUpperCase(), pass: "secret" })).status).toBe(0);
    await closeAll(victim.client, attacker, own);
  });
});

describe("auth on an authenticated connection", () => {
  const shared = serveForFile();

  it("another user's credentials get 5 and change nothing; the same user's resume", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    expect((await a.client.request("auth", { login: b.login, pass: "secret" })).status).toBe(5);
    expect((await a.client.request("auth", { sid: b.sid })).status).toBe(5);
    const me = await a.client.request("userinfo", { user: a.uid });
    expect(me.status).toBe(0);
    // still a: cid of a is accepted
    expect((await a.client.request("ping", { cid: a.uid })).status).toBe(0);
    expect((await a.client.request("auth", { sid: a.sid })).status).toBe(0);
    expect((await a.client.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    await closeAll(a.client, b.client);
  });
});

describe("password hashing is shared fairly between addresses", () => {
  const shared = serveForFile({ authFailLogin: 1_000_000, authFailAddr: 1_000_000, authRate: 1_000_000, authBurst: 1_000_000, bcryptCost: 6 });

  it("a login from another address waits for about one hash per busy address, not the whole queue", async () => {
    const victim = await registerUser(shared.port, uniqueName("victim"), "right");
    const target = await registerUser(shared.port, uniqueName("target"), "right");
    const attackers: Client[] = [];
    for (let i = 0; i < 40; i++) attackers.push(await connectFrom(shared.port, "127.0.0.3"));
    let answered = 0;
    let stop = false;
    const loops = attackers.map(async (c) => {
      while (!stop) {
        c.send("auth", { login: target.login, pass: "wrong" });
        const r = await Promise.race([c.reply("auth", 30_000), c.closed.then(() => undefined)]);
        if (!r) return;
        answered++;
      }
    });
    // Steady state: every attacker connection has a check queued or running.
    while (answered < 80) await new Promise((r) => setTimeout(r, 5));
    const v = await connectFrom(shared.port, "127.0.0.2");
    const before = answered;
    const auth = await v.request("auth", { login: victim.login, pass: "right" });
    const during = answered - before;
    stop = true;
    await Promise.all(loops);
    expect(auth.status).toBe(0);
    // A FIFO would put ~40 attacker hashes first; round-robin by address, a few.
    expect(during, "attacker checks answered while the victim waited").toBeLessThan(12);
    await closeAll(v, victim.client, target.client, ...attackers);
  });

  it("an address with a full queue of password checks gets 13", async () => {
    const server = await startTestServer({ hashQueuePerAddress: 4, authFailLogin: 1_000_000, authFailAddr: 1_000_000, bcryptCost: 8 });
    const t = await registerUser(server.port, uniqueName("t"), "right");
    const cs: Client[] = [];
    for (let i = 0; i < 30; i++) cs.push(await connectFrom(server.port, "127.0.0.4"));
    cs.forEach((c) => c.send("auth", { login: t.login, pass: "wrong" }));
    const statuses = (await Promise.all(cs.map((c) => c.reply("auth", 20_000)))).map((f) => f.data.status as number);
    expect(statuses.filter((s) => s === 13).length).toBeGreaterThan(0);
    expect(statuses.every((s) => s === 2 || s === 13)).toBe(true);
    // Another address is not affected.
    const other = await connectFrom(server.port, "127.0.0.5");
    expect((await other.request("auth", { login: t.login, pass: "right" })).status).toBe(0);
    await closeAll(other, t.client, ...cs);
    await server.stop();
  });
});

describe("register and successful logins are throttled per address", () => {
  it("past --auth-burst password checks from one address, register and a right password get 13", async () => {
    const server = await startTestServer({ authRate: 1, authBurst: 3, trustedAddresses: "" });
    const addr = "127.0.0.6";
    const cs: Client[] = [];
    for (let i = 0; i < 6; i++) cs.push(await connectFrom(server.port, addr));
    const logins = cs.map(() => uniqueName("thr"));
    cs.forEach((c, i) => c.send("register", { login: logins[i], pass: "p", nick: logins[i] }));
    const statuses = (await Promise.all(cs.map((c) => c.reply("register", 20_000)))).map((f) => f.data.status as number);
    // Three from the burst (a fourth if a second passed meanwhile on a loaded machine).
    const ok = statuses.filter((s) => s === 0).length;
    expect(ok).toBeGreaterThanOrEqual(3);
    expect(ok).toBeLessThanOrEqual(4);
    expect(statuses.filter((s) => s === 13)).toHaveLength(6 - ok);
    const login = logins[statuses.indexOf(0)];
    // The right password from the same address: refused too, while the bucket is empty.
    const more: Client[] = [];
    for (let i = 0; i < 3; i++) more.push(await connectFrom(server.port, addr));
    more.forEach((c) => c.send("auth", { login, pass: "p" }));
    const authStatuses = (await Promise.all(more.map((c) => c.reply("auth", 20_000)))).map((f) => f.data.status as number);
    expect(authStatuses).toContain(13);
    // Another address has its own budget.
    const elsewhere = await connectFrom(server.port, "127.0.0.7");
    expect((await elsewhere.request("auth", { login, pass: "p" })).status).toBe(0);
    await closeAll(elsewhere, ...cs, ...more);
    await server.stop();
  });

  it("--trusted-addresses (loopback by default) take no part in the rate: a local script registers past the burst", async () => {
    const server = await startTestServer({ authRate: 1, authBurst: 3 });
    const local: Client[] = [];
    for (let i = 0; i < 12; i++) local.push(await connectFrom(server.port, "127.0.0.1"));
    local.forEach((c) => c.send("register", { login: uniqueName("tru"), pass: "p", nick: uniqueName("tru") }));
    const statuses = (await Promise.all(local.map((c) => c.reply("register", 20_000)))).map((f) => f.data.status as number);
    expect(statuses).toEqual(local.map(() => 0));
    // Any other address is held to it.
    const other: Client[] = [];
    for (let i = 0; i < 6; i++) other.push(await connectFrom(server.port, "127.0.0.8"));
    other.forEach((c) => c.send("register", { login: uniqueName("unt"), pass: "p", nick: uniqueName("unt") }));
    const others = (await Promise.all(other.map((c) => c.reply("register", 20_000)))).map((f) => f.data.status as number);
    expect(others).toContain(13);
    await closeAll(...local, ...other);
    await server.stop();
  });

  it("200 simultaneous registrations from one address all succeed with the defaults", async () => {
    const server = await startTestServer({ maxPerAddress: 1000 });
    const cs: Client[] = [];
    for (let i = 0; i < 200; i++) cs.push(await connectFrom(server.port, "127.0.0.8"));
    cs.forEach((c) => {
      const l = uniqueName("many");
      c.send("register", { login: l, pass: "p", nick: l });
    });
    const statuses = (await Promise.all(cs.map((c) => c.reply("register", 30_000)))).map((f) => f.data.status as number);
    expect(statuses.filter((s) => s !== 0)).toEqual([]);
    await closeAll(...cs);
    await server.stop();
  }, 60_000);
});
