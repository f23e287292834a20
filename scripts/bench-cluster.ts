// Cluster benchmark: S1 on three wirechat nodes sharing one nats-server, next to a
// single node, measured in the same run.
//
//   npm run bench:cluster -- [--runs 3] [--seconds 10] [--pairs 100] [--window 32]
//
// Rows, each run with fresh servers, data dirs and stream, in turn:
//   single  one node on its own LevelDB (no --nats)
//   same    three nodes; every sender and its recipient on the same node
//   cross   three nodes; senders on one node, their recipients on another
// Figures: messages delivered per second (send until the recipient has it) and the p99
// of that latency, medians over the runs, and each cluster row against the single node.
// Nothing is pinned: the three nodes, nats-server and the generator share this
// machine's cores, so the figures say what the log costs here, not what a cluster of
// machines would do. Needs nats-server (apt-get install nats-server).

import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import type { GenConfig, GenResult } from "./bench-gen.js";
import { median, startServer, stopServer, type Server } from "./bench-lib.js";
import { NatsServer } from "./nats-server.js";

const { values: opts } = parseArgs({
  options: {
    runs: { type: "string", default: "3" },
    seconds: { type: "string", default: "10" },
    pairs: { type: "string", default: "100" },
    window: { type: "string", default: "32" },
  },
});
const RUNS = Number(opts.runs);
const GEN = fileURLToPath(new URL("./bench-gen.js", import.meta.url));

type Row = "single" | "same" | "cross";
const ROWS: Row[] = ["single", "same", "cross"];
const LABEL: Record<Row, string> = {
  single: "single node (no NATS)",
  same: "cluster of 3, sender and recipient on one node",
  cross: "cluster of 3, sender and recipient on different nodes",
};

function runGenerator(cfg: GenConfig): Promise<GenResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [GEN, JSON.stringify(cfg)], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.once("exit", (code) => {
      try {
        resolve(JSON.parse(out.trim().split("\n").pop() ?? "") as GenResult);
      } catch {
        reject(new Error(`load generator exited ${code} without a result`));
      }
    });
  });
}

async function runOnce(row: Row): Promise<GenResult> {
  // (bench-lib's servers log at info: it waits for the "listening" line.)
  const common = ["--max-connections", "100000", "--admin", "off"];
  const servers: Server[] = [];
  let nats: NatsServer | undefined;
  try {
    if (row === "single") {
      servers.push(await startServer(common, { stderr: "pipe" }));
    } else {
      nats = await NatsServer.start();
      for (let i = 0; i < 3; i++) {
        servers.push(await startServer([...common, "--nats", nats.url, "--node-id", `bench${i}`], { stderr: "pipe" }));
      }
    }
    const tx = servers[0];
    const rx = row === "cross" ? servers[1] : servers[0];
    const cfg: GenConfig = {
      proto: "wirechat",
      port: tx.port,
      recvPort: rx.port,
      serverPid: tx.proc.pid as number,
      scenario: "s1",
      pairs: Number(opts.pairs),
      window: Number(opts.window),
      rate: 0,
      seconds: Number(opts.seconds),
      warmup: 2,
      conns: 0,
      setupConcurrency: 32,
      settle: 0,
      bodySize: 100,
      timeoutMs: 30_000,
    };
    return await runGenerator(cfg);
  } finally {
    for (const s of servers) await stopServer(s);
    await nats?.stop();
  }
}

const results: Record<Row, GenResult[]> = { single: [], same: [], cross: [] };
for (let run = 1; run <= RUNS; run++) {
  for (const row of ROWS) {
    const r = await runOnce(row);
    results[row].push(r);
    console.log(`${row} run ${run}: ${JSON.stringify({ msgsPerSec: r.msgsPerSec, p50: r.p50Ms, p99: r.p99Ms, errors: r.errors, closes: r.closes, undelivered: r.undelivered, setupFailed: r.setupFailed })}`);
  }
}

const fig = (row: Row, f: (r: GenResult) => number | undefined) => median(results[row].map(f).filter((x): x is number => typeof x === "number" && !Number.isNaN(x)));
const single = fig("single", (r) => r.msgsPerSec);
console.log(`\nS1 (${opts.pairs} pairs, ${opts.window} in flight, ${opts.seconds} s), medians of ${RUNS} runs`);
console.log("row | msg/s delivered | p99 ms | msg/s vs single node");
for (const row of ROWS) {
  const rate = fig(row, (r) => r.msgsPerSec);
  console.log(`${LABEL[row]} | ${rate} | ${fig(row, (r) => r.p99Ms)} | ${(rate / single).toFixed(2)}`);
}
