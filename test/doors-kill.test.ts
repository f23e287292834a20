// kill -9 under load on the seed doors and the native protocol over WebSocket: every
// message a door acknowledged (000's send_message 200, 001's SND_MSG OK, the native
// reply's status 0; on the seed WebSocket doors, whose APIs have no acknowledgement,
// the echo to the sender) is there after the restart.

import { describe, expect, it } from "vitest";
import { ChildServer, Client, uniqueName, useTempDirs, WsClient } from "./helpers.js";

const newDataDir = useTempDirs();

function portOf(child: ChildServer, key: string): number {
  const m = new RegExp(`"${key}":(\\d+)[^\\n]*"msg":"wirechat listening"`).exec(child.stdout());
  if (!m) throw new Error(`no ${key} in the listening line`);
  return Number(m[1]);
}


describe("seed doors: kill -9", () => {
  it("loses no message acknowledged on the rust_messages or rooms door", async () => {
    const dataDir = newDataDir();
    const flags = ["--rust-port", "0", "--rooms-port", "0"];
    let child = await ChildServer.start(dataDir, flags);
    const rust = await Client.connect(portOf(child, "rustPort"), { welcome: false });
    const rooms = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    const rl = uniqueName("k");
    const a = uniqueName("k");
    const b = uniqueName("k");
    expect((await rust.ask({ action: "registration", login: rl, password: "p" }, (f) => f.action === "registration")).code).toBe(200);
    expect((await rooms.ask({ type: "REQUEST_SIGNUP", login: a, pass: "p" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const other = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    expect((await other.ask({ type: "REQUEST_SIGNUP", login: b, pass: "p" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const room = (await rooms.ask({ type: "CREATE_ROOM", username: a, customer: b }, (f) => f.type === "CREATE_ROOM")).id as number;

    // Both doors send without waiting; the server is killed while messages are in flight.
    const N = 400;
    for (let i = 0; i < N; i++) {
      rust.write(JSON.stringify({ action: "send_message", text: `r${i}`, timestamp: 1 }) + "\n");
      rooms.write(JSON.stringify({ type: "SND_MSG", username: a, room_id: room, message: `o${i}`, msg_type: "TEXT" }) + "\n");
    }
    // Answers come in order on each connection: k OKs acknowledge the first k messages.
    const count = () => ({
      rust: rust.frames.filter((f) => f.action === "send_message" && f.code === 200).length,
      rooms: rooms.frames.filter((f) => f.type === "SND_MSG" && f.status === "OK").length,
    });
    const killAfter = 50;
    while (count().rust < killAfter || count().rooms < killAfter) await new Promise((r) => setTimeout(r, 2));
    child.proc.kill("SIGKILL");
    await child.exited;
    // What arrived before the sockets closed counts too.
    await Promise.all([rust.closed, rooms.closed]);
    const done = count();
    const acked = {
      rust: Array.from({ length: done.rust }, (_, i) => `r${i}`),
      rooms: Array.from({ length: done.rooms }, (_, i) => `o${i}`),
    };

    child = await ChildServer.start(dataDir, flags);
    const r2 = await Client.connect(portOf(child, "rustPort"), { welcome: false });
    expect((await r2.ask({ action: "authentication", login: rl, password: "p" }, (f) => f.action === "authentication")).code).toBe(200);
    const got = await r2.ask({ action: "get_messages", number_of_messages: 500 }, (f) => f.action === "get_messages");
    const texts = new Set(got.messages.map((m: { text: string }) => m.text));
    for (const t of acked.rust) expect(texts.has(t)).toBe(true);

    const o2 = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    expect((await o2.ask({ type: "REQUEST_LOGIN", login: a, pass: "p" }, (f) => f.type === "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
    o2.write(JSON.stringify({ type: "READ_MSG", read: "ALL", room_id: room }) + "\n");
    const seen = new Set<string>();
    for (;;) {
      try {
        seen.add((await o2.next((f) => f.type === "READ_MSG", 1000)).message);
      } catch {
        break;
      }
    }
    for (const t of acked.rooms) expect(seen.has(t)).toBe(true);
    expect(acked.rust.length).toBeGreaterThanOrEqual(killAfter);
    expect(acked.rooms.length).toBeGreaterThanOrEqual(killAfter);
    child.proc.kill("SIGTERM");
    await child.exited;
  }, 60_000);
});

describe("HTTP doors: kill -9", () => {
  it("loses no message the e_chat_server room socket or the HTTP/WS chat echoed back to its sender", async () => {
    const dataDir = newDataDir();
    const flags = ["--http-port", "0"];
    let child = await ChildServer.start(dataDir, flags);
    const hp = () => portOf(child, "httpPort");
    const http = async (method: string, path: string, body?: unknown, sid?: string) => {
      const headers: Record<string, string> = { "content-type": "application/json" };
      if (sid) headers.authorization = `Bearer ${sid}`;
      const res = await fetch(`http://127.0.0.1:${hp()}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      return (await res.json()) as any;
    };
    const a = uniqueName("k");
    const b = uniqueName("k");
    const sid = (await http("POST", "/v1/register", { login: a, password: "p" })).session_id;
    await http("POST", "/v1/register", { login: b, password: "p" });
    const bId = (await http("GET", `/v1/users/?q=${b}`, undefined, sid))[0].id;
    const room = (await http("POST", "/v1/rooms", { users: [{ id: bId }] }, sid)).id;
    const email = `${uniqueName("k")}@example.com`;
    expect((await http("POST", "/create_user", { username: uniqueName("k"), password: "p", email })).status).toBe("success");

    const ws2 = await WsClient.connect(hp(), `/v1/rooms/${room}/chat?session_id=${sid}`);
    const ws3 = await WsClient.connect(hp(), "/ws");
    ws3.send({ type: "auth", email, password: "p" });
    await ws3.next((m) => m.status === "authenticated");
    await new Promise((r) => setTimeout(r, 100));
    // A message is in the room (on disk) once its echo comes back: the echo is the acknowledgement.
    for (let i = 0; i < 300; i++) {
      ws2.send({ text: `e${i}` });
      ws3.send({ type: "chat", content: `c${i}` });
    }
    const echoed = () => ({
      e: ws2.messages.filter((m) => typeof m.text === "string").length,
      c: ws3.messages.filter((m) => m.status === "message" && m.message).length,
    });
    while (echoed().e < 30 || echoed().c < 30) await new Promise((r) => setTimeout(r, 2));
    child.proc.kill("SIGKILL");
    await child.exited;
    await Promise.all([ws2.closed, ws3.closed]);
    const e = ws2.messages.filter((m) => typeof m.text === "string").map((m) => m.text as string);
    const c = ws3.messages.filter((m) => m.status === "message" && m.message).map((m) => m.message.content as string);

    child = await ChildServer.start(dataDir, flags);
    const stored = (await http("GET", `/v1/rooms/${room}/messages`, undefined, sid)).map((m: { text: string }) => m.text);
    for (const t of e) expect(stored).toContain(t);
    const n = await Client.connect(child.port);
    expect((await n.request("auth", { login: email, pass: "p" })).status).toBe(0);
    const lobby = (await n.request("channellist", { limit: 500 })).channels.find((ch: { name: string }) => ch.name === "lobby").chid;
    n.send("history", { channel: lobby, limit: 500 });
    const hist = (await n.reply("history")).data.messages.map((m: { body: string }) => m.body);
    for (const t of c) expect(hist).toContain(t);
    expect(e.length).toBeGreaterThanOrEqual(30);
    expect(c.length).toBeGreaterThanOrEqual(30);
    n.close();
    child.proc.kill("SIGTERM");
    await child.exited;
  }, 60_000);
});

describe("native protocol over WebSocket: kill -9", () => {
  it("loses no message a /wirechat socket was answered status 0 for, direct or in a channel", async () => {
    const dataDir = newDataDir();
    const flags = ["--http-port", "0"];
    let child = await ChildServer.start(dataDir, flags);
    const ws = await WsClient.connect(portOf(child, "httpPort"), "/wirechat");
    expect((await ws.next()).action).toBe("welcome");
    const request = async (action: string, data: Record<string, unknown>) => {
      ws.send({ action, data });
      return (await ws.next((m) => m.action === action)).data;
    };
    const me = uniqueName("k");
    expect((await request("register", { login: me, pass: "p", nick: me })).status).toBe(0);
    await ws.next((m) => m.action === "auth");
    const peer = await Client.connect(child.port);
    const them = uniqueName("k");
    expect((await peer.request("register", { login: them, pass: "p", nick: them })).status).toBe(0);
    const uid = (await peer.reply("auth")).data.uid as string;
    peer.close();
    const chid = (await request("createchannel", { name: uniqueName("kc") })).chid as string;

    // Sent without waiting, alternately to the peer and to the channel; killed while in flight.
    const N = 4000;
    for (let i = 0; i < N; i++) ws.send({ action: "message", data: i % 2 === 0 ? { uid, body: `d${i}` } : { channel: chid, body: `c${i}` } });
    // Replies come in order: k answered status 0 acknowledge the first k messages.
    const acked = () => ws.messages.filter((m) => m.action === "message" && m.data?.status === 0).length;
    while (acked() < 60) await new Promise((r) => setTimeout(r, 2));
    child.proc.kill("SIGKILL");
    await child.exited;
    await ws.closed;
    const k = acked();
    expect(ws.messages.filter((m) => m.action === "message" && m.data?.status !== 0)).toEqual([]);
    const sent = Array.from({ length: k }, (_, i) => (i % 2 === 0 ? `d${i}` : `c${i}`));

    child = await ChildServer.start(dataDir, flags);
    const c = await Client.connect(child.port);
    expect((await c.request("auth", { login: me, pass: "p" })).status).toBe(0);
    // Every page of a conversation's history, newest first (500 at most a page).
    const bodies = async (where: Record<string, string>) => {
      const all = new Set<string>();
      let before: string | undefined;
      for (;;) {
        c.send("history", { ...where, limit: 500, ...(before === undefined ? {} : { before }) });
        const page = (await c.reply("history")).data.messages as { mid: string; body: string }[];
        for (const m of page) all.add(m.body);
        if (page.length < 500) return all;
        before = page.reduce((min, m) => (BigInt(m.mid) < BigInt(min) ? m.mid : min), page[0].mid);
      }
    };
    const direct = await bodies({ uid });
    const inChannel = await bodies({ channel: chid });
    for (const t of sent) expect(t.startsWith("d") ? direct.has(t) : inChannel.has(t), t).toBe(true);
    c.close();
    child.proc.kill("SIGTERM");
    await child.exited;
  }, 60_000);
});
