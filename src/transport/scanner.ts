// Frame scanner: finds JSON-object boundaries in a client's byte stream.
//
// A small state machine fed Buffers (after ws's Receiver and the NATS parser). It
// never splits on '\n': it tracks object depth, whether it is inside a string and
// whether the previous byte was a backslash, so NDJSON, CRLF, objects back to back
// and pretty-printed objects all frame the same, however TCP splits the bytes. Every
// structural byte is ASCII, so a split inside a multi-byte UTF-8 character needs no
// care.
//
// Limits are enforced while scanning: a frame's bytes are only retained while the
// frame is within `maxFrame`; past it the scanner keeps counting structure (to find
// where the frame ends) but holds nothing, so memory is bounded by the limit plus the
// chunk being scanned, whatever a client sends.
//
// Resynchronisation: garbage at depth 0 is skipped through the end of its line; a
// raw newline inside a string (never valid JSON) ends the broken frame there; and a
// '{' opening a line where the frame so far cannot take a value (the previous
// significant byte is not ':' ',' or '[') means the previous frame was truncated and
// a new one starts. Each broken frame is reported once: lines after it that cannot
// start a frame are taken for its rest and skipped quietly.

import { isAscii } from "node:buffer";
import { Code } from "../protocol/codes.js";
import { ACTION_PEEK_BYTES, parsedAction, peekAction } from "../protocol/frames.js";
import type { UploadSink } from "../protocol/session.js";

/**
 * From FrameSink.upload: not now. The scanner stops before the attachment's string;
 * push() returns how far it got, and the caller feeds the rest again later.
 */
export const HOLD = Symbol("hold");

export interface ScannerLimits {
  /** Largest frame in bytes. */
  maxFrame: number;
  /** Deepest nesting of objects/arrays; the frame itself is depth 1. */
  maxDepth: number;
  /**
   * The path of the string field that streams to an upload (["data", "attach",
   * "data"]), from the actions' declarations (Dispatcher.streamedPaths); none streams
   * when absent.
   */
  streamPath?: readonly string[];
  /**
   * Reads a frame of a common shape where it lies in the chunk (the native door's
   * `message` frames, protocol/native-decode.ts): such a frame, whole in one chunk, is
   * decoded as it is found and handed to FrameSink.decoded, instead of scanned here
   * and then decoded from its bytes. It holds no stream path, escape, control or
   * non-ASCII byte, so everything the scanner checks holds for it.
   */
  fast?: FastReader;
  /**
   * Memory held for unfinished frames (see FrameScanner.retain), shared by every
   * scanner it is given to (the TCP doors' connections) and the WebSockets' unfinished
   * messages (websocket.ts), one count against --max-partial-input. Bytes whose
   * keeping would take it past `max` make room by shedding the largest unfinished
   * frames held elsewhere, larger than this one would be; when that is not enough,
   * this frame is shed. A shed frame is skipped to its end holding nothing, as an
   * oversized one is, and refused with status 13 (send it again). Frames that arrive
   * whole in one read are never held.
   */
  held?: HeldInput;
}

/** See ScannerLimits.held. */
export interface HeldInput {
  bytes: number;
  readonly max: number;
  /** The scanners (and WebSockets) holding bytes now. */
  readonly holders: Set<InputHolder>;
}

/** One holder of unfinished input (a TCP scanner, a WebSocket: websocket.ts). */
export interface InputHolder {
  /** Its bytes counted in `HeldInput.bytes`. */
  readonly kept: number;
  /** Lets go of them (taking them out of the count) now: another needs the room. */
  shedForRoom(): void;
}

/**
 * Makes room for `len` more bytes of `self`'s (which would then hold `mine`): sheds the
 * largest holders other than `self`, each holding more than `mine`, until `len` fits in
 * `held`; false when it still does not (then `self` is the one to shed).
 */
export function makeRoom(held: HeldInput, self: InputHolder, mine: number, len: number): boolean {
  while (held.bytes + len > held.max) {
    let largest: InputHolder | undefined;
    for (const h of held.holders) if (h !== self && h.kept > mine && (largest === undefined || h.kept > largest.kept)) largest = h;
    if (largest === undefined) return false;
    largest.shedForRoom();
  }
  return true;
}

/** See ScannerLimits.fast. */
export interface FastReader {
  /** The frame's value when `chunk[at…]` is one it reads whole before `limit`; undefined otherwise. */
  read(chunk: Buffer, at: number, limit: number): unknown;
  /** After a read that answered: one past the frame's last byte. */
  readonly end: number;
}

/**
 * Where a scanner's results go. One sink may serve every connection: each call also
 * gets the scanner's `ctx` (the connection), so a connection needs no closures.
 */
