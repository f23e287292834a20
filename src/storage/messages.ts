// Messages: records per conversation, the message log, and the indexes derived from
// it (each user's inbox of direct messages, the cmid index), delivery cursors and
// direct peers.
//
// A message's own synced batch holds its record (`msgs`) and an entry in the batch's
// log chunk (`mlog`, one put per batch). Everything else about it is derived from
// the log: once the batch is on disk its inbox and cmid entries wait in memory (at
// most DERIVED_DELAY_MS or DERIVED_MAX entries) and are then written together, lazily,
// with the watermark `meta indexed` in the same batch. At start-up the log past the
// watermark is replayed, so a crash can lose none of them. Readers merge what is in
// memory with what is on disk.

import type { Logger } from "pino";
import { del, put, putText, type BatchOp, type Counter, type Storage } from "./db.js";
import {
  convOf,
  directConv,
  entryConv,
  inboxKey,
  keyTail,
  msgKey,
  pair,
  prefixRange,
  recordJson,
  seqKey,
  LAYOUT_VERSION,
  V1_SPACES,
  type Space,
  type InboxChunk,
  type LogChunk,
  type LogEntry,
  type MessageRecord,
  type Spaces,
} from "./layout.js";
import { readEntries, readKeys, readValues } from "./range.js";

/** Derived entries wait at most this long in memory before they are written. */
const DERIVED_DELAY_MS = 100;
/** ... or until this many are waiting. */
const DERIVED_MAX = 8192;
/** Recent (sender, cmid) → [mid, time] kept in memory: resends within it read nothing. */
const CMID_WINDOW = 65536;
/** Direct conversations known to be in `peers` (saves a write per message). */
const KNOWN_PEERS = 100_000;

export interface InboxItem {
  seq: number;
  /** undefined when the message has been deleted since. */
  message: MessageRecord | undefined;
}

/** Derived entries of committed batches, by state. */
class Derived {
  inbox = new Map<string, InboxChunk>();
  cmids = new Map<string, [string, number]>();
  count = 0;
  /** Highest seq whose derived entries are in here (or earlier generations). */
  through = 0;
}

export class MessageStore {
  private readonly s: Spaces;
  /** The log chunk of the batch being gathered, and the times of its cmid messages. */
  private chunk: LogChunk | undefined;
  private chunkFirst = 0;
  private chunkTimes: Map<number, number> | undefined;
  /** Committed, not yet handed to a batch. */
  private pending = new Derived();
  /** Handed to the batch being written. */
  private writing: Derived | undefined;
  private derivedTimer: NodeJS.Timeout | undefined;
  private derivedDue = false;
  private readonly recentCmids = new Map<string, [string, number]>();
  /** sender → recipients whose pair is known to be in `peers` (bounded, see KNOWN_PEERS). */
  private readonly knownPeers = new Map<string, Set<string>>();
  private knownPeerCount = 0;
  /** Cursor advances not yet written. */
  private readonly cursors = new Map<string, number>();

  constructor(
    private readonly storage: Storage,
    private readonly seq: Counter,
    private readonly log: Logger,
  ) {
    this.s = storage.spaces;
    storage.contribute(() => this.contribute());
  }

