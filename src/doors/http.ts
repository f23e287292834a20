// The HTTP door's port (--http-port): one Fastify instance with @fastify/websocket
// (ws) serving e_chat_server (seed 002) under /v1/ (http-echat.ts), the HTTP/WS chat
// of seed 003 at the root and /ws (http-chat.ts), and
// the native protocol over WebSocket at /wirechat: each text message is one native
// frame, and each reply and event is one text message, without the NDJSON line
// terminator (the message is the frame). The welcome frame comes first, as on TCP.
//
// Limits are the native door's: a request body and a WebSocket message are at most
// --max-frame bytes (Fastify's bodyLimit, ws's maxPayload); WebSockets are counted
// against --max-connections and --max-per-address, have the idle timeouts, are refused
// from banned addresses, and are closed gracefully at shutdown (websocket-listener.ts).

import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { Transform, type Readable } from "node:stream";
import fastifyWebsocket from "@fastify/websocket";
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyRequest } from "fastify";
import type { Logger } from "pino";
import type WebSocket from "ws";
import type { Config } from "../config.js";
import { followLevel } from "../log.js";
import type { Metrics } from "../metrics.js";
import type { NativeCodec } from "../protocol/codec.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import { fullBudget, RATE_CLOSING, RATE_REFUSED, takeRequest, type Dispatcher, type RateVerdict, type RequestBudget } from "../protocol/dispatcher.js";
import type { Router } from "../protocol/router.js";
import type { Front } from "../transport/listener.js";
import { makeRoom, type HeldInput, type InputHolder } from "../transport/scanner.js";
import { checkWs } from "../transport/websocket.js";
import { NO_WEBSOCKET, upgradeRefused, WEBSOCKET_ROUTE, WebSocketListener } from "../transport/websocket-listener.js";
import { chatNotFound, chatRefusalBody, chatRoutes, type ChatDoor } from "./http-chat.js";
import { echatNotFound, echatRefusalBody, echatRoutes, type EchatDoor } from "./http-echat.js";
import { nativeFront } from "./native.js";
import { SHUTTING_DOWN } from "../transport/peer-common.js";
import { requestTime } from "../transport/request-time.js";
import { within } from "../clock.js";

export interface HttpDoorDeps {
  config: Config;
  log: Logger;
  dispatcher: Dispatcher;
  router: Router;
  metrics: Metrics;
  /** The native door's codec (one for every native connection, TCP or WebSocket). */
  nativeCodec: NativeCodec;
  /** Seed 003's door. */
  chat: ChatDoor;
  /** Seed 002's door. */
  echat: EchatDoor;
}

/**
 * A request node's HTTP parser refused (not HTTP/1.1, two Content-Lengths, header fields
 * past node's 16 KiB, a request that took too long to arrive): answered in the shape of
 * the door its path names, as every other refusal on this port, then closed. (Fastify's
 * own answer, {"error":"Bad Request","message":"Client Error","statusCode":400}, is
 * neither door's.) The path is read from the bytes the parser stopped in, when they hold
 * a request line; without one (a request too slow to arrive, a header split over reads)
 * the answer is seed 003's, the port's root door.
 *
 * As node's own handler: nothing is written while an earlier response on the socket is
 * on its way (the refusal would land inside it); the socket is destroyed. After a parse
 * error node's parser refuses every later read too (clientError again, once per read):
 * the first answer stands, and what the client still sends is dropped until it closes or
 * CLIENT_ERROR_LINGER_MS passes (closed with input unread, the socket's reset could make
 * the client's kernel drop the answer). A request that was too slow is different: its
 * parser still works, and a request completed meanwhile would run after its client was
 * told 408, so that socket is destroyed as soon as the answer is handed to the kernel.
 */
