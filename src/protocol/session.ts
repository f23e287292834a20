// Per-connection protocol state (who is logged in on it) and the hub that finds every
// live connection of a user. Transport provides the Peer; features see Sessions.

import type { Logger } from "pino";

/** An attachment stored in the blob store, as handed to a handler. */
export interface StoredAttachment {
  sha: string;
  size: number;
}

/**
 * The text of an attachment streaming in while its frame is scanned (the transport
 * feeds it; the storage layer's BlobWriter is one).
 */
export interface UploadSink {
  write(text: Buffer): void;
  /** The string held something that cannot be base64. */
  invalid(): void;
  /** The frame was broken or the connection closed: nothing of it stays. */
  abort(): void;
}

/** An upload the dispatcher completes before the handler runs, and releases after. */
export interface Upload extends UploadSink {
  finish(): Promise<StoredAttachment>;
  release(): void;
}

/**
 * A frame sent in parts, some of them produced while it is written (the base64 of an
 * attachment read from disk), so that it never sits whole in memory.
 */
export interface StreamedFrame {
  parts: (string | (() => AsyncIterable<string>))[];
}

export type OutFrame = string | StreamedFrame;

/** What the protocol layer may do with a connection. Implemented by the transport. */
export interface Peer {
  readonly id: number;
  /** The client's IP address and port, for logs. */
  readonly remote: string;
  /** The client's IP address alone. */
  readonly address: string;
  /**
   * Queues a frame. `onFlushed(true)` once it is handed to the OS (for pacing), false
   * if it never is. `onConfirmed(true)` once it is safe to call it delivered: enough
   * later traffic has gone out that the client must have read past it, it has aged
   * on a live connection with nothing left to write, or the client closed cleanly;
   * false if the connection died (or was closed by the server) before that.
   */
  send(frame: OutFrame, onFlushed?: (ok: boolean) => void, onConfirmed?: (ok: boolean) => void): void;
  /**
   * More is waiting to go out than a producer should add to (a quarter of the
   * outbound cap): producers that can wait (the offline queue) pause until it flushes.
   */
  readonly congested: boolean;
  /** Flushes what is queued, then closes. */
  end(): void;
  /** Stops or resumes reading requests (`why` names the reason; all must clear). */
  pause(why: string): void;
  resume(why: string): void;
  readonly closed: boolean;
}

type Held = [frame: OutFrame, onFlushed: ((ok: boolean) => void) | undefined, tag: string | undefined];

export class Session {
  uid: string | undefined;
  sid: string | undefined;
  nick: string | undefined;
  /** While the offline queue is being sent, live events wait here to keep order. */
  private held: Held[] | null = null;

  constructor(
    readonly peer: Peer,
    private readonly rootLog: Logger,
  ) {}

  /**
   * Child logger with the connection's remote address and uid. Built when something is
   * logged rather than kept, so 10,000 quiet connections carry no logger each.
   */
  get log(): Logger {
    return this.rootLog.child({ conn: this.peer.id, remote: this.peer.remote, uid: this.uid });
  }

  login(uid: string, sid: string, nick: string): void {
    this.uid = uid;
    this.sid = sid;
    this.nick = nick;
  }

  logout(): void {
    this.uid = this.sid = this.nick = undefined;
  }

  send(frame: OutFrame, onFlushed?: (ok: boolean) => void, onConfirmed?: (ok: boolean) => void): void {
    this.peer.send(frame, onFlushed, onConfirmed);
  }

  /**
   * An event for this connection; held back while the offline queue drains. `tag`
   * names what it carries (a message id) so the drain can drop what it already sent.
   */
  deliver(frame: OutFrame, onConfirmed?: (ok: boolean) => void, tag?: string): void {
    if (this.held) this.held.push([frame, onConfirmed, tag]);
    else this.peer.send(frame, undefined, onConfirmed);
  }

  holdEvents(): void {
    this.held ??= [];
  }

  /** Sends the held events, skipping those whose tag is in `sent`. */
  releaseEvents(sent: ReadonlySet<string>): void {
    const held = this.held;
    this.held = null;
    if (!held) return;
    for (const [f, cb, tag] of held) {
      // Already sent by the drain, which confirms its own copy.
      if (tag === undefined || !sent.has(tag)) this.peer.send(f, undefined, cb);
    }
  }
}

export class Hub {
  private readonly users = new Map<string, Set<Session>>();

  /** Returns true when this is the user's first live connection. */
  attach(s: Session): boolean {
    const uid = s.uid as string;
    let set = this.users.get(uid);
    const first = !set;
    if (!set) this.users.set(uid, (set = new Set()));
    set.add(s);
    return first;
  }

  /** Returns true when that was the user's last live connection. */
  detach(s: Session, uid: string | undefined = s.uid): boolean {
    if (uid === undefined) return false;
    const set = this.users.get(uid);
    if (!set || !set.delete(s)) return false;
    if (set.size > 0) return false;
    this.users.delete(uid);
    return true;
  }

  isOnline(uid: string): boolean {
    return this.users.has(uid);
  }

  sessions(uid: string): ReadonlySet<Session> {
    return this.users.get(uid) ?? EMPTY;
  }

  /**
   * Sends an event to every connection of `uid`. `onDelivered` runs once, when the
   * first of them confirms delivery (see Peer.send). Returns the number of connections.
   */
  deliver(uid: string, frame: OutFrame, onDelivered?: () => void, tag?: string): number {
    const set = this.users.get(uid);
    if (!set) return 0;
    let done = false;
    const cb = onDelivered
      ? (ok: boolean) => {
          if (ok && !done) {
            done = true;
            onDelivered();
          }
        }
      : undefined;
    for (const s of set) s.deliver(frame, cb, tag);
    return set.size;
  }
}

const EMPTY: ReadonlySet<Session> = new Set();
