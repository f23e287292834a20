// Cross-door: one conversation with a native client, a rust_messages (000) client and a
// rooms-API (001) client, then with the HTTP port's 002 and 003 clients too; each sees
// the others' messages (and, where its protocol has them, edits and deletions; where it
// has a history, the conversation as it is now) in its own format. Accounts made on one door log in on
// every other.

import { describe, expect, it } from "vitest";
import { Client, registerUser, seedDoorClients, serveForFile, uniqueName, WsClient } from "./helpers.js";

const ROOM = "townhall";
const srv = serveForFile({ rustPort: 0, roomsPort: 0, rustRoom: ROOM });



describe("seed doors together", () => {
  it("native, rust_messages and rooms-API clients in one channel see each other's messages, edits and deletions", async () => {
    // native: a member of the rust_messages door's room (a public channel)
    const native = await registerUser(srv.port);
    const chid = (await native.client.request("channellist", { limit: 500 })).channels.find((c: { name: string }) => c.name === ROOM).chid;
    expect((await native.client.request("enter", { channel: chid })).status).toBe(0);
    // 000: in the room after login; 001: an account that joined the channel (through the
    // native door) reads it by room id
    const { rust, rl, rooms, ol } = await seedDoorClients({ rust: srv.server.rustPort as number, rooms: srv.server.roomsPort as number, native: srv.port }, chid);

    // native → 000 and 001
    const n1 = await native.client.request("message", { channel: chid, body: "from native" });
    expect(await rust.next((f) => f.action === "get_message" && f.text === "from native")).toEqual({
      action: "get_message",
      author: native.nick,
      text: "from native",
      timestamp: expect.any(Number),
    });
    expect(await rooms.next((f) => f.type === "READ_MSG" && f.message === "from native")).toMatchObject({
      room_id: Number(chid),
      message_id: Number(n1.mid),
      msg_type: "TEXT",
      sender: native.nick,
    });
    // 000 → native and 001
    expect((await rust.ask({ action: "send_message", text: "from rust", timestamp: 1 }, (f) => f.action === "send_message")).code).toBe(200);
    const r1 = await native.client.event("ev_message", (d) => d.body === "from rust");
    expect(r1).toMatchObject({ chid, nick: rl });
    expect(await rooms.next((f) => f.type === "READ_MSG" && f.message === "from rust")).toMatchObject({ sender: rl, message_id: Number(r1.mid) });
    // 001 → native and 000
    const o1 = await rooms.ask({ type: "SND_MSG", username: ol, room_id: Number(chid), message: "from rooms", msg_type: "TEXT" }, (f) => f.type === "SND_MSG");
    expect(o1.status).toBe("OK");
    expect(await native.client.event("ev_message", (d) => d.body === "from rooms")).toMatchObject({ mid: String(o1.message_id), nick: ol });
    expect(await rust.next((f) => f.action === "get_message" && f.text === "from rooms")).toMatchObject({ author: ol });

    // edits and deletions: the native client's and the rooms client's reach each other
    // (rust_messages has no frame for them: it shows nothing)
    expect((await native.client.request("editmessage", { mid: n1.mid, body: "from native (edited)" })).status).toBe(0);
    expect(await rooms.next((f) => f.type === "EDIT_MSG")).toEqual({ type: "EDIT_MSG", id: Number(n1.mid), new_msg: "from native (edited)" });
    rooms.line({ type: "EDIT_MSG", id: o1.message_id, new_msg: "from rooms (edited)" });
    expect(await native.client.event("ev_edit", (d) => d.mid === String(o1.message_id))).toMatchObject({ body: "from rooms (edited)" });
    rooms.line({ type: "DELETE_MSG", id: o1.message_id });
    expect(await native.client.event("ev_delmessage", (d) => d.mid === String(o1.message_id))).toEqual({ mid: String(o1.message_id) });
    expect((await native.client.request("delmessage", { mid: n1.mid })).status).toBe(0);
    expect(await rooms.next((f) => f.type === "DELETE_MSG" && f.id === Number(n1.mid))).toEqual({ type: "DELETE_MSG", id: Number(n1.mid) });
    // and the room's history on every door no longer has them
    const left = await rust.ask({ action: "get_messages", number_of_messages: 10 }, (f) => f.action === "get_messages");
    expect(left.messages.map((m: { text: string }) => m.text)).toEqual(["from rust"]);
    expect(await rust.quiet(200, (f) => f.action !== "get_message")).toBe(true);
    for (const c of [native.client, rust, rooms]) c.close();
  });

  it("an account made on any door logs in on every other", async () => {
    const made = [
      { door: "native", login: (await registerUser(srv.port, uniqueName("n"), "pw")).login },
      { door: "rust", login: uniqueName("r") },
      { door: "rooms", login: uniqueName("o") },
    ];
    const r = await Client.connect(srv.server.rustPort as number, { welcome: false });
    expect((await r.ask({ action: "registration", login: made[1].login, password: "pw" }, (f) => f.action === "registration")).code).toBe(200);
    const o = await Client.connect(srv.server.roomsPort as number, { welcome: false });
    expect((await o.ask({ type: "REQUEST_SIGNUP", login: made[2].login, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    for (const c of [r, o]) c.close();
    for (const { login } of made) {
      const n = await Client.connect(srv.port);
      expect((await n.request("auth", { login, pass: "pw" })).status).toBe(0);
      const rr = await Client.connect(srv.server.rustPort as number, { welcome: false });
      expect((await rr.ask({ action: "authentication", login, password: "pw" }, (f) => f.action === "authentication")).code).toBe(200);
      const oo = await Client.connect(srv.server.roomsPort as number, { welcome: false });
      expect((await oo.ask({ type: "REQUEST_LOGIN", login, pass: "pw" }, (f) => f.type === "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
      for (const c of [n, rr, oo]) c.close();
    }
  });
});

describe("every door in one conversation", () => {
  // The rust_messages room and the HTTP/WS chat's lobby are one public channel.
  const all = serveForFile({ rustPort: 0, roomsPort: 0, httpPort: 0, rustRoom: "commons", lobby: "commons" });

  async function http(method: string, path: string, body?: unknown, sid?: string) {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (sid) headers.authorization = `Bearer ${sid}`;
    const res = await fetch(`http://127.0.0.1:${all.server.httpPort}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    return (await res.json()) as any;
  }

  it("native, 000, 001, 002 and 003 clients see each other's messages in the shared channel", async () => {
    const hp = all.server.httpPort as number;
    // 003: created and logged in on /ws: in the lobby
    const name = uniqueName("c3");
    const email = `${name}@example.com`;
    expect((await http("POST", "/create_user", { username: name, password: "pw", email })).status).toBe("success");
    const ws3 = await WsClient.connect(hp, "/ws");
    ws3.send({ type: "auth", email, password: "pw" });
    expect(await ws3.next((m) => m.status === "authenticated")).toBeTruthy();
    // native: enters the channel
    const native = await registerUser(all.port);
    const chid = (await native.client.request("channellist", { limit: 500 })).channels.find((c: { name: string }) => c.name === "commons").chid;
    expect((await native.client.request("enter", { channel: chid })).status).toBe(0);
    // 000: in it after login
    const rust = await Client.connect(all.server.rustPort as number, { welcome: false });
    const rl = uniqueName("c0");
    expect((await rust.ask({ action: "registration", login: rl, password: "pw" }, (f) => f.action === "registration")).code).toBe(200);
    // 001 and 002 accounts join it once (natively), then read it by its number
    const ol = uniqueName("c1");
    const rooms = await Client.connect(all.server.roomsPort as number, { welcome: false });
    expect((await rooms.ask({ type: "REQUEST_SIGNUP", login: ol, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const el = uniqueName("c2");
    const sid = (await http("POST", "/v1/register", { login: el, password: "pw" })).session_id as string;
    for (const login of [ol, el]) {
      const n = await Client.connect(all.port);
      expect((await n.request("auth", { login, pass: "pw" })).status).toBe(0);
      expect((await n.request("enter", { channel: chid })).status).toBe(0);
      n.close();
    }
    const ws2 = await WsClient.connect(hp, `/v1/rooms/${chid}/chat?session_id=${sid}`);
    await new Promise((r) => setTimeout(r, 100)); // the room socket has logged in

    const says: [string, () => void][] = [
      [native.nick, () => native.client.send("message", { channel: chid, body: "hi from native" })],
      [rl, () => rust.line({ action: "send_message", text: "hi from 000", timestamp: 1 })],
      [ol, () => rooms.line({ type: "SND_MSG", username: ol, room_id: Number(chid), message: "hi from 001", msg_type: "TEXT" })],
      [el, () => ws2.send({ text: "hi from 002" })],
      [name, () => ws3.send({ type: "chat", content: "hi from 003" })],
    ];
    for (const [, say] of says) say();
    const mids = new Map<string, string>();
    for (const text of ["hi from native", "hi from 000", "hi from 001", "hi from 002", "hi from 003"]) {
      const ev = await native.client.event("ev_message", (d) => d.body === text);
      expect(ev).toMatchObject({ chid });
      mids.set(text, ev.mid);
      expect(await rust.next((f) => f.action === "get_message" && f.text === text)).toMatchObject({ timestamp: expect.any(Number) });
      expect(await rooms.next((f) => f.type === "READ_MSG" && f.message === text)).toMatchObject({ room_id: Number(chid) });
      expect(await ws2.next((m) => m.text === text)).toMatchObject({ room_id: Number(chid), user_id: expect.any(Number) });
      expect(await ws3.next((m) => m.status === "message" && m.message?.content === text)).toMatchObject({ info: null });
    }

    // An edit (native) and a deletion (001): the doors with frames for them get them; 000
    // and 002 show the channel as it is now; the WebSocket doors' sockets are sent
    // nothing for them (their seeds have no such frames).
    const edited = mids.get("hi from native") as string;
    const deleted = mids.get("hi from 001") as string;
    expect((await native.client.request("editmessage", { mid: edited, body: "hi from native, edited" })).status).toBe(0);
    expect(await rooms.next((f) => f.type === "EDIT_MSG")).toEqual({ type: "EDIT_MSG", id: Number(edited), new_msg: "hi from native, edited" });
    rooms.line({ type: "DELETE_MSG", id: Number(deleted) });
    expect(await native.client.event("ev_delmessage", (d) => d.mid === deleted)).toEqual({ mid: deleted });
    const shown = (await http("GET", `/v1/rooms/${chid}/messages`, undefined, sid)) as { text: string }[];
    const listed = (await rust.ask({ action: "get_messages", number_of_messages: 50 }, (f) => f.action === "get_messages")).messages as { text: string }[];
    for (const texts of [shown.map((m) => m.text), listed.map((m) => m.text)]) {
      expect(texts).toContain("hi from native, edited");
      expect(texts).toContain("hi from 002");
      expect(texts).not.toContain("hi from native");
      expect(texts).not.toContain("hi from 001");
    }
    await new Promise((r) => setTimeout(r, 200));
    expect(ws2.messages).toEqual([]);
    expect(ws3.messages).toEqual([]);
    // (000's own send_message answer is all it has not taken.)
    expect(rust.frames).toEqual([{ action: "send_message", code: 200, message: expect.any(String) }]);
    for (const c of [native.client, rust, rooms]) c.close();
    for (const w of [ws2, ws3]) w.ws.close();
  });

  it("a seed-003 account's email (its login) is shown by no door's user list: the 001 and 002 doors show and find it by its username", async () => {
    const name = uniqueName("hid");
    const email = `${name}@example.com`;
    expect((await http("POST", "/create_user", { username: name, password: "pw", email })).status).toBe("success");
    const el = uniqueName("c2");
    const sid = (await http("POST", "/v1/register", { login: el, password: "pw" })).session_id as string;
    const ol = uniqueName("c1");
    const rooms = await Client.connect(all.server.roomsPort as number, { welcome: false });
    expect((await rooms.ask({ type: "REQUEST_SIGNUP", login: ol, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    // 002: searched by its username, listed by it; its email's beginning finds nothing.
    const found = (await http("GET", `/v1/users/?q=${encodeURIComponent(name)}`, undefined, sid)) as { id: number; login: string }[];
    expect(found.map((u) => u.login)).toEqual([name]);
    expect(await http("GET", `/v1/users/?q=${encodeURIComponent(`${name}@`)}`, undefined, sid)).toEqual([]);
    // A room with it, made by that name: its members and its name show the username.
    const room = await http("POST", "/v1/rooms", { users: [{ login: name }] }, sid);
    expect(room.users.map((u: { login: string }) => u.login).sort()).toEqual([el, name].sort());
    expect(JSON.stringify(await http("GET", "/v1/rooms", undefined, sid))).not.toContain(email);
    // 001: the same.
    expect(await rooms.ask({ type: "SEARCH_USER", user: name }, (f) => f.type === "SEARCH_USER")).toEqual({ type: "SEARCH_USER", user: [name] });
    expect(await rooms.ask({ type: "SEARCH_USER", user: `${name}@` }, (f) => f.type === "SEARCH_USER")).toEqual({ type: "SEARCH_USER", user: [] });
    // A 003 account logged in on the rooms door by its email makes a room named by its username.
    const hidden = await Client.connect(all.server.roomsPort as number, { welcome: false });
    expect((await hidden.ask({ type: "REQUEST_LOGIN", login: email, pass: "pw" }, (f) => f.type === "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    expect((await hidden.ask({ type: "CREATE_ROOM", customer: ol }, (f) => f.type === "CREATE_ROOM")).id).toEqual(expect.any(Number));
    const n = await Client.connect(all.port);
    expect((await n.request("auth", { login: ol, pass: "pw" })).status).toBe(0);
    expect(JSON.stringify(await n.request("channellist", { limit: 500 }))).not.toContain(email);
    for (const c of [rooms, hidden, n]) c.close();
  });

  it("a search past 50 hidden logins still finds the users it shows", async () => {
    const p = uniqueName("busy");
    // 50 seed-003 accounts whose emails (their logins) sort before the login looked for.
    for (let i = 0; i < 50; i++) {
      expect((await http("POST", "/create_user", { username: uniqueName("u"), password: "pw", email: `${p}-a${i}@example.com` })).status).toBe("success");
    }
    const rooms = await Client.connect(all.server.roomsPort as number, { welcome: false });
    expect((await rooms.ask({ type: "REQUEST_SIGNUP", login: `${p}-john`, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    expect(await rooms.ask({ type: "SEARCH_USER", user: p }, (f) => f.type === "SEARCH_USER")).toEqual({ type: "SEARCH_USER", user: [`${p}-john`] });
    rooms.close();
  });

  it("e_chat: a name register calls taken logs in, a seed-003 username included", async () => {
    // Logins and nicks are one namespace: /v1/register of a 003 account's username is
    // refused as taken, so /v1/login of it finds that account (its login is its email).
    const c = uniqueName("u");
    expect((await http("POST", "/create_user", { username: c, password: "pw", email: `${c}@example.com` })).status).toBe("success");
    expect(await http("POST", "/v1/register", { login: c, password: "other" })).toEqual({ error: { code: "user_already_exists" } });
    expect(await http("POST", "/v1/login", { login: c, password: "wrong" })).toEqual({ error: { code: "wrong_credentials" } });
    const sid = (await http("POST", "/v1/login", { login: c, password: "pw" })).session_id as string;
    expect(sid).toEqual(expect.any(String));
    expect((await http("GET", "/v1/info", undefined, sid)).login).toBe(`${c}@example.com`);
    expect(await http("POST", "/v1/login", { login: uniqueName("u"), password: "pw" })).toEqual({ error: { code: "user_not_found" } });
  });

  it("an account made on any of the five doors logs in on all five", async () => {
    const made: { login: string; email: string }[] = [];
    const n0 = uniqueName("a");
    made.push({ login: (await registerUser(all.port, n0, "pw")).login, email: `${n0}@example.com` });
    const r0 = uniqueName("a");
    const rust = await Client.connect(all.server.rustPort as number, { welcome: false });
    expect((await rust.ask({ action: "registration", login: r0, password: "pw" }, (f) => f.action === "registration")).code).toBe(200);
    made.push({ login: r0, email: `${r0}@example.com` });
    const o0 = uniqueName("a");
    const rooms = await Client.connect(all.server.roomsPort as number, { welcome: false });
    expect((await rooms.ask({ type: "REQUEST_SIGNUP", login: o0, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    made.push({ login: o0, email: `${o0}@example.com` });
    const e0 = uniqueName("a");
    expect((await http("POST", "/v1/register", { login: e0, password: "pw" })).session_id).toEqual(expect.any(String));
    made.push({ login: e0, email: `${e0}@example.com` });
    const c0 = uniqueName("a");
    expect((await http("POST", "/create_user", { username: c0, password: "pw", email: `${c0}@example.com` })).status).toBe("success");
    made.push({ login: `${c0}@example.com`, email: `${c0}@example.com` });
    for (const c of [rust, rooms]) c.close();

    for (const { login, email } of made) {
      const n = await Client.connect(all.port);
      expect((await n.request("auth", { login, pass: "pw" })).status).toBe(0);
      // The HTTP/WS chat finds an account by its profile email: set it where the door that made it did not.
      const set = await n.request("setuserinfo", { email });
      expect([0, 1]).toContain(set.status);
      n.close();
      const rr = await Client.connect(all.server.rustPort as number, { welcome: false });
      expect((await rr.ask({ action: "authentication", login, password: "pw" }, (f) => f.action === "authentication")).code).toBe(200);
      const oo = await Client.connect(all.server.roomsPort as number, { welcome: false });
      expect((await oo.ask({ type: "REQUEST_LOGIN", login, pass: "pw" }, (f) => f.type === "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
      expect((await http("POST", "/v1/login", { login, password: "pw" })).session_id).toEqual(expect.any(String));
      expect(await http("POST", "/login", { email, password: "pw" })).toMatchObject({ status: "success" });
      for (const c of [rr, oo]) c.close();
    }
  });
});
