// Hostile and broken clients at the transport, over real TCP: uploads before auth,
// refused connections that never close, replies lost to a reset, non-readers that hold
// their slot, the per-address cap, and the log of refused connections.
import { readdirSync, readFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Writable } from "node:stream";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { startServer, type RunningServer } from "../src/server.js";
import { Client, registerUser, startTestServer, testConfig, WsClient } from "./helpers.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, ms = 10_000, what = "condition"): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`${what} not met in time`);
    await sleep(20);
  }
}

/** Rejects if `p` has not settled within `ms` (a hang is a failure, not a timeout of the whole file). */
/** A logger at info whose lines are kept in `lines`. */
function capturedLog(): { lines: string[]; log: pino.Logger } {
  const lines: string[] = [];
  const log = pino(
    { level: "info" },
    new Writable({
      write(chunk, _enc, cb) {
        lines.push(chunk.toString());
        cb();
      },
    }),
  );
  return { lines, log };
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
    p.then(
      (v) => (clearTimeout(t), resolve(v)),
      (e) => (clearTimeout(t), reject(e)),
    );
  });
}

const openFds = () => readdirSync("/proc/self/fd").length;
const tmpFiles = (server: RunningServer) => readdirSync(path.join(server.services.blobs.dir, "tmp"));

/** A raw socket that records every line it gets and never fails the test on a reset. */
function rawSocket(port: number, opts: { allowHalfOpen?: boolean } = {}) {
  const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: opts.allowHalfOpen ?? false });
  let text = "";
  let reset = false;
  socket.on("data", (d) => (text += d.toString("latin1")));
  socket.on("error", () => (reset = true));
  const closed = new Promise<void>((r) => socket.on("close", () => r()));
  /** The server closed its side (or the whole connection). */
  const ended = new Promise<void>((r) => {
    socket.on("end", () => r());
    socket.on("close", () => r());
  });
  const connected = new Promise<void>((r) => socket.once("connect", () => r()));
  return {
    socket,
    connected,
    closed,
    ended,
    lines: () => text.split("\n").filter((l) => l !== ""),
    get reset() {
      return reset;
    },
  };
}

