// The seams a cluster transport will implement, listed in one place. Each has today's
// single-process implementation beside it; server.ts picks the implementations.
//
//   IdSource    where message and channel ids come from (storage/db.ts Counter)
//   KeyedLock   per-key serialisation: work on one key runs one at a time
//   Delivery    hand an event to every live connection of a set of users
//               (protocol/router.ts implements it for the connections of this process)

/** Monotonic ids. Local: a counter kept in LevelDB `meta`, written with each batch. */
export interface IdSource {
  next(): number;
}

/**
 * Runs `fn` after every earlier call for the same key has settled, so that two
 * read-modify-write sequences on one key never interleave. The returned promise
 * settles like `fn`'s.
 */
export interface KeyedLock {
  run<T>(key: string, fn: () => Promise<T>): Promise<T>;
}

/** In-process KeyedLock: a promise chain per key, dropped once its queue is empty. */
export class LocalLock implements KeyedLock {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.tails.get(key);
    const next = prev ? prev.then(fn, fn) : fn();
    const tail = next.then(
      () => {},
      () => {},
    );
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return next;
  }

}
