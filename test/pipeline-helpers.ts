// Helpers for the pipeline, delivery and fuzz tests: child servers that are always
// killed, waiting that fails fast when the server process dies or the connection
// closes, ev_message bookkeeping from a Client's raw lines, and a lean line reader for
// replies of tens of MB (Client keeps every line it receives, which those would not
// survive).

import WebSocket from "ws";
import { NdjsonSplitter } from "../src/client/ndjson.js";
import net from "node:net";
import { afterAll, afterEach } from "vitest";
import { ChildServer, Client, removeDir, tempDir, type Frame } from "./helpers.js";

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Polls `cond` until it holds; throws with `what` after `ms`. */
export async function waitFor(cond: () => boolean, ms: number, what: string | (() => string)): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${typeof what === "string" ? what : what()}`);
    await sleep(20);
  }
}

const deaths = new WeakMap<ChildServer, Promise<never>>();

/** Rejects as soon as the child server exits (with the tail of its output). */
export function died(child: ChildServer): Promise<never> {
  let p = deaths.get(child);
  if (!p) {
    p = child.exited.then((code) => {
      throw new Error(`the server process exited (code ${code}); its last output:\n${child.stdout().slice(-3000)}`);
    });
    p.catch(() => {});
    deaths.set(child, p);
  }
  return p;
}

/** `p`, unless the child server dies first. */
export function orExit<T>(child: ChildServer | undefined, p: Promise<T>): Promise<T> {
  return child ? Promise.race([p, died(child)]) : p;
}

/**
 * A WebSocket to `url`, once open (a refused upgrade rejects with its HTTP status; given
 * `child`, so does the server process's exit). `attach` runs before it opens: listeners
 * it adds miss nothing the server sends.
 */
export async function openWebSocket(url: string, child: ChildServer | undefined, options?: WebSocket.ClientOptions, attach?: (ws: WebSocket) => void): Promise<WebSocket> {
  const ws = new WebSocket(url, options);
  attach?.(ws);
  await orExit(
    child,
    new Promise<void>((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("unexpected-response", (_req, res) => reject(new Error(`${new URL(url).pathname}: HTTP ${res.statusCode} instead of an upgrade`)));
      ws.once("error", reject);
    }),
  );
  return ws;
}

/**
 * `p`, unless the connection closes first (or, given `child`, the server process
 * exits: a close is then reported as the crash it was, if the exit follows within 1 s).
 */
export function orClosed<T>(c: Client, p: Promise<T>, what = "a frame", child?: ChildServer): Promise<T> {
  const closed = c.closed.then(async () => {
    if (child) {
      const code = await Promise.race([child.exited, sleep(1000).then(() => "running" as const)]);
      if (code !== "running") {
        throw new Error(`the server process exited (code ${code}) while the test waited for ${what}; its last output:\n${child.stdout().slice(-3000)}`);
      }
    }
    throw new Error(`the server closed the connection while the test waited for ${what}`);
  });
  closed.catch(() => {});
  return orExit(child, Promise.race([p, closed]));
}

export function isAlive(child: ChildServer): boolean {
  return child.proc.exitCode === null && child.proc.signalCode === null;
}

async function stopChild(child: ChildServer, dir: string): Promise<void> {
  if (isAlive(child)) {
    child.proc.kill("SIGKILL");
    await child.exited;
  }
  removeDir(dir);
}

/**
 * Starts child servers (built dist) on temp data dirs; each is killed and its dir
 * removed after the test (`scope: "each"`) or after the file (`scope: "all"`).
 */
export function useChildServers(scope: "each" | "all" = "each"): (extra?: string[], wrap?: string[]) => Promise<ChildServer> {
  const started: { child: ChildServer; dir: string }[] = [];
  const cleanup = async () => {
    for (const { child, dir } of started.splice(0)) await stopChild(child, dir);
  };
  if (scope === "each") afterEach(cleanup);
  else afterAll(cleanup);
  return async (extra: string[] = [], wrap: string[] = []) => {
    const dir = tempDir();
    try {
      const child = await ChildServer.start(dir, extra, wrap);
      started.push({ child, dir });
      return child;
    } catch (err) {
      removeDir(dir);
      throw err;
    }
  };
}

/** Every frame the client has received so far, parsed from its raw lines. */
export function framesOf(c: Client): Frame[] {
  return c.lines.map((l) => JSON.parse(l) as Frame);
}

/** The data of every ev_message the client received, in arrival order (claimed or not). */
export function evMessages(c: Client): any[] {
  const out = [];
  for (const l of c.lines) {
    if (!l.startsWith('{"action":"ev_message"')) continue;
    const f = JSON.parse(l) as Frame;
    if (f.action === "ev_message") out.push(f.data);
  }
  return out;
}

export function evMids(c: Client): string[] {
  return evMessages(c).map((d) => d.mid as string);
}

/** The values that occur more than once. */
export function duplicates(xs: readonly string[]): string[] {
  const seen = new Set<string>();
  const dup = new Set<string>();
  for (const x of xs) (seen.has(x) ? dup : seen).add(x);
  return [...dup];
}

export const byMid = (a: string, b: string) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0);

/** Waits until the client has received an ev_message for every mid in `mids`. */
export async function waitForMids(c: Client, mids: readonly string[], ms: number, label = "client"): Promise<void> {
  const want = new Set(mids);
  await orClosed(
    c,
    waitFor(
      () => {
        const got = new Set(evMids(c));
        for (const m of want) if (!got.has(m)) return false;
        return true;
      },
      ms,
      () => {
        const got = new Set(evMids(c));
        const missing = [...want].filter((m) => !got.has(m));
        return `${label} to receive ${want.size} mids; ${missing.length} missing (e.g. ${missing.slice(0, 5).join(", ")}), got ${got.size} distinct`;
      },
    ),
    `${label}'s ev_messages`,
  );
}

