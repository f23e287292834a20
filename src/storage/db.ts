// The database handle and its group commit.
//
// Every write in wirechat goes into the batch being gathered: operations from all
// connections that arrive while a batch is being written form the next batch, and a
// batch is written atomically. A caller waiting for its operations (commit(), or
// afterCommit() on the hot path) is called back only when its batch is on disk, so a
// reply sent after it is durable, and a burst of N messages costs one fsync, not N.
//
// Which writes may skip fsync: a batch that holds only lazy writes (commitLazy:
// delivery cursors, clean-up deletes) is written without sync. Losing it in a crash
// cannot lose an acknowledged message: a lost cursor advance only means a message is
// delivered again, and a lost clean-up is redone. Every batch that holds a write
// someone waits for is synced (afterCommit, commit), and so is every batch of derived
// index entries (history, inbox, cmids, dialogs: storage/messages.ts), whose
// watermark tells start-up what needs no replay. A synced batch does not make the lazy
// writes before it durable in every case: when its memtable is full, LevelDB closes
// its write-ahead log without a sync and starts another, so an unsynced tail of the old
// log is lost to a power failure until that memtable is written as a table. What
// something later relies on is synced in its own batch, never left to a later one.
// A waiter on a batch with nothing in it, and close(), sync the log when the last
// batch written was not synced (a delete of SYNC_MARK_KEY gives that batch an
// operation: LevelDB writes no empty batch): after a clean shutdown nothing written,
// lazily or not, waits in an unsynced log (the older logs' memtables are written as
// synced tables before LevelDB closes).
//
// Batches are built on classic-level's native batch directly (its binding's
// batch_put / batch_write / batch_clear): each put is handed to LevelDB as it is
// queued, spreading the encoding work over the turns that produce it, and write() is
// one native call. Two native batches are made at start-up and reused, one gathering
// while the other is written. The public chained batch (db.batch()) costs per batch,
// besides the native call: a JS object with a dozen private fields registered with the
// database, an options object, three promises and an async function, a native object
// with a finaliser that only the next GC frees, and a close afterwards. At 5,000
// msg/s (2.3 messages per batch) that was 12 % of the bytes the server allocated,
// and its finalisers added weak handles to every scavenge. The public put() checks,
// encodes and copies an options object per call (500 bytes per message in the S1
// allocation profile, 1.5 % of the server's CPU): none of it does anything for a
// root-level utf8 database written with prefixed string keys. The binding is
// classic-level's private API: package.json names its exact version, and
// Storage.open refuses to start with any other (nativeBatches).
//
// A failed write: its waiters are told (a message's sender gets 16), and the next batch
// tries again. But LevelDB makes some failures stick: once a log sync (or a background
// flush or compaction) has failed, it refuses every later write with that error until
// the database is opened again. So while writes fail the storage is `failing` (/readyz
// says so at once), a synced probe write goes out REFUSING_MS after the first failure
// if nothing else has, and once writes have failed for that long with none getting
// through, onRefusing is called: the server stops (server.ts), and the service manager's
// restart opens the database again, which recovers its log.

import { createRequire } from "node:module";
import path from "node:path";
import { Level } from "level";
import type { Logger } from "pino";
import type { IdSource } from "../seams.js";
import { makeDirSync } from "./dirs.js";
import { openSpaces, SYNC_MARK_KEY, type Space, type Spaces } from "./layout.js";
import { readKeys } from "./range.js";

/** A write, already encoded for the root database: prefixed key, JSON text value. */
export interface BatchOp {
  type: "put" | "del";
  key: string;
  value?: string;
  /** Who hears of this write (its space is watched), with its key in the space. */
  watch?: SpaceWatcher;
  spaceKey?: string;
}

/**
 * Hears of each write to a watched space (Storage.watch): when it joins a batch, and
 * again once that batch is written or has failed. Keys come without the space's prefix.
 * (Only writes made with put/putText/del below: the message hot path's own puts are to
 * spaces nobody watches.)
 */
export interface SpaceWatcher {
  queued(key: string): void;
  written(key: string): void;
}