export interface FrameSink<U extends UploadSink = UploadSink, C = unknown> {
  /**
   * A complete frame: the bytes of one balanced JSON object (not yet validated). When
   * it had an attachment, `upload` received its text and the frame holds "" instead.
   * `ascii`: every byte is below 0x80 (valid UTF-8 as it stands).
   */
  frame(bytes: Buffer, upload: U | undefined, ctx: C, ascii: boolean): void;
  /** A frame ScannerLimits.fast read: its value and its size in bytes. */
  decoded?(value: unknown, size: number, ctx: C): void;
  /**
   * The string at the stream path begins: where its text should go, or undefined to
   * keep it in the frame as an ordinary string (within `maxFrame`), or HOLD to stop
   * scanning here until the caller feeds the rest again. `action` is the frame's
   * action when it is named before this point.
   */
  upload(ctx: C, action: string | undefined): U | undefined | typeof HOLD;
  /** A frame, or bytes at depth 0, that were skipped. `action` when it could be read. */
  reject(code: Code.InvalidData | Code.TooLarge | Code.RateLimited, reason: string, action: string | undefined, ctx: C): void;
}

const enum State {
  Idle,
  Garbage,
  Frame,
  /** Inside the string at the stream path, which streams to an UploadSink. */
  Attachment,
}

/** `piece` copied into a backing store of its own (see Scanner.retain). */
function copyOf(piece: Buffer): Buffer {
  const copy = Buffer.allocUnsafeSlow(piece.length);
  piece.copy(copy);
  return copy;
}

/** A piece of a frame shorter than this is copied into a stage, not held as a view. */
const COPY_BELOW = 1024;
const STAGE_MIN = 1024;
const STAGE_MAX = 64 * 1024;

const enum Byte {
  Slash = 0x2f,
  Tab = 0x09,
  LF = 0x0a,
  CR = 0x0d,
  Space = 0x20,
  Quote = 0x22,
  Comma = 0x2c,
  Colon = 0x3a,
  OpenSquare = 0x5b,
  Backslash = 0x5c,
  CloseSquare = 0x5d,
  LowerU = 0x75,
  OpenCurly = 0x7b,
  CloseCurly = 0x7d,
  Bom1 = 0xef,
  Bom2 = 0xbb,
  Bom3 = 0xbf,
}

/** A hex digit's value, or -1. */
function hexDigit(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  const l = c | 0x20;
  return l >= 0x61 && l <= 0x66 ? l - 0x61 + 10 : -1;
}

/** A character of the base64 alphabet, or its padding. */
function isBase64Char(c: number): boolean {
  const l = c | 0x20;
  return (l >= 0x61 && l <= 0x7a) || (c >= 0x30 && c <= 0x39) || c === 0x2b || c === 0x2f || c === 0x3d;
}

const enum Fault {
  None,
  TooLarge,
  /** Past ScannerLimits.held: skipped as TooLarge is, then refused with 13. */
  Busy,
  TooDeep,
  /** The stream path occurs twice in one frame. */
  TwoUploads,
}

// Per chunk, while one push() runs (pushes never nest, so one set serves every
// scanner): whether the chunk is all ASCII, and where its next backslash and newline
// are (n when there is none), found once and reused as scanning passes them.
let chunkAscii = false;
let nextBackslash = -1;
let nextLF = -1;

function find(chunk: Buffer, byte: number, from: number): number {
  const at = chunk.indexOf(byte, from);
  return at < 0 ? chunk.length : at;
}

const pathCache = new Map<string, readonly Buffer[]>();
function pathKeys(path: readonly string[] | undefined): readonly Buffer[] {
  if (!path || path.length === 0) return [];
  const id = path.join("\u0000");
  let keys = pathCache.get(id);
  if (!keys) pathCache.set(id, (keys = path.map((k) => Buffer.from(k))));
  return keys;
}

