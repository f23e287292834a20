// Channels, their unique names, the channels each user owns, and their stored
// membership (both ways), with an LRU cache of memberships so that a channel message
// does not read them from disk.
//
// A private channel's record is kept apart from the public ones (`privchans`), with no
// entry in the name index, and each of its members has a `privof` entry besides the
// `memberof` one: channellist reads the public channels and the caller's private ones,
// never other users' private channels. Its chid comes from the same counter.
//
// The cache only ever holds committed state. Membership changes are written by the
// caller (joinOps, leaveOps, createOps, removeOps), who reports each one once its
// commit succeeded: joined, left, removed. Between building the ops and that report
// the disk may be ahead of the cache, so the channel is read from disk as before
// (a change built and never reported, e.g. its commit failed, keeps that channel off
// the cache: slower, never wrong). A report also discards any load in flight for
// the channel, which may have read the state from before the change.
//
// Channel records never change after creation, so they are cached too (bounded): a
// removal drops the record when its ops are built and again when it is reported, and
// a read that was in flight across either does not fill the cache.

import type { Logger } from "pino";
import { del, put, type BatchOp, type Counter, type Storage } from "./db.js";
import { keyTail, LAYOUT_VERSION, nameKeyEntry, nameKeyHolder, nameKeyRange, pair, prefixRange, UNICODE_KEY, type ChannelRecord, type Spaces } from "./layout.js";
import { readKeys, readValues } from "./range.js";
import { nameKey } from "./users.js";

/** Channels read at a time by the migration to layout 7. */
const MIGRATE_PAGE = 1000;

export interface MembershipCacheLimits {
  /** Channels whose membership is cached. */
  channels: number;
  /** Member entries cached, over all those channels. */
  entries: number;
}

const DEFAULT_LIMITS: MembershipCacheLimits = { channels: 4096, entries: 1_000_000 };
/**
 * Channel records cached (each under a kilobyte). `history` and `dialogs` read the
 * record of a channel per request: 2.3 % of the server's main thread in a soak.
 */
const CACHED_RECORDS = 4096;
/** Removed chids remembered for isGone (a chid is a few bytes). */
const REMEMBERED_REMOVALS = 4096;

interface Cached {
  uids: Set<string>;
  /** uids in key order (what members() returns), rebuilt after a change. */
  sorted: string[] | undefined;
}

interface Load {
  uids: Promise<Set<string>>;
  /** Cleared by a change reported while the load was reading: its result is stale. */
  current: boolean;
}

export class ChannelStore {
  private readonly s: Spaces;
  private readonly limits: MembershipCacheLimits;
  /** chid → members; Map order is recency, least recently used first. */
  private readonly cache = new Map<string, Cached>();
  private entries = 0;
  /** One load per chid at a time; concurrent misses share it. */
  private readonly loads = new Map<string, Load>();
  /** chid → membership changes built and not yet reported. */
  private readonly unreported = new Map<string, number>();
  /** chid → its record; Map order is insertion, the oldest is dropped first. */
  private readonly records = new Map<string, ChannelRecord>();
  /** Bumped by every removal: a record read in flight across one is not cached. */
  private recordsGen = 0;
  /**
   * Channels whose removal has been built (removeOps), newest last, bounded: chids are
   * never reused, and what asks (isGone) is a join or a message that passed its checks
   * a moment before the removal, never one that started long after.
   */
  private readonly gone = new Set<string>();
  /**
   * `<chid>\0<uid>` of memberships whose end has been built (leaveOps), newest last,
   * bounded as `gone` is, and taken out by a new join: a message that passed its
   * membership check a moment before the leave must not be written after it.
   */
  private readonly departed = new Set<string>();

  constructor(
    private readonly storage: Storage,
    private readonly ids: Counter,
    limits: Partial<MembershipCacheLimits> = {},
  ) {
    this.s = storage.spaces;
    this.limits = { ...DEFAULT_LIMITS, ...limits };
  }