function clientError(error: Error, socket: Socket, onRefused: (socket: Socket, reason: string) => void): void {
  // node sets `rawPacket` to the bytes its parser stopped in (@types/node has it as a JSON'd Buffer).
  const err = error as Error & { code?: string; rawPacket?: unknown };
  if (err.code === "ECONNRESET" || socket.destroyed || refused.has(socket)) return;
  refused.add(socket);
  const current = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
  if (current?.headersSent) {
    onRefused(socket, `HTTP request refused during a response (${err.code ?? "a parse error"}): closed`);
    return void socket.destroy();
  }
  const timedOut = err.code === "ERR_HTTP_REQUEST_TIMEOUT";
  // The statuses node's own handler gives these.
  const [status, reason, code, text] = timedOut
    ? [408, "Request Timeout", "timeout", "the request took too long to arrive"]
    : err.code === "HPE_HEADER_OVERFLOW"
      ? [431, "Request Header Fields Too Large", "too_large", "the request's header fields are larger than 16 KiB"]
      : err.code === "HPE_CHUNK_EXTENSIONS_OVERFLOW"
        ? [413, "Payload Too Large", "too_large", "the request's chunk extensions are larger than 16 KiB"]
        : [400, "Bad Request", "bad_request", `the request is not valid HTTP/1.1 (${err.code ?? "a parse error"})`];
  onRefused(socket, `HTTP ${status}, ${text}`);
  const line = Buffer.isBuffer(err.rawPacket) ? err.rawPacket.subarray(0, 512).toString("latin1") : "";
  const path = /^[A-Z]+ (\/[^ ?\r\n]*)/.exec(line)?.[1] ?? "";
  const body = isEchatPath(path) ? echatRefusalBody(code, text) : chatRefusalBody(text);
  socket.on("error", () => socket.destroy());
  if (!socket.writable) return void socket.destroySoon();
  const answer = `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`;
  if (timedOut) return void socket.end(answer, () => socket.destroy());
  // A bound, not an idle time: a client that keeps trickling does not keep its socket.
  const linger = setTimeout(() => socket.destroy(), CLIENT_ERROR_LINGER_MS);
  linger.unref();
  socket.once("close", () => clearTimeout(linger));
  socket.resume();
  socket.end(answer);
}

/**
 * Node closes a socket whose response says `connection: close` once the response is
 * out (destroySoon: end, then destroy). If the request's body was still coming — a 413
 * for a body over --max-frame, answered from its content-length — that destroy finds
 * unread input, and the reset it sends makes the client's kernel drop the answer: a
 * client that wrote its whole body before reading (curl without Expect, a script, a
 * phone's HTTP stack) saw "connection reset" instead of 413 in 5 tries of 6 with a
 * 3 MB body. As for a parse error (clientError): the answer and the FIN go out, what
 * the client still sends is read and dropped (node's parser discards the body of an
 * answered request) until it ends or CLIENT_ERROR_LINGER_MS passes, then the socket
 * is destroyed. Runs after node's own 'finish' handler (registered when the response
 * was made), which called destroySoon.
 */
function lingerClose(req: IncomingMessage): void {
  const socket = req.socket;
  if (req.complete || socket.destroyed || !socket.writableEnded) return;
  lingering.add(socket);
  socket.removeListener("finish", socket.destroy);
  const linger = setTimeout(() => socket.destroy(), CLIENT_ERROR_LINGER_MS);
  linger.unref();
  socket.once("end", () => socket.destroy());
  socket.once("close", () => clearTimeout(linger));
}

/** Sockets lingerClose keeps reading from after their answer: no request on them runs. */
const lingering = new WeakSet<Socket>();

/** A path of e_chat_server's door (under /v1/); every other path is the HTTP chat's (or the native /wirechat). */
function isEchatPath(path: string): boolean {
  return /^\/v1(?:\/|$)/.test(path);
}

/** Sockets clientError has answered (node reports each later read of one again). */
const refused = new WeakSet<Socket>();

/** How long a socket refused by the HTTP parser is read and dropped from before it is destroyed. */
const CLIENT_ERROR_LINGER_MS = 2000;

