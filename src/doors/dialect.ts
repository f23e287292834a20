// What every seed door shares: a door is a front-end over the same dispatcher and
// router as the native protocol, never a copy of feature logic.
//
// A door decodes its client's frame, runs native actions for it through the
// dispatcher's decoded entry point (dispatch(session, action, data)) and answers in its
// own shape. The connection's codec is a DialectCodec: the dispatcher's replies to the
// door's calls come back to the door as data (an Answer), not as wire text, and
// events from the router are rendered by the door (or skipped where its protocol has
// no such event). Each connection's frames are handled one at a time, in order (a
// door may need the answer of one native action to decide on the next: registration
// then login), with a bounded queue: past it the connection stops being read.
//
// Limits are the native door's: each frame counts once against the request rate (the
// native requests a door makes for it do not count again), bad frames against
// --bad-frame-limit; past either, what the connection is owed is answered, then the
// door's notice, then the connection is closed.

import { isUtf8 } from "node:buffer";
import type { Logger } from "pino";
import type { Codec, ReplyBody } from "../protocol/codec.js";
import { Code, codeText, ProtocolError } from "../protocol/codes.js";
import { INBOX_BYTES, RATE_CLOSING, RATE_REFUSED, type Dispatcher } from "../protocol/dispatcher.js";
import type { Event } from "../protocol/events.js";
import { peekAction, type OutFrame } from "../protocol/frames.js";
import type { Session, Upload } from "../protocol/session.js";
import type { Front } from "../transport/listener.js";

/** A native action's outcome, as a door sees it. */
export interface Answer {
  ok: boolean;
  code: Code;
  /** The reply's data (ok only). */
  body: ReplyBody | undefined;
  /** The error text (or "OK"). */
  text: string;
}

/**
 * Frames a connection may have waiting before it is no longer read, and their bytes
 * (as the native door's read-ahead, INBOX_BYTES): 64 frames of up to --max-frame each
 * would be 64 MiB held for a client that does not read its answers.
 */
const QUEUE_HIGH = 64;
const QUEUE_LOW = 16;

type Item<M> =
  /** `size`: the bytes of the frame it was decoded from (counted while queued). */
  | { msg: M; size: number }
  | { bad: { code: Code; reason: string; action: string | undefined } }
  /** Over the request rate: answered 13 in the door's shape, not run. */
  | { refused: M; size: number }
  /** The notice before the connection is closed (past a limit): the last item. */
  | { last: OutFrame }
  /** A new connection's first step (DialectDoor.start). */
  | { open: true };

/**
 * A door connection's codec and state: the dispatcher's replies to the door's calls,
 * the frames waiting, and what the door keeps per connection (`state`).
 */
export class DialectCodec<S, M = unknown> implements Codec {
  /** No seed door shows direct messages (Codec.inbox). */
  readonly inbox = false;
  private readonly waiting: { action: string; resolve: (a: Answer) => void }[] = [];
  readonly queue: Item<M>[] = [];
  /** The frame bytes of the queued items. */
  queuedBytes = 0;
  running = false;
  /** The client sent its last frame (half-close): close once they are answered. */
  inputEnded = false;
  /** Past a limit: the notice is queued, nothing more is. */
  closing = false;
  /**
   * The session this connection's login stored (see DialectDoor.endSession): kept here,
   * as the Session forgets its sid when it is logged out (an operator's kick).
   */
  stored: { uid: string; sid: string; expires: number } | undefined;

  constructor(
    private readonly door: DialectDoor<S, M>,
    readonly state: S,
  ) {}

  get name(): string {
    return this.door.name;
  }

  /** Frames read and not yet answered (a graceful stop waits for them). */
  get pending(): boolean {
    return this.running || this.queue.length > 0;
  }

  expect(action: string): Promise<Answer> {
    return new Promise((resolve) => this.waiting.push({ action, resolve }));
  }

