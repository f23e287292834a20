// Users, their unique indexes (login, nick, email, phone) and their numbers (the
// numeric alias of each uid, `usernum`).

import type { Logger } from "pino";
import { del, put, type BatchOp, type Counter, type Storage } from "./db.js";
import { nameKeyEntry, nameKeyHolder, nameKeyRange, UNICODE_KEY, type Spaces, type UserRecord } from "./layout.js";
import { readEntries, readKeys, readValues } from "./range.js";
import { ReadCache } from "./read-cache.js";
import { NAME_MAX } from "../limits.js";

export type UniqueIndex = "login" | "nick" | "email" | "phone";

/** Index keys are case-insensitive for login, nick and email. */
export function indexKey(index: UniqueIndex, value: string): string {
  return index === "phone" ? value : value.toLowerCase();
}

/** Default-ignorable code points: zero-width spaces and joiners, soft hyphen, bidi marks, variation selectors... */
const IGNORABLE = /\p{Default_Ignorable_Code_Point}/gu;

/**
 * A login or nick as people read it: compatibility forms folded into the letters they
 * show (NFKC: fullwidth "ｂｏｂ", ligatures, superscripts), default-ignorable code
 * points dropped ("bob" followed by a zero-width space shows as "bob"), lower case,
 * and composed again (a dropped joiner or lower-casing can leave a letter and its
 * accent side by side). A new name whose key another account's login or nick has is
 * taken (`namekeys`, UserStore.claim), so nobody can pass for "bob" with a name that
 * looks like it. (Persian's zero-width non-joiner changes how a word is drawn, not how
 * it reads: a nick with it and the same nick without it are one name.)
 */
export function nameKey(value: string): string {
  return value.normalize("NFKC").replace(IGNORABLE, "").toLowerCase().normalize("NFKC");
}

/** Pages of its limit prefixSearchWhere reads at most. */
const SEARCH_PAGES = 8;

/** The indexes whose values are unique across both (UserStore.claim). */
const NAMES: readonly UniqueIndex[] = ["login", "nick"];
const LOGIN_EMAIL: readonly UniqueIndex[] = ["login", "nick", "email"];
const EMAIL_LOGIN: readonly UniqueIndex[] = ["email", "login"];

function claimKey(index: UniqueIndex, value: string): string {
  return `${NAMES.includes(index) ? "name" : index}:${indexKey(index, value)}`;
}

/** The in-flight claims of `value` for `index`: its index keys, and for a login or nick its nameKey. */
function claimKeys(index: UniqueIndex, value: string): string[] {
  const keys = sharedIndexes(index, value).map((where) => claimKey(where, value));
  if (NAMES.includes(index)) keys.push(`reads:${nameKey(value)}`);
  return keys;
}

/**
 * The indexes a value claimed for `index` must be free in (UserStore.claim): logins and
 * nicks are one namespace, and an email may be no other user's login (nor a login that
 * is an address another user's email): the seed-003 door logs in by email with the
 * login of the account holding it.
 */
export function sharedIndexes(index: UniqueIndex, value: string): readonly UniqueIndex[] {
  if (index === "email") return EMAIL_LOGIN;
  if (!NAMES.includes(index)) return [index];
  return index === "login" && value.includes("@") ? LOGIN_EMAIL : NAMES;
}


const CACHE_SIZE = 50_000;
/**
 * And at most this many characters of the records' pictures and statuses (one byte
 * each for a base64 picture): a picture may be --max-picture (256 KiB), so 50,000
 * records could hold 13 GB (a client registering accounts and setting pictures in a
 * loop would fill it). Past it the least recently used go, as past CACHE_SIZE.
 */
const CACHE_CHARS = 32 * 1024 * 1024;

/** What a cached record weighs against CACHE_CHARS. */
function cachedChars(u: UserRecord): number {
  return (u.picture?.length ?? 0) + (u.status?.length ?? 0);
}

/**
 * Prefix searches (searchuser) remembered: their uids, at most this many in all. Any
 * write to the login or nick index drops them all (registrations and renames are rare
 * beside searches; a soak's 80 searches a second were a third of its range reads).
 */
const SEARCH_CACHE_UIDS = 65_536;
/** Users numbered per batch by the layout-3 migration. */
const MIGRATE_PAGE = 1000;

export class UserStore {
  private readonly cache = new Map<string, UserRecord>();
  /** cachedChars over the cache. */
  private cacheChars = 0;
  /** Index keys being written by a batch not yet on disk (`<index>:<key>`). */
  private readonly claims = new Set<string>();
  private readonly s: Spaces;
  private readonly searches = new ReadCache<string>(SEARCH_CACHE_UIDS, () => "");

