// History, dialogs, editmessage and delmessage (spec §6), against a real server over
// TCP: paging, limits, attachments in history, who may read or change what, and the
// events that tell the conversation about edits and deletions.
import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, uniqueName, type Account, serveForFile } from "./helpers.js";


const shared = serveForFile();

interface Sent {
  mid: string;
  from: string;
  nick: string;
  body: string;
  time: number;
}

/** Sends one message and returns what history should show for it. */
async function say(from: Account, to: { uid?: string; channel?: string }, body: string): Promise<Sent> {
  const r = await from.client.request("message", { ...to, body });
  expect(r.status).toBe(0);
  return { mid: r.mid, from: from.uid, nick: from.nick, body, time: r.time };
}

/** Sends n messages without waiting between them, then reads the n replies in order. */
async function pipeline(from: Account, to: { uid?: string; channel?: string }, n: number, prefix: string): Promise<Sent[]> {
  for (let i = 0; i < n; i++) from.client.send("message", { ...to, body: `${prefix}${i}` });
  const out: Sent[] = [];
  for (let i = 0; i < n; i++) {
    const r = (await from.client.reply("message")).data;
    expect(r.status).toBe(0);
    out.push({ mid: r.mid, from: from.uid, nick: from.nick, body: `${prefix}${i}`, time: r.time });
  }
  return out;
}

async function newChannel(owner: Account, ...members: Account[]): Promise<string> {
  const r = await owner.client.request("createchannel", { name: uniqueName("hist"), descr: "" });
  expect(r.status).toBe(0);
  for (const m of members) expect((await m.client.request("enter", { channel: r.chid })).status).toBe(0);
  return r.chid;
}

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

const isEv = (action: string) => (f: { action: string }) => f.action === action;

