// Codecs: one per wire format, at the edge. A codec turns replies and events into
// outbound frames; handlers only ever return data and typed events. The native codec
// is wirechat's NDJSON: one compact JSON object and a single '\n' per frame
// (JSON.stringify escapes every control character, so no raw newline can appear
// inside a frame).
//
// An attachment is an explicit part of a frame: the text before it, its base64
// streamed from the blob store, the text after it. Nothing is ever found by searching
// serialised text, so no user input can be taken for an attachment.

import { recordJson, type MessageRecord } from "../storage/layout.js";
import { Code, codeText } from "./codes.js";
import type { Event } from "./events.js";
import { nowSeconds, type Fields, type OutFrame, type Producer, type StreamedFrame } from "./frames.js";

/** An attachment inside reply data: its MIME type and the blob whose base64 is sent. */
export class AttachmentRef {
  constructor(
    readonly mime: string,
    readonly sha: string,
  ) {}
}

/**
 * A reply whose list can be long (history, enter, contactlist): the codec writes
 * `fields`, then `key` as an array whose items are produced one by one as the
 * connection drains. An item's top-level `attach` may be an AttachmentRef.
 */
export class ListReply {
  constructor(
    readonly fields: Fields,
    readonly key: string,
    readonly items: () => AsyncIterable<Fields>,
    /** Lists placed before `key`, streamed the same way (enter's users). */
    readonly before?: readonly [string, () => AsyncIterable<Fields>][],
  ) {}
}

/**
 * A message's reply, `{mid, time}`: the most frequent reply of all, given its own
 * shape so that the codec writes it without serialising an object.
 */
export class MessageSent {
  constructor(
    readonly mid: string,
    readonly time: number,
  ) {}
}

export type ReplyBody = Fields | ListReply | MessageSent;

/** Where a codec reads an attachment's bytes as base64. */
export interface BlobSource {
  readBase64(sha: string): AsyncIterable<string>;
}

export interface Codec {
  readonly name: string;
  reply(action: string, body: ReplyBody): OutFrame;
  error(action: string, code: Code, text?: string): OutFrame;
  /** The event's frame, made once per event and reused for every recipient. */
  event(ev: Event): OutFrame;
  welcome(): OutFrame;
  /**
   * The connection's front has frames of its own still to answer (a seed door's queue
   * and the frame it is handling): a graceful stop waits for them as for the
   * dispatcher's own (Dispatcher.settled).
   */
  readonly pending?: boolean;
  /**
   * false: the format shows no direct messages (the seed doors'), so a login through
   * it starts no inbox sync (it read the whole unread inbox at every login, sent
   * nothing of it and confirmed nothing, so the next login read it all again).
   */
  readonly inbox?: boolean;
  /**
   * true: a `history` page may stop short of its `limit` (the format pages back until
   * an empty page): it stops at the outbound cap's worth of text, so that events
   * queued behind it wait for no more than the cap. The seed doors answer by count.
   */
  readonly shortPages?: boolean;
}

export const WELCOME_TEXT = "Welcome to wirechat. Send one JSON object per line; try {\"action\":\"hello\"}";

/** Names whose reply head NativeCodec caches (registered actions' and events' are such). */
const ACTION_HEAD = /^[A-Za-z0-9_]{1,64}$/;

/** Seed clients read `attach` unconditionally, so ev_message always carries it. */
const NO_ATTACH = ',"attach":{"mime":"","data":""}';

/** The wire fields of a message around the place of its attachment (seed 004's order). */
function messageParts(m: MessageRecord, text?: { json: string; cut: number }): [head: string, tail: string] {
  if (text && m.attach === undefined && m.edited === undefined) return [text.json.slice(0, text.cut), text.json.slice(text.cut)];
  const { json, cut } = recordJson({ mid: m.mid, chid: m.chid, from: m.from, nick: m.nick, body: m.body, time: m.time, to: m.to });
  return [json.slice(0, cut), json.slice(cut)];
}

export class NativeCodec implements Codec {
  readonly name = "native";
  readonly shortPages = true;
  private readonly actionJson = new Map<string, string>();

  constructor(private readonly blobs: BlobSource) {}

  /**
   * `{"action":<name>,"data":`, cached for names an action could have (ACTION_HEAD: at
   * most 64 word characters, as registered ones are; at most 256 of them, the cache
   * begun again past it). Any name was cached, up to 256: a client's first 256 frames
   * naming unknown actions of 1 MiB each were kept for the life of the process
   * (256 MiB), and every name after them, registered ones too, went uncached.
   */
  private head(action: string): string {
    let h = this.actionJson.get(action);
    if (h === undefined) {
      h = `{"action":${JSON.stringify(action)},"data":`;
      if (ACTION_HEAD.test(action)) {
        if (this.actionJson.size >= 256) this.actionJson.clear();
        this.actionJson.set(action, h);
      }
    }
    return h;
  }

