// Private channels (PROTOCOL.md §9): createchannel with `private` and `members`, invite,
// and what a non-member can and cannot see or do. Every test talks to a real server over
// TCP.
import { describe, expect, it } from "vitest";
import { startServer } from "../src/server.js";
import { Client, login, registerUser, removeDir, serveForFile, testConfig, uniqueName, type Account } from "./helpers.js";
import { heldGate, wrapCalls } from "./pipeline-helpers.js";

const shared = serveForFile();

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

/** A private channel of `owner` with `members`; returns its chid and name. */
async function newPrivate(owner: Account, members: Account[], name = uniqueName("secret")): Promise<{ chid: string; name: string }> {
  const r = await owner.client.request("createchannel", { name, descr: "members only", private: true, members: members.map((m) => m.uid) });
  expect(r).toMatchObject({ status: 0, error: "OK" });
  return { chid: r.chid, name };
}

async function listed(who: Client, chid: string): Promise<any> {
  const r = await who.request("channellist", { limit: 500 });
  expect(r.status).toBe(0);
  return r.channels.find((c: any) => c.chid === chid);
}

describe("createchannel private", () => {
  it("makes the creator and the members members at once; each member is told with ev_enter", async () => {
    const [a, b, c] = [await registerUser(shared.port), await registerUser(shared.port), await registerUser(shared.port)];
    const r = await a.client.request("createchannel", { name: uniqueName("secret"), private: true, members: [b.uid, c.uid, b.uid, a.uid] });
    expect(Object.keys(r).sort()).toEqual(["chid", "error", "status"]);
    expect(r.status).toBe(0);
    const chid = r.chid;
    // each member hears of their own entry; the creator hears nothing
    expect(await b.client.event("ev_enter")).toEqual({ chid, uid: b.uid, nick: b.nick });
    expect(await c.client.event("ev_enter")).toEqual({ chid, uid: c.uid, nick: c.nick });
    expect(await a.client.quiet(200, (f) => f.action === "ev_enter")).toBe(true);
    expect(await b.client.quiet(200, (f) => f.action === "ev_enter")).toBe(true);
    // no enter needed: b posts and everyone gets it
    const sent = await b.client.request("message", { channel: chid, body: "straight in" });
    expect(sent.status).toBe(0);
    for (const u of [a, b, c]) expect(await u.client.event("ev_message", (d) => d.mid === sent.mid)).toMatchObject({ chid, from: b.uid, body: "straight in" });
    expect((await c.client.request("history", { channel: chid })).messages.map((m: any) => m.body)).toEqual(["straight in"]);
    // enter by a member answers as for any channel, with no event
    const seen = await c.client.request("enter", { channel: chid });
    expect(seen.status).toBe(0);
    expect(seen.users.map((u: any) => u.uid)).toEqual([a.uid, b.uid, c.uid].sort());
    expect(await a.client.quiet(200, (f) => f.action === "ev_enter")).toBe(true);
    await closeAll(a.client, b.client, c.client);
  });

  it("refuses unknown members (8), too many (12) and bad fields (3, 4), and creates nothing", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const name = uniqueName("refused");
    const unknown = await a.client.request("createchannel", { name, private: true, members: [b.uid, "000000000000"] });
    expect(unknown).toEqual({ status: 8, error: "no user with uid '000000000000'" });
    expect(await b.client.quiet(200, (f) => f.action === "ev_enter")).toBe(true);
    const many = Array.from({ length: 101 }, (_, i) => `u${i}`);
    expect((await a.client.request("createchannel", { name, private: true, members: many })).status).toBe(12);
    expect((await a.client.request("createchannel", { name, private: true, members: b.uid })).status).toBe(3);
    expect((await a.client.request("createchannel", { name, private: true, members: [5] })).status).toBe(3);
    expect((await a.client.request("createchannel", { name, private: true, members: [""] })).status).toBe(4);
    expect((await a.client.request("createchannel", { name, private: "yes" })).status).toBe(3);
    const mine = (await a.client.request("channellist", { limit: 500 })).channels;
    expect(mine.filter((c: any) => c.name === name)).toEqual([]);
    // private: false is a public channel, as before
    expect((await a.client.request("createchannel", { name, private: false })).status).toBe(0);
    await closeAll(a.client, b.client);
  });

  it("is listed (with private: true) to its members only, and in their dialogs only", async () => {
    const [a, b, stranger] = [await registerUser(shared.port), await registerUser(shared.port), await registerUser(shared.port)];
    const { chid, name } = await newPrivate(a, [b]);
    const pub = (await a.client.request("createchannel", { name: uniqueName("open") })).chid;
    expect(await listed(a.client, chid)).toEqual({ chid, name, descr: "members only", online: 2, private: true });
    expect(await listed(b.client, chid)).toEqual({ chid, name, descr: "members only", online: 2, private: true });
    expect(await listed(stranger.client, chid)).toBeUndefined();
    // public channels keep their shape
    expect(Object.keys(await listed(stranger.client, pub)).sort()).toEqual(["chid", "descr", "name", "online"]);
    expect((await a.client.request("message", { channel: chid, body: "hush" })).status).toBe(0);
    const dialogs = async (u: Account) => (await u.client.request("dialogs")).dialogs.filter((d: any) => d.chid === chid);
    expect(await dialogs(b)).toEqual([{ chid, name, last: expect.objectContaining({ body: "hush" }) }]);
    expect(await dialogs(stranger)).toEqual([]);
    await closeAll(a.client, b.client, stranger.client);
  });

  it("is paged with the public channels in chid order", async () => {
    const [a, b] = [await registerUser(shared.port), await registerUser(shared.port)];
    const made: string[] = [];
    for (let i = 0; i < 6; i++) {
      const r =
        i % 2 === 0
          ? await a.client.request("createchannel", { name: uniqueName("mix"), private: true, members: [b.uid] })
          : await a.client.request("createchannel", { name: uniqueName("mix") });
      made.push(r.chid);
    }
    const whole = (await b.client.request("channellist", { limit: 500 })).channels.map((c: any) => c.chid);
    expect(whole).toEqual([...whole].sort());
    for (const chid of made) expect(whole).toContain(chid);
    const paged: string[] = [];
    let after: string | undefined;
    for (;;) {
      const r = await b.client.request("channellist", after === undefined ? { limit: 2 } : { limit: 2, after });
      expect(r.channels.length).toBeLessThanOrEqual(2);
      if (r.channels.length === 0) break;
      paged.push(...r.channels.map((c: any) => c.chid));
      after = r.channels[r.channels.length - 1].chid;
    }
    expect(paged).toEqual(whole);
    await closeAll(a.client, b.client);
  });
});

