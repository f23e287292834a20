// Baseline for the relay benchmark: the cheapest Node server that keeps wirechat's
// durability promise, i.e. a message is on disk (fsync'd) before it is forwarded and
// acknowledged. No validation, no accounts, no auth.
//
//   node dist/scripts/baseline-relay.js --port N --data-dir DIR [--host 127.0.0.1] [--max-batch 4096] [--chained]
//
// Protocol, one JSON object per line:
//   {"login":"<name>"}               -> {"ok":1}            (this socket now receives <name>'s lines)
//   {"to":"<name>","body":"..."}     -> appended to LevelDB; once its batch is on disk the
//                                       line is forwarded to <name> and {"status":0} goes
//                                       back to the sender
// Group commit: one batch (sync: true) is in flight at a time; lines that arrive
// meanwhile form the next batch. Writes made in one tick are coalesced into one
// syscall per socket (cork, uncork on nextTick).

import net from "node:net";
import { parseArgs } from "node:util";
import { Level } from "level";

const { values: opts } = parseArgs({
  options: {
    port: { type: "string", default: "7790" },
    host: { type: "string", default: "127.0.0.1" },
    "data-dir": { type: "string" },
    "max-batch": { type: "string", default: "4096" },
    // a chained batch instead: cheaper per message still (about 1.5 µs per put), so
    // this baseline then runs ~25 % faster than the steering baseline
    chained: { type: "boolean", default: false },
  },
});
if (!opts["data-dir"]) {
  console.error("baseline-relay: --data-dir is required");
  process.exit(2);
}
const MAX_BATCH = Number(opts["max-batch"]);
const ACK = '{"status":0}\n';
// Batch options { sync: true } with `sync` not enumerable. abstract-level 3 (under
// level 10) spreads the options of an array batch into every operation, and any
// enumerable option makes that copy several times dearer per message (8.7 vs 2.5 µs
// per put here); classic-level's native batch still reads options.sync and fsyncs
// (checked with strace: one fdatasync per batch). This keeps the per-message cost at
// that of an array batch under classic-level 1, which the steering baseline uses.
const SYNC = Object.defineProperty({}, "sync", { value: true, enumerable: false }) as { sync: boolean };

interface Client extends net.Socket {
  name?: string;
  corked?: boolean;
}

const byName = new Map<string, Client>();

function uncork(s: Client): void {
  s.corked = false;
  s.uncork();
}

/** Write now, but let everything written to this socket in this tick go out together. */
function out(s: Client, data: string): void {
  if (s.destroyed) return;
  if (!s.corked) {
    s.corked = true;
    s.cork();
    process.nextTick(uncork, s);
  }
  s.write(data);
}

// ---- durable log with group commit ----------------------------------------------

const db = new Level<string, string>(opts["data-dir"], { keyEncoding: "utf8", valueEncoding: "utf8" });
await db.open();

interface Pending {
  line: string; // with its trailing newline
  to: string;
  from: Client;
}
let queue: Pending[] = [];
let inFlight = false;
let scheduled = false;
let nextKey = 0;
const epoch = Date.now().toString(36) + "!";

function scheduleCommit(): void {
  if (inFlight || scheduled) return;
  scheduled = true;
  // let the rest of this I/O phase's lines join the batch
  setImmediate(commit);
}

function commit(): void {
  scheduled = false;
  if (inFlight || queue.length === 0) return;
  let batch: Pending[];
  if (queue.length > MAX_BATCH) {
    batch = queue.slice(0, MAX_BATCH);
    queue = queue.slice(MAX_BATCH);
  } else {
    batch = queue;
    queue = [];
  }
  let written: Promise<void>;
  if (opts.chained) {
    const wb = db.batch();
    for (const p of batch) wb.put(epoch + (nextKey++).toString(16).padStart(12, "0"), p.line);
    written = wb.write({ sync: true });
  } else {
    const ops = batch.map((p) => ({ type: "put" as const, key: epoch + (nextKey++).toString(16).padStart(12, "0"), value: p.line }));
    written = db.batch(ops, SYNC);
  }
  inFlight = true;
  written.then(
    () => {
      for (const p of batch) {
        const dest = byName.get(p.to);
        if (dest) out(dest, p.line);
        out(p.from, ACK);
      }
      inFlight = false;
      if (queue.length) commit();
    },
    (err: unknown) => {
      console.error("baseline-relay: LevelDB write failed", err);
      process.exit(1);
    },
  );
}

// ---- connections ----------------------------------------------------------------

function onLine(s: Client, line: string): void {
  let msg: { to?: unknown; login?: unknown };
  try {
    msg = JSON.parse(line);
  } catch {
    out(s, '{"status":3}\n');
    return;
  }
  if (msg.to !== undefined) {
    queue.push({ line: line + "\n", to: String(msg.to), from: s });
    scheduleCommit();
  } else if (msg.login !== undefined) {
    s.name = String(msg.login);
    byName.set(s.name, s);
    out(s, '{"ok":1}\n');
  } else {
    out(s, '{"status":3}\n');
  }
}

const server = net.createServer({ noDelay: true }, (sock) => {
  const s = sock as Client;
  let partial = "";
  s.setEncoding("utf8");
  s.on("data", (chunk: string) => {
    const text = partial ? partial + chunk : chunk;
    let from = 0;
    for (let nl = text.indexOf("\n"); nl >= 0; nl = text.indexOf("\n", from)) {
      if (nl > from) onLine(s, text.slice(from, nl));
      from = nl + 1;
    }
    partial = from < text.length ? text.slice(from) : "";
  });
  s.on("error", () => {});
  s.on("close", () => {
    if (s.name !== undefined && byName.get(s.name) === s) byName.delete(s.name);
  });
});

server.listen(Number(opts.port), opts.host, () => {
  const a = server.address() as net.AddressInfo;
  console.error(`baseline-relay listening on ${a.address}:${a.port}, LevelDB ${opts["data-dir"]} (sync)`);
});

let stopping = false;
async function shutdown(): Promise<void> {
  if (stopping) return;
  stopping = true;
  server.close();
  for (const s of byName.values()) s.destroy();
  while (inFlight || queue.length) {
    commit();
    await new Promise((r) => setTimeout(r, 5));
  }
  await db.close();
  process.exit(0);
}
process.on("SIGTERM", () => void shutdown());
process.on("SIGINT", () => void shutdown());
