// The admin port's Prometheus registry: process and event-loop metrics from
// prom-client's defaults, and wirechat's own, read from the plain counters of
// metrics.ts and from live state only when /metrics is scraped (nothing here runs on
// the message path).

import { createRequire } from "node:module";
import client from "prom-client";
import { logDrops } from "../log.js";
import type { Metrics, Buckets } from "../metrics.js";
import { CODES } from "../protocol/codes.js";
import type { Session } from "../protocol/session.js";
import type { BlobStore } from "../storage/blobs.js";
import type { Storage } from "../storage/db.js";
import type { ConnectionTable } from "../transport/live.js";
import { connectionsOf, doorsOf, stateOf } from "./connections.js";

type Labels = Record<string, string | number>;
interface Sample {
  value: number;
  labels?: Labels;
  metricName?: string;
}

/** A metric whose samples are computed at scrape time. */
function computed(registry: client.Registry, name: string, help: string, type: "counter" | "gauge" | "histogram", samples: () => Sample[]): void {
  registry.registerMetric({
    name,
    help,
    type,
    aggregator: "sum",
    get: async () => ({ name, help, type, aggregator: "sum", values: samples() }),
  } as unknown as client.Metric);
}

function histogram(name: string, b: Buckets): Sample[] {
  const out: Sample[] = [];
  let acc = 0;
  b.bounds.forEach((le, i) => {
    acc += b.counts[i];
    out.push({ metricName: `${name}_bucket`, labels: { le }, value: acc });
  });
  out.push({ metricName: `${name}_bucket`, labels: { le: "+Inf" }, value: b.count });
  out.push({ metricName: `${name}_sum`, value: b.sum });
  out.push({ metricName: `${name}_count`, value: b.count });
  return out;
}

/**
 * prom-client's default process and Node.js metrics, but for its GC histogram: that
 * one observes every collection through perf_hooks, which made each scavenge about
 * twice as long under S1 (10 s, --trace-gc: 1,378 ms of scavenges in 289 without it,
 * 2,623 ms in 244 with it; 78,010 vs 65,606 msg/s). GC time is in the
 * --trace-gc log and `nodejs_eventloop_lag_*` shows its pauses.
 */
function defaultMetrics(registry: client.Registry): void {
  const require = createRequire(import.meta.url);
  const { metricsList } = require("prom-client/lib/defaultMetrics") as { metricsList: string[] };
  for (const name of metricsList) {
    if (name === "gc") continue;
    const install = require(`prom-client/lib/metrics/${name}`) as (r: client.Registry, c: object) => void;
    install(registry, { eventLoopMonitoringPrecision: 10 });
  }
}

/** Connections by door and state, and the sums over them that the metrics report. */
function readLive(tables: readonly ConnectionTable[]) {
  const byState = new Map<string, number>();
  let queued = 0;
  let uploads = 0;
  let bytesIn = 0;
  let bytesOut = 0;
  for (const [conn, session] of connectionsOf(tables)) {
    const key = `${conn.door}\n${stateOf(conn, session as Session)}`;
    byState.set(key, (byState.get(key) ?? 0) + 1);
    queued += conn.outbound;
    uploads += conn.uploads;
    bytesIn += conn.bytesIn;
    bytesOut += conn.bytesOut;
  }
  return { byState, queued, uploads, bytesIn, bytesOut };
}

