// Property: whatever JSON value a client of a seed door puts in whatever field of
// whatever request of that door (000 rust_messages on --rust-port, 001 rooms API on
// --rooms-port), logged in or not, it gets exactly one answer in that door's shape, and
// the server (a child process, so a crash shows as an exit) stays up.
//
// Each generated request is followed by a sentinel request with a unique unknown
// action (000) or type (001): both doors answer it with an error naming it, and a door
// answers a connection's requests one at a time, in order, so once the sentinel's
// answer is in, every answer to the request is too. The frames between are checked:
// the request's answer, and nothing else but the events of that door.
//
// 001 READ_MSG answers one frame per message (or none), or one ERROR; 001 DELETE_ROOM,
// DELETE_MSG and EDIT_MSG answer with the frame the members get as an event (or an
// ERROR). Events the test's own requests cause (a sent message's get_message or
// READ_MSG to the sender) are waited for before the next request, so that none lands
// in the next one's frames.
//
// Requests that end the session or the connection (000 close_connection, logout,
// delete_account, change_password; a handshake only ends one when --rust-secret is set,
// and it is not set here) are not in the random stream: the last test sends them, with
// bad values and then good ones, once each.
//
// The seed is fixed so that runs are repeatable; set WIRECHAT_FUZZ_SEED to explore.

import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { Client, uniqueName, type ChildServer, type Frame } from "./helpers.js";
import { isAlive, orClosed, sleep, useChildServers } from "./pipeline-helpers.js";
import { NASTY_OBJECTS, PROTO_KEYS } from "./fuzz-values.js";

const startChild = useChildServers("all");

function portOf(child: ChildServer, key: string): number {
  const m = new RegExp(`"${key}":(\\d+)[^\\n]*"msg":"wirechat listening"`).exec(child.stdout());
  if (!m) throw new Error(`no ${key} in the listening line`);
  return Number(m[1]);
}


/** Hand-picked JSON texts that have broken servers before (or could). */
const NASTY = [
  ...NASTY_OBJECTS,
  '{"length":1e308}',
  '"__proto__"',
  '"\\u0000wirechat-blob-0\\u0000"',
  '"\\u0000\\r\\n\\u2028\\ud800"',
  '"line\\nbreak"',
  "1e308",
  "1e400",
  "-1e400",
  "-0",
  "0",
  "1.5",
  "9007199254740993",
  "9007199254740991",
  "-1",
  '"1"',
  '" "',
  '""',
  "null",
  "true",
  "false",
  "[]",
  "[1]",
  '["ALL"]',
  "{}",
];

const ROOMS_DATE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/;

type Mode = "in" | "anon";

interface DoorSpec {
  name: "rust" | "rooms";
  /** The field that names a request. */
  key: "action" | "type";
  /** Requests in the random stream. */
  fuzzed: string[];
  /** Requests of the door kept out of it (they end the session or the connection). */
  excluded: string[];
  fields: string[];
  /** Values that get a request past the first checks, by request and field (JSON texts). */
  templates: Record<string, Record<string, string>>;
  /** Values that mean something on this server (JSON texts; "@…@" filled in when sent). */
  known: string[];
}

const J = (v: unknown) => JSON.stringify(v);

let child: ChildServer;
const ports = { rust: 0, rooms: 0 };
/** Accounts: r (000, logged in), r2 (000, for anonymous logins), u (001, logged in), v (u's peer), w (001, for anonymous logins). */
const login = { r: uniqueName("fzr"), r2: uniqueName("fzrr"), u: uniqueName("fzu"), v: uniqueName("fzv"), w: uniqueName("fzw") };
const rroom = uniqueName("fzroom");
const conns: Record<"rust" | "rooms", Record<Mode, Client>> = {} as never;
let vConn: Client;
/** 001 ids the fuzz may name: u and v's room, u's message in it, v's message in it. */
const ids = { room: 0, mine: 0, theirs: 0 };