describe("uploads before auth", () => {
  it("300 unauthenticated connections sending an attachment twice in a ping leave no descriptor and no temp file", async () => {
    const server = await startTestServer({ maxPerAddress: 1000 });
    const frame = JSON.stringify({ action: "ping", data: { attach: { data: "QUJD".repeat(4096) } } }).replace(
      /}}}$/,
      ',"data":""}}}\n',
    );
    expect(frame).toContain('"data":""}}}');
    // let the server's own descriptors (database, blob dir) settle first
    await sleep(100);
    const before = openFds();
    for (let batch = 0; batch < 6; batch++) {
      await Promise.all(
        Array.from({ length: 50 }, async (_, i) => {
          const c = await Client.connect(server.port);
          if (i % 5 === 0) {
            // closed in the middle of the attachment's text
            c.write(frame.slice(0, 9000));
            await sleep(10);
          } else {
            c.write(frame);
            // one attachment per frame: the second data key makes it a bad frame
            expect((await c.reply("ping")).data.status).toBe(3);
          }
          c.close();
          await c.closed;
        }),
      );
    }
    await until(() => server.listener.connections.size === 0, 10_000, "all connections closed");
    await until(() => tmpFiles(server).length === 0 && openFds() <= before + 10, 10_000, "descriptors and temp files released");
    expect(tmpFiles(server)).toEqual([]);
    expect(openFds()).toBeLessThanOrEqual(before + 10);
    await server.stop();
  }, 60_000);

  it("an unauthenticated message with an attachment is refused with 6 and writes no temp file", async () => {
    const server = await startTestServer();
    const c = await Client.connect(server.port);
    const uploads: number[] = [];
    const blobs = server.services.blobs;
    const writer = blobs.writer.bind(blobs);
    blobs.writer = (max: number) => (uploads.push(max), writer(max));
    c.write(JSON.stringify({ action: "message", data: { uid: "1", body: "x", attach: { mime: "a/b", data: "QUJD".repeat(1000) } } }) + "\n");
    expect((await c.reply("message")).data.status).toBe(6);
    expect(uploads).toEqual([]);
    c.close();
    await server.stop();
  });

  it("a second data key in one attach is refused with 3, the first upload is discarded, and the connection goes on", async () => {
    const server = await startTestServer();
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    const frame = `{"action":"message","data":{"uid":"${b.uid}","body":"x","attach":{"mime":"a/b","data":"${"QUJD".repeat(8192)}","data":"QUJD"}}}\n`;
    a.client.write(frame);
    const r = (await a.client.reply("message")).data;
    expect(r.status).toBe(3);
    expect(r.error).toMatch(/attachment/);
    expect((await a.client.request("ping")).status).toBe(0);
    // The refusal names the action JSON.parse sees: the last of duplicate keys, not one
    // nested deeper or written first.
    const att = `"attach":{"mime":"a/b","data":"${"QUJD".repeat(64)}","data":"QUJD"}`;
    a.client.write(`{"__proto__":{"action":"x"},"action":"message","data":{"uid":"${b.uid}",${att}}}\n`);
    a.client.write(`{"action":"ping","action":"message","data":{"uid":"${b.uid}",${att}}}\n`);
    for (let i = 0; i < 2; i++) {
      const refused = await a.client.next();
      expect([refused.action, refused.data.status]).toEqual(["message", 3]);
    }
    // An empty action is no action, as for any frame: "unknown".
    a.client.write(`{"action":"message","action":"","data":{"uid":"${b.uid}",${att}}}\n`);
    expect((await a.client.next()).action).toBe("unknown");
    await until(() => tmpFiles(server).length === 0, 5000, "temp files removed");
    // a well-formed attachment still streams
    const ok = await a.client.request("message", { uid: b.uid, body: "y", attach: { mime: "a/b", data: "QUJD" } });
    expect(ok.status).toBe(0);
    expect((await b.client.event("ev_message", (m) => m.body === "y")).attach.data).toBe("QUJD");
    for (const x of [a, b]) x.client.close();
    await server.stop();
  });

  it("an attachment larger than a frame, sent right behind auth before the login is done, still streams", async () => {
    const server = await startTestServer({ maxFrame: 4096 });
    const big = "QUJD".repeat(8192);
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    const c = await Client.connect(server.port);
    c.write(
      JSON.stringify({ action: "auth", data: { login: a.login, pass: "secret" } }) +
        "\n" +
        JSON.stringify({ action: "message", data: { uid: b.uid, body: "piped", attach: { mime: "a/b", data: big } } }) +
        "\n" +
        JSON.stringify({ action: "message", data: { uid: b.uid, body: "piped2", attach: { mime: "a/b", data: big } } }) +
        "\n",
    );
    expect((await c.reply("auth")).data.status).toBe(0);
    expect((await c.reply("message")).data.status).toBe(0);
    expect((await c.reply("message")).data.status).toBe(0);
    expect((await b.client.event("ev_message", (m) => m.body === "piped")).attach.data).toBe(big);
    expect((await b.client.event("ev_message", (m) => m.body === "piped2")).attach.data).toBe(big);
    for (const x of [a.client, b.client, c]) x.close();
    await server.stop();
  });
});

describe("refused connections", () => {
  it("a refused client that keeps sending and never closes is cut off, and shutdown does not wait for it", async () => {
    const server = await startTestServer({ maxConnections: 1, closeLinger: 1, shutdownTimeout: 1 });
    const held = await Client.connect(server.port);
    const refused = rawSocket(server.port, { allowHalfOpen: true });
    await refused.connected;
    const timer = setInterval(() => !refused.socket.destroyed && refused.socket.write('{"action":"ping"}\n'), 5);
    await within(refused.closed, 8000, "the refused connection's close");
    clearInterval(timer);
    expect(refused.lines()[0]).toMatch(/"status":16/);
    // a second one, still open when the server stops
    const another = rawSocket(server.port, { allowHalfOpen: true });
    await another.connected;
    await until(() => another.lines().length > 0, 5000, "the refusal");
    await within(server.stop(), 8000, "stop()");
    held.close();
  }, 30_000);

  it("shutdown finishes within its timeout with a non-reader and a half-open client", async () => {
    const server = await startTestServer({ closeLinger: 1, shutdownTimeout: 1 });
    const a = await registerUser(server.port);
    const reader = await registerUser(server.port);
    // a non-reader with a large reply owed
    const stuck = rawSocket(server.port, { allowHalfOpen: true });
    await stuck.connected;
    stuck.socket.pause();
    stuck.socket.write(JSON.stringify({ action: "auth", data: { sid: a.sid } }) + "\n");
    for (let i = 0; i < 50; i++) reader.client.send("message", { uid: a.uid, body: "z".repeat(60_000) });
    for (let i = 0; i < 50; i++) expect((await reader.client.reply("message")).data.status).toBe(0);
    const halfOpen = rawSocket(server.port, { allowHalfOpen: true });
    await halfOpen.connected;
    halfOpen.socket.end();
    await within(server.stop(), 10_000, "stop()");
    for (const x of [a.client, reader.client]) x.close();
    stuck.socket.destroy();
  }, 30_000);

  it("TLS handshakes time out and count against the connection cap", async () => {
    const cert = fileURLToPath(new URL("./fixtures/localhost.crt", import.meta.url));
    const key = fileURLToPath(new URL("./fixtures/localhost.key", import.meta.url));
    const server = await startTestServer({ tlsPort: 0, tlsCert: cert, tlsKey: key, maxConnections: 1, tlsHandshakeTimeout: 1 });
    const silent = rawSocket(server.tlsPort as number, { allowHalfOpen: true });
    await silent.connected;
    await sleep(100);
    // the handshake in progress holds the only slot
    const plain = await Client.connect(server.port, { welcome: false });
    expect((await plain.next()).data.status).toBe(16);
    await within(silent.ended, 8000, "the silent handshake's close");
    const after = await Client.connect(server.port);
    expect((await after.request("ping")).status).toBe(0);
    after.close();
    plain.close();
    await server.stop();
    expect(readFileSync(cert).length).toBeGreaterThan(0);
  }, 30_000);
});

