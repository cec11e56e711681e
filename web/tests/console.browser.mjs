// The console (the app shell under /ui/) in a real browser (Debian's Chromium, driven by
// playwright-core) against a real control plane and agent:
//   - an admin logs in through the form and sees the dashboard, the agent on the servers page
//     (with an install command from "Add server"; an SSH server added with a password that is
//     never shown; another one installed over SSH through a real sshd, its progress streamed
//     live, its private key never shown), creates an event in the editor (CodeMirror script, agent target with its
//     preview, a schedule with the server's preview of the next runs, a variable and a secret),
//     sees an invalid cron refused next to its field, runs the event and watches its log
//     stream live (a line shows while the job is still running, ANSI colours as spans), runs it
//     again with JSON input and cancels it, and finds both runs on the dashboard and the runs
//     page; dark and light themes both render;
//   - in Settings the admin adds a user and changes its role, creates an API token (shown once,
//     working, then revoked), adds a webhook tool whose credentials are never shown and whose
//     "Test" reaches a real HTTP server this script runs, sets a variable, and creates, lists and
//     revokes an enrollment token;
//   - in the Console the admin opens a terminal tab on the agent and runs a command, closes the
//     tab and re-attaches from the live sessions, ends the session and plays its recording;
//   - in Workflows the admin builds a two-node workflow (events picked as nodes, a node dragged,
//     an edge dragged from a node's handle), sees the API's cycle error when an edge goes back,
//     saves, runs it with JSON input and watches both nodes end completed with the data passed on;
//   - a viewer sees the same pages without any button that changes things (settings, console
//     and workflows included), and the API refuses the viewer's direct attempts (403).
// Every page is screenshotted into the artifacts directory (console-*.png), and no page may
// break its Content-Security-Policy.
//
// Run by tests/tests/browser.rs, which starts the control plane and an agent. Environment:
//   CRONIUM_URL               the control plane's base URL (http://127.0.0.1:PORT)
//   CRONIUM_USERNAME          an admin
//   CRONIUM_PASSWORD          the admin's password
//   CRONIUM_VIEWER_USERNAME   a viewer
//   CRONIUM_VIEWER_PASSWORD   the viewer's password
//   CRONIUM_AGENT_NAME        the (online) agent's name
//   CRONIUM_SSH_PORT, CRONIUM_SSH_USER, CRONIUM_SSH_PRIVATE_KEY
//                             an sshd on 127.0.0.1 the agent is installed through
//   CRONIUM_SSH_PREFIX        where the installer puts the agent on that "host" (detached)
//   CRONIUM_TEST_ARTIFACTS    where screenshots go (default: target/test-artifacts/)
//   CRONIUM_BROWSER_PROFILE   an empty directory for Chromium's profile (default: a new temp dir,
//                             removed at the end)
//   CHROMIUM                  the browser (default: /usr/bin/chromium)
// Exits 0 when everything worked; otherwise prints which step failed and why, and exits 1.

