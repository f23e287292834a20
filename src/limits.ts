// Limits the protocol sets on names and answers (PROTOCOL.md): one home for the
// server and the chat CLI, which must not load the server's modules (storage would
// bring LevelDB into a client).

/** The longest login or nick, in characters (code points). */
export const NAME_MAX = 64;

/** The most users one searchuser answer holds. */
export const SEARCH_LIMIT = 50;
