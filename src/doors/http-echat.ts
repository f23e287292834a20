// The e_chat_server door (seed 002), on the HTTP port under /v1/: JSON routes for
// accounts, users and rooms, and a WebSocket per room (/v1/rooms/{id}/chat).
//
// Rooms are private channels (members only) made with their member list; users, rooms
// and messages show as the numbers every door shows (a user's `num`, the chid, the
// mid). `created_at` is `YYYY-MM-DDTHH:MM:SS` (UTC). Errors are the seed's:
// 422 {"error":{"code":"invalid_json"|"wrong_credentials"|"user_not_found"|
// "user_already_exists"|"room_not_found"}} and 401 {"error":{"code":"unauthorized"}}.
//
// The session_id of register and login is a wirechat session (native `auth {sid}`
// resumes it). A request presents it as an `Authorization: Bearer` header, a
// `session_id` query parameter, or the `session_id` cookie (set by register and login),
// in that order of precedence (sessionOf). Each request acts for its session on a
// session object of its own (no connection: nothing is delivered to it, and the user's
// presence does not change); the room WebSocket logs in with the session like any
// connection.

import type { ServerResponse } from "node:http";
import { isUtf8 } from "node:buffer";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { depthWithin, upgradeRefused, WEBSOCKET_ROUTE } from "../transport/websocket-listener.js";
import type { Logger } from "pino";
import { Readable } from "node:stream";
import type WebSocket from "ws";
import type { ListReply } from "../protocol/codec.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import { RATE_CLOSING, RATE_REFUSED, type Dispatcher, type RateVerdict } from "../protocol/dispatcher.js";
import type { Event } from "../protocol/events.js";
import { afterRead, type Fields, type OutFrame } from "../protocol/frames.js";
import type { Session } from "../protocol/session.js";
import { hasLoneSurrogate } from "../protocol/validation.js";
import { longerThanAnyLogin, shownLogin } from "../features/profile-fields.js";
import type { ChannelRecord, MessageRecord, UserRecord } from "../storage/layout.js";
import { NAME_MAX } from "../limits.js";
import type { Front } from "../transport/listener.js";
import { RequestPeer } from "../transport/request-peer.js";
import { clip, DialectCodec, DialectDoor, jsonElements, str } from "./dialect.js";
import { roomsDate } from "./rooms.js";
import { SHUTTING_DOWN } from "../transport/peer-common.js";

/** GET /v1/rooms/{id}/messages answers at most this many (the latest). */
const HISTORY_MAX = 500;
/** GET /v1/users/ answers at most this many. */
const SEARCH_MAX = 50;
/** Members a room's answer lists at most (private rooms have at most 101). */
const ROOM_USERS_MAX = 1000;
/** Members a room may be made with (as createchannel allows). */
const MAX_MEMBERS = 100;

export interface EchatDeps {
  /** The user of a valid session (AccountOps.session). */
  session(sid: string): Promise<{ uid: string; nick: string; expires: number } | undefined>;
  user(uid: string): Promise<UserRecord | undefined>;
  /** The user's record when it is cached (events are rendered synchronously). */
  cachedUser(uid: string): UserRecord | undefined;
  uidOfNum(num: number): Promise<string | undefined>;
  /** The user whose login, else whose nick, is `name` (logins and nicks are one namespace). */
  uidOfName(name: string): Promise<string | undefined>;
  /** Uids whose shown login (shownLogin) starts with `prefix` (case-insensitively), at most `limit`. */
  loginsStartingWith(prefix: string, limit: number): Promise<string[]>;
  channel(chid: string): Promise<ChannelRecord | undefined>;
  channelsOf(uid: string): Promise<string[]>;
  members(chid: string): Promise<readonly string[]>;
  isMember(chid: string, uid: string): Promise<boolean>;
}

/** A route's answer: the HTTP status and its JSON body. */
interface RouteAnswer {
  http: number;
  body: unknown;
}

const ok = (body: unknown): RouteAnswer => ({ http: 200, body });
const fail = (http: number, code: string): RouteAnswer => ({ http, body: { error: { code } } });
const UNAUTHORIZED = fail(401, "unauthorized");
const INVALID_JSON = fail(422, "invalid_json");
const ROOM_NOT_FOUND = fail(422, "room_not_found");

