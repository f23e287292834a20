// clock.ts: the wall clock read once per task, and within() (a wait with a deadline).
import { describe, expect, it } from "vitest";
import { clockMs, within } from "../src/clock.js";

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

describe("within", () => {
  it("is true once the promise fulfils, and leaves no timer behind", async () => {
    const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
    const before = timers();
    expect(await within(new Promise((r) => setTimeout(r, 5)), 60_000)).toBe(true);
    expect(timers()).toBe(before);
  });

  it("is false at the deadline while the promise goes on, and rejects with the promise's own error", async () => {
    const t0 = Date.now();
    expect(await within(new Promise(() => {}), 20)).toBe(false);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(19);
    expect(await within(Promise.resolve(), -5)).toBe(true); // a deadline already past: the settled promise still wins
    await expect(within(Promise.reject(new Error("boom")), 1000)).rejects.toThrow("boom");
  });
});
