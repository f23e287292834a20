// Delivery of direct messages across disconnects and re-authentication: at least once
// across reconnects, exactly once on a connection, opt-in acknowledgements (`hello
// {ack:true}`, cumulative `ack {mid}`), resumable sync (`auth {since}`), and `cmid`
// under a race between two connections of one sender.

import { describe, expect, it } from "vitest";
import type { BatchOp } from "../src/storage/db.js";
import { Client, login, registerUser, removeDir, serveForFile, startTestServer, type Account } from "./helpers.js";
import { byMid, duplicates, evMids, heldGate, helloAck, holdNextWrite, orClosed, recordSyncs, settle, sleep, waitFor, waitForMids, wrapCalls } from "./pipeline-helpers.js";

const shared = serveForFile();

/** A fresh user whose registration connection is closed (so it starts offline). */
async function offlineUser(): Promise<Account> {
  const u = await registerUser(shared.port);
  u.client.close();
  await u.client.closed;
  return u;
}

/** A new connection of `u`, optionally acking (hello {ack:true} first), authenticated by sid. */
async function connect(u: Account, opts: { ack?: boolean; since?: string } = {}): Promise<Client> {
  const c = await Client.connect(shared.port);
  if (opts.ack) {
    const hello = await c.request("hello", { ack: true });
    expect(hello.status).toBe(0);
    expect(hello.ack, "hello {ack:true} is answered with ack: true").toBe(true);
  }
  const auth = await c.request("auth", opts.since === undefined ? { sid: u.sid } : { sid: u.sid, since: opts.since });
  expect(auth.status).toBe(0);
  return c;
}

/** Sends `n` messages from `from` to `to` without waiting, then collects the replies (all must be 0). */
async function sendBurst(from: Client, to: string, n: number, tag: string): Promise<string[]> {
  for (let i = 0; i < n; i++) from.send("message", { uid: to, body: `${tag} ${i}` });
  const mids: string[] = [];
  for (let i = 0; i < n; i++) {
    const r = (await orClosed(from, from.reply("message", 15_000), `message reply ${i}`)).data;
    expect(r.status, `message ${i}: ${JSON.stringify(r)}`).toBe(0);
    mids.push(r.mid);
  }
  return mids;
}

describe("a stopped reader that is reset gets everything after its next auth", () => {
  for (const ack of [false, true]) {
    it(`${ack ? "acking" : "non-acking"} B: 200 messages, none read, reset; the next auth delivers all 200 once, oldest first`, async () => {
      const a = await registerUser(shared.port);
      const b = await offlineUser();
      const stopped = await connect(b, { ack });
      stopped.socket.pause();
      const mids = await sendBurst(a.client, b.uid, 200, "stopped");
      stopped.socket.resetAndDestroy();
      await stopped.closed;

      const again = await connect(b, { ack });
      await waitForMids(again, mids, 15_000, "B after the reset");
      await settle(again);
      const got = evMids(again);
      expect(duplicates(got)).toEqual([]);
      expect(got).toEqual(mids); // exactly these, in mid order
      again.close();
      a.client.close();
    });
  }
});

describe("a non-acking connection confirms nothing a test could send", () => {
  it("B reads 5 messages and closes cleanly; its next login gets all 5 again", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const c1 = await connect(b);
    const mids = await sendBurst(a.client, b.uid, 5, "read");
    await waitForMids(c1, mids, 5000, "B");
    await settle(c1);
    c1.socket.end(); // its own, orderly close
    await c1.closed;
    const c2 = await connect(b);
    await waitForMids(c2, mids, 5000, "B after a clean close");
    await settle(c2);
    expect(evMids(c2)).toEqual(mids);
    c2.close();
    a.client.close();
  });
});

