// How the admin port reads live connections (/connz and /metrics alike): every
// listener's table, TCP doors and the HTTP port's WebSockets, through the one interface
// both connection kinds implement (transport/live.ts).

import type { Session } from "../protocol/session.js";
import type { ConnectionTable, LiveConnection } from "../transport/live.js";

export function stateOf(conn: LiveConnection, session: Session): "closing" | "authenticated" | "unauthenticated" {
  return conn.isEnding ? "closing" : session.uid !== undefined ? "authenticated" : "unauthenticated";
}

/** The live connections of every table, without copying them. */
export function* connectionsOf(tables: readonly ConnectionTable[]): Iterable<[LiveConnection, Session]> {
  for (const t of tables) yield* t.connections;
}

/** Every door the tables' connections can show, each once, in the tables' order. */
export function doorsOf(tables: readonly ConnectionTable[]): string[] {
  return [...new Set(tables.flatMap((t) => t.doors))];
}