  /**
   * The connection closed: the dispatcher runs nothing more for it, so calls still
   * waiting get a failure instead of waiting forever (with what the door holds, such as
   * a lock, while it waits).
   */
  abandon(): void {
    for (const w of this.waiting.splice(0)) w.resolve({ ok: false, code: Code.Unavailable, body: undefined, text: "the connection closed" });
  }

  // A reply the door did not ask for (the auth frame register sends after its own
  // reply) matches no waiting call and is dropped: the door says what its protocol says.
  reply(action: string, body: ReplyBody): OutFrame {
    const w = this.waiting[0];
    if (w && w.action === action) {
      this.waiting.shift();
      w.resolve({ ok: true, code: Code.OK, body, text: codeText(Code.OK) });
    }
    return "";
  }

  error(action: string, code: Code, text: string = codeText(code)): OutFrame {
    const w = this.waiting[0];
    if (w && w.action === action) {
      this.waiting.shift();
      w.resolve({ ok: false, code, body: undefined, text });
    }
    return "";
  }

  welcome(): OutFrame {
    return "";
  }

  event(ev: Event): OutFrame {
    return this.door.render(this.state, ev);
  }
}

/**
 * A door whose clients send one JSON object per frame, over a TCP listener (seeds 000
 * and 001) or as WebSocket messages (seed 003): JSON decoding, the per-connection line
 * and calls into the dispatcher. A subclass says how to answer a frame, how bad input
 * looks, and how events look.
 */
export abstract class DialectDoor<S, M = Record<string, unknown>> implements Front {
  abstract readonly name: string;
  readonly streams = false;

  constructor(
    protected readonly dispatcher: Dispatcher,
    protected readonly log: Logger,
  ) {
    dispatcher.onClose((s) => {
      if (s.codec instanceof DialectCodec) s.codec.abandon();
    });
  }

  /**
   * For a door whose login stores a session whose sid its client never sees (seeds 000,
   * 001 and 003): the session ends with the connection. Kept, reconnecting clients
   * piled sessions up until the account's oldest (another door's session id, a native
   * device's sid) were revoked for them (--max-sessions-per-user; a review: 64 logins
   * on the rooms door ended a phone's session).
   */
  protected endSession(s: Session, revoke: (uid: string, sid: string, expires: number) => void): void {
    const stored = s.codec instanceof DialectCodec ? s.codec.stored : undefined;
    if (stored !== undefined) revoke(stored.uid, stored.sid, stored.expires);
    else if (s.uid !== undefined && s.sid !== undefined) revoke(s.uid, s.sid, s.expires);
  }

  /** A new connection's state. */
  protected abstract initial(): S;
  /** Answers one decoded frame: the frames to send, in order (none: nothing). */
  protected abstract handle(s: Session, state: S, msg: M): Promise<OutFrame[]>;
  /**
   * The door's error frame for input it cannot take (bad JSON, too large, …); `action`
   * is the request's name where the broken frame shows it.
   */
  abstract bad(code: Code, reason: string, action?: string): OutFrame;
  /** An event in the door's shape for this connection, or "" when it shows none. */
  abstract render(state: S, ev: Event): OutFrame;
  /**
   * The door's answer to a request it will not run (over the request rate: 13) or could
   * not (a failure: 16), in that request's own shape: `reason` says why.
   */
  protected abstract refuse(msg: M, code: Code, reason: string): OutFrame;
  /** A frame is one the door can take (a JSON object with what the door keys on). */
  protected abstract decode(value: unknown): M | string;

  /**
   * Answers input the door could not take, in its turn: the door's error frame. A door
   * may do more (seed 003 closes a socket whose first message is not its login).
   */
  protected refused(_s: Session, _state: S, code: Code, reason: string, action: string | undefined): OutFrame[] {
    return [this.bad(code, reason, action)];
  }

  codec(): Codec {
    return new DialectCodec<S, M>(this, this.initial());
  }

