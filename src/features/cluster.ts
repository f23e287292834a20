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
// changepassword, setuserinfo, addcontact, delcontact, channels (createchannel, enter,
// invite, leave, deletechannel), direct and channel messages (with cmid), their edits
// and deletions, deleteaccount, and the read-only actions; every other action answers
// 16 (see ActionSpec.cluster). Attachments and the operator's writes come next (issue 12).

import type { Logger } from "pino";
import { natsConnectOptions, type NatsAccess } from "../cluster/access.js";
import { listenForNotes } from "../cluster/notes.js";
import { ClusterBlobs } from "../cluster/blobs.js";
import { ClusterPresence } from "../cluster/presence.js";
import { EMPTY_VIEW, JetStreamLog, type StoredEntry, type ViewPosition } from "../cluster/jetstream-log.js";
import { MessageSent } from "../protocol/codec.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import type { Event, Audience, MessageEvent, NoticeEvent } from "../protocol/events.js";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { BANNED_LOGIN, MAX_BANS } from "../storage/bans.js";
import { REGISTRATION_CLOSED } from "./registration.js";
import { banKey, CLUSTER_POSITION_KEY, REGISTRATION_KEY, channelConv, directConv, type BanKind, type ChannelRecord, type MessageRecord, type UserRecord } from "../storage/layout.js";
import { put, type BatchOp } from "../storage/db.js";
import { readKeys } from "../storage/range.js";
import { indexKey, nameKey, type UniqueIndex } from "../storage/users.js";
import type { ExpiredSession, StoredSession } from "../storage/sessions.js";
import { channelErrors } from "./channels.js";
import { contactErrors } from "./contacts.js";
import type { Services } from "./services.js";

/**
 * Channels read per name key when a chcreate is decided: one unless an older layout
 * left several whose names read alike (layout 7 keeps them).
 */
const READS_ALIKE_READ = 64;

/**
 * A login attempt another node's throttles count (features/accounts.ts counted):
 * `address` failed (the address's count), `key` (a login from an address) failed or,
 * with `ok`, succeeded (its count cleared); or a password check (`checked`).
 */
export interface LoginNote {
  address?: string;
  key?: string;
  ok?: true;
  /** A password check from this address (as the hasher keys it) took a token of --auth-rate. */
  checked?: string;
}

