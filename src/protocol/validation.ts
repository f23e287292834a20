// Request validation: one JSON Schema per action, compiled once by ajv at start-up.
// A failing request is turned into the protocol's codes: a missing or empty required
// string is 4, an over-limit size is 12 (when the schema says so with `errorCode`),
// anything else (wrong type, bad format) is 3.

import { Ajv, type ErrorObject } from "ajv";
import { Code, ProtocolError } from "./codes.js";

const ajv = new Ajv({ allErrors: false, strict: true, allowUnionTypes: true, verbose: true });
// Metadata keyword: the status code a failure of this subschema's limits maps to.
ajv.addKeyword({ keyword: "errorCode", schemaType: "number" });

export type Validator = (data: unknown) => ProtocolError | undefined;

export function compileSchema(schema: object): Validator {
  const validate = ajv.compile(schema);
  return (data) => (validate(data) ? undefined : toProtocolError(validate.errors?.[0]));
}

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
