// The program behind the entry point (main.ts): `wirechat [serve] [options]` runs the
// server; the other commands (`wirechat help`) operate it or chat with it.

import os from "node:os";
import v8 from "node:v8";
import { MessageChannel } from "node:worker_threads";
import { COMMAND_HELP, COMMANDS, runCommand } from "./cli/commands.js";
import { ConfigError, helpText, packageVersion, parseArgs, type ParsedArgs } from "./config.js";
import { startServer, type RunningServer } from "./server.js";
import { CompactionCatchUp, ThreadPriority } from "./thread-priority.js";
import { repeated, takeEarlySignals } from "./early-signals.js";
import { startIdleCollector, type IdleCollector } from "./idle-gc.js";

async function serve(argv: string[]): Promise<void> {
  let parsed: ParsedArgs;
  try {
    parsed = parseArgs(argv, process.env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`wirechat: ${err.message}\n`);
    process.exit(2);
  }
  if (parsed.help) {
    process.stdout.write(helpText(COMMANDS) + "\n");
    return;
  }
  if (parsed.version) {
    process.stdout.write(`wirechat ${packageVersion()}\n`);
    return;
  }
  // The handlers come first: a signal that arrives while the server starts (or right
  // after its "listening" line) stops it once it is up, never by node's default, or
  // ends a cluster node's catch-up with the log.
  let server: RunningServer | undefined;
  let priority: ThreadPriority | undefined;
  let catchUp: CompactionCatchUp | undefined;
  let idle: IdleCollector | undefined;
  let stopping: string | undefined;
  // A signal before the server is up ends a cluster node's catch-up with the log (what
  // it applied is kept; the next start goes on from there).
  const starting = new AbortController();
  const stop = (signal: string, running: RunningServer) => {
    const log = running.services.log;
    log.info({ signal }, "shutting down");
    priority?.stop();
    catchUp?.stop();
    idle?.stop();
    running.stop().then(
      () => process.exit(0),
      (err) => {
        log.error({ err }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  let stoppingAt = 0;
  const shutdown = (signal: string) => {
    if (stopping) {
      // The same signal again at once is the same request, delivered twice (repeated).
      if (repeated(signal, stopping, stoppingAt)) return;
      // The second signal: the operator does not want to wait.
      server?.services.log.warn({ signal }, "second signal: exiting now, without finishing the shutdown");
      process.exit(1);
    }
    stopping = signal;
    stoppingAt = Date.now();
    if (server) stop(signal, server);
    else starting.abort(new Error(`stopped by ${signal} before the server was up`));
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
  // SIGHUP reloads (the config file's reloadable settings, the TLS certificate); it
  // never stops the server (before it is up, it is ignored), and a bad file leaves
  // everything as it was.
  process.on("SIGHUP", () => {
    if (!server) return;
    try {
      server.reload(parseArgs(argv, process.env).config);
    } catch (err) {
      server.services.log.error({ err: err instanceof ConfigError ? err.message : err }, "reload failed; the settings are unchanged");
    }
  });
  // A stop signal that came while the modules loaded (main.ts) counts as one now.
  const early = takeEarlySignals();
  if (early !== undefined) {
    shutdown(early.signal);
    stoppingAt = early.at;
  }
  boundHeapGrowth(parsed.config.heapGrowth);
  noPretenuring();
  const scavengeAlone = scavengeOnLoopAlone();
  keepFreedMallocMemory();
  try {
    server = await startServer(parsed.config, undefined, starting.signal);
  } catch (err) {
    if (err !== starting.signal.reason) throw err;
    process.stderr.write(`wirechat: ${(starting.signal.reason as Error).message}; what it had applied of the cluster log is kept\n`);
    process.exit(0);
  }
  const log = server.services.log;
  // Stopped for storage that refuses writes: a failure exit, which the service manager
  // restarts (systemd's Restart=on-failure, docker's on-failure policy).
  void server.failed.then(() => {
    priority?.stop();
    catchUp?.stop();
    process.exit(1);
  });
  idle = startIdleCollector(parsed.config.idleGc, log);
  if (scavengeAlone) log.info({ cpus: 1, parallelScavenge: false, concurrentArrayBufferSweeping: false }, "one CPU to run on: young-generation collections run on the event loop alone");
  // The process is ours: its background threads yield the core to the event loop.
  priority = new ThreadPriority(parsed.config.backgroundNice, log);
  const lowering = priority.start();
  // Lowered, LevelDB's compaction can fall behind a sustained load: it gets the loop's
  // priority back while it is (thread-priority.ts).
  const storage = server.services.storage;
  catchUp = new CompactionCatchUp(() => storage.level0Tables(), priority, log);
  void lowering.then((on) => (on ? catchUp?.start() : undefined));
  // LevelDB's background thread, started now, is lowered with the others (Storage.startBackgroundThread).
  storage.startBackgroundThread().then(
    () => lowering.then((on) => (on ? priority?.scan() : undefined)),
    (err: unknown) => log.warn({ err }, "could not start the database's background thread early"),
  );
  if (stopping) stop(stopping, server);
}

/**
 * How far V8 lets the heap grow past the live data before its next full collection.
 * Left to itself it allows up to 4x after a quick collection: under the soak's mixed
 * load (seed 20261203) the server keeps 27-29 MiB live after each mark-compact, and the
 * heap grew to 95-170 MiB between them, so RSS swung by 100 MiB with nothing leaking;
 * after S3's 10,000 logins the old generation held 56-84 MiB depending on when its last
 * full collection came (5.5-9.3 KiB of RSS per idle connection over 19 runs). At 20 %
 * S3 measured 5.1-6.3 KiB (12 runs). Since pretenuring is off (noPretenuring) the
 * price is small: S1's throughput unchanged (alternated pairs; 17 full collections in
 * a run instead of 5), S2's p99 at 5,000 msg/s unchanged (six pairs), but at 20,000
 * msg/s one or two more full collections per run, 5-9 ms pauses, and the slowest
 * delivery 35-40 ms in all four runs against 13-33. So the default leaves V8's
 * choice and --heap-growth is the operator's trade of latency under heavy load for
 * flat memory. V8 reads this flag at every full collection, so setting it at start-up
 * takes effect (measured: a 20 MiB live set with a promotion-heavy churn peaks at 86
 * MiB with 20 %, 125 MiB without). Only the process's own entry point does this: an
 * embedding program's heap is its own.
 */
function boundHeapGrowth(percent: number): void {
  if (percent > 0) v8.setFlagsFromString(`--heap-growing-percent=${percent}`);
}

/**
 * V8 watches each allocation site and, when most of what it allocated is still alive
 * at a scavenge, "pretenures" it: its objects go to the old generation at once, or at
 * their first survival. A message in flight (its request, record, text and commit
 * waiter) is alive at almost every scavenge under load, because a batch gathers while
 * the previous one is written, and dead a few tens of milliseconds later: exactly the
 * pattern pretenuring mistakes for long-lived data. Under S1 (server pinned to one
 * core, --trace-gc-nvp, 12 s): with it, 282-298 bytes promoted per delivered message,
 * scavenges of 6.0-6.7 ms, 1.52-1.64 µs of scavenge pause per message; without it, 27-29
 * bytes, 2.2-3.3 ms, 0.55-0.79 µs, and 122-160 k msg/s delivered against 111-128 k in
 * the runs alongside. At 20,000 msg/s, where batches are small, the scavenges cost the
 * same either way (0.98 against 1.20 µs per message, 60 bytes promoted each). Setting
 * it here at start-up takes effect (the 160 k run and the 20,000 msg/s figures were
 * made so; the 122 k one with the flag on node's command line). Only the process's own
 * entry point does this (as boundHeapGrowth).
 */
function noPretenuring(): void {
  v8.setFlagsFromString("--no-allocation-site-pretenuring");
}

/**
 * With one CPU to run on (a cpuset, taskset, or a one-core machine), V8's parallel
 * scavenge only makes the event loop wait: the loop stops, hands part of the young
 * generation to a helper thread, and waits for it, but the helper can only run on the
 * loop's own CPU, behind the pool's threads and at the background's lower priority
 * (thread-priority.ts). Measured with --trace-gc-nvp under S2 (5,000 msg/s, server
 * pinned to one core): each scavenge kept 150-470 KB alive, work of well under a
 * millisecond, yet paused the loop 1.4-15.7 ms (4-5 ms typically), almost all of it
 * waiting for the helper (its time matched the pause), at one scavenge every 0.4 s:
 * about 1 % of the time, enough to set the p99 delivery latency. On the loop alone the
 * same load's scavenges paused 1.4-4.4 ms (2-3 ms typically). The same holds for the
 * buffers a scavenge frees (every socket read is one): swept by a helper, the loop
 * waited for it at the next scavenge. S2 runs, six sweeping on the loop (two with the
 * flag set here, four on node's command line) against four with V8's helper: time
 * spent sweeping 24-28 ms against 36-67 ms per run, all scavenge pauses 155-165 ms
 * against 183-211 ms, the longest 9.5-14.0 ms against 13.9-23.7 ms. S1, ten
 * alternated pairs: 12.0-17.2 µs of server CPU per message (mean 15.4) on the loop
 * against 10.0-18.3 (mean 14.6) with the helper, a spread that shows no difference on
 * this host (steal 0-35 % during them). V8 reads both flags at every scavenge, so
 * setting them at start-up takes effect (measured: the same figures as on node's
 * command line). More CPUs keep V8's defaults. Only the process's own entry point
 * does this (as boundHeapGrowth).
 */
function scavengeOnLoopAlone(): boolean {
  if (os.availableParallelism() > 1) return false;
  v8.setFlagsFromString("--no-parallel-scavenge");
  v8.setFlagsFromString("--no-concurrent-array-buffer-sweeping");
  return true;
}

/** glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit). */
const MMAP_THRESHOLD_MAX = 32 * 1024 * 1024;

/**
 * LevelDB's write buffer (storage/db.ts, 64 MiB) is filled 4 KiB block by block from
 * libuv's pool threads, each with a glibc arena of its own. When a full buffer has
 * been written out as a table and freed, glibc gives the freed top of each arena back
 * to the kernel (its trim threshold is 128 KiB until something raises it), so the next
 * buffer grows the arenas again: one mprotect and one page fault per block, every
 * block. Under S1 (server pinned to one core, `perf stat`) that was 6,500 page faults
 * a second against the baseline relay's 450, and the faults, sysmalloc and the pages
 * they clear took 6.5 % of the server's CPU samples (370 of 5,700, all on the pool
 * threads). glibc raises its thresholds by itself when a block it had mapped on its
 * own is freed: the mmap threshold becomes that block's size and the trim threshold
 * twice that (mallopt(3), "M_MMAP_THRESHOLD"). Freeing one block just under the
 * maximum at start-up puts them at ~32 and ~64 MiB, so a freed write buffer stays in
 * its arenas for the next one, as MALLOC_TRIM_THRESHOLD_ would (which only works in
 * the environment before the process starts). Measured under S1: page faults 29,500
 * and 32,900 per 5 s -> 20,500 and 21,000 (MALLOC_TRIM_THRESHOLD_=256 MiB: 20,300),
 * and with the environment variable 2.8 % fewer CPU samples per message. The cost is
 * memory kept rather than returned: what LevelDB freed, up to ~64 MiB per arena,
 * stays in the process for its next write buffer, and so does what the event loop
 * freed (S3, 10,000 idle connections after their logins: 5.35 / 5.41 -> 5.75 / 5.74
 * KiB of RSS per connection; a 16 MiB block, trim threshold 32 MiB, kept more: 7.3).
 * The block is never touched (no resident pages) and is freed by a transfer to a
 * closed port, which frees its memory with free() as the port is closed. Only on
 * glibc, and only the process's own entry point does this (as boundHeapGrowth).
 */
function keepFreedMallocMemory(): void {
  if (process.platform !== "linux") return;
  const header = (process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header;
  if (header?.glibcVersionRuntime === undefined) return;
  const block = Buffer.allocUnsafeSlow(MMAP_THRESHOLD_MAX - 64 * 1024);
  const { port1, port2 } = new MessageChannel();
  port2.close();
  port1.postMessage(block.buffer, [block.buffer]);
  port1.close();
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const command = argv[0];
  if (command === undefined || command.startsWith("-") || command === "serve") {
    return serve(command === "serve" ? argv.slice(1) : argv);
  }
  if (command === "help") {
    if (argv.includes("--version") || argv.includes("-v")) {
      process.stdout.write(`wirechat ${packageVersion()}\n`);
      return;
    }
    process.stdout.write(argv[1] === undefined || argv[1] === "serve" ? `${helpText(COMMANDS)}\n\n${COMMAND_HELP}\n` : `${COMMAND_HELP}\n`);
    return;
  }
  if (command === "chat") {
    const { chatCommand } = await import("./cli/chat.js");
    process.exitCode = await chatCommand(argv.slice(1));
    return;
  }
  if (!(COMMANDS as readonly string[]).includes(command)) {
    process.stderr.write(`wirechat: unknown command '${command}' (see wirechat help)\n`);
    process.exit(2);
  }
  try {
    process.exitCode = await runCommand(command, argv.slice(1));
  } catch (err) {
    process.stderr.write(`wirechat ${command}: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = err instanceof ConfigError ? 2 : 1;
  }
}

main().catch((err) => {
  // A start-up failure says why, and what caused it (a locked database, a port in use).
  // (Once: a message that already says it, as a cluster join's refusal does, is not told it again.)
  const cause = err instanceof Error && err.cause instanceof Error && !err.message.includes(err.cause.message) ? ` (${err.cause.message})` : "";
  process.stderr.write(`wirechat: ${err instanceof Error ? err.message : String(err)}${cause}\n`);
  process.exit(1);
});
