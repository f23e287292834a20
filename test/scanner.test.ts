// FrameScanner in isolation: every accepted input form, resynchronisation, limits, and
// properties over arbitrary objects, garbage and TCP splits.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { Code } from "../src/protocol/codes.js";
import { ACTION_PEEK_BYTES, peekAction } from "../src/protocol/frames.js";
import { FastShapes } from "../src/protocol/native-decode.js";
import { FrameScanner, type ScannerLimits } from "../src/transport/scanner.js";

type SinkCall =
  | { frame: string; attachment?: string; invalid?: boolean }
  | { reject: Code; reason: string; action: string | undefined };

class TextUpload {
  text = "";
  invalidated = false;
  aborted = false;
  writes = 0;
  /** Writes made before abort() (undefined until it is called). */
  writesAtAbort: number | undefined;
  write(t: Buffer) {
    this.writes++;
    this.text += t.toString("latin1");
  }
  invalid() {
    this.invalidated = true;
  }
  abort() {
    this.aborted = true;
    this.writesAtAbort ??= this.writes;
  }
}

// The streamed field path as the message action declares it.
const LIMITS: ScannerLimits = { maxFrame: 1024 * 1024, maxDepth: 32, streamPath: ["data", "attach", "data"] };

function connection(limits: ScannerLimits = LIMITS) {
  const calls: SinkCall[] = [];
  const uploads: TextUpload[] = [];
  const scanner = new FrameScanner<TextUpload>(limits, {
    frame: (bytes, upload) =>
      calls.push(
        upload
          ? { frame: bytes.toString("latin1"), attachment: upload.text, invalid: upload.invalidated }
          : { frame: bytes.toString("latin1") },
      ),
    reject: (code, reason, action) => calls.push({ reject: code, reason, action }),
    upload: () => {
      const u = new TextUpload();
      uploads.push(u);
      return u;
    },
  });
  return { scanner, calls, uploads };
}

function bytesOf(input: string | Buffer): Buffer {
  return typeof input === "string" ? Buffer.from(input, "utf8") : input;
}

function splitAt(bytes: Buffer, cuts: readonly number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let from = 0;
  for (const p of points) {
    chunks.push(bytes.subarray(from, p));
    from = p;
  }
  chunks.push(bytes.subarray(from));
  return chunks;
}

function scan(chunks: readonly (string | Buffer)[], limits: ScannerLimits = LIMITS): SinkCall[] {
  const { scanner, calls } = connection(limits);
  for (const chunk of chunks) scanner.push(bytesOf(chunk));
  return calls;
}

function bytewise(input: string | Buffer): Buffer[] {
  const bytes = bytesOf(input);
  return [...bytes].map((b) => Buffer.from([b]));
}

function everySplit(input: string | Buffer): Buffer[][] {
  const bytes = bytesOf(input);
  return Array.from({ length: bytes.length + 1 }, (_, p) => [bytes.subarray(0, p), bytes.subarray(p)]);
}

function frames(calls: readonly SinkCall[]): string[] {
  return calls.flatMap((c) => ("frame" in c ? [Buffer.from(c.frame, "latin1").toString("utf8")] : []));
}

function rejects(calls: readonly SinkCall[]) {
  return calls.flatMap((c) => ("reject" in c ? [c] : []));
}

function kinds(calls: readonly SinkCall[]): string[] {
  return calls.map((c) => ("frame" in c ? "frame" : `reject ${c.reject}`));
}

const ping = JSON.stringify({ action: "ping" });
const hello = JSON.stringify({ action: "hello", data: { client: "t" } });

describe("accepted forms", () => {
  it("frames NDJSON with LF and with CRLF", () => {
    expect(frames(scan([`${ping}\n${hello}\r\n${ping}\r\n`]))).toEqual([ping, hello, ping]);
  });

  it("frames objects back to back with no separator", () => {
    expect(frames(scan([`${ping}${hello}${ping}`]))).toEqual([ping, hello, ping]);
  });

  it("frames pretty-printed objects spread over many lines", () => {
    const send = { action: "send", data: { to: ["a", "b"], items: [{ n: 1 }, { n: [2, {}] }], text: "x" } };
    const pretty = JSON.stringify(send, null, 2);
    const tabbed = JSON.stringify(send, null, "\t").replace(/\n/g, "\r\n");
    const calls = scan([`${pretty}\n${tabbed}\r\n`]);
    expect(rejects(calls)).toEqual([]);
    expect(frames(calls).map((f) => JSON.parse(f))).toEqual([send, send]);
  });

  it("ignores whitespace and a BOM before the first frame", () => {
    expect(frames(scan([`\uFEFF \t\r\n\n  ${ping}\n`]))).toEqual([ping]);
  });

  it("ignores a BOM split across pushes", () => {
    const calls = scan([Buffer.from([0xef]), Buffer.from([0xbb]), Buffer.from([0xbf]), `${ping}\n`]);
    expect(calls).toEqual([{ frame: ping }]);
  });

  it("answers the bytes of a BOM out of their place as garbage (they are not UTF-8 text), one reply a line", () => {
    for (const stray of [[0xbb, 0xbf], [0xbf], [0xef, 0xbf, 0xbb], [0xef, 0xbb, 0xbb]]) {
      const calls = scan([`${ping}\n`, Buffer.from([...stray, 0x0a]), `${ping}\n`]);
      expect(kinds(calls), stray.join(" ")).toEqual(["frame", "reject 3", "frame"]);
    }
    // Between frames, a whole one is skipped wherever it comes.
    expect(kinds(scan([`${ping}\n`, Buffer.from([0xef, 0xbb, 0xbf]), `${ping}\n`]))).toEqual(["frame", "frame"]);
  });

  it("does not close a frame on braces inside strings", () => {
    const text = JSON.stringify({ action: "send", data: { text: "} { ] [ }}}\"{" } });
    expect(frames(scan([`${text}\n`]))).toEqual([text]);
  });

  it("keeps escaped quotes and escaped backslashes before a closing quote", () => {
    const raw = String.raw`{"action":"send","data":{"a":"say \"}\" ok","b":"ends with \\","c":"\\\\"}}`;
    const calls = scan([`${raw}\n${ping}\n`]);
    expect(rejects(calls)).toEqual([]);
    expect(frames(calls)).toEqual([raw, ping]);
    expect(JSON.parse(frames(calls)[0]).data).toEqual({ a: 'say "}" ok', b: "ends with \\", c: "\\\\" });
  });

  it("keeps \\u escapes, however the escape is split", () => {
    const raw = String.raw`{"action":"send","data":{"text":"\u007b\u0022\u005c\ud83d\ude00 \u0000"}}`;
    for (const chunks of [[raw + "\n"], ...everySplit(raw + "\n"), bytewise(raw + "\n")]) {
      expect(scan(chunks)).toEqual([{ frame: raw }]);
    }
  });

  it("frames multi-byte UTF-8 split at every byte position", () => {
    const text = JSON.stringify({ action: "send", data: { text: "Привет 👋🏽 世界 ü" } });
    const whole = Buffer.from(`${text}\n`, "utf8");
    for (const chunks of everySplit(whole)) {
      expect(frames(scan(chunks))).toEqual([text]);
    }
    expect(frames(scan(bytewise(whole)))).toEqual([text]);
  });

  it("retains only the incomplete frame between pushes", () => {
    const { scanner, calls } = connection();
    scanner.push(Buffer.from(`${ping}\n{"action":`));
    expect(scanner.buffered).toBe(Buffer.byteLength('{"action":'));
    scanner.push(Buffer.from('"hello"}\n'));
    expect(scanner.buffered).toBe(0);
    expect(frames(calls)).toEqual([ping, '{"action":"hello"}']);
  });
});