describe("acknowledgements (opt-in)", () => {
  it("`ack` needs auth (6) and an acking connection (3); a good ack echoes its mid", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const pre = await Client.connect(shared.port);
    expect((await pre.request("ack", { mid: "1" })).status).toBe(6);
    expect((await helloAck(pre)).ack).toBe(true);
    expect((await pre.request("ack", { mid: "1" })).status).toBe(6); // opted in, still not authenticated
    pre.close();

    const plain = await connect(b);
    const r = await a.client.request("message", { uid: b.uid, body: "one" });
    await waitForMids(plain, [r.mid], 5000);
    expect((await plain.request("ack", { mid: r.mid })).status).toBe(3);

    const acking = await connect(b, { ack: true });
    await waitForMids(acking, [r.mid], 5000);
    expect(await acking.request("ack", { mid: r.mid })).toEqual({ status: 0, error: "OK", mid: r.mid });
    // A required string: missing or empty is 4; not digits, 3.
    expect(await acking.request("ack", {})).toEqual({ status: 4, error: "'mid' is required" });
    expect(await acking.request("ack", { mid: "" })).toEqual({ status: 4, error: "'mid' must not be empty" });
    expect((await acking.request("ack", { mid: "x1" })).status).toBe(3);
    for (const c of [plain, acking, a.client]) c.close();
  });

  it("B acks the 6th of 10 and disconnects; 2 more arrive; B's next acking login gets exactly 7-12, in order, once each", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const c1 = await connect(b, { ack: true });
    const mids: string[] = [];
    for (let i = 1; i <= 10; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `m${i}` })).mid);
    await waitForMids(c1, mids, 5000, "B");
    expect(evMids(c1)).toEqual(mids);
    expect(await c1.request("ack", { mid: mids[5] })).toEqual({ status: 0, error: "OK", mid: mids[5] });
    // a clean close: on an acking connection only acks confirm, so 7-10 stay unconfirmed
    c1.socket.end();
    await c1.closed;
    for (let i = 11; i <= 12; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `m${i}` })).mid);

    const c2 = await connect(b, { ack: true });
    await waitForMids(c2, mids.slice(6), 5000, "B after reconnecting");
    await settle(c2);
    expect(evMids(c2)).toEqual(mids.slice(6));
    c2.close();

    // `since`: a fresh connection asking for everything after message 3 gets 4-12
    const c3 = await connect(b, { since: mids[2] });
    await waitForMids(c3, mids.slice(3), 5000, "B with since = mid 3");
    await settle(c3);
    expect(evMids(c3)).toEqual(mids.slice(3));
    c3.close();

    // `since` with a password login, on an acking connection: after message 10, gets 11-12
    const c4 = await Client.connect(shared.port);
    expect((await helloAck(c4)).ack).toBe(true);
    expect((await c4.request("auth", { login: b.login, pass: "secret", since: mids[9] })).status).toBe(0);
    await waitForMids(c4, mids.slice(10), 5000, "B with since = mid 10");
    await settle(c4);
    expect(evMids(c4)).toEqual(mids.slice(10));
    c4.close();
    a.client.close();
  });
});

describe("no duplicates on a connection while it stays connected", () => {
  // B's second connection logs in while a backlog of ~14 MB is waiting for B, and stops
  // reading right after sending auth: its post-auth sync cannot finish (the backlog is
  // far more than the socket buffers of a connection that never read can hold), so the
  // rest of A's burst reaches B while that sync is still sending. Traffic stays below
  // what would make a non-acking connection confirm anything.
  const BACKLOG = 28;
  const BIG = 500_000;
  const N = 300;

  for (const ack of [false, true]) {
    it(`${ack ? "acking" : "non-acking"} B: ${N} messages in a burst while B re-authenticates on a second connection, during its sync`, async () => {
      const a = await registerUser(shared.port);
      const b = await offlineUser();
      const backlog: string[] = [];
      for (let i = 0; i < BACKLOG; i++) {
        const r = await a.client.request("message", { uid: b.uid, body: `backlog ${i} `.padEnd(BIG, "b") });
        expect(r.status).toBe(0);
        backlog.push(r.mid);
      }
      const c1 = await connect(b, { ack });
      await waitForMids(c1, backlog, 30_000, "B's first connection (backlog)");
      let acked: string | undefined;
      if (ack) {
        acked = backlog[3];
        expect(await c1.request("ack", { mid: acked })).toEqual({ status: 0, error: "OK", mid: acked });
      }

      const burst = await sendBurst(a.client, b.uid, 100, "burst");
      // in the middle of the burst: B logs in again, and does not read for now
      const c2 = await Client.connect(shared.port);
      if (ack) c2.send("hello", { ack: true });
      c2.send("auth", { sid: b.sid });
      c2.socket.pause();
      await new Promise((r) => setTimeout(r, 300)); // (only so that the sync has surely begun)
      burst.push(...(await sendBurst(a.client, b.uid, N - 100, "burst")));
      c2.socket.resume();
      if (ack) expect((await c2.reply("hello")).data.ack).toBe(true);
      expect((await c2.reply("auth", 15_000)).data.status).toBe(0);

      const all = [...backlog, ...burst];
      // c1 was connected throughout: every message, once, in order.
      await waitForMids(c1, all, 30_000, "B's first connection");
      // c2 gets everything not confirmed when it logged in: for a non-acking B that is
      // all of it; for an acking B, everything after the acked mid.
      const want2 = acked === undefined ? all : all.filter((m) => byMid(m, acked as string) > 0);
      await waitForMids(c2, want2, 30_000, "B's second connection");
      await settle(c1);
      await settle(c2);
      const got1 = evMids(c1);
      const got2 = evMids(c2);
      expect(duplicates(got1)).toEqual([]);
      expect(duplicates(got2)).toEqual([]);
      expect(got1).toEqual(all);
      expect([...got2].sort(byMid)).toEqual(want2);
      expect(new Set([...got1, ...got2]).size).toBe(all.length);
      for (const c of [c1, c2, a.client]) c.close();
    }, 60_000);
  }
});

