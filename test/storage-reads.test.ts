// Storage reads on a real LevelDB: range.ts's paged reads, and ChannelStore's bounded
// membership cache (loads shared, reports applied, stale loads dropped, LRU bounds).
import { readFileSync } from "node:fs";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ChannelStore } from "../src/storage/channels.js";
import { put, Storage } from "../src/storage/db.js";
import { prefixRange, type Space } from "../src/storage/layout.js";
import { MAX_OPEN, rangeReads, readEntries, readKeys, readValues } from "../src/storage/range.js";
import { useTempDirs } from "./helpers.js";
import { recordSyncs, wrapBatchWrite } from "./pipeline-helpers.js";

const newDir = useTempDirs();
let storage: Storage;

beforeEach(async () => {
  storage = await Storage.open(newDir(), pino({ level: "silent" }));
});
afterEach(async () => {
  await storage.close();
});


/** Counts the iterators opened on `space` (and closes), optionally holding each read until `gate`. */
function watch(space: Space, gate?: () => Promise<unknown>): { opened: number; closed: number; restore: () => void } {
  const stats = { opened: 0, closed: 0, restore: () => void delete (space as any).keys };
  const keys = space.keys.bind(space);
  space.keys = ((options: any) => {
    const it = keys(options);
    stats.opened++;
    const wait = gate?.();
    const nextv = it.nextv.bind(it);
    const close = it.close.bind(it);
    it.nextv = (async (n: number) => {
      await wait;
      return nextv(n);
    }) as typeof it.nextv;
    it.close = async () => {
      stats.closed++;
      return close();
    };
    return it;
  }) as typeof space.keys;
  return stats;
}

describe("range reads", () => {
  const key = (p: string, i: number) => `${p}!${String(i).padStart(5, "0")}`;

  it("read every key, value or entry of a range, in order or reversed, up to a limit", async () => {
    const s = storage.spaces.contacts;
    await s.batch([
      ...Array.from({ length: 5000 }, (_, i) => ({ type: "put" as const, key: key("a", i), value: i })),
      { type: "put", key: "b!1", value: -1 },
      { type: "put", key: "a", value: -2 },
    ]);
    const all = await readKeys(s, prefixRange("a"));
    expect(all).toHaveLength(5000);
    expect(all[0]).toBe(key("a", 0));
    expect(all[4999]).toBe(key("a", 4999));
    expect(await readValues(s, { ...prefixRange("a"), reverse: true, limit: 3 })).toEqual([4999, 4998, 4997]);
    expect(await readEntries(s, { gte: key("a", 10), lte: key("a", 12) })).toEqual([
      [key("a", 10), 10],
      [key("a", 11), 11],
      [key("a", 12), 12],
    ]);
    expect(await readKeys(s, { ...prefixRange("a"), limit: 0 })).toEqual([]);
    expect(await readKeys(s, { ...prefixRange("a"), limit: 70 })).toHaveLength(70);
    expect(await readKeys(s, prefixRange("none"))).toEqual([]);
  });

  it("read ranges whose pages come back short (over 16 KiB of values per page)", async () => {
    const s = storage.spaces.hist;
    const big = "x".repeat(4000);
    await s.batch(Array.from({ length: 300 }, (_, i) => ({ type: "put" as const, key: key("c", i), value: { i, big } })));
    const values = await readValues<{ i: number }>(s, prefixRange("c"));
    expect(values.map((v) => v.i)).toEqual(Array.from({ length: 300 }, (_, i) => i));
  });

  it("close every iterator, also when a read fails", async () => {
    const s = storage.spaces.sessions;
    await s.put("k!1", 1);
    const w = watch(s);
    await readKeys(s, prefixRange("k"));
    await readKeys(s, { ...prefixRange("k"), limit: 1 });
    expect(w).toMatchObject({ opened: 2, closed: 2 });
    w.restore();
    const failing = watch(s, () => Promise.reject(new Error("disk on fire")));
    await expect(readKeys(s, prefixRange("k"))).rejects.toThrow("disk on fire");
    expect(failing).toMatchObject({ opened: 1, closed: 1 });
    failing.restore();
  });

  it("keep at most MAX_OPEN iterators open; the rest wait their turn, failures free theirs", async () => {
    const s = storage.spaces.contactof;
    await s.batch(Array.from({ length: 100 }, (_, i) => ({ type: "put" as const, key: key("p", i), value: 1 })));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    // The first read fails once released; the others each read their own key.
    let first = true;
    const w = watch(s, () => {
      if (!first) return gate;
      first = false;
      return gate.then(() => Promise.reject(new Error("disk on fire")));
    });
    const reads = Array.from({ length: 100 }, (_, i) => readKeys(s, { gte: key("p", i), lte: key("p", i) }));
    const failed = expect(reads[0]).rejects.toThrow("disk on fire");
    await new Promise((r) => setTimeout(r, 20));
    expect(w.opened).toBe(MAX_OPEN);
    expect(rangeReads()).toEqual({ open: MAX_OPEN, waiting: 100 - MAX_OPEN });
    release();
    await failed;
    const got = await Promise.all(reads.slice(1));
    expect(got).toEqual(Array.from({ length: 99 }, (_, i) => [key("p", i + 1)]));
    expect(w).toMatchObject({ opened: 100, closed: 100 });
    expect(rangeReads()).toEqual({ open: 0, waiting: 0 });
    w.restore();
  });
});

