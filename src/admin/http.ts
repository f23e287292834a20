// The admin port: health, readiness, Prometheus metrics, connections (like NATS's
// /connz) and the operator's actions, over HTTP on Fastify. It listens on 127.0.0.1
// unless --admin-host says otherwise; with --admin-token every route but /healthz and
// /readyz needs `Authorization: Bearer <token>`. Errors are JSON:
// {"error": <text>, "code": <protocol status>, "name": <its name>}.

import { timingSafeEqual } from "node:crypto";
import type { AddressInfo } from "node:net";
import { Readable } from "node:stream";
import { Ajv } from "ajv";
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from "fastify";
import type { Logger } from "pino";
import type client from "prom-client";
import type { Config } from "../config.js";
import type { AdminOps } from "../features/admin.js";
import { plainAddress } from "../addresses.js";
import { followLevel } from "../log.js";
import { requestTime } from "../transport/request-time.js";
import { CODES, Code, ProtocolError } from "../protocol/codes.js";
import type { Session } from "../protocol/session.js";
import type { BanKind } from "../storage/layout.js";
import type { ConnectionTable } from "../transport/live.js";
import { connectionsOf, stateOf } from "./connections.js";

export interface AdminDeps {
  ops: AdminOps;
  /** Every listener's connections: the TCP doors' and the HTTP port's WebSockets. */
  connections: readonly ConnectionTable[];
  /** Requests a connection sent that are read and not answered yet. */
  unanswered: (s: Session) => number;
  registry: client.Registry;
  /** Why the server is not ready (undefined when it is). */
  notReady: () => string | undefined;
  /** Writes a consistent copy of the data to `dir` (backup.ts). */
  backup: (dir: string) => Promise<BackupSummary>;
  /** Every record of one user, or of the whole server, as NDJSON lines (8 first when no such user). */
  exportLines: (user: string | undefined) => Promise<AsyncIterable<string>>;
  version: string;
  /** The data dir this server holds (absolute, symlinks resolved): the CLI checks it is the one it was given. */
  dataDir: string;
}

export interface BackupSummary {
  dir: string;
  keys: number;
  blobs: number;
  missing: number;
}

const HTTP_OF: Partial<Record<Code, number>> = {
  [Code.UserNotFound]: 404,
  [Code.AlreadyExist]: 409,
  [Code.InvalidData]: 400,
  [Code.EmptyField]: 400,
  [Code.RateLimited]: 429,
  [Code.Forbidden]: 403,
  [Code.Unavailable]: 503,
};

function sendError(reply: FastifyReply, code: Code, text: string, http = HTTP_OF[code] ?? 500): FastifyReply {
  return reply.code(http).send({ error: text, code, name: CODES[code].name });
}

const USER = { type: "string", minLength: 1, maxLength: 64 } as const;
const PASS = { type: "string", minLength: 1, maxLength: 1024 } as const;
const UNBAN_TARGET = {
  type: "object",
  properties: { login: USER, address: { type: "string", minLength: 1, maxLength: 64 } },
  additionalProperties: false,
  minProperties: 1,
} as const;
/** (The reason's length is the ban's own rule, AdminOps.ban: the offline CLI's too.) */
const BAN_TARGET = { ...UNBAN_TARGET, properties: { ...UNBAN_TARGET.properties, reason: { type: "string" } } } as const;

