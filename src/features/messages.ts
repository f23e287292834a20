// Messages: `message` to a uid or a channel, the offline queue sent after each auth,
// cmid idempotency, history, dialogs, editmessage and delmessage.
//
// Every direct message is written together with a queue entry for its recipient, in
// one atomic, synced batch, before the sender hears `status: 0`. The entry is removed
// only once one of the recipient's connections confirms the event (see Peer.send: 16
// MiB of later traffic, 60 s on a drained live connection, or the client's own clean
// close); a recipient that is offline,
// disconnects or is cut off as a slow reader keeps it and receives the message after
// its next auth. So nothing acknowledged is ever lost (at least once: clients
// de-duplicate by mid).
// Channel messages are not queued: members read them with `enter` and `history`.

import { Code, ProtocolError } from "../protocol/codes.js";
import { FramedReply, Pending, type Reply } from "../protocol/dispatcher.js";
import { frame, nowSeconds, replyFrame } from "../protocol/frames.js";
import type { OutFrame, Session } from "../protocol/session.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import type { BlobStore } from "../storage/blobs.js";
import { channelConv, directConv, type MessageRecord } from "../storage/layout.js";
import type { Services } from "./services.js";

interface MessageData {
  uid?: string;
  channel?: string;
  body?: string;
  attach?: { mime: string; data: string };
  cmid?: string;
}

/** Seed clients read `attach` unconditionally, so ev_message always carries it. */
const NO_ATTACH = { mime: "", data: "" };
/** Queued messages read per range query while draining. */
const DRAIN_PAGE = 256;
const HISTORY_DEFAULT = 50;
const HISTORY_MAX = 500;
const MID = { type: "string", pattern: "^[0-9]{1,15}$" } as const;

/** Stands in for attachment i's base64 while a frame is serialised (see framed). */
const blobMark = (i: number) => `\u0000wirechat-blob-${i}\u0000`;
const BLOB_MARK_JSON = /\\u0000wirechat-blob-(\d+)\\u0000/g;

/**
 * A frame whose attachments stream from the blob store: `text` was serialised once
 * with markers where each blob's base64 goes, and is cut there, so the frame goes out
 * byte for byte as JSON.stringify of the whole would have produced it.
 */
function framed(text: string, shas: readonly string[], blobs: BlobStore): OutFrame {
  if (shas.length === 0) return text;
  const parts: OutFrame & object = { parts: [] };
  let from = 0;
  for (const m of text.matchAll(BLOB_MARK_JSON)) {
    parts.parts.push(text.slice(from, m.index));
    const sha = shas[Number(m[1])];
    parts.parts.push(() => blobs.readBase64(sha));
    from = (m.index as number) + m[0].length;
  }
  parts.parts.push(text.slice(from));
  return parts;
}

/** The attach field of a frame, with a marker for its blob's base64 (recorded in shas). */
function attachField(m: MessageRecord, shas: string[]) {
  if (!m.attach) return undefined;
  shas.push(m.attach.sha);
  return { mime: m.attach.mime, data: blobMark(shas.length - 1) };
}

export function evMessage(m: MessageRecord, blobs: BlobStore): OutFrame {
  const shas: string[] = [];
  const data = m.chid
    ? { mid: m.mid, chid: m.chid, from: m.from, nick: m.nick, body: m.body, time: m.time, attach: attachField(m, shas) ?? NO_ATTACH }
    : { mid: m.mid, from: m.from, nick: m.nick, body: m.body, time: m.time, attach: attachField(m, shas) ?? NO_ATTACH, to: m.to };
  return framed(frame("ev_message", data), shas, blobs);
}