describe("channel membership cache", () => {
  async function channels(limits?: { channels?: number; entries?: number }): Promise<ChannelStore> {
    return new ChannelStore(storage, await storage.counter("chid"), limits);
  }

  /** Joins as a caller does: build, commit, report. */
  async function join(ch: ChannelStore, chid: string, ...uids: string[]): Promise<void> {
    await storage.commit(uids.flatMap((uid) => ch.joinOps(chid, uid, 1)));
    for (const uid of uids) ch.joined(chid, uid);
  }

  it("load a channel once, for concurrent misses too, then serve it from memory", async () => {
    const ch = await channels();
    await join(ch, "1", "u3", "u1", "u2");
    const w = watch(storage.spaces.members);
    const [m, yes, no] = await Promise.all([ch.members("1"), ch.isMember("1", "u2"), ch.isMember("1", "u9")]);
    expect(m).toEqual(["u1", "u2", "u3"]);
    expect([yes, no]).toEqual([true, false]);
    expect(w.opened).toBe(1);
    expect(await ch.members("1")).toEqual(["u1", "u2", "u3"]);
    expect(await ch.isMember("1", "u3")).toBe(true);
    expect([...(ch.cachedMembers("1") ?? [])].sort()).toEqual(["u1", "u2", "u3"]);
    expect(w.opened).toBe(1);
    w.restore();
  });

  it("apply reported joins, leaves and removals; members stay in uid order", async () => {
    const ch = await channels();
    await join(ch, "1", "u5");
    await ch.members("1");
    await join(ch, "1", "u1");
    expect(await ch.members("1")).toEqual(["u1", "u5"]);
    await storage.commit(ch.leaveOps("1", "u5"));
    ch.left("1", "u5");
    expect(await ch.isMember("1", "u5")).toBe(false);
    expect(ch.cacheSize).toEqual({ channels: 1, entries: 1 });
    const c = { chid: "1", name: "one", descr: "", owner: "u1", created: 1 };
    await storage.commit(ch.removeOps(c, await ch.members("1")));
    ch.removed("1");
    expect(ch.cachedMembers("1")).toBeUndefined();
    expect(ch.cacheSize).toEqual({ channels: 0, entries: 0 });
    expect(await ch.members("1")).toEqual([]);
  });

  it("read from disk while a change is built and not yet reported", async () => {
    const ch = await channels();
    await join(ch, "1", "u1");
    await ch.members("1");
    // committed but not (yet) reported: the cache must not answer for it
    await storage.commit(ch.joinOps("1", "u2", 1));
    expect(ch.cachedMembers("1")).toBeUndefined();
    expect(await ch.members("1")).toEqual(["u1", "u2"]);
    expect(await ch.isMember("1", "u2")).toBe(true);
    ch.joined("1", "u2");
    expect([...(ch.cachedMembers("1") ?? [])].sort()).toEqual(["u1", "u2"]);
  });

  it("do not cache a load that read the membership from before a reported change", async () => {
    const ch = await channels();
    await join(ch, "1", "u1");
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const w = watch(storage.spaces.members, () => gate);
    const stale = ch.members("1"); // its snapshot predates u2
    await join(ch, "1", "u2");
    open();
    expect(await stale).toEqual(["u1"]);
    expect(ch.cachedMembers("1")).toBeUndefined();
    w.restore();
    expect(await ch.members("1")).toEqual(["u1", "u2"]);
    expect(ch.cachedMembers("1")?.has("u2")).toBe(true);
  });

  it("evict the least recently used channels past either bound", async () => {
    const ch = await channels({ channels: 3, entries: 10 });
    for (const chid of ["1", "2", "3", "4"]) await join(ch, chid, `a${chid}`, `b${chid}`);
    for (const chid of ["1", "2", "3"]) await ch.members(chid);
    ch.cachedMembers("1"); // 1 is now the most recent, 2 the least
    await ch.members("4");
    expect(["1", "2", "3", "4"].map((c) => ch.cachedMembers(c) !== undefined)).toEqual([true, false, true, true]);
    expect(ch.cacheSize).toEqual({ channels: 3, entries: 6 });

    await join(ch, "5", ...Array.from({ length: 7 }, (_, i) => `m${i}`));
    await ch.members("5"); // 6 + 7 > 10: the least recent go until it fits
    expect(ch.cacheSize.entries).toBeLessThanOrEqual(10);
    expect(ch.cachedMembers("5")?.size).toBe(7);
    expect(ch.cacheSize).toEqual({ channels: 2, entries: 9 });

    await join(ch, "6", ...Array.from({ length: 11 }, (_, i) => `n${i}`));
    expect(await ch.members("6")).toHaveLength(11); // larger than the whole cache: not kept
    expect(ch.cachedMembers("6")).toBeUndefined();
    expect(ch.cacheSize).toEqual({ channels: 2, entries: 9 });

    // a reported join can push past the bound too
    await join(ch, "5", "m7", "m8");
    expect(ch.cacheSize.entries).toBeLessThanOrEqual(10);
  });
});

