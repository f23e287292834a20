// Shutdown with work still running: presence hooks of the users it disconnects, blob
// collects and purges in the background. Each runs before storage closes or not at all,
// and nothing is logged at error level or crashes the process.
import { describe, expect, it } from "vitest";
import { ChildServer, Client, registerUser, useTempDirs, type Account } from "./helpers.js";

const newDataDir = useTempDirs();

/** pino lines of the child's output at level `min` or above. */
function logged(out: string, min: number): string[] {
  return out.split("\n").filter((line) => {
    if (!line.startsWith("{")) return line.trim() !== "";
    try {
      return (JSON.parse(line) as { level?: number }).level! >= min;
    } catch {
      return true;
    }
  });
}

/** `count` users logged in, each listing every other as a contact. */
async function friends(port: number, count: number): Promise<Account[]> {
  const users = await Promise.all(Array.from({ length: count }, () => registerUser(port)));
  await Promise.all(
    users.map(async (u) => {
      for (const v of users) if (v !== u) expect((await u.client.request("addcontact", { uid: v.uid })).status).toBe(0);
    }),
  );
  return users;
}

describe("SIGTERM with logged-in users", () => {
  it("runs their presence hooks before storage closes: exit 0, nothing logged at error level", async () => {
    for (let round = 0; round < 3; round++) {
      const child = await ChildServer.start(newDataDir());
      const users = await friends(child.port, 12);
      child.proc.kill("SIGTERM");
      expect(await child.exited).toBe(0);
      expect(logged(child.stdout(), 50)).toEqual([]);
      expect(child.stdout()).toMatch(/wirechat stopped/);
      for (const u of users) u.client.close();
    }
  }, 60_000);
});

describe("a stdout that stops taking the log", () => {
  it("holds a bounded log buffer (the lines past it dropped and counted) and does not keep SIGTERM from ending the process", async () => {
    process.env.WIRECHAT_TEST_LOG_BUFFER_BYTES = String(64 * 1024);
    let child: ChildServer;
    try {
      child = await ChildServer.start(newDataDir(), ["--log-level", "debug"]);
    } finally {
      delete process.env.WIRECHAT_TEST_LOG_BUFFER_BYTES;
    }
    // Nothing reads the server's stdout from here on: the pipe fills, then the buffer.
    child.proc.stdout?.removeAllListeners("data");
    child.proc.stdout?.pause();
    const dropped = async () => {
      const text = await (await fetch(`http://127.0.0.1:${child.adminPort}/metrics`)).text();
      return Number(/^wirechat_log_lines_dropped_total (\d+)/m.exec(text)?.[1] ?? NaN);
    };
    expect(await dropped()).toBe(0);
    // A few debug lines each (connection open and close).
    for (let i = 0; i < 3000 && (await dropped()) === 0; i += 100) {
      await Promise.all(Array.from({ length: 100 }, async () => (await Client.connect(child.port)).close()));
    }
    expect(await dropped()).toBeGreaterThan(0);
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  }, 60_000);
});

describe("SIGTERM tells every connection why it closes", () => {
  it("native ev_close, rust_messages close_connection 300, rooms API ERROR, each the last frame before the close", async () => {
    const child = await ChildServer.start(newDataDir(), ["--rust-port", "0", "--rooms-port", "0"]);
    const native = await registerUser(child.port);
    const rust = await Client.connect(child.portOf("rustPort") as number, { welcome: false });
    rust.write(JSON.stringify({ action: "registration", login: `r${process.pid}x`, password: "pw" }) + "\n");
    await rust.next((f) => f.action === "registration");
    const rooms = await Client.connect(child.portOf("roomsPort") as number, { welcome: false });
    rooms.write(JSON.stringify({ type: "REQUEST_SIGNUP", login: `o${process.pid}x`, pass: "pw" }) + "\n");
    await rooms.next((f) => f.type === "RESPONSE_SIGNUP");
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
    await Promise.all([native.client.closed, rust.closed, rooms.closed]);
    expect(JSON.parse(rooms.lines.at(-1) as string)).toEqual({ type: "ERROR", status: "ERROR", error: "closing the connection: the server is shutting down" });
    expect(JSON.parse(native.client.lines.at(-1) as string)).toEqual({ action: "ev_close", data: { reason: "the server is shutting down" } });
    expect(JSON.parse(rust.lines.at(-1) as string)).toEqual({ action: "close_connection", code: 300, message: "the server is shutting down" });
  }, 30_000);
});

