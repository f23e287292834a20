// IP addresses as the server keys them (bans, per-address caps, trusted addresses).

import { isIP } from "node:net";
import { Code, ProtocolError } from "./protocol/codes.js";

/** An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d: one address, one key. */
export function plainAddress(address: string): string {
  const a = address.toLowerCase();
  return a.startsWith("::ffff:") ? a.slice(7) : a;
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
