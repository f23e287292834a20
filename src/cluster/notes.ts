// Core NATS notes between nodes (presence, door notices): not stored, lost while a node
// is away, so each listener only needs to read what arrives while it is connected.

import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import type { Logger } from "pino";

/**
 * Subscribes to `subject` and hands each note, parsed as JSON, to `receive`. A note
 * that cannot be read is logged (warn) and skipped; a subscription that ends with an
 * error (a permission NATS refuses) is logged (error), never thrown at the process;
 * `lines` are those two log messages.
 */
export function listenForNotes<T>(
  nc: NatsConnection,
  subject: string,
  lines: { unreadable: string; stopped: string },
  log: Logger,
  receive: (note: T) => void,
): Subscription {
  const sub = nc.subscribe(subject);
  void (async () => {
    try {
      for await (const m of sub) {
        try {
          receive(m.json<T>());
        } catch (err) {
          log.warn({ err }, lines.unreadable);
        }
      }
    } catch (err) {
      log.error({ err }, lines.stopped);
    }
  })();
  return sub;
}
