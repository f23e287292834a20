// The server's own counters, as plain numbers. Every layer adds to them on its hot
// path (an increment, no label hashing, no allocation); the admin port's Prometheus
// registry (ops/prometheus.ts) reads them only when it is scraped. Figures a scrape
// can compute from live state (connections by state, queued bytes) are not counted
// here at all.

import { CODES } from "./protocol/codes.js";

/** A histogram with fixed upper bounds: one array, one search per observation. */
export class Buckets {
  readonly counts: Float64Array;
  count = 0;
  sum = 0;

  constructor(readonly bounds: readonly number[]) {
    this.counts = new Float64Array(bounds.length);
  }

  /** `n` observations of `v`. */
  observe(v: number, n = 1): void {
    this.count += n;
    this.sum += v * n;
    const b = this.bounds;
    for (let i = 0; i < b.length; i++) {
      if (v <= b[i]) {
        this.counts[i] += n;
        return;
      }
    }
  }
}

/** Auth outcomes, as the metric's `result` label spells them. */
export type AuthResult = "ok" | "wrong_password" | "unknown_login" | "throttled" | "banned" | "other";

/** Why the server closed a connection itself. */
export type CloseReason = "slow_reader" | "rate_limit" | "bad_frames" | "bad_http" | "idle" | "kicked" | "slow_upload" | "input_budget";

export class Metrics {
  /** Requests answered, by action and status code (index = code). */
  readonly requests = new Map<string, Float64Array>();
  readonly auth: Record<AuthResult, number> = { ok: 0, wrong_password: 0, unknown_login: 0, throttled: 0, banned: 0, other: 0 };
  readonly closes: Record<CloseReason, number> = { slow_reader: 0, rate_limit: 0, bad_frames: 0, bad_http: 0, idle: 0, kicked: 0, slow_upload: 0, input_budget: 0 };
  messagesStored = 0;
  /** Message events handed to a recipient's connection (live or by a sync). */
  messagesDelivered = 0;
  /**
   * Direct messages stored since start for a recipient with no live connection, not
   * yet sent to them by a sync (a sync's messages count down, never below zero).
   */
  offlineQueue = 0;
  /**
   * Seconds a message waited for its group commit, counted per message but measured
   * per batch: from the batch's first message to the batch on disk (an upper bound for
   * the others in it).
   */
  readonly deliveryLag = new Buckets([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]);
  readonly batchOps = new Buckets([1, 4, 16, 64, 256, 1024, 4096, 16384]);
  /** Seconds from a batch's write call to its completion (synced when durable). */
  readonly batchSeconds = new Buckets([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1]);
  connectionsOpened = 0;
  refused = 0;
  /** Bytes read and written by connections already closed (live ones are read from their sockets). */
  bytesInClosed = 0;
  bytesOutClosed = 0;
  uploadsInFlight = 0;
  /** The TCP doors' scanners' count of unfinished frames' bytes (--max-partial-input), once the server has one. */
  partialInput: { readonly bytes: number } = { bytes: 0 };

  /** Registered action names: anything else counts as "unknown" (a client cannot grow the map). */
  private readonly known = new Set<string>();

  knowAction(name: string): void {
    this.known.add(name);
  }

  request(action: string, code: number): void {
    let row = this.requests.get(action);
    if (row === undefined) {
      const name = this.known.has(action) ? action : "unknown";
      row = this.requests.get(name) ?? new Float64Array(CODES.length);
      this.requests.set(name, row);
    }
    row[code]++;
  }
}
