// Instructions per delivered message: a figure this host's noise cannot move.
//
//   npm run bench:instructions -- [--against DIR] [--runs 3] [--pairs 10]
//                                 [--messages 2000] [--warmup 2000]
//
// Timed benchmarks on a shared virtual machine swing by a third between the host's
// phases (see README, Benchmarks), far more than the few per cent a change to the
// message path is worth. This one counts instead: the built server runs under
// valgrind's callgrind with its instrumentation off; `pairs` sender→recipient pairs
// log in and send `warmup` messages each (32 in flight per pair, as S1 does), so the
// JIT has compiled the path; then instrumentation is switched on around `messages`
// more per pair, and the instructions the server executed in that window (every
// thread: the event loop, libuv's pool, LevelDB's, V8's) are divided by the messages
// delivered. Kernel work is not counted. With `--against DIR` (another build's dist/,
// for instance a worktree of the commit before a change, built) the two builds take
// turns and the ratio of the medians is printed. Repeat runs of one build mostly agree
// within 1-2 %, now and then one is several per cent off (the JIT compiling in the
// window): compare medians of three or more. Needs valgrind (Debian: apt install
// valgrind).

import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { BenchClient, median, newUser, startServer, stopServer } from "./bench-lib.js";

const { values: opts } = parseArgs({
  options: {
    against: { type: "string" },
    runs: { type: "string", default: "3" },
    pairs: { type: "string", default: "10" },
    messages: { type: "string", default: "2000" },
    warmup: { type: "string", default: "2000" },
    help: { type: "boolean", default: false },
  },
});
if (opts.help) {
  console.log("usage: npm run bench:instructions -- [--against DIR] [--runs 3] [--pairs 10] [--messages 2000] [--warmup 2000]");
  process.exit(0);
}
const runs = Number(opts.runs);
const pairs = Number(opts.pairs);
const perPair = Number(opts.messages);
const warmup = Number(opts.warmup);
const WINDOW = 32;
const BODY = "x".repeat(100);

try {
  execFileSync("valgrind", ["--version"], { stdio: "ignore" });
} catch {
  console.error("bench:instructions needs valgrind (Debian: apt install valgrind)");
  process.exit(2);
}

const here = fileURLToPath(new URL("../src/main.js", import.meta.url));
const builds: [string, string][] = [["this build", here]];
if (opts.against) {
  const other = path.resolve(opts.against, "src/main.js");
  if (!existsSync(other)) {
    console.error(`--against: no ${other} (give a built dist/ directory)`);
    process.exit(2);
  }
  builds.push([opts.against, other]);
}

/** Sends `count` messages on every pair, WINDOW in flight each; resolves when all are delivered. */
function round(senders: BenchClient[], recipients: { c: BenchClient; uid: string }[], count: number): Promise<void> {
  return new Promise((done) => {
    let left = pairs * count;
    senders.forEach((s, i) => {
      const frame = `{"action":"message","data":{"uid":"${recipients[i].uid}","body":"${BODY}"}}\n`;
      let sent = 0;
      const send = (n: number) => {
        let out = "";
        for (let k = 0; k < n && sent < count; k++, sent++) out += frame;
        if (out) s.socket.write(out);
      };
      s.onLine = () => {};
      recipients[i].c.onLine = (line) => {
        if (!line.startsWith('{"action":"ev_message"')) return;
        send(1);
        if (--left === 0) done();
      };
      send(WINDOW);
    });
  });
}

async function measure(main: string): Promise<number> {
  const out = mkdtempSync(path.join(tmpdir(), "wirechat-callgrind-"));
  const server = await startServer([], {
    main,
    wrap: ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file", `--callgrind-out-file=${out}/cg.out`, `--log-file=${out}/valgrind.log`],
  });
  try {
    const senders: BenchClient[] = [];
    const recipients: { c: BenchClient; uid: string }[] = [];
    for (let i = 0; i < pairs; i++) {
      senders.push((await newUser(server.port)).c);
      recipients.push(await newUser(server.port));
    }
    await round(senders, recipients, warmup);
    const pid = String(server.proc.pid);
    execFileSync("callgrind_control", ["-i", "on", pid], { stdio: "ignore" });
    await round(senders, recipients, perPair);
    execFileSync("callgrind_control", ["-i", "off", pid], { stdio: "ignore" });
    execFileSync("callgrind_control", ["-d", pid], { stdio: "ignore" });
    for (const c of [...senders, ...recipients.map((r) => r.c)]) c.socket.destroy();
  } finally {
    await stopServer(server);
  }
  // The dump made while instrumentation was on (cg.out.1); the final one counts nothing.
  let total = 0;
  for (const f of readdirSync(out).filter((n) => n.startsWith("cg.out"))) {
    for (const m of readFileSync(path.join(out, f), "utf8").matchAll(/^totals: (\d+)/gm)) total += Number(m[1]);
  }
  rmSync(out, { recursive: true, force: true });
  return total / (pairs * perPair);
}

const results = builds.map(() => [] as number[]);
for (let r = 1; r <= runs; r++) {
  for (let b = 0; b < builds.length; b++) {
    const perMsg = await measure(builds[b][1]);
    results[b].push(perMsg);
    console.log(`${builds[b][0]} run ${r}: ${Math.round(perMsg)} instructions per message`);
  }
}
console.log(`\n${pairs} pairs, ${perPair} messages each after ${warmup} to warm up; medians of ${runs}`);
const base = median(results[0]);
console.log(`this build: ${Math.round(base)} instructions per delivered message`);
if (builds.length > 1) {
  const other = median(results[1]);
  console.log(`${builds[1][0]}: ${Math.round(other)}; this build / it: ${(base / other).toFixed(3)}`);
}
