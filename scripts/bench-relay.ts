// Relay benchmark: wirechat against a durable baseline measured in the same run.
//
//   npm run bench:relay -- [--scenarios s1,s2,s2-20k,s3-10k] [--runs 3] [--seconds 10] [--check]
//                          [--node-flags=--max-semi-space-size=64]   (node flags for wirechat only)
//
// The baseline (scripts/baseline-relay.ts) is the cheapest Node server that makes the
// same durability promise as wirechat: it appends every message to LevelDB in
// group-committed, fsync'd batches before forwarding it and acknowledging it to its
// sender. Because machines differ and drift, the targets are ratios to it:
//
//   s1      100 sender→recipient pairs, 32 messages in flight each (until the recipient
//           has it), messages delivered per second over 10 s           wirechat ≥ 0.7 × baseline
//   s2      open loop, 5,000 msg/s over the 100 pairs on a 1 ms schedule, p99 latency  ≤ 1.5 ×
//   s2-20k  the same at 20,000 msg/s                                                   ≤ 1.5 ×
//   s3-10k  10,000 idle logged-in connections (wirechat: registered and authenticated),
//           server RSS growth per connection                                           ≤ 1.5 ×
//
// Every run gets a fresh server (wirechat from dist/src/main.js, or the baseline) on a
// temp data dir, pinned to CPU 0 with taskset, and a fresh load generator
// (scripts/bench-gen.ts) pinned to CPU 1. wirechat and the baseline alternate run by run;
// a load run during which other processes used more than 10 % of a core is redone (up
// to twice --runs attempts in all). Medians over the runs are compared. --check exits 1
// when a ratio misses its bar.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { availableParallelism, tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import type { GenConfig, GenResult } from "./bench-gen.js";
import { freePort } from "./nats-server.js";

const { values: opts } = parseArgs({
  options: {
    scenarios: { type: "string", default: "s1,s2,s2-20k,s3-10k" },
    runs: { type: "string", default: "3" },
    seconds: { type: "string", default: "10" },
    check: { type: "boolean", default: false },
    "node-flags": { type: "string", default: "" },
  },
});
const RUNS = Number(opts.runs);
/** Flags for wirechat's node (README "Memory": the young generation's trade-off); not the baseline's. */
const NODE_FLAGS = (opts["node-flags"] as string).split(/\s+/).filter((f) => f !== "");
const SECONDS = Number(opts.seconds);
const OTHER_MAX = 10; // % of one core used by other processes that voids a load run
const SERVER_CPU = "0";
const GEN_CPU = "1";
const NOFILE = 20000;

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const GEN = fileURLToPath(new URL("./bench-gen.js", import.meta.url));
const BASELINE = fileURLToPath(new URL("./baseline-relay.js", import.meta.url));
const WIRECHAT = path.join(ROOT, "dist", "src", "main.js");

type ServerKind = "wirechat" | "baseline";

interface Scenario {
  label: string;
  gen: Partial<GenConfig>;
  figure: (r: GenResult) => number | undefined;
  higher: boolean;
  bar: number;
}

const SCENARIOS: Record<string, Scenario> = {
  s1: {
    label: "S1 msg/s delivered (100 pairs, 32 in flight)",
    gen: { scenario: "s1", pairs: 100, window: 32 },
    figure: (r) => r.msgsPerSec,
    higher: true,
    bar: 0.7,
  },
  s2: {
    label: "S2 p99 ms at 5,000 msg/s",
    gen: { scenario: "s2", pairs: 100, rate: 5000 },
    figure: (r) => r.p99Ms,
    higher: false,
    bar: 1.5,
  },
  "s2-20k": {
    label: "S2 p99 ms at 20,000 msg/s",
    gen: { scenario: "s2", pairs: 100, rate: 20000 },
    figure: (r) => r.p99Ms,
    higher: false,
    bar: 1.5,
  },
  "s3-10k": {
    label: "S3 KiB per idle connection (10,000)",
    gen: { scenario: "s3", conns: 10000 },
    figure: (r) => r.kibPerConn,
    higher: false,
    bar: 1.5,
  },
};

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---- processes -------------------------------------------------------------------

