// Cluster mode (--nats): the commands a node appends to the replicated log
// (cluster/jetstream-log.ts), and how every node applies them to its own LevelDB.
//
// A handler in cluster mode never writes to LevelDB itself: it appends a command that
// carries everything non-deterministic (times, the new uid, the session's hash, the
// password's bcrypt hash), and answers with the outcome its own node's apply gave.
// Every node applies the same commands in the same order, so ids (mid, user number)
// come from the same counters at the same place in the log, and a contested login is
// won, on every node, by whichever register the stream holds first.
//
// One apply segment is one LevelDB batch, written with the log position it reaches: a
// node that stops resumes from a position its view really has. A segment is the
// entries of one apply call, except that an entry editing or deleting a message is a
// segment of its own, and so is one that deletes an account (their reads must see
// everything before them written). All reads an apply
// needs are made first (phase 1); then every command is decided and written in one
// synchronous pass (phase 2), so no batch can be flushed half-way. Commands within
// one segment see each other's effects through a small overlay (the names claimed, the
// sessions issued, the cmids taken and the messages changed so far in the segment).
//
// What cluster mode serves so far: register, auth (password and sid), logout,
// changepassword, setuserinfo, addcontact, delcontact, direct messages (with cmid),
// their edits and deletions, deleteaccount, and the read-only actions; every other
// action answers 16 (see ActionSpec.cluster). Channels, attachments and the operator's
// writes come next (issue 12).

import type { Logger } from "pino";
import { ClusterPresence } from "../cluster/presence.js";
import { EMPTY_VIEW, JetStreamLog, type StoredEntry, type ViewPosition } from "../cluster/jetstream-log.js";
import { MessageSent } from "../protocol/codec.js";
import type { Event, Audience, MessageEvent } from "../protocol/events.js";
import type { MessageRecord, UserRecord } from "../storage/layout.js";
import { put, type BatchOp } from "../storage/db.js";
import { indexKey, type UniqueIndex } from "../storage/users.js";
import type { StoredSession } from "../storage/sessions.js";
import type { Services } from "./services.js";

export type Command =
  | {
      k: "register";
      /** Proposer's clock (unix seconds): the account's creation and the session's issue. */
      t: number;
      uid: string;
      login: string;
      nick: string;
      /** bcrypt hash of the password. */
      hash: string;
      /** The first session: its sid's hash (never the sid) and expiry. */
      sid: string;
      expires: number;
    }
  | {
      k: "session";
      t: number;
      uid: string;
      sid: string;
      expires: number;
      /** The password hash the proposer checked: refused if the account's has changed since. */
      checked: string;
      /** --max-sessions-per-user on the proposing node. */
      cap: number;
    }
  | { k: "msg"; t: number; from: string; nick: string; to: string; body: string; cmid?: string }
  /** One session ended by its owner; `conn` is the proposer's connection, which logs itself out. */
  | { k: "logout"; uid: string; sid: string; expires: number; conn: number }
  /** A new password hash; every session but `keep` (the caller's) is revoked. */
  | { k: "password"; uid: string; hash: string; checked: string; keep: string }
  | { k: "contact"; owner: string; uid: string; add: boolean }
  /** setuserinfo: the fields given (already normalised); email and phone are unique. */
  | { k: "profile"; uid: string; status?: string; email?: string; phone?: string; picture?: string }
  /** editmessage and delmessage, by the message's author `by`. */
  | { k: "edit"; t: number; mid: string; by: string; body: string }
  | { k: "del"; mid: string; by: string }
  /** deleteaccount: refused if the hash checked is no longer the account's; `conn` is the caller's connection. */
  | { k: "deleteAccount"; uid: string; checked: string; conn: number };

export type Outcome =
  | { k: "registered"; user: UserRecord }
  | { k: "taken"; index: UniqueIndex }
  | { k: "done" }
  | { k: "edited"; edited: number }
  /** The message is gone (14), or `forbidden`: it is someone else's (15). */
  | { k: "nomsg"; forbidden: boolean }
  | { k: "session" }
  | { k: "refused"; reason: string }
  | { k: "sent"; sent: MessageSent; event: MessageEvent | undefined; audience: Audience }
  | { k: "nouser" };

/** The meta key of the view's log position (written with every apply). */
const POSITION_KEY = "cluster";

export interface ClusterOptions {
  servers: string;
  stream: string;
  replicas: number;
  nodeId: string;
}

/**
 * Sessions an applied command ended, for every node to end on its connections: those
 * whose sid hash is in `hashes`, or every one but `except`; never the proposer's own
 * connection `conn` (on the node that proposed it, which handles it itself).
 */
