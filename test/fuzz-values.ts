// Values the property tests of every door draw from, in one place.

/** Keys that mean something to JavaScript objects. */
export const PROTO_KEYS = ["__proto__", "constructor", "toString", "valueOf", "hasOwnProperty", "prototype", "toJSON", "length"];

/** Objects whose keys have broken servers before (a String() of them throws, a prototype is set). */
export const NASTY_OBJECTS = [
  '{"toString":1,"valueOf":1}',
  '{"toString":{},"valueOf":[]}',
  '{"__proto__":{"admin":true,"status":0}}',
  '{"constructor":{"prototype":{"polluted":1}}}',
];
