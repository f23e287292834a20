// Loggers that outlive a level change.
//
// A pino child made with a level of its own keeps it (one made without follows its
// parent's): the HTTP door's and the admin port's Fastify loggers are given a floor of
// warn (Fastify logs every request at info), so SIGHUP's new --log-level did not reach
// them, nor Fastify's own logger, a child it makes of the one it is given at start-up.

import { pino, type DestinationStream, type Level, type Logger } from "pino";

/**
 * Gives `follower` log's level now and whenever log's level is set, never below
 * `floor` (the Fastify loggers log every request at info: their floor is "warn").
 * Returns what stops it (a server that closes while its logger lives on).
 */
export function followLevel(log: Logger, follower: Logger, floor?: Level): () => void {
  const set = (): void => {
    follower.level = floor !== undefined && log.levelVal < log.levels.values[floor] ? floor : log.level;
  };
  // A child emits through its parent's listeners too (pino children share them): only
  // log's own change counts, or setting the follower's level would call this again.
  const onChange = (_lvl: string, _val: number, _prevLvl: string, _prevVal: number, from: Logger): void => {
    if (from === log) set();
  };
  set();
  log.on("level-change", onChange);
  return () => void log.off("level-change", onChange);
}

/**
 * Log text waiting for a slow stdout at most; past it, lines are dropped (and counted).
 * (Test hook: WIRECHAT_TEST_LOG_BUFFER_BYTES sets it, so that a test fills it quickly.)
 */
export const LOG_BUFFER_BYTES = Math.max(0, Number(process.env.WIRECHAT_TEST_LOG_BUFFER_BYTES ?? 0) || 0) || 16 * 1024 * 1024;
/** Writes to stdout refused in a row (EAGAIN, 100 ms apart) before a waiting flush gives up. */
const LOG_EAGAIN_RETRIES = 20;

/** Log lines dropped because stdout was not taking them (wirechat_log_lines_dropped_total). */
export const logDrops = { lines: 0 };

/**
 * The server's log destination: pino's own asynchronous stdout writer (sonic-boom), with
 * a bound. Unbounded, a stdout that stops taking text (a pipe to a stalled reader: a
 * pager, a hung log shipper) grew the server's heap by every line logged, and at exit
 * pino's flush waited on it for ever, so a SIGTERM never ended the process. Now: at most
 * LOG_BUFFER_BYTES wait, the lines past it are dropped and counted, and a flush (at
 * exit) gives up after LOG_EAGAIN_RETRIES refused writes in a row. A pipe is made
 * non-blocking first (as process.stdout makes it), else a write to a stalled reader
 * blocks a thread, and the exit, for ever.
 */
export function logDestination(): DestinationStream {
  if (!process.stdout.isTTY) void process.stdout.fd;
  let refused = 0;
  const dest = pino.destination({ dest: 1, sync: false, maxLength: LOG_BUFFER_BYTES, retryEAGAIN: () => ++refused <= LOG_EAGAIN_RETRIES });
  dest.on("write", () => (refused = 0));
  dest.on("drop", () => logDrops.lines++);
  // A write given up (EAGAIN past the retries): the lines wait for the next one.
  dest.on("error", () => {});
  // pino flushes at exit: given up, the rest of the log is lost, and said nothing more
  // of (it threw EAGAIN from the exit handler, a stack trace on stderr).
  const flushSync = dest.flushSync.bind(dest);
  dest.flushSync = () => {
    try {
      flushSync();
    } catch {
      // stdout is not taking the log
    }
  };
  return dest;
}
