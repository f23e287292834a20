import { describe, expect, it } from "vitest";
import { login, registerUser, serveForFile } from "./helpers.js";


const shared = serveForFile({ maxPicture: 4096, maxImport: 50 });

const tag = () => String(Date.now() % 1e6) + String(Math.floor(Math.random() * 1e6)).padStart(6, "0");

describe("userinfo and setuserinfo", () => {
  it("returns the profile; setuserinfo changes only the fields sent", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const t = tag();
    const pic = Buffer.from("tiny png").toString("base64");
    expect(
      await a.client.request("setuserinfo", { user_status: "busy", email: `A${t}@Example.com`, phone: `+1 (555) ${t}`, picture: pic }),
    ).toEqual({ status: 0, error: "OK" });
    const info = await b.client.request("userinfo", { user: a.uid });
    expect(info).toEqual({
      status: 0,
      error: "OK",
      uid: a.uid,
      num: expect.any(Number),
      nick: a.nick,
      email: `a${t}@example.com`,
      phone: `+1555${t}`,
      picture: pic,
      user_status: "busy",
    });
    // omitted fields stay (the reference clears picture and status: we do not)
    expect((await a.client.request("setuserinfo", { user_status: "away" })).status).toBe(0);
    const after = await b.client.request("userinfo", { user: a.uid });
    expect(after).toMatchObject({ user_status: "away", picture: pic, email: `a${t}@example.com` });
    // an empty string clears
    expect((await a.client.request("setuserinfo", { picture: "" })).status).toBe(0);
    expect((await b.client.request("userinfo", { user: a.uid })).picture).toBe("");
    a.client.close();
    b.client.close();
  });

  it("keeps email and phone unique across users (1), and frees them when changed", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const t = tag();
    expect((await a.client.request("setuserinfo", { email: `u${t}@x.org`, phone: `7${t}` })).status).toBe(0);
    expect((await b.client.request("setuserinfo", { email: `U${t}@X.org` })).status).toBe(1);
    expect((await b.client.request("setuserinfo", { phone: `7-${t}` })).status).toBe(1);
    // setting one's own value again is fine
    expect((await a.client.request("setuserinfo", { email: `u${t}@x.org` })).status).toBe(0);
    expect((await a.client.request("setuserinfo", { email: `other${t}@x.org` })).status).toBe(0);
    expect((await b.client.request("setuserinfo", { email: `u${t}@x.org` })).status).toBe(0);
    a.client.close();
    b.client.close();
  });

  it("answers 8 for an unknown user, 4 for an empty one, 3 for bad email/phone/base64, 12 for a big picture", async () => {
    const a = await registerUser(shared.port);
    expect((await a.client.request("userinfo", { user: "ffffffffffff" })).status).toBe(8);
    expect((await a.client.request("userinfo", { user: "" })).status).toBe(4);
    expect((await a.client.request("userinfo", {})).status).toBe(4);
    expect((await a.client.request("setuserinfo", { email: "not-an-email" })).status).toBe(3);
    expect((await a.client.request("setuserinfo", { phone: "call me" })).status).toBe(3);
    expect((await a.client.request("setuserinfo", { picture: "***" })).status).toBe(3);
    expect((await a.client.request("setuserinfo", { user_status: 5 })).status).toBe(3);
    expect((await a.client.request("setuserinfo", { picture: "A".repeat(4100) })).status).toBe(12);
    // nothing changed
    expect(await a.client.request("userinfo", { user: a.uid })).toMatchObject({ email: "", phone: "", picture: "", user_status: "" });
    a.client.close();
  });

  it("never lets __proto__ or constructor keys reach stored objects", async () => {
    const a = await registerUser(shared.port);
    a.client.write(`{"action":"setuserinfo","data":{"__proto__":{"nick":"hacked","isAdmin":true},"constructor":{"x":1},"user_status":"ok"}}\n`);
    expect((await a.client.reply("setuserinfo")).data.status).toBe(0);
    const info = await a.client.request("userinfo", { user: a.uid });
    expect(info.nick).toBe(a.nick);
    expect(info.isAdmin).toBeUndefined();
    expect(({} as Record<string, unknown>).isAdmin).toBeUndefined();
    a.client.close();
  });
});

