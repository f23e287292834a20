// The replicated log of cluster mode, on NATS JetStream (shared/spec/cluster.md).
//
// Every node appends the commands its clients cause to one stream, and applies the
// whole stream, in stream order, to its own view (its LevelDB). The order, the
// durability and the replication come from JetStream; a node only ever applies what
// the stream holds, so every node reaches the same state and the same verdicts (a
// contested login is won by whichever claim comes first in the stream, on every node).
//
// Appends are group-committed like LevelDB batches (storage/db.ts): one publish is in
// flight per node, and the commands proposed meanwhile form the next entry. An append
// resolves once its entry is stored (the PubAck, with the stream's replication) *and*
// applied on this node, with the outcome the apply gave its command: a reply sent
// after it is durable, and the next read on this node sees the write.
//
// Duplicates: an entry is published with Nats-Msg-Id `<origin>:<n>` (origin = node id,
// start time and random bytes: two nodes given one --node-id, started in the same
// millisecond, would share ids, and JetStream would drop one node's entries as the
// other's repeats and acknowledge them; n its number), and a publish that failed is retried with the same
// id. JetStream drops a repeat of an id it stored within the stream's duplicate
// window, and retries stop well inside that window (WRITE_BUDGET_MS against
// DUPLICATE_WINDOW_MS), so an entry is stored at most once. A publish that gave up
// may still have been stored: the caller hears "unavailable" (16), never a success it
// cannot prove, and a resend with the same cmid finds the first one.
//
// Reads across nodes: sync() resolves once this node has applied everything the
// stream held when it was called, so a client that wrote through another node sees
// its write here once its request waits for sync().

