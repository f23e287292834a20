// Shared by scripts/fuzz.ts and scripts/soak.ts: flags with defaults and --help, the
// server under test (a child started here, whose log is watched for level >= 50 and
// whose VmRSS and open descriptors are sampled from /proc, or an external one), a
// line-splitting socket, and the canary connection that round-trips ping.

import { readFileSync, readdirSync, rmSync } from "node:fs";
import net from "node:net";
import { parseArgs } from "node:util";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { rssKiB, rssSplitKiB, startServer, type Server } from "./bench-lib.js";
import { NdjsonSplitter } from "../src/client/ndjson.js";

// ---- flags -------------------------------------------------------------------------

export interface FlagSpec {
  [name: string]: { default: string; help: string };
}

/** Parses `--name value` flags; `--help` prints `usage` and every flag, then exits. */
export function flags<S extends FlagSpec>(usage: string, spec: S): { [K in keyof S]: string } {
  const options: Record<string, { type: "string"; default: string }> = {};
  for (const [k, v] of Object.entries(spec)) options[k] = { type: "string", default: v.default };
  let values: Record<string, unknown>;
  try {
    ({ values } = parseArgs({ options: { ...options, help: { type: "boolean" } }, strict: true }));
  } catch (err) {
    process.stderr.write(`${(err as Error).message} (see --help)\n`);
    process.exit(2);
  }
  if (values.help) {
    const lines = [usage, "", "Flags (--name value):"];
    for (const [k, v] of Object.entries(spec)) {
      lines.push(`  --${k.padEnd(18)} ${v.help}`);
      lines.push(`  ${"".padEnd(20)} default: ${v.default === "" ? "(none)" : v.default}`);
    }
    process.stdout.write(lines.join("\n") + "\n");
    process.exit(0);
  }
  return values as { [K in keyof S]: string };
}

/** A flag's value as a number, or exit 2. */
export function num(v: string, name: string, min = 0): number {
  const n = Number(v);
  if (v === "" || !Number.isFinite(n) || n < min) {
    process.stderr.write(`--${name}: expected a number >= ${min}, got '${v}'\n`);
    process.exit(2);
  }
  return n;
}

// ---- the server under test -----------------------------------------------------------

export interface LogFinding {
  level: number;
  msg: string;
  line: string;
}

export class ServerUnderTest {
  /** Log lines at level >= 50 (the first 20 kept in full). */
  readonly severe: LogFinding[] = [];
  severeCount = 0;
  /** Count of log lines per level-40 message. */
  readonly warnings = new Map<string, number>();
  exit: { code: number | null; signal: string | null } | undefined;
  private stderrTail = "";

  private constructor(
    readonly host: string,
    readonly port: number,
    readonly pid: number | undefined,
    private readonly child: Server | undefined,
  ) {}

  /** Starts `node dist/src/main.js` on a free port with a temp data dir. */
  static async start(extra: string[]): Promise<ServerUnderTest> {
    let self: ServerUnderTest | undefined;
    const early: string[] = [];
    const onLog = (line: string) => (self ? self.onLog(line) : early.push(line));
    const child = await startServer(extra, { onLog, stderr: "pipe" });
    self = new ServerUnderTest("127.0.0.1", child.port, child.proc.pid, child);
    for (const l of early) self.onLog(l);
    const s = self;
    child.proc.stderr!.on("data", (d: Buffer) => (s.stderrTail = (s.stderrTail + d.toString()).slice(-4000)));
    child.proc.on("exit", (code, signal) => (s.exit = { code, signal }));
    // never leave the server behind, however this process ends
    process.on("exit", () => {
      if (!s.exit) child.proc.kill("SIGKILL");
    });
    for (const sig of ["SIGINT", "SIGTERM"] as const) process.once(sig, () => process.exit(130));
    return self;
  }

  static external(host: string, port: number, pid: number | undefined): ServerUnderTest {
    return new ServerUnderTest(host, port, pid, undefined);
  }