/** A native refusal the seed has no code for, as HTTP status and code. */
function other(code: Code): RouteAnswer {
  switch (code) {
    case Code.RateLimited:
      return fail(429, "too_many_requests");
    case Code.Forbidden:
      return fail(403, "forbidden");
    case Code.TooLarge:
      return fail(413, "too_large");
    case Code.Unavailable:
      return fail(503, "unavailable");
    default:
      return INVALID_JSON;
  }
}

/** The seed code other() gives a native refusal: undefined where it has none (invalid_json). */
function ownCode(code: Code): string | undefined {
  const a = other(code);
  return a === INVALID_JSON ? undefined : (a.body as { error: { code: string } }).error.code;
}

interface EchatState {
  /** The room of a /v1/rooms/{id}/chat socket, its session, and whether it is logged in. */
  chid: string;
  sid: string;
  live: boolean;
  /** Why a socket that was live stopped (room_not_found, unauthorized): what it sends is answered so. */
  ended?: string;
  /** The room's messages that came while its login ran: sent once it succeeds, dropped if not (LOGIN_HELD_MAX). */
  held?: OutFrame[];
}

/** Room messages held for a room socket while its login runs, at most (a login takes milliseconds). */
const LOGIN_HELD_MAX = 1024;

type EchatMsg = Record<string, unknown>;

export interface RouteClient {
  address: string;
  port: number;
}

export class EchatDoor extends DialectDoor<EchatState, EchatMsg> {
  readonly name = "echat";

  constructor(
    dispatcher: Dispatcher,
    log: Logger,
    private readonly deps: EchatDeps,
  ) {
    super(dispatcher, log);
  }

  protected initial(): EchatState {
    return { chid: "", sid: "", live: false };
  }

  /** The Front of one room socket: this door, with the socket's room and session. */
  roomSocket(chid: string, sid: string): Front {
    return {
      name: this.name,
      streams: false,
      codec: () => new DialectCodec<EchatState, EchatMsg>(this, { chid, sid, live: false }),
      greeting: () => undefined,
      opened: (s) => this.opened(s),
      refusal: (code, text) => this.refusal(code, text),
      frame: (s, bytes, upload, ascii) => this.frame(s, bytes, upload, ascii),
      reject: (s, code, reason, action) => this.reject(s, code, reason, action),
      inputEnded: (s) => this.inputEnded(s),
    };
  }

  protected decode(value: unknown): EchatMsg | string {
    if (typeof value !== "object" || value === null || Array.isArray(value)) return "a message must be a JSON object";
    return value as EchatMsg;
  }

  /** Bad input is invalid_json; a refusal with its own code (other) says so: full, banned, over a rate. */
  bad(code: Code, reason: string): OutFrame {
    return JSON.stringify({ error: { code: ownCode(code) ?? "invalid_json", message: reason } });
  }
  protected refuse(_msg: EchatMsg, code: Code, reason: string): OutFrame {
    // (It said too_many_requests for a failure too: a client told to slow down.)
    return JSON.stringify({ error: { code: ownCode(code) ?? "unavailable", message: reason } });
  }


  private num(uid: string): number | undefined {
    return this.deps.cachedUser(uid)?.num;
  }

  private messageText(m: Pick<MessageRecord, "body" | "chid" | "time">, userId: number | null): string {
    return JSON.stringify({ text: m.body, user_id: userId, room_id: Number(m.chid), created_at: roomsDate(m.time) });
  }

  render(st: EchatState, ev: Event): OutFrame {
    switch (ev.kind) {
      case "message": {
        const m = ev.m;
        if (m.chid !== st.chid || (!st.live && st.held === undefined)) return "";
        const wire = (ev.wire ??= {});
        let frame = wire[this.name];
        if (frame === undefined) {
          const known = this.num(m.from);
          const { user } = this.deps;
          const text = (id: number | undefined) => this.messageText(m, id ?? null);
          // A user number is at most 16 digits.
          frame = wire[this.name] = known !== undefined ? this.messageText(m, known) : afterRead(text(undefined).length + 16, async () => text((await user(m.from))?.num));
        }
        if (st.live) return frame;
        if ((st.held as OutFrame[]).length < LOGIN_HELD_MAX) (st.held as OutFrame[]).push(frame);
        return "";
      }
      case "channelDeleted":
        if (ev.chid !== st.chid) return "";
        st.live = false;
        st.ended = "room_not_found";
        return JSON.stringify({ error: { code: st.ended } });
      case "logout":
        st.live = false;
        st.ended = "unauthorized";
        return JSON.stringify({ error: { code: st.ended } });
      case "close":
        // The server closes it (idle, an operator's ban): why, before the close.
        st.live = false;
        return JSON.stringify({ error: { code: "closed", message: ev.reason } });
      default:
        return "";
    }
  }

