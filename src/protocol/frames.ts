// Outbound frames: one compact JSON object and a single '\n'. JSON.stringify escapes
// every control character, so no raw newline can appear inside a frame.

import { Code, codeText } from "./codes.js";

export type Fields = Record<string, unknown>;

export function frame(action: string, data: Fields): string {
  return JSON.stringify({ action, data }) + "\n";
}

export function replyFrame(action: string, fields: Fields): string {
  return frame(action, { status: Code.OK, error: codeText(Code.OK), ...fields });
}

export function errorFrame(action: string, code: Code, error: string = codeText(code)): string {
  return frame(action, { status: code, error });
}

export function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/** How much of a frame is searched for its action name when it cannot be parsed. */
export const ACTION_PEEK_BYTES = 4096;
const ACTION_RE = /"action"\s*:\s*"([A-Za-z0-9_]{1,64})"/;

/** The action named in (the start of) a frame that could not be parsed, if readable. */
export function peekAction(bytes: Buffer | undefined): string | undefined {
  if (!bytes) return undefined;
  const m = ACTION_RE.exec(bytes.toString("latin1", 0, Math.min(bytes.length, ACTION_PEEK_BYTES)));
  return m ? m[1] : undefined;
}

export const WELCOME_TEXT = "Welcome to wirechat. Send one JSON object per line; try {\"action\":\"hello\"}";

/** The first frame on every connection. Seed 004 puts its fields at the top level. */
export function welcomeFrame(): string {
  return JSON.stringify({ action: "welcome", message: WELCOME_TEXT, time: nowSeconds() }) + "\n";
}
