// The TCP listener: accepts sockets, wires each one's bytes through a FrameScanner into
// the dispatcher, and enforces the connection cap.

import net from "node:net";
import type { Logger } from "pino";
import type { Config } from "../config.js";
import { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import { errorFrame, welcomeFrame } from "../protocol/frames.js";
import type { Upload } from "../protocol/session.js";
import { Connection } from "./connection.js";
import { FrameScanner } from "./scanner.js";

/** An upload the listener can pace: it reports a full buffer and its draining. */
export interface PacedUpload extends Upload {
  onFull: (() => void) | undefined;
  onDrain: (() => void) | undefined;
}

export class Listener {
  readonly server: net.Server;
  readonly connections = new Set<Connection>();

  constructor(
    private readonly config: Config,
    private readonly dispatcher: Dispatcher,
    private readonly log: Logger,
    /** Starts the upload of an attachment's text (the blob store's writer). */
    private readonly newUpload: () => PacedUpload,
  ) {
    // allowHalfOpen: a client that closes its sending side (`nc -q1`, `nc -N`) still
    // gets every reply to what it sent; the server closes once they are out.
    this.server = net.createServer({ noDelay: true, allowHalfOpen: true }, (socket) => this.accept(socket));
    this.server.on("error", (err) => this.log.error({ err }, "listener error"));
  }

  listen(port: number, host: string): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      this.server.once("error", onError);
      this.server.listen(port, host, () => {
        this.server.off("error", onError);
        resolve(this.server.address() as net.AddressInfo);
      });
    });
  }

  private accept(socket: net.Socket): void {
    socket.on("error", (err) => this.log.debug({ err, remote: socket.remoteAddress }, "socket error"));
    if (this.connections.size >= this.config.maxConnections) {
      this.log.warn({ remote: socket.remoteAddress, limit: this.config.maxConnections }, "connection refused: server full");
      socket.end(errorFrame("unknown", Code.Unavailable, "the server is at its connection limit; try again later"));
      return;
    }
    const conn = new Connection(socket, this.config.outboundCap, this.log);
    this.connections.add(conn);
    const session = this.dispatcher.open(conn);
    const scanner = new FrameScanner<PacedUpload>(this.config, {
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
    socket.on("end", () => {
      conn.peerEnded = true;
      this.dispatcher.inputEnded(session);
    });
    socket.on("close", () => {
      this.connections.delete(conn);
      scanner.close();
      this.dispatcher.close(session);
    });
    conn.send(welcomeFrame());
  }

  /**
   * Stops accepting and ends every connection after flushing what it was sent; a peer
   * that has not closed its side within `graceMs` is cut off.
   */
  async close(graceMs = 2000): Promise<void> {
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const c of this.connections) c.end();
    const timer = setTimeout(() => {
      for (const c of this.connections) c.destroy();
    }, graceMs);
    await closed;
    clearTimeout(timer);
  }
}
