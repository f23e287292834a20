// The seed doors (000 rust_messages, 001 rooms API) against clients that are hostile
// or broken: what the review of src/doors found, each over real TCP.

import net from "node:net";
import { describe, expect, it } from "vitest";
import { Client, serveForFile, uniqueName, type ChildServer, type Frame } from "./helpers.js";
import { isAlive, orClosed, sleep, useChildServers, waitFor } from "./pipeline-helpers.js";

const srv = serveForFile({ rustPort: 0, roomsPort: 0 });

function portOf(child: ChildServer, key: string): number {
  const m = new RegExp(`"${key}":(\\d+)[^\\n]*"msg":"wirechat listening"`).exec(child.stdout());
  if (!m) throw new Error(`no ${key} in the listening line`);
  return Number(m[1]);
}

function send(c: Client, req: Record<string, unknown>): void {
  c.write(JSON.stringify(req) + "\n");
}

/** Sends a 001 request and returns the next frame of `type` (default: the request's). */
async function ask(c: Client, req: Record<string, unknown>, type = String(req.type)): Promise<Frame> {
  send(c, req);
  return c.next((f) => f.type === type);
}

async function roomsUser(login = uniqueName("h"), pass = "pw"): Promise<{ c: Client; login: string; pass: string; uid: string }> {
  const c = await Client.connect(srv.server.roomsPort as number, { welcome: false });
  expect((await ask(c, { type: "REQUEST_SIGNUP", login, pass }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
  // The uid, for native requests that name the user.
  const n = await Client.connect(srv.port);
  const uid = (await n.request("auth", { login, pass })).uid as string;
  n.close();
  return { c, login, pass, uid };
}

describe("rooms door: CREATE_ROOM's room is the two users' own", () => {
  it("a private channel of the two whose owner is someone else is not taken for their room (its owner could read it)", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    // c makes a private channel with a and b as members, then leaves it: a and b are its
    // only members, but c owns it and may enter it again at any time.
    const c = await Client.connect(srv.port);
    const cl = uniqueName("h");
    expect((await c.request("register", { login: cl, pass: "pw", nick: cl })).status).toBe(0);
    const trap = (await c.request("createchannel", { name: "trap", private: true, members: [a.uid, b.uid] })).chid as string;
    expect((await c.request("leave", { channel: trap })).status).toBe(0);

    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    expect(room).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: b.login });
    expect(String(room.id)).not.toBe(trap);
    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "just between us", msg_type: "TEXT" });
    expect(sent.status).toBe("OK");
    // c cannot enter a and b's room, nor read what they said.
    expect((await c.request("enter", { channel: String(room.id) })).status).toBe(10);
    expect((await c.request("history", { channel: String(room.id) })).status).toBe(10);
    // b asking for a room with a gets the same one.
    expect((await ask(b.c, { type: "CREATE_ROOM", username: b.login, customer: a.login })).id).toBe(room.id);
    for (const x of [a.c, b.c, c]) x.close();
  });

  it("two CREATE_ROOMs of the same two users at once make one room", async () => {
    for (let round = 0; round < 5; round++) {
      const a = await roomsUser();
      const b = await roomsUser();
      const a2 = await Client.connect(srv.server.roomsPort as number, { welcome: false });
      expect((await ask(a2, { type: "REQUEST_LOGIN", login: a.login, pass: a.pass }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
      const asked = [
        ask(a.c, { type: "CREATE_ROOM", customer: b.login }),
        ask(b.c, { type: "CREATE_ROOM", customer: a.login }),
        ask(a2, { type: "CREATE_ROOM", customer: b.login }),
      ];
      const ids = (await Promise.all(asked)).map((f) => f.id);
      expect(ids.every((id) => Number.isSafeInteger(id) && id === ids[0])).toBe(true);
      for (const x of [a.c, b.c, a2]) x.close();
    }
  });

  it("CREATE_ROOM with oneself is a room of one, never a room shared with someone else", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    const ab = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const self = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: a.login });
    expect(self).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: a.login });
    expect(self.id).not.toBe(ab.id);
    expect((await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: a.login })).id).toBe(self.id);
    // A note to oneself does not reach b.
    expect((await ask(a.c, { type: "SND_MSG", username: a.login, room_id: self.id, message: "note to self", msg_type: "TEXT" })).status).toBe("OK");
    expect(await b.c.quiet(300, (f) => f.type === "READ_MSG")).toBe(true);
    a.c.close();
    b.c.close();
  });
});