import { randomBytes } from "node:crypto";
import { connect, type ConnectionOptions, type NatsConnection } from "@nats-io/transport-node";
import {
  DeliverPolicy,
  RetentionPolicy,
  jetstream,
  jetstreamManager,
  StorageType,
  type ConsumerMessages,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import type { Logger } from "pino";
import { Code, ProtocolError } from "../protocol/codes.js";
import { within } from "../clock.js";

/** One append: the commands one node proposed together. */
export interface LogEntry<C> {
  /** Origin: `<node id>@<start time>.<random>`. */
  o: string;
  /** The origin's entry number, from 1. */
  n: number;
  c: C[];
}

/** An entry as the stream holds it. */
export interface StoredEntry<C> {
  seq: number;
  /** Its Nats-Msg-Id. */
  id: string;
  entry: LogEntry<C>;
}

/** Where a view stands in the stream; the view stores it with what it applied. */
export interface ViewPosition {
  /** Creation time of the stream the view was built from ("" for an empty view). */
  created: string;
  /** Sequence of the last entry applied (0 for an empty view). */
  seq: number;
  /** Nats-Msg-Id of that entry ("" for an empty view). */
  id: string;
}

export const EMPTY_VIEW: ViewPosition = { created: "", seq: 0, id: "" };

/**
 * Applies entries in stream order and stores the new position with their effects (one
 * atomic write). Returns, per entry, the outcome of each of its commands.
 */
export type Apply<C, R> = (entries: StoredEntry<C>[], position: ViewPosition) => Promise<R[][]>;

export interface JetStreamLogOptions<C, R> {
  /** nats://host:port, comma-separated for several servers. */
  servers: string;
  /** Stream name; its subject is `<stream>.log`. */
  stream: string;
  /** Replicas of the stream (1 for one nats-server, 3 for a three-server cluster). */
  replicas: number;
  /** Names this node in the entries it appends (with its start time). */
  nodeId: string;
  /** The view's position as stored. */
  view: ViewPosition;
  apply: Apply<C, R>;
  log: Logger;
  /** How long an append may wait, from the call, before it answers unavailable (ms). */
  writeBudgetMs?: number;
  /** Bytes of commands appended and not yet settled past which appends answer unavailable. */
  maxPendingBytes?: number;
  /**
   * Commands published in an entry of their own (no other command before or after
   * them in it), so that an apply can give them a segment of their own.
   */
  alone?: (cmd: C) => boolean;
  /** Authentication and TLS for the connection (cluster/access.ts). */
  connectOptions?: Partial<ConnectionOptions>;
  /**
   * Called once connected and the stream is there, before anything is applied (what
   * apply needs of the engine), with the stream's last seq: the catch-up's end.
   */
  connected?: (nc: NatsConnection, lastSeq: number) => Promise<void>;
  /**
   * Ends open()'s waits (for JetStream to answer, for the catch-up): open() closes
   * what it opened and rejects with the signal's reason. What was applied stays
   * applied: each batch carries its position.
   */
  abort?: AbortSignal;
  /**
   * Called first when the log closes (a stop, an open that failed or was aborted), before
   * its connection does: what an apply uses of the engine stops retrying, so the apply
   * in flight ends (close waits for it) instead of waiting out the closed connection.
   */
  closing?: () => void;
}

/** The view cannot be trusted for this stream: the caller empties it and opens again. */
export class ViewMismatch extends Error {}

/** A publish waits this long for its PubAck before it is retried. */
const PUBLISH_TIMEOUT_MS = 2_000;
/** Default for writeBudgetMs. */
export const WRITE_BUDGET_MS = 10_000;
/** The stream's duplicate window: well past any append's retries. */
const DUPLICATE_WINDOW_MS = 120_000;
/** Bytes of commands per entry: below NATS's default max_payload of 1 MiB, with room for headers. */
const MAX_ENTRY_BYTES = 900 * 1024;
/**
 * Default for maxPendingBytes: commands appended on this node and not yet answered
 * (gathered, being published, or stored and waiting for their apply). A nats-server
 * that stops answering without closing the connection (a stalled process, a network
 * that drops packets) looks connected for minutes: without a cap, one client that
 * pipelines 800 KB messages grew a node from 250 MB to 1,230 MB in 12 s. Past it an
 * append answers 16 at once, as when the engine is unreachable; 32 MiB is dozens of
 * entries of the largest size, far more than a healthy engine ever leaves waiting.
 */
export const MAX_PENDING_BYTES = 32 * 1024 * 1024;
/** How long close() lets the connection drain. */
const CLOSE_WAIT_MS = 2_000;
/** How long start-up waits for a JetStream that answers "temporarily unavailable". */
const STARTUP_WAIT_MS = 30_000;
/** Entries received and not yet applied before reading from the stream pauses. */
const MAX_UNAPPLIED = 1_024;
/**
 * ... or their bytes: an entry may be up to NATS's payload limit (1 MiB by default),
 * and 1,024 of them held ~1 GB of decoded commands on a node catching up while clients
 * sent large messages (MAX_PENDING_BYTES bounds the same on the write side).
 */
const MAX_UNAPPLIED_BYTES = 32 * 1024 * 1024;
/** Bytes of entries one apply takes at most (one LevelDB batch), one entry at least. */
const APPLY_BATCH_BYTES = 8 * 1024 * 1024;
/**
 * Entries the reader's pull requests ask for at a time (at most ~29 MiB of the largest
 * entries buffered in the client: it asks for more as the reader takes them, so a
 * reader paused at MAX_UNAPPLIED holds no more). Counted in entries, not bytes: the
 * client's refills asked for the bytes that the entries read since had taken, the
 * server refused such a pull for the first entry larger than that ("409 message size
 * exceeds maxbytes", 533 times in one bench:cluster run), and a reader with no other
 * pull waiting heard nothing until two heartbeats were missed: stalls of 3 s, the
 * watchdog's, at p99.
 */
const PULL_ENTRIES = 32;
/** How often the watchdog looks at what waits (see watch()). */
const WATCH_EVERY_MS = 1_000;
/**
 * Nothing read or applied for this long while something waits for the log: the reader
 * is checked against the stream's end, and re-opened if it is behind.
 */
const READER_STALL_MS = 3_000;

interface Proposal<C, R> {
  cmd: C;
  bytes: number;
  /** Date.now() past which it answers 16: the write budget counts from the append. */
  deadline: number;
  resolve: (r: R) => void;
  reject: (err: Error) => void;
}

interface Open<C, R> {
  n: number;
  proposals: Proposal<C, R>[];
  /** Resolves the proposals once the entry at `seq` is applied. */
  seq: number;
  /** Its proposals' earliest deadline (Date.now()): past it, they answer 16. */
  deadline: number;
}

export class JetStreamLog<C, R> {
  /** This node's name in the entries it appends: `<node id>@<start time>.<random>` (unique per process). */
  readonly origin: string;
  private next = 1;
  private gathering: Proposal<C, R>[] = [];
  private gatheringBytes = 0;
  /** Bytes of the proposals not yet settled (gathered, publishing or stored): see MAX_PENDING_BYTES. */
  private pendingBytes = 0;
  private readonly maxPendingBytes: number;
  private publishing = false;
  /** Entries stored by this node, waiting for their apply (in seq order: one publish at a time). */
  private stored: Open<C, R>[] = [];
  private applied: ViewPosition;
  /** sync() callers: resolved once `applied.seq` reaches `seq`. */
  private barriers: { seq: number; resolve: () => void; reject: (err: Error) => void }[] = [];
  /** lastSeq(): the stream-info request out, and the one the callers since then wait for. */
  private infoOut: Promise<number> | undefined;
  private infoNext: Promise<number> | undefined;
  private unapplied: StoredEntry<C>[] = [];
  /** The payload size of each entry in `unapplied`, and their sum. */
  private readonly unappliedSizes: number[] = [];
  private unappliedBytes = 0;
  private applying = false;
  /** Settles when the apply loop running now (applying) has stopped. */
  private applyDone: Promise<void> = Promise.resolve();
  private resumeReading: (() => void) | undefined;
  private messages: ConsumerMessages | undefined;
  /** The last stream seq read (at or past `applied`); a re-opened reader starts after it. */
  private lastRead = 0;
  /** When an entry was last read or applied (Date.now()). */
  private lastProgress = Date.now();
  private watchdog: NodeJS.Timeout | undefined;
  private watching = false;
  private connected = true;
  /**
   * JetStream has not answered since the connection came back (or since a request
   * found it unreachable): not ready. The NATS connection returns before JetStream
   * answers (a restarted server recovers its streams first): /readyz said 200 for the
   * 5-9 s in which every request answered 16.
   */
  private engineDown = false;
  /** checkLog running: one probe at a time. */
  private checking: Promise<void> | undefined;
  private closed = false;
  private readonly writeBudgetMs: number;
  private failure: Error | undefined;
  /** Outcomes of this node's entry applied before its PubAck arrived (only the one in flight can be). */
  private readonly early = new Map<number, R[]>();

  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient,
    private readonly jsm: JetStreamManager,
    private readonly opts: JetStreamLogOptions<C, R>,
    readonly created: string,
  ) {
    this.origin = `${opts.nodeId}@${Date.now()}.${randomBytes(4).toString("hex")}`;
    this.applied = { ...opts.view, created };
    this.writeBudgetMs = opts.writeBudgetMs ?? WRITE_BUDGET_MS;
    this.maxPendingBytes = opts.maxPendingBytes ?? MAX_PENDING_BYTES;
  }

  /**
   * Connects, makes sure the stream exists, checks that the view was built from it
   * (ViewMismatch if not), and applies the stream up to its end before resolving.
   */
  static async open<C, R>(opts: JetStreamLogOptions<C, R>): Promise<JetStreamLog<C, R>> {
    // Reconnecting for good, through authentication errors too: the client gives up after
    // two in a row by default (an engine restarting with its auth callout or account
    // resolver not up yet), and a node whose connection closed refused every write and
    // login until restarted. (Credentials files are read again at each connect: access.ts.)
    const connecting = connect({
      ...opts.connectOptions,
      servers: opts.servers.split(","),
      name: opts.nodeId,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      ignoreAuthErrorAbort: true,
    });
    // The first connection can take its timeout (20 s) to fail: a signal does not wait
    // for it (a connection made after all is closed).
    const nc = await untilAborted(connecting, opts.abort).catch((err: unknown) => {
      if (opts.abort?.aborted) void connecting.then((c) => c.close().catch(() => {}), () => {});
      throw err;
    });
    let log: JetStreamLog<C, R> | undefined;
    try {
      const jsm = await jetstreamManager(nc);
      const info = await ensureStream(jsm, opts);
      const created = info.created;
      await verifyView(jsm, opts.stream, opts.view, created, info.state.first_seq, info.state.last_seq);
      await opts.connected?.(nc, info.state.last_seq);
      opts.abort?.throwIfAborted();
      log = new JetStreamLog<C, R>(nc, jetstream(nc), jsm, opts, created);
      log.watchStatus();
      await log.startReading();
      await untilAborted(log.syncTo(info.state.last_seq), opts.abort);
      return log;
    } catch (err) {
      if (log) await log.close();
      else await nc.close().catch(() => {});
      // Stopped by the signal: whatever failed meanwhile is its doing.
      throw opts.abort?.aborted ? opts.abort.reason : err;
    }
  }

  /** The connection, for what this node says over core NATS (presence). */
  get connection(): NatsConnection {
    return this.nc;
  }

  get subject(): string {
    return `${this.opts.stream}.log`;
  }

  /** The view's position (what it has applied). */
  get position(): ViewPosition {
    return this.applied;
  }

  /**
   * Appends one command; resolves with the outcome of its apply on this node once its
   * entry is stored and applied. Rejects with ProtocolError 16 when the engine cannot
   * confirm it within the write budget.
   */
  append(cmd: C): Promise<R> {
    if (this.closed) return Promise.reject(unavailable("this node is shutting down"));
    if (this.failure) return Promise.reject(this.failure);
    if (!this.connected) return Promise.reject(unavailable("the cluster's message store is unreachable"));
    // Full already: refused before the command is serialised (a refused large message
    // leaves no copy behind).
    if (this.pendingBytes >= this.maxPendingBytes) return Promise.reject(unavailable("the cluster's message store is not keeping up; try again"));
    const bytes = Buffer.byteLength(JSON.stringify(cmd));
    if (bytes > MAX_ENTRY_BYTES) return Promise.reject(new ProtocolError(Code.TooLarge, `the request is too large for the cluster log (${bytes} bytes)`));
    if (this.pendingBytes + bytes > this.maxPendingBytes) {
      return Promise.reject(unavailable("the cluster's message store is not keeping up; try again"));
    }
    return new Promise<R>((resolve, reject) => {
      // Its bytes count until it is answered, however that happens.
      this.pendingBytes += bytes;
      let settled = false;
      const done = () => {
        if (settled) return false;
        settled = true;
        this.pendingBytes -= bytes;
        return true;
      };
      this.gathering.push({
        cmd,
        bytes,
        deadline: Date.now() + this.writeBudgetMs,
        resolve: (r) => done() && resolve(r),
        reject: (err) => done() && reject(err),
      });
      this.gatheringBytes += bytes;
      if (!this.publishing) void this.publish();
    });
  }

  /** Resolves once every entry the stream holds now is applied on this node. */
  async sync(): Promise<void> {
    if (this.failure) throw this.failure;
    let last: number;
    try {
      last = await this.lastSeq();
    } catch (err) {
      // Not ready until JetStream answers again (checkLog's probe).
      if (!this.closed && !this.failure) {
        this.engineDown = true;
        void this.checkLog();
      }
      throw unavailable("the cluster's message store is unreachable", err);
    }
    await this.syncTo(last, this.writeBudgetMs);
  }

  /**
   * The stream's last seq, as the engine answers a request made after this call: one
   * request at a time, shared by every caller that came while the one before it was
   * out (that one may have been answered before a write they must see). Every `auth`
   * syncs, unauthenticated ones included, so this is what bounds the engine's API
   * requests a flood of them makes: one per round trip, not one per frame (256 idle
   * sockets of one address, each at --rate, could ask thousands per second).
   */
  private lastSeq(): Promise<number> {
    if (this.infoOut === undefined) {
      const out = this.jsm.streams.info(this.opts.stream).then((i) => i.state.last_seq);
      this.infoOut = out;
      const clear = () => {
        if (this.infoOut === out) this.infoOut = undefined;
      };
      out.then(clear, clear);
      return out;
    }
    this.infoNext ??= this.infoOut.then(
      () => this.nextInfo(),
      () => this.nextInfo(),
    );
    return this.infoNext;
  }

  private nextInfo(): Promise<number> {
    this.infoNext = undefined;
    return this.lastSeq();
  }

  /** Resolves once `seq` is applied; past `withinMs` (if given), 16: the log stopped coming. */
  private syncTo(seq: number, withinMs?: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.applied.seq >= seq) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const barrier = { seq, resolve, reject };
      this.barriers.push(barrier);
      if (withinMs === undefined) return;
      const timer = setTimeout(() => {
        const i = this.barriers.indexOf(barrier);
        if (i < 0) return;
        this.barriers.splice(i, 1);
        reject(unavailable("this node is behind the cluster log and not catching up; try again"));
      }, withinMs);
      barrier.resolve = () => {
        clearTimeout(timer);
        resolve();
      };
      barrier.reject = (err) => {
        clearTimeout(timer);
        reject(err);
      };
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    this.opts.closing?.();
    clearInterval(this.watchdog);
    this.messages?.stop();
    // A drain flushes what is pending; with the engine unreachable it would wait for the
    // reconnect for ever, and a stopping node must stop.
    await within(this.nc.drain().catch(() => {}), CLOSE_WAIT_MS);
    if (!this.nc.isClosed()) await this.nc.close().catch(() => {});
    // The apply in flight ends (written, or cut short by the closed connection) before
    // storage closes behind this node; bounded as the drain is.
    if (this.applying) await within(this.applyDone, CLOSE_WAIT_MS);
    // What still waits is answered (it waited for good: a shutdown's own waits with it):
    // 16, as for an engine out of reach; a stored entry is applied at the next start.
    const stopping = unavailable("this node is stopping");
    for (const p of this.gathering.splice(0)) p.reject(stopping);
    this.gatheringBytes = 0;
    for (const open of this.stored.splice(0)) for (const p of open.proposals) p.reject(stopping);
    for (const b of this.barriers.splice(0)) b.reject(stopping);
  }

  /** Publishes gathered commands, one entry at a time, until none are left. */
  private async publish(): Promise<void> {
    this.publishing = true;
    try {
      while (this.gathering.length > 0 && !this.closed) {
        this.dropExpired();
        if (this.gathering.length === 0) break;
        // One entry: as many commands as fit under MAX_ENTRY_BYTES (at least one), up
        // to the next that goes alone; one that goes alone is an entry by itself.
        const alone = (i: number) => this.opts.alone?.(this.gathering[i].cmd) === true;
        let take = 1;
        let size = this.gathering[0].bytes;
        if (!alone(0)) {
          while (take < this.gathering.length && !alone(take) && size + this.gathering[take].bytes <= MAX_ENTRY_BYTES) {
            size += this.gathering[take].bytes;
            take++;
          }
        }
        const proposals = this.gathering.splice(0, take);
        this.gatheringBytes -= size;
        const n = this.next++;
        const entry: LogEntry<C> = { o: this.origin, n, c: proposals.map((p) => p.cmd) };
        // FIFO: the first proposal's deadline is the entry's earliest.
        const deadline = proposals[0].deadline;
        let seq: number;
        try {
          seq = await this.publishEntry(`${this.origin}:${n}`, JSON.stringify(entry), deadline);
        } catch (err) {
          // Applied meanwhile (stored by a try whose PubAck was lost): its outcomes are
          // known, and they are the answer; otherwise "it may still be applied".
          const got = this.early.get(n);
          this.early.delete(n);
          proposals.forEach((p, i) => (got ? p.resolve(got[i]) : p.reject(err as Error)));
          continue;
        }
        if (seq <= this.applied.seq) {
          // Applied already (the consumer can overtake the PubAck): its outcomes were
          // handed out at apply if it was waited for; it was not, so ask nothing more.
          this.settleApplied({ n, proposals, seq, deadline }, undefined);
        } else if (this.failure || this.closed) {
          // This node stopped following the log (fail(), close()) while the PubAck was
          // on its way: nothing here will apply the entry or answer for it (fail() and
          // close() answered what was stored before). Stored, it is applied elsewhere
          // (here at the next start); a resend with the same cmid finds it.
          const err = this.failure ?? unavailable("this node is stopping");
          for (const p of proposals) p.reject(err);
        } else {
          this.stored.push({ n, proposals, seq, deadline });
        }
      }
    } finally {
      this.publishing = false;
    }
  }

  /**
   * Gathered proposals whose write budget ran out while they waited for the publish
   * before them (an engine that stalled): 16, never published.
   */
  private dropExpired(): void {
    const now = Date.now();
    if (this.gathering.length === 0 || this.gathering[0].deadline > now) return;
    const err = unavailable("the cluster could not take the request in time; nothing was stored");
    const kept: Proposal<C, R>[] = [];
    for (const p of this.gathering) {
      if (p.deadline > now) kept.push(p);
      else {
        this.gatheringBytes -= p.bytes;
        p.reject(err);
      }
    }
    this.gathering = kept;
  }

  /** Publishes with retries (same Nats-Msg-Id) until `deadline`; the stream seq. */
  private async publishEntry(id: string, data: string, deadline: number): Promise<number> {
    let wait = 250;
    for (;;) {
      try {
        const ack = await this.js.publish(this.subject, data, { msgID: id, timeout: PUBLISH_TIMEOUT_MS, expect: { streamName: this.opts.stream } });
        return ack.seq;
      } catch (err) {
        if (this.closed || Date.now() + wait > deadline) {
          throw unavailable("the cluster could not confirm the request; it may still be applied (a resend with the same cmid finds it)", err);
        }
        this.opts.log.warn({ err, id }, "appending to the cluster log failed; retrying");
        await new Promise((r) => setTimeout(r, wait));
        wait = Math.min(wait * 2, 2_000);
      }
    }
  }

  /**
   * Why this node cannot take writes now, for /readyz (a load balancer sends clients
   * elsewhere meanwhile); undefined when it can.
   */
  get problem(): string | undefined {
    if (this.failure) return "this node stopped following the cluster log (its log says why); restart it";
    if (this.nc.isClosed()) return "the connection to the cluster engine closed; restart this node";
    if (!this.connected) return "disconnected from the cluster engine";
    if (this.engineDown) return "the cluster engine's JetStream is not answering yet";
    return undefined;
  }

  private watchStatus(): void {
    // A connection that ends for good (not by close()): nothing more is applied here.
    void this.nc.closed().then((err) => {
      if (this.closed) return;
      this.connected = false;
      this.fail(err ?? new Error("the connection to the cluster engine closed"));
    });
    void (async () => {
      for await (const s of this.nc.status()) {
        if (s.type === "disconnect") {
          this.connected = false;
          this.opts.log.warn({ server: s.server }, "cluster engine disconnected");
        } else if (s.type === "reconnect") {
          this.connected = true;
          this.engineDown = true;
          this.opts.log.info({ server: s.server }, "cluster engine reconnected");
          void this.checkLog();
        }
      }
    })();
  }

  /**
   * Reads the stream from the view's position on, in order, into the apply queue,
   * through an ordered consumer (an ephemeral one, on one server of the NATS cluster),
   * and starts the watchdog.
   */
  private async startReading(): Promise<void> {
    this.lastRead = this.applied.seq;
    await this.openReader();
    this.watchdog = setInterval(() => void this.watch(), WATCH_EVERY_MS);
    this.watchdog.unref();
  }

  private async openReader(): Promise<void> {
    const consumer = await this.js.consumers.get(this.opts.stream, {
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: this.lastRead + 1,
    });
    // Pulls expire every 5 s (heartbeats every 2.5 s), so a reader whose consumer went
    // with its server notices within seconds, not the client's default 30.
    const messages = await consumer.consume({ max_messages: PULL_ENTRIES, expires: 5_000 });
    if (this.closed || this.failure) {
      messages.stop(); // closed, or stopped following the log, while it was being opened
      return;
    }
    this.messages = messages;
    this.reportReader(messages);
    void (async () => {
      try {
        for await (const m of messages) {
          if (this.messages !== messages) return; // replaced by the watchdog
          // A reader re-opened after the last one read: nothing twice.
          if (m.seq <= this.lastRead) continue;
          const entry = decode<C>(m);
          if (entry.entry.c.length === 0) {
            // Not a wirechat entry (anything that can publish to the subject wrote it:
            // `nats pub`, a broken client): every node reads the same bytes and applies
            // it as nothing, rather than stop at it (every node did, for good: deleting
            // it from the stream left a gap the reader refuses).
            this.opts.log.warn({ seq: m.seq, id: entry.id, bytes: m.data.length }, "a cluster log entry that is not a wirechat entry was skipped");
          }
          this.lastRead = m.seq;
          this.lastProgress = Date.now();
          this.unapplied.push(entry);
          this.unappliedSizes.push(m.data.length);
          this.unappliedBytes += m.data.length;
          if (!this.applying) void this.applyQueued();
          if (this.unapplied.length >= MAX_UNAPPLIED || this.unappliedBytes >= MAX_UNAPPLIED_BYTES) await new Promise<void>((r) => (this.resumeReading = r));
        }
      } catch (err) {
        // The reader gave up (its consumer could not be made again while JetStream had
        // no quorum, say): the engine may come back, so the node is not stopped for it
        // (it was, for good, until a restart). Without a reader, the watchdog opens a
        // new one once the stream holds entries past the last read, or stops the node
        // if the stream was made anew.
        if (this.closed || this.messages !== messages) return;
        this.messages = undefined;
        this.opts.log.warn({ err, read: this.lastRead }, "reading the cluster log failed; the watchdog opens a new reader");
      }
    })();
  }

  /**
   * Logs what the consumer's client reports of trouble: a pull refused or heartbeats
   * missed (a reader that hears nothing), and the consumer made again. The rest (pulls
   * sent, heartbeats, pulls that expired while the log was idle) is routine.
   */
  private reportReader(messages: ConsumerMessages): void {
    void (async () => {
      for await (const s of messages.status()) {
        if (s.type === "exceeded_limits" || s.type === "heartbeats_missed") this.opts.log.warn({ consumer: s }, "the cluster log's reader was refused or heard nothing");
        else if (s.type === "reset" || s.type === "ordered_consumer_recreated") this.opts.log.info({ consumer: s }, "the cluster log's reader made its consumer again");
      }
    })().catch(() => {});
  }

  /**
   * After a reconnect: the stream still holds what this view applied last. An engine
   * that lost its tail (one copy, a power loss before its own sync) comes back with
   * fewer entries, and new ones take the lost numbers: the reader, past them already,
   * would never see those, and this view would differ from every other for good. The
   * node stops following the log instead (a restart rebuilds its view).
   */
  /**
   * After a reconnect (or a request that found JetStream unreachable): asks for the
   * stream until JetStream answers (engineDown is cleared then), and checks that it
   * still holds what this node applied.
   */
  private checkLog(): Promise<void> {
    this.checking ??= (async () => {
      let wait = 250;
      try {
        for (;;) {
          if (this.closed || this.failure) return;
          try {
            const info = await this.jsm.streams.info(this.opts.stream);
            if (this.closed || this.failure) return;
            this.engineDown = false;
            await verifyView(this.jsm, this.opts.stream, this.applied, info.created, info.state.first_seq, info.state.last_seq);
            return;
          } catch (err) {
            if (err instanceof ViewMismatch) return this.fail(new Error(`the cluster log no longer holds what this node applied (${err.message}): restart the node to rebuild its view`));
            if (this.closed) return;
            if (!this.engineDown) return this.opts.log.warn({ err }, "checking the cluster log after a reconnect failed");
            // Not answering yet: asked again (the NATS client waits out a disconnection).
            await new Promise((r) => setTimeout(r, wait).unref());
            wait = Math.min(wait * 2, 2_000);
          }
        }
      } finally {
        this.checking = undefined;
      }
    })();
    return this.checking;
  }

  /**
   * Once a second: an answer whose entry is stored but not applied here within the
   * write budget is 16 (its apply may still come; a resend with the same cmid finds
   * it); and a reader that has read nothing for READER_STALL_MS is checked against the
   * stream's end (one request; an idle node makes one every few seconds) and re-opened
   * after the last entry it read when it is behind (its consumer lived on a server that
   * died: the NATS client's own recovery can take minutes).
   */
  private async watch(): Promise<void> {
    if (this.closed || this.failure) return;
    const now = Date.now();
    // Also while a publish hangs on a stalled engine: what waits behind it answers in time.
    this.dropExpired();
    while (this.stored.length > 0 && now > this.stored[0].deadline) {
      const late = this.stored.shift() as Open<C, R>;
      const err = unavailable("the cluster stored the request but this node has not applied it yet; a resend with the same cmid finds it");
      for (const p of late.proposals) p.reject(err);
    }
    // Also on a node with nothing of its own waiting: its clients wait for the others' messages.
    // (The expiries above run while a check waits on a stalled engine too.)
    if (this.watching || !this.connected || now - this.lastProgress < READER_STALL_MS || this.unapplied.length > 0) return;
    this.watching = true;
    try {
      const info = await this.jsm.streams.info(this.opts.stream);
      if (this.closed) return;
      // A stream of that name made anew (deleted, or its server's store lost): its
      // entries are not this view's log (a reader on it would apply them on top).
      if (info.created !== this.created) {
        this.fail(new Error(`the stream ${this.opts.stream} was made anew (created ${info.created}; this node follows the one created ${this.created}): restart the node to rebuild its view`));
        return;
      }
      const last = info.state.last_seq;
      if (last < this.applied.seq) {
        this.fail(new Error(`the cluster log ends at entry ${last}, before the ${this.applied.seq} this node applied (the engine lost entries): restart the node to rebuild its view`));
        return;
      }
      if (last <= this.lastRead) return;
      this.opts.log.warn({ read: this.lastRead, last }, "reading the cluster log stalled; re-opening the reader");
      const old = this.messages;
      this.messages = undefined;
      old?.stop();
      await this.openReader();
    } catch (err) {
      this.opts.log.warn({ err }, "checking the cluster log's reader failed; trying again");
    } finally {
      this.lastProgress = Date.now();
      this.watching = false;
    }
  }

  /** Applies what was read, in batches, one batch at a time. */
  private async applyQueued(): Promise<void> {
    this.applying = true;
    let done = () => {};
    this.applyDone = new Promise<void>((r) => (done = r));
    try {
      // Closed: what is left is applied at the next start (each batch carries its
      // position), and storage closes behind this node, never under an apply.
      while (this.unapplied.length > 0 && !this.failure && !this.closed) {
        let n = 0;
        let bytes = 0;
        while (n < this.unapplied.length && (n === 0 || bytes + this.unappliedSizes[n] <= APPLY_BATCH_BYTES)) bytes += this.unappliedSizes[n++];
        const batch = this.unapplied.splice(0, n);
        this.unappliedSizes.splice(0, n);
        this.unappliedBytes -= bytes;
        this.resumeReading?.();
        this.resumeReading = undefined;
        const last = batch[batch.length - 1];
        if (batch[0].seq !== this.applied.seq + 1) {
          throw new Error(`the cluster log skipped from ${this.applied.seq} to ${batch[0].seq}`);
        }
        const position: ViewPosition = { created: this.created, seq: last.seq, id: last.id };
        const outcomes = await this.opts.apply(batch, position);
        this.applied = position;
        this.lastProgress = Date.now();
        batch.forEach((e, i) => {
          if (e.entry.o !== this.origin) return;
          const mine = this.stored.findIndex((s) => s.n === e.entry.n);
          if (mine >= 0) this.settleApplied(this.stored.splice(mine, 1)[0], outcomes[i]);
          // Its PubAck is on the way. (An entry whose publish gave up but was stored is
          // applied like any other; its proposers were told "unavailable".)
          else if (this.publishing && e.entry.n === this.next - 1) this.early.set(e.entry.n, outcomes[i]);
        });
        this.releaseBarriers();
      }
    } catch (err) {
      this.fail(err);
    } finally {
      this.applying = false;
      done();
    }
  }

  private settleApplied(open: Open<C, R>, outcomes: R[] | undefined): void {
    const got = outcomes ?? this.early.get(open.n);
    this.early.delete(open.n);
    open.proposals.forEach((p, i) => {
      if (got) p.resolve(got[i]);
      else p.reject(new Error(`entry ${open.n} was applied without its outcomes`));
    });
  }

  private releaseBarriers(): void {
    if (this.barriers.length === 0) return;
    const seq = this.applied.seq;
    const waiting = this.barriers;
    this.barriers = [];
    for (const b of waiting) {
      if (b.seq <= seq) b.resolve();
      else this.barriers.push(b);
    }
  }

  /**
   * The view could not apply an entry (a storage failure, a gap in the stream): it
   * no longer follows the log, so this node refuses every request that needs it.
   */
  private fail(err: unknown): void {
    if (this.failure) return;
    // Stopping: an apply cut short is applied again at the next start (its position was not written).
    if (this.closed) this.opts.log.info({ err: String((err as Error)?.message ?? err) }, "an apply was cut short by the shutdown");
    else this.opts.log.error({ err }, "applying the cluster log failed; this node stops taking writes");
    this.failure = unavailable("this node stopped following the cluster log", err);
    // Nothing more is applied: the reader stops, and what it read goes.
    const reader = this.messages;
    this.messages = undefined;
    reader?.stop();
    this.unapplied = [];
    this.unappliedSizes.length = 0;
    this.unappliedBytes = 0;
    this.resumeReading?.();
    this.resumeReading = undefined;
    for (const p of this.gathering.splice(0)) p.reject(this.failure);
    for (const s of this.stored.splice(0)) for (const p of s.proposals) p.reject(this.failure);
    // Catching up at start-up too: the node does not start on a view that stopped.
    for (const b of this.barriers.splice(0)) b.reject(this.failure);
  }
}

