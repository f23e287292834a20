// The dispatcher: features register their actions here (name, schema, handler); each
// connection's requests are checked and handed to handlers strictly in arrival order,
// and replies leave in the same order.
//
// Two entry points: frame() decodes a native NDJSON frame; dispatch() takes an action
// and its decoded data, so a front-end that decodes differently reuses everything
// behind it.
//
// Ordering with overlap: a handler normally runs only after the previous request of
// the connection has fully finished. An action marked `pipelined` (message) may return
// a Deferred once its writes are queued: the next request starts at once, and its
// reply waits in line until the commit lands. A non-pipelined request waits for every
// deferred one first, so it sees their writes.
//
// Replies are pulled, not pushed: the next request runs only once the connection is no
// longer congested, so a client that asks for large replies without reading them
// stalls its own requests instead of growing the server.
//
// Containment: any exception from a validator, a handler or a codec ends that request
// with status 16 and one log line; it never reaches the process.

import { isUtf8 } from "node:buffer";
import type { Logger } from "pino";
import type { Config } from "../config.js";
import { clockMs } from "../clock.js";
import { Metrics } from "../metrics.js";
import type { ReplyBody } from "./codec.js";
import { Code, ProtocolError } from "./codes.js";
import type { Audience, Event } from "./events.js";
import { peekAction, type OutFrame } from "./frames.js";
import { decodeFrame, FastShapes } from "./native-decode.js";
import type { Delivery } from "./router.js";
import { Session, type Peer, type StoredAttachment, type Upload } from "./session.js";
import type { Codec } from "./codec.js";
import { compileFastCheck, compileSchema, ENVELOPE, type Validator } from "./validation.js";
import { RefusalLog } from "../refusal-log.js";

/**
 * The reply of a pipelined handler, settled once its commit lands. A request can be
 * its own Deferred (Request.deferred()): the hot path then allocates nothing more.
 */
export class Deferred {
  /** Set by the dispatcher; called with the Deferred as `this`. */
  settle: ((this: Deferred, reply: ReplyBody | undefined, err: unknown) => void) | undefined = undefined;
  settled = false;
  reply: ReplyBody | undefined = undefined;
  err: unknown = undefined;

  resolve(reply: ReplyBody): void {
    this.done(reply, undefined);
  }

  reject(err: unknown): void {
    this.done(undefined, err);
  }

  private done(reply: ReplyBody | undefined, err: unknown): void {
    if (this.settled) return;
    this.settled = true;
    this.reply = reply;
    this.err = err;
    this.settle?.(reply, err);
  }
}

export interface Request<D> {
  readonly action: string;
  readonly data: D;
  readonly session: Session;
  /** The attachment streamed in with this frame (stored and pinned until the reply). */
  readonly attachment: StoredAttachment | undefined;
  /**
   * The frame had no backslash, so every string in `data` is its own JSON text between
   * two quotes: it holds no quote, backslash, control character or lone surrogate (raw
   * control characters are invalid JSON, and UTF-8 cannot carry a lone surrogate).
   */
  readonly plain: boolean;
  /** An event to route right after this request's reply is sent. */
  emit(ev: Event, audience: Audience): void;
  /** Runs right after this request's reply is sent (and its events routed). */
  after(fn: () => void): void;
  /** This request as the Deferred its pipelined handler returns and settles later. */
  deferred(): Deferred;
}

type Result = ReplyBody | Deferred;

export interface ActionSpec<D = never> {
  name: string;
  /** JSON Schema of the request's `data` (cid and sid are added: see ENVELOPE). */
  schema: object;
  /** Allowed before authentication. */
  public?: boolean;
  /** May overlap the requests after it (see the top of this file). */
  pipelined?: boolean;
  /**
   * Paths of string fields whose text streams to an upload while the frame is read
   * (["data", "attach", "data"]): the scanner is configured from these.
   */
  streams?: readonly (readonly string[])[];
  /**
   * The string fields of `data` a frame of this action's common shape holds (no spaces,
   * no escapes, no other field): such frames are read straight from their bytes
   * (protocol/native-decode.ts), others through JSON.parse, to the same value.
   */
  fastFields?: readonly string[];
  /** Served in cluster mode (--nats); any other action answers 16 there until it is. */
  cluster?: boolean;
  handle(req: Request<D>): Promise<Result> | Result;
}

interface Action {
  spec: ActionSpec<unknown>;
  validate: Validator;
  /** For a frame of the action's common shape: passes the schema (validation.ts, compileFastCheck). */
  fastValid: ((data: Record<string, string>) => boolean) | undefined;
}

type Item =
  | {
      kind: "request";
      action: string;
      data: Record<string, unknown>;
      upload: Upload | undefined;
      size: number;
      plain: boolean;
      /**
       * Waits for the connection to drain before it runs. A seed door's own call is not:
       * the door waited before the frame it serves, and may hold a lock shared with
       * another user while it waits for the answer (see run()).
       */
      paced: boolean;
      /** Decoded from its common shape (Dispatcher.decoded): only its length limits are left to check. */
      fast: boolean;
    }
  | { kind: "reject"; action: string; code: Code; reason: string; last?: boolean };

