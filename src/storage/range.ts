// Range reads that keep native memory flat.
//
// classic-level's native iterator reserves room for a whole page (`nextv(n)`: n
// entries of 64 bytes each, before the data) and frees it only when the iterator's
// JS handle is garbage-collected, long after close(); the handle is tiny, so the JS
// heap never feels that pressure, and the allocator keeps what the peaks took.
// `.all()` on a range without `limit` reads in pages of 1000: 64 KiB per read.
// Measured (Node 20.20, classic-level 3; a sublevel of 1000 keys; 1.2 M range reads
// of 20 keys each after 20 k warm-up reads; `node --expose-gc --max-old-space-size=32`;
// RSS after forced GCs, warmed-up → after, and peak; a process doing no reads: 53 MB):
//
//   keys().all()                     108 → 214 MB (+106), peak 236
//   iterator().all()                  64 → 123 MB  (+59), peak 140
//   keys().nextv(1000) + close       105 → 216 MB (+111), peak 228
//   keys().nextv(20) + close          83 →  90 MB   (+7), peak  95
//   iterator().nextv(20) + close      62 →  84 MB  (+22), peak  88
//   readKeys below (pages 32 … 1024)  89 →  90 MB   (+2), peak  96
//   keys({ limit: 20 }).all()         (100 k reads) +2 MB: the page size is the cause
//
// So reads go page by page, starting small and growing only for long ranges, and
// always close the iterator (releasing its LevelDB iterator and snapshot at once).
//
// And only so many are open at once (MAX_OPEN), so that a storm of reads cannot hold
// a native iterator per caller. 10,000 clients disconnecting at once (each user's
// last connection reads who lists them, for presence) opened 10,000 iterators at
// once: RSS 167-187 -> 240-252 MB four seconds later (three runs), 167 -> 167 with
// presence reads off (two), 165-178 -> 212-216 MB with the bound (four). What remains
// is closed iterators whose handles wait for a full collection (the storm leaves the
// process idle, so none comes soon): forced collections every second kept RSS flat,
// and V8's memory reducer brought it down within 40 s either way (to 130-142 MB). A
// read past the bound waits for one to end; libuv's pool runs four at a time anyway,
// so the reads waiting here would otherwise wait in its queue. The waiters are bounded
// by their callers (requests, a few per connection; background tasks), and a read
// never waits for another while it holds its place.

import type { AbstractSnapshot } from "abstract-level";
import type { Space } from "./layout.js";

export interface Range {
  gt?: string;
  gte?: string;
  lt?: string;
  lte?: string;
  reverse?: boolean;
  /** At most this many entries; absent or negative: no limit. */
  limit?: number;
  /** Read from this explicit snapshot of the database (db.snapshot()). */
  snapshot?: AbstractSnapshot;
}

interface PagedIterator<T> {
  nextv(size: number): Promise<T[]>;
  close(): Promise<void>;
}

const FIRST_PAGE = 32;
// Long ranges reach abstract-level's own page size: a big page's buffer is then small
// beside the result it produced.
const MAX_PAGE = 1024;

/** Range reads open at once (see the top of this file). */
export const MAX_OPEN = 16;
let open = 0;
/** Reads waiting for a place, oldest first from `head`. */
const waiting: (() => void)[] = [];
let head = 0;

/** Starts `read` once fewer than MAX_OPEN range reads are open. */
async function limited<T>(read: () => Promise<T>): Promise<T> {
  if (open < MAX_OPEN) open++;
  else await new Promise<void>((resolve) => waiting.push(resolve));
  try {
    return await read();
  } finally {
    release();
  }
}

/** A read ended: its place goes to the oldest waiting one, if any. */
function release(): void {
  if (head === waiting.length) {
    open--;
    return;
  }
  const next = waiting[head++];
  if (head === waiting.length) {
    waiting.length = 0;
    head = 0;
  } else if (head >= 1024 && head * 2 >= waiting.length) {
    waiting.splice(0, head);
    head = 0;
  }
  next();
}

/** Range reads open now and waiting to open (for tests and diagnostics). */
export function rangeReads(): { open: number; waiting: number } {
  return { open, waiting: waiting.length - head };
}

async function drain<T>(it: PagedIterator<T>): Promise<T[]> {
  const out: T[] = [];
  let size = FIRST_PAGE;
  try {
    for (;;) {
      // A page may come back short of `size` (classic-level also stops at 16 KiB of
      // data), so only an empty page ends the range. The iterator applies `limit`.
      const page = await it.nextv(size);
      if (page.length === 0) return out;
      for (const item of page) out.push(item);
      if (size < MAX_PAGE) size *= 2;
    }
  } finally {
    await it.close();
  }
}

export function readKeys(space: Space, range: Range): Promise<string[]> {
  return limited(() => drain(space.keys(range)));
}

export function readValues<T = unknown>(space: Space, range: Range): Promise<T[]> {
  return limited(() => drain(space.values(range))) as Promise<T[]>;
}

export function readEntries<T = unknown>(space: Space, range: Range): Promise<[string, T][]> {
  return limited(() => drain(space.iterator(range))) as Promise<[string, T][]>;
}
