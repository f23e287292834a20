// The dispatcher: features register their actions here (name, schema, handler); each
// connection's frames are decoded, checked and handed to handlers strictly in arrival
// order, and replies leave in the same order.
//
// Ordering with overlap: a handler normally runs only after the previous request of
// the connection has fully finished. An action marked `pipelined` (message) may instead
// return a Pending once its writes are queued: the next request starts at once, and its
// reply waits in line until the commit lands. A non-pipelined request waits for every
// pending one first, so it sees their writes. That lets one connection keep many
// messages in one group commit without ever reordering replies or state changes.

import { isUtf8 } from "node:buffer";
import type { Logger } from "pino";
import type { Config } from "../config.js";
import { Code, ProtocolError } from "./codes.js";
import { errorFrame, peekAction, replyFrame, type Fields } from "./frames.js";
import { Session, type OutFrame, type Peer, type StoredAttachment, type Upload } from "./session.js";
import { compileSchema, type Validator } from "./validation.js";

export type Reply = Fields;

/**
 * A reply the handler serialised itself, because it streams (a history page with
 * attachments): sent as is, in order like any other.
 */
export class FramedReply {
  constructor(readonly frame: OutFrame) {}
}

/** The reply of a pipelined handler, available once `settled` resolves. */
export class Pending {
  constructor(readonly settled: Promise<Reply>) {}
}

export interface Request<D> {
  readonly action: string;
  readonly data: D;
  readonly session: Session;
  /** The attachment streamed in with this frame (stored and pinned until the reply). */
  readonly attachment: StoredAttachment | undefined;
  /** Runs right after this request's reply is sent (follow-up frames, deliveries). */
  after(fn: () => void): void;
}

export interface ActionSpec<D = never> {
  name: string;
  /** JSON Schema of the request's `data`. */
  schema: object;
  /** Allowed before authentication. */
  public?: boolean;
  /** May overlap the requests after it (see the top of this file). */
  pipelined?: boolean;
  handle(req: Request<D>): Promise<Reply | Pending | FramedReply> | Reply | Pending | FramedReply;
}

interface Action {
  spec: ActionSpec<unknown>;
  validate: Validator;
}

type Item =
  | { kind: "request"; action: string; data: Record<string, unknown>; upload: Upload | undefined }
  | { kind: "reject"; action: string; code: Code; reason: string; last?: boolean };

interface Slot {
  frame: OutFrame | undefined;
  after: (() => void)[] | undefined;
}

/** Requests read ahead of the one running before the connection stops being read. */
const INBOX_LIMIT = 256;

class RequestImpl<D> implements Request<D> {
  afterFns: (() => void)[] | undefined;
  constructor(
    readonly action: string,
    readonly data: D,
    readonly session: Session,
    readonly attachment: StoredAttachment | undefined,
  ) {}
  after(fn: () => void): void {
    (this.afterFns ??= []).push(fn);
  }
}

/** Per-connection request state, kept beside the Session. */
class Line {
  inbox: Item[] = [];
  head = 0;
  running = false;
  slots: Slot[] = [];
  /** Replies of pipelined requests still waiting for their commit (made when needed). */
  pending: Set<Promise<unknown>> | undefined;
  badFrames = 0;
  badSince = 0;
  /** Set once the connection is to be closed: nothing more is read or queued. */
  closing = false;
  /** The client half-closed: close once everything it sent is answered. */
  inputEnded = false;
  /** Token bucket of the request rate limit, refilled lazily from `tokensAt` (ms). */
  tokens: number;
  tokensAt = Date.now();
  refused = 0;
  refusedSince = 0;
  constructor(burst: number) {
    this.tokens = burst;
  }
}

export class Dispatcher {
  private readonly actions = new Map<string, Action>();
  private readonly lines = new WeakMap<Session, Line>();
  /** Called when a connection closes (features clean up presence, hub membership). */
  private readonly closeHooks: ((s: Session) => void)[] = [];

  constructor(
    private readonly config: Config,
    private readonly log: Logger,
  ) {}

  register<D>(spec: ActionSpec<D>): void {
    if (this.actions.has(spec.name)) throw new Error(`action ${spec.name} registered twice`);
    this.actions.set(spec.name, { spec: spec as unknown as ActionSpec<unknown>, validate: compileSchema(spec.schema) });
  }

  onClose(fn: (s: Session) => void): void {
    this.closeHooks.push(fn);
  }

  actionNames(): string[] {
    return [...this.actions.keys()];
  }

  open(peer: Peer): Session {
    const s = new Session(peer, this.log);
    this.lines.set(s, new Line(this.config.burst));
    return s;
  }

  close(s: Session): void {
    for (const fn of this.closeHooks) {
      try {
        fn(s);
      } catch (err) {
        s.log.error({ err }, "close hook failed");
      }
    }
  }

