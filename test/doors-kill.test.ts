// kill -9 under load on the seed doors: every message a door acknowledged (000's
// send_message 200, 001's SND_MSG OK) is there after the restart.

import { describe, expect, it } from "vitest";
import { ChildServer, Client, uniqueName, useTempDirs, type Frame } from "./helpers.js";

const newDataDir = useTempDirs();

function portOf(child: ChildServer, key: string): number {
  const m = new RegExp(`"${key}":(\\d+)[^\\n]*"msg":"wirechat listening"`).exec(child.stdout());
  if (!m) throw new Error(`no ${key} in the listening line`);
  return Number(m[1]);
}

async function ask(c: Client, req: Record<string, unknown>, match: (f: Frame) => boolean): Promise<Frame> {
  c.write(JSON.stringify(req) + "\n");
  return c.next(match);
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
    expect((await ask(rust, { action: "registration", login: rl, password: "p" }, (f) => f.action === "registration")).code).toBe(200);
    expect((await ask(rooms, { type: "REQUEST_SIGNUP", login: a, pass: "p" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const other = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    expect((await ask(other, { type: "REQUEST_SIGNUP", login: b, pass: "p" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
    const room = (await ask(rooms, { type: "CREATE_ROOM", username: a, customer: b }, (f) => f.type === "CREATE_ROOM")).id as number;

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
    expect((await ask(r2, { action: "authentication", login: rl, password: "p" }, (f) => f.action === "authentication")).code).toBe(200);
    const got = await ask(r2, { action: "get_messages", number_of_messages: 500 }, (f) => f.action === "get_messages");
    const texts = new Set(got.messages.map((m: { text: string }) => m.text));
    for (const t of acked.rust) expect(texts.has(t)).toBe(true);

    const o2 = await Client.connect(portOf(child, "roomsPort"), { welcome: false });
    expect((await ask(o2, { type: "REQUEST_LOGIN", login: a, pass: "p" }, (f) => f.type === "RESPONSE_LOGIN")).status).toBe("LOGIN_OK");
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
