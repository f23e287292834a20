// Request validation: one JSON Schema per action, compiled once by ajv at start-up.
// A failing request is turned into the protocol's codes: a missing or empty required
// string is 4, an over-limit size is 12 (when the schema says so with `errorCode`),
// anything else (wrong type, bad format) is 3.
//
// Every string in a request must be well-formed UTF-16: a lone surrogate (`"\ud800"`
// without its pair) becomes U+FFFD once encoded as UTF-8 for a LevelDB key, while the
// in-memory checks (unique claims, caches, cmid maps) would still see the raw string,
// so two different strings would share one key. compileSchema adds the check to every
// string schema, so no action can forget it; it fails with 3.

import { Ajv, type ErrorObject } from "ajv";
import { Code, ProtocolError } from "./codes.js";

const ajv = new Ajv({ allErrors: false, strict: true, allowUnionTypes: true, verbose: true });
// Metadata keyword: the status code a failure of this subschema's limits maps to.
ajv.addKeyword({ keyword: "errorCode", schemaType: "number" });
// With the u flag a surrogate pair is one code point; only a lone half is category Cs.
const LONE_SURROGATE = /\p{Cs}/u;
/** Whether `text` holds a lone surrogate (the JSON of a frame may; no string field may). */
export function hasLoneSurrogate(text: string): boolean {
  return LONE_SURROGATE.test(text);
}
ajv.addKeyword({
  keyword: "wellFormed",
  type: "string",
  schemaType: "boolean",
  // After the length limits (a 12 stays a 12), before a pattern: a login or nick with
  // a lone surrogate is told so, not that it does not match the pattern of logins.
  before: "pattern",
  errors: false,
  validate: (on: boolean, data: string) => !on || !hasLoneSurrogate(data),
});

export type Validator = (data: unknown) => ProtocolError | undefined;

export function compileSchema(schema: object): Validator {
  const validate = ajv.compile(withWellFormedStrings(schema) as object);
  return (data) => (validate(data) ? undefined : toProtocolError(validate.errors?.[0]));
}

/**
 * A frame of an action's common shape (ActionSpec.fastFields, protocol/native-decode.ts)
 * holds only those fields, each a string of printable ASCII without a backslash, so
 * every string is well formed and its length is its count of code points: of the
 * schema, only the fields' length limits are left to check. This returns that check
 * (true: `data` passes the schema; false: the schema's validator says why), or
 * undefined when the schema asks more of such a frame (a required field, a pattern, an
 * enum…), whose frames then go through the validator like any other.
 *
 * Run for every `message` of the hot path: ajv's validator (a code point count and a
 * surrogate search per string) was 1.3 % of the server's CPU in S1.
 */
export function compileFastCheck(schema: object, fields: readonly string[]): ((data: Record<string, string>) => boolean) | undefined {
  const top = schema as { type?: unknown; properties?: Record<string, unknown> } & Record<string, unknown>;
  if (Object.keys(top).some((k) => k !== "type" && k !== "properties") || top.type !== "object") return undefined;
  const bounds: [field: string, min: number, max: number][] = [];
  for (const f of fields) {
    const sub = top.properties?.[f] as Record<string, unknown> | undefined;
    if (sub === undefined || sub.type !== "string") return undefined;
    if (Object.keys(sub).some((k) => k !== "type" && k !== "minLength" && k !== "maxLength")) return undefined;
    const min = sub.minLength ?? 0;
    const max = sub.maxLength ?? Infinity;
    if (!Number.isSafeInteger(min) || !(Number.isSafeInteger(max) || max === Infinity)) return undefined;
    bounds.push([f, min as number, max as number]);
  }
  // Compiled like ajv's validators, to named property loads (a loop over the field
  // names made each load a keyed one, and cost as much as the validator it replaces).
  const checks = bounds.map(
    ([f, min, max]) => `v = d[${JSON.stringify(f)}]; if (v !== undefined && (v.length < ${min} || v.length > ${max})) return false;`,
  );
  return new Function("d", `let v;\n${checks.join("\n")}\nreturn true;`) as (data: Record<string, string>) => boolean;
}

