// The native protocol over WebSocket (/wirechat on the HTTP port), through the `ws`
// package against a running server: one frame per text message, native clients on
// TCP in the same conversations, the framing limits, the caps, idle timeouts and
// shutdown.

import { describe, expect, it } from "vitest";
import { Client, registerUser, removeDir, serveForFile, startTestServer, uniqueName, WsClient } from "./helpers.js";
import { sleep, waitFor } from "./pipeline-helpers.js";

const open = serveForFile({ httpPort: 0, maxFrame: 256 * 1024, maxDepth: 8, outboundCap: 256 * 1024 });
const capped = serveForFile({ httpPort: 0, maxPerAddress: 2 });
const idle = serveForFile({ httpPort: 0, idleUnauth: 1 });
const quiet = serveForFile({ httpPort: 0, idleAuth: 2 });
const banning = serveForFile({ httpPort: 0 });
const full = serveForFile({ httpPort: 0, maxConnections: 2 });

async function native(port: number): Promise<WsClient> {
  const ws = await WsClient.connect(port, "/wirechat");
  expect((await ws.next()).action).toBe("welcome");
  return ws;
}

/** Sends a request and returns its reply's data. */
async function request(ws: WsClient, action: string, data: Record<string, unknown> = {}): Promise<any> {
  ws.send({ action, data });
  return (await ws.next((m) => m.action === action)).data;
}

/** A WebSocket registered as a new account: the auth frame's data. */
async function wsUser(port: number) {
  const ws = await native(port);
  const login = uniqueName("w");
  expect((await request(ws, "register", { login, pass: "secret", nick: login })).status).toBe(0);
  const auth = (await ws.next((m) => m.action === "auth")).data;
  return { ws, login, uid: auth.uid as string };
}