export class FrameScanner<U extends UploadSink = UploadSink, C = unknown> {
  private state = State.Idle;
  private depth = 0;
  private inString = false;
  private escaped = false;
  /** Bytes of a UTF-8 BOM seen between frames (0-2; 0 when none is under way). */
  private bomAt = 0;
  /** Hex digits of a `\uXXXX` escape in attachment text still to come (0: not in one), and its value so far. */
  private hexLeft = 0;
  private hexValue = 0;
  /** Only whitespace seen since the last newline (for the truncated-frame rule). */
  private lineStart = true;
  /** Last byte outside strings that was not whitespace; a closing quote counts as '"'. */
  private lastSignificant = 0;
  private fault = Fault.None;
  /**
   * The frame's bytes are no longer held (too large, or shed for ScannerLimits.held):
   * only `head` is kept, for the reply's action.
   */
  private shed = false;
  /** Bytes of the current frame held from earlier chunks (made when first needed). */
  private parts: Buffer[] | undefined;
  private partsLength = 0;
  /**
   * The memory `parts` and `stage` keep alive, as counted in ScannerLimits.held: a view
   * keeps its whole read, a copy its own size, a stage all of its size (see retain).
   */
  private keeps = 0;
  /**
   * Small pieces are copied here instead of held as views: one view per read would
   * cost a Buffer and its backing store per read, so a frame sent a byte per segment
   * would hold some hundred bytes per byte while `partsLength` stayed under the limit.
   * Its first `stageUsed` bytes follow `parts` (sealStage moves them there).
   */
  private stage: Buffer | undefined;
  private stageUsed = 0;
  /** Frame bytes seen so far, including any no longer held. */
  private frameLength = 0;
  /** Up to the first bytes of an oversized frame, to echo its action. */
  private head: Buffer | undefined;
  /** Where the current frame's bytes begin in the chunk being scanned. */
  private start = 0;
  /**
   * Whether each open level is an object (bit set) or an array: bit d-1 for depth d up
   * to 32, kept in an int so an idle connection carries no array.
   */
  private containerBits = 0;
  /** Only when maxDepth is configured above 32. */
  private readonly deepContainers: Uint8Array | undefined;
  /**
   * How much of the attachment path the open objects match: 1 inside the frame's
   * "data" object, 2 inside data's "attach" object. Only depths 1–3 are tracked.
   */
  private pathLevel = 0;
  /** While a key at a tracked depth is read: bytes of this.pathKeys matched so far, -1 once it cannot match. */
  private keyMatched = -1;
  /** The last key read at a tracked depth was the path's key for that depth. */
  private keyIsPath = false;
  /** The last frame was broken off: what follows up to the next frame is its rest. */
  private afterBroken = false;
  /** Bytes that may still be skipped quietly as the rest of the broken frame. */
  private quietLeft = 0;
  /** The frame spans a chunk with a byte ≥ 0x80 (else it is ASCII: no UTF-8 check or decoding needed). */
  private nonAscii = false;
  /** The upload of the frame being scanned, if its attachment has begun. */
  private uploadSink: U | undefined;
  /** The frame has had its stream path (streamed or not): a second one is refused. */
  private pathSeen = false;
  /** Its text was not streamed because the frame was being shed (Busy): it counts in the frame's length, unlike when it is sent again (sheddingAttachment). */
  private pathInline = false;
  /** The sink answered HOLD: push() stops where scanning stopped. */
  private held = false;
  /** The stream path, as the key expected at each depth (shared by every scanner). */
  private readonly pathKeys: readonly Buffer[];
  /** ScannerLimits.fast, when the sink takes decoded frames and the depth limit lets an object hold one. */
  private readonly fast: FastReader | undefined;

  constructor(
    private readonly limits: ScannerLimits,
    private readonly sink: FrameSink<U, C>,
    private readonly ctx: C = undefined as C,
  ) {
    if (limits.maxDepth > 32) this.deepContainers = new Uint8Array(limits.maxDepth + 1);
    this.pathKeys = pathKeys(limits.streamPath);
    this.fast = sink.decoded !== undefined && limits.maxDepth >= 2 ? limits.fast : undefined;
  }

  /** 1 for an object, 0 for an array, at an open depth ≤ maxDepth. */
  private container(depth: number): number {
    return depth <= 32 ? (this.containerBits >>> (depth - 1)) & 1 : (this.deepContainers as Uint8Array)[depth];
  }

  private setContainer(depth: number, isObject: boolean): void {
    if (depth <= 32) {
      const bit = 1 << (depth - 1);
      this.containerBits = isObject ? this.containerBits | bit : this.containerBits & ~bit;
    } else {
      (this.deepContainers as Uint8Array)[depth] = isObject ? 1 : 0;
    }
  }

  /** Bytes of the incomplete frame currently retained. */
  get buffered(): number {
    return this.partsLength;
  }

  /** The memory they keep, as counted in ScannerLimits.held (InputHolder; see `keeps`). */
  get kept(): number {
    return this.keeps;
  }