describe("SIGTERM while blobs are collected and a channel is purged", () => {
  it("exits 0 with nothing logged at error level and no unhandled rejection", async () => {
    for (let round = 0; round < 3; round++) {
      const child = await ChildServer.start(newDataDir());
      const [a, b] = await Promise.all([registerUser(child.port), registerUser(child.port)]);
      const chid = (await a.client.request("createchannel", { name: `purge${process.pid}x${round}` })).chid;
      // Distinct attachments in a channel and in a direct conversation.
      const mids: string[] = [];
      for (let i = 0; i < 60; i++) {
        const data = Buffer.from(`attachment ${round} ${i} `.repeat(40)).toString("base64");
        a.client.send("message", { channel: chid, body: "", attach: { mime: "text/plain", data } });
        a.client.send("message", { uid: b.uid, body: "", attach: { mime: "text/plain", data: data + "" } });
      }
      for (let i = 0; i < 120; i++) {
        const r = (await a.client.reply("message", 15_000)).data;
        expect(r.status).toBe(0);
        mids.push(r.mid);
      }
      // Deletions (each collects its blob after its reply) and a channel purge in the
      // background, cut short by SIGTERM.
      a.client.send("deletechannel", { channel: chid });
      for (const mid of mids) a.client.send("delmessage", { mid });
      await a.client.reply("deletechannel", 15_000);
      await a.client.reply("delmessage", 15_000);
      child.proc.kill("SIGTERM");
      expect(await child.exited).toBe(0);
      expect(logged(child.stdout(), 50)).toEqual([]);
      a.client.close();
      b.client.close();
    }
  }, 90_000);
});

describe("SIGTERM with password checks queued", () => {
  it("answers the waiting ones 16 at once: exit 0 within the shutdown timeout, nothing logged at error level", async () => {
    // 40 registrations from one address at bcrypt cost 12 (a quarter second or more
    // each, two at a time) queue for several seconds, longer than the 2 s shutdown
    // timeout: had they been left to run, storage would close under their handlers.
    const child = await ChildServer.start(newDataDir(), ["--bcrypt-cost", "12", "--shutdown-timeout", "2"]);
    const clients = await Promise.all(Array.from({ length: 40 }, () => Client.connect(child.port)));
    clients.forEach((c, i) => c.send("register", { login: `queued${process.pid}x${i}`, pass: "secret-pass", nick: `Queued${i}` }));
    await new Promise((r) => setTimeout(r, 300));
    child.proc.kill("SIGTERM");
    const replies = await Promise.all(clients.map((c) => c.reply("register", 15_000).then((f) => f.data.status as number, () => -1)));
    expect(await child.exited).toBe(0);
    expect(logged(child.stdout(), 50)).toEqual([]);
    // Checks that ran finished (0); the rest were answered 16 or cut by the close (-1).
    expect(replies.filter((s) => s === 16).length).toBeGreaterThan(20);
    expect(replies.every((s) => s === 0 || s === 16 || s === -1)).toBe(true);
    for (const c of clients) c.close();
  }, 60_000);
});

describe("SIGTERM with a slow reader behind an idle connection", () => {
  it("answers every request the slow reader had sent before it closes, whatever connection the listener lists first", async () => {
    const child = await ChildServer.start(newDataDir());
    // Listed first: a connection with nothing to answer.
    const idle = await registerUser(child.port);
    const slow = await registerUser(child.port);
    const c = slow.client;
    const chid = (await c.request("createchannel", { name: `slow${process.pid}` })).chid;
    const M = 300;
    for (let i = 0; i < M; i++) c.send("message", { channel: chid, body: `${i} `.padEnd(1000, "x") });
    for (let i = 0; i < M; i++) expect((await c.reply("message", 15_000)).data.status).toBe(0);
    const before = c.lines.length;
    // 60 replies of 300 KB, read in one go; the client stops reading for a while, so the
    // server holds the rest of them until it drains.
    const K = 60;
    c.write(Array.from({ length: K }, () => JSON.stringify({ action: "history", data: { channel: chid, limit: M } }) + "\n").join(""));
    await c.reply("history", 10_000);
    c.socket.pause();
    await new Promise((r) => setTimeout(r, 300));
    child.proc.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 300));
    c.socket.resume();
    expect(await child.exited).toBe(0);
    await c.closed;
    expect(c.lines.slice(before).filter((l) => l.startsWith('{"action":"history"')).length).toBe(K);
    idle.client.close();
  }, 60_000);
});
