// Every setting: its flag, environment variable, default and help text, in one table.
// `--help` is printed from this table, and README/PROTOCOL.md quote it.

import { readFileSync } from "node:fs";
import { canonicalAddress } from "./addresses.js";

export interface Config {
  host: string;
  port: number;
  dataDir: string;
  logLevel: string;
  maxFrame: number;
  maxPartialInput: number;
  maxDepth: number;
  maxAttach: number;
  maxUploading: number;
  uploadMinRate: number;
  uploadRateWindow: number;
  maxPicture: number;
  maxImport: number;
  maxOwnedChannels: number;
  maxContacts: number;
  maxInbox: number;
  maxJoinedChannels: number;
  badFrameLimit: number;
  badFrameWindow: number;
  outboundCap: number;
  bcryptCost: number;
  sessionTtl: number;
  maxConnections: number;
  maxPerAddress: number;
  ipv4Prefix: number;
  ipv6Prefix: number;
  idleUnauth: number;
  idleAuth: number;
  closeLinger: number;
  tlsHandshakeTimeout: number;
  rate: number;
  burst: number;
  rateDisconnect: number;
  authFailLogin: number;
  authFailAddr: number;
  authFailWindow: number;
  authRate: number;
  authBurst: number;
  hashQueuePerAddress: number;
  hashThreadIdle: number;
  trustedAddresses: string;
  maxSessionsPerUser: number;
  maxConnectionsPerUser: number;
  shutdownTimeout: number;
  tlsPort: number;
  tlsCert: string;
  tlsKey: string;
  stats: number;
  backgroundNice: number;
  heapGrowth: number;
  idleGc: number;
  config: string;
  admin: string;
  adminHost: string;
  adminPort: number;
  adminToken: string;
  registration: string;
  rustPort: number;
  rustSecret: string;
  rustRoom: string;
  roomsPort: number;
  httpPort: number;
  httpHost: string;
  lobby: string;
  nats: string;
  nodeId: string;
  replicas: number;
  natsStream: string;
  natsUser: string;
  natsPass: string;
  natsToken: string;
  natsCreds: string;
  natsTlsCa: string;
  natsTlsCert: string;
  natsTlsKey: string;
}

type Kind = "int" | "string" | "enum";

export interface OptionSpec {
  key: keyof Config;
  flag: string;
  env: string;
  kind: Kind;
  default: string | number;
  help: string;
  min?: number;
  max?: number;
  /** The values an enum option takes. */
  choices?: readonly string[];
  /** A string option that must not be empty (an empty --data-dir meant the working directory). */
  nonEmpty?: boolean;
  /** A string option of printable ASCII only (a header value: Node reads headers as latin1). */
  ascii?: boolean;
  /** A comma-separated list of IP addresses: each must be one, and is kept as sockets spell it (canonicalAddress). */
  addresses?: boolean;
  /**
   * SIGHUP applies a new value from the config file to the running
   * server (every reader of it reads the shared Config when it acts); other options
   * need a restart.
   */
  reload?: boolean;
}

/** Seconds a Node timer can wait (2^31 - 1 ms): a longer one fires at once. */
const TIMER_MAX_S = 2_147_483;

