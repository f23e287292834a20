// Durability: everything survives a restart on the same data dir, and a message that
// was acknowledged survives kill -9.
import { describe, expect, it } from "vitest";
import { startServer } from "../src/server.js";
import { LAYOUT_VERSION } from "../src/storage/layout.js";
import { ChildServer, Client, login, rawDb, registerUser, testConfig, useTempDirs } from "./helpers.js";

const newDataDir = useTempDirs();

/** Two users registered on a server that is then stopped, for tests that write its database as an older layout did. */
async function twoUsersStopped() {
  const dataDir = newDataDir();
  const config = testConfig({ dataDir });
  const server = await startServer(config);
  const a = await registerUser(server.port);
  const b = await registerUser(server.port);
  a.client.close();
  b.client.close();
  await server.stop();
  return { dataDir, config, a, b };
}

/** The stopped server's LevelDB, opened raw (keys as stored, values as text). */
const directConvOf = (a: string, b: string) => (a < b ? `d:${a}:${b}` : `d:${b}:${a}`);
const pad = (n: number) => String(n).padStart(15, "0");

describe("restart", () => {
  it("keeps accounts, sessions, contacts, profiles and queued messages", async () => {
    const dataDir = newDataDir();
    const config = testConfig({ dataDir });
    let server = await startServer(config);
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    expect((await a.client.request("setuserinfo", { user_status: "persisted", email: `p${Date.now()}@x.test` })).status).toBe(0);
    b.client.close();
    await b.client.closed;
    const sent = [];
    for (let i = 0; i < 5; i++) sent.push((await a.client.request("message", { uid: b.uid, body: `kept ${i}` })).mid);
    a.client.close();
    await server.stop();

    server = await startServer({ ...config, port: 0 });
    // the password still works
    const again = await login(server.port, a.login);
    expect(again.auth).toMatchObject({ status: 0, uid: a.uid });
    // a session from before the restart still resumes
    const bc = await Client.connect(server.port);
    expect(await bc.request("auth", { sid: b.sid })).toMatchObject({ status: 0, uid: b.uid });
    const got = [];
    for (let i = 0; i < 5; i++) got.push(await bc.event("ev_message"));
    expect(got.map((e) => e.mid)).toEqual(sent);
    // contacts and profile
    const list = await again.client.request("contactlist");
    expect(list.list.map((x: any) => x.uid)).toEqual([b.uid]);
    expect((await bc.request("userinfo", { user: a.uid })).user_status).toBe("persisted");
    // the login is still taken, and new mids do not collide with old ones
    const c = await Client.connect(server.port);
    expect((await c.request("register", { login: a.login, pass: "x", nick: "fresh" })).status).toBe(1);
    const next = await again.client.request("message", { uid: b.uid, body: "after restart" });
    expect(Number(next.mid)).toBeGreaterThan(Math.max(...sent.map(Number)));
    for (const x of [again.client, bc, c]) x.close();
    await server.stop();
  });
});

describe("crash", () => {
  it("an acknowledged message survives kill -9 and is delivered after restart", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    b.client.close();
    await b.client.closed;
    const n = 200;
    for (let i = 0; i < n; i++) a.client.send("message", { uid: b.uid, body: `durable ${i}` });
    const acked: string[] = [];
    for (let i = 0; i < n; i++) {
      const r = (await a.client.reply("message")).data;
      expect(r.status).toBe(0);
      acked.push(r.mid);
    }
    // the moment the last ack is in, the process dies without any chance to flush
    child.proc.kill("SIGKILL");
    await child.exited;

    child = await ChildServer.start(dataDir);
    const c = await Client.connect(child.port);
    expect((await c.request("auth", { sid: b.sid })).status).toBe(0);
    const got = [];
    for (let i = 0; i < n; i++) got.push((await c.event("ev_message")).mid);
    expect(got).toEqual(acked);
    c.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  });
});

