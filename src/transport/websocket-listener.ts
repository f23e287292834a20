// The WebSockets of the HTTP door, as listener.ts is for TCP sockets: each upgraded
// socket becomes a WebSocketPeer with a session, its messages go to the door's Front,
// and the caps, idle timeouts, address bans and the graceful stop are the TCP
// listener's.
//
// The caps are counted here, for this door's WebSockets, against the same limits as
// each TCP listener counts its own: --max-connections every WebSocket, and
// --max-per-address those not logged in. A WebSocket over a cap is accepted, gets the
// door's refusal as one message and is closed with 1013 (try again later; 1008 for a
// banned address), as a TCP socket gets its one line: the check and the accept happen
// in the same turn, so a burst of upgrades cannot all pass a check made earlier.
//
// The port's plain sockets (HTTP requests, and upgrades before they are WebSockets)
// are counted here too, per address against --max-per-address: nothing is logged in
// on them, and without it one address could hold every socket the port takes
// (--max-connections) with silent or idle keep-alive ones. One past it is closed at
// once: nothing can be said before a request is read (as a TLS handshake is refused).
//
// A message is one frame. Its size is ws's maxPayload (--max-frame): a larger one is
// refused by ws as soon as its length is known, before its payload is read, and the
// socket is closed with 1009, as ws can refuse a message in no other way. Its nesting
// is checked here (--max-depth), as the TCP scanner does. Binary messages are refused
// with the door's error, the socket stays.

import type { FastifyRequest } from "fastify";
import type { Logger } from "pino";
import type { Socket } from "node:net";
import type WebSocket from "ws";
import { addressKey } from "../addresses.js";
import { closeFromAddress, closeIfIdle, endAll, overCap, socketAddress, type SlotCounter } from "./peer-common.js";
import type { Config } from "../config.js";
import { Metrics } from "../metrics.js";
import { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import { peekAction } from "../protocol/frames.js";
import type { Router } from "../protocol/router.js";
import type { Session } from "../protocol/session.js";
import { deliverySlack } from "./connection.js";
import type { Front } from "./listener.js";
import type { ConnectionTable } from "./live.js";
import { RefusalLog } from "../refusal-log.js";
import type { HeldInput } from "./scanner.js";
import { CLOSE_POLICY, CLOSE_TRY_LATER, copySmallPieces, WebSocketPeer } from "./websocket.js";

/** Refused sockets lingering at once; past it a refused socket is cut off at once. */
const MAX_REFUSING = 1024;
/** Closing connections lingering at once (see listener.ts). */
const MAX_LINGERING = 1024;

const PEER = Symbol("wirechat.websocketPeer");
/** The listener counting a plain socket of the port (see `socket`), and the key it counts it under (addressKey). */
const PLAIN = Symbol("wirechat.plainSocket");
const PLAIN_ADDRESS = Symbol("wirechat.plainAddress");
type PlainTagged = Socket & { [PLAIN]?: WebSocketListener; [PLAIN_ADDRESS]?: string };
const FRONT = Symbol("wirechat.websocketFront");
const OWNER = Symbol("wirechat.websocketListener");
/** No closures per connection: the shared handlers find theirs through the socket. */
type Tagged = WebSocket & { [PEER]: WebSocketPeer; [FRONT]: Front; [OWNER]: WebSocketListener };
/** The peer of an upgraded TCP socket, whose reads it counts (WebSocketPeer.countInbound). */
const READER = Symbol("wirechat.websocketReader");
type ReadTagged = Socket & { [READER]: WebSocketPeer };

/** True when the JSON text nests no deeper than `max` (strings skipped, as the scanner does). */
export function depthWithin(bytes: Buffer, max: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (inString) {
      if (b === 0x5c) i++;
      else if (b === 0x22) inString = false;
    } else if (b === 0x22) inString = true;
    else if (b === 0x7b || b === 0x5b) {
      if (++depth > max) return false;
    } else if (b === 0x7d || b === 0x5d) depth--;
  }
  return true;
}

/** The door a WebSocket shows: "websocket" for the native protocol, else its front's name. */
function doorOf(front: Front): string {
  return front.name === "native" ? "websocket" : front.name;
}