export const OPTIONS: readonly OptionSpec[] = [
  { key: "host", flag: "--host", env: "WIRECHAT_HOST", kind: "string", nonEmpty: true, default: "0.0.0.0", help: "address to listen on" },
  { key: "port", flag: "--port", env: "WIRECHAT_PORT", kind: "int", default: 7788, min: 0, max: 65535, help: "TCP port (0 = any free port)" },
  { key: "dataDir", flag: "--data-dir", env: "WIRECHAT_DATA_DIR", kind: "string", nonEmpty: true, default: "./data", help: "directory of the LevelDB database" },
  { key: "logLevel", flag: "--log-level", env: "WIRECHAT_LOG_LEVEL", kind: "enum", choices: ["fatal", "error", "warn", "info", "debug", "trace", "silent"], default: "info", help: "pino level: fatal, error, warn, info, debug, trace or silent", reload: true },
  { key: "maxFrame", flag: "--max-frame", env: "WIRECHAT_MAX_FRAME", kind: "int", default: 1024 * 1024, min: 64, help: "largest request frame in bytes (status 12 past it)" },
  { key: "maxPartialInput", flag: "--max-partial-input", env: "WIRECHAT_MAX_PARTIAL_INPUT", kind: "int", default: 256 * 1024 * 1024, min: 0, help: "bytes of memory the server holds for unfinished requests, TCP connections' frames, WebSockets' messages and HTTP request bodies all together (past it the largest are dropped: a TCP frame is skipped and answered with status 13, an HTTP request answered 429 (13), a WebSocket sent 13 and closed with 1013; attachments stream to disk and do not count)", reload: true },
  { key: "maxDepth", flag: "--max-depth", env: "WIRECHAT_MAX_DEPTH", kind: "int", default: 32, min: 2, help: "deepest JSON nesting in a frame (status 3 past it)" },
  { key: "maxAttach", flag: "--max-attach", env: "WIRECHAT_MAX_ATTACH", kind: "int", default: 64 * 1024 * 1024, min: 0, help: "largest attachment in decoded bytes (status 12 past it)" },
  { key: "maxUploading", flag: "--max-uploading", env: "WIRECHAT_MAX_UPLOADING", kind: "int", default: 1024 * 1024 * 1024, min: 0, help: "decoded bytes of attachments being received at once, all connections together (their temp files); past it, uploads still arriving that have averaged under 16 x --upload-min-rate bytes a second as sent give their room up (status 13 when their frame ends; none with --upload-min-rate 0), else the new one gets status 13" },
  { key: "uploadMinRate", flag: "--upload-min-rate", env: "WIRECHAT_UPLOAD_MIN_RATE", kind: "int", default: 1024, min: 0, help: "bytes per second a connection must send, over each --upload-rate-window, while an attachment of its is arriving; slower, the upload is given up and the connection closed (it held its share of --max-uploading); 0: no minimum", reload: true },
  { key: "uploadRateWindow", flag: "--upload-rate-window", env: "WIRECHAT_UPLOAD_RATE_WINDOW", kind: "int", default: 60, min: 1, max: TIMER_MAX_S, help: "seconds over which --upload-min-rate is measured" },
  { key: "maxPicture", flag: "--max-picture", env: "WIRECHAT_MAX_PICTURE", kind: "int", default: 256 * 1024, min: 0, help: "largest profile picture, in characters of base64 (status 12 past it)" },
  { key: "maxImport", flag: "--max-import", env: "WIRECHAT_MAX_IMPORT", kind: "int", default: 5000, min: 1, help: "most address-book entries in one import (status 12 past it)" },
  { key: "maxContacts", flag: "--max-contacts", env: "WIRECHAT_MAX_CONTACTS", kind: "int", default: 5000, min: 1, help: "most users one contact list may hold (addcontact past it: status 13)", reload: true },
  { key: "maxInbox", flag: "--max-inbox", env: "WIRECHAT_MAX_INBOX", kind: "int", default: 10000, min: 0, help: "most direct messages that may come for a user while they are connected nowhere, counted from when they left (or from the start-up; in cluster mode by each node for what it takes); past it a message to them gets status 13 until they connect; 0: no bound", reload: true },
  { key: "maxOwnedChannels", flag: "--max-owned-channels", env: "WIRECHAT_MAX_OWNED_CHANNELS", kind: "int", default: 100, min: 1, help: "most channels one user may own (createchannel past it: status 13)", reload: true },
  { key: "maxJoinedChannels", flag: "--max-joined-channels", env: "WIRECHAT_MAX_JOINED_CHANNELS", kind: "int", default: 1000, min: 1, help: "most channels one user may be a member of (createchannel, enter past it: status 13); others may add a user to nine tenths of them", reload: true },
  { key: "badFrameLimit", flag: "--bad-frame-limit", env: "WIRECHAT_BAD_FRAME_LIMIT", kind: "int", default: 100, min: 1, help: "bad frames a connection may send within the window before it is closed" },
  { key: "badFrameWindow", flag: "--bad-frame-window", env: "WIRECHAT_BAD_FRAME_WINDOW", kind: "int", default: 60, min: 1, max: TIMER_MAX_S, help: "that window, in seconds" },
  { key: "outboundCap", flag: "--outbound-cap", env: "WIRECHAT_OUTBOUND_CAP", kind: "int", default: 8 * 1024 * 1024, min: 65536, help: "output waiting to be sent to one connection before it is closed as a slow reader, counted in characters of frame text (a byte each for ASCII; up to 3 bytes of UTF-8 each for others; on WebSocket, what the socket holds counts in bytes); a native history page stops at about this much text, so that events waiting behind it stay under it" },
  { key: "bcryptCost", flag: "--bcrypt-cost", env: "WIRECHAT_BCRYPT_COST", kind: "int", default: 10, min: 4, max: 31, help: "bcrypt cost factor for stored password hashes (each step doubles the time a password check takes: 20 is a thousand times 10; bcrypt's largest is 31)" },
  { key: "sessionTtl", flag: "--session-ttl", env: "WIRECHAT_SESSION_TTL", kind: "int", default: 30 * 24 * 3600, min: 1, help: "seconds a session id stays valid" },
  { key: "stats", flag: "--stats", env: "WIRECHAT_STATS", kind: "int", default: 0, min: 0, help: "1 enables the 'stats' action (event-loop delay, memory) for benchmarks and monitoring" },
  { key: "maxConnections", flag: "--max-connections", env: "WIRECHAT_MAX_CONNECTIONS", kind: "int", default: 10000, min: 1, help: "most simultaneous connections (a new one past it gets status 16 and is closed)", reload: true },
  { key: "maxPerAddress", flag: "--max-per-address", env: "WIRECHAT_MAX_PER_ADDRESS", kind: "int", default: 256, min: 1, help: "most simultaneous unauthenticated connections (and TLS handshakes) from one IP address (status 13 past it); logged-in ones do not count", reload: true },
  { key: "ipv4Prefix", flag: "--ipv4-prefix", env: "WIRECHAT_IPV4_PREFIX", kind: "int", default: 32, min: 8, max: 32, help: "leading bits of an IPv4 client's address that its per-address limits go by (--max-per-address, --auth-fail-addr, --auth-rate, --hash-queue-per-address): 32, the address; 24, its /24; bans and --trusted-addresses match whole addresses" },
  { key: "ipv6Prefix", flag: "--ipv6-prefix", env: "WIRECHAT_IPV6_PREFIX", kind: "int", default: 64, min: 16, max: 128, help: "the same for an IPv6 client: 64, its /64 (one subscriber's network: a client with a /64 cannot multiply its limits by changing address); 128, the address" },
  { key: "idleUnauth", flag: "--idle-unauth", env: "WIRECHAT_IDLE_UNAUTH", kind: "int", default: 60, min: 1, max: TIMER_MAX_S, help: "seconds an unauthenticated connection may stay silent before it is closed", reload: true },
  { key: "idleAuth", flag: "--idle-auth", env: "WIRECHAT_IDLE_AUTH", kind: "int", default: 600, min: 1, max: TIMER_MAX_S, help: "seconds an authenticated connection may stay silent (ping counts) before it is closed; a WebSocket quiet for half of it is pinged, and its pong counts", reload: true },
  { key: "closeLinger", flag: "--close-linger", env: "WIRECHAT_CLOSE_LINGER", kind: "int", default: 2, min: 1, max: TIMER_MAX_S, help: "seconds a connection the server closes (quit, limits, refusals) may take its last frames, while what it still sends is discarded, before it is cut off" },
  { key: "tlsHandshakeTimeout", flag: "--tls-handshake-timeout", env: "WIRECHAT_TLS_HANDSHAKE_TIMEOUT", kind: "int", default: 10, min: 1, max: TIMER_MAX_S, help: "seconds a TLS handshake may take; it counts against the connection caps meanwhile" },
  { key: "rate", flag: "--rate", env: "WIRECHAT_RATE", kind: "int", default: 5000, min: 1, help: "requests per second one connection may sustain (status 13 past it)" },
  { key: "burst", flag: "--burst", env: "WIRECHAT_BURST", kind: "int", default: 10000, min: 1, help: "requests one connection may send at once above the rate" },
  { key: "rateDisconnect", flag: "--rate-disconnect", env: "WIRECHAT_RATE_DISCONNECT", kind: "int", default: 10000, min: 1, help: "requests refused for rate within the bad-frame window before the connection is closed" },
  { key: "authFailLogin", flag: "--auth-fail-login", env: "WIRECHAT_AUTH_FAIL_LOGIN", kind: "int", default: 5, min: 1, help: "failed logins for one login from one address within the window before auth is refused with 13 (back-off doubles after each further failure)" },
  { key: "authFailAddr", flag: "--auth-fail-addr", env: "WIRECHAT_AUTH_FAIL_ADDR", kind: "int", default: 50, min: 1, help: "failed logins from one IP address within the window before auth is refused with 13" },
  { key: "authFailWindow", flag: "--auth-fail-window", env: "WIRECHAT_AUTH_FAIL_WINDOW", kind: "int", default: 60, min: 1, max: TIMER_MAX_S, help: "that window, in seconds; also the longest back-off" },
  { key: "authRate", flag: "--auth-rate", env: "WIRECHAT_AUTH_RATE", kind: "int", default: 20, min: 1, help: "password checks (register, auth with a password, changepassword, deleteaccount) per second one IP address may sustain (status 13 past it)" },
  { key: "authBurst", flag: "--auth-burst", env: "WIRECHAT_AUTH_BURST", kind: "int", default: 300, min: 1, help: "password checks one IP address may start at once above --auth-rate" },
  { key: "trustedAddresses", flag: "--trusted-addresses", env: "WIRECHAT_TRUSTED_ADDRESSES", kind: "string", addresses: true, default: "127.0.0.1,::1", help: "comma-separated IP addresses exempt from --auth-rate/--auth-burst (a proxy on the same host, local test and conformance scripts); empty for none" },
  { key: "hashQueuePerAddress", flag: "--hash-queue-per-address", env: "WIRECHAT_HASH_QUEUE_PER_ADDRESS", kind: "int", default: 256, min: 1, help: "password checks from one IP address waiting for the hasher (served round-robin between addresses; status 13 past it)" },
  { key: "hashThreadIdle", flag: "--hash-thread-idle", env: "WIRECHAT_HASH_THREAD_IDLE", kind: "int", default: 5, min: 0, max: TIMER_MAX_S, help: "seconds the password-hashing threads (~6 MiB each) wait for a check before they end; the next check starts them again (tens of milliseconds); 0 keeps them running" },
  { key: "maxSessionsPerUser", flag: "--max-sessions-per-user", env: "WIRECHAT_MAX_SESSIONS_PER_USER", kind: "int", default: 64, min: 1, help: "stored sessions per user; a new one past it revokes the oldest", reload: true },
  { key: "maxConnectionsPerUser", flag: "--max-connections-per-user", env: "WIRECHAT_MAX_CONNECTIONS_PER_USER", kind: "int", default: 100, min: 1, help: "simultaneous authenticated connections per user (auth past it gets status 13)", reload: true },
  { key: "shutdownTimeout", flag: "--shutdown-timeout", env: "WIRECHAT_SHUTDOWN_TIMEOUT", kind: "int", default: 10, min: 1, max: TIMER_MAX_S, help: "seconds SIGTERM/SIGINT waits for requests in progress before closing" },
  { key: "backgroundNice", flag: "--background-nice", env: "WIRECHAT_BACKGROUND_NICE", kind: "int", default: 10, min: 0, max: 19, help: "nice value (0-19) for the process's background threads (password hashing, LevelDB's compaction, GC helpers), so they take a smaller share of a shared core than the event loop and its I/O pool (commits, reads), which stay at 0; while LevelDB's compaction is behind the writes (8+ tables in its level 0) they run at 0 again, which needs CAP_SYS_NICE or RLIMIT_NICE 20; 0 leaves them alone (Linux only)" },
  { key: "heapGrowth", flag: "--heap-growth", env: "WIRECHAT_HEAP_GROWTH", kind: "int", default: 0, min: 0, max: 300, help: "percent the JavaScript heap may grow past what the last full garbage collection kept before it collects again (e.g. 20: memory stays near the live heap, at the price of more full collections, each a pause of a few milliseconds); 0 leaves it to V8, which allows up to 300" },
  { key: "idleGc", flag: "--idle-gc", env: "WIRECHAT_IDLE_GC", kind: "int", default: 32, min: 0, max: 1048576, help: "MiB the JavaScript heap must have grown since its last low for the server, once idle (its event loop under 5 % busy for half a second), to run one full garbage collection, so that a burst's garbage is returned to the OS rather than kept until the next busy spell; 0 leaves it to V8" },
  { key: "tlsPort", flag: "--tls-port", env: "WIRECHAT_TLS_PORT", kind: "int", default: 7789, min: 0, max: 65535, help: "TLS port, used when --tls-cert and --tls-key are given" },
  { key: "tlsCert", flag: "--tls-cert", env: "WIRECHAT_TLS_CERT", kind: "string", default: "", help: "PEM certificate file; with --tls-key it enables the TLS listener", reload: true },
  { key: "tlsKey", flag: "--tls-key", env: "WIRECHAT_TLS_KEY", kind: "string", default: "", help: "PEM private key file", reload: true },
  { key: "registration", flag: "--registration", env: "WIRECHAT_REGISTRATION", kind: "enum", choices: ["open", "closed"], default: "", reload: true, help: "open, or closed: register is refused with status 15 (accounts are then made by an operator: wirechat user add); wins over an operator's setting at start-up and when SIGHUP finds it changed; unset: the operator's last setting (admin port, wirechat registration; kept in the data dir), open when none" },
  { key: "admin", flag: "--admin", env: "WIRECHAT_ADMIN", kind: "enum", choices: ["on", "off"], default: "on", help: "the admin HTTP port: metrics, health, connections, operator actions" },
  { key: "adminHost", flag: "--admin-host", env: "WIRECHAT_ADMIN_HOST", kind: "string", nonEmpty: true, default: "127.0.0.1", help: "address the admin port listens on (keep it private: it can kick, ban and delete users)" },
  { key: "adminPort", flag: "--admin-port", env: "WIRECHAT_ADMIN_PORT", kind: "int", default: 9090, min: 0, max: 65535, help: "admin HTTP port (0 = any free port)" },
  { key: "adminToken", flag: "--admin-token", env: "WIRECHAT_ADMIN_TOKEN", kind: "string", ascii: true, default: "", help: "bearer token (printable ASCII, no spaces) every admin request but /healthz and /readyz must carry (Authorization: Bearer <token>); empty: none" },
  { key: "rustPort", flag: "--rust-port", env: "WIRECHAT_RUST_PORT", kind: "int", default: -1, min: -1, max: 65535, help: "TCP port of the rust_messages door (seed 000: {\"action\":…} lines, code 200/300/400); -1 = off, 0 = any free port" },
  { key: "rustSecret", flag: "--rust-secret", env: "WIRECHAT_RUST_SECRET", kind: "string", default: "", help: "the rust_messages handshake secret; when set, a connection must send {\"action\":\"handshake\",\"secret\":…} with it first; empty: any handshake passes and none is required" },
  { key: "rustRoom", flag: "--rust-room", env: "WIRECHAT_RUST_ROOM", kind: "string", nonEmpty: true, default: "general", help: "the public channel a rust_messages connection is in after login (created at start-up when missing, with no owner; an existing one a user made keeps its owner, and a warning says so)" },
  { key: "roomsPort", flag: "--rooms-port", env: "WIRECHAT_ROOMS_PORT", kind: "int", default: -1, min: -1, max: 65535, help: "TCP port of the rooms API door (seed 001: {\"type\":…} lines; rooms are private channels); -1 = off, 0 = any free port" },
  { key: "httpPort", flag: "--http-port", env: "WIRECHAT_HTTP_PORT", kind: "int", default: -1, min: -1, max: 65535, help: "HTTP/WebSocket port: e_chat_server under /v1/ (seed 002), the HTTP/WS chat at / and /ws (seed 003), the native protocol over WebSocket at /wirechat; -1 = off, 0 = any free port" },
  { key: "httpHost", flag: "--http-host", env: "WIRECHAT_HTTP_HOST", kind: "string", default: "", help: "address the HTTP/WebSocket port listens on; empty: the same as --host" },
  { key: "lobby", flag: "--lobby", env: "WIRECHAT_LOBBY", kind: "string", nonEmpty: true, default: "lobby", help: "the public channel every HTTP/WS chat (seed 003) client is in (created at start-up when missing, with no owner; an existing one a user made keeps its owner, and a warning says so)" },
  { key: "nats", flag: "--nats", env: "WIRECHAT_NATS", kind: "string", default: "", help: "cluster mode: the NATS server(s) with JetStream whose log this node shares with the others (nats://host:port, comma-separated); empty: a single node on its own LevelDB (see README, Cluster mode)" },
  { key: "nodeId", flag: "--node-id", env: "WIRECHAT_NODE_ID", kind: "string", default: "", help: "this node's name in logs and in the cluster log; empty: <host name>:<port>" },
  { key: "replicas", flag: "--replicas", env: "WIRECHAT_REPLICAS", kind: "int", default: 1, min: 1, max: 5, help: "copies JetStream keeps of the cluster log (1 for one nats-server, 3 for a three-server NATS cluster); a node refuses to start when the stream keeps another number" },
  { key: "natsStream", flag: "--nats-stream", env: "WIRECHAT_NATS_STREAM", kind: "string", nonEmpty: true, default: "WIRECHAT", help: "name of the JetStream stream holding the cluster log (one per wirechat cluster)" },
  { key: "natsUser", flag: "--nats-user", env: "WIRECHAT_NATS_USER", kind: "string", default: "", help: "cluster mode: the user name this node gives NATS (with --nats-pass)" },
  { key: "natsPass", flag: "--nats-pass", env: "WIRECHAT_NATS_PASS", kind: "string", default: "", help: "cluster mode: the password of --nats-user (prefer the environment variable to the flag)" },
  { key: "natsToken", flag: "--nats-token", env: "WIRECHAT_NATS_TOKEN", kind: "string", default: "", help: "cluster mode: a NATS authentication token (instead of a user and password)" },
  { key: "natsCreds", flag: "--nats-creds", env: "WIRECHAT_NATS_CREDS", kind: "string", default: "", help: "cluster mode: a NATS credentials file (.creds: a user JWT and its NKey seed), for a decentralised-auth NATS deployment" },
  { key: "natsTlsCa", flag: "--nats-tls-ca", env: "WIRECHAT_NATS_TLS_CA", kind: "string", default: "", help: "cluster mode: PEM file of the CA that signed the NATS servers' certificates (turns TLS on); empty with the others empty: no TLS" },
  { key: "natsTlsCert", flag: "--nats-tls-cert", env: "WIRECHAT_NATS_TLS_CERT", kind: "string", default: "", help: "cluster mode: this node's PEM client certificate, for NATS servers that verify clients (with --nats-tls-key)" },
  { key: "natsTlsKey", flag: "--nats-tls-key", env: "WIRECHAT_NATS_TLS_KEY", kind: "string", default: "", help: "cluster mode: the PEM private key of --nats-tls-cert" },
  { key: "config", flag: "--config", env: "WIRECHAT_CONFIG", kind: "string", default: "", help: "JSON file of settings, keyed by flag name without the dashes ({\"port\": 7788, \"data-dir\": \"/var/lib/wirechat\"}); flags and environment variables win over it" },
];

