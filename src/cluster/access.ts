// How a node authenticates to NATS and secures the connection: user and password, a
// token or a credentials file (JWT + NKey seed), and TLS (a CA to verify the servers,
// a client certificate for servers that verify clients). Checked once at start-up:
// a half-given pair is an error that says which half is missing.

import { credsAuthenticator, type ConnectionOptions } from "@nats-io/transport-node";
import { readFileSync } from "node:fs";
import type { Config } from "../config.js";

/** The --nats-* flags this reads (the options table's, config.ts). */
export type NatsAccess = Pick<Config, "natsUser" | "natsPass" | "natsToken" | "natsCreds" | "natsTlsCa" | "natsTlsCert" | "natsTlsKey">;

/** The connection options for `access`; throws a plain error naming the flags when they do not fit together. */
export function natsConnectOptions(access: NatsAccess): Partial<ConnectionOptions> {
  const o: Partial<ConnectionOptions> = {};
  const ways = [access.natsUser || access.natsPass ? "--nats-user/--nats-pass" : "", access.natsToken ? "--nats-token" : "", access.natsCreds ? "--nats-creds" : ""].filter(Boolean);
  if (ways.length > 1) throw new Error(`give one way to authenticate to NATS, not ${ways.join(" and ")}`);
  if (access.natsPass && !access.natsUser) throw new Error("--nats-pass needs --nats-user");
  if (access.natsUser) {
    o.user = access.natsUser;
    o.pass = access.natsPass;
  }
  if (access.natsToken) o.token = access.natsToken;
  if (access.natsCreds) {
    let creds: Uint8Array;
    try {
      creds = readFileSync(access.natsCreds);
    } catch (err) {
      throw new Error(`cannot read --nats-creds ${access.natsCreds}: ${(err as Error).message}`);
    }
    // Read again at each connect (a rotated file, a user JWT renewed before it expires),
    // at most once a second (the client asks twice a connect: the JWT, then the seed,
    // which must come from one copy). A copy that cannot be read, or does not hold both
    // (a rotation caught half written), leaves the last good one: the client ends its
    // connection for good on credentials it cannot parse.
    const file = access.natsCreds;
    let readAt = Date.now();
    o.authenticator = credsAuthenticator(() => {
      if (Date.now() - readAt < 1000) return creds;
      readAt = Date.now();
      try {
        const next = readFileSync(file);
        if (wholeCreds(next)) creds = next;
      } catch {
        // kept: the last good copy
      }
      return creds;
    });
  }
  if (Boolean(access.natsTlsCert) !== Boolean(access.natsTlsKey)) throw new Error("--nats-tls-cert and --nats-tls-key go together");
  if (access.natsTlsCa || access.natsTlsCert) {
    o.tls = {};
    if (access.natsTlsCa) o.tls.caFile = access.natsTlsCa;
    if (access.natsTlsCert) {
      o.tls.certFile = access.natsTlsCert;
      o.tls.keyFile = access.natsTlsKey;
    }
  }
  return o;
}

/** Whether `bytes` hold a credentials file's two blocks (its JWT and its seed), as the client parses them. */
function wholeCreds(bytes: Uint8Array): boolean {
  const blocks = /\s*(?:(?:[-]{3,}[^\n]*[-]{3,}\n)(.+)(?:\n\s*[-]{3,}[^\n]*[-]{3,}\n))/gi;
  const text = Buffer.from(bytes).toString("utf8");
  return blocks.exec(text) !== null && blocks.exec(text) !== null;
}
