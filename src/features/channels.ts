// Channels: createchannel, channellist, enter, leave, deletechannel, and the events
// ev_enter, ev_leave, ev_channel_deleted. Membership is stored, so it survives
// disconnects and restarts; messages to a channel are handled by the messages module.

import { Code, ProtocolError } from "../protocol/codes.js";
import { frame, nowSeconds } from "../protocol/frames.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import type { ChannelRecord } from "../storage/layout.js";
import { channelConv } from "../storage/layout.js";
import type { Services } from "./services.js";

/** Messages shown by `enter`. */
const ENTER_HISTORY = 20;

export function registerChannels(sv: Services): void {
  const { dispatcher, channels, users, messages, storage, hub } = sv;
  /** Lower-case names of channels being created (not yet committed). */
  const creating = new Set<string>();
  /** (channel, user) joins in progress → whether it was a first entry. */
  const joins = new Map<string, Promise<boolean>>();

  async function channelOf(chid: string): Promise<ChannelRecord> {
    const c = await channels.get(chid);
    if (!c) throw new ProtocolError(Code.ChannelNotFound, `no channel with id '${chid}'`);
    return c;
  }

  function tell(uids: Iterable<string>, ev: string): void {
    for (const uid of uids) hub.deliver(uid, ev);
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
        const c: ChannelRecord = { chid: channels.nextChid(), name, descr, owner: me, created: nowSeconds() };
        await storage.commit(channels.createOps(c));
        return { chid: c.chid };
      } finally {
        creating.delete(key);
      }
    },
  });

  dispatcher.register({
    name: "channellist",
    schema: { type: "object" },
    async handle() {
      const list = [];
      for (const c of await channels.all()) {
        const members = await channels.members(c.chid);
        list.push({ chid: c.chid, name: c.name, descr: c.descr, online: members.filter((u) => hub.isOnline(u)).length });
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
          await storage.commit(channels.joinOps(c.chid, me, nowSeconds()));
          return true;
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
          const ev = frame("ev_enter", { chid: c.chid, uid: me, nick: s.nick });
          const members = await channels.members(c.chid);
          req.after(() => tell(members, ev));
        }
      }
      const list = [];
      for (const uid of await channels.members(c.chid)) {
        const u = await users.get(uid);
        if (u) list.push({ uid, nick: u.nick, online: hub.isOnline(uid) });
      }
      const last = await messages.history(channelConv(c.chid), ENTER_HISTORY);
      return {
        users: list,
        last_msg: last.map((m) => ({ mid: m.mid, from: m.from, nick: m.nick, body: m.body, time: m.time })),
      };
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
      const notices: [string[], string][] = [];
      for (const chid of chids) {
        notices.push([await channels.members(chid), frame("ev_leave", { chid, uid: me, nick: s.nick })]);
      }
      req.after(() => {
        for (const [members, ev] of notices) tell(members, ev);
      });
      return {};
    },
  });

  /** Deletes a channel: its record, name and memberships now, its messages after. */
  async function remove(c: ChannelRecord): Promise<string[]> {
    const members = await channels.members(c.chid);
    await storage.commit(channels.removeOps(c, members));
    return members;
  }

  function afterRemoval(c: ChannelRecord, members: string[]): void {
    tell(members, frame("ev_channel_deleted", { chid: c.chid }));
    void messages.purge(channelConv(c.chid), sv.blobs).catch((err) => sv.log.error({ err, chid: c.chid }, "purging a deleted channel's messages failed"));
  }

  // A deleted account's channels: the ones it owned go (nobody could delete them
  // any more); in the others, the remaining members hear that it left.
  sv.hooks.onAccountDeleted(async (uid, nick, chids) => {
    for (const chid of chids) {
      const c = await channels.get(chid);
      if (!c) continue;
      if (c.owner === uid) afterRemoval(c, await remove(c));
      else tell(await channels.members(chid), frame("ev_leave", { chid, uid, nick }));
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
