// Property: whatever a client puts in whatever field of whatever request of the HTTP
// port's doors (e_chat_server under /v1/, the HTTP/WS chat at the root, the native
// protocol at /wirechat), it gets an answer in that door's documented shape, and the
// server (a child process, so a crash shows as an exit) stays up.
//
// - HTTP routes of seeds 002 and 003: any JSON value (prototype keys, huge, negative
//   and fractional numbers, control characters, lone surrogates, nesting), in any
//   field, fields missing or extra, whole bodies that are not objects or not JSON, any
//   content type, nasty path and query parameters, and 002's session in each of its
//   carriers (valid, garbage, malformed percent-encoding): the HTTP status is one the
//   door documents, and the body is that status's JSON shape.
// - WebSockets (002's room socket, 003's /ws after auth, native /wirechat before and
//   after auth): any such message, as text or binary, gets exactly one answer in the
//   door's shape (or none, where the door documents none: join and leave on /ws), and
//   the socket stays. Each message is followed by a sentinel the door answers
//   deterministically (a chat message of its own, an unknown native action): once the
//   sentinel's answer is in, every answer to the message is too.
// - 003's /ws before auth: anything but a right auth gets "Authentication failed: …"
//   and the close (1000).
//
// The seed is fixed so that runs are repeatable; set WIRECHAT_FUZZ_SEED to explore
// (WIRECHAT_FUZZ_RUNS multiplies the number of runs).

import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import type { ChildServer } from "./helpers.js";
import { isAlive, openWebSocket, orExit, useChildServers } from "./pipeline-helpers.js";
import { PROTO_KEYS } from "./fuzz-values.js";

const startChild = useChildServers("all");

const MAX_FRAME = 64 * 1024;
const MAX_DEPTH = 8;
const SEED = Number(process.env.WIRECHAT_FUZZ_SEED ?? 20261202);
const RUNS = Number(process.env.WIRECHAT_FUZZ_RUNS ?? 1);
const runs = (n: number) => Math.max(1, Math.round(n * RUNS));


/** JSON texts that have broken servers before (or could): some JSON.stringify cannot make. */
const NASTY_JSON = [
  '{"toString":1,"valueOf":1}',
  '{"__proto__":{"admin":true}}',
  '{"constructor":{"prototype":{"polluted":1}}}',
  '"__proto__"',
  '"\\u0000"',
  '"\\ud800"',
  '"\\u2028\\u2029"',
  '"\\u001b[31m"',
  '"x\\r\\ny"',
  "1e400",
  "-1e400",
  "-0",
  "1.5",
  "-1",
  "0",
  "9007199254740993",
  "1e-400",
  "123456789012345678901234567890",
  '""',
  '" "',
  "null",
  "true",
  "false",
  "[]",
  "{}",
  "[null]",
  '[{"id":{"toString":1}}]',
];

/** Text that is not JSON (or not one JSON text). */
const NOT_JSON = ["", "{oops", '{"a":', "nul", "[1,]", "{'a':1}", '{"a":1} {"b":2}', "\u0000", "\ufeff{}", "NaN", "Infinity", "undefined", '{"a":1}\n{"a":2}', "\\u0000", "{".repeat(50)];

/** Strings for header and URL positions (visible ASCII: fetch refuses others in headers). */
const NASTY_TOKENS = ["", " ", "%", "%E0%A4%A", "%zz", "%00", "a%20b", "x;y", '"q"', "__proto__", "constructor", "toString", "0".repeat(32), "g".repeat(32), "-1", "1e400", "a,b", "=", "session_id="];

let child: ChildServer;
let httpPort = 0;

/** What the set-up made: accounts, sessions and a room of each door. */
const known = {
  // 002
  sidA: "",
  sidB: "",
  loginA: "",
  loginB: "",
  idB: 0,
  room: 0,
  // 003
  mainEmail: "fuzz-main@example.com",
  mainPass: "main-password",
  victimEmail: "fuzz-victim@example.com",
  victimPass: "victim-password",
};

/** JSON texts of the values this server knows (they get past the first checks). */
function knownTexts(): string[] {
  const strings = [known.sidA, known.sidB, known.loginA, known.loginB, known.mainEmail, known.mainPass, known.victimEmail, known.victimPass, String(known.room), "general"];
  return [...strings.map((s) => JSON.stringify(s)), String(known.room), String(known.idB), JSON.stringify([{ id: known.idB }]), JSON.stringify([{ login: known.loginB }])];
}

