// Attachment helpers. Sending: the file's bytes become base64 text a chunk at a time,
// so the client never holds the whole file (PROTOCOL.md §8 "Attachments": the server
// streams `data.attach.data` to disk as it arrives). Receiving: the server sends the
// attachment inline as base64 in `ev_message` and `history` (read from its disk as the
// frame is written), so a received attachment is simply that string.

import { createWriteStream } from "node:fs";
import { once } from "node:events";
import { Readable } from "node:stream";
import { finished } from "node:stream/promises";
import type { Attachment } from "./types.js";

/**
 * Turns a byte stream into base64 text chunks that concatenate to the base64 of the
 * whole stream. Base64 maps 3 bytes to 4 characters, so each chunk is encoded up to a
 * multiple of 3 bytes and the 0–2 leftover bytes are carried into the next one;
 * encoding chunks independently would put padding in the middle, which the server
 * rejects ("misplaced padding").
 */
export async function* base64Chunks(source: AsyncIterable<Buffer | Uint8Array | string>): AsyncGenerator<{ text: string; bytes: number }> {
  let carry: Buffer = Buffer.alloc(0);
  for await (const raw of source) {
    const chunk = typeof raw === "string" ? Buffer.from(raw) : Buffer.isBuffer(raw) ? raw : Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
    if (chunk.length === 0) continue;
    const buf = carry.length > 0 ? Buffer.concat([carry, chunk]) : chunk;
    const whole = buf.length - (buf.length % 3);
    carry = Buffer.from(buf.subarray(whole));
    if (whole > 0) yield { text: buf.toString("base64", 0, whole), bytes: chunk.length };
    else yield { text: "", bytes: chunk.length };
  }
  if (carry.length > 0) yield { text: carry.toString("base64"), bytes: 0 };
}

/** The attachment's bytes (an empty Buffer for `{"mime":"","data":""}`). */
export function decodeAttachment(attach: Attachment | undefined): Buffer {
  return Buffer.from(attach?.data ?? "", "base64");
}

/** Whether a message carries an attachment (the server sends `data: ""` when not). */
export function hasAttachment(attach: Attachment | undefined): attach is Attachment {
  return !!attach && typeof attach.data === "string" && attach.data.length > 0;
}

/** Decoded size of a base64 string, without decoding it. */
export function base64DecodedLength(b64: string): number {
  if (b64.length === 0) return 0;
  const pad = b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0;
  return (b64.length / 4) * 3 - pad;
}

/**
 * Writes a received attachment to `path`, decoding a slice at a time so the decoded
 * copy never sits in memory next to the base64 one.
 */
export async function saveAttachment(attach: Attachment, path: string): Promise<number> {
  const out = createWriteStream(path);
  const step = 64 * 1024; // a multiple of 4: every slice is whole base64 quads
  let written = 0;
  try {
    for (let i = 0; i < attach.data.length; i += step) {
      const bytes = Buffer.from(attach.data.slice(i, i + step), "base64");
      written += bytes.length;
      if (!out.write(bytes)) await once(out, "drain");
    }
    out.end();
    await finished(out);
  } catch (err) {
    out.destroy();
    throw err;
  }
  return written;
}

/** A Readable over an in-memory buffer, for sendAttachment callers that have one. */
export function bufferSource(buf: Buffer, chunk = 48 * 1024): Readable {
  let at = 0;
  return new Readable({
    read() {
      if (at >= buf.length) this.push(null);
      else {
        this.push(buf.subarray(at, at + chunk));
        at += chunk;
      }
    },
  });
}
