// Typed events: what features publish and the router delivers. Features never build
// wire text; each codec turns an event into its own format, once per event.

import type { MessageRecord } from "../storage/layout.js";
import type { OutFrame } from "./frames.js";

export type Event =
  | MessageEvent
  // `chid`: the message's channel (none for a direct message: doors that show no direct messages skip it)
  /** `order`: the edit's place among this process's edits, taken under its message's lock (Router.publish drops an older one published after a newer). */
  | { kind: "edit"; mid: string; body: string; edited: number; chid?: string; order?: number; wire?: Wire }
  | { kind: "delete"; mid: string; chid?: string; wire?: Wire }
  | { kind: "enter"; chid: string; uid: string; nick: string; wire?: Wire }
  | { kind: "leave"; chid: string; uid: string; nick: string; wire?: Wire }
  | { kind: "channelDeleted"; chid: string; wire?: Wire }
  | { kind: "presence"; uid: string; online: boolean; wire?: Wire }
  | { kind: "logout"; reason: string; wire?: Wire }
  | { kind: "close"; reason: string; wire?: Wire }
  | NoticeEvent;

/**
 * A message. `text` is its stored record's text when it was just written (the native
 * codec reuses it: see recordJson); `inbox` is the uid whose inbox holds it (a direct
 * message's recipient): for that user it is delivered with acknowledgement and sync.
 */
export interface MessageEvent {
  kind: "message";
  m: MessageRecord;
  text?: { json: string; cut: number };
  inbox?: string;
  wire?: Wire;
}

/**
 * A door's own notice to a channel's members on that door (seed 003's join and leave
 * announcements): not stored, and not a membership change; every other codec shows
 * nothing for it. `origin` is the id of the connection it came from (not told).
 */
export interface NoticeEvent {
  kind: "notice";
  door: string;
  chid: string;
  text: string;
  origin: number;
  /** The rust_messages door's room move: the room's name (the connections told move there too). */
  room?: string;
  wire?: Wire;
}

/** Encodings of one event, by codec name: each is made once, whatever the audience. */
export type Wire = Record<string, OutFrame>;

/**
 * Who an event goes to. A channel's members are those when the event goes out; `also`
 * gets it whether or not it is one of them then (a message's sender whose leave, on
 * another connection, was written before the event went out: it sent the message as
 * a member, and hears it back as the protocol says). `users` with `channel`: a
 * channel's event whose members were fixed when it was decided (cluster mode's apply);
 * it keeps its place behind the channel's events still waiting for their members.
 */
export type Audience = { users: readonly string[]; channel?: string } | { channel: string; also?: string };
