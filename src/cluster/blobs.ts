// Attachments in cluster mode. The bytes live in a JetStream object store (one bucket
// per cluster log, object name = the blob's sha256, file storage, --replicas copies):
// the node that received an upload puts it there before the message is appended to
// the log, so an entry that names a blob is never in the log before the blob is in the
// store. Every node, as it applies that entry, fetches the blob into its own blob
// directory (checked against its sha256) unless it has it: deliveries, history and
// `enter` read local files, as on a single node, and the local references and sweep
// work unchanged. Objects are never deleted from the store yet: a delete racing
// another node's upload of the same bytes would lose them (see the README).

import { StorageType } from "@nats-io/jetstream";
import { Objm, type ObjectStore } from "@nats-io/obj";
import type { NatsConnection } from "@nats-io/transport-node";
import { createReadStream } from "node:fs";
import { Readable } from "node:stream";
import type { Logger } from "pino";
import type { BlobStore } from "../storage/blobs.js";
import { unavailable } from "./jetstream-log.js";

/** A fetch that fails (the engine unreachable) is tried this many times, backing off to 2 s. */
const FETCH_ATTEMPTS = 30;
/** A missing blob fetched again for a read (refetch) is tried this many times: the read waits. */
const REFETCH_ATTEMPTS = 3;
/**
 * One try of a fetch fails when the store does not answer for this long, or sends less
 * than FETCH_MIN_PROGRESS in it: the object store's get has no deadline of its own, and
 * a stalled one (or one trickling a chunk at a time) held the node's apply of the log,
 * every later entry, for good.
 */
const FETCH_STALL_MS = 30_000;
const FETCH_MIN_PROGRESS = 1024 * 1024;

export class ClusterBlobs {
  private constructor(
    private readonly os: ObjectStore,
    private readonly blobs: BlobStore,
    private readonly log: Logger,
  ) {}

  /** Set when the node stops: a fetch still retrying gives up (its apply is cut short). */
  closed = false;

  static async open(nc: NatsConnection, bucket: string, replicas: number, blobs: BlobStore, log: Logger): Promise<ClusterBlobs> {
    const os = await new Objm(nc).create(bucket, { storage: StorageType.File, replicas });
    // An existing bucket is taken as it is (made by hand, or before the log's stream was
    // given more replicas): attachments answered 0 must be kept as the log is, or a
    // node applying their messages after the one server holding them died could never
    // fetch them.
    const st = await os.status();
    if (st.storage !== StorageType.File || st.replicas !== replicas || st.ttl > 0) {
      throw new Error(
        `the attachment bucket ${bucket} keeps ${st.replicas} copies in ${st.storage} storage${st.ttl > 0 ? ` for ${st.ttl / 1e9} s` : ""}; ` +
          `it must keep --replicas ${replicas} copies on file, for good: change it (nats stream edit OBJ_${bucket}) or remove it while no node runs`,
      );
    }
    return new ClusterBlobs(os, blobs, log);
  }

  /**
   * Puts this node's blob `sha` (`size` bytes) into the object store, unless it is
   * there already. 16 when the store cannot be reached.
   */
  async put(sha: string, size: number): Promise<void> {
    let file: ReturnType<typeof createReadStream> | undefined;
    try {
      const info = await this.os.info(sha);
      if (info && !info.deleted && info.size === size) return;
      file = createReadStream(this.blobs.pathOf(sha), { highWaterMark: 128 * 1024 });
      await this.os.put({ name: sha }, Readable.toWeb(file) as ReadableStream<Uint8Array>);
    } catch (err) {
      throw unavailable("the attachment could not be stored in the cluster; send the message again", err);
    } finally {
      // A put that failed part way leaves the stream paused, its descriptor open (the
      // object store does not cancel its reader), one a try while the engine is away.
      file?.destroy();
    }
  }

  /**
   * Makes blob `sha` a local file, pinned (the caller unpins it once the entry that
   * references it is written): "pinned". "missing" when the store does not have it
   * (or gave bytes of another hash), or could not be reached after FETCH_ATTEMPTS:
   * the message is applied all the same, and this node cannot send that attachment.
   */
  async fetch(sha: string, attempts = FETCH_ATTEMPTS): Promise<"pinned" | "missing"> {
    if (await this.blobs.pinIfStored(sha)) return "pinned";
    for (let attempt = 1; ; attempt++) {
      try {
        const r = await beforeDeadline(this.os.get(sha), Date.now() + FETCH_STALL_MS, "did not answer", (late) => void late?.data.cancel().catch(() => {}));
        if (!r) {
          this.log.error({ sha }, "an attachment the cluster log names is not in the object store");
          return "missing";
        }
        const ok = await this.blobs.storeFetched(sha, untilStall(r.data));
        // Bytes that hash to `sha` are the blob, whatever the read reported after them.
        if (ok) return "pinned";
        const failed = await r.error;
        if (failed) throw failed;
        this.log.error({ sha }, "the object store's copy of an attachment does not match its hash");
        return "missing";
      } catch (err) {
        // The apply waiting for it is cut short; the node applies the entry again when it starts.
        if (this.closed) throw new Error("the node is stopping", { cause: err });
        if (attempt >= attempts) {
          this.log.error({ err, sha }, "fetching an attachment from the object store failed; this node cannot send it");
          return "missing";
        }
        this.log.warn({ err, sha, attempt }, "fetching an attachment from the object store failed; retrying");
        await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** attempt, 2_000)));
      }
    }
  }

  /**
   * Fetches blob `sha` again for a read that found no file (BlobStore.refetch): a fetch
   * given up as its message was applied, or a file lost. A few tries, then the read goes
   * on without it. The message references it: unpinned, it stays.
   */
  async refetch(sha: string): Promise<boolean> {
    const got = await this.fetch(sha, REFETCH_ATTEMPTS);
    if (got !== "pinned") return false;
    this.blobs.unpin(sha);
    this.log.info({ sha }, "an attachment missing on this node was fetched again");
    return true;
  }
}

/**
 * `p`, or a failure at `deadline` (unix ms) if it comes first, saying the store `what`
 * (`late` gets what `p` gives after).
 */
function beforeDeadline<T>(p: Promise<T>, deadline: number, what: string, late: (value: T) => void = () => {}): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    let settled = false;
    const timer = setTimeout(() => {
      settled = true;
      reject(new Error(`the object store ${what} within ${FETCH_STALL_MS / 1000} s`));
    }, Math.max(0, deadline - Date.now()));
    p.then(
      (v) => {
        clearTimeout(timer);
        if (settled) late(v);
        else resolve(v);
      },
      (err: unknown) => {
        clearTimeout(timer);
        if (!settled) reject(err);
      },
    );
  });
}

/**
 * The object's bytes as they come, failing (and cancelling the read) when a
 * FETCH_STALL_MS window passes without FETCH_MIN_PROGRESS of them (or the end).
 */
async function* untilStall(data: ReadableStream<Uint8Array>): AsyncGenerator<Uint8Array> {
  const reader = data.getReader();
  let deadline = Date.now() + FETCH_STALL_MS;
  let progress = 0;
  try {
    for (;;) {
      const { done, value } = await beforeDeadline(reader.read(), deadline, `sent less than ${FETCH_MIN_PROGRESS} bytes`);
      if (done) return;
      progress += value.byteLength;
      if (progress >= FETCH_MIN_PROGRESS) {
        progress = 0;
        deadline = Date.now() + FETCH_STALL_MS;
      }
      yield value;
    }
  } finally {
    void reader.cancel().catch(() => {});
  }
}