/**
 * `rounds` times, one cmid sent from two connections of A (both frames on the wire
 * before either reply is awaited): both replies carry one mid, and each connection of
 * B and A gets each message once.
 */
async function raceCmids(rounds: number, tag: string): Promise<void> {
  const a = await registerUser(shared.port);
  const a2 = await login(shared.port, a.login);
  const b = await registerUser(shared.port);
  const b2 = await login(shared.port, b.login);
  const mids: string[] = [];
  for (let k = 0; k < rounds; k++) {
    const data = { uid: b.uid, body: `race ${k}`, cmid: `${tag}-${k}` };
    a.client.send("message", data);
    a2.client.send("message", data);
    const [r1, r2] = await Promise.all([a.client.reply("message"), a2.client.reply("message")]);
    expect(r1.data.status).toBe(0);
    expect(r2.data.status).toBe(0);
    expect(r2.data.mid, `round ${k}`).toBe(r1.data.mid);
    mids.push(r1.data.mid);
  }
  expect(new Set(mids).size).toBe(rounds);
  for (const c of [b.client, b2.client, a.client, a2.client]) {
    await waitForMids(c, mids, 5000);
    await settle(c);
    const got = evMids(c);
    expect(duplicates(got)).toEqual([]);
    expect(got.length).toBe(rounds);
  }
  for (const c of [a.client, a2.client, b.client, b2.client]) c.close();
}

describe("cmid raced from two connections of one sender", () => {
  it("both replies carry the same mid, and each connection of the recipient gets it once", async () => {
    await raceCmids(20, "same");
  });

  it("stays one message when one connection's read of the cmid index outlasts the other's whole commit", async () => {
    // A loaded disk, simulated: every second read of the cmid index answers what the
    // index held when it was asked, but 150 ms later. The first request's read is
    // quick; it stores and commits while the second's read is still out, and that read
    // answers "unknown" (the entry is written to the index lazily, after the commit).
    const space = shared.server.services.storage.spaces.cmids;
    const get = space.get.bind(space);
    let reads = 0;
    space.get = (async (...args: Parameters<typeof get>) => {
      const v = await get(...args);
      if (reads++ % 2 === 1) await new Promise((r) => setTimeout(r, 150));
      return v;
    }) as typeof space.get;
    try {
      await raceCmids(10, "slow");
      expect(reads, "the cmid index was read (no cmid was answered from memory alone)").toBeGreaterThanOrEqual(20);
    } finally {
      delete (space as any).get;
    }
  });
});

