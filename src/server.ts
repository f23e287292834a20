// Composition root: opens storage, registers every feature's actions with the
// dispatcher, and starts the listener. Layers, from the wire inwards:
//   transport (listener, connection, scanner) → protocol (dispatcher, schemas, codes,
//   codec, events, router) → features (accounts, profiles, contacts, messages, channels)
//   → storage (key layout, group commit, message log, typed stores, blob store).

import { existsSync, realpathSync, renameSync } from "node:fs";
import { hostname } from "node:os";
import path from "node:path";
import type { FastifyInstance } from "fastify";
import pino, { type Logger } from "pino";
import { logDestination } from "./log.js";
import { Background } from "./background.js";
import { backup, exportRecords, RESTORE_LOCK, restoreRunning } from "./admin/backup.js";
import { adminRequestTime, buildAdmin, listenAdmin, type AdminDeps } from "./admin/http.js";
import { metricsRegistry } from "./admin/prometheus.js";
import { ConfigError, OPTIONS, packageVersion, type Config } from "./config.js";
import { registerAdmin, type AdminOps } from "./features/admin.js";
import { Metrics } from "./metrics.js";
import { BanStore } from "./storage/bans.js";
import { registerAccounts, type AccountOps } from "./features/accounts.js";
import { registerChannels, type ChannelOps } from "./features/channels.js";
import { registerContacts } from "./features/contacts.js";
import { registerMessages } from "./features/messages.js";
import { registerProfiles, type UserDirectory } from "./features/profiles.js";
import { Hooks, readSynced, type Services } from "./features/services.js";
import type { Cluster } from "./features/cluster.js";
import { registerStats } from "./features/stats.js";
import { NativeCodec } from "./protocol/codec.js";
import { Dispatcher } from "./protocol/dispatcher.js";
import { Router } from "./protocol/router.js";
import type { Session } from "./protocol/session.js";
import type { Audience, Event } from "./protocol/events.js";
import { LocalLock } from "./seams.js";
import { BlobStore } from "./storage/blobs.js";
import { ChannelStore } from "./storage/channels.js";
import { ContactStore } from "./storage/contacts.js";
import { Storage } from "./storage/db.js";
import { MessageStore } from "./storage/messages.js";
import { SessionStore } from "./storage/sessions.js";
import { UserStore } from "./storage/users.js";
import type { UserRecord } from "./storage/layout.js";
import { shownLogin } from "./features/profile-fields.js";
import { Listener, partialInput } from "./transport/listener.js";
import { nativeFront } from "./doors/native.js";
import { RoomsDoor } from "./doors/rooms.js";
import { RustDoor } from "./doors/rust.js";
import { HttpDoor } from "./doors/http.js";
import { ChatDoor } from "./doors/http-chat.js";
import { EchatDoor } from "./doors/http-echat.js";
import { privateRoomOf, serverChannel } from "./features/channels.js";
import { Registration } from "./features/registration.js";
import { channelConv, CLUSTER_POSITION_KEY } from "./storage/layout.js";
import { within } from "./clock.js";

export interface RunningServer {
  readonly host: string;
  readonly port: number;
  /** The TLS listener's port, when TLS is configured. */
  readonly tlsPort: number | undefined;
  /** The admin port, when it is on. */
  readonly adminPort: number | undefined;
  /** The rust_messages door's port (seed 000), when it is on. */
  readonly rustPort: number | undefined;
  /** The rooms API door's port (seed 001), when it is on. */
  readonly roomsPort: number | undefined;
  /** The HTTP door's port (seed 003, native over WebSocket), when it is on. */
  readonly httpPort: number | undefined;
  readonly services: Services;
  /** The native door's listener. */
  readonly listener: Listener;
  /** Every TCP listener: the native door's first, then the seed doors'. */
  readonly listeners: readonly Listener[];
  /** The HTTP door (its Fastify app and its WebSockets), when it is on. */
  readonly http: HttpDoor | undefined;
  readonly admin: AdminOps;
  /** Users by number and by email (for the doors). */
  readonly directory: UserDirectory;
  /** Channel creation with members, invite, membership (for the doors). */
  readonly channelOps: ChannelOps;
  /** Applies a reloaded configuration's reloadable settings (SIGHUP). */
  reload(next: Config): string[];
  /**
   * Stops accepting and reading, answers the requests already read, closes every
   * connection after flushing, then syncs and closes storage.
   */
  stop(): Promise<void>;
  /**
   * Settles once the server has stopped itself because its storage refuses every write
   * (storage/db.ts): with the last failure. Never settles otherwise.
   */
  readonly failed: Promise<Error>;
}

