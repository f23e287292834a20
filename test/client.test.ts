// The client library (src/client) against a real server over real TCP: reply
// matching with events in between, error codes, timeouts, the events iterator, acks,
// reconnecting across a server restart without losing or repeating a message, TLS,
// and streamed attachments.

import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { PassThrough, Readable } from "node:stream";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import {
  ClientCode,
  NdjsonSplitter,
  WirechatClient,
  WirechatError,
  base64Chunks,
  decodeAttachment,
  type ConnectOptions,
  type MessageEvent,
} from "../src/client/index.js";
import type { Config } from "../src/config.js";
import { ChildServer, removeDir, serveForFile, startTestServer, uniqueName, useTempDirs } from "./helpers.js";
import { holdNextWrite, isAlive, sleep, waitFor } from "./pipeline-helpers.js";

// Servers here run no admin HTTP listener: its fixed default port would collide
// between the several servers this file starts. (An env variable for the child
// processes, so a build without that option simply ignores it.)
const noAdmin = { admin: "off" } as unknown as Partial<Config>;
process.env.WIRECHAT_ADMIN = "off";
const srv = serveForFile(noAdmin);
const clients: WirechatClient[] = [];
const children: ChildServer[] = [];
const newDir = useTempDirs();

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  for (const child of children.splice(0)) {
    if (isAlive(child)) {
      child.proc.kill("SIGKILL");
      await child.exited;
    }
  }
});

async function connect(opts: ConnectOptions = {}): Promise<WirechatClient> {
  const c = await WirechatClient.connect({ host: "127.0.0.1", port: srv.port, ...opts });
  clients.push(c);
  return c;
}

/**
 * A listening proxy to the shared server that passes the client's bytes while `up()`
 * and the server's while `down()` says so, closing nothing; `links` are its sockets.
 */
async function gatedProxy(up: () => boolean, down: () => boolean, accepted?: (inbound: net.Socket) => void): Promise<{ proxy: net.Server; links: net.Socket[] }> {
  const links: net.Socket[] = [];
  const proxy = net.createServer((inbound) => {
    accepted?.(inbound);
    const outbound = net.connect(srv.port, "127.0.0.1");
    links.push(inbound, outbound);
    inbound.on("data", (d) => up() && outbound.write(d));
    outbound.on("data", (d) => down() && inbound.write(d));
    for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
      a.on("close", () => b.destroy());
      a.on("error", () => b.destroy());
    }
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", () => r()));
  return { proxy, links };
}

/**
 * Runs `test` with bob and alice, alice registered through a proxy that passes her
 * bytes and stops passing the server's once `mute()` is called: the server stores what
 * she sends, and she hears nothing back.
 */
async function behindMutedProxy(
  test: (t: { bob: Awaited<ReturnType<typeof registered>>; alice: WirechatClient; login: string; mute: () => void; links: net.Socket[] }) => Promise<void>,
): Promise<void> {
  let muted = false;
  const { proxy, links } = await gatedProxy(() => true, () => !muted);
  try {
    const bob = await registered();
    const alice = await WirechatClient.connect({ host: "127.0.0.1", port: (proxy.address() as net.AddressInfo).port });
    clients.push(alice);
    const login = uniqueName("cm");
    await alice.register(login, "secret", login);
    await test({ bob, alice, login, mute: () => (muted = true), links });
  } finally {
    proxy.close();
    for (const l of links) l.destroy();
  }
}

async function registered(opts: ConnectOptions = {}): Promise<{ c: WirechatClient; uid: string; sid: string; login: string }> {
  const c = await connect(opts);
  const login = uniqueName("cl");
  const a = await c.register(login, "secret", login);
  return { c, uid: a.uid, sid: a.sid, login };
}

/**
 * alice reads her events through an iterator of 2 that falls behind, and bob sends her
 * five direct messages: three of them dropped by it (`passed`: what her listener saw).
 */
async function fiveThroughSmallIterator(opts: ConnectOptions) {
  const bob = await registered();
  const alice = await registered(opts);
  const it = alice.c.events({ bufferSize: 2 });
  const passed: string[] = [];
  alice.c.on("ev_message", (m) => passed.push(m.mid));
  const mids: string[] = [];
  for (let i = 0; i < 5; i++) mids.push((await bob.c.sendMessage({ uid: alice.uid }, `m${i}`)).mid);
  await waitFor(() => passed.length === 5, 5000, "five messages at alice");
  return { bob, alice, it, passed, mids };
}

async function rejection(p: Promise<unknown>): Promise<WirechatError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(WirechatError);
    return err as WirechatError;
  }
  throw new Error("expected a rejection");
}

function childOn(port: number, dir: string, extra: string[] = []): Promise<ChildServer> {
  return ChildServer.start(dir, ["--port", String(port), ...extra]).then((c) => {
    children.push(c);
    return c;
  });
}

describe("NdjsonSplitter", () => {
  it("finds frames split anywhere, back to back, and across multi-byte characters", () => {
    const frames = [{ action: "a", data: { t: "héllo 😀 ✓" } }, { action: "b" }, { action: "c", data: { n: 1 } }];
    const bytes = Buffer.from(frames.map((f) => JSON.stringify(f) + "\n").join(""));
    for (const step of [1, 2, 3, 7, bytes.length]) {
      const s = new NdjsonSplitter();
      const got: string[] = [];
      for (let i = 0; i < bytes.length; i += step) got.push(...s.push(bytes.subarray(i, i + step)));
      expect(got.map((l) => JSON.parse(l))).toEqual(frames);
      expect(s.buffered).toBe(0);
    }
  });

  it("refuses a line over its limit", () => {
    const s = new NdjsonSplitter(10);
    expect(() => s.push(Buffer.from("x".repeat(11)))).toThrow(/longer than 10 bytes/);
  });
});

