// `wirechat <command>`: the operator's commands. Each works on a stopped server's data
// dir directly (the core opened without listeners) or, when a server has it open (its
// LevelDB is locked), through that server's admin port, found from the same options,
// environment and config file the server reads. In cluster mode (--nats) always
// through a running node's admin port: its writes are entries of the cluster log.

import { existsSync, readFileSync, realpathSync } from "node:fs";
import http from "node:http";
import { constants as osConstants } from "node:os";
import path from "node:path";
import { createSecureContext } from "node:tls";
import { Level } from "level";
import pino from "pino";
import { backup, exportRecords, restore } from "../admin/backup.js";
import { ConfigError, packageVersion, parseArgs, type Config } from "../config.js";
import type { AdminOps } from "../features/admin.js";
import { ProtocolError } from "../protocol/codes.js";
import { openCore, type Core } from "../server.js";
import { CLUSTER_POSITION_KEY, LAYOUT_VERSION } from "../storage/layout.js";

export const COMMANDS = ["check", "user", "ban", "unban", "kick", "registration", "backup", "restore", "export", "version"] as const;

export const COMMAND_HELP = `Operator commands (each also takes the server's options: --data-dir, --config,
--admin-port, --admin-token, ...; on a running server they go through its admin port):

  wirechat check [--config file]            validate the settings without starting
  wirechat user add <login> [--nick n] [--pass p]   (no --pass: first line of stdin;
                                            --init on a data dir with no database yet)
  wirechat user del <login|uid>
  wirechat user passwd <login|uid> [--pass p]       revokes every session of the user
  wirechat user list [--after uid] [--limit n]     every user in uid order (--limit:
                                            the first n, at most 1000, after --after)
  wirechat user show <login|uid>
  wirechat ban <login> [--reason text]      revokes the user's sessions, refuses logins
  wirechat ban --address <ip> [--reason t]  refuses (and closes) connections from it
  wirechat unban <login> | --address <ip>
  wirechat kick <login|uid>                 closes the user's connections (running server)
  wirechat registration [open|closed]       kept in the data dir (a --registration
                                            setting wins at start-up); alone: prints it
  wirechat backup <dir>                     a consistent copy, also of a running server
  wirechat restore <dir>                    into --data-dir, which must hold no database
  wirechat export [--user <login|uid>]      NDJSON on stdout (no password hashes)
  wirechat version
  wirechat chat [options]                   the terminal client (wirechat chat --help)

A user named <login|uid> is matched by uid first; after "--" every word is a name
(a login starting with "-"). --help or --version after any command prints that and
runs nothing.`;

const OWN_FLAGS = new Set(["--pass", "--nick", "--reason", "--address", "--after", "--limit", "--user"]);
/** Flags of the commands that take no value. */
const OWN_SWITCHES = new Set(["--init"]);
/** Users a page of `user list` (the admin port's largest). */
const LIST_PAGE = 1000;

interface Parsed {
  positional: string[];
  own: Map<string, string>;
  config: Config;
  help: boolean;
  version: boolean;
}

function split(argv: readonly string[]): Parsed {
  const positional: string[] = [];
  const own = new Map<string, string>();
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    // After "--" everything is a name (a login may start with "-").
    if (a === "--") {
      positional.push(...argv.slice(i + 1));
      break;
    }
    const eq = a.indexOf("=");
    const flag = a.startsWith("--") && eq > 0 ? a.slice(0, eq) : a;
    if (OWN_SWITCHES.has(a)) {
      own.set(a.slice(2), "1");
    } else if (OWN_FLAGS.has(flag)) {
      const v = eq > 0 && flag !== a ? a.slice(eq + 1) : argv[++i];
      if (v === undefined) throw new ConfigError(`${flag} needs a value`);
      own.set(flag.slice(2), v);
    } else if (a.startsWith("-")) {
      rest.push(a);
      if (eq < 0 && a !== "--help" && a !== "-h" && a !== "--version" && a !== "-v") {
        if (argv[i + 1] !== undefined) rest.push(argv[++i]);
      }
    } else positional.push(a);
  }
  const { config, help, version } = parseArgs(rest, process.env);
  return { positional, own, config, help, version };
}