/** Any JSON value as text, nested at most `depth` (bounded breadth); call it after the set-up. */
function jsonText(keys: fc.Arbitrary<string>, depth = MAX_DEPTH - 2): fc.Arbitrary<string> {
  const { value } = fc.letrec<{ value: string; array: string; object: string }>((tie) => ({
    value: fc.oneof(
      { depthSize: "small", maxDepth: depth },
      { weight: 3, arbitrary: fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v)) },
      { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 12 }).map((v) => JSON.stringify(v)) },
      { weight: 3, arbitrary: fc.constantFrom(...NASTY_JSON) },
      { weight: 3, arbitrary: fc.constantFrom(...knownTexts()) },
      { weight: 1, arbitrary: fc.double().filter(Number.isFinite).map((d) => JSON.stringify(d)) },
      { weight: 1, arbitrary: fc.bigInt({ min: -(10n ** 30n), max: 10n ** 30n }).map(String) },
      { weight: 1, arbitrary: tie("array") },
      { weight: 2, arbitrary: tie("object") },
    ),
    array: fc.array(tie("value"), { maxLength: 4 }).map((xs) => `[${xs.join(",")}]`),
    object: fc.array(fc.tuple(keys, tie("value")), { maxLength: 4 }).map((kvs) => `{${kvs.map(([k, v]) => `${JSON.stringify(k)}:${v}`).join(",")}}`),
  }));
  return value;
}

/** An object text whose fields are `fields` (some missing, some replaced, extras added). */
function objectText(fields: Record<string, string>, keys: fc.Arbitrary<string>): fc.Arbitrary<string> {
  const names = Object.keys(fields);
  const value = jsonText(keys);
  return fc
    .record({
      drop: fc.subarray(names, { maxLength: names.length }),
      set: names.length === 0 ? fc.constant([] as [string, string][]) : fc.array(fc.tuple(fc.constantFrom(...names), value), { maxLength: names.length }),
      extra: fc.array(fc.tuple(keys, value), { maxLength: 3 }),
      extraFirst: fc.boolean(),
    })
    .map(({ drop, set, extra, extraFirst }) => {
      const kv: [string, string][] = names.filter((n) => !drop.includes(n)).map((n) => [n, fields[n]]);
      for (const [k, v] of set) {
        const at = kv.findIndex(([n]) => n === k);
        if (at >= 0) kv[at] = [k, v];
        else kv.push([k, v]);
      }
      const all = extraFirst ? [...extra, ...kv] : [...kv, ...extra];
      return `{${all.map(([k, v]) => `${JSON.stringify(k)}:${v}`).join(",")}}`;
    });
}

/** A request body: a mutated object, any JSON value, text that is not JSON, or deep nesting. */
function bodyText(fields: Record<string, string>): fc.Arbitrary<string> {
  const keys = fc.oneof(fc.constantFrom(...Object.keys(fields), ...PROTO_KEYS), fc.string({ maxLength: 6 }));
  return fc.oneof(
    { weight: 8, arbitrary: objectText(fields, keys) },
    { weight: 2, arbitrary: jsonText(keys) },
    { weight: 1, arbitrary: fc.constantFrom(...NOT_JSON) },
    { weight: 1, arbitrary: fc.string({ maxLength: 20 }) },
    { weight: 1, arbitrary: fc.integer({ min: 1, max: 5000 }).map((n) => "[".repeat(n) + "]".repeat(n)) },
  );
}

const CONTENT_TYPES = [
  "application/json",
  "application/json; charset=utf-8",
  "APPLICATION/JSON",
  "application/json; charset=latin1",
  "text/plain",
  "application/x-www-form-urlencoded",
  "multipart/form-data; boundary=x",
  "application/octet-stream",
  "application/jsonp",
  "application/json, text/plain",
  "none",
];
const contentType = fc.oneof({ weight: 6, arbitrary: fc.constant("application/json") }, { weight: 4, arbitrary: fc.constantFrom(...CONTENT_TYPES) });

interface HttpAnswer {
  status: number;
  type: string;
  text: string;
  json: unknown;
}

