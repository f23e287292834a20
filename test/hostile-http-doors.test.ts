// Hostile and broken clients of the HTTP port's doors, over real HTTP (fetch) and real
// WebSockets (ws): each test is a defect that was found, in the input that showed it.

import { describe, expect, it } from "vitest";
import { serveForFile, uniqueName } from "./helpers.js";

const srv = serveForFile({ httpPort: 0 });

function base(): string {
  return `http://127.0.0.1:${srv.server.httpPort}`;
}

async function call(method: string, path: string, opts: { body?: unknown; headers?: Record<string, string> } = {}) {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.body !== undefined && headers["content-type"] === undefined) headers["content-type"] = "application/json";
  const body = opts.body === undefined ? undefined : typeof opts.body === "string" ? opts.body : JSON.stringify(opts.body);
  const res = await fetch(base() + path, { method, headers, body });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : undefined };
}

/** A new e_chat_server account: its login and session. */
async function echatUser(): Promise<{ login: string; sid: string }> {
  const login = uniqueName("h");
  const r = await call("POST", "/v1/register", { body: { login, password: "pw" } });
  expect(r.status).toBe(200);
  return { login, sid: r.body.session_id };
}

describe("e_chat_server door: the session a request presents", () => {
  it("a session_id cookie that is not valid percent-encoding is no session (401), not a server error", async () => {
    for (const value of ["%", "%E0%A4%A", "%zz"]) {
      expect(await call("GET", "/v1/info", { headers: { cookie: `session_id=${value}` } })).toEqual({ status: 401, body: { error: { code: "unauthorized" } } });
      expect(await call("POST", "/v1/logout", { body: {}, headers: { cookie: `session_id=${value}` } })).toEqual({ status: 401, body: { error: { code: "unauthorized" } } });
    }
    const a = await echatUser();
    expect((await call("GET", "/v1/info", { headers: { cookie: `session_id=${encodeURIComponent(a.sid)}` } })).body).toMatchObject({ login: a.login });
  });
});
