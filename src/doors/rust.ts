// The rust_messages door (seed 000): `{"action": …}` objects, one per line, on their
// own TCP port; every request is answered `{"action": <same>, "code": 200|300|400,
// "message": <text>}` unless the seed says otherwise (get_messages, close_connection).
//
// A user is in one room at a time on this door: a connection starts in the server's
// default room (--rust-room), entered on login, and leaves the room the user's last
// connection here was moved to (when none is open: else that one stays where it is);
// change_room moves it, and the user's other connections here (told, code 300).
// Messages sent go to the current room; `get_message` frames arrive for the current
// room only.
// Accounts, rooms (public channels) and messages are wirechat's own: the same on
// every door.
//
// Choices the seed leaves open (PROTOCOL.md §13 lists them): passwords (the seed's
// md5 "hashes") are passwords like any other; code 300 is used for what the server
// tells a client on its own (its room was deleted, its session was ended elsewhere).

import type { Logger } from "pino";
import type { Config } from "../config.js";
import { ListReply } from "../protocol/codec.js";
import { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import type { Audience, Event } from "../protocol/events.js";
import type { Fields, OutFrame } from "../protocol/frames.js";
import type { Session } from "../protocol/session.js";
import { LocalLock } from "../seams.js";
import { DialectCodec, DialectDoor, jsonElements, sameLogin, str, type Answer } from "./dialect.js";

const OK = 200;
const WARN = 300;
const ERR = 400;
/** get_messages answers at most this many (the last ones). */
const MAX_MESSAGES = 500;
/** Users whose room this door keeps in memory (all are stored: RustDeps.storeRoom). */
const ROOMS_MAX = 100_000;

type Room = { chid: string; name: string };

interface RustState {
  handshaken: boolean;
  /** The login and password this connection logged in with (change_password needs the old one). */
  login: string | undefined;
  password: string | undefined;
  room: Room | undefined;
  /** The connection's peer id (a room move is not told to the connection that made it). */
  peer: number;
  /** The user this connection counts for among the user's open connections here (RustDoor.open). */
  counted: string | undefined;
  /** The room this connection's delete_room is deleting: its deletion is not told back to it. */
  deleting?: string;
  /**
   * Logged in, waiting for its turn to enter its room (RustDoor.moves): a move made by
   * another connection meanwhile is not this one's (it starts in the default room).
   */
  waiting?: boolean;
}

type Msg = Record<string, unknown> & { action: string };

export interface RustDeps {
  /** Removes a stored session nobody can present again (AccountOps.revoke). */
  revoke(uid: string, sid: string, expires: number): void;
  config: Config;
  /** The chid of a channel by name, if there is one. */
  channelByName(name: string): Promise<string | undefined>;
  /** The default room's chid (made at start-up). */
  defaultRoom: string;
  /** Hands an event to the router, and in cluster mode to the other nodes (a room move's notice). */
  publish(ev: Event, audience: Audience): void;
  /** The chid of the room the user's connections here were last moved to, as stored (UserStore.rustRoom). */
  storedRoom(uid: string): Promise<string | undefined>;
  /** Stores it (synced): a restart, or a user not moved for long (ROOMS_MAX), still knows it. */
  storeRoom(uid: string, chid: string): Promise<void>;
}

/**
 * A message's text on this door, which has no attachments: an attachment sent through
 * another door shows as `[attachment <MIME type>]` after the text (an image alone was
 * an empty line).
 */
function shownText(body: string, attach: { mime: string } | undefined): string {
  if (!attach) return body;
  const note = `[attachment ${attach.mime || "application/octet-stream"}]`;
  return body === "" ? note : `${body} ${note}`;
}

function line(fields: Fields): string {
  return JSON.stringify(fields) + "\n";
}

function answer(action: string, code: number, message: string): OutFrame[] {
  return [line({ action, code, message })];
}

export class RustDoor extends DialectDoor<RustState, Msg> {
  readonly name = "rust";
  /** uid → the room the user's connections here were last moved to (ROOMS_MAX, the least recently moved forgotten first). */
  private readonly rooms = new Map<string, Room>();
  /** uid → the states of the connections here logged in as the user. */
  private readonly open = new Map<string, Set<RustState>>();
  /** A user's room moves (a login's, a change_room's), one at a time per uid. */
  private readonly moves = new LocalLock();

  constructor(
    dispatcher: Dispatcher,
    log: Logger,
    private readonly deps: RustDeps,
  ) {
    super(dispatcher, log);
  }

  /** The connection closed: the session its login stored ends (endSession). */
  closed(s: Session): void {
    this.uncount((s.codec as DialectCodec<RustState>).state);
    this.endSession(s, this.deps.revoke);
  }

  /** The connection is no longer logged in here (closed, logged out, or its session ended). */
  private uncount(st: RustState): void {
    const uid = st.counted;
    if (uid === undefined) return;
    st.counted = undefined;
    const mine = this.open.get(uid);
    mine?.delete(st);
    if (mine?.size === 0) this.open.delete(uid);
  }

  protected initial(): RustState {
    return { handshaken: false, login: undefined, password: undefined, room: undefined, peer: 0, counted: undefined };
  }

  protected decode(value: unknown): Msg | string {
    if (typeof value !== "object" || value === null || Array.isArray(value)) return "frame must be a JSON object";
    const action = (value as { action?: unknown }).action;
    if (typeof action !== "string" || action === "") return "frame has no 'action' string";
    return value as Msg;
  }

  bad(_code: Code, reason: string, action = "unknown"): OutFrame {
    return line({ action, code: ERR, message: reason });
  }

  protected refuse(msg: Msg, _code: Code, reason: string): OutFrame {
    return line({ action: msg.action, code: ERR, message: reason });
  }

  render(st: RustState, ev: Event): OutFrame {
    switch (ev.kind) {
      case "message": {
        const m = ev.m;
        if (m.chid === undefined || m.chid !== st.room?.chid) return "";
        const wire = (ev.wire ??= {});
        return (wire[this.name] ??= line({ action: "get_message", author: m.nick, text: shownText(m.body, m.attach), timestamp: m.time }));
      }
      case "channelDeleted":
        if (ev.chid !== st.room?.chid) return "";
        st.room = undefined;
        // Its own delete_room answers it (a 300 'your room was deleted' came before the 200).
        if (ev.chid === st.deleting) return "";
        return line({ action: "change_room", code: WARN, message: "your room was deleted; change_room to another" });
      case "logout":
        st.login = st.password = undefined;
        st.room = undefined;
        this.uncount(st);
        return line({ action: "logout", code: WARN, message: ev.reason });
      case "close":
        return line({ action: "close_connection", code: WARN, message: ev.reason });
      case "notice":
        // Another connection of this user moved it (one room at a time): this one moves too.
        if (ev.door !== this.name || ev.room === undefined || ev.origin === st.peer || st.login === undefined || st.waiting) return "";
        st.room = { chid: ev.chid, name: ev.room };
        // (A move made on another node of a cluster: this node's memory follows it.)
        if (st.counted !== undefined) void this.remember(undefined, st.counted, st.room);
        return line({ action: "change_room", code: WARN, message: ev.text });
      default:
        return "";
    }
  }

  protected async handle(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const { rustSecret } = this.deps.config;
    if (action === "handshake") {
      if (rustSecret !== "" && msg.secret !== rustSecret) return this.closeWith(s, answer(action, ERR, "wrong handshake secret")[0]);
      st.handshaken = true;
      return answer(action, OK, "OK");
    }
    if (action === "close_connection") {
      s.peer.end();
      return [];
    }
    if (rustSecret !== "" && !st.handshaken) return this.closeWith(s, answer(action, ERR, "send the handshake first")[0]);
    switch (action) {
      case "registration":
      case "authentication":
        return this.login(s, st, msg);
      case "logout": {
        if (s.uid === undefined) return answer(action, ERR, "not logged in");
        const r = await this.call(s, "logout", {});
        if (r.ok) st.login = st.password = st.room = undefined;
        // No longer logged in (a failed answer may come after the session ended).
        if (s.uid === undefined) this.uncount(st);
        return this.result(action, r);
      }
    }
    if (s.uid === undefined) return answer(action, ERR, "log in first (authentication or registration)");
    switch (action) {
      case "change_password":
        return this.changePassword(s, st, msg);
      case "delete_account":
        return this.deleteAccount(s, st, msg);
      case "create_room":
        return this.createRoom(s, msg);
      case "delete_room":
        return this.deleteRoom(s, st, msg);
      case "change_room":
        return this.changeRoom(s, st, msg);
      case "send_message": {
        const text = str(msg, "text");
        if (text === undefined) return answer(action, ERR, "'text' must be a string");
        // In this door's words (the native refusal names its own field, 'body').
        if (text === "") return answer(action, ERR, "'text' is empty");
        if (!st.room) return answer(action, ERR, "you are in no room; change_room first");
        return this.result(action, await this.call(s, "message", { channel: st.room.chid, body: text }));
      }
      case "get_messages":
        return this.getMessages(s, st, msg);
      default:
        return answer(action, ERR, `unknown action '${action}'`);
    }
  }

  private result(action: string, r: Answer): OutFrame[] {
    return answer(action, r.ok ? OK : ERR, r.text);
  }

  private async login(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const login = str(msg, "login");
    const password = str(msg, "password");
    if (!login || !password) return answer(action, ERR, "'login' and 'password' are required");
    if (s.uid !== undefined) return answer(action, ERR, "already logged in; logout first");
    const r =
      action === "registration"
        ? await this.call(s, "register", { login, pass: password, nick: login })
        : await this.call(s, "auth", { login, pass: password });
    if (!r.ok) return this.result(action, r);
    st.login = login;
    st.password = password;
    st.peer = s.peer.id;
    const uid = (s as Session).uid as string; // logged in now (narrowed to undefined above)
    this.uncount(st); // (a session that ended under an earlier login here, unnoticed)
    const alone = !this.open.has(uid);
    let mine = this.open.get(uid);
    if (mine === undefined) this.open.set(uid, (mine = new Set()));
    mine.add(st);
    st.counted = uid;
    // Every connection starts in the default room (entering it again is a no-op; the
    // room is the connection's before the enter is answered: its messages meanwhile are
    // shown). One room at a time: the room the user's last connection here was moved to
    // is left, unless another connection of the user is open here (it stays there).
    // (Per node in a cluster: a connection on another node is not counted here.)
    let refused: Answer | undefined;
    // Told nothing of another connection's change_room under way: this one was not moved
    // (told "moved" and then put in the default room, its client was wrong about its room).
    st.waiting = true;
    await this.moves.run(uid, async () => {
      st.waiting = false;
      const room = { chid: this.deps.defaultRoom, name: this.deps.config.rustRoom };
      st.room = room;
      const entered = await this.call(s, "enter", { channel: room.chid });
      if (!entered.ok) {
        st.room = undefined;
        refused = entered;
      }
      if (entered.ok && alone) {
        const before = await this.lastRoom(uid);
        if (before === undefined || before === room.chid) {
          // Nothing to leave, and nothing to store (none stored is the default room).
          this.keep(uid, room);
        } else {
          // Stored once the room is left: a leave that failed (a write error) keeps it
          // as the one to leave at the next login.
          const left = await this.call(s, "leave", { channel: before });
          if (left.ok || left.code === Code.InvalidChannel || left.code === Code.ChannelNotFound) await this.remember(s, uid, room);
        }
      }
    });
    // Its session ended meanwhile (a password change or a ban elsewhere): the logout it
    // was told of (300) stands; an OK after it would say it is logged in.
    if (s.uid !== uid) return answer(action, ERR, "the session ended while logging in; log in again");
    if (refused !== undefined) {
      // A login here is in its room (the seed has no other state): one that could not
      // enter it (the user at --max-joined-channels through other doors, the room gone)
      // is not logged in, rather than told OK and then "in no room" at every request.
      const why = `could not enter the room '${this.deps.config.rustRoom}': ${refused.text}`;
      await this.call(s, "logout", {});
      st.login = st.password = undefined;
      // The logout failed too (16): the connection ends rather than stay logged in, in no room.
      if (s.uid !== undefined) return this.closeWith(s, answer(action, ERR, `${why}; closing the connection`)[0]);
      this.uncount(st);
      return answer(action, ERR, `${why}; not logged in`);
    }
    return answer(action, OK, "OK");
  }

  private async changePassword(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const next = str(msg, "new_password");
    if (!sameLogin(msg.login, st.login)) return answer(action, ERR, "you can only change the password of the login you are logged in as");
    if (!next) return answer(action, ERR, "'new_password' is required");
    const r = await this.call(s, "changepassword", { pass: st.password, newpass: next });
    if (r.ok) st.password = next;
    return this.result(action, r);
  }

  private async deleteAccount(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const password = str(msg, "password");
    if (!sameLogin(msg.login, st.login)) return answer(action, ERR, "you can only delete the account you are logged in as");
    if (!password) return answer(action, ERR, "'password' is required");
    const r = await this.call(s, "deleteaccount", { pass: password });
    if (r.ok) st.login = st.password = st.room = undefined;
    if (s.uid === undefined) this.uncount(st);
    return this.result(action, r);
  }

  private async deleteRoom(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const name = str(msg, "name");
    if (!name) return answer(action, ERR, "'name' is required");
    const chid = await this.deps.channelByName(name);
    if (chid === undefined) return answer(action, ERR, `no room named '${name}'`);
    st.deleting = chid;
    let r: Answer;
    try {
      r = await this.call(s, "deletechannel", { channel: chid });
    } finally {
      st.deleting = undefined;
    }
    if (r.ok && st.room?.chid === chid) st.room = undefined;
    return this.result(action, r);
  }

  /**
   * A public channel of that name, the caller its owner but not a member: a
   * rust_messages user is in one room at a time, the one change_room took it to (the
   * native createchannel makes its creator a member, and each create_room left the user
   * in one room more: their messages reached the account's other doors, and counted
   * against --max-joined-channels).
   */
  private async createRoom(s: Session, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const name = str(msg, "name");
    if (!name) return answer(action, ERR, "'name' is required");
    return this.moves.run(s.uid as string, async () => {
      const made = await this.call(s, "createchannel", { name });
      if (!made.ok) return this.result(action, made);
      const left = await this.call(s, "leave", { channel: (made.body as { chid: string }).chid });
      if (!left.ok) this.log.warn({ room: name, code: left.code, reason: left.text }, "a room made through the rust door kept its creator as a member");
      return answer(action, OK, "OK");
    });
  }

  private async changeRoom(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const to = str(msg, "new_room_name");
    const from = str(msg, "old_room_name");
    if (!to) return answer(action, ERR, "'new_room_name' is required");
    const chid = await this.deps.channelByName(to);
    if (chid === undefined) return answer(action, ERR, `no room named '${to}'`);
    const named = from ? await this.deps.channelByName(from) : undefined;
    const uid = s.uid as string;
    // One move of the user's at a time (two connections' change_room at once, or one
    // during another's login, left connections and memberships in different rooms).
    return this.moves.run(uid, async () => {
      const entered = await this.call(s, "enter", { channel: chid });
      if (!entered.ok) return this.result(action, entered);
      // The new room's messages are this connection's from here (not after the leave).
      const left = st.room?.chid;
      const room = { chid, name: to };
      st.room = room;
      // One room at a time: the old one is left (its membership ends), unless it is the
      // new one; so are the connection's current room, whatever old_room_name says (a
      // name of a room it is not in left it in two), the room the user's other
      // connections here were last moved to, and the rooms they are in (they move with
      // this one: one that logged in next to an open one is in the default room).
      const theirs = [...(this.open.get(uid) ?? [])].map((x) => x.room?.chid);
      const last = await this.lastRoom(uid);
      let stuck: Answer | undefined;
      for (const old of new Set([named, left, last, ...theirs])) {
        if (old === undefined || old === chid) continue;
        const out = await this.call(s, "leave", { channel: old });
        // Not a member there, or the room gone: left all the same. Anything else (a
        // failed write) left the user in it: the move is not the one asked for.
        if (!out.ok && out.code !== Code.InvalidChannel && out.code !== Code.ChannelNotFound) stuck ??= out;
      }
      await this.remember(s, uid, room);
      this.deps.publish({ kind: "notice", door: this.name, chid, text: `moved to room '${to}' by another connection`, origin: st.peer, room: to }, { users: [uid] });
      if (stuck) return answer(action, ERR, `now in room '${to}', but still a member of the room left: ${stuck.text}; send change_room again`);
      return answer(action, OK, "OK");
    });
  }

  /**
   * The user's current room on this door, remembered and stored: a login after a
   * restart leaves it too (only in memory, each restart left every user who had moved
   * a member of one room more). A failed write is logged; the move stands. Not stored
   * once `s` is no longer logged in as `uid` (its account deleted meanwhile: the entry
   * went with it).
   */
  private async remember(s: Session | undefined, uid: string, room: Room): Promise<void> {
    this.keep(uid, room);
    if (s !== undefined && s.uid !== uid) return;
    try {
      await this.deps.storeRoom(uid, room.chid);
    } catch (err) {
      this.log.warn({ err, uid, room: room.name }, "storing a rust_messages user's room failed");
    }
  }

  /** Keeps the user's room in memory (the most recently moved last, at most ROOMS_MAX). */
  private keep(uid: string, room: Room): void {
    this.rooms.delete(uid);
    if (this.rooms.size >= ROOMS_MAX) this.rooms.delete(this.rooms.keys().next().value as string);
    this.rooms.set(uid, room);
  }

  /** The chid of the room the user's connections here were last moved to: in memory, else as stored. */
  private async lastRoom(uid: string): Promise<string | undefined> {
    const known = this.rooms.get(uid);
    if (known !== undefined) return known.chid;
    try {
      return await this.deps.storedRoom(uid);
    } catch (err) {
      this.log.warn({ err, uid }, "reading a rust_messages user's room failed");
      return undefined;
    }
  }

  private async getMessages(s: Session, st: RustState, msg: Msg): Promise<OutFrame[]> {
    const { action } = msg;
    const n = msg.number_of_messages;
    if (typeof n !== "number" || !Number.isInteger(n) || n < 0) return answer(action, ERR, "'number_of_messages' must be a whole number");
    if (!st.room) return answer(action, ERR, "you are in no room; change_room first");
    if (n === 0) return [line({ action, messages: [] })];
    const r = await this.call(s, "history", { channel: st.room.chid, limit: Math.min(n, MAX_MESSAGES) });
    if (!r.ok) return this.result(action, r);
    // Written as the connection drains, the messages read a page at a time (as native
    // history is): 500 messages of up to --max-frame each are never held whole, and a
    // client that does not read holds one page.
    const list = r.body as ListReply;
    return [{ parts: [`{"action":"get_messages","messages":[`, () => jsonElements(messageItems(list)), "]}\n"] }];
  }
}

/** The seed's message objects of a history reply, one by one. */
async function* messageItems(list: ListReply): AsyncIterable<unknown> {
  for await (const m of list.items()) {
    yield { author: m.nick, text: shownText(String(m.body), m.attach as { mime: string } | undefined), timestamp: m.time };
  }
}
