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
// One apply call is one LevelDB batch, written with the log position it reaches: a
// node that stops resumes from a position its view really has. All reads an apply
// needs are made first (phase 1); then every command is decided and written in one
// synchronous pass (phase 2), so no batch can be flushed half-way. Commands within
// one call see each other's effects through a small overlay (the names claimed, the
// sessions issued and the cmids taken so far in the call).
//
// What cluster mode serves so far: register, auth (password and sid), direct messages
// (with cmid), and the read-only actions; every other action answers 16 (see
// ActionSpec.cluster). Presence, channels, attachments, logout and account changes
// come next (issue 12).

import type { Logger } from "pino";
import { EMPTY_VIEW, JetStreamLog, type StoredEntry, type ViewPosition } from "../cluster/jetstream-log.js";
import { MessageSent } from "../protocol/codec.js";
import type { Event, Audience, MessageEvent } from "../protocol/events.js";
import type { MessageRecord, UserRecord } from "../storage/layout.js";
import { put } from "../storage/db.js";
import { indexKey } from "../storage/users.js";
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
  | { k: "msg"; t: number; from: string; nick: string; to: string; body: string; cmid?: string };

export type Outcome =
  | { k: "registered"; user: UserRecord }
  | { k: "taken"; index: "login" | "nick" }
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

export class Cluster {
  private journal: JetStreamLog<Command, Outcome> | undefined;
  /** Sessions of a user ended by an apply (evicted past the cap): the accounts feature ends their connections here. */
  onSessionsEnded: ((uid: string, hashes: ReadonlySet<string>) => void) | undefined;

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
  }

  async close(): Promise<void> {
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

  private async apply(entries: StoredEntry<Command>[], position: ViewPosition): Promise<Outcome[][]> {
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
            }
          }),
        ),
      ),
    );
    // Phase 2: decide and write, in log order, in one synchronous pass.
    const overlay = new Overlay();
    const events: [Event, Audience][] = [];
    const ended: [string, Set<string>][] = [];
    const newPairs: [string, string][] = [];
    const outcomes = entries.map((e, i) =>
      e.entry.c.map((c, j) => {
        const r = reads[i][j];
        const out = this.decide(c, r, overlay, ended, newPairs);
        if (out.k === "sent" && out.event) events.push([out.event, out.audience]);
        return out;
      }),
    );
    storage.commitLazy([put(storage.spaces.meta, POSITION_KEY, position)]);
    await new Promise<void>((resolve, reject) => storage.afterCommit((err) => (err ? reject(err) : resolve())));
    for (const u of overlay.users.values()) users.saved(u);
    for (const [a, b] of newPairs) messages.peersKnown(a, b);
    for (const [uid, hashes] of ended) this.onSessionsEnded?.(uid, hashes);
    // Every event, this node's own included, goes out in log order: a connection is sent
    // messages in mid order, which its inbox position relies on (Router.inboxEvent). They
    // go after this turn, so the proposers' replies (resolved now) are sent first.
    if (events.length > 0) setImmediate(() => {
      for (const [ev, audience] of events) router.publish(ev, audience);
    });
    return outcomes;
  }

  private decide(c: Command, r: Reads, overlay: Overlay, ended: [string, Set<string>][], newPairs: [string, string][]): Outcome {
    const { storage, users, sessions, messages } = this.sv;
    switch (c.k) {
      case "register": {
        if ((r.login !== undefined || overlay.claimed("login", c.login)) ) return { k: "taken", index: "login" };
        if (r.nick !== undefined || overlay.claimed("nick", c.nick)) return { k: "taken", index: "nick" };
        if (r.user || overlay.users.has(c.uid)) return { k: "refused", reason: "that account id is in use" };
        const user: UserRecord = { uid: c.uid, num: users.nextNum(), login: c.login, nick: c.nick, hash: c.hash, email: "", phone: "", picture: "", status: "", created: c.t };
        storage.commitLazy([...users.saveOps(user), ...sessions.createHashedOps(c.sid, { uid: c.uid, created: c.t, expires: c.expires }, c.t * 1000)]);
        overlay.claim("login", c.login);
        overlay.claim("nick", c.nick);
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
        if (evicted.size > 0) ended.push([c.uid, evicted]);
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
    }
  }
}

interface Reads {
  login?: string;
  nick?: string;
  user?: UserRecord;
  sessions?: StoredSession[];
  earlier?: [string, number];
}

/** What the commands of one apply call have done so far (see the top of the file). */
class Overlay {
  private readonly names = new Set<string>();
  readonly users = new Map<string, UserRecord>();
  readonly sessions = new Map<string, StoredSession[]>();
  readonly cmids = new Map<string, [string, number]>();

  claim(index: "login" | "nick", value: string): void {
    this.names.add(`${index}:${indexKey(index, value)}`);
  }

  claimed(index: "login" | "nick", value: string): boolean {
    return this.names.has(`${index}:${indexKey(index, value)}`);
  }
}