export type Command =
  | {
      /**
       * "signup": a user's own register on a node that follows the log's registration
       * setting (no --registration of its own): refused (15) when that setting is
       * "closed" as the entry is applied, since the proposer's check read its own view,
       * which can lag a close made through another node. A kind of its own, not a flag:
       * a node of an older version stops at it (unknown command) rather than make the
       * account where the others refuse it. "register": not checked (an operator's
       * account, a node whose --registration decides for itself, older entries).
       */
      k: "register" | "signup";
      /** Proposer's clock (unix seconds): the account's creation and the session's issue. */
      t: number;
      uid: string;
      login: string;
      nick: string;
      /** bcrypt hash of the password. */
      hash: string;
      /** The first session: its sid's hash (never the sid) and expiry; none for an account an operator adds. */
      sid?: string;
      expires?: number;
      /**
       * Logins and nicks are one namespace (UserStore.claim): neither may be another
       * user's login or nick. Older log entries have no flag and checked each apart.
       */
      names?: true;
      /**
       * A login banned when the entry is applied is refused (15): the proposer's check
       * read its own view, which can lag a ban made through another node. Older log
       * entries have no flag and were decided without it.
       */
      bans?: true;
      /**
       * A login or nick that reads as another account's (storage/users.ts nameKey) is
       * taken: the log decides it with the view's `namekeys`. Older log entries have no
       * flag and were decided without it (a new node replaying them decides as the
       * nodes that applied them did).
       */
      reads?: true;
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
  /** A message to user `to` or to channel `chid` (one of the two). */
  | { k: "msg"; t: number; from: string; nick: string; to?: string; chid?: string; body: string; cmid?: string; attach?: Attachment }
  /** One session ended by its owner; `conn` is the proposer's connection, which logs itself out. */
  | { k: "logout"; uid: string; sid: string; expires: number; conn: number }
  /** A new password hash; every session but `keep` (the caller's; "" for none) is revoked. */
  | { k: "password"; uid: string; hash: string; checked: string; keep: string; reason?: string }
  /** `cap`: --max-contacts of the proposer, checked against the list as the log has it. */
  | { k: "contact"; owner: string; uid: string; add: boolean; cap?: number }
  /**
   * setuserinfo: the fields given (already normalised); email and phone are unique.
   * With `logins`, an email may not be another user's login either (the seed-003 door
   * logs in by email); older log entries have no flag and did not check it.
   */
  | { k: "profile"; uid: string; status?: string; email?: string; phone?: string; picture?: string; logins?: true }
  /** editmessage and delmessage, by the message's author `by`. */
  | { k: "edit"; t: number; mid: string; by: string; body: string }
  | { k: "del"; mid: string; by: string }
  /** deleteaccount: refused if the hash checked is no longer the account's; `conn` is the caller's connection. */
  | { k: "deleteAccount"; uid: string; checked: string; conn: number; reason?: string }
  /** An operator ends the user's connections on every node (`revoke`: and their sessions). */
  | { k: "kick"; uid: string; reason: string; revoke: boolean }
  /** An operator's ban (`at`: unix seconds); a login's owner `uid` has their sessions revoked and connections closed. */
  | { k: "ban"; kind: BanKind; value: string; reason: string; at: number; uid?: string }
  | { k: "unban"; kind: BanKind; value: string }
  /** An operator opens or closes registration: on every node, stored in its view (features/registration.ts). */
  | { k: "registration"; open: boolean }
  /**
   * Delivery cursors advanced on the proposing node (uid → inbox seq), shared about once
   * a second: a client that reconnects elsewhere is not sent again what it had. Each
   * node keeps the largest (its cursors are local, derived state, written lazily).
   */
  | { k: "cursors"; at: Record<string, number> }
  /**
   * Removes up to `limit` stored sessions expired at `before` (the proposer's clock);
   * their connections are closed on every node. Every node proposes one now and then
   * when its view holds expired sessions; a second finds nothing left.
   */
  | { k: "sweep"; before: number; limit: number }
  /**
   * createchannel by `owner`, with `members` (uids besides the owner, sorted, no
   * duplicates); the caps are the proposer's --max-owned-channels and --max-joined-channels.
   */
  | {
      k: "chcreate";
      t: number;
      owner: string;
      name: string;
      descr: string;
      priv: boolean;
      members: string[];
      maxOwned: number;
      maxJoined: number;
      /** The members' cap (othersJoinCap); older log entries have none and used maxJoined. */
      maxAdded?: number;
      /**
       * A public name that reads as a public channel's (storage/users.ts nameKey) is
       * taken: the log decides it with the view's `chreads`. Older log entries (and the
       * server's own channel) have no flag and were decided without it (a new node
       * replaying them decides as the nodes that applied them did).
       */
      reads?: true;
    }
  /** `uid` becomes a member of `chid`: by enter, or by `by`'s invite; `cap` is --max-joined-channels. */
  | { k: "join"; t: number; chid: string; uid: string; by?: string; cap: number }
  /** `uid` leaves channel `chid`, or every channel ("*"). */
  | { k: "leave"; uid: string; nick: string; chid: string }
  /** deletechannel by `by` (only its owner may). */
  | { k: "chdelete"; chid: string; by: string };

/** A message's attachment: its blob (in the object store, put before the message was appended). */
export interface Attachment {
  mime: string;
  sha: string;
  size: number;
}

export type Outcome =
  | { k: "registered"; user: UserRecord }
  | { k: "taken"; index: UniqueIndex }
  /** Done; `n`: how many (sessions revoked, bans lifted) where the command says. */
  | { k: "done"; n?: number; closed?: number }
  | { k: "edited"; edited: number }
  /** The message is gone (14), or `forbidden`: it is someone else's (15). */
  | { k: "nomsg"; forbidden: boolean }
  | { k: "session" }
  | { k: "refused"; reason: string }
  | { k: "sent"; sent: MessageSent; event: MessageEvent | undefined; audience: Audience }
  | { k: "nouser" }
  /** Refused with this error (the channel commands'). */
  | { k: "error"; err: ProtocolError }
  | { k: "channel"; chid: string }
  /** A join: `added` is false when `uid` already was a member (nothing changed). */
  | { k: "joined"; added: boolean; nick: string };

/** Cursor advances are appended at most this often... */
const CURSOR_EVERY_MS = 1_000;
/** ...or at once when this many users' cursors moved (one entry stays far below its size limit). */
const CURSORS_PER_ENTRY = 5_000;
/** Cursors kept for the next try while the log cannot take them: past it, they are dropped (they only redeliver). */
const CURSORS_KEPT = 100_000;

/** Accounts whose deletion this node has decided, remembered (the oldest forgotten first): see `vanished`. */
const VANISHED_KEPT = 4_096;

export interface ClusterOptions {
  servers: string;
  stream: string;
  replicas: number;
  nodeId: string;
  /** Authentication and TLS towards NATS. */
  access: NatsAccess;
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
  /** open() has applied the log up to its end: entries applied now are new. */
  private caughtUp = false;
  /** The log's last seq when open() connected (the catch-up's end), and the last applied. */
  private catchUpEnd: number | undefined;
  private appliedSeq = 0;
  /** The server closes this node's connections from a banned address: how many. */
  onAddressBanned: ((address: string, reason: string) => number) | undefined;
  /**
   * The channels feature purges a conversation's messages, a deleted channel's or a
   * deleted account's own (local work, on every node; the purge's mark went in the
   * apply's batch, so a restart resumes it).
   */
  onPurge: ((conv: string) => void) | undefined;
  /** The accounts feature ends the connections of sessions an apply ended (`mine`: this node proposed it). */
  onSessionsEnded: ((ended: SessionsEnded, mine: boolean) => void) | undefined;

  /**
   * Test hook: WIRECHAT_TEST_APPLY_DELAY_MS makes this node apply every batch that much
   * late (read once, when the node starts), so that a test proves reads across nodes
   * wait for the log (sync) instead of relying on a node being quick. Not for production.
   */
  private readonly applyDelayMs = Math.max(0, Number(process.env.WIRECHAT_TEST_APPLY_DELAY_MS ?? 0) || 0);

  constructor(
    private readonly sv: Services,
    private readonly opts: ClusterOptions,
    private readonly log: Logger,
  ) {}

  /** A ban's key, and whether it is in force after this segment's commands so far. */
  private banState(overlay: Overlay, kind: BanKind, value: string): { key: string; has: boolean } {
    const key = banKey(kind, value);
    return { key, has: overlay.bans.get(key) ?? this.sv.bans.banned(kind, value) !== undefined };
  }

  /** Whether users, messages, channels, bans or a registration setting are stored. */
  private async holdsRecords(): Promise<boolean> {
    const { users, log, channels, bans, meta } = this.sv.storage.spaces;
    for (const space of [users, log, channels, bans]) if ((await readKeys(space, { limit: 1 })).length > 0) return true;
    return (await meta.get(REGISTRATION_KEY)) !== undefined;
  }

  /** The view's position as stored ({} → an empty view). */
  async storedPosition(): Promise<ViewPosition> {
    const v = (await this.sv.storage.spaces.meta.get(CLUSTER_POSITION_KEY)) as ViewPosition | undefined;
    return v ?? EMPTY_VIEW;
  }

  /**
   * Joins the log and applies it up to its end (ViewMismatch when this view is another
   * stream's); `abort` ends the wait, rejecting with its reason.
   */
  async open(abort?: AbortSignal): Promise<void> {
    const view = await this.storedPosition();
    this.appliedSeq = view.seq;
    // Records and no position: written outside the log (a single node's database, an
    // operator's ban or registration setting made there): not the cluster's.
    if (view.seq === 0 && (await this.holdsRecords())) {
      throw new Error(
        `the data dir holds a single node's database, not a view of the cluster log (a node's view is built from the log): start this node on an empty --data-dir`,
      );
    }
    this.journal = await JetStreamLog.open<Command, Outcome>({
      servers: this.opts.servers,
      stream: this.opts.stream,
      replicas: this.opts.replicas,
      nodeId: this.opts.nodeId,
      view,
      apply: (entries, position) => this.apply(entries, position),
      log: this.log,
      connectOptions: natsConnectOptions(this.opts.access),
      alone,
      abort,
      // An apply's attachment fetch stops retrying: it is applied again at the next start.
      closing: () => {
        if (this.remoteBlobs) this.remoteBlobs.closed = true;
      },
      // Attachments: the object store, before the catch-up applies entries that name blobs.
      connected: async (nc, lastSeq) => {
        this.catchUpEnd = lastSeq;
        const remote = (this.remoteBlobs = await ClusterBlobs.open(nc, `${this.opts.stream}_BLOBS`, this.opts.replicas, this.sv.blobs, this.log));
        // A read that finds a referenced attachment's file missing fetches it again.
        this.sv.blobs.refetch = (sha) => remote.refetch(sha);
      },
    });
    this.caughtUp = true;
    this.caughtUpNow();
    this.log.info({ stream: this.opts.stream, applied: this.journal.position.seq, node: this.opts.nodeId }, "caught up with the cluster log");
    const { router, hooks } = this.sv;
    this.presence = new ClusterPresence(
      this.journal.connection,
      `${this.opts.stream}.presence`,
      this.journal.origin,
      (uid) => router.isHere(uid),
      () => router.here.keys(),
      (uid, online) => {
        if (!online && this.vanished.has(uid)) return;
        // Online somewhere: what this node counted as waiting for them is sent there.
        if (online) router.forgetOffline(uid);
        hooks.presence(uid, online, this.log);
      },
      this.log,
    );
    router.elsewhere = this.presence.users;
    this.presence.start();
    this.receiveNotices(this.journal.connection, this.journal.origin);
    this.receiveLoginNotes(this.journal.connection, this.journal.origin);
    this.sv.messages.onAdvance = (uid, seq) => this.cursorMoved(uid, seq);
  }

  /** Cursor advances made here, not yet appended (uid → seq): see shareCursors. */
  private cursors = new Map<string, number>();
  private cursorTimer: NodeJS.Timeout | undefined;

  /** A cursor advanced on this node: shared with the others within CURSOR_EVERY_MS. */
  private cursorMoved(uid: string, seq: number): void {
    // Closing: the log takes no more (a cursor not shared only redelivers), and a timer
    // set now would hold the stopping process up.
    if (this.closing) return;
    if ((this.cursors.get(uid) ?? 0) >= seq) return;
    if (!this.cursors.has(uid) && this.cursors.size >= CURSORS_KEPT) return; // only redelivers
    this.cursors.set(uid, seq);
    if (this.cursors.size >= CURSORS_PER_ENTRY && !this.sharing) this.shareCursors();
    else this.cursorTimer ??= setTimeout(() => this.shareCursors(), CURSOR_EVERY_MS);
  }

  /**
   * Appends the cursors gathered since the last time. Nobody waits for it: when the
   * log cannot take it, they are kept (the largest of each) for the next try; a cursor
   * lost in a crash only redelivers, as on a single node.
   */
  private shareCursors(): void {
    clearTimeout(this.cursorTimer);
    this.cursorTimer = undefined;
    if (this.cursors.size === 0 || !this.journal || this.sharing) return;
    // At most CURSORS_PER_ENTRY in one command (its size stays far below an entry's).
    const at: Record<string, number> = {};
    let n = 0;
    for (const [uid, seq] of this.cursors) {
      if (n++ >= CURSORS_PER_ENTRY) break;
      at[uid] = seq;
      this.cursors.delete(uid);
    }
    this.sharing = true;
    this.append({ k: "cursors", at }).then(
      () => {
        this.sharing = false;
        if (this.cursors.size > 0 && !this.closing) this.cursorTimer ??= setTimeout(() => this.shareCursors(), this.cursors.size >= CURSORS_PER_ENTRY ? 0 : CURSOR_EVERY_MS);
      },
      () => {
        this.sharing = false;
        if (this.closing) return;
        for (const [uid, seq] of Object.entries(at)) if ((this.cursors.get(uid) ?? 0) < seq && this.cursors.size < CURSORS_KEPT) this.cursors.set(uid, seq);
        this.cursorTimer ??= setTimeout(() => this.shareCursors(), CURSOR_EVERY_MS);
      },
    );
  }

  /** A cursors command is in flight (one at a time). */
  private sharing = false;

  private closing = false;

  /** The attachments' object store; set once connected. */
  private remoteBlobs: ClusterBlobs | undefined;

  /**
   * Puts this node's blob into the cluster's object store, before a message naming it
   * is appended (16 when the store cannot take it).
   */
  putBlob(sha: string, size: number): Promise<void> {
    return (this.remoteBlobs as ClusterBlobs).put(sha, size);
  }

  /** The notices subscription (a door's join and leave lines, not stored). */
  private notices: Subscription | undefined;

  /**
   * A door's notice (seed 003's join and leave lines) for every node's connections:
   * published here by the caller, and over core NATS to the others (not stored: a
   * notice lost while a node reconnects is not sent again, as on a single node's
   * connection that drops).
   */
  shareNotice(ev: NoticeEvent, audience: Audience): void {
    const nc = this.journal?.connection;
    if (!nc || nc.isClosed()) return;
    const { wire: _, ...plain } = ev;
    nc.publish(`${this.opts.stream}.notice`, JSON.stringify({ o: this.journal?.origin, ev: plain, audience }));
  }

  /** The failed-login notes subscription (see shareLogin). */
  private loginNotes: Subscription | undefined;

  /**
   * Set by the accounts feature: a failed or successful login another node saw, to count
   * in this node's throttles as if it had been seen here.
   */
  onLoginNote: ((note: LoginNote) => void) | undefined;

  /**
   * A failed login (or a success that clears its login's count) seen here, for the
   * other nodes' throttles: over core NATS, not stored. Without it an address spread
   * over N nodes had N times --auth-fail-login and --auth-fail-addr. A note lost while
   * a node reconnects only leaves that node's count lower, as it was before notes.
   */
  shareLogin(note: LoginNote): void {
    const nc = this.journal?.connection;
    if (!nc || nc.isClosed()) return;
    nc.publish(`${this.opts.stream}.logins`, JSON.stringify({ o: this.journal?.origin, ...note }));
  }

  private receiveLoginNotes(nc: NatsConnection, origin: string): void {
    this.loginNotes = listenForNotes<LoginNote & { o: string }>(
      nc,
      `${this.opts.stream}.logins`,
      { unreadable: "a failed-login note from another node could not be read", stopped: "failed-login notes from other nodes stopped" },
      this.log,
      ({ o, ...note }) => {
        if (o !== origin) this.onLoginNote?.(note);
      },
    );
  }

  private receiveNotices(nc: NatsConnection, origin: string): void {
    this.notices = listenForNotes<{ o: string; ev: NoticeEvent; audience: Audience }>(
      nc,
      `${this.opts.stream}.notice`,
      { unreadable: "a door notice from another node could not be read", stopped: "door notices from other nodes stopped" },
      this.log,
      (note) => {
        // Its origin connection is on another node: every connection here is told.
        if (note.o !== origin) this.sv.router.publish({ ...note.ev, origin: -1 }, note.audience);
      },
    );
  }

  /** Who is online on the other nodes; set once open. */
  private presence: ClusterPresence | undefined;

  /**
   * Accounts whose deletion this node has decided. The deletion tells their watchers
   * they went offline (when they were online); the offline that the closing of their
   * connections makes afterwards is not told again. The presence hook would otherwise
   * find the watchers still listed when that offline came from another node before this
   * node's deletion was written: two ev_presence for one deletion.
   */
  private readonly vanished = new Set<string>();

  private vanish(uid: string): void {
    if (this.vanished.size >= VANISHED_KEPT) this.vanished.delete(this.vanished.values().next().value as string);
    this.vanished.add(uid);
  }

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
    this.closing = true;
    this.shareCursors();
    clearTimeout(this.cursorTimer);
    this.presence?.stop();
    this.notices?.unsubscribe();
    this.loginNotes?.unsubscribe();
    await this.journal?.close(); // its `closing` stops the attachment fetches first
  }

  /** Appends a command; its outcome once it is stored and applied here (16 when the engine cannot confirm). */
  append(cmd: Command): Promise<Outcome> {
    return (this.journal as JetStreamLog<Command, Outcome>).append(cmd);
  }

  /** append(), with a refusal the apply decided (an "error" outcome) thrown. */
  async run(cmd: Command): Promise<Outcome> {
    const out = await this.append(cmd);
    if (out.k === "error") throw out.err;
    return out;
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
    if (this.applyDelayMs > 0) await new Promise((r) => setTimeout(r, this.applyDelayMs));
    const outcomes: Outcome[][] = [];
    let from = 0;
    while (from < entries.length) {
      let to = from + 1;
      if (!appliedAlone(entries[from])) while (to < entries.length && !appliedAlone(entries[to])) to++;
      const segment = entries.slice(from, to);
      const last = segment[segment.length - 1];
      const at = to === entries.length ? position : { created: position.created, seq: last.seq, id: last.id };
      for (const o of await this.applySegment(segment, at)) outcomes.push(o);
      this.appliedSeq = at.seq;
      from = to;
    }
    return outcomes;
  }

  private caughtUpNow: () => void = () => {};
  /** Resolves once open() has applied the log up to its end (never, if it fails). */
  readonly whenCaughtUp = new Promise<void>((resolve) => (this.caughtUpNow = resolve));

  /** Why the node cannot take writes now (JetStreamLog.problem), for /readyz once it is up. */
  get problem(): string | undefined {
    return this.journal?.problem;
  }

  /** Where open() is, for /readyz while the node starts. */
  get startingUp(): string {
    if (this.catchUpEnd === undefined) return "connecting to the cluster's message store";
    return `catching up with the cluster log: applied up to entry ${this.appliedSeq} of ${this.catchUpEnd}`;
  }

  private async applySegment(entries: StoredEntry<Command>[], position: ViewPosition): Promise<Outcome[][]> {
    const { blobs } = this.sv;
    // Blobs fetched (or found) for this segment's messages: pinned until it is written.
    const pinned: string[] = [];
    try {
      return await this.applyPinned(entries, position, pinned);
    } finally {
      for (const sha of pinned) blobs.unpin(sha);
    }
  }

  private async applyPinned(entries: StoredEntry<Command>[], position: ViewPosition, pinned: string[]): Promise<Outcome[][]> {
    const { storage, users, sessions, messages, channels, router } = this.sv;
    // A call that changes memberships: a channel message's audience is its members at
    // the message's place in the log, not at the end of the call (the events go out
    // after every command of it is reported): read for each one, changed in decide.
    const membersMove = entries.some((e) => e.entry.c.some((c) => MEMBERSHIP_KINDS.has(c.k)));
    // Phase 1: every read the commands need, before anything is written.
    const reads = await Promise.all(
      entries.map((e) =>
        Promise.all(
          e.entry.c.map(async (c): Promise<Reads> => {
            switch (c.k) {
              case "register":
              case "signup": {
                const [login, nick, existing, loginAsNick, nickAsLogin, loginAsEmail, loginReads, nickReads] = await Promise.all([
                  users.lookup("login", c.login),
                  users.lookup("nick", c.nick),
                  users.get(c.uid),
                  c.names ? users.lookup("nick", c.login) : undefined,
                  c.names ? users.lookup("login", c.nick) : undefined,
                  c.names && c.login.includes("@") ? users.lookup("email", c.login) : undefined,
                  c.reads ? users.nameHolder(c.login) : undefined,
                  c.reads ? users.nameHolder(c.nick) : undefined,
                ]);
                return { login, nick, user: existing, loginAsNick, nickAsLogin, loginAsEmail, loginReads, nickReads };
              }
              case "session": {
                const [user, list] = await Promise.all([users.get(c.uid), sessions.list(c.uid)]);
                return { user, sessions: list };
              }
              case "msg": {
                if (c.attach && this.remoteBlobs && (await this.remoteBlobs.fetch(c.attach.sha)) === "pinned") pinned.push(c.attach.sha);
                const earlier = c.cmid === undefined ? undefined : this.earlierCmid(c.from, c.cmid);
                const sender = users.get(c.from);
                if (c.chid !== undefined) {
                  const [channel, member, members] = await Promise.all([
                    channels.get(c.chid),
                    channels.isMember(c.chid, c.from),
                    membersMove ? channels.members(c.chid) : undefined,
                  ]);
                  return { channel, member, members, actor: await sender, ...(await earlier) };
                }
                const [user, actor, e] = await Promise.all([users.get(c.to as string), sender, earlier]);
                return { user, actor, ...e };
              }
              case "chcreate": {
                const [named, alike, owned, joined, user, found, counts] = await Promise.all([
                  c.priv ? undefined : channels.byName(c.name),
                  // Every one (an older layout may have several): whether the name is free
                  // must not depend on which of them this apply's batch deletes first.
                  !c.priv && c.reads ? channels.readsAlike(c.name, READS_ALIKE_READ) : undefined,
                  channels.ownedCount(c.owner, COUNT_ALL),
                  channels.joinedCount(c.owner, COUNT_ALL),
                  users.get(c.owner),
                  Promise.all(c.members.map((uid) => users.get(uid))),
                  Promise.all(c.members.map((uid) => channels.joinedCount(uid, COUNT_ALL))),
                ]);
                return { chname: named, chreads: alike, owned, joined, user, found, counts };
              }
              case "join": {
                const [channel, member, byMember, user, joined, actor, members] = await Promise.all([
                  channels.get(c.chid),
                  channels.isMember(c.chid, c.uid),
                  c.by === undefined ? false : channels.isMember(c.chid, c.by),
                  users.get(c.uid),
                  channels.joinedCount(c.uid, COUNT_ALL),
                  users.get(c.by ?? c.uid),
                  // The audience of its ev_enter, as for a channel message (membersMove).
                  membersMove ? channels.members(c.chid) : undefined,
                ]);
                return { channel, member, byMember, user, joined, actor, members };
              }
              case "leave": {
                if (c.chid === "*") return { chids: await channels.channelsOf(c.uid) };
                const [channel, member, members] = await Promise.all([
                  channels.get(c.chid),
                  channels.isMember(c.chid, c.uid),
                  membersMove ? channels.members(c.chid) : undefined,
                ]);
                return { channel, member, members };
              }
              case "chdelete": {
                const [channel, members] = await Promise.all([channels.get(c.chid), channels.members(c.chid)]);
                return { channel, members };
              }
              case "logout":
                return { sessions: await sessions.list(c.uid) };
              case "password": {
                const [user, list] = await Promise.all([users.get(c.uid), sessions.list(c.uid)]);
                return { user, sessions: list };
              }
              case "contact": {
                const { contacts } = this.sv;
                const [user, actor, listed, count] = await Promise.all([
                  users.get(c.uid),
                  users.get(c.owner),
                  contacts.has(c.owner, c.uid),
                  // In full (COUNT_ALL): a count cut at the cap, plus the batch's own
                  // changes, gave a verdict that depended on how the log was cut into
                  // apply calls (a removal and an add in one call: admitted; apart: refused).
                  c.add && c.cap !== undefined ? contacts.count(c.owner, COUNT_ALL) : 0,
                ]);
                return { user, actor, listed, count };
              }
              case "profile": {
                const [user, email, phone, emailAsLogin] = await Promise.all([
                  users.get(c.uid),
                  c.email ? users.lookup("email", c.email) : undefined,
                  c.phone ? users.lookup("phone", c.phone) : undefined,
                  c.logins && c.email ? users.lookup("login", c.email) : undefined,
                ]);
                return { user, email, phone, emailAsLogin };
              }
              case "deleteAccount": {
                const user = await users.get(c.uid);
                if (!user || user.hash !== c.checked) return { user };
                const { contacts } = this.sv;
                const [mine, listedBy, list, forget, chids, owned] = await Promise.all([
                  contacts.list(c.uid),
                  contacts.listedBy(c.uid),
                  sessions.list(c.uid),
                  messages.forgetUserOps(c.uid),
                  channels.channelsOf(c.uid),
                  channels.ownedBy(c.uid),
                ]);
                // Its channels: the records, and the members of those it owns (they go,
                // those it has left included).
                const held = new Map<string, HeldChannel>();
                await Promise.all(
                  [...new Set([...chids, ...owned])].map(async (chid) => {
                    const record = await channels.get(chid);
                    held.set(chid, { record, members: record?.owner === c.uid ? await channels.members(chid) : [] });
                  }),
                );
                const removal = [
                  ...users.removeOps(user),
                  ...mine.flatMap((x) => contacts.removeOps(c.uid, x)),
                  ...listedBy.flatMap((owner) => contacts.removeOps(owner, c.uid)),
                  ...list.flatMap((x) => sessions.revokeOps(c.uid, x.hash, x.expires)),
                  ...forget,
                ];
                return { user, removal, chids, ownedChids: owned, held, listedBy };
              }
              case "kick":
                return { sessions: c.revoke ? await sessions.list(c.uid) : [] };
              case "ban":
                return { sessions: c.uid === undefined ? [] : await sessions.list(c.uid) };
              case "unban":
              case "cursors":
              case "registration":
                return {};
              case "sweep":
                return { expired: await sessions.due(c.before, c.limit) };
              case "edit": {
                const [message, actor] = await Promise.all([messages.get(c.mid), users.get(c.by)]);
                if (message?.chid === undefined) return { message, actor };
                const [channel, member] = await Promise.all([channels.get(message.chid), channels.isMember(message.chid, c.by)]);
                return { message, actor, channel, member };
              }
              case "del": {
                const [m, actor] = await Promise.all([messages.get(c.mid), users.get(c.by)]);
                if (!m || m.from !== c.by || !actor) return { message: m, actor };
                // A deleted channel's message waits for its purge: gone already (decide).
                const [channel, member] = m.chid === undefined ? [undefined, undefined] : await Promise.all([channels.get(m.chid), channels.isMember(m.chid, c.by)]);
                if (m.chid !== undefined && !channel) return { message: m };
                const { ops: removal, written } = await messages.removal(m);
                if (m.attach) removal.push(...this.sv.blobs.unrefOps(m.attach.sha, m.mid));
                return { message: m, channel, member, actor, removal, written };
              }
              default:
                throw unknownCommand(c);
            }
          }),
        ),
      ),
    );
    // Phase 2: decide and write, in log order, in one synchronous pass.
    const t = new Turn();
    const mine = this.journal?.origin;
    const outcomes = entries.map((e, i) =>
      e.entry.c.map((c, j) => {
        t.byMe = e.entry.o === mine;
        const out = this.decide(c, reads[i][j], t);
        if (out.k === "sent" && out.event) t.events.push([out.event, out.audience]);
        return out;
      }),
    );
    storage.commitLazy([put(storage.spaces.meta, CLUSTER_POSITION_KEY, position)]);
    await new Promise<void>((resolve, reject) => storage.afterCommit((err) => (err ? reject(err) : resolve())));
    const { overlay, events } = t;
    for (const u of overlay.users.values()) users.saved(u);
    for (const uid of overlay.gone) {
      users.forget(uid);
      router.forgetOffline(uid);
      messages.forgotten(uid);
      // What a chunk wrote between the deletion's reads and its commit.
      this.sv.background.run("removing a deleted account's last entries", () => messages.sweepUser(uid), { uid });
    }
    for (const [a, b] of t.newPairs) messages.peersKnown(a, b);
    for (const report of t.after) report();
    for (const [x, byMe] of t.ended) this.onSessionsEnded?.(x, byMe);
    // Every event, this node's own included, goes out in log order: a connection is sent
    // messages in mid order, which its inbox position relies on (Router.inboxEvent). They
    // go after this turn, so the proposers' replies (resolved now) are sent first.
    if (events.length > 0) setImmediate(() => {
      for (const [ev, audience] of events) router.publish(ev, audience);
    });
    return outcomes;
  }

  /**
   * The sender's earlier message with this cmid as the view holds it, with what decides
   * whether it still counts (cmidHolder): its record and, for a channel's, the channel.
   * A deleted channel's messages and their cmid entries are removed by each node's own
   * purge, on its own schedule, outside the log: whether they are still here differs
   * from node to node, so the verdict must not rest on them.
   */
  private async earlierCmid(from: string, cmid: string): Promise<Pick<Reads, "earlier" | "earlierMessage" | "earlierChannel">> {
    const { messages, channels } = this.sv;
    const earlier = await messages.byCmid(from, cmid);
    if (!earlier) return {};
    const m = await messages.get(earlier[0]);
    const channel = m?.chid === undefined ? undefined : await channels.get(m.chid);
    return { earlier, earlierMessage: m, earlierChannel: channel };
  }

  /**
   * The [mid, time] a cmid names at this point of the log, or undefined when it is free:
   * the message it named is gone when its record is (a delete, written in log order, or
   * a purge, which only follows its channel's deletion) or when its channel was deleted
   * (here or earlier in the log), whether or not this node's purge has reached it yet.
   * Every node, a new one replaying the log included, decides the same.
   */
  private cmidHolder(overlay: Overlay, inSegment: [string, number, string?] | undefined, r: Reads): [string, number] | undefined {
    if (inSegment) {
      // Stored in this segment, in a channel that existed then.
      const [mid, time, chid] = inSegment;
      return chid !== undefined && overlay.channelDeleted(chid) ? undefined : [mid, time];
    }
    if (!r.earlier || !r.earlierMessage) return undefined;
    const chid = r.earlierMessage.chid;
    if (chid !== undefined && !overlay.channel(chid, r.earlierChannel)) return undefined;
    return r.earlier;
  }

  /**
   * An edit's or delete's message as it stands at this point of the log: a deleted
   * channel's message is gone, even while this node's purge has not removed it yet.
   */
  private liveMessage(overlay: Overlay, mid: string, r: Reads): MessageRecord | undefined {
    // Edited or deleted earlier in this call, else as read.
    const m = overlay.messages.has(mid) ? overlay.messages.get(mid) : r.message;
    if (m?.chid === undefined) return m;
    return overlay.channel(m.chid, r.channel) ? m : undefined;
  }

  /**
   * A channel message's author may change it only as a member of its channel (one who
   * left is an outsider: 14, as features/messages.ts's isParty); a direct one, always.
   */
  private authorsChannel(overlay: Overlay, m: MessageRecord, r: Reads): boolean {
    return m.chid === undefined || overlay.member(m.chid, m.from, r.member === true);
  }

  /**
   * Whether `uid`, who a command acts for, still has an account at this point of the
   * log (`r.actor`: its record as read). A request let in before its account's deletion
   * may reach the log after it: nothing is done in a deleted account's name.
   */
  private hasAccount(overlay: Overlay, uid: string, r: Reads): boolean {
    return !overlay.gone.includes(uid) && (overlay.users.get(uid) ?? r.actor) !== undefined;
  }

  private decide(c: Command, r: Reads, t: Turn): Outcome {
    const { storage, users, sessions, messages, channels } = this.sv;
    const { overlay, newPairs, events } = t;
    const end = (x: SessionsEnded) => t.ended.push([x, t.byMe]);
    switch (c.k) {
      case "register":
      case "signup": {
        if (overlay.holder("login", c.login, r.login) !== undefined) return { k: "taken", index: "login" };
        if (overlay.holder("nick", c.nick, r.nick) !== undefined) return { k: "taken", index: "nick" };
        if (c.names && (overlay.holder("nick", c.login, r.loginAsNick) ?? c.uid) !== c.uid) return { k: "taken", index: "login" };
        if (c.names && (overlay.holder("login", c.nick, r.nickAsLogin) ?? c.uid) !== c.uid) return { k: "taken", index: "nick" };
        // A login that is an address may not be another user's email (UserStore.claim).
        if (c.names && c.login.includes("@") && overlay.holder("email", c.login, r.loginAsEmail) !== undefined) return { k: "taken", index: "login" };
        // A name that reads as another account's (nameKey): taken as well.
        if (c.reads && (overlay.readsAs(c.login, r.loginReads) ?? c.uid) !== c.uid) return { k: "taken", index: "login" };
        if (c.reads && (overlay.readsAs(c.nick, r.nickReads) ?? c.uid) !== c.uid) return { k: "taken", index: "nick" };
        if (r.user || overlay.users.has(c.uid)) return { k: "refused", reason: "that account id is in use" };
        if (c.bans && this.banState(overlay, "login", c.login).has) return { k: "refused", reason: BANNED_LOGIN };
        if (c.k === "signup" && (overlay.registration ?? this.sv.registration.logged) === "closed") return { k: "refused", reason: REGISTRATION_CLOSED };
        const user: UserRecord = { uid: c.uid, num: users.nextNum(), login: c.login, nick: c.nick, hash: c.hash, email: "", phone: "", picture: "", status: "", created: c.t };
        const first = c.sid === undefined ? undefined : { hash: c.sid, expires: c.expires ?? 0, issued: c.t * 1000 };
        storage.commitLazy([...users.saveOps(user), ...(first ? sessions.createHashedOps(first.hash, { uid: c.uid, created: c.t, expires: first.expires }, first.issued) : [])]);
        overlay.claim("login", c.login, c.uid);
        overlay.claim("nick", c.nick, c.uid);
        overlay.claimReading(c.login, c.uid);
        overlay.claimReading(c.nick, c.uid);
        overlay.users.set(c.uid, user);
        overlay.sessions.set(c.uid, first ? [first] : []);
        return { k: "registered", user };
      }
      case "session": {
        const user = overlay.users.get(c.uid) ?? r.user;
        if (!user || user.hash !== c.checked) return { k: "refused", reason: "the account or its password changed" };
        // A ban applied before this (its kick could not end a login not yet made) refuses it.
        if (this.banState(overlay, "login", user.login).has) return { k: "refused", reason: BANNED_LOGIN };
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
        if (!this.hasAccount(overlay, c.from, r)) return { k: "error", err: accountGone() };
        // A resend of a stored message gets its mid after its sender left the channel
        // (10 before): PROTOCOL.md "cmid: resending safely" (a deleted channel's message
        // frees its cmid: cmidHolder). No state changes either way, so entries decided
        // before this order are unaffected.
        if (c.cmid !== undefined) {
          const earlier = this.cmidHolder(overlay, overlay.cmids.get(`${c.from}\u0000${c.cmid}`), r);
          if (earlier) return { k: "sent", sent: new MessageSent(earlier[0], earlier[1]), event: undefined, audience: { users: [c.from] } };
        }
        let audience: Audience;
        if (c.chid !== undefined) {
          if (!overlay.channel(c.chid, r.channel)) return { k: "error", err: channelErrors.notFound(c.chid) };
          if (!overlay.member(c.chid, c.from, r.member === true)) return { k: "error", err: channelErrors.notMember(c.chid) };
          // Read when this call changes memberships (see applyPinned): the members now.
          audience = r.members === undefined ? { channel: c.chid, also: c.from } : { users: overlay.membersOf(c.chid, r.members), channel: c.chid };
        } else {
          const to = c.to as string;
          if (!r.user && !overlay.users.has(to)) return { k: "nouser" };
          audience = { users: to === c.from ? [to] : [to, c.from] };
        }
        const m: MessageRecord =
          c.chid !== undefined
            ? { mid: "", chid: c.chid, from: c.from, nick: c.nick, body: c.body, time: c.t }
            : { mid: "", from: c.from, nick: c.nick, body: c.body, time: c.t, to: c.to };
        if (c.cmid !== undefined) m.cmid = c.cmid;
        if (c.attach) m.attach = c.attach;
        const text = messages.append(m);
        if (c.attach) storage.commitLazy(this.sv.blobs.refOps(c.attach.sha, m.mid));
        const pair = c.to === undefined ? undefined : messages.peerOps(c.from, c.to);
        if (pair) {
          storage.commitLazy(pair);
          newPairs.push([c.from, c.to as string]);
        }
        if (c.cmid !== undefined) overlay.cmids.set(`${c.from}\u0000${c.cmid}`, [m.mid, m.time, c.chid]);
        // The record's text is the event's too, unless it holds the cmid (the sender's only).
        const event: MessageEvent = { kind: "message", m, text: c.cmid === undefined ? text : undefined };
        if (c.to !== undefined) event.inbox = c.to;
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
        end({ uid: c.uid, except: c.keep, reason: c.reason ?? "the password was changed", close: true });
        return { k: "done", n: others.length };
      }
      case "contact": {
        if (!this.hasAccount(overlay, c.owner, r)) return { k: "error", err: accountGone() };
        if (c.add && ((!r.user && !overlay.users.has(c.uid)) || overlay.gone.includes(c.uid))) return { k: "nouser" };
        // Decided on the list as the log has it (the proposer checked its own view, which
        // may lag): two devices adding one contact at once get 0 and 1, and adds through
        // several nodes at once stop at the cap. `n`: whether the list changed.
        const listed = overlay.listed(c.owner, c.uid, r.listed === true);
        if (c.add) {
          if (listed) return { k: "error", err: contactErrors.listed() };
          if (c.cap !== undefined && (r.count ?? 0) + overlay.contactDelta(c.owner) >= c.cap) return { k: "error", err: contactErrors.full(c.cap) };
        } else if (!listed) {
          return { k: "done", n: 0 };
        }
        storage.commitLazy(c.add ? this.sv.contacts.addOps(c.owner, c.uid) : this.sv.contacts.removeOps(c.owner, c.uid));
        overlay.setListed(c.owner, c.uid, c.add);
        return { k: "done", n: 1 };
      }
      case "profile": {
        const prev = overlay.gone.includes(c.uid) ? undefined : (overlay.users.get(c.uid) ?? r.user);
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
        if (c.logins && next.email && next.email !== prev.email && (overlay.holder("login", next.email, r.emailAsLogin) ?? c.uid) !== c.uid) {
          return { k: "taken", index: "email" };
        }
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
        // Its messages to itself go too (as on one node: nobody can read them any more).
        const own = directConv(c.uid, c.uid);
        storage.commitLazy([...r.removal, ...messages.purgeMarkOps(own)]);
        t.after.push(() => this.onPurge?.(own));
        // Its channels: those it owns go (nobody could delete them any more); in the
        // others, the remaining members hear that it left.
        for (const chid of new Set([...overlay.channelsOf(c.uid, r.chids ?? []), ...(r.ownedChids ?? [])])) {
          const held = r.held?.get(chid);
          const ch = overlay.channel(chid, held?.record);
          if (!ch) continue;
          if (ch.owner === c.uid) this.removeChannel(ch, overlay.membersOf(chid, held?.members ?? []), t);
          else this.leaveChannel(chid, c.uid, r.user.nick, t);
        }
        overlay.gone.push(c.uid);
        // Those who listed it hear an online account go offline (as on one node): each
        // node tells its own connections; the offline its connections' close makes later
        // is not told again (vanished).
        if (this.sv.router.isOnline(c.uid)) t.events.push([{ kind: "presence", uid: c.uid, online: false }, { users: r.listedBy ?? [] }]);
        this.vanish(c.uid);
        end({ uid: c.uid, reason: c.reason ?? "the account was deleted", close: true, conn: c.conn });
        return { k: "done" };
      }
      case "kick": {
        let n = 0;
        if (c.revoke) n = this.revokeAll(c.uid, r, t);
        end({ uid: c.uid, reason: c.reason, close: true });
        return { k: "done", n };
      }
      case "ban": {
        const { key, has } = this.banState(overlay, c.kind, c.value);
        if (!has && this.sv.bans.size + overlay.banDelta >= MAX_BANS) return { k: "error", err: new ProtocolError(Code.RateLimited, "the ban list is full") };
        const rec = { reason: c.reason, at: c.at };
        storage.commitLazy(this.sv.bans.addOps(c.kind, c.value, rec));
        if (!has) overlay.banDelta++;
        overlay.bans.set(key, true);
        let n = 0;
        if (c.uid !== undefined) {
          n = this.revokeAll(c.uid, r, t);
          end({ uid: c.uid, reason: "the account was banned", close: true });
        }
        const out: Outcome = { k: "done", n };
        t.after.push(() => {
          this.sv.bans.added(c.kind, c.value, rec);
          // Every node closes its connections from the address as it applies the ban,
          // the proposer's included (its count goes back in the outcome): a proposer
          // told 16 (the engine slow to confirm) may still see the ban applied.
          if (c.kind === "addr") out.closed = this.onAddressBanned?.(c.value, c.reason) ?? 0;
        });
        return out;
      }
      case "sweep": {
        const expired = r.expired ?? [];
        storage.commitLazy(sessions.sweepOps(expired));
        const byUser = new Map<string, Set<string>>();
        for (const x of expired) {
          let hashes = byUser.get(x.uid);
          if (!hashes) byUser.set(x.uid, (hashes = new Set()));
          hashes.add(x.hash);
        }
        for (const [uid, hashes] of byUser) {
          const kept = overlay.sessions.get(uid);
          if (kept) overlay.sessions.set(uid, kept.filter((x) => !hashes.has(x.hash)));
          end({ uid, hashes, reason: "the session expired", close: true });
        }
        return { k: "done", n: expired.length };
      }
      case "cursors": {
        const at = c.at;
        t.after.push(() => {
          for (const uid of Object.keys(at)) messages.advance(uid, at[uid], true);
        });
        return { k: "done" };
      }
      case "registration": {
        const open = c.open;
        const v = open ? "open" : "closed";
        overlay.registration = v;
        storage.commitLazy(this.sv.registration.ops(v));
        // Applied during the start-up catch-up, it is an older setting: a --registration
        // of this node's wins over it (features/registration.ts).
        t.after.push(() => (this.caughtUp ? this.sv.registration.applied(v) : this.sv.registration.replayed(v)));
        return { k: "done" };
      }
      case "unban": {
        const { key, has } = this.banState(overlay, c.kind, c.value);
        if (!has) return { k: "done", n: 0 };
        storage.commitLazy(this.sv.bans.removeOps(c.kind, c.value));
        overlay.banDelta--;
        overlay.bans.set(key, false);
        t.after.push(() => this.sv.bans.removed(c.kind, c.value));
        return { k: "done", n: 1 };
      }
      case "edit": {
        if (!this.hasAccount(overlay, c.by, r)) return { k: "error", err: accountGone() };
        const m = this.liveMessage(overlay, c.mid, r);
        if (!m || m.from !== c.by) return { k: "nomsg", forbidden: m !== undefined };
        if (!this.authorsChannel(overlay, m, r)) return { k: "nomsg", forbidden: false };
        const next: MessageRecord = { ...m, body: c.body, edited: c.t };
        storage.commitLazy(messages.updateOps(next));
        overlay.messages.set(c.mid, next);
        events.push([{ kind: "edit", mid: c.mid, body: c.body, edited: c.t, chid: m.chid }, messageAudience(m)]);
        return { k: "edited", edited: c.t };
      }
      case "del": {
        if (!this.hasAccount(overlay, c.by, r)) return { k: "error", err: accountGone() };
        const m = this.liveMessage(overlay, c.mid, r);
        if (!m || m.from !== c.by) return { k: "nomsg", forbidden: m !== undefined };
        if (!this.authorsChannel(overlay, m, r)) return { k: "nomsg", forbidden: false };
        storage.commitLazy(r.removal ?? []);
        if (r.written) t.after.push(r.written);
        overlay.messages.set(c.mid, undefined);
        // Its blob goes once nothing references it (another message may).
        if (m.attach) {
          const sha = m.attach.sha;
          t.after.push(() => this.sv.blobs.collectLater(sha));
        }
        events.push([{ kind: "delete", mid: c.mid, chid: m.chid }, messageAudience(m)]);
        return { k: "done" };
      }
      case "chcreate": {
        const refuse = (err: ProtocolError): Outcome => ({ k: "error", err });
        // Owner "": the server's own channel (a seed door's room), under no user's caps.
        const server = c.owner === "";
        if (!server && (!(overlay.users.get(c.owner) ?? r.user) || overlay.gone.includes(c.owner))) {
          return refuse(new ProtocolError(Code.NeedAuth, "your account was deleted"));
        }
        if (!c.priv && overlay.channelName(c.name, r.chname) !== undefined) return refuse(channelErrors.taken(c.name));
        // A name that reads as a public channel's: taken as well (entries with the flag:
        // not the server's own channel, a seed door's room named by an operator's flag).
        if (!c.priv && c.reads && overlay.channelReads(c.name, r.chreads) !== undefined) return refuse(channelErrors.readsAlike(c.name));
        const found = c.members.map((uid, i) => (overlay.gone.includes(uid) ? undefined : (overlay.users.get(uid) ?? r.found?.[i])));
        const missing = found.findIndex((u) => u === undefined);
        if (missing >= 0) return refuse(channelErrors.noUser(c.members[missing]));
        if (!server && (r.owned ?? 0) + overlay.delta("owned", c.owner) >= c.maxOwned) return refuse(channelErrors.ownedCap(c.maxOwned));
        if (!server && (r.joined ?? 0) + overlay.delta("joined", c.owner) >= c.maxJoined) return refuse(channelErrors.joinedCap(c.maxJoined));
        const maxAdded = c.maxAdded ?? c.maxJoined;
        for (let i = 0; i < c.members.length; i++) {
          const uid = c.members[i];
          if ((r.counts?.[i] ?? 0) + overlay.delta("joined", uid) >= maxAdded) return refuse(channelErrors.addedCap(maxAdded, `user '${uid}'`));
        }
        const ch: ChannelRecord = { chid: channels.nextChid(), name: c.name, descr: c.descr, owner: c.owner, created: c.t };
        if (c.priv) ch.private = true;
        storage.commitLazy([...channels.createOps(ch), ...c.members.flatMap((uid) => channels.joinOps(ch.chid, uid, c.t, c.priv))]);
        overlay.created(ch);
        for (const uid of c.members) overlay.join(ch.chid, uid);
        t.after.push(() => {
          for (const uid of [c.owner, ...c.members]) channels.joined(ch.chid, uid);
        });
        // Each member added hears that they are in (enter lists the others).
        c.members.forEach((uid, i) => events.push([{ kind: "enter", chid: ch.chid, uid, nick: (found[i] as UserRecord).nick }, { users: [uid] }]));
        return { k: "channel", chid: ch.chid };
      }
      case "join": {
        const refuse = (err: ProtocolError): Outcome => ({ k: "error", err });
        // The one entering, or the one inviting: their account must still be there.
        if (!this.hasAccount(overlay, c.by ?? c.uid, r)) return refuse(accountGone());
        const ch = overlay.channel(c.chid, r.channel);
        if (!ch) return refuse(channelErrors.notFound(c.chid));
        const member = overlay.member(c.chid, c.uid, r.member === true);
        if (c.by !== undefined) {
          if (ch.owner !== c.by && !overlay.member(c.chid, c.by, r.byMember === true)) return refuse(channelErrors.notMember(c.chid));
        } else if (ch.private && ch.owner !== c.uid && !member) return refuse(channelErrors.privateChannel(c.chid));
        const user = overlay.gone.includes(c.uid) ? undefined : (overlay.users.get(c.uid) ?? r.user);
        if (!user) return refuse(channelErrors.noUser(c.uid));
        if (member) return { k: "joined", added: false, nick: user.nick };
        if ((r.joined ?? 0) + overlay.delta("joined", c.uid) >= c.cap) {
          return refuse(c.by === undefined ? channelErrors.joinedCap(c.cap) : channelErrors.addedCap(c.cap, `user '${c.uid}'`));
        }
        storage.commitLazy(channels.joinOps(c.chid, c.uid, c.t, ch.private === true));
        overlay.join(c.chid, c.uid);
        t.after.push(() => channels.joined(c.chid, c.uid));
        // Every member hears of a first entry, the one entering included: the members at
        // this point of the log (a leave later in this call does not take them out).
        events.push([{ kind: "enter", chid: c.chid, uid: c.uid, nick: user.nick }, this.audienceNow(overlay, c.chid, r.members)]);
        return { k: "joined", added: true, nick: user.nick };
      }
      case "leave": {
        let chids: string[];
        if (c.chid === "*") chids = overlay.channelsOf(c.uid, r.chids ?? []);
        else {
          if (!overlay.channel(c.chid, r.channel)) return { k: "error", err: channelErrors.notFound(c.chid) };
          if (!overlay.member(c.chid, c.uid, r.member === true)) return { k: "error", err: channelErrors.notMember(c.chid) };
          chids = [c.chid];
        }
        for (const chid of chids) this.leaveChannel(chid, c.uid, c.nick, t, c.chid === "*" ? undefined : r.members);
        return { k: "done" };
      }
      case "chdelete": {
        const ch = overlay.channel(c.chid, r.channel);
        if (!ch) return { k: "error", err: channelErrors.notFound(c.chid) };
        if (ch.owner !== c.by) return { k: "error", err: channelErrors.notOwner() };
        this.removeChannel(ch, overlay.membersOf(c.chid, r.members ?? []), t);
        return { k: "done" };
      }
      default:
        throw unknownCommand(c);
    }
  }

  /** Revokes every session of `uid` (as read, with this segment's changes); how many. */
  private revokeAll(uid: string, r: Reads, t: Turn): number {
    const all = t.overlay.sessions.get(uid) ?? r.sessions ?? [];
    this.sv.storage.commitLazy(all.flatMap((x) => this.sv.sessions.revokeOps(uid, x.hash, x.expires)));
    t.overlay.sessions.set(uid, []);
    return all.length;
  }

  /**
   * `uid` (a member) leaves `chid`; the remaining members hear of it (those at this
   * point of the log when `inView`, the channel's members as read, is given).
   */
  private leaveChannel(chid: string, uid: string, nick: string, t: Turn, inView?: readonly string[]): void {
    const { storage, channels } = this.sv;
    storage.commitLazy(channels.leaveOps(chid, uid));
    t.overlay.leave(chid, uid);
    t.after.push(() => channels.left(chid, uid));
    t.events.push([{ kind: "leave", chid, uid, nick }, this.audienceNow(t.overlay, chid, inView)]);
  }

  /**
   * A channel event's audience: its members at this point of the call when they were
   * read (`inView`, with the call's changes so far), else the channel's members when
   * the event goes out (no membership changes in the call: the same).
   */
  private audienceNow(overlay: Overlay, chid: string, inView: readonly string[] | undefined): Audience {
    return inView === undefined ? { channel: chid } : { users: overlay.membersOf(chid, inView), channel: chid };
  }

  /**
   * Deletes a channel: its record, name and memberships now; its messages after, on
   * each node, as local work (the purge is recorded in the same batch, and a chid is
   * never used again, so no later message can land in it).
   */
  private removeChannel(ch: ChannelRecord, members: string[], t: Turn): void {
    const { storage, channels, messages } = this.sv;
    storage.commitLazy([...channels.removeOps(ch, members), ...messages.purgeMarkOps(channelConv(ch.chid))]);
    t.overlay.removed(ch, members);
    t.after.push(() => {
      channels.removed(ch.chid);
      this.onPurge?.(channelConv(ch.chid));
    });
    // In its place behind the channel's events still waiting for their members (features/channels.ts tell).
    t.events.push([{ kind: "channelDeleted", chid: ch.chid }, { users: members, channel: ch.chid }]);
  }
}