  /**
   * Brings a layout-1 database to this layout: the mid index becomes log chunks, each
   * queued (undelivered) message an inbox entry, each cmid [mid, time]; then the old
   * keyspaces are emptied. One batch per page, so a crash part-way resumes cleanly
   * (what was moved is gone from the old keyspaces).
   */
  private async migrateV1(): Promise<void> {
    const db = this.storage.db;
    const [mids, queue] = V1_SPACES.map((name) => db.sublevel<string, unknown>(name, { keyEncoding: "utf8", valueEncoding: "json" }) as unknown as Space);
    let moved = 0;
    for (;;) {
      const page = (await readEntries(mids, { limit: 1000 })) as [string, string][];
      if (page.length === 0) break;
      const ops: BatchOp[] = [];
      for (const [key, conv] of page) {
        const seq = Number(key);
        const m = await this.read(conv, seq);
        ops.push(del(mids, key));
        if (!m) continue;
        const entry: LogEntry = m.chid !== undefined ? [m.from, "", m.chid] : [m.from, m.to as string];
        const cmid = (m as { cmid?: string }).cmid;
        if (cmid !== undefined) {
          entry[2] ??= "";
          entry[3] = cmid;
          ops.push(put(this.s.cmids, pair(m.from, cmid), [m.mid, m.time]));
        }
        ops.push(put(this.s.mlog, seqKey(seq), [entry]));
        moved++;
      }
      await this.storage.commit(ops);
    }
    for (;;) {
      const page = (await readEntries(queue, { limit: 1000 })) as [string, string][];
      if (page.length === 0) break;
      const ops: BatchOp[] = [];
      for (const [key, conv] of page) {
        const bang = key.indexOf("!");
        const uid = key.slice(0, bang);
        const seq = Number(key.slice(bang + 1));
        const m = await this.read(conv, seq);
        if (m) ops.push(put(this.s.inbox, inboxKey(uid, seq), [[seq, m.from]]));
        ops.push(del(queue, key));
      }
      await this.storage.commit(ops);
    }
    await this.storage.commit([put(this.s.meta, "layout", LAYOUT_VERSION), put(this.s.meta, "indexed", this.seq.last)]);
    if (moved > 0) this.log.info({ messages: moved }, "migrated messages from layout 1");
  }

  /** Replays the log past the derived-index watermark (after a crash) and writes it. */
  async init(): Promise<void> {
    const layout = (await this.s.meta.get("layout")) as number | undefined;
    if (layout === undefined) await this.migrateV1();
    else if (layout > LAYOUT_VERSION) {
      throw new Error(`the database has layout ${layout}, newer than this server's ${LAYOUT_VERSION}: upgrade wirechat`);
    }
    const through = ((await this.s.meta.get("indexed")) as number | undefined) ?? 0;
    let replayed = 0;
    const chunks = await this.logFrom(through + 1);
    for (const [first, chunk] of chunks) {
      for (let i = 0; i < chunk.length; i++) {
        const seq = first + i;
        if (seq <= through || !chunk[i]) continue;
        const e = chunk[i] as LogEntry;
        let time = 0;
        if (e[3]) time = (await this.read(entryConv(e), seq))?.time ?? 0;
        this.derive(seq, e, time);
        replayed++;
      }
    }
    if (replayed > 0) {
      this.log.info({ replayed, through }, "rebuilt derived message indexes from the log");
      this.derivedDue = true;
      await this.storage.commit([]);
      this.storage.schedule();
      await this.storage.settle();
    }
  }

  /** Log chunks that may hold seqs ≥ `from`, in order. */
  private async logFrom(from: number): Promise<[number, LogChunk][]> {
    const before = (await readEntries(this.s.mlog, { lte: seqKey(from), reverse: true, limit: 1 })) as [string, LogChunk][];
    const after = (await readEntries(this.s.mlog, { gt: seqKey(from) })) as [string, LogChunk][];
    return [...before, ...after].map(([k, c]) => [Number(k), c]);
  }

  /** The last seq handed out. */
  get lastSeq(): number {
    return this.seq.last;
  }

  /**
   * Adds a message to the batch being gathered: assigns its mid, writes its record
   * and its log entry. Returns the record's JSON text (see recordJson). The caller
   * waits for the batch with storage.afterCommit before acknowledging.
   */
  append(m: MessageRecord, cmid: string | undefined): { json: string; cut: number } {
    const seq = this.seq.next();
    m.mid = String(seq);
    const text = recordJson(m);
    const conv = convOf(m);
    this.storage.put(this.s.msgs.prefix + msgKey(conv, seq), text.json);
    if (!this.chunk) this.openChunk(seq);
    const entry: LogEntry = m.chid !== undefined ? [m.from, "", m.chid] : [m.from, m.to as string];
    if (cmid !== undefined) {
      entry[2] ??= "";
      entry[3] = cmid;
      (this.chunkTimes as Map<number, number>).set(seq, m.time);
    }
    (this.chunk as LogChunk)[seq - this.chunkFirst] = entry;
    return text;
  }