const LOOPBACK_HOST = /^(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$/i;

function isLoopback(address: string): boolean {
  const a = plainAddress(address);
  return a === "::1" || a.startsWith("127.");
}

/**
 * A request from this machine that names this server as such: from a loopback address
 * naming localhost, or from the very address it reached (an --admin-host that is one of
 * this machine's own addresses: the CLI beside the server connects there) naming that
 * address. A web page's request after DNS rebinding names its own host; another
 * machine cannot connect from this one's address.
 */
function isLocalRequest(remoteAddress: string | undefined, localAddress: string | undefined, host: string): boolean {
  const remote = plainAddress(remoteAddress ?? "");
  const local = plainAddress(localAddress ?? "");
  const named = plainAddress(host.startsWith("[") ? host.slice(1, host.indexOf("]")) : host.replace(/:\d+$/, ""));
  // From loopback: localhost, or the loopback address it reached (an --admin-host of
  // 127.0.0.2: the CLI names it, and was refused by its own server).
  if (isLoopback(remote)) return LOOPBACK_HOST.test(host) || (named !== "" && named === local);
  if (remote === "" || remote !== local) return false;
  return named === local;
}

/** The one of login and address a ban body names. */
function banTarget(body: { login?: string; address?: string }): [BanKind, string] {
  if ((body.login === undefined) === (body.address === undefined)) {
    throw new ProtocolError(Code.InvalidData, "give either 'login' or 'address'");
  }
  return body.login !== undefined ? ["login", body.login] : ["addr", body.address as string];
}

/**
 * Whether an Authorization header carries `expected` ("Bearer <token>"): the scheme in
 * any case (RFC 7235), the token compared in constant time.
 */
function hasToken(header: string | undefined, expected: string): boolean {
  const got = Buffer.from(header ?? "");
  const want = Buffer.from(expected);
  if (got.length !== want.length) return false;
  const space = want.indexOf(0x20);
  if (got.toString("latin1", 0, space).toLowerCase() !== want.toString("latin1", 0, space).toLowerCase()) return false;
  return timingSafeEqual(got.subarray(space), want.subarray(space));
}

/** Sockets the admin port holds at once (the rest are closed as they connect). */
const ADMIN_MAX_CONNECTIONS = 64;

/**
 * Builds the admin app; `d` is filled in later (routes read it when they run), so the
 * server builds it first thing, before its storage and stores: notReady from the
 * start, version and dataDir before it listens, the rest once the server is up.
 */
export function buildAdmin(config: Config, log: Logger, d: AdminDeps): FastifyInstance {
  const app = Fastify({
    // Fastify logs every request at info: the admin port's own lines are warnings and
    // errors only (the operator actions log through the server's logger).
    loggerInstance: log.child({ door: "admin" }) as unknown as FastifyBaseLogger,
    bodyLimit: 64 * 1024,
    // Request times checked every second (node's default, 30 s, let one live half a
    // minute more past its limit: adminRequestTime).
    http: { connectionsCheckingInterval: 1000 },
    // An idle kept-alive socket goes after 5 s (Fastify's 72 s let 64 clients asking once
    // a minute hold every one of the port's sockets).
    keepAliveTimeout: 5000,
    // What Fastify refuses before any route runs is answered in this port's shape too
    // (its own was {"error":"Bad Request","code":"FST_ERR_BAD_URL",…}, a string code).
    frameworkErrors: (err, _req, reply) => sendError(reply, Code.InvalidData, `the request is not valid: ${err.message}`, 400),
    // A request node's parser cannot read (a bad header, a broken request line): the
    // same shape, written on the socket, which is then closed.
    clientErrorHandler: (err, socket) => {
      const why = (err as { code?: string }).code;
      if (why === "ECONNRESET" || !socket.writable) return socket.destroy();
      const [status, text] =
        why === "ERR_HTTP_REQUEST_TIMEOUT" ? [408, "Request Timeout"] : why === "HPE_HEADER_OVERFLOW" ? [431, "Request Header Fields Too Large"] : [400, "Bad Request"];
      const body = JSON.stringify({ error: `the request is not valid HTTP (${why ?? err.message})`, code: Code.InvalidData, name: CODES[Code.InvalidData].name });
      socket.end(`HTTP/1.1 ${status} ${text}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
    },
  });
  adminRequestTime(app, config);
  // ... and follow the server's level when SIGHUP changes it.
  const unfollow = followLevel(log, app.log as unknown as Logger, "warn");
  app.addHook("onClose", async () => unfollow());
  // A body is JSON: a value of the wrong type is refused, never converted (Fastify's
  // default coerced {"open":"false"} and {"open":null} to false and closed registration,
  // {"user":["bob"]} to "bob"). A query string is text: its numbers are converted. An
  // unknown parameter is refused, not dropped: `/export?usr=alice` exported everyone.
  const bodyAjv = new Ajv({ coerceTypes: false, useDefaults: true, allErrors: false, strict: false });
  const queryAjv = new Ajv({ coerceTypes: "array", useDefaults: true, allErrors: false, strict: false });
  app.setValidatorCompiler(({ schema, httpPart }) => (httpPart === "body" ? bodyAjv : queryAjv).compile(schema));
  const token = config.adminToken ? `Bearer ${config.adminToken}` : undefined;

  app.addHook("onRequest", async (req, reply) => {
    const path = req.url.split("?")[0];
    if (path === "/healthz" || path === "/readyz") return;
    if (token) {
      if (!hasToken(req.headers.authorization, token)) {
        log.warn({ remote: req.ip, url: req.url }, "admin request without the right token");
        return sendError(reply.header("www-authenticate", "Bearer"), Code.NeedAuth, "this admin port needs 'Authorization: Bearer <token>'", 401);
      }
    } else if (path !== "/metrics" && !isLocalRequest(req.socket.remoteAddress, req.socket.localAddress, req.headers.host ?? "")) {
      // Without a token, only requests from this machine (isLocalRequest); health,
      // readiness and metrics answer anyone who can connect.
      return sendError(reply, Code.Forbidden, "without --admin-token this admin route answers only clients on this machine (Host: localhost, 127.0.0.1, or the address they connected to)", 403);
    }
    // While the server starts (its database opening, a cluster node catching up with
    // the log) the port listens with nothing behind it but /version.
    if (d.ops === undefined && path !== "/version") {
      return sendError(reply, Code.Unavailable, `the server is starting (${d.notReady() ?? "nearly up"}); try again once /readyz answers 200`);
    }
  });

  app.setErrorHandler((err, req, reply) => {
    if (err instanceof ProtocolError) return sendError(reply, err.code, err.message);
    const e = err as { validation?: unknown; statusCode?: number; message: string };
    if (e.validation || (e.statusCode !== undefined && e.statusCode < 500)) {
      return reply.code(e.statusCode ?? 400).send({ error: e.message, code: Code.InvalidData, name: CODES[Code.InvalidData].name });
    }
    req.log.error({ err }, "admin request failed");
    return sendError(reply, Code.Unavailable, "the request failed; see the server log");
  });
  app.setNotFoundHandler((req, reply) => sendError(reply, Code.UnknownAction, `no route ${req.method} ${req.url.split("?")[0]}`, 404));

  app.get("/healthz", async () => ({ status: "ok" }));
  app.get("/readyz", async (_req, reply) => {
    const why = d.notReady();
    return why === undefined ? { ready: true } : reply.code(503).send({ ready: false, reason: why });
  });
  app.get("/version", async () => ({ server: "wirechat", version: d.version, dataDir: d.dataDir }));
  app.get("/metrics", async (_req, reply) => {
    reply.header("content-type", d.registry.contentType);
    return d.registry.metrics();
  });

  app.get<{ Querystring: { offset?: number; limit?: number; user?: string } }>(
    "/connz",
    {
      schema: {
        querystring: {
          type: "object",
          properties: { offset: { type: "integer", minimum: 0 }, limit: { type: "integer", minimum: 1, maximum: 1000 }, user: USER },
          additionalProperties: false,
        },
      },
    },
    async (req) => {
      const { offset = 0, limit = 100 } = req.query;
      const uid = req.query.user !== undefined ? (await d.ops.resolve(req.query.user)).uid : undefined;
      const now = Date.now();
      const conns = [];
      let total = 0;
      for (const [conn, s] of connectionsOf(d.connections)) {
        const session = s as Session;
        if (uid !== undefined && session.uid !== uid) continue;
        total++;
        if (total <= offset || conns.length >= limit) continue;
        conns.push({
          id: conn.id,
          remote: conn.remote,
          door: conn.door,
          uid: session.uid ?? null,
          nick: session.nick ?? null,
          state: stateOf(conn, session),
          since: new Date(conn.since).toISOString(),
          idle_ms: now - conn.lastActivity,
          bytes_in: conn.bytesIn,
          bytes_out: conn.bytesOut,
          queued: conn.outbound,
          unanswered: d.unanswered(session),
        });
      }
      return { now: new Date(now).toISOString(), total, offset, limit, connections: conns };
    },
  );

  app.get<{ Querystring: { after?: string; limit?: number } }>(
    "/users",
    {
      schema: {
        querystring: {
          type: "object",
          properties: { after: { type: "string", maxLength: 64 }, limit: { type: "integer", minimum: 1, maximum: 1000 } },
          additionalProperties: false,
        },
      },
    },
    async (req) => {
      const limit = req.query.limit ?? 100;
      const users = await d.ops.list(req.query.after ?? "", limit);
      // A short page is the last: no `next` to follow into an empty one.
      return { users, next: users.length === limit ? users[users.length - 1].uid : null };
    },
  );
  app.get<{ Params: { user: string } }>("/users/:user", async (req) => d.ops.summary(await d.ops.resolve(req.params.user)));
  app.post<{ Body: { login: string; pass: string; nick?: string } }>(
    "/users",
    {
      schema: {
        body: {
          type: "object",
          required: ["login", "pass"],
          // Only types here: the account is made under register's rules (AdminOps.addUser).
          properties: { login: USER, pass: PASS, nick: USER },
          additionalProperties: false,
        },
      },
    },
    async (req, reply) => reply.code(201).send(await d.ops.addUser(req.body.login, req.body.pass, req.body.nick ?? req.body.login)),
  );
  app.post<{ Body: { user: string; pass: string } }>(
    "/users/passwd",
    { schema: { body: { type: "object", required: ["user", "pass"], properties: { user: USER, pass: PASS }, additionalProperties: false } } },
    async (req) => d.ops.passwd(req.body.user, req.body.pass),
  );
  app.post<{ Body: { user: string } }>(
    "/users/delete",
    { schema: { body: { type: "object", required: ["user"], properties: { user: USER }, additionalProperties: false } } },
    async (req) => d.ops.deleteUser(req.body.user),
  );
  app.post<{ Body: { user: string } }>(
    "/kick",
    { schema: { body: { type: "object", required: ["user"], properties: { user: USER }, additionalProperties: false } } },
    async (req) => d.ops.kick(req.body.user),
  );
  app.get("/bans", async () => ({ bans: d.ops.bans() }));
  app.post<{ Body: { login?: string; address?: string; reason?: string } }>("/ban", { schema: { body: BAN_TARGET } }, async (req) => {
    const [kind, value] = banTarget(req.body);
    const { closed: applied, ...ban } = await d.ops.ban(kind, value, req.body.reason ?? "");
    const why = `your address was banned${ban.reason ? `: ${ban.reason}` : ""}`;
    // The address as the ban holds it (canonical: trimmed, IPv6 compressed), as sockets
    // report theirs: the operator's own spelling ("2001:db8:0::1") closed nothing. (In
    // cluster mode the log's apply closed them, `applied`; any since then go here.)
    const closed = kind === "addr" ? (applied ?? 0) + d.connections.reduce((n, t) => n + t.closeAddress(ban.value, why), 0) : (applied ?? 0);
    return { ban, closed };
  });
  app.post<{ Body: { login?: string; address?: string } }>("/unban", { schema: { body: UNBAN_TARGET } }, async (req) => {
    const [kind, value] = banTarget(req.body);
    return { lifted: await d.ops.unban(kind, value) };
  });
  app.get("/registration", async () => ({ registration: await d.ops.registration() }));
  app.post<{ Body: { open: boolean } }>(
    "/registration",
    { schema: { body: { type: "object", required: ["open"], properties: { open: { type: "boolean" } }, additionalProperties: false } } },
    async (req) => ({ registration: await d.ops.registration(req.body.open) }),
  );
  app.post<{ Body: { dir: string } }>(
    "/backup",
    { schema: { body: { type: "object", required: ["dir"], properties: { dir: { type: "string", minLength: 1, maxLength: 4096 } }, additionalProperties: false } } },
    async (req) => d.backup(req.body.dir),
  );
  app.get<{ Querystring: { user?: string } }>(
    "/export",
    { schema: { querystring: { type: "object", properties: { user: USER }, additionalProperties: false } } },
    async (req, reply) => {
      const lines = await d.exportLines(req.query.user);
      reply.header("content-type", "application/x-ndjson");
      return reply.send(Readable.from(lines));
    },
  );

  return app;
}

/**
 * A request must have arrived (headers and body) within --idle-unauth, as on the HTTP
 * door, at start-up and after SIGHUP: Fastify's default is no limit, and a refusal
 * (401, 403, 404) answered before the body left the socket open to drain it, one byte a
 * minute keeping it alive, as many as a client liked (the server's descriptors are shared).
 */
export function adminRequestTime(app: FastifyInstance, config: Config): void {
  requestTime(app.server, config.idleUnauth);
}

export async function listenAdmin(app: FastifyInstance, config: Config): Promise<{ port: number; host: string }> {
  if (!config.adminToken && !isLoopback(config.adminHost) && config.adminHost !== "localhost") {
    app.log.warn({ host: config.adminHost }, "admin port beyond loopback without --admin-token: its operator routes answer local clients only");
  }
  try {
    await app.listen({ port: config.adminPort, host: config.adminHost });
  } catch (err) {
    // Say which port: "address in use" alone reads like the protocol's port.
    throw new Error(`cannot listen on the admin port ${config.adminHost}:${config.adminPort} (set --admin-port, or --admin off)`, { cause: err });
  }
  // A failed accept() (EMFILE once the spare descriptor is gone, ENOBUFS) is an 'error'
  // event on the listening server, which Fastify listens for only while listen() runs:
  // unheard, it ended the whole process at a health check. The protocol's listeners log it.
  app.server.on("error", (err) => app.log.error({ err }, "admin port error"));
  // Operators and a metrics scraper need a few sockets; past these, new ones are closed.
  app.server.maxConnections = ADMIN_MAX_CONNECTIONS;
  const addr = app.server.address() as AddressInfo;
  return { port: addr.port, host: addr.address };
}