/** `p`, or the signal's reason as soon as it is aborted (`p` goes on; its outcome is dropped). */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    const aborted = () => reject(signal.reason);
    signal.addEventListener("abort", aborted, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener("abort", aborted));
    if (signal.aborted) aborted();
  });
}

/** A 16 whose cause (the engine's error) is kept for the log. */
export function unavailable(text: string, cause?: unknown): ProtocolError {
  const err = new ProtocolError(Code.Unavailable, text);
  if (cause !== undefined) (err as Error & { cause?: unknown }).cause = cause;
  return err;
}

/**
 * The entry `m` holds; one with no commands (applied as nothing, but for its position)
 * when it is not a wirechat entry: not JSON, or not `{o: string, n: integer, c: [{k:
 * string, …}, …]}` with at least one command. A command of a kind this version does not
 * know stays: the apply stops at it (a newer node wrote it).
 */
function decode<C>(m: JsMsg): StoredEntry<C> {
  const id = m.headers?.get("Nats-Msg-Id") ?? "";
  let e: unknown;
  try {
    e = m.json<unknown>();
  } catch {
    e = undefined;
  }
  const entry = e as LogEntry<C> | undefined;
  const ok =
    typeof entry === "object" &&
    entry !== null &&
    typeof entry.o === "string" &&
    Number.isSafeInteger(entry.n) &&
    Array.isArray(entry.c) &&
    entry.c.length > 0 &&
    entry.c.every((c) => typeof c === "object" && c !== null && typeof (c as { k?: unknown }).k === "string");
  return { seq: m.seq, id, entry: ok ? (entry as LogEntry<C>) : { o: "", n: 0, c: [] } };
}

