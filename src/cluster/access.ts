// How a node authenticates to NATS and secures the connection: user and password, a
// token or a credentials file (JWT + NKey seed), and TLS (a CA to verify the servers,
// a client certificate for servers that verify clients). Checked once at start-up:
// a half-given pair is an error that says which half is missing.

import { credsAuthenticator, type ConnectionOptions } from "@nats-io/transport-node";
import { readFileSync } from "node:fs";

export interface NatsAccess {
  user: string;
  pass: string;
  token: string;
  creds: string;
  tlsCa: string;
  tlsCert: string;
  tlsKey: string;
}

/** The connection options for `access`; throws a plain error naming the flags when they do not fit together. */
export function natsConnectOptions(access: NatsAccess): Partial<ConnectionOptions> {
  const o: Partial<ConnectionOptions> = {};
  const ways = [access.user || access.pass ? "--nats-user/--nats-pass" : "", access.token ? "--nats-token" : "", access.creds ? "--nats-creds" : ""].filter(Boolean);
  if (ways.length > 1) throw new Error(`give one way to authenticate to NATS, not ${ways.join(" and ")}`);
  if (access.pass && !access.user) throw new Error("--nats-pass needs --nats-user");
  if (access.user) {
    o.user = access.user;
    o.pass = access.pass;
  }
  if (access.token) o.token = access.token;
  if (access.creds) {
    let creds: Uint8Array;
    try {
      creds = readFileSync(access.creds);
    } catch (err) {
      throw new Error(`cannot read --nats-creds ${access.creds}: ${(err as Error).message}`);
    }
    o.authenticator = credsAuthenticator(creds);
  }
  if (Boolean(access.tlsCert) !== Boolean(access.tlsKey)) throw new Error("--nats-tls-cert and --nats-tls-key go together");
  if (access.tlsCa || access.tlsCert) {
    o.tls = {};
    if (access.tlsCa) o.tls.caFile = access.tlsCa;
    if (access.tlsCert) {
      o.tls.certFile = access.tlsCert;
      o.tls.keyFile = access.tlsKey;
    }
  }
  return o;
}
