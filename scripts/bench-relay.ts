// Relay benchmark: throughput, latency and idle-connection memory of a real server.
//
//   npm run bench:relay -- [--pairs 100] [--inflight 32] [--seconds 10] [--rate 5000]
//                          [--idle 10000] [--runs 3] [--only throughput|latency|idle]
//
// Starts the built server (dist/) as a child process on a temp data dir, then:
//   throughput  `pairs` sender/recipient pairs, each sender keeping `inflight`
//               messages unacknowledged; counts ev_message frames the recipients get.
//   latency     the same pairs sending `rate` messages/s in total; p50/p99 of send →
//               recipient's ev_message.
//   idle        `idle` authenticated connections doing nothing; the server's RSS
//               growth per connection (from /proc/<pid>/status).
// Each measure runs `runs` times on a fresh server and the median is reported.

import { parseArgs } from "node:util";
import { BenchClient, median, newUser, rssKiB, startServer, stopServer } from "./bench-lib.js";

const { values: opts } = parseArgs({
  options: {
    pairs: { type: "string", default: "100" },
    inflight: { type: "string", default: "32" },
    seconds: { type: "string", default: "10" },
    rate: { type: "string", default: "5000" },
    idle: { type: "string", default: "10000" },
    runs: { type: "string", default: "3" },
    only: { type: "string" },
  },
});
const PAIRS = Number(opts.pairs);
const INFLIGHT = Number(opts.inflight);
const SECONDS = Number(opts.seconds);
const RATE = Number(opts.rate);
const IDLE = Number(opts.idle);
const RUNS = Number(opts.runs);

async function pairs(port: number, n: number) {
  const out = [];
  for (let i = 0; i < n; i++) out.push({ from: await newUser(port), to: await newUser(port) });
  return out;
}

async function throughput(): Promise<number> {
  const server = await startServer();
  const ps = await pairs(server.port, PAIRS);
  let delivered = 0;
  let running = true;
  for (const { from, to } of ps) {
    const msg = JSON.stringify({ action: "message", data: { uid: to.uid, body: "benchmark message body" } }) + "\n";
    to.c.onLine = (l) => {
      if (l.charCodeAt(11) === 0x65 /* "action":"ev_ */) delivered++;
    };
    from.c.onLine = (l) => {
      // each reply frees a slot; the sender's own ev_message echo is ignored
      if (running && l.startsWith('{"action":"message"')) from.c.socket.write(msg);
    };
    from.c.socket.write(msg.repeat(INFLIGHT));
  }
  await new Promise((r) => setTimeout(r, 2000)); // warm-up
  const d0 = delivered;
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, SECONDS * 1000));
  const rate = ((delivered - d0) * 1000) / (performance.now() - t0);
  running = false;
  for (const { from, to } of ps) {
    from.c.socket.destroy();
    to.c.socket.destroy();
  }
  await stopServer(server);
  return rate;
}

async function latency(): Promise<{ p50: number; p99: number; sent: number }> {
  const server = await startServer();
  const ps = await pairs(server.port, PAIRS);
  const sentAt = new Map<string, number>();
  const samples: number[] = [];
  for (const { to } of ps) {
    to.c.onLine = (l) => {
      if (!l.startsWith('{"action":"ev_message"')) return;
      const body = JSON.parse(l).data.body as string;
      const t = sentAt.get(body);
      if (t !== undefined) samples.push(performance.now() - t);
    };
  }
  let seq = 0;
  const interval = 10; // ms; RATE/100 messages per tick spread over the pairs
  const perTick = Math.max(1, Math.round((RATE * interval) / 1000));
  const end = performance.now() + SECONDS * 1000;
  await new Promise<void>((resolve) => {
    const timer = setInterval(() => {
      if (performance.now() > end) {
        clearInterval(timer);
        resolve();
        return;
      }
      for (let i = 0; i < perTick; i++) {
        const p = ps[seq % ps.length];
        const body = `lat${seq++}`;
        sentAt.set(body, performance.now());
        p.from.c.send({ action: "message", data: { uid: p.to.uid, body } });
      }
    }, interval);
  });
  await new Promise((r) => setTimeout(r, 500));
  samples.sort((a, b) => a - b);
  const pick = (q: number) => samples[Math.min(samples.length - 1, Math.floor(q * samples.length))];
  for (const { from, to } of ps) {
    from.c.socket.destroy();
    to.c.socket.destroy();
  }
  await stopServer(server);
  return { p50: pick(0.5), p99: pick(0.99), sent: seq };
}

async function idle(): Promise<number> {
  const server = await startServer(["--max-connections", String(IDLE + 100)]);
  const pid = server.proc.pid as number;
  // one account; every connection resumes its session by sid
  const owner = await newUser(server.port);
  await new Promise((r) => setTimeout(r, 500));
  const before = rssKiB(pid);
  const conns: BenchClient[] = [];
  for (let i = 0; i < IDLE; i++) {
    const c = await BenchClient.connect(server.port);
    const authed = c.next((l) => l.startsWith('{"action":"auth"'));
    c.send({ action: "auth", data: { sid: owner.sid } });
    if ((await authed).data.status !== 0) throw new Error("idle connection could not authenticate");
    conns.push(c);
  }
  await new Promise((r) => setTimeout(r, 2000));
  const after = rssKiB(pid);
  for (const c of conns) c.socket.destroy();
  owner.c.socket.destroy();
  await stopServer(server);
  return ((after - before) * 1024) / IDLE;
}

async function main(): Promise<void> {
  const only = opts.only;
  if (!only || only === "throughput") {
    const runs = [];
    for (let i = 0; i < RUNS; i++) runs.push(await throughput());
    console.log(
      `throughput: ${PAIRS} pairs x ${INFLIGHT} in flight, ${SECONDS}s: median ${Math.round(median(runs))} msg/s delivered (runs: ${runs.map(Math.round).join(", ")})`,
    );
  }
  if (!only || only === "latency") {
    const runs = [];
    for (let i = 0; i < RUNS; i++) runs.push(await latency());
    console.log(
      `latency: ${RATE} msg/s over ${PAIRS} pairs, ${SECONDS}s: median p50 ${median(runs.map((r) => r.p50)).toFixed(2)} ms, p99 ${median(runs.map((r) => r.p99)).toFixed(2)} ms (p99 runs: ${runs.map((r) => r.p99.toFixed(2)).join(", ")})`,
    );
  }
  if (!only || only === "idle") {
    const runs = [];
    for (let i = 0; i < RUNS; i++) runs.push(await idle());
    console.log(
      `idle: ${IDLE} connections: median ${(median(runs) / 1024).toFixed(2)} KiB of server RSS each (runs: ${runs.map((b) => (b / 1024).toFixed(2)).join(", ")})`,
    );
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