export interface SessionsEnded {
  uid: string;
  hashes?: ReadonlySet<string>;
  except?: string;
  reason: string;
  close: boolean;
  conn?: number;
}

export class Cluster {
  private journal: JetStreamLog<Command, Outcome> | undefined;
  /** The accounts feature ends the connections of sessions an apply ended (`mine`: this node proposed it). */
  onSessionsEnded: ((ended: SessionsEnded, mine: boolean) => void) | undefined;

  constructor(
    private readonly sv: Services,
    private readonly opts: ClusterOptions,
    private readonly log: Logger,
  ) {}

  /** The view's position as stored ({} → an empty view). */
  async storedPosition(): Promise<ViewPosition> {
    const v = (await this.sv.storage.spaces.meta.get(POSITION_KEY)) as ViewPosition | undefined;
    return v ?? EMPTY_VIEW;
  }

  /** Joins the log and applies it up to its end (ViewMismatch when this view is another stream's). */
  async open(): Promise<void> {
    this.journal = await JetStreamLog.open<Command, Outcome>({
      servers: this.opts.servers,
      stream: this.opts.stream,
      replicas: this.opts.replicas,
      nodeId: this.opts.nodeId,
      view: await this.storedPosition(),
      apply: (entries, position) => this.apply(entries, position),
      log: this.log,
    });
    this.log.info({ stream: this.opts.stream, applied: this.journal.position.seq, node: this.opts.nodeId }, "caught up with the cluster log");
    const { router, hooks } = this.sv;
    this.presence = new ClusterPresence(
      this.journal.connection,
      `${this.opts.stream}.presence`,
      this.journal.origin,
      (uid) => router.isHere(uid),
      () => router.here.keys(),
      (uid, online) => hooks.presence(uid, online, this.log),
      this.log,
    );
    router.elsewhere = this.presence.users;
    this.presence.start();
  }

  /** Who is online on the other nodes; set once open. */
  private presence: ClusterPresence | undefined;

  /**
   * This node's first connection of a user (true) or its last one gone (false): told to
   * the other nodes; the presence hooks run, on every node, when the user's state
   * changes cluster-wide.
   */
  presenceChanged(uid: string, online: boolean): void {
    if (this.presence) this.presence.local(uid, online);
    else this.sv.hooks.presence(uid, online, this.log);
  }

  async close(): Promise<void> {
    this.presence?.stop();
    await this.journal?.close();
  }

  /** Appends a command; its outcome once it is stored and applied here (16 when the engine cannot confirm). */
  append(cmd: Command): Promise<Outcome> {
    return (this.journal as JetStreamLog<Command, Outcome>).append(cmd);
  }

  /** Waits until this node has applied everything appended anywhere before the call. */
  sync(): Promise<void> {
    return (this.journal as JetStreamLog<Command, Outcome>).sync();
  }

  /**
   * Applies entries in segments: an entry that edits or deletes a message is a segment
   * of its own, so that its reads (the record, its history chunk) see every message
   * before it already written, however the log was cut into calls.
   */
  private async apply(entries: StoredEntry<Command>[], position: ViewPosition): Promise<Outcome[][]> {
    const outcomes: Outcome[][] = [];
    let from = 0;
    while (from < entries.length) {
      let to = from + 1;
      if (!appliedAlone(entries[from])) while (to < entries.length && !appliedAlone(entries[to])) to++;
      const segment = entries.slice(from, to);
      const last = segment[segment.length - 1];
      const at = to === entries.length ? position : { created: position.created, seq: last.seq, id: last.id };
      for (const o of await this.applySegment(segment, at)) outcomes.push(o);
      from = to;
    }
    return outcomes;
  }

