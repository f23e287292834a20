// What a crash leaves behind is collected at the next start: attachment files written
// before their message's batch, and a deleted channel's messages whose purge was cut
// short.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { ChannelStore } from "../src/storage/channels.js";
import { Storage } from "../src/storage/db.js";
import { channelConv, prefixRange } from "../src/storage/layout.js";
import { MessageStore } from "../src/storage/messages.js";
import { readKeys } from "../src/storage/range.js";
import { UserStore } from "../src/storage/users.js";
import { login, registerUser, startTestServer, testConfig, useTempDirs } from "./helpers.js";
import { startServer } from "../src/server.js";

const newDataDir = useTempDirs();

function blobPath(dataDir: string, bytes: Buffer): string {
  const sha = createHash("sha256").update(bytes).digest("hex");
  return path.join(dataDir, "blobs", sha.slice(0, 2), sha);
}

async function until(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("orphans at start-up", () => {
  it("removes unused attachment files and finishes an interrupted channel purge, keeping what is used", async () => {
    const dataDir = newDataDir();
    let server = await startTestServer({ dataDir });
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    const chid = (await a.client.request("createchannel", { name: `orphans${process.pid}` })).chid;
    const kept = Buffer.from("kept attachment ".repeat(100));
    const inChannel = Array.from({ length: 40 }, (_, i) => Buffer.from(`channel attachment ${i} `.repeat(50)));
    expect((await a.client.request("message", { uid: b.uid, body: "", attach: { mime: "text/plain", data: kept.toString("base64") } })).status).toBe(0);
    for (const bytes of inChannel) {
      const r = await a.client.request("message", { channel: chid, body: "x", attach: { mime: "text/plain", data: bytes.toString("base64") } });
      expect(r.status).toBe(0);
    }
    a.client.close();
    b.client.close();
    await server.stop();

    // The crash: the channel's deletion committed, its purge never ran; an upload's
    // file was moved into place, its message's batch never written.
    const log = pino({ level: "silent" });
    const storage = await Storage.open(dataDir, log);
    const channels = new ChannelStore(storage, await storage.counter("chid"));
    const messages = new MessageStore(storage, await storage.counter("seq"), log);
    const c = (await channels.get(chid))!;
    await storage.commit([...channels.removeOps(c, await channels.members(chid)), ...messages.purgeMarkOps(channelConv(chid))]);
    await storage.close();
    const stray = Buffer.from("uploaded, never referenced");
    mkdirSync(path.dirname(blobPath(dataDir, stray)), { recursive: true });
    writeFileSync(blobPath(dataDir, stray), stray);
    for (const bytes of [kept, stray, ...inChannel]) expect(existsSync(blobPath(dataDir, bytes))).toBe(true);

    server = await startServer(testConfig({ dataDir }));
    try {
      const { hist, log: records, purges, blobrefs } = server.services.storage.spaces;
      const conv = channelConv(chid);
      await until("the purge is done", async () => (await readKeys(purges, {})).length === 0);
      expect(await readKeys(hist, prefixRange(conv))).toEqual([]);
      await until("the unused files are gone", () => [stray, ...inChannel].every((bytes) => !existsSync(blobPath(dataDir, bytes))));
      expect(existsSync(blobPath(dataDir, kept))).toBe(true);
      expect((await readKeys(blobrefs, {})).length).toBe(1);
      expect((await readKeys(records, {})).length).toBe(1);
      // The message that uses the kept file still carries it, byte for byte.
      const bAgain = await login(server.port, b.login);
      const history = await bAgain.client.request("history", { uid: a.uid });
      expect(history.messages.map((m: any) => m.attach?.data)).toEqual([kept.toString("base64")]);
      bAgain.client.close();
    } finally {
      await server.stop();
    }
  });
});

describe("deletechannel", () => {
  it("removes the files of its messages' attachments once their references are gone", async () => {
    const dataDir = newDataDir();
    const server = await startTestServer({ dataDir });
    try {
      const a = await registerUser(server.port);
      const chid = (await a.client.request("createchannel", { name: `purged${process.pid}` })).chid;
      const files = Array.from({ length: 40 }, (_, i) => Buffer.from(`attachment ${i} `.repeat(50)));
      for (const bytes of files) {
        const r = await a.client.request("message", { channel: chid, body: "", attach: { mime: "text/plain", data: bytes.toString("base64") } });
        expect(r.status).toBe(0);
      }
      expect(files.every((bytes) => existsSync(blobPath(dataDir, bytes)))).toBe(true);
      expect((await a.client.request("deletechannel", { channel: chid })).status).toBe(0);
      await until("the files are gone", () => files.every((bytes) => !existsSync(blobPath(dataDir, bytes))));
      a.client.close();
    } finally {
      await server.stop();
    }
  });
});

describe("an account deletion cut short before its hooks ran", () => {
  it("is finished at start-up: the channels it owned go, with their messages and files", async () => {
    const dataDir = newDataDir();
    let server = await startTestServer({ dataDir });
    const a = await registerUser(server.port);
    const b = await registerUser(server.port);
    const chid = (await a.client.request("createchannel", { name: `owned${process.pid}` })).chid;
    expect((await b.client.request("enter", { channel: chid })).status).toBe(0);
    const bytes = Buffer.from("in the owner's channel ".repeat(50));
    expect((await a.client.request("message", { channel: chid, body: "", attach: { mime: "text/plain", data: bytes.toString("base64") } })).status).toBe(0);
    a.client.close();
    b.client.close();
    await server.stop();

    // The crash: the deletion's batch is on disk (here: the account and its record),
    // the hook that removes the channels it owned never ran.
    const log = pino({ level: "silent" });
    const storage = await Storage.open(dataDir, log);
    const users = new UserStore(storage, await storage.counter("usernum"));
    const user = (await users.get(a.uid))!;
    await storage.commit([...users.removeOps(user), ...users.deletionMarkOps(a.uid, a.nick, [chid])]);
    await storage.close();

    server = await startServer(testConfig({ dataDir }));
    try {
      const { deleted, purges, hist } = server.services.storage.spaces;
      await until("the deletion is finished", async () => (await readKeys(deleted, {})).length === 0 && (await readKeys(purges, {})).length === 0);
      expect(await readKeys(hist, prefixRange(channelConv(chid)))).toEqual([]);
      await until("the file is gone", () => !existsSync(blobPath(dataDir, bytes)));
      const member = await login(server.port, b.login);
      expect((await member.client.request("enter", { channel: chid })).status).toBe(9);
      expect((await member.client.request("channellist")).channels).toEqual([]);
      member.client.close();
    } finally {
      await server.stop();
    }
  });
});
