// Sessions: a sid (128 random bits, hex) names a stored login that survives reconnects
// and restarts until logout, password change, eviction by a newer session past the
// per-user cap, or expiry. Only a SHA-256 of the sid is stored, so a copy of the
// database logs nobody in. Expired sessions are swept through an index by expiry.

import { createHash, randomBytes } from "node:crypto";
import { del, put, type BatchOp, type Storage } from "./db.js";
import { pair, prefixRange, keyTail, seqKey, type SessionRecord, type Spaces } from "./layout.js";
import { readEntries } from "./range.js";

/** The stored name of a sid. */
export function sidHash(sid: string): string {
  return createHash("sha256").update(sid, "utf8").digest("hex");
}

/** `meta` key set once the sessions of an older version (stored by plain sid) are migrated. */
const HASHED_MARK = "sessions-hashed";

/** Sessions read per page during migration and per sweep step. */
const PAGE = 1000;

export interface StoredSession {
  hash: string;
  expires: number;
  /** When it was issued (ms, strictly increasing in one process): the oldest goes first. */
  issued: number;
}

export class SessionStore {
  private readonly s: Spaces;
  private lastIssued = 0;
  constructor(private readonly storage: Storage) {
    this.s = storage.spaces;
  }

  /**
   * Start-up: rewrites sessions an older version stored under the plain sid (once),
   * then sweeps every expired session. Returns how many of each.
   */
  async init(now: number): Promise<{ migrated: number; swept: number }> {
    let migrated = 0;
    if (!(await this.s.meta.get(HASHED_MARK))) {
      let after = "";
      for (;;) {
        const page = await readEntries<SessionRecord>(this.s.sessions, { gt: after, limit: PAGE });
        if (page.length === 0) break;
        const ops: BatchOp[] = [];
        for (const [key, rec] of page) {
          after = key;
          if (key.length === 64) continue; // already a hash
          ops.push(del(this.s.sessions, key), del(this.s.usessions, pair(rec.uid, key)), ...this.createOps(key, rec, rec.created * 1000));
          migrated++;
        }
        await this.storage.commit(ops);
      }
      await this.storage.commit([put(this.s.meta, HASHED_MARK, 1)]);
    }
    let swept = 0;
    for (;;) {
      const n = (await this.sweep(now, PAGE)).length;
      swept += n;
      if (n < PAGE) break;
    }
    return { migrated, swept };
  }

  newSid(): string {
    return randomBytes(16).toString("hex");
  }

  createOps(sid: string, rec: SessionRecord, issued = (this.lastIssued = Math.max(Date.now(), this.lastIssued + 1))): BatchOp[] {
    return this.createHashedOps(sidHash(sid), rec, issued);
  }

  /** createOps for a session known by its hash (cluster mode: the log never carries a sid). */
  createHashedOps(h: string, rec: SessionRecord, issued: number): BatchOp[] {
    return [
      put(this.s.sessions, h, rec),
      put(this.s.usessions, pair(rec.uid, h), [rec.expires, issued]),
      put(this.s.sessexp, pair(seqKey(rec.expires), h), rec.uid),
    ];
  }

  async get(sid: string): Promise<SessionRecord | undefined> {
    return (await this.s.sessions.get(sidHash(sid))) as SessionRecord | undefined;
  }

  /** Ops removing one session, named by its hash (see `list`). */
  revokeOps(uid: string, hash: string, expires: number): BatchOp[] {
    return [del(this.s.sessions, hash), del(this.s.usessions, pair(uid, hash)), del(this.s.sessexp, pair(seqKey(expires), hash))];
  }

  /** A user's stored sessions (at most the per-user cap, plus what an older version left). */
  async list(uid: string): Promise<StoredSession[]> {
    const entries = await readEntries<number | [number, number]>(this.s.usessions, prefixRange(uid));
    return entries.map(([key, v]) => {
      const [expires, issued] = typeof v === "number" ? [v, 0] : v;
      return { hash: keyTail(key), expires, issued };
    });
  }

  /**
   * Removes up to `limit` sessions that expired by `now` (one batch) and returns them;
   * fewer than `limit` means none is left.
   */
  async sweep(now: number, limit: number): Promise<{ uid: string; hash: string }[]> {
    const due = await this.due(now, limit);
    await this.storage.commit(this.sweepOps(due));
    return due;
  }

  /** Up to `limit` stored sessions expired at `now`, soonest first. */
  async due(now: number, limit: number): Promise<ExpiredSession[]> {
    return (await readEntries<string>(this.s.sessexp, { lt: seqKey(now + 1), limit })).map(([key, uid]) => ({ key, uid, hash: keyTail(key) }));
  }

  /** Removes the sessions `due` found. */
  sweepOps(due: readonly ExpiredSession[]): BatchOp[] {
    return due.flatMap(({ key, uid, hash }) => [del(this.s.sessexp, key), del(this.s.sessions, hash), del(this.s.usessions, pair(uid, hash))]);
  }
}

/** An expired session as the sweep reads it (its `sessexp` key, owner and sid hash). */
export interface ExpiredSession {
  key: string;
  uid: string;
  hash: string;
}
