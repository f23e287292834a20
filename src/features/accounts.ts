// Accounts and sessions: register, auth (by password or by sid, throttled), logout,
// changepassword, deleteaccount, hello, ping, quit.

import { createHash, randomBytes } from "node:crypto";
import bcrypt from "bcrypt";
import { Code, ProtocolError } from "../protocol/codes.js";
import { nowSeconds } from "../protocol/frames.js";
import { LoginThrottle } from "./login-throttle.js";
import type { Request } from "../protocol/dispatcher.js";
import type { Session } from "../protocol/session.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import type { BatchOp } from "../storage/db.js";
import type { UserRecord } from "../storage/layout.js";
import type { UniqueIndex } from "../storage/users.js";
import type { Services } from "./services.js";

export const PROTOCOL_VERSION = "1.0";

// Logins: letters (any script), digits and _ . @ + -, so an email address works too.
const LOGIN = { ...requiredString(64), pattern: "^[\\p{L}\\p{N}_.@+\\-]+$" };
// Nicks: any printable text.
const NICK = { ...requiredString(64), pattern: "^[^\\p{Cc}]+$" };
const PASS = requiredString(1024);

/**
 * bcrypt reads only the first 72 bytes of its input, so the client's secret is first
 * reduced to a fixed-size digest. Hashing runs on libuv's thread pool, which LevelDB
 * shares: at most two hashes run at once so a login storm cannot starve storage.
 */
class PasswordHasher {
  private running = 0;
  private readonly waiting: (() => void)[] = [];
  constructor(
    private readonly cost: number,
    private readonly parallel = 2,
  ) {}

  private static digest(pass: string): string {
    return createHash("sha256").update(pass, "utf8").digest("base64");
  }

  private async slot<T>(fn: () => Promise<T>): Promise<T> {
    if (this.running >= this.parallel) await new Promise<void>((r) => this.waiting.push(r));
    this.running++;
    try {
      return await fn();
    } finally {
      this.running--;
      this.waiting.shift()?.();
    }
  }

  hash(pass: string): Promise<string> {
    return this.slot(() => bcrypt.hash(PasswordHasher.digest(pass), this.cost));
  }

  verify(pass: string, hash: string): Promise<boolean> {
    return this.slot(() => bcrypt.compare(PasswordHasher.digest(pass), hash));
  }
}

