// Framing over real TCP: every accepted input form, resynchronisation and limits.
import { describe, expect, it } from "vitest";
import { Client, serveForFile } from "./helpers.js";


const shared = serveForFile({ badFrameLimit: 20 });

const ping = JSON.stringify({ action: "ping" });
const hello = JSON.stringify({ action: "hello", data: { client: "t" } });

async function actions(c: Client, n: number): Promise<string[]> {
  const out: string[] = [];
  for (let i = 0; i < n; i++) out.push((await c.next()).action);
  return out;
}

describe("accepted forms", () => {
  it("NDJSON with LF and with CRLF", async () => {
    const c = await Client.connect(shared.port);
    c.write(`${ping}\n${hello}\r\n${ping}\r\n`);
    expect(await actions(c, 3)).toEqual(["ping", "hello", "ping"]);
    c.close();
  });

  it("objects back to back with no separator (the reference's Java client)", async () => {
    const c = await Client.connect(shared.port);
    c.write(ping + hello + ping);
    expect(await actions(c, 3)).toEqual(["ping", "hello", "ping"]);
    c.close();
  });

  it("pretty-printed objects pasted from the docs", async () => {
    const c = await Client.connect(shared.port);
    c.write(`{\n\t"action":"hello",\n\t"data":{\n\t\t"client":"nc"\n\t}\n}\n` + JSON.stringify({ action: "ping" }, null, 4) + "\n");
    expect(await actions(c, 2)).toEqual(["hello", "ping"]);
    c.close();
  });

  it("a stream split byte by byte, through multi-byte UTF-8 and escapes", async () => {
    const c = await Client.connect(shared.port);
    const stream = Buffer.from(
      `\uFEFF{"action":"hello","data":{"client":"Привет \\"мир\\" \\u263A 😀 {[}]"}}\r\n${ping}${hello}\n`,
    );
    for (const byte of stream) {
      c.write(Buffer.from([byte]));
      await new Promise((r) => setImmediate(r));
    }
    expect(await actions(c, 3)).toEqual(["hello", "ping", "hello"]);
    c.close();
  });

  it("ignores whitespace between frames and a UTF-8 BOM at the start", async () => {
    const c = await Client.connect(shared.port);
    c.write(Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(`  \n\t\r\n${ping}   \n\n${ping}`)]));
    expect(await actions(c, 2)).toEqual(["ping", "ping"]);
    c.close();
  });
});

describe("server frames", () => {
  it("are compact JSON, one per line, with newlines inside values escaped", async () => {
    const c = await Client.connect(shared.port);
    c.write(`{"action":"no\\nsuch"}\n`);
    const r = await c.next();
    expect(r.data.status).toBe(11);
    expect(c.lines.at(-1)).toBe(JSON.stringify(r));
    c.close();
  });
});

