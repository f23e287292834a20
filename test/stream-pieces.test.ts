// streamPieces: how a streamed frame (a list reply, an attachment) is cut into writes.
// The text must be exactly the frame's, in order; the writes must be few (joined up to
// 64 KiB: a write per list item was a syscall per item) and bounded in size.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { StreamedFrame } from "../src/protocol/frames.js";
import { streamPieces } from "../src/transport/peer-common.js";

const WRITE = 64 * 1024;

async function pieces(frame: StreamedFrame): Promise<string[]> {
  const out: string[] = [];
  for await (const p of streamPieces(frame)) out.push(p);
  return out;
}

function producer(items: string[]): () => AsyncIterable<string> {
  return async function* () {
    for (const item of items) {
      await Promise.resolve();
      yield item;
    }
  };
}

// A part: a string, or a producer of strings (short items or attachment-sized pieces).
const text = fc.oneof(fc.string({ maxLength: 300 }), fc.string({ minLength: 1, maxLength: 4 }).map((s) => s.repeat(20_000)));
const part = fc.oneof(text.map((s) => ({ kind: "text" as const, s })), fc.array(text, { maxLength: 40 }).map((items) => ({ kind: "items" as const, items })));

describe("streamPieces", () => {
  it("writes a 100-item list reply in one piece, the text unchanged", async () => {
    const items = Array.from({ length: 100 }, (_, i) => `${i ? "," : ""}{"uid":"u${i}","nick":"n${i}"}`);
    const frame: StreamedFrame = { parts: ['{"action":"contactlist","data":{"status":0,"list":[', producer(items), "]}}\n"] };
    const out = await pieces(frame);
    expect(out).toHaveLength(1);
    expect(out[0]).toBe(`{"action":"contactlist","data":{"status":0,"list":[${items.join("")}]}}\n`);
  });

  it("keeps the text and its order, joins writes to at least 64 KiB (but the last) and holds at most 64 KiB plus one piece", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(part, { maxLength: 8 }), async (spec) => {
        const frame: StreamedFrame = { parts: spec.map((p) => (p.kind === "text" ? p.s : producer(p.items))) };
        const whole = spec.map((p) => (p.kind === "text" ? p.s : p.items.join(""))).join("");
        const largest = Math.max(0, ...spec.flatMap((p) => (p.kind === "text" ? [p.s.length] : p.items.map((s) => s.length))));
        const out = await pieces(frame);
        expect(out.join("")).toBe(whole);
        out.forEach((p, i) => {
          expect(p.length).toBeGreaterThan(0);
          if (i < out.length - 1) expect(p.length).toBeGreaterThanOrEqual(WRITE);
          expect(p.length).toBeLessThan(WRITE + largest);
        });
      }),
      { numRuns: 200 },
    );
  });
});
