// Channels: createchannel (public or private, with members), channellist, enter,
// invite, leave, deletechannel, and the events ev_enter, ev_leave, ev_channel_deleted.
// Membership is stored, so it survives disconnects and restarts; messages to a channel
// are handled by the messages module.
//
// A private channel is its members' alone: listed to them, entered by them (and its
// owner), grown by invite. Its name is not in the public name index, so it neither
// takes nor reveals a public name, and two private channels may share one.

import { Code, ProtocolError } from "../protocol/codes.js";
import { ListReply } from "../protocol/codec.js";
import { recordsInPages } from "./record-pages.js";
import type { Event } from "../protocol/events.js";
import { nowSeconds, type Fields } from "../protocol/frames.js";
import { compileSchema, optionalString, requiredString } from "../protocol/validation.js";
import type { ChannelRecord } from "../storage/layout.js";
import { channelConv, directConv } from "../storage/layout.js";
import { nameKey } from "../storage/users.js";
import type { Command, Outcome } from "./cluster.js";
import { convLockKey, findUser, linksLockKey, underLocks, type Services } from "./services.js";

/** Messages shown by `enter`. */
const ENTER_HISTORY = 20;
/** The KeyedLock key purges take, one at a time. */
const PURGE_LOCK = "purges";
/**
 * Purges waiting in memory (a background task and a turn at PURGE_LOCK each); past it a
 * deleted conversation's purge is left to its mark on disk, which a pass over the marks
 * takes up once those in memory are done (see purgeLater).
 */
const PURGES_QUEUED = 1024;
/** Purge marks read at a time by that pass (and at start-up). */
const PURGE_MARKS_PAGE = 256;
/** `channellist` page: default and largest. */
const LIST_DEFAULT = 100;
const LIST_MAX = 500;
/**
 * Most members one createchannel may name besides its creator (12 past it): each is
 * checked, locked and written in the creation's one batch, and told with an event.
 * More join by invite.
 */
export const MAX_CREATE_MEMBERS = 100;

/** A createchannel request, and what ChannelOps.create takes. */
export interface NewChannel {
  name: string;
  descr?: string;
  private?: boolean;
  /** uids of existing users, members at once (duplicates and the creator are ignored). */
  members?: readonly string[];
}

const NEW_CHANNEL_SCHEMA = {
  type: "object",
  required: ["name"],
  properties: {
    name: { ...requiredString(64), pattern: "^[^\\p{Cc}]+$" },
    descr: optionalString(1024),
    private: { type: "boolean" },
    members: { type: "array", maxItems: MAX_CREATE_MEMBERS, errorCode: Code.TooLarge, items: requiredString(64) },
  },
} as const;

