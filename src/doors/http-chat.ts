// The HTTP/WS chat door (seed 003), on the HTTP port: account routes at the root
// (/status, /create_user, /change_password, /login, /delete_user) answering
// `{"status": "success" | "error", "message": <text>}`, and the WebSocket /ws, whose
// clients are all in one room: the public channel --lobby.
//
// Accounts are wirechat's own: create_user makes an account whose login is the email
// (lower-cased), nick the username and profile email the email; /login, the account
// routes and the WebSocket's auth find the account by its profile email (so an account
// made on another door logs in here once it has set one), then log in with its login.
// A route runs its native actions (auth, register, setuserinfo, changepassword,
// deleteaccount) on a session of its own, through the dispatcher like any connection,
// and logs it out after (no stored session is left behind).
//
// Choices the seed leaves open (PROTOCOL.md §13 lists them): a chat message comes back
// to its sender too (it is "broadcast to all connected clients"); join and leave are
// announcements to the other /ws sockets, not membership changes; the timestamp is
// the server's, in whole seconds (".000Z"); errors after the login are
// `{"status":"error","message":null,"info":<text>}` and the socket stays.

import type { ServerResponse } from "node:http";
import { isUtf8 } from "node:buffer";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { depthWithin, NO_WEBSOCKET, upgradeRefused, WEBSOCKET_ROUTE } from "../transport/websocket-listener.js";
import type { Logger } from "pino";
import type WebSocket from "ws";
import { Code, ProtocolError } from "../protocol/codes.js";
import { RATE_CLOSING, RATE_REFUSED, type Dispatcher, type RateVerdict } from "../protocol/dispatcher.js";
import { hasLoneSurrogate } from "../protocol/validation.js";
import type { Audience, Event } from "../protocol/events.js";
import { afterRead, type OutFrame } from "../protocol/frames.js";
import type { Session } from "../protocol/session.js";
import type { MessageRecord, UserRecord } from "../storage/layout.js";
import { isLogin, normaliseEmail } from "../features/profile-fields.js";
import { NAME_MAX } from "../limits.js";
import { frameWeight, SHUTTING_DOWN } from "../transport/peer-common.js";
import { RequestPeer } from "../transport/request-peer.js";
import type { Front } from "../transport/listener.js";
import { DialectDoor, str, type Answer, type DialectCodec } from "./dialect.js";

interface ChatState {
  authed: boolean;
  /**
   * While the login finishes (its session is live, the lobby's membership is read or
   * made): the lobby's messages meanwhile, sent after "authenticated" (at most EARLY).
   */
  early?: OutFrame[];
  earlyChars: number;
  /** The connection's peer id, once logged in (a notice is not shown to its sender). */
  peer: number;
  nick: string;
  /** What the others were last told of this socket (join/leave notices), and when (ms). */
  told?: "join" | "leave";
  toldAt?: number;
  /** A change asked for within NOTICE_GAP of the last notice, sent when the gap is over. */
  pending?: "join" | "leave";
  noticeTimer?: NodeJS.Timeout;
}

/**
 * One join/leave notice per socket per this many milliseconds at most, and only when it
 * changes what the others were told: each reaches every 003 socket in the lobby, so a
 * socket sending join (or join and leave in turn) at its request rate (5,000 a second)
 * pushed megabytes a second to every other one and closed the slower readers. A change
 * asked for sooner goes out when the gap is over, the latest one only.
 */
const NOTICE_GAP = 1000;

/** The socket's notices start afresh (closed, logged out, logged in again: maybe as someone else). */
function resetNotices(st: ChatState): void {
  if (st.noticeTimer !== undefined) clearTimeout(st.noticeTimer);
  st.noticeTimer = st.pending = st.told = st.toldAt = undefined;
}

type ChatMsg = Record<string, unknown> & { type: string };

