// A typed client for wirechat's native protocol (PROTOCOL.md): one TCP or TLS
// connection, NDJSON frames, requests answered in order, events in between.
//
// Matching replies to requests. The protocol has no request id: `cid` in a request is
// the sender's own uid (§3 "cid and sid in requests"), and anything else there is
// refused with status 6. What it guarantees instead is that every request gets exactly
// one reply, in the order the requests arrived (§3 "Ordering"), and that replies are
// the only frames whose action is not `ev_*` (apart from the welcome frame, the `auth`
// frame after a successful `register`, and the final `unknown` notice before the
// server drops a connection). So the client keeps the requests it has written in a
// FIFO and gives each non-event frame to the oldest one, checking the action names
// agree. Writes are serialized through one outbox so the FIFO order is the wire order,
// which matters most while an attachment is being streamed: no other frame may be
// written into the middle of it.

import { EventEmitter, once } from "node:events";
import { randomUUID } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import net from "node:net";
import tls from "node:tls";
import type { Readable } from "node:stream";
import { base64Chunks } from "./attach.js";
import { ClientCode, WirechatError } from "./errors.js";
import { LineTooLongError, NdjsonSplitter } from "./ndjson.js";
import type {
  AuthInfo,
  ChannelInfo,
  ChannelMember,
  Contact,
  HelloInfo,
  HistoryMessage,
  MessageEvent,
  Reply,
  ReplyData,
  Target,
  WelcomeFrame,
  WirechatEvent,
} from "./types.js";

export * from "./types.js";
export { ClientCode, StatusName, WirechatError } from "./errors.js";
export { NdjsonSplitter, LineTooLongError } from "./ndjson.js";
export { base64Chunks, base64DecodedLength, bufferSource, decodeAttachment, hasAttachment, saveAttachment } from "./attach.js";

export interface TlsOptions {
  /** PEM of the CA (or self-signed certificate) to trust; the system's CAs otherwise. */
  ca?: string | Buffer | Array<string | Buffer>;
  servername?: string;
  rejectUnauthorized?: boolean;
}

export interface ReconnectOptions {
  /** First delay before a reconnect attempt; doubles with every failed attempt. */
  minMs?: number;
  /** Cap on the delay. */
  maxMs?: number;
  /** Give up (and emit `close`) after this many failed attempts in a row. */
  maxAttempts?: number;
}

export interface ConnectOptions {
  host?: string;
  port?: number;
  /**
   * The nodes of a cluster (README, Cluster mode), instead of `host` and `port`: connect()
   * tries them in order until one answers, and each reconnect attempt goes to the next
   * one, so a client whose node dies resumes its session on another (with `reconnect`).
   */
  servers?: { host?: string; port?: number }[];
  /** `true` for TLS with the system's CAs, or the options for it. */
  tls?: boolean | TlsOptions;
  /**
   * Reconnect after the connection is lost, with exponential backoff and jitter, and
   * resume the session (`auth {sid, since}`). Off by default. `true` means
   * `{minMs: 250, maxMs: 30000}`.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * Opt in to acknowledgements (`hello {ack:true}`) and acknowledge every inbox
   * message once the `ev_message` listeners have run. Default true. `"manual"`: opt in,
   * but acknowledge only as far as the app says with `ack(mid)`, once it has done
   * what it does with a message (stored it, shown it): one handed out and not yet
   * acknowledged by the app comes again at the next login without `since` (at least
   * once), and `lastInboxMid` stays at the last one the app acknowledged.
   */
  ack?: boolean | "manual";
  /** Default per-request timeout. Default 30 s; 0 disables it. */
  requestTimeoutMs?: number;
  /** How long connecting (TCP, TLS and the welcome frame) may take. Default 10 s. */
  connectTimeoutMs?: number;
  /**
   * Send a `ping` after this long without writing anything (the server closes idle
   * connections); one without a reply within the request timeout ends the connection
   * (then `reconnect` applies). 0 (default) disables it.
   */
  keepAliveMs?: number;
  /** Per-iterator buffer of `events()`, in events. Default 10,000. */
  eventBufferSize?: number;
  /**
   * And in characters of message text and attachment data (a 64 MiB attachment is ~90 M
   * of base64): past either bound the oldest buffered events are dropped. Default 256 Mi.
   */
  eventBufferChars?: number;
  /**
   * Largest frame accepted from the server; a longer one ends the connection. Default
   * 128 MiB (a 64 MiB attachment is ~90 MB of base64). A `history` reply carries every
   * attachment of its page inline: ask for pages small enough, or raise this (the
   * server cuts a page at its outbound cap, 8 MiB by default, past its first message;
   * latest() asks for pages of up to 500). Set below the largest message a user may be
   * sent, that message ends every connection it is sent on: with `reconnect`, once
   * three connections in a row have ended that way the client stops (`close`, with the
   * error) rather than reconnect for it for ever.
   */
  maxFrameBytes?: number;
  /** The last inbox mid this client already has (from a previous run), used as `since`. */
  since?: string;
  /** Sent in `hello` as `client`. */
  clientName?: string;
}

export interface RequestOptions {
  /** Overrides the client's default timeout for this request; 0 disables it. */
  timeoutMs?: number;
}

export interface SendAttachmentOptions extends RequestOptions {
  mime?: string;
  body?: string;
  cmid?: string;
  /** Called after each chunk is handed to the socket: bytes of the file sent so far, and its size if known. */
  onProgress?: (sentBytes: number, totalBytes: number | undefined) => void;
  /** Size of the file reads; a multiple of 3 keeps every chunk whole base64. Default 48 KiB. */
  chunkBytes?: number;
  /** Size of a Readable source, for progress (a file path's size is read from disk). */
  size?: number;
}

/** Events of the client's EventEmitter. Every `ev_*` frame is also emitted under its own action name. */
export interface ClientEvents {
  /** Every event frame (`ev_*`), as `{action, data}`. */
  event: [WirechatEvent];
  ev_message: [MessageEvent];
  /** The connection was lost; a reconnect follows if enabled. */
  disconnect: [Error | undefined];
  /** A reconnect attempt is scheduled. */
  reconnecting: [{ attempt: number; delayMs: number }];
  /** Connected again, and the session (if any) resumed. */
  reconnect: [{ attempts: number; auth: AuthInfo | undefined }];
  /** The client is closed for good (close(), or the connection lost without reconnect). */
  close: [Error | undefined];
  /** An `unknown` frame: the server's notice before it drops the connection (rate limit, bad frames). */
  notice: [ReplyData];
  /** An `events()` iterator dropped its oldest buffered events because it was full. */
  overflow: [{ dropped: number }];
  [ev: `ev_${string}`]: [any];
}

type State = "open" | "resuming" | "reconnecting" | "closed";

interface Pending {
  action: string;
  resolve: (d: ReplyData) => void;
  reject: (e: WirechatError) => void;
  timer: NodeJS.Timeout | undefined;
  /** Already rejected (timed out): its reply, when it comes, is only consumed. */
  settled: boolean;
  /** The `register` reply came with status 0; the unsolicited `auth` frame completes it. */
  awaitingAuthFrame: boolean;
  /** An error to report instead of the reply (an attachment source that failed mid-frame). */
  failure: WirechatError | undefined;
  internal: boolean;
  timeoutMs: number;
  /**
   * A `message` with a `cmid`: its frame, written again on the next connection when
   * this one is lost before the reply (the server answers a resent cmid with the
   * first's mid and stores nothing new), so it is neither lost nor sent twice, and it
   * keeps its place before the requests that came after it.
   */
  resend?: string;
  /** Written again on a later connection (see resend); its reply says so (`resent`). */
  resent?: boolean;
}

/** Something to write: a whole frame, or a frame streamed by `run`. */
interface OutItem {
  pending: Pending;
  text?: string;
  run?: (socket: net.Socket) => Promise<void>;
}

/** eventBufferChars' default: 256 Mi characters (two 64 MiB attachments' base64, and then some). */
const DEFAULT_BUFFER_CHARS = 256 * 1024 * 1024;

/** What request() sends as an action (the server's actions are all of this form). */
const ACTION_NAME = /^[A-Za-z0-9_]{1,64}$/;

