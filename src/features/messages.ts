// Messages: `message` to a uid or a channel, cmid idempotency, `ack`, history,
// dialogs, editmessage and delmessage.
//
// A message is acknowledged (`status: 0`) only once its batch is synced: its record
// and its log entry are on disk, and with them (derived from the log) its place in
// the recipient's inbox. The router then hands the event to every live connection of
// the audience; the recipient's inbox is what the post-auth sync reads, so a direct
// message reaches the recipient whether it was online, offline, or cut off mid-way.
// Channel messages are not in anyone's inbox: members read them with `enter` and
// `history`.
//
// The hot path (a direct message to a known user, no cmid, no attachment) runs
// synchronously up to the commit: recipients come from the user cache, channel
// membership from the membership cache, and the record is serialised once.

import { AttachmentRef, ListReply, MessageSent } from "../protocol/codec.js";
import { pageEnd, recordChars, recordsInPages } from "./record-pages.js";
import { AwayCounts } from "./away-counts.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import { Deferred, type Request } from "../protocol/dispatcher.js";
import type { Session } from "../protocol/session.js";
import type { CommitWaiter } from "../storage/db.js";
import type { MessageEvent } from "../protocol/events.js";
import { nowSeconds, type Fields } from "../protocol/frames.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import { channelConv, convOf, directConv, type MessageRecord } from "../storage/layout.js";
import { channelErrors } from "./channels.js";
import type { Outcome } from "./cluster.js";
import { convLockKey, findUser, readSynced, stillSignedIn, type Services } from "./services.js";

interface MessageData {
  uid?: string;
  channel?: string;
  body?: string;
  attach?: { mime: string; data: string };
  cmid?: string;
}

const HISTORY_DEFAULT = 50;
const HISTORY_MAX = 500;
/** History records read at a time for their sizes (newestWithin). */
const HISTORY_PAGE = 20;
/** A position in the message order (ack, history's `before`): digits. */
const MID = { type: "string", pattern: "^[0-9]{1,15}$" } as const;
/** ack's, which is required: empty is 4, as any required string's (PROTOCOL.md "Validation"). */
const REQUIRED_MID = { ...MID, minLength: 1 } as const;
/** `dialogs` page: default and largest. */
const DIALOGS_DEFAULT = 100;
const DIALOGS_MAX = 500;
/** Users away whose direct messages --max-inbox counts at once (past it one count begins again: away-counts.ts). */
const AWAY_COUNTED = 65_536;
/** Channels whose last message `dialogs` reads at once. */
const DIALOG_READS = 64;
/** Rows of a `dialogs` reply read and written at a time. */
const DIALOG_ROWS = 16;
/**
 * A mid naming the message to change: any string within the limit; one that names no
 * message is 14 whatever its shape, as an unknown uid is 8 and an unknown chid 9.
 */
const MESSAGE_ID = requiredString(64);

/** A message as an item of a history-like list (its attachment streams). */
export function listItem(m: MessageRecord): Fields {
  const item: Fields = { mid: m.mid, from: m.from, nick: m.nick, body: m.body, time: m.time };
  if (m.edited !== undefined) item.edited = m.edited;
  if (m.attach) item.attach = new AttachmentRef(m.attach.mime, m.attach.sha);
  return item;
}

/** The `message` request's data (exported for the tests of its fast check). */
export const MESSAGE_SCHEMA = {
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
} as const;

/** The string fields of a `message` frame's common shape (protocol/native-decode.ts). */
export const MESSAGE_FAST_FIELDS = ["uid", "channel", "body", "cmid"] as const;

