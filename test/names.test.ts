// Logins and nicks are one namespace: the seed TCP doors show a user by the nick, which
// their clients take for a login (they register with nick = login), so a native user
// whose nick was another user's login passed for that user there (a review: "author":
// "realbob" on the rust door, "sender":"realbob" on the rooms door, from login "evil").

import { describe, expect, it } from "vitest";
import { Client, registerUser, serveForFile, uniqueName } from "./helpers.js";

const srv = serveForFile();

async function register(login: string, nick: string): Promise<{ status: number; error: string }> {
  const c = await Client.connect(srv.port);
  try {
    return await c.request("register", { login, pass: "pw", nick });
  } finally {
    c.close();
  }
}

describe("logins and nicks share one namespace", () => {
  it("a nick may not be another user's login, nor a login another user's nick (case-insensitively)", async () => {
    const bob = await registerUser(srv.port, uniqueName("realbob"), "secret", uniqueName("Bobby"));
    expect(await register(uniqueName("evil"), bob.login.toUpperCase())).toEqual({ status: 1, error: "that nick is already taken" });
    expect(await register(bob.nick.toLowerCase(), uniqueName("Someone"))).toEqual({ status: 1, error: "that login is already taken" });
    // One's own login as one's nick is fine (the seed doors register that way).
    const same = uniqueName("same");
    expect((await register(same, same)).status).toBe(0);
    bob.client.close();
  });
});
