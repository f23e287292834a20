// Shared by the benchmarks: a built server in a child process on a temp data dir, and
// a lean client that splits lines and parses only what it must.

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { NdjsonSplitter } from "../src/client/ndjson.js";

export interface Server {
  proc: ChildProcess;
  port: number;
  dir: string;
}

export interface StartOptions {
  /** Every line the server logs (pino JSON), from start-up on. */
  onLog?: (line: string) => void;
  /** Where the server's stderr goes (default: this process's). */
  stderr?: "inherit" | "pipe";
  /** Another build's entry point (default: this one's, dist/src/main.js). */
  main?: string;
  /** A command the server runs under, with its arguments (valgrind …): node follows it. */
  wrap?: string[];
}

export async function startServer(extra: string[] = [], opts: StartOptions = {}): Promise<Server> {
  const dir = mkdtempSync(path.join(tmpdir(), "wirechat-bench-"));
  const main = opts.main ?? fileURLToPath(new URL("../src/main.js", import.meta.url));
  const [command, ...prefix] = [...(opts.wrap ?? []), process.execPath];
  const proc = spawn(
    command,
    [...prefix, main, "--port", "0", "--host", "127.0.0.1", "--data-dir", dir, "--bcrypt-cost", "4", "--log-level", "info", "--admin-port", "0",
     // every benchmark client comes from 127.0.0.1: lift the per-address cap
     "--max-per-address", "1000000", ...extra],
    { stdio: ["ignore", "pipe", opts.stderr ?? "inherit"] },
  );
  const onLog = opts.onLog;
  let partial = "";
  let seen = "";
  let listening = false;
  const port = await new Promise<number>((resolve, reject) => {
    proc.stdout!.on("data", (d: Buffer) => {
      const text = d.toString();
      if (onLog) {
        const lines = (partial + text).split("\n");
        partial = lines.pop() as string;
        for (const l of lines) onLog(l);
      }
      if (!listening) {
        seen += text;
        const m = /"port":(\d+)[^\n]*"msg":"wirechat listening"/.exec(seen);
        if (m) {
          listening = true;
          seen = "";
          resolve(Number(m[1]));
        }
      }
    });
    proc.on("exit", (code) => reject(new Error(`server exited ${code}`)));
  });
  return { proc, port, dir };
}

export async function stopServer(s: Server): Promise<void> {
  const exited = new Promise((r) => s.proc.once("exit", r));
  s.proc.kill("SIGTERM");
  await exited;
  rmSync(s.dir, { recursive: true, force: true });
}

/** A lean client: counts lines, parses only what it must. */
export class BenchClient {
  /** The client library's splitter (src/client): one way of cutting frames. */
  private readonly splitter = new NdjsonSplitter();
  onLine: (line: string) => void = () => {};
  constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => {
      for (const line of this.splitter.pushBytes(chunk)) this.onLine(line.toString("utf8"));
    });
  }
  static connect(port: number): Promise<BenchClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, "127.0.0.1", () => resolve(new BenchClient(s)));
      s.once("error", reject);
    });
  }
  next(pred: (l: string) => boolean): Promise<any> {
    return new Promise((resolve) => {
      this.onLine = (l) => {
        if (pred(l)) {
          this.onLine = () => {};
          resolve(JSON.parse(l));
        }
      };
    });
  }
  send(obj: unknown): void {
    this.socket.write(JSON.stringify(obj) + "\n");
  }
}

let userSeq = 0;
export async function newUser(port: number): Promise<{ c: BenchClient; uid: string; sid: string }> {
  const c = await BenchClient.connect(port);
  const login = `b${process.pid}_${++userSeq}`;
  const auth = c.next((l) => l.startsWith('{"action":"auth"'));
  c.send({ action: "register", data: { login, pass: "p", nick: login } });
  const a = await auth;
  return { c, uid: a.data.uid, sid: a.data.sid };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}


/**
 * The resident set split: anonymous pages (the heap, buffers, LevelDB's memtables and
 * cache, malloc) and file pages (mostly LevelDB's table files, which it maps read-only:
 * page cache that grows with the data stored and that the kernel reclaims).
 */
export function rssSplitKiB(pid: number): { anon: number; file: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const anon = /RssAnon:\s+(\d+) kB/.exec(status);
  const file = /RssFile:\s+(\d+) kB/.exec(status);
  return { anon: anon ? Number(anon[1]) : NaN, file: file ? Number(file[1]) : NaN };
}

export function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) : NaN;
}
