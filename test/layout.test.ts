import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decimal, midAbove, recordJson, SEQ_KEY_MAX, seqKey, writeSeqKey, type MessageRecord } from "../src/storage/layout.js";

describe("decimal (seq to text without V8's number-string cache)", () => {
  it("is String(n) at every digit count's edges", () => {
    for (let p = 1; p <= 1e15; p *= 10) {
      for (const n of [p - 1, p, p + 1, 2 * p - 1, 9 * p]) expect(decimal(n)).toBe(String(n));
    }
    expect(decimal(Number.MAX_SAFE_INTEGER)).toBe(String(Number.MAX_SAFE_INTEGER));
  });

  it("is String(n) for any safe non-negative integer", () => {
    fc.assert(
      fc.property(fc.oneof(fc.nat(), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER })), (n) => decimal(n) === String(n)),
      { numRuns: 20_000 },
    );
  });

  it("orders mids as their seqs (midAbove)", () => {
    const seq = fc.oneof(fc.nat(), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }));
    fc.assert(
      fc.property(seq, seq, (a, b) => midAbove(decimal(a), decimal(b)) === a > b && midAbove(decimal(a), decimal(a)) === false),
      { numRuns: 20_000 },
    );
    expect(midAbove("10", "9")).toBe(true);
    expect(midAbove("9", "10")).toBe(false);
  });

  it("keeps seq keys fixed-width and ordered", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 1e15 - 1 }), fc.integer({ min: 0, max: 1e15 - 1 }), (a, b) => {
        const [ka, kb] = [seqKey(a), seqKey(b)];
        return ka.length === 15 && Number(ka) === a && (a < b) === (ka < kb);
      }),
    );
  });
});

describe("recordJson", () => {
  const plain = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).filter((c) => c !== 0x22 && c !== 0x5c).map((c) => String.fromCharCode(c)), maxLength: 40 });
  it("is the record's JSON, and bodyAt is where a plain body's text lies in it", () => {
    fc.assert(
      fc.property(plain, plain, fc.string({ maxLength: 12 }), fc.option(plain, { nil: undefined }), fc.nat(), (from, body, nick, chid, time) => {
        const m: MessageRecord = chid === undefined ? { mid: "7", from, nick, body, time, to: "u2" } : { mid: "7", chid, from, nick, body, time };
        const text = recordJson(m, true, JSON.stringify(nick));
        expect(JSON.parse(text.json)).toEqual(m);
        expect(text.json.slice(text.bodyAt, text.bodyAt + body.length)).toBe(body);
        expect(text.json[text.bodyAt - 1]).toBe('"');
        expect(recordJson(m).json).toBe(text.json);
        expect(recordJson(m).bodyAt).toBe(-1);
      }),
      { numRuns: 500 },
    );
  });
});

describe("writeSeqKey (the message path's log key, written in place)", () => {
  it("writes seqKey's bytes for every seq up to SEQ_KEY_MAX, at the edges and anywhere", () => {
    const buf = Buffer.from("!log!" + "x".repeat(15), "latin1");
    const check = (n: number) => {
      writeSeqKey(buf, buf.length, n);
      expect(buf.toString("latin1")).toBe("!log!" + seqKey(n));
    };
    for (let p = 1; p <= SEQ_KEY_MAX; p *= 10) for (const n of [p - 1, p, p + 1, 9 * p]) check(n);
    check(SEQ_KEY_MAX);
    fc.assert(fc.property(fc.oneof(fc.nat(), fc.integer({ min: 0, max: SEQ_KEY_MAX })), (n) => check(n)), { numRuns: 20_000 });
    expect(seqKey(SEQ_KEY_MAX + 1).length).toBe(16); // past it, the string path
  });
});
