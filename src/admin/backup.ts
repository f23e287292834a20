// Backup, restore and export.
//
// A backup is a directory: `db.ndjson` holds every LevelDB key and value as
// `[key, value]` lines, read through one iterator (LevelDB gives it an implicit
// snapshot, so the copy is consistent as of its start while the server keeps
// writing); `blobs/` holds every attachment file a message in that snapshot refers
// to; `backup.json` says what it holds. Restore writes them into an empty data dir.
// Export writes records (never password hashes) as NDJSON, for a user's data request
// or a migration.

import type { AbstractSnapshot } from "abstract-level";
import { createHash } from "node:crypto";
import { pipeline } from "node:stream/promises";
import { closeSync, createReadStream, createWriteStream, existsSync, fsyncSync, linkSync, mkdtempSync, openSync, readdirSync, readFileSync, renameSync, rmdirSync, rmSync, writeFileSync } from "node:fs";
import { copyFile, readFile } from "node:fs/promises";
import path from "node:path";
import { createInterface } from "node:readline";
import { Level } from "level";
import { Code, ProtocolError } from "../protocol/codes.js";
import { syncPath, type BlobStore } from "../storage/blobs.js";
import { LEVEL_OPTIONS, type Storage } from "../storage/db.js";
import { makeDir, makeDirSync } from "../storage/dirs.js";
import { LAYOUT_VERSION, keyTail, type ChannelRecord, type MessageRecord, type UserRecord } from "../storage/layout.js";
import { readEntries, readKeys, readValues } from "../storage/range.js";

export interface BackupInfo {
  format: 1;
  server: "wirechat";
  version: string;
  layout: number;
  created: string;
  keys: number;
  blobs: number;
  /** Attachment files referred to but gone (a message deleted while the backup ran). */
  missing: number;
}

/**
 * A directory to create, or an empty one: a backup never overwrites. Only its owner
 * may read it (it holds password hashes and every message).
 */
function emptyTarget(dir: string): string | undefined {
  try {
    if (existsSync(dir) && readdirSync(dir).length > 0) {
      throw new ProtocolError(Code.AlreadyExist, `${dir} exists and is not empty; choose a new directory`);
    }
    return makeDirSync(dir, 0o700);
  } catch (err) {
    throw unwritable(dir, err);
  }
}

/** A path that is a file, or not writable by the server: the request's fault, said so. */
function unwritable(dir: string, err: unknown): unknown {
  // An errno's code is a string ("ENOTDIR"); a ProtocolError's (not empty: 1) is not.
  const code = (err as NodeJS.ErrnoException).code;
  return typeof code !== "string" ? err : new ProtocolError(Code.InvalidData, `cannot write a backup into ${dir}: ${code} (${(err as Error).message})`);
}

export async function backup(storage: Storage, blobs: BlobStore, dir: string, version: string, signal?: AbortSignal): Promise<BackupInfo & { dir: string }> {
  const target = path.resolve(dir);
  const made = !existsSync(target);
  // The topmost directory this backup created (its parents' entries are synced last).
  const created = emptyTarget(target);
  // Created exclusively: of two backups started into one new directory at once, one
  // goes on and the other is told the directory is taken (both passed emptyTarget).
  let fd: number;
  try {
    fd = openSync(path.join(target, "db.ndjson"), "wx", 0o600);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "EEXIST") throw new ProtocolError(Code.AlreadyExist, `${target} is being written by another backup; choose a new directory`);
    // (No file of its own there: the directories it made go, if still empty.)
    if (created !== undefined) removeEmptyUpTo(target, created);
    throw unwritable(target, err);
  }
  // The directory is this backup's now: a failure takes back all it wrote (a full disk
  // left full would hold the server's own writes when it is the data dir's), and the
  // directory when it made it, so the same command can be run again.
  try {
    const info = await backupInto(target, fd, storage, blobs, version, signal);
    // The directories it created: each one's entry in its parent (else a power cut could
    // lose the whole backup, though its files were synced).
    for (let d = target; created !== undefined; d = path.dirname(d)) {
      await syncPath(path.dirname(d));
      if (d === created) break;
    }
    return info;
  } catch (err) {
    for (const name of ["db.ndjson", "blobs", INFO_TEMP, "backup.json"]) rmSync(path.join(target, name), { recursive: true, force: true });
    if (made) rmSync(target, { recursive: true, force: true });
    // And the parents it made for it (`backup new/sub` left an empty `new`).
    if (created !== undefined && created !== target) removeEmptyUpTo(path.dirname(target), created);
    throw err;
  }
}