describe("resynchronisation", () => {
  it("garbage at depth 0 gets one status-3 reply; the next line is served", async () => {
    const c = await Client.connect(shared.port);
    c.write(`this is not json at all\n${ping}\n`);
    const err = await c.next();
    expect(err).toEqual({ action: "unknown", data: { status: 3, error: expect.any(String) } });
    expect((await c.next()).action).toBe("ping");
    c.close();
  });

  it("invalid JSON inside a balanced object: status 3 with the action echoed", async () => {
    const c = await Client.connect(shared.port);
    c.write(`{"action":"ping","data":{"x":tru}}\n${ping}\n`);
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 3 } });
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    // The outer object's action, not one nested in its data (it was "evil").
    c.write(`{"data":{"action":"evil"},"action":"hello",}\n{"data":{"action":"evil"}}x\n`);
    expect(await c.next()).toMatchObject({ action: "hello", data: { status: 3, error: "frame is not valid JSON" } });
    expect(await c.next()).toMatchObject({ action: "unknown", data: { status: 3 } });
    c.close();
  });

  it("a truncated frame is reported once and the next line's request is served", async () => {
    const c = await Client.connect(shared.port);
    c.write(`{"action":"hello","data":{"client":"x",\n${ping}\n`);
    expect(await c.next()).toMatchObject({ action: "hello", data: { status: 3 } });
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    c.close();
  });

  it("invalid UTF-8 is status 3 and the connection goes on", async () => {
    const c = await Client.connect(shared.port);
    c.write(Buffer.concat([Buffer.from(`{"action":"hello","data":{"client":"`), Buffer.from([0xc3, 0x28]), Buffer.from(`"}}\n${ping}\n`)]));
    expect(await c.next()).toMatchObject({ action: "hello", data: { status: 3 } });
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    c.close();
  });

  it("a frame that is not an object, or has no action, or a non-object data, is status 3", async () => {
    const c = await Client.connect(shared.port);
    c.write(`[1,2,3]\n{"data":{}}\n{"action":"ping","data":"x"}\n{"action":5}\n${ping}\n`);
    const got = await Promise.all([c.next(), c.next(), c.next(), c.next()]);
    expect(got.map((f) => [f.action, f.data.status])).toEqual([
      ["unknown", 3],
      ["unknown", 3],
      ["ping", 3],
      ["unknown", 3],
    ]);
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    c.close();
  });

  it("nesting deeper than 32 is status 3; 32 deep is fine", async () => {
    const c = await Client.connect(shared.port);
    const nest = (n: number) => "[".repeat(n) + "]".repeat(n);
    // the frame is depth 1 and data depth 2, so 30 arrays inside make 32
    c.write(`{"action":"ping","data":{"x":${nest(30)}}}\n`);
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    c.write(`{"action":"ping","data":{"x":${nest(40)}}}\n${ping}\n`);
    const deep = await c.next();
    expect(deep).toMatchObject({ action: "ping", data: { status: 3 } });
    expect(deep.data.error).toMatch(/nesting/);
    expect(await c.next()).toMatchObject({ action: "ping", data: { status: 0 } });
    c.close();
  });

  it("a client that keeps sending garbage past the threshold is disconnected", async () => {
    const c = await Client.connect(shared.port);
    c.write("junk\n".repeat(25));
    await c.closed;
    const errors = c.lines.map((l) => JSON.parse(l)).filter((f) => f.data?.status === 3);
    expect(errors.length).toBe(21); // 20 answered, then the closing notice
    expect(errors.at(-1).data.error).toMatch(/too many bad frames/);
  });

  it("a close for bad frames is counted and logged once, however many bad frames came after the limit", async () => {
    const closes = shared.server.services.metrics.closes;
    const before = closes.bad_frames;
    const c = await Client.connect(shared.port);
    // One read: every line past the 20th is over the limit.
    c.write("junk\n".repeat(500));
    await c.closed;
    expect(closes.bad_frames - before).toBe(1);
  });
});

describe("size limit", () => {
  it("a 2 MiB frame is answered with 12 and the connection stays usable", async () => {
    const c = await Client.connect(shared.port);
    const big = JSON.stringify({ action: "hello", data: { client: "x".repeat(2 * 1024 * 1024) } });
    c.write(big + "\n" + ping + "\n");
    const r = await c.next();
    expect(r).toMatchObject({ action: "hello", data: { status: 12 } });
    expect((await c.next()).action).toBe("ping");
    c.close();
  });

  it("memory stays bounded for an endless unterminated frame", async () => {
    const c = await Client.connect(shared.port);
    c.write(`{"action":"hello","data":{"client":"`);
    const chunk = "y".repeat(64 * 1024);
    for (let i = 0; i < 48; i++) c.write(chunk); // 3 MiB, never closed
    c.write(`"}}\n${ping}\n`);
    expect(await c.next()).toMatchObject({ action: "hello", data: { status: 12 } });
    expect((await c.next()).action).toBe("ping");
    c.close();
  });
});

describe("ordering", () => {
  it("replies come in request order, including error replies between them", async () => {
    const c = await Client.connect(shared.port);
    c.write(`${ping}\ngarbage\n{"action":"nope"}\n${hello}\n{"action":"userinfo","data":{"user":"x"}}\n${ping}\n`);
    expect(await actions(c, 6)).toEqual(["ping", "unknown", "nope", "hello", "userinfo", "ping"]);
    c.close();
  });
});
