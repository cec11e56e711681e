// Live updates and per-node targets in a real browser (Debian's Chromium, driven by
// playwright-core) against a real control plane:
//   - the servers page shows an enrolled agent offline; the test starts the agent (this script
//     asks for it through a file in CRONIUM_SIGNAL_DIR) and the row turns online without a
//     reload, pushed by `GET /changes` (the sidebar says "Live"; with the stream live the
//     page's own polling is only a one-minute safety net, and each wait below is shorter);
//   - the runs page shows a run triggered through the API appear and end `completed`, again
//     without a reload;
//   - in the workflow builder a node gets its own targets (an agent ticked, labels typed) in the
//     node inspector; they are saved (the API returns them), shown again after a reload, and
//     cleared.
// Screenshots live-*.png go to the artifacts directory; no page may break its
// Content-Security-Policy or throw.
//
// Run by tests/tests/browser.rs. Environment:
//   CRONIUM_URL               the control plane's base URL (http://127.0.0.1:PORT)
//   CRONIUM_USERNAME          an admin
//   CRONIUM_PASSWORD          the admin's password
//   CRONIUM_AGENT_NAME        an agent that is enrolled but not running when the script starts
//   CRONIUM_SIGNAL_DIR        the script creates `start-agent` here when the test should start it
//   CRONIUM_TEST_ARTIFACTS    where screenshots go (default: target/test-artifacts/)
//   CRONIUM_BROWSER_PROFILE   an empty directory for Chromium's profile (default: a new temp dir,
//                             removed at the end)
//   CHROMIUM                  the browser (default: /usr/bin/chromium)
// Exits 0 when everything worked; otherwise prints which step failed and why, and exits 1.

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { assertCleanPages, launchChromium, runBrowserTest, step } from "./chromium.mjs";

const STEP_TIMEOUT_MS = 30_000;
/**
 * How long a pushed change may take to show. Shorter than the one-minute safety-net interval
 * pages poll at while the notice stream is live, so only a notice can make these waits pass.
 */
const PUSH_DEADLINE_MS = 40_000;

