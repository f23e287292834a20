// Protocol fuzzer: sends N frames built by mutating valid requests of every action to
// one server, over several connections at once, while a canary connection round-trips
// ping, and checks that the server neither crashes, loses a reply, logs an error nor
// grows past a memory bound.
//
//   scripts/fuzz [--frames 2000000] [--seed N] …        (npm run fuzz -- …; --help)
//
// Three kinds of connection, each replaced by a fresh one when it ends:
//   checked  whole frames only, one per line, each a balanced JSON object or array
//            (valid or not: mutated bytes, invalid UTF-8, lone surrogates, NUL, deep
//            nesting, long strings, duplicate keys, __proto__), written in random
//            splits. The scanner then sees exactly one frame per line, so each gets
//            exactly one reply, in order: a frame the checker can parse must be
//            answered with its own action; every 25th frame is a sentinel with a
//            unique unknown action, answered 11 under that name. Predicted bad frames
//            stay under the server's bad-frame limit, so no reply is ever excused.
//   limit    checked the same way, but mostly bad frames: the server must answer every
//            frame up to the one that crosses its bad-frame limit, then send its
//            closing notice, then close (no reset that loses them).
//   chaos    anything: truncated frames, raw newlines in strings, garbage between
//            frames, missing newlines, splits anywhere. Only checked for ending well:
//            after its frames it sends a resynchronising probe, which the server must
//            answer, or close the connection, within --reply-timeout.
// Half of the checked and chaos connections register (and so are authenticated).
//
// Fails on: a crash; a missing, extra or out-of-order reply on a checked connection;
// a connection closed without its owed replies; a chaos connection that neither
// answers nor closes; a log line at level >= 50; server RSS over --rss-limit; server
// descriptors not back near their start count once every fuzz connection is closed;
// a shutdown that does not finish within --shutdown-wait. Prints its figures either way.

import { Canary, LineSocket, ServerUnderTest, actionOf, chooser, describeExit, flags, maxOf, mib, ms, num, percentile, seedOf, sleep } from "./load-lib.js";

const F = flags("Usage: scripts/fuzz [flags]   (npm run fuzz -- [flags])\nMutation fuzzer for a wirechat server; see the top of scripts/fuzz.ts.", {
  frames: { default: "2000000", help: "frames to send in all" },
  seed: { default: "", help: "PRNG seed (printed; pass it again to repeat a run's frames)" },
  checked: { default: "6", help: "checked connections at a time (half registered)" },
  limit: { default: "1", help: "connections at a time that cross the bad-frame limit on purpose" },
  chaos: { default: "3", help: "chaos connections at a time (anything goes)" },
  window: { default: "32", help: "frames in flight per checked connection" },
  life: { default: "20000", help: "frames a checked connection sends before it is replaced" },
  "chaos-share": { default: "0.3", help: "largest share of all frames the chaos connections send" },
  "chaos-life": { default: "300", help: "frames a chaos connection sends before its probe" },
  "rss-limit": { default: "512", help: "largest server RSS allowed, MiB" },
  "fd-slack": { default: "16", help: "descriptors the server may hold above its start count once every fuzz connection is closed" },
  "reply-timeout": { default: "30", help: "seconds a request may wait for its reply (or a chaos probe for its answer)" },
  "shutdown-wait": { default: "30", help: "seconds the server gets to exit after SIGTERM" },
  "max-frame": { default: "1048576", help: "the server's --max-frame (long strings go up to just past it)" },
  "max-depth": { default: "32", help: "the server's --max-depth" },
  "bad-frame-limit": { default: "100", help: "the server's --bad-frame-limit (checked connections stay below it)" },
  "bad-frame-window": { default: "60", help: "the server's --bad-frame-window, seconds" },
  host: { default: "", help: "fuzz an external server at this host instead of starting one (needs --port)" },
  port: { default: "", help: "the external server's port" },
  pid: { default: "", help: "the external server's pid, for RSS and descriptors (else not checked)" },
  server: { default: "", help: "extra flags for the server this script starts, one string (e.g. \"--rate 100000\")" },
  progress: { default: "10", help: "seconds between progress lines on stderr (0: none)" },
});

const TOTAL = num(F.frames, "frames", 1);
const SEED = seedOf(F.seed);
const N_CHECKED = num(F.checked, "checked");
const N_LIMIT = num(F.limit, "limit");
const N_CHAOS = num(F.chaos, "chaos");
const WINDOW = num(F.window, "window", 1);
const LIFE = num(F.life, "life", 1);
const CHAOS_LIFE = num(F["chaos-life"], "chaos-life", 1);
const RSS_LIMIT_KIB = num(F["rss-limit"], "rss-limit", 1) * 1024;
const FD_SLACK = num(F["fd-slack"], "fd-slack");
const REPLY_TIMEOUT = num(F["reply-timeout"], "reply-timeout", 1) * 1000;
const SHUTDOWN_WAIT = num(F["shutdown-wait"], "shutdown-wait", 1) * 1000;
const MAX_FRAME = num(F["max-frame"], "max-frame", 64);
const MAX_DEPTH = num(F["max-depth"], "max-depth", 2);
const BAD_LIMIT = num(F["bad-frame-limit"], "bad-frame-limit", 1);
const BAD_WINDOW = num(F["bad-frame-window"], "bad-frame-window", 1) * 1000;
const PROGRESS = num(F.progress, "progress") * 1000;
const CHAOS_SHARE = num(F["chaos-share"], "chaos-share");
/** Predicted bad frames a checked connection may send per window: well under the limit. */
const BAD_BUDGET = Math.max(0, Math.floor(BAD_LIMIT * 0.6));