  constructor(
    private readonly storage: Storage,
    /** User numbers: the counter `meta usernum`. */
    private readonly nums: Counter,
  ) {
    this.s = storage.spaces;
    storage.watch(this.s.login, this.searches);
    storage.watch(this.s.nick, this.searches);
  }

  /**
   * Layout 3 to 4: numbers every user who has no number yet, in uid order. A page of
   * users is one batch (records, `usernum` entries and the counter's value together),
   * so after a crash part-way the numbered users keep their numbers and the next start
   * numbers the rest. Call after MessageStore.init, which brings the layout to 3 (and
   * a layout-4 database to 5).
   */
  async init(log: Logger): Promise<void> {
    await this.number(log);
    await this.buildNameKeys(log);
  }

  /** Layout 3 to 4 (see init). */
  private async number(log: Logger): Promise<void> {
    const layout = (await this.s.meta.get("layout")) as number | undefined;
    if (layout !== undefined && layout >= 4) return;
    let numbered = 0;
    for (let after = ""; ; ) {
      const page = await readValues<Omit<UserRecord, "num"> & { num?: number }>(this.s.users, { gt: after, limit: MIGRATE_PAGE });
      if (page.length === 0) break;
      const ops: BatchOp[] = [];
      for (const old of page) {
        if (old.num !== undefined) continue;
        ops.push(...this.saveOps({ ...old, num: this.nextNum() }, old as UserRecord));
        numbered++;
      }
      await this.storage.commit(ops);
      after = page[page.length - 1].uid;
    }
    // Straight to layout 5: 4 -> 5 (history chunks derived from the log) needs only
    // MessageStore.init's replay, which has run. (buildNameKeys goes on to 6.)
    await this.storage.commit([put(this.s.meta, "layout", 5)]);
    if (numbered > 0) log.info({ users: numbered }, "numbered the users (layout 4)");
  }

  /**
   * Layout 5 to 6: the `namekeys` entries of every user's login and nick. Built from
   * scratch until layout 6 is recorded: a start that crashed part-way, or an older
   * server run on the data dir meanwhile (it keeps no `namekeys`: accounts it deleted
   * would keep their names taken), leaves nothing that counts. Existing accounts whose
   * names read alike keep them (one key, an entry each); only new names are refused.
   * Built again whenever the runtime's Unicode version is not the one `meta unicode`
   * records: keys made with other tables left a stale entry that kept a freed name
   * taken, and missed a new name that reads as an existing one.
   */
  private async buildNameKeys(log: Logger): Promise<void> {
    const layout = (await this.s.meta.get("layout")) as number;
    const built = (await this.s.meta.get(UNICODE_KEY)) as string | undefined;
    if (layout >= 6 && built === process.versions.unicode) return;
    await this.storage.emptySpace(this.s.namekeys, MIGRATE_PAGE);
    let users = 0;
    for (let after = ""; ; ) {
      const page = await readValues<UserRecord>(this.s.users, { gt: after, limit: MIGRATE_PAGE });
      if (page.length === 0) break;
      await this.storage.commit(page.flatMap((u) => this.nameOps(u, put)));
      users += page.length;
      after = page[page.length - 1].uid;
    }
    // (ChannelStore.init goes on to 7, and records the Unicode version.)
    if (layout < 6) {
      await this.storage.commit([put(this.s.meta, "layout", 6)]);
      if (users > 0) log.info({ users }, "indexed the logins and nicks as they read (layout 6)");
    } else if (users > 0) {
      log.info({ users, was: built ?? "not recorded", now: process.versions.unicode }, "indexed the logins and nicks as they read again, with this runtime's Unicode tables");
    }
  }

  /** `u`'s `namekeys` entries (its login's key and its nick's, once when they are one), put or deleted. */
  private nameOps(u: Pick<UserRecord, "uid" | "login" | "nick">, op: typeof put | typeof del): BatchOp[] {
    const keys = new Set([nameKey(u.login), nameKey(u.nick)]);
    return [...keys].map((k) => (op === put ? put(this.s.namekeys, nameKeyEntry(k, u.uid), 1) : del(this.s.namekeys, nameKeyEntry(k, u.uid))));
  }

  /** An account other than `owner` whose login or nick reads as `value` (nameKey), if any. */
  async nameHolder(value: string, owner?: string): Promise<string | undefined> {
    const holders = (await readKeys(this.s.namekeys, { ...nameKeyRange(nameKey(value)), limit: 2 })).map(nameKeyHolder);
    return holders.find((uid) => uid !== owner);
  }

