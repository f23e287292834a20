// One client socket: its outbound writer and its read-side backpressure.
//
// Outbound frames are coalesced: everything queued for a socket during one turn of the
// event loop goes out in a single write() at setImmediate, so a burst of replies and
// events costs one syscall, not one per frame. write()'s return value is respected:
// while the socket's buffer is over its high-water mark the connection stops reading
// requests (a client that pipelines without reading gets slowed, not killed); once
// the bytes waiting for a client pass the outbound cap, it is closed as a slow reader
// and the frames it never got report failure to their senders (so queued messages
// stay queued).

import type { Socket } from "node:net";
import type { Logger } from "pino";
import type { OutFrame, Peer, StreamedFrame } from "../protocol/session.js";

type FlushCallback = (ok: boolean) => void;

/**
 * Bytes that must go out after a frame before it counts as delivered. Frames handed to
 * the OS can still sit unread in the kernel's send and receive buffers (4 MiB and
 * more on Linux); if the connection dies, they are gone. Past this much later traffic
 * the client has certainly read the frame.
 */
export const DELIVERY_SLACK = 16 * 1024 * 1024;

interface Unconfirmed {
  /** `written` at which these frames count as delivered. */
  until: number;
  /** When they were handed to the OS (ms). */
  at: number;
  confirms: FlushCallback[];
}

const defined = <T>(x: T | undefined): x is T => x !== undefined;

const dirty: Connection[] = [];
let flushScheduled = false;

function flushAll(): void {
  flushScheduled = false;
  const list = dirty.splice(0);
  for (const c of list) c.flush();
}

let nextId = 1;

const reasonBits = new Map<string, number>();
function reasonBit(why: string): number {
  let bit = reasonBits.get(why);
  if (bit === undefined) {
    if (reasonBits.size >= 31) throw new Error("too many pause reasons");
    bit = 1 << reasonBits.size;
    reasonBits.set(why, bit);
  }
  return bit;
}

export class Connection implements Peer {
  readonly id = nextId++;
  readonly remote: string;
  readonly address: string;
  /** Frames not yet written, in order; `callbacks[i]` belongs to `chunks[i]`. */
  private chunks: OutFrame[] = [];
  private callbacks: (FlushCallback | undefined)[] = [];
  private confirms: (FlushCallback | undefined)[] = [];
  /** Characters handed to the OS so far. */
  private written = 0;
  /** Flushed frames waiting to count as delivered, oldest first. */
  private unconfirmed: Unconfirmed[] = [];
  /** The client closed its side in an orderly way (FIN). */
  peerEnded = false;
  /** Characters in queued string frames (frames behind a stream wait here). */
  private queuedLength = 0;
  private queued = false;
  /** A StreamedFrame is being written; everything queued waits behind it. */
  private pumping = false;
  private ending = false;
  /** Why reading is paused: one bit per reason (see reasonBit). */
  private pausedFor = 0;
  /** Unix ms of the last bytes received. */
  lastActivity = Date.now();

  constructor(
    readonly socket: Socket,
    private readonly outboundCap: number,
    private readonly log: Logger,
  ) {
    this.address = socket.remoteAddress ?? "?";
    this.remote = `${this.address}:${socket.remotePort ?? 0}`;
    socket.on("drain", () => this.resume("drain"));
    socket.on("close", (hadError) => {
      // Only the client's own clean close (FIN, no error) confirms what was sent; a
      // connection cut off (slow reader, reset, closed by us first) confirms nothing
      // still pending, which stays queued for the next auth.
      const orderly = this.peerEnded && !hadError;
      const pending = this.unconfirmed.splice(0);
      for (const u of pending) for (const cb of u.confirms) cb(orderly);
      for (const cb of this.confirms.splice(0)) cb?.(false);
    });
  }

  /** Records `n` more characters handed to the OS and confirms what that settles. */
  private wrote(n: number, confirms: FlushCallback[]): void {
    this.written += n;
    if (confirms.length > 0) this.unconfirmed.push({ until: this.written + DELIVERY_SLACK, at: Date.now(), confirms });
    while (this.unconfirmed.length > 0 && this.unconfirmed[0].until <= this.written) {
      for (const cb of (this.unconfirmed.shift() as Unconfirmed).confirms) cb(true);
    }
  }

  /**
   * Confirms frames handed to the OS at least `ageMs` ago, once nothing is waiting to
   * be written: a client that kept the connection open that long with its buffers
   * drained has read them. (Without it, a quiet connection would hold its unconfirmed
   * frames, and their queue entries, until it closed.)
   */
  confirmAged(now: number, ageMs: number): void {
    if (this.socket.destroyed || this.socket.writableLength > 0 || this.chunks.length > 0) return;
    while (this.unconfirmed.length > 0 && now - this.unconfirmed[0].at >= ageMs) {
      for (const cb of (this.unconfirmed.shift() as Unconfirmed).confirms) cb(true);
    }
  }

  get closed(): boolean {
    return this.ending || this.socket.destroyed;
  }

  get congested(): boolean {
    return this.queuedLength + this.socket.writableLength > this.outboundCap / 4 || this.pumping;
  }