describe("history", () => {
  it("pages the newest messages (kept in memory) and older ones (read from disk) alike, before and after deletes", async () => {
    // A conversation's newest seqs are kept in memory; older pages come from disk. Every
    // page must be the same either way, and a delete must not leave a gap in a page.
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const chid = await newChannel(a, b);
    for (const to of [{ uid: b.uid }, { channel: chid }]) {
      let sent = await pipeline(a, to, 150, "m");
      const page = async (limit: number, before?: string) =>
        ((await a.client.request("history", { ...to, limit, ...(before ? { before } : {}) })).messages as any[]).map((m) => m.body);
      const expected = (limit: number, below: number) => sent.slice(Math.max(0, below - limit), below).map((m) => m.body);
      for (const [limit, below] of [
        [10, 150],
        [50, 150],
        [64, 150],
        [65, 150],
        [30, 140],
        [50, 100],
        [50, 70],
        [200, 150],
      ]) {
        expect(await page(limit, below === 150 ? undefined : sent[below].mid)).toEqual(expected(limit, below));
      }
      // delete the newest and one in the middle of the newest page
      for (const i of [149, 140]) expect((await a.client.request("delmessage", { mid: sent[i].mid })).status).toBe(0);
      sent = sent.filter((_, i) => i !== 149 && i !== 140);
      expect(await page(10)).toEqual(expected(10, sent.length));
      expect(await page(50)).toEqual(expected(50, sent.length));
      const more = await pipeline(a, to, 3, "n");
      sent = [...sent, ...more];
      expect(await page(10)).toEqual(expected(10, sent.length));
    }
    await closeAll(a.client, b.client);
  });

  it("returns a direct conversation, oldest first, as {mid, from, nick, body, time} for both sides", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const sent = [
      await say(a, { uid: b.uid }, "one"),
      await say(b, { uid: a.uid }, "two"),
      await say(a, { uid: b.uid }, "three"),
      await say(a, { uid: b.uid }, "four"),
      await say(b, { uid: a.uid }, "five"),
    ];
    const h = await a.client.request("history", { uid: b.uid });
    expect(Object.keys(h).sort()).toEqual(["error", "messages", "status"]);
    expect(h).toMatchObject({ status: 0, error: "OK" });
    expect(h.messages).toEqual(sent);
    // the same conversation seen from the other side
    expect((await b.client.request("history", { uid: a.uid })).messages).toEqual(sent);
    // a user with no conversation yet: empty, not an error
    const c = await registerUser(shared.port);
    expect(await c.client.request("history", { uid: a.uid })).toEqual({ status: 0, error: "OK", messages: [] });
    await closeAll(a.client, b.client, c.client);
  });

  it("returns a channel's messages from every sender, oldest first", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const chid = await newChannel(a, b);
    const sent = [];
    for (let i = 0; i < 6; i++) sent.push(await say(i % 3 ? a : b, { channel: chid }, `room ${i}`));
    const h = await b.client.request("history", { channel: chid });
    expect(h).toMatchObject({ status: 0, error: "OK" });
    expect(h.messages).toEqual(sent);
    // a channel's history does not mix with direct history
    await say(a, { uid: b.uid }, "direct");
    expect((await a.client.request("history", { channel: chid })).messages).toEqual(sent);
    expect((await a.client.request("history", { uid: b.uid })).messages.map((m: any) => m.body)).toEqual(["direct"]);
    await closeAll(a.client, b.client);
  });

  it("returns the newest 50 by default, `limit` of them when given, and pages back with `before`", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const chid = await newChannel(a, b);
    for (const to of [{ uid: b.uid }, { channel: chid }]) {
      const sent = await pipeline(a, to, 70, "p");
      const mids = sent.map((m) => m.mid);
      const def = (await b.client.request("history", to.uid ? { uid: a.uid } : to)).messages;
      expect(def.map((m: any) => m.mid)).toEqual(mids.slice(-50));
      expect(def).toEqual(sent.slice(-50));
      const ten = (await a.client.request("history", { ...to, limit: 10 })).messages;
      expect(ten.map((m: any) => m.mid)).toEqual(mids.slice(-10));
      // before: the `limit` messages just older than that mid
      const page = (await a.client.request("history", { ...to, limit: 10, before: mids[40] })).messages;
      expect(page.map((m: any) => m.mid)).toEqual(mids.slice(30, 40));
      const first = (await a.client.request("history", { ...to, limit: 10, before: mids[3] })).messages;
      expect(first.map((m: any) => m.mid)).toEqual(mids.slice(0, 3));
      expect((await a.client.request("history", { ...to, before: mids[0] })).messages).toEqual([]);
      const one = (await a.client.request("history", { ...to, limit: 1 })).messages;
      expect(one).toEqual([sent[69]]);
    }
    await closeAll(a.client, b.client);
  });

  it("pages back across 1,200 messages with no gap and no duplicate; a limit over 500 is 500", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    await closeAll(b.client); // b offline: the messages wait in its queue too
    const sent = await pipeline(a, { uid: b.uid }, 1200, "bulk ");
    const mids = sent.map((m) => m.mid);
    expect(new Set(mids).size).toBe(1200);
    a.client.frames.length = 0; // the sender's own ev_message echoes

    const big = (await a.client.request("history", { uid: b.uid, limit: 1000 })).messages;
    expect(big).toHaveLength(500);
    expect(big.map((m: any) => m.mid)).toEqual(mids.slice(-500));
    expect((await a.client.request("history", { uid: b.uid, limit: 100_000 })).messages).toHaveLength(500);

    for (const limit of [100, 500, 333]) {
      const pages: any[][] = [];
      let before: string | undefined;
      for (;;) {
        const r = await a.client.request("history", before ? { uid: b.uid, limit, before } : { uid: b.uid, limit });
        expect(r.status).toBe(0);
        if (r.messages.length === 0) break;
        expect(r.messages.length).toBeLessThanOrEqual(limit);
        pages.push(r.messages);
        before = r.messages[0].mid;
        expect(pages.length).toBeLessThanOrEqual(Math.ceil(1200 / limit));
      }
      expect(pages).toHaveLength(Math.ceil(1200 / limit));
      const all = pages.reverse().flat();
      expect(all.map((m) => m.mid)).toEqual(mids);
      expect(all).toEqual(sent);
    }
    await closeAll(a.client);
  });

  it("returns an attachment's data byte for byte", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const chid = await newChannel(a, b);
    const bytes = randomBytes(200_000);
    const data = bytes.toString("base64");
    for (const to of [{ uid: b.uid }, { channel: chid }]) {
      const before = await say(a, to, "before");
      const r = await a.client.request("message", { ...to, body: "look", attach: { mime: "image/png", data } });
      expect(r.status).toBe(0);
      const after = await say(a, to, "after");
      const h = await b.client.request("history", to.uid ? { uid: a.uid } : to);
      expect(h.status).toBe(0);
      expect(h.messages.map((m: any) => m.mid)).toEqual([before.mid, r.mid, after.mid]);
      const m = h.messages[1];
      expect(m).toMatchObject({ mid: r.mid, from: a.uid, body: "look", time: r.time });
      expect(m.attach).toEqual({ mime: "image/png", data });
      expect(Buffer.from(m.attach.data, "base64").equals(bytes)).toBe(true);
      // messages without an attachment carry none (or the empty one)
      for (const plain of [h.messages[0], h.messages[2]]) {
        expect([undefined, ""]).toContain(plain.attach?.data);
      }
      // an attachment-only message (empty body) is in history too
      const only = await a.client.request("message", { ...to, attach: { mime: "application/octet-stream", data: "AAEC" } });
      const last = (await a.client.request("history", { ...to, limit: 1 })).messages[0];
      expect(last).toMatchObject({ mid: only.mid, body: "", attach: { mime: "application/octet-stream", data: "AAEC" } });
    }
    await closeAll(a.client, b.client);
  });

  it("keeps an attachment in history when another message with the same bytes is deleted", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const bytes = randomBytes(50_000);
    const data = bytes.toString("base64");
    const first = await a.client.request("message", { uid: b.uid, body: "one", attach: { mime: "application/pdf", data } });
    const second = await a.client.request("message", { uid: b.uid, body: "two", attach: { mime: "application/pdf", data } });
    expect((await a.client.request("delmessage", { mid: first.mid })).status).toBe(0);
    await new Promise((r) => setTimeout(r, 100)); // let an unused blob be collected, if it were
    const h = (await b.client.request("history", { uid: a.uid })).messages;
    expect(h.map((m: any) => m.mid)).toEqual([second.mid]);
    expect(Buffer.from(h[0].attach.data, "base64").equals(bytes)).toBe(true);
    await closeAll(a.client, b.client);
  });

  it("answers 6 before auth, 4 without uid or channel, 8 for an unknown uid, 9 and 10 for channels", async () => {
    const anon = await Client.connect(shared.port);
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    expect((await anon.request("history", { uid: a.uid })).status).toBe(6);
    expect((await a.client.request("history", {})).status).toBe(4);
    expect((await a.client.request("history")).status).toBe(4);
    expect((await a.client.request("history", { uid: "" })).status).toBe(4);
    expect((await a.client.request("history", { limit: 5 })).status).toBe(4);
    const r8 = await a.client.request("history", { uid: "no-such-user" });
    expect(r8.status).toBe(8);
    expect(r8.error).not.toBe("OK");
    expect(r8.messages).toBeUndefined();
    expect((await a.client.request("history", { channel: "no-such-channel" })).status).toBe(9);
    const chid = await newChannel(b);
    await say(b, { channel: chid }, "members only");
    const r10 = await a.client.request("history", { channel: chid });
    expect(r10.status).toBe(10);
    expect(r10.messages).toBeUndefined();
    await closeAll(anon, a.client, b.client);
  });

  it("answers 3 for a non-numeric `before` and a `limit` that is not a positive integer", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    await say(a, { uid: b.uid }, "x");
    for (const bad of [
      { before: "abc" },
      { before: "12abc" },
      { before: 12 },
      { limit: 1.5 },
      { limit: "10" },
      { limit: -1 },
      { limit: null },
    ]) {
      const r = await a.client.request("history", { uid: b.uid, ...bad });
      expect(r.status, JSON.stringify(bad)).toBe(3);
    }
    // the connection goes on
    expect((await a.client.request("history", { uid: b.uid })).messages).toHaveLength(1);
    await closeAll(a.client, b.client);
  });
});