const { rand, pick, chance, int } = chooser(SEED);

// ---- what happened -------------------------------------------------------------------

const stats = {
  framesSent: 0,
  checkedFrames: 0,
  sentinels: 0,
  predictedBad: 0,
  chaosFrames: 0,
  bytesSent: 0,
  replies: 0,
  events: 0,
  opened: 0,
  probesAnswered: 0,
};
const closedWhy = new Map<string, number>();
const noteClose = (why: string) => closedWhy.set(why, (closedWhy.get(why) ?? 0) + 1);
const failures = new Map<string, { count: number; samples: string[] }>();
function fail(kind: string, detail: string): void {
  let f = failures.get(kind);
  if (!f) failures.set(kind, (f = { count: 0, samples: [] }));
  f.count++;
  if (f.samples.length < 3) f.samples.push(detail.length > 600 ? detail.slice(0, 600) + "…" : detail);
}
const show = (b: Buffer) => JSON.stringify(b.toString("latin1").slice(0, 300));

// ---- requests: valid ones, then mutated ---------------------------------------------

interface Ctx {
  uid: string; // this connection's user, or a random-looking uid
  sid: string;
  login: string;
  pass: string;
  other: string; // another user
  chid: string; // a channel that exists
  mid: string; // a message that exists
}

const b64 = (n: number) => Buffer.from(Array.from({ length: n }, () => int(0, 255))).toString("base64");

/** A valid request of every action the server offers (and stats, which is off). */
const TEMPLATES: ((c: Ctx) => object)[] = [
  () => ({ action: "register", data: { login: `fz${int(0, 1e9)}`, pass: "p", nick: `fz${int(0, 1e9)}` } }),
  (c) => ({ action: "auth", data: { login: c.login, pass: c.pass } }),
  (c) => ({ action: "auth", data: { sid: c.sid, since: String(int(0, 50)) } }),
  () => ({ action: "logout" }),
  (c) => ({ action: "changepassword", data: { pass: "wrong", newpass: c.pass } }),
  () => ({ action: "deleteaccount", data: { pass: "wrong" } }),
  () => ({ action: "hello", data: { client: "fuzz", version: "1", ack: chance(0.5) } }),
  () => ({ action: "ping" }),
  (c) => ({ action: "ping", data: { cid: c.uid, sid: c.sid } }),
  (c) => ({ action: "userinfo", data: { user: pick([c.uid, c.other, "000000000000"]) } }),
  () => ({ action: "setuserinfo", data: { user_status: `s${int(0, 99)}`, email: `u${int(0, 9999)}@ex.org`, phone: `+1555${int(1000000, 9999999)}` } }),
  () => ({ action: "setuserinfo", data: { picture: b64(int(0, 64)) } }),
  () => ({ action: "searchuser", data: { q: pick(["fz", "f", "a", "zz"]) } }),
  () => ({ action: "contactlist" }),
  (c) => ({ action: "addcontact", data: { uid: c.other } }),
  (c) => ({ action: "delcontact", data: { uid: c.other } }),
  () => ({ action: "import", data: { contacts: [{ myid: 1, name: "x", phone: "+15550100001" }, { myid: "2", email: "u1@ex.org" }] } }),
  (c) => ({ action: "message", data: { uid: c.other, body: "hi", cmid: chance(0.3) ? `c${int(0, 999)}` : undefined } }),
  (c) => ({ action: "message", data: { channel: c.chid, body: "hi all" } }),
  (c) => ({ action: "message", data: { uid: c.uid, body: "", attach: { mime: "application/octet-stream", data: b64(int(1, 3000)) } } }),
  (c) => ({ action: "ack", data: { mid: c.mid } }),
  (c) => ({ action: "history", data: { uid: c.other, limit: int(1, 60) } }),
  (c) => ({ action: "history", data: { channel: c.chid, before: c.mid } }),
  () => ({ action: "dialogs" }),
  (c) => ({ action: "editmessage", data: { mid: c.mid, body: "edited" } }),
  () => ({ action: "delmessage", data: { mid: String(int(1, 1e6)) } }),
  () => ({ action: "createchannel", data: { name: `fzc${int(0, 1e9)}`, descr: "d" } }),
  () => ({ action: "channellist" }),
  (c) => ({ action: "enter", data: { channel: c.chid } }),
  (c) => ({ action: "leave", data: { channel: pick([c.chid, "*"]) } }),
  () => ({ action: "deletechannel", data: { channel: String(int(1, 50)) } }),
  () => ({ action: "stats", data: { reset: true } }),
];

