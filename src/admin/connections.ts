// How the admin port names a connection's door and state (/connz and /metrics alike).

import { TLSSocket } from "node:tls";
import type { Session } from "../protocol/session.js";
import type { Connection } from "../transport/connection.js";

export function doorOf(conn: Connection): "tcp" | "tls" {
  return conn.socket instanceof TLSSocket ? "tls" : "tcp";
}

export function stateOf(conn: Connection, session: Session): "closing" | "authenticated" | "unauthenticated" {
  return conn.isEnding ? "closing" : session.uid !== undefined ? "authenticated" : "unauthenticated";
}
