// Channels: createchannel, channellist, enter, leave, deletechannel, and the events
// ev_enter, ev_leave, ev_channel_deleted. Membership is stored, so it survives
// disconnects and restarts; messages to a channel are handled by the messages module.

import { Code, ProtocolError } from "../protocol/codes.js";
import { ListReply } from "../protocol/codec.js";
import type { Event } from "../protocol/events.js";
import { nowSeconds, type Fields } from "../protocol/frames.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import type { ChannelRecord } from "../storage/layout.js";
import { channelConv } from "../storage/layout.js";
import type { Services } from "./services.js";

/** Messages shown by `enter`. */
const ENTER_HISTORY = 20;
/** `channellist` page: default and largest. */
const LIST_DEFAULT = 100;
const LIST_MAX = 500;

export function registerChannels(sv: Services): void {
  /** A channel's last messages for `enter`, read a page at a time as they are written. */
  async function* lastMessages(seqs: readonly number[]): AsyncIterable<Fields> {
    for (let i = 0; i < seqs.length; i += 10) {
      for (const m of await sv.messages.records(seqs.slice(i, i + 10))) {
        yield { mid: m.mid, from: m.from, nick: m.nick, body: m.body, time: m.time };
      }
    }
  }

  const { dispatcher, channels, users, messages, storage, router, locks, config } = sv;
  /** Lower-case names of channels being created (not yet committed). */
  const creating = new Set<string>();
  /** (channel, user) joins in progress → whether it was a first entry. */
  const joins = new Map<string, Promise<boolean>>();

  async function channelOf(chid: string): Promise<ChannelRecord> {
    const c = await channels.get(chid);
    if (!c) throw new ProtocolError(Code.ChannelNotFound, `no channel with id '${chid}'`);
    return c;
  }

  function tell(uids: readonly string[], ev: Event): void {
    router.publish(ev, { users: uids });
  }

  /**
   * Runs `fn` (which commits a new membership) once the caller is under their caps:
   * under a lock per user, so that concurrent requests cannot pass the count together.
   */
  function withinCaps<T>(me: string, owning: boolean, fn: () => Promise<T>): Promise<T> {
    return locks.run(`channels-of:${me}`, async () => {
      if (owning && (await channels.ownedCount(me, config.maxOwnedChannels)) >= config.maxOwnedChannels) {
        throw new ProtocolError(Code.RateLimited, `you own ${config.maxOwnedChannels} channels, the most one user may; delete one first`);
      }
      if ((await channels.joinedCount(me, config.maxJoinedChannels)) >= config.maxJoinedChannels) {
        throw new ProtocolError(Code.RateLimited, `you are a member of ${config.maxJoinedChannels} channels, the most one user may; leave one first`);
      }
      return fn();
    });
  }

  dispatcher.register<{ name: string; descr?: string }>({
    name: "createchannel",
    schema: {
      type: "object",
      required: ["name"],
      properties: { name: { ...requiredString(64), pattern: "^[^\\p{Cc}]+$" }, descr: optionalString(1024) },
    },
    async handle(req) {
      const me = req.session.uid as string;
      const { name, descr = "" } = req.data;
      const key = name.toLowerCase();
      const taken = () => new ProtocolError(Code.AlreadyExist, `a channel named '${name}' already exists`);
      // Claimed before the lookup, so two creations of one name cannot both pass it.
      if (creating.has(key)) throw taken();
      creating.add(key);
      try {
        if ((await channels.byName(name)) !== undefined) throw taken();
        return await withinCaps(me, true, async () => {
          const c: ChannelRecord = { chid: channels.nextChid(), name, descr, owner: me, created: nowSeconds() };
          await storage.commit(channels.createOps(c));
          channels.joined(c.chid, me);
          return { chid: c.chid };
        });
      } finally {
        creating.delete(key);
      }
    },
  });

  // Every channel, a page at a time (one range read of `limit` records); `online`
  // counts each listed channel's members online from the membership cache, over the
  // smaller of its members and the users online (ChannelStore.countPresent).
  dispatcher.register<{ limit?: number; after?: string }>({
    name: "channellist",
    schema: { type: "object", properties: { limit: { type: "integer", minimum: 1 }, after: requiredString(64) } },
    async handle(req) {
      const limit = Math.min(req.data.limit ?? LIST_DEFAULT, LIST_MAX);
      const list = [];
      for (const c of await channels.page(limit, req.data.after)) {
        const online = await channels.countPresent(c.chid, router.online);
        list.push({ chid: c.chid, name: c.name, descr: c.descr, online });
      }
      return { channels: list };
    },
  });

  dispatcher.register<{ channel: string }>({
    name: "enter",
    schema: { type: "object", required: ["channel"], properties: { channel: requiredString(64) } },
    async handle(req) {
      const s = req.session;
      const me = s.uid as string;
      const c = await channelOf(req.data.channel);
      // One join per (channel, user) at a time: two devices entering together make
      // one first entry, not two. The promise is registered before any await.
      const joinKey = `${c.chid}\u0000${me}`;
      let join = joins.get(joinKey);
      if (join) {
        await join;
      } else {
        join = (async () => {
          if (await channels.isMember(c.chid, me)) return false;
          return withinCaps(me, false, async () => {
            await storage.commit(channels.joinOps(c.chid, me, nowSeconds()));
            channels.joined(c.chid, me);
            return true;
          });
        })();
        joins.set(joinKey, join);
        let first: boolean;
        try {
          first = await join;
        } finally {
          joins.delete(joinKey);
        }
        if (first) {
          // Every member hears of a first entry, the one entering included; entering
          // again is a no-op.
          req.emit({ kind: "enter", chid: c.chid, uid: me, nick: s.nick as string }, { channel: c.chid });
        }
      }
      const list = [];
      for (const uid of await channels.members(c.chid)) {
        const u = await users.get(uid);
        if (u) list.push({ uid, nick: u.nick, online: router.isOnline(uid) });
      }
      // The last messages can be large: they are read and written one page at a time.
      const conv = channelConv(c.chid);
      const seqs = await messages.historySeqs(conv, ENTER_HISTORY);
      return new ListReply({}, "last_msg", () => lastMessages(seqs), { users: list });
    },
  });

  dispatcher.register<{ channel: string }>({
    name: "leave",
    schema: { type: "object", required: ["channel"], properties: { channel: requiredString(64) } },
    async handle(req) {
      const s = req.session;
      const me = s.uid as string;
      let chids: string[];
      if (req.data.channel === "*") {
        chids = await channels.channelsOf(me);
      } else {
        const c = await channelOf(req.data.channel);
        if (!(await channels.isMember(c.chid, me))) {
          throw new ProtocolError(Code.InvalidChannel, `you are not a member of channel '${c.chid}'`);
        }
        chids = [c.chid];
      }
      await storage.commit(chids.flatMap((chid) => channels.leaveOps(chid, me)));
      for (const chid of chids) {
        channels.left(chid, me);
        req.emit({ kind: "leave", chid, uid: me, nick: s.nick as string }, { channel: chid });
      }
      return {};
    },
  });

  /**
   * Deletes a channel: its record, name and memberships now, its messages after (the
   * purge is recorded in the same batch, so a crash cannot leave them behind).
   */
  async function remove(c: ChannelRecord): Promise<string[]> {
    const members = await channels.members(c.chid);
    await storage.commit([...channels.removeOps(c, members), ...messages.purgeMarkOps(channelConv(c.chid))]);
    channels.removed(c.chid);
    return [...members];
  }

  /** Removes a deleted channel's messages, until done or `signal` (shutdown). */
  function purge(conv: string, signal: AbortSignal): Promise<void> {
    return messages.purge(
      conv,
      async (page) => page.flatMap((m) => (m.attach ? sv.blobs.unrefOps(m.attach.sha, m.mid) : [])),
      // Blobs no longer used are collected once the page's references are gone.
      (page) => {
        for (const m of page) if (m.attach) sv.blobs.collectLater(m.attach.sha);
      },
      signal,
    );
  }

  function afterRemoval(c: ChannelRecord, members: string[]): void {
    tell(members, { kind: "channelDeleted", chid: c.chid });
    const conv = channelConv(c.chid);
    sv.background.run("purging a deleted channel's messages", (signal) => purge(conv, signal), { chid: c.chid });
  }

  // Purges that a crash or a shutdown cut short go on, one at a time.
  sv.background.run("resuming interrupted purges", async (signal) => {
    const convs = await messages.pendingPurges();
    if (convs.length === 0) return;
    sv.log.info({ purges: convs.length }, "resuming interrupted purges of deleted channels");
    for (const conv of convs) if (!signal.aborted) await purge(conv, signal);
  });

  // A deleted account's channels: the ones it owned go (nobody could delete them
  // any more); in the others, the remaining members hear that it left.
  sv.hooks.onAccountDeleted(async (uid, nick, chids) => {
    for (const chid of chids) {
      const c = await channels.get(chid);
      if (!c) continue;
      if (c.owner === uid) afterRemoval(c, await remove(c));
      else {
        channels.left(chid, uid);
        tell(await channels.members(chid), { kind: "leave", chid, uid, nick });
      }
    }
  });

  dispatcher.register<{ channel: string }>({
    name: "deletechannel",
    schema: { type: "object", required: ["channel"], properties: { channel: requiredString(64) } },
    async handle(req) {
      const me = req.session.uid as string;
      const c = await channelOf(req.data.channel);
      if (c.owner !== me) throw new ProtocolError(Code.Forbidden, "only the channel's owner can delete it");
      const members = await remove(c);
      req.after(() => afterRemoval(c, members));
      return {};
    },
  });
}

/**
 * A public channel the server itself keeps (a seed door's room everyone starts in):
 * created at start-up when missing, owned by no user, so no user can delete it.
 * Returns its chid.
 */
export async function serverChannel(sv: Services, name: string): Promise<string> {
  const found = await sv.channels.byName(name);
  if (found !== undefined) return found;
  const c: ChannelRecord = { chid: sv.channels.nextChid(), name, descr: "", owner: "", created: nowSeconds() };
  await sv.storage.commit(sv.channels.createOps(c));
  sv.log.info({ chid: c.chid, name }, "created the server's channel");
  return c.chid;
}
