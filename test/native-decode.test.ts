// The native decoder's fast path for `message` frames: whenever it answers, it answers
// what JSON.parse would; over real TCP, frames it passes on are refused or served as before.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decodeFrame, FastShapes } from "../src/protocol/native-decode.js";
import { MESSAGE_FAST_FIELDS, MESSAGE_SCHEMA } from "../src/features/messages.js";
import { compileFastCheck, compileSchema, ENVELOPE } from "../src/protocol/validation.js";
import { registerUser, serveForFile } from "./helpers.js";

const shared = serveForFile();

/** message's declared shape, as features/messages.ts registers it. */
const shapes = new FastShapes();
shapes.add("message", ["uid", "channel", "body", "cmid"]);
const fastMessage = (b: Buffer) => shapes.decode(b);

/** What the scanner tells the decoder about a frame's bytes. */
const flags = (b: Buffer) => ({ ascii: b.every((x) => x < 0x80), plain: !b.includes(0x5c) });

/** decodeFrame's value, or "throws" (as the dispatcher sees it). */
function decoded(b: Buffer): unknown {
  const { ascii, plain } = flags(b);
  try {
    return decodeFrame(b, ascii, plain, shapes);
  } catch {
    return "throws";
  }
}

/** JSON.parse's value for the same bytes, or "throws". */
function parsed(b: Buffer): unknown {
  try {
    return JSON.parse(b.toString("utf8"));
  } catch {
    return "throws";
  }
}

const KEYS = ["uid", "channel", "body", "cmid"];
/** Printable ASCII without backslash or quote: what the fast path reads itself. */
const plainText = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).filter((c) => c !== 0x22 && c !== 0x5c).map((c) => String.fromCharCode(c)), maxLength: 40 });
/** The common shape, keys in any order, repeats included. */
const canonical = fc
  .array(fc.tuple(fc.constantFrom(...KEYS), plainText), { minLength: 1, maxLength: 5 })
  .map((fields) => Buffer.from(`{"action":"message","data":{${fields.map(([k, v]) => `"${k}":"${v}"`).join(",")}}}`, "latin1"));

/** Bytes that matter to JSON's syntax, control and high bytes among them. */
const NOISE = [..."{}[]\":,\\ \t\r\nabu0", "\u0000", "\u001f", "\u007f"].map((c) => c.charCodeAt(0)).concat([0x80, 0xc3, 0xa9, 0xff]);

/** A canonical frame with a few bytes inserted, replaced or removed, or cut short. */
const nearMiss = fc
  .tuple(
    canonical,
    fc.array(fc.tuple(fc.constantFrom("insert", "replace", "delete"), fc.nat(), fc.constantFrom(...NOISE)), { minLength: 1, maxLength: 3 }),
    fc.option(fc.nat()),
  )
  .map(([frame, edits, cut]) => {
    const bytes = [...frame];
    for (const [op, at, byte] of edits) {
      const i = at % (bytes.length + 1);
      if (op === "insert") bytes.splice(i, 0, byte);
      else if (op === "replace" && i < bytes.length) bytes[i] = byte;
      else if (op === "delete" && i < bytes.length) bytes.splice(i, 1);
    }
    return Buffer.from(cut === null ? bytes : bytes.slice(0, cut % (bytes.length + 1)));
  });

