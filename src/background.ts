// Background work of every layer, in one place so that shutdown can wait for it.

import type { Logger } from "pino";
import { within } from "./clock.js";

/**
 * Work that runs after a reply, in the background (presence, blob collection, purges,
 * clean-up at start-up). Every task's failure is logged, never left unhandled. Once
 * stop() is called no new task starts, and the ones running see `signal.aborted` and
 * should end at their next step; stop() resolves when they have, so storage closes
 * behind them, never under them.
 */
export class Background {
  private readonly running = new Set<Promise<void>>();
  private readonly abort = new AbortController();

  constructor(private readonly log: Logger) {}

  get stopping(): boolean {
    return this.abort.signal.aborted;
  }

  /** Tasks running (or waiting their turn inside), for tests and the curious. */
  get size(): number {
    return this.running.size;
  }

  /** Runs `fn` unless stopping; a failure is logged with `what` (quietly once stopping). */
  run(what: string, fn: (signal: AbortSignal) => Promise<unknown> | unknown, context: Record<string, unknown> = {}): void {
    if (this.stopping) return;
    const task: Promise<void> = Promise.resolve()
      .then(() => fn(this.abort.signal))
      .then(
        () => {},
        (err) => {
          if (this.stopping) this.log.debug({ err, ...context }, `${what} stopped by shutdown`);
          else this.log.error({ err, ...context }, `${what} failed`);
        },
      )
      .finally(() => this.running.delete(task));
    this.running.add(task);
  }

  /**
   * Resolves once no task is running, those they start included, without stopping
   * anything (or at the timeout): false if some still run. A command on a stopped data
   * dir (wirechat user del) lets the work it queued finish before it closes.
   */
  async settle(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.running.size > 0 && Date.now() < deadline) {
      await within(Promise.allSettled([...this.running]), deadline - Date.now());
    }
    return this.running.size === 0;
  }

  /** No new task starts; resolves when the running ones have ended (or at the timeout). */
  async stop(timeoutMs: number): Promise<void> {
    this.abort.abort();
    if (!(await this.settle(timeoutMs))) this.log.warn({ tasks: this.running.size }, "background tasks still running at the shutdown timeout");
  }
}