describe("contacts", () => {
  it("addcontact, contactlist and delcontact", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const added = await a.client.request("addcontact", { uid: b.uid });
    expect(added).toEqual({ status: 0, error: "OK", user: { uid: b.uid, nick: b.nick, email: "", phone: "" } });
    expect((await a.client.request("addcontact", { uid: c.uid })).status).toBe(0);
    const list = await a.client.request("contactlist", {});
    expect(list.status).toBe(0);
    expect(list.list.map((x: any) => x.uid).sort()).toEqual([b.uid, c.uid].sort());
    expect(list.list.find((x: any) => x.uid === b.uid)).toMatchObject({ nick: b.nick, email: "", phone: "", picture: "" });
    expect(await a.client.request("delcontact", { uid: b.uid })).toEqual({ status: 0, error: "OK", uid: b.uid });
    expect((await a.client.request("contactlist")).list.map((x: any) => x.uid)).toEqual([c.uid]);
    for (const x of [a, b, c]) x.client.close();
  });

  it("answers 1 for a listed contact or oneself, 8 for an unknown uid, 4 for none", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(0);
    expect((await a.client.request("addcontact", { uid: b.uid })).status).toBe(1);
    expect((await a.client.request("addcontact", { uid: a.uid })).status).toBe(1);
    expect((await a.client.request("addcontact", { uid: "000000000000" })).status).toBe(8);
    expect((await a.client.request("addcontact", {})).status).toBe(4);
    expect((await a.client.request("delcontact", { uid: "000000000000" })).status).toBe(8);
    expect((await a.client.request("delcontact", { uid: "" })).status).toBe(4);
    a.client.close();
    b.client.close();
  });

  /** The contacts keyspace's point reads (addcontact's "already listed?") wait `ms` first: a loaded disk. Returns the undo. */
  function slowContactGets(ms: number): () => void {
    const space = shared.server.services.storage.spaces.contacts as unknown as { get: (...args: unknown[]) => Promise<unknown> };
    const get = space.get.bind(space);
    space.get = async (...args: unknown[]) => {
      await new Promise((r) => setTimeout(r, ms));
      return get(...args);
    };
    return () => {
      delete (space as { get?: unknown }).get;
    };
  }

  it("two devices adding the same contact at once: one 0, the other 1", async () => {
    const a = await registerUser(shared.port);
    const a2 = await login(shared.port, a.login);
    const b = await registerUser(shared.port);
    const restore = slowContactGets(100);
    let replies: any[];
    try {
      replies = await Promise.all([a.client.request("addcontact", { uid: b.uid }), a2.client.request("addcontact", { uid: b.uid })]);
    } finally {
      restore();
    }
    expect(replies.map((r) => r.status).sort()).toEqual([0, 1]);
    expect((await a.client.request("contactlist")).list.map((x: any) => x.uid)).toEqual([b.uid]);
    for (const x of [a.client, a2.client, b.client]) x.close();
  });

  it("leaves no contact entry for an account deleted while it was being added", async () => {
    // The "already listed?" read of the addcontact waits 200 ms; the contact deletes
    // their account meanwhile. Either the add comes first and the deletion removes the
    // entry, or the deletion does and the add gets 8: never an entry for a deleted user.
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const sv = shared.server.services;
    const restore = slowContactGets(200);
    try {
      const adding = a.client.request("addcontact", { uid: b.uid });
      await new Promise((r) => setTimeout(r, 50));
      expect((await b.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
      expect([0, 8]).toContain((await adding).status);
    } finally {
      restore();
    }
    expect(await sv.contacts.list(a.uid)).toEqual([]);
    expect(await sv.contacts.listedBy(b.uid)).toEqual([]);
    a.client.close();
    b.client.close();
  });
});