export interface ChatDeps {
  /** The lobby's chid (made at start-up). */
  lobby: string;
  /** The uid holding a unique value (the users store's indexes; email normalised). */
  lookup(index: "login" | "nick" | "email", value: string): Promise<string | undefined>;
  /**
   * `read()`, and once more after this node has applied the log as it stands when
   * `again` says so (cluster mode; readSynced): a view that lags the log must not
   * answer "no such email" or "already taken" for a write made through another node.
   */
  settled<T>(read: () => Promise<T>, again: (v: T) => boolean): Promise<T>;
  user(uid: string): Promise<UserRecord | undefined>;
  /** The user's record when it is cached (events are rendered synchronously). */
  cachedUser(uid: string): UserRecord | undefined;
  isMember(chid: string, uid: string): Promise<boolean>;
  /** Hands an event to the router (join and leave notices). */
  publish(ev: Event, audience: Audience): void;
  /** Removes a stored session nobody can present again (AccountOps.revoke). */
  revoke(uid: string, sid: string, expires: number): void;
  /** A login and password checked as auth checks them, no session started (AccountOps.checkLogin). */
  checkLogin(s: Session, login: string, pass: string): Promise<void>;
  /** An email no account has, counted as a failed login (AccountOps.refuseUnknown). */
  refuseUnknown(s: Session, name: string): Promise<never>;
}

/** A route's answer: the HTTP status and seed 003's ApiResponse. */
export interface RouteAnswer {
  http: number;
  body: { status: "success" | "error"; message: string };
}

/** The HTTP client a route runs for (its address counts for the password throttles). */
export interface RouteClient {
  address: string;
  port: number;
}

/** The seed's own wording for a failed login. */
const INVALID = "Invalid email or password";
/**
 * Lobby frames kept for a socket while its login finishes (ChatState.early), in number
 * and in characters (they go out as the login's reply, outside the outbound cap); past
 * either they are dropped.
 */
const EARLY = 256;
const EARLY_CHARS = 1024 * 1024;

function success(message: string): RouteAnswer {
  return { http: 200, body: { status: "success", message } };
}

function failure(http: number, message: string): RouteAnswer {
  return { http, body: { status: "error", message } };
}

/** The HTTP status of a native refusal. */
function httpOf(code: Code): number {
  switch (code) {
    case Code.InvalidPass:
    case Code.NeedRegister:
    case Code.UserNotFound:
      return 401;
    case Code.AlreadyExist:
      return 409;
    case Code.RateLimited:
      return 429;
    case Code.Forbidden:
      return 403;
    case Code.Unavailable:
      return 503;
    default:
      return 400;
  }
}

/** A refusal as a route answers it (wrong credentials in the seed's words). */
function refusal(r: Answer): RouteAnswer {
  const http = httpOf(r.code);
  return failure(http, http === 401 ? INVALID : r.text);
}

/** A WebSocket message in the seed's shape. */
function frame(status: string, message: unknown, info: string | null): string {
  return JSON.stringify({ status, message, info });
}

function error(info: string): string {
  return frame("error", null, info);
}

function authFailed(why: string): string {
  return error(`Authentication failed: ${why}`);
}

function chatText(m: MessageRecord, email: string): string {
  const message = { user_email: email, username: m.nick, content: m.body, timestamp: new Date(m.time * 1000).toISOString() };
  return frame("message", message, null);
}

export class ChatDoor extends DialectDoor<ChatState, ChatMsg> {
  readonly name = "http-chat";

  constructor(
    dispatcher: Dispatcher,
    log: Logger,
    private readonly deps: ChatDeps,
  ) {
    super(dispatcher, log);
  }

  protected initial(): ChatState {
    return { authed: false, peer: 0, nick: "", earlyChars: 0 };
  }

  protected decode(value: unknown): ChatMsg | string {
    if (typeof value !== "object" || value === null || Array.isArray(value)) return "a message must be a JSON object";
    const type = (value as { type?: unknown }).type;
    if (typeof type !== "string" || type === "") return "a message must have a 'type' string";
    return value as ChatMsg;
  }

  bad(_code: Code, reason: string): OutFrame {
    return error(reason);
  }

  protected refuse(_msg: ChatMsg, _code: Code, reason: string): OutFrame {
    return error(reason);
  }

  /** Before the login, anything the door cannot read ends the socket, as a wrong first message does. */
  protected override refused(s: Session, st: ChatState, code: Code, reason: string): OutFrame[] {
    if (!st.authed) return this.closeWith(s, authFailed(reason));
    return [this.bad(code, reason)];
  }

