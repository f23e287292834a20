// Cluster mode's apply is deterministic: the same log gives the same state and the same
// outcomes on every node, however each node happened to cut the log into apply calls
// (one node applies entries one by one, another gathered many in one call). A
// fast-check property over random command sequences with contested logins, nicks,
// emails, sessions past the cap, logouts, password changes, contacts, cmids, edits,
// deletions, deleted accounts, and channels (contested names, caps, joins, invites,
// leaves, deletions, channel messages), the operator's kicks, bans and unbans, and session sweeps.

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
// A contested login, and one that is also an email (profile commands with `logins` may
// not take another user's login as their email).
const NAMES = ["ann", "bob", "ann", "x@example.com"];
const NICKS = ["n0", "n1", "n2"];
const SIDS = ["s0", "s1", "s2", "s3", "s4"];
const EMAILS = ["x@example.com", "y@example.com"];
const CHANNEL_NAMES = ["r0", "R0", "r1"]; // names are unique whatever their case
const CHIDS = ["1", "2", "3"];
// Mostly one hash, so that most session checks pass and sessions pile up past the cap.
const HASHES = ["h0", "h0", "h0", "h1"];

const command: fc.Arbitrary<Command> = fc.oneof(
  fc.record({
    k: fc.constantFrom("register" as const, "signup" as const),
    t: fc.integer({ min: 1000, max: 2000 }),
    uid: fc.constantFrom(...UIDS),
    login: fc.constantFrom(...NAMES),
    // "bob" as a nick contests a login (one namespace for commands with `names`).
    nick: fc.constantFrom(...NICKS, "bob"),
    hash: fc.constantFrom(...HASHES),
    sid: fc.constantFrom(...SIDS),
    expires: fc.constantFrom(1_500, 1_000_000),
    names: fc.option(fc.constant(true as const), { nil: undefined }),
  }),
  fc.record({ k: fc.constant("registration" as const), open: fc.boolean() }),
  fc.record({
    k: fc.constant("session" as const),
    t: fc.integer({ min: 1000, max: 2000 }),
    uid: fc.constantFrom(...UIDS),
    sid: fc.constantFrom(...SIDS),
    expires: fc.constantFrom(1_500, 1_000_000),
    checked: fc.constantFrom(...HASHES),
    cap: fc.constantFrom(1, 2, 3),
  }),
  fc.record({ k: fc.constant("logout" as const), uid: fc.constantFrom(...UIDS), sid: fc.constantFrom(...SIDS), expires: fc.constant(1_000_000), conn: fc.constant(1) }),
  fc.record({ k: fc.constant("password" as const), uid: fc.constantFrom(...UIDS), hash: fc.constantFrom(...HASHES), checked: fc.constantFrom(...HASHES), keep: fc.constantFrom(...SIDS) }),
  fc.record({ k: fc.constant("contact" as const), owner: fc.constantFrom(...UIDS), uid: fc.constantFrom(...UIDS), add: fc.boolean() }),
  fc.record({
    k: fc.constant("profile" as const),
    uid: fc.constantFrom(...UIDS),
    email: fc.constantFrom(...EMAILS),
    status: fc.constantFrom("a", "b"),
    logins: fc.option(fc.constant(true as const), { nil: undefined }),
  }),
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
  fc
    .record({
      k: fc.constant("chcreate" as const),
      t: fc.integer({ min: 1000, max: 2000 }),
      owner: fc.constantFrom(...UIDS),
      name: fc.constantFrom(...CHANNEL_NAMES),
      descr: fc.constant(""),
      priv: fc.boolean(),
      members: fc.subarray([...UIDS, "u9"]),
      maxOwned: fc.constantFrom(1, 2),
      maxJoined: fc.constantFrom(1, 2, 3),
    })
    .map((c) => ({ ...c, members: c.members.filter((uid) => uid !== c.owner).sort() })),
  fc.record(
    {
      k: fc.constant("join" as const),
      t: fc.integer({ min: 1000, max: 2000 }),
      chid: fc.constantFrom(...CHIDS),
      uid: fc.constantFrom(...UIDS),
      by: fc.constantFrom(...UIDS),
      cap: fc.constantFrom(1, 2, 3),
    },
    { requiredKeys: ["k", "t", "chid", "uid", "cap"] },
  ),
  fc.record({ k: fc.constant("leave" as const), uid: fc.constantFrom(...UIDS), nick: fc.constantFrom(...NICKS), chid: fc.constantFrom(...CHIDS, "*") }),
  fc.record({ k: fc.constant("chdelete" as const), chid: fc.constantFrom(...CHIDS), by: fc.constantFrom(...UIDS) }),
  fc.record({ k: fc.constant("sweep" as const), before: fc.integer({ min: 1000, max: 2000 }), limit: fc.constantFrom(1, 2, 10) }),
  fc.record({ k: fc.constant("kick" as const), uid: fc.constantFrom(...UIDS), reason: fc.constant("bye"), revoke: fc.boolean() }),
  fc.record(
    {
      k: fc.constant("ban" as const),
      kind: fc.constantFrom("login" as const, "addr" as const),
      value: fc.constantFrom("ann", "bob", "10.0.0.1"),
      reason: fc.constantFrom("spam", ""),
      at: fc.integer({ min: 1000, max: 2000 }),
      uid: fc.constantFrom(...UIDS),
    },
    { requiredKeys: ["k", "kind", "value", "reason", "at"] },
  ),
  fc.record({ k: fc.constant("unban" as const), kind: fc.constantFrom("login" as const, "addr" as const), value: fc.constantFrom("ann", "bob", "10.0.0.1") }),
  fc.record(
    {
      k: fc.constant("msg" as const),
      t: fc.integer({ min: 1000, max: 2000 }),
      from: fc.constantFrom(...UIDS),
      nick: fc.constantFrom(...NICKS),
      chid: fc.constantFrom(...CHIDS),
      body: fc.constantFrom("all", "hey"),
      cmid: fc.constantFrom("c0", "c2"),
    },
    { requiredKeys: ["k", "t", "from", "nick", "chid", "body"] },
  ),
);

