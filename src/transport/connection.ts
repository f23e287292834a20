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
  /** Frames not yet written, in order; `callbacks[i]` belongs to `chunks[i]`. */
  private chunks: OutFrame[] = [];
  private callbacks: (FlushCallback | undefined)[] = [];
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
    this.remote = `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? 0}`;
    socket.on("drain", () => this.resume("drain"));
  }

  get closed(): boolean {
    return this.ending || this.socket.destroyed;
  }

  send(frame: OutFrame, onFlushed?: FlushCallback): void {
    if (this.closed) {
      if (onFlushed) queueMicrotask(() => onFlushed(false));
      return;
    }
    this.chunks.push(frame);
    this.callbacks.push(onFlushed);
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
      if (this.ending && !this.socket.destroyed) this.socket.end();
      return;
    }
    let n = 0;
    while (n < this.chunks.length && typeof this.chunks[n] === "string") n++;
    const strings = this.chunks.splice(0, n) as string[];
    const cbs = this.callbacks.splice(0, n).filter((cb): cb is FlushCallback => cb !== undefined);
    if (this.socket.destroyed) {
      this.fail(cbs);
      this.fail(this.callbacks.splice(0).filter((cb): cb is FlushCallback => cb !== undefined));
      this.chunks = [];
      this.queuedLength = 0;
      return;
    }
    if (n > 0) {
      const data = n === 1 ? strings[0] : strings.join("");
      this.queuedLength -= data.length;
      this.socket.write(data, cbs.length === 0 ? undefined : (err) => {
        for (const cb of cbs) cb(!err);
      });
      if (this.socket.writableLength > this.outboundCap) return this.overflow(this.socket.writableLength);
    }
    if (this.chunks.length > 0) {
      const frame = this.chunks.shift() as StreamedFrame;
      const cb = this.callbacks.shift();
      void this.pump(frame, cb);
    } else if (this.ending) {
      this.socket.end();
    } else if (this.socket.writableNeedDrain) {
      this.pause("drain");
    }
  }

  /** Writes a streamed frame part by part, waiting for 'drain' whenever the socket is full. */
  private async pump(frame: StreamedFrame, cb: FlushCallback | undefined): Promise<void> {
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
    if (cb) {
      if (ok) this.socket.write("", (err) => cb(!err));
      else cb(false);
    }
    this.schedule();
  }

  private async writePiece(piece: string): Promise<void> {
    if (this.socket.destroyed) throw new Error("connection closed");
    if (this.socket.write(piece)) return;
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
    this.fail(this.callbacks.splice(0).filter((cb): cb is FlushCallback => cb !== undefined));
    this.chunks = [];
    this.queuedLength = 0;
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