  /**
   * Starts the log chunk of the batch being gathered. Its commit callback is
   * registered before any of its messages' own, so their entries are derived (and
   * visible to byCmid and inboxAfter) before anyone hears of them.
   */
  private openChunk(first: number): void {
    const chunk: LogChunk = [];
    const times = new Map<number, number>();
    this.chunk = chunk;
    this.chunkFirst = first;
    this.chunkTimes = times;
    this.storage.afterCommit((err) => {
      if (err) return;
      for (let i = 0; i < chunk.length; i++) {
        const e = chunk[i] as LogEntry | undefined;
        if (e) this.derive(first + i, e, e[3] === undefined ? 0 : (times.get(first + i) ?? 0));
      }
      this.armDerived();
    });
  }

  /** Runs as each batch is about to be written. */
  private contribute(): void {
    const chunk = this.chunk;
    if (chunk) {
      this.storage.put(this.s.mlog.prefix + seqKey(this.chunkFirst), JSON.stringify(chunk));
      this.chunk = undefined;
      this.chunkTimes = undefined;
    }
    if ((this.derivedDue || this.pending.count >= DERIVED_MAX) && !this.writing && (this.pending.count > 0 || this.cursors.size > 0)) {
      this.writeDerived();
    }
  }

  private derive(seq: number, e: LogEntry, time: number): void {
    const p = this.pending;
    const [from, to, , cmid] = e;
    if (to !== "") {
      let list = p.inbox.get(to);
      if (!list) p.inbox.set(to, (list = []));
      list.push([seq, from]);
      p.count++;
    }
    if (cmid !== undefined) {
      const key = pair(from, cmid);
      const v: [string, number] = [String(seq), time];
      p.cmids.set(key, v);
      this.rememberCmid(key, v);
      p.count++;
    }
    if (seq > p.through) p.through = seq;
  }

  private armDerived(): void {
    if (this.pending.count >= DERIVED_MAX) {
      this.storage.schedule();
      return;
    }
    if (this.derivedTimer || this.pending.count === 0) return;
    this.derivedTimer = setTimeout(() => {
      this.derivedTimer = undefined;
      this.derivedDue = true;
      this.storage.schedule();
    }, DERIVED_DELAY_MS);
    this.derivedTimer.unref();
  }

  private writeDerived(): void {
    const d = this.pending;
    this.pending = new Derived();
    this.derivedDue = false;
    if (this.derivedTimer) {
      clearTimeout(this.derivedTimer);
      this.derivedTimer = undefined;
    }
    const ops: BatchOp[] = [];
    for (const [uid, list] of d.inbox) ops.push(put(this.s.inbox, inboxKey(uid, list[0][0]), list));
    for (const [key, v] of d.cmids) ops.push(put(this.s.cmids, key, v));
    if (d.through > 0) ops.push(put(this.s.meta, "indexed", d.through));
    for (const [uid, seq] of this.cursors) ops.push(put(this.s.cursor, uid, seq));
    this.cursors.clear();
    this.writing = d;
    this.storage.commitLazy(ops);
    this.storage.afterWrite(() => {
      if (this.writing === d) this.writing = undefined;
      if (this.pending.count > 0) this.armDerived();
    });
  }

  private rememberCmid(key: string, v: [string, number]): void {
    this.recentCmids.delete(key);
    this.recentCmids.set(key, v);
    if (this.recentCmids.size > CMID_WINDOW) this.recentCmids.delete(this.recentCmids.keys().next().value as string);
  }

  /** The [mid, time] of the sender's message with this cmid, if it is stored. */
  async byCmid(from: string, cmid: string): Promise<[string, number] | undefined> {
    const key = pair(from, cmid);
    const hit = this.recentCmids.get(key) ?? this.pending.cmids.get(key) ?? this.writing?.cmids.get(key);
    if (hit) return hit;
    const v = (await this.s.cmids.get(key)) as [string, number] | undefined;
    if (v) this.rememberCmid(key, v);
    return v;
  }