/** A copy of `schema` in which every subschema that admits a string also requires it well formed. */
function withWellFormedStrings(schema: unknown): unknown {
  if (typeof schema !== "object" || schema === null || Array.isArray(schema)) return schema;
  const out: Record<string, unknown> = { ...schema };
  for (const [k, v] of Object.entries(schema)) {
    if (SUBSCHEMA.has(k)) out[k] = Array.isArray(v) ? v.map(withWellFormedStrings) : withWellFormedStrings(v);
    else if (SUBSCHEMA_MAP.has(k) && typeof v === "object" && v !== null) {
      out[k] = Object.fromEntries(Object.entries(v).map(([name, sub]) => [name, withWellFormedStrings(sub)]));
    }
  }
  const type = (schema as { type?: unknown }).type;
  if ((type === "string" || (Array.isArray(type) && type.includes("string"))) && out.wellFormed === undefined) out.wellFormed = true;
  return out;
}

/** Keywords whose value is a subschema (or a list of them), and those with a map of them. */
const SUBSCHEMA = new Set(["items", "additionalProperties", "not", "anyOf", "oneOf", "allOf", "if", "then", "else", "contains"]);
const SUBSCHEMA_MAP = new Set(["properties", "patternProperties", "$defs", "definitions"]);

function fieldName(e: ErrorObject): string {
  const path = e.instancePath
    .split("/")
    .slice(1)
    .map((p) => (/^\d+$/.test(p) ? `[${p}]` : `.${p}`))
    .join("")
    .replace(/^\./, "");
  if (e.keyword === "required") {
    const missing = (e.params as { missingProperty: string }).missingProperty;
    return path ? `${path}.${missing}` : missing;
  }
  return path || "data";
}

function toProtocolError(e: ErrorObject | undefined): ProtocolError {
  if (!e) return new ProtocolError(Code.InvalidData);
  const field = fieldName(e);
  const override = (e.parentSchema as { errorCode?: number } | undefined)?.errorCode;
  switch (e.keyword) {
    case "required":
      return new ProtocolError(Code.EmptyField, `'${field}' is required`);
    case "minLength":
      if ((e.params as { limit: number }).limit === 1) {
        return new ProtocolError(Code.EmptyField, `'${field}' must not be empty`);
      }
      break;
    case "maxLength":
    case "maxItems":
      if (override === Code.TooLarge) return new ProtocolError(Code.TooLarge, `'${field}' ${e.message}`);
      break;
    case "wellFormed":
      return new ProtocolError(Code.InvalidData, `'${field}' is not well-formed Unicode (it holds a lone surrogate)`);
    case "type":
      return new ProtocolError(Code.InvalidData, `'${field}' must be ${withArticle((e.params as { type: string | string[] }).type)}`);
  }
  return new ProtocolError(Code.InvalidData, `'${field}' ${e.message ?? "is invalid"}`);
}

function withArticle(type: string | string[]): string {
  // ajv reports a union type as an array (["string","number"]) or a comma list.
  const t = (Array.isArray(type) ? type.join(",") : String(type)).replace(/,/g, " or ");
  return /^[aeiou]/.test(t) ? `an ${t}` : `a ${t}`;
}

/**
 * Envelope fields every action's schema accepts (the dispatcher adds them): the seed's
 * clients send their uid as `cid` and their session as `sid` with every request. Typed
 * here so that the auth gate only ever compares strings and numbers.
 */
export const ENVELOPE = {
  cid: { type: ["string", "integer", "null"], maxLength: 64 },
  sid: { type: ["string", "null"], maxLength: 128 },
} as const;

// Schema fragments shared by the feature modules.
export const requiredString = (max: number) => ({ type: "string", minLength: 1, maxLength: max }) as const;
export const optionalString = (max: number) => ({ type: "string", maxLength: max }) as const;
