// User numbers: the stable numeric alias of every uid (for the doors that show users as
// JSON numbers). Given at registration, shown by userinfo, kept across restarts, gone
// with the account and never given again; users of an older database are numbered at
// start-up. Every test talks to a real server over TCP.
import path from "node:path";
import { Level } from "level";
import { describe, expect, it } from "vitest";
import { startServer } from "../src/server.js";
import { LAYOUT_VERSION, openSpaces } from "../src/storage/layout.js";
import { readEntries } from "../src/storage/range.js";
import { Client, registerUser, removeDir, testConfig } from "./helpers.js";

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

describe("user numbers", () => {
  it("are unique, shown by userinfo, stable across a restart, removed with the account and never reused", async () => {
    const config = testConfig();
    let server = await startServer(config);
    try {
      const users = [await registerUser(server.port), await registerUser(server.port), await registerUser(server.port)];
      const infos = [];
      for (const u of users) {
        const info = await users[0].client.request("userinfo", { user: u.uid });
        expect(info).toMatchObject({ status: 0, uid: u.uid, nick: u.nick });
        expect(Number.isSafeInteger(info.num)).toBe(true);
        expect(Object.keys(info)).toEqual(["status", "error", "uid", "num", "nick", "email", "phone", "picture", "user_status"]);
        infos.push(info);
      }
      const nums = infos.map((i) => i.num as number);
      expect(new Set(nums).size).toBe(3);
      // the directory maps both ways
      for (let i = 0; i < 3; i++) {
        expect(await server.directory.numOf(users[i].uid)).toBe(nums[i]);
        expect(await server.directory.uidOf(nums[i])).toBe(users[i].uid);
      }
      expect(await server.directory.uidOf(Math.max(...nums) + 1000)).toBeUndefined();
      expect(await server.directory.uidOf(0)).toBeUndefined();
      expect(await server.directory.uidOf(1.5)).toBeUndefined();
      expect(await server.directory.numOf("000000000000")).toBeUndefined();
      await closeAll(...users.map((u) => u.client));
      await server.stop();

      server = await startServer({ ...config, port: 0 });
      const again = await Client.connect(server.port);
      expect((await again.request("auth", { sid: users[0].sid })).status).toBe(0);
      for (let i = 0; i < 3; i++) expect((await again.request("userinfo", { user: users[i].uid })).num).toBe(nums[i]);

      // deleting the second account frees its number for good
      const gone = await Client.connect(server.port);
      expect((await gone.request("auth", { login: users[1].login, pass: "secret" })).status).toBe(0);
      expect((await gone.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      expect(await server.directory.uidOf(nums[1])).toBeUndefined();
      expect(await server.directory.numOf(users[1].uid)).toBeUndefined();
      const fresh = await registerUser(server.port);
      const freshNum = (await fresh.client.request("userinfo", { user: fresh.uid })).num;
      expect(freshNum).toBeGreaterThan(Math.max(...nums));
      const index = await readEntries<string>(server.services.storage.spaces.usernum, {});
      expect(index.map(([, uid]) => uid).sort()).toEqual([users[0].uid, users[2].uid, fresh.uid].sort());
      await closeAll(again, gone, fresh.client);
    } finally {
      await server.stop();
      removeDir(config.dataDir);
    }
  });

  it("are given at start-up to the users of a layout-3 database, once, in uid order", async () => {
    const config = testConfig();
    let server = await startServer(config);
    const users = [];
    for (let i = 0; i < 4; i++) users.push(await registerUser(server.port));
    await closeAll(...users.map((u) => u.client));
    await server.stop();

    // What a layout-3 server left: records without a number, no `usernum` index, no counter.
    const db = new Level<string, string>(path.join(config.dataDir, "db"), { keyEncoding: "utf8", valueEncoding: "utf8" });
    await db.open();
    const spaces = openSpaces(db);
    for (const [uid, rec] of await readEntries<Record<string, unknown>>(spaces.users, {})) {
      const { num: _num, ...old } = rec;
      await spaces.users.put(uid, old as never);
    }
    await spaces.usernum.clear();
    await spaces.meta.del("usernum");
    await spaces.meta.put("layout", 3);
    await db.close();

    server = await startServer({ ...config, port: 0 });
    try {
      const c = await Client.connect(server.port);
      expect((await c.request("auth", { sid: users[0].sid })).status).toBe(0);
      const byUid = [...users].sort((a, b) => (a.uid < b.uid ? -1 : 1));
      const nums = [];
      for (const u of byUid) nums.push((await c.request("userinfo", { user: u.uid })).num);
      expect(nums).toEqual([1, 2, 3, 4]);
      for (let i = 0; i < 4; i++) expect(await server.directory.uidOf(i + 1)).toBe(byUid[i].uid);
      expect(await server.services.storage.spaces.meta.get("layout")).toBe(LAYOUT_VERSION); // on to the newest layout
      // the next user comes after them
      const next = await registerUser(server.port);
      expect((await c.request("userinfo", { user: next.uid })).num).toBe(5);
      await closeAll(c, next.client);
      await server.stop();

      // a second start numbers nobody again
      server = await startServer({ ...config, port: 0 });
      const d = await Client.connect(server.port);
      expect((await d.request("auth", { sid: users[0].sid })).status).toBe(0);
      for (let i = 0; i < 4; i++) expect((await d.request("userinfo", { user: byUid[i].uid })).num).toBe(i + 1);
      await closeAll(d);
    } finally {
      await server.stop();
      removeDir(config.dataDir);
    }
  });

  it("the directory finds a user by the email of their profile, as setuserinfo normalised it", async () => {
    const config = testConfig();
    const server = await startServer(config);
    try {
      const a = await registerUser(server.port);
      expect((await a.client.request("setuserinfo", { email: "Someone@Example.ORG" })).status).toBe(0);
      expect((await server.directory.byEmail("  someone@example.org "))?.uid).toBe(a.uid);
      expect((await server.directory.byEmail("SOMEONE@EXAMPLE.ORG"))?.uid).toBe(a.uid);
      expect(await server.directory.byEmail("nobody@example.org")).toBeUndefined();
      expect(await server.directory.byEmail("not an address")).toBeUndefined();
      expect((await a.client.request("setuserinfo", { email: "" })).status).toBe(0);
      expect(await server.directory.byEmail("someone@example.org")).toBeUndefined();
      await closeAll(a.client);
    } finally {
      await server.stop();
      removeDir(config.dataDir);
    }
  });
});
