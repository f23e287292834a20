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
import type { Peer } from "../protocol/session.js";

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
  private chunks: string[] = [];
  private callbacks: FlushCallback[] = [];
  private queued = false;
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

  send(frame: string, onFlushed?: FlushCallback): void {
    if (this.closed) {
      if (onFlushed) queueMicrotask(() => onFlushed(false));
      return;
    }
    this.chunks.push(frame);
    if (onFlushed) this.callbacks.push(onFlushed);
    if (!this.queued) {
      this.queued = true;
      dirty.push(this);
      if (!flushScheduled) {
        flushScheduled = true;
        setImmediate(flushAll);
      }
    }
  }

  flush(): void {
    this.queued = false;
    if (this.chunks.length === 0) return;
    const data = this.chunks.length === 1 ? this.chunks[0] : this.chunks.join("");
    const cbs = this.callbacks;
    this.chunks = [];
    this.callbacks = [];
    if (this.socket.destroyed) {
      for (const cb of cbs) cb(false);
      return;
    }
    this.socket.write(data, cbs.length === 0 ? undefined : (err) => {
      for (const cb of cbs) cb(!err);
    });
    if (this.socket.writableLength > this.outboundCap) {
      this.log.warn(
        { conn: this.id, remote: this.remote, waiting: this.socket.writableLength, cap: this.outboundCap },
        "slow reader over its outbound cap; closing",
      );
      this.socket.destroy();
    } else if (this.socket.writableNeedDrain) {
      this.pause("drain");
    }
  }

  end(): void {
    if (this.ending) return;
    this.flush();
    this.ending = true;
    this.socket.end();
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