export class ConfigError extends Error {}

export function defaultConfig(): Config {
  const c: Record<string, string | number> = {};
  for (const o of OPTIONS) c[o.key] = o.default;
  return c as unknown as Config;
}

function convert(o: OptionSpec, raw: string, source: string): string | number {
  if (o.kind === "string") {
    if (o.nonEmpty && raw.trim() === "") throw new ConfigError(`${source}: must not be empty`);
    if (o.ascii && !/^[\x21-\x7e]*$/.test(raw)) throw new ConfigError(`${source}: only printable ASCII characters, no spaces`);
    if (o.addresses) {
      // Matched against the address a socket reports: "bogus" matched nothing, and
      // 0:0:0:0:0:0:0:1 never matched ::1.
      return raw
        .split(",")
        .map((a) => a.trim())
        .filter((a) => a !== "")
        .map((a) => {
          try {
            return canonicalAddress(a);
          } catch (err) {
            throw new ConfigError(`${source}: ${(err as Error).message}`);
          }
        })
        .join(",");
    }
    return raw;
  }
  if (o.kind === "enum") {
    // An option unset by default (--registration) may be set empty: unset again.
    if (raw === "" && o.default === "") return raw;
    if (!(o.choices as readonly string[]).includes(raw)) throw new ConfigError(`${source}: expected ${(o.choices as readonly string[]).join(" or ")}, got "${raw}"`);
    return raw;
  }
  // A negative number only where the option takes one (the doors' ports: -1 = off).
  if (!(o.min !== undefined && o.min < 0 ? /^-?\d+$/ : /^\d+$/).test(raw)) throw new ConfigError(`${source}: expected a whole number, got "${raw}"`);
  const v = Number(raw);
  if (o.min !== undefined && v < o.min) throw new ConfigError(`${source}: must be at least ${o.min}`);
  if (o.max !== undefined && v > o.max) throw new ConfigError(`${source}: must be at most ${o.max}`);
  return v;
}