  /**
   * Scans a chunk. Returns how many of its bytes were taken: all of them, unless the
   * sink answered HOLD (the caller then feeds chunk[returned…] again later).
   */
  push(chunk: Buffer): number {
    const n = chunk.length;
    this.held = false;
    chunkAscii = isAscii(chunk);
    nextBackslash = -1;
    nextLF = -1;
    // A frame is ASCII when every chunk it spans is (then it needs no UTF-8 check).
    if (!chunkAscii) this.nonAscii = true;
    let i = 0;
    this.start = 0; // a frame carried over from an earlier chunk continues at 0
    while (i < n && !this.held) {
      switch (this.state) {
        case State.Idle: {
          const c = chunk[i];
          // A BOM cut short by anything else: what follows is read afresh.
          if (this.bomAt > 0 && c !== (this.bomAt === 1 ? Byte.Bom2 : Byte.Bom3)) this.bomAt = 0;
          if (c === Byte.OpenCurly && this.fast !== undefined) {
            // Parse bytes once: a common frame, whole within the limit in this chunk,
            // is decoded where it lies. Anything else is scanned from the same byte.
            const value = this.fast.read(chunk, i, Math.min(n, i + this.limits.maxFrame));
            if (value !== undefined) {
              const end = this.fast.end;
              this.afterBroken = false;
              this.lineStart = false;
              (this.sink.decoded as NonNullable<FrameSink<U, C>["decoded"]>)(value, end - i, this.ctx);
              i = end;
              break;
            }
          }
          if (c === Byte.OpenCurly || c === Byte.OpenSquare) {
            this.beginFrame(i);
            i = this.scanFrame(chunk, i);
          } else if (c === Byte.Space || c === Byte.LF || c === Byte.CR || c === Byte.Tab) {
            i++;
          } else if (c === (this.bomAt === 0 ? Byte.Bom1 : this.bomAt === 1 ? Byte.Bom2 : Byte.Bom3)) {
            // A UTF-8 BOM (EF BB BF), possibly split across reads, is skipped whole; a
            // byte of one out of its place is not UTF-8 text (BB BF alone was skipped
            // in silence: it is answered as any other garbage now).
            this.bomAt = this.bomAt === 2 ? 0 : this.bomAt + 1;
            i++;
          } else {
            // Right after a broken frame, lines that cannot start a frame are taken
            // for the rest of it: skipped without another reply.
            if (!this.afterBroken) this.sink.reject(Code.InvalidData, "expected a JSON object", undefined, this.ctx);
            this.state = State.Garbage;
          }
          break;
        }
        case State.Garbage: {
          const nl = chunk.indexOf(Byte.LF, i);
          const next = nl < 0 ? n : nl + 1;
          // The rest of a broken frame is skipped quietly, but no more than a frame's
          // worth: past that, garbage is answered (and counted) again.
          if (this.afterBroken && (this.quietLeft -= next - i) < 0) {
            this.afterBroken = false;
            // The line that used the allowance up is answered (and counted) as garbage.
            this.sink.reject(Code.InvalidData, "expected a JSON object", undefined, this.ctx);
          }
          i = next;
          if (nl >= 0) this.state = State.Idle;
          break;
        }
        case State.Frame:
          i = this.scanFrame(chunk, i);
          break;
        case State.Attachment:
          i = this.scanAttachment(chunk, i);
          break;
      }
    }
    if (this.held) {
      this.retain(chunk, this.start, i);
      return i;
    }
    if (this.state === State.Frame) this.retain(chunk, this.start, n);
    return n;
  }

  /** The frame carries more than one attachment, or an ambiguous one: its upload is discarded and it is refused (3). */
  private refuseAttachments(): void {
    this.uploadSink?.abort();
    this.uploadSink = undefined;
    if (this.fault === Fault.None || this.fault === Fault.Busy) this.fault = Fault.TwoUploads;
  }

  /** The connection closed: an upload in progress is discarded. */
  close(): void {
    this.uploadSink?.abort();
    this.uploadSink = undefined;
    this.dropParts();
  }