describe("a private channel and a non-member", () => {
  it("refuses enter, history, message, leave and invite with 10, deletechannel with 15", async () => {
    const [a, b, stranger] = [await registerUser(shared.port), await registerUser(shared.port), await registerUser(shared.port)];
    const { chid } = await newPrivate(a, [b]);
    expect((await a.client.request("message", { channel: chid, body: "not for strangers" })).status).toBe(0);
    const s = stranger.client;
    expect(await s.request("enter", { channel: chid })).toEqual({ status: 10, error: `channel '${chid}' is private: only its members can enter it` });
    expect(await s.request("history", { channel: chid })).toEqual({ status: 10, error: `you are not a member of channel '${chid}'` });
    expect((await s.request("message", { channel: chid, body: "let me in" })).status).toBe(10);
    expect((await s.request("leave", { channel: chid })).status).toBe(10);
    expect((await s.request("invite", { channel: chid, uid: stranger.uid })).status).toBe(10);
    expect((await s.request("deletechannel", { channel: chid })).status).toBe(15);
    // and still not a member, nothing heard
    expect(await listed(s, chid)).toBeUndefined();
    expect(await s.quiet(200, (f) => f.action === "ev_message" || f.action === "ev_enter")).toBe(true);
    const members = (await a.client.request("enter", { channel: chid })).users.map((u: any) => u.uid);
    expect(members).toEqual([a.uid, b.uid].sort());
    await closeAll(a.client, b.client, s);
  });

  it("a member who left is a non-member again; the owner may come back", async () => {
    const [a, b] = [await registerUser(shared.port), await registerUser(shared.port)];
    const { chid } = await newPrivate(a, [b]);
    expect((await b.client.request("leave", { channel: chid })).status).toBe(0);
    expect(await a.client.event("ev_leave")).toEqual({ chid, uid: b.uid, nick: b.nick });
    expect(await listed(b.client, chid)).toBeUndefined();
    expect((await b.client.request("enter", { channel: chid })).status).toBe(10);
    expect((await a.client.request("leave", { channel: chid })).status).toBe(0);
    expect(await listed(a.client, chid)).toBeUndefined();
    const back = await a.client.request("enter", { channel: chid });
    expect(back).toMatchObject({ status: 0, users: [{ uid: a.uid, nick: a.nick, online: true }] });
    expect(await a.client.event("ev_enter")).toEqual({ chid, uid: a.uid, nick: a.nick });
    expect((await listed(a.client, chid)).private).toBe(true);
    await closeAll(a.client, b.client);
  });
});

