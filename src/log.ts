// Loggers that outlive a level change.
//
// A pino child made with a level of its own keeps it (one made without follows its
// parent's): the HTTP door's and the admin port's Fastify loggers are given a floor of
// warn (Fastify logs every request at info), so SIGHUP's new --log-level did not reach
// them, nor Fastify's own logger, a child it makes of the one it is given at start-up.

import type { Level, Logger } from "pino";

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
