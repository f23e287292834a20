// The listeners (TCP, and TLS when a certificate is configured): accept sockets, wire
// each one's bytes through a FrameScanner into the dispatcher, enforce the connection
// caps and idle timeouts, and shut down gracefully.

import { readFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import type { Logger } from "pino";
import type { Config } from "../config.js";
import type { Codec } from "../protocol/codec.js";
import { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import type { Router } from "../protocol/router.js";
import type { Session, Upload } from "../protocol/session.js";
import { CONNECTION, Connection, deliverySlack } from "./connection.js";
import { FrameScanner, type FrameSink, type ScannerLimits } from "./scanner.js";

type Tagged = net.Socket & { [CONNECTION]?: Connection };
/** The listener that accepted a connection, for the shared socket handlers. */
const owner = (conn: Connection) => conn.owner as Listener;

function onSocketData(this: Tagged, chunk: Buffer): void {
  const conn = this[CONNECTION] as Connection;
  conn.lastActivity = Date.now();
  (conn.scanner as FrameScanner).push(chunk);
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

/** An upload the listener can pace: it reports a full buffer and its draining. */
export interface PacedUpload extends Upload {
  onFull: (() => void) | undefined;
  onDrain: (() => void) | undefined;
}

export class Listener {
  readonly server: net.Server;
  readonly tlsServer: tls.Server | undefined;
  /** Live connections and the protocol session of each. */
  readonly connections = new Map<Connection, Session>();
  private readonly perAddress = new Map<string, number>();
  private readonly idleSweep: NodeJS.Timeout;
  private readonly scannerLimits: ScannerLimits;
  private readonly slack = deliverySlack();

  constructor(
    private readonly config: Config,
    private readonly dispatcher: Dispatcher,
    private readonly router: Router,
    private readonly codec: Codec,
    private readonly log: Logger,
    /** Starts the upload of an attachment's text (the blob store's writer). */
    private readonly newUpload: () => PacedUpload,
  ) {
    const paths = dispatcher.streamedPaths();
    if (paths.length > 1) throw new Error("the scanner streams one field path");
    this.scannerLimits = { maxFrame: config.maxFrame, maxDepth: config.maxDepth, streamPath: paths[0] };
    // allowHalfOpen: a client that closes its sending side (`nc -q1`, `nc -N`) still
    // gets every reply to what it sent; the server closes once they are out.
    this.server = net.createServer({ noDelay: true, allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server.on("error", (err) => this.log.error({ err }, "listener error"));
    if (config.tlsCert && config.tlsKey) {
      this.tlsServer = tls.createServer(
        { cert: readFileSync(config.tlsCert), key: readFileSync(config.tlsKey), allowHalfOpen: true },
        (socket) => this.accept(socket),
      );
      this.tlsServer.on("tlsClientError", (err) => this.log.debug({ err }, "TLS handshake failed"));
      this.tlsServer.on("error", (err) => this.log.error({ err }, "TLS listener error"));
    }
    // One timer sweeps every connection (idle limits, delivery confirmations), not one each.
    const every = Math.min(5000, Math.max(250, (Math.min(config.idleUnauth, config.idleAuth) * 1000) / 4));
    this.idleSweep = setInterval(() => this.sweep(), every);
    this.idleSweep.unref();
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

  private accept(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on("error", onSocketError);
    const address = socket.remoteAddress ?? "?";
    if (this.connections.size >= this.config.maxConnections) {
      this.log.warn({ remote: address, limit: this.config.maxConnections }, "connection refused: server full");
      socket.end(this.codec.error("unknown", Code.Unavailable, "the server is at its connection limit; try again later") as string);
      return;
    }
    const fromAddress = this.perAddress.get(address) ?? 0;
    if (fromAddress >= this.config.maxPerAddress) {
      this.log.warn({ remote: address, limit: this.config.maxPerAddress }, "connection refused: too many from one address");
      socket.end(this.codec.error("unknown", Code.RateLimited, "too many connections from your address; try again later") as string);
      return;
    }
    this.perAddress.set(address, fromAddress + 1);
    // No closure per connection: the socket handlers and the scanner's sink are shared
    // and find their connection through the socket (10,000 idle connections).
    const conn = new Connection(socket, this.config.outboundCap, this.slack, this.log);
    const session = this.dispatcher.open(conn, this.codec);
    conn.session = session;
    conn.onConfirmed = this.confirmed;
    conn.scanner = new FrameScanner<PacedUpload, Connection>(this.scannerLimits, this.sink, conn);
    this.connections.set(conn, session);
    conn.owner = this;
    socket.on("data", onSocketData);
    socket.on("end", onSocketEnd);
    socket.on("close", onSocketClose);
    conn.send(this.codec.welcome(), false);
  }

  private readonly confirmed = (conn: Connection, seq: number): void => this.router.confirmed(conn.session as Session, seq);

  /** The scanner's sink, shared by every connection of this listener. */
  private readonly sink: FrameSink<PacedUpload, Connection> = {
    frame: (bytes, upload, conn, ascii) => this.dispatcher.frame(conn.session as Session, bytes, upload, ascii),
    reject: (code, reason, action, conn) => this.dispatcher.reject(conn.session as Session, code, reason, action),
    upload: (conn) => {
      // Reading pauses while the blob file cannot keep up, so an attachment never
      // piles up in memory.
      const up = this.newUpload();
      up.onFull = () => conn.pause("upload");
      up.onDrain = () => conn.resume("upload");
      return up;
    },
  };

  socketError(conn: Connection, err: Error): void {
    this.log.debug({ err, remote: conn.address }, "socket error");
  }

  /** The client will send no more. */
  ended(conn: Connection): void {
    this.dispatcher.inputEnded(conn.session as Session);
  }

  closed(conn: Connection): void {
    conn.closedSocket();
    this.connections.delete(conn);
    const n = (this.perAddress.get(conn.address) ?? 1) - 1;
    if (n > 0) this.perAddress.set(conn.address, n);
    else this.perAddress.delete(conn.address);
    (conn.scanner as FrameScanner<PacedUpload, Connection>).close();
    this.dispatcher.close(conn.session as Session);
  }

  /**
   * The periodic sweep: closes connections silent for longer than their idle limit
   * (any request counts) and settles delivery confirmations on quiet ones.
   */
  private sweep(): void {
    const now = Date.now();
    for (const [conn, session] of this.connections) {
      conn.tick();
      const limit = session.uid === undefined ? this.config.idleUnauth : this.config.idleAuth;
      if (conn.closed || now - conn.lastActivity <= limit * 1000) continue;
      this.log.info({ conn: conn.id, remote: conn.remote, uid: session.uid, idle: limit }, "idle timeout; closing");
      this.router.sendTo(session, { kind: "close", reason: `idle timeout: nothing received for ${limit} s` });
      conn.end();
    }
  }

  /**
   * Graceful stop: no new connections, no more reading; requests already read are
   * answered (up to `timeoutMs`); then every connection is ended after flushing, and
   * a peer that has not closed its side within `graceMs` is cut off.
   */
  async close(timeoutMs: number, graceMs = 2000): Promise<void> {
    clearInterval(this.idleSweep);
    const servers = [this.server, this.tlsServer].filter((x): x is net.Server => x !== undefined && x.listening);
    const closed = Promise.all(servers.map((srv) => new Promise<void>((r) => srv.close(() => r()))));
    for (const conn of this.connections.keys()) conn.pause("shutdown");
    if (!(await this.dispatcher.settled(timeoutMs, this.connections.values()))) {
      this.log.warn("requests still in progress at the shutdown timeout");
    }
    for (const conn of this.connections.keys()) conn.end();
    const timer = setTimeout(() => {
      for (const conn of this.connections.keys()) conn.destroy();
    }, graceMs);
    await closed;
    clearTimeout(timer);
  }
}