describe("invite", () => {
  it("by any member adds the user: every member gets ev_enter, the invitee then gets the channel's messages", async () => {
    const [a, b, c] = [await registerUser(shared.port), await registerUser(shared.port), await registerUser(shared.port)];
    const { chid, name } = await newPrivate(a, [b]);
    await b.client.event("ev_enter");
    expect((await a.client.request("message", { channel: chid, body: "before c" })).status).toBe(0);
    // b, a member who is not the owner, invites c
    expect(await b.client.request("invite", { channel: chid, uid: c.uid })).toEqual({ status: 0, error: "OK" });
    for (const u of [a, b, c]) expect(await u.client.event("ev_enter")).toEqual({ chid, uid: c.uid, nick: c.nick });
    expect(await listed(c.client, chid)).toMatchObject({ chid, name, private: true });
    const sent = await a.client.request("message", { channel: chid, body: "welcome c" });
    expect(await c.client.event("ev_message", (d) => d.mid === sent.mid)).toMatchObject({ chid, from: a.uid, body: "welcome c" });
    expect((await c.client.request("history", { channel: chid })).messages.map((m: any) => m.body)).toEqual(["before c", "welcome c"]);
    // a second invite changes nothing and tells nobody
    expect((await a.client.request("invite", { channel: chid, uid: c.uid })).status).toBe(0);
    expect(await c.client.quiet(200, (f) => f.action === "ev_enter")).toBe(true);
    await closeAll(a.client, b.client, c.client);
  });

  it("answers 8, 9, 4 and 6, and works in a public channel too", async () => {
    const [a, b] = [await registerUser(shared.port), await registerUser(shared.port)];
    const { chid } = await newPrivate(a, []);
    expect(await a.client.request("invite", { channel: chid, uid: "000000000000" })).toEqual({ status: 8, error: "no user with uid '000000000000'" });
    expect(await a.client.request("invite", { channel: "999999", uid: b.uid })).toEqual({ status: 9, error: "no channel with id '999999'" });
    expect((await a.client.request("invite", { channel: chid })).status).toBe(4);
    expect((await a.client.request("invite", { uid: b.uid })).status).toBe(4);
    const anon = await Client.connect(shared.port);
    expect((await anon.request("invite", { channel: chid, uid: b.uid })).status).toBe(6);
    const pub = (await a.client.request("createchannel", { name: uniqueName("open") })).chid;
    expect((await a.client.request("invite", { channel: pub, uid: b.uid })).status).toBe(0);
    expect(await b.client.event("ev_enter")).toEqual({ chid: pub, uid: b.uid, nick: b.nick });
    expect((await b.client.request("history", { channel: pub })).status).toBe(0);
    await closeAll(a.client, b.client, anon);
  });

  it("reaches every device of the invitee", async () => {
    const [a, b] = [await registerUser(shared.port), await registerUser(shared.port)];
    const b2 = await login(shared.port, b.login);
    const { chid } = await newPrivate(a, []);
    expect((await a.client.request("invite", { channel: chid, uid: b.uid })).status).toBe(0);
    expect(await b.client.event("ev_enter")).toMatchObject({ chid, uid: b.uid });
    expect(await b2.client.event("ev_enter")).toMatchObject({ chid, uid: b.uid });
    await closeAll(a.client, b.client, b2.client);
  });
});

