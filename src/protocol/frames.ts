// What an outbound frame is, for every codec and the transport: text, or text in
// parts some of which are produced while it is written (an attachment's base64 read
// from disk, a long list read page by page), so that it never sits whole in memory.

import { clockMs } from "../clock.js";

export type Fields = Record<string, unknown>;

/** A part produced while the frame is written; each piece is written in order. */
export type Producer = () => AsyncIterable<string>;

export interface StreamedFrame {
  parts: (string | Producer)[];
  /** Characters the whole frame will take, when known (counts against the outbound cap while queued). */
  size?: number;
  /** Of `size`, the characters that are text (held in memory while queued), not data read from disk. */
  text?: number;
}

export type OutFrame = string | StreamedFrame;

/**
 * A frame whose text needs a read first (a door's event that names its sender's
 * profile, not cached): made when the connection gets to it, and counted against the
 * outbound cap meanwhile as `most` characters, the longest it can be.
 */
export function afterRead(most: number, make: () => Promise<string>): StreamedFrame {
  return {
    parts: [
      async function* () {
        yield await make();
      },
    ],
    size: most,
    text: most,
  };
}

/** Unix seconds, as of the current task (clock.ts). */
export function nowSeconds(): number {
  return Math.floor(clockMs() / 1000);
}

/** How much of a frame is searched for its action name when it cannot be parsed. */
export const ACTION_PEEK_BYTES = 4096;

/**
 * The action of a well-formed frame refused for what it holds (not for its syntax): the
 * one JSON.parse sees (the last of duplicate keys, never one nested deeper), so the
 * error reply names the action a client that parses the frame would expect.
 */
export function parsedAction(bytes: Buffer): string | undefined {
  try {
    const msg: unknown = JSON.parse(bytes.toString("utf8"));
    const action = (msg as { action?: unknown } | null)?.action;
    // As the dispatcher answers a frame without one: no action, "unknown" in the reply.
    return typeof action === "string" && action !== "" ? action : undefined;
  } catch {
    return peekAction(bytes);
  }
}

/**
 * The action named in (the start of) a frame that could not be parsed, if readable: the
 * value of an `"action"` key of the outermost object (the last, as JSON.parse takes),
 * never one nested deeper (`{"data":{"action":"x"},"action":"ping",}` is ping's).
 */
export function peekAction(bytes: Buffer | undefined): string | undefined {
  if (!bytes) return undefined;
  const n = Math.min(bytes.length, ACTION_PEEK_BYTES);
  let depth = 0;
  let found: string | undefined;
  for (let i = 0; i < n; ) {
    const c = bytes[i];
    if (c !== 0x22) {
      if (c === 0x7b || c === 0x5b) depth++;
      else if (c === 0x7d || c === 0x5d) depth--;
      i++;
      continue;
    }
    const end = stringEnd(bytes, i + 1, n);
    if (end < 0) break;
    if (depth === 1 && end - i - 1 === 6 && bytes.toString("latin1", i + 1, end) === "action") {
      let k = skipSpace(bytes, end + 1, n);
      if (k < n && bytes[k] === 0x3a) {
        k = skipSpace(bytes, k + 1, n);
        if (k < n && bytes[k] === 0x22) {
          const valueEnd = stringEnd(bytes, k + 1, n);
          if (valueEnd < 0) break;
          const value = bytes.toString("latin1", k + 1, valueEnd);
          if (ACTION_NAME.test(value)) found = value;
          i = valueEnd + 1;
          continue;
        }
      }
    }
    i = end + 1;
  }
  return found;
}

const ACTION_NAME = /^[A-Za-z0-9_]{1,64}$/;

/** The index of the quote that closes the string whose text starts at `i`, or -1. */
function stringEnd(bytes: Buffer, i: number, n: number): number {
  for (; i < n; i++) {
    const c = bytes[i];
    if (c === 0x5c) i++;
    else if (c === 0x22) return i;
  }
  return -1;
}

function skipSpace(bytes: Buffer, i: number, n: number): number {
  while (i < n && (bytes[i] === 0x20 || bytes[i] === 0x09 || bytes[i] === 0x0a || bytes[i] === 0x0d)) i++;
  return i;
}
