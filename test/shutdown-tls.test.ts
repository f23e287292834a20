// Graceful shutdown under traffic, and the TLS listener.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { ChildServer, Client, registerUser, startTestServer, useTempDirs } from "./helpers.js";

const newDataDir = useTempDirs();

describe("SIGTERM during traffic", () => {
  it("exits 0, and every acknowledged message is there after a restart", async () => {
    const dataDir = newDataDir();
    let child = await ChildServer.start(dataDir);
    const a = await registerUser(child.port);
    const b = await registerUser(child.port);
    b.client.close();
    await b.client.closed;
    const acked: string[] = [];
    let stop = false;
    a.client.socket.on("close", () => (stop = true));
    // keep 50 messages in flight until the server goes away
    const sender = (async () => {
      let inFlight = 0;
      for (let i = 0; !stop; i++) {
        while (inFlight < 50 && !stop) {
          a.client.send("message", { uid: b.uid, body: `m${i}-${inFlight}` });
          inFlight++;
        }
        try {
          const r = (await a.client.reply("message", 3000)).data;
          inFlight--;
          if (r.status === 0) acked.push(r.mid);
        } catch {
          break;
        }
      }
    })();
    await new Promise((r) => setTimeout(r, 500));
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
    await sender;
    expect(acked.length).toBeGreaterThan(50);
    expect(child.stdout()).toMatch(/wirechat stopped/);

    child = await ChildServer.start(dataDir);
    const c = await Client.connect(child.port);
    expect((await c.request("auth", { sid: b.sid })).status).toBe(0);
    const got = new Set<string>();
    for (;;) {
      try {
        got.add((await c.event("ev_message", () => true, 2000)).mid);
      } catch {
        break;
      }
    }
    expect(acked.filter((m) => !got.has(m))).toEqual([]);
    c.close();
    child.proc.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  }, 60_000);
});

describe("TLS", () => {
  const certPath = fileURLToPath(new URL("./fixtures/localhost.crt", import.meta.url));
  const key = fileURLToPath(new URL("./fixtures/localhost.key", import.meta.url));
  const cert = readFileSync(certPath);

  it("speaks the same protocol: register, auth and message", async () => {
    const server = await startTestServer({ tlsPort: 0, tlsCert: certPath, tlsKey: key });
    expect(server.tlsPort).toBeGreaterThan(0);
    const a = await Client.connectTls(server.tlsPort as number, cert);
    expect((await a.request("register", { login: `tls${process.pid}a`, pass: "p", nick: `tls${process.pid}a` })).status).toBe(0);
    const authA = (await a.reply("auth")).data;
    const b = await Client.connectTls(server.tlsPort as number, cert);
    expect((await b.request("register", { login: `tls${process.pid}b`, pass: "p", nick: `tls${process.pid}b` })).status).toBe(0);
    const authB = (await b.reply("auth")).data;
    const again = await Client.connectTls(server.tlsPort as number, cert);
    expect((await again.request("auth", { login: `tls${process.pid}a`, pass: "p" })).uid).toBe(authA.uid);
    const r = await a.request("message", { uid: authB.uid, body: "over TLS" });
    expect(r.status).toBe(0);
    expect((await b.event("ev_message")).body).toBe("over TLS");
    // the plain listener still works beside it
    const plain = await Client.connect(server.port);
    expect((await plain.request("ping")).status).toBe(0);
    for (const c of [a, b, again, plain]) c.close();
    await server.stop();
  });
});
