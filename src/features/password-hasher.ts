// Password hashing, shared fairly. bcrypt runs on libuv's thread pool, which LevelDB
// shares, so at most two hashes run at once. Checks wait in one queue per client
// address, and the addresses are served round-robin: a login from one address waits
// for about one hash per other busy address, however many connections those have.
// Each connection has at most one check waiting (auth, register, changepassword and
// deleteaccount are not pipelined: the dispatcher runs them one at a time). An
// address's queue is bounded, and every check it starts takes a token from its
// bucket (--auth-rate per second, --auth-burst at once): past either, 13. Trusted
// addresses (--trusted-addresses, loopback by default, like Prosody's registration
// whitelist) take no token: every client behind a proxy on this host shares one, and
// local conformance scripts and benchmarks register thousands of users. They still
// queue, take their turn and count failed logins like any address.

import { plainAddress } from "../addresses.js";
import { createHash } from "node:crypto";
import bcrypt from "bcrypt";
import { Code, ProtocolError } from "../protocol/codes.js";

interface Job {
  run: () => Promise<unknown>;
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
  parallel?: number;
  /** Addresses that take no token (IPv4-mapped IPv6 forms match their IPv4 address). */
  trusted?: ReadonlySet<string>;
  /** Buckets kept (one per address seen recently). */
  maxBuckets?: number;
}

const SHUTTING_DOWN = "the server is shutting down; retry in a moment";

export class PasswordHasher {
  private running = 0;
  private stopped = false;
  /** Addresses with checks waiting, in service order (the first is served next). */
  private readonly queues = new Map<string, Job[]>();
  private readonly buckets = new Map<string, Bucket>();
  private readonly parallel: number;
  private readonly maxBuckets: number;

  constructor(private readonly limits: HasherLimits) {
    this.parallel = limits.parallel ?? 2;
    this.maxBuckets = limits.maxBuckets ?? 100_000;
  }

  /**
   * bcrypt reads only the first 72 bytes of its input, so the client's secret is first
   * reduced to a fixed-size digest.
   */
  private static digest(pass: string): string {
    return createHash("sha256").update(pass, "utf8").digest("base64");
  }

  hash(address: string, pass: string): Promise<string> {
    return this.enqueue(address, () => bcrypt.hash(PasswordHasher.digest(pass), this.limits.cost)) as Promise<string>;
  }

  verify(address: string, pass: string, hash: string): Promise<boolean> {
    return this.enqueue(address, () => bcrypt.compare(PasswordHasher.digest(pass), hash)) as Promise<boolean>;
  }

  private trusted(address: string): boolean {
    const t = this.limits.trusted;
    if (t === undefined || t.size === 0) return false;
    return t.has(plainAddress(address));
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
   * address, two at a time) while storage closes behind it. Running ones finish.
   */
  stop(): void {
    this.stopped = true;
    for (const q of this.queues.values()) for (const job of q) job.reject(new ProtocolError(Code.Unavailable, SHUTTING_DOWN));
    this.queues.clear();
  }

  private enqueue(address: string, run: () => Promise<unknown>): Promise<unknown> {
    if (this.stopped) return Promise.reject(new ProtocolError(Code.Unavailable, SHUTTING_DOWN));
    const q = this.queues.get(address);
    if (q !== undefined && q.length >= this.limits.queuePerAddress) {
      return Promise.reject(new ProtocolError(Code.RateLimited, "too many password checks waiting from your address; retry later"));
    }
    if (!this.trusted(address) && !this.admit(address)) {
      return Promise.reject(new ProtocolError(Code.RateLimited, "too many logins and registrations from your address; retry later"));
    }
    return new Promise((resolve, reject) => {
      const job = { run, resolve, reject };
      if (q === undefined) this.queues.set(address, [job]);
      else q.push(job);
      this.pump();
    });
  }

  private pump(): void {
    while (this.running < this.parallel && this.queues.size > 0) {
      const [address, q] = this.queues.entries().next().value as [string, Job[]];
      const job = q.shift() as Job;
      // Round-robin: the address goes to the back of the line, or leaves it.
      this.queues.delete(address);
      if (q.length > 0) this.queues.set(address, q);
      this.running++;
      job.run().then(job.resolve, job.reject).finally(() => {
        this.running--;
        this.pump();
      });
    }
  }
}
