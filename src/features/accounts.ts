// Accounts and sessions: register, auth (by password or by sid, throttled), logout,
// changepassword, deleteaccount, hello, ping, quit; the per-user caps on sessions and
// connections, and the sweep of expired sessions.

import { randomBytes } from "node:crypto";
import { addressKey, plainAddress } from "../addresses.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import { nowSeconds } from "../protocol/frames.js";
import { LoginThrottle } from "./login-throttle.js";
import { composedLogin, LOGIN_PATTERN, visibleNick } from "./profile-fields.js";
import { PasswordHasher } from "./password-hasher.js";
import type { Request } from "../protocol/dispatcher.js";
import type { Session } from "../protocol/session.js";
import { compileSchema, optionalString, requiredString } from "../protocol/validation.js";
import { BANNED_LOGIN } from "../storage/bans.js";
import { REGISTRATION_CLOSED } from "./registration.js";
import type { BatchOp } from "../storage/db.js";
import type { UserRecord } from "../storage/layout.js";
import { sidHash } from "../storage/sessions.js";
import { NAME_MAX } from "../limits.js";
import type { UniqueIndex } from "../storage/users.js";
import { linksLockKey, readSynced, userLockKey, type Services } from "./services.js";

export const PROTOCOL_VERSION = "1.0";

// Logins: letters (any script), digits and _ . @ + -, so an email address works too.
const LOGIN = { ...requiredString(NAME_MAX), pattern: LOGIN_PATTERN };
// Nicks: any printable text.
const NICK = { ...requiredString(NAME_MAX), pattern: "^[^\\p{Cc}]+$" };
const PASS = requiredString(1024);
/** A log session command's cap that evicts nothing (a session that ends with its request). */
const NO_SESSION_CAP = 2 ** 31 - 1;
// The operator's accounts (admin port, `wirechat user` on a data dir) follow the same
// rules as register's: an account its owner could never log in with is no account.
const OPERATOR_ACCOUNT = compileSchema({ type: "object", required: ["login", "pass", "nick"], properties: { login: LOGIN, pass: PASS, nick: NICK } });
const OPERATOR_PASS = compileSchema({ type: "object", required: ["pass"], properties: { pass: PASS } });

/** What the operator (admin port, `wirechat user …`) may do to accounts. */
export interface AccountOps {
  /** A new account, as register makes it (1 when the login or nick is taken). */
  create(login: string, pass: string, nick: string): Promise<UserRecord>;
  /** A new password; every session of the user is revoked and their connections closed. */
  setPassword(uid: string, pass: string): Promise<{ revoked: number }>;
  /** Deletes the account as deleteaccount does; false when there is none. */
  remove(uid: string): Promise<boolean>;
  /** Closes every connection of the user (and with `revoke`, ends their sessions too). */
  kick(uid: string, reason: string, revoke: boolean): Promise<{ connections: number; revoked: number }>;
  /**
   * The user of a stored, unexpired session of an account that is not banned, as
   * `auth {sid}` accepts it; undefined otherwise. For a door that acts for a session
   * per HTTP request (e_chat_server) without attaching a connection to the router.
   */
  session(sid: string): Promise<{ uid: string; nick: string; expires: number } | undefined>;
  /**
   * Removes one stored session that no client can present again (a door's login whose
   * sid its client never sees), in a lazy batch: a crash may leave it until it expires.
   */
  revoke(uid: string, sid: string, expires: number): void;
  /**
   * Checks a login and password as `auth` does (the same failed-login throttles, bans
   * and answers: 7, 2, 13, 15) without starting a session: for a door whose API checks
   * credentials and keeps nothing (seed 003's /login). A session would count against
   * --max-sessions-per-user (revoking a device's oldest at the cap) and show the user
   * online to their contacts for the length of the request.
   */
  checkLogin(s: Session, login: string, pass: string): Promise<void>;
  /**
   * A login by a name no account has (seed 003's email that no profile holds), counted
   * as auth counts one: against the address's failed-login throttle, with the "failed
   * login" line. Always throws: 13 while the address backs off, else 7.
   */
  refuseUnknown(s: Session, name: string): Promise<never>;
}

/** The address the password hasher files operator work under (its own fair share). */
const OPERATOR = "operator";

