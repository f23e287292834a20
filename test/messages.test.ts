import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, serveForFile, startTestServer } from "./helpers.js";
import { heldGate, holdNextWrite, sleep, wrapCalls } from "./pipeline-helpers.js";


const shared = serveForFile();

describe("message", () => {
  it("replies mid and time once stored, and delivers ev_message to recipient and sender", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const r = await a.client.request("message", { uid: b.uid, body: "hello", cid: a.uid, sid: a.sid });
    expect(r).toMatchObject({ status: 0, error: "OK" });
    expect(typeof r.mid).toBe("string");
    expect(Number.isInteger(r.time)).toBe(true);
    const ev = await b.client.event("ev_message");
    expect(ev).toEqual({
      mid: r.mid,
      from: a.uid,
      nick: a.nick,
      body: "hello",
      time: r.time,
      attach: { mime: "", data: "" },
      to: b.uid,
    });
    expect(await a.client.event("ev_message")).toEqual(ev);
    a.client.close();
    b.client.close();
  });

  it("to a recipient deleted between two messages of a run: the second is refused with 8", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    // A run to b on one connection (the server remembers the connection's last recipient).
    for (let i = 0; i < 3; i++) expect((await a.client.request("message", { uid: b.uid, body: `run ${i}` })).status).toBe(0);
    expect((await b.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    expect(await a.client.request("message", { uid: b.uid, body: "after" })).toMatchObject({ status: 8 });
    a.client.close();
    b.client.close();
  });

  it("any body arrives and is stored exactly as sent, escaped in its frame or not (property)", async () => {
    // A frame without a backslash takes the joined (not stringified) record path; one
    // with escapes the JSON.stringify path. Both must give back the same string.
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const bodies: string[] = [];
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.string({ minLength: 1, maxLength: 40 }), fc.string({ minLength: 1, maxLength: 40, unit: "grapheme" }), fc.string({ minLength: 1, maxLength: 40, unit: "binary" })),
        async (body) => {
          // A lone surrogate is refused with 3 (its own test); the rest must round-trip.
          if (/\p{Cs}/u.test(body)) return;
          const r = await a.client.request("message", { uid: b.uid, body });
          expect(r.status).toBe(0);
          expect((await b.client.event("ev_message")).body).toBe(body);
          bodies.push(body);
        },
      ),
      { numRuns: 150, seed: 20261201 },
    );
    const h = await b.client.request("history", { uid: a.uid, limit: 500 });
    expect(h.messages.map((m: { body: string }) => m.body)).toEqual(bodies);
    a.client.close();
    b.client.close();
  });

  it("carries an attachment (base64) through to the recipient byte for byte", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const data = Buffer.from(Array.from({ length: 3000 }, (_, i) => i % 256)).toString("base64");
    const r = await a.client.request("message", { uid: b.uid, body: "", attach: { mime: "image/png", data } });
    expect(r.status).toBe(0);
    const ev = await b.client.event("ev_message");
    expect(ev.attach).toEqual({ mime: "image/png", data });
    a.client.close();
    b.client.close();
  });

  it("gives every mid once and keeps a sender's order for the recipient", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    for (let i = 0; i < 100; i++) a.client.send("message", { uid: b.uid, body: `m${i}` });
    const replies = [];
    for (let i = 0; i < 100; i++) replies.push((await a.client.reply("message")).data);
    expect(new Set(replies.map((r) => r.mid)).size).toBe(100);
    const bodies = [];
    for (let i = 0; i < 100; i++) bodies.push((await b.client.event("ev_message")).body);
    expect(bodies).toEqual(Array.from({ length: 100 }, (_, i) => `m${i}`));
    // mids increase in send order
    const mids = replies.map((r) => Number(r.mid));
    expect([...mids].sort((x, y) => x - y)).toEqual(mids);
    a.client.close();
    b.client.close();
  });

  it("answers 4 for an empty body without attachment, 8 for an unknown uid, 3 for bad base64 or types", async () => {
    const a = await registerUser(shared.port);
    expect((await a.client.request("message", { uid: a.uid, body: "" })).status).toBe(4);
    expect((await a.client.request("message", { body: "x" })).status).toBe(4);
    expect((await a.client.request("message", { uid: "nobody", body: "x" })).status).toBe(8);
    expect((await a.client.request("message", { uid: a.uid, attach: { mime: "a/b", data: "!!notbase64" } })).status).toBe(3);
    expect((await a.client.request("message", { uid: a.uid, body: 12 })).status).toBe(3);
    expect((await a.client.request("message", { uid: a.uid, body: "x", attach: "nope" })).status).toBe(3);
    // nothing was delivered for any of them
    expect(await a.client.quiet(150, (f) => f.action === "ev_message")).toBe(true);
    a.client.close();
  });

  it("answers 12 for an attachment over the limit", async () => {
    const small = await startTestServer({ maxAttach: 1000 });
    const a = await registerUser(small.port);
    const data = Buffer.alloc(1001).toString("base64");
    expect((await a.client.request("message", { uid: a.uid, attach: { mime: "x/y", data } })).status).toBe(12);
    expect((await a.client.request("ping")).status).toBe(0);
    a.client.close();
    await small.stop();
  });
});