  render(st: ChatState, ev: Event): OutFrame {
    switch (ev.kind) {
      case "message": {
        const m = ev.m;
        if (m.chid !== this.deps.lobby || (!st.authed && !st.early)) return "";
        const wire = (ev.wire ??= {});
        return this.shown(st, (wire[this.name] ??= this.chatFrame(m)));
      }
      case "notice":
        if ((!st.authed && !st.early) || ev.door !== this.name || ev.chid !== this.deps.lobby || ev.origin === st.peer) return "";
        return this.shown(st, ((ev.wire ??= {})[this.name] ??= frame("message", null, ev.text)));
      case "logout":
        // Logged out by the server (a newer session evicted this one): a new auth may follow.
        st.authed = false;
        resetNotices(st);
        return error(ev.reason);
      case "close":
        return error(ev.reason);
      default:
        return "";
    }
  }

  /** A lobby frame: sent, or kept while the login finishes (EARLY frames, EARLY_CHARS at most; past them dropped). */
  private shown(st: ChatState, out: OutFrame): OutFrame {
    if (st.authed) return out;
    const early = st.early as OutFrame[];
    const weight = frameWeight(out);
    if (early.length < EARLY && st.earlyChars + weight <= EARLY_CHARS) {
      early.push(out);
      st.earlyChars += weight;
    }
    return "";
  }

  /** A chat message with its sender's profile email, read from storage when not cached. */
  private chatFrame(m: MessageRecord): OutFrame {
    const sender = this.deps.cachedUser(m.from);
    if (sender) return chatText(m, sender.email);
    const { user } = this.deps;
    // An email is at most 254 characters.
    return afterRead(chatText(m, "").length + 254, async () => chatText(m, (await user(m.from))?.email ?? ""));
  }

  protected async handle(s: Session, st: ChatState, msg: ChatMsg): Promise<OutFrame[]> {
    if (!st.authed) return this.auth(s, st, msg);
    switch (msg.type) {
      case "chat": {
        const content = str(msg, "content");
        if (content === undefined) return [error("'content' must be a string")];
        const r = await this.call(s, "message", { channel: this.deps.lobby, body: content });
        return r.ok ? [] : [error(r.text)];
      }
      case "join":
      case "leave":
        this.notice(st, msg.type);
        return [];
      case "auth":
        return [error("already authenticated")];
      default:
        return [error(`unknown message type '${msg.type}'`)];
    }
  }

  private async auth(s: Session, st: ChatState, msg: ChatMsg): Promise<OutFrame[]> {
    if (msg.type !== "auth") return this.closeWith(s, authFailed('the first message must be {"type":"auth","email":…,"password":…}'));
    const email = str(msg, "email");
    const password = str(msg, "password");
    if (!email || !password) return this.closeWith(s, authFailed("'email' and 'password' are required"));
    // The lobby's messages from the login on are kept for after "authenticated" (they
    // were dropped while the membership was read, or entered: a large lobby's enter is long).
    st.early = [];
    st.earlyChars = 0;
    let early: OutFrame[];
    try {
      let r: Answer;
      try {
        r = await this.loginByEmail(s, email, password);
      } catch (err) {
        // A read of the email's account failed (a storage error; in cluster mode, the
        // log out of reach): a failed login, in the door's words, as the lobby's below.
        this.log.warn({ err }, "finding a /ws login's account failed");
        return this.closeWith(s, authFailed("the server could not check the login; try again"));
      }
      if (!r.ok) return this.closeWith(s, authFailed(httpOf(r.code) === 401 ? INVALID : r.text));
      const uid = s.uid as string;
      // The lobby is entered once: a member stays one (a native `leave` ends it until the next login here).
      let member: boolean;
      try {
        member = await this.deps.isMember(this.deps.lobby, uid);
      } catch (err) {
        // Logged in natively but not here: the socket closes (closed() revokes the
        // session its login stored), as for any failed login, rather than stay open for
        // an auth that would store a second one.
        this.log.warn({ err }, "reading the lobby's membership failed at a /ws login");
        return this.closeWith(s, authFailed("the server could not read the lobby; try again"));
      }
      if (!member) {
        const entered = await this.call(s, "enter", { channel: this.deps.lobby });
        if (!entered.ok) return this.closeWith(s, authFailed(`could not enter the lobby: ${entered.text}`));
      }
    } finally {
      early = st.early;
      st.early = undefined;
    }
    resetNotices(st);
    st.authed = true;
    st.peer = s.peer.id;
    st.nick = s.nick as string;
    // Sent in the same step that makes the socket live: returned, they went out only
    // once the door's pump came back from this call, and a lobby event routed in
    // between (straight to the socket, as the socket was authed) came first.
    s.peer.send(frame("authenticated", null, `Welcome, ${st.nick}!`), false);
    for (const f of early) s.peer.send(f, false);
    return [];
  }