/**
 * Lets frames still in flight arrive (a ping round trip, then `ms` of quiet for
 * events the server sends on its own), so that a duplicate would be seen.
 */
export async function settle(c: Client, ms = 400): Promise<void> {
  const r = await orClosed(c, c.request("ping"), "a ping reply");
  if (r.status !== 0) throw new Error(`ping answered ${JSON.stringify(r)}`);
  await sleep(ms);
}

/** `hello {ack:true}`: returns the reply data (a new server answers with ack: true). */
export async function helloAck(c: Client): Promise<any> {
  return c.request("hello", { ack: true });
}

/**
 * A connection for replies of tens of MB: it keeps no line it has handed to `onLine`
 * (Client keeps every line, so 30 replies of 28 MB would be held twice over).
 */
export class LineConn {
  /** The client library's splitter (src/client): one way of cutting frames. */
  private readonly splitter = new NdjsonSplitter();
  private onLineFn: ((line: Buffer) => void) | undefined;
  /** The start of lines that arrived while no reader was set. */
  readonly stray: string[] = [];
  readonly closed: Promise<void>;
  isClosed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", () => {});
    this.closed = new Promise((resolve) =>
      socket.on("close", () => {
        this.isClosed = true;
        resolve();
      }),
    );
  }

  static async connect(port: number): Promise<LineConn> {
    const socket = net.connect(port, "127.0.0.1");
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const c = new LineConn(socket);
    const welcome = await c.nextFrame(5000);
    if (welcome.action !== "welcome") throw new Error(`expected welcome, got ${JSON.stringify(welcome).slice(0, 200)}`);
    return c;
  }

  private onData(chunk: Buffer): void {
    for (const line of this.splitter.pushBytes(chunk)) {
      if (this.onLineFn) this.onLineFn(line);
      else this.stray.push(line.subarray(0, 300).toString("utf8"));
    }
  }

  /** Hands every complete line to `fn` (replacing the previous reader). */
  onLine(fn: (line: Buffer) => void): void {
    this.onLineFn = fn;
  }

  send(action: string, data?: Record<string, unknown>): void {
    this.socket.write(JSON.stringify(data === undefined ? { action } : { action, data }) + "\n");
  }

  /** The next line, parsed (for small frames only). */
  nextFrame(timeoutMs: number): Promise<Frame> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("LineConn: timed out waiting for a frame")), timeoutMs);
      const lines: Frame[] = [];
      this.onLine((line) => {
        lines.push(JSON.parse(line.toString("utf8")) as Frame);
        if (lines.length === 1) {
          clearTimeout(timer);
          resolve(lines[0]);
        }
      });
    });
  }

  async request(action: string, data?: Record<string, unknown>, timeoutMs = 10_000): Promise<any> {
    const p = this.nextFrame(timeoutMs);
    this.send(action, data);
    const f = await p;
    if (f.action !== action) throw new Error(`expected a '${action}' reply, got ${JSON.stringify(f).slice(0, 300)}`);
    return f.data;
  }
}

