// clock.ts: the wall clock read once per task.
import { describe, expect, it } from "vitest";
import { clockMs } from "../src/clock.js";

describe("clockMs", () => {
  it("keeps one reading for the rest of a task and reads again in the next", async () => {
    await new Promise((r) => setTimeout(r, 1)); // a fresh task
    const before = Date.now();
    const t0 = clockMs();
    expect(t0).toBeGreaterThanOrEqual(before);
    const until = Date.now() + 3;
    while (Date.now() < until); // the same task, 3 ms on
    expect(clockMs()).toBe(t0);
    await new Promise((r) => setTimeout(r, 5));
    const t1 = clockMs();
    expect(t1).toBeGreaterThanOrEqual(t0 + 5);
    expect(t1).toBeLessThanOrEqual(Date.now());
  });

  it("reads again after the task's microtasks, never ahead of the clock", async () => {
    const t0 = clockMs();
    const until = Date.now() + 2;
    while (Date.now() < until);
    await new Promise<void>((r) => setImmediate(r));
    const t1 = clockMs();
    expect(t1).toBeGreaterThan(t0);
    expect(t1).toBeLessThanOrEqual(Date.now());
  });
});