export interface ParsedArgs {
  config: Config;
  help: boolean;
  version: boolean;
}

/** The option a config-file key names: the flag without its dashes. */
function byFileKey(key: string): OptionSpec | undefined {
  return OPTIONS.find((o) => o.flag === `--${key}`);
}

/**
 * The settings of a JSON config file, checked like flags: an unknown key, a value of
 * the wrong type or out of range is an error naming the file and the key.
 */
export function readConfigFile(file: string): Partial<Record<keyof Config, string | number>> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(`cannot read the config file ${file}: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${file}: not valid JSON (${(err as Error).message})`);
  }
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) throw new ConfigError(`${file}: expected a JSON object of settings`);
  const out: Partial<Record<keyof Config, string | number>> = {};
  for (const [key, value] of Object.entries(doc)) {
    const o = byFileKey(key);
    if (!o || o.key === "config") throw new ConfigError(`${file}: unknown setting "${key}" (the keys are the flags of --help without their dashes)`);
    const source = `${file}: "${key}"`;
    if (o.kind === "int" ? typeof value !== "number" && typeof value !== "string" : typeof value !== "string") {
      throw new ConfigError(`${source}: expected ${o.kind === "int" ? "a whole number" : "a string"}`);
    }
    out[o.key] = convert(o, String(value), source);
  }
  return out;
}

