// The router: the one place that decides where an event goes and what a connection
// has been sent. Features publish typed events with an audience; the router resolves
// the audience (a channel's members), finds every live session of each user, and has
// each session's codec encode the event (once per codec, whatever the audience).
//
// Inbox delivery (direct messages to a user) is exact:
// - after auth a session is synced: the inbox entries after the client's `since` (or
//   after the user's delivery cursor) are sent in order, page by page as the socket
//   drains; live inbox events that arrive meanwhile are not sent but make the sync
//   read again, and once a read comes back short the session goes live in the same
//   turn, so nothing committed is missed and nothing is sent twice;
// - a live session gets every inbox event in seq order and never one it already has.
//   Events are routed as their senders' replies go out, which is not always the order
//   they were committed in (a sender's reply waits behind its earlier ones: a channel's
//   members being read, a slower request before it). Each direct message is noted at
//   its commit (inboxCommitted); one routed while an earlier committed one to the same
//   user is not yet is not sent live: the user's sessions read their inbox from disk
//   after what they have (a sync), which has both, in order. (Sent live, it put the
//   earlier one below the session's position, and that was then never sent.);
// - the cursor advances on the client's `ack` (acking clients), or, for clients that
//   do not ack, once the connection has handed the OS so much after the event that the
//   client must have read it (Connection's confirmation marks). Entries past the
//   cursor are sent again after the next auth: at least once for those clients.
//
// The Delivery interface (seams.ts) is what a cluster transport will implement too.

import { Metrics } from "../metrics.js";
import { nowSeconds } from "./frames.js";
import type { Event, MessageEvent } from "./events.js";
import type { Audience } from "./events.js";
import type { Session } from "./session.js";
import type { MessageRecord } from "../storage/layout.js";

/** The inbox store as the router needs it (storage/messages.ts implements it). */
export interface InboxSource {
  /** The highest mid committed so far: no client can have one above it. */
  newest(): number;
  cursor(uid: string): Promise<number>;
  inboxAfter(uid: string, after: number, limit: number): Promise<number[]>;
  recordsAt(seqs: readonly number[]): Promise<(MessageRecord | undefined)[]>;
  advance(uid: string, seq: number): void;
}

export interface MembersSource {
  cachedMembers(chid: string): ReadonlySet<string> | undefined;
  members(chid: string): Promise<readonly string[]>;
}

/** Hands events to the live connections of users (seams.ts lists it). */
export interface Delivery {
  /**
   * Hands `ev` to its audience: at once, or (a channel whose members must be read
   * first) behind the channel's earlier events, when the promise returned settles
   * (never rejects).
   */
  publish(ev: Event, audience: Audience): void | Promise<void>;
}

/**
 * Direct messages noted at their commit and not yet routed (see inboxCommitted): each
 * is routed once its sender's reply goes out. Past this many, the oldest are let go
 * (counted), and every message routed until they have all been routed is taken as late
 * (a sync from disk: always right, only slower).
 */
const UNROUTED_MAX = 65_536;

/**
 * Messages whose deletion or edit went out lately, remembered (the oldest forgotten
 * first) so that an older edit published after them is not sent (see publish).
 */
const CHANGES_KEPT = 65_536;

/** A map that keeps its newest `max` keys. */
class RecentMap<V> {
  private readonly entries = new Map<string, V>();
  constructor(private readonly max: number) {}

  get(key: string): V | undefined {
    return this.entries.get(key);
  }

  set(key: string, value: V): void {
    this.entries.delete(key);
    if (this.entries.size >= this.max) this.entries.delete(this.entries.keys().next().value as string);
    this.entries.set(key, value);
  }
}

/** A message's last change published (RecentMap): deleted, or its edit's order. */
const DELETED = -1;

/** Users whose offline messages the metrics count (see queuedOffline). */
const OFFLINE_TRACKED = 100_000;

/** Inbox seqs read per page while syncing. */
const SYNC_PAGE = 256;
/**
 * Records read at a time while syncing, each slice only once the connection is not
 * congested, and what it could not send before the connection was congested again is
 * dropped and read again after the drain: a client that does not read holds no records
 * (a page of 256 at up to --max-frame each was held whole, per syncing connection),
 * and a record goes out as it is when read, not as it was before a wait (an edit or
 * delete sent live meanwhile was followed by the old text).
 */
