// What the composition root hands every feature module: the stores, the router of
// live connections, configuration, and hooks through which features react to each
// other's events without importing each other.

import type { Logger } from "pino";
import type { Background } from "../background.js";
import type { Config } from "../config.js";
import type { Metrics } from "../metrics.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import type { Router } from "../protocol/router.js";
import type { KeyedLock } from "../seams.js";
import type { BanStore } from "../storage/bans.js";
import type { BlobStore } from "../storage/blobs.js";
import type { Storage } from "../storage/db.js";
import type { ChannelStore } from "../storage/channels.js";
import type { ContactStore } from "../storage/contacts.js";
import type { MessageStore } from "../storage/messages.js";
import type { SessionStore } from "../storage/sessions.js";
import type { UserStore } from "../storage/users.js";
import type { UserRecord } from "../storage/layout.js";
import type { Registration } from "./registration.js";
import type { Cluster } from "./cluster.js";

/** `audience`: who hears it, when not the users listing `uid` now (a deleted account's). */
type PresenceHook = (uid: string, online: boolean, audience?: readonly string[]) => void | Promise<void>;

/** The KeyedLock key under which a user's credentials, sessions and profile change. */
export function userLockKey(uid: string): string {
  return `user:${uid}`;
}

/**
 * The KeyedLock key under which a user's links with others change: contact entries
 * either way, channel memberships. An account's deletion holds it (inside the user's
 * lock) from reading those links until the account is gone, so that no link made
 * meanwhile outlives it; a request that adds a link to another user takes this lock
 * of theirs, not their user lock: another user's addcontact or invite never queues
 * ahead of the user's own login, password change or profile change.
 *
 * Order: user locks, then links locks (sorted by uid), then `channels-of`, then a
 * channel's. Nothing holding a links lock waits for a user lock.
 */
export function linksLockKey(uid: string): string {
  return `links:${uid}`;
}

/**
 * The KeyedLock key under which a conversation's stored messages change (edits,
 * deletes, a deleted channel's purge): one at a time, each reading afresh.
 */
export function convLockKey(conv: string): string {
  return `conv:${conv}`;
}

/**
 * The request's session is still `me`'s, after the reads and locks it waited for: an
 * account deleted (or logged out, its password changed) meanwhile through another
 * connection changes nothing after its deletion, logout or change was answered
 * (messages, profile, contacts).
 */
export function stillSignedIn(req: { session: { uid?: string } }, me: string): void {
  if (req.session.uid !== me) throw new ProtocolError(Code.NeedAuth, "the session ended before the change was made; log in and try again");
}

/**
 * Runs `fn` holding every lock in `keys`, taken in that order. Callers that take
 * several users' locks sort the users first (one order everywhere: no deadlock).
 */
export function underLocks<T>(locks: KeyedLock, keys: readonly string[], fn: () => Promise<T>): Promise<T> {
  return keys.length === 0 ? fn() : locks.run(keys[0], () => underLocks(locks, keys.slice(1), fn));
}

/**
 * The user `uid`. In cluster mode (--nats) a uid unknown here is looked up again once
 * this node has applied everything the log held when it was asked: a user registered
 * through another node a moment ago is found, not answered 8 "no user".
 */
export async function findUser(sv: Pick<Services, "users" | "cluster">, uid: string): Promise<UserRecord | undefined> {
  const u = await sv.users.get(uid);
  if (u !== undefined || !sv.cluster) return u;
  await sv.cluster.sync();
  return sv.users.get(uid);
}

/**
 * `read()`, and in cluster mode, when it finds nothing (`missed`), once more after this
 * node has applied everything the log holds: what a client wrote through another node
 * a moment ago (its account, its room) is found, as its next request must see it. A
 * log that cannot be reached is 16: "nothing found" could be false (a delcontact of a
 * contact added through another node answered 0 and removed nothing).
 */
export async function readSynced<T>(sv: Pick<Services, "cluster">, read: () => Promise<T>, missed: (v: T) => boolean = (v) => v === undefined): Promise<T> {
  const v = await read();
  if (!missed(v) || !sv.cluster) return v;
  await sv.cluster.sync();
  return read();
}

/** Runs after an account's deletion is committed; `signal` aborts at shutdown (the deletion's record makes the next start run it again). */
export type AccountDeletedHook = (uid: string, nick: string, chids: string[], signal: AbortSignal) => Promise<void>;

export class Hooks {
  private readonly presenceFns: PresenceHook[] = [];

  private readonly stopFns: (() => void | Promise<void>)[] = [];

  private readonly deletedFns: AccountDeletedHook[] = [];

  constructor(private readonly background: Background) {}

  /**
   * After an account is deleted, with the channels it was a member of; run in the order
   * registered, each after the one before it has ended (quick ones first: a purge of a
   * long history holds back every hook after it).
   */
  onAccountDeleted(fn: AccountDeletedHook): void {
    this.deletedFns.push(fn);
  }

  /**
   * Runs the account-deleted hooks in the background, one after another, then `done`
   * (which forgets the deletion's record) when every hook succeeded. None once
   * shutdown has begun: the record makes the next start run them.
   */
  accountDeleted(uid: string, nick: string, chids: string[], done: () => Promise<void>): void {
    this.background.run(
      "account-deleted hooks",
      async (signal) => {
        // Each hook runs, whatever one before it did: a failure (a purge whose history
        // could not be written) must not hold back the others (the account's channels
        // removed, its leaves told). The record stays, and the next start runs them again.
        let failure: unknown;
        for (const fn of this.deletedFns) {
          try {
            await fn(uid, nick, chids, signal);
          } catch (err) {
            failure ??= err;
          }
        }
        if (failure !== undefined) throw failure;
        // A shutdown cut a hook short (a purge stops between pages and returns): the
        // record stays, and the next start runs them again. Removed, the rest of the
        // purge was never made (the account's notes to itself and their files for good).
        if (signal.aborted) return;
        await done();
      },
      { uid },
    );
  }

  /** When the server starts to stop (timers end here). */
  onStop(fn: () => void | Promise<void>): void {
    this.stopFns.push(fn);
  }

  /** Runs the stop hooks; resolves once what they wait for has ended (hash threads loading bcrypt). */
  stop(): Promise<void> {
    return Promise.all(this.stopFns.splice(0).map((fn) => fn())).then(() => undefined);
  }

  /** When a user's first connection authenticates (true) or their last one goes (false). */
  onPresence(fn: PresenceHook): void {
    this.presenceFns.push(fn);
  }

  /** Runs the presence hooks in the background; none once shutdown has begun. */
  presence(uid: string, online: boolean, _log?: Logger, audience?: readonly string[]): void {
    for (const fn of this.presenceFns) this.background.run("presence hook", () => fn(uid, online, audience), { uid });
  }
}

export interface Services {
  config: Config;
  log: Logger;
  /** The server's counters (metrics.ts), read by the admin port. */
  metrics: Metrics;
  dispatcher: Dispatcher;
  router: Router;
  /** Per-key serialisation (seams.ts). */
  locks: KeyedLock;
  hooks: Hooks;
  /** Background work: logged when it fails, waited for (or cut short) at shutdown. */
  background: Background;
  storage: Storage;
  users: UserStore;
  sessions: SessionStore;
  contacts: ContactStore;
  messages: MessageStore;
  channels: ChannelStore;
  blobs: BlobStore;
  bans: BanStore;
  /** Whether register is open (the operator's stored setting or --registration). */
  registration: Registration;
  /** Cluster mode (--nats): writes go through the shared log (features/cluster.ts). */
  cluster?: Cluster;
}
