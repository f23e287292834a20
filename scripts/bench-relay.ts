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

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

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

interface Server {
  proc: ChildProcess;
  port: number;
  dir: string;
}

async function startServer(extra: string[] = []): Promise<Server> {
  const dir = mkdtempSync(path.join(tmpdir(), "wirechat-bench-"));
  const main = fileURLToPath(new URL("../src/main.js", import.meta.url));
  const proc = spawn(
    process.execPath,
    [main, "--port", "0", "--host", "127.0.0.1", "--data-dir", dir, "--bcrypt-cost", "4", "--log-level", "info", ...extra],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const port = await new Promise<number>((resolve, reject) => {
    let out = "";
    proc.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const m = /"port":(\d+)[^\n]*"msg":"wirechat listening"/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    proc.on("exit", (code) => reject(new Error(`server exited ${code}`)));
  });
  proc.stdout!.resume();
  return { proc, port, dir };
}

async function stopServer(s: Server): Promise<void> {
  const exited = new Promise((r) => s.proc.once("exit", r));
  s.proc.kill("SIGTERM");
  await exited;
  rmSync(s.dir, { recursive: true, force: true });
}

/** A lean client: counts lines, parses only what it must. */
class BenchClient {
  private buf = "";
  onLine: (line: string) => void = () => {};
  constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      let start = 0;
      let nl: number;
      const text = this.buf + chunk;
      while ((nl = text.indexOf("\n", start)) >= 0) {
        this.onLine(text.slice(start, nl));
        start = nl + 1;
      }
      this.buf = text.slice(start);
    });
  }
  static connect(port: number): Promise<BenchClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, "127.0.0.1", () => resolve(new BenchClient(s)));
      s.once("error", reject);
    });
  }
  next(pred: (l: string) => boolean): Promise<any> {
    return new Promise((resolve) => {
      this.onLine = (l) => {
        if (pred(l)) {
          this.onLine = () => {};
          resolve(JSON.parse(l));
        }
      };
    });
  }
  send(obj: unknown): void {
    this.socket.write(JSON.stringify(obj) + "\n");
  }
}

let userSeq = 0;
async function newUser(port: number): Promise<{ c: BenchClient; uid: string; sid: string }> {
  const c = await BenchClient.connect(port);
  const login = `b${process.pid}_${++userSeq}`;
  const auth = c.next((l) => l.startsWith('{"action":"auth"'));
  c.send({ action: "register", data: { login, pass: "p", nick: login } });
  const a = await auth;
  return { c, uid: a.data.uid, sid: a.data.sid };
}

async function pairs(port: number, n: number) {
  const out = [];
  for (let i = 0; i < n; i++) out.push({ from: await newUser(port), to: await newUser(port) });
  return out;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
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

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) : NaN;
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