async function send(method: string, path: string, opts: { body?: string; type?: string; headers?: Record<string, string> } = {}): Promise<HttpAnswer> {
  const headers: Record<string, string> = { ...opts.headers };
  let body: Uint8Array | undefined;
  if (opts.body !== undefined) {
    // Bytes, so that fetch adds no content type of its own ("none": the request has none).
    body = Buffer.from(opts.body, "utf8");
    if (opts.type !== undefined && opts.type !== "none") headers["content-type"] = opts.type;
  }
  const res = await orExit(child, fetch(`http://127.0.0.1:${httpPort}${path}`, { method, headers, body, signal: AbortSignal.timeout(15_000) }));
  const text = await res.text();
  let json: unknown;
  try {
    json = text === "" ? undefined : JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, type: res.headers.get("content-type") ?? "", text, json };
}

function fail(what: string, req: unknown, a: HttpAnswer): never {
  throw new Error(`${what}\nrequest: ${JSON.stringify(req).slice(0, 600)}\nanswer: ${a.status} ${a.type} ${a.text.slice(0, 400)}`);
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const isInt = (v: unknown) => Number.isSafeInteger(v);
const DATE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/;
const isUser = (u: unknown) => isObject(u) && isInt(u.id) && typeof u.login === "string" && Object.keys(u).length === 2;
const isRoom = (r: unknown) => isObject(r) && isInt(r.id) && Array.isArray(r.users) && r.users.every(isUser);
const isRoomMessage = (m: unknown) =>
  isObject(m) && typeof m.text === "string" && (m.user_id === null || isInt(m.user_id)) && isInt(m.room_id) && typeof m.created_at === "string" && DATE.test(m.created_at);

/** 002's error codes by HTTP status (the seed's and PROTOCOL.md §13's). */
const ECHAT_ERRORS: Record<number, string[]> = {
  401: ["unauthorized"],
  403: ["forbidden"],
  404: ["not_found"],
  413: ["too_large"],
  422: ["invalid_json", "wrong_credentials", "user_not_found", "user_already_exists", "room_not_found"],
  426: ["websocket_required"],
  429: ["too_many_requests"],
};

/** 002's answer to a request: the route's success shape, or an error in the seed's shape. */
function checkEchat(route: string, req: unknown, a: HttpAnswer, success: (body: unknown) => boolean): void {
  if (!a.type.startsWith("application/json")) fail("002 answered without a JSON content type", req, a);
  if (a.status === 200) {
    if (!success(a.json)) fail(`002 ${route}: 200 with a body not in the route's shape`, req, a);
    return;
  }
  const codes = ECHAT_ERRORS[a.status];
  if (!codes) fail(`002 ${route}: HTTP ${a.status} is not a status the door documents`, req, a);
  const e = a.json;
  if (!isObject(e) || Object.keys(e).length !== 1 || !isObject(e.error) || typeof e.error.code !== "string") fail(`002 ${route}: an error not shaped {"error":{"code"}}`, req, a);
  if (!codes.includes(e.error.code as string)) fail(`002 ${route}: HTTP ${a.status} with code '${e.error.code}'`, req, a);
}

/** 003's ApiResponse: {status, message} with "success" exactly for 200. */
function checkChat(route: string, req: unknown, a: HttpAnswer): void {
  if (!a.type.startsWith("application/json")) fail("003 answered without a JSON content type", req, a);
  if (![200, 400, 401, 404, 409, 413, 415].includes(a.status)) fail(`003 ${route}: HTTP ${a.status} is not a status this test expects`, req, a);
  const b = a.json;
  if (!isObject(b) || Object.keys(b).length !== 2 || typeof b.message !== "string") fail(`003 ${route}: a body not shaped {"status","message"}`, req, a);
  if (b.status !== (a.status === 200 ? "success" : "error")) fail(`003 ${route}: status '${String(b.status)}' with HTTP ${a.status}`, req, a);
}

/** A WebSocket that keeps every message (text or not) and its close. */
class RawWs {
  readonly got: { text: string; binary: boolean }[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  isClosed = false;
  private wake: (() => void) | undefined;

  private constructor(readonly ws: WebSocket) {
    ws.on("message", (data, binary) => {
      this.got.push({ text: data.toString(), binary });
      this.wake?.();
    });
    this.closed = new Promise((resolve) =>
      ws.on("close", (code, reason) => {
        this.isClosed = true;
        this.wake?.();
        resolve({ code, reason: reason.toString() });
      }),
    );
    ws.on("error", () => {});
  }

  static async open(path: string): Promise<RawWs> {
    let c: RawWs | undefined;
    await openWebSocket(`ws://127.0.0.1:${httpPort}${path}`, child, undefined, (ws) => (c = new RawWs(ws)));
    return c as RawWs;
  }

  send(m: string | Buffer): void {
    this.ws.send(m);
  }

  /** Waits until a message at index >= `from` matches; returns its index. */
  async until(from: number, match: (text: string) => boolean, what: string, ms = 15_000): Promise<number> {
    const end = Date.now() + ms;
    for (;;) {
      for (let i = from; i < this.got.length; i++) if (match(this.got[i].text)) return i;
      if (this.isClosed) throw new Error(`the socket closed while waiting for ${what}; got ${JSON.stringify(this.got.slice(from)).slice(0, 600)}`);
      if (!isAlive(child)) throw new Error(`the server exited while waiting for ${what}:\n${child.stdout().slice(-3000)}`);
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.got.slice(from)).slice(0, 600)}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, 200);
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
  }

  close(): void {
    this.ws.terminate();
  }
}

