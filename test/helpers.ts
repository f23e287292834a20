// Test harness: a real wirechat server (in-process, or a child process when a test
// must kill it) on an ephemeral port with a temporary LevelDB, and a TCP client that
// reads its NDJSON frames.

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, expect } from "vitest";
import WebSocket from "ws";
import { NdjsonSplitter } from "../src/client/ndjson.js";
import { defaultConfig, type Config } from "../src/config.js";
import { startServer, type RunningServer } from "../src/server.js";

export type Frame = { action: string; data?: any; [k: string]: any };

/**
 * Every temp dir this test file made, removed once its tests are done. Registered as
 * the file imports this module, before the file's own hooks: vitest runs afterAll
 * hooks last-registered first, so this one runs after the file has stopped its servers
 * (and after the child servers below are killed). Without it each `npm test` left ~70
 * data dirs in the temp directory, up to 24 MB each.
 */
const madeDirs: string[] = [];
afterAll(() => {
  for (const d of madeDirs.splice(0)) removeDir(d);
});

export function tempDir(): string {
  const dir = mkdtempSync(path.join(tmpdir(), "wirechat-test-"));
  madeDirs.push(dir);
  return dir;
}

export function testConfig(overrides: Partial<Config> = {}): Config {
  return {
    ...defaultConfig(),
    host: "127.0.0.1",
    port: 0,
    // A dir of its own unless the test names one (then none is made to go unused).
    dataDir: overrides.dataDir ?? tempDir(),
    logLevel: "silent",
    bcryptCost: 4,
    adminPort: 0,
    ...overrides,
  };
}

export async function startTestServer(overrides: Partial<Config> = {}): Promise<RunningServer> {
  return startServer(testConfig(overrides));
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

/** What a test client received and has not taken yet, and the next() calls waiting. */
class Inbox<T> {
  readonly items: T[] = [];
  private waiters: { pred: (x: T) => boolean; resolve: (x: T) => void }[] = [];

  /** `what`: a frame, a message (for the timeout's error). */
  constructor(private readonly what: string) {}

  push(x: T): void {
    const w = this.waiters.findIndex((w) => w.pred(x));
    if (w >= 0) this.waiters.splice(w, 1)[0].resolve(x);
    else this.items.push(x);
  }

  /** The next item matching `pred` (already received or still to come). */
  next(pred: (x: T) => boolean, timeoutMs: number): Promise<T> {
    const i = this.items.findIndex(pred);
    if (i >= 0) return Promise.resolve(this.items.splice(i, 1)[0]);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new Error(`timed out waiting for ${this.what}; unclaimed: ${JSON.stringify(this.items).slice(0, 500)}`));
      }, timeoutMs);
      const waiter = {
        pred,
        resolve: (x: T) => {
          clearTimeout(timer);
          resolve(x);
        },
      };
      this.waiters.push(waiter);
    });
  }
}

export class Client {
  private readonly inbox = new Inbox<Frame>("a frame");
  /** Frames received and not yet taken by next()/request(). */
  readonly frames: Frame[] = this.inbox.items;
  /** Every raw line received, for byte-level assertions. */
  readonly lines: string[] = [];
  /** The client library's splitter (src/client): one way of cutting frames. */
  private readonly splitter = new NdjsonSplitter();
  readonly closed: Promise<void>;
  isClosed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    this.closed = new Promise((resolve) =>
      socket.on("close", () => {
        this.isClosed = true;
        resolve();
      }),
    );
    socket.on("error", () => {});
  }

  /** `from`: the local address to connect from (another loopback address is another client address). */
  static async connect(port: number, opts: { welcome?: boolean; from?: string } = {}): Promise<Client> {
    const socket = net.connect({ port, host: "127.0.0.1", localAddress: opts.from });
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const c = new Client(socket);
    if (opts.welcome !== false) await c.next((f) => f.action === "welcome");
    return c;
  }

  /** The same over TLS, trusting `ca` (the test certificate). */
  static async connectTls(port: number, ca: Buffer): Promise<Client> {
    const socket = tls.connect({ port, host: "127.0.0.1", ca, servername: "localhost" });
    await new Promise<void>((resolve, reject) => {
      socket.once("secureConnect", resolve);
      socket.once("error", reject);
    });
    const c = new Client(socket);
    await c.next((f) => f.action === "welcome");
    return c;
  }

  private onData(chunk: Buffer): void {
    // Raw lines, exactly as sent (no "\r" or blank line is hidden from the assertions).
    for (const bytes of this.splitter.pushBytes(chunk)) {
      const line = bytes.toString("utf8");
      this.lines.push(line);
      this.inbox.push(JSON.parse(line) as Frame);
    }
  }

  write(raw: string | Buffer): void {
    this.socket.write(raw);
  }

  /** Writes `req` as one line (a seed door's request, in its own shape). */
  line(req: Record<string, unknown>): void {
    this.write(JSON.stringify(req) + "\n");
  }

  /** line(), then the next frame matching `match`. */
  ask(req: Record<string, unknown>, match: (f: Frame) => boolean): Promise<Frame> {
    this.line(req);
    return this.next(match);
  }

  send(action: string, data?: Record<string, unknown>): void {
    this.write(JSON.stringify(data === undefined ? { action } : { action, data }) + "\n");
  }

  /** The next frame matching `pred` (already received or still to come). */
  next(pred: (f: Frame) => boolean = () => true, timeoutMs = 5000): Promise<Frame> {
    return this.inbox.next(pred, timeoutMs);
  }

  /** The next reply frame for `action` (not an event). */
  reply(action: string, timeoutMs?: number): Promise<Frame> {
    return this.next((f) => f.action === action, timeoutMs);
  }

  event(action: string, pred: (data: any) => boolean = () => true, timeoutMs?: number): Promise<any> {
    return this.next((f) => f.action === action && pred(f.data), timeoutMs).then((f) => f.data);
  }

  /** Sends a request and returns its reply's data. */
  async request(action: string, data?: Record<string, unknown>): Promise<any> {
    this.send(action, data);
    return (await this.reply(action)).data;
  }

  /** Resolves true if no frame matching `pred` arrives within `ms`. */
  async quiet(ms = 200, pred: (f: Frame) => boolean = () => true): Promise<boolean> {
    try {
      await this.next(pred, ms);
      return false;
    } catch {
      return true;
    }
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}

