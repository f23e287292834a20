// Hostile clients (issue 9): `dialogs` and `channellist` answer from bounded, paged
// range reads of indexes that stay right after new messages, deletions, restarts,
// crashes and a layout upgrade; one user cannot own or join unlimited channels.
// Every test talks to a real server over TCP.
import path from "node:path";
import { Level } from "level";
import { describe, expect, it } from "vitest";
import { startServer } from "../src/server.js";
import { openSpaces } from "../src/storage/layout.js";
import { ChildServer, Client, registerUser, serveForFile, testConfig, uniqueName, useTempDirs, type Account } from "./helpers.js";

// 105 peers of one user connect at once: more than the default per-address cap.
const shared = serveForFile({ maxPerAddress: 1000 });
const capped = serveForFile({ maxOwnedChannels: 3, maxJoinedChannels: 5 });
const newDataDir = useTempDirs();

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

async function say(from: Account, to: { uid?: string; channel?: string }, body: string): Promise<string> {
  const r = await from.client.request("message", { ...to, body });
  expect(r.status).toBe(0);
  return r.mid;
}

/** The ids of a dialogs page, in order. */
async function dialogIds(who: Client, data: Record<string, unknown> = {}): Promise<string[]> {
  const r = await who.request("dialogs", data);
  expect(r.status).toBe(0);
  return r.dialogs.map((d: any) => d.uid ?? d.chid);
}

/** Every dialog of `who`, walked `limit` at a time with `before`. */
async function walkDialogs(who: Client, limit: number): Promise<{ ids: string[]; pages: number[] }> {
  const ids: string[] = [];
  const pages: number[] = [];
  let before: string | undefined;
  for (;;) {
    const r = await who.request("dialogs", before === undefined ? { limit } : { limit, before });
    expect(r.status).toBe(0);
    if (r.dialogs.length === 0) return { ids, pages };
    pages.push(r.dialogs.length);
    for (const d of r.dialogs) ids.push(d.uid ?? d.chid);
    before = r.dialogs[r.dialogs.length - 1].last.mid;
  }
}

describe("dialogs is paged", () => {
  it("honours limit and before: every conversation once, newest first, pages of at most limit", async () => {
    const a = await registerUser(shared.port);
    const peers: Account[] = [];
    for (let i = 0; i < 12; i++) peers.push(await registerUser(shared.port));
    const expected: string[] = [];
    const chid = (await a.client.request("createchannel", { name: uniqueName("pg") })).chid;
    for (let i = 0; i < peers.length; i++) {
      // some conversations are started by the peer, some by a
      if (i % 2 === 0) await say(a, { uid: peers[i].uid }, `to ${i}`);
      else await say(peers[i], { uid: a.uid }, `from ${i}`);
      expected.unshift(peers[i].uid);
      if (i === 5) {
        await say(a, { channel: chid }, "in the channel");
        expected.unshift(chid);
      }
    }
    expect(await dialogIds(a.client)).toEqual(expected);
    const walked = await walkDialogs(a.client, 5);
    expect(walked.ids).toEqual(expected);
    expect(walked.pages).toEqual([5, 5, 3]);
    // a page in the middle, and a limit past the largest is the largest
    expect(await dialogIds(a.client, { limit: 2, before: (await a.client.request("dialogs", { limit: 3 })).dialogs[2].last.mid })).toEqual(
      expected.slice(3, 5),
    );
    expect((await dialogIds(a.client, { limit: 100000 })).length).toBe(13);
    for (const bad of [{ limit: 0 }, { limit: "5" }, { before: "abc" }, { before: 5 }]) {
      expect((await a.client.request("dialogs", bad)).status).toBe(3);
    }
    await closeAll(a.client, ...peers.map((p) => p.client));
  });

  it("answers at most 100 conversations by default", async () => {
    const a = await registerUser(shared.port);
    const peers = await Promise.all(Array.from({ length: 105 }, () => registerUser(shared.port)));
    for (const p of peers) p.client.send("message", { uid: a.uid, body: "hi" });
    for (const p of peers) expect((await p.client.reply("message")).data.status).toBe(0);
    const first = await a.client.request("dialogs");
    expect(first.dialogs.length).toBe(100);
    const rest = await a.client.request("dialogs", { before: first.dialogs[99].last.mid });
    expect(rest.dialogs.length).toBe(5);
    expect(new Set([...first.dialogs, ...rest.dialogs].map((d: any) => d.uid))).toEqual(new Set(peers.map((p) => p.uid)));
    await closeAll(a.client, ...peers.map((p) => p.client));
  });
});

