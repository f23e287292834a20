// The chat CLI as a person uses it, but through pipes: `wirechat chat`, the package's
// program (dist/src/main.js, run `npx tsc -p tsconfig.build.json` first), is spawned,
// lines are typed into its stdin, and its stdout is read. The other side of the
// conversation is the client library on a real server.

import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { Readable } from "node:stream";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { WirechatClient, bufferSource, decodeAttachment, type MessageEvent } from "../src/client/index.js";
import type { Config } from "../src/config.js";
import { removeDir, serveForFile, startTestServer, uniqueName, useTempDirs } from "./helpers.js";
import { sleep, waitFor } from "./pipeline-helpers.js";

// No admin HTTP listener: its fixed default port would collide with other servers.
const srv = serveForFile({ admin: "off" } as unknown as Partial<Config>);
const newDir = useTempDirs();
/** The package's `wirechat` program (package.json "bin"). */
const MAIN = fileURLToPath(new URL("../dist/src/main.js", import.meta.url));

interface Cli {
  proc: ChildProcessWithoutNullStreams;
  out: () => string;
  err: () => string;
  type: (line: string) => void;
  /** Waits until stdout matches `re` (checked against everything printed so far). */
  waitOut: (re: RegExp, ms?: number) => Promise<void>;
  exited: Promise<number | null>;
}

const running: Cli[] = [];
afterEach(() => {
  for (const c of running.splice(0)) if (c.proc.exitCode === null) c.proc.kill("SIGKILL");
});

function cli(args: string[]): Cli {
  const proc = spawn(process.execPath, [MAIN, "chat", ...args], { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, NO_COLOR: "" } });
  let out = "";
  let err = "";
  proc.stdout.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
  const c: Cli = {
    proc,
    out: () => out,
    err: () => err,
    type: (line) => proc.stdin.write(line + "\n"),
    waitOut: (re, ms = 5000) => waitFor(() => re.test(out), ms, () => `${re} in the chat's output:\n${out}\nstderr:\n${err}`),
    exited,
  };
  running.push(c);
  return c;
}

/**
 * A TCP proxy to the server that can be taken down (closed, its links cut: the client
 * sees its connection lost and its reconnects refused) and served again on its port.
 */
interface ProxyHooks {
  /** What the client sends from the first chunk holding `match` on waits for `until`. */
  hold?: { match: string; until: Promise<void>; reached: () => void };
  /** Set: the first chunk from the server holding it cuts the link instead (set later too). */
  cutOn?: string;
  /** Told once a chunk from the server holding `match` is passed on to the client. */
  passed?: { match: string; reached: () => void };
}

function linkProxy(): { links: Set<net.Socket>; serve: (hooks?: ProxyHooks) => net.Server } {
  const links = new Set<net.Socket>();
  const serve = (hooks: ProxyHooks = {}) =>
    net.createServer((inbound) => {
      const outbound = net.connect(srv.port, "127.0.0.1");
      for (const x of [inbound, outbound]) links.add(x);
      const { hold } = hooks;
      if (hold === undefined) inbound.pipe(outbound);
      else {
        let held: Promise<void> | undefined;
        inbound.on("data", (chunk: Buffer) => {
          if (held === undefined && chunk.includes(hold.match)) {
            held = hold.until;
            hold.reached();
          }
          if (held === undefined) outbound.write(chunk);
          else void held.then(() => outbound.write(chunk));
        });
      }
      outbound.on("data", (chunk: Buffer) => {
        if (hooks.cutOn !== undefined && chunk.includes(hooks.cutOn)) {
          hooks.cutOn = undefined;
          inbound.destroy();
          outbound.destroy();
        } else {
          inbound.write(chunk);
          if (hooks.passed !== undefined && chunk.includes(hooks.passed.match)) hooks.passed.reached();
        }
      });
      for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
        a.on("close", () => b.destroy());
        a.on("error", () => b.destroy());
      }
    });
  return { links, serve };
}

