import { describe, expect, it } from "vitest";
import { Client, login, registerUser, uniqueName, serveForFile } from "./helpers.js";


const shared = serveForFile();

describe("welcome", () => {
  it("is the first frame, with message and integer unix time", async () => {
    const c = await Client.connect(shared.port, { welcome: false });
    const f = await c.next();
    expect(f.action).toBe("welcome");
    expect(typeof f.message).toBe("string");
    expect(Number.isInteger(f.time)).toBe(true);
    expect(Math.abs(f.time - Date.now() / 1000)).toBeLessThan(5);
    c.close();
  });
});

describe("register", () => {
  it("answers status 0 and follows with an auth frame carrying sid, uid, cid and nick", async () => {
    const c = await Client.connect(shared.port);
    const login = uniqueName();
    const reg = await c.request("register", { login, pass: "0cc175b9c0f1b6a831c399e269772661", nick: `${login}-nick` });
    expect(reg).toEqual({ status: 0, error: "OK" });
    const auth = (await c.reply("auth")).data;
    expect(auth).toMatchObject({ status: 0, error: "OK", nick: `${login}-nick` });
    expect(auth.uid).toMatch(/^[0-9a-f]+$/);
    expect(auth.cid).toBe(auth.uid);
    expect(auth.sid).toMatch(/^[0-9a-f]{32}$/);
    // authenticated: an action that needs auth now works
    expect((await c.request("userinfo", { user: auth.uid })).status).toBe(0);
    c.close();
  });

  it("refuses a taken login or nick with 1, case-insensitively", async () => {
    const a = await registerUser(shared.port);
    const c = await Client.connect(shared.port);
    expect((await c.request("register", { login: a.login.toUpperCase(), pass: "p", nick: uniqueName() })).status).toBe(1);
    expect((await c.request("register", { login: uniqueName(), pass: "p", nick: a.nick.toUpperCase() })).status).toBe(1);
    c.close();
    a.client.close();
  });

  it("refuses concurrent registrations of one login: exactly one wins", async () => {
    const name = uniqueName();
    const clients = await Promise.all([1, 2, 3].map(() => Client.connect(shared.port)));
    const replies = await Promise.all(
      clients.map((c, i) => c.request("register", { login: name, pass: "p", nick: `${name}n${i}` })),
    );
    expect(replies.map((r) => r.status).sort()).toEqual([0, 1, 1]);
    for (const c of clients) c.close();
  });

  it("answers 4 for a missing or empty field, naming it", async () => {
    const c = await Client.connect(shared.port);
    const missing = await c.request("register", { login: uniqueName(), pass: "p" });
    expect(missing.status).toBe(4);
    expect(missing.error).toContain("nick");
    const empty = await c.request("register", { login: "", pass: "p", nick: "n" });
    expect(empty.status).toBe(4);
    expect(empty.error).toContain("login");
    c.close();
  });

  it("answers 3 for a wrong type or a login with forbidden characters", async () => {
    const c = await Client.connect(shared.port);
    expect((await c.request("register", { login: 42, pass: "p", nick: "n" })).status).toBe(3);
    expect((await c.request("register", { login: "has space", pass: "p", nick: "n" })).status).toBe(3);
    c.close();
  });

  it("answers 5 on a connection that is already authenticated", async () => {
    const a = await registerUser(shared.port);
    expect((await a.client.request("register", { login: uniqueName(), pass: "p", nick: uniqueName() })).status).toBe(5);
    a.client.close();
  });

  it("accepts logins in any script (seed 002 uses Cyrillic names)", async () => {
    const c = await Client.connect(shared.port);
    const name = `Василий${process.pid}`;
    expect((await c.request("register", { login: name, pass: "p", nick: name })).status).toBe(0);
    c.close();
  });

  it("accepts scripts written with combining marks, composed (NFC) only, and logs in with them", async () => {
    // Devanagari's and Thai's vowel signs are combining marks with no composed form.
    for (const base of ["राम", "สมชาย", "José"]) {
      const name = `${base}${process.pid}`;
      const c = await Client.connect(shared.port);
      expect((await c.request("register", { login: name, pass: "p", nick: `n${name}` })).status, base).toBe(0);
      c.close();
      const back = await login(shared.port, name, "p");
      expect(back.auth.status).toBe(0);
      back.client.close();
    }
    // "José" with a combining accent is refused (it would be a second José), and so is a
    // login that starts with a mark.
    for (const bad of [`Jose\u0301x${process.pid}`, `\u0301a${process.pid}`]) {
      const c = await Client.connect(shared.port);
      const r = await c.request("register", { login: bad, pass: "p", nick: uniqueName() });
      expect(r.status, JSON.stringify(bad)).toBe(3);
      c.close();
    }
    const c = await Client.connect(shared.port);
    expect((await c.request("register", { login: `Jose\u0301y${process.pid}`, pass: "p", nick: uniqueName() })).error).toMatch(/NFC/);
    c.close();
  });
});

