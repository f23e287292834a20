// A bounded cache of lists read from the database (a contact list, a prefix search's
// uids), kept exact by the writes they depend on.
//
// Storage tells the cache of every write to the spaces it watches (Storage.watch)
// twice: when the write joins a batch, and once that batch is written (or failed).
// Each write names a group, and each entry belongs to one (a contact list to its
// owner's group; every prefix search to the one group of its index). Both notices
// drop the group's entries, and a read does not fill the cache if a notice of its
// group came after the read began (its token). A read that saw the database before a
// write landed either ends before the write's second notice, which then drops what it
// filled, or after it, and fills nothing. So an entry is never older than the
// database, whatever order reads and writes interleave in.
//
// Bounds: entries by the total length of their lists and keys (a key weighs one item
// per KEY_CHARS_PER_ITEM characters: a search's key is its query), the least recently
// used evicted first; the record of recently written groups is cleared past 4× the
// entry bound, after which reads begun before the clear do not fill.

import type { SpaceWatcher } from "./db.js";

/** A key's characters that weigh as much as one item of a list. */
const KEY_CHARS_PER_ITEM = 32;

interface Entry<T> {
  list: readonly T[];
  weight: number;
  group: string;
}

export class ReadCache<T> implements SpaceWatcher {
  /** Entries by key, least recently used first. */
  private readonly entries = new Map<string, Entry<T>>();
  /** Group → the keys of its entries. */
  private readonly groups = new Map<string, Set<string>>();
  private weight = 0;
  /** Group → clock at its latest write notice. */
  private readonly touched = new Map<string, number>();
  private clock = 0;
  /** Reads begun before this clock do not fill (the touched record was cleared). */
  private floor = 0;

  constructor(
    /** Most items held, over all lists (and keys, see the top). */
    private readonly maxItems: number,
    /** The group a written key (without its space's prefix) belongs to. */
    private readonly groupOf: (key: string) => string,
  ) {}

  /**
   * The list at `key` (of `group`): remembered, or what `load` reads, kept unless a
   * write of `group` was noticed meanwhile. The caller gets its own copy.
   */
  async read(group: string, key: string, load: () => Promise<T[]>): Promise<T[]> {
    const hit = this.entries.get(key);
    if (hit !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit.list.slice();
    }
    const token = this.clock;
    const list = await load();
    this.fill(group, key, list.slice(), token);
    return list;
  }

  private fill(group: string, key: string, list: readonly T[], token: number): void {
    if (token < this.floor || (this.touched.get(group) ?? -1) > token) return;
    const weight = Math.max(list.length, 1) + Math.floor(key.length / KEY_CHARS_PER_ITEM);
    if (weight > this.maxItems) return;
    this.remove(key);
    this.entries.set(key, { list, weight, group });
    let keys = this.groups.get(group);
    if (keys === undefined) this.groups.set(group, (keys = new Set()));
    keys.add(key);
    this.weight += weight;
    while (this.weight > this.maxItems) this.remove(this.entries.keys().next().value as string);
  }

  queued(key: string): void {
    this.touch(this.groupOf(key));
  }

  written(key: string): void {
    this.touch(this.groupOf(key));
  }

  private touch(group: string): void {
    this.clock++;
    const keys = this.groups.get(group);
    if (keys !== undefined) for (const key of keys) this.remove(key);
    if (this.touched.size >= 4 * Math.max(this.entries.size, 1024)) {
      this.touched.clear();
      this.floor = this.clock;
    }
    this.touched.set(group, this.clock);
  }

  private remove(key: string): void {
    const had = this.entries.get(key);
    if (had === undefined) return;
    this.entries.delete(key);
    this.weight -= had.weight;
    const keys = this.groups.get(had.group);
    keys?.delete(key);
    if (keys?.size === 0) this.groups.delete(had.group);
  }
}