/**
 * Removes `dir` and its parents up to `top` (which it is in, or is) while each is empty:
 * the directories an operation made for itself, taken back when it failed. One that is
 * not empty (another backup or restore made something there meanwhile) stays, and so
 * do its parents.
 */
function removeEmptyUpTo(dir: string, top: string): void {
  for (let d = dir; ; d = path.dirname(d)) {
    try {
      rmdirSync(d);
    } catch {
      return; // not empty, or gone
    }
    if (d === top || path.dirname(d) === d) return;
  }
}

/** backup.json while it is written (renamed into place once synced: a backup without it is incomplete). */
const INFO_TEMP = "backup.json.tmp";

/** The server stopping: a backup in progress is given up (and what it wrote taken back) at its next step. */
function stopped(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new ProtocolError(Code.Unavailable, "the server is shutting down: the backup was not finished (run it again once the server is up)");
}

async function backupInto(target: string, fd: number, storage: Storage, blobs: BlobStore, version: string, signal: AbortSignal | undefined): Promise<BackupInfo & { dir: string }> {
  const shas = new Set<string>();
  let keys = 0;
  let copied = 0;
  let missing = 0;
  // No attachment file is deleted from before the snapshot until the copies are made;
  // the hold ends however the backup ends (a hold left on keeps every later delete's
  // files until a restart).
  const release = blobs.hold();
  try {
    const it = storage.db.iterator({ keyEncoding: "utf8", valueEncoding: "utf8" });
    // A failed read (the database closing under a shutdown) is not the target's fault.
    let readFailed: unknown;
    // A page of lines at a time. pipeline() listens for the file's errors for the whole
    // write and closes it on any: a write that failed (a full disk, EIO) while the loop
    // waited for LevelDB was an 'error' with no listener, which ended the server.
    async function* lines(): AsyncGenerator<string> {
      for (;;) {
        stopped(signal);
        let page: [string, string][];
        try {
          page = await it.nextv(1000);
        } catch (err) {
          readFailed = err;
          throw err;
        }
        if (page.length === 0) return;
        let text = "";
        for (const [k, v] of page) {
          keys++;
          const sha = refSha(k);
          if (sha !== undefined) shas.add(sha);
          text += JSON.stringify([k, v]) + "\n";
        }
        yield text;
      }
    }
    try {
      await pipeline(lines, createWriteStream("", { fd }));
    } catch (err) {
      if (err === readFailed) throw new ProtocolError(Code.Unavailable, `reading the database failed: ${(err as Error).message}`);
      if (err instanceof ProtocolError) throw err; // stopped
      throw unwritable(target, err);
    } finally {
      await it.close();
    }
    try {
      await syncPath(path.join(target, "db.ndjson"));
    } catch (err) {
      throw unwritable(target, err);
    }
    for (const sha of shas) {
      stopped(signal);
      const to = path.join(target, "blobs", sha.slice(0, 2), sha);
      try {
        await makeDir(path.dirname(to), 0o700);
        await copyFile(blobs.pathOf(sha), to);
        await syncPath(to);
        copied++;
      } catch (err) {
        // Missing: the source is gone (only a file the snapshot's messages no longer
        // need). Anything else (the target's disk full, not writable) fails the backup.
        if ((err as NodeJS.ErrnoException).code === "ENOENT" && !existsSync(blobs.pathOf(sha))) missing++;
        else throw unwritable(target, err);
      }
    }
  } finally {
    release();
  }
  const info: BackupInfo = { format: 1, server: "wirechat", version, layout: LAYOUT_VERSION, created: new Date().toISOString(), keys, blobs: copied, missing };
  try {
    // The attachment directories' entries, before backup.json says the backup is whole.
    const blobsDir = path.join(target, "blobs");
    if (existsSync(blobsDir)) {
      for (const shard of readdirSync(blobsDir)) await syncPath(path.join(blobsDir, shard));
      await syncPath(blobsDir);
    }
    const temp = path.join(target, INFO_TEMP);
    const fdInfo = openSync(temp, "w", 0o600);
    try {
      writeFileSync(fdInfo, JSON.stringify(info, null, 2) + "\n");
      fsyncSync(fdInfo);
    } finally {
      closeSync(fdInfo);
    }
    renameSync(temp, path.join(target, "backup.json"));
    await syncPath(target); // the directory: its entries, backup.json's last
  } catch (err) {
    throw unwritable(target, err);
  }
  return { ...info, dir: target };
}

