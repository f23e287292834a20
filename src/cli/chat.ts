// `wirechat chat`: an interactive terminal client on top of src/client. It reads
// lines from stdin (readline, with history on a terminal), sends plain lines to the
// current conversation, runs `/commands`, and prints events as readable lines. It
// must behave the same when stdin and stdout are pipes (scripts and tests drive it
// that way): no prompt, no colours, no cursor tricks, and input lines handled one at a
// time, in order, so output is deterministic.

import { readFileSync } from "node:fs";
import path from "node:path";
import readline from "node:readline";
import type { Readable, Writable } from "node:stream";
import {
  WirechatClient,
  WirechatError,
  base64DecodedLength,
  hasAttachment,
  saveAttachment,
  type Attachment,
  type ConnectOptions,
  type HistoryMessage,
  type MessageEvent,
  type TlsOptions,
  type WirechatEvent,
} from "../client/index.js";
import { packageVersion } from "../config.js";
import { NAME_MAX, SEARCH_LIMIT } from "../limits.js";

export interface ChatIO {
  stdin: Readable & { isTTY?: boolean; setRawMode?: (raw: boolean) => unknown };
  stdout: Writable & { isTTY?: boolean; columns?: number };
  stderr: Writable;
}

interface ChatArgs {
  host: string;
  port: number | undefined;
  login: string;
  pass: string | undefined;
  register: boolean;
  nick: string | undefined;
  tls: boolean;
  tlsCa: string | undefined;
  tlsServername: string | undefined;
  insecure: boolean;
  raw: boolean;
  color: boolean;
  reconnect: boolean;
  /** --timeout: seconds a request waits for its reply. */
  timeoutS: number;
  help: boolean;
  /** --version / -v: print the version and do nothing else. */
  version: boolean;
}

class UsageError extends Error {}

export const CHAT_HELP = `Usage: wirechat chat --login LOGIN [options]

An interactive chat client for a wirechat server. Lines you type go to the current
conversation; lines starting with / are commands (type /help once connected).

Options:
  --host HOST            server address (default 127.0.0.1)
  --port PORT            server port (default 7788, or 7789 with --tls)
  --login LOGIN          your login (required)
  --pass PASS            your password; without it (and without $WIRECHAT_PASS)
                         it is prompted for, or read as the first line of stdin
                         when stdin is not a terminal
  --register             create the account first (needs --nick, or uses LOGIN)
  --nick NICK            the nick for --register
  --tls                  connect over TLS
  --tls-ca FILE          PEM file of the CA (or self-signed certificate) to trust
  --tls-servername NAME  name to verify the certificate against (implies --tls)
  --insecure             TLS without verifying the certificate (implies --tls)
  --raw                  print events as the server's JSON frames; lines starting
                         with { are sent as raw requests
  --no-color             no ANSI colours even on a terminal (also NO_COLOR=1)
  --no-reconnect         exit when the connection is lost instead of reconnecting
  --timeout SECONDS      how long a request (a message or a file among them) waits
                         for its reply (a file's from its last byte), through an
                         outage too (default 30); a message or file that got none
                         may have been stored: sent again, it is stored once
  -h, --help             this text
  -v, --version          the version

After /quit or the end of input, the lines before it are still handled, each given
2 s. Exit status: 0 after /quit or end of input, 1 when connecting or logging in
fails, the connection is lost for good, or a line took longer than that as you left
(the lines after it are not sent), 2 for a usage error.`;

const COMMANDS_HELP = `Commands:
  /msg NICK [TEXT]     talk to NICK: sends TEXT, and makes NICK the current conversation
                       (a nick with spaces: the longest one the line starts with, or in
                       quotes: /msg "Mary Ann" hi)
  /join #CHANNEL       enter a channel (created if it does not exist) and talk there
  /leave               leave the current channel
  /history [N]         the last N messages (default 20) of the current conversation
  /who                 members of the current channel, or your contacts and who is online
  /add NICK            add NICK to your contacts (you then see when they come online)
  /attach FILE         send FILE as an attachment to the current conversation
  /save MID FILE       save the attachment of a message you received
  /req ACTION [JSON]   send any request, print its reply
  /help                this text
  /quit                leave
Any other line is sent to the current conversation.`;

function parseChatArgs(argv: string[], env: NodeJS.ProcessEnv): ChatArgs {
  const a: ChatArgs = {
    host: "127.0.0.1",
    port: undefined,
    login: "",
    pass: env.WIRECHAT_PASS || undefined,
    register: false,
    nick: undefined,
    tls: false,
    tlsCa: undefined,
    tlsServername: undefined,
    insecure: false,
    raw: false,
    color: !env.NO_COLOR,
    reconnect: true,
    timeoutS: 30,
    help: false,
    version: false,
  };
  // A leading `chat` is allowed, so a dispatcher can hand over its argv as is.
  const args = argv[0] === "chat" ? argv.slice(1) : argv;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const flag = eq < 0 ? arg : arg.slice(0, eq);
    const value = (): string => {
      const v = eq >= 0 ? arg.slice(eq + 1) : args[++i];
      if (v === undefined) throw new UsageError(`${flag} needs a value`);
      return v;
    };
    switch (flag) {
      case "-h":
      case "--help":
        a.help = true;
        break;
      case "-v":
      case "--version":
        a.version = true;
        break;
      case "--host":
        a.host = value();
        break;
      case "--port": {
        const v = value();
        const n = Number(v);
        if (!/^[0-9]+$/.test(v) || n < 1 || n > 65535) throw new UsageError(`--port must be a port number, not '${v}'`);
        a.port = n;
        break;
      }
      case "--timeout": {
        const v = value();
        const n = Number(v);
        if (!/^[0-9]+(\.[0-9]+)?$/.test(v) || n <= 0 || n > 86_400) throw new UsageError(`--timeout must be a number of seconds (at most 86400), not '${v}'`);
        a.timeoutS = n;
        break;
      }
      case "--login":
        a.login = value();
        break;
      case "--pass":
        a.pass = value();
        break;
      case "--register":
        a.register = true;
        break;
      case "--nick":
        a.nick = value();
        break;
      case "--tls":
        a.tls = true;
        break;
      case "--tls-ca":
        a.tlsCa = value();
        a.tls = true;
        break;
      // Each TLS option asks for TLS (as --tls-ca does): without it they were ignored,
      // and the chat connected in plain text.
      case "--tls-servername":
        a.tlsServername = value();
        a.tls = true;
        break;
      case "--insecure":
        a.insecure = true;
        a.tls = true;
        break;
      case "--raw":
        a.raw = true;
        break;
      case "--no-color":
        a.color = false;
        break;
      case "--no-reconnect":
        a.reconnect = false;
        break;
      default:
        throw new UsageError(`unknown option ${arg}`);
    }
  }
  if (!a.help && !a.version && !a.login) throw new UsageError("--login is required");
  return a;
}