/** A command by an account deleted earlier in the log: 6, as a single node answers it. */
function accountGone(): ProtocolError {
  return new ProtocolError(Code.NeedAuth, "your account was deleted; nothing was changed");
}

/** A command of a newer version: this node cannot follow the log until it is upgraded. */
function unknownCommand(c: never): Error {
  return new Error(`the cluster log holds a command this version does not know (${JSON.stringify((c as { k?: unknown }).k)}): upgrade this node`);
}

/**
 * An entry applied as a segment of its own: it edits or deletes a message, deletes an
 * account or sweeps sessions (their reads must see everything before them written).
 */
function appliedAlone(e: StoredEntry<Command>): boolean {
  return e.entry.c.some(alone);
}

/**
 * A command published in an entry of its own (JetStreamLogOptions.alone), so that its
 * segment holds nothing else: its reads see every command before it written, and no
 * command after it in the same entry (an account's message after its deletion) can
 * slip past what it did.
 */
function alone(c: Command): boolean {
  return c.k === "edit" || c.k === "del" || c.k === "deleteAccount" || c.k === "sweep";
}

function messageAudience(m: MessageRecord): Audience {
  if (m.chid !== undefined) return { channel: m.chid };
  const to = m.to as string;
  return { users: to === m.from ? [to] : [to, m.from] };
}

