// A real nats-server with JetStream for the cluster tests: an ephemeral port and a
// temporary store. `npm test` installs nats-server first when it is missing
// (scripts/ensure-nats-server.sh); without it these tests fail and say how to get it,
// they never skip.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { removeDir, tempDir } from "./helpers.js";

const INSTALL_HINT =
  "the cluster tests need nats-server >= 2.9 with JetStream: apt-get install nats-server (Debian, Ubuntu), or put nats-server on PATH";

/** The nats-server program, checked to be 2.9 or later. */
export function natsServerPath(): string {
  const candidates = ["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"];
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

export class NatsServer {
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();

  private constructor(
    readonly storeDir: string,
    public port: number,
  ) {}

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  /** Starts a server on a free port (or `port`), with JetStream storing under a temp dir. */
  static async start(): Promise<NatsServer> {
    const s = new NatsServer(tempDir(), -1);
    await s.launch();
    return s;
  }

  private async launch(): Promise<void> {
    const child = spawn(natsServerPath(), ["-a", "127.0.0.1", "-p", String(this.port), "-js", "-sd", this.storeDir], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.child = child;
    this.exited = new Promise((resolve) => child.once("exit", () => resolve()));
    let text = "";
    this.port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nats-server did not start:\n${text}`)), 10_000);
      child.stderr?.on("data", (chunk: Buffer) => {
        text += chunk.toString();
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

  /** Starts again on the same port and store (after kill()). */
  async restart(): Promise<void> {
    await this.launch();
  }

  async stop(): Promise<void> {
    this.child?.kill("SIGTERM");
    await this.exited;
    removeDir(this.storeDir);
  }
}