  /**
   * Streams attachment text from `i` to the upload until the closing quote, which goes
   * back to frame scanning (as the end of an ordinary string) and starts the next part
   * of the frame. `\/` (an escaped slash, legal JSON) is undone, and so is a `\uXXXX`
   * that stands for a base64 character (JSON encoders that escape for HTML write `+`
   * and `=` so: .NET's System.Text.Json as `\u002B`, Gson as `\u003d`), as the
   * inline path's JSON.parse does; any other escape makes the upload invalid; a raw
   * newline breaks the frame as in any string.
   */
  private scanAttachment(chunk: Buffer, i: number): number {
    const n = chunk.length;
    const up = this.uploadSink as U;
    let from = i;
    // Once this chunk has an escape, its text is gathered here unescaped and written
    // once: a write per `\/` was a concat, a decode and a hash update per byte (a PHP
    // client's json_encode escapes every slash).
    let out: Buffer | undefined;
    let len = 0;
    for (; i < n; i++) {
      const c = chunk[i];
      if (this.hexLeft > 0) {
        const v = hexDigit(c);
        if (v >= 0) {
          this.hexValue = this.hexValue * 16 + v;
          from = i + 1;
          if (--this.hexLeft > 0) continue;
          if (isBase64Char(this.hexValue)) {
            out ??= Buffer.allocUnsafe(n);
            out[len++] = this.hexValue;
          } else up.invalid();
          continue;
        }
        // Not a \uXXXX after all: invalid, and this byte is read as any other.
        this.hexLeft = 0;
        up.invalid();
        from = i;
      }
      if (this.escaped) {
        this.escaped = false;
        if (c === Byte.LF) break;
        if (c === Byte.Slash) {
          out ??= Buffer.allocUnsafe(n);
          out[len++] = Byte.Slash;
        } else if (c === Byte.LowerU) {
          this.hexLeft = 4;
          this.hexValue = 0;
        } else up.invalid();
        from = i + 1;
        continue;
      }
      if (c === Byte.Quote || c === Byte.LF) break;
      if (c === Byte.Backslash) {
        out ??= Buffer.allocUnsafe(n);
        len += chunk.copy(out, len, from, i);
        from = i + 1;
        this.escaped = true;
      }
    }
    if (i > from && !this.escaped && this.hexLeft === 0) {
      if (out) len += chunk.copy(out, len, from, i);
      else up.write(chunk.subarray(from, i));
    }
    if (out && len > 0) up.write(out.subarray(0, len));
    if (i === n) return n;
    if (chunk[i] === Byte.LF) {
      // A raw newline inside the string: the frame is broken here.
      this.state = State.Frame;
      this.endBroken(chunk, i, i, "unterminated string in frame");
      return i + 1;
    }
    this.state = State.Frame;
    this.start = i; // the closing quote and the rest of the frame are retained again
    return i;
  }

  private beginFrame(start: number): void {
    this.afterBroken = false;
    this.state = State.Frame;
    this.start = start;
    this.depth = 0;
    this.inString = false;
    this.escaped = false;
    this.hexLeft = 0;
    this.lineStart = false;
    this.lastSignificant = 0;
    this.fault = Fault.None;
    this.shed = false;
    this.frameLength = 0;
    this.head = undefined;
    this.pathLevel = 0;
    this.keyMatched = -1;
    this.keyIsPath = false;
    this.uploadSink = undefined;
    this.pathSeen = this.pathInline = false;
    this.nonAscii = !chunkAscii;
  }

