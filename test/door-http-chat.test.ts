// The HTTP/WS chat door (seed 003) over real HTTP (fetch) and real WebSockets (ws):
// every example of the seed document, the choices seed-doors.md makes for it, bad
// input, and native clients in the same lobby.

import net from "node:net";
import { ChatDoor } from "../src/doors/http-chat.js";
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, serveForFile, startTestServer, removeDir, uniqueName, WsClient } from "./helpers.js";
import { heldGate, sleep, wrapCalls } from "./pipeline-helpers.js";

const open = serveForFile({ httpPort: 0, maxFrame: 4096, badFrameLimit: 20 });

const ISO_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

function httpPort(): number {
  return open.server.httpPort as number;
}

async function call(method: string, path: string, body?: unknown, headers: Record<string, string> = { "content-type": "application/json" }) {
  const res = await fetch(`http://127.0.0.1:${httpPort()}${path}`, {
    method,
    headers: body === undefined ? {} : headers,
    body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, body: (await res.json()) as any };
}

const post = (path: string, body: unknown) => call("POST", path, body);

interface Person {
  username: string;
  email: string;
  password: string;
}

async function createUser(p: Partial<Person> = {}): Promise<Person> {
  const name = uniqueName("u");
  const person = { username: `${name} Doe`, email: `${name}@example.com`, password: "your_password", ...p };
  const r = await post("/create_user", person);
  expect(r).toEqual({ status: 200, body: { status: "success", message: "User created" } });
  return person;
}

/** A /ws socket logged in as `p`. */
async function chatter(p: Person): Promise<WsClient> {
  const ws = await WsClient.connect(httpPort(), "/ws");
  ws.send({ type: "auth", email: p.email, password: p.password });
  expect(await ws.next()).toEqual({ status: "authenticated", message: null, info: `Welcome, ${p.username}!` });
  return ws;
}

async function lobbyChid(c: Client): Promise<string> {
  const { channels } = await c.request("channellist", { limit: 500 });
  return channels.find((ch: { name: string }) => ch.name === "lobby").chid;
}

/** A native client in the lobby. */
async function nativeMember() {
  const a = await registerUser(open.port);
  const chid = await lobbyChid(a.client);
  expect((await a.client.request("enter", { channel: chid })).status).toBe(0);
  return { ...a, chid };
}

const chatOf = (content: string) => (m: any) => m.status === "message" && m.message?.content === content;

describe("HTTP/WS chat door: the HTTP routes", () => {
  it("GET /status answers success", async () => {
    expect(await call("GET", "/status")).toEqual({ status: 200, body: { status: "success", message: "wirechat is running" } });
  });

  it("create_user: 200; a taken email or username is 409; a missing, empty or mistyped field is 400", async () => {
    const p = await createUser();
    const again = await post("/create_user", { ...p, username: uniqueName("other") });
    expect(again).toEqual({ status: 409, body: { status: "error", message: "a user with that email already exists" } });
    // Emails are compared as the profile stores them: trimmed and lower-cased.
    expect((await post("/create_user", { ...p, email: ` ${p.email.toUpperCase()}`, username: uniqueName("other") })).status).toBe(409);
    const sameName = await post("/create_user", { ...p, email: `${uniqueName("x")}@example.com` });
    expect(sameName).toEqual({ status: 409, body: { status: "error", message: "a user with that username already exists" } });
    for (const bad of [
      { username: "x", password: "y" },
      { username: "", password: "y", email: "e@example.com" },
      { username: "x", password: "y", email: 5 },
      { username: "x", password: "y", email: "not-an-email" },
    ]) {
      const r = await post("/create_user", bad);
      expect(r.status).toBe(400);
      expect(r.body.status).toBe("error");
      expect(typeof r.body.message).toBe("string");
    }
  });

  it("login: 200 with the password, 401 with a wrong one or an unknown email", async () => {
    const p = await createUser();
    expect(await post("/login", { email: p.email, password: p.password })).toEqual({ status: 200, body: { status: "success", message: "Login successful" } });
    expect(await post("/login", { email: p.email.toUpperCase(), password: p.password })).toMatchObject({ status: 200 });
    const wrong = { status: 401, body: { status: "error", message: "Invalid email or password" } };
    expect(await post("/login", { email: p.email, password: "nope" })).toEqual(wrong);
    expect(await post("/login", { email: `${uniqueName("nobody")}@example.com`, password: p.password })).toEqual(wrong);
    expect((await post("/login", { email: p.email })).status).toBe(400);
  });

  it("an unknown email counts against the address's failed-login throttle, on /login and the socket alike", async () => {
    const server = await startTestServer({ httpPort: 0, authFailAddr: 3 });
    try {
      const at = (path: string, body: unknown) =>
        fetch(`http://127.0.0.1:${server.httpPort}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) }).then(
          async (r) => ({ status: r.status, body: (await r.json()) as any }),
        );
      const p = { username: `${uniqueName("t")} T`, email: `${uniqueName("t")}@example.com`, password: "pw" };
      expect((await at("/create_user", p)).status).toBe(200);
      for (let i = 0; i < 2; i++) expect((await at("/login", { email: `${uniqueName("nobody")}@example.com`, password: "pw" })).status).toBe(401);
      const ws = await WsClient.connect(server.httpPort as number, "/ws");
      ws.send({ type: "auth", email: `${uniqueName("nobody")}@example.com`, password: "pw" });
      expect((await ws.next()).info).toMatch(/Invalid email or password/);
      // Three failures from this address: even the right password waits now (it was
      // let in: unknown emails were not counted).
      expect(await at("/login", { email: p.email, password: p.password })).toMatchObject({ status: 429 });
      expect(await at("/login", { email: `${uniqueName("nobody")}@example.com`, password: "pw" })).toMatchObject({ status: 429 });
      ws.close();
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("change_password: 401 with a wrong old password; then the old one fails, the new one works, and sessions end on every door", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    // The account's login is its email: a native client logs in with it.
    const native = await login(open.port, p.email, p.password);
    expect(native.auth.status).toBe(0);
    const wrong = await post("/change_password", { email: p.email, old_password: "nope", new_password: "n" });
    expect(wrong).toEqual({ status: 401, body: { status: "error", message: "Invalid email or password" } });
    const ok = await post("/change_password", { email: p.email, old_password: p.password, new_password: "new_password" });
    expect(ok).toEqual({ status: 200, body: { status: "success", message: "Password changed" } });
    expect(await ws.next()).toEqual({ status: "error", message: null, info: "the password was changed" });
    expect((await ws.closed).code).toBe(1000);
    expect(await native.client.event("ev_logout")).toEqual({ reason: "the password was changed" });
    await native.client.closed;
    expect((await post("/login", { email: p.email, password: p.password })).status).toBe(401);
    expect((await post("/login", { email: p.email, password: "new_password" })).status).toBe(200);
    expect((await post("/change_password", { email: p.email, old_password: "new_password" })).status).toBe(400);
  });

  it("delete_user: 401 with a wrong password; then the account is gone on every door", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    expect((await post("/delete_user", { email: p.email, password: "nope" })).status).toBe(401);
    expect(await post("/delete_user", { email: p.email, password: p.password })).toEqual({ status: 200, body: { status: "success", message: "User deleted" } });
    expect((await ws.next()).status).toBe("error");
    await ws.closed;
    expect((await post("/login", { email: p.email, password: p.password })).status).toBe(401);
    expect((await login(open.port, p.email, p.password)).auth.status).toBe(7);
    expect((await post("/delete_user", { email: p.email, password: p.password })).status).toBe(401);
    // The email and username are free again.
    await createUser(p);
  });

  it("bad requests get the seed's shape: malformed JSON 400, too large 413, other media types 415, unknown routes 404, /ws without upgrade 426", async () => {
    const malformed = await post("/login", '{"email": "a@b.c", ');
    expect(malformed.status).toBe(400);
    expect(malformed.body).toMatchObject({ status: "error" });
    const big = await post("/login", { email: "a@example.com", password: "x".repeat(5000) });
    expect(big.status).toBe(413);
    expect(big.body).toMatchObject({ status: "error" });
    const form = await call("POST", "/login", "email=a", { "content-type": "application/x-www-form-urlencoded" });
    expect(form.status).toBe(415);
    expect(form.body.status).toBe("error");
    expect(await call("GET", "/nowhere")).toEqual({ status: 404, body: { status: "error", message: "no route GET /nowhere" } });
    expect((await call("GET", "/ws")).status).toBe(426);
    expect((await call("GET", "/status")).status).toBe(200);
  });
});

describe("HTTP/WS chat door: the WebSocket", () => {
  /**
   * A /ws login of `p` while `obj[name]` fails once (for the arguments `when` picks):
   * the door's "Authentication failed" with `info`, then the close.
   */
  async function loginFailingOnce(p: { email: string; password: string }, obj: object, name: string, when: (...args: any[]) => boolean, info: string): Promise<void> {
    let failOnce = true;
    const undo = wrapCalls(obj as Record<string, unknown>, name, async (...args: any[]) => {
      if (failOnce && when(...args)) {
        failOnce = false;
        throw new Error("the disk is on fire");
      }
    });
    try {
      const c = await WsClient.connect(httpPort(), "/ws");
      c.send({ type: "auth", email: p.email, password: p.password });
      expect(await c.next()).toEqual({ status: "error", message: null, info: `Authentication failed: ${info}` });
      expect((await c.closed).code).toBe(1000);
    } finally {
      undo();
    }
  }

  it("a login whose lobby membership cannot be read closes the socket and leaves no session stored", async () => {
    const p = await createUser();
    const uid = (await open.server.services.users.lookup("email", p.email.toLowerCase())) as string;
    const before = (await open.server.services.sessions.list(uid)).length;
    await loginFailingOnce(p, open.server.services.channels, "isMember", () => true, "the server could not read the lobby; try again");
    await sleep(100);
    expect((await open.server.services.sessions.list(uid)).length).toBe(before);
    // The next login works.
    (await chatter(p)).close();
  });

  it("a login whose email's account cannot be read is a failed login: the door's error, and the socket is closed", async () => {
    const p = await createUser();
    await loginFailingOnce(p, open.server.services.users, "lookup", (index: string) => index === "email", "the server could not check the login; try again");
    (await chatter(p)).close();
  });

  it("auth first: the welcome; a wrong password, an unknown email, another first message or bad JSON: the error and the socket is closed", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    ws.close();
    const failed = async (first: unknown, info: string) => {
      const c = await WsClient.connect(httpPort(), "/ws");
      c.send(first);
      expect(await c.next()).toEqual({ status: "error", message: null, info });
      expect((await c.closed).code).toBe(1000);
    };
    await failed({ type: "auth", email: p.email, password: "nope" }, "Authentication failed: Invalid email or password");
    await failed({ type: "auth", email: `${uniqueName("nobody")}@example.com`, password: "x" }, "Authentication failed: Invalid email or password");
    // A password native auth's schema refuses says nothing more of a known email.
    await failed({ type: "auth", email: p.email, password: "a".repeat(1025) }, "Authentication failed: Invalid email or password");
    await failed({ type: "auth", email: p.email, password: "\ud800" }, "Authentication failed: Invalid email or password");
    const invalid = { status: 401, body: { status: "error", message: "Invalid email or password" } };
    expect(await post("/delete_user", { email: p.email, password: "\ud800" })).toEqual(invalid);
    expect(await post("/change_password", { email: p.email, old_password: "\ud800", new_password: "x" })).toEqual(invalid);
    // Counted as failed logins of the account: its throttle (five) now holds it back.
    expect(await post("/login", { email: p.email, password: p.password })).toMatchObject({ status: 429 });
    await failed({ type: "chat", content: "Hello, world!" }, 'Authentication failed: the first message must be {"type":"auth","email":…,"password":…}');
    await failed({ type: "auth", email: p.email }, "Authentication failed: 'email' and 'password' are required");
    await failed("hello server", "Authentication failed: frame is not valid JSON");
  });

  it("chat: every lobby socket gets it (the sender too), in the seed's shape; a native lobby member gets ev_message", async () => {
    const alice = await createUser();
    const bob = await createUser();
    const a = await chatter(alice);
    const b = await chatter(bob);
    const native = await nativeMember();
    a.send({ type: "chat", content: "Hello, world!" });
    for (const ws of [a, b]) {
      const m = await ws.next(chatOf("Hello, world!"));
      expect(m).toEqual({
        status: "message",
        message: { user_email: alice.email, username: alice.username, content: "Hello, world!", timestamp: expect.stringMatching(ISO_MS) },
        info: null,
      });
    }
    const ev = await native.client.event("ev_message", (d) => d.body === "Hello, world!");
    expect(ev).toMatchObject({ chid: native.chid, nick: alice.username });
    const m = (await native.client.request("history", { channel: native.chid, limit: 1 })).messages[0];
    expect(m.body).toBe("Hello, world!");
    for (const x of [a, b, native.client]) x.close();
  });

  it("join and leave are notices to the other sockets only; a socket that left still gets the lobby's messages", async () => {
    const alice = await createUser();
    const bob = await createUser();
    const a = await chatter(alice);
    const b = await chatter(bob);
    const native = await nativeMember();
    a.send({ type: "join" });
    expect(await b.next()).toEqual({ status: "message", message: null, info: `${alice.username} joined` });
    a.send({ type: "leave" });
    expect(await b.next()).toEqual({ status: "message", message: null, info: `${alice.username} left` });
    b.send({ type: "chat", content: "still there?" });
    expect(await a.next(chatOf("still there?"))).toBeTruthy();
    expect(await a.quiet(200, (m) => m.message === null)).toBe(true);
    // Its own ev_enter aside, the native member got the chat message and nothing for the notices.
    expect(await native.client.quiet(200, (f) => f.action !== "ev_message" && f.action !== "ev_enter")).toBe(true);
    for (const x of [a, b, native.client]) x.close();
  });

  it("a socket repeating join, or joining and leaving in turn, is told to the others once a second at most, its latest state", async () => {
    const alice = await createUser();
    const bob = await createUser();
    const a = await chatter(alice);
    const b = await chatter(bob);
    for (let i = 0; i < 200; i++) a.send({ type: "join" });
    expect(await b.next()).toEqual({ status: "message", message: null, info: `${alice.username} joined` });
    // Within the second: leave, join, leave. Once it is over, the latest: left.
    for (const type of ["leave", "join", "leave"]) a.send({ type });
    expect(await b.next(() => true, 3000)).toEqual({ status: "message", message: null, info: `${alice.username} left` });
    expect(await b.quiet(1500)).toBe(true);
    for (const x of [a, b]) x.close();
  });

  it("the lobby this server made serves its events as any channel: the echo right after its reply, before the next", async () => {
    const native = await nativeMember();
    const before = native.client.lines.length;
    // One write: the message, then a ping. The echo comes between their replies (it
    // came after the ping: the lobby's members were read again for every event).
    native.client.write(
      JSON.stringify({ action: "message", data: { channel: native.chid, body: "ordered" } }) + "\n" + JSON.stringify({ action: "ping" }) + "\n",
    );
    await native.client.reply("ping");
    const actions = native.client.lines.slice(before).map((l) => JSON.parse(l).action);
    expect(actions).toEqual(["message", "ev_message", "ping"]);
    native.client.close();
  });

  it("a native member's message reaches the sockets, with the sender's profile email or \"\"", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    const native = await nativeMember();
    await native.client.request("message", { channel: native.chid, body: "from native" });
    expect((await ws.next(chatOf("from native"))).message).toMatchObject({ user_email: "", username: native.nick });
    expect((await native.client.request("setuserinfo", { email: `${native.login}@Native.example` })).status).toBe(0);
    await native.client.request("message", { channel: native.chid, body: "with email" });
    expect((await ws.next(chatOf("with email"))).message.user_email).toBe(`${native.login}@native.example`);
    ws.close();
    native.client.close();
  });

  it("an account made natively with a profile email logs in through /login and the socket; one made by create_user logs in natively", async () => {
    const native = await registerUser(open.port);
    const email = `${native.login}@example.org`;
    expect((await native.client.request("setuserinfo", { email })).status).toBe(0);
    expect((await post("/login", { email, password: "secret" })).status).toBe(200);
    const ws = await chatter({ username: native.nick, email, password: "secret" });
    const p = await createUser();
    const n = await login(open.port, p.email, p.password);
    expect(n.auth).toMatchObject({ status: 0, nick: p.username });
    const info = await n.client.request("userinfo", { user: n.auth.uid });
    expect(info.email).toBe(p.email);
    for (const x of [ws, native.client, n.client]) x.close();
  });

  it("a profile email may not be another account's login: that account keeps /login by its own", async () => {
    const victim = await registerUser(open.port, `${uniqueName("v")}@example.org`);
    const squatter = await registerUser(open.port);
    for (const email of [victim.login, victim.login.toUpperCase()]) {
      expect(await squatter.client.request("setuserinfo", { email })).toMatchObject({ status: 1, error: "that email belongs to another user" });
    }
    expect((await victim.client.request("setuserinfo", { email: victim.login })).status).toBe(0);
    expect((await post("/login", { email: victim.login, password: "secret" })).status).toBe(200);
    for (const x of [victim.client, squatter.client]) x.close();
  });

  it("a login may not be another account's profile email: that account keeps /login by its own", async () => {
    const owner = await registerUser(open.port);
    const email = `${uniqueName("o")}@example.org`;
    expect((await owner.client.request("setuserinfo", { email })).status).toBe(0);
    for (const login of [email, email.toUpperCase()]) {
      const c = await Client.connect(open.port);
      expect(await c.request("register", { login, pass: "other", nick: uniqueName("n") })).toMatchObject({ status: 1, error: "that login is already taken" });
      c.close();
    }
    expect((await post("/login", { email, password: "secret" })).status).toBe(200);
    // Freed with the email, it may be a login.
    expect((await owner.client.request("setuserinfo", { email: "" })).status).toBe(0);
    const taker = await registerUser(open.port, email);
    for (const x of [owner.client, taker.client]) x.close();
  });

  it("create_user with an email no login can be (an apostrophe, over 64 characters): 400 that says so, nothing made", async () => {
    for (const email of [`o'${uniqueName("n")}@example.com`, `${"x".repeat(60)}@example.com`]) {
      expect(await post("/create_user", { username: uniqueName("u"), email, password: "pw" })).toEqual({
        status: 400,
        body: { status: "error", message: "'email' must be at most 64 characters of letters, digits and _ . @ + - here (it is the account's login)" },
      });
    }
  });

  it("a body that is not UTF-8 is 400 in the door's shape, not decoded into another password", async () => {
    const p = await createUser();
    const bytes = (password: string) =>
      Buffer.concat([Buffer.from(`{"email":"${p.email}","password":"`), Buffer.from(password, "latin1"), Buffer.from('"}')]);
    const send = async (path: string, body: Buffer) => {
      const res = await fetch(`http://127.0.0.1:${httpPort()}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body });
      return { status: res.status, body: await res.json() };
    };
    expect(await send("/change_password", Buffer.concat([Buffer.from(`{"email":"${p.email}","old_password":"${p.password}","new_password":"`), Buffer.from([0xff, 0xfe]), Buffer.from('"}')]))).toEqual({
      status: 400,
      body: { status: "error", message: "the body is not valid UTF-8" },
    });
    expect((await send("/login", bytes("\xfe\xff"))).status).toBe(400);
    expect((await post("/login", { email: p.email, password: p.password })).status).toBe(200);
  });

  it("a first login enters the lobby without reading its members (enter's list is read only as it is written)", async () => {
    const members = await Promise.all([1, 2, 3].map(() => nativeMember()));
    const p = await createUser();
    const others = new Set(members.map((m) => m.uid));
    let read = 0;
    const undo = wrapCalls(open.server.services.users, "get", async (uid: string) => void (others.has(uid) && read++));
    try {
      (await chatter(p)).ws.close();
    } finally {
      undo();
    }
    expect(read).toBe(0);
    // A native enter still lists them all.
    const n = await Client.connect(open.port);
    expect((await n.request("auth", { login: p.email, pass: p.password })).status).toBe(0);
    const users = (await n.request("enter", { channel: members[0].chid })).users.map((u: { uid: string }) => u.uid);
    for (const m of members) expect(users).toContain(m.uid);
    for (const x of [n, ...members.map((m) => m.client)]) x.close();
  });

  it("lobby messages sent while a socket's login finishes come right after 'authenticated'", async () => {
    const p = await createUser();
    (await chatter(p)).ws.close(); // a member of the lobby from now on
    const m = await nativeMember();
    const { channels, users } = open.server.services;
    const uid = await users.lookup("email", p.email);
    const gate = heldGate();
    const undo = wrapCalls(channels, "isMember", async (chid: string, who: string) => {
      if (chid === m.chid && who === uid) await gate.pass();
    });
    try {
      await lobbyMessageDuringLogin(p, m, gate, "while you logged in"); // (gate: the membership being read)
    } finally {
      undo();
    }
    m.client.close();
  });

  it("an upgrade to a path that takes no WebSocket is refused before the upgrade, in the door's shape", async () => {
    // Upgraded, it was answered 101 and closed, and ws held what the client sent for 30 s.
    for (const [path, body] of [
      ["/status", { status: "error" }],
      ["/v1/info", { error: { code: "websocket_not_allowed" } }],
    ] as const) {
      const s = net.connect(httpPort(), "127.0.0.1");
      let text = "";
      s.on("data", (d) => (text += d));
      s.write(`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`);
      await waitUntil(() => text.includes("\r\n\r\n") && text.endsWith("}"));
      s.destroy();
      const res = { status: Number(text.split(" ")[1]), body: text.slice(text.indexOf("\r\n\r\n") + 4) };
      expect(res.status, path).toBe(400);
      expect(JSON.parse(res.body)).toMatchObject(body);
    }
    // The WebSocket paths still upgrade.
    const ws = await WsClient.connect(httpPort(), "/wirechat");
    expect((await ws.next()).action).toBe("welcome");
    ws.ws.close();
  });

  it("a WebSocket closed while too many are closing still gets its 1000 close frame", async () => {
    const ws = await WsClient.connect(httpPort(), "/wirechat");
    await ws.next((m) => m.action === "welcome");
    const peers = [...(open.server.http as NonNullable<typeof open.server.http>).websockets.connections.keys()];
    const peer = peers[peers.length - 1];
    // As the listener does past its bound of lingering connections: the linger is cut
    // as the close begins (it terminated the socket before the close frame was queued).
    const listenerEnding = peer.onEnding;
    peer.onEnding = (p) => {
      listenerEnding?.(p);
      p.cutLinger();
    };
    peer.end();
    expect((await ws.closed).code).toBe(1000);
  });

  it("an accept() failure on the HTTP port is logged, not the end of the process", async () => {
    const http = open.server.http as NonNullable<typeof open.server.http>;
    // As node reports EMFILE or ENOBUFS from accept(): an 'error' on the listening server.
    // Unheard, emit() throws it (the whole server ended).
    expect(() => http.app.server.emit("error", Object.assign(new Error("accept EMFILE"), { code: "EMFILE", syscall: "accept" }))).not.toThrow();
    expect((await call("GET", "/status")).status).toBe(200);
  });

  it("a lobby message sent as the login's answer goes out comes after 'authenticated', not before it", async () => {
    const p = await createUser();
    (await chatter(p)).ws.close(); // a member of the lobby from now on
    const m = await nativeMember();
    // The door's answer to the auth waits (as it can for a few microtasks) after the
    // login is done: a lobby message then went straight out, ahead of 'authenticated'.
    const proto = ChatDoor.prototype as unknown as { handle: (...args: any[]) => Promise<unknown> };
    const handle = proto.handle;
    const gate = heldGate();
    proto.handle = async function (this: unknown, ...args: any[]) {
      const out = await handle.apply(this, args);
      if (args[2]?.type === "auth") await gate.pass();
      return out;
    };
    try {
      await lobbyMessageDuringLogin(p, m, gate, "as you logged in");
    } finally {
      proto.handle = handle;
      gate.open();
    }
    m.client.close();
  });

  it("bad messages after auth get an error and the socket stays", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    const errors = [
      ["hello server", "frame is not valid JSON"],
      [[1, 2], "a message must be a JSON object"],
      [{ content: "no type" }, "a message must have a 'type' string"],
      [{ type: "dance" }, "unknown message type 'dance'"],
      [{ type: "chat", content: 5 }, "'content' must be a string"],
      [{ type: "chat" }, "'content' must be a string"],
      [{ type: "chat", content: "" }, "'body' is empty and there is no attachment"],
      [{ type: "auth", email: p.email, password: p.password }, "already authenticated"],
      [Buffer.from("binary"), "binary messages are not read: send each frame as one text message"],
    ] as const;
    for (const [m, info] of errors) {
      ws.send(m);
      expect(await ws.next()).toEqual({ status: "error", message: null, info });
    }
    ws.send({ type: "chat", content: "still fine" });
    expect(await ws.next(chatOf("still fine"))).toBeTruthy();
    ws.close();
  });

  it("an oversized message closes the socket with 1009; the server stays up", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    ws.send({ type: "chat", content: "x".repeat(5000) });
    expect((await ws.closed).code).toBe(1009);
    const again = await chatter(p);
    again.send({ type: "chat", content: "after" });
    expect(await again.next(chatOf("after"))).toBeTruthy();
    again.close();
  });

  it("a flood of bad messages closes the socket; the server stays up", async () => {
    const p = await createUser();
    const ws = await chatter(p);
    for (let i = 0; i < 100; i++) ws.send("{oops}");
    const { code } = await ws.closed;
    expect(code).toBe(1000);
    expect(ws.messages.length).toBeLessThan(100);
    expect((await call("GET", "/status")).status).toBe(200);
    (await chatter(p)).close();
  });
});

