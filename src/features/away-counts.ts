// --max-inbox's counts: direct messages let through to each user away, kept in memory
// for at most a fixed number of users.
//
// Past that number one count is forgotten (it begins again at 0), and which one decides
// what a sender can get past the bound. With the least recently counted forgotten (as
// until this file), a flood's count was safe only while it grew: a sender who had
// filled one user's bound and then sent one message to each of 65,536 other existing
// users away pushed it out and could send the whole bound again, as often as it liked.
// So low counts go first: a count under `heavyFrom` (64, or the bound when that is
// lower) is forgotten before any higher one, the least recently added to first, while
// fewer than half the counts kept are high; from half on, the high one least recently
// added to goes (so high counts of users who never come back cannot fill the table
// and leave the low ones a handful of places, each pushed out by the next). Resetting
// a filled count then takes `heavyFrom` messages stored for each of half the users
// counted (2.1 million with the defaults) to gain one bound's worth (10,000) for the
// one, and resetting a low one (under 64) half the table's new recipients.

/** A count from here up is heavy (at most; see heavyFrom): forgotten after the light ones, until half are heavy. */
export const HEAVY_FROM = 64;

export class AwayCounts {
  /** Counts under heavyFrom, the least recently added to first. */
  private readonly light = new Map<string, number>();
  /** The others, in the same order. */
  private readonly heavy = new Map<string, number>();

  /** `max`: users counted at once; `bound()`: the bound now (--max-inbox, reloadable). */
  constructor(
    readonly max: number,
    private readonly bound: () => number,
  ) {}

  get size(): number {
    return this.light.size + this.heavy.size;
  }

  get(uid: string): number | undefined {
    return this.light.get(uid) ?? this.heavy.get(uid);
  }

  /** One more message let through for `uid`; returns the new count. */
  add(uid: string): number {
    // Moved to the newest end each time, so a count still growing is never the first
    // of its kind to go.
    let n = this.light.get(uid);
    if (n !== undefined) this.light.delete(uid);
    else {
      n = this.heavy.get(uid);
      if (n !== undefined) this.heavy.delete(uid);
      else if (this.size >= this.max) this.forgetOne();
    }
    const count = (n ?? 0) + 1;
    (count < Math.min(HEAVY_FROM, this.bound()) ? this.light : this.heavy).set(uid, count);
    return count;
  }

  /** `uid` connected (or left for good): its count ends. */
  delete(uid: string): void {
    if (!this.light.delete(uid)) this.heavy.delete(uid);
  }

  private forgetOne(): void {
    const from = this.light.size > 0 && this.heavy.size < this.max / 2 ? this.light : this.heavy;
    const first = from.keys().next();
    if (!first.done) from.delete(first.value);
  }
}