/** Requests whose shape matters to the server's internals, as text (all valid JSON). */
const TEXT_TEMPLATES: ((c: Ctx) => string)[] = [
  // two uploads in one frame (an attach object with data twice)
  () => `{"action":"ping","data":{"attach":{"data":"${b64(int(3, 12000))}","data":""}}}`,
  (c) => `{"action":"message","data":{"uid":"${c.other}","attach":{"mime":"x","data":"${b64(int(3, 3000))}","data":"${b64(3)}"}}}`,
  (c) => `{"action":"message","data":{"uid":"${c.other}","body":"a","body":"b","uid":"${c.uid}"}}`,
  () => `{"action":"ping","action":"quit","action":"ping"}`,
  () => `{"data":{},"action":"hello","data":{"ack":true}}`,
  (c) => `{"action":"message","data":{"attach":{"mime":"t","data":"QUJD"},"uid":"${c.other}","attach":{"mime":"t","data":"QUJD"}}}`,
];

/** Values for type changes, as JSON texts (parsed afresh each time: "__proto__" stays an own key). */
const WEIRD_TEXTS = [
  "0", "-1", "1.5", "1e308", "-1e308", "9007199254740994", "true", "false", "null", "[]", "{}", '[1,"a"]', '{"a":1}', '""', '"x"',
  '"\\ud800"', '"\\udfff\\ud800"', '"a\\u0000b"', '"__proto__"', '{"__proto__":{"polluted":1}}', '{"toString":1,"valueOf":[]}',
  '{"constructor":{"prototype":{"x":1}}}', '"\\u202e\\u0301"', JSON.stringify("😀".repeat(30)), '"../../etc/passwd"', '"000000000000"',
  '"11111111111111111111"', '" "', '"\\t\\r"',
];
const weird = (): unknown => JSON.parse(pick(WEIRD_TEXTS));
/** Valid JSON number texts that JSON.stringify never writes. */
const NUMBER_TEXTS = ["-0", "1e400", "-1e400", "123456789012345678901234567890", "0.000000000000000000000000001", "1E+2", "9007199254740993"];
const TOKENS = ['"', "{", "}", "[", "]", ",", ":", "\\", "\\u", "\\ud800", "\\u0000", "null", "-", "1e999", "\u0000", "\t", " ", "\r", "\u007f", "'", "/*", "tru", "NaN", "Infinity"];
const BAD_UTF8 = [[0xff], [0xfe], [0xc3], [0xc0, 0x80], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2, 0x82], [0x80], [0xf8, 0x88, 0x80, 0x80, 0x80]];