const RUST: DoorSpec = {
  name: "rust",
  key: "action",
  fuzzed: ["handshake", "registration", "authentication", "create_room", "delete_room", "change_room", "send_message", "get_messages"],
  excluded: ["close_connection", "logout", "delete_account", "change_password"],
  fields: ["secret", "login", "password", "new_password", "name", "old_room_name", "new_room_name", "text", "timestamp", "number_of_messages"],
  templates: {
    handshake: { secret: J("handshake_secret") },
    registration: { login: J("@NEWLOGIN@"), password: J("pw") },
    authentication: { login: J(login.r2), password: J("pw-r2") },
    create_room: { name: J("@NEWROOM@") },
    delete_room: { name: J("@NEWROOM@") },
    change_room: { old_room_name: J("general"), new_room_name: J(rroom) },
    send_message: { text: J("hello"), timestamp: "1700000000" },
    get_messages: { number_of_messages: "3" },
  },
  known: [login.r, login.r2, "pw-r2", "general", "GENERAL", rroom, "@NEWROOM@", "@NEWLOGIN@", "hello", 0, 1, 3, 500, 501, -1, 2 ** 53].map(J),
};

const ROOMS: DoorSpec = {
  name: "rooms",
  key: "type",
  fuzzed: ["REQUEST_SIGNUP", "REQUEST_LOGIN", "CREATE_ROOM", "SND_MSG", "READ_MSG", "SEARCH_USER", "DELETE_ROOM", "DELETE_MSG", "EDIT_MSG", "OLD_DIALOGS"],
  excluded: [],
  fields: ["login", "pass", "username", "customer", "room_id", "message", "msg_type", "read", "user", "id", "new_msg"],
  templates: {
    REQUEST_SIGNUP: { login: J("@NEWLOGIN@"), pass: J("pw") },
    REQUEST_LOGIN: { login: J(login.w), pass: J("pw-w") },
    CREATE_ROOM: { username: J(login.u), customer: J(login.v) },
    SND_MSG: { username: J(login.u), room_id: J("@ROOM@"), message: J("hello"), msg_type: J("TEXT") },
    READ_MSG: { read: J("ALL"), room_id: J("@ROOM@") },
    SEARCH_USER: { user: J("fz") },
    DELETE_ROOM: { id: J("@ROOM@") },
    DELETE_MSG: { id: J("@MYMSG@") },
    EDIT_MSG: { id: J("@MYMSG@"), new_msg: J("edited") },
    OLD_DIALOGS: { username: J(login.u) },
  },
  known: [
    login.u, login.v, login.w, "pw-w", "@ROOM@", "@MYMSG@", "@OTHERMSG@", "@NEWLOGIN@", "TEXT", "FILE", "IMAGE", "VIDEO", "ALL", "RESENT",
    "QUJD", "iVBORw0KGgoAAAANSUhEUg==", "@@not base64@@", 1, 0, -1,
  ].map(J),
};

/** The frame text as sent: placeholders replaced by the ids and names they stand for. */
function fill(text: string): string {
  return text
    .replaceAll('"@ROOM@"', String(ids.room))
    .replaceAll('"@MYMSG@"', String(ids.mine))
    .replaceAll('"@OTHERMSG@"', String(ids.theirs))
    .replace(/"@NEWLOGIN@"/g, () => J(uniqueName("fzn")))
    .replace(/"@NEWROOM@"/g, () => J(uniqueName("fzroom")));
}