describe("rooms door: DELETE_ROOM, DELETE_MSG and EDIT_MSG always answer the caller", () => {
  it("answers in order, also when the caller has left the room (the members' event does not reach it then)", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    const room = (await ask(a.c, { type: "CREATE_ROOM", customer: b.login })).id;
    const m1 = (await ask(a.c, { type: "SND_MSG", room_id: room, message: "one", msg_type: "TEXT" })).message_id;
    const m2 = (await ask(a.c, { type: "SND_MSG", room_id: room, message: "two", msg_type: "TEXT" })).message_id;
    // a leaves the room (natively): an outsider again, its messages there are no longer
    // its to change (PROTOCOL.md, editmessage: 14), but the room is still its own.
    const n = await Client.connect(srv.port);
    expect((await n.request("auth", { login: a.login, pass: a.pass })).status).toBe(0);
    expect((await n.request("leave", { channel: String(room) })).status).toBe(0);
    n.close();
    a.c.frames.splice(0);
    const from = a.c.lines.length;
    for (const req of [
      { type: "EDIT_MSG", id: m1, new_msg: "one, edited" },
      { type: "DELETE_MSG", id: m2 },
      { type: "DELETE_ROOM", id: room },
      { type: "zz_end" },
    ]) send(a.c, req);
    await a.c.next((f) => f.type === "zz_end");
    expect(a.c.lines.slice(from).map((l) => JSON.parse(l))).toEqual([
      { type: "EDIT_MSG", id: m1, status: "ERROR", error: `no message with mid '${m1}'` },
      { type: "DELETE_MSG", id: m2, status: "ERROR", error: `no message with mid '${m2}'` },
      { type: "DELETE_ROOM", id: room },
      { type: "zz_end", status: "ERROR", error: "unknown type 'zz_end'" },
    ]);
    // b, a member, got the room's deletion as an event, and nothing of the refused two.
    expect(await b.c.next((f) => f.type === "DELETE_ROOM")).toEqual({ type: "DELETE_ROOM", id: room });
    expect(b.c.frames.some((f) => f.type === "EDIT_MSG" || f.type === "DELETE_MSG")).toBe(false);
    a.c.close();
    b.c.close();
  });

  it("a member caller gets one answer, not the answer and the event", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    const room = (await ask(a.c, { type: "CREATE_ROOM", customer: b.login })).id;
    const m = (await ask(a.c, { type: "SND_MSG", room_id: room, message: "x", msg_type: "TEXT" })).message_id;
    await a.c.next((f) => f.type === "READ_MSG");
    a.c.frames.splice(0);
    const from = a.c.lines.length;
    for (const req of [{ type: "EDIT_MSG", id: m, new_msg: "y" }, { type: "DELETE_MSG", id: m }, { type: "DELETE_ROOM", id: room }]) send(a.c, req);
    await b.c.next((f) => f.type === "DELETE_ROOM");
    await sleep(200);
    expect(a.c.lines.slice(from).map((l) => JSON.parse(l))).toEqual([
      { type: "EDIT_MSG", id: m, new_msg: "y" },
      { type: "DELETE_MSG", id: m },
      { type: "DELETE_ROOM", id: room },
    ]);
    a.c.close();
    b.c.close();
  });
});

