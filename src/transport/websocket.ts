// One WebSocket (the HTTP door's /wirechat and /ws): the Peer the protocol layer sends
// through, with the same rules as a TCP Connection.
//
// A frame is one message. The native codec's frames end in the NDJSON line terminator;
// on a WebSocket the message is the frame, so a trailing "\n" is dropped here, the one
// place that knows it is not TCP. A streamed frame (an attachment's base64 read from
// disk, a long list read page by page) goes out as one message in fragments (RFC 6455
// §5.4: continuation frames), a piece at a time (joined to 64 KiB: streamPieces) as the
// socket drains, so it is never whole in memory and may be larger than the outbound
// cap; frames queued behind it wait.
//
// One count of outbound characters per connection: the frames queued here (a streamed
// one waiting counts as its text plus at most 64 KiB of its data, as on TCP) plus ws's
// bufferedAmount (what the socket has not taken yet, the fragments of a streamed frame
// included; ws counts that in UTF-8 bytes, a non-ASCII character up to 3 where the
// queue here counts 1: the same for ASCII, nearly everything sent). An event that would
// take it past --outbound-cap closes the connection as a slow reader, as on TCP.
//
// Delivery confirmation (clients that do not acknowledge): as on TCP, a frame counts
// as read once so much has been handed to the OS after it that it cannot still be in
// kernel buffers (Connection's marks, with handed = passed - bufferedAmount).
//
// Closing: end() sends what is queued, then a close frame (1000); ws waits for the
// client's close frame, and the socket is cut off after the linger time at the latest.

import { createRequire } from "node:module";
import type { Socket } from "node:net";
import type { Logger } from "pino";
import WebSocket from "ws";
import type { OutFrame, StreamedFrame } from "../protocol/frames.js";
import { newPeerId, type Peer } from "../protocol/session.js";
import { addMark, bytesHanded, frameWeight, reasonBit, settleMarks, socketAddress, streamPieces } from "./peer-common.js";
import type { LiveConnection } from "./live.js";
import { makeRoom, type HeldInput, type InputHolder } from "./scanner.js";


/** Close codes (RFC 6455 §7.4.1, IANA registry). */
export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008;
export const CLOSE_TOO_BIG = 1009;
export const CLOSE_TRY_LATER = 1013;
export const CLOSE_ERROR = 1011;


/** What this server uses of ws's receiver beyond its public API (checkWs). */
interface ReceiverInternals {
  /** Bytes read from the socket not yet taken out as frames (a frame being received waits here). */
  _bufferedBytes: number;
  /**
   * Bytes of the fragments of the message being received that it holds (decompressed,
   * with permessage-deflate). Not _totalPayloadLength: that adds a frame's announced
   * length as soon as its header is read, so a 14-byte header counted --max-frame.
   */
  _messageLength: number;
  /** Takes `n` bytes off the front of what it holds. */
  consume(n: number): Buffer;
}

/** The ws version whose receiver's internals (ReceiverInternals) this server relies on. */
export const PINNED_WS = "8.23.0";

function receiverOf(ws: WebSocket): ReceiverInternals {
  return (ws as unknown as { _receiver: ReceiverInternals })._receiver;
}

/**
 * Throws unless the ws that @fastify/websocket uses is PINNED_WS, with the receiver
 * internals read here: without them a WebSocket's unfinished message would not count
 * against --max-partial-input (WebSocketPeer.countInbound) and its fragments would keep
 * the reads they arrived in (copySmallPieces). The HTTP door checks it before it starts;
 * package.json names the exact version.
 */
export function checkWs(): void {
  const require = createRequire(createRequire(import.meta.url).resolve("@fastify/websocket"));
  const version = (require("ws/package.json") as { version: string }).version;
  const Receiver = (require("ws") as { Receiver?: new () => Partial<ReceiverInternals> }).Receiver;
  const r = typeof Receiver === "function" ? new Receiver() : undefined;
  const ok = r !== undefined && typeof r._bufferedBytes === "number" && typeof r._messageLength === "number" && typeof r.consume === "function" && r.consume.length === 1;
  if (version !== PINNED_WS || !ok) {
    throw new Error(`wirechat needs ws ${PINNED_WS} exactly (its receiver's counts of unfinished input), found ${version}${ok ? "" : " without them"}: reinstall with npm ci`);
  }
}

