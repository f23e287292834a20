// The Peer of one HTTP request (the HTTP door's account routes): a session without a
// socket, so that a route runs native actions through the dispatcher like any
// connection, with the client's address for the password throttles. Its door reads
// the answers through its codec (a DialectCodec); what would be sent is dropped: an
// event for a session that lives for one request has no one to go to. It is `fleeting`:
// its login holds no connection (Peer.fleeting).

import { newPeerId, type Peer } from "../protocol/session.js";

export class RequestPeer implements Peer {
  readonly id = newPeerId();
  readonly congested = false;
  readonly fleeting = true;
  closed = false;

  constructor(
    readonly address: string,
    private readonly port: number,
    /** See Peer.sessionEndsWithRequest. */
    readonly sessionEndsWithRequest = false,
  ) {}

  get remote(): string {
    return `${this.address}:${this.port}`;
  }

  send(): void {}

  forgetConfirmations(): void {}

  drained(): Promise<boolean> {
    return Promise.resolve(!this.closed);
  }

  end(): void {
    this.closed = true;
  }

  pause(): void {}

  resume(): void {}
}
