// A full garbage collection when the server goes quiet after a busy spell.
//
// V8 collects the old generation when it has grown to a multiple of what its last full
// collection kept (up to four times: see --heap-growth in run.ts), and it only looks
// when something allocates. A server that has just taken a burst (10,000 logins, a
// reconnect storm, a large history read) and then goes idle allocates next to nothing,
// so the burst's garbage stays resident until the next busy spell. After S3's 10,000
// logins the old generation held 43-46 or, in about one run in three, 80-85 MiB (the
// live data 36 MiB), depending on when V8's last full collection happened to fall:
// 5.8-6.6 against 9.3-11.4 KiB of RSS per idle connection. V8's memory reducer, meant
// for this, starts only 8 s after a full collection. A full collection alone emptied
// the heap but left the pages it had been spread over: RSS stayed at ~205 MiB; one that
// compacts every fragmented page gave them back (165 MiB a second later, as in the runs
// without the extra garbage).
//
// So the server watches its own event loop: every CHECK_MS, if the loop was busy less
// than IDLE_UTILISATION of that time and the heap has grown by `growthMiB` since the
// lowest it has been since the last collection made here, it runs one full collection
// (after S3: 80-120 ms for a 60-100 MiB heap, at a time nothing was waiting for the
// loop). Measured after it, S3 gives 5.3-6.0 KiB per connection in six runs of six,
// the baseline relay 5.4. It does not run again until the heap has grown as much
// again, so a live set that grew (caches filling) costs one collection, not one per
// check. Under load the loop is never that idle and V8 keeps its own schedule.
//
// The collection is V8's `gc()`, exposed to a new context only (the flag does not
// change the main one's globals). Only the process's own entry point starts this
// (run.ts): an embedding program's heap is its own.

import { performance } from "node:perf_hooks";
import v8 from "node:v8";
import vm from "node:vm";
import type { Logger } from "pino";

/** How often the loop's utilisation and the heap are looked at. */
const CHECK_MS = 500;
/** Busier than this over the last check (5 % of CHECK_MS: 25 ms of work) is not idle. */
const IDLE_UTILISATION = 0.05;
const MiB = 1024 * 1024;

export interface IdleCollector {
  /** Collections made so far. */
  readonly collections: number;
  stop(): void;
}

/** V8's full, synchronous collection, from a context it is exposed to. */
function exposedGc(): (() => void) | undefined {
  v8.setFlagsFromString("--expose-gc");
  const gc: unknown = vm.runInNewContext("typeof gc === 'function' ? gc : undefined");
  return typeof gc === "function" ? (gc as () => void) : undefined;
}

/** Starts the watch; undefined when `growthMiB` is 0 (off). */
export function startIdleCollector(growthMiB: number, log: Logger): IdleCollector | undefined {
  if (growthMiB <= 0) return undefined;
  const gc = exposedGc();
  if (gc === undefined) {
    log.warn("V8 did not expose its collector: no idle collection (--idle-gc)");
    return undefined;
  }
  const growth = growthMiB * MiB;
  let low = v8.getHeapStatistics().used_heap_size;
  let last = performance.eventLoopUtilization();
  let collections = 0;
  const timer = setInterval(() => {
    const now = performance.eventLoopUtilization();
    const busy = performance.eventLoopUtilization(now, last).utilization;
    last = now;
    const used = v8.getHeapStatistics().used_heap_size;
    // V8 collected on its own (or the young generation was just emptied): the garbage
    // to count is what came after.
    if (used < low) low = used;
    if (busy >= IDLE_UTILISATION || used - low < growth) return;
    const started = performance.now();
    // Compacting every fragmented page, not only V8's usual few, so that the pages the
    // burst's garbage was spread over are emptied and go back to the OS.
    v8.setFlagsFromString("--compact-on-every-full-gc");
    try {
      gc();
    } catch (err) {
      // Never seen; but a timer's exception would end the process: this one ends the watch.
      log.error({ err }, "idle collection failed; no more of them");
      clearInterval(timer);
      return;
    } finally {
      v8.setFlagsFromString("--no-compact-on-every-full-gc");
    }
    low = v8.getHeapStatistics().used_heap_size;
    collections++;
    log.debug({ heapBefore: used, heapAfter: low, ms: Math.round(performance.now() - started) }, "idle: full garbage collection");
    // The collection's own time is not the next check's work.
    last = performance.eventLoopUtilization();
  }, CHECK_MS);
  timer.unref();
  return {
    get collections() {
      return collections;
    },
    stop: () => clearInterval(timer),
  };
}
