// The event loop and its I/O pool before the other background threads.
//
// Every client is served by one thread, the event loop; the rest of the process works
// for it. libuv's pool runs the loop's I/O: LevelDB's batch writes (every message's
// group commit) and reads, and file work for attachments. The other threads are
// background proper: the password-hashing threads (features/password-hasher.ts),
// LevelDB's compaction thread and V8's garbage-collection helpers. When they share a
// core with the loop (one core, or more runnable threads than cores) the kernel gives
// each runnable thread an equal share, so a burst of logins or a compaction stretches
// the latency of every request, a ping included. Raising their nice value (as RocksDB
// lowers its compaction threads' priority) gives the loop most of the core whenever it
// has work (how soon it gets it back depends on the scheduler: below); they run in the
// time it leaves, and never starve: at nice 10 a thread still gets about a tenth of a
// core the loop saturates (weights 110 against 1024).
//
// The pool stays at the loop's priority: a commit is on the path of every message, so
// a pool thread that yields to a busy loop holds the acknowledgements and deliveries
// the loop is waiting to send. Measured with the pool at nice 10 (S1, server and load
// pinned to one core each): each group-commit write took 20 ms for ~900 messages, of
// which fsync was ~6 ms, the loop sat idle 25 % of the time waiting for it, and S1 was
// 0.53-0.56 of the baseline in two paired runs; with the pool at 0 it was 0.64 and 0.79.
//
// Lowering the background (then with bcrypt on the pool, the pool lowered too), the
// 5-minute soak at 2,400 requests/s (seed 20261203) measured canary ping p50 1.6-2.8
// ms -> 0.6-0.9 ms.
//
// What nice buys depends on the kernel's scheduler. Under EEVDF (Linux 6.6 and later)
// it sets a thread's share of the core, but a lowered thread that is running can keep
// the core for the rest of its slice when the loop wakes (run to parity), until the
// next tick. Measured on 6.18 (S2 at 5,000 msg/s, server on one core, perf on that
// core): the loop never ran longer than 3 ms at a stretch, yet its 1 ms timer was 4-7
// ms late while V8's compiler or marking threads held the core (or the host's kdamond,
// which is not ours to lower). Putting the lowered threads at SCHED_IDLE, which a
// waking thread always preempts, made no difference that stood out of the run-to-run
// spread (p99 delivery 4.58 / 3.82 / 4.83 ms against 5.98 / 4.05 / 3.79), nor did nice
// 19 against 10 (four pairs); and SCHED_IDLE would leave LevelDB's compaction thread a
// third of a per cent of a core the loop saturates, so writes would stall behind it.
// The kernel's own answer is a shorter slice for the loop (sched_setattr's
// sched_runtime, Linux 6.12 and later), which node has no call for.
//
// Lowering has one price under a load that saturates the core for long: LevelDB's
// compaction, at a tenth of the core, falls behind the memtable flushes, and LevelDB
// stops writes when its level 0 fills up. CompactionCatchUp (below) gives the
// background the loop's priority back while that is coming.
//
// Linux only: the threads are listed in /proc/self/task, and setpriority() on a thread
// id sets that thread's nice value. A thread inherits its creator's nice value, and
// the ones started later (LevelDB's compaction thread, at the first flush) are caught
// by reading the list again every few seconds; the password-hashing threads, which
// end when idle and start again at the next login, lower themselves as they start
// (the same readlink and setpriority, in their own source: features/password-hasher.ts).
// The pool's threads are told apart by asking them: a readlink of /proc/thread-self
// queued to the pool runs on one of its threads and names it; enough of them at once,
// each followed by a job that keeps its thread busy, reach every thread (asked again
// until all have answered; the pool's threads never change after that). Only the
// process's own program (run.ts, behind main.ts) does this: an embedding program's threads are
// not ours to reorder.

import { readdirSync, readlink, readlinkSync } from "node:fs";
import { pbkdf2 } from "node:crypto";
import os from "node:os";
import type { Logger } from "pino";

/** How often the thread list is read again (new threads run at nice 0 until then). */
const RESCAN_MS = 5000;

