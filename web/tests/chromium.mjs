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

/** Runs one named step of a browser test, logging its time; a failure names the step. */
export async function step(name, action) {
  const started = Date.now();
  try {
    const result = await action();
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
    return result;
  } catch (error) {
    throw new Error(`step "${name}" failed: ${error instanceof Error ? error.message : String(error)}`);
  }
}

/** Fails if a page broke its Content-Security-Policy or (with `pageErrors`) threw. */
export function assertCleanPages({ browserLog, violations, pageErrors = true }) {
  if (violations.length > 0) {
    throw new Error(`a page broke its Content-Security-Policy:\n${violations.join("\n")}`);
  }
  const errors = browserLog.filter((line) => line.startsWith("page error"));
  if (pageErrors && errors.length > 0) {
    throw new Error(`the pages threw:\n${errors.join("\n")}`);
  }
}

/**
 * Runs a browser test's `main` and ends the process: on failure a screenshot
 * (`<artifacts>/<name>-failure.png`), the message and the last browser console lines, exit 1.
 * The browser is closed and `cleanup` run either way.
 */
export async function runBrowserTest({ name, label, artifacts, main, browser, browserLog, fullPage = true, cleanup }) {
  let failure = null;
  try {
    await main();
  } catch (error) {
    failure = error instanceof Error ? error.message : String(error);
    const { page } = browser();
    if (page !== undefined) {
      await page.screenshot({ path: `${artifacts}/${name}-failure.png`, fullPage }).catch(() => {});
    }
  } finally {
    await browser().context?.close().catch(() => {});
    cleanup?.();
  }
  if (failure !== null) {
    console.error(`FAILED: ${failure}`);
    if (browserLog.length > 0) {
      console.error(`browser console:\n  ${browserLog.slice(-30).join("\n  ")}`);
    }
    console.error(`screenshots: ${artifacts}`);
    process.exit(1);
  }
  console.log(`${label}: all steps passed; screenshots in ${artifacts}`);
}