describe("history chunks derived from the log", () => {
  it("a burst past the in-memory tail reads back once and in order, before the chunks are written, after a delete and after kill -9", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    const n = 100; // more than the 64 newest seqs kept per conversation
    for (let i = 0; i < n; i++) a.client.send("message", { uid: b.uid, body: `burst ${i}` });
    const mids: string[] = [];
    for (let i = 0; i < n; i++) mids.push((await a.client.reply("message")).data.mid);
    // Within the second the history chunks wait in memory: memory and disk merged.
    const bodies = (h: any) => h.messages.map((m: any) => m.body);
    const all = Array.from({ length: n }, (_, i) => `burst ${i}`);
    expect(bodies(await a.client.request("history", { uid: b.uid, limit: n }))).toEqual(all);
    expect((await a.client.request("delmessage", { mid: mids[3] })).status).toBe(0);
    const left = all.filter((_, i) => i !== 3);
    expect(bodies(await a.client.request("history", { uid: b.uid, limit: n }))).toEqual(left);
    const older = await a.client.request("history", { uid: b.uid, limit: 10, before: mids[20] });
    expect(bodies(older)).toEqual(left.slice(9, 19));
    // a full page across the deleted one
    const across = ["burst 1", "burst 2", "burst 4", "burst 5", "burst 6"];
    expect(bodies(await a.client.request("history", { uid: b.uid, limit: 5, before: mids[7] }))).toEqual(across);
    child.proc.kill("SIGKILL");
    await child.exited;

    child = await ChildServer.start(dataDir);
    const again = await login(child.port, a.login);
    expect(bodies(await again.client.request("history", { uid: b.uid, limit: n }))).toEqual(left);
    expect(bodies(await again.client.request("history", { uid: b.uid, limit: 5, before: mids[7] }))).toEqual(across);
    again.client.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  });
});

describe("a cmid entry whose message is gone (left by a purge before 4f97fd9)", () => {
  it("names nothing: a message sent with that cmid is stored and delivered", async () => {
    const { dataDir, config, a, b } = await twoUsersStopped();
    const db = await rawDb(dataDir);
    await db.put(`!cmids!${a.uid}!orphan-1`, JSON.stringify(["999999", 1700000000]));
    await db.close();
    const server = await startServer({ ...config, port: 0 });
    const ac = await login(server.port, a.login);
    const bc = await login(server.port, b.login);
    const sent = await ac.client.request("message", { uid: b.uid, body: "not a resend", cmid: "orphan-1" });
    expect(sent.status).toBe(0);
    expect(sent.mid).not.toBe("999999");
    expect((await bc.client.event("ev_message", (d) => d.body === "not a resend")).mid).toBe(sent.mid);
    // and a real resend of it is still one message
    expect((await ac.client.request("message", { uid: b.uid, body: "not a resend", cmid: "orphan-1" })).mid).toBe(sent.mid);
    ac.client.close();
    bc.client.close();
    await server.stop();
  });
});

