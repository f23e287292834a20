// Contact lists, stored both ways: an owner's list and, for each user, who lists them.

import { del, put, type BatchOp, type Storage } from "./db.js";
import { keyTail, pair, prefixRange, type Spaces } from "./layout.js";
import { readKeys } from "./range.js";

export class ContactStore {
  private readonly s: Spaces;
  constructor(storage: Storage) {
    this.s = storage.spaces;
  }

  async list(owner: string): Promise<string[]> {
    return (await readKeys(this.s.contacts, prefixRange(owner))).map(keyTail);
  }

  /** Users who have `uid` in their contact list. */
  async listedBy(uid: string): Promise<string[]> {
    return (await readKeys(this.s.contactof, prefixRange(uid))).map(keyTail);
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