/**
 * Makes `ws`'s receiver copy each piece it takes from a read that is a small part of
 * that read.
 *
 * ws hands out a frame's payload as a view of the socket read it arrived in. A fragment
 * of a message is held until the message ends, and so is the whole read behind it: a
 * client sending one-byte fragments inside 60 KiB reads padded with pongs (ws drops
 * them) held 60 KiB per payload byte, past --max-frame (which counts payload): a review
 * grew the server by 440 MB with one socket and 7,500 payload bytes. Copied, a
 * fragment holds its own bytes; a piece that is most of its read (a large frame, a
 * message alone in its read) is not copied.
 */
export function copySmallPieces(ws: WebSocket): void {
  const receiver = receiverOf(ws);
  const consume = receiver.consume;
  receiver.consume = function (this: unknown, n: number): Buffer {
    const piece = consume.call(this, n);
    if (piece.byteLength * 2 >= piece.buffer.byteLength) return piece;
    // Not from Buffer's shared pool: a fragment copied there would hold an 8 KiB slab.
    const own = Buffer.allocUnsafeSlow(piece.byteLength);
    piece.copy(own);
    return own;
  };
}

/** The message of a frame: its text without the NDJSON line terminator. */
function message(text: string): string {
  return text.charCodeAt(text.length - 1) === 10 ? text.slice(0, -1) : text;
}

export class WebSocketPeer implements Peer, LiveConnection, InputHolder {
  readonly id = newPeerId();
  /** The client's IP address (as the socket had it when accepted). */
  readonly address: string;
  /** The key its listener counts it under for --max-per-address (addressKey: its address or network). */
  addressKey: string;
  /** Attachments come inline in their message: none streams in. */
  readonly uploads = 0;
  /** Frames waiting behind a streamed frame being joined, each with its confirmation seq. */
  private q: [OutFrame, number][] = [];
  /** Characters of the frames in `q` (streamed ones by weight). */
  private queuedChars = 0;
  private joining = false;
  /** Times forgetConfirmations was called (a streamed frame under way checks it: join). */
  private forgotten = 0;
  private ending = false;
  private lingerTimer: NodeJS.Timeout | undefined;
  private pausedFor = 0;
  private drainWaiters: ((ok: boolean) => void)[] | undefined;
  /** A streamed frame waiting for the socket to take what it holds before it is joined. */
  private flushWaiters: (() => void)[] | undefined;
  /** Characters handed to ws.send so far. */
  private passed = 0;
  /** [passed + slack, seq] pairs, oldest first (see Connection). */
  private marks: number[] | undefined;
  /** Unix ms of the last message (or ping, or pong) received. */
  lastActivity = Date.now();
  /** Unix ms of the last ping this server sent (keepAlive). */
  private pingedAt = 0;
  /** Unix ms the connection was accepted. */
  readonly since = this.lastActivity;
  /** Called once when the connection starts closing (its listener frees its cap slot). */
  onEnding: ((peer: WebSocketPeer) => void) | undefined;
  /** Called when the connection is closed as a slow reader. */
  onOverflow: ((peer: WebSocketPeer) => void) | undefined;
  /** Called when the connection is closed for the room another's input needs (shedForRoom). */
  onShed: ((peer: WebSocketPeer) => void) | undefined;
  /** The count of unfinished input its bytes are in (--max-partial-input), shared with the TCP doors. */
  held: HeldInput | undefined;
  /** Bytes of its unfinished input counted in `held` (countInbound). */
  private inbound = 0;
  /** Called with the highest inbox seq the client must have read. */
  onConfirmed: ((peer: WebSocketPeer, seq: number) => void) | undefined;
  /** What the owner keeps with the connection (its listener's session). */
  session: unknown;
  private readonly sent = (): void => this.progress();

  constructor(
    readonly ws: WebSocket,
    /** The TCP socket under it (the upgraded request's). */
    private readonly socket: Socket,
    /** Its door's name (see LiveConnection). */
    readonly door: string,
    private readonly outboundCap: number,
    private readonly slack: number,
    private readonly log: Logger,
    private readonly lingerMs: number,
  ) {
    // What bans and logs see.
    this.address = this.addressKey = socketAddress(socket);
  }

  get remote(): string {
    return `${this.address}:${this.socket.remotePort ?? 0}`;
  }

  /** Bytes of the socket, the HTTP upgrade included. */
  get bytesIn(): number {
    return this.socket.bytesRead;
  }

  get bytesOut(): number {
    return bytesHanded(this.socket);
  }

  get closed(): boolean {
    return this.ending || this.ws.readyState !== WebSocket.OPEN;
  }

  /** end() was called: the connection is flushing and closing. */
  get isEnding(): boolean {
    return this.ending;
  }

  /** Characters waiting to go out: queued here and in the socket's buffer (a streamed frame's fragments included). */
  get outbound(): number {
    return this.queuedChars + this.ws.bufferedAmount;
  }