/**
 * A loaded disk, simulated on one keyspace: every key range read started on `space`
 * (keys()) waits `ms` before it runs, on the snapshot taken when it was asked for (as
 * LevelDB's iterators are), so what commits meanwhile is not in it. Returns the undo.
 */
export function slowKeyReads(space: { keys: (...args: any[]) => any }, ms: number): () => void {
  const keys = space.keys.bind(space);
  space.keys = (options: unknown) => {
    const it = keys(options);
    const delay = sleep(ms);
    for (const name of ["next", "nextv", "all"] as const) {
      const read = it[name].bind(it);
      it[name] = async (...args: unknown[]) => {
        await delay;
        return read(...args);
      };
    }
    return it;
  };
  return () => {
    delete (space as { keys?: unknown }).keys;
  };
}

/**
 * A gate a test holds shut: the code it wraps awaits `pass()`, which resolves
 * `reached` and waits until the test calls `open()`.
 */
export function heldGate(): { reached: Promise<void>; pass: () => Promise<void>; open: () => void } {
  let arrive!: () => void;
  const reached = new Promise<void>((r) => (arrive = r));
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return {
    reached,
    pass: () => {
      arrive();
      return opened;
    },
    open,
  };
}

/** classic-level's native batch write, as storage/db.ts calls it. */
export type BatchWrite = (native: unknown, options: { sync: boolean }) => Promise<void>;

/**
 * Routes `storage`'s batch writes through `write` (given the real one) until the
 * returned undo. classic-level's binding is one module object, shared by every Storage
 * of the process (a test's cluster nodes): this storage gets a binding of its own.
 */
export function wrapBatchWrite(storage: object, write: (real: BatchWrite, native: unknown, options: { sync: boolean }) => Promise<void>): () => void {
  const owner = storage as { binding: { batch_write: BatchWrite } };
  const binding = owner.binding;
  const own: { batch_write: BatchWrite } = Object.create(binding);
  own.batch_write = (native, options) => write((n, o) => binding.batch_write(n, o), native, options);
  owner.binding = own;
  return () => {
    owner.binding = binding;
  };
}

/** Records whether each batch write of `storage` from now on asks for a sync. */
export function recordSyncs(storage: object): { syncs: boolean[]; restore: () => void } {
  const syncs: boolean[] = [];
  const restore = wrapBatchWrite(storage, (real, native, options) => {
    syncs.push(options.sync);
    return real(native, options);
  });
  return { syncs, restore };
}

/**
 * Holds the storage's next batch write at `gate` (what comes meanwhile gathers in the
 * batch after it); `restore` opens the gate and puts the write back.
 */
export function holdNextWrite(storage: object): { gate: ReturnType<typeof heldGate>; restore: () => void } {
  const gate = heldGate();
  let armed = true;
  const undo = wrapBatchWrite(storage, async (real, native, options) => {
    if (armed) {
      armed = false;
      await gate.pass();
    }
    return real(native, options);
  });
  return {
    gate,
    restore: () => {
      undo();
      gate.open();
    },
  };
}

/**
 * Runs `before` ahead of each call of `obj[name]` (as an own property of `obj`, which
 * the returned undo removes): to hold a call at a gate, or fail it.
 */
export function wrapCalls<T extends object>(obj: T, name: keyof T & string, before: (...args: any[]) => Promise<unknown>): () => void {
  const orig = (obj as any)[name].bind(obj);
  (obj as any)[name] = async (...args: any[]) => {
    await before(...args);
    return orig(...args);
  };
  return () => delete (obj as any)[name];
}