describe("HTTP door: off by default", () => {
  it("a server without --http-port has no HTTP listener", async () => {
    const server = await startTestServer();
    try {
      expect(server.httpPort).toBeUndefined();
      expect(server.http).toBeUndefined();
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });
});

/**
 * p logs in on /ws; once its login reaches `gate`, native member m says `body` in the
 * lobby; then the gate opens: 'authenticated' must come first, then the message.
 */
async function lobbyMessageDuringLogin(p: Person, m: { client: Client; chid: string }, gate: ReturnType<typeof heldGate>, body: string): Promise<void> {
  const ws = await WsClient.connect(httpPort(), "/ws");
  ws.send({ type: "auth", email: p.email, password: p.password });
  await gate.reached;
  expect((await m.client.request("message", { channel: m.chid, body })).status).toBe(0);
  await sleep(100);
  gate.open();
  expect(await ws.next()).toEqual({ status: "authenticated", message: null, info: `Welcome, ${p.username}!` });
  expect(await ws.next()).toMatchObject({ status: "message", message: expect.objectContaining({ content: body }) });
  ws.ws.close();
}

async function waitUntil(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not met in time");
    await sleep(10);
  }
}

describe("shutdown", () => {
  it("a request that comes while the server stops gets 503 in its door's shape, not Fastify's", async () => {
    const server = await startTestServer({ httpPort: 0 });
    const port = server.httpPort as number;
    // On each socket a first request's email lookup is held; the server starts stopping,
    // and a second request comes on the same kept-alive socket.
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    let reached = 0;
    const undo = wrapCalls(server.services.users, "lookup", async () => {
      reached++;
      await held;
    });
    const login = (email: string) => {
      const text = JSON.stringify({ email, password: "x" });
      return `POST /login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${text.length}\r\n\r\n${text}`;
    };
    const behind = [login("late@example.com"), "GET /v1/rooms HTTP/1.1\r\nhost: x\r\n\r\n", "GET /wirechat HTTP/1.1\r\nhost: x\r\n\r\n"];
    const sockets = behind.map((second) => {
      const sock = net.connect(port, "127.0.0.1");
      const out = { got: "", second, sock, ended: new Promise<void>((r) => sock.on("close", () => r())) };
      sock.on("data", (d) => (out.got += d.toString()));
      sock.on("error", () => {});
      sock.write(login("held@example.com"));
      return out;
    });
    await waitUntil(() => reached >= 3);
    const stopped = server.stop();
    await sleep(100);
    // Sent while the first is held and the server stops (pipelined ones would have been
    // taken in with the first).
    for (const s of sockets) s.sock.write(s.second);
    await sleep(200);
    undo();
    release();
    await Promise.all(sockets.map((s) => s.ended));
    await stopped;
    const answers = sockets.map((s) =>
      s.got
        .split(/HTTP\/1\.1 /)
        .slice(1)
        .map((r) => ({ status: Number(r.slice(0, 3)), body: JSON.parse(r.slice(r.indexOf("\r\n\r\n") + 4)) })),
    );
    const invalid = { status: 401, body: { status: "error", message: "Invalid email or password" } };
    expect(answers).toEqual([
      [invalid, { status: 503, body: { status: "error", message: "the server is shutting down" } }],
      [invalid, { status: 503, body: { error: { code: "unavailable", message: "the server is shutting down" } } }],
      [invalid, { status: 503, body: { action: "unknown", data: { status: 16, error: "the server is shutting down" } } }],
    ]);
    removeDir(server.services.config.dataDir);
  });
});