export class WebSocketListener implements ConnectionTable, SlotCounter {
  /** Live WebSockets and the protocol session of each. */
  readonly connections = new Map<WebSocketPeer, Session>();
  /** The doors of the fronts its sockets speak. */
  readonly doors: readonly string[];
  /** Connections not logged in, by addressKey (an address, or its network). */
  private readonly perAddress = new Map<string, Set<WebSocketPeer>>();
  /** Plain sockets of the port (not WebSockets), by addressKey. */
  private readonly plainPerAddress = new Map<string, number>();
  private readonly refusing = new Set<WebSocket>();
  private readonly refusals: RefusalLog;
  /** Connections in `connections` that are closing: they no longer hold a cap slot. */
  private lingering = 0;
  private stopping = false;
  private readonly lingerMs: number;
  private readonly idleSweep: NodeJS.Timeout;
  private readonly slack = deliverySlack();
  /** Why connections from an address are refused (an operator's ban), if they are. */
  refuseAddress: ((address: string) => string | undefined) | undefined;
  /**
   * The count of unfinished input its sockets' bytes join (--max-partial-input), the TCP
   * doors' (server.ts sets it); none: ws's own limits only (maxPayload, maxFragments).
   */
  partialInput: HeldInput | undefined;

  constructor(
    private readonly config: Config,
    private readonly dispatcher: Dispatcher,
    private readonly router: Router,
    private readonly log: Logger,
    private readonly metrics: Metrics = new Metrics(),
    /** The fronts its sockets may speak (their door names; accept takes any). */
    fronts: readonly Front[] = [],
  ) {
    this.doors = [...new Set(fronts.map(doorOf))];
    this.lingerMs = config.closeLinger * 1000;
    this.refusals = new RefusalLog(log);
    const every = Math.min(5000, Math.max(250, (Math.min(config.idleUnauth, config.idleAuth) * 1000) / 4));
    this.idleSweep = setInterval(() => this.sweep(), every);
    this.idleSweep.unref();
  }

  /**
   * A new TCP socket on the HTTP port: counted against --max-per-address among the
   * address's plain sockets until it closes or becomes a WebSocket; past it, closed.
   */
  socket(socket: Socket): void {
    const key = addressKey(socketAddress(socket), this.config);
    const n = this.plainPerAddress.get(key) ?? 0;
    if (n >= this.config.maxPerAddress) {
      this.metrics.refused++;
      this.refusals.refused(key, "too many HTTP sockets from one address", this.config.maxPerAddress);
      socket.destroy();
      return;
    }
    this.plainPerAddress.set(key, n + 1);
    (socket as PlainTagged)[PLAIN] = this;
    (socket as PlainTagged)[PLAIN_ADDRESS] = key;
    socket.once("close", onPlainClose);
  }

  /** A plain socket closed or became a WebSocket: its address's count goes down. */
  unplain(socket: Socket): void {
    const tagged = socket as PlainTagged;
    if (tagged[PLAIN] !== this) return;
    tagged[PLAIN] = undefined;
    const key = tagged[PLAIN_ADDRESS] as string;
    const n = (this.plainPerAddress.get(key) ?? 1) - 1;
    if (n > 0) this.plainPerAddress.set(key, n);
    else this.plainPerAddress.delete(key);
  }

  /** An upgraded socket for `front`, over the TCP socket `socket`. */
  accept(ws: WebSocket, socket: Socket, front: Front): void {
    this.unplain(socket);
    copySmallPieces(ws);
    const address = socketAddress(socket);
    const key = addressKey(address, this.config);
    const over = this.stopping ? "stopping" : overCap(this.group, key, this.config);
    if (over) return this.refuse(ws, key, front, over);
    const banned = this.refuseAddress?.(address);
    if (banned !== undefined) return this.refuse(ws, address, front, "banned", banned);
    const peer = new WebSocketPeer(ws, socket, doorOf(front), this.config.outboundCap, this.slack, this.log, this.lingerMs);
    peer.addressKey = key;
    this.slots(key).add(peer);
    this.metrics.connectionsOpened++;
    const session = this.dispatcher.open(peer, front.codec());
    peer.session = session;
    peer.onConfirmed = this.confirmed;
    peer.onEnding = this.ending;
    peer.onOverflow = this.overflowed;
    peer.onShed = this.shed;
    peer.held = this.partialInput;
    this.connections.set(peer, session);
    const tagged = ws as Tagged;
    tagged[PEER] = peer;
    tagged[FRONT] = front;
    tagged[OWNER] = this;
    ws.on("message", onMessage);
    ws.on("ping", onPing);
    ws.on("pong", onPing);
    ws.on("close", onClose);
    // After ws's own listener (added as it took the socket): what a read left unfinished.
    (socket as ReadTagged)[READER] = peer;
    socket.on("data", onRead);
    const greeting = front.greeting(session.codec);
    if (greeting !== undefined) peer.send(greeting, false);
    front.opened?.(session);
    this.log.debug({ conn: peer.id, remote: peer.remote, door: peer.door }, "connection opened");
  }

  /**
   * The listeners whose connections count together against the caps: every door's
   * (server.ts sets it), so that the WebSocket door does not double --max-connections.
   */
  group: readonly SlotCounter[] = [this];

