// Property: whatever JSON value an authenticated client puts in whatever protocol field
// of whatever action the server offers, it gets exactly one reply for that action, and
// the server (a child process, so a crash shows as an exit) stays up.
//
// Each generated request is followed by a sentinel request with a unique unknown
// action name (answered 11). Replies come in request order, so once the sentinel's
// reply is in, every reply to the request is too: exactly one frame with the
// request's action must have arrived since the previous sentinel (events may be
// interleaved and are ignored).
//
// The seed is fixed so that runs are repeatable; set WIRECHAT_FUZZ_SEED to explore.

import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import type { Account, ChildServer, Frame } from "./helpers.js";
import { Client, registerUser } from "./helpers.js";
import { isAlive, orClosed, useChildServers } from "./pipeline-helpers.js";
import { NASTY_OBJECTS, PROTO_KEYS } from "./fuzz-values.js";

const startChild = useChildServers("all");

/** Actions that would end the session or the connection: not fuzzed. */
const EXCLUDED = new Set(["quit", "logout", "deleteaccount", "changepassword"]);

/** Every field name the protocol uses in `data`, old and new. */
const FIELDS = [
  "uid", "channel", "body", "mid", "cid", "sid", "login", "pass", "nick", "attach", "contacts", "limit",
  "before", "since", "q", "user", "name", "descr", "email", "phone", "picture", "user_status", "newpass",
  "ack", "reset", "cmid", "client", "version",
] as const;


/** Hand-picked JSON texts that have broken servers before (or could). */
const NASTY = [
  ...NASTY_OBJECTS,
  '[{"myid":true}]',
  '[{"myid":{"toString":1}},{"email":[]},{"phone":{}}]',
  '{"mime":{"toString":1},"data":"QUJD"}',
  '{"mime":"x","data":7}',
  '{"length":1e308}',
  '"__proto__"',
  '"\\u0000wirechat-blob-0\\u0000"',
  "1e400",
  "-0",
  "1.5",
  "9007199254740993",
  "-1",
  '""',
  "null",
  "true",
  "[]",
  "{}",
];

let child: ChildServer;
let me: Account;
let other: Account;
let chid: string;
let mid: string;
let features: string[];

beforeAll(async () => {
  child = await startChild(["--stats", "1"]);
  me = await registerUser(child.port);
  other = await registerUser(child.port);
  chid = (await me.client.request("createchannel", { name: `fuzz${Date.now()}` })).chid;
  mid = (await me.client.request("message", { uid: other.uid, body: "seed" })).mid;
  const hello = await me.client.request("hello");
  features = (hello.features as string[]).filter((a) => !EXCLUDED.has(a));
});

describe("any JSON in any protocol field", () => {
  it("gets exactly one reply for its action, and the server stays up", async () => {
    expect(features.length).toBeGreaterThan(10);
    expect(features).toContain("stats");
    const c = me.client;
    c.frames.splice(0);

    // Values that mean something on this server: they get past the first checks.
    const known = [me.uid, me.sid, other.uid, chid, mid, "*", "QUJD", "aGVsbG8=", "1", "0", me.login];
    const key = fc.oneof(
      { weight: 4, arbitrary: fc.constantFrom(...PROTO_KEYS) },
      { weight: 3, arbitrary: fc.constantFrom(...FIELDS, "myid", "mime", "data") },
      { weight: 2, arbitrary: fc.string({ maxLength: 6 }) },
    );
    const { value } = fc.letrec<{ value: string; array: string; object: string }>((tie) => ({
      value: fc.oneof(
        { depthSize: "small", maxDepth: 4 },
        { weight: 3, arbitrary: fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v)) },
        { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 2, stringUnit: "binary" }).map((v) => JSON.stringify(v)) },
        { weight: 2, arbitrary: fc.constantFrom(...NASTY) },
        { weight: 2, arbitrary: fc.constantFrom(...known).map((v) => JSON.stringify(v)) },
        { weight: 1, arbitrary: tie("array") },
        { weight: 2, arbitrary: tie("object") },
      ),
      array: fc.array(tie("value"), { maxLength: 4 }).map((xs) => `[${xs.join(",")}]`),
      object: fc
        .array(fc.tuple(key, tie("value")), { maxLength: 4 })
        .map((kvs) => `{${kvs.map(([k, v]) => `${JSON.stringify(k)}:${v}`).join(",")}}`),
    }));
    const request = fc.record({
      action: fc.constantFrom(...features),
      fields: fc.array(fc.tuple(fc.constantFrom(...FIELDS), value), { minLength: 1, maxLength: 4 }),
    });

    let n = 0;
    let sent = 0;
    await fc.assert(
      fc.asyncProperty(request, async ({ action, fields }) => {
        const data = `{${fields.map(([k, v]) => `${JSON.stringify(k)}:${v}`).join(",")}}`;
        const text = `{"action":${JSON.stringify(action)},"data":${data}}`;
        const sentinel = `zz_sentinel_${++n}`;
        c.write(`${text}\n{"action":"${sentinel}"}\n`);
        sent++;
        const end = await orClosed(c, c.reply(sentinel, 15_000), `the replies to ${text.slice(0, 300)}`, child);
        if (end.data.status !== 11) throw new Error(`the sentinel got ${JSON.stringify(end.data)}`);
        const seen: Frame[] = c.frames.splice(0);
        const replies = seen.filter((f) => f.action === action);
        if (replies.length !== 1) {
          throw new Error(
            `${replies.length} '${action}' frames for ${text.slice(0, 500)}: ${JSON.stringify(replies).slice(0, 500)}`,
          );
        }
        const st = replies[0].data?.status;
        if (!Number.isInteger(st)) throw new Error(`the reply has no integer status: ${JSON.stringify(replies[0]).slice(0, 300)}`);
      }),
      {
        numRuns: 400,
        seed: Number(process.env.WIRECHAT_FUZZ_SEED ?? 20260107),
        endOnFailure: true, // a crashed server cannot be used to shrink
      },
    );
    expect(sent).toBe(400);

    // Still up: the fuzzing connection and a new one answer.
    expect(isAlive(child)).toBe(true);
    expect((await orClosed(c, c.request("ping"), "a ping reply", child)).status).toBe(0);
    const fresh = await Client.connect(child.port);
    expect((await orClosed(fresh, fresh.request("ping"), "a ping reply", child)).status).toBe(0);
    fresh.close();
  }, 60_000);
});
