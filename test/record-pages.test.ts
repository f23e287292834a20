// Streamed replies read message records in pages cut by their text sizes
// (src/features/record-pages.ts): a client that stops reading holds at most one page,
// however the messages' sizes are laid out (20 records a page were 20 MiB of messages
// of --max-frame, per connection that asked for a history and did not read it).
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PAGE_CHARS, recordChars, recordsInPages } from "../src/features/record-pages.js";
import type { MessageRecord } from "../src/storage/layout.js";

function record(seq: number, bodyLength: number): MessageRecord {
  return { mid: String(seq), from: "a", nick: "n", body: "b".repeat(bodyLength), time: 1 };
}

describe("recordsInPages", () => {
  it("reads pages of at most PAGE_CHARS (or one larger record), each only once the one before is taken, and yields every record there is, in order (property)", async () => {
    const body = fc.oneof(fc.nat(2000), fc.integer({ min: 100_000, max: 1_100_000 }));
    await fc.assert(
      fc.asyncProperty(fc.array(fc.option(body, { nil: undefined }), { maxLength: 60 }), fc.boolean(), async (bodies, sized) => {
        const store = new Map<number, MessageRecord>();
        bodies.forEach((b, i) => b !== undefined && store.set(i + 1, record(i + 1, b)));
        const seqs = bodies.map((_, i) => i + 1);
        const chars = (s: number) => (store.has(s) ? recordChars(store.get(s) as MessageRecord) : 0);
        const reads: number[][] = [];
        const read = async (q: readonly number[]) => {
          reads.push([...q]);
          return q.map((s) => store.get(s));
        };
        // Without sizes, they are read first, 20 records at a time.
        const sizing = sized ? 0 : Math.ceil(seqs.length / 20);
        const got: string[] = [];
        for await (const m of recordsInPages(read, seqs, sized ? seqs.map(chars) : undefined)) {
          got.push(m.mid);
          // Nothing read ahead: the last read is the page this record is in.
          expect(reads[reads.length - 1]).toContain(Number(m.mid));
          expect(reads.length).toBeGreaterThan(sizing);
        }
        expect(got).toEqual([...store.keys()].map(String));
        const pages = reads.slice(sizing);
        expect(pages.flat()).toEqual(seqs);
        for (const page of pages) {
          const total = page.reduce((n, s) => n + chars(s), 0);
          expect(page.length === 1 || total <= PAGE_CHARS, `a page of ${page.length} records, ${total} characters`).toBe(true);
        }
      }),
      { numRuns: 200 },
    );
  });

  it("twenty small records and then twenty of a megabyte: the large ones one page each", async () => {
    const store = new Map<number, MessageRecord>();
    for (let i = 1; i <= 40; i++) store.set(i, record(i, i <= 20 ? 100 : 1_000_000));
    const pages: number[][] = [];
    const read = async (q: readonly number[]) => {
      pages.push([...q]);
      return q.map((s) => store.get(s));
    };
    const seqs = [...store.keys()];
    const it = recordsInPages(read, seqs)[Symbol.asyncIterator]();
    const first = await it.next();
    expect(first.value?.mid).toBe("1");
    // Sizing pass: two reads of 20; then the first page: the twenty small ones.
    expect(pages.slice(2)).toEqual([seqs.slice(0, 20)]);
    for (let i = 2; i <= 21; i++) expect((await it.next()).value?.mid).toBe(String(i));
    expect(pages.slice(3)).toEqual([[21]]);
  });
});
