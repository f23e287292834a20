// The idle collection (src/idle-gc.ts): a server that goes quiet after a burst runs one
// full garbage collection, and only then; --idle-gc 0 leaves collection to V8. A server
// in a child process (the collector is the entry point's, as in production), its
// debug log read for the collection's line.

import { describe, expect, it } from "vitest";
import { registerUser } from "./helpers.js";
import { sleep, useChildServers } from "./pipeline-helpers.js";
import type { ChildServer } from "./helpers.js";

const LINE = /"heapBefore":(\d+),"heapAfter":(\d+),"ms":\d+,"msg":"idle: full garbage collection"/g;

/** A burst: 100 direct messages of 20 KB, every reply awaited, so the server is idle after it. */
async function burst(port: number): Promise<void> {
  const a = await registerUser(port);
  const b = await registerUser(port);
  const body = "x".repeat(20_000);
  for (let i = 0; i < 100; i++) a.client.send("message", { uid: b.uid, body });
  for (let i = 0; i < 100; i++) expect((await a.client.reply("message")).data.status).toBe(0);
  a.client.close();
  b.client.close();
}

function collections(child: ChildServer): { before: number; after: number }[] {
  return [...child.stdout().matchAll(LINE)].map((m) => ({ before: Number(m[1]), after: Number(m[2]) }));
}

describe("idle collection", () => {
  const start = useChildServers();

  it("runs one full collection once the server is idle after a burst, and it frees heap", async () => {
    const child = await start(["--log-level", "debug", "--idle-gc", "1"]);
    // Each burst allocates ~10 MB; the heap is looked at every half second while idle.
    for (let round = 0; round < 8 && collections(child).length === 0; round++) {
      await burst(child.port);
      await sleep(1500);
    }
    expect(collections(child).length).toBeGreaterThan(0);
    // Idle with no new garbage: no collection after collection (counted once what the
    // burst's end left has had its chance).
    await sleep(1500);
    const count = collections(child).length;
    await sleep(2000);
    expect(collections(child).length).toBe(count);
    for (const c of collections(child)) expect(c.after).toBeLessThan(c.before);
    // The server answers as before.
    await burst(child.port);
  });

  it("--idle-gc 0 runs none", async () => {
    const child = await start(["--log-level", "debug", "--idle-gc", "0"]);
    for (let round = 0; round < 3; round++) {
      await burst(child.port);
      await sleep(1500);
    }
    expect(collections(child)).toEqual([]);
  });
});