  /** A room socket logs in with its session first (before anything it sends is handled). */
  protected override async start(s: Session, st: EchatState): Promise<OutFrame[]> {
    // The room's messages that come while the login runs (in cluster mode it reads the
    // session again once attached: a message then was dropped for good on this socket)
    // are held, sent if the login succeeds and dropped if not (a session revoked
    // meanwhile is told nothing of them); then it is live, and a message while its
    // membership is read goes out too. Only members are sent a room's events, so a
    // socket that turns out not to be one has been sent none of them.
    st.held = [];
    const r = await this.call(s, "auth", { sid: st.sid });
    const held = st.held;
    st.held = undefined;
    if (r.ok) {
      st.live = true;
      for (const f of held) s.peer.send(f, true);
    } else {
      // A refusal with a code of its own (the address's failed-login throttle, the
      // user's connection cap, a database error) is not the session's fault: said as
      // the routes say it. Told "unauthorized", a seed client throws a valid session away.
      const own = ownCode(r.code);
      return this.closeWith(s, JSON.stringify({ error: own === undefined ? { code: "unauthorized" } : { code: own, message: r.text } }));
    }
    let member: boolean;
    try {
      member = await this.deps.isMember(st.chid, s.uid as string);
    } catch (err) {
      st.live = false;
      this.log.warn({ err }, "reading a room socket's membership failed");
      return this.closeWith(s, JSON.stringify({ error: { code: "unavailable", message: "the server could not read the room; try again" } }));
    }
    if (!member) {
      st.live = false;
      return this.closeWith(s, JSON.stringify({ error: { code: "room_not_found" } }));
    }
    return [];
  }

  protected async handle(s: Session, st: EchatState, msg: EchatMsg): Promise<OutFrame[]> {
    // A socket whose room was deleted is told so again: "unauthorized" would make a seed
    // client throw its session away, which is still good on every route.
    if (!st.live) return [JSON.stringify({ error: { code: st.ended ?? "unauthorized" } })];
    const text = str(msg, "text");
    if (text === undefined) return [this.bad(Code.InvalidData, 'send {"text": <string>}')];
    const r = await this.call(s, "message", { channel: st.chid, body: text });
    if (r.ok) return [];
    const gone = r.code === Code.InvalidChannel || r.code === Code.ChannelNotFound;
    // A refusal with a code of its own (a server error, a ban) says it: invalid_json
    // only for what the message itself got wrong.
    return [JSON.stringify({ error: { code: gone ? "room_not_found" : (ownCode(r.code) ?? "invalid_json"), message: r.text } })];
  }

  // ---- HTTP routes -------------------------------------------------------------

  /**
   * Runs `fn` on a session of its own for one request. With `sid`, the session acts as
   * that session's user (401 when it is not valid); it is never logged out here, so the
   * session_id stays valid for the next request.
   */
  private async onRequest(client: RouteClient, sid: string | undefined | null, fn: (s: Session) => Promise<RouteAnswer>): Promise<RouteAnswer> {
    const peer = new RequestPeer(client.address, client.port);
    const s = this.dispatcher.open(peer, this.codec());
    try {
      if (sid !== null) {
        const who = sid === undefined ? undefined : await this.deps.session(sid);
        if (!who) return UNAUTHORIZED;
        s.login(who.uid, sid as string, who.nick, who.expires);
      }
      return await fn(s);
    } finally {
      peer.end();
      this.dispatcher.close(s);
    }
  }

  async register(client: RouteClient, body: unknown): Promise<RouteAnswer> {
    const b = credentials(body);
    if (!b) return INVALID_JSON;
    return this.onRequest(client, null, async (s) => {
      const r = await this.call(s, "register", { login: b.login, pass: b.password, nick: b.login });
      if (!r.ok) return r.code === Code.AlreadyExist ? fail(422, "user_already_exists") : other(r.code);
      return ok({ session_id: s.sid });
    });
  }