describe("multi-device", () => {
  it("delivers to every connection of the recipient and of the sender", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b2 = await login(shared.port, b.login);
    const b3 = await Client.connect(shared.port);
    expect((await b3.request("auth", { sid: b.sid })).status).toBe(0);
    const r = await a.client.request("message", { uid: b.uid, body: "to all devices" });
    for (const c of [b.client, b2.client, b3, a.client, a2.client]) {
      expect((await c.event("ev_message")).mid).toBe(r.mid);
    }
    for (const c of [a.client, a2.client, b.client, b2.client, b3]) c.close();
  });
});

describe("offline delivery", () => {
  it("queues messages for an offline user and sends them in order right after auth", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    b.client.close();
    await b.client.closed;
    const mids = [];
    for (let i = 0; i < 30; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `offline ${i}` })).mid);
    const client = await Client.connect(shared.port);
    expect((await client.request("hello", { ack: true })).ack).toBe(true);
    expect((await client.request("auth", { login: b.login, pass: "secret" })).status).toBe(0);
    const got = [];
    for (let i = 0; i < 30; i++) got.push(await client.event("ev_message"));
    expect(got.map((e) => e.mid)).toEqual(mids);
    expect(got.map((e) => e.body)).toEqual(mids.map((_, i) => `offline ${i}`));
    expect((await client.request("ack", { mid: mids[29] })).status).toBe(0);
    client.close();
    await client.closed;
    // once acknowledged, the inbox is delivered: the next login gets nothing
    const again = await login(shared.port, b.login);
    expect(await again.client.quiet(300, (f) => f.action === "ev_message")).toBe(true);
    again.client.close();
    a.client.close();
  });

  it("sends queued messages before live ones that arrive during the drain", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    b.client.close();
    await b.client.closed;
    for (let i = 0; i < 300; i++) a.client.send("message", { uid: b.uid, body: `q${i}` });
    for (let i = 0; i < 300; i++) expect((await a.client.reply("message")).data.status).toBe(0);
    const c = await Client.connect(shared.port);
    c.send("auth", { sid: b.sid });
    await c.reply("auth");
    for (let i = 0; i < 20; i++) a.client.send("message", { uid: b.uid, body: `live${i}` });
    const bodies = [];
    for (let i = 0; i < 320; i++) bodies.push((await c.event("ev_message")).body);
    expect(bodies).toEqual([...Array.from({ length: 300 }, (_, i) => `q${i}`), ...Array.from({ length: 20 }, (_, i) => `live${i}`)]);
    c.close();
    a.client.close();
  });
});

describe("cmid", () => {
  it("a resend with the same cmid returns the original mid and delivers nothing twice", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const first = await a.client.request("message", { uid: b.uid, body: "once", cmid: "c-1" });
    const again = await a.client.request("message", { uid: b.uid, body: "once", cmid: "c-1" });
    expect(again).toEqual(first);
    // a resend in flight at the same time as the original
    a.client.send("message", { uid: b.uid, body: "twin", cmid: "c-2" });
    a.client.send("message", { uid: b.uid, body: "twin", cmid: "c-2" });
    const [t1, t2] = [(await a.client.reply("message")).data, (await a.client.reply("message")).data];
    expect(t2.mid).toBe(t1.mid);
    const evs = [await b.client.event("ev_message"), await b.client.event("ev_message")];
    expect(evs.map((e) => e.body)).toEqual(["once", "twin"]);
    expect(await b.client.quiet(200, (f) => f.action === "ev_message")).toBe(true);
    // after a reconnect, the retry is still recognised
    const re = await login(shared.port, a.login);
    expect(await re.client.request("message", { uid: b.uid, body: "once", cmid: "c-1" })).toEqual(first);
    // cmids are per sender: another sender's c-1 is a new message
    const other = await b.client.request("message", { uid: a.uid, body: "mine", cmid: "c-1" });
    expect(other.mid).not.toBe(first.mid);
    for (const c of [a.client, b.client, re.client]) c.close();
  });
});

