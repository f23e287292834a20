// Failed-login throttling: counts failures per key (a login, an address) in a window;
// past the limit, further attempts are refused until a back-off runs out. The back-off
// is 1 s at the limit and doubles with every further failure, up to the window.
// An attempt is counted as a failure when it starts (so concurrent guesses cannot all
// pass the check before the first is counted) and taken back if it succeeds.

export class LoginThrottle {
  private readonly entries = new Map<string, { fails: number; first: number; until: number }>();

  constructor(
    private readonly limit: number,
    private readonly windowMs: number,
    private readonly maxEntries = 100_000,
  ) {}

  /** Milliseconds until `key` may try again (0 when it may now). */
  blockedFor(key: string, now = Date.now()): number {
    const e = this.entries.get(key);
    return e && e.until > now ? e.until - now : 0;
  }

  fail(key: string, now = Date.now()): void {
    let e = this.entries.get(key);
    if (!e || now - e.first > this.windowMs) {
      e = { fails: 0, first: now, until: 0 };
      this.entries.delete(key);
      this.entries.set(key, e);
    }
    e.fails++;
    if (e.fails >= this.limit) e.until = now + Math.min(this.windowMs, 1000 * 2 ** (e.fails - this.limit));
    if (this.entries.size > this.maxEntries) this.sweep(now);
  }

  /** Takes back one attempt counted by `fail` that turned out not to be a failure. */
  undo(key: string): void {
    const e = this.entries.get(key);
    if (!e || e.fails === 0) return;
    e.fails--;
    if (e.fails < this.limit) e.until = 0;
  }

  succeed(key: string): void {
    this.entries.delete(key);
  }

  /** Drops entries whose window and back-off are over (oldest first; bounded memory). */
  private sweep(now: number): void {
    for (const [key, e] of this.entries) {
      if (this.entries.size <= this.maxEntries / 2) break;
      if (now - e.first > this.windowMs && e.until <= now) this.entries.delete(key);
    }
    // Still over: forget the oldest, as an attacker filling the table gains nothing.
    for (const key of this.entries.keys()) {
      if (this.entries.size <= this.maxEntries) break;
      this.entries.delete(key);
    }
  }
}