  send(frame: OutFrame, onFlushed?: FlushCallback, onConfirmed?: FlushCallback): void {
    if (this.closed) {
      if (onFlushed || onConfirmed) {
        queueMicrotask(() => {
          onFlushed?.(false);
          onConfirmed?.(false);
        });
      }
      return;
    }
    this.chunks.push(frame);
    this.callbacks.push(onFlushed);
    this.confirms.push(onConfirmed);
    if (typeof frame === "string") this.queuedLength += frame.length;
    if (this.queuedLength > this.outboundCap) return this.overflow(this.queuedLength);
    this.schedule();
  }

  private schedule(): void {
    if (this.queued || this.pumping) return;
    this.queued = true;
    dirty.push(this);
    if (!flushScheduled) {
      flushScheduled = true;
      setImmediate(flushAll);
    }
  }

  /** Writes the queued string frames in one write(), up to the first streamed frame. */
  flush(): void {
    this.queued = false;
    if (this.pumping) return;
    if (this.chunks.length === 0) {
      if (this.ending && !this.socket.destroyed) this.closeAfterFlush();
      return;
    }
    let n = 0;
    while (n < this.chunks.length && typeof this.chunks[n] === "string") n++;
    const strings = this.chunks.splice(0, n) as string[];
    const cbs = this.callbacks.splice(0, n).filter(defined);
    const confirms = this.confirms.splice(0, n).filter(defined);
    if (this.socket.destroyed) {
      this.fail([...cbs, ...confirms]);
      this.dropQueued();
      return;
    }
    if (n > 0) {
      const data = n === 1 ? strings[0] : strings.join("");
      this.queuedLength -= data.length;
      this.socket.write(data, (err) => {
        for (const cb of cbs) cb(!err);
        if (err) this.fail(confirms);
        else this.wrote(data.length, confirms);
      });
      if (this.socket.writableLength > this.outboundCap) return this.overflow(this.socket.writableLength);
    }
    if (this.chunks.length > 0) {
      const frame = this.chunks.shift() as StreamedFrame;
      const cb = this.callbacks.shift();
      const confirm = this.confirms.shift();
      void this.pump(frame, cb, confirm);
    } else if (this.ending) {
      this.closeAfterFlush();
    } else if (this.socket.writableNeedDrain) {
      this.pause("drain");
    }
  }

  /** Writes a streamed frame part by part, waiting for 'drain' whenever the socket is full. */
  private async pump(frame: StreamedFrame, cb: FlushCallback | undefined, confirm: FlushCallback | undefined): Promise<void> {
    this.pumping = true;
    let ok = false;
    try {
      for (const part of frame.parts) {
        if (typeof part === "string") {
          await this.writePiece(part);
        } else {
          for await (const piece of part()) await this.writePiece(piece);
        }
      }
      ok = true;
    } catch (err) {
      // Half a frame has gone out: the stream cannot be resynchronised. Close it.
      if (!this.socket.destroyed) {
        this.log.error({ err, conn: this.id }, "streaming a frame failed; closing");
        this.socket.destroy();
      }
    } finally {
      this.pumping = false;
    }
    if (ok) {
      this.socket.write("", (err) => {
        cb?.(!err);
        if (err) confirm?.(false);
        else this.wrote(0, confirm ? [confirm] : []);
      });
    } else {
      cb?.(false);
      confirm?.(false);
    }
    this.schedule();
  }

  private async writePiece(piece: string): Promise<void> {
    if (this.socket.destroyed) throw new Error("connection closed");
    const accepted = this.socket.write(piece, (err) => {
      if (!err) this.wrote(piece.length, []);
    });
    if (accepted) return;
    await new Promise<void>((resolve, reject) => {
      const done = () => {
        this.socket.off("drain", done);
        this.socket.off("close", done);
        if (this.socket.destroyed) reject(new Error("connection closed"));
        else resolve();
      };
      this.socket.on("drain", done);
      this.socket.on("close", done);
    });
  }

  private fail(cbs: FlushCallback[]): void {
    for (const cb of cbs) cb(false);
  }

  private overflow(waiting: number): void {
    this.log.warn(
      { conn: this.id, remote: this.remote, waiting, cap: this.outboundCap },
      "slow reader over its outbound cap; closing",
    );
    this.socket.destroy();
    this.dropQueued();
  }

  /** Everything still queued will never be sent. */
  private dropQueued(): void {
    this.fail([...this.callbacks.splice(0), ...this.confirms.splice(0)].filter(defined));
    this.chunks = [];
    this.queuedLength = 0;
  }

  /**
   * Closes the socket once what was written is out. A client that half-closed is
   * done; any other is not waited for (it would keep its slot against the caps).
   */
  private closeAfterFlush(): void {
    this.socket.destroySoon();
  }

  /** Flushes everything queued (streams included), then closes. */
  end(): void {
    if (this.ending) return;
    this.ending = true;
    this.flush();
  }

  destroy(): void {
    this.socket.destroy();
  }

  pause(why: string): void {
    if (this.pausedFor === 0) this.socket.pause();
    this.pausedFor |= reasonBit(why);
  }

  resume(why: string): void {
    const bit = reasonBit(why);
    if ((this.pausedFor & bit) === 0) return;
    this.pausedFor &= ~bit;
    if (this.pausedFor === 0 && !this.socket.destroyed) this.socket.resume();
  }
}
