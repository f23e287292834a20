// Deleting an account, then kill -9: none of the account's derived entries (inbox,
// cmids, dialogs, dialogat) come back. They used to: the start-up replay of the log
// past the watermark derived them again, since the in-memory set of deleted users
// that keeps them out was lost in the crash.
import { describe, expect, it } from "vitest";
import { ChildServer, registerUser, storedKeys, useTempDirs } from "./helpers.js";

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