/**
 * Restores the backup in `from` into `dataDir`, which must hold no database. Everything
 * is written into a staging directory inside `dataDir` first and checked (every line a
 * [key, value] pair, as many keys and attachment files as backup.json lists); only then
 * do the attachment files and, last, the database move into place (renames on the same
 * file system). A backup that is cut short or damaged, or a restore stopped by `signal`
 * (the CLI's SIGINT and SIGTERM) while it stages, leaves `dataDir` as it was, so the
 * restore can be run again once the backup is fixed, and no server starts on half a
 * database. One restore at a time per data dir (RESTORE_LOCK, which holds its pid);
 * what one killed outright (kill -9) left behind, its lock and staging directory, the
 * next restore removes.
 */
export async function restore(from: string, dataDir: string, signal?: AbortSignal): Promise<{ keys: number; blobs: number; missing: number }> {
  const infoFile = path.join(from, "backup.json");
  let info: BackupInfo;
  try {
    info = JSON.parse(await readFile(infoFile, "utf8")) as BackupInfo;
  } catch (err) {
    // The file at fault named (a bare "Expected property name" or an ENOENT said little).
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new Error(`${from} holds no backup.json: not a wirechat backup (or one cut short before it was finished)`);
    throw new Error(`${infoFile}: ${err instanceof SyntaxError ? `not valid JSON (${err.message})` : (err as Error).message}`);
  }
  if (typeof info !== "object" || info === null || info.format !== 1 || info.server !== "wirechat") throw new Error(`${from} is not a wirechat backup`);
  if (info.layout > LAYOUT_VERSION) {
    throw new Error(`the backup holds layout ${info.layout}, newer than this wirechat's ${LAYOUT_VERSION}: restore it with the wirechat that made it (or a newer one)`);
  }
  const dbDir = path.join(dataDir, "db");
  // A data dir this restore makes goes again if the restore fails (nothing left behind),
  // with the parents it made for it.
  const created = makeDirSync(dataDir);
  const unlock = restoreLock(dataDir);
  let restored = false;
  try {
    // Under the lock: a restore that finished a moment ago has put its database there.
    if (existsSync(dbDir) && readdirSync(dbDir).length > 0) throw new Error(`${dataDir} already holds a database; restore into a new data dir`);
    // What restores killed outright left: their staging, and a lock's spare name.
    for (const name of readdirSync(dataDir)) {
      if (name.startsWith(STAGING_PREFIX) || name.startsWith(`${RESTORE_LOCK}.`)) rmSync(path.join(dataDir, name), { recursive: true, force: true });
    }
    const staging = mkdtempSync(path.join(dataDir, STAGING_PREFIX));
    try {
      const { keys, absent } = await restoreKeys(path.join(from, "db.ndjson"), path.join(staging, "db"), path.join(from, "blobs"), info.missing ?? 0, signal);
      if (keys !== info.keys) throw new Error(`the backup lists ${info.keys} keys but db.ndjson holds ${keys}: it is incomplete`);
      const blobs = await copyBlobs(path.join(from, "blobs"), path.join(staging, "blobs"), signal);
      if (blobs !== info.blobs) throw new Error(`the backup lists ${info.blobs} attachment files but holds ${blobs}: it is incomplete`);
      signal?.throwIfAborted();
      // A server refuses to start while this lock is held (openCore), but one that
      // started before the lock was taken may have made its database since the check
      // above: nothing moves into a data dir a server uses.
      if (existsSync(dbDir) && readdirSync(dbDir).length > 0) {
        throw new Error(`a database appeared in ${dataDir} while the restore ran (a server started on it?): nothing was moved; stop it, empty the data dir and restore again`);
      }
      // Into place (no longer stopped by `signal`): the attachment files first, the
      // database last (a server starts only on a database).
      // Each step durable before the next (a power failure must not leave a database
      // naming files that are not there): the files were synced as they were copied,
      // the directories that now name them are synced after the moves.
      const shards = existsSync(path.join(staging, "blobs")) ? readdirSync(path.join(staging, "blobs")) : [];
      for (const shard of shards) {
        makeDirSync(path.join(dataDir, "blobs", shard));
        for (const file of readdirSync(path.join(staging, "blobs", shard))) {
          renameSync(path.join(staging, "blobs", shard, file), path.join(dataDir, "blobs", shard, file));
        }
        await syncPath(path.join(dataDir, "blobs", shard));
      }
      if (shards.length > 0) await syncPath(path.join(dataDir, "blobs"));
      // rename(2) replaces an empty directory in one step, and fails on one that is not.
      renameSync(path.join(staging, "db"), dbDir);
      await syncPath(dataDir);
      restored = true;
      return { keys, blobs, missing: absent };
    } finally {
      rmSync(staging, { recursive: true, force: true });
    }
  } finally {
    unlock();
    // Only while empty (another restore may have taken it meanwhile).
    if (created !== undefined && !restored) removeEmptyUpTo(path.resolve(dataDir), created);
  }
}