export function metricsRegistry(
  m: Metrics,
  tables: readonly ConnectionTable[],
  blobs: BlobStore,
  storage: Pick<Storage, "level0Tables" | "failedBatches">,
  info: { version: string; nodeId: string },
): client.Registry {
  const registry = new client.Registry();
  defaultMetrics(registry);

  // Live state is read once per scrape (every metric below shares it), not per metric.
  let snapshot: ReturnType<typeof readLive> | undefined;
  const live = () => {
    if (!snapshot) {
      snapshot = readLive(tables);
      setImmediate(() => (snapshot = undefined));
    }
    return snapshot;
  };

  computed(registry, "wirechat_connections", "Open connections by door and state", "gauge", () => {
    const { byState } = live();
    const out: Sample[] = [];
    // Every door the server has, at zero too (a series that vanished would read as stale).
    for (const door of doorsOf(tables)) {
      for (const state of ["unauthenticated", "authenticated", "closing"]) out.push({ labels: { door, state }, value: byState.get(`${door}\n${state}`) ?? 0 });
    }
    return out;
  });
  computed(registry, "wirechat_info", "This server: its version and node name (--node-id), always 1", "gauge", () => [{ labels: { version: info.version, node_id: info.nodeId }, value: 1 }]);
  computed(registry, "wirechat_connections_opened_total", "Connections accepted since start", "counter", () => [{ value: m.connectionsOpened }]);
  computed(registry, "wirechat_connections_refused_total", "Connections refused at a connection cap or by an address ban", "counter", () => [{ value: m.refused }]);
  computed(registry, "wirechat_disconnects_total", "Connections the server closed, by reason", "counter", () =>
    Object.entries(m.closes).map(([reason, value]) => ({ labels: { reason }, value })),
  );
  computed(registry, "wirechat_auth_total", "Password and session checks, by result", "counter", () =>
    Object.entries(m.auth).map(([result, value]) => ({ labels: { result }, value })),
  );
  computed(registry, "wirechat_requests_total", "Requests answered, by action and status code", "counter", () => {
    const out: Sample[] = [];
    for (const [action, row] of m.requests) row.forEach((value, code) => value > 0 && out.push({ labels: { action, code: String(code), status: CODES[code].name }, value }));
    return out;
  });
  computed(registry, "wirechat_messages_stored_total", "Messages written to disk and acknowledged", "counter", () => [{ value: m.messagesStored }]);
  computed(registry, "wirechat_messages_delivered_total", "Message events handed to connections (live or by a sync): the recipients', and the sender's own connections' copy of what it sent", "counter", () => [{ value: m.messagesDelivered }]);
  computed(registry, "wirechat_offline_queue", "Direct messages stored since start for users with no connection, not yet sent to them", "gauge", () => [{ value: m.offlineQueue }]);
  computed(registry, "wirechat_delivery_lag_seconds", "Time messages waited for their group commit (per batch: from its first message to its fsync)", "histogram", () => histogram("wirechat_delivery_lag_seconds", m.deliveryLag));
  computed(registry, "wirechat_commit_batch_ops", "Operations per group-commit batch", "histogram", () => histogram("wirechat_commit_batch_ops", m.batchOps));
  computed(registry, "wirechat_commit_batch_seconds", "Duration of each group-commit batch write (fsync included when durable)", "histogram", () => histogram("wirechat_commit_batch_seconds", m.batchSeconds));
  computed(registry, "wirechat_log_lines_dropped_total", "Log lines dropped because stdout was not taking them (more than 16 MiB waiting)", "counter", () => [{ value: logDrops.lines }]);
  computed(registry, "wirechat_commit_batch_failures_total", "Group-commit batch writes that failed (each failed its requests with status 16)", "counter", () => [{ value: storage.failedBatches }]);
  computed(registry, "wirechat_bytes_in_total", "Bytes received from clients", "counter", () => [{ value: m.bytesInClosed + live().bytesIn }]);
  computed(registry, "wirechat_bytes_out_total", "Bytes sent to clients", "counter", () => [{ value: m.bytesOutClosed + live().bytesOut }]);
  computed(registry, "wirechat_outbound_queued_bytes", "Bytes waiting to be sent, over every connection", "gauge", () => [{ value: live().queued }]);
  computed(registry, "wirechat_partial_input_bytes", "Bytes of unfinished requests held: TCP connections' frames, WebSockets' messages, HTTP request bodies (--max-partial-input)", "gauge", () => [{ value: m.partialInput.bytes }]);
  computed(registry, "wirechat_attachments_in_flight", "Attachment uploads streaming in", "gauge", () => [{ value: live().uploads }]);
  computed(registry, "wirechat_attachments_shed_total", "Attachment uploads given up past --max-uploading for others, as slower than 16 x --upload-min-rate", "counter", () => [{ value: blobs.shedUploads }]);
  computed(registry, "wirechat_attachments_stored_bytes", "Bytes of stored attachment files", "gauge", () => [{ value: blobs.storedBytes }]);
  computed(registry, "wirechat_leveldb_level0_tables", "Tables in LevelDB's level 0 (it slows writes from 8 and stops them at 12 until its compaction catches up)", "gauge", () => {
    const n = storage.level0Tables();
    return n === undefined ? [] : [{ value: n }];
  });
  return registry;
}