const watchers = new WeakMap<Space, SpaceWatcher>();

function op(type: "put" | "del", sublevel: Space, key: string, value: string | undefined): BatchOp {
  const watch = watchers.get(sublevel);
  const o: BatchOp = { type, key: sublevel.prefix + key, value };
  if (watch !== undefined) {
    o.watch = watch;
    o.spaceKey = key;
  }
  return o;
}

export function put(sublevel: Space, key: string, value: unknown): BatchOp {
  return op("put", sublevel, key, JSON.stringify(value));
}

/** A put whose value is already JSON text (serialised once, used for disk and wire). */
export function putText(sublevel: Space, key: string, json: string): BatchOp {
  return op("put", sublevel, key, json);
}

export function del(sublevel: Space, key: string): BatchOp {
  return op("del", sublevel, key, undefined);
}

/**
 * LevelDB options for wirechat's write pattern: a steady stream of small appends
 * (message records ~200 bytes) in synced batches. A 64 MiB write buffer (default 4)
 * means 16x fewer memtable flushes and level-0 compactions, which on one core cost
 * more than the writes themselves (measured: 2 puts per message, 1M messages, 7.1 µs
 * of CPU per message with 4 MiB, 4.9 µs with 64 MiB; 256 MiB was slower again, 7.3
 * µs, from a larger skip list). The buffer is memory that is only filled under write
 * load. Compression stays on: it cost less CPU than writing uncompressed tables.
 * The block cache (16 MiB, default 8) keeps recent history and index blocks warm.
 *
 * At most 64 files open (default 1000): LevelDB maps every open table file into
 * memory (on 64-bit, up to 1,000 of them) and reads through the mapping, so each page
 * a read touches stays in the server's RSS for as long as its table is open. With
 * 1,000 that grows with the database: a 30-minute soak's RSS rose 44 % after warm-up
 * (mapped table pages 104 -> 198 MiB) while the anonymous memory rose 3 %. 64 open
 * files (54 tables, ~2 MiB each past level 0) bound the mapped pages; a table read
 * after it was closed is opened again (its index and filter read once more).
 */
export const LEVEL_OPTIONS = {
  keyEncoding: "utf8",
  valueEncoding: "utf8",
  writeBufferSize: 64 * 1024 * 1024,
  cacheSize: 16 * 1024 * 1024,
  maxOpenFiles: 64,
} as const;

/**
 * How long batch writes may all fail before the storage is taken to refuse them until
 * the database is opened again (see the top of the file): long enough that a failure
 * that passes (a full disk freed) does not stop the server, short enough that a stuck
 * one does not leave it answering 16 to every write for long.
 */
const REFUSING_MS = 10_000;

type Done = (err: Error | undefined) => void;
/** A commit waiter as an object (the hot path: no closure per message). */
export interface CommitWaiter {
  committed(err: Error | undefined): void;
}
/** A native LevelDB write batch of classic-level's binding (an opaque handle). */
type NativeBatch = object & { readonly __native: unique symbol };
/** The parts of classic-level's binding this file calls (see the top of the file). */
interface Binding {
  batch_put(b: NativeBatch, key: string | Uint8Array, value: string): void;
  batch_del(b: NativeBatch, key: string): void;
  batch_clear(b: NativeBatch): void;
  batch_write(b: NativeBatch, options: { sync: boolean }): Promise<void>;
}

/** classic-level's own database calls this file makes (Storage.classic). */
interface ClassicCalls {
  compactRange(start: string, end: string): Promise<void>;
  getProperty(name: string): string;
}

/** The classic-level whose binding this file calls (package.json pins it). */
export const PINNED_CLASSIC_LEVEL = "3.0.0";

/**
 * Two native batches of `db`, from classic-level's binding. Refuses to run on a
 * classic-level other than the pinned one, or one whose binding or chained batch has
 * changed shape: a silent change there could drop writes.
 */
