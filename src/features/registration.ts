// Whether `register` is open. An operator's setting (the admin port's /registration,
// `wirechat registration` on a running server or a stopped data dir, a cluster log
// command) is stored in the data dir and outlives restarts. A --registration given in
// the flags, the environment or the config file wins at start-up, and again on a SIGHUP
// that finds it changed; unset, the stored setting holds (open when none was ever made).

import type { Config } from "../config.js";
import { put, type BatchOp, type Storage } from "../storage/db.js";
import { REGISTRATION_KEY } from "../storage/layout.js";

export type RegistrationState = "open" | "closed";

/** What a register is told while registration is closed (15). */
export const REGISTRATION_CLOSED = "registration is closed on this server; ask its operator for an account";

function state(v: unknown): RegistrationState | undefined {
  return v === "open" || v === "closed" ? v : undefined;
}

export class Registration {
  private constructor(
    private readonly storage: Storage,
    private current: RegistrationState,
    /** --registration decides (given at start-up, or by the last SIGHUP that changed it). */
    private configured: boolean,
    /** The operator's setting as stored (undefined: none made). */
    private stored: RegistrationState | undefined,
  ) {}

  /** The configured value when there is one, else the stored one, else open. */
  static async load(storage: Storage, config: Config): Promise<Registration> {
    const stored = state(await storage.spaces.meta.get(REGISTRATION_KEY));
    const configured = state(config.registration);
    return new Registration(storage, configured ?? stored ?? "open", configured !== undefined, stored);
  }

  get value(): RegistrationState {
    return this.current;
  }

  get closed(): boolean {
    return this.current === "closed";
  }

  /** The log's (or the operator's stored) setting, whatever --registration says: open when none was made. */
  get logged(): RegistrationState {
    return this.stored ?? "open";
  }

  /** This node's setting is the stored one (no --registration decides instead). */
  get followsLog(): boolean {
    return !this.configured;
  }

  /** An operator's setting, in effect once stored (durable when this resolves). */
  async set(v: RegistrationState): Promise<void> {
    await this.storage.commit(this.ops(v));
    this.applied(v);
  }

  /** The writes of set() for a caller that batches them (cluster mode's apply); report with applied(). */
  ops(v: RegistrationState): BatchOp[] {
    return [put(this.storage.spaces.meta, REGISTRATION_KEY, v)];
  }

  applied(v: RegistrationState): void {
    this.current = this.stored = v;
  }

  /**
   * A setting an operator made before this start-up, applied now (cluster mode's
   * catch-up, written with ops()): in effect unless --registration was given, which
   * wins at start-up.
   */
  replayed(v: RegistrationState): void {
    this.stored = v;
    if (!this.configured) this.current = v;
  }

  /**
   * SIGHUP changed --registration: a value takes effect; unset, the operator's stored
   * setting does (open when none), as at a start-up without it.
   */
  reconfigured(v: string): void {
    this.configured = state(v) !== undefined;
    this.current = state(v) ?? this.stored ?? "open";
  }
}
