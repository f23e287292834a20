// The database handle and its group commit.
//
// Every write in wirechat goes through `commit()`: operations from all connections
// that arrive while a batch is being written are gathered into the next batch, and
// each batch is written atomically with `sync: true`. A caller's promise resolves only
// when its operations are on disk, so a reply sent after it is durable, and a burst of
// N messages costs one fsync, not N.

import { mkdirSync } from "node:fs";
import path from "node:path";
import { Level } from "level";
import type { Logger } from "pino";
import { openSpaces, type Space, type Spaces } from "./layout.js";

/**
 * A write, already encoded for the root database: the key carries its sublevel's
 * prefix and the value is its JSON text. Sublevels read these back unchanged; building
 * them here keeps abstract-level's per-operation sublevel handling off the hot path.
 */
export interface BatchOp {
  type: "put" | "del";
  key: string;
  value?: string;
}

export function put(sublevel: Space, key: string, value: unknown): BatchOp {
  return { type: "put", key: sublevel.prefix + key, value: JSON.stringify(value), keyEncoding: "utf8", valueEncoding: "utf8" } as RawOp;
}

export function del(sublevel: Space, key: string): BatchOp {
  return { type: "del", key: sublevel.prefix + key, keyEncoding: "utf8" } as RawOp;
}

const BATCH_OPTIONS = { sync: true } as const;

/** classic-level's implementation of batch(), below abstract-level's per-op handling. */
interface RawBatch {
  _batch(ops: readonly RawOp[], options: typeof BATCH_OPTIONS): Promise<void>;
}
type RawOp = BatchOp & { keyEncoding: "utf8"; valueEncoding: "utf8" };

interface Batch {
  ops: BatchOp[];
  done: Promise<void>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

function newBatch(): Batch {
  let resolve!: () => void;
  let reject!: (err: unknown) => void;
  const done = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // A batch nobody awaits (lazy writes only) must not raise an unhandled rejection.
  done.catch(() => {});
  return { ops: [], done, resolve, reject };
}

/** A monotonic number kept in `meta`; the latest value rides along in each batch. */
export class Counter {
  private dirty = false;
  constructor(
    readonly name: string,
    private value: number,
  ) {}
  next(): number {
    this.dirty = true;
    return ++this.value;
  }
  takeDirty(): number | undefined {
    if (!this.dirty) return undefined;
    this.dirty = false;
    return this.value;
  }
}

export class Storage {
  private next: Batch = newBatch();
  private writing: Promise<void> | null = null;
  private scheduled = false;
  private closed = false;
  private readonly counters: Counter[] = [];

  private constructor(
    private readonly db: Level<string, unknown>,
    readonly spaces: Spaces,
    private readonly log: Logger,
  ) {}

  static async open(dataDir: string, log: Logger): Promise<Storage> {
    const dir = path.join(dataDir, "db");
    mkdirSync(dir, { recursive: true });
    const db = new Level<string, unknown>(dir, { keyEncoding: "utf8", valueEncoding: "json" });
    await db.open();
    return new Storage(db, openSpaces(db), log);
  }

  async counter(name: string): Promise<Counter> {
    const last = (await this.spaces.meta.get(name)) as number | undefined;
    const c = new Counter(name, last ?? 0);
    this.counters.push(c);
    return c;
  }

  /** Queues `ops` for the next batch; resolves once that batch is synced to disk. */
  commit(ops: readonly BatchOp[]): Promise<void> {
    if (this.closed) return Promise.reject(new Error("storage is closed"));
    if (ops.length === 0) return Promise.resolve(); // nothing to write, nothing to wait for
    const batch = this.next;
    for (const op of ops) batch.ops.push(op);
    this.schedule();
    return batch.done;
  }

  /** Like commit, for writes nobody waits on (clean-up); failures are logged. */
  commitLazy(ops: readonly BatchOp[]): void {
    if (this.closed) return;
    this.commit(ops).catch((err) => this.log.error({ err }, "lazy write failed"));
  }

  private schedule(): void {
    if (this.writing || this.scheduled) return;
    this.scheduled = true;
    // setImmediate: gather everything the current turn of the event loop produces.
    setImmediate(() => {
      this.scheduled = false;
      void this.flush();
    });
  }

  private async flush(): Promise<void> {
    const batch = this.next;
    if (batch.ops.length === 0) return;
    this.next = newBatch();
    for (const c of this.counters) {
      const v = c.takeDirty();
      if (v !== undefined) batch.ops.push(put(this.spaces.meta, c.name, v));
    }
    this.writing = batch.done;
    try {
      // Straight to classic-level's _batch (abstract-level's documented implementer
      // method): every op is already prefixed and encoded, and the database was opened
      // explicitly and has no hooks, so the public batch()'s per-op cloning, encoding
      // and sublevel resolution would only repeat work (2.5x the cost of the write).
      await (this.db as unknown as RawBatch)._batch(batch.ops as RawOp[], BATCH_OPTIONS);
      batch.resolve();
    } catch (err) {
      this.log.error({ err, ops: batch.ops.length }, "batch write failed");
      batch.reject(err);
    } finally {
      this.writing = null;
      if (this.next.ops.length > 0) this.schedule();
    }
  }

  /** Waits until everything committed so far is on disk (or has failed). */
  async settle(): Promise<void> {
    for (;;) {
      if (this.writing) await this.writing.catch(() => {});
      else if (this.next.ops.length > 0) {
        this.schedule();
        await this.next.done.catch(() => {});
      } else return;
    }
  }

  async close(): Promise<void> {
    await this.settle();
    this.closed = true;
    await this.db.close();
  }
}
