// Account lifecycle over real TCP: logout, changepassword, deleteaccount, expiry.
import { describe, expect, it } from "vitest";
import { Client, login, registerUser, startTestServer, serveForFile } from "./helpers.js";


const shared = serveForFile();

async function resume(sid: string): Promise<{ client: Client; auth: any }> {
  const client = await Client.connect(shared.port);
  return { client, auth: await client.request("auth", { sid }) };
}

describe("logout", () => {
  it("revokes the session; the connection stays open and unauthenticated", async () => {
    const a = await registerUser(shared.port);
    const twin = await resume(a.sid);
    expect(twin.auth.status).toBe(0);
    expect(await a.client.request("logout", {})).toEqual({ status: 0, error: "OK" });
    expect((await a.client.request("contactlist")).status).toBe(6);
    expect((await a.client.request("ping")).status).toBe(0);
    // another connection on the same sid is told and logged out, but not closed
    expect((await twin.client.event("ev_logout")).reason).toMatch(/logged out/);
    expect((await twin.client.request("contactlist")).status).toBe(6);
    expect(twin.client.isClosed).toBe(false);
    // the sid no longer resumes; the password still works
    expect((await resume(a.sid)).auth.status).toBe(2);
    expect((await a.client.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    a.client.close();
    twin.client.close();
  });

  it("needs auth (6)", async () => {
    const c = await Client.connect(shared.port);
    expect((await c.request("logout", {})).status).toBe(6);
    c.close();
  });
});

describe("changepassword", () => {
  it("refuses a wrong current password (2) and empty fields (4); nothing changes", async () => {
    const a = await registerUser(shared.port);
    expect((await a.client.request("changepassword", { pass: "wrong", newpass: "x" })).status).toBe(2);
    expect((await a.client.request("changepassword", { pass: "secret", newpass: "" })).status).toBe(4);
    expect((await login(shared.port, a.login, "secret")).auth.status).toBe(0);
    a.client.close();
  });

  it("keeps the caller's session, revokes and closes every other, and swaps the password", async () => {
    const a = await registerUser(shared.port);
    const other = await login(shared.port, a.login); // a second device with its own sid
    expect(await a.client.request("changepassword", { pass: "secret", newpass: "n3w" })).toEqual({ status: 0, error: "OK" });
    expect((await other.client.event("ev_logout")).reason).toMatch(/password/);
    await other.client.closed;
    expect((await resume(other.auth.sid)).auth.status).toBe(2);
    expect((await resume(a.sid)).auth.status).toBe(0);
    expect((await login(shared.port, a.login, "secret")).auth.status).toBe(2);
    expect((await login(shared.port, a.login, "n3w")).auth.status).toBe(0);
    expect((await a.client.request("contactlist")).status).toBe(0);
    a.client.close();
  });
});

describe("deleteaccount", () => {
  it("refuses a wrong password (2) and changes nothing", async () => {
    const a = await registerUser(shared.port);
    expect((await a.client.request("deleteaccount", { pass: "nope" })).status).toBe(2);
    expect((await login(shared.port, a.login)).auth.status).toBe(0);
    a.client.close();
  });

  it("removes the account, its sessions, contacts and queue; frees its names; keeps its messages in others' history", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const email = `del${Date.now()}@x.test`;
    expect((await a.client.request("setuserinfo", { email })).status).toBe(0);
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    expect((await b.client.request("addcontact", { uid: a.uid })).status).toBe(0);
    const sent = await a.client.request("message", { uid: b.uid, body: "before I go" });
    // something waiting in a's queue
    const otherDevice = await resume(a.sid);
    expect((await c.client.request("message", { uid: a.uid, body: "queued" })).status).toBe(0);

    expect(await a.client.request("deleteaccount", { pass: "secret" })).toEqual({ status: 0, error: "OK" });
    expect((await otherDevice.client.event("ev_logout")).reason).toMatch(/deleted/);
    await otherDevice.client.closed;
    expect((await a.client.request("contactlist")).status).toBe(6);
    expect((await resume(a.sid)).auth.status).toBe(2);
    expect((await login(shared.port, a.login)).auth.status).toBe(7);
    expect((await b.client.request("userinfo", { user: a.uid })).status).toBe(8);
    expect((await b.client.request("contactlist")).list).toEqual([]);
    // the past message stays in b's history, with a's uid
    const h = await b.client.request("history", { uid: a.uid });
    expect(h.messages.map((m: any) => [m.mid, m.from])).toEqual([[sent.mid, a.uid]]);
    // login, nick and email are free again; the new account starts empty
    const again = await Client.connect(shared.port);
    expect((await again.request("register", { login: a.login, pass: "p2", nick: a.nick })).status).toBe(0);
    const auth = (await again.reply("auth")).data;
    expect(auth.uid).not.toBe(a.uid);
    expect((await again.request("setuserinfo", { email })).status).toBe(0);
    expect(await again.quiet(300, (f) => f.action === "ev_message")).toBe(true);
    expect((await again.request("contactlist")).list).toEqual([]);
    for (const x of [a.client, b.client, c.client, again]) x.close();
  });
});

describe("session expiry", () => {
  it("a sid older than --session-ttl is refused", async () => {
    const short = await startTestServer({ sessionTtl: 1 });
    const a = await registerUser(short.port);
    await new Promise((r) => setTimeout(r, 2100));
    const c = await Client.connect(short.port);
    const r = await c.request("auth", { sid: a.sid });
    expect(r.status).toBe(2);
    expect(r.error).toMatch(/expired/);
    expect((await c.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    for (const x of [a.client, c]) x.close();
    await short.stop();
  });
});

describe("deleteaccount and channels", () => {
  it("deletes the channels the account owned and tells the members of the others it left", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const owned = (await a.client.request("createchannel", { name: `owned${Date.now()}` })).chid;
    const other = (await b.client.request("createchannel", { name: `other${Date.now()}` })).chid;
    expect((await b.client.request("enter", { channel: owned })).status).toBe(0);
    expect((await a.client.request("enter", { channel: other })).status).toBe(0);
    b.client.frames.length = 0;
    expect((await a.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    expect(await b.client.event("ev_channel_deleted")).toEqual({ chid: owned });
    expect(await b.client.event("ev_leave")).toEqual({ chid: other, uid: a.uid, nick: a.nick });
    expect((await b.client.request("enter", { channel: owned })).status).toBe(9);
    const members = (await b.client.request("enter", { channel: other })).users.map((u: any) => u.uid);
    expect(members).toEqual([b.uid]);
    a.client.close();
    b.client.close();
  });
});
