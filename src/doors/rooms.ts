// The rooms API door (seed 001): `{"type": …}` objects, one per line, on their own
// TCP port. Rooms are private channels (members only) made for two people by
// CREATE_ROOM; messages, edits and deletions are wirechat's own, so a native client
// in the same channel sees them and its own reach this door.
//
// Ids are JSON numbers: a room's id is its chid, a message's id its mid (both decimal
// numbers natively too). Dates are `YYYY-MM-DDTHH:MM:SS` in UTC. The type and status
// constants are spelled as in the seed, typos included (SINGUP_OK, first_massage_id):
// clients compare against them.

import { createHash } from "node:crypto";
import type { Logger } from "pino";
import type { Config } from "../config.js";
import { AttachmentRef, type BlobSource, type ListReply } from "../protocol/codec.js";
import { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import type { Event } from "../protocol/events.js";
import type { Fields, OutFrame, StreamedFrame } from "../protocol/frames.js";
import type { Session } from "../protocol/session.js";
import { LocalLock } from "../seams.js";
import type { MessageRecord } from "../storage/layout.js";
import { NAME_MAX } from "../limits.js";
import { longerThanAnyLogin, shownLogin } from "../features/profile-fields.js";
import { clip, DialectDoor, sameLogin, str, type Answer, type DialectCodec } from "./dialect.js";

/** READ_MSG ALL answers at most this many (the latest). */
const READ_MAX = 500;
/** SEARCH_USER answers at most this many logins. */
const SEARCH_MAX = 50;
/** (user, room) pairs whose last message sent through this door is remembered (RESENT). */
const SENT_MAX = 100_000;
/** How long a late copy of an event that already answered its caller is left out. */
const ECHO_MS = 10_000;
/** Late echoes remembered per connection (RoomsState.late). */
const LATE_MAX = 64;

/**
 * A change's frame: `key` identifies it (its type and id, and for an edit its text,
 * digested: another edit of the same message is another frame, to be shown); `target`
 * is what it changes (`<type>:<id>`).
 */
interface Echo {
  key: string;
  target: string;
}

function echoOf(type: string, id: string, body?: string): Echo {
  const target = `${type}:${id}`;
  return { key: body === undefined ? target : `${target}:${createHash("sha256").update(body).digest("base64url")}`, target };
}

type Msg = Record<string, unknown> & { type: string };

interface RoomsState {
  uid: string | undefined;
  login: string | undefined;
  /**
   * The DELETE_ROOM, DELETE_MSG or EDIT_MSG this connection's request is making (its
   * Echo), while it runs (a connection's frames are handled one at a time): the events
   * with its key are shown and counted (`seen`), or, for a change the client is not to
   * hear of, left out (`hide`); another edit of the same message shown meanwhile is
   * noted (`other`).
   */
  call: (Echo & { hide: boolean; seen: number; other: boolean }) | undefined;
  /**
   * Changes this connection made whose events had not come by its answer (a room's
   * members read from disk): echo key → how many are still to come, and until when
   * (ms) they are left out when they come (the answers were those frames). At most
   * LATE_MAX keys, the oldest dropped.
   */
  late: Map<string, { n: number; until: number; target: string }>;
}

/** What the door reads besides native actions (lookups), and the end of its logins' sessions. */
export interface RoomsDeps {
  /** Removes a stored session nobody can present again (AccountOps.revoke). */
  revoke(uid: string, sid: string, expires: number): void;
  config: Config;
  blobs: BlobSource;
  /** The user whose login, else whose nick, is `name` (logins and nicks are one namespace). */
  uidOfName(name: string): Promise<string | undefined>;
  /** Shown logins (shownLogin) starting with `prefix` (case-insensitively), at most `limit`. */
  loginsStartingWith(prefix: string, limit: number): Promise<string[]>;
  /** A private channel whose members are exactly these two users, if there is one. */
  roomOf(a: string, b: string): Promise<string | undefined>;
  /** The mid of a channel's first message, if it has one. */
  firstMid(chid: string): Promise<number | undefined>;
  /** Every channel `uid` is a member of: its name and the seq of its last message, if any. */
  roomsOf(uid: string): Promise<{ chid: string; name: string; last: number | undefined }[]>;
}

/** `YYYY-MM-DDTHH:MM:SS` (UTC) for unix seconds. */
export function roomsDate(seconds: number): string {
  return new Date(seconds * 1000).toISOString().slice(0, 19);
}

function line(fields: Fields): string {
  return JSON.stringify(fields) + "\n";
}

/** The seed's response types where they are not the request's own. */
const RESPONSE_TYPE: Readonly<Record<string, string>> = { REQUEST_LOGIN: "RESPONSE_LOGIN", REQUEST_SIGNUP: "RESPONSE_SIGNUP" };

/**
 * A refused request: `{type: <its response type>, status: "ERROR", error}`, with its
 * `room_id` or `id` when it had one (a client matches the answer to its request by
 * them; one that is no room's or message's number is not said back).
 */
function error(msg: Msg, text: string): OutFrame[] {
  const type = typeof msg.type === "string" && Object.hasOwn(RESPONSE_TYPE, msg.type) ? RESPONSE_TYPE[msg.type] : msg.type;
  const out: Record<string, unknown> = { type, status: "ERROR" };
  for (const key of ["room_id", "id"]) {
    const v = msg[key];
    if (typeof v === "number" && Number.isSafeInteger(v) && v >= 1) out[key] = v;
  }
  out.error = text;
  return [line(out)];
}

/** The MIME type of an IMAGE's bytes from their first bytes (base64), as far as known. */
export function sniffImage(base64: string): string {
  const head = Buffer.from(base64.slice(0, 16), "base64");
  if (head[0] === 0x89 && head.toString("latin1", 1, 4) === "PNG") return "image/png";
  if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return "image/jpeg";
  if (head.toString("latin1", 0, 4) === "GIF8") return "image/gif";
  if (head.toString("latin1", 0, 4) === "RIFF" && head.toString("latin1", 8, 12) === "WEBP") return "image/webp";
  if (head.toString("latin1", 0, 2) === "BM") return "image/bmp";
  return "image/octet-stream";
}

function msgType(attach: { mime: string } | undefined): "TEXT" | "FILE" | "IMAGE" {
  if (!attach) return "TEXT";
  return attach.mime.startsWith("image/") ? "IMAGE" : "FILE";
}

export class RoomsDoor extends DialectDoor<RoomsState, Msg> {
  readonly name = "rooms";
  /** `<uid>\0<chid>` → the newest mid this user was sent in that room through this door. */
  private readonly sent = new Map<string, number>();
  /** Pairs of users (`<uid>\0<uid>`, in order) whose room a CREATE_ROOM is finding or making. */
  private readonly pairs = new LocalLock();

  constructor(
    dispatcher: Dispatcher,
    log: Logger,
    private readonly deps: RoomsDeps,
  ) {
    super(dispatcher, log);
  }

  /** The connection closed: the session its login stored ends (endSession). */
  closed(s: Session): void {
    this.endSession(s, this.deps.revoke);
  }

  protected initial(): RoomsState {
    return { uid: undefined, login: undefined, call: undefined, late: new Map() };
  }

  protected decode(value: unknown): Msg | string {
    if (typeof value !== "object" || value === null || Array.isArray(value)) return "frame must be a JSON object";
    const type = (value as { type?: unknown }).type;
    if (typeof type !== "string" || type === "") return "frame has no 'type' string";
    return value as Msg;
  }

  bad(_code: Code, reason: string): OutFrame {
    return line({ type: "ERROR", status: "ERROR", error: reason });
  }

  /**
   * As a failed request of its type answers: a login or signup over the rate as a
   * throttled one does; a server failure (16) as the generic ERROR (a login answered
   * LOGIN_WRONG_PASS for it would tell the client its password was wrong).
   */
  protected refuse(msg: Msg, code: Code, reason: string): OutFrame {
    if (code === Code.RateLimited && msg.type === "REQUEST_SIGNUP") return line({ type: "RESPONSE_SIGNUP", status: "SINGUP_FAIL", error: reason });
    if (code === Code.RateLimited && msg.type === "REQUEST_LOGIN") return line({ type: "RESPONSE_LOGIN", status: "LOGIN_WRONG_PASS", error: reason });
    return error(msg, reason)[0];
  }

  /** Remembers what a user was sent in a room (for READ_MSG RESENT). */
  private wasSent(uid: string, chid: string, mid: number): void {
    const key = `${uid}\u0000${chid}`;
    if ((this.sent.get(key) ?? 0) >= mid) return;
    this.sent.delete(key);
    if (this.sent.size >= SENT_MAX) this.sent.delete(this.sent.keys().next().value as string);
    this.sent.set(key, mid);
  }

  /** A message as its READ_MSG frame (an attachment's base64 streamed from the blob store). */
  private readFrame(m: Pick<MessageRecord, "mid" | "chid" | "nick" | "body" | "time">, attach: { mime: string; sha: string; size?: number } | undefined): OutFrame {
    const head = { type: "READ_MSG", status: "OK", room_id: Number(m.chid), message_id: Number(m.mid), msg_type: msgType(attach) };
    const tail = `,"date":${JSON.stringify(roomsDate(m.time))},"sender":${JSON.stringify(m.nick)}}\n`;
    if (!attach) return `${JSON.stringify(head).slice(0, -1)},"message":${JSON.stringify(m.body)}${tail}`;
    const sha = attach.sha;
    const frame: StreamedFrame = { parts: [`${JSON.stringify(head).slice(0, -1)},"message":"`, () => this.deps.blobs.readBase64(sha), `"${tail}`] };
    if (attach.size !== undefined) frame.size = 200 + 4 * Math.ceil(attach.size / 3);
    return frame;
  }

  render(st: RoomsState, ev: Event): OutFrame {
    const wire = (ev.wire ??= {});
    switch (ev.kind) {
      case "message": {
        const m = ev.m;
        if (m.chid === undefined) return ""; // direct messages have no room on this door
        if (st.uid !== undefined) this.wasSent(st.uid, m.chid, Number(m.mid));
        return (wire[this.name] ??= this.readFrame(m, m.attach));
      }
      case "edit":
        // A direct message's change: they are not shown here (nor was the message).
        if (ev.chid === undefined || this.echoed(st, echoOf("EDIT_MSG", ev.mid, ev.body))) return "";
        return (wire[this.name] ??= line({ type: "EDIT_MSG", id: Number(ev.mid), new_msg: ev.body }));
      case "delete":
        if (ev.chid === undefined || this.echoed(st, echoOf("DELETE_MSG", ev.mid))) return "";
        return (wire[this.name] ??= line({ type: "DELETE_MSG", id: Number(ev.mid) }));
      case "channelDeleted":
        if (this.echoed(st, echoOf("DELETE_ROOM", ev.chid))) return "";
        return (wire[this.name] ??= line({ type: "DELETE_ROOM", id: Number(ev.chid) }));
      case "logout":
        // The session ended elsewhere (evicted, password changed, kicked): said in the
        // door's error shape (seed 001 has no logout frame), or the client found out at
        // its next request.
        st.uid = st.login = undefined;
        return line({ type: "ERROR", status: "ERROR", error: `logged out: ${ev.reason}; log in again (REQUEST_LOGIN)` });
      case "close":
        // The server closes the connection (idle, an address ban, a shutdown): why, first.
        return line({ type: "ERROR", status: "ERROR", error: `closing the connection: ${ev.reason}` });
      default:
        return "";
    }
  }

  protected async handle(s: Session, st: RoomsState, msg: Msg): Promise<OutFrame[]> {
    const { type } = msg;
    switch (type) {
      case "REQUEST_SIGNUP":
        return this.signup(s, st, msg);
      case "REQUEST_LOGIN":
        return this.login(s, st, msg);
    }
    if (s.uid === undefined) return error(msg, "log in first (REQUEST_LOGIN or REQUEST_SIGNUP)");
    const username = msg.username;
    if (username !== undefined && !sameLogin(username, st.login)) return error(msg, "'username' is not the user logged in on this connection");
    switch (type) {
      case "CREATE_ROOM":
        return this.createRoom(s, st, msg);
      case "SND_MSG":
        return this.send(s, msg);
      case "READ_MSG":
        return this.read(s, st, msg);
      case "SEARCH_USER": {
        const q = str(msg, "user");
        if (!q) return error(msg, "'user' is required");
        // Code points, as the native searchuser's schema counts (a pair of UTF-16 units is one).
        if (longerThanAnyLogin(q)) return error(msg, `'user' is at most ${NAME_MAX} characters: no login is longer`);
        return [line({ type, user: await this.deps.loginsStartingWith(q, SEARCH_MAX) })];
      }
      case "DELETE_ROOM":
        return this.byId(s, st, msg, "deletechannel", "channel");
      case "DELETE_MSG":
        return this.byId(s, st, msg, "delmessage", "mid");
      case "EDIT_MSG": {
        const text = str(msg, "new_msg");
        if (text === undefined) return error(msg, "'new_msg' must be a string");
        return this.byId(s, st, msg, "editmessage", "mid", { body: text });
      }
      case "OLD_DIALOGS":
        return this.dialogs(s);
      default:
        return error(msg, `unknown type '${type}'`);
    }
  }

  private async signup(s: Session, st: RoomsState, msg: Msg): Promise<OutFrame[]> {
    const out = (status: string, text?: string) => [line(text ? { type: "RESPONSE_SIGNUP", status, error: text } : { type: "RESPONSE_SIGNUP", status })];
    const login = str(msg, "login");
    const pass = str(msg, "pass");
    if (!login || !pass) return out("SINGUP_FAIL", "'login' and 'pass' are required");
    if (s.uid !== undefined) return out("SINGUP_FAIL", "already logged in on this connection");
    const r = await this.call(s, "register", { login, pass, nick: login });
    if (!r.ok) {
      if (r.code === Code.AlreadyExist) return out("SIGNUP_USER_EXIST");
      return r.code === Code.Unavailable ? error(msg, r.text) : out("SINGUP_FAIL", r.text);
    }
    st.uid = s.uid;
    st.login = login;
    return out("SINGUP_OK");
  }

  private async login(s: Session, st: RoomsState, msg: Msg): Promise<OutFrame[]> {
    const out = (status: string, text?: string) => [line(text ? { type: "RESPONSE_LOGIN", status, error: text } : { type: "RESPONSE_LOGIN", status })];
    const login = str(msg, "login");
    const pass = str(msg, "pass");
    if (!login || !pass) return out("LOGIN_WRONG_USER", "'login' and 'pass' are required");
    // No account has a login the native auth refuses as too long (it answers 3).
    if (longerThanAnyLogin(login)) return out("LOGIN_WRONG_USER", `no login is longer than ${NAME_MAX} characters`);
    const before = (s.codec as DialectCodec<RoomsState, Msg>).stored;
    const r = await this.call(s, "auth", { login, pass });
    // The same account again on this connection: the auth stored a new session, and the
    // one it replaces is nobody's now (only the last was revoked at the close: each
    // REQUEST_LOGIN again left one stored, until --max-sessions-per-user evicted another
    // device's).
    const now = (s.codec as DialectCodec<RoomsState, Msg>).stored;
    if (r.ok && before !== undefined && now !== undefined && before.sid !== now.sid) this.deps.revoke(before.uid, before.sid, before.expires);
    if (!r.ok) {
      if (r.code === Code.NeedRegister) return out("LOGIN_WRONG_USER");
      if (r.code === Code.InvalidPass) return out("LOGIN_WRONG_PASS");
      // A server failure is not a wrong password (see refuse).
      if (r.code === Code.Unavailable) return error(msg, r.text);
      // Another account's login on a connection logged in already (native 5; the same
      // account's is LOGIN_OK again): the seed's status for a login refused, with why.
      if (r.code === Code.AlreadyRegister) return out("LOGIN_WRONG_USER", r.text);
      return out("LOGIN_WRONG_PASS", r.text); // throttled, banned, …: the reason says which
    }
    st.uid = s.uid;
    st.login = login;
    return out("LOGIN_OK");
  }

  private async createRoom(s: Session, st: RoomsState, msg: Msg): Promise<OutFrame[]> {
    const type = "CREATE_ROOM";
    const customer = str(msg, "customer");
    if (!customer) return error(msg, "'customer' is required");
    // A login, or a nick (one namespace): READ_MSG's `sender` is the author's nick, which
    // for an account made on another door (a seed-003 username) is not its login.
    const other = await this.deps.uidOfName(customer);
    if (other === undefined) return error(msg, `no user with login or nick '${customer}'`);
    const me = st.uid as string;
    // One at a time per pair: two CREATE_ROOMs of the same two users at once (each
    // opening the chat, or one on two connections) would each find no room and make one.
    return this.pairs.run(me < other ? `${me}\u0000${other}` : `${other}\u0000${me}`, async () => {
      let chid = await this.deps.roomOf(me, other);
      if (chid === undefined) {
        const name = clip(`${shownLogin({ login: st.login as string, nick: s.nick as string })} & ${customer}`, NAME_MAX);
        const r = await this.call(s, "createchannel", { name, private: true, members: [other] });
        if (!r.ok) return error(msg, r.text);
        chid = (r.body as { chid: string }).chid;
        // Cluster mode: the pair's CREATE_ROOM on another node may have found no room
        // either and made one. Every node applies the log in one order and ours is
        // applied here by now (and all before it), so the pair's room read again is the
        // one the log made first, the same on every node (privateRoomOf). When that is
        // not ours, ours goes (its DELETE_ROOM is not this connection's to hear) and the
        // first is the answer; the other node keeps its own, which is that one.
        const first = await this.deps.roomOf(me, other);
        if (first !== undefined && first !== chid) {
          await this.callEchoed(s, st, echoOf("DELETE_ROOM", chid), "deletechannel", { channel: chid }, true);
          chid = first;
        }
      }
      return [line({ type, id: Number(chid), customer })];
    });
  }

  private async send(s: Session, msg: Msg): Promise<OutFrame[]> {
    const type = "SND_MSG";
    const room = msg.room_id;
    const text = str(msg, "message");
    const kind = msg.msg_type ?? "TEXT";
    if (typeof room !== "number" || !Number.isSafeInteger(room) || room < 1) return error(msg, "'room_id' must be a room's id");
    if (text === undefined) return error(msg, "'message' must be a string");
    if (kind !== "TEXT" && kind !== "FILE" && kind !== "IMAGE") return error(msg, "'msg_type' must be TEXT, FILE or IMAGE");
    // Said here in this door's words: the native refusal names its own fields.
    if (text === "") return error(msg, "'message' is empty");
    const data: Record<string, unknown> = { channel: String(room) };
    if (kind === "TEXT") data.body = text;
    else data.attach = { mime: kind === "IMAGE" ? sniffImage(text) : "application/octet-stream", data: text };
    const r = await this.call(s, "message", data);
    if (!r.ok) return error(msg, r.text);
    const { mid, time } = r.body as unknown as { mid: string; time: number };
    return [line({ type, status: "OK", room_id: room, message_id: Number(mid), date: roomsDate(time) })];
  }

  private async read(s: Session, st: RoomsState, msg: Msg): Promise<OutFrame[]> {
    const room = msg.room_id;
    const mode = msg.read ?? "ALL";
    if (typeof room !== "number" || !Number.isSafeInteger(room) || room < 1) return error(msg, "'room_id' must be a room's id");
    if (mode !== "ALL" && mode !== "RESENT") return error(msg, "'read' must be ALL or RESENT");
    const chid = String(room);
    const r = await this.call(s, "history", { channel: chid, limit: READ_MAX });
    if (!r.ok) return error(msg, r.text);
    const uid = st.uid as string;
    // One frame per message, written as the connection drains and read a page at a time
    // (as native history is): 500 messages of up to --max-frame each are never held
    // whole, and a client that does not read holds one page.
    const list = r.body as ListReply;
    return [{ parts: [() => this.readFrames(list, uid, chid, mode === "RESENT")] }];
  }

  private async *readFrames(list: ListReply, uid: string, chid: string, resent: boolean): AsyncIterable<string> {
    // What was sent is read as this answer starts to be written, after the answers
    // before it on the connection (written one after the other): read when the request
    // was handled, a RESENT right behind an ALL still being written sent it all again.
    const after = resent ? (this.sent.get(`${uid}\u0000${chid}`) ?? 0) : 0;
    for await (const item of list.items()) {
      const mid = Number(item.mid);
      if (mid <= after) continue;
      const attach = item.attach instanceof AttachmentRef ? item.attach : undefined;
      const frame = this.readFrame({ mid: String(item.mid), chid, nick: String(item.nick), body: String(item.body), time: Number(item.time) }, attach);
      if (typeof frame === "string") yield frame;
      else {
        for (const part of frame.parts) {
          if (typeof part === "string") yield part;
          else yield* part();
        }
      }
      this.wasSent(uid, chid, mid);
    }
  }

  /**
   * DELETE_ROOM, DELETE_MSG, EDIT_MSG: the members hear of it as an event, and the
   * caller gets that frame as its answer, whether or not it is a member any more (it may
   * have left the room: its messages there are still its own), and only once. Its own
   * copy of the event usually comes while the request runs (right after the native
   * reply): it is shown then, and the answer is left out; one that comes later (a
   * room's members read from disk, cluster mode) is left out instead. Another
   * connection's change of the same message or room is always shown. When another
   * edit of the message was shown while this one ran and this one's event was not,
   * neither is answered: which of the two is the message's text is what the events say
   * (this one's, when it comes later; none when the other superseded it).
   */
  private async byId(s: Session, st: RoomsState, msg: Msg, action: string, key: string, extra: Record<string, unknown> = {}): Promise<OutFrame[]> {
    const id = msg.id;
    if (typeof id !== "number" || !Number.isSafeInteger(id) || id < 1) return error(msg, "'id' must be a number");
    const body = msg.type === "EDIT_MSG" ? (extra.body as string) : undefined;
    const r = await this.callEchoed(s, st, echoOf(msg.type as string, String(id), body), action, { [key]: String(id), ...extra });
    if (!r.ok) return error(msg, r.text);
    if (r.seen || r.other) return [];
    return [line(msg.type === "EDIT_MSG" ? { type: msg.type, id, new_msg: body } : { type: msg.type, id })];
  }

  /**
   * Calls `action`, which makes the event `echo`: events with its key are counted while
   * it runs (`seen`; with `hide`, left out), and other changes of its target noted
   * (`other`); after a success whose event has not come (or with `hide`), the event is
   * left out when it comes (RoomsState.late).
   */
  private async callEchoed(s: Session, st: RoomsState, echo: Echo, action: string, data: Record<string, unknown>, hide = false): Promise<Answer & { seen: boolean; other: boolean }> {
    const now = Date.now();
    for (const [k, e] of st.late) if (e.until < now) st.late.delete(k);
    const call = { ...echo, hide, seen: 0, other: false };
    st.call = call;
    let r: Answer;
    try {
      r = await this.call(s, action, data);
    } finally {
      if (st.call === call) st.call = undefined;
    }
    if (r.ok && (hide || (call.seen === 0 && !call.other))) {
      const until = Date.now() + ECHO_MS;
      const late = st.late.get(echo.key);
      if (late !== undefined) {
        late.n++;
        late.until = until;
      } else {
        if (st.late.size >= LATE_MAX) st.late.delete(st.late.keys().next().value as string);
        st.late.set(echo.key, { n: 1, until, target: echo.target });
      }
    }
    return { ...r, seen: call.seen > 0, other: call.other };
  }

  /**
   * Whether the event `echo` is left out for this connection (see RoomsState): a late
   * echo of an earlier request's first (it comes before the running request's own).
   */
  private echoed(st: RoomsState, echo: Echo): boolean {
    const late = st.late.get(echo.key);
    if (late !== undefined) {
      if (--late.n <= 0) st.late.delete(echo.key);
      // (Past its time it is shown, but it is still that request's, not the running one's.)
      return late.until >= Date.now();
    }
    // Another change of the same target shown: a late echo still waited for with another
    // key will not come (a message's edits go out in order, and one published after a
    // newer one is dropped), and must not hide a later edit that happens to read the same.
    for (const [k, e] of st.late) if (e.target === echo.target) st.late.delete(k);
    const call = st.call;
    if (call === undefined) return false;
    if (call.key === echo.key) {
      if (call.hide) return true;
      call.seen++;
    } else if (call.target === echo.target) {
      call.other = true;
    }
    return false;
  }

  /**
   * Every room of the caller (at most --max-joined-channels), the most recently written
   * first, then the ones without messages (newest first). Read from the memberships, not
   * from native `dialogs`: its page of 100 also holds direct conversations, which this
   * door does not show (100 of them pushed every room out), and it leaves out
   * conversations without messages (a room just created).
   */
  private async dialogs(s: Session): Promise<OutFrame[]> {
    const rooms = (await this.deps.roomsOf(s.uid as string)).sort(
      (a, b) => (b.last ?? -1) - (a.last ?? -1) || Number(b.chid) - Number(a.chid),
    );
    const firsts = await Promise.all(rooms.map((d) => this.deps.firstMid(d.chid)));
    return [
      line({
        type: "OLD_DIALOGS",
        dialogs: rooms.map((d) => d.name),
        id: rooms.map((d) => Number(d.chid)),
        first_massage_id: firsts.map((f) => f ?? null),
      }),
    ];
  }
}
