// The studio in a real browser against a real service: Debian's chromium (no browser
// download) driven by playwright-core, `nova serve` started here on a loopback port serving
// the built studio. Screenshots of each state go to test-results/.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { chromium, type Browser, type Page } from "playwright-core";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

const root = resolve(__dirname, "..");
const bin = process.env.NOVA_BIN ?? resolve(root, "../target/debug/nova");
const shots = resolve(root, "test-results");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

let server: ChildProcess;
let base: string;
let browser: Browser;
let data: string;

beforeAll(async () => {
  mkdirSync(shots, { recursive: true });
  data = mkdtempSync(join(tmpdir(), "nova-studio-e2e-"));
  server = spawn(
    bin,
    ["serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--studio-dir", resolve(root, "dist"), "--workers", "2"],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  base = await new Promise<string>((ok, fail) => {
    const t = setTimeout(() => fail(new Error("nova serve did not start")), 30_000);
    createInterface({ input: server.stderr! }).on("line", (line) => {
      const m = /listening on (http:\/\/\S+)/.exec(line);
      if (m) {
        clearTimeout(t);
        ok(m[1]);
      }
    });
    server.on("exit", (code) => fail(new Error(`nova serve exited (${code})`)));
  });
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

afterAll(async () => {
  await browser?.close();
  server?.kill();
  rmSync(data, { recursive: true, force: true });
});

async function open(): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  // Long tasks on the main thread, for the event-rate check.
  await page.addInitScript(() => {
    const w = window as unknown as { __longTasks: number[] };
    w.__longTasks = [];
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) w.__longTasks.push(e.duration);
    }).observe({ type: "longtask", buffered: true });
  });
  await page.goto(base + "/");
  await page.getByTestId("connection").filter({ hasText: "connected" }).waitFor();
  return page;
}

describe("NOVA Studio", () => {
  it("runs a template, shows partial tiles as they arrive and the final output", async () => {
    const page = await open();
    await page.getByLabel("hardware template").selectOption("gtx1050");
    await page.screenshot({ path: join(shots, "01-template-loaded.png") });
    await page.getByRole("button", { name: "Plan" }).click();
    await expect.poll(() => page.getByLabel("VRAM budget rail").textContent()).toContain("fits");
    await page.screenshot({ path: join(shots, "02-planned.png") });

    // Small tiles and a larger image: well over a thousand partial outputs.
    await page.fill("#in-1-width", "1024");
    await page.fill("#in-1-height", "768");
    await page.fill("#tile-size", "32");
    await page.locator("#tile-size").dispatchEvent("change");
    await page.locator("#in-1-width").dispatchEvent("change");
    await page.locator("#in-1-height").dispatchEvent("change");
    await page.getByRole("button", { name: "Queue" }).click();

    const status = page.getByTestId("job-status");
    let sawPartialWhileRunning = false;
    let midShot = false;
    const t = Date.now();
    for (;;) {
      const text = (await status.textContent().catch(() => "")) ?? "";
      const tiles = Number(/(\d+) tile/.exec(text)?.[1] ?? 0);
      if (text.startsWith("running") && tiles > 0) {
        sawPartialWhileRunning = true;
        if (!midShot) {
          await page.screenshot({ path: join(shots, "03-partial-tiles.png") });
          midShot = true;
        }
      }
      if (text.startsWith("success")) break;
      expect(text.startsWith("error"), text).toBe(false);
      expect(Date.now() - t).toBeLessThan(200_000);
      await page.waitForTimeout(25);
    }
    expect(sawPartialWhileRunning).toBe(true);
    const tiles = Number(/(\d+) tile/.exec((await status.textContent()) ?? "")?.[1] ?? 0);
    expect(tiles).toBeGreaterThanOrEqual(1000);

    const out = page.getByTestId("output").first();
    await out.waitFor();
    await expect
      .poll(() => out.evaluate((img) => (img as HTMLImageElement).naturalWidth))
      .toBe(1536);
    // The partial canvas holds the picture the tiles made.
    const painted = await page.locator(".preview canvas").evaluate((c) => {
      const cv = c as HTMLCanvasElement;
      const px = cv.getContext("2d")!.getImageData(cv.width / 2, cv.height / 2, 1, 1).data;
      return { w: cv.width, alpha: px[3] };
    });
    expect(painted).toEqual({ w: 1536, alpha: 255 });
    const longest = await page.evaluate(() =>
      Math.max(0, ...(window as unknown as { __longTasks: number[] }).__longTasks),
    );
    expect(longest, "longest main-thread task (ms)").toBeLessThan(100);
    await page.screenshot({ path: join(shots, "04-finished.png") });
    await page.close();
  });

  it("the budget rail refuses a workflow that cannot fit, with the planner's numbers", async () => {
    const page = await open();
    await page.getByLabel("hardware template").selectOption("gtx1050");
    await page.fill("#in-1-width", "16384");
    await page.locator("#in-1-width").dispatchEvent("change");
    await page.fill("#in-1-height", "16384");
    await page.locator("#in-1-height").dispatchEvent("change");
    await page.getByRole("button", { name: "Plan" }).click();
    const rail = page.getByLabel("VRAM budget rail");
    await expect.poll(() => rail.textContent()).toContain("refused");
    const text = (await rail.textContent()) ?? "";
    expect(text).toMatch(/needs [\d.]+ GiB/);
    expect(text).toContain("PASCAL_2G");
    await page.screenshot({ path: join(shots, "05-refused.png") });
    // Queueing it is refused up front too.
    await page.getByRole("button", { name: "Queue" }).click();
    await expect.poll(() => page.locator(".rail.refused").textContent()).toContain("refused");
    await page.close();
  });
});