describe("group commit through classic-level's pinned private batch methods", () => {
  it("package.json pins the classic-level version db.ts was written against", async () => {
    const { PINNED_CLASSIC_LEVEL } = await import("../src/storage/db.js");
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { dependencies: Record<string, string> };
    expect(pkg.dependencies["classic-level"]).toBe(PINNED_CLASSIC_LEVEL);
  });

  it("every put and del of a batch is on disk after its commit, the first (public) and the rest (private) alike", async () => {
    const dir = newDir();
    const s1 = await Storage.open(dir, pino({ level: "silent" }));
    const meta = s1.spaces.meta;
    await s1.commit(Array.from({ length: 50 }, (_, i) => ({ type: "put" as const, key: `${meta.prefix}k${i}`, value: JSON.stringify(i) })));
    // A batch that starts with a del, then puts: the del goes through the public API.
    await s1.commit([
      { type: "del", key: `${meta.prefix}k0` },
      { type: "del", key: `${meta.prefix}k1` },
      { type: "put", key: `${meta.prefix}k1`, value: JSON.stringify("again") },
    ]);
    s1.put(`${meta.prefix}hot`, JSON.stringify("hot path"));
    await new Promise<void>((resolve, reject) => s1.afterCommit((err) => (err ? reject(err) : resolve())));
    await s1.close();
    const s2 = await Storage.open(dir, pino({ level: "silent" }));
    try {
      const m = s2.spaces.meta;
      expect(await m.get("k0")).toBeUndefined();
      expect(await m.get("k1")).toBe("again");
      expect(await m.get("k49")).toBe(49);
      expect(await m.get("hot")).toBe("hot path");
      expect((await readKeys(m, { gte: "k", lt: "l" })).length).toBe(49);
    } finally {
      await s2.close();
    }
  });
});