const SYNC_READ = 16;
/**
 * Reads of one slice again after edits or deletes overtook the last (see sync): a
 * bound, so that senders editing without pause cannot hold a sync up for ever. Past
 * it, a message edited in that very moment may arrive with its text of a moment ago.
 */
const SYNC_REREADS = 8;

export class Router implements Delivery {
  private readonly users = new Map<string, Session | Session[]>();
  /** Users with no connection → inbox messages stored for them since (metrics only). */
  private readonly offline = new Map<string, number>();
  /** Channels whose events wait for a membership read (bounded by events in flight). */
  private readonly channelQueue = new Map<string, Promise<void>>();
  /** Messages whose ev_delmessage (DELETED) or ev_edit (its order) was published lately (CHANGES_KEPT). */
  private readonly changed = new RecentMap<number>(CHANGES_KEPT);
  /**
   * Direct messages committed and not yet routed, in commit order from `unroutedHead`:
   * their seqs (0 once routed out of order) and recipients. One list for all users, so
   * that the usual case (routed in commit order) costs an index step: per-recipient
   * maps, a set and a delete per message, doubled S2's p99 at 20,000 msg/s.
   */
  private unroutedSeqs: number[] = [];
  private unroutedTo: string[] = [];
  private unroutedHead = 0;
  /**
   * Messages let go from the list (past unroutedMax) and not routed yet: while any are,
   * every direct message is late. (A flag cleared when the list emptied let a later
   * message go out live before an earlier one let go, which was then dropped as
   * already sent, and confirmed past by the next ack.)
   */
  private unroutedLost = 0;
  /** UNROUTED_MAX (a test makes it small). */
  unroutedMax = UNROUTED_MAX;

  constructor(
    private readonly inbox: InboxSource,
    private readonly channels: MembersSource,
    private readonly onError: (err: unknown, what: string) => void,
    private readonly metrics: Metrics = new Metrics(),
  ) {}

  /**
   * An inbox message for a user with no connection: counted (metrics' offline queue)
   * until the user's next sync starts. Users tracked at most OFFLINE_TRACKED; past it
   * the gauge stops growing for new ones.
   */
  private queuedOffline(uid: string): void {
    const n = this.offline.get(uid);
    if (n === undefined && this.offline.size >= OFFLINE_TRACKED) return;
    this.offline.set(uid, (n ?? 0) + 1);
    this.metrics.offlineQueue++;
  }

  /** A deleted user's queue is gone: it leaves the gauge. */
  forgetOffline(uid: string): void {
    const n = this.offline.get(uid);
    if (n === undefined) return;
    this.offline.delete(uid);
    this.metrics.offlineQueue -= n;
  }

  /** Returns true when this is the user's first live connection. */
  attach(s: Session): boolean {
    if (s.peer.fleeting) return false; // one request's: nothing is sent to it
    const uid = s.uid as string;
    const cur = this.users.get(uid);
    if (cur === undefined) {
      this.users.set(uid, s);
      return true;
    }
    if (Array.isArray(cur)) {
      if (!cur.includes(s)) cur.push(s);
    } else if (cur !== s) this.users.set(uid, [cur, s]);
    return false;
  }

  /** Returns true when that was the user's last live connection. */
  detach(s: Session, uid: string | undefined = s.uid): boolean {
    if (uid === undefined) return false;
    const cur = this.users.get(uid);
    if (cur === undefined) return false;
    if (cur === s) {
      this.users.delete(uid);
      return true;
    }
    if (!Array.isArray(cur)) return false;
    const i = cur.indexOf(s);
    if (i < 0) return false;
    cur.splice(i, 1);
    if (cur.length === 1) this.users.set(uid, cur[0]);
    return false;
  }

  /** Cluster mode: the users other nodes have online, each with those nodes (cluster/presence.ts). */
  elsewhere: ReadonlyMap<string, ReadonlySet<string>> | undefined;