/** Storage, the stores and every feature, without any listener. */
export interface Core {
  services: Services;
  admin: AdminOps;
  /** Account operations a door uses besides native actions (session checks). */
  accounts: AccountOps;
  directory: UserDirectory;
  channelOps: ChannelOps;
  /** Stops background work and closes storage. */
  close(): Promise<void>;
}

/**
 * Opens the data dir and registers every feature: the server's core, which
 * `wirechat user|ban|backup …` also use on a stopped server's data dir. `opened` runs
 * once the database is open (this process holds its lock), before the stores load.
 */
export async function openCore(config: Config, log: Logger, opened?: () => Promise<void>): Promise<Core> {
  // A restore moving a backup into this data dir (wirechat restore, under its lock): a
  // server started meanwhile made a database of its own there, and the restore then
  // moved the backup's attachment files under it.
  const restoring = restoreRunning(config.dataDir);
  if (restoring !== undefined) {
    throw new Error(`a restore into ${config.dataDir} is running (pid ${restoring}): start once it has finished (if it is not running, remove ${path.join(config.dataDir, RESTORE_LOCK)})`);
  }
  let storage: Storage;
  try {
    storage = await Storage.open(config.dataDir, log);
  } catch (err) {
    // LevelDB's LOCK: another process has this data dir open.
    const cause = (err as { cause?: { message?: string } }).cause;
    if (/lock/i.test(cause?.message ?? "")) {
      throw new Error(`the database in ${config.dataDir} is locked: another wirechat is running on this data dir (stop it, or use its admin port)`, { cause: err });
    }
    throw err;
  }
  // A cluster node's view changes only through the log: written here on its own, it
  // would number messages, users and channels apart from the other nodes for good.
  if (!config.nats && (await storage.spaces.meta.get(CLUSTER_POSITION_KEY)) !== undefined) {
    await storage.close();
    throw new ConfigError(`${path.resolve(config.dataDir)} is a cluster node's view of the log: start it with --nats (and the cluster's other options)`);
  }
  try {
    await opened?.();
    return await assemble(storage, config, log);
  } catch (err) {
    // The admin port not listening, a migration or a load failing: the database is
    // closed (its lock released) before the start fails.
    await storage.close();
    throw err;
  }
}

