// The server process lowers its background threads (LevelDB's compaction, V8's helpers)
// below the event loop and libuv's pool, read back from /proc like `ps -L -o tid,nice`
// does.
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { CompactionCatchUp } from "../src/thread-priority.js";
import { admin, parseProm, sample } from "./admin-helpers.js";
import { ChildServer, Client, registerUser } from "./helpers.js";
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
  it("leaves the event loop and libuv's pool at 0 and lowers every other thread to --background-nice (default 10)", async () => {
    const child = await startChild();
    const pid = child.proc.pid as number;
    // Work in the pool and in LevelDB first, so every kind of thread has been started.
    const c = await Client.connect(child.port);
    expect((await c.request("register", { login: "nice1", pass: "secret", nick: "n" })).status).toBe(0);
    c.close();
    await expect.poll(() => child.stdout(), { timeout: 15000, interval: 200 }).toMatch(/"nice":10,"threads":\d+,"pool":4,"msg":"background threads lowered below the event loop"/);
    // The loop and the pool's four threads at 0, every other thread at 10.
    await expect
      .poll(
        () => {
          const nices = [...niceByThread(pid)].filter(([tid]) => tid !== pid).map(([, n]) => n);
          return { atZero: nices.filter((n) => n === 0).length, other: nices.filter((n) => n !== 0 && n !== 10).length };
        },
        { timeout: 15000, interval: 500 },
      )
      .toEqual({ atZero: 4, other: 0 });
    const threads = niceByThread(pid);
    expect(threads.get(pid)).toBe(0);
    expect([...threads.values()].filter((n) => n === 10).length).toBeGreaterThan(1); // V8's helpers at least
  });

  it("starts LevelDB's background thread lowered: a memtable flush under load runs on a thread already at 10", async () => {
    const child = await startChild();
    const pid = child.proc.pid as number;
    const u = await registerUser(child.port);
    await expect.poll(() => child.stdout(), { timeout: 15000, interval: 200 }).toMatch(/"msg":"background threads lowered below the event loop"/);
    // The loop and the pool's four threads at 0, every other thread at 10.
    await expect.poll(() => [...niceByThread(pid)].filter(([, n]) => n === 0).length, { timeout: 15000, interval: 200 }).toBe(5);
    const before = new Set(niceByThread(pid).keys());
    // More than the 64 MiB write buffer, so LevelDB flushes its memtable to a table;
    // random, so that the table (Snappy-compressed) is as large as the LOG line expects.
    const body = randomBytes(675_000).toString("base64");
    for (let i = 0; i < 80; i++) expect((await u.client.request("message", { uid: u.uid, body })).status).toBe(0);
    const log = () => readFileSync(`${child.dataDir}/db/LOG`, "utf8");
    await expect.poll(() => /Level-0 table #\d+: \d{8,} bytes OK/.test(log()), { timeout: 30000, interval: 200 }).toBe(true);
    // The flush ran on a thread that was there, lowered, before the load: none was added.
    const after = niceByThread(pid);
    expect([...after.keys()].filter((tid) => !before.has(tid))).toEqual([]);
    expect([...after].filter(([tid, n]) => tid !== pid && n !== 0 && n !== 10)).toEqual([]);
    u.client.close();
  }, 60_000);

  it("changes nothing with --background-nice 0", async () => {
    const child = await startChild(["--background-nice", "0"]);
    const pid = child.proc.pid as number;
    const c = await Client.connect(child.port);
    expect((await c.request("ping")).status).toBe(0);
    c.close();
    expect([...niceByThread(pid).values()].every((n) => n === 0)).toBe(true);
    expect(child.stdout()).not.toMatch(/background threads lowered/);
  });

  it("scavenges and sweeps freed buffers on the event loop alone when the process may run on one CPU (taskset), and keeps V8's helpers with more", async () => {
    const line = /"cpus":1,"parallelScavenge":false,"concurrentArrayBufferSweeping":false,"msg":"one CPU to run on: young-generation collections run on the event loop alone"/;
    const one = await startChild([], ["taskset", "-c", "0"]);
    const c = await Client.connect(one.port);
    expect((await c.request("ping")).status).toBe(0); // the line follows "listening"
    c.close();
    await expect.poll(() => one.stdout(), { timeout: 5000 }).toMatch(line);
    const all = await startChild();
    const d = await Client.connect(all.port);
    expect((await d.request("ping")).status).toBe(0);
    d.close();
    expect(line.test(all.stdout())).toBe(os.availableParallelism() === 1);
  });

  it("ends the password-hashing threads after --hash-thread-idle seconds without a check, and starts one, already lowered, for the next", async () => {
    const child = await startChild(["--hash-thread-idle", "1"]);
    const pid = child.proc.pid as number;
    const first = await registerUser(child.port); // the threads started with the server have hashed
    first.client.close();
    const busy = new Set(niceByThread(pid).keys());
    // Idle for a second: both threads end (no other thread of the process comes or goes here).
    await expect.poll(() => niceByThread(pid).size, { timeout: 10000, interval: 100 }).toBe(busy.size - 2);
    const idle = new Set(niceByThread(pid).keys());
    // The next check starts a thread again. It lowers itself as it starts: by the time
    // its hash is answered it is at 10, where the 5-second rescan would reach it later.
    const c = await Client.connect(child.port);
    expect((await c.request("register", { login: `back${process.pid}`, pass: "secret", nick: "back" })).status).toBe(0);
    const fresh = [...niceByThread(pid)].filter(([tid]) => !idle.has(tid));
    expect(fresh.length).toBe(1);
    expect(fresh[0][1]).toBe(10);
    expect((await c.request("auth", { login: `back${process.pid}`, pass: "secret" })).status).toBe(0);
    c.close();
  });

  it("keeps the password-hashing threads with --hash-thread-idle 0", async () => {
    const child = await startChild(["--hash-thread-idle", "0"]);
    const pid = child.proc.pid as number;
    const u = await registerUser(child.port);
    u.client.close();
    const before = niceByThread(pid).size;
    await new Promise((r) => setTimeout(r, 1500));
    expect(niceByThread(pid).size).toBe(before);
  });

  it("hashes passwords on threads of their own: a commit does not wait behind a hash, even with a pool of one thread", async () => {
    // Cost 13 takes about a second a hash here; with bcrypt on libuv's pool (one
    // thread) every commit queued behind it, so no message was acknowledged until the
    // registration's hash was done.
    const child = await startChild(["--bcrypt-cost", "13"], ["env", "UV_THREADPOOL_SIZE=1"]);
    const [a, b] = await Promise.all([registerUser(child.port), registerUser(child.port)]);
    const c = await Client.connect(child.port);
    c.send("register", { login: `slow${process.pid}`, pass: "secret", nick: "slow" });
    const order: string[] = [];
    const registered = c.reply("register", 30000).then((f) => order.push(`register ${f.data.status}`));
    for (let i = 0; i < 5; i++) {
      const r = await a.client.request("message", { uid: b.uid, body: `during the hash ${i}` });
      order.push(`message ${r.status}`);
    }
    await registered;
    expect(order).toEqual(["message 0", "message 0", "message 0", "message 0", "message 0", "register 0"]);
    for (const x of [a.client, b.client, c]) x.close();
  }, 60000);
});