  /** Cluster mode: how many other nodes have a connection of `uid` (0 on a single node). */
  nodesElsewhere(uid: string): number {
    return this.elsewhere?.get(uid)?.size ?? 0;
  }

  /**
   * When this router started (unix seconds): the offline-queue gauge counts messages
   * stored since (README). A cluster node applies the log's older messages as it
   * catches up, after it started: a new node's gauge counted every direct message of
   * the cluster's history to users offline.
   */
  private readonly startedAt = nowSeconds();

  /** Online here or, in cluster mode, on another node. */
  isOnline(uid: string): boolean {
    return this.users.has(uid) || this.elsewhere?.has(uid) === true;
  }

  /** Has a connection to this process. */
  isHere(uid: string): boolean {
    return this.users.has(uid);
  }

  /** This process's users online (a live view, keyed by uid; read it within the current turn). */
  get here(): ReadonlyMap<string, unknown> {
    return this.users;
  }

  /** The users online, on any node (a live view; read it within the current turn). */
  get online(): UserSet {
    return this.elsewhere ? new Union(this.users, this.elsewhere) : this.users;
  }

  sessions(uid: string): readonly Session[] {
    const cur = this.users.get(uid);
    return cur === undefined ? NONE : Array.isArray(cur) ? cur : [cur];
  }

  /** An edit of `mid` (of `order`, when it has one) that a change published before it makes stale; else noted. */
  private staleEdit(mid: string, order: number | undefined): boolean {
    const last = this.changed.get(mid);
    if (last === DELETED || (order !== undefined && last !== undefined && last > order)) return true;
    if (order !== undefined) this.changed.set(mid, order);
    return false;
  }

  publish(ev: Event, audience: Audience): void | Promise<void> {
    // An edit published after its message's deletion, or after a later edit of it, is
    // stale: they commit in order under the conversation's lock, but an edit's event can
    // wait behind its own connection's earlier events while another connection's
    // change goes out.
    if (ev.kind === "delete") this.changed.set(ev.mid, DELETED);
    else if (ev.kind === "edit" && this.staleEdit(ev.mid, ev.order)) return;
    if ("users" in audience) {
      const fixed = audience.channel;
      const before = fixed === undefined ? undefined : this.channelQueue.get(fixed);
      if (before === undefined) {
        for (const uid of audience.users) this.toMember(uid, ev);
        return;
      }
      return this.queueFor(
        fixed as string,
        before.then(() => {
          for (const uid of audience.users) this.toMember(uid, ev);
        }),
      );
    }
    const chid = audience.channel;
    const also = audience.also;
    const queued = this.channelQueue.get(chid);
    const cached = queued ? undefined : this.channels.cachedMembers(chid);
    if (cached) {
      for (const uid of cached) this.toMember(uid, ev);
      if (also !== undefined && !cached.has(also)) this.toMember(also, ev);
      return;
    }
    // Membership must be read: this event, and every later one for the channel until
    // it is delivered, wait in order behind the read.
    // Never rejects (each member's delivery reports its own failure, toMember): a failed
    // read is reported and the events behind it go on (a rejection left unhandled here
    // ends the process).
    const next = (queued ?? Promise.resolve())
      .then(() => this.channels.members(chid))
      .then(
        (members) => {
          for (const uid of members) this.toMember(uid, ev);
          if (also !== undefined && !members.includes(also)) this.toMember(also, ev);
        },
        (err) => this.onError(err, "resolving a channel's members"),
      );
    return this.queueFor(chid, next);
  }

  /** `next` is the channel's last event waiting to go out (until it has); returns it. */
  private queueFor(chid: string, next: Promise<void>): Promise<void> {
    this.channelQueue.set(chid, next);
    void next.then(() => {
      if (this.channelQueue.get(chid) === next) this.channelQueue.delete(chid);
    });
    return next;
  }

  /** An event for one connection only (ev_logout to the sessions it ends). */
  sendTo(s: Session, ev: Event): void {
    s.peer.send(s.codec.event(ev), true);
  }

  /** toUser, its failure reported: the audience's other users (a channel's members, a message's recipient and sender) still get the event. */
  private toMember(uid: string, ev: Event): void {
    try {
      this.toUser(uid, ev);
    } catch (err) {
      this.onError(err, "delivering an event");
    }
  }