  get congested(): boolean {
    return this.joining || this.outbound > this.outboundCap / 4;
  }

  drained(): Promise<boolean> {
    if (this.ws.readyState !== WebSocket.OPEN) return Promise.resolve(false);
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
    // A door shows nothing for this one (an event its protocol has no frame for).
    if (frame === "") return;
    const size = frameWeight(frame);
    // Past the cap, unless the connection was not congested and this one event is
    // larger than the rest of the cap (connection.ts send).
    const waiting = this.outbound;
    if (event && waiting + size > this.outboundCap && waiting > this.outboundCap / 4) return this.overflow();
    if (this.joining) {
      this.q.push([frame, confirm]);
      this.queuedChars += size;
    } else if (typeof frame === "string") this.write(frame, confirm);
    else void this.join(frame, confirm);
  }

  private write(text: string, confirm: number): void {
    const msg = message(text);
    this.passed += msg.length;
    this.ws.send(msg, this.sent);
    if (confirm > 0) this.mark(confirm);
  }

  /**
   * Sends a streamed frame as one message in fragments, a piece at a time, waiting for
   * the socket to take what it holds between pieces; then sends what waited behind it.
   */
  private async join(frame: StreamedFrame, confirm: number): Promise<void> {
    this.joining = true;
    // A confirmation given up meanwhile (forgetConfirmations: another user logged in
    // here) is not marked when the frame is done: it is the earlier user's seq.
    const forgotten = this.forgotten;
    let ok = false;
    try {
      // A piece is held back until the next one comes: the last one ends the message.
      let held: string | undefined;
      for await (const piece of streamPieces(frame)) {
        if (this.ws.readyState !== WebSocket.OPEN) return;
        if (held !== undefined && !(await this.fragment(held, false))) return;
        held = piece;
      }
      if (!(await this.fragment(message(held ?? ""), true))) return;
      ok = true;
    } catch (err) {
      if (this.ws.readyState === WebSocket.OPEN) {
        // Fragments may have gone out: the message cannot be finished, so the socket closes.
        this.log.error({ err, conn: this.id }, "producing a frame failed; closing");
        this.ws.close(CLOSE_ERROR, "the server could not produce a frame");
        this.cutOff();
      }
    } finally {
      this.joining = false;
    }
    if (!ok) return;
    if (confirm > 0 && this.forgotten === forgotten) this.mark(confirm);
    while (this.q.length > 0 && !this.joining) {
      const [next, seq] = this.q.shift() as [OutFrame, number];
      this.queuedChars -= frameWeight(next);
      if (typeof next === "string") this.write(next, seq);
      else void this.join(next, seq);
    }
    if (!this.joining && this.ending) this.ws.close(CLOSE_NORMAL);
    this.progress();
  }

  /** One fragment of a streamed message, once the socket holds less than a quarter of the cap; false if it closed. */
  private async fragment(text: string, fin: boolean): Promise<boolean> {
    while (this.ws.bufferedAmount > this.outboundCap / 4) {
      await new Promise<void>((resolve) => (this.flushWaiters ??= []).push(resolve));
      if (this.ws.readyState !== WebSocket.OPEN) return false;
    }
    if (this.ws.readyState !== WebSocket.OPEN) return false;
    this.passed += text.length;
    this.ws.send(text, { binary: false, fin }, this.sent);
    return true;
  }

  private mark(seq: number): void {
    this.marks = addMark(this.marks, this.passed + this.slack, seq);
  }

  /** Confirms marks the OS has been handed enough after, and wakes drain waiters. */
  progress(): void {
    const flushed = this.flushWaiters;
    if (flushed) {
      this.flushWaiters = undefined;
      for (const w of flushed) w();
    }
    // A socket cut off (terminate, a reset, an error) calls back every write it dropped
    // as bufferedAmount falls to 0: those frames were never handed to the OS, and
    // nothing is confirmed from then on.
    if (this.socket.destroyed || this.socket.errored) this.marks = undefined;
    const seq = settleMarks(this.marks, this.passed - this.ws.bufferedAmount);
    if (seq > 0) this.onConfirmed?.(this, seq);
    if (this.drainWaiters && (this.ws.readyState !== WebSocket.OPEN || !this.congested)) this.wake(this.ws.readyState === WebSocket.OPEN);
  }

  forgetConfirmations(): void {
    this.marks = undefined;
    this.forgotten++;
    for (const entry of this.q) entry[1] = 0;
  }