function nativeBatches(db: Level<string, string>): { binding: Binding; batches: [NativeBatch, NativeBatch] } {
  const require = createRequire(import.meta.url);
  const version = (require("classic-level/package.json") as { version: string }).version;
  const binding = require("classic-level/binding") as Partial<Binding>;
  const grab = (): NativeBatch | undefined => {
    // A chained batch holds its native batch under a symbol named "context"; the
    // native batch lives as long as something holds it (a finaliser frees it).
    const chain = db.batch();
    const sym = Object.getOwnPropertySymbols(chain).find((x) => x.description === "context");
    const native = sym === undefined ? undefined : ((chain as unknown as Record<symbol, unknown>)[sym] as NativeBatch | undefined);
    void chain.close();
    return native !== undefined && typeof native === "object" ? native : undefined;
  };
  const a = grab();
  const b = grab();
  const ok = ["batch_put", "batch_del", "batch_clear", "batch_write"].every((f) => typeof binding[f as keyof Binding] === "function") && a && b;
  if (version !== PINNED_CLASSIC_LEVEL || !ok) {
    throw new Error(
      `wirechat needs classic-level ${PINNED_CLASSIC_LEVEL} exactly (its native batch binding), found ${version}${ok ? "" : " without it"}: reinstall with npm ci`,
    );
  }
  return { binding: binding as Binding, batches: [a as NativeBatch, b as NativeBatch] };
}

class Batch {
  /** The native batch gathering this one's operations, taken on its first. */
  native: NativeBatch | undefined;
  ops = 0;
  /** Someone waits for this batch: it is synced. */
  durable = false;
  waiters: (Done | CommitWaiter)[] = [];
  /** Resolved/rejected form for commit() callers, made on first use. */
  promise: Promise<void> | undefined;
  /** Its writes to watched spaces, told again once it is written. */
  watched: BatchOp[] | undefined;
  /** Counters whose latest value it carries (carried again if it fails). */
  counted: Counter[] | undefined;
}

/** A monotonic number kept in `meta`; the latest value rides along in each batch. */
export class Counter implements IdSource {
  private dirty = false;
  constructor(
    readonly name: string,
    private value: number,
  ) {}
  next(): number {
    this.dirty = true;
    return ++this.value;
  }
  /** The last value handed out. */
  get last(): number {
    return this.value;
  }
  takeDirty(): number | undefined {
    if (!this.dirty) return undefined;
    this.dirty = false;
    return this.value;
  }
  /** The batch that carried the value failed: the next one carries it again. */
  retry(): void {
    this.dirty = true;
  }
}

/** Adds operations to a batch about to be written (counters, derived indexes). */
export type BatchContributor = (s: Storage) => void;

export class Storage {
  private open: Batch = new Batch();
  private writing = false;
  private scheduled = false;
  private closed = false;
  /** The last batch written was not synced (see the top of the file). */
  private unsyncedTail = false;
  private readonly counters: Counter[] = [];
  private readonly contributors: BatchContributor[] = [];
  private readonly idle: (() => void)[] = [];
  /** Hears of every batch written: its operations and its write's duration in seconds. */
  onBatch: ((ops: number, seconds: number) => void) | undefined;
  /** Batch writes that failed since start. */
  failedBatches = 0;
  /** Since when (unix ms) every batch written has failed, and the first failure: undefined once one is written. */
  private failingSince: number | undefined;
  private firstFailure: Error | undefined;
  private probeTimer: NodeJS.Timeout | undefined;
  /** The probe's time came while writes were failing. */
  private probed = false;
  /** How long writes may keep failing, none getting through, before onRefusing (see the top of the file). */
  refusingMs = REFUSING_MS;
  /** Called once when writes have failed for refusingMs, none getting through, with the latest failure. */
  onRefusing: ((err: Error) => void) | undefined;
  private refused = false;

  /** Native batches not in use (two: one gathering, one being written). */
  private readonly spare: NativeBatch[];
  private readonly binding: Binding;

  private constructor(
    readonly db: Level<string, string>,
    readonly spaces: Spaces,
    private readonly log: Logger,
    native: { binding: Binding; batches: [NativeBatch, NativeBatch] },
  ) {
    this.binding = native.binding;
    this.spare = [...native.batches];
  }