describe("authorization", () => {
  it("a third user reads only their own conversation and cannot edit or delete another's message", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const secret = await say(a, { uid: b.uid }, "between a and b");
    const reply = await say(b, { uid: a.uid }, "b answers");
    await new Promise((r) => setTimeout(r, 50));
    for (const x of [a.client, b.client]) x.frames.length = 0;

    // c's history with b or with a: c's own conversation, none of a's or b's messages
    expect((await c.client.request("history", { uid: b.uid })).messages).toEqual([]);
    expect((await c.client.request("history", { uid: a.uid })).messages).toEqual([]);
    const mine = await say(c, { uid: b.uid }, "c to b");
    expect((await c.client.request("history", { uid: b.uid })).messages).toEqual([mine]);
    const before = await b.client.request("history", { uid: a.uid });
    expect(before.messages).toEqual([secret, reply]);

    // editing or deleting someone else's message: 15 for the other participant, 14 for
    // a stranger (who is not even told the mid exists)
    for (const [who, mid, code] of [
      [c, secret.mid, 14],
      [b, secret.mid, 15],
      [c, reply.mid, 14],
      [a, reply.mid, 15],
    ] as const) {
      const e = await who.client.request("editmessage", { mid, body: "hijacked" });
      expect(e.status).toBe(code);
      expect(e.error).not.toBe("OK");
      const d = await who.client.request("delmessage", { mid });
      expect(d.status).toBe(code);
    }
    // nothing changed, nobody was told anything
    expect(await a.client.request("history", { uid: b.uid })).toEqual(before);
    for (const x of [a.client, b.client]) {
      expect(await x.quiet(150, (f) => f.action === "ev_edit" || f.action === "ev_delmessage")).toBe(true);
    }
    await closeAll(a.client, b.client, c.client);
  });

  it("keeps a channel's messages from someone who is not a member", async () => {
    const a = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const chid = await newChannel(a);
    const m = await say(a, { channel: chid }, "inside");
    expect((await c.client.request("history", { channel: chid })).status).toBe(10);
    expect((await c.client.request("editmessage", { mid: m.mid, body: "x" })).status).toBe(14);
    expect((await c.client.request("delmessage", { mid: m.mid })).status).toBe(14);
    expect((await c.client.request("dialogs")).dialogs).toEqual([]);
    expect((await a.client.request("history", { channel: chid })).messages).toEqual([m]);
    await closeAll(a.client, c.client);
  });
});