  greeting(): OutFrame | undefined {
    return undefined;
  }

  refusal(code: Code, text: string): OutFrame {
    return this.bad(code, text);
  }

  frame(s: Session, bytes: Buffer, _upload: Upload | undefined, ascii: boolean): void {
    // As the native door (§2): decoding would turn bad bytes into U+FFFD silently.
    if (!ascii && !isUtf8(bytes)) return this.reject(s, Code.InvalidData, "frame is not valid UTF-8", peekAction(bytes));
    let value: unknown;
    try {
      value = JSON.parse(bytes.toString(ascii ? "latin1" : "utf8"));
    } catch {
      return this.reject(s, Code.InvalidData, "frame is not valid JSON", peekAction(bytes));
    }
    const msg = this.decode(value);
    if (typeof msg === "string") return this.reject(s, Code.InvalidData, msg, undefined);
    switch (this.dispatcher.rated(s)) {
      case "ok":
        return this.push(s, { msg, size: bytes.length });
      case "refused":
        return this.push(s, { refused: msg, size: bytes.length });
      case "close":
        return this.closeAfter(s, this.bad(Code.RateLimited, RATE_CLOSING));
    }
  }

  reject(s: Session, code: Code, reason: string, action: string | undefined): void {
    // Counted like the native door's bad frames; past --bad-frame-limit, the notice
    // comes after what the connection is owed.
    // (A frame shed for --max-partial-input, 13, is not the client's fault: not counted.)
    if (code !== Code.RateLimited && this.dispatcher.badFrame(s, code)) return this.closeAfter(s, this.bad(code, "too many bad frames; closing the connection"));
    this.push(s, { bad: { code, reason, action } });
  }

  /** Stops reading; `notice` is sent after everything queued before it, then the connection closes. */
  private closeAfter(s: Session, notice: OutFrame): void {
    const c = s.codec as DialectCodec<S, M>;
    if (c.closing) return;
    c.closing = true;
    s.peer.pause("closing");
    c.queue.push({ last: notice });
    if (!c.running) void this.pump(s, c);
  }

  inputEnded(s: Session): void {
    const c = s.codec as DialectCodec<S, M>;
    c.inputEnded = true;
    if (!c.running) this.dispatcher.inputEnded(s);
  }

  /** Sends `frame` and closes the connection once it is out. */
  protected closeWith(s: Session, frame: OutFrame): OutFrame[] {
    s.peer.send(frame, false);
    s.peer.end();
    return [];
  }

  /** Runs a native action for the connection; resolves with its outcome. */
  protected call(s: Session, action: string, data: Record<string, unknown>): Promise<Answer> {
    // The dispatcher takes nothing more from a closed connection: no answer would come.
    if (s.peer.closed) return Promise.resolve({ ok: false, code: Code.Unavailable, body: undefined, text: "the connection closed" });
    const c = s.codec as DialectCodec<S, M>;
    const p = c.expect(action);
    // The frame it serves was counted against the rate when it arrived.
    this.dispatcher.dispatch(s, action, data, undefined, 0, false, false);
    if (action !== "auth" && action !== "register" && action !== "logout") return p;
    return p.then((a) => {
      // A logout revoked it already.
      if (a.ok) c.stored = action !== "logout" && s.uid !== undefined && s.sid !== undefined ? { uid: s.uid, sid: s.sid, expires: s.expires } : undefined;
      return a;
    });
  }

  /**
   * A new connection's first step, before anything it sends is handled (a room socket
   * logs in with its session): override `start` to have one.
   */
  opened(s: Session): void {
    if (this.start !== DialectDoor.prototype.start) this.push(s, { open: true });
  }

  /** What a door does for a new connection before its first frame (nothing by default). */
  protected async start(_s: Session, _state: S): Promise<OutFrame[]> {
    return [];
  }