type Apply = (entries: StoredEntry<Command>[], position: ViewPosition) => Promise<Outcome[][]>;

async function view(): Promise<{ core: Core; apply: Apply }> {
  const core = await openCore(testConfig({ nats: "nats://127.0.0.1:1" }), pino({ level: "silent" }));
  const cluster = core.services.cluster as unknown as { apply: Apply };
  return { core, apply: (e, p) => cluster.apply(e, p) };
}

/**
 * The state a client can see: accounts, contacts, memberships, messages, every stored
 * session, and the channels with their names, owners and members. A deleted channel's
 * messages are purged by each node in the background: read once no purge is pending.
 */
async function state(core: Core): Promise<string[]> {
  const { spaces } = core.services.storage;
  for (let i = 0; i < 200 && (await readEntries(spaces.purges, {})).length > 0; i++) await new Promise((r) => setTimeout(r, 25));
  const lines: string[] = [];
  for await (const line of exportRecords(core.services.storage, undefined)) lines.push(line);
  for (const space of ["usessions", "channels", "privchans", "chname", "owned", "members", "privof", "purges", "bans"] as const) {
    for (const [k, v] of await readEntries(spaces[space], {})) lines.push(`${space} ${k} ${JSON.stringify(v)}`);
  }
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
    case "done":
      return `done ${o.n ?? ""}`;
    case "registered":
      return `registered ${o.user.uid} ${o.user.num}`;
    case "error":
      return `error ${o.err.code} ${o.err.message}`;
    case "channel":
      return `channel ${o.chid}`;
    case "joined":
      return `joined ${o.added} ${o.nick}`;
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
          // Logins and nicks as one namespace (names): a login taken as a nick earlier in
          // the same call, and a nick taken as a login, as a node that applied them apart.
          [
            [
              { k: "register", t: 1000, uid: "u0", login: "ann", nick: "bob", hash: "h0", sid: "s0", expires: 1_000_000, names: true },
              { k: "register", t: 1000, uid: "u1", login: "bob", nick: "n1", hash: "h0", sid: "s1", expires: 1_000_000, names: true },
              { k: "register", t: 1000, uid: "u1", login: "n2", nick: "ann", hash: "h0", sid: "s1", expires: 1_000_000, names: true },
              { k: "register", t: 1000, uid: "u1", login: "n2", nick: "n2", hash: "h0", sid: "s1", expires: 1_000_000, names: true },
            ],
            [false, false, false, ...Array<boolean>(37).fill(true)],
          ],
          // An email that is another user's login (`logins`), registered earlier in the
          // same call, and one released by its holder's deletion in the same call.
          [
            [
              { k: "register", t: 1000, uid: "u0", login: "x@example.com", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000, names: true },
              { k: "register", t: 1000, uid: "u1", login: "bob", nick: "n1", hash: "h0", sid: "s1", expires: 1_000_000, names: true },
              { k: "profile", uid: "u1", email: "X@example.com", logins: true },
              { k: "profile", uid: "u0", email: "x@example.com", logins: true },
              { k: "deleteAccount", uid: "u0", checked: "h0", conn: 1 },
              { k: "profile", uid: "u1", email: "x@example.com", logins: true },
            ],
            [false, false, false, false, false, ...Array<boolean>(35).fill(true)],
          ],
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
          // A channel's life in one call: each join, message, leave and deletion must see
          // the ones before it, and the caps count them, as a node that applied them apart does.
          [
            [
              { k: "register", t: 1000, uid: "u0", login: "ann", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000 },
              { k: "register", t: 1000, uid: "u1", login: "bob", nick: "n1", hash: "h0", sid: "s1", expires: 1_000_000 },
              { k: "chcreate", t: 1001, owner: "u0", name: "r0", descr: "", priv: false, members: [], maxOwned: 2, maxJoined: 3 },
              { k: "chcreate", t: 1001, owner: "u1", name: "R0", descr: "", priv: false, members: [], maxOwned: 2, maxJoined: 3 },
              { k: "join", t: 1002, chid: "1", uid: "u1", cap: 2 },
              { k: "msg", t: 1003, from: "u1", nick: "n1", chid: "1", body: "all" },
              { k: "chcreate", t: 1004, owner: "u1", name: "r1", descr: "", priv: true, members: ["u0"], maxOwned: 2, maxJoined: 2 },
              { k: "leave", uid: "u1", nick: "n1", chid: "*" },
              { k: "msg", t: 1005, from: "u1", nick: "n1", chid: "1", body: "hey" },
              { k: "join", t: 1006, chid: "1", uid: "u1", by: "u0", cap: 1 },
              { k: "chdelete", chid: "1", by: "u1" },
              { k: "chdelete", chid: "1", by: "u0" },
              { k: "join", t: 1007, chid: "1", uid: "u1", cap: 3 },
              { k: "chcreate", t: 1008, owner: "u1", name: "r0", descr: "", priv: false, members: ["u0"], maxOwned: 1, maxJoined: 3 },
              { k: "deleteAccount", uid: "u0", checked: "h0", conn: 1 },
              { k: "msg", t: 1009, from: "u1", nick: "n1", chid: "3", body: "all" },
            ],
            Array<boolean>(40).fill(false),
          ],
        ],
      },
    );
  }, 120_000);

  it("refuses an edit or delete of a channel message by its author once they have left the channel, applied apart or together", async () => {
    const cmds: Command[] = [
      { k: "register", t: 1000, uid: "u0", login: "ann", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000 },
      { k: "chcreate", t: 1001, owner: "u0", name: "r0", descr: "", priv: false, members: [], maxOwned: 2, maxJoined: 3 },
      { k: "msg", t: 1002, from: "u0", nick: "n0", chid: "1", body: "all" },
      { k: "leave", uid: "u0", nick: "n0", chid: "1" },
      { k: "edit", t: 2000, mid: "1", by: "u0", body: "fixed" },
      { k: "del", mid: "1", by: "u0" },
      { k: "join", t: 1003, chid: "1", uid: "u0", cap: 3 },
      { k: "edit", t: 2001, mid: "1", by: "u0", body: "fixed" },
    ];
    for (const together of [false, true]) {
      const v = await view();
      try {
        const entries = cmds.map((c, i) => ({ seq: i + 1, id: `x:${i + 1}`, entry: { o: "x", n: i + 1, c: [c] } }));
        const out: string[] = [];
        if (together) out.push(...(await v.apply(entries, { created: "t", seq: entries.length, id: `x:${entries.length}` })).flat().map(brief));
        else for (const e of entries) out.push(...(await v.apply([e], { created: "t", seq: e.seq, id: e.id })).flat().map(brief));
        expect(out.slice(3)).toEqual(["done ", "nomsg false", "nomsg false", "joined true n0", "edited 2001"]);
      } finally {
        await v.core.close();
        removeDir(v.core.services.config.dataDir);
      }
    }
  });

  it("sends ev_enter and ev_leave to the members at their place in the log, however the entries were grouped", async () => {
    const cmds: Command[] = [
      { k: "register", t: 1000, uid: "u0", login: "ann", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000 },
      { k: "register", t: 1000, uid: "u1", login: "bob", nick: "n1", hash: "h0", sid: "s1", expires: 1_000_000 },
      { k: "chcreate", t: 1001, owner: "u0", name: "r0", descr: "", priv: false, members: [], maxOwned: 2, maxJoined: 3 },
      { k: "join", t: 1002, chid: "1", uid: "u1", cap: 3 },
      { k: "leave", uid: "u0", nick: "n0", chid: "1" },
    ];
    const heard: string[][] = [];
    for (const together of [false, true]) {
      const v = await view();
      // Each enter and leave with the users it reaches: named, or the channel's members as it goes out.
      const seen: Promise<string>[] = [];
      const router = v.core.services.router;
      const publish = router.publish.bind(router);
      router.publish = (ev, audience) => {
        if (ev.kind === "enter" || ev.kind === "leave") {
          const to = "users" in audience ? Promise.resolve([...audience.users]) : v.core.services.channels.members(audience.channel);
          seen.push(to.then((uids) => `${ev.kind} ${ev.uid} -> ${[...uids].sort().join(",")}`));
        }
        return publish(ev, audience);
      };
      try {
        const entries = cmds.map((c, i) => ({ seq: i + 1, id: `x:${i + 1}`, entry: { o: "x", n: i + 1, c: [c] } }));
        if (together) await v.apply(entries, { created: "t", seq: entries.length, id: `x:${entries.length}` });
        else for (const e of entries) await v.apply([e], { created: "t", seq: e.seq, id: e.id });
        await new Promise((r) => setTimeout(r, 50)); // the events go out after the apply
        heard.push(await Promise.all(seen));
      } finally {
        await v.core.close();
        removeDir(v.core.services.config.dataDir);
      }
    }
    expect(heard[0]).toEqual(["enter u1 -> u0,u1", "leave u0 -> u1"]);
    expect(heard[1]).toEqual(heard[0]);
  });

  it("refuses a profile email that is another user's login (whatever its case), not one's own", async () => {
    const v = await view();
    try {
      const cmds: Command[] = [
        { k: "register", t: 1000, uid: "u0", login: "x@example.com", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000, names: true },
        { k: "register", t: 1000, uid: "u1", login: "bob", nick: "n1", hash: "h0", sid: "s1", expires: 1_000_000, names: true },
        { k: "profile", uid: "u1", email: "X@example.com", logins: true },
        // An entry written before the rule (no flag) is decided as it was then.
        { k: "profile", uid: "u1", email: "x@example.com" },
        { k: "profile", uid: "u1", email: "" },
        { k: "profile", uid: "u0", email: "x@example.com", logins: true },
      ];
      const out: string[] = [];
      for (const [i, c] of cmds.entries()) out.push(...(await v.apply([{ seq: i + 1, id: `x:${i + 1}`, entry: { o: "x", n: i + 1, c: [c] } }], { created: "t", seq: i + 1, id: `x:${i + 1}` })).flat().map(brief));
      expect(out.slice(2)).toEqual(["taken email", "done ", "done ", "done "]);
    } finally {
      await v.core.close();
      removeDir(v.core.services.config.dataDir);
    }
  });

  it("refuses a user's register once the log has closed registration, applied apart or together; an operator's account is made", async () => {
    // A node lagging the close (made through another node) checked its own view: open.
    for (const together of [false, true]) {
      const v = await view();
      try {
        const reg = (uid: string, login: string, signup: boolean): Command => ({ k: signup ? "signup" : "register", t: 1000, uid, login, nick: `n${uid}`, hash: "h0", sid: `s${uid}`, expires: 1_000_000, names: true, bans: true });
        const cmds: Command[] = [
          reg("u0", "before", true),
          { k: "registration", open: false },
          reg("u1", "after", true),
          // An operator's account (or a node whose --registration decides, or an older entry): a register.
          reg("u2", "operator", false),
          { k: "registration", open: true },
          reg("u3", "reopened", true),
        ];
        const out: string[] = [];
        if (together) out.push(...(await v.apply([{ seq: 1, id: "x:1", entry: { o: "x", n: 1, c: cmds } }], { created: "t", seq: 1, id: "x:1" })).flat().map(brief));
        else for (const [i, c] of cmds.entries()) out.push(...(await v.apply([{ seq: i + 1, id: `x:${i + 1}`, entry: { o: "x", n: i + 1, c: [c] } }], { created: "t", seq: i + 1, id: `x:${i + 1}` })).flat().map(brief));
        expect(out[0]).toMatch(/^registered u0 /);
        expect(out[2]).toBe("refused");
        expect(out[3]).toMatch(/^registered u2 /);
        expect(out[5]).toMatch(/^registered u3 /);
      } finally {
        await v.core.close();
        removeDir(v.core.services.config.dataDir);
      }
    }
  });

  it("refuses a register of a login banned before it in the log, whichever node proposed it", async () => {
    // The proposer checked its own view, which can lag a ban made through another node:
    // the account was made and answered 0, on a login that can never log in (15).
    const v = await view();
    try {
      const cmds: Command[] = [
        { k: "ban", kind: "login", value: "carol", reason: "spam", at: 1000 },
        { k: "register", t: 1000, uid: "u0", login: "carol", nick: "n0", hash: "h0", sid: "s0", expires: 1_000_000, names: true, bans: true },
        { k: "register", t: 1000, uid: "u1", login: "Carol", nick: "n1", hash: "h0", sid: "s1", expires: 1_000_000, names: true, bans: true },
        // An entry written before the rule (no flag) is decided as it was then.
        { k: "register", t: 1000, uid: "u2", login: "carol", nick: "n2", hash: "h0", sid: "s2", expires: 1_000_000, names: true },
      ];
      const out: string[] = [];
      for (const [i, c] of cmds.entries()) out.push(...(await v.apply([{ seq: i + 1, id: `x:${i + 1}`, entry: { o: "x", n: i + 1, c: [c] } }], { created: "t", seq: i + 1, id: `x:${i + 1}` })).flat().map(brief));
      expect(out.slice(1, 3)).toEqual(["refused", "refused"]);
      expect(out[3]).toMatch(/^registered u2 /);
    } finally {
      await v.core.close();
      removeDir(v.core.services.config.dataDir);
    }
  });
});