describe("resynchronisation", () => {
  it("rejects text at depth 0 once and frames the next line", () => {
    const calls = scan([`hello there, not json\n${ping}\n`]);
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: undefined }, { frame: ping }]);
  });

  it("rejects text at depth 0 once however it is split", () => {
    const input = `garbage ] } "x" more garbage\r\n${ping}\n`;
    for (const chunks of [...everySplit(input), bytewise(input)]) {
      expect(kinds(scan(chunks))).toEqual([`reject ${Code.InvalidData}`, "frame"]);
    }
  });

  it("ends a frame at a raw newline inside a string and frames the next line", () => {
    const calls = scan([`{"action":"send","data":{"text":"line one\n${ping}\n`]);
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: "send" }, { frame: ping }]);
  });

  it("rejects a truncated object once, echoing its action, and frames the next object", () => {
    const calls = scan([`{"action":"ping",\n${hello}\n`]);
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: "ping" }, { frame: hello }]);
  });

  it("rejects a truncated object once with CRLF and indentation before the next object", () => {
    const calls = scan([`{"action":"send","data":{"text":"x"}\r\n  ${hello}\r\n`]);
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: "send" }, { frame: hello }]);
  });

  it("rejects nesting deeper than maxDepth, echoing the action, and frames what follows", () => {
    const limits = { maxFrame: LIMITS.maxFrame, maxDepth: 4 };
    const deep = '{"action":"send","data":{"a":[[[1]]]}}';
    const atLimit = '{"action":"send","data":{"a":[[1]]}}';
    const calls = scan([`${deep}\n${atLimit}\n${ping}\n`], limits);
    expect(calls).toEqual([
      { reject: Code.InvalidData, reason: expect.stringContaining("4"), action: "send" },
      { frame: atLimit },
      { frame: ping },
    ]);
  });

  it("rejects nesting deeper than maxDepth without an action echoes none", () => {
    const limits = { maxFrame: LIMITS.maxFrame, maxDepth: 32 };
    const deep = `{"data":${"[".repeat(40)}${"]".repeat(40)}}`;
    const calls = scan([...bytewise(`${deep}\n`), `${ping}\n`], limits);
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: undefined }, { frame: ping }]);
  });

  it("echoes the action of a too-deep or truncated frame that came in many reads", () => {
    const limits = { maxFrame: LIMITS.maxFrame, maxDepth: 4 };
    const deep = `{"action":"send","data":{"pad":"${"p".repeat(5000)}","a":[[[1]]]}}`;
    const truncated = `{"action":"ping","data":{"pad":"${"q".repeat(5000)}"},`;
    const calls = scan([...bytewise(`${deep}\n`), ...bytewise(`${truncated}\n${hello}\n`), `${ping}\n`], limits);
    expect(calls).toEqual([
      { reject: Code.InvalidData, reason: expect.stringContaining("4"), action: "send" },
      { reject: Code.InvalidData, reason: expect.any(String), action: "ping" },
      { frame: hello },
      { frame: ping },
    ]);
  });

  it("ends a frame at a newline that follows a backslash inside a string", () => {
    const calls = scan([`{"data":{"text":"a\\\n${ping}\n`]);
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: undefined }, { frame: ping }]);
  });

  it("resynchronises after a truncated object nested deeper than maxDepth", () => {
    const limits = { maxFrame: LIMITS.maxFrame, maxDepth: 2 };
    const calls = scan([`{"action":"send","data":[[\n${ping}\n${ping}\n${ping}\n`], limits);
    expect(rejects(calls)).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: "send" }]);
    expect(frames(calls)).toContain(ping);
  });
});