  /**
   * A direct message to `uid` is committed (called in commit order, before its event
   * is published): an event of a later one routed before it is not sent live.
   */
  inboxCommitted(uid: string, seq: number): void {
    if (this.unroutedSeqs.length - this.unroutedHead >= this.unroutedMax) {
      // Let go of the oldest (unless it was routed already, out of order).
      if (this.unroutedSeqs[this.unroutedHead] !== 0) this.unroutedLost++;
      this.unroutedHead++;
    }
    this.unroutedSeqs.push(seq);
    this.unroutedTo.push(uid);
  }

  /**
   * Takes `seq` (to `uid`) off the unrouted list: true when an earlier one to the same
   * user may still be unrouted.
   */
  private routed(uid: string, seq: number): boolean {
    const seqs = this.unroutedSeqs;
    let head = this.unroutedHead;
    let late = false;
    if (head < seqs.length && seqs[head] === seq) {
      head++;
    } else {
      let i = head;
      for (; i < seqs.length && seqs[i] !== seq; i++) if (seqs[i] !== 0 && this.unroutedTo[i] === uid) late = true;
      if (i < seqs.length) seqs[i] = 0;
      else if (this.unroutedLost > 0) this.unroutedLost--; // one of those let go
    }
    late ||= this.unroutedLost > 0;
    while (head < seqs.length && seqs[head] === 0) head++;
    // Routed ones are dropped from the front now and then (a slice per 1,024 at least).
    if (head >= 1024 && head * 2 >= seqs.length) {
      this.unroutedSeqs = seqs.slice(head);
      this.unroutedTo = this.unroutedTo.slice(head);
      head = 0;
    }
    this.unroutedHead = head;
    return late;
  }

  private toUser(uid: string, ev: Event): void {
    const cur = this.users.get(uid);
    const inbox = ev.kind === "message" && ev.inbox === uid;
    // An earlier direct message to the user is committed and not yet routed: the
    // sessions read this one from disk, after it.
    const late = inbox && this.routed(uid, Number((ev as MessageEvent).m.mid));
    if (cur === undefined) {
      // Cluster mode: a user connected to another node is sent it there.
      if (inbox && (ev as MessageEvent).m.time >= this.startedAt && this.elsewhere?.has(uid) !== true) this.queuedOffline(uid);
      return;
    }
    if (Array.isArray(cur)) {
      for (const s of cur) {
        if (late) this.catchUp(s);
        else if (inbox) this.inboxEvent(s, ev as MessageEvent);
        else this.live(s, ev);
      }
    } else if (late) this.catchUp(cur);
    else if (inbox) this.inboxEvent(cur, ev as MessageEvent);
    else this.live(cur, ev);
  }

  /** Sends the session its inbox after what it has, from disk (a sync from its position). */
  private catchUp(s: Session): void {
    if (s.syncing) s.syncDirty = true;
    else void this.sync(s, s.lastInbox);
  }

  private live(s: Session, ev: Event): void {
    if (ev.kind === "message") this.metrics.messagesDelivered++;
    else if (s.syncing && (ev.kind === "edit" || ev.kind === "delete")) s.syncChanges++;
    s.peer.send(s.codec.event(ev), true);
  }

  private inboxEvent(s: Session, ev: MessageEvent): void {
    if (s.syncing) {
      s.syncDirty = true;
      return;
    }
    const seq = Number(ev.m.mid);
    if (seq <= s.lastInbox) return;
    // Made before the position moves: a frame that could not be made leaves the
    // message to the next sync rather than marked as sent.
    const frame = s.codec.event(ev);
    s.lastInbox = s.sentInbox = seq;
    this.metrics.messagesDelivered++;
    s.peer.send(frame, true, s.acks ? 0 : seq);
  }