  /**
   * Scans frame bytes from `i`. Returns where scanning resumes: just past the frame
   * when it ends in this chunk (state back to Idle), at a '{' that starts a new frame
   * after a truncated one (Idle, so the caller's loop begins it), else `n`.
   */
  private scanFrame(chunk: Buffer, i: number): number {
    const start = this.start;
    const n = chunk.length;
    const maxDepth = this.limits.maxDepth;
    let depth = this.depth;
    let inString = this.inString;
    let escaped = this.escaped;
    let lineStart = this.lineStart;
    let last = this.lastSignificant;
    for (; i < n; i++) {
      let c = chunk[i];
      if (inString) {
        if (!escaped && this.keyMatched < 0) {
          // Plain string text (a body, most of a frame): jump to the next byte that
          // matters. In an ASCII chunk that is native searching (memchr); the next
          // backslash and newline of the chunk are found once and reused.
          if (chunkAscii) {
            if (nextBackslash < i) nextBackslash = find(chunk, Byte.Backslash, i);
            if (nextLF < i) nextLF = find(chunk, Byte.LF, i);
            const stop = nextBackslash < nextLF ? nextBackslash : nextLF;
            const quote = c === Byte.Quote ? i : chunk.indexOf(Byte.Quote, i);
            i = quote >= 0 && quote < stop ? quote : stop;
            if (i === n) break;
            c = chunk[i];
          } else {
            while (c !== Byte.Quote && c !== Byte.Backslash && c !== Byte.LF) {
              if (++i === n) break;
              c = chunk[i];
            }
            if (i === n) break;
          }
        }
        if (c === Byte.LF) {
          // A raw newline is never valid inside a string (escaped or not): the frame
          // is broken; skip through this line.
          this.saveScan(depth, inString, escaped, true, last);
          this.endBroken(chunk, start, i, "unterminated string in frame");
          return i + 1;
        } else if (escaped) {
          escaped = false;
        } else if (c === Byte.Quote) {
          inString = false;
          last = Byte.Quote;
          if (this.keyMatched >= 0) {
            this.keyIsPath = this.keyMatched === this.pathKeys[depth - 1].length;
            this.keyMatched = -1;
          }
        } else if (c === Byte.Backslash) {
          escaped = true;
          // An escaped key is never taken for a path key. One that may decode to it (it
          // matched up to its first escape) after this frame's attachment streamed
          // could replace the object that held it ("d\u0061ta" after "data"; the last
          // key wins), so that the request as parsed has no attachment, or another
          // recipient, while one was stored: refused as a second attachment is.
          if (this.keyMatched >= 0 && this.uploadSink !== undefined) this.refuseAttachments();
          this.keyMatched = -1;
        } else if (this.keyMatched >= 0) {
          const key = this.pathKeys[depth - 1];
          this.keyMatched = this.keyMatched < key.length && key[this.keyMatched] === c ? this.keyMatched + 1 : -1;
        }
        continue;
      }
      switch (c) {
        case Byte.Space:
        case Byte.Tab:
        case Byte.CR:
          continue;
        case Byte.LF:
          lineStart = true;
          continue;
        case Byte.Quote:
          inString = true;
          if (depth <= this.pathKeys.length && depth === this.pathLevel + 1 && this.container(depth) === 1) {
            if (last === Byte.OpenCurly || last === Byte.Comma) {
              this.keyMatched = 0;
              this.keyIsPath = false;
            } else if (last === Byte.Colon && depth === this.pathKeys.length && this.keyIsPath) {
              if (this.pathSeen) {
                // A second data.attach.data in one frame never starts a second upload:
                // the frame is refused and the first one is discarded.
                this.refuseAttachments();
              } else if (this.fault === Fault.None && this.frameLength + (i + 1 - start) + 1 + depth <= this.limits.maxFrame) {
                // (Counted with what must still follow: the closing quote and a brace
                // for each open object. A frame too large with those was streamed whole,
                // attachment and all, and then refused 12.)
                this.pathSeen = true;
                // data.attach.data: its text streams to an upload, if the sink takes
                // it for this frame; the frame keeps "".
                const up = this.sink.upload(this.ctx, peekAction(this.frameHead(chunk, start, i + 1)));
                if (up === HOLD) {
                  // Stop before the opening quote; it is scanned again when fed again.
                  this.pathSeen = false;
                  this.saveScan(depth, false, false, lineStart, last);
                  this.held = true;
                  return i;
                }
                if (up !== undefined) {
                  this.saveScan(depth, true, false, false, last);
                  // Set first: a frame shed by retain() aborts its upload.
                  this.uploadSink = up;
                  this.retain(chunk, start, i + 1);
                  this.state = State.Attachment;
                  return i + 1;
                }
                // Declined (not logged in, an action without attachments): its text
                // counts, and would again if sent again.
              } else {
                this.pathSeen = true;
                // Not streamed because the frame was being shed: sent again, it streams.
                if (this.fault === Fault.Busy) this.pathInline = true;
              }
            }
          }
          break;
        case Byte.OpenCurly:
        case Byte.OpenSquare:
          if (lineStart && c === Byte.OpenCurly && depth > 0) {
            // A value may follow ':' in an object, '[' or ',' in an array. Anything
            // else means the previous frame never closed and this line starts anew.
            // (Past maxDepth the container is not tracked: any of the three will do.)
            const container = depth <= maxDepth ? this.container(depth) : 2;
            const takesValue =
              container === 1
                ? last === Byte.Colon
                : container === 0
                  ? last === Byte.Comma || last === Byte.OpenSquare
                  : last === Byte.Colon || last === Byte.Comma || last === Byte.OpenSquare;
            if (!takesValue) {
              this.saveScan(depth, inString, escaped, lineStart, last);
              this.endBroken(chunk, start, i, "incomplete JSON object");
              return i;
            }
          }
          if (c === Byte.OpenCurly && last === Byte.Colon && this.keyIsPath && depth === this.pathLevel + 1 && depth < this.pathKeys.length) {
            this.pathLevel = depth; // entering data, or data.attach
          }
          depth++;
          if (depth <= maxDepth) this.setContainer(depth, c === Byte.OpenCurly);
          else if (this.fault === Fault.None || this.fault === Fault.Busy) this.fault = Fault.TooDeep;
          last = c;
          break;
        case Byte.CloseCurly:
        case Byte.CloseSquare:
          depth--;
          if (this.pathLevel >= depth) this.pathLevel = depth > 0 ? depth - 1 : 0;
          if (depth === 0) {
            this.saveScan(0, false, false, false, c);
            this.endFrame(chunk, start, i + 1);
            return i + 1;
          }
          last = c;
          break;
        default:
          last = c;
      }
      lineStart = false;
    }
    this.saveScan(depth, inString, escaped, lineStart, last);
    return n;
  }

