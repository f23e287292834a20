// Cluster mode with the seed doors: two nodes, each with the rust_messages (000),
// rooms-API (001) and HTTP/WS chat (003) doors on, sharing one nats-server. The
// server's own room is created once for the cluster; a conversation spans doors and
// nodes; a 003 socket's join and leave notices reach 003 sockets on the other node;
// a 002 session made on one node is good on the other at once.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NatsServer } from "../scripts/nats-server.js";
import type { RunningServer } from "../src/server.js";
import { Client, registerUser, removeDir, seedDoorClients, startTestServer, uniqueName, WsClient } from "./helpers.js";

const ROOM = "commons";
let nats: NatsServer;
const nodes: RunningServer[] = [];

beforeAll(async () => {
  nats = await NatsServer.start();
  const stream = `WIRECHAT_D${process.pid}`;
  // Both at once: the room is contested, and created once.
  nodes.push(
    ...(await Promise.all(
      [0, 1].map((i) => startTestServer({ nats: nats.url, natsStream: stream, nodeId: `d${i}`, rustPort: 0, roomsPort: 0, httpPort: 0, rustRoom: ROOM, lobby: ROOM })),
    )),
  );
}, 60_000);

afterAll(async () => {
  for (const n of nodes) {
    await n.stop();
    removeDir(n.services.config.dataDir);
  }
  await nats?.stop();
});



