// CI's short forms of the two tools in scripts/: the fuzzer with 100,000 frames and a
// 20-second soak, each run as the command a person would run (against the dist/ build
// that `npm test` makes first), each starting its own server. They pass only when the
// tool prints PASS and exits 0: no crash, no lost or extra reply, no error logged, no
// descriptor left open, every acknowledged message delivered.

import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = fileURLToPath(new URL("..", import.meta.url));

function run(script: string, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [`dist/scripts/${script}.js`, ...args], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    p.stdout.on("data", (d: Buffer) => (out += d.toString()));
    p.stderr.on("data", (d: Buffer) => (out += d.toString()));
    p.on("exit", (code) => resolve({ code, out }));
  });
}

describe("scripts/fuzz, short form", () => {
  it("sends 100,000 mutated frames: every checked frame answered in order, no crash, no error logged, no leak", async () => {
    const { code, out } = await run("fuzz", ["--frames", "100000", "--seed", "9", "--progress", "0"]);
    expect(out, out).toMatch(/^frames sent +100000 in /m);
    expect(out).toMatch(/^replies received +[1-9]\d* /m);
    expect(out).toMatch(/^server RSS +min [\d.]+ MiB, max [\d.]+ MiB \(bound 512\.0 MiB\)/m);
    expect(out).toMatch(/^canary ping +p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms over [1-9]\d* pings/m);
    expect(out).toMatch(/^server log +0 lines at level >= 50/m);
    expect(out).toMatch(/^PASS \(seed 9\)$/m);
    expect(code).toBe(0);
  }, 240_000);
});

describe("scripts/soak, smoke", () => {
  it("runs a mixed load for 20 s and every acknowledged message reaches its recipient", async () => {
    // Latency and memory bounds are loose here (a short run on a shared CI machine);
    // delivery, crashes and logged errors are checked as in the full soak.
    const { code, out } = await run("soak", [
      "--minutes", "0.34", "--rate", "300", "--users", "30", "--channels", "4", "--attach-max", "65536",
      "--reconnects", "60", "--logouts", "20", "--sample", "5", "--settle", "15",
      "--canary-p99", "5000", "--rss-growth", "10", "--seed", "7",
    ]);
    expect(out, out).toMatch(/^direct messages +[1-9]\d* acknowledged, 0 missing/m);
    expect(out).toMatch(/^channel messages +[1-9]\d* acknowledged, 0 missing from history/m);
    expect(out).toMatch(/^server log +0 lines at level >= 50/m);
    // Each minute says how much CPU time the hypervisor took from the machine.
    expect(out).toMatch(/^ +minute +p50 +p99 +max +pings +steal\n +1 .* (\d+ %|n\/a)$/m);
    expect(out).toMatch(/^PASS \(seed 7\)$/m);
    expect(code).toBe(0);
  }, 180_000);
});
