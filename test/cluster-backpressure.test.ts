// Cluster mode with a nats-server that stalls (kill -STOP): the connection stays open,
// so the node sees no disconnect, and appends used to pile up without bound (a review
// grew a node from 250 MB to 1,230 MB in 12 s with one client pipelining 800 KB
// messages). Now what waits for the log is capped in bytes and answered 16 past the
// cap or past its write budget, counted from the request; the node recovers once the
// server continues. The refused requests waiting in line for their replies held their
// bodies too (through their refusals' stack traces): the node's memory is sampled.

import { readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { admin } from "./admin-helpers.js";
import { ChildServer, Client, registerUser, removeDir, tempDir, type Frame } from "./helpers.js";
import { NatsServer } from "../scripts/nats-server.js";

let nats: NatsServer;
let child: ChildServer | undefined;
const dir = tempDir();

beforeAll(async () => {
  nats = await NatsServer.start();
  child = await ChildServer.start(dir, ["--nats", nats.url, "--nats-stream", `WIRECHAT_B${process.pid}`, "--node-id", "stalled"]);
});

afterAll(async () => {
  nats?.resume();
  if (child && child.proc.exitCode === null && child.proc.signalCode === null) {
    child.proc.kill("SIGKILL");
    await child.exited;
  }
  removeDir(dir);
  await nats?.stop();
});

/** Two users of `node` (a has sent b one message: the log works), and a second connection of a's. */
async function pairAndSender(node: ChildServer) {
  const a = await registerUser(node.port);
  const b = await registerUser(node.port);
  expect((await a.client.request("message", { uid: b.uid, body: "warm up" })).status).toBe(0);
  const sender = await Client.connect(node.port);
  expect((await sender.request("auth", { sid: a.sid })).status).toBe(0);
  return { a, b, sender };
}

describe("cluster mode: a stalled nats-server", () => {
  it("bounds what waits for the log: 16 past the cap or past the budget from the request, and it recovers", async () => {
    const node = child as ChildServer;
    const { a, b, sender } = await pairAndSender(node);
    const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${node.proc.pid}/status`, "latin1"))?.[1]) * 1024;
    const before = rss();
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, rss())), 100);
    nats.pause();
    try {
      const n = 250; // 200 MB of messages: far past the cap (32 MiB)
      const body = "x".repeat(800 * 1024);
      const statuses: number[] = [];
      const started = Date.now();
      for (let i = 0; i < n; i++) {
        sender.send("message", { uid: b.uid, body, cmid: `big-${i}` });
        // Let the socket drain now and then (the test's own memory is not the node's).
        if (i % 10 === 9) await new Promise((r) => setImmediate(r));
      }
      // Every request answered: those past the cap at once (in line behind the others),
      // the others once their budget (10 s from the request) runs out.
      const deadline = Date.now() + 20_000;
      while (statuses.length < n && Date.now() < deadline) {
        const f: Frame = await sender.next((x) => x.action === "message", deadline - Date.now());
        statuses.push(f.data.status);
      }
      expect(statuses).toHaveLength(n);
      expect([...new Set(statuses)]).toEqual([16]);
      // The last answered within the write budget (10 s) of the requests that got in,
      // not one budget after another.
      expect(Date.now() - started).toBeLessThan(16_000);
      expect(node.proc.exitCode).toBeNull();
      // 200 MB went through: what the node holds is the cap (32 MiB), what reading
      // ahead holds, and garbage. Before, it grew by ~245 MB (a 256 MB heap ran out).
      expect(peak - before).toBeLessThan(160 * 1024 * 1024);
      sender.close();
    } finally {
      clearInterval(sampler);
      nats.resume();
    }
    // Recovered: a message is stored and delivered again.
    let sent: any;
    for (let i = 0; i < 40; i++) {
      sent = await a.client.request("message", { uid: b.uid, body: "after" });
      if (sent.status === 0) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    expect(sent.status).toBe(0);
    expect((await b.client.next((f) => f.action === "ev_message" && f.data.body === "after")).data.mid).toBe(sent.mid);
    for (const c of [a.client, b.client]) c.close();
  }, 60_000);

  it("bounds the replies waiting in line behind one that waits for the log: the connection is read no further, and all are answered once it is back", async () => {
    const node = child as ChildServer;
    const { a, b, sender } = await pairAndSender(node);
    // The most requests any of a's connections has read and not answered (/connz).
    const unanswered = async () => {
      const conns = (await admin(node.adminPort as number, "GET", `/connz?user=${a.login}`)).json.connections as { unanswered: number }[];
      return Math.max(...conns.map((c) => c.unanswered));
    };
    const n = 12_000; // small messages, pipelined: the first waits for the log, the rest in line
    nats.pause();
    try {
      let frames = "";
      for (let i = 0; i < n; i++) frames += JSON.stringify({ action: "message", data: { uid: b.uid, body: `m${i}` } }) + "\n";
      sender.write(frames);
      // The line fills to its bound (4,096 replies waiting, DEFERRED_MAX) and the node
      // stops reading; what it read ahead is at most a read's worth of frames more.
      // Unbounded, all 12,000 were read and queued for their places in line.
      await expect.poll(unanswered, { timeout: 15_000, interval: 100 }).toBeGreaterThanOrEqual(4096);
      let most = 0;
      for (let i = 0; i < 15; i++) {
        most = Math.max(most, await unanswered());
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(most).toBeLessThan(4096 + 2048);
    } finally {
      nats.resume();
    }
    // Every request answered, in order, the connection still open (16 for those whose
    // write budget ran out while the engine was stopped, 13 past the request rate).
    const statuses = new Map<number, number>();
    for (let i = 0; i < n; i++) {
      const f: Frame = await sender.next((x) => x.action === "message", 30_000);
      statuses.set(f.data.status, (statuses.get(f.data.status) ?? 0) + 1);
    }
    expect([...statuses.keys()].every((st) => st === 0 || st === 13 || st === 16)).toBe(true);
    expect(statuses.get(0)).toBeGreaterThan(0);
    expect(sender.isClosed).toBe(false);
    expect(node.proc.exitCode).toBeNull();
    for (const c of [a.client, b.client, sender]) c.close();
  }, 90_000);
});