/** What an event weighs against eventBufferChars: its text and attachment data, and a little for the rest. */
function eventWeight(ev: WirechatEvent): number {
  const d = ev.data as { body?: unknown; attach?: { data?: unknown } } | undefined;
  const body = typeof d?.body === "string" ? d.body.length : 0;
  const data = typeof d?.attach?.data === "string" ? d.attach.data.length : 0;
  return 256 + body + data;
}

class EventIterator implements AsyncIterableIterator<WirechatEvent> {
  private buf: (WirechatEvent | undefined)[] = [];
  /** The inbox mid of each buffered event that is an inbox message (aligned with buf). */
  private mids: (bigint | undefined)[] = [];
  private head = 0;
  /** Buffered inbox messages (not yet handed out). */
  private inboxBuffered = 0;
  /** next() calls waiting for an event, oldest first (each gets its own). */
  private waiters: ((r: IteratorResult<WirechatEvent>) => void)[] = [];
  private done = false;
  dropped = 0;
  /** Characters of text and attachment data buffered (eventWeight), against capChars. */
  private chars = 0;

  constructor(
    private readonly cap: number,
    private readonly capChars: number,
    private readonly onDone: (it: EventIterator) => void,
    /** Events were dropped (`reported`: an overflow, told to the app), the oldest inbox one `inboxMid`. */
    private readonly onOverflow: (dropped: number, inboxMid: bigint | undefined, reported?: boolean) => void,
    /** An inbox message was handed to the app (acks may go further). */
    private readonly onHanded: () => void,
  ) {}

  /** `inboxMid`: the event is an inbox message (acknowledged once handed out). */
  push(ev: WirechatEvent, inboxMid?: bigint): void {
    if (this.done) return;
    if (this.waiters.length > 0) {
      const w = this.waiters.shift() as (r: IteratorResult<WirechatEvent>) => void;
      w({ value: ev, done: false });
      return;
    }
    const weight = eventWeight(ev);
    while (this.head < this.buf.length && (this.buf.length - this.head >= this.cap || this.chars + weight > this.capChars)) {
      // Drop-oldest rather than backpressure: pausing the socket would also hold back
      // replies, and a consumer that awaits a request inside its `for await` loop would
      // then wait forever for a reply stuck behind its own unread events.
      const mid = this.mids[this.head];
      if (mid !== undefined) this.inboxBuffered--;
      this.chars -= eventWeight(this.buf[this.head] as WirechatEvent);
      this.buf[this.head] = this.mids[this.head] = undefined;
      this.head++;
      this.dropped++;
      this.onOverflow(this.dropped, mid);
    }
    this.buf.push(ev);
    this.mids.push(inboxMid);
    this.chars += weight;
    if (inboxMid !== undefined) this.inboxBuffered++;
    if (this.head > 1024 && this.head * 2 > this.buf.length) {
      this.buf = this.buf.slice(this.head);
      this.mids = this.mids.slice(this.head);
      this.head = 0;
    }
  }

  /** Takes everything buffered, in order, with each inbox message's mid (no waiter involved). */
  drain(): [WirechatEvent, bigint | undefined][] {
    const out: [WirechatEvent, bigint | undefined][] = [];
    for (let i = this.head; i < this.buf.length; i++) out.push([this.buf[i] as WirechatEvent, this.mids[i]]);
    this.buf = [];
    this.mids = [];
    this.head = 0;
    this.inboxBuffered = 0;
    this.chars = 0;
    return out;
  }

  /** The oldest inbox mid buffered here, not yet handed out (acks stop below it). */
  oldestInbox(): bigint | undefined {
    if (this.inboxBuffered === 0) return undefined;
    for (let i = this.head; i < this.mids.length; i++) if (this.mids[i] !== undefined) return this.mids[i];
    return undefined;
  }