  static async open(dataDir: string, log: Logger): Promise<Storage> {
    const dir = path.join(dataDir, "db");
    makeDirSync(dir);
    const db = new Level<string, string>(dir, LEVEL_OPTIONS);
    await db.open();
    let native;
    try {
      native = nativeBatches(db);
    } catch (err) {
      await db.close();
      throw err;
    }
    return new Storage(db, openSpaces(db), log, native);
  }

  /**
   * Starts LevelDB's background thread (memtable flushes, compactions) now rather than
   * at its first memtable flush. LevelDB creates that thread from the pool thread whose
   * write fills the memtable, at that thread's priority, the event loop's; run.ts
   * lowers the background threads at start-up and then every few seconds
   * (thread-priority.ts), so a server's first flush ran at the loop's priority. Under
   * S2 at 20,000 msg/s (server pinned to one core) that flush, 64 MiB of memtable
   * written as a 17 MB table in 350 ms, took the loop's CPU for its whole length and
   * was the run's one long episode of slow deliveries: 5,398 messages over 8 ms
   * (2.7 %, p99 15.4 ms). With the thread started here and lowered at start-up, the
   * same flush took 680 ms at nice 10 and no episode lined up with it (p99 9.3 ms in
   * that run). Compacting an empty key range makes LevelDB switch its memtable, which
   * starts the thread; nothing is rewritten. It may wait for a compaction under way.
   */
  async startBackgroundThread(): Promise<void> {
    await this.classic.compactRange("\u0000", "\u0000");
  }

  /**
   * The database as classic-level, which `level` runs in Node: its types are the
   * browser's too, without the calls only classic-level has.
   */
  private get classic(): ClassicCalls {
    return this.db as unknown as ClassicCalls;
  }

  /**
   * Tables in LevelDB's level 0: each memtable flush adds one, a compaction of level 0
   * takes them down. LevelDB compacts level 0 from 4 tables, slows every write by a
   * millisecond from 8 and stops writes at 12 until the compaction is done.
   * Undefined once the database is closed.
   */
  level0Tables(): number | undefined {
    if (this.closed) return undefined;
    try {
      return Number(this.classic.getProperty("leveldb.num-files-at-level0"));
    } catch {
      return undefined; // closing meanwhile
    }
  }

  async counter(name: string): Promise<Counter> {
    const last = (await this.spaces.meta.get(name)) as number | undefined;
    const c = new Counter(name, last ?? 0);
    this.counters.push(c);
    return c;
  }

  /** Runs `fn` just before each batch is written, to add its own operations. */
  contribute(fn: BatchContributor): void {
    this.contributors.push(fn);
  }

  /**
   * Adds one put to the batch being gathered (the hot path: no op object). A key given
   * as bytes is copied by the binding at once: the caller may reuse its buffer.
   */
  put(key: string | Uint8Array, value: string): void {
    const b = this.open;
    this.binding.batch_put(this.nativeOf(b), key, value);
    b.ops++;
  }

  private add(op: BatchOp): void {
    const b = this.open;
    if (op.type === "put") this.binding.batch_put(this.nativeOf(b), op.key, op.value as string);
    else this.binding.batch_del(this.nativeOf(b), op.key);
    b.ops++;
    if (op.watch !== undefined) {
      op.watch.queued(op.spaceKey as string);
      (b.watched ??= []).push(op);
    }
  }

  /** Tells `watcher` of every write to `space` from now on (see SpaceWatcher). */
  watch(space: Space, watcher: SpaceWatcher): void {
    watchers.set(space, watcher);
  }

  /** `b`'s native batch, taken from the spares on its first operation (one is always free). */
  private nativeOf(b: Batch): NativeBatch {
    if (this.closed) throw new Error("storage is closed");
    if (b.native !== undefined) return b.native;
    const native = this.spare.pop();
    if (native === undefined) throw new Error("no native batch free (two batches in use)");
    b.native = native;
    return native;
  }

  /** Operations in the batch being gathered. */
  get gathering(): number {
    return this.open.ops;
  }

