// Contact lists: contactlist, addcontact, delcontact, and import (address-book match).

import { ListReply } from "../protocol/codec.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import { requiredString } from "../protocol/validation.js";
import type { UserRecord } from "../storage/layout.js";
import { normaliseEmail, normalisePhone } from "./profile-fields.js";
import { findUser, linksLockKey, readSynced, stillSignedIn, underLocks, type Services } from "./services.js";
import { SEARCH_LIMIT } from "../limits.js";

interface ImportEntry {
  myid?: string | number;
  name?: string;
  phone?: string;
  email?: string;
}

function contactCard(u: UserRecord) {
  return { uid: u.uid, nick: u.nick, email: u.email, phone: u.phone };
}


/** addcontact's refusals (the cluster's log decides them too). */
export const contactErrors = {
  listed: () => new ProtocolError(Code.AlreadyExist, "that user is already in your contact list"),
  full: (cap: number) => new ProtocolError(Code.RateLimited, `your contact list holds ${cap} users; remove one first`),
};

export function registerContacts(sv: Services): void {
  const { dispatcher, users, contacts, storage, router, hooks, config, locks } = sv;

  // Presence: the users who list someone hear when their first connection opens and
  // when their last one closes.
  // One change of a user at a time, in the order they happened: each waits for a read,
  // and a quick connect-and-close could publish its offline before its online. Changes
  // that come while one is published are folded into the latest (presenceNext), sent
  // only if it differs from what was just sent: a client connecting and closing in a
  // loop queued two reads of its listers per connection, for as long as it went on.
  // A deleted account's hook is given who listed it: its entries are gone by then.
  const presenceNext = new Map<string, { online: boolean; audience?: readonly string[] }>();
  const presenceBusy = new Set<string>();
  hooks.onPresence(async (uid, online, audience) => {
    if (presenceBusy.has(uid)) {
      // An account's deletion comes with who listed it (its entries are gone by then):
      // kept through a later change without one (its sessions' ends), or the watchers'
      // last word on the user stayed "online".
      presenceNext.set(uid, { online, audience: audience ?? presenceNext.get(uid)?.audience });
      return;
    }
    presenceBusy.add(uid);
    let change: { online: boolean; audience?: readonly string[] } | undefined = { online, audience };
    let sent: boolean | undefined;
    try {
      while (change !== undefined) {
        if (change.online !== sent) {
          try {
            router.publish({ kind: "presence", uid, online: change.online }, { users: change.audience ?? (await contacts.listedBy(uid)) });
            sent = change.online;
          } catch (err) {
            sv.log.error({ err, uid }, "telling a user's presence failed");
          }
        }
        change = presenceNext.get(uid);
        presenceNext.delete(uid);
      }
    } finally {
      presenceBusy.delete(uid);
    }
  });

  dispatcher.register<{ q: string }>({
    name: "searchuser",
    cluster: true,
    schema: { type: "object", required: ["q"], properties: { q: requiredString(64) } },
    async handle(req) {
      // Prefix range reads on the nick and login indexes (both lower-case): 50 keys at a
      // time, never a scan of all users. Email and phone are never shown, nor matched (a
      // login that is an address is its account's email: prefixSearch skips it).
      const [byNick, byLogin] = await Promise.all([
        users.prefixSearch("nick", req.data.q, SEARCH_LIMIT),
        users.prefixSearch("login", req.data.q, SEARCH_LIMIT),
      ]);
      const list = [];
      for (const uid of new Set([...byNick, ...byLogin])) {
        if (list.length === SEARCH_LIMIT) break;
        const u = await users.get(uid);
        if (u) list.push({ uid, nick: u.nick });
      }
      return { list };
    },
  });

  dispatcher.register({
    name: "contactlist",
    cluster: true,
    schema: { type: "object" },
    async handle(req) {
      const uids = await contacts.list(req.session.uid as string);
      // Pictures make this reply large: each card is read and written in turn.
      async function* cards() {
        for (const uid of uids) {
          const u = await users.get(uid);
          if (u) yield { ...contactCard(u), picture: u.picture, user_status: u.status, online: router.isOnline(uid) };
        }
      }
      return new ListReply({}, "list", cards);
    },
  });

  dispatcher.register<{ uid: string }>({
    name: "addcontact",
    cluster: true,
    schema: { type: "object", required: ["uid"], properties: { uid: requiredString(64) } },
    async handle(req) {
      const me = req.session.uid as string;
      const { uid } = req.data;
      if (uid === me) throw new ProtocolError(Code.AlreadyExist, "you cannot add yourself as a contact");
      const check = async () => {
        // In cluster mode a user registered through another node a moment ago may not be
        // applied here yet: findUser syncs with the log before answering 8.
        const u = await findUser(sv, uid);
        if (!u) throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
        if (await contacts.has(me, uid)) throw contactErrors.listed();
        const cap = config.maxContacts;
        if ((await contacts.count(me, cap)) >= cap) throw contactErrors.full(cap);
        return u;
      };
      if (sv.cluster) {
        const { cluster } = sv;
        // Checked here for a quick answer, and again by the log (concurrent adds). This
        // node's view may lag a removal made through another node a moment ago: "listed"
        // or "full" is said only once the node has applied the log as it stands now.
        const u = await check().catch(async (err: unknown) => {
          if (!(err instanceof ProtocolError) || err.code === Code.UserNotFound) throw err;
          await cluster.sync();
          return check();
        });
        stillSignedIn(req, me);
        if ((await cluster.run({ k: "contact", owner: me, uid, add: true, cap: config.maxContacts })).k === "nouser") {
          throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
        }
        return { user: contactCard(u) };
      }
      // Under both users' links locks (sorted): a second device adding the same contact
      // at once gets 1, not a second 0, and a deletion of either account (which holds
      // its links lock) sees the entry and removes it, or comes first and this gets 8
      // or NeedAuth. (Under their user locks, others' adds queued the user's own login.)
      return underLocks(locks, [me, uid].sort().map(linksLockKey), async () => {
        if (!(await users.get(me))) throw new ProtocolError(Code.NeedAuth, "the account was deleted; nothing was changed");
        const u = await check();
        // Ended meanwhile (a password change, a logout of this session elsewhere).
        stillSignedIn(req, me);
        await storage.commit(contacts.addOps(me, uid));
        return { user: contactCard(u) };
      });
    },
  });

  dispatcher.register<{ uid: string }>({
    name: "delcontact",
    cluster: true,
    schema: { type: "object", required: ["uid"], properties: { uid: requiredString(64) } },
    async handle(req) {
      const me = req.session.uid as string;
      const { uid } = req.data;
      // In cluster mode, an add through another node a moment ago may not be applied here
      // yet: readSynced syncs with the log before answering "not listed".
      if (!(await readSynced(sv, () => contacts.has(me, uid), (listed) => !listed))) {
        if (!(await findUser(sv, uid))) throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
        return { uid }; // not listed: nothing to remove
      }
      stillSignedIn(req, me);
      if (sv.cluster) await sv.cluster.run({ k: "contact", owner: me, uid, add: false });
      else await storage.commit(contacts.removeOps(me, uid));
      return { uid };
    },
  });

  dispatcher.register<{ contacts: ImportEntry[] }>({
    name: "import",
    cluster: true,
    schema: {
      type: "object",
      required: ["contacts"],
      properties: {
        contacts: {
          type: "array",
          maxItems: config.maxImport,
          errorCode: Code.TooLarge,
          items: {
            type: "object",
            properties: {
              myid: { type: ["string", "number"] },
              name: { type: "string" },
              phone: { type: "string" },
              email: { type: "string" },
            },
          },
        },
      },
    },
    async handle(req) {
      const me = req.session.uid as string;
      const entries = req.data.contacts;
      const emails = entries.map((e) => (e.email ? normaliseEmail(e.email) : undefined));
      const phones = entries.map((e) => (e.phone ? normalisePhone(e.phone) : undefined));
      const [byEmail, byPhone] = await Promise.all([users.lookupMany("email", emails), users.lookupMany("phone", phones)]);
      const list = [];
      for (let i = 0; i < entries.length; i++) {
        const uid = byEmail[i] ?? byPhone[i];
        if (uid === undefined || uid === me) continue;
        const u = await users.get(uid);
        if (u) list.push({ myid: entries[i].myid ?? "", ...contactCard(u) });
      }
      return { list };
    },
  });
}