  async login(client: RouteClient, body: unknown): Promise<RouteAnswer> {
    const b = credentials(body);
    if (!b) return INVALID_JSON;
    return this.onRequest(client, null, async (s) => {
      const login = await this.loginOf(b.login);
      const r = await this.call(s, "auth", { login, pass: b.password });
      if (r.ok) return ok({ session_id: (r.body as { sid: string }).sid });
      if (r.code === Code.NeedRegister) return fail(422, "user_not_found");
      if (r.code === Code.InvalidPass) return fail(422, "wrong_credentials");
      // A login no account can have (over 64 characters, a lone surrogate), or a
      // password none can (over 1,024): auth's schema refused it, but the body was
      // valid JSON (it answered invalid_json).
      if (r.code === Code.InvalidData) return fail(422, longerThanAnyLogin(login) || hasLoneSurrogate(login) ? "user_not_found" : "wrong_credentials");
      return other(r.code);
    });
  }

  /**
   * The login a name logs in with: the name, or the login of the account whose nick it
   * is. Logins and nicks are one namespace, so register answers user_already_exists for
   * a name that is another door's username (a seed-003 account's login is its email);
   * its holder logs in by it here too, with its own password. Looked up before the one
   * auth, which a miss would count as a failed login.
   */
  private async loginOf(name: string): Promise<string> {
    const uid = await this.deps.uidOfName(name);
    const user = uid === undefined ? undefined : await this.deps.user(uid);
    return user?.login ?? name;
  }

  async logout(client: RouteClient, sid: string | undefined): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async (s) => {
      const r = await this.call(s, "logout", {});
      return r.ok ? ok({}) : other(r.code);
    });
  }

  async info(client: RouteClient, sid: string | undefined): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async (s) => {
      const u = await this.deps.user(s.uid as string);
      return u ? ok({ id: u.num, login: u.login }) : UNAUTHORIZED;
    });
  }

  async users(client: RouteClient, sid: string | undefined, q: string): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async () => {
      const uids = q === "" ? [] : await this.deps.loginsStartingWith(q, SEARCH_MAX);
      return ok(await this.userList(uids));
    });
  }

  private async userList(uids: readonly string[]): Promise<{ id: number; login: string }[]> {
    const found = await Promise.all(uids.map((uid) => this.deps.user(uid)));
    return found.flatMap((u) => (u ? [{ id: u.num, login: shownLogin(u) }] : []));
  }

  /** A room with its members: the first ROOM_USERS_MAX of them (a large public channel joined elsewhere is not listed whole). */
  private async room(chid: string): Promise<{ id: number; users: { id: number; login: string }[] }> {
    return { id: Number(chid), users: await this.userList((await this.deps.members(chid)).slice(0, ROOM_USERS_MAX)) };
  }

  async rooms(client: RouteClient, sid: string | undefined): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async (s) => {
      // Which rooms, read before the answer starts (at most the joined cap of small
      // records): a failure there is still an answer in the door's shape (503), not a
      // cut-off body. Their members are written room by room as the client reads: built
      // whole, 1,000 rooms of 101 members with long logins were ~15 MB of JSON (22 MB of
      // heap) per answer, and anyone can add a user to rooms.
      const rooms: string[] = [];
      for (const chid of await this.deps.channelsOf(s.uid as string)) if ((await this.deps.channel(chid))?.private) rooms.push(chid);
      return ok(jsonArray(this.roomsOf(rooms)));
    });
  }

  private async *roomsOf(chids: readonly string[]): AsyncGenerator<unknown> {
    for (const chid of chids) yield await this.room(chid);
  }

  /** `body` is undefined when the request's was not JSON (invalid_json, after the session's 401). */
  async createRoom(client: RouteClient, sid: string | undefined, body: unknown): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async (s) => {
      const list = (body as { users?: unknown } | null | undefined)?.users;
      if (!Array.isArray(list) || list.length > MAX_MEMBERS) return INVALID_JSON;
      const uids: string[] = [];
      const logins: string[] = [];
      for (const item of list) {
        if (typeof item !== "object" || item === null) return INVALID_JSON;
        const { id, login } = item as { id?: unknown; login?: unknown };
        let uid: string | undefined;
        if (typeof id === "number" && Number.isSafeInteger(id) && id > 0) uid = await this.deps.uidOfNum(id);
        else if (id === undefined && typeof login === "string" && login !== "") uid = await this.deps.uidOfName(login);
        else return INVALID_JSON;
        if (uid === undefined) return fail(422, "user_not_found");
        const u = await this.deps.user(uid);
        if (!u) return fail(422, "user_not_found");
        if (!uids.includes(uid) && uid !== s.uid) {
          uids.push(uid);
          logins.push(shownLogin(u));
        }
      }
      const me = await this.deps.user(s.uid as string);
      const name = clip([me ? shownLogin(me) : "", ...logins].join(", "), NAME_MAX);
      const r = await this.call(s, "createchannel", { name, private: true, members: uids });
      if (!r.ok) return r.code === Code.UserNotFound ? fail(422, "user_not_found") : other(r.code);
      return ok(await this.room((r.body as { chid: string }).chid));
    });
  }

  /** A room the caller is a member of, or undefined (room_not_found either way). */
  private async memberRoom(uid: string, id: string): Promise<string | undefined> {
    if (!/^[1-9][0-9]{0,14}$/.test(id)) return undefined;
    const c = await this.deps.channel(id);
    if (!c || !(await this.deps.isMember(id, uid))) return undefined;
    return id;
  }

  async getRoom(client: RouteClient, sid: string | undefined, id: string): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async (s) => {
      const chid = await this.memberRoom(s.uid as string, id);
      return chid === undefined ? ROOM_NOT_FOUND : ok(await this.room(chid));
    });
  }

  async messages(client: RouteClient, sid: string | undefined, id: string): Promise<RouteAnswer> {
    return this.onRequest(client, sid, async (s) => {
      const chid = await this.memberRoom(s.uid as string, id);
      if (chid === undefined) return ROOM_NOT_FOUND;
      const r = await this.call(s, "history", { channel: chid, limit: HISTORY_MAX });
      // Not a member (any more), or no such room: room_not_found; a server error says so.
      if (!r.ok) return r.code === Code.InvalidChannel || r.code === Code.ChannelNotFound ? ROOM_NOT_FOUND : other(r.code);
      // Streamed as history reads it, message by message, as fast as the client reads:
      // 500 bodies of up to --max-frame each are too much to hold (built whole, eight
      // such answers at once ran the server out of heap).
      return ok(jsonArray(this.messageItems((r.body as ListReply).items(), chid)));
    });
  }

  /** A room's messages in the seed's shape, one by one. */
  private async *messageItems(items: AsyncIterable<Fields>, chid: string): AsyncGenerator<unknown> {
    const nums = new Map<string, number | null>();
    for await (const item of items) {
      const from = String(item.from);
      if (!nums.has(from)) nums.set(from, (await this.deps.user(from))?.num ?? null);
      yield { text: item.body, user_id: nums.get(from), room_id: Number(chid), created_at: roomsDate(Number(item.time)) };
    }
  }

  /** Whether a room socket may open: its session and room, checked before the upgrade. */
  async canOpen(sid: string | undefined, id: string): Promise<RouteAnswer | undefined> {
    const who = sid === undefined ? undefined : await this.deps.session(sid);
    if (!who) return UNAUTHORIZED;
    return (await this.memberRoom(who.uid, id)) === undefined ? ROOM_NOT_FOUND : undefined;
  }
}

