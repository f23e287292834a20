// The admin port over real HTTP: health, readiness, Prometheus metrics that move with
// traffic, /connz, and the operator's actions (kick, ban, delete, registration).

import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { networkInterfaces, tmpdir } from "node:os";
import path from "node:path";
import http from "node:http";
import net from "node:net";
import { once } from "node:events";
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, removeDir, serveForFile, startTestServer, tempDir, uniqueName, WsClient } from "./helpers.js";
import { freePort } from "../scripts/nats-server.js";
import { admin, parseProm, sample } from "./admin-helpers.js";
import { sleep, waitFor, wrapBatchWrite, wrapCalls } from "./pipeline-helpers.js";
import type { BatchOp } from "../src/storage/db.js";
import { exportRecords } from "../src/admin/backup.js";

describe("admin port", () => {
  const served = serveForFile();
  const ap = () => served.server.adminPort as number;

  it("wirechat_bytes_out_total never goes down, also when a slow reader holding unsent output is cut off", async () => {
    const reader = await registerUser(served.server.port);
    const sender = await registerUser(served.server.port);
    const ch = await sender.client.request("createchannel", { name: uniqueName("flood") });
    expect((await reader.client.request("enter", { channel: ch.chid })).status).toBe(0);
    reader.client.socket.pause(); // reads nothing: its channel's events pile up, then it is cut
    const body = "b".repeat(50_000);
    const seen: number[] = [];
    const scrape = async () => seen.push(sample(parseProm((await admin(ap(), "GET", "/metrics")).text).samples, "wirechat_bytes_out_total"));
    // 30 MB: past the kernel's buffers and the 8 MiB cap.
    for (let i = 0; i < 600; i++) {
      expect((await sender.client.request("message", { channel: ch.chid, body })).status).toBe(0);
      if (i % 10 === 0) await scrape();
    }
    reader.client.socket.resume(); // (a paused socket does not see its reset)
    await reader.client.closed;
    await scrape();
    // Counted as handed to the OS, not as passed to the socket: a destroyed socket's
    // unsent buffer left the counter, which then read lower (a reset to Prometheus).
    for (let i = 1; i < seen.length; i++) expect(seen[i], `scrape ${i} of ${seen.length}`).toBeGreaterThanOrEqual(seen[i - 1]);
    sender.client.close();
  }, 60_000);

  it("an export reads one snapshot: a channel made while it runs is in none of its lines", async () => {
    const a = await registerUser(served.server.port);
    expect((await a.client.request("createchannel", { name: uniqueName("before") })).status).toBe(0);
    const lines: any[] = [];
    let made: string | undefined;
    for await (const line of exportRecords(served.server.services.storage, undefined)) {
      const rec = JSON.parse(line);
      lines.push(rec);
      // Past the channels, at the memberships: a new channel and its owner's membership.
      if (made === undefined && rec.type === "membership") {
        made = (await a.client.request("createchannel", { name: uniqueName("during") })).chid;
      }
    }
    expect(made).toBeDefined();
    const channels = new Set(lines.filter((l) => l.type === "channel").map((l) => l.chid));
    // Before, the membership pass read after the write: a membership of a channel the
    // file did not describe.
    for (const m of lines.filter((l) => l.type === "membership")) expect(channels.has(m.chid), `channel ${m.chid} of a membership`).toBe(true);
    expect(lines.some((l) => l.chid === made)).toBe(false);
    a.client.close();
  });

  it("answers /healthz and /readyz, and /version", async () => {
    expect(await admin(ap(), "GET", "/healthz")).toMatchObject({ status: 200, json: { status: "ok" } });
    expect(await admin(ap(), "GET", "/readyz")).toMatchObject({ status: 200, json: { ready: true } });
    expect((await admin(ap(), "GET", "/version")).json).toMatchObject({ server: "wirechat", version: expect.stringMatching(/^\d+\.\d+\.\d+/) });
  });

  it("serves /metrics as Prometheus text whose counters move with traffic", async () => {
    const before = parseProm((await admin(ap(), "GET", "/metrics")).text).samples;
    const a = await registerUser(served.port);
    const b = await registerUser(served.port);
    for (let i = 0; i < 5; i++) await a.client.request("message", { uid: b.uid, body: `m${i}` });
    await waitFor(() => b.client.frames.filter((f) => f.action === "ev_message").length >= 5, 5000, "5 messages at b");
    const bad = await Client.connect(served.port);
    expect((await bad.request("auth", { login: a.login, pass: "wrong" })).status).toBe(2);
    const again = await login(served.port, b.login);
    const res = await admin(ap(), "GET", "/metrics");
    expect(res.status).toBe(200);
    const { samples, types } = parseProm(res.text);
    const d = (name: string, labels: Record<string, string> = {}) => sample(samples, name, labels) - sample(before, name, labels);
    expect(d("wirechat_messages_stored_total")).toBe(5);
    expect(d("wirechat_messages_delivered_total")).toBeGreaterThanOrEqual(5);
    expect(d("wirechat_requests_total", { action: "message", code: "0" })).toBe(5);
    expect(d("wirechat_requests_total", { action: "auth", code: "2" })).toBe(1);
    expect(d("wirechat_auth_total", { result: "wrong_password" })).toBe(1);
    expect(d("wirechat_auth_total", { result: "ok" })).toBe(1);
    expect(d("wirechat_connections_opened_total")).toBe(4);
    expect(sample(samples, "wirechat_connections", { door: "tcp", state: "authenticated" })).toBeGreaterThanOrEqual(2);
    expect(sample(samples, "wirechat_connections", { door: "tcp", state: "unauthenticated" })).toBeGreaterThanOrEqual(1);
    // A door the server does not have (no TLS here) has no rows.
    expect(samples.filter((s) => s.name === "wirechat_connections" && s.labels.door === "tls")).toEqual([]);
    expect(d("wirechat_bytes_in_total")).toBeGreaterThan(0);
    expect(d("wirechat_delivery_lag_seconds_count")).toBe(5);
    expect(sample(samples, "wirechat_commit_batch_seconds_count")).toBeGreaterThan(0);
    expect(types.get("wirechat_requests_total")).toBe("counter");
    expect(types.get("wirechat_delivery_lag_seconds")).toBe("histogram");
    // The node's name (--node-id, else <host name>:<port>) and version, as a cluster's dashboards tell nodes apart.
    const info = samples.find((s) => s.name === "wirechat_info");
    expect(info).toMatchObject({ value: 1, labels: { version: expect.stringMatching(/^\d+\.\d+\.\d+/), node_id: expect.stringMatching(/.:\d+$/) } });
    // prom-client's process and event-loop metrics are there too.
    expect(sample(samples, "process_resident_memory_bytes")).toBeGreaterThan(0);
    expect(samples.some((s) => s.name.startsWith("nodejs_eventloop_lag"))).toBe(true);
    for (const c of [a.client, b.client, bad, again.client]) c.close();
  });

  it("lists connections in /connz, paged and by user", async () => {
    const a = await registerUser(served.port);
    const anon = await Client.connect(served.port);
    const all = (await admin(ap(), "GET", "/connz?limit=1000")).json;
    expect(all.total).toBeGreaterThanOrEqual(2);
    const mine = (await admin(ap(), "GET", `/connz?user=${a.login}`)).json;
    expect(mine.total).toBe(1);
    expect(mine.connections[0]).toMatchObject({ uid: a.uid, nick: a.login, door: "tcp", state: "authenticated", remote: expect.stringMatching(/127\.0\.0\.1:\d+/), unanswered: 0 });
    expect(mine.connections[0].bytes_in).toBeGreaterThan(0);
    expect(mine.connections[0].bytes_out).toBeGreaterThan(0);
    expect(Date.parse(mine.connections[0].since)).toBeGreaterThan(Date.now() - 60_000);
    const page = (await admin(ap(), "GET", "/connz?offset=1&limit=1")).json;
    expect(page.connections).toHaveLength(1);
    expect((await admin(ap(), "GET", "/connz?limit=0")).status).toBe(400);
    expect((await admin(ap(), "GET", "/connz?user=nobody-at-all")).status).toBe(404);
    // A mistyped parameter is refused, not dropped (`/export?usr=…` exported everyone).
    for (const route of ["/connz?usr=x", "/export?usr=x", "/users?aftr=x"]) {
      const r = await admin(ap(), "GET", route);
      expect(r.status).toBe(400);
      expect(r.json).toMatchObject({ code: 3, error: expect.stringMatching(/additional properties/) });
    }
    a.client.close();
    anon.close();
  });

  it("kicks a user: every connection is told and closed; the session still resumes", async () => {
    const a = await registerUser(served.port);
    const second = await login(served.port, a.login);
    const r = await admin(ap(), "POST", "/kick", { user: a.login });
    expect(r).toMatchObject({ status: 200, json: { uid: a.uid, connections: 2 } });
    for (const c of [a.client, second.client]) {
      const ev = await c.next((f) => f.action === "ev_logout");
      expect(ev.data.reason).toMatch(/operator/);
      await c.closed;
    }
    const again = await Client.connect(served.port);
    expect((await again.request("auth", { sid: a.sid })).status).toBe(0);
    again.close();
  });

  it("bans and unbans a login: sessions revoked, logins refused with 15", async () => {
    const a = await registerUser(served.port);
    const r = await admin(ap(), "POST", "/ban", { login: a.login, reason: "spam" });
    expect(r.status).toBe(200);
    expect(r.json.ban).toMatchObject({ kind: "login", value: a.login.toLowerCase(), reason: "spam" });
    await a.client.closed;
    const c = await Client.connect(served.port);
    const byPass = await c.request("auth", { login: a.login, pass: "secret" });
    expect(byPass.status).toBe(15);
    expect(byPass.error).toMatch(/banned/);
    expect((await c.request("auth", { sid: a.sid })).status).toBe(2); // revoked
    expect((await admin(ap(), "GET", "/bans")).json.bans.some((b: any) => b.value === a.login.toLowerCase())).toBe(true);
    expect((await admin(ap(), "POST", "/unban", { login: a.login })).json).toEqual({ lifted: true });
    expect((await c.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    expect((await admin(ap(), "POST", "/unban", { login: a.login })).json).toEqual({ lifted: false });
    expect((await admin(ap(), "POST", "/ban", { login: a.login, address: "1.2.3.4" })).status).toBe(400);
    expect((await admin(ap(), "POST", "/ban", { login: "no-such-login-here" })).status).toBe(404);
    c.close();
  });

  it("a ban whose revocation of the sessions fails still closes the account's connections", async () => {
    const a = await registerUser(served.port);
    const storage = served.server.services.storage;
    // The ban is stored; the batch that removes the account's sessions fails.
    const undo = wrapCalls(storage, "commit", async (ops: BatchOp[]) => {
      if (ops.length > 0 && ops.every((o) => o.type === "del") && ops.some((o) => o.key.startsWith(storage.spaces.sessions.prefix))) throw new Error("the disk failed");
    });
    try {
      expect((await admin(ap(), "POST", "/ban", { login: a.login, reason: "spam" })).status).toBeGreaterThanOrEqual(500);
    } finally {
      undo();
    }
    const closed = await Promise.race([a.client.closed.then(() => true), sleep(5000).then(() => false)]);
    expect(closed, "the banned account's connection is closed").toBe(true);
    const c = await Client.connect(served.port);
    expect((await c.request("auth", { sid: a.sid })).status).toBe(15);
    expect((await admin(ap(), "POST", "/unban", { login: a.login })).json).toEqual({ lifted: true });
    c.close();
  });

  it("unban names a user as ban does: a uid first, even when it is another user's login", async () => {
    const victim = await registerUser(served.port);
    // A decoy whose login is the victim's uid.
    const decoy = await registerUser(served.port, victim.uid);
    expect((await admin(ap(), "POST", "/ban", { login: victim.uid })).json.ban).toMatchObject({ kind: "login", value: victim.login.toLowerCase() });
    expect((await admin(ap(), "POST", "/unban", { login: victim.uid })).json).toEqual({ lifted: true });
    const c = await Client.connect(served.port);
    expect((await c.request("auth", { login: victim.login, pass: "secret" })).status).toBe(0);
    c.close();
    for (const x of [victim.client, decoy.client]) x.close();
  });

  it("deletes a user: connections closed, the login is free again", async () => {
    const a = await registerUser(served.port);
    expect((await admin(ap(), "POST", "/users/delete", { user: a.uid })).json).toEqual({ uid: a.uid });
    await a.client.closed;
    const c = await Client.connect(served.port);
    expect((await c.request("auth", { login: a.login, pass: "secret" })).status).toBe(7);
    expect((await admin(ap(), "POST", "/users/delete", { user: a.uid })).status).toBe(404);
    c.close();
  });

  it("a banned login stays banned once its account is deleted: register and user add are refused (15) until it is lifted", async () => {
    const a = await registerUser(served.port);
    expect((await admin(ap(), "POST", "/ban", { login: a.login, reason: "spam" })).status).toBe(200);
    await a.client.closed;
    expect((await admin(ap(), "POST", "/users/delete", { user: a.uid })).json).toEqual({ uid: a.uid });
    // Registered, the account could never log in: auth of a banned login answers 15.
    const c = await Client.connect(served.port);
    expect(await c.request("register", { login: a.login, pass: "secret", nick: uniqueName() })).toMatchObject({ status: 15, error: "that login is banned on this server" });
    const made = await admin(ap(), "POST", "/users", { login: a.login, pass: "pw" });
    expect(made.status).toBe(403);
    expect((await admin(ap(), "POST", "/unban", { login: a.login })).json).toEqual({ lifted: true });
    expect((await c.request("register", { login: a.login, pass: "secret", nick: uniqueName() })).status).toBe(0);
    c.close();
    const d = await Client.connect(served.port);
    expect((await d.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    d.close();
  });

  it("takes a uid for its user before a login: a login equal to another user's uid does not shadow it", async () => {
    const victim = await registerUser(served.port);
    const c = await Client.connect(served.port);
    expect((await c.request("register", { login: victim.uid, pass: "secret", nick: uniqueName() })).status).toBe(0);
    expect((await admin(ap(), "GET", `/users/${victim.uid}`)).json).toMatchObject({ uid: victim.uid, login: victim.login });
    expect((await admin(ap(), "POST", "/kick", { user: victim.uid })).json).toMatchObject({ uid: victim.uid, connections: 1 });
    await victim.client.closed;
    c.close();
  });

  it("lists users in uid order, whole and paged alike, past its reads of 64", async () => {
    for (let i = 0; i < 70; i++) expect((await admin(ap(), "POST", "/users", { login: uniqueName("l"), pass: "pw" })).status).toBe(201);
    const all = (await admin(ap(), "GET", "/users?limit=1000")).json.users.map((u: { uid: string }) => u.uid);
    expect(all.length).toBeGreaterThanOrEqual(70);
    expect([...all].sort()).toEqual(all);
    expect(new Set(all).size).toBe(all.length);
    const paged: string[] = [];
    for (let after = ""; ; ) {
      const page = (await admin(ap(), "GET", `/users?limit=50&after=${after}`)).json;
      paged.push(...page.users.map((u: { uid: string }) => u.uid));
      // Followed as a client would: `next` until there is none (a short page is the last).
      if (page.next === null) {
        expect(page.users.length).toBeLessThan(50);
        break;
      }
      expect(page.users.length).toBe(50);
      after = page.next;
    }
    expect(paged).toEqual(all);
  });

  it("closes and opens registration", async () => {
    expect((await admin(ap(), "POST", "/registration", { open: false })).json).toEqual({ registration: "closed" });
    const c = await Client.connect(served.port);
    const refused = await c.request("register", { login: uniqueName(), pass: "secret", nick: uniqueName() });
    expect(refused.status).toBe(15);
    // An operator can still make accounts.
    const login1 = uniqueName();
    const made = await admin(ap(), "POST", "/users", { login: login1, pass: "pw1", nick: login1 });
    expect(made.status).toBe(201);
    expect((await c.request("auth", { login: login1, pass: "pw1" })).status).toBe(0);
    expect((await admin(ap(), "POST", "/registration", { open: true })).json).toEqual({ registration: "open" });
    const d = await Client.connect(served.port);
    expect((await d.request("register", { login: uniqueName(), pass: "secret", nick: uniqueName() })).status).toBe(0);
    expect((await admin(ap(), "POST", "/registration", { open: "yes" })).status).toBe(400);
    // A body's value of the wrong type is refused, not converted: registration stays open.
    for (const open of ["false", null, 0, [false]]) expect((await admin(ap(), "POST", "/registration", { open })).status).toBe(400);
    expect((await admin(ap(), "POST", "/kick", { user: [login1] })).status).toBe(400);
    expect((await admin(ap(), "POST", "/users", { login: 5, pass: "pw1", nick: "five" })).status).toBe(400);
    expect((await admin(ap(), "GET", "/registration")).json).toEqual({ registration: "open" });
    c.close();
    d.close();
  });

  it("answers unknown routes and bad bodies with JSON errors", async () => {
    expect(await admin(ap(), "GET", "/nope")).toMatchObject({ status: 404, json: { code: 11 } });
    // A backup directory the server cannot make is the request's fault: 400 with the reason.
    for (const dir of ["/etc/passwd", "/etc/passwd/sub"]) {
      expect(await admin(ap(), "POST", "/backup", { dir })).toMatchObject({ status: 400, json: { code: 3, error: expect.stringMatching(/cannot write a backup into .*ENOTDIR/) } });
    }
    // Under /proc (where Node's own recursive mkdir never returns: the server froze).
    for (const dir of ["/proc/wirechat-backup", "/proc/wirechat-backup/sub"]) {
      expect(await admin(ap(), "POST", "/backup", { dir })).toMatchObject({ status: 400, json: { code: 3, error: expect.stringMatching(/cannot write a backup into .*ENOENT/) } });
    }
    // What Fastify or node's parser refuses before a route runs: the port's shape too.
    const rawHttp = (request: string) =>
      new Promise<string>((resolve, reject) => {
        const sock = net.connect(ap(), "127.0.0.1", () => sock.write(request));
        let got = "";
        sock.on("data", (d) => (got += d));
        sock.on("close", () => resolve(got));
        sock.on("error", reject);
      });
    for (const request of [
      "GET /users/% HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
      "GET /users/%ZZ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
      "POST /kick HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
    ]) {
      const answer = await rawHttp(request);
      expect(answer).toMatch(/^HTTP\/1\.1 400 /);
      expect(JSON.parse(answer.slice(answer.indexOf("\r\n\r\n") + 4))).toEqual({ error: expect.any(String), code: 3, name: "ErrInvalidData" });
    }
    // A directory that holds something is never overwritten: 409.
    const full = mkdtempSync(path.join(tmpdir(), "wirechat-full-"));
    writeFileSync(path.join(full, "keep"), "x");
    expect(await admin(ap(), "POST", "/backup", { dir: full })).toMatchObject({ status: 409, json: { code: 1, error: expect.stringMatching(/exists and is not empty/) } });
    removeDir(full);
    expect(await admin(ap(), "POST", "/kick", {})).toMatchObject({ status: 400, json: { code: 3 } });
    const raw = await fetch(`http://127.0.0.1:${ap()}/kick`, { method: "POST", headers: { "content-type": "application/json" }, body: "{not json" });
    expect(raw.status).toBe(400);
  });

  it("bans an address: its connections get ev_close and are closed, new ones refused with 15", async () => {
    const a = await registerUser(served.port);
    // Spelled with spaces around it, as a pasted address may be: stored and matched canonical.
    const r = await admin(ap(), "POST", "/ban", { address: " 127.0.0.1 ", reason: "abuse" });
    expect(r.status).toBe(200);
    expect(r.json.ban.value).toBe("127.0.0.1");
    expect(r.json.closed).toBeGreaterThanOrEqual(1);
    expect(await a.client.event("ev_close")).toEqual({ reason: "your address was banned: abuse" });
    await a.client.closed;
    const c = await Client.connect(served.port, { welcome: false });
    const line = await c.next(() => true);
    expect(line.data).toEqual({ status: 15, error: "your address is banned: abuse" });
    await c.closed;
    expect((await admin(ap(), "POST", "/unban", { address: "::ffff:127.0.0.1" })).json).toEqual({ lifted: true });
    const d = await Client.connect(served.port);
    expect((await d.request("ping")).status).toBe(0);
    d.close();
  });
});

describe("admin port and the HTTP port's WebSockets", () => {
  const served = serveForFile({ httpPort: 0 });
  const ap = () => served.server.adminPort as number;
  const hp = () => served.server.httpPort as number;

  it("/connz lists WebSockets with their door, state and bytes; /metrics counts them by door; their bytes stay counted after they close", async () => {
    // Native over WebSocket, logged in, and one that is not.
    const native = await WsClient.connect(hp(), "/wirechat");
    const nativeLogin = uniqueName("adm");
    native.send({ action: "register", data: { login: nativeLogin, pass: "pw", nick: nativeLogin } });
    await native.next((m) => m.action === "auth");
    const anon = await WsClient.connect(hp(), "/wirechat");
    await anon.next((m) => m.action === "welcome");
    // The HTTP/WS chat's /ws.
    const email = `${uniqueName("adm")}@example.com`;
    const post = (path: string, body: unknown, sid?: string) =>
      fetch(`http://127.0.0.1:${hp()}${path}`, { method: "POST", headers: { "content-type": "application/json", ...(sid ? { authorization: `Bearer ${sid}` } : {}) }, body: JSON.stringify(body) });
    expect((await post("/create_user", { username: uniqueName("Adm"), password: "pw", email })).status).toBe(200);
    const chat = await WsClient.connect(hp(), "/ws");
    chat.send({ type: "auth", email, password: "pw" });
    expect((await chat.next()).status).toBe("authenticated");
    // An e_chat_server room socket.
    const echatLogin = uniqueName("adm");
    const sid = ((await (await post("/v1/register", { login: echatLogin, password: "pw" })).json()) as { session_id: string }).session_id;
    const room = ((await (await post("/v1/rooms", { users: [] }, sid)).json()) as { id: number }).id;
    const echat = await WsClient.connect(hp(), `/v1/rooms/${room}/chat?session_id=${sid}`);
    echat.send({ text: "hello" });
    await echat.next((m) => m.text === "hello");

    const all = (await admin(ap(), "GET", "/connz?limit=1000")).json;
    const byDoor = (door: string) => all.connections.filter((c: any) => c.door === door);
    expect(byDoor("websocket").map((c: any) => c.state).sort()).toEqual(["authenticated", "unauthenticated"]);
    for (const door of ["http-chat", "echat"]) expect(byDoor(door).map((c: any) => c.state)).toEqual(["authenticated"]);
    const mine = (await admin(ap(), "GET", `/connz?user=${nativeLogin}`)).json;
    expect(mine.total).toBe(1);
    expect(mine.connections[0]).toMatchObject({ door: "websocket", state: "authenticated", nick: nativeLogin, remote: expect.stringMatching(/127\.0\.0\.1:\d+/) });
    expect(mine.connections[0].bytes_in).toBeGreaterThan(0);
    expect(mine.connections[0].bytes_out).toBeGreaterThan(0);
    expect((await admin(ap(), "GET", `/connz?user=${echatLogin}`)).json.connections[0]).toMatchObject({ door: "echat", state: "authenticated" });

    const { samples } = parseProm((await admin(ap(), "GET", "/metrics")).text);
    const gauge = (door: string, state: string) => sample(samples, "wirechat_connections", { door, state });
    expect(gauge("websocket", "authenticated")).toBe(1);
    expect(gauge("websocket", "unauthenticated")).toBe(1);
    expect(gauge("http-chat", "authenticated")).toBe(1);
    expect(gauge("echat", "authenticated")).toBe(1);
    // Every door of the server has its series, at zero too.
    const doors = new Set(samples.filter((x) => x.name === "wirechat_connections").map((x) => x.labels.door));
    expect([...doors].sort()).toEqual(["echat", "http-chat", "tcp", "websocket"]);
    const bytesIn = sample(samples, "wirechat_bytes_in_total");
    const bytesOut = sample(samples, "wirechat_bytes_out_total");

    for (const w of [native, anon, chat, echat]) w.ws.close();
    await waitFor(() => served.server.http?.websockets.connections.size === 0, 5000, "the WebSockets closed");
    const after = parseProm((await admin(ap(), "GET", "/metrics")).text).samples;
    expect(sample(after, "wirechat_bytes_in_total")).toBeGreaterThanOrEqual(bytesIn);
    expect(sample(after, "wirechat_bytes_out_total")).toBeGreaterThanOrEqual(bytesOut);
    expect(sample(after, "wirechat_connections", { door: "websocket" })).toBe(0);
  });
});

describe("admin port and the seed doors on TCP", () => {
  const served = serveForFile({ rustPort: 0, roomsPort: 0 });

  it("/metrics has a wirechat_connections series for each of them, as /connz names them", async () => {
    const rust = await Client.connect(served.server.rustPort as number, { welcome: false });
    await waitFor(() => served.server.listeners.some((l) => l.connections.size > 0 && l.doors.includes("rust")), 5000, "the rust connection");
    const conns = (await admin(served.server.adminPort as number, "GET", "/connz")).json.connections;
    expect(conns.map((c: any) => c.door)).toEqual(["rust"]);
    const { samples } = parseProm((await admin(served.server.adminPort as number, "GET", "/metrics")).text);
    expect(sample(samples, "wirechat_connections", { door: "rust", state: "unauthenticated" })).toBe(1);
    const doors = new Set(samples.filter((x) => x.name === "wirechat_connections").map((x) => x.labels.door));
    expect([...doors].sort()).toEqual(["rooms", "rust", "tcp"]);
    rust.close();
  });
});

describe("admin port with a token", () => {
  const served = serveForFile({ adminToken: "s3cret" });

  it("refuses requests without the token, except health and readiness", async () => {
    const ap = served.server.adminPort as number;
    expect((await admin(ap, "GET", "/metrics")).status).toBe(401);
    expect((await admin(ap, "GET", "/metrics", undefined, "wrong")).status).toBe(401);
    expect((await admin(ap, "GET", "/metrics", undefined, "s3cret")).status).toBe(200);
    const raw = (authorization: string) => fetch(`http://127.0.0.1:${ap}/metrics`, { headers: { authorization } }).then((r) => r.status);
    // The scheme in any case (RFC 7235); a header as long as the right one but not it, even in bytes, is refused.
    expect(await raw("bearer s3cret")).toBe(200);
    expect(await raw("Bearer s3creé")).toBe(401);
    expect(await raw("Basic  s3cret")).toBe(401);
    expect((await admin(ap, "GET", "/healthz")).status).toBe(200);
    expect((await admin(ap, "GET", "/readyz")).status).toBe(200);
  });
});

describe("admin port without a token", () => {
  const served = serveForFile();

  /** A request naming another host, as a web page does after DNS rebinding. */
  function asHost(port: number, route: string, host: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const req = http.request({ port, host: "127.0.0.1", path: route, headers: { host } }, (res) => {
        res.resume();
        resolve(res.statusCode as number);
      });
      req.on("error", reject);
      req.end();
    });
  }

  it("answers operator routes only to requests that name it localhost", async () => {
    const ap = served.server.adminPort as number;
    expect(await asHost(ap, "/users", "evil.example:9090")).toBe(403);
    expect(await asHost(ap, "/export", "evil.example")).toBe(403);
    expect(await asHost(ap, "/users", `localhost:${ap}`)).toBe(200);
    expect(await asHost(ap, "/metrics", "evil.example")).toBe(200);
    expect(await asHost(ap, "/healthz", "evil.example")).toBe(200);
  });

  it("on one of this machine's own addresses, answers clients on this machine that name it (the CLI beside it)", async () => {
    const own = Object.values(networkInterfaces())
      .flat()
      .find((i) => i !== undefined && !i.internal && i.family === "IPv4")?.address;
    if (own === undefined) throw new Error("this test needs a network interface besides loopback (an IPv4 address)");
    const s = await startTestServer({ adminHost: own });
    try {
      const ap = s.adminPort as number;
      const ask = (host: string) =>
        new Promise<number>((resolve, reject) => {
          const req = http.request({ port: ap, host: own, path: "/users", headers: { host } }, (res) => {
            res.resume();
            resolve(res.statusCode as number);
          });
          req.on("error", reject);
          req.end();
        });
      expect(await ask(`${own}:${ap}`)).toBe(200);
      expect(await ask(own)).toBe(200);
      expect(await ask("evil.example")).toBe(403);
      expect(await ask(`localhost:${ap}`)).toBe(403);
    } finally {
      await s.stop();
      removeDir(s.services.config.dataDir);
    }
  });

  it("refuses an address ban that is not an IP address", async () => {
    const ap = served.server.adminPort as number;
    expect(await admin(ap, "POST", "/ban", { address: "example.com" })).toMatchObject({ status: 400, json: { code: 3 } });
    const r = await admin(ap, "POST", "/ban", { address: "2001:DB8:0::1" });
    expect(r.json.ban.value).toBe("2001:db8::1");
    expect((await admin(ap, "POST", "/unban", { address: "2001:db8::1" })).json).toEqual({ lifted: true });
    // A zone is no part of a socket's address: 400, not a 503 from the URL parser.
    expect(await admin(ap, "POST", "/ban", { address: "fe80::1%eth0" })).toMatchObject({ status: 400, json: { code: 3 } });
    // An IPv4-mapped address in capitals is the IPv4 address sockets report.
    expect((await admin(ap, "POST", "/ban", { address: "::FFFF:203.0.113.9" })).json.ban.value).toBe("203.0.113.9");
    expect((await admin(ap, "POST", "/unban", { address: "203.0.113.9" })).json).toEqual({ lifted: true });
  });
});

describe("a backup's hold on attachment files", () => {
  const served = serveForFile();

  it("keeps a deleted message's file while a backup runs, and removes it when the backup ends", async () => {
    const a = await registerUser(served.server.port);
    const b = await registerUser(served.server.port);
    const data = Buffer.from(`backup hold ${Date.now()} ${Math.random()}`.repeat(50)).toString("base64");
    const sent = await a.client.request("message", { uid: b.uid, body: "file", attach: { mime: "text/plain", data } });
    expect(sent.status).toBe(0);
    const sha = createHash("sha256").update(Buffer.from(data, "base64")).digest("hex");
    const file = served.server.services.blobs.pathOf(sha);
    expect(existsSync(file)).toBe(true);
    const release = served.server.services.blobs.hold();
    expect((await a.client.request("delmessage", { mid: sent.mid })).status).toBe(0);
    await sleep(300);
    expect(existsSync(file)).toBe(true); // the message is gone, its file waits for the backup
    release();
    await waitFor(() => !existsSync(file), 5000, "the file collected after the hold");
    a.client.close();
    b.client.close();
  });
});

describe("readiness during shutdown", () => {
  it("/readyz says 503 while the server stops, /healthz stays 200", async () => {
    const server = await startTestServer({ closeLinger: 3 });
    const ap = server.adminPort as number;
    // A client that never closes its side keeps the shutdown lingering for a while.
    const stuck = net.connect({ port: server.port, host: "127.0.0.1", allowHalfOpen: true });
    stuck.on("data", () => {});
    await new Promise((r) => stuck.once("connect", r));
    expect((await admin(ap, "GET", "/readyz")).status).toBe(200);
    const stopped = server.stop();
    const r = await admin(ap, "GET", "/readyz");
    expect(r).toMatchObject({ status: 503, json: { ready: false, reason: "shutting down" } });
    expect((await admin(ap, "GET", "/healthz")).status).toBe(200);
    await stopped;
    stuck.destroy();
    await expect(fetch(`http://127.0.0.1:${ap}/healthz`)).rejects.toThrow();
    removeDir(server.services.config.dataDir);
  });
});

describe("storage writes that fail", () => {
  it("/readyz says so while they do and is ready again once one gets through; failed batches are counted", async () => {
    const server = await startTestServer();
    const ap = server.adminPort as number;
    const a = await registerUser(server.port);
    const failures = async () => sample(parseProm((await admin(ap, "GET", "/metrics")).text).samples, "wirechat_commit_batch_failures_total");
    expect(await failures()).toBe(0);
    const restore = wrapBatchWrite(server.services.storage, async () => {
      throw new Error("the disk is full");
    });
    expect((await a.client.request("message", { uid: a.uid, body: "lost" })).status).toBe(16);
    const r = await admin(ap, "GET", "/readyz");
    expect(r).toMatchObject({ status: 503, json: { ready: false, reason: expect.stringMatching(/^storage writes failing since \S+: the disk is full$/) } });
    expect(await failures()).toBeGreaterThanOrEqual(1);
    restore();
    expect((await a.client.request("message", { uid: a.uid, body: "kept" })).status).toBe(0);
    expect((await admin(ap, "GET", "/readyz")).status).toBe(200);
    // A passing failure stops nothing: the server still serves.
    expect((await a.client.request("ping", {})).status).toBe(0);
    a.client.close();
    await server.stop();
    removeDir(server.services.config.dataDir);
  });

  it("writes refused for refusingMs (LevelDB keeps a failed sync's error): the server stops itself, even with no traffic after the first failure", async () => {
    const server = await startTestServer();
    server.services.storage.refusingMs = 500;
    const a = await registerUser(server.port);
    let writes = 0;
    wrapBatchWrite(server.services.storage, async () => {
      writes++;
      throw new Error("IO error: sync failed");
    });
    expect((await a.client.request("message", { uid: a.uid, body: "lost" })).status).toBe(16);
    // Nothing more is sent: the probe write finds that writes still fail.
    const err = await server.failed;
    expect(err.message).toBe("IO error: sync failed");
    expect(writes).toBeGreaterThanOrEqual(2);
    await a.client.closed;
    await expect(Client.connect(server.port)).rejects.toThrow();
    removeDir(server.services.config.dataDir);
  });
});

describe("a start that fails once the admin port listens", () => {
  it("closes the admin port and releases the database (a TLS certificate that cannot be read)", async () => {
    const dataDir = tempDir();
    const adminPort = await freePort();
    const missing = path.join(dataDir, "no-such.pem");
    await expect(startTestServer({ dataDir, adminPort, tlsPort: 0, tlsCert: missing, tlsKey: missing })).rejects.toThrow(/no-such\.pem/);
    await expect(fetch(`http://127.0.0.1:${adminPort}/healthz`)).rejects.toThrow();
    // The database's lock is released: the next start on the data dir works.
    const server = await startTestServer({ dataDir, adminPort });
    expect((await admin(adminPort, "GET", "/readyz")).status).toBe(200);
    await server.stop();
    removeDir(dataDir);
  });
});

describe("a stop during long admin requests", () => {
  it("a backup in progress gives up (503, its files taken back), and an export its client does not read is cut at the shutdown timeout", async () => {
    const server = await startTestServer({ shutdownTimeout: 1 });
    const ap = server.adminPort as number;
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    // Attachment files to copy (each synced), and 30 MB of messages for the export.
    for (let i = 0; i < 300; i++) a.client.send("message", { uid: b.uid, body: `${i}`, attach: { mime: "text/plain", data: Buffer.from(`file ${i} ${Math.random()}`).toString("base64") } });
    for (let i = 0; i < 300; i++) expect((await a.client.reply("message", 20_000)).data.status).toBe(0);
    for (let i = 0; i < 300; i++) a.client.send("message", { uid: b.uid, body: `${i} ${"x".repeat(100_000)}` });
    for (let i = 0; i < 300; i++) expect((await a.client.reply("message", 20_000)).data.status).toBe(0);

    // An export whose client reads nothing: its response stalls on the socket.
    const reader = net.connect(ap, "127.0.0.1");
    reader.on("error", () => {});
    reader.write("GET /export HTTP/1.1\r\nHost: localhost\r\n\r\n");
    reader.pause();
    const readerClosed = new Promise((r) => reader.once("close", r));
    await sleep(500);

    const dir = path.join(tempDir(), "backup");
    const answer = admin(ap, "POST", "/backup", { dir });
    await waitFor(() => existsSync(path.join(dir, "db.ndjson")), 10_000, "the backup under way");
    const stopped = server.stop();
    expect(await answer).toMatchObject({ status: 503, json: { code: 16, error: expect.stringMatching(/shutting down: the backup was not finished/) } });
    expect(existsSync(path.join(dir, "db.ndjson"))).toBe(false);
    await stopped;
    reader.resume();
    await readerClosed;
    a.client.close();
    b.client.close();
    removeDir(server.services.config.dataDir);
  }, 60_000);
});

describe("admin port after a reload", () => {
  const served = serveForFile({});

  it("takes --idle-unauth from the reload for a request's time, as the HTTP door does", async () => {
    const server = served.server;
    server.reload({ ...server.services.config, idleUnauth: 1 });
    const socket = net.connect({ port: server.adminPort as number, host: "127.0.0.1" });
    await once(socket, "connect");
    let text = "";
    socket.on("data", (d) => (text += d.toString("latin1")));
    socket.write("POST /connz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{");
    const drip = setInterval(() => socket.write(" "), 300);
    await once(socket, "close");
    clearInterval(drip);
    expect(text).toMatch(/^HTTP\/1\.1 408/);
  });
});

describe("admin port against clients that hold sockets", () => {
  const served = serveForFile({ idleUnauth: 1 });
  const ap = () => served.server.adminPort as number;

  it("a request whose body never finishes arriving is cut off after --idle-unauth (408), a refusal's too", async () => {
    for (const path of ["/healthz", "/connz"]) {
      const socket = net.connect({ port: ap(), host: "127.0.0.1" });
      await once(socket, "connect");
      let text = "";
      socket.on("data", (d) => (text += d.toString("latin1")));
      socket.write(`POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{`);
      // A byte every 300 ms: each keeps the socket busy, none finishes the body.
      const drip = setInterval(() => socket.write(" "), 300);
      await once(socket, "close");
      clearInterval(drip);
      expect(text).toMatch(/^HTTP\/1\.1 (408|404|401|403)/);
    }
  });

  it("holds at most 64 sockets; past them a new one is closed", async () => {
    const held: net.Socket[] = [];
    for (let i = 0; i < 64; i++) {
      const s = net.connect({ port: ap(), host: "127.0.0.1" });
      await once(s, "connect");
      s.on("error", () => {});
      held.push(s);
    }
    const over = net.connect({ port: ap(), host: "127.0.0.1" });
    over.on("error", () => {});
    await once(over, "close");
    for (const s of held) s.destroy();
    // Let go (once the server has seen them close), the port answers again.
    const health = async () => {
      const socket = net.connect({ port: ap(), host: "127.0.0.1" });
      socket.on("error", () => {});
      let text = "";
      socket.on("data", (d) => (text += d.toString("latin1")));
      socket.end("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
      await once(socket, "close");
      return text;
    };
    let text = "";
    for (let i = 0; i < 50 && !text.startsWith("HTTP/1.1 200"); i++) {
      text = await health();
      if (!text) await new Promise((r) => setTimeout(r, 100));
    }
    expect(text).toMatch(/^HTTP\/1\.1 200/);
  });
});