export function registerAccounts(sv: Services): AccountOps {
  const { dispatcher, users, sessions, storage, router, hooks, config, locks } = sv;
  const hasher = new PasswordHasher({
    cost: config.bcryptCost,
    queuePerAddress: config.hashQueuePerAddress,
    idleStopMs: config.hashThreadIdle * 1000,
    nice: config.backgroundNice,
    rate: config.authRate,
    burst: config.authBurst,
    prefixes: config,
    trusted: new Set(
      config.trustedAddresses
        .split(",")
        .map((a) => a.trim())
        .filter((a) => a !== "")
        .map(plainAddress),
    ),
  });
  hasher.start();
  hooks.onStop(() => hasher.stop());
  const byLogin = new LoginThrottle(config.authFailLogin, config.authFailWindow * 1000);
  const byAddress = new LoginThrottle(config.authFailAddr, config.authFailWindow * 1000);
  // Cluster mode: the other nodes' failures and password checks count here too (and
  // ours there), so that an address spread over N nodes does not get N times the
  // guesses, nor N times --auth-rate.
  if (sv.cluster) {
    const cluster = sv.cluster;
    hasher.onAdmitted = (address) => cluster.shareLogin({ checked: address });
    cluster.onLoginNote = (note) => {
      if (note.checked !== undefined) hasher.charge(note.checked);
      if (note.address !== undefined) byAddress.fail(note.address);
      if (note.key !== undefined) {
        if (note.ok) byLogin.succeed(note.key);
        else byLogin.fail(note.key);
      }
    };
  }

  /**
   * Everything that reads and then changes a user's credentials, sessions or profile
   * runs under this lock: a login checks, under it, that what it verified still holds
   * when it issues or resumes a session, and a change ends, under it, every session it
   * revokes. So once changepassword, logout or deleteaccount has answered, nothing
   * issued with the old credentials is left (profiles.ts takes the same lock).
   */
  function underUser<T>(uid: string, fn: () => Promise<T>): Promise<T> {
    return locks.run(userLockKey(uid), fn);
  }

  /**
   * Runs a login attempt. 13 while this login from this address, or this address, is
   * backing off. The attempt counts against its login (from its address) when it
   * starts, so that concurrent guesses for one login cannot all pass the check before
   * the first failure is counted; a success, or a refusal other than 2 or 7, takes it
   * back. Against the address a failure counts when it is known (how many checks one
   * address runs at once is bounded by the hasher: a NAT logging 200 users in at once
   * is not refused).
   *
   * A login is counted per address: counted alone, five wrong guesses from anyone made
   * the account's right password fail on every door for as long as the guessing went
   * on (a review locked a user out that way with ten guesses a minute).
   */
  async function counted<T>(s: Session, login: string | undefined, fn: () => Promise<T>): Promise<T> {
    // One address however it arrived (an IPv4 client of a dual-stack listener is
    // ::ffff:…), or its network (--ipv6-prefix: a /64 by default).
    const address = addressKey(s.peer.address, config);
    const key = login === undefined ? undefined : `${login.toLowerCase()}\u0000${address}`;
    const wait = Math.max(byAddress.blockedFor(address), key ? byLogin.blockedFor(key) : 0);
    const { auth } = sv.metrics;
    if (wait > 0) {
      auth.throttled++;
      throw new ProtocolError(Code.RateLimited, `too many failed logins; retry in ${Math.ceil(wait / 1000)} s`);
    }
    if (key) byLogin.fail(key);
    let result: T;
    try {
      result = await fn();
    } catch (err) {
      if (err instanceof ProtocolError && (err.code === Code.InvalidPass || err.code === Code.NeedRegister)) {
        byAddress.fail(address);
        // The login's count was taken when the attempt started; the others take both now.
        sv.cluster?.shareLogin(key === undefined ? { address } : { address, key });
        auth[err.code === Code.InvalidPass ? "wrong_password" : "unknown_login"]++;
        // One line per failure, with the address and the login tried, for fail2ban.
        sv.log.warn({ remote: s.peer.address, login: login ?? null, reason: err.message }, "failed login");
      } else {
        auth[err instanceof ProtocolError && err.code === Code.Forbidden ? "banned" : "other"]++;
        if (key) byLogin.undo(key);
      }
      throw err;
    }
    auth.ok++;
    if (key) {
      byLogin.succeed(key);
      sv.cluster?.shareLogin({ key, ok: true });
    }
    return result;
  }

  /** The caller's account and a check of its password (2 when wrong). */
  async function verifiedSelf(s: Session, pass: string): Promise<UserRecord> {
    // A password changed through another node a moment ago (the session kept) is the
    // one checked: this node has applied the log first (rare actions; one round trip).
    await sv.cluster?.sync();
    const user = await users.get(s.uid as string);
    if (!user) throw new ProtocolError(Code.UserNotFound, "your account no longer exists");
    await counted(s, user.login, async () => {
      if (!(await hasher.verify(s.peer.address, pass, user.hash))) throw new ProtocolError(Code.InvalidPass, "wrong password");
    });
    return user;
  }

  /**
   * Under the user's lock, after a slow password check: the caller's session is still
   * the one it had, and the password it checked is still the account's.
   */
  async function stillCurrent(s: Session, uid: string, sid: string, checked: UserRecord): Promise<UserRecord> {
    if (s.uid !== uid || s.sid !== sid) throw new ProtocolError(Code.NeedAuth, "this session was ended meanwhile");
    const cur = await users.get(uid);
    if (!cur) throw new ProtocolError(Code.UserNotFound, "your account no longer exists");
    if (cur.hash !== checked.hash) throw new ProtocolError(Code.InvalidPass, "the password was changed meanwhile");
    return cur;
  }

  /**
   * Ends the sessions of `uid`'s other connections that `ends` picks: they are told
   * with ev_logout, logged out and (when `close`) disconnected after it.
   */
  function endSessions(uid: string, ends: (other: Session) => boolean, reason: string, close: boolean): void {
    for (const other of [...router.sessions(uid)]) {
      if (!ends(other)) continue;
      leave(other);
      other.logout();
      router.sendTo(other, { kind: "logout", reason });
      if (close) other.peer.end();
    }
  }

  /**
   * The connection closed before its login was done: it is not logged in, and the
   * session `stored` for it (if any), whose sid no client has seen, is revoked, so it
   * neither waits out its TTL nor counts toward --max-sessions-per-user (where it
   * would push out a session a device still uses). Call under the user's lock.
   */
  async function closedMeanwhile(s: Session, uid: string, stored: { sid: string; expires: number } | undefined): Promise<never> {
    if (stored !== undefined) {
      const hash = sidHash(stored.sid);
      if (sv.cluster) await sv.cluster.append({ k: "logout", uid, sid: hash, expires: stored.expires, conn: s.peer.id });
      else await storage.commit(sessions.revokeOps(uid, hash, stored.expires));
      s.log.info("connection closed while its session was stored: session revoked");
    }
    throw new ProtocolError(Code.Unavailable, "the connection closed");
  }

  /** 13 when `uid` has --max-connections-per-user connections logged in (this one aside). */
  function connectionsLeft(s: Session, uid: string): void {
    // An HTTP route's login holds no connection: a user at the cap still changes their
    // password or logs in through a door's route.
    if (s.peer.fleeting) return;
    if (s.uid !== uid && router.sessions(uid).length >= config.maxConnectionsPerUser) {
      throw new ProtocolError(Code.RateLimited, `this account has ${config.maxConnectionsPerUser} connections logged in; close one first`);
    }
  }

  async function newUid(): Promise<string> {
    for (;;) {
      const uid = randomBytes(6).toString("hex");
      if (!(await users.get(uid))) return uid;
    }
  }

  /** A new account's record (its login and nick claimed by the caller). */
  async function newUser(login: string, nick: string, hash: string): Promise<UserRecord> {
    return { uid: await newUid(), num: users.nextNum(), login, nick, hash, email: "", phone: "", picture: "", status: "", created: nowSeconds() };
  }

  /**
   * Logs this connection in as `user` and returns the auth reply fields; call under
   * the user's lock. Without `resumed` a new session is stored, in one batch with
   * `withOps` (a new account's records) and the revocation of the user's oldest
   * sessions past --max-sessions-per-user. `resumed.fresh`: the caller stored that
   * session for this connection alone (cluster mode, through the log).
   */
  async function startSession(s: Session, user: UserRecord, resumed?: { sid: string; expires: number; fresh?: boolean }, withOps: BatchOp[] = []) {
    // A connection that closed while its password was checked is not logged in (the
    // router would keep it, and the user online, for good).
    if (s.peer.closed) return closedMeanwhile(s, user.uid, resumed?.fresh ? resumed : undefined);
    const again = s.uid === user.uid;
    // (Cluster mode checked before the log took the session: under the user's lock, as
    // every login is, so no connection of the user has logged in here since.)
    connectionsLeft(s, user.uid);
    let sid: string;
    let expires: number;
    if (resumed === undefined) {
      const now = nowSeconds();
      sid = sessions.newSid();
      expires = now + config.sessionTtl;
      const ops = [...withOps, ...sessions.createOps(sid, { uid: user.uid, created: now, expires })];
      const stored = withOps.length > 0 ? [] : await sessions.list(user.uid);
      const evicted = new Set<string>();
      // (A session that ends with its request evicts none: Peer.sessionEndsWithRequest.)
      if (stored.length >= config.maxSessionsPerUser && !s.peer.sessionEndsWithRequest) {
        stored.sort((a, b) => a.issued - b.issued);
        for (const old of stored.slice(0, stored.length - config.maxSessionsPerUser + 1)) {
          ops.push(...sessions.revokeOps(user.uid, old.hash, old.expires));
          evicted.add(old.hash);
        }
      }
      // Closed while the sessions were read: nothing stored, nobody's session evicted
      // for a login that logs nothing in.
      if (s.peer.closed) return closedMeanwhile(s, user.uid, undefined);
      await storage.commit(ops);
      if (evicted.size > 0) {
        endSessions(user.uid, (o) => o !== s && evicted.has(sidHash(o.sid as string)), "too many sessions: this one, the oldest, was ended", false);
      }
      if (s.peer.closed) return closedMeanwhile(s, user.uid, { sid, expires });
    } else ({ sid, expires } = resumed);
    // The same user again on this connection stays where it is in the router: no
    // presence goes out (nothing changed for the user's contacts).
    if (s.uid !== undefined && !again) leave(s);
    s.login(user.uid, sid, user.nick, expires);
    if (!again && router.attach(s)) presenceChanged(user.uid, true);
    s.log.info("authenticated");
    return { sid, uid: user.uid, cid: user.uid, nick: user.nick };
  }

  /** 5: an authenticated connection may log in again only as the same user. */
  function sameUser(s: Session, uid: string): void {
    if (s.uid !== undefined && s.uid !== uid) {
      throw new ProtocolError(Code.AlreadyRegister, "this connection is authenticated as another user; logout first");
    }
  }

  /**
   * Deletes `user` (call under their lock), in one batch: the account and its indexes
   * (freeing login, nick, email, phone), its contact list and its place in others'
   * lists, its sessions, queue and channel memberships. Messages already sent stay in
   * others' history. Every connection of the user but `keep` is told and closed.
   * Returns the channels the user was in or owned, for the hooks.
   */
  async function removeUser(user: UserRecord, reason: string, keep?: Session): Promise<string[]> {
    const uid = user.uid;
    // Its links lock from the first read of its links until it is gone (linksLockKey):
    // an addcontact or invite naming it waits, then finds no account.
    const chids = await locks.run(linksLockKey(uid), () => removeLinked(user));
    router.forgetOffline(uid);
    endSessions(uid, (other) => other !== keep, reason, true);
    if (keep) {
      leave(keep);
      keep.logout();
    }
    return chids;
  }

  /** removeUser's writes, under the account's links lock; returns its channels. */
  async function removeLinked(user: UserRecord): Promise<string[]> {
    const { contacts, channels, messages } = sv;
    const uid = user.uid;
    const ops: BatchOp[] = [...users.removeOps(user)];
    for (const c of await contacts.list(uid)) ops.push(...contacts.removeOps(uid, c));
    const listedBy = await contacts.listedBy(uid);
    for (const owner of listedBy) ops.push(...contacts.removeOps(owner, uid));
    for (const o of await sessions.list(uid)) ops.push(...sessions.revokeOps(uid, o.hash, o.expires));
    const joined = await channels.channelsOf(uid);
    // The hook deletes every channel it owns, those it has left included (an owner may).
    const chids = [...new Set([...joined, ...(await channels.ownedBy(uid))])];
    ops.push(...(await messages.forgetUserOps(uid)));
    ops.push(...users.deletionMarkOps(uid, user.nick, chids));
    // From here, with nothing left to wait for but the commit, a direct message to the
    // account is refused (8), not stored for nobody in the deletion's batch or the next
    // (the sweep reads what came before), and so is its own message to a channel it is
    // leaving (leaveOps). A failed commit undoes both: the account keeps everything.
    for (const chid of joined) ops.push(...channels.leaveOps(chid, uid));
    messages.forgettingUser(uid);
    try {
      await storage.commit(ops);
    } catch (err) {
      messages.notForgettingUser(uid);
      for (const chid of joined) channels.notLeft(chid, uid);
      throw err;
    }
    messages.forgotten(uid);
    // Those who listed an online account hear it go offline: its connections close
    // below, but its place in their lists is gone, so the presence hook would find
    // nobody to tell.
    if (router.isHere(uid)) hooks.presence(uid, false, sv.log, listedBy);
    for (const chid of joined) channels.left(chid, uid);
    users.forget(uid);
    return chids;
  }

  /** Revokes every stored session of `uid` (call under their lock); returns how many. */
  async function revokeAll(uid: string): Promise<number> {
    const all = await sessions.list(uid);
    await storage.commit(all.flatMap((o) => sessions.revokeOps(uid, o.hash, o.expires)));
    return all.length;
  }

  /**
   * The account of `login` if `pass` is its password and it is not banned (7, 2 or 15
   * otherwise): auth's check, called inside `counted`.
   */
  async function passwordChecked(s: Session, login: string, pass: string): Promise<UserRecord> {
    const uid = await users.lookup("login", login);
    const user = uid === undefined ? undefined : await users.get(uid);
    if (!user) throw new ProtocolError(Code.NeedRegister, `no account with login '${login}'; register first`);
    sameUser(s, user.uid);
    notBanned(user);
    if (!(await hasher.verify(s.peer.address, pass, user.hash))) throw new ProtocolError(Code.InvalidPass, "wrong login or password");
    return user;
  }

  /** 15 for a banned account (checked before its password is hashed). */
  function notBanned(user: UserRecord): void {
    if (sv.bans.banned("login", user.login)) {
      throw new ProtocolError(Code.Forbidden, BANNED_LOGIN);
    }
  }

  /**
   * 15 for a new account under a banned login: a login's ban outlives the deletion of
   * its account, and an account made under it could never log in again.
   */
  async function notBannedLogin(login: string): Promise<void> {
    // A new login that reads as a banned one (ｅｖｉｌ for evil) is refused as well: checked
    // here, before the account is made (in cluster mode, on the proposer's view).
    const banned = () => sv.bans.banned("login", login) !== undefined || sv.bans.bannedReadingAs(login) !== undefined;
    if (await readSynced(sv, async () => banned(), (b) => b)) {
      throw new ProtocolError(Code.Forbidden, "that login is banned on this server");
    }
  }

  if (sv.cluster) {
    // Sessions the log ended (logout, a new password, evictions past the cap), on this
    // node's connections; the proposer's own connection is its handler's to log out.
    sv.cluster.onSessionsEnded = (e, mine) =>
      endSessions(
        e.uid,
        (o) => {
          if (o.sid === undefined || (mine && o.peer.id === e.conn)) return false;
          const h = sidHash(o.sid);
          return e.hashes ? e.hashes.has(h) : h !== e.except;
        },
        e.reason,
        e.close,
      );
  }

  /**
   * Cluster mode: a new session for `user` through the log (the hash checked must still
   * be the account's when the log gets there); then this connection logs in.
   */
  async function clusterSession(s: Session, user: UserRecord) {
    const cluster = sv.cluster as NonNullable<typeof sv.cluster>;
    const sid = sessions.newSid();
    const t = nowSeconds();
    const expires = t + config.sessionTtl;
    connectionsLeft(s, user.uid); // before anything is stored for it
    let out;
    try {
      // A session that ends with its request evicts none (Peer.sessionEndsWithRequest).
      const cap = s.peer.sessionEndsWithRequest ? NO_SESSION_CAP : config.maxSessionsPerUser;
      out = await cluster.append({ k: "session", t, uid: user.uid, sid: sidHash(sid), expires, checked: user.hash, cap });
    } catch (err) {
      // Answered 16, the entry may be in the log all the same (stored, its PubAck lost):
      // a session no client holds, which took a place among the user's sessions (past
      // --max-sessions-per-user, a device's session went for it). A logout after it
      // revokes it (it does nothing if the session never was): retries do not add up.
      cluster.append({ k: "logout", uid: user.uid, sid: sidHash(sid), expires, conn: -1 }).catch((e: unknown) => s.log.warn({ err: e }, "revoking the session of a login answered 16 failed"));
      throw err;
    }
    // A ban the log applied before the session (which refused it) or right after it
    // (which revoked it) is this node's by now: this login does not happen.
    notBanned(user);
    if (out.k !== "session") throw new ProtocolError(Code.InvalidPass, "wrong login or password");
    const reply = await startSession(s, user, { sid, expires, fresh: true });
    await attachedStillValid(s, user, sid);
    return reply;
  }

  /**
   * Cluster mode, once a login has attached its connection: the log may have ended its
   * session (a password change or the account's deletion through another node) in an
   * apply that ran before the attach, whose end of the user's sessions could not find
   * this connection (one apply can take the session and, right after it, the password
   * change: the login was then answered 0 on a revoked session, with the old password).
   * Read again now: an apply from here on finds the connection and ends it itself, and
   * one before has written what these reads see. The session record is what counts (a
   * password change keeps the changer's own session, which may be the one resumed).
   * Ended: logged out again, and refused with 6, which is not a failed login (the
   * password was right: counted() takes the attempt back).
   */
  async function attachedStillValid(s: Session, user: UserRecord, sid: string): Promise<void> {
    const [cur, rec] = await Promise.all([users.get(user.uid), sessions.get(sid)]);
    if (cur !== undefined && rec !== undefined) return;
    if (s.uid === user.uid && s.sid === sid) {
      leave(s);
      s.logout();
    }
    throw new ProtocolError(Code.NeedAuth, "this session was ended meanwhile (elsewhere, by a password change, the account's deletion or a newer session); log in again");
  }

  /**
   * Cluster mode's account creation: the log decides who gets a contested login or nick.
   * `first`: the session the account starts with (none for an operator's account).
   */
  async function registerInCluster(t: number, login: string, nick: string, hash: string, first?: { sid: string; expires: number }, byUser = false): Promise<UserRecord> {
    const cluster = sv.cluster as NonNullable<typeof sv.cluster>;
    const session = first ? { sid: sidHash(first.sid), expires: first.expires } : {};
    // A user's own register, on a node that follows the log's setting: the log checks it
    // is still open where the entry lands (an operator's account is made regardless).
    const k = byUser && sv.registration.followsLog ? "signup" : "register";
    const out = await cluster.append({ k, t, uid: randomBytes(6).toString("hex"), login, nick, hash, names: true, bans: true, reads: true, ...session });
    if (out.k === "taken") throw new ProtocolError(Code.AlreadyExist, `that ${out.index} is already taken`);
    // Banned, or registration closed, through another node after this node's own checks read its view.
    if (out.k === "refused" && out.reason === BANNED_LOGIN) throw new ProtocolError(Code.Forbidden, BANNED_LOGIN);
    if (out.k === "refused" && out.reason === REGISTRATION_CLOSED) throw new ProtocolError(Code.Forbidden, REGISTRATION_CLOSED);
    if (out.k !== "registered") throw new ProtocolError(Code.Unavailable, "the account could not be created; try again");
    return out.user;
  }

  /** Cluster mode's register, with the session it logs in. */
  async function clusterRegister(s: Session, login: string, pass: string, nick: string) {
    const hash = await hasher.hash(s.peer.address, pass);
    const sid = sessions.newSid();
    const t = nowSeconds();
    const expires = t + config.sessionTtl;
    const user = await registerInCluster(t, login, nick, hash, { sid, expires }, true);
    return underUser(user.uid, () => startSession(s, user, { sid, expires, fresh: true }));
  }

  // Expired sessions: swept from storage at start-up (server.ts) and every minute (or
  // every --session-ttl, if shorter), a bounded page at a time; a live connection on
  // one gets ev_logout and is closed. In cluster mode through the log (a sweep command).
  const SWEEP_PAGE = 1000;
  let sweepTimer: NodeJS.Timeout | undefined;
  let stopped = false;
  async function sweepExpired(): Promise<void> {
    const n = sv.cluster ? await sweepThroughLog(sv.cluster, nowSeconds()) : await sweepHere(nowSeconds());
    // A full page: more may be due at once.
    if (n === SWEEP_PAGE && !stopped) (sweepTimer = setTimeout(runSweep, 10)).unref();
    else scheduleSweep();
  }

  /**
   * The view changes only by the log: a sweep command when this view holds expired
   * sessions; every node removes them and closes their connections as it applies it.
   */
  async function sweepThroughLog(cluster: NonNullable<typeof sv.cluster>, now: number): Promise<number> {
    if ((await sessions.due(now, 1)).length === 0) return 0;
    const out = await cluster.append({ k: "sweep", before: now, limit: SWEEP_PAGE });
    return out.k === "done" ? (out.n ?? 0) : 0;
  }

  /** Sessions swept on this node: how many. */
  async function sweepHere(now: number): Promise<number> {
    const gone = await sessions.sweep(now, SWEEP_PAGE);
    for (const uid of new Set(gone.map((g) => g.uid))) {
      await underUser(uid, async () => {
        endSessions(uid, (o) => o.expires <= now, "the session expired", true);
      });
    }
    return gone.length;
  }

  function runSweep(): void {
    sweepTimer = undefined;
    if (stopped) return;
    sweepExpired().catch((err) => {
      if (!stopped) sv.log.error({ err }, "session sweep failed");
      scheduleSweep();
    });
  }
  function scheduleSweep(): void {
    if (stopped || sweepTimer) return;
    sweepTimer = setTimeout(runSweep, Math.min(60, config.sessionTtl) * 1000);
    sweepTimer.unref();
  }
  scheduleSweep();
  hooks.onStop(() => {
    stopped = true;
    if (sweepTimer) clearTimeout(sweepTimer);
  });

  dispatcher.register<{ login: string; pass: string; nick: string }>({
    name: "register",
    cluster: true,
    public: true,
    schema: {
      type: "object",
      required: ["login", "pass", "nick"],
      properties: { login: LOGIN, pass: PASS, nick: NICK },
    },
    async handle(req) {
      const s = req.session;
      if (s.uid !== undefined) throw new ProtocolError(Code.AlreadyRegister, "this connection is already authenticated");
      // Registration opened through another node a moment ago: this node has applied
      // the log before it says closed.
      if (await readSynced(sv, async () => sv.registration.closed, (closed) => closed)) {
        throw new ProtocolError(Code.Forbidden, REGISTRATION_CLOSED);
      }
      const { login, pass, nick } = req.data;
      composedLogin(login);
      visibleNick(nick);
      await notBannedLogin(login);
      if (sv.cluster) {
        const auth = await clusterRegister(s, login, pass, nick);
        req.after(() => {
          s.peer.send(s.codec.reply("auth", auth), false);
          void router.sync(s, undefined);
        });
        return {};
      }
      const unique: [UniqueIndex, string][] = [
        ["login", login],
        ["nick", nick],
      ];
      const taken = await users.claim(unique);
      if (taken) throw new ProtocolError(Code.AlreadyExist, `that ${taken} is already taken`);
      let user: UserRecord;
      let auth;
      try {
        user = await newUser(login, nick, await hasher.hash(s.peer.address, pass));
        const u = user;
        auth = await underUser(u.uid, () => startSession(s, u, undefined, users.saveOps(u)));
        users.saved(user);
      } finally {
        users.release(unique);
      }
      // Seed 004: a successful register is followed by an unsolicited auth frame.
      req.after(() => {
        s.peer.send(s.codec.reply("auth", auth), false);
        void router.sync(s, undefined);
      });
      return {};
    },
  });

  dispatcher.register<{ login?: string; pass?: string; sid?: string | null; since?: string }>({
    name: "auth",
    cluster: true,
    public: true,
    schema: {
      type: "object",
      properties: {
        login: optionalString(NAME_MAX),
        pass: optionalString(1024),
        // null: none (an original-protocol client sends cid and sid with every request,
        // null before it has a session; the envelope's sid takes null too).
        sid: { type: ["string", "null"], maxLength: 64 },
        // The last inbox mid this client has: the sync after auth starts past it.
        since: { type: "string", pattern: "^[0-9]{1,15}$" },
      },
    },
    async handle(req) {
      const s = req.session;
      const { login, pass, sid, since } = req.data;
      // Cluster mode: whatever the client wrote through any node is applied here first.
      await sv.cluster?.sync();
      let result;
      if (sid && !login) {
        result = await counted(s, undefined, async () => {
          const rec = await sessions.get(sid);
          if (!rec) throw new ProtocolError(Code.InvalidPass, "unknown or expired session; log in with login and pass");
          sameUser(s, rec.uid);
          // Read again under the lock: a logout or password change that answered
          // before this point has revoked it, and one after it will end this connection.
          return underUser(rec.uid, async () => {
            const cur = await sessions.get(sid);
            const user = cur && cur.expires > nowSeconds() ? await users.get(cur.uid) : undefined;
            if (!cur || !user) {
              if (cur && !sv.cluster) {
                storage.commitLazy(sessions.revokeOps(cur.uid, sidHash(sid), cur.expires));
                // The sweep finds expired sessions by their expiry entry, which this
                // removes: the connections still on this one are ended here, as the
                // sweep would have (else they stayed logged in past the TTL for good).
                // This connection, if on it, is told by this reply and stays open.
                endSessions(cur.uid, (o) => o !== s && o.sid === sid, "the session expired", true);
                if (s.sid === sid) {
                  leave(s);
                  s.logout();
                }
              }
              throw new ProtocolError(Code.InvalidPass, "unknown or expired session; log in with login and pass");
            }
            notBanned(user);
            const reply = await startSession(s, user, { sid, expires: cur.expires });
            if (sv.cluster) await attachedStillValid(s, user, sid);
            return reply;
          });
        });
      } else {
        if (!login) throw new ProtocolError(Code.EmptyField, "'login' is required (or 'sid' alone to resume a session)");
        if (!pass) throw new ProtocolError(Code.EmptyField, "'pass' is required");
        result = await counted(s, login, async () => {
          const user = await passwordChecked(s, login, pass);
          return underUser(user.uid, async () => {
            // The password checked must still be the account's (not changed, not deleted).
            const cur = await users.get(user.uid);
            if (!cur || cur.hash !== user.hash) throw new ProtocolError(Code.InvalidPass, "wrong login or password");
            // Again under the lock: a ban made while the password was checked, whose
            // kick ran before this, must not be followed by a new session.
            notBanned(cur);
            return sv.cluster ? clusterSession(s, cur) : startSession(s, cur);
          });
        });
      }
      // The login this auth made, not whichever is the connection's when its reply goes
      // out (replies wait behind a channel's events, the requests behind it run): after
      // a logout and another auth meanwhile, this sync would send that user's inbox from
      // this one's `since`, alongside the newer auth's own sync.
      const gen = s.generation;
      req.after(() => {
        if (s.generation === gen) void router.sync(s, since === undefined ? undefined : Number(since));
      });
      return result;
    },
  });

  dispatcher.register({
    name: "logout",
    cluster: true,
    schema: { type: "object" },
    async handle(req) {
      const s = req.session;
      const uid = s.uid as string;
      const sid = s.sid as string;
      await underUser(uid, async () => {
        if (s.uid !== uid || s.sid !== sid) return; // ended meanwhile (changepassword elsewhere)
        if (sv.cluster) {
          // Every node (this one included) ends the sid's other connections as it applies
          // this. This one is logged out here whatever the append says: a 16 may still be
          // applied (the log stored it), and the apply leaves the proposer's connection to
          // this handler, so it would stay logged in on a revoked session.
          try {
            await sv.cluster.append({ k: "logout", uid, sid: sidHash(sid), expires: s.expires, conn: s.peer.id });
          } finally {
            leave(s);
            s.logout();
          }
          return;
        }
        await storage.commit(sessions.revokeOps(uid, sidHash(sid), s.expires));
        // Other connections resumed with the same sid lose it too (they stay open).
        endSessions(uid, (other) => other !== s && other.sid === sid, "the session was logged out", false);
        leave(s);
        s.logout();
      });
      return {};
    },
  });

  dispatcher.register<{ pass: string; newpass: string }>({
    name: "changepassword",
    cluster: true,
    schema: { type: "object", required: ["pass", "newpass"], properties: { pass: PASS, newpass: PASS } },
    async handle(req) {
      const s = req.session;
      const uid = s.uid as string;
      const sid = s.sid as string;
      const user = await verifiedSelf(s, req.data.pass);
      const hash = await hasher.hash(s.peer.address, req.data.newpass);
      await underUser(uid, async () => {
        const cur = await stillCurrent(s, uid, sid, user);
        if (sv.cluster) {
          const out = await sv.cluster.append({ k: "password", uid, hash, checked: cur.hash, keep: sidHash(sid) });
          if (out.k !== "done") throw new ProtocolError(Code.InvalidPass, "the password was changed meanwhile");
          s.log.info("password changed");
          return;
        }
        const next: UserRecord = { ...cur, hash };
        // Every other session of the user is revoked in the same batch; the caller's stays.
        const mine = sidHash(sid);
        const others = (await sessions.list(uid)).filter((o) => o.hash !== mine);
        await storage.commit([...users.saveOps(next, cur), ...others.flatMap((o) => sessions.revokeOps(uid, o.hash, o.expires))]);
        users.saved(next);
        endSessions(uid, (other) => other.sid !== sid, "the password was changed", true);
        s.log.info({ revoked: others.length }, "password changed");
      });
      return {};
    },
  });

  dispatcher.register<{ pass: string }>({
    name: "deleteaccount",
    cluster: true,
    schema: { type: "object", required: ["pass"], properties: { pass: PASS } },
    async handle(req) {
      const s = req.session;
      const uid = s.uid as string;
      const sid = s.sid as string;
      const checked = await verifiedSelf(s, req.data.pass);
      await underUser(uid, async () => {
        const user = await stillCurrent(s, uid, sid, checked);
        if (sv.cluster) {
          // Every node closes the account's connections as it applies this; this one is the handler's.
          let out;
          try {
            out = await sv.cluster.append({ k: "deleteAccount", uid, checked: user.hash, conn: s.peer.id });
          } catch (err) {
            // 16: it may still be applied, and then every other node closes the account's
            // connections but this one (its handler's to end): the session ends here now.
            leave(s);
            s.logout();
            throw err;
          }
          if (out.k !== "done") throw new ProtocolError(Code.InvalidPass, "the password was changed meanwhile");
          leave(s);
          s.logout();
          s.log.info({ uid }, "account deleted");
          return;
        }
        const chids = await removeUser(user, "the account was deleted", s);
        req.after(() => deleted(uid, user.nick, chids));
        s.log.info({ uid }, "account deleted");
      });
      return {};
    },
  });

  dispatcher.register<{ client?: string; version?: string; ack?: boolean }>({
    name: "hello",
    cluster: true,
    public: true,
    schema: {
      type: "object",
      properties: { client: optionalString(128), version: optionalString(64), ack: { type: "boolean" } },
    },
    handle(req) {
      // `ack: true` opts this connection in to acknowledging its inbox events (`ack`).
      if (req.data.ack === true && !req.session.acks) {
        req.session.acks = true;
        // What was sent before is the client's to acknowledge from now on too: byte
        // counts no longer confirm it (later traffic settled those marks, and a client
        // that read such a message and failed before its ack lost it).
        req.session.peer.forgetConfirmations();
      }
      return {
        server: "wirechat",
        version: PROTOCOL_VERSION,
        features: dispatcher.actionNames(),
        limits: { frame: config.maxFrame, attach: config.maxAttach, picture: config.maxPicture, import: config.maxImport },
        ack: req.session.acks,
      };
    },
  });

  dispatcher.register({
    name: "ping",
    cluster: true,
    public: true,
    schema: { type: "object" },
    handle: () => ({ time: nowSeconds() }),
  });

  dispatcher.register({
    name: "quit",
    cluster: true,
    public: true,
    schema: { type: "object" },
    handle(req: Request<unknown>) {
      req.after(() => req.session.peer.end());
      return {};
    },
  });

  /** The hooks of a deleted account (its channels), then its deletion's record goes. */
  function deleted(uid: string, nick: string, chids: string[]): void {
    hooks.accountDeleted(uid, nick, chids, () => storage.commit(users.deletionDoneOps(uid)));
  }

  // Deletions whose hooks a crash or a shutdown cut short are finished.
  sv.background.run("resuming account deletions", async () => {
    const pending = await users.pendingDeletions();
    if (pending.length > 0) sv.log.info({ accounts: pending.length }, "finishing interrupted account deletions");
    for (const [uid, { nick, chids }] of pending) deleted(uid, nick, chids);
  });

  /** Takes the connection out of the router; the user goes offline with their last one. */
  function leave(s: Session): void {
    const uid = s.uid as string;
    if (router.detach(s)) presenceChanged(uid, false);
  }

  /** A user's first connection here, or their last one gone (in cluster mode, told to every node). */
  function presenceChanged(uid: string, online: boolean): void {
    if (sv.cluster) sv.cluster.presenceChanged(uid, online);
    else hooks.presence(uid, online, sv.log);
  }

  dispatcher.onClose((s) => {
    if (s.uid !== undefined) leave(s);
  });

  return {
    async checkLogin(s, login, pass) {
      await sv.cluster?.sync();
      await counted(s, login, () => passwordChecked(s, login, pass));
    },
    refuseUnknown(s, name) {
      return counted(s, name, () => Promise.reject(new ProtocolError(Code.NeedRegister, "no account has that name")));
    },
    async create(login, pass, nick) {
      const bad = OPERATOR_ACCOUNT({ login, pass, nick });
      if (bad) throw bad;
      composedLogin(login);
      visibleNick(nick);
      await notBannedLogin(login);
      if (sv.cluster) {
        // No session: an operator's account.
        return registerInCluster(nowSeconds(), login, nick, await hasher.hash(OPERATOR, pass));
      }
      const unique: [UniqueIndex, string][] = [
        ["login", login],
        ["nick", nick],
      ];
      const taken = await users.claim(unique);
      if (taken) throw new ProtocolError(Code.AlreadyExist, `that ${taken} is already taken`);
      try {
        const user = await newUser(login, nick, await hasher.hash(OPERATOR, pass));
        await storage.commit(users.saveOps(user));
        users.saved(user);
        return user;
      } finally {
        users.release(unique);
      }
    },
    async setPassword(uid, pass) {
      const bad = OPERATOR_PASS({ pass });
      if (bad) throw bad;
      const hash = await hasher.hash(OPERATOR, pass);
      if (sv.cluster) {
        // Every session goes, on every node, as each applies it.
        const cur = await users.get(uid);
        if (!cur) throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
        const out = await sv.cluster.append({ k: "password", uid, hash, checked: cur.hash, keep: "", reason: "the password was changed by an operator" });
        if (out.k !== "done") throw new ProtocolError(Code.Unavailable, "the password was changed meanwhile; try again");
        return { revoked: out.n ?? 0 };
      }
      return underUser(uid, async () => {
        const cur = await users.get(uid);
        if (!cur) throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
        const next: UserRecord = { ...cur, hash };
        const all = await sessions.list(uid);
        await storage.commit([...users.saveOps(next, cur), ...all.flatMap((o) => sessions.revokeOps(uid, o.hash, o.expires))]);
        users.saved(next);
        endSessions(uid, () => true, "the password was changed by an operator", true);
        return { revoked: all.length };
      });
    },
    async remove(uid) {
      if (sv.cluster) {
        const user = await users.get(uid);
        if (!user) return false;
        const out = await sv.cluster.append({ k: "deleteAccount", uid, checked: user.hash, conn: -1, reason: "the account was deleted by an operator" });
        if (out.k === "nouser") return false;
        if (out.k !== "done") throw new ProtocolError(Code.Unavailable, "the password was changed meanwhile; try again");
        return true;
      }
      return underUser(uid, async () => {
        const user = await users.get(uid);
        if (!user) return false;
        const chids = await removeUser(user, "the account was deleted by an operator");
        deleted(uid, user.nick, chids);
        return true;
      });
    },
    async kick(uid, reason, revoke) {
      if (sv.cluster) {
        // Ended on every node as each applies it; counted here: this node's connections.
        const connections = router.sessions(uid).length;
        const out = await sv.cluster.append({ k: "kick", uid, reason, revoke });
        sv.metrics.closes.kicked += connections;
        return { connections, revoked: out.k === "done" ? (out.n ?? 0) : 0 };
      }
      return underUser(uid, async () => {
        const connections = router.sessions(uid).length;
        sv.metrics.closes.kicked += connections;
        try {
          return { connections, revoked: revoke ? await revokeAll(uid) : 0 };
        } finally {
          // Ended whatever the revocation's write did: a ban's (the only revoking kick)
          // is in force already, and refuses the sessions it could not remove.
          endSessions(uid, () => true, reason, true);
        }
      });
    },
    async session(sid) {
      // Cluster mode: what the request reads next (its rooms, its messages, the session
      // itself: issued or logged out through another node a moment ago) is read after
      // this node has applied the log as it stands, as a native auth does: a room made
      // or a message sent through another node was missing from a lagging node's answer.
      if (sv.cluster) await sv.cluster.sync();
      const rec = await sessions.get(sid);
      if (!rec || rec.expires <= nowSeconds()) return undefined;
      const user = await users.get(rec.uid);
      if (!user || sv.bans.banned("login", user.login)) return undefined;
      return { uid: user.uid, nick: user.nick, expires: rec.expires };
    },
    revoke(uid, sid, expires) {
      if (sv.cluster) {
        // Through the log (nobody waits: a session left stored expires in its time).
        sv.cluster.append({ k: "logout", uid, sid: sidHash(sid), expires, conn: -1 }).catch((err: unknown) => sv.log.warn({ err, uid }, "revoking a door's session failed"));
        return;
      }
      storage.commitLazy(sessions.revokeOps(uid, sidHash(sid), expires));
    },
  };
}