  end(): void {
    if (this.done) return;
    this.done = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined, done: true });
  }

  next(): Promise<IteratorResult<WirechatEvent>> {
    if (this.head < this.buf.length) {
      const value = this.buf[this.head] as WirechatEvent;
      const mid = this.mids[this.head];
      this.chars -= eventWeight(value);
      // Handed out: not kept (an event may carry a large attachment's text).
      this.buf[this.head] = this.mids[this.head] = undefined;
      this.head++;
      if (this.head === this.buf.length) {
        this.buf = [];
        this.mids = [];
        this.head = 0;
      }
      if (mid !== undefined) {
        this.inboxBuffered--;
        this.onHanded();
      }
      return Promise.resolve({ value, done: false });
    }
    if (this.done) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  return(): Promise<IteratorResult<WirechatEvent>> {
    // The inbox messages it still held never reach the app: as dropped (not acked).
    const held = this.oldestInbox();
    if (held !== undefined) this.onOverflow(this.dropped, held, false);
    this.buf = [];
    this.mids = [];
    this.inboxBuffered = 0;
    this.head = 0;
    this.end();
    this.onDone(this);
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<WirechatEvent> {
    return this;
  }
}

const DEFAULT_TIMEOUT_MS = 30_000;
/** Connections in a row a frame over maxFrameBytes may end before the client stops reconnecting. */
const TOO_LONG_MAX = 3;

export class WirechatClient extends EventEmitter<ClientEvents> {
  /** The welcome frame of the current connection. */
  welcome: WelcomeFrame | undefined;
  /** The reply to the last `hello`. */
  helloInfo: HelloInfo | undefined;
  uid: string | undefined;
  sid: string | undefined;
  nick: string | undefined;
  /** Direct messages to this user seen twice (after a reconnect) and not passed on. */
  duplicatesDropped = 0;

  private state: State = "closed";
  private socket: net.Socket | undefined;
  private splitter: NdjsonSplitter;
  private inflight: Pending[] = [];
  private inflightHead = 0;
  private outbox: OutItem[] = [];
  /** The socket the write loop is writing to (see pump). */
  private pumping: net.Socket | undefined;
  /** User requests made while the connection is being re-established. */
  private held: OutItem[] = [];
  /** When `held` is next pruned of settled items (see request). */
  private heldPruneAt = HELD_PRUNE_MIN;
  private iterators = new Set<EventIterator>();
  /**
   * An events() iterator dropped an inbox message (overflow): acks stop below it, and
   * the next auth or resume asks again from there (everything after it comes again).
   */
  private dropFloor: bigint | undefined;
  /**
   * Inbox messages that came while nothing took events (no iterator, no "event" or
   * "ev_message" listener), kept for the first that does (releaseUnclaimed); acks stop
   * below the oldest. Bounded as an iterator is (eventBufferSize): past it the oldest
   * are dropped, to come again after the next reconnect.
   */
  private readonly unclaimed: EventIterator;
  /** Bumped when the inbox's position is let go (forgetInbox). */
  private inboxEpoch = 0;
  /** The current connection has logged in (auth or register answered): cleared when it closes. */
  private socketAuthed = false;
  private welcomeWaiter: { resolve: (w: WelcomeFrame) => void; reject: (e: Error) => void } | undefined;

  /** The server connected to, or to be tried next: one of `addresses`. */
  private host: string;
  private port: number;
  private readonly addresses: { host: string; port: number }[];
  private addressAt = 0;
  private readonly reconnectOpts: Required<ReconnectOptions> | undefined;
  private wantAck: boolean;
  /** `ack: "manual"`: acks go no further than the app's own (appAcked). */
  private readonly manualAck: boolean;
  /** The largest mid the app acknowledged with ack(mid) (manual acks). */
  private appAcked: bigint | undefined;
  private ackEnabled = false;
  private lastInbox: bigint | undefined;
  private ackSent: bigint | undefined;
  /** Reconnect backoff's step (see scheduleReconnect), and when the last resume succeeded. */
  private backoff = 0;
  private resumedAt: number | undefined;
  /** The highest inbox mid an ack of ours was answered for, on any connection. */
  private confirmed: bigint | undefined;
  private ackTarget: bigint | undefined;
  /** The `since` the last auth this client made was given (a resume's floor while nothing is confirmed). */
  private authSince: bigint | undefined;
  /** The login of the last password auth or register that succeeded (whose inbox lastInbox is). */
  private authLogin: string | undefined;
  private ackBusy = false;
  private closing = false;
  private sessionEnded = false;
  /** Connections in a row ended by a frame over maxFrameBytes (see onData). */
  private tooLongInARow = 0;
  /** Resuming would meet the same oversized frame again: the client stops. */
  private givenUp = false;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private keepAliveTimer: NodeJS.Timeout | undefined;
  private lastWrite = Date.now();
  /** When the server last sent anything (the keep-alive's proof that the link is alive). */
  private lastRead = Date.now();
  private lastSocketError: Error | undefined;
  private serverNotice: ReplyData | undefined;
  /** Reconnect attempts since the connection was last up. */
  private attempt = 0;
  private finished = false;

  private constructor(private readonly opts: ConnectOptions) {
    super();
    this.unclaimed = new EventIterator(
      Math.max(1, opts.eventBufferSize ?? 10_000),
      Math.max(1, opts.eventBufferChars ?? DEFAULT_BUFFER_CHARS),
      () => undefined,
      (_dropped, inboxMid) => {
        if (inboxMid !== undefined) this.dropFloor = minMid(this.dropFloor, inboxMid - 1n);
      },
      () => undefined,
    );
    // A listener for every event or for ev_message takes what came before it (after it
    // is added: "newListener" is told first).
    (this as unknown as EventEmitter).on("newListener", (name: string | symbol) => {
      if (name === "event" || name === "ev_message") queueMicrotask(() => this.releaseUnclaimed());
    });
    const at = (a: { host?: string; port?: number }) => ({ host: a.host ?? "127.0.0.1", port: a.port ?? (opts.tls ? 7789 : 7788) });
    this.addresses = opts.servers !== undefined && opts.servers.length > 0 ? opts.servers.map(at) : [at(opts)];
    ({ host: this.host, port: this.port } = this.addresses[0]);
    const r = opts.reconnect;
    this.reconnectOpts = r
      ? { minMs: 250, maxMs: 30_000, maxAttempts: Number.POSITIVE_INFINITY, ...(r === true ? {} : r) }
      : undefined;
    this.wantAck = opts.ack !== false;
    this.manualAck = opts.ack === "manual";
    this.splitter = new NdjsonSplitter(opts.maxFrameBytes ?? 128 * 1024 * 1024);
    if (opts.since !== undefined) this.lastInbox = parseMid(opts.since);
  }

  /**
   * Connects and resolves once the server's welcome frame is in (and, unless `ack` is
   * false, once `hello {ack:true}` is answered). Rejects with a WirechatError carrying
   * the refusal's status when the server turns the connection away (13, 16).
   */
  static async connect(opts: ConnectOptions = {}): Promise<WirechatClient> {
    const c = new WirechatClient(opts);
    // Each of the servers in turn, until one answers: the last one's error otherwise.
    for (let i = 0; ; i++) {
      try {
        await c.openTransport();
        break;
      } catch (err) {
        if (i + 1 >= c.addresses.length) throw err;
        c.nextAddress();
      }
    }
    c.state = "open";
    try {
      if (c.wantAck) await c.hello({ ack: true });
    } catch (err) {
      c.destroy();
      throw err;
    }
    c.startKeepAlive();
    return c;
  }

  // ---------------------------------------------------------------- state

  /** True while a connection is up and requests are written at once. */
  get connected(): boolean {
    return this.state === "open";
  }

  get closed(): boolean {
    return this.state === "closed";
  }

  /** Whether this connection acknowledges inbox messages (the server said `ack: true`). */
  get acking(): boolean {
    return this.ackEnabled;
  }

  /**
   * The largest mid of a direct message to this user the app has been handed, with
   * every one before it: what the client sends as `since` when it resumes. Persist it
   * to resume a later run exactly.
   */
  get lastInboxMid(): string | undefined {
    // Below what an iterator dropped (applyDropFloor): saved, it brings them back. And
    // below what an iterator (or the kept queue) still holds unread: saved, then a
    // crash, and those were skipped by the next run's `since`.
    let mid = minMid(this.lastInbox, this.dropFloor);
    for (const it of [...this.iterators, this.unclaimed]) {
      const held = it.oldestInbox();
      if (held !== undefined) mid = minMid(mid, held - 1n);
    }
    // Manual acks: handed out is not done with. Nothing acked yet in this login: where
    // it started (its `since`), or nothing.
    if (this.manualAck) {
      const done = this.appAcked ?? this.authSince;
      mid = done === undefined ? undefined : minMid(mid, done);
    }
    return mid?.toString();
  }

  /** The last mid this connection acknowledged and the server confirmed. */
  get lastAckedMid(): string | undefined {
    return this.ackSent === undefined ? undefined : this.ackSent.toString();
  }

  // ---------------------------------------------------------------- requests

  /**
   * Sends `{"action": action, "data": data}` and resolves with the reply's data once
   * its status is 0; rejects with a WirechatError (the status as `code`) otherwise.
   * Works for any action, known to this client or not (a name of 1 to 64 letters,
   * digits or underscores, as every action of the server's is, and not an event's or
   * notice's name; another is refused unsent, with ClientCode.Protocol).
   */
  request<T extends Reply = Reply>(action: string, data?: Record<string, unknown>, options: RequestOptions = {}): Promise<T> {
    // A name the server cannot say back (empty, too long) draws a reply named `unknown`,
    // which cannot be told from the server's parting notice: refused here, unsent.
    if (!ACTION_NAME.test(action)) {
      return Promise.reject(new WirechatError(ClientCode.Protocol, "an action name is 1 to 64 letters, digits or underscores", action));
    }
    // Nor can a reply named like an event or a notice (`ev_…`, `unknown`, `welcome`) be
    // told from one: it was taken for an event, and the next reply for this request's.
    if (action.startsWith("ev_") || action === "unknown" || action === "welcome") {
      return Promise.reject(new WirechatError(ClientCode.Protocol, `'${action}' is the name of an event or notice, not of a request`, action));
    }
    const text = JSON.stringify(data === undefined ? { action } : { action, data }) + "\n";
    const resend = action === "message" && typeof data?.cmid === "string" && data.cmid !== "";
    return this.submit({ text, resend }, action, options, false) as Promise<T>;
  }

  /** `hello`; with `{ack: true}` this connection (and every resumed one) acknowledges. */
  async hello(data: { ack?: boolean; client?: string; version?: string } = {}, options?: RequestOptions): Promise<HelloInfo> {
    const body: Record<string, unknown> = { ...data };
    if (body.client === undefined && this.opts.clientName) body.client = this.opts.clientName;
    return this.request<HelloInfo>("hello", body, options);
  }

  /**
   * Creates an account; the connection is then logged in as it (the `auth` frame that
   * follows). With `reconnect`, a register whose reply a lost connection cut off is
   * settled on the next one: a login with the same password (the account was made),
   * else, when no account has the login, the register again.
   */
  async register(login: string, pass: string, nick: string, options?: RequestOptions): Promise<AuthInfo> {
    try {
      const info = toAuthInfo(await this.request("register", { login, pass, nick }, options));
      this.authLogin = login;
      return info;
    } catch (err) {
      if (!(err instanceof WirechatError) || err.code !== ClientCode.Closed || this.reconnectOpts === undefined || this.state === "closed" || this.closing) throw err;
      return this.lostRegister(login, pass, nick, options, err);
    }
  }

  /** register()'s reply was lost with its connection (`lost`): settled on the next one. */
  private async lostRegister(login: string, pass: string, nick: string, options: RequestOptions | undefined, lost: WirechatError): Promise<AuthInfo> {
    try {
      return await this.auth({ login, pass }, options);
    } catch (e) {
      // 7: no account has the login, so the register was not made: made now below.
      if (!(e instanceof WirechatError) || e.code !== 7) throw lost;
    }
    try {
      return toAuthInfo(await this.request("register", { login, pass, nick }, options));
    } catch (taken) {
      // A 1 can be the first register still being made (the server holds the login
      // while it hashes and commits): its login, a moment later.
      if (!(taken instanceof WirechatError) || taken.code !== 1) throw taken;
      await new Promise((r) => setTimeout(r, 500));
      return this.auth({ login, pass }, options).catch(() => {
        throw taken;
      });
    }
  }

  /**
   * Logs in with a password or resumes a session. The sid is remembered for reconnects.
   * `since` defaults to the last inbox mid this client has seen, so a second `auth`
   * never brings back what was already passed on: only for the user that mid is of
   * (the client's first login, or the login or session of the last one). Another
   * user's login after an `ev_logout` starts from that user's own cursor; sent with
   * the first user's position, it skipped the new user's messages below it.
   */
  async auth(credentials: { login: string; pass: string; since?: string } | { sid: string; since?: string }, options?: RequestOptions): Promise<AuthInfo> {
    const data: Record<string, unknown> = { ...credentials };
    const sameUser = this.uid === undefined || ("sid" in credentials ? credentials.sid === this.sid : credentials.login === this.authLogin);
    // Only a connection not yet logged in is sent the inbox from a lower position: on
    // one that is, the server sends nothing it already sent there, and a cleared floor
    // let acks pass what was dropped.
    if (sameUser && !this.socketAuthed) this.applyDropFloor();
    if (data.since === undefined && this.lastInbox !== undefined && sameUser) data.since = this.lastInbox.toString();
    const info = toAuthInfo(await this.request("auth", data, options));
    this.authSince = typeof data.since === "string" ? parseMid(data.since) : undefined;
    if ("login" in credentials) this.authLogin = credentials.login;
    return info;
  }

  async logout(options?: RequestOptions): Promise<void> {
    await this.request("logout", undefined, options);
  }

  async ping(options?: RequestOptions): Promise<number> {
    return (await this.request("ping", undefined, options)).time as number;
  }

  /**
   * A direct message (`{uid}`) or a channel message (`{channel}`). It carries a `cmid`
   * (a random one unless given), so a connection lost before its reply does not fail
   * it: with `reconnect`, it is sent again on the next connection, in its place, and the
   * server answers with the mid it stored, once. `resent`: it was sent again so; its
   * echo (`ev_message` to your own connections) went to the lost connection, if the
   * first one was stored, and does not come again. Rejected without a reply (its
   * timeout, a close without reconnect), the error's `cmid` sends it again safely.
   */
  async sendMessage(to: Target, body: string, extra: { cmid?: string } & RequestOptions = {}): Promise<{ mid: string; time: number; resent: boolean }> {
    const { timeoutMs, cmid = randomUUID(), ...rest } = extra;
    const r = await withCmid(cmid, this.request("message", { ...to, body, ...rest, cmid }, { timeoutMs }));
    return { mid: r.mid, time: r.time, resent: r.resent === true };
  }

  async history(
    of: Target & { limit?: number; before?: string },
    options?: RequestOptions,
  ): Promise<HistoryMessage[]> {
    return (await this.request("history", { ...of }, options)).messages as HistoryMessage[];
  }

  /**
   * A conversation's newest `n` messages (read 500 at most a page), oldest first, or those newer
   * than mid `after` if fewer: history pages back, since a page of large attachments
   * stops short of its limit. Paging stops once the messages gathered hold
   * maxFrameBytes of text (bodies, attachments' base64), the most one reply may hold:
   * then fewer come, the newest.
   */
  async latest(of: Target, n: number, after?: bigint, options?: RequestOptions): Promise<HistoryMessage[]> {
    const most = this.opts.maxFrameBytes ?? 128 * 1024 * 1024;
    const out: HistoryMessage[] = [];
    let held = 0;
    let before: string | undefined;
    while (out.length < n && held < most) {
      const page = await this.history({ ...of, limit: Math.min(n - out.length, 500), ...(before === undefined ? {} : { before }) }, options);
      const newer = after === undefined ? page : page.filter((m) => /^[0-9]+$/.test(m.mid) && BigInt(m.mid) > after);
      out.unshift(...newer);
      for (const m of newer) held += m.body.length + (m.attach?.data.length ?? 0);
      if (page.length === 0 || newer.length < page.length) break;
      before = page[0].mid;
    }
    return out;
  }

  async searchUser(q: string, options?: RequestOptions): Promise<Array<{ uid: string; nick: string }>> {
    return (await this.request("searchuser", { q }, options)).list;
  }

  async userInfo(uid: string, options?: RequestOptions): Promise<Reply> {
    return this.request("userinfo", { user: uid }, options);
  }

  async contactList(options?: RequestOptions): Promise<Contact[]> {
    return (await this.request("contactlist", undefined, options)).list as Contact[];
  }

  async addContact(uid: string, options?: RequestOptions): Promise<Reply> {
    return this.request("addcontact", { uid }, options);
  }

  async createChannel(name: string, descr?: string, options?: RequestOptions): Promise<string> {
    return (await this.request("createchannel", descr === undefined ? { name } : { name, descr }, options)).chid as string;
  }

  async channelList(page: { limit?: number; after?: string } = {}, options?: RequestOptions): Promise<ChannelInfo[]> {
    return (await this.request("channellist", page, options)).channels as ChannelInfo[];
  }

  /** Joins (or looks into) a channel: its members and last 20 messages. */
  async enter(chid: string, options?: RequestOptions): Promise<{ users: ChannelMember[]; last_msg: HistoryMessage[] }> {
    const r = await this.request("enter", { channel: chid }, options);
    return { users: r.users, last_msg: r.last_msg };
  }

  async leave(chid: string, options?: RequestOptions): Promise<void> {
    await this.request("leave", { channel: chid }, options);
  }

  /**
   * Acknowledges inbox messages up to `mid` (cumulative). A connection that opted in
   * (the `ack` option, or `hello({ack: true})` sent through this client) is acknowledged
   * automatically once the `ev_message` listeners have run: this sends one more.
   *
   * With `ack: "manual"` this is how the app acknowledges: it lets the client's acks
   * go as far as `mid` (never past a message this connection has not been sent yet,
   * which it acknowledges once it comes, or one an iterator still holds), sent
   * coalesced; it resolves at once, and `lastAckedMid` shows what the server confirmed.
   * After a reconnect, the messages the app has and had not acknowledged come again
   * (the client keeps them from the app, as duplicates) and are acknowledged so.
   */
  async ack(mid: string, options?: RequestOptions): Promise<void> {
    if (!this.manualAck) {
      await this.request("ack", { mid }, options);
      return;
    }
    const m = parseMid(mid);
    if (m === undefined) throw new WirechatError(ClientCode.Protocol, "a mid is a string of 1 to 20 digits", "ack");
    if (this.appAcked === undefined || m > this.appAcked) this.appAcked = m;
    if (this.ackTarget !== undefined) this.scheduleAck(this.ackTarget);
  }

  /**
   * Sends a message with an attachment, streaming the source's base64 into the socket
   * chunk by chunk and waiting for `drain` whenever the socket's buffer is full, so
   * neither the file nor its base64 is ever whole in memory. `source` is a file path or
   * a byte stream. The request timeout starts once the last byte is written.
   */
  async sendAttachment(to: Target, source: string | Readable, options: SendAttachmentOptions = {}): Promise<{ mid: string; time: number }> {
    const chunkBytes = Math.max(3, Math.floor((options.chunkBytes ?? 48 * 1024) / 3) * 3);
    let total = options.size;
    let open: () => AsyncIterable<Buffer | Uint8Array | string>;
    if (typeof source === "string") {
      total ??= (await stat(source)).size;
      open = () => createReadStream(source, { highWaterMark: chunkBytes });
    } else {
      open = () => source;
    }
    // "action" before "data", and the key path data → attach → data written without
    // escapes: only then does the server stream the text to disk instead of counting
    // it against the frame limit (PROTOCOL.md §8 "Attachments").
    const fields: string[] = [];
    // A cmid always (a random one unless given): a retry after a lost reply with the
    // error's cmid stores the file once (WirechatError.cmid).
    const cmid = options.cmid ?? randomUUID();
    for (const [k, v] of Object.entries({ ...to, body: options.body, cmid })) {
      if (v !== undefined) fields.push(`${JSON.stringify(k)}:${JSON.stringify(v)}`);
    }
    fields.push(`"attach":{"mime":${JSON.stringify(options.mime ?? "application/octet-stream")},"data":"`);
    const head = `{"action":"message","data":{${fields.join(",")}`;
    const onProgress = options.onProgress;
    const run = async (socket: net.Socket, pending: Pending): Promise<void> => {
      await this.write(socket, head);
      let sent = 0;
      onProgress?.(0, total);
      try {
        for await (const { text, bytes } of base64Chunks(open())) {
          if (text.length > 0) await this.write(socket, text);
          sent += bytes;
          if (bytes > 0) onProgress?.(sent, total);
        }
      } catch (err) {
        if (socket.destroyed) throw err;
        // The frame is half written and cannot be taken back. A character outside the
        // base64 alphabet makes the server refuse it with status 3 and keep nothing,
        // and the connection stays in step; the caller hears the real cause.
        pending.failure = new WirechatError(ClientCode.Aborted, `attachment source failed: ${errorText(err)}`, "message");
        await this.write(socket, `*"}}}\n`);
        return;
      }
      await this.write(socket, `"}}}\n`);
    };
    const r = await withCmid(cmid, this.submit({}, "message", options, false, run));
    return { mid: r.mid, time: r.time };
  }

  /** Sends a file (a path) as an attachment; see sendAttachment. */
  sendFile(to: Target, path: string, options: SendAttachmentOptions = {}): Promise<{ mid: string; time: number }> {
    return this.sendAttachment(to, path, options);
  }

  // ---------------------------------------------------------------- events

  /**
   * Every event frame from now on, in order, until the client closes. Each iterator
   * has its own bounded buffer (`eventBufferSize` events, `eventBufferChars` characters
   * of text and attachment data: `bufferSize`, `bufferChars` here); when a consumer falls that far
   * behind, the oldest buffered events are dropped (counted, and reported with an
   * `overflow` event). The EventEmitter side never drops anything. An inbox message is
   * acknowledged once every iterator has handed it out; one an iterator dropped (or
   * still held when the loop was left: return()) is not, and comes again after the next
   * reconnect or auth on a new connection, with those after it (which then reach the
   * app twice). Until then nothing past it is acknowledged.
   */
  events(options: { bufferSize?: number; bufferChars?: number } = {}): AsyncIterableIterator<WirechatEvent> {
    const it = new EventIterator(
      Math.max(1, options.bufferSize ?? this.opts.eventBufferSize ?? 10_000),
      Math.max(1, options.bufferChars ?? this.opts.eventBufferChars ?? DEFAULT_BUFFER_CHARS),
      (x) => this.iterators.delete(x),
      (dropped, inboxMid, reported = true) => {
        if (inboxMid !== undefined) this.dropFloor = minMid(this.dropFloor, inboxMid - 1n);
        if (reported) this.safeEmit("overflow", { dropped });
      },
      () => {
        if (this.ackTarget !== undefined) this.scheduleAck(this.ackTarget);
      },
    );
    if (this.state === "closed") it.end();
    else {
      this.iterators.add(it);
      this.releaseUnclaimed();
    }
    return it;
  }

  // ---------------------------------------------------------------- closing

  /** Says `quit`, waits briefly for the server to close, and closes for good. */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    this.closing = true;
    clearTimeout(this.reconnectTimer);
    const socket = this.socket;
    if (socket && this.state === "open") {
      try {
        await this.request("quit", undefined, { timeoutMs: 2000 });
      } catch {
        // Closing anyway.
      }
    }
    if (socket && !socket.destroyed && this.socket === socket) {
      socket.end();
      const t = setTimeout(() => socket.destroy(), 1000);
      await once(socket, "close").catch(() => {});
      clearTimeout(t);
    }
    this.finish(undefined);
  }

  /** Closes at once, without `quit`. */
  destroy(): void {
    this.closing = true;
    clearTimeout(this.reconnectTimer);
    this.socket?.destroy();
    this.finish(undefined);
  }

  // ---------------------------------------------------------------- internals

  private submit(
    item: { text?: string; resend?: boolean },
    action: string,
    options: RequestOptions,
    internal: boolean,
    run?: (socket: net.Socket, pending: Pending) => Promise<void>,
  ): Promise<ReplyData> {
    return new Promise<ReplyData>((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? this.opts.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS;
      const pending: Pending = {
        action,
        resolve,
        reject,
        timer: undefined,
        settled: false,
        awaitingAuthFrame: false,
        failure: undefined,
        internal,
        timeoutMs,
      };
      if (item.resend) pending.resend = item.text;
      const out: OutItem = { pending, text: item.text };
      if (run) out.run = (socket) => run(socket, pending);
      // The clock runs while the request waits (a reconnect that never comes must not
      // hold it for good); a streamed frame's stops while its bytes are written, and
      // starts again when its last byte is out (see the write loop).
      this.armTimer(out);
      if (this.state === "open" || (internal && this.state === "resuming")) {
        this.outbox.push(out);
        this.pump();
      } else if (this.state === "resuming" || this.state === "reconnecting") {
        this.held.push(out);
        // Requests that timed out while held are never sent (the writer skips them),
        // but they kept their frames until the reconnect: an app that went on sending
        // through a long outage grew without bound. Pruned as the queue doubles.
        if (this.held.length >= this.heldPruneAt) {
          this.held = this.held.filter((o) => !o.pending.settled);
          this.heldPruneAt = Math.max(HELD_PRUNE_MIN, 2 * this.held.length);
        }
      } else {
        pending.settled = true;
        clearTimeout(pending.timer);
        reject(new WirechatError(ClientCode.Closed, "not connected", action));
      }
    });
  }

  private armTimer(out: OutItem): void {
    const p = out.pending;
    if (p.timeoutMs <= 0) return;
    p.timer = setTimeout(() => {
      if (p.settled) return;
      p.settled = true;
      // Not yet written: it stays queued, and the writer skips it (settled), so it is
      // never sent (no search of the queues per timeout). Written: it stays in the
      // FIFO, so its reply (whenever it comes) is still matched to it and not to the
      // next request.
      p.reject(new WirechatError(ClientCode.Timeout, `no reply within ${p.timeoutMs} ms`, p.action));
    }, p.timeoutMs);
    p.timer.unref?.();
  }

  /**
   * Writes the outbox in order, one item at a time; streamed items hold the line. One
   * write loop per socket: a loop left waiting on an attachment source that stalled
   * when its socket closed does not hold the next connection's writes.
   */
  private pump(): void {
    const socket = this.socket;
    if (!socket || socket.destroyed || this.pumping === socket) return;
    this.pumping = socket;
    void (async () => {
      try {
        while (this.outbox.length > 0) {
          if (this.socket !== socket || socket.destroyed) return;
          const out = this.outbox.shift()!;
          if (out.pending.settled) continue;
          this.inflight.push(out.pending);
          if (out.text !== undefined) {
            try {
              await this.write(socket, out.text);
            } catch {
              return; // closed; its close handler deals with what is in flight
            }
          } else if (out.run) {
            clearTimeout(out.pending.timer);
            try {
              await untilClosed(socket, out.run(socket));
              this.armTimer(out);
            } catch (err) {
              // The socket failed mid-frame; its close handler rejects what is in flight.
              if (!socket.destroyed) socket.destroy(err instanceof Error ? err : new Error(String(err)));
              return;
            }
          }
        }
      } finally {
        if (this.pumping === socket) {
          this.pumping = undefined;
          // Items queued while a stream held the line.
          if (this.outbox.length > 0 && this.state !== "closed") this.pump();
        }
      }
    })();
  }

  /** One write that respects backpressure: waits for `drain` when the buffer is full. */
  private async write(socket: net.Socket, text: string): Promise<void> {
    if (socket.destroyed) throw new WirechatError(ClientCode.Closed, "the connection closed");
    this.lastWrite = Date.now();
    if (socket.write(text)) return;
    await new Promise<void>((resolve, reject) => {
      const done = () => {
        socket.off("drain", done);
        socket.off("close", closed);
        resolve();
      };
      const closed = () => {
        socket.off("drain", done);
        reject(new WirechatError(ClientCode.Closed, "the connection closed while writing"));
      };
      socket.on("drain", done);
      socket.once("close", closed);
    });
  }

  private openTransport(): Promise<WelcomeFrame> {
    return new Promise<WelcomeFrame>((resolve, reject) => {
      const t = this.opts.tls;
      const socket: net.Socket = t
        ? tls.connect({ host: this.host, port: this.port, ...(t === true ? {} : t), servername: (t !== true && t.servername) || (net.isIP(this.host) ? undefined : this.host) })
        : net.connect({ host: this.host, port: this.port });
      socket.setNoDelay(true);
      this.socket = socket;
      this.splitter = new NdjsonSplitter(this.opts.maxFrameBytes ?? 128 * 1024 * 1024);
      this.lastSocketError = undefined;
      this.serverNotice = undefined;
      this.ackEnabled = false;
      // A connection acks what it was sent: an ack above that confirms no more, and
      // the messages it then gets again would be taken for acked already.
      this.ackSent = this.ackTarget = undefined;
      this.ackBusy = false;
      const timer = setTimeout(() => {
        fail(new WirechatError(ClientCode.Timeout, `no welcome frame within ${this.opts.connectTimeoutMs ?? 10_000} ms`));
        socket.destroy();
      }, this.opts.connectTimeoutMs ?? 10_000);
      const fail = (err: Error) => {
        // This attempt's waiter only: a socket that failed reports its 'close' later,
        // when connect() may be waiting for the next server's welcome (it took that
        // waiter, the welcome then matched no request, and connect() never settled).
        if (this.welcomeWaiter !== waiter) return;
        this.welcomeWaiter = undefined;
        clearTimeout(timer);
        // The one error type the client rejects with (errors.ts): a socket's own error
        // (ECONNREFUSED, a TLS certificate refused, a frame over maxFrameBytes) is the
        // cause of a Closed one that names the address.
        if (err instanceof WirechatError) return reject(err);
        const wrapped = new WirechatError(ClientCode.Closed, `cannot connect to ${this.host}:${this.port}: ${err.message}`);
        wrapped.cause = err;
        reject(wrapped);
      };
      const waiter: typeof this.welcomeWaiter = {
        resolve: (w) => {
          this.welcomeWaiter = undefined;
          clearTimeout(timer);
          this.welcome = w;
          resolve(w);
        },
        reject: fail,
      };
      this.welcomeWaiter = waiter;
      socket.on("data", (chunk: Buffer) => {
        this.lastRead = Date.now();
        this.onData(socket, chunk);
      });
      socket.on("error", (err) => {
        this.lastSocketError = err;
        fail(err);
      });
      socket.on("close", () => {
        fail(this.lastSocketError ?? new WirechatError(ClientCode.Closed, "the server closed the connection before its welcome frame"));
        this.onSocketClose(socket);
      });
    });
  }

  private onData(socket: net.Socket, chunk: Buffer): void {
    if (socket !== this.socket) return;
    let lines: string[];
    try {
      lines = this.splitter.push(chunk);
    } catch (err) {
      // A frame over maxFrameBytes, on TOO_LONG_MAX connections in a row: an inbox
      // message larger than the limit, sent again after every resume. The client stops
      // (close, with this error) rather than reconnect for it for ever.
      if (err instanceof LineTooLongError && ++this.tooLongInARow >= TOO_LONG_MAX) this.givenUp = true;
      socket.destroy(err as Error);
      return;
    }
    for (const line of lines) {
      let frame: any;
      try {
        frame = JSON.parse(line);
      } catch {
        this.protocolError(socket, `the server sent a line that is not JSON: ${line.slice(0, 120)}`);
        return;
      }
      if (!frame || typeof frame !== "object" || typeof frame.action !== "string") {
        this.protocolError(socket, `the server sent a frame without an action: ${line.slice(0, 120)}`);
        return;
      }
      this.onFrame(socket, frame);
      if (socket !== this.socket || socket.destroyed) return;
    }
  }

  private protocolError(socket: net.Socket, text: string): void {
    const err = new WirechatError(ClientCode.Protocol, text);
    this.lastSocketError = err;
    socket.destroy(err);
  }

  private onFrame(socket: net.Socket, frame: { action: string; data?: any; [k: string]: any }): void {
    const action = frame.action;
    if (this.welcomeWaiter) {
      if (action === "welcome") this.welcomeWaiter.resolve(frame as WelcomeFrame);
      else {
        // A refusal (§1 "Connection limits") comes in place of the welcome frame.
        const d = frame.data ?? {};
        this.welcomeWaiter.reject(new WirechatError(typeof d.status === "number" ? d.status : ClientCode.Protocol, String(d.error ?? `unexpected ${action} frame before the welcome frame`)));
        socket.destroy();
      }
      return;
    }
    if (action.startsWith("ev_")) {
      this.onEvent({ action, data: frame.data ?? {} });
      return;
    }
    const data: ReplyData = frame.data ?? { status: ClientCode.Protocol, error: "reply without data" };
    if (action === "unknown") {
      // Nothing this client writes can draw an `unknown` reply (it only sends
      // well-formed frames), so this is the notice before the server drops us.
      this.serverNotice = data;
      this.safeEmit("notice", data);
      return;
    }
    const head = this.inflight[this.inflightHead];
    if (head && head.awaitingAuthFrame && action === "auth") {
      this.shiftInflight();
      this.noteAuth(data);
      this.settle(head, data);
      return;
    }
    if (!head || head.action !== action) {
      if (action === "auth" && data.status === 0) {
        // An `auth` frame nobody waits for (a register whose caller timed out): still
        // the session this connection now has.
        this.noteAuth(data);
        return;
      }
      this.protocolError(socket, `reply '${action}' does not match the oldest request '${head?.action ?? "(none)"}'`);
      return;
    }
    if (action === "register" && data.status === 0) {
      // The unsolicited `auth` frame follows at once and completes the registration.
      head.awaitingAuthFrame = true;
      return;
    }
    this.shiftInflight();
    if (data.status === 0) this.noteReply(action, data);
    this.settle(head, data);
  }

  private shiftInflight(): void {
    this.inflightHead++;
    if (this.inflightHead > 256 && this.inflightHead * 2 > this.inflight.length) {
      this.inflight = this.inflight.slice(this.inflightHead);
      this.inflightHead = 0;
    }
  }

  private settle(p: Pending, data: ReplyData): void {
    clearTimeout(p.timer);
    if (p.settled) return;
    p.settled = true;
    if (p.failure) p.reject(p.failure);
    else if (data.status === 0) p.resolve(p.resent ? { ...data, resent: true } : data);
    else p.reject(new WirechatError(typeof data.status === "number" ? data.status : ClientCode.Protocol, String(data.error ?? "no error text"), p.action));
  }

  /** Session bookkeeping from successful replies, whoever sent the request. */
  private noteReply(action: string, data: ReplyData): void {
    switch (action) {
      case "auth":
        this.noteAuth(data);
        break;
      case "hello":
        this.helloInfo = data as HelloInfo;
        this.ackEnabled = data.ack === true;
        if (this.ackEnabled) this.wantAck = true;
        break;
      case "logout":
      case "deleteaccount":
        this.uid = this.sid = this.nick = undefined;
        this.forgetInbox();
        break;
    }
  }

  private noteAuth(data: ReplyData): void {
    this.socketAuthed = true;
    if (this.uid !== undefined && data.uid !== this.uid) {
      // Another user's inbox: the old position means nothing there.
      this.forgetInbox();
    }
    this.uid = data.uid;
    this.sid = data.sid;
    this.nick = data.nick;
    this.sessionEnded = false;
  }

  /** The inbox's position is over (logout, another user): acks in flight for it change nothing after. */
  private forgetInbox(): void {
    this.inboxEpoch++;
    // Kept for a listener that never came: that inbox's, not the next login's (none was
    // acked, so the server offers them again to whoever logs in as that user).
    this.unclaimed.drain();
    this.lastInbox = this.ackSent = this.ackTarget = this.confirmed = this.authSince = this.dropFloor = this.appAcked = undefined;
  }

  private onEvent(ev: WirechatEvent): void {
    if (ev.action === "ev_message" && this.uid !== undefined && ev.data.to === this.uid && typeof ev.data.mid === "string") {
      // A direct message to us: an inbox message (§8 "Delivery"). The inbox comes in mid
      // order, each once per connection, so one seen already can only be a resend after
      // a reconnect; it is dropped here and never reaches the app twice.
      const mid = parseMid(ev.data.mid);
      if (mid !== undefined) {
        if (this.lastInbox !== undefined && mid <= this.lastInbox) {
          this.duplicatesDropped++;
          this.scheduleAck(mid);
          return;
        }
        this.lastInbox = mid;
        // Nobody listening yet (the inbox comes right behind the auth reply, often in
        // its read, before `await c.auth()` returns and the app adds its listener):
        // kept until someone does, and not acknowledged meanwhile. Passed to nobody and
        // acknowledged, it was lost.
        if (!this.consumed()) this.unclaimed.push(ev, mid);
        else {
          // Those kept go first (a listener added within this read has not had them).
          if (this.unclaimed.oldestInbox() !== undefined) this.releaseUnclaimed();
          if (this.unclaimed.oldestInbox() === undefined) this.deliver(ev, mid);
          else this.unclaimed.push(ev, mid);
        }
        // After the listeners ran: an ack says the app has it.
        this.scheduleAck(mid);
        return;
      }
    }
    if (ev.action === "ev_logout") {
      // The session is over (PROTOCOL.md §5 ev_logout): resuming it would fail with 2.
      this.sessionEnded = true;
      this.sid = undefined;
    }
    this.deliver(ev);
  }

  /**
   * Emits to the app's listeners; an exception of theirs is rethrown as its own uncaught
   * error, not into the client: thrown here, it abandoned the rest of a read's frames
   * (replies then matched the wrong requests), or the reconnect timer that was to follow.
   */
  private safeEmit<K extends keyof ClientEvents>(name: K, ...args: ClientEvents[K]): void {
    try {
      (this.emit as (n: K, ...a: ClientEvents[K]) => boolean)(name, ...args);
    } catch (err) {
      process.nextTick(() => {
        throw err;
      });
    }
  }

  /** Something takes events: an iterator, or a listener for all events or for ev_message. */
  private consumed(): boolean {
    return this.iterators.size > 0 || this.listenerCount("event") > 0 || this.listenerCount("ev_message") > 0;
  }

  /**
   * Inbox messages kept while nothing consumed events, handed on once something does,
   * one at a time while something still does (a `once` listener takes one: the rest
   * stay kept, unacknowledged).
   */
  private releaseUnclaimed(): void {
    if (!this.consumed() || this.releasing) return;
    this.releasing = true;
    try {
      const kept = this.unclaimed.drain();
      let i = 0;
      for (; i < kept.length && this.consumed(); i++) this.deliver(kept[i][0], kept[i][1]);
      for (; i < kept.length; i++) this.unclaimed.push(kept[i][0], kept[i][1]);
    } finally {
      this.releasing = false;
    }
    if (this.ackTarget !== undefined) this.scheduleAck(this.ackTarget);
  }

  /** releaseUnclaimed is handing messages on (a listener added meanwhile waits for it). */
  private releasing = false;

  private deliver(ev: WirechatEvent, inboxMid?: bigint): void {
    for (const it of this.iterators) it.push(ev, inboxMid);
    try {
      this.emit("event", ev);
      this.emit(ev.action as `ev_${string}`, ev.data);
    } catch (err) {
      // A listener's exception is the app's, and is rethrown as its own uncaught
      // error; thrown here it would abandon the rest of the chunk's frames and leave
      // replies unmatched.
      process.nextTick(() => {
        throw err;
      });
    }
  }

  private scheduleAck(mid: bigint): void {
    if (!this.ackEnabled) return;
    if (this.ackTarget === undefined || mid > this.ackTarget) this.ackTarget = mid;
    if (this.ackBusy) return;
    this.ackBusy = true;
    // Coalesced: one cumulative ack covers everything that arrived in the same turn
    // (an inbox of thousands after auth costs a handful of acks, not thousands).
    setImmediate(() => void this.flushAcks());
  }

  /**
   * Inbox messages an iterator dropped are to come again: the position (`since`, and
   * the duplicate filter) goes back to before the first of them (those after it come
   * again too, and reach the app twice: at least once, after an overflow).
   */
  private applyDropFloor(): void {
    if (this.dropFloor === undefined) return;
    this.lastInbox = minMid(this.lastInbox, this.dropFloor);
    this.dropFloor = undefined;
  }

  /**
   * How far an ack may go: the last inbox message passed on, but never past one an
   * iterator still holds (not yet handed to the app) or dropped.
   */
  private ackable(): bigint | undefined {
    let mid = this.ackTarget;
    if (mid === undefined) return undefined;
    if (this.manualAck) {
      if (this.appAcked === undefined) return undefined;
      if (this.appAcked < mid) mid = this.appAcked;
    }
    if (this.dropFloor !== undefined && this.dropFloor < mid) mid = this.dropFloor;
    for (const it of [...this.iterators, this.unclaimed]) {
      const held = it.oldestInbox();
      if (held !== undefined && held - 1n < mid) mid = held - 1n;
    }
    return mid;
  }

  private async flushAcks(): Promise<void> {
    const socket = this.socket;
    const epoch = this.inboxEpoch;
    try {
      let mid: bigint | undefined;
      while (this.ackEnabled && this.socket === socket && (mid = this.ackable()) !== undefined && mid > 0n && (this.ackSent === undefined || mid > this.ackSent)) {
        await this.submit({ text: JSON.stringify({ action: "ack", data: { mid: mid.toString() } }) + "\n" }, "ack", {}, true);
        // A logout, or another user's login, came meanwhile: this ack was the old
        // inbox's, and its position is nothing to the next one's.
        if (this.inboxEpoch !== epoch) return;
        if (this.confirmed === undefined || mid > this.confirmed) this.confirmed = mid;
        if (this.socket === socket) this.ackSent = mid;
      }
    } catch {
      // A lost ack only means those messages may be offered again; the duplicate
      // filter and `since` keep them from the app.
    } finally {
      if (this.socket === socket) this.ackBusy = false;
    }
  }

  private onSocketClose(socket: net.Socket): void {
    if (socket !== this.socket) return;
    this.socket = undefined;
    this.socketAuthed = false;
    this.ackEnabled = false;
    this.ackBusy = false;
    clearInterval(this.keepAliveTimer);
    const notice = this.serverNotice;
    const cause: Error | undefined =
      this.lastSocketError ?? (notice ? new WirechatError(typeof notice.status === "number" ? notice.status : ClientCode.Closed, String(notice.error)) : undefined);
    const closedErr = new WirechatError(ClientCode.Closed, cause ? `the connection closed: ${cause.message}` : "the connection closed");
    const inflight = this.inflight.slice(this.inflightHead);
    this.inflight = [];
    this.inflightHead = 0;
    // A connect attempt that failed before its welcome frame (state reconnecting):
    // tryReconnect, which made it, schedules the next one.
    if (!(this.lastSocketError instanceof LineTooLongError)) this.tooLongInARow = 0;
    const resumable = this.state !== "closed" && this.state !== "reconnecting" && !this.closing && this.reconnectOpts !== undefined && !this.sessionEnded && !this.givenUp;
    // Written, unanswered: lost with the connection, but for messages with a cmid,
    // which go out again first (Pending.resend).
    const again: OutItem[] = [];
    for (const p of inflight) {
      if (p.settled) continue;
      if (resumable && p.resend !== undefined) {
        p.resent = true;
        again.push({ pending: p, text: p.resend });
        continue;
      }
      clearTimeout(p.timer);
      p.settled = true;
      // Its own error: a message's carries its own cmid (withCmid).
      p.reject(new WirechatError(closedErr.code, closedErr.serverMessage, p.action));
    }
    if (this.state === "closed" || this.state === "reconnecting") return;
    this.held.unshift(...again);
    // Requests never written are safe to send on the next connection; internal ones
    // (acks, the resume handshake) belong to the connection that is gone.
    const unwritten = this.outbox.splice(0);
    for (const out of unwritten) {
      if (resumable && !out.pending.internal) this.held.push(out);
      else this.rejectItem(out, closedErr);
    }
    if (!resumable) {
      this.finish(cause);
      return;
    }
    const wasOpen = this.state === "open";
    this.state = "reconnecting";
    if (wasOpen) this.safeEmit("disconnect", cause);
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    const r = this.reconnectOpts!;
    if (this.attempt >= r.maxAttempts) {
      this.finish(new WirechatError(ClientCode.Closed, `could not reconnect after ${this.attempt} attempts`));
      return;
    }
    // Exponential backoff with "equal jitter": at least half the step, so clients cut
    // off together by a server restart do not all come back in the same instant.
    // The step keeps growing across resumes that did not last (a connection dropped
    // again at once (a proxy that cuts it, a server that drops it) came straight back
    // and looped); one that stayed up for the longest step starts again from the first.
    if (this.resumedAt !== undefined && Date.now() - this.resumedAt >= r.maxMs) this.backoff = 0;
    this.resumedAt = undefined;
    const step = Math.min(r.maxMs, r.minMs * 2 ** Math.min(this.backoff, 30));
    const delayMs = Math.round(step / 2 + Math.random() * (step / 2));
    this.attempt++;
    this.backoff++;
    this.safeEmit("reconnecting", { attempt: this.attempt, delayMs });
    this.reconnectTimer = setTimeout(() => void this.tryReconnect(), delayMs);
  }

  /** The next of several servers (a cluster's nodes): where the next attempt goes. */
  private nextAddress(): void {
    this.addressAt = (this.addressAt + 1) % this.addresses.length;
    ({ host: this.host, port: this.port } = this.addresses[this.addressAt]);
  }

  private async tryReconnect(): Promise<void> {
    if (this.state !== "reconnecting") return;
    // A cluster's next node: the one lost may be down for good.
    if (this.addresses.length > 1) this.nextAddress();
    try {
      await this.openTransport();
    } catch (err) {
      // Turned away for good (15: the address is banned): no more attempts.
      if (err instanceof WirechatError && err.code === 15) return this.finish(err);
      if (this.state === "reconnecting" && !this.closing) this.scheduleReconnect();
      return;
    }
    const socket = this.socket!;
    if (this.state !== "reconnecting") {
      socket.destroy();
      return;
    }
    this.state = "resuming";
    let auth: AuthInfo | undefined;
    try {
      if (this.wantAck) await this.submit({ text: JSON.stringify({ action: "hello", data: { ack: true } }) + "\n" }, "hello", {}, true);
      if (this.sid !== undefined) {
        const data: Record<string, unknown> = { sid: this.sid };
        // `since`: everything after the last inbox message we passed on, whatever the
        // server thinks was confirmed, so nothing is lost and nothing comes twice. With
        // acks, after the last one confirmed instead: the server takes an ack only for
        // what it sent on the same connection, so a message passed on whose ack the
        // disconnect cut off must come again, to be acked (the duplicate filter keeps
        // it from the app); skipped, it was never acked, and came again on every later
        // login without `since`.
        // (Nothing confirmed yet: from the `since` the last auth had, not from none,
        // which would offer again whatever was never acked, wherever it was read.)
        this.applyDropFloor();
        const from = this.wantAck ? maxMid(this.confirmed, this.authSince) : this.lastInbox;
        if (from !== undefined) data.since = from.toString();
        auth = toAuthInfo(await this.submit({ text: JSON.stringify({ action: "auth", data }) + "\n" }, "auth", {}, true));
      }
    } catch (err) {
      if (err instanceof WirechatError && (err.code === 2 || err.code === 15)) {
        // The session is gone (expired, logged out elsewhere), or the account is banned
        // (15): nothing to resume, however often it is tried.
        this.sessionEnded = true;
        this.sid = undefined;
        this.finish(err);
        socket.destroy();
        return;
      }
      // Anything else (rate limit, the server stopping again): drop this connection;
      // its close handler schedules the next attempt.
      if (!socket.destroyed) socket.destroy();
      return;
    }
    if (this.state !== "resuming" || socket !== this.socket) return;
    this.state = "open";
    const attempts = this.attempt;
    this.attempt = 0;
    this.resumedAt = Date.now();
    this.outbox.push(...this.held.splice(0));
    this.pump();
    this.startKeepAlive();
    this.safeEmit("reconnect", { attempts, auth });
  }

  private startKeepAlive(): void {
    clearInterval(this.keepAliveTimer);
    const ms = this.opts.keepAliveMs ?? 0;
    if (ms <= 0) return;
    this.keepAliveTimer = setInterval(() => {
      if (this.state === "open" && Date.now() - this.lastWrite >= ms) {
        const socket = this.socket;
        const sent = Date.now();
        // A request timeout of 0 (none) leaves the ping the keep-alive's: without one, a
        // dead link was never noticed, and pings piled up unanswered.
        const limit = this.opts.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS;
        this.submit({ text: '{"action":"ping"}\n' }, "ping", { timeoutMs: limit > 0 ? limit : ms }, true).catch((err: unknown) => {
          // No reply, and nothing else either: a link that stopped passing data without a
          // reset (a NAT timeout, a network change) is taken for lost, so that
          // `reconnect` can act on it now rather than when the kernel gives up on its
          // retransmits, minutes later. (A ping behind a long reply still coming in only
          // times out, as any request does.)
          if (err instanceof WirechatError && err.code === ClientCode.Timeout && this.lastRead <= sent && socket && this.socket === socket && !socket.destroyed) {
            socket.destroy(new Error("no reply to a keep-alive ping"));
          }
        });
      }
    }, Math.max(100, Math.floor(ms / 2)));
    this.keepAliveTimer.unref?.();
  }

  private rejectItem(out: OutItem, err: WirechatError): void {
    const p = out.pending;
    clearTimeout(p.timer);
    if (p.settled) return;
    p.settled = true;
    p.reject(new WirechatError(err.code, err.serverMessage, p.action));
  }

  private finish(cause: Error | undefined): void {
    if (this.finished) return;
    this.finished = true;
    this.state = "closed";
    clearTimeout(this.reconnectTimer);
    clearInterval(this.keepAliveTimer);
    const err = new WirechatError(ClientCode.Closed, cause ? `the client is closed: ${cause.message}` : "the client is closed");
    for (const out of [...this.held.splice(0), ...this.outbox.splice(0)]) this.rejectItem(out, err);
    for (const it of this.iterators) it.end();
    this.iterators.clear();
    this.unclaimed.drain(); // no listener added after the close is handed them
    this.safeEmit("close", cause);
  }
}

