// Messages: the message log, each conversation's history index, and the indexes
// derived from the log (each user's inbox of direct messages, the cmid index, each
// user's direct conversations by recency for dialogs), delivery cursors and direct
// peers.
//
// A message's own synced batch holds its record only, keyed by its seq in the log
// (`log`: keys only ever grow, so LevelDB appends instead of inserting all over its
// tables, and finding a message by mid is one read). Everything else is derived from
// the log: once the batch is on disk its history, inbox and cmid entries wait in
// memory (at most DERIVED_DELAY_MS or DERIVED_MAX entries) and are then written
// together, nobody waiting for them, a chunk with each of the next few batches (drain:
// each synced), the watermark `meta indexed` last: one history chunk per conversation per generation. At start-up
// the log past the watermark is replayed, so a crash loses none of them. Readers merge
// what is in memory with what is on disk.
//
// (Until layout 5 each batch also held one history chunk per conversation. Under S2 at
// 20,000 msg/s that was a put per message, at a key anywhere in LevelDB's 64 MiB skip
// list: `perf` charged the memtable's inserts 6 % of the server's CPU against 0.4 % for
// the relay's one appended key per message.)
//
// The dialogs index (`dialogs <uid>!<inverted seq>` → peer, with `dialogat` pointing
// at each conversation's key) is derived the same way, but moving an entry needs its
// old key: a generation with dialog entries first reads their `dialogat` pointers (one
// getMany), then writes. Generations are written one at a time, so two never move
// the same entry from the same old key. A deleted message may have been its
// conversation's last: the removal queues a recheck, which the next generation
// answers from the conversation's history (the truth), and readers meanwhile order by
// what they find in history, not by the index alone.
//
// Each recent channel's last seq is kept in memory (bounded): dialogs reads it for
// every joined channel. It is set when its batch is on disk; a delete or a purge drops
// it once its own batch is written (until then the old value is the durable one), and
// a read that was in flight meanwhile does not fill it. (Records themselves are not
// cached: kept from the write on, every message outlives the young generation and S1
// fell from 100k to 54k msg/s; filled on read, a soak's dialogs calls, 100 last
// messages each, churned 16,384 entries in seconds and the server's CPU rose from 64 %
// to 70 %.)

import type { Logger } from "pino";
import { del, put, putText, type BatchOp, type Counter, type Storage } from "./db.js";
import {
  convOf,
  decimal,
  dialogKey,
  dialogSeq,
  directConv,
  histKey,
  inboxKey,
  keyHead,
  LAYOUT_VERSION,
  midAbove,
  pair,
  prefixRange,
  recordJson,
  seqKey,
  SEQ_KEY_MAX,
  writeSeqKey,
  V1_SPACES,
  type HistChunk,
  type InboxChunk,
  type MessageRecord,
  type Space,
  type Spaces,
} from "./layout.js";
import { readEntries, readKeys, readValues } from "./range.js";

/**
 * Derived entries wait at most this long in memory before they are written (the
 * cursors' delay too). Writing a generation is a burst of work on the event loop
 * (reading the dialog pointers, building the ops) whose size depends on how many
 * users and conversations it touches, not on how long it gathered: under S2 (5,000
 * msg/s over 100 pairs) every 100 ms meant a burst every 100 ms (CPU profile: 111 in
 * 15 s, 4 ms on average in a noisy phase, up to 20), each delaying the messages that
 * arrived meanwhile; once a second, the same bursts are ten times rarer. Waiting longer
 * costs little: readers merge what waits with what is on disk, DERIVED_MAX still
 * bounds it, and a restart replays at most a second more of the log. (Test hook:
 * WIRECHAT_TEST_DERIVED_DELAY_MS sets it, so that a test's burst of messages is all in
 * one generation however slowly a loaded machine takes them.)
 */
const DERIVED_DELAY_MS = Math.max(0, Number(process.env.WIRECHAT_TEST_DERIVED_DELAY_MS ?? 0) || 0) || 1000;
/** ... or until this many are waiting (a direct message counts twice: history and inbox). */
const DERIVED_MAX = 16384;
/**
 * A generation goes to disk in chunks: each batch takes at most this many of its
 * operations, or as many as the batch already holds if that is more, or the share
 * that drains it in DERIVED_BATCHES batches if that is more (see drain).
 */
const DERIVED_CHUNK = 128;
/**
 * ... so a generation of any size is written within about this many batches. At 128
 * a batch, a server taking more than ~25,000 derived entries a second (a cmid each
 * from clients that send one, at ~200 batches a second) wrote them slower than they
 * came: each generation took longer to drain, the next one gathered for that long,
 * and the pending maps grew for as long as the load lasted.
 */
const DERIVED_BATCHES = 8;
/** Recent (sender, cmid) → [mid, time] kept in memory: resends within it read nothing. */
const CMID_WINDOW = 65536;
/** Deleted users whose derived entries are never written again (the oldest forgotten first). */
const KNOWN_GONE = 65_536;
/** Direct conversations known to be in `peers` (saves a write per message). */
const KNOWN_PEERS = 100_000;
/** Delivery cursors remembered. */
const KNOWN_CURSORS = 100_000;
/** History chunks read at a time. */
const HIST_PAGE = 16;
/** Direct conversations whose last record `dialogs` checks at a time. */
const DIALOG_CHECKS = 16;
/** Messages a purge page takes, in whole chunks (at least one). */
const PURGE_SEQS = 512;
/** No ops joined to the one before them (Drain.joined). */
const NONE_JOINED: ReadonlySet<number> = new Set();
/** Records a purge reads at once (each up to --max-frame of body, dropped once read). */
const PURGE_READ = 32;
/** Index entries migrated or checked per batch. */
const MIGRATE_PAGE = 1000;
/** Channels whose last seq is remembered (cleared when full, like KNOWN_PEERS). */
const KNOWN_LASTS = 65_536;
/**
 * Conversations whose newest record is kept in memory for `dialogs` (a page of it is
 * each conversation's newest record: reading and decoding them was most of its cost),
 * the oldest entry evicted first; a record whose body is longer than LAST_RECORD_BODY
 * is not kept. At most 32,768 bodies of 512 characters (16 MiB) and their records; a
 * body may be a view of its record's stored text (append), which it then keeps whole:
 * a few hundred bytes more per record.
 */
const KNOWN_LAST_RECORDS = 32_768;
const LAST_RECORD_BODY = 512;
/**
 * The newest seqs of recently active conversations, kept in memory so that their
 * newest history page (history, enter) needs no range read of history chunks: up to
 * TAIL seqs for each of KNOWN_TAILS conversations (the oldest evicted first): at most
 * 16,384 × 64 numbers, 8 MiB.
 */
const KNOWN_TAILS = 16_384;
const TAIL = 64;

/** A direct conversation in `dialogs`: its peer, its last seq, and that record if read. */
/** Inbox chunks read at a time by inboxAfter. */
const INBOX_CHUNK_READS = 8;

export interface DialogEntry {
  peer: string;
  seq: number;
  record: MessageRecord | undefined;
}

/** The messages of the batch being gathered, in append (seq) order. */
interface PendingBatch {
  records: MessageRecord[];
  seqs: number[];
  convs: string[];
}

/** Derived entries of committed batches, by state. */
class Derived {
  /** conversation → seqs of its committed messages, ascending: its next history chunk. */
  hist = new Map<string, HistChunk>();
  inbox = new Map<string, InboxChunk>();
  cmids = new Map<string, [string, number]>();
  /** uid → peer → seq of their newest direct message. */
  dialogs = new Map<string, Map<string, number>>();
  /** uid → peers whose conversation lost a message: its last seq is read again. */
  rechecks = new Map<string, Set<string>>();
  count = 0;
  /** Highest seq whose derived entries are in here (or earlier generations). */
  through = 0;
}