export function registerAccounts(sv: Services): void {
  const { dispatcher, users, sessions, storage, router, hooks, config } = sv;
  const hasher = new PasswordHasher(config.bcryptCost);
  const byLogin = new LoginThrottle(config.authFailLogin, config.authFailWindow * 1000);
  const byAddress = new LoginThrottle(config.authFailAddr, config.authFailWindow * 1000);

  /** 13 while this login or this address is backing off after failed logins. */
  function checkThrottle(s: Session, login: string | undefined): void {
    const wait = Math.max(byAddress.blockedFor(s.peer.address), login ? byLogin.blockedFor(login.toLowerCase()) : 0);
    if (wait > 0) {
      throw new ProtocolError(Code.RateLimited, `too many failed logins; retry in ${Math.ceil(wait / 1000)} s`);
    }
  }

  function failed(s: Session, login: string | undefined, err: ProtocolError): never {
    byAddress.fail(s.peer.address);
    if (login) byLogin.fail(login.toLowerCase());
    throw err;
  }

  /** The caller's account and a check of its password (2 when wrong). */
  async function verifiedSelf(s: Session, pass: string): Promise<UserRecord> {
    const user = await users.get(s.uid as string);
    if (!user) throw new ProtocolError(Code.UserNotFound, "your account no longer exists");
    checkThrottle(s, user.login);
    if (!(await hasher.verify(pass, user.hash))) failed(s, user.login, new ProtocolError(Code.InvalidPass, "wrong password"));
    return user;
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

  async function newUid(): Promise<string> {
    for (;;) {
      const uid = randomBytes(6).toString("hex");
      if (!(await users.get(uid))) return uid;
    }
  }

  /**
   * Logs this connection in as `user` and returns the auth reply fields. Without `sid`
   * a new session is stored, in one batch with `withOps` (a new account's records).
   */
  async function startSession(s: Session, user: UserRecord, sid?: string, withOps: BatchOp[] = []) {
    const now = nowSeconds();
    if (sid === undefined) {
      sid = sessions.newSid();
      await storage.commit([...withOps, ...sessions.createOps(sid, { uid: user.uid, created: now, expires: now + config.sessionTtl })]);
    }
    if (s.uid !== undefined) leave(s);
    s.login(user.uid, sid, user.nick);
    if (router.attach(s)) hooks.presence(user.uid, true, sv.log);
    s.log.info("authenticated");
    return { sid, uid: user.uid, cid: user.uid, nick: user.nick };
  }

  dispatcher.register<{ login: string; pass: string; nick: string }>({
    name: "register",
    public: true,
    schema: {
      type: "object",
      required: ["login", "pass", "nick"],
      properties: { login: LOGIN, pass: PASS, nick: NICK },
    },
    async handle(req) {
      const s = req.session;
      if (s.uid !== undefined) throw new ProtocolError(Code.AlreadyRegister, "this connection is already authenticated");
      const { login, pass, nick } = req.data;
      const unique: [UniqueIndex, string][] = [
        ["login", login],
        ["nick", nick],
      ];
      const taken = await users.claim(unique);
      if (taken) throw new ProtocolError(Code.AlreadyExist, `that ${taken} is already taken`);
      let user: UserRecord;
      let auth;
      try {
        const hash = await hasher.hash(pass);
        user = {
          uid: await newUid(),
          login,
          nick,
          hash,
          email: "",
          phone: "",
          picture: "",
          status: "",
          created: nowSeconds(),
        };
        auth = await startSession(s, user, undefined, users.saveOps(user));
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

  dispatcher.register<{ login?: string; pass?: string; sid?: string; since?: string }>({
    name: "auth",
    public: true,
    schema: {
      type: "object",
      properties: {
        login: optionalString(64),
        pass: optionalString(1024),
        sid: optionalString(64),
        // The last inbox mid this client has: the sync after auth starts past it.
        since: { type: "string", pattern: "^[0-9]{1,15}$" },
      },
    },
    async handle(req) {
      const s = req.session;
      const { login, pass, sid, since } = req.data;
      let result;
      if (sid && !login) {
        checkThrottle(s, undefined);
        const rec = await sessions.get(sid);
        const user = rec && rec.expires > nowSeconds() ? await users.get(rec.uid) : undefined;
        if (!rec || !user) {
          if (rec) storage.commitLazy(sessions.revokeOps(rec.uid, sid));
          failed(s, undefined, new ProtocolError(Code.InvalidPass, "unknown or expired session; log in with login and pass"));
        }
        result = await startSession(s, user, sid);
      } else {
        if (!login) throw new ProtocolError(Code.EmptyField, "'login' is required (or 'sid' alone to resume a session)");
        if (!pass) throw new ProtocolError(Code.EmptyField, "'pass' is required");
        checkThrottle(s, login);
        const uid = await users.lookup("login", login);
        const user = uid === undefined ? undefined : await users.get(uid);
        if (!user) failed(s, login, new ProtocolError(Code.NeedRegister, `no account with login '${login}'; register first`));
        if (!(await hasher.verify(pass, user.hash))) failed(s, login, new ProtocolError(Code.InvalidPass, "wrong login or password"));
        byLogin.succeed(login.toLowerCase());
        result = await startSession(s, user);
      }
      req.after(() => void router.sync(s, since === undefined ? undefined : Number(since)));
      return result;
    },
  });

  dispatcher.register({
    name: "logout",
    schema: { type: "object" },
    async handle(req) {
      const s = req.session;
      const uid = s.uid as string;
      const sid = s.sid as string;
      await storage.commit(sessions.revokeOps(uid, sid));
      // Other connections resumed with the same sid lose it too (they stay open).
      endSessions(uid, (other) => other !== s && other.sid === sid, "the session was logged out", false);
      leave(s);
      s.logout();
      return {};
    },
  });

  dispatcher.register<{ pass: string; newpass: string }>({
    name: "changepassword",
    schema: { type: "object", required: ["pass", "newpass"], properties: { pass: PASS, newpass: PASS } },
    async handle(req) {
      const s = req.session;
      const user = await verifiedSelf(s, req.data.pass);
      const next: UserRecord = { ...user, hash: await hasher.hash(req.data.newpass) };
      // Every other session of the user is revoked in the same batch; the caller's stays.
      const others = (await sessions.listSids(user.uid)).filter((sid) => sid !== s.sid);
      await storage.commit([...users.saveOps(next, user), ...others.flatMap((sid) => sessions.revokeOps(user.uid, sid))]);
      users.saved(next);
      endSessions(user.uid, (other) => other.sid !== s.sid, "the password was changed", true);
      s.log.info({ revoked: others.length }, "password changed");
      return {};
    },
  });

  dispatcher.register<{ pass: string }>({
    name: "deleteaccount",
    schema: { type: "object", required: ["pass"], properties: { pass: PASS } },
    async handle(req) {
      const s = req.session;
      const user = await verifiedSelf(s, req.data.pass);
      const uid = user.uid;
      const { contacts, channels, messages } = sv;
      // One batch: the account and its indexes (freeing login, nick, email, phone),
      // its contact list and its place in others' lists, its sessions, queue and
      // channel memberships. Messages already sent stay in others' history.
      const ops: BatchOp[] = [...users.removeOps(user)];
      for (const c of await contacts.list(uid)) ops.push(...contacts.removeOps(uid, c));
      for (const owner of await contacts.listedBy(uid)) ops.push(...contacts.removeOps(owner, uid));
      for (const sid of await sessions.listSids(uid)) ops.push(...sessions.revokeOps(uid, sid));
      const chids = await channels.channelsOf(uid);
      for (const chid of chids) ops.push(...channels.leaveOps(chid, uid));
      ops.push(...(await messages.forgetUserOps(uid)));
      ops.push(...users.deletionMarkOps(uid, user.nick, chids));
      await storage.commit(ops);
      users.forget(uid);
      req.after(() => deleted(uid, user.nick, chids));
      endSessions(uid, (other) => other !== s, "the account was deleted", true);
      leave(s);
      s.logout();
      s.log.info({ uid }, "account deleted");
      return {};
    },
  });

  dispatcher.register<{ client?: string; version?: string; ack?: boolean }>({
    name: "hello",
    public: true,
    schema: {
      type: "object",
      properties: { client: optionalString(128), version: optionalString(64), ack: { type: "boolean" } },
    },
    handle(req) {
      // `ack: true` opts this connection in to acknowledging its inbox events (`ack`).
      if (req.data.ack === true) req.session.acks = true;
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
    public: true,
    schema: { type: "object" },
    handle: () => ({ time: nowSeconds() }),
  });

  dispatcher.register({
    name: "quit",
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
    if (router.detach(s)) hooks.presence(uid, false, sv.log);
  }

  dispatcher.onClose((s) => {
    if (s.uid !== undefined) leave(s);
  });
}