  /** The socket closed: nothing queued will go out (its listener calls this). */
  closedSocket(): void {
    this.uncount();
    this.held = undefined;
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = undefined;
    this.q = [];
    this.queuedChars = 0;
    this.marks = undefined;
    this.progress();
    this.wake(false);
  }

  /** Bytes of its unfinished input counted in `held` (InputHolder). */
  get kept(): number {
    return this.inbound;
  }

  /**
   * Counts again, in `held`, what ws holds of this socket's input: bytes read and not
   * yet taken out as frames (a frame being received), and the fragments of an
   * unfinished message. Its listener calls it after each read and message. Growth past
   * --max-partial-input makes room by closing the sockets holding more than this one
   * will, the largest first, and this one when that is not enough: a WebSocket cannot
   * skip a message and go on, as a TCP connection skips a frame.
   */
  countInbound(): void {
    const held = this.held;
    if (held === undefined) return;
    const r = receiverOf(this.ws);
    const now = r._bufferedBytes + r._messageLength;
    const grow = now - this.inbound;
    if (grow === 0) return;
    if (grow > 0 && held.bytes + grow > held.max && !makeRoom(held, this, now, grow)) return this.shedForRoom();
    held.bytes += grow;
    this.inbound = now;
    if (now === 0) held.holders.delete(this);
    else held.holders.add(this);
  }

  /** Its input stops counting (closed, or shed). */
  private uncount(): void {
    const held = this.held;
    if (held === undefined || this.inbound === 0) return;
    held.bytes -= this.inbound;
    held.holders.delete(this);
    this.inbound = 0;
  }

  /**
   * Another's input needs the room (InputHolder): the socket is told why (onShed), sent
   * a close (1013, try again later) and cut off at once, so that what ws holds of it is
   * let go, as the count now says.
   */
  shedForRoom(): void {
    this.uncount();
    this.held = undefined;
    if (this.ws.readyState === WebSocket.OPEN) {
      this.onShed?.(this);
      this.q = [];
      this.queuedChars = 0;
      this.ws.close(CLOSE_TRY_LATER);
    }
    this.ws.terminate();
  }

  private overflow(): void {
    this.log.warn({ conn: this.id, remote: this.remote, waiting: this.outbound, cap: this.outboundCap }, "slow reader over its outbound cap; closing");
    this.onOverflow?.(this);
    this.q = [];
    this.queuedChars = 0;
    this.ws.terminate(); // destroys the socket: progress() confirms nothing from here
  }

  /** A close frame went out: the client gets the linger time to answer it. */
  private cutOff(): void {
    if (this.lingerTimer) return;
    this.lingerTimer = setTimeout(() => this.ws.terminate(), this.lingerMs);
    this.lingerTimer.unref();
  }

  /** Sends what is queued (a frame being joined included), then closes (1000). */
  end(): void {
    if (this.ending || this.ws.readyState !== WebSocket.OPEN) return;
    this.ending = true;
    this.cutOff();
    // Read again whatever paused reading: the client's close frame must be read.
    this.pausedFor = 0;
    this.ws.resume();
    if (!this.joining) this.ws.close(CLOSE_NORMAL);
    // After the close frame is queued: the listener may cut the linger short at once
    // (too many closing), which before it left the client a 1006, not the 1000.
    this.onEnding?.(this);
  }

  destroy(): void {
    this.ws.terminate();
  }

  /**
   * A WebSocket ping when nothing came for `quietMs` and none was sent in that time: a
   * browser answers it by itself (a page cannot send one), and the pong counts as
   * activity, so a client that only listens keeps its connection; one that does not
   * answer is closed at its idle limit.
   */
  keepAlive(now: number, quietMs: number): void {
    if (this.closed || now - this.lastActivity < quietMs || now - this.pingedAt < quietMs) return;
    this.pingedAt = now;
    try {
      this.ws.ping();
    } catch {
      // Closing already: its close handler cleans up.
    }
  }

  /** The linger is over at once: too many connections are closing (see Listener). */
  cutLinger(): void {
    if (!this.ending) return;
    // On the next turn, as the TCP connection does: what is owed (the close frame) is
    // handed to the socket first.
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = setTimeout(() => this.ws.terminate(), 0);
  }

  pause(why: string): void {
    if (this.ending) return;
    if (this.pausedFor === 0) this.ws.pause();
    this.pausedFor |= reasonBit(why);
  }

  resume(why: string): void {
    const bit = reasonBit(why);
    if ((this.pausedFor & bit) === 0) return;
    this.pausedFor &= ~bit;
    if (this.pausedFor === 0 && this.ws.readyState === WebSocket.OPEN) this.ws.resume();
  }
}
