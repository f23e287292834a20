#!/usr/bin/env node
// Command-line entry point: `wirechat [serve] [options]` runs the server; the other
// commands (`wirechat help`) operate it or chat with it (run.ts). When it is to run the
// server, its signal handlers come before the rest of the program loads
// (early-signals.ts).

import { installEarlySignals } from "./early-signals.js";

const command = process.argv[2];
if (command === undefined || command.startsWith("-") || command === "serve") installEarlySignals();
await import("./run.js");