describe("auth", () => {
  it("logs in with login and pass, replying sid, uid, cid and nick", async () => {
    const a = await registerUser(shared.port);
    const { client, auth } = await login(shared.port, a.login);
    expect(auth).toMatchObject({ status: 0, error: "OK", uid: a.uid, cid: a.uid, nick: a.nick });
    expect(auth.sid).toMatch(/^[0-9a-f]{32}$/);
    expect(auth.sid).not.toBe(a.sid);
    client.close();
    a.client.close();
  });

  it("takes cid and sid set to null, as an original-protocol client sends them before it has a session", async () => {
    const a = await registerUser(shared.port);
    const c = await Client.connect(shared.port);
    const r = await c.request("auth", { cid: null, sid: null, login: a.login, pass: "secret" });
    expect(r).toMatchObject({ status: 0, uid: a.uid });
    c.close();
    a.client.close();
  });

  it("resumes a stored session with sid alone", async () => {
    const a = await registerUser(shared.port);
    const c = await Client.connect(shared.port);
    const auth = await c.request("auth", { sid: a.sid });
    expect(auth).toMatchObject({ status: 0, uid: a.uid, sid: a.sid, nick: a.nick });
    c.close();
    a.client.close();
  });

  it("answers 2 for a wrong password or an unknown sid, 7 for an unknown login, 4 for empty fields", async () => {
    const a = await registerUser(shared.port);
    const c = await Client.connect(shared.port);
    expect((await c.request("auth", { login: a.login, pass: "wrong" })).status).toBe(2);
    expect((await c.request("auth", { sid: "0".repeat(32) })).status).toBe(2);
    expect((await c.request("auth", { login: uniqueName("ghost"), pass: "x" })).status).toBe(7);
    expect((await c.request("auth", { login: a.login, pass: "" })).status).toBe(4);
    expect((await c.request("auth", {})).status).toBe(4);
    // still unauthenticated after the failures
    expect((await c.request("contactlist")).status).toBe(6);
    c.close();
    a.client.close();
  });
});

describe("the auth gate and cid/sid", () => {
  it("answers 6 to every known action but register, auth, hello, ping and quit before auth", async () => {
    const c = await Client.connect(shared.port);
    for (const action of ["userinfo", "setuserinfo", "contactlist", "addcontact", "delcontact", "message", "import"]) {
      const r = await c.request(action, {});
      expect(r.status, action).toBe(6);
    }
    expect((await c.request("ping")).status).toBe(0);
    expect((await c.request("hello")).status).toBe(0);
    c.close();
  });

  it("answers 11 to an unknown action, authenticated or not", async () => {
    const c = await Client.connect(shared.port);
    expect(await c.request("frobnicate", {})).toMatchObject({ status: 11 });
    const a = await registerUser(shared.port);
    expect(await a.client.request("frobnicate", {})).toMatchObject({ status: 11 });
    c.close();
    a.client.close();
  });

  it("accepts the seed's cid and sid when they match, and answers 6 and does nothing when they do not", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const ok = await a.client.request("addcontact", { uid: b.uid, cid: a.uid, sid: a.sid });
    expect(ok.status).toBe(0);
    const wrongSid = await a.client.request("delcontact", { uid: b.uid, cid: a.uid, sid: b.sid });
    expect(wrongSid.status).toBe(6);
    const wrongCid = await a.client.request("delcontact", { uid: b.uid, cid: b.uid, sid: a.sid });
    expect(wrongCid.status).toBe(6);
    const list = await a.client.request("contactlist", {});
    expect(list.list.map((x: any) => x.uid)).toEqual([b.uid]);
    a.client.close();
    b.client.close();
  });
});

describe("hello, ping, quit", () => {
  it("hello names the server, version, actions and limits", async () => {
    const c = await Client.connect(shared.port);
    const h = await c.request("hello", { client: "test", version: "1" });
    expect(h).toMatchObject({ status: 0, server: "wirechat" });
    expect(h.features).toEqual(expect.arrayContaining(["register", "auth", "message", "import"]));
    expect(h.limits).toMatchObject({ frame: 1024 * 1024, attach: 64 * 1024 * 1024, picture: 256 * 1024 });
    c.close();
  });

  it("ping answers under its own name with the time; quit answers then closes", async () => {
    const c = await Client.connect(shared.port);
    const p = await c.request("ping");
    expect(p.status).toBe(0);
    expect(Number.isInteger(p.time)).toBe(true);
    expect(await c.request("quit")).toEqual({ status: 0, error: "OK" });
    await c.closed;
  });

  it("requests queued behind quit are not run", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    // One write: history is still being read when quit and the message arrive, so both queue.
    const frames = [
      { action: "history", data: { uid: b.uid } },
      { action: "quit" },
      { action: "message", data: { uid: b.uid, body: "after quit" } },
    ];
    const before = a.client.lines.length;
    a.client.socket.write(frames.map((f) => JSON.stringify(f)).join("\n") + "\n");
    await a.client.closed;
    const actions = a.client.lines.slice(before).map((l) => JSON.parse(l).action);
    expect(actions).toEqual(["history", "quit"]);
    await new Promise((r) => setTimeout(r, 200));
    expect((await b.client.request("history", { uid: a.uid })).messages).toEqual([]);
    expect(b.client.lines.some((l) => l.includes("after quit"))).toBe(false);
    b.client.close();
  });
});
