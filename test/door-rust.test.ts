// The rust_messages door (seed 000) over real TCP: every example of the seed document,
// the choices seed-doors.md makes for it, bad input, and native clients in the same
// rooms.

import { describe, expect, it } from "vitest";
import { Client, registerUser, removeDir, serveForFile, startTestServer, tempDir, uniqueName, type Frame } from "./helpers.js";
import { useChildServers, wrapCalls } from "./pipeline-helpers.js";
import type { BatchOp } from "../src/storage/db.js";

const open = serveForFile({ rustPort: 0, maxFrame: 4096 });
const secret = serveForFile({ rustPort: 0, rustSecret: "handshake_secret" });

async function rust(port: number): Promise<Client> {
  return Client.connect(port, { welcome: false });
}

/** Sends one 000 request and returns the next frame with the same action. */
async function ask(c: Client, req: Record<string, unknown>): Promise<Frame> {
  c.write(JSON.stringify(req) + "\n");
  return c.next((f) => f.action === req.action && "code" in f);
}

async function rustUser(port: number, login = uniqueName("r"), password = "0cc175b9c0f1b6a831c399e269772661"): Promise<{ c: Client; login: string; password: string }> {
  const c = await rust(port);
  expect(await ask(c, { action: "registration", login, password })).toEqual({ action: "registration", code: 200, message: "OK" });
  return { c, login, password };
}

