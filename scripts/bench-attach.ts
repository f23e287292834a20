// Attachment benchmark: relays one large attachment through a real server while two
// other clients chat, and reports what it cost the server.
//
//   scripts/bench-attach [--mib 64] [--runs 3]        (npm run bench:attach -- …)
//
// Per run, on a fresh server (child process, temp data dir, --stats 1):
//   relay      wall time from the sender's first byte to the recipient's last, and MB/s
//              of decoded attachment
//   memory     the server's peak RSS (sampled from /proc every 10 ms) minus its idle RSS
//   event loop the server's own monitorEventLoopDelay p99 and max during the relay
//   chat       round trip of small messages between two other clients (send → their
//              ev_message) every 20 ms during the relay, p50 and p99
// The medians over the runs are printed last.

import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import { BenchClient, median, newUser, rssKiB, startServer, stopServer } from "./bench-lib.js";

const { values: opts } = parseArgs({
  options: { mib: { type: "string", default: "64" }, runs: { type: "string", default: "3" } },
});
const MIB = Number(opts.mib);
const RUNS = Number(opts.runs);

interface Run {
  seconds: number;
  mbPerSec: number;
  rssIncreaseMiB: number;
  loopP99: number;
  loopMax: number;
  chatP50: number;
  chatP99: number;
  chats: number;
}

function request(c: BenchClient, action: string, data: object): Promise<any> {
  const reply = c.next((l) => l.startsWith(`{"action":"${action}"`));
  c.send({ action, data });
  return reply;
}

async function once(payload: Buffer): Promise<Run> {
  const server = await startServer(["--stats", "1", "--max-attach", String(payload.length)]);
  const pid = server.proc.pid as number;
  const sender = await newUser(server.port);
  const recipient = await newUser(server.port);
  const x = await newUser(server.port);
  const y = await newUser(server.port);
  const b64 = payload.toString("base64");
  const frame = JSON.stringify({ action: "message", data: { uid: recipient.uid, body: "file", attach: { mime: "application/octet-stream", data: b64 } } }) + "\n";

  await new Promise((r) => setTimeout(r, 500));
  const idle = Math.max(rssKiB(pid), rssKiB(pid));
  await request(x.c, "stats", { reset: true });

  let peak = idle;
  const sampler = setInterval(() => (peak = Math.max(peak, rssKiB(pid))), 10);

  // the chatting pair
  const rtts: number[] = [];
  const sentAt = new Map<string, number>();
  y.c.onLine = (l) => {
    if (!l.startsWith('{"action":"ev_message"')) return;
    const t = sentAt.get(JSON.parse(l).data.body);
    if (t !== undefined) rtts.push(performance.now() - t);
  };
  x.c.onLine = () => {};
  let n = 0;
  const chatter = setInterval(() => {
    const body = `chat ${n++}`;
    sentAt.set(body, performance.now());
    x.c.send({ action: "message", data: { uid: y.uid, body } });
  }, 20);

  // the relay: count the recipient's bytes up to the end of its ev_message
  sender.c.onLine = () => {};
  const t0 = performance.now();
  const done = new Promise<number>((resolve) => {
    let received = 0;
    recipient.c.socket.removeAllListeners("data");
    recipient.c.socket.on("data", (chunk: Buffer) => {
      received += chunk.length;
      if (received > b64.length && chunk.includes("\n")) resolve(performance.now());
    });
  });
  sender.c.socket.write(frame);
  const t1 = await done;
  clearInterval(chatter);
  clearInterval(sampler);
  await new Promise((r) => setTimeout(r, 100));
  const stats = (await request(x.c, "stats", {})).data;

  for (const c of [sender, recipient, x, y]) c.c.socket.destroy();
  await stopServer(server);
  rtts.sort((a, b) => a - b);
  const q = (p: number) => rtts[Math.min(rtts.length - 1, Math.floor(p * rtts.length))];
  const seconds = (t1 - t0) / 1000;
  return {
    seconds,
    mbPerSec: payload.length / 1e6 / seconds,
    rssIncreaseMiB: (peak - idle) / 1024,
    loopP99: stats.event_loop_delay_ms.p99,
    loopMax: stats.event_loop_delay_ms.max,
    chatP50: q(0.5),
    chatP99: q(0.99),
    chats: rtts.length,
  };
}

function show(label: string, r: Run): string {
  return (
    `${label}: relay ${r.seconds.toFixed(2)} s (${r.mbPerSec.toFixed(1)} MB/s), ` +
    `server peak RSS +${r.rssIncreaseMiB.toFixed(1)} MiB, ` +
    `event loop p99 ${r.loopP99.toFixed(1)} ms max ${r.loopMax.toFixed(1)} ms, ` +
    `chat round trip p50 ${r.chatP50.toFixed(2)} ms p99 ${r.chatP99.toFixed(2)} ms (${r.chats} messages)`
  );
}

async function main(): Promise<void> {
  const payload = randomBytes(MIB * 1024 * 1024);
  const runs: Run[] = [];
  for (let i = 0; i < RUNS; i++) {
    runs.push(await once(payload));
    console.log(show(`run ${i + 1}`, runs[i]));
  }
  const med = (f: (r: Run) => number) => median(runs.map(f));
  console.log(
    show(`median of ${RUNS} (${MIB} MiB attachment)`, {
      seconds: med((r) => r.seconds),
      mbPerSec: med((r) => r.mbPerSec),
      rssIncreaseMiB: med((r) => r.rssIncreaseMiB),
      loopP99: med((r) => r.loopP99),
      loopMax: med((r) => r.loopMax),
      chatP50: med((r) => r.chatP50),
      chatP99: med((r) => r.chatP99),
      chats: med((r) => r.chats),
    }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
