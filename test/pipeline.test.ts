// The message pipeline under hostile or heavy input, each against a server in a child
// process (so a crash shows as the process exiting): frames that used to throw inside
// the dispatcher, message text that looks like the server's internal attachment
// markers, and replies far larger than the outbound cap to a client that is not
// reading yet.

import { describe, expect, it } from "vitest";
import type { ChildServer } from "./helpers.js";
import { Client, login, registerUser } from "./helpers.js";
import { isAlive, LineConn, orClosed, orExit, sleep, useChildServers, waitFor } from "./pipeline-helpers.js";

const startChild = useChildServers("each");

/** A ping on `c`, which must answer 0 (and the server must still be running). */
async function expectPing(child: ChildServer, c: Client): Promise<void> {
  const r = await orClosed(c, c.request("ping"), "a ping reply", child);
  expect(r.status).toBe(0);
}

describe("frames that used to crash the server", () => {
  const crashFrames: { name: string; action: string; data: Record<string, unknown>; statuses: number[] }[] = [
    // myid must be a string or number: a type error whose schema has a union type.
    { name: "import with myid: true", action: "import", data: { contacts: [{ myid: true }] }, statuses: [3] },
    // cid is compared as text with the connection's uid: an object that cannot become text.
    { name: "contactlist with an unprintable cid", action: "contactlist", data: { cid: { toString: 1, valueOf: 1 } }, statuses: [3, 6] },
    { name: "ping with an unprintable cid", action: "ping", data: { cid: { toString: 1, valueOf: 1 } }, statuses: [3, 6] },
    { name: "message with an unprintable cid", action: "message", data: { cid: { toString: 1, valueOf: 1 }, uid: "x", body: "y" }, statuses: [3, 6] },
  ];

  for (const f of crashFrames) {
    it(`${f.name}: one error reply with the same action; the server stays up`, async () => {
      const child = await startChild();
      const a = await registerUser(child.port);
      a.client.send(f.action, f.data);
      const r = await orClosed(a.client, a.client.reply(f.action), `the '${f.action}' reply`, child);
      expect(r.action).toBe(f.action);
      expect(f.statuses).toContain(r.data.status);
      expect(typeof r.data.error).toBe("string");
      // the same connection still answers, and nothing else was sent for that request
      await expectPing(child, a.client);
      expect(a.client.frames.filter((x) => x.action === f.action)).toEqual([]);
      // and so does a new one
      const c = await orExit(child, Client.connect(child.port));
      await expectPing(child, c);
      expect(isAlive(child)).toBe(true);
      a.client.close();
      c.close();
    });
  }

  it("both frames of the report on one connection, back to back, then a ping", async () => {
    const child = await startChild();
    const a = await registerUser(child.port);
    a.client.write(
      '{"action":"import","data":{"contacts":[{"myid":true}]}}\n' +
        '{"action":"contactlist","data":{"cid":{"toString":1,"valueOf":1}}}\n' +
        '{"action":"ping"}\n',
    );
    const imp = await orClosed(a.client, a.client.reply("import"), "the import reply", child);
    expect(imp.data.status).toBe(3);
    const cl = await orClosed(a.client, a.client.reply("contactlist"), "the contactlist reply", child);
    expect([3, 6]).toContain(cl.data.status);
    const ping = await orClosed(a.client, a.client.reply("ping"), "the ping reply", child);
    expect(ping.data.status).toBe(0);
    const c = await orExit(child, Client.connect(child.port));
    await expectPing(child, c);
    a.client.close();
    c.close();
  });
});

describe("message text that looks like the server's attachment markers", () => {
  it("reaches an offline recipient exactly as sent, on three logins in a row, and the connection stays up", async () => {
    const child = await startChild();
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    b.client.close();
    await b.client.closed;
    const body = "\u0000wirechat-blob-9\u0000 and \\u0000wirechat-blob-0\\u0000";
    const mime = "text/plain;\u0000wirechat-blob-0\u0000";
    const data = Buffer.from("the real attachment, not a marker").toString("base64");
    const r = await orExit(child, a.client.request("message", { uid: b.uid, body, attach: { mime, data } }));
    expect(r.status).toBe(0);
    a.client.close();

    for (let round = 1; round <= 3; round++) {
      const c = await orExit(child, Client.connect(child.port));
      const auth = await orExit(child, c.request("auth", { sid: b.sid }));
      expect(auth.status).toBe(0);
      const ev = await orClosed(c, c.event("ev_message", () => true, 10_000), `the ev_message (login ${round})`, child);
      expect(ev.mid).toBe(r.mid);
      expect(ev.body).toBe(body);
      expect(ev.attach).toEqual({ mime, data });
      await expectPing(child, c);
      expect(c.isClosed).toBe(false);
      // cut off (a reset confirms nothing), so the next login gets the message again
      c.socket.resetAndDestroy();
      await c.closed;
    }
    expect(isAlive(child)).toBe(true);
  });
});

