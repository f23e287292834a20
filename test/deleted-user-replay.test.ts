// Deleting an account, then kill -9: none of the account's derived entries (inbox,
// cmids, dialogs, dialogat) come back. They used to: the start-up replay of the log
// past the watermark derived them again, since the in-memory set of deleted users
// that keeps them out was lost in the crash. And a deletion whose commit fails takes
// nothing of the account's with it.
import { describe, expect, it } from "vitest";
import { ChildServer, login, registerUser, serveForFile, storedKeys, useTempDirs } from "./helpers.js";
import { sleep, wrapCalls } from "./pipeline-helpers.js";

const newDataDir = useTempDirs();

function keysOf(dataDir: string, uid: string): Promise<string[]> {
  const spaces = ["inbox", "cmids", "dialogs", "dialogat", "rechecks", "peers", "cursor"];
  return storedKeys(dataDir, spaces.map((space) => ({ gt: `!${space}!${uid}!`, lt: `!${space}!${uid}"` })));
}

describe("account deletion vs kill -9", () => {
  it("leaves none of the deleted user's derived entries behind", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    expect((await a.client.request("message", { uid: b.uid, body: "to b" })).status).toBe(0);
    expect((await b.client.request("message", { uid: a.uid, body: "to a", cmid: "b-1" })).status).toBe(0);
    expect(await b.client.request("deleteaccount", { pass: "secret" })).toMatchObject({ status: 0 });
    child.proc.kill("SIGKILL");
    await child.exited;
    child = await ChildServer.start(dataDir);
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
    expect(await keysOf(dataDir, b.uid)).toEqual([]);
    a.client.close();
    b.client.close();
  });
});

describe("an account deletion whose commit fails", () => {
  const shared = serveForFile();

  it("leaves the account whole: messages sent to it after are stored for it and delivered", async () => {
    const { storage } = shared.server.services;
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    expect((await a.client.request("message", { uid: b.uid, body: "before" })).status).toBe(0);
    await b.client.event("ev_message", (d) => d.body === "before");
    // The deletion's batch fails, as a write to a full disk does.
    const account = storage.spaces.users.prefix + b.uid;
    const undo = wrapCalls(storage, "commit", async (ops: { type: string; key: string }[]) => {
      if (ops.some((op) => op.type === "del" && op.key === account)) throw new Error("No space left on device");
    });
    try {
      expect((await b.client.request("deleteaccount", { pass: "secret" })).status).toBe(16);
    } finally {
      undo();
    }
    b.client.close();
    await b.client.closed;
    expect((await a.client.request("message", { uid: b.uid, body: "after" })).status).toBe(0);
    // Its inbox entry is written (a second or so later) before b comes back.
    await sleep(2500);
    const again = await login(shared.port, b.login);
    expect(again.auth.status).toBe(0);
    expect(await again.client.event("ev_message", (d) => d.body === "after")).toMatchObject({ from: a.uid, body: "after" });
    for (const c of [a.client, again.client]) c.close();
  });
});
