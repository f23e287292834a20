import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { COMMAND_HELP, COMMANDS } from "../src/cli/commands.js";
import { ConfigError, OPTIONS, defaultConfig, helpText, parseArgs } from "../src/config.js";

const main = fileURLToPath(new URL("../dist/src/main.js", import.meta.url));

describe("options", () => {
  it("defaults to 0.0.0.0:7788 with data in ./data", () => {
    expect(defaultConfig()).toMatchObject({ host: "0.0.0.0", port: 7788, dataDir: "./data", maxFrame: 1048576, maxDepth: 32 });
  });

  it("reads environment variables, and flags win over them", () => {
    const env = { WIRECHAT_PORT: "7790", WIRECHAT_DATA_DIR: "/env/dir", WIRECHAT_MAX_FRAME: "2048" };
    expect(parseArgs([], env).config).toMatchObject({ port: 7790, dataDir: "/env/dir", maxFrame: 2048 });
    const both = parseArgs(["--port", "7791", "--data-dir=/flag/dir"], env).config;
    expect(both).toMatchObject({ port: 7791, dataDir: "/flag/dir", maxFrame: 2048 });
  });

  it("an empty variable is unset; an empty flag clears what the file says", () => {
    const dir = mkdtempSync(path.join(tmpdir(), "wirechat-conf-"));
    const file = path.join(dir, "wirechat.json");
    writeFileSync(file, JSON.stringify({ "admin-token": "from-file", port: 7792 }));
    const env = { WIRECHAT_CONFIG: file, WIRECHAT_ADMIN_TOKEN: "", WIRECHAT_PORT: "" };
    expect(parseArgs([], env).config).toMatchObject({ adminToken: "from-file", port: 7792 });
    expect(parseArgs(["--admin-token="], env).config.adminToken).toBe("");
    rmSync(dir, { recursive: true, force: true });
  });

  it("refuses unknown options, missing values and bad numbers", () => {
    expect(() => parseArgs(["--nope"], {})).toThrow(ConfigError);
    expect(() => parseArgs(["--port"], {})).toThrow(/needs a value/);
    expect(() => parseArgs(["--port", "abc"], {})).toThrow(/whole number/);
    expect(() => parseArgs(["--max-frame", "1"], {})).toThrow(/at least/);
    expect(() => parseArgs(["--background-nice", "20"], {})).toThrow(/at most 19/);
    expect(() => parseArgs(["--heap-growth", "301"], {})).toThrow(/at most 300/);
    expect(() => parseArgs(["--bcrypt-cost", "32"], {})).toThrow(/--bcrypt-cost: must be at most 31/);
    expect(parseArgs(["--heap-growth", "50"], {}).config.heapGrowth).toBe(50);
    expect(() => parseArgs([], { WIRECHAT_PORT: "x" })).toThrow(/WIRECHAT_PORT/);
    expect(() => parseArgs(["--log-level", "loud"], {})).toThrow(/--log-level: expected fatal or error or warn or info or debug or trace or silent, got "loud"/);
    expect(() => parseArgs(["--port", "99999"], {})).toThrow(/--port: must be at most 65535/);
    expect(() => parseArgs(["--port", "-1"], {})).toThrow(/whole number/);
    // -1 turns a door off, from a flag or the environment too (over a config file that turned it on).
    expect(parseArgs(["--rust-port", "-1"], { WIRECHAT_HTTP_PORT: "-1" }).config).toMatchObject({ rustPort: -1, httpPort: -1 });
    expect(() => parseArgs(["--rooms-port", "-2"], {})).toThrow(/at least -1/);
    // An empty --data-dir was the working directory (its db made there); an empty host, room or stream name nothing sensible.
    expect(() => parseArgs(["--data-dir="], {})).toThrow(/--data-dir: must not be empty/);
    for (const flag of ["--host", "--admin-host", "--rust-room", "--lobby", "--nats-stream"]) expect(() => parseArgs([flag, " "], {})).toThrow(/must not be empty/);
    // Seconds past what a Node timer can wait (it fires at once instead).
    expect(() => parseArgs(["--close-linger", "2147484"], {})).toThrow(/--close-linger: must be at most 2147483/);
    expect(parseArgs(["--close-linger", "2147483"], {}).config.closeLinger).toBe(2147483);
    // A token a header cannot carry as it is (Node reads header values as latin1).
    expect(() => parseArgs(["--admin-token", "jeton-été"], {})).toThrow(/--admin-token: only printable ASCII/);
    expect(parseArgs(["--admin-token", "s3cret-Token_1"], {}).config.adminToken).toBe("s3cret-Token_1");
  });

  it("--help lists every flag and environment variable", () => {
    const out = execFileSync(process.execPath, [main, "--help"], { encoding: "utf8" });
    expect(out).toBe(helpText(COMMANDS) + "\n");
    for (const o of OPTIONS) {
      expect(out).toContain(o.flag);
      expect(out).toContain(o.env);
    }
  });

  it("--help names every operator command, and `wirechat help` shows how to call each", () => {
    const out = execFileSync(process.execPath, [main, "--help"], { encoding: "utf8" });
    const from = out.indexOf("Commands: ") + "Commands: ".length;
    const listed = out.slice(from, out.indexOf(".\n", from)).replace(/\s+/g, " ").replace(" (the default)", "").split(", ");
    expect(listed.sort()).toEqual([...COMMANDS, "serve", "chat"].sort());
    const help = execFileSync(process.execPath, [main, "help", "user"], { encoding: "utf8" });
    expect(help).toBe(COMMAND_HELP + "\n");
    for (const c of COMMANDS) expect(COMMAND_HELP).toContain(`wirechat ${c}`);
  });

  it("the binary exits 2 with a message for a bad option", () => {
    const r = spawnSync(process.execPath, [main, "--port", "nope"], { encoding: "utf8" });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/--port: expected a whole number/);
  });

  it("--trusted-addresses: each an IP address, kept as sockets spell it", () => {
    // "bogus" was taken and matched nothing; 0:0:0:0:0:0:0:1 never matched ::1.
    expect(parseArgs(["--trusted-addresses", " 0:0:0:0:0:0:0:1, 127.0.0.1,,2001:DB8:0::1 "], {}).config.trustedAddresses).toBe("::1,127.0.0.1,2001:db8::1");
    expect(parseArgs(["--trusted-addresses", ""], {}).config.trustedAddresses).toBe("");
    expect(() => parseArgs(["--trusted-addresses", "bogus,1.2.3.4"], {})).toThrow(/--trusted-addresses: 'bogus' is not an IP address/);
    expect(() => parseArgs([], { WIRECHAT_TRUSTED_ADDRESSES: "10.0.0.0/8" })).toThrow(/WIRECHAT_TRUSTED_ADDRESSES: '10.0.0.0\/8' is not an IP address/);
  });

  it("--tls-cert and --tls-key go together: one alone is refused (the server started without TLS and without a word)", () => {
    expect(() => parseArgs(["--tls-cert", "c.pem"], {})).toThrow(/--tls-cert and --tls-key go together/);
    expect(() => parseArgs([], { WIRECHAT_TLS_KEY: "k.pem" })).toThrow(/go together/);
    expect(parseArgs(["--tls-cert", "c.pem"], { WIRECHAT_TLS_KEY: "k.pem" }).config).toMatchObject({ tlsCert: "c.pem", tlsKey: "k.pem" });
    const r = spawnSync(process.execPath, [main, "--tls-cert", "c.pem", "--port", "0", "--admin", "off"], { encoding: "utf8", timeout: 20_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/--tls-cert and --tls-key go together/);
  });
});