/** A JSON array of `values` as a stream, written value by value as the client reads. */
function jsonArray(values: AsyncIterable<unknown>): Readable {
  return Readable.from(
    (async function* () {
      yield "[";
      yield* jsonElements(values);
      yield "]";
    })(),
    { objectMode: false, highWaterMark: 64 * 1024 },
  );
}

function credentials(body: unknown): { login: string; password: string } | undefined {
  if (typeof body !== "object" || body === null) return undefined;
  const { login, password } = body as { login?: unknown; password?: unknown };
  if (typeof login !== "string" || login === "" || typeof password !== "string" || password === "") return undefined;
  return { login, password };
}

/**
 * The session a request presents. The ones it names itself come first: the
 * `Authorization: Bearer` header, then the `session_id` query parameter (WebSocket
 * clients that cannot set headers); the `session_id` cookie, which a client carries
 * along from whichever login set it last, only when the request names none. An empty
 * carrier is no carrier.
 */
export function sessionOf(req: FastifyRequest): string | undefined {
  const auth = req.headers.authorization;
  if (typeof auth === "string" && /^Bearer\s+/i.test(auth)) {
    const token = auth.replace(/^Bearer\s+/i, "").trim();
    if (token !== "") return token;
  }
  const q = (req.query as { session_id?: unknown } | undefined)?.session_id;
  if (typeof q === "string" && q !== "") return q;
  return cookieSession(req);
}

