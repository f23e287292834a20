// Shapes of what the server sends, as PROTOCOL.md documents them. Only the fields a
// client relies on are typed; everything else stays reachable through the index
// signatures, so a newer server adding a field breaks nothing.

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** Any reply's data: `status` and `error` always, the action's fields on success. */
export interface ReplyData {
  status: number;
  error: string;
  [k: string]: any;
}

/**
 * What `request()` resolves with: the reply's data (status 0 guaranteed); a `message`
 * with a `cmid` that the client sent again after a reconnect also has `resent: true`.
 */
export type Reply = ReplyData;

export interface WelcomeFrame {
  action: "welcome";
  message: string;
  time: number;
}

export interface Attachment {
  mime: string;
  /** base64, "" when the message has none. */
  data: string;
}

/** `ev_message`: a direct message carries `to`, a channel message `chid`. */
export interface MessageEvent {
  mid: string;
  from: string;
  nick: string;
  body: string;
  time: number;
  attach: Attachment;
  to?: string;
  chid?: string;
  [k: string]: any;
}

/** A `history` element: `attach` only when there is one, `edited` only when edited. */
export interface HistoryMessage {
  mid: string;
  from: string;
  nick: string;
  body: string;
  time: number;
  attach?: Attachment;
  edited?: number;
  [k: string]: any;
}

export interface AuthInfo {
  sid: string;
  uid: string;
  cid: string;
  nick: string;
}

export interface HelloInfo extends ReplyData {
  server: string;
  version: string;
  features: string[];
  limits: { frame: number; attach: number; picture: number; import: number };
  ack: boolean;
}

export interface ChannelMember {
  uid: string;
  nick: string;
  online: boolean;
}

export interface ChannelInfo {
  chid: string;
  name: string;
  descr: string;
  online: number;
  /** Only on a private channel (listed to its members alone). */
  private?: true;
}

export interface Contact {
  uid: string;
  nick: string;
  email: string;
  phone: string;
  picture: string;
  user_status: string;
  online: boolean;
}

/** Every frame the server sends on its own (actions `ev_*`). */
export interface WirechatEvent {
  action: string;
  data: any;
}

/** Where a message goes: a user or a channel. */
export type Target = { uid: string } | { channel: string };
