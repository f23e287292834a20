// What the operator sees of a connection, whatever carries it: a TCP (or TLS) socket of
// any door (connection.ts) or a WebSocket of the HTTP port (websocket.ts). The admin
// port's /connz, its metrics and its address bans read connections through these two
// interfaces only.

import type { Session } from "../protocol/session.js";

/** One live connection. */
export interface LiveConnection {
  readonly id: number;
  /** The client's address and port. */
  readonly remote: string;
  /**
   * Its door: "tcp" or "tls" (native over TCP), "rust" or "rooms" (the seed doors on
   * TCP), "websocket" (native over WebSocket), "echat" or "http-chat" (the seed
   * doors' WebSockets).
   */
  readonly door: string;
  /** It is flushing and closing (end() was called). */
  readonly isEnding: boolean;
  /** Unix ms it was accepted. */
  readonly since: number;
  /** Unix ms of the last bytes (or message) received. */
  readonly lastActivity: number;
  /** Bytes its socket has received and sent. */
  readonly bytesIn: number;
  readonly bytesOut: number;
  /** What waits to go out (queued and in the socket's buffer). */
  readonly outbound: number;
  /** Attachment uploads streaming in. */
  readonly uploads: number;
}

/** The live connections of one listener, and what the operator can do to them. */
export interface ConnectionTable {
  /** Each live connection and its session. */
  readonly connections: ReadonlyMap<LiveConnection, Session>;
  /** Every door its connections can show (the metrics report each, at zero too). */
  readonly doors: readonly string[];
  /** Closes every connection from `address` after telling it why (an address ban); returns how many. */
  closeAddress(address: string, reason: string): number;
}
