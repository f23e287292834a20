// A connection that sends large frames faster than they are answered: the requests read
// ahead of the one running are bounded in bytes, not only in count, so one client
// cannot make the server hold 256 × --max-frame for it.
import net from "node:net";
import { afterAll, beforeAll, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { startTestServer } from "./helpers.js";

let server: RunningServer;
beforeAll(async () => {
  // A slow hash keeps the connection's first request (register) running while the
  // large frames behind it arrive.
  server = await startTestServer({ bcryptCost: 14 });
});
afterAll(() => server.stop());

it("frames read ahead of a running request stay under a byte bound", async () => {
  const socket = net.connect({ port: server.port, host: "127.0.0.1" });
  const lines: string[] = [];
  let buf = "";
  socket.setEncoding("utf8");
  socket.on("data", (d: string) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      lines.push(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
    }
  });
  socket.on("error", () => {});
  await new Promise((r) => socket.once("connect", r));
  socket.write('{"action":"register","data":{"login":"bulk","pass":"secret-1","nick":"Bulk"}}\n');
  const pad = "x".repeat(512 * 1024);
  for (let i = 0; i < 40; i++) socket.write(`{"action":"ping","data":{"pad":"${pad}"}}\n`);
  let most = 0;
  while (!lines.some((l) => l.includes('"register"'))) {
    for (const session of server.listener.connections.values()) {
      const line = (session as unknown as { line?: { inbox: unknown[]; head: number } }).line;
      if (line) most = Math.max(most, line.inbox.length - line.head);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  // 4 MiB of 512 KiB frames: at most 9 queued (the pause comes after the frame that
  // crosses the bound); without the byte bound all 40 were read ahead.
  expect(most).toBeGreaterThan(0);
  expect(most).toBeLessThanOrEqual(9);
  // Every frame is still answered, in order, once the register is done.
  const pings = () => lines.filter((l) => l.startsWith('{"action":"ping"')).length;
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`only ${lines.length} replies`)), 20_000);
    const check = () => (pings() >= 40 ? (clearTimeout(t), resolve()) : setTimeout(check, 20));
    check();
  });
  expect(lines[0]).toContain('"welcome"');
  expect(lines[1]).toContain('"register"');
  expect(lines.slice(-40).every((l) => l.startsWith('{"action":"ping"'))).toBe(true);
  socket.destroy();
}, 60_000);
