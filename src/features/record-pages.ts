// Message records read for a streamed reply (history, enter's last messages), a page at
// a time as the connection drains, in pages of at most PAGE_CHARS characters of text
// (one record alone when it is larger).
//
// A page is held while its records are written, and a client that does not read holds
// it for as long as it does not: at 20 records a page, a history of messages of
// --max-frame each held 20 MiB per such connection, outside --outbound-cap, and 560
// connections from one address asking for one without reading took the server past its
// heap (a hostile-client trial; the e_chat_server door's room messages the same way).
// Record sizes are not known before reading, and whoever wrote the messages chooses
// them: a page size that adapts to the last page is no bound (twenty small ones, then
// twenty large ones). So the records' sizes are read first, a page at a time, and
// dropped (nothing waits on the client in between), and the pages are cut from them.

import type { MessageRecord } from "../storage/layout.js";

/** Characters of message text one page of a streamed reply holds at most (besides one larger record). */
export const PAGE_CHARS = 256 * 1024;
/** Records read at a time for their sizes (transient: no client is waited for meanwhile). */
const SIZE_PAGE = 20;
/** A record's characters on the wire besides its body and nick (ids, time, keys). */
export const ITEM_CHARS = 100;

/** A record's text on the wire (its attachment's data is read from disk as it is written, and not counted). */
export function recordChars(m: MessageRecord): number {
  return ITEM_CHARS + m.body.length + m.nick.length + (m.attach ? m.attach.mime.length : 0);
}

/**
 * Where the page that starts at `from` ends (exclusive): the items after it while their
 * `sizes` stay within PAGE_CHARS, at most `most` of them, and always one.
 */
export function pageEnd(sizes: readonly number[], from: number, most = Infinity): number {
  let end = from + 1;
  let total = sizes[from];
  while (end < sizes.length && end - from < most && total + sizes[end] <= PAGE_CHARS) total += sizes[end++];
  return end;
}

type ReadRecords = (seqs: readonly number[]) => Promise<(MessageRecord | undefined)[]>;

/** The characters of each of `seqs`' records (0: deleted), read SIZE_PAGE at a time. */
export async function recordSizes(read: ReadRecords, seqs: readonly number[]): Promise<number[]> {
  const sizes: number[] = [];
  for (let i = 0; i < seqs.length; i += SIZE_PAGE) {
    for (const m of await read(seqs.slice(i, i + SIZE_PAGE))) sizes.push(m === undefined ? 0 : recordChars(m));
  }
  return sizes;
}

/**
 * The records of `seqs` (deleted ones left out), in pages of at most PAGE_CHARS by
 * `sizes` (read first when not given), each page read only once the one before it is
 * all taken. `onPage` sees each page as it is read (attachment prefetch).
 */
export async function* recordsInPages(
  read: ReadRecords,
  seqs: readonly number[],
  sizes?: readonly number[],
  onPage?: (page: readonly MessageRecord[]) => void,
): AsyncIterable<MessageRecord> {
  const chars = sizes ?? (await recordSizes(read, seqs));
  for (let i = 0; i < seqs.length; ) {
    const end = pageEnd(chars, i);
    const page = (await read(seqs.slice(i, end))).filter((m): m is MessageRecord => m !== undefined);
    i = end;
    onPage?.(page);
    // Each record let go as it is handed on: what a reader that stopped holds is the rest.
    for (let j = 0; j < page.length; j++) {
      const m = page[j];
      (page as (MessageRecord | undefined)[])[j] = undefined;
      yield m;
    }
  }
}