describe("cmid of a deleted message", () => {
  it("is free again when the message was deleted while its index entry waited to be written", async () => {
    // The cmid index entry is written with the next derived generation, after the
    // dialog pointers are read; those reads are made slow here (a loaded disk), and the
    // message is deleted meanwhile. The generation must not put the entry back.
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const sv = shared.server.services;
    const space = sv.storage.spaces.dialogat;
    const getMany = space.getMany.bind(space);
    space.getMany = (async (...args: Parameters<typeof getMany>) => {
      const v = await getMany(...args);
      await new Promise((r) => setTimeout(r, 400));
      return v;
    }) as typeof space.getMany;
    let first: any;
    try {
      first = await a.client.request("message", { uid: b.uid, body: "first", cmid: "gone" });
      expect(first.status).toBe(0);
      const store = sv.messages as unknown as { writing?: unknown };
      for (let i = 0; i < 100 && store.writing === undefined; i++) await new Promise((r) => setTimeout(r, 10));
      expect(store.writing, "the derived generation is being written").toBeDefined();
      expect((await a.client.request("delmessage", { mid: first.mid })).status).toBe(0);
    } finally {
      delete (space as any).getMany;
    }
    await new Promise((r) => setTimeout(r, 600));
    await sv.storage.settle();
    const again = await a.client.request("message", { uid: b.uid, body: "second", cmid: "gone" });
    expect(again.status).toBe(0);
    expect(again.mid, "a new message, not the deleted one's mid").not.toBe(first.mid);
    const h = await a.client.request("history", { uid: b.uid });
    expect(h.messages.map((m: any) => m.body)).toEqual(["second"]);
    a.client.close();
    b.client.close();
  });
});