/** The session the request's `session_id` cookie names (from the same origin only). */
function cookieSession(req: FastifyRequest): string | undefined {
  const cookie = req.headers.cookie;
  if (typeof cookie === "string" && sameOrigin(req)) {
    for (const part of cookie.split(";")) {
      const eq = part.indexOf("=");
      if (eq > 0 && part.slice(0, eq).trim() === "session_id") {
        const value = cookieValue(part.slice(eq + 1).trim());
        if (value !== "") return value;
      }
    }
  }
  return undefined;
}

/**
 * Whether a request may carry the session in its cookie: a browser sends the cookie
 * with requests that pages of other origins of the same site make (another port or
 * subdomain: SameSite=Lax lets them through), and names that origin in `Origin`. Such
 * a request is taken as carrying no session (401), as one without its cookie would be;
 * a request without `Origin` (a client that is not a browser, a same-origin GET) and
 * the session in a header or the query (which a page cannot send for another origin's
 * user) are unaffected. A review had a page on another port create a room and read
 * and write its chat through the cookie.
 */
function sameOrigin(req: FastifyRequest): boolean {
  const origin = req.headers.origin;
  if (origin === undefined) return true;
  try {
    return new URL(origin).host.toLowerCase() === String(req.headers.host ?? "").toLowerCase();
  } catch {
    return false; // "null" (a sandboxed page, a file) and anything unparsable
  }
}

/**
 * A cookie's value, percent-decoded as the cookie register and login set is encoded; a
 * value that is not valid percent-encoding is taken as it is (no session has it, so
 * the request is 401, not a server error).
 */
function cookieValue(raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    return raw;
  }
}

function send(reply: FastifyReply, a: RouteAnswer): FastifyReply {
  return reply.code(a.http).type("application/json; charset=utf-8").send(a.body);
}

function clientOf(req: FastifyRequest): RouteClient {
  return { address: req.socket.remoteAddress ?? "?", port: req.socket.remotePort ?? 0 };
}

/** 002's answer to a request no route takes: 404 not_found. */
export function echatNotFound(reply: FastifyReply): FastifyReply {
  return send(reply, fail(404, "not_found"));
}

/** The body of a refusal written without a reply (a request node's HTTP parser refused: http.ts). */
export function echatRefusalBody(code: string, message: string): string {
  return JSON.stringify({ error: { code, message } });
}

/** The session cookie register and login set (and logout clears). */
function cookie(sid: string): string {
  return `session_id=${encodeURIComponent(sid)}; Path=/v1; HttpOnly; SameSite=Lax`;
}

/**
 * Seed 002's routes under /v1 (register this with `prefix: "/v1"`): errors in its shape.
 * `accept` takes an upgraded room socket; `banned` says why an address is refused.
 */
