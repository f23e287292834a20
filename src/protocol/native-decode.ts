// The native door's frame decoder: one JSON object's bytes, as the scanner found them,
// to the value JSON.parse gives for them.
//
// Most frames a busy server reads are `message` requests written by programs, all alike:
// `{"action":"message","data":{"uid":"…","body":"…"}}`, no spaces, no escapes. For
// those, reading the few fields straight from the bytes costs about two thirds of
// decoding the frame to a string and parsing it (a 156-byte frame: ~1.0 µs against
// ~1.6 µs in a micro-benchmark), and allocates only the field values. In S1 profiles
// (server on one core) the frame's decoding and the GC went from 12.1 % + 10.1 % of the
// server's CPU to 6.1 % + 6.8 % (+ ~2 % copying the values out). Anything else, and
// anything the fast path is not sure of, goes to JSON.parse: the fast path gives the
// same value or none at all (test/native-decode.test.ts checks that property).

/** The bytes a fast-path frame starts with. */
const MESSAGE_HEAD = Buffer.from('{"action":"message","data":{', "latin1");

/** The `message` fields the fast path reads (all strings), each as `"name":"`. */
const KEYS = ["uid", "channel", "body", "cmid"].map((name) => ({ name, bytes: Buffer.from(`"${name}":"`, "latin1") }));

const QUOTE = 0x22;
const COMMA = 0x2c;
const CLOSE = 0x7d;

/** The known key whose `"name":"` starts at `p`, if one does. */
function keyAt(b: Buffer, p: number): { name: string; bytes: Buffer } | undefined {
  const first = b[p + 1];
  for (const key of KEYS) {
    const k = key.bytes;
    if (k[1] !== first || p + k.length > b.length) continue;
    let i = 2;
    while (i < k.length && b[p + i] === k[i]) i++;
    if (i === k.length) return key;
  }
  return undefined;
}

/**
 * `{action: "message", data}` for a frame of exactly the common shape (the head above,
 * then known string fields, nothing else); undefined for anything else. The caller
 * has checked that the frame is ASCII with no backslash (the scanner saw every byte),
 * so a string ends at the next quote; a control character in it (which JSON forbids)
 * sends the frame to JSON.parse, which refuses it.
 */
export function fastMessage(b: Buffer): { action: "message"; data: Record<string, string> } | undefined {
  const n = b.length;
  const head = MESSAGE_HEAD.length;
  if (n < head + 2) return undefined;
  for (let i = 0; i < head; i++) if (b[i] !== MESSAGE_HEAD[i]) return undefined;
  const data: Record<string, string> = {};
  let p = head;
  for (;;) {
    if (b[p] !== QUOTE) return undefined;
    const key = keyAt(b, p);
    if (key === undefined) return undefined;
    const start = p + key.bytes.length;
    let end = start;
    for (;;) {
      if (end >= n) return undefined;
      const c = b[end];
      if (c === QUOTE) break;
      if (c < 0x20) return undefined;
      end++;
    }
    data[key.name] = b.toString("latin1", start, end);
    const next = b[end + 1];
    if (next === COMMA) {
      p = end + 2;
      continue;
    }
    if (next === CLOSE && b[end + 2] === CLOSE && end + 3 === n) return { action: "message", data };
    return undefined;
  }
}

/**
 * The value of a frame's JSON (throws as JSON.parse does when it is not JSON). `ascii`:
 * every byte is below 0x80; `plain`: no byte is a backslash.
 */
export function decodeFrame(bytes: Buffer, ascii: boolean, plain: boolean): unknown {
  if (ascii && plain) {
    const msg = fastMessage(bytes);
    if (msg !== undefined) return msg;
  }
  // An ASCII frame decodes as latin1, a faster path to the same string.
  return JSON.parse(bytes.toString(ascii ? "latin1" : "utf8"));
}
