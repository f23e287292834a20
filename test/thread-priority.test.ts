// The server process lowers its background threads (LevelDB, libuv's pool, V8's
// helpers) below the event loop, read back from /proc like `ps -L -o tid,nice` does.
import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { Client } from "./helpers.js";
import { useChildServers } from "./pipeline-helpers.js";

const startChild = useChildServers("each");

/** thread id → nice value, for every thread of `pid`. */
function niceByThread(pid: number): Map<number, number> {
  const out = new Map<number, number>();
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${t}/stat`, "utf8");
    } catch {
      continue; // ended meanwhile
    }
    // Fields after the command name (which may hold spaces): state is field 3, nice 19.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    out.set(Number(t), Number(fields[19 - 3]));
  }
  return out;
}

describe("background thread priority", () => {
  it("leaves the event loop at 0 and lowers every other thread to --background-nice (default 10)", async () => {
    const child = await startChild();
    const pid = child.proc.pid as number;
    // Work in the pool and in LevelDB first, so every kind of thread has been started.
    const c = await Client.connect(child.port);
    expect((await c.request("register", { login: "nice1", pass: "secret", nick: "n" })).status).toBe(0);
    c.close();
    await expect.poll(() => [...niceByThread(pid)].filter(([tid, nice]) => tid !== pid && nice !== 10), { timeout: 15000, interval: 500 }).toEqual([]);
    const threads = niceByThread(pid);
    expect(threads.get(pid)).toBe(0);
    expect(threads.size).toBeGreaterThan(4); // the loop, V8's helpers, libuv's pool
    expect(child.stdout()).toMatch(/"nice":10,"threads":\d+,"msg":"background threads lowered below the event loop"/);
  });

  it("changes nothing with --background-nice 0", async () => {
    const child = await startChild(["--background-nice", "0"]);
    const pid = child.proc.pid as number;
    const c = await Client.connect(child.port);
    expect((await c.request("ping")).status).toBe(0);
    c.close();
    expect([...niceByThread(pid).values()].every((n) => n === 0)).toBe(true);
    expect(child.stdout()).not.toMatch(/background threads lowered/);
  });
});