/** A generation being handed to batches chunk by chunk (MessageStore.drain). */
interface Drain {
  d: Derived;
  cursors: ReadonlyMap<string, number>;
  /** Its history, inbox, cursor and dialog operations, made when it was taken. */
  ops: BatchOp[];
  /** How many of `ops` are in batches. */
  at: number;
  /**
   * Indexes of `ops` that go in the same batch as the op before them: a conversation's
   * dialog move (delete the old entry, put the new one and its pointer) is all or
   * nothing. Cut between the new entry and its pointer and followed by a crash, the
   * replay moved the pointer from the old entry and the new one stayed for good (the
   * peer twice in dialogs).
   */
  joined: ReadonlySet<number>;
  /** Then these, made as each chunk is added (see tailOps). */
  tail: Iterator<BatchOp>;
  /** The least a chunk takes: DERIVED_CHUNK, or the generation's share of DERIVED_BATCHES. */
  chunk: number;
  /** Settles once the last chunk is written, or a chunk's write has failed. */
  settled: Promise<void>;
  settle: () => void;
}

export class MessageStore {
  private readonly s: Spaces;
  /**
   * The batch being gathered: its messages, with each one's seq and conversation (known
   * at append, so the commit parses and looks up neither again).
   */
  private batch: PendingBatch | undefined;
  /** Committed, not yet handed to a batch. */
  private pending = new Derived();
  /** Handed to the batch being written. */
  private writing: Derived | undefined;
  /** The dialog pointers of `writing` being read, before it is written. */
  private preparing: Promise<void> | undefined;
  /** Settles once `writing` is on disk, or its write has failed (set once it drains). */
  private drained: Promise<void> | undefined;
  private derivedTimer: NodeJS.Timeout | undefined;
  private derivedDue = false;
  private readonly recentCmids = new Map<string, [string, number]>();
  /**
   * Bumped when a deleted message's cmid is off the disk: a byCmid read in flight may
   * have seen it before, and must not put it back in recentCmids.
   */
  private cmidGen = 0;
  /** Bumped when a generation holding cmid entries is on disk (purgedCmidOps). */
  private cmidWrites = 0;
  /**
   * Pairs whose `rechecks` marker a delete put: Infinity while the delete's batch is
   * not written, then the tick of its writing. A generation takes a marker out only
   * when the pair's tick is older than the generation (taken at writeDerived), so its
   * check saw the delete; a later delete's marker waits for its own recheck.
   */
  private readonly marked = new Map<string, number>();
  private markTick = 0;
  /** markTick when the generation being written was taken. */
  private writingTick = 0;
  /** sender → recipients whose pair is known to be in `peers` (bounded, see KNOWN_PEERS). */
  private readonly knownPeers = new Map<string, Set<string>>();
  private knownPeerCount = 0;
  /** sender → recipient → their conversation's name (bounded like knownPeers): made once. */
  private readonly convs = new Map<string, Map<string, string>>();
  private convCount = 0;
  /** The pair directConv() named last: [from, to, conversation]. */
  private readonly lastPair: [string, string, string] = ["", "", ""];
  /**
   * Users deleted since start (KNOWN_GONE): a generation of derived entries prepared
   * before the deletion, or a late advance, must not write their entries back after
   * the deletion removed them (commitDerived leaves them out).
   */
  private readonly gone = new Set<string>();
  /** Users whose deletion is being committed (forgettingUser): as few as deletions in flight. */
  private readonly forgetting = new Set<string>();
  /** Cursor advances not yet written. */
  private readonly cursors = new Map<string, number>();
  /**
   * The cursors of the generation being written (taken out of `cursors`): until that
   * write lands the disk is behind them, and knownCursors may have forgotten one.
   */
  private writingCursors: ReadonlyMap<string, number> | undefined;
  /** Cursors as last read or written (bounded, KNOWN_CURSORS): advances compare with them. */
  private readonly knownCursors = new Map<string, number>();
  private cursorTimer: NodeJS.Timeout | undefined;
  /** channel conversation → seq of its newest committed message (KNOWN_LASTS). */
  private readonly lasts = new Map<string, number>();
  /** channel conversation → seq of its oldest message, once read (KNOWN_LASTS; firstSeq). */
  private readonly firsts = new Map<string, number>();
  /** Bumped when a conversation's first or last seq may have changed by a removal: a read of either in flight must not fill `firsts` or `lasts`. */
  private endsGen = 0;
  /** conversation → its newest committed record (KNOWN_LAST_RECORDS), for dialogs. */
  private readonly lastRecords = new Map<string, MessageRecord>();
  /**
   * conversation → its newest committed seqs, ascending (KNOWN_TAILS, TAIL): always a
   * suffix of the conversation's whole list (seqs only join at its end, and a delete
   * drops the tail), so any page of it is a page of the conversation.
   */
  private readonly tails = new Map<string, number[]>();

  /**
   * Hears of each batch of messages on disk: how many, and the seconds from its first
   * message's append to the commit (the longest wait in the batch).
   */
  onCommitted: ((messages: number, seconds: number) => void) | undefined;
  /** The key of the record append() writes, rewritten in place for each (writeSeqKey). */
  private readonly logKey: Buffer;
  /** The highest seq committed (at start-up, the counter's: what it handed out is stored or lost). */
  private committedSeq: number;

  constructor(
    private readonly storage: Storage,
    private readonly seq: Counter,
    private readonly log: Logger,
  ) {
    this.s = storage.spaces;
    this.logKey = Buffer.from(this.s.log.prefix + seqKey(0), "utf8");
    this.committedSeq = seq.last;
    storage.contribute(() => this.contribute());
  }

  /** The highest mid committed so far (InboxSource.newest). */
  newest(): number {
    return this.committedSeq;
  }

  /**
   * Migrates an older layout up to 3 (UserStore.init takes it on to 4), then replays
   * the log past the derived-index watermark.
   */
  async init(): Promise<void> {
    let layout = (await this.s.meta.get("layout")) as number | undefined;
    if (layout === undefined) {
      await this.migrateV1();
      layout = 2;
    } else if (layout > LAYOUT_VERSION) {
      throw new Error(`the database has layout ${layout}, newer than this server's ${LAYOUT_VERSION}: upgrade wirechat`);
    }
    if (layout < 3) await this.migrateV2();
    // Before layout 5 each message's history chunk was written with its record: the
    // replay must not add a second one.
    const histDerived = layout >= 5;
    const through = ((await this.s.meta.get("indexed")) as number | undefined) ?? 0;
    let replayed = 0;
    const parties = new Set<string>();
    for (let after = through; ; ) {
      const page = (await readValues(this.s.log, { gt: seqKey(after), limit: 1000 })) as MessageRecord[];
      if (page.length === 0) break;
      for (const m of page) {
        this.deriveRun([m], [Number(m.mid)], 0, 1, this.convOf(m), histDerived);
        parties.add(m.from);
        if (m.to !== undefined) parties.add(m.to);
      }
      replayed += page.length;
      after = Number(page[page.length - 1].mid);
    }
    // A user deleted after these messages (their account's batch removed their user
    // record and what was on disk of their entries; the rest waited in memory, left out
    // by `gone`, which the crash lost) gets none of them back.
    const uids = [...parties];
    for (let i = 0; i < uids.length; i += MIGRATE_PAGE) {
      const slice = uids.slice(i, i + MIGRATE_PAGE);
      const found = await this.s.users.getMany(slice);
      slice.forEach((uid, j) => {
        if (found[j] === undefined) this.gone.add(uid);
      });
    }
    // Dialogs entries a delete left to check again, when a crash came first.
    let rechecks = 0;
    for (let after = ""; ; ) {
      const page = (await readKeys(this.s.rechecks, { gt: after, limit: MIGRATE_PAGE })) as string[];
      if (page.length === 0) break;
      for (const key of page) {
        const bang = key.indexOf("!");
        this.recheckOne(key.slice(0, bang), key.slice(bang + 1));
      }
      rechecks += page.length;
      after = page[page.length - 1];
    }
    if (replayed > 0) this.log.info({ replayed, through }, "rebuilt derived message indexes from the log");
    if (replayed + rechecks > 0) await this.flushDerived();
    // Every logged message now has its history chunk, and from here on chunks are
    // derived. (Layout 3 goes on to UserStore.init and ChannelStore.init, which
    // writes LAYOUT_VERSION.)
    if (layout === 4) await this.storage.commit([put(this.s.meta, "layout", 5)]);
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
    await this.storage.commit([put(this.s.meta, "layout", 2), put(this.s.meta, "indexed", this.seq.last)]);
    if (moved > 0) this.log.info({ messages: moved }, "migrated messages from layout 1");
  }

