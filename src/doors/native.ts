// The native door: seed 004's NDJSON over TCP (and TLS). Frames go to the dispatcher's
// own decoder; one codec serves every connection.

import { NativeCodec } from "../protocol/codec.js";
import type { Code } from "../protocol/codes.js";
import type { Dispatcher } from "../protocol/dispatcher.js";
import type { Front } from "../transport/listener.js";

export function nativeFront(dispatcher: Dispatcher, codec: NativeCodec): Front {
  return {
    name: "native",
    streams: true,
    codec: () => codec,
    greeting: () => codec.welcome(),
    refusal: (code: Code, text: string) => codec.error("unknown", code, text),
    frame: (s, bytes, upload, ascii) => dispatcher.frame(s, bytes, upload, ascii),
    fast: dispatcher.fastFrames,
    decoded: (s, value, size) => dispatcher.decoded(s, value, size),
    reject: (s, code, reason, action) => dispatcher.reject(s, code, reason, action),
    inputEnded: (s) => dispatcher.inputEnded(s),
  };
}
