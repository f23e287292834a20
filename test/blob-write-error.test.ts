// An attachment whose file cannot be written (here: the process's file-size limit,
// EFBIG, set with prlimit) is answered 16 with a text that names no file, and the
// connection, which was paused for the file's full buffer, reads again: a failed
// write emits no 'drain', so the upload must wake it itself.
import { randomBytes } from "node:crypto";
import { readdirSync } from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ChildServer, registerUser, removeDir, tempDir } from "./helpers.js";

const started: { child: ChildServer; dir: string }[] = [];
afterEach(async () => {
  for (const { child, dir } of started.splice(0)) {
    if (child.proc.exitCode === null && child.proc.signalCode === null) {
      child.proc.kill("SIGKILL");
      await child.exited;
    }
    removeDir(dir);
  }
});

function attachFrame(uid: string, data: string): string {
  return JSON.stringify({ action: "message", data: { uid, body: "file", attach: { mime: "application/octet-stream", data } } }) + "\n";
}

describe("a blob file that cannot be written", () => {
  it("answers 16 without a path, leaves no temp file, and the connection goes on", async () => {
    const dir = tempDir();
    // Files of at most 1 MiB: the database of this test stays far below it.
    const child = await ChildServer.start(dir, [], ["prlimit", `--fsize=${1024 * 1024}`, "--"]);
    started.push({ child, dir });
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    // 6 MiB decoded: written far faster than the file takes it, so the upload fills
    // the file's buffer and pauses the connection before the write past 1 MiB fails.
    a.client.write(attachFrame(b.uid, randomBytes(6 * 1024 * 1024).toString("base64")));
    const reply = (await a.client.reply("message", 20000)).data;
    expect(reply.status).toBe(16);
    expect(reply.error).toBe("the attachment could not be stored; nothing was changed");
    expect(reply.error).not.toContain(dir);
    expect((await a.client.request("ping")).status).toBe(0);
    // A small attachment afterwards is stored and delivered.
    const small = randomBytes(3000).toString("base64");
    a.client.write(attachFrame(b.uid, small));
    expect((await a.client.reply("message")).data.status).toBe(0);
    expect((await b.client.event("ev_message")).attach.data).toBe(small);
    await expect.poll(() => readdirSync(path.join(dir, "blobs", "tmp")), { timeout: 5000 }).toEqual([]);
    expect(child.proc.exitCode).toBe(null);
    a.client.close();
    b.client.close();
  });
});
