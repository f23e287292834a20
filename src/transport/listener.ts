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
import { Connection, deliverySlack } from "./connection.js";
import { FrameScanner, type ScannerLimits } from "./scanner.js";

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
    socket.on("error", (err) => this.log.debug({ err, remote: socket.remoteAddress }, "socket error"));
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
    const conn = new Connection(socket, this.config.outboundCap, this.slack, this.log);
    const session = this.dispatcher.open(conn, this.codec);
    conn.onConfirmed = (seq) => this.router.confirmed(session, seq);
    this.connections.set(conn, session);
    const scanner = new FrameScanner<PacedUpload>(this.scannerLimits, {
      frame: (bytes, upload) => this.dispatcher.frame(session, bytes, upload),
      reject: (code, reason, action) => this.dispatcher.reject(session, code, reason, action),
      upload: () => {
        // Reading pauses while the blob file cannot keep up, so an attachment never
        // piles up in memory.
        const up = this.newUpload();
        up.onFull = () => conn.pause("upload");
        up.onDrain = () => conn.resume("upload");
        return up;
      },
    });
    socket.on("data", (chunk: Buffer) => {
      conn.lastActivity = Date.now();
      scanner.push(chunk);
    });
    socket.on("end", () => this.dispatcher.inputEnded(session));
    socket.on("close", () => {
      this.connections.delete(conn);
      const n = (this.perAddress.get(address) ?? 1) - 1;
      if (n > 0) this.perAddress.set(address, n);
      else this.perAddress.delete(address);
      scanner.close();
      this.dispatcher.close(session);
    });
    conn.send(this.codec.welcome(), false);
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