describe("a resend of a stored message after what it named changed", () => {
  it("gets the original mid, not 10: the sender left the channel since (a new message there is refused)", async () => {
    const a = await registerUser(shared.port);
    const owner = await registerUser(shared.port);
    const { chid } = await owner.client.request("createchannel", { name: `resend-left-${Date.now()}`, members: [a.uid] });
    const ch = await a.client.request("message", { channel: chid, body: "in the channel", cmid: "r-left" });
    expect(ch.status).toBe(0);
    expect((await a.client.request("leave", { channel: chid })).status).toBe(0);
    expect(await a.client.request("message", { channel: chid, body: "in the channel", cmid: "r-left" })).toEqual(ch);
    expect((await a.client.request("message", { channel: chid, body: "new", cmid: "r-left-new" })).status).toBe(10);
    for (const c of [a.client, owner.client]) c.close();
  });

  it("a new message with a cmid reads the cmid index once", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const store = shared.server.services.messages;
    let reads = 0;
    const undo = wrapCalls(store, "byCmid", async () => void reads++);
    try {
      expect((await a.client.request("message", { uid: b.uid, body: "once", cmid: `one-${Date.now()}` })).status).toBe(0);
      expect(reads).toBe(1);
    } finally {
      undo();
    }
    for (const c of [a.client, b.client]) c.close();
  });
});

describe("a change in flight when its author's account is deleted", () => {
  it("is not made: the deleted account's message stays as it was", async () => {
    const a = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b = await registerUser(shared.port);
    const sent = await a.client.request("message", { uid: b.uid, body: "as sent" });
    expect(sent.status).toBe(0);
    const store = shared.server.services.messages;
    const gate = heldGate();
    // The edit's read of its message under the conversation's lock (its second) waits
    // until the account is gone.
    let reads = 0;
    const undo = wrapCalls(store, "get", async (mid: string) => mid === sent.mid && ++reads === 2 && (await gate.pass()));
    try {
      a.client.send("editmessage", { mid: sent.mid, body: "changed after the deletion" });
      await gate.reached;
      undo();
      expect((await a2.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      gate.open();
      // Its connection was closed with the deletion (ev_logout): the reply has nowhere
      // to go; what counts is what is stored.
      await a.client.closed;
      await shared.server.services.dispatcher.idle(2000);
      await new Promise((r) => setTimeout(r, 300));
    } finally {
      undo();
      gate.open();
    }
    expect((await store.get(sent.mid))?.body).toBe("as sent");
    b.client.close();
  });
});

describe("a direct message in flight when its recipient's account is deleted", () => {
  it("is refused 8, not stored for nobody", async () => {
    const a = await registerUser(shared.port);
    const x = await registerUser(shared.port);
    const store = shared.server.services.messages;
    const gate = heldGate();
    // The message's cmid lookup (after its recipient check) waits until the account is gone.
    const undo = wrapCalls(store, "byCmid", async (_from: string, cmid: string) => cmid === "race-1" && (await gate.pass()));
    try {
      const sending = a.client.request("message", { uid: x.uid, body: "to a leaving account", cmid: "race-1" });
      await gate.reached;
      undo();
      expect((await x.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      gate.open();
      expect(await sending).toMatchObject({ status: 8 });
    } finally {
      undo();
      gate.open();
    }
    expect((await a.client.request("history", { uid: x.uid })).messages ?? []).toEqual([]);
    a.client.close();
  });

  it("is refused 8 while the deletion's batch is being written, on the path that knows the recipient already", async () => {
    const a = await registerUser(shared.port);
    const x = await registerUser(shared.port);
    // A known pair: the next message takes the path with no read before its store.
    expect((await a.client.request("message", { uid: x.uid, body: "first" })).status).toBe(0);
    const { gate, restore } = holdNextWrite(shared.server.services.storage);
    let sending;
    try {
      x.client.send("deleteaccount", { pass: "secret" });
      await gate.reached; // the deletion's batch (or one before it) is being written
      await sleep(50);
      sending = a.client.request("message", { uid: x.uid, body: "during the deletion" });
      await sleep(50);
    } finally {
      restore();
    }
    expect(await sending).toMatchObject({ status: 8 });
    a.client.close();
  });
});