/** The channel actions' refusals: one text each, for the handlers and cluster mode's apply. */
export const channelErrors = {
  taken: (name: string) => new ProtocolError(Code.AlreadyExist, `a channel named '${name}' already exists`),
  /** A public channel whose name reads as this one (storage/users.ts nameKey). */
  readsAlike: (name: string) => new ProtocolError(Code.AlreadyExist, `a channel whose name reads as '${name}' already exists`),
  notFound: (chid: string) => new ProtocolError(Code.ChannelNotFound, `no channel with id '${chid}'`),
  notMember: (chid: string) => new ProtocolError(Code.InvalidChannel, `you are not a member of channel '${chid}'`),
  privateChannel: (chid: string) => new ProtocolError(Code.InvalidChannel, `channel '${chid}' is private: only its members can enter it`),
  noUser: (uid: string) => new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`),
  notOwner: () => new ProtocolError(Code.Forbidden, "only the channel's owner can delete it"),
  ownedCap: (cap: number) => new ProtocolError(Code.RateLimited, `you own ${cap} channels, the most one user may; delete one first`),
  joinedCap: (cap: number) => new ProtocolError(Code.RateLimited, `you are a member of ${cap} channels, the most one user may; leave one first`),
  /** Someone else adding `who` (createchannel's members, invite): see othersJoinCap. */
  addedCap: (cap: number, who: string) =>
    new ProtocolError(Code.RateLimited, `${who} is a member of at least ${cap} channels, the most others may add them to (they may still join more themselves)`),
};

/**
 * Of --max-joined-channels, the memberships others may give a user (createchannel's
 * members, invite): the last tenth (at least one) is only the user's own to fill, by
 * entering or creating a channel. Otherwise anyone could fill a user's memberships
 * and lock them out of every channel and door that enters one (a review did it with
 * ten accounts of 100 private channels each, in 2.5 s: the victim could neither enter
 * nor create a channel, nor log in on the seed-003 door, which enters its lobby).
 */
export function othersJoinCap(maxJoined: number): number {
  return maxJoined - Math.ceil(maxJoined / 10);
}

/**
 * Channels for the other front doors: the same rules, codes and events as the native
 * actions (a refusal is a ProtocolError with createchannel's or invite's code).
 */
export interface ChannelOps {
  /**
   * Creates a channel owned by `owner` whose members are the owner and `members`, as
   * createchannel does (`spec` is checked against its schema); each member added gets
   * ev_enter naming themselves. Codes 1 (a public channel's name is taken), 3, 4, 8 (a
   * member does not exist), 12 (too many members), 13 (a cap).
   */
  create(owner: string, spec: NewChannel): Promise<ChannelRecord>;
  /**
   * `by`, a member of channel `chid` or its owner, makes user `uid` a member, as invite
   * does: every member gets ev_enter. False when `uid` already was one (nothing sent).
   * Codes 8, 9, 10 (`by` is not a member), 13 (`uid` is in as many channels as allowed).
   */
  invite(by: string, chid: string, uid: string): Promise<boolean>;
  /** Whether `uid` is a member of channel `chid` (its events reach them, they may post). */
  isMember(chid: string, uid: string): Promise<boolean>;
}

/** Member records read at a time for `enter`'s list. */
const MEMBER_PAGE = 64;

export function registerChannels(sv: Services): ChannelOps {
  /** A channel's last messages for `enter`, read a page at a time as they are written. */
  async function* lastMessages(seqs: readonly number[]): AsyncIterable<Fields> {
    // In pages of at most PAGE_CHARS (record-pages.ts): ten of --max-frame each were
    // 10 MiB held by every connection that entered without reading.
    for await (const m of recordsInPages((q) => sv.messages.recordsAt(q), seqs)) {
      yield { mid: m.mid, from: m.from, nick: m.nick, body: m.body, time: m.time };
    }
  }

  const { dispatcher, channels, users, messages, storage, router, locks, config } = sv;

  /**
   * `enter`'s users: each member's card, MEMBER_PAGE members (and their records) read at
   * a time as they are written. A reply holds its place in the list, not a copy of it:
   * a copy each, a client entering a channel of 100,000 members on many connections
   * without reading held 800 KB per connection outside --outbound-cap. A member who
   * joins or leaves while the list is read is listed or not by where they fall.
   */
  async function* memberCards(chid: string): AsyncIterable<Fields> {
    for (let after = ""; ; ) {
      const page = await channels.membersAfter(chid, after, MEMBER_PAGE);
      const found = await Promise.all(page.map((uid) => users.get(uid)));
      for (let j = 0; j < page.length; j++) {
        const u = found[j];
        if (u) yield { uid: page[j], nick: u.nick, online: router.isOnline(page[j]) };
      }
      if (page.length < MEMBER_PAGE) return;
      after = page[page.length - 1];
    }
  }

  /** The name keys (nameKey) of public channels being created (not yet committed). */
  const creating = new Set<string>();
  /** (channel, user) joins in progress → whether it was a first entry. */
  const joins = new Map<string, Promise<boolean>>();

  async function channelOf(chid: string): Promise<ChannelRecord> {
    const c = await channels.get(chid);
    if (!c) throw channelErrors.notFound(chid);
    return c;
  }

  /**
   * Cluster mode: appends a channel command (features/cluster.ts); its refusal is
   * thrown. Its events are the applier's, sent on every node in log order.
   */
  function inCluster(cmd: Command): Promise<Outcome> {
    return (sv.cluster as NonNullable<typeof sv.cluster>).run(cmd);
  }

  /** Cluster mode's createchannel: the channel's chid once every node has it. */
  async function createInCluster(owner: string, spec: NewChannel): Promise<string> {
    if (spec.private !== true) shownName(spec.name);
    const out = await inCluster(chcreateCommand(owner, spec, config.maxOwnedChannels, config.maxJoinedChannels));
    return (out as { chid: string }).chid;
  }

  /**
   * A channel's event to `uids` (read by the caller), in its place behind the channel's
   * events still waiting for their members: ev_channel_deleted went out before a message
   * sent just before the deletion, whose event waited for a members read.
   */
  function tell(uids: readonly string[], ev: Event & { chid: string }): void {
    router.publish(ev, { users: uids, channel: ev.chid });
  }

  /**
   * 13 when `uid` may not join one more channel (nor, `owning`, own one more). `who`
   * names them in the refusal when they are not the caller. Call under their
   * `channels-of` lock, so that concurrent joins cannot pass the count together.
   */
  async function checkCaps(uid: string, owning: boolean, who?: string): Promise<void> {
    if (owning && (await channels.ownedCount(uid, config.maxOwnedChannels)) >= config.maxOwnedChannels) {
      throw channelErrors.ownedCap(config.maxOwnedChannels);
    }
    const cap = who === undefined ? config.maxJoinedChannels : othersJoinCap(config.maxJoinedChannels);
    if ((await channels.joinedCount(uid, config.maxJoinedChannels)) >= cap) {
      throw who === undefined ? channelErrors.joinedCap(cap) : channelErrors.addedCap(cap, who);
    }
  }

  /**
   * The lock of one channel's membership as a whole: joins from their last check to
   * their commit, and a removal. Always the last one taken.
   */
  function chanLockKey(chid: string): string {
    return `chan:${chid}`;
  }

  /**
   * 8 naming `who` (an invitee), else NeedAuth (the caller's own account), when `uid`'s
   * account was deleted meanwhile. Call under their user lock.
   */
  async function stillThere(uid: string, who?: string): Promise<void> {
    if (await users.get(uid)) return;
    throw who === undefined ? new ProtocolError(Code.NeedAuth, "the account was deleted; nothing was changed") : channelErrors.noUser(uid);
  }

  /**
   * Makes `uid` a member of `c` if they are not one and are under their cap (13); true
   * when they were not a member. `by`: the member inviting them (errors then name the
   * invitee). One join per (channel, user) at a time: two devices entering together,
   * or an enter and an invite, make one first entry, not two. The promise is registered
   * before any await. Under the user's links lock and the inviter's (sorted), then the
   * user's `channels-of` lock, then the channel's, so that a deletion of either account
   * cannot miss the membership or the invitation (services.ts linksLockKey).
   */
  async function join(c: ChannelRecord, uid: string, by?: string): Promise<boolean> {
    const who = by === undefined ? undefined : `user '${uid}'`;
    const key = `${c.chid}\u0000${uid}`;
    for (let running = joins.get(key); running !== undefined; running = joins.get(key)) {
      try {
        await running;
        return false;
      } catch {
        // That join failed its own checks, which may not be ours (an invite is held to
        // the cap others may fill, the user's own enter to the whole cap): ours is made
        // and checked anew, so an invite sent alongside cannot refuse the user's enter.
      }
    }
    const first = (async () => {
      if (await channels.isMember(c.chid, uid)) return false;
      const lockUsers = [...new Set(by === undefined ? [uid] : [uid, by])].sort();
      return underLocks(locks, [...lockUsers.map(linksLockKey), `channels-of:${uid}`, chanLockKey(c.chid)], async () => {
        if (by !== undefined) {
          await stillThere(by);
          if (c.owner !== by && !(await channels.isMember(c.chid, by))) throw channelErrors.notMember(c.chid);
        }
        await stillThere(uid, who);
        // Again under the lock: a creation naming them may have committed meanwhile.
        if (await channels.isMember(c.chid, uid)) return false;
        // A private channel's member entering (enter checked them) who is one no more:
        // a leave from their other connection committed since. Joining would undo it.
        if (by === undefined && c.private && c.owner !== uid) throw channelErrors.privateChannel(c.chid);
        await checkCaps(uid, false, who);
        // The channel lock keeps a removal from reading the members between this check
        // and the commit (the membership would outlive the channel).
        if (channels.isGone(c.chid)) throw channelErrors.notFound(c.chid);
        await storage.commit(channels.joinOps(c.chid, uid, nowSeconds(), c.private === true)).catch((err: unknown) => {
          channels.notJoined(c.chid);
          throw err;
        });
        channels.joined(c.chid, uid);
        return true;
      });
    })();
    joins.set(key, first);
    try {
      return await first;
    } finally {
      joins.delete(key);
    }
  }

  /**
   * Creates a channel (see ChannelOps.create) and returns it with the members added
   * besides the owner. The links locks of the owner and the members are held until the
   * batch is written, so that none of them is deleted in between (their deletion would
   * miss the new membership, and a channel of a deleted owner could never be deleted);
   * then every new member's `channels-of` lock for the caps. All are
   * taken in one order (links locks by uid, then `channels-of` by uid), as every other
   * holder of more than one takes them, so two creations cannot wait on each other.
   */
  async function createChannel(owner: string, spec: NewChannel): Promise<{ c: ChannelRecord; added: { uid: string; nick: string }[] }> {
    const { name, descr = "" } = spec;
    const priv = spec.private === true;
    const members = [...new Set(spec.members ?? [])].filter((uid) => uid !== owner).sort();
    const key = priv ? "" : shownName(name);
    const taken = () => channelErrors.taken(name);
    // A public name is claimed before the lookup, so two creations of one name (or of
    // two that read alike) cannot both pass it. Private names are not unique.
    if (!priv) {
      if (creating.has(key)) throw taken();
      creating.add(key);
    }
    try {
      if (!priv) {
        const [exact, alike] = await Promise.all([channels.byName(name), channels.readsAlike(name)]);
        if (exact !== undefined) throw taken();
        if (alike.length > 0) throw channelErrors.readsAlike(name);
      }
      const everyone = [owner, ...members].sort();
      const lockKeys = [...everyone.map(linksLockKey), ...everyone.map((uid) => `channels-of:${uid}`)];
      return await underLocks(locks, lockKeys, async () => {
        await stillThere(owner);
        const found = await Promise.all(members.map((uid) => findUser(sv, uid)));
        const missing = members.find((_, i) => found[i] === undefined);
        if (missing !== undefined) throw channelErrors.noUser(missing);
        await checkCaps(owner, true);
        for (const uid of members) await checkCaps(uid, false, `user '${uid}'`);
        const c: ChannelRecord = { chid: channels.nextChid(), name, descr, owner, created: nowSeconds() };
        if (priv) c.private = true;
        await storage.commit([...channels.createOps(c), ...members.flatMap((uid) => channels.joinOps(c.chid, uid, c.created, priv))]).catch((err: unknown) => {
          channels.notJoined(c.chid, members.length + 1); // the owner's join and each member's
          throw err;
        });
        channels.joined(c.chid, owner);
        for (const uid of members) channels.joined(c.chid, uid);
        return { c, added: members.map((uid, i) => ({ uid, nick: found[i]?.nick as string })) };
      });
    } finally {
      if (!priv) creating.delete(key);
    }
  }

  /**
   * The ev_enter of a member added at creation, for that member alone: it tells them
   * they are in (`enter` lists the others; N members told of each other would be N²).
   */
  function entered(chid: string, m: { uid: string; nick: string }): Event & { chid: string } {
    return { kind: "enter", chid, uid: m.uid, nick: m.nick };
  }

  dispatcher.register<NewChannel>({
    name: "createchannel",
    cluster: true,
    schema: NEW_CHANNEL_SCHEMA,
    async handle(req) {
      if (sv.cluster) return { chid: await createInCluster(req.session.uid as string, req.data) };
      const { c, added } = await createChannel(req.session.uid as string, req.data);
      for (const m of added) req.emit(entered(c.chid, m), { users: [m.uid] });
      return { chid: c.chid };
    },
  });

  /**
   * `by` (a member of `chid`, or its owner) makes `uid` a member (see ChannelOps.invite).
   */
  async function inviteTo(by: string, chid: string, uid: string): Promise<{ c: ChannelRecord; added: boolean; nick: string }> {
    const c = await channelOf(chid);
    if (c.owner !== by && !(await channels.isMember(c.chid, by))) throw channelErrors.notMember(c.chid);
    const u = await findUser(sv, uid);
    if (!u) throw channelErrors.noUser(uid);
    return { c, added: await join(c, uid, by), nick: u.nick };
  }

  dispatcher.register<{ channel: string; uid: string }>({
    name: "invite",
    cluster: true,
    schema: { type: "object", required: ["channel", "uid"], properties: { channel: requiredString(64), uid: requiredString(64) } },
    async handle(req) {
      if (sv.cluster) {
        const { channel, uid } = req.data;
        await inCluster({ k: "join", t: nowSeconds(), chid: channel, uid, by: req.session.uid as string, cap: othersJoinCap(config.maxJoinedChannels) });
        return {};
      }
      const { c, added, nick } = await inviteTo(req.session.uid as string, req.data.channel, req.data.uid);
      // As for a first entry: every member hears of it, the invitee included.
      if (added) req.emit({ kind: "enter", chid: c.chid, uid: req.data.uid, nick }, { channel: c.chid });
      return {};
    },
  });

  // The public channels and the caller's private ones, a page at a time in chid order
  // (a range read of up to `limit` of each, merged); `online` counts each listed
  // channel's members online from the membership cache, over the smaller of its
  // members and the users online (ChannelStore.countPresent).
  dispatcher.register<{ limit?: number; after?: string }>({
    name: "channellist",
    cluster: true,
    schema: { type: "object", properties: { limit: { type: "integer", minimum: 1 }, after: requiredString(64) } },
    async handle(req) {
      const limit = Math.min(req.data.limit ?? LIST_DEFAULT, LIST_MAX);
      const { after } = req.data;
      const [open, mine] = await Promise.all([channels.page(limit, after), channels.privatePage(req.session.uid as string, limit, after)]);
      const page = mine.length === 0 ? open : [...open, ...mine].sort((a, b) => (a.chid < b.chid ? -1 : a.chid > b.chid ? 1 : 0)).slice(0, limit);
      const list = [];
      for (const c of page) {
        const online = await channels.countPresent(c.chid, router.online);
        list.push(c.private ? { chid: c.chid, name: c.name, descr: c.descr, online, private: true } : { chid: c.chid, name: c.name, descr: c.descr, online });
      }
      return { channels: list };
    },
  });

  dispatcher.register<{ channel: string }>({
    name: "enter",
    cluster: true,
    schema: { type: "object", required: ["channel"], properties: { channel: requiredString(64) } },
    async handle(req) {
      const s = req.session;
      const me = s.uid as string;
      // Read now: a logout of this connection's session from another connection while
      // this waits on a read or the commit leaves the session without one.
      const nick = s.nick as string;
      let c: ChannelRecord;
      if (sv.cluster) {
        // A member entering again changes nothing: no command. This node's view may
        // lag (a leave through another node a moment ago): it is checked at the log's end.
        const chid = req.data.channel;
        const isMemberHere = async () => (await channels.get(chid)) !== undefined && (await channels.isMember(chid, me));
        if (!((await isMemberHere()) && (await (sv.cluster as NonNullable<typeof sv.cluster>).sync().then(isMemberHere)))) {
          await inCluster({ k: "join", t: nowSeconds(), chid, uid: me, cap: config.maxJoinedChannels });
        }
        c = await channelOf(chid);
      } else {
        c = await channelOf(req.data.channel);
        if (c.private && c.owner !== me && !(await channels.isMember(c.chid, me))) {
          throw channelErrors.privateChannel(c.chid);
        }
        // Every member hears of a first entry, the one entering included; entering
        // again is a no-op.
        if (await join(c, me)) req.emit({ kind: "enter", chid: c.chid, uid: me, nick }, { channel: c.chid });
      }
      // The members, read and written a page at a time as the connection takes them (a
      // large channel's list was read whole, a user record at a time, and written as
      // one piece that pushed the client's events past its outbound cap); the last
      // messages, which can be large, the same way.
      const conv = channelConv(c.chid);
      const seqs = await messages.historySeqs(conv, ENTER_HISTORY);
      const chid = c.chid;
      return new ListReply({}, "last_msg", () => lastMessages(seqs), [["users", () => memberCards(chid)]]);
    },
  });

  dispatcher.register<{ channel: string }>({
    name: "leave",
    cluster: true,
    schema: { type: "object", required: ["channel"], properties: { channel: requiredString(64) } },
    async handle(req) {
      const s = req.session;
      const me = s.uid as string;
      const nick = s.nick as string; // now, as enter's
      if (sv.cluster) {
        await inCluster({ k: "leave", uid: me, nick, chid: req.data.channel });
        return {};
      }
      // Under the user's locks, as a join: a deleteaccount (it holds the links lock while
      // it reads the memberships whose ev_leave it sends) comes wholly before this
      // (then there is nothing to leave) or after it (then this one is not among them).
      const chids = await underLocks(locks, [linksLockKey(me), `channels-of:${me}`], async () => {
        await stillThere(me);
        let left: string[];
        if (req.data.channel === "*") {
          left = await channels.channelsOf(me);
        } else {
          const c = await channelOf(req.data.channel);
          if (!(await channels.isMember(c.chid, me))) throw channelErrors.notMember(c.chid);
          left = [c.chid];
        }
        try {
          await storage.commit(left.flatMap((chid) => channels.leaveOps(chid, me)));
        } catch (err) {
          for (const chid of left) channels.notLeft(chid, me);
          throw err;
        }
        for (const chid of left) channels.left(chid, me);
        return left;
      });
      for (const chid of chids) req.emit({ kind: "leave", chid, uid: me, nick }, { channel: chid });
      return {};
    },
  });

  /**
   * Deletes a channel: its record, name and memberships now, its messages after (the
   * purge is recorded in the same batch, so a crash cannot leave them behind).
   */
  async function remove(c: ChannelRecord): Promise<string[] | undefined> {
    // Under the channel's lock, which joins hold from their last check to their commit:
    // the members read here are all there are. Undefined when another removal won.
    return locks.run(chanLockKey(c.chid), async () => {
      if (channels.isGone(c.chid)) return undefined;
      const members = await channels.members(c.chid);
      try {
        await storage.commit([...channels.removeOps(c, members), ...messages.purgeMarkOps(channelConv(c.chid))]);
      } catch (err) {
        channels.notRemoved(c.chid); // the channel is still there, and may be deleted again
        throw err;
      }
      channels.removed(c.chid);
      return [...members];
    });
  }

  /**
   * Removes a conversation's messages (a deleted channel's, a deleted account's own),
   * until done or `signal` (shutdown). One purge at a time (PURGE_LOCK): a user who
   * deletes their hundred channels at once started a hundred, each reading its pages.
   */
  function purge(conv: string, signal?: AbortSignal): Promise<void> {
    return locks.run(PURGE_LOCK, () => (signal?.aborted ? Promise.resolve() : purgeNow(conv, signal)));
  }

  function purgeNow(conv: string, signal?: AbortSignal): Promise<void> {
    return messages.purge(
      conv,
      async (page) => page.flatMap((m) => (m.attach ? sv.blobs.unrefOps(m.attach.sha, m.mid) : [])),
      // Blobs no longer used are collected once the page's references are gone.
      (page) => {
        for (const m of page) if (m.attach) sv.blobs.collectLater(m.attach.sha);
      },
      // Each page under the lock edits and deletes take: one in flight when the channel
      // was deleted would otherwise write its record (or history chunk) back after the
      // page removed it.
      (fn) => locks.run(convLockKey(conv), fn),
      signal,
    );
  }

  function afterRemoval(c: ChannelRecord, members: string[]): void {
    tell(members, { kind: "channelDeleted", chid: c.chid });
    purgeLater(channelConv(c.chid));
  }

  /**
   * Purges waiting in memory, and whether a purge was left to its mark meanwhile. Each
   * deletion queued a background task and a turn at PURGE_LOCK, and purges run one at
   * a time: a client creating and deleting private channels in a loop (never past its
   * owned-channel cap) queued them faster than they ran, ~1 KB of memory each, for
   * as long as it liked. Past PURGES_QUEUED the mark (written with the deletion) is the
   * only record, and a pass over the marks takes them up once the queue is empty.
   */
  let queued = 0;
  let leftToMarks = false;

  /** Purges `conv` (its mark is on disk) in the background, or leaves it to the marks' pass. */
  function purgeLater(conv: string): void {
    if (queued >= PURGES_QUEUED) {
      leftToMarks = true;
      return;
    }
    queued++;
    sv.background.run("purging a deleted conversation's messages", (signal) => purge(conv, signal).finally(purgeDone), { conv });
  }

  function purgeDone(): void {
    queued--;
    if (queued === 0 && leftToMarks) purgeMarks("purges left to their marks");
  }

  /**
   * Purges every conversation with a mark on disk, a page of marks at a time: those
   * left to their marks, and at start-up those a crash or a shutdown cut short. One
   * that cannot finish now (its mark stays for the next pass or start) holds back no
   * other.
   */
  function purgeMarks(what: string): void {
    leftToMarks = false;
    queued++;
    sv.background.run(what, async (signal) => {
      try {
        let done = 0;
        for (let after: string | undefined; !signal.aborted; ) {
          const convs = await messages.pendingPurges(after, PURGE_MARKS_PAGE);
          if (convs.length === 0) break;
          for (const conv of convs) {
            if (signal.aborted) return;
            await purge(conv, signal).catch((err: unknown) => sv.log.error({ err, conv }, "a purge failed; it runs again at the next pass or start"));
          }
          done += convs.length;
          after = convs[convs.length - 1];
        }
        if (done > 0) sv.log.info({ purges: done }, `${what}: done`);
      } finally {
        // If more were left to their marks meanwhile, another pass.
        purgeDone();
      }
    });
  }

  // Purges that a crash or a shutdown cut short go on, one at a time.
  purgeMarks("resuming interrupted purges of deleted conversations");

  // Cluster mode: the log's apply removes a channel, or an account with its messages to
  // itself, on every node (features/cluster.ts); each node purges them from its own view.
  if (sv.cluster) sv.cluster.onPurge = (conv) => purgeLater(conv);

  // A deleted account's channels (its memberships went with the account): the ones
  // it owned go, left or not (nobody could delete them any more); in the others, the
  // remaining members hear that it left.
  sv.hooks.onAccountDeleted(async (uid, nick, chids) => {
    for (const chid of chids) {
      const c = await channels.get(chid);
      if (!c) continue;
      if (c.owner === uid) {
        const members = await remove(c);
        if (members) afterRemoval(c, members);
      } else tell(await channels.members(chid), { kind: "leave", chid, uid, nick });
    }
  });

  // A deleted account's messages to itself go too: nobody can read them any more (its
  // conversations with others stay in the others' history), and they held its
  // attachments' files for good. The deletion's record keeps this hook until it is
  // done, so a purge cut short (a shutdown) runs again at the next start (in cluster
  // mode, the apply marks the purge instead: above). After the channels' hook: a long
  // history's purge held back the owned channels' removal and the members' ev_leave.
  if (!sv.cluster) {
    sv.hooks.onAccountDeleted((uid, _nick, _chids, signal) => purge(directConv(uid, uid), signal));
  }

  dispatcher.register<{ channel: string }>({
    name: "deletechannel",
    cluster: true,
    schema: { type: "object", required: ["channel"], properties: { channel: requiredString(64) } },
    async handle(req) {
      const me = req.session.uid as string;
      if (sv.cluster) {
        await inCluster({ k: "chdelete", chid: req.data.channel, by: me });
        return {};
      }
      const c = await channelOf(req.data.channel);
      if (c.owner !== me) throw channelErrors.notOwner();
      const members = await remove(c);
      if (!members) throw channelErrors.notFound(c.chid);
      req.after(() => afterRemoval(c, members));
      return {};
    },
  });

  const checkNew = compileSchema(NEW_CHANNEL_SCHEMA);
  return {
    async create(owner, spec) {
      const invalid = checkNew(spec);
      if (invalid) throw invalid;
      if (sv.cluster) {
        return channelOf(await createInCluster(owner, spec));
      }
      const { c, added } = await createChannel(owner, spec);
      for (const m of added) tell([m.uid], entered(c.chid, m));
      return c;
    },
    async invite(by, chid, uid) {
      if (sv.cluster) {
        const out = await inCluster({ k: "join", t: nowSeconds(), chid, uid, by, cap: othersJoinCap(config.maxJoinedChannels) });
        return out.k === "joined" && out.added;
      }
      const { c, added, nick } = await inviteTo(by, chid, uid);
      if (added) router.publish({ kind: "enter", chid: c.chid, uid, nick }, { channel: c.chid });
      return added;
    },
    isMember: (chid, uid) => channels.isMember(chid, uid),
  };
}

/**
 * A new public channel's name as it reads (storage/users.ts nameKey); refused (3) when it
 * shows nothing (only spaces that take no room, joiners, bidi marks...), as a nick is.
 * (A private channel's name is only its members' to see, and the seed doors name a
 * room after its members' logins, which may be of such characters.)
 */
function shownName(name: string): string {
  const key = nameKey(name);
  if (key === "") throw new ProtocolError(Code.InvalidData, "'name' must show something: it holds only invisible characters");
  return key;
}

/**
 * The log's command creating channel `spec` for `owner` ("": the server's own), with the
 * caps its apply checks (0: none).
 */
function chcreateCommand(owner: string, spec: NewChannel, maxOwned: number, maxJoined: number): Command {
  return {
    k: "chcreate",
    t: nowSeconds(),
    owner,
    name: spec.name,
    descr: spec.descr ?? "",
    priv: spec.private === true,
    members: [...new Set(spec.members ?? [])].filter((uid) => uid !== owner).sort(),
    maxOwned,
    maxJoined,
    maxAdded: othersJoinCap(maxJoined),
    // Decided with the names as they read (not the server's own channel's, named by a flag).
    ...(owner === "" ? {} : { reads: true as const }),
  };
}

/**
 * A public channel the server itself keeps (a seed door's room everyone starts in):
 * created at start-up when missing, owned by no user, so no user can delete it.
 * Returns its chid.
 */
export async function serverChannel(sv: Services, name: string, flag: string): Promise<string> {
  if (sv.cluster) {
    // Through the log: nodes starting together create it once (the first in the log wins).
    await sv.cluster.sync();
    for (;;) {
      const found = await sv.channels.byName(name);
      if (found !== undefined) return adopted(sv, found, flag);
      const out = await sv.cluster.append(chcreateCommand("", { name }, 0, 0));
      if (out.k === "channel") {
        sv.log.info({ chid: out.chid, name }, "created the server's channel");
        return out.chid;
      }
      if (out.k !== "error" || out.err.code !== Code.AlreadyExist) throw out.k === "error" ? out.err : new Error(`creating the server's channel '${name}' failed`);
    }
  }
  const found = await sv.channels.byName(name);
  if (found !== undefined) return adopted(sv, found, flag);
  const c: ChannelRecord = { chid: sv.channels.nextChid(), name, descr: "", owner: "", created: nowSeconds() };
  await sv.storage.commit(sv.channels.createOps(c));
  // Reported as every creation is: until then the channel's members are "changing" and
  // never served from the cache, so each of its events waited for a read of its
  // members and went out after later replies (dropped when the connection had ended
  // by then), for as long as the process that made it ran.
  sv.channels.joined(c.chid, c.owner);
  sv.log.info({ chid: c.chid, name }, "created the server's channel");
  return c.chid;
}

