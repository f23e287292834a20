// Per-address limits by network: --ipv4-prefix and --ipv6-prefix (addresses.ts
// addressKey). A client with a block of addresses (an IPv6 /64, the usual
// subscriber's assignment) must not multiply --max-per-address or the failed-login
// throttle by changing its source address within it.
//
// Over TCP the test uses IPv4 loopback addresses (every 127.x.y.z is local on Linux);
// the IPv6 keys are checked as a property of addressKey, which both families share.

import { isIP } from "node:net";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { addressKey } from "../src/addresses.js";
import { Client, registerUser, serveForFile, uniqueName, WsClient } from "./helpers.js";

const word = fc.integer({ min: 0, max: 0xffff });
const words = fc.array(word, { minLength: 8, maxLength: 8 });

/** The eight words written out in full, each with its leading zeros or not, in either case. */
function fullForm(ws: number[], pad: boolean[], upper: boolean): string {
  const text = ws.map((w, i) => (pad[i] ? w.toString(16).padStart(4, "0") : w.toString(16))).join(":");
  return upper ? text.toUpperCase() : text;
}

/** The compressed form sockets report (RFC 5952), through the URL parser's canonicalisation. */
function compressed(ws: number[]): string {
  return new URL(`http://[${fullForm(ws, new Array(8).fill(false), false)}]/`).hostname.slice(1, -1);
}

/** The first `bits` bits of two word lists agree. */
function samePrefix(a: number[], b: number[], bits: number): boolean {
  for (let i = 0; i < 8 && bits > 0; i++, bits -= 16) {
    const mask = bits >= 16 ? 0xffff : (0xffff << (16 - bits)) & 0xffff;
    if ((a[i] & mask) !== (b[i] & mask)) return false;
  }
  return true;
}

describe("addressKey", () => {
  it("an IPv6 address is keyed by its first --ipv6-prefix bits, however it is written (below 128)", () => {
    fc.assert(
      fc.property(words, fc.array(fc.boolean(), { minLength: 8, maxLength: 8 }), fc.boolean(), fc.integer({ min: 16, max: 128 }), (ws, pad, upper, bits) => {
        const prefixes = { ipv4Prefix: 32, ipv6Prefix: bits };
        const full = fullForm(ws, pad, upper);
        expect(isIP(full)).toBe(6);
        // At 128 the key is the address as the socket reports it (compressed).
        if (bits === 128) expect(addressKey(compressed(ws), prefixes)).toBe(compressed(ws));
        else expect(addressKey(full, prefixes)).toBe(addressKey(compressed(ws), prefixes));
      }),
    );
  });

  it("two IPv6 addresses share a key exactly when their first --ipv6-prefix bits agree", () => {
    fc.assert(
      fc.property(words, words, fc.integer({ min: 16, max: 128 }), fc.integer({ min: 0, max: 128 }), (a, other, bits, keep) => {
        // The second has the first's leading `keep` bits, then the other's.
        const b = a.map((w, i) => {
          const mine = Math.max(0, Math.min(16, keep - 16 * i));
          const mask = mine === 0 ? 0 : (0xffff << (16 - mine)) & 0xffff;
          return (w & mask) | (other[i] & ~mask & 0xffff);
        });
        const prefixes = { ipv4Prefix: 32, ipv6Prefix: bits };
        expect(addressKey(compressed(a), prefixes) === addressKey(compressed(b), prefixes)).toBe(samePrefix(a, b, bits));
      }),
    );
  });

  it("an IPv4 address is keyed by its first --ipv4-prefix bits, the same written as an IPv4-mapped IPv6 address", () => {
    const v4 = fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 4, maxLength: 4 });
    fc.assert(
      fc.property(v4, v4, fc.integer({ min: 8, max: 32 }), (a, b, bits) => {
        const prefixes = { ipv4Prefix: bits, ipv6Prefix: 64 };
        const ka = addressKey(a.join("."), prefixes);
        expect(addressKey(`::ffff:${a.join(".")}`, prefixes)).toBe(ka);
        const n = (q: number[]) => ((q[0] << 24) | (q[1] << 16) | (q[2] << 8) | q[3]) >>> (32 - bits);
        expect(ka === addressKey(b.join("."), prefixes)).toBe(n(a) === n(b));
        if (bits === 32) expect(ka).toBe(a.join("."));
      }),
    );
  });

  it("names the network it keys by; other text is kept as it is", () => {
    const prefixes = { ipv4Prefix: 24, ipv6Prefix: 64 };
    expect(addressKey("2001:DB8:0:7:aaaa:bbbb:cccc:dddd", prefixes)).toBe("2001:db8:0:7::/64");
    expect(addressKey("2001:db8::1.2.3.4", { ipv4Prefix: 32, ipv6Prefix: 112 })).toBe("2001:db8:0:0:0:0:102::/112");
    expect(addressKey("fe80::1%eth0", prefixes)).toBe("fe80:0:0:0::/64%eth0");
    expect(addressKey("fe80::2%eth1", prefixes)).toBe("fe80:0:0:0::/64%eth1");
    // NAT64 (64:ff9b::/96): the IPv4 client behind the translator, by --ipv4-prefix.
    expect(addressKey("64:ff9b::192.0.2.77", prefixes)).toBe("192.0.2.0/24");
    expect(addressKey("64:ff9b::c000:24d", { ipv4Prefix: 32, ipv6Prefix: 64 })).toBe("192.0.2.77");
    expect(addressKey("192.0.2.77", prefixes)).toBe("192.0.2.0/24");
    expect(addressKey("?", prefixes)).toBe("?");
  });
});