  private push(s: Session, item: Item<M>): void {
    const c = s.codec as DialectCodec<S, M>;
    if (c.closing) return;
    c.queue.push(item);
    if ("size" in item) c.queuedBytes += item.size;
    if (c.queue.length > QUEUE_HIGH || c.queuedBytes > INBOX_BYTES) s.peer.pause("door");
    if (!c.running) void this.pump(s, c);
  }

  private async pump(s: Session, c: DialectCodec<S, M>): Promise<void> {
    c.running = true;
    try {
      while (c.queue.length > 0 && !s.peer.closed) {
        // A client that does not read its answers stops being served, not buffered.
        if (s.peer.congested && !(await s.peer.drained())) return;
        const item = c.queue.shift() as Item<M>;
        if ("size" in item) c.queuedBytes -= item.size;
        if (c.queue.length <= QUEUE_LOW && c.queuedBytes <= INBOX_BYTES / 2) s.peer.resume("door");
        if ("last" in item) {
          s.peer.send(item.last, false);
          s.peer.end();
          break;
        }
        let out: OutFrame[];
        try {
          if ("bad" in item) out = this.refused(s, c.state, item.bad.code, item.bad.reason, item.bad.action);
          else if ("refused" in item) out = [this.refuse(item.refused, Code.RateLimited, RATE_REFUSED)];
          else if ("open" in item) out = await this.start(s, c.state);
          else out = await this.handle(s, c.state, item.msg);
        } catch (err) {
          // A refusal thrown by what the request read (16: a cluster's log out of reach)
          // says itself; anything else is a failure of ours, logged.
          const refusal = err instanceof ProtocolError ? err : undefined;
          if (refusal) s.log.warn({ code: refusal.code, reason: refusal.message, door: this.name }, "door request refused");
          else s.log.error({ err, door: this.name }, "door request failed");
          const code = refusal?.code ?? Code.Unavailable;
          const text = refusal?.message ?? "the server could not complete the request; nothing was changed";
          // Answered as the request's own refusal (its type or action, its ids), where there is one.
          out = [item !== undefined && "msg" in item ? this.refuse(item.msg, code, text) : this.bad(code, text)];
        }
        for (const f of out) if (f !== "") s.peer.send(f, false);
      }
    } finally {
      c.running = false;
      // The dispatcher closes the connection once its own line is answered too.
      if (c.inputEnded) this.dispatcher.inputEnded(s);
    }
  }
}

/**
 * `given` (a frame's field) names the login `mine`: logins are unique whatever their
 * case (the login index is lower-case), and a client may log in typing any case.
 */
export function sameLogin(given: unknown, mine: string | undefined): boolean {
  return typeof given === "string" && mine !== undefined && given.toLowerCase() === mine.toLowerCase();
}

/** A JSON string field of a decoded frame, or undefined. */
export function str(msg: Record<string, unknown>, key: string): string | undefined {
  const v = msg[key];
  return typeof v === "string" ? v : undefined;
}

/**
 * `text`'s first `max` code points: a name a door makes up (a room named after its
 * members) fits the native limit, which counts code points, and never ends in half
 * of a surrogate pair (slice(0, 64) could: the native action refused the lone half).
 */
export function clip(text: string, max: number): string {
  let units = 0;
  let points = 0;
  while (units < text.length && points < max) {
    const c = text.charCodeAt(units);
    units += c >= 0xd800 && c <= 0xdbff && units + 1 < text.length ? 2 : 1;
    points++;
  }
  return text.slice(0, units);
}

/**
 * The elements of a JSON array, `values` written one by one as they come (the text
 * between its brackets): a door's long lists (a room's messages) are streamed as the
 * client reads, never built whole.
 */
export async function* jsonElements(values: AsyncIterable<unknown>): AsyncGenerator<string> {
  let sep = "";
  for await (const v of values) {
    yield sep + JSON.stringify(v);
    sep = ",";
  }
}