/** libuv's pool size (its threads are asked who they are twice this many times). */
const POOL_SIZE = Math.max(1, Number(process.env.UV_THREADPOOL_SIZE) || 4);
/** Times the pool is asked per scan at most, while some of its threads have not answered. */
const ASK_ROUNDS = 20;

/**
 * The ids of the pool threads that answer `asks` readlinks of /proc/thread-self queued
 * at once. Each readlink is followed by a job that keeps its thread busy for a
 * millisecond or two (a small PBKDF2), so the next readlink is left to another thread:
 * without them one thread could answer them all before the others woke.
 */
function askPool(asks: number): Promise<Set<number>> {
  return new Promise((resolve) => {
    const found = new Set<number>();
    let left = asks * 2;
    const done = () => {
      if (--left === 0) resolve(found);
    };
    for (let i = 0; i < asks; i++) {
      readlink("/proc/thread-self", (err, link) => {
        if (!err) found.add(Number(link.split("/").pop()));
        done();
      });
      pbkdf2("wirechat", "pool", 2000, 16, "sha256", done);
    }
  });
}

export class ThreadPriority {
  /** Threads lowered (pruned to the live ones at every scan). */
  private readonly set = new Set<number>();
  /** libuv's pool threads seen so far: they keep the loop's priority. */
  private readonly pool = new Set<number>();
  private timer: NodeJS.Timeout | undefined;
  private loop: number | undefined;
  /** Set by raise(): the lowered threads run at the loop's priority meanwhile. */
  private raised = false;

  constructor(
    private readonly nice: number,
    private readonly log: Logger,
  ) {}

