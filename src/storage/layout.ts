// THE key layout. Every LevelDB keyspace wirechat uses is opened here, and every
// composite key is built by a function in this file; no other module spells a key.
//
//   meta        <counter name>                 → last value handed out (number)
//   users       <uid>                          → UserRecord
//   usernum     <num>                          → uid   (a user's number: the numeric id
//                                                doors show for users; never reused)
//   login       <lower-case login>             → uid
//   nick        <lower-case nick>              → uid
//   namekeys    <nameKey>\0<uid>               → 1     (a login or nick as it reads:
//                                                storage/users.ts nameKey; a new name
//                                                whose key has an entry is taken)
//   email       <normalised email>             → uid
//   phone       <normalised phone>             → uid
//   sessions    <sha256 of sid, hex>           → SessionRecord (the sid itself is never stored)
//   usessions   <uid>!<sid hash>               → [expiry (unix s), issued (ms)]
//   sessexp     <expiry, padded>!<sid hash>    → uid   (expired sessions are swept from here)
//   contacts    <owner uid>!<contact uid>      → 1     (owner's list, in uid order)
//   contactof   <contact uid>!<owner uid>      → 1     (who lists a user: presence, deletion)
//   log         <seq>                          → MessageRecord: every message, in order
//                                                (find by mid = one read)
//   hist        <conversation>!<seq>           → HistChunk: the seqs of one conversation
//                                                derived together, from <seq> on
//                                                (history = reverse range read) [derived]
//   inbox       <uid>!<seq>                    → InboxChunk: seqs of direct messages to
//                                                <uid>, from <seq> on (delivery, sync) [derived]
//   cursor      <uid>                          → seq delivered through (lazy)
//   cmids       <sender uid>!<cmid>            → [mid, time]  (idempotent resend) [derived]
//   blobrefs    <sha256>!<mid>                 → 1    (messages using an attachment blob)
//   peers       <uid>!<peer uid>               → 1    (direct conversations of a user)
//   dialogs     <uid>!<inverted seq>           → peer uid: a user's direct conversations,
//                                                newest last message first [derived]
//   dialogat    <uid>!<peer uid>               → seq of that conversation's `dialogs` key
//                                                (to move it on) [derived]
//   rechecks    <uid>!<peer uid>               → 1    (a direct conversation that lost a
//                                                message since its `dialogs` entry was
//                                                written: put with the delete, taken out
//                                                by the generation that moves the entry,
//                                                loaded at start-up)
//   channels    <chid>                         → ChannelRecord of a public channel
//   privchans   <chid>                         → ChannelRecord of a private channel
//                                                (`private: true`; apart, so that
//                                                channellist reads public ones only)
//   chname      <lower-case name>              → chid  (public channels only: a private
//                                                channel's name is not unique)
//   chreads     <name key>\0<chid>             → 1    (public channels' names as they
//                                                read, storage/users.ts nameKey: a new
//                                                name that reads as one of them is taken)
//   members     <chid>!<uid>                   → unix s joined
//   memberof    <uid>!<chid>                   → 1
//   privof      <uid>!<chid>                   → 1    (the private channels a user is a
//                                                member of: their channellist)
//   owned       <uid>!<chid>                   → 1    (channels a user owns: the cap)
//   deleted     <uid>                          → {nick, chids} (a deleted account whose
//                                                clean-up hooks have not finished: written
//                                                with the deletion, resumed at start-up)
//   bans        login:<lower-case login>       → BanRecord  (operator bans, admin port
//               addr:<IP address>              → BanRecord   and `wirechat ban`)
//   purges      <conversation>                 → 1    (a purge of a deleted channel's
//                                                messages not yet finished: written with
//                                                the deletion, resumed at start-up)
//
// On disk: <dataDir>/db holds LevelDB, <dataDir>/blobs the attachment files (blobs.ts).
//
// [derived]: written after the message's own batch, from the log, and rebuilt from it
// at start-up past the watermark `meta indexed` (storage/messages.ts). A message
// costs one put in its synced batch: its record, appended to the log.
//
// `meta registration` is an operator's last "open" or "closed" (REGISTRATION_KEY,
// features/registration.ts); absent until one sets it.
//
// `meta unicode` is the Unicode version (process.versions.unicode) of the runtime that
// built `namekeys` and `chreads` (UNICODE_KEY): a name's key comes from the runtime's
// Unicode tables (NFKC, lower case, default-ignorable code points), so after a Node
// upgrade that changes them both are built again at start-up (storage/users.ts
// buildNameKeys, storage/channels.ts ChannelStore.init).
//
// `meta layout` is this layout's version (LAYOUT_VERSION). Version 1 (no `meta layout`)
// kept records at `msgs <conversation>!<seq>` (with their conversation and cmid), a mid
// index `mids <seq> → conversation`, an offline queue `queue <uid>!<seq>` deleted on
// delivery, and `cmids` → mid; start-up migrates it (storage/messages.ts, migrateV1).
// Version 2 had no `dialogs`, `dialogat` or `owned`: start-up builds them from `peers`
// with `hist`, and from `channels` (migrateV2).
// Version 3 had no user numbers (UserRecord `num`, `usernum`): start-up numbers every
// user in uid order (storage/users.ts, UserStore.init). It had no private channels
// either (`privchans`, `privof`), which start empty.
// Version 4 wrote each message's history chunk in the message's own batch; from 5 on
// it is derived. Start-up's replay of a version-4 log adds no chunk (each logged
// message has one) and then records 5.
// Version 5 had no `namekeys`: start-up builds it from the users (UserStore
// buildNameKeys, from scratch each time until it records 6).
// Version 6 had no `chreads`: start-up builds it from the public channels
// (ChannelStore.init, from scratch each time until it records 7).
//
// <seq> is a message's global sequence number, zero-padded so that string order is
// numeric order; a message's mid is the same number unpadded. A conversation is
// `d:<uid>:<uid>` (the two uids sorted) for direct messages and `c:<chid>` for a
// channel. '!' never occurs in a uid or chid, so `<id>!` is an exact prefix for range
// reads; history is a reverse range read over `msgs <conversation>!…`, never a scan.