  /** The server the common flags name: --host/--port (and --pid) of a running one, else one started with --server's flags. */
  static fromFlags(f: { host: string; port: string; pid: string; server: string }): Promise<ServerUnderTest> {
    if (f.host === "" && f.port === "") return ServerUnderTest.start(f.server.split(/\s+/).filter(Boolean));
    if (f.port === "") throw new Error("--host needs --port");
    const pid = f.pid === "" ? undefined : num(f.pid, "pid", 1);
    return Promise.resolve(ServerUnderTest.external(f.host || "127.0.0.1", num(f.port, "port", 1), pid));
  }

  /** The problem with the log, if a line reached level 50. */
  severeProblem(): string | undefined {
    if (this.severeCount === 0) return undefined;
    return `${this.severeCount} server log line(s) at level >= 50, e.g.:\n    ${this.severe.slice(0, 5).map((s) => s.line).join("\n    ")}`;
  }

  get spawned(): boolean {
    return this.child !== undefined;
  }

  private onLog(line: string): void {
    const m = /"level":(\d+)/.exec(line);
    if (!m) return;
    const level = Number(m[1]);
    if (level < 40) return;
    let msg = "?";
    try {
      msg = String(JSON.parse(line).msg);
    } catch {
      // not JSON: keep "?"
    }
    if (level >= 50) {
      this.severeCount++;
      if (this.severe.length < 20) this.severe.push({ level, msg, line: line.slice(0, 2000) });
    } else {
      this.warnings.set(msg, (this.warnings.get(msg) ?? 0) + 1);
    }
  }

  /** VmRSS in KiB, or NaN when unknown (an external server without --pid). */
  rssKiB(): number {
    if (this.pid === undefined || this.exit) return NaN;
    try {
      return rssKiB(this.pid);
    } catch {
      return NaN;
    }
  }

  /** RssAnon and RssFile in KiB, or NaN. */
  rssSplitKiB(): { anon: number; file: number } {
    if (this.pid === undefined || this.exit) return { anon: NaN, file: NaN };
    try {
      return rssSplitKiB(this.pid);
    } catch {
      return { anon: NaN, file: NaN };
    }
  }

  /** CPU seconds the server process has used (user + system), or NaN. */
  cpuSeconds(): number {
    if (this.pid === undefined || this.exit) return NaN;
    try {
      const stat = readFileSync(`/proc/${this.pid}/stat`, "utf8");
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
    } catch {
      return NaN;
    }
  }

  /** Open descriptors of the server process, or NaN. */
  fds(): number {
    if (this.pid === undefined || this.exit) return NaN;
    try {
      return readdirSync(`/proc/${this.pid}/fd`).length;
    } catch {
      return NaN;
    }
  }

  /** How the child exited, if it has (a method, so that it is read afresh). */
  exitStatus(): { code: number | null; signal: string | null } | undefined {
    return this.exit;
  }

  /** What the child printed on stderr last (a crash's stack trace). */
  stderr(): string {
    return this.stderrTail;
  }

  /**
   * SIGTERM, then wait up to `timeoutMs` for the exit; past it SIGKILL. Returns the
   * problem, if any (shutdown too slow, non-zero exit). Removes the temp data dir.
   */
  async stop(timeoutMs: number): Promise<string | undefined> {
    const child = this.child;
    if (!child) return undefined;
    let problem: string | undefined;
    if (!this.exit) {
      const exited = new Promise<void>((r) => child.proc.once("exit", () => r()));
      child.proc.kill("SIGTERM");
      const done = await Promise.race([exited.then(() => true), sleep(timeoutMs).then(() => false)]);
      if (!done) {
        problem = `the server did not exit within ${timeoutMs / 1000} s of SIGTERM; killed`;
        child.proc.kill("SIGKILL");
        await exited;
      } else {
        const e = this.exitStatus();
        if (e && e.code !== 0) problem = `the server exited with ${describeExit(e)} after SIGTERM`;
      }
    }
    rmSync(child.dir, { recursive: true, force: true });
    return problem;
  }
}

export function describeExit(e: { code: number | null; signal: string | null }): string {
  return e.signal ? `signal ${e.signal}` : `code ${e.code}`;
}

// ---- sockets -----------------------------------------------------------------------