describe("dialogs", () => {
  it("lists direct and channel conversations with their last message, most recent first", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    expect(await a.client.request("dialogs")).toEqual({ status: 0, error: "OK", dialogs: [] });
    const name = uniqueName("dlg");
    const chid = (await a.client.request("createchannel", { name, descr: "" })).chid;
    expect((await b.client.request("enter", { channel: chid })).status).toBe(0);

    await say(a, { uid: b.uid }, "to b, first");
    const toC = await say(a, { uid: c.uid }, "to c");
    const inRoom = await say(b, { channel: chid }, "in the room");
    const fromB = await say(b, { uid: a.uid }, "b answers");
    const summary = (m: Sent) => ({ mid: m.mid, from: m.from, body: m.body, time: m.time });

    const d = await a.client.request("dialogs");
    expect(d).toMatchObject({ status: 0, error: "OK" });
    expect(d.dialogs).toEqual([
      { uid: b.uid, nick: b.nick, last: summary(fromB) },
      { chid, name, last: summary(inRoom) },
      { uid: c.uid, nick: c.nick, last: summary(toC) },
    ]);
    // c sees only its conversation with a
    expect((await c.client.request("dialogs")).dialogs).toEqual([{ uid: a.uid, nick: a.nick, last: summary(toC) }]);

    // a new message moves its conversation to the top
    const again = await say(c, { uid: a.uid }, "c is back");
    const d2 = (await a.client.request("dialogs")).dialogs;
    expect(d2.map((x: any) => x.uid ?? x.chid)).toEqual([c.uid, b.uid, chid]);
    expect(d2[0].last).toEqual(summary(again));
    // leaving the channel drops it from the list
    expect((await a.client.request("leave", { channel: chid })).status).toBe(0);
    expect((await a.client.request("dialogs")).dialogs.map((x: any) => x.uid ?? x.chid)).toEqual([c.uid, b.uid]);
    await closeAll(a.client, b.client, c.client);
  });

  it("shows an edited last message, the one before a deleted last message, and long bodies whole", async () => {
    // The newest record of each conversation is kept in memory for dialogs: an edit or
    // a delete must not leave the old one on show.
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const chid = (await a.client.request("createchannel", { name: uniqueName("dlge"), descr: "" })).chid;
    const lastOf = async (key: string) => (await a.client.request("dialogs")).dialogs.find((x: any) => (x.uid ?? x.chid) === key).last;
    for (const [to, key] of [
      [{ uid: b.uid }, b.uid],
      [{ channel: chid }, chid],
    ] as const) {
      const before = await say(a, to, "before");
      const last = await say(a, to, "last");
      expect(await lastOf(key)).toMatchObject({ mid: last.mid, body: "last" });
      expect((await a.client.request("editmessage", { mid: last.mid, body: "last, edited" })).status).toBe(0);
      expect(await lastOf(key)).toMatchObject({ mid: last.mid, body: "last, edited" });
      expect((await a.client.request("delmessage", { mid: last.mid })).status).toBe(0);
      expect(await lastOf(key)).toMatchObject({ mid: before.mid, body: "before" });
      const long = await say(a, to, "x".repeat(5000));
      expect(await lastOf(key)).toMatchObject({ mid: long.mid, body: "x".repeat(5000) });
    }
    await closeAll(a.client, b.client);
  });

  it("answers 6 before auth", async () => {
    const anon = await Client.connect(shared.port);
    for (const [action, data] of [
      ["dialogs", {}],
      ["editmessage", { mid: "1", body: "x" }],
      ["delmessage", { mid: "1" }],
    ] as const) {
      expect((await anon.request(action, data)).status).toBe(6);
    }
    await closeAll(anon);
  });
});

