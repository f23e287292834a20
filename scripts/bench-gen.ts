// Load generator for the relay benchmark (scripts/bench-relay.ts starts it, one process
// per run, pinned to its own CPU). It drives one server, either wirechat (seed-004
// protocol) or the baseline relay (scripts/baseline-relay.ts), through one scenario and
// prints one JSON line with the result on stdout.
//
//   node dist/scripts/bench-gen.js '<json GenConfig>'
//
//   s1  `pairs` sender→recipient pairs; each sender keeps `window` messages in flight,
//       counted from send until its recipient has the message; figure: messages
//       delivered per second over `seconds`, after `warmup` seconds of load
//   s2  open loop: `rate` messages/s in total, round-robin over the pairs, sent from a
//       1 ms timer; figure: p99 of send → delivery latency during the measured window
//   s3  `conns` logged-in connections (wirechat: register, which also authenticates)
//       that then stay idle; figure: growth of the server's VmRSS per connection
//
// The hot path never parses JSON: frames are split on '\n' in the raw bytes, every
// message body starts with a marker "@@<seq>:<send time in µs>@@" that the recipient
// finds with Buffer.indexOf, and a sender's replies are classified by their "status".

import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import net from "node:net";

export interface GenConfig {
  proto: "wirechat" | "baseline";
  port: number;
  /** s1/s2: the port recipients connect to (another cluster node); default `port`. */
  recvPort?: number;
  serverPid: number;
  scenario: "s1" | "s2" | "s3";
  pairs: number;
  window: number;
  rate: number;
  seconds: number;
  warmup: number;
  conns: number;
  setupConcurrency: number;
  settle: number;
  bodySize: number;
  timeoutMs: number;
}

export interface GenResult {
  proto: string;
  scenario: string;
  setupOk: number;
  setupFailed: number;
  setupMs: number;
  errors: number;
  closes: number;
  errorSamples: string[];
  // s1 / s2
  msgsPerSec?: number;
  sentPerSec?: number;
  p50Ms?: number;
  p99Ms?: number;
  p999Ms?: number;
  maxMs?: number;
  undelivered?: number;
  genCpuPct?: number;
  serverCpuPct?: number;
  otherCpuPct?: number;
  maxTimerLagMs?: number;
  // s3
  rssBeforeKiB?: number;
  rssAfterKiB?: number;
  kibPerConn?: number;
}

const cfg = JSON.parse(process.argv[2] ?? "{}") as GenConfig;
const HOST = "127.0.0.1";
const NL = 0x0a;
const AT = 0x40;
const COLON = 0x3a;
const MARK = Buffer.from("@@");
const STATUS = Buffer.from('"status":');

const nowUs = (): number => Math.round(performance.now() * 1000);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---- counters ----------------------------------------------------------------------

let errors = 0;
let closes = 0;
let closing = false;
const errorSamples: string[] = [];
function noteError(text: string): void {
  errors++;
  if (errorSamples.length < 5) errorSamples.push(text.slice(0, 300));
}

/** Latency samples in µs, kept exactly (a few million at most). */
class Samples {
  private a = new Float64Array(1 << 16);
  n = 0;
  add(v: number): void {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = v;
  }
  sorted(): Float64Array {
    return this.a.slice(0, this.n).sort();
  }
}
const samples = new Samples();
let measuring = false;
let sending = false;
let deliveredWin = 0;
let sentWin = 0;
/** Time of the chunk being processed (read once per chunk, on first need). */
let chunkNow = 0;

// ---- connections -------------------------------------------------------------------

class Conn {
  readonly sock: net.Socket;
  private rest: Buffer | null = null;
  /** Set during set-up: complete lines as strings. */
  onSetupLine: ((line: string) => void) | null = null;
  pair: Pair | null = null;
  isRecipient = false;
  closed = false;
  private readonly connected: Promise<void>;

  constructor(port = cfg.port) {
    this.sock = net.connect({ host: HOST, port, noDelay: true });
    this.connected = new Promise((resolve, reject) => {
      this.sock.once("connect", resolve);
      this.sock.once("error", reject);
    });
    this.sock.on("data", (c: Buffer) => this.onData(c));
    this.sock.on("error", (e: NodeJS.ErrnoException) => {
      if (!closing) noteError(`socket error: ${e.code ?? e.message}`);
    });
    this.sock.on("close", () => {
      this.closed = true;
      if (!closing) closes++;
    });
  }