describe("frame size limit", () => {
  const limits = { maxFrame: 256, maxDepth: 32 };
  const oversize = JSON.stringify({ action: "send", data: { text: "x".repeat(1000) } });

  it("rejects an oversize frame once with TooLarge, echoing its action, and frames the next", () => {
    const calls = scan([`${oversize}\n${ping}\n`], limits);
    expect(calls).toEqual([
      { reject: Code.TooLarge, reason: expect.stringContaining(String(oversize.length)), action: "send" },
      { frame: ping },
    ]);
  });

  it("never retains more than maxFrame while an oversize frame arrives in small chunks", () => {
    const { scanner, calls } = connection(limits);
    const chunks = splitAt(Buffer.from(`${oversize}\n${ping}\n`), Array.from({ length: 200 }, (_, i) => i * 7));
    let most = 0;
    for (const chunk of chunks) {
      scanner.push(chunk);
      most = Math.max(most, scanner.buffered);
    }
    expect(most).toBeLessThanOrEqual(limits.maxFrame);
    expect(most).toBeGreaterThan(0);
    expect(scanner.buffered).toBe(0);
    expect(calls).toEqual([{ reject: Code.TooLarge, reason: expect.any(String), action: "send" }, { frame: ping }]);
  });

  it("holds a frame that arrives a byte per read in a few copied parts, not one view per read", () => {
    // One Buffer view per read would cost a few hundred bytes of heap per byte sent
    // while `buffered` stayed under maxFrame.
    const { scanner, calls } = connection();
    const frame = `{"action":"ping","data":{"x":"${"a".repeat(300_000)}"}}`;
    const bytes = Buffer.from(frame + "\n");
    let mostParts = 0;
    for (let i = 0; i < bytes.length; i++) {
      scanner.push(Buffer.from([bytes[i]]));
      mostParts = Math.max(mostParts, (scanner as unknown as { parts?: Buffer[] }).parts?.length ?? 0);
    }
    expect(mostParts, "parts held at most").toBeLessThanOrEqual(16);
    expect(calls).toEqual([{ frame }]);
    expect(scanner.buffered).toBe(0);
  });

  it("copies a frame's start out of a large read rather than keeping the whole read alive", () => {
    // A view of the last 2 KiB of a 64 KiB read kept all 64 KiB in memory while
    // ScannerLimits.held counted 2 KiB: up to 64 times the budget, per connection.
    const { scanner, calls } = connection();
    const frame = `{"action":"ping","data":{"x":"${"a".repeat(4000)}"}}`;
    const head = 2048;
    const read = Buffer.alloc(64 * 1024, 0x20);
    Buffer.from(frame.slice(0, head)).copy(read, read.length - head);
    scanner.push(read);
    const parts = (scanner as unknown as { parts?: Buffer[] }).parts ?? [];
    expect(parts.length).toBeGreaterThan(0);
    for (const p of parts) expect(p.buffer.byteLength, "memory a held part keeps alive").toBeLessThanOrEqual(8 * 1024);
    scanner.push(Buffer.from(frame.slice(head) + "\n"));
    expect(calls).toEqual([{ frame }]);
    expect(scanner.buffered).toBe(0);
  });

  it("frames an object of exactly maxFrame bytes and rejects one byte more", () => {
    const exact = (n: number) => {
      const shell = JSON.stringify({ action: "send", text: "" });
      return JSON.stringify({ action: "send", text: "y".repeat(n - shell.length) });
    };
    expect(scan([`${exact(256)}\n`], limits)).toEqual([{ frame: exact(256) }]);
    expect(kinds(scan(bytewise(`${exact(256)}\n`), limits))).toEqual(["frame"]);
    expect(kinds(scan([`${exact(257)}\n`], limits))).toEqual([`reject ${Code.TooLarge}`]);
    expect(kinds(scan(bytewise(`${exact(257)}\n`), limits))).toEqual([`reject ${Code.TooLarge}`]);
  });

  it("echoes the action of an oversize frame split at every position", () => {
    const input = `${oversize}\n${ping}\n`;
    for (const chunks of everySplit(input)) {
      expect(scan(chunks, limits)).toEqual([
        { reject: Code.TooLarge, reason: expect.any(String), action: "send" },
        { frame: ping },
      ]);
    }
  });

  it("reports a frame both too deep and too large the same way split or whole", () => {
    const small = { maxFrame: 64, maxDepth: 2 };
    const both = JSON.stringify({ action: "send", data: { a: { text: "x".repeat(60) } } });
    const whole = scan([`${both}\n`], small);
    expect(whole).toEqual([{ reject: Code.TooLarge, reason: expect.any(String), action: "send" }]);
    expect(scan(bytewise(`${both}\n`), small)).toEqual(whole);
  });

  it("echoes the same action split or whole when maxFrame is below the action peek", () => {
    const small = { maxFrame: 64, maxDepth: 32 };
    const late = JSON.stringify({ data: { text: "x".repeat(100) }, action: "send" });
    expect(rejects(scan([`${late}\n`], small))[0].action).toBe("send");
    expect(rejects(scan(bytewise(`${late}\n`), small))[0].action).toBe("send");
  });
});

const layouts = {
  line: (o: unknown) => JSON.stringify(o) + "\n",
  crlf: (o: unknown) => JSON.stringify(o) + "\r\n",
  adjacent: (o: unknown) => JSON.stringify(o),
  pretty: (o: unknown) => JSON.stringify(o, null, 2) + "\n",
  tabbedCrlf: (o: unknown) => JSON.stringify(o, null, "\t").replace(/\n/g, "\r\n") + "\r\n",
};
type Layout = keyof typeof layouts;
const layout = fc.constantFrom(...(Object.keys(layouts) as Layout[]));

const unicodeText = fc.string({ unit: "binary", maxLength: 16 });
const payload = fc.dictionary(unicodeText, fc.jsonValue({ maxDepth: 6, stringUnit: "binary" }), { maxKeys: 6 });
const request = fc.oneof(
  payload,
  fc.record({ action: fc.stringMatching(/^[a-z_]{1,12}$/), data: payload }),
);
const cuts = fc.array(fc.nat(), { maxLength: 48 });

