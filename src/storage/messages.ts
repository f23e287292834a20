// Messages: the message log, each conversation's history index, and the indexes
// derived from the log (each user's inbox of direct messages, the cmid index),
// delivery cursors and direct peers.
//
// A message's own synced batch holds its record, keyed by its seq in the log (`log`:
// keys only ever grow, so LevelDB appends instead of inserting all over its tables,
// and finding a message by mid is one read), and its conversation's share of the
// batch's history chunk (`hist`, one put per conversation per batch). Everything else
// is derived from the log: once the batch is on disk its inbox and cmid entries wait
// in memory (at most DERIVED_DELAY_MS or DERIVED_MAX entries) and are then written
// together, lazily, with the watermark `meta indexed` in the same batch. At start-up
// the log past the watermark is replayed, so a crash loses none of them. Readers merge
// what is in memory with what is on disk.

import type { Logger } from "pino";
import { del, put, putText, type BatchOp, type Counter, type Storage } from "./db.js";
import {
  convOf,
  directConv,
  histKey,
  inboxKey,
  keyTail,
  LAYOUT_VERSION,
  pair,
  prefixRange,
  recordJson,
  seqKey,
  V1_SPACES,
  type HistChunk,
  type InboxChunk,
  type MessageRecord,
  type Space,
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
/** Delivery cursors remembered. */
const KNOWN_CURSORS = 100_000;
/** History chunks read at a time. */
const HIST_PAGE = 16;

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
  /** The batch being gathered: its messages, and its history chunks by conversation. */
  private batch: MessageRecord[] | undefined;
  private hist = new Map<string, number[]>();
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
  /** sender → recipient → their conversation's name (bounded like knownPeers): made once. */
  private readonly convs = new Map<string, Map<string, string>>();
  private convCount = 0;
  /** Cursor advances not yet written. */
  private readonly cursors = new Map<string, number>();
  /** Cursors as last read or written (bounded, KNOWN_CURSORS): advances compare with them. */
  private readonly knownCursors = new Map<string, number>();
  private cursorTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly storage: Storage,
    private readonly seq: Counter,
    private readonly log: Logger,
  ) {
    this.s = storage.spaces;
    storage.contribute(() => this.contribute());
  }

  /** Migrates an older layout, then replays the log past the derived-index watermark. */
  async init(): Promise<void> {
    const layout = (await this.s.meta.get("layout")) as number | undefined;
    if (layout === undefined) await this.migrateV1();
    else if (layout > LAYOUT_VERSION) {
      throw new Error(`the database has layout ${layout}, newer than this server's ${LAYOUT_VERSION}: upgrade wirechat`);
    }
    const through = ((await this.s.meta.get("indexed")) as number | undefined) ?? 0;
    let replayed = 0;
    for (let after = through; ; ) {
      const page = (await readValues(this.s.log, { gt: seqKey(after), limit: 1000 })) as MessageRecord[];
      if (page.length === 0) break;
      for (const m of page) this.derive(m);
      replayed += page.length;
      after = Number(page[page.length - 1].mid);
    }
    if (replayed > 0) {
      this.log.info({ replayed, through }, "rebuilt derived message indexes from the log");
      await this.flushDerived();
    }
  }

  /**
   * Brings a layout-1 database to this layout: each record moves into the log with a
   * one-message history chunk (its cmid kept in it), each queued (undelivered) message
   * becomes an inbox entry, the mid index goes. One batch per page, so a crash part-way
   * resumes cleanly (what was moved is gone from the old keyspaces).
   */
  private async migrateV1(): Promise<void> {
    const db = this.storage.db;
    const open = (name: string) => db.sublevel<string, unknown>(name, { keyEncoding: "utf8", valueEncoding: "json" }) as unknown as Space;
    const [msgs, mids, queue] = V1_SPACES.map(open);
    let moved = 0;
    for (;;) {
      const page = (await readEntries(msgs, { limit: 1000 })) as [string, MessageRecord & { conv?: string }][];
      if (page.length === 0) break;
      const ops: BatchOp[] = [];
      for (const [key, old] of page) {
        const { conv: _conv, ...m } = old;
        const seq = Number(m.mid);
        ops.push(del(msgs, key), putText(this.s.log, seqKey(seq), recordJson(m).json), put(this.s.hist, histKey(convOf(m), seq), [seq]));
        if (m.cmid !== undefined) ops.push(put(this.s.cmids, pair(m.from, m.cmid), [m.mid, m.time]));
        moved++;
      }
      await this.storage.commit(ops);
    }
    for (const space of [mids, queue]) {
      for (;;) {
        const page = (await readKeys(space, { limit: 1000 })) as string[];
        if (page.length === 0) break;
        const ops: BatchOp[] = page.map((key) => del(space, key));
        if (space === queue) {
          for (const key of page) {
            const bang = key.indexOf("!");
            const seq = Number(key.slice(bang + 1));
            ops.push(put(this.s.inbox, inboxKey(key.slice(0, bang), seq), [seq]));
          }
        }
        await this.storage.commit(ops);
      }
    }
    await this.storage.commit([put(this.s.meta, "layout", LAYOUT_VERSION), put(this.s.meta, "indexed", this.seq.last)]);
    if (moved > 0) this.log.info({ messages: moved }, "migrated messages from layout 1");
  }

  /**
   * Adds a message to the batch being gathered: assigns its mid, writes its record
   * into the log and its seq into its conversation's history chunk. Returns the
   * record's JSON text (see recordJson). The caller waits for the batch with
   * storage.afterCommit before acknowledging.
   */
  append(m: MessageRecord): { json: string; cut: number } {
    const seq = this.seq.next();
    m.mid = String(seq);
    const text = recordJson(m);
    this.storage.put(this.s.log.prefix + seqKey(seq), text.json);
    const conv = m.to !== undefined ? this.directConv(m.from, m.to) : convOf(m);
    const list = this.hist.get(conv);
    if (list) list.push(seq);
    else this.hist.set(conv, [seq]);
    if (!this.batch) this.openBatch();
    (this.batch as MessageRecord[]).push(m);
    return text;
  }

  /**
   * Starts the list of the batch being gathered. Its commit callback is registered
   * before any of its messages' own, so their entries are derived (and visible to
   * byCmid and inboxAfter) before anyone hears of them.
   */
  private openBatch(): void {
    const batch: MessageRecord[] = [];
    this.batch = batch;
    this.storage.afterCommit((err) => {
      if (err) return;
      for (const m of batch) this.derive(m);
      this.armDerived();
    });
  }

  /** directConv, remembered: the same string each time, so maps hash it once. */
  private directConv(from: string, to: string): string {
    let byTo = this.convs.get(from);
    let conv = byTo?.get(to);
    if (conv !== undefined) return conv;
    if (this.convCount >= KNOWN_PEERS) {
      this.convs.clear();
      this.convCount = 0;
      byTo = undefined;
    }
    if (!byTo) this.convs.set(from, (byTo = new Map()));
    conv = directConv(from, to);
    byTo.set(to, conv);
    this.convCount++;
    return conv;
  }

  /** Runs as each batch is about to be written. */
  private contribute(): void {
    if (this.batch) {
      for (const [conv, seqs] of this.hist) this.storage.put(this.s.hist.prefix + histKey(conv, seqs[0]), JSON.stringify(seqs));
      this.hist = new Map();
      this.batch = undefined;
    }
    if ((this.derivedDue || this.pending.count >= DERIVED_MAX) && !this.writing && (this.pending.count > 0 || this.cursors.size > 0)) {
      this.writeDerived();
    }
  }

  private derive(m: MessageRecord): void {
    const p = this.pending;
    const seq = Number(m.mid);
    if (m.to !== undefined) {
      const list = p.inbox.get(m.to);
      if (list) list.push(seq);
      else p.inbox.set(m.to, [seq]);
      p.count++;
    }
    if (m.cmid !== undefined) {
      const key = pair(m.from, m.cmid);
      const v: [string, number] = [m.mid, m.time];
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
    for (const [uid, seqs] of d.inbox) ops.push(put(this.s.inbox, inboxKey(uid, seqs[0]), seqs));
    for (const [key, v] of d.cmids) ops.push(put(this.s.cmids, key, v));
    if (d.through > 0) ops.push(put(this.s.meta, "indexed", d.through));
    for (const [uid, seq] of this.cursors) ops.push(put(this.s.cursor, uid, seq));
    const cursors = [...this.cursors];
    this.cursors.clear();
    this.writing = d;
    this.storage.commitLazy(ops);
    this.storage.afterWrite((err) => {
      if (this.writing === d) this.writing = undefined;
      if (err) this.restore(d, cursors); // written again with the next generation
      if (this.pending.count > 0) this.armDerived();
      if (this.cursors.size > 0) this.armCursor();
    });
  }

  /** A generation whose write failed: its entries wait again, before anything newer. */
  private restore(d: Derived, cursors: [string, number][]): void {
    const p = this.pending;
    for (const [uid, seqs] of d.inbox) p.inbox.set(uid, [...seqs, ...(p.inbox.get(uid) ?? [])]);
    for (const [key, v] of d.cmids) if (!p.cmids.has(key)) p.cmids.set(key, v);
    p.count += d.count;
    p.through = Math.max(p.through, d.through);
    for (const [uid, seq] of cursors) if ((this.cursors.get(uid) ?? 0) < seq) this.cursors.set(uid, seq);
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

  /** A message by mid: one read. */
  async get(mid: string): Promise<MessageRecord | undefined> {
    // A mid is its seq unpadded: "01" or "1.0" names no message.
    if (!/^[1-9][0-9]{0,14}$/.test(mid)) return undefined;
    return (await this.s.log.get(seqKey(Number(mid)))) as MessageRecord | undefined;
  }

  /** Ops replacing a stored message's record (an edit). */
  updateOps(m: MessageRecord): BatchOp[] {
    return [putText(this.s.log, seqKey(Number(m.mid)), recordJson(m).json)];
  }

  /**
   * Ops removing a message: its record, its seq from its history chunk, its cmid. An
   * inbox entry stays: it names a record that no longer exists, which readers skip.
   * (History chunks are never rewritten otherwise, so this cannot race a commit.)
   */
  async removeOps(m: MessageRecord): Promise<BatchOp[]> {
    const seq = Number(m.mid);
    const conv = convOf(m);
    const ops = [del(this.s.log, seqKey(seq))];
    const found = (await readEntries(this.s.hist, { gt: `${conv}!`, lte: histKey(conv, seq), reverse: true, limit: 1 })) as [string, HistChunk][];
    if (found.length > 0) {
      const [key, seqs] = found[0];
      const rest = seqs.filter((q) => q !== seq);
      if (rest.length !== seqs.length) ops.push(rest.length > 0 ? put(this.s.hist, key, rest) : del(this.s.hist, key));
    }
    if (m.cmid !== undefined) {
      const key = pair(m.from, m.cmid);
      this.recentCmids.delete(key);
      this.pending.cmids.delete(key);
      ops.push(del(this.s.cmids, key));
    }
    return ops;
  }

  /**
   * The seqs of a conversation's newest `limit` messages before `before` (a mid),
   * oldest first: a bounded reverse range read over its history chunks, whatever the
   * conversation's length.
   */
  async historySeqs(conv: string, limit: number, before?: string): Promise<number[]> {
    const below = before !== undefined ? Number(before) : Infinity;
    const out: number[] = [];
    // Chunks that start at or before `before` (the one holding it may start before it).
    let lt = before !== undefined ? histKey(conv, below + 1) : `${conv}"`;
    while (out.length < limit) {
      const page = (await readEntries(this.s.hist, { gt: `${conv}!`, lt, reverse: true, limit: HIST_PAGE })) as [string, HistChunk][];
      for (const [, seqs] of page) {
        for (let i = seqs.length - 1; i >= 0 && out.length < limit; i--) if (seqs[i] < below) out.push(seqs[i]);
      }
      if (page.length < HIST_PAGE) break;
      lt = page[page.length - 1][0];
    }
    return out.reverse();
  }

  /** The records at `seqs` (deleted ones skipped), in order. */
  async records(seqs: readonly number[]): Promise<MessageRecord[]> {
    if (seqs.length === 0) return [];
    const found = (await this.s.log.getMany(seqs.map(seqKey))) as (MessageRecord | undefined)[];
    return found.filter((m): m is MessageRecord => m !== undefined);
  }

  /** The newest `limit` messages of a conversation before `before`, oldest first. */
  async history(conv: string, limit: number, before?: string): Promise<MessageRecord[]> {
    return this.records(await this.historySeqs(conv, limit, before));
  }

  /**
   * Ops recording that `conv`'s messages are to be purged, for the batch that deletes
   * what owned them: a purge that a crash or a shutdown cuts short is resumed from it
   * at start-up (pendingPurges).
   */
  purgeMarkOps(conv: string): BatchOp[] {
    return [put(this.s.purges, conv, 1)];
  }

  /** Conversations whose purge was recorded and has not finished. */
  async pendingPurges(): Promise<string[]> {
    return readKeys(this.s.purges, {});
  }

  /**
   * Deletes every message of a conversation (a deleted channel), chunk page by chunk
   * page; `onPage` returns the ops for what the page's messages used (attachments),
   * and `onCommitted` hears of the page once they are on disk. Stops between pages
   * once `signal` is aborted (shutdown); the last batch removes the purge's mark.
   */
  async purge(
    conv: string,
    onPage: (page: MessageRecord[]) => Promise<BatchOp[]>,
    onCommitted: (page: MessageRecord[]) => void,
    signal?: AbortSignal,
  ): Promise<void> {
    while (!signal?.aborted) {
      const chunks = (await readEntries(this.s.hist, { ...prefixRange(conv), limit: HIST_PAGE })) as [string, HistChunk][];
      if (chunks.length === 0) {
        await this.storage.commit([del(this.s.purges, conv)]);
        return;
      }
      const seqs = chunks.flatMap(([, s]) => s);
      const page = await this.records(seqs);
      const ops = [...chunks.map(([key]) => del(this.s.hist, key)), ...seqs.map((q) => del(this.s.log, seqKey(q))), ...(await onPage(page))];
      await this.storage.commit(ops);
      onCommitted(page);
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
    const mem = this.cursors.get(uid) ?? this.knownCursors.get(uid);
    if (mem !== undefined) return mem;
    const stored = ((await this.s.cursor.get(uid)) as number | undefined) ?? 0;
    // An advance may have landed while we read.
    const now = Math.max(stored, this.cursors.get(uid) ?? 0, this.knownCursors.get(uid) ?? 0);
    this.knowCursor(uid, now);
    return now;
  }

  /**
   * Advances `uid`'s cursor; never backwards (a second device acknowledging less, a
   * late confirmation). Written lazily: a lost advance only redelivers.
   */
  advance(uid: string, seq: number): void {
    const known = this.cursors.get(uid) ?? this.knownCursors.get(uid);
    if (known !== undefined) {
      if (seq > known) this.setCursor(uid, seq);
      return;
    }
    this.cursor(uid).then(
      (cur) => {
        if (seq > cur) this.setCursor(uid, seq);
      },
      (err) => this.log.error({ err, uid }, "reading a delivery cursor failed"),
    );
  }

  private setCursor(uid: string, seq: number): void {
    this.cursors.set(uid, seq);
    this.knowCursor(uid, seq);
    this.armCursor();
  }

  /** Remembers a cursor's value (bounded: the oldest are forgotten and read again). */
  private knowCursor(uid: string, seq: number): void {
    this.knownCursors.delete(uid);
    this.knownCursors.set(uid, seq);
    if (this.knownCursors.size > KNOWN_CURSORS) this.knownCursors.delete(this.knownCursors.keys().next().value as string);
  }

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
    const mem: number[] = [];
    for (const d of [this.writing, this.pending]) {
      const list = d?.inbox.get(uid);
      if (list) for (const q of list) if (q > after) mem.push(q);
    }
    const [before, later] = await Promise.all([
      readEntries(this.s.inbox, { gt: `${uid}!`, lte: inboxKey(uid, after), reverse: true, limit: 1 }),
      // Each chunk holds at least one seq, and memory holds only newer ones: `limit`
      // chunks are enough.
      readEntries(this.s.inbox, { gt: inboxKey(uid, after), lt: `${uid}"`, limit }),
    ]);
    const all = new Set<number>(mem);
    for (const [, chunk] of [...(before as [string, InboxChunk][]), ...(later as [string, InboxChunk][])]) {
      for (const q of chunk) if (q > after) all.add(q);
    }
    const seqs = [...all].sort((a, b) => a - b).slice(0, limit);
    if (seqs.length === 0) return [];
    const found = (await this.s.log.getMany(seqs.map(seqKey))) as (MessageRecord | undefined)[];
    return seqs.map((seq, i) => ({ seq, message: found[i] }));
  }

  /** Everything derived is written now (shutdown, start-up replay). */
  async flushDerived(): Promise<void> {
    for (let i = 0; i < 2; i++) {
      this.derivedDue = true;
      this.storage.schedule();
      await this.storage.settle();
      if (this.pending.count === 0 && this.cursors.size === 0) return;
    }
  }
}