describe("native protocol over WebSocket", () => {
  it("a WebSocket cut off with frames still buffered in the server confirms none of them (they were never sent)", async () => {
    const server = await startTestServer({ httpPort: 0, outboundCap: 64 * 1024 * 1024 });
    try {
      const sockets = (server.http as NonNullable<typeof server.http>).websockets;
      // No slack: a frame counts as read once handed to the OS, so the only frames this
      // test can see confirmed wrongly are those the server never handed over.
      (sockets as unknown as { slack: number }).slack = 0;
      const router = server.services.router;
      const confirmed: number[] = [];
      const confirm = router.confirmed.bind(router);
      router.confirmed = (s, seq) => {
        confirmed.push(seq);
        confirm(s, seq);
      };
      const a = await registerUser(server.port);
      const b = await wsUser(server.httpPort as number);
      (b.ws.ws as unknown as { _socket: { pause(): void } })._socket.pause();
      for (let i = 0; i < 150; i++) a.client.send("message", { uid: b.uid, body: `${i} ${"x".repeat(60_000)}` });
      for (let i = 0; i < 150; i++) expect((await a.client.reply("message", 20_000)).data.status).toBe(0);
      // Stalled: the kernel's buffers are full and the rest waits in the server's socket.
      const peer = [...sockets.connections.keys()][0] as unknown as { ws: { bufferedAmount: number } };
      await waitFor(() => peer.ws.bufferedAmount > 1024 * 1024, 10_000, "frames buffered in the server");
      let last = -1;
      await waitFor(() => {
        const settled = confirmed.length === last;
        last = confirmed.length;
        return settled;
      }, 10_000, "confirmations to settle");
      const before = Math.max(0, ...confirmed);
      b.ws.close(); // cut off: the server's socket is reset with its writes still buffered
      await waitFor(() => sockets.connections.size === 0, 10_000, "the server to see the reset");
      await sleep(200);
      expect(Math.max(0, ...confirmed)).toBe(before);
      a.client.close();
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("stats counts every door's open connections, WebSockets included", async () => {
    const server = await startTestServer({ httpPort: 0, stats: 1 });
    try {
      const { ws } = await wsUser(server.httpPort as number);
      const stats = await request(ws, "stats");
      expect(stats.status).toBe(0);
      expect(stats.connections).toBe(1); // itself, a WebSocket
      const tcp = await registerUser(server.port);
      expect((await tcp.client.request("stats")).connections).toBe(2);
      tcp.client.close();
      ws.ws.close();
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("the welcome frame comes first, and every frame is one text message without the line terminator", async () => {
    const ws = await native(open.server.httpPort as number);
    expect(ws.texts[0].endsWith("}")).toBe(true);
    const hello = await request(ws, "hello");
    expect(hello).toMatchObject({ status: 0, server: "wirechat" });
    expect(ws.texts.every((t) => !t.endsWith("\n"))).toBe(true);
    // Asked for permessage-deflate (as ws's client and browsers do), the server takes none.
    expect(ws.ws.extensions).toBe("");
    ws.close();
  });

  it("register, auth, and direct messages to a TCP client and back", async () => {
    const port = open.server.httpPort as number;
    const { ws, login, uid } = await wsUser(port);
    const tcp = await registerUser(open.port);
    const sent = await request(ws, "message", { uid: tcp.uid, body: "over websocket" });
    expect(sent.status).toBe(0);
    expect(await tcp.client.event("ev_message")).toMatchObject({ mid: sent.mid, from: uid, nick: login, body: "over websocket" });
    await tcp.client.request("message", { uid, body: "over tcp" });
    expect((await ws.next((m) => m.action === "ev_message" && m.data.from === tcp.uid)).data).toMatchObject({ body: "over tcp" });
    ws.close();
    // The same account logs in again over WebSocket, and its inbox syncs.
    await tcp.client.request("message", { uid, body: "while away" });
    const again = await native(port);
    expect((await request(again, "auth", { login, pass: "secret" })).status).toBe(0);
    expect((await again.next((m) => m.action === "ev_message" && m.data.body === "while away")).data.from).toBe(tcp.uid);
    again.close();
    tcp.client.close();
  });

  it("errors: bad JSON, a binary message, too deep, before auth, unknown action; the socket stays", async () => {
    const ws = await native(open.server.httpPort as number);
    ws.send('{"action":"ping", oops}');
    expect(await ws.next()).toEqual({ action: "ping", data: { status: 3, error: "frame is not valid JSON" } });
    ws.send(Buffer.from('{"action":"ping"}'));
    expect((await ws.next()).data).toEqual({ status: 3, error: "binary messages are not read: send each frame as one text message" });
    ws.send({ action: "ping", data: { a: [[[[[[[[1]]]]]]]] } });
    expect(await ws.next()).toEqual({ action: "ping", data: { status: 3, error: "nesting deeper than 8" } });
    expect((await request(ws, "contactlist")).status).toBe(6);
    expect((await request(ws, "frobnicate")).status).toBe(11);
    // Two frames in one message are not one JSON text.
    ws.send('{"action":"ping"}\n{"action":"ping"}');
    expect((await ws.next()).data.status).toBe(3);
    expect((await request(ws, "ping")).status).toBe(0);
    // A UTF-8 BOM before the frame is skipped, as on TCP (it was "not valid JSON").
    ws.send('\uFEFF{"action":"ping"}');
    expect(await ws.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    ws.close();
  });

  it("a message over --max-frame closes the socket with 1009; the server stays up", async () => {
    const port = open.server.httpPort as number;
    const ws = await native(port);
    ws.send({ action: "ping", data: { pad: "x".repeat(300 * 1024) } });
    expect((await ws.closed).code).toBe(1009);
    const again = await native(port);
    expect((await request(again, "ping")).status).toBe(0);
    again.close();
  });

  it("attachments: sent inline (within --max-frame), received whole as one message", async () => {
    const port = open.server.httpPort as number;
    const a = await wsUser(port);
    const b = await wsUser(port);
    const data = Buffer.alloc(12_000, 7).toString("base64");
    const sent = await request(a.ws, "message", { uid: b.uid, body: "file", attach: { mime: "application/octet-stream", data } });
    expect(sent.status).toBe(0);
    const ev = (await b.ws.next((m) => m.action === "ev_message")).data;
    expect(ev.attach).toEqual({ mime: "application/octet-stream", data });
    a.ws.close();
    b.ws.close();
  });

  it("a frame larger than --outbound-cap goes out as one message in fragments, live and in the sync after a login", async () => {
    const port = open.server.httpPort as number;
    const w = await wsUser(port);
    const tcp = await registerUser(open.port);
    // ~300 KiB of base64 (the cap is 256 KiB): streamed from the blob store a piece at a time.
    const data = Buffer.alloc(230 * 1024, 1).toString("base64");
    const big = (body: string) => JSON.stringify({ action: "message", data: { uid: w.uid, body, attach: { mime: "application/octet-stream", data } } }) + "\n";
    tcp.client.write(big("live"));
    expect((await tcp.client.reply("message")).data.status).toBe(0);
    const live = await w.ws.next((m) => m.action === "ev_message" && m.data.body === "live");
    expect(live.data.attach).toEqual({ mime: "application/octet-stream", data });
    expect((await request(w.ws, "ping")).status).toBe(0);
    // Stored while the user is away: the sync after the next login sends it (it used to close the socket at every login).
    w.ws.ws.close();
    await w.ws.closed;
    tcp.client.write(big("offline"));
    expect((await tcp.client.reply("message")).data.status).toBe(0);
    const again = await native(port);
    expect((await request(again, "auth", { login: w.login, pass: "secret" })).status).toBe(0);
    const synced = await again.next((m) => m.action === "ev_message" && m.data.body === "offline");
    expect(synced.data.attach.data).toBe(data);
    expect((await request(again, "ping")).status).toBe(0);
    expect(again.isClosed).toBe(false);
    again.ws.close();
    tcp.client.close();
  });

  it("WebSockets count against --max-per-address until they log in; a refused one gets status 13 and 1013", async () => {
    const port = capped.server.httpPort as number;
    const a = await native(port);
    const b = await native(port);
    const refused = await WsClient.connect(port, "/wirechat");
    expect((await refused.next()).data).toMatchObject({ status: 13 });
    expect((await refused.closed).code).toBe(1013);
    // A logged-in socket no longer counts against its address.
    expect((await request(a, "register", { login: uniqueName("w"), pass: "secret", nick: uniqueName("n") })).status).toBe(0);
    const c = await native(port);
    for (const x of [a, b, c]) x.close();
  });

  it("WebSockets and TCP connections count together against --max-connections", async () => {
    const tcp = await Client.connect(full.server.port);
    const ws = await native(full.server.httpPort as number);
    // Two held, one of each door: a third is refused whichever door it comes through.
    const refusedWs = await WsClient.connect(full.server.httpPort as number, "/wirechat");
    expect((await refusedWs.next()).data).toMatchObject({ status: 16 });
    expect((await refusedWs.closed).code).toBe(1013);
    const refusedTcp = await Client.connect(full.server.port, { welcome: false });
    expect((await refusedTcp.next()).data).toMatchObject({ status: 16 });
    await refusedTcp.closed;
    // A slot freed on one door is taken on the other.
    tcp.close();
    await tcp.closed;
    let again: WsClient | undefined;
    for (let i = 0; i < 50 && again === undefined; i++) {
      const w = await native(full.server.httpPort as number).catch(() => undefined);
      if (w && !w.isClosed) again = w;
      else await new Promise((r) => setTimeout(r, 50));
    }
    expect(again, "a WebSocket once the TCP connection closed").toBeDefined();
    expect((await request(again as WsClient, "ping")).status).toBe(0);
    again?.ws.close();
    ws.close();
  });

  it("an idle socket gets ev_close and is closed", async () => {
    const ws = await native(idle.server.httpPort as number);
    expect((await ws.next((m) => m.action === "ev_close", 5000)).data.reason).toMatch(/idle timeout/);
    expect((await ws.closed).code).toBe(1000);
  });

  it("a logged-in socket that only listens is pinged and stays while it answers; one that does not answer is closed", async () => {
    const port = quiet.server.httpPort as number;
    const listening = await wsUser(port);
    const deaf = await WsClient.connect(port, "/wirechat", { autoPong: false });
    expect((await deaf.next()).action).toBe("welcome");
    const login = uniqueName("deaf");
    expect((await request(deaf, "register", { login, pass: "secret", nick: login })).status).toBe(0);
    let pings = 0;
    listening.ws.ws.on("ping", () => pings++);
    await sleep(5000);
    expect(pings).toBeGreaterThan(0);
    expect(listening.ws.isClosed).toBe(false);
    expect((await request(listening.ws, "ping")).status).toBe(0);
    expect(deaf.isClosed).toBe(true);
    expect(deaf.messages.find((m) => m.action === "ev_close")?.data.reason).toMatch(/idle timeout/);
    listening.ws.ws.close();
  }, 15_000);

  it("an address ban closes its WebSockets (ev_close) and refuses new ones with status 15 and 1008", async () => {
    const port = banning.server.httpPort as number;
    const admin = (path: string, body: unknown) =>
      fetch(`http://127.0.0.1:${banning.server.adminPort}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    const ws = await native(port);
    expect((await admin("/ban", { address: "127.0.0.1", reason: "abuse" })).status).toBe(200);
    expect((await ws.next((m) => m.action === "ev_close")).data).toEqual({ reason: "your address was banned: abuse" });
    expect((await ws.closed).code).toBe(1000);
    const refused = await WsClient.connect(port, "/wirechat");
    expect((await refused.next()).data).toEqual({ status: 15, error: "your address is banned: abuse" });
    expect((await refused.closed).code).toBe(1008);
    // The HTTP/WS chat's routes refuse it too, in their shape.
    const login = await fetch(`http://127.0.0.1:${port}/login`, { method: "POST", headers: { "content-type": "application/json" }, body: '{"email":"a@b.c","password":"x"}' });
    expect(login.status).toBe(403);
    expect(await login.json()).toEqual({ status: "error", message: "your address is banned: abuse" });
    // So does a plain GET of /wirechat, in the native shape (it was answered 426).
    const plain = await fetch(`http://127.0.0.1:${port}/wirechat`);
    expect(plain.status).toBe(403);
    expect(await plain.json()).toEqual({ action: "unknown", data: { status: 15, error: "your address is banned: abuse" } });
    expect((await admin("/unban", { address: "127.0.0.1" })).status).toBe(200);
    expect((await fetch(`http://127.0.0.1:${port}/wirechat`)).status).toBe(426);
    (await native(port)).close();
  });

  it("stopping the server closes its WebSockets (1000) and its HTTP port", async () => {
    const server = await startTestServer({ httpPort: 0 });
    const port = server.httpPort as number;
    const ws = await native(port);
    const tcp = await Client.connect(server.port);
    await server.stop();
    expect((await ws.closed).code).toBe(1000);
    await expect(fetch(`http://127.0.0.1:${port}/status`)).rejects.toThrow();
    tcp.close();
    removeDir(server.services.config.dataDir);
  });
});