const structural = fc.string({
  unit: fc.constantFrom("{", "}", "[", "]", '"', "\\", ":", ",", "\n", "\r", " ", "a", "1", '"action":"x"', "\uFEFF"),
  maxLength: 40,
});

function serialise(items: readonly [unknown, Layout][]): string {
  return items.map(([o, l]) => layouts[l](o)).join("");
}

function streamSegment(maxFrame: number) {
  return fc.oneof(
    fc.tuple(request, layout).map(([o, l]) => Buffer.from(layouts[l](o))),
    fc.uint8Array({ maxLength: 40 }).map((b) => Buffer.from(b)),
    unicodeText.map((t) => Buffer.from(t + "\n")),
    structural.map((t) => Buffer.from(t)),
    fc
      .tuple(request, layout, fc.nat())
      .map(([o, l, cut]) => {
        const text = Buffer.from(layouts[l](o));
        return Buffer.concat([text.subarray(0, cut % (text.length + 1)), Buffer.from("\n")]);
      }),
    fc
      .tuple(fc.integer({ min: 0, max: 2 * maxFrame }), fc.boolean())
      .map(([n, actionFirst]) =>
        Buffer.from(
          (actionFirst
            ? JSON.stringify({ action: "send", data: { text: "x".repeat(n) } })
            : JSON.stringify({ data: { text: "x".repeat(n) }, action: "send" })) + "\n",
        ),
      ),
    fc
      .tuple(fc.integer({ min: 1, max: 14 }), fc.boolean())
      .map(([d, closed]) =>
        Buffer.from(`{"action":"deep","data":${"[".repeat(d)}${closed ? "]".repeat(d) + "}" : ""}\n`),
      ),
  );
}

describe("properties", () => {
  it("frames any objects in any layout and any split exactly, with no rejects", () => {
    fc.assert(
      fc.property(
        fc.constantFrom("", "\uFEFF", " \r\n\t", "\uFEFF\r\n"),
        fc.array(fc.tuple(request, layout), { maxLength: 8 }),
        cuts,
        (leading, items, cutPoints) => {
          const stream = Buffer.from(leading + serialise(items), "utf8");
          const { scanner, calls } = connection();
          for (const chunk of splitAt(stream, cutPoints)) scanner.push(chunk);
          expect(rejects(calls)).toEqual([]);
          expect(frames(calls).map((f) => JSON.parse(f))).toEqual(items.map(([o]) => JSON.parse(JSON.stringify(o))));
          expect(scanner.buffered).toBe(0);
        },
      ),
      { numRuns: 300 },
    );
  });

  it("makes the same sink calls for any split as for one push, garbage and broken frames included", () => {
    const limits = { maxFrame: ACTION_PEEK_BYTES, maxDepth: 10 };
    fc.assert(
      fc.property(fc.array(streamSegment(limits.maxFrame), { maxLength: 12 }), cuts, (segments, cutPoints) => {
        const stream = Buffer.concat(segments);
        expect(scan(splitAt(stream, cutPoints), limits)).toEqual(scan([stream], limits));
      }),
      { numRuns: 300 },
    );
  });

  it("makes the same sink calls for any split under small limits", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 64, max: 256 }),
        fc.integer({ min: 2, max: 6 }),
        cuts,
        fc.array(streamSegment(256), { maxLength: 12 }),
        (maxFrame, maxDepth, cutPoints, segments) => {
          const limits = { maxFrame, maxDepth };
          const stream = Buffer.concat(segments);
          expect(scan(splitAt(stream, cutPoints), limits)).toEqual(scan([stream], limits));
        },
      ),
      { numRuns: 300 },
    );
  });

  it("never throws and never retains more than maxFrame, whatever bytes arrive", () => {
    const biasedByte = fc.oneof(
      fc.integer({ min: 0, max: 255 }),
      fc.constantFrom(0x7b, 0x7d, 0x5b, 0x5d, 0x22, 0x5c, 0x3a, 0x2c, 0x0a, 0x0d, 0x20),
    );
    fc.assert(
      fc.property(
        fc.integer({ min: 64, max: 256 }),
        fc.integer({ min: 2, max: 32 }),
        fc.oneof(fc.uint8Array({ maxLength: 2000 }), fc.array(biasedByte, { maxLength: 2000 }).map((a) => Uint8Array.from(a))),
        cuts,
        (maxFrame, maxDepth, bytes, cutPoints) => {
          const { scanner, calls } = connection({ maxFrame, maxDepth });
          for (const chunk of splitAt(Buffer.from(bytes), cutPoints)) {
            scanner.push(chunk);
            expect(scanner.buffered).toBeLessThanOrEqual(maxFrame);
          }
          for (const call of calls) {
            if ("frame" in call) {
              expect(call.frame.length).toBeLessThanOrEqual(maxFrame);
              expect(call.frame).toMatch(/^[{[][^]*[}\]]$/);
            } else {
              expect([Code.InvalidData, Code.TooLarge]).toContain(call.reject);
            }
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe("frames decoded where they lie (ScannerLimits.fast)", () => {
  const shapes = new FastShapes();
  shapes.add("message", ["uid", "channel", "body", "cmid"]);
  type Seen = { value: unknown; size: number } | { reject: Code; reason: string; action: string | undefined };

  /** Every frame as its value and size, whether the scanner or the fast reader read it. */
  function values(limits: ScannerLimits, chunks: readonly Buffer[]): { seen: Seen[]; fast: number } {
    const seen: Seen[] = [];
    let fast = 0;
    const scanner = new FrameScanner<TextUpload>(limits, {
      frame: (bytes) => {
        let value: unknown;
        try {
          value = JSON.parse(bytes.toString("utf8"));
        } catch {
          value = "not JSON";
        }
        seen.push({ value, size: bytes.length });
      },
      decoded: (value, size) => {
        fast++;
        seen.push({ value, size });
      },
      reject: (code, reason, action) => seen.push({ reject: code, reason, action }),
      upload: () => new TextUpload(),
    });
    for (const chunk of chunks) scanner.push(chunk);
    return { seen, fast };
  }

  const plainValue = fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).filter((c) => c !== 0x22 && c !== 0x5c).map((c) => String.fromCharCode(c)), maxLength: 30 });
  const messageFrame = fc
    .array(fc.tuple(fc.constantFrom("uid", "channel", "body", "cmid"), plainValue), { minLength: 1, maxLength: 4 })
    .map((fields) => `{"action":"message","data":{${fields.map(([k, v]) => `"${k}":"${v}"`).join(",")}}}`);
  /** Message frames as clients write them, and a byte or two away from that shape. */
  const segment = fc.oneof(
    fc.tuple(messageFrame, fc.constantFrom("\n", "\r\n", "", " ")).map(([f, sep]) => Buffer.from(f + sep, "latin1")),
    fc
      .tuple(messageFrame, fc.nat(), fc.constantFrom(..."{}[]\":,\\ \n\u0000\u00e9a"))
      .map(([f, at, c]) => {
        const i = at % (f.length + 1);
        return Buffer.from(f.slice(0, i) + c + f.slice(i) + "\n", "utf8");
      }),
    fc.tuple(messageFrame, fc.nat()).map(([f, cut]) => Buffer.from(f.slice(0, cut % (f.length + 1)) + "\n", "latin1")),
    streamSegment(256),
  );

  it("gives the same frames, sizes and refusals as scanning, for any stream, split and limits", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 16, max: 300 }),
        fc.integer({ min: 1, max: 6 }),
        fc.array(segment, { maxLength: 10 }),
        cuts,
        (maxFrame, maxDepth, segments, cutPoints) => {
          const stream = Buffer.concat(segments);
          const chunks = splitAt(stream, cutPoints);
          const scanned = values({ maxFrame, maxDepth, streamPath: LIMITS.streamPath }, chunks);
          expect(scanned.fast).toBe(0);
          const read = values({ maxFrame, maxDepth, streamPath: LIMITS.streamPath, fast: shapes }, chunks);
          expect(read.seen).toEqual(scanned.seen);
        },
      ),
      { numRuns: 1000 },
    );
  });

  it("reads whole message frames itself, back to back or not, and scans the rest", () => {
    const limits = { ...LIMITS, fast: shapes };
    const m = '{"action":"message","data":{"uid":"u2","body":"hi"}}';
    const stream = Buffer.from(`${m}\n${m}${m}\r\n{"action":"ping"}\n${m.replace("hi", "h\\u00e9")}\n`, "latin1");
    const whole = values(limits, [stream]);
    expect(whole.fast).toBe(3);
    expect(whole.seen.map((x) => ("value" in x ? (x.value as { action: string }).action : x))).toEqual(["message", "message", "message", "ping", "message"]);
    // Cut inside the second frame: it is scanned from the held bytes; the others are read.
    const cut = values(limits, splitAt(stream, [m.length + 10]));
    expect(cut.fast).toBe(2);
    expect(cut.seen).toEqual(whole.seen);
    // At the frame limit exactly it is read; a byte under, it is refused as scanning refuses it.
    expect(values({ ...limits, maxFrame: m.length }, [Buffer.from(m)]).fast).toBe(1);
    const over = values({ ...limits, maxFrame: m.length - 1 }, [Buffer.from(m)]);
    expect(over.fast).toBe(0);
    expect(over.seen).toEqual([{ reject: Code.TooLarge, reason: `frame of ${m.length} bytes is over the limit of ${m.length - 1}`, action: "message" }]);
  });
});