  private async applySegment(entries: StoredEntry<Command>[], position: ViewPosition): Promise<Outcome[][]> {
    const { storage, users, sessions, messages, router } = this.sv;
    // Phase 1: every read the commands need, before anything is written.
    const reads = await Promise.all(
      entries.map((e) =>
        Promise.all(
          e.entry.c.map(async (c): Promise<Reads> => {
            switch (c.k) {
              case "register": {
                const [login, nick, existing] = await Promise.all([users.lookup("login", c.login), users.lookup("nick", c.nick), users.get(c.uid)]);
                return { login, nick, user: existing };
              }
              case "session": {
                const [user, list] = await Promise.all([users.get(c.uid), sessions.list(c.uid)]);
                return { user, sessions: list };
              }
              case "msg": {
                const [user, earlier] = await Promise.all([users.get(c.to), c.cmid === undefined ? undefined : messages.byCmid(c.from, c.cmid)]);
                return { user, earlier };
              }
              case "logout":
                return { sessions: await sessions.list(c.uid) };
              case "password": {
                const [user, list] = await Promise.all([users.get(c.uid), sessions.list(c.uid)]);
                return { user, sessions: list };
              }
              case "contact":
                return { user: await users.get(c.uid) };
              case "profile": {
                const [user, email, phone] = await Promise.all([
                  users.get(c.uid),
                  c.email ? users.lookup("email", c.email) : undefined,
                  c.phone ? users.lookup("phone", c.phone) : undefined,
                ]);
                return { user, email, phone };
              }
              case "deleteAccount": {
                // Cluster mode has no channels yet, so there are no memberships to end.
                const user = await users.get(c.uid);
                if (!user || user.hash !== c.checked) return { user };
                const { contacts } = this.sv;
                const [mine, listedBy, list, forget] = await Promise.all([
                  contacts.list(c.uid),
                  contacts.listedBy(c.uid),
                  sessions.list(c.uid),
                  messages.forgetUserOps(c.uid),
                ]);
                const removal = [
                  ...users.removeOps(user),
                  ...mine.flatMap((x) => contacts.removeOps(c.uid, x)),
                  ...listedBy.flatMap((owner) => contacts.removeOps(owner, c.uid)),
                  ...list.flatMap((x) => sessions.revokeOps(c.uid, x.hash, x.expires)),
                  ...forget,
                ];
                return { user, removal };
              }
              case "edit":
                return { message: await messages.get(c.mid) };
              case "del": {
                const m = await messages.get(c.mid);
                return { message: m, removal: m && m.from === c.by ? await messages.removeOps(m) : undefined };
              }
              default:
                throw unknownCommand(c);
            }
          }),
        ),
      ),
    );
    // Phase 2: decide and write, in log order, in one synchronous pass.
    const overlay = new Overlay();
    const events: [Event, Audience][] = [];
    const ended: [SessionsEnded, boolean][] = [];
    const newPairs: [string, string][] = [];
    const mine = this.journal?.origin;
    const outcomes = entries.map((e, i) =>
      e.entry.c.map((c, j) => {
        const r = reads[i][j];
        const out = this.decide(c, r, overlay, (x) => ended.push([x, e.entry.o === mine]), newPairs, events);
        if (out.k === "sent" && out.event) events.push([out.event, out.audience]);
        return out;
      }),
    );
    storage.commitLazy([put(storage.spaces.meta, POSITION_KEY, position)]);
    await new Promise<void>((resolve, reject) => storage.afterCommit((err) => (err ? reject(err) : resolve())));
    for (const u of overlay.users.values()) users.saved(u);
    for (const uid of overlay.gone) {
      users.forget(uid);
      router.forgetOffline(uid);
    }
    for (const [a, b] of newPairs) messages.peersKnown(a, b);
    for (const [x, byMe] of ended) this.onSessionsEnded?.(x, byMe);
    // Every event, this node's own included, goes out in log order: a connection is sent
    // messages in mid order, which its inbox position relies on (Router.inboxEvent). They
    // go after this turn, so the proposers' replies (resolved now) are sent first.
    if (events.length > 0) setImmediate(() => {
      for (const [ev, audience] of events) router.publish(ev, audience);
    });
    return outcomes;
  }