export function echatRoutes(
  door: EchatDoor,
  accept: (ws: WebSocket, req: FastifyRequest, front: Front) => void,
  banned: (address: string) => string | undefined,
  rated: (req: FastifyRequest, res: ServerResponse) => Promise<RateVerdict>,
  stopping: () => boolean,
  /** --max-depth: a body nested deeper is invalid_json (422), as one that is not JSON. */
  maxDepth: number,
) {
  return async (app: FastifyInstance): Promise<void> => {
    app.addHook("onRequest", async (req, reply) => {
      if (upgradeRefused(req)) return send(reply, fail(400, "websocket_not_allowed"));
      if (stopping()) {
        reply.header("connection", "close");
        return send(reply, { http: 503, body: { error: { code: "unavailable", message: SHUTTING_DOWN } } });
      }
      const why = banned(req.socket.remoteAddress ?? "?");
      if (why !== undefined) return send(reply, fail(403, "forbidden"));
      // A room's WebSocket counts its messages; a route counts against its socket's budget.
      const verdict = req.ws ? "ok" : await rated(req, reply.raw);
      if (verdict !== "ok") {
        if (verdict === "close") reply.header("connection", "close");
        return send(reply, { http: 429, body: { error: { code: "too_many_requests", message: verdict === "close" ? RATE_CLOSING : RATE_REFUSED } } });
      }
      // Every body is read as JSON, whatever its Content-Type says (below): a header that
      // is not even a media type ("application/json, text/plain") must not end the
      // request before its route (Fastify's 415, before the session's 401).
      if (req.headers["content-type"] !== undefined) req.headers["content-type"] = "application/json";
    });
    // Bodies are parsed here, so that a bad one is the seed's invalid_json (422).
    app.removeAllContentTypeParsers();
    app.addContentTypeParser("*", { parseAs: "buffer" }, (_req, bytes, done) => {
      if ((bytes as Buffer).length === 0) return done(null, {});
      // Not UTF-8 is not JSON (decoded anyway, each bad byte became U+FFFD, and two
      // passwords of different bad bytes were the same password).
      if (!isUtf8(bytes as Buffer)) return done(null, BAD_BODY);
      // As a TCP frame's or a WebSocket message's (JSON.parse has no limit of its own).
      if (!depthWithin(bytes as Buffer, maxDepth)) return done(null, BAD_BODY);
      try {
        done(null, JSON.parse((bytes as Buffer).toString("utf8")));
      } catch {
        done(null, BAD_BODY);
      }
    });
    app.setErrorHandler((err, req, reply) => {
      // A refusal thrown by what a route reads (16: a cluster's log that cannot be reached).
      if (err instanceof ProtocolError) return send(reply, other(err.code));
      const e = err as { statusCode?: number; code?: string };
      if (e.statusCode === 413 || e.code === "FST_ERR_CTP_BODY_TOO_LARGE") return send(reply, fail(413, "too_large"));
      if (e.statusCode !== undefined && e.statusCode < 500) return send(reply, INVALID_JSON);
      req.log.error({ err }, "e_chat_server request failed");
      return send(reply, fail(500, "internal"));
    });
    app.setNotFoundHandler((_req, reply) => echatNotFound(reply));

    const body = (req: FastifyRequest): unknown => (req.body === BAD_BODY ? undefined : req.body);
    app.post("/register", async (req, reply) => {
      const a = await door.register(clientOf(req), body(req));
      const sid = (a.body as { session_id?: string }).session_id;
      if (sid) reply.header("set-cookie", cookie(sid));
      return send(reply, a);
    });
    app.post("/login", async (req, reply) => {
      const a = await door.login(clientOf(req), body(req));
      const sid = (a.body as { session_id?: string }).session_id;
      if (sid) reply.header("set-cookie", cookie(sid));
      return send(reply, a);
    });
    app.post("/logout", async (req, reply) => {
      const sid = sessionOf(req);
      const a = await door.logout(clientOf(req), sid);
      // The cookie goes only with the session it names: a logout of another session
      // (a Bearer header, ?session_id=) left the cookie's session valid and its client without it.
      if (a.http === 200 && cookieSession(req) === sid) reply.header("set-cookie", `session_id=; Path=/v1; HttpOnly; SameSite=Lax; Max-Age=0`);
      return send(reply, a);
    });
    app.get("/info", async (req, reply) => send(reply, await door.info(clientOf(req), sessionOf(req))));
    app.get("/users/", async (req, reply) => {
      const q = (req.query as { q?: unknown }).q;
      return send(reply, await door.users(clientOf(req), sessionOf(req), typeof q === "string" ? q : ""));
    });
    app.get("/rooms", async (req, reply) => send(reply, await door.rooms(clientOf(req), sessionOf(req))));
    app.post("/rooms", async (req, reply) => send(reply, await door.createRoom(clientOf(req), sessionOf(req), body(req))));
    app.get<{ Params: { id: string } }>("/rooms/:id", async (req, reply) => send(reply, await door.getRoom(clientOf(req), sessionOf(req), req.params.id)));
    app.get<{ Params: { id: string } }>("/rooms/:id/messages", async (req, reply) =>
      send(reply, await door.messages(clientOf(req), sessionOf(req), req.params.id)),
    );
    app.route<{ Params: { id: string } }>({
      method: "GET",
      url: "/rooms/:id/chat",
      config: WEBSOCKET_ROUTE,
      // Checked before the upgrade: a socket opens only for a valid session and a room of its user.
      preValidation: async (req, reply) => {
        const refused = await door.canOpen(sessionOf(req), req.params.id);
        if (refused) return send(reply, refused);
      },
      handler: async (_req, reply) => send(reply, fail(426, "websocket_required")),
      wsHandler: (ws, req) => {
        const sid = sessionOf(req) as string;
        accept(ws, req, door.roomSocket(req.params.id, sid));
      },
    });
  };
}

/** A request body that is not JSON (told apart from a JSON body by identity). */
const BAD_BODY = Object.freeze({ invalid: true });