describe("per-address limits over TCP, by network", () => {
  const byNet = serveForFile({ maxPerAddress: 2, ipv4Prefix: 24 });
  const byAddress = serveForFile({ maxPerAddress: 2 });
  const byNetFails = serveForFile({ ipv4Prefix: 24, authFailAddr: 2, authFailLogin: 1_000_000 });
  const byNetWs = serveForFile({ httpPort: 0, maxPerAddress: 2, ipv4Prefix: 24 });
  const byNetHashes = serveForFile({ ipv4Prefix: 24, authRate: 1, authBurst: 2 });

  it("--ipv4-prefix 24: connections from three addresses of one /24 count as one address's; another /24 is let in", async () => {
    const a = await Client.connect(byNet.port, { from: "127.0.5.1" });
    const b = await Client.connect(byNet.port, { from: "127.0.5.2" });
    const c = await Client.connect(byNet.port, { from: "127.0.5.3", welcome: false });
    expect((await c.next()).data).toMatchObject({ status: 13, error: expect.stringMatching(/too many connections from your address/) });
    await c.closed;
    const d = await Client.connect(byNet.port, { from: "127.0.6.1" });
    // The same three addresses, each its own key by default (--ipv4-prefix 32).
    const own = await Promise.all(["127.0.7.1", "127.0.7.2", "127.0.7.3"].map((from) => Client.connect(byAddress.port, { from })));
    for (const x of [a, b, d, ...own]) x.close();
  });

  it("--ipv4-prefix 24: failed logins from addresses of one /24 add up against --auth-fail-addr", async () => {
    const shared = byNetFails.port;
    const user = await registerUser(shared);
    user.client.close();
    for (const from of ["127.0.8.1", "127.0.8.2"]) {
      const c = await Client.connect(shared, { from });
      expect((await c.request("auth", { login: user.login, pass: "wrong" })).status).toBe(2);
      c.close();
    }
    const third = await Client.connect(shared, { from: "127.0.8.3" });
    expect(await third.request("auth", { login: user.login, pass: "secret" })).toMatchObject({ status: 13, error: expect.stringMatching(/^too many failed logins/) });
    const elsewhere = await Client.connect(shared, { from: "127.0.9.1" });
    expect((await elsewhere.request("auth", { login: user.login, pass: "secret" })).status).toBe(0);
    for (const x of [third, elsewhere]) x.close();
  });

  it("--ipv4-prefix 24: WebSockets from addresses of one /24 count as one address's against --max-per-address", async () => {
    const port = byNetWs.server.httpPort as number;
    const ws = (from: string) => WsClient.connect(port, "/wirechat", { localAddress: from });
    const a = await ws("127.0.10.1");
    const b = await ws("127.0.10.2");
    const refused = await ws("127.0.10.3");
    expect((await refused.next()).data).toMatchObject({ status: 13, error: expect.stringMatching(/too many connections from your address/) });
    expect((await refused.closed).code).toBe(1013);
    const other = await ws("127.0.11.1");
    expect((await other.next()).action).toBe("welcome");
    for (const x of [a, b, other]) x.close();
  });

  it("--ipv4-prefix 24: password checks from addresses of one /24 share one --auth-burst", async () => {
    const register = async (from: string) => {
      const c = await Client.connect(byNetHashes.port, { from });
      const r = await c.request("register", { login: uniqueName("net"), pass: "secret", nick: uniqueName("net") });
      c.close();
      return r;
    };
    expect((await register("127.0.12.1")).status).toBe(0);
    expect((await register("127.0.12.2")).status).toBe(0);
    expect(await register("127.0.12.3")).toMatchObject({ status: 13, error: expect.stringMatching(/too many logins and registrations from your address/) });
    expect((await register("127.0.13.1")).status).toBe(0);
  });
});