  ready(): Promise<void> {
    return this.connected;
  }

  write(s: string): void {
    if (!this.closed) this.sock.write(s);
  }

  private onData(chunk: Buffer): void {
    chunkNow = 0;
    let s = 0;
    if (this.rest) {
      const nl = chunk.indexOf(NL);
      if (nl < 0) {
        this.rest = Buffer.concat([this.rest, chunk]);
        return;
      }
      const head = Buffer.concat([this.rest, chunk.subarray(0, nl)]);
      this.rest = null;
      this.onLine(head, 0, head.length);
      s = nl + 1;
    }
    for (let nl = chunk.indexOf(NL, s); nl >= 0; nl = chunk.indexOf(NL, s)) {
      if (nl > s) this.onLine(chunk, s, nl);
      s = nl + 1;
    }
    // copy the tail so the (large) chunk is not kept alive by it
    if (s < chunk.length) this.rest = Buffer.from(chunk.subarray(s));
    if (this.pair && this.isRecipient) this.pair.afterChunk();
  }

  private onLine(buf: Buffer, s: number, e: number): void {
    if (this.onSetupLine) {
      this.onSetupLine(buf.toString("utf8", s, e));
      return;
    }
    const pair = this.pair;
    if (!pair) return; // s3: idle connections ignore whatever arrives
    const m = buf.indexOf(MARK, s);
    const hasMark = m >= 0 && m < e;
    if (this.isRecipient) {
      if (hasMark) {
        pair.onDelivered(sendTimeOf(buf, m));
        return;
      }
      const st = statusOf(buf, s, e);
      if (st > 0) noteError(buf.toString("utf8", s, e));
      return;
    }
    if (hasMark) return; // an echo of our own message
    const st = statusOf(buf, s, e);
    if (st > 0) noteError(buf.toString("utf8", s, e));
    // st === 0: the server's acknowledgement; nothing to do (the window counts deliveries)
  }

  /** Send a line and wait for the first line `pick` returns non-undefined for. */
  request<T>(line: string, pick: (l: string) => T | undefined): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.onSetupLine = null;
        reject(new Error(`no reply within ${cfg.timeoutMs} ms`));
      }, cfg.timeoutMs);
      this.sock.once("close", () => reject(new Error("closed by the server during set-up")));
      this.onSetupLine = (l) => {
        let v: T | undefined;
        try {
          v = pick(l);
        } catch (e) {
          clearTimeout(timer);
          this.onSetupLine = null;
          reject(e);
          return;
        }
        if (v !== undefined) {
          clearTimeout(timer);
          this.onSetupLine = null;
          resolve(v);
        }
      };
      this.write(line);
    });
  }
}

/** "@@<seq>:<µs>@@" at m: the send time. */
function sendTimeOf(buf: Buffer, m: number): number {
  let j = m + 2;
  while (buf[j] !== COLON) j++;
  j++;
  let t = 0;
  for (let c = buf[j]; c !== AT; c = buf[++j]) t = t * 10 + (c - 0x30);
  return t;
}

/** The integer after "status": in buf[s..e), or -1. */
function statusOf(buf: Buffer, s: number, e: number): number {
  const k = buf.indexOf(STATUS, s);
  if (k < 0 || k >= e) return -1;
  let j = k + STATUS.length;
  while (buf[j] === 0x20) j++;
  let v = 0;
  let any = false;
  for (let c = buf[j]; c >= 0x30 && c <= 0x39; c = buf[++j]) {
    v = v * 10 + (c - 0x30);
    any = true;
  }
  return any ? v : -1;
}

const PAD = "x".repeat(Math.max(cfg.bodySize, 4096));

class Pair {
  seq = 0;
  sent = 0;
  delivered = 0;
  inflight = 0;
  private gotSome = false;
  private readonly pre: string;
  private readonly suf: string;

  constructor(
    readonly tx: Conn,
    readonly rx: Conn,
    toId: string,
  ) {
    tx.pair = this;
    rx.pair = this;
    rx.isRecipient = true;
    if (cfg.proto === "wirechat") {
      this.pre = `{"action":"message","data":{"uid":${JSON.stringify(toId)},"body":"`;
      this.suf = '"}}\n';
    } else {
      this.pre = `{"to":${JSON.stringify(toId)},"body":"`;
      this.suf = '"}\n';
    }
  }