/** The stores and every feature on an open database (openCore). */
async function assemble(storage: Storage, config: Config, log: Logger): Promise<Core> {
  const metrics = new Metrics();
  storage.onBatch = (ops, seconds) => {
    metrics.batchOps.observe(ops);
    metrics.batchSeconds.observe(seconds);
  };
  const dispatcher = new Dispatcher(config, log, metrics);
  const messages = new MessageStore(storage, await storage.counter("seq"), log);
  messages.onCommitted = (n, seconds) => {
    metrics.messagesStored += n;
    metrics.deliveryLag.observe(seconds, n);
  };
  await messages.init();
  // After messages.init: that brings an older layout to 3, this one from 3 to 4.
  const users = new UserStore(storage, await storage.counter("usernum"));
  await users.init(log);
  const channels = new ChannelStore(storage, await storage.counter("chid"));
  // After users.init: that brings the layout to 6, this one to 7.
  await channels.init(log);
  const router = new Router(messages, channels, (err, what) => log.error({ err }, `${what} failed`), metrics);
  dispatcher.route(router);
  const locks = new LocalLock();
  const sessions = new SessionStore(storage);
  // In cluster mode the log alone changes the view: expired sessions are swept by a
  // command in the log (features/accounts.ts), not here.
  const sessionsAtStart = await sessions.init(config.nats ? 0 : Math.floor(Date.now() / 1000));
  if (sessionsAtStart.migrated + sessionsAtStart.swept > 0) log.info(sessionsAtStart, "sessions migrated to hashed sids and expired ones swept");
  const bans = new BanStore(storage);
  await bans.load();
  const registration = await Registration.load(storage, config);
  const background = new Background(log);
  const blobs = new BlobStore(config.dataDir, storage, locks, background, log);
  const services: Services = {
    config,
    log,
    metrics,
    dispatcher,
    router,
    locks,
    hooks: new Hooks(background),
    background,
    storage,
    users,
    sessions,
    contacts: new ContactStore(storage),
    messages,
    channels,
    blobs,
    bans,
    registration,
  };
  if (config.nats) {
    // The NATS client is loaded only in cluster mode.
    const { Cluster } = await import("./features/cluster.js");
    dispatcher.clusterMode = true;
    services.cluster = new Cluster(
      services,
      {
        servers: config.nats,
        stream: config.natsStream,
        replicas: config.replicas,
        nodeId: nodeIdOf(config),
        access: config,
      },
      log,
    );
  }
  const accounts = registerAccounts(services);
  const directory = registerProfiles(services);
  registerContacts(services);
  registerMessages(services);
  const channelOps = registerChannels(services);
  const admin = registerAdmin(services, accounts);

  // Attachment files no message uses (a crash between file and batch) go, in the background.
  // A cluster node's view names them only once it has applied the log: swept before
  // (alongside the catch-up), a file whose message was not applied yet went too.
  background.run("sweeping unused attachment files", async (signal) => {
    const cluster = services.cluster;
    if (cluster) {
      await new Promise<void>((resolve) => {
        void cluster.whenCaughtUp.then(resolve);
        signal.addEventListener("abort", () => resolve(), { once: true });
      });
      if (signal.aborted) return;
    }
    const { checked, removed } = await blobs.sweep(signal);
    if (removed > 0) log.info({ checked, removed }, "removed attachment files no message uses");
  });

  return {
    services,
    admin,
    accounts,
    directory,
    channelOps,
    async close() {
      const stopped = services.hooks.stop();
      await services.cluster?.close();
      await background.stop(config.shutdownTimeout * 1000);
      await messages.flushDerived();
      await storage.close();
      await stopped;
    },
  };
}

/** This node's name in logs, the cluster log and metrics: --node-id, else <host name>:<port>. */
function nodeIdOf(config: Config): string {
  return config.nodeId || `${hostname()}:${config.port}`;
}

/**
 * Starts the server. `abort` (a signal while it starts) ends a cluster node's catch-up
 * with the log: the start rejects with its reason, storage closed behind it.
 */
export async function startServer(config: Config, logger?: Logger, abort?: AbortSignal): Promise<RunningServer> {
  const log = logger ?? pino({ level: config.logLevel }, logDestination());
  // The admin app is built before everything else; its routes find what they need in
  // `adminDeps` when they run. Built after the stores, S1 (10 s, --trace-gc) spent
  // 2,542-2,623 ms in scavenges in 4 runs of 4 (1,325-1,504 ms with --admin off) and
  // delivered 65-73k msg/s against 77-81k; built first, 1,441-1,580 ms in 3 of 3, and
  // 4 interleaved pairs with the previous commit: median 79.3k vs 81.5k msg/s.
  // It listens once the database is open (a second server on the data dir is told it
  // is locked, not that the admin port is taken): /healthz answers from then on, and
  // /readyz says what the start is doing, however long a migration or a cluster node's
  // catch-up takes (a health check must not take a slow start for a dead process).
  const adminDeps = { notReady: () => "opening the database" } as AdminDeps;
  const adminApp = config.admin === "on" ? buildAdmin(config, log, adminDeps) : undefined;
  let adminAddress: { port: number } | undefined;
  const listenEarly = async () => {
    if (!adminApp) return;
    Object.assign(adminDeps, { version: packageVersion(), dataDir: realpathSync(config.dataDir) });
    adminAddress = await listenAdmin(adminApp, config);
  };
  let core: Core;
  try {
    core = await openCore(config, log, listenEarly);
    if (core.services.cluster) {
      core = await joinCluster(core, config, log, (cluster) => (adminDeps.notReady = () => cluster.startingUp), abort);
    }
  } catch (err) {
    await adminApp?.close();
    throw err;
  }
  // Whatever fails from here closes what was made: the admin port, the listeners, the core.
  const made: Made = { listeners: [] };
  try {
    return await serve(core, config, log, adminApp, adminDeps, adminAddress, made);
  } catch (err) {
    // Each closes whatever the others do; storage closes last, behind the requests a
    // port that was already listening let in (as stop() does).
    try {
      await Promise.allSettled([adminApp?.close(), ...made.listeners.map((l) => l.close(0)), made.http?.close(0)]);
      await core.services.dispatcher.idle(config.shutdownTimeout * 1000);
    } finally {
      await core.close();
    }
    throw err;
  }
}