/**
 * Defaults, then the config file (--config or WIRECHAT_CONFIG), then environment
 * variables, then flags (`--flag value` or `--flag=value`): each wins over the ones
 * before it.
 */
export function parseArgs(argv: readonly string[], env: NodeJS.ProcessEnv): ParsedArgs {
  const c = defaultConfig() as unknown as Record<string, string | number>;
  const flags: [OptionSpec, string, string][] = [];
  let help = false;
  let version = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") {
      help = true;
      continue;
    }
    if (arg === "--version" || arg === "-v") {
      version = true;
      continue;
    }
    const eq = arg.indexOf("=");
    const flag = eq < 0 ? arg : arg.slice(0, eq);
    const o = OPTIONS.find((x) => x.flag === flag);
    if (!o) throw new ConfigError(`unknown option ${arg} (see --help)`);
    let raw: string | undefined;
    if (eq >= 0) raw = arg.slice(eq + 1);
    else raw = argv[++i];
    if (raw === undefined) throw new ConfigError(`${flag} needs a value`);
    flags.push([o, raw, flag]);
  }
  const file = flags.findLast(([o]) => o.key === "config")?.[1] ?? env.WIRECHAT_CONFIG;
  if (file) Object.assign(c, readConfigFile(file));
  for (const o of OPTIONS) {
    const raw = env[o.env];
    if (raw !== undefined && raw !== "") c[o.key] = convert(o, raw, o.env);
  }
  for (const [o, raw, flag] of flags) c[o.key] = convert(o, raw, flag);
  // One of the two started the server without TLS and without a word.
  if (Boolean(c.tlsCert) !== Boolean(c.tlsKey)) throw new ConfigError("--tls-cert and --tls-key go together: give both (TLS on --tls-port) or neither");
  return { config: c as unknown as Config, help, version };
}

