// Composition root: opens storage, registers every feature's actions with the
// dispatcher, and starts the listener. Layers, from the wire inwards:
//   transport (listener, connection, scanner) → protocol (dispatcher, schemas, codes,
//   codec, events, router) → features (accounts, profiles, contacts, messages, channels)
//   → storage (key layout, group commit, message log, typed stores, blob store).

import pino, { type Logger } from "pino";
import { Background } from "./background.js";
import type { Config } from "./config.js";
import { registerAccounts } from "./features/accounts.js";
import { registerChannels } from "./features/channels.js";
import { registerContacts } from "./features/contacts.js";
import { registerMessages } from "./features/messages.js";
import { registerProfiles } from "./features/profiles.js";
import { Hooks, type Services } from "./features/services.js";
import { registerStats } from "./features/stats.js";
import { NativeCodec } from "./protocol/codec.js";
import { Dispatcher } from "./protocol/dispatcher.js";
import { Router } from "./protocol/router.js";
import { LocalLock } from "./seams.js";
import { BlobStore } from "./storage/blobs.js";
import { ChannelStore } from "./storage/channels.js";
import { ContactStore } from "./storage/contacts.js";
import { Storage } from "./storage/db.js";
import { MessageStore } from "./storage/messages.js";
import { SessionStore } from "./storage/sessions.js";
import { UserStore } from "./storage/users.js";
import { Listener } from "./transport/listener.js";

export interface RunningServer {
  readonly host: string;
  readonly port: number;
  /** The TLS listener's port, when TLS is configured. */
  readonly tlsPort: number | undefined;
  readonly services: Services;
  readonly listener: Listener;
  /**
   * Stops accepting and reading, answers the requests already read, closes every
   * connection after flushing, then syncs and closes storage.
   */
  stop(): Promise<void>;
}

export async function startServer(config: Config, logger?: Logger): Promise<RunningServer> {
  const log = logger ?? pino({ level: config.logLevel });
  const storage = await Storage.open(config.dataDir, log);
  const dispatcher = new Dispatcher(config, log);
  const messages = new MessageStore(storage, await storage.counter("seq"), log);
  await messages.init();
  const channels = new ChannelStore(storage, await storage.counter("chid"));
  const router = new Router(messages, channels, (err, what) => log.error({ err }, `${what} failed`));
  dispatcher.route(router);
  const locks = new LocalLock();
  const sessions = new SessionStore(storage);
  const sessionsAtStart = await sessions.init(Math.floor(Date.now() / 1000));
  if (sessionsAtStart.migrated + sessionsAtStart.swept > 0) log.info(sessionsAtStart, "sessions migrated to hashed sids and expired ones swept");
  const background = new Background(log);
  const blobs = new BlobStore(config.dataDir, storage, locks, background);
  const services: Services = {
    config,
    log,
    dispatcher,
    router,
    locks,
    hooks: new Hooks(background),
    background,
    storage,
    users: new UserStore(storage),
    sessions,
    contacts: new ContactStore(storage),
    messages,
    channels,
    blobs,
  };
  registerAccounts(services);
  registerProfiles(services);
  registerContacts(services);
  registerMessages(services);
  registerChannels(services);

  // Attachment files no message uses (a crash between file and batch) go, in the background.
  background.run("sweeping unused attachment files", async (signal) => {
    const { checked, removed } = await blobs.sweep(signal);
    if (removed > 0) log.info({ checked, removed }, "removed attachment files no message uses");
  });

  const listener = new Listener(config, dispatcher, router, new NativeCodec(blobs), log, () => blobs.writer(config.maxAttach));
  registerStats(services, () => listener.connections.size);

  let address;
  let tlsAddress;
  try {
    address = await listener.listen(listener.server, config.port, config.host);
    if (listener.tlsServer) tlsAddress = await listener.listen(listener.tlsServer, config.tlsPort, config.host);
  } catch (err) {
    await listener.close(0);
    await background.stop(config.shutdownTimeout * 1000);
    await storage.close();
    throw err;
  }
  log.info(
    { host: address.address, port: address.port, tlsPort: tlsAddress?.port, dataDir: config.dataDir },
    "wirechat listening",
  );

  let stopping: Promise<void> | undefined;
  return {
    host: address.address,
    port: address.port,
    tlsPort: tlsAddress?.port,
    services,
    listener,
    stop() {
      stopping ??= (async () => {
        services.hooks.stop();
        const deadline = Date.now() + config.shutdownTimeout * 1000;
        await listener.close(config.shutdownTimeout * 1000);
        // Storage closes only behind every user of it: handlers still running on
        // connections already closed, then background work (presence of the users just
        // disconnected, collects, purges), which stops at its next step.
        await dispatcher.idle(Math.max(0, deadline - Date.now()));
        await background.stop(Math.max(0, deadline - Date.now()));
        await messages.flushDerived();
        await storage.close();
        log.info("wirechat stopped");
      })();
      return stopping;
    },
  };
}