// ---------------------------------------------------------------- output

type Paint = (s: string) => string;

interface Palette {
  nick: Paint;
  me: Paint;
  channel: Paint;
  info: Paint;
  error: Paint;
  time: Paint;
}

function palette(on: boolean): Palette {
  const c = (code: string): Paint => (on ? (s) => `\x1b[${code}m${s}\x1b[0m` : (s) => s);
  return { nick: c("1;36"), me: c("1;32"), channel: c("35"), info: c("2"), error: c("31"), time: c("2") };
}

/**
 * A line as the terminal shows it, not as it would act on it: control characters from
 * the server (a message body's escape sequences clear the screen, set the window's
 * title or the clipboard; a carriage return overwrites the line before it) are shown
 * escaped (`\x1b`); tabs and newlines stay (a message's own lines are indented where it
 * is printed). The client's own colour codes (SGR, on a terminal) stay too.
 */
export function printable(text: string, colours: boolean): string {
  return text.replace(/\x1b\[[0-9;]*m|[\x00-\x08\x0b-\x1f\x7f-\x9f]/g, (c) => {
    if (c.length > 1 && colours) return c;
    return `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}${c.slice(1)}`;
  });
}

/**
 * Text from the server (a body, a nick, a reason) as it is printed: every control
 * character escaped (colour codes too: printable keeps only the client's own), further
 * lines indented under the first (a newline cannot pass for a line of its own).
 */
function shown(text: unknown): string {
  return printable(String(text), false).replace(/\n/g, "\n    ");
}

/** Writes whole lines; on a terminal it keeps the prompt and the typed text below them. */
class Screen {
  private rl: readline.Interface | undefined;
  private barShown = false;

  constructor(
    private readonly out: ChatIO["stdout"],
    readonly tty: boolean,
  ) {}

  attach(rl: readline.Interface): void {
    this.rl = rl;
  }

  line(text: string): void {
    if (this.tty) {
      this.out.write("\r\x1b[K");
      this.barShown = false;
      this.out.write(printable(text, true) + "\n");
      this.rl?.prompt(true);
    } else {
      this.out.write(printable(text, false) + "\n");
    }
  }

  /** A progress line redrawn in place; only on a terminal. */
  bar(text: string): void {
    if (!this.tty) return;
    this.out.write("\r\x1b[K" + text);
    this.barShown = true;
  }

  endBar(): void {
    if (this.barShown) this.out.write("\r\x1b[K");
    this.barShown = false;
  }
}

function clock(unix: number): string {
  const d = new Date(unix * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

function sizeText(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function progressBar(sent: number, total: number | undefined, width = 30): string {
  if (!total) return `  ${sizeText(sent)} sent`;
  const frac = Math.min(1, sent / total);
  const full = Math.round(frac * width);
  return `  [${"#".repeat(full)}${"-".repeat(width - full)}] ${String(Math.floor(frac * 100)).padStart(3)}%  ${sizeText(sent)} / ${sizeText(total)}`;
}

// ---------------------------------------------------------------- input

/** A line asking to leave. */
function isQuit(line: string): boolean {
  return /^\/(quit|exit)\b/i.test(line.trim());
}

/** stdin lines as a queue, so each is handled after the one before has finished. */
class LineQueue {
  private lines: string[] = [];
  private waiter: (() => void) | undefined;
  ended = false;
  /** Set to stop the loop from outside (the connection is gone for good). */
  interrupted = false;
  /** Called as the user asks to leave (/quit, /exit, end of input, Ctrl-C), whatever is running. */
  onLeave: (() => void) | undefined;

  constructor(rl: readline.Interface) {
    rl.on("line", (l) => {
      this.lines.push(l);
      if (isQuit(l)) this.onLeave?.();
      this.wake();
    });
    rl.on("close", () => {
      this.ended = true;
      this.onLeave?.();
      this.wake();
    });
  }

  wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** Lines read and not handled, blank ones aside. */
  /** A /quit (or /exit) is among the lines read and not handled. */
  quitQueued(): boolean {
    return this.lines.some(isQuit);
  }

  /** Lines read and not handled, up to a /quit among them (what follows it never would be). */
  unhandled(): number {
    const quit = this.lines.findIndex(isQuit);
    return (quit < 0 ? this.lines : this.lines.slice(0, quit)).filter((l) => l.trim() !== "").length;
  }

  async next(): Promise<string | undefined> {
    for (;;) {
      if (this.interrupted) return undefined;
      if (this.lines.length > 0) return this.lines.shift();
      if (this.ended) return undefined;
      await new Promise<void>((r) => (this.waiter = r));
    }
  }
}

// ---------------------------------------------------------------- the session

type Conversation = { kind: "user"; uid: string; nick: string } | { kind: "channel"; chid: string; name: string };

/** How long each command may take once the user has asked to leave. */
const QUIT_GRACE_MS = 2000;
/** Conversations whose names (channels, people) a session learns at login. */
const NAMES_AT_LOGIN = 500;

/** Channels whose newest message shown is remembered, for the catch-up after a reconnect. */
const SEEN_CHANNELS = 64;
/** Messages read per channel after a reconnect. */
const CATCH_UP_LIMIT = 100;
/** Own direct messages remembered as shown, so that a resend's reply and its echo show once. */
const OWN_KEPT = 256;
/**
 * Live channel messages (and edits, deletions) held back while a reconnect's catch-up
 * is read: at most this many, and this much attachment text (beyond: shown as they come).
 */
const HELD_DURING_CATCH_UP = 1000;
/**
 * Channel messages remembered as shown (`<chid> <mid>`, some 40 bytes each): a whole
 * catch-up and the live ones held during it. A held one the catch-up also read is shown
 * after it, and must still be remembered then: 2,048 forgot it behind a catch-up of
 * 21 channels of 100, and it showed twice.
 */
const SHOWN_KEPT = SEEN_CHANNELS * CATCH_UP_LIMIT + HELD_DURING_CATCH_UP;
const HELD_BYTES_DURING_CATCH_UP = 64 * 1024 * 1024;
/** Events that would show out of order before a catch-up: held with channel messages. */
const HELD_WITH_MESSAGES = new Set(["ev_edit", "ev_delmessage", "ev_channel_deleted"]);

/** Adds `key` to `set` (its oldest dropped past `cap`); false if it was there already. */
function remember(set: Set<string>, key: string, cap: number): boolean {
  if (set.has(key)) return false;
  if (set.size >= cap) set.delete(set.values().next().value as string);
  set.add(key);
  return true;
}

class ChatSession {
  private target: Conversation | undefined;
  private readonly nicks = new Map<string, string>();
  private readonly channels = new Map<string, string>();
  /** The last few received attachments, for /save; bounded because each can be 64 MiB. */
  private readonly attachments = new Map<string, Attachment>();
  /**
   * Each channel's newest message shown (chid → mid), the most recent last, bounded:
   * a channel's messages are not queued for a member who is away, so what came while
   * the connection was being re-made is read from history after it (caughtUp).
   */
  private readonly seenInChannel = new Map<string, bigint>();
  /** `<chid> <mid>` of the channel messages shown last (SHOWN_KEPT), so none shows twice. */
  private readonly shownRecently = new Set<string>();
  /**
   * From a lost connection until its catch-up is shown: seenInChannel as it was when the
   * connection was lost, and the live channel messages that came since (shown after
   * the catch-up, so that the screen stays in order).
   */
  private gap: { from: Map<string, bigint>; held: WirechatEvent[]; bytes: number } | undefined;
  /** mids of own direct messages shown (OWN_KEPT): see sendAndShow. */
  private readonly ownShown = new Set<string>();
  /**
   * The last message that got no reply (a timeout, the link lost with no reconnect):
   * it may be stored. The same text typed again to the same conversation, as the next
   * message sent, goes with its cmid, so that it is stored once (see sendAndShow). Its
   * echo shown meanwhile says it was stored: then it is forgotten.
   */
  private unconfirmed: { kind: "text" | "file"; to: string; text: string; cmid: string } | undefined;

  constructor(
    private readonly client: WirechatClient,
    private readonly screen: Screen,
    private readonly p: Palette,
    private readonly raw: boolean,
  ) {
    if (client.uid && client.nick) this.nicks.set(client.uid, client.nick);
  }

  // ---------------- events

  onEvent(ev: WirechatEvent): void {
    const d = ev.data ?? {};
    const gap = this.gap;
    if (gap && ((ev.action === "ev_message" && typeof d.chid === "string") || HELD_WITH_MESSAGES.has(ev.action))) {
      const bytes = typeof d.attach?.data === "string" ? d.attach.data.length : 0;
      if (gap.held.length < HELD_DURING_CATCH_UP && gap.bytes + bytes <= HELD_BYTES_DURING_CATCH_UP) {
        gap.held.push(ev);
        gap.bytes += bytes;
        return;
      }
      this.showHeld(); // too much to keep back: in order as far as it goes
    }
    this.show(ev);
  }

  private show(ev: WirechatEvent): void {
    const d = ev.data ?? {};
    if (ev.action === "ev_message") {
      this.nicks.set(d.from, d.nick);
      if (hasAttachment(d.attach)) this.keepAttachment(d.mid, d.attach);
      if (typeof d.chid === "string" && typeof d.mid === "string" && /^[0-9]+$/.test(d.mid) && !this.seen(d.chid, BigInt(d.mid))) return;
      if (d.chid === undefined && d.from === this.client.uid && typeof d.mid === "string") {
        if (!remember(this.ownShown, d.mid, OWN_KEPT)) return;
      }
      const u = this.unconfirmed;
      if (u?.kind === "text" && d.from === this.client.uid && d.body === u.text && u.to === (d.chid === undefined ? `@${d.to}` : `#${d.chid}`)) this.unconfirmed = undefined;
    }
    if ((ev.action === "ev_enter" || ev.action === "ev_leave") && d.uid) this.nicks.set(d.uid, d.nick);
    if (this.raw) {
      this.screen.line(JSON.stringify(ev));
      return;
    }
    const line = this.describe(ev);
    if (line !== undefined) this.screen.line(line);
  }

  /**
   * Notes channel message `mid` as shown; false if it was already (a message that came
   * live while the catch-up read it from history, or the other way round).
   */
  private seen(chid: string, mid: bigint): boolean {
    const key = `${chid} ${mid}`;
    if (!remember(this.shownRecently, key, SHOWN_KEPT)) return false;
    this.follow(chid, mid);
    return true;
  }

  /** A reconnect's catch-up reads `chid` past `mid` at least (see caughtUp). */
  private follow(chid: string, mid: bigint): void {
    const before = this.seenInChannel.get(chid);
    this.seenInChannel.delete(chid);
    if (this.seenInChannel.size >= SEEN_CHANNELS) this.seenInChannel.delete(this.seenInChannel.keys().next().value as string);
    this.seenInChannel.set(chid, before === undefined || mid > before ? mid : before);
  }

  /** The connection is lost: what a catch-up after it must read from (see gap). */
  lost(): void {
    if (this.raw) return;
    // Lost again during a catch-up: that catch-up no longer ends the gap (its reads may
    // fail with the link); the next one reads from where the first loss left each channel.
    const { gap } = this;
    this.gap = gap ? { ...gap } : { from: new Map(this.seenInChannel), held: [], bytes: 0 };
  }

  private showHeld(): void {
    const held = this.gap?.held ?? [];
    this.gap = undefined;
    for (const ev of held) this.show(ev);
  }

  /**
   * After a reconnect: the messages each channel got meanwhile (the newest
   * CATCH_UP_LIMIT of them), shown as they would have been, oldest first, then the
   * live ones that came during the catch-up.
   */
  async caughtUp(): Promise<void> {
    if (this.raw) return; // --raw shows the server's frames only
    const gap = this.gap;
    try {
      await this.readGap(gap?.from ?? new Map(this.seenInChannel));
    } finally {
      // Unless the link was lost again meanwhile (a new gap, for the next reconnect).
      if (this.gap === gap) this.showHeld();
    }
  }

  private async readGap(from: Map<string, bigint>): Promise<void> {
    for (const [chid, seen] of from) {
      let missed;
      try {
        missed = await this.client.latest({ channel: chid }, CATCH_UP_LIMIT, seen);
      } catch (err) {
        const code = err instanceof WirechatError ? err.code : undefined;
        // No longer a member (left, or the channel is gone): nothing to catch up on,
        // now or at a later reconnect.
        if (code === 9 || code === 10) {
          this.seenInChannel.delete(chid);
          continue;
        }
        // A page too large for the client (its attachments inline) dropped the link,
        // and would at every reconnect: not read again. Any other failure (the link
        // lost again, a timeout, a busy server) leaves the channel followed: dropped,
        // its messages during every later outage went unshown.
        if (err instanceof Error && err.message.includes("longer than")) {
          this.seenInChannel.delete(chid);
          from.delete(chid);
        }
        this.screen.line(this.p.error(`* could not read what ${shown(this.channelName(chid))} got meanwhile (${errText(err)}); /history shows it`));
        continue;
      }
      if (missed.length === CATCH_UP_LIMIT) this.info(`* ${shown(this.channelName(chid))} got more than ${CATCH_UP_LIMIT} messages meanwhile; /history for more`);
      for (const m of missed) this.show({ action: "ev_message", data: { ...m, chid } });
    }
  }

  private describe(ev: WirechatEvent): string | undefined {
    const d = ev.data ?? {};
    const p = this.p;
    switch (ev.action) {
      case "ev_message":
        return this.messageLine(d as MessageEvent, d.chid, d.to);
      case "ev_presence":
        return p.info(`* ${shown(this.nickOf(d.uid))} is ${d.online ? "online" : "offline"}`);
      case "ev_enter":
        return p.info(`* ${shown(d.nick)} entered ${shown(this.channelName(d.chid))}`);
      case "ev_leave":
        return p.info(`* ${shown(d.nick)} left ${shown(this.channelName(d.chid))}`);
      case "ev_channel_deleted":
        if (this.target?.kind === "channel" && this.target.chid === d.chid) this.target = undefined;
        return p.info(`* ${shown(this.channelName(d.chid))} was deleted`);
      case "ev_edit":
        return p.info(`* message ${shown(d.mid)} was edited: ${shown(d.body)}`);
      case "ev_delmessage":
        return p.info(`* message ${d.mid} was deleted`);
      case "ev_logout":
        return p.error(`* logged out by the server: ${shown(d.reason)}`);
      case "ev_close":
        return p.info(`* the server is closing the connection: ${shown(d.reason)}`);
      default:
        return p.info(`* ${ev.action.replace(/^ev_/, "")}`);
    }
  }

  /** One message as a line: `[12:34] <Bob> hi`, `[12:34] #general <Bob> hi`, `[12:34] -> Bob: hi`. */
  private messageLine(m: MessageEvent | HistoryMessage, chid: string | undefined, to: string | undefined): string {
    const p = this.p;
    const mine = m.from === this.client.uid;
    let head: string;
    const nick = shown(m.nick);
    if (chid !== undefined) head = `${p.channel(shown(this.channelName(chid)))} ${mine ? p.me(`<${nick}>`) : p.nick(`<${nick}>`)}`;
    else if (mine && to !== undefined && to !== this.client.uid) head = `${p.me("->")} ${p.nick(shown(this.nickOf(to)))}:`;
    else head = mine ? p.me(`<${nick}>`) : p.nick(`<${nick}>`);
    let text = `${p.time(`[${clock(m.time)}]`)} ${head} ${shown(m.body)}`;
    if (m.edited) text += p.info(" (edited)");
    if (hasAttachment(m.attach)) {
      text += p.info(` [attachment ${shown(m.attach.mime || "application/octet-stream")}, ${sizeText(base64DecodedLength(m.attach.data))}; /save ${m.mid} FILE]`);
    }
    return text.trimEnd();
  }

  private keepAttachment(mid: string, attach: Attachment): void {
    this.attachments.set(mid, attach);
    while (this.attachments.size > 8) this.attachments.delete(this.attachments.keys().next().value!);
  }

  private nickOf(uid: string): string {
    return this.nicks.get(uid) ?? uid;
  }

  private channelName(chid: string): string {
    const name = this.channels.get(chid);
    return name ? `#${name}` : `#${chid}`;
  }

  // ---------------- commands

  /** Handles one input line; resolves false when the session should end. */
  async handle(line: string): Promise<boolean> {
    const trimmed = line.trim();
    if (trimmed === "") return true;
    try {
      if (this.raw && trimmed.startsWith("{")) {
        await this.rawRequest(trimmed);
        return true;
      }
      if (!trimmed.startsWith("/")) {
        await this.say(line);
        return true;
      }
      const m = /^\/(\S+)\s*(.*)$/s.exec(trimmed);
      if (m === null) {
        this.error("a command follows the slash (/msg, /join, …); try /help");
        return true;
      }
      const cmd = m[1].toLowerCase();
      const rest = m[2];
      switch (cmd) {
        case "quit":
        case "exit":
          return false;
        case "help":
          for (const l of COMMANDS_HELP.split("\n")) this.screen.line(l);
          return true;
        case "msg":
        case "query":
          await this.msg(rest);
          return true;
        case "join":
          await this.join(rest);
          return true;
        case "leave":
        case "part":
          await this.leave();
          return true;
        case "history":
          await this.history(rest);
          return true;
        case "who":
          await this.who();
          return true;
        case "add":
          await this.add(rest);
          return true;
        case "attach":
          await this.attach(rest);
          return true;
        case "save":
          await this.save(rest);
          return true;
        case "req":
          await this.req(rest);
          return true;
        default:
          this.error(`unknown command /${cmd}; try /help`);
          return true;
      }
    } catch (err) {
      this.error(err instanceof WirechatError ? err.serverMessage : err instanceof Error ? err.message : String(err));
      return true;
    }
  }

  private info(text: string): void {
    this.screen.line(this.p.info(text));
  }

  private error(text: string): void {
    this.screen.line(this.p.error(`! ${text}`));
  }

  private needTarget(): Conversation {
    if (!this.target) throw new Error("no conversation yet: /msg NICK or /join #CHANNEL first");
    return this.target;
  }

  private toOf(t: Conversation): { uid: string } | { channel: string } {
    return t.kind === "user" ? { uid: t.uid } : { channel: t.chid };
  }

  private async say(text: string): Promise<void> {
    await this.sendAndShow(this.toOf(this.needTarget()), text);
  }

  /**
   * The server echoes a message back as ev_message; that echo is what is printed, so
   * what the screen shows is what the server stored. A message the client sent again
   * after a reconnect (its reply lost) has its echo on the lost connection, if any:
   * shown from its reply instead, once (a stored resend's echo is skipped by mid). One
   * that got no reply at all is remembered (unconfirmed): typed again, it is sent with
   * the same cmid and stored once.
   */
  private async sendAndShow(to: { uid: string } | { channel: string }, text: string): Promise<void> {
    const key = "uid" in to ? `@${to.uid}` : `#${to.channel}`;
    const again = this.unconfirmed?.kind === "text" && this.unconfirmed.to === key && this.unconfirmed.text === text ? this.unconfirmed.cmid : undefined;
    let sent;
    try {
      sent = await this.client.sendMessage(to, text, again === undefined ? {} : { cmid: again });
    } catch (err) {
      if (!(err instanceof WirechatError) || err.cmid === undefined) throw err;
      this.unconfirmed = { kind: "text", to: key, text, cmid: err.cmid };
      throw new Error(`${err.message}: it may have been stored; type it again to send it once`);
    }
    // Only the very next message can be its retype: a later one of the same text is a
    // new message (sent with the old cmid, the server answered with the old one's mid,
    // and it was never stored).
    this.unconfirmed = undefined;
    // Sent again with its cmid: if the first copy was stored, its echo went to the
    // connection that sent it (shown once either way: by mid).
    if ((!sent.resent && again === undefined) || this.raw) return; // --raw shows the server's frames only
    const where = "uid" in to ? { to: to.uid } : { chid: to.channel };
    // Through onEvent: a channel message waits behind a catch-up under way.
    this.onEvent({ action: "ev_message", data: { mid: sent.mid, from: this.client.uid, nick: this.client.nick, body: text, time: sent.time, attach: { mime: "", data: "" }, ...where } });
  }

  /** Finds a user by nick with searchuser (prefix match on nick or login), keeping the exact nick. */
  private async findUser(nick: string): Promise<{ uid: string; nick: string }> {
    const name = nick.replace(/^@/, "");
    const list = await this.client.searchUser(name);
    for (const u of list) this.nicks.set(u.uid, u.nick);
    const exact = list.find((u) => u.nick.toLowerCase() === name.toLowerCase());
    if (exact) return exact;
    if (list.length === 0) throw new Error(`no user with nick '${name}'`);
    throw new Error(`no user with nick '${name}'; did you mean ${list.slice(0, 5).map((u) => u.nick).join(", ")}?`);
  }

  private async msg(rest: string): Promise<void> {
    const { user, text } = await this.addressee(rest);
    this.target = { kind: "user", uid: user.uid, nick: user.nick };
    if (text !== "") await this.sendAndShow({ uid: user.uid }, text);
    else this.info(`* talking to ${user.nick}`);
  }

  /**
   * The user a /msg names, and its text. A nick may hold spaces: "Mary Ann" in quotes,
   * or unquoted the longest nick the line starts with (of those searchuser finds for
   * its first word), so that `/msg Mary Ann hi` is for Mary Ann when she exists, not
   * "Ann hi" for Mary (which `/msg "Mary" Ann hi` says).
   */
  private async addressee(rest: string): Promise<{ user: { uid: string; nick: string }; text: string }> {
    const quoted = /^"([^"]+)"(?:\s+(.*))?$/s.exec(rest);
    if (quoted) return { user: await this.findUser(quoted[1]), text: (quoted[2] ?? "").trim() };
    const first = /^(\S+)/.exec(rest);
    if (!first) throw new Error('usage: /msg NICK [TEXT] (a nick with spaces in quotes: /msg "Mary Ann" hi)');
    const line = rest.replace(/^@/, "");
    const lower = line.toLowerCase();
    const found = await this.client.searchUser(first[1].replace(/^@/, ""));
    for (const u of found) this.nicks.set(u.uid, u.nick);
    let best: { uid: string; nick: string } | undefined;
    for (const u of found) {
      const n = u.nick.toLowerCase();
      if (lower.startsWith(n) && (line.length === n.length || /\s/.test(line[n.length])) && (!best || n.length > best.nick.length)) best = u;
    }
    // A full answer (the server sends at most SEARCH_LIMIT) may have left out the nick
    // meant: each longer run of the line's words is looked up on its own, longest first.
    if (found.length >= SEARCH_LIMIT) best = (await this.longerNick(line, best?.nick.length ?? 0)) ?? best;
    if (best) return { user: best, text: line.slice(best.nick.length).trim() };
    return { user: await this.findUser(first[1]), text: rest.slice(first[1].length).trim() };
  }

  /** The longest nick, longer than `than` characters, that is a run of `line`'s first words. */
  private async longerNick(line: string, than: number): Promise<{ uid: string; nick: string } | undefined> {
    const ends: number[] = [];
    for (const m of line.matchAll(/\S(?=\s|$)/g)) if (m.index! + 1 > than && m.index! + 1 <= NAME_MAX) ends.push(m.index! + 1);
    for (const end of ends.reverse()) {
      const candidate = line.slice(0, end);
      const exact = (await this.client.searchUser(candidate)).find((u) => u.nick.toLowerCase() === candidate.toLowerCase());
      if (exact) {
        this.nicks.set(exact.uid, exact.nick);
        return exact;
      }
    }
    return undefined;
  }

  /** The chid of the channel called `name`, reading channellist a page at a time. */
  private async findChannel(name: string): Promise<string | undefined> {
    let after: string | undefined;
    for (;;) {
      const page = await this.client.channelList(after === undefined ? { limit: 500 } : { limit: 500, after });
      if (page.length === 0) return undefined;
      for (const c of page) this.channels.set(c.chid, c.name);
      const hit = page.find((c) => c.name.toLowerCase() === name.toLowerCase());
      if (hit) return hit.chid;
      after = page[page.length - 1].chid;
    }
  }

  private async join(rest: string): Promise<void> {
    const name = rest.trim().replace(/^#/, "");
    if (!name) throw new Error("usage: /join #CHANNEL");
    let chid = await this.findChannel(name);
    if (chid === undefined) {
      try {
        chid = await this.client.createChannel(name);
        this.channels.set(chid, name);
        this.info(`* created #${name}`);
      } catch (err) {
        // Someone created it between the lookup and now.
        if (!(err instanceof WirechatError && err.code === 1)) throw err;
        chid = await this.findChannel(name);
        if (chid === undefined) throw err;
      }
    }
    const { users, last_msg } = await this.client.enter(chid);
    for (const u of users) this.nicks.set(u.uid, u.nick);
    this.target = { kind: "channel", chid, name: this.channels.get(chid) ?? name };
    this.info(`* now talking in #${this.target.name} (${users.length} member${users.length === 1 ? "" : "s"}, ${users.filter((u) => u.online).length} online)`);
    // Shown once (one that came live while enter read it is not shown again), and
    // followed from here: a reconnect catches up on what the channel got meanwhile,
    // also before any live message came in it. enter's last_msg carries no attachments
    // (history reads them): a message without text showed as a blank line, and is
    // marked now (/save reads it from history).
    for (const msg of last_msg) {
      if (/^[0-9]+$/.test(msg.mid) && !this.seen(chid, BigInt(msg.mid))) continue;
      const line = this.messageLine(msg, chid, undefined);
      this.screen.line(msg.body === "" && msg.attach === undefined ? `${line} ${this.p.info(`[no text: an attachment? /save ${msg.mid} FILE]`)}` : line);
    }
    if (last_msg.length === 0) this.follow(chid, 0n);
    else this.info("* (attachments are not listed here: /history shows them)");
  }

  /**
   * Names for what events name by id: contacts' nicks, and the channels and people of
   * the newest conversations (dialogs). Without them a fresh session showed `#1
   * <Bob>`, `* 3ff3c1f50fe4 is online`, `-> d0034669c7e6:` for what it knew from before.
   * Best effort: a failure leaves the ids.
   */
  async learnNames(): Promise<void> {
    try {
      const [contacts, dialogs] = await Promise.all([this.client.contactList(), this.client.request("dialogs", { limit: NAMES_AT_LOGIN })]);
      for (const c of contacts) this.nicks.set(c.uid, c.nick);
      for (const row of dialogs.dialogs ?? []) {
        const d = row as { chid?: unknown; name?: unknown; uid?: unknown; nick?: unknown };
        if (typeof d.chid === "string" && typeof d.name === "string") this.channels.set(d.chid, d.name);
        else if (typeof d.uid === "string" && typeof d.nick === "string" && d.nick !== "") this.nicks.set(d.uid, d.nick);
      }
    } catch (err) {
      this.info(`* names not loaded (${errText(err)}): ids are shown until they are`);
    }
  }

  private async leave(): Promise<void> {
    const t = this.needTarget();
    if (t.kind !== "channel") throw new Error("the current conversation is not a channel");
    await this.client.leave(t.chid);
    this.seenInChannel.delete(t.chid);
    this.target = undefined;
    this.info(`* left #${t.name}`);
  }

  private async history(rest: string): Promise<void> {
    const t = this.needTarget();
    const n = rest.trim() === "" ? 20 : Number(rest.trim());
    if (!Number.isInteger(n) || n < 1) throw new Error("usage: /history [N]");
    const messages = await this.client.latest(this.toOf(t), Math.min(n, 500));
    if (messages.length === 0) this.info("* no messages yet");
    for (const msg of messages) {
      if (hasAttachment(msg.attach)) this.keepAttachment(msg.mid, msg.attach);
      if (this.raw) this.screen.line(JSON.stringify(msg));
      else if (t.kind === "channel") this.screen.line(this.messageLine(msg, t.chid, undefined));
      // history has no `to`: in a direct conversation, ours went to the other side.
      else this.screen.line(this.messageLine(msg, undefined, msg.from === this.client.uid ? t.uid : this.client.uid));
    }
  }

  private async who(): Promise<void> {
    const t = this.target;
    if (t?.kind === "channel") {
      // enter on a channel we are in changes nothing and lists its members.
      const { users } = await this.client.enter(t.chid);
      for (const u of users) this.nicks.set(u.uid, u.nick);
      this.info(`* #${t.name}: ${users.map((u) => `${u.nick}${u.online ? " (online)" : ""}`).join(", ")}`);
      return;
    }
    const contacts = await this.client.contactList();
    for (const c of contacts) this.nicks.set(c.uid, c.nick);
    if (contacts.length === 0) this.info("* no contacts yet; /add NICK to add one");
    else this.info(`* contacts: ${contacts.map((c) => `${c.nick}${c.online ? " (online)" : ""}`).join(", ")}`);
  }

  private async add(rest: string): Promise<void> {
    if (!rest.trim()) throw new Error("usage: /add NICK");
    const user = await this.findUser(rest.trim());
    await this.client.addContact(user.uid);
    this.info(`* added ${user.nick} to your contacts`);
  }

  private async attach(rest: string): Promise<void> {
    const file = rest.trim();
    if (!file) throw new Error("usage: /attach FILE");
    const t = this.needTarget();
    // As a message (sendAndShow): one that got no reply may be stored; the same file
    // sent again to the same conversation, next, goes with its cmid and is stored once.
    // (The reply's clock, --timeout, runs from the file's last byte: the library's.)
    const key = t.kind === "user" ? `@${t.uid}` : `#${t.chid}`;
    const what = `file ${path.resolve(file)}`;
    const u = this.unconfirmed;
    const again = u?.kind === "file" && u.to === key && u.text === what ? u.cmid : undefined;
    let r;
    try {
      r = await this.client.sendFile(this.toOf(t), file, {
        mime: guessMime(file),
        onProgress: (sent, total) => this.screen.bar(progressBar(sent, total)),
        ...(again === undefined ? {} : { cmid: again }),
      });
    } catch (err) {
      this.screen.endBar();
      if (!(err instanceof WirechatError) || err.cmid === undefined) throw err;
      this.unconfirmed = { kind: "file", to: key, text: what, cmid: err.cmid };
      throw new Error(`${err.message}: it may have been stored; /attach it again to send it once`);
    }
    this.unconfirmed = undefined;
    this.screen.endBar();
    this.info(`* sent ${file} (message ${r.mid})`);
  }

  private async save(rest: string): Promise<void> {
    const m = /^(\d+)\s+(.+)$/.exec(rest.trim());
    if (!m) throw new Error("usage: /save MID FILE");
    const attach = this.attachments.get(m[1]) ?? (await this.attachmentFromHistory(m[1]));
    if (!attach) throw new Error(`no attachment in message ${m[1]}${this.target ? " of this conversation" : ""}`);
    const n = await saveAttachment(attach, m[2]);
    this.info(`* saved ${sizeText(n)} to ${m[2]}`);
  }

  /** Message `mid`'s attachment, read from the current conversation's history (one a /join listed). */
  private async attachmentFromHistory(mid: string): Promise<Attachment | undefined> {
    if (this.target === undefined || !/^[0-9]{1,15}$/.test(mid)) return undefined;
    const n = BigInt(mid);
    if (n + 1n > 999_999_999_999_999n) return undefined; // past any mid (15 digits)
    const [msg] = await this.client.history({ ...this.toOf(this.target), before: String(n + 1n), limit: 1 });
    if (msg?.mid !== String(n) || !hasAttachment(msg.attach)) return undefined;
    this.keepAttachment(mid, msg.attach);
    return msg.attach;
  }

  private async req(rest: string): Promise<void> {
    const m = /^(\S+)\s*(.*)$/s.exec(rest.trim());
    if (!m) throw new Error("usage: /req ACTION [JSON]");
    let data: Record<string, unknown> | undefined;
    if (m[2].trim() !== "") {
      const parsed = JSON.parse(m[2]);
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) throw new Error("the request data must be a JSON object");
      data = parsed;
    }
    const reply = await this.client.request(m[1], data);
    this.screen.line(this.raw ? JSON.stringify({ action: m[1], data: reply }) : JSON.stringify(reply, null, 2));
  }

  private async rawRequest(text: string): Promise<void> {
    const frame = JSON.parse(text);
    if (!frame || typeof frame.action !== "string") throw new Error("a raw request needs an 'action'");
    try {
      const reply = await this.client.request(frame.action, frame.data);
      this.screen.line(JSON.stringify({ action: frame.action, data: reply }));
    } catch (err) {
      if (!(err instanceof WirechatError && err.fromServer)) throw err;
      this.screen.line(JSON.stringify({ action: frame.action, data: { status: err.code, error: err.serverMessage } }));
    }
  }
}

function guessMime(file: string): string {
  const ext = /\.([a-z0-9]+)$/i.exec(file)?.[1]?.toLowerCase() ?? "";
  const known: Record<string, string> = {
    txt: "text/plain",
    md: "text/markdown",
    json: "application/json",
    png: "image/png",
    jpg: "image/jpeg",
    jpeg: "image/jpeg",
    gif: "image/gif",
    webp: "image/webp",
    pdf: "application/pdf",
    zip: "application/zip",
    mp3: "audio/mpeg",
    mp4: "video/mp4",
  };
  return known[ext] ?? "application/octet-stream";
}

// ---------------------------------------------------------------- entry point

/** Reads the password: hidden on a terminal, else the first line of input. */
async function readPassword(rl: readline.Interface, queue: LineQueue, io: ChatIO, tty: boolean): Promise<string | undefined> {
  if (!tty) return queue.next();
  io.stdout.write("Password: ");
  // readline has no public way to stop echoing; _writeToOutput is the hook everyone
  // uses, restored as soon as the line is in.
  const hook = rl as unknown as { _writeToOutput: (s: string) => void };
  const original = hook._writeToOutput;
  hook._writeToOutput = () => {};
  try {
    const pass = await queue.next();
    // Not in the history: ↑ would bring it back, in clear.
    const history = (rl as unknown as { history?: string[] }).history;
    const at = pass === undefined || !history ? -1 : history.indexOf(pass);
    if (at >= 0) history?.splice(at, 1);
    return pass;
  } finally {
    hook._writeToOutput = original;
    io.stdout.write("\n");
  }
}

/**
 * The password typed at a terminal whose output goes elsewhere (stdout redirected):
 * prompted on stderr, not echoed (readline puts the terminal in raw mode), read before
 * the chat's own input starts. Read as a plain first line it was echoed by the terminal.
 */
async function hiddenPassword(io: ChatIO): Promise<string | undefined> {
  const rl = readline.createInterface({ input: io.stdin, output: io.stderr, terminal: true, historySize: 0 });
  io.stderr.write("Password: ");
  (rl as unknown as { _writeToOutput: (s: string) => void })._writeToOutput = () => {};
  try {
    return await new Promise<string | undefined>((resolve) => {
      rl.once("line", resolve);
      rl.once("close", () => resolve(undefined));
    });
  } finally {
    rl.close();
    io.stderr.write("\n");
  }
}

export async function chatCommand(argv: string[], io: ChatIO = { stdin: process.stdin, stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  let args: ChatArgs;
  try {
    args = parseChatArgs(argv, process.env);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    io.stderr.write(`wirechat chat: ${err.message}\n(see wirechat chat --help)\n`);
    return 2;
  }
  if (args.help) {
    io.stdout.write(CHAT_HELP + "\n");
    return 0;
  }
  if (args.version) {
    io.stdout.write(`wirechat ${packageVersion()}\n`);
    return 0;
  }

  const tty = !!io.stdin.isTTY && !!io.stdout.isTTY;
  let given = args.pass;
  if (given === undefined && !tty && io.stdin.isTTY) given = await hiddenPassword(io);
  const p = palette(args.color && !!io.stdout.isTTY);
  const screen = new Screen(io.stdout, tty);
  const rl = readline.createInterface({
    input: io.stdin,
    output: tty ? io.stdout : undefined,
    terminal: tty,
    historySize: 1000,
    prompt: "> ",
  });
  const queue = new LineQueue(rl);
  // Output that fails (its reader gone, `wirechat chat … | head`, or a full disk):
  // nobody sees the session any more, so it ends, saying what it did not send (an
  // unhandled EPIPE ended it with a stack trace).
  let outputFailed: NodeJS.ErrnoException | undefined;
  io.stdout.on("error", (err: NodeJS.ErrnoException) => {
    if (outputFailed !== undefined) return;
    outputFailed = err;
    queue.interrupted = true;
    queue.wake();
  });
  let client: WirechatClient | undefined;
  let quitting = false;
  // Once the user has asked to leave (/quit, end of input, Ctrl-C), what they typed
  // before is still handled, in order, but each command gets QUIT_GRACE_MS (a message
  // held through an outage waits for its timeout, an /attach for its upload): past
  // it the connection is dropped and the rest is not sent. The grace ran from the
  // request to leave for all of them: piped input whose end came at once lost every
  // line not handled within 2 s, and exited 0. (Set before the login, once the password
  // is read: input that ends while the login is under way is a request to leave too.)
  let busy = false;
  let leaving = false;
  let cutShort: string | undefined;
  let grace: NodeJS.Timeout | undefined;
  const startGrace = (line: string) => {
    clearTimeout(grace);
    grace = setTimeout(() => {
      if (!busy) return;
      cutShort = line;
      quitting = true;
      client?.destroy();
      queue.interrupted = true;
      queue.wake();
    }, QUIT_GRACE_MS);
    grace.unref();
  };
  let current = "";
  const onLeave = () => {
    if (!leaving && busy) startGrace(current);
    leaving = true;
  };

  const fail = (text: string): number => {
    io.stderr.write(`wirechat chat: ${text}\n`);
    return 1;
  };

  try {
    const pass = given ?? (await readPassword(rl, queue, io, tty));
    // From here (not while the password is read: one may start with /quit), a request
    // to leave; before the login, as input may end while it is under way.
    queue.onLeave = onLeave;
    if (queue.ended || queue.quitQueued()) onLeave();
    if (pass === undefined || pass === "") return fail("no password given");

    let tlsOpt: ConnectOptions["tls"];
    if (args.tls) {
      const t: TlsOptions = {};
      if (args.tlsCa) t.ca = readFileSync(args.tlsCa);
      if (args.tlsServername) t.servername = args.tlsServername;
      if (args.insecure) t.rejectUnauthorized = false;
      tlsOpt = t;
    }
    try {
      client = await WirechatClient.connect({
        host: args.host,
        port: args.port,
        tls: tlsOpt,
        reconnect: args.reconnect ? { minMs: 500, maxMs: 15_000 } : false,
        keepAliveMs: 120_000,
        requestTimeoutMs: args.timeoutS * 1000,
        clientName: "wirechat-chat",
      });
    } catch (err) {
      // The socket's own error (ECONNREFUSED, a refused certificate) is the cause of
      // the client's; a refusal (13, 16) or a timeout has none.
      const why = err instanceof WirechatError && err.cause instanceof Error ? err.cause : err;
      return fail(`cannot connect to ${args.host}:${args.port ?? (args.tls ? 7789 : 7788)}: ${errText(why)}`);
    }
    const session = new ChatSession(client, screen, p, args.raw);
    // Listen before logging in: the inbox follows the auth reply at once.
    client.on("event", (ev) => session.onEvent(ev));
    try {
      if (args.register) await client.register(args.login, pass, args.nick ?? args.login);
      else await client.auth({ login: args.login, pass });
    } catch (err) {
      return fail(`${args.register ? "registration" : "login"} failed: ${errText(err)}`);
    }
    client.on("disconnect", () => {
      session.lost();
      screen.line(p.error("* connection lost; reconnecting…"));
    });
    client.on("reconnect", () => {
      screen.line(p.info("* reconnected"));
      session.caughtUp().catch((err: unknown) => screen.line(p.error(`* ${errText(err)}`)));
    });
    let lostForGood: Error | undefined;
    let loggedOut: string | undefined;
    client.on("event", (ev) => {
      if (ev.action !== "ev_logout" || quitting) return;
      // The session is over (kicked, banned, its password changed elsewhere): every
      // command would fail "not logged in" until the server's idle limit; end here.
      loggedOut = typeof ev.data?.reason === "string" ? ev.data.reason : "the session ended";
      queue.interrupted = true;
      queue.wake();
    });
    client.on("close", (err) => {
      if (quitting) return;
      lostForGood = err ?? new Error("the connection closed");
      queue.interrupted = true;
      queue.wake();
    });
    screen.line(p.info(`* logged in as ${client.nick} (${client.uid}) on ${args.host}; /help for commands`));
    await session.learnNames();
    screen.attach(rl);
    if (tty) {
      rl.on("SIGINT", () => rl.close());
      rl.prompt();
    }

    for (;;) {
      const line = await queue.next();
      if (line === undefined) break;
      busy = true;
      current = line;
      if (leaving) startGrace(line);
      try {
        if (!(await session.handle(line))) break;
      } finally {
        busy = false;
        clearTimeout(grace);
      }
      if (tty) rl.prompt();
    }
    quitting = true;
    // Why it ended, each that holds (an output that failed meanwhile is said too).
    const left = queue.unhandled();
    const unsent = (after: string) => (left > 0 ? `; ${left} line${left === 1 ? "" : "s"}${after} not sent` : "");
    const outputText = outputFailed === undefined ? "" : outputFailed.code === "EPIPE" ? "the output was closed" : `cannot write to stdout: ${outputFailed.message}`;
    const output = outputText && `; ${outputText}`;
    if (cutShort !== undefined) return fail(`gave up waiting for the server after ${QUIT_GRACE_MS / 1000} s on "${cutShort.slice(0, 60)}" as you left (it may have been stored)${unsent(" after it")}${output}`);
    if (loggedOut !== undefined) return fail(`logged out by the server: ${loggedOut}${unsent(" after it")}${output}`);
    if (lostForGood) return fail(`connection lost: ${errText(lostForGood)}${unsent(" after it")}${output}`);
    if (outputFailed !== undefined) {
      client.destroy();
      // A reader that went away with nothing left to send is `| head`: a quiet end.
      if (outputFailed.code === "EPIPE" && left === 0) return 0;
      return fail(outputText + unsent(""));
    }
    await client.close();
    return 0;
  } finally {
    client?.destroy();
    rl.close();
  }
}

function errText(err: unknown): string {
  if (err instanceof WirechatError) return err.serverMessage;
  return err instanceof Error ? err.message : String(err);
}
