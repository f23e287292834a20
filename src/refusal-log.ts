// The log of refused connections, rate-limited: a flood of refused connections must
// not flood the log. One line per address per window; the refusals it held back are
// counted and reported when the window closes. The map of addresses is bounded: past
// it, refusals from further addresses are only counted, in one line per window.
// (The dispatcher logs connections it closes for bad frames the same way.)

import type { Logger } from "pino";

interface Window {
  since: number;
  suppressed: number;
  reason: string;
}

export class RefusalLog {
  private readonly windows = new Map<string, Window>();
  /** Refusals from addresses that found the map full, this window. */
  private unlisted = 0;
  private unlistedSince = 0;

  constructor(
    private readonly log: Logger,
    private readonly windowMs = 10_000,
    private readonly maxAddresses = 4096,
    /** What each line says happened, to one connection and to several (connections closed for bad frames: the dispatcher's). */
    private readonly what = { one: "connection refused", many: "connections refused" },
  ) {}

  refused(address: string, reason: string, limit: number): void {
    const now = Date.now();
    const w = this.windows.get(address);
    if (w && now - w.since < this.windowMs) {
      w.suppressed++;
      return;
    }
    if (w) this.report(address, w);
    else if (this.windows.size >= this.maxAddresses) {
      this.sweep(now);
      if (this.windows.size >= this.maxAddresses) {
        if (this.unlisted++ === 0) this.unlistedSince = now;
        return;
      }
    }
    this.windows.set(address, { since: now, suppressed: 0, reason });
    this.log.warn({ remote: address, limit }, `${this.what.one}: ${reason}`);
  }

  /** Reports and forgets windows that have closed (called periodically). */
  sweep(now = Date.now()): void {
    for (const [address, w] of this.windows) {
      if (now - w.since < this.windowMs) continue;
      this.report(address, w);
      this.windows.delete(address);
    }
    if (this.unlisted > 0 && now - this.unlistedSince >= this.windowMs) {
      this.log.warn({ refused: this.unlisted }, `${this.what.many} from further addresses (not logged one by one)`);
      this.unlisted = 0;
    }
  }

  private report(address: string, w: Window): void {
    if (w.suppressed > 0) {
      this.log.warn({ remote: address, suppressed: w.suppressed }, `${this.what.one}: ${w.reason} (repeated; lines held back)`);
    }
  }
}
