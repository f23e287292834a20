#!/usr/bin/env node
// Command-line entry point: `wirechat [options]`, see --help.

import { ConfigError, helpText, parseArgs } from "./config.js";
import { startServer } from "./server.js";
import { ThreadPriority } from "./thread-priority.js";

async function main(): Promise<void> {
  let parsed;
  try {
    parsed = parseArgs(process.argv.slice(2), process.env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`wirechat: ${err.message}\n`);
    process.exit(2);
  }
  if (parsed.help) {
    process.stdout.write(helpText() + "\n");
    return;
  }
  const server = await startServer(parsed.config);
  // The process is ours: its background threads yield the core to the event loop.
  const priority = new ThreadPriority(parsed.config.backgroundNice, server.services.log);
  priority.start();
  const shutdown = (signal: string) => {
    server.services.log.info({ signal }, "shutting down");
    priority.stop();
    server.stop().then(
      () => process.exit(0),
      (err) => {
        server.services.log.error({ err }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  process.once("SIGTERM", () => shutdown("SIGTERM"));
  process.once("SIGINT", () => shutdown("SIGINT"));
}

main().catch((err) => {
  process.stderr.write(`wirechat: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