  /** A new user's number: the counter only goes up, so a deleted user's is never reused. */
  nextNum(): number {
    return this.nums.next();
  }

  /** The uid of the user numbered `num`. */
  async uidOf(num: number): Promise<string | undefined> {
    if (!Number.isSafeInteger(num) || num < 1) return undefined;
    return (await this.s.usernum.get(String(num))) as string | undefined;
  }

  /** The number of user `uid`. */
  async numOf(uid: string): Promise<number | undefined> {
    return (await this.get(uid))?.num;
  }

  /** The user if cached (the hot path's check that a recipient exists). */
  peek(uid: string): UserRecord | undefined {
    return this.cache.get(uid);
  }

  async get(uid: string): Promise<UserRecord | undefined> {
    const hit = this.cache.get(uid);
    if (hit) {
      this.cache.delete(uid);
      this.cache.set(uid, hit);
      return hit;
    }
    const gen = this.gen;
    const u = (await this.s.users.get(uid)) as UserRecord | undefined;
    // A save or a deletion reported while we read: what we read may be older than it.
    if (u && gen === this.gen) this.remember(u);
    return u;
  }

  /** Bumped by every report (saved, forget): a read that spans one does not fill the cache. */
  private gen = 0;

  /** Changes whenever an account is saved or forgotten (what was peeked may be stale). */
  get generation(): number {
    return this.gen;
  }

  private remember(u: UserRecord): void {
    this.drop(u.uid);
    this.cache.set(u.uid, u);
    this.cacheChars += cachedChars(u);
    while (this.cache.size > CACHE_SIZE || (this.cacheChars > CACHE_CHARS && this.cache.size > 1)) this.drop(this.cache.keys().next().value as string);
  }

  private drop(uid: string): void {
    const had = this.cache.get(uid);
    if (had === undefined) return;
    this.cache.delete(uid);
    this.cacheChars -= cachedChars(had);
  }

  async lookup(index: UniqueIndex, value: string): Promise<string | undefined> {
    return (await this.s[index].get(indexKey(index, value))) as string | undefined;
  }

  /**
   * Like prefixSearch, the uids that `keep` accepts (given the uid and the index key, the
   * value lower-cased), read a page of `limit` at a time past those it drops, at most
   * SEARCH_PAGES pages: the first `limit` kept, in index order.
   */
  async prefixSearchWhere(index: "login" | "nick", prefix: string, limit: number, keep: (uid: string, key: string) => boolean | Promise<boolean>): Promise<string[]> {
    if (prefix.length > 4 * NAME_MAX) return [];
    const from = indexKey(index, prefix);
    const kept: string[] = [];
    let after: string | undefined;
    for (let page = 0; page < SEARCH_PAGES && kept.length < limit; page++) {
      const read = await readEntries<string>(this.s[index], { ...(after === undefined ? { gte: from } : { gt: after }), lt: from + "\u{10FFFF}", limit });
      for (const [key, uid] of read) if (kept.length < limit && (await keep(uid, key))) kept.push(uid);
      if (read.length < limit) break;
      after = read[read.length - 1][0];
    }
    return kept;
  }

  /**
   * uids whose `index` value starts with `prefix` (case-insensitive), in index order. A
   * login that is an address is never matched: it is its account's email (the seed-003
   * door's accounts log in by email), and a search must not tell its characters.
   */
  async prefixSearch(index: "login" | "nick", prefix: string, limit: number): Promise<string[]> {
    // Longer than any stored name (NAME_MAX code points, lower-cased at most twice as
    // many, two UTF-16 units each): nothing to read, nothing to remember.
    if (prefix.length > 4 * NAME_MAX || (index === "login" && prefix.includes("@"))) return [];
    const from = indexKey(index, prefix);
    // One group for both indexes: the cache keys entries by the whole query.
    return this.searches.read("", `${index}\u0000${limit}\u0000${from}`, () =>
      index === "login"
        ? this.prefixSearchWhere("login", prefix, limit, (_uid, key) => !key.includes("@"))
        : readValues<string>(this.s[index], { gte: from, lt: from + "\u{10FFFF}", limit }),
    );
  }

  /** Index lookups for many values at once (undefined entries are skipped). */
  async lookupMany(index: UniqueIndex, values: readonly (string | undefined)[]): Promise<(string | undefined)[]> {
    const wanted = values.map((v) => (v === undefined ? undefined : indexKey(index, v)));
    const keys = wanted.filter((k): k is string => k !== undefined);
    const found = keys.length === 0 ? [] : ((await this.s[index].getMany(keys)) as (string | undefined)[]);
    let n = 0;
    return wanted.map((k) => (k === undefined ? undefined : found[n++]));
  }

