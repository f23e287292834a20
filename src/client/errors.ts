// The one error type the client rejects with. Server refusals carry the reply's
// `status` (PROTOCOL.md §4, 1–16) and `error` text; failures that happen on this side
// of the wire use negative codes so callers can switch on `code` alone.

import { CODES } from "../protocol/codes.js";

export const ClientCode = {
  /** The connection closed (or was never open) before the reply came. */
  Closed: -1,
  /** No reply within the request's timeout. The connection stays usable. */
  Timeout: -2,
  /** The server sent something this client cannot make sense of. */
  Protocol: -3,
  /** The request was aborted locally: its attachment source failed mid-frame. */
  Aborted: -4,
} as const;

/** Names of the server's status codes, PROTOCOL.md §4 (the server's own table). */
export const StatusName: Readonly<Record<number, string>> = Object.fromEntries(CODES.map((c) => [c.code, c.name]));

export class WirechatError extends Error {
  override readonly name = "WirechatError";
  constructor(
    /** The reply's `status`, or a negative ClientCode. */
    readonly code: number,
    /** The server's `error` text, or a description of the local failure. */
    readonly serverMessage: string,
    /** The request's action, when the error belongs to one. */
    readonly action?: string,
  ) {
    super(action ? `${action}: ${serverMessage} (status ${code})` : `${serverMessage} (status ${code})`);
  }

  /**
   * A message whose fate is unknown (no reply came: a timeout, a connection lost after
   * it was written): the cmid it was sent with. Sent again with that cmid
   * (sendMessage/sendAttachment `{cmid}`), it is stored once: the server answers a
   * second copy with the first one's mid.
   */
  cmid: string | undefined;

  /** True when the server answered with a non-zero status (as opposed to a local failure). */
  get fromServer(): boolean {
    return this.code > 0;
  }
}