describe("editmessage", () => {
  it("answers {mid, edited}, tells both parties on every connection, and history shows the edit", async () => {
    const a = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b = await registerUser(shared.port);
    const b2 = await login(shared.port, b.login);
    const c = await registerUser(shared.port);
    const m = await say(a, { uid: b.uid }, "typo");
    const other = await say(a, { uid: b.uid }, "untouched");
    await new Promise((r) => setTimeout(r, 50));

    const r = await a.client.request("editmessage", { mid: m.mid, body: "fixed" });
    expect(Object.keys(r).sort()).toEqual(["edited", "error", "mid", "status"]);
    expect(r).toMatchObject({ status: 0, error: "OK", mid: m.mid });
    expect(Number.isInteger(r.edited)).toBe(true);
    expect(r.edited).toBeGreaterThanOrEqual(m.time);
    for (const x of [a.client, a2.client, b.client, b2.client]) {
      expect(await x.event("ev_edit")).toEqual({ mid: m.mid, body: "fixed", edited: r.edited });
    }
    expect(await c.client.quiet(150, isEv("ev_edit"))).toBe(true);

    const h = (await b.client.request("history", { uid: a.uid })).messages;
    expect(h).toEqual([{ ...m, body: "fixed", edited: r.edited }, other]);
    // the last-message summary follows the edit too (when it is the last one)
    const r2 = await a2.client.request("editmessage", { mid: other.mid, body: "touched after all" });
    expect(r2.status).toBe(0);
    const dlg = (await b.client.request("dialogs")).dialogs.find((x: any) => x.uid === a.uid);
    expect(dlg.last).toMatchObject({ mid: other.mid, body: "touched after all" });
    // edited twice: the newest body wins
    expect((await a.client.request("editmessage", { mid: m.mid, body: "fixed again" })).status).toBe(0);
    expect((await a.client.request("history", { uid: b.uid, limit: 2 })).messages[0].body).toBe("fixed again");
    await closeAll(a.client, a2.client, b.client, b2.client, c.client);
  });

  it("tells every member of a channel", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const outsider = await registerUser(shared.port);
    const chid = await newChannel(a, b, c);
    const m = await say(b, { channel: chid }, "draft");
    const r = await b.client.request("editmessage", { mid: m.mid, body: "final" });
    expect(r).toMatchObject({ status: 0, mid: m.mid });
    for (const x of [a.client, b.client, c.client]) {
      expect(await x.event("ev_edit")).toEqual({ mid: m.mid, body: "final", edited: r.edited });
    }
    expect(await outsider.client.quiet(150, isEv("ev_edit"))).toBe(true);
    expect((await c.client.request("history", { channel: chid })).messages).toEqual([{ ...m, body: "final", edited: r.edited }]);
    expect((await c.client.request("enter", { channel: chid })).last_msg).toEqual([{ ...m, body: "final" }].map(({ mid, from, nick, body, time }) => ({ mid, from, nick, body, time })));
    await closeAll(a.client, b.client, c.client, outsider.client);
  });

  it("answers 14 for an unknown mid, 15 for someone else's message, 4 for an empty body", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const m = await say(a, { uid: b.uid }, "original");
    const r14 = await a.client.request("editmessage", { mid: "999999999999", body: "x" });
    expect(r14.status).toBe(14);
    expect(r14.error).not.toBe("OK");
    expect((await b.client.request("editmessage", { mid: m.mid, body: "x" })).status).toBe(15);
    expect((await a.client.request("editmessage", { mid: m.mid, body: "" })).status).toBe(4);
    expect((await a.client.request("editmessage", { mid: m.mid })).status).toBe(4);
    expect((await a.client.request("editmessage", { body: "x" })).status).toBe(4);
    // a deleted message cannot be edited
    expect((await a.client.request("delmessage", { mid: m.mid })).status).toBe(0);
    expect((await a.client.request("editmessage", { mid: m.mid, body: "x" })).status).toBe(14);
    expect(await b.client.quiet(150, isEv("ev_edit"))).toBe(true);
    await closeAll(a.client, b.client);
  });
});