function randomKey(o: Record<string, unknown>): string | undefined {
  const keys = Object.keys(o);
  return keys.length ? pick(keys) : undefined;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Nests `v` inside `d` arrays/objects. */
function nest(v: unknown, d: number): unknown {
  for (let i = 0; i < d; i++) v = chance(0.5) ? [v] : { k: v };
  return v;
}

/** Mutations that keep the request valid JSON (applied to the object). */
function mutateObject(req: Record<string, unknown>): void {
  if (req.data === undefined) req.data = {};
  const data = isObject(req.data) ? req.data : req;
  const target = chance(0.8) ? data : req;
  switch (int(0, 9)) {
    case 0:
    case 1: {
      // type change of a field
      const k = randomKey(target) ?? "x";
      target[k] = weird();
      break;
    }
    case 2: {
      const k = randomKey(target);
      if (k) delete target[k];
      break;
    }
    case 3:
      Object.defineProperty(target, pick(["__proto__", "constructor", "prototype", "toString", "hasOwnProperty"]), {
        value: weird(),
        enumerable: true,
        configurable: true,
        writable: true,
      });
      break;
    case 4: {
      // deep nesting, around the limit
      const k = randomKey(target) ?? "v";
      target[k] = nest(weird(), int(1, MAX_DEPTH + 8));
      break;
    }
    case 5: {
      // a lone surrogate or NUL where a key is made (nick, channel name, cmid, login…)
      const k = pick(["nick", "name", "cmid", "login", "q", "email", "uid", "channel", "mid", "body"]);
      data[k] = pick(["\ud800", "a\ud800b", "\udc00x", "x\u0000", "\u0000"]) + (chance(0.5) ? String(int(0, 99)) : "");
      break;
    }
    case 6:
      req.action = pick([...TEMPLATE_ACTIONS, "", "PING", "ping ", "ev_message", "welcome", "unknown", "__proto__", "constructor", "toString", "\ud800", "a".repeat(int(1, 300))]);
      break;
    case 7:
      if (chance(0.5)) req.data = pick([null, [], "x", 1, true]);
      else delete req.action;
      break;
    case 8:
      target[`k${int(0, 99)}`] = weird();
      break;
    default:
      // a long array (now and then past the import limit)
      target[randomKey(target) ?? "contacts"] = Array.from({ length: chance(0.02) ? int(4900, 5100) : int(0, 50) }, () => ({ phone: "1", email: "a@b.c" }));
  }
}

/** Mutations of the bytes; the result may be anything. */
function mutateBytes(b: Buffer, chaos: boolean): Buffer {
  const at = () => int(0, b.length);
  switch (int(0, chaos ? 9 : 6)) {
    case 0: {
      const c = Buffer.from(b);
      for (let n = int(1, 3); n > 0; n--) c[int(0, c.length - 1)] = int(0, 255);
      return c;
    }
    case 1: {
      const i = at();
      return Buffer.concat([b.subarray(0, i), Buffer.from(pick(TOKENS)), b.subarray(i)]);
    }
    case 2: {
      const i = at();
      return Buffer.concat([b.subarray(0, i), b.subarray(Math.min(b.length, i + int(1, 8)))]);
    }
    case 3: {
      const i = at();
      return Buffer.concat([b.subarray(0, i), Buffer.from(pick(BAD_UTF8)), b.subarray(i)]);
    }
    case 4: {
      // a number text JSON.stringify never writes, in place of a value
      const s = b.toString("latin1").replace(/:("[^"]*"|true|false|null|-?\d[\d.eE+-]*)/, `:${pick(NUMBER_TEXTS)}`);
      return Buffer.from(s, "latin1");
    }
    case 5: {
      // a duplicate key right after the opening brace
      const k = pick(['"action":"ping",', '"data":{"attach":{"data":"QUJD"}},', '"action":null,', '"data":[],', '"__proto__":{"action":"x"},']);
      return Buffer.concat([b.subarray(0, 1), Buffer.from(k), b.subarray(1)]);
    }
    case 6: {
      // a raw control byte inside the text
      const i = at();
      return Buffer.concat([b.subarray(0, i), Buffer.from([pick([0, 1, 8, 9, 0x1b, 0x7f])]), b.subarray(i)]);
    }
    case 7:
      // truncated
      return b.subarray(0, at());
    case 8: {
      // a raw newline (inside a string, often)
      const i = at();
      return Buffer.concat([b.subarray(0, i), Buffer.from("\n"), b.subarray(i)]);
    }
    default:
      // unbalanced
      return Buffer.concat([pick([Buffer.from("{"), Buffer.from("[["), Buffer.alloc(0)]), b, pick([Buffer.from("}}"), Buffer.from("]"), Buffer.alloc(0)])]);
  }
}

const TEMPLATE_ACTIONS = ["register", "auth", "logout", "changepassword", "deleteaccount", "hello", "ping", "userinfo", "setuserinfo",
  "searchuser", "contactlist", "addcontact", "delcontact", "import", "message", "ack", "history", "dialogs", "editmessage", "delmessage",
  "createchannel", "channellist", "enter", "leave", "deletechannel", "stats"];

/**
 * What the scanner makes of `b`: "one" when it is exactly one balanced object or array
 * with no raw newline (one frame, one reply), else "other". Mirrors the server's
 * scanner: any '{' '[' opens and any '}' ']' closes, strings with escapes.
 */
function shape(b: Buffer): { one: boolean; depth: number } {
  if (b.length === 0 || (b[0] !== 0x7b && b[0] !== 0x5b)) return { one: false, depth: 0 };
  let depth = 0;
  let max = 0;
  let inString = false;
  let escaped = false;
  for (let i = 0; i < b.length; i++) {
    const c = b[i];
    if (c === 0x0a) return { one: false, depth: max };
    if (inString) {
      if (escaped) escaped = false;
      else if (c === 0x5c) escaped = true;
      else if (c === 0x22) inString = false;
      continue;
    }
    if (c === 0x22) inString = true;
    else if (c === 0x7b || c === 0x5b) max = Math.max(max, ++depth);
    else if (c === 0x7d || c === 0x5d) {
      if (--depth === 0) return { one: i === b.length - 1, depth: max };
    }
  }
  return { one: false, depth: max };
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

interface Built {
  bytes: Buffer;
  /** The reply's action when the checker can tell, else null. */
  action: string | null;
  /** Whether the server should count it as a bad frame. */
  bad: boolean;
}

/** Classifies a one-frame buffer the way the server will. */
function classify(bytes: Buffer, depth: number): Built {
  if (depth > MAX_DEPTH || bytes.length > MAX_FRAME - 64) return { bytes, action: null, bad: true };
  let v: unknown;
  try {
    v = JSON.parse(utf8.decode(bytes));
  } catch {
    return { bytes, action: null, bad: true };
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) return { bytes, action: "unknown", bad: true };
  const a = (v as { action?: unknown }).action;
  if (typeof a !== "string" || a === "") return { bytes, action: "unknown", bad: true };
  return { bytes, action: a, bad: false };
}

function baseRequest(c: Ctx): Buffer {
  // quit ends a connection: rare, so that connections live long enough to matter
  if (chance(0.0005)) return Buffer.from(chance(0.5) ? '{"action":"quit"}' : '{"action":"quit","data":{"x":[1,{"y":"\\ud800"}]}}');
  if (chance(0.05)) return Buffer.from(pick(TEXT_TEMPLATES)(c));
  const req = pick(TEMPLATES)(c) as Record<string, unknown>;
  if (chance(0.75)) for (let n = chance(0.8) ? 1 : int(2, 4); n > 0; n--) mutateObject(req);
  if (chance(0.001)) {
    // a long string, up to just past the frame limit
    const len = Math.floor(Math.exp(Math.log(1024) + rand() * (Math.log(MAX_FRAME + 16384) - Math.log(1024))));
    (isObject(req.data) ? req.data : req)[pick(["body", "name", "q", "descr", "x"])] = "y".repeat(len);
  }
  return Buffer.from(JSON.stringify(req));
}

/** A frame for a checked connection; `wantBad` asks for byte-level damage when possible. */
function checkedFrame(c: Ctx, badAllowed: boolean, preferBad: boolean): Built {
  for (let tries = 0; tries < 8; tries++) {
    let b = baseRequest(c);
    if (preferBad || (badAllowed && chance(0.3))) for (let n = int(1, 2); n > 0; n--) b = mutateBytes(b, false);
    const s = shape(b);
    if (!s.one) continue;
    const built = classify(b, s.depth);
    if (built.bad && !badAllowed) continue;
    return built;
  }
  const b = Buffer.from('{"action":"ping"}');
  return { bytes: b, action: "ping", bad: false };
}

// ---- connections ----------------------------------------------------------------------

let server: ServerUnderTest;
let shared: { a: string; b: string; chid: string; mid: string };
let stopping = false;
const live = new Set<{ kill(): void }>();

/** Sends `data` split at random points into several writes. */
function writeSplit(conn: LineSocket, data: Buffer): void {
  stats.bytesSent += data.length;
  let i = 0;
  while (i < data.length) {
    const n = chance(0.5) ? data.length - i : int(1, Math.max(1, data.length - i));
    conn.write(data.subarray(i, i + n));
    i += n;
  }
}

/** Registers on `conn`; resolves with the new account. */
async function register(conn: LineSocket): Promise<{ uid: string; sid: string; login: string; pass: string }> {
  const login = `fz${SEED}_${stats.opened}_${int(0, 1e9)}`;
  const pass = `p${int(0, 1e9)}`;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no reply to register")), REPLY_TIMEOUT);
    conn.onLine = (line) => {
      if (actionOf(line) !== "auth") return;
      clearTimeout(timer);
      const d = JSON.parse(line.toString()).data;
      if (d.status !== 0) reject(new Error(`register failed: ${line.toString()}`));
      else resolve({ uid: d.uid, sid: d.sid, login, pass });
    };
    void conn.done.then(() => reject(new Error("closed during register")));
    conn.write(JSON.stringify({ action: "register", data: { login, pass, nick: login } }) + "\n");
  });
}

async function welcomed(conn: LineSocket): Promise<void> {
  await conn.ready;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no welcome frame")), REPLY_TIMEOUT);
    conn.onLine = () => {
      clearTimeout(timer);
      resolve();
    };
    void conn.done.then(() => reject(new Error(`closed before the welcome frame (${conn.error ?? "FIN"})`)));
  });
}