export class HttpDoor {
  readonly app: FastifyInstance;
  readonly websockets: WebSocketListener;
  private readonly ready: Promise<void>;
  /** close() has begun: a request that still comes (on a kept-alive socket) gets 503 in its door's shape. */
  private stopping = false;

  constructor(private readonly d: HttpDoorDeps) {
    const { config, log, dispatcher, router, metrics } = d;
    checkWs();
    const native = nativeFront(dispatcher, d.nativeCodec);
    this.websockets = new WebSocketListener(config, dispatcher, router, log.child({ door: "http" }), metrics, [native, d.echat, d.chat]);
    const app = Fastify({
      // While it closes, each door answers 503 in its own shape (its onRequest hook,
      // `stopping`), not in Fastify's ({"error":"Service Unavailable",…}).
      return503OnClosing: false,
      // Fastify logs every request at info: this port's own lines are warnings and errors.
      loggerInstance: log.child({ door: "http" }) as unknown as FastifyBaseLogger,
      bodyLimit: config.maxFrame,
      // Request times (limits) checked every second (node's default, 30 s, let one live
      // half a minute more past its limit).
      http: { connectionsCheckingInterval: 1000 },
      // A number is not a string: the seed's fields are strings, and "5" is not made of 5.
      ajv: { customOptions: { coerceTypes: false } },
      // Every path parameter reaches its route, which answers for it in its door's shape
      // (Fastify's own limit, 100, answered 414 in Fastify's shape); node's header
      // limit (16 KiB) bounds a URL anyway.
      routerOptions: { maxParamLength: 16 * 1024 },
      // A URL that is not valid percent-encoding names no route: the door's 404, in its
      // shape (Fastify's own answer is a 400 in neither door's).
      frameworkErrors: (_err, req, reply) => {
        // An upgrade request's socket left the HTTP server (no keep-alive or timeout
        // applies) and no hook will close it: closed once the answer is out, or it
        // stayed open, holding its address's slot, for as long as the client liked.
        if (req.headers.upgrade !== undefined) {
          reply.header("connection", "close");
          reply.raw.once("finish", () => req.raw.socket.destroySoon());
        }
        const path = req.url.split("?")[0];
        if (isEchatPath(path)) return echatNotFound(reply);
        return chatNotFound(reply, `no route ${req.method} ${path}: the URL is not valid percent-encoding`);
      },
      clientErrorHandler: (err, socket) => clientError(err, socket, (s, why) => this.websockets.parserRefused(s, why)),
    });
    this.app = app;
    // ... and follow the server's level when SIGHUP changes it.
    const unfollow = followLevel(log, app.log as unknown as Logger, "warn");
    app.addHook("onClose", async () => unfollow());
    // Request bodies count against --max-partial-input as they arrive (countedBody).
    app.addHook("preParsing", async (req, reply, payload) => {
      const h = req.headers;
      const none = h["transfer-encoding"] === undefined && (h["content-length"] === undefined || h["content-length"] === "0");
      return none ? payload : countedBody(this.websockets.partialInput, payload, reply.raw);
    });
    this.limits();
    // An answer given before its request's body has all come, on a socket that closes
    // after it (a 413, which Fastify closes: the client may send more): see lingerClose.
    app.server.on("request", (req: IncomingMessage, res: ServerResponse) => {
      res.once("finish", () => lingerClose(req));
    });
    // A request the client sent on such a socket after all (node's parser reads on
    // while the rest of the body is dropped) is not run: its answer could never be
    // sent, and the socket was said to close.
    app.addHook("onRequest", async (req, reply) => {
      if (!lingering.has(req.raw.socket)) return;
      reply.hijack();
      req.raw.socket.destroy();
    });
    // And per address: plain sockets as unauthenticated connections (websocket-listener.ts).
    app.server.on("connection", (socket: Socket) => this.websockets.socket(socket));
    // An upgrade request's socket leaves the HTTP server's timeouts: until ws takes it
    // (ws clears the timeout), it gets the unauthenticated idle time, so that an upgrade
    // no route takes over cannot hold its socket open.
    app.server.prependListener("upgrade", (_req: unknown, socket: Socket) => {
      socket.setTimeout(config.idleUnauth * 1000, () => socket.destroy());
    });
    const accept = (ws: WebSocket, req: FastifyRequest, front: Front) => this.websockets.accept(ws, req.socket, front);
    // The routes' request rate: each HTTP request counts once against its socket's budget
    // (a kept-alive socket's requests one after another, as a connection's frames on the
    // other doors; a WebSocket's messages count in its own line). Past --rate-disconnect
    // refusals the answer closes the socket, logged and counted once.
    const budgets = new WeakMap<Socket, RequestBudget & { doomed?: boolean; turns?: Turns }>();
    const rated = async (req: FastifyRequest, res: ServerResponse): Promise<RateVerdict> => {
      let b = budgets.get(req.socket);
      if (b === undefined) budgets.set(req.socket, (b = fullBudget(config)));
      let verdict = takeRequest(b, config);
      // Its turn: one request of a socket at a time (below). Refused when too many wait,
      // or when the socket is gone meanwhile (nothing to answer, nothing to log).
      const waiting = verdict === "ok" && !(await turnOf((b.turns ??= newTurns(req.socket)), res));
      if (waiting) verdict = "close";
      if (req.socket.destroyed) return verdict;
      if (verdict !== "ok") metrics.request("unknown", Code.RateLimited);
      if (verdict === "close" && !b.doomed) {
        b.doomed = true;
        metrics.closes.rate_limit++;
        const why = waiting ? `over ${PIPELINED_MAX} requests waiting for their turn` : "request rate far over the limit";
        log.warn({ door: "http", remote: req.socket.remoteAddress, refused: b.refused }, `${why}; closing`);
      }
      return verdict;
    };
    this.ready = (async () => {
      await app.register(fastifyWebsocket, {
        options: {
          maxPayload: config.maxFrame,
          // No permessage-deflate (ws's default, said here because the input budget
          // relies on it: bytes inside zlib while a message inflates are not counted in
          // --max-partial-input, WebSocketPeer.countInbound).
          perMessageDeflate: false,
          // Bytes are checked by the door that reads them (dispatcher, dialect doors),
          // which answers invalid UTF-8 with status 3 in its own shape and keeps the
          // socket, as on TCP (ws closed it with 1007 and no word).
          skipUTF8Validation: true,
          // A message may come in fragments (Go's gorilla client sends one per 4 KiB),
          // but not in more than a --max-frame message needs at 1 KiB each; ws's
          // default, 16,384, let a client hold that many pieces. A read held in pieces
          // (one byte per TCP segment: ~170 bytes of memory per byte) is bounded the
          // same way: a --max-frame message in 128-byte reads at the least.
          maxFragments: Math.max(1024, Math.ceil(config.maxFrame / 1024)),
          maxBufferedChunks: Math.max(4096, Math.ceil(config.maxFrame / 128)),
          // A socket ws closes itself (1009, 1002, 1008) waits this long for the client's
          // close frame, reading (and holding) what it sends meanwhile: ws's 30 s kept
          // its places against the caps, and its pieces, for that long. (A ws option
          // its types do not have yet.)
          ...({ closeTimeout: config.closeLinger * 1000 } as object),
        },
        // ws closes a socket whose message is too large (1009) or malformed (1002) itself,
        // and reports it here; anything else on an open socket cuts it off.
        errorHandler: (err, ws) => {
          log.debug({ err, door: "http" }, "WebSocket error");
          if (ws.readyState === ws.OPEN) ws.terminate();
        },
        // WebSockets are closed by the listener's graceful stop (close below), not here.
        preClose: (done) => done(),
      });
      const banned = (address: string) => this.websockets.refuseAddress?.(address);
      const stopping = () => this.stopping;
      await app.register(async (scope) => {
        // A plain request (not an upgrade, which the listener refuses with a message and
        // a close) as the doors' routes take one: a banned address is refused, and it
        // counts against its socket's request rate (it was answered 426 regardless).
        scope.addHook("onRequest", async (req, reply) => {
          const refuse = (http: number, code: Code, text: string) => reply.code(http).type("application/json").send(d.nativeCodec.error("unknown", code, text) as string);
          if (req.ws) return upgradeRefused(req) ? refuse(400, Code.InvalidData, NO_WEBSOCKET) : undefined;
          if (stopping()) {
            reply.header("connection", "close");
            return refuse(503, Code.Unavailable, SHUTTING_DOWN);
          }
          const why = banned(req.socket.remoteAddress ?? "?");
          if (why !== undefined) return refuse(403, Code.Forbidden, `your address is banned${why ? `: ${why}` : ""}`);
          const verdict = await rated(req, reply.raw);
          if (verdict === "close") reply.header("connection", "close");
          if (verdict !== "ok") return refuse(429, Code.RateLimited, verdict === "close" ? RATE_CLOSING : RATE_REFUSED);
        });
        scope.route({
          method: "GET",
          url: "/wirechat",
          config: WEBSOCKET_ROUTE,
          handler: async (_req, reply) =>
            reply.code(426).type("application/json").send(d.nativeCodec.error("unknown", Code.InvalidData, "/wirechat is a WebSocket: connect with 'Upgrade: websocket'") as string),
          wsHandler: (ws, req) => accept(ws, req, native),
        });
      });
      await app.register(echatRoutes(d.echat, accept, banned, rated, stopping, config.maxDepth), { prefix: "/v1" });
      await app.register(chatRoutes(d.chat, accept, banned, rated, stopping, config.maxDepth));
    })();
  }

