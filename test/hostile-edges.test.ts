// Hostile input at the edges of validation: strings that cannot be keys, ids of every
// shape that name nothing.
import { createHash } from "node:crypto";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { Client, registerUser, removeDir, serveForFile, startTestServer, uniqueName } from "./helpers.js";

const shared = serveForFile();

/**
 * Sends `data` with `field` set to a string holding the escape text `escape` (e.g.
 * `\ud800`), which JSON.stringify would not produce: the frame is written by hand.
 */
async function rawRequest(c: Client, action: string, data: Record<string, unknown>, field: string, escaped: string): Promise<any> {
  const json = JSON.stringify({ action, data: { ...data, [field]: "@@" } }).replace('"@@"', `"${escaped}"`);
  c.write(json + "\n");
  return (await c.reply(action)).data;
}

describe("lone surrogates in strings that become keys", () => {
  it("are refused with 3 in register (login, nick), auth, createchannel, message cmid, setuserinfo, searchuser", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const anon = await Client.connect(shared.port);
    // Each is told what is wrong with the string, ahead of a pattern it would not match.
    const lone = (field: string) => ({ status: 3, error: `'${field}' is not well-formed Unicode (it holds a lone surrogate)` });
    for (const bad of ["x\\ud800", "\\udfffy", "a\\ud800\\ud800b", "\\udc00\\ud800"]) {
      const login = uniqueName("lone");
      expect(await rawRequest(anon, "register", { login, pass: "p" }, "nick", bad)).toMatchObject(lone("nick"));
      expect(await rawRequest(anon, "register", { nick: login, pass: "p" }, "login", bad)).toMatchObject(lone("login"));
      expect(await rawRequest(anon, "auth", { pass: "p" }, "login", bad)).toMatchObject(lone("login"));
      expect(await rawRequest(a.client, "createchannel", {}, "name", bad)).toMatchObject(lone("name"));
      expect(await rawRequest(a.client, "message", { uid: b.uid, body: "hi" }, "cmid", bad)).toMatchObject(lone("cmid"));
      expect(await rawRequest(a.client, "message", { body: "hi" }, "uid", bad)).toMatchObject(lone("uid"));
      expect(await rawRequest(a.client, "setuserinfo", {}, "email", `me${bad}@example.org`)).toMatchObject(lone("email"));
      expect(await rawRequest(a.client, "searchuser", {}, "q", bad)).toMatchObject(lone("q"));
      expect(await rawRequest(a.client, "enter", {}, "channel", bad)).toMatchObject(lone("channel"));
    }
    // Nothing was stored under a U+FFFD spelling of those names.
    expect((await anon.request("register", { login: uniqueName("ok"), pass: "p", nick: "x\ufffd" })).status).toBe(0);
    // The connection is intact, and a proper pair (an emoji) is an ordinary character.
    const emoji = await Client.connect(shared.port);
    const nick = uniqueName("smile");
    expect(await rawRequest(emoji, "register", { login: uniqueName("pair"), pass: "p" }, "nick", `${nick}\\ud83d\\ude00`)).toMatchObject({
      status: 0,
    });
    expect((await a.client.request("searchuser", { q: nick })).list[0].nick).toBe(`${nick}\u{1F600}`);
    for (const c of [a.client, b.client, anon, emoji]) c.close();
  });

  it("two nicks that differ only in their lone surrogate cannot both take one index entry", async () => {
    const one = await Client.connect(shared.port);
    const two = await Client.connect(shared.port);
    const base = uniqueName("twin");
    const [r1, r2] = await Promise.all([
      rawRequest(one, "register", { login: uniqueName("t1"), pass: "p" }, "nick", `${base}\\ud800`),
      rawRequest(two, "register", { login: uniqueName("t2"), pass: "p" }, "nick", `${base}\\ud801`),
    ]);
    expect([r1.status, r2.status]).toEqual([3, 3]);
    one.close();
    two.close();
  });
});

