// What a queued frame counts toward its connection's outbound cap (frameWeight): a
// streamed event counts its text whole and its attachment's data up to 64 KiB. The
// text was capped with the data: an event with a body of nearly --max-frame and a
// 1-byte attachment counted 64 KiB, so a client that did not read held 16 times the
// cap in such frames before it was closed as a slow reader.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { NativeCodec } from "../src/protocol/codec.js";
import { frameWeight } from "../src/transport/peer-common.js";

const codec = new NativeCodec({ readBase64: async function* () {} });
const STREAMED = 64 * 1024;

function event(body: string, size: number) {
  return codec.event({ kind: "message", m: { mid: "1", from: "a", to: "b", nick: "A", body, time: 1, attach: { mime: "a/b", sha: "0".repeat(64), size } } });
}

describe("frameWeight of an ev_message with an attachment", () => {
  it("counts its text whole and its data up to 64 KiB", () => {
    fc.assert(
      fc.property(fc.nat(300_000), fc.nat(4_000_000), (bodyLength, size) => {
        const frame = event("x".repeat(bodyLength), size);
        if (typeof frame === "string") throw new Error("an attachment event is streamed");
        const text = (frame.parts[0] as string).length + (frame.parts[2] as string).length;
        expect(frameWeight(frame)).toBe(text + Math.min(4 * Math.ceil(size / 3), STREAMED));
        expect(frameWeight(frame)).toBeGreaterThan(bodyLength);
      }),
      { numRuns: 50 },
    );
  });
});
