// Operating wirechat from the command line and with signals: `wirechat user|ban|kick|
// registration|backup|restore|export|check` on a stopped data dir and on a running
// server (through its admin port), the config file, SIGHUP (TLS certificate and
// settings), the second SIGINT, the locked data dir, the failed-login log line.

import { execFileSync, spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, cpSync, createWriteStream, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import tls from "node:tls";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { Client, login, rawDb, registerUser, removeDir, startTestServer, uniqueName, WsClient } from "./helpers.js";
import { sleep, useChildServers, waitFor } from "./pipeline-helpers.js";
import { LAYOUT_VERSION } from "../src/storage/layout.js";

const main = fileURLToPath(new URL("../dist/src/main.js", import.meta.url));
const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) removeDir(d);
});

function tmp(): string {
  const d = mkdtempSync(path.join(tmpdir(), "wirechat-op-"));
  dirs.push(d);
  return d;
}

/** Runs `wirechat <args>`; the admin port of a running server, when given, is where it looks. */
function cli(args: string[], opts: { input?: string; env?: Record<string, string> } = {}): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [main, ...args], {
    encoding: "utf8",
    input: opts.input ?? "",
    env: { ...process.env, WIRECHAT_LOG_LEVEL: "warn", ...opts.env },
    timeout: 30_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A copy of backup `target`, damaged by `damage`, restores nothing into `into`: exit 1 saying `why`. */
function refusedRestore(target: string, damage: (copy: string) => void, why: RegExp, into: string): void {
  const bad = path.join(tmp(), "bad");
  cpSync(target, bad, { recursive: true });
  damage(bad);
  const failed = cli(["restore", bad, "--data-dir", into]);
  expect(failed.status).toBe(1);
  expect(failed.stderr).toMatch(why);
  expect(readdirSync(into)).toEqual([]);
}

function json(r: { status: number | null; stdout: string; stderr: string }): any {
  if (r.status !== 0) throw new Error(`exit ${r.status}: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

describe("wirechat commands on a stopped data dir", () => {
  const start = useChildServers();

  it("add, show, list, passwd, ban and del users; the server then sees all of it", async () => {
    const dir = tmp();
    const d = ["--data-dir", dir, "--bcrypt-cost", "4"];
    // No database there yet: refused unless asked to make one.
    const none = cli(["user", "add", "alice", "--pass", "pw1", ...d]);
    expect(none.status).toBe(2);
    expect(none.stderr).toMatch(/no wirechat database in .*--init creates one/);
    const alice = json(cli(["user", "add", "alice", "--pass", "pw1", "--nick", "Alice", "--init", ...d]));
    expect(alice).toMatchObject({ login: "alice", nick: "Alice", online: 0, banned: false });
    expect(alice.hash).toBeUndefined();
    // The password from stdin when --pass is not given.
    const bob = json(cli(["user", "add", "bob", ...d], { input: "pw2\n" }));
    expect(json(cli(["user", "show", "alice", ...d])).uid).toBe(alice.uid);
    expect(json(cli(["user", "show", bob.uid, ...d])).login).toBe("bob");
    const list = cli(["user", "list", ...d]);
    expect(list.status).toBe(0);
    expect(list.stdout.trim().split("\n").map((l) => l.split("\t")[1]).sort()).toEqual(["alice", "bob"]);
    expect(json(cli(["user", "passwd", "alice", "--pass", "pw3", ...d]))).toMatchObject({ uid: alice.uid });
    // Named by uid, the ban is on the login (what auth checks).
    expect(json(cli(["ban", bob.uid, "--reason", "spam", ...d]))).toMatchObject({ ban: { kind: "login", value: "bob", reason: "spam" }, closed: 0 });
    expect(json(cli(["user", "show", "bob", ...d])).banned).toBe(true);
    expect(cli(["ban", "--address", "10.0.0.1:80", ...d]).stderr).toMatch(/'10.0.0.1:80' is not an IP address/);
    const missing = cli(["user", "show", "nobody", ...d]);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/no user with login or uid 'nobody'/);
    const usage = cli(["user", "frobnicate", ...d]);
    expect(usage.status).toBe(2);
    // Asked for help or the version, a command only prints it: bob is still there.
    for (const ask of ["--help", "-h", "--version", "-v"]) {
      const r = cli(["user", "del", "bob", ask, ...d]);
      expect(r.status).toBe(0);
      expect(r.stdout).toMatch(ask.includes("v") ? /^wirechat \d+\.\d+\.\d+/ : /wirechat user del <login\|uid>/);
    }
    expect(json(cli(["user", "show", "bob", ...d])).uid).toBe(bob.uid);
    // The operator's accounts follow register's rules: none its owner could not log in with.
    for (const [args, why] of [
      [["user", "add", "", "--pass", "pw"], /'login' must not be empty/],
      [["user", "add", "two\nlines", "--pass", "pw"], /'login' must match pattern/],
      [["user", "add", "x".repeat(65), "--pass", "pw"], /'login' must NOT have more than 64 characters/],
      [["user", "add", "carol", "--pass", "pw", "--nick", "bell\u0007"], /'nick' must match pattern/],
      [["user", "passwd", "alice", "--pass", ""], /'pass' must not be empty/],
    ] as const) {
      const r = cli([...args, ...d]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(why);
    }
    for (const limit of ["abc", "-1", "0", "1001"]) expect(cli(["user", "list", "--limit", limit, ...d]).stderr).toMatch(/--limit: expected a whole number from 1 to 1000/);

    const srv = await start(["--data-dir", dir]);
    const c = await Client.connect(srv.port);
    expect((await c.request("auth", { login: "alice", pass: "pw1" })).status).toBe(2);
    expect((await c.request("auth", { login: "alice", pass: "pw3" })).status).toBe(0);
    const b = await Client.connect(srv.port);
    expect((await b.request("auth", { login: "bob", pass: "pw2" })).status).toBe(15);
    c.close();
    b.close();
  });

  it("registration closed on a stopped data dir holds when a server starts there; a --registration setting wins over it", async () => {
    const dir = tmp();
    const d = ["--data-dir", dir];
    json(cli(["user", "add", "alice", "--pass", "pw", "--init", ...d]));
    expect(json(cli(["registration", ...d]))).toEqual({ registration: "open" });
    expect(json(cli(["registration", "closed", ...d]))).toEqual({ registration: "closed" });
    expect(json(cli(["registration", ...d]))).toEqual({ registration: "closed" });
    // Stored all the same, but a configured value would win at start-up: said so.
    const overridden = cli(["registration", "closed", ...d, "--registration", "open"]);
    expect(JSON.parse(overridden.stdout)).toEqual({ registration: "closed" });
    expect(overridden.stderr).toMatch(/stored, but this configuration's --registration open wins when the server starts/);
    const bad = cli(["registration", "maybe", ...d]);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/registration open\|closed/);
    const register = async (port: number) => {
      const c = await Client.connect(port);
      const status = (await c.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status;
      c.close();
      return status;
    };
    let srv = await start(d);
    expect(await register(srv.port)).toBe(15);
    expect(json(cli(["registration", ...d, "--admin-port", String(srv.adminPort)]))).toEqual({ registration: "closed" });
    srv.proc.kill("SIGTERM");
    await srv.exited;
    // Configured, it wins at start-up (the stored setting stays as it was).
    srv = await start([...d, "--registration", "open"]);
    expect(await register(srv.port)).toBe(0);
    srv.proc.kill("SIGTERM");
    await srv.exited;
    // Set empty, it is unset: the stored setting again.
    srv = await start([...d, "--registration="]);
    expect(await register(srv.port)).toBe(15);
  });

  it("user del on a stopped data dir finishes the account's clean-up before it exits", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = await registerUser(srv.port);
    const b = await registerUser(srv.port);
    for (let i = 0; i < 3; i++) expect((await a.client.request("message", { uid: a.uid, body: `note to self ${i}` })).status).toBe(0);
    const chid = (await a.client.request("createchannel", { name: uniqueName("own") })).chid;
    expect((await a.client.request("message", { channel: chid, body: "in a's own channel" })).status).toBe(0);
    expect((await a.client.request("message", { uid: b.uid, body: "to b, kept for b" })).status).toBe(0);
    a.client.close();
    b.client.close();
    srv.proc.kill("SIGTERM");
    await srv.exited;
    expect(json(cli(["user", "del", a.login, "--data-dir", dir]))).toEqual({ uid: a.uid });
    // Before, the clean-up was stopped as the command closed: the notes and the owned
    // channel's messages stayed until some server started on the data dir.
    const out = cli(["export", "--data-dir", dir, "--log-level", "error"]);
    expect(out.status).toBe(0);
    expect(out.stdout).not.toMatch(/note to self|in a's own channel/);
    expect(out.stdout).toContain("to b, kept for b");
  });

  it("exports a user's data as NDJSON without password hashes", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = await registerUser(srv.port);
    const b = await registerUser(srv.port);
    // More than a page of export's reads (64), in order across the pages.
    const bodies = Array.from({ length: 150 }, (_, i) => `hello b ${i}`);
    for (const body of bodies) a.client.send("message", { uid: b.uid, body });
    for (const _ of bodies) expect((await a.client.reply("message")).data.status).toBe(0);
    const room = uniqueName("room");
    const chid = (await a.client.request("createchannel", { name: room })).chid;
    a.client.close();
    b.client.close();
    srv.proc.kill("SIGTERM");
    await srv.exited;
    const out = cli(["export", "--user", a.login, "--data-dir", dir]);
    expect(out.status).toBe(0);
    const lines = out.stdout.trim().split("\n").map((l) => JSON.parse(l));
    expect(lines.find((l) => l.type === "user")).toMatchObject({ uid: a.uid, login: a.login });
    expect(out.stdout).not.toMatch(/"hash"/);
    expect(lines.filter((l) => l.type === "message").map((l) => l.body)).toEqual(bodies);
    // Its memberships, and the channels they name.
    expect(lines.filter((l) => l.type === "membership")).toEqual([{ type: "membership", uid: a.uid, chid }]);
    expect(lines.filter((l) => l.type === "channel")).toEqual([expect.objectContaining({ type: "channel", chid, name: room, owner: a.uid })]);
    const all = cli(["export", "--data-dir", dir]);
    expect(all.stdout.trim().split("\n").filter((l) => JSON.parse(l).type === "user")).toHaveLength(2);
    expect(all.stdout).toContain(`"type":"channel","chid":"${chid}"`);
    // An empty --user (a script's unset variable) names nobody: refused, not everyone's data.
    const empty = cli(["export", "--user", "", "--data-dir", dir]);
    expect(empty).toMatchObject({ status: 2, stdout: "" });
    expect(empty.stderr).toMatch(/--user needs a login or uid/);
  });

  it("refuses a database of a newer layout (a newer wirechat's): the server does not start, the CLI does not open it, and it stays as it was", async () => {
    const dir = tmp();
    const d = ["--data-dir", dir, "--bcrypt-cost", "4"];
    json(cli(["user", "add", "erin", "--pass", "pw", "--init", ...d]));
    let db = await rawDb(dir);
    await db.put("!meta!layout", String(LAYOUT_VERSION + 1));
    const before = await db.iterator().all();
    await db.close();
    await expect(startTestServer({ dataDir: dir })).rejects.toThrow(new RegExp(`has layout ${LAYOUT_VERSION + 1}, newer than this server's ${LAYOUT_VERSION}: upgrade wirechat`));
    for (const args of [["user", "list"], ["export"]]) {
      const r = cli([...args, ...d]);
      expect(r.status).toBe(2);
      expect(r.stderr).toMatch(/newer than this/);
    }
    db = await rawDb(dir);
    expect(await db.iterator().all()).toEqual(before);
    await db.close();
  });

  it("refuses a cluster node's view and a database of an older layout, and leaves both as they were", async () => {
    const dir = tmp();
    const d = ["--data-dir", dir, "--bcrypt-cost", "4"];
    json(cli(["user", "add", "carol", "--pass", "pw", "--init", ...d]));
    // What an older wirechat left: layout 4 (opening it would migrate it).
    let db = await rawDb(dir);
    await db.put("!meta!layout", "4");
    await db.close();
    for (const args of [["user", "list"], ["backup", path.join(tmp(), "b")], ["export"]]) {
      const r = cli([...args, ...d]);
      expect(r.status).toBe(2);
      expect(r.stderr).toMatch(/has layout 4, older than this wirechat's \d+: start the server on it once to migrate it/);
    }
    db = await rawDb(dir);
    expect(await db.get("!meta!layout")).toBe("4");
    // A cluster node's view (its log position in meta): writes only through a node.
    await db.batch([
      { type: "del", key: "!meta!layout" },
      { type: "put", key: "!meta!layout", value: String(LAYOUT_VERSION) },
      { type: "put", key: "!meta!cluster", value: "12" },
    ]);
    await db.close();
    const r = cli(["user", "add", "dave", "--pass", "pw", ...d]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/is a cluster node's view of the log: give --nats/);
    db = await rawDb(dir);
    await db.del("!meta!cluster");
    await db.close();
    const list = cli(["user", "list", ...d]);
    expect(list.status).toBe(0);
    expect(list.stdout.trim().split("\n").map((line) => line.split("\t")[1])).toEqual(["carol"]);
  });

  it("a backup whose disk fills up fails with the reason, takes back what it wrote there, and the data dir is unharmed", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = await registerUser(srv.port);
    const b = await registerUser(srv.port);
    for (let i = 0; i < 200; i++) expect((await a.client.request("message", { uid: b.uid, body: `${i} ${"x".repeat(1000)}` })).status).toBe(0);
    a.client.close();
    b.client.close();
    srv.proc.kill("SIGTERM");
    await srv.exited;
    // The target is a 64 KiB filesystem of its own (a mount namespace: no privilege
    // needed), far smaller than the ~200 KB of lines. The write failed there while
    // the backup waited on LevelDB: an 'error' nobody listened for ended the process
    // (or the backup waited for ever on a closed file). What it wrote there goes (a
    // full disk left full holds the server's own writes if it is the data dir's): the
    // script lists the filesystem after it.
    const mnt = tmp();
    // Into `new/b`: the parent it made for it goes too.
    const script = `mount -t tmpfs -o size=64k none "$1" || exit 9; "$2" "$3" backup "$1/new/b" --data-dir "$4"; rc=$?; ls -A "$1"; exit $rc`;
    const r = spawnSync("unshare", ["-rm", "sh", "-c", script, "sh", mnt, process.execPath, main, dir], {
      encoding: "utf8",
      env: { ...process.env, WIRECHAT_LOG_LEVEL: "warn" },
      timeout: 30_000,
    });
    expect(r.error).toBeUndefined();
    expect({ status: r.status, stdout: r.stdout }).toEqual({ status: 1, stdout: "" });
    expect(r.stderr).toMatch(/^wirechat backup: cannot write a backup into \S+\/new\/b: ENOSPC/);
    // No room for even its first file (three inodes: the root, new, b): what it made goes.
    const inodes = script.replace("size=64k", "size=64k,nr_inodes=3");
    const r0 = spawnSync("unshare", ["-rm", "sh", "-c", inodes, "sh", tmp(), process.execPath, main, dir], {
      encoding: "utf8",
      env: { ...process.env, WIRECHAT_LOG_LEVEL: "warn" },
      timeout: 30_000,
    });
    expect({ status: r0.status, stdout: r0.stdout }).toEqual({ status: 1, stdout: "" });
    expect(r0.stderr).toMatch(/ENOSPC.*db\.ndjson/);
    // Nothing of the data dir changed: a backup to a roomy place has all of it.
    const ok = json(cli(["backup", path.join(tmp(), "b"), "--data-dir", dir]));
    expect(ok).toMatchObject({ missing: 0 });
    expect(ok.keys).toBeGreaterThan(200);
  });
});

