// `stats`: the server's own health figures (event-loop delay, memory, connections),
// for benchmarks and monitoring. Registered only when the server runs with --stats 1.

import { monitorEventLoopDelay } from "node:perf_hooks";
import { nowSeconds } from "../protocol/frames.js";
import type { Services } from "./services.js";

export function registerStats(sv: Services, connections: () => number): void {
  if (!sv.config.stats) return;
  const delay = monitorEventLoopDelay({ resolution: 10 });
  delay.enable();
  const ms = (ns: number) => Math.round(ns / 1e4) / 100;

  sv.dispatcher.register<{ reset?: boolean }>({
    name: "stats",
    public: true,
    schema: { type: "object", properties: { reset: { type: "boolean" } } },
    handle(req) {
      const mem = process.memoryUsage();
      const reply = {
        time: nowSeconds(),
        connections: connections(),
        rss: mem.rss,
        heap_used: mem.heapUsed,
        event_loop_delay_ms: { p50: ms(delay.percentile(50)), p99: ms(delay.percentile(99)), max: ms(delay.max) },
      };
      if (req.data.reset) delay.reset();
      return reply;
    },
  });
}
