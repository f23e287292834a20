// What the TCP and the WebSocket transports do the same way: delivery confirmation
// marks (for clients that do not acknowledge), the reasons reading is paused, and, for
// their listeners, the idle timeout and an address ban's closing. One home, so the two
// transports cannot drift apart.

import type { Socket } from "node:net";
import type { Logger } from "pino";
import { plainAddress } from "../addresses.js";
import type { Config } from "../config.js";
import type { Metrics } from "../metrics.js";
import type { OutFrame, StreamedFrame } from "../protocol/frames.js";
import type { Router } from "../protocol/router.js";
import type { Session } from "../protocol/session.js";

/** What the listeners' shared steps need of a connection. */
interface Closable {
  readonly id: number;
  readonly remote: string;
  readonly address: string;
  readonly closed: boolean;
  readonly lastActivity: number;
  end(): void;
}

/** What one queued streamed frame counts toward the outbound cap, at most (see frameWeight). */
const STREAMED_WEIGHT = 64 * 1024;

/**
 * What one listener (a TCP door, the WebSocket door) holds against the connection
 * caps. Every door's listener counts them together (server.ts gives each the same
 * group): --max-connections and --max-per-address are for the server, not per door.
 */
export interface SlotCounter {
  /** Connections holding a slot (not lingering), handshakes included. */
  readonly held: number;
  /** Connections (and handshakes) from `address` not logged in; `prune` lets logged-in ones go. */
  unauthenticated(address: string, prune: boolean): number;
}

/**
 * A socket's remote address as every door counts and bans it: an IPv4 client is
 * 127.0.0.1 whether the listener is IPv4 or IPv6 (::ffff:127.0.0.1), so that its
 * connections through two doors bound to different families share one
 * --max-per-address count.
 */
export function socketAddress(socket: { remoteAddress?: string }): string {
  return plainAddress(socket.remoteAddress ?? "?");
}

/** The cap a new connection from `address` is over, counted over the whole group, if any. */
export function overCap(group: readonly SlotCounter[], address: string, config: Pick<Config, "maxConnections" | "maxPerAddress">): "full" | "address" | undefined {
  let held = 0;
  for (const l of group) held += l.held;
  if (held >= config.maxConnections) return "full";
  let unauth = 0;
  for (const l of group) unauth += l.unauthenticated(address, false);
  if (unauth < config.maxPerAddress) return undefined;
  // At the cap: count again without the connections that have logged in since.
  unauth = 0;
  for (const l of group) unauth += l.unauthenticated(address, true);
  return unauth >= config.maxPerAddress ? "address" : undefined;
}

/**
 * What a queued frame counts toward its connection's outbound cap: a string its
 * characters; a streamed frame (an attachment read from disk while it is written) its
 * text, which it holds, and its data up to STREAMED_WEIGHT, because the data stays on
 * disk until the client reads it (the reasons are at the top of connection.ts). (The
 * text was capped with the data: a body of nearly --max-frame beside a tiny
 * attachment counted 64 KiB, so a pile of them held 16 times the cap.)
 */
export function frameWeight(frame: OutFrame): number {
  if (typeof frame === "string") return frame.length;
  const text = frame.text ?? 0;
  return text + Math.min((frame.size ?? 0) - text, STREAMED_WEIGHT);
}

/** A streamed frame's text goes out in writes of at least this many characters (but its last). */
const STREAM_WRITE_CHARS = 64 * 1024;

/**
 * The text of a streamed frame in the pieces it is written in: what its parts yield,
 * joined up to STREAM_WRITE_CHARS a write. A list reply yields an item at a time, and
 * a write per item was a syscall per item (a 20-message history page: 22 writes, each
 * 10-20 µs of kernel time on this kind of host). What is held here at once is at most
 * STREAM_WRITE_CHARS plus one piece of a part (an attachment's: 64 KiB of base64).
 */