/** A restore's staging directory in the data dir: `.restore-XXXXXX`. */
const STAGING_PREFIX = ".restore-";
/** The file that makes a data dir one restore's at a time; it holds that restore's pid. */
export const RESTORE_LOCK = ".restore.lock";

/**
 * Takes `dataDir`'s restore lock, or says which live process holds it. A lock whose
 * process is gone (a restore killed outright) is taken over. Returns its release.
 */
function restoreLock(dataDir: string): () => void {
  const file = path.join(dataDir, RESTORE_LOCK);
  // Written whole under another name, then linked into place (which fails if the lock
  // exists): no one ever reads a lock without its pid.
  const mine = `${file}.${process.pid}`;
  writeFileSync(mine, `${process.pid}\n`, { mode: 0o600 });
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        linkSync(mine, file);
        return () => rmSync(file, { force: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
      const pid = lockHolder(file);
      if (pid !== undefined || attempt > 0) {
        throw new Error(`another restore into ${dataDir} is running (pid ${pid ?? "unknown"}); if it is not, remove ${file}`);
      }
      // Its restore was killed: taken over. Moved aside rather than removed, and only the
      // lock judged dead: two restores taking it over at once, the one that moves it
      // second would otherwise remove the lock the first has just taken.
      const aside = `${file}.${process.pid}.stale`;
      try {
        renameSync(file, aside);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
        continue; // moved by another restore: whoever links next holds it
      }
      const moved = lockHolder(aside);
      if (moved !== undefined) {
        // Another restore took the dead lock over between the read and the move: what
        // was moved is its live lock, put back.
        try {
          linkSync(aside, file);
        } finally {
          rmSync(aside, { force: true });
        }
        throw new Error(`another restore into ${dataDir} is running (pid ${moved}); if it is not, remove ${file}`);
      }
      rmSync(aside, { force: true });
    }
  } finally {
    rmSync(mine, { force: true });
  }
}

/**
 * The live process a restore lock file names, if any. Our own pid is not one: a lock
 * left by a restore killed outright names a pid the next process may be given (pid 1
 * in a container without an init, every time). One that cannot be read (another
 * user's, mode 0600) is said so: nobody can tell whether its restore runs.
 */
function lockHolder(file: string): number | undefined {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return undefined;
    if (code === "EACCES") throw new Error(`cannot read ${file} (a restore run as another user made it): if no restore is running, remove it`);
    throw err;
  }
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) return undefined;
  return alive(pid) ? pid : undefined;
}

/**
 * The pid of a restore running into `dataDir` (its lock names a live process), if any:
 * a server, or a command on the data dir, does not start meanwhile (openCore).
 */