function ctxFor(acct: { uid: string; sid: string; login: string; pass: string } | undefined): Ctx {
  return {
    uid: acct?.uid ?? "0123456789ab",
    sid: acct?.sid ?? "0".repeat(32),
    login: acct?.login ?? shared.a,
    pass: acct?.pass ?? "p",
    other: shared.b,
    chid: shared.chid,
    mid: shared.mid,
  };
}

/** The reply texts of frames the server counts as bad. */
const BAD_FRAME_REPLY = /^(expected a JSON object|frame is not valid JSON|frame is not valid UTF-8|unterminated string in frame|incomplete JSON object|frame must be a JSON object|frame has no 'action' string|nesting deeper than|frame of \d+ bytes)/;

interface Expect {
  bad: boolean;
  action: string | null;
  bytes: Buffer;
  at: number;
}

let sentinelSeq = 0;

/** A new fuzz connection, counted and killable at the end. */
function openConn(): { conn: LineSocket; self: { kill: () => void } } {
  stats.opened++;
  const conn = new LineSocket(server.host, server.port);
  const self = { kill: () => conn.sock.destroy() };
  live.add(self);
  return { conn, self };
}

/** Waits for the welcome and, for an authenticated connection, registers. */
async function setUp(conn: LineSocket, authed: boolean): Promise<Ctx> {
  await welcomed(conn);
  return ctxFor(authed ? await register(conn) : undefined);
}