  /**
   * Sends the session's inbox after `since` (default: the user's cursor), then makes
   * it live. Call after the auth reply is queued.
   */
  async sync(s: Session, since: number | undefined): Promise<void> {
    if (s.peer.fleeting || s.codec.inbox === false) return;
    const uid = s.uid as string;
    // A later login (or logout) on this connection supersedes this sync.
    const gen = s.generation;
    const current = () => s.generation === gen && !s.peer.closed;
    s.syncing = true;
    const waiting = this.offline.get(uid);
    if (waiting !== undefined) {
      this.offline.delete(uid);
      this.metrics.offlineQueue -= waiting;
    }
    try {
      // After `since` or, without it, the cursor; either way after what this connection
      // was already sent as this user (a second auth on one connection sends nothing
      // twice, `since` or not). With `since`, what it was sent (sentInbox), not where an
      // earlier `since` put it: a client that asks again from further back gets what
      // it was never sent.
      // A `since` past every mid stored (a client kept it across a restore from a
      // backup, or made it up) is taken as the newest: the messages stored from now on
      // are above it. Taken as given, the ones up to it were dropped as "already had",
      // and then confirmed past by the next ack.
      const start = since === undefined ? Math.max(await this.inbox.cursor(uid), s.lastInbox) : Math.max(Math.min(since, this.inbox.newest()), s.sentInbox);
      if (!current()) return;
      s.lastInbox = start;
      for (;;) {
        s.syncDirty = false;
        const page = await this.inbox.inboxAfter(uid, s.lastInbox, SYNC_PAGE);
        if (!current()) return;
        for (let i = 0; i < page.length; ) {
          // Never more than the socket can take: wait for it rather than hit the cap.
          if (s.peer.congested && (!(await s.peer.drained()) || !current())) return;
          const slice = page.slice(i, i + SYNC_READ);
          let found: (MessageRecord | undefined)[];
          // A read sees the records as they were when it began: an edit or delete
          // committed while it was under way has had its event sent live, ahead of the
          // old text (or the deleted message) this read would send after it. Read again.
          for (let reads = 0; ; reads++) {
            const changes = s.syncChanges;
            found = await this.inbox.recordsAt(slice);
            if (!current()) return;
            if (s.syncChanges === changes || reads === SYNC_REREADS) break;
          }
          for (let j = 0; j < slice.length && !(j > 0 && s.peer.congested); j++, i++) {
            const seq = slice[j];
            s.lastInbox = seq;
            const message = found[j];
            if (!message) continue; // deleted since it was sent
            s.sentInbox = seq;
            const ev: MessageEvent = { kind: "message", m: message, inbox: uid };
            this.metrics.messagesDelivered++;
            s.peer.send(s.codec.event(ev), true, s.acks ? 0 : seq);
          }
        }
        if (page.length < SYNC_PAGE && !s.syncDirty) break;
      }
      if (current()) s.syncing = false;
    } catch (err) {
      if (!current()) return;
      s.syncing = false;
      this.onError(err, "syncing an inbox");
      s.peer.end();
    }
  }

  /**
   * The client acknowledged every inbox event through `seq` sent on this connection:
   * never past the last one sent (an auth's `since`, however high, is not a delivery).
   */
  ack(s: Session, seq: number): number {
    const through = Math.min(seq, s.sentInbox);
    if (through > 0) this.inbox.advance(s.uid as string, through);
    return through;
  }

  /**
   * A non-acking connection has certainly delivered everything through `seq` (marks
   * are dropped at every login and logout, so they are this user's).
   */
  confirmed(s: Session, seq: number): void {
    if (s.uid !== undefined) this.inbox.advance(s.uid, seq);
  }
}

const NONE: readonly Session[] = [];

/** A set of uids as the presence counts read it. */
export type UserSet = Pick<ReadonlyMap<string, unknown>, "has" | "size" | "keys">;

/** Two key sets read as one (their sizes add up: an upper bound, enough for a choice of loop). */
class Union implements UserSet {
  constructor(
    private readonly a: ReadonlyMap<string, unknown>,
    private readonly b: ReadonlyMap<string, unknown>,
  ) {}
  has(key: string): boolean {
    return this.a.has(key) || this.b.has(key);
  }
  get size(): number {
    return this.a.size + this.b.size;
  }
  *keys(): MapIterator<string> {
    yield* this.a.keys();
    for (const k of this.b.keys()) if (!this.a.has(k)) yield k;
  }
}