describe("re-authentication and cursors (review findings)", () => {
  it("two auths back to back on one connection: every inbox message once, in order", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    for (let i = 0; i < 700; i++) a.client.send("message", { uid: b.uid, body: `m${i}` });
    const mids: string[] = [];
    for (let i = 0; i < 700; i++) mids.push((await a.client.reply("message", 20_000)).data.mid);
    const c = await Client.connect(shared.port);
    c.send("auth", { sid: b.sid });
    c.send("auth", { sid: b.sid });
    await c.reply("auth");
    await c.reply("auth");
    const got: string[] = [];
    for (let i = 0; i < 700; i++) got.push((await c.event("ev_message", () => true, 20_000)).mid);
    expect(await c.quiet(500, (f) => f.action === "ev_message")).toBe(true);
    // whichever sync sent them, every message arrives once, in mid order
    expect(got).toEqual(mids);
    a.client.close();
    c.close();
  }, 60_000);

  it("an edit or a delete committed while the sync reads the record is not followed by the record as it was", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const kept = (await a.client.request("message", { uid: b.uid, body: "before" })).mid;
    const gone = (await a.client.request("message", { uid: b.uid, body: "to delete" })).mid;
    // The sync's first read of records returns what it read, but only once the edit and
    // the delete are answered (and their events sent live).
    const store = shared.server.services.messages as { recordsAt: (seqs: readonly number[]) => Promise<unknown[]> };
    const read = store.recordsAt.bind(store);
    const gate = heldGate();
    let armed = true;
    store.recordsAt = async (seqs) => {
      const found = await read(seqs);
      if (armed) {
        armed = false;
        await gate.pass();
      }
      return found;
    };
    const c = await Client.connect(shared.port);
    try {
      c.send("auth", { sid: b.sid });
      await gate.reached;
      expect((await a.client.request("editmessage", { mid: kept, body: "after" })).status).toBe(0);
      expect((await a.client.request("delmessage", { mid: gone })).status).toBe(0);
      await c.event("ev_edit", (d) => d.mid === kept);
      await c.event("ev_delmessage", (d) => d.mid === gone);
    } finally {
      delete (store as { recordsAt?: unknown }).recordsAt;
      gate.open();
    }
    expect((await c.event("ev_message", (d) => d.mid === kept)).body).toBe("after");
    expect(await c.quiet(300, (f) => f.action === "ev_message" && f.data.mid === gone)).toBe(true);
    a.client.close();
    c.close();
  });

  it("a logout and a login of the same user on one connection sends nothing it was already sent; another user's starts afresh", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const mids: string[] = [];
    for (let i = 0; i < 3; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `l${i}` })).mid);
    for (const mid of mids) expect((await b.client.event("ev_message", (d) => d.mid === mid)).mid).toBe(mid);
    expect((await b.client.request("logout")).status).toBe(0);
    expect((await b.client.request("auth", { login: b.login, pass: "secret" })).status).toBe(0);
    expect(await b.client.quiet(500, (f) => f.action === "ev_message")).toBe(true);
    // Another user on it gets its own inbox, from the start.
    const c = await offlineUser();
    const cm = (await a.client.request("message", { uid: c.uid, body: "for c" })).mid;
    expect((await b.client.request("logout")).status).toBe(0);
    expect((await b.client.request("auth", { login: c.login, pass: "secret" })).status).toBe(0);
    expect((await b.client.event("ev_message")).mid).toBe(cm);
    a.client.close();
    b.client.close();
  });

  it("a `since` past every stored mid (kept across a restore) loses nothing sent after it", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const newest = Number((await a.client.request("message", { uid: b.uid, body: "before" })).mid);
    const c = await connect(b, { ack: true, since: String(newest + 1_000_000) });
    // Everything up to the newest is taken as had; what comes next arrives, in order.
    const mids: string[] = [];
    for (let i = 0; i < 3; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `after ${i}` })).mid);
    await waitForMidsOf(c, mids);
    expect(await c.quiet(200, (f) => f.action === "ev_message" && f.data.body === "before")).toBe(true);
    for (const x of [a.client, c]) x.close();
  });

  it("a second auth with an older `since` on one connection sends nothing it was already sent", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const mids: string[] = [];
    for (let i = 0; i < 5; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `s${i}` })).mid);
    const c = await connect(b, { ack: true, since: "0" });
    await waitForMidsOf(c, mids);
    expect((await c.request("auth", { sid: b.sid, since: mids[1] })).status).toBe(0);
    expect(await c.quiet(500, (f) => f.action === "ev_message")).toBe(true);
    // New ones still come.
    const next = (await a.client.request("message", { uid: b.uid, body: "s5" })).mid;
    expect((await c.event("ev_message", (d) => d.body === "s5")).mid).toBe(next);
    for (const x of [a.client, c]) x.close();
  });

  it("a second auth asking from further back than an earlier `since` gets what the connection was never sent", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const mids: string[] = [];
    for (let i = 0; i < 4; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `r${i}` })).mid);
    const c = await connect(b, { ack: true, since: mids[3] });
    expect(await c.quiet(300, (f) => f.action === "ev_message")).toBe(true);
    expect((await c.request("auth", { sid: b.sid, since: mids[1] })).status).toBe(0);
    await waitForMidsOf(c, mids.slice(2));
    for (const x of [a.client, c]) x.close();
  });

  it("a smaller ack from a second device never moves the cursor back", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const mids: string[] = [];
    for (let i = 0; i < 10; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `c${i}` })).mid);
    const d1 = await connect(b, { ack: true });
    await waitForMidsOf(d1, mids);
    expect((await d1.request("ack", { mid: mids[9] })).status).toBe(0);
    await new Promise((r) => setTimeout(r, 1500)); // the advance is written
    const d2 = await connect(b, { ack: true, since: "0" });
    await waitForMidsOf(d2, mids);
    expect((await d2.request("ack", { mid: mids[4] })).status).toBe(0);
    await new Promise((r) => setTimeout(r, 1500));
    const d3 = await connect(b, { ack: true });
    expect(await d3.quiet(500, (f) => f.action === "ev_message")).toBe(true);
    for (const c of [a.client, d1, d2, d3]) c.close();
  }, 30_000);

  it("an ack confirms only what the connection was sent: a since past every message moves no cursor", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const mids: string[] = [];
    for (let i = 0; i < 3; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `s${i}` })).mid);
    const far = "999999999999999";
    const d1 = await connect(b, { ack: true, since: far });
    expect(await d1.quiet(300, (f) => f.action === "ev_message")).toBe(true);
    expect((await d1.request("ack", { mid: far })).status).toBe(0);
    await new Promise((r) => setTimeout(r, 1500)); // an advance would be written by now
    // A device that says nothing of what it has still gets all three.
    const d2 = await connect(b);
    await waitForMidsOf(d2, mids);
    for (const c of [a.client, d1, d2]) c.close();
  });

  it("an inbox of many chunks syncs every message once, in order, from the start and from a since inside a chunk", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const mids: string[] = [];
    // Twelve chunks of 30 (each flushDerived writes what came since as one chunk per user).
    for (let round = 0; round < 12; round++) {
      const replies = await Promise.all(Array.from({ length: 30 }, (_, i) => a.client.request("message", { uid: b.uid, body: `r${round} ${i}` })));
      mids.push(...replies.map((r) => r.mid as string));
      await shared.server.services.messages.flushDerived();
    }
    mids.sort(byMid);
    const all = await connect(b);
    await waitForMids(all, mids, 20_000, "b from the start");
    expect(evMids(all)).toEqual(mids);
    const from = 95; // inside the fourth chunk
    const later = await connect(b, { since: mids[from] });
    await waitForMids(later, mids.slice(from + 1), 20_000, "b after a since");
    expect(evMids(later)).toEqual(mids.slice(from + 1));
    for (const c of [a.client, all, later]) c.close();
  }, 60_000);

  it("a message edited while the sync waits on a reader that does not read arrives with its new text", async () => {
    const a = await registerUser(shared.port);
    const b = await offlineUser();
    const big = "x".repeat(900_000);
    for (let i = 0; i < 20; i++) expect((await a.client.request("message", { uid: b.uid, body: big })).status).toBe(0);
    const m = await a.client.request("message", { uid: b.uid, body: "meet at 5" });
    const c = await Client.connect(shared.port);
    c.write(JSON.stringify({ action: "auth", data: { sid: b.sid } }) + "\n");
    c.socket.pause();
    // The sync has sent what the socket takes and waits for it to drain.
    const sessions = shared.server.listener.connections;
    await waitFor(() => [...sessions.values()].some((s) => s.uid === b.uid && s.syncing && s.peer.congested), 10_000, "the sync to wait");
    expect((await a.client.request("editmessage", { mid: m.mid, body: "meet at 6" })).status).toBe(0);
    c.socket.resume();
    expect((await c.event("ev_message", (d) => d.mid === m.mid, 30_000)).body).toBe("meet at 6");
    for (const x of [a.client, c]) x.close();
  }, 60_000);

  it("auth, logout and another auth while the replies wait behind a channel's events: the last user's inbox comes once", async () => {
    const sv = shared.server.services;
    const u = await registerUser(shared.port);
    const v = await offlineUser();
    const a = await registerUser(shared.port);
    const mids: string[] = [];
    for (let i = 0; i < 3; i++) mids.push((await a.client.request("message", { uid: v.uid, body: `for v ${i}` })).mid);
    const chid = (await u.client.request("createchannel", { name: `slow-${u.uid}` })).chid as string;
    // The channel's members read slowly: its message's event holds the replies behind it
    // (and their follow-ups: the sync after an auth), while the requests behind it run.
    const { channels } = sv;
    (channels as { cachedMembers: unknown }).cachedMembers = () => undefined;
    const undo = wrapCalls(channels, "members", () => sleep(300));
    try {
      const frames = [
        { action: "message", data: { channel: chid, body: "slow" } },
        { action: "auth", data: { sid: u.sid } },
        { action: "logout", data: {} },
        { action: "auth", data: { sid: v.sid } },
      ];
      u.client.write(frames.map((f) => JSON.stringify(f) + "\n").join(""));
      const got: string[] = [];
      for (let i = 0; i < mids.length; i++) got.push((await u.client.event("ev_message", (d) => d.from === a.uid)).mid);
      expect(got).toEqual(mids);
      // Each once (two syncs of the inbox ran at once: each sent it).
      expect(await u.client.quiet(800, (f) => f.action === "ev_message" && f.data.from === a.uid)).toBe(true);
    } finally {
      undo();
      delete (channels as { cachedMembers?: unknown }).cachedMembers;
    }
    u.client.close();
    a.client.close();
  }, 30_000);

  it("hello {ack: true} after auth: what the connection was sent before is not confirmed by the traffic after it", async () => {
    const { server } = shared;
    const a = await registerUser(shared.port);
    const alice = await offlineUser();
    const early = (await a.client.request("message", { uid: alice.uid, body: "sent before the opt-in" })).mid;
    const c = await smallSlackConnection();
    expect((await c.request("auth", { sid: alice.sid })).status).toBe(0);
    expect((await c.event("ev_message")).mid).toBe(early);
    expect((await c.request("hello", { ack: true })).ack).toBe(true);
    // 5 KB more to the connection, past the slack of the first message's frame.
    for (let i = 0; i < 5; i++) await a.client.request("message", { uid: alice.uid, body: `${i} ${"x".repeat(1000)}` });
    for (let i = 0; i < 5; i++) await c.event("ev_message");
    await new Promise((r) => setTimeout(r, 300));
    // Not acknowledged, so not confirmed: it comes again at the next auth.
    expect(await server.services.messages.cursor(alice.uid)).toBeLessThan(Number(early));
    c.close();
    a.client.close();
  }, 30_000);

  it("confirmations due on a connection do not count for the next user logged in on it", async () => {
    const { server } = shared;
    const a = await registerUser(shared.port);
    const alice = await offlineUser();
    const bob = await offlineUser();
    const big = "b".repeat(1000);
    const sent: string[] = [];
    for (let i = 0; i < 5; i++) sent.push((await a.client.request("message", { uid: bob.uid, body: `${i} ${big}` })).mid);
    const forAlice = (await a.client.request("message", { uid: alice.uid, body: "for alice" })).mid;
    const c = await smallSlackConnection();
    expect((await c.request("auth", { sid: alice.sid })).status).toBe(0);
    expect((await c.event("ev_message")).mid).toBe(forAlice);
    // Bob logs in on the same connection (after Alice logs out: another user's auth on
    // an authenticated connection is refused); his inbox (5 KB) takes Alice's mark past due.
    expect((await c.request("logout")).status).toBe(0);
    expect((await c.request("auth", { sid: bob.sid })).status).toBe(0);
    for (let i = 0; i < 5; i++) await c.event("ev_message");
    await new Promise((r) => setTimeout(r, 300));
    const cursor = await server.services.messages.cursor(bob.uid);
    expect(cursor, "Bob's cursor took Alice's seq").toBeLessThan(Number(forAlice));
    expect(cursor).toBeLessThanOrEqual(Number(sent[4]));
    c.close();
    a.client.close();
  }, 30_000);
});

