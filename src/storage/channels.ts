// Channels, their unique names and their stored membership (both ways).

import { del, put, type BatchOp, type Counter, type Storage } from "./db.js";
import { keyTail, pair, prefixRange, type ChannelRecord, type Spaces } from "./layout.js";

export class ChannelStore {
  private readonly s: Spaces;
  constructor(
    storage: Storage,
    private readonly ids: Counter,
  ) {
    this.s = storage.spaces;
  }

  nextChid(): string {
    return String(this.ids.next());
  }

  async get(chid: string): Promise<ChannelRecord | undefined> {
    return (await this.s.channels.get(chid)) as ChannelRecord | undefined;
  }

  async byName(name: string): Promise<string | undefined> {
    return (await this.s.chname.get(name.toLowerCase())) as string | undefined;
  }

  async all(): Promise<ChannelRecord[]> {
    return (await this.s.channels.values().all()) as ChannelRecord[];
  }

  createOps(c: ChannelRecord): BatchOp[] {
    return [put(this.s.channels, c.chid, c), put(this.s.chname, c.name.toLowerCase(), c.chid), ...this.joinOps(c.chid, c.owner, c.created)];
  }

  removeOps(c: ChannelRecord, members: readonly string[]): BatchOp[] {
    const ops = [del(this.s.channels, c.chid), del(this.s.chname, c.name.toLowerCase())];
    for (const uid of members) ops.push(...this.leaveOps(c.chid, uid));
    return ops;
  }

  cachedMembers(_chid: string): ReadonlySet<string> | undefined {
    return undefined;
  }
  joined(_chid: string, _uid: string): void {}
  left(_chid: string, _uid: string): void {}
  removed(_chid: string): void {}

  async members(chid: string): Promise<string[]> {
    return (await this.s.members.keys(prefixRange(chid)).all()).map(keyTail);
  }

  async isMember(chid: string, uid: string): Promise<boolean> {
    return (await this.s.members.get(pair(chid, uid))) !== undefined;
  }

  async channelsOf(uid: string): Promise<string[]> {
    return (await this.s.memberof.keys(prefixRange(uid)).all()).map(keyTail);
  }

  joinOps(chid: string, uid: string, time: number): BatchOp[] {
    return [put(this.s.members, pair(chid, uid), time), put(this.s.memberof, pair(uid, chid), 1)];
  }

  leaveOps(chid: string, uid: string): BatchOp[] {
    return [del(this.s.members, pair(chid, uid)), del(this.s.memberof, pair(uid, chid))];
  }
}
