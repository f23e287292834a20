// Normalisation of the profile fields that are unique and searchable (email, phone),
// and the base64 check for pictures. Shared by profiles (which stores them) and
// contacts (whose import looks them up), so both agree on what "the same" means.

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