  /**
   * A /ws socket closed: the session its login stored ends (endSession), also when the
   * login was refused after it (the lobby could not be entered): that session was left
   * stored until --session-ttl, and retries filled the account's sessions, the cap then
   * revoking its real devices' oldest.
   */
  closed(s: Session): void {
    resetNotices((s.codec as DialectCodec<ChatState>).state);
    this.endSession(s, this.deps.revoke);
  }

  /** A socket's join or leave, told to every other /ws socket in the lobby (paced: NOTICE_GAP). */
  private notice(st: ChatState, what: "join" | "leave"): void {
    if (st.noticeTimer !== undefined) {
      st.pending = what;
      return;
    }
    if (st.told === what) return;
    const now = Date.now();
    const wait = st.toldAt === undefined ? 0 : st.toldAt + NOTICE_GAP - now;
    if (wait > 0) {
      st.pending = what;
      st.noticeTimer = setTimeout(() => {
        st.noticeTimer = undefined;
        const next = st.pending as "join" | "leave";
        st.pending = undefined;
        this.notice(st, next);
      }, wait);
      st.noticeTimer.unref();
      return;
    }
    st.told = what;
    st.toldAt = now;
    this.deps.publish({ kind: "notice", door: this.name, chid: this.deps.lobby, text: `${st.nick} ${what === "join" ? "joined" : "left"}`, origin: st.peer }, { channel: this.deps.lobby });
  }

  /** Native auth with the login of the account whose profile email is `email`. */
  private async loginByEmail(s: Session, email: string, password: string): Promise<Answer> {
    const user = await this.userByEmail(email);
    if (!user) return this.unknownEmail(s, email);
    const r = await this.call(s, "auth", { login: user.login, pass: password });
    // A password auth's schema refuses (over 1,024 characters, a lone surrogate) told a
    // known email (status 3, uncounted) from an unknown one: it is checked as any wrong
    // password is, counted and logged, and answered in the same words.
    if (!r.ok && r.code === Code.InvalidData) {
      try {
        await this.deps.checkLogin(s, user.login, password);
      } catch (err) {
        if (!(err instanceof ProtocolError)) throw err;
        return { ok: false, code: err.code, body: undefined, text: err.message };
      }
    }
    return r;
  }

  /**
   * An email no account has is a failed login like a wrong password: it counts against
   * the address's throttle and is logged for fail2ban (it was neither: unknown emails
   * could be tried without end, and a throttled address told known from unknown ones).
   */
  private async unknownEmail(s: Session, email: string): Promise<Answer> {
    try {
      return await this.deps.refuseUnknown(s, email);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      return { ok: false, code: err.code, body: undefined, text: err.code === Code.NeedRegister ? INVALID : err.message };
    }
  }

  /** The account whose profile email is `email` (any door's). */
  private async userByEmail(email: string): Promise<UserRecord | undefined> {
    const e = normaliseEmail(email);
    const uid = e === undefined ? undefined : await this.deps.settled(() => this.deps.lookup("email", e), (found) => found === undefined);
    return uid === undefined ? undefined : this.deps.user(uid);
  }

  /** Runs `fn` on a session of its own for one HTTP request; logs it out and closes it after. */
  private async onRequest(client: RouteClient, fn: (s: Session) => Promise<RouteAnswer>): Promise<RouteAnswer> {
    const peer = new RequestPeer(client.address, client.port, true);
    const s = this.dispatcher.open(peer, this.codec());
    try {
      return await fn(s);
    } finally {
      if (s.uid !== undefined) await this.call(s, "logout", {});
      peer.end();
      this.dispatcher.close(s);
    }
  }

  /** Which of a new account's email (also its login) and username another account holds. */
  private async heldField(email: string, username: string): Promise<"email" | "username" | undefined> {
    const { lookup } = this.deps;
    if ((await lookup("email", email)) !== undefined || (await lookup("login", email)) !== undefined) return "email";
    return (await lookup("nick", username)) !== undefined ? "username" : undefined;
  }

