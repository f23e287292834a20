// The e_chat_server door (seed 002) over real HTTP (fetch) and real WebSockets (ws):
// every example of the seed document with its error shapes, the session's three
// carriers, rooms as private channels, native members, bad input.

import http from "node:http";
import WebSocket from "ws";
import { describe, expect, it } from "vitest";
import { Client, removeDir, serveForFile, startTestServer, uniqueName, WsClient } from "./helpers.js";
import { heldGate, sleep, wrapCalls } from "./pipeline-helpers.js";
import type { Config } from "../src/config.js";

const srv = serveForFile({ httpPort: 0, maxFrame: 8192, maxConnectionsPerUser: 3 });
const DATE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/;

function base(): string {
  return `http://127.0.0.1:${srv.server.httpPort}`;
}

async function call(method: string, path: string, opts: { body?: unknown; sid?: string; raw?: string; headers?: Record<string, string> } = {}) {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.body !== undefined || opts.raw !== undefined) headers["content-type"] = "application/json";
  if (opts.sid) headers.authorization = `Bearer ${opts.sid}`;
  const res = await fetch(base() + path, { method, headers, body: opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body)) });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : undefined, cookie: res.headers.get("set-cookie") };
}

/** Runs `fn` against a server of its own (settings `overrides`, an HTTP port), stopped after. */
async function withOwnServer(overrides: Partial<Config>, fn: (port: number, post: (path: string, body: unknown, sid?: string) => Promise<any>) => Promise<void>): Promise<void> {
  const own = await startTestServer({ httpPort: 0, ...overrides });
  const port = own.httpPort as number;
  const post = async (path: string, body: unknown, sid?: string) => {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (sid) headers.authorization = `Bearer ${sid}`;
    return (await fetch(`http://127.0.0.1:${port}${path}`, { method: "POST", headers, body: JSON.stringify(body) })).json() as Promise<any>;
  };
  try {
    await fn(port, post);
  } finally {
    await own.stop();
    removeDir(own.services.config.dataDir);
  }
}

async function register(login = uniqueName("e"), password = "password"): Promise<{ login: string; password: string; sid: string; id: number }> {
  const r = await call("POST", "/v1/register", { body: { login, password } });
  expect(r.status).toBe(200);
  expect(r.body).toEqual({ session_id: expect.stringMatching(/^[0-9a-f]{16,}$/) });
  const info = await call("GET", "/v1/info", { sid: r.body.session_id });
  return { login, password, sid: r.body.session_id, id: info.body.id };
}