/** What a command needs done, on the data dir or through the admin port. */
interface Backend {
  ops: Pick<AdminOps, "list" | "addUser" | "passwd" | "deleteUser" | "kick" | "bans" | "unban"> & {
    show(user: string): Promise<unknown>;
    ban(kind: "login" | "addr", value: string, reason: string): Promise<unknown>;
    registration(open?: boolean): Promise<string>;
    backup(dir: string): Promise<unknown>;
    exportTo(user: string | undefined, out: NodeJS.WritableStream): Promise<void>;
  };
  close(): Promise<void>;
}

function isLocked(err: unknown): boolean {
  return err instanceof Error && /is locked/.test(err.message);
}

/**
 * Refuses a stopped data dir a command must not open as the server would: a cluster
 * node's view (a write there would be that node's alone, and its view, at the same log
 * position, would keep it for good: cluster commands go through a running node's admin
 * port, `--nats`), and a database of an older layout (opening it migrates it: a backup
 * taken before an upgrade would hold the new layout, and a command would upgrade a
 * server's data behind its operator; the server migrates it at start-up and logs it).
 * And a newer layout, which this version cannot read. Read before the open, through
 * LevelDB directly: nothing is written.
 */
async function refuseForeign(dataDir: string): Promise<void> {
  const db = new Level<string, string>(path.join(dataDir, "db"), { keyEncoding: "utf8", valueEncoding: "utf8" });
  try {
    await db.open();
  } catch (err) {
    // A running server has it (LevelDB's LOCK): the open that follows says so, and the
    // command goes through that server's admin port.
    if (/lock/i.test((err as { cause?: { message?: string } }).cause?.message ?? "")) return;
    throw err;
  }
  let layout: string | undefined;
  let cluster: string | undefined;
  try {
    [layout, cluster] = await db.getMany([`!meta!layout`, `!meta!${CLUSTER_POSITION_KEY}`]);
  } finally {
    await db.close();
  }
  const where = path.resolve(dataDir);
  if (cluster !== undefined) {
    throw new ConfigError(`${where} is a cluster node's view of the log: give --nats (with the cluster's options) to go through a running node's admin port`);
  }
  const version = layout === undefined ? 1 : Number(layout);
  if (version < LAYOUT_VERSION) {
    throw new ConfigError(
      `the database in ${where} has layout ${version}, older than this wirechat's ${LAYOUT_VERSION}: start the server on it once to migrate it (back it up first with the wirechat that wrote it)`,
    );
  }
  if (version > LAYOUT_VERSION) {
    throw new ConfigError(`the database in ${where} has layout ${version}, newer than this wirechat's ${LAYOUT_VERSION}: use the wirechat that wrote it, or a newer one`);
  }
}

async function direct(config: Config, init: boolean): Promise<Backend> {
  // A mistyped or forgotten --data-dir (--config) must not quietly act on a new, empty
  // database: one is made only when asked.
  if (!init && !existsSync(path.join(config.dataDir, "db", "CURRENT"))) {
    throw new ConfigError(`no wirechat database in ${path.resolve(config.dataDir)} (give --data-dir or --config; --init creates one)`);
  }
  if (existsSync(path.join(config.dataDir, "db", "CURRENT"))) await refuseForeign(config.dataDir);
  const log = pino({ level: "warn" }, pino.destination(2));
  const core: Core = await openCore({ ...config, logLevel: "warn" }, log);
  const a = core.admin;
  return {
    ops: {
      list: a.list,
      addUser: a.addUser,
      passwd: a.passwd,
      deleteUser: async (user) => {
        const out = await a.deleteUser(user);
        // The account's clean-up (its notes to itself, its channels' purges, their files)
        // runs in the background: stopped at once by the close, it was left for whatever
        // server next started there, and an export or a backup meanwhile still held it.
        if (!(await core.services.background.settle(CLEAN_UP_MS))) {
          process.stderr.write("wirechat: the account's clean-up is still running after 60 s: the next start on this data dir finishes it\n");
        }
        return out;
      },
      kick: async () => {
        throw new Error("no server is running on this data dir: nobody to kick");
      },
      bans: a.bans,
      unban: a.unban,
      show: async (user) => a.summary(await a.resolve(user)),
      // As the admin port answers it: {ban, closed} (no connection to close here).
      ban: async (kind, value, reason) => {
        const { closed: _, ...ban } = await a.ban(kind, value, reason);
        return { ban, closed: 0 };
      },
      registration: a.registration,
      backup: (dir) => backup(core.services.storage, core.services.blobs, dir, packageVersion()),
      exportTo: async (user, out) => {
        const uid = user === undefined ? undefined : (await a.resolve(user)).uid;
        for await (const line of exportRecords(core.services.storage, uid)) {
          if (!(await writeOut(out, line))) return;
        }
      },
    },
    close: () => core.close(),
  };
}