/**
 * A connection with a small slack: a frame counts as read once 2,000 more characters
 * have been handed to the OS after it.
 */
async function smallSlackConnection(): Promise<Client> {
  const listener = shared.server.listener as unknown as { slack: number };
  const slack = listener.slack;
  listener.slack = 2000;
  try {
    return await Client.connect(shared.port);
  } finally {
    listener.slack = slack;
  }
}

/** Waits until every one of `mids` has arrived on `c` as ev_message. */
async function waitForMidsOf(c: Client, mids: string[]): Promise<void> {
  const seen = new Set<string>();
  while (!mids.every((m) => seen.has(m))) seen.add((await c.event("ev_message")).mid);
}

describe("a resent cmid in flight ahead of a later message of its connection", () => {
  it("does not hold that message's event behind a later seq of the same batch: the recipient gets every one, in order", async () => {
    const sv = shared.server.services;
    const [bob, dave, carol, x, y] = await Promise.all([1, 2, 3, 4, 5].map(() => registerUser(shared.port)));
    // A write held in flight: what comes meanwhile gathers in the next batch.
    const { gate, restore } = holdNextWrite(sv.storage);
    try {
      x.client.send("message", { uid: y.uid, body: "held" });
      await gate.reached;
      const frame = { uid: carol.uid, body: "a", cmid: "k" };
      bob.client.send("message", frame);
      bob.client.send("message", frame); // the resend, while the first is in flight
      bob.client.send("message", { uid: carol.uid, body: "b" });
      // Each stored message waits in the next batch (its commit waiter); the resend does not.
      const waiting = () => (sv.storage as unknown as { open: { waiters: unknown[] } }).open.waiters.length;
      await waitFor(() => waiting() >= 2, 5000, "bob's two messages in the next batch");
      dave.client.send("message", { uid: carol.uid, body: "c" });
      await waitFor(() => waiting() >= 3, 5000, "dave's message in it too");
      await sleep(100); // the resend's read of the cmid (it found the first in flight) is done
      gate.open();
      for (const body of ["a", "b", "c"]) expect((await carol.client.event("ev_message", (d) => d.body === body)).body).toBe(body);
      const replies = [0, 1, 2].map(() => bob.client.reply("message"));
      const [r1, r2, r3] = await Promise.all(replies);
      expect(r2.data.mid).toBe(r1.data.mid);
      expect(Number(r3.data.mid)).toBeGreaterThan(Number(r1.data.mid));
    } finally {
      restore();
    }
    for (const u of [bob, dave, carol, x, y]) u.client.close();
  });
});

