// --max-inbox: the direct messages that may wait for a user who is not connected.
// Past it a message to them is refused with 13 (nothing stored), until they connect;
// a connected recipient is not bounded by it, and a client that does not acknowledge
// (whose delivery cursor moves only 16 MiB behind what it was sent) is counted from
// when it left, not by its inbox. Real servers over TCP with a real LevelDB.

import { afterEach, describe, expect, it } from "vitest";
import fc from "fast-check";
import { AwayCounts, HEAVY_FROM } from "../src/features/away-counts.js";
import type { RunningServer } from "../src/server.js";
import { Client, login, registerUser, removeDir, startTestServer, type Account } from "./helpers.js";

const servers: RunningServer[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) {
    await s.stop();
    removeDir(s.services.config.dataDir);
  }
});

async function serve(maxInbox: number, dataDir?: string): Promise<RunningServer> {
  const s = await startTestServer({ maxInbox, ...(dataDir ? { dataDir } : {}) });
  servers.push(s);
  return s;
}

/** Closes `a`'s connection and waits until the server has it offline. */
async function offline(srv: RunningServer, a: Account | { client: Client; uid: string }): Promise<void> {
  a.client.close();
  const end = Date.now() + 5000;
  while (srv.services.router.isOnline(a.uid)) {
    if (Date.now() > end) throw new Error("still online");
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A server with --max-inbox `max`, Alice connected and Bob registered and gone. */
async function aliceAndBobAway(max: number): Promise<{ srv: RunningServer; alice: Account; bob: Account }> {
  const srv = await serve(max);
  const alice = await registerUser(srv.port);
  const bob = await registerUser(srv.port);
  await offline(srv, bob);
  return { srv, alice, bob };
}

const send = (c: Client, uid: string, body: string, extra: Record<string, unknown> = {}) => c.request("message", { uid, body, ...extra });

describe("--max-inbox", () => {
  it("refuses the message past it with 13 while the recipient is away; once they have connected and taken them, there is room again", async () => {
    const { srv, alice, bob } = await aliceAndBobAway(3);
    for (let i = 1; i <= 3; i++) expect((await send(alice.client, bob.uid, `m${i}`)).status).toBe(0);
    const full = await send(alice.client, bob.uid, "m4");
    expect(full.status).toBe(13);
    expect(full.error).toBe(`user '${bob.uid}' has 3 messages waiting to be delivered, the most this server keeps for someone not connected; send it again once they have connected`);
    // Refused means not stored: bob gets the three, and m4 is nowhere.
    const back = await login(srv.port, bob.login);
    expect(back.auth.status).toBe(0);
    const got = [];
    for (let i = 0; i < 3; i++) got.push((await back.client.event("ev_message")).body);
    expect(got).toEqual(["m1", "m2", "m3"]);
    expect(await back.client.quiet(300, (f) => f.action === "ev_message")).toBe(true);
    const hist = await back.client.request("history", { uid: alice.uid, limit: 10 });
    expect(hist.messages.map((m: { body: string }) => m.body)).toEqual(["m1", "m2", "m3"]);
    // Connected, bob is not bounded: five more reach him.
    for (let i = 5; i <= 9; i++) expect((await send(alice.client, bob.uid, `m${i}`)).status).toBe(0);
    for (let i = 5; i <= 9; i++) expect((await back.client.event("ev_message")).body).toBe(`m${i}`);
    // Away again with everything taken: three may wait again, not a fourth.
    await offline(srv, { client: back.client, uid: bob.uid });
    for (let i = 10; i <= 12; i++) expect((await send(alice.client, bob.uid, `m${i}`)).status).toBe(0);
    expect((await send(alice.client, bob.uid, "m13")).status).toBe(13);
    // Messages to others, and channel messages, are not held back by bob's inbox.
    const carol = await registerUser(srv.port);
    expect((await send(alice.client, carol.uid, "to carol")).status).toBe(0);
    alice.client.close();
    carol.client.close();
  });

  it("a restart begins the count again (it is kept in memory)", async () => {
    const { srv, alice, bob } = await aliceAndBobAway(2);
    expect((await send(alice.client, bob.uid, "one")).status).toBe(0);
    expect((await send(alice.client, bob.uid, "two")).status).toBe(0);
    expect((await send(alice.client, bob.uid, "three")).status).toBe(13);
    alice.client.close();
    const dir = srv.services.config.dataDir;
    await srv.stop();
    servers.splice(servers.indexOf(srv), 1);
    const again = await serve(2, dir);
    const a2 = await login(again.port, alice.login);
    expect((await send(a2.client, bob.uid, "three")).status).toBe(0);
    expect((await send(a2.client, bob.uid, "four")).status).toBe(0);
    expect((await send(a2.client, bob.uid, "five")).status).toBe(13);
    // Nothing was lost meanwhile: bob gets the four.
    const b2 = await login(again.port, bob.login);
    for (const body of ["one", "two", "three", "four"]) expect((await b2.client.event("ev_message")).body).toBe(body);
    a2.client.close();
    b2.client.close();
  });

  it("a resend of a stored message (same cmid) still gets its mid when the inbox is full", async () => {
    const { alice, bob } = await aliceAndBobAway(1);
    const first = await send(alice.client, bob.uid, "once", { cmid: "c-1" });
    expect(first.status).toBe(0);
    const again = await send(alice.client, bob.uid, "once", { cmid: "c-1" });
    expect(again).toMatchObject({ status: 0, mid: first.mid });
    expect((await send(alice.client, bob.uid, "other", { cmid: "c-2" })).status).toBe(13);
    alice.client.close();
  });

  it("a flood written back to back is counted as it is checked, not as it is stored: exactly the bound gets through", async () => {
    const { alice, bob } = await aliceAndBobAway(3);
    alice.client.write(Array.from({ length: 10 }, (_, i) => JSON.stringify({ action: "message", data: { uid: bob.uid, body: `f${i}` } }) + "\n").join(""));
    const statuses = [];
    for (let i = 0; i < 10; i++) statuses.push((await alice.client.reply("message")).data.status);
    expect(statuses.filter((s) => s === 0)).toHaveLength(3);
    expect(statuses.filter((s) => s === 13)).toHaveLength(7);
    alice.client.close();
  });

  it("0 is no bound", async () => {
    const { alice, bob } = await aliceAndBobAway(0);
    for (let i = 0; i < 50; i++) expect((await send(alice.client, bob.uid, `m${i}`)).status).toBe(0);
    alice.client.close();
  });
});

// The counts themselves (features/away-counts.ts), kept for a fixed number of users:
// which one is forgotten past it decides what a sender can get past the bound.
describe("--max-inbox's counts past the users they keep", () => {
  it("a filled count is not pushed out by one message each to many other users", () => {
    const counts = new AwayCounts(100, () => 10);
    for (let i = 0; i < 10; i++) counts.add("victim");
    for (let i = 0; i < 10_000; i++) counts.add(`other${i}`);
    expect(counts.get("victim")).toBe(10);
    expect(counts.size).toBe(100);
    // The light ones go the least recently counted first.
    expect(counts.get("other9900")).toBe(undefined);
    expect(counts.get("other9901")).toBe(1);
  });

  it("a high count goes once half the counts kept are high, the least recently added to first", () => {
    const counts = new AwayCounts(4, () => 2);
    counts.add("a");
    counts.add("a"); // high
    counts.add("c");
    counts.add("d");
    counts.add("e");
    counts.add("f"); // full, one high of four: c (the oldest low one) goes
    expect([counts.get("a"), counts.get("c"), counts.get("d"), counts.get("f")]).toEqual([2, undefined, 1, 1]);
    counts.add("d"); // high too: two of four
    counts.add("g"); // half are high: a, the high one least recently added to, goes
    expect([counts.get("a"), counts.get("d"), counts.get("e"), counts.get("f"), counts.get("g")]).toEqual([undefined, 2, 1, 1, 1]);
    // High counts of users who never come back leave the low ones half the table (with
    // low ones always first, u was pushed out by v and v by w: each new one by the next).
    const many = new AwayCounts(10, () => 2);
    for (let i = 0; i < 9; i++) for (let k = 0; k < 2; k++) many.add(`gone${i}`); // high (bound 2)
    many.add("u");
    many.add("v");
    many.add("w");
    expect([many.get("u"), many.get("v"), many.get("w")]).toEqual([1, 1, 1]);
    expect([many.get("gone0"), many.get("gone1"), many.get("gone2")]).toEqual([undefined, undefined, 2]);
    many.delete("v");
    expect(many.get("v")).toBe(undefined);
    expect(many.size).toBe(9);
  });

  it("property: never more users than it keeps, and a count at the bound outlives any run of single messages to others", () => {
    fc.assert(
      fc.property(fc.integer({ min: 2, max: 50 }), fc.integer({ min: 1, max: 100 }), fc.array(fc.integer({ min: 0, max: 500 }), { maxLength: 2000 }), (max, bound, others) => {
        const counts = new AwayCounts(max, () => bound);
        for (let i = 0; i < Math.min(bound, HEAVY_FROM); i++) counts.add("victim");
        // Each other user gets one message at a time; until half the table is heavy, the victim stays.
        const seen = new Map<number, number>();
        for (const o of others) {
          counts.add(`u${o}`);
          seen.set(o, (seen.get(o) ?? 0) + 1);
          expect(counts.size).toBeLessThanOrEqual(max);
          const heavyOthers = [...seen.values()].filter((n) => n >= Math.min(bound, HEAVY_FROM)).length;
          if (heavyOthers + 1 < max / 2) expect(counts.get("victim")).toBe(Math.min(bound, HEAVY_FROM));
        }
      }),
      { numRuns: 200 },
    );
  });
});
