// How a cluster node authenticates to NATS (src/cluster/access.ts): a credentials
// file is read again at each connect, and a copy caught half written is not used.

import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { createUser } from "@nats-io/nkeys";
import { describe, expect, it } from "vitest";
import { natsConnectOptions } from "../src/cluster/access.js";
import { sleep } from "./pipeline-helpers.js";

const none = { natsUser: "", natsPass: "", natsToken: "", natsTlsCa: "", natsTlsCert: "", natsTlsKey: "" };

function credsText(jwt: string, seed: Uint8Array): string {
  return (
    `-----BEGIN NATS USER JWT-----\n${jwt}\n------END NATS USER JWT------\n\n` +
    `-----BEGIN USER NKEY SEED-----\n${new TextDecoder().decode(seed)}\n------END USER NKEY SEED------\n`
  );
}

describe("--nats-creds", () => {
  it("is read again at each connect (a renewed JWT), keeping the last whole copy when a rotation is caught half written", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "wirechat-creds-"));
    try {
      const file = path.join(dir, "node.creds");
      const [a, b] = [createUser(), createUser()];
      writeFileSync(file, credsText("jwt-a", a.getSeed()));
      const auth = natsConnectOptions({ ...none, natsCreds: file }).authenticator as (nonce?: string) => { jwt: string; nkey: string };
      expect(auth("n1")).toMatchObject({ jwt: "jwt-a", nkey: a.getPublicKey() });
      // The rotator has truncated the file and written half of the new one.
      await sleep(1100);
      writeFileSync(file, credsText("jwt-b", b.getSeed()).slice(0, 60));
      expect(auth("n2")).toMatchObject({ jwt: "jwt-a", nkey: a.getPublicKey() });
      // Written whole: the next connect uses it.
      writeFileSync(file, credsText("jwt-b", b.getSeed()));
      await sleep(1100);
      expect(auth("n3")).toMatchObject({ jwt: "jwt-b", nkey: b.getPublicKey() });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