describe("upgrading a layout-4 database", () => {
  it("adds no second history chunk for logged messages past the watermark, and goes on to the newest layout", async () => {
    const { dataDir, config, a, b } = await twoUsersStopped();

    // What a layout-4 server had on disk right after committing three messages a → b,
    // before their derived entries were written: the records, their history chunks
    // (written with them), and the watermark behind them.
    const db = await rawDb(dataDir);
    const conv = directConvOf(a.uid, b.uid);
    const seq = Number(await db.get("!meta!seq").catch(() => "0")) || 0;
    const rec = (q: number) => JSON.stringify({ mid: String(q), from: a.uid, nick: a.nick, body: `v4 ${q}`, time: 1700000000 + q, to: b.uid });
    const qs = [seq + 1, seq + 2, seq + 3];
    await db.batch([
      ...qs.map((q) => ({ type: "put" as const, key: `!log!${pad(q)}`, value: rec(q) })),
      // two batches: the first message alone, then the other two
      { type: "put", key: `!hist!${conv}!${pad(qs[0])}`, value: JSON.stringify([qs[0]]) },
      { type: "put", key: `!hist!${conv}!${pad(qs[1])}`, value: JSON.stringify([qs[1], qs[2]]) },
      { type: "put", key: "!meta!seq", value: String(qs[2]) },
      { type: "put", key: "!meta!indexed", value: String(seq) },
      { type: "put", key: "!meta!layout", value: "4" },
    ]);
    await db.close();

    let server = await startServer({ ...config, port: 0 });
    const bc = await Client.connect(server.port);
    expect((await bc.request("auth", { sid: b.sid })).status).toBe(0);
    // replayed into b's inbox, each once
    for (const q of qs) expect(await bc.event("ev_message")).toMatchObject({ mid: String(q), body: `v4 ${q}` });
    expect((await bc.request("message", { uid: a.uid, body: "after the upgrade" })).status).toBe(0);
    const history = await bc.request("history", { uid: a.uid });
    expect(history.messages.map((m: any) => m.body)).toEqual(["v4 " + qs[0], "v4 " + qs[1], "v4 " + qs[2], "after the upgrade"]);
    bc.close();
    await server.stop();

    const check = await rawDb(dataDir);
    expect(await check.get("!meta!layout")).toBe(String(LAYOUT_VERSION));
    await check.close();
    // and once more from disk alone, after a restart
    server = await startServer({ ...config, port: 0 });
    const again = await login(server.port, b.login);
    const after = await again.client.request("history", { uid: a.uid });
    expect(after.messages.map((m: any) => m.body)).toEqual(["v4 " + qs[0], "v4 " + qs[1], "v4 " + qs[2], "after the upgrade"]);
    again.client.close();
    await server.stop();
  });
});

describe("upgrading a layout-1 database", () => {
  it("delivers what was queued, finds old messages by mid and keeps their cmids", async () => {
    const { dataDir, config, a, b } = await twoUsersStopped();

    // Write what the previous server wrote for two messages a → b, the second still
    // queued for b: records (with conv and cmid), the mid index, the queue, the cmid
    // index; and no layout version.
    const db = await rawDb(dataDir);
    const conv = directConvOf(a.uid, b.uid);
    const rec = (mid: number, body: string, cmid?: string) =>
      JSON.stringify({ mid: String(mid), conv, from: a.uid, nick: a.nick, body, time: 1700000000 + mid, to: b.uid, ...(cmid ? { cmid } : {}) });
    await db.batch([
      { type: "put", key: `!msgs!${conv}!${pad(1)}`, value: rec(1, "delivered long ago") },
      { type: "put", key: `!msgs!${conv}!${pad(2)}`, value: rec(2, "still queued", "old-c") },
      { type: "put", key: `!mids!${pad(1)}`, value: JSON.stringify(conv) },
      { type: "put", key: `!mids!${pad(2)}`, value: JSON.stringify(conv) },
      { type: "put", key: `!queue!${b.uid}!${pad(2)}`, value: JSON.stringify(conv) },
      { type: "put", key: `!cmids!${a.uid}!old-c`, value: JSON.stringify("2") },
      { type: "put", key: `!meta!seq`, value: "2" },
      { type: "del", key: `!meta!layout` },
    ]);
    await db.close();

    let server = await startServer({ ...config, port: 0 });
    const bc = await Client.connect(server.port);
    expect((await bc.request("auth", { sid: b.sid })).status).toBe(0);
    expect(await bc.event("ev_message")).toMatchObject({ mid: "2", body: "still queued", from: a.uid });
    expect(await bc.quiet(300, (f) => f.action === "ev_message")).toBe(true);
    const ac = await Client.connect(server.port);
    expect((await ac.request("auth", { sid: a.sid })).status).toBe(0);
    expect(await ac.request("editmessage", { mid: "1", body: "edited after the upgrade" })).toMatchObject({ status: 0, mid: "1" });
    expect(await ac.request("message", { uid: b.uid, body: "still queued", cmid: "old-c" })).toMatchObject({ status: 0, mid: "2" });
    const fresh = await ac.request("message", { uid: b.uid, body: "new" });
    expect(Number(fresh.mid)).toBeGreaterThan(2);
    const history = await ac.request("history", { uid: b.uid });
    expect(history.messages.map((m: any) => m.body)).toEqual(["edited after the upgrade", "still queued", "new"]);
    ac.close();
    bc.close();
    await server.stop();
  });
});