/**
 * Channels owned and joined are counted in full for a cap (not only up to it): a cap
 * lowered by a reload leaves users above it, and a count cut short would make a
 * verdict depend on how the log was cut into apply calls.
 */
const COUNT_ALL = 1_000_000;

/** A channel of an account being deleted, as read: its record and, if it owns it, its members. */
interface HeldChannel {
  record: ChannelRecord | undefined;
  members: string[];
}

/** Commands that change a channel's members (see applyPinned's membersMove). */
const MEMBERSHIP_KINDS: ReadonlySet<string> = new Set(["chcreate", "join", "leave", "chdelete", "deleteAccount"]);

interface Reads {
  login?: string;
  nick?: string;
  /** register with `names`: who holds its login as a nick, and its nick as a login. */
  loginAsNick?: string;
  nickAsLogin?: string;
  /** register with `names`, a login that is an address: who holds it as an email. */
  loginAsEmail?: string;
  /** register with `reads`: an account whose name reads as its login, as its nick (UserStore.nameHolder). */
  loginReads?: string;
  nickReads?: string;
  email?: string;
  /** profile with `logins`: who holds its email as a login. */
  emailAsLogin?: string;
  phone?: string;
  user?: UserRecord;
  /** The account a command acts for (a message's sender, a contact list's owner, an editor, an inviter). */
  actor?: UserRecord;
  /** contact: whether the owner lists the user, and how many it lists (up to the cap). */
  listed?: boolean;
  count?: number;
  sessions?: StoredSession[];
  earlier?: [string, number];
  /** The record `earlier` names, and its channel (a channel message's). */
  earlierMessage?: MessageRecord;
  earlierChannel?: ChannelRecord;
  message?: MessageRecord;
  removal?: BatchOp[];
  channel?: ChannelRecord;
  /** The command's user is a member of its channel (`byMember`: its inviter is). */
  member?: boolean;
  byMember?: boolean;
  /** A channel name's holder (chid). */
  chname?: string;
  /** The public channels whose names read as the one asked for (ChannelStore.readsAlike). */
  chreads?: string[];
  /** Channels owned and joined (counted in full: COUNT_ALL). */
  owned?: number;
  joined?: number;
  /** createchannel's members: their records and channels joined, in command order. */
  found?: (UserRecord | undefined)[];
  counts?: number[];
  /** A channel's members, or a user's channels. */
  members?: string[];
  chids?: string[];
  /** deleteAccount: the channels the user owns, a member or not. */
  ownedChids?: string[];
  /** deleteAccount: the users listing the account (they hear it go offline). */
  listedBy?: string[];
  held?: Map<string, HeldChannel>;
  expired?: ExpiredSession[];
  /** A message's removal is written: its caches are told (MessageStore.removal). */
  written?: () => void;
}

