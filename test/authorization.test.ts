// The authorization matrix: for every action that takes a uid, chid or mid, a second
// user (mallory) tries it against the first user's (alice's) data, gets the right
// refusal, and nothing of alice's changes.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { registerUser, startTestServer, uniqueName, type Account } from "./helpers.js";

let server: RunningServer;
let alice: Account;
let bob: Account;
let mallory: Account;
let chid: string;
let aliceToBob: string;
let aliceInChannel: string;

/** Everything of alice's the attempts could touch, as alice and bob see it. */
async function snapshot() {
  return {
    contacts: (await alice.client.request("contactlist")).list.map((c: any) => c.uid),
    profile: await alice.client.request("userinfo", { user: alice.uid }),
    direct: (await alice.client.request("history", { uid: bob.uid })).messages,
    channel: (await alice.client.request("history", { channel: chid })).messages,
    channels: (await alice.client.request("channellist")).channels.find((c: any) => c.chid === chid),
    bobContacts: (await bob.client.request("contactlist")).list.map((c: any) => c.uid),
  };
}

beforeAll(async () => {
  server = await startTestServer();
  alice = await registerUser(server.port);
  bob = await registerUser(server.port);
  mallory = await registerUser(server.port);
  expect((await alice.client.request("addcontact", { uid: bob.uid })).status).toBe(0);
  expect((await bob.client.request("addcontact", { uid: alice.uid })).status).toBe(0);
  chid = (await alice.client.request("createchannel", { name: uniqueName("private"), descr: "alice's" })).chid;
  expect((await bob.client.request("enter", { channel: chid })).status).toBe(0);
  aliceToBob = (await alice.client.request("message", { uid: bob.uid, body: "for bob only" })).mid;
  aliceInChannel = (await alice.client.request("message", { channel: chid, body: "for members" })).mid;
});
afterAll(async () => {
  for (const a of [alice, bob, mallory]) a.client.close();
  await server.stop();
});

describe("a second user against the first user's data", () => {
  const attempts: [string, string, () => Record<string, unknown>, number][] = [
    // a message in a conversation mallory is not part of is not confirmed to exist: 14
    ["edits alice's direct message", "editmessage", () => ({ mid: aliceToBob, body: "hacked" }), 14],
    ["edits alice's channel message", "editmessage", () => ({ mid: aliceInChannel, body: "hacked" }), 14],
    ["deletes alice's direct message", "delmessage", () => ({ mid: aliceToBob }), 14],
    ["deletes alice's channel message", "delmessage", () => ({ mid: aliceInChannel }), 14],
    ["deletes alice's channel", "deletechannel", () => ({ channel: chid }), 15],
    ["posts to alice's channel without entering", "message", () => ({ channel: chid, body: "spam" }), 10],
    ["reads alice's channel without entering", "history", () => ({ channel: chid }), 10],
    ["leaves alice's channel it is not in", "leave", () => ({ channel: chid }), 10],
    ["uses alice's cid and sid", "delcontact", () => ({ uid: bob.uid, cid: alice.uid, sid: alice.sid }), 6],
    ["uses alice's sid with its own cid", "addcontact", () => ({ uid: bob.uid, cid: mallory.uid, sid: alice.sid }), 6],
    ["sends as alice", "message", () => ({ uid: bob.uid, body: "from alice, honest", cid: alice.uid }), 6],
  ];

  for (const [what, action, data, code] of attempts) {
    it(`${what}: ${code}, and nothing changes`, async () => {
      const before = await snapshot();
      bob.client.frames.length = 0; // events from the set-up
      const r = await mallory.client.request(action, data());
      expect(r.status).toBe(code);
      expect(await snapshot()).toEqual(before);
      expect(await bob.client.quiet(100, (f) => f.action.startsWith("ev_") && f.action !== "ev_presence")).toBe(true);
    });
  }

  it("a participant who is not the author (bob) gets 15 for edits and deletes, and nothing changes", async () => {
    const before = await snapshot();
    for (const mid of [aliceToBob, aliceInChannel]) {
      expect((await bob.client.request("editmessage", { mid, body: "hacked" })).status).toBe(15);
      expect((await bob.client.request("delmessage", { mid })).status).toBe(15);
    }
    expect(await snapshot()).toEqual(before);
  });

  it("reads a direct conversation: only its own with that user, never alice's with bob", async () => {
    const before = await snapshot();
    const withAlice = await mallory.client.request("history", { uid: alice.uid });
    const withBob = await mallory.client.request("history", { uid: bob.uid });
    expect(withAlice).toMatchObject({ status: 0, messages: [] });
    expect(withBob).toMatchObject({ status: 0, messages: [] });
    expect(JSON.stringify([withAlice, withBob])).not.toContain("for bob only");
    // dialogs and search show nothing of alice's conversations or contact data
    expect((await mallory.client.request("dialogs")).dialogs).toEqual([]);
    expect(await snapshot()).toEqual(before);
  });

  it("removing bob from its own list leaves alice's list alone", async () => {
    const before = await snapshot();
    expect((await mallory.client.request("delcontact", { uid: bob.uid })).status).toBe(0);
    expect(await snapshot()).toEqual(before);
  });

  it("changing its own password or deleting its own account needs its own password", async () => {
    const before = await snapshot();
    expect((await mallory.client.request("changepassword", { pass: "wrong", newpass: "x" })).status).toBe(2);
    expect((await mallory.client.request("deleteaccount", { pass: "wrong" })).status).toBe(2);
    expect(await snapshot()).toEqual(before);
  });
});