/** A socket whose input is split into lines (Buffers, without the '\n'). */
export class LineSocket {
  readonly sock: net.Socket;
  /** The client library's splitter: one way of cutting the server's output into frames. */
  private readonly lines = new NdjsonSplitter();
  onLine: (line: Buffer) => void = () => {};
  closed = false;
  /** Set when the socket saw an error (ECONNRESET, …) before closing. */
  error: string | undefined;
  readonly ready: Promise<void>;
  readonly done: Promise<void>;

  constructor(host: string, port: number) {
    this.sock = net.connect({ host, port, noDelay: true });
    this.ready = new Promise((resolve, reject) => {
      this.sock.once("connect", resolve);
      this.sock.once("error", reject);
    });
    this.ready.catch(() => {});
    this.done = new Promise((resolve) =>
      this.sock.on("close", () => {
        this.closed = true;
        resolve();
      }),
    );
    this.sock.on("error", (e: NodeJS.ErrnoException) => (this.error = e.code ?? e.message));
    this.sock.on("data", (chunk: Buffer) => this.onData(chunk));
  }

  write(b: Buffer | string): void {
    if (!this.closed && !this.sock.destroyed) this.sock.write(b);
  }

  private onData(chunk: Buffer): void {
    for (const line of this.lines.pushBytes(chunk)) this.onLine(line);
  }
}

/** The value of "action" at the start of a server frame, without parsing it all. */
export function actionOf(line: Buffer): string {
  // Every server frame starts with {"action":"<name>"; names are escaped JSON strings.
  const PREFIX = 11; // {"action":"
  let j = PREFIX;
  while (j < line.length && line[j] !== 0x22) j += line[j] === 0x5c ? 2 : 1;
  const raw = line.toString("utf8", PREFIX, j);
  return raw.includes("\\") ? (JSON.parse(`"${raw}"`) as string) : raw;
}

// ---- the canary --------------------------------------------------------------------

/** One connection that round-trips ping every `intervalMs`, one at a time. */
/** The canary's connection and ping loop; runs in its own worker thread (see Canary). */
class CanaryProbe {
  private conn: LineSocket | undefined;
  private sentAt = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Where each figure goes (the worker posts it to the main thread). */
  report: (m: CanaryReport) => void = () => {};

  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly intervalMs: number,
    private readonly timeoutMs = 10_000,
  ) {}

  async start(): Promise<void> {
    const c = new LineSocket(this.host, this.port);
    this.conn = c;
    await c.ready;
    let welcomed = false;
    c.onLine = (line) => {
      if (!welcomed) {
        welcomed = true;
        this.schedule(0);
        return;
      }
      if (this.sentAt > 0 && line.includes('"action":"ping"')) {
        const ms = performance.now() - this.sentAt;
        this.sentAt = 0;
        this.report({ kind: "latency", ms });
        this.schedule(this.intervalMs);
      }
    };
    void c.done.then(() => {
      if (this.stopped) return;
      this.report({ kind: "closed", problem: `the server closed the canary connection (${c.error ?? "FIN"})` });
      clearTimeout(this.timer);
      setTimeout(() => void this.start().catch(() => {}), 100);
    });
  }

  private schedule(ms: number): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.ping(), ms);
  }

  private ping(): void {
    if (this.stopped || !this.conn || this.conn.closed) return;
    if (this.sentAt > 0) {
      // still waiting: a timeout
      this.report({ kind: "timeout", ms: this.timeoutMs, problem: `a canary ping got no reply within ${this.timeoutMs} ms` });
    }
    this.sentAt = performance.now();
    this.conn.write('{"action":"ping"}\n');
    this.timer = setTimeout(() => this.ping(), this.timeoutMs);
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.conn?.sock.destroy();
  }
}

type CanaryReport =
  | { kind: "ready" }
  | { kind: "latency"; ms: number }
  | { kind: "timeout"; ms: number; problem: string }
  | { kind: "closed"; problem: string };

/**
 * A connection that round-trips `ping` every intervalMs and records the latency. It runs
 * in a worker thread of its own: measured from the load's own event loop, every pause of
 * the load generator (its GC over the ids it tracks grows with the run) would be
 * counted as the server's.
 */
