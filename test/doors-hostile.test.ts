// The seed doors (000 rust_messages, 001 rooms API) against clients that are hostile
// or broken: what the review of src/doors found, each over real TCP.

import { describe, expect, it } from "vitest";
import { Client, serveForFile, uniqueName, type Frame } from "./helpers.js";

const srv = serveForFile({ rustPort: 0, roomsPort: 0 });

function send(c: Client, req: Record<string, unknown>): void {
  c.write(JSON.stringify(req) + "\n");
}

/** Sends a 001 request and returns the next frame of `type` (default: the request's). */
async function ask(c: Client, req: Record<string, unknown>, type = String(req.type)): Promise<Frame> {
  send(c, req);
  return c.next((f) => f.type === type);
}

async function roomsUser(login = uniqueName("h"), pass = "pw"): Promise<{ c: Client; login: string; pass: string; uid: string }> {
  const c = await Client.connect(srv.server.roomsPort as number, { welcome: false });
  expect((await ask(c, { type: "REQUEST_SIGNUP", login, pass }, "RESPONSE_SIGNUP")).status).toBe("SINGUP_OK");
  // The uid, for native requests that name the user.
  const n = await Client.connect(srv.port);
  const uid = (await n.request("auth", { login, pass })).uid as string;
  n.close();
  return { c, login, pass, uid };
}

describe("rooms door: CREATE_ROOM's room is the two users' own", () => {
  it("a private channel of the two whose owner is someone else is not taken for their room (its owner could read it)", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    // c makes a private channel with a and b as members, then leaves it: a and b are its
    // only members, but c owns it and may enter it again at any time.
    const c = await Client.connect(srv.port);
    const cl = uniqueName("h");
    expect((await c.request("register", { login: cl, pass: "pw", nick: cl })).status).toBe(0);
    const trap = (await c.request("createchannel", { name: "trap", private: true, members: [a.uid, b.uid] })).chid as string;
    expect((await c.request("leave", { channel: trap })).status).toBe(0);

    const room = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    expect(room).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: b.login });
    expect(String(room.id)).not.toBe(trap);
    const sent = await ask(a.c, { type: "SND_MSG", username: a.login, room_id: room.id, message: "just between us", msg_type: "TEXT" });
    expect(sent.status).toBe("OK");
    // c cannot enter a and b's room, nor read what they said.
    expect((await c.request("enter", { channel: String(room.id) })).status).toBe(10);
    expect((await c.request("history", { channel: String(room.id) })).status).toBe(10);
    // b asking for a room with a gets the same one.
    expect((await ask(b.c, { type: "CREATE_ROOM", username: b.login, customer: a.login })).id).toBe(room.id);
    for (const x of [a.c, b.c, c]) x.close();
  });

  it("CREATE_ROOM with oneself is a room of one, never a room shared with someone else", async () => {
    const a = await roomsUser();
    const b = await roomsUser();
    const ab = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: b.login });
    const self = await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: a.login });
    expect(self).toEqual({ type: "CREATE_ROOM", id: expect.any(Number), customer: a.login });
    expect(self.id).not.toBe(ab.id);
    expect((await ask(a.c, { type: "CREATE_ROOM", username: a.login, customer: a.login })).id).toBe(self.id);
    // A note to oneself does not reach b.
    expect((await ask(a.c, { type: "SND_MSG", username: a.login, room_id: self.id, message: "note to self", msg_type: "TEXT" })).status).toBe("OK");
    expect(await b.c.quiet(300, (f) => f.type === "READ_MSG")).toBe(true);
    a.c.close();
    b.c.close();
  });
});
