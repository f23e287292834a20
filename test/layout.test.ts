import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decimal, seqKey } from "../src/storage/layout.js";

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

  it("keeps seq keys fixed-width and ordered", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 1e15 - 1 }), fc.integer({ min: 0, max: 1e15 - 1 }), (a, b) => {
        const [ka, kb] = [seqKey(a), seqKey(b)];
        return ka.length === 15 && Number(ka) === a && (a < b) === (ka < kb);
      }),
    );
  });
});