  /** The cmid of the message at `seq`, from its log entry. */
  private async logEntry(seq: number): Promise<LogEntry | undefined> {
    const found = (await readEntries(this.s.mlog, { lte: seqKey(seq), reverse: true, limit: 1 })) as [string, LogChunk][];
    if (found.length === 0) return undefined;
    const [key, chunk] = found[0];
    return chunk[seq - Number(key)] ?? undefined;
  }

  private async read(conv: string, seq: number): Promise<MessageRecord | undefined> {
    return (await this.s.msgs.get(msgKey(conv, seq))) as MessageRecord | undefined;
  }

  /** A message by mid: one seek in the log, one read of the record. */
  async get(mid: string): Promise<MessageRecord | undefined> {
    if (!/^\d{1,15}$/.test(mid)) return undefined;
    const seq = Number(mid);
    const e = await this.logEntry(seq);
    return e ? this.read(entryConv(e), seq) : undefined;
  }

  /** Ops replacing a stored message's record (an edit). */
  updateOps(m: MessageRecord): BatchOp[] {
    return [putText(this.s.msgs, msgKey(convOf(m), Number(m.mid)), recordJson(m).json)];
  }

  /**
   * Ops removing a message from its history and its cmid from the index. Its log and
   * inbox entries stay: they name a record that no longer exists, which readers skip.
   */
  async removeOps(m: MessageRecord): Promise<BatchOp[]> {
    const seq = Number(m.mid);
    const ops = [del(this.s.msgs, msgKey(convOf(m), seq))];
    const e = await this.logEntry(seq);
    if (e && e[3] !== undefined) {
      const key = pair(m.from, e[3]);
      this.recentCmids.delete(key);
      this.pending.cmids.delete(key);
      ops.push(del(this.s.cmids, key));
    }
    return ops;
  }

  /**
   * The newest `limit` messages of a conversation older than `before` (a mid), oldest
   * first: one bounded reverse range read, whatever the conversation's length.
   */
  async history(conv: string, limit: number, before?: string): Promise<MessageRecord[]> {
    const range = prefixRange(conv);
    const lt = before !== undefined ? msgKey(conv, Number(before)) : range.lt;
    const values = (await readValues(this.s.msgs, { gt: range.gt, lt, reverse: true, limit })) as MessageRecord[];
    return values.reverse();
  }

  /** Keys (seqs) of a conversation's newest `limit` messages before `before`, oldest first. */
  async historySeqs(conv: string, limit: number, before?: string): Promise<number[]> {
    const range = prefixRange(conv);
    const lt = before !== undefined ? msgKey(conv, Number(before)) : range.lt;
    const keys = await readKeys(this.s.msgs, { gt: range.gt, lt, reverse: true, limit });
    return keys.map((k) => Number(k.slice(conv.length + 1))).reverse();
  }

  /** Records of `conv` at these seqs (deleted ones skipped), in order. */
  async records(conv: string, seqs: readonly number[]): Promise<MessageRecord[]> {
    if (seqs.length === 0) return [];
    const found = (await this.s.msgs.getMany(seqs.map((q) => msgKey(conv, q)))) as (MessageRecord | undefined)[];
    return found.filter((m): m is MessageRecord => m !== undefined);
  }

  /**
   * Deletes every message of a conversation (a deleted channel), page by page; returns
   * the attachments they used (the caller drops their references).
   */
  async purge(conv: string, onPage: (page: MessageRecord[]) => Promise<BatchOp[]>): Promise<void> {
    for (;;) {
      const page = (await readValues(this.s.msgs, { ...prefixRange(conv), limit: 500 })) as MessageRecord[];
      if (page.length === 0) return;
      const ops = [...page.map((m) => del(this.s.msgs, msgKey(conv, Number(m.mid)))), ...(await onPage(page))];
      await this.storage.commit(ops);
    }
  }

  /**
   * Ops removing what only a (deleted) user needed: their inbox, cursor, cmid index and
   * list of direct peers. Their messages stay in others' history.
   */
  async forgetUserOps(uid: string): Promise<BatchOp[]> {
    const ops: BatchOp[] = [del(this.s.cursor, uid)];
    this.cursors.delete(uid);
    this.pending.inbox.delete(uid);
    for (const space of [this.s.inbox, this.s.cmids, this.s.peers]) {
      for (const key of await readKeys(space, prefixRange(uid))) ops.push(del(space, key));
    }
    return ops;
  }