  /** Resolves once no connection has a request queued, running or awaiting its commit. */
  async settled(timeoutMs: number, sessions: Iterable<Session>): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    const busy = () => {
      for (const s of sessions) {
        const line = this.lines.get(s);
        if (line && (line.running || line.slots.length > 0 || (line.pending?.size ?? 0) > 0)) return true;
      }
      return false;
    };
    while (busy()) {
      if (Date.now() > deadline) return false;
      await new Promise((r) => setTimeout(r, 10));
    }
    return true;
  }

  /** The client will send no more: answer what it sent, then close the connection. */
  inputEnded(s: Session): void {
    const line = this.lines.get(s);
    if (!line) return;
    line.inputEnded = true;
    this.endIfDone(s, line);
  }

  private endIfDone(s: Session, line: Line): void {
    if (line.inputEnded && !line.running && line.slots.length === 0) s.peer.end();
  }

  /**
   * A complete frame from the scanner: decode it and queue it in arrival order. An
   * attachment that streamed in with it comes as `upload`.
   */
  frame(s: Session, bytes: Buffer, upload?: Upload): void {
    const refuse = (reason: string, action: string | undefined) => {
      upload?.release();
      this.reject(s, Code.InvalidData, reason, action);
    };
    if (!isUtf8(bytes)) return refuse("frame is not valid UTF-8", peekAction(bytes));
    let msg: unknown;
    try {
      msg = JSON.parse(bytes.toString("utf8"));
    } catch {
      return refuse("frame is not valid JSON", peekAction(bytes));
    }
    if (typeof msg !== "object" || msg === null || Array.isArray(msg)) {
      return refuse("frame must be a JSON object", undefined);
    }
    const { action, data } = msg as { action?: unknown; data?: unknown };
    if (typeof action !== "string" || action === "") return refuse("frame has no 'action' string", undefined);
    if (data !== undefined && (typeof data !== "object" || data === null || Array.isArray(data))) {
      upload?.release();
      this.enqueue(s, { kind: "reject", action, code: Code.InvalidData, reason: "'data' must be an object" });
      return;
    }
    if (!this.withinRate(s)) {
      upload?.release();
      this.enqueue(s, { kind: "reject", action, code: Code.RateLimited, reason: "too many requests; slow down and retry" });
      return;
    }
    this.enqueue(s, { kind: "request", action, data: (data ?? {}) as Record<string, unknown>, upload });
  }

  /**
   * The per-connection token bucket: `rate` requests a second, `burst` at once. A
   * request over it is answered 13 and not run; a client that keeps going past
   * `rateDisconnect` refusals within the window is closed.
   */
  private withinRate(s: Session): boolean {
    const line = this.lines.get(s) as Line;
    const { rate, burst, rateDisconnect, badFrameWindow } = this.config;
    const now = Date.now();
    line.tokens = Math.min(burst, line.tokens + ((now - line.tokensAt) * rate) / 1000);
    line.tokensAt = now;
    if (line.tokens >= 1) {
      line.tokens -= 1;
      return true;
    }
    if (now - line.refusedSince > badFrameWindow * 1000) {
      line.refusedSince = now;
      line.refused = 0;
    }
    if (++line.refused > rateDisconnect && !line.closing) {
      s.log.warn({ refused: line.refused }, "request rate far over the limit; closing");
      this.enqueue(s, { kind: "reject", action: "unknown", code: Code.RateLimited, reason: "too many requests; closing the connection", last: true });
      line.closing = true;
      s.peer.pause("closing");
    }
    return false;
  }

  /** Bytes the scanner or decoder could not accept: one error reply, in order. */
  reject(s: Session, code: Code, reason: string, action: string | undefined): void {
    const line = this.lines.get(s);
    if (!line) return;
    const now = Date.now();
    if (now - line.badSince > this.config.badFrameWindow * 1000) {
      line.badSince = now;
      line.badFrames = 0;
    }
    if (++line.badFrames > this.config.badFrameLimit) {
      s.log.warn({ badFrames: line.badFrames }, "too many bad frames; closing");
      // The notice waits behind the replies already owed, then the connection ends.
      this.enqueue(s, { kind: "reject", action: "unknown", code, reason: "too many bad frames; closing the connection", last: true });
      line.closing = true;
      s.peer.pause("closing");
      return;
    }
    this.enqueue(s, { kind: "reject", action: action ?? "unknown", code, reason });
  }

  private enqueue(s: Session, item: Item): void {
    const line = this.lines.get(s);
    if (!line || line.closing || s.peer.closed) {
      if (item.kind === "request") item.upload?.release();
      return;
    }
    line.inbox.push(item);
    if (line.inbox.length - line.head > INBOX_LIMIT) s.peer.pause("inbox");
    if (!line.running) void this.run(s, line);
  }

  private async run(s: Session, line: Line): Promise<void> {
    line.running = true;
    try {
      while (line.head < line.inbox.length) {
        const item = line.inbox[line.head++];
        if (line.head === line.inbox.length) {
          line.inbox = [];
          line.head = 0;
        }
        const slot: Slot = { frame: undefined, after: undefined };
        line.slots.push(slot);
        await this.execute(s, line, item, slot);
        if (line.inbox.length - line.head <= INBOX_LIMIT / 2) s.peer.resume("inbox");
      }
    } finally {
      line.running = false;
      this.endIfDone(s, line);
    }
  }

  private async execute(s: Session, line: Line, item: Item, slot: Slot): Promise<void> {
    if (item.kind === "reject") {
      const after = item.last ? [() => s.peer.end()] : undefined;
      return this.fill(s, line, slot, errorFrame(item.action, item.code, item.reason), after);
    }
    const { action, data, upload } = item;
    // Whatever happens below, the upload is released once the request is answered: a
    // message that stored a reference to the blob keeps it, anything else deletes it.
    let released = false;
    const release = () => {
      if (!released) {
        released = true;
        upload?.release();
      }
    };
    const refuse = (code: Code, message: string) => {
      release();
      this.fill(s, line, slot, errorFrame(action, code, message));
    };
    const entry = this.actions.get(action);
    if (!entry) return refuse(Code.UnknownAction, `unknown action '${action}'`);
    const refusal = this.gate(s, entry.spec, data) ?? entry.validate(data);
    if (refusal) return refuse(refusal.code, refusal.message);
    let attachment: StoredAttachment | undefined;
    if (upload) {
      try {
        attachment = await upload.finish();
      } catch (err) {
        const fault = (err as { fault?: string }).fault;
        const code = fault === "invalid" ? Code.InvalidData : fault === "too-large" ? Code.TooLarge : Code.Unavailable;
        return refuse(code, (err as Error).message);
      }
    }
    if (!entry.spec.pipelined && line.pending && line.pending.size > 0) await Promise.all(line.pending);
    const req = new RequestImpl(action, data as never, s, attachment);
    try {
      const result = await entry.spec.handle(req);
      if (result instanceof Pending) {
        const p = result.settled.then(
          (reply) => this.fill(s, line, slot, replyFrame(action, reply), req.afterFns),
          (err) => this.fill(s, line, slot, this.failure(s, action, err)),
        );
        (line.pending ??= new Set()).add(p);
        void p.finally(() => {
          line.pending?.delete(p);
          release();
        });
      } else {
        release();
        const out = result instanceof FramedReply ? result.frame : replyFrame(action, result);
        this.fill(s, line, slot, out, req.afterFns);
      }
    } catch (err) {
      release();
      this.fill(s, line, slot, this.failure(s, action, err));
    }
  }

  /** Auth and cid/sid checks that precede validation. */
  private gate(s: Session, spec: ActionSpec<unknown>, data: Record<string, unknown>): ProtocolError | undefined {
    if (!spec.public && s.uid === undefined) {
      return new ProtocolError(Code.NeedAuth, `'${spec.name}' needs an authenticated session`);
    }
    // The seed's clients send cid and sid with every request. `auth` takes sid as its
    // credential, and before login a public action (hello, register, …) has no session
    // to compare them with, so those are exempt.
    if (spec.name === "auth" || (spec.public && s.uid === undefined)) return undefined;
    const { cid, sid } = data;
    if (cid !== undefined && cid !== null && String(cid) !== s.uid) {
      return new ProtocolError(Code.NeedAuth, "'cid' is not this connection's user");
    }
    if (sid !== undefined && sid !== null && sid !== s.sid) {
      return new ProtocolError(Code.NeedAuth, "'sid' is not this connection's session");
    }
    return undefined;
  }

  private failure(s: Session, action: string, err: unknown): string {
    if (err instanceof ProtocolError) return errorFrame(action, err.code, err.message);
    s.log.error({ err, action }, "request failed");
    return errorFrame(action, Code.Unavailable, "the server could not complete the request; nothing was changed");
  }

  private fill(s: Session, line: Line, slot: Slot, out: OutFrame, after?: (() => void)[]): void {
    slot.frame = out;
    slot.after = after;
    this.sendReady(s, line);
    this.endIfDone(s, line);
  }

  private sendReady(s: Session, line: Line): void {
    while (line.slots.length > 0 && line.slots[0].frame !== undefined) {
      const done = line.slots.shift() as Slot;
      s.send(done.frame as OutFrame);
      if (done.after) {
        for (const fn of done.after) {
          try {
            fn();
          } catch (err) {
            s.log.error({ err }, "after-reply step failed");
          }
        }
      }
    }
  }

}
