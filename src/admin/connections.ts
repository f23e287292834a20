// How the admin port names a connection's door and state (/connz and /metrics alike).

import { TLSSocket } from "node:tls";
import type { Session } from "../protocol/session.js";
import type { Connection } from "../transport/connection.js";
import type { Listener } from "../transport/listener.js";

/** "tcp" or "tls" for the native door; a seed door's name otherwise ("rust", "rooms"). */
export function doorOf(conn: Connection): string {
  const front = (conn.owner as Listener).front.name;
  if (front !== "native") return front;
  return conn.socket instanceof TLSSocket ? "tls" : "tcp";
}

export function stateOf(conn: Connection, session: Session): "closing" | "authenticated" | "unauthenticated" {
  return conn.isEnding ? "closing" : session.uid !== undefined ? "authenticated" : "unauthenticated";
}

/** The live connections of every listener, without copying them. */
export function* connectionsOf(listeners: readonly Listener[]): Iterable<[Connection, Session]> {
  for (const l of listeners) yield* l.connections;
}
