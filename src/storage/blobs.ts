// Content-addressed blob store for attachments, on disk beside the database:
//
//   <dataDir>/blobs/<sha256[0:2]>/<sha256>   decoded bytes of one attachment
//   <dataDir>/blobs/tmp/<random>             an upload in progress (emptied at start-up)
//
// An upload arrives as base64 text in pieces. BlobWriter validates and decodes it
// incrementally (carrying at most 3 characters between pieces), hashes the decoded
// bytes, and writes them to a temp file, telling its caller when to pause the socket.
// finish() syncs the file and renames it to its hash; a blob already stored is not
// stored again. References live in LevelDB (`blobrefs <sha>!<mid>`, written in the
// message's own batch); a blob with no reference left is deleted, and at start-up a
// sweep deletes those a crash left unreferenced (sweep). While an upload or
// a message that uses a blob is in flight, the blob is pinned so that a concurrent
// delete cannot remove it. Deleting (check pins and references, unlink) and storing
// (pin, then keep the stored file or move the upload into place) hold the sha's lock,
// so an upload never keeps a file that a delete has already decided to unlink.

import { createHash, randomBytes, type Hash } from "node:crypto";
import { createWriteStream, rmSync, type WriteStream } from "node:fs";
import { access, open, opendir, rename, stat, unlink, type FileHandle } from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import type { Logger } from "pino";
import type { Background } from "../background.js";
import { within } from "../clock.js";
import { LocalLock, type KeyedLock } from "../seams.js";
import { del, put, type BatchOp, type Storage } from "./db.js";
import { makeDir, makeDirSync } from "./dirs.js";
import { pair, prefixRange, type Spaces } from "./layout.js";
import { readKeys } from "./range.js";

export interface BlobRef {
  /** sha256 of the decoded bytes, hex. */
  sha: string;
  /** Decoded size in bytes. */
  size: number;
}

export type BlobFault = "invalid" | "too-large" | "busy" | "aborted";

/**
 * A failed upload. Its message is for the client: it never holds a path or an OS error
 * text (those are in `cause`, for the log).
 */