  /** Lowers every thread but the loop's and the pool's now and every RESCAN_MS; false where it cannot. */
  async start(): Promise<boolean> {
    if (this.nice === 0 || process.platform !== "linux") return false;
    try {
      // "<pid>/task/<tid>": the thread this code runs on, the event loop.
      this.loop = Number(readlinkSync("/proc/thread-self").split("/").pop());
    } catch (err) {
      this.log.warn({ err }, "cannot tell the event loop's thread; background threads keep their priority");
      return false;
    }
    const n = await this.scan();
    this.log.info({ nice: this.nice, threads: n, pool: this.pool.size }, "background threads lowered below the event loop");
    this.timer = setInterval(() => void this.scan(), RESCAN_MS);
    this.timer.unref();
    return true;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Finds the pool's threads, then lowers the other threads not yet lowered; resolves to how many are lowered. */
  async scan(): Promise<number> {
    // Asked again until every pool thread has answered (threads the pool has just
    // started may not run yet), a bounded number of times.
    for (let round = 0; round < ASK_ROUNDS && this.pool.size < POOL_SIZE; round++) {
      for (const tid of await askPool(POOL_SIZE * 2)) this.pool.add(tid);
    }
    let live: number[];
    try {
      live = readdirSync("/proc/self/task").map(Number);
    } catch {
      return this.set.size;
    }
    const alive = new Set(live);
    for (const tid of this.set) if (!alive.has(tid)) this.set.delete(tid); // ended (its id may come back)
    for (const tid of this.pool) if (!alive.has(tid)) this.pool.delete(tid);
    for (const tid of live) {
      if (tid === this.loop) continue;
      if (this.pool.has(tid)) {
        // Lowered before it was known as a pool thread (rare: the pool is asked before
        // anything is lowered): back to the loop's priority, where that is permitted.
        if (this.set.delete(tid)) this.setNice(tid, 0);
        continue;
      }
      if (this.set.has(tid)) continue;
      this.set.add(tid);
      this.setNice(tid, this.raised ? 0 : this.nice);
    }
    return this.set.size;
  }

  /**
   * Runs the lowered threads at the loop's priority (true), or lowers them again
   * (false). Returns how many threads were set, and how many refused: going back to a
   * lower nice value needs CAP_SYS_NICE or an RLIMIT_NICE of 20 (systemd's
   * LimitNICE=+0), which an unprivileged process usually lacks.
   */
  raise(on: boolean): { threads: number; refused: number } {
    this.raised = on;
    let threads = 0;
    let refused = 0;
    for (const tid of this.set) {
      const r = this.setNice(tid, on ? 0 : this.nice);
      if (r === "ok") threads++;
      else if (r === "refused") refused++;
    }
    return { threads, refused };
  }

  private setNice(tid: number, nice: number): "ok" | "refused" | "gone" {
    try {
      os.setPriority(tid, nice);
      return "ok";
    } catch (err) {
      // Ended between the listing and now, or not permitted: nothing to retry.
      this.log.debug({ err, tid }, "could not set a thread's priority");
      const code = (err as { info?: { code?: string } }).info?.code;
      return code === "EACCES" || code === "EPERM" ? "refused" : "gone";
    }
  }
}

/** LevelDB slows every write from this many tables in its level 0 (kL0_SlowdownWritesTrigger), and stops them at 12. */
const CATCH_UP_AT = 8;
/** ... and compacts level 0 from 4 tables (kL0_CompactionTrigger): below that none is due. */
const CATCH_UP_UNTIL = 4;
/** How often level 0 is looked at (a memtable flush adds a table every second or so at most). */
const CATCH_UP_POLL_MS = 500;

/**
 * Gives LevelDB's compaction a full share of the core when it falls behind the writes.
 *
 * Lowered (ThreadPriority), LevelDB's background thread gets about a tenth of a core
 * the event loop saturates. Short bursts are what that is for: the flushes wait and
 * catch up once the burst is over. Under sustained saturation they cannot: every
 * memtable flush adds a table to level 0, the merges that take them down (each
 * table spans every keyspace, so level 0 is merged, not moved) run a tenth as fast as
 * they are needed, and at 12 tables LevelDB stops all writes until its compaction is
 * done. Measured under S1 held for 40 s (server pinned to one core): 2 and 3 such
 * stops, the slowest delivery 1.8 and 2.2 s, only 2 compactions done; with the
 * background at 0 throughout, no stop, the slowest 80 ms, 16 compactions, but the
 * flushes then take the loop's share from the start, and 10-s runs delivered 109k /
 * 142k / 109k msg/s against 147k / 125k / 163k lowered. Raising the background only
 * from 8 tables in level 0 (where LevelDB starts slowing writes) until fewer than 4
 * remain: no stop in two runs, the slowest delivery 81 and 106 ms, 160k and 162k
 * msg/s over the 40 s (lowered throughout: 169k and 162k, with the stops; each pair in
 * the same minutes).
 */
export class CompactionCatchUp {
  private timer: NodeJS.Timeout | undefined;
  private on = false;
  private warnedRefused = false;

  constructor(
    /** Tables in LevelDB's level 0 now (Storage.level0Tables), undefined once closed. */
    private readonly tables: () => number | undefined,
    private readonly priority: Pick<ThreadPriority, "raise">,
    private readonly log: Logger,
  ) {}

  start(): void {
    this.timer = setInterval(() => this.check(), CATCH_UP_POLL_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Raises or lowers the background by level 0's table count now. */
  check(): void {
    const n = this.tables();
    if (n === undefined) return;
    if (!this.on && n >= CATCH_UP_AT) {
      this.on = true;
      const { threads, refused } = this.priority.raise(true);
      this.log.warn({ level0Tables: n, threads }, "LevelDB's compaction is behind the writes (it stops them at 12 tables in level 0): background threads at the event loop's priority until it catches up");
      if (refused > 0 && !this.warnedRefused) {
        this.warnedRefused = true;
        this.log.warn(
          { refused },
          "not permitted to raise the background threads again (needs CAP_SYS_NICE or RLIMIT_NICE 20, e.g. systemd's LimitNICE=+0): under sustained load LevelDB may stop writes while it compacts; --background-nice 0 avoids that",
        );
      }
    } else if (this.on && n < CATCH_UP_UNTIL) {
      this.on = false;
      this.priority.raise(false);
      this.log.info({ level0Tables: n }, "LevelDB's compaction caught up: background threads lowered again");
    }
  }
}