/**
 * The stream's info, made if missing, with as many copies as this node was told: a
 * node whose --replicas differs refuses to start (its 0s would promise copies the
 * stream does not keep). A JetStream not answering yet (a NATS cluster electing its
 * leader) is waited for, up to STARTUP_WAIT_MS.
 */
async function ensureStream<C, R>(jsm: JetStreamManager, opts: JetStreamLogOptions<C, R>) {
  const deadline = Date.now() + STARTUP_WAIT_MS;
  for (;;) {
    try {
      const info = await streamInfoOrCreate(jsm, opts);
      if (info.config.num_replicas !== opts.replicas) {
        throw new Error(`stream ${opts.stream} keeps ${info.config.num_replicas} copies of the log, and this node was started with --replicas ${opts.replicas}: start every node with the stream's number`);
      }
      // A stream made by hand may keep the log in memory (lost with its server: every
      // 0 answered would be a promise broken) or forget ids sooner than a publish is
      // retried (a retry stored twice): both are refused, with what to change.
      if (info.config.storage !== StorageType.File) {
        throw new Error(`stream ${opts.stream} keeps the log in memory (storage ${info.config.storage}): the log must be on disk; make the stream again with file storage, or let a node make it`);
      }
      if (info.config.duplicate_window < DUPLICATE_WINDOW_MS * 1_000_000) {
        throw new Error(`stream ${opts.stream} forgets entry ids after ${info.config.duplicate_window / 1e9} s, less than the ${DUPLICATE_WINDOW_MS / 1000} s a retried append needs: set its duplicate window to ${DUPLICATE_WINDOW_MS / 1000} s or more`);
      }
      // The log is every node's whole history, and holds nothing else: a stream that
      // drops old entries (by age, count or size, or as consumed) leaves a node that
      // restarts, or falls behind, unable to rebuild its view; one that takes other
      // subjects (`<stream>.>`) stores the nodes' presence notes as entries no view can
      // apply, and every node stops.
      const c = info.config;
      const wrong = [
        c.subjects.length !== 1 || c.subjects[0] !== `${opts.stream}.log` ? `subjects ${JSON.stringify(c.subjects)} (must be exactly ["${opts.stream}.log"])` : "",
        c.retention !== RetentionPolicy.Limits ? `retention ${c.retention} (must be limits)` : "",
        c.max_age > 0 ? `max_age ${c.max_age / 1e9} s` : "",
        c.max_msgs > 0 ? `max_msgs ${c.max_msgs}` : "",
        c.max_bytes > 0 ? `max_bytes ${c.max_bytes}` : "",
        (c.max_msgs_per_subject ?? 0) > 0 ? `max_msgs_per_subject ${c.max_msgs_per_subject}` : "",
      ].filter((w) => w !== "");
      if (wrong.length > 0) {
        throw new Error(`stream ${opts.stream} would not keep the whole log: ${wrong.join(", ")}; make it again without limits, or let a node make it`);
      }
      return info;
    } catch (err) {
      const text = String((err as Error).message);
      const transient = /temporarily unavailable|no responders|timeout|503/i.test(text);
      if (!transient || Date.now() > deadline) throw err;
      opts.log.warn({ err: text }, "JetStream is not answering yet; waiting for it");
      await untilAborted(new Promise((r) => setTimeout(r, 500)), opts.abort);
    }
  }
}