export class BlobError extends Error {
  constructor(readonly fault: BlobFault, message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

function notStored(cause: unknown): BlobError {
  return new BlobError("aborted", "the attachment could not be stored", { cause });
}

// Base64 alphabet → 6-bit value; 64 marks '=', 255 anything else.
const DECODE = new Uint8Array(256).fill(255);
"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".split("").forEach((ch, i) => {
  DECODE[ch.charCodeAt(0)] = i;
});
DECODE["=".charCodeAt(0)] = 64;

/**
 * Incremental, validating base64 decoder: feed text pieces, get decoded bytes. Each
 * piece is checked byte by byte against the alphabet (padding only at the very end,
 * canonical: no bits set in what the padding leaves over),
 * then its quad-aligned part is decoded natively; up to 3 characters carry over.
 */
export class Base64Decoder {
  private carry: Buffer = Buffer.alloc(0);
  private ended = false;

  push(text: Buffer): Buffer {
    if (text.length === 0) return text;
    if (this.ended) throw invalid("base64 continues after its padding");
    const buf = this.carry.length ? Buffer.concat([this.carry, text]) : text;
    const whole = buf.length - (buf.length % 4);
    for (let i = 0; i < buf.length; i++) {
      const v = DECODE[buf[i]];
      if (v === 255) throw invalid("attachment data is not valid base64");
      if (v === 64 && i < whole) {
        // '=' may only end the last quad: "xx==" or "xxx=", and nothing may follow.
        const pos = i % 4;
        const ok = pos >= 2 && (pos === 3 || DECODE[buf[i + 1]] === 64) && i + (4 - pos) === buf.length;
        if (!ok) throw invalid("attachment data is not valid base64 (misplaced padding)");
        // The bits the padding leaves over must be zero ("QR==" is not canonical): other
        // text would decode to bytes that encode back to something else, and the
        // message's attachment would not be the text its sender sent.
        if ((DECODE[buf[i - 1]] & (pos === 2 ? 0x0f : 0x03)) !== 0) {
          throw invalid("attachment data is not canonical base64 (bits set before its padding)");
        }
        this.ended = true;
        break;
      }
    }
    this.carry = Buffer.from(buf.subarray(whole));
    return whole === 0 ? Buffer.alloc(0) : Buffer.from(buf.toString("latin1", 0, whole), "base64");
  }

  /** Throws unless the text so far was complete base64. */
  end(): void {
    if (this.carry.length !== 0) throw invalid("attachment data is not valid base64 (its length is not a multiple of 4)");
  }
}

function invalid(message: string): BlobError {
  return new BlobError("invalid", message);
}

/** Collects a hold defers, at most (the rest wait for the next start-up sweep). */
const HELD_BACK_MAX = 100_000;
/** Missing blobs fetched again at once, at most (BlobStore.refetch); past it a read goes out empty. */
const REFETCHING_MAX = 64;
/**
 * How long a read waits for a refetch (the fetch goes on after it, for the next read):
 * the frame being written holds the connection's other frames meanwhile.
 */
const REFETCH_WAIT_MS = 5_000;
/** A blob whose refetch failed is not asked for again for this long (every read of it asked, and logged). */
const REFETCH_RETRY_MS = 60_000;
/** Failed refetches remembered (the oldest forgotten first). */
const REFETCH_FAILED_MAX = 1024;

export class BlobStore {
  readonly dir: string;
  private readonly tmp: string;
  private readonly s: Spaces;
  /** sha → number of uploads/messages in flight that use it. */
  private readonly pins = new Map<string, number>();
  /** Backups running: while any is, no blob is deleted (see hold). */
  private holds = 0;
  /** Blobs whose collect came during a hold: collected when the last hold ends. */
  private readonly heldBack = new Set<string>();
  /**
   * Cluster mode: fetches a blob whose file is not here again from the cluster's
   * store (ClusterBlobs.refetch), true once it is a file again. A node whose fetch was
   * given up as it applied the message (the store unreachable for a while), or which
   * lost the file, sent that attachment empty for good; a read now brings it back.
   */
  refetch: ((sha: string) => Promise<boolean>) | undefined;
  /** Refetches under way, by sha (REFETCHING_MAX): readers of one blob wait for one fetch. */
  private readonly refetching = new Map<string, Promise<boolean>>();
  /** sha → when its refetch last failed (REFETCH_RETRY_MS, REFETCH_FAILED_MAX). */
  private readonly refetchFailed = new Map<string, number>();
  /**
   * Bytes of the stored blob files: each file stored or collected since start, plus
   * those the start-up sweep found (complete once it has finished).
   */
  storedBytes = 0;
  /**
   * The start-up sweep while it runs: what it has counted into storedBytes (files older
   * than its start it has reached: whole shards done, and the one it is in), so that a
   * collect meanwhile subtracts only a file that was counted.
   */
  private sweeping: { began: number; done: Set<string>; shard: string; seen: Set<string> } | undefined;
  /** When this store was opened: files written since are counted as they are stored. */
  private readonly openedAt = Date.now();
  /**
   * Decoded bytes of the uploads in progress (their temp files), every connection's:
   * at most `maxUploading` (--max-uploading). Each upload is bounded by --max-attach,
   * but a client trickling many (a connection each, any number of accounts) held that
   * much disk each for as long as it liked.
   */
  private uploading = 0;
  maxUploading = Number.POSITIVE_INFINITY;
  /**
   * Bytes a second as sent: an upload averaging less since it began (the server's own
   * pauses not counted), still arriving, may be given up to make room when the budget
   * is spent (reserve). A client trickling attachments just above
   * --upload-min-rate held its share of the budget for hours (64 MiB at 1 KiB/s: 18 h),
   * and enough of them refused every attachment of everyone else meanwhile. 0: none is.
   */
  shedBelow: () => number = () => 0;
  /** The uploads still receiving (not finished, failed or aborted). */
  private readonly receiving = new Set<BlobWriter>();
  /** Uploads given up for others so far (shed; /metrics). */
  shedUploads = 0;

  constructor(
    dataDir: string,
    storage: Storage,
    /** Per-sha: collect and the store step of an upload never interleave. */
    private readonly locks: KeyedLock = new LocalLock(),
    /** Where collects that nobody waits for run (shutdown waits for them). */
    private readonly background?: Background,
    /** Where a file that is there but cannot be read is reported (readBase64). */
    private readonly log?: Logger,
  ) {
    this.dir = path.join(dataDir, "blobs");
    this.tmp = path.join(this.dir, "tmp");
    this.s = storage.spaces;
    // Uploads interrupted by a crash are never resumed.
    rmSync(this.tmp, { recursive: true, force: true });
    makeDirSync(this.tmp);
  }

  pathOf(sha: string): string {
    return path.join(this.dir, sha.slice(0, 2), sha);
  }

  /** Starts an upload; the caller feeds it base64 text and then finishes or aborts it. */
  /**
   * Takes `n` bytes of the uploads' budget for `by`. When it is spent, the uploads
   * averaging less than shedBelow() since they began give up their room, slowest first
   * (each fails with "busy": 13 once its frame ends), if that makes enough; else false.
   */
  reserve(n: number, by?: BlobWriter): boolean {
    if (this.uploading + n > this.maxUploading && !this.shed(n, by)) return false;
    this.uploading += n;
    return true;
  }

  private shed(n: number, by: BlobWriter | undefined): boolean {
    const below = this.shedBelow();
    if (below <= 0) return false;
    const now = performance.now();
    const slow: [BlobWriter, number][] = [];
    for (const w of this.receiving) {
      if (w === by || w.sheddable === 0) continue;
      const rate = w.rate(now);
      if (rate < below) slow.push([w, rate]);
    }
    slow.sort((a, b) => a[1] - b[1]);
    let room = this.maxUploading - this.uploading;
    let take = 0;
    while (room < n && take < slow.length) room += slow[take++][0].sheddable;
    if (room < n) return false;
    for (let i = 0; i < take; i++) slow[i][0].shed(below);
    this.shedUploads += take;
    return true;
  }

  /** An upload stopped receiving (finished, failed or aborted). */
  receivingEnded(w: BlobWriter): void {
    this.receiving.delete(w);
  }

  unreserve(n: number): void {
    this.uploading -= n;
  }

  writer(maxBytes: number): BlobWriter {
    const w = new BlobWriter(this, path.join(this.tmp, randomBytes(12).toString("hex")), maxBytes);
    this.receiving.add(w);
    return w;
  }

  pin(sha: string): void {
    this.pins.set(sha, (this.pins.get(sha) ?? 0) + 1);
  }

  /** Drops a pin; deletes the blob if nothing pins or references it any more. */
  unpin(sha: string): void {
    const n = (this.pins.get(sha) ?? 1) - 1;
    if (n > 0) this.pins.set(sha, n);
    else {
      this.pins.delete(sha);
      this.collectLater(sha);
    }
  }

  /** collect() in the background: skipped once shutdown has begun (start-up sweeps it). */
  collectLater(sha: string): void {
    if (this.background) this.background.run("blob collect", () => this.collect(sha), { sha });
    else void this.collect(sha);
  }

  refOps(sha: string, mid: string): BatchOp[] {
    return [put(this.s.blobrefs, pair(sha, mid), 1)];
  }

  unrefOps(sha: string, mid: string): BatchOp[] {
    return [del(this.s.blobrefs, pair(sha, mid))];
  }

  /**
   * Deletes the blob when no message references it and nothing in flight pins it.
   * Never rejects (callers fire and forget it): when the references cannot be read,
   * the blob stays.
   */
  collect(sha: string): Promise<void> {
    return this.collected(sha).then(() => {});
  }

  /**
   * Keeps every blob file while a backup copies them: a message deleted after the
   * backup's snapshot must not take a file the snapshot refers to. Collects that come
   * meanwhile run when the last hold ends (past HELD_BACK_MAX they are left for the
   * start-up sweep).
   */
  hold(): () => void {
    this.holds++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (--this.holds > 0) return;
      const due = [...this.heldBack];
      this.heldBack.clear();
      for (const sha of due) this.collectLater(sha);
    };
  }

  /** collect(), resolving whether a file was deleted. */
  private collected(sha: string): Promise<boolean> {
    return this.locks
      .run(sha, async () => {
        if (this.holds > 0) {
          if (this.heldBack.size < HELD_BACK_MAX) this.heldBack.add(sha);
          return false;
        }
        if (this.pins.has(sha)) return false;
        const refs = await readKeys(this.s.blobrefs, { ...prefixRange(sha), limit: 1 });
        if (refs.length > 0 || this.pins.has(sha)) return false;
        const st = await stat(this.pathOf(sha)).catch(() => undefined);
        const size = st?.size ?? 0;
        const sw = this.sweeping;
        const counted = sw === undefined || st === undefined || st.mtimeMs >= sw.began || sw.done.has(sha.slice(0, 2)) || (sw.shard === sha.slice(0, 2) && sw.seen.has(sha));
        return unlink(this.pathOf(sha)).then(
          () => {
            if (counted) this.storedBytes = Math.max(0, this.storedBytes - size);
            return true;
          },
          () => false,
        );
      })
      .catch(() => false);
  }

  /**
   * Deletes every stored blob that no message references: files left by a crash
   * between an upload's rename and its message's batch, or between a message's
   * deletion and its collect. One file at a time, the directories read as a stream
   * (memory stays flat whatever their size), until done or `signal` (shutdown).
   */
  async sweep(signal: AbortSignal): Promise<{ checked: number; removed: number }> {
    let checked = 0;
    let removed = 0;
    // Files stored since this store was opened were counted when they were stored (a
    // cluster node's sweep starts only after its catch-up stored many).
    const began = this.openedAt;
    const sw = (this.sweeping = { began, done: new Set<string>(), shard: "", seen: new Set<string>() });
    const top = await opendir(this.dir);
    try {
      for await (const shard of top) {
        if (signal.aborted) break;
        if (!shard.isDirectory() || !/^[0-9a-f]{2}$/.test(shard.name)) continue;
        const dir = await opendir(path.join(this.dir, shard.name)).catch(() => undefined);
        if (!dir) continue;
        sw.shard = shard.name;
        for await (const file of dir) {
          if (signal.aborted) break;
          if (!file.isFile() || !/^[0-9a-f]{64}$/.test(file.name) || !file.name.startsWith(shard.name)) continue;
          checked++;
          // Counted first: a collect subtracts what it removes.
          const st = await stat(path.join(this.dir, shard.name, file.name)).catch(() => undefined);
          if (st && st.mtimeMs < began) this.storedBytes += st.size;
          sw.seen.add(file.name);
          if (await this.collected(file.name)) removed++;
        }
        sw.done.add(shard.name);
        sw.seen.clear();
      }
    } catch (err) {
      if (!signal.aborted) throw err;
    } finally {
      this.sweeping = undefined;
    }
    return { checked, removed };
  }

  /**
   * Pins `sha` and moves a finished upload into place, under the sha's lock: a
   * collect either ran before (the upload's own file is kept) or sees the pin.
   */
  async storeUpload(tmpPath: string, sha: string): Promise<void> {
    await this.locks.run(sha, async () => {
      this.pin(sha);
      try {
        await this.adopt(tmpPath, sha);
      } catch (err) {
        this.unpin(sha);
        throw err;
      }
    });
  }

  /** Pins `sha` if it is stored here (under its lock: no collect in between); whether it was. */
  async pinIfStored(sha: string): Promise<boolean> {
    return this.locks.run(sha, async () => {
      if (!(await this.exists(sha))) return false;
      this.pin(sha);
      return true;
    });
  }

  /**
   * Stores a blob's bytes read from elsewhere (cluster mode's object store), synced,
   * and pins it like a finished upload (the caller unpins it once the message that
   * references it is written). False, and nothing stored, when the bytes do not hash
   * to `sha`.
   */
  async storeFetched(sha: string, source: AsyncIterable<Uint8Array>): Promise<boolean> {
    const tmpPath = path.join(this.tmp, randomBytes(12).toString("hex"));
    const hash = createHash("sha256");
    try {
      const fh = await open(tmpPath, "w");
      try {
        for await (const chunk of source) {
          hash.update(chunk);
          await fh.write(chunk);
        }
        await fh.sync();
      } finally {
        await fh.close();
      }
      if (hash.digest("hex") !== sha) {
        await unlink(tmpPath).catch(() => {});
        return false;
      }
      await this.storeUpload(tmpPath, sha);
      return true;
    } catch (err) {
      await unlink(tmpPath).catch(() => {});
      throw err;
    }
  }

  async exists(sha: string): Promise<boolean> {
    return access(this.pathOf(sha)).then(
      () => true,
      () => false,
    );
  }

  /**
   * Moves a finished upload into place (or drops it when the same blob is stored).
   * Unlocked: only for storeUpload().
   */
  async adopt(tmpPath: string, sha: string): Promise<void> {
    const final = this.pathOf(sha);
    if (await this.exists(sha)) {
      await unlink(tmpPath).catch(() => {});
      return;
    }
    // mkdir returns the first directory it made: a new shard is made durable in its
    // parent too, or a power loss could lose the file the committed message names.
    const made = await makeDir(path.dirname(final));
    await rename(tmpPath, final);
    await syncPath(path.dirname(final));
    if (made !== undefined) await syncPath(path.dirname(made));
    this.storedBytes += (await stat(final).catch(() => undefined))?.size ?? 0;
  }

  /**
   * The blob's bytes as base64 text, read in pieces (for streaming out), or nothing when
   * the file is gone. A frame is read when its connection gets to it, which can be long
   * after it was made (a history reply, an event queued behind a large one): the message
   * may have been deleted meanwhile, and its file with it. Its attachment then goes out
   * empty, and the deletion's ev_delmessage follows; the reader keeps its connection
   * (before, the failed read closed it halfway through a frame, so any sender could cut a
   * recipient off by deleting a message the recipient had not yet read). Once opened, the
   * file reads whole even if it is deleted meanwhile. One that is there but cannot be
   * opened for good (its permissions, a loop of links) goes out empty too, logged:
   * thrown, it closed the reader's connection before any of the frame went out, at every
   * delivery of that message, so the recipient's inbox never got past it.
   */
  async *readBase64(sha: string): AsyncIterable<string> {
    let file = await this.openBlob(sha);
    // Not here, still referenced: in cluster mode it is fetched again first.
    if (file === null && (await this.restored(sha))) file = await this.openBlob(sha);
    if (file === null || file === undefined) return;
    yield* base64Stream(file.createReadStream({ highWaterMark: 3 * 16 * 1024 }));
  }

  /** The blob's file opened; null when there is none, undefined when it cannot be opened (logged). */
  private async openBlob(sha: string): Promise<FileHandle | null | undefined> {
    try {
      return await open(this.pathOf(sha), "r");
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // Out of file descriptors passes: thrown (nothing of the frame is out yet), the
      // connection closes and the message comes again later, whole.
      if (code === "EMFILE" || code === "ENFILE") throw err;
      if (code === "ENOENT") return null;
      this.log?.error({ err, sha }, "an attachment file could not be opened; sent empty");
      return undefined;
    }
  }

  /**
   * Cluster mode: the blobs among `shas` (a page of messages about to be written) that
   * are not files here start being fetched again now, all together: read one after
   * another as the page reached each, a page with several missing waited up to
   * REFETCH_WAIT_MS for each in turn. Nothing on a single node.
   */
  prefetch(shas: Iterable<string>): void {
    if (this.refetch === undefined) return;
    for (const sha of shas) {
      void access(this.pathOf(sha)).then(
        () => undefined,
        () => this.restored(sha),
      );
    }
  }

  /**
   * A missing blob a message here still references, fetched again (refetch); whether it
   * is a file now. A read waits REFETCH_WAIT_MS at most; one that failed lately is not
   * asked for again.
   */
  private restored(sha: string): Promise<boolean> {
    const refetch = this.refetch;
    if (refetch === undefined) return Promise.resolve(false);
    let p = this.refetching.get(sha);
    if (p === undefined) {
      const failed = this.refetchFailed.get(sha);
      if (failed !== undefined && Date.now() - failed < REFETCH_RETRY_MS) return Promise.resolve(false);
      if (this.refetching.size >= REFETCHING_MAX) return Promise.resolve(false);
      p = (async () => {
        // A deleted message's file is gone on purpose: not fetched back.
        const refs = await readKeys(this.s.blobrefs, { ...prefixRange(sha), limit: 1 });
        return refs.length > 0 && (await refetch(sha));
      })()
        .catch((err: unknown) => {
          this.log?.warn({ err, sha }, "fetching a missing attachment again failed; sent empty");
          return false;
        })
        .then((ok) => {
          this.refetching.delete(sha);
          this.refetchFailed.delete(sha);
          if (!ok) {
            if (this.refetchFailed.size >= REFETCH_FAILED_MAX) this.refetchFailed.delete(this.refetchFailed.keys().next().value as string);
            this.refetchFailed.set(sha, Date.now());
          }
          return ok;
        });
      this.refetching.set(sha, p);
    }
    return within(p, REFETCH_WAIT_MS).then((done) => done && p);
  }
}

/** Flushes a file, or a directory's entries, to disk. */
export async function syncPath(where: string): Promise<void> {
  const fh = await open(where, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function* base64Stream(input: Readable): AsyncIterable<string> {
  let carry = Buffer.alloc(0);
  for await (const chunk of input as AsyncIterable<Buffer>) {
    const buf = carry.length ? Buffer.concat([carry, chunk]) : chunk;
    const whole = buf.length - (buf.length % 3);
    if (whole > 0) yield buf.toString("base64", 0, whole);
    carry = Buffer.from(buf.subarray(whole));
  }
  if (carry.length) yield carry.toString("base64");
}

/**
 * One upload in progress. write() returns false when the caller should stop feeding
 * (pause its socket) until `drained` is called back.
 */
export class BlobWriter {
  private readonly decoder = new Base64Decoder();
  private readonly hash: Hash = createHash("sha256");
  private readonly file: WriteStream;
  private size = 0;
  private fault: BlobError | undefined;
  private done = false;
  /** Of the uploads' budget (BlobStore.reserve): the bytes this one's file holds. */
  private reserved = 0;
  /** Set by finish(): the blob this upload stored and pinned. */
  private stored: BlobRef | undefined;
  /** When it began (performance.now()), its base64 bytes so far, and the time the
   * server paused reading it for the file's buffer (done, and since when now): its
   * rate for BlobStore.shed counts the client's time only. */
  private readonly began = performance.now();
  private received = 0;
  private pausedMs = 0;
  private pausedAt: number | undefined;
  /** Its frame is complete (arrived): it is no longer receiving, only waiting to be stored. */
  private complete = false;
  /** The file's buffer is full: stop feeding until onDrain. */
  onFull: (() => void) | undefined;
  onDrain: (() => void) | undefined;

  constructor(
    private readonly store: BlobStore,
    private readonly tmpPath: string,
    private readonly maxBytes: number,
  ) {
    this.file = createWriteStream(tmpPath, { flags: "wx" });
    this.file.on("error", (err) => {
      this.fault ??= notStored(err);
      // A connection paused for this file's buffer would wait for a drain that never
      // comes: wake it, so the frame ends and finish() reports the fault.
      this.onDrain?.();
    });
    this.file.on("drain", () => {
      if (this.pausedAt !== undefined) {
        this.pausedMs += performance.now() - this.pausedAt;
        this.pausedAt = undefined;
      }
      this.onDrain?.();
    });
  }

  /** Feeds base64 text. Faults are remembered (and reported by finish), not thrown. */
  write(text: Buffer): void {
    if (this.fault || this.done) return;
    this.received += text.length;
    let bytes: Buffer;
    try {
      bytes = this.decoder.push(text);
    } catch (err) {
      this.fail(err as BlobError);
      return;
    }
    this.size += bytes.length;
    if (this.size > this.maxBytes) {
      this.fail(new BlobError("too-large", `attachment is over the limit of ${this.maxBytes} bytes`));
      return;
    }
    if (bytes.length === 0) return;
    if (!this.store.reserve(bytes.length, this)) {
      this.fail(new BlobError("busy", "the server is receiving too many attachments at once; send it again later"));
      return;
    }
    this.reserved += bytes.length;
    this.hash.update(bytes);
    if (!this.file.write(bytes)) {
      this.pausedAt ??= performance.now();
      this.onFull?.();
    }
  }

  /** Bytes of the uploads' budget this one holds, while it is still receiving and has not failed. */
  get sheddable(): number {
    return this.fault || this.done || this.complete ? 0 : this.reserved;
  }

  /**
   * Bytes a second as sent (base64, as --upload-min-rate counts them) since it began,
   * not counting the time the server paused reading it.
   */
  rate(now: number): number {
    const paused = this.pausedMs + (this.pausedAt === undefined ? 0 : now - this.pausedAt);
    return (this.received * 1000) / Math.max(1, now - this.began - paused);
  }

  /** Its frame is complete: all of it has arrived (the transport's call). */
  arrived(): void {
    this.complete = true;
  }

  /** Gives its room up for another upload (BlobStore.shed): it fails with "busy". */
  shed(below: number): void {
    if (!this.fault && !this.done) {
      this.fail(new BlobError("busy", `the server is receiving too many attachments at once, and this one came at less than ${below} bytes a second: it was given up for others; send it again later`));
    }
  }

  /** The frame put something in the string that base64 cannot hold. */
  invalid(): void {
    if (!this.fault && !this.done) this.fail(invalid("attachment data is not valid base64 (escape sequence)"));
  }

  private fail(err: BlobError): void {
    this.fault = err;
    this.discard();
    this.onDrain?.(); // whoever paused for this upload may go on
  }

  /** The upload's bytes leave the budget (its file is gone, or is a stored blob now). */
  private unreserve(): void {
    this.store.unreserve(this.reserved);
    this.reserved = 0;
  }

  private discard(): void {
    this.unreserve();
    this.done = true;
    this.store.receivingEnded(this);
    const remove = () => void unlink(this.tmpPath).catch(() => {});
    // A file that failed to write has closed already, and 'close' does not come twice.
    if (this.file.closed) return remove();
    this.file.destroy();
    this.file.once("close", remove);
  }

  /** The frame was broken or the connection went away mid-upload: nothing of it stays. */
  abort(): void {
    if (this.done) return;
    this.fault ??= new BlobError("aborted", "upload aborted");
    this.discard();
    this.onDrain?.(); // a connection paused for this upload must not stay paused
  }

  /**
   * The request is done with this upload: an unfinished one is discarded, a stored
   * blob is unpinned (and deleted unless a committed message references it).
   */
  release(): void {
    if (this.stored) {
      const { sha } = this.stored;
      this.stored = undefined;
      this.store.unpin(sha);
    } else {
      this.abort();
    }
  }

  /** See Upload.keep: a stored blob stays pinned for this process's life. */
  keep(): void {
    if (this.stored) this.stored = undefined;
    else this.abort();
  }

  /**
   * Completes the upload: the blob is on disk (synced) under its hash and pinned for
   * the caller, who must unpin it once the message referencing it is committed (or
   * was refused). Rejects with BlobError for bad base64, over-limit size or I/O.
   */
  async finish(): Promise<BlobRef> {
    if (!this.fault) {
      try {
        this.decoder.end();
      } catch (err) {
        this.fail(err as BlobError);
      }
    }
    if (this.fault) throw this.fault;
    if (this.size === 0) {
      // No attachment (`"data":""`, as every ev_message without one says it, and clients
      // echo it): nothing is stored, pinned or synced; the file goes.
      this.discard();
      this.onDrain?.();
      return { sha: this.hash.digest("hex"), size: 0 };
    }
    this.done = true;
    this.store.receivingEnded(this);
    this.onDrain?.();
    const sha = this.hash.digest("hex");
    try {
      await new Promise<void>((resolve, reject) => {
        this.file.end((err?: Error | null) => (err ? reject(err) : resolve()));
      });
      const fh = await open(this.tmpPath, "r+");
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
      await this.store.storeUpload(this.tmpPath, sha);
    } catch (err) {
      await unlink(this.tmpPath).catch(() => {});
      throw notStored(err);
    } finally {
      this.unreserve();
    }
    this.stored = { sha, size: this.size };
    return this.stored;
  }
}