describe("an id that names nothing", () => {
  it("is 14 for a mid of any shape in editmessage and delmessage, like an unknown number", async () => {
    const a = await registerUser(shared.port);
    for (const mid of ["999999999", "01", "abc", "12a", "-1", "1.5", " 1", "0x10", "1234567890123456", "a!b"]) {
      expect(await a.client.request("editmessage", { mid, body: "x" }), mid).toMatchObject({ status: 14 });
      expect(await a.client.request("delmessage", { mid }), mid).toMatchObject({ status: 14 });
    }
    // A string past the field's length limit, a non-string and an empty one keep their codes.
    expect(await a.client.request("delmessage", { mid: "9".repeat(200) })).toMatchObject({ status: 3 });
    expect(await a.client.request("editmessage", { mid: 5, body: "x" })).toMatchObject({ status: 3 });
    expect(await a.client.request("delmessage", { mid: "" })).toMatchObject({ status: 4 });
    a.client.close();
  });

  it("is 8 for a uid and 9 for a chid of any shape, on every action that takes one", async () => {
    const a = await registerUser(shared.port);
    for (const id of ["999999999999", "abc", "a!b", "-1", "../x", "\u0000"]) {
      expect(await a.client.request("userinfo", { user: id }), id).toMatchObject({ status: 8 });
      expect(await a.client.request("addcontact", { uid: id }), id).toMatchObject({ status: 8 });
      expect(await a.client.request("delcontact", { uid: id }), id).toMatchObject({ status: 8 });
      expect(await a.client.request("message", { uid: id, body: "x" }), id).toMatchObject({ status: 8 });
      expect(await a.client.request("history", { uid: id }), id).toMatchObject({ status: 8 });
      expect(await a.client.request("enter", { channel: id }), id).toMatchObject({ status: 9 });
      expect(await a.client.request("leave", { channel: id }), id).toMatchObject({ status: 9 });
      expect(await a.client.request("deletechannel", { channel: id }), id).toMatchObject({ status: 9 });
      expect(await a.client.request("message", { channel: id, body: "x" }), id).toMatchObject({ status: 9 });
      expect(await a.client.request("history", { channel: id }), id).toMatchObject({ status: 9 });
    }
    a.client.close();
  });
});

describe("error texts", () => {
  it("never contain a filesystem path, even when the blob store fails under the server", async () => {
    const server = await startTestServer();
    try {
      const dataDir = server.services.config.dataDir;
      const a = await registerUser(server.port);
      const b = await registerUser(server.port);
      const data = Buffer.from("x".repeat(3000)).toString("base64");
      // The upload directory vanishes: the upload cannot even open its file.
      rmSync(path.join(dataDir, "blobs"), { recursive: true, force: true });
      const r1 = await a.client.request("message", { uid: b.uid, body: "", attach: { mime: "text/plain", data } });
      expect(r1.status).toBe(16);
      // The directory comes back as a file: the upload opens, but cannot be moved into place.
      mkdirSync(path.join(dataDir, "blobs", "tmp"), { recursive: true });
      const sha = createHash("sha256").update(Buffer.from(data, "base64")).digest("hex");
      writeFileSync(path.join(dataDir, "blobs", sha.slice(0, 2)), "in the way");
      const r2 = await a.client.request("message", { uid: b.uid, body: "", attach: { mime: "text/plain", data } });
      expect(r2.status).toBe(16);
      for (const r of [r1, r2]) {
        expect(r.error).not.toContain(dataDir);
        expect(r.error).not.toMatch(/\/|\\|ENOENT|ENOTDIR|EEXIST/);
      }
      // The connection is intact.
      expect((await a.client.request("ping")).status).toBe(0);
      a.client.close();
      b.client.close();
    } finally {
      await server.stop();
      removeDir(server.services.config.dataDir);
    }
  });
});