/** One apply segment's decisions so far: what it changed, and what to do once it is written. */
class Turn {
  readonly overlay = new Overlay();
  readonly events: [Event, Audience][] = [];
  /** Sessions ended, and whether this node proposed the command. */
  readonly ended: [SessionsEnded, boolean][] = [];
  readonly newPairs: [string, string][] = [];
  /** Once written: the caches' reports (ChannelStore.joined, left, removed) and local work. */
  readonly after: (() => void)[] = [];
  /** The command being decided was proposed by this node. */
  byMe = false;
}

/** What the commands of one apply call have done so far (see the top of the file). */
class Overlay {
  /** Unique values claimed (→ uid) or released (→ "") so far in this call. */
  private readonly names = new Map<string, string>();
  readonly users = new Map<string, UserRecord>();
  readonly sessions = new Map<string, StoredSession[]>();
  /** (sender, cmid) → [mid, time, chid of a channel message] stored in this segment. */
  readonly cmids = new Map<string, [string, number, string?]>();
  /** Accounts deleted in this segment (their caches go once it is written). */
  readonly gone: string[] = [];
  /** Messages edited (the new record) or deleted (undefined) in this call. */
  readonly messages = new Map<string, MessageRecord | undefined>();
  /** Bans added (true) or lifted (false) in this call, by ban key; and the list's change in size. */
  readonly bans = new Map<string, boolean>();
  banDelta = 0;
  /** The log's registration setting as set in this call, if it was. */
  registration: "open" | "closed" | undefined;
  /** Contact entries added (true) or removed (false) in this call, `owner\0uid`; each owner's change in count. */
  private readonly contacts = new Map<string, boolean>();
  private readonly contactCounts = new Map<string, number>();

