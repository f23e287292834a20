// Per-connection protocol state: who is logged in on it, the codec it speaks, and the
// delivery state the router keeps for it. Transport provides the Peer; features see
// Sessions.

import type { Logger } from "pino";
import type { Codec } from "./codec.js";
import type { OutFrame } from "./frames.js";

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
  /**
   * As release(), when the request's outcome is not known (its write failed, and a
   * failed write may still be on disk: LevelDB says a batch whose sync failed "may or
   * may not show up when the DB is re-opened"): a stored blob is kept, not deleted (the
   * start-up sweep deletes it if no message references it).
   */
  keep(): void;
}

let lastPeerId = 0;

/** A new Peer id: unique among every transport's connections (logs, /connz). */
export function newPeerId(): number {
  return ++lastPeerId;
}

/** What the protocol layer may do with a connection. Implemented by the transport. */
export interface Peer {
  readonly id: number;
  /** The client's IP address and port, for logs. */
  readonly remote: string;
  /** The client's IP address alone. */
  readonly address: string;
  /**
   * Queues a frame. An event (`event` true) counts against the outbound cap and
   * closes a connection that is over it (a slow reader); a reply never does: the
   * dispatcher produces replies only while the connection is not congested. A
   * non-zero `confirm` (an inbox seq) is reported back (to the router, through the
   * transport) once so much has been handed to the OS after the frame that the client
   * must have read it.
   */
  send(frame: OutFrame, event: boolean, confirm?: number): void;
  /** Drops confirmations not yet due: they belong to a user no longer logged in here. */
  forgetConfirmations(): void;
  /** More is waiting to go out than a producer should add to. */
  readonly congested: boolean;
  /** Resolves when the connection is no longer congested: true, or false if it closed. */
  drained(): Promise<boolean>;
  /** Flushes what is queued, then closes. */
  end(): void;
  /** Stops or resumes reading requests (`why` names the reason; all must clear). */
  pause(why: string): void;
  resume(why: string): void;
  readonly closed: boolean;
  /**
   * A session for one HTTP request (a door's route), not a connection: it logs in
   * without taking one of --max-connections-per-user, is never in the router (no
   * presence, no events, no inbox sync) and ends with its request.
   */
  readonly fleeting?: boolean;
  /**
   * Its login's session is logged out when its request ends (the HTTP/WS chat door's
   * routes): at --max-sessions-per-user it ends no other session (a device's, for a
   * route whose change may then be refused), and it is past the cap only while its
   * request runs.
   */
  readonly sessionEndsWithRequest?: boolean;
}

export class Session {
  uid: string | undefined;
  sid: string | undefined;
  nick: string | undefined;
  /** JSON.stringify(nick), made once at login (message records carry it). */
  nickJson: string | undefined;
  /** When the session expires (unix s): the expiry sweep logs the connection out then. */
  expires = 0;
  /** The client acknowledges inbox events (hello {ack: true}). */
  acks = false;

  // Delivery state, owned by the router (protocol/router.ts).
  /** The post-auth sync is sending the inbox: live inbox events wait for it. */
  syncing = false;
  /** A live inbox event arrived during the sync: read again before going live. */
  syncDirty = false;
  /** Edits and deletes sent live during the sync: a read of records they overtook is read again. */
  syncChanges = 0;
  /**
   * Where this connection's inbox stands (in order, without gaps): the highest seq sent
   * on it, or the `since` its auth gave.
   */
  lastInbox = 0;
  /** Highest inbox seq actually sent on this connection: what an `ack` can confirm. */
  sentInbox = 0;
  /** The user whose inbox lastInbox and sentInbox count (kept across a logout). */
  private inboxOf: string | undefined;
  /** Bumped at every login and logout: a sync started for an earlier one stops. */
  generation = 0;
  /** The dispatcher's request line for this connection. */
  line: unknown;
  /**
   * The recipient of this connection's last direct message, as the frame named it and
   * as its account names it, while the account store's generation is `sentToGen`
   * (features/messages.ts: a sender's messages come in runs to one recipient).
   */
  sentTo: string | undefined = undefined;
  sentToUid: string | undefined = undefined;
  sentToGen = -1;

  constructor(
    readonly peer: Peer,
    readonly codec: Codec,
    private readonly rootLog: Logger,
  ) {}

  /**
   * Child logger with the connection's remote address and uid. Built when something is
   * logged rather than kept, so 10,000 quiet connections carry no logger each.
   */
  get log(): Logger {
    return this.rootLog.child({ conn: this.peer.id, remote: this.peer.remote, uid: this.uid });
  }

  /**
   * Logs the connection in. Live inbox events are held back (syncing) until the sync
   * that follows the auth reply has sent what came before them.
   */
  login(uid: string, sid: string, nick: string, expires: number): void {
    // The same user again on this connection (also after a logout) keeps what it was
    // sent here (the next sync resumes after it); another user starts from nothing.
    if (uid !== this.inboxOf) this.lastInbox = this.sentInbox = 0;
    this.inboxOf = this.uid = uid;
    this.sid = sid;
    this.nick = nick;
    this.nickJson = JSON.stringify(nick);
    this.expires = expires;
    this.generation++;
    this.syncing = true;
    this.syncDirty = false;
    this.peer.forgetConfirmations();
  }

  logout(): void {
    this.uid = this.sid = this.nick = this.nickJson = undefined;
    this.expires = 0;
    this.generation++;
    this.syncing = false;
    this.peer.forgetConfirmations();
  }
}
