// The event loop before background threads.
//
// Every client is served by one thread, the event loop; everything else in the process
// works for it in the background: libuv's pool (LevelDB reads and batch writes,
// bcrypt), LevelDB's compaction thread, V8's garbage-collection helpers. When they
// share a core with the loop (one core, or more runnable threads than cores) the
// kernel gives each runnable thread an equal share, so a compaction or a burst of
// history reads in the pool stretches the latency of every request, a ping included.
// Raising their nice value (as RocksDB lowers its compaction threads' priority) gives
// the loop the core whenever it has work; they run in the time it leaves, and never
// starve: at nice 10 a thread still gets about a tenth of a core the loop saturates
// (weights 110 against 1024), so commits, reads and hashes keep moving, only later.
// On a machine with idle cores it changes nothing.
//
// Measured (server and load pinned to one core each, as ../shared/bench does it): the
// 5-minute soak at 2,400 requests/s, seed 20261203, canary ping p50 1.6-2.8 ms ->
// 0.6-0.9 ms and per-minute p99 20-50 ms -> 17-20 ms; S2 at 20,000 msg/s, two pairs
// of runs, p99 32.6 / 28.5 ms -> 14.3 / 17.8 ms; S1 and S2 at 5,000 msg/s within
// their noise.
//
// Linux only: the threads are listed in /proc/self/task, and setpriority() on a thread
// id sets that thread's nice value. A thread inherits its creator's nice value, and
// the ones the loop starts later (LevelDB's compaction thread, at the first flush) are
// caught by reading the list again every few seconds. Only the process's own entry
// point (main.ts) does this: an embedding program's threads are not ours to reorder.

import { readdirSync, readlinkSync } from "node:fs";
import os from "node:os";
import type { Logger } from "pino";

/** How often the thread list is read again (new threads run at nice 0 until then). */
const RESCAN_MS = 5000;

export class ThreadPriority {
  /** Threads already set (pruned to the live ones at every scan). */
  private readonly set = new Set<number>();
  private timer: NodeJS.Timeout | undefined;
  private loop: number | undefined;

  constructor(
    private readonly nice: number,
    private readonly log: Logger,
  ) {}

  /** Lowers every thread but the loop's now and every RESCAN_MS; false where it cannot. */
  start(): boolean {
    if (this.nice === 0 || process.platform !== "linux") return false;
    try {
      // "<pid>/task/<tid>": the thread this code runs on, the event loop.
      this.loop = Number(readlinkSync("/proc/thread-self").split("/").pop());
    } catch (err) {
      this.log.warn({ err }, "cannot tell the event loop's thread; background threads keep their priority");
      return false;
    }
    const n = this.scan();
    this.log.info({ nice: this.nice, threads: n }, "background threads lowered below the event loop");
    this.timer = setInterval(() => this.scan(), RESCAN_MS);
    this.timer.unref();
    return true;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Sets the threads not yet set; returns how many are set in all. */
  scan(): number {
    let live: number[];
    try {
      live = readdirSync("/proc/self/task").map(Number);
    } catch {
      return this.set.size;
    }
    const alive = new Set(live);
    for (const tid of this.set) if (!alive.has(tid)) this.set.delete(tid); // ended (its id may come back)
    for (const tid of live) {
      if (tid === this.loop || this.set.has(tid)) continue;
      this.set.add(tid);
      try {
        os.setPriority(tid, this.nice);
      } catch (err) {
        // Ended between the listing and now, or not permitted: nothing to retry.
        this.log.debug({ err, tid }, "could not lower a thread's priority");
      }
    }
    return this.set.size;
  }
}
