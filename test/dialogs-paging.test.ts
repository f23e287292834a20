// dialogs paging across a deleted message: a conversation whose last message was
// deleted keeps its dialogs entry at the deleted seq until a later generation moves
// it. A page with `before` below that seq used to skip the conversation (the entry is
// above the page, and the page before held it back): while the recheck waited in
// memory, and for good after kill -9, which lost the recheck.
import { describe, expect, it } from "vitest";
import { ChildServer, login, registerUser, serveForFile, storedKeys, useTempDirs } from "./helpers.js";

const shared = serveForFile();
const newDataDir = useTempDirs();

/** A writes b1 to B, c1 to C, b2 to B, and deletes b2: B's last is b1, older than C's c1. */
async function lastOfBDeleted(port: number) {
  const a = await registerUser(port);
  const b = await registerUser(port);
  const c = await registerUser(port);
  const b1 = (await a.client.request("message", { uid: b.uid, body: "b1" })).mid as string;
  const c1 = (await a.client.request("message", { uid: c.uid, body: "c1" })).mid as string;
  const b2 = (await a.client.request("message", { uid: b.uid, body: "b2" })).mid as string;
  expect((await a.client.request("delmessage", { mid: b2 })).status).toBe(0);
  return { a, b, c, b1, c1 };
}

describe("dialogs paging after a delete", () => {
  it("page 2 (before = page 1's last seq) lists the conversation whose last message was deleted", async () => {
    const { a, b, c, b1, c1 } = await lastOfBDeleted(shared.port);
    // Truth now: c (last c1) then b (last b1).
    const p1 = (await a.client.request("dialogs", { limit: 1 })).dialogs;
    expect(p1.map((d: any) => d.last.mid)).toEqual([c1]);
    const p2 = (await a.client.request("dialogs", { limit: 1, before: c1 })).dialogs;
    expect(p2.map((d: any) => d.last.mid)).toEqual([b1]); // fails: []
    for (const x of [a, b, c]) x.client.close();
  });

  it("after kill -9 right after the delete, paging with before skips b until someone reads page 1", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const { a, b, c, b1, c1 } = await lastOfBDeleted(child.port);
    child.proc.kill("SIGKILL");
    await child.exited;
    child = await ChildServer.start(dataDir);
    const again = await login(child.port, a.login);
    // wait well past the derived-entry delay: nothing repairs b's entry on its own
    await new Promise((r) => setTimeout(r, 2500));
    const p2 = (await again.client.request("dialogs", { limit: 1, before: c1 })).dialogs;
    expect(p2.map((d: any) => d.last.mid)).toEqual([b1]); // fails: []
    again.client.close();
    for (const x of [a, b, c]) x.client.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
    // The delete's markers (one per side) are taken out once the entries are moved.
    expect(await storedKeys(dataDir, [{ gt: "!rechecks!", lt: "!rechecks~" }])).toEqual([]);
  });
});

describe("dialogs with long last messages", () => {
  it("are written row by row with every body whole, newest first, direct and channel alike", async () => {
    const a = await registerUser(shared.port);
    const expected: { id: string; body: string }[] = [];
    for (let i = 0; i < 40; i++) {
      const body = i % 2 === 0 ? `${i} ` + "y".repeat(200_000) : `short ${i}`;
      if (i % 5 === 0) {
        const ch = await a.client.request("createchannel", { name: `long${process.pid}x${i}x${Date.now()}` });
        expect((await a.client.request("message", { channel: ch.chid, body })).status).toBe(0);
        expected.unshift({ id: ch.chid, body });
      } else {
        const peer = await registerUser(shared.port);
        peer.client.close();
        expect((await a.client.request("message", { uid: peer.uid, body })).status).toBe(0);
        expected.unshift({ id: peer.uid, body });
      }
    }
    const r = await a.client.request("dialogs", { limit: 100 });
    expect(r.status).toBe(0);
    expect(r.dialogs.map((d: any) => ({ id: d.uid ?? d.chid, body: d.last.body }))).toEqual(expected);
    a.client.close();
  });
});

describe("dialogs with a deleted account", () => {
  it("name it by the nick of the last message when that one is its, never by the caller's", async () => {
    const a = await registerUser(shared.port);
    const [mine, theirs] = [await registerUser(shared.port), await registerUser(shared.port)];
    expect((await mine.client.request("message", { uid: a.uid, body: "from mine" })).status).toBe(0);
    expect((await a.client.request("message", { uid: mine.uid, body: "last, from a" })).status).toBe(0);
    expect((await a.client.request("message", { uid: theirs.uid, body: "from a" })).status).toBe(0);
    expect((await theirs.client.request("message", { uid: a.uid, body: "last, from theirs" })).status).toBe(0);
    for (const u of [mine, theirs]) expect((await u.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    const rows = (await a.client.request("dialogs", {})).dialogs;
    expect(rows.find((d: any) => d.uid === mine.uid)).toMatchObject({ nick: "", last: { from: a.uid } });
    expect(rows.find((d: any) => d.uid === theirs.uid)).toMatchObject({ nick: theirs.nick, last: { from: theirs.uid } });
    a.client.close();
  });
});
