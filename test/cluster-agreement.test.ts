// Cluster mode: nodes agree on what the log decided, whatever each node's own timing.
// Findings of a hostile review, each reproduced over real nodes on a real nats-server:
// a cmid of a deleted channel's message (purged by each node on its own schedule),
// a deleted account that kept sending, and edits through a node behind the log.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { Client, login, registerUser, removeDir, startTestServer, uniqueName } from "./helpers.js";
import { NatsServer } from "../scripts/nats-server.js";

let nats: NatsServer;
const nodes: RunningServer[] = [];
const stream = `WIRECHAT_A${process.pid}`;

function node(i: number): number {
  return nodes[i].port;
}

async function startNode(nodeId: string): Promise<RunningServer> {
  const n = await startTestServer({ nats: nats.url, natsStream: stream, nodeId });
  nodes.push(n);
  return n;
}

beforeAll(async () => {
  nats = await NatsServer.start();
  for (let i = 0; i < 3; i++) await startNode(`n${i}`);
});

afterAll(async () => {
  for (const n of nodes) {
    await n.stop();
    removeDir(n.services.config.dataDir);
  }
  await nats?.stop();
});

/** `who`'s direct conversation with `peer` as node `port` answers it (mid, sender, body). */
async function historyOn(port: number, who: { login: string }, peer: string): Promise<string[]> {
  const { client } = await login(port, who.login);
  const h = await client.request("history", { uid: peer, limit: 100 });
  client.close();
  expect(h.status).toBe(0);
  return h.messages.map((m: any) => `${m.mid} ${m.from} ${m.body}`);
}

describe("cluster mode: a cmid of a deleted channel's message", () => {
  it("is free again on every node, a new one replaying the log included, whenever each purges", async () => {
    const carol = await registerUser(node(0), uniqueName("carol"));
    const dave = await registerUser(node(1), uniqueName("dave"));
    const { chid } = await carol.client.request("createchannel", { name: uniqueName("gone") });
    const inChannel = await carol.client.request("message", { channel: chid, body: "in the channel", cmid: "X" });
    expect(inChannel.status).toBe(0);
    expect((await carol.client.request("deletechannel", { channel: chid })).status).toBe(0);
    // Long enough for the running nodes' purges to be done (they run outside the log).
    await new Promise((r) => setTimeout(r, 2_000));
    const dm = await carol.client.request("message", { uid: dave.uid, body: "dm", cmid: "X" });
    expect(dm.status).toBe(0);
    expect(dm.mid).not.toBe(inChannel.mid);
    const dm2 = await carol.client.request("message", { uid: dave.uid, body: "dm2" });
    expect(Number(dm2.mid)).toBeGreaterThan(Number(dm.mid));
    // A node that builds its view from the whole log now: the purge comes after its catch-up.
    const fresh = await startNode("fresh");
    const expected = [`${dm.mid} ${carol.uid} dm`, `${dm2.mid} ${carol.uid} dm2`];
    for (const port of [node(0), node(1), node(2), fresh.port]) expect(await historyOn(port, carol, dave.uid)).toEqual(expected);
    // And the cmid names the direct message everywhere, once each node's purge is done.
    await new Promise((r) => setTimeout(r, 1_000));
    for (const port of [node(0), node(1), node(2), fresh.port]) {
      const { client } = await login(port, carol.login);
      const again = await client.request("message", { uid: dave.uid, body: "dm", cmid: "X" });
      expect(again).toMatchObject({ status: 0, mid: dm.mid });
      client.close();
    }
    const after = await carol.client.request("message", { uid: dave.uid, body: "dm3" });
    expect(after.mid).toBe(String(Number(dm2.mid) + 1));
    for (const port of [node(0), node(1), node(2), fresh.port]) expect(await historyOn(port, carol, dave.uid)).toEqual([...expected, `${after.mid} ${carol.uid} dm3`]);
    for (const c of [carol.client, dave.client]) c.close();
  });

  it("is free for a message in the same log entry as the channel's deletion", async () => {
    const carol = await registerUser(node(0), uniqueName("carol"));
    const dave = await registerUser(node(1), uniqueName("dave"));
    const erin = await registerUser(node(0), uniqueName("erin"));
    const second = await login(node(0), carol.login);
    const { chid } = await carol.client.request("createchannel", { name: uniqueName("gone") });
    const inChannel = await carol.client.request("message", { channel: chid, body: "in the channel", cmid: "Y" });
    expect(inChannel.status).toBe(0);
    // Filler traffic keeps node 0's publish busy, so the deletion and the message that
    // reuses the cmid are gathered into one entry (one apply segment) behind it.
    const fillers = 300;
    for (let i = 0; i < fillers; i++) erin.client.send("message", { uid: dave.uid, body: `filler ${i}` });
    await new Promise((r) => setTimeout(r, 5));
    const deleted = carol.client.request("deletechannel", { channel: chid });
    const reused = second.client.request("message", { uid: dave.uid, body: "after the channel", cmid: "Y" });
    expect((await deleted).status).toBe(0);
    const dm = await reused;
    expect(dm.status).toBe(0);
    expect(dm.mid).not.toBe(inChannel.mid);
    for (let i = 0; i < fillers; i++) await erin.client.next((f) => f.action === "message");
    const fresh = await startNode("fresh2");
    for (const port of [node(0), node(1), node(2), fresh.port]) expect(await historyOn(port, carol, dave.uid)).toEqual([`${dm.mid} ${carol.uid} after the channel`]);
    // Every node counted the same messages: the next mid is the same everywhere.
    const next = await dave.client.request("message", { uid: carol.uid, body: "next" });
    for (const port of [node(0), node(1), node(2), fresh.port]) {
      expect(await historyOn(port, dave, carol.uid)).toEqual([`${dm.mid} ${carol.uid} after the channel`, `${next.mid} ${dave.uid} next`]);
    }
    for (const c of [carol.client, dave.client, erin.client, second.client]) c.close();
  });
});

