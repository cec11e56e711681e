// Shared by the browser tests: launches Debian's Chromium headless through playwright-core with
// a fresh profile and returns the first page, its console and page errors collected into
// `browserLog` and Content-Security-Policy reports into `violations` (the tests fail on any).
import { chromium } from "playwright-core";

export async function launchChromium({
  executablePath,
  profile,
  viewport,
  colorScheme,
  timeoutMs,
  browserLog,
  violations,
}) {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    viewport,
    ...(colorScheme ? { colorScheme } : {}),
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: timeoutMs,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeoutMs);
  page.on("console", (message) => {
    browserLog.push(`console.${message.type()}: ${message.text()}`);
    if (message.text().includes("Content Security Policy")) {
      violations.push(message.text());
    }
  });
  page.on("pageerror", (error) => browserLog.push(`page error: ${error.message}`));
  return { context, page };
}
