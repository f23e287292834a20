// A real nats-server with JetStream, started as a child process: one on its own, or
// several routed into one NATS cluster. Shared by the cluster tests and the cluster
// benchmark. Each server listens for clients on an ephemeral port of 127.0.0.1 and
// stores under a temporary directory of its own.
//
// `npm test` installs nats-server first when it is missing (ensure-nats-server.sh);
// without it, natsServerPath() throws an error that says how to get it.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const INSTALL_HINT = "cluster mode needs nats-server >= 2.9 with JetStream: apt-get install nats-server (Debian, Ubuntu), sh scripts/ensure-nats-server.sh (downloads it into .nats-server/ without root), or put nats-server on PATH";

/**
 * The project's own copy, which ensure-nats-server.sh unpacks into .nats-server/ when it
 * cannot install the package (not root): the first directory up from this file with a
 * package.json (scripts/ here, dist/scripts/ when built).
 */
function projectCopy(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, "package.json")) && path.dirname(dir) !== dir) dir = path.dirname(dir);
  return path.join(dir, ".nats-server", "nats-server");
}

/** The nats-server program, checked to be 2.9 or later. */
export function natsServerPath(): string {
  const candidates = ["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server", projectCopy()];
  for (const bin of candidates) {
    if (bin.startsWith("/") && !existsSync(bin)) continue;
    const r = spawnSync(bin, ["--version"], { encoding: "utf8" });
    if (r.error || r.status !== 0) continue;
    const m = /v(\d+)\.(\d+)\./.exec(r.stdout + r.stderr);
    if (m && (Number(m[1]) > 2 || (Number(m[1]) === 2 && Number(m[2]) >= 9))) return bin;
    throw new Error(`${bin} is ${(r.stdout + r.stderr).trim()}; ${INSTALL_HINT}`);
  }
  throw new Error(`nats-server not found; ${INSTALL_HINT}`);
}

/** A free TCP port of 127.0.0.1 (bound, then released). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** A member of a NATS cluster: its name, its route port, and the other members' route ports. */
export interface ClusterRoute {
  cluster: string;
  name: string;
  port: number;
  routes: number[];
}

export class NatsServer {
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private running = false;

  private constructor(
    readonly storeDir: string,
    public port: number,
    readonly route: ClusterRoute | undefined,
    /** More nats-server arguments (authentication, TLS). */
    readonly extra: readonly string[] = [],
  ) {}

  /** Whether its process is running (false once it exited, e.g. on a route port taken meanwhile). */
  get alive(): boolean {
    return this.running;
  }

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  /** Its server name (a cluster member's, else "nats"). */
  get name(): string {
    return this.route?.name ?? "nats";
  }

  /** Starts a server on a free client port, alone or (`route`) as a member of a cluster; `extra`: more of its flags. */
  static async start(route?: ClusterRoute, extra: readonly string[] = []): Promise<NatsServer> {
    const s = new NatsServer(mkdtempSync(path.join(tmpdir(), "wirechat-nats-")), -1, route, extra);
    try {
      await s.launch();
    } catch (err) {
      rmSync(s.storeDir, { recursive: true, force: true });
      throw err;
    }
    return s;
  }

  private async launch(jetstream = true): Promise<void> {
    const args = ["-a", "127.0.0.1", "-p", String(this.port), ...(jetstream ? ["-js"] : []), "-sd", this.storeDir, ...this.extra];
    const r = this.route;
    if (r) {
      args.push("-n", r.name, "--cluster_name", r.cluster, "--cluster", `nats://127.0.0.1:${r.port}`);
      args.push("--routes", r.routes.map((p) => `nats://127.0.0.1:${p}`).join(","));
    }
    const child = spawn(natsServerPath(), args, { stdio: ["ignore", "ignore", "pipe"] });
    this.child = child;
    this.running = true;
    this.exited = new Promise((resolve) =>
      child.once("exit", () => {
        this.running = false;
        resolve();
      }),
    );
    let text = "";
    this.port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nats-server did not start:\n${text}`)), 10_000);
      child.stderr?.on("data", (chunk: Buffer) => {
        // Only the start-up lines are kept: a cluster member logs on for its whole life.
        if (text.length < 64 * 1024) text += chunk.toString();
        const port = /Listening for client connections on [^\s]*:(\d+)/.exec(text);
        if (port && text.includes("Server is ready")) {
          clearTimeout(timer);
          resolve(Number(port[1]));
        }
      });
      child.once("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`nats-server exited (${code}):\n${text}`));
      });
    });
  }

  /** kill -9, as a crash. */
  async kill(): Promise<void> {
    this.child?.kill("SIGKILL");
    await this.exited;
  }

  /**
   * kill -STOP: the process stalls with its connections open, so its clients see no
   * disconnect for minutes (resume() with kill -CONT).
   */
  pause(): void {
    this.child?.kill("SIGSTOP");
  }

  resume(): void {
    this.child?.kill("SIGCONT");
  }

  /**
   * Starts again on the same ports and store (after kill()); `jetstream: false`, as a
   * server whose clients connect while its JetStream does not answer (yet).
   */
  async restart(opts: { jetstream?: boolean } = {}): Promise<void> {
    await this.launch(opts.jetstream ?? true);
  }

  async stop(): Promise<void> {
    this.resume(); // a paused process would hold SIGTERM until it is continued
    this.child?.kill("SIGTERM");
    await this.exited;
    rmSync(this.storeDir, { recursive: true, force: true });
  }
}

/**
 * `n` nats-servers routed into one NATS cluster (server names n1…nN), started together;
 * resolves once JetStream answers through every one of them (its meta leader elected),
 * so a stream with n replicas can be created at once.
 *
 * The route ports are picked free and bound by nats-server a moment later, after it has
 * said it is ready; a parallel test that takes one meanwhile makes that member exit (a
 * fatal listen error). Then the whole cluster starts again on new ports (3 attempts).
 */
export async function startNatsCluster(n: number, name = `wc${process.pid}`): Promise<NatsServer[]> {
  for (let attempt = 1; ; attempt++) {
    const ports: number[] = [];
    for (let i = 0; i < n; i++) ports.push(await freePort());
    const started = await Promise.allSettled(
      ports.map((port, i) => NatsServer.start({ cluster: name, name: `n${i + 1}`, port, routes: ports.filter((p) => p !== port) })),
    );
    const servers = started.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    try {
      const failed = started.find((r) => r.status === "rejected");
      if (failed) throw failed.reason;
      for (const s of servers) await jetStreamReady(s.url, 30_000);
      if (servers.every((s) => s.alive)) return servers;
      throw new Error(`a member of the NATS cluster exited: ${servers.filter((s) => !s.alive).map((s) => s.name).join(", ")}`);
    } catch (err) {
      const memberDied = servers.length < n || servers.some((s) => !s.alive);
      await Promise.all(servers.map((s) => s.stop()));
      if (!memberDied || attempt === 3) throw err;
    }
  }
}

/** Waits until JetStream answers an account-info request through `url`. */
async function jetStreamReady(url: string, timeoutMs: number): Promise<void> {
  const { connect } = await import("@nats-io/transport-node");
  const { jetstreamManager } = await import("@nats-io/jetstream");
  const deadline = Date.now() + timeoutMs;
  const nc = await connect({ servers: url });
  try {
    for (;;) {
      try {
        const jsm = await jetstreamManager(nc, { timeout: 2000 });
        await jsm.getAccountInfo();
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`JetStream of the NATS cluster not ready at ${url}: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  } finally {
    await nc.close();
  }
}