export class Canary {
  private worker: Worker | undefined;
  /** Latencies in ms since the last takeWindow(). */
  private window: number[] = [];
  readonly all: number[] = [];
  /** Pings that got no reply within timeoutMs, and connections the server closed. */
  timeouts = 0;
  closes = 0;
  problems: string[] = [];

  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly intervalMs: number,
    private readonly timeoutMs = 10_000,
  ) {}

  start(): Promise<void> {
    const worker = new Worker(new URL(import.meta.url), {
      workerData: { canary: { host: this.host, port: this.port, intervalMs: this.intervalMs, timeoutMs: this.timeoutMs } },
    });
    this.worker = worker;
    return new Promise((resolve, reject) => {
      worker.once("error", reject);
      worker.on("message", (m: CanaryReport) => {
        if (m.kind === "ready") return resolve();
        if (m.kind === "latency" || m.kind === "timeout") {
          this.window.push(m.ms);
          this.all.push(m.ms);
        }
        if (m.kind === "timeout") this.timeouts++;
        if (m.kind === "closed") this.closes++;
        if (m.kind !== "latency" && this.problems.length < 5) this.problems.push(m.problem);
      });
    });
  }

  /** The latencies since the last call. */
  takeWindow(): number[] {
    const w = this.window;
    this.window = [];
    return w;
  }

  stop(): void {
    void this.worker?.terminate();
  }
}

if (!isMainThread && (workerData as { canary?: unknown } | null)?.canary) {
  const o = (workerData as { canary: { host: string; port: number; intervalMs: number; timeoutMs: number } }).canary;
  const probe = new CanaryProbe(o.host, o.port, o.intervalMs, o.timeoutMs);
  probe.report = (m) => parentPort!.postMessage(m);
  void probe.start().then(() => parentPort!.postMessage({ kind: "ready" } satisfies CanaryReport));
}

// ---- figures -----------------------------------------------------------------------

export function percentile(xs: readonly number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = Float64Array.from(xs).sort();
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

/** Largest and smallest of many numbers (spreading a long array into Math.max overflows the stack). */
export function maxOf(xs: readonly number[]): number {
  let m = -Infinity;
  for (const x of xs) if (x > m) m = x;
  return m;
}
export function minOf(xs: readonly number[]): number {
  let m = Infinity;
  for (const x of xs) if (x < m) m = x;
  return m;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export const mib = (kib: number) => (Number.isFinite(kib) ? `${(kib / 1024).toFixed(1)} MiB` : "n/a");

export const ms = (v: number) => (Number.isFinite(v) ? `${v < 10 ? v.toFixed(2) : v.toFixed(1)} ms` : "n/a");
export const pct = (v: number) => (Number.isFinite(v) ? `${v.toFixed(0)} %` : "n/a");

/** The run's seed: --seed, else one made up (and printed by the caller). */
export function seedOf(flag: string): number {
  return flag === "" ? (Date.now() ^ (process.pid << 16)) >>> 0 : num(flag, "seed");
}

/** Random choices from one seeded PRNG. */
export function chooser(seed: number) {
  const rand = rng(seed);
  return {
    rand,
    pick: <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)],
    chance: (p: number) => rand() < p,
    int: (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1)),
  };
}

/** A small seeded PRNG (mulberry32), so a failing run can be repeated with its seed. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The machine's CPU time so far in clock ticks, and the part of it the hypervisor gave
 * to others while this machine's CPUs wanted to run ("steal", /proc/stat): on a shared
 * virtual machine, latency measured in a window with much steal is the host's, not the
 * server's. Zeros where /proc/stat is not there.
 */
export function machineTicks(): { total: number; steal: number } {
  try {
    const cpu = readFileSync("/proc/stat", "utf8").split("\n", 1)[0].trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is counted in user)
    return { total: cpu.slice(0, 8).reduce((a, b) => a + b, 0), steal: cpu[7] ?? 0 };
  } catch {
    return { total: 0, steal: 0 };
  }
}

/** Percent of the machine's CPU time stolen between two machineTicks() readings (NaN if unknown). */
export function stealPct(a: { total: number; steal: number }, b: { total: number; steal: number }): number {
  return b.total > a.total ? ((b.steal - a.steal) / (b.total - a.total)) * 100 : NaN;
}
