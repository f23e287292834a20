// The log of refused connections, rate-limited: a flood of refused connections must
// not flood the log. One line per address and reason per window; the refusals it held
// back are counted and reported, reason by reason, when the window closes. (One line
// per address took a refusal of another reason within the window, a bad HTTP request
// after a cap refusal, into the first reason's count: a filter watching for the second
// never saw it.) An address's window keeps at most REASONS reasons; refusals of more
// are counted together. The map of addresses is bounded: past it, refusals from
// further addresses are only counted, in one line per window.
// (The dispatcher logs connections it closes for bad frames the same way.)

import type { Logger } from "pino";

/** Reasons one address's window logs apart (a reason's text may carry a detail). */
const REASONS = 8;

interface Window {
  since: number;
  /** Each reason logged this window → its refusals held back since. */
  reasons: Map<string, number>;
  /** Refusals of reasons past REASONS. */
  others: number;
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
      const held = w.reasons.get(reason);
      if (held !== undefined) w.reasons.set(reason, held + 1);
      else if (w.reasons.size >= REASONS) w.others++;
      else {
        w.reasons.set(reason, 0);
        this.log.warn({ remote: address, limit }, `${this.what.one}: ${reason}`);
      }
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
    this.windows.set(address, { since: now, reasons: new Map([[reason, 0]]), others: 0 });
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
    for (const [reason, suppressed] of w.reasons) {
      if (suppressed > 0) this.log.warn({ remote: address, suppressed }, `${this.what.one}: ${reason} (repeated; lines held back)`);
    }
    if (w.others > 0) this.log.warn({ remote: address, suppressed: w.others }, `${this.what.many} for further reasons (not logged one by one)`);
  }
}