describe("the dialogs index", () => {
  it("follows new messages and deletions at once, and keeps its order over a restart", async () => {
    const config = testConfig({ dataDir: newDataDir() });
    let server = await startServer(config);
    const a = await registerUser(server.port);
    const [b, c, d] = [await registerUser(server.port), await registerUser(server.port), await registerUser(server.port)];
    const toB = await say(a, { uid: b.uid }, "to b");
    const toC = await say(a, { uid: c.uid }, "to c");
    await say(a, { uid: d.uid }, "to d");
    await say(a, { uid: a.uid }, "note to self");
    expect(await dialogIds(a.client)).toEqual([a.uid, d.uid, c.uid, b.uid]);
    // an answer moves its conversation to the top, on both sides, at once
    const fromB = await say(b, { uid: a.uid }, "b answers");
    expect(await dialogIds(a.client)).toEqual([b.uid, a.uid, d.uid, c.uid]);
    expect(await dialogIds(b.client)).toEqual([a.uid]);
    // deleting the newest message puts the conversation back where its last one is
    expect((await b.client.request("delmessage", { mid: fromB })).status).toBe(0);
    const after = await a.client.request("dialogs");
    expect(after.dialogs.map((x: any) => x.uid)).toEqual([a.uid, d.uid, c.uid, b.uid]);
    expect(after.dialogs[3].last.mid).toBe(toB);
    // a conversation whose every message is deleted leaves the list
    expect((await a.client.request("delmessage", { mid: toC })).status).toBe(0);
    expect(await dialogIds(a.client)).toEqual([a.uid, d.uid, b.uid]);
    expect(await dialogIds(c.client)).toEqual([]);
    // the same pages, read from disk after a restart
    await closeAll(a.client, b.client, c.client, d.client);
    await server.stop();
    server = await startServer({ ...config, port: 0 });
    const again = await Client.connect(server.port);
    expect((await again.request("auth", { sid: a.sid })).status).toBe(0);
    expect(await dialogIds(again)).toEqual([a.uid, d.uid, b.uid]);
    expect(await dialogIds(again, { limit: 1, before: toB })).toEqual([]);
    // a message after the restart moves its entry (the old one does not linger)
    const dc = await Client.connect(server.port);
    expect((await dc.request("auth", { sid: d.sid })).status).toBe(0);
    expect((await dc.request("message", { uid: a.uid, body: "d again" })).status).toBe(0);
    expect((await walkDialogs(again, 1)).ids).toEqual([d.uid, a.uid, b.uid]);
    // a deleted account's conversations stay in the other side's list, under the nick
    // of its last message
    expect((await dc.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    const left = (await again.request("dialogs")).dialogs;
    expect(left.map((x: any) => x.uid)).toEqual([d.uid, a.uid, b.uid]);
    expect(left[0]).toMatchObject({ nick: d.nick, last: { body: "d again" } });
    await closeAll(again, dc);
    await server.stop();
  });

  it("is rebuilt from the log after kill -9", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const a = await registerUser(child.port);
    const peers = [await registerUser(child.port), await registerUser(child.port), await registerUser(child.port)];
    // a burst the lazy index cannot have written before the kill
    for (let i = 0; i < 30; i++) a.client.send("message", { uid: peers[i % 3].uid, body: `m${i}` });
    for (let i = 0; i < 30; i++) expect((await a.client.reply("message")).data.status).toBe(0);
    child.proc.kill("SIGKILL");
    await child.exited;
    child = await ChildServer.start(dataDir);
    const c = await Client.connect(child.port);
    expect((await c.request("auth", { sid: a.sid })).status).toBe(0);
    const r = await c.request("dialogs");
    expect(r.dialogs.map((x: any) => x.uid)).toEqual([peers[2].uid, peers[1].uid, peers[0].uid]);
    expect(r.dialogs.map((x: any) => x.last.body)).toEqual(["m29", "m28", "m27"]);
    c.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  });

  it("is built at start-up for a database of layout 2", async () => {
    const config = testConfig({ dataDir: newDataDir(), maxOwnedChannels: 2 });
    let server = await startServer(config);
    const a = await registerUser(server.port);
    const [b, c] = [await registerUser(server.port), await registerUser(server.port)];
    await say(a, { uid: c.uid }, "first");
    await say(b, { uid: a.uid }, "second");
    const chid = (await a.client.request("createchannel", { name: uniqueName("old") })).chid;
    expect((await a.client.request("createchannel", { name: uniqueName("old") })).status).toBe(0);
    await say(a, { channel: chid }, "third");
    await say(c, { uid: a.uid }, "fourth");
    const before = (await a.client.request("dialogs")).dialogs;
    expect(before.map((x: any) => x.uid ?? x.chid)).toEqual([c.uid, chid, b.uid]);
    await closeAll(a.client, b.client, c.client);
    await server.stop();

    // What a layout-2 server left: no dialogs index, no owned-channels index.
    const db = new Level<string, string>(path.join(config.dataDir, "db"), { keyEncoding: "utf8", valueEncoding: "utf8" });
    await db.open();
    const spaces = openSpaces(db);
    for (const name of ["dialogs", "dialogat", "owned"] as const) await spaces[name].clear();
    await spaces.meta.put("layout", 2);
    await db.close();

    server = await startServer({ ...config, port: 0 });
    const again = await Client.connect(server.port);
    expect((await again.request("auth", { sid: a.sid })).status).toBe(0);
    expect((await again.request("dialogs")).dialogs).toEqual(before);
    // the channels a owned before the upgrade count against the cap
    const over = await again.request("createchannel", { name: uniqueName("new") });
    expect(over.status).toBe(13);
    expect((await again.request("deletechannel", { channel: chid })).status).toBe(0);
    expect((await again.request("createchannel", { name: uniqueName("new") })).status).toBe(0);
    await closeAll(again);
    await server.stop();
  });
});

describe("a deleted account's derived entries", () => {
  it("are not written back by a generation prepared before the deletion", async () => {
    // The generation holding b's inbox entry and dialog pointers reads the old pointers
    // (dialogat) before it writes; that read is held until b has asked to be deleted.
    // Before the fix the deletion removed what was on disk and the generation then
    // wrote b's entries back: keys of a user who no longer exists.
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const spaces = shared.server.services.storage.spaces;
    const dialogat = spaces.dialogat as unknown as { getMany: (...args: unknown[]) => Promise<unknown> };
    const getMany = dialogat.getMany.bind(dialogat);
    let reading!: () => void;
    const readStarted = new Promise<void>((r) => (reading = r));
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    dialogat.getMany = async (...args: unknown[]) => {
      reading();
      await released;
      return getMany(...args);
    };
    try {
      await say(a, { uid: b.uid }, "to b, who is about to go");
      await readStarted; // within the derived delay (a second)
      const deleting = b.client.request("deleteaccount", { pass: "secret" });
      setTimeout(release, 200);
      expect((await deleting).status).toBe(0);
    } finally {
      delete (dialogat as { getMany?: unknown }).getMany;
      release();
    }
    await shared.server.services.storage.settle();
    for (const space of [spaces.inbox, spaces.cmids, spaces.dialogs, spaces.dialogat]) {
      expect(await space.keys({ gte: `${b.uid}!`, lt: `${b.uid}!\uffff` }).all()).toEqual([]);
    }
    expect(await spaces.cursor.get(b.uid)).toBeUndefined();
    // a keeps the conversation (messages stay in others' history).
    expect(await dialogIds(a.client)).toContain(b.uid);
    await closeAll(a.client, b.client);
  });
});

describe("channellist is paged", () => {
  it("honours limit and after: every channel once, pages of at most limit, 100 by default", async () => {
    const owners = [await registerUser(shared.port), await registerUser(shared.port)];
    const made = new Set<string>();
    for (let i = 0; i < 105; i++) {
      const r = await owners[i % 2].client.request("createchannel", { name: uniqueName("list") });
      expect(r.status).toBe(0);
      made.add(r.chid);
    }
    const reader = owners[0].client;
    expect((await reader.request("channellist")).channels.length).toBe(100);
    const seen: string[] = [];
    let after: string | undefined;
    for (;;) {
      const r = await reader.request("channellist", after === undefined ? { limit: 40 } : { limit: 40, after });
      expect(r.status).toBe(0);
      expect(r.channels.length).toBeLessThanOrEqual(40);
      if (r.channels.length === 0) break;
      for (const ch of r.channels) {
        expect(Object.keys(ch).sort()).toEqual(["chid", "descr", "name", "online"]);
        seen.push(ch.chid);
      }
      after = r.channels[r.channels.length - 1].chid;
    }
    expect(new Set(seen).size).toBe(seen.length);
    for (const chid of made) expect(seen).toContain(chid);
    // a deleted channel is not listed; `after` may name one
    const gone = [...made][50];
    expect((await owners[50 % 2].client.request("deletechannel", { channel: gone })).status).toBe(0);
    const page = await reader.request("channellist", { limit: 500, after: gone });
    expect(page.channels.map((c: any) => c.chid)).toEqual(seen.slice(seen.indexOf(gone) + 1));
    for (const bad of [{ limit: 0 }, { after: 5 }, { after: "" }]) expect((await reader.request("channellist", bad)).status).not.toBe(0);
    await closeAll(...owners.map((o) => o.client));
  });
});

describe("channel caps", () => {
  it("refuses a channel past --max-owned-channels with 13, also when created concurrently", async () => {
    const a = await registerUser(capped.port);
    for (let i = 0; i < 6; i++) a.client.send("createchannel", { name: uniqueName("cap") });
    const replies = [];
    for (let i = 0; i < 6; i++) replies.push((await a.client.reply("createchannel")).data);
    const made = replies.filter((r) => r.status === 0).map((r) => r.chid);
    expect(made.length).toBe(3);
    for (const r of replies.filter((r) => r.status !== 0)) {
      expect(r.status).toBe(13);
      expect(r.error).toMatch(/own 3 channels/);
    }
    // leaving does not free an owned slot; deleting does
    expect((await a.client.request("leave", { channel: made[0] })).status).toBe(0);
    expect((await a.client.request("createchannel", { name: uniqueName("cap") })).status).toBe(13);
    expect((await a.client.request("deletechannel", { channel: made[0] })).status).toBe(0);
    expect((await a.client.request("createchannel", { name: uniqueName("cap") })).status).toBe(0);
    // another user is not affected
    const b = await registerUser(capped.port);
    expect((await b.client.request("createchannel", { name: uniqueName("cap") })).status).toBe(0);
    await closeAll(a.client, b.client);
  });

  it("refuses an enter past --max-joined-channels with 13; leaving frees a place", async () => {
    const owners = [await registerUser(capped.port), await registerUser(capped.port)];
    const chids: string[] = [];
    for (let i = 0; i < 6; i++) chids.push((await owners[i % 2].client.request("createchannel", { name: uniqueName("join") })).chid);
    const u = await registerUser(capped.port);
    for (const chid of chids) u.client.send("enter", { channel: chid });
    const replies = [];
    for (let i = 0; i < chids.length; i++) replies.push((await u.client.reply("enter")).data);
    expect(replies.filter((r) => r.status === 0).length).toBe(5);
    const refused = replies.filter((r) => r.status !== 0);
    expect(refused.length).toBe(1);
    expect(refused[0].status).toBe(13);
    // entering a channel one is already in is not a new membership
    const inside = chids[replies.findIndex((r) => r.status === 0)];
    expect((await u.client.request("enter", { channel: inside })).status).toBe(0);
    // a member of 5 cannot create one either (the owner is its first member)
    expect((await u.client.request("createchannel", { name: uniqueName("join") })).status).toBe(13);
    expect((await u.client.request("leave", { channel: inside })).status).toBe(0);
    const outside = chids[replies.findIndex((r) => r.status !== 0)];
    expect((await u.client.request("enter", { channel: outside })).status).toBe(0);
    await closeAll(u.client, ...owners.map((o) => o.client));
  });
});
