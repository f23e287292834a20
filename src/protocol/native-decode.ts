// The native door's frame decoder: one JSON object's bytes to the value JSON.parse gives
// for them.
//
// Most frames a busy server reads are `message` requests written by programs, all alike:
// `{"action":"message","data":{"uid":"…","body":"…"}}`, no spaces, no escapes. An
// action declares that shape (ActionSpec.fastFields: the string fields it may hold).
// Reading such a frame's fields straight from its bytes costs about two thirds of
// decoding it to a string and parsing it (a 156-byte frame: ~1.0 µs against ~1.6 µs
// in a micro-benchmark), and allocates only the field values. In S1 profiles
// (server on one core) the frame's decoding and the GC went from 12.1 % + 10.1 % of the
// server's CPU to 6.1 % + 6.8 % (+ ~2 % copying the values out). Anything else, and
// anything the fast path is not sure of, goes to JSON.parse: the fast path gives the
// same value or none at all (test/native-decode.test.ts checks that property).
//
// The scanner (transport/scanner.ts, ScannerLimits.fast) calls read() at each frame's
// first byte, so a common frame whole in its chunk is found and decoded in one pass
// over its bytes rather than scanned for its end and then read again. Measured in S1
// (server on one core, six alternated pairs on a host with 1-6 % steal): server CPU
// per delivered message 17.1 / 22.1 / 16.0 / 16.6 / 17.5 / 18.5 µs -> 13.6 / 15.5 /
// 15.7 / 15.5 / 15.6 / 15.5 µs.

const QUOTE = 0x22;
const COMMA = 0x2c;
const CLOSE = 0x7d;
const BACKSLASH = 0x5c;

interface Field {
  name: string;
  /** `"name":"` */
  bytes: Buffer;
}

interface Shape {
  action: string;
  /** `{"action":"<action>","data":{` */
  head: Buffer;
  /** The head's whole 4-byte words, little-endian (compared a word at a time). */
  words: Int32Array;
  fields: Field[];
}

/**
 * The common shapes of the actions that declare one (ActionSpec.fastFields): a frame
 * `{"action":"<name>","data":{…}}` whose data holds only declared fields, each a string.
 */
export class FastShapes {
  private readonly shapes: Shape[] = [];

  add(action: string, fields: readonly string[]): void {
    const plain = /^[A-Za-z0-9_]+$/;
    if (!plain.test(action) || !fields.every((f) => plain.test(f))) throw new Error(`no fast shape for ${action}: names must be plain`);
    const head = Buffer.from(`{"action":"${action}","data":{`, "latin1");
    const words = new Int32Array(head.length >> 2);
    for (let i = 0; i < words.length; i++) words[i] = head.readInt32LE(4 * i);
    this.shapes.push({ action, head, words, fields: fields.map((name) => ({ name, bytes: Buffer.from(`"${name}":"`, "latin1") })) });
  }

  /**
   * A view of the chunk last read, to read it a word at a time: made once per chunk, not
   * per frame (it keeps that one chunk alive until another is read).
   */
  private chunk: Buffer | undefined;
  private view: DataView | undefined;

  /** Where the last frame read() found ends (one past its closing brace). */
  end = 0;

  /**
   * `{action, data}` for a frame of exactly one declared shape; undefined for anything
   * else: a byte above 0x7e, a backslash or a control character in a value (which
   * JSON forbids raw) sends the frame to JSON.parse, which decodes the UTF-8, reads the
   * escape or refuses the frame.
   */
  decode(b: Buffer): { action: string; data: Record<string, string> } | undefined {
    const msg = this.read(b, 0, b.length);
    return msg !== undefined && this.end === b.length ? msg : undefined;
  }

  /**
   * A frame of one declared shape starting at `b[at]` and ending before `limit`, read
   * where it lies (the scanner's chunk): its value, with `end` set past it; undefined
   * when the bytes there are anything else or the frame does not end before `limit`.
   * Values are printable ASCII without a backslash (anything else goes to JSON.parse).
   */
  read(b: Buffer, at: number, limit: number): { action: string; data: Record<string, string> } | undefined {
    if (b !== this.chunk) {
      this.chunk = b;
      this.view = new DataView(b.buffer, b.byteOffset, b.length);
    }
    const view = this.view as DataView;
    for (const shape of this.shapes) {
      const data = readShape(shape, b, view, at, limit);
      if (data !== undefined) {
        this.end = readEnd;
        return { action: shape.action, data };
      }
    }
    return undefined;
  }
}