  listed(owner: string, uid: string, inView: boolean): boolean {
    return this.contacts.get(`${owner}\u0000${uid}`) ?? inView;
  }

  setListed(owner: string, uid: string, listed: boolean): void {
    this.contacts.set(`${owner}\u0000${uid}`, listed);
    this.contactCounts.set(owner, this.contactDelta(owner) + (listed ? 1 : -1));
  }

  contactDelta(owner: string): number {
    return this.contactCounts.get(owner) ?? 0;
  }

  claim(index: UniqueIndex, value: string, uid: string): void {
    this.names.set(`${index}:${indexKey(index, value)}`, uid);
  }

  release(index: UniqueIndex, value: string): void {
    if (value) this.names.set(`${index}:${indexKey(index, value)}`, "");
  }

  /** `uid`'s name `value` as it reads (nameKey), claimed in this call (never released in it: see readsAs). */
  claimReading(value: string, uid: string): void {
    this.names.set(`reads:${nameKey(value)}`, uid);
  }

  /**
   * An account whose login or nick reads as `value`, after this call's commands so far;
   * `inView`: the view's (UserStore.nameHolder). A deletion in this call does not free
   * it here (several accounts of an older layout may share a key): a name freed and
   * taken again in one call is refused, as if the two had come in separate calls the
   * other way round.
   */
  readsAs(value: string, inView: string | undefined): string | undefined {
    return this.names.get(`reads:${nameKey(value)}`) ?? inView;
  }