  /** n messages in one write; they share one body and so one send time. */
  send(n: number, t: number): void {
    let body = `@@${this.seq++}:${t}@@`;
    if (body.length < cfg.bodySize) body += PAD.slice(0, cfg.bodySize - body.length);
    const line = this.pre + body + this.suf;
    this.tx.write(n === 1 ? line : line.repeat(n));
    this.sent += n;
    this.inflight += n;
    if (measuring) sentWin += n;
  }

  onDelivered(t: number): void {
    this.inflight--;
    this.delivered++;
    this.gotSome = true;
    if (measuring) {
      deliveredWin++;
      if (chunkNow === 0) chunkNow = nowUs();
      samples.add(chunkNow - t);
    }
  }

  /** s1: after a chunk with deliveries, top the window up again. */
  afterChunk(): void {
    if (!this.gotSome) return;
    this.gotSome = false;
    if (sending && cfg.scenario === "s1") {
      const n = cfg.window - this.inflight;
      if (n > 0) this.send(n, chunkNow || nowUs());
    }
  }
}

// ---- set-up ------------------------------------------------------------------------

interface Login {
  conn: Conn;
  id: string;
}

async function logIn(name: string, port: number): Promise<Login> {
  const conn = new Conn(port);
  try {
    await conn.ready();
    let id: string;
    if (cfg.proto === "wirechat") {
      const pass = createHash("md5").update(name).digest("hex");
      const req = JSON.stringify({ action: "register", data: { login: name, pass, nick: name } }) + "\n";
      // the register reply (status 0) is followed by an auth frame with uid and sid
      id = await conn.request(req, (l) => {
        const f = JSON.parse(l) as { action?: string; data?: { status?: number; uid?: unknown; error?: string } };
        if (f.action === "auth") {
          if (f.data?.status !== 0) throw new Error(`auth failed: ${l.slice(0, 200)}`);
          return String(f.data.uid);
        }
        if (f.action === "register" && f.data?.status !== 0) throw new Error(`register failed: ${l.slice(0, 200)}`);
        return undefined; // welcome, the register reply, ...
      });
    } else {
      id = await conn.request(JSON.stringify({ login: name }) + "\n", (l) => {
        const f = JSON.parse(l) as { ok?: number };
        if (f.ok === undefined) return undefined;
        if (f.ok !== 1) throw new Error(`login failed: ${l.slice(0, 200)}`);
        return name;
      });
    }
    return { conn, id };
  } catch (e) {
    conn.sock.destroy();
    throw e;
  }
}

/** Log `n` connections in, `setupConcurrency` at a time; failed ones are null. */
async function logInAll(n: number): Promise<{ logins: (Login | null)[]; failed: number }> {
  const prefix = "bg" + randomBytes(4).toString("hex") + "_";
  const logins: (Login | null)[] = new Array(n).fill(null);
  let next = 0;
  let failed = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      try {
        // Pairs are (even, odd): recipients are the odd ones.
        logins[i] = await logIn(prefix + i, i % 2 === 1 && cfg.scenario !== "s3" ? (cfg.recvPort ?? cfg.port) : cfg.port);
      } catch (e) {
        failed++;
        if (errorSamples.length < 5) errorSamples.push(`set-up: ${(e as Error).message}`.slice(0, 300));
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(cfg.setupConcurrency, n) }, worker));
  return { logins, failed };
}

// ---- /proc probes ------------------------------------------------------------------