  async createUser(client: RouteClient, username: string, password: string, email: string): Promise<RouteAnswer> {
    const e = normaliseEmail(email);
    if (e === undefined) return failure(400, "'email' is not an email address");
    // The email is the account's login: what a login may not hold is refused here, in
    // words (the native register refused it with its schema's).
    if (!isLogin(e)) return failure(400, `'email' must be at most ${NAME_MAX} characters of letters, digits and _ . @ + - here (it is the account's login)`);
    // Taken values are told apart before anything is written; a race past these
    // checks still ends in 409 (the native action's own check).
    const taken = await this.deps.settled(() => this.heldField(e, username), (field) => field !== undefined);
    if (taken !== undefined) return failure(409, `a user with that ${taken} already exists`);
    return this.onRequest(client, async (s) => {
      const r = await this.call(s, "register", { login: e, pass: password, nick: username });
      if (!r.ok) return refusal(r);
      const set = await this.call(s, "setuserinfo", { email: e });
      if (!set.ok) {
        // The email was taken meanwhile: the account goes again, so nothing is half made.
        await this.call(s, "deleteaccount", { pass: password });
        return set.code === Code.AlreadyExist ? failure(409, "a user with that email already exists") : refusal(set);
      }
      return success("User created");
    });
  }

  /** Checks the credentials only: the seed's /login keeps nothing (no token), so no session is started. */
  async login(client: RouteClient, email: string, password: string): Promise<RouteAnswer> {
    return this.onRequest(client, async (s) => {
      const user = await this.userByEmail(email);
      if (!user) return refusal(await this.unknownEmail(s, email));
      try {
        await this.deps.checkLogin(s, user.login, password);
      } catch (err) {
        if (!(err instanceof ProtocolError)) throw err;
        return refusal({ ok: false, code: err.code, body: undefined, text: err.message });
      }
      return success("Login successful");
    });
  }

  async changePassword(client: RouteClient, email: string, old: string, next: string): Promise<RouteAnswer> {
    // Refused before the login, as changepassword would refuse it after (in its own
    // words, 'newpass'): no password check is spent on it. (The login's session ends no
    // device's at --max-sessions-per-user either way: Peer.sessionEndsWithRequest.)
    if (hasLoneSurrogate(next)) return failure(400, "'new_password' is not well-formed Unicode (it holds a lone surrogate)");
    return this.onRequest(client, async (s) => {
      const r = await this.loginByEmail(s, email, old);
      if (!r.ok) return refusal(r);
      // Every other session of the account ends, on every door; this one is logged out after.
      const changed = await this.call(s, "changepassword", { pass: old, newpass: next });
      return changed.ok ? success("Password changed") : refusal(changed);
    });
  }

  async deleteUser(client: RouteClient, email: string, password: string): Promise<RouteAnswer> {
    return this.onRequest(client, async (s) => {
      const r = await this.loginByEmail(s, email, password);
      if (!r.ok) return refusal(r);
      const deleted = await this.call(s, "deleteaccount", { pass: password });
      return deleted.ok ? success("User deleted") : refusal(deleted);
    });
  }
}

const TEXT = (max: number) => ({ type: "string", minLength: 1, maxLength: max }) as const;
const EMAIL = TEXT(254);
const PASSWORD = TEXT(1024);

function body(required: Record<string, object>): object {
  return { type: "object", required: Object.keys(required), properties: required };
}

function send(reply: FastifyReply, a: RouteAnswer): FastifyReply {
  return reply.code(a.http).send(a.body);
}

/** 003's answer to a request no route takes: 404 with `message`. */
export function chatNotFound(reply: FastifyReply, message: string): FastifyReply {
  return send(reply, failure(404, message));
}

/** The body of a refusal written without a reply (a request node's HTTP parser refused: http.ts). */
export function chatRefusalBody(message: string): string {
  return JSON.stringify(failure(0, message).body);
}

function client(req: FastifyRequest): RouteClient {
  return { address: req.socket.remoteAddress ?? "?", port: req.socket.remotePort ?? 0 };
}

/**
 * Seed 003's routes, in a Fastify scope of their own (its errors in the seed's shape).
 * `accept` takes an upgraded /ws socket; `banned` says why an address is refused.
 */