  private saveScan(depth: number, inString: boolean, escaped: boolean, lineStart: boolean, last: number): void {
    this.depth = depth;
    this.inString = inString;
    this.escaped = escaped;
    this.lineStart = lineStart;
    this.lastSignificant = last;
  }

  /** Keeps chunk[start, end) as part of the current frame, unless that passes the limit. */
  private retain(chunk: Buffer, start: number, end: number): void {
    const len = end - start;
    this.frameLength += len;
    if (this.shed) {
      this.growHead(chunk.subarray(start, end));
      if (this.frameLength > this.limits.maxFrame && !this.sheddingAttachment()) this.fault = Fault.TooLarge;
      return;
    }
    if (this.frameLength > this.limits.maxFrame) {
      this.fault = Fault.TooLarge;
      return this.shedFrame(chunk.subarray(start, end));
    }
    if (len === 0) return;
    // What keeping these bytes costs, counted in ScannerLimits.held as memory, not as
    // frame bytes: a view keeps its whole read alive (a socket's read is its own
    // ArrayBuffer), so it is kept as one only when it is most of that read and counts
    // the read's size; a shorter large piece is copied (its size); a small piece goes
    // into the stage, whose whole size counts when it is made (each new stage twice the
    // last, up to STAGE_MAX: few parts). Counted as frame bytes, stages and views held
    // up to about twice --max-partial-input. Copies and stages get their own backing
    // store (allocUnsafeSlow): one from Buffer's shared pool would keep its 8 KiB slab.
    // (A chunk that is part of its read, fed again after a HOLD, is copied: the read may
    // be counted already.)
    const whole = chunk.byteOffset === 0 && chunk.length === chunk.buffer.byteLength;
    const view = len >= COPY_BELOW && whole && 2 * len >= chunk.length;
    let newStage = 0;
    if (len < COPY_BELOW && (this.stage === undefined || this.stage.length - this.stageUsed < len)) {
      newStage = this.stage === undefined ? STAGE_MIN : Math.min(this.stage.length * 2, STAGE_MAX);
    }
    const cost = view ? chunk.length : len >= COPY_BELOW ? len : newStage;
    const held = this.limits.held;
    if (held !== undefined && cost > 0) {
      if (held.bytes + cost > held.max && !makeRoom(held, this, this.keeps + cost, cost)) {
        if (this.fault === Fault.None) this.fault = Fault.Busy;
        return this.shedFrame(chunk.subarray(start, end));
      }
      held.bytes += cost;
      if (this.keeps === 0) held.holders.add(this);
    }
    this.keeps += cost;
    this.partsLength += len;
    if (len >= COPY_BELOW) {
      this.sealStage();
      const piece = chunk.subarray(start, end);
      (this.parts ??= []).push(view ? piece : copyOf(piece));
      return;
    }
    if (newStage > 0) {
      this.sealStage();
      this.stage = Buffer.allocUnsafeSlow(newStage);
    }
    chunk.copy(this.stage as Buffer, this.stageUsed, start, end);
    this.stageUsed += len;
  }

  /**
   * A frame shed for ScannerLimits.held whose attachment text, not streamed, counts in
   * its length: it stays 13 past --max-frame (sent again, the text streams and does not
   * count). Any other frame past --max-frame is 12: sending it again would not help.
   */
  private sheddingAttachment(): boolean {
    return this.fault === Fault.Busy && this.pathInline;
  }

  /**
   * Stops holding the frame's bytes (kept: its head, then `tail`); it is refused when
   * it ends, and its upload's file goes now, not then.
   */
  private shedFrame(tail: Buffer): void {
    this.keepHead(tail);
    this.shed = true;
    this.dropParts();
    this.uploadSink?.abort();
  }

  /**
   * Another connection's frame needs the room (ScannerLimits.held): this unfinished
   * frame stops being held and is answered 13 when it ends. Between pushes only.
   */
  shedForRoom(): void {
    if (this.shed || this.partsLength === 0) return;
    if (this.fault === Fault.None) this.fault = Fault.Busy;
    this.shedFrame(Buffer.alloc(0));
  }

  /** Moves the stage's bytes to the end of `parts` (before parts are read or added to). */
  private sealStage(): void {
    if (this.stage === undefined) return;
    if (this.stageUsed > 0) (this.parts ??= []).push(this.stage.subarray(0, this.stageUsed));
    this.stage = undefined;
    this.stageUsed = 0;
  }