import { Level } from "level";
import { plainAddress } from "../addresses.js";

export interface UserRecord {
  uid: string;
  /**
   * The user's number: a stable numeric alias of uid for the doors that show users as
   * JSON numbers. From the `usernum` counter at registration; never handed out again.
   */
  num: number;
  login: string;
  nick: string;
  /** bcrypt hash of sha256(pass) */
  hash: string;
  email: string;
  phone: string;
  picture: string;
  status: string;
  created: number;
}

export interface SessionRecord {
  uid: string;
  created: number;
  expires: number;
}

/**
 * A stored message. Its JSON text (recordJson) is written once and is also the body of
 * the ev_message the native codec sends, less the attachment: so the field order here
 * is the wire's.
 */
export interface MessageRecord {
  mid: string;
  /** Channel of a channel message. */
  chid?: string;
  from: string;
  /** The sender's nick when it was sent. */
  nick: string;
  body: string;
  time: number;
  /** Recipient uid of a direct message. */
  to?: string;
  /** An attachment: its MIME type and the blob holding its decoded bytes. */
  attach?: { mime: string; sha: string; size: number };
  edited?: number;
  /** The sender's id for it (never sent to anyone: the codec leaves it out). */
  cmid?: string;
}

/** The conversation a message belongs to. */
export function convOf(m: MessageRecord): string {
  return m.chid !== undefined ? channelConv(m.chid) : directConv(m.from, m.to as string);
}

/**
 * The stored text of a record, built once: JSON with the fields in MessageRecord's
 * order. `cut` is where a direct message's `to` begins (a channel message's end), so
 * that a codec can put fields the record lacks in the wire's order without searching;
 * `bodyAt` is where the body's text begins when it is written as it is (`plainBody`),
 * else -1.
 */
export function recordJson(m: MessageRecord, plainBody = false, nickJson?: string): { json: string; cut: number; bodyAt: number } {
  // One joined form for every record. mid, uids and chids are made by the server
  // (digits, hex) and need no escape; a body from a frame without a backslash is its
  // own JSON between quotes (see Request.plain), and a session knows its nick's JSON.
  // Joining the pieces costs a third of stringifying an object (0.47 against 1.3-1.6 µs
  // per record, written out included; the record was 9.8 % of the server's CPU in S1).
  // One join() of the pieces makes one flat string: a chain of + made a rope of ~17
  // cons strings that LevelDB's put then flattened into a copy (760 against 601 bytes
  // allocated per direct-message record in a micro-benchmark; the record was the
  // largest entry of the S1 allocation profile, 23 % of the bytes).
  const open = m.chid !== undefined ? `{"mid":"${m.mid}","chid":"${m.chid}","from":"` : `{"mid":"${m.mid}","from":"`;
  const nick = nickJson ?? JSON.stringify(m.nick);
  const bodyOpen = plainBody ? ',"body":"' : ',"body":';
  const body = plainBody ? m.body : JSON.stringify(m.body);
  const timeOpen = plainBody ? '","time":' : ',"time":';
  let tail = m.to !== undefined ? ',"to":"' + m.to + '"' : "";
  if (m.attach) tail += ',"attach":' + JSON.stringify(m.attach);
  if (m.edited !== undefined) tail += ',"edited":' + m.edited;
  if (m.cmid !== undefined) tail += ',"cmid":' + JSON.stringify(m.cmid);
  const json = [open, m.from, '","nick":', nick, bodyOpen, body, timeOpen, m.time, tail, "}"].join("");
  return { json, cut: json.length - tail.length - 1, bodyAt: plainBody ? open.length + m.from.length + 9 + nick.length + 9 : -1 };
}