/** A place in a connection's line of replies (a request is one, with more to it). */
class Slot extends Deferred {
  frame: OutFrame | undefined = undefined;
  /** The request failed: its events and follow-ups are dropped. */
  failed = false;
  last = false;
}

function settleRequest(this: Deferred, reply: ReplyBody | undefined, err: unknown): void {
  const req = this as RequestImpl<unknown>;
  req.dispatcher.deferredSettled(req, reply, err);
}

/**
 * Requests read ahead of the one running before the connection stops being read, and
 * the bytes of frame they came from: 256 frames of up to --max-frame each would be
 * 256 MiB held for one connection, so reading also stops past INBOX_BYTES (always after
 * at least one frame).
 */
const INBOX_LIMIT = 256;
/** Also the bound of a door's queue of decoded frames (doors/dialect.ts). */
export const INBOX_BYTES = 4 * 1024 * 1024;
/**
 * Pipelined requests (messages) of one connection whose replies wait for their commit,
 * and the bytes of the frames they came from: past either, the next waits for some of
 * them. Each holds its record until then; without a bound a client streaming 1 MiB
 * messages while a commit stalled held its bandwidth times the stall, and the batch
 * that finally landed sent their recipient (and the sender's echo) that much in one
 * turn, past the outbound cap (8 MiB by default): they were closed as slow readers.
 * (Single node: in cluster mode what waits for the log is bounded by the log, which
 * answers 16 past its cap at once, JetStreamLog's MAX_PENDING_BYTES.)
 * The bytes are also at most a quarter of the outbound cap (Dispatcher.deferredBytes):
 * the sender's own connection is sent the echo of each, as large as its frame, in the
 * turn their batch lands; under --outbound-cap 64 KiB, 100 messages of 10 KB pipelined
 * in one write closed their sender as a slow reader with none of its replies.
 */
const DEFERRED_MAX = 4096;

class RequestImpl<D> extends Slot implements Request<D> {
  /** The first event (most requests have at most one), then the rest. */
  event: Event | undefined = undefined;
  audience: Audience | undefined = undefined;
  events: [Event, Audience][] | undefined = undefined;
  afterFns: (() => void)[] | undefined = undefined;
  attachment: StoredAttachment | undefined = undefined;
  upload: Upload | undefined = undefined;
  constructor(
    readonly action: string,
    /** Dropped once a deferred handler has returned (it read what it needed). */
    public data: D,
    readonly session: Session,
    readonly dispatcher: Dispatcher,
    readonly plain: boolean,
    /** Bytes of the frame it came from (Line.deferredBytes). */
    readonly size = 0,
  ) {
    super();
  }
  deferred(): Deferred {
    return this;
  }
  emit(ev: Event, audience: Audience): void {
    if (this.event === undefined) {
      this.event = ev;
      this.audience = audience;
    } else (this.events ??= []).push([ev, audience]);
  }
  after(fn: () => void): void {
    (this.afterFns ??= []).push(fn);
  }
}

// Shared stand-ins for a line's empty queues (never pushed to): an idle connection
// keeps no arrays.
const NO_ITEMS: Item[] = [];
/**
 * What a taken item's place in the inbox holds until the inbox empties: while a client
 * keeps it from emptying (requests arriving as fast as they are taken), the places
 * taken would otherwise keep every frame's data since it last did.
 */
const TAKEN: Item = { kind: "reject", action: "", code: Code.InvalidData, reason: "" };
/** Taken places past which the inbox is compacted (its array does not grow for good either). */
const TAKEN_COMPACT = 1024;
const NO_SLOTS: Slot[] = [];

/** Per-connection request state, kept on the Session (Session.line). */
class Line {
  inbox: Item[] = NO_ITEMS;
  head = 0;
  /** Frame bytes of the requests in `inbox` past `head`. */
  inboxBytes = 0;
  /** A handler (or an upload, or a wait) is in progress: the loop is parked. */
  busy = false;
  slots: Slot[] = NO_SLOTS;
  /** Deferred replies not yet settled, and their frames' bytes. */
  deferred = 0;
  deferredBytes = 0;
  /**
   * Parked until deferred replies settle: a request that is not pipelined waits for
   * none to be left, the bounds on deferred requests and on replies in line for half
   * (resumeAfterDeferred).
   */
  awaitingDeferred = false;
  badFrames = 0;
  badSince = 0;
  /** Set once the connection is to be closed: nothing more is read or queued. */
  closing = false;
  /** Past --bad-frame-limit or --rate-disconnect: the close was logged and counted (once). */
  doomed = false;
  /** The client half-closed: close once everything it sent is answered. */
  inputEnded = false;
  /** The last reply's events wait to go out (flushSlots): later replies wait for them. */
  eventsWaiting: Promise<void> | undefined = undefined;
  /** The request bytes of `slots` (bounded while eventsWaiting holds them: run). */
  slotBytes = 0;
  /** Token bucket of the request rate limit (RequestBudget). */
  tokens: number;
  tokensAt = clockMs();
  refused = 0;
  refusedSince = 0;
  constructor(burst: number) {
    this.tokens = burst;
  }
}