  /**
   * Brings a layout-2 database to layout 3: builds the dialogs index from `peers` (each
   * pair's last message read from its history) and the index of owned channels from
   * `channels`. Every put is idempotent, so a crash part-way starts again cleanly.
   */
  private async migrateV2(): Promise<void> {
    let pairs = 0;
    for (let after = ""; ; ) {
      const page = await readKeys(this.s.peers, { gt: after, limit: MIGRATE_PAGE });
      if (page.length === 0) break;
      const lasts = await Promise.all(
        page.map((key) => {
          const bang = key.indexOf("!");
          return this.lastSeq(directConv(key.slice(0, bang), key.slice(bang + 1)));
        }),
      );
      const ops: BatchOp[] = [];
      page.forEach((key, i) => {
        const last = lasts[i];
        if (last === undefined) return;
        const bang = key.indexOf("!");
        ops.push(put(this.s.dialogs, dialogKey(key.slice(0, bang), last), key.slice(bang + 1)), put(this.s.dialogat, key, last));
        pairs++;
      });
      await this.storage.commit(ops);
      after = page[page.length - 1];
    }
    let owned = 0;
    for (let after = ""; ; ) {
      const page = await readValues<{ chid: string; owner: string }>(this.s.channels, { gt: after, limit: MIGRATE_PAGE });
      if (page.length === 0) break;
      await this.storage.commit(page.map((c) => put(this.s.owned, pair(c.owner, c.chid), 1)));
      owned += page.length;
      after = page[page.length - 1].chid;
    }
    await this.storage.commit([put(this.s.meta, "layout", 3)]);
    if (pairs + owned > 0) this.log.info({ pairs, owned }, "built the dialogs and owned-channels indexes (layout 3)");
  }

  /**
   * Adds a message to the batch being gathered: assigns its mid, writes its record
   * into the log and its seq into its conversation's history chunk. Returns the
   * record's JSON text (see recordJson). The caller waits for the batch with
   * storage.afterCommit before acknowledging.
   */
  append(m: MessageRecord, plainBody = false, nickJson?: string): { json: string; cut: number } {
    const seq = this.seq.next();
    m.mid = decimal(seq);
    const text = recordJson(m, plainBody, nickJson);
    let key: Buffer | string = this.logKey;
    if (seq <= SEQ_KEY_MAX) writeSeqKey(key, key.length, seq);
    else key = this.s.log.prefix + seqKey(seq);
    this.storage.put(key, text.json);
    // The record keeps its body as a view of the text it is written in (kept anyway for
    // the event), so the copy read from the frame dies young: S1 keeps ~3,000 messages
    // waiting for their batch, alive at every scavenge, and their bodies were a fifth
    // of the bytes each scavenge copied. (A view shorter than 13 characters is a copy.)
    if (text.bodyAt >= 0 && m.body.length >= 13) m.body = text.json.slice(text.bodyAt, text.bodyAt + m.body.length);
    const conv = this.convOf(m);
    const batch = this.batch ?? this.openBatch();
    batch.records.push(m);
    batch.seqs.push(seq);
    batch.convs.push(conv);
    return text;
  }

  /**
   * Starts the list of the batch being gathered. Its commit callback is registered
   * before any of its messages' own, so their entries are derived (and visible to
   * byCmid and inboxAfter) before anyone hears of them.
   */
  private openBatch(): PendingBatch {
    const batch: PendingBatch = { records: [], seqs: [], convs: [] };
    this.batch = batch;
    // One clock read per batch, not per message (the hot path).
    const opened = this.onCommitted ? performance.now() : 0;
    this.storage.afterCommit((err) => {
      if (err) return;
      const { records, seqs, convs } = batch;
      // Batches commit in order, and a batch's seqs ascend.
      if (seqs.length > 0) this.committedSeq = seqs[seqs.length - 1];
      this.onCommitted?.(records.length, (performance.now() - opened) / 1000);
      // By runs of one conversation (a sender's messages come in runs): the newest of a
      // run is what its conversation's last seq and last record become, whatever came
      // before it, and its tail is looked up once.
      for (let i = 0; i < records.length; ) {
        const conv = convs[i];
        let j = i + 1;
        while (j < records.length && convs[j] === conv) j++;
        this.deriveRun(records, seqs, i, j, conv);
        const newest = records[j - 1];
        if (newest.chid !== undefined) this.lastIs(conv, seqs[j - 1]);
        this.lastRecordIs(conv, newest);
        this.tailGrows(conv, seqs, i, j);
        i = j;
      }
      this.armDerived();
    });
    return batch;
  }

  /** A committed channel message is its channel's newest. */
  private lastIs(conv: string, seq: number): void {
    if ((this.lasts.get(conv) ?? 0) < seq) {
      if (this.lasts.size >= KNOWN_LASTS) this.lasts.clear();
      this.lasts.set(conv, seq);
    }
  }

  /** A committed message is its conversation's newest record. */
  private lastRecordIs(conv: string, m: MessageRecord): void {
    const had = this.lastRecords.get(conv);
    if (had !== undefined && midAbove(had.mid, m.mid)) return;
    if (m.body.length > LAST_RECORD_BODY) {
      this.lastRecords.delete(conv);
      return;
    }
    if (had === undefined && this.lastRecords.size >= KNOWN_LAST_RECORDS) {
      this.lastRecords.delete(this.lastRecords.keys().next().value as string);
    }
    this.lastRecords.set(conv, m);
  }

  /** Committed messages (seqs[from..to), ascending) join the end of their conversation's tail. */
  private tailGrows(conv: string, seqs: readonly number[], from: number, to: number): void {
    let tail = this.tails.get(conv);
    for (let k = from; k < to; k++) {
      const seq = seqs[k];
      if (tail === undefined) {
        if (this.tails.size >= KNOWN_TAILS) this.tails.delete(this.tails.keys().next().value as string);
        this.tails.set(conv, (tail = [seq]));
      } else if (seq > tail[tail.length - 1]) {
        if (tail.length >= TAIL) tail.shift();
        tail.push(seq);
      } else {
        this.tails.delete(conv); // out of order: not a suffix any more
        tail = undefined;
      }
    }
  }

  /**
   * The records at `rows` (each the seq of its conversation's newest message, as
   * dialogs lists them), undefined where deleted: from memory where known, the rest in
   * one read.
   */
  async lastRecordsAt(rows: readonly { conv: string; seq: number }[]): Promise<(MessageRecord | undefined)[]> {
    const out = new Array<MessageRecord | undefined>(rows.length);
    const missing: number[] = [];
    const at: number[] = [];
    rows.forEach((r, i) => {
      const m = this.lastRecords.get(r.conv);
      if (m !== undefined && m.mid === String(r.seq)) out[i] = m;
      else {
        missing.push(r.seq);
        at.push(i);
      }
    });
    if (missing.length > 0) (await this.readRecords(missing)).forEach((m, j) => (out[at[j]] = m));
    return out;
  }

  /** After a delete or purge in `conv` is written: its last seq and record are read again. */
  private forget(conv: string): void {
    this.tails.delete(conv);
    this.lastRecords.delete(conv);
    this.lasts.delete(conv);
    this.firsts.delete(conv);
    this.endsGen++;
  }

  /** The records at `seqs`, undefined where there is none: one getMany. */
  private async readRecords(seqs: readonly number[]): Promise<(MessageRecord | undefined)[]> {
    return (await this.s.log.getMany(seqs.map(seqKey))) as (MessageRecord | undefined)[];
  }

  /** convOf, with a direct conversation's name remembered (directConv below). */
  private convOf(m: MessageRecord): string {
    return m.to !== undefined ? this.directConv(m.from, m.to) : convOf(m);
  }