// A Level sublevel with string keys; values are JSON unless said otherwise.
export type Space = ReturnType<Level<string, string>["sublevel"]>;

export const LAYOUT_VERSION = 7;

/**
 * `meta` key never stored: deleted to give a batch that only syncs the log an operation
 * (LevelDB writes no empty batch; storage/db.ts).
 */
export const SYNC_MARK_KEY = "sync";

/**
 * `meta` key of a cluster node's view position (features/cluster.ts): its presence
 * makes the data dir a view of the cluster log, which only a node with --nats opens.
 */
export const CLUSTER_POSITION_KEY = "cluster";

/** `meta` key of the operator's registration setting ("open" or "closed"). */
export const REGISTRATION_KEY = "registration";

/** `meta` key of the Unicode version the name-key spaces were built with (see the top of the file). */
export const UNICODE_KEY = "unicode";

/** Keyspaces of layout version 1 that migration reads and empties. */
export const V1_SPACES = ["msgs", "mids", "queue"] as const;

export const SPACES = [
  "meta",
  "users",
  "usernum",
  "login",
  "nick",
  "namekeys",
  "email",
  "phone",
  "sessions",
  "usessions",
  "sessexp",
  "contacts",
  "contactof",
  "log",
  "hist",
  "inbox",
  "cursor",
  "cmids",
  "blobrefs",
  "peers",
  "dialogs",
  "dialogat",
  "rechecks",
  "channels",
  "privchans",
  "chname",
  "chreads",
  "members",
  "memberof",
  "privof",
  "owned",
  "purges",
  "deleted",
  "bans",
  // uid → the chid of the room the user's rust_messages connections were last moved to
  // (doors/rust.ts): left at the user's next login there. Not part of a cluster's view
  // of the log: each node's own (the moves made through it).
  "rustroom",
] as const;

export type SpaceName = (typeof SPACES)[number];
export type Spaces = Record<SpaceName, Space>;

export function openSpaces(db: Level<string, string>): Spaces {
  const spaces = {} as Spaces;
  for (const name of SPACES) {
    spaces[name] = db.sublevel<string, unknown>(name, { keyEncoding: "utf8", valueEncoding: "json" }) as Space;
  }
  return spaces;
}

const SEQ_WIDTH = 15;

const ZEROS = "0".repeat(SEQ_WIDTH);

/** A name-key entry (storage/users.ts nameKey): a user's in `namekeys`, a public channel's in `chreads`. */
export function nameKeyEntry(key: string, holder: string): string {
  return `${key}\u0000${holder}`;
}

/** The holder (a uid, or a chid in `chreads`) a name-key entry names. */
export function nameKeyHolder(entry: string): string {
  return entry.slice(entry.indexOf("\u0000") + 1);
}

/** The range of every entry of one name key: '\0' ends a key (no name holds a control character). */
export function nameKeyRange(key: string): { gt: string; lt: string } {
  return { gt: `${key}\u0000`, lt: `${key}\u0001` };
}

/** An operator's ban of a login or an IP address. */
export interface BanRecord {
  reason: string;
  /** Unix seconds. */
  at: number;
}

export type BanKind = "login" | "addr";

export function banKey(kind: BanKind, value: string): string {
  return `${kind}:${kind === "login" ? value.toLowerCase() : plainAddress(value)}`;
}

export function seqKey(seq: number): string {
  const s = decimal(seq);
  return ZEROS.slice(s.length) + s;
}

/** The highest seq whose key writeSeqKey writes (seqKey is longer past it). */
export const SEQ_KEY_MAX = 10 ** SEQ_WIDTH - 1;

/**
 * Writes seqKey(seq)'s ASCII digits into buf[end - 15, end), for 0 <= seq <= SEQ_KEY_MAX.
 * The message path's log key is one buffer it rewrites: a string key was a rope of
 * three pieces that LevelDB's binding flattened into a copy and then encoded, per
 * message (~1 % of the server's CPU in S1).
 */
export function writeSeqKey(buf: Uint8Array, end: number, seq: number): void {
  let n = seq;
  for (let i = end - 1; i >= end - SEQ_WIDTH; i--) {
    const q = Math.floor(n / 10);
    buf[i] = 48 + n - q * 10;
    n = q;
  }
}

const fcc = String.fromCharCode;