/**
 * A connection's request budget: a token bucket of `burst` requests refilled at `rate`
 * a second (lazily, from `tokensAt`, in ms), and the refusals counted within the
 * bad-frame window. A native or seed-door connection's is its Line; an HTTP socket's
 * (the HTTP port's routes, one request at a time on a kept-alive socket) is its own.
 */
export interface RequestBudget {
  tokens: number;
  tokensAt: number;
  refused: number;
  refusedSince: number;
}

/** A budget with its whole burst. */
export function fullBudget(config: Pick<Config, "burst">): RequestBudget {
  return { tokens: config.burst, tokensAt: clockMs(), refused: 0, refusedSince: 0 };
}

export type RateVerdict = "ok" | "refused" | "close";

/** What a request over the rate is told, in every door's shape. */
export const RATE_REFUSED = "too many requests; slow down and retry";
/** What the connection is told past --rate-disconnect refusals, before it is closed. */
export const RATE_CLOSING = "too many requests; closing the connection";

/**
 * One request against `b`: "ok" (taken), "refused" (answer 13 in the door's shape, do
 * not run it), or "close": more than --rate-disconnect refusals within
 * --bad-frame-window, so the connection is to be closed after its answers.
 */
export function takeRequest(b: RequestBudget, config: Pick<Config, "rate" | "burst" | "rateDisconnect" | "badFrameWindow">): RateVerdict {
  const { rate, burst, rateDisconnect, badFrameWindow } = config;
  const now = clockMs();
  b.tokens = Math.min(burst, b.tokens + ((now - b.tokensAt) * rate) / 1000);
  b.tokensAt = now;
  if (b.tokens >= 1) {
    b.tokens -= 1;
    return "ok";
  }
  if (now - b.refusedSince > badFrameWindow * 1000) {
    b.refusedSince = now;
    b.refused = 0;
  }
  return ++b.refused <= rateDisconnect ? "refused" : "close";
}

export class Dispatcher {
  private readonly actions = new Map<string, Action>();
  /** The common shapes actions declare (ActionSpec.fastFields), read by the scanner and by frame(). */
  readonly fastFrames = new FastShapes();
  /** Called when a connection closes (features clean up presence, router membership). */
  private readonly closeHooks: ((s: Session) => void)[] = [];
  private delivery: Delivery | undefined;
  /** Starts an upload for an attachment that came inline in its frame (see execute). */
  private newUpload: (() => Upload) | undefined;
  /** Handlers, uploads and deferred replies in progress, on every connection. */
  private active = 0;
  /** Cluster mode: only actions declared `cluster` are served. */
  clusterMode = false;

  /** Bytes of a connection's pipelined requests waiting for their commit (see DEFERRED_MAX). */
  private readonly deferredBytes: number;
  /** Connections closed for bad frames, logged once per address per window (refusal-log.ts). */
  private readonly badFramesLog: RefusalLog;
  private badFramesSwept = 0;

  constructor(
    private readonly config: Config,
    private readonly log: Logger,
    private readonly metrics: Metrics = new Metrics(),
  ) {
    this.deferredBytes = Math.min(INBOX_BYTES, Math.floor(config.outboundCap / 4));
    this.badFramesLog = new RefusalLog(log, 10_000, 4096, { one: "connection closed", many: "connections closed" });
  }

  /** Where events emitted by handlers go (the router). */
  route(delivery: Delivery): void {
    this.delivery = delivery;
  }

  register<D>(spec: ActionSpec<D>): void {
    if (this.actions.has(spec.name)) throw new Error(`action ${spec.name} registered twice`);
    const schema = spec.schema as { properties?: Record<string, unknown> };
    const withEnvelope = { ...schema, properties: { ...ENVELOPE, ...schema.properties } };
    this.actions.set(spec.name, {
      spec: spec as unknown as ActionSpec<unknown>,
      validate: compileSchema(withEnvelope),
      fastValid: spec.fastFields ? compileFastCheck(schema, spec.fastFields) : undefined,
    });
    if (spec.fastFields) this.fastFrames.add(spec.name, spec.fastFields);
    this.metrics.knowAction(spec.name);
  }

  /** Where an attachment that arrived inline (not streamed) is stored. */
  uploads(newUpload: () => Upload): void {
    this.newUpload = newUpload;
  }

  /** Whether the action takes a streamed field (the transport streams only for those). */
  streams(action: string): boolean {
    return (this.actions.get(action)?.spec.streams?.length ?? 0) > 0;
  }

  /** Every declared streamed field path (the scanner's configuration). */
  streamedPaths(): (readonly string[])[] {
    const paths: (readonly string[])[] = [];
    for (const { spec } of this.actions.values()) for (const p of spec.streams ?? []) paths.push(p);
    return paths;
  }

  onClose(fn: (s: Session) => void): void {
    this.closeHooks.push(fn);
  }

  actionNames(): string[] {
    return [...this.actions.keys()];
  }

  open(peer: Peer, codec: Codec): Session {
    const s = new Session(peer, codec, this.log);
    s.line = new Line(this.config.burst);
    return s;
  }

  close(s: Session): void {
    for (const fn of this.closeHooks) {
      try {
        fn(s);
      } catch (err) {
        s.log.error({ err }, "close hook failed");
      }
    }
  }

