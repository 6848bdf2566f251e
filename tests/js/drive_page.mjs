// Drive examples/web in a real headless Chromium (playwright-core, the system's /usr/bin/chromium): ask each prompt,
// print one JSON object per prompt (route, token ids, streamed text), screenshot the page after the last one.
//
//   node drive_page.mjs URL PROMPTS_JSON SCREENSHOT.png
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

// The network is closed: without these, Chromium's own connections (sync, updates, QUIC) are refused and it stalls.
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const [url, promptsJson, screenshot] = process.argv.slice(2);
const userDataDir = mkdtempSync(join(tmpdir(), "ifp-chromium-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: FLAGS,
  viewport: { width: 760, height: 520 },
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (error) => console.error(`page error: ${error.message}`));
  page.on("console", (message) => message.type() === "error" && console.error(`console: ${message.text()}`));
  await page.goto(url);
  await page.waitForSelector("body[data-state=ready], body[data-state=error]", { timeout: 20000 });
  for (const prompt of JSON.parse(promptsJson)) {
    await page.fill("#prompt", prompt);
    await page.evaluate(() => (document.body.dataset.state = "asked"));
    await page.click("button[type=submit]");
    await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 20000 });
    const result = await page.evaluate(() => ({
      state: document.body.dataset.state,
      status: document.getElementById("status").textContent,
      variant: document.getElementById("variant").textContent,
      text: document.getElementById("answer").textContent,
      tokens: JSON.parse(document.body.dataset.tokens ?? "null"),
    }));
    console.log(JSON.stringify({ prompt, ...result }));
  }
  await page.screenshot({ path: screenshot });
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