  /** Sockets holding a slot (not lingering). */
  get held(): number {
    return this.connections.size - this.lingering;
  }

  /** Open sockets, not those closing (the stats action's count). */
  get open(): number {
    return this.held;
  }

  /** Sockets counted under `key` (addressKey) not logged in (`prune`: logged-in ones let go). */
  unauthenticated(key: string, prune: boolean): number {
    const slots = this.perAddress.get(key);
    if (!slots) return 0;
    if (prune) {
      for (const p of slots) if ((p.session as Session).uid !== undefined) slots.delete(p);
      if (slots.size === 0) this.perAddress.delete(key);
    }
    return slots.size;
  }

  private slots(key: string): Set<WebSocketPeer> {
    let slots = this.perAddress.get(key);
    if (!slots) this.perAddress.set(key, (slots = new Set()));
    return slots;
  }

  private unslot(peer: WebSocketPeer): void {
    const slots = this.perAddress.get(peer.addressKey);
    if (slots?.delete(peer) && slots.size === 0) this.perAddress.delete(peer.addressKey);
  }

  /**
   * A request on the port that node's HTTP parser refused (doors/http.ts answers it in
   * its door's shape and closes the socket): counted among the server's own closes and
   * logged as other refusals are, one line per address and reason per window.
   */
  parserRefused(socket: Socket, reason: string): void {
    this.metrics.closes.bad_http++;
    this.refusals.refused(addressKey(socketAddress(socket), this.config), reason, 0);
  }

  /** The door's refusal as one message, then a close; cut off after the linger time. `address`: what the refusal log names (for a cap, the addressKey). */
  private refuse(ws: WebSocket, address: string, front: Front, over: "full" | "address" | "banned" | "stopping", reason = ""): void {
    this.metrics.refused++;
    if (over === "banned") this.refusals.refused(address, "banned", 0);
    else if (over !== "stopping") {
      this.refusals.refused(address, over === "full" ? "server full" : "too many from one address", over === "full" ? this.config.maxConnections : this.config.maxPerAddress);
    }
    if (this.refusing.size >= MAX_REFUSING) {
      ws.terminate();
      return;
    }
    const frame =
      over === "full" || over === "stopping"
        ? front.refusal(Code.Unavailable, over === "full" ? "the server is at its connection limit; try again later" : "the server is shutting down; try again later")
        : over === "banned"
          ? front.refusal(Code.Forbidden, `your address is banned${reason ? `: ${reason}` : ""}`)
          : front.refusal(Code.RateLimited, "too many connections from your address; try again later");
    this.refusing.add(ws);
    const text = frame as string;
    ws.send(text.endsWith("\n") ? text.slice(0, -1) : text);
    ws.close(over === "banned" ? CLOSE_POLICY : CLOSE_TRY_LATER);
    // Nothing it sends is read while it lingers: unpaused, ws went on assembling its
    // messages (1 MiB each) outside --max-partial-input, for up to 1,024 such sockets.
    ws.pause();
    const timer = setTimeout(() => ws.terminate(), this.lingerMs);
    timer.unref();
    ws.once("close", () => {
      clearTimeout(timer);
      this.refusing.delete(ws);
    });
  }

  private readonly overflowed = (): void => {
    this.metrics.closes.slow_reader++;
  };

  /** Closed for the room other connections' unfinished input needs (--max-partial-input). */
  private readonly shed = (peer: WebSocketPeer): void => {
    this.metrics.closes.input_budget++;
    this.log.warn({ conn: peer.id, remote: peer.remote, door: peer.door }, "unfinished message dropped for other connections' input (--max-partial-input); closing");
    peer.send((peer.ws as Tagged)[FRONT].refusal(Code.RateLimited, INPUT_BUDGET), false);
  };

  private readonly confirmed = (peer: WebSocketPeer, seq: number): void => this.router.confirmed(peer.session as Session, seq);

  /** A closing connection lingers a little without holding a slot. */
  private readonly ending = (peer: WebSocketPeer): void => {
    if (++this.lingering > MAX_LINGERING) peer.cutLinger();
    this.unslot(peer);
  };

  /** One message from the client: one frame. */
  message(peer: WebSocketPeer, front: Front, data: WebSocket.RawData, isBinary: boolean): void {
    if (peer.closed) return; // closing: discarded
    peer.lastActivity = Date.now();
    const session = peer.session as Session;
    if (isBinary) return front.reject(session, Code.InvalidData, "binary messages are not read: send each frame as one text message", undefined);
    // binaryType "nodebuffer": one Buffer, fragments joined. A UTF-8 BOM before the
    // frame is skipped, as the TCP door skips one (PROTOCOL.md §2).
    let bytes = data as Buffer;
    if (bytes.length >= 3 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) bytes = bytes.subarray(3);
    if (!depthWithin(bytes, this.config.maxDepth)) {
      return front.reject(session, Code.InvalidData, `nesting deeper than ${this.config.maxDepth}`, peekAction(bytes));
    }
    front.frame(session, bytes, undefined, false);
  }

