// Password hashing, shared fairly. bcrypt runs on threads of its own (worker threads,
// one per hash that may run at once, two by default), not on libuv's pool: the pool
// writes every group commit and serves every read, so a hash there would hold a commit
// back for as long as it runs (50-150 ms at cost 10 here), and the pool runs at the
// event loop's priority (thread-priority.ts) while these threads are lowered with the
// other background work, so a burst of logins yields the core to the loop (each thread
// lowers itself as it starts, before thread-priority.ts's next rescan would). They
// start with the server and end after --hash-thread-idle seconds (5) without a check;
// the next check starts one again, ~50 ms more for that login. Ended, they cost
// nothing: alive, each is a V8 isolate (RSS 12 MiB lower once both have ended) whose
// memory reducer runs full collections 6-8 s after it goes quiet, 20-45 ms each on a
// core shared with the loop (--trace-gc under S2, inside its measured window after the
// start-up logins; ended first, S2's p99 at 5,000 msg/s was lower in 8 of 12
// alternated pairs and higher in 2, medians 4.3 against 5.2 ms). Checks wait in one queue
// per client address (an IPv6 client's /64 by default: addresses.ts addressKey), and
// the addresses are served round-robin: a login from one
// address waits for about one hash per other busy address, however many connections
// those have.
// Each connection has at most one check waiting (auth, register, changepassword and
// deleteaccount are not pipelined: the dispatcher runs them one at a time). An
// address's queue is bounded, and every check it starts takes a token from its
// bucket (--auth-rate per second, --auth-burst at once): past either, 13. Trusted
// addresses (--trusted-addresses, loopback by default, like Prosody's registration
// whitelist) take no token: every client behind a proxy on this host shares one, and
// local conformance scripts and benchmarks register thousands of users. They still
// queue, take their turn and count failed logins like any address.

import { addressKey, plainAddress, type AddressPrefixes } from "../addresses.js";
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import { Worker } from "node:worker_threads";
import { Code, ProtocolError } from "../protocol/codes.js";
import { within } from "../clock.js";

/** Prefixes that keep whole addresses. */
const WHOLE: AddressPrefixes = { ipv4Prefix: 32, ipv6Prefix: 128 };

interface Job {
  req: HashRequest;
  resolve: (v: unknown) => void;
  reject: (err: unknown) => void;
}

interface Bucket {
  tokens: number;
  at: number;
}

export interface HasherLimits {
  cost: number;
  /** Checks waiting per address. */
  queuePerAddress: number;
  /** Checks per second per address, and at once. */
  rate: number;
  burst: number;
  /** Hashes run at once, each on its own worker thread (default 2). */
  parallel?: number;
  /** Addresses that take no token (IPv4-mapped IPv6 forms match their IPv4 address). */
  trusted?: ReadonlySet<string>;
  /** What of an address its queue and bucket go by (addressKey); absent: the whole address. */
  prefixes?: AddressPrefixes;
  /** Buckets kept (one per address seen recently). */
  maxBuckets?: number;
  /** Milliseconds the threads wait for a check before they end; 0 or absent: never (the server passes --hash-thread-idle). */
  idleStopMs?: number;
  /** Nice value each thread sets itself to as it starts (Linux; 0 or absent: unchanged). */
  nice?: number;
}

/**
 * What a hash thread runs: bcrypt's synchronous calls, one request at a time. It says
 * "ready" once bcrypt is loaded, and ends itself on "stop" (see HashThread.stop).
 */