  /**
   * Layout 6 to 7: the `chreads` entries of every public channel's name. Built from
   * scratch until layout 7 is recorded, as UserStore's `namekeys` (a start that crashed
   * part-way, or an older server run on the data dir meanwhile, leaves nothing that
   * counts). Existing channels whose names read alike keep them (one key, an entry
   * each); only new names are refused. Call after UserStore.init (layout 6). Built
   * again, as `namekeys`, whenever the runtime's Unicode version is not `meta unicode`.
   */
  async init(log: Logger): Promise<void> {
    const layout = (await this.s.meta.get("layout")) as number;
    const built = (await this.s.meta.get(UNICODE_KEY)) as string | undefined;
    if (layout >= 7 && built === process.versions.unicode) return;
    await this.storage.emptySpace(this.s.chreads, MIGRATE_PAGE);
    let named = 0;
    for (let after: string | undefined; ; ) {
      const page = await readValues<ChannelRecord>(this.s.channels, after === undefined ? { limit: MIGRATE_PAGE } : { gt: after, limit: MIGRATE_PAGE });
      if (page.length === 0) break;
      await this.storage.commit(page.map((c) => put(this.s.chreads, readsEntry(c), 1)));
      named += page.length;
      after = page[page.length - 1].chid;
    }
    // Both name-key spaces are built with this runtime's tables now (UserStore's first).
    await this.storage.commit([put(this.s.meta, "layout", LAYOUT_VERSION), put(this.s.meta, UNICODE_KEY, process.versions.unicode)]);
    if (layout < 7) {
      if (named > 0) log.info({ channels: named }, "indexed the public channels' names as they read (layout 7)");
    } else if (named > 0) {
      log.info({ channels: named, was: built ?? "not recorded", now: process.versions.unicode }, "indexed the public channels' names as they read again, with this runtime's Unicode tables");
    }
  }

  /**
   * Up to `limit` public channels whose names read as `name` (nameKey: "ｇｅｎｅｒａｌ",
   * "General" and "gen" + a zero-width space + "eral" read as "general"), in chid order
   * as text: more than one only for channels made before layout 7.
   */
  async readsAlike(name: string, limit = 1): Promise<string[]> {
    return (await readKeys(this.s.chreads, { ...nameKeyRange(nameKey(name)), limit })).map(nameKeyHolder);
  }

  nextChid(): string {
    return String(this.ids.next());
  }

  async get(chid: string): Promise<ChannelRecord | undefined> {
    const hit = this.records.get(chid);
    if (hit) return hit;
    const gen = this.recordsGen;
    const c = ((await this.s.channels.get(chid)) ?? (await this.s.privchans.get(chid))) as ChannelRecord | undefined;
    if (c && gen === this.recordsGen) {
      if (this.records.size >= CACHED_RECORDS) this.records.delete(this.records.keys().next().value as string);
      this.records.set(chid, c);
    }
    return c;
  }

  private dropRecord(chid: string): void {
    this.records.delete(chid);
    this.recordsGen++;
  }

  async byName(name: string): Promise<string | undefined> {
    return (await this.s.chname.get(name.toLowerCase())) as string | undefined;
  }

  /** Up to `limit` public channels after chid `after`, in key order (chids as text): one range read. */
  async page(limit: number, after?: string): Promise<ChannelRecord[]> {
    return readValues<ChannelRecord>(this.s.channels, after === undefined ? { limit } : { gt: after, limit });
  }

  /** Up to `limit` of the private channels `uid` is a member of after chid `after`, in the same order. */
  async privatePage(uid: string, limit: number, after?: string): Promise<ChannelRecord[]> {
    const all = prefixRange(uid);
    const chids = (await readKeys(this.s.privof, after === undefined ? { ...all, limit } : { gt: pair(uid, after), lt: all.lt, limit })).map(keyTail);
    const records = await Promise.all(chids.map((chid) => this.get(chid)));
    return records.filter((c): c is ChannelRecord => c !== undefined);
  }

  /** How many channels `uid` owns, counted up to `upTo`: a read of at most that many keys. */
  async ownedCount(uid: string, upTo: number): Promise<number> {
    return (await readKeys(this.s.owned, { ...prefixRange(uid), limit: upTo })).length;
  }

  /** How many channels `uid` is a member of, counted up to `upTo`. */
  async joinedCount(uid: string, upTo: number): Promise<number> {
    return (await readKeys(this.s.memberof, { ...prefixRange(uid), limit: upTo })).length;
  }

  /** Report with joined(c.chid, c.owner) once committed. */
  createOps(c: ChannelRecord): BatchOp[] {
    const record = c.private
      ? [put(this.s.privchans, c.chid, c)]
      : [put(this.s.channels, c.chid, c), put(this.s.chname, c.name.toLowerCase(), c.chid), put(this.s.chreads, readsEntry(c), 1)];
    return [...record, put(this.s.owned, pair(c.owner, c.chid), 1), ...this.joinOps(c.chid, c.owner, c.created, c.private)];
  }