/** A checked (or, with `limit`, a limit-crossing) connection. Resolves when it has ended. */
async function runChecked(limit: boolean, authed: boolean): Promise<void> {
  const { conn, self } = openConn();
  try {
    const ctx = await setUp(conn, authed);
    const queue: Expect[] = [];
    let head = 0;
    let sent = 0;
    let badCount = 0;
    let badSince = 0;
    let expectAuthPush = false;
    let notice: string | undefined;
    let quitting = false;
    let ending = false;
    let failed = false;

    const refill = () => {
      if (ending || failed || conn.closed || quitting || notice) return;
      const parts: Buffer[] = [];
      while (queue.length - head < WINDOW && sent < LIFE && stats.framesSent < TOTAL && !stopping) {
        let built: Built;
        if (sent % 25 === 24) {
          const name = `zz_sentinel_${++sentinelSeq}`;
          built = { bytes: Buffer.from(`{"action":"${name}"}`), action: name, bad: false };
          stats.sentinels++;
        } else {
          const now = Date.now();
          if (now - badSince > BAD_WINDOW) {
            badSince = now;
            badCount = 0;
          }
          built = limit ? checkedFrame(ctx, true, chance(0.7)) : checkedFrame(ctx, badCount < BAD_BUDGET, false);
          if (built.bad) {
            badCount++;
            stats.predictedBad++;
          }
        }
        queue.push({ action: built.action, bad: built.bad, bytes: built.bytes, at: Date.now() });
        parts.push(built.bytes, NL);
        sent++;
        stats.framesSent++;
        stats.checkedFrames++;
      }
      if (parts.length) writeSplit(conn, Buffer.concat(parts));
      if (queue.length === head && (sent >= LIFE || stats.framesSent >= TOTAL || stopping)) {
        ending = true;
        conn.sock.end();
      }
    };

    conn.onLine = (line) => {
      lastHeard = Date.now();
      const act = actionOf(line);
      let data: { status?: unknown; error?: unknown } | undefined;
      try {
        data = JSON.parse(line.toString()).data;
      } catch {
        fail("frame from the server is not JSON", show(line));
      }
      // Events carry no status (and a reply to an unknown "ev_…" action is a reply).
      if (typeof data?.status !== "number") {
        stats.events++;
        if (!act.startsWith("ev_")) fail("frame that is neither a reply nor an event", show(line));
        return;
      }
      if (expectAuthPush && act === "auth") {
        expectAuthPush = false;
        return;
      }
      if (act === "unknown" && typeof data?.error === "string" && data.error.endsWith("closing the connection")) {
        notice = data.error;
        return;
      }
      stats.replies++;
      const exp = head < queue.length ? queue[head++] : undefined;
      if (head > 4096) {
        queue.splice(0, head);
        head = 0;
      }
      if (!exp) {
        fail("extra reply (no request left to answer)", show(line));
        return;
      }
      if (!limit && !exp.bad && typeof data.error === "string" && BAD_FRAME_REPLY.test(data.error)) {
        fail("a frame the checker took for good was a bad frame to the server (checker out of step)", `${show(exp.bytes)} got ${show(line)}`);
      }
      if (exp.action !== null && exp.action !== act) {
        fail("reply out of order or under another action", `request ${show(exp.bytes)} got ${show(line)}`);
      }
      if (act === "register" && data?.status === 0) expectAuthPush = true;
      if (act === "quit" && data?.status === 0) quitting = true;
      refill();
    };

    let lastHeard = Date.now();
    const watchdog = setInterval(() => {
      if (conn.closed) return;
      if (head < queue.length && Date.now() - queue[head].at > REPLY_TIMEOUT) {
        failed = true;
        fail("no reply within --reply-timeout", `request ${show(queue[head].bytes)} (${queue.length - head} waiting)`);
        conn.sock.destroy();
      } else if ((notice || quitting) && Date.now() - lastHeard > REPLY_TIMEOUT) {
        failed = true;
        fail("connection not closed within --reply-timeout of its closing reply", notice ?? "quit");
        conn.sock.destroy();
      }
    }, 1000);

    refill();
    await conn.done;
    clearInterval(watchdog);
    const owed = queue.length - head;
    const kind = limit ? "limit" : "checked";
    if (failed) noteClose(`${kind}: replies overdue (destroyed by the fuzzer)`);
    else if (notice) noteClose(`${kind}: server said "${notice}"`);
    else if (quitting) noteClose(`${kind}: quit`);
    else if (ending && owed === 0) noteClose(`${kind}: end of life (client closed)`);
    else {
      noteClose(`${kind}: server closed without a notice (${conn.error ?? "FIN"})`);
      if (owed > 0) {
        const quitAt = queue.slice(head).findIndex((e) => e.action === "quit");
        const why = quitAt >= 0 ? ` (a quit is the ${quitAt + 1}. of them: its reply was lost with the rest)` : "";
        fail("connection closed with replies owed", `${owed} unanswered${why}, first ${show(queue[head].bytes)}; ${conn.error ?? "FIN"}`);
      }
    }
    if (limit && !notice && !failed && !quitting && !(ending && owed === 0)) {
      fail("limit connection closed without the bad-frame notice", conn.error ?? "FIN");
    }
  } catch (err) {
    if (!stopping) fail("connection set-up failed", (err as Error).message);
    conn.sock.destroy();
  } finally {
    live.delete(self);
  }
}