/** What serve() has made so far, for startServer to close if it fails. */
interface Made {
  listeners: Listener[];
  http?: HttpDoor;
}

/** The doors and their listeners on an open core, and the admin port's routes. */
async function serve(
  core: Core,
  config: Config,
  log: Logger,
  adminApp: FastifyInstance | undefined,
  adminDeps: AdminDeps,
  adminAddress: { port: number } | undefined,
  made: Made,
): Promise<RunningServer> {
  adminDeps.notReady = () => "opening the listeners";
  const { services, admin, directory, channelOps } = core;
  const { dispatcher, router, blobs, background, storage, messages, metrics } = services;

  blobs.maxUploading = config.maxUploading;
  // Under pressure, uploads slower than 16 times the least rate a connection must keep
  // give their room up (BlobStore.shedBelow): 16 KiB/s by default.
  blobs.shedBelow = () => SHED_FACTOR * config.uploadMinRate;
  const newUpload = () => blobs.writer(config.maxAttach);
  const nativeCodec = new NativeCodec(blobs);
  // Every TCP door's unfinished frames count against one --max-partial-input.
  const held = partialInput(config);
  metrics.partialInput = held;
  const listener = new Listener(config, dispatcher, router, nativeFront(dispatcher, nativeCodec), log, newUpload, metrics, held);
  const listeners = made.listeners;
  listeners.push(listener);
  let rustListener: Listener | undefined;
  let http: HttpDoor | undefined;
  // The seed doors' rooms are channels the server makes when they are missing.
  let defaultRoom: string | undefined;
  let lobby: string | undefined;
  if (config.rustPort >= 0) defaultRoom = await serverChannel(services, config.rustRoom, "--rust-room");
  if (config.httpPort >= 0) lobby = await serverChannel(services, config.lobby, "--lobby");
  // A user named as the seed doors' clients name one: a login, else a nick (one
  // namespace: another door's account shows there by its nick).
  const uidOfName = async (name: string): Promise<string | undefined> =>
    (await readSynced(services, () => services.users.lookup("login", name))) ?? (await readSynced(services, () => services.users.lookup("nick", name)));
  // Users whose shown login (shownLogin) starts with `prefix`, in that name's order: by
  // login, those whose login is not an address; by nick, those whose login is (their
  // login, an email, is neither shown nor matched).
  const shownStartingWith = async (prefix: string, limit: number): Promise<UserRecord[]> => {
    const { users } = services;
    // Read past the entries each index drops (logins that are addresses, which
    // prefixSearch never matches; nicks of accounts whose login is not), so that a busy
    // prefix does not hide the rest.
    const hasAddressLogin = async (uid: string) => (await users.get(uid))?.login.includes("@") === true;
    const [byLogin, byNick] = await Promise.all([
      users.prefixSearch("login", prefix, limit),
      users.prefixSearchWhere("nick", prefix, limit, hasAddressLogin),
    ]);
    const found = (await Promise.all([...byLogin, ...byNick].map((uid) => users.get(uid)))).filter((u): u is UserRecord => u !== undefined);
    const key = (u: UserRecord) => shownLogin(u).toLowerCase();
    return found.sort((a, b) => Number(key(a) > key(b)) - Number(key(a) < key(b))).slice(0, limit);
  };
  // A door's events (its notices: the chat door's join and leave lines, a rust room
  // move), and in cluster mode its notices for its connections on the other nodes too.
  const publish = (ev: Event, audience: Audience): void => {
    router.publish(ev, audience);
    if (ev.kind === "notice") services.cluster?.shareNotice(ev, audience);
  };
  if (defaultRoom !== undefined) {
    const door = new RustDoor(dispatcher, log, {
      config,
      defaultRoom,
      // Door lookups of what another node may have just written (see readSynced).
      channelByName: (name) => readSynced(services, () => services.channels.byName(name)),
      revoke: (uid, sid, expires) => core.accounts.revoke(uid, sid, expires),
      publish,
      storedRoom: (uid) => services.users.rustRoom(uid),
      storeRoom: (uid, chid) => services.storage.commit(services.users.rustRoomOps(uid, chid)),
    });
    listeners.push((rustListener = new Listener(config, dispatcher, router, door, log, newUpload, metrics, held)));
  }
  let roomsListener: Listener | undefined;
  if (config.roomsPort >= 0) {
    const { messages } = services;
    const door = new RoomsDoor(dispatcher, log, {
      config,
      blobs,
      uidOfName,
      loginsStartingWith: async (prefix, limit) => (await shownStartingWith(prefix, limit)).map(shownLogin),
      roomOf: (a, b) => readSynced(services, () => privateRoomOf(services, a, b)),
      firstMid: (chid) => messages.firstSeq(channelConv(chid)),
      revoke: (uid, sid, expires) => core.accounts.revoke(uid, sid, expires),
      roomsOf: async (uid) => {
        const found = await Promise.all(
          (await services.channels.channelsOf(uid)).map(async (chid) => {
            const [c, last] = await Promise.all([services.channels.get(chid), messages.lastSeq(channelConv(chid))]);
            return c ? [{ chid, name: c.name, last }] : [];
          }),
        );
        return found.flat();
      },
    });
    listeners.push((roomsListener = new Listener(config, dispatcher, router, door, log, newUpload, metrics, held)));
  }
  if (lobby !== undefined) {
    const { users, channels } = services;
    const chat = new ChatDoor(dispatcher, log, {
      lobby,
      lookup: (index, value) => users.lookup(index, value),
      settled: (read, again) => readSynced(services, read, again),
      user: (uid) => users.get(uid),
      cachedUser: (uid) => users.peek(uid),
      isMember: (chid, uid) => channels.isMember(chid, uid),
      publish,
      revoke: (uid, sid, expires) => core.accounts.revoke(uid, sid, expires),
      checkLogin: (s, login, pass) => core.accounts.checkLogin(s, login, pass),
      refuseUnknown: (s, name) => core.accounts.refuseUnknown(s, name),
    });
    const echat = new EchatDoor(dispatcher, log, {
      session: (sid) => core.accounts.session(sid),
      user: (uid) => users.get(uid),
      cachedUser: (uid) => users.peek(uid),
      uidOfNum: (num) => readSynced(services, () => directory.uidOf(num)),
      uidOfName,
      loginsStartingWith: async (prefix, limit) => (await shownStartingWith(prefix, limit)).map((u) => u.uid),
      channel: (chid) => readSynced(services, () => channels.get(chid)),
      channelsOf: (uid) => channels.channelsOf(uid),
      members: (chid) => channels.members(chid),
      isMember: (chid, uid) => readSynced(services, () => channels.isMember(chid, uid), (member) => !member),
    });
    made.http = http = new HttpDoor({ config, log, dispatcher, router, metrics, nativeCodec, chat, echat });
  }
  const refuseAddress = (address: string) => services.bans.banned("addr", address)?.reason;
  // Every door's listener: one set of connection caps for them all, and their
  // connections as the admin port lists, counts and bans them.
  const tables = [...listeners, ...(http ? [http.websockets] : [])];
  // And one count of unfinished input: the WebSockets' messages join the TCP frames'.
  if (http) http.websockets.partialInput = held;
  for (const l of tables) {
    l.refuseAddress = refuseAddress;
    l.group = tables;
  }
  // Cluster mode: an address banned through any node's admin port is cut on every node
  // as the log's apply reaches the ban.
  if (services.cluster) {
    services.cluster.onAddressBanned = (address, reason) => {
      const why = `your address was banned${reason ? `: ${reason}` : ""}`;
      return tables.reduce((n, t) => n + t.closeAddress(address, why), 0);
    };
  }
  // Every door's open connections, WebSockets included.
  registerStats(services, () => tables.reduce((n, t) => n + t.open, 0));

  let stopping: Promise<void> | undefined;
  // Aborted as the stop begins: an operator's backup in progress gives up at its next step.
  const stopSignal = new AbortController();
  let address;
  let tlsAddress;
  let rustAddress;
  let roomsAddress;
  let httpAddress;
  address = await listener.listen(listener.server, config.port, config.host);
  if (listener.tlsServer) tlsAddress = await listener.listen(listener.tlsServer, config.tlsPort, config.host);
  if (rustListener) rustAddress = await rustListener.listen(rustListener.server, config.rustPort, config.host);
  if (roomsListener) roomsAddress = await roomsListener.listen(roomsListener.server, config.roomsPort, config.host);
  if (http) httpAddress = await http.listen();
  if (adminApp) {
    const { version } = adminDeps;
    Object.assign(adminDeps, {
      ops: admin,
      connections: tables,
      unanswered: (s: Session) => dispatcher.unanswered(s),
      registry: metricsRegistry(metrics, tables, blobs, storage, { version, nodeId: nodeIdOf(config) }),
      backup: (dir: string) => backup(storage, blobs, dir, version, stopSignal.signal),
      exportLines: async (user: string | undefined) => exportRecords(storage, user === undefined ? undefined : (await admin.resolve(user)).uid),
    } satisfies Partial<AdminDeps>);
  }
  const cluster = core.services.cluster;
  adminDeps.notReady = () => (stopping ? "shutting down" : !listener.server.listening ? "not accepting connections" : (cluster?.problem ?? storageProblem(storage)));
  log.info(
    {
      host: address.address,
      port: address.port,
      tlsPort: tlsAddress?.port,
      rustPort: rustAddress?.port,
      roomsPort: roomsAddress?.port,
      httpPort: httpAddress?.port,
      adminPort: adminAddress?.port,
      dataDir: config.dataDir,
    },
    "wirechat listening",
  );

  // Writes failing for good (LevelDB keeps a failed sync's error until it is opened
  // again: storage/db.ts): the server stops, for its service manager to restart it.
  let refused: (err: Error) => void = () => {};
  const failed = new Promise<Error>((resolve) => (refused = resolve));
  storage.onRefusing = (err) => {
    if (stopping) return;
    log.fatal({ err, failingSince: new Date(storage.failing?.since ?? Date.now()).toISOString() }, "storage refuses every write; stopping (a restart opens the database again, which recovers its log)");
    void running.stop().finally(() => refused(err));
  };
  const running: RunningServer = {
    host: address.address,
    port: address.port,
    tlsPort: tlsAddress?.port,
    adminPort: adminAddress?.port,
    rustPort: rustAddress?.port,
    roomsPort: roomsAddress?.port,
    httpPort: httpAddress?.port,
    services,
    listener,
    listeners,
    http,
    admin,
    directory,
    channelOps,
    reload(next) {
      const changed = applyReload(config, next, log, listener);
      if (changed.includes("registration")) services.registration.reconfigured(config.registration);
      http?.reloaded();
      if (adminApp) adminRequestTime(adminApp, config);
      return changed;
    },
    stop() {
      stopping ??= (async () => {
        stopSignal.abort();
        const hooksStopped = services.hooks.stop();
        const deadline = Date.now() + config.shutdownTimeout * 1000;
        await Promise.all([...listeners.map((l) => l.close(config.shutdownTimeout * 1000)), http?.close(config.shutdownTimeout * 1000)]);
        // Storage closes only behind every user of it: handlers still running on
        // connections already closed, then background work (presence of the users just
        // disconnected, collects, purges), which stops at its next step.
        await dispatcher.idle(Math.max(0, deadline - Date.now()));
        await services.cluster?.close();
        await background.stop(Math.max(0, deadline - Date.now()));
        await messages.flushDerived();
        await storage.close();
        // Last: /readyz says "shutting down" for as long as the rest takes. A request
        // still in progress (an export its client reads slowly) has what is left of the
        // shutdown timeout, and then its socket is closed.
        const adminClosed = adminApp?.close();
        if (adminApp && !(await within(adminClosed as Promise<unknown>, Math.max(ADMIN_CLOSE_MIN_MS, deadline - Date.now())))) {
          log.warn("admin requests still in progress at the shutdown timeout; closing their sockets");
          adminApp.server.closeAllConnections();
          await adminClosed;
        }
        await hooksStopped;
        log.info("wirechat stopped");
      })();
      return stopping;
    },
    failed,
  };
  return running;
}