describe("delmessage", () => {
  it("answers {mid}, tells the conversation, and the message leaves history", async () => {
    const a = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const m1 = await say(a, { uid: b.uid }, "keep");
    const m2 = await say(a, { uid: b.uid }, "remove me");
    const r = await a.client.request("delmessage", { mid: m2.mid });
    expect(r).toEqual({ status: 0, error: "OK", mid: m2.mid });
    for (const x of [a.client, a2.client, b.client]) {
      expect(await x.event("ev_delmessage")).toEqual({ mid: m2.mid });
    }
    expect(await c.client.quiet(150, isEv("ev_delmessage"))).toBe(true);
    expect((await b.client.request("history", { uid: a.uid })).messages).toEqual([m1]);
    // the conversation's last message is now the one before
    const dlg = (await b.client.request("dialogs")).dialogs.find((x: any) => x.uid === a.uid);
    expect(dlg.last.mid).toBe(m1.mid);
    // once gone, 14
    expect((await a.client.request("delmessage", { mid: m2.mid })).status).toBe(14);
    // the last one gone: the conversation has no history and leaves dialogs
    expect((await a.client.request("delmessage", { mid: m1.mid })).status).toBe(0);
    expect((await b.client.request("history", { uid: a.uid })).messages).toEqual([]);
    expect((await b.client.request("dialogs")).dialogs.find((x: any) => x.uid === a.uid)).toBeUndefined();
    await closeAll(a.client, a2.client, b.client, c.client);
  });

  it("tells every member of a channel and removes the message from its history", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const chid = await newChannel(a, b);
    const m1 = await say(b, { channel: chid }, "stays");
    const m2 = await say(b, { channel: chid }, "goes");
    expect((await b.client.request("delmessage", { mid: m2.mid })).status).toBe(0);
    for (const x of [a.client, b.client]) expect(await x.event("ev_delmessage")).toEqual({ mid: m2.mid });
    expect((await a.client.request("history", { channel: chid })).messages).toEqual([m1]);
    expect((await a.client.request("enter", { channel: chid })).last_msg).toEqual([m1]);
    await closeAll(a.client, b.client);
  });

  it("removes the message from the offline queue of a recipient who was away", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    await closeAll(b.client);
    const m1 = await say(a, { uid: b.uid }, "first");
    const m2 = await say(a, { uid: b.uid }, "regretted");
    const m3 = await say(a, { uid: b.uid }, "third");
    expect((await a.client.request("delmessage", { mid: m2.mid })).status).toBe(0);
    const back = { client: await Client.connect(shared.port) };
    await back.client.request("hello", { ack: true });
    expect((await back.client.request("auth", { login: b.login, pass: "secret" })).status).toBe(0);
    const got = [await back.client.event("ev_message"), await back.client.event("ev_message")];
    expect(got.map((e) => e.mid)).toEqual([m1.mid, m3.mid]);
    expect(await back.client.quiet(300, isEv("ev_message"))).toBe(true);
    expect((await back.client.request("ack", { mid: m3.mid })).status).toBe(0);
    // and a later login gets nothing more
    await closeAll(back.client);
    const again = await login(shared.port, b.login);
    expect(await again.client.quiet(300, isEv("ev_message"))).toBe(true);
    await closeAll(a.client, again.client);
  });

  // BUG: editmessage reads the message, then commits a put of the whole edited record
  // (messages.updateOps); delmessage reads it, then commits its removal. Neither holds
  // anything between the read and the commit (src/features/messages.ts), so when the
  // author's two devices send delmessage and editmessage for the same mid at once, both
  // answer 0 and the edit's put lands after the delete: the message is back in history
  // with the edited body, while its mid index entry is gone, so any later editmessage
  // or delmessage of it answers 14 and it can never be removed. Expected: the delete
  // wins (the edit answers 14, or its write is dropped) and history does not show it.
  it("a delete and an edit of the same message at once do not bring it back", async () => {
    const a = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b = await registerUser(shared.port);
    // a race: tried a few times so that one lucky ordering does not hide it
    for (let i = 0; i < 5; i++) {
      const m = await say(a, { uid: b.uid }, `to be deleted ${i}`);
      a.client.send("delmessage", { mid: m.mid });
      a2.client.send("editmessage", { mid: m.mid, body: "edited meanwhile" });
      expect((await a.client.reply("delmessage")).data.status).toBe(0);
      await a2.client.reply("editmessage");
      expect((await b.client.request("history", { uid: a.uid })).messages).toEqual([]);
    }
    await closeAll(a.client, a2.client, b.client);
  });

  it("answers 14 for an unknown mid and 15 for someone else's message; nothing changes", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const m = await say(a, { uid: b.uid }, "mine");
    expect((await a.client.request("delmessage", { mid: "999999999999" })).status).toBe(14);
    const r = await b.client.request("delmessage", { mid: m.mid });
    expect(r.status).toBe(15);
    expect(r.error).not.toBe("OK");
    expect((await a.client.request("delmessage", {})).status).toBe(4);
    expect((await a.client.request("history", { uid: b.uid })).messages).toEqual([m]);
    expect(await a.client.quiet(150, isEv("ev_delmessage"))).toBe(true);
    await closeAll(a.client, b.client);
  });
});

describe("history arguments", () => {
  it("answers 3 for both uid and channel at once", async () => {
    const a = await registerUser(shared.port);
    expect((await a.client.request("history", { uid: a.uid, channel: "1" })).status).toBe(3);
    a.client.close();
  });
});