export interface Account {
  client: Client;
  uid: string;
  sid: string;
  login: string;
  nick: string;
}

let counter = 0;
export function uniqueName(prefix = "user"): string {
  return `${prefix}${process.pid}x${++counter}`;
}

/** Connects and registers a fresh account; returns it with the auth frame's fields. */
export async function registerUser(port: number, login = uniqueName(), pass = "secret", nick = login): Promise<Account> {
  const client = await Client.connect(port);
  const reg = await client.request("register", { login, pass, nick });
  if (reg.status !== 0) throw new Error(`register failed: ${JSON.stringify(reg)}`);
  const auth = (await client.reply("auth")).data;
  return { client, uid: auth.uid, sid: auth.sid, login, nick };
}

/**
 * The seed doors' side of a cross-door conversation in channel `chid`: a rust_messages
 * (000) client registered on `rustPort` (in the server's room once logged in), and a
 * rooms-API (001) account signed up on `roomsPort` that joined `chid` through the
 * native door on `nativePort`.
 */
export async function seedDoorClients(ports: { rust: number; rooms: number; native: number }, chid: string): Promise<{ rust: Client; rl: string; rooms: Client; ol: string }> {
  const rust = await Client.connect(ports.rust, { welcome: false });
  const rl = uniqueName("rust");
  expect((await rust.ask({ action: "registration", login: rl, password: "pw" }, (f) => f.action === "registration")).code).toBe(200);
  const rooms = await Client.connect(ports.rooms, { welcome: false });
  const ol = uniqueName("rooms");
  expect((await rooms.ask({ type: "REQUEST_SIGNUP", login: ol, pass: "pw" }, (f) => f.type === "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
  const olNative = await Client.connect(ports.native);
  expect((await olNative.request("auth", { login: ol, pass: "pw" })).status).toBe(0);
  expect((await olNative.request("enter", { channel: chid })).status).toBe(0);
  olNative.close();
  return { rust, rl, rooms, ol };
}

/** Connects a second device and logs in with the password. */
export async function login(port: number, loginName: string, pass = "secret"): Promise<{ client: Client; auth: any }> {
  const client = await Client.connect(port);
  const auth = await client.request("auth", { login: loginName, pass });
  return { client, auth };
}

/**
 * Child servers still running once a test file is done are killed: a test that fails
 * before it stops its server leaves none behind (they kept running after the test run,
 * and their timers' CPU counted as "other processes" in later benchmarks). Registered
 * as each test file imports this module.
 */
const liveChildren = new Set<ChildProcess>();
afterAll(() => {
  for (const p of liveChildren) p.kill("SIGKILL");
});

/** A server in a child process (built dist), for tests that kill or signal it. */
export class ChildServer {
  private constructor(
    readonly proc: ChildProcess,
    readonly port: number,
    readonly exited: Promise<number | null>,
    readonly stdout: () => string,
    /** The admin port (--admin-port 0: any free one), undefined with --admin off. */
    readonly adminPort: number | undefined,
    readonly dataDir: string,
  ) {}

  /** A port of the "wirechat listening" line ("httpPort", "rustPort", …), if it is there. */
  portOf(key: string): number | undefined {
    const m = new RegExp(`"${key}":(\\d+)[^\\n]*"msg":"wirechat listening"`).exec(this.stdout());
    return m ? Number(m[1]) : undefined;
  }

  /** `wrap`: a command that execs node in its place (e.g. `prlimit --fsize=N --`). */
  static async start(dataDir: string, extra: string[] = [], wrap: string[] = []): Promise<ChildServer> {
    const main = fileURLToPath(new URL("../dist/src/main.js", import.meta.url));
    // With a config file its log level rules (a flag would win over it, and SIGHUP could
    // not change it); the default, info, logs the line waited for below.
    const level = extra.includes("--config") ? [] : ["--log-level", "info"];
    const args = [main, "--port", "0", "--host", "127.0.0.1", "--data-dir", dataDir, "--bcrypt-cost", "4", ...level, "--admin-port", "0", ...extra];
    const proc =
      wrap.length > 0
        ? spawn(wrap[0], [...wrap.slice(1), process.execPath, ...args], { stdio: ["ignore", "pipe", "pipe"] })
        : spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
    liveChildren.add(proc);
    proc.on("exit", () => liveChildren.delete(proc));
    let out = "";
    const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
    let adminPort: number | undefined;
    const port = await new Promise<number>((resolve, reject) => {
      const onData = (d: Buffer) => {
        out += d.toString();
        const m = /"port":(\d+)[^\n]*"msg":"wirechat listening"/.exec(out);
        if (m) {
          adminPort = Number(/"adminPort":(\d+)[^\n]*"msg":"wirechat listening"/.exec(out)?.[1]) || undefined;
          resolve(Number(m[1]));
        }
      };
      proc.stdout!.on("data", onData);
      proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
      proc.on("exit", (code) => reject(new Error(`server exited (${code}) before listening:\n${out}`)));
    });
    return new ChildServer(proc, port, exited, () => out, adminPort, dataDir);
  }
}

/**
 * One server for all the tests of a file: started before them, stopped after them,
 * its data dir removed. Read `.server` and `.port` inside tests.
 */
export function serveForFile(overrides: Partial<Config> = {}): { readonly server: RunningServer; readonly port: number } {
  let server: RunningServer | undefined;
  beforeAll(async () => {
    server = await startTestServer(overrides);
  });
  afterAll(async () => {
    if (!server) return;
    await server.stop();
    removeDir(server.services.config.dataDir);
  });
  return {
    get server() {
      return server as RunningServer;
    },
    get port() {
      return (server as RunningServer).port;
    },
  };
}

/** A temp data dir per call, removed after each test. */
export function useTempDirs(): () => string {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) removeDir(d);
  });
  return () => {
    const d = tempDir();
    dirs.push(d);
    return d;
  };
}