describe("attachments", () => {
  const b64 = Buffer.from(Array.from({ length: 300 }, (_, i) => (i * 7) % 256)).toString("base64");
  const frames = [
    JSON.stringify({ action: "message", data: { uid: "u1", body: "hi", attach: { mime: "image/png", data: b64 } } }),
    JSON.stringify({ data: { attach: { data: b64, mime: "x/y" }, uid: "u1" }, action: "message" }),
    JSON.stringify({ action: "message", data: { attach: { mime: "a/b", data: b64 } } }, null, 2),
  ];

  it("streams data.attach.data to the upload and leaves \"\" in the frame, however it is split", () => {
    for (const f of frames) {
      for (const chunks of [[f + "\n"], bytewise(f + "\n")]) {
        const { scanner, calls } = connection();
        for (const c of chunks) scanner.push(bytesOf(c));
        expect(calls).toHaveLength(1);
        const call = calls[0] as { frame: string; attachment: string };
        expect(call.attachment).toBe(b64);
        const parsed = JSON.parse(call.frame);
        expect(parsed.data.attach.data).toBe("");
        const original = JSON.parse(f);
        original.data.attach.data = "";
        expect(parsed).toEqual(original);
      }
    }
  });

  it("does not count the attachment toward the frame limit", () => {
    const { scanner, calls } = connection({ ...LIMITS, maxFrame: 200 });
    const big = "QUJD".repeat(1000);
    scanner.push(Buffer.from(JSON.stringify({ action: "message", data: { uid: "u", attach: { mime: "m", data: big } } }) + "\n"));
    expect(calls).toEqual([{ frame: expect.any(String), attachment: big, invalid: false }]);
  });

  it("streams nothing for a frame its closing bytes put over the limit: 12, no upload", () => {
    // `..."data":"` + attachment + `"}}}`: the frame is the rest plus those four bytes.
    const head = '{"action":"message","data":{"uid":"u","attach":{"mime":"m","data":"';
    for (const [maxFrame, streamed] of [
      [head.length + 4, true],
      [head.length + 3, false],
    ] as const) {
      const { scanner, calls, uploads } = connection({ ...LIMITS, maxFrame });
      scanner.push(Buffer.from(`${head}${"QUJD".repeat(100)}"}}}\n`));
      expect(uploads.length).toBe(streamed ? 1 : 0);
      expect(kinds(calls)).toEqual([streamed ? "frame" : "reject 12"]);
    }
  });

  it("only streams the exact path: other 'data' strings stay in the frame", () => {
    const other = [
      { action: "x", data: "notanobject" },
      { action: "x", data: { data: "inner" } },
      { action: "x", data: { attach: "s", x: { data: "deep" } } },
      { action: "x", data: { attach: [{ data: "in array" }] } },
      { action: "x", extra: { attach: { data: "wrong root" } } },
    ];
    const { scanner, calls, uploads } = connection();
    for (const o of other) scanner.push(Buffer.from(JSON.stringify(o) + "\n"));
    // a key spelled with an escape is not taken for the path
    const escapedKey = '{"action":"x","data":{"attach":{"mime":"a","d\\u0061ta":"inline"}}}';
    scanner.push(Buffer.from(escapedKey + "\n"));
    expect(uploads).toHaveLength(0);
    expect(calls.map((x) => JSON.parse((x as { frame: string }).frame))).toEqual([...other, JSON.parse(escapedKey)]);
  });

  it("undoes \\/ escapes and \\u escapes of base64 characters, and flags other escapes as invalid", () => {
    const { scanner, calls } = connection();
    scanner.push(Buffer.from('{"action":"message","data":{"attach":{"mime":"m","data":"ab\\/c\\/"}}}\n'));
    scanner.push(Buffer.from('{"action":"message","data":{"attach":{"mime":"m","data":"ab\\ncd"}}}\n'));
    // .NET's System.Text.Json writes + as \u002B, Gson writes = as \u003d.
    scanner.push(Buffer.from('{"action":"message","data":{"attach":{"mime":"m","data":"a\\u002Bb\\u002bQ\\u003d\\u003D"}}}\n'));
    expect(calls[0]).toMatchObject({ attachment: "ab/c/", invalid: false });
    expect(calls[1]).toMatchObject({ invalid: true });
    expect(calls[2]).toMatchObject({ attachment: "a+b+Q==", invalid: false });
    // Escapes of what is not base64 (a space, a letter outside ASCII), and broken ones.
    for (const bad of ["ab\\u0020cd", "ab\\u00C1cd", "ab\\u00zzcd", "ab\\u00", "ab\\u"]) {
      const { scanner, calls } = connection();
      scanner.push(Buffer.from(`{"action":"message","data":{"attach":{"mime":"m","data":"${bad}"}}}\n{"action":"ping"}\n`));
      expect(calls[0], bad).toMatchObject({ invalid: true });
      expect(calls[1], bad).toEqual({ frame: '{"action":"ping"}' });
    }
  });

  it("undoes \\/ and \\u escapes however the text is split, in at most one write per chunk (property)", () => {
    const piece = fc.constantFrom("\\/", "QU", "JD", "/", "+", "\\u002B", "\\u002f", "\\u003d", "\\u0041", "\\u007A");
    fc.assert(
      fc.property(fc.array(piece, { maxLength: 200 }), fc.array(fc.nat(), { maxLength: 8 }), (pieces, cuts) => {
        const text = pieces.join("");
        const frame = Buffer.from(`{"action":"message","data":{"attach":{"mime":"m","data":"${text}"}}}\n`);
        const chunks = splitAt(frame, cuts);
        const { scanner, calls, uploads } = connection();
        for (const c of chunks) scanner.push(c);
        expect(calls).toEqual([{ frame: expect.any(String), attachment: JSON.parse(`"${text}"`), invalid: false }]);
        expect(uploads[0].writes).toBeLessThanOrEqual(chunks.length);
      }),
    );
  });

  it("aborts the upload as soon as the rest of its frame passes the limit, before the frame ends", () => {
    const { scanner, calls, uploads } = connection({ ...LIMITS, maxFrame: 200 });
    scanner.push(Buffer.from('{"action":"message","data":{"attach":{"mime":"m","data":"QUJD"},"body":"'));
    expect(uploads[0].aborted).toBe(false);
    scanner.push(Buffer.from("x".repeat(300)));
    expect(uploads[0].aborted).toBe(true);
    scanner.push(Buffer.from('"}}\n{"action":"ping"}\n'));
    expect(calls).toEqual([{ reject: Code.TooLarge, reason: expect.any(String), action: "message" }, { frame: '{"action":"ping"}' }]);
  });

  it("aborts the upload of a frame that breaks, and of one cut off by close()", () => {
    const { scanner, calls, uploads } = connection();
    scanner.push(Buffer.from('{"action":"message","data":{"attach":{"mime":"m","data":"QUJD\n{"action":"ping"}\n'));
    expect(uploads[0].aborted).toBe(true);
    expect(calls).toEqual([
      { reject: Code.InvalidData, reason: expect.any(String), action: "message" },
      { frame: '{"action":"ping"}' },
    ]);
    scanner.push(Buffer.from('{"action":"message","data":{"attach":{"mime":"m","data":"QUJD'));
    scanner.close();
    expect(uploads[1].aborted).toBe(true);
  });
});