/** How long a command on a stopped data dir waits for the work it queued. */
const CLEAN_UP_MS = 60_000;

function viaAdmin(config: Config): Backend {
  const host = config.adminHost === "0.0.0.0" || config.adminHost === "::" ? "127.0.0.1" : config.adminHost;
  const base = `http://${host.includes(":") ? `[${host}]` : host}:${config.adminPort}`;
  const headers: Record<string, string> = config.adminToken ? { authorization: `Bearer ${config.adminToken}` } : {};
  // The admin port must be that of the server holding this data dir: another server's
  // (a second instance, a mistyped --admin-port) would take the command for its own
  // users. Checked once, before the first request; in cluster mode any node will do.
  let checked: Promise<void> | undefined;
  const ours = () =>
    (checked ??= (async () => {
      if (config.nats) return;
      const { dataDir } = (await send("GET", "/version")) as { dataDir?: string };
      const want = realpathSync(config.dataDir);
      if (dataDir !== want) {
        throw new ConfigError(`the admin port ${base} belongs to the server on ${dataDir ?? "another data dir"}, not to the one holding ${want}: give its --admin-port`);
      }
    })());
  async function call(method: string, route: string, body?: unknown): Promise<any> {
    await ours();
    return send(method, route, body);
  }
  /**
   * One request to the admin port, answered as a stream; a refused or failed connection
   * said in the operator's terms. node:http, not fetch: fetch gives up on an answer whose
   * headers take more than 300 s (undici's headersTimeout), and a backup answers when
   * its last attachment file is copied, so the command called a long backup failed
   * while the server went on and finished it.
   */
  function reach(method: string, route: string, body?: unknown): Promise<http.IncomingMessage> {
    return new Promise((resolve, reject) => {
      // The route as its path, not parsed as a URL: a URL's "." and ".." segments
      // (percent-encoded too) are resolved away, and `user show ..` (a legal login)
      // asked for /users, the list.
      const req = http.request(
        { host, port: config.adminPort, path: route, method, headers: body === undefined ? headers : { ...headers, "content-type": "application/json" } },
        resolve,
      );
      req.on("error", (err) => reject(new Error(`the data dir is in use and the admin port ${base} does not answer (${err.message})`)));
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  }
  /** An answer's JSON ({} when it is not JSON), or its error as the server said it. */
  async function answer(res: http.IncomingMessage): Promise<any> {
    let text = "";
    res.setEncoding("utf8");
    for await (const chunk of res) text += chunk as string;
    let json: { error?: string; code?: number } = {};
    try {
      json = JSON.parse(text) as typeof json;
    } catch {
      // not JSON: said by its status below
    }
    const status = res.statusCode ?? 500;
    if (status < 200 || status > 299) throw new ProtocolError(json.code ?? 16, json.error ?? `HTTP ${status}`);
    return json;
  }
  async function send(method: string, route: string, body?: unknown): Promise<any> {
    return answer(await reach(method, route, body));
  }
  return {
    ops: {
      list: async (after, limit) => (await call("GET", `/users?after=${encodeURIComponent(after)}&limit=${limit}`)).users,
      addUser: (login, pass, nick) => call("POST", "/users", { login, pass, nick }),
      passwd: (user, pass) => call("POST", "/users/passwd", { user, pass }),
      deleteUser: (user) => call("POST", "/users/delete", { user }),
      kick: (user) => call("POST", "/kick", { user }),
      bans: () => {
        throw new Error("unused");
      },
      unban: async (kind, value) => (await call("POST", "/unban", kind === "login" ? { login: value } : { address: value })).lifted,
      show: (user) => call("GET", `/users/${encodeURIComponent(user)}`),
      ban: (kind, value, reason) => call("POST", "/ban", kind === "login" ? { login: value, reason } : { address: value, reason }),
      registration: async (open) => (await (open === undefined ? call("GET", "/registration") : call("POST", "/registration", { open }))).registration,
      // The server writes the backup: the directory is on its machine, so make it absolute here.
      backup: (dir) => call("POST", "/backup", { dir: path.resolve(dir) }),
      exportTo: async (user, out) => {
        await ours();
        const res = await reach("GET", "/export" + (user !== undefined ? `?user=${encodeURIComponent(user)}` : ""));
        if (res.statusCode !== 200) await answer(res); // throws the server's error
        for await (const chunk of res) {
          if (!(await writeOut(out, chunk as Buffer))) {
            res.destroy();
            return;
          }
        }
      },
    },
    close: async () => {},
  };
}

async function backend(config: Config, init: boolean): Promise<Backend> {
  // A cluster node's data dir is a view of the cluster log: a write there would be
  // this node's alone (and undone when the view is rebuilt). Its writes go through a
  // running node's admin port, into the log.
  if (config.nats) {
    if (config.admin !== "on") throw new ConfigError("with --nats the operator's commands go through a running node's admin port (--admin on)");
    return viaAdmin(config);
  }
  try {
    return await direct(config, init);
  } catch (err) {
    if (isLocked(err) && config.admin === "on") return viaAdmin(config);
    throw err;
  }
}

function readPassword(p: Parsed): string {
  const given = p.own.get("pass");
  if (given !== undefined) return given;
  if (process.stdin.isTTY) throw new ConfigError("give the password with --pass or on stdin");
  const line = readFileSync(0, "utf8").split(/\r?\n/)[0];
  if (!line) throw new ConfigError("no password on stdin");
  return line;
}

/**
 * The most words (a sub-command, names) `command` takes. A word more is a mistake, so
 * it is refused before anything is done: `user del mallory bob` deleted mallory and
 * said nothing of bob, and `ban mallory --address <ip>` banned the address alone.
 */
function wordsOf(command: string, p: Parsed): number {
  switch (command) {
    case "user":
      return p.positional[0] === "list" ? 1 : 2;
    case "ban":
    case "unban":
      if (p.own.has("address") && p.positional.length > 0) throw new ConfigError(`give either a login or --address, not both`);
      return p.own.has("address") ? 0 : 1;
    case "kick":
    case "registration":
    case "backup":
    case "restore":
      return 1;
    default:
      return 0;
  }
}

function need(p: Parsed, i: number, what: string): string {
  const v = p.positional[i];
  if (v === undefined) throw new ConfigError(`missing ${what} (see wirechat help)`);
  return v;
}

/** Each output's first failure (null: none yet), heard from its first write on. */
const outFailures = new WeakMap<NodeJS.WritableStream, Error | null>();

/** Whether `out` may still be written: false once its reader has gone (EPIPE); another failure is thrown. */
function outUsable(out: NodeJS.WritableStream): boolean {
  const failed = outFailures.get(out);
  if (!failed) return true;
  if ((failed as NodeJS.ErrnoException).code !== "EPIPE") throw failed;
  return false;
}

/**
 * Writes `chunk` to `out`, waiting for its drain; false once its reader has gone away
 * (`wirechat export | head`: EPIPE), after which the command writes nothing more and
 * ends quietly. It failed with an unhandled 'error' event and a stack trace before.
 * Another failure (a full disk behind `> file`) is thrown.
 */
async function writeOut(out: NodeJS.WritableStream, chunk: string | Buffer): Promise<boolean> {
  if (!outFailures.has(out)) {
    outFailures.set(out, null);
    out.on("error", (err: Error) => {
      if (!outFailures.get(out)) outFailures.set(out, err);
    });
  }
  if (!outUsable(out)) return false;
  if (!out.write(chunk)) {
    await new Promise<void>((resolve) => {
      const done = () => {
        out.off("drain", done).off("error", done).off("close", done);
        resolve();
      };
      out.on("drain", done).on("error", done).on("close", done);
    });
  }
  return outUsable(out);
}

/** Waits until what was written to `out` is flushed; throws a failure other than EPIPE. */
async function flushOut(out: NodeJS.WritableStream): Promise<void> {
  if (!outFailures.has(out) || !outUsable(out)) return;
  await new Promise<void>((resolve) => out.write("", () => resolve()));
  outUsable(out);
}

function print(v: unknown): void {
  process.stdout.write(JSON.stringify(v, null, 2) + "\n");
}

/** Runs one operator command; returns the exit code. */
export async function runCommand(command: string, argv: readonly string[]): Promise<number> {
  if (command === "version") {
    // Read as every command's words are, but a bad WIRECHAT_* variable or config file
    // (which split() reads too) does not keep the version from being printed.
    let v: Parsed | undefined;
    try {
      v = split(argv);
    } catch (err) {
      if (!(err instanceof ConfigError)) throw err;
    }
    if (v?.help) {
      process.stdout.write(`${COMMAND_HELP}\n`);
      return 0;
    }
    if (v !== undefined && v.positional.length > 0) throw new ConfigError(`unexpected '${v.positional[0]}' (see wirechat help)`);
    process.stdout.write(`wirechat ${packageVersion()}\n`);
    return 0;
  }
  const p = split(argv);
  // Asked for help or the version, a command does nothing else: `user del bob --help`
  // must not delete bob.
  if (p.help) {
    process.stdout.write(`${COMMAND_HELP}\n`);
    return 0;
  }
  if (p.version) {
    process.stdout.write(`wirechat ${packageVersion()}\n`);
    return 0;
  }
  const words = wordsOf(command, p);
  if (p.positional.length > words) throw new ConfigError(`unexpected '${p.positional[words]}' (see wirechat help)`);
  if (command === "check") {
    const c = p.config;
    // What start-up would read besides the options: the TLS certificate and key, as a pair.
    if (c.tlsCert && c.tlsKey) {
      try {
        createSecureContext({ cert: readFileSync(c.tlsCert), key: readFileSync(c.tlsKey) });
      } catch (err) {
        throw new ConfigError(`--tls-cert ${c.tlsCert} / --tls-key ${c.tlsKey}: ${(err as Error).message}`);
      }
    }
    process.stdout.write(`configuration OK${c.config ? ` (${c.config})` : ""}: port ${c.port}, data dir ${c.dataDir}, admin ${c.admin === "on" ? `${c.adminHost}:${c.adminPort}` : "off"}\n`);
    return 0;
  }
  if (command === "restore") {
    const from = need(p, 0, "the backup directory");
    // SIGINT or SIGTERM while the copy is staged: stop, remove the staging, say so.
    const stop = new AbortController();
    const onSignal = (sig: NodeJS.Signals) => stop.abort(sig);
    process.once("SIGINT", onSignal).once("SIGTERM", onSignal);
    try {
      const r = await restore(from, p.config.dataDir, stop.signal);
      process.stdout.write(`restored ${r.keys} keys and ${r.blobs} attachment files into ${p.config.dataDir}\n`);
      if (r.missing > 0) {
        process.stderr.write(`wirechat restore: ${r.missing} attachment files were missing when the backup was made; their messages' attachments are empty\n`);
      }
      return 0;
    } catch (err) {
      if (!stop.signal.aborted) throw err;
      const sig = stop.signal.reason as NodeJS.Signals;
      process.stderr.write(`wirechat restore: stopped by ${sig}; ${p.config.dataDir} is as it was before\n`);
      return 128 + osConstants.signals[sig];
    } finally {
      process.off("SIGINT", onSignal).off("SIGTERM", onSignal);
    }
  }
  const b = await backend(p.config, p.own.has("init"));
  try {
    const ops = b.ops;
    switch (command) {
      case "user": {
        const sub = need(p, 0, "a user command: add, del, passwd, list or show");
        if (sub === "add") {
          const login = need(p, 1, "the login");
          print(await ops.addUser(login, readPassword(p), p.own.get("nick") ?? login));
        } else if (sub === "del") print(await ops.deleteUser(need(p, 1, "the user")));
        else if (sub === "passwd") {
          const user = need(p, 1, "the user");
          print(await ops.passwd(user, readPassword(p)));
        } else if (sub === "show") print(await ops.show(need(p, 1, "the user")));
        else if (sub === "list") {
          // Every user, a page at a time, unless --limit says how many (it stopped at 100
          // without a word that more were there).
          const given = p.own.get("limit");
          const limit = Number(given ?? LIST_PAGE);
          if (given !== undefined && (!/^\d+$/.test(given) || limit < 1 || limit > LIST_PAGE)) {
            throw new ConfigError(`--limit: expected a whole number from 1 to ${LIST_PAGE}, got "${given}"`);
          }
          let after = p.own.get("after") ?? "";
          for (;;) {
            const page = await ops.list(after, limit);
            for (const u of page) {
              // In cluster mode, the other nodes it is online on too (presence counts nodes, not their connections).
              const away = u.onlineElsewhere ?? 0;
              const online = u.online > 0 || away > 0 ? `\tonline(${u.online}${away > 0 ? ` here, on ${away} other node${away === 1 ? "" : "s"}` : ""})` : "";
              if (!(await writeOut(process.stdout, `${u.uid}\t${u.login}\t${u.nick}${online}${u.banned ? "\tbanned" : ""}\n`))) return 0;
            }
            if (given !== undefined || page.length < limit) break;
            after = page[page.length - 1].uid;
          }
        } else throw new ConfigError(`unknown user command '${sub}' (add, del, passwd, list, show)`);
        return 0;
      }
      case "ban":
      case "unban": {
        const address = p.own.get("address");
        const kind = address !== undefined ? "addr" : "login";
        const value = address ?? need(p, 0, "the login (or --address <ip>)");
        if (command === "ban") print(await ops.ban(kind, value, p.own.get("reason") ?? ""));
        else print({ lifted: await ops.unban(kind, value) });
        return 0;
      }
      case "kick":
        print(await ops.kick(need(p, 0, "the user")));
        return 0;
      case "registration": {
        const v = p.positional[0];
        if (v !== undefined && v !== "open" && v !== "closed") throw new ConfigError("registration open|closed");
        const now = await ops.registration(v === undefined ? undefined : v === "open");
        print({ registration: now });
        const configured = p.config.registration;
        if (v !== undefined && configured !== "" && configured !== now) {
          process.stderr.write(`wirechat registration: stored, but this configuration's --registration ${configured} wins when the server starts\n`);
        }
        return 0;
      }
      case "backup": {
        const info = (await ops.backup(need(p, 0, "the backup directory"))) as { missing?: number };
        print(info);
        if (info.missing) process.stderr.write(`wirechat backup: ${info.missing} attachment files were missing: the backup is incomplete\n`);
        return info.missing ? 1 : 0;
      }
      case "export": {
        // An empty --user (a script's unset variable) names nobody: it must not export everyone.
        const user = p.own.get("user");
        if (user === "") throw new ConfigError("--user needs a login or uid (leave it out to export the whole server)");
        await ops.exportTo(user, process.stdout);
        await flushOut(process.stdout);
        return 0;
      }
      default:
        throw new ConfigError(`unknown command '${command}'`);
    }
  } finally {
    await b.close();
  }
}