import { mkdirSync, mkdtempSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { assertCleanPages, launchChromium, runBrowserTest, step } from "./chromium.mjs";

const STEP_TIMEOUT_MS = 30_000;

function required(name) {
  const value = process.env[name];
  if (value === undefined || value === "") {
    console.error(`console.browser: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const baseUrl = required("CRONIUM_URL").replace(/\/$/, "");
const admin = { username: required("CRONIUM_USERNAME"), password: required("CRONIUM_PASSWORD") };
const viewer = { username: required("CRONIUM_VIEWER_USERNAME"), password: required("CRONIUM_VIEWER_PASSWORD") };
const agentName = required("CRONIUM_AGENT_NAME");
// A real sshd the agent is installed through (key login as the test's user, detached service
// under a prefix, since the test is not a systemd host).
const ssh = {
  port: required("CRONIUM_SSH_PORT"),
  user: required("CRONIUM_SSH_USER"),
  privateKey: required("CRONIUM_SSH_PRIVATE_KEY"),
  prefix: required("CRONIUM_SSH_PREFIX"),
};
const here = dirname(fileURLToPath(import.meta.url));
const artifacts = resolve(process.env.CRONIUM_TEST_ARTIFACTS ?? join(here, "../../target/test-artifacts"));
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
mkdirSync(artifacts, { recursive: true });
const ownProfile = process.env.CRONIUM_BROWSER_PROFILE === undefined;
const profile = ownProfile ? mkdtempSync(join(tmpdir(), "cronium-chromium-")) : process.env.CRONIUM_BROWSER_PROFILE;
// The job waits for this file before it prints its second line: the test sees the first line
// while the job is still running, then lets it finish.
const gateDir = mkdtempSync(join(tmpdir(), "cronium-console-gate-"));
const gate = join(gateDir, "go");

const EVENT_NAME = "browser-hello";
const SECRET_VALUE = "hunter2-browser";
const SSH_PASSWORD = "ssh-password-never-shown";
const SCRIPT = [
  "printf '\\033[31mred-%s\\033[0m plain\\n' \"$((6*7))\"",
  "printf '\\033[1;38;5;208mbold-orange\\033[0m \\033[2Jcleared\\n'",
  "printf 'progress 1\\rprogress 2\\n'",
  'echo "greeting=$GREETING secret-length=${#API_TOKEN}"',
  "echo first-line",
  `while [ ! -e ${gate} ]; do sleep 0.1; done`,
  "echo second-line",
].join("\n");

/** Console messages and page errors, shown when a step fails. */
const browserLog = [];
/** Content-Security-Policy violations: no page may need anything the policy forbids. */
const violations = [];
let page;
let context;

async function shot(name) {
  // The sidebar is sticky: from the top, a full-page screenshot shows it where it belongs.
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(artifacts, `console-${name}.png`), fullPage: true });
}

/** Goes to a console route and waits for its title. */
async function go(hash, title) {
  await page.goto(`${baseUrl}/ui/${hash}`);
  await page.locator("#page-title", { hasText: title }).waitFor();
}

async function text(selector) {
  return (await page.locator(selector).first().textContent()) ?? "";
}

/** Fails if the page's DOM (text, attributes or form values) contains `secret`. */
async function expectNotRendered(secret, where) {
  const found = await page.evaluate((wanted) => {
    if (document.documentElement.outerHTML.includes(wanted)) {
      return "the markup";
    }
    for (const field of document.querySelectorAll("input, textarea")) {
      if (field.value.includes(wanted)) {
        return `the value of ${field.id || field.className || field.tagName}`;
      }
    }
    return null;
  }, secret);
  if (found !== null) {
    throw new Error(`${where}: a secret is rendered in ${found}`);
  }
}

async function logIn(user) {
  await page.goto(`${baseUrl}/ui/`);
  await page.locator("#login-username").waitFor();
  await page.locator("#login-username").fill(user.username);
  await page.locator("#login-password").fill(user.password);
  await page.locator("#login-password").press("Enter");
  await page.locator("#page-title", { hasText: "Dashboard" }).waitFor();
  const shown = await text("#whoami-name");
  if (shown !== user.username) {
    throw new Error(`the sidebar names ${JSON.stringify(shown)}, expected ${user.username}`);
  }
}

async function logOut() {
  await page.locator("#logout").click();
  await page.locator("#login-username").waitFor();
}

/** Waits for the selected job's log to contain `wanted`. */
async function waitForLog(wanted) {
  try {
    await page.locator(".log-lines", { hasText: wanted }).waitFor({ timeout: STEP_TIMEOUT_MS });
  } catch {
    throw new Error(`the log never showed ${JSON.stringify(wanted)}; it shows ${JSON.stringify(await text(".log-lines"))}`);
  }
}

async function adminSteps() {
  await step("the login page", async () => {
    await page.goto(`${baseUrl}/ui/`);
    await page.locator("#login-username").waitFor();
    await shot("login");
  });
  await step("a wrong password is refused with the API's message", async () => {
    await page.locator("#login-username").fill(admin.username);
    await page.locator("#login-password").fill("not-the-password");
    await page.locator("#login-password").press("Enter");
    await page.locator(".login .form-error:not(:empty)").waitFor();
  });
  await step("log in as the admin: the dashboard", async () => {
    await logIn(admin);
    await page.locator("#stats .stat-ok .stat-value", { hasText: "1" }).waitFor();
    await page.locator("#recent-runs .empty").waitFor();
    await shot("dashboard-empty");
  });

  await step("servers: the agent is online with an Open terminal link", async () => {
    await go("#/servers", "Servers");
    const row = page.locator("table.agents tr", { hasText: agentName });
    await row.locator(".badge-online").waitFor();
    const href = await row.locator("a", { hasText: "Open terminal" }).getAttribute("href");
    if (!href?.startsWith("terminal?agent=")) {
      throw new Error(`the terminal link is ${href}`);
    }
    await shot("servers");
  });
  await step("Add server: a one-line install command with a copy button", async () => {
    await page.locator("#add-server").click();
    await page.locator("#enroll-labels").fill("env=browser");
    await page.locator("#panel-command button[type=submit]").click();
    await page.locator("#install-command").waitFor();
    const command = await text("#install-command");
    if (!command.includes("install.sh")) {
      throw new Error(`the install command is ${JSON.stringify(command)}`);
    }
    await page.locator(".install-command button.copy").waitFor();
    await shot("add-server-command");
  });
  await step("Add server over SSH: the password is sent, never shown", async () => {
    await page.locator("#tab-ssh").click();
    await page.locator("#ssh-name").fill("ssh-box");
    await page.locator("#ssh-host").fill("192.0.2.10");
    await page.locator("#ssh-username").fill("deploy");
    await page.locator("#ssh-auth").selectOption("password");
    await page.locator("#ssh-password").fill(SSH_PASSWORD);
    // Installing needs a reachable host; here the server is only added.
    await page.locator("#ssh-install").uncheck();
    await shot("add-server-ssh");
    await page.locator("#ssh-submit").click();
    await page.locator("#install-progress", { hasText: "Added ssh-box" }).waitFor();
    await expectNotRendered(SSH_PASSWORD, "the SSH form after adding");
    await page.keyboard.press("Escape");
    await page.locator("dialog").waitFor({ state: "detached" });
    await page.locator("tr[data-server-id]", { hasText: "ssh-box" }).waitFor();
    await expectNotRendered(SSH_PASSWORD, "the servers page");
  });

  await step("Add server over SSH and install the agent: progress streams live", async () => {
    await page.locator("#add-server").click();
    await page.locator("#tab-ssh").click();
    await page.locator("#ssh-name").fill("ssh-installed");
    await page.locator("#ssh-host").fill("127.0.0.1");
    await page.locator("#ssh-port").fill(ssh.port);
    await page.locator("#ssh-username").fill(ssh.user);
    await page.locator("#ssh-auth").selectOption("key");
    await page.locator("#ssh-private-key").fill(ssh.privateKey);
    await page.locator("#ssh-labels").fill("site=lab");
    await page.locator("#install-service").selectOption("detached");
    await page.locator("#install-prefix").fill(ssh.prefix);
    await page.locator("#ssh-submit").click();
    // The connect step may have several lines (a pinned host key adds one).
    await page.locator('#install-progress li[data-step="connect"]').first().waitFor();
    // The key left with the request: the form no longer holds it, the page never shows it.
    const keyLine = ssh.privateKey.split("\n").find((line) => line.length > 40 && !line.startsWith("-----"));
    await expectNotRendered(keyLine, "the SSH form during the install");
    await shot("add-server-ssh-installing");
    await page.locator("#install-progress[data-state=done], #install-progress[data-state=failed]").waitFor({ timeout: 240_000 });
    const state = await page.locator("#install-progress").getAttribute("data-state");
    if (state !== "done") {
      throw new Error(`the install failed: ${await text("#install-progress")}`);
    }
    const steps = await page.locator("#install-progress li").evaluateAll((items) => items.map((item) => item.dataset.step));
    for (const wanted of ["connect", "upload", "install", "wait", "switch"]) {
      if (!steps.includes(wanted)) {
        throw new Error(`no ${wanted} step among ${steps.join(", ")}`);
      }
    }
    if ((await text("#install-progress pre.install-output")).trim() === "") {
      throw new Error("the installer's own output lines were not shown");
    }
    await shot("add-server-ssh-installed");
    await page.keyboard.press("Escape");
    await page.locator("dialog").waitFor({ state: "detached" });
    await page.locator("table.agents tr", { hasText: "ssh-installed" }).locator(".badge-online").waitFor();
    await page.locator("tr[data-server-id]", { hasText: "ssh-installed" }).locator("td", { hasText: /^agent/ }).waitFor();
    await expectNotRendered(keyLine, "the servers page");
    await shot("servers-installed");
  });

  await step("events: the empty state leads to the editor", async () => {
    await go("#/events", "Events");
    await page.locator(".empty").waitFor();
    await shot("events-empty");
    await page.locator("#new-event").click();
    await page.locator("#page-title", { hasText: "New event" }).waitFor();
    await page.locator("#event-script[data-ready=true] .cm-content").waitFor();
  });
  await step("the editor: script in CodeMirror, target preview, schedule preview", async () => {
    await page.locator("#event-name").fill(EVENT_NAME);
    await page.locator("#event-kind").selectOption("bash");
    await page.locator("#event-script .cm-content").click();
    await page.keyboard.press("Control+A");
    await page.keyboard.insertText(SCRIPT);
    const highlighted = await page.locator("#event-script .cm-line span").count();
    if (highlighted === 0) {
      throw new Error("the bash script has no highlighted tokens");
    }
    // Both agents: the cluster's and the one installed over SSH above (a fan-out run).
    await page.locator("#target-agents label", { hasText: agentName }).locator("input").check();
    await page.locator("#target-preview", { hasText: `Runs on 1 host: ${agentName}` }).waitFor();
    await page.locator("#target-agents label", { hasText: "ssh-installed" }).locator("input").check();
    const hosts = [agentName, "ssh-installed"].sort().join(", ");
    await page.locator("#target-preview", { hasText: `Runs on 2 hosts: ${hosts}` }).waitFor();
    await page.locator("#schedule-enabled").check();
    await page.locator("#schedule-timezone").fill("UTC");
    await page.locator("#schedule-cron").fill("not a cron");
    await page.locator("#error-schedule-cron:not(:empty)").waitFor();
    // Once a year: no scheduled run joins the manual ones this test counts.
    await page.locator("#schedule-cron").fill("0 3 1 1 *");
    await page.locator("#schedule-preview li").nth(4).waitFor();
    const first = await text("#schedule-preview li");
    if (!first.includes("(UTC)")) {
      throw new Error(`the first fire time reads ${JSON.stringify(first)}`);
    }
    await page.locator("#add-env").click();
    await page.locator("#env-rows .env-key").last().fill("GREETING");
    await page.locator("#env-rows .env-value").last().fill("hi");
    await page.locator("#add-secret").click();
    await page.locator("#secret-env .secret-key").last().fill("API_TOKEN");
    await page.locator("#secret-env .secret-value").last().fill(SECRET_VALUE);
    await shot("event-editor-new");
  });
  await step("saving an invalid schedule shows the API's error next to the field", async () => {
    await page.locator("#schedule-cron").fill("61 * * * *");
    await page.locator("#save-event").click();
    await page.locator('.field.invalid[data-field="schedule.cron"]').waitFor();
    await page.locator("#form-error:not(:empty)").waitFor();
    await shot("event-editor-field-error");
    await page.locator("#schedule-cron").fill("0 3 1 1 *");
  });
  await step("save: the event is created; the secret comes back as a name only", async () => {
    await page.locator("#save-event").click();
    await page.locator("#saved", { hasText: "Created." }).waitFor();
    await page.locator("#page-title", { hasText: EVENT_NAME }).waitFor();
    await page.locator('#secret-rows [data-secret="API_TOKEN"]').waitFor();
    await page.locator("#event-script[data-ready=true] .cm-content", { hasText: "second-line" }).waitFor();
    await expectNotRendered(SECRET_VALUE, "the saved event");
    await shot("event-editor");
  });
  await step("the events list shows it and filters", async () => {
    await go("#/events", "Events");
    await page.locator("tr[data-event-id]", { hasText: EVENT_NAME }).waitFor();
    await page.locator("#events-filter").fill("no-such-event");
    await page.locator(".empty", { hasText: "No event matches" }).waitFor();
    await page.locator("#events-filter").fill("hello");
    await page.locator("tr[data-event-id]", { hasText: EVENT_NAME }).waitFor();
    await shot("events");
    await page.locator("tr[data-event-id] a", { hasText: EVENT_NAME }).click();
    await page.locator("#run-now").waitFor();
  });

  await step("Run now: the run page streams the log live", async () => {
    await page.locator("#run-now").click();
    await page.locator("#run-input").waitFor();
    await page.locator("#run-confirm").click();
    await page.locator("#page-title", { hasText: /^Run( of .*)?$/ }).waitFor();
    await waitForLog("first-line");
    // The job waits for the gate, so the line above arrived while it ran: live, not replayed.
    await page.locator('#job-facts .badge[data-status="running"]').waitFor();
    await page.locator("#log-state.live").waitFor();
    if ((await text(".log-lines")).includes("second-line")) {
      throw new Error("the job went past its gate before the test opened it");
    }
    await shot("run-live");
    const red = page.locator(".log-line span.ansi-fg-1", { hasText: "red-42" });
    if ((await red.count()) !== 1) {
      throw new Error(`no red span for the ANSI colour; the log is ${JSON.stringify(await text(".log-lines"))}`);
    }
    const orange = page.locator(".log-line span.ansi-bold", { hasText: "bold-orange" });
    const colour = await orange.evaluate((span) => span.style.color);
    if (colour !== "rgb(255, 135, 0)") {
      throw new Error(`the 256-colour span is ${JSON.stringify(colour)}`);
    }
    const lines = await page.locator(".log-line").allTextContents();
    if (!lines.includes("bold-orange cleared") || !lines.includes("progress 2")) {
      throw new Error(`escape sequences or the carriage return were not handled: ${JSON.stringify(lines)}`);
    }
    await waitForLog(`greeting=hi secret-length=${SECRET_VALUE.length}`);
    await expectNotRendered(SECRET_VALUE, "the run page");
  });
  await step("the job ends: second line, exit code 0, completed", async () => {
    writeFileSync(gate, "");
    await waitForLog("second-line");
    await page.locator('#job-log[data-ended="true"]').waitFor();
    await page.locator('#job-facts .badge[data-status="completed"]').waitFor();
    await page.locator("#job-facts", { hasText: "exit code 0" }).waitFor();
    await page.locator('#run-status .badge[data-status="completed"]').waitFor();
    // The run was pushed by GET /runs/{id}/events, not polled.
    if ((await page.locator('.run-summary[data-updates="stream"]').count()) !== 1) {
      throw new Error("the run page fell back to polling");
    }
    await page.locator("#log-search").fill("SECOND");
    await page.locator("#log-matches", { hasText: "1 matching line" }).waitFor();
    const visible = await page.locator(".log-line:not(.filtered-out)").allTextContents();
    if (visible.length !== 1 || visible[0] !== "second-line") {
      throw new Error(`the log filter shows ${JSON.stringify(visible)}`);
    }
    await page.locator("#log-search").fill("");
    const download = await page.locator("#download-log").getAttribute("href");
    if (!download?.match(/^\/api\/v1\/jobs\/[^/]+\/logs$/)) {
      throw new Error(`the download link is ${download}`);
    }
    await shot("run-completed");
  });
  await step("the per-host matrix: both hosts completed, the other host's log", async () => {
    const rows = page.locator("table.matrix tr[data-job-id]");
    if ((await rows.count()) !== 2) {
      throw new Error(`the matrix has ${await rows.count()} rows, expected 2`);
    }
    await page.locator('table.matrix tr[data-job-id] .badge[data-status="completed"]').nth(1).waitFor();
    const before = await text("#log-title");
    const other = page.locator("table.matrix tr[data-job-id]:not(.selected)");
    const otherId = await other.getAttribute("data-job-id");
    await other.locator("button", { hasText: "Show log" }).click();
    await page.locator(`#job-log[data-job-id="${otherId}"][data-ended="true"]`).waitFor();
    const after = await text("#log-title");
    if (after === before) {
      throw new Error(`the log heading stayed ${JSON.stringify(before)}`);
    }
    await waitForLog("second-line");
    await shot("run-matrix");
  });
  await step("Run again with JSON input, then cancel it while it runs", async () => {
    unlinkSync(gate);
    await go("#/events", "Events");
    await page.locator("tr[data-event-id] a", { hasText: EVENT_NAME }).click();
    await page.locator("#run-now").click();
    await page.locator("#run-input").fill("{not json");
    await page.locator("#run-confirm").click();
    await page.locator("dialog .form-error", { hasText: "not JSON" }).waitFor();
    await page.locator("#run-input").fill('{"who": "browser"}');
    await page.locator("#run-confirm").click();
    await page.locator("#page-title", { hasText: /^Run( of .*)?$/ }).waitFor();
    await page.locator("pre.input", { hasText: '"who": "browser"' }).waitFor();
    await waitForLog("first-line");
    await page.locator('#job-facts button[data-action="cancel"]').click();
    await page.locator('#job-facts .badge[data-status="cancelled"]').waitFor();
    // The other host's job still waits at the gate: cancel it from the matrix.
    const waiting = page.locator('table.matrix tr[data-job-id]:not(.selected) [data-action="cancel"]');
    await waiting.click();
    await page.locator('table.matrix tr[data-job-id]:not(.selected) .badge[data-status="cancelled"]').waitFor();
    await page.locator('#run-status .badge[data-status="cancelled"]').waitFor();
    await page.locator("#rerun-failed", { hasText: "Re-run 2 failed hosts" }).waitFor();
    await shot("run-cancelled");
  });
  await step("the dashboard lists both runs", async () => {
    await go("#/", "Dashboard");
    await page.locator('#recent-runs tr[data-run-id] .badge[data-status="completed"]').waitFor();
    await page.locator('#recent-runs tr[data-run-id] .badge[data-status="cancelled"]').waitFor();
    const rows = await page.locator("#recent-runs tr[data-run-id]", { hasText: EVENT_NAME }).count();
    if (rows !== 2) {
      throw new Error(`the dashboard lists ${rows} runs of ${EVENT_NAME}, expected 2`);
    }
    await page.locator("#upcoming tr", { hasText: EVENT_NAME }).waitFor();
    await shot("dashboard");
  });
  await step("the runs page filters by status", async () => {
    await go("#/runs", "Runs");
    await page.locator("tr[data-run-id]").nth(1).waitFor();
    await page.locator("#runs-status").selectOption("cancelled");
    await page.locator('tr[data-run-id] .badge[data-status="cancelled"]').waitFor();
    await page.waitForFunction(() => document.querySelectorAll("tr[data-run-id]").length === 1);
    await shot("runs");
  });
  await step("the theme toggle switches between dark and light", async () => {
    const before = await page.evaluate(() => document.documentElement.dataset.theme);
    await page.locator("#theme-toggle").click();
    const after = await page.evaluate(() => document.documentElement.dataset.theme);
    if (before === after || !["dark", "light"].includes(after ?? "")) {
      throw new Error(`the theme went from ${before} to ${after}`);
    }
    await go("#/", "Dashboard");
    await shot(`dashboard-${after}`);
    await page.locator("#theme-toggle").click();
  });
  await step("keyboard: Tab reaches the navigation from the skip link", async () => {
    await page.reload();
    await page.locator("#page-title", { hasText: "Dashboard" }).waitFor();
    await page.keyboard.press("Tab");
    const first = await page.evaluate(() => document.activeElement?.textContent ?? "");
    if (first !== "Skip to content") {
      throw new Error(`the first Tab stop is ${JSON.stringify(first)}`);
    }
    await page.keyboard.press("Tab");
    await page.keyboard.press("Tab");
    await page.keyboard.press("Tab");
    await page.keyboard.press("Enter");
    await page.locator("#page-title", { hasText: "Servers" }).waitFor();
  });
  await step("log out", logOut);
}

async function viewerSteps() {
  await step("log in as the viewer: read-only", async () => {
    await logIn(viewer);
    await page.locator("#read-only-note").waitFor();
    await shot("viewer-dashboard");
  });
  await step("the viewer sees servers and agents but no Add server", async () => {
    await go("#/servers", "Servers");
    await page.locator("table.agents tr", { hasText: agentName }).waitFor();
    // Servers belong to their owner: the admin's SSH server is not the viewer's to see.
    await page.locator("#servers .empty").waitFor();
    if ((await page.locator("#add-server").count()) !== 0) {
      throw new Error("the viewer has an Add server button");
    }
    if ((await page.locator("table.agents a", { hasText: "Open terminal" }).count()) !== 0) {
      throw new Error("the viewer has Open terminal links (viewers cannot open terminals)");
    }
    if ((await page.locator(".page-body button").count()) !== 0) {
      throw new Error("the viewer has buttons on the servers page");
    }
    await shot("viewer-servers");
  });
  await step("the viewer gets no New event, and the editor refuses", async () => {
    await go("#/events", "Events");
    await page.locator(".empty").waitFor();
    if ((await page.locator("#new-event").count()) !== 0) {
      throw new Error("the viewer has a New event button");
    }
    await shot("viewer-events");
    await go("#/events/new", "New event");
    await page.locator(".form-error", { hasText: "Viewers cannot create events" }).waitFor();
    if ((await page.locator("#save-event, #run-now, #delete-event").count()) !== 0) {
      throw new Error("the viewer has change buttons in the editor");
    }
  });
  await step("the viewer's runs page has no run buttons", async () => {
    await go("#/runs", "Runs");
    await page.locator(".empty, table.runs").first().waitFor();
    if ((await page.locator("#run-again, #rerun-failed, [data-action=cancel]").count()) !== 0) {
      throw new Error("the viewer has run buttons");
    }
    await shot("viewer-runs");
  });
  await step("a direct API call by the viewer is refused with 403", async () => {
    const answer = await page.evaluate(async () => {
      const me = await (await fetch("/api/v1/auth/me")).json();
      const response = await fetch("/api/v1/events", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": me.csrf_token },
        body: JSON.stringify({ name: "viewer-made", kind: "bash", script: "true" }),
      });
      return { status: response.status, body: await response.text() };
    });
    if (answer.status !== 403) {
      throw new Error(`POST /events as the viewer answered ${answer.status}: ${answer.body}`);
    }
  });
  await step("log out", logOut);
}