describe("one reply per broken frame", () => {
  it("skips the rest of a pretty-printed frame broken by a raw newline in a string, quietly", () => {
    const { scanner, calls } = connection();
    scanner.push(Buffer.from('{\n  "action": "hello",\n  "data": {\n    "client": "broken\n    string",\n    "x": 1\n  }\n}\n{"action":"ping"}\n'));
    expect(calls).toEqual([{ reject: Code.InvalidData, reason: expect.any(String), action: "hello" }, { frame: '{"action":"ping"}' }]);
  });

  it("still answers each garbage line that follows a good frame", () => {
    const { scanner, calls } = connection();
    scanner.push(Buffer.from('{"action":"ping"}\njunk\njunk\n'));
    expect(calls.filter((c) => "reject" in c)).toHaveLength(2);
  });
});

describe("quiet skipping after a broken frame is bounded", () => {
  it("answers garbage again once more than a frame's worth was skipped", () => {
    const { scanner, calls } = connection({ maxFrame: 64, maxDepth: 8 });
    scanner.push(Buffer.from('{"action":"x","data":"broken\n' + "garbage line\n".repeat(20)));
    const rejects = calls.filter((c) => "reject" in c);
    // The broken frame, then every garbage line from the one (13 bytes each) that takes
    // the skipped bytes past 64, that one included: the 5th of 20.
    expect(rejects.length).toBe(1 + 16);
  });
});