async function post(node: RunningServer, path: string, body: unknown): Promise<any> {
  const res = await fetch(`http://127.0.0.1:${node.httpPort}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { status: res.status, body: await res.json() };
}

/** A 003 account made through `node`, and a /ws socket of it logged in through `at`. */
async function chatter(node: RunningServer, at: RunningServer): Promise<{ ws: WsClient; username: string }> {
  const name = uniqueName("c3");
  const person = { username: `${name} Doe`, email: `${name}@example.com`, password: "pw-secret" };
  expect(await post(node, "/create_user", person)).toEqual({ status: 200, body: { status: "success", message: "User created" } });
  const ws = await WsClient.connect(at.httpPort as number, "/ws");
  ws.send({ type: "auth", email: person.email, password: person.password });
  expect(await ws.next()).toEqual({ status: "authenticated", message: null, info: `Welcome, ${person.username}!` });
  return { ws, username: person.username };
}

describe("cluster mode with the seed doors", () => {
  it("the server's room is one channel for the cluster, however many nodes started at once", async () => {
    const lists = await Promise.all(
      nodes.map(async (n) => {
        const a = await registerUser(n.port);
        const { channels } = await a.client.request("channellist", { limit: 500 });
        a.client.close();
        return channels.filter((c: { name: string }) => c.name === ROOM);
      }),
    );
    expect(lists[0]).toHaveLength(1);
    expect(lists[1]).toEqual([{ ...lists[0][0], online: expect.any(Number) }]);
  });

  it("the same pair's CREATE_ROOMs on two nodes at the same moment answer one room, and leave one", async () => {
    const [a, b] = nodes;
    const signup = async (port: number) => {
      const c = await Client.connect(port, { welcome: false });
      const login = uniqueName("pair");
      expect((await c.ask({ type: "REQUEST_SIGNUP", login, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
      return { c, login };
    };
    // Several pairs at once: each pair's two requests race on the two nodes.
    const pairs = await Promise.all([0, 1, 2, 3].map(async () => ({ x: await signup(a.roomsPort as number), y: await signup(b.roomsPort as number) })));
    const answers = await Promise.all(
      pairs.map(({ x, y }) =>
        Promise.all([
          x.c.ask({ type: "CREATE_ROOM", customer: y.login }, (f) => f.type === "CREATE_ROOM"),
          y.c.ask({ type: "CREATE_ROOM", customer: x.login }, (f) => f.type === "CREATE_ROOM"),
        ]),
      ),
    );
    for (const [rx, ry] of answers) {
      expect(rx).toMatchObject({ type: "CREATE_ROOM", id: expect.any(Number) });
      expect(ry.id).toBe(rx.id);
    }
    // One room of the two is left, on both nodes (the other node may apply the delete a moment later).
    for (const [i, { x }] of pairs.entries()) {
      for (const node of nodes) {
        const native = await Client.connect(node.port);
        expect((await native.request("auth", { login: x.login, pass: "pw" })).status).toBe(0);
        let mine: { chid: string }[] = [];
        for (let tries = 0; tries < 50; tries++) {
          const { channels } = await native.request("channellist", { limit: 500 });
          mine = channels.filter((ch: { name: string }) => ch.name.includes(x.login));
          if (mine.length === 1) break;
          await new Promise((r) => setTimeout(r, 100));
        }
        expect(mine.map((ch) => ch.chid)).toEqual([String(answers[i][0].id)]);
        native.close();
      }
    }
    for (const { x, y } of pairs) {
      x.c.close();
      y.c.close();
    }
  });

  it("a conversation across doors and nodes: 000 on one node, 001 and native on the other", async () => {
    const [a, b] = nodes;
    const native = await registerUser(b.port);
    const chid = (await native.client.request("channellist", { limit: 500 })).channels.find((c: { name: string }) => c.name === ROOM).chid;
    expect((await native.client.request("enter", { channel: chid })).status).toBe(0);
    const { rust, rl, rooms, ol } = await seedDoorClients({ rust: a.rustPort as number, rooms: b.roomsPort as number, native: a.port }, chid);

    const n1 = await native.client.request("message", { channel: chid, body: "from native" });
    expect(n1.status).toBe(0);
    expect(await rust.next((f) => f.action === "get_message" && f.text === "from native", 10_000)).toMatchObject({ author: native.nick });
    expect(await rooms.next((f) => f.type === "READ_MSG" && f.message === "from native", 10_000)).toMatchObject({ room_id: Number(chid), message_id: Number(n1.mid) });
    expect((await rust.ask({ action: "send_message", text: "from rust", timestamp: 1 }, (f) => f.action === "send_message")).code).toBe(200);
    const r1 = await native.client.event("ev_message", (d) => d.body === "from rust", 10_000);
    expect(r1).toMatchObject({ chid, nick: rl });
    expect(await rooms.next((f) => f.type === "READ_MSG" && f.message === "from rust", 10_000)).toMatchObject({ sender: rl, message_id: Number(r1.mid) });
    const o1 = await rooms.ask({ type: "SND_MSG", username: ol, room_id: Number(chid), message: "from rooms", msg_type: "TEXT" }, (f) => f.type === "SND_MSG");
    expect(o1.status).toBe("OK");
    expect(await rust.next((f) => f.action === "get_message" && f.text === "from rooms", 10_000)).toMatchObject({ author: ol });
    // The room's history is the same through the other node's 000 door.
    const rust2 = await Client.connect(b.rustPort as number, { welcome: false });
    expect((await rust2.ask({ action: "authentication", login: rl, password: "pw" }, (f) => f.action === "authentication")).code).toBe(200);
    const got = await rust2.ask({ action: "get_messages", number_of_messages: 10 }, (f) => f.action === "get_messages");
    expect(got.messages.map((m: { text: string }) => m.text)).toEqual(["from native", "from rust", "from rooms"]);
    for (const c of [native.client, rust, rooms, rust2]) c.close();
  });

  it("a 002 session made on one node opens a room socket on the other at once", async () => {
    const [a, b] = nodes;
    const el = uniqueName("c2");
    const reg = await post(a, "/v1/register", { login: el, password: "pw" });
    const sid = reg.body.session_id as string;
    expect(sid).toEqual(expect.any(String));
    // Straight to a node that lags behind the log (the test hook): it waits for the log
    // before it says the session is unknown.
    process.env.WIRECHAT_TEST_APPLY_DELAY_MS = "1500";
    let lagging: RunningServer;
    try {
      lagging = await startTestServer({ nats: nats.url, natsStream: nodes[0].services.config.natsStream, nodeId: "lag", httpPort: 0, lobby: ROOM });
    } finally {
      delete process.env.WIRECHAT_TEST_APPLY_DELAY_MS;
    }
    try {
      const again = await post(a, "/v1/login", { login: el, password: "pw" });
      const info = await fetch(`http://127.0.0.1:${lagging.httpPort}/v1/info?session_id=${again.body.session_id}`);
      expect(info.status).toBe(200);
    } finally {
      await lagging.stop();
      removeDir(lagging.services.config.dataDir);
    }
    const n = await Client.connect(b.port);
    expect((await n.request("auth", { login: el, pass: "pw" })).status).toBe(0);
    const chid = (await n.request("channellist", { limit: 500 })).channels.find((c: { name: string }) => c.name === ROOM).chid;
    expect((await n.request("enter", { channel: chid })).status).toBe(0);
    const ws2 = await WsClient.connect(b.httpPort as number, `/v1/rooms/${chid}/chat?session_id=${sid}`);
    await new Promise((r) => setTimeout(r, 100)); // the room socket has logged in
    ws2.send({ text: "hi from 002" });
    expect(await n.event("ev_message", (d) => d.body === "hi from 002", 10_000)).toMatchObject({ chid });
    n.close();
    ws2.close();
  });

  /**
   * A 002 room socket on node b whose login is held once attached (its session read
   * again: attachedStillValid) while another member's message is applied there, and,
   * with `revoke`, the account's password changed through node a; then let go.
   */
  async function roomSocketDuringLogin(revoke: boolean): Promise<WsClient> {
    const [a, b] = nodes;
    const el = uniqueName("c2");
    const reg = await post(b, "/v1/register", { login: el, password: "pw" });
    const sid = reg.body.session_id as string;
    const n = await Client.connect(a.port);
    const authed = await n.request("auth", { login: el, pass: "pw" });
    expect(authed.status).toBe(0);
    const uid = authed.uid as string;
    const chid = (await n.request("channellist", { limit: 500 })).channels.find((c: { name: string }) => c.name === ROOM).chid;
    expect((await n.request("enter", { channel: chid })).status).toBe(0);
    n.close();
    await n.closed;
    await new Promise((r) => setTimeout(r, 300)); // node b has seen uid's only connection go
    const sessions = b.services.sessions as unknown as { get: (sid: string) => Promise<unknown> };
    const get = sessions.get.bind(sessions);
    let reached!: () => void;
    const atRead = new Promise<void>((r) => (reached = r));
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let held = false;
    sessions.get = async (x: string) => {
      if (!held && b.services.router.isHere(uid)) {
        held = true;
        reached();
        await released;
      }
      return get(x);
    };
    try {
      const ws = await WsClient.connect(b.httpPort as number, `/v1/rooms/${chid}/chat?session_id=${sid}`);
      await atRead;
      const other = await registerUser(a.port);
      expect((await other.client.request("enter", { channel: chid })).status).toBe(0);
      expect((await other.client.request("message", { channel: chid, body: "while logging in" })).status).toBe(0);
      if (revoke) {
        const again = await Client.connect(a.port);
        expect((await again.request("auth", { login: el, pass: "pw" })).status).toBe(0);
        expect((await again.request("changepassword", { pass: "pw", newpass: "pw2" })).status).toBe(0);
        again.close();
      }
      await new Promise((r) => setTimeout(r, 500)); // applied on node b meanwhile
      release();
      other.client.close();
      return ws;
    } finally {
      delete (sessions as { get?: unknown }).get;
      release();
    }
  }

  it("a room socket gets the messages sent while its login re-reads the session (cluster mode)", async () => {
    const ws = await roomSocketDuringLogin(false);
    expect(await ws.next((m) => m.text === "while logging in", 10_000)).toMatchObject({ text: "while logging in" });
    ws.close();
  });

  it("a room socket whose session is revoked while its login re-reads it is sent none of the room's messages", async () => {
    const ws = await roomSocketDuringLogin(true);
    expect(await ws.next((m) => m.error !== undefined, 10_000)).toMatchObject({ error: { code: "unauthorized" } });
    await new Promise((r) => setTimeout(r, 300));
    expect(ws.texts.filter((t) => t.includes("while logging in"))).toEqual([]);
    ws.close();
  });

  it("a door's lookups on a node behind the log wait for it: a room made on the other node a moment ago is found", async () => {
    const [a] = nodes;
    process.env.WIRECHAT_TEST_APPLY_DELAY_MS = "1500";
    let lagging: RunningServer;
    try {
      lagging = await startTestServer({ nats: nats.url, natsStream: a.services.config.natsStream, nodeId: "lag2", rustPort: 0, httpPort: 0, rustRoom: ROOM, lobby: ROOM });
    } finally {
      delete process.env.WIRECHAT_TEST_APPLY_DELAY_MS;
    }
    try {
      // 000: logged in on both nodes, a room made through one and deleted through the other.
      const rl = uniqueName("rl");
      const here = await Client.connect(a.rustPort as number, { welcome: false });
      expect((await here.ask({ action: "registration", login: rl, password: "pw" }, (f) => f.action === "registration")).code).toBe(200);
      const there = await Client.connect(lagging.rustPort as number, { welcome: false });
      expect((await there.ask({ action: "authentication", login: rl, password: "pw" }, (f) => f.action === "authentication")).code).toBe(200);
      const room = uniqueName("lagroom");
      expect((await here.ask({ action: "create_room", name: room }, (f) => f.action === "create_room")).code).toBe(200);
      // Before, the lagging node answered 400 "no room named …".
      expect((await there.ask({ action: "delete_room", name: room }, (f) => f.action === "delete_room")).code).toBe(200);
      // 002: a room made through one node is read through the other at once.
      const el = uniqueName("el");
      const sid = (await post(a, "/v1/register", { login: el, password: "pw" })).body.session_id as string;
      const auth = { authorization: `Bearer ${sid}` };
      expect((await fetch(`http://127.0.0.1:${lagging.httpPort}/v1/info`, { headers: auth })).status).toBe(200);
      const made = await fetch(`http://127.0.0.1:${a.httpPort}/v1/rooms`, { method: "POST", headers: { ...auth, "content-type": "application/json" }, body: JSON.stringify({ users: [] }) });
      const id = ((await made.json()) as { id: number }).id;
      // The list of the caller's rooms through the lagging node has it (before, the
      // session was known there, so nothing waited for the log: the room was missing).
      const listed = (await (await fetch(`http://127.0.0.1:${lagging.httpPort}/v1/rooms`, { headers: auth })).json()) as { id: number }[];
      expect(listed.map((r) => r.id)).toContain(id);
      // Before, 422 room_not_found.
      expect((await fetch(`http://127.0.0.1:${lagging.httpPort}/v1/rooms/${id}`, { headers: auth })).status).toBe(200);
      here.close();
      there.close();
    } finally {
      await lagging.stop();
      removeDir(lagging.services.config.dataDir);
    }
  }, 30_000);

  it("003 join and leave notices reach the sockets on the other node, never their sender", async () => {
    const [a, b] = nodes;
    const alice = await chatter(a, b);
    const bob = await chatter(b, a);
    const carol = await chatter(a, b);
    alice.ws.send({ type: "join" });
    expect(await bob.ws.next()).toEqual({ status: "message", message: null, info: `${alice.username} joined` });
    expect(await carol.ws.next()).toEqual({ status: "message", message: null, info: `${alice.username} joined` });
    alice.ws.send({ type: "leave" });
    expect(await bob.ws.next()).toEqual({ status: "message", message: null, info: `${alice.username} left` });
    bob.ws.send({ type: "chat", content: "still there?" });
    expect(await alice.ws.next((m: any) => m.status === "message" && m.message?.content === "still there?")).toBeTruthy();
    for (const c of [alice.ws, bob.ws, carol.ws]) c.close();
  });
});
