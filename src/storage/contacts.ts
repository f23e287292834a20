// Contact lists, stored both ways: an owner's list and, for each user, who lists them.

import { del, put, type BatchOp, type Storage } from "./db.js";
import { keyHead, keyTail, pair, prefixRange, type Spaces } from "./layout.js";
import { readKeys } from "./range.js";
import { ReadCache } from "./read-cache.js";

/**
 * Contact lists remembered (contactlist reads its caller's on every call; a soak's 80 a
 * second were a sixth of its range reads): at most this many uids in all, the least
 * recently read list evicted first. A write to an owner's list drops it (read-cache.ts).
 */
const LIST_CACHE_UIDS = 262_144;

export class ContactStore {
  private readonly s: Spaces;
  private readonly lists = new ReadCache<string>(LIST_CACHE_UIDS, keyHead);
  constructor(storage: Storage) {
    this.s = storage.spaces;
    storage.watch(this.s.contacts, this.lists);
  }

  async list(owner: string): Promise<string[]> {
    return this.lists.read(owner, owner, async () => (await readKeys(this.s.contacts, prefixRange(owner))).map(keyTail));
  }

  /** Users who have `uid` in their contact list. */
  async listedBy(uid: string): Promise<string[]> {
    return (await readKeys(this.s.contactof, prefixRange(uid))).map(keyTail);
  }

  /** How many users `owner` lists, counted up to `upTo`: a read of at most that many keys. */
  async count(owner: string, upTo: number): Promise<number> {
    return (await readKeys(this.s.contacts, { ...prefixRange(owner), limit: upTo })).length;
  }

  async has(owner: string, uid: string): Promise<boolean> {
    return (await this.s.contacts.get(pair(owner, uid))) !== undefined;
  }

  addOps(owner: string, uid: string): BatchOp[] {
    return [put(this.s.contacts, pair(owner, uid), 1), put(this.s.contactof, pair(uid, owner), 1)];
  }

  removeOps(owner: string, uid: string): BatchOp[] {
    return [del(this.s.contacts, pair(owner, uid)), del(this.s.contactof, pair(uid, owner))];
  }
}