  async listen(): Promise<AddressInfo> {
    const { config } = this.d;
    const host = config.httpHost || config.host;
    await this.ready;
    try {
      await this.app.listen({ port: config.httpPort, host });
    } catch (err) {
      throw new Error(`cannot listen on the HTTP port ${host}:${config.httpPort} (set --http-port)`, { cause: err });
    }
    // A failed accept() is an 'error' event Fastify no longer listens for once listening:
    // unheard, it ended the process (see listenAdmin).
    this.app.server.on("error", (err) => this.app.log.error({ err }, "HTTP port error"));
    return this.app.server.address() as AddressInfo;
  }

  /** After SIGHUP: the port's socket backstop, idle time and request time follow --max-connections and --idle-unauth. */
  reloaded(): void {
    this.limits();
  }

  /** The port's socket limits from the configuration (at start-up and after SIGHUP). */
  private limits(): void {
    const { config } = this.d;
    // A backstop on every socket of the port, plain HTTP ones included (WebSockets are
    // also counted, and refused with a message, by the listener).
    this.app.server.maxConnections = config.maxConnections;
    // A plain socket with nothing moving either way for the unauthenticated idle time is
    // closed: a request's time covers its arrival only, and keep-alive's timeout starts
    // once a response is out, so a client that asked for a large page and never read it
    // held its socket (and its place against the caps) for good. A socket that reads
    // slowly is active, and a WebSocket's timeout is cleared by ws at its upgrade.
    this.app.server.timeout = config.idleUnauth * 1000;
    // A request must arrive within the unauthenticated idle time: slow senders hold no
    // socket for long.
    requestTime(this.app.server, config.idleUnauth);
  }

