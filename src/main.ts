#!/usr/bin/env node
// Command-line entry point: `wirechat [serve] [options]` runs the server; the other
// commands (`wirechat help`) operate it or chat with it.

import { COMMAND_HELP, COMMANDS, runCommand } from "./cli/commands.js";
import { ConfigError, helpText, packageVersion, parseArgs, type ParsedArgs } from "./config.js";
import { startServer } from "./server.js";
import { ThreadPriority } from "./thread-priority.js";

async function serve(argv: string[]): Promise<void> {
  let parsed: ParsedArgs;
  try {
    parsed = parseArgs(argv, process.env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`wirechat: ${err.message}\n`);
    process.exit(2);
  }
  if (parsed.help) {
    process.stdout.write(helpText() + "\n");
    return;
  }
  if (parsed.version) {
    process.stdout.write(`wirechat ${packageVersion()}\n`);
    return;
  }
  const server = await startServer(parsed.config);
  const log = server.services.log;
  // The process is ours: its background threads yield the core to the event loop.
  const priority = new ThreadPriority(parsed.config.backgroundNice, log);
  priority.start();
  let stopping = false;
  const shutdown = (signal: string) => {
    if (stopping) {
      // The second signal: the operator does not want to wait.
      log.warn({ signal }, "second signal: exiting now, without finishing the shutdown");
      process.exit(1);
    }
    stopping = true;
    log.info({ signal }, "shutting down");
    priority.stop();
    server.stop().then(
      () => process.exit(0),
      (err) => {
        log.error({ err }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
  // SIGHUP reloads (the config file's reloadable settings, the TLS certificate); it
  // never stops the server, and a bad file leaves everything as it was.
  process.on("SIGHUP", () => {
    try {
      server.reload(parseArgs(argv, process.env).config);
    } catch (err) {
      log.error({ err: err instanceof ConfigError ? err.message : err }, "reload failed; the settings are unchanged");
    }
  });
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const command = argv[0];
  if (command === undefined || command.startsWith("-") || command === "serve") {
    return serve(command === "serve" ? argv.slice(1) : argv);
  }
  if (command === "help") {
    process.stdout.write(argv[1] === undefined || argv[1] === "serve" ? `${helpText()}\n\n${COMMAND_HELP}\n` : `${COMMAND_HELP}\n`);
    return;
  }
  if (command === "chat") {
    const { chatCommand } = await import("./cli/chat.js");
    process.exitCode = await chatCommand(argv.slice(1));
    return;
  }
  if (!(COMMANDS as readonly string[]).includes(command)) {
    process.stderr.write(`wirechat: unknown command '${command}' (see wirechat help)\n`);
    process.exit(2);
  }
  try {
    process.exitCode = await runCommand(command, argv.slice(1));
  } catch (err) {
    process.stderr.write(`wirechat ${command}: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = err instanceof ConfigError ? 2 : 1;
  }
}

main().catch((err) => {
  // A start-up failure says why, and what caused it (a locked database, a port in use).
  const cause = err instanceof Error && err.cause instanceof Error ? ` (${err.cause.message})` : "";
  process.stderr.write(`wirechat: ${err instanceof Error ? err.message : String(err)}${cause}\n`);
  process.exit(1);
});