  /** Who holds `value` after this call's commands so far; `inView`: its holder in the view. */
  holder(index: UniqueIndex, value: string, inView: string | undefined): string | undefined {
    const h = this.names.get(`${index}:${indexKey(index, value)}`);
    if (h === undefined) return inView;
    return h === "" ? undefined : h;
  }

  /** Channels created (→ record) or deleted (→ undefined) in this call. */
  private readonly channels = new Map<string, ChannelRecord | undefined>();
  /** Memberships changed in this call: `chid\0uid` → member. */
  private readonly memberships = new Map<string, boolean>();
  /** Channels owned and joined, per user, since the view: `owned:uid` / `joined:uid` → change. */
  private readonly counts = new Map<string, number>();

  channel(chid: string, inView: ChannelRecord | undefined): ChannelRecord | undefined {
    return this.channels.has(chid) ? this.channels.get(chid) : inView;
  }

  /** Whether `chid` was deleted in this call. */
  channelDeleted(chid: string): boolean {
    return this.channels.has(chid) && this.channels.get(chid) === undefined;
  }

  /**
   * A public channel whose name reads as `name` (nameKey), or undefined: one created in
   * this call, else one of the view's (`inView`, read before the call) not deleted in
   * it. The same answer whether the commands before it were applied in this call or in
   * earlier ones, as every node must give it.
   */
  channelReads(name: string, inView: readonly string[] = []): string | undefined {
    const h = this.names.get(`chreads:${nameKey(name)}`);
    if (h !== undefined) return h;
    return inView.find((chid) => !this.channelDeleted(chid));
  }

