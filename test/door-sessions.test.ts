// A seed TCP door's login stores a session its client never sees (seeds 000 and 001
// have no session ids): it ends with the connection. Kept, a client reconnecting
// --max-sessions-per-user times ended the account's other sessions (a review: 64
// rooms-door logins revoked a phone's native sid).

import { describe, expect, it } from "vitest";
import { admin } from "./admin-helpers.js";
import { Client, registerUser, serveForFile } from "./helpers.js";

const srv = serveForFile({ rustPort: 0, roomsPort: 0, maxSessionsPerUser: 4 });

async function loginAndLeave(port: number, frame: Record<string, unknown>, done: (f: Record<string, unknown>) => boolean): Promise<void> {
  const c = await Client.connect(port, { welcome: false });
  c.write(JSON.stringify(frame) + "\n");
  await c.next(done);
  c.close();
  await c.closed;
}

describe("seed TCP doors end their logins' sessions on close", () => {
  it("logins and disconnects on the rust and rooms doors leave a native device's session alone", async () => {
    const a = await registerUser(srv.port, undefined, "pw");
    for (let i = 0; i < 4; i++) {
      await loginAndLeave(srv.server.rustPort as number, { action: "authentication", login: a.login, password: "pw" }, (f) => f.action === "authentication");
      await loginAndLeave(srv.server.roomsPort as number, { type: "REQUEST_LOGIN", login: a.login, pass: "pw" }, (f) => f.type === "RESPONSE_LOGIN");
    }
    const phone = await Client.connect(srv.port);
    expect((await phone.request("auth", { sid: a.sid })).status).toBe(0);
    phone.close();
    a.client.close();
  });

  it("logging in again and again on one rooms-door connection leaves a native device's session alone", async () => {
    const a = await registerUser(srv.port, undefined, "pw");
    const c = await Client.connect(srv.server.roomsPort as number, { welcome: false });
    // Each REQUEST_LOGIN again stores a new session; the one it replaces goes.
    for (let i = 0; i < 6; i++) {
      c.write(JSON.stringify({ type: "REQUEST_LOGIN", login: a.login, pass: "pw" }) + "\n");
      expect(await c.next((f) => f.type === "RESPONSE_LOGIN")).toMatchObject({ status: "LOGIN_OK" });
    }
    const phone = await Client.connect(srv.port);
    expect((await phone.request("auth", { sid: a.sid })).status).toBe(0);
    phone.close();
    c.close();
    a.client.close();
  });

  it("a login kicked by an operator still ends its session when its connection closes", async () => {
    const a = await registerUser(srv.port, undefined, "pw");
    for (let i = 0; i < 5; i++) {
      const door = i % 2 === 0 ? "rooms" : "rust";
      const c = await Client.connect((door === "rooms" ? srv.server.roomsPort : srv.server.rustPort) as number, { welcome: false });
      if (door === "rooms") {
        c.write(JSON.stringify({ type: "REQUEST_LOGIN", login: a.login, pass: "pw" }) + "\n");
        expect(await c.next((f) => f.type === "RESPONSE_LOGIN")).toMatchObject({ status: "LOGIN_OK" });
      } else {
        c.write(JSON.stringify({ action: "authentication", login: a.login, password: "pw" }) + "\n");
        expect(await c.next((f) => f.action === "authentication")).toMatchObject({ code: 200 });
      }
      // The kick logs the connection out before it closes (its session id was gone
      // by then, and the session it stored was left for --session-ttl).
      const r = await admin(srv.server.adminPort as number, "POST", "/kick", { user: a.login });
      expect(r.json.connections).toBeGreaterThanOrEqual(1);
      await c.closed;
    }
    // Five kicked door logins, a cap of four: a.sid would have been the oldest to go.
    const phone = await Client.connect(srv.port);
    expect((await phone.request("auth", { sid: a.sid })).status).toBe(0);
    phone.close();
  });
});