const HASH_THREAD_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
if (workerData.nice > 0) {
  try {
    const tid = Number(require("node:fs").readlinkSync("/proc/thread-self").split("/").pop());
    require("node:os").setPriority(tid, workerData.nice);
  } catch {}
}
const bcrypt = require(workerData.bcrypt);
parentPort.postMessage("ready");
parentPort.on("message", (m) => {
  if (m === "stop") return parentPort.close();
  let reply;
  try {
    reply = { value: m.hash === undefined ? bcrypt.hashSync(m.pass, m.cost) : bcrypt.compareSync(m.pass, m.hash) };
  } catch (err) {
    reply = { error: String((err && err.message) || err) };
  }
  parentPort.postMessage(reply);
});
`;

/** A bcrypt request: hash `pass` at `cost`, or compare it with `hash`. */
interface HashRequest {
  pass: string;
  cost?: number;
  hash?: string;
}

const BCRYPT_PATH = createRequire(import.meta.url).resolve("bcrypt");

/**
 * One worker thread that hashes, one request at a time (the hasher gives it one only
 * when it is free). A thread that dies fails its request and is replaced at the next.
 */
class HashThread {
  private worker: Worker | undefined;
  private pending: { resolve: (v: unknown) => void; reject: (err: unknown) => void } | undefined;
  /** Stops the current worker: at once if it has loaded bcrypt, else as soon as it has. */
  private stopWorker: (() => void) | undefined;
  /** Resolves once the current worker has loaded bcrypt (or ended): see loaded(). */
  private ready: Promise<void> = Promise.resolve();

  /** `nice`: what the thread lowers itself to as it starts (0: left at its creator's). */
  constructor(private readonly nice: number) {}

  private spawn(): Worker {
    const w = new Worker(HASH_THREAD_SOURCE, {
      eval: true,
      workerData: { bcrypt: BCRYPT_PATH, nice: this.nice },
      // bcrypt's work is native: the thread's own heap holds little more than a request.
      resourceLimits: { maxOldGenerationSizeMb: 16, maxYoungGenerationSizeMb: 2 },
    });
    w.unref(); // an idle hasher does not keep the process alive
    let loaded = false;
    let stopAsked = false;
    let markReady!: () => void;
    this.ready = new Promise((resolve) => (markReady = resolve));
    w.once("exit", () => markReady());
    this.stopWorker = () => {
      if (loaded) w.postMessage("stop");
      else stopAsked = true;
    };
    w.on("message", (m: { value?: unknown; error?: string } | "ready") => {
      if (m === "ready") {
        loaded = true;
        markReady();
        if (stopAsked) w.postMessage("stop");
        return;
      }
      const p = this.pending;
      this.pending = undefined;
      if (m.error !== undefined) p?.reject(new Error(`password hashing failed: ${m.error}`));
      else p?.resolve(m.value);
    });
    const lost = (err: unknown) => {
      if (this.worker !== w) return;
      this.worker = undefined;
      const p = this.pending;
      this.pending = undefined;
      p?.reject(err instanceof Error ? err : new Error("the password hashing thread stopped"));
    };
    w.on("error", lost);
    w.on("exit", () => lost(undefined));
    return w;
  }

  /** Starts the thread now rather than at its first request. */
  start(): void {
    this.worker ??= this.spawn();
  }

  run(req: HashRequest): Promise<unknown> {
    const w = (this.worker ??= this.spawn());
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      w.postMessage(req);
    });
  }

  /**
   * Ends the thread by asking it to, never with terminate(): terminating a worker while
   * it loads bcrypt makes the addon's initialisation throw a C++ exception nothing
   * catches, and the whole process aborts ("terminate called after throwing an instance
   * of 'Napi::Error'", seen when a server stopped right after it started). Only idle
   * threads are stopped (a busy one after its request), so "stop" is the next message
   * the thread reads.
   */
  stop(): void {
    const stop = this.stopWorker;
    this.worker = undefined;
    this.stopWorker = undefined;
    stop?.();
  }

  /**
   * Resolves once its worker is past loading bcrypt (or gone): the process may exit then.
   * An exit while a worker loads it aborts the process the same way terminate() did (a
   * server whose admin port was taken exited by SIGABRT, not 1, now and then, its
   * threads still loading when the start-up failure exited).
   */
  loaded(): Promise<void> {
    return this.ready;
  }
}

const SHUTTING_DOWN = "the server is shutting down; retry in a moment";
/** How long a stop waits for hash threads still loading bcrypt (they take milliseconds). */
const LOAD_WAIT_MS = 2_000;

export class PasswordHasher {
  private stopped = false;
  /** Hash threads not running a check. */
  private readonly free: HashThread[] = [];
  private readonly threads: HashThread[] = [];
  /** Addresses with checks waiting, in service order (the first is served next). */
  private readonly queues = new Map<string, Job[]>();
  private readonly buckets = new Map<string, Bucket>();
  private readonly maxBuckets: number;

  /** Ends the threads once none has had a check for idleStopMs (armIdleStop). */
  private idleTimer: NodeJS.Timeout | undefined;

  constructor(private readonly limits: HasherLimits) {
    this.maxBuckets = limits.maxBuckets ?? 100_000;
    for (let i = 0; i < (limits.parallel ?? 2); i++) this.threads.push(new HashThread(limits.nice ?? 0));
    this.free.push(...this.threads);
  }

  /** Starts the hash threads now (a server does, so its first logins do not wait for them). */
  start(): void {
    for (const t of this.threads) t.start();
    this.armIdleStop();
  }

  /**
   * bcrypt reads only the first 72 bytes of its input, so the client's secret is first
   * reduced to a fixed-size digest.
   */
  private static digest(pass: string): string {
    return createHash("sha256").update(pass, "utf8").digest("base64");
  }

  hash(address: string, pass: string): Promise<string> {
    return this.enqueue(address, { pass: PasswordHasher.digest(pass), cost: this.limits.cost }) as Promise<string>;
  }

  verify(address: string, pass: string, hash: string): Promise<boolean> {
    return this.enqueue(address, { pass: PasswordHasher.digest(pass), hash }) as Promise<boolean>;
  }

  private trusted(address: string): boolean {
    const t = this.limits.trusted;
    if (t === undefined || t.size === 0) return false;
    return t.has(plainAddress(address));
  }

  /**
   * Called with an address (as its bucket is keyed) each time a check of it takes a
   * token: cluster mode tells the other nodes (features/accounts.ts), which charge().
   */
  onAdmitted: ((address: string) => void) | undefined;

  /** A check of `address` (its bucket's key) made elsewhere: takes a token if one is left. */
  charge(address: string): void {
    this.admit(address);
  }

  /** Takes a token from the address's bucket; false when it is empty. */
  private admit(address: string, now = Date.now()): boolean {
    const { rate, burst } = this.limits;
    let b = this.buckets.get(address);
    if (b === undefined) {
      if (this.buckets.size >= this.maxBuckets) this.forgetFull(now);
      b = { tokens: burst, at: now };
    } else this.buckets.delete(address); // re-inserted below: the map stays in last-use order
    b.tokens = Math.min(burst, b.tokens + ((now - b.at) * rate) / 1000);
    b.at = now;
    this.buckets.set(address, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  /** Drops buckets that have refilled (they equal a fresh one), least recently used first. */
  private forgetFull(now: number): void {
    const { rate, burst } = this.limits;
    for (const [address, b] of this.buckets) {
      if (this.buckets.size < this.maxBuckets / 2) return;
      if (b.tokens + ((now - b.at) * rate) / 1000 >= burst) this.buckets.delete(address);
    }
    // Still full: the oldest go (an attacker filling the table only refills others).
    for (const address of this.buckets.keys()) {
      if (this.buckets.size < this.maxBuckets) return;
      this.buckets.delete(address);
    }
  }

  /**
   * Shutdown: checks still waiting are answered 16 at once and no new one starts, so
   * that no handler is left waiting for hashes (up to --hash-queue-per-address per
   * address, two at a time) while storage closes behind it. Running ones finish; the
   * threads end once they have.
   */
  stop(): Promise<void> {
    this.stopped = true;
    if (this.idleTimer !== undefined) clearTimeout(this.idleTimer);
    for (const q of this.queues.values()) for (const job of q) job.reject(new ProtocolError(Code.Unavailable, SHUTTING_DOWN));
    this.queues.clear();
    for (const t of this.free.splice(0)) t.stop();
    // Resolves when no thread is loading bcrypt any more (see HashThread.loaded), or
    // after LOAD_WAIT_MS whatever happened (an exit is never held up for long).
    return within(Promise.all(this.threads.map((t) => t.loaded())), LOAD_WAIT_MS).then(() => undefined);
  }

  private enqueue(address: string, req: HashRequest): Promise<unknown> {
    if (this.stopped) return Promise.reject(new ProtocolError(Code.Unavailable, SHUTTING_DOWN));
    const trusted = this.trusted(address);
    // Queued and rated by its network (--ipv6-prefix), trusted by its own address.
    address = addressKey(address, this.limits.prefixes ?? WHOLE);
    const q = this.queues.get(address);
    if (q !== undefined && q.length >= this.limits.queuePerAddress) {
      return Promise.reject(new ProtocolError(Code.RateLimited, "too many password checks waiting from your address; retry later"));
    }
    if (!trusted) {
      if (!this.admit(address)) return Promise.reject(new ProtocolError(Code.RateLimited, "too many logins and registrations from your address; retry later"));
      this.onAdmitted?.(address);
    }
    return new Promise((resolve, reject) => {
      const job = { req, resolve, reject };
      if (q === undefined) this.queues.set(address, [job]);
      else q.push(job);
      this.pump();
    });
  }

  private pump(): void {
    while (this.free.length > 0 && this.queues.size > 0) {
      const [address, q] = this.queues.entries().next().value as [string, Job[]];
      const job = q.shift() as Job;
      // Round-robin: the address goes to the back of the line, or leaves it.
      this.queues.delete(address);
      if (q.length > 0) this.queues.set(address, q);
      const thread = this.free.pop() as HashThread;
      thread.run(job.req).then(job.resolve, job.reject).finally(() => {
        if (this.stopped) return thread.stop();
        this.free.push(thread);
        this.pump();
        if (this.free.length === this.threads.length) this.armIdleStop();
      });
    }
  }

  /**
   * All threads are free: they end if none gets a check within the idle time. A thread
   * that ends is started again by its next run(); one that is loading bcrypt when told
   * to stop ends once it has (HashThread.stop).
   */
  private armIdleStop(): void {
    const idle = this.limits.idleStopMs ?? 0;
    if (idle <= 0) return;
    if (this.idleTimer !== undefined) this.idleTimer.refresh();
    else {
      this.idleTimer = setTimeout(() => {
        this.idleTimer = undefined;
        if (this.stopped || this.free.length < this.threads.length) return;
        for (const t of this.threads) t.stop();
      }, idle);
      this.idleTimer.unref();
    }
  }
}