describe("e_chat_server door: accounts", () => {
  it("POST /v1/register: 200 {session_id}; 422 user_already_exists, invalid_json", async () => {
    const a = await register();
    expect(await call("POST", "/v1/register", { body: { login: a.login, password: "x" } })).toMatchObject({ status: 422, body: { error: { code: "user_already_exists" } } });
    expect(await call("POST", "/v1/register", { raw: "{not json" })).toMatchObject({ status: 422, body: { error: { code: "invalid_json" } } });
    expect(await call("POST", "/v1/register", { body: { login: "x" } })).toMatchObject({ status: 422, body: { error: { code: "invalid_json" } } });
  });

  it("a body that is not UTF-8 is invalid_json, not decoded into another password", async () => {
    const login = uniqueName("u8");
    const raw = (password: number[]) =>
      Buffer.concat([Buffer.from(`{"login":"${login}","password":"`), Buffer.from(password), Buffer.from('"}')]).toString("latin1");
    const send = (path: string, password: number[]) =>
      fetch(base() + path, { method: "POST", headers: { "content-type": "application/json" }, body: Buffer.from(raw(password), "latin1") }).then(async (r) => ({ status: r.status, body: await r.json() }));
    expect(await send("/v1/register", [0xff, 0xfe])).toEqual({ status: 422, body: { error: { code: "invalid_json" } } });
    expect((await call("POST", "/v1/register", { body: { login, password: "ok" } })).status).toBe(200);
    expect(await send("/v1/login", [0xfe, 0xff])).toEqual({ status: 422, body: { error: { code: "invalid_json" } } });
  });

  it("POST /v1/login: 200 {session_id} and the cookie; 422 wrong_credentials, user_not_found, invalid_json", async () => {
    const a = await register();
    const r = await call("POST", "/v1/login", { body: { login: a.login, password: a.password } });
    expect(r.status).toBe(200);
    expect(r.body.session_id).toEqual(expect.any(String));
    expect(r.cookie).toContain(`session_id=${r.body.session_id}`);
    expect(await call("POST", "/v1/login", { body: { login: a.login, password: "nope" } })).toMatchObject({ status: 422, body: { error: { code: "wrong_credentials" } } });
    expect(await call("POST", "/v1/login", { body: { login: uniqueName("ghost"), password: "x" } })).toMatchObject({ status: 422, body: { error: { code: "user_not_found" } } });
    expect(await call("POST", "/v1/login", { raw: "[]" })).toMatchObject({ status: 422, body: { error: { code: "invalid_json" } } });
    // Valid JSON with a login no account can have, or a password none can: the seed's
    // answers, not invalid_json (auth's schema refused them).
    expect(await call("POST", "/v1/login", { body: { login: "x".repeat(70), password: "x" } })).toMatchObject({ status: 422, body: { error: { code: "user_not_found" } } });
    expect(await call("POST", "/v1/login", { body: { login: "lone\ud800", password: "x" } })).toMatchObject({ status: 422, body: { error: { code: "user_not_found" } } });
    expect(await call("POST", "/v1/login", { body: { login: a.login, password: "x".repeat(1100) } })).toMatchObject({ status: 422, body: { error: { code: "wrong_credentials" } } });
  });

  it("a login or register through a route holds no connection: no presence for contacts, none of the connection cap", async () => {
    const a = await register();
    const watcher = await Client.connect(srv.port);
    const w = uniqueName("w");
    expect((await watcher.request("register", { login: w, pass: "secret", nick: w })).status).toBe(0);
    const uid = (await watcher.request("searchuser", { q: a.login })).list[0].uid;
    expect((await watcher.request("addcontact", { uid })).status).toBe(0);
    expect((await call("POST", "/v1/login", { body: { login: a.login, password: a.password } })).status).toBe(200);
    expect(await watcher.quiet(400, (f) => f.action === "ev_presence")).toBe(true);
    // The user's native connections at --max-connections-per-user (3 here): the
    // routes still log in.
    const natives = [];
    for (let i = 0; i < 3; i++) {
      const c = await Client.connect(srv.port);
      expect((await c.request("auth", { login: a.login, pass: a.password })).status).toBe(0);
      natives.push(c);
    }
    expect(await watcher.event("ev_presence")).toEqual({ uid, online: true });
    expect((await call("POST", "/v1/login", { body: { login: a.login, password: a.password } })).status).toBe(200);
    for (const c of [watcher, ...natives]) c.close();
  });

  it("the cookie carries no session from a page of another origin (Origin checked); headers and the query do", async () => {
    const a = await register();
    const port = srv.server.httpPort as number;
    // node:http, so that Origin is sent as written (fetch may not send it).
    const get = (headers: Record<string, string>) =>
      new Promise<number>((resolve, reject) => {
        http.get({ host: "127.0.0.1", port, path: "/v1/info", headers }, (res) => {
          res.resume();
          resolve(res.statusCode as number);
        }).on("error", reject);
      });
    const cookie = `session_id=${a.sid}`;
    expect(await get({ cookie, origin: "http://other-app.example.com:8080" })).toBe(401);
    expect(await get({ cookie, origin: "null" })).toBe(401);
    expect(await get({ cookie, origin: `http://127.0.0.1:${port}` })).toBe(200);
    expect(await get({ cookie })).toBe(200);
    expect(await get({ authorization: `Bearer ${a.sid}`, origin: "http://other-app.example.com:8080" })).toBe(200);
    // The room socket too: refused before the upgrade.
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [] } })).body.id;
    const refused = await new Promise<number>((resolve) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/v1/rooms/${room}/chat`, { headers: { cookie }, origin: "http://other-app.example.com:8080" });
      ws.on("unexpected-response", (_req, res) => resolve(res.statusCode as number));
      ws.on("open", () => {
        ws.close();
        resolve(101);
      });
    });
    expect(refused).toBe(401);
  });

  it("GET /v1/info with the session as bearer, cookie or query parameter; 401 without", async () => {
    const a = await register();
    expect(await call("GET", "/v1/info", { sid: a.sid })).toEqual({ status: 200, body: { id: expect.any(Number), login: a.login }, cookie: null });
    expect((await call("GET", "/v1/info", { headers: { cookie: `session_id=${a.sid}` } })).body).toEqual({ id: a.id, login: a.login });
    expect((await call("GET", `/v1/info?session_id=${a.sid}`)).body).toEqual({ id: a.id, login: a.login });
    expect(await call("GET", "/v1/info")).toMatchObject({ status: 401, body: { error: { code: "unauthorized" } } });
    expect(await call("GET", "/v1/info", { sid: "0".repeat(32) })).toMatchObject({ status: 401, body: { error: { code: "unauthorized" } } });
  });

  it("POST /v1/logout: 200 {}, then the session is gone; 401 without one", async () => {
    const a = await register();
    expect(await call("POST", "/v1/logout", { sid: a.sid, body: {} })).toMatchObject({ status: 200, body: {} });
    expect((await call("GET", "/v1/info", { sid: a.sid })).status).toBe(401);
    expect(await call("POST", "/v1/logout", { body: {} })).toMatchObject({ status: 401, body: { error: { code: "unauthorized" } } });
    // The cookie is cleared with its own session only: a logout of another (Bearer) keeps it.
    const [c, d] = [await register(), await register()];
    const other = await call("POST", "/v1/logout", { sid: d.sid, body: {}, headers: { cookie: `session_id=${c.sid}` } });
    expect(other).toMatchObject({ status: 200, cookie: null });
    expect((await call("GET", "/v1/info", { headers: { cookie: `session_id=${c.sid}` } })).status).toBe(200);
    const own = await call("POST", "/v1/logout", { body: {}, headers: { cookie: `session_id=${c.sid}` } });
    expect(own).toMatchObject({ status: 200, cookie: expect.stringMatching(/^session_id=;.*Max-Age=0/) });
  });

  it("the session_id is a wirechat session: native auth {sid} resumes it; a native account logs in here", async () => {
    const a = await register();
    const n = await Client.connect(srv.port);
    expect(await n.request("auth", { sid: a.sid })).toMatchObject({ status: 0, nick: a.login });
    const native = uniqueName("nat");
    const c = await Client.connect(srv.port);
    expect((await c.request("register", { login: native, pass: "pw", nick: native })).status).toBe(0);
    expect((await call("POST", "/v1/login", { body: { login: native, password: "pw" } })).status).toBe(200);
    n.close();
    c.close();
  });

  it("GET /v1/users/?q= : [{id, login}] by login prefix", async () => {
    const prefix = uniqueName("srch");
    const a = await register(`${prefix}_a`);
    await register(`${prefix}_b`);
    const r = await call("GET", `/v1/users/?q=${prefix}`, { sid: a.sid });
    expect(r.status).toBe(200);
    expect(r.body.map((u: { login: string }) => u.login).sort()).toEqual([`${prefix}_a`, `${prefix}_b`]);
    expect(r.body.every((u: { id: unknown }) => typeof u.id === "number")).toBe(true);
    expect((await call("GET", `/v1/users/?q=${prefix}`)).status).toBe(401);
  });
});

describe("e_chat_server door: rooms", () => {
  it("POST /v1/rooms makes a private room with the caller; GET /v1/rooms and /v1/rooms/{id}; room_not_found for others", async () => {
    const a = await register();
    const b = await register();
    const out = await register();
    const r = await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ id: b.id, login: b.login }] } });
    expect(r.status).toBe(200);
    expect(r.body).toEqual({ id: expect.any(Number), users: expect.arrayContaining([{ id: a.id, login: a.login }, { id: b.id, login: b.login }]) });
    expect(r.body.users).toHaveLength(2);
    const room = r.body.id;
    expect((await call("GET", "/v1/rooms", { sid: b.sid })).body).toEqual([{ id: room, users: expect.arrayContaining([{ id: a.id, login: a.login }]) }]);
    expect((await call("GET", `/v1/rooms/${room}`, { sid: b.sid })).body).toMatchObject({ id: room });
    expect(await call("GET", `/v1/rooms/${room}`, { sid: out.sid })).toMatchObject({ status: 422, body: { error: { code: "room_not_found" } } });
    expect(await call("GET", `/v1/rooms/999999`, { sid: a.sid })).toMatchObject({ status: 422, body: { error: { code: "room_not_found" } } });
    expect(await call("GET", `/v1/rooms/abc`, { sid: a.sid })).toMatchObject({ status: 422, body: { error: { code: "room_not_found" } } });
    expect((await call("GET", "/v1/rooms", { sid: out.sid })).body).toEqual([]);
    // Streamed room by room (built whole, 1,000 rooms of 101 members were ~15 MB).
    const listed = await fetch(`${base()}/v1/rooms`, { headers: { authorization: `Bearer ${a.sid}` } });
    expect(listed.headers.get("transfer-encoding")).toBe("chunked");
    expect(listed.headers.get("content-type")).toBe("application/json; charset=utf-8");
    expect(await listed.json()).toEqual([{ id: room, users: expect.arrayContaining([{ id: b.id, login: b.login }]) }]);
    expect((await call("GET", "/v1/rooms")).status).toBe(401);
    // The seed's example: GET /v1/rooms/10 without a session.
    expect(await call("GET", `/v1/rooms/${room}`)).toMatchObject({ status: 401, body: { error: { code: "unauthorized" } } });
    expect(await call("GET", `/v1/rooms/${room}`, { sid: "0".repeat(32) })).toMatchObject({ status: 401, body: { error: { code: "unauthorized" } } });
    expect(await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ id: 987654321 }] } })).toMatchObject({ status: 422, body: { error: { code: "user_not_found" } } });
    expect(await call("POST", "/v1/rooms", { sid: a.sid, raw: "{" })).toMatchObject({ status: 422, body: { error: { code: "invalid_json" } } });
    expect(await call("POST", "/v1/rooms", { sid: a.sid, body: { users: "b" } })).toMatchObject({ status: 422, body: { error: { code: "invalid_json" } } });
    expect((await call("POST", "/v1/rooms", { raw: "{" })).status).toBe(401);
  });

  it("POST /v1/rooms names the room after its members within 64 characters, never cutting a character in two", async () => {
    // 9 characters, ", ", then a login of astral letters (two UTF-16 units each): 59
    // characters, 99 units, the 64th unit the first half of one.
    const a = await register(`q${String(Date.now() % 1e8).padStart(8, "0")}`);
    const b = await register("\u{1D49C}".repeat(40) + uniqueName("").replace(/[^a-z0-9]/g, "").slice(0, 8));
    const r = await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ login: b.login }] } });
    expect(r.status).toBe(200); // 422 invalid_json: the name ended in a lone surrogate
    const c = await Client.connect(srv.port);
    expect((await c.request("auth", { sid: a.sid })).status).toBe(0);
    const list = await c.request("channellist", { limit: 500 });
    const name = list.channels.find((ch: { chid: string }) => ch.chid === String(r.body.id)).name;
    expect(name).toBe(`${a.login}, ${b.login}`); // 59 characters: nothing to cut (64 UTF-16 units cut one in two)
    // A third member: 64 characters of the names.
    const d = await register("\u{1D4B7}".repeat(30) + uniqueName("").replace(/[^a-z0-9]/g, "").slice(0, 8));
    const r2 = await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ login: b.login }, { login: d.login }] } });
    expect(r2.status).toBe(200);
    const list2 = await c.request("channellist", { limit: 500 });
    const name2 = list2.channels.find((ch: { chid: string }) => ch.chid === String(r2.body.id)).name;
    expect(name2).toBe([...`${a.login}, ${b.login}, ${d.login}`].slice(0, 64).join(""));
    c.close();
  });

  it("WS /v1/rooms/{id}/chat: {text} reaches every member's room sockets and native members; GET messages returns them oldest first", async () => {
    const a = await register();
    const b = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ id: b.id, login: b.login }] } })).body.id;
    const wa = await WsClient.connect(srv.server.httpPort as number, `/v1/rooms/${room}/chat?session_id=${a.sid}`);
    const wb = await WsClient.connect(srv.server.httpPort as number, `/v1/rooms/${room}/chat?session_id=${b.sid}`);
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: b.login, pass: b.password })).status).toBe(0);
    await new Promise((r) => setTimeout(r, 100)); // both sockets have logged in
    wa.send({ text: "Привет" });
    for (const w of [wa, wb]) {
      expect(await w.next((m) => m.text === "Привет")).toEqual({ text: "Привет", user_id: a.id, room_id: room, created_at: expect.stringMatching(DATE) });
    }
    expect(await native.event("ev_message", (d) => d.body === "Привет")).toMatchObject({ chid: String(room), nick: a.login });
    expect((await native.request("message", { channel: String(room), body: "И тебе привет" })).status).toBe(0);
    expect(await wa.next((m) => m.text === "И тебе привет")).toMatchObject({ user_id: b.id, room_id: room });
    const hist = await call("GET", `/v1/rooms/${room}/messages`, { sid: a.sid });
    expect(hist.body).toEqual([
      { text: "Привет", user_id: a.id, room_id: room, created_at: expect.stringMatching(DATE) },
      { text: "И тебе привет", user_id: b.id, room_id: room, created_at: expect.stringMatching(DATE) },
    ]);
    expect((await call("GET", `/v1/rooms/${room}/messages`)).status).toBe(401);
    wa.send("not json");
    expect(await wa.next((m) => m.error)).toMatchObject({ error: { code: "invalid_json" } });
    wa.send({ nothing: 1 });
    expect(await wa.next((m) => m.error)).toMatchObject({ error: { code: "invalid_json" } });
    wa.send({ text: "still open" });
    expect(await wb.next((m) => m.text === "still open")).toBeTruthy();
    for (const w of [wa, wb]) w.ws.close();
    native.close();
  });

  it("a room socket whose room is deleted answers what it sends room_not_found, not unauthorized: its session is still good", async () => {
    const a = await register();
    const b = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ id: b.id, login: b.login }] } })).body.id;
    const wb = await WsClient.connect(srv.server.httpPort as number, `/v1/rooms/${room}/chat?session_id=${b.sid}`);
    const owner = await Client.connect(srv.port);
    expect((await owner.request("auth", { login: a.login, pass: a.password })).status).toBe(0);
    wb.send({ text: "hello" }); // answered once the socket has logged in: it is a member
    await wb.next((m) => m.text === "hello");
    expect((await owner.request("deletechannel", { channel: String(room) })).status).toBe(0);
    expect(await wb.next((m) => m.error)).toEqual({ error: { code: "room_not_found" } });
    wb.send({ text: "anyone?" });
    expect(await wb.next((m) => m.error)).toEqual({ error: { code: "room_not_found" } });
    expect((await call("GET", "/v1/rooms", { sid: b.sid })).status).toBe(200);
    wb.ws.close();
    owner.close();
  });

  it("GET /v1/rooms/{id}/messages answers a server error 503 unavailable, not room_not_found", async () => {
    const a = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [] } })).body.id;
    const undo = wrapCalls(srv.server.services.messages, "historySeqs", async () => {
      throw new Error("the disk failed");
    });
    try {
      expect(await call("GET", `/v1/rooms/${room}/messages`, { sid: a.sid })).toMatchObject({ status: 503, body: { error: { code: "unavailable" } } });
    } finally {
      undo();
    }
    expect((await call("GET", `/v1/rooms/${room}/messages`, { sid: a.sid })).status).toBe(200);
  });

  it("a room socket gets the room's messages from its login on, also while its membership is being read", async () => {
    const a = await register();
    const b = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ id: b.id, login: b.login }] } })).body.id;
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: a.login, pass: a.password })).status).toBe(0);
    const { channels, users } = srv.server.services;
    const uid = await users.lookup("login", b.login);
    // The socket's membership is read twice: before the upgrade, and once logged in (held here).
    let calls = 0;
    const gate = heldGate();
    const undo = wrapCalls(channels, "isMember", async (chid: string, who: string) => {
      if (chid === String(room) && who === uid && ++calls === 2) await gate.pass();
    });
    try {
      const wb = await WsClient.connect(srv.server.httpPort as number, `/v1/rooms/${room}/chat?session_id=${b.sid}`);
      await gate.reached;
      expect((await native.request("message", { channel: String(room), body: "early" })).status).toBe(0);
      await sleep(100);
      gate.open();
      expect(await wb.next((m) => m.text === "early")).toMatchObject({ text: "early", room_id: room });
      wb.ws.close();
    } finally {
      undo();
    }
    native.close();
  });

  it("a room socket whose session's login is refused for the address's throttle is told so, not unauthorized", async () => {
    await withOwnServer({ authFailAddr: 2 }, async (port, post) => {
      const login = uniqueName("t");
      const sid = (await post("/v1/register", { login, password: "pw" })).session_id;
      const room = (await post("/v1/rooms", { users: [] }, sid)).id;
      for (let i = 0; i < 3; i++) expect(await post("/v1/login", { login, password: "wrong" })).toBeDefined();
      const ws = await WsClient.connect(port, `/v1/rooms/${room}/chat?session_id=${sid}`);
      // The session is valid: a seed client told "unauthorized" throws it away.
      expect(await ws.next((m) => m.error)).toEqual({ error: { code: "too_many_requests", message: expect.stringMatching(/too many failed logins/) } });
      await ws.closed;
    });
  });

  it("a room socket's message that fails is answered unavailable, not too_many_requests; the socket goes on", async () => {
    const a = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [] } })).body.id;
    const ws = await WsClient.connect(srv.server.httpPort as number, `/v1/rooms/${room}/chat?session_id=${a.sid}`);
    const door = (srv.server.http as unknown as { d: { echat: object } }).d.echat;
    // The door's call of the native action throws (as a bug would): its pump answers.
    const undo = wrapCalls(door as { call: () => unknown }, "call", async (_s: unknown, action: string) => {
      if (action === "message") throw new Error("injected failure");
    });
    try {
      ws.send({ text: "fails" });
      expect(await ws.next((m) => m.error)).toEqual({ error: { code: "unavailable", message: expect.stringMatching(/could not complete the request/) } });
    } finally {
      undo();
    }
    ws.send({ text: "works" });
    expect(await ws.next((m) => m.text !== undefined)).toMatchObject({ text: "works", room_id: room });
    ws.close();
  });

  it("a room socket the server closes is told why with a code of its own, not invalid_json", async () => {
    await withOwnServer({ idleAuth: 1, rate: 1, burst: 1, rateDisconnect: 2 }, async (port, post) => {
      const sid = (await post("/v1/register", { login: uniqueName("i"), password: "pw" })).session_id;
      const room = (await post("/v1/rooms", { users: [] }, sid)).id;
      // One that does not answer the server's pings (a browser does): idle.
      const idle = await WsClient.connect(port, `/v1/rooms/${room}/chat?session_id=${sid}`, { autoPong: false });
      expect(await idle.next((m) => m.error, 5000)).toEqual({ error: { code: "closed", message: "idle timeout: nothing received for 1 s" } });
      await idle.closed;
      // Past the request rate: refused, then closed, each as too_many_requests.
      const fast = await WsClient.connect(port, `/v1/rooms/${room}/chat?session_id=${sid}`);
      for (let i = 0; i < 6; i++) fast.send({ text: `m${i}` });
      await fast.closed;
      const errors = fast.messages.filter((m: any) => m.error).map((m: any) => m.error.code);
      expect(errors.length).toBeGreaterThan(0);
      expect(new Set(errors)).toEqual(new Set(["too_many_requests"]));
    });
  });

  it("GET /v1/rooms/{id}/messages streams its answer: chunked, message by message, valid JSON; [] for an empty room", async () => {
    const a = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [] } })).body.id;
    const empty = await fetch(`${base()}/v1/rooms/${room}/messages`, { headers: { authorization: `Bearer ${a.sid}` } });
    expect(empty.status).toBe(200);
    expect(await empty.json()).toEqual([]);
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: a.login, pass: a.password })).status).toBe(0);
    // Bodies near --max-frame (8 KiB here): 500 such at the default limit were too much
    // to build whole (eight answers at once ran the server out of heap).
    const texts = Array.from({ length: 40 }, (_, i) => `${i} "quoted" ${"é".repeat(3000)}`);
    for (const body of texts) expect((await native.request("message", { channel: String(room), body })).status).toBe(0);
    const res = await fetch(`${base()}/v1/rooms/${room}/messages`, { headers: { authorization: `Bearer ${a.sid}` } });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("application/json; charset=utf-8");
    expect(res.headers.get("transfer-encoding")).toBe("chunked");
    expect(res.headers.get("content-length")).toBeNull();
    const got = (await res.json()) as { text: string; user_id: number; room_id: number }[];
    expect(got.map((m) => m.text)).toEqual(texts);
    expect(got.every((m) => m.user_id === a.id && m.room_id === room)).toBe(true);
    native.close();
  });

  it("a room socket without a valid session or for another's room is refused before the upgrade", async () => {
    const a = await register();
    const b = await register();
    const out = await register();
    const room = (await call("POST", "/v1/rooms", { sid: a.sid, body: { users: [{ id: b.id, login: b.login }] } })).body.id;
    const status = (path: string) =>
      new Promise<number>((resolve) => {
        const ws = new WebSocket(`ws://127.0.0.1:${srv.server.httpPort}${path}`);
        ws.on("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0));
        ws.on("open", () => resolve(101));
        ws.on("error", () => {});
      });
    expect(await status(`/v1/rooms/${room}/chat`)).toBe(401);
    expect(await status(`/v1/rooms/${room}/chat?session_id=${out.sid}`)).toBe(422);
    expect(await status(`/v1/rooms/${room}/chat?session_id=${a.sid}`)).toBe(101);
  });

  it("bad input: unknown routes, oversized bodies; the server stays up", async () => {
    const a = await register();
    expect(await call("GET", "/v1/nowhere", { sid: a.sid })).toMatchObject({ status: 404, body: { error: { code: "not_found" } } });
    const big = await call("POST", "/v1/login", { raw: JSON.stringify({ login: "x", password: "y".repeat(20000) }) });
    expect(big.status).toBe(413);
    expect(big.body).toEqual({ error: { code: "too_large" } });
    expect((await call("GET", "/v1/info", { sid: a.sid })).status).toBe(200);
  });
});