describe("an operator's mistakes on a stopped data dir", () => {
  it("a word too many, a login and --address together, a long ban reason: refused before anything is done", () => {
    const dir = tmp();
    const d = ["--data-dir", dir, "--bcrypt-cost", "4"];
    const mallory = json(cli(["user", "add", "mallory", "--pass", "pw", "--init", ...d]));
    json(cli(["user", "add", "bob", "--pass", "pw", ...d]));
    // `user del mallory bob` deleted mallory and said nothing of bob.
    const two = cli(["user", "del", "mallory", "bob", ...d]);
    expect(two.status).toBe(2);
    expect(two.stderr).toMatch(/unexpected 'bob'/);
    // `ban mallory --address <ip>` banned the address alone.
    const both = cli(["ban", "mallory", "--address", "198.51.100.7", ...d]);
    expect(both.status).toBe(2);
    expect(both.stderr).toMatch(/either a login or --address, not both/);
    expect(cli(["unban", "mallory", "--address", "198.51.100.7", ...d]).status).toBe(2);
    expect(cli(["kick", "mallory", "bob", ...d]).status).toBe(2);
    expect(cli(["export", "mallory", ...d]).status).toBe(2);
    // The admin port's rule for a reason, here too (it was unbounded offline).
    const long = cli(["ban", "mallory", "--reason", "r".repeat(257), ...d]);
    expect(long.status).toBe(1);
    expect(long.stderr).toMatch(/the reason is over 256 characters/);
    expect(json(cli(["user", "show", "mallory", ...d]))).toMatchObject({ uid: mallory.uid, banned: false });
    expect(json(cli(["user", "show", "bob", ...d])).login).toBe("bob");
    expect(json(cli(["ban", "mallory", "--reason", "r".repeat(256), ...d])).ban.reason).toHaveLength(256);
  });

  it("export into a pipe whose reader has gone ends quietly (no stack trace)", async () => {
    const dir = tmp();
    const d = ["--data-dir", dir, "--bcrypt-cost", "4"];
    json(cli(["user", "add", "erin", "--pass", "pw", "--init", ...d]));
    // The reader closes before the first line is written: `wirechat export | head -c 0`.
    const child = spawn(process.execPath, [main, "export", ...d], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, WIRECHAT_LOG_LEVEL: "warn" } });
    child.stdout.destroy();
    let stderr = "";
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((resolve) => child.on("exit", (c) => resolve(c)));
    expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
  });

  it("restore: a damaged or missing backup.json is named; a failed restore takes back the directories it made", () => {
    const dir = tmp();
    json(cli(["user", "add", "fay", "--pass", "pw", "--init", "--data-dir", dir, "--bcrypt-cost", "4"]));
    const target = path.join(tmp(), "b");
    json(cli(["backup", target, "--data-dir", dir]));
    const bad = path.join(tmp(), "bad");
    cpSync(target, bad, { recursive: true });
    writeFileSync(path.join(bad, "backup.json"), "{bad json");
    const into = tmp();
    const r1 = cli(["restore", bad, "--data-dir", path.join(into, "new", "data")]);
    expect(r1.status).toBe(1);
    expect(r1.stderr).toContain(`${path.join(bad, "backup.json")}: not valid JSON`);
    const r2 = cli(["restore", dir, "--data-dir", path.join(into, "new", "data")]);
    expect(r2.status).toBe(1);
    expect(r2.stderr).toContain(`${dir} holds no backup.json: not a wirechat backup`);
    // Cut short: the staging fails after the data dir and its parent were made.
    const cut = path.join(tmp(), "cut");
    cpSync(target, cut, { recursive: true });
    const lines = readFileSync(path.join(cut, "db.ndjson"), "utf8").split("\n");
    writeFileSync(path.join(cut, "db.ndjson"), lines.slice(0, 3).join("\n") + "\n");
    const r3 = cli(["restore", cut, "--data-dir", path.join(into, "new", "data")]);
    expect(r3.status).toBe(1);
    expect(readdirSync(into)).toEqual([]);
  });
});