export async function* streamPieces(frame: StreamedFrame): AsyncIterable<string> {
  let held = "";
  for (const part of frame.parts) {
    if (typeof part === "string") held += part;
    else {
      for await (const piece of part()) {
        held += piece;
        if (held.length >= STREAM_WRITE_CHARS) {
          yield held;
          held = "";
        }
      }
    }
    if (held.length >= STREAM_WRITE_CHARS) {
      yield held;
      held = "";
    }
  }
  if (held !== "") yield held;
}

/** Confirmation marks kept per connection (older ones merge into the newest). */
const MAX_MARKS = 32;

/**
 * Adds the mark "once `at` characters are handed to the OS, everything through inbox
 * seq `seq` has been read" to `marks` (flat [at, seq] pairs, oldest first; made on
 * first use, so an idle connection holds none). Past MAX_MARKS the newest absorbs it.
 */
export function addMark(marks: number[] | undefined, at: number, seq: number): number[] {
  const m = marks ?? [];
  if (m.length >= 2 * MAX_MARKS) {
    m[m.length - 2] = at;
    m[m.length - 1] = seq;
  } else m.push(at, seq);
  return m;
}

/** Removes the marks at or below `handed` and returns the highest seq they confirm (0: none). */
export function settleMarks(marks: number[] | undefined, handed: number): number {
  if (!marks || marks.length === 0) return 0;
  let i = 0;
  let seq = 0;
  while (i < marks.length && marks[i] <= handed) {
    seq = marks[i + 1];
    i += 2;
  }
  if (i > 0) marks.splice(0, i);
  return seq;
}

const reasonBits = new Map<string, number>();

/** The bit of a reason reading is paused for (each transport keeps the set as one number). */
export function reasonBit(why: string): number {
  let bit = reasonBits.get(why);
  if (bit === undefined) {
    if (reasonBits.size >= 31) throw new Error("too many pause reasons");
    bit = 1 << reasonBits.size;
    reasonBits.set(why, bit);
  }
  return bit;
}

/**
 * Closes a connection silent for longer than its idle limit (any request counts),
 * after telling it why.
 */
export function closeIfIdle(conn: Closable, session: Session, now: number, config: Config, log: Logger, metrics: Metrics, router: Router): void {
  const limit = session.uid === undefined ? config.idleUnauth : config.idleAuth;
  if (conn.closed || now - conn.lastActivity <= limit * 1000) return;
  log.info({ conn: conn.id, remote: conn.remote, uid: session.uid, idle: limit }, "idle timeout; closing");
  metrics.closes.idle++;
  router.sendTo(session, { kind: "close", reason: `idle timeout: nothing received for ${limit} s` });
  conn.end();
}

/** The close frame's reason at a graceful stop. */
export const SHUTTING_DOWN = "the server is shutting down";

/** Ends every connection (a graceful stop), after telling each why in its door's close frame. */
export function endAll<C extends Closable>(connections: ReadonlyMap<C, Session>, router: Router): void {
  for (const [conn, session] of connections) {
    if (!conn.closed) router.sendTo(session, { kind: "close", reason: SHUTTING_DOWN });
    conn.end();
  }
}

/** Closes every connection from `address` (an operator's ban), after telling it why; returns how many. */
export function closeFromAddress<C extends Closable>(connections: ReadonlyMap<C, Session>, address: string, reason: string, router: Router): number {
  const want = plainAddress(address);
  let n = 0;
  for (const [conn, session] of connections) {
    if (conn.closed || plainAddress(conn.address) !== want) continue;
    router.sendTo(session, { kind: "close", reason });
    conn.end();
    n++;
  }
  return n;
}

/**
 * Bytes a socket has handed on to the operating system: socket.bytesWritten counts its
 * unsent buffer too, which a destroy (a slow reader cut off) throws away, and a counter
 * read from it went down (wirechat_bytes_out_total: a reset to Prometheus, 8 MiB over
 * in rate()). Node's count of what it dispatched only grows.
 */
export function bytesHanded(socket: Socket): number {
  const dispatched = (socket as unknown as { _bytesDispatched?: unknown })._bytesDispatched;
  return typeof dispatched === "number" ? dispatched : socket.bytesWritten;
}