  /**
   * Ops recording that two users have a direct conversation (for dialogs); none once
   * the pair is known to be recorded (call peersKnown after the commit).
   */
  peerOps(a: string, b: string): BatchOp[] | undefined {
    if (this.knownPeers.get(a)?.has(b)) return undefined;
    return a === b ? [put(this.s.peers, pair(a, b), 1)] : [put(this.s.peers, pair(a, b), 1), put(this.s.peers, pair(b, a), 1)];
  }

  peersKnown(a: string, b: string): void {
    if (this.knownPeerCount >= KNOWN_PEERS) {
      this.knownPeers.clear();
      this.knownPeerCount = 0;
    }
    let set = this.knownPeers.get(a);
    if (!set) this.knownPeers.set(a, (set = new Set()));
    if (!set.has(b)) {
      set.add(b);
      this.knownPeerCount++;
    }
  }

  async peers(uid: string): Promise<string[]> {
    return (await readKeys(this.s.peers, prefixRange(uid))).map(keyTail);
  }

  /** The seq through which `uid`'s inbox has been delivered. */
  async cursor(uid: string): Promise<number> {
    const mem = this.cursors.get(uid);
    if (mem !== undefined) return mem;
    return ((await this.s.cursor.get(uid)) as number | undefined) ?? 0;
  }

  /**
   * Advances `uid`'s cursor (never backwards; the stored value is compared when it is
   * read back by the caller). Written lazily: a lost advance only redelivers.
   */
  advance(uid: string, seq: number): void {
    const cur = this.cursors.get(uid);
    if (cur !== undefined && cur >= seq) return;
    this.cursors.set(uid, seq);
    this.armCursor();
  }

  private cursorTimer: NodeJS.Timeout | undefined;
  private armCursor(): void {
    if (this.cursorTimer) return;
    this.cursorTimer = setTimeout(() => {
      this.cursorTimer = undefined;
      this.derivedDue = true;
      this.storage.schedule();
    }, 1000);
    this.cursorTimer.unref();
  }

  /**
   * Up to `limit` of `uid`'s inbox entries after `after`, oldest first, with their
   * records. Memory is read in the same turn as the disk iterators take their
   * snapshot, and entries leave memory only once their write has completed, so every
   * entry committed before the call is seen; duplicates between the two are merged.
   */
  async inboxAfter(uid: string, after: number, limit: number): Promise<InboxItem[]> {
    {
      const mem: [number, string][] = [];
      for (const d of [this.writing, this.pending]) {
        const list = d?.inbox.get(uid);
        if (list) for (const e of list) if (e[0] > after) mem.push(e);
      }
      const prefix = `${uid}!`;
      const [before, later] = await Promise.all([
        readEntries(this.s.inbox, { gt: prefix, lte: inboxKey(uid, after), reverse: true, limit: 1 }),
        readEntries(this.s.inbox, { gt: inboxKey(uid, after), lt: `${uid}"` }),
      ]);
      const bySeq = new Map<number, string>();
      for (const [, chunk] of [...(before as [string, InboxChunk][]), ...(later as [string, InboxChunk][])]) {
        for (const [seq, from] of chunk) if (seq > after) bySeq.set(seq, from);
      }
      for (const [seq, from] of mem) bySeq.set(seq, from);
      const seqs = [...bySeq.keys()].sort((a, b) => a - b).slice(0, limit);
      if (seqs.length === 0) return [];
      const keys = seqs.map((q) => msgKey(directConv(bySeq.get(q) as string, uid), q));
      const found = (await this.s.msgs.getMany(keys)) as (MessageRecord | undefined)[];
      return seqs.map((seq, i) => ({ seq, message: found[i] }));
    }
  }

  /** Everything derived is written now (shutdown). */
  async flushDerived(): Promise<void> {
    this.derivedDue = true;
    this.storage.schedule();
    await this.storage.settle();
    if (this.pending.count > 0 || this.cursors.size > 0) {
      this.derivedDue = true;
      this.storage.schedule();
      await this.storage.settle();
    }
  }
}