/** What /readyz says while storage writes fail. */
function storageProblem(storage: Storage): string | undefined {
  const f = storage.failing;
  return f === undefined ? undefined : `storage writes failing since ${new Date(f.since).toISOString()}: ${f.message}`;
}

/** The admin port's own close, past the shutdown timeout: requests just answered go out. */
const ADMIN_CLOSE_MIN_MS = 250;

/** Uploads averaging under this many times --upload-min-rate may give up their room (BlobStore.shedBelow). */
const SHED_FACTOR = 16;

/**
 * Catches the view up with the cluster log before anything listens. A view built from
 * another stream (a stream recreated, a data dir copied from elsewhere) is never
 * trusted: it is rebuilt from the log. The old database is set aside in the data dir
 * (`db.replaced-<time>`), never deleted: a stream can also be "new" because
 * nats-server lost its store, and then the views are the only copy of what the
 * cluster held.
 */
async function joinCluster(core: Core, config: Config, log: Logger, opening: (cluster: Cluster) => void, abort?: AbortSignal): Promise<Core> {
  const { ViewMismatch } = await import("./cluster/jetstream-log.js");
  try {
    opening(core.services.cluster as Cluster);
    await (core.services.cluster as Cluster).open(abort);
    return core;
  } catch (err) {
    if (!(err instanceof ViewMismatch)) {
      await core.close();
      if (abort && err === abort.reason) throw err;
      throw new Error(`cannot join the cluster at ${config.nats}: ${(err as Error).message}`, { cause: err });
    }
    await core.close();
    abort?.throwIfAborted(); // nothing renamed for a start that was asked to stop
    const stamp = new Date().toISOString().replace(/[:.]/g, "-");
    const kept = path.join(config.dataDir, `db.replaced-${stamp}`);
    renameSync(path.join(config.dataDir, "db"), kept);
    // Its attachment files with it: the new view's start-up sweep would take every file
    // no message of the new view names yet, and the old view may be the only copy left
    // (the object store lost with the stream). The new view fetches what it needs.
    const keptBlobs = path.join(config.dataDir, `blobs.replaced-${stamp}`);
    if (existsSync(path.join(config.dataDir, "blobs"))) renameSync(path.join(config.dataDir, "blobs"), keptBlobs);
    log.warn({ reason: err.message, kept, keptBlobs }, "the local view does not match the cluster log; rebuilding it from the log (the old view is kept)");
    const fresh = await openCore(config, log);
    try {
      opening(fresh.services.cluster as Cluster);
      await (fresh.services.cluster as Cluster).open(abort);
    } catch (again) {
      await fresh.close();
      throw again;
    }
    return fresh;
  }
}