describe("TLS handshakes given up and addresses through two doors", () => {
  const cert = fileURLToPath(new URL("./fixtures/localhost.crt", import.meta.url));
  const key = fileURLToPath(new URL("./fixtures/localhost.key", import.meta.url));

  it("a handshake the client gives up with a FIN frees its place at once; after the handshake a FIN still gets every reply", async () => {
    const server = await startTestServer({ tlsPort: 0, tlsCert: cert, tlsKey: key, maxConnections: 1, tlsHandshakeTimeout: 20 });
    try {
      const quitter = rawSocket(server.tlsPort as number, { allowHalfOpen: true });
      await quitter.connected;
      quitter.socket.end(); // a port scan, a health check: connected, then FIN
      await within(quitter.ended, 5000, "the server's close of a handshake given up");
      // Its place is free well before --tls-handshake-timeout (20 s).
      const plain = await Client.connect(server.port);
      expect((await plain.request("ping")).status).toBe(0);
      plain.close();
      await plain.closed;
      // A TLS client that sends and closes its side gets its replies (half-open after the handshake).
      const socket = tls.connect({ port: server.tlsPort as number, host: "127.0.0.1", ca: readFileSync(cert), servername: "localhost" });
      let got = "";
      socket.on("data", (d) => (got += d.toString()));
      await new Promise<void>((resolve, reject) => socket.once("secureConnect", resolve).once("error", reject));
      // A reply that comes after the FIN (bcrypt, then a synced batch).
      const login = `half${process.pid}x${Date.now()}`;
      socket.end(JSON.stringify({ action: "register", data: { login, pass: "secret", nick: login } }) + "\n");
      await new Promise<void>((resolve) => socket.once("close", () => resolve()));
      expect(got).toMatch(/"action":"register","data":\{"status":0/);
    } finally {
      await server.stop();
    }
  }, 30_000);

  it("an IPv4 client counts once against --max-per-address on an IPv4 TCP port and an IPv6 HTTP port", async () => {
    const server = await startTestServer({ host: "127.0.0.1", httpPort: 0, httpHost: "::", maxPerAddress: 1 });
    try {
      // A WebSocket's place is given back when it closes (it was counted under one key
      // and looked for under another: never freed, the address was refused for good).
      for (let i = 0; i < 3; i++) {
        const first = await WsClient.connect(server.httpPort as number, "/wirechat");
        expect(await first.next()).toMatchObject({ action: "welcome" });
        first.ws.close();
        await first.closed;
        await sleep(100);
        const again = await Client.connect(server.port);
        expect((await again.request("ping")).status).toBe(0);
        again.close();
        await again.closed;
        await sleep(100);
      }
      const tcp = await Client.connect(server.port);
      // ::ffff:127.0.0.1 on the HTTP port's socket: the same address as 127.0.0.1.
      const ws = await WsClient.connect(server.httpPort as number, "/wirechat");
      const first = await ws.next();
      expect(first).toMatchObject({ data: { status: 13 } });
      tcp.close();
      ws.ws.close();
    } finally {
      await server.stop();
    }
  }, 30_000);
});

describe("closing without a reset", () => {
  it("a client that keeps sending after quit and reads 50 ms late gets the welcome, its ping reply and the quit reply", async () => {
    const server = await startTestServer();
    for (let run = 0; run < 5; run++) {
      const c = rawSocket(server.port, { allowHalfOpen: true });
      await c.connected;
      c.socket.pause();
      c.socket.write('{"action":"ping"}\n{"action":"quit"}\n');
      const timer = setInterval(() => !c.socket.destroyed && c.socket.write('{"action":"ping"}\n'), 1);
      await sleep(50);
      c.socket.resume();
      await until(() => c.lines().length >= 3 || c.reset, 10_000, "the replies");
      clearInterval(timer);
      const lines = c.lines();
      expect(lines[0]).toMatch(/"action":"welcome"/);
      expect(lines[1]).toMatch(/"action":"ping","data":\{"status":0/);
      expect(lines[2]).toMatch(/"action":"quit","data":\{"status":0/);
      c.socket.end();
      await within(c.closed, 8000, "close");
    }
    await server.stop();
  }, 60_000);

  it("a client over the bad-frame limit that keeps sending gets the notice", async () => {
    const server = await startTestServer();
    for (let run = 0; run < 5; run++) {
      const c = rawSocket(server.port, { allowHalfOpen: true });
      await c.connected;
      c.socket.pause();
      c.socket.write("x\n".repeat(101));
      const timer = setInterval(() => !c.socket.destroyed && c.socket.write("x\n"), 1);
      await sleep(50);
      c.socket.resume();
      await until(() => c.lines().some((l) => /too many bad frames/.test(l)) || c.reset, 10_000, "the notice");
      clearInterval(timer);
      expect(c.lines().at(-1)).toMatch(/too many bad frames/);
      c.socket.end();
      await within(c.closed, 8000, "close");
    }
    await server.stop();
  }, 60_000);
});

describe("connections closing at once", () => {
  it("past 1,024 lingering, a quit connection is cut off at once: one address cannot pile up descriptors by quitting", async () => {
    // Linger 30 s: only the cap can end these closes early. A quit connection leaves its
    // address's slot, so waves of 220 (under the per-address cap) go on and on.
    const server = await startTestServer({ closeLinger: 30 });
    const socks: ReturnType<typeof rawSocket>[] = [];
    for (let wave = 0; wave < 6; wave++) {
      const batch = Array.from({ length: 220 }, () => rawSocket(server.port, { allowHalfOpen: true }));
      await Promise.all(batch.map((r) => r.connected));
      for (const r of batch) r.socket.write('{"action":"quit"}\n');
      await within(Promise.all(batch.map((r) => r.ended)), 10_000, "the quit replies");
      socks.push(...batch);
    }
    // Every client got its quit reply; none closed its side. Bytes sent now are
    // discarded by a lingering connection and reset by one that was cut off.
    for (const r of socks) expect(r.lines().some((l) => l.includes('"quit"'))).toBe(true);
    // (A reset shows on the write after the one it answers.)
    for (const r of socks) r.socket.write("{}\n");
    await sleep(200);
    for (const r of socks) r.socket.write("{}\n");
    await until(() => socks.filter((r) => r.reset).length >= socks.length - 1024, 5_000, "the closes past the cap");
    await sleep(200);
    expect(socks.filter((r) => r.reset).length).toBeLessThanOrEqual(socks.length - 1024 + 10);
    for (const r of socks) r.socket.destroy();
    await server.stop();
  }, 60_000);
});

describe("clients that do not read", () => {
  it("a non-reader owed ~5 MB is gone shortly after its idle limit, its memory freed", async () => {
    const server = await startTestServer({ idleAuth: 1, idleUnauth: 1, closeLinger: 1 });
    const a = await registerUser(server.port);
    const sink = rawSocket(server.port, { allowHalfOpen: true });
    await sink.connected;
    const b = await registerUser(server.port);
    sink.socket.write(JSON.stringify({ action: "auth", data: { sid: b.sid } }) + "\n");
    b.client.close();
    await until(() => sink.lines().some((l) => l.includes('"action":"auth"')), 5000, "auth");
    sink.socket.pause(); // reads nothing more, never closes
    const pinger = setInterval(() => a.client.send("ping"), 300);
    for (let i = 0; i < 80; i++) a.client.send("message", { uid: b.uid, body: "y".repeat(64 * 1024) });
    for (let i = 0; i < 80; i++) expect((await a.client.reply("message", 20_000)).data.status).toBe(0);
    const conns = () => [...server.listener.connections.keys()].filter((c) => c.socket.remotePort === sink.socket.localPort);
    await until(() => conns().length === 0, 15_000, "the non-reader removed");
    clearInterval(pinger);
    expect(a.client.isClosed).toBe(false);
    a.client.close();
    sink.socket.destroy();
    await server.stop();
  }, 40_000);

  it("attachment events to a non-reader count against its outbound cap", async () => {
    const server = await startTestServer({ outboundCap: 256 * 1024 });
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    b.client.socket.pause();
    const data = "QUJD".repeat(16 * 1024); // 64 KiB of base64 each
    for (let i = 0; i < 100; i++) {
      const r = await a.client.request("message", { uid: b.uid, body: `${i}`, attach: { mime: "a/b", data } });
      expect(r.status).toBe(0);
      while (a.client.frames.length > 0) a.client.frames.pop();
      if (b.client.isClosed) break;
    }
    b.client.socket.resume();
    await within(b.client.closed, 10_000, "the slow reader's close");
    a.client.close();
    await server.stop();
  }, 60_000);
});

describe("a reader behind large attachments", () => {
  it("is not closed as a slow reader by a dozen large attachments in a row", async () => {
    const server = await startTestServer();
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    // b reads nothing while twelve 1.5 MiB attachments are sent to it: each used to
    // count as 2 MiB (a quarter of the 8 MiB cap), so once the socket buffers were full
    // the fifth one queued closed it.
    b.client.socket.pause();
    const data = Buffer.alloc(1536 * 1024, 7).toString("base64");
    for (let i = 0; i < 12; i++) {
      const r = await a.client.request("message", { uid: b.uid, body: `big ${i}`, attach: { mime: "a/b", data } });
      expect(r.status).toBe(0);
    }
    await sleep(200);
    expect(b.client.isClosed).toBe(false);
    b.client.socket.resume();
    for (let i = 0; i < 12; i++) {
      const ev = await b.client.event("ev_message", (m) => m.body === `big ${i}`, 30_000);
      expect(ev.attach.data.length).toBe(data.length);
    }
    expect(b.client.isClosed).toBe(false);
    for (const x of [a, b]) x.client.close();
    await server.stop();
  }, 60_000);
});

describe("a reader under a small outbound cap", () => {
  it("a sender's own echoes of messages it pipelines do not close it, and one event larger than the cap reaches a reader that keeps up", async () => {
    const server = await startTestServer({ outboundCap: 64 * 1024 });
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    // 100 messages of 10 KB in one write: their echoes to a (1 MB) were queued in the
    // turn their batch landed, past a's cap, and a was closed with none of its replies.
    const body = "e".repeat(10_000);
    a.client.socket.write(Array.from({ length: 100 }, (_, i) => JSON.stringify({ action: "message", data: { uid: b.uid, body: `${i} ${body}` } }) + "\n").join(""));
    for (let i = 0; i < 100; i++) expect((await a.client.reply("message", 20_000)).data.status).toBe(0);
    for (let i = 0; i < 100; i++) await b.client.event("ev_message", (m) => m.body === `${i} ${body}`, 20_000);
    expect(a.client.isClosed).toBe(false);
    expect(b.client.isClosed).toBe(false);
    // One message of 100 KB (under --max-frame) to b, who reads: b was closed as a slow
    // reader, its cap smaller than the one frame (and a, its reply queued before its echo).
    const big = "B".repeat(100_000);
    expect((await a.client.request("message", { uid: b.uid, body: big })).status).toBe(0);
    expect((await b.client.event("ev_message", (m) => m.body === big, 20_000)).body.length).toBe(big.length);
    expect(b.client.isClosed).toBe(false);
    for (const x of [a, b]) x.client.close();
    await server.stop();
  }, 60_000);
});

describe("the per-address cap", () => {
  it("200 clients from one address, each connecting and registering at once, all succeed by default", async () => {
    const server = await startTestServer();
    const accounts = await Promise.all(Array.from({ length: 200 }, () => registerUser(server.port)));
    expect(new Set(accounts.map((x) => x.uid)).size).toBe(200);
    for (const x of accounts) x.client.close();
    await server.stop();
  }, 60_000);

  it("counts only unauthenticated connections", async () => {
    const server = await startTestServer({ maxPerAddress: 3 });
    const users = [];
    for (let i = 0; i < 5; i++) users.push(await registerUser(server.port));
    const anon = await Promise.all([1, 2, 3].map(() => Client.connect(server.port)));
    const extra = await Client.connect(server.port, { welcome: false });
    expect((await extra.next()).data.status).toBe(13);
    for (const x of [...users.map((u) => u.client), ...anon]) expect((await x.request("ping")).status).toBe(0);
    for (const x of [...users.map((u) => u.client), ...anon, extra]) x.close();
    await server.stop();
  });
});

describe("unfinished frames, all connections together", () => {
  it("past --max-partial-input the largest unfinished frame is shed (13, skipped), the connection goes on, and what was held is let go", async () => {
    const server = await startTestServer({ maxPartialInput: 64 * 1024 });
    const held = () => server.services.metrics.partialInput.bytes;
    const [a, b] = await Promise.all([Client.connect(server.port), Client.connect(server.port)]);
    const head = (n: number) => '{"action":"ping","data":{"pad":"' + "x".repeat(n);
    const tail = '"}}\n';
    // Each frame in two writes, apart: the server holds each head until its tail comes.
    a.socket.write(head(20_000));
    await until(() => held() >= 20_000, 10_000, "a's head held");
    // b's would be the largest: b's is shed, however its bytes are split into reads.
    b.socket.write(head(60_000));
    await sleep(100);
    b.socket.write(tail);
    const refused = await b.next();
    expect(refused).toMatchObject({ action: "ping", data: { status: 13, error: expect.stringMatching(/unfinished frames/) } });
    expect((await b.request("ping")).status).toBe(0);
    // a's frame was held, not shed: answered as any ping is.
    a.socket.write(tail);
    expect((await a.next()).data.status).toBe(0);
    expect(held()).toBe(0);

    // Now a holds the largest: a later, smaller frame of b's makes room by shedding it.
    a.socket.write(head(60_000));
    await until(() => held() >= 60_000, 10_000, "a's large head held");
    b.socket.write(head(20_000));
    await sleep(100);
    b.socket.write(tail);
    expect((await b.next()).data.status).toBe(0);
    a.socket.write(tail);
    expect((await a.next()).data).toMatchObject({ status: 13, error: expect.stringMatching(/send it again/) });
    expect((await a.request("ping")).status).toBe(0);
    expect(held()).toBe(0);

    // A connection that goes away lets go of its unfinished frame.
    a.socket.write(head(40_000));
    await until(() => held() >= 40_000, 10_000, "a's third head held");
    a.socket.destroy();
    await until(() => held() === 0, 10_000, "a's head let go");
    b.close();
    await server.stop();
  });

  it("what counts is the memory an unfinished frame keeps: a frame's first bytes count the 1 KiB buffer they are kept in", async () => {
    const server = await startTestServer({ maxPartialInput: 8 * 1024 });
    const held = () => server.services.metrics.partialInput.bytes;
    const conns = await Promise.all(Array.from({ length: 9 }, () => Client.connect(server.port)));
    // Ten bytes of a frame each (kept in a 1 KiB buffer; counted as 10 bytes, 800
    // connections' worth fitted where eight do).
    for (let i = 0; i < 8; i++) {
      conns[i].socket.write('{"action":');
      await until(() => held() === (i + 1) * 1024, 10_000, `connection ${i}'s head held`);
    }
    conns[8].socket.write('{"action":');
    await sleep(100);
    expect(held()).toBe(8 * 1024);
    for (const c of conns) c.socket.write('"ping"}\n');
    for (let i = 0; i < 8; i++) expect((await conns[i].next()).data.status).toBe(0);
    expect((await conns[8].next()).data).toMatchObject({ status: 13, error: expect.stringMatching(/unfinished frames/) });
    expect(held()).toBe(0);
    for (const c of conns) c.close();
    await server.stop();
  });

  it("a frame shed for the budget is not a bad frame: sent again and again, the connection stays", async () => {
    const server = await startTestServer({ maxPartialInput: 64 * 1024, badFrameLimit: 2 });
    const held = () => server.services.metrics.partialInput.bytes;
    const [a, b] = await Promise.all([Client.connect(server.port), Client.connect(server.port)]);
    a.socket.write('{"action":"ping","data":{"pad":"' + "x".repeat(20_000));
    await until(() => held() >= 20_000, 10_000, "a's head held");
    for (let i = 0; i < 4; i++) {
      b.socket.write('{"action":"ping","data":{"pad":"' + "x".repeat(60_000));
      await sleep(50);
      b.socket.write('"}}\n');
      expect((await b.next()).data.status).toBe(13);
    }
    expect((await b.request("ping")).status).toBe(0);
    expect(b.isClosed).toBe(false);
    a.close();
    b.close();
    await server.stop();
  });
  it("WebSockets' unfinished messages count too: the socket holding the most is closed (a 13, then 1013) to make room; a frame or message held less goes on", async () => {
    const server = await startTestServer({ httpPort: 0, maxPartialInput: 64 * 1024 });
    try {
      const held = () => server.services.metrics.partialInput.bytes;
      const wsOpen = async () => {
        const w = await WsClient.connect(server.httpPort as number, "/wirechat");
        expect((await w.next()).action).toBe("welcome");
        return w;
      };
      const [w, v, u] = await Promise.all([wsOpen(), wsOpen(), wsOpen()]);
      const a = await Client.connect(server.port);
      const head = (n: number) => '{"action":"ping","data":{"pad":"' + "x".repeat(n);
      const tail = '"}}';
      // What is held counts, not what a frame's header announces: 14 bytes saying 200,000 hold nothing yet.
      const announce = Buffer.alloc(14);
      announce[0] = 0x81; // a text frame, final
      announce[1] = 0x80 | 127; // masked, 64-bit length
      announce.writeBigUInt64BE(200_000n, 2);
      (u.ws as unknown as { _socket: { write(b: Buffer): void } })._socket.write(announce);
      await sleep(200);
      expect(held()).toBeLessThan(100);
      expect(u.isClosed).toBe(false);
      // w: a message's first fragment, the message unfinished.
      w.ws.send(head(50_000), { fin: false });
      await until(() => held() >= 50_000, 10_000, "w's fragment held");
      // A TCP frame that needs the room: w holds more, w is closed (told why first).
      a.socket.write(head(20_000));
      expect((await w.closed).code).toBe(1013);
      expect(w.texts.some((t) => /"status":13,.*unfinished messages/.test(t))).toBe(true);
      a.socket.write(tail + "\n");
      expect((await a.next()).data.status).toBe(0);
      await until(() => held() === 0, 10_000, "w's bytes let go");

      // Now the TCP frame holds the most: a WebSocket's smaller message, in fragments, sheds it.
      a.socket.write(head(50_000));
      await until(() => held() >= 50_000, 10_000, "a's head held");
      v.ws.send(head(20_000), { fin: false });
      await sleep(100);
      v.ws.send(tail, { fin: true });
      expect((await v.next((m) => m.action === "ping")).data.status).toBe(0);
      a.socket.write(tail + "\n");
      expect((await a.next()).data).toMatchObject({ status: 13, error: expect.stringMatching(/send it again/) });
      expect(held()).toBe(0);

      // A WebSocket message that would be the largest and does not fit: its own socket is closed.
      a.socket.write(head(30_000));
      await until(() => held() >= 30_000, 10_000, "a's second head held");
      v.ws.send(head(40_000), { fin: false });
      expect((await v.closed).code).toBe(1013);
      a.socket.write(tail + "\n");
      expect((await a.next()).data.status).toBe(0);
      expect(held()).toBe(0);
      expect(server.services.metrics.closes.input_budget).toBe(2);
      a.close();
    } finally {
      await server.stop();
    }
  });
  it("HTTP request bodies count too: one holding the most is answered 429 in its door's shape (13) to make room; one cut off lets go", async () => {
    const server = await startTestServer({ httpPort: 0, maxPartialInput: 64 * 1024 });
    try {
      const held = () => server.services.metrics.partialInput.bytes;
      const post = (path: string, length: number) => {
        const s = net.connect(server.httpPort as number, "127.0.0.1");
        let text = "";
        s.on("data", (d) => (text += d.toString()));
        s.on("error", () => {});
        s.write(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`);
        return { s, answer: () => text };
      };
      const json = (n: number) => '{"username":"' + "x".repeat(n);
      const a = await Client.connect(server.port);
      const head = (n: number) => '{"action":"ping","data":{"pad":"' + "x".repeat(n);
      const tail = '"}}\n';
      // A body of 60,000 bytes, 50,000 of them sent: held until the rest comes.
      const big = post("/create_user", 60_000);
      big.s.write(json(50_000));
      await until(() => held() >= 50_000, 10_000, "the body held");
      // A TCP frame needs the room: the body holds more, it is refused in seed 003's shape.
      a.socket.write(head(20_000));
      await until(() => /^HTTP\/1\.1 429/.test(big.answer()), 10_000, "the body's 429");
      expect(big.answer()).toMatch(/unfinished requests/);
      a.socket.write(tail);
      expect((await a.next()).data.status).toBe(0);
      await until(() => held() === 0, 10_000, "the body let go");
      big.s.destroy();

      // The TCP frame holds the most: a smaller body (e_chat, in two writes) sheds it and is answered.
      a.socket.write(head(50_000));
      await until(() => held() >= 50_000, 10_000, "a's head held");
      const small = post("/v1/login", 20_002);
      small.s.write(json(10_000));
      await sleep(100);
      small.s.write("x".repeat(10_000) + '"}');
      await until(() => /^HTTP\/1\.1 \d+/.test(small.answer()), 10_000, "the login's answer");
      expect(small.answer()).not.toMatch(/^HTTP\/1\.1 429/);
      a.socket.write(tail);
      expect((await a.next()).data).toMatchObject({ status: 13, error: expect.stringMatching(/send it again/) });
      small.s.destroy();

      // A body cut off half way lets go of what it held.
      const cut = post("/create_user", 60_000);
      cut.s.write(json(40_000));
      await until(() => held() >= 40_000, 10_000, "the third body held");
      cut.s.destroy();
      await until(() => held() === 0, 10_000, "the cut body let go");

      // A body nothing reads (a GET's, one of a media type no route takes, one past
      // --max-frame): let go with the answer, and never an 'error' nobody hears (it ended
      // the process) when room is made later.
      for (const [method, type, length] of [
        ["GET /status", "application/json", 60_000],
        ["POST /create_user", "text/plain", 60_000],
        ["POST /create_user", "application/json", 2_000_000],
      ] as const) {
        const s = net.connect(server.httpPort as number, "127.0.0.1");
        let text = "";
        s.on("data", (d) => (text += d.toString()));
        s.on("error", () => {});
        s.write(`${method} HTTP/1.1\r\nHost: x\r\nContent-Type: ${type}\r\nContent-Length: ${length}\r\n\r\n` + json(30_000));
        await until(() => /^HTTP\/1\.1 \d+/.test(text), 10_000, `${method} ${type} answered`);
        await until(() => held() === 0, 10_000, `${method} ${type}'s body let go`);
        a.socket.write(head(20_000));
        await sleep(50);
        a.socket.write(tail);
        expect((await a.next()).data.status).toBe(0);
        s.destroy();
      }
      expect((await a.request("ping")).status).toBe(0);
      a.close();
    } finally {
      await server.stop();
    }
  });
});

describe("the log of refused connections", () => {
  it("a flood of refused connections from one address logs a line, not one per connection", async () => {
    const { lines, log } = capturedLog();
    const server = await startServer(testConfig({ maxConnections: 1, logLevel: "info" }), log);
    const held = await Client.connect(server.port);
    for (let i = 0; i < 100; i++) {
      const c = rawSocket(server.port);
      await c.closed;
    }
    const refusals = lines.filter((l) => /connection refused/.test(l));
    expect(refusals.length).toBeGreaterThanOrEqual(1);
    expect(refusals.length).toBeLessThanOrEqual(2);
    held.close();
    await server.stop();
  }, 30_000);

  it("refusals of another reason from the same address within the window get their own line", async () => {
    const { lines, log } = capturedLog();
    const server = await startServer(testConfig({ httpPort: 0, maxPerAddress: 1, logLevel: "info" }), log);
    const port = server.httpPort as number;
    const refusalLines = () => lines.map((l) => JSON.parse(l)).filter((l) => /^connection refused: /.test(l.msg));
    /** A socket that sends `bytes`; resolves with what the server sent before it closed. */
    const exchange = (bytes: string) =>
      new Promise<string>((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => s.write(bytes));
        let got = "";
        s.on("data", (d) => (got += d.toString("latin1")));
        s.on("error", () => undefined);
        s.on("close", () => resolve(got));
      });
    // Over the address's cap, twice: one line.
    const held = net.connect(port, "127.0.0.1");
    held.on("error", () => undefined);
    await new Promise((r) => held.once("connect", r));
    for (let i = 0; i < 2; i++) expect(await exchange("GET /status HTTP/1.1\r\nHost: x\r\n\r\n")).toBe("");
    await until(() => refusalLines().length === 1, 5000, "the cap's line");
    // Then requests node's parser refuses (once the held socket's place is free: until
    // then they are refused for the cap, folded into its line), twice: a line of their
    // own. It was folded into the cap's too, whose window was still open.
    held.destroy();
    let answered = 0;
    for (let i = 0; i < 100 && answered < 2; i++) if (/^HTTP\/1\.1 400 /.test(await exchange("GARBAGE\r\n\r\n"))) answered++;
    expect(answered).toBe(2);
    await until(() => refusalLines().length === 2, 5000, "the bad request's line");
    await sleep(200);
    const [cap, bad] = refusalLines();
    expect(cap).toMatchObject({ remote: "127.0.0.1", msg: expect.stringContaining("too many") });
    expect(bad).toMatchObject({ remote: "127.0.0.1", msg: expect.stringContaining("HTTP 400") });
    expect(refusalLines()).toHaveLength(2);
    await server.stop();
  }, 30_000);

  it("connections from one address closed for bad frames log a line, not one per connection", async () => {
    const { lines, log } = capturedLog();
    const server = await startServer(testConfig({ badFrameLimit: 2, logLevel: "info" }), log);
    // 50 connections, each past its bad-frame limit: each was a warn line of its own.
    for (let i = 0; i < 50; i++) {
      const c = await Client.connect(server.port);
      c.write("garbage\n".repeat(3));
      await c.closed;
    }
    expect(server.services.metrics.closes.bad_frames).toBe(50);
    const closes = lines.filter((l) => /too many bad frames/.test(l));
    expect(closes).toHaveLength(1);
    expect(JSON.parse(closes[0])).toMatchObject({ level: 40, remote: "127.0.0.1", limit: 2, msg: "connection closed: too many bad frames" });
    await server.stop();
  }, 30_000);
});
