// One client socket: its outbound writer, the one count of its outbound bytes, and
// delivery confirmation for clients that do not acknowledge.
//
// Outbound frames are coalesced: everything queued for a socket during one callback
// (a socket's data, a batch's commit, with the promises it settles) goes out in a
// single write() on process.nextTick, so a burst of replies and events costs one
// syscall, not one per frame. (At setImmediate they also waited for every other
// socket read in the same poll phase: S2 at 5,000 msg/s, five back-to-back pairs of
// runs, p99 delivery 6.1-14.7 ms (median 8.1) at setImmediate against 4.8-11.5 ms
// (median 5.7) at nextTick; S1 unchanged within its noise.)
//
// A streamed frame (an attachment read from disk, a long list read page by page) is
// written piece by piece (what its parts yield, joined to 64 KiB writes: streamPieces
// in peer-common.ts), each piece only once the socket has drained, and frames queued
// behind it wait.
//
// Every outbound character counts: the characters queued here plus the socket's own
// buffer (strings written with decodeStrings off: it counts them in UTF-16 units, as
// queuedChars does; counting UTF-8 bytes would take a pass over every frame, and for
// ASCII, nearly everything sent, the two are the same). An event that would take that
// past the outbound cap closes the connection as a slow reader (its inbox entries stay
// unconfirmed, so nothing is lost), unless it is one event larger than the cap behind
// no more than a quarter of it (see send); a reply never does, because the dispatcher runs a
// connection's next request only once the connection is no longer congested (a
// quarter of the cap), and large replies stream.
// A queued streamed frame (an attachment) counts as its text plus at most 64 KiB of
// its data: the data stays on disk until the client reads it, so what a queued one
// holds here is small, but a pile of them behind a client that does not read is
// bounded too (128 with the default cap). Counting each as its full size (up to a
// quarter of the cap) closed a client that was reading as fast as it could after five
// large attachments in a row: anyone could disconnect a whole channel that way
// (frameWeight in peer-common.ts, shared with the WebSocket transport).
//
// Closing is a lingering close, as HTTP servers do it: what is owed is flushed, the
// sending side is shut (FIN), and what the client still sends is read and discarded
// until it closes too or the linger time runs out; then the socket is destroyed. A
// close that stopped reading would leave unread bytes in the kernel, and the reset
// they cause makes the client's kernel drop the replies it has not yet read. The
// linger time also bounds the close of a client that does not read at all.

import { readFileSync } from "node:fs";
import type { Socket } from "node:net";
import type { Logger } from "pino";
import type { OutFrame, StreamedFrame } from "../protocol/frames.js";
import { newPeerId, type Peer } from "../protocol/session.js";
import { addMark, bytesHanded, frameWeight, reasonBit, settleMarks, socketAddress, streamPieces } from "./peer-common.js";
import type { LiveConnection } from "./live.js";

/**
 * Characters that must be handed to the OS after a frame before a client that does
 * not acknowledge can be taken to have read it: more than the kernel can hold for the
 * connection (its send buffer and the peer's receive buffer, at their configured
 * maxima), and never less than 16 MiB.
 */