describe("numeric edge cases", () => {
  it("ids that are not a room's or a message's number get one ERROR each; a room's id written 1.0 or 1e0 is that room", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    const room = (await ask(a.c, { type: "CREATE_ROOM", customer: b.login })).id as number;
    const sent = await ask(a.c, { type: "SND_MSG", room_id: room, message: "x", msg_type: "TEXT" });
    await a.c.next((f) => f.type === "READ_MSG");
    const odd = ["1e308", "-1e308", "1e400", "-0", "0", "-1", "1.5", "9007199254740993", "9007199254740992", '"1"', `"${room}"`, "null", "true", `[${room}]`, `{"id":${room}}`];
    for (const v of odd) {
      for (const [type, field] of [
        ["SND_MSG", `"room_id":${v},"message":"y","msg_type":"TEXT"`],
        ["READ_MSG", `"room_id":${v},"read":"ALL"`],
        ["DELETE_ROOM", `"id":${v}`],
        ["DELETE_MSG", `"id":${v}`],
        ["EDIT_MSG", `"id":${v},"new_msg":"z"`],
      ]) {
        a.c.write(`{"type":"${type}",${field}}\n{"type":"zz_end"}\n`);
        await a.c.next((f) => f.type === "zz_end");
        const got = a.c.frames.splice(0);
        expect(got, `${type} ${v}`).toEqual([{ type, status: "ERROR", error: expect.stringMatching(/^'(room_id|id)' must be/) }]);
      }
    }
    // The same number in another JSON spelling is the same room.
    a.c.write(`{"type":"READ_MSG","read":"ALL","room_id":${room}.0}\n{"type":"READ_MSG","read":"ALL","room_id":${room}e0}\n{"type":"zz_end"}\n`);
    await a.c.next((f) => f.type === "zz_end");
    expect(a.c.frames.splice(0).map((f) => [f.room_id, f.message_id])).toEqual([
      [room, sent.message_id],
      [room, sent.message_id],
    ]);

    // 000: number_of_messages as a whole number, however written; anything else is 400.
    const rust = await Client.connect(srv.server.rustPort as number, { welcome: false });
    send(rust, { action: "registration", login: uniqueName("num"), password: "pw" });
    expect((await rust.next((f) => f.action === "registration")).code).toBe(200);
    for (const v of ["1e308", "9007199254740993", "5.0", "-0"]) {
      rust.write(`{"action":"get_messages","number_of_messages":${v}}\n`);
      const r = await rust.next((f) => f.action === "get_messages");
      expect(r.messages, v).toBeInstanceOf(Array);
      if (v === "-0") expect(r.messages).toEqual([]);
    }
    for (const v of ["1e400", "-1", "1.5", '"1"', "null", "[1]", "{}"]) {
      rust.write(`{"action":"get_messages","number_of_messages":${v}}\n`);
      expect(await rust.next((f) => f.action === "get_messages"), v).toEqual({ action: "get_messages", code: 400, message: "'number_of_messages' must be a whole number" });
    }
    for (const x of [a.c, b.c, rust]) x.close();
  });
});

