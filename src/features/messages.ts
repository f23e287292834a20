// Direct messages: `message` to a uid, ev_message to every connection of recipient and
// sender, cmid idempotency, and the durable offline queue sent after each auth.
//
// Every direct message is written together with a queue entry for its recipient, in
// one atomic, synced batch, before the sender hears `status: 0`. The entry is removed
// only once one of the recipient's connections has handed the event to the OS; a
// recipient that is offline, disconnects or is cut off as a slow reader keeps it and
// receives the message after its next auth. So nothing acknowledged is ever lost.

import { Code, ProtocolError } from "../protocol/codes.js";
import { Pending, type Reply } from "../protocol/dispatcher.js";
import { frame, nowSeconds } from "../protocol/frames.js";
import type { OutFrame, Session } from "../protocol/session.js";
import type { BlobStore } from "../storage/blobs.js";
import { optionalString, requiredString } from "../protocol/validation.js";
import { directConv, type MessageRecord } from "../storage/layout.js";
import type { Services } from "./services.js";

interface MessageData {
  uid?: string;
  body?: string;
  attach?: { mime: string; data: string };
  cmid?: string;
}

/** Seed clients read `attach` unconditionally, so it is always present. */
const NO_ATTACH = { mime: "", data: "" };
/** Queued messages read per range query while draining. */
const DRAIN_PAGE = 256;

/** Stands in for an attachment's base64 while a frame is serialised (see withBlob). */
const BLOB_MARK = "\u0000wirechat-blob\u0000";
const BLOB_MARK_JSON = JSON.stringify(BLOB_MARK).slice(1, -1);

/**
 * Serialises `data` once with a marker where the attachment's base64 goes, and splits
 * the text there: the frame goes out as prefix, the blob's base64 read from disk, and
 * suffix, byte for byte what JSON.stringify of the whole would have produced.
 */
function withBlob(action: string, data: Record<string, unknown>, blobs: BlobStore, sha: string): OutFrame {
  const text = frame(action, data);
  const at = text.indexOf(BLOB_MARK_JSON);
  return { parts: [text.slice(0, at), () => blobs.readBase64(sha), text.slice(at + BLOB_MARK_JSON.length)] };
}

export function evMessage(m: MessageRecord, blobs: BlobStore): OutFrame {
  const data = {
    mid: m.mid,
    from: m.from,
    nick: m.nick,
    body: m.body,
    time: m.time,
    attach: m.attach ? { mime: m.attach.mime, data: BLOB_MARK } : NO_ATTACH,
    to: m.to,
  };
  return m.attach ? withBlob("ev_message", data, blobs, m.attach.sha) : frame("ev_message", data);
}

export function registerMessages(sv: Services): void {
  const { dispatcher, users, messages, storage, hub, hooks, blobs } = sv;
  /** (sender, cmid) of messages whose commit is in flight → their eventual reply. */
  const inflightCmids = new Map<string, Promise<Reply>>();

  dispatcher.register<MessageData>({
    name: "message",
    pipelined: true,
    schema: {
      type: "object",
      properties: {
        uid: requiredString(64),
        body: { type: "string" },
        attach: {
          type: "object",
          required: ["mime", "data"],
          properties: { mime: optionalString(255), data: { type: "string" } },
        },
        cmid: requiredString(128),
      },
    },
    async handle(req) {
      const me = req.session.uid as string;
      const { uid: to, body = "", attach, cmid } = req.data;
      if (to === undefined) throw new ProtocolError(Code.EmptyField, "'uid' is required");
      // attach.data streamed to the blob store while the frame was read; the frame
      // itself carries "" in its place (an escaped key would keep it inline: refused).
      if (attach && attach.data !== "") {
        throw new ProtocolError(Code.InvalidData, "'attach.data' must be a plain base64 string");
      }
      const stored = req.attachment && req.attachment.size > 0 ? req.attachment : undefined;
      if (body === "" && !stored) throw new ProtocolError(Code.EmptyField, "'body' is empty and there is no attachment");
      if (!(await users.get(to))) throw new ProtocolError(Code.UserNotFound, `no user with uid '${to}'`);

      const cmidKey = cmid === undefined ? undefined : `${me}\u0000${cmid}`;
      if (cmidKey !== undefined) {
        const inflight = inflightCmids.get(cmidKey);
        if (inflight) return new Pending(inflight);
        const earlier = await messages.byCmid(me, cmid as string);
        if (earlier) return { mid: earlier.mid, time: earlier.time };
      }

      const seq = messages.nextSeq();
      const m: MessageRecord = {
        mid: String(seq),
        conv: directConv(me, to),
        from: me,
        nick: req.session.nick as string,
        to,
        body,
        time: nowSeconds(),
      };
      if (stored) m.attach = { mime: attach?.mime || "application/octet-stream", sha: stored.sha, size: stored.size };
      if (cmid !== undefined) m.cmid = cmid;
      // The ops serialise the record now: it must be complete before this line.
      const ops = [...messages.appendOps(m), ...messages.enqueueOps(to, m)];
      if (stored) ops.push(...blobs.refOps(stored.sha, m.mid));

      const settled = storage.commit(ops).then(() => {
        req.after(() => deliver(m));
        return { mid: m.mid, time: m.time };
      });
      if (cmidKey !== undefined) {
        inflightCmids.set(cmidKey, settled);
        void settled.finally(() => inflightCmids.delete(cmidKey)).catch(() => {});
      }
      return new Pending(settled);
    },
  });

  function deliver(m: MessageRecord): void {
    const ev = evMessage(m, blobs);
    const to = m.to as string;
    const qk = messages.queueKey(to, m.mid);
    hub.deliver(to, ev, () => storage.commitLazy(messages.dequeueOps(qk)), m.mid);
    if (to !== m.from) hub.deliver(m.from, ev, undefined, m.mid);
  }

  /** Sends the user's offline queue, oldest first, pacing itself to the socket. */
  async function drain(s: Session): Promise<void> {
    const uid = s.uid as string;
    const sent = new Set<string>();
    s.holdEvents();
    try {
      let after: string | undefined;
      for (;;) {
        const page = await messages.queued(uid, DRAIN_PAGE, after);
        if (page.length === 0 || s.peer.closed || s.uid !== uid) break;
        let flushed: Promise<boolean> = Promise.resolve(true);
        for (const { key, message } of page) {
          after = key;
          if (!message) {
            storage.commitLazy(messages.dequeueOps(key)); // deleted since it was queued
            continue;
          }
          sent.add(message.mid);
          flushed = new Promise((resolve) =>
            s.send(evMessage(message, blobs), (ok) => {
              if (ok) storage.commitLazy(messages.dequeueOps(key));
              resolve(ok);
            }),
          );
        }
        if (!(await flushed)) break;
      }
    } finally {
      s.releaseEvents(sent);
    }
  }

  hooks.onLoggedIn(drain);
}