/**
 * A WebSocket client (the `ws` package) for the HTTP door: every message is parsed as
 * JSON and kept until taken, as Client does with frames.
 */
export class WsClient {
  private readonly inbox = new Inbox<any>("a message");
  /** Messages received and not yet taken by next(). */
  readonly messages: any[] = this.inbox.items;
  /** Every message's text, as received. */
  readonly texts: string[] = [];
  /** Resolves with the close code and reason once the socket is closed. */
  readonly closed: Promise<{ code: number; reason: string }>;
  isClosed = false;

  private constructor(readonly ws: WebSocket) {
    ws.on("message", (data) => {
      const text = data.toString();
      this.texts.push(text);
      this.inbox.push(JSON.parse(text));
    });
    this.closed = new Promise((resolve) =>
      ws.on("close", (code, reason) => {
        this.isClosed = true;
        resolve({ code, reason: reason.toString() });
      }),
    );
    ws.on("error", () => {});
  }

  static async connect(port: number, path: string, options?: WebSocket.ClientOptions): Promise<WsClient> {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, options);
    const c = new WsClient(ws);
    await new Promise<void>((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("error", reject);
    });
    return c;
  }

  /** Sends an object as JSON text, or a string or Buffer as it is (a Buffer as a binary message). */
  send(m: unknown): void {
    this.ws.send(typeof m === "string" || Buffer.isBuffer(m) ? m : JSON.stringify(m));
  }

  next(pred: (m: any) => boolean = () => true, timeoutMs = 5000): Promise<any> {
    return this.inbox.next(pred, timeoutMs);
  }

  /** Resolves true if no message matching `pred` arrives within `ms`. */
  async quiet(ms = 200, pred: (m: any) => boolean = () => true): Promise<boolean> {
    try {
      await this.next(pred, ms);
      return false;
    } catch {
      return true;
    }
  }

  close(): void {
    this.ws.terminate();
  }
}

/** A stopped server's LevelDB, opened directly (crash tests read and write its keys). */
export async function rawDb(dataDir: string) {
  const { Level } = await import("level");
  const db = new Level<string, string>(`${dataDir}/db`, { keyEncoding: "utf8", valueEncoding: "utf8" });
  await db.open();
  return db;
}

/** The keys of a stopped server's LevelDB within each [gt, lt) range, in order. */
export async function storedKeys(dataDir: string, ranges: readonly { gt: string; lt: string }[]): Promise<string[]> {
  const db = await rawDb(dataDir);
  const out: string[] = [];
  try {
    for (const range of ranges) for await (const k of db.keys(range)) out.push(k);
  } finally {
    await db.close();
  }
  return out;
}