/** Eight decimal digits of 0 <= n < 1e8, zero-padded, as one flat string. */
function digits8(n: number): string {
  const hi = (n / 1e4) | 0;
  const lo = n - hi * 1e4;
  return fcc(
    48 + ((hi / 1000) | 0), 48 + (((hi / 100) | 0) % 10), 48 + (((hi / 10) | 0) % 10), 48 + (hi % 10),
    48 + ((lo / 1000) | 0), 48 + (((lo / 100) | 0) % 10), 48 + (((lo / 10) | 0) % 10), 48 + (lo % 10),
  );
}

/**
 * String(n) for a non-negative integer below 2^53 (a seq), without V8's number-string
 * cache. String(), template literals and + put every number they convert into that
 * cache, an old-space table of up to 16,384 entries that is only emptied by a full GC:
 * each new seq's string (every message makes one) stayed alive through the scavenges
 * of the next seconds and was promoted. Measured in S2 (5,000 msg/s, steady state):
 * scavenges went from 2.4-2.6 ms to 1.4 ms, their copying from 1.2 to 0.4 ms, the
 * bytes promoted by each from 105-111 KB to 58-59 KB. It is also faster than a cache
 * miss (25-50 ns against 62 ns in a micro-benchmark).
 */
export function decimal(n: number): string {
  if (n >= 1e8) {
    const hi = Math.floor(n / 1e8);
    return decimal(hi) + digits8(n - hi * 1e8);
  }
  if (n < 1e4) {
    if (n < 10) return fcc(48 + n);
    if (n < 100) return fcc(48 + ((n / 10) | 0), 48 + (n % 10));
    if (n < 1000) return fcc(48 + ((n / 100) | 0), 48 + (((n / 10) | 0) % 10), 48 + (n % 10));
    return fcc(48 + ((n / 1000) | 0), 48 + (((n / 100) | 0) % 10), 48 + (((n / 10) | 0) % 10), 48 + (n % 10));
  }
  const hi = (n / 1e4) | 0;
  const lo = n - hi * 1e4;
  const a = 48 + ((lo / 1000) | 0), b = 48 + (((lo / 100) | 0) % 10), c = 48 + (((lo / 10) | 0) % 10), d = 48 + (lo % 10);
  if (hi >= 1000) return fcc(48 + ((hi / 1000) | 0), 48 + (((hi / 100) | 0) % 10), 48 + (((hi / 10) | 0) % 10), 48 + (hi % 10), a, b, c, d);
  if (hi >= 100) return fcc(48 + ((hi / 100) | 0), 48 + (((hi / 10) | 0) % 10), 48 + (hi % 10), a, b, c, d);
  if (hi >= 10) return fcc(48 + ((hi / 10) | 0), 48 + (hi % 10), a, b, c, d);
  return fcc(48 + hi, a, b, c, d);
}

/**
 * Mid `a` names a later message than mid `b` (each a seq in decimal, as decimal makes
 * it): compared as text, the longer first, without parsing either (Number() of a mid
 * was 0.9 % of the server's CPU in S1, called once per message on the commit path).
 */
export function midAbove(a: string, b: string): boolean {
  return a.length !== b.length ? a.length > b.length : a > b;
}

export function pair(a: string, b: string): string {
  return `${a}!${b}`;
}

/** Range options selecting every `<prefix>!…` key. '"' is the byte after '!'. */
export function prefixRange(prefix: string): { gt: string; lt: string } {
  return { gt: `${prefix}!`, lt: `${prefix}"` };
}

/** The first part of a `<a>!<b>` key (the whole key when it has one part). */
export function keyHead(key: string): string {
  const bang = key.indexOf("!");
  return bang < 0 ? key : key.slice(0, bang);
}

/** The second part of a `<a>!<b>` key. */
export function keyTail(key: string): string {
  return key.slice(key.indexOf("!") + 1);
}

export interface ChannelRecord {
  chid: string;
  name: string;
  descr: string;
  owner: string;
  created: number;
  /** Members only: listed to them alone, entered by them alone (invite adds members). */
  private?: true;
}

export function directConv(a: string, b: string): string {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

export function channelConv(chid: string): string {
  return `c:${chid}`;
}

export function histKey(conv: string, seq: number): string {
  return `${conv}!${seqKey(seq)}`;
}

export function inboxKey(uid: string, seq: number): string {
  return `${uid}!${seqKey(seq)}`;
}

const SEQ_MAX = 10 ** SEQ_WIDTH - 1;

/** A `dialogs` key: ascending key order is descending seq, newest first. */
export function dialogKey(uid: string, seq: number): string {
  return `${uid}!${seqKey(SEQ_MAX - seq)}`;
}

/** The seq a `dialogs` key holds. */
export function dialogSeq(key: string): number {
  return SEQ_MAX - Number(keyTail(key));
}

/** One conversation's seqs written in one batch, ascending. */
export type HistChunk = number[];

/** Seqs of direct messages to one user, ascending. */
export type InboxChunk = number[];
