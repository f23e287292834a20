// How long an HTTP request may take to arrive, for both HTTP ports (the HTTP/WebSocket
// door and the admin port): --idle-unauth, at start-up and after a SIGHUP.

import type { Server } from "node:http";

/**
 * A request (headers and body) must have arrived within `seconds`, else 408 and the
 * socket closes. Node times a request out only while its headers' limit is no longer
 * than the request's: Fastify makes the server with node's headers limit (60 s), so an
 * --idle-unauth under a minute set as requestTimeout alone did nothing. (Node checks
 * every connectionsCheckingInterval: the ports make their servers with 1 s.)
 */
export function requestTime(server: Server, seconds: number): void {
  server.requestTimeout = seconds * 1000;
  server.headersTimeout = Math.min(60_000, seconds * 1000);
}