  /** Calls `done` once everything added so far is on disk (synced), or failed. */
  afterCommit(done: Done | CommitWaiter): void {
    if (this.closed) {
      const err = new Error("storage is closed");
      if (typeof done === "function") done(err);
      else done.committed(err);
      return;
    }
    const b = this.open;
    b.durable = true;
    b.waiters.push(done);
    this.schedule();
  }

  /** Calls `done` once the batch being gathered is written, without asking for a sync. */
  afterWrite(done: Done): void {
    if (this.closed) return done(new Error("storage is closed"));
    this.open.waiters.push(done);
    this.schedule();
  }

  /** Queues `ops` for the next batch; resolves once that batch is synced to disk. */
  commit(ops: readonly BatchOp[]): Promise<void> {
    if (this.closed) return Promise.reject(new Error("storage is closed"));
    if (ops.length === 0) return Promise.resolve(); // nothing to write, nothing to wait for
    for (const op of ops) this.add(op);
    const b = this.open;
    if (!b.promise) {
      b.promise = new Promise<void>((resolve, reject) => this.afterCommit((err) => (err ? reject(err) : resolve())));
    }
    return b.promise;
  }

  /**
   * Deletes every key of `space`, `page` keys a batch (a migration rebuilding an index
   * from scratch): read through its range, never loaded whole.
   */
  async emptySpace(space: Space, page = 1000): Promise<void> {
    for (;;) {
      const keys = await readKeys(space, { limit: page });
      if (keys.length === 0) return;
      await this.commit(keys.map((key) => del(space, key)));
    }
  }

  /** Writes nobody waits on; they ride with the next batch (see the top of the file). */
  commitLazy(ops: readonly BatchOp[]): void {
    if (this.closed || ops.length === 0) return;
    for (const op of ops) this.add(op);
    this.schedule();
  }