/**
 * Copies the reloadable settings of `next` into the running `config` (their readers
 * read it when they act) and swaps the TLS certificate; returns what changed, and
 * warns about settings that need a restart.
 */
function applyReload(config: Config, next: Config, log: Logger, listener: Listener): string[] {
  const changed: string[] = [];
  const needRestart: string[] = [];
  const c = config as unknown as Record<string, unknown>;
  const n = next as unknown as Record<string, unknown>;
  const tlsBefore = { tlsCert: config.tlsCert, tlsKey: config.tlsKey };
  for (const o of OPTIONS) {
    if (c[o.key] === n[o.key]) continue;
    // A certificate for a server started without TLS needs a listener: a restart.
    const tlsOff = (o.key === "tlsCert" || o.key === "tlsKey") && !listener.tlsServer;
    if (o.reload && !tlsOff) {
      c[o.key] = n[o.key];
      changed.push(o.flag.slice(2));
    } else needRestart.push(o.flag.slice(2));
  }
  if (changed.includes("log-level")) log.level = config.logLevel;
  // A renewed certificate keeps its file names: reload it whenever TLS is on. One that
  // cannot be loaded leaves the current one in use, and its file names with it (the
  // next SIGHUP tries the new ones again, and the line below does not list them).
  if (listener.tlsServer && !listener.reloadTls()) {
    Object.assign(config, tlsBefore);
    for (const flag of ["tls-cert", "tls-key"]) if (changed.includes(flag)) changed.splice(changed.indexOf(flag), 1);
  }
  if (needRestart.length > 0) log.warn({ settings: needRestart }, "these settings changed but need a restart");
  log.info({ changed }, "configuration reloaded");
  return changed;
}
