// Who is online across the cluster's nodes, over core NATS (not stored: presence is
// what is true now, and a node that starts asks the others).
//
// Each node announces its own users' transitions (first connection, last one gone) on
// `<stream>.presence`, a heartbeat every HEARTBEAT_MS, and its whole list when a node
// says hello (in pages). A node silent for EXPIRE_MS (killed) loses its users. A user
// is online when any node has a connection of theirs; `onChange` hears the cluster-wide
// transitions, on every node, so each sends ev_presence to its own connections.
//
// Core NATS does not replay: a note sent while a node was cut off from NATS (shorter
// than EXPIRE_MS, so nobody expired anybody) is lost for good, and the two views
// stayed apart until the user's next transition. So a node that reconnects says hello
// and sends its own whole list, and a whole list (its last page) replaces what this
// node held for its sender rather than adding to it. A note can also be lost while
// both nodes stay connected (a route between two NATS servers cut for a moment): each
// transition carries its sender's count of transitions (`s`), and so do its heartbeats
// and lists; a node that sees a count it skipped asks that node alone for its whole
// list (`want`), at most once a heartbeat, and so does one that receives a list with a
// page missing (`n`: the pages a list has, on its last page).

import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { listenForNotes } from "./notes.js";
import type { Logger } from "pino";

const HEARTBEAT_MS = 2_000;
const EXPIRE_MS = 3 * HEARTBEAT_MS + 500;
/** uids per snapshot message (well under NATS's 1 MiB payload). */
const PAGE = 5_000;

type Note =
  | { o: string; u: string; on: boolean; s?: number }
  | { o: string; hb: true; s?: number }
  | { o: string; hello: true }
  /** Asks node `want` alone for its whole list (a note of its was lost). */
  | { o: string; want: string }
  /**
   * A page of a node's whole list; `snap` names the list, `last` marks its last page,
   * which also says how many pages it has (`n`) and the sender's count of transitions
   * the list is as of (`s`). A node of an older version sends none of them: pages add.
   */
  | { o: string; all: string[]; snap?: string; last?: boolean; n?: number; s?: number };

interface Node {
  seen: number;
  users: Set<string>;
  /** The whole list being received: its name, the users of its pages so far, and how many pages. */
  snapshot?: { id: string; users: Set<string>; pages: number };
  /** The count of its transitions this node's view of it is as of (undefined: not known yet, or an older version). */
  seq?: number;
  /** When its whole list was last asked for (one `want` a heartbeat at most). */
  wanted?: number;
  /** A note of its was lost and no whole list has come since: asked for at every heartbeat until one does. */
  stale?: boolean;
}