/** Runs a module in a process of its own that lowers its threads, raises them and lowers them again, reading each state back from /proc. */
function raiseInChild(wrap: string[] = []): { lowered: number[]; raise: { threads: number; refused: number }; raised: number[]; again: number[] } {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
  const script = `
    import { readdirSync, readFileSync } from "node:fs";
    import pino from "pino";
    import { ThreadPriority } from ${JSON.stringify(path.join(root, "dist/src/thread-priority.js"))};
    const nices = () => readdirSync("/proc/self/task").filter((t) => Number(t) !== process.pid).map((t) => {
      const stat = readFileSync("/proc/self/task/" + t + "/stat", "utf8");
      return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
    });
    const p = new ThreadPriority(10, pino({ level: "silent" }));
    await p.start();
    const lowered = nices();
    const raise = p.raise(true);
    const raised = nices();
    p.raise(false);
    console.log(JSON.stringify({ lowered, raise, raised, again: nices() }));
    p.stop();`;
  const [command, ...args] = [...wrap, process.execPath, "--input-type=module", "-e", script];
  return JSON.parse(execFileSync(command, args, { cwd: root, encoding: "utf8" }));
}

describe("compaction catch-up", () => {
  const startChild = useChildServers("each");

  it("shows LevelDB's level 0 in /metrics: a log replayed at start-up is written there as a table", async () => {
    const level0 = async (port: number) => {
      const { samples, types } = parseProm((await admin(port, "GET", "/metrics")).text);
      expect(types.get("wirechat_leveldb_level0_tables")).toBe("gauge");
      return sample(samples, "wirechat_leveldb_level0_tables");
    };
    const first = await startChild();
    // A fresh database's first tables go below level 0 (nothing there to overlap).
    expect(await level0(first.adminPort as number)).toBe(0);
    const u = await registerUser(first.port);
    expect((await u.client.request("message", { uid: u.uid, body: "into the log" })).status).toBe(0);
    u.client.close();
    first.proc.kill("SIGKILL");
    await first.exited;
    // LevelDB recovers the write-ahead log into a table of level 0 as it opens (and the
    // start-up's own writes may add another).
    const again = await ChildServer.start(first.dataDir);
    try {
      expect(await level0(again.adminPort as number)).toBeGreaterThanOrEqual(1);
    } finally {
      again.proc.kill("SIGKILL");
      await again.exited;
    }
  });

  it("raise() runs the lowered threads at the loop's priority and lower() puts them back, in a real process", () => {
    const r = raiseInChild();
    const at = (xs: number[], n: number) => xs.filter((x) => x === n).length;
    expect(at(r.lowered, 10)).toBeGreaterThan(1); // V8's helpers at least; the pool stays at 0
    expect(r.raise).toEqual({ threads: at(r.lowered, 10), refused: 0 });
    expect(r.raised.every((n) => n === 0)).toBe(true);
    expect(r.again).toEqual(r.lowered);
  });

  it("counts the threads it may not raise again without CAP_SYS_NICE (and leaves them lowered)", () => {
    const r = raiseInChild(["setpriv", "--bounding-set=-sys_nice"]);
    const lowered = r.lowered.filter((n) => n === 10).length;
    expect(lowered).toBeGreaterThan(1);
    expect(r.raise).toEqual({ threads: 0, refused: lowered });
    expect(r.raised).toEqual(r.lowered);
  });

  it("raises the background from 8 tables in LevelDB's level 0 until fewer than 4 remain, and logs both", () => {
    const lines: { level: number; msg: string; level0Tables?: number; refused?: number }[] = [];
    const log = pino({ level: "debug" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
    const calls: boolean[] = [];
    let tables: number | undefined = 0;
    let refused = 0;
    const c = new CompactionCatchUp(() => tables, { raise: (on) => (calls.push(on), { threads: 6, refused }) }, log);
    const feed = (...ns: (number | undefined)[]) => ns.forEach((n) => ((tables = n), c.check()));
    feed(0, 3, 7, undefined);
    expect(calls).toEqual([]);
    feed(8);
    expect(calls).toEqual([true]);
    feed(12, 9, 6, 4, undefined);
    expect(calls).toEqual([true]);
    feed(3);
    expect(calls).toEqual([true, false]);
    feed(2, 7);
    expect(calls).toEqual([true, false]);
    expect(lines.map((l) => [l.level, l.level0Tables])).toEqual([
      [40, 8],
      [30, 3],
    ]);
    expect(lines[0].msg).toMatch(/LevelDB's compaction is behind the writes/);
    // Where raising is refused, the operator is told once what to grant.
    refused = 6;
    feed(9, 1, 10, 0);
    expect(calls).toEqual([true, false, true, false, true, false]);
    const told = lines.filter((l) => /not permitted to raise/.test(l.msg));
    expect(told).toHaveLength(1);
    expect(told[0]).toMatchObject({ level: 40, refused: 6 });
    expect(told[0].msg).toMatch(/LimitNICE=\+0/);
  });
});

