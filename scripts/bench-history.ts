// History benchmark: reading the latest page of a conversation costs the same whatever
// the conversation's length, because history is one bounded reverse range read.
//
//   npm run bench:history -- [--small 100] [--big 100000] [--requests 500] [--limit 50]
//                            [--inflight 200] [--senders 8] [--runs 3]
//
// Starts the built server (dist/) as a child process on a temp data dir, fills one
// direct conversation with `small` messages and another with `big` (pipelined sends,
// `inflight` unacknowledged in all, spread over `senders` connections of the reader
// so that none passes the per-connection request rate; the recipients are offline),
// then times `requests` sequential `history {uid, limit}` requests on each, and as
// many `history {uid, limit, before}` pages of the big one: `before` a fixed mid in
// its middle, and `before` a random mid of it (pages spread over the whole
// conversation). The four cases take turns request by request, after 50 untimed
// rounds of warm-up.
// Each run uses a fresh server; per-request median and p99 are reported as the median
// over `runs`.

import { parseArgs } from "node:util";
import { BenchClient, median, newUser, startServer, stopServer } from "./bench-lib.js";

const { values: opts } = parseArgs({
  options: {
    small: { type: "string", default: "100" },
    big: { type: "string", default: "100000" },
    requests: { type: "string", default: "500" },
    limit: { type: "string", default: "50" },
    inflight: { type: "string", default: "200" },
    senders: { type: "string", default: "8" },
    runs: { type: "string", default: "3" },
  },
});
const SMALL = Number(opts.small);
const BIG = Number(opts.big);
const REQUESTS = Number(opts.requests);
const LIMIT = Number(opts.limit);
const INFLIGHT = Number(opts.inflight);
const SENDERS = Number(opts.senders);
const RUNS = Number(opts.runs);

/** Opens another connection of an existing user (by session id). */
async function resume(port: number, sid: string): Promise<BenchClient> {
  const c = await BenchClient.connect(port);
  const auth = c.next((l) => l.startsWith('{"action":"auth"'));
  c.send({ action: "auth", data: { sid } });
  if ((await auth).data.status !== 0) throw new Error("could not resume the session");
  return c;
}

/** Requests refused with status 13 (the per-connection rate limit) and sent again. */
let retried = 0;

/**
 * Sends n messages to `to` from one connection, keeping `inflight` unacknowledged; a
 * message refused for rate (13) is sent again a little later. Returns the mids.
 */
function fill(c: BenchClient, to: string, n: number, inflight: number): Promise<string[]> {
  const mids: string[] = [];
  let sent = 0;
  return new Promise((resolve, reject) => {
    const sendOne = () => {
      c.send({ action: "message", data: { uid: to, body: `history benchmark message number ${sent}` } });
      sent++;
    };
    c.onLine = (l) => {
      if (!l.startsWith('{"action":"message"')) return; // the sender's own ev_message echoes
      const r = JSON.parse(l).data;
      if (r.status === 13) {
        retried++;
        setTimeout(() => c.send({ action: "message", data: { uid: to, body: "history benchmark message, sent again" } }), 20);
        return;
      }
      if (r.status !== 0) {
        reject(new Error(`message refused: ${l}`));
        return;
      }
      mids.push(r.mid);
      if (sent < n) sendOne();
      else if (mids.length === n) {
        c.onLine = () => {};
        resolve(mids);
      }
    };
    while (sent < Math.min(n, inflight)) sendOne();
  });
}

/** n messages to `to`, spread over the connections; returns every mid in send order. */
async function fillFrom(conns: BenchClient[], to: string, n: number): Promise<string[]> {
  const share = (i: number) => Math.floor(n / conns.length) + (i < n % conns.length ? 1 : 0);
  const inflight = Math.max(1, Math.round(INFLIGHT / conns.length));
  const parts = await Promise.all(conns.map((c, i) => fill(c, to, share(i), inflight)));
  return parts.flat().sort((a, b) => Number(a) - Number(b));
}

interface Stats {
  median: number;
  p99: number;
}

/** One history request; returns its round-trip time in ms. */
async function once(c: BenchClient, data: Record<string, unknown>, expect: number): Promise<number> {
  const reply = c.next((l) => l.startsWith('{"action":"history"'));
  const t0 = performance.now();
  c.send({ action: "history", data });
  const r = await reply;
  const ms = performance.now() - t0;
  if (r.data.status !== 0) throw new Error(`history failed: ${JSON.stringify(r.data)}`);
  if (r.data.messages.length !== expect) throw new Error(`history returned ${r.data.messages.length} messages, expected ${expect}`);
  return ms;
}

function stats(samples: number[]): Stats {
  const s = [...samples].sort((a, b) => a - b);
  return { median: median(s), p99: s[Math.min(s.length - 1, Math.floor(0.99 * s.length))] };
}

