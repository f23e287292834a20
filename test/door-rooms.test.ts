// The rooms API door (seed 001) over real TCP: every example of the seed document,
// the choices seed-doors.md makes for it, bad input, and native clients in its rooms.

import { describe, expect, it } from "vitest";
import { Client, registerUser, serveForFile, startTestServer, uniqueName, type Frame } from "./helpers.js";
import { sleep, wrapCalls } from "./pipeline-helpers.js";

const srv = serveForFile({ roomsPort: 0, maxFrame: 64 * 1024 });

async function rooms(): Promise<Client> {
  return Client.connect(srv.server.roomsPort as number, { welcome: false });
}

function send(c: Client, req: Record<string, unknown>): void {
  c.write(JSON.stringify(req) + "\n");
}

/** Sends a request and returns the next frame of `type` (default: the request's). */
async function ask(c: Client, req: Record<string, unknown>, type = String(req.type)): Promise<Frame> {
  send(c, req);
  return c.next((f) => f.type === type);
}

async function signup(login = uniqueName("r"), pass = "user_pass"): Promise<{ c: Client; login: string; pass: string }> {
  const c = await rooms();
  expect(await ask(c, { type: "REQUEST_SIGNUP", login, pass }, "RESPONSE_SIGNUP")).toEqual({ type: "RESPONSE_SIGNUP", status: "SINGUP_OK" });
  return { c, login, pass };
}

const DATE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/;

