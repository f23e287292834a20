// Which uploads may be given up for others when the uploads' budget is spent
// (BlobStore.reserve, --max-uploading with --upload-min-rate): only slow ones still
// arriving. One whose frame has arrived whole only waits to be stored, the upload
// asking for room is never given up for itself, and the time the server paused reading
// an upload (its file's buffer full) is not the client's. (The rate rules themselves, through
// a stalled upload on a real server: attachments.test.ts.) A real BlobStore on a real
// LevelDB and real files in a temp dir; every upload here counts as slow.
import { randomBytes } from "node:crypto";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { BlobStore } from "../src/storage/blobs.js";
import { Storage } from "../src/storage/db.js";
import { removeDir, tempDir } from "./helpers.js";

let dir: string;
let storage: Storage;
let blobs: BlobStore;
beforeEach(async () => {
  dir = tempDir();
  storage = await Storage.open(dir, pino({ level: "silent" }));
  blobs = new BlobStore(dir, storage);
  blobs.maxUploading = 100_000;
  blobs.shedBelow = () => 1e12; // any upload averages less
});
afterEach(async () => {
  await storage.close();
  removeDir(dir);
});

/** `n` decoded bytes (a multiple of 3) as base64. */
const base64 = (n: number): Buffer => Buffer.from(randomBytes(n).toString("base64"));

describe("uploads given up for others", () => {
  it("a slow upload still arriving gives its room to another", async () => {
    const a = blobs.writer(1e6);
    a.write(base64(60_000));
    const b = blobs.writer(1e6);
    b.write(base64(60_000));
    await expect(a.finish()).rejects.toMatchObject({ fault: "busy" });
    expect((await b.finish()).size).toBe(60_000);
    expect(blobs.shedUploads).toBe(1);
  });

  it("one whose frame has arrived whole is not given up: the other is refused", async () => {
    const a = blobs.writer(1e6);
    a.write(base64(60_000));
    a.arrived();
    const b = blobs.writer(1e6);
    b.write(base64(60_000));
    await expect(b.finish()).rejects.toMatchObject({ fault: "busy" });
    expect((await a.finish()).size).toBe(60_000);
    expect(blobs.shedUploads).toBe(0);
  });

  it("the upload asking for room is not given up for itself", async () => {
    const a = blobs.writer(1e6);
    a.write(base64(60_000));
    a.write(base64(60_000));
    await expect(a.finish()).rejects.toMatchObject({ fault: "busy" });
    expect(blobs.shedUploads).toBe(0);
    // Its room is free again.
    const b = blobs.writer(1e6);
    b.write(base64(90_000));
    expect((await b.finish()).size).toBe(90_000);
  });

  it("only as many as the room needs, the slowest first", async () => {
    const slow = blobs.writer(1e6);
    slow.write(base64(30_000));
    await new Promise((r) => setTimeout(r, 50)); // slower than the next one
    const faster = blobs.writer(1e6);
    faster.write(base64(30_000));
    const c = blobs.writer(1e6);
    c.write(base64(60_000)); // 120,000 > 100,000: one of the two gives 30,000
    await expect(slow.finish()).rejects.toMatchObject({ fault: "busy" });
    expect((await faster.finish()).size).toBe(30_000);
    expect((await c.finish()).size).toBe(60_000);
    expect(blobs.shedUploads).toBe(1);
  });

  it("the time the server paused reading an upload does not make it slow", async () => {
    // 1 MB/s: the 80,000 base64 bytes below took well under 80 ms to arrive, and the
    // server then held them 200 ms (the file's buffer is full at the first write and
    // cannot drain while this turn lasts); counted, they would average 0.4 MB/s.
    blobs.shedBelow = () => 1_000_000;
    const a = blobs.writer(1e6);
    a.write(base64(60_000));
    const until = performance.now() + 200;
    while (performance.now() < until);
    const b = blobs.writer(1e6);
    b.write(base64(60_000));
    await expect(b.finish()).rejects.toMatchObject({ fault: "busy" });
    expect((await a.finish()).size).toBe(60_000);
    expect(blobs.shedUploads).toBe(0);
  });
});