  /**
   * Graceful stop: WebSockets as the TCP listeners' connections; HTTP requests in
   * progress are answered and new ones get 503, up to `timeoutMs`; then what is left
   * is cut off.
   */
  async close(timeoutMs: number): Promise<void> {
    const graceMs = this.d.config.closeLinger * 1000;
    await this.ready.catch(() => undefined);
    this.stopping = true;
    const websockets = this.websockets.close(timeoutMs, graceMs);
    const done = Promise.all([websockets, this.app.close()]);
    if (!(await within(done, timeoutMs + graceMs))) {
      this.d.log.warn("HTTP connections still open after the shutdown timeout; closing them");
      this.app.server.closeAllConnections();
      await within(done, graceMs);
    }
  }
}

const BODY_BUDGET = "the server is holding too many unfinished requests of its connections; send it again";

/**
 * A request body as it arrives, its bytes counted in `held` (--max-partial-input, with
 * the TCP doors' unfinished frames and the WebSockets' messages) until it has all been
 * read or its request is answered (Fastify holds a body whole until it has all come;
 * one no route reads, a 413, a GET's, is let go with the answer). Growth past the
 * budget makes room as a TCP frame does (the holders larger than this body will be are
 * shed); when this body is the one to go, here or later for another's room, it fails
 * with 13 (429 in the door's shape) and the rest of it is read and dropped.
 */