const NL = Buffer.from("\n");
const GARBAGE = ["hello server\n", "\n\n", "   ", "}\n", "]]]\n", "\x00\x01\x02\n", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", "\xef\xbb\xbf", ",", '"', "\\", "{}", "[]"];

/** A chaos connection: anything, then a probe that must be answered or the connection closed. */
async function runChaos(authed: boolean): Promise<void> {
  const { conn, self } = openConn();
  try {
    const ctx = await setUp(conn, authed);
    const probe = `zz_probe_${++sentinelSeq}`;
    let answered = false;
    let notice: string | undefined;
    conn.onLine = (line) => {
      const act = actionOf(line);
      if (act.startsWith("ev_")) stats.events++;
      else stats.replies++;
      if (act === probe) answered = true;
      else if (act === "unknown" && line.includes("closing the connection")) notice = JSON.parse(line.toString()).data.error;
    };
    for (let sent = 0; sent < CHAOS_LIFE && stats.framesSent < TOTAL && !stopping && !conn.closed; ) {
      // chaos gets at most its share of the frames; the checked connections set the pace
      while (stats.chaosFrames > CHAOS_SHARE * stats.framesSent + 100 && !stopping && stats.framesSent < TOTAL) await sleep(5);
      const parts: Buffer[] = [];
      for (let k = int(1, 20); k > 0 && sent < CHAOS_LIFE && stats.framesSent < TOTAL; k--, sent++) {
        let b = baseRequest(ctx);
        for (let n = int(0, 3); n > 0; n--) b = mutateBytes(b, true);
        parts.push(b);
        if (chance(0.85)) parts.push(NL);
        if (chance(0.1)) parts.push(Buffer.from(pick(GARBAGE), "latin1"));
        stats.framesSent++;
        stats.chaosFrames++;
      }
      writeSplit(conn, Buffer.concat(parts));
      // let the server read (and the socket drain) between batches
      if (conn.sock.writableNeedDrain) await Promise.race([new Promise((r) => conn.sock.once("drain", r)), conn.done]);
      else await new Promise((r) => setImmediate(r));
    }
    if (!conn.closed) {
      // End any string, object or garbage line, then ask something only this probe answers.
      conn.write(`\n${"]}".repeat(MAX_DEPTH + 20)}\n{"action":"${probe}"}\n`);
      const deadline = Date.now() + REPLY_TIMEOUT;
      while (!answered && !conn.closed && Date.now() < deadline) await sleep(20);
    }
    if (answered) {
      stats.probesAnswered++;
      noteClose("chaos: probe answered (client closed)");
      conn.sock.end();
    } else if (conn.closed) {
      noteClose(notice ? `chaos: server said "${notice}"` : `chaos: closed by the server without a notice (${conn.error ?? "FIN"})`);
    } else {
      fail("chaos connection neither answered its probe nor was closed", `after ${CHAOS_LIFE} frames`);
      conn.sock.destroy();
    }
    await conn.done;
  } catch (err) {
    if (!stopping) fail("connection set-up failed", (err as Error).message);
    conn.sock.destroy();
  } finally {
    live.delete(self);
  }
}

/** Keeps `n` connections of one kind running until the frames are sent. */
async function lane(n: number, run: (i: number) => Promise<void>): Promise<void> {
  await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      while (stats.framesSent < TOTAL && !stopping) {
        await run(i);
        if (server.exit) return;
      }
    }),
  );
}

// ---- set-up, run, report --------------------------------------------------------------

