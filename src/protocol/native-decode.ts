// The native door's frame decoder: one JSON object's bytes, as the scanner found them,
// to the value JSON.parse gives for them.
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

const QUOTE = 0x22;
const COMMA = 0x2c;
const CLOSE = 0x7d;

interface Field {
  name: string;
  /** `"name":"` */
  bytes: Buffer;
}

interface Shape {
  action: string;
  /** `{"action":"<action>","data":{` */
  head: Buffer;
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
    this.shapes.push({
      action,
      head: Buffer.from(`{"action":"${action}","data":{`, "latin1"),
      fields: fields.map((name) => ({ name, bytes: Buffer.from(`"${name}":"`, "latin1") })),
    });
  }

  /**
   * `{action, data}` for a frame of exactly one declared shape; undefined for anything
   * else. The caller has checked that the frame is ASCII with no backslash (the scanner
   * saw every byte), so a string ends at the next quote; a control character in it
   * (which JSON forbids) sends the frame to JSON.parse, which refuses it.
   */
  decode(b: Buffer): { action: string; data: Record<string, string> } | undefined {
    for (const shape of this.shapes) {
      const data = readShape(shape, b);
      if (data !== undefined) return { action: shape.action, data };
    }
    return undefined;
  }
}

/** The declared field whose `"name":"` starts at `p`, if one does. */
function fieldAt(fields: readonly Field[], b: Buffer, p: number): Field | undefined {
  const first = b[p + 1];
  for (const field of fields) {
    const k = field.bytes;
    if (k[1] !== first || p + k.length > b.length) continue;
    let i = 2;
    while (i < k.length && b[p + i] === k[i]) i++;
    if (i === k.length) return field;
  }
  return undefined;
}

function readShape(shape: Shape, b: Buffer): Record<string, string> | undefined {
  const n = b.length;
  const head = shape.head;
  if (n < head.length + 2) return undefined;
  for (let i = 0; i < head.length; i++) if (b[i] !== head[i]) return undefined;
  const data: Record<string, string> = {};
  let p = head.length;
  for (;;) {
    if (b[p] !== QUOTE) return undefined;
    const field = fieldAt(shape.fields, b, p);
    if (field === undefined) return undefined;
    const start = p + field.bytes.length;
    let end = start;
    for (;;) {
      if (end >= n) return undefined;
      const c = b[end];
      if (c === QUOTE) break;
      if (c < 0x20) return undefined;
      end++;
    }
    data[field.name] = b.toString("latin1", start, end);
    const next = b[end + 1];
    if (next === COMMA) {
      p = end + 2;
      continue;
    }
    if (next === CLOSE && b[end + 2] === CLOSE && end + 3 === n) return data;
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
