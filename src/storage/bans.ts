// Operator bans of logins and IP addresses. The whole list is read at start-up and
// kept in memory (it is checked on every accept and every login); it changes only
// through the admin port or `wirechat ban` on a stopped server.

import { del, put, type BatchOp, type Storage } from "./db.js";
import { banKey, type BanKind, type BanRecord, type Space } from "./layout.js";
import { readEntries } from "./range.js";
import { nameKey } from "./users.js";

/** The text a login of a banned account is refused with (status 15). */
export const BANNED_LOGIN = "this account is banned";

/** Bans kept at most: an operator list, not a firewall (use one past this). */
export const MAX_BANS = 100_000;

export interface Ban extends BanRecord {
  kind: BanKind;
  value: string;
}

export class BanStore {
  private readonly space: Space;
  private readonly bans = new Map<string, Ban>();
  /** Login bans by how the login reads (nameKey) → their keys: a new login reading as a banned one is refused too. */
  private readonly readsAs = new Map<string, Set<string>>();

  constructor(private readonly storage: Storage) {
    this.space = storage.spaces.bans;
  }

  async load(): Promise<void> {
    for (const [key, rec] of (await readEntries(this.space, {})) as [string, BanRecord][]) {
      const colon = key.indexOf(":");
      this.bans.set(key, { kind: key.slice(0, colon) as BanKind, value: key.slice(colon + 1), ...rec });
      this.noteReading(key, true);
    }
  }

  /** Keeps readsAs in step with a login ban's key added or lifted. */
  private noteReading(key: string, present: boolean): void {
    if (!key.startsWith("login:")) return;
    const reads = nameKey(key.slice(6));
    let keys = this.readsAs.get(reads);
    if (present) {
      if (!keys) this.readsAs.set(reads, (keys = new Set()));
      keys.add(key);
    } else if (keys) {
      keys.delete(key);
      if (keys.size === 0) this.readsAs.delete(reads);
    }
  }

  /**
   * A login ban whose login reads as `login` (storage/users.ts nameKey), if any: a new
   * account's login that only looks like a banned one (ｅｖｉｌ for evil) is refused too.
   */
  bannedReadingAs(login: string): Ban | undefined {
    if (this.readsAs.size === 0) return undefined;
    const keys = this.readsAs.get(nameKey(login));
    return keys === undefined ? undefined : this.bans.get(keys.values().next().value as string);
  }

  banned(kind: BanKind, value: string): Ban | undefined {
    return this.bans.size === 0 ? undefined : this.bans.get(banKey(kind, value));
  }

  get size(): number {
    return this.bans.size;
  }

  list(): Ban[] {
    return [...this.bans.values()];
  }

  /** Stores a ban (durable when this resolves); false when the list is full. */
  async add(kind: BanKind, value: string, reason: string): Promise<Ban | undefined> {
    if (this.full(kind, value)) return undefined;
    const rec: BanRecord = { reason, at: Math.floor(Date.now() / 1000) };
    await this.storage.commit(this.addOps(kind, value, rec));
    return this.added(kind, value, rec);
  }

  /** Lifts a ban; false when there was none. */
  async remove(kind: BanKind, value: string): Promise<boolean> {
    if (!this.banned(kind, value)) return false;
    await this.storage.commit(this.removeOps(kind, value));
    this.removed(kind, value);
    return true;
  }

  /** Whether a new ban of `value` would pass MAX_BANS. */
  private full(kind: BanKind, value: string): boolean {
    return !this.bans.has(banKey(kind, value)) && this.bans.size >= MAX_BANS;
  }

  /** Report with added() once written (cluster mode's apply writes them in its batch). */
  addOps(kind: BanKind, value: string, rec: BanRecord): BatchOp[] {
    return [put(this.space, banKey(kind, value), rec)];
  }

  added(kind: BanKind, value: string, rec: BanRecord): Ban {
    const key = banKey(kind, value);
    const ban: Ban = { kind, value: key.slice(kind.length + 1), ...rec };
    this.bans.set(key, ban);
    this.noteReading(key, true);
    return ban;
  }

  /** Report with removed() once written. */
  removeOps(kind: BanKind, value: string): BatchOp[] {
    return [del(this.space, banKey(kind, value))];
  }

  removed(kind: BanKind, value: string): void {
    const key = banKey(kind, value);
    this.bans.delete(key);
    this.noteReading(key, false);
  }
}