describe("import", () => {
  it("matches address-book entries by email or phone and echoes myid", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const c = await registerUser(shared.port);
    const t = tag();
    expect((await b.client.request("setuserinfo", { email: `b${t}@mail.test` })).status).toBe(0);
    expect((await c.client.request("setuserinfo", { phone: `+44 20 ${t}` })).status).toBe(0);
    const r = await a.client.request("import", {
      contacts: [
        { myid: "1", name: "Bee", email: `B${t}@MAIL.test`, phone: "" },
        { myid: 2, name: "Cee", phone: `+4420${t}` },
        { myid: "3", name: "Nobody", email: `nobody${t}@mail.test`, phone: "123456" },
        { myid: "4", name: "Bad", email: "not an email" },
      ],
    });
    expect(r.status).toBe(0);
    expect(r.list).toEqual([
      { myid: "1", uid: b.uid, nick: b.nick, email: `b${t}@mail.test`, phone: "" },
      { myid: 2, uid: c.uid, nick: c.nick, email: "", phone: `+4420${t}` },
    ]);
    for (const x of [a, b, c]) x.client.close();
  });

  it("answers 12 past the entry limit, 4 without contacts, 3 for a wrong shape", async () => {
    const a = await registerUser(shared.port);
    const many = Array.from({ length: 51 }, (_, i) => ({ myid: String(i), phone: `555000${i}` }));
    expect((await a.client.request("import", { contacts: many })).status).toBe(12);
    expect((await a.client.request("import", {})).status).toBe(4);
    expect((await a.client.request("import", { contacts: "x" })).status).toBe(3);
    expect((await a.client.request("import", { contacts: [{ email: 5 }] })).status).toBe(3);
    expect((await a.client.request("import", { contacts: [] })).list).toEqual([]);
    a.client.close();
  });
});

describe("the user records kept in memory", () => {
  const big = serveForFile({ maxPerAddress: 1000 });

  it("hold at most 32 MiB of pictures, however many accounts set one of --max-picture", async () => {
    const users = big.server.services.users;
    const picture = "A".repeat(256 * 1024); // the default --max-picture
    const made = [];
    for (let i = 0; i < 140; i++) {
      const a = await registerUser(big.port);
      expect((await a.client.request("setuserinfo", { picture })).status).toBe(0);
      a.client.close();
      made.push(a);
    }
    const { records, chars } = users.cacheSize;
    expect(chars).toBeLessThanOrEqual(32 * 1024 * 1024);
    expect(chars).toBeGreaterThan(30 * 1024 * 1024); // full, not emptied
    expect(records).toBeLessThanOrEqual(128); // 140 were saved
    // A record that left the cache is read from disk whole.
    const c = await login(big.port, made[0].login);
    expect((await c.client.request("userinfo", { user: made[0].uid })).picture).toBe(picture);
    c.client.close();
  });
});

describe("a contact list's size", () => {
  const few = serveForFile({ maxContacts: 3 });

  it("is at most --max-contacts: addcontact past it gets 13; removing one frees a place", async () => {
    const me = await registerUser(few.port);
    const others = [];
    for (let i = 0; i < 4; i++) others.push(await registerUser(few.port));
    for (const o of others.slice(0, 3)) expect((await me.client.request("addcontact", { uid: o.uid })).status).toBe(0);
    expect(await me.client.request("addcontact", { uid: others[3].uid })).toMatchObject({ status: 13, error: "your contact list holds 3 users; remove one first" });
    expect((await me.client.request("contactlist")).list).toHaveLength(3);
    expect((await me.client.request("delcontact", { uid: others[0].uid })).status).toBe(0);
    expect((await me.client.request("addcontact", { uid: others[3].uid })).status).toBe(0);
    for (const a of [me, ...others]) a.client.close();
  });
});