describe("closing the storage", () => {
  it("syncs the log when its last batch was lazy, as does a waiter on an empty batch behind one", async () => {
    const dir = newDir();
    const s = await Storage.open(dir, pino({ level: "silent" }));
    const { syncs } = recordSyncs(s);
    s.commitLazy([put(s.spaces.contacts, "lazy", 1)]);
    await s.settle();
    expect(syncs).toEqual([false]);
    // "Everything added so far is synced" holds for a waiter that adds nothing.
    await new Promise<void>((resolve, reject) => s.afterCommit((err) => (err ? reject(err) : resolve())));
    expect(syncs).toEqual([false, true]);
    // Nothing unsynced behind it: the next such waiter writes nothing.
    await new Promise<void>((resolve, reject) => s.afterCommit((err) => (err ? reject(err) : resolve())));
    expect(syncs).toEqual([false, true]);
    s.commitLazy([put(s.spaces.contacts, "lazy", 2)]);
    await s.close();
    expect(syncs).toEqual([false, true, false, true]);
    const again = await Storage.open(dir, pino({ level: "silent" }));
    try {
      expect(await again.spaces.contacts.get("lazy")).toBe(2);
      expect(await again.spaces.meta.get("sync")).toBeUndefined();
    } finally {
      await again.close();
    }
  });

  it("a waiter answered on an empty batch that writes again waits for that write, synced", async () => {
    const dir = newDir();
    const s = await Storage.open(dir, pino({ level: "silent" }));
    const { syncs } = recordSyncs(s);
    const space = s.spaces.contacts;
    // As a derived generation drains: a chunk that held nothing (a deleted user's
    // entries, filtered out), then the next chunk, added by the first one's waiter.
    let onDisk: unknown = "not answered";
    await new Promise<void>((resolve, reject) =>
      s.afterCommit((err) => {
        if (err) return reject(err);
        s.commitLazy([put(space, "next", 1)]);
        s.afterCommit((err2) => {
          if (err2) return reject(err2);
          void space.get("next").then((v) => {
            onDisk = v;
            resolve();
          }, reject);
        });
      }),
    );
    expect(onDisk).toBe(1);
    expect(syncs).toEqual([true]);
    await s.close();
  });

  it("a write added while it closes is refused, never written to the closed database", async () => {
    const dir = newDir();
    const s = await Storage.open(dir, pino({ level: "silent" }));
    const space = s.spaces.contacts;
    let late: Promise<void> | undefined;
    // A waiter's continuation commits again in the turn that close()'s settle resolves in.
    const first = s.commit([put(space, "first", 1)]).then(() => {
      late = s.commit([put(space, "late", 2)]);
    });
    const closed = s.close();
    await first;
    await expect(late).rejects.toThrow(/storage is closed/);
    await closed;
    await new Promise((r) => setImmediate(r));
    const again = await Storage.open(dir, pino({ level: "silent" }));
    try {
      expect(await again.spaces.contacts.get("first")).toBe(1);
      expect(await again.spaces.contacts.get("late")).toBeUndefined();
    } finally {
      await again.close();
    }
  });
});

describe("a counter's value", () => {
  it("is written again with the next batch when the batch that carried it failed", async () => {
    const dir = newDir();
    const s = await Storage.open(dir, pino({ level: "silent" }));
    const c = await s.counter("test-counter");
    const restore = wrapBatchWrite(s, async () => {
      throw new Error("the disk is full");
    });
    const n = c.next();
    await expect(s.commit([put(s.spaces.contacts, "a", n)])).rejects.toThrow(/disk is full/);
    restore();
    // A later batch that hands out nothing new carries it.
    await s.commit([put(s.spaces.contacts, "b", 0)]);
    await s.close();
    const again = await Storage.open(dir, pino({ level: "silent" }));
    try {
      expect((await again.counter("test-counter")).last).toBe(n);
    } finally {
      await again.close();
    }
  });
});
