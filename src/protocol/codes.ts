// The one table of protocol status codes and their default texts.
// Codes 0–8 are seed 004's (its Go constants keep their names here), 9–10 come from
// the channel edition of the same protocol, 11–16 are wirechat's own.

export enum Code {
  OK = 0,
  AlreadyExist = 1,
  InvalidPass = 2,
  InvalidData = 3,
  EmptyField = 4,
  AlreadyRegister = 5,
  NeedAuth = 6,
  NeedRegister = 7,
  UserNotFound = 8,
  ChannelNotFound = 9,
  InvalidChannel = 10,
  UnknownAction = 11,
  TooLarge = 12,
  RateLimited = 13,
  MessageNotFound = 14,
  Forbidden = 15,
  Unavailable = 16,
}

export interface CodeInfo {
  code: Code;
  name: string;
  text: string;
}

export const CODES: readonly CodeInfo[] = [
  { code: Code.OK, name: "ErrOK", text: "OK" },
  { code: Code.AlreadyExist, name: "ErrAlreadyExist", text: "already exists" },
  { code: Code.InvalidPass, name: "ErrInvalidPass", text: "invalid login or password" },
  { code: Code.InvalidData, name: "ErrInvalidData", text: "invalid data" },
  { code: Code.EmptyField, name: "ErrEmptyField", text: "a required field is empty" },
  { code: Code.AlreadyRegister, name: "ErrAlreadyRegister", text: "already authenticated on this connection" },
  { code: Code.NeedAuth, name: "ErrNeedAuth", text: "authentication required" },
  { code: Code.NeedRegister, name: "ErrNeedRegister", text: "no such login; register first" },
  { code: Code.UserNotFound, name: "ErrUserNotFound", text: "user not found" },
  { code: Code.ChannelNotFound, name: "ErrChannelNotFound", text: "channel not found" },
  { code: Code.InvalidChannel, name: "ErrInvalidChannel", text: "not a member of that channel" },
  { code: Code.UnknownAction, name: "ErrUnknownAction", text: "unknown action" },
  { code: Code.TooLarge, name: "ErrTooLarge", text: "over the size limit" },
  { code: Code.RateLimited, name: "ErrRateLimited", text: "too many requests; retry later" },
  { code: Code.MessageNotFound, name: "ErrMessageNotFound", text: "message not found" },
  { code: Code.Forbidden, name: "ErrForbidden", text: "not allowed" },
  { code: Code.Unavailable, name: "ErrUnavailable", text: "the server could not complete the request" },
];

export function codeText(code: Code): string {
  return CODES[code].text;
}

/**
 * A refusal a handler throws; the dispatcher turns it into the reply's status and
 * error: its code and text go to the client. It carries no stack trace: it is an
 * outcome, not a fault (none is logged with one), and a captured trace holds the
 * closures it was thrown through, with what they hold. A
 * cluster node refusing pipelined 800 KB messages while its engine stalled kept each
 * message's body alive through its refusal's trace, waiting in line for its reply, and
 * ran out of memory (255 MB of bodies at a 256 MB heap, 600 messages).
 */
export class ProtocolError extends Error {
  readonly code: Code;
  constructor(code: Code, message: string = codeText(code)) {
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    super(message); // Error's constructor does not throw: the limit is put back
    Error.stackTraceLimit = limit;
    this.code = code;
    this.name = "ProtocolError";
  }
}