describe("wirechat commands on a running server (through its admin port)", () => {
  const start = useChildServers();

  it("reaches a server whose admin port is on another loopback address, with no token", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir, "--admin-host", "127.0.0.2"]);
    // It named 127.0.0.2 as its Host, and its own server refused it (403).
    const r = cli(["user", "list", "--data-dir", dir, "--admin-host", "127.0.0.2", "--admin-port", String(srv.adminPort)]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
  });

  it("user add, kick, registration, ban --address and user del go through the admin port", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = ["--data-dir", dir, "--admin-port", String(srv.adminPort)];
    const carol = json(cli(["user", "add", "carol", "--pass", "pw", ...a]));
    const c = await login(srv.port, "carol", "pw");
    expect(json(cli(["user", "show", "carol", ...a]))).toMatchObject({ uid: carol.uid, online: 1 });
    // Logins a URL or an option parser could take for something else: ".." and "."
    // (path segments) and one starting with "-" (after "--").
    for (const name of ["..", ".", "-dash"]) {
      const made = json(cli(["user", "add", "--pass", "pw", ...a, "--", name]));
      expect(json(cli(["user", "show", ...a, "--", name]))).toMatchObject({ uid: made.uid, login: name });
    }
    expect(json(cli(["kick", "carol", ...a]))).toEqual({ uid: carol.uid, connections: 1 });
    await c.client.closed;
    expect(json(cli(["registration", "closed", ...a]))).toEqual({ registration: "closed" });
    const r = await Client.connect(srv.port);
    expect((await r.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status).toBe(15);
    r.close();
    // Stored: it outlives a restart.
    srv.proc.kill("SIGTERM");
    await srv.exited;
    const again = await start(["--data-dir", dir]);
    a[3] = String(again.adminPort);
    const r2 = await Client.connect(again.port);
    expect((await r2.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status).toBe(15);
    expect(json(cli(["registration", ...a]))).toEqual({ registration: "closed" });
    expect(json(cli(["registration", "open", ...a]))).toEqual({ registration: "open" });
    expect((await r2.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status).toBe(0);
    r2.close();
    expect(json(cli(["user", "del", "carol", ...a]))).toEqual({ uid: carol.uid });
    const gone = cli(["user", "show", "carol", ...a]);
    expect(gone.status).toBe(1);
    expect(gone.stderr).toMatch(/no user/);
    const ban = json(cli(["ban", "--address", "10.9.8.7", "--reason", "test", ...a]));
    expect(ban).toMatchObject({ ban: { kind: "addr", value: "10.9.8.7" }, closed: 0 });
    expect(json(cli(["unban", "--address", "10.9.8.7", ...a]))).toEqual({ lifted: true });
    // Another server's admin port is not this data dir's: refused, nothing done there.
    const otherDir = tmp();
    const other = await start(["--data-dir", otherDir]);
    const dave = json(cli(["user", "add", "dave", "--pass", "pw", "--data-dir", otherDir, "--admin-port", String(other.adminPort)]));
    const wrong = cli(["user", "del", "dave", "--data-dir", dir, "--admin-port", String(other.adminPort)]);
    expect(wrong.status).toBe(2);
    expect(wrong.stderr).toMatch(/belongs to the server on .*, not to the one holding .*: give its --admin-port/);
    expect(cli(["export", "--data-dir", dir, "--admin-port", String(other.adminPort)]).stderr).toMatch(/belongs to the server on/);
    expect(json(cli(["user", "show", "dave", "--data-dir", otherDir, "--admin-port", String(other.adminPort)])).uid).toBe(dave.uid);
    // Export streams through the admin port; its refusals come back as the server said them.
    const viaOther = ["--data-dir", otherDir, "--admin-port", String(other.adminPort)];
    const exported = cli(["export", "--user", "dave", ...viaOther]);
    expect(exported.status).toBe(0);
    expect(exported.stdout.trim().split("\n").map((l) => JSON.parse(l)).find((l) => l.type === "user")).toMatchObject({ uid: dave.uid, login: "dave" });
    const nobody = cli(["export", "--user", "nobody-here", ...viaOther]);
    expect({ status: nobody.status, stdout: nobody.stdout }).toEqual({ status: 1, stdout: "" });
    expect(nobody.stderr).toMatch(/no user/);
  });

  it("user add takes what register takes (a login with combining marks), and user list goes past a page", async () => {
    const dir = tmp();
    // (An operator's accounts take from one --auth-burst too.)
    const srv = await start(["--data-dir", dir, "--auth-burst", "5000"]);
    const a = ["--data-dir", dir, "--admin-port", String(srv.adminPort)];
    // The admin route had a login pattern of its own, without marks: नमस्ते was refused.
    const made = json(cli(["user", "add", "नमस्ते", "--pass", "pw", ...a]));
    expect(made.login).toBe("नमस्ते");
    expect((await login(srv.port, "नमस्ते", "pw")).auth.uid).toBe(made.uid);
    const bad = cli(["user", "add", "a b", "--pass", "pw", ...a]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/'login' must match pattern/);
    // 1,001 users: past one page of the admin port (1,000). It stopped at 100 unasked.
    const ap = srv.adminPort as number;
    for (let i = 0; i < 1000; i++) {
      const r = await fetch(`http://127.0.0.1:${ap}/users`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ login: `u${i}`, pass: "pw" }) });
      expect({ i, status: r.status, body: r.status === 201 ? "" : await r.text() }).toEqual({ i, status: 201, body: "" });
    }
    const all = cli(["user", "list", ...a]);
    expect(all.status).toBe(0);
    expect(all.stdout.trim().split("\n")).toHaveLength(1001);
    expect(cli(["user", "list", "--limit", "10", ...a]).stdout.trim().split("\n")).toHaveLength(10);
    // /unban takes no reason (a key the route does not take is a 400).
    const unban = await fetch(`http://127.0.0.1:${ap}/unban`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ address: "192.0.2.1", reason: "x" }) });
    expect(unban.status).toBe(400);
    const long = cli(["ban", "--address", "192.0.2.1", "--reason", "r".repeat(300), ...a]);
    expect(long.status).toBe(1);
    expect(long.stderr).toMatch(/the reason is over 256 characters/);
  });

  it("ban <login> and ban --address on a running server close the connections they name and refuse them until unban", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = ["--data-dir", dir, "--admin-port", String(srv.adminPort)];
    const erin = json(cli(["user", "add", "erin", "--pass", "pw", ...a]));
    const two = [await login(srv.port, "erin", "pw"), await login(srv.port, "erin", "pw")];
    expect(json(cli(["ban", "erin", "--reason", "spam", ...a]))).toMatchObject({ ban: { kind: "login", value: "erin" }, closed: 2 });
    await Promise.all(two.map((c) => c.client.closed));
    const refused = await Client.connect(srv.port);
    expect((await refused.request("auth", { login: "erin", pass: "pw" })).status).toBe(15);
    refused.close();
    expect(json(cli(["user", "show", "erin", ...a]))).toMatchObject({ uid: erin.uid, banned: true, online: 0 });
    expect(json(cli(["unban", "erin", ...a]))).toEqual({ lifted: true });
    const back = await login(srv.port, "erin", "pw");
    expect(back.auth.uid).toBe(erin.uid);
    // An address: the client's (the admin port's own requests are not the TCP door's).
    expect(json(cli(["ban", "--address", "127.0.0.1", ...a]))).toMatchObject({ ban: { kind: "addr", value: "127.0.0.1" }, closed: 1 });
    await back.client.closed;
    const shut = await Client.connect(srv.port, { welcome: false });
    await shut.closed;
    expect(shut.lines.join("\n")).toMatch(/banned/);
    expect(json(cli(["unban", "--address", "127.0.0.1", ...a]))).toEqual({ lifted: true });
    expect((await login(srv.port, "erin", "pw")).auth.uid).toBe(erin.uid);
  });

  it("says so when the data dir is in use and the admin port does not answer", async () => {
    const dir = tmp();
    await start(["--data-dir", dir, "--admin", "off"]);
    const r = cli(["user", "list", "--data-dir", dir, "--admin-port", "1"]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/the data dir is in use and the admin port http:\/\/127.0.0.1:1 does not answer/);
  });

  it("a server whose admin port is taken says which port, and why", async () => {
    const net = await import("node:net");
    const taken = net.createServer();
    await new Promise<void>((r) => taken.listen(0, "127.0.0.1", () => r()));
    const port = (taken.address() as { port: number }).port;
    const r = cli(["--data-dir", tmp(), "--port", "0", "--admin-port", String(port)]);
    taken.close();
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`cannot listen on the admin port 127\\.0\\.0\\.1:${port} \\(set --admin-port, or --admin off\\) \\(listen EADDRINUSE`));
  });

  it("a data dir, backup or restore directory that cannot be made fails with the reason, at once", () => {
    // Under /proc, Node's own recursive mkdir spins forever (the process hung at 100 %).
    const r = cli(["--data-dir", "/proc/wirechat-data/x", "--port", "0", "--admin", "off"]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/ENOENT.*\/proc\/wirechat-data/);
    const dir = tmp();
    json(cli(["user", "add", "dora", "--pass", "pw", "--init", "--data-dir", dir, "--bcrypt-cost", "4"]));
    const b = cli(["backup", "/proc/wirechat-backup", "--data-dir", dir]);
    expect(b.status).toBe(1);
    expect(b.stderr).toMatch(/cannot write a backup into \/proc\/wirechat-backup.*ENOENT/);
    const target = path.join(tmp(), "b");
    json(cli(["backup", target, "--data-dir", dir]));
    const back = cli(["restore", target, "--data-dir", "/proc/wirechat-restore"]);
    expect(back.status).toBe(1);
    expect(back.stderr).toMatch(/ENOENT.*\/proc\/wirechat-restore/);
  });

  it("a second server on the same data dir fails with the reason", async () => {
    const dir = tmp();
    await start(["--data-dir", dir]);
    const r = cli(["--data-dir", dir, "--port", "0", "--admin-port", "0"]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/is locked: another wirechat is running on this data dir/);
  });

  it("backs up a server under message load; the restored copy has every message acknowledged before it", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = await registerUser(srv.port);
    const b = await registerUser(srv.port);
    const acked: string[] = [];
    let stop = false;
    const load = (async () => {
      for (let i = 0; !stop; i++) {
        const r = await a.client.request("message", { uid: b.uid, body: `load ${i}` });
        if (r.status === 0) acked.push(r.mid);
      }
    })();
    await waitFor(() => acked.length >= 200, 10_000, "200 messages acknowledged");
    const before = acked.length;
    const target = path.join(tmp(), "backup");
    const info = json(cli(["backup", target, "--data-dir", dir, "--admin-port", String(srv.adminPort)]));
    stop = true;
    await load;
    expect(info).toMatchObject({ format: 1, server: "wirechat", missing: 0 });
    expect(acked.length).toBeGreaterThan(before); // the load went on during the backup
    const restored = tmp();
    // A damaged backup (cut short, or a line that is not a pair) restores nothing: the
    // data dir holds no database afterwards and takes the good backup next.
    const lines = readFileSync(path.join(target, "db.ndjson"), "utf8").split("\n");
    for (const [damage, why] of [
      [lines.slice(0, 50).join("\n") + "\n", /lists \d+ keys but db.ndjson holds 50: it is incomplete/],
      [lines.slice(0, 50).join("\n") + '\n["half', /line 51 is not a \[key, value\] pair/],
      ["5\n" + lines.join("\n"), /line 1 is not a \[key, value\] pair/],
    ] as const) {
      refusedRestore(target, (bad) => writeFileSync(path.join(bad, "db.ndjson"), damage), why, restored);
    }
    // Into a data dir that did not exist: none is left behind.
    const fresh = path.join(tmp(), "new", "data");
    const damaged = path.join(tmp(), "bad");
    cpSync(target, damaged, { recursive: true });
    writeFileSync(path.join(damaged, "db.ndjson"), "5\n" + lines.join("\n"));
    expect(cli(["restore", damaged, "--data-dir", fresh]).status).toBe(1);
    expect(existsSync(fresh)).toBe(false);
    const r = cli(["restore", target, "--data-dir", restored]);
    expect(r.status).toBe(0);
    expect(cli(["restore", target, "--data-dir", restored]).stderr).toMatch(/already holds a database/);
    const exported = cli(["export", "--data-dir", restored]);
    expect(exported.status).toBe(0);
    const mids = new Set(exported.stdout.trim().split("\n").map((l) => JSON.parse(l)).filter((l) => l.type === "message").map((l) => l.mid));
    const lost = acked.slice(0, before).filter((m) => !mids.has(m));
    expect(lost).toEqual([]);
    // And a server starts on it, with the accounts.
    const again = await start(["--data-dir", restored]);
    const c = await Client.connect(again.port);
    expect((await c.request("auth", { login: a.login, pass: "secret" })).status).toBe(0);
    c.close();
  });

  it("restores attachment files only when each holds the bytes its sha-256 names", async () => {
    const dir = tmp();
    const srv = await start(["--data-dir", dir]);
    const a = await registerUser(srv.port);
    const b = await registerUser(srv.port);
    const bytes = Buffer.from(`restored attachment ${Math.random()} `.repeat(40));
    const sent = await a.client.request("message", { uid: b.uid, body: "file", attach: { mime: "text/plain", data: bytes.toString("base64") } });
    expect(sent.status).toBe(0);
    const sha = createHash("sha256").update(bytes).digest("hex");
    const target = path.join(tmp(), "backup");
    expect(json(cli(["backup", target, "--data-dir", dir, "--admin-port", String(srv.adminPort)]))).toMatchObject({ blobs: 1, missing: 0 });
    a.client.close();
    b.client.close();
    const file = path.join("blobs", sha.slice(0, 2), sha);
    const restored = tmp();
    // One byte changed, or a file not named by a sha-256: nothing is restored.
    for (const [damage, why] of [
      [(bad: string) => writeFileSync(path.join(bad, file), Buffer.concat([bytes.subarray(0, 10), Buffer.from("X"), bytes.subarray(11)])), /does not hold the bytes its name's sha-256 says/],
      [(bad: string) => execFileSync("cp", [path.join(bad, file), path.join(bad, "blobs", sha.slice(0, 2), "notes.txt")]), /is not an attachment file/],
      // The file lost since the backup was made, backup.json counting what is there:
      // the message naming it is not restored without it.
      [
        (bad: string) => {
          execFileSync("rm", [path.join(bad, file)]);
          const info = JSON.parse(readFileSync(path.join(bad, "backup.json"), "utf8"));
          writeFileSync(path.join(bad, "backup.json"), JSON.stringify({ ...info, blobs: 0 }));
        },
        /names attachment file blobs\/[0-9a-f]{2}\/[0-9a-f]{64}, which the backup does not hold: it is incomplete/,
      ],
      // Made by a newer wirechat: refused before anything is written.
      [
        (bad: string) => {
          const info = JSON.parse(readFileSync(path.join(bad, "backup.json"), "utf8"));
          writeFileSync(path.join(bad, "backup.json"), JSON.stringify({ ...info, layout: info.layout + 1 }));
        },
        /newer than this wirechat's/,
      ],
    ] as const) {
      refusedRestore(target, damage, why, restored);
    }
    // Missing when the backup was made (backup.json says so): restored, and said.
    const partial = path.join(tmp(), "partial");
    cpSync(target, partial, { recursive: true });
    execFileSync("rm", [path.join(partial, file)]);
    const info = JSON.parse(readFileSync(path.join(partial, "backup.json"), "utf8"));
    writeFileSync(path.join(partial, "backup.json"), JSON.stringify({ ...info, blobs: 0, missing: 1 }));
    const warned = cli(["restore", partial, "--data-dir", tmp()]);
    expect(warned.status).toBe(0);
    expect(warned.stderr).toMatch(/1 attachment files were missing when the backup was made/);
    const r = cli(["restore", target, "--data-dir", restored]);
    expect(r.status).toBe(0);
    expect(readFileSync(path.join(restored, file))).toEqual(bytes);
  });

  it("a restore stopped by SIGINT or killed outright leaves nothing the next one trips on; two at once: one is refused", async () => {
    const dir = tmp();
    const users = ["alice", "bob"].map((u) => json(cli(["user", "add", u, "--pass", "pw", "--init", "--data-dir", dir, "--bcrypt-cost", "4"])));
    const good = path.join(tmp(), "backup");
    json(cli(["backup", good, "--data-dir", dir]));
    const lines = readFileSync(path.join(good, "db.ndjson"), "utf8").split("\n").filter((l) => l !== "");
    // The same backup with db.ndjson a FIFO: a restore reading it waits for each line.
    const slow = path.join(tmp(), "slow");
    mkdirSync(slow);
    copyFileSync(path.join(good, "backup.json"), path.join(slow, "backup.json"));
    execFileSync("mkfifo", [path.join(slow, "db.ndjson")]);
    const into = path.join(tmp(), "restored");
    const staged = () => readdirSync(into).filter((n) => n.startsWith(".restore"));
    /** A restore that has read two lines and waits for more. */
    const stuck = async () => {
      const child = spawn(process.execPath, [main, "restore", slow, "--data-dir", into], { stdio: ["ignore", "pipe", "pipe"] });
      let stderr = "";
      child.stderr.on("data", (d) => (stderr += d));
      const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
      const feed = createWriteStream(path.join(slow, "db.ndjson")).on("error", () => {}); // EPIPE once killed
      feed.write(lines.slice(0, 2).join("\n") + "\n");
      await waitFor(() => existsSync(into) && staged().length === 2, 10_000, "the staging dir and the lock");
      return { child, feed, exited, stderr: () => stderr };
    };

    const first = await stuck();
    const second = cli(["restore", good, "--data-dir", into]);
    expect(second.status).toBe(1);
    expect(second.stderr).toMatch(new RegExp(`another restore into .* is running \\(pid ${first.child.pid}\\)`));
    // No server starts on the data dir while it runs (its own database there would
    // have taken the backup's attachment files).
    const server = cli(["--data-dir", into, "--port", "0", "--admin", "off"]);
    expect(server.status).toBe(1);
    expect(server.stderr).toMatch(new RegExp(`a restore into .* is running \\(pid ${first.child.pid}\\)`));
    expect(existsSync(path.join(into, "db"))).toBe(false);
    // A lock naming the starting process's own pid is a killed restore's (pid 1 in a
    // container, every time): not taken for a running one.
    const reused = tmp();
    writeFileSync(path.join(reused, ".restore.lock"), `${process.pid}\n`);
    const srv = await startTestServer({ dataDir: reused });
    await srv.stop();
    first.child.kill("SIGINT");
    // The signal stops the read where it waits; a FIFO holds a read until bytes come
    // (a file never does), so one more line lets it return.
    await sleep(200);
    first.feed.end(lines[2] + "\n");
    expect(await first.exited).toBe(130);
    expect(first.stderr()).toMatch(/stopped by SIGINT; .* is as it was before/);
    // As it was: not there (the restore made it).
    expect(existsSync(into)).toBe(false);

    const killed = await stuck();
    killed.child.kill("SIGKILL");
    await killed.exited;
    killed.feed.destroy();
    expect(staged()).toHaveLength(2); // its staging dir and its lock, left behind
    const r = cli(["restore", good, "--data-dir", into]);
    expect(r.status).toBe(0);
    expect(readdirSync(into)).toEqual(["db"]);
    const listed = cli(["user", "list", "--data-dir", into]);
    expect(listed.stdout.trim().split("\n").map((l) => l.split("\t")[1]).sort()).toEqual(users.map((u) => u.login).sort());
  });

  it("logs one line per failed login with the address and the login (for fail2ban)", async () => {
    const srv = await start([]);
    const a = await registerUser(srv.port);
    const c = await Client.connect(srv.port);
    await c.request("auth", { login: a.login, pass: "nope" });
    await c.request("auth", { login: "ghost-user", pass: "nope" });
    await waitFor(() => (srv.stdout().match(/"msg":"failed login"/g) ?? []).length >= 2, 5000, "two failed-login lines");
    const lines = srv.stdout().split("\n").filter((l) => l.includes('"msg":"failed login"')).map((l) => JSON.parse(l));
    expect(lines[0]).toMatchObject({ level: 40, remote: "127.0.0.1", login: a.login });
    expect(lines[1]).toMatchObject({ remote: "127.0.0.1", login: "ghost-user" });
    c.close();
    a.client.close();
  });
});

