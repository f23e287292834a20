// Profiles: userinfo and setuserinfo, and the user directory other front doors use
// (user numbers, lookup by email).

import { Code, ProtocolError } from "../protocol/codes.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import type { UserRecord } from "../storage/layout.js";
import type { UniqueIndex } from "../storage/users.js";
import { isBase64, normaliseEmail, normalisePhone } from "./profile-fields.js";
import { findUser, stillSignedIn, userLockKey, type Services } from "./services.js";

export function publicProfile(u: UserRecord) {
  return { uid: u.uid, num: u.num, nick: u.nick, email: u.email, phone: u.phone, picture: u.picture, user_status: u.status };
}

interface SetUserInfo {
  user_status?: string;
  email?: string;
  phone?: string;
  picture?: string;
}

/**
 * Users as the doors that do not speak uids see them: by number (the seeds that show
 * users as JSON numbers) and by email (the seed that logs in by email).
 */
export interface UserDirectory {
  /** The number of user `uid`; undefined when there is no such user. */
  numOf(uid: string): Promise<number | undefined>;
  /** The uid of user number `num`; undefined when there is none (any more). */
  uidOf(num: number): Promise<string | undefined>;
  /**
   * The user whose profile email is `email`, normalised as setuserinfo stores it
   * (trimmed, lower-cased); undefined when nobody has it or it is not an address.
   */
  byEmail(email: string): Promise<UserRecord | undefined>;
}

export function registerProfiles(sv: Services): UserDirectory {
  const { dispatcher, users, storage, config } = sv;

  dispatcher.register<{ user: string }>({
    name: "userinfo",
    cluster: true,
    schema: { type: "object", required: ["user"], properties: { user: requiredString(64) } },
    async handle(req) {
      const u = await findUser(sv, req.data.user);
      if (!u) throw new ProtocolError(Code.UserNotFound, `no user with uid '${req.data.user}'`);
      return publicProfile(u);
    },
  });

  dispatcher.register<SetUserInfo>({
    name: "setuserinfo",
    cluster: true,
    schema: {
      type: "object",
      properties: {
        user_status: optionalString(256),
        email: optionalString(254),
        phone: optionalString(32),
        picture: { type: "string", maxLength: config.maxPicture, errorCode: Code.TooLarge },
      },
    },
    async handle(req) {
      const uid = req.session.uid as string;
      const d = req.data;
      // Under the user's lock: the record read is the one the write replaces, so the
      // batch removes the index entries it really had (two connections setting an email
      // at once would otherwise leave the first one pointing at the user for good).
      await sv.locks.run(userLockKey(uid), async () => {
        // A password change, logout or deletion that held the lock first has ended this
        // session: nothing is changed after it answered.
        stillSignedIn(req, uid);
        const prev = await users.get(uid);
        if (!prev) throw new ProtocolError(Code.UserNotFound, "your account no longer exists");
        // A field that is not sent stays as it was; an empty string clears it.
        const next: UserRecord = { ...prev };
        if (d.user_status !== undefined) next.status = d.user_status;
        if (d.email !== undefined) {
          const e = d.email === "" ? "" : normaliseEmail(d.email);
          if (e === undefined) throw new ProtocolError(Code.InvalidData, "'email' is not an email address");
          next.email = e;
        }
        if (d.phone !== undefined) {
          const p = d.phone === "" ? "" : normalisePhone(d.phone);
          if (p === undefined) throw new ProtocolError(Code.InvalidData, "'phone' is not a phone number");
          next.phone = p;
        }
        if (d.picture !== undefined) {
          if (!isBase64(d.picture)) throw new ProtocolError(Code.InvalidData, "'picture' is not valid base64");
          next.picture = d.picture;
        }
        if (sv.cluster) {
          // The log decides who gets a contested email or phone (features/cluster.ts).
          const out = await sv.cluster.append({
            k: "profile",
            uid,
            status: d.user_status,
            email: d.email === undefined ? undefined : next.email,
            phone: d.phone === undefined ? undefined : next.phone,
            picture: d.picture,
            logins: true,
          });
          if (out.k === "taken") throw new ProtocolError(Code.AlreadyExist, `that ${out.index} belongs to another user`);
          if (out.k !== "done") throw new ProtocolError(Code.UserNotFound, "your account no longer exists");
          return;
        }
        const unique: [UniqueIndex, string][] = [];
        if (next.email && next.email !== prev.email) unique.push(["email", next.email]);
        if (next.phone && next.phone !== prev.phone) unique.push(["phone", next.phone]);
        // (An email may not be another user's login either: UserStore.claim.)
        const taken = await users.claim(unique, uid);
        if (taken) throw new ProtocolError(Code.AlreadyExist, `that ${taken} belongs to another user`);
        try {
          await storage.commit(users.saveOps(next, prev));
          users.saved(next);
        } finally {
          users.release(unique);
        }
      });
      return {};
    },
  });

  return {
    numOf: (uid) => users.numOf(uid),
    uidOf: (num) => users.uidOf(num),
    async byEmail(email) {
      const e = normaliseEmail(email);
      const uid = e === undefined ? undefined : await users.lookup("email", e);
      return uid === undefined ? undefined : users.get(uid);
    },
  };
}