  /** Makes sure a batch is written soon, if anything is pending or contributed. */
  schedule(): void {
    if (this.writing || this.scheduled) return;
    this.scheduled = true;
    // setImmediate: gather everything this turn of the event loop produces (requests
    // from every socket that had data in this poll phase).
    setImmediate(() => {
      this.scheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    if (this.writing) return;
    if (this.closed) return this.refuseOpen();
    for (const fn of this.contributors) fn(this);
    const b = this.open;
    // Waited for with nothing in it, behind an unsynced batch: it syncs the log. While
    // writes fail it is also the probe: a write that tells whether they still do.
    if (b.ops === 0 && b.durable && (this.unsyncedTail || this.failingSince !== undefined)) this.add(del(this.spaces.meta, SYNC_MARK_KEY));
    if (b.ops > 0) {
      // A counter's latest value rides with any batch (never alone: nothing used it yet).
      for (const c of this.counters) {
        const v = c.takeDirty();
        if (v !== undefined) {
          this.add(put(this.spaces.meta, c.name, v));
          (b.counted ??= []).push(c);
        }
      }
    } else {
      // Taken off first: a waiter that writes again (a derived generation's next chunk,
      // messages.ts drain) adds its writes and its wait to this same open batch, for
      // the next flush to write. Answered in this loop, they were told "on disk" before
      // anything was written, chunk after chunk, and then written without a sync.
      const waiters = b.waiters;
      b.waiters = [];
      b.durable = false; // answered: lazy writes added next need no sync
      for (const w of waiters) {
        try {
          call(w, undefined);
        } catch (err) {
          this.log.error({ err }, "commit callback failed");
        }
      }
      this.settleIdle();
      return;
    }
    this.open = new Batch();
    this.writing = true;
    const native = b.native as NativeBatch;
    const started = performance.now();
    this.binding.batch_write(native, b.durable ? SYNC : NO_SYNC).then(
      () => {
        this.onBatch?.(b.ops, (performance.now() - started) / 1000);
        this.written(b, undefined);
      },
      (err: Error) => {
        this.log.error({ err, ops: b.ops }, "batch write failed");
        this.written(b, err);
      },
    );
  }

  private written(b: Batch, err: Error | undefined): void {
    this.writing = false;
    if (err) {
      for (const c of b.counted ?? []) c.retry();
      this.failed(err);
    } else {
      this.unsyncedTail = !b.durable;
      if (this.failingSince !== undefined) this.recovered();
    }
    // Emptied (written or failed, its operations are done with) and free for the next.
    const native = b.native as NativeBatch;
    b.native = undefined;
    this.binding.batch_clear(native);
    this.spare.push(native);
    if (b.watched !== undefined) {
      for (const op of b.watched) {
        try {
          op.watch?.written(op.spaceKey as string);
        } catch (e) {
          this.log.error({ err: e }, "write watcher failed");
        }
      }
    }
    // What arrived during the write goes out now (it has waited one write already),
    // before this batch's waiters run: its write and fsync then overlap their work
    // (delivering and acknowledging a batch of messages took the event loop as long as
    // the disk took to sync the next one, and the disk sat idle meanwhile).
    const next = this.open.ops > 0;
    if (next) this.flush();
    for (const w of b.waiters) {
      try {
        call(w, err);
      } catch (e) {
        this.log.error({ err: e }, "commit callback failed");
      }
    }
    // Waiters on an empty batch are called after this batch's, in the order they came.
    if (next) return;
    if (this.open.ops > 0 || this.open.waiters.length > 0) this.flush();
    else this.settleIdle();
  }

  /** A batch write failed: the storage is failing, and refusing once it has been for refusingMs. */
  private failed(err: Error): void {
    this.failedBatches++;
    const now = Date.now();
    if (this.failingSince === undefined) {
      this.failingSince = now;
      this.firstFailure = err;
      // The probe: without traffic no batch would tell whether writes still fail.
      this.probeTimer = setTimeout(() => {
        this.probeTimer = undefined;
        this.probed = true;
        if (this.failingSince !== undefined && !this.closed) this.afterCommit(() => {});
      }, this.refusingMs);
      this.probeTimer.unref();
    } else if ((this.probed || now - this.failingSince >= this.refusingMs) && !this.refused) {
      this.refused = true;
      this.onRefusing?.(err);
    }
  }

  /** A batch got through after failures: writes work again. */
  private recovered(): void {
    this.failingSince = this.firstFailure = undefined;
    this.probed = false;
    if (this.probeTimer !== undefined) clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
  }

  /** Writes are failing: since when (unix ms) and the first failure's message; undefined while they are not. */
  get failing(): { since: number; message: string } | undefined {
    if (this.failingSince === undefined) return undefined;
    return { since: this.failingSince, message: (this.firstFailure as Error).message };
  }

  private settleIdle(): void {
    if (this.writing || this.open.ops > 0) return;
    for (const fn of this.idle.splice(0)) fn();
  }

  /** Waits until everything committed so far is on disk (or has failed). */
  settle(): Promise<void> {
    return new Promise((resolve) => {
      this.idle.push(resolve);
      if (!this.writing) this.schedule();
    });
  }

  async close(): Promise<void> {
    await this.settle();
    if (this.probeTimer !== undefined) clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
    if (this.unsyncedTail) await new Promise<void>((resolve) => this.afterCommit(() => resolve()));
    this.closed = true;
    // What a waiter's continuation added between the settle and this turn is never
    // written: it is told so (a write on the closed database would reach LevelDB's
    // native handle after its close).
    this.refuseOpen();
    await this.db.close();
  }

  /** Closed: the batch being gathered is not written; its waiters are told so. */
  private refuseOpen(): void {
    const b = this.open;
    if (b.ops === 0 && b.waiters.length === 0) return;
    this.open = new Batch();
    if (b.native !== undefined) {
      this.binding.batch_clear(b.native);
      this.spare.push(b.native);
      b.native = undefined;
    }
    for (const op of b.watched ?? []) op.watch?.written(op.spaceKey as string);
    const err = new Error("storage is closed");
    for (const w of b.waiters) {
      try {
        call(w, err);
      } catch (e) {
        this.log.error({ err: e }, "commit callback failed");
      }
    }
  }
}

function call(w: Done | CommitWaiter, err: Error | undefined): void {
  if (typeof w === "function") w(err);
  else w.committed(err);
}

const SYNC = { sync: true } as const;
const NO_SYNC = { sync: false } as const;
