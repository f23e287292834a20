// Making a directory and its missing parents (mkdir -p), without Node's own recursive
// mkdir: given a path under /proc (or past a dangling symlink, or on a stale mount)
// it never returns. procfs answers ENOENT to making a child it cannot hold, Node takes
// that for a missing parent, makes the parent (EEXIST: there) and tries the child
// again, forever: `mkdirSync("/proc/x", { recursive: true })` spins the event loop
// at 100 % (a POST /backup naming such a directory froze the whole server), and the
// promise version never settles. Here a child that is still "not found" once its
// parent exists is an error.

import { mkdirSync, statSync } from "node:fs";
import { mkdir, stat } from "node:fs/promises";
import path from "node:path";

function code(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException).code;
}

/** Makes `dir` and its missing parents; returns the first directory made (undefined: none). */
export function makeDirSync(dir: string, mode?: number): string | undefined {
  const abs = path.resolve(dir);
  try {
    return makeOneSync(abs, mode) ? abs : undefined;
  } catch (err) {
    const parent = path.dirname(abs);
    if (code(err) !== "ENOENT" || parent === abs) throw err;
    const first = makeDirSync(parent, mode);
    // Its parent is there now: a second ENOENT is final.
    const made = makeOneSync(abs, mode);
    return first ?? (made ? abs : undefined);
  }
}

/** makeDirSync, without blocking the event loop. */
export async function makeDir(dir: string, mode?: number): Promise<string | undefined> {
  const abs = path.resolve(dir);
  try {
    return (await makeOne(abs, mode)) ? abs : undefined;
  } catch (err) {
    const parent = path.dirname(abs);
    if (code(err) !== "ENOENT" || parent === abs) throw err;
    const first = await makeDir(parent, mode);
    const made = await makeOne(abs, mode);
    return first ?? (made ? abs : undefined);
  }
}

/** One mkdir: true when it made `abs`, false when a directory is there already. */
function makeOneSync(abs: string, mode?: number): boolean {
  try {
    mkdirSync(abs, { mode });
    return true;
  } catch (err) {
    if (code(err) === "EEXIST" && statSync(abs).isDirectory()) return false;
    throw err;
  }
}

async function makeOne(abs: string, mode?: number): Promise<boolean> {
  try {
    await mkdir(abs, { mode });
    return true;
  } catch (err) {
    if (code(err) === "EEXIST" && (await stat(abs)).isDirectory()) return false;
    throw err;
  }
}