  /** Resolves once no connection has a request queued, running or awaiting its commit. */
  async settled(timeoutMs: number, sessions: Iterable<Session>): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    // Read once, walked at every check: an iterator (a Map's values()) walked again
    // would be empty, and the check would see only the connections it walked first.
    const all = [...sessions];
    const busy = () => {
      if (this.active > 0) return true;
      for (const s of all) {
        const line = (s.line as Line | undefined);
        // What an open connection has queued is still to be answered (a seed door's too).
        if (line && !s.peer.closed && (line.slots.length > 0 || line.head < line.inbox.length || line.eventsWaiting !== undefined || s.codec.pending === true)) return true;
      }
      return false;
    };
    while (busy()) {
      if (Date.now() > deadline) return false;
      await new Promise((r) => setTimeout(r, 10));
    }
    return true;
  }

  /** Requests the connection sent that are read and not answered yet (/connz). */
  unanswered(s: Session): number {
    const line = s.line as Line | undefined;
    return line ? line.inbox.length - line.head + line.slots.length : 0;
  }

  /** Nothing the connection sent is queued, running or waiting for its reply. */
  answered(s: Session): boolean {
    const line = s.line as Line | undefined;
    return !line || (!line.busy && line.slots.length === 0 && line.head >= line.inbox.length && line.deferred === 0);
  }

  /**
   * Resolves once no handler is running on any connection (closed ones included), so
   * that storage can close behind them; false at the timeout.
   */
  async idle(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.active > 0) {
      if (Date.now() > deadline) return false;
      await new Promise((r) => setTimeout(r, 10));
    }
    return true;
  }

  /** The client will send no more: answer what it sent, then close the connection. */
  inputEnded(s: Session): void {
    const line = (s.line as Line | undefined);
    if (!line) return;
    line.inputEnded = true;
    this.endIfDone(s, line);
  }

  /** Closes a half-closed connection once every request is answered and its events are out. */
  private endIfDone(s: Session, line: Line): void {
    if (line.inputEnded && !line.busy && line.slots.length === 0 && line.head >= line.inbox.length && line.eventsWaiting === undefined) s.peer.end();
  }

  /**
   * A complete native frame from the scanner: decode it and queue it in arrival
   * order. An attachment that streamed in with it comes as `upload`.
   */
  frame(s: Session, bytes: Buffer, upload?: Upload, ascii = false): void {
    if (!ascii && !isUtf8(bytes)) return this.refuseFrame(s, upload, "frame is not valid UTF-8", peekAction(bytes));
    // memchr over the frame: a few ns, and the message record is then joined, not stringified.
    const plain = bytes.indexOf(0x5c) === -1;
    let msg: unknown;
    try {
      msg = decodeFrame(bytes, ascii, plain, this.fastFrames);
    } catch {
      return this.refuseFrame(s, upload, "frame is not valid JSON", peekAction(bytes));
    }
    if (typeof msg !== "object" || msg === null || Array.isArray(msg)) {
      return this.refuseFrame(s, upload, "frame must be a JSON object", undefined);
    }
    const { action, data } = msg as { action?: unknown; data?: unknown };
    if (typeof action !== "string" || action === "") return this.refuseFrame(s, upload, "frame has no 'action' string", undefined);
    this.dispatch(s, action, data, upload, bytes.length, plain);
  }

  /**
   * A frame of a declared common shape, decoded by the scanner where it lay
   * (FastShapes.read): `{action, data}` of plain strings, no attachment.
   */
  decoded(s: Session, msg: unknown, size: number): void {
    const { action, data } = msg as { action: string; data: Record<string, string> };
    this.dispatch(s, action, data, undefined, size, true, true, true);
  }

  private refuseFrame(s: Session, upload: Upload | undefined, reason: string, action: string | undefined): void {
    upload?.release();
    this.reject(s, Code.InvalidData, reason, action);
  }

  /**
   * A decoded request: `data` is anything the client sent (checked here). `counted`
   * false: the front has counted it against the rate already (a seed door counts each
   * of its frames once, not the native requests it makes for one).
   */
  dispatch(s: Session, action: string, data: unknown, upload?: Upload, size = 0, plain = false, counted = true, fast = false): void {
    // The rate first: a frame refused for its shape costs a parse and a reply too.
    if (counted && !this.withinRate(s)) {
      upload?.release();
      this.enqueue(s, { kind: "reject", action, code: Code.RateLimited, reason: RATE_REFUSED });
      return;
    }
    if (data !== undefined && (typeof data !== "object" || data === null || Array.isArray(data))) {
      upload?.release();
      this.enqueue(s, { kind: "reject", action, code: Code.InvalidData, reason: "'data' must be an object" });
      return;
    }
    this.enqueue(s, { kind: "request", action, data: (data ?? {}) as Record<string, unknown>, upload, size, plain, paced: counted, fast });
  }

  /**
   * The per-connection token bucket: `rate` requests a second, `burst` at once. A
   * request over it is answered 13 and not run; a client that keeps going past
   * `rateDisconnect` refusals within the window is closed.
   */
  private withinRate(s: Session): boolean {
    const line = s.line as Line;
    const verdict = this.rate(s, line);
    if (verdict === "close" && !line.closing) {
      this.enqueue(s, { kind: "reject", action: "unknown", code: Code.RateLimited, reason: RATE_CLOSING, last: true });
      line.closing = true;
      s.peer.pause("closing");
    }
    return verdict === "ok";
  }

  /** One request against the token bucket: taken, refused, or refused far past the limit (logged and counted once). */
  private rate(s: Session, line: Line): "ok" | "refused" | "close" {
    const verdict = takeRequest(line, this.config);
    if (verdict !== "close") return verdict;
    if (!line.doomed) {
      line.doomed = true;
      this.metrics.closes.rate_limit++;
      s.log.warn({ refused: line.refused }, "request rate far over the limit; closing");
    }
    return "close";
  }

  /**
   * A request a front answers itself (a seed door's frame), against the connection's
   * request rate as the native door's requests are: "ok"; "refused" (the front answers
   * it 13 in its own shape); "close", past --rate-disconnect (logged and counted here:
   * the front answers what it owes, then its notice, then closes the connection).
   */
  rated(s: Session): "ok" | "refused" | "close" {
    const line = s.line as Line | undefined;
    if (!line) return "ok";
    const verdict = this.rate(s, line);
    if (verdict !== "ok") this.metrics.request("unknown", Code.RateLimited);
    return verdict;
  }

  /** One more bad frame; true past --bad-frame-limit (the close logged and counted once). */
  private overBadFrames(s: Session, line: Line): boolean {
    const now = Date.now();
    if (now - line.badSince > this.config.badFrameWindow * 1000) {
      line.badSince = now;
      line.badFrames = 0;
    }
    if (++line.badFrames <= this.config.badFrameLimit) return false;
    if (!line.doomed) {
      line.doomed = true;
      this.metrics.closes.bad_frames++;
      // One line per address per 10 s (the rest counted in its next): a client that
      // opened 26,744 connections in 10 s, each closed for garbage, wrote 4.1 MB of log.
      if (now - this.badFramesSwept >= 10_000) {
        this.badFramesSwept = now;
        this.badFramesLog.sweep(now);
      }
      this.badFramesLog.refused(s.peer.address, "too many bad frames", this.config.badFrameLimit);
    }
    return true;
  }

  /**
   * Bytes the scanner or decoder could not accept: one error reply, in order. A frame
   * the scanner shed for --max-partial-input (13) is the server's doing, not a bad
   * frame: it does not count toward --bad-frame-limit.
   */
  reject(s: Session, code: Code, reason: string, action: string | undefined): void {
    const line = (s.line as Line | undefined);
    if (!line) return;
    if (code !== Code.RateLimited && this.overBadFrames(s, line)) {
      if (line.closing) return;
      // The notice waits behind the replies already owed, then the connection ends.
      this.enqueue(s, { kind: "reject", action: "unknown", code, reason: "too many bad frames; closing the connection", last: true });
      line.closing = true;
      s.peer.pause("closing");
      return;
    }
    this.enqueue(s, { kind: "reject", action: action ?? "unknown", code, reason });
  }

  /**
   * A bad frame a front answers itself (a seed door), counted as reject() counts them;
   * true when it takes the connection past --bad-frame-limit (logged and counted here:
   * the front answers what it owes, then its notice, then closes the connection).
   */
  badFrame(s: Session, code: Code): boolean {
    const line = s.line as Line | undefined;
    if (!line) return false;
    this.metrics.request("unknown", code);
    return this.overBadFrames(s, line);
  }

  private enqueue(s: Session, item: Item): void {
    const line = (s.line as Line | undefined);
    if (!line || (line.closing && !(item.kind === "reject" && item.last)) || s.peer.closed) {
      if (item.kind === "request") item.upload?.release();
      return;
    }
    if (line.inbox === NO_ITEMS) line.inbox = [];
    line.inbox.push(item);
    if (item.kind === "request") line.inboxBytes += item.size;
    if (line.inbox.length - line.head > INBOX_LIMIT || line.inboxBytes > INBOX_BYTES) s.peer.pause("inbox");
    if (!line.busy && !line.awaitingDeferred) this.run(s, line);
  }

  /** Runs queued requests until one has to wait (a promise, a commit, a full socket). */
  private run(s: Session, line: Line): void {
    // A closed connection can be sent nothing more: what it queued is dropped, not run
    // (at shutdown, storage may be closing behind it).
    if (s.peer.closed) return this.drop(line);
    while (line.head < line.inbox.length && !line.busy && !line.awaitingDeferred) {
      // Closed by what just ran (quit, a last reply): the rest is not run either.
      if (s.peer.closed) {
        this.drop(line);
        break;
      }
      // A seed door's call (not paced) runs whatever the socket holds: the rooms door's
      // CREATE_ROOM waited here inside its lock of the two users while the caller did
      // not read, and the other user's CREATE_ROOM with them waited on that lock, with
      // every frame behind it on their connection (a review froze one that way).
      const next = line.inbox[line.head];
      if (s.peer.congested && !s.peer.closed && !(next.kind === "request" && !next.paced)) {
        line.busy = true;
        void s.peer.drained().then(() => {
          line.busy = false;
          this.run(s, line);
        });
        return;
      }
      // Behind a reply whose events wait (a channel's members being read), the replies
      // that follow wait in `slots`, each with its request and its events (a message's
      // record): at most DEFERRED_MAX of them, or deferredBytes of their requests, then
      // the line waits too. Unbounded, a connection streaming messages behind one such
      // event held its upload speed times the read, and the turn that let them go sent
      // their recipients past the outbound cap at once.
      if (line.eventsWaiting !== undefined && (line.slots.length >= DEFERRED_MAX || line.slotBytes >= this.deferredBytes)) {
        line.busy = true;
        void line.eventsWaiting.then(() => {
          line.busy = false;
          this.run(s, line);
        });
        return;
      }
      // Behind a reply that waits (a message's commit; in cluster mode, the log), at
      // most DEFERRED_MAX replies wait in line, then the line waits for the first. In
      // cluster mode nothing else bounds them: messages are not held to DEFERRED_MAX
      // there (the log bounds its bytes, and answers 16 at once past them), and those
      // answered at once keep their places behind the one still waiting. During a
      // 10 s stall of the engine one connection at the request rate queued ~60,000.
      if (line.deferred > 0 && line.slots.length >= DEFERRED_MAX) {
        line.awaitingDeferred = true;
        return;
      }
      const item = line.inbox[line.head];
      if (
        item.kind === "request" &&
        line.deferred > 0 &&
        ((!this.clusterMode && (line.deferred >= DEFERRED_MAX || line.deferredBytes >= this.deferredBytes)) || !this.actions.get(item.action)?.spec.pipelined)
      ) {
        line.awaitingDeferred = true;
        return;
      }
      line.inbox[line.head++] = TAKEN;
      if (item.kind === "request") line.inboxBytes -= item.size;
      if (line.head === line.inbox.length) {
        line.inbox = NO_ITEMS;
        line.head = 0;
      } else if (line.head >= TAKEN_COMPACT) {
        line.inbox.splice(0, line.head);
        line.head = 0;
      }
      if (line.inbox.length - line.head <= INBOX_LIMIT / 2 && line.inboxBytes <= INBOX_BYTES / 2) s.peer.resume("inbox");
      // A request is its own place in the line of replies.
      const slot = item.kind === "request" ? new RequestImpl(item.action, item.data, s, this, item.plain, item.size) : new Slot();
      if (line.slots === NO_SLOTS) line.slots = [];
      line.slots.push(slot);
      if (item.kind === "request") line.slotBytes += item.size;
      this.execute(s, line, item, slot);
    }
    this.endIfDone(s, line);
  }

  private drop(line: Line): void {
    for (let i = line.head; i < line.inbox.length; i++) {
      const item = line.inbox[i];
      if (item.kind === "request") item.upload?.release();
    }
    line.inbox = NO_ITEMS;
    line.head = 0;
  }

  private execute(s: Session, line: Line, item: Item, slot: Slot): void {
    if (item.kind === "reject") {
      slot.last = item.last === true;
      this.fill(s, line, slot, this.errorFrame(s, item.action, item.code, item.reason));
      return;
    }
    const { action, data } = item;
    const entry = this.actions.get(action);
    let refusal: ProtocolError | undefined;
    try {
      refusal = !entry
        ? new ProtocolError(Code.UnknownAction, `unknown action '${action}'`)
        : this.clusterMode && !entry.spec.cluster
          ? new ProtocolError(Code.Unavailable, `'${action}' is not available in cluster mode yet`)
          : (this.gate(s, entry.spec, data) ?? (item.fast && entry.fastValid?.(data as Record<string, string>) ? undefined : entry.validate(data)));
    } catch (err) {
      item.upload?.release();
      this.fill(s, line, slot, this.failure(s, action, err));
      return;
    }
    if (refusal || !entry) {
      item.upload?.release();
      this.fill(s, line, slot, this.errorFrame(s, action, (refusal as ProtocolError).code, (refusal as ProtocolError).message));
      return;
    }
    let upload = item.upload;
    if (upload && !entry.spec.streams) {
      // The frame named a streaming action first and another one last (a duplicate key).
      upload.release();
      this.fill(s, line, slot, this.errorFrame(s, action, Code.InvalidData, `'${action}' takes no attachment`));
      return;
    }
    if (upload && !entry.spec.streams?.some((p) => valueAt(p, data) === "")) {
      // Streamed from a `data` that a later duplicate key replaced: the request as
      // parsed (the last key wins) holds no attachment, so none may be stored with it.
      upload.release();
      this.fill(s, line, slot, this.errorFrame(s, action, Code.InvalidData, "the attachment is not in the frame's final 'data' (a key given twice)"));
      return;
    }
    // The transport streams an attachment only for a logged-in connection; one that was
    // sent right behind its auth came inline, within the frame limit: store it now.
    if (!upload && entry.spec.streams) item.upload = upload = this.inlineUpload(entry.spec.streams, data);
    if (upload) {
      line.busy = true;
      this.active++;
      upload.finish().then(
        (attachment) => {
          line.busy = false;
          this.active--;
          this.handle(s, line, entry, item, slot, attachment);
          this.run(s, line);
        },
        (err) => {
          line.busy = false;
          this.active--;
          upload.release();
          const fault = (err as { fault?: string }).fault;
          if (fault === "invalid" || fault === "too-large" || fault === "busy") {
            const code = fault === "invalid" ? Code.InvalidData : fault === "too-large" ? Code.TooLarge : Code.RateLimited;
            this.fill(s, line, slot, this.errorFrame(s, action, code, (err as Error).message));
          } else {
            // An I/O failure: its text names files; the client gets a fixed one.
            s.log.warn({ err }, "attachment upload failed");
            this.fill(s, line, slot, this.errorFrame(s, action, Code.Unavailable, "the attachment could not be stored; nothing was changed"));
          }
          this.run(s, line);
        },
      );
      return;
    }
    this.handle(s, line, entry, item, slot, undefined);
  }

  /** The first non-empty string at one of `paths` in `data`, moved into a new upload. */
  private inlineUpload(paths: readonly (readonly string[])[], data: Record<string, unknown>): Upload | undefined {
    if (!this.newUpload) return undefined;
    for (const p of paths) {
      // Paths start at the frame's "data" (ActionSpec.streams); walked without allocating,
      // since every message passes here.
      const parent = parentAt(p, data);
      if (parent === undefined) continue;
      const last = p[p.length - 1];
      const text = parent[last];
      if (typeof text !== "string" || text === "") continue;
      const up = this.newUpload();
      // UTF-8: a character outside base64's alphabet stays invalid as bytes.
      up.write(Buffer.from(text, "utf8"));
      (parent as Record<string, unknown>)[last] = "";
      return up;
    }
    return undefined;
  }

  private handle(
    s: Session,
    line: Line,
    entry: Action,
    item: Item & { kind: "request" },
    slot: Slot,
    attachment: StoredAttachment | undefined,
  ): void {
    const { action, upload } = item;
    const req = slot as RequestImpl<unknown>;
    req.attachment = attachment;
    let result: Promise<Result> | Result;
    try {
      result = entry.spec.handle(req as RequestImpl<never>);
    } catch (err) {
      upload?.release();
      this.fail(s, line, slot, action, err);
      return;
    }
    if (result instanceof Deferred) {
      this.deferredReply(s, line, req, action, result, upload);
    } else if (result instanceof Promise) {
      line.busy = true;
      this.active++;
      result.then(
        (r) => {
          line.busy = false;
          this.active--;
          if (r instanceof Deferred) this.deferredReply(s, line, req, action, r, upload);
          else {
            upload?.release();
            this.fill(s, line, slot, this.encode(s, action, r));
          }
          this.run(s, line);
        },
        (err) => {
          line.busy = false;
          this.active--;
          upload?.release();
          this.fail(s, line, slot, action, err);
          this.run(s, line);
        },
      );
    } else {
      upload?.release();
      this.fill(s, line, slot, this.encode(s, action, result));
    }
  }

  private deferredReply(s: Session, line: Line, slot: RequestImpl<unknown>, action: string, d: Deferred, upload: Upload | undefined): void {
    line.deferred++;
    const { size } = slot;
    line.deferredBytes += size;
    this.active++;
    if (d === slot) {
      // The request is its own Deferred: no closure, and what the handler read is let go.
      const req = slot;
      req.upload = upload;
      req.data = undefined;
      if (d.settled) this.deferredSettled(req, d.reply, d.err);
      else d.settle = settleRequest;
      return;
    }
    const settle = (reply: ReplyBody | undefined, err: unknown) => {
      line.deferred--;
      line.deferredBytes -= size;
      this.active--;
      letGo(upload, err);
      if (err === undefined) this.fill(s, line, slot, this.encode(s, action, reply as ReplyBody));
      else this.fail(s, line, slot, action, err);
      this.resumeAfterDeferred(s, line);
    };
    if (d.settled) settle(d.reply, d.err);
    else d.settle = settle;
  }

  /** A request that was its own Deferred is settled. */
  deferredSettled(req: RequestImpl<unknown>, reply: ReplyBody | undefined, err: unknown): void {
    const s = req.session;
    const line = s.line as Line;
    line.deferred--;
    line.deferredBytes -= req.size;
    this.active--;
    letGo(req.upload, err);
    // Answered: the slot may wait in line behind earlier requests holding only its frame.
    req.reply = undefined;
    req.err = undefined;
    // (fill's flushSlots resumes the line if this made room: resumeAfterDeferred.)
    if (err === undefined) this.fill(s, line, req, this.encode(s, req.action, reply as ReplyBody));
    else this.fail(s, line, req, req.action, err);
  }

  /** Called whenever replies have gone out or a deferred one settled (flushSlots). */
  private resumeAfterDeferred(s: Session, line: Line): void {
    if (!line.awaitingDeferred || line.slots.length > DEFERRED_MAX / 2) return;
    // (A request that is not pipelined parks again at once until none is left.)
    if (line.deferred === 0 || this.clusterMode || (line.deferred <= DEFERRED_MAX / 2 && line.deferredBytes <= this.deferredBytes / 2)) {
      line.awaitingDeferred = false;
      this.run(s, line);
    }
  }

  /** A failed request: its reply is the error, and its events and follow-ups are dropped. */
  private fail(s: Session, line: Line, slot: Slot, action: string, err: unknown): void {
    slot.failed = true;
    this.fill(s, line, slot, this.failure(s, action, err));
  }

  /** Every error reply the dispatcher makes: counted by action and code. */
  private errorFrame(s: Session, action: string, code: Code, reason: string): OutFrame {
    this.metrics.request(action, code);
    return s.codec.error(action, code, reason);
  }

  private encode(s: Session, action: string, body: ReplyBody): OutFrame {
    try {
      const out = s.codec.reply(action, body);
      this.metrics.request(action, Code.OK);
      return out;
    } catch (err) {
      return this.failure(s, action, err);
    }
  }

  /** Auth and cid/sid checks that precede validation (cid/sid types: ENVELOPE). */
  private gate(s: Session, spec: ActionSpec<unknown>, data: Record<string, unknown>): ProtocolError | undefined {
    if (!spec.public && s.uid === undefined) {
      return new ProtocolError(Code.NeedAuth, `'${spec.name}' needs an authenticated session`);
    }
    // The seed's clients send cid and sid with every request. `auth` takes sid as its
    // credential, and before login a public action (hello, register, …) has no session
    // to compare them with, so those are exempt.
    if (spec.name === "auth" || (spec.public && s.uid === undefined)) return undefined;
    const { cid, sid } = data;
    if (cid !== undefined && cid !== null && (typeof cid === "string" || typeof cid === "number") && String(cid) !== s.uid) {
      return new ProtocolError(Code.NeedAuth, "'cid' is not this connection's user");
    }
    if (sid !== undefined && sid !== null && typeof sid === "string" && sid !== s.sid) {
      return new ProtocolError(Code.NeedAuth, "'sid' is not this connection's session");
    }
    return undefined;
  }

  private failure(s: Session, action: string, err: unknown): OutFrame {
    if (err instanceof ProtocolError) return this.errorFrame(s, action, err.code, err.message);
    s.log.error({ err, action }, "request failed");
    return this.errorFrame(s, action, Code.Unavailable, "the server could not complete the request; nothing was changed");
  }

  /** Routes a request's event; the promise when it waits behind its channel's (see Delivery). */
  private publish(s: Session, ev: Event, audience: Audience): Promise<void> | undefined {
    try {
      return (this.delivery as Delivery).publish(ev, audience) ?? undefined;
    } catch (err) {
      s.log.error({ err }, "routing an event failed");
      return undefined;
    }
  }

  private fill(s: Session, line: Line, slot: Slot, out: OutFrame): void {
    slot.frame = out;
    this.flushSlots(s, line);
  }

  /**
   * Sends the replies that are ready, in order, each followed by its request's events.
   * Behind a reply whose events wait (a channel's members being read: Delivery), the
   * next reply waits too: an event a request causes comes right after its reply.
   */
  private flushSlots(s: Session, line: Line): void {
    const slots = line.slots;
    while (line.eventsWaiting === undefined && slots.length > 0 && slots[0].frame !== undefined) {
      const done = slots.shift() as Slot;
      if (done instanceof RequestImpl) line.slotBytes -= done.size;
      s.peer.send(done.frame as OutFrame, false);
      if (done instanceof RequestImpl && !done.failed) {
        const req = done;
        if (req.event && this.delivery) {
          let waits = this.publish(s, req.event, req.audience as Audience);
          if (req.events) {
            for (const [ev, audience] of req.events) {
              const w = this.publish(s, ev, audience);
              if (w) waits = waits ? Promise.all([waits, w]).then(() => {}) : w;
            }
          }
          if (waits) {
            line.eventsWaiting = waits;
            void waits.then(() => {
              line.eventsWaiting = undefined;
              this.flushSlots(s, line);
            });
          }
        }
        if (req.afterFns) {
          for (const fn of req.afterFns) {
            try {
              fn();
            } catch (err) {
              s.log.error({ err }, "after-reply step failed");
            }
          }
        }
      }
      if (done.last) s.peer.end();
    }
    if (slots.length === 0) line.slots = NO_SLOTS;
    this.resumeAfterDeferred(s, line);
    this.endIfDone(s, line);
  }
}

/**
 * A deferred request's upload, once it is answered: released, or kept when the request
 * failed for a reason other than a refusal (its batch's write failed: whether the
 * message is on disk is not known until the database is opened again, and a message
 * that is must not lose its attachment).
 */
function letGo(upload: Upload | undefined, err: unknown): void {
  if (upload === undefined) return;
  if (err !== undefined && !(err instanceof ProtocolError)) upload.keep();
  else upload.release();
}

/**
 * The object holding a stream path's last key (ActionSpec.streams: from the frame's
 * "data") in `data`, when it has that key. Walked without allocating: every message
 * passes here.
 */
function parentAt(p: readonly string[], data: unknown): Record<string, unknown> | undefined {
  if (p[0] !== "data" || p.length < 2) return undefined;
  let v = data;
  for (let i = 1; i < p.length; i++) {
    if (v === null || typeof v !== "object" || !Object.hasOwn(v, p[i])) return undefined;
    if (i === p.length - 1) return v as Record<string, unknown>;
    v = (v as Record<string, unknown>)[p[i]];
  }
  return undefined;
}

/** The value at a stream path in `data`, if there is one. */
function valueAt(p: readonly string[], data: unknown): unknown {
  return parentAt(p, data)?.[p[p.length - 1]];
}