  private decide(c: Command, r: Reads, overlay: Overlay, end: (x: SessionsEnded) => void, newPairs: [string, string][], events: [Event, Audience][]): Outcome {
    const { storage, users, sessions, messages } = this.sv;
    switch (c.k) {
      case "register": {
        if (overlay.holder("login", c.login, r.login) !== undefined) return { k: "taken", index: "login" };
        if (overlay.holder("nick", c.nick, r.nick) !== undefined) return { k: "taken", index: "nick" };
        if (r.user || overlay.users.has(c.uid)) return { k: "refused", reason: "that account id is in use" };
        const user: UserRecord = { uid: c.uid, num: users.nextNum(), login: c.login, nick: c.nick, hash: c.hash, email: "", phone: "", picture: "", status: "", created: c.t };
        storage.commitLazy([...users.saveOps(user), ...sessions.createHashedOps(c.sid, { uid: c.uid, created: c.t, expires: c.expires }, c.t * 1000)]);
        overlay.claim("login", c.login, c.uid);
        overlay.claim("nick", c.nick, c.uid);
        overlay.users.set(c.uid, user);
        overlay.sessions.set(c.uid, [{ hash: c.sid, expires: c.expires, issued: c.t * 1000 }]);
        return { k: "registered", user };
      }
      case "session": {
        const user = overlay.users.get(c.uid) ?? r.user;
        if (!user || user.hash !== c.checked) return { k: "refused", reason: "the account or its password changed" };
        const list = overlay.sessions.get(c.uid) ?? [...(r.sessions ?? [])];
        const issued = c.t * 1000;
        const ops = sessions.createHashedOps(c.sid, { uid: c.uid, created: c.t, expires: c.expires }, issued);
        list.push({ hash: c.sid, expires: c.expires, issued });
        // Past the cap, the oldest go (the one just issued last, whatever the clocks say).
        const evicted = new Set<string>();
        if (list.length > c.cap) {
          const older = list.filter((s) => s.hash !== c.sid).sort((a, b) => a.issued - b.issued || (a.hash < b.hash ? -1 : 1));
          for (const old of older.slice(0, list.length - c.cap)) {
            ops.push(...sessions.revokeOps(c.uid, old.hash, old.expires));
            evicted.add(old.hash);
          }
        }
        storage.commitLazy(ops);
        overlay.sessions.set(c.uid, list.filter((s) => !evicted.has(s.hash)));
        if (evicted.size > 0) end({ uid: c.uid, hashes: evicted, reason: "too many sessions: this one, the oldest, was ended", close: false });
        return { k: "session" };
      }
      case "msg": {
        if (!r.user && !overlay.users.has(c.to)) return { k: "nouser" };
        const audience: Audience = { users: c.to === c.from ? [c.to] : [c.to, c.from] };
        if (c.cmid !== undefined) {
          const earlier = overlay.cmids.get(`${c.from}\u0000${c.cmid}`) ?? r.earlier;
          if (earlier) return { k: "sent", sent: new MessageSent(earlier[0], earlier[1]), event: undefined, audience };
        }
        const m: MessageRecord = { mid: "", from: c.from, nick: c.nick, body: c.body, time: c.t, to: c.to };
        if (c.cmid !== undefined) m.cmid = c.cmid;
        const text = messages.append(m);
        const pair = messages.peerOps(c.from, c.to);
        if (pair) {
          storage.commitLazy(pair);
          newPairs.push([c.from, c.to]);
        }
        if (c.cmid !== undefined) overlay.cmids.set(`${c.from}\u0000${c.cmid}`, [m.mid, m.time]);
        // The record's text is the event's too, unless it holds the cmid (the sender's only).
        const event: MessageEvent = { kind: "message", m, text: c.cmid === undefined ? text : undefined, inbox: c.to };
        return { k: "sent", sent: new MessageSent(m.mid, m.time), event, audience };
      }
      case "logout": {
        storage.commitLazy(sessions.revokeOps(c.uid, c.sid, c.expires));
        // Later commands of this call see it gone, however the calls were cut on other nodes.
        overlay.sessions.set(c.uid, (overlay.sessions.get(c.uid) ?? r.sessions ?? []).filter((x) => x.hash !== c.sid));
        end({ uid: c.uid, hashes: new Set([c.sid]), reason: "the session was logged out", close: false, conn: c.conn });
        return { k: "done" };
      }
      case "password": {
        const prev = overlay.users.get(c.uid) ?? r.user;
        if (!prev || prev.hash !== c.checked) return { k: "refused", reason: "the password was changed meanwhile" };
        const next: UserRecord = { ...prev, hash: c.hash };
        const others = (overlay.sessions.get(c.uid) ?? r.sessions ?? []).filter((x) => x.hash !== c.keep);
        storage.commitLazy([...users.saveOps(next, prev), ...others.flatMap((x) => sessions.revokeOps(c.uid, x.hash, x.expires))]);
        overlay.users.set(c.uid, next);
        overlay.sessions.set(c.uid, (overlay.sessions.get(c.uid) ?? r.sessions ?? []).filter((x) => x.hash === c.keep));
        end({ uid: c.uid, except: c.keep, reason: "the password was changed", close: true });
        return { k: "done" };
      }
      case "contact": {
        if (c.add && !r.user && !overlay.users.has(c.uid)) return { k: "nouser" };
        storage.commitLazy(c.add ? this.sv.contacts.addOps(c.owner, c.uid) : this.sv.contacts.removeOps(c.owner, c.uid));
        return { k: "done" };
      }
      case "profile": {
        const prev = overlay.users.get(c.uid) ?? r.user;
        if (!prev) return { k: "nouser" };
        const next: UserRecord = { ...prev };
        if (c.status !== undefined) next.status = c.status;
        if (c.email !== undefined) next.email = c.email;
        if (c.phone !== undefined) next.phone = c.phone;
        if (c.picture !== undefined) next.picture = c.picture;
        const heldByOther = (index: "email" | "phone", inView: string | undefined) => {
          const h = overlay.holder(index, next[index], inView);
          return h !== undefined && h !== c.uid;
        };
        if (next.email && next.email !== prev.email && heldByOther("email", r.email)) return { k: "taken", index: "email" };
        if (next.phone && next.phone !== prev.phone && heldByOther("phone", r.phone)) return { k: "taken", index: "phone" };
        storage.commitLazy(users.saveOps(next, prev));
        if (next.email !== prev.email) {
          overlay.release("email", prev.email);
          if (next.email) overlay.claim("email", next.email, c.uid);
        }
        if (next.phone !== prev.phone) {
          overlay.release("phone", prev.phone);
          if (next.phone) overlay.claim("phone", next.phone, c.uid);
        }
        overlay.users.set(c.uid, next);
        return { k: "done" };
      }
      case "deleteAccount": {
        if (!r.user) return { k: "nouser" };
        if (!r.removal) return { k: "refused", reason: "the password was changed meanwhile" };
        storage.commitLazy(r.removal);
        overlay.gone.push(c.uid);
        end({ uid: c.uid, reason: "the account was deleted", close: true, conn: c.conn });
        return { k: "done" };
      }
      case "edit": {
        const m = overlay.messages.has(c.mid) ? overlay.messages.get(c.mid) : r.message;
        if (!m || m.from !== c.by) return { k: "nomsg", forbidden: m !== undefined };
        const next: MessageRecord = { ...m, body: c.body, edited: c.t };
        storage.commitLazy(messages.updateOps(next));
        overlay.messages.set(c.mid, next);
        events.push([{ kind: "edit", mid: c.mid, body: c.body, edited: c.t }, messageAudience(m)]);
        return { k: "edited", edited: c.t };
      }
      case "del": {
        const m = overlay.messages.has(c.mid) ? overlay.messages.get(c.mid) : r.message;
        if (!m || m.from !== c.by) return { k: "nomsg", forbidden: m !== undefined };
        storage.commitLazy(r.removal ?? []);
        overlay.messages.set(c.mid, undefined);
        events.push([{ kind: "delete", mid: c.mid }, messageAudience(m)]);
        return { k: "done" };
      }
      default:
        throw unknownCommand(c);
    }
  }
}