  /** Report with removed(c.chid) once committed. */
  removeOps(c: ChannelRecord, members: readonly string[]): BatchOp[] {
    this.changing(c.chid);
    this.dropRecord(c.chid);
    this.gone.add(c.chid);
    if (this.gone.size > REMEMBERED_REMOVALS) this.gone.delete(this.gone.values().next().value as string);
    const ops = c.private
      ? [del(this.s.privchans, c.chid)]
      : [del(this.s.channels, c.chid), del(this.s.chname, c.name.toLowerCase()), del(this.s.chreads, readsEntry(c))];
    ops.push(del(this.s.owned, pair(c.owner, c.chid)));
    for (const uid of members) ops.push(...this.memberDels(c.chid, uid));
    return ops;
  }

  /**
   * True once the channel's removal is built: a join or a message that passed its
   * (awaited) checks before it must not be written after it.
   */
  isGone(chid: string): boolean {
    return this.gone.has(chid);
  }

  /** True once `uid`'s leave of `chid` is built (and no join since). */
  hasLeft(chid: string, uid: string): boolean {
    return this.departed.size > 0 && this.departed.has(`${chid}\u0000${uid}`);
  }

  /**
   * Up to `limit` members of `chid` after uid `after` ("" for the first), in uid order: a
   * page of a list its reader takes as it goes (enter's users), which then holds only
   * where it is. From the cached sorted list when there is one, else a range read (no
   * sort and no copy of the whole list for a page).
   */
  async membersAfter(chid: string, after: string, limit: number): Promise<string[]> {
    const sorted = this.fresh(chid)?.sorted;
    if (sorted !== undefined) {
      let lo = 0;
      let hi = sorted.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (sorted[mid] <= after) lo = mid + 1;
        else hi = mid;
      }
      return sorted.slice(lo, lo + limit);
    }
    const all = prefixRange(chid);
    return (await readKeys(this.s.members, after === "" ? { ...all, limit } : { gt: pair(chid, after), lt: all.lt, limit })).map(keyTail);
  }

  /** Members in uid order. */
  async members(chid: string): Promise<string[]> {
    const hit = this.fresh(chid);
    if (hit) return (hit.sorted ??= [...hit.uids].sort()).slice();
    if (this.unreported.has(chid)) return (await readKeys(this.s.members, prefixRange(chid))).map(keyTail);
    return [...(await this.load(chid))].sort();
  }

  /**
   * How many members of `chid` are in `present` (the users online): counted over the
   * smaller of the two sets, without copying or sorting either, so a listed channel
   * costs min(members, users online) lookups, not a copy of its member list.
   */
  async countPresent(chid: string, present: Pick<ReadonlyMap<string, unknown>, "has" | "size" | "keys">): Promise<number> {
    // A change in flight: the disk may be ahead of the cache (see the top).
    const uids = this.fresh(chid)?.uids ?? (this.unreported.has(chid) ? new Set(await this.members(chid)) : await this.load(chid));
    let n = 0;
    if (uids.size <= present.size) {
      for (const uid of uids) if (present.has(uid)) n++;
    } else {
      for (const uid of present.keys()) if (uids.has(uid)) n++;
    }
    return n;
  }

  async isMember(chid: string, uid: string): Promise<boolean> {
    const hit = this.fresh(chid);
    if (hit) return hit.uids.has(uid);
    if (this.unreported.has(chid)) return (await this.s.members.get(pair(chid, uid))) !== undefined;
    return (await this.load(chid)).has(uid);
  }

  /**
   * The members when they are cached (and no change is in flight), else undefined:
   * for the hot path, which then falls back to members(). A live view: copy it to
   * keep it past the current turn.
   */
  cachedMembers(chid: string): ReadonlySet<string> | undefined {
    return this.fresh(chid)?.uids;
  }

  async channelsOf(uid: string): Promise<string[]> {
    return (await readKeys(this.s.memberof, prefixRange(uid))).map(keyTail);
  }

  /** The channels `uid` owns (a member of them or not: an owner may leave). */
  async ownedBy(uid: string): Promise<string[]> {
    return (await readKeys(this.s.owned, prefixRange(uid))).map(keyTail);
  }

  /** Report with joined(chid, uid) once committed. `priv`: the channel is private. */
  joinOps(chid: string, uid: string, time: number, priv = false): BatchOp[] {
    this.changing(chid);
    this.departed.delete(`${chid}\u0000${uid}`);
    const ops = [put(this.s.members, pair(chid, uid), time), put(this.s.memberof, pair(uid, chid), 1)];
    if (priv) ops.push(put(this.s.privof, pair(uid, chid), 1));
    return ops;
  }

  /** Report with left(chid, uid) once committed. */
  leaveOps(chid: string, uid: string): BatchOp[] {
    this.changing(chid);
    const key = `${chid}\u0000${uid}`;
    this.departed.delete(key);
    if (this.departed.size >= REMEMBERED_REMOVALS) this.departed.delete(this.departed.values().next().value as string);
    this.departed.add(key);
    return this.memberDels(chid, uid);
  }

  /** The ops of leaveOps failed to commit: `uid` is still a member, its messages welcome. */
  notLeft(chid: string, uid: string): void {
    this.changed(chid);
    this.departed.delete(`${chid}\u0000${uid}`);
  }

  /**
   * The ops of `joins` joinOps (createOps makes one) failed to commit: nothing changed.
   * (Left counted as changing, the channel was never cached again: every event to it
   * read its members from disk.)
   */
  notJoined(chid: string, joins = 1): void {
    for (let i = 0; i < joins; i++) this.changed(chid);
  }

  /** The ops of joinOps (or createOps) are committed. */
  joined(chid: string, uid: string): void {
    this.changed(chid);
    const c = this.cache.get(chid);
    if (!c || c.uids.has(uid)) return;
    c.uids.add(uid);
    c.sorted = undefined;
    this.entries++;
    this.evict();
  }

  /** The ops of leaveOps are committed. */
  left(chid: string, uid: string): void {
    this.changed(chid);
    const c = this.cache.get(chid);
    if (!c || !c.uids.delete(uid)) return;
    c.sorted = undefined;
    this.entries--;
  }

  /** The ops of removeOps are committed. */
  removed(chid: string): void {
    this.dropRecord(chid);
    this.changed(chid);
    this.drop(chid);
  }

  /** The ops of removeOps failed to commit: the channel is not gone after all. */
  notRemoved(chid: string): void {
    this.gone.delete(chid);
    this.changed(chid);
  }

  /** What the membership cache holds. */
  get cacheSize(): { channels: number; entries: number } {
    return { channels: this.cache.size, entries: this.entries };
  }

  /**
   * The `privof` entry goes whatever the channel (a delete of a key that is not there
   * changes nothing): no caller has to know, and none can leave a private channel
   * listed for a user who left it.
   */
  private memberDels(chid: string, uid: string): BatchOp[] {
    return [del(this.s.members, pair(chid, uid)), del(this.s.memberof, pair(uid, chid)), del(this.s.privof, pair(uid, chid))];
  }

  private changing(chid: string): void {
    this.unreported.set(chid, (this.unreported.get(chid) ?? 0) + 1);
  }

  private changed(chid: string): void {
    const n = (this.unreported.get(chid) ?? 0) - 1;
    if (n > 0) this.unreported.set(chid, n);
    else this.unreported.delete(chid);
    const load = this.loads.get(chid);
    if (load) {
      load.current = false;
      this.loads.delete(chid);
    }
  }

  /** The cached entry, if it may be served (marked most recently used). */
  private fresh(chid: string): Cached | undefined {
    const c = this.cache.get(chid);
    if (!c || this.unreported.has(chid)) return undefined;
    this.cache.delete(chid);
    this.cache.set(chid, c);
    return c;
  }

  private load(chid: string): Promise<Set<string>> {
    const running = this.loads.get(chid);
    if (running) return running.uids;
    const load: Load = { uids: undefined as unknown as Promise<Set<string>>, current: true };
    load.uids = readKeys(this.s.members, prefixRange(chid)).then(
      (keys) => {
        if (this.loads.get(chid) === load) this.loads.delete(chid);
        const uids = new Set(keys.map(keyTail));
        if (load.current && !this.unreported.has(chid)) this.store(chid, uids);
        return uids;
      },
      (err: unknown) => {
        if (this.loads.get(chid) === load) this.loads.delete(chid);
        throw err;
      },
    );
    this.loads.set(chid, load);
    return load.uids;
  }

  private store(chid: string, uids: Set<string>): void {
    this.drop(chid);
    if (uids.size > this.limits.entries) return; // would evict everything else
    this.cache.set(chid, { uids, sorted: undefined });
    this.entries += uids.size;
    this.evict();
  }

  private drop(chid: string): void {
    const c = this.cache.get(chid);
    if (!c) return;
    this.cache.delete(chid);
    this.entries -= c.uids.size;
  }

  private evict(): void {
    while (this.cache.size > this.limits.channels || this.entries > this.limits.entries) {
      this.drop(this.cache.keys().next().value as string);
    }
  }
}

/** A public channel's `chreads` entry: its name's key and its chid. */
function readsEntry(c: ChannelRecord): string {
  return nameKeyEntry(nameKey(c.name), c.chid);
}