/** A link proxy that, while down, takes connections and drops them: the client's reconnects fail. */
async function downableProxy(hooks: ProxyHooks = {}): Promise<{ links: Set<net.Socket>; proxy: net.Server; port: number; setDown: (on: boolean) => void }> {
  const { links, serve } = linkProxy();
  const proxy = serve(hooks);
  let down = false;
  proxy.prependListener("connection", (sock: net.Socket) => {
    if (down) sock.destroy();
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", () => r()));
  return { links, proxy, port: (proxy.address() as net.AddressInfo).port, setDown: (on) => (down = on) };
}

/** A chat CLI through a link proxy, talking in a new channel that `bob` (a library user) is in too. */
async function inChannelThroughProxy(bob: { c: WirechatClient }, label: string): Promise<{ carol: Cli; chid: string; port: number; proxy: net.Server; proxied: ReturnType<typeof linkProxy> }> {
  const proxied = linkProxy();
  const proxy = proxied.serve();
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", () => r()));
  const port = (proxy.address() as net.AddressInfo).port;
  const carol = cli(["--port", String(port), "--login", uniqueName("carol"), "--pass", "pw", "--register"]);
  await carol.waitOut(/logged in as/);
  const channel = uniqueName(label);
  carol.type(`/join #${channel}`);
  await carol.waitOut(/now talking in/);
  const chid = (await bob.c.channelList({ limit: 500 })).find((c) => c.name === channel)!.chid;
  await bob.c.enter(chid);
  return { carol, chid, port, proxy, proxied };
}

/** A test's proxy at its end, whatever state it is in, and its library user. */
async function dropProxy(proxy: net.Server, links: Set<net.Socket>, bob: { c: WirechatClient }): Promise<void> {
  proxy.close();
  for (const l of links) l.destroy();
  await bob.c.close();
}

/** Takes the proxy down: closed, its links cut. */
async function cutLinks(proxy: net.Server, links: Set<net.Socket>): Promise<void> {
  const closed = new Promise<void>((r) => proxy.close(() => r()));
  for (const l of links) l.destroy();
  await closed;
}

async function libUser(): Promise<{ c: WirechatClient; uid: string; nick: string; inbox: MessageEvent[] }> {
  const c = await WirechatClient.connect({ port: srv.port });
  const nick = uniqueName("Bob");
  const a = await c.register(nick.toLowerCase(), "secret", nick);
  const inbox: MessageEvent[] = [];
  c.on("ev_message", (m) => {
    if (m.to === a.uid) inbox.push(m);
  });
  return { c, uid: a.uid, nick, inbox };
}

describe("wirechat chat", () => {
  it("registers, talks to another user both ways, shows history, sends a file, and quits", async () => {
    const bob = await libUser();
    try {
      const login = uniqueName("alice");
      const nick = uniqueName("Alice");
      // No --pass: the password is the first line of input, as when it is piped in.
      const alice = cli(["--host", "127.0.0.1", "--port", String(srv.port), "--login", login, "--register", "--nick", nick]);
      alice.type("s3cret");
      await alice.waitOut(new RegExp(`logged in as ${nick}`));

      alice.type("hello before a conversation");
      await alice.waitOut(/! no conversation yet/);

      alice.type(`/msg ${bob.nick} hello bob`);
      await waitFor(() => bob.inbox.length === 1, 5000, "Bob to get Alice's message");
      expect(bob.inbox[0].body).toBe("hello bob");
      expect(bob.inbox[0].nick).toBe(nick);
      // The echo of her own message, shown as sent to Bob.
      await alice.waitOut(new RegExp(`-> ${bob.nick}: hello bob`));

      // A plain line now goes to Bob, the current conversation.
      alice.type("and a second line");
      await waitFor(() => bob.inbox.length === 2, 5000, "Bob to get the second line");
      expect(bob.inbox[1].body).toBe("and a second line");

      await bob.c.sendMessage({ uid: bob.inbox[0].from }, "hi alice");
      await alice.waitOut(new RegExp(`\\[\\d\\d:\\d\\d\\] <${bob.nick}> hi alice`));

      const file = path.join(newDir(), "notes.txt");
      const bytes = randomBytes(200 * 1024);
      writeFileSync(file, bytes);
      alice.type(`/attach ${file}`);
      await waitFor(() => bob.inbox.length === 3, 5000, "Bob to get the attachment");
      expect(decodeAttachment(bob.inbox[2].attach).equals(bytes)).toBe(true);
      expect(bob.inbox[2].attach.mime).toBe("text/plain");
      await alice.waitOut(/\* sent .*notes\.txt \(message \d+\)/);

      // Bob sends a file back; Alice saves it.
      const back = randomBytes(1000);
      const sent = await bob.c.sendAttachment({ uid: bob.inbox[0].from }, bufferSource(back), { mime: "application/octet-stream" });
      await alice.waitOut(new RegExp(`\\[attachment application/octet-stream, 1000 B; /save ${sent.mid} FILE\\]`));
      const saved = path.join(newDir(), "saved.bin");
      alice.type(`/save ${sent.mid} ${saved}`);
      await alice.waitOut(/\* saved 1000 B to /);
      expect(readFileSync(saved).equals(back)).toBe(true);

      const before = alice.out().length;
      alice.type("/history 3");
      await waitFor(() => (alice.out().slice(before).match(/\n/g) ?? []).length >= 3, 5000, "three history lines");
      const hist = alice.out().slice(before);
      expect(hist).toMatch(new RegExp(`<${bob.nick}> hi alice`));
      expect(hist).toMatch(/\[attachment/);

      alice.type("/who");
      await alice.waitOut(/\* no contacts yet/);
      alice.type(`/add ${bob.nick}`);
      await alice.waitOut(new RegExp(`\\* added ${bob.nick}`));
      alice.type("/who");
      await alice.waitOut(new RegExp(`\\* contacts: ${bob.nick} \\(online\\)`));

      alice.type("/quit");
      expect(await alice.exited).toBe(0);
      // Pipes: no colours, no cursor control, and never the server's JSON.
      expect(alice.out()).not.toMatch(/\x1b\[/);
      expect(alice.out()).not.toContain('"action"');
      expect(alice.err()).toBe("");
    } finally {
      await bob.c.close();
    }
  });

  it("/msg finds a nick with spaces: the longest nick the line starts with (past a full search answer), or one in quotes", async () => {
    const base = uniqueName("Mary");
    // 50 nicks that sort before "<base> Ann" fill searchuser's answer for "<base>".
    const crowd = await WirechatClient.connect({ port: srv.port });
    for (let i = 0; i < 50; i++) {
      await crowd.register(uniqueName("crowd"), "secret", `${base} A${i}`);
      await crowd.logout();
    }
    crowd.close();
    const users = [];
    for (const nick of [base, `${base} Ann`]) {
      const c = await WirechatClient.connect({ port: srv.port });
      const a = await c.register(uniqueName("m"), "secret", nick);
      const inbox: string[] = [];
      c.on("ev_message", (m) => {
        if (m.to === a.uid) inbox.push(m.body);
      });
      users.push({ c, inbox });
    }
    const [mary, maryAnn] = users;
    try {
      const me = cli(["--host", "127.0.0.1", "--port", String(srv.port), "--login", uniqueName("me"), "--register", "--pass", "pw"]);
      await me.waitOut(/logged in as/);
      me.type(`/msg ${base} Ann hello there`);
      await waitFor(() => maryAnn.inbox.length === 1, 5000, "Mary Ann to get it");
      expect(maryAnn.inbox).toEqual(["hello there"]);
      me.type(`/msg "${base}" Ann, this is for Mary`);
      await waitFor(() => mary.inbox.length === 1, 5000, "Mary to get it");
      expect(mary.inbox).toEqual(["Ann, this is for Mary"]);
      expect(maryAnn.inbox).toHaveLength(1);
      me.type("/quit");
      expect(await me.exited).toBe(0);
    } finally {
      for (const u of users) u.c.close();
    }
  });

  it("shows a message's control characters escaped and its further lines indented: a sender cannot drive the terminal or fake a line", async () => {
    const bob = await libUser();
    try {
      const login = uniqueName("alice");
      const alice = cli(["--host", "127.0.0.1", "--port", String(srv.port), "--login", login, "--register", "--pass", "pw"]);
      await alice.waitOut(/logged in as/);
      const uid = (await bob.c.searchUser(login))[0].uid;
      await bob.c.sendMessage({ uid }, "title\x1b]0;owned\x07 clear\x1b[2J back\roops\n[12:35] <admin> fake");
      await alice.waitOut(/fake/);
      const shown = alice.out().split("\n").filter((l) => l.includes("title") || l.includes("fake"));
      expect(shown).toEqual([expect.stringMatching(/<[^>]+> title\\x1b\]0;owned\\x07 clear\\x1b\[2J back\\x0doops$/), "    [12:35] <admin> fake"]);
      expect(alice.out()).not.toMatch(/[\x00-\x08\x0b-\x1f\x7f]/);
      alice.type("/quit");
      expect(await alice.exited).toBe(0);
    } finally {
      bob.c.close();
    }
  });

  it("at a terminal the password is neither echoed nor kept in the line history, stdout redirected or not", async () => {
    // `script` gives the chat a terminal (a pty) for stdin, and for stdout unless redirected.
    async function atTerminal(redirect: boolean, keys: string[]): Promise<{ tty: string; out: string }> {
      const out = path.join(newDir(), "chat.out");
      const login = uniqueName("pty");
      const command = `'${process.execPath}' '${MAIN}' chat --host 127.0.0.1 --port ${srv.port} --login ${login} --register --no-color${redirect ? ` > '${out}'` : ""}`;
      const proc = spawn("script", ["-qfec", command, "/dev/null"], { stdio: ["pipe", "pipe", "pipe"] });
      let tty = "";
      proc.stdout.on("data", (d: Buffer) => (tty += d.toString()));
      const exited = new Promise((resolve) => proc.on("exit", resolve));
      try {
        await waitFor(() => tty.includes("Password: "), 5000, `the prompt; got ${JSON.stringify(tty)}`);
        proc.stdin.write("s3cretpw\r");
        const loggedIn = () => (redirect ? readFileSync(out, "utf8") : tty).includes("logged in as");
        await waitFor(() => { try { return loggedIn(); } catch { return false; } }, 5000, "the login");
        for (const k of keys) proc.stdin.write(k);
        await new Promise((r) => setTimeout(r, 300));
        proc.stdin.write("\x15/quit\r"); // ^U: whatever ↑ brought back goes first
        await exited;
        return { tty, out: redirect ? readFileSync(out, "utf8") : "" };
      } finally {
        proc.kill("SIGKILL");
      }
    }
    const redirected = await atTerminal(true, []);
    expect(redirected.tty).toMatch(/Password: /);
    expect(redirected.tty).not.toMatch(/s3cretpw/);
    expect(redirected.out).toMatch(/logged in as/);
    // ↑ at the prompt: the history has nothing of the password.
    const full = await atTerminal(false, ["\x1b[A"]);
    expect(full.tty).toMatch(/logged in as/);
    expect(full.tty).not.toMatch(/s3cretpw/);
  });

  it("joins a channel, lists its members, and talks there", async () => {
    const bob = await libUser();
    try {
      const login = uniqueName("carol");
      const carol = cli(["--port", String(srv.port), "--login", login, "--pass", "pw", "--register"]);
      await carol.waitOut(/logged in as/);
      const channel = uniqueName("room");
      carol.type(`/join #${channel}`);
      await carol.waitOut(new RegExp(`\\* now talking in #${channel} \\(1 member, 1 online\\)`));
      const chid = (await bob.c.channelList({ limit: 500 })).find((c) => c.name === channel)!.chid;
      const heard: MessageEvent[] = [];
      bob.c.on("ev_message", (m) => {
        if (m.chid === chid) heard.push(m);
      });
      await bob.c.enter(chid);
      await carol.waitOut(new RegExp(`\\* ${bob.nick} entered #${channel}`));
      carol.type("hi room");
      await waitFor(() => heard.length === 1, 5000, "Bob to hear Carol in the channel");
      await bob.c.sendMessage({ channel: chid }, "hello carol");
      await carol.waitOut(new RegExp(`#${channel} <${bob.nick}> hello carol`));
      carol.type("/who");
      await carol.waitOut(new RegExp(`\\* #${channel}: .*${bob.nick} \\(online\\)`));
      // A bare slash is a usage error, not a crash of the command loop.
      carol.type("/");
      await carol.waitOut(/a command follows the slash/);
      // End of input ends the session cleanly, like /quit.
      carol.proc.stdin.end();
      expect(await carol.exited).toBe(0);
    } finally {
      await bob.c.close();
    }
  });

  it("ends when the server logs its session out and leaves the connection open (its session pushed out)", async () => {
    const login = uniqueName("dave");
    const dave = cli(["--port", String(srv.port), "--login", login, "--pass", "pw", "--register"]);
    await dave.waitOut(/logged in as/);
    // --max-sessions-per-user (64) newer sessions: dave's, the oldest, is revoked; its
    // connection gets ev_logout and stays open, unauthenticated.
    const others = await Promise.all(Array.from({ length: 64 }, () => WirechatClient.connect({ port: srv.port })));
    try {
      for (const o of others) await o.auth({ login, pass: "pw" });
      // Told, and gone: not left at a prompt where every command fails until the
      // server's idle limit closes the connection.
      expect(await dave.exited).toBe(1);
      expect(dave.out() + dave.err()).toMatch(/logged out by the server/);
    } finally {
      await Promise.all(others.map((o) => o.close()));
    }
  });

  it("after a reconnect, shows what its channels got meanwhile, once", async () => {
    const bob = await libUser();
    const started = await inChannelThroughProxy(bob, "gap");
    const { carol, chid, port, proxied: { links, serve } } = started;
    let { proxy } = started;
    try {
      await bob.c.sendMessage({ channel: chid }, "before the outage");
      await carol.waitOut(/before the outage/);
      // A channel joined with nothing said in it yet is caught up on too.
      const quiet = uniqueName("quiet");
      carol.type(`/join #${quiet}`);
      await carol.waitOut(new RegExp(`now talking in #${quiet}`));
      const quietChid = (await bob.c.channelList({ limit: 500 })).find((c) => c.name === quiet)!.chid;
      await bob.c.enter(quietChid);
      await cutLinks(proxy, links);
      await carol.waitOut(/connection lost/);
      await bob.c.sendMessage({ channel: chid }, "during the outage");
      await bob.c.sendMessage({ channel: quietChid }, "said in the quiet one");
      proxy = serve();
      await new Promise<void>((r) => proxy.listen(port, "127.0.0.1", () => r()));
      await carol.waitOut(/during the outage/, 20_000);
      await carol.waitOut(/said in the quiet one/);
      await bob.c.sendMessage({ channel: chid }, "after the outage");
      await carol.waitOut(/after the outage/);
      expect(carol.out().split("during the outage").length - 1).toBe(1);
      expect(carol.out().split("before the outage").length - 1).toBe(1);
      carol.type("/quit");
      expect(await carol.exited).toBe(0);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 40_000);

  it("a catch-up cut off by another outage goes on following its channel at the outages after", async () => {
    const bob = await libUser();
    const started = await inChannelThroughProxy(bob, "again");
    const { carol, chid, port, proxied: { links, serve } } = started;
    let { proxy } = started;
    const count = (text: string) => carol.out().split(text).length - 1;
    const listen = (p: net.Server) => new Promise<void>((r) => p.listen(port, "127.0.0.1", () => r()));
    try {
      await bob.c.sendMessage({ channel: chid }, "before any outage");
      await carol.waitOut(/before any outage/);
      // Outage 1; the catch-up's history request is held at the proxy, and the link is
      // cut again meanwhile (outage 2): the catch-up's read fails with the link (-1).
      await cutLinks(proxy, links);
      await waitFor(() => count("connection lost") === 1, 10_000, "the first loss");
      let reached!: () => void;
      const historyHeld = new Promise<void>((r) => (reached = r));
      proxy = serve({ hold: { match: '"action":"history"', until: new Promise<void>(() => {}), reached } });
      await listen(proxy);
      await historyHeld;
      await cutLinks(proxy, links);
      await waitFor(() => count("connection lost") === 2, 10_000, "the second loss");
      proxy = serve();
      await listen(proxy);
      await waitFor(() => count("* reconnected") === 2, 20_000, "the second reconnect");
      // Outage 3, with a message in the channel meanwhile: caught up on (before, the
      // failed read had stopped the CLI following the channel, and it never showed).
      await cutLinks(proxy, links);
      await waitFor(() => count("connection lost") === 3, 10_000, "the third loss");
      await bob.c.sendMessage({ channel: chid }, "during the third outage");
      proxy = serve();
      await listen(proxy);
      await waitFor(() => count("* reconnected") === 3, 20_000, "the third reconnect");
      await carol.waitOut(/during the third outage/, 10_000);
      carol.type("/quit");
      expect(await carol.exited).toBe(0);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 60_000);

  it("after a reconnect, what came live during the catch-up shows after it, in order", async () => {
    const bob = await libUser();
    const started = await inChannelThroughProxy(bob, "order");
    const { carol, chid, port, proxied: { links, serve } } = started;
    let { proxy } = started;
    try {
      const first = await bob.c.sendMessage({ channel: chid }, "first, before");
      await carol.waitOut(/first, before/);
      await cutLinks(proxy, links);
      await carol.waitOut(/connection lost/);
      await bob.c.sendMessage({ channel: chid }, "second, during");
      // The catch-up's history request is held at the proxy while a live one comes.
      let release!: () => void;
      let reached!: () => void;
      const historyHeld = new Promise<void>((r) => (reached = r));
      let livePassed!: () => void;
      const live = new Promise<void>((r) => (livePassed = r));
      const hooks: ProxyHooks = { hold: { match: '"action":"history"', until: new Promise<void>((r) => (release = r)), reached }, passed: { match: "third, live", reached: livePassed } };
      proxy = serve(hooks);
      await new Promise<void>((r) => proxy.listen(port, "127.0.0.1", () => r()));
      await historyHeld;
      await bob.c.sendMessage({ channel: chid }, "third, live");
      // On the client's link before the history request goes on (so before its reply).
      await live;
      // An edit that comes live meanwhile (of a message shown before the outage) waits too.
      let editPassed!: () => void;
      const edited = new Promise<void>((r) => (editPassed = r));
      hooks.passed = { match: "first, edited", reached: editPassed };
      await bob.c.request("editmessage", { mid: first.mid, body: "first, edited" });
      await edited;
      release();
      await carol.waitOut(/was edited: first, edited/, 20_000);
      await carol.waitOut(/second, during/);
      const out = carol.out();
      expect(out.indexOf("second, during")).toBeLessThan(out.indexOf("third, live"));
      expect(out.indexOf("third, live")).toBeLessThan(out.indexOf("was edited: first, edited"));
      expect(out.split("third, live").length - 1).toBe(1);
      carol.type("/quit");
      expect(await carol.exited).toBe(0);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 40_000);

  it("a live message held during a catch-up of more than 2,048 messages shows once", async () => {
    const bob = await libUser();
    const started = await inChannelThroughProxy(bob, "first");
    const { carol, chid, port, proxied: { links, serve } } = started;
    let { proxy } = started;
    try {
      await bob.c.sendMessage({ channel: chid }, "seen in the first");
      await carol.waitOut(/seen in the first/);
      // 21 more channels, each shown a message after the first one's: the first is read
      // first by the catch-up, and 2,100 messages of the others after it.
      const others: string[] = [];
      for (let i = 0; i < 21; i++) {
        const name = uniqueName(`more${i}`);
        carol.type(`/join #${name}`);
        await carol.waitOut(new RegExp(`now talking in #${name}`));
        const other = (await bob.c.channelList({ limit: 500 })).find((c) => c.name === name)!.chid;
        await bob.c.enter(other);
        await bob.c.sendMessage({ channel: other }, `seen in ${name}`);
        await carol.waitOut(new RegExp(`seen in ${name}`));
        others.push(other);
      }
      await cutLinks(proxy, links);
      await carol.waitOut(/connection lost/);
      await Promise.all(others.flatMap((other) => Array.from({ length: 100 }, (_, j) => bob.c.sendMessage({ channel: other }, `gap ${j}`))));
      // The catch-up's first history request (the first channel's) is held while a live one comes.
      let release!: () => void;
      let reached!: () => void;
      const historyHeld = new Promise<void>((r) => (reached = r));
      let livePassed!: () => void;
      const live = new Promise<void>((r) => (livePassed = r));
      proxy = serve({ hold: { match: '"action":"history"', until: new Promise<void>((r) => (release = r)), reached }, passed: { match: "live in the first", reached: livePassed } });
      await new Promise<void>((r) => proxy.listen(port, "127.0.0.1", () => r()));
      await historyHeld;
      await bob.c.sendMessage({ channel: chid }, "live in the first");
      await live;
      release();
      await carol.waitOut(/live in the first/, 20_000);
      await bob.c.sendMessage({ channel: chid }, "after the catch-up");
      await carol.waitOut(/after the catch-up/, 20_000);
      expect(carol.out().split("live in the first").length - 1).toBe(1);
      carol.type("/quit");
      expect(await carol.exited).toBe(0);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 90_000);

  it("a direct message whose reply the link lost shows once, from the resend's reply (its echo went with the link)", async () => {
    const bob = await libUser();
    const { links, serve } = linkProxy();
    const hooks: ProxyHooks = {};
    const proxy = serve(hooks);
    await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", () => r()));
    const port = (proxy.address() as net.AddressInfo).port;
    try {
      const erin = cli(["--port", String(port), "--login", uniqueName("erin"), "--pass", "pw", "--register"]);
      await erin.waitOut(/logged in as/);
      erin.type(`/msg ${bob.nick}`);
      await erin.waitOut(/talking to /);
      // The server stores it and answers; the link is cut before its reply and echo pass.
      hooks.cutOn = '{"action":"message","data":{"status":0';
      erin.type("lost reply, kept message");
      await erin.waitOut(/connection lost/);
      await erin.waitOut(/reconnected/, 20_000);
      await erin.waitOut(/lost reply, kept message/);
      await waitFor(() => bob.inbox.length >= 1, 5000, "bob's message");
      erin.type("/quit");
      expect(await erin.exited).toBe(0);
      expect(erin.out().split("lost reply, kept message").length - 1).toBe(1);
      expect(bob.inbox.map((m) => m.body)).toEqual(["lost reply, kept message"]);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 40_000);

  it("a message that got no reply within --timeout is stored once when typed again (its cmid kept)", async () => {
    const bob = await libUser();
    const hooks: ProxyHooks = {};
    const { links, proxy, port, setDown } = await downableProxy(hooks);
    try {
      const erin = cli(["--port", String(port), "--timeout", "2", "--login", uniqueName("erin"), "--pass", "pw", "--register"]);
      await erin.waitOut(/logged in as/);
      erin.type(`/msg ${bob.nick}`);
      await erin.waitOut(/talking to /);
      // Stored and answered; the link is cut before the reply, and stays down past the timeout.
      hooks.cutOn = '{"action":"message","data":{"status":0';
      setDown(true);
      erin.type("typed twice, stored once");
      await erin.waitOut(/connection lost/);
      await erin.waitOut(/may have been stored; type it again to send it once/, 20_000);
      setDown(false);
      await erin.waitOut(/reconnected/, 30_000);
      erin.type("typed twice, stored once");
      await erin.waitOut(/typed twice, stored once/);
      // Only as the very next message: after another one, the same text is a new message.
      hooks.cutOn = '{"action":"message","data":{"status":0';
      setDown(true);
      erin.type("ok");
      await waitFor(() => erin.out().split("may have been stored").length - 1 === 2, 20_000, "the second unconfirmed");
      setDown(false);
      await waitFor(() => erin.out().split("* reconnected").length - 1 === 2, 30_000, "the second reconnect");
      erin.type("in between");
      await erin.waitOut(/in between/);
      erin.type("ok");
      await waitFor(() => bob.inbox.length === 4, 10_000, "bob's four messages");
      erin.type("/quit");
      expect(await erin.exited).toBe(0);
      await bob.c.ping();
      expect(bob.inbox.map((m) => m.body)).toEqual(["typed twice, stored once", "ok", "in between", "ok"]);
      expect((await bob.c.history({ uid: bob.inbox[0].from })).map((m) => m.body)).toEqual(["typed twice, stored once", "ok", "in between", "ok"]);
      expect(erin.out().split("typed twice, stored once").length - 1).toBe(1);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 60_000);

  it("--insecure and --tls-servername ask for TLS (they were ignored without --tls: plain text)", async () => {
    const cert = fileURLToPath(new URL("./fixtures/localhost.crt", import.meta.url));
    const key = fileURLToPath(new URL("./fixtures/localhost.key", import.meta.url));
    const tlsSrv = await startTestServer({ tlsPort: 0, tlsCert: cert, tlsKey: key, admin: "off" } as unknown as Partial<Config>);
    try {
      for (const flags of [["--insecure"], ["--tls-ca", cert, "--tls-servername", "localhost"]]) {
        const c = cli(["--port", String(tlsSrv.tlsPort), ...flags, "--login", uniqueName("t"), "--pass", "pw", "--register"]);
        await c.waitOut(/logged in as/);
        c.type("/quit");
        expect(await c.exited).toBe(0);
      }
    } finally {
      await tlsSrv.stop();
      removeDir(tlsSrv.services.config.dataDir);
    }
  });

  it("/quit during an outage leaves within moments, not after the held message's timeout", async () => {
    const { links, serve } = linkProxy();
    const proxy = serve();
    await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", () => r()));
    const port = (proxy.address() as net.AddressInfo).port;
    const bob = await libUser();
    try {
      const erin = cli(["--port", String(port), "--login", uniqueName("erin"), "--pass", "pw", "--register"]);
      await erin.waitOut(/logged in as/);
      erin.type(`/msg ${bob.nick}`);
      await erin.waitOut(/talking to /);
      await cutLinks(proxy, links);
      await erin.waitOut(/connection lost/);
      // Held until the link is back, for up to the request's 30 s.
      erin.type("are you there?");
      await sleep(200);
      const asked = Date.now();
      erin.type("/quit");
      // Exit 1, saying what it gave up on.
      expect(await erin.exited).toBe(1);
      expect(Date.now() - asked).toBeLessThan(15_000);
      expect(erin.err()).toMatch(/gave up waiting for the server after 2 s on "are you there\?" as you left/);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 40_000);

  it("piped input that ends at once is still sent whole over a slow link (each line gets 2 s, not all of them together)", async () => {
    const bob = await libUser();
    // 50 ms each way: a line takes ~100 ms, 40 of them ~4 s (past the 2 s grace).
    const proxy = net.createServer((inbound) => {
      const outbound = net.connect(srv.port, "127.0.0.1");
      const later = (to: net.Socket) => (chunk: Buffer) => void setTimeout(() => to.destroyed || to.write(chunk), 50);
      inbound.on("data", later(outbound));
      outbound.on("data", later(inbound));
      for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
        a.on("close", () => setTimeout(() => b.destroy(), 60));
        a.on("error", () => b.destroy());
      }
    });
    await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", () => r()));
    try {
      const port = (proxy.address() as net.AddressInfo).port;
      const dana = cli(["--port", String(port), "--login", uniqueName("dana"), "--pass", "pw", "--register"]);
      // The input ends while the first lines are being sent (the grace ran from there,
      // for all of them together).
      const lines = [`/msg ${bob.nick}`, ...Array.from({ length: 40 }, (_, i) => `slow ${i}`)];
      dana.proc.stdin.write(lines.join("\n") + "\n");
      await waitFor(() => bob.inbox.length >= 1, 10_000, "bob's first message");
      dana.proc.stdin.end();
      expect(await dana.exited).toBe(0);
      await waitFor(() => bob.inbox.length === 40, 10_000, "bob's 40 messages");
      expect(bob.inbox.map((m) => m.body)).toEqual(Array.from({ length: 40 }, (_, i) => `slow ${i}`));
    } finally {
      proxy.close();
      await bob.c.close();
    }
  }, 60_000);

  it("names at login the channels and contacts it knew from before; /join marks a message of a file alone, and /save reads it from history", async () => {
    const bob = await libUser();
    const carolLib = await libUser();
    const carolLogin = carolLib.nick.toLowerCase();
    const channel = uniqueName("named");
    const chid = await carolLib.c.createChannel(channel);
    await bob.c.enter(chid);
    await carolLib.c.addContact(bob.uid);
    const file = Buffer.from("attached to the channel");
    const sent = await bob.c.sendAttachment({ channel: chid }, Readable.from([file]), { mime: "text/plain", size: file.length });
    await carolLib.c.close();
    const carol = cli(["--port", String(srv.port), "--login", carolLogin, "--pass", "secret"]);
    try {
      await carol.waitOut(/logged in as/);
      // Bob's message in the channel, and his presence, named (not #<chid>, not his uid).
      await bob.c.sendMessage({ channel: chid }, "by name");
      await carol.waitOut(new RegExp(`#${channel} <${bob.nick}> by name`));
      await bob.c.close();
      await carol.waitOut(new RegExp(`\\* ${bob.nick} is offline`));
      // enter's last_msg has no attachments: a message of a file alone is marked, and
      // /save reads it from history.
      carol.type(`/join #${channel}`);
      await carol.waitOut(new RegExp(`<${bob.nick}> \\[no text: an attachment\\? /save ${sent.mid} FILE\\]`));
      const saved = path.join(newDir(), "saved.txt");
      carol.type(`/save ${sent.mid} ${saved}`);
      await carol.waitOut(/saved /);
      expect(readFileSync(saved)).toEqual(file);
      carol.type("/quit");
      expect(await carol.exited).toBe(0);
    } finally {
      await bob.c.close();
    }
  }, 30_000);

  it("an /attach that got no reply is stored once when sent again (its cmid kept), and --timeout applies to it", async () => {
    const bob = await libUser();
    const hooks: ProxyHooks = {};
    const { links, proxy, port, setDown } = await downableProxy(hooks);
    const file = path.join(newDir(), "note.txt");
    writeFileSync(file, "sent twice, stored once");
    try {
      const erin = cli(["--port", String(port), "--timeout", "2", "--login", uniqueName("erin"), "--pass", "pw", "--register"]);
      await erin.waitOut(/logged in as/);
      erin.type(`/msg ${bob.nick}`);
      await erin.waitOut(/talking to /);
      hooks.cutOn = '{"action":"message","data":{"status":0';
      setDown(true);
      erin.type(`/attach ${file}`);
      // Within --timeout (2 s) of the lost reply, not a fixed 120 s.
      await erin.waitOut(/may have been stored; \/attach it again to send it once/, 20_000);
      setDown(false);
      await erin.waitOut(/reconnected/, 30_000);
      erin.type(`/attach ${file}`);
      await erin.waitOut(/\* sent .*note\.txt \(message \d+\)/);
      await waitFor(() => bob.inbox.length >= 1, 10_000, "bob's attachment");
      await sleep(300);
      expect(bob.inbox).toHaveLength(1);
      expect((await bob.c.history({ uid: bob.inbox[0].from })).length).toBe(1);
      erin.type("/quit");
      expect(await erin.exited).toBe(0);
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 60_000);

  it("a password that starts like /quit is not a request to leave: a message held through an outage still goes", async () => {
    const bob = await libUser();
    const { links, proxy, port, setDown } = await downableProxy();
    try {
      const erin = cli(["--port", String(port), "--login", uniqueName("erin"), "--register"]);
      erin.type("/exit-2024"); // the password, from stdin
      await erin.waitOut(/logged in as/);
      erin.type(`/msg ${bob.nick}`);
      await erin.waitOut(/talking to /);
      setDown(true);
      for (const l of links) l.destroy();
      await erin.waitOut(/connection lost/);
      erin.type("held for 3 s");
      await sleep(3000);
      setDown(false);
      await waitFor(() => bob.inbox.length === 1, 30_000, "the held message");
      erin.type("/quit");
      expect(await erin.exited).toBe(0);
      expect(bob.inbox[0].body).toBe("held for 3 s");
    } finally {
      await dropProxy(proxy, links, bob);
    }
  }, 60_000);

  it("ends quietly when its output's reader goes away (| head), without a stack trace", async () => {
    const bob = await libUser();
    const erin = cli(["--port", String(srv.port), "--login", uniqueName("erin"), "--pass", "pw", "--register"]);
    erin.proc.stdout.destroy();
    erin.proc.stdin.end();
    expect(await erin.exited).toBe(0);
    expect(erin.err()).not.toMatch(/EPIPE|Error|at /);
    await bob.c.close();
  });

  it("prints --raw events as the server's frames", async () => {
    const bob = await libUser();
    try {
      const login = uniqueName("dave");
      const dave = cli(["--port", String(srv.port), "--login", login, "--pass", "pw", "--register", "--raw"]);
      await dave.waitOut(/logged in as/);
      dave.type('{"action":"ping"}');
      await dave.waitOut(/\{"action":"ping","data":\{"status":0,"error":"OK","time":\d+\}\}/);
      dave.type('{"action":"userinfo","data":{"user":"nobody"}}');
      await dave.waitOut(/\{"action":"userinfo","data":\{"status":8,/);
      const me = (await bob.c.searchUser(login)).find((u) => u.nick === login)!;
      await bob.c.sendMessage({ uid: me.uid }, "raw hi");
      await dave.waitOut(/\{"action":"ev_message","data":\{"mid":"\d+".*"body":"raw hi"/);
      dave.type("/quit");
      expect(await dave.exited).toBe(0);
    } finally {
      await bob.c.close();
    }
  });

  it("explains itself with --help, and fails clearly on usage errors and bad logins", async () => {
    const help = cli(["--help"]);
    expect(await help.exited).toBe(0);
    expect(help.out()).toMatch(/^Usage: wirechat chat --login LOGIN/);
    expect(help.out()).toContain("--register");

    const usage = cli(["--port", "x"]);
    expect(await usage.exited).toBe(2);
    expect(usage.err()).toMatch(/--port must be a port number/);

    const bad = cli(["--port", String(srv.port), "--login", uniqueName("nobody"), "--pass", "x"]);
    expect(await bad.exited).toBe(1);
    expect(bad.err()).toMatch(/login failed: no account with login/);

    // A port nothing listens on: the socket's error, once, after the address.
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, "127.0.0.1", () => r()));
    const closedPort = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const refused = cli(["--host", "127.0.0.1", "--port", String(closedPort), "--login", "x", "--pass", "x"]);
    expect(await refused.exited).toBe(1);
    expect(refused.err()).toMatch(new RegExp(`cannot connect to 127\\.0\\.0\\.1:${closedPort}: connect ECONNREFUSED 127\\.0\\.0\\.1:${closedPort}\n`));
  });
});