describe("a member's leave racing their own enter", () => {
  it("an enter that saw the member before a leave from their other connection committed is refused (10), not a new entry", async () => {
    const owner = await registerUser(shared.port);
    const u = await registerUser(shared.port);
    const u2 = await login(shared.port, u.login);
    const { chid } = await newPrivate(owner, [u]);
    await u.client.event("ev_enter", (d) => d.chid === chid);
    // The enter's own check reads "member"; its join's first read waits until the leave
    // from the other connection is answered.
    const gate = heldGate();
    let reads = 0;
    const undo = wrapCalls(shared.server.services.channels, "isMember", async (c: string, uid: string) => {
      if (c === chid && uid === u.uid && ++reads === 2) await gate.pass();
    });
    try {
      u.client.send("enter", { channel: chid });
      await gate.reached;
      expect((await u2.client.request("leave", { channel: chid })).status).toBe(0);
      gate.open();
      // Neither order of the two requests makes them a member again.
      expect((await u.client.reply("enter")).data.status).toBe(10);
    } finally {
      undo();
      gate.open();
    }
    expect(await owner.client.quiet(150, (f) => f.action === "ev_enter" && f.data.uid === u.uid)).toBe(true);
    expect((await u.client.request("message", { channel: chid, body: "still in?" })).status).toBe(10);
    await closeAll(owner.client, u.client, u2.client);
  });
});

describe("private channel names", () => {
  it("are not unique and neither take nor block a public name", async () => {
    const [a, b] = [await registerUser(shared.port), await registerUser(shared.port)];
    const name = uniqueName("Shared");
    const first = await newPrivate(a, [], name);
    const second = await newPrivate(b, [], name.toUpperCase());
    expect(second.chid).not.toBe(first.chid);
    const pub = await a.client.request("createchannel", { name: name.toLowerCase() });
    expect(pub.status).toBe(0);
    // the public name is taken now, for public channels only
    expect((await b.client.request("createchannel", { name })).status).toBe(1);
    expect((await newPrivate(b, [], name)).chid).not.toBe(pub.chid);
    // the owner deletes a private channel: its members hear it, the chid is gone
    const gone = await newPrivate(a, [b], name);
    await b.client.event("ev_enter", (d) => d.chid === gone.chid);
    expect((await a.client.request("deletechannel", { channel: gone.chid })).status).toBe(0);
    expect(await b.client.event("ev_channel_deleted")).toEqual({ chid: gone.chid });
    expect(await listed(b.client, gone.chid)).toBeUndefined();
    expect((await b.client.request("history", { channel: gone.chid })).status).toBe(9);
    expect((await a.client.request("createchannel", { name })).status).toBe(1);
    await closeAll(a.client, b.client);
  });
});

