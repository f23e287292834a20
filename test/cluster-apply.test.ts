// Cluster mode's apply is deterministic: the same log gives the same state and the same
// outcomes on every node, however each node happened to cut the log into apply calls
// (one node applies entries one by one, another gathered many in one call). A
// fast-check property over random command sequences with contested logins, nicks,
// emails, sessions past the cap, logouts, password changes, contacts, cmids, edits,
// deletions and deleted accounts.

import fc from "fast-check";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { exportRecords } from "../src/admin/backup.js";
import type { StoredEntry, ViewPosition } from "../src/cluster/jetstream-log.js";
import type { Command, Outcome } from "../src/features/cluster.js";
import { openCore, type Core } from "../src/server.js";
import { readEntries } from "../src/storage/range.js";
import { removeDir, testConfig } from "./helpers.js";

const UIDS = ["u0", "u1"];
const NAMES = ["ann", "bob", "ann"]; // a contested login
const NICKS = ["n0", "n1", "n2"];
const SIDS = ["s0", "s1", "s2", "s3", "s4"];
const EMAILS = ["x@example.com", "y@example.com"];
// Mostly one hash, so that most session checks pass and sessions pile up past the cap.
const HASHES = ["h0", "h0", "h0", "h1"];

const command: fc.Arbitrary<Command> = fc.oneof(
  fc.record({
    k: fc.constant("register" as const),
    t: fc.integer({ min: 1000, max: 2000 }),
    uid: fc.constantFrom(...UIDS),
    login: fc.constantFrom(...NAMES),
    nick: fc.constantFrom(...NICKS),
    hash: fc.constantFrom(...HASHES),
    sid: fc.constantFrom(...SIDS),
    expires: fc.constant(1_000_000),
  }),
  fc.record({
    k: fc.constant("session" as const),
    t: fc.integer({ min: 1000, max: 2000 }),
    uid: fc.constantFrom(...UIDS),
    sid: fc.constantFrom(...SIDS),
    expires: fc.constant(1_000_000),
    checked: fc.constantFrom(...HASHES),
    cap: fc.constantFrom(1, 2, 3),
  }),
  fc.record({ k: fc.constant("logout" as const), uid: fc.constantFrom(...UIDS), sid: fc.constantFrom(...SIDS), expires: fc.constant(1_000_000), conn: fc.constant(1) }),
  fc.record({ k: fc.constant("password" as const), uid: fc.constantFrom(...UIDS), hash: fc.constantFrom(...HASHES), checked: fc.constantFrom(...HASHES), keep: fc.constantFrom(...SIDS) }),
  fc.record({ k: fc.constant("contact" as const), owner: fc.constantFrom(...UIDS), uid: fc.constantFrom(...UIDS), add: fc.boolean() }),
  fc.record({ k: fc.constant("profile" as const), uid: fc.constantFrom(...UIDS), email: fc.constantFrom(...EMAILS), status: fc.constantFrom("a", "b") }),
  fc.record(
    {
      k: fc.constant("msg" as const),
      t: fc.integer({ min: 1000, max: 2000 }),
      from: fc.constantFrom(...UIDS),
      nick: fc.constantFrom(...NICKS),
      to: fc.constantFrom(...UIDS),
      body: fc.constantFrom("hi", "yo"),
      cmid: fc.constantFrom("c0", "c1"),
    },
    { requiredKeys: ["k", "t", "from", "nick", "to", "body"] },
  ),
  fc.record({ k: fc.constant("edit" as const), t: fc.integer({ min: 2000, max: 3000 }), mid: fc.constantFrom("1", "2", "3", "4"), by: fc.constantFrom(...UIDS), body: fc.constantFrom("fixed", "again") }),
  fc.record({ k: fc.constant("del" as const), mid: fc.constantFrom("1", "2", "3", "4"), by: fc.constantFrom(...UIDS) }),
  fc.record({ k: fc.constant("deleteAccount" as const), uid: fc.constantFrom(...UIDS), checked: fc.constantFrom(...HASHES), conn: fc.constant(1) }),
);

type Apply = (entries: StoredEntry<Command>[], position: ViewPosition) => Promise<Outcome[][]>;