export class ClusterPresence {
  /** Other nodes' online users: uid → the origins that have them. */
  private readonly remote = new Map<string, Set<string>>();
  private readonly byOrigin = new Map<string, Node>();
  private snapshots = 0;
  /** This node's transitions announced so far (each note's `s`). */
  private transitions = 0;
  /** When this node last sent its whole list, and a later one waiting (one a heartbeat at most: every list reaches every node). */
  private listedAt = 0;
  private listTimer: NodeJS.Timeout | undefined;
  private sub: Subscription | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly nc: NatsConnection,
    private readonly subject: string,
    private readonly origin: string,
    /** This node's users online (the router's). */
    private readonly localHas: (uid: string) => boolean,
    private readonly localUsers: () => Iterable<string>,
    private readonly onChange: (uid: string, online: boolean) => void,
    private readonly log: Logger,
  ) {}

  start(): void {
    this.sub = listenForNotes<Note>(
      this.nc,
      this.subject,
      { unreadable: "a presence note could not be read", stopped: "presence notes from other nodes stopped" },
      this.log,
      (note) => this.receive(note),
    );
    this.send({ o: this.origin, hello: true });
    void this.watchReconnects();
    this.timer = setInterval(() => {
      this.send({ o: this.origin, hb: true, s: this.transitions });
      this.expire();
    }, HEARTBEAT_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.listTimer) clearTimeout(this.listTimer);
    this.sub?.unsubscribe();
  }

  /** Whether another node has a connection of `uid`. */
  has(uid: string): boolean {
    return this.remote.has(uid);
  }

  /** Other nodes' online users, each with the nodes that have them (a live view). */
  get users(): ReadonlyMap<string, ReadonlySet<string>> {
    return this.remote;
  }

  /** This node's first connection of `uid` (true) or its last one gone (false). */
  local(uid: string, online: boolean): void {
    this.send({ o: this.origin, u: uid, on: online, s: ++this.transitions });
    if (!this.remote.has(uid)) this.onChange(uid, online);
  }

  /** After a reconnect: the others' lists again, and this node's own (see the top). */
  private async watchReconnects(): Promise<void> {
    try {
      for await (const status of this.nc.status()) {
        if (status.type !== "reconnect") continue;
        this.send({ o: this.origin, hello: true });
        this.sendAll();
      }
    } catch (err) {
      this.log.warn({ err }, "presence stopped watching the connection to NATS; a reconnect will not resend the lists");
    }
  }

  /**
   * This node's whole list, now or, when one went out less than a heartbeat ago, once
   * that heartbeat is over (the nodes that each ask for it after one lost note get one).
   */
  private sendAll(): void {
    if (this.listTimer) return;
    const wait = this.listedAt + HEARTBEAT_MS - Date.now();
    if (wait <= 0) return this.sendAllNow();
    this.listTimer = setTimeout(() => {
      this.listTimer = undefined;
      this.sendAllNow();
    }, wait);
    this.listTimer.unref();
  }

  /** This node's whole list, in pages; the last one says so. */
  private sendAllNow(): void {
    this.listedAt = Date.now();
    const all = [...this.localUsers()];
    const snap = `${++this.snapshots}`;
    const pages = Math.max(1, Math.ceil(all.length / PAGE));
    for (let i = 0; i < pages; i++) {
      const page: Note = { o: this.origin, all: all.slice(i * PAGE, (i + 1) * PAGE), snap };
      if (i === pages - 1) Object.assign(page, { last: true, n: pages, s: this.transitions });
      this.send(page);
    }
  }

  private send(note: Note): void {
    try {
      this.nc.publish(this.subject, JSON.stringify(note));
    } catch (err) {
      // Disconnected: the next hello or snapshot after the reconnect puts it right.
      this.log.debug({ err }, "presence note not sent");
    }
  }

  private receive(note: Note): void {
    if (note.o === this.origin) return;
    const node = this.node(note.o);
    if ("hello" in note) {
      this.sendAll();
    } else if ("want" in note) {
      if (note.want === this.origin) this.sendAll();
    } else if ("all" in note) {
      for (const uid of note.all) this.set(note.o, node.users, uid, true);
      if (note.snap === undefined) return;
      if (node.snapshot?.id !== note.snap) node.snapshot = { id: note.snap, users: new Set(), pages: 0 };
      node.snapshot.pages++;
      for (const uid of note.all) node.snapshot.users.add(uid);
      if (!note.last) return;
      const { users: listed, pages } = node.snapshot;
      node.snapshot = undefined;
      // A page of it lost: who it lacks may be on that page. Asked for again.
      if (note.n !== undefined && pages !== note.n) return this.want(note.o, node);
      // The whole list: whoever it lacks went offline there while a note was lost.
      for (const uid of [...node.users]) if (!listed.has(uid)) this.set(note.o, node.users, uid, false);
      if (note.s !== undefined) node.seq = note.s;
      node.stale = false;
    } else if ("u" in note) {
      this.set(note.o, node.users, note.u, note.on);
      if (note.s === undefined) return;
      if (node.seq !== undefined && note.s !== node.seq + 1) this.want(note.o, node);
      node.seq = note.s;
    } else if ("hb" in note && (node.stale || (note.s !== undefined && note.s !== node.seq))) {
      // A transition of its not heard (or its list never came, or was cut): its whole list.
      this.want(note.o, node);
    }
  }

  /** Asks `origin` for its whole list, once a heartbeat at most. */
  private want(origin: string, node: Node): void {
    node.stale = true;
    const now = Date.now();
    if (node.wanted !== undefined && now - node.wanted < HEARTBEAT_MS) return;
    node.wanted = now;
    this.log.info({ node: origin }, "a presence note of another node was lost; asking for its list");
    this.send({ o: this.origin, want: origin });
  }

  private node(origin: string): Node {
    let node = this.byOrigin.get(origin);
    if (!node) {
      // A node heard of for the first time (it started, or this one did): its list
      // (asked of everyone: as good as a `want` of it).
      this.byOrigin.set(origin, (node = { seen: 0, users: new Set(), wanted: Date.now() }));
      this.send({ o: this.origin, hello: true });
    }
    node.seen = Date.now();
    return node;
  }

  private set(origin: string, users: Set<string>, uid: string, online: boolean): void {
    const before = this.localHas(uid) || this.remote.has(uid);
    let origins = this.remote.get(uid);
    if (online) {
      users.add(uid);
      if (!origins) this.remote.set(uid, (origins = new Set()));
      origins.add(origin);
    } else {
      users.delete(uid);
      origins?.delete(origin);
      if (origins?.size === 0) this.remote.delete(uid);
    }
    const after = this.localHas(uid) || this.remote.has(uid);
    if (before !== after) this.onChange(uid, after);
  }

  /** Nodes not heard from for EXPIRE_MS (killed) lose their users. */
  private expire(): void {
    const now = Date.now();
    for (const [origin, node] of this.byOrigin) {
      if (now - node.seen < EXPIRE_MS) continue;
      this.byOrigin.delete(origin);
      this.log.warn({ node: origin, users: node.users.size }, "a cluster node went silent; its users are offline");
      for (const uid of [...node.users]) this.set(origin, node.users, uid, false);
    }
  }
}