describe("runs of messages in every direction", () => {
  // A sender's messages come in runs that commit together; the server derives each
  // conversation's history, each recipient's inbox and each user's dialogs a run at a
  // time (storage/messages.ts, MessageStore.deriveRun). Runs of two senders are
  // interleaved here, to each other, to a third user who is away and to themselves.
  it("are read back the same from history, dialogs and the inbox, before and after a restart", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    const c = await registerUser(child.port);
    c.client.close();
    const users = { a, b, c };
    // [sender, recipient, run length]: every pair, both ways, and oneself.
    const runs: ["a" | "b", "a" | "b" | "c", number][] = [
      ["a", "b", 3], ["b", "a", 2], ["a", "b", 1], ["a", "c", 4], ["b", "c", 2], ["a", "a", 2],
      ["b", "b", 3], ["a", "c", 1], ["b", "a", 5], ["a", "b", 2], ["b", "c", 3], ["a", "a", 1],
    ];
    const sent: { from: string; to: string; body: string }[] = [];
    runs.forEach(([s, r, n], k) => {
      for (let i = 0; i < n; i++) {
        const body = `run ${k} #${i}`;
        users[s].client.send("message", { uid: users[r].uid, body });
        sent.push({ from: s, to: r, body });
      }
    });
    const mids = new Map<string, number>();
    for (const s of ["a", "b"] as const) {
      for (const m of sent.filter((x) => x.from === s)) {
        const r = (await users[s].client.reply("message")).data;
        expect(r.status).toBe(0);
        mids.set(m.body, Number(r.mid));
      }
    }
    const byMid = (list: typeof sent) => [...list].sort((x, y) => (mids.get(x.body) as number) - (mids.get(y.body) as number)).map((m) => m.body);
    const between = (x: string, y: string) => byMid(sent.filter((m) => (m.from === x && m.to === y) || (m.from === y && m.to === x)));
    const pairs: ["a" | "b", "a" | "b" | "c"][] = [["a", "b"], ["a", "c"], ["a", "a"], ["b", "c"], ["b", "b"]];
    const lastOf = (x: string) => {
      // dialogs: one per peer, newest conversation first
      const peers = ["a", "b", "c"].filter((y) => between(x, y).length > 0);
      return peers
        .map((y) => ({ peer: y, last: mids.get(between(x, y).at(-1) as string) as number }))
        .sort((p, q) => q.last - p.last)
        .map((p) => [users[p.peer as "a" | "b" | "c"].uid, String(p.last)]);
    };
    const check = async (clients: { a: Client; b: Client }) => {
      for (const [x, y] of pairs) {
        const h = await clients[x].request("history", { uid: users[y].uid, limit: 100 });
        expect(h.messages.map((m: { body: string }) => m.body), `${x} with ${y}`).toEqual(between(x, y));
      }
      for (const x of ["a", "b"] as const) {
        const d = (await clients[x].request("dialogs")).dialogs;
        expect(d.map((e: { uid: string; last: { mid: string } }) => [e.uid, e.last.mid]), `dialogs of ${x}`).toEqual(lastOf(x));
      }
    };
    await check({ a: a.client, b: b.client });

    // A graceful stop writes what was derived in memory; the restart reads it from disk.
    a.client.close();
    b.client.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
    child = await ChildServer.start(dataDir);
    const a2 = await login(child.port, a.login);
    const b2 = await login(child.port, b.login);
    await check({ a: a2.client, b: b2.client });
    // c was away: every message to c arrives once, in order, on login
    const c2 = await login(child.port, c.login);
    const toC = byMid(sent.filter((m) => m.to === "c"));
    const got: string[] = [];
    for (let i = 0; i < toC.length; i++) got.push((await c2.client.reply("ev_message")).data.body);
    expect(got).toEqual(toC);
    for (const x of [a2, b2, c2]) x.client.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  });
});