  closed(peer: WebSocketPeer, front: Front): void {
    const session = peer.session as Session;
    const { bytesIn: bytesRead, bytesOut: bytesWritten } = peer;
    this.metrics.bytesInClosed += bytesRead;
    this.metrics.bytesOutClosed += bytesWritten;
    this.log.debug({ conn: peer.id, remote: peer.remote, uid: session.uid, bytesRead, bytesWritten }, "connection closed");
    peer.closedSocket();
    if (this.connections.delete(peer) && peer.isEnding) this.lingering--;
    this.unslot(peer);
    front.closed?.(session);
    this.dispatcher.close(session);
  }

  /**
   * Closes every connection from `address` (an operator's ban), after telling it why;
   * returns how many.
   */
  closeAddress(address: string, reason: string): number {
    return closeFromAddress(this.connections, address, reason, this.router);
  }

  /** Idle timeouts, delivery confirmations on quiet connections, per-address counts. */
  private sweep(): void {
    const now = Date.now();
    this.refusals.sweep(now);
    for (const [peer, session] of this.connections) {
      peer.progress();
      this.recount(peer, session);
      // Logged in: pinged after half its idle limit of quiet (seeds 002 and 003 have no
      // keep-alive message, and a browser cannot send a ping); not logged in, the
      // limit stays a limit.
      if (session.uid !== undefined) peer.keepAlive(now, this.config.idleAuth * 500);
      closeIfIdle(peer, session, now, this.config, this.log, this.metrics, this.router);
    }
  }

  /** A connection counts toward its address while it is not logged in (logged out: again). */
  private recount(peer: WebSocketPeer, session: Session): void {
    if (peer.closed) return;
    const unauth = session.uid === undefined;
    if (unauth === (this.perAddress.get(peer.addressKey)?.has(peer) ?? false)) return;
    if (unauth) this.slots(peer.addressKey).add(peer);
    else this.unslot(peer);
  }

  /**
   * Graceful stop, as the TCP listener's: no new connections, no more reading; requests
   * already read are answered (up to `timeoutMs`); then every connection is closed
   * after flushing, and one not closed within `graceMs` is cut off.
   */
  async close(timeoutMs: number, graceMs = this.lingerMs): Promise<void> {
    this.stopping = true;
    clearInterval(this.idleSweep);
    for (const ws of this.refusing) ws.terminate();
    for (const peer of this.connections.keys()) peer.pause("shutdown");
    if (!(await this.dispatcher.settled(timeoutMs, this.connections.values()))) {
      this.log.warn("WebSocket requests still in progress at the shutdown timeout");
    }
    endAll(this.connections, this.router);
    const deadline = Date.now() + graceMs;
    while (this.connections.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const peer of this.connections.keys()) peer.destroy();
    for (const ws of this.refusing) ws.terminate();
  }
}

function onMessage(this: WebSocket, data: WebSocket.RawData, isBinary: boolean): void {
  const ws = this as Tagged;
  ws[PEER].countInbound();
  ws[OWNER].message(ws[PEER], ws[FRONT], data, isBinary);
}

/** A read of an upgraded socket, after ws took what it could out of it. */
function onRead(this: Socket): void {
  (this as ReadTagged)[READER].countInbound();
}

const INPUT_BUDGET = "the server is holding too many unfinished messages of its connections; connect and send it again";

/** A ping from the client, or its pong to ours: activity (idle limits). */
function onPing(this: WebSocket): void {
  (this as Tagged)[PEER].lastActivity = Date.now();
}

function onPlainClose(this: Socket): void {
  (this as PlainTagged)[PLAIN]?.unplain(this);
}

function onClose(this: WebSocket): void {
  const ws = this as Tagged;
  ws[OWNER].closed(ws[PEER], ws[FRONT]);
}

/** A route that takes a WebSocket (its `config`): an upgrade to any other is refused. */
export const WEBSOCKET_ROUTE = { websocket: true };

/**
 * An upgrade request to a route that takes no WebSocket: refused (400, in the route's
 * door's shape) before the upgrade. Upgraded, @fastify/websocket answered 101 and closed
 * it, and ws read (and held, as views of its reads) what the client sent for its close
 * timeout, past the limits the WebSocket routes have.
 */
export function upgradeRefused(req: FastifyRequest): boolean {
  return req.ws && (req.routeOptions.config as { websocket?: boolean } | undefined)?.websocket !== true;
}

export const NO_WEBSOCKET = "this path takes no WebSocket";
