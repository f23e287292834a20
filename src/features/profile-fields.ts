// Normalisation of the profile fields that are unique and searchable (email, phone),
// and the base64 check for pictures. Shared by profiles (which stores them) and
// contacts (whose import looks them up), so both agree on what "the same" means; and
// what a login may hold (register's schema, and the HTTP chat door, whose logins are emails).

import { NAME_MAX } from "../limits.js";
import { Code, ProtocolError } from "../protocol/codes.js";
import { nameKey } from "../storage/users.js";

/**
 * What a login may hold: letters (any script, with their combining marks: Devanagari's
 * vowel signs, Thai's tone marks), digits and _ . @ + - (so an email address works
 * too); a mark never first. Without marks, "राम" could not be a login.
 */
export const LOGIN_PATTERN = "^[\\p{L}\\p{N}_.@+\\-][\\p{L}\\p{M}\\p{N}_.@+\\-]*$";
const LOGIN_RE = new RegExp(LOGIN_PATTERN, "u");

/** Whether `text` may be a login: LOGIN_PATTERN, composed, at most NAME_MAX characters. */
export function isLogin(text: string): boolean {
  return LOGIN_RE.test(text) && text.normalize("NFC") === text && [...text].length <= NAME_MAX;
}

/**
 * 3 unless a new login is written composed (Unicode NFC): "José" typed with a combining
 * accent would otherwise be a second account of the same name, told apart by nothing a
 * reader can see. (Only new logins: one made before marks were allowed is NFC already,
 * or is looked up as it was written.)
 */
export function composedLogin(login: string): void {
  if (login.normalize("NFC") !== login) {
    throw new ProtocolError(Code.InvalidData, "'login' must be written composed (Unicode NFC): a combining mark that has a composed form must be written as it");
  }
}

/**
 * 3 for a nick that shows nothing: only default-ignorable code points (zero-width
 * spaces and joiners, bidi marks...), whose name key (nameKey) is empty.
 */
export function visibleNick(nick: string): void {
  if (nameKey(nick) === "") throw new ProtocolError(Code.InvalidData, "'nick' must show something: it holds only invisible characters");
}

/**
 * The name the doors that list users by login (e_chat 002, rooms 001) show for an
 * account to other users: its login, unless the login is an address (a seed-003
 * account's login is its email, which nobody else is to see): then its nick. Logins
 * and nicks are one namespace, so it names the account as surely, and those doors take
 * a nick wherever they take a login.
 */
export function shownLogin(u: { login: string; nick: string }): string {
  return u.login.includes("@") ? u.nick : u.login;
}

/**
 * More characters (code points, as the schemas count them) than any login has; a string
 * over twice as many UTF-16 units is, without counting.
 */
export function longerThanAnyLogin(text: string): boolean {
  return text.length > 2 * NAME_MAX || [...text].length > NAME_MAX;
}

/** Lower-cased and trimmed; undefined when it does not look like an address. */
export function normaliseEmail(raw: string): string | undefined {
  const e = raw.trim().toLowerCase();
  return /^[^\s@]+@[^\s@]+$/.test(e) ? e : undefined;
}

/** Digits with an optional leading '+', separators dropped; undefined when not a number. */
export function normalisePhone(raw: string): string | undefined {
  const p = raw.replace(/[\s\-().]/g, "");
  return /^\+?\d{3,20}$/.test(p) ? p : undefined;
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

export function isBase64(s: string): boolean {
  return BASE64.test(s);
}