describe("private channels across a restart", () => {
  it("keep their flag, members and messages; a deleted owner takes theirs along", async () => {
    const config = testConfig();
    let server = await startServer(config);
    try {
      const [a, b, c] = [await registerUser(server.port), await registerUser(server.port), await registerUser(server.port)];
      const { chid, name } = await newPrivate(a, [b]);
      expect((await b.client.request("message", { channel: chid, body: "kept" })).status).toBe(0);
      await closeAll(a.client, b.client, c.client);
      await server.stop();

      server = await startServer({ ...config, port: 0 });
      const [a2, b2, c2] = await Promise.all([a, b, c].map((u) => login(server.port, u.login)));
      expect(await listed(b2.client, chid)).toEqual({ chid, name, descr: "members only", online: 2, private: true });
      expect(await listed(c2.client, chid)).toBeUndefined();
      expect((await c2.client.request("enter", { channel: chid })).status).toBe(10);
      expect((await b2.client.request("history", { channel: chid })).messages.map((m: any) => m.body)).toEqual(["kept"]);
      expect((await b2.client.request("enter", { channel: chid })).users.map((u: any) => u.uid)).toEqual([a.uid, b.uid].sort());
      // the owner's account goes: the channel goes with it
      expect((await a2.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      expect(await b2.client.event("ev_channel_deleted")).toEqual({ chid });
      expect(await listed(b2.client, chid)).toBeUndefined();
      const { privchans, privof } = server.services.storage.spaces;
      expect(await privchans.get(chid)).toBeUndefined();
      expect(await privof.get(`${b.uid}!${chid}`)).toBeUndefined();
      await closeAll(a2.client, b2.client, c2.client);
    } finally {
      await server.stop();
      removeDir(config.dataDir);
    }
  });
});

describe("caps and the door API", () => {
  it("others cannot fill a user's memberships: the last tenth of --max-joined-channels is the user's own", async () => {
    const config = testConfig({ maxJoinedChannels: 10 });
    const server = await startServer(config);
    try {
      const [victim, x, y] = [await registerUser(server.port), await registerUser(server.port), await registerUser(server.port)];
      // Nine private channels made with the victim as a member (by two accounts), then
      // both ways of adding a tenth are refused.
      for (let i = 0; i < 9; i++) {
        const by = i % 2 === 0 ? x : y;
        expect((await by.client.request("createchannel", { name: uniqueName("junk"), private: true, members: [victim.uid] })).status).toBe(0);
      }
      const refusal = `user '${victim.uid}' is a member of at least 9 channels, the most others may add them to (they may still join more themselves)`;
      expect(await x.client.request("createchannel", { name: uniqueName("junk"), private: true, members: [victim.uid] })).toEqual({ status: 13, error: refusal });
      const { chid } = await newPrivate(y, [x]);
      expect(await y.client.request("invite", { channel: chid, uid: victim.uid })).toEqual({ status: 13, error: refusal });
      // The victim still enters a public channel of their choice, and then is at the cap;
      // an invite sent alongside (refused by the cap others may fill) does not refuse it.
      const open = await x.client.request("createchannel", { name: uniqueName("pub") });
      const [invited, entered] = await Promise.all([
        x.client.request("invite", { channel: open.chid, uid: victim.uid }),
        victim.client.request("enter", { channel: open.chid }),
      ]);
      expect(entered.status).toBe(0);
      expect([0, 13]).toContain(invited.status);
      expect(await victim.client.request("createchannel", { name: uniqueName("mine") })).toEqual({
        status: 13,
        error: "you are a member of 10 channels, the most one user may; leave one first",
      });
      await closeAll(victim.client, x.client, y.client);
    } finally {
      await server.stop();
      removeDir(config.dataDir);
    }
  });

  it("a member at the cap others may fill refuses creation and invite with 13; ChannelOps does as the actions do", async () => {
    // --max-joined-channels 3: others may add a user to 2 channels (othersJoinCap).
    const config = testConfig({ maxJoinedChannels: 3 });
    const server = await startServer(config);
    try {
      const [a, b, c] = [await registerUser(server.port), await registerUser(server.port), await registerUser(server.port)];
      for (let i = 0; i < 2; i++) expect((await b.client.request("createchannel", { name: uniqueName("own") })).status).toBe(0);
      const full = await a.client.request("createchannel", { name: uniqueName("p"), private: true, members: [b.uid] });
      expect(full).toEqual({ status: 13, error: `user '${b.uid}' is a member of at least 2 channels, the most others may add them to (they may still join more themselves)` });
      const { chid } = await newPrivate(a, [c]);
      expect((await a.client.request("invite", { channel: chid, uid: b.uid })).status).toBe(13);
      expect(await server.channelOps.isMember(chid, b.uid)).toBe(false);

      // the same through ChannelOps, as a door would call it
      const made = await server.channelOps.create(c.uid, { name: "door room", private: true, members: [a.uid] });
      expect(made).toMatchObject({ name: "door room", owner: c.uid, private: true });
      expect(await a.client.event("ev_enter", (d) => d.chid === made.chid)).toEqual({ chid: made.chid, uid: a.uid, nick: a.nick });
      expect(await server.channelOps.isMember(made.chid, a.uid)).toBe(true);
      await expect(server.channelOps.create(c.uid, { name: "" })).rejects.toMatchObject({ code: 4 });
      await expect(server.channelOps.invite(b.uid, made.chid, b.uid)).rejects.toMatchObject({ code: 10 });
      expect((await b.client.request("leave", { channel: "*" })).status).toBe(0);
      expect(await server.channelOps.invite(a.uid, made.chid, b.uid)).toBe(true);
      expect(await b.client.event("ev_enter", (d) => d.chid === made.chid)).toEqual({ chid: made.chid, uid: b.uid, nick: b.nick });
      expect(await server.channelOps.invite(a.uid, made.chid, b.uid)).toBe(false);
      await closeAll(a.client, b.client, c.client);
    } finally {
      await server.stop();
      removeDir(config.dataDir);
    }
  });
});