  reply(action: string, body: ReplyBody): OutFrame {
    if (body instanceof MessageSent) {
      // mid is digits, time an integer: nothing to escape.
      return `${this.head(action)}{"status":0,"error":"OK","mid":"${body.mid}","time":${body.time}}}\n`;
    }
    if (body instanceof ListReply) return this.listReply(action, body);
    const json = JSON.stringify(body);
    return this.head(action) + (json.length > 2 ? `{"status":0,"error":"OK",${json.slice(1)}` : `{"status":0,"error":"OK"}`) + "}\n";
  }

  error(action: string, code: Code, text: string = codeText(code)): OutFrame {
    return `${this.head(action)}{"status":${code},"error":${JSON.stringify(text)}}}\n`;
  }

  welcome(): OutFrame {
    return JSON.stringify({ action: "welcome", message: WELCOME_TEXT, time: nowSeconds() }) + "\n";
  }

  event(ev: Event): OutFrame {
    const wire = (ev.wire ??= {});
    return (wire[this.name] ??= this.encodeEvent(ev));
  }

  private frame(action: string, data: Fields): string {
    return `{"action":"${action}","data":${JSON.stringify(data)}}\n`;
  }

  private encodeEvent(ev: Event): OutFrame {
    switch (ev.kind) {
      case "message": {
        const m = ev.m;
        const [head, tail] = messageParts(m, ev.text);
        if (!m.attach) return `{"action":"ev_message","data":${head}${NO_ATTACH}${tail}}\n`;
        const frame = this.withAttachment(`{"action":"ev_message","data":${head}`, m.attach.mime, m.attach.sha, `${tail}}\n`);
        frame.text = (frame.parts[0] as string).length + (frame.parts[2] as string).length;
        frame.size = frame.text + 4 * Math.ceil(m.attach.size / 3);
        return frame;
      }
      case "edit":
        return this.frame("ev_edit", { mid: ev.mid, body: ev.body, edited: ev.edited });
      case "delete":
        return this.frame("ev_delmessage", { mid: ev.mid });
      case "enter":
        return this.frame("ev_enter", { chid: ev.chid, uid: ev.uid, nick: ev.nick });
      case "leave":
        return this.frame("ev_leave", { chid: ev.chid, uid: ev.uid, nick: ev.nick });
      case "channelDeleted":
        return this.frame("ev_channel_deleted", { chid: ev.chid });
      case "presence":
        return this.frame("ev_presence", { uid: ev.uid, online: ev.online });
      case "logout":
        return this.frame("ev_logout", { reason: ev.reason });
      case "close":
        return this.frame("ev_close", { reason: ev.reason });
      case "notice":
        return "";
    }
  }

  /** `head` (an object left open) + `,"attach":{"mime":…,"data":"<base64>"}` + `tail`. */
  private withAttachment(head: string, mime: string, sha: string, tail: string): StreamedFrame {
    return {
      parts: [`${head},"attach":{"mime":${JSON.stringify(mime)},"data":"`, () => this.blobs.readBase64(sha), `"}${tail}`],
    };
  }

  private listReply(action: string, r: ListReply): StreamedFrame {
    const open = `${this.head(action)}${JSON.stringify({ status: Code.OK, error: codeText(Code.OK), ...r.fields }).slice(0, -1)}`;
    const parts: (string | Producer)[] = [];
    let text = open;
    for (const [key, list] of [...(r.before ?? []), [r.key, r.items] as const]) {
      parts.push(`${text},${JSON.stringify(key)}:[`, () => this.listItems(list()));
      text = "]";
    }
    parts.push("]}}\n");
    return { parts };
  }

  private async *listItems(items: AsyncIterable<Fields>): AsyncIterable<string> {
    let first = true;
    for await (const item of items) {
      const sep = first ? "" : ",";
      first = false;
      const attach = item.attach;
      if (attach instanceof AttachmentRef) {
        const { attach: _, ...rest } = item;
        const json = JSON.stringify(rest);
        yield `${sep}${json.slice(0, -1)}${json.length > 2 ? "," : ""}"attach":{"mime":${JSON.stringify(attach.mime)},"data":"`;
        yield* this.blobs.readBase64(attach.sha);
        yield `"}}`;
      } else {
        yield sep + JSON.stringify(item);
      }
    }
  }
}