export function registerMessages(sv: Services): void {
  const { dispatcher, users, messages, channels, storage, hub, hooks, blobs } = sv;
  /** (sender, cmid) of messages whose commit is in flight → their eventual reply. */
  const inflightCmids = new Map<string, Promise<Reply>>();
  /** Direct conversations known to be recorded for dialogs (saves a write per message). */
  const knownPeers = new Set<string>();

  /** Everyone a message's events go to: both parties, or the channel's members. */
  async function audience(m: MessageRecord): Promise<string[]> {
    if (m.chid !== undefined) return channels.members(m.chid);
    const to = m.to as string;
    return to === m.from ? [to] : [to, m.from];
  }

  /** Resolves a `channel` argument to a channel the caller is a member of. */
  async function memberChannel(chid: string, me: string): Promise<string> {
    if (!(await channels.get(chid))) throw new ProtocolError(Code.ChannelNotFound, `no channel with id '${chid}'`);
    if (!(await channels.isMember(chid, me))) {
      throw new ProtocolError(Code.InvalidChannel, `you are not a member of channel '${chid}'`);
    }
    return chid;
  }

  dispatcher.register<MessageData>({
    name: "message",
    pipelined: true,
    schema: {
      type: "object",
      properties: {
        uid: requiredString(64),
        channel: requiredString(64),
        body: { type: "string" },
        attach: {
          type: "object",
          required: ["mime", "data"],
          properties: { mime: optionalString(255), data: { type: "string" } },
        },
        cmid: requiredString(128),
      },
    },
    async handle(req) {
      const me = req.session.uid as string;
      const { uid: to, channel, body = "", attach, cmid } = req.data;
      if (to === undefined && channel === undefined) throw new ProtocolError(Code.EmptyField, "'uid' or 'channel' is required");
      if (to !== undefined && channel !== undefined) throw new ProtocolError(Code.InvalidData, "send either 'uid' or 'channel', not both");
      // attach.data streamed to the blob store while the frame was read; the frame
      // itself carries "" in its place (an escaped key would keep it inline: refused).
      if (attach && attach.data !== "") {
        throw new ProtocolError(Code.InvalidData, "'attach.data' must be a plain base64 string");
      }
      const stored = req.attachment && req.attachment.size > 0 ? req.attachment : undefined;
      if (body === "" && !stored) throw new ProtocolError(Code.EmptyField, "'body' is empty and there is no attachment");
      if (to !== undefined && !(await users.get(to))) throw new ProtocolError(Code.UserNotFound, `no user with uid '${to}'`);
      if (channel !== undefined) await memberChannel(channel, me);

      const cmidKey = cmid === undefined ? undefined : `${me}\u0000${cmid}`;
      if (cmidKey !== undefined) {
        const inflight = inflightCmids.get(cmidKey);
        if (inflight) return new Pending(inflight);
        const earlier = await messages.byCmid(me, cmid as string);
        if (earlier) return { mid: earlier.mid, time: earlier.time };
      }

      const m: MessageRecord = {
        mid: String(messages.nextSeq()),
        conv: channel !== undefined ? channelConv(channel) : directConv(me, to as string),
        from: me,
        nick: req.session.nick as string,
        body,
        time: nowSeconds(),
      };
      if (channel !== undefined) m.chid = channel;
      else m.to = to;
      if (stored) m.attach = { mime: attach?.mime || "application/octet-stream", sha: stored.sha, size: stored.size };
      if (cmid !== undefined) m.cmid = cmid;
      // The ops serialise the record now: it must be complete before this line.
      const ops = messages.appendOps(m);
      if (to !== undefined) {
        ops.push(...messages.enqueueOps(to, m));
        const pairKey = `${me}\u0000${to}`;
        if (!knownPeers.has(pairKey)) ops.push(...messages.peerOps(me, to));
      }
      if (stored) ops.push(...blobs.refOps(stored.sha, m.mid));
      const members = channel !== undefined ? await channels.members(channel) : undefined;

      const settled = storage.commit(ops).then(() => {
        if (to !== undefined) knownPeers.add(`${me}\u0000${to}`);
        req.after(() => deliver(m, members));
        return { mid: m.mid, time: m.time };
      });
      if (cmidKey !== undefined) {
        inflightCmids.set(cmidKey, settled);
        void settled.finally(() => inflightCmids.delete(cmidKey)).catch(() => {});
      }
      return new Pending(settled);
    },
  });

  function deliver(m: MessageRecord, members: string[] | undefined): void {
    const ev = evMessage(m, blobs);
    if (members) {
      for (const uid of members) hub.deliver(uid, ev);
      return;
    }
    const to = m.to as string;
    const qk = messages.queueKey(to, m.mid);
    hub.deliver(to, ev, () => storage.commitLazy(messages.dequeueOps(qk)), m.mid);
    if (to !== m.from) hub.deliver(m.from, ev, undefined, m.mid);
  }

  /** Sends the user's offline queue, oldest first, pacing itself to the socket. */
  async function drain(s: Session): Promise<void> {
    const uid = s.uid as string;
    const sent = new Set<string>();
    s.holdEvents();
    try {
      let after: string | undefined;
      for (;;) {
        const page = await messages.queued(uid, DRAIN_PAGE, after);
        if (page.length === 0 || s.peer.closed || s.uid !== uid) break;
        let flushed: Promise<boolean> = Promise.resolve(true);
        for (const { key, message } of page) {
          after = key;
          if (!message) {
            storage.commitLazy(messages.dequeueOps(key)); // deleted since it was queued
            continue;
          }
          sent.add(message.mid);
          flushed = new Promise((resolve) =>
            s.send(evMessage(message, blobs), resolve, (delivered) => {
              if (delivered) storage.commitLazy(messages.dequeueOps(key));
            }),
          );
          // Never more than the socket can take: wait for it rather than hit the cap.
          if (s.peer.congested && !(await flushed)) return;
        }
        if (!(await flushed)) break;
      }
    } finally {
      s.releaseEvents(sent);
    }
  }

  hooks.onLoggedIn(drain);

  dispatcher.register<{ uid?: string; channel?: string; limit?: number; before?: string }>({
    name: "history",
    schema: {
      type: "object",
      properties: {
        uid: requiredString(64),
        channel: requiredString(64),
        limit: { type: "integer", minimum: 1 },
        before: MID,
      },
    },
    async handle(req) {
      const me = req.session.uid as string;
      const { uid, channel, before } = req.data;
      const limit = Math.min(req.data.limit ?? HISTORY_DEFAULT, HISTORY_MAX);
      if (uid !== undefined && channel !== undefined) throw new ProtocolError(Code.InvalidData, "send either 'uid' or 'channel', not both");
      let conv: string;
      if (channel !== undefined) {
        conv = channelConv(await memberChannel(channel, me));
      } else if (uid !== undefined) {
        // Only the caller's own conversation with `uid` can be read. A deleted user's
        // messages stay readable; 8 is for a uid with neither account nor messages.
        conv = directConv(me, uid);
      } else {
        throw new ProtocolError(Code.EmptyField, "'uid' or 'channel' is required");
      }
      const found = await messages.history(conv, limit, before);
      if (found.length === 0 && uid !== undefined && channel === undefined && !(await users.get(uid))) {
        throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
      }
      const shas: string[] = [];
      const list = found.map((m) => {
        const entry: Record<string, unknown> = { mid: m.mid, from: m.from, nick: m.nick, body: m.body, time: m.time };
        const attach = attachField(m, shas);
        if (attach) entry.attach = attach;
        if (m.edited !== undefined) entry.edited = m.edited;
        return entry;
      });
      return new FramedReply(framed(replyFrame("history", { messages: list }), shas, blobs));
    },
  });

  dispatcher.register({
    name: "dialogs",
    schema: { type: "object" },
    async handle(req) {
      const me = req.session.uid as string;
      const rows: { seq: number; row: Record<string, unknown> }[] = [];
      const lastOf = async (conv: string) => (await messages.history(conv, 1))[0];
      const summary = (m: MessageRecord) => ({ mid: m.mid, from: m.from, body: m.body, time: m.time });
      for (const peer of await messages.peers(me)) {
        const last = await lastOf(directConv(me, peer));
        if (!last) continue;
        const u = await users.get(peer);
        rows.push({ seq: Number(last.mid), row: { uid: peer, nick: u?.nick ?? last.nick, last: summary(last) } });
      }
      for (const chid of await channels.channelsOf(me)) {
        const [c, last] = await Promise.all([channels.get(chid), lastOf(channelConv(chid))]);
        if (!c || !last) continue;
        rows.push({ seq: Number(last.mid), row: { chid, name: c.name, last: summary(last) } });
      }
      rows.sort((a, b) => b.seq - a.seq);
      return { dialogs: rows.map((r) => r.row) };
    },
  });

  /**
   * Edits and deletes of one message run one at a time, each reading the message
   * afresh: an edit racing a delete must not write the deleted message back.
   */
  const changing = new Map<string, Promise<unknown>>();
  function oneAtATime<T>(mid: string, fn: () => Promise<T>): Promise<T> {
    const prev = changing.get(mid) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => {});
    changing.set(mid, tail);
    void tail.then(() => {
      if (changing.get(mid) === tail) changing.delete(mid);
    });
    return next;
  }

  /**
   * The caller's own message `mid`, or the refusal: 14 when there is none the caller
   * can see (so a mid in someone else's conversation is not confirmed to exist), 15
   * when it is another participant's.
   */
  async function ownMessage(mid: string, me: string): Promise<MessageRecord> {
    const m = await messages.get(mid);
    const notFound = () => new ProtocolError(Code.MessageNotFound, `no message with mid '${mid}'`);
    if (!m) throw notFound();
    if (m.from === me) return m;
    if (!(await audience(m)).includes(me)) throw notFound();
    throw new ProtocolError(Code.Forbidden, "only its author can change a message");
  }

  dispatcher.register<{ mid: string; body: string }>({
    name: "editmessage",
    schema: { type: "object", required: ["mid", "body"], properties: { mid: MID, body: { type: "string", minLength: 1 } } },
    async handle(req) {
      const { m, edited } = await oneAtATime(req.data.mid, async () => {
        const m = await ownMessage(req.data.mid, req.session.uid as string);
        const edited: MessageRecord = { ...m, body: req.data.body, edited: nowSeconds() };
        await storage.commit(messages.updateOps(edited));
        return { m, edited };
      });
      const ev = frame("ev_edit", { mid: m.mid, body: edited.body, edited: edited.edited });
      const to = await audience(m);
      req.after(() => {
        for (const uid of to) hub.deliver(uid, ev);
      });
      return { mid: m.mid, edited: edited.edited };
    },
  });

  dispatcher.register<{ mid: string }>({
    name: "delmessage",
    schema: { type: "object", required: ["mid"], properties: { mid: MID } },
    async handle(req) {
      const m = await oneAtATime(req.data.mid, async () => {
        const m = await ownMessage(req.data.mid, req.session.uid as string);
        const ops = messages.removeOps(m);
        if (m.attach) ops.push(...blobs.unrefOps(m.attach.sha, m.mid));
        await storage.commit(ops);
        return m;
      });
      if (m.attach) void blobs.collect(m.attach.sha);
      const ev = frame("ev_delmessage", { mid: m.mid });
      const to = await audience(m);
      req.after(() => {
        for (const uid of to) hub.deliver(uid, ev);
      });
      return { mid: m.mid };
    },
  });
}