describe("large replies to a client that is not reading", () => {
  const MB = 1024 * 1024;
  /**
   * How much the server's RSS may grow while 30 large replies wait for a paused client.
   * Building one 28 MB history page in memory costs about 100 MB of RSS; queueing all 30
   * (840 MB of JSON) took the old server past 1.4 GB with a large outbound cap. So this
   * allows a page or two in flight, not the backlog.
   */
  const RSS_BOUND = 250 * MB;
  const BODY = 700_000;
  const bodyOf = (tag: string, i: number) => `${tag}${i}:`.padEnd(BODY, "x");

  /**
   * Sends `count` copies of `request` on a fresh connection of `sid` without reading
   * for 3 s, sampling the server's RSS from `statsConn`; then reads every reply,
   * checking each with `check`. Returns the RSS growth and the replies' outcome.
   */
  async function pausedReader(
    child: ChildServer,
    statsConn: Client,
    sid: string,
    count: number,
    request: { action: string; data: Record<string, unknown> },
    check: (data: any) => string | undefined,
  ) {
    const before = (await orExit(child, statsConn.request("stats"))).rss as number;
    const reader = await orExit(child, LineConn.connect(child.port));
    expect((await orExit(child, reader.request("auth", { sid }))).status).toBe(0);
    let replies = 0;
    const problems: string[] = [];
    reader.onLine((line) => {
      // Only the first bytes decide what it is; a reply is parsed whole once.
      const head = line.subarray(0, 64).toString("utf8");
      if (!head.startsWith(`{"action":"${request.action}"`)) return;
      replies++;
      try {
        const f = JSON.parse(line.toString("utf8"));
        const why = f.data?.status !== 0 ? `status ${f.data?.status} ${f.data?.error}` : check(f.data);
        if (why) problems.push(`reply ${replies}: ${why}`);
      } catch (err) {
        problems.push(`reply ${replies}: not JSON (${(err as Error).message}), ${line.length} bytes`);
      }
    });
    reader.socket.pause();
    const frame = JSON.stringify(request) + "\n";
    reader.socket.write(frame.repeat(count));
    let peak = before;
    for (let t = 0; t < 12; t++) {
      await sleep(250);
      peak = Math.max(peak, (await orExit(child, statsConn.request("stats"))).rss as number);
    }
    const closedWhilePaused = reader.isClosed;
    reader.socket.resume();
    await orExit(
      child,
      waitFor(() => replies === count || reader.isClosed, 90_000, () => `${count} '${request.action}' replies (got ${replies})`),
    );
    const stillOpen = !reader.isClosed;
    let ping: any;
    if (stillOpen) ping = await orExit(child, reader.request("ping"));
    reader.socket.destroy();
    return { before, peak, replies, problems, closedWhilePaused, stillOpen, ping };
  }

  /** The paused reader was kept, memory stayed bounded, and every reply came whole. */
  function expectBoundedThenWhole(child: Parameters<typeof isAlive>[0], out: Awaited<ReturnType<typeof pausedReader>>): void {
    expect(isAlive(child)).toBe(true);
    expect(out.closedWhilePaused, "the server closed the paused reader").toBe(false);
    expect(out.peak - out.before, `RSS grew from ${out.before} to ${out.peak}`).toBeLessThan(RSS_BOUND);
    expect(out.replies).toBe(30);
    expect(out.problems).toEqual([]);
    expect(out.stillOpen).toBe(true);
    expect(out.ping.status).toBe(0);
  }

  it("history: 30 pages of ~28 MB each; RSS stays bounded while unread, then every page arrives whole", async () => {
    // A history page stops at the outbound cap's worth of text: 32 MB lets the whole
    // 28 MB page through, and the server must still never hold it.
    const child = await startChild(["--stats", "1", "--outbound-cap", String(32 * MB)]);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    b.client.close();
    const mids: string[] = [];
    const bodies: string[] = [];
    for (let i = 0; i < 40; i++) {
      const body = bodyOf("h", i);
      const r = await orExit(child, a.client.request("message", { uid: b.uid, body }));
      expect(r.status).toBe(0);
      mids.push(r.mid);
      bodies.push(body);
    }
    a.client.close();
    const { client: stats } = await login(child.port, a.login);
    const out = await pausedReader(child, stats, a.sid, 30, { action: "history", data: { uid: b.uid, limit: 50 } }, (d) => {
      const ms = d.messages as any[];
      if (ms.length !== 40) return `${ms.length} messages, not 40`;
      for (let i = 0; i < 40; i++) {
        if (ms[i].mid !== mids[i] || ms[i].body !== bodies[i]) return `message ${i} differs (mid ${ms[i].mid})`;
      }
      return undefined;
    });
    expectBoundedThenWhole(child, out);
    stats.close();
  }, 120_000);

  it("enter: 30 replies carrying 20 messages of ~700 KB each; RSS stays bounded while unread, then all arrive whole", async () => {
    const child = await startChild(["--stats", "1", "--outbound-cap", String(MB)]);
    const a = await registerUser(child.port);
    const ch = await orExit(child, a.client.request("createchannel", { name: `big${Date.now()}` }));
    expect(ch.status).toBe(0);
    const mids: string[] = [];
    const bodies: string[] = [];
    for (let i = 0; i < 20; i++) {
      const body = bodyOf("c", i);
      const r = await orExit(child, a.client.request("message", { channel: ch.chid, body }));
      expect(r.status).toBe(0);
      mids.push(r.mid);
      bodies.push(body);
    }
    a.client.close();
    const { client: stats } = await login(child.port, a.login);
    const out = await pausedReader(child, stats, a.sid, 30, { action: "enter", data: { channel: ch.chid } }, (d) => {
      const ms = d.last_msg as any[];
      if (ms.length !== 20) return `${ms.length} messages in last_msg, not 20`;
      for (let i = 0; i < 20; i++) {
        if (ms[i].mid !== mids[i] || ms[i].body !== bodies[i]) return `message ${i} differs (mid ${ms[i].mid})`;
      }
      if (!d.users.some((u: any) => u.uid === a.uid)) return "the member list lacks the owner";
      return undefined;
    });
    expectBoundedThenWhole(child, out);
    stats.close();
  }, 120_000);
});

