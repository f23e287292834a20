// IP addresses as the server keys them (bans, per-address caps, trusted addresses).

import { isIP } from "node:net";
import { Code, ProtocolError } from "./protocol/codes.js";

/** An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d: one address, one key. */
export function plainAddress(address: string): string {
  const a = address.toLowerCase();
  return a.startsWith("::ffff:") ? a.slice(7) : a;
}

/** How much of a client's address its per-address limits go by (Config's ipv4Prefix, ipv6Prefix). */
export interface AddressPrefixes {
  readonly ipv4Prefix: number;
  readonly ipv6Prefix: number;
}

/**
 * The key a client's per-address limits count it under (--max-per-address, the
 * failed-login throttle, the password hasher's queue and rate): its address's first
 * --ipv4-prefix or --ipv6-prefix bits, as a network ("2001:db8:0:7::/64"), or the
 * address itself when the prefix is its whole length (IPv4's default). An IPv6
 * subscriber is usually given a /64 or more (RFC 6177): keyed by the whole address,
 * one client had as many keys as it has addresses, and each limit was that many times
 * wider for it. Bans and --trusted-addresses match whole addresses, as given.
 */
export function addressKey(address: string, prefixes: AddressPrefixes): string {
  const a = plainAddress(address);
  const family = isIP(a);
  if (family === 4) {
    const bits = prefixes.ipv4Prefix;
    if (bits >= 32) return a;
    const parts = a.split(".").map(Number);
    const word = ((parts[0] << 24) | (parts[1] << 16) | (parts[2] << 8) | parts[3]) & (bits === 0 ? 0 : -1 << (32 - bits));
    return `${word >>> 24}.${(word >>> 16) & 255}.${(word >>> 8) & 255}.${word & 255}/${bits}`;
  }
  if (family !== 6) return a;
  const words = ipv6Words(a);
  // NAT64's well-known prefix (64:ff9b::/96, RFC 6052): an IPv4 client behind a
  // translator, keyed as that IPv4 address (its /64 is every such client's).
  if (words[0] === 0x64 && words[1] === 0xff9b && words[2] === 0 && words[3] === 0 && words[4] === 0 && words[5] === 0) {
    return addressKey(`${words[6] >> 8}.${words[6] & 255}.${words[7] >> 8}.${words[7] & 255}`, prefixes);
  }
  const bits = prefixes.ipv6Prefix;
  if (bits >= 128) return a;
  const kept = Math.ceil(bits / 16);
  const out: string[] = [];
  for (let i = 0; i < kept; i++) {
    const left = bits - 16 * i;
    out.push((left >= 16 ? words[i] : words[i] & ((0xffff << (16 - left)) & 0xffff)).toString(16));
  }
  // A link-local address's zone names its link: fe80::/64 on each link is another network.
  const zone = a.indexOf("%");
  return `${out.join(":")}::/${bits}${zone >= 0 ? a.slice(zone) : ""}`;
}

/** The eight 16-bit words of an IPv6 address that isIP accepts (a zone, if any, dropped). */
function ipv6Words(address: string): number[] {
  let s = address;
  const zone = s.indexOf("%");
  if (zone >= 0) s = s.slice(0, zone);
  if (s.includes(".")) {
    // An IPv4 tail (::ffff:1.2.3.4, 64:ff9b::1.2.3.4): its two words.
    const c = s.lastIndexOf(":");
    const q = s.slice(c + 1).split(".").map(Number);
    s = `${s.slice(0, c + 1)}${((q[0] << 8) | q[1]).toString(16)}:${((q[2] << 8) | q[3]).toString(16)}`;
  }
  const gap = s.indexOf("::");
  let parts: string[];
  if (gap < 0) parts = s.split(":");
  else {
    const head = gap > 0 ? s.slice(0, gap).split(":") : [];
    const tail = gap + 2 < s.length ? s.slice(gap + 2).split(":") : [];
    parts = [...head, ...new Array<string>(8 - head.length - tail.length).fill("0"), ...tail];
  }
  return parts.map((w) => parseInt(w, 16));
}

/**
 * An IP address as given by an operator, in the form sockets report it (IPv6
 * compressed and lower-case); 3 when it is not an IP address (a port or a host name
 * would never match a connection).
 */
export function canonicalAddress(address: string): string {
  const plain = plainAddress(address.trim());
  const family = isIP(plain);
  if (family === 0) throw new ProtocolError(Code.InvalidData, `'${address}' is not an IP address`);
  // A zone (fe80::1%eth0) is not part of the address a socket reports.
  if (plain.includes("%")) throw new ProtocolError(Code.InvalidData, `'${address}' has a zone (%...): give the address alone`);
  return family === 6 ? new URL(`http://[${plain}]/`).hostname.slice(1, -1) : plain;
}
