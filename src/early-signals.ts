// Signals that come while the server's modules load.
//
// Loading the server's modules (Fastify, pino, LevelDB's binding, the features) takes
// a few hundred milliseconds, and until a handler is installed node's default for
// SIGTERM, SIGINT and SIGHUP is to end the process there and then: a `systemctl
// reload` or a stop right after a start killed it (exit 129 or 143, nothing logged).
// The entry point (main.ts) installs these first, with nothing else loaded, when it is
// to run the server: they note a stop and ignore SIGHUP, and serve() takes what they
// noted once its own handlers are in place (run.ts). The operator commands and the
// chat client keep node's defaults (Ctrl-C ends them).

let noted: { signal: NodeJS.Signals; at: number } | undefined;

/**
 * How soon the same signal again is taken for the first one delivered twice rather
 * than a second one (which exits at once): under `npm start`, a Ctrl-C reaches the
 * server from the terminal (its process group) and again from npm, which passes its
 * own on to its child, a few milliseconds apart.
 */
const REPEAT_MS = 100;

/** Whether `signal` at this moment is `first` (given at `firstAt`, unix ms) delivered again. */
export function repeated(signal: string, first: string, firstAt: number): boolean {
  return signal === first && Date.now() - firstAt < REPEAT_MS;
}

function note(signal: NodeJS.Signals): void {
  if (noted !== undefined) {
    if (repeated(signal, noted.signal, noted.at)) return;
    // A second stop signal before the server is up: the operator does not want to wait.
    process.exit(1);
  }
  noted = { signal, at: Date.now() };
}

function ignore(): void {}

export function installEarlySignals(): void {
  process.on("SIGTERM", note);
  process.on("SIGINT", note);
  process.on("SIGHUP", ignore);
}

/** Removes the early handlers (call once the real ones are installed): the stop signal they noted, if any, and when. */
export function takeEarlySignals(): { signal: NodeJS.Signals; at: number } | undefined {
  process.off("SIGTERM", note);
  process.off("SIGINT", note);
  process.off("SIGHUP", ignore);
  return noted;
}