  /**
   * Reserves unique values for a write about to be committed: false when one is taken
   * on disk or by another write in flight. Pair with `release` after the commit.
   *
   * Logins and nicks are one namespace (NAMES): the seed TCP doors show a user by the
   * nick where their clients take it for the login (they register with nick = login),
   * so one user's nick equal to another's login let them pass for that user there.
   * Emails and logins that are addresses overlap the same way (sharedIndexes).
   */
  async claim(values: ReadonlyArray<[UniqueIndex, string]>, owner?: string): Promise<UniqueIndex | undefined> {
    const keys = values.map(([i, v]) => claimKeys(i, v));
    const busy = values.findIndex((_, n) => keys[n].some((k) => this.claims.has(k)));
    if (busy >= 0) return values[busy][0];
    for (const k of keys.flat()) this.claims.add(k);
    try {
      for (const [index, value] of values) {
        for (const where of sharedIndexes(index, value)) {
          const holder = await this.lookup(where, value);
          if (holder !== undefined && holder !== owner) {
            this.release(values);
            return index;
          }
        }
        // A name that reads as another account's login or nick (nameKey).
        if (NAMES.includes(index) && (await this.nameHolder(value, owner)) !== undefined) {
          this.release(values);
          return index;
        }
      }
    } catch (err) {
      this.release(values); // a failed read: nothing stays claimed
      throw err;
    }
    return undefined;
  }

  release(values: ReadonlyArray<[UniqueIndex, string]>): void {
    for (const [i, v] of values) for (const k of claimKeys(i, v)) this.claims.delete(k);
  }

  /** Ops writing `next` (and its indexes) over `prev`; the cache is updated at once. */
  saveOps(next: UserRecord, prev?: UserRecord): BatchOp[] {
    const ops: BatchOp[] = [put(this.s.users, next.uid, next)];
    // A number is given once (registration, or the migration of an older record).
    if (next.num !== prev?.num) ops.push(put(this.s.usernum, String(next.num), next.uid));
    for (const index of ["login", "nick", "email", "phone"] as const) {
      const before = prev?.[index] ?? "";
      const after = next[index];
      if (before === after) continue;
      if (before) ops.push(del(this.s[index], indexKey(index, before)));
      if (after) ops.push(put(this.s[index], indexKey(index, after), next.uid));
    }
    if (prev === undefined || prev.login !== next.login || prev.nick !== next.nick) {
      if (prev !== undefined) ops.push(...this.nameOps(prev, del));
      ops.push(...this.nameOps(next, put));
    }
    return ops;
  }

  /** Call once the ops from saveOps are committed. */
  saved(u: UserRecord): void {
    this.gen++;
    this.remember(u);
  }

  removeOps(u: UserRecord): BatchOp[] {
    const ops: BatchOp[] = [del(this.s.users, u.uid), del(this.s.usernum, String(u.num)), del(this.s.rustroom, u.uid)];
    for (const index of ["login", "nick", "email", "phone"] as const) {
      if (u[index]) ops.push(del(this.s[index], indexKey(index, u[index])));
    }
    ops.push(...this.nameOps(u, del));
    return ops;
  }

  /** The chid of the room the user's rust_messages connections were last moved to, if stored. */
  async rustRoom(uid: string): Promise<string | undefined> {
    return (await this.s.rustroom.get(uid)) as string | undefined;
  }

  rustRoomOps(uid: string, chid: string): BatchOp[] {
    return [put(this.s.rustroom, uid, chid)];
  }

  /**
   * Ops recording, in an account's deletion batch, what its clean-up hooks need, so
   * that a crash before they finish cannot skip them (pendingDeletions at start-up).
   */
  deletionMarkOps(uid: string, nick: string, chids: readonly string[]): BatchOp[] {
    return [put(this.s.deleted, uid, { nick, chids })];
  }

  deletionDoneOps(uid: string): BatchOp[] {
    return [del(this.s.deleted, uid)];
  }

  /** Deleted accounts whose clean-up has not finished. */
  async pendingDeletions(): Promise<[string, { nick: string; chids: string[] }][]> {
    return readEntries(this.s.deleted, {});
  }

  forget(uid: string): void {
    this.gen++;
    this.drop(uid);
  }

  /** What the record cache holds (records, and their characters against CACHE_CHARS). */
  get cacheSize(): { records: number; chars: number } {
    return { records: this.cache.size, chars: this.cacheChars };
  }
}