describe("native frame decoding", () => {
  it("reads every frame of the common shape itself, as JSON.parse reads it", () => {
    fc.assert(
      fc.property(canonical, (b) => {
        const fast = fastMessage(b);
        expect(fast).toBeDefined();
        expect(fast).toEqual(JSON.parse(b.toString("latin1")));
      }),
      { numRuns: 2000 },
    );
  });

  it("gives JSON.parse's value or its refusal for anything near that shape", () => {
    fc.assert(
      fc.property(nearMiss, (b) => {
        expect(decoded(b)).toEqual(parsed(b));
      }),
      { numRuns: 20_000 },
    );
  });

  it("reads values a word at a time exactly: every byte at every place of a value, at every alignment", () => {
    // The value loop passes four plain bytes at a time (native-decode.ts, unplain): a
    // byte of any value, at any place in a value of any length mod 4, in a frame at any
    // offset of its chunk with more bytes after it, is read as JSON.parse reads it, or
    // the frame is left to it.
    let checked = 0;
    for (let len = 1; len <= 9; len++) {
      for (let pos = 0; pos < len; pos++) {
        for (let byte = 0; byte < 256; byte++) {
          const value = Buffer.alloc(len, 0x61);
          value[pos] = byte;
          const frame = Buffer.concat([Buffer.from('{"action":"message","data":{"uid":"u1","body":"'), value, Buffer.from('"}}')]);
          const plainByte = byte >= 0x20 && byte <= 0x7e && byte !== 0x22 && byte !== 0x5c;
          for (const offset of [0, 1, 2, 3]) {
            const chunk = Buffer.concat([Buffer.alloc(offset, 0x20), frame, Buffer.from('\n{"action":"ping"}\n')]);
            const value_ = shapes.read(chunk, offset, chunk.length);
            if (plainByte) {
              expect(value_).toEqual(JSON.parse(frame.toString("latin1")));
              expect(shapes.end).toBe(offset + frame.length);
            } else {
              // Anything else is JSON.parse's to read or refuse (a quote may even end
              // the value early into a frame the fast path cannot take).
              if (value_ !== undefined) expect(value_).toEqual(JSON.parse(chunk.subarray(offset, shapes.end).toString("utf8")));
            }
            checked++;
          }
        }
      }
    }
    expect(checked).toBe(45 * 256 * 4);
  });

  it("passes on spaces, escapes, other fields and other actions", () => {
    for (const text of [
      '{"action":"message","data":{"uid":"a", "body":"b"}}',
      '{"action":"message","data":{"uid":"a","body":"b\\"c"}}',
      '{"action":"message","data":{"uid":"a","body":"b","attach":{"mime":"x","data":""}}}',
      '{"action":"message","data":{"uid":"a","to":"b"}}',
      '{"action":"message","data":{"uid":"a","body":1}}',
      '{"action":"messages","data":{"uid":"a","body":"b"}}',
      '{"data":{"uid":"a","body":"b"},"action":"message"}',
      '{"action":"message","data":{"__proto__":"a"}}',
      '{"action":"message","data":{}}',
      '{"action":"message","data":{"uid":"a\u0001"}}',
    ]) {
      const b = Buffer.from(text);
      expect(fastMessage(b), text).toBeUndefined();
      expect(decoded(b), text).toEqual(parsed(b));
    }
  });

  it("over TCP: a control character in a body is refused as JSON.parse refuses it, and the connection goes on", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    a.client.write(`{"action":"message","data":{"uid":"${b.uid}","body":"bad\u0001byte"}}\n`);
    expect((await a.client.reply("message")).data).toEqual({ status: 3, error: "frame is not valid JSON" });
    a.client.write(`{"action":"message","data":{"body":"fine","uid":"${b.uid}"}}\n`);
    expect((await a.client.reply("message")).data.status).toBe(0);
    expect((await b.client.reply("ev_message")).data).toMatchObject({ from: a.uid, body: "fine", to: b.uid });
    a.client.close();
    b.client.close();
  });
});

describe("the length check that stands for the validator on the common shape", () => {
  // What the dispatcher compiles for `message` (Dispatcher.register).
  const validate = compileSchema({ ...MESSAGE_SCHEMA, properties: { ...ENVELOPE, ...MESSAGE_SCHEMA.properties } });
  const fastValid = compileFastCheck(MESSAGE_SCHEMA, MESSAGE_FAST_FIELDS);

  it("agrees with the schema's validator on every frame the fast path decodes", () => {
    expect(fastValid).toBeDefined();
    // Lengths around every limit of the schema (1, 64, 128), keys repeated or missing.
    const value = fc.tuple(fc.integer({ min: 0, max: 140 }), fc.constantFrom("a", "Z", "0", " ", "~", "{")).map(([n, c]) => c.repeat(n));
    const frame = fc
      .array(fc.tuple(fc.constantFrom(...KEYS), value), { minLength: 1, maxLength: 5 })
      .map((fields) => Buffer.from(`{"action":"message","data":{${fields.map(([k, v]) => `"${k}":"${v}"`).join(",")}}}`, "latin1"));
    let refused = 0;
    fc.assert(
      fc.property(frame, (bytes) => {
        const msg = fastMessage(bytes);
        expect(msg).toBeDefined();
        const data = (msg as { data: Record<string, string> }).data;
        const verdict = validate(data);
        if (verdict) refused++;
        expect(fastValid?.(data)).toBe(verdict === undefined);
      }),
      { numRuns: 3000 },
    );
    expect(refused).toBeGreaterThan(100); // the limits were reached, not only passed
  });

  it("leaves a schema that asks more of the shape to the validator", () => {
    const str = { type: "string", maxLength: 8 };
    expect(compileFastCheck({ type: "object", required: ["uid"], properties: { uid: str } }, ["uid"])).toBeUndefined();
    expect(compileFastCheck({ type: "object", properties: { uid: { ...str, pattern: "^[a-z]+$" } } }, ["uid"])).toBeUndefined();
    expect(compileFastCheck({ type: "object", properties: { uid: { type: ["string", "null"] } } }, ["uid"])).toBeUndefined();
    expect(compileFastCheck({ type: "object", properties: {} }, ["uid"])).toBeUndefined();
    expect(compileFastCheck({ type: "object", properties: { uid: str } }, ["uid"])?.({ uid: "123456789" })).toBe(false);
  });
});
