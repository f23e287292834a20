// The listeners (TCP, and TLS when a certificate is configured): accept sockets, wire
// each one's bytes through a FrameScanner into the dispatcher, enforce the connection
// caps and idle timeouts, and shut down gracefully.
//
// The caps: --max-connections counts every connection and every TLS handshake in
// progress; --max-per-address counts, per IP address (or its network: --ipv4-prefix,
// --ipv6-prefix; addresses.ts addressKey), the connections not logged in and the
// handshakes (a logged-in connection is accountable to its user instead).
// Whether a connection is logged in is read from its session, when the address is at
// its cap and at every sweep, so the protocol layer needs no hook for it. A refused
// socket gets its one line, is read and discarded, and is destroyed after the linger
// time, so it holds no slot and no descriptor for long, whatever the client does.

import { readFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import type { Logger } from "pino";
import { addressKey } from "../addresses.js";
import { closeFromAddress, closeIfIdle, endAll, overCap, socketAddress, type SlotCounter } from "./peer-common.js";
import type { Config } from "../config.js";
import type { Metrics } from "../metrics.js";
import { clockMs, within } from "../clock.js";
import type { Codec } from "../protocol/codec.js";
import type { OutFrame } from "../protocol/frames.js";
import { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import type { Router } from "../protocol/router.js";
import type { Session, Upload } from "../protocol/session.js";
import { CONNECTION, Connection, deliverySlack } from "./connection.js";
import type { ConnectionTable } from "./live.js";
import { RefusalLog } from "../refusal-log.js";
import { FrameScanner, HOLD, type FastReader, type FrameSink, type HeldInput, type ScannerLimits } from "./scanner.js";

type Tagged = net.Socket & { [CONNECTION]?: Connection };
/** The listener that accepted a connection, for the shared socket handlers. */
const owner = (conn: Connection) => conn.owner as Listener;

function onSocketData(this: Tagged, chunk: Buffer): void {
  const conn = this[CONNECTION] as Connection;
  if (conn.closed) return; // lingering: discarded
  conn.lastActivity = clockMs();
  const taken = (conn.scanner as FrameScanner).push(chunk);
  if (taken < chunk.length) conn.hold(chunk.subarray(taken));
}

function discard(): void {}

/**
 * The count of unfinished frames' bytes for a server's TCP listeners (one, shared),
 * against --max-partial-input as it is now (a SIGHUP may change it).
 */
export function partialInput(config: Pick<Config, "maxPartialInput">): HeldInput {
  return {
    bytes: 0,
    holders: new Set(),
    get max() {
      return config.maxPartialInput;
    },
  };
}

/** Refused sockets lingering at once; past it a refused socket is destroyed at once. */
const MAX_REFUSING = 1024;
/**
 * Closing connections lingering at once; past it a closing connection is destroyed
 * once its last frames are handed to the socket. A closing connection holds no slot
 * (neither its address's nor its user's), so without this one address could quit
 * connections faster than they linger out and pile up descriptors.
 */
const MAX_LINGERING = 1024;

/** Unauthenticated connections and TLS handshakes of one address (see the top). */
interface AddressSlots {
  conns: Set<Connection>;
  handshakes: number;
}

function onSocketEnd(this: Tagged): void {
  const conn = this[CONNECTION] as Connection;
  owner(conn).ended(conn);
}

function onSocketClose(this: Tagged): void {
  const conn = this[CONNECTION] as Connection;
  owner(conn).closed(conn);
}

function onSocketError(this: Tagged, err: Error): void {
  const conn = this[CONNECTION];
  if (conn) owner(conn).socketError(conn, err);
}

/**
 * What a TCP listener speaks: the native protocol, or a seed dialect (src/doors/).
 * The listener owns the socket, the caps, idle timeouts and shutdown for all of them;
 * the front decodes each complete frame the scanner finds.
 */
export interface Front {
  /** The door's name in logs, /connz and metrics ("native", "rust", "rooms"). */
  readonly name: string;
  /** The codec of a new connection (a dialect's may keep per-connection state). */
  codec(): Codec;
  /** The first frame a new connection gets, if the protocol has a greeting. */
  greeting(codec: Codec): OutFrame | undefined;
  /** A new connection is set up (after its greeting): a door may start work for it. */
  opened?(s: Session): void;
  /** The one line a refused connection gets before it is closed. */
  refusal(code: Code, text: string): OutFrame;
  /** A complete frame (with the attachment that streamed in with it: native only). */
  frame(s: Session, bytes: Buffer, upload: Upload | undefined, ascii: boolean): void;
  /** Frames of a common shape the scanner decodes as it finds them (ScannerLimits.fast), to `decoded`. */
  readonly fast?: FastReader;
  /** A frame `fast` read: its value and its size in bytes. */
  decoded?(s: Session, value: unknown, size: number): void;
  /** Bytes the scanner could not accept. */
  reject(s: Session, code: Code, reason: string, action: string | undefined): void;
  /** The client will send no more: answer what it sent, then close. */
  inputEnded(s: Session): void;
  /** The connection closed: the door lets go of what it holds for it (before the dispatcher's close hooks). */
  closed?(s: Session): void;
  /** Attachments stream to the blob store while frames are scanned (the native door). */
  readonly streams: boolean;
}

/** An upload the listener can pace: it reports a full buffer and its draining. */
export interface PacedUpload extends Upload {
  onFull: (() => void) | undefined;
  onDrain: (() => void) | undefined;
  /** Its frame is complete: all of it has arrived (the blob store no longer takes it for one arriving slowly). */
  arrived?(): void;
}

/**
 * How an upload's sender keeps up (--upload-min-rate): what its connection had read
 * when the current window began, and whether the blob file's buffer paused reading in
 * it (the server's disk, not the client, was slow then).
 */
interface UploadPace {
  upload: PacedUpload;
  since: number;
  bytesIn: number;
  /** What the connection had handed the OS when the window began (its client reading). */
  handed: number;
  /** Reading is paused for the file's buffer now. */
  full: boolean;
  /** ... or was, at some time in this window. */
  wasFull: boolean;
  /** Its frame is complete: the request waits for its turn. */
  complete: boolean;
}

export class Listener implements ConnectionTable, SlotCounter {
  readonly server: net.Server;
  readonly tlsServer: tls.Server | undefined;
  /** Live connections and the protocol session of each. */
  readonly connections = new Map<Connection, Session>();
  /** By addressKey: an address, or with --ipv4-prefix/--ipv6-prefix its network. */
  private readonly perAddress = new Map<string, AddressSlots>();
  /**
   * TLS handshakes in progress, by the client's address and port: a set, since two raw
   * sockets can share one (a source port reused before the first one's close was seen,
   * one port connected to two of the host's addresses), and each must be let go once.
   */
  private readonly handshaking = new Map<string, Set<net.Socket>>();
  private handshakes = 0;
  /** Refused sockets still lingering (destroyed at shutdown). */
  private readonly refusing = new Set<net.Socket>();
  private readonly refusals: RefusalLog;
  /** Connections in `connections` that are closing: they no longer hold a cap slot. */
  private lingering = 0;
  private readonly lingerMs: number;
  private readonly idleSweep: NodeJS.Timeout;
  /** Connections with an attachment arriving, and how fast it comes (checked by the sweep). */
  private readonly uploading = new Map<Connection, UploadPace>();
  private readonly scannerLimits: ScannerLimits;
  private readonly slack = deliverySlack();
  /** Why connections from an address are refused (an operator's ban), if they are. */
  refuseAddress: ((address: string) => string | undefined) | undefined;

  constructor(
    private readonly config: Config,
    private readonly dispatcher: Dispatcher,
    private readonly router: Router,
    readonly front: Front,
    private readonly log: Logger,
    /** Starts the upload of an attachment's text (the blob store's writer). */
    private readonly newUpload: () => PacedUpload,
    private readonly metrics: Metrics,
    /** Unfinished frames' bytes, one count for all the server's TCP listeners (--max-partial-input). */
    held: HeldInput,
  ) {
    const paths = front.streams ? dispatcher.streamedPaths() : [];
    if (paths.length > 1) throw new Error("the scanner streams one field path");
    this.scannerLimits = { maxFrame: config.maxFrame, maxDepth: config.maxDepth, streamPath: paths[0], fast: front.decoded ? front.fast : undefined, held };
    this.lingerMs = config.closeLinger * 1000;
    this.refusals = new RefusalLog(log);
    dispatcher.uploads(newUpload);
    // allowHalfOpen: a client that closes its sending side (`nc -q1`, `nc -N`) still
    // gets every reply to what it sent; the server closes once they are out.
    this.server = net.createServer({ noDelay: true, allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server.on("error", (err) => this.log.error({ err }, "listener error"));
    if (config.tlsCert && config.tlsKey) {
      this.tlsServer = tls.createServer(
        {
          cert: readFileSync(config.tlsCert),
          key: readFileSync(config.tlsKey),
          // Not during the handshake: node ignores a FIN then, and a client that gave up
          // (a port scan, a health check) kept its places against the caps until
          // --tls-handshake-timeout. Half-open from the handshake's end on (accept).
          allowHalfOpen: false,
          handshakeTimeout: config.tlsHandshakeTimeout * 1000,
        },
        (socket) => this.accept(socket),
      );
      this.tlsServer.on("connection", (raw: net.Socket) => this.handshake(raw));
      this.tlsServer.on("tlsClientError", (err, socket) => {
        this.log.debug({ err }, "TLS handshake failed");
        socket.destroy(); // with a listener, node leaves a failed or timed-out handshake open
      });
      this.tlsServer.on("error", (err) => this.log.error({ err }, "TLS listener error"));
    }
    // One timer sweeps every connection (idle limits, delivery confirmations, uploads' pace), not one each.
    const every = Math.min(5000, Math.max(250, (Math.min(config.idleUnauth, config.idleAuth, config.uploadRateWindow) * 1000) / 4));
    this.idleSweep = setInterval(() => this.sweep(), every);
    this.idleSweep.unref();
  }

  /**
   * Reads the certificate and key files again and uses them for new handshakes
   * (SIGHUP after a renewal); connections already up keep theirs. A file that cannot
   * be read or does not parse leaves the current certificate in place.
   */
  reloadTls(): boolean {
    if (!this.tlsServer) return false;
    try {
      this.tlsServer.setSecureContext({ cert: readFileSync(this.config.tlsCert), key: readFileSync(this.config.tlsKey) });
      this.log.info({ cert: this.config.tlsCert }, "TLS certificate reloaded");
      return true;
    } catch (err) {
      this.log.error({ err }, "TLS certificate reload failed; keeping the current one");
      return false;
    }
  }

  listen(server: net.Server, port: number, host: string): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      server.once("error", onError);
      server.listen(port, host, () => {
        server.off("error", onError);
        resolve(server.address() as net.AddressInfo);
      });
    });
  }

  /** The doors its connections show: "tcp" (and "tls" when it listens for TLS) for the native door, else the door's name. */
  get doors(): readonly string[] {
    if (this.front.name !== "native") return [this.front.name];
    return this.tlsServer !== undefined ? ["tcp", "tls"] : ["tcp"];
  }

  /**
   * The listeners whose connections count together against the caps: every door's
   * (server.ts sets it), so that a second door does not double --max-connections.
   */
  group: readonly SlotCounter[] = [this];

  /** Connections holding a slot (not lingering) and handshakes in progress. */
  get held(): number {
    return this.connections.size - this.lingering + this.handshakes;
  }

  /** Open connections, not those closing (the stats action's count). */
  get open(): number {
    return this.connections.size - this.lingering;
  }

  /** Unauthenticated connections and handshakes counted under `key` (addressKey; with `prune`, logged-in ones let go). */
  unauthenticated(key: string, prune: boolean): number {
    const slots = this.perAddress.get(key);
    if (!slots) return 0;
    if (prune) {
      for (const c of slots.conns) if ((c.session as Session).uid !== undefined) slots.conns.delete(c);
      this.dropIfEmpty(key, slots);
    }
    return slots.conns.size + slots.handshakes;
  }

  private slots(key: string): AddressSlots {
    let slots = this.perAddress.get(key);
    if (!slots) this.perAddress.set(key, (slots = { conns: new Set(), handshakes: 0 }));
    return slots;
  }

  private dropIfEmpty(key: string, slots: AddressSlots): void {
    if (slots.conns.size === 0 && slots.handshakes === 0) this.perAddress.delete(key);
  }

  /** A TLS client connected: its handshake holds a place until it completes or fails. */
  private handshake(raw: net.Socket): void {
    const address = socketAddress(raw);
    const key = addressKey(address, this.config);
    const over = overCap(this.group, key, this.config);
    if (over) {
      // Nothing can be said before the handshake: the refusal is the close.
      this.refusals.refused(key, over === "full" ? "server full" : "too many from one address", this.limitOf(over));
      this.metrics.refused++;
      raw.destroy();
      return;
    }
    const id = `${address}:${raw.remotePort ?? 0}`;
    let same = this.handshaking.get(id);
    if (!same) this.handshaking.set(id, (same = new Set()));
    same.add(raw);
    this.handshakes++;
    this.slots(key).handshakes++;
    raw.once("close", () => this.handshakeOver(id, key, raw));
  }

  /**
   * A handshake is over: `raw`'s (closed), or one of those under `id` (completed: the
   * TLS socket does not name its raw one), counted under `key` (addressKey). Each raw
   * socket is let go once.
   */
  private handshakeOver(id: string, key: string, raw?: net.Socket): void {
    const same = this.handshaking.get(id);
    const which = raw ?? same?.values().next().value;
    if (which === undefined || !same?.delete(which)) return;
    if (same.size === 0) this.handshaking.delete(id);
    this.handshakes--;
    const slots = this.perAddress.get(key);
    if (!slots) return;
    slots.handshakes--;
    this.dropIfEmpty(key, slots);
  }

  private limitOf(over: "full" | "address"): number {
    return over === "full" ? this.config.maxConnections : this.config.maxPerAddress;
  }

  /** One line, then the socket is read and discarded until it closes or lingers too long. */
  private refuse(socket: net.Socket, over: "full" | "address" | "banned", reason = ""): void {
    const address = socketAddress(socket);
    this.metrics.refused++;
    if (over === "banned") this.refusals.refused(address, "banned", 0);
    else this.refusals.refused(addressKey(address, this.config), over === "full" ? "server full" : "too many from one address", this.limitOf(over));
    if (this.refusing.size >= MAX_REFUSING) {
      socket.destroy();
      return;
    }
    const line =
      over === "full"
        ? this.front.refusal(Code.Unavailable, "the server is at its connection limit; try again later")
        : over === "banned"
          ? this.front.refusal(Code.Forbidden, `your address is banned${reason ? `: ${reason}` : ""}`)
          : this.front.refusal(Code.RateLimited, "too many connections from your address; try again later");
    this.refusing.add(socket);
    socket.on("data", discard);
    socket.end(line as string);
    const timer = setTimeout(() => socket.destroy(), this.lingerMs);
    timer.unref();
    socket.once("close", () => {
      clearTimeout(timer);
      this.refusing.delete(socket);
    });
  }

  private accept(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on("error", onSocketError);
    const address = socketAddress(socket);
    const key = addressKey(address, this.config);
    // A TLS socket's handshake held its place until now; from here it is half-open as a
    // TCP one is (a client that closes its sending side still gets every reply).
    if (socket instanceof tls.TLSSocket) {
      this.handshakeOver(`${address}:${socket.remotePort ?? 0}`, key);
      socket.allowHalfOpen = true;
    }
    const over = overCap(this.group, key, this.config);
    if (over) return this.refuse(socket, over);
    const banned = this.refuseAddress?.(address);
    if (banned !== undefined) return this.refuse(socket, "banned", banned);
    // No closure per connection: the socket handlers and the scanner's sink are shared
    // and find their connection through the socket (10,000 idle connections).
    const conn = new Connection(socket, this.config.outboundCap, this.slack, this.log, this.lingerMs);
    conn.addressKey = key;
    if (this.front.name !== "native") conn.door = this.front.name;
    else if (socket instanceof tls.TLSSocket) conn.door = "tls";
    this.slots(key).conns.add(conn);
    this.metrics.connectionsOpened++;
    const session = this.dispatcher.open(conn, this.front.codec());
    conn.session = session;
    conn.onConfirmed = this.confirmed;
    conn.onEnding = this.ending;
    conn.onOverflow = this.overflowed;
    conn.scanner = new FrameScanner<PacedUpload, Connection>(this.scannerLimits, this.sink, conn);
    this.connections.set(conn, session);
    conn.owner = this;
    socket.on("data", onSocketData);
    socket.on("end", onSocketEnd);
    socket.on("close", onSocketClose);
    const greeting = this.front.greeting(session.codec);
    if (greeting !== undefined) conn.send(greeting, false);
    this.front.opened?.(session);
    this.log.debug({ conn: conn.id, remote: conn.remote, door: this.front.name, tls: socket instanceof tls.TLSSocket }, "connection opened");
  }

  private readonly overflowed = (): void => {
    this.metrics.closes.slow_reader++;
  };

  private readonly confirmed = (conn: Connection, seq: number): void => this.router.confirmed(conn.session as Session, seq);

  /** A closing connection lingers a little (see Connection.end) without holding a slot. */
  private readonly ending = (conn: Connection): void => {
    if (++this.lingering > MAX_LINGERING) conn.cutLinger();
    const slots = this.perAddress.get(conn.addressKey);
    if (slots?.conns.delete(conn)) this.dropIfEmpty(conn.addressKey, slots);
  };

  /** The scanner's sink, shared by every connection of this listener. */
  private readonly sink: FrameSink<PacedUpload, Connection> = {
    frame: (bytes, upload, conn, ascii) => {
      // Its frame is complete, so its attachment has all arrived: from now on its
      // request waits its turn (checkPace).
      if (upload !== undefined) {
        const pace = this.uploading.get(conn);
        if (pace !== undefined) pace.complete = true;
        upload.arrived?.();
      }
      this.front.frame(conn.session as Session, bytes, upload, ascii);
    },
    decoded: (value, size, conn) => this.front.decoded?.(conn.session as Session, value, size),
    reject: (code, reason, action, conn) => this.front.reject(conn.session as Session, code, reason, action),
    upload: (conn, action) => {
      // Only a logged-in connection streams, and only for an action that takes an
      // attachment: anything else stays an ordinary string within the frame limit, so
      // no file is opened for a client that has not proven who it is. A connection
      // that is not logged in yet but has requests in flight (an auth sent just
      // before) waits for their replies before this is decided.
      if (action === undefined || !this.dispatcher.streams(action)) return undefined;
      const session = conn.session as Session;
      if (session.uid === undefined) return this.dispatcher.answered(session) ? undefined : HOLD;
      // One upload at a time per connection: each holds a file open until it is
      // finished, so input waits (with no memory held) until the previous one is done.
      if (conn.uploads > 0) return HOLD;
      return this.startUpload(conn);
    },
  };

  private startUpload(conn: Connection): PacedUpload {
    const up = this.newUpload();
    conn.uploads++;
    const pace: UploadPace = { upload: up, since: Date.now(), bytesIn: conn.bytesIn, handed: conn.handed, full: false, wasFull: false, complete: false };
    this.uploading.set(conn, pace);
    let open = true;
    const done = () => {
      if (!open) return;
      open = false;
      conn.uploads--;
      this.uploading.delete(conn);
      conn.unhold();
    };
    const { finish, abort, release } = up;
    up.finish = () => {
      // The attachment has all arrived: its storing (fsync, rename) is the server's time.
      this.uploading.delete(conn);
      const p = finish.call(up);
      p.then(done, done);
      return p;
    };
    up.abort = () => {
      abort.call(up);
      done();
    };
    up.release = () => {
      release.call(up);
      done();
    };
    // Reading pauses while the blob file cannot keep up, so an attachment never
    // piles up in memory.
    up.onFull = () => {
      pace.full = pace.wasFull = true;
      conn.pause("upload");
    };
    up.onDrain = () => {
      pace.full = false;
      conn.resume("upload");
    };
    return up;
  }

  socketError(conn: Connection, err: Error): void {
    this.log.debug({ err, remote: conn.address }, "socket error");
  }

  /**
   * Closes every connection from `address` (an operator's ban), after telling it why;
   * returns how many.
   */
  closeAddress(address: string, reason: string): number {
    return closeFromAddress(this.connections, address, reason, this.router);
  }

  /** The client will send no more. */
  ended(conn: Connection): void {
    this.front.inputEnded(conn.session as Session);
  }

  closed(conn: Connection): void {
    const { bytesIn: bytesRead, bytesOut: bytesWritten } = conn;
    this.metrics.bytesInClosed += bytesRead;
    this.metrics.bytesOutClosed += bytesWritten;
    this.log.debug({ conn: conn.id, remote: conn.address, uid: (conn.session as Session).uid, bytesRead, bytesWritten }, "connection closed");
    conn.closedSocket();
    if (this.connections.delete(conn) && conn.isEnding) this.lingering--;
    const slots = this.perAddress.get(conn.addressKey);
    if (slots?.conns.delete(conn)) this.dropIfEmpty(conn.addressKey, slots);
    (conn.scanner as FrameScanner<PacedUpload, Connection>).close();
    this.front.closed?.(conn.session as Session);
    this.dispatcher.close(conn.session as Session);
  }

  /**
   * The periodic sweep: closes connections silent for longer than their idle limit
   * (any request counts) and settles delivery confirmations on quiet ones.
   */
  private sweep(): void {
    const now = Date.now();
    this.refusals.sweep(now);
    for (const [conn, session] of this.connections) {
      conn.tick();
      this.recount(conn, session);
      closeIfIdle(conn, session, now, this.config, this.log, this.metrics, this.router);
    }
    for (const [conn, pace] of this.uploading) this.checkPace(conn, pace, now);
  }

  /**
   * Gives up an upload whose sender brought fewer than --upload-min-rate bytes a second
   * over the last window, and closes its connection (the frame cannot be answered before
   * it ends). Each upload holds its share of --max-uploading, and a client trickling
   * many held it for as long as it liked. A window in which the blob file's buffer
   * paused reading (the server's disk was slow) does not count; other pauses do (a
   * client that does not read its replies pauses its own input).
   */
  private checkPace(conn: Connection, pace: UploadPace, now: number): void {
    const windowMs = this.config.uploadRateWindow * 1000;
    if (conn.closed || now - pace.since < windowMs) return;
    const brought = conn.bytesIn - pace.bytesIn;
    const took = conn.handed - pace.handed;
    const needed = this.config.uploadMinRate * (now - pace.since) / 1000;
    // Arrived, its request waits its turn: behind replies the client reads (at the same
    // minimum rate), or the server's own work (nothing waiting to be sent). A client
    // that reads nothing holds its share and its file no longer than one arriving slowly.
    // Once it has arrived, what the client sends (other frames) renews nothing.
    const keeping = pace.complete ? took >= needed || conn.outbound === 0 : brought >= needed;
    if (keeping || pace.wasFull) {
      pace.since = now;
      pace.bytesIn = conn.bytesIn;
      pace.handed = conn.handed;
      pace.wasFull = pace.full;
      return;
    }
    const session = this.connections.get(conn) as Session;
    const seconds = Math.round((now - pace.since) / 1000);
    const bytes = pace.complete ? took : brought;
    const what = pace.complete ? "attachment waiting for a client that does not read its replies" : "attachment arriving too slowly";
    this.log.info({ conn: conn.id, remote: conn.remote, uid: session.uid, bytes, seconds }, `${what}; closing`);
    this.metrics.closes.slow_upload++;
    pace.upload.abort(); // its file and its share of --max-uploading go now
    this.router.sendTo(session, { kind: "close", reason: `${what}: ${bytes} bytes${pace.complete ? " read" : ""} in ${seconds} s, at least ${this.config.uploadMinRate} a second needed` });
    conn.end();
  }

  /** A connection counts toward its address while it is not logged in (logged out: again). */
  private recount(conn: Connection, session: Session): void {
    if (conn.closed) return;
    const unauth = session.uid === undefined;
    const slots = this.perAddress.get(conn.addressKey);
    if (unauth === (slots?.conns.has(conn) ?? false)) return;
    if (unauth) this.slots(conn.addressKey).conns.add(conn);
    else if (slots) {
      slots.conns.delete(conn);
      this.dropIfEmpty(conn.addressKey, slots);
    }
  }

  /**
   * Graceful stop: no new connections, no more reading; requests already read are
   * answered (up to `timeoutMs`); then every connection is ended after flushing, and
   * one not closed within `graceMs` (the linger time) is cut off. Refused sockets and
   * TLS handshakes are cut off at once. Bounded whatever clients do.
   */
  async close(timeoutMs: number, graceMs = this.lingerMs): Promise<void> {
    clearInterval(this.idleSweep);
    const servers = [this.server, this.tlsServer].filter((x): x is net.Server => x !== undefined && x.listening);
    const closed = Promise.all(servers.map((srv) => new Promise<void>((r) => srv.close(() => r()))));
    for (const socket of this.refusing) socket.destroy();
    for (const same of this.handshaking.values()) for (const socket of same) socket.destroy();
    for (const conn of this.connections.keys()) conn.pause("shutdown");
    if (!(await this.dispatcher.settled(timeoutMs, this.connections.values()))) {
      this.log.warn("requests still in progress at the shutdown timeout");
    }
    endAll(this.connections, this.router);
    const timer = setTimeout(() => {
      for (const conn of this.connections.keys()) conn.destroy();
      for (const socket of this.refusing) socket.destroy();
      for (const same of this.handshaking.values()) for (const socket of same) socket.destroy();
    }, graceMs);
    // A socket the listener does not know of must not hold the stop up either.
    if (!(await within(closed, graceMs + 1000))) this.log.warn("sockets still open after the shutdown grace time");
    clearTimeout(timer);
  }
}