describe("base64Chunks", () => {
  it("concatenates to the base64 of the whole input whatever the chunk sizes", async () => {
    const data = randomBytes(1000);
    const parts: Buffer[] = [];
    let at = 0;
    for (const n of [1, 2, 4, 5, 7, 100, 881]) {
      parts.push(data.subarray(at, at + n));
      at += n;
    }
    let text = "";
    for await (const c of base64Chunks(Readable.from(parts))) text += c.text;
    expect(text).toBe(data.toString("base64"));
  });
});

describe("WirechatClient", () => {
  it("matches replies to pipelined requests while events arrive in between", async () => {
    const alice = await registered();
    const bob = await registered();
    const got: MessageEvent[] = [];
    alice.c.on("ev_message", (m) => got.push(m));
    // Bob's messages make Alice's connection carry events between her replies.
    const sends = Array.from({ length: 20 }, (_, i) => bob.c.sendMessage({ uid: alice.uid }, `m${i}`));
    const reqs: Promise<unknown>[] = [];
    for (let i = 0; i < 30; i++) {
      reqs.push(alice.c.userInfo(i % 2 ? bob.uid : alice.uid).then((r) => expect(r.uid).toBe(i % 2 ? bob.uid : alice.uid)));
      reqs.push(alice.c.ping().then((t) => expect(typeof t).toBe("number")));
      reqs.push(rejection(alice.c.request("userinfo", { user: `nobody${i}` })).then((e) => expect(e.code).toBe(8)));
      reqs.push(alice.c.searchUser(bob.login).then((l) => expect(l.map((u) => u.uid)).toContain(bob.uid)));
    }
    await Promise.all([...sends, ...reqs]);
    await waitFor(() => got.length === 20, 3000, "20 ev_messages");
    expect(got.map((m) => m.body)).toEqual(Array.from({ length: 20 }, (_, i) => `m${i}`));
  });

  it("rejects with WirechatError carrying the status and the server's text", async () => {
    const c = await connect();
    let e = await rejection(c.request("contactlist"));
    expect(e.code).toBe(6);
    expect(e.serverMessage).toBe("'contactlist' needs an authenticated session");
    expect(e.action).toBe("contactlist");
    e = await rejection(c.request("no_such_action"));
    expect(e.code).toBe(11);
    e = await rejection(c.auth({ login: uniqueName("ghost"), pass: "x" }));
    expect(e.code).toBe(7);
    const a = await registered();
    e = await rejection(c.register(a.login, "x", uniqueName("n")));
    expect(e.code).toBe(1);
    e = await rejection(c.auth({ login: a.login, pass: "wrong" }));
    expect(e.code).toBe(2);
    // The generic request still works for everything, and the connection is fine.
    const auth = await c.request("auth", { login: a.login, pass: "secret" });
    expect(auth.uid).toBe(a.uid);
    expect(c.uid).toBe(a.uid);
  });

  it("times out a request without losing step: its late reply is not given to the next one", async () => {
    const dir = newDir();
    const child = await ChildServer.start(dir);
    children.push(child);
    const c = await WirechatClient.connect({ host: "127.0.0.1", port: child.port });
    clients.push(c);
    child.proc.kill("SIGSTOP");
    try {
      const e = await rejection(c.request("hello", {}, { timeoutMs: 200 }));
      expect(e.code).toBe(ClientCode.Timeout);
    } finally {
      child.proc.kill("SIGCONT");
    }
    // The hello reply arrives now and must be swallowed, not taken for the ping's.
    expect(typeof (await c.ping())).toBe("number");
  });

  it("delivers events to the iterator, drops the oldest past its buffer, and acknowledges none of the dropped", async () => {
    const bob = await registered();
    const alice = await registered();
    const aliceSid = alice.sid;
    alice.c.destroy();
    const mids: string[] = [];
    for (let i = 0; i < 5; i++) mids.push((await bob.c.sendMessage({ uid: alice.uid }, `offline ${i}`)).mid);

    const c = await connect();
    expect(c.acking).toBe(true);
    const all = c.events();
    const small = c.events({ bufferSize: 2 });
    const overflows: number[] = [];
    c.on("overflow", ({ dropped }) => overflows.push(dropped));
    await c.auth({ sid: aliceSid });
    const seen: string[] = [];
    for await (const ev of all) {
      if (ev.action !== "ev_message") continue;
      seen.push(ev.data.body);
      if (seen.length === 5) break;
    }
    expect(seen).toEqual([0, 1, 2, 3, 4].map((i) => `offline ${i}`));
    const kept: string[] = [];
    for await (const ev of small) {
      kept.push(ev.data.body);
      if (kept.length === 2) break;
    }
    expect(kept).toEqual(["offline 3", "offline 4"]);
    expect(overflows.at(-1)).toBe(3);
    await sleep(200); // the (coalesced) acks would have gone out
    // The small iterator never handed the first three to the app: nothing past them is
    // acknowledged (before, the last one was, and the three were lost for good).
    const acked = c.lastAckedMid;
    expect(acked === undefined || BigInt(acked) < BigInt(mids[0]), `acked ${acked}`).toBe(true);

    // So the next login is owed all five.
    const again = await connect();
    const late: MessageEvent[] = [];
    again.on("ev_message", (m) => late.push(m));
    await again.auth({ sid: aliceSid });
    await again.ping();
    await waitFor(() => late.length === 5, 3000, "the five again");
    expect(late.map((m) => m.mid)).toEqual(mids);
  });

  it("an iterator's buffer is bounded in characters too: large messages past it drop the oldest, unacknowledged", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true });
    const big = (i: number) => `${i}`.padEnd(2000, "x");
    // Room for two such messages (each weighs its text and a little more), not three.
    const small = alice.c.events({ bufferChars: 5000 });
    const overflows: number[] = [];
    alice.c.on("overflow", ({ dropped }) => overflows.push(dropped));
    const mids: string[] = [];
    for (let i = 0; i < 4; i++) mids.push((await bob.c.sendMessage({ uid: alice.uid }, big(i))).mid);
    await waitFor(() => overflows.at(-1) === 2, 5000, "two dropped");
    const kept: string[] = [];
    for await (const ev of small) {
      kept.push(ev.data.body);
      if (kept.length === 2) break;
    }
    expect(kept).toEqual([big(2), big(3)]);
    await sleep(200);
    const acked = alice.c.lastAckedMid;
    expect(acked === undefined || BigInt(acked) < BigInt(mids[0]), `acked ${acked}`).toBe(true);
  });

  it("reconnects after a server restart and resumes with since: nothing lost, nothing twice", async () => {
    const dir = newDir();
    const first = await ChildServer.start(dir);
    children.push(first);
    const port = first.port;
    const bobC = await WirechatClient.connect({ host: "127.0.0.1", port });
    clients.push(bobC);
    await bobC.register(uniqueName("rb"), "secret", uniqueName("RB"));
    // Without acks the server counts none of Alice's messages as delivered (§8
    // "Delivery"), so after the restart it would offer all of them again: only `since`
    // on the resumed auth keeps the first three from coming twice.
    const alice = await WirechatClient.connect({ host: "127.0.0.1", port, ack: false, reconnect: { minMs: 50, maxMs: 400 } });
    clients.push(alice);
    const aliceAuth = await alice.register(uniqueName("ra"), "secret", uniqueName("RA"));
    const got: string[] = [];
    alice.on("ev_message", (m) => {
      if (m.to === aliceAuth.uid) got.push(m.body);
    });
    const events: string[] = [];
    alice.on("disconnect", () => events.push("disconnect"));
    alice.on("reconnect", () => events.push("reconnect"));

    for (let i = 1; i <= 3; i++) await bobC.sendMessage({ uid: aliceAuth.uid }, `before ${i}`);
    await waitFor(() => got.length === 3, 3000, "the first three messages");
    // A kill, not a stop: nothing gets a chance to be tidied up.
    first.proc.kill("SIGKILL");
    await first.exited;
    await waitFor(() => events.includes("disconnect"), 3000, "the disconnect");
    // Asked while disconnected: held, then sent once the session is resumed.
    const held = alice.request("userinfo", { user: aliceAuth.uid });

    const second = await childOn(port, dir);
    expect(second.port).toBe(port);
    const bob2 = await WirechatClient.connect({ host: "127.0.0.1", port });
    clients.push(bob2);
    await bob2.auth({ sid: bobC.sid! });
    const bob2Mids: string[] = [];
    for (let i = 1; i <= 3; i++) bob2Mids.push((await bob2.sendMessage({ uid: aliceAuth.uid }, `after ${i}`)).mid);

    expect((await held).uid).toBe(aliceAuth.uid);
    await waitFor(() => got.length >= 6, 5000, () => `six messages; got ${JSON.stringify(got)}`);
    await alice.ping();
    await sleep(300);
    expect(got).toEqual(["before 1", "before 2", "before 3", "after 1", "after 2", "after 3"]);
    expect(events).toEqual(["disconnect", "reconnect"]);
    expect(alice.connected).toBe(true);
    expect(alice.sid).toBe(aliceAuth.sid);
    // `since` did it, not the client's duplicate filter: the server resent nothing.
    expect(alice.duplicatesDropped).toBe(0);
    expect(alice.lastInboxMid).toBe(bob2Mids.at(-1));
  });

  it("requests that time out during an outage do not pile up until the reconnect", async () => {
    const child = await ChildServer.start(newDir());
    children.push(child);
    const c = await WirechatClient.connect({ host: "127.0.0.1", port: child.port, reconnect: { minMs: 60_000, maxMs: 60_000 } });
    clients.push(c);
    await c.register(uniqueName("out"), "secret", uniqueName("OUT"));
    const lost = new Promise<void>((r) => c.once("disconnect", () => r()));
    child.proc.kill("SIGKILL");
    await child.exited;
    await lost;
    // An app that keeps asking through the outage; each request times out, unsent.
    for (let round = 0; round < 5; round++) {
      const asked = Array.from({ length: 1000 }, () => c.ping({ timeoutMs: 1 }).catch((e: unknown) => e));
      for (const e of await Promise.all(asked)) expect(e).toMatchObject({ code: ClientCode.Timeout });
    }
    // 5,000 timed out: what is held for the reconnect stays bounded (all of them before).
    expect((c as unknown as { held: unknown[] }).held.length).toBeLessThan(2048);
  });

  it("a link that stops passing data is taken for lost by the keep-alive; a file sent meanwhile times out", async () => {
    // A proxy that can stop forwarding without closing anything (a NAT's timeout).
    let frozen = false;
    const { proxy, links } = await gatedProxy(() => !frozen, () => !frozen);
    const port = (proxy.address() as net.AddressInfo).port;
    try {
      const c = await WirechatClient.connect({ host: "127.0.0.1", port, keepAliveMs: 200, requestTimeoutMs: 600, reconnect: { minMs: 50, maxMs: 200, maxAttempts: 1000 } });
      clients.push(c);
      await c.register(uniqueName("ka"), "secret", uniqueName("KA"));
      const events: string[] = [];
      c.on("disconnect", () => events.push("disconnect"));
      frozen = true;
      await waitFor(() => events.includes("disconnect"), 5000, "the keep-alive to give the link up");
      // The server is unreachable now (nothing answers): a file sent while the client
      // reconnects is refused at its timeout, not held for as long as that takes.
      proxy.close();
      for (const l of links) l.destroy();
      const file = path.join(newDir(), "held.bin");
      writeFileSync(file, randomBytes(1000));
      const started = Date.now();
      await expect(c.sendFile({ uid: "nobody" }, file, { timeoutMs: 500 })).rejects.toMatchObject({ code: ClientCode.Timeout });
      expect(Date.now() - started).toBeLessThan(5000);
    } finally {
      proxy.close();
      for (const l of links) l.destroy();
    }
  });

  it("a message or file whose reply never came rejects with its cmid: sent again with it, it is stored once", async () => {
    await behindMutedProxy(async ({ bob, alice, login, mute }) => {
      mute();
      const lost = await rejection(alice.sendMessage({ uid: bob.uid }, "once", { timeoutMs: 500 }));
      expect(lost.code).toBe(ClientCode.Timeout);
      expect(typeof lost.cmid).toBe("string");
      const file = path.join(newDir(), "once.bin");
      writeFileSync(file, randomBytes(3000));
      const lostFile = await rejection(alice.sendFile({ uid: bob.uid }, file, { timeoutMs: 500 }));
      expect(lostFile.code).toBe(ClientCode.Timeout);
      expect(typeof lostFile.cmid).toBe("string");
      expect(lostFile.cmid).not.toBe(lost.cmid);
      // The app sends both again with their cmids (here on another connection of hers).
      const again = await connect();
      await again.auth({ login, pass: "secret" });
      const m = await again.sendMessage({ uid: bob.uid }, "once", { cmid: lost.cmid });
      const f = await again.sendFile({ uid: bob.uid }, file, { cmid: lostFile.cmid });
      const history = await bob.c.history({ uid: again.uid as string });
      expect(history.map((h) => h.mid)).toEqual([m.mid, f.mid]);
      expect(history[1].attach?.data).toBe(readFileSync(file).toString("base64"));
    });
  });

  it("messages in flight when the connection closes each reject with their own cmid: sent again with them, each is stored once", async () => {
    await behindMutedProxy(async ({ bob, alice, login, mute, links }) => {
      mute();
      const sent = ["m1", "m2", "m3"].map((body) => rejection(alice.sendMessage({ uid: bob.uid }, body)));
      await sleep(300); // stored by the server, their replies held back
      for (const l of links) l.destroy();
      const errs = await Promise.all(sent);
      for (const e of errs) expect(e).toMatchObject({ code: ClientCode.Closed, action: "message" });
      // One error each: one shared by all had the last message's cmid on every one.
      expect(new Set(errs.map((e) => e.cmid)).size).toBe(3);
      const again = await connect();
      await again.auth({ login, pass: "secret" });
      for (const [i, e] of errs.entries()) await again.sendMessage({ uid: bob.uid }, `m${i + 1}`, { cmid: e.cmid });
      const history = await bob.c.history({ uid: again.uid as string });
      expect(history.map((h) => h.body)).toEqual(["m1", "m2", "m3"]);
    });
  });

  it("a message whose ack a disconnect cut off is acked after the reconnect: the next login does not get it again", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true, reconnect: { minMs: 50, maxMs: 200 } });
    let cut = false;
    alice.c.on("ev_message", () => {
      // Handed to the app, and the link drops before the (coalesced) ack goes out.
      if (cut) return;
      cut = true;
      (alice.c as unknown as { socket: net.Socket }).socket.destroy();
    });
    const reconnected = new Promise<void>((r) => alice.c.once("reconnect", () => r()));
    const sent = await bob.c.sendMessage({ uid: alice.uid }, "only once");
    await reconnected;
    await waitFor(() => alice.c.lastAckedMid === sent.mid, 5000, "the ack after the reconnect");
    expect(alice.c.duplicatesDropped).toBe(1);
    // A login elsewhere without `since`: the server counts it delivered.
    const other = await connect({ ack: true });
    const got: string[] = [];
    other.on("ev_message", (m) => got.push(m.body));
    await other.auth({ login: alice.login, pass: "secret" });
    await other.ping();
    await sleep(300);
    expect(got).toEqual([]);
  });

  it("with ack: \"manual\", only what the app acknowledged is: the rest comes again at the next login, and lastInboxMid stays at the app's ack", async () => {
    const bob = await registered();
    const alice = await registered({ ack: "manual", reconnect: { minMs: 50, maxMs: 200 } });
    const passed: string[] = [];
    alice.c.on("ev_message", (m) => passed.push(m.mid));
    const mids: string[] = [];
    for (let i = 0; i < 3; i++) mids.push((await bob.c.sendMessage({ uid: alice.uid }, `m${i}`)).mid);
    await waitFor(() => passed.length === 3, 5000, "three messages at alice");
    await sleep(200); // automatic acks would have gone out
    expect(alice.c.lastAckedMid).toBeUndefined();
    expect(alice.c.lastInboxMid).toBeUndefined();
    await alice.c.ack(mids[0]);
    await waitFor(() => alice.c.lastAckedMid === mids[0], 5000, "the app's ack");
    expect(alice.c.lastInboxMid).toBe(mids[0]);
    await expect(alice.c.ack("x1")).rejects.toMatchObject({ code: ClientCode.Protocol });
    // After a reconnect the two not acknowledged come again, kept from the app, and the
    // app's later ack of one of them goes out on the new connection.
    const reconnected = new Promise<void>((r) => alice.c.once("reconnect", () => r()));
    (alice.c as unknown as { socket: net.Socket }).socket.destroy();
    await reconnected;
    await waitFor(() => alice.c.duplicatesDropped === 2, 5000, "the two unacknowledged again");
    expect(passed).toEqual(mids);
    await sleep(200);
    // (At most the resume's own position: its `since`, acked again.)
    expect([undefined, mids[0]]).toContain(alice.c.lastAckedMid);
    await alice.c.ack(mids[1]);
    await waitFor(() => alice.c.lastAckedMid === mids[1], 5000, "the app's ack after the reconnect");
    expect(alice.c.lastInboxMid).toBe(mids[1]);
    // A login elsewhere without `since` gets the one the app never acknowledged.
    const other = await connect({ ack: false });
    const got: string[] = [];
    other.on("ev_message", (m) => got.push(m.mid));
    await other.auth({ login: alice.login, pass: "secret" });
    await other.ping();
    await sleep(300);
    expect(got).toEqual([mids[2]]);
  });

  it("an inbox message an events() iterator dropped is not acknowledged, and comes again after the reconnect", async () => {
    const { alice, it, passed, mids } = await fiveThroughSmallIterator({ ack: true, reconnect: { minMs: 50, maxMs: 200 } });
    await sleep(200); // the (coalesced) acks would have gone out
    // Three were dropped unread: none of them acknowledged (before, the last one was).
    expect(alice.c.lastAckedMid === undefined || BigInt(alice.c.lastAckedMid) < BigInt(mids[0])).toBe(true);
    const reconnected = new Promise<void>((r) => alice.c.once("reconnect", () => r()));
    (alice.c as unknown as { socket: net.Socket }).socket.destroy();
    await reconnected;
    // All five come again (the listener sees them: the iterator, still not read, drops again).
    await waitFor(() => passed.length === 10, 5000, "the five again after the reconnect");
    expect(passed.slice(5)).toEqual(mids);
    await it.return?.();
  });

  it("after an iterator dropped inbox messages, a login again on the same connection keeps them unacknowledged, and lastInboxMid is below them", async () => {
    const { bob, alice, it, mids } = await fiveThroughSmallIterator({ ack: true });
    // Saved and given back at a later run, this position brings the dropped ones back.
    expect(BigInt(alice.c.lastInboxMid as string) < BigInt(mids[0])).toBe(true);
    // On a connection already logged in, the server sends nothing again: the floor stays.
    await alice.c.auth({ sid: alice.sid });
    for (let i = 0; i < 2; i++) await it.next(); // the two it kept
    mids.push((await bob.c.sendMessage({ uid: alice.uid }, "m5")).mid);
    expect((await it.next()).value?.data.mid).toBe(mids[5]);
    await sleep(200);
    const acked = alice.c.lastAckedMid;
    expect(acked === undefined || BigInt(acked) < BigInt(mids[0]), `acked ${acked}`).toBe(true);
    await it.return?.();
  });

  it("leaving a for-await loop leaves the inbox messages its iterator still held unacknowledged", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true });
    const it = alice.c.events();
    const passed: string[] = [];
    alice.c.on("ev_message", (m) => passed.push(m.mid));
    const mids: string[] = [];
    for (let i = 0; i < 3; i++) mids.push((await bob.c.sendMessage({ uid: alice.uid }, `m${i}`)).mid);
    await waitFor(() => passed.length === 3, 5000, "three messages at alice");
    for await (const ev of it) {
      expect(ev.data.mid).toBe(mids[0]);
      break; // m1 and m2 were never handed to the app
    }
    mids.push((await bob.c.sendMessage({ uid: alice.uid }, "m3")).mid);
    await waitFor(() => passed.length === 4, 5000, "the fourth");
    await sleep(200);
    expect(alice.c.lastAckedMid).toBe(mids[0]);
  });

  it("acknowledges an inbox message an events() iterator holds only once it is handed out", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true });
    const it = alice.c.events();
    // Listened for before sending: the delivery may come before the sender's reply.
    const got = new Promise((resolve) => alice.c.once("ev_message", resolve));
    const sent = await bob.c.sendMessage({ uid: alice.uid }, "held");
    await got;
    await sleep(200);
    const acked = alice.c.lastAckedMid;
    expect(acked === undefined || BigInt(acked) < BigInt(sent.mid), `acked ${acked}`).toBe(true);
    const first = await it.next();
    expect(first.value?.data.mid).toBe(sent.mid);
    await waitFor(() => alice.c.lastAckedMid === sent.mid, 5000, "the ack once handed out");
    await it.return?.();
  });

  it("inbox messages that arrive before the app listens (README's order: auth, then on) are kept for it, and acknowledged only then", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true });
    await alice.c.request("logout");
    const sent: string[] = [];
    for (let i = 0; i < 3; i++) sent.push((await bob.c.sendMessage({ uid: alice.uid }, `while away ${i}`)).mid);
    // The inbox comes right behind the auth reply; the listener is added after it.
    await alice.c.auth({ login: alice.login, pass: "secret" });
    await sleep(200);
    // Nothing took them yet: nothing acknowledged, and the position to save is below them.
    const early = alice.c.lastAckedMid;
    expect(early === undefined || BigInt(early) < BigInt(sent[0]), `acked ${early}`).toBe(true);
    const position = alice.c.lastInboxMid;
    expect(position === undefined || BigInt(position) < BigInt(sent[0]), `position ${position}`).toBe(true);
    const got: string[] = [];
    alice.c.on("ev_message", (m) => got.push(m.body));
    await waitFor(() => got.length === 3, 5000, "the three messages");
    expect(got).toEqual(["while away 0", "while away 1", "while away 2"]);
    await waitFor(() => alice.c.lastAckedMid === sent[2], 5000, "the ack once they were handed on");
    expect(alice.c.lastInboxMid).toBe(sent[2]);
  });

  it("a once listener takes one kept inbox message; the rest stay kept, unacknowledged, for the next", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true });
    await alice.c.request("logout");
    const sent: string[] = [];
    for (let i = 0; i < 3; i++) sent.push((await bob.c.sendMessage({ uid: alice.uid }, `kept ${i}`)).mid);
    await alice.c.auth({ login: alice.login, pass: "secret" });
    await sleep(200);
    const first = await new Promise<{ body: string }>((resolve) => alice.c.once("ev_message", resolve));
    expect(first.body).toBe("kept 0");
    await sleep(200);
    const acked = alice.c.lastAckedMid;
    expect(acked === undefined || BigInt(acked) <= BigInt(sent[0]), `acked ${acked}`).toBe(true);
    const rest: string[] = [];
    alice.c.on("ev_message", (m) => rest.push(m.body));
    await waitFor(() => rest.length === 2, 5000, "the other two");
    expect(rest).toEqual(["kept 1", "kept 2"]);
  });

  it("inbox messages kept for a listener are the logged-out user's: another user's login on the connection never gets them", async () => {
    const bob = await registered();
    const alice = await registered({ ack: true });
    const carol = await registered({ ack: true });
    carol.c.close();
    await alice.c.request("logout");
    await bob.c.sendMessage({ uid: alice.uid }, "for alice");
    await alice.c.auth({ login: alice.login, pass: "secret" });
    await sleep(200);
    await alice.c.request("logout");
    await bob.c.sendMessage({ uid: carol.uid }, "for carol");
    await alice.c.auth({ login: carol.login, pass: "secret" });
    const got: string[] = [];
    alice.c.on("ev_message", (m) => got.push(m.body));
    await waitFor(() => got.includes("for carol"), 5000, "carol's message");
    await sleep(200);
    expect(got).toEqual(["for carol"]);
  });

  it("a resume before any ack is confirmed starts from the since the login had, not from the start", async () => {
    const bob = await registered();
    const alice = await registered({ ack: false });
    await alice.c.close();
    // Three messages the app already has (from its own store), never acked.
    let last = "";
    for (const body of ["one", "two", "three"]) last = (await bob.c.sendMessage({ uid: alice.uid }, body)).mid;
    const c = await connect({ ack: true, reconnect: { minMs: 50, maxMs: 200 } });
    const got: string[] = [];
    c.on("ev_message", (m) => got.push(m.body));
    await c.auth({ login: alice.login, pass: "secret", since: last });
    await c.ping();
    const reconnected = new Promise<void>((r) => c.once("reconnect", () => r()));
    (c as unknown as { socket: net.Socket }).socket.destroy();
    await reconnected;
    await c.ping();
    await sleep(200);
    // Resumed with since = the login's: the three were not offered again (they were,
    // all three, as duplicates, when the resume sent no since).
    expect(c.duplicatesDropped).toBe(0);
    expect(got).toEqual([]);
  });

  it("an attachment whose source stalls when the link drops does not hold the next connection's writes", async () => {
    const bob = await registered();
    const alice = await registered({ reconnect: { minMs: 50, maxMs: 200 } });
    const source = new PassThrough();
    source.write(Buffer.alloc(3000, 7)); // a first chunk, then nothing more
    const sending = rejection(alice.c.sendAttachment({ uid: bob.uid }, source, { size: 6000 }));
    const socket = (alice.c as unknown as { socket: net.Socket }).socket;
    await waitFor(() => socket.bytesWritten > 4000, 5000, "the first chunk written");
    const reconnected = new Promise<void>((r) => alice.c.once("reconnect", () => r()));
    socket.destroy();
    expect((await sending).code).toBe(ClientCode.Closed);
    await reconnected;
    const got = new Promise<string>((r) => bob.c.once("ev_message", (m) => r(m.body)));
    expect((await alice.c.sendMessage({ uid: bob.uid }, "after the drop")).mid).toMatch(/^\d+$/);
    expect(await got).toBe("after the drop");
    source.end();
  });

  it("messages in flight when the link drops go out again after the reconnect: in order, each stored once", async () => {
    const bob = await registered();
    const alice = await registered({ reconnect: { minMs: 50, maxMs: 200 } });
    const got: string[] = [];
    bob.c.on("ev_message", (m) => got.push(m.body));
    const { gate, restore } = holdNextWrite(srv.server.services.storage);
    let first, second, third;
    try {
      first = alice.c.sendMessage({ uid: bob.uid }, "first");
      await gate.reached;
      second = alice.c.sendMessage({ uid: bob.uid }, "second", { cmid: "mine-2" });
      // Both on the wire, and read by the server (the first one's commit is held).
      const socket = (alice.c as unknown as { socket: net.Socket }).socket;
      await waitFor(() => socket.writableLength === 0, 5000, "both written");
      const waiting = () => (srv.server.services.storage as unknown as { open: { waiters: unknown[] } }).open.waiters.length;
      await waitFor(() => waiting() >= 1, 5000, "the second in the next batch");
      await sleep(50);
      // The link drops with both unanswered; the server stores them all the same.
      socket.destroy();
      third = alice.c.sendMessage({ uid: bob.uid }, "third");
    } finally {
      restore();
    }
    const sent = await Promise.all([first, second, third]);
    expect(new Set(sent.map((s) => s.mid)).size).toBe(3);
    // Written again on the new connection: the first two (the third was never written before).
    expect(sent.map((s) => s.resent)).toEqual([true, true, false]);
    await waitFor(() => got.length >= 3, 5000, "bob's three messages");
    await bob.c.ping();
    await sleep(200);
    expect(got).toEqual(["first", "second", "third"]);
    const history = await alice.c.history({ uid: bob.uid });
    expect(history.map((m) => m.body)).toEqual(["first", "second", "third"]);
    expect(history.map((m) => m.mid)).toEqual(sent.map((s) => s.mid));
  });

  it("a register whose reply the link lost resolves after the reconnect, with the account it made", async () => {
    const c = await connect({ reconnect: { minMs: 50, maxMs: 200 } });
    const login = uniqueName("lost");
    const { gate, restore } = holdNextWrite(srv.server.services.storage);
    let made;
    try {
      made = c.register(login, "secret", login);
      await gate.reached; // the account's batch: written once the link is gone
      (c as unknown as { socket: net.Socket }).socket.destroy();
    } finally {
      restore();
    }
    const auth = await made;
    expect(auth.uid).toBe(await srv.server.services.users.lookup("login", login.toLowerCase()));
    expect((await c.ping()) > 0).toBe(true);
  });

  it("a resume that is dropped again at once backs off further instead of looping", async () => {
    // A proxy that cuts every connection after the first 100 ms after it opens.
    let cutting = false;
    const { proxy, links } = await gatedProxy(
      () => true,
      () => true,
      (inbound) => cutting && setTimeout(() => inbound.destroy(), 100),
    );
    try {
      const alice = await WirechatClient.connect({ host: "127.0.0.1", port: (proxy.address() as net.AddressInfo).port, reconnect: { minMs: 20, maxMs: 400, maxAttempts: 1_000_000 } });
      clients.push(alice);
      const login = uniqueName("bo");
      await alice.register(login, "secret", login);
      let resumes = 0;
      alice.on("reconnect", () => resumes++);
      cutting = true;
      for (const l of links) l.destroy();
      await sleep(3000);
      // Started again from 20 ms at each resume, it made ~25 in 3 s (100 ms up each).
      expect(resumes).toBeGreaterThan(2);
      expect(resumes).toBeLessThan(16);
    } finally {
      proxy.close();
      for (const l of links) l.destroy();
    }
  });

  it("an inbox frame over maxFrameBytes, sent again at every resume, stops the client instead of looping", async () => {
    const bob = await registered();
    const alice = await registered({ maxFrameBytes: 2000, reconnect: { minMs: 20, maxMs: 400, maxAttempts: 1_000_000 } });
    let resumes = 0;
    alice.c.on("reconnect", () => resumes++);
    const closed = new Promise<Error | undefined>((r) => alice.c.once("close", (err?: Error) => r(err)));
    const lost = new Promise<void>((r) => alice.c.once("disconnect", () => r()));
    (alice.c as unknown as { socket: net.Socket }).socket.destroy();
    await lost;
    // Waiting in the inbox: a frame over alice's limit, sent again after every resume.
    await bob.c.sendMessage({ uid: alice.uid }, "x".repeat(3000));
    // It reconnected for it for ever (each time after the back-off: a step that starts
    // again from 20 ms at each resume made well over a hundred in 3 s); now three
    // connections in a row ended by it stop the client, with the reason.
    const err = await Promise.race([closed, sleep(10_000).then(() => "still reconnecting")]);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/longer than 2000 bytes/);
    expect(resumes).toBeGreaterThan(0);
    expect(resumes).toBeLessThanOrEqual(3);
    expect(alice.c.connected).toBe(false);
  });

  it("refuses to send an action name the server could not say back, and stays in step", async () => {
    const { c } = await registered();
    for (const bad of ["", "x".repeat(65), "two words"]) await expect(c.request(bad)).rejects.toMatchObject({ code: ClientCode.Protocol });
    expect((await c.request("nosuchaction").catch((e: WirechatError) => e)).code).toBe(11);
    await c.ping();
    expect(c.connected).toBe(true);
  });

  it("refuses a request named like an event or notice (its reply would pass for one), and stays in step", async () => {
    const { c } = await registered();
    // Sent, ev_x's reply {"action":"ev_x",…} was taken for an event: the request waited
    // out its timeout and the next reply (this ping's) failed the match, closing the client.
    for (const bad of ["ev_x", "ev_message", "unknown", "welcome"]) await expect(c.request(bad, undefined, { timeoutMs: 2000 })).rejects.toMatchObject({ code: ClientCode.Protocol });
    await c.ping();
    expect(c.connected).toBe(true);
  });

  it("after ev_logout, another user's login starts from that user's inbox, not the first user's position", async () => {
    const b = await registered();
    b.c.destroy();
    const sender = await registered();
    const forB = await sender.c.sendMessage({ uid: b.uid }, "for b, while away");
    const a = await registered();
    const gotA = new Promise((resolve) => a.c.once("ev_message", resolve));
    const forA = await sender.c.sendMessage({ uid: a.uid }, "for a");
    await gotA;
    expect(BigInt(forA.mid) > BigInt(forB.mid)).toBe(true);
    // a's session is ended from another connection: the client stays, logged out.
    const other = await connect();
    await other.auth({ sid: a.sid });
    const ended = new Promise((resolve) => a.c.once("ev_logout", resolve));
    await other.logout();
    await ended;
    const seen: string[] = [];
    a.c.on("ev_message", (m: any) => seen.push(m.mid));
    await a.c.auth({ login: b.login, pass: "secret" });
    await waitFor(() => seen.includes(forB.mid), 3000, "b's message on the client now logged in as b");
  });

  it("the events iterator answers two next() calls in a row, each with its own event", async () => {
    const alice = await registered();
    const bob = await registered();
    const it = alice.c.events();
    const first = it.next();
    const second = it.next();
    await bob.c.sendMessage({ uid: alice.uid }, "one");
    await bob.c.sendMessage({ uid: alice.uid }, "two");
    const bodies = [];
    for (const r of [await first, await second]) bodies.push(r.value && r.value.action === "ev_message" ? r.value.data.body : r.value?.action);
    expect(bodies).toEqual(["one", "two"]);
    await it.return?.();
  });

  it("streams a file attachment with progress, and the recipient gets the same bytes", async () => {
    const alice = await registered();
    const bob = await registered();
    const file = path.join(newDir(), "blob.bin");
    const bytes = randomBytes(700 * 1024 + 5); // not a multiple of 3 or of the chunk size
    writeFileSync(file, bytes);
    const progress: number[] = [];
    const incoming = new Promise<MessageEvent>((resolve) => bob.c.on("ev_message", (m) => resolve(m)));
    // Requests queued behind the attachment must wait for its frame to end.
    const sent = alice.c.sendFile({ uid: bob.uid }, file, { mime: "application/x-test", body: "see attached", onProgress: (n, total) => {
      expect(total).toBe(bytes.length);
      progress.push(n);
    } });
    const pingAfter = alice.c.ping();
    const r = await sent;
    expect(typeof (await pingAfter)).toBe("number");
    expect(r.mid).toMatch(/^\d+$/);
    expect(progress.length).toBeGreaterThan(5);
    expect(progress.at(-1)).toBe(bytes.length);
    expect([...progress].sort((x, y) => x - y)).toEqual(progress);
    const m = await incoming;
    expect(m.mid).toBe(r.mid);
    expect(m.body).toBe("see attached");
    expect(m.attach.mime).toBe("application/x-test");
    expect(decodeAttachment(m.attach).equals(bytes)).toBe(true);
    const hist = await bob.c.history({ uid: alice.uid, limit: 1 });
    expect(decodeAttachment(hist[0].attach).equals(bytes)).toBe(true);
  });

  it("latest() pages back through history pages cut short by their attachments", async () => {
    const alice = await registered();
    // Three of 3 MB (4 MB of base64) pass the default 8 MiB cap: pages of two at most.
    const mids: string[] = [];
    for (let i = 0; i < 5; i++) {
      mids.push((await alice.c.sendAttachment({ uid: alice.uid }, Readable.from([Buffer.alloc(3_000_000, i + 1)]))).mid);
    }
    const page = await alice.c.history({ uid: alice.uid, limit: 4 });
    expect(page.map((m) => m.mid)).toEqual(mids.slice(3));
    const four = await alice.c.latest({ uid: alice.uid }, 4);
    expect(four.map((m) => m.mid)).toEqual(mids.slice(1));
    expect(four.map((m) => decodeAttachment(m.attach)[0])).toEqual([2, 3, 4, 5]);
    const newer = await alice.c.latest({ uid: alice.uid }, 100, BigInt(mids[1]));
    expect(newer.map((m) => m.mid)).toEqual(mids.slice(2));
    expect((await alice.c.latest({ uid: alice.uid }, 100)).map((m) => m.mid)).toEqual(mids);
  });

  it("reports a source that fails mid-attachment and keeps the connection in step", async () => {
    const alice = await registered();
    async function* failing() {
      yield randomBytes(3000);
      throw new Error("disk on fire");
    }
    const e = await rejection(alice.c.sendAttachment({ uid: alice.uid }, Readable.from(failing())));
    expect(e.code).toBe(ClientCode.Aborted);
    expect(e.serverMessage).toMatch(/disk on fire/);
    expect(await alice.c.sendMessage({ uid: alice.uid }, "still fine")).toHaveProperty("mid");
  });

  it("connects over TLS", async () => {
    const certPath = fileURLToPath(new URL("./fixtures/localhost.crt", import.meta.url));
    const keyPath = fileURLToPath(new URL("./fixtures/localhost.key", import.meta.url));
    const server = await startTestServer({ ...noAdmin, tlsPort: 0, tlsCert: certPath, tlsKey: keyPath });
    try {
      const c = await WirechatClient.connect({ host: "127.0.0.1", port: server.tlsPort as number, tls: { ca: readFileSync(certPath), servername: "localhost" } });
      clients.push(c);
      const login = uniqueName("tlsc");
      expect((await c.register(login, "p", login)).uid).toMatch(/\w+/);
      await c.close();
      expect(c.closed).toBe(true);
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("rejects connect() with the refusal's status when the server turns the connection away", async () => {
    const server = await startTestServer({ ...noAdmin, maxPerAddress: 1 });
    try {
      const first = await WirechatClient.connect({ port: server.port, ack: false });
      clients.push(first);
      const e = await rejection(WirechatClient.connect({ port: server.port }));
      expect(e.code).toBe(13);
      expect(e.serverMessage).toMatch(/too many connections from your address/);
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("connect() with several servers goes on to the next when one is down or turns it away", async () => {
    // A port nothing listens on: ECONNREFUSED. Its socket's 'close' came after the next
    // attempt had begun and took that attempt's welcome waiter: connect() never settled.
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, "127.0.0.1", () => r()));
    const down = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const server = await startTestServer({ ...noAdmin, maxConnections: 1 });
    try {
      const c = await WirechatClient.connect({ servers: [{ port: down }, { port: server.port }], ack: false, connectTimeoutMs: 5000 });
      clients.push(c);
      expect(typeof (await c.ping())).toBe("number");
      // The server full (--max-connections 1): turned away (16), then the next is down: the last error.
      const e = await rejection(WirechatClient.connect({ servers: [{ port: server.port }, { port: down }], ack: false, connectTimeoutMs: 5000 }));
      expect(e.code).toBe(ClientCode.Closed);
      // Turned away by the first, taken by the second.
      const other = await startTestServer(noAdmin);
      try {
        const d = await WirechatClient.connect({ servers: [{ port: server.port }, { port: other.port }], ack: false, connectTimeoutMs: 5000 });
        clients.push(d);
        expect(typeof (await d.ping())).toBe("number");
      } finally {
        await other.stop();
        removeDir(other.services.config.dataDir);
      }
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("rejects connect() with a WirechatError whose cause is the socket's error when the connection fails", async () => {
    // A port nothing listens on: ECONNREFUSED.
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, "127.0.0.1", () => r()));
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const refused = await rejection(WirechatClient.connect({ port }));
    expect(refused).toBeInstanceOf(WirechatError);
    expect(refused.code).toBe(ClientCode.Closed);
    expect(refused.serverMessage).toMatch(new RegExp(`^cannot connect to 127\\.0\\.0\\.1:${port}: .*ECONNREFUSED`));
    expect((refused.cause as NodeJS.ErrnoException).code).toBe("ECONNREFUSED");
    // A TLS server whose certificate the client does not trust.
    const certPath = fileURLToPath(new URL("./fixtures/localhost.crt", import.meta.url));
    const keyPath = fileURLToPath(new URL("./fixtures/localhost.key", import.meta.url));
    const server = await startTestServer({ ...noAdmin, tlsPort: 0, tlsCert: certPath, tlsKey: keyPath });
    try {
      const untrusted = await rejection(WirechatClient.connect({ host: "127.0.0.1", port: server.tlsPort as number, tls: { servername: "localhost" } }));
      expect(untrusted).toBeInstanceOf(WirechatError);
      expect(untrusted.code).toBe(ClientCode.Closed);
      expect((untrusted.cause as NodeJS.ErrnoException).code).toBe("DEPTH_ZERO_SELF_SIGNED_CERT");
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });

  it("close() says quit and ends the events iterator", async () => {
    const c = await connect();
    const it = c.events();
    const closed = new Promise<void>((r) => c.once("close", () => r()));
    await c.close();
    await closed;
    expect(await it.next()).toEqual({ value: undefined, done: true });
    expect((await rejection(c.ping())).code).toBe(ClientCode.Closed);
  });
});
