// Operator actions: the admin port's POST routes and `wirechat user|ban …` call these,
// on a running server or on a stopped server's data dir alike. A user is named by login
// or by uid.

import { canonicalAddress } from "../addresses.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import type { Ban } from "../storage/bans.js";
import type { BanKind, UserRecord } from "../storage/layout.js";
import { readValues } from "../storage/range.js";
import type { AccountOps } from "./accounts.js";
import { readSynced, type Services } from "./services.js";

/** A user as the operator sees it (never the password hash). */
export interface UserSummary {
  uid: string;
  login: string;
  nick: string;
  email: string;
  phone: string;
  status: string;
  created: number;
  /** Connections of the user to this node. */
  online: number;
  /** Cluster mode: other nodes with a connection of the user (presence counts nodes, not their connections). */
  onlineElsewhere?: number;
  banned: boolean;
}

export interface AdminOps {
  /** The user a login or uid names (8 when none). */
  resolve(user: string): Promise<UserRecord>;
  summary(u: UserRecord): UserSummary;
  /** Users in uid order after `after`, at most `limit`. */
  list(after: string, limit: number): Promise<UserSummary[]>;
  addUser(login: string, pass: string, nick: string): Promise<UserSummary>;
  passwd(user: string, pass: string): Promise<{ uid: string; revoked: number }>;
  deleteUser(user: string): Promise<{ uid: string }>;
  kick(user: string): Promise<{ uid: string; connections: number }>;
  /** Bans a login (its sessions are revoked, its connections closed) or an address. */
  /**
   * `closed`: a login's, the account's connections it closed (in cluster mode this
   * node's); an address's, in cluster mode, this node's connections the log's apply closed.
   */
  ban(kind: BanKind, value: string, reason: string): Promise<Ban & { closed?: number }>;
  unban(kind: BanKind, value: string): Promise<boolean>;
  bans(): Ban[];
  registration(open?: boolean): Promise<"open" | "closed">;
}

/** A ban's reason, in characters (the admin port and the offline CLI alike). */
const BAN_REASON_MAX = 256;
/** User records read at a time by list (each may hold a picture of up to --max-picture). */
const LIST_PAGE = 64;