function countedBody(held: HeldInput | undefined, payload: Readable, response: ServerResponse): Readable {
  if (held === undefined) return payload;
  let mine = 0;
  const uncount = (): void => {
    if (mine === 0) return;
    held.bytes -= mine;
    held.holders.delete(holder);
    mine = 0;
  };
  // Nothing more of it is held: what is left of the request is read and dropped.
  const release = (): void => {
    uncount();
    payload.unpipe(body);
    payload.resume();
  };
  const letGo = (err?: Error): void => {
    release();
    if (!body.destroyed) body.destroy(err);
  };
  const body = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      const len = chunk.length;
      if (held.bytes + len > held.max && !makeRoom(held, holder, mine + len, len)) {
        release();
        return done(new ProtocolError(Code.RateLimited, BODY_BUDGET));
      }
      held.bytes += len;
      if (mine === 0) held.holders.add(holder);
      mine += len;
      done(null, chunk);
    },
  });
  const holder: InputHolder = {
    get kept() {
      return mine;
    },
    shedForRoom: () => letGo(new ProtocolError(Code.RateLimited, BODY_BUDGET)),
  };
  // Fastify listens while it reads the body; a body nobody reads fails quietly (an
  // 'error' with no listener ended the process).
  body.on("error", () => {});
  body.once("end", uncount);
  body.once("close", uncount);
  // Answered (or its socket gone): whatever was not read is let go.
  response.once("close", () => letGo());
  // A request cut off before its end: what it held is let go.
  payload.once("close", () => {
    if (!body.writableEnded) letGo();
  });
  payload.pipe(body);
  return body;
}

/** A socket's requests: one runs, the rest wait their turn (turnOf). */
interface Turns {
  busy: boolean;
  /** Each waiting request's go (true) or its socket's end (false). */
  waiting: ((go: boolean) => void)[];
  /** The socket closed: nothing more runs (a waiting response never closes on Node 20). */
  dead: boolean;
}

function newTurns(socket: Socket): Turns {
  const t: Turns = { busy: false, waiting: [], dead: false };
  socket.once("close", () => {
    t.dead = true;
    for (const w of t.waiting.splice(0)) w(false);
  });
  return t;
}

/**
 * Requests pipelined on one kept-alive socket (sent back to back without reading) that
 * wait for the one before them to be answered, at most; past it the request is refused
 * (429) and the socket closed after it.
 */
export const PIPELINED_MAX = 32;

/**
 * Waits until the socket's requests before this one are answered (`res`, this one's
 * response, gives the turn on when it closes); false when PIPELINED_MAX wait already.
 * Node starts every request of a read at once (its pipelining check waits only for a
 * response's buffered output), and HTTP/1.1 answers them in order anyway: one socket's
 * back-to-back history pages (each up to 20 records held as it is written) all ran at
 * the same time, and their answers waited in memory behind the first.
 */
async function turnOf(t: Turns, res: ServerResponse): Promise<boolean> {
  if (t.dead) return false;
  if (t.busy) {
    if (t.waiting.length >= PIPELINED_MAX) return false;
    if (!(await new Promise<boolean>((resolve) => t.waiting.push(resolve)))) return false;
  }
  t.busy = true;
  res.once("close", () => {
    const next = t.dead ? undefined : t.waiting.shift();
    if (next) next(true);
    else t.busy = false;
  });
  return true;
}