const haveTaskset = spawnSync("taskset", ["-c", "0", "true"]).status === 0;
const pinning = haveTaskset && availableParallelism() >= 2;
if (!pinning) {
  console.error("warning: no taskset or fewer than 2 CPUs; server and generator are not pinned, figures are less comparable");
}

/** Spawn cmd pinned to `cpu`, with a raised open-files limit; its PID is cmd's own (exec). */
function spawnPinned(cpu: string, cmd: string, args: string[], stdout: "pipe" | number, stderr: "inherit" | number): ChildProcess {
  const script = `ulimit -n ${NOFILE} 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec ${pinning ? `taskset -c ${cpu} ` : ""}"$@"`;
  return spawn("bash", ["-c", script, "bash", cmd, ...args], { cwd: ROOT, stdio: ["ignore", stdout, stderr] });
}


async function waitPort(port: number, proc: ChildProcess, ms: number): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error("server exited during start-up");
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: "127.0.0.1", port });
      s.once("connect", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`server did not open port ${port} within ${ms} ms`);
    await sleep(100);
  }
}

async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once("exit", r));
  proc.kill("SIGTERM");
  const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(t);
}

function startServer(kind: ServerKind, port: number, dir: string, log: number): ChildProcess {
  const data = path.join(dir, "data");
  const args =
    kind === "wirechat"
      ? [...NODE_FLAGS, WIRECHAT, "--host", "127.0.0.1", "--port", String(port), "--data-dir", data, "--log-level", "warn",
         "--max-per-address", "100000", "--max-connections", "100000", "--bcrypt-cost", "4", "--admin-port", "0"]
      : [BASELINE, "--host", "127.0.0.1", "--port", String(port), "--data-dir", data];
  return spawnPinned(SERVER_CPU, process.execPath, args, log, log);
}

function runGenerator(cfg: GenConfig): Promise<GenResult> {
  return new Promise((resolve, reject) => {
    const child = spawnPinned(GEN_CPU, process.execPath, [GEN, JSON.stringify(cfg)], "pipe", "inherit");
    let out = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
    const killer = setTimeout(() => child.kill("SIGKILL"), 300_000);
    child.once("exit", (code) => {
      clearTimeout(killer);
      const last = out.trim().split("\n").pop() ?? "";
      try {
        resolve(JSON.parse(last) as GenResult);
      } catch {
        reject(new Error(`load generator exited ${code} without a result`));
      }
    });
  });
}

// ---- runs --------------------------------------------------------------------------

interface Run {
  result?: GenResult;
  error?: string;
}

async function oneRun(kind: ServerKind, scen: Scenario): Promise<Run> {
  const dir = mkdtempSync(path.join(tmpdir(), `wirechat-bench-${kind}-`));
  const logPath = path.join(dir, "server.log");
  const log = openSync(logPath, "w");
  const port = await freePort();
  const server = startServer(kind, port, dir, log);
  const run: Run = {};
  try {
    await waitPort(port, server, 20_000);
    await sleep(500);
    const cfg: GenConfig = {
      proto: kind,
      port,
      serverPid: server.pid!,
      scenario: "s1",
      pairs: 100,
      window: 32,
      rate: 5000,
      seconds: SECONDS,
      warmup: 2,
      conns: 10000,
      setupConcurrency: 32,
      settle: 2,
      bodySize: 100,
      timeoutMs: 30_000,
      ...scen.gen,
    };
    run.result = await runGenerator(cfg);
    if (server.exitCode !== null || server.signalCode !== null) run.error = "the server exited during the run";
  } catch (e) {
    run.error = (e as Error).message;
  }
  await stop(server);
  closeSync(log);
  if (run.error) {
    const tail = readFileSync(logPath, "utf8").slice(-800).trim();
    if (tail) run.error += `; server log: ${tail}`;
  }
  rmSync(dir, { recursive: true, force: true });
  return run;
}

const failedRun = (r: Run) => !!r.error || !r.result || r.result.setupFailed > 0;
const disturbed = (r: Run) => (r.result?.otherCpuPct ?? 0) > OTHER_MAX;

