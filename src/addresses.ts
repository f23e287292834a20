// IP addresses as the server keys them (bans, per-address caps, trusted addresses).

/** An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d: one address, one key. */
export function plainAddress(address: string): string {
  return (address.startsWith("::ffff:") ? address.slice(7) : address).toLowerCase();
}
