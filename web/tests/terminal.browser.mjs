// The terminal page in a real browser (Debian's Chromium, driven by playwright-core): log in
// through the form, run a command in the agent's shell, reload and see the session re-attached
// with its output replayed, then close the session.
//
// Run by tests/tests/browser.rs, which starts the control plane and an agent. Environment:
//   CRONIUM_URL               the control plane's base URL (http://127.0.0.1:PORT)
//   CRONIUM_USERNAME          a user who may open terminals on the agent
//   CRONIUM_PASSWORD          that user's password
//   CRONIUM_AGENT_ID          the agent
//   CRONIUM_TEST_ARTIFACTS    where screenshots go (default: target/test-artifacts/)
//   CRONIUM_BROWSER_PROFILE   an empty directory for Chromium's profile (default: a new temp dir,
//                             removed at the end)
//   CHROMIUM                  the browser (default: /usr/bin/chromium)
// Exits 0 when everything worked; otherwise prints which step failed and why, and exits 1.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { assertCleanPages, launchChromium, runBrowserTest, step } from "./chromium.mjs";

const STEP_TIMEOUT_MS = 30_000;

function required(name) {
  const value = process.env[name];
  if (value === undefined || value === "") {
    console.error(`terminal.browser: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const baseUrl = required("CRONIUM_URL").replace(/\/$/, "");
const username = required("CRONIUM_USERNAME");
const password = required("CRONIUM_PASSWORD");
const agentId = required("CRONIUM_AGENT_ID");
const here = dirname(fileURLToPath(import.meta.url));
const artifacts = resolve(process.env.CRONIUM_TEST_ARTIFACTS ?? join(here, "../../target/test-artifacts"));
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
mkdirSync(artifacts, { recursive: true });
const ownProfile = process.env.CRONIUM_BROWSER_PROFILE === undefined;
const profile = ownProfile ? mkdtempSync(join(tmpdir(), "cronium-chromium-")) : process.env.CRONIUM_BROWSER_PROFILE;

/** Console messages and page errors, shown when a step fails. */
const browserLog = [];
/** Content-Security-Policy violations: the page must not need anything the policy forbids. */
const violations = [];
let page;
let context;

/** Whether the terminal's buffer (scrollback included) has a line containing `text`. */
function bufferHas(text) {
  return page.evaluate((wanted) => {
    const terminal = window.croniumTerminal;
    if (terminal === undefined) {
      return false;
    }
    const buffer = terminal.buffer.active;
    for (let row = 0; row < buffer.length; row += 1) {
      if (buffer.getLine(row)?.translateToString(true).includes(wanted)) {
        return true;
      }
    }
    return false;
  }, text);
}

async function waitForBuffer(text) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (await bufferHas(text)) {
      return;
    }
    await page.waitForTimeout(100);
  }
  const screen = await page.evaluate(() => {
    const buffer = window.croniumTerminal?.buffer.active;
    if (buffer === undefined) {
      return "(no terminal)";
    }
    const lines = [];
    for (let row = 0; row < buffer.length; row += 1) {
      lines.push(buffer.getLine(row)?.translateToString(true) ?? "");
    }
    return lines.join("\n").trimEnd();
  });
  throw new Error(`no line with ${JSON.stringify(text)} within ${STEP_TIMEOUT_MS} ms; the terminal shows:\n${screen}`);
}

/** Waits until the page's `data-state` is one of `states`; returns it. */
async function waitForState(states) {
  await page.waitForFunction((wanted) => wanted.includes(document.body.dataset.state), states, {
    timeout: STEP_TIMEOUT_MS,
  });
  return page.evaluate(() => document.body.dataset.state);
}

/** Fails with what the page says (its banner) unless the terminal is connected. */
async function expectConnected() {
  const state = await waitForState(["connected", "failed", "disconnected", "detached", "exited"]);
  if (state !== "connected") {
    const banner = await page.evaluate(() => document.querySelector("#banner .message")?.textContent ?? "");
    throw new Error(`the terminal WebSocket did not connect: state ${state}, the page says ${JSON.stringify(banner)}`);
  }
  await page.waitForFunction(() => document.body.dataset.sessionId !== undefined, null, { timeout: STEP_TIMEOUT_MS });
  return page.evaluate(() => document.body.dataset.sessionId);
}

async function main() {
  ({ context, page } = await step("launch Chromium", () =>
    launchChromium({
      executablePath,
      profile,
      viewport: { width: 1100, height: 650 },
      timeoutMs: STEP_TIMEOUT_MS,
      browserLog,
      violations,
    }),
  ));

  const address = `${baseUrl}/ui/terminal?agent=${encodeURIComponent(agentId)}`;
  await step("open the terminal page", () => page.goto(address));
  await step("log in through the form", async () => {
    await page.locator("#login-username").waitFor();
    await page.locator("#login-username").fill(username);
    await page.locator("#login-password").fill(password);
    await page.screenshot({ path: join(artifacts, "terminal-login.png") });
    await page.locator("#login-password").press("Enter");
    await page.locator(".statusbar").waitFor();
    await page.locator("#terminal .xterm").waitFor();
  });
  const sessionId = await step("connect the terminal", async () => {
    try {
      return await expectConnected();
    } finally {
      await page.screenshot({ path: join(artifacts, "terminal-ui.png") });
    }
  });
  await step("the address names the session, so a reload re-attaches", async () => {
    const session = new URL(page.url()).searchParams.get("session");
    if (session !== sessionId) {
      throw new Error(`the address is ${page.url()}, expected session=${sessionId}`);
    }
  });
  await step("run `echo hello-$((6*7))` in the shell", async () => {
    await page.locator("#terminal .xterm").click();
    await page.keyboard.type("echo hello-$((6*7))");
    await page.keyboard.press("Enter");
    await waitForBuffer("hello-42");
    await page.screenshot({ path: join(artifacts, "terminal.png") });
  });
  await step("reload: the session re-attaches and replays its output", async () => {
    await page.reload();
    const reattached = await expectConnected();
    if (reattached !== sessionId) {
      throw new Error(`after the reload the page is on session ${reattached}, expected ${sessionId}`);
    }
    await waitForBuffer("hello-42");
    await page.screenshot({ path: join(artifacts, "terminal-reattached.png") });
  });
  await step("Close session ends the shell and shows its exit code", async () => {
    await page.locator("#close-session").click();
    await waitForState(["exited"]);
    const banner = await page.locator("#banner .message").textContent();
    if (!/The session (ended|was closed)/.test(banner ?? "")) {
      throw new Error(`the banner says ${JSON.stringify(banner)}`);
    }
    if (new URL(page.url()).searchParams.has("session")) {
      throw new Error(`the address still names the ended session: ${page.url()}`);
    }
    await page.screenshot({ path: join(artifacts, "terminal-closed.png") });
  });
  assertCleanPages({ browserLog, violations, pageErrors: false });
}

await runBrowserTest({
  name: "terminal",
  label: "terminal page",
  artifacts,
  main,
  browser: () => ({ page, context }),
  browserLog,
  fullPage: false,
  cleanup: () => {
    if (ownProfile) {
      rmSync(profile, { recursive: true, force: true });
    }
  },
});