/** A node that applies every batch `ms` late (the test hook), for requests let in before it hears of a change. */
async function startLagging(nodeId: string, ms: number): Promise<RunningServer> {
  process.env.WIRECHAT_TEST_APPLY_DELAY_MS = String(ms);
  try {
    return await startNode(nodeId);
  } finally {
    delete process.env.WIRECHAT_TEST_APPLY_DELAY_MS;
  }
}

describe("cluster mode: a deleted account", () => {
  it("cannot send, edit, or add a contact through a node that has not applied its deletion yet", async () => {
    const lagging = await startLagging("late", 1_500);
    const y = await registerUser(node(1), uniqueName("y"));
    const z = await registerUser(node(0), uniqueName("z"));
    // Connections of z on the lagging node, one per request (each is closed there once
    // it applies the deletion; what they sent by then is in the log after it).
    const onLate = await Promise.all([0, 1, 2].map(() => Client.connect(lagging.port)));
    for (const c of onLate) expect((await c.request("auth", { sid: z.sid })).status).toBe(0);
    const before = await onLate[0].request("message", { uid: y.uid, body: "before" });
    expect(before.status).toBe(0);
    expect((await z.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    // The lagging node still holds z's sessions: these reach the log after the deletion.
    onLate[0].send("message", { uid: y.uid, body: "after the deletion" });
    onLate[1].send("editmessage", { mid: before.mid, body: "edited after the deletion" });
    onLate[2].send("addcontact", { uid: y.uid });
    for (const c of onLate) await c.closed;
    for (const port of [node(0), node(1), node(2), lagging.port]) {
      // Login waits for the node to reach the log's end.
      expect(await historyOn(port, y, z.uid)).toEqual([`${before.mid} ${z.uid} before`]);
      const { client } = await login(port, y.login);
      expect((await client.request("userinfo", { user: z.uid })).status).toBe(8);
      client.close();
    }
    for (const n of [...nodes.slice(0, 3), lagging]) expect(await n.services.contacts.list(z.uid)).toEqual([]);
    y.client.close();
  });
});

describe("cluster mode: your own message, through a node behind the log", () => {
  it("is edited and deleted there (it waits for the log before it answers 14)", async () => {
    const lagging = await startLagging("late2", 800);
    const sam = await registerUser(node(0), uniqueName("sam"));
    const pat = await registerUser(node(1), uniqueName("pat"));
    const samLate = await Client.connect(lagging.port);
    expect((await samLate.request("auth", { sid: sam.sid })).status).toBe(0);
    const direct = await sam.client.request("message", { uid: pat.uid, body: "typo" });
    expect(direct.status).toBe(0);
    expect(await samLate.request("editmessage", { mid: direct.mid, body: "fixed" })).toMatchObject({ status: 0, mid: direct.mid });
    const { chid } = await sam.client.request("createchannel", { name: uniqueName("late") });
    const inChannel = await sam.client.request("message", { channel: chid, body: "gone soon" });
    expect(inChannel.status).toBe(0);
    expect(await samLate.request("delmessage", { mid: inChannel.mid })).toMatchObject({ status: 0, mid: inChannel.mid });
    // Still 14 for a mid that no node has, and 15 for someone else's.
    expect((await samLate.request("editmessage", { mid: "999999", body: "x" })).status).toBe(14);
    const fromPat = await pat.client.request("message", { uid: sam.uid, body: "mine" });
    expect((await samLate.request("editmessage", { mid: fromPat.mid, body: "x" })).status).toBe(15);
    expect(await historyOn(node(1), pat, sam.uid)).toEqual([`${direct.mid} ${sam.uid} fixed`, `${fromPat.mid} ${pat.uid} mine`]);
    for (const c of [sam.client, pat.client, samLate]) c.close();
  });
});