const CLK_TCK = 100;
function serverCpuS(): number {
  try {
    const s = readFileSync(`/proc/${cfg.serverPid}/stat`, "latin1");
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / CLK_TCK; // utime + stime
  } catch {
    return NaN;
  }
}
/** Busy CPU seconds of the whole machine (user + nice + system + irq + softirq). */
function machineBusyS(): number {
  try {
    const f = readFileSync("/proc/stat", "latin1").split("\n", 1)[0].trim().split(/\s+/);
    return (Number(f[1]) + Number(f[2]) + Number(f[3]) + Number(f[6]) + Number(f[7])) / CLK_TCK;
  } catch {
    return NaN;
  }
}
function serverRssKiB(): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${cfg.serverPid}/status`, "latin1"));
    return m ? Number(m[1]) : NaN;
  } catch {
    return NaN;
  }
}

// ---- scenarios ---------------------------------------------------------------------

async function load(base: GenResult, pairs: Pair[]): Promise<GenResult> {
  let gen0 = process.cpuUsage();
  let srv0 = 0;
  let busy0 = 0;
  let wall0 = 0;
  let gen = 0;
  let srv = 0;
  let busy = 0;
  let wall = 0;
  let maxLagUs = 0;
  const tStart = nowUs();
  sending = true;

  let ticker: NodeJS.Timeout | null = null;
  if (cfg.scenario === "s1") {
    for (const p of pairs) p.send(cfg.window, tStart);
  } else {
    const perUs = cfg.rate / 1e6;
    let scheduled = 0;
    let rr = 0;
    ticker = setInterval(() => {
      if (!sending) return;
      const now = nowUs();
      const due = Math.floor((now - tStart) * perUs) - scheduled;
      if (due <= 0) return;
      const lag = now - (tStart + (scheduled + 1) / perUs);
      if (lag > maxLagUs) maxLagUs = lag;
      for (let k = 0; k < due; k++) {
        pairs[rr].send(1, now);
        if (++rr === pairs.length) rr = 0;
      }
      scheduled += due;
    }, 1);
  }

  await sleep(cfg.warmup * 1000);
  measuring = true;
  gen0 = process.cpuUsage();
  srv0 = serverCpuS();
  busy0 = machineBusyS();
  wall0 = nowUs();
  await sleep(cfg.seconds * 1000);
  measuring = false;
  sending = false;
  wall = (nowUs() - wall0) / 1e6;
  const g = process.cpuUsage(gen0);
  gen = (g.user + g.system) / 1e6;
  srv = serverCpuS() - srv0;
  busy = machineBusyS() - busy0;
  if (ticker) clearInterval(ticker);

  // drain: give what is still in flight a moment to arrive (bounded)
  const drainEnd = Date.now() + 3000;
  while (Date.now() < drainEnd && pairs.some((p) => p.inflight > 0 && !p.tx.closed && !p.rx.closed)) await sleep(20);

  const sorted = samples.sorted();
  const pct = (q: number) =>
    sorted.length ? Math.round(sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]) / 1000 : NaN;
  return {
    ...base,
    msgsPerSec: Math.round(deliveredWin / wall),
    sentPerSec: Math.round(sentWin / wall),
    p50Ms: pct(0.5),
    p99Ms: pct(0.99),
    p999Ms: pct(0.999),
    maxMs: sorted.length ? Math.round(sorted[sorted.length - 1]) / 1000 : NaN,
    undelivered: pairs.reduce((a, p) => a + Math.max(0, p.inflight), 0),
    genCpuPct: Math.round((100 * gen) / wall),
    serverCpuPct: Math.round((100 * srv) / wall),
    otherCpuPct: Math.round((100 * (busy - srv - gen)) / wall),
    maxTimerLagMs: Math.round(maxLagUs) / 1000,
    errors,
    closes,
  };
}

async function main(): Promise<void> {
  const rssBefore = serverRssKiB();
  const n = cfg.scenario === "s3" ? cfg.conns : cfg.pairs * 2;
  const t0 = Date.now();
  const { logins, failed } = await logInAll(n);
  const base: GenResult = {
    proto: cfg.proto,
    scenario: cfg.scenario,
    setupOk: logins.filter((l) => l !== null).length,
    setupFailed: failed,
    setupMs: Date.now() - t0,
    errors,
    closes,
    errorSamples,
  };
  let result: GenResult;
  if (cfg.scenario === "s3") {
    await sleep(cfg.settle * 1000);
    const rssAfter = serverRssKiB();
    result = {
      ...base,
      rssBeforeKiB: rssBefore,
      rssAfterKiB: rssAfter,
      kibPerConn: base.setupOk ? Math.round(((rssAfter - rssBefore) / base.setupOk) * 100) / 100 : NaN,
      errors,
      closes,
    };
  } else {
    const pairs: Pair[] = [];
    for (let i = 0; i + 1 < n; i += 2) {
      const tx = logins[i];
      const rx = logins[i + 1];
      if (tx && rx) pairs.push(new Pair(tx.conn, rx.conn, rx.id));
    }
    if (!pairs.length) throw new Error("no pair could log in");
    result = await load(base, pairs);
  }
  closing = true;
  for (const l of logins) l?.conn.sock.destroy();
  process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
}

// a generator never outlives its run by much
setTimeout(() => {
  console.error("bench-gen: run took too long");
  process.exit(3);
}, 600_000).unref();

main().catch((e: unknown) => {
  console.error("bench-gen:", e);
  process.exit(1);
});