export function registerAdmin(sv: Services, accounts: AccountOps): AdminOps {
  const { users, router, bans } = sv;

  async function resolve(user: string): Promise<UserRecord> {
    // A uid first: uids are the server's, logins anyone's. A login chosen to equal a
    // victim's uid (both can be 12 hex digits) must not take the operator's kick, ban,
    // delete or export of that uid onto a decoy account.
    // In cluster mode, a user registered through another node a moment ago is found
    // once this node has applied the log (readSynced), in the same order.
    const u = await readSynced(sv, async () => {
      const byUid = await users.get(user);
      if (byUid !== undefined) return byUid;
      const byLogin = await users.lookup("login", user);
      return byLogin !== undefined ? await users.get(byLogin) : undefined;
    });
    if (!u) throw new ProtocolError(Code.UserNotFound, `no user with login or uid '${user}'`);
    return u;
  }

  function summary(u: UserRecord): UserSummary {
    const { uid, login, nick, email, phone, status, created } = u;
    const summary: UserSummary = { uid, login, nick, email, phone, status, created, online: router.sessions(uid).length, banned: bans.banned("login", login) !== undefined };
    if (router.elsewhere !== undefined) summary.onlineElsewhere = router.nodesElsewhere(uid);
    return summary;
  }

  return {
    resolve,
    summary,
    async list(after, limit) {
      // Whole records are read (a picture may be --max-picture): LIST_PAGE at a time,
      // each let go once summed up (a page of 1,000 held up to 256 MB).
      const out: UserSummary[] = [];
      for (let from = after; out.length < limit; ) {
        const page = await readValues<UserRecord>(sv.storage.spaces.users, { gt: from, limit: Math.min(LIST_PAGE, limit - out.length) });
        if (page.length === 0) break;
        for (const u of page) out.push(summary(u));
        from = page[page.length - 1].uid;
      }
      return out;
    },
    async addUser(login, pass, nick) {
      return summary(await accounts.create(login, pass, nick));
    },
    async passwd(user, pass) {
      const u = await resolve(user);
      const { revoked } = await accounts.setPassword(u.uid, pass);
      sv.log.info({ uid: u.uid, revoked }, "password set by an operator");
      return { uid: u.uid, revoked };
    },
    async deleteUser(user) {
      const u = await resolve(user);
      if (!(await accounts.remove(u.uid))) throw new ProtocolError(Code.UserNotFound, `no user with login or uid '${user}'`);
      sv.log.info({ uid: u.uid, login: u.login }, "account deleted by an operator");
      return { uid: u.uid };
    },
    async kick(user) {
      const u = await resolve(user);
      const { connections } = await accounts.kick(u.uid, "disconnected by an operator", false);
      sv.log.info({ uid: u.uid, connections }, "user kicked by an operator");
      return { uid: u.uid, connections };
    },
    async ban(kind, value, reason) {
      if ([...reason].length > BAN_REASON_MAX) throw new ProtocolError(Code.InvalidData, `the reason is over ${BAN_REASON_MAX} characters`);
      // A user may be named by uid too; the ban is always on the login (what auth checks).
      const u = kind === "login" ? await resolve(value) : undefined;
      const key = u ? u.login : canonicalAddress(value);
      let ban: (Ban & { closed?: number }) | undefined;
      if (sv.cluster) {
        // One command: every node stores the ban, ends the account's sessions and closes
        // the address's connections there.
        const at = Math.floor(Date.now() / 1000);
        // A login's: counted as kick counts them, this node's connections of the account.
        const here = u ? sv.router.sessions(u.uid).length : 0;
        const out = await sv.cluster.run({ k: "ban", kind, value: key, reason, at, ...(u ? { uid: u.uid } : {}) });
        ban = bans.banned(kind, key);
        if (!ban) throw new ProtocolError(Code.Unavailable, "the ban could not be confirmed; try again");
        if (u) {
          ban = { ...ban, closed: here };
          sv.metrics.closes.kicked += here; // as a kick counts them (accounts.ts kick)
        } else if (out.k === "done" && out.closed !== undefined) ban = { ...ban, closed: out.closed };
      } else {
        ban = await bans.add(kind, key, reason);
        if (!ban) throw new ProtocolError(Code.RateLimited, "the ban list is full");
        if (u) ban = { ...ban, closed: (await accounts.kick(u.uid, "the account was banned", true)).connections };
      }
      sv.log.info({ kind, value: key, reason }, "banned by an operator");
      return ban;
    },
    async unban(kind, value) {
      let key = value;
      if (kind === "login") {
        // Named as ban names it: a uid first, then a login; a login no account holds
        // (deleted since) as it is.
        const u = await resolve(value).catch((err: unknown) => {
          if (err instanceof ProtocolError && err.code === Code.UserNotFound) return undefined;
          throw err;
        });
        if (u) key = u.login;
      } else key = canonicalAddress(value);
      let had: boolean;
      if (sv.cluster) {
        const out = await sv.cluster.append({ k: "unban", kind, value: key });
        had = out.k === "done" && out.n === 1;
      } else had = await bans.remove(kind, key);
      if (had) sv.log.info({ kind, value: key }, "ban lifted by an operator");
      return had;
    },
    bans: () => bans.list(),
    async registration(open) {
      if (open !== undefined) {
        // Stored (features/registration.ts); in cluster mode through the log: every node
        // opens or closes it and stores that in its view.
        if (sv.cluster) await sv.cluster.append({ k: "registration", open });
        else await sv.registration.set(open ? "open" : "closed");
        sv.log.info({ registration: open ? "open" : "closed" }, "registration set by an operator");
      }
      return sv.registration.value;
    },
  };
}