export function chatRoutes(
  door: ChatDoor,
  accept: (ws: WebSocket, req: FastifyRequest, front: Front) => void,
  banned: (address: string) => string | undefined,
  rated: (req: FastifyRequest, res: ServerResponse) => Promise<RateVerdict>,
  stopping: () => boolean,
  /** --max-depth: a body nested deeper is refused (400) before it is parsed. */
  maxDepth: number,
) {
  return async (app: FastifyInstance): Promise<void> => {
    // A banned address is refused here as at a TCP door's accept (a WebSocket is refused
    // by its listener, with a message and a close). Each request counts against its
    // socket's budget (a WebSocket counts its messages).
    app.addHook("onRequest", async (req, reply) => {
      if (req.ws) return upgradeRefused(req) ? send(reply, failure(400, NO_WEBSOCKET)) : undefined;
      if (stopping()) {
        reply.header("connection", "close");
        return send(reply, failure(503, SHUTTING_DOWN));
      }
      const why = banned(req.socket.remoteAddress ?? "?");
      if (why !== undefined) return send(reply, failure(403, `your address is banned${why ? `: ${why}` : ""}`));
      const verdict = await rated(req, reply.raw);
      if (verdict === "close") reply.header("connection", "close");
      if (verdict !== "ok") return send(reply, failure(429, verdict === "close" ? RATE_CLOSING : RATE_REFUSED));
    });
    // Bodies are JSON: Fastify's text/plain parser would hand a route a string, which its
    // schema refused with 400 "body must be object"; any other media type is 415.
    app.removeContentTypeParser("text/plain");
    // JSON as Fastify parses it (prototype keys refused), from UTF-8 only: decoded
    // anyway, each bad byte became U+FFFD, and two passwords of different bad bytes
    // were the same password.
    const json = app.getDefaultJsonParser("error", "error");
    app.removeContentTypeParser("application/json");
    app.addContentTypeParser("application/json", { parseAs: "buffer" }, (req, bytes, done) => {
      if (!isUtf8(bytes as Buffer)) return done(Object.assign(new Error("the body is not valid UTF-8"), { statusCode: 400 }), undefined);
      // As a TCP frame's or a WebSocket message's (JSON.parse has no limit of its own).
      if (!depthWithin(bytes as Buffer, maxDepth)) return done(Object.assign(new Error(`the body nests deeper than ${maxDepth}`), { statusCode: 400 }), undefined);
      json(req, (bytes as Buffer).toString("utf8"), done);
    });
    app.setErrorHandler((err, req, reply) => {
      // A refusal thrown by what a route reads (16: a cluster's log that cannot be reached).
      if (err instanceof ProtocolError) return send(reply, refusal({ ok: false, code: err.code, body: undefined, text: err.message }));
      const e = err as { validation?: unknown; statusCode?: number; code?: string; message: string };
      if (e.validation) return send(reply, failure(400, e.message));
      if (e.statusCode !== undefined && e.statusCode < 500) return send(reply, failure(e.statusCode, e.message));
      req.log.error({ err }, "HTTP chat request failed");
      return send(reply, failure(500, "the server could not complete the request"));
    });
    app.setNotFoundHandler((req, reply) => chatNotFound(reply, `no route ${req.method} ${req.url.split("?")[0]}`));

    app.get("/status", async () => success("wirechat is running").body);
    app.post<{ Body: { username: string; password: string; email: string } }>(
      "/create_user",
      { schema: { body: body({ username: { ...TEXT(64), pattern: "^[^\\p{Cc}]+$" }, password: PASSWORD, email: EMAIL }) } },
      async (req, reply) => send(reply, await door.createUser(client(req), req.body.username, req.body.password, req.body.email)),
    );
    app.post<{ Body: { email: string; old_password: string; new_password: string } }>(
      "/change_password",
      { schema: { body: body({ email: EMAIL, old_password: PASSWORD, new_password: PASSWORD }) } },
      async (req, reply) => send(reply, await door.changePassword(client(req), req.body.email, req.body.old_password, req.body.new_password)),
    );
    app.post<{ Body: { email: string; password: string } }>(
      "/login",
      { schema: { body: body({ email: EMAIL, password: PASSWORD }) } },
      async (req, reply) => send(reply, await door.login(client(req), req.body.email, req.body.password)),
    );
    app.post<{ Body: { email: string; password: string } }>(
      "/delete_user",
      { schema: { body: body({ email: EMAIL, password: PASSWORD }) } },
      async (req, reply) => send(reply, await door.deleteUser(client(req), req.body.email, req.body.password)),
    );
    app.route({
      method: "GET",
      url: "/ws",
      config: WEBSOCKET_ROUTE,
      handler: async (_req, reply) => send(reply, failure(426, "/ws is a WebSocket: connect with 'Upgrade: websocket'")),
      wsHandler: (ws, req) => accept(ws, req, door),
    });
  };
}