/** wirechat's version, from its package.json. */
export function packageVersion(): string {
  // dist/src/config.js when built, src/config.ts when run from source (tests).
  for (const rel of ["../../package.json", "../package.json"]) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), "utf8")) as { name?: string; version?: string };
      if (pkg.name === "wirechat" && pkg.version) return pkg.version;
    } catch {
      // not there: the other layout
    }
  }
  return "unknown";
}

/** `--help`: the usage, the commands (`commands`: the operator's, from cli/commands.ts) and every option. */
export function helpText(commands: readonly string[]): string {
  const lines = [
    "Usage: wirechat [serve] [options]    run the server (npm start -- [options])",
    "       wirechat <command> ...        operate it or chat with it: wirechat help lists the commands",
    "",
    ...wrap(`Commands: serve (the default), ${commands.join(", ")}, chat.`, 82),
    "",
    "Messenger server speaking newline-delimited JSON over TCP. Every option can also",
    "be set by the environment variable shown, or in the --config file under the flag's",
    "name without its dashes; a flag wins over the variable, the variable over the file",
    "(an empty variable counts as unset: clear a file's value with an empty --flag=).",
    "Options marked (reload) take a new value from the config file on SIGHUP.",
    "",
  ];
  for (const o of OPTIONS) {
    const arg = o.kind === "int" ? "n" : o.kind === "enum" ? (o.choices as readonly string[]).join("|") : "s";
    const head = `${o.flag} <${arg}>`;
    // A long flag (an enum's choices) has its text on the next line.
    const long = head.length >= 26;
    if (long) lines.push(`  ${head}`);
    lines.push(`  ${(long ? "" : head).padEnd(26)}${o.help}${o.reload ? " (reload)" : ""}`);
    lines.push(`  ${"".padEnd(26)}env ${o.env}, default ${o.default === "" ? "(none)" : o.default}`);
  }
  lines.push(`  ${"-h, --help".padEnd(26)}this text`);
  lines.push(`  ${"-v, --version".padEnd(26)}the version`);
  return lines.join("\n");
}

/** `text` in lines of at most `width` characters, broken at spaces. */
function wrap(text: string, width: number): string[] {
  const out: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    if (line !== "" && line.length + 1 + word.length > width) {
      out.push(line);
      line = word;
    } else line = line === "" ? word : `${line} ${word}`;
  }
  if (line !== "") out.push(line);
  return out;
}