export function restoreRunning(dataDir: string): number | undefined {
  return lockHolder(path.join(dataDir, RESTORE_LOCK));
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Writes db.ndjson's pairs into a new LevelDB at `dbDir`; returns how many. */
async function restoreKeys(file: string, dbDir: string, blobsDir: string, missing: number, signal: AbortSignal | undefined): Promise<{ keys: number; absent: number }> {
  const db = new Level<string, string>(dbDir, { ...LEVEL_OPTIONS, keyEncoding: "utf8", valueEncoding: "utf8" });
  await db.open();
  let keys = 0;
  let absent = 0;
  try {
    let batch = db.batch();
    let n = 0;
    let lineNo = 0;
    let lastRef = "";
    // The signal ends the read too, where a slow source holds it between lines.
    const lines = createInterface({ input: createReadStream(file, { signal }), crlfDelay: Infinity });
    for await (const line of lines) {
      lineNo++;
      if (line === "") continue;
      let pair: unknown;
      try {
        pair = JSON.parse(line);
      } catch {
        pair = undefined;
      }
      if (!Array.isArray(pair) || pair.length !== 2 || typeof pair[0] !== "string" || typeof pair[1] !== "string") {
        throw new Error(`db.ndjson line ${lineNo} is not a [key, value] pair of strings: the backup is damaged`);
      }
      // Every attachment a message names must be in the backup, but for as many as
      // backup.json says were missing when it was made (they go out empty, as on the
      // server it was made from); one lost since would be served empty unannounced.
      // Keys come sorted, so a file's references are adjacent: each looked for once.
      const sha = refSha(pair[0]);
      if (sha !== undefined && sha !== lastRef) {
        lastRef = sha;
        const absentHere = !SHA256_HEX.test(sha) || !existsSync(path.join(blobsDir, sha.slice(0, 2), sha));
        if (absentHere && ++absent > missing) {
          throw new Error(`db.ndjson line ${lineNo} names attachment file blobs/${sha.slice(0, 2)}/${sha}, which the backup does not hold: it is incomplete`);
        }
      }
      batch.put(pair[0], pair[1]);
      keys++;
      // Every batch synced: LevelDB closes a write-ahead log without a sync when its
      // memtable fills (storage/db.ts), so a last synced batch would not make the keys
      // before it durable; the restore says it is done only once all of them are.
      if (++n === 1000) {
        await batch.write({ sync: true });
        batch = db.batch();
        n = 0;
      }
    }
    await batch.write({ sync: true });
  } finally {
    await db.close();
  }
  return { keys, absent };
}

/**
 * Copies a backup's attachment files (`<shard>/<sha256>`) into `to`; returns how many.
 * Each file's bytes are hashed as they are copied and must be the sha-256 it is named
 * by: a damaged file would be served as the attachment its messages name, to every
 * client that asks, with nothing to say it is not (the server trusts its own files).
 */
async function copyBlobs(src: string, to: string, signal: AbortSignal | undefined): Promise<number> {
  let blobs = 0;
  if (!existsSync(src)) return 0;
  for (const shard of readdirSync(src)) {
    await makeDir(path.join(to, shard));
    for (const file of readdirSync(path.join(src, shard))) {
      signal?.throwIfAborted();
      const name = `blobs/${shard}/${file}`;
      if (!SHA256_HEX.test(file) || file.slice(0, 2) !== shard) throw new Error(`${name} is not an attachment file (blobs/<sha[0:2]>/<sha-256>): the backup is damaged`);
      const hash = createHash("sha256");
      await pipeline(
        createReadStream(path.join(src, shard, file), { signal }),
        async function* (chunks: AsyncIterable<Buffer>) {
          for await (const chunk of chunks) {
            hash.update(chunk);
            yield chunk;
          }
        },
        createWriteStream(path.join(to, shard, file)),
      );
      if (hash.digest("hex") !== file) throw new Error(`${name} does not hold the bytes its name's sha-256 says: the backup is damaged`);
      await syncPath(path.join(to, shard, file));
      blobs++;
    }
  }
  return blobs;
}

const SHA256_HEX = /^[0-9a-f]{64}$/;
/** The root-level prefix of the blobrefs space's keys (`<sha256>!<mid>`: storage/layout.ts). */
const REFS_PREFIX = "!blobrefs!";

/** The attachment file a root-level key of the blobrefs space names, if it is one. */
function refSha(key: string): string | undefined {
  return key.startsWith(REFS_PREFIX) ? key.slice(REFS_PREFIX.length, key.indexOf("!", REFS_PREFIX.length)) : undefined;
}

function userLine(u: UserRecord): string {
  const { hash: _hash, ...rest } = u;
  return JSON.stringify({ type: "user", ...rest }) + "\n";
}

/**
 * Users and messages read per page by export: each may be large (a message up to
 * --max-frame, a user's picture up to --max-picture), so a page of 1,000 could hold a
 * gigabyte in a running server's heap; 64 bound it to 64 MiB at the default limits.
 */
const EXPORT_PAGE = 64;

/**
 * The records of `uid` (their account, contacts, channel memberships and every direct
 * or channel message they sent or received directly), or of every user and message
 * when `uid` is undefined. Page by page (EXPORT_PAGE): memory stays flat.
 */
export async function* exportRecords(storage: Storage, uid: string | undefined): AsyncGenerator<string> {
  // Every read from one snapshot: the passes below take minutes on a large server read
  // by a slow client, and each page read alone saw the writes since the last one (a
  // membership or a message naming a channel or user the file does not hold).
  const snapshot = storage.db.supports.explicitSnapshots ? storage.db.snapshot() : undefined;
  try {
    yield* exportFrom(storage, uid, snapshot);
  } finally {
    await snapshot?.close();
  }
}

async function* exportFrom(storage: Storage, uid: string | undefined, snapshot: AbstractSnapshot | undefined): AsyncGenerator<string> {
  const s = storage.spaces;
  if (uid !== undefined) {
    const u = (await s.users.get(uid, { snapshot })) as UserRecord | undefined;
    if (u) yield userLine(u);
  } else {
    for (let after = ""; ; ) {
      const page = await readValues<UserRecord>(s.users, { gt: after, limit: EXPORT_PAGE, snapshot });
      if (page.length === 0) break;
      for (const u of page) yield userLine(u);
      after = page[page.length - 1].uid;
    }
  }
  const [from, to] = uid === undefined ? ["", "\u{10FFFF}"] : [`${uid}!`, `${uid}!\u{10FFFF}`];
  // The channels the memberships below name (all of them for the whole server; the
  // user's own for a user): a membership's chid is then described in the same file.
  if (uid === undefined) {
    for (const space of [s.channels, s.privchans]) {
      for (let after = ""; ; ) {
        const page = await readEntries<ChannelRecord>(space, { gt: after, limit: EXPORT_PAGE, snapshot });
        if (page.length === 0) break;
        for (const [, c] of page) yield JSON.stringify({ type: "channel", ...c }) + "\n";
        after = page[page.length - 1][0];
      }
    }
  } else {
    for (let after = from; ; ) {
      const page = await readKeys(s.memberof, { gt: after, lt: to, limit: 1000, snapshot });
      if (page.length === 0) break;
      for (const key of page) {
        const chid = keyTail(key);
        const c = ((await s.channels.get(chid, { snapshot })) ?? (await s.privchans.get(chid, { snapshot }))) as ChannelRecord | undefined;
        if (c) yield JSON.stringify({ type: "channel", ...c }) + "\n";
      }
      after = page[page.length - 1];
    }
  }
  for (const [space, type, a, b] of [
    [s.contacts, "contact", "owner", "contact"],
    [s.memberof, "membership", "uid", "chid"],
  ] as const) {
    for (let after = from; ; ) {
      const page = await readKeys(space, { gt: after, lt: to, limit: 1000, snapshot });
      if (page.length === 0) break;
      for (const key of page) yield JSON.stringify({ type, [a]: key.slice(0, key.indexOf("!")), [b]: keyTail(key) }) + "\n";
      after = page[page.length - 1];
    }
  }
  for (let after = ""; ; ) {
    const page = await readEntries<MessageRecord>(s.log, { gt: after, limit: EXPORT_PAGE, snapshot });
    if (page.length === 0) break;
    for (const [, m] of page) {
      if (uid === undefined || m.from === uid || m.to === uid) yield JSON.stringify({ type: "message", ...m }) + "\n";
    }
    after = page[page.length - 1][0];
  }
}
