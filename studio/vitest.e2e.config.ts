// Browser tests: Debian's chromium driven by playwright-core against a real `nova serve`
// (NOVA_BIN, default ../target/debug/nova) serving the built studio (dist/).
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["e2e/**/*.e2e.test.ts"],
    testTimeout: 240_000,
    hookTimeout: 60_000,
    fileParallelism: false,
  },
});