/** One WebSocket message: JSON text, text that is not JSON, or a binary message. */
function socketMessage(fields: Record<string, string>): fc.Arbitrary<{ data: string; binary: boolean }> {
  const keys = fc.oneof(fc.constantFrom(...Object.keys(fields), ...PROTO_KEYS), fc.string({ maxLength: 6 }));
  return fc.oneof(
    { weight: 8, arbitrary: objectText(fields, keys).map((data) => ({ data, binary: false })) },
    { weight: 2, arbitrary: jsonText(keys).map((data) => ({ data, binary: false })) },
    { weight: 1, arbitrary: fc.constantFrom(...NOT_JSON).map((data) => ({ data, binary: false })) },
    { weight: 1, arbitrary: fc.integer({ min: MAX_DEPTH - 1, max: MAX_DEPTH + 3 }).map((n) => ({ data: `{"a":${"[".repeat(n)}${"]".repeat(n)}}`, binary: false })) },
    { weight: 1, arbitrary: objectText(fields, keys).map((data) => ({ data, binary: true })) },
  );
}

const shown = (m: { data: string; binary: boolean }) => `${m.binary ? "binary " : ""}${m.data.slice(0, 400)}`;

function parsed(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

beforeAll(async () => {
  child = await startChild([
    "--http-port", "0",
    "--max-frame", String(MAX_FRAME),
    "--max-depth", String(MAX_DEPTH),
    // Thousands of bad messages and wrong passwords on purpose: no connection is closed for them.
    "--bad-frame-limit", "1000000",
    "--auth-fail-login", "1000000",
    "--auth-fail-addr", "1000000",
  ]);
  httpPort = child.portOf("httpPort") as number;
  expect(httpPort).toBeGreaterThan(0);
  const reg = async (login: string) => {
    const a = await send("POST", "/v1/register", { body: JSON.stringify({ login, password: "pw" }), type: "application/json" });
    expect(a.status).toBe(200);
    return (a.json as { session_id: string }).session_id;
  };
  known.loginA = `fza${process.pid}`;
  known.loginB = `fzb${process.pid}`;
  known.sidA = await reg(known.loginA);
  known.sidB = await reg(known.loginB);
  known.idB = ((await send("GET", "/v1/info", { headers: { authorization: `Bearer ${known.sidB}` } })).json as { id: number }).id;
  const room = await send("POST", "/v1/rooms", { body: JSON.stringify({ users: [{ id: known.idB }] }), type: "application/json", headers: { authorization: `Bearer ${known.sidA}` } });
  expect(room.status).toBe(200);
  known.room = (room.json as { id: number }).id;
  for (const [email, password, username] of [
    [known.mainEmail, known.mainPass, "Fuzz Main"],
    [known.victimEmail, known.victimPass, "Fuzz Victim"],
  ]) {
    const made = await send("POST", "/create_user", { body: JSON.stringify({ username, password, email }), type: "application/json" });
    expect(made.status).toBe(200);
  }
}, 30_000);

describe("HTTP doors: any value in any field gets the door's shape", () => {
  it("002 (e_chat_server) routes: any body, path, query and session carrier", async () => {
    const session = fc.oneof(
      { weight: 3, arbitrary: fc.constant("A") },
      { weight: 1, arbitrary: fc.constant("B") },
      { weight: 1, arbitrary: fc.constant("none") },
      { weight: 2, arbitrary: fc.constantFrom(...NASTY_TOKENS) },
    );
    const carrier = fc.constantFrom("bearer", "cookie", "query", "bearer+cookie", "cookie+query", "none");
    const roomId = fc.oneof(
      { weight: 3, arbitrary: fc.constant(String(known.room)) },
      { weight: 3, arbitrary: fc.constantFrom(...NASTY_TOKENS, "0", "1", "01", "1.5", "99999999999999999999", "１", encodeURIComponent("😀"), "..", ".", "1".repeat(120), "x".repeat(300)) },
      { weight: 1, arbitrary: fc.string({ maxLength: 8 }).map(encodeURIComponent) },
    );
    const q = fc.oneof(fc.constant(undefined), fc.constantFrom(...NASTY_TOKENS, "fz", "F"), fc.string({ maxLength: 8 }).map(encodeURIComponent));
    const creds = { login: JSON.stringify(known.loginA), password: '"pw"' };
    const route = fc.oneof(
      fc.record({ route: fc.constant("POST /v1/register"), body: bodyText({ login: '"fzr"', password: '"pw"' }) }),
      fc.record({ route: fc.constant("POST /v1/login"), body: bodyText(creds) }),
      fc.record({ route: fc.constant("POST /v1/logout"), body: bodyText({}) }),
      fc.record({ route: fc.constant("GET /v1/info") }),
      fc.record({ route: fc.constant("GET /v1/users/"), q }),
      fc.record({ route: fc.constant("GET /v1/rooms") }),
      fc.record({ route: fc.constant("POST /v1/rooms"), body: bodyText({ users: JSON.stringify([{ id: known.idB, login: known.loginB }]) }) }),
      fc.record({ route: fc.constant("GET /v1/rooms/{id}"), id: roomId }),
      fc.record({ route: fc.constant("GET /v1/rooms/{id}/messages"), id: roomId }),
      fc.record({ route: fc.constantFrom("GET /v1/nowhere", "DELETE /v1/rooms", "PUT /v1/login", "GET /v1/rooms/{id}/chat"), id: roomId }),
    );
    const request = fc.record({ r: route, session, carrier, type: contentType });

    let n = 0;
    await fc.assert(
      fc.asyncProperty(request, async ({ r, session: who, carrier: how, type }) => {
        n++;
        const [method, template] = r.route.split(" ");
        let path = template.replace("{id}", "id" in r ? (r.id as string) : "1");
        if ("q" in r && r.q !== undefined) path += `?q=${r.q}`;
        // A logout would end the session the other runs use: it gets a session of its own.
        let sid = who === "A" ? known.sidA : who === "B" ? known.sidB : who;
        if (r.route === "POST /v1/logout" && who === "A") {
          const a = await send("POST", "/v1/login", { body: JSON.stringify({ login: known.loginA, password: "pw" }), type: "application/json" });
          sid = (a.json as { session_id: string }).session_id;
        }
        const headers: Record<string, string> = {};
        if (who !== "none") {
          if (how.includes("bearer")) headers.authorization = `Bearer ${sid}`;
          if (how.includes("cookie")) headers.cookie = `session_id=${sid}`;
          if (how.includes("query")) path += `${path.includes("?") ? "&" : "?"}session_id=${sid}`;
        }
        const body = "body" in r ? (r.body as string) : undefined;
        const req = { method, path, headers, type, body };
        const a = await send(method, path, { body, type, headers });
        const ok: Record<string, (b: unknown) => boolean> = {
          "POST /v1/register": (b) => isObject(b) && typeof b.session_id === "string" && /^[0-9a-f]{16,}$/.test(b.session_id),
          "POST /v1/login": (b) => isObject(b) && typeof b.session_id === "string" && /^[0-9a-f]{16,}$/.test(b.session_id),
          "POST /v1/logout": (b) => isObject(b) && Object.keys(b).length === 0,
          "GET /v1/info": isUser,
          "GET /v1/users/": (b) => Array.isArray(b) && b.length <= 50 && b.every(isUser),
          "GET /v1/rooms": (b) => Array.isArray(b) && b.every(isRoom),
          "POST /v1/rooms": isRoom,
          "GET /v1/rooms/{id}": isRoom,
          "GET /v1/rooms/{id}/messages": (b) => Array.isArray(b) && b.every(isRoomMessage),
        };
        checkEchat(r.route, req, a, ok[r.route] ?? (() => false));
        // Without a session every route but register and login is 401, whatever else is wrong.
        const noSession = who === "none" || how === "none";
        if (noSession && !["POST /v1/register", "POST /v1/login"].includes(r.route) && a.status !== 404) {
          if (a.status !== 401) fail(`002 ${r.route}: no session, but HTTP ${a.status} (not 401)`, req, a);
        }
      }),
      { numRuns: runs(600), seed: SEED, endOnFailure: true },
    );
    expect(n).toBe(runs(600));
    expect(isAlive(child)).toBe(true);
    expect((await send("GET", "/v1/info", { headers: { authorization: `Bearer ${known.sidA}` } })).status).toBe(200);
  }, 60_000);

  it("003 (HTTP/WS chat) routes: any body, any content type", async () => {
    const victim = { email: JSON.stringify(known.victimEmail), password: JSON.stringify(known.victimPass) };
    const route = fc.oneof(
      fc.record({ route: fc.constant("POST /create_user"), body: bodyText({ username: '"Fuzz New"', password: '"pw"', email: '"fuzz-new@example.com"' }) }),
      fc.record({ route: fc.constant("POST /login"), body: bodyText({ email: JSON.stringify(known.mainEmail), password: JSON.stringify(known.mainPass) }) }),
      fc.record({ route: fc.constant("POST /change_password"), body: bodyText({ email: victim.email, old_password: victim.password, new_password: victim.password }) }),
      fc.record({ route: fc.constant("POST /delete_user"), body: bodyText({ email: victim.email, password: '"not-the-password"' }) }),
      fc.record({ route: fc.constant("GET /status") }),
      fc.record({ route: fc.constantFrom("GET /nowhere", "PUT /login", "POST /status", "GET /%", "GET /login%zz", "POST /wirechat") }),
    );
    let n = 0;
    await fc.assert(
      fc.asyncProperty(fc.record({ r: route, type: contentType }), async ({ r, type }) => {
        n++;
        const [method, path] = r.route.split(" ");
        const body = "body" in r ? (r.body as string) : undefined;
        const req = { method, path, type, body };
        const a = await send(method, path, { body, type });
        checkChat(r.route, req, a);
        if (r.route === "GET /status" && a.status !== 200) fail("003 /status is not 200", req, a);
      }),
      { numRuns: runs(500), seed: SEED, endOnFailure: true },
    );
    expect(n).toBe(runs(500));
    expect(isAlive(child)).toBe(true);
    expect((await send("GET", "/status")).status).toBe(200);
  }, 60_000);
});

describe("WebSockets of the HTTP port: any message gets the door's answer, and the socket stays", () => {
  it("002's room socket: exactly one echo or {error:{code}} per message", async () => {
    const ws = await RawWs.open(`/v1/rooms/${known.room}/chat?session_id=${known.sidA}`);
    let n = 0;
    // The socket logs in with its session first: a message of its own comes back once it has.
    ws.send(JSON.stringify({ text: "ready" }));
    let seen = (await ws.until(0, (t) => (parsed(t) as { text?: string })?.text === "ready", "the socket's login")) + 1;
    await fc.assert(
      fc.asyncProperty(socketMessage({ text: '"hello"' }), async (m) => {
        const sentinel = `zz-sentinel-${++n}`;
        ws.send(m.binary ? Buffer.from(m.data) : m.data);
        ws.send(JSON.stringify({ text: sentinel }));
        const end = await ws.until(seen, (t) => (parsed(t) as { text?: string })?.text === sentinel, `the sentinel after ${shown(m)}`);
        const answers = ws.got.slice(seen, end);
        seen = end + 1;
        if (answers.length !== 1) throw new Error(`${answers.length} answers to ${shown(m)}: ${JSON.stringify(answers).slice(0, 600)}`);
        const a = parsed(answers[0].text);
        if (answers[0].binary) throw new Error(`a binary answer to ${shown(m)}`);
        const sent = m.binary ? undefined : parsed(m.data);
        const text = isObject(sent) && typeof sent.text === "string" ? sent.text : undefined;
        if (isRoomMessage(a)) {
          if (text === undefined || (a as { text: string }).text !== text || (a as { room_id: number }).room_id !== known.room) {
            throw new Error(`an echo that is not of ${shown(m)}: ${answers[0].text.slice(0, 300)}`);
          }
          return;
        }
        const e = isObject(a) ? a.error : undefined;
        if (!isObject(a) || Object.keys(a).length !== 1 || !isObject(e) || !["invalid_json", "room_not_found"].includes(e.code as string) || (e.message !== undefined && typeof e.message !== "string")) {
          throw new Error(`not the door's error shape for ${shown(m)}: ${answers[0].text.slice(0, 300)}`);
        }
      }),
      { numRuns: runs(400), seed: SEED, endOnFailure: true },
    );
    expect(ws.isClosed).toBe(false);
    expect(isAlive(child)).toBe(true);
    ws.close();
  }, 60_000);

  it("003's /ws after auth: one {status:'error',message:null,info} or the chat echo per message; none for join and leave", async () => {
    const ws = await RawWs.open("/ws");
    ws.send(JSON.stringify({ type: "auth", email: known.mainEmail, password: known.mainPass }));
    let seen = (await ws.until(0, (t) => (parsed(t) as { status?: string })?.status === "authenticated", "the welcome")) + 1;
    let n = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          socketMessage({ type: '"chat"', content: '"hello"' }),
          socketMessage({ type: JSON.stringify("join"), nick: '"x"' }),
          fc.constantFrom("auth", "leave", "chat", "", "AUTH", "__proto__", "toString").chain((type) => socketMessage({ type: JSON.stringify(type), email: JSON.stringify(known.mainEmail), password: JSON.stringify(known.mainPass) })),
        ),
        async (m) => {
          const sentinel = `zz-sentinel-${++n}`;
          ws.send(m.binary ? Buffer.from(m.data) : m.data);
          ws.send(JSON.stringify({ type: "chat", content: sentinel }));
          const end = await ws.until(seen, (t) => (parsed(t) as { message?: { content?: string } })?.message?.content === sentinel, `the sentinel after ${shown(m)}`);
          const answers = ws.got.slice(seen, end);
          seen = end + 1;
          const sent = m.binary ? undefined : parsed(m.data);
          const type = isObject(sent) ? sent.type : undefined;
          const silent = type === "join" || type === "leave";
          if (answers.length !== (silent ? 0 : 1)) throw new Error(`${answers.length} answers to ${shown(m)}: ${JSON.stringify(answers).slice(0, 600)}`);
          if (silent) return;
          const a = parsed(answers[0].text);
          if (!isObject(a) || Object.keys(a).length !== 3) throw new Error(`not the door's shape for ${shown(m)}: ${answers[0].text.slice(0, 300)}`);
          if (a.status === "message") {
            const msg = a.message as Record<string, unknown> | null;
            if (type !== "chat" || !isObject(msg) || !isObject(sent) || msg.content !== sent.content || a.info !== null) {
              throw new Error(`an echo that is not of ${shown(m)}: ${answers[0].text.slice(0, 300)}`);
            }
            return;
          }
          if (a.status !== "error" || a.message !== null || typeof a.info !== "string") throw new Error(`not the door's error shape for ${shown(m)}: ${answers[0].text.slice(0, 300)}`);
        },
      ),
      { numRuns: runs(400), seed: SEED, endOnFailure: true },
    );
    expect(ws.isClosed).toBe(false);
    expect(isAlive(child)).toBe(true);
    ws.close();
  }, 60_000);

  it("003's /ws before auth: a right auth is welcomed; anything else gets 'Authentication failed' and the close (1000)", async () => {
    const auth = { type: '"auth"', email: JSON.stringify(known.mainEmail), password: JSON.stringify(known.mainPass) };
    await fc.assert(
      fc.asyncProperty(socketMessage(auth), async (m) => {
        const ws = await RawWs.open("/ws");
        try {
          ws.send(m.binary ? Buffer.from(m.data) : m.data);
          await ws.until(0, () => true, `the answer to ${shown(m)}`);
          const a = parsed(ws.got[0].text);
          if (!isObject(a) || Object.keys(a).length !== 3 || a.message !== null || typeof a.info !== "string") {
            throw new Error(`not the door's shape for ${shown(m)}: ${ws.got[0].text.slice(0, 300)}`);
          }
          const sent = m.binary ? undefined : parsed(m.data);
          const right = isObject(sent) && sent.type === "auth" && typeof sent.email === "string" && sent.email.trim().toLowerCase() === known.mainEmail && sent.password === known.mainPass;
          if (a.status === "authenticated") {
            if (!right) throw new Error(`welcomed after ${shown(m)}`);
            return;
          }
          if (right || a.status !== "error" || !(a.info as string).startsWith("Authentication failed: ")) throw new Error(`${ws.got[0].text.slice(0, 300)} after ${shown(m)}`);
          const { code } = await orExit(child, Promise.race([ws.closed, new Promise<{ code: number }>((r) => setTimeout(() => r({ code: -1 }), 5000))]));
          if (code !== 1000) throw new Error(`closed with ${code} (not 1000) after ${shown(m)}`);
        } finally {
          ws.close();
        }
      }),
      { numRuns: runs(100), seed: SEED, endOnFailure: true },
    );
    expect(isAlive(child)).toBe(true);
  }, 60_000);

  it("native /wirechat before and after auth: exactly one reply per message, with an integer status", async () => {
    const ACTIONS = ["ping", "hello", "userinfo", "contactlist", "channellist", "history", "searchuser", "dialogs", "__proto__", "toString", "constructor", "", "zz"];
    const message = fc.oneof(
      { weight: 4, arbitrary: fc.constantFrom(...ACTIONS).chain((action) => socketMessage({ action: JSON.stringify(action), data: "{}" })) },
      { weight: 1, arbitrary: socketMessage({ data: "{}" }) },
    );
    for (const phase of ["before auth", "after auth"]) {
      const ws = await RawWs.open("/wirechat");
      let seen = (await ws.until(0, (t) => (parsed(t) as { action?: string })?.action === "welcome", "the welcome")) + 1;
      if (phase === "after auth") {
        const login = `fzn${process.pid}`;
        ws.send(JSON.stringify({ action: "register", data: { login, pass: "pw", nick: login } }));
        seen = (await ws.until(seen, (t) => (parsed(t) as { action?: string })?.action === "auth", "the auth after register")) + 1;
      }
      let n = 0;
      await fc.assert(
        fc.asyncProperty(message, async (m) => {
          const sentinel = `zz_sentinel_${++n}`;
          ws.send(m.binary ? Buffer.from(m.data) : m.data);
          ws.send(JSON.stringify({ action: sentinel }));
          const end = await ws.until(seen, (t) => (parsed(t) as { action?: string })?.action === sentinel, `the sentinel after ${shown(m)}`);
          const replies = ws.got.slice(seen, end).filter((g) => !(parsed(g.text) as { action?: string })?.action?.startsWith("ev_"));
          seen = end + 1;
          if (replies.length !== 1) throw new Error(`${replies.length} replies to ${shown(m)} (${phase}): ${JSON.stringify(replies).slice(0, 600)}`);
          const r = parsed(replies[0].text);
          if (!isObject(r) || typeof r.action !== "string" || !isObject(r.data) || !Number.isInteger(r.data.status)) {
            throw new Error(`not a native reply to ${shown(m)} (${phase}): ${replies[0].text.slice(0, 300)}`);
          }
        }),
        { numRuns: runs(300), seed: SEED, endOnFailure: true },
      );
      expect(ws.isClosed).toBe(false);
      ws.close();
    }
    expect(isAlive(child)).toBe(true);
  }, 60_000);

  it("a message over --max-frame closes each kind of socket with 1009; the server stays up", async () => {
    const big = JSON.stringify({ text: "x".repeat(MAX_FRAME + 1), type: "chat", action: "ping" });
    const room = await RawWs.open(`/v1/rooms/${known.room}/chat?session_id=${known.sidA}`);
    const chat = await RawWs.open("/ws");
    const native = await RawWs.open("/wirechat");
    for (const ws of [room, chat, native]) {
      ws.send(big);
      expect((await orExit(child, ws.closed)).code).toBe(1009);
    }
    expect(isAlive(child)).toBe(true);
    expect((await send("GET", "/status")).status).toBe(200);
  });
});