describe("unfinished frames of several connections share one budget (ScannerLimits.held)", () => {
  const budget = (max: number) => ({ bytes: 0, max, holders: new Set<{ readonly kept: number; shedForRoom(): void }>() });

  it("an attachment's head that passes the budget aborts the upload it started and is answered 13", () => {
    const held = budget(16);
    const { scanner, calls, uploads } = connection({ ...LIMITS, held });
    // The frame's text before the attachment is held while the attachment streams.
    scanner.push(Buffer.from('{"action":"message","data":{"uid":"u1","attach":{"mime":"a/b","data":"QUJD'));
    scanner.push(Buffer.from('RA=="}}}\n'));
    expect(uploads).toHaveLength(1);
    expect(uploads[0].writesAtAbort).toBe(0); // at once, not after its text was written
    expect(calls).toEqual([{ reject: Code.RateLimited, reason: expect.stringMatching(/send it again/), action: "message" }]);
    expect(held.bytes).toBe(0);
  });

  it("a shed frame whose attachment the sink declined to stream (not logged in) is 12: sent again, it would not stream either", () => {
    const calls: SinkCall[] = [];
    const scanner = new FrameScanner<TextUpload>(
      { ...LIMITS, maxFrame: 200, held: budget(100) },
      { frame: (bytes) => calls.push({ frame: bytes.toString("latin1") }), reject: (code, reason, action) => calls.push({ reject: code, reason, action }), upload: () => undefined },
    );
    const attach = '{"action":"message","data":{"uid":"u1","attach":{"mime":"a/b","data":"' + "QUJD".repeat(100) + '"}}}';
    // Past the attachment's opening quote within the budget (the sink declines there),
    // then shed for the budget (not yet past --max-frame), then past --max-frame.
    scanner.push(Buffer.from(attach.slice(0, 80)));
    scanner.push(Buffer.from(attach.slice(80, 140)));
    scanner.push(Buffer.from(attach.slice(140) + "\n"));
    expect(calls).toEqual([{ reject: Code.TooLarge, reason: expect.stringMatching(/over the limit of 200/), action: "message" }]);
  });

  it("a frame refused for what it is keeps that answer when it is also shed", () => {
    const held = budget(8);
    const deep = '{"action":"ping","data":' + "[".repeat(40) + "]".repeat(40) + "}";
    expect(scan([deep.slice(0, 30), deep.slice(30) + "\n"], { ...LIMITS, held })).toEqual([
      { reject: Code.InvalidData, reason: "nesting deeper than 32", action: "ping" },
    ]);
    expect(held.bytes).toBe(0);
  });

  it("a shed frame that passes --max-frame is 12 (sending it again would not help); one whose attachment text passes it stays 13", () => {
    const limits = { ...LIMITS, maxFrame: 200 };
    const long = '{"action":"ping","data":{"pad":"' + "x".repeat(300) + '"}}';
    expect(scan([long.slice(0, 40), long.slice(40) + "\n"], { ...limits, held: budget(16) })).toEqual([
      { reject: Code.TooLarge, reason: expect.stringMatching(/over the limit of 200/), action: "ping" },
    ]);
    // Its attachment text would stream (and not count) if it were sent again with room.
    const attach = '{"action":"message","data":{"uid":"u1","attach":{"mime":"a/b","data":"' + "QUJD".repeat(100) + '"}}}';
    expect(scan([attach.slice(0, 40), attach.slice(40) + "\n"], { ...limits, held: budget(16) })).toEqual([
      { reject: Code.RateLimited, reason: expect.stringMatching(/send it again/), action: "message" },
    ]);
    // And with room, it does.
    expect(scan([attach.slice(0, 40), attach.slice(40) + "\n"], { ...limits, held: budget(1 << 20) })).toMatchObject([{ attachment: "QUJD".repeat(100) }]);
    // One whose attachment did stream, and whose other text passes --max-frame, is 12:
    // sent again, it would pass it again (it was 13, and then 12).
    const streamed = '{"action":"message","data":{"uid":"u1","attach":{"mime":"a/b","data":"QUJD"},"body":"' + "x".repeat(300) + '"}}';
    const cut = streamed.indexOf("QUJD");
    // (Shed for room by its third piece, under --max-frame; past it by the fourth.)
    const pieces = [streamed.slice(0, cut), streamed.slice(cut, cut + 10), streamed.slice(cut + 10, cut + 70), streamed.slice(cut + 70) + "\n"];
    expect(scan(pieces, { ...limits, held: budget(100) })).toEqual([
      { reject: Code.TooLarge, reason: expect.stringMatching(/over the limit of 200/), action: "message" },
    ]);
  });

  it("the count is the memory kept: every read, copy and buffer an unfinished frame keeps, by its whole size", () => {
    // Each chunk its own ArrayBuffer, as a socket's read is.
    const read = (b: Buffer) => {
      const own = Buffer.allocUnsafeSlow(b.length);
      b.copy(own);
      return own;
    };
    type Kept = { parts?: Buffer[]; stage?: Buffer };
    const memory = (scanner: unknown) => {
      const { parts, stage } = scanner as Kept;
      const stores = new Set<ArrayBufferLike>([...(parts ?? []), ...(stage ? [stage] : [])].map((b) => b.buffer));
      return [...stores].reduce((n, ab) => n + ab.byteLength, 0);
    };
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(2), fc.integer({ min: 0, max: 6000 }), fc.array(fc.nat(7000), { maxLength: 8 }), fc.oneof(fc.constant(-1), fc.nat(3000))), { minLength: 1, maxLength: 8 }),
        fc.integer({ min: 1, max: 20_000 }),
        (sends, max) => {
          const held = budget(max);
          const conns = [0, 1, 2].map(() => connection({ ...LIMITS, maxFrame: 1 << 20, held }));
          const check = () => {
            expect(conns.reduce((n, x) => n + memory(x.scanner), 0)).toBe(held.bytes);
            expect(held.bytes).toBeLessThanOrEqual(max);
          };
          for (const [c, pad, cuts, split] of sends) {
            const text = '{"action":"ping","data":{"pad":"' + "x".repeat(pad) + '"}}\n';
            for (const chunk of splitAt(Buffer.from(text), cuts)) {
              const own = read(chunk);
              // (-1: in the middle, where each part can be most of the read.)
              const at = split === -1 ? own.length >> 1 : split;
              if (at > 0 && at < own.length) {
                // One read fed in two parts, as a read is fed again after a HOLD.
                conns[c].scanner.push(own.subarray(0, at));
                check();
                conns[c].scanner.push(own.subarray(at));
              } else {
                conns[c].scanner.push(own);
              }
              check();
            }
          }
          expect(held.bytes).toBe(0);
        },
      ),
      { numRuns: 300 },
    );
  });

  it("frames split anywhere over several connections: each answered once, kept ones intact, the count back to zero", () => {
    const value = fc.oneof(fc.string({ maxLength: 40 }), fc.integer(), fc.array(fc.string({ maxLength: 10 }), { maxLength: 5 }));
    const frameArb = fc.record({ action: fc.constantFrom("ping", "message", "history"), data: fc.dictionary(fc.string({ maxLength: 8 }), value, { maxKeys: 6 }) });
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(3), fc.array(frameArb, { minLength: 1, maxLength: 4 }), fc.array(fc.nat(4000), { maxLength: 6 })), { minLength: 1, maxLength: 12 }),
        fc.integer({ min: 1, max: 600 }),
        (sends, max) => {
          const held = budget(max);
          const conns = [0, 1, 2, 3].map(() => connection({ ...LIMITS, held }));
          const sent: string[][] = [[], [], [], []];
          // Each connection's bytes, cut anywhere, interleaved with the others'.
          const pieces: [number, Buffer][][] = [[], [], [], []];
          for (const [c, frames, cuts] of sends) {
            const text = frames.map((f) => JSON.stringify(f)).join("\n") + "\n";
            sent[c].push(...frames.map((f) => JSON.stringify(f)));
            for (const chunk of splitAt(Buffer.from(text), cuts)) pieces[c].push([c, chunk]);
          }
          const order = pieces.flat().sort((x, y) => (x[1].length % 7) - (y[1].length % 7) || x[0] - y[0]);
          // Keep each connection's own order: take them per connection in turn.
          const next = [0, 0, 0, 0];
          for (let k = 0; k < order.length; k++) {
            const c = order[k][0];
            conns[c].scanner.push(pieces[c][next[c]++][1]);
            expect(held.bytes).toBeGreaterThanOrEqual(0);
            expect(held.bytes).toBeLessThanOrEqual(max);
          }
          expect(held.bytes).toBe(0);
          expect(held.holders.size).toBe(0);
          for (let c = 0; c < 4; c++) {
            const { calls } = conns[c];
            expect(calls).toHaveLength(sent[c].length);
            calls.forEach((call, i) => {
              if ("frame" in call) expect(call.frame).toBe(sent[c][i]);
              else expect(call.reject).toBe(Code.RateLimited);
            });
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe("peekAction", () => {
  // Any JSON value, objects with "action" keys of their own among them.
  const { value } = fc.letrec((tie) => ({
    value: fc.oneof({ depthSize: "small" }, fc.string(), fc.integer(), fc.constant(null), fc.array(tie("value"), { maxLength: 3 }), tie("object")),
    object: fc.dictionary(fc.constantFrom("action", "data", "x", "a\"ction"), tie("value"), { maxKeys: 3 }),
  }));
  const name = fc.stringMatching(/^[A-Za-z0-9_]{1,64}$/);

  it("names the outer object's action (the last, as JSON.parse takes), never a nested one, in a frame made invalid (property)", () => {
    fc.assert(
      fc.property(fc.dictionary(fc.constantFrom("data", "x", "y"), value, { maxKeys: 3 }), fc.option(name, { nil: undefined }), fc.nat(3), (rest, action, at) => {
        const keys = Object.entries(rest);
        if (action !== undefined) keys.splice(Math.min(at, keys.length), 0, ["action", action]);
        const text = "{" + keys.map(([k, v]) => `${JSON.stringify(k)}: ${JSON.stringify(v, null, at === 2 ? 1 : undefined)}`).join(",") + ",}";
        const bytes = Buffer.from(text);
        if (bytes.length > ACTION_PEEK_BYTES) return;
        expect(peekAction(bytes)).toBe(action);
      }),
    );
  });

  it("reads the action of a frame's start, cut anywhere after it", () => {
    const head = Buffer.from('{ "action" : "message", "data": {"action":"x", "attach": {"data": "QUJD');
    for (let cut = 0; cut <= head.length; cut++) {
      expect(peekAction(head.subarray(0, cut))).toBe(cut >= 22 ? "message" : undefined);
    }
  });
});