describe("configuration and signals", () => {
  const start = useChildServers();

  it("wirechat check validates a config file without starting; flags and env win over it", () => {
    const dir = tmp();
    const good = path.join(dir, "good.json");
    writeFileSync(good, JSON.stringify({ port: 7799, "data-dir": "/srv/wc", "admin-port": 9199 }));
    const ok = cli(["check", "--config", good]);
    expect(ok.status).toBe(0);
    expect(ok.stdout).toMatch(/port 7799, data dir \/srv\/wc, admin 127\.0\.0\.1:9199/);
    expect(cli(["check", "--config", good, "--port", "7000"]).stdout).toMatch(/port 7000,/);
    expect(cli(["check", "--config", good], { env: { WIRECHAT_PORT: "7001" } }).stdout).toMatch(/port 7001,/);
    expect(cli(["check"], { env: { WIRECHAT_CONFIG: good } }).stdout).toMatch(/port 7799,/);
    const bad = path.join(dir, "bad.json");
    writeFileSync(bad, JSON.stringify({ port: "x" }));
    const r = cli(["check", "--config", bad]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/bad\.json: "port": expected a whole number/);
    writeFileSync(bad, JSON.stringify({ prot: 1 }));
    expect(cli(["check", "--config", bad]).stderr).toMatch(/unknown setting "prot"/);
    writeFileSync(bad, "{");
    expect(cli(["check", "--config", bad]).stderr).toMatch(/not valid JSON/);
    expect(cli(["check", "--config", path.join(dir, "none.json")]).stderr).toMatch(/cannot read the config file/);
    // What start-up would read: a certificate and key that are not there fail the check.
    const tlsMissing = cli(["check", "--tls-cert", path.join(dir, "none.crt"), "--tls-key", path.join(dir, "none.key")]);
    expect(tlsMissing.status).toBe(2);
    expect(tlsMissing.stderr).toMatch(/--tls-cert .*none\.crt .*ENOENT/);
    expect(cli(["check", "--tls-cert", fixture("localhost.crt"), "--tls-key", fixture("localhost.key")]).status).toBe(0);
  });

  it("the packaged example config and systemd unit's settings pass wirechat check", () => {
    const example = fileURLToPath(new URL("../packaging/wirechat.example.json", import.meta.url));
    const r = cli(["check", "--config", example, "--data-dir", "/var/lib/wirechat"]);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/port 7788, data dir \/var\/lib\/wirechat, admin 127\.0\.0\.1:9090/);
    // README shows it as it is (it showed registration closed, which the file does not say).
    const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
    const at = readme.indexOf("[packaging/wirechat.example.json](packaging/wirechat.example.json)");
    const block = /```json\n([\s\S]*?)```/.exec(readme.slice(at))?.[1];
    expect(JSON.parse(block ?? "null")).toEqual(JSON.parse(readFileSync(example, "utf8")));
  });

  it("prints its version", () => {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
    expect(execFileSync(process.execPath, [main, "--version"], { encoding: "utf8" })).toBe(`wirechat ${pkg.version}\n`);
    expect(execFileSync(process.execPath, [main, "version"], { encoding: "utf8" })).toBe(`wirechat ${pkg.version}\n`);
    // As every command: a word too many is refused, --help prints the help.
    const extra = cli(["version", "extra"]);
    expect({ status: extra.status, stderr: extra.stderr }).toEqual({ status: 2, stderr: expect.stringMatching(/unexpected 'extra'/) });
    expect(cli(["version", "--help"]).stdout).toMatch(/^Operator commands/);
    // A bad variable (or config file) does not keep it from printing the version.
    expect(cli(["version"], { env: { WIRECHAT_PORT: "abc" } })).toMatchObject({ status: 0, stdout: `wirechat ${pkg.version}\n` });
    // Everywhere: the chat client and help too.
    for (const args of [["chat", "--version"], ["chat", "-v", "--login", "x"], ["help", "--version"], ["serve", "-v"]]) {
      expect(execFileSync(process.execPath, [main, ...args], { encoding: "utf8" })).toBe(`wirechat ${pkg.version}\n`);
    }
  });

  it("SIGHUP swaps the TLS certificate for new handshakes, keeps connections, and reloads settings", async () => {
    const dir = tmp();
    const cert = path.join(dir, "cert.pem");
    const key = path.join(dir, "key.pem");
    copyFileSync(fixture("localhost.crt"), cert);
    copyFileSync(fixture("localhost.key"), key);
    const conf = path.join(dir, "wirechat.json");
    writeFileSync(conf, JSON.stringify({ registration: "open" }));
    const srv = await start(["--tls-port", "0", "--tls-cert", cert, "--tls-key", key, "--config", conf]);
    const tlsPort = Number(/"tlsPort":(\d+)/.exec(srv.stdout())?.[1]);
    const fingerprint = () =>
      new Promise<string>((resolve, reject) => {
        const s = tls.connect({ port: tlsPort, host: "127.0.0.1", rejectUnauthorized: false }, () => {
          resolve(s.getPeerCertificate().fingerprint256);
          s.destroy();
        });
        s.on("error", reject);
      });
    const first = await fingerprint();
    const ca = readFileSync(fixture("localhost.crt"));
    const kept = await Client.connectTls(tlsPort, ca);
    // A new certificate and key in the same files, then SIGHUP.
    execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost"], { stdio: "ignore" });
    writeFileSync(conf, JSON.stringify({ registration: "closed" }));
    srv.proc.kill("SIGHUP");
    await waitFor(() => srv.stdout().includes('"msg":"configuration reloaded"'), 5000, "the reload");
    const second = await fingerprint();
    expect(second).not.toBe(first);
    expect((await kept.request("ping")).status).toBe(0);
    const c = await Client.connect(srv.port);
    expect((await c.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status).toBe(15);
    // A broken file leaves everything as it was, and the server up.
    writeFileSync(conf, "{");
    srv.proc.kill("SIGHUP");
    await waitFor(() => srv.stdout().includes("reload failed"), 5000, "the failed reload");
    expect((await c.request("ping")).status).toBe(0);
    // A file with one bad value changes nothing either: registration stays closed.
    writeFileSync(conf, JSON.stringify({ registration: "open", "log-level": "loud" }));
    srv.proc.kill("SIGHUP");
    await waitFor(() => (srv.stdout().match(/reload failed/g) ?? []).length >= 2, 5000, "the second failed reload");
    expect(srv.stdout()).toMatch(/log-level\\": expected fatal or error/);
    expect((await c.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status).toBe(15);
    // Taken out of the file: as at a start-up without it, the operator's setting (none
    // here: open).
    writeFileSync(conf, JSON.stringify({}));
    srv.proc.kill("SIGHUP");
    await waitFor(() => (srv.stdout().match(/configuration reloaded/g) ?? []).length >= 2, 5000, "the third reload");
    expect((await c.request("register", { login: uniqueName(), pass: "x", nick: uniqueName() })).status).toBe(0);
    kept.close();
    c.close();
  });

  it("SIGHUP with a config file naming a certificate that cannot be loaded keeps the current one, and does not list it as changed", async () => {
    const dir = tmp();
    const conf = path.join(dir, "wirechat.json");
    const files = { "tls-cert": fixture("localhost.crt"), "tls-key": fixture("localhost.key") };
    writeFileSync(conf, JSON.stringify(files));
    const srv = await start(["--tls-port", "0", "--config", conf]);
    const tlsPort = Number(/"tlsPort":(\d+)/.exec(srv.stdout())?.[1]);
    const ca = readFileSync(fixture("localhost.crt"));
    const reloads = () => srv.stdout().split("\n").filter((l) => l.includes('"msg":"configuration reloaded"')).map((l) => JSON.parse(l).changed);
    writeFileSync(conf, JSON.stringify({ ...files, "tls-cert": path.join(dir, "missing.pem") }));
    srv.proc.kill("SIGHUP");
    await waitFor(() => reloads().length === 1, 5000, "the reload");
    expect(srv.stdout()).toMatch(/TLS certificate reload failed; keeping the current one/);
    expect(reloads()[0]).toEqual([]); // listed "tls-cert" before
    const c = await Client.connectTls(tlsPort, ca);
    expect((await c.request("ping")).status).toBe(0);
    c.close();
    // The same file fixed: the next SIGHUP takes it (and says so).
    copyFileSync(fixture("localhost.crt"), path.join(dir, "missing.pem"));
    srv.proc.kill("SIGHUP");
    await waitFor(() => reloads().length === 2, 5000, "the second reload");
    expect(reloads()[1]).toEqual(["tls-cert"]);
  });

  it("SIGHUP's log level reaches a logger made at start-up (the WebSocket listener's)", async () => {
    const dir = tmp();
    const conf = path.join(dir, "wirechat.json");
    writeFileSync(conf, JSON.stringify({}));
    const srv = await start(["--http-port", "0", "--config", conf]);
    const httpPort = Number(/"httpPort":(\d+)/.exec(srv.stdout())?.[1]);
    const opened = () => srv.stdout().split("\n").filter((l) => l.includes('"msg":"connection opened"') && l.includes('"door":"http"'));
    // At info (the default) a WebSocket's opening is not logged...
    const quiet = await WsClient.connect(httpPort, "/wirechat");
    await quiet.next((m) => m.action === "welcome");
    expect(opened()).toEqual([]);
    // ...at debug, after SIGHUP, it is: the listener's logger follows the new level.
    writeFileSync(conf, JSON.stringify({ "log-level": "debug" }));
    srv.proc.kill("SIGHUP");
    await waitFor(() => srv.stdout().includes('"msg":"configuration reloaded"'), 5000, "the reload");
    const loud = await WsClient.connect(httpPort, "/wirechat");
    await loud.next((m) => m.action === "welcome");
    await waitFor(() => opened().length === 1, 5000, "the debug line of the WebSocket opened after the reload");
    quiet.close();
    loud.close();
  });

  it("the second SIGINT exits at once while the first one's shutdown waits", async () => {
    const srv = await start(["--close-linger", "30", "--shutdown-timeout", "30"]);
    // A client that never closes keeps the first shutdown lingering.
    const net = await import("node:net");
    const stuck = net.connect({ port: srv.port, host: "127.0.0.1", allowHalfOpen: true });
    stuck.on("data", () => {});
    stuck.on("error", () => {}); // reset when the server exits
    await new Promise((r) => stuck.once("connect", r));
    srv.proc.kill("SIGINT");
    await sleep(300);
    expect(srv.proc.exitCode).toBe(null);
    const t0 = Date.now();
    srv.proc.kill("SIGINT");
    expect(await srv.exited).toBe(1);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(srv.stdout()).toMatch(/second signal/);
    stuck.destroy();
  });
});


describe("signals while the server's modules load", () => {
  it("SIGHUP is ignored and SIGTERM stops the server once it is up, from before LevelDB's binding is loaded", async () => {
    const dataDir = tmp();
    const child = spawn(process.execPath, [main, "--port", "0", "--data-dir", dataDir, "--admin", "off", "--log-level", "info"], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (out += b.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
    const pid = child.pid as number;
    // The first moment SIGHUP has a handler (SigCgt, bit 0), and whether the LevelDB
    // binding was mapped by then: node's default ends the process on SIGHUP and SIGTERM,
    // and the modules (LevelDB's binding among them) take a few hundred ms to load.
    const caught = () => {
      try {
        const line = readFileSync(`/proc/${pid}/status`, "utf8").match(/^SigCgt:\s*([0-9a-f]+)$/m);
        return line !== null && (BigInt(`0x${line[1]}`) & 1n) === 1n;
      } catch {
        return false;
      }
    };
    const deadline = Date.now() + 20_000;
    while (!caught() && Date.now() < deadline) await new Promise((r) => setImmediate(r));
    const bindingLoaded = readFileSync(`/proc/${pid}/maps`, "utf8").includes("classic-level");
    child.kill("SIGHUP");
    child.kill("SIGTERM");
    expect(bindingLoaded).toBe(false);
    expect(await exited, out).toEqual({ code: 0, signal: null });
    expect(out).toMatch(/"msg":"wirechat listening"/);
    expect(out).toMatch(/"signal":"SIGTERM".*"msg":"shutting down"/);
    expect(out).toMatch(/"msg":"wirechat stopped"/);
  }, 30_000);
});

describe("npm start's signals", () => {
  const repo = fileURLToPath(new URL("..", import.meta.url));
  /** `npm start` in a process group of its own, once the server is up: npm's pid and the server's. */
  async function npmStart(): Promise<{ npm: ReturnType<typeof spawn>; server: number; out: () => string; exited: Promise<number | null> }> {
    const child = spawn("npm", ["start", "--", "--port", "0", "--data-dir", tmp(), "--admin", "off"], { cwd: repo, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout?.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr?.on("data", (b: Buffer) => (out += b.toString()));
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    await waitFor(() => /"msg":"wirechat listening"/.test(out), 20_000, "the server listening");
    const server = Number((out.match(/"pid":(\d+)[^\n]*"msg":"wirechat listening"/) as RegExpMatchArray)[1]);
    return { npm: child, server, out: () => out, exited };
  }
  const gone = (pid: number) => {
    try {
      process.kill(pid, 0);
      return false;
    } catch {
      return true;
    }
  };

  it("Ctrl-C (SIGINT to the group: the server gets it from the terminal and again from npm) is one graceful stop", async () => {
    const s = await npmStart();
    process.kill(-(s.npm.pid as number), "SIGINT");
    await s.exited;
    await waitFor(() => gone(s.server), 10_000, "the server gone");
    expect(s.out()).toMatch(/"msg":"wirechat stopped"/);
    expect(s.out()).not.toMatch(/second signal/);
  }, 40_000);

  it("SIGTERM to npm reaches the server, which stops gracefully (it was left running, orphaned)", async () => {
    const s = await npmStart();
    s.npm.kill("SIGTERM");
    await s.exited;
    await waitFor(() => gone(s.server), 10_000, "the server gone");
    expect(s.out()).toMatch(/"signal":"SIGTERM".*"msg":"shutting down"/);
  }, 40_000);
});