export function deliverySlack(): number {
  const max = (file: string) => {
    try {
      return Number(readFileSync(file, "utf8").trim().split(/\s+/)[2]) || 0;
    } catch {
      return 0;
    }
  };
  return Math.max(16 * 1024 * 1024, 2 * (max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem")));
}


// Connections with frames to write, in two lists: those given an event (a delivery)
// and those given replies only. A batch's commit queues, for each message, its event
// to the recipient and its reply to the sender; every write to a socket is a syscall
// that, on loopback, also runs the receiving side's TCP work, so the last of a batch's
// writes waits for all the others. Writing the deliveries first, then the replies,
// takes the replies' syscalls off the path of every delivery (a reply is only later
// by the time the deliveries take, within the same turn of the loop). A connection
// given a reply and then an event is in both lists, and written with the first.
let dirtyEvents: Connection[] = [];
let dirtyReplies: Connection[] = [];
let flushScheduled = false;
const NO_DIRTY: Connection[] = [];

function flushAll(): void {
  flushScheduled = false;
  // Swapped for new lists (a connection scheduled while these are written goes there).
  const events = dirtyEvents;
  const replies = dirtyReplies;
  dirtyEvents = events.length > 0 ? [] : NO_DIRTY;
  dirtyReplies = replies.length > 0 ? [] : NO_DIRTY;
  for (let i = 0; i < events.length; i++) events[i].flushQueued();
  for (let i = 0; i < replies.length; i++) replies[i].flushQueued();
}


/** The Connection a socket belongs to, for the socket handlers shared by every one. */
export const CONNECTION = Symbol("wirechat.connection");
type Tagged = Socket & { [CONNECTION]: Connection };

function onDrain(this: Tagged): void {
  this[CONNECTION].progress();
}

function lingerOver(conn: Connection): void {
  conn.destroy();
}

const NO_FRAMES: OutFrame[] = [];

export class Connection implements Peer, LiveConnection {
  readonly id = newPeerId();
  readonly address: string;
  /** The key its listener counts it under for --max-per-address (addressKey: its address or network). */
  addressKey: string;
  /** Its door's name (its listener sets it: see LiveConnection). */
  door = "tcp";
  /** Frames not yet written, in order (NO_FRAMES when none: an idle connection keeps no array). */
  private q: OutFrame[] = NO_FRAMES;
  /** Characters in queued string frames. */
  private queuedChars = 0;
  /** Highest confirmation seq among the queued frames (they go out together). */
  private pendingConfirm = 0;
  /** Characters passed to socket.write so far. */
  private passed = 0;
  /** [passed + slack, seq] pairs, oldest first (see Peer.send). */
  private marks: number[] | undefined;
  /** In a dirty list, waiting for flushAll. */
  private queued = false;
  /** In dirtyEvents (it may be in dirtyReplies as well). */
  private queuedEvent = false;
  /** A StreamedFrame is being written; everything queued waits behind it. */
  private pumping = false;
  private ending = false;
  /** Cuts the connection off once it has lingered long enough (set by end()). */
  private lingerTimer: NodeJS.Timeout | undefined;
  /** Why reading is paused: one bit per reason (see reasonBit). */
  private pausedFor = 0;
  private drainWaiters: ((ok: boolean) => void)[] | undefined;
  /** Uploads started on this connection and not yet finished or discarded (see Listener). */
  uploads = 0;
  /** Unix ms of the last bytes received. */
  lastActivity = Date.now();
  /** Unix ms the connection was accepted. */
  readonly since = this.lastActivity;
  /** Called once when the connection starts closing (the listener frees its cap slot). */
  onEnding: ((conn: Connection) => void) | undefined;
  /** Called when the connection is closed as a slow reader (the listener counts it). */
  onOverflow: ((conn: Connection) => void) | undefined;
  /** Set by whoever reads this connection's confirmations (the listener, for the router). */
  onConfirmed: ((conn: Connection, seq: number) => void) | undefined;
  /** What the owner keeps with the connection (the listener: itself, session, scanner). */
  owner: unknown;
  session: unknown;
  scanner: unknown;

  constructor(
    readonly socket: Socket,
    private readonly outboundCap: number,
    /** Characters after a frame that prove the client read it (kernel buffers and more). */
    private readonly slack: number,
    private readonly log: Logger,
    /** Milliseconds from end() to destroy at the latest. */
    private readonly lingerMs = 2000,
  ) {
    // What bans and logs see.
    this.address = this.addressKey = socketAddress(socket);
    (socket as Tagged)[CONNECTION] = this;
    socket.on("drain", onDrain);
  }

  /** The client's address and port, for logs (made when asked). */
  get remote(): string {
    return `${this.address}:${this.socket.remotePort ?? 0}`;
  }

  get bytesIn(): number {
    return this.socket.bytesRead;
  }

  get bytesOut(): number {
    return bytesHanded(this.socket);
  }

  /** Characters handed to the operating system so far (written, and no longer queued in the socket). */
  get handed(): number {
    return this.passed - this.socket.writableLength;
  }

  /** The socket closed: nothing queued will go out (its owner calls this on 'close'). */
  closedSocket(): void {
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = undefined;
    this.q = NO_FRAMES;
    this.queuedChars = 0;
    this.marks = undefined;
    this.wake(false);
  }

  get closed(): boolean {
    return this.ending || this.socket.destroyed;
  }

  /** end() was called: the connection is flushing and lingering. */
  get isEnding(): boolean {
    return this.ending;
  }

  /** Characters waiting to go out: queued here and in the socket's buffer. */
  get outbound(): number {
    return this.queuedChars + this.socket.writableLength;
  }

  get congested(): boolean {
    return this.pumping || this.outbound > this.outboundCap / 4;
  }

  drained(): Promise<boolean> {
    if (this.socket.destroyed) return Promise.resolve(false);
    if (!this.congested) return Promise.resolve(true);
    return new Promise((resolve) => (this.drainWaiters ??= []).push(resolve));
  }

  private wake(ok: boolean): void {
    const waiters = this.drainWaiters;
    if (!waiters) return;
    this.drainWaiters = undefined;
    for (const w of waiters) w(ok);
  }

  send(frame: OutFrame, event: boolean, confirm = 0): void {
    if (this.closed) return;
    // A reply may be what held input waits for (a login, an earlier upload).
    if (!event) this.unhold();
    // A seed door shows nothing for this one (an event its protocol has no frame for).
    if (frame === "") return;
    const size = frameWeight(frame);
    // Past the cap: a slow reader, unless no more than a quarter of the cap was waiting
    // (the connection was not congested: its reader keeps up) and this one event is
    // larger than the rest (a cap set below --max-frame; the sender's own reply comes
    // just before its echo). The bound: the cap, or a quarter of it plus one frame.
    const waiting = this.queuedChars + this.socket.writableLength;
    this.queuedChars += size;
    if (event && waiting + size > this.outboundCap && waiting > this.outboundCap / 4) return this.overflow();
    if (this.q === NO_FRAMES) this.q = [];
    this.q.push(frame);
    if (confirm > this.pendingConfirm) this.pendingConfirm = confirm;
    this.schedule(event);
  }

  private schedule(event: boolean): void {
    if (this.pumping) return;
    if (event) {
      if (this.queuedEvent) return;
      this.queuedEvent = true;
      if (dirtyEvents === NO_DIRTY) dirtyEvents = [];
      dirtyEvents.push(this);
    } else {
      if (this.queued) return;
      if (dirtyReplies === NO_DIRTY) dirtyReplies = [];
      dirtyReplies.push(this);
    }
    this.queued = true;
    if (!flushScheduled) {
      flushScheduled = true;
      process.nextTick(flushAll);
    }
  }

  /** flushAll's: a connection in both of its lists is written once. */
  flushQueued(): void {
    if (this.queued) this.flush();
  }

  /** Writes the queued string frames in one write(), up to the first streamed frame. */
  flush(): void {
    this.queued = false;
    this.queuedEvent = false;
    if (this.pumping || this.socket.destroyed) return;
    const q = this.q;
    let n = 0;
    while (n < q.length && typeof q[n] === "string") n++;
    if (n > 0) {
      let data: string;
      if (n === q.length) {
        data = n === 1 ? (q[0] as string) : (q as string[]).join("");
        this.q = NO_FRAMES;
      } else {
        data = (q.splice(0, n) as string[]).join("");
      }
      this.queuedChars -= data.length;
      this.write(data);
    }
    // Frames queued together share their highest seq, marked once all of them (streams
    // included) are passed to the socket: that can only delay a confirmation.
    if (this.pendingConfirm > 0 && this.q.length === 0) this.mark(this.pendingConfirm);
    if (this.q.length > 0) {
      const frame = this.q.shift() as StreamedFrame;
      this.queuedChars -= frameWeight(frame);
      void this.pump(frame);
    } else if (this.ending) {
      // Everything owed is handed to the socket: send FIN after it, keep discarding
      // input (see the top of this file).
      this.socket.end();
    }
    this.progress();
  }

  private write(data: string): boolean {
    this.passed += data.length;
    return this.socket.write(data);
  }

  private mark(seq: number): void {
    this.pendingConfirm = 0;
    this.marks = addMark(this.marks, this.passed + this.slack, seq);
  }

  /** Confirms marks the OS has been handed enough after, and wakes drain waiters. */
  progress(): void {
    // A socket that failed or was destroyed dropped what it held (writableLength falls
    // with it): nothing it was handed is confirmed from then on.
    if (this.socket.destroyed || this.socket.errored) this.marks = undefined;
    const seq = settleMarks(this.marks, this.passed - this.socket.writableLength);
    if (seq > 0) this.onConfirmed?.(this, seq);
    if (this.drainWaiters && !this.congested) this.wake(true);
  }

  forgetConfirmations(): void {
    this.marks = undefined;
    this.pendingConfirm = 0;
  }

  /** Periodic check (the listener's sweep): marks can settle with no new traffic. */
  tick(): void {
    if (!this.socket.destroyed) this.progress();
  }

  /** Writes a streamed frame part by part, waiting for 'drain' whenever the socket is full. */
  private async pump(frame: StreamedFrame): Promise<void> {
    this.pumping = true;
    let ok = false;
    try {
      for await (const piece of streamPieces(frame)) await this.writePiece(piece);
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
    if (ok) this.flush();
  }

  private async writePiece(piece: string): Promise<void> {
    if (this.socket.destroyed) throw new Error("connection closed");
    if (this.write(piece)) return;
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

  private overflow(): void {
    this.log.warn(
      { conn: this.id, remote: this.remote, waiting: this.outbound, cap: this.outboundCap },
      "slow reader over its outbound cap; closing",
    );
    this.onOverflow?.(this);
    this.socket.destroy();
    this.q = NO_FRAMES;
    this.queuedChars = 0;
  }

  /**
   * Too many connections are lingering: this one is destroyed as soon as what it is owed
   * has been handed to the socket (this turn), without waiting for its client.
   */
  cutLinger(): void {
    if (!this.ending || this.socket.destroyed) return;
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = setTimeout(lingerOver, 0, this);
  }

  /**
   * Flushes everything queued (streams included), then shuts the sending side and
   * discards input until the client closes; destroys it after `lingerMs` at the latest.
   */
  end(): void {
    if (this.ending || this.socket.destroyed) return;
    this.ending = true;
    this.lingerTimer = setTimeout(lingerOver, this.lingerMs, this);
    this.lingerTimer.unref();
    this.onEnding?.(this);
    // Read again whatever paused reading: input is discarded from now on (the owner
    // checks `closed`), so that nothing unread is left to turn the close into a reset.
    this.pausedFor = 0;
    this.socket.resume();
    if (!this.pumping) this.flush();
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Input from `rest` on waits (the scanner answered HOLD) until unhold(). */
  hold(rest: Buffer): void {
    if (this.ending) return;
    this.pause("hold");
    this.socket.unshift(rest);
  }

  /** Feeds held input again (the scanner holds again if it still has to wait). */
  unhold(): void {
    this.resume("hold");
  }

  pause(why: string): void {
    if (this.ending) return; // a closing connection reads (and discards) to the end
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
