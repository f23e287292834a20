// The read caches (storage/read-cache.ts) never answer older than the database: prefix
// searches and contact lists are remembered, and every write that changes them,
// however it interleaves with reads in flight, is seen by the next request sent after
// its reply. Against a real server over TCP.
import { describe, expect, it } from "vitest";
import { rng } from "../scripts/load-lib.js";
import { Client, login, registerUser, uniqueName, serveForFile, type Account } from "./helpers.js";

const shared = serveForFile();

async function closeAll(...clients: Client[]): Promise<void> {
  for (const c of clients) c.close();
  await Promise.all(clients.map((c) => c.closed));
}

/** Every reply for `action` still owed to `c`, taken so later reads see only theirs. */
async function drainReplies(c: Client, action: string, n: number): Promise<void> {
  for (let i = 0; i < n; i++) expect((await c.reply(action, 10_000)).data.status).toBe(0);
}

/**
 * Runs `write` while `readers` keep sending `action` (each keeps about two in flight,
 * so some read starts while the write's batch is queued or being written), then takes
 * every reply they were owed.
 */
async function whileReading<T>(readers: Client[], action: string, data: Record<string, unknown> | undefined, write: () => Promise<T>): Promise<T> {
  const sent = readers.map(() => 0);
  const owed = readers.map(() => 0);
  let on = true;
  const loops = readers.map(async (c, i) => {
    while (on) {
      c.send(action, data);
      sent[i]++;
      if (sent[i] - owed[i] > 2) {
        expect((await c.reply(action, 10_000)).data.status).toBe(0);
        owed[i]++;
      } else await new Promise((r) => setImmediate(r));
    }
  });
  try {
    return await write();
  } finally {
    on = false;
    await Promise.all(loops);
    await Promise.all(readers.map((c, i) => drainReplies(c, action, sent[i] - owed[i])));
  }
}

describe("searchuser's remembered results", () => {
  it("follow registrations and deletions, also with searches in flight meanwhile", async () => {
    const tag = `${uniqueName("rc")}_`;
    const me = await registerUser(shared.port);
    const readers: Client[] = [];
    for (let i = 0; i < 4; i++) readers.push((await registerUser(shared.port)).client);
    const search = async () => ((await me.client.request("searchuser", { q: tag })).list as { uid: string }[]).map((x) => x.uid).sort();
    const model = new Set<string>();
    const made: Account[] = [];
    expect(await search()).toEqual([]); // an empty result is remembered too
    for (let i = 0; i < 8; i++) {
      // Searches keep going on other connections while the account is written.
      const a = await whileReading(readers, "searchuser", { q: tag }, () => registerUser(shared.port, `${tag}${i}`, "secret", `n${i}${tag}`));
      made.push(a);
      model.add(a.uid);
      expect(await search(), `after registering ${i}`).toEqual([...model].sort());
      if (i % 3 === 2) {
        const gone = made.shift() as Account;
        const r = await whileReading(readers, "searchuser", { q: tag }, () => gone.client.request("deleteaccount", { pass: "secret" }));
        expect(r.status).toBe(0);
        model.delete(gone.uid);
        expect(await search(), `after deleting ${gone.uid}`).toEqual([...model].sort());
      }
    }
    await closeAll(me.client, ...readers, ...made.map((a) => a.client));
  });
});

describe("contactlist's remembered lists", () => {
  it("equal the model after every add and delete, with lists read from a second device all along (random interleaving)", async () => {
    const seed = 20261203;
    const rand = rng(seed);
    const owner = await registerUser(shared.port);
    const second = await login(shared.port, owner.login);
    expect(second.auth.status).toBe(0);
    const targets: Account[] = [];
    for (let i = 0; i < 6; i++) targets.push(await registerUser(shared.port));
    const model = new Set<string>();
    const list = async (c: Client) => ((await c.request("contactlist")).list as { uid: string }[]).map((x) => x.uid).sort();
    expect(await list(owner.client)).toEqual([]);
    const devices = [owner.client, second.client];
    // Two more devices of the owner only read, all along.
    const readers: Client[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await login(shared.port, owner.login);
      expect(r.auth.status).toBe(0);
      readers.push(r.client);
    }
    for (let step = 0; step < 80; step++) {
      const d = Math.floor(rand() * 2);
      const writer = devices[d];
      const reader = devices[1 - d];
      const t = targets[Math.floor(rand() * targets.length)];
      const add = rand() < 0.55;
      // Reads race the write from the other devices.
      const r = await whileReading([reader, ...readers], "contactlist", undefined, () => writer.request(add ? "addcontact" : "delcontact", { uid: t.uid }));
      if (add) {
        expect(r.status, `step ${step} (seed ${seed})`).toBe(model.has(t.uid) ? 1 : 0);
        model.add(t.uid);
      } else {
        expect(r.status, `step ${step} (seed ${seed})`).toBe(0);
        model.delete(t.uid);
      }
      // Sent after the write's reply: must show it, on either device.
      expect(await list(reader), `step ${step} (seed ${seed})`).toEqual([...model].sort());
      expect(await list(writer), `step ${step} (seed ${seed})`).toEqual([...model].sort());
    }
    await closeAll(owner.client, second.client, ...readers, ...targets.map((a) => a.client));
  });

  it("drops a deleted contact's entry from every list that had it", async () => {
    const a = await registerUser(shared.port);
    const b = await registerUser(shared.port);
    const gone = await registerUser(shared.port);
    for (const who of [a, b]) {
      expect((await who.client.request("addcontact", { uid: gone.uid })).status).toBe(0);
      expect(((await who.client.request("contactlist")).list as { uid: string }[]).map((x) => x.uid)).toEqual([gone.uid]);
    }
    expect((await gone.client.request("deleteaccount", { pass: "secret" })).status).toBe(0);
    for (const who of [a, b]) expect((await who.client.request("contactlist")).list).toEqual([]);
    await closeAll(a.client, b.client, gone.client);
  });
});
