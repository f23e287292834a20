// Messages (per conversation, in sequence order), the mid index, per-user offline
// queues and the client-message-id index.

import type { BlobStore } from "./blobs.js";
import { del, put, type BatchOp, type Counter, type Storage } from "./db.js";
import {
  keyTail,
  msgKey,
  pair,
  prefixRange,
  queueKey,
  seqKey,
  type MessageRecord,
  type Spaces,
} from "./layout.js";

export interface QueuedMessage {
  key: string;
  message: MessageRecord | undefined;
}

export class MessageStore {
  private readonly s: Spaces;
  constructor(
    private readonly storage: Storage,
    private readonly seq: Counter,
  ) {
    this.s = storage.spaces;
  }

  /** The next message sequence number; a message's mid is this number as a string. */
  nextSeq(): number {
    return this.seq.next();
  }

  appendOps(m: MessageRecord): BatchOp[] {
    const seq = Number(m.mid);
    const ops = [put(this.s.msgs, msgKey(m.conv, seq), m), put(this.s.mids, seqKey(seq), m.conv)];
    if (m.cmid !== undefined) ops.push(put(this.s.cmids, pair(m.from, m.cmid), m.mid));
    return ops;
  }

  enqueueOps(uid: string, m: MessageRecord): BatchOp[] {
    return [put(this.s.queue, queueKey(uid, Number(m.mid)), m.conv)];
  }

  dequeueOps(key: string): BatchOp[] {
    return [del(this.s.queue, key)];
  }

  queueKey(uid: string, mid: string): string {
    return queueKey(uid, Number(mid));
  }

  async byCmid(from: string, cmid: string): Promise<MessageRecord | undefined> {
    const mid = (await this.s.cmids.get(pair(from, cmid))) as string | undefined;
    return mid === undefined ? undefined : this.get(mid);
  }

  /** Ops replacing a stored message's record (an edit). */
  updateOps(m: MessageRecord): BatchOp[] {
    return [put(this.s.msgs, msgKey(m.conv, Number(m.mid)), m)];
  }

  /** Ops removing a message from its history, the mid index and its recipient's queue. */
  removeOps(m: MessageRecord): BatchOp[] {
    const seq = Number(m.mid);
    const ops = [del(this.s.msgs, msgKey(m.conv, seq)), del(this.s.mids, seqKey(seq))];
    if (m.to !== undefined) ops.push(del(this.s.queue, queueKey(m.to, seq)));
    if (m.cmid !== undefined) ops.push(del(this.s.cmids, pair(m.from, m.cmid)));
    return ops;
  }

  /**
   * The newest `limit` messages of a conversation older than `before` (a mid), oldest
   * first: one bounded reverse range read, whatever the conversation's length.
   */
  async history(conv: string, limit: number, before?: string): Promise<MessageRecord[]> {
    const range = prefixRange(conv);
    const lt = before !== undefined ? msgKey(conv, Number(before)) : range.lt;
    const values = (await this.s.msgs.values({ gt: range.gt, lt, reverse: true, limit }).all()) as MessageRecord[];
    return values.reverse();
  }

  /**
   * Deletes every message of a conversation (a deleted channel), page by page, with
   * their blob references; blobs no longer used are then removed.
   */
  async purge(conv: string, blobs: BlobStore): Promise<void> {
    for (;;) {
      const page = (await this.s.msgs.values({ ...prefixRange(conv), limit: 500 }).all()) as MessageRecord[];
      if (page.length === 0) return;
      const ops = page.flatMap((m) => [...this.removeOps(m), ...(m.attach ? blobs.unrefOps(m.attach.sha, m.mid) : [])]);
      await this.storage.commit(ops);
      for (const m of page) if (m.attach) void blobs.collect(m.attach.sha);
    }
  }

  /**
   * Ops removing what only a (deleted) user needed: their offline queue, their cmid
   * index and their list of direct peers. Their messages stay in others' history.
   */
  async forgetUserOps(uid: string): Promise<BatchOp[]> {
    const ops: BatchOp[] = [];
    for (const space of [this.s.queue, this.s.cmids, this.s.peers]) {
      for (const key of await space.keys(prefixRange(uid)).all()) ops.push(del(space, key));
    }
    return ops;
  }

  /** Ops recording that two users have a direct conversation (for dialogs). */
  peerOps(a: string, b: string): BatchOp[] {
    return a === b ? [put(this.s.peers, pair(a, b), 1)] : [put(this.s.peers, pair(a, b), 1), put(this.s.peers, pair(b, a), 1)];
  }

  async peers(uid: string): Promise<string[]> {
    return (await this.s.peers.keys(prefixRange(uid)).all()).map(keyTail);
  }

  async get(mid: string): Promise<MessageRecord | undefined> {
    if (!/^\d{1,15}$/.test(mid)) return undefined;
    const seq = Number(mid);
    const conv = (await this.s.mids.get(seqKey(seq))) as string | undefined;
    if (conv === undefined) return undefined;
    return (await this.s.msgs.get(msgKey(conv, seq))) as MessageRecord | undefined;
  }

  /** Up to `limit` queued messages of `uid`, oldest first, after `afterKey` if given. */
  async queued(uid: string, limit: number, afterKey?: string): Promise<QueuedMessage[]> {
    const range = prefixRange(uid);
    const entries = await this.s.queue
      .iterator({ gt: afterKey ?? range.gt, lt: range.lt, limit })
      .all();
    if (entries.length === 0) return [];
    const keys = entries.map(([key, conv]) => msgKey(conv as string, Number(keyTail(key))));
    const messages = (await this.s.msgs.getMany(keys)) as (MessageRecord | undefined)[];
    return entries.map(([key], n) => ({ key, message: messages[n] }));
  }
}