describe("pipelined messages waiting for their commit", () => {
  it("are bounded per connection (4 MiB of frames): past it the connection is not read until some are stored, and every one is answered", async () => {
    // Its own server, whose outbound cap takes the sender's echoes of 36 MB at any pace.
    const server = await startTestServer({ outboundCap: 256 * 1024 * 1024 });
    try {
      const sv = server.services;
      const [a, b, x, y] = await Promise.all([1, 2, 3, 4].map(() => registerUser(server.port)));
      b.client.close();
      const { gate, restore } = holdNextWrite(sv.storage);
      const conn = [...server.listener.connections.keys()].find((c) => c.socket.remotePort === a.client.socket.localPort);
      const line = () => (conn?.session as unknown as { line: { deferred: number; deferredBytes: number } }).line;
      try {
        x.client.send("message", { uid: y.uid, body: "held" });
        await gate.reached;
        const body = "z".repeat(900_000);
        for (let i = 0; i < 40; i++) a.client.send("message", { uid: b.uid, body: `${i} ${body}` });
        await waitFor(() => line().deferred > 0 && (conn as unknown as { socket: { isPaused(): boolean } }).socket.isPaused(), 10_000, "the sender's connection paused");
        await sleep(300);
        expect(line().deferredBytes).toBeLessThanOrEqual(5 * 1024 * 1024);
        expect(line().deferred).toBeLessThan(40);
        gate.open();
        for (let i = 0; i < 40; i++) expect((await a.client.reply("message", 30_000)).data.status).toBe(0);
      } finally {
        restore();
      }
      for (const u of [a, x, y]) u.client.close();
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  }, 60_000);
});


describe("derived index entries on disk", () => {
  it("a conversation's dialog entry and its pointer are never cut apart between the batches of a generation", async () => {
    const srv = await startTestServer();
    try {
      const users: Account[] = [];
      for (let i = 0; i < 100; i++) users.push(await registerUser(srv.port));
      const storage = srv.services.storage;
      const say = async () => {
        for (let i = 0; i < 100; i += 2) expect((await users[i].client.request("message", { uid: users[i + 1].uid, body: "hi" })).status).toBe(0);
        await srv.services.messages.flushDerived();
      };
      await say(); // each pair's dialogs: from here on a move deletes an old entry (groups of three)
      // The chunks of the next generation, as they are handed to the batches.
      const chunks: BatchOp[][] = [];
      const commitLazy = storage.commitLazy.bind(storage);
      storage.commitLazy = (ops: readonly BatchOp[]) => {
        chunks.push([...ops]);
        commitLazy(ops);
      };
      try {
        await say();
      } finally {
        delete (storage as { commitLazy?: unknown }).commitLazy;
      }
      const { dialogs, dialogat } = storage.spaces;
      const withDialogs = chunks.filter((c) => c.some((o) => o.key.startsWith(dialogs.prefix) || o.key.startsWith(dialogat.prefix)));
      expect(withDialogs.length).toBeGreaterThan(1); // spread over batches
      for (const chunk of withDialogs) {
        // Each dialog entry put (uid!seq -> peer) has its pointer (uid!peer) in the same batch.
        const entries = chunk.filter((o) => o.type === "put" && o.key.startsWith(dialogs.prefix)).map((o) => `${o.key.slice(dialogs.prefix.length).split("!")[0]}!${JSON.parse(o.value as string)}`);
        const pointers = chunk.filter((o) => o.type === "put" && o.key.startsWith(dialogat.prefix)).map((o) => o.key.slice(dialogat.prefix.length));
        expect(entries.sort()).toEqual(pointers.sort());
      }
      for (const u of users) u.client.close();
    } finally {
      await srv.stop();
      removeDir(srv.services.config.dataDir);
    }
  });

  it("are written in synced batches (a later sync does not cover them across LevelDB's log switch)", async () => {
    const srv = await startTestServer();
    try {
      const a = await registerUser(srv.port);
      const b = await registerUser(srv.port);
      await srv.services.storage.settle();
      // Every batch write from here on, and whether it asks for a sync.
      const { syncs, restore } = recordSyncs(srv.services.storage);
      try {
        expect((await a.client.request("message", { uid: b.uid, body: "indexed" })).status).toBe(0);
        // Nothing else happens: the message's batch, then (within DERIVED_DELAY_MS) its
        // history and inbox entries with the watermark.
        await srv.services.messages.flushDerived();
      } finally {
        restore();
      }
      expect(syncs.length).toBeGreaterThanOrEqual(2);
      expect(syncs.filter((s) => s).length).toBeGreaterThanOrEqual(2);
      for (const x of [a, b]) x.client.close();
    } finally {
      await srv.stop();
      removeDir(srv.services.config.dataDir);
    }
  });
});