describe("e_chat_server door: a large public channel", () => {
  // Its own server: 1,000 accounts made as an operator makes them pass the password throttle.
  const big = serveForFile({ httpPort: 0, authRate: 1_000_000, authBurst: 1_000_000 });

  it("GET /v1/rooms/{id} of a channel with more than 1,000 members lists 1,000 of them", async () => {
    const http = async (method: string, path: string, body?: unknown, sid?: string) => {
      const headers: Record<string, string> = { "content-type": "application/json" };
      if (sid) headers.authorization = `Bearer ${sid}`;
      const res = await fetch(`http://127.0.0.1:${big.server.httpPort}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      return { status: res.status, body: (await res.json()) as any };
    };
    const login = uniqueName("big");
    const sid = (await http("POST", "/v1/register", { login, password: "pw" })).body.session_id;
    const n = await Client.connect(big.port);
    expect((await n.request("auth", { login, pass: "pw" })).status).toBe(0);
    const chid = (await n.request("createchannel", { name: uniqueName("big") })).chid;
    const { admin, services } = big.server;
    const ops = [];
    for (let i = 0; i < 1005; i++) {
      const u = await admin.addUser(uniqueName("m"), "pw", uniqueName("m"));
      ops.push(...services.channels.joinOps(chid, u.uid, 1));
    }
    await services.storage.commit(ops);
    const r = await http("GET", `/v1/rooms/${chid}`, undefined, sid);
    expect(r.status).toBe(200);
    expect(r.body.id).toBe(Number(chid));
    expect(r.body.users).toHaveLength(1000);
    n.close();
  }, 60_000);
});