/**
 * `work`, or a rejection as soon as `socket` closes: a streamed frame whose source
 * stalls must not hold the write loop past its connection (what it does later fails
 * on the closed socket, and is dropped here).
 */
function untilClosed(socket: net.Socket, work: Promise<void>): Promise<void> {
  return new Promise((resolve, reject) => {
    const closed = () => reject(new WirechatError(ClientCode.Closed, "the connection closed while writing"));
    if (socket.destroyed) closed();
    else socket.once("close", closed);
    work.then(
      () => {
        socket.off("close", closed);
        resolve();
      },
      (err: unknown) => {
        socket.off("close", closed);
        reject(err);
      },
    );
  });
}

function toAuthInfo(d: ReplyData): AuthInfo {
  return { sid: d.sid, uid: d.uid, cid: d.cid ?? d.uid, nick: d.nick };
}

/** The least length at which requests held through an outage are pruned of timed-out ones. */
const HELD_PRUNE_MIN = 1024;

function parseMid(mid: string): bigint | undefined {
  return /^[0-9]{1,20}$/.test(mid) ? BigInt(mid) : undefined;
}

function maxMid(a: bigint | undefined, b: bigint | undefined): bigint | undefined {
  return a === undefined ? b : b === undefined || a > b ? a : b;
}

function minMid(a: bigint | undefined, b: bigint | undefined): bigint | undefined {
  return a === undefined ? b : b === undefined || a < b ? a : b;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * A message request's failure without a reply carries its cmid (WirechatError.cmid), on
 * an error of its own: set on one shared by several requests (a connection's close
 * failed them all with one), the last cmid was every message's, and a caller that sent
 * each again with its error's cmid stored one of them twice and lost the others.
 */
async function withCmid<T>(cmid: string, request: Promise<T>): Promise<T> {
  try {
    return await request;
  } catch (err) {
    if (err instanceof WirechatError && (err.code === ClientCode.Timeout || err.code === ClientCode.Closed)) {
      const own = new WirechatError(err.code, err.serverMessage, err.action);
      own.cmid = cmid;
      throw own;
    }
    throw err;
  }
}
