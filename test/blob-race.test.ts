// A message's attachment is deleted (delmessage → collect) while a new message uploads
// the same bytes: the new message must keep a blob it can be read from. Over real TCP,
// with a distinct content per round so that a blob lost in one round cannot be put
// back by a later upload.
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { login, registerUser, serveForFile, type Client } from "./helpers.js";
import { slowKeyReads } from "./pipeline-helpers.js";

const shared = serveForFile();

function attachFrame(uid: string, data: string): string {
  return JSON.stringify({ action: "message", data: { uid, body: "file", attach: { mime: "application/octet-stream", data } } }) + "\n";
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const sha256 = (b64: string) => createHash("sha256").update(Buffer.from(b64, "base64")).digest("hex");

interface Round {
  mid: string;
  b64: string;
}

/**
 * `rounds` times: device 1 sends X and deletes it while device 2 sends X again (after
 * `offset(i)` ms, or once the delete is answered when offset is "after-delete").
 */
async function race(rounds: number, offset: (i: number) => number | "after-delete"): Promise<{ kept: Round[]; me: Client; to: string }> {
  const a = await registerUser(shared.port);
  const { client: a2 } = await login(shared.port, a.login);
  const b = await registerUser(shared.port);
  b.client.close(); // b's copies wait in its queue: nothing streams them meanwhile
  const kept: Round[] = [];
  for (let i = 0; i < rounds; i++) {
    const b64 = randomBytes(3000).toString("base64");
    a.client.write(attachFrame(b.uid, b64));
    const first = (await a.client.reply("message")).data;
    expect(first.status).toBe(0);
    const when = offset(i);
    a.client.send("delmessage", { mid: first.mid });
    const deleted = a.client.reply("delmessage");
    if (when === "after-delete") await deleted;
    else if (when > 0) await sleep(when);
    a2.write(attachFrame(b.uid, b64));
    const [del, second] = await Promise.all([deleted, a2.reply("message")]);
    expect(del.data.status).toBe(0);
    expect(second.data.status).toBe(0);
    kept.push({ mid: second.data.mid, b64 });
  }
  a2.close();
  return { kept, me: a.client, to: b.uid };
}

async function expectReadable({ kept, me, to }: { kept: Round[]; me: Client; to: string }): Promise<void> {
  await shared.server.services.storage.settle();
  await sleep(300); // collects fired with void
  const blobs = shared.server.services.blobs;
  const missing = [];
  for (const r of kept) if (!existsSync(blobs.pathOf(sha256(r.b64)))) missing.push(r.mid);
  expect(missing, "messages whose blob file was deleted").toEqual([]);
  const h = await me.request("history", { uid: to, limit: 500 });
  const got = new Map<string, string>(h.messages.map((m: any) => [m.mid, m.attach?.data]));
  expect([...got.keys()].sort()).toEqual(kept.map((r) => r.mid).sort());
  for (const r of kept) expect(got.get(r.mid) === r.b64, `attachment of ${r.mid}`).toBe(true);
  me.close();
}

describe("deleting an attachment while the same bytes are uploaded again", () => {
  it("keeps the new message's blob (50 rounds, the upload 0-9 ms after the delete)", async () => {
    await expectReadable(await race(50, (i) => i % 10));
  });

  it("keeps it when reading the blob's references is slow (the delete decides late)", async () => {
    // A loaded disk, simulated: each read of `blobrefs` waits 50 ms before it runs, on
    // a snapshot taken when it was asked for (as LevelDB's are), so the new message's
    // reference, committed meanwhile, is not in it.
    const space = shared.server.services.storage.spaces.blobrefs;
    const restore = slowKeyReads(space, 50);
    try {
      await expectReadable(await race(20, () => "after-delete"));
    } finally {
      restore();
    }
  });
});