describe("rust_messages door: accounts", () => {
  it("has no welcome frame, and answers requests before login with 400", async () => {
    const c = await rust(open.server.rustPort as number);
    expect(await c.quiet(150)).toBe(true);
    const r = await ask(c, { action: "send_message", text: "hi", timestamp: 1 });
    expect(r).toMatchObject({ action: "send_message", code: 400 });
    expect(r.message).toMatch(/log in/);
    expect(await ask(c, { action: "get_messages", number_of_messages: 1 })).toMatchObject({ code: 400 });
    c.close();
  });

  it("registration logs the connection in; a taken login or an empty field is 400", async () => {
    const port = open.server.rustPort as number;
    const { c, login } = await rustUser(port);
    expect(await ask(c, { action: "send_message", text: "first", timestamp: 1700000000 })).toEqual({ action: "send_message", code: 200, message: "OK" });
    const d = await rust(port);
    const taken = await ask(d, { action: "registration", login, password: "x" });
    expect(taken.code).toBe(400);
    expect(taken.message).toMatch(/taken/);
    expect((await ask(d, { action: "registration", login: "", password: "x" })).code).toBe(400);
    expect((await ask(d, { action: "registration", login: uniqueName("r") })).code).toBe(400);
    c.close();
    d.close();
  });

  it("a login that cannot enter its room (the user at --max-joined-channels) is 400 and not logged in", async () => {
    const config = open.server.services.config as { maxJoinedChannels: number };
    const cap = config.maxJoinedChannels;
    const n = await registerUser(open.port, undefined, "pw");
    expect((await n.client.request("createchannel", { name: uniqueName("full") })).status).toBe(0);
    config.maxJoinedChannels = 1;
    try {
      const c = await rust(open.server.rustPort as number);
      const r = await ask(c, { action: "authentication", login: n.login, password: "pw" });
      expect(r).toMatchObject({ action: "authentication", code: 400, message: expect.stringMatching(/could not enter the room .*not logged in/) });
      // Not logged in, rather than in no room: requests say so, and a login can be tried again.
      expect((await ask(c, { action: "send_message", text: "hi", timestamp: 1 })).message).toMatch(/log in/);
      config.maxJoinedChannels = cap;
      expect(await ask(c, { action: "authentication", login: n.login, password: "pw" })).toEqual({ action: "authentication", code: 200, message: "OK" });
      c.close();
    } finally {
      config.maxJoinedChannels = cap;
    }
    n.client.close();
  });

  it("authentication: 200 with the password, 400 without; logout keeps the connection", async () => {
    const port = open.server.rustPort as number;
    const { c, login, password } = await rustUser(port);
    c.close();
    const d = await rust(port);
    const wrong = await ask(d, { action: "authentication", login, password: "nope" });
    expect(wrong).toMatchObject({ action: "authentication", code: 400 });
    expect((await ask(d, { action: "authentication", login: uniqueName("nobody"), password })).code).toBe(400);
    expect(await ask(d, { action: "authentication", login, password })).toEqual({ action: "authentication", code: 200, message: "OK" });
    expect(await ask(d, { action: "logout" })).toEqual({ action: "logout", code: 200, message: "OK" });
    expect((await ask(d, { action: "send_message", text: "x", timestamp: 1 })).code).toBe(400);
    expect((await ask(d, { action: "authentication", login, password })).code).toBe(200);
    d.close();
  });

  it("close_connection closes without a reply", async () => {
    const c = await rust(open.server.rustPort as number);
    c.write('{"action": "close_connection"}\n');
    await c.closed;
    expect(c.lines).toEqual([]);
  });

  it("change_password: 200, the old password stops working and other sessions end", async () => {
    const port = open.server.rustPort as number;
    const { c, login, password } = await rustUser(port);
    const other = await rust(port);
    expect((await ask(other, { action: "authentication", login, password })).code).toBe(200);
    expect((await ask(c, { action: "change_password", login: "someone-else", new_password: "n" })).code).toBe(400);
    expect(await ask(c, { action: "change_password", login, new_password: "new_client_password_hash" })).toEqual({
      action: "change_password",
      code: 200,
      message: "OK",
    });
    // The other connection hears that its session ended, and is closed (as natively).
    const ended = await other.next((f) => f.action === "logout");
    expect(ended).toMatchObject({ code: 300, message: "the password was changed" });
    await other.closed;
    // The connection that changed it stays logged in.
    expect((await ask(c, { action: "send_message", text: "still here", timestamp: 1 })).code).toBe(200);
    const d = await rust(port);
    expect((await ask(d, { action: "authentication", login, password })).code).toBe(400);
    expect((await ask(d, { action: "authentication", login, password: "new_client_password_hash" })).code).toBe(200);
    for (const x of [c, other, d]) x.close();
  });

  it("delete_account: 400 on a wrong password, 200 then the login is gone", async () => {
    const port = open.server.rustPort as number;
    const { c, login, password } = await rustUser(port);
    expect((await ask(c, { action: "delete_account", login, password: "wrong" })).code).toBe(400);
    expect(await ask(c, { action: "delete_account", login, password })).toEqual({ action: "delete_account", code: 200, message: "OK" });
    const d = await rust(port);
    expect((await ask(d, { action: "authentication", login, password })).code).toBe(400);
    c.close();
    d.close();
  });

  it("with --rust-secret the handshake comes first: a wrong secret or another request is 400 and closed", async () => {
    const port = secret.server.rustPort as number;
    const a = await rust(port);
    expect(await ask(a, { action: "handshake", secret: "handshake_secret" })).toEqual({ action: "handshake", code: 200, message: "OK" });
    expect((await ask(a, { action: "registration", login: uniqueName("h"), password: "p" })).code).toBe(200);
    const b = await rust(port);
    expect((await ask(b, { action: "handshake", secret: "guess" })).code).toBe(400);
    await b.closed;
    const c = await rust(port);
    expect((await ask(c, { action: "authentication", login: "x", password: "y" })).code).toBe(400);
    await c.closed;
    // Without a secret configured, any handshake passes and none is needed.
    const d = await rust(open.server.rustPort as number);
    expect((await ask(d, { action: "handshake", secret: "anything" })).code).toBe(200);
    a.close();
    d.close();
  });
});