async function call(conn: LineSocket, line: string, action: string): Promise<any> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no reply to ${action}`)), REPLY_TIMEOUT);
    conn.onLine = (l) => {
      if (actionOf(l) !== action) return;
      clearTimeout(timer);
      resolve(JSON.parse(l.toString()).data);
    };
    conn.write(line + "\n");
  });
}

async function setup(): Promise<void> {
  const a = new LineSocket(server.host, server.port);
  await welcomed(a);
  const aAcct = await register(a);
  const b = new LineSocket(server.host, server.port);
  await welcomed(b);
  const bAcct = await register(b);
  const ch = await call(a, JSON.stringify({ action: "createchannel", data: { name: `fuzz${SEED}` } }), "createchannel");
  const m = await call(a, JSON.stringify({ action: "message", data: { uid: bAcct.uid, body: "seed" } }), "message");
  if (ch.status !== 0 || m.status !== 0) throw new Error(`set-up failed: ${JSON.stringify([ch, m])}`);
  shared = { a: aAcct.login, b: bAcct.uid, chid: ch.chid, mid: m.mid };
  a.sock.end();
  b.sock.end();
  await Promise.all([a.done, b.done]);
}

async function main(): Promise<void> {
  const t0 = performance.now();
  server = await ServerUnderTest.fromFlags(F);
  console.log(`fuzz: ${TOTAL} frames, seed ${SEED}, ${N_CHECKED} checked + ${N_LIMIT} limit + ${N_CHAOS} chaos connections, server ${server.spawned ? `pid ${server.pid} (started here)` : `${server.host}:${server.port}`}`);

  await setup();
  await sleep(200);
  const fdStart = server.fds();
  let rssMin = Infinity;
  let rssMax = 0;
  const sampleRss = () => {
    const r = server.rssKiB();
    if (Number.isFinite(r)) {
      rssMin = Math.min(rssMin, r);
      rssMax = Math.max(rssMax, r);
    }
  };
  sampleRss();
  const rssTimer = setInterval(sampleRss, 500);

  const canary = new Canary(server.host, server.port, 20);
  await canary.start();

  let lastFrames = 0;
  let lastT = performance.now();
  const progress = PROGRESS
    ? setInterval(() => {
        const now = performance.now();
        const w = canary.takeWindow();
        process.stderr.write(
          `  ${((now - t0) / 1000).toFixed(0)} s: ${stats.framesSent} frames (${Math.round(((stats.framesSent - lastFrames) * 1000) / (now - lastT))}/s), ` +
            `${stats.replies} replies, RSS ${mib(server.rssKiB())}, fds ${server.fds()}, canary p99 ${ms(percentile(w, 99))}, failures ${[...failures.values()].reduce((n, f) => n + f.count, 0)}\n`,
        );
        lastFrames = stats.framesSent;
        lastT = now;
      }, PROGRESS)
    : undefined;

  let doneFlag: () => void = () => {};
  const finished = new Promise<void>((r) => (doneFlag = r));
  // A crash ends the run at once.
  const crashed = new Promise<void>((resolve) => {
    const t = setInterval(() => {
      if (server.exit) {
        clearInterval(t);
        stopping = true;
        for (const c of live) c.kill();
        resolve();
      }
    }, 100);
    void finished.then(() => {
      clearInterval(t);
      resolve();
    });
  });

  const tRun = performance.now();
  await Promise.race([
    Promise.all([
      lane(N_CHECKED, (i) => runChecked(false, i % 2 === 0)),
      lane(N_LIMIT, () => runChecked(true, chance(0.5))),
      lane(N_CHAOS, (i) => runChaos(i % 2 === 0)),
    ]),
    crashed,
  ]);
  doneFlag();
  const runSeconds = (performance.now() - tRun) / 1000;
  if (progress) clearInterval(progress);
  canary.stop();
  sampleRss();
  clearInterval(rssTimer);

  // Every fuzz connection is closed: descriptors should come back near the start count.
  let fdEnd = server.fds();
  for (let i = 0; i < 50 && fdEnd > fdStart + FD_SLACK; i++) {
    await sleep(100);
    fdEnd = server.fds();
  }
  const problems: string[] = [];
  if (server.exit) {
    problems.push(`the server crashed (${describeExit(server.exit)}); stderr tail:\n${server.stderr().slice(-2500)}`);
  }
  if (Number.isFinite(fdEnd) && fdEnd > fdStart + FD_SLACK) {
    problems.push(`the server holds ${fdEnd} descriptors after every fuzz connection closed (${fdStart} at the start, slack ${FD_SLACK})`);
  }
  if (rssMax > RSS_LIMIT_KIB) problems.push(`server RSS reached ${mib(rssMax)}, over the bound of ${mib(RSS_LIMIT_KIB)}`);
  for (const p of canary.problems) problems.push(`canary: ${p}`);
  const stopProblem = server.exit ? undefined : await server.stop(SHUTDOWN_WAIT);
  if (stopProblem) problems.push(stopProblem);
  const logProblem = server.severeProblem();
  if (logProblem) problems.push(logProblem);
  for (const [kind, f] of failures) problems.push(`${kind}: ${f.count}\n    ${f.samples.join("\n    ")}`);

  const lat = canary.all;
  const lines = [
    `frames sent           ${stats.framesSent} in ${runSeconds.toFixed(1)} s (${Math.round(stats.framesSent / runSeconds)}/s), ${mib(stats.bytesSent / 1024)}`,
    `  checked             ${stats.checkedFrames} (${stats.sentinels} sentinels, ${stats.predictedBad} predicted bad frames)`,
    `  chaos               ${stats.chaosFrames} (${stats.probesAnswered} probes answered)`,
    `replies received      ${stats.replies} (+ ${stats.events} events)`,
    `connections           ${stats.opened} opened; closed:`,
    ...[...closedWhy].sort((x, y) => y[1] - x[1]).map(([why, n]) => `  ${String(n).padStart(8)}  ${why}`),
    `server RSS            min ${mib(rssMin)}, max ${mib(rssMax)} (bound ${mib(RSS_LIMIT_KIB)})`,
    `server descriptors    ${fdStart} at the start, ${fdEnd} after the fuzz (slack ${FD_SLACK})`,
    `canary ping           p50 ${ms(percentile(lat, 50))}, p99 ${ms(percentile(lat, 99))}, max ${ms(maxOf(lat))} over ${lat.length} pings`,
    `server log            ${server.severeCount} lines at level >= 50; warnings: ${[...server.warnings].map(([m, n]) => `${m} ×${n}`).join(", ") || "none"}`,
  ];
  console.log(lines.join("\n"));
  if (problems.length) {
    console.log(`FAIL (seed ${SEED}):\n- ${problems.join("\n- ")}`);
    process.exitCode = 1;
  } else {
    console.log(`PASS (seed ${SEED})`);
  }
}

main().then(
  () => process.exit(),
  (err) => {
    console.error(`fuzz: ${(err as Error).stack ?? err}`);
    void server?.stop(5000).finally(() => process.exit(1));
  },
);
