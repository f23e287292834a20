// A deleted channel's purge racing edits of its messages: every message is gone once
// the purge is done. The purge used to read and delete pages without the conversation's
// lock that edits and deletes hold from their read to their write, so an edit in flight
// wrote its record back into the log (then editable and deletable by mid, status 0,
// with no history entry).
import { describe, expect, it } from "vitest";
import { channelConv, prefixRange } from "../src/storage/layout.js";
import { readEntries } from "../src/storage/range.js";
import { login, registerUser, serveForFile, startTestServer, tempDir, uniqueName } from "./helpers.js";
import { sleep, waitFor } from "./pipeline-helpers.js";

const shared = serveForFile();

describe("purge vs editmessage", () => {
  it("no purged message is left in the log", async () => {
    const a = await registerUser(shared.port);
    const chid = (await a.client.request("createchannel", { name: uniqueName("pg"), descr: "" })).chid;
    const mids: string[] = [];
    // one history chunk per message: each delete of a waiting message writes its generation
    for (let i = 0; i < 64; i++) {
      mids.push((await a.client.request("message", { channel: chid, body: `keep ${i}` })).mid);
      const x = (await a.client.request("message", { channel: chid, body: `x ${i}` })).mid;
      expect((await a.client.request("delmessage", { mid: x })).status).toBe(0);
    }
    const devices = await Promise.all([0, 1, 2, 3].map(async () => (await login(shared.port, a.login)).client));
    a.client.send("deletechannel", { channel: chid });
    // edits of every message while the purge runs, four at a time
    const edits = devices.map(async (d, k) => {
      for (let i = mids.length - 1 - k; i >= 0; i -= devices.length) await d.request("editmessage", { mid: mids[i], body: `edited ${i}` });
    });
    expect((await a.client.reply("deletechannel")).data.status).toBe(0);
    await Promise.all(edits);
    await new Promise((r) => setTimeout(r, 3000)); // the purge is long done
    const back: string[] = [];
    for (const mid of mids) {
      const r = await devices[0].request("editmessage", { mid, body: "still there?" });
      if (r.status !== 14) back.push(`${mid}: ${r.status}`);
    }
    expect(back).toEqual([]);
    for (const c of [a.client, ...devices]) c.close();
  });
});

describe("purge vs history entries not yet written", () => {
  it("an entry its purge could not see on disk is purged at the next start, not left behind with its cmid taken", async () => {
    const dir = tempDir();
    let s = await startTestServer({ dataDir: dir });
    let conv = "";
    try {
      const a = await registerUser(s.port);
      const b = await registerUser(s.port);
      const chid = (await a.client.request("createchannel", { name: uniqueName("pg"), descr: "" })).chid;
      const sent = await a.client.request("message", { channel: chid, body: "one", cmid: "purged-1" });
      conv = channelConv(chid);
      const store = s.services.messages as unknown as { histInMemory(conv: string): number[]; histOnDisk: (conv: string, seq: number) => Promise<void> };
      expect(store.histInMemory(conv)).toEqual([Number(sent.mid)]);
      // Gives up at once, as it does after rounds of failing writes.
      store.histOnDisk = async () => {};
      expect((await a.client.request("deletechannel", { channel: chid })).status).toBe(0);
      await waitFor(() => store.histInMemory(conv).length === 0, 10_000, "the history entry written");
      await s.services.dispatcher.idle(2000);
      await sleep(300);
      a.client.close();
      b.client.close();
      await s.stop();
      s = await startTestServer({ dataDir: dir });
      const chunks = () => readEntries(s.services.storage.spaces.hist, prefixRange(conv));
      for (let i = 0; i < 50 && (await chunks()).length > 0; i++) await sleep(100);
      expect(await chunks()).toEqual([]);
      // Its cmid is free: the same cmid is a new message.
      const again = await login(s.port, a.login);
      const next = await again.client.request("message", { uid: b.uid, body: "new", cmid: "purged-1" });
      expect(next.status).toBe(0);
      expect(next.mid).not.toBe(sent.mid);
      again.client.close();
    } finally {
      await s.stop();
    }
  });
});