/** Polls the connection's lines from `from` for a frame that `pred` accepts. */
async function lineAfter(c: Client, from: number, pred: (f: Frame) => boolean, ms: number, what: string): Promise<Frame> {
  const end = Date.now() + ms;
  let i = from;
  const poll = async (): Promise<Frame> => {
    for (;;) {
      for (; i < c.lines.length; i++) {
        const f = JSON.parse(c.lines[i]) as Frame;
        if (pred(f)) return f;
      }
      if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}; the frames since: ${c.lines.slice(from).join("").slice(0, 800)}`);
      await sleep(5);
    }
  };
  return orClosed(c, poll(), what, child);
}

let sentinels = 0;

/**
 * Sends `text` then a sentinel; returns the frames that arrived between the two (in
 * order) and the index of the request's first line in `c.lines`.
 */
async function exchange(door: DoorSpec, c: Client, text: string): Promise<{ win: Frame[]; start: number }> {
  const start = c.lines.length;
  const sentinel = `zz_sentinel_${++sentinels}`;
  c.write(`${text}\n{${J(door.key)}:${J(sentinel)}}\n`);
  const end = await orClosed(c, c.next((f) => f[door.key] === sentinel, 15_000), `the answers to ${text.slice(0, 300)}`, child);
  c.frames.splice(0);
  if (door.name === "rust" ? end.code !== 400 : end.status !== "ERROR") throw new Error(`the sentinel got ${J(end)}`);
  const win: Frame[] = [];
  for (const l of c.lines.slice(start)) {
    const f = JSON.parse(l) as Frame;
    if (f[door.key] === sentinel) break;
    win.push(f);
  }
  return { win, start };
}

function keysOf(f: Frame): string {
  return Object.keys(f).sort().join(",");
}

function fail(what: string, text: string, win: Frame[]): never {
  throw new Error(`${what}\n  request: ${text.slice(0, 500)}\n  frames: ${J(win).slice(0, 1000)}`);
}

/** The one answer of a 000 request among the frames, checked for shape. */
function rustAnswer(req: string | undefined, text: string, win: Frame[]): Frame {
  const action = req ?? "unknown";
  const answers: Frame[] = [];
  for (const f of win) {
    if (f.action === "get_message" && keysOf(f) === "action,author,text,timestamp") continue; // an event
    if (f.code === 300 && keysOf(f) === "action,code,message") continue; // what the server says unprompted
    if (f.action !== action) fail(`a frame that is neither the answer to '${action}' nor an event`, text, win);
    answers.push(f);
  }
  if (answers.length !== 1) fail(`${answers.length} answers`, text, win);
  const a = answers[0];
  if (action === "get_messages" && "messages" in a) {
    const ok =
      keysOf(a) === "action,messages" &&
      Array.isArray(a.messages) &&
      a.messages.length <= 500 &&
      a.messages.every((m: Frame) => keysOf(m) === "author,text,timestamp" && typeof m.author === "string" && typeof m.text === "string" && Number.isInteger(m.timestamp));
    if (!ok) fail("a get_messages answer of the wrong shape", text, win);
    return a;
  }
  if (keysOf(a) !== "action,code,message" || (a.code !== 200 && a.code !== 400) || typeof a.message !== "string" || a.message === "") {
    fail("an answer of the wrong shape", text, win);
  }
  if (a.code === 200 && a.message !== "OK") fail("a 200 whose message is not OK", text, win);
  return a;
}

const ROOMS_EVENTS = new Set(["EDIT_MSG", "DELETE_MSG", "DELETE_ROOM"]);

function roomsEvent(f: Frame): boolean {
  if (ROOMS_EVENTS.has(f.type) && !("status" in f)) {
    return Number.isSafeInteger(f.id) && (f.type === "EDIT_MSG" ? keysOf(f) === "id,new_msg,type" && typeof f.new_msg === "string" : keysOf(f) === "id,type");
  }
  return f.type === "READ_MSG" && f.status === "OK" && readFrame(f);
}

function readFrame(f: Frame): boolean {
  return (
    keysOf(f) === "date,message,message_id,msg_type,room_id,sender,status,type" &&
    f.status === "OK" &&
    Number.isSafeInteger(f.room_id) &&
    Number.isSafeInteger(f.message_id) &&
    ["TEXT", "FILE", "IMAGE"].includes(f.msg_type) &&
    typeof f.message === "string" &&
    typeof f.sender === "string" &&
    ROOMS_DATE.test(f.date)
  );
}

function roomsError(f: Frame, type: string): boolean {
  const keys = Object.keys(f);
  return (
    f.type === type &&
    f.status === "ERROR" &&
    typeof f.error === "string" &&
    f.error !== "" &&
    keys.every((k) => ["type", "status", "error", "room_id", "id"].includes(k)) &&
    (!("room_id" in f) || Number.isSafeInteger(f.room_id)) &&
    (!("id" in f) || Number.isSafeInteger(f.id))
  );
}

/** The answers of a 001 request among the frames (none for a success answered by an event), checked for shape. */
function roomsAnswers(req: string | undefined, msg: Record<string, unknown>, text: string, win: Frame[]): Frame[] {
  const type = req === undefined ? "ERROR" : req === "REQUEST_SIGNUP" ? "RESPONSE_SIGNUP" : req === "REQUEST_LOGIN" ? "RESPONSE_LOGIN" : req;
  const answers: Frame[] = [];
  for (const f of win) {
    if ((req === "READ_MSG" || ROOMS_EVENTS.has(req as string)) && f.type === req) answers.push(f);
    else if (roomsEvent(f)) continue;
    else if (f.type !== type) fail(`a frame that is neither the answer to '${type}' nor an event`, text, win);
    else answers.push(f);
  }
  const one = () => {
    if (answers.length !== 1) fail(`${answers.length} answers`, text, win);
    return answers[0];
  };
  const check = (ok: boolean) => {
    if (!ok) fail("an answer of the wrong shape", text, win);
  };
  switch (req) {
    case "READ_MSG": {
      const errors = answers.filter((f) => f.status === "ERROR");
      if (errors.length > 0) {
        check(answers.length === 1 && roomsError(errors[0], "READ_MSG"));
        return answers;
      }
      check(answers.every(readFrame) && answers.length <= 500);
      check(answers.every((f) => f.room_id === msg.room_id));
      for (let i = 1; i < answers.length; i++) check(answers[i - 1].message_id < answers[i].message_id);
      return answers;
    }
    case "DELETE_ROOM":
    case "DELETE_MSG":
    case "EDIT_MSG": {
      // Success: the members' event, as the caller's answer.
      const a = one();
      check(a.status === "ERROR" ? roomsError(a, req) : roomsEvent(a) && a.id === msg.id && (req !== "EDIT_MSG" || a.new_msg === msg.new_msg));
      return answers;
    }
    case "REQUEST_SIGNUP": {
      const a = one();
      check(["SINGUP_OK", "SIGNUP_USER_EXIST", "SINGUP_FAIL"].includes(a.status) && Object.keys(a).every((k) => ["type", "status", "error"].includes(k)));
      return answers;
    }
    case "REQUEST_LOGIN": {
      const a = one();
      check(["LOGIN_OK", "LOGIN_WRONG_USER", "LOGIN_WRONG_PASS"].includes(a.status) && Object.keys(a).every((k) => ["type", "status", "error"].includes(k)));
      return answers;
    }
    case "CREATE_ROOM": {
      const a = one();
      check(a.status === "ERROR" ? roomsError(a, req) : keysOf(a) === "customer,id,type" && Number.isSafeInteger(a.id) && a.customer === msg.customer);
      return answers;
    }
    case "SND_MSG": {
      const a = one();
      check(
        a.status === "ERROR"
          ? roomsError(a, req)
          : keysOf(a) === "date,message_id,room_id,status,type" && a.status === "OK" && a.room_id === msg.room_id && Number.isSafeInteger(a.message_id) && ROOMS_DATE.test(a.date),
      );
      return answers;
    }
    case "SEARCH_USER": {
      const a = one();
      check(a.status === "ERROR" ? roomsError(a, req) : keysOf(a) === "type,user" && Array.isArray(a.user) && a.user.length <= 50 && a.user.every((u: unknown) => typeof u === "string"));
      return answers;
    }
    case "OLD_DIALOGS": {
      const a = one();
      check(
        a.status === "ERROR"
          ? roomsError(a, req)
          : keysOf(a) === "dialogs,first_massage_id,id,type" &&
              a.dialogs.every((d: unknown) => typeof d === "string") &&
              a.id.every((d: unknown) => Number.isSafeInteger(d)) &&
              a.first_massage_id.every((d: unknown) => d === null || Number.isSafeInteger(d)) &&
              a.dialogs.length === a.id.length &&
              a.id.length === a.first_massage_id.length,
      );
      return answers;
    }
    default:
      // An unknown type, or a frame without one ("ERROR").
      check(roomsError(one(), type));
      return answers;
  }
}

async function connectDoor(door: "rust" | "rooms"): Promise<Client> {
  return Client.connect(ports[door], { welcome: false });
}

async function ask(c: Client, key: "action" | "type", req: Record<string, unknown>, answer = req[key]): Promise<Frame> {
  c.write(J(req) + "\n");
  return orClosed(c, c.next((f) => f[key] === answer && !(f.code === 300)), `the answer to ${J(req)}`, child);
}

/** u sends a message to the room and receives it back as READ_MSG: its id. */
async function roomsSend(c: Client, who: string, message: string): Promise<number> {
  const from = conns.rooms.in.lines.length;
  const a = await ask(c, "type", { type: "SND_MSG", username: who, room_id: ids.room, message, msg_type: "TEXT" });
  if (a.status !== "OK") throw new Error(`fixture SND_MSG: ${J(a)}`);
  await lineAfter(conns.rooms.in, from, (f) => f.type === "READ_MSG" && f.message_id === a.message_id && !("error" in f), 5000, "the fixture message's READ_MSG");
  return a.message_id as number;
}

/** The room of u and v and a message of each in it (again, after the fuzz deleted them). */
async function roomsFixture(): Promise<void> {
  const room = await ask(conns.rooms.in, "type", { type: "CREATE_ROOM", username: login.u, customer: login.v });
  if (!Number.isSafeInteger(room.id)) throw new Error(`fixture CREATE_ROOM: ${J(room)}`);
  ids.room = room.id as number;
  ids.mine = await roomsSend(conns.rooms.in, login.u, "mine");
  ids.theirs = await roomsSend(vConn, login.v, "theirs");
  conns.rooms.in.frames.splice(0);
  vConn.frames.splice(0);
}

beforeAll(async () => {
  // Failed logins are many here: the login throttle would refuse the fixture's own.
  child = await startChild(["--rust-port", "0", "--rooms-port", "0", "--bad-frame-limit", "100000", "--auth-fail-addr", "100000", "--auth-fail-login", "100000"]);
  ports.rust = portOf(child, "rustPort");
  ports.rooms = portOf(child, "roomsPort");

  const rustIn = await connectDoor("rust");
  expect((await ask(rustIn, "action", { action: "registration", login: login.r, password: "pw-r" })).code).toBe(200);
  const r2 = await connectDoor("rust");
  expect((await ask(r2, "action", { action: "registration", login: login.r2, password: "pw-r2" })).code).toBe(200);
  r2.close();
  expect((await ask(rustIn, "action", { action: "create_room", name: rroom })).code).toBe(200);
  conns.rust = { in: rustIn, anon: await connectDoor("rust") };

  const roomsIn = await connectDoor("rooms");
  expect((await ask(roomsIn, "type", { type: "REQUEST_SIGNUP", login: login.u, pass: "pw-u" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
  vConn = await connectDoor("rooms");
  expect((await ask(vConn, "type", { type: "REQUEST_SIGNUP", login: login.v, pass: "pw-v" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
  const w = await connectDoor("rooms");
  expect((await ask(w, "type", { type: "REQUEST_SIGNUP", login: login.w, pass: "pw-w" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
  w.close();
  conns.rooms = { in: roomsIn, anon: await connectDoor("rooms") };
  await roomsFixture();
});

/** Any JSON value, as text. */
function values(known: string[]): fc.Arbitrary<string> {
  const key = fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom(...PROTO_KEYS) },
    { weight: 3, arbitrary: fc.constantFrom(...RUST.fields, ...ROOMS.fields) },
    { weight: 2, arbitrary: fc.string({ maxLength: 6 }) },
  );
  const { value } = fc.letrec<{ value: string; array: string; object: string }>((tie) => ({
    value: fc.oneof(
      { depthSize: "small", maxDepth: 4 },
      { weight: 3, arbitrary: fc.jsonValue({ maxDepth: 3 }).map((v) => J(v)) },
      { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 2, stringUnit: "binary" }).map((v) => J(v)) },
      { weight: 3, arbitrary: fc.constantFrom(...NASTY) },
      { weight: 4, arbitrary: fc.constantFrom(...known) },
      { weight: 1, arbitrary: tie("array") },
      { weight: 2, arbitrary: tie("object") },
    ),
    array: fc.array(tie("value"), { maxLength: 4 }).map((xs) => `[${xs.join(",")}]`),
    object: fc.array(fc.tuple(key, tie("value")), { maxLength: 4 }).map((kvs) => `{${kvs.map(([k, v]) => `${J(k)}:${v}`).join(",")}}`),
  }));
  return value;
}

interface Step {
  door: DoorSpec;
  mode: Mode;
  /** The frame, placeholders not yet filled. */
  text: string;
}

/** A request of `door`: a template (or nothing) with fields dropped, replaced and added, and now and then a request name that is not a string. */
function steps(door: DoorSpec): fc.Arbitrary<Step> {
  const value = values(door.known);
  const unknown = fc.oneof(
    fc.constantFrom("FROBNICATE", "get_message", "read_msg", "Send_Message", "ERROR", "RESPONSE_LOGIN", "__proto__", "constructor", "toString"),
    fc.string({ minLength: 1, maxLength: 10 }),
  );
  const fieldKey = fc.oneof(
    { weight: 6, arbitrary: fc.constantFrom(...door.fields) },
    { weight: 1, arbitrary: fc.constantFrom(...PROTO_KEYS) },
    { weight: 1, arbitrary: fc.string({ maxLength: 6 }) },
  );
  return fc
    .record({
      mode: fc.constantFrom<Mode>("in", "in", "anon"),
      request: fc.oneof({ weight: 9, arbitrary: fc.constantFrom(...door.fuzzed) }, { weight: 1, arbitrary: unknown }),
      template: fc.boolean(),
      drop: fc.array(fc.constantFrom(...door.fields), { maxLength: 2 }),
      add: fc.array(fc.tuple(fieldKey, value), { maxLength: 4 }),
      name: fc.oneof({ weight: 15, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: value }),
    })
    .map(({ mode, request, template, drop, add, name }) => {
      const base = template ? Object.entries(door.templates[request] ?? {}).filter(([k]) => !drop.includes(k)) : [];
      const fields = [...base, ...add].map(([k, v]) => `,${J(k)}:${v}`).join("");
      return { door, mode, text: `{${J(door.key)}:${name ?? J(request)}${fields}}` };
    })
    .filter(({ text }) => {
      // Duplicate keys: the last one is the request. Keep out those that end the session.
      const req = (JSON.parse(text) as Record<string, unknown>)[door.key];
      return !(typeof req === "string" && door.excluded.includes(req));
    });
}

/** What a step's answers showed, for the fixture's upkeep. */
async function afterRust(mode: Mode, req: string | undefined, msg: Record<string, unknown>, a: Frame, win: Frame[], start: number): Promise<void> {
  const c = conns.rust[mode];
  if (mode === "anon" && (req === "registration" || req === "authentication") && a.code === 200) {
    // Logged in: a new connection takes its place.
    c.close();
    conns.rust.anon = await connectDoor("rust");
    return;
  }
  if (req === "send_message" && a.code === 200) {
    // The sender is in the room it sent to: its get_message comes (before or after the 200).
    await lineAfter(c, start, (f) => f.action === "get_message" && f.text === msg.text, 5000, "the sender's get_message");
  }
  if (win.some((f) => f.action === "change_room" && f.code === 300)) {
    // Its room was deleted: back to the default one.
    expect((await ask(c, "action", { action: "change_room", old_room_name: "", new_room_name: "general" })).code).toBe(200);
  }
  if (req === "delete_room" && a.code === 200 && typeof msg.name === "string" && msg.name.toLowerCase() === rroom.toLowerCase()) {
    expect((await ask(c, "action", { action: "create_room", name: rroom })).code).toBe(200);
  }
  c.frames.splice(0);
}

async function afterRooms(mode: Mode, req: string | undefined, answers: Frame[], text: string, win: Frame[], start: number): Promise<void> {
  const c = conns.rooms[mode];
  if (mode === "anon" && answers.some((f) => f.status === "SINGUP_OK" || f.status === "LOGIN_OK")) {
    c.close();
    conns.rooms.anon = await connectDoor("rooms");
    return;
  }
  if (mode !== "in" && (req === "DELETE_ROOM" || req === "DELETE_MSG" || req === "EDIT_MSG") && answers[0].status !== "ERROR") {
    fail("a success on a connection not logged in", text, win);
  }
  if (req === "SND_MSG" && answers[0]?.status === "OK") {
    const mid = answers[0].message_id;
    await lineAfter(c, start, (f) => f.type === "READ_MSG" && f.message_id === mid && f.status === "OK", 5000, "the sender's READ_MSG");
  }
  const events = c.lines.slice(start).map((l) => JSON.parse(l) as Frame);
  if (events.some((f) => f.type === "DELETE_ROOM" && !("status" in f) && f.id === ids.room)) await roomsFixture();
  else if (events.some((f) => f.type === "DELETE_MSG" && !("status" in f) && (f.id === ids.mine || f.id === ids.theirs))) {
    ids.mine = await roomsSend(conns.rooms.in, login.u, "mine");
    ids.theirs = await roomsSend(vConn, login.v, "theirs");
  }
  c.frames.splice(0);
  vConn.frames.splice(0);
  vConn.lines.splice(0);
}

/** About 1.5 ms a request on an idle machine (a few seconds in all); WIRECHAT_FUZZ_RUNS for more. */
const RUNS = Number(process.env.WIRECHAT_FUZZ_RUNS ?? 1500);

describe("any JSON in any field of any seed-door request", () => {
  it("gets exactly one answer in the door's shape, logged in or not, and the server stays up", async () => {
    let sent = 0;
    const seen = { rust: new Set<string>(), rooms: new Set<string>() };
    await fc.assert(
      fc.asyncProperty(fc.oneof(steps(RUST), steps(ROOMS)), async ({ door, mode, text: raw }) => {
        const c = conns[door.name][mode];
        const text = fill(raw);
        const msg = JSON.parse(text) as Record<string, unknown>;
        const name = msg[door.key];
        const req = typeof name === "string" && name !== "" ? name : undefined;
        const { win, start } = await exchange(door, c, text);
        sent++;
        if (req && door.fuzzed.includes(req)) seen[door.name].add(`${mode} ${req}`);
        if (door.name === "rust") await afterRust(mode, req, msg, rustAnswer(req, text, win), win, start);
        else await afterRooms(mode, req, roomsAnswers(req, msg, text, win), text, win, start);
        if (!isAlive(child)) throw new Error(`the server exited after ${text.slice(0, 300)}`);
      }),
      {
        numRuns: RUNS,
        seed: Number(process.env.WIRECHAT_FUZZ_SEED ?? 20261202),
        endOnFailure: true, // a crashed server cannot be used to shrink
      },
    );
    expect(sent).toBe(RUNS);
    // Every request of each door was sent, logged in and not.
    for (const door of [RUST, ROOMS]) for (const mode of ["in", "anon"]) for (const r of door.fuzzed) expect(seen[door.name]).toContain(`${mode} ${r}`);

    // Still up: the fuzzing connections and new ones answer.
    expect(isAlive(child)).toBe(true);
    expect((await ask(conns.rust.in, "action", { action: "get_messages", number_of_messages: 1 })).messages).toBeInstanceOf(Array);
    expect((await ask(conns.rooms.in, "type", { type: "SEARCH_USER", user: login.u })).user).toEqual([login.u]);
    const fresh = await connectDoor("rust");
    expect((await ask(fresh, "action", { action: "authentication", login: login.r2, password: "pw-r2" })).code).toBe(200);
    fresh.close();
  }, 60_000);

  it("requests that end the session or the connection: bad values get one 400 each; good ones do what they say", async () => {
    const c = await connectDoor("rust");
    const me = uniqueName("fzx");
    const bad = ['"x"', ...NASTY];
    // Not logged in: 400 for each.
    for (const action of ["logout", "change_password", "delete_account"]) {
      for (const v of bad.slice(0, 6)) {
        const { win } = await exchange(RUST, c, `{"action":${J(action)},"login":${v},"password":${v},"new_password":${v}}`);
        expect(rustAnswer(action, action, win).code).toBe(400);
      }
    }
    expect((await ask(c, "action", { action: "registration", login: me, password: "p1" })).code).toBe(200);
    // Logged in: bad values are refused and nothing ends (any string is a new password).
    const notString = (v: string) => typeof JSON.parse(v) !== "string" || JSON.parse(v) === "";
    for (const v of bad) {
      for (const [action, fields] of [
        ["change_password", `"login":${v},"new_password":"p2"`],
        ...(notString(v) ? [["change_password", `"login":${J(me)},"new_password":${v}`]] : []),
        ["delete_account", `"login":${v},"password":"p1"`],
        ["delete_account", `"login":${J(me)},"password":${v}`],
      ]) {
        const { win } = await exchange(RUST, c, `{"action":${J(action)},${fields}}`);
        const a = rustAnswer(action, action, win);
        if (a.code !== 400) throw new Error(`${action} ${fields}: ${J(a)}`);
      }
    }
    expect((await ask(c, "action", { action: "send_message", text: "still in", timestamp: 1 })).code).toBe(200);
    // Good ones.
    expect((await ask(c, "action", { action: "change_password", login: me, new_password: "p2" })).code).toBe(200);
    expect((await ask(c, "action", { action: "logout" })).code).toBe(200);
    expect((await ask(c, "action", { action: "logout" })).code).toBe(400);
    expect((await ask(c, "action", { action: "authentication", login: me, password: "p2" })).code).toBe(200);
    expect((await ask(c, "action", { action: "delete_account", login: me, password: "p2" })).code).toBe(200);
    expect((await ask(c, "action", { action: "send_message", text: "gone", timestamp: 1 })).code).toBe(400);
    // close_connection, logged in, after requests sent with it: they are answered, then the connection closes.
    expect((await ask(c, "action", { action: "registration", login: uniqueName("fzx"), password: "p" })).code).toBe(200);
    c.write('{"action":"send_message","text":"bye","timestamp":1}\n{"action":"close_connection","x":{"__proto__":1}}\n{"action":"send_message","text":"after","timestamp":1}\n');
    await Promise.race([c.closed, sleep(5000).then(() => Promise.reject(new Error("close_connection did not close the connection")))]);
    const frames = c.lines.map((l) => JSON.parse(l) as Frame);
    const last = frames.filter((f) => f.action === "send_message");
    expect(last.at(-1)).toEqual({ action: "send_message", code: 200, message: "OK" });
    expect(frames.some((f) => f.action === "get_message" && f.text === "after")).toBe(false);
    expect(frames.some((f) => f.action === "close_connection")).toBe(false);
    expect(isAlive(child)).toBe(true);
  });
});