async function view(): Promise<{ core: Core; apply: Apply }> {
  const core = await openCore(testConfig({ nats: "nats://127.0.0.1:1" }), pino({ level: "silent" }));
  const cluster = core.services.cluster as unknown as { apply: Apply };
  return { core, apply: (e, p) => cluster.apply(e, p) };
}

/** The state a client can see: accounts, contacts, messages, and every stored session. */
async function state(core: Core): Promise<string[]> {
  const lines: string[] = [];
  for await (const line of exportRecords(core.services.storage, undefined)) lines.push(line);
  for (const [k, v] of await readEntries(core.services.storage.spaces.usessions, {})) lines.push(`session ${k} ${JSON.stringify(v)}`);
  return lines;
}

function brief(o: Outcome): string {
  switch (o.k) {
    case "sent":
      return `sent ${o.sent.mid} ${o.event ? "new" : "again"}`;
    case "taken":
      return `taken ${o.index}`;
    case "edited":
      return `edited ${o.edited}`;
    case "nomsg":
      return `nomsg ${o.forbidden}`;
    case "registered":
      return `registered ${o.user.uid} ${o.user.num}`;
    default:
      return o.k;
  }
}

describe("cluster apply", () => {
  it("gives the same state and outcomes whether entries are applied one per call or grouped", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(command, { minLength: 1, maxLength: 40 }), fc.array(fc.boolean(), { minLength: 40, maxLength: 40 }), async (cmds, cuts) => {
        const entries: StoredEntry<Command>[] = cmds.map((c, i) => ({ seq: i + 1, id: `x:${i + 1}`, entry: { o: "x", n: i + 1, c: [c] } }));
        const one = await view();
        const grouped = await view();
        try {
          const outOne: string[] = [];
          for (const e of entries) outOne.push(...(await one.apply([e], { created: "t", seq: e.seq, id: e.id })).flat().map(brief));
          const outGrouped: string[] = [];
          let batch: StoredEntry<Command>[] = [];
          for (let i = 0; i < entries.length; i++) {
            batch.push(entries[i]);
            if (cuts[i] || i === entries.length - 1) {
              const last = batch[batch.length - 1];
              outGrouped.push(...(await grouped.apply(batch, { created: "t", seq: last.seq, id: last.id })).flat().map(brief));
              batch = [];
            }
          }
          expect(outGrouped).toEqual(outOne);
          expect(await state(grouped.core)).toEqual(await state(one.core));
        } finally {
          for (const v of [one, grouped]) {
            await v.core.close();
            removeDir(v.core.services.config.dataDir);
          }
        }
      }),
      {
        numRuns: 60,
        examples: [
          // A logout and a new session of one user in one call: the session's cap must
          // count the logged-out one as gone, as a node that applied them apart does.
          [
            [
              { k: "register", t: 1000, uid: "u0", login: "ann", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000 },
              { k: "session", t: 1001, uid: "u0", sid: "s1", expires: 1_000_000, checked: "h0", cap: 3 },
              { k: "session", t: 1002, uid: "u0", sid: "s2", expires: 1_000_000, checked: "h0", cap: 3 },
              { k: "logout", uid: "u0", sid: "s2", expires: 1_000_000, conn: 1 },
              { k: "session", t: 1003, uid: "u0", sid: "s3", expires: 1_000_000, checked: "h0", cap: 2 },
            ],
            [true, true, true, false, true, ...Array<boolean>(35).fill(true)],
          ],
          // A message and its edit, then its deletion, in one call: each change must see
          // the message written, as a node that applied them apart does.
          [
            [
              { k: "register", t: 1000, uid: "u0", login: "ann", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000 },
              { k: "msg", t: 1001, from: "u0", nick: "n0", to: "u0", body: "hi" },
              { k: "edit", t: 2000, mid: "1", by: "u0", body: "fixed" },
              { k: "msg", t: 1002, from: "u0", nick: "n0", to: "u0", body: "yo" },
              { k: "del", mid: "2", by: "u0" },
            ],
            [true, false, false, false, true, ...Array<boolean>(35).fill(true)],
          ],
        ],
      },
    );
  }, 120_000);
});