describe("rooms door: accounts", () => {
  it("REQUEST_SIGNUP: SINGUP_OK (logged in), SIGNUP_USER_EXIST, SINGUP_FAIL", async () => {
    const { c, login } = await signup();
    const d = await rooms();
    expect(await ask(d, { type: "REQUEST_SIGNUP", login, pass: "x" }, "RESPONSE_SIGNUP")).toEqual({ type: "RESPONSE_SIGNUP", status: "SIGNUP_USER_EXIST" });
    expect(await ask(d, { type: "REQUEST_SIGNUP", login: "", pass: "x" }, "RESPONSE_SIGNUP")).toMatchObject({ status: "SINGUP_FAIL" });
    expect(await ask(d, { type: "REQUEST_SIGNUP", login: "has space", pass: "x" }, "RESPONSE_SIGNUP")).toMatchObject({ status: "SINGUP_FAIL" });
    // Logged in: it can search at once.
    expect(await ask(c, { type: "SEARCH_USER", user: login })).toEqual({ type: "SEARCH_USER", user: [login] });
    c.close();
    d.close();
  });

  it("REQUEST_LOGIN: LOGIN_OK, LOGIN_WRONG_USER, LOGIN_WRONG_PASS; requests before it get ERROR", async () => {
    const { c, login, pass } = await signup();
    c.close();
    const d = await rooms();
    expect(await ask(d, { type: "SEARCH_USER", user: "x" })).toMatchObject({ type: "SEARCH_USER", status: "ERROR" });
    expect(await ask(d, { type: "REQUEST_LOGIN", login: uniqueName("nobody"), pass }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_WRONG_USER" });
    expect(await ask(d, { type: "REQUEST_LOGIN", login, pass: "wrong" }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_WRONG_PASS" });
    expect(await ask(d, { type: "REQUEST_LOGIN", login, pass }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_OK" });
    // Again on the same connection: the same account is LOGIN_OK (it was
    // LOGIN_WRONG_USER, "no such account"); another account is refused, saying why.
    expect(await ask(d, { type: "REQUEST_LOGIN", login, pass }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_OK" });
    const other = await signup();
    other.c.close();
    expect(await ask(d, { type: "REQUEST_LOGIN", login: other.login, pass: other.pass }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_WRONG_USER", error: expect.stringMatching(/another user|already/) });
    expect((await ask(d, { type: "SEARCH_USER", user: login.slice(0, 3) })).status).not.toBe("ERROR");
    d.close();
  });

  it("a server failure during a login or signup is an ERROR, not a wrong password", async () => {
    const { c, login, pass } = await signup();
    c.close();
    const d = await rooms();
    // The database failing under the login's and the signup's reads (native code 16).
    const undo = wrapCalls(srv.server.services.users, "lookup", async () => {
      throw new Error("the disk failed");
    });
    try {
      // In the response type the seed gives these requests (a client routes by it).
      expect(await ask(d, { type: "REQUEST_LOGIN", login, pass }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "ERROR", error: expect.any(String) });
      expect(await ask(d, { type: "REQUEST_SIGNUP", login: uniqueName("r"), pass }, "RESPONSE_SIGNUP")).toEqual({ type: "RESPONSE_SIGNUP", status: "ERROR", error: expect.any(String) });
    } finally {
      undo();
    }
    expect(await ask(d, { type: "REQUEST_LOGIN", login, pass }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_OK" });
    d.close();
  });

  it("a login no account can have (over 64 characters) is LOGIN_WRONG_USER, not a wrong password", async () => {
    const d = await rooms();
    expect(await ask(d, { type: "REQUEST_LOGIN", login: "l".repeat(65), pass: "x" }, "RESPONSE_LOGIN")).toEqual({ type: "RESPONSE_LOGIN", status: "LOGIN_WRONG_USER", error: expect.stringMatching(/64/) });
    d.close();
  });

  it("a login reads nothing of the user's inbox of direct messages, which this door does not show", async () => {
    const n = await registerUser(srv.port);
    n.client.close();
    await n.client.closed;
    const sender = await registerUser(srv.port);
    for (let i = 0; i < 3; i++) expect((await sender.client.request("message", { uid: n.uid, body: `dm ${i}` })).status).toBe(0);
    const reads: string[] = [];
    const undo = wrapCalls(srv.server.services.messages, "inboxAfter", async (uid: string) => void reads.push(uid));
    try {
      const c = await rooms();
      expect((await ask(c, { type: "REQUEST_LOGIN", login: n.login, pass: "secret" }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
      await sleep(200);
      expect(reads).toEqual([]);
      // A native login reads it (and gets them).
      const native = await Client.connect(srv.port);
      expect((await native.request("auth", { login: n.login, pass: "secret" })).status).toBe(0);
      expect((await native.event("ev_message", (d) => d.body === "dm 2")).from).toBe(sender.uid);
      expect(reads).toContain(n.uid);
      for (const x of [c, native, sender.client]) x.close();
    } finally {
      undo();
    }
  });

  it("SEARCH_USER: logins by prefix, at most 50", async () => {
    const prefix = uniqueName("srch");
    const made: Client[] = [];
    for (let i = 0; i < 3; i++) made.push((await signup(`${prefix}_${i}`)).c);
    const r = await ask(made[0], { type: "SEARCH_USER", user: prefix });
    expect(r.user.sort()).toEqual([`${prefix}_0`, `${prefix}_1`, `${prefix}_2`]);
    // A query longer than any login (64 characters) is refused as native searchuser's
    // is; the connection goes on. (Each used to be read and remembered whole.)
    for (const user of ["q".repeat(65), "q".repeat(60_000), "\u{1F600}".repeat(65)]) {
      expect(await ask(made[0], { type: "SEARCH_USER", user })).toEqual({ type: "SEARCH_USER", status: "ERROR", error: "'user' is at most 64 characters: no login is longer" });
    }
    expect(await ask(made[0], { type: "SEARCH_USER", user: `${prefix}_1`.padEnd(64, "z") })).toEqual({ type: "SEARCH_USER", user: [] });
    expect((await ask(made[0], { type: "SEARCH_USER", user: `${prefix}_1` })).user).toEqual([`${prefix}_1`]);
    for (const c of made) c.close();
  });
});

describe("rooms door: rooms and messages", () => {
  it("CREATE_ROOM makes a private room of two (the same one again), SND_MSG reaches both, READ_MSG ALL and RESENT", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    expect(room).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: b.login });
    expect((await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login })).id).toBe(room.id);
    expect((await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: uniqueName("ghost") })).status).toBe("ERROR");

    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "hello b", msg_type: "TEXT" });
    expect(sent).toEqual({ type: "SND_MSG", status: "OK", room_id: room.id, message_id: expect.any(Number), date: expect.stringMatching(DATE) });
    const got = await b.c.next((f) => f.type === "READ_MSG");
    expect(got).toEqual({
      type: "READ_MSG",
      status: "OK",
      room_id: room.id,
      message_id: sent.message_id,
      msg_type: "TEXT",
      message: "hello b",
      date: sent.date,
      sender: a.login,
    });

    // ALL: the room's history, one frame each, oldest first.
    await ask(b.c, { type: "SND_MSG", username: b.login, room_id: room.id, message: "hi a", msg_type: "TEXT" });
    send(a.c, { type: "READ_MSG", read: "ALL", room_id: room.id });
    const first = await a.c.next((f) => f.type === "READ_MSG" && f.message === "hello b");
    const second = await a.c.next((f) => f.type === "READ_MSG" && f.message === "hi a");
    expect(first.message_id).toBeLessThan(second.message_id);

    // RESENT: only what this user was not sent yet in this room through this door.
    const c = await rooms();
    expect((await ask(c, { type: "REQUEST_LOGIN", login: b.login, pass: b.pass }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "third", msg_type: "TEXT" });
    await b.c.next((f) => f.type === "READ_MSG" && f.message === "third");
    await c.next((f) => f.type === "READ_MSG" && f.message === "third");
    await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "fourth", msg_type: "TEXT" });
    await c.next((f) => f.type === "READ_MSG" && f.message === "fourth");
    send(c, { type: "READ_MSG", read: "RESENT", room_id: room.id });
    expect(await c.quiet(300, (f) => f.type === "READ_MSG")).toBe(true);
    send(c, { type: "READ_MSG", read: "ALL", room_id: room.id });
    const all: string[] = [];
    for (let i = 0; i < 4; i++) all.push((await c.next((f) => f.type === "READ_MSG")).message);
    expect(all).toEqual(["hello b", "hi a", "third", "fourth"]);
    for (const x of [a.c, b.c, c]) x.close();
  });

  it("READ_MSG RESENT right behind READ_MSG ALL, read slowly, sends nothing twice", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    b.c.close(); // nothing is sent to b live (which marks it sent)
    const text = "x".repeat(60_000);
    for (let i = 0; i < 250; i++) await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: `${i}:${text}`, msg_type: "TEXT" });
    const c = await rooms();
    expect((await ask(c, { type: "REQUEST_LOGIN", login: b.login, pass: b.pass }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    // Both in one write; the client reads nothing for a while. RESENT's mark was read
    // when it was handled, before ALL's frames had been written (and marked): it sent
    // them all again.
    c.socket.pause();
    c.write(JSON.stringify({ type: "READ_MSG", read: "ALL", room_id: room.id }) + "\n" + JSON.stringify({ type: "READ_MSG", read: "RESENT", room_id: room.id }) + "\n");
    await sleep(500);
    c.socket.resume();
    for (let i = 0; i < 250; i++) await c.next((f) => f.type === "READ_MSG");
    expect(await c.quiet(500, (f) => f.type === "READ_MSG")).toBe(true);
    for (const x of [a.c, b.c, c]) x.close();
  }, 60_000);

  it("CREATE_ROOM finds the customer by login or by the nick READ_MSG shows as its sender", async () => {
    const a = await signup();
    const login = uniqueName("n");
    const nick = `${login} Doe`;
    const native = await registerUser(srv.port, login, "secret", nick);
    const byNick = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: nick });
    expect(byNick).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: nick });
    expect((await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: login })).id).toBe(byNick.id);
    expect((await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: uniqueName("ghost") })).error).toMatch(/^no user with login or nick/);
    for (const x of [a.c, native.client]) x.close();
  });

  it("a room is private: an outsider cannot read it or post to it, and a native member sees it", async () => {
    const a = await signup();
    const b = await signup();
    const out = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const r1 = await ask(out.c, { type: "SND_MSG", username: out.login, room_id: room.id, message: "let me in", msg_type: "TEXT" });
    expect(r1).toMatchObject({ type: "SND_MSG", status: "ERROR", room_id: room.id });
    const r2 = await ask(out.c, { type: "READ_MSG", read: "ALL", room_id: room.id });
    expect(r2).toMatchObject({ status: "ERROR" });
    // b logged in natively: the room is a private channel it is a member of.
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: b.login, pass: b.pass })).status).toBe(0);
    const list = await native.request("channellist", { limit: 500 });
    expect(list.channels.some((ch: { chid: string }) => ch.chid === String(room.id))).toBe(true);
    await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "to both doors", msg_type: "TEXT" });
    expect(await native.event("ev_message", (d) => d.body === "to both doors")).toMatchObject({ chid: String(room.id), nick: a.login });
    expect((await native.request("message", { channel: String(room.id), body: "from native" })).status).toBe(0);
    expect(await a.c.next((f) => f.type === "READ_MSG" && f.message === "from native")).toMatchObject({ sender: b.login });
    for (const x of [a.c, b.c, out.c, native]) x.close();
  });

  it("EDIT_MSG and DELETE_MSG by the author reach every member (and native members); others get ERROR", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const native = await Client.connect(srv.port);
    await native.request("auth", { login: b.login, pass: b.pass });
    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "typo", msg_type: "TEXT" });
    expect((await ask(b.c, { type: "EDIT_MSG", id: sent.message_id, new_msg: "not mine" })).status).toBe("ERROR");
    send(a.c, { type: "EDIT_MSG", id: sent.message_id, new_msg: "fixed" });
    for (const c of [a.c, b.c]) expect(await c.next((f) => f.type === "EDIT_MSG")).toEqual({ type: "EDIT_MSG", id: sent.message_id, new_msg: "fixed" });
    expect(await native.event("ev_edit")).toMatchObject({ mid: String(sent.message_id), body: "fixed" });
    expect((await ask(b.c, { type: "DELETE_MSG", id: sent.message_id })).status).toBe("ERROR");
    send(a.c, { type: "DELETE_MSG", id: sent.message_id });
    for (const c of [a.c, b.c]) expect(await c.next((f) => f.type === "DELETE_MSG")).toEqual({ type: "DELETE_MSG", id: sent.message_id });
    expect(await native.event("ev_delmessage")).toEqual({ mid: String(sent.message_id) });
    for (const x of [a.c, b.c, native]) x.close();
  });

  it("two edits of one message in a row, each event later than its answer: the author gets each frame once", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "v0", msg_type: "TEXT" });
    // The room's members read from disk, slowly: each event comes after its answer, and
    // the first after the second edit has begun.
    const { channels } = srv.server.services;
    (channels as { cachedMembers: unknown }).cachedMembers = () => undefined;
    const undo = wrapCalls(channels, "members", () => sleep(150));
    try {
      send(a.c, { type: "EDIT_MSG", id: sent.message_id, new_msg: "v1" });
      expect(await a.c.next((f) => f.type === "EDIT_MSG")).toEqual({ type: "EDIT_MSG", id: sent.message_id, new_msg: "v1" });
      send(a.c, { type: "EDIT_MSG", id: sent.message_id, new_msg: "v2" });
      expect(await a.c.next((f) => f.type === "EDIT_MSG")).toEqual({ type: "EDIT_MSG", id: sent.message_id, new_msg: "v2" });
      for (const v of ["v1", "v2"]) expect(await b.c.next((f) => f.type === "EDIT_MSG")).toMatchObject({ new_msg: v });
      // Neither event is shown to the author as well (the second was, a flag per id).
      expect(await a.c.quiet(500, (f) => f.type === "EDIT_MSG")).toBe(true);
    } finally {
      undo();
      delete (channels as { cachedMembers?: unknown }).cachedMembers; // the prototype's again
    }
    for (const x of [a.c, b.c]) x.close();
  });

  it("a DELETE_MSG or EDIT_MSG racing a change of the same message from another connection: every change is shown once", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    // The author's other device, on the native door.
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: a.login, pass: a.pass })).status).toBe(0);
    const isChange = (type: string, id: number) => (f: Frame) => f.type === type && f.id === id && !("status" in f);
    for (let i = 0; i < 4; i++) {
      const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: `m${i}`, msg_type: "TEXT" });
      const id = sent.message_id as number;
      // Both at once, the native one first: the rooms request usually waits for the
      // message's lock while the other's change is written, and its event comes meanwhile.
      const edited = native.request("editmessage", { mid: String(id), body: `native ${i}` });
      send(a.c, { type: "EDIT_MSG", id, new_msg: `rooms ${i}` });
      expect((await edited).status).toBe(0);
      // Both edits were made: each is shown once, in the order they were made.
      const edits = [await a.c.next(isChange("EDIT_MSG", id)), await a.c.next(isChange("EDIT_MSG", id))];
      expect(edits.map((f) => f.new_msg).sort()).toEqual([`native ${i}`, `rooms ${i}`]);
      const onB = [await b.c.next(isChange("EDIT_MSG", id)), await b.c.next(isChange("EDIT_MSG", id))];
      expect(onB.map((f) => f.new_msg)).toEqual(edits.map((f) => f.new_msg));
      const deleted = native.request("delmessage", { mid: String(id) });
      send(a.c, { type: "DELETE_MSG", id });
      // One of the two deletes it (usually the native one, sent first); the other fails.
      const nativeWon = (await deleted).status === 0;
      expect(await a.c.next(isChange("DELETE_MSG", id))).toEqual({ type: "DELETE_MSG", id });
      if (nativeWon) expect(await a.c.next((f) => f.type === "DELETE_MSG" && f.status === "ERROR")).toMatchObject({ id });
      expect(await b.c.next(isChange("DELETE_MSG", id))).toEqual({ type: "DELETE_MSG", id });
    }
    // Nothing twice.
    expect(await a.c.quiet(300, (f) => (f.type === "DELETE_MSG" || f.type === "EDIT_MSG") && !("status" in f))).toBe(true);
    for (const x of [a.c, b.c, native]) x.close();
  });

  it("a DELETE_MSG sent twice, the first one's event late: one DELETE_MSG, then the second's ERROR", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "twice", msg_type: "TEXT" });
    const id = sent.message_id as number;
    // The room's members read slowly (the first delete's event comes after its answer,
    // while the second delete runs), and the message too (the second runs long enough).
    const { channels, messages } = srv.server.services;
    (channels as { cachedMembers: unknown }).cachedMembers = () => undefined;
    const undoMembers = wrapCalls(channels, "members", () => sleep(150));
    const undoGet = wrapCalls(messages, "get", () => sleep(300));
    try {
      send(a.c, { type: "DELETE_MSG", id });
      send(a.c, { type: "DELETE_MSG", id });
      expect(await a.c.next((f) => f.type === "DELETE_MSG" && !("status" in f))).toEqual({ type: "DELETE_MSG", id });
      expect(await a.c.next((f) => f.type === "DELETE_MSG" && f.status === "ERROR")).toMatchObject({ id });
      expect(await a.c.quiet(400, (f) => f.type === "DELETE_MSG")).toBe(true);
      expect(await b.c.next((f) => f.type === "DELETE_MSG")).toEqual({ type: "DELETE_MSG", id });
    } finally {
      undoGet();
      undoMembers();
      delete (channels as { cachedMembers?: unknown }).cachedMembers;
    }
    for (const x of [a.c, b.c]) x.close();
  });

  it("an EDIT_MSG and another device's edit of the message right after it: the caller sees each once and ends with the newer text", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const slow = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: a.login });
    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "v0", msg_type: "TEXT" });
    const id = sent.message_id as number;
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: a.login, pass: a.pass })).status).toBe(0);
    // The other room's members read slowly: a message there is still going out while
    // the rooms edit runs and the native one is made.
    const { channels } = srv.server.services;
    const cached = channels.cachedMembers.bind(channels);
    (channels as { cachedMembers: unknown }).cachedMembers = (chid: string) => (chid === String(slow.id) ? undefined : cached(chid));
    const undo = wrapCalls(channels, "members", (chid: string) => (chid === String(slow.id) ? sleep(300) : Promise.resolve()));
    try {
      send(a.c, { type: "SND_MSG", username: a.login, room_id: slow.id, message: "hold", msg_type: "TEXT" });
      send(a.c, { type: "EDIT_MSG", id, new_msg: "from rooms" });
      await sleep(100);
      expect((await native.request("editmessage", { mid: String(id), body: "from native" })).status).toBe(0);
      expect(await b.c.next((f) => f.type === "EDIT_MSG" && f.new_msg === "from native")).toBeDefined();
      await a.c.next((f) => f.type === "READ_MSG" && f.message === "hold");
      await sleep(300);
      const edits = a.c.lines.map((l) => JSON.parse(l) as Frame).filter((f) => f.type === "EDIT_MSG" && f.id === id);
      expect(edits.filter((f) => f.new_msg === "from rooms").length).toBeLessThanOrEqual(1);
      expect(edits.filter((f) => f.new_msg === "from native")).toHaveLength(1);
      expect(edits.at(-1)).toEqual({ type: "EDIT_MSG", id, new_msg: "from native" });
    } finally {
      undo();
      delete (channels as { cachedMembers?: unknown }).cachedMembers;
    }
    for (const x of [a.c, b.c, native]) x.close();
  });

  it("every refusal carries the request's room_id or id, so a client can match it to its request", async () => {
    const anon = await rooms();
    expect(await ask(anon, { type: "SND_MSG", room_id: 3, message: "x" })).toEqual({ type: "SND_MSG", status: "ERROR", room_id: 3, error: "log in first (REQUEST_LOGIN or REQUEST_SIGNUP)" });
    const a = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: a.login });
    expect(await ask(a.c, { type: "SND_MSG", room_id: room.id, message: 5 })).toEqual({ type: "SND_MSG", status: "ERROR", room_id: room.id, error: "'message' must be a string" });
    expect(await ask(a.c, { type: "READ_MSG", room_id: room.id, read: "SOME" })).toEqual({ type: "READ_MSG", status: "ERROR", room_id: room.id, error: "'read' must be ALL or RESENT" });
    expect(await ask(a.c, { type: "EDIT_MSG", id: 7, new_msg: 5 })).toEqual({ type: "EDIT_MSG", status: "ERROR", id: 7, error: "'new_msg' must be a string" });
    expect(await ask(a.c, { type: "SND_MSG", username: "someone else", room_id: room.id, message: "x" })).toMatchObject({ status: "ERROR", room_id: room.id });
    for (const x of [anon, a.c]) x.close();
  });

  it("a session ended elsewhere is said in the door's error shape before the connection closes", async () => {
    const b = await signup();
    const native = await Client.connect(srv.port);
    expect((await native.request("auth", { login: b.login, pass: b.pass })).status).toBe(0);
    expect((await native.request("changepassword", { pass: b.pass, newpass: "another_pass" })).status).toBe(0);
    await b.c.closed;
    expect(JSON.parse(b.c.lines.at(-1) as string)).toEqual({ type: "ERROR", status: "ERROR", error: "logged out: the password was changed; log in again (REQUEST_LOGIN)" });
    native.close();
  });

  it("a direct message's edit and deletion are not shown here, as the message is not", async () => {
    const b = await signup();
    const alice = await registerUser(srv.port);
    const bob = await Client.connect(srv.port);
    const bobUid = (await bob.request("auth", { login: b.login, pass: b.pass })).uid;
    const dm = await alice.client.request("message", { uid: bobUid, body: "private words" });
    expect(dm.status).toBe(0);
    expect((await alice.client.request("editmessage", { mid: dm.mid, body: "edited private words" })).status).toBe(0);
    expect(await bob.event("ev_edit")).toMatchObject({ mid: dm.mid, body: "edited private words" });
    expect((await alice.client.request("delmessage", { mid: dm.mid })).status).toBe(0);
    expect(await bob.event("ev_delmessage")).toEqual({ mid: dm.mid });
    expect(await b.c.quiet(300)).toBe(true);
    for (const x of [b.c, bob, alice.client]) x.close();
  });

  it("DELETE_ROOM by its owner: each member gets DELETE_ROOM; others get ERROR", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    expect((await ask(b.c, { type: "DELETE_ROOM", id: room.id })).status).toBe("ERROR");
    send(a.c, { type: "DELETE_ROOM", id: room.id });
    for (const c of [a.c, b.c]) expect(await c.next((f) => f.type === "DELETE_ROOM" && !("status" in f))).toEqual({ type: "DELETE_ROOM", id: room.id });
    expect((await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "gone?", msg_type: "TEXT" })).status).toBe("ERROR");
    a.c.close();
    b.c.close();
  });

  it("OLD_DIALOGS: the user's rooms, most recent first, with each one's first message id", async () => {
    const a = await signup();
    const b = await signup();
    const c = await signup();
    const ab = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const ac = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: c.login });
    const m1 = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: ab.id, message: "first ab", msg_type: "TEXT" });
    await ask(a.c, { type: "SND_MSG", username: a.login, room_id: ac.id, message: "first ac", msg_type: "TEXT" });
    const m2 = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: ab.id, message: "second ab", msg_type: "TEXT" });
    const r = await ask(a.c, { type: "OLD_DIALOGS", username: a.login });
    const i = r.id.indexOf(ab.id);
    const j = r.id.indexOf(ac.id);
    expect(i).toBeGreaterThanOrEqual(0);
    expect(j).toBeGreaterThan(i); // ab has the newer message
    expect(r.first_massage_id[i]).toBe(m1.message_id);
    expect(r.dialogs.length).toBe(r.id.length);
    expect(r.first_massage_id.length).toBe(r.id.length);
    // The first one deleted: the room's first is the next one (asked again, not remembered).
    send(a.c, { type: "DELETE_MSG", id: m1.message_id });
    await a.c.next((f) => f.type === "DELETE_MSG");
    const again = await ask(a.c, { type: "OLD_DIALOGS", username: a.login });
    expect(again.first_massage_id[again.id.indexOf(ab.id)]).toBe(m2.message_id);
    for (const x of [a.c, b.c, c.c]) x.close();
  });

  it("OLD_DIALOGS lists a room without messages (first_massage_id null), and direct messages do not push rooms out", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const before = await ask(a.c, { type: "OLD_DIALOGS", username: a.login });
    expect(before.id).toEqual([room.id]);
    expect(before.first_massage_id).toEqual([null]);
    // More native direct conversations than native dialogs' page of 100 (which the
    // door used to read): the room stays listed.
    const n = await Client.connect(srv.port);
    const me = (await n.request("auth", { login: a.login, pass: a.pass })).uid;
    for (let i = 0; i < 101; i++) {
      const u = await registerUser(srv.port);
      expect((await u.client.request("message", { uid: me, body: `dm ${i}` })).status).toBe(0);
      u.client.close();
    }
    const after = await ask(a.c, { type: "OLD_DIALOGS", username: a.login });
    expect(after.id).toEqual([room.id]);
    n.close();
    for (const x of [a.c, b.c]) x.close();
  });

  it("FILE and IMAGE messages are attachments: natively `attach`, back here as the same base64", async () => {
    const a = await signup();
    const b = await signup();
    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const png = Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), Buffer.alloc(600, 7)]).toString("base64");
    const file = Buffer.from("a file's bytes\n".repeat(40)).toString("base64");
    const native = await Client.connect(srv.port);
    await native.request("auth", { login: b.login, pass: b.pass });
    await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: png, msg_type: "IMAGE" });
    expect(await b.c.next((f) => f.type === "READ_MSG")).toMatchObject({ msg_type: "IMAGE", message: png });
    expect((await native.event("ev_message")).attach).toEqual({ mime: "image/png", data: png });
    await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: file, msg_type: "FILE" });
    expect(await b.c.next((f) => f.type === "READ_MSG")).toMatchObject({ msg_type: "FILE", message: file });
    expect((await native.event("ev_message")).attach).toEqual({ mime: "application/octet-stream", data: file });
    send(b.c, { type: "READ_MSG", read: "ALL", room_id: room.id });
    expect(await b.c.next((f) => f.type === "READ_MSG")).toMatchObject({ msg_type: "IMAGE", message: png });
    expect(await b.c.next((f) => f.type === "READ_MSG")).toMatchObject({ msg_type: "FILE", message: file });
    expect((await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "@@not base64@@", msg_type: "FILE" })).status).toBe("ERROR");
    // An empty message of any kind is refused in this door's words (not the native fields')
    for (const kind of ["TEXT", "FILE", "IMAGE"]) {
      const r = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "", msg_type: kind });
      expect(r).toEqual({ type: "SND_MSG", status: "ERROR", room_id: room.id, error: "'message' is empty" });
    }
    for (const x of [a.c, b.c, native]) x.close();
  });

  it("an account made natively logs in here; one made here logs in natively", async () => {
    const n = await registerUser(srv.port);
    const c = await rooms();
    expect((await ask(c, { type: "REQUEST_LOGIN", login: n.login, pass: "secret" }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    const mine = await signup();
    const d = await Client.connect(srv.port);
    expect((await d.request("auth", { login: mine.login, pass: mine.pass })).status).toBe(0);
    for (const x of [n.client, c, mine.c, d]) x.close();
  });
});

describe("rooms door: bad input", () => {
  it("malformed frames, unknown types, wrong fields: an ERROR frame each, the connection stays", async () => {
    const { c, login } = await signup();
    for (const raw of ["hello", '{"type":"SND_MSG", room_id: 1}', "[1]", '{"kind":"x"}']) {
      c.write(raw + "\n");
      expect(await c.next((f) => f.status === "ERROR")).toMatchObject({ type: "ERROR", status: "ERROR", error: expect.any(String) });
    }
    expect(await ask(c, { type: "FROBNICATE" })).toMatchObject({ status: "ERROR", error: "unknown type 'FROBNICATE'" });
    expect((await ask(c, { type: "SND_MSG", username: login, room_id: "one", message: "x" })).status).toBe("ERROR");
    expect((await ask(c, { type: "SND_MSG", username: login, room_id: 1, message: "x", msg_type: "VIDEO" })).status).toBe("ERROR");
    expect((await ask(c, { type: "READ_MSG", read: "SOME", room_id: 1 })).status).toBe("ERROR");
    expect((await ask(c, { type: "SEARCH_USER", username: "someone else", user: "x" })).status).toBe("ERROR");
    expect(await ask(c, { type: "SEARCH_USER", user: login })).toEqual({ type: "SEARCH_USER", user: [login] });
    c.close();
  });

  it("an oversized frame gets ERROR, and a flood of bad frames closes the connection", async () => {
    const { c, login } = await signup();
    c.write(JSON.stringify({ type: "SND_MSG", username: login, room_id: 1, message: "x".repeat(100_000), msg_type: "TEXT" }) + "\n");
    expect(await c.next((f) => f.status === "ERROR")).toMatchObject({ error: expect.stringMatching(/large|limit|bytes/i) });
    expect(await ask(c, { type: "SEARCH_USER", user: login })).toEqual({ type: "SEARCH_USER", user: [login] });
    const d = await rooms();
    d.write("nope\n".repeat(500));
    await d.closed;
    c.close();
  });
});

describe("rooms door: one user's unread answers", () => {
  it("do not hold another user's CREATE_ROOM with them, nor the frames behind it", async () => {
    const server = await startTestServer({ roomsPort: 0 });
    const port = server.roomsPort as number;
    try {
      // The attacker fills its room with ~8 MB of attachments, then asks for all of it
      // and for a room with the victim, and reads nothing.
      const attacker = await Client.connect(port, { welcome: false });
      const login = uniqueName("att");
      expect(await ask(attacker, { type: "REQUEST_SIGNUP", login, pass: "p" }, "RESPONSE_SIGNUP")).toMatchObject({ status: "SINGUP_OK" });
      const room = (await ask(attacker, { type: "CREATE_ROOM", customer: login })).id;
      const file = Buffer.alloc(700_000, 1).toString("base64");
      for (let i = 0; i < 12; i++) await ask(attacker, { type: "SND_MSG", room_id: room, message: file, msg_type: "FILE" });
      const victim = { c: await Client.connect(port, { welcome: false }), login: uniqueName("vic") };
      expect(await ask(victim.c, { type: "REQUEST_SIGNUP", login: victim.login, pass: "p" }, "RESPONSE_SIGNUP")).toMatchObject({ status: "SINGUP_OK" });
      attacker.socket.pause();
      attacker.socket.removeAllListeners("data");
      attacker.write(JSON.stringify({ type: "READ_MSG", read: "ALL", room_id: room }) + "\n" + JSON.stringify({ type: "CREATE_ROOM", customer: victim.login }) + "\n");
      await sleep(500);
      // Before, both waited until the attacker read or left.
      const made = await ask(victim.c, { type: "CREATE_ROOM", customer: login });
      expect(made).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: login });
      expect(await ask(victim.c, { type: "SEARCH_USER", user: login })).toEqual({ type: "SEARCH_USER", user: [login] });
      victim.c.close();
      attacker.close();
    } finally {
      await server.stop();
    }
  }, 30_000);
});

