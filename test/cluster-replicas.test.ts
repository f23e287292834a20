// Cluster mode on a three-server NATS cluster with --replicas 3: the log survives kill -9
// of the nats-server leading its stream, under load. Every message answered 0 reaches
// its recipient (on the other wirechat node) once and in mid order, every other answer
// is 16 and, resent with its cmid, gets exactly one mid; the nodes keep serving.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NatsServer, startNatsCluster } from "../scripts/nats-server.js";
import type { RunningServer } from "../src/server.js";
import { registerUser, removeDir, startTestServer } from "./helpers.js";

let nats: NatsServer[] = [];
const nodes: RunningServer[] = [];
const stream = `WIRECHAT_R${process.pid}`;

beforeAll(async () => {
  nats = await startNatsCluster(3);
  const urls = nats.map((s) => s.url).join(",");
  for (let i = 0; i < 2; i++) nodes.push(await startTestServer({ nats: urls, natsStream: stream, nodeId: `r${i}`, replicas: 3 }));
}, 60_000);

afterAll(async () => {
  for (const n of nodes) {
    await n.stop();
    removeDir(n.services.config.dataDir);
  }
  for (const s of nats) await s.stop();
});

/**
 * The stream's replica group as JetStream reports it: its leader's server name and how
 * many copies it keeps. Asked again while JetStream's API times out: after a kill -9
 * the remaining servers may still be electing the leader of JetStream's own metadata
 * (which answers these requests) when the stream's new leader already serves the
 * stream (a CI run timed out here after every message had been delivered).
 */
async function streamCluster(): Promise<{ leader: string; replicas: number }> {
  const { connect } = await import("@nats-io/transport-node");
  const { jetstreamManager } = await import("@nats-io/jetstream");
  const nc = await connect({ servers: nats.map((s) => s.url) });
  try {
    const deadline = Date.now() + 60_000;
    for (;;) {
      try {
        const info = await (await jetstreamManager(nc)).streams.info(stream);
        return { leader: info.cluster?.leader ?? "", replicas: info.config.num_replicas };
      } catch (err) {
        if ((err as Error).name !== "TimeoutError" || Date.now() > deadline) throw err;
      }
    }
  } finally {
    await nc.close();
  }
}

describe("cluster mode on a three-server NATS cluster (--replicas 3)", () => {
  it("kill -9 of the stream's leader under load loses no acknowledged message, and the nodes keep serving", async () => {
    const alice = await registerUser(nodes[0].port);
    const bob = await registerUser(nodes[1].port);
    const before = await streamCluster();
    expect(before.replicas).toBe(3);
    const leader = nats.find((s) => s.name === before.leader) as NatsServer;
    expect(leader).toBeDefined();

    const n = 2000;
    const windowSize = 64;
    const mids = new Map<number, string>();
    const refused: number[] = [];
    let replied = 0;
    let killed = false;
    let wake: (() => void) | undefined;
    const replies = (async () => {
      for (let i = 0; i < n; i++) {
        // Replies come in request order; one may wait out the write budget (10 s) in the stall.
        const r = (
          await alice.client.reply("message", 30_000).catch((err: Error) => {
            throw new Error(`reply ${i + 1} of ${n} (leader killed: ${killed}): ${err.message}`);
          })
        ).data;
        if (r.status === 0) mids.set(i, r.mid);
        else {
          expect(r.status).toBe(16);
          refused.push(i);
        }
        replied++;
        wake?.();
        if (replied === 300) {
          killed = true;
          await leader.kill();
        }
      }
    })();
    for (let sent = 0; sent < n; ) {
      if (sent - replied >= windowSize) {
        await new Promise<void>((r) => (wake = r));
        continue;
      }
      alice.client.send("message", { uid: bob.uid, body: `k${sent}`, cmid: `k${sent}` });
      sent++;
    }
    await replies;
    expect(killed).toBe(true);
    // What was refused is resent with its cmid until it is stored (the cluster is serving again).
    for (const i of refused) {
      for (let attempt = 0; ; attempt++) {
        const r = await alice.client.request("message", { uid: bob.uid, body: `k${i}`, cmid: `k${i}` });
        if (r.status === 0) {
          mids.set(i, r.mid);
          break;
        }
        expect(r.status).toBe(16);
        expect(attempt).toBeLessThan(60);
        await new Promise((res) => setTimeout(res, 500));
      }
    }
    expect(mids.size).toBe(n);
    const got: any[] = [];
    while (got.length < n) {
      const ev = await bob.client.next((f) => f.action === "ev_message", 30_000).catch((err: Error) => {
        const seen = new Set(got.map((m) => m.mid));
        const missing = [...mids].filter(([, mid]) => !seen.has(mid));
        throw new Error(`bob got ${got.length} of ${n}; not delivered: ${missing.length}, e.g. ${JSON.stringify(missing.slice(0, 5))}: ${err.message}`);
      });
      got.push(ev.data);
    }
    expect(await bob.client.quiet(500, (f) => f.action === "ev_message")).toBe(true);
    // Each message once, in mid order, and each acknowledged mid is the one delivered.
    expect(new Set(got.map((m) => m.mid)).size).toBe(n);
    expect(got.map((m) => Number(m.mid))).toEqual(got.map((m) => Number(m.mid)).sort((a, b) => a - b));
    const bodyOf = new Map(got.map((m) => [m.mid, m.body]));
    for (const [i, mid] of mids) expect(bodyOf.get(mid)).toBe(`k${i}`);
    // A new leader serves the stream, and a new request is answered 0 at once.
    const after = await streamCluster();
    expect(after.leader).not.toBe(before.leader);
    expect((await alice.client.request("message", { uid: bob.uid, body: "after" })).status).toBe(0);
    alice.client.close();
    bob.client.close();
  }, 180_000);
});
