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
// node held for its sender rather than adding to it.

import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { listenForNotes } from "./notes.js";
import type { Logger } from "pino";

const HEARTBEAT_MS = 2_000;
const EXPIRE_MS = 3 * HEARTBEAT_MS + 500;
/** uids per snapshot message (well under NATS's 1 MiB payload). */
const PAGE = 5_000;

type Note =
  | { o: string; u: string; on: boolean }
  | { o: string; hb: true }
  | { o: string; hello: true }
  /** A page of a node's whole list; `snap` names the list, `last` marks its last page (a node of an older version sends neither: pages add). */
  | { o: string; all: string[]; snap?: string; last?: boolean };

interface Node {
  seen: number;
  users: Set<string>;
  /** The whole list being received: its name and the users of its pages so far. */
  snapshot?: { id: string; users: Set<string> };
}

export class ClusterPresence {
  /** Other nodes' online users: uid → the origins that have them. */
  private readonly remote = new Map<string, Set<string>>();
  private readonly byOrigin = new Map<string, Node>();
  private snapshots = 0;
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
      this.send({ o: this.origin, hb: true });
      this.expire();
    }, HEARTBEAT_MS);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.sub?.unsubscribe();
  }

  /** Whether another node has a connection of `uid`. */
  has(uid: string): boolean {
    return this.remote.has(uid);
  }

  /** Other nodes' online users (a live view). */
  get users(): ReadonlyMap<string, unknown> {
    return this.remote;
  }

  /** This node's first connection of `uid` (true) or its last one gone (false). */
  local(uid: string, online: boolean): void {
    this.send({ o: this.origin, u: uid, on: online });
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

  /** This node's whole list, in pages; the last one says so. */
  private sendAll(): void {
    const all = [...this.localUsers()];
    const snap = `${++this.snapshots}`;
    for (let i = 0; i < all.length || i === 0; i += PAGE) this.send({ o: this.origin, all: all.slice(i, i + PAGE), snap, last: i + PAGE >= all.length });
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
    } else if ("all" in note) {
      for (const uid of note.all) this.set(note.o, node.users, uid, true);
      if (note.snap === undefined) return;
      if (node.snapshot?.id !== note.snap) node.snapshot = { id: note.snap, users: new Set() };
      for (const uid of note.all) node.snapshot.users.add(uid);
      if (!note.last) return;
      // The whole list: whoever it lacks went offline there while a note was lost.
      const listed = node.snapshot.users;
      node.snapshot = undefined;
      for (const uid of [...node.users]) if (!listed.has(uid)) this.set(note.o, node.users, uid, false);
    } else if ("u" in note) {
      this.set(note.o, node.users, note.u, note.on);
    }
  }

  private node(origin: string): Node {
    let node = this.byOrigin.get(origin);
    if (!node) {
      this.byOrigin.set(origin, (node = { seen: 0, users: new Set() }));
      // A node heard of for the first time (it started, or this one did): its list.
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