/** The declared field whose `"name":"` starts at `p`, if one does (all of it before `limit`). */
function fieldAt(fields: readonly Field[], b: Buffer, p: number, limit: number): Field | undefined {
  const first = b[p + 1];
  for (const field of fields) {
    const k = field.bytes;
    if (k[1] !== first || p + k.length > limit) continue;
    let i = 2;
    while (i < k.length && b[p + i] === k[i]) i++;
    if (i === k.length) return field;
  }
  return undefined;
}

/**
 * Buffer's own latin1 reader, which `toString("latin1", start, end)` reaches after
 * checking its arguments (a value is copied out of every fast frame).
 */
type Latin1Sliceable = Buffer & { latin1Slice(start: number, end: number): string };

/** Set by readShape when it answers: one past the frame's closing brace. */
let readEnd = 0;

/**
 * Non-zero when one of a word's four bytes is not plain value text: a quote, a
 * backslash, a byte below 0x20, 0x7f or a byte from 0x80 (each test is the classic "has
 * a zero byte" / "has a byte below n" bit trick, exact about whether any byte matches).
 */
function unplain(w: number): number {
  const q = w ^ 0x22222222;
  const s = w ^ 0x5c5c5c5c;
  const d = w ^ 0x7f7f7f7f;
  return (((q - 0x01010101) & ~q) | ((s - 0x01010101) & ~s) | ((d - 0x01010101) & ~d) | ((w - 0x20202020) & ~w) | w) & 0x80808080;
}

// The head and the values are read a 4-byte word at a time through a DataView (one load
// each, where the byte loop made four loads and four sets of tests). Counted with
// valgrind's callgrind over a fixed S1-like load (npm run bench:instructions: 10 pairs,
// 2,000 messages each after as many to warm up), the server's instructions per
// delivered message went from 41.3k / 41.8k to 39.5k / 38.9k; S1's frames in a
// micro-benchmark, 271 -> 224 ns per frame read.
function readShape(shape: Shape, b: Buffer, view: DataView, at: number, n: number): Record<string, string> | undefined {
  const head = shape.head;
  const words = shape.words;
  if (n - at < head.length + 2) return undefined;
  let i = 0;
  for (; i < words.length; i++) if (view.getInt32(at + 4 * i, true) !== words[i]) return undefined;
  for (i *= 4; i < head.length; i++) if (b[at + i] !== head[i]) return undefined;
  const data: Record<string, string> = {};
  let p = at + head.length;
  for (;;) {
    if (p >= n || b[p] !== QUOTE) return undefined;
    const field = fieldAt(shape.fields, b, p, n);
    if (field === undefined) return undefined;
    const start = p + field.bytes.length;
    let end = start;
    // Whole words of plain text are passed four bytes at a time; the byte loop below
    // finds the quote and refuses anything else.
    while (end + 4 <= n && unplain(view.getInt32(end, true)) === 0) end += 4;
    for (;;) {
      if (end >= n) return undefined;
      const c = b[end];
      if (c === QUOTE) break;
      if (c < 0x20 || c === BACKSLASH || c > 0x7e) return undefined;
      end++;
    }
    // b[end] is the closing quote; what follows it must be before the limit too.
    if (end + 2 >= n) return undefined;
    const next = b[end + 1];
    if (next === COMMA) {
      data[field.name] = (b as Latin1Sliceable).latin1Slice(start, end);
      p = end + 2;
      continue;
    }
    if (next === CLOSE && b[end + 2] === CLOSE) {
      data[field.name] = (b as Latin1Sliceable).latin1Slice(start, end);
      readEnd = end + 3;
      return data;
    }
    return undefined;
  }
}

/**
 * The value of a frame's JSON (throws as JSON.parse does when it is not JSON). `ascii`:
 * every byte is below 0x80; `plain`: no byte is a backslash.
 */
export function decodeFrame(bytes: Buffer, ascii: boolean, plain: boolean, shapes: FastShapes): unknown {
  if (ascii && plain) {
    const msg = shapes.decode(bytes);
    if (msg !== undefined) return msg;
  }
  // An ASCII frame decodes as latin1, a faster path to the same string.
  return JSON.parse(bytes.toString(ascii ? "latin1" : "utf8"));
}
