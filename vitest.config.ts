import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // test-results.json gives .ci/run its pass/fail counts.
    reporters: ["default", ["json", { outputFile: "test-results.json" }]],
  },
});