  /** directConv, remembered: the same string each time, so maps hash it once. */
  private directConv(from: string, to: string): string {
    // The same pair as the last call (a sender's messages come in runs): no lookup.
    if (from === this.lastPair[0] && to === this.lastPair[1]) return this.lastPair[2];
    const conv = this.knownConv(from, to);
    this.lastPair[0] = from;
    this.lastPair[1] = to;
    this.lastPair[2] = conv;
    return conv;
  }

  private knownConv(from: string, to: string): string {
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
    this.batch = undefined;
    if ((this.derivedDue || this.pending.count >= DERIVED_MAX) && !this.writing && (this.pending.count > 0 || this.cursors.size > 0)) {
      this.writeDerived();
    }
  }

  /**
   * Derives the entries of committed messages records[from..to), all of conversation
   * `conv`, ascending (a run: a sender's messages come in runs, S1 32 in flight per
   * pair committed together). The conversation's history list is looked up once for
   * the run, and the inbox list and dialog maps once per direction the run turns to:
   * per message they were ~1 % of the server's CPU in S1.
   */
  private deriveRun(records: readonly MessageRecord[], seqs: readonly number[], from: number, to: number, conv: string, withHist = true): void {
    const p = this.pending;
    if (withHist) {
      let hist = p.hist.get(conv);
      if (!hist) p.hist.set(conv, (hist = []));
      for (let k = from; k < to; k++) hist.push(seqs[k]);
      p.count += to - from;
    }
    // The direction (sender, recipient) of the last direct message, with its lists.
    let sender: string | undefined;
    let recipient: string | undefined;
    let inbox: InboxChunk | undefined;
    let senderPeers: Map<string, number> | undefined;
    let recipientPeers: Map<string, number> | undefined;
    for (let k = from; k < to; k++) {
      const m = records[k];
      const seq = seqs[k];
      if (m.to !== undefined) {
        if (inbox !== undefined && m.from === sender && m.to === recipient) {
          inbox.push(seq);
          p.count++;
          (senderPeers as Map<string, number>).set(m.to, seq);
          recipientPeers?.set(m.from, seq);
        } else {
          sender = m.from;
          recipient = m.to;
          inbox = p.inbox.get(m.to);
          if (inbox) inbox.push(seq);
          else p.inbox.set(m.to, (inbox = [seq]));
          p.count++;
          senderPeers = this.touchDialog(p, m.from, m.to, seq);
          recipientPeers = m.to !== m.from ? this.touchDialog(p, m.to, m.from, seq) : undefined;
        }
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
  }

  /** Records `seq` as uid's newest with peer; returns uid's map of peers. */
  private touchDialog(p: Derived, uid: string, peer: string, seq: number): Map<string, number> {
    let peers = p.dialogs.get(uid);
    if (!peers) p.dialogs.set(uid, (peers = new Map()));
    const had = peers.get(peer);
    if (had === undefined) p.count++;
    if (had === undefined || seq > had) peers.set(peer, seq);
    return peers;
  }

  /** Both sides of a direct conversation that lost a message are checked again. */
  private recheck(a: string, b: string): void {
    this.recheckOne(a, b);
    if (a !== b) this.recheckOne(b, a);
    this.armDerived();
  }

  private recheckOne(uid: string, peer: string): void {
    const p = this.pending;
    let peers = p.rechecks.get(uid);
    if (!peers) p.rechecks.set(uid, (peers = new Set()));
    if (!peers.has(peer)) {
      peers.add(peer);
      p.count++;
    }
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
    this.writingTick = ++this.markTick;
    this.derivedDue = false;
    if (this.derivedTimer) {
      clearTimeout(this.derivedTimer);
      this.derivedTimer = undefined;
    }
    const ops: BatchOp[] = [];
    for (const [conv, seqs] of d.hist) ops.push(put(this.s.hist, histKey(conv, seqs[0]), seqs));
    for (const [uid, seqs] of d.inbox) ops.push(put(this.s.inbox, inboxKey(uid, seqs[0]), seqs));
    for (const [uid, seq] of this.cursors) ops.push(put(this.s.cursor, uid, seq));
    const cursors = new Map(this.cursors);
    this.cursors.clear();
    this.writingCursors = cursors;
    this.writing = d;
    if (d.dialogs.size === 0 && d.rechecks.size === 0) return this.commitDerived(d, cursors, ops, NONE_JOINED);
    const preparing = this.dialogOps(d).then(
      (groups) => {
        const joined = new Set<number>();
        for (const group of groups) {
          group.forEach((op, i) => {
            if (i > 0) joined.add(ops.length);
            ops.push(op);
          });
        }
        this.commitDerived(d, cursors, ops, joined);
      },
      (err: unknown) => {
        // Nothing of the generation was written: it waits again (the watermark did not
        // move, so a restart would replay it too).
        if (this.writing === d) this.writing = undefined;
        if (this.writingCursors === cursors) this.writingCursors = undefined;
        this.restore(d, cursors);
        if (this.storage.db.status !== "open") return; // closing: replayed at the next start
        this.log.warn({ err }, "reading dialog pointers failed; the derived entries wait for the next write");
        this.armDerived();
      },
    );
    this.preparing = preparing;
    void preparing.then(() => {
      if (this.preparing === preparing) this.preparing = undefined;
    });
  }

  /**
   * The ops moving each touched conversation's `dialogs` entry to its new last seq: the
   * newest message's for new messages, the history's last for a recheck (removed when
   * the conversation is empty). One group of ops per conversation (Drain.joined).
   */
  private async dialogOps(d: Derived): Promise<BatchOp[][]> {
    const targets: { uid: string; peer: string; seq: number | undefined }[] = [];
    for (const [uid, peers] of d.dialogs) {
      const again = d.rechecks.get(uid);
      for (const [peer, seq] of peers) if (!again?.has(peer)) targets.push({ uid, peer, seq });
    }
    for (const [uid, peers] of d.rechecks) for (const peer of peers) targets.push({ uid, peer, seq: undefined });
    const groups: BatchOp[][] = [];
    for (let i = 0; i < targets.length; i += MIGRATE_PAGE) {
      const slice = targets.slice(i, i + MIGRATE_PAGE);
      const [at, lasts] = await Promise.all([
        this.s.dialogat.getMany(slice.map((t) => pair(t.uid, t.peer))) as Promise<(number | undefined)[]>,
        Promise.all(slice.map((t) => (t.seq === undefined ? this.lastSeq(directConv(t.uid, t.peer)) : undefined))),
      ]);
      slice.forEach((t, j) => {
        const old = at[j];
        const next = t.seq === undefined ? lasts[j] : Math.max(old ?? 0, t.seq);
        if (next === old) return;
        const group: BatchOp[] = [];
        if (old !== undefined) group.push(del(this.s.dialogs, dialogKey(t.uid, old)));
        if (next === undefined) group.push(del(this.s.dialogat, pair(t.uid, t.peer)));
        else group.push(put(this.s.dialogs, dialogKey(t.uid, next), t.peer), put(this.s.dialogat, pair(t.uid, t.peer), next));
        groups.push(group);
      });
    }
    return groups;
  }

  private commitDerived(d: Derived, cursors: ReadonlyMap<string, number>, ops: BatchOp[], joined: ReadonlySet<number>): void {
    let settle!: () => void;
    const settled = new Promise<void>((resolve) => (settle = resolve));
    this.drained = settled;
    const chunk = Math.max(DERIVED_CHUNK, Math.ceil((ops.length + d.cmids.size) / DERIVED_BATCHES));
    this.drain({ d, cursors, ops, at: 0, joined, tail: this.tailOps(d), chunk, settled, settle });
  }

  /**
   * Adds the next chunk of the generation being written to the batch being gathered,
   * and the one after it once that batch is written. One batch of S2's (5,000 msg/s,
   * ~2 messages per batch) took 2.1 ms to write when it carried a whole generation
   * (~800 operations, once a second) against 0.32 ms for the others, and every message
   * behind it waited that long. A chunk is DERIVED_CHUNK operations, or as many as the
   * batch already holds, or an eighth of the generation, whichever is most: a quiet
   * server's batches stay small, and a generation of any size drains within about
   * DERIVED_BATCHES batches, as fast as a busy server makes them. Spread over batches,
   * it stays correct: readers see the generation in memory until its last chunk is
   * written; the watermark comes last (a crash part-way replays the log as before);
   * and the entries a later write may contradict
   * (cmids, rechecks markers: tailOps) are made only when their chunk is added, so a
   * delete that comes first is seen, and one that comes after is written after them.
   * A deleted user's entries are left out of every chunk added after the deletion.
   */
  private drain(g: Drain): void {
    const room = Math.max(g.chunk, this.storage.gathering);
    const chunk: BatchOp[] = [];
    while (chunk.length < room && g.at < g.ops.length) chunk.push(g.ops[g.at++]);
    // Never cut inside a group that goes whole (a dialog move).
    while (g.at < g.ops.length && g.joined.has(g.at)) chunk.push(g.ops[g.at++]);
    let last = false;
    while (chunk.length < room) {
      const next = g.tail.next();
      if (next.done) {
        last = true;
        break;
      }
      chunk.push(next.value);
    }
    this.storage.commitLazy(this.gone.size > 0 ? chunk.filter((op) => !this.gone.has(this.ownerOf(op.key))) : chunk);
    // Synced, each chunk: the watermark, in the last, says the chunks before it need no
    // replay, and a later sync does not make them durable if LevelDB switched its
    // write-ahead log in between (it closes the old one, full memtable, without a sync).
    // Under load a chunk rides with a batch of messages, synced anyway.
    this.storage.afterCommit((err) => {
      // A chunk past the head may have held cmid entries (purgedCmidOps).
      if (!err && g.at === g.ops.length && g.d.cmids.size > 0) this.cmidWrites++;
      if (!err && !last) return this.drain(g);
      if (this.writing === g.d) this.writing = undefined;
      if (this.writingCursors === g.cursors) this.writingCursors = undefined;
      if (this.drained === g.settled) this.drained = undefined;
      if (err) this.restore(g.d, g.cursors); // written again with the next generation
      g.settle();
      if (this.pending.count > 0) this.armDerived();
      if (this.cursors.size > 0) this.armCursor();
    });
  }

  /**
   * The generation's operations that a later write may contradict, made one at a time
   * as chunks take them: its cmids (a message deleted meanwhile took its cmid out of
   * `d`, and it must not be put back after its delete), the rechecks markers it answers
   * (not one a later delete put: its own recheck takes it out), and the watermark last.
   */
  private *tailOps(d: Derived): Generator<BatchOp> {
    for (const [key, v] of d.cmids) yield put(this.s.cmids, key, v);
    for (const [uid, peers] of d.rechecks) {
      for (const peer of peers) {
        const key = pair(uid, peer);
        const tick = this.marked.get(key);
        if (tick !== undefined && tick > this.writingTick) continue;
        this.marked.delete(key);
        yield del(this.s.rechecks, key);
      }
    }
    if (d.through > 0) yield put(this.s.meta, "indexed", d.through);
  }

  /** The user a derived entry belongs to (its key's first part), "" for any other key. */
  private ownerOf(key: string): string {
    for (const space of [this.s.inbox, this.s.cursor, this.s.cmids, this.s.dialogs, this.s.dialogat]) {
      if (key.startsWith(space.prefix)) return keyHead(key.slice(space.prefix.length));
    }
    return "";
  }

  /** A generation whose write failed: its entries wait again, before anything newer. */
  private restore(d: Derived, cursors: ReadonlyMap<string, number>): void {
    const p = this.pending;
    for (const [conv, seqs] of d.hist) p.hist.set(conv, [...seqs, ...(p.hist.get(conv) ?? [])]);
    for (const [uid, seqs] of d.inbox) p.inbox.set(uid, [...seqs, ...(p.inbox.get(uid) ?? [])]);
    for (const [key, v] of d.cmids) if (!p.cmids.has(key)) p.cmids.set(key, v);
    for (const [uid, peers] of d.dialogs) {
      let now = p.dialogs.get(uid);
      if (!now) p.dialogs.set(uid, (now = new Map()));
      for (const [peer, seq] of peers) if (!((now.get(peer) ?? 0) >= seq)) now.set(peer, seq);
    }
    for (const [uid, peers] of d.rechecks) {
      let set = p.rechecks.get(uid);
      if (!set) p.rechecks.set(uid, (set = new Set()));
      for (const peer of peers) set.add(peer);
    }
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
    const hit = this.cmidInMemory(key);
    if (hit) return hit;
    const gen = this.cmidGen;
    let v = (await this.s.cmids.get(key)) as [string, number] | undefined;
    // An entry whose message is gone names nothing: its cmid is free. (A deleted
    // channel's purge left such entries before 4f97fd9, and a message sent with one of
    // them was answered 0 but never stored.) Only a resend past the memory reads this.
    if (v && (await this.s.log.get(seqKey(Number(v[0])))) === undefined) v = undefined;
    if (v && gen === this.cmidGen) this.rememberCmid(key, v);
    // A message with this cmid may have committed while the read waited: the read saw
    // the index before its (lazily written) entry, and the caller's own guard against
    // a store in flight is gone by then. Asking memory again closes that window.
    return v ?? this.cmidInMemory(key);
  }

  /** byCmid from memory only: a message committed lately (its index entry not read from disk). */
  cmidRecent(from: string, cmid: string): [string, number] | undefined {
    return this.cmidInMemory(pair(from, cmid));
  }

  private cmidInMemory(key: string): [string, number] | undefined {
    return this.recentCmids.get(key) ?? this.pending.cmids.get(key) ?? this.writing?.cmids.get(key);
  }

  /** A message by mid: one read. */
  async get(mid: string): Promise<MessageRecord | undefined> {
    // A mid is its seq unpadded: "01" or "1.0" names no message.
    if (!/^[1-9][0-9]{0,14}$/.test(mid)) return undefined;
    return (await this.s.log.get(seqKey(Number(mid)))) as MessageRecord | undefined;
  }

  /** Ops replacing a stored message's record (an edit). */
  updateOps(m: MessageRecord): BatchOp[] {
    // Dialogs reads the edited record from disk from now on (until a newer message).
    this.lastRecords.delete(convOf(m));
    return [putText(this.s.log, seqKey(Number(m.mid)), recordJson(m).json)];
  }

  /**
   * Ops removing a message: its record, its seq from its history chunk, its cmid. An
   * inbox entry stays: it names a record that no longer exists, which readers skip.
   * (History chunks are never rewritten otherwise, so this cannot race a commit.)
   * Commit them in the same turn: once that batch is written, a direct conversation's
   * dialogs entries are checked again (the message may have been its last).
   */
  async removeOps(m: MessageRecord): Promise<BatchOp[]> {
    const { ops, written } = await this.removal(m);
    // Registered on the batch the caller's commit joins (no await from here to it).
    this.storage.afterWrite(written);
    return ops;
  }

  /**
   * removeOps for a caller that writes them later (cluster mode's apply reads first and
   * writes after): call `written` once they are.
   */
  async removal(m: MessageRecord): Promise<{ ops: BatchOp[]; written: (err?: Error) => void }> {
    const seq = Number(m.mid);
    const conv = convOf(m);
    const ops = [del(this.s.log, seqKey(seq))];
    // Its history entry is written first, so the chunk read below holds it and the
    // delete rewrites that chunk in the same batch as the record's delete: a crash
    // before that batch leaves the message whole, after it leaves no trace.
    await this.histOnDisk(conv, seq);
    const found = (await readEntries(this.s.hist, { gt: `${conv}!`, lte: histKey(conv, seq), reverse: true, limit: 1 })) as [string, HistChunk][];
    if (found.length > 0) {
      const [key, seqs] = found[0];
      const rest = seqs.filter((q) => q !== seq);
      if (rest.length !== seqs.length) ops.push(rest.length > 0 ? put(this.s.hist, key, rest) : del(this.s.hist, key));
    }
    const cmidOp = this.cmidRemoval(m);
    if (cmidOp !== undefined) ops.push(cmidOp);
    const to = m.to;
    if (to !== undefined) {
      // Both sides' dialogs entries are checked again by a later generation (written
      // below); the marker makes that survive a crash before it.
      ops.push(put(this.s.rechecks, pair(m.from, to), 1));
      if (to !== m.from) ops.push(put(this.s.rechecks, pair(to, m.from), 1));
      this.marked.set(pair(m.from, to), Infinity);
      this.marked.set(pair(to, m.from), Infinity);
    }
    // Also after a failed write (then the message is still there, as far as this
    // process knows): the recheck reads the truth from history either way, and the
    // cmid taken out of the generations above is put back in one.
    const written = (err?: Error) => {
      this.forget(conv);
      if (to !== undefined) {
        const tick = ++this.markTick;
        this.marked.set(pair(m.from, to), tick);
        this.marked.set(pair(to, m.from), tick);
        this.recheck(m.from, to);
      }
      if (err === undefined) this.cmidRemoved(m);
      else this.cmidKept(m);
    };
    return { ops, written };
  }

  /**
   * The op deleting a removed message's cmid entry, if it has one; the entry is taken
   * out of every generation not yet written, so none puts it back after the delete.
   * Call cmidRemoved once the op is written.
   */
  private cmidRemoval(m: MessageRecord): BatchOp | undefined {
    if (m.cmid === undefined) return undefined;
    const key = pair(m.from, m.cmid);
    this.recentCmids.delete(key);
    this.pending.cmids.delete(key);
    this.writing?.cmids.delete(key);
    return del(this.s.cmids, key);
  }

  /**
   * The ops deleting a purged page's cmid entries, each only while it still names the
   * purged message; memory forgets them likewise. In cluster mode a message stored
   * after its channel's deletion may reuse such a cmid (features/cluster.ts decides so
   * in log order), and this node's purge, which runs on its own schedule, must not
   * take that message's entry away: a resend would then be stored twice here and once
   * elsewhere. An entry left behind names a missing record, which byCmid counts as free.
   */
  private async purgedCmidOps(records: readonly MessageRecord[]): Promise<BatchOp[]> {
    const withCmid = records.filter((m) => m.cmid !== undefined);
    if (withCmid.length === 0) return [];
    const keys = withCmid.map((m) => pair(m.from, m.cmid as string));
    const inMemory = (key: string) => this.pending.cmids.get(key) ?? this.writing?.cmids.get(key);
    const newer = (i: number) => {
      const v = inMemory(keys[i]);
      return v !== undefined && v[0] !== withCmid[i].mid;
    };
    const skip = withCmid.map((_, i) => newer(i));
    const writes = this.cmidWrites;
    const onDisk = (await this.s.cmids.getMany(keys)) as ([string, number] | undefined)[];
    // A generation written during the read may hold a newer entry the read missed:
    // nothing is deleted from disk then (what is left is harmless, see above).
    const diskSure = writes === this.cmidWrites;
    const ops: BatchOp[] = [];
    withCmid.forEach((m, i) => {
      const key = keys[i];
      if (skip[i] || newer(i)) return;
      for (const held of [this.recentCmids, this.pending.cmids, this.writing?.cmids]) if (held?.get(key)?.[0] === m.mid) held.delete(key);
      if (diskSure && onDisk[i]?.[0] === m.mid) ops.push(del(this.s.cmids, key));
    });
    return ops;
  }

  /**
   * The delete of `m` failed: its cmid entry, taken out of every generation not yet
   * written (cmidRemoval), waits in the next one again (a put of what the disk may
   * hold already), so that a resend with it is still answered with `m`.
   */
  private cmidKept(m: MessageRecord): void {
    if (m.cmid === undefined) return;
    const key = pair(m.from, m.cmid);
    const v: [string, number] = [m.mid, m.time];
    const p = this.pending;
    if (!p.cmids.has(key)) p.count++;
    p.cmids.set(key, v);
    this.rememberCmid(key, v);
    this.armDerived();
  }

  private cmidRemoved(m: MessageRecord): void {
    if (m.cmid === undefined) return;
    // Until the delete was written the disk still had the cmid: a byCmid read in that
    // window may have remembered it. A resend from now on stores anew (a message stored
    // meanwhile with the same cmid waits in a generation or is on disk, where byCmid
    // finds it).
    this.cmidGen++;
    this.recentCmids.delete(pair(m.from, m.cmid));
  }

  /** Whether `seq`'s history entry of `conv` waits in generation `d`. */
  private histHas(d: Derived | undefined, conv: string, seq: number): boolean {
    return d?.hist.get(conv)?.includes(seq) === true;
  }

  /**
   * Resolves once `seq`'s history entry of `conv` is on disk: its generation is written
   * now, not when due (a few batches at most; a write that keeps failing gives up after
   * a few, and the caller then finds no chunk for it).
   */
  private async histOnDisk(conv: string, seq: number): Promise<void> {
    for (let i = 0; i < 8; i++) {
      const waiting = this.histHas(this.pending, conv, seq);
      if (!waiting && !this.histHas(this.writing, conv, seq)) return;
      if (waiting) this.derivedDue = true;
      // A generation with dialog entries joins batches once its pointers are read, and
      // is on disk once its last chunk is; one still waiting starts with the next batch.
      await this.preparing?.catch(() => {});
      await (this.drained ?? new Promise<void>((resolve) => this.storage.afterWrite(() => resolve())));
    }
  }

  /**
   * The seqs of `conv`'s committed messages whose history chunk is not on disk yet,
   * ascending: always newer than every seq on disk. A reader takes them before it reads
   * the disk; a generation written meanwhile is then on disk too (readers skip, on
   * disk, what they took here).
   */
  private histInMemory(conv: string): number[] {
    const a = this.writing?.hist.get(conv);
    const b = this.pending.hist.get(conv);
    return a === undefined ? (b === undefined ? [] : b.slice()) : b === undefined ? a.slice() : a.concat(b);
  }

  /**
   * The seqs of a conversation's newest `limit` messages before `before` (a mid),
   * oldest first: a bounded reverse range read over its history chunks, whatever the
   * conversation's length.
   */
  async historySeqs(conv: string, limit: number, before?: string): Promise<number[]> {
    let below = before !== undefined ? Number(before) : Infinity;
    const out: number[] = [];
    const tail = this.tails.get(conv);
    if (tail !== undefined) {
      // The tail is a suffix of the whole list: if it holds `limit` seqs below `below`,
      // they are the page.
      for (let i = tail.length - 1; i >= 0 && out.length < limit; i--) if (tail[i] < below) out.push(tail[i]);
      if (out.length === limit) return out.reverse();
      out.length = 0;
    }
    const mem = this.histInMemory(conv);
    for (let i = mem.length - 1; i >= 0 && out.length < limit; i--) if (mem[i] < below) out.push(mem[i]);
    if (out.length === limit) return out.reverse();
    // On disk, only what is older than memory's oldest.
    if (mem.length > 0 && mem[0] < below) below = mem[0];
    // Chunks that start at or before `below` (the one holding it may start before it).
    let lt = below !== Infinity ? histKey(conv, below + 1) : `${conv}"`;
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
    return (await this.readRecords(seqs)).filter((m): m is MessageRecord => m !== undefined);
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

  /** Up to `limit` conversations whose purge was recorded and has not finished, after `after`, in order. */
  async pendingPurges(after: string | undefined, limit: number): Promise<string[]> {
    return readKeys(this.s.purges, after === undefined ? { limit } : { gt: after, limit });
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
    exclusive: <T>(fn: () => Promise<T>) => Promise<T>,
    signal?: AbortSignal,
  ): Promise<void> {
    while (!signal?.aborted) {
      // Read and removed under `exclusive` (the conversation's lock, which edits and
      // deletes hold from their read to their write).
      const page = await exclusive(async () => {
        // Its last messages' history entries may still wait in memory (nothing joins a
        // deleted channel's conversation, and the newest one's generation holds or
        // follows the others'): taken before the disk read, so that a generation written
        // between the two is on disk for this read or the next one.
        const newest = this.histInMemory(conv).at(-1);
        const read = (await readEntries(this.s.hist, { ...prefixRange(conv), limit: HIST_PAGE })) as [string, HistChunk][];
        if (read.length === 0) return newest;
        // Whole chunks, up to PURGE_SEQS messages (at least one chunk): a chunk holds a
        // derive cycle of the channel, thousands for a busy one, and 16 of them were
        // read and removed as one page of records.
        const chunks: [string, HistChunk][] = [];
        let n = 0;
        for (const c of read) {
          if (chunks.length > 0 && n + c[1].length > PURGE_SEQS) break;
          chunks.push(c);
          n += c[1].length;
        }
        const seqs = chunks.flatMap(([, s]) => s);
        // Read PURGE_READ at a time and kept without their bodies (what a purge needs of
        // a record is its mid, sender, cmid and attachment): 512 records of up to
        // --max-frame each were held at once, by every purge running.
        const records: MessageRecord[] = [];
        for (let i = 0; i < seqs.length; i += PURGE_READ) {
          for (const m of await this.records(seqs.slice(i, i + PURGE_READ))) records.push(m.body === "" ? m : { ...m, body: "" });
        }
        const pageOps = await onPage(records);
        // Their cmids go with them: a later message with one of them is a new message.
        // Built last, with no wait between them and the commit (purgedCmidOps).
        const cmidOps = await this.purgedCmidOps(records);
        await this.storage.commit([...chunks.map(([key]) => del(this.s.hist, key)), ...seqs.map((q) => del(this.s.log, seqKey(q))), ...cmidOps, ...pageOps]);
        for (const m of records) this.cmidRemoved(m);
        this.forget(conv);
        return records;
      });
      if (page === undefined) {
        await this.storage.commit([del(this.s.purges, conv)]);
        return;
      }
      if (typeof page === "number") {
        // History entries still waiting in memory: written now, then purged by the next
        // page. If their writes keep failing (histOnDisk gives up), the mark stays for
        // the next start (which writes them from the log): without it they would land
        // after the purge and stay for good, their cmids taken.
        await this.histOnDisk(conv, page);
        if (this.histInMemory(conv).length > 0) throw new Error(`the history of '${conv}' is not written yet; its purge resumes at the next start`);
        continue;
      }
      onCommitted(page);
    }
  }

  /**
   * Ops removing what only a (deleted) user needed: their inbox, cursor, cmid index and
   * list of direct peers. Their messages stay in others' history.
   */
  async forgetUserOps(uid: string): Promise<BatchOp[]> {
    // Nothing in memory changes until the deletion is committed (forgotten): if its
    // commit fails, the account stays with every entry it had. A chunk already in a
    // batch is on disk once that batch is written, and the reads below find it; one
    // written after them is the deletion's sweep's (sweepUser).
    const ops: BatchOp[] = [del(this.s.cursor, uid)];
    await this.preparing?.catch(() => {});
    await new Promise<void>((resolve) => this.storage.afterWrite(() => resolve()));
    for (const space of [this.s.inbox, this.s.cmids, this.s.peers, this.s.dialogs, this.s.dialogat, this.s.rechecks]) {
      for (const key of await readKeys(space, prefixRange(uid))) ops.push(del(space, key));
    }
    return ops;
  }

  /** `uid`'s deletion is being committed, or is (one of the last KNOWN_GONE deleted). */
  isForgotten(uid: string): boolean {
    return this.gone.has(uid) || this.forgetting.has(uid);
  }

  /** `uid`'s deletion is about to be committed: a message stored from now on would land with it or after it (see isForgotten). */
  forgettingUser(uid: string): void {
    this.forgetting.add(uid);
  }

  /** The commit of forgettingUser's deletion failed: `uid` is still there. */
  notForgettingUser(uid: string): void {
    this.forgetting.delete(uid);
  }

  /**
   * `uid`'s deletion is committed: what waits in memory for them goes, and none of
   * their derived entries is written from now on (`gone`).
   */
  forgotten(uid: string): void {
    this.forgetting.delete(uid);
    if (this.gone.size >= KNOWN_GONE) this.gone.delete(this.gone.values().next().value as string);
    this.gone.add(uid);
    this.cursors.delete(uid);
    this.pending.inbox.delete(uid);
    this.pending.dialogs.delete(uid);
    this.pending.rechecks.delete(uid);
    for (const key of this.marked.keys()) if (keyHead(key) === uid) this.marked.delete(key);
  }

  /**
   * After a deletion (an account-deleted hook, run again at start-up until done): the
   * entries of `uid` that a chunk wrote between forgetUserOps's reads and the commit.
   */
  async sweepUser(uid: string): Promise<void> {
    await this.storage.commit(await this.forgetUserOps(uid));
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

  /**
   * The seq of a conversation's oldest message, if it has any: one bounded read, and
   * for a channel remembered (KNOWN_LASTS) until a removal in it (forget): a new
   * message never changes it. (The rooms door's OLD_DIALOGS asks it for every room of
   * the caller, up to --max-joined-channels, at each request.)
   */
  async firstSeq(conv: string): Promise<number | undefined> {
    const cached = conv.startsWith("c:");
    const known = cached ? this.firsts.get(conv) : undefined;
    if (known !== undefined) return known;
    const gen = this.endsGen;
    const mem = this.histInMemory(conv);
    const found = (await readEntries(this.s.hist, { ...prefixRange(conv), limit: 1 })) as [string, HistChunk][];
    const first = found.length > 0 ? found[0][1][0] : mem[0];
    // A removal meanwhile may have taken it.
    if (cached && first !== undefined && gen === this.endsGen) {
      if (this.firsts.size >= KNOWN_LASTS) this.firsts.clear();
      this.firsts.set(conv, first);
    }
    return first;
  }

  /** The seq of a conversation's newest message, if it has any: one bounded read. */
  async lastSeq(conv: string): Promise<number | undefined> {
    // Only channels are remembered (their commits keep `lasts` up to date).
    const cached = conv.startsWith("c:");
    const known = cached ? this.lasts.get(conv) : undefined;
    if (known !== undefined) return known;
    const gen = this.endsGen;
    // What waits in memory is newer than anything on disk.
    const mem = this.histInMemory(conv);
    let last = mem.length > 0 ? mem[mem.length - 1] : undefined;
    if (last === undefined) {
      const found = (await readEntries(this.s.hist, { ...prefixRange(conv), reverse: true, limit: 1 })) as [string, HistChunk][];
      // A chunk is never empty: removing its last seq deletes it.
      if (found.length > 0) last = found[0][1][found[0][1].length - 1];
    }
    if (!cached) return last;
    // A message committed meanwhile may be newer; a removal meanwhile makes this stale.
    const now = this.lasts.get(conv);
    if (now !== undefined) return now;
    if (last !== undefined && gen === this.endsGen) this.lastIs(conv, last);
    return last;
  }

  /**
   * Up to `limit` of `uid`'s direct conversations whose last message is older than
   * `below` (a seq), newest first, each with that last message's seq: bounded range
   * reads of the dialogs index, merged with the entries still in memory.
   *
   * The index orders conversations by their newest message ever; a deleted message
   * leaves its entry too high until the recheck moves it (the next generation). So
   * each candidate's actual last seq is read (its record still exists: that seq; else
   * from its history), and a candidate is handed out only once the index has gone
   * below its actual seq: no later candidate can be newer (actual ≤ index).
   * `record` is that last message when it was read on the way (most entries), so the
   * caller need not read it again.
   */
  async dialogs(uid: string, limit: number, below = Infinity): Promise<DialogEntry[]> {
    // Conversations that lost a message since their entries were last written: their
    // index seq (in memory or on disk) may be too high, and a page below it would
    // never meet them. Each is placed by its actual last seq, read first.
    const again = new Set<string>();
    for (const d of [this.writing, this.pending]) for (const peer of d?.rechecks.get(uid) ?? []) again.add(peer);
    const mem = new Map<string, number>();
    for (const d of [this.writing, this.pending]) {
      const peers = d?.dialogs.get(uid);
      if (peers) for (const [peer, seq] of peers) if (!again.has(peer) && (mem.get(peer) ?? 0) < seq) mem.set(peer, seq);
    }
    const fromMem = [...mem].filter(([, seq]) => seq < below).sort((a, b) => b[1] - a[1]);
    // A conversation newer than `below` in memory was on an earlier page.
    const seen = new Set<string>([...mem].filter(([, seq]) => seq >= below).map(([peer]) => peer));
    const out: DialogEntry[] = [];
    const held: DialogEntry[] = [];
    const peers = [...again];
    const lasts = await Promise.all(peers.map((peer) => this.lastSeq(directConv(uid, peer))));
    peers.forEach((peer, i) => {
      seen.add(peer);
      const seq = lasts[i];
      if (seq !== undefined && seq < below) held.push({ peer, seq, record: undefined });
    });
    const release = (floor: number) => {
      held.sort((a, b) => b.seq - a.seq);
      while (held.length > 0 && out.length < limit && held[0].seq >= floor) out.push(held.shift() as DialogEntry);
    };
    let gt = below === Infinity ? `${uid}!` : dialogKey(uid, below);
    let m = 0;
    let diskDone = false;
    const page = Math.min(Math.max(limit, 16), 256);
    let disk: [string, string][] = [];
    let d = 0;
    while (out.length < limit) {
      if (d >= disk.length && !diskDone) {
        disk = (await readEntries(this.s.dialogs, { gt, lt: `${uid}"`, limit: page })) as [string, string][];
        d = 0;
        if (disk.length < page) diskDone = true;
        if (disk.length > 0) gt = disk[disk.length - 1][0];
      }
      // The next candidates, in index order, up to a page of them.
      const batch: { peer: string; seq: number }[] = [];
      while (batch.length < page && (m < fromMem.length || d < disk.length)) {
        if (d >= disk.length && !diskDone) break; // read on before going below this page
        const diskSeq = d < disk.length ? dialogSeq(disk[d][0]) : -1;
        let peer: string;
        let seq: number;
        if (m < fromMem.length && fromMem[m][1] >= diskSeq) [peer, seq] = fromMem[m++];
        else [peer, seq] = [disk[d][1], diskSeq], d++;
        if (seen.has(peer)) continue;
        seen.add(peer);
        batch.push({ peer, seq });
      }
      if (batch.length === 0) {
        if (d < disk.length || !diskDone) continue;
        break;
      }
      // Read DIALOG_CHECKS at a time, a long record dropped as soon as it is seen: the
      // page may be 500 of them (up to --max-frame each); the reply reads it again.
      const found: (MessageRecord | undefined)[] = [];
      const exists: boolean[] = [];
      for (let k = 0; k < batch.length; k += DIALOG_CHECKS) {
        const part = await this.lastRecordsAt(batch.slice(k, k + DIALOG_CHECKS).map((c) => ({ conv: this.directConv(uid, c.peer), seq: c.seq })));
        for (const m of part) {
          exists.push(m !== undefined);
          found.push(m !== undefined && m.body.length <= LAST_RECORD_BODY ? m : undefined);
        }
      }
      const actual = await Promise.all(
        batch.map((c, i) => {
          if (exists[i]) return c.seq;
          // Stale (a recheck lost in a crash, or not yet written): repaired on the way.
          this.recheckOne(uid, c.peer);
          return this.lastSeq(directConv(uid, c.peer));
        }),
      );
      this.armDerived();
      batch.forEach((c, i) => {
        const seq = actual[i];
        // found[i] is the (short) record at c.seq: when it exists, actual[i] is that seq.
        if (seq !== undefined && seq < below) held.push({ peer: c.peer, seq, record: found[i] });
      });
      release(batch[batch.length - 1].seq);
    }
    release(-1);
    return out;
  }

  /** Told of every advance made on this node (cluster mode shares them with the others). */
  onAdvance: ((uid: string, seq: number) => void) | undefined;

  /** The seq through which `uid`'s inbox has been delivered. */
  async cursor(uid: string): Promise<number> {
    const mem = this.cursorInMemory(uid);
    if (mem !== undefined) return mem;
    const stored = ((await this.s.cursor.get(uid)) as number | undefined) ?? 0;
    // An advance may have landed while we read.
    const now = Math.max(stored, this.cursorInMemory(uid) ?? 0);
    this.knowCursor(uid, now);
    return now;
  }

  /** The newest value memory holds (unwritten, remembered, or being written), if any. */
  private cursorInMemory(uid: string): number | undefined {
    const mem = this.cursors.get(uid) ?? this.knownCursors.get(uid);
    return mem ?? this.writingCursors?.get(uid);
  }

  /**
   * Advances `uid`'s cursor; never backwards (a second device acknowledging less, a
   * late confirmation). Written lazily: a lost advance only redelivers. `fromLog`: the
   * advance is another node's, read from the cluster's log (onAdvance does not hear it).
   */
  advance(uid: string, seq: number, fromLog = false): void {
    if (!fromLog) this.onAdvance?.(uid, seq);
    const known = this.cursorInMemory(uid);
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
    }, DERIVED_DELAY_MS);
    this.cursorTimer.unref();
  }

  /**
   * Up to `limit` of `uid`'s inbox seqs after `after`, oldest first (their records:
   * `records`). Memory is read in the same turn as the disk iterators take their
   * snapshot, and entries leave memory only once their write has completed, so every
   * entry committed before the call is seen; duplicates between the two are merged.
   */
  async inboxAfter(uid: string, after: number, limit: number): Promise<number[]> {
    const mem: number[] = [];
    for (const d of [this.writing, this.pending]) {
      const list = d?.inbox.get(uid);
      if (list) for (const q of list) if (q > after) mem.push(q);
    }
    let from = inboxKey(uid, after);
    const [before, first] = await Promise.all([
      readEntries<InboxChunk>(this.s.inbox, { gt: `${uid}!`, lte: from, reverse: true, limit: 1 }),
      readEntries<InboxChunk>(this.s.inbox, { gt: from, lt: `${uid}"`, limit: INBOX_CHUNK_READS }),
    ]);
    const all = new Set<number>(mem);
    for (const [, chunk] of before) for (const q of chunk) if (q > after) all.add(q);
    // The chunks after, a few at a time (one may hold thousands of seqs: reading
    // `limit` of them for a page of `limit` made each sync page sort millions). A
    // chunk's key is its first and smallest seq, so a chunk not read yet holds only
    // seqs above the last key read: once `limit` seqs at or below it are in, the page
    // is complete.
    // Each read takes twice as many as the last (up to `limit`): a sparse inbox, one
    // seq a chunk, still takes a few reads a page.
    for (let later = first, n = INBOX_CHUNK_READS; ; ) {
      for (const [, chunk] of later) for (const q of chunk) if (q > after) all.add(q);
      if (later.length < n) break;
      from = later[later.length - 1][0];
      const lastKey = later[later.length - 1][1][0];
      let below = 0;
      for (const q of all) if (q <= lastKey) below++;
      if (below >= limit) break;
      n = Math.min(2 * n, limit);
      later = await readEntries<InboxChunk>(this.s.inbox, { gt: from, lt: `${uid}"`, limit: n });
    }
    return [...all].sort((a, b) => a - b).slice(0, limit);
  }

  /** The records at `seqs`, undefined where the message has been deleted since. */
  recordsAt(seqs: readonly number[]): Promise<(MessageRecord | undefined)[]> {
    return this.readRecords(seqs);
  }

  /** Everything derived is written now (shutdown, start-up replay). */
  async flushDerived(): Promise<void> {
    for (let i = 0; i < 3; i++) {
      this.derivedDue = true;
      this.storage.schedule();
      await this.storage.settle();
      // A generation reading its dialog pointers is written after them.
      if (this.preparing) {
        await this.preparing;
        await this.storage.settle();
      }
      if (this.pending.count === 0 && this.cursors.size === 0) return;
    }
  }
}