describe("a long reply with events behind it", () => {
  const MB = 1024 * 1024;

  /**
   * A page of large attachments is a reply that lasts, and events for its client queue
   * behind it, counting against --outbound-cap. With a 32 MB page (40 attachments of
   * 600 KB) the events of a conversation far slower than the client's reading (10 KB
   * every 20 ms against 4 MB/s read) passed the 1 MB cap before the page was out, and
   * the client was closed as a slow reader in the middle of the reply it asked for. A
   * native page now stops at the cap's worth of text: the client pages back to the
   * start, gets every message and every event, and stays connected.
   */
  it("a client reading faster than its events come pages through 32 MB of attachments and is never closed", async () => {
    const child = await startChild(["--outbound-cap", String(MB)]);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    const c = await registerUser(child.port);
    const ch = await orExit(child, a.client.request("createchannel", { name: `long${Date.now()}` }));
    expect(ch.status).toBe(0);
    expect((await orExit(child, b.client.request("enter", { channel: ch.chid }))).status).toBe(0);
    b.client.close();
    const ATTACH = 600_000;
    const posted: { mid: string; data: string }[] = [];
    for (let i = 0; i < 40; i++) {
      const data = Buffer.alloc(ATTACH, i + 1).toString("base64");
      const r = await orExit(child, a.client.request("message", { channel: ch.chid, body: `file ${i}`, attach: { mime: "application/octet-stream", data } }));
      expect(r.status).toBe(0);
      posted.push({ mid: r.mid, data });
    }

    const reader = await orExit(child, LineConn.connect(child.port));
    // Reads at most 200 KB every 50 ms (4 MB/s): a client on a real link.
    let windowBytes = 0;
    const tick = setInterval(() => {
      windowBytes = 0;
      if (!reader.isClosed) reader.socket.resume();
    }, 50);
    reader.socket.on("data", (chunk: Buffer) => {
      windowBytes += chunk.length;
      if (windowBytes >= 200_000) reader.socket.pause();
    });
    const pages: any[] = [];
    const events: string[] = [];
    let authed = false;
    reader.onLine((line) => {
      const f = JSON.parse(line.toString("utf8"));
      if (f.action === "ev_message") events.push(f.data.mid);
      else if (f.action === "history") pages.push(f.data);
      else if (f.action === "auth") authed = f.data.status === 0;
    });
    reader.send("auth", { sid: b.sid });
    await orExit(child, waitFor(() => authed, 5000, "b's auth"));

    // c talks to b the whole time: 500 KB/s of events.
    const sent: string[] = [];
    let talking = true;
    const talk = (async () => {
      const body = "e".repeat(10_000);
      while (talking && !reader.isClosed) {
        const r = await c.client.request("message", { uid: b.uid, body });
        expect(r.status).toBe(0);
        sent.push(r.mid);
        await sleep(20);
      }
    })();

    const got: { mid: string; data: string }[] = [];
    let before: string | undefined;
    try {
      for (let n = 0; n < 60; n++) {
        const want = pages.length + 1;
        reader.send("history", before === undefined ? { channel: ch.chid } : { channel: ch.chid, before });
        await orExit(child, waitFor(() => pages.length === want || reader.isClosed, 60_000, `history page ${want}`));
        expect(reader.isClosed, `closed as a slow reader after ${got.length} of 40 messages`).toBe(false);
        const page = pages[want - 1];
        expect(page.status).toBe(0);
        if (page.messages.length === 0) break;
        got.unshift(...page.messages.map((m: any) => ({ mid: m.mid, data: m.attach.data })));
        before = page.messages[0].mid;
      }
    } finally {
      talking = false;
      await talk;
      clearInterval(tick);
    }
    expect(got.length).toBe(40);
    expect(got.map((m) => m.mid)).toEqual(posted.map((m) => m.mid));
    expect(got.every((m, i) => m.data === posted[i].data)).toBe(true);
    reader.socket.resume();
    await orExit(child, waitFor(() => events.length >= sent.length || reader.isClosed, 20_000, "c's messages at b"));
    expect(reader.isClosed).toBe(false);
    expect(events).toEqual(sent);
    reader.socket.destroy();
  }, 120_000);
});
