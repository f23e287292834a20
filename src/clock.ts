// Time: the wall clock as the hot path reads it (once per task), and the one bounded
// wait (within) that shutdown and the cluster's close use.
//
// On this machine's virtual CPU a Date.now() costs ~136 ns (a million calls in a
// loop), and the message path read it twice per message (the request-rate bucket and
// the message's `time`): in S1 profiles that was ~3 % of the server's CPU. clockMs()
// reads it once and keeps the value until the current task's microtasks run (Node
// runs them after every I/O callback and timer), so every frame of one socket read,
// and every message settled by one batch commit, shares one reading: at most that
// task's length behind the true time.

let cached = 0;
let fresh = false;

function expire(): void {
  fresh = false;
}

/** Date.now(), read at most once per task (see above). */
export function clockMs(): number {
  if (!fresh) {
    cached = Date.now();
    fresh = true;
    queueMicrotask(expire);
  }
  return cached;
}

/**
 * Waits for `p` at most `ms`: true once it has fulfilled, false at the deadline (`p`
 * goes on; its outcome is dropped), a rejection as `p`'s own. The timer is cleared
 * either way, so a stop that finishes in time leaves nothing to hold the process.
 */
export async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(resolve, Math.max(0, ms), false)));
  try {
    return await Promise.race([p.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}