/** A command of a newer version: this node cannot follow the log until it is upgraded. */
function unknownCommand(c: never): Error {
  return new Error(`the cluster log holds a command this version does not know (${JSON.stringify((c as { k?: unknown }).k)}): upgrade this node`);
}

/**
 * An entry applied as a segment of its own: it edits or deletes a message, or deletes
 * an account (their reads must see everything before them written).
 */
function appliedAlone(e: StoredEntry<Command>): boolean {
  return e.entry.c.some((c) => c.k === "edit" || c.k === "del" || c.k === "deleteAccount");
}

function messageAudience(m: MessageRecord): Audience {
  const to = m.to as string;
  return { users: to === m.from ? [to] : [to, m.from] };
}

interface Reads {
  login?: string;
  nick?: string;
  email?: string;
  phone?: string;
  user?: UserRecord;
  sessions?: StoredSession[];
  earlier?: [string, number];
  message?: MessageRecord;
  removal?: BatchOp[];
}

/** What the commands of one apply call have done so far (see the top of the file). */
class Overlay {
  /** Unique values claimed (→ uid) or released (→ "") so far in this call. */
  private readonly names = new Map<string, string>();
  readonly users = new Map<string, UserRecord>();
  readonly sessions = new Map<string, StoredSession[]>();
  readonly cmids = new Map<string, [string, number]>();
  /** Accounts deleted in this segment (their caches go once it is written). */
  readonly gone: string[] = [];
  /** Messages edited (the new record) or deleted (undefined) in this call. */
  readonly messages = new Map<string, MessageRecord | undefined>();

  claim(index: UniqueIndex, value: string, uid: string): void {
    this.names.set(`${index}:${indexKey(index, value)}`, uid);
  }

  release(index: UniqueIndex, value: string): void {
    if (value) this.names.set(`${index}:${indexKey(index, value)}`, "");
  }

  /** Who holds `value` after this call's commands so far; `inView`: its holder in the view. */
  holder(index: UniqueIndex, value: string, inView: string | undefined): string | undefined {
    const h = this.names.get(`${index}:${indexKey(index, value)}`);
    if (h === undefined) return inView;
    return h === "" ? undefined : h;
  }
}