interface RunResult {
  fillRate: number;
  small: Stats;
  big: Stats;
  middle: Stats;
  random: Stats;
}

async function run(): Promise<RunResult> {
  const server = await startServer();
  try {
    const reader = await newUser(server.port);
    const smallPeer = await newUser(server.port);
    const bigPeer = await newUser(server.port);
    // the recipients go offline: the benchmark reads history, not their live events
    smallPeer.c.socket.destroy();
    bigPeer.c.socket.destroy();

    // the reader's own connections send: the conversation is the reader's, and
    // several connections keep each under the per-connection request rate
    const senders = [reader.c];
    for (let i = 1; i < SENDERS; i++) senders.push(await resume(server.port, reader.sid));

    const t0 = performance.now();
    await fillFrom(senders, smallPeer.uid, SMALL);
    const bigMids = await fillFrom(senders, bigPeer.uid, BIG);
    if (bigMids.length !== BIG) throw new Error(`filled ${bigMids.length} messages, expected ${BIG}`);
    const fillRate = ((SMALL + BIG) * 1000) / (performance.now() - t0);
    await new Promise((r) => setTimeout(r, 1000)); // let the write burst settle

    const smallPage = Math.min(LIMIT, SMALL);
    const bigPage = Math.min(LIMIT, BIG);
    const middle = bigMids[Math.floor(BIG / 2)];
    // random `before` mids, chosen once so that every page is full
    const randomBefore = Array.from({ length: REQUESTS }, () => bigMids[LIMIT + Math.floor(Math.random() * (BIG - LIMIT))]);

    // The cases take turns, request by request, so that whatever the server does in
    // the background (LevelDB compaction after the fill, GC) falls on all of them alike.
    const cases: [Record<string, unknown> | ((i: number) => Record<string, unknown>), number][] = [
      [{ uid: smallPeer.uid, limit: LIMIT }, smallPage],
      [{ uid: bigPeer.uid, limit: LIMIT }, bigPage],
      [{ uid: bigPeer.uid, limit: LIMIT, before: middle }, bigPage],
      [(i) => ({ uid: bigPeer.uid, limit: LIMIT, before: randomBefore[i] }), bigPage],
    ];
    const samples: number[][] = cases.map(() => []);
    const WARMUP = 50; // rounds not counted
    for (let i = 0; i < WARMUP + REQUESTS; i++) {
      for (let k = 0; k < cases.length; k++) {
        const [data, expect] = cases[k];
        const ms = await once(reader.c, typeof data === "function" ? data(i % REQUESTS) : data, expect);
        if (i >= WARMUP) samples[k].push(ms);
      }
    }
    const [small, big, mid, random] = samples.map(stats);
    for (const c of senders) c.socket.destroy();
    return { fillRate, small, big, middle: mid, random };
  } finally {
    await stopServer(server);
  }
}

async function main(): Promise<void> {
  const results: RunResult[] = [];
  for (let i = 0; i < RUNS; i++) {
    const r = await run();
    results.push(r);
    console.log(
      `run ${i + 1}/${RUNS}: filled at ${Math.round(r.fillRate)} msg/s; median/p99 ms: ${SMALL} msgs ${r.small.median.toFixed(3)}/${r.small.p99.toFixed(3)}, ` +
        `${BIG} msgs ${r.big.median.toFixed(3)}/${r.big.p99.toFixed(3)}, middle ${r.middle.median.toFixed(3)}/${r.middle.p99.toFixed(3)}, ` +
        `random ${r.random.median.toFixed(3)}/${r.random.p99.toFixed(3)}`,
    );
  }
  const line = (label: string, pick: (r: RunResult) => Stats) => {
    const meds = results.map((r) => pick(r).median);
    const p99s = results.map((r) => pick(r).p99);
    return `  ${label.padEnd(44)} median ${median(meds).toFixed(3)} ms, p99 ${median(p99s).toFixed(3)} ms (p99 runs: ${p99s.map((x) => x.toFixed(3)).join(", ")})`;
  };
  if (retried > 0) console.log(`(fill, all runs: ${retried} sends refused for rate (13) and sent again)`);
  console.log(`history {uid, limit: ${LIMIT}}: ${REQUESTS} sequential requests per case, median of ${RUNS} runs`);
  console.log(line(`latest ${LIMIT} of ${SMALL} messages`, (r) => r.small));
  console.log(line(`latest ${LIMIT} of ${BIG} messages`, (r) => r.big));
  console.log(line(`${LIMIT} before the middle of ${BIG} messages`, (r) => r.middle));
  console.log(line(`${LIMIT} before a random mid of ${BIG} messages`, (r) => r.random));
  const ratio = median(results.map((r) => r.big.median / r.small.median));
  console.log(`  latest page, ${BIG} vs ${SMALL} messages: median ratio ${ratio.toFixed(2)}x`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