// ---- Settings and the Console page ----

const NEW_USER_PASSWORD = "browser-made-password";
const HOOK_URL_SECRET = "hook-key-never-shown";
const HOOK_SIGNING_SECRET = "hook-signing-never-shown";

/** A webhook receiver on 127.0.0.1: what the tool's test notification is delivered to. */
async function startHookReceiver() {
  const received = [];
  const server = createServer((request, response) => {
    let body = "";
    request.setEncoding("utf8");
    request.on("data", (chunk) => {
      body += chunk;
    });
    request.on("end", () => {
      received.push({ method: request.method, url: request.url ?? "", body });
      response.writeHead(200, { "Content-Type": "text/plain" });
      response.end("ok");
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, received, port: server.address().port };
}

/** Calls the API from the page: with the session (and its CSRF token) or a bearer token. */
async function api(method, path, body, bearer) {
  return page.evaluate(
    async ({ method, path, body, bearer }) => {
      const headers = { Accept: "application/json" };
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
      }
      if (bearer !== undefined) {
        headers.Authorization = `Bearer ${bearer}`;
      } else if (method !== "GET") {
        const me = await (await fetch("/api/v1/auth/me")).json();
        headers["X-CSRF-Token"] = me.csrf_token;
      }
      const response = await fetch(`/api/v1${path}`, {
        method,
        headers,
        credentials: bearer === undefined ? "same-origin" : "omit",
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
    { method, path, body, bearer },
  );
}

/** Polls `check` (node side) until it returns true, failing with `what` after the deadline. */
async function until(what, check) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  for (;;) {
    if (await check()) {
      return;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** Whether the xterm.js terminal at `window[name]` has a line containing `wanted`. */
async function terminalHas(name, wanted) {
  return page.evaluate(
    ({ name, wanted }) => {
      const buffer = window[name]?.buffer.active;
      if (buffer === undefined) {
        return false;
      }
      for (let row = 0; row < buffer.length; row += 1) {
        if (buffer.getLine(row)?.translateToString(true).includes(wanted)) {
          return true;
        }
      }
      return false;
    },
    { name, wanted },
  );
}

async function settingsSteps(hook) {
  await step("log in as the admin again for the settings", () => logIn(admin));
  await step("settings → users: add a user with a role, change the role; no delete for yourself", async () => {
    await go("#/settings/users", "Settings · Users");
    await page.locator(`tr[data-user="${admin.username}"]`).waitFor();
    if ((await page.locator(`tr[data-user="${admin.username}"] button.danger`).count()) !== 0) {
      throw new Error("the admin can delete themselves");
    }
    await page.locator("#new-user-name").fill("bad name");
    await page.locator("#new-user-password").fill(NEW_USER_PASSWORD);
    await page.locator("#create-user").click();
    await page.locator('#new-user .field.invalid[data-field="username"]').waitFor();
    await page.locator("#new-user-name").fill("browser-made");
    await page.locator("#new-user-password").fill(NEW_USER_PASSWORD);
    await page.locator("#new-user-role").selectOption("viewer");
    await page.locator("#create-user").click();
    const row = page.locator('tr[data-user="browser-made"]');
    await row.waitFor();
    await row.locator("select").selectOption("user");
    await until("the role change", async () => {
      const users = await api("GET", "/users");
      return users.body.find((user) => user.username === "browser-made")?.role === "user";
    });
    await expectNotRendered(NEW_USER_PASSWORD, "the users page");
    await shot("settings-users");
  });
  await step("settings → API tokens: a token shown once works, then is revoked", async () => {
    await go("#/settings/tokens", "Settings · API tokens");
    await page.locator("#new-token-name").fill("browser-token");
    await page.locator("#create-token").click();
    await page.locator("#new-token-value").waitFor();
    const token = (await text("#new-token-value")).trim();
    if (!token.startsWith("crt_")) {
      throw new Error(`the new token looks like ${JSON.stringify(token)}`);
    }
    const me = await api("GET", "/auth/me", undefined, token);
    if (me.status !== 200 || me.body.username !== admin.username) {
      throw new Error(`the new token did not authenticate: ${me.status} ${JSON.stringify(me.body)}`);
    }
    const row = page.locator('tr[data-token-name="browser-token"]');
    await row.waitFor();
    await shot("settings-tokens");
    await go("#/settings/tools", "Settings · Tools");
    await go("#/settings/tokens", "Settings · API tokens");
    await row.waitFor();
    await expectNotRendered(token, "the tokens page after leaving it");
    await row.locator("button", { hasText: "Revoke" }).click();
    await row.waitFor({ state: "detached" });
    const after = await api("GET", "/auth/me", undefined, token);
    if (after.status !== 401) {
      throw new Error(`the revoked token still answers ${after.status}`);
    }
  });
  await step("settings → tools: a webhook with write-only credentials, tested for real", async () => {
    await go("#/settings/tools", "Settings · Tools");
    await page.locator("#tool-name").fill("browser-hook");
    await page.locator("#tool-kind").selectOption("webhook");
    await page.locator("#tool-url").fill(`http://127.0.0.1:${hook.port}/hook?key=${HOOK_URL_SECRET}`);
    await page.locator("#tool-secret").fill(HOOK_SIGNING_SECRET);
    await page.locator("#save-tool").click();
    const row = page.locator('tr[data-tool="browser-hook"]');
    await row.waitFor();
    await expectNotRendered(HOOK_URL_SECRET, "the tools page");
    await expectNotRendered(HOOK_SIGNING_SECRET, "the tools page");
    await row.locator("[data-action=test]").click();
    await row.locator('.tool-test[data-status="sent"]').waitFor();
    if (!hook.received.some((request) => request.method === "POST" && request.url.includes(HOOK_URL_SECRET) && request.body.includes("Cronium test notification"))) {
      throw new Error(`the webhook received ${JSON.stringify(hook.received)}`);
    }
    // Editing shows no credential; a rename without new credentials keeps them.
    await row.locator("[data-action=edit]").click();
    await page.locator("#tool-editor h2", { hasText: "Edit browser-hook" }).waitFor();
    if ((await page.locator("#tool-url").inputValue()) !== "") {
      throw new Error("the edit form shows the stored URL");
    }
    await shot("settings-tools");
    await page.locator("#tool-name").fill("browser-hook-2");
    await page.locator("#save-tool").click();
    await page.locator('tr[data-tool="browser-hook-2"]').waitFor();
    const tools = await api("GET", "/tools");
    if (tools.body.find((tool) => tool.name === "browser-hook-2")?.target_host === undefined) {
      throw new Error(`the renamed tool: ${JSON.stringify(tools.body)}`);
    }
  });
  await step("settings → variables: set one and see it", async () => {
    await go("#/settings/variables", "Settings · Variables");
    await page.locator("#variable-name").fill("browser_var");
    await page.locator("#variable-value").fill('{"answer": 42}');
    await page.locator("#set-variable-submit").click();
    await page.locator('tr[data-variable="browser_var"]', { hasText: '{"answer":42}' }).waitFor();
    const stored = await api("GET", "/variables/browser_var");
    if (stored.status !== 200 || stored.body.value?.answer !== 42) {
      throw new Error(`GET /variables/browser_var: ${stored.status} ${JSON.stringify(stored.body)}`);
    }
    await shot("settings-variables");
  });
  await step("settings → enrollment tokens: an install command, listed, then revoked", async () => {
    await go("#/settings/enrollment", "Settings · Enrollment tokens");
    await page.locator("#enrollment-labels").fill("zone=settings-page");
    await page.locator("#enrollment-uses").fill("2");
    await page.locator("#create-enrollment").click();
    await page.locator("#enrollment-command", { hasText: "install.sh" }).waitFor();
    const row = page.locator("tr[data-enrollment-token]", { hasText: "zone=settings-page" });
    await row.waitFor();
    await shot("settings-enrollment");
    await row.locator("button", { hasText: "Revoke" }).click();
    await row.waitFor({ state: "detached" });
    const listed = await api("GET", "/enrollment-tokens");
    if (listed.body.some((token) => token.labels.zone === "settings-page")) {
      throw new Error("the revoked token is still listed");
    }
  });
}

async function consoleSteps() {
  let sessionId;
  await step("console: a terminal tab runs a command", async () => {
    const agents = await api("GET", "/agents");
    const agent = agents.body.find((candidate) => candidate.name === agentName);
    // Record this agent's terminals, so the session can be played back below.
    const recorded = await api("PATCH", `/agents/${agent.id}`, { record_terminals: true });
    if (recorded.status !== 200) {
      throw new Error(`PATCH /agents: ${recorded.status} ${JSON.stringify(recorded.body)}`);
    }
    await go("#/console", "Console");
    await page.locator("#live-sessions .empty").waitFor();
    await page.locator("#console-agent").selectOption({ label: agentName });
    await page.locator("#console-open").click();
    const panel = page.locator('.terminal-panel[data-state="connected"][data-session-id]');
    await panel.waitFor();
    sessionId = await panel.getAttribute("data-session-id");
    await panel.locator(".xterm").click();
    await page.keyboard.type("echo hi $((6*7))\n");
    await until("the terminal to show `hi 42`", () => terminalHas("croniumConsoleTerminal", "hi 42"));
    await page.locator(`#live-sessions tr[data-session-id="${sessionId}"]`, { hasText: "open in a tab" }).waitFor();
    await shot("console");
  });
  await step("console: a closed tab leaves the session live; re-attach replays it", async () => {
    await page.locator(".terminal-tab .tab-close").click();
    await page.locator(".terminal-tab").waitFor({ state: "detached" });
    const row = page.locator(`#live-sessions tr[data-session-id="${sessionId}"]`);
    await row.locator("[data-action=attach]").click();
    await page.locator(`.terminal-panel[data-state="connected"][data-session-id="${sessionId}"]`).waitFor();
    await until("the re-attached terminal to replay `hi 42`", () => terminalHas("croniumConsoleTerminal", "hi 42"));
  });
  await step("console: ending the session, then playing its recording", async () => {
    await page.locator(".terminal-panel [data-action=end-session]").click();
    await page.locator('.terminal-panel[data-state="exited"]').waitFor();
    const row = page.locator(`#recordings tr[data-recording="${sessionId}"]`);
    await row.waitFor();
    await page.locator(`#live-sessions tr[data-session-id="${sessionId}"]`).waitFor({ state: "detached" });
    await row.locator("[data-action=play]").click();
    await page.locator('#player[data-state="ended"]').waitFor();
    if (!(await terminalHas("croniumPlayerTerminal", "hi 42"))) {
      throw new Error("the played recording does not show `hi 42`");
    }
    await shot("console-recording");
  });
  await step("log out", logOut);
}

async function viewerSettingsSteps() {
  await step("log in as the viewer for the settings", () => logIn(viewer));
  await step("the viewer's settings are read-only and the API refuses changes", async () => {
    await go("#/settings/tokens", "Settings · API tokens");
    await page.locator("#tokens .empty, #tokens table").first().waitFor();
    if ((await page.locator("#settings-tab-users, #settings-tab-enrollment").count()) !== 0) {
      throw new Error("the viewer is offered the admin-only settings");
    }
    for (const [hash, title] of [
      ["#/settings/tokens", "Settings · API tokens"],
      ["#/settings/tools", "Settings · Tools"],
      ["#/settings/variables", "Settings · Variables"],
    ]) {
      await go(hash, title);
      await page.locator(".settings-body .empty, .settings-body table").first().waitFor();
      if ((await page.locator(".page-body button, .page-body form").count()) !== 0) {
        throw new Error(`the viewer has change controls on ${hash}`);
      }
    }
    await shot("viewer-settings");
    await go("#/settings/users", "Settings");
    await page.locator(".form-error", { hasText: "admin role" }).waitFor();
    for (const [method, path, body, expected] of [
      ["POST", "/tokens", { name: "viewer-token" }, 403],
      ["GET", "/users", undefined, 403],
      ["POST", "/users", { username: "sneaky", password: "sneaky-password", role: "admin" }, 403],
      ["PUT", "/variables/viewer_var", { value: 1 }, 403],
      ["POST", "/tools", { name: "viewer-hook", kind: "webhook", config: { url: "http://127.0.0.1:9/" } }, 403],
      ["POST", "/enrollment-tokens", {}, 403],
    ]) {
      const answer = await api(method, path, body);
      if (answer.status !== expected) {
        throw new Error(`${method} ${path} as the viewer answered ${answer.status}: ${JSON.stringify(answer.body)}`);
      }
    }
  });
  await step("the viewer's console opens no terminal", async () => {
    await go("#/console", "Console");
    await page.locator("#live-sessions .empty").waitFor();
    if ((await page.locator("#console-open").count()) !== 0) {
      throw new Error("the viewer has an Open terminal button");
    }
    await shot("viewer-console");
  });
  await step("log out", logOut);
}

// ---- Workflows ----

const WORKFLOW_NAME = "browser-flow";

/** The centre of an element, in page coordinates. */
async function centre(locator) {
  const box = await locator.boundingBox();
  if (box === null) {
    throw new Error("the element is not visible");
  }
  return { x: box.x + box.width / 2, y: box.y + box.height / 2 };
}

/** Drags with the mouse from `from` to `to` in steps (pointer events, as a person would). */
async function drag(from, to) {
  await page.mouse.move(from.x, from.y);
  await page.mouse.down();
  await page.mouse.move((from.x + to.x) / 2, (from.y + to.y) / 2, { steps: 5 });
  await page.mouse.move(to.x, to.y, { steps: 5 });
  await page.mouse.up();
}

async function workflowSteps() {
  await step("log in as the admin for the workflows", () => logIn(admin));
  await step("workflows: the empty state teaches and leads to the builder", async () => {
    // Two events on the agent: the first outputs a value, the second gets it as its input.
    const agents = await api("GET", "/agents");
    const agent = agents.body.find((candidate) => candidate.name === agentName);
    if (agent === undefined) {
      throw new Error(`no agent ${agentName}: ${JSON.stringify(agents.body)}`);
    }
    for (const [name, script] of [
      ["wf-produce", `. ./cronium.sh\ncronium_output '{"greeting": "hello from step one"}'`],
      ["wf-consume", '. ./cronium.sh\necho "consumed $(cronium_input)"\ncronium_output "{\\"saw\\": $(cronium_input)}"'],
    ]) {
      const created = await api("POST", "/events", { name, kind: "bash", script, targets: { agents: [agent.id] } });
      if (created.status !== 201) {
        throw new Error(`POST /events ${name} answered ${created.status}: ${JSON.stringify(created.body)}`);
      }
    }
    await go("#/workflows", "Workflows");
    await page.locator(".empty", { hasText: "No workflows yet" }).waitFor();
    await page.locator("#new-workflow").click();
    await page.locator("#page-title", { hasText: "New workflow" }).waitFor();
  });
  await step("the builder: two nodes from events, connected by dragging a handle", async () => {
    await page.locator("#workflow-name").fill(WORKFLOW_NAME);
    for (const name of ["wf-produce", "wf-consume"]) {
      await page.locator("#workflow-add-event").selectOption({ label: name });
      await page.locator("#workflow-add-node").click();
      await page.locator(`#workflow-canvas g.wf-node[data-node="${name}"]`).waitFor();
    }
    // Drag the second node away, then connect the first to it from its output handle.
    const second = page.locator('#workflow-canvas g.wf-node[data-node="wf-consume"]');
    const before = await second.getAttribute("transform");
    const at = await centre(second.locator("rect"));
    await drag(at, { x: at.x + 260, y: at.y - 40 });
    await until("the dragged node to move", async () => (await second.getAttribute("transform")) !== before);
    await page.locator("#workflow-connect-kind").selectOption("success");
    await drag(await centre(page.locator('#workflow-canvas circle[data-handle="wf-produce"]')), await centre(second.locator("rect")));
    await page.locator('#workflow-canvas g.wf-edge.wf-edge-success[data-from="wf-produce"][data-to="wf-consume"]').waitFor();
    await page.locator("#workflow-edges tr", { hasText: "on success" }).waitFor();
    // Selecting the edge (its label) shows its kind.
    await page.locator('#workflow-canvas g.wf-edge[data-from="wf-produce"] text').click();
    if ((await page.locator("#workflow-edge-kind").inputValue()) !== "success") {
      throw new Error("the selected edge does not show its kind");
    }
    // Selecting a node (keyboard) offers its join and removal.
    await page.locator('#workflow-canvas g.wf-node[data-node="wf-consume"]').focus();
    await page.keyboard.press("Enter");
    await page.locator("#workflow-node-join").waitFor();
    await page.locator("#workflow-node-remove").waitFor();
    await shot("workflow-editor");
  });
  await step("an edge back makes a cycle: Save shows the API's message and marks the edge", async () => {
    // wf-produce stays the entry node; an edge from wf-consume back into itself is a cycle.
    await page.locator("#workflow-connect-from").selectOption("wf-consume");
    await page.locator("#workflow-connect-to").selectOption("wf-consume");
    await page.locator("#workflow-connect-kind").selectOption("failure");
    await page.locator("#workflow-connect").click();
    await page.locator('#workflow-canvas g.wf-edge.wf-edge-failure[data-from="wf-consume"][data-to="wf-consume"]').waitFor();
    await page.locator("#workflow-save").click();
    await page.locator("#workflow-error", { hasText: "cycles are not allowed: wf-consume → wf-consume" }).waitFor();
    // The edge along the cycle the API named is marked; the edge list's remove button takes it
    // out.
    await page.locator('#workflow-canvas g.wf-edge.invalid[data-from="wf-consume"][data-to="wf-consume"]').waitFor();
    if ((await page.locator("#workflow-canvas g.wf-edge.invalid").count()) !== 1) {
      throw new Error("edges off the cycle are marked");
    }
    await page.locator('#workflow-edges tr[data-edge="1"] button').click();
    if ((await page.locator('#workflow-canvas g.wf-edge[data-from="wf-consume"]').count()) !== 0) {
      throw new Error("the removed edge is still drawn");
    }
  });
  await step("save: the workflow is created and the address becomes its own", async () => {
    await page.locator("#workflow-save").click();
    await page.locator("#page-title", { hasText: `Workflow ${WORKFLOW_NAME}` }).waitFor();
    await page.locator("#workflow-dirty", { hasText: "Saved" }).waitFor();
    await until("the workflow's address", async () => /#\/workflows\/[^/]+$/.test(page.url()) && !page.url().endsWith("/new"));
    const listed = await api("GET", "/workflows");
    const saved = listed.body.find((workflow) => workflow.name === WORKFLOW_NAME);
    if (saved === undefined || saved.nodes.length !== 2 || saved.edges.length !== 1 || saved.edges[0].on !== "success") {
      throw new Error(`the saved workflow is not the one built: ${JSON.stringify(listed.body)}`);
    }
    await page.locator("#workflow-runs .empty").waitFor();
  });
  await step("run it with JSON input: both nodes light up completed, data passed on", async () => {
    await page.locator("#workflow-run-input").fill('{"from": "browser"}');
    await page.locator("#workflow-run").click();
    await page.locator("#page-title", { hasText: `Workflow ${WORKFLOW_NAME} · run` }).waitFor();
    await until(
      "both nodes completed",
      async () => (await page.locator('#workflow-run-canvas g.wf-node[data-state="completed"]').count()) === 2,
    );
    await page.locator('body[data-workflow-run-status="completed"]').waitFor();
    await page.locator('#workflow-run-nodes tr[data-node="wf-consume"]', { hasText: "hello from step one" }).waitFor();
    if (await page.locator("#workflow-run-cancel").isVisible()) {
      throw new Error("an ended run still offers Cancel");
    }
    const href = await page.locator('#workflow-run-canvas a[data-node-link="wf-produce"]').getAttribute("href");
    if (href === null || !href.startsWith("#/runs/")) {
      throw new Error(`the node does not link to its run: ${href}`);
    }
    await page.locator("#workflow-run-history tr.current").waitFor();
    await shot("workflow-run");
    await page.locator('#workflow-run-canvas a[data-node-link="wf-produce"]').click();
    await page.locator("#page-title", { hasText: "Run of wf-produce" }).waitFor();
  });
  await step("schedule with its preview and a webhook: the secret is shown once", async () => {
    await page.goBack();
    await page.locator("#page-title", { hasText: `Workflow ${WORKFLOW_NAME} · run` }).waitFor();
    await page.locator("#content a", { hasText: "← Workflow" }).click();
    await page.locator("#page-title", { hasText: `Workflow ${WORKFLOW_NAME}` }).waitFor();
    await page.locator("#workflow-scheduled").check();
    await page.locator("#workflow-cron").fill("*/5 * * * *");
    await page.locator("#workflow-timezone").fill("UTC");
    await until("five fire times in the preview", async () => (await page.locator("#workflow-schedule-preview li").count()) === 5);
    await page.locator("#workflow-webhook").check();
    await page.locator("#workflow-save").click();
    const secret = (await page.locator("#workflow-webhook-secret").textContent()) ?? "";
    if (!secret.startsWith("whsec_")) {
      throw new Error(`no webhook secret shown: ${secret}`);
    }
    await page.locator("#workflow-webhook-url", { hasText: "/api/v1/hooks/workflows/" }).waitFor();
    // Shown once: reopening the workflow shows the URL, never the secret.
    await page.reload();
    await page.locator("#workflow-webhook-url").waitFor();
    await expectNotRendered(secret, "the reopened workflow");
  });
  await step("the workflows list: nodes, trigger and the last run", async () => {
    await go("#/workflows", "Workflows");
    const row = page.locator(`tr[data-workflow="${WORKFLOW_NAME}"]`);
    await row.locator(".badge-completed").waitFor();
    if (!(await row.textContent()).includes("manual, schedule */5 * * * * (UTC), webhook")) {
      throw new Error(`the trigger is not shown: ${await row.textContent()}`);
    }
    await shot("workflows");
  });
  await step("log out", logOut);
}

async function viewerWorkflowSteps() {
  await step("log in as the viewer for the workflows", () => logIn(viewer));
  await step("the viewer cannot build or run workflows", async () => {
    await go("#/workflows", "Workflows");
    await page.locator(".empty", { hasText: "No workflows yet" }).waitFor();
    if ((await page.locator("#new-workflow").count()) !== 0) {
      throw new Error("the viewer has a New workflow button");
    }
    await shot("viewer-workflows");
    await go("#/workflows/new", "New workflow");
    await page.locator(".form-error", { hasText: "Viewers cannot create workflows" }).waitFor();
    if ((await page.locator("#workflow-save, #workflow-add-node, #workflow-run").count()) !== 0) {
      throw new Error("the viewer has workflow change controls");
    }
    const answer = await api("POST", "/workflows", { name: "viewer-flow", nodes: [{ id: "a", event_id: "wf-produce" }], edges: [] });
    if (answer.status !== 403) {
      throw new Error(`POST /workflows as the viewer answered ${answer.status}: ${JSON.stringify(answer.body)}`);
    }
  });
  await step("log out", logOut);
}

async function main() {
  ({ context, page } = await step("launch Chromium", () =>
    launchChromium({
      executablePath,
      profile,
      viewport: { width: 1280, height: 800 },
      colorScheme: "dark",
      timeoutMs: STEP_TIMEOUT_MS,
      browserLog,
      violations,
    }),
  ));
  // Confirmation dialogs (none expected on the paths above) are accepted.
  page.on("dialog", (dialog) => void dialog.accept());

  const hook = await startHookReceiver();
  try {
    await adminSteps();
    await workflowSteps();
    await settingsSteps(hook);
    await consoleSteps();
    await viewerSteps();
    await viewerSettingsSteps();
    await viewerWorkflowSteps();
  } finally {
    hook.server.close();
  }
  assertCleanPages({ browserLog, violations });
}

await runBrowserTest({
  name: "console",
  label: "console",
  artifacts,
  main,
  browser: () => ({ page, context }),
  browserLog,
  cleanup: () => {
    if (ownProfile) {
      rmSync(profile, { recursive: true, force: true });
    }
    rmSync(gateDir, { recursive: true, force: true });
  },
});