export function registerMessages(sv: Services): void {
  const { dispatcher, users, messages, channels, storage, router, blobs, locks, config } = sv;
  /**
   * (sender, cmid) of messages whose commit is in flight → the resends of it waiting
   * for its reply. They are settled with it, at once: a resend's reply holds the
   * replies behind it on its connection, and their events (published in reply order)
   * went out a microtask after the same batch's later messages, so a recipient got seq
   * 102 before 101 and dropped 101 as already sent (its cursor then passed it).
   */
  const inflightCmids = new Map<string, Deferred[]>();

  // A deleted account's inbox, cursor and dialog entries that a derived write put on
  // disk between its deletion's reads and its commit (MessageStore.sweepUser). In
  // cluster mode the apply runs it.
  if (!sv.cluster) sv.hooks.onAccountDeleted((uid) => messages.sweepUser(uid));

  /**
   * --max-inbox applies to `to`: a direct message to a user connected nowhere. (One
   * connected gets each message as it comes; one that stops reading is cut off by the
   * outbound cap, and from then on counts.)
   */
  function inboxGated(to: string | undefined): boolean {
    return to !== undefined && config.maxInbox > 0 && !router.isOnline(to);
  }

  /**
   * uid → direct messages let through to them since they were last connected (or since
   * the start-up: kept in memory), --max-inbox's count; it ends when they connect or
   * leave (each node hears both, cluster-wide). Counted as each passes the check, not
   * as it is stored: a client pipelining a flood had every message checked before the
   * first was stored. One let through that then fails (16) still counts. Not the
   * inbox past the delivery cursor: a client that does not acknowledge moves its cursor
   * only past the 16 MiB it must have read (PROTOCOL.md "Confirmed delivery"), so a
   * light user's inbox keeps everything ever sent to them. Only existing users are
   * counted, and at most AWAY_COUNTED of them: past it a low count begins again before
   * a high one, until half are high (away-counts.ts).
   */
  const away = new AwayCounts(AWAY_COUNTED, () => config.maxInbox);
  sv.hooks.onPresence((uid) => void away.delete(uid));

  /** 13 when --max-inbox direct messages came for `to` while away already; else one more has. */
  function inboxRoom(to: string): void {
    const n = away.get(to);
    if (n !== undefined && n >= config.maxInbox) {
      throw new ProtocolError(Code.RateLimited, `user '${to}' has ${n} messages waiting to be delivered, the most this server keeps for someone not connected; send it again once they have connected`);
    }
    away.add(to);
  }

  /**
   * The uid of an account in the cache named `to`, or undefined. The connection's last
   * recipient is remembered while no account is saved or forgotten: a sender's messages
   * come in runs to one recipient, and the lookup (a fresh string hashed, then the
   * cache's map) was 1.8 % of the server's CPU samples in S1.
   */
  function knownRecipient(s: Session, to: string): string | undefined {
    const gen = users.generation;
    if (to === s.sentTo && s.sentToGen === gen) return s.sentToUid;
    const uid = users.peek(to)?.uid;
    if (uid !== undefined) {
      s.sentTo = to;
      s.sentToUid = uid;
      s.sentToGen = gen;
    }
    return uid;
  }

  /** Resolves a `channel` argument to a channel the caller is a member of. */
  async function memberChannel(chid: string, me: string): Promise<string> {
    // A channel made, entered or joined by invitation through another node a moment ago
    // is found once this node has applied the log (readSynced), not refused 9 or 10.
    if (!(await readSynced(sv, () => channels.get(chid)))) throw channelErrors.notFound(chid);
    if (!(await readSynced(sv, () => channels.isMember(chid, me), (member) => !member))) throw channelErrors.notMember(chid);
    return chid;
  }

  /**
   * A message waiting for its batch, as the batch's commit waiter: one object holds
   * what the commit needs (the hot path keeps as little as it can alive meanwhile).
   */
  class PendingMessage implements CommitWaiter {
    constructor(
      readonly req: Request<MessageData>,
      readonly m: MessageRecord,
      readonly text: { json: string; cut: number } | undefined,
      readonly newPair: boolean,
      readonly onStored: ((err: Error | undefined, sent?: MessageSent) => void) | undefined,
    ) {}

    committed(err: Error | undefined): void {
      const { req, m } = this;
      const d = req.deferred();
      const sent = err ? undefined : new MessageSent(m.mid, m.time);
      this.onStored?.(err, sent);
      if (err) return d.reject(err);
      const to = m.to;
      // Every field in the literal: one added later (inbox, the codecs' wire) grew the
      // object by a property array, per message.
      const ev: MessageEvent = { kind: "message", m, text: this.text, inbox: to, wire: undefined };
      if (to !== undefined) {
        if (this.newPair) messages.peersKnown(m.from, to);
        router.inboxCommitted(to, Number(m.mid));
        req.emit(ev, { users: to === m.from ? [to] : [to, m.from] });
      } else {
        req.emit(ev, { channel: m.chid as string, also: m.from });
      }
      d.resolve(sent as MessageSent);
    }
  }

  /**
   * Writes the message into the batch being gathered; the request (its own Deferred)
   * settles once the batch is on disk.
   */
  function store(
    req: Request<MessageData>,
    sender: string,
    to: string | undefined,
    channel: string | undefined,
    cmid: string | undefined,
    onStored?: (err: Error | undefined, sent?: MessageSent) => void,
  ): Deferred {
    const s = req.session;
    // The request was let in for `sender`; a logout, a password change elsewhere or
    // another login on this connection while it waited (the reads before the store)
    // ends that: nothing is stored for a session that is over, and nothing in the
    // name of the connection's next user.
    if (s.uid !== sender || s.nickJson === undefined) {
      throw new ProtocolError(Code.NeedAuth, "the session ended before the message was stored; log in and send it again");
    }
    // A channel removed since the membership check: its purge may have read the
    // history already, and would leave this message behind. A sender whose leave came
    // since (another connection's): the message would be a non-member's, after its
    // ev_leave, and without its echo.
    if (channel !== undefined) {
      if (channels.isGone(channel)) throw channelErrors.notFound(channel);
      if (channels.hasLeft(channel, sender)) throw channelErrors.notMember(channel);
    } else if (messages.isForgotten(to as string)) {
      // A recipient deleted since its check (the reads before the store): its deletion
      // swept what was written before it; this would be stored for nobody, and a new
      // pair's entry left behind.
      throw new ProtocolError(Code.UserNotFound, `no user with uid '${to}'`);
    }
    const me = sender;
    const { body = "", attach } = req.data;
    const stored = req.attachment && req.attachment.size > 0 ? req.attachment : undefined;
    const time = nowSeconds();
    const m: MessageRecord =
      channel !== undefined
        ? { mid: "", chid: channel, from: me, nick: s.nick as string, body, time }
        : { mid: "", from: me, nick: s.nick as string, body, time, to };
    if (stored) m.attach = { mime: attach?.mime || "application/octet-stream", sha: stored.sha, size: stored.size };
    if (cmid !== undefined) m.cmid = cmid;
    // The record's text is the event's too, unless it holds what only the sender may see.
    const stored_ = messages.append(m, req.plain, s.nickJson);
    const text = cmid === undefined ? stored_ : undefined;
    // In the same batch as the record: the first message of a pair records it for
    // dialogs; an attachment's reference keeps its blob.
    const newPair = to !== undefined ? messages.peerOps(me, to) : undefined;
    if (newPair) storage.commitLazy(newPair);
    if (stored) storage.commitLazy(blobs.refOps(stored.sha, m.mid));
    storage.afterCommit(new PendingMessage(req, m, text, newPair !== undefined, onStored));
    return req.deferred();
  }

  /** Waits on a request storing (sender, cmid) now. */
  function follow(waiting: Deferred[]): Deferred {
    const d = new Deferred();
    waiting.push(d);
    return d;
  }

  /**
   * The answer to a resend of (sender, cmid) when it is stored, or being stored, already:
   * its mid and time, whatever changed since (PROTOCOL.md "cmid: resending safely").
   */
  async function resent(sender: string, cmid: string): Promise<Deferred | undefined> {
    const inflight = inflightCmids.get(`${sender}\u0000${cmid}`);
    if (inflight) return follow(inflight);
    const earlier = await messages.byCmid(sender, cmid);
    return earlier && answered(earlier);
  }

  /** A request answered at once with a stored message's [mid, time]. */
  function answered([mid, time]: [string, number]): Deferred {
    const d = new Deferred();
    d.resolve(new MessageSent(mid, time));
    return d;
  }

  /** A message with a cmid: the same (sender, cmid) is stored once, whoever sends it. */
  function storeOnce(req: Request<MessageData>, sender: string, to: string | undefined, channel: string | undefined, cmid: string): Deferred {
    // Looked up (resent) before the recipient and membership checks: what another request
    // stored or began meanwhile is in flight, or in memory (its index entry is written
    // lazily, after its in-flight mark is gone), so no second read of the index.
    const key = `${sender}\u0000${cmid}`;
    const again = inflightCmids.get(key);
    if (again) return follow(again);
    const stored = messages.cmidRecent(sender, cmid);
    if (stored) return answered(stored);
    const waiting: Deferred[] = [];
    inflightCmids.set(key, waiting);
    const done = (err: Error | undefined, sent?: MessageSent) => {
      inflightCmids.delete(key);
      for (const d of waiting) {
        // One resend's reply failing to go out must not keep the others' (or the
        // original's, settled after this) from theirs.
        try {
          if (err) d.reject(err);
          else d.resolve(sent as MessageSent);
        } catch (e) {
          sv.log.error({ err: e }, "answering a resent message failed");
        }
      }
    };
    try {
      return store(req, sender, to, channel, cmid, done);
    } catch (err) {
      done(err as Error); // never leave a resend waiting on a message that was not stored
      throw err;
    }
  }

  /**
   * Cluster mode: the message goes through the log (features/cluster.ts), where its
   * mid is assigned and a cmid already used is found; the reply waits for the local
   * apply. Like a single node's, it is pipelined: the request's Deferred settles then,
   * and the connection's next request starts at once (appends keep its order). An
   * attachment's blob is put into the cluster's object store first (cluster/blobs.ts).
   */
  function clusterMessage(req: Request<MessageData>, me: string, to: string | undefined, channel: string | undefined, body: string, cmid: string | undefined): Deferred | Promise<Deferred> {
    const cluster = sv.cluster as NonNullable<typeof sv.cluster>;
    const upload = req.attachment && req.attachment.size > 0 ? req.attachment : undefined;
    const attach = upload ? { mime: req.data.attach?.mime || "application/octet-stream", sha: upload.sha, size: upload.size } : undefined;
    const append = (): Deferred => {
      const s = req.session;
      if (s.uid !== me) throw new ProtocolError(Code.NeedAuth, "the session ended before the message was stored; log in and send it again");
      const d = req.deferred();
      const addressed = channel !== undefined ? { chid: channel } : { to: to as string };
      const extra = { ...(cmid === undefined ? {} : { cmid }), ...(attach ? { attach } : {}) };
      cluster.append({ k: "msg", t: nowSeconds(), from: me, nick: s.nick as string, ...addressed, body, ...extra }).then(
        (out) => {
          // Its event is the applier's to send, in log order (features/cluster.ts).
          if (out.k === "sent") d.resolve(out.sent);
          else if (out.k === "nouser") d.reject(new ProtocolError(Code.UserNotFound, `no user with uid '${to}'`));
          else if (out.k === "error") d.reject(out.err);
          else d.reject(new ProtocolError(Code.Unavailable, "the message could not be stored; resend it with the same cmid"));
        },
        (err: unknown) => d.reject(err),
      );
      return d;
    };
    // A channel's membership is decided by the log's apply (9 or 10 from there).
    // A direct message to a user away counts against what came for them (inboxRoom),
    // unless it is the resend of one in this node's view (its mid comes from the log).
    const gated = inboxGated(to);
    if (!attach && (channel !== undefined || cmid !== undefined || users.peek(to as string) !== undefined)) {
      if (!gated) return append();
      if (cmid === undefined) {
        inboxRoom(to as string);
        return append();
      }
    }
    return (async () => {
      // A recipient registered through another node a moment ago: this node may not have
      // it yet. (With a cmid the log decides: a resend to one deleted since gets its mid.)
      const found = channel === undefined && cmid === undefined ? await findUser(sv, to as string) : undefined;
      // Only an existing recipient is counted (the log answers 8 for another), and not
      // the resend of a message this node has seen.
      if (gated) {
        const counted = cmid === undefined ? found !== undefined : (await messages.byCmid(me, cmid)) === undefined && (await users.get(to as string)) !== undefined;
        if (counted) inboxRoom(to as string);
      }
      // The blob is in the cluster's object store before any entry names it (the
      // upload's pin keeps the local file until the reply).
      if (attach) await cluster.putBlob(attach.sha, attach.size);
      return append();
    })();
  }

  dispatcher.register<MessageData>({
    name: "message",
    cluster: true,
    pipelined: true,
    streams: [["data", "attach", "data"]],
    fastFields: MESSAGE_FAST_FIELDS,
    schema: MESSAGE_SCHEMA,
    handle(req) {
      const me = req.session.uid as string;
      const { uid: to, channel, body = "", attach, cmid } = req.data;
      if (to === undefined && channel === undefined) throw new ProtocolError(Code.EmptyField, "'uid' or 'channel' is required");
      if (to !== undefined && channel !== undefined) throw new ProtocolError(Code.InvalidData, "send either 'uid' or 'channel', not both");
      // attach.data streamed to the blob store while the frame was read; the frame
      // itself carries "" in its place (an escaped key would keep it inline: refused).
      if (attach && attach.data !== "") {
        throw new ProtocolError(Code.InvalidData, "'attach.data' must be a plain base64 string");
      }
      if (body === "" && !(req.attachment && req.attachment.size > 0)) {
        throw new ProtocolError(Code.EmptyField, "'body' is empty and there is no attachment");
      }
      if (sv.cluster) return clusterMessage(req, me, to, channel, body, cmid);
      // A known recipient is named by its record's uid: the string read from the frame
      // dies young instead of staying with the message until its batch is written.
      const known = to !== undefined ? knownRecipient(req.session, to) : undefined;
      const gated = inboxGated(to);
      const ready = cmid === undefined && (to !== undefined ? known !== undefined : channels.cachedMembers(channel as string)?.has(me) === true);
      if (ready) {
        if (gated) inboxRoom(known as string);
        return store(req, me, known, channel, undefined);
      }
      return (async () => {
        // A resend of a stored message gets its mid first: after its sender left the
        // channel it was answered 10 (and 8 or 10 after its recipient or channel was
        // deleted, until their purge frees the cmid) for a message that was stored and
        // delivered: its client took it for failed.
        const earlier = cmid === undefined ? undefined : await resent(me, cmid);
        if (earlier) return earlier;
        if (to !== undefined && !(await users.get(to))) throw new ProtocolError(Code.UserNotFound, `no user with uid '${to}'`);
        if (channel !== undefined) await memberChannel(channel, me);
        if (gated) inboxRoom(to as string);
        if (cmid === undefined) return store(req, me, to, channel, undefined);
        return storeOnce(req, me, to, channel, cmid);
      })();
    },
  });

  dispatcher.register<{ mid: string }>({
    name: "ack",
    cluster: true,
    schema: { type: "object", required: ["mid"], properties: { mid: REQUIRED_MID } },
    handle(req) {
      const s = req.session;
      if (!s.acks) throw new ProtocolError(Code.InvalidData, "this connection did not opt in to acknowledgements (hello {ack: true})");
      router.ack(s, Number(req.data.mid));
      return { mid: req.data.mid };
    },
  });

  dispatcher.register<{ uid?: string; channel?: string; limit?: number; before?: string }>({
    name: "history",
    cluster: true,
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
      let seqs = await messages.historySeqs(conv, limit, before);
      let sizes: number[] | undefined;
      if (req.session.codec.shortPages) ({ seqs, sizes } = await newestWithin(seqs, config.outboundCap));
      if (seqs.length === 0 && channel === undefined && !(await findUser(sv, uid as string))) {
        throw new ProtocolError(Code.UserNotFound, `no user with uid '${uid}'`);
      }
      return new ListReply({}, "messages", () => historyItems(seqs, sizes));
    },
  });

  /**
   * The newest of `seqs` (oldest first) whose messages take at most `chars` characters
   * on the wire (bodies, attachments' base64), never fewer than one: a page of large
   * attachments is a reply that lasts, and the events queued behind it count against
   * the outbound cap (--outbound-cap, the same figure) until it is written. With the
   * page cut there, a client reading at least as fast as its events come is never
   * closed for a reply it asked for. The records are read here for their sizes and
   * dropped (a page is never held), and read again as the reply is written, in pages
   * cut by those sizes (record-pages.ts): their text sizes come back with the page.
   */
  async function newestWithin(seqs: number[], chars: number): Promise<{ seqs: number[]; sizes: number[] }> {
    const sizes: number[] = new Array<number>(seqs.length).fill(0);
    let total = 0;
    let counted = false;
    for (let end = seqs.length; end > 0; end -= HISTORY_PAGE) {
      const start = Math.max(0, end - HISTORY_PAGE);
      const records = await messages.recordsAt(seqs.slice(start, end));
      for (let i = records.length - 1; i >= 0; i--) {
        const m = records[i];
        if (m === undefined) continue; // deleted since: not in the reply
        const text = recordChars(m);
        sizes[start + i] = text;
        total += text + (m.attach ? 4 * Math.ceil(m.attach.size / 3) : 0);
        // Past the budget: the newer ones are the page, or this one alone if it is the newest.
        if (total > chars) {
          const from = start + i + (counted ? 1 : 0);
          return { seqs: seqs.slice(from), sizes: sizes.slice(from) };
        }
        counted = true;
      }
    }
    return { seqs, sizes };
  }

  /** The records at `seqs`, read a page of at most PAGE_CHARS at a time as the reply is written. */
  async function* historyItems(seqs: readonly number[], sizes: readonly number[] | undefined): AsyncIterable<Fields> {
    const prefetch = (page: readonly MessageRecord[]) => sv.blobs.prefetch(page.flatMap((m) => (m.attach ? [m.attach.sha] : [])));
    for await (const m of recordsInPages((q) => messages.recordsAt(q), seqs, sizes, prefetch)) yield listItem(m);
  }

  /**
   * Up to `limit` of the caller's channels whose last message is older than `below`,
   * newest first: one bounded read per channel the caller is a member of (at most
   * --max-joined of them).
   */
  async function channelDialogs(me: string, limit: number, below: number): Promise<{ chid: string; seq: number }[]> {
    const chids = await channels.channelsOf(me);
    const rows: { chid: string; seq: number }[] = [];
    for (let i = 0; i < chids.length; i += DIALOG_READS) {
      const slice = chids.slice(i, i + DIALOG_READS);
      const lasts = await Promise.all(slice.map((chid) => messages.lastSeq(channelConv(chid))));
      slice.forEach((chid, j) => {
        const seq = lasts[j];
        if (seq !== undefined && seq < below) rows.push({ chid, seq });
      });
    }
    return rows.sort((a, b) => b.seq - a.seq).slice(0, limit);
  }

  dispatcher.register<{ limit?: number; before?: string }>({
    name: "dialogs",
    cluster: true,
    schema: { type: "object", properties: { limit: { type: "integer", minimum: 1 }, before: MID } },
    async handle(req) {
      const me = req.session.uid as string;
      const limit = Math.min(req.data.limit ?? DIALOGS_DEFAULT, DIALOGS_MAX);
      const below = req.data.before !== undefined ? Number(req.data.before) : Infinity;
      const [direct, chans] = await Promise.all([messages.dialogs(me, limit, below), channelDialogs(me, limit, below)]);
      const page = [...direct, ...chans].sort((a, b) => b.seq - a.seq).slice(0, limit);
      const summary = (m: MessageRecord) => ({ mid: m.mid, from: m.from, body: m.body, time: m.time });
      // A direct conversation's last record (a short one) was found while its entry was
      // checked; the rest are found here, in memory or in one getMany.
      async function lastsOf(slice: typeof page): Promise<(MessageRecord | undefined)[]> {
        const known = slice.map((r) => ("record" in r ? r.record : undefined));
        const missing = slice.filter((_, j) => known[j] === undefined).map((r) => ({ conv: "peer" in r ? directConv(me, r.peer) : channelConv(r.chid), seq: r.seq }));
        const read = await messages.lastRecordsAt(missing);
        let n = 0;
        return known.map((m) => m ?? read[n++]);
      }
      // Written as the connection drains, in slices of at most DIALOG_ROWS rows and
      // PAGE_CHARS of their last messages' text (each up to --max-frame, and a page is up
      // to 500 rows: sixteen such rows were 16 MiB held by a client that did not read),
      // cut by their sizes, read first (record-pages.ts).
      async function* rows() {
        const sizes: number[] = [];
        for (let i = 0; i < page.length; i += DIALOG_ROWS) {
          for (const m of await lastsOf(page.slice(i, i + DIALOG_ROWS))) sizes.push(m === undefined ? 0 : recordChars(m));
        }
        for (let i = 0; i < page.length; ) {
          const end = pageEnd(sizes, i, DIALOG_ROWS);
          const slice = page.slice(i, end);
          i = end;
          const lasts = await lastsOf(slice);
          const out = await Promise.all(
            slice.map(async (r, j) => {
              const last = lasts[j];
              if (!last) return undefined; // deleted since it was read
              // A deleted account: the nick its last message carried, when the last is its.
              if ("peer" in r) return { uid: r.peer, nick: (await users.get(r.peer))?.nick ?? (last.from === r.peer ? last.nick : ""), last: summary(last) };
              const c = await channels.get(r.chid);
              return c ? { chid: r.chid, name: c.name, last: summary(last) } : undefined;
            }),
          );
          for (const row of out) if (row !== undefined) yield row;
        }
      }
      return new ListReply({}, "dialogs", rows);
    },
  });

  /** Who hears of a change to `m`: both parties, or the channel's members. */
  /** Why the log refused an edit or a delete (its events are the applier's to send). */
  function clusterRefusal(out: Outcome, mid: string): ProtocolError {
    if (out.k === "nomsg" && out.forbidden) return new ProtocolError(Code.Forbidden, "only its author can change a message");
    if (out.k === "nomsg") return new ProtocolError(Code.MessageNotFound, `no message with mid '${mid}'`);
    if (out.k === "error") return out.err;
    return new ProtocolError(Code.Unavailable, "the change could not be applied; try again");
  }

  function audienceOf(m: MessageRecord) {
    if (m.chid !== undefined) return { channel: m.chid };
    const to = m.to as string;
    return { users: to === m.from ? [to] : [to, m.from] };
  }

  /**
   * The caller's own message `mid`, or the refusal: 14 when there is none the caller
   * can see (so a mid in someone else's conversation is not confirmed to exist), 15
   * when it is another participant's.
   */
  async function ownMessage(mid: string, me: string): Promise<MessageRecord> {
    const notFound = () => new ProtocolError(Code.MessageNotFound, `no message with mid '${mid}'`);
    let m = await messages.get(mid);
    let party = m !== undefined && (await isParty(m, me));
    // Cluster mode: this node's view may lag the log (the message sent, or the channel
    // entered, through another node a moment ago): 14 only once it has caught up.
    if (!party && sv.cluster) {
      await sv.cluster.sync();
      m = await messages.get(mid);
      party = m !== undefined && (await isParty(m, me));
    }
    if (!m || !party) throw notFound();
    if (m.from === me) return m;
    throw new ProtocolError(Code.Forbidden, "only its author can change a message");
  }

  /**
   * Whether `me` is in `m`'s conversation: its author or recipient for a direct message,
   * a member of its channel for a channel's (its author too: one who has left is an
   * outsider again, who can neither read its history nor change what they wrote there,
   * and would not hear the ev_edit). Nobody is, once its channel is deleted: its
   * messages wait for the purge.
   */
  async function isParty(m: MessageRecord, me: string): Promise<boolean> {
    if (m.chid === undefined) return m.from === me || m.to === me;
    if (channels.isGone(m.chid) || (await channels.get(m.chid)) === undefined) return false;
    return channels.isMember(m.chid, me);
  }

  /**
   * Runs a change to message `mid` under its conversation's lock, so that changes run
   * one at a time, each reading the message afresh: an edit racing a delete (or a
   * deleted channel's purge, which takes the same lock page by page) must not write
   * the deleted message back, and two deletes must not rewrite one history chunk at
   * once. 14 when there is no such message.
   */
  /** Edits committed by this process so far (each edit event's `order`). */
  let edits = 0;

  async function changing<T>(mid: string, fn: () => Promise<T>): Promise<T> {
    const m = await messages.get(mid);
    if (!m) throw new ProtocolError(Code.MessageNotFound, `no message with mid '${mid}'`);
    return locks.run(convLockKey(convOf(m)), fn);
  }

  dispatcher.register<{ mid: string; body: string }>({
    name: "editmessage",
    cluster: true,
    schema: { type: "object", required: ["mid", "body"], properties: { mid: MESSAGE_ID, body: { type: "string", minLength: 1 } } },
    async handle(req) {
      if (sv.cluster) {
        const me = req.session.uid as string;
        await ownMessage(req.data.mid, me); // 14 or 15 from this node's view first
        const out = await sv.cluster.append({ k: "edit", t: nowSeconds(), mid: req.data.mid, by: me, body: req.data.body });
        if (out.k !== "edited") throw clusterRefusal(out, req.data.mid);
        return { mid: req.data.mid, edited: out.edited };
      }
      const me = req.session.uid as string;
      let order = 0;
      const edited = await changing(req.data.mid, async () => {
        const m = await ownMessage(req.data.mid, me);
        stillSignedIn(req, me);
        const next: MessageRecord = { ...m, body: req.data.body, edited: nowSeconds() };
        await storage.commit(messages.updateOps(next));
        order = ++edits; // under the lock: in commit order
        return next;
      });
      req.emit({ kind: "edit", mid: edited.mid, body: edited.body, edited: edited.edited as number, chid: edited.chid, order }, audienceOf(edited));
      return { mid: edited.mid, edited: edited.edited };
    },
  });

  dispatcher.register<{ mid: string }>({
    name: "delmessage",
    cluster: true,
    schema: { type: "object", required: ["mid"], properties: { mid: MESSAGE_ID } },
    async handle(req) {
      if (sv.cluster) {
        const me = req.session.uid as string;
        await ownMessage(req.data.mid, me);
        const out = await sv.cluster.append({ k: "del", mid: req.data.mid, by: me });
        if (out.k !== "done") throw clusterRefusal(out, req.data.mid);
        return { mid: req.data.mid };
      }
      const me = req.session.uid as string;
      const m = await changing(req.data.mid, async () => {
        const m = await ownMessage(req.data.mid, me);
        stillSignedIn(req, me);
        const ops = await messages.removeOps(m);
        if (m.attach) ops.push(...blobs.unrefOps(m.attach.sha, m.mid));
        await storage.commit(ops);
        return m;
      });
      if (m.attach) blobs.collectLater(m.attach.sha);
      req.emit({ kind: "delete", mid: m.mid, chid: m.chid }, audienceOf(m));
      return { mid: m.mid };
    },
  });
}
