// A seed TCP door's login stores a session its client never sees (seeds 000 and 001
// have no session ids): it ends with the connection. Kept, a client reconnecting
// --max-sessions-per-user times ended the account's other sessions (a review: 64
// rooms-door logins revoked a phone's native sid).

import { describe, expect, it } from "vitest";
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
});
