// `stats`: the server's own health figures (event-loop delay, memory, connections),
// for benchmarks and monitoring. Registered only when the server runs with --stats 1.

import { monitorEventLoopDelay } from "node:perf_hooks";
import { nowSeconds } from "../protocol/frames.js";
import type { Services } from "./services.js";

export function registerStats(sv: Services, connections: () => number): void {
  if (!sv.config.stats) return;
  // The histogram records each sampling interval whole (resolution included), so the
  // delay is what exceeds the resolution.
  const RESOLUTION_MS = 1;
  const delay = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  delay.enable();
  const ms = (ns: number) => Math.max(0, Math.round((ns / 1e6 - RESOLUTION_MS) * 100) / 100);

  sv.dispatcher.register<{ reset?: boolean }>({
    name: "stats",
    cluster: true,
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
