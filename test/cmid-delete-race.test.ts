// A resend with a cmid racing the delete of the message that holds it: either outcome
// is fine for the racing resend, but once both have answered, a resend with that cmid
// stores a message (PROTOCOL.md: once the original is deleted, "its cmid is free
// again"). A cmid read from disk just before the delete's batch was written used to be
// remembered in memory, and later resends were answered with the deleted mid: the
// client saw status 0 for a message that was never stored.
import { describe, expect, it } from "vitest";
import { startServer } from "../src/server.js";
import { login, registerUser, testConfig, useTempDirs } from "./helpers.js";
import { sleep, wrapBatchWrite } from "./pipeline-helpers.js";

const newDataDir = useTempDirs();

describe("cmid vs delmessage", () => {
  it("a resend well after the delete stores a new message", async () => {
    const config = testConfig({ dataDir: newDataDir() });
    let server = await startServer(config);
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    const n = 120;
    const mids: string[] = [];
    for (let i = 0; i < n; i++) mids.push((await a.client.request("message", { uid: b.uid, body: `m${i}`, cmid: `c${i}` })).mid);
    a.client.close();
    b.client.close();
    await server.stop();
    // After a restart the cmids are on disk only (nothing in memory).
    server = await startServer({ ...config, port: 0 });
    const d1 = (await login(server.port, a.login)).client;
    const d2 = (await login(server.port, a.login)).client;
    const d3 = (await login(server.port, a.login)).client;
    const stale: string[] = [];
    for (let i = 0; i < n; i++) {
      // device 1 deletes while device 2 resends: the resend may go either way
      d1.send("delmessage", { mid: mids[i] });
      // vary when the resend arrives (a few event-loop turns later, up to ~2 ms)
      const wait = i % 12;
      if (wait > 0) await new Promise((r) => setTimeout(r, wait / 6));
      d2.send("message", { uid: b.uid, body: `m${i}`, cmid: `c${i}` });
      expect((await d1.reply("delmessage")).data.status).toBe(0);
      const raced = (await d2.reply("message")).data;
      expect(raced.status).toBe(0);
      // once the delete has answered and the racing resend is done, a resend must store
      // a message that exists (the raced one if it stored anew, or a fresh one)
      const later = await d3.request("message", { uid: b.uid, body: `m${i}`, cmid: `c${i}` });
      expect(later.status).toBe(0);
      const h = (await d3.request("history", { uid: b.uid, limit: 500 })).messages.map((m: any) => m.mid);
      if (!h.includes(later.mid)) stale.push(`c${i}: resend answered deleted mid ${later.mid}`);
    }
    expect(stale).toEqual([]);
    for (const c of [d1, d2, d3]) c.close();
    await server.stop();
  });

  it("a delete whose writes fail leaves the message's cmid in force: a resend is answered with the message, not stored again", async () => {
    const server = await startServer(testConfig({ dataDir: newDataDir() }));
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    const sent = await a.client.request("message", { uid: b.uid, body: "once", cmid: "k1" });
    expect(sent.status).toBe(0);
    // At once, while its cmid entry waits in memory for its generation: every write
    // fails, the generation's (which the delete waits for) and the delete's own.
    const restore = wrapBatchWrite(server.services.storage, async () => {
      throw new Error("the disk is full");
    });
    expect((await a.client.request("delmessage", { mid: sent.mid })).status).toBe(16);
    restore();
    // The generation goes out once writes work again.
    await sleep(1500);
    await server.services.messages.flushDerived();
    const again = await a.client.request("message", { uid: b.uid, body: "once", cmid: "k1" });
    expect(again).toMatchObject({ status: 0, mid: sent.mid });
    const h = (await a.client.request("history", { uid: b.uid, limit: 10 })).messages.map((m: any) => m.mid);
    expect(h).toEqual([sent.mid]);
    a.client.close();
    b.client.close();
    await server.stop();
  });
});
