// Accounts and sessions: register, auth (by password or by sid), hello, ping, quit.

import { createHash, randomBytes } from "node:crypto";
import bcrypt from "bcrypt";
import { Code, ProtocolError } from "../protocol/codes.js";
import { frame, nowSeconds } from "../protocol/frames.js";
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
  const { dispatcher, users, sessions, storage, hub, hooks, config } = sv;
  const hasher = new PasswordHasher(config.bcryptCost);

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
    if (hub.attach(s)) hooks.presence(user.uid, true, sv.log);
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
        s.send(frame("auth", { status: Code.OK, error: "OK", ...auth }));
        void hooks.loggedIn(s);
      });
      return {};
    },
  });

  dispatcher.register<{ login?: string; pass?: string; sid?: string }>({
    name: "auth",
    public: true,
    schema: {
      type: "object",
      properties: { login: optionalString(64), pass: optionalString(1024), sid: optionalString(64) },
    },
    async handle(req) {
      const s = req.session;
      const { login, pass, sid } = req.data;
      let result;
      if (sid && !login) {
        const rec = await sessions.get(sid);
        const user = rec && rec.expires > nowSeconds() ? await users.get(rec.uid) : undefined;
        if (!rec || !user) {
          if (rec) storage.commitLazy(sessions.revokeOps(rec.uid, sid));
          throw new ProtocolError(Code.InvalidPass, "unknown or expired session; log in with login and pass");
        }
        result = await startSession(s, user, sid);
      } else {
        if (!login) throw new ProtocolError(Code.EmptyField, "'login' is required (or 'sid' alone to resume a session)");
        if (!pass) throw new ProtocolError(Code.EmptyField, "'pass' is required");
        const uid = await users.lookup("login", login);
        const user = uid === undefined ? undefined : await users.get(uid);
        if (!user) throw new ProtocolError(Code.NeedRegister, `no account with login '${login}'; register first`);
        if (!(await hasher.verify(pass, user.hash))) throw new ProtocolError(Code.InvalidPass, "wrong login or password");
        result = await startSession(s, user);
      }
      req.after(() => void hooks.loggedIn(s));
      return result;
    },
  });

  dispatcher.register({
    name: "hello",
    public: true,
    schema: { type: "object", properties: { client: optionalString(128), version: optionalString(64) } },
    handle: () => ({
      server: "wirechat",
      version: PROTOCOL_VERSION,
      features: dispatcher.actionNames(),
      limits: { frame: config.maxFrame, attach: config.maxAttach, picture: config.maxPicture, import: config.maxImport },
    }),
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

  /** Takes the connection out of the hub; the user goes offline with their last one. */
  function leave(s: Session): void {
    const uid = s.uid as string;
    if (hub.detach(s)) hooks.presence(uid, false, sv.log);
  }

  dispatcher.onClose((s) => {
    if (s.uid !== undefined) leave(s);
  });
}