/**
 * A server's channel found by its name. One a user made before (the door was turned on
 * after it) stays theirs: its owner can delete it, and the door's logins are then in no
 * room until a restart makes it anew. The operator is told, with the flag to change.
 */
async function adopted(sv: Services, chid: string, flag: string): Promise<string> {
  const c = await sv.channels.get(chid);
  if (c !== undefined && c.owner !== "") {
    sv.log.warn({ chid, name: c.name, owner: c.owner }, `the server's channel '${c.name}' is one a user made: its owner can delete it; to have one no user can, give ${flag} a name no channel has`);
  }
  return chid;
}

/**
 * A private channel whose members are exactly `a` and `b` (a rooms-API room of two; of
 * one when they are the same user) and whose owner is one of them, if there is one:
 * reads `a`'s channels (at most --max-joined-channels) and the members of the private
 * ones among them. A channel owned by anyone else is not theirs alone, even when they
 * are its only members: its owner may enter it again at any time and read it. Of two
 * such channels (two nodes of a cluster each made one at the same moment) the one made
 * first, the lowest chid, is the room: every node answers the same one (see the rooms
 * door's CREATE_ROOM).
 */
export async function privateRoomOf(sv: Services, a: string, b: string): Promise<string | undefined> {
  const want = new Set([a, b]);
  let first: string | undefined;
  for (const chid of await sv.channels.channelsOf(a)) {
    if (first !== undefined && Number(chid) > Number(first)) continue;
    const c = (await sv.channels.get(chid)) as (ChannelRecord & { private?: boolean }) | undefined;
    if (!c?.private || !want.has(c.owner)) continue;
    const members = await sv.channels.members(chid);
    if (members.length === want.size && members.every((m) => want.has(m))) first = chid;
  }
  return first;
}