function required(name) {
  const value = process.env[name];
  if (value === undefined || value === "") {
    console.error(`live.browser: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const baseUrl = required("CRONIUM_URL").replace(/\/$/, "");
const admin = { username: required("CRONIUM_USERNAME"), password: required("CRONIUM_PASSWORD") };
const agentName = required("CRONIUM_AGENT_NAME");
const signalDir = required("CRONIUM_SIGNAL_DIR");
const here = dirname(fileURLToPath(import.meta.url));
const artifacts = resolve(process.env.CRONIUM_TEST_ARTIFACTS ?? join(here, "../../target/test-artifacts"));
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
mkdirSync(artifacts, { recursive: true });
const ownProfile = process.env.CRONIUM_BROWSER_PROFILE === undefined;
const profile = ownProfile ? mkdtempSync(join(tmpdir(), "cronium-chromium-")) : process.env.CRONIUM_BROWSER_PROFILE;

const EVENT_NAME = "live-pushed";
const WORKFLOW_NAME = "live-targets";

const browserLog = [];
const violations = [];
let page;
let context;

async function shot(name) {
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(artifacts, `live-${name}.png`), fullPage: true });
}

/** A call to the API with the page's session (and its CSRF token for changes). */
async function api(method, path, body) {
  return page.evaluate(
    async ({ method, path, body }) => {
      const headers = { Accept: "application/json" };
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
      }
      if (method !== "GET") {
        const me = await (await fetch("/api/v1/auth/me")).json();
        headers["X-CSRF-Token"] = me.csrf_token;
      }
      const response = await fetch(`/api/v1${path}`, {
        method,
        headers,
        credentials: "same-origin",
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
      const text = await response.text();
      let parsed = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        // Not JSON: keep the text.
      }
      return { status: response.status, body: parsed };
    },
    { method, path, body },
  );
}

/** Goes to a console section through its sidebar link (no page load). */
async function navigate(section, title) {
  await page.locator(`a.nav-link[data-section="${section}"]`).click();
  await page.locator("#page-title", { hasText: title }).waitFor();
}

/** Marks the loaded document; `expectSameDocument` fails if the page was reloaded since. */
async function markDocument() {
  await page.evaluate(() => {
    window.croniumLiveMarker = "not reloaded";
  });
}

async function expectSameDocument(where) {
  const marker = await page.evaluate(() => window.croniumLiveMarker);
  if (marker !== "not reloaded") {
    throw new Error(`${where}: the page was reloaded`);
  }
}

async function expectLive() {
  await page.locator('#live-indicator[data-state="live"]', { hasText: "Live" }).waitFor();
}

async function liveSteps() {
  await step("log in: the sidebar says the console is live", async () => {
    await page.goto(`${baseUrl}/ui/`);
    await page.locator("#login-username").fill(admin.username);
    await page.locator("#login-password").fill(admin.password);
    await page.locator("#login-password").press("Enter");
    await page.locator("#page-title", { hasText: "Dashboard" }).waitFor();
    await expectLive();
  });
  await step("servers: an agent coming online shows without a reload", async () => {
    await navigate("servers", "Servers");
    const row = page.locator("table.agents tr", { hasText: agentName });
    await row.locator(".badge-offline").waitFor();
    await markDocument();
    await expectLive();
    // The test starts the agent now.
    writeFileSync(join(signalDir, "start-agent"), "");
    await row.locator(".badge-online").waitFor({ timeout: PUSH_DEADLINE_MS });
    await expectSameDocument("the servers page");
    await shot("servers");
  });
  await step("runs: a run appears and ends completed without a reload", async () => {
    const created = await api("POST", "/events", { name: EVENT_NAME, kind: "bash", script: "echo pushed", targets: { agents: [agentName] } });
    if (created.status !== 201) {
      throw new Error(`creating the event: ${created.status} ${JSON.stringify(created.body)}`);
    }
    await navigate("runs", "Runs");
    await page.locator("#runs-status").waitFor();
    await markDocument();
    await expectLive();
    const run = await api("POST", `/events/${encodeURIComponent(created.body.id)}/runs`, {});
    if (run.status !== 201) {
      throw new Error(`triggering the run: ${run.status} ${JSON.stringify(run.body)}`);
    }
    const row = page.locator(`tr[data-run-id="${run.body.run_id}"]`);
    await row.locator('[data-status="completed"]').waitFor({ timeout: PUSH_DEADLINE_MS });
    await expectSameDocument("the runs page");
    await shot("runs");
  });
}

async function nodeTargetSteps() {
  let workflowId;
  const node = () => page.locator(`#workflow-canvas g.wf-node[data-node="${EVENT_NAME}"]`);
  await step("workflow builder: a node gets its own targets in the inspector", async () => {
    await navigate("workflows", "Workflows");
    await page.locator("#new-workflow").click();
    await page.locator("#page-title", { hasText: "New workflow" }).waitFor();
    await page.locator("#workflow-name").fill(WORKFLOW_NAME);
    await page.locator("#workflow-add-event").selectOption({ label: EVENT_NAME });
    await page.locator("#workflow-add-node").click();
    await node().waitFor();
    await node().focus();
    await page.locator("#workflow-node-own-targets").check();
    await page.locator("#workflow-node-target-agents label", { hasText: agentName }).locator("input").check();
    await page.locator("#workflow-node-target-labels").fill("role=web");
    await page.locator("#workflow-node-target-preview", { hasText: `Runs on 1 host: ${agentName}` }).waitFor();
    await shot("node-targets");
    await page.locator("#workflow-save").click();
    await page.locator("#workflow-dirty", { hasText: /^Saved$/ }).waitFor();
    const listed = await api("GET", "/workflows");
    const saved = listed.body.find((workflow) => workflow.name === WORKFLOW_NAME);
    const targets = saved?.nodes?.[0]?.targets;
    const wanted = { agents: [agentName], labels: { role: "web" }, servers: [] };
    if (JSON.stringify(targets) !== JSON.stringify(wanted)) {
      throw new Error(`the saved node's targets are ${JSON.stringify(targets)}, expected ${JSON.stringify(wanted)}`);
    }
    workflowId = saved.id;
  });
  await step("the node's targets are shown again after a reload, and cleared", async () => {
    await page.reload();
    await node().waitFor();
    // Enter on a focused node selects it (as a click does).
    await node().focus();
    await page.keyboard.press("Enter");
    if (!(await page.locator("#workflow-node-own-targets").isChecked())) {
      throw new Error("the node's own targets are not shown as set");
    }
    if (!(await page.locator("#workflow-node-target-agents label", { hasText: agentName }).locator("input").isChecked())) {
      throw new Error(`${agentName} is not ticked`);
    }
    const labels = await page.locator("#workflow-node-target-labels").inputValue();
    if (labels !== "role=web") {
      throw new Error(`the labels field shows ${JSON.stringify(labels)}`);
    }
    await page.locator("#workflow-node-own-targets").uncheck();
    await page.locator("#workflow-save").click();
    await page.locator("#workflow-dirty", { hasText: /^Saved$/ }).waitFor();
    const shown = await api("GET", `/workflows/${encodeURIComponent(workflowId)}`);
    if (shown.body.nodes[0].targets !== undefined) {
      throw new Error(`the cleared node still has targets: ${JSON.stringify(shown.body.nodes[0])}`);
    }
  });
}

async function main() {
  ({ context, page } = await step("launch Chromium", () =>
    launchChromium({
      executablePath,
      profile,
      viewport: { width: 1280, height: 800 },
      timeoutMs: STEP_TIMEOUT_MS,
      browserLog,
      violations,
    }),
  ));
  page.on("dialog", (dialog) => void dialog.accept());
  await liveSteps();
  await nodeTargetSteps();
  assertCleanPages({ browserLog, violations });
}

await runBrowserTest({
  name: "live",
  label: "live",
  artifacts,
  main,
  browser: () => ({ page, context }),
  browserLog,
  cleanup: () => {
    if (ownProfile) {
      rmSync(profile, { recursive: true, force: true });
    }
  },
});