  /** The chid holding public channel name `name`, or undefined. */
  channelName(name: string, inView: string | undefined): string | undefined {
    const h = this.names.get(`chname:${name.toLowerCase()}`);
    if (h === undefined) return inView;
    return h === "" ? undefined : h;
  }

  member(chid: string, uid: string, inView: boolean): boolean {
    return this.memberships.get(`${chid}\u0000${uid}`) ?? inView;
  }

  delta(kind: "owned" | "joined", uid: string): number {
    return this.counts.get(`${kind}:${uid}`) ?? 0;
  }

  /** `inView` (a channel's members in the view) with this call's changes, in uid order. */
  membersOf(chid: string, inView: readonly string[]): string[] {
    return this.withChanges(inView, 0, chid);
  }

  /** `inView` (a user's channels in the view) with this call's changes, in chid order. */
  channelsOf(uid: string, inView: readonly string[]): string[] {
    return this.withChanges(inView, 1, uid);
  }

  /**
   * `inView` with this call's membership changes whose `chid\0uid` key has `fixed` at
   * `side` (0: the chid, 1: the uid); the other side is what is added or removed.
   */
  private withChanges(inView: readonly string[], side: 0 | 1, fixed: string): string[] {
    const all = new Set(inView);
    for (const [key, on] of this.memberships) {
      const parts = key.split("\u0000");
      if (parts[side] !== fixed) continue;
      const other = parts[1 - side];
      if (on) all.add(other);
      else all.delete(other);
    }
    return [...all].sort();
  }

  /** `uid` joined `chid` (they were not a member). */
  join(chid: string, uid: string): void {
    this.memberships.set(`${chid}\u0000${uid}`, true);
    this.count("joined", uid, 1);
  }

  /** `uid` left `chid` (they were a member). */
  leave(chid: string, uid: string): void {
    this.memberships.set(`${chid}\u0000${uid}`, false);
    this.count("joined", uid, -1);
  }

  created(c: ChannelRecord): void {
    this.channels.set(c.chid, c);
    if (!c.private) {
      this.names.set(`chname:${c.name.toLowerCase()}`, c.chid);
      this.names.set(`chreads:${nameKey(c.name)}`, c.chid);
    }
    this.count("owned", c.owner, 1);
    this.join(c.chid, c.owner);
  }

  /** `c` was deleted; `members`: its members then. */
  removed(c: ChannelRecord, members: readonly string[]): void {
    this.channels.set(c.chid, undefined);
    if (!c.private) {
      this.names.set(`chname:${c.name.toLowerCase()}`, "");
      // Back to the view (and channelDeleted): another channel may read the same.
      const reads = `chreads:${nameKey(c.name)}`;
      if (this.names.get(reads) === c.chid) this.names.delete(reads);
    }
    this.count("owned", c.owner, -1);
    for (const uid of members) this.leave(c.chid, uid);
  }

  private count(kind: "owned" | "joined", uid: string, by: number): void {
    this.counts.set(`${kind}:${uid}`, this.delta(kind, uid) + by);
  }
}