  /**
   * The frame's first bytes, at least ACTION_PEEK_BYTES of them when it has as many
   * (held parts, then chunk[start, end)): a bad frame's action, peeked without copying
   * the whole frame.
   */
  private frameHead(chunk: Buffer, start: number, end: number): Buffer {
    const tail = chunk.subarray(start, end);
    this.sealStage();
    if (this.parts === undefined) return tail;
    const head: Buffer[] = [];
    let len = 0;
    for (const part of this.parts) {
      if (len >= ACTION_PEEK_BYTES) break;
      head.push(part);
      len += part.length;
    }
    if (len < ACTION_PEEK_BYTES) head.push(tail);
    return Buffer.concat(head);
  }

  /** Starts the copy of the frame's first ACTION_PEEK_BYTES (held parts, then `tail`). */
  private keepHead(tail: Buffer): void {
    this.head = Buffer.alloc(0);
    this.sealStage();
    for (const part of this.parts ?? []) this.growHead(part);
    this.growHead(tail);
  }

  /** Appends to the head copy until it has ACTION_PEEK_BYTES. */
  private growHead(more: Buffer): void {
    const head = this.head as Buffer;
    const room = ACTION_PEEK_BYTES - head.length;
    if (room <= 0 || more.length === 0) return;
    this.head = Buffer.concat([head, more.subarray(0, room)]);
  }

  private dropParts(): void {
    const held = this.limits.held;
    if (held !== undefined && this.keeps > 0) {
      held.bytes -= this.keeps;
      held.holders.delete(this);
    }
    this.keeps = 0;
    this.parts = undefined;
    this.partsLength = 0;
    this.stage = undefined;
    this.stageUsed = 0;
  }

  private takeFrame(chunk: Buffer, start: number, end: number): Buffer {
    const tail = chunk.subarray(start, end);
    this.sealStage();
    if (this.parts === undefined) return tail;
    this.parts.push(tail);
    const whole = Buffer.concat(this.parts, this.partsLength + tail.length);
    this.dropParts();
    return whole;
  }

  private endFrame(chunk: Buffer, start: number, end: number): void {
    this.state = State.Idle;
    this.lineStart = false;
    const total = this.frameLength + (end - start);
    if (this.shed) this.growHead(chunk.subarray(start, end));
    if (total > this.limits.maxFrame && this.fault !== Fault.TooLarge && !this.sheddingAttachment()) {
      if (!this.shed) this.keepHead(chunk.subarray(start, end));
      this.shed = true;
      this.fault = Fault.TooLarge;
    }
    const upload = this.uploadSink;
    this.uploadSink = undefined;
    if (this.fault !== Fault.None) upload?.abort();
    switch (this.fault) {
      case Fault.TooLarge:
        this.dropParts();
        this.sink.reject(
          Code.TooLarge,
          `frame of ${total} bytes is over the limit of ${this.limits.maxFrame}`,
          peekAction(this.head),
          this.ctx,
        );
        this.head = undefined;
        return;
      case Fault.Busy:
        this.sink.reject(
          Code.RateLimited,
          "the server is holding too many unfinished frames of its connections; send it again",
          peekAction(this.head),
          this.ctx,
        );
        this.head = undefined;
        return;
      case Fault.TooDeep: {
        // Its action's name is all the reply needs: no copy of the frame.
        const head = this.shed ? this.head : this.frameHead(chunk, start, end);
        this.dropParts();
        this.sink.reject(Code.InvalidData, `nesting deeper than ${this.limits.maxDepth}`, peekAction(head), this.ctx);
        return;
      }
      case Fault.TwoUploads: {
        if (this.shed) {
          this.sink.reject(Code.InvalidData, "a frame may carry one attachment ('attach.data' given twice, or a key of its path given again with escapes)", peekAction(this.head), this.ctx);
          this.head = undefined;
          return;
        }
        const bytes = this.takeFrame(chunk, start, end);
        this.sink.reject(Code.InvalidData, "a frame may carry one attachment ('attach.data' given twice, or a key of its path given again with escapes)", parsedAction(bytes), this.ctx);
        return;
      }
      case Fault.None:
        this.sink.frame(this.takeFrame(chunk, start, end), upload, this.ctx, !this.nonAscii);
    }
  }

  /** The frame that started at `start` is broken at `at`; report it and go idle. */
  private endBroken(chunk: Buffer, start: number, at: number, reason: string): void {
    this.state = State.Idle;
    this.afterBroken = true;
    this.quietLeft = this.limits.maxFrame;
    this.uploadSink?.abort();
    this.uploadSink = undefined;
    if (this.shed) this.growHead(chunk.subarray(start, at));
    const bytes = this.shed ? this.head : this.frameHead(chunk, start, at);
    this.dropParts();
    this.head = undefined;
    this.sink.reject(Code.InvalidData, reason, peekAction(bytes), this.ctx);
  }
}
