// The studio builds to static files (dist/) that `nova serve` serves at `/`. In development
// (`npm run dev`), API and WebSocket calls go to a `nova serve` on NOVA_URL (default
// http://127.0.0.1:8188).
import { defineConfig } from "vitest/config";

const target = process.env.NOVA_URL ?? "http://127.0.0.1:8188";

export default defineConfig({
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: { outDir: "dist", emptyOutDir: true, sourcemap: true },
  server: {
    proxy: {
      "/api": { target, ws: true },
      "/ws": { target, ws: true },
      "/prompt": target,
      "/queue": target,
      "/history": target,
      "/view": target,
      "/object_info": target,
    },
  },
  test: { environment: "node", include: ["src/**/*.test.ts"] },
});