function describe(r: Run): string {
  if (!r.result) return `ERROR ${r.error}`;
  const x = r.result;
  const parts: string[] = [];
  if (x.kibPerConn !== undefined) {
    parts.push(`${x.kibPerConn} KiB/conn (RSS ${x.rssBeforeKiB} -> ${x.rssAfterKiB} KiB), ${x.setupOk} logged in in ${x.setupMs} ms`);
  } else {
    parts.push(
      `${x.msgsPerSec} msg/s delivered (sent ${x.sentPerSec}/s), p50 ${x.p50Ms} p99 ${x.p99Ms} max ${x.maxMs} ms;` +
        ` CPU server ${x.serverCpuPct}% generator ${x.genCpuPct}% other ${x.otherCpuPct}%; undelivered ${x.undelivered}`,
    );
  }
  if (x.setupFailed) parts.push(`${x.setupFailed} failed to log in`);
  if (x.errors || x.closes) parts.push(`errors ${x.errors}, closes ${x.closes}`);
  if (x.errorSamples.length) parts.push(`e.g. ${x.errorSamples.slice(0, 2).join(" | ")}`);
  if (r.error) parts.push(`ERROR ${r.error}`);
  return parts.join("; ");
}

/** The lower median, as the steering benchmark takes it. */
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)];
}

async function main(): Promise<void> {
  const names = opts.scenarios.split(",").map((s) => s.trim()).filter(Boolean);
  for (const n of names) {
    if (!SCENARIOS[n]) throw new Error(`unknown scenario ${n} (known: ${Object.keys(SCENARIOS).join(", ")})`);
  }
  const lines: string[] = [];
  let missed = 0;
  for (const name of names) {
    const scen = SCENARIOS[name];
    const runs: Record<ServerKind, Run[]> = { wirechat: [], baseline: [] };
    const attempts: Record<ServerKind, number> = { wirechat: 0, baseline: 0 };
    for (let round = 0; ; round++) {
      // alternate which server goes first, so drift over the run hits both alike
      const order: ServerKind[] = round % 2 === 0 ? ["wirechat", "baseline"] : ["baseline", "wirechat"];
      let any = false;
      for (const kind of order) {
        if (runs[kind].length >= RUNS || attempts[kind] >= RUNS * 2) continue;
        any = true;
        attempts[kind]++;
        const r = await oneRun(kind, scen);
        const tag = `${kind} ${name} run ${attempts[kind]}`;
        if (disturbed(r)) {
          console.error(`${tag}: other processes used ${r.result!.otherCpuPct}% CPU; not counted (${describe(r)})`);
          continue;
        }
        console.error(`${tag}: ${describe(r)}`);
        runs[kind].push(r);
        await sleep(300);
      }
      if (!any) break;
    }
    const fig = (kind: ServerKind) => {
      const v = runs[kind].filter((r) => r.result).map((r) => scen.figure(r.result!)).filter((x): x is number => Number.isFinite(x));
      return v.length ? median(v) : undefined;
    };
    const w = fig("wirechat");
    const b = fig("baseline");
    const wFailed = runs.wirechat.filter(failedRun).length;
    if (w === undefined || b === undefined || wFailed > 0 || runs.baseline.some(failedRun)) {
      missed++;
      lines.push(`${scen.label} | ${w ?? "no result"}${wFailed ? ` (${wFailed} failed runs)` : ""} | ${b ?? "no result"} | - | FAIL`);
      continue;
    }
    const ratio = w / b;
    const ok = scen.higher ? ratio >= scen.bar : ratio <= scen.bar;
    if (!ok) missed++;
    lines.push(`${scen.label} | ${w} | ${b} | ${ratio.toFixed(2)} | ${scen.higher ? ">=" : "<="} ${scen.bar} ${ok ? "ok" : "FAIL"}`);
  }
  if (NODE_FLAGS.length > 0) console.log(`wirechat ran as: node ${NODE_FLAGS.join(" ")} dist/src/main.js …`);
  console.log("scenario | wirechat | baseline (durable relay) | wirechat/baseline | bar");
  for (const l of lines) console.log(l);
  console.log(`${names.length - missed} of ${names.length} within their bars`);
  if (opts.check && missed) process.exitCode = 1;
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
