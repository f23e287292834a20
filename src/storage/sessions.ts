// Sessions: a sid (128 random bits, hex) names a stored login that survives reconnects
// and restarts until logout, password change or expiry.

import { randomBytes } from "node:crypto";
import { del, put, type BatchOp, type Storage } from "./db.js";
import { pair, prefixRange, keyTail, type SessionRecord, type Spaces } from "./layout.js";
import { readKeys } from "./range.js";

export class SessionStore {
  private readonly s: Spaces;
  constructor(storage: Storage) {
    this.s = storage.spaces;
  }

  newSid(): string {
    return randomBytes(16).toString("hex");
  }

  createOps(sid: string, rec: SessionRecord): BatchOp[] {
    return [put(this.s.sessions, sid, rec), put(this.s.usessions, pair(rec.uid, sid), rec.expires)];
  }

  async get(sid: string): Promise<SessionRecord | undefined> {
    return (await this.s.sessions.get(sid)) as SessionRecord | undefined;
  }

  revokeOps(uid: string, sid: string): BatchOp[] {
    return [del(this.s.sessions, sid), del(this.s.usessions, pair(uid, sid))];
  }

  async listSids(uid: string): Promise<string[]> {
    const keys = await readKeys(this.s.usessions, prefixRange(uid));
    return keys.map(keyTail);
  }
}