async function streamInfoOrCreate<C, R>(jsm: JetStreamManager, opts: JetStreamLogOptions<C, R>) {
  try {
    return await jsm.streams.info(opts.stream);
  } catch (err) {
    if (!String((err as Error).message).includes("stream not found")) throw err;
  }
  try {
    return await jsm.streams.add({
      name: opts.stream,
      subjects: [`${opts.stream}.log`],
      storage: StorageType.File,
      num_replicas: opts.replicas,
      duplicate_window: DUPLICATE_WINDOW_MS * 1_000_000,
    });
  } catch (err) {
    // Another node created it at the same moment.
    if (String((err as Error).message).includes("already in use")) return jsm.streams.info(opts.stream);
    throw err;
  }
}

/**
 * A view is only used for the stream it was built from, and only if the stream still
 * holds what it applied last (a stream deleted and created again, or a view from
 * elsewhere, is rebuilt from the log: ViewMismatch).
 */
async function verifyView(jsm: JetStreamManager, stream: string, view: ViewPosition, created: string, firstSeq: number, lastSeq: number): Promise<void> {
  if (view.seq === 0) {
    if (firstSeq > 1) throw new Error(`the cluster log starts at entry ${firstSeq}: a new node cannot be built from it`);
    return;
  }
  if (view.created !== created) throw new ViewMismatch(`the view was built from another stream (created ${view.created}, this one ${created})`);
  if (view.seq > lastSeq) throw new ViewMismatch(`the view has applied entry ${view.seq}, past the log's end (${lastSeq})`);
  const stored = await jsm.streams.getMessage(stream, { seq: view.seq });
  const id = stored?.header?.get("Nats-Msg-Id") ?? "";
  if (id !== view.id) throw new ViewMismatch(`entry ${view.seq} of the log is not the one the view applied`);
}