describe("a login typed in another case", () => {
  it("is the same login: logins are unique whatever their case, and the doors log in by any case", async () => {
    const login = uniqueName("CaseUser");
    const first = await Client.connect(srv.server.rustPort as number, { welcome: false });
    send(first, { action: "registration", login, password: "pw" });
    expect((await first.next((f) => f.action === "registration")).code).toBe(200);
    first.close();
    const rust = await Client.connect(srv.server.rustPort as number, { welcome: false });
    send(rust, { action: "authentication", login: login.toLowerCase(), password: "pw" });
    expect((await rust.next((f) => f.action === "authentication")).code).toBe(200);
    send(rust, { action: "change_password", login, new_password: "pw2" });
    expect(await rust.next((f) => f.action === "change_password")).toEqual({ action: "change_password", code: 200, message: "OK" });
    send(rust, { action: "delete_account", login: login.toUpperCase(), password: "pw2" });
    expect(await rust.next((f) => f.action === "delete_account")).toEqual({ action: "delete_account", code: 200, message: "OK" });
    rust.close();

    const other = uniqueName("CaseUser");
    const made = await Client.connect(srv.server.roomsPort as number, { welcome: false });
    expect((await ask(made, { type: "REQUEST_SIGNUP", login: other, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    made.close();
    const rooms = await Client.connect(srv.server.roomsPort as number, { welcome: false });
    expect((await ask(rooms, { type: "REQUEST_LOGIN", login: other.toUpperCase(), pass: "pw" }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    expect(await ask(rooms, { type: "OLD_DIALOGS", username: other })).toEqual({ type: "OLD_DIALOGS", dialogs: [], id: [], first_massage_id: [] });
    rooms.close();
  });
});

describe("frames that are not valid UTF-8", () => {
  it("are refused as on the native door, not stored with replacement characters", async () => {
    const rust = await Client.connect(srv.server.rustPort as number, { welcome: false });
    send(rust, { action: "registration", login: uniqueName("u8"), password: "pw" });
    expect((await rust.next((f) => f.action === "registration")).code).toBe(200);
    const room = uniqueName("u8");
    send(rust, { action: "create_room", name: room });
    expect((await rust.next((f) => f.action === "create_room")).code).toBe(200);
    send(rust, { action: "change_room", old_room_name: "general", new_room_name: room });
    expect((await rust.next((f) => f.action === "change_room")).code).toBe(200);
    rust.write(Buffer.concat([Buffer.from('{"action":"send_message","text":"bad '), Buffer.from([0xff, 0xfe]), Buffer.from('","timestamp":1}\n')]));
    expect(await rust.next((f) => f.action === "send_message")).toEqual({ action: "send_message", code: 400, message: "frame is not valid UTF-8" });
    send(rust, { action: "get_messages", number_of_messages: 10 });
    expect((await rust.next((f) => f.action === "get_messages")).messages).toEqual([]);

    const [a, b] = [uniqueName("u8"), uniqueName("u8")];
    const other = await Client.connect(srv.server.roomsPort as number, { welcome: false });
    expect((await ask(other, { type: "REQUEST_SIGNUP", login: b, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const rooms = await Client.connect(srv.server.roomsPort as number, { welcome: false });
    expect((await ask(rooms, { type: "REQUEST_SIGNUP", login: a, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const id = (await ask(rooms, { type: "CREATE_ROOM", customer: b })).id;
    rooms.write(Buffer.concat([Buffer.from(`{"type":"SND_MSG","room_id":${id},"message":"bad `), Buffer.from([0xc3, 0x28]), Buffer.from('","msg_type":"TEXT"}\n')]));
    expect(await rooms.next()).toEqual({ type: "ERROR", status: "ERROR", error: "frame is not valid UTF-8" });
    send(rooms, { type: "READ_MSG", read: "ALL", room_id: id });
    send(rooms, { type: "zz_end" });
    await rooms.next((f) => f.type === "zz_end");
    expect(rooms.frames.filter((f) => f.type === "READ_MSG")).toEqual([]);
    for (const c of [rust, rooms, other]) c.close();
  });
});

describe("past --bad-frame-limit and the request rate limit, as on the native door", () => {
  const bad = serveForFile({ rustPort: 0, roomsPort: 0, badFrameLimit: 5 });
  const rated = serveForFile({ rustPort: 0, roomsPort: 0, rate: 1, burst: 3, rateDisconnect: 3 });

  it("a flood of bad frames: what was asked before is answered, each bad frame gets its error, then a notice in the door's shape, then the close", async () => {
    const rust = await Client.connect(bad.server.rustPort as number, { welcome: false });
    send(rust, { action: "registration", login: uniqueName("bf"), password: "pw" });
    expect((await rust.next((f) => f.action === "registration")).code).toBe(200);
    send(rust, { action: "send_message", text: "before", timestamp: 1 });
    await rust.next((f) => f.action === "send_message");
    // Its echo to this connection (the room's get_message) may come before or after the answer.
    await rust.next((f) => f.action === "get_message");
    rust.frames.splice(0);
    const from = rust.lines.length;
    rust.write('{"action":"get_messages","number_of_messages":5}\n' + "{oops}\n".repeat(6));
    await rust.closed;
    expect(rust.lines.slice(from).map((l) => JSON.parse(l))).toEqual([
      { action: "get_messages", messages: [{ author: expect.any(String), text: "before", timestamp: expect.any(Number) }] },
      ...Array.from({ length: 5 }, () => ({ action: "unknown", code: 400, message: "frame is not valid JSON" })),
      { action: "unknown", code: 400, message: "too many bad frames; closing the connection" },
    ]);

    const [a, b] = [uniqueName("bf"), uniqueName("bf")];
    const other = await Client.connect(bad.server.roomsPort as number, { welcome: false });
    expect((await ask(other, { type: "REQUEST_SIGNUP", login: b, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const rooms = await Client.connect(bad.server.roomsPort as number, { welcome: false });
    expect((await ask(rooms, { type: "REQUEST_SIGNUP", login: a, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const room = (await ask(rooms, { type: "CREATE_ROOM", customer: b })).id;
    const sent = await ask(rooms, { type: "SND_MSG", room_id: room, message: "before", msg_type: "TEXT" });
    await rooms.next((f) => f.type === "READ_MSG");
    rooms.frames.splice(0);
    const at = rooms.lines.length;
    rooms.write(JSON.stringify({ type: "READ_MSG", read: "ALL", room_id: room }) + "\n" + "{oops}\n".repeat(6));
    await rooms.closed;
    expect(rooms.lines.slice(at).map((l) => JSON.parse(l))).toEqual([
      expect.objectContaining({ type: "READ_MSG", status: "OK", message_id: sent.message_id, message: "before" }),
      ...Array.from({ length: 5 }, () => ({ type: "ERROR", status: "ERROR", error: "frame is not valid JSON" })),
      { type: "ERROR", status: "ERROR", error: "too many bad frames; closing the connection" },
    ]);
    other.close();
  });

  it("every door request counts against the rate, once: past it each is refused in the door's shape, and far past it the connection is closed with a notice", async () => {
    const rust = await Client.connect(rated.server.rustPort as number, { welcome: false });
    send(rust, { action: "registration", login: uniqueName("rl"), password: "pw" });
    expect((await rust.next((f) => f.action === "registration")).code).toBe(200);
    const from = rust.lines.length;
    // Unknown actions: answered by the door alone, without a native request.
    rust.write('{"action":"frobnicate"}\n'.repeat(10));
    await Promise.race([rust.closed, sleep(3000)]);
    const slow = { action: "frobnicate", code: 400, message: "too many requests; slow down and retry" };
    expect(rust.lines.slice(from).map((l) => JSON.parse(l))).toEqual([
      ...Array.from({ length: 2 }, () => ({ action: "frobnicate", code: 400, message: "unknown action 'frobnicate'" })),
      slow,
      slow,
      slow,
      { action: "unknown", code: 400, message: "too many requests; closing the connection" },
    ]);

    const login = uniqueName("rl");
    const rooms = await Client.connect(rated.server.roomsPort as number, { welcome: false });
    expect((await ask(rooms, { type: "REQUEST_SIGNUP", login, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const at = rooms.lines.length;
    // SEARCH_USER: answered from lookups, without a native request.
    rooms.write((JSON.stringify({ type: "SEARCH_USER", user: login }) + "\n").repeat(10));
    await Promise.race([rooms.closed, sleep(3000)]);
    const refused = { type: "SEARCH_USER", status: "ERROR", error: "too many requests; slow down and retry" };
    expect(rooms.lines.slice(at).map((l) => JSON.parse(l))).toEqual([
      { type: "SEARCH_USER", user: [login] },
      { type: "SEARCH_USER", user: [login] },
      refused,
      refused,
      refused,
      { type: "ERROR", status: "ERROR", error: "too many requests; closing the connection" },
    ]);
    expect(rust.isClosed && rooms.isClosed).toBe(true);
  });
});

describe("long histories are streamed to clients that do not read, not held whole", () => {
  const startChild = useChildServers("each");
  // 300 messages of 100,000 characters: 30 MB of history. Four connections that ask for
  // all of it and read nothing would hold 120 MB if the door built each answer whole;
  // the server runs with a 96 MB heap. Streamed as the socket drains (as native history
  // is), each holds about one page of messages.
  const N = 300;
  const SIZE = 100_000;
  const flags = ["--rust-port", "0", "--rooms-port", "0"];
  const smallHeap = ["env", "NODE_OPTIONS=--max-old-space-size=96"];

  /** Connects, writes `lines`, and never reads. */
  async function mute(port: number, lines: Record<string, unknown>[]): Promise<net.Socket> {
    const s = net.connect(port, "127.0.0.1");
    await new Promise<void>((resolve, reject) => s.once("connect", resolve).once("error", reject));
    s.on("error", () => {});
    s.pause();
    s.write(lines.map((l) => JSON.stringify(l) + "\n").join(""));
    return s;
  }

  it("000 get_messages", async () => {
    const child = await startChild(flags, smallHeap);
    const port = portOf(child, "rustPort");
    const c = await Client.connect(port, { welcome: false });
    const login = uniqueName("big");
    send(c, { action: "registration", login, password: "pw" });
    for (let i = 0; i < N; i++) send(c, { action: "send_message", text: `${i} `.padEnd(SIZE, "x"), timestamp: 1 });
    await orClosed(c, waitFor(() => c.frames.filter((f) => f.action === "send_message" && f.code === 200).length === N, 60_000, "the messages"), "the messages", child);
    c.frames.splice(0);
    const muted = [];
    for (let i = 0; i < 4; i++) muted.push(await mute(port, [{ action: "authentication", login, password: "pw" }, { action: "get_messages", number_of_messages: 500 }]));
    await sleep(1500);
    expect(isAlive(child), child.stdout().slice(-600)).toBe(true);
    // A client that reads gets all of it.
    send(c, { action: "get_messages", number_of_messages: 500 });
    const all = await orClosed(c, c.next((f) => f.action === "get_messages", 30_000), "get_messages", child);
    expect(all.messages.length).toBe(N);
    expect(all.messages.map((m: { text: string }) => m.text.split(" ")[0])).toEqual(Array.from({ length: N }, (_, i) => String(i)));
    for (const s of muted) s.destroy();
    c.close();
  }, 90_000);

  it("001 READ_MSG", async () => {
    const child = await startChild(flags, smallHeap);
    const port = portOf(child, "roomsPort");
    const a = uniqueName("big");
    const b = uniqueName("big");
    const c = await Client.connect(port, { welcome: false });
    expect((await ask(c, { type: "REQUEST_SIGNUP", login: b, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    c.close();
    const d = await Client.connect(port, { welcome: false });
    expect((await ask(d, { type: "REQUEST_SIGNUP", login: a, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const room = (await ask(d, { type: "CREATE_ROOM", username: a, customer: b })).id;
    for (let i = 0; i < N; i++) send(d, { type: "SND_MSG", room_id: room, message: `${i} `.padEnd(SIZE, "x"), msg_type: "TEXT" });
    await orClosed(d, waitFor(() => d.frames.filter((f) => f.type === "SND_MSG" && f.status === "OK").length === N, 60_000, "the messages"), "the messages", child);
    d.frames.splice(0);
    const muted = [];
    for (let i = 0; i < 4; i++) muted.push(await mute(port, [{ type: "REQUEST_LOGIN", login: a, pass: "pw" }, { type: "READ_MSG", read: "ALL", room_id: room }]));
    await sleep(1500);
    expect(isAlive(child), child.stdout().slice(-600)).toBe(true);
    send(d, { type: "READ_MSG", read: "ALL", room_id: room });
    send(d, { type: "zz_end" });
    await orClosed(d, d.next((f) => f.type === "zz_end", 30_000), "READ_MSG", child);
    const read = d.frames.filter((f) => f.type === "READ_MSG" && f.status === "OK");
    expect(read.map((f) => f.message.split(" ")[0])).toEqual(Array.from({ length: N }, (_, i) => String(i)));
    for (const s of muted) s.destroy();
    d.close();
  }, 90_000);
});

describe("a door client that sends large frames and does not read its answers", () => {
  const startChild = useChildServers("each");

  it("is read at most about 4 MiB ahead, as on the native door, not 64 frames of up to --max-frame", async () => {
    // Seven frames whose answers echo 1 MB each fill the kernel's buffers and leave
    // the server's answers waiting (the door stops serving the connection until it
    // reads); then 60 frames of 900 KB. Held as 64 decoded frames each, two such
    // clients would be over 100 MB on a 96 MB heap; bounded by bytes, a few MB each.
    const child = await startChild(["--rust-port", "0"], ["env", "NODE_OPTIONS=--max-old-space-size=96"]);
    const port = portOf(child, "rustPort");
    const muted: net.Socket[] = [];
    for (let k = 0; k < 2; k++) {
      const s = net.connect(port, "127.0.0.1");
      await new Promise<void>((resolve, reject) => s.once("connect", resolve).once("error", reject));
      s.on("error", () => {});
      s.pause();
      for (let i = 0; i < 7; i++) s.write(JSON.stringify({ action: `${i}`.padEnd(1_000_000, "x") }) + "\n");
      for (let i = 0; i < 60; i++) s.write(JSON.stringify({ action: "get_messages", pad: `${i}`.padEnd(900_000, "y") }) + "\n");
      muted.push(s);
    }
    await sleep(3000);
    expect(isAlive(child), child.stdout().slice(-600)).toBe(true);
    // The server still serves others.
    const c = await Client.connect(port, { welcome: false });
    send(c, { action: "registration", login: uniqueName("q"), password: "pw" });
    expect((await orClosed(c, c.next((f) => f.action === "registration", 10_000), "registration", child)).code).toBe(200);
    for (const s of muted) s.destroy();
    c.close();
  }, 60_000);
});

describe("graceful stop with door requests read but not yet answered", () => {
  const startChild = useChildServers("each");

  it("answers every request the doors had read (a client slow to read included) before it closes their connections", async () => {
    const child = await startChild(["--rust-port", "0", "--rooms-port", "0"]);
    const M = 300;
    const text = (i: number) => `${i} `.padEnd(1000, "x");
    // 000: get_messages of M messages.
    const rust = await Client.connect(portOf(child, "rustPort"), { welcome: false });
    send(rust, { action: "registration", login: uniqueName("stop"), password: "pw" });
    for (let i = 0; i < M; i++) send(rust, { action: "send_message", text: text(i), timestamp: 1 });
    await orClosed(rust, waitFor(() => rust.frames.filter((f) => f.action === "send_message" && f.code === 200).length === M, 20_000, "the messages"), "the messages", child);
    // 001: READ_MSG of a room of M messages, and SEARCH_USER (which the door answers
    // without a native request).
    const [a, b] = [uniqueName("stop"), uniqueName("stop")];
    const other = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    expect((await ask(other, { type: "REQUEST_SIGNUP", login: b, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    other.close();
    const rooms = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    expect((await ask(rooms, { type: "REQUEST_SIGNUP", login: a, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const room = (await ask(rooms, { type: "CREATE_ROOM", customer: b })).id;
    for (let i = 0; i < M; i++) send(rooms, { type: "SND_MSG", room_id: room, message: text(i), msg_type: "TEXT" });
    await orClosed(rooms, waitFor(() => rooms.frames.filter((f) => f.type === "SND_MSG" && f.status === "OK").length === M, 20_000, "the messages"), "the messages", child);
    rust.frames.splice(0);
    rooms.frames.splice(0);
    const before = { rust: rust.lines.length, rooms: rooms.lines.length };

    // Fewer than a door reads ahead (64), in one write each: all of them are read at
    // once. 18 MB of answers on each connection, which stop reading for a while: the
    // doors wait for them to drain, as the native door waits for a slow reader.
    const K = 60;
    rust.write(Array.from({ length: K }, () => JSON.stringify({ action: "get_messages", number_of_messages: M }) + "\n").join(""));
    rooms.write(
      Array.from({ length: K / 2 }, () => JSON.stringify({ type: "SEARCH_USER", user: a }) + "\n" + JSON.stringify({ type: "READ_MSG", read: "ALL", room_id: room }) + "\n").join(""),
    );
    await orClosed(rust, rust.next((f) => f.action === "get_messages", 10_000), "a get_messages answer", child);
    await orClosed(rooms, rooms.next((f) => f.type === "SEARCH_USER", 10_000), "a SEARCH_USER answer", child);
    rust.socket.pause();
    rooms.socket.pause();
    await sleep(300);
    child.proc.kill("SIGTERM");
    await sleep(300);
    rust.socket.resume();
    rooms.socket.resume();
    expect(await child.exited).toBe(0);
    await Promise.all([rust.closed, rooms.closed]);
    const answered = {
      get_messages: rust.lines.slice(before.rust).filter((l) => l.startsWith('{"action":"get_messages"')).length,
      SEARCH_USER: rooms.lines.slice(before.rooms).filter((l) => l.startsWith('{"type":"SEARCH_USER"')).length,
      READ_MSG: rooms.lines.slice(before.rooms).filter((l) => l.startsWith('{"type":"READ_MSG"')).length,
    };
    expect(answered).toEqual({ get_messages: K, SEARCH_USER: K / 2, READ_MSG: (K / 2) * M });
  }, 60_000);
});

describe("one connection, one user after another; a session ended elsewhere", () => {
  const one = serveForFile({ rustPort: 0, roomsPort: 0, maxSessionsPerUser: 1 });

  it("000: after logout and a login as another user, the connection is that user's, in the default room, and hears nothing of the first user's room", async () => {
    const port = one.server.rustPort as number;
    const c = await Client.connect(port, { welcome: false });
    const [a, b] = [uniqueName("sw"), uniqueName("sw")];
    const room = uniqueName("swroom");
    send(c, { action: "registration", login: a, password: "pw" });
    expect((await c.next((f) => f.action === "registration")).code).toBe(200);
    send(c, { action: "create_room", name: room });
    expect((await c.next((f) => f.action === "create_room")).code).toBe(200);
    send(c, { action: "change_room", old_room_name: "general", new_room_name: room });
    expect((await c.next((f) => f.action === "change_room")).code).toBe(200);
    send(c, { action: "logout" });
    expect((await c.next((f) => f.action === "logout")).code).toBe(200);
    send(c, { action: "registration", login: b, password: "pw" });
    expect((await c.next((f) => f.action === "registration")).code).toBe(200);
    // A member of a's room writes there: b's connection does not hear it.
    const other = await Client.connect(port, { welcome: false });
    send(other, { action: "registration", login: uniqueName("sw"), password: "pw" });
    expect((await other.next((f) => f.action === "registration")).code).toBe(200);
    send(other, { action: "change_room", old_room_name: "general", new_room_name: room });
    expect((await other.next((f) => f.action === "change_room")).code).toBe(200);
    send(other, { action: "send_message", text: "in a's room", timestamp: 1 });
    expect((await other.next((f) => f.action === "send_message")).code).toBe(200);
    // b writes to the default room, and reads it.
    send(c, { action: "send_message", text: "b in general", timestamp: 1 });
    expect((await c.next((f) => f.action === "send_message")).code).toBe(200);
    send(c, { action: "get_messages", number_of_messages: 1 });
    expect((await c.next((f) => f.action === "get_messages")).messages).toEqual([{ author: b, text: "b in general", timestamp: expect.any(Number) }]);
    expect(await c.quiet(200, (f) => f.action === "get_message" && f.text === "in a's room")).toBe(true);
    c.close();
    other.close();
  });

  it("001: a connection whose session another login ended, logged in again as someone else, reads and remembers as that user only", async () => {
    const port = one.server.roomsPort as number;
    const connect = () => Client.connect(port, { welcome: false });
    const [a, b, peer] = [uniqueName("sw"), uniqueName("sw"), uniqueName("sw")];
    for (const login of [b, peer]) {
      const x = await connect();
      expect((await ask(x, { type: "REQUEST_SIGNUP", login, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
      x.close();
    }
    const c = await connect();
    expect((await ask(c, { type: "REQUEST_SIGNUP", login: a, pass: "pw" }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const aRoom = (await ask(c, { type: "CREATE_ROOM", customer: peer })).id;
    expect((await ask(c, { type: "SND_MSG", room_id: aRoom, message: "a's secret", msg_type: "TEXT" })).status).toBe("OK");
    await c.next((f) => f.type === "READ_MSG" && f.message === "a's secret");
    // a logs in elsewhere: one session per user here, so c's ends (c stays open).
    const elsewhere = await connect();
    expect((await ask(elsewhere, { type: "REQUEST_LOGIN", login: a, pass: "pw" }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    expect(await ask(c, { type: "SEARCH_USER", user: a })).toMatchObject({ status: "ERROR", error: expect.stringMatching(/log in/) });
    // c logs in as b: a's room is not b's, and a's messages do not come here.
    expect((await ask(c, { type: "REQUEST_LOGIN", login: b, pass: "pw" }, "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    expect(await ask(c, { type: "READ_MSG", read: "ALL", room_id: aRoom })).toMatchObject({ type: "READ_MSG", status: "ERROR", room_id: aRoom });
    expect(await ask(c, { type: "READ_MSG", read: "RESENT", room_id: aRoom })).toMatchObject({ type: "READ_MSG", status: "ERROR", room_id: aRoom });
    expect((await ask(elsewhere, { type: "SND_MSG", room_id: aRoom, message: "a again", msg_type: "TEXT" })).status).toBe("OK");
    expect(await c.quiet(200, (f) => f.type === "READ_MSG")).toBe(true);
    // b's own room: RESENT is b's bookkeeping.
    const bRoom = (await ask(c, { type: "CREATE_ROOM", customer: peer })).id;
    expect((await ask(c, { type: "SND_MSG", room_id: bRoom, message: "b's", msg_type: "TEXT" })).status).toBe("OK");
    await c.next((f) => f.type === "READ_MSG" && f.message === "b's");
    send(c, { type: "READ_MSG", read: "RESENT", room_id: bRoom });
    send(c, { type: "zz_end" });
    await c.next((f) => f.type === "zz_end");
    expect(c.frames.splice(0).filter((f) => f.type === "READ_MSG")).toEqual([]);
    c.close();
    elsewhere.close();
  });

  it("requests queued on a connection whose session a password change elsewhere ends: answered until it closes, the server stays up", async () => {
    const login = uniqueName("race");
    const rust = await Client.connect(srv.server.rustPort as number, { welcome: false });
    send(rust, { action: "registration", login, password: "pw" });
    expect((await rust.next((f) => f.action === "registration")).code).toBe(200);
    const native = await Client.connect(srv.port);
    for (let i = 0; i < 200; i++) send(rust, { action: "send_message", text: `m${i}`, timestamp: 1 });
    expect((await native.request("auth", { login, pass: "pw" })).status).toBe(0);
    expect((await native.request("changepassword", { pass: "pw", newpass: "pw2" })).status).toBe(0);
    await rust.closed;
    expect(rust.lines.map((l) => JSON.parse(l))).toContainEqual({ action: "logout", code: 300, message: "the password was changed" });
    const answers = rust.lines.map((l) => JSON.parse(l)).filter((f) => f.action === "send_message");
    // Every answer is one of the two a send_message can get; the 200s come first.
    expect(answers.every((f) => (f.code === 200 && f.message === "OK") || f.code === 400)).toBe(true);
    const firstRefused = answers.findIndex((f) => f.code !== 200);
    expect(answers.slice(firstRefused < 0 ? answers.length : firstRefused).every((f) => f.code === 400)).toBe(true);
    // What was acknowledged is stored.
    const texts = new Set(
      (await native.request("history", { channel: (await native.request("channellist", {})).channels.find((ch: { name: string }) => ch.name === "general").chid, limit: 500 })).messages.map(
        (m: { body: string }) => m.body,
      ),
    );
    for (let i = 0; i < answers.length; i++) if (answers[i].code === 200) expect(texts.has(`m${i}`)).toBe(true);
    native.close();
  });
});