describe("rust_messages door: rooms and messages", () => {
  it("send_message reaches every 000 connection in the room and native members; get_messages returns the last N oldest first", async () => {
    const port = open.server.rustPort as number;
    const room = uniqueName("room");
    const a = await rustUser(port);
    const b = await rustUser(port);
    expect(await ask(a.c, { action: "create_room", name: room })).toEqual({ action: "create_room", code: 200, message: "OK" });
    for (const u of [a, b]) expect((await ask(u.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    // A native client in the same room (a public channel of that name).
    const native = await registerUser(open.port);
    const list = await native.client.request("channellist", { limit: 500 });
    const chid = list.channels.find((ch: { name: string }) => ch.name === room).chid;
    expect((await native.client.request("enter", { channel: chid })).status).toBe(0);

    for (let i = 1; i <= 3; i++) expect((await ask(a.c, { action: "send_message", text: `m${i}`, timestamp: 1 })).code).toBe(200);
    for (let i = 1; i <= 3; i++) {
      const got = await b.c.next((f) => f.action === "get_message" && f.text === `m${i}`);
      expect(got).toEqual({ action: "get_message", author: a.login, text: `m${i}`, timestamp: expect.any(Number) });
      // The server's clock, not the client's timestamp.
      expect(Math.abs(got.timestamp - Date.now() / 1000)).toBeLessThan(60);
      const ev = await native.client.event("ev_message", (d) => d.body === `m${i}`);
      expect(ev).toMatchObject({ chid, nick: a.login });
    }
    // The native client's message reaches the 000 clients too.
    expect((await native.client.request("message", { channel: chid, body: "from native" })).status).toBe(0);
    expect(await b.c.next((f) => f.action === "get_message" && f.text === "from native")).toMatchObject({ author: native.nick });

    b.c.write(JSON.stringify({ action: "get_messages", number_of_messages: 2 }) + "\n");
    const two = await b.c.next((f) => f.action === "get_messages");
    expect(two.messages.map((m: { text: string }) => m.text)).toEqual(["m3", "from native"]);
    b.c.write(JSON.stringify({ action: "get_messages", number_of_messages: 100 }) + "\n");
    const all = await b.c.next((f) => f.action === "get_messages");
    expect(all.messages.map((m: { text: string }) => m.text)).toEqual(["m1", "m2", "m3", "from native"]);
    expect(all.messages[0]).toEqual({ author: a.login, text: "m1", timestamp: expect.any(Number) });
    for (const x of [a.c, b.c, native.client]) x.close();
  });

  it("a message with an attachment, from another door, shows its text and the attachment's type", async () => {
    const port = open.server.rustPort as number;
    const room = uniqueName("room");
    const a = await rustUser(port);
    expect((await ask(a.c, { action: "create_room", name: room })).code).toBe(200);
    expect((await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    const native = await registerUser(open.port);
    const chid = (await native.client.request("channellist", { limit: 500 })).channels.find((ch: { name: string }) => ch.name === room).chid;
    expect((await native.client.request("enter", { channel: chid })).status).toBe(0);
    const png = Buffer.from("89504e470d0a1a0a0000", "hex").toString("base64");
    expect((await native.client.request("message", { channel: chid, body: "", attach: { mime: "image/png", data: png } })).status).toBe(0);
    expect((await native.client.request("message", { channel: chid, body: "see this", attach: { mime: "text/plain", data: "aGk=" } })).status).toBe(0);
    expect((await a.c.next((f) => f.action === "get_message")).text).toBe("[attachment image/png]");
    expect((await a.c.next((f) => f.action === "get_message")).text).toBe("see this [attachment text/plain]");
    a.c.write(JSON.stringify({ action: "get_messages", number_of_messages: 2 }) + "\n");
    const got = await a.c.next((f) => f.action === "get_messages");
    expect(got.messages.map((m: { text: string }) => m.text)).toEqual(["[attachment image/png]", "see this [attachment text/plain]"]);
    for (const x of [a.c, native.client]) x.close();
  });

  it("one room at a time: change_room leaves the old room; 400 for a room that does not exist", async () => {
    const port = open.server.rustPort as number;
    const r1 = uniqueName("room");
    const r2 = uniqueName("room");
    const a = await rustUser(port);
    const b = await rustUser(port);
    for (const r of [r1, r2]) expect((await ask(a.c, { action: "create_room", name: r })).code).toBe(200);
    expect((await ask(a.c, { action: "create_room", name: r1 })).code).toBe(400);
    // Making a room is not entering it: a is still in general alone.
    const { users, channels } = open.server.services;
    const aUid = (await users.lookup("login", a.login)) as string;
    const names = async () => Promise.all((await channels.channelsOf(aUid)).map(async (chid) => (await channels.get(chid))?.name));
    expect(await names()).toEqual(["general"]);
    const missing = await ask(b.c, { action: "change_room", old_room_name: "general", new_room_name: uniqueName("nowhere") });
    expect(missing.code).toBe(400);
    expect((await ask(b.c, { action: "change_room", old_room_name: "general", new_room_name: r1 })).code).toBe(200);
    expect((await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: r1 })).code).toBe(200);
    expect((await ask(b.c, { action: "change_room", old_room_name: r1, new_room_name: r2 })).code).toBe(200);
    // b is no longer in r1: a's message there does not reach it.
    expect((await ask(a.c, { action: "send_message", text: "only r1", timestamp: 1 })).code).toBe(200);
    expect(await b.c.quiet(300, (f) => f.action === "get_message")).toBe(true);
    // An old_room_name the connection is not in: its current room (r2) is left all the same.
    expect((await ask(b.c, { action: "change_room", old_room_name: uniqueName("nosuch"), new_room_name: r1 })).code).toBe(200);
    const sv = open.server.services;
    expect(await sv.channels.channelsOf((await sv.users.lookup("login", b.login)) as string)).toEqual([await sv.channels.byName(r1)]);
    a.c.close();
    b.c.close();
  });

  it("change_room whose leave of the old room fails answers 400 and says so; sent again, it completes", async () => {
    const port = open.server.rustPort as number;
    const room = uniqueName("room");
    const a = await rustUser(port);
    expect((await ask(a.c, { action: "create_room", name: room })).code).toBe(200);
    const sv = open.server.services;
    const uid = (await sv.users.lookup("login", a.login)) as string;
    const undo = wrapCalls(sv.storage, "commit", async (ops: BatchOp[]) => {
      if (ops.some((o) => o.type === "del" && o.key.startsWith(sv.storage.spaces.members.prefix))) throw new Error("the disk failed");
    });
    let moved;
    try {
      moved = await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: room });
    } finally {
      undo();
    }
    expect(moved.code).toBe(400);
    expect(moved.message).toMatch(/still a member/);
    expect((await sv.channels.channelsOf(uid)).length).toBe(2);
    expect((await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    expect(await sv.channels.channelsOf(uid)).toEqual([await sv.channels.byName(room)]);
    a.c.close();
  });

  it("a user is in one room at a time: change_room moves its other connections (told with 300); a later login starts in the default room and leaves that one", async () => {
    const port = open.server.rustPort as number;
    const room = uniqueName("room");
    const a = await rustUser(port);
    const a2 = await rust(port);
    expect((await ask(a2, { action: "authentication", login: a.login, password: a.password })).code).toBe(200);
    const b = await rustUser(port);
    expect((await ask(b.c, { action: "create_room", name: room })).code).toBe(200);
    expect((await ask(b.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    expect((await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    // a2 was left in general, whose membership just ended: it is told and moves too.
    expect(await a2.next((f) => f.action === "change_room")).toEqual({ action: "change_room", code: 300, message: `moved to room '${room}' by another connection` });
    expect(await a.c.quiet(200, (f) => f.action === "change_room")).toBe(true);
    expect((await ask(a2, { action: "send_message", text: "from a2", timestamp: 1 })).code).toBe(200);
    expect(await b.c.next((f) => f.action === "get_message")).toMatchObject({ author: a.login, text: "from a2" });
    // Both gone, a later login starts in general and leaves that room (its membership
    // was kept for ever, one more each session).
    a.c.close();
    a2.close();
    await Promise.all([a.c.closed, a2.closed]);
    const a3 = await rust(port);
    expect((await ask(a3, { action: "authentication", login: a.login, password: a.password })).code).toBe(200);
    const sv = open.server.services;
    const uid = (await sv.users.lookup("login", a.login)) as string;
    expect(await sv.channels.channelsOf(uid)).toEqual([await sv.channels.byName("general")]);
    expect((await ask(b.c, { action: "send_message", text: "still here?", timestamp: 2 })).code).toBe(200);
    expect(await a3.quiet(300, (f) => f.action === "get_message")).toBe(true);
    // A second connection while one is open starts in general too; the first stays put.
    expect((await ask(a3, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    const a4 = await rust(port);
    expect((await ask(a4, { action: "authentication", login: a.login, password: a.password })).code).toBe(200);
    expect((await ask(b.c, { action: "send_message", text: "a3 only", timestamp: 3 })).code).toBe(200);
    expect(await a3.next((f) => f.action === "get_message")).toMatchObject({ text: "a3 only" });
    expect(await a4.quiet(300, (f) => f.action === "get_message")).toBe(true);
    // a4 moves from general: a3's room is left too (a3 moves with it), one room in all.
    const other = uniqueName("room");
    expect((await ask(b.c, { action: "create_room", name: other })).code).toBe(200);
    expect((await ask(a4, { action: "change_room", old_room_name: "general", new_room_name: other })).code).toBe(200);
    expect(await a3.next((f) => f.action === "change_room")).toMatchObject({ code: 300 });
    expect(await sv.channels.channelsOf(uid)).toEqual([await sv.channels.byName(other)]);
    for (const x of [a3, a4, b.c]) x.close();
  });

  it("a login that waited behind another connection's change_room is not told it moved: it starts in the default room", async () => {
    const port = open.server.rustPort as number;
    const room = uniqueName("room");
    const a = await rustUser(port);
    expect((await ask(a.c, { action: "create_room", name: room })).code).toBe(200);
    const door = open.server.listeners.find((l) => (l.front as { name?: string }).name === "rust")!.front as unknown as {
      call: (...args: unknown[]) => Promise<unknown>;
      moves: { run: (...args: unknown[]) => Promise<unknown> };
    };
    // a's change_room is held at its leave of general, inside the user's move lock.
    let atLeave!: () => void;
    const reachedLeave = new Promise<void>((r) => (atLeave = r));
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let armed = true;
    const undoCall = wrapCalls(door, "call", async (_s: unknown, action: unknown) => {
      if (action !== "leave" || !armed) return;
      armed = false;
      atLeave();
      await released;
    });
    let queued!: () => void;
    const loginQueued = new Promise<void>((r) => (queued = r));
    let runs = 0;
    const undoRun = wrapCalls(door.moves, "run", async () => {
      if (++runs === 2) queued(); // the first is a's change_room
    });
    try {
      a.c.write(JSON.stringify({ action: "change_room", old_room_name: "general", new_room_name: room }) + "\n");
      await reachedLeave;
      const a2 = await rust(port);
      a2.write(JSON.stringify({ action: "authentication", login: a.login, password: a.password }) + "\n");
      await loginQueued; // logged in, waiting for the lock
      release();
      expect(await a.c.next((f) => f.action === "change_room")).toMatchObject({ code: 200 });
      expect(await a2.next((f) => f.action === "authentication")).toMatchObject({ code: 200 });
      expect(await a2.quiet(300, (f) => f.action === "change_room")).toBe(true);
      // Where it was put: general's messages reach it, the room's do not.
      const b = await rustUser(port);
      expect((await ask(b.c, { action: "send_message", text: "in general", timestamp: 1 })).code).toBe(200);
      expect(await a2.next((f) => f.action === "get_message")).toMatchObject({ text: "in general" });
      a2.close();
      b.c.close();
    } finally {
      undoCall();
      undoRun();
      release();
      a.c.close();
    }
  });

  it("change_room leaves the room a connection that logged in next to an open one is in", async () => {
    const port = open.server.rustPort as number;
    const [x, y] = [uniqueName("room"), uniqueName("room")];
    const a = await rustUser(port);
    for (const r of [x, y]) expect((await ask(a.c, { action: "create_room", name: r })).code).toBe(200);
    expect((await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: x })).code).toBe(200);
    // A second connection while the first is open: it starts in general (x stays).
    const a2 = await rust(port);
    expect((await ask(a2, { action: "authentication", login: a.login, password: a.password })).code).toBe(200);
    // The first moves on: both connections are in y, and the user in y alone (general
    // was left as a member for good).
    expect((await ask(a.c, { action: "change_room", old_room_name: x, new_room_name: y })).code).toBe(200);
    expect(await a2.next((f) => f.action === "change_room")).toMatchObject({ code: 300 });
    const sv = open.server.services;
    const uid = (await sv.users.lookup("login", a.login)) as string;
    expect(await sv.channels.channelsOf(uid)).toEqual([await sv.channels.byName(y)]);
    a.c.close();
    a2.close();
  });

  it("delete_room: the owner only; members are told, native members get ev_channel_deleted", async () => {
    const port = open.server.rustPort as number;
    const room = uniqueName("room");
    const owner = await rustUser(port);
    const member = await rustUser(port);
    expect((await ask(owner.c, { action: "create_room", name: room })).code).toBe(200);
    expect((await ask(member.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    expect((await ask(owner.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    const native = await registerUser(open.port);
    const chid = (await native.client.request("channellist", { limit: 500 })).channels.find((ch: { name: string }) => ch.name === room).chid;
    await native.client.request("enter", { channel: chid });
    expect((await ask(member.c, { action: "delete_room", name: room })).code).toBe(400);
    expect((await ask(owner.c, { action: "delete_room", name: uniqueName("none") })).code).toBe(400);
    expect(await ask(owner.c, { action: "delete_room", name: room })).toEqual({ action: "delete_room", code: 200, message: "OK" });
    // The owner was in it: its own delete_room answers it, no 'your room was deleted' (300) before or after.
    expect(await owner.c.quiet(200, (f) => f.action === "change_room")).toBe(true);
    expect(owner.c.lines.some((l) => l.includes('"change_room"') && l.includes("300"))).toBe(false);
    expect(await native.client.event("ev_channel_deleted")).toEqual({ chid });
    expect(await member.c.next((f) => f.action === "change_room" && f.code === 300)).toBeTruthy();
    expect((await ask(member.c, { action: "send_message", text: "x", timestamp: 1 })).code).toBe(400);
    expect((await ask(member.c, { action: "change_room", old_room_name: room, new_room_name: "general" })).code).toBe(200);
    for (const x of [owner.c, member.c, native.client]) x.close();
  });

  it("an account made on the native door logs in here, and one made here logs in natively", async () => {
    const port = open.server.rustPort as number;
    const native = await registerUser(open.port);
    const c = await rust(port);
    expect((await ask(c, { action: "authentication", login: native.login, password: "secret" })).code).toBe(200);
    const mine = await rustUser(port);
    const n = await Client.connect(open.port);
    expect((await n.request("auth", { login: mine.login, pass: mine.password })).status).toBe(0);
    for (const x of [native.client, c, mine.c, n]) x.close();
  });
});

describe("rust_messages door: bad input", () => {
  it("malformed JSON, non-objects, no action, unknown actions, bad fields: 400 each, the connection stays", async () => {
    const port = open.server.rustPort as number;
    const { c } = await rustUser(port);
    // The native door's framing rules (PROTOCOL.md §2), in this door's error shape.
    const bad: [string, string, string][] = [
      ["hello server", "unknown", "expected a JSON object"],
      ['{"action":"send_message", text: 1}', "send_message", "frame is not valid JSON"],
      ["[1,2]", "unknown", "frame must be a JSON object"],
      ['{"text":"no action"}', "unknown", "frame has no 'action' string"],
      ['{"action":5}', "unknown", "frame has no 'action' string"],
    ];
    for (const [b, action, message] of bad) {
      c.write(b + "\n");
      expect(await c.next((f) => f.code === 400)).toEqual({ action, code: 400, message });
    }
    expect(await ask(c, { action: "frobnicate" })).toMatchObject({ code: 400, message: "unknown action 'frobnicate'" });
    expect((await ask(c, { action: "send_message", text: 5, timestamp: 1 })).code).toBe(400);
    expect(await ask(c, { action: "send_message", text: "", timestamp: 1 })).toEqual({ action: "send_message", code: 400, message: "'text' is empty" });
    expect((await ask(c, { action: "get_messages", number_of_messages: "all" })).code).toBe(400);
    expect((await ask(c, { action: "create_room" })).code).toBe(400);
    expect((await ask(c, { action: "send_message", text: "still fine", timestamp: 1 })).code).toBe(200);
    c.close();
  });

  it("an oversized frame is refused with 400 and the next frame is read", async () => {
    const port = open.server.rustPort as number;
    const { c } = await rustUser(port);
    c.write(JSON.stringify({ action: "send_message", text: "x".repeat(10_000), timestamp: 1 }) + "\n");
    const r = await c.next((f) => f.code === 400);
    expect(r.message).toMatch(/large|limit|bytes/i);
    expect((await ask(c, { action: "send_message", text: "after", timestamp: 1 })).code).toBe(200);
    c.close();
  });

  it("a flood of bad frames closes the connection; the server stays up", async () => {
    const port = open.server.rustPort as number;
    const c = await rust(port);
    c.write("{oops}\n".repeat(500));
    await c.closed;
    const d = await rust(port);
    expect((await ask(d, { action: "logout" })).code).toBe(400);
    d.close();
  });
});

describe("rust_messages door: limits shared with the native door", () => {
  const capped = serveForFile({ rustPort: 0, maxConnections: 3, maxPerAddress: 100 });
  const perAddr = serveForFile({ rustPort: 0, maxPerAddress: 2 });

  it("--max-connections counts both doors' connections; the refusal comes in this door's shape", async () => {
    const n1 = await Client.connect(capped.port);
    const n2 = await Client.connect(capped.port);
    const r1 = await rust(capped.server.rustPort as number);
    expect(await r1.quiet(100)).toBe(true);
    const r2 = await rust(capped.server.rustPort as number);
    const refusal = await r2.next();
    expect(refusal).toEqual({ action: "unknown", code: 400, message: "the server is at its connection limit; try again later" });
    await r2.closed;
    for (const c of [n1, n2, r1]) c.close();
  });

  it("--max-per-address counts unauthenticated connections of both doors", async () => {
    const n1 = await Client.connect(perAddr.port);
    const r1 = await rust(perAddr.server.rustPort as number);
    expect(await r1.quiet(100)).toBe(true);
    const n2 = await Client.connect(perAddr.port, { welcome: false });
    expect((await n2.next()).data).toMatchObject({ status: 13 });
    await n2.closed;
    // Logged in, a connection no longer counts against its address.
    expect((await ask(r1, { action: "registration", login: uniqueName("cap"), password: "p" })).code).toBe(200);
    const n3 = await Client.connect(perAddr.port);
    for (const c of [n1, r1, n3]) c.close();
  });
});

describe("rust_messages door: its room", () => {
  const start = useChildServers();

  it("the room a user was last moved to is left at its next login after a restart too", async () => {
    const dir = tempDir();
    const first = await startTestServer({ dataDir: dir, rustPort: 0 });
    const room = uniqueName("room");
    const a = await rustUser(first.rustPort as number);
    const uid0 = (await first.services.users.lookup("login", a.login)) as string;
    // In the default room: nothing stored (nor written).
    expect(await first.services.users.rustRoom(uid0)).toBeUndefined();
    expect((await ask(a.c, { action: "create_room", name: room })).code).toBe(200);
    expect((await ask(a.c, { action: "change_room", old_room_name: "general", new_room_name: room })).code).toBe(200);
    expect(await first.services.users.rustRoom(uid0)).toBe(await first.services.channels.byName(room));
    a.c.close();
    await a.c.closed;
    await first.stop();
    const again = await startTestServer({ dataDir: dir, rustPort: 0 });
    const c = await rust(again.rustPort as number);
    expect((await ask(c, { action: "authentication", login: a.login, password: a.password })).code).toBe(200);
    const sv = again.services;
    const uid = (await sv.users.lookup("login", a.login)) as string;
    // In general only (the room it had moved to was kept, one more at every restart).
    expect(await sv.channels.channelsOf(uid)).toEqual([await sv.channels.byName("general")]);
    expect(await sv.users.rustRoom(uid)).toBe(await sv.channels.byName("general"));
    // The account's deletion takes it along.
    expect((await ask(c, { action: "delete_account", login: a.login, password: a.password })).code).toBe(200);
    expect(await sv.users.rustRoom(uid)).toBeUndefined();
    c.close();
    await again.stop();
    removeDir(dir);
  });

  it("made by a user before the door was turned on: the server says so at start-up, naming --rust-room", async () => {
    const dir = tempDir();
    const first = await startTestServer({ dataDir: dir });
    const a = await registerUser(first.port);
    expect((await a.client.request("createchannel", { name: "general" })).status).toBe(0);
    a.client.close();
    await first.stop();
    const srv = await start(["--data-dir", dir, "--rust-port", "0"]);
    const warned = srv.stdout().split("\n").filter((l) => l.includes("the server's channel 'general' is one a user made"));
    expect(warned).toHaveLength(1);
    expect(JSON.parse(warned[0])).toMatchObject({ level: 40, name: "general", owner: a.uid, msg: expect.stringMatching(/give --rust-room a name no channel has/) });
    // A room the server made itself: no warning.
    const fresh = await start(["--rust-port", "0"]);
    expect(fresh.stdout()).not.toMatch(/is one a user made/);
    removeDir(dir);
  });
});
