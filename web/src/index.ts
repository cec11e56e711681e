// The console's start page (/ui/): log in if needed, then the agents with an "Open terminal"
// link for each online one. The full console replaces this page later.

import "./styles.css";
import { type Agent, type User, currentUser, listAgents, logout, messageOf } from "./api";
import { el, replaceChildren } from "./dom";
import { showLogin } from "./login";

const app = document.getElementById("app") as HTMLElement;

async function start(): Promise<void> {
  let user: User | null;
  try {
    user = await currentUser();
  } catch (error) {
    showError(messageOf(error));
    return;
  }
  if (user === null) {
    user = await showLogin(app);
  }
  await showAgents(user);
}

async function showAgents(user: User): Promise<void> {
  const logoutButton = el("button", { type: "button" }, "Log out");
  logoutButton.addEventListener("click", () => {
    logout().then(
      () => window.location.reload(),
      (error: unknown) => showError(messageOf(error)),
    );
  });
  const header = el(
    "header",
    { class: "topbar" },
    el("span", { class: "brand" }, "Cronium"),
    el("span", { class: "spacer" }),
    el("span", { class: "muted" }, `${user.username} (${user.role})`),
    logoutButton,
  );
  const body = el("section", { "aria-labelledby": "agents-title" }, el("p", { class: "muted" }, "Loading agents…"));
  replaceChildren(app, header, el("h1", { id: "agents-title" }, "Agents"), body);
  let agents: Agent[];
  try {
    agents = await listAgents();
  } catch (error) {
    replaceChildren(body, el("p", { class: "form-error", role: "alert" }, messageOf(error)));
    return;
  }
  if (agents.length === 0) {
    replaceChildren(body, el("p", { class: "muted" }, "No agents are enrolled yet."));
    return;
  }
  agents.sort((a, b) => Number(b.status === "online") - Number(a.status === "online") || a.name.localeCompare(b.name));
  const rows = agents.map((agent) => {
    const online = agent.status === "online";
    const labels = Object.entries(agent.labels)
      .map(([key, value]) => `${key}=${value}`)
      .join(", ");
    const link = online
      ? el("a", { href: `terminal?agent=${encodeURIComponent(agent.id)}`, class: "button" }, "Open terminal")
      : el("span", { class: "muted" }, "offline");
    return el(
      "tr",
      { "data-agent-id": agent.id },
      el("td", {}, agent.name),
      el("td", {}, el("span", { class: `status status-${agent.status}` }, agent.status)),
      el("td", { class: "muted" }, labels),
      el("td", { class: "muted" }, agent.version ?? ""),
      el("td", {}, link),
    );
  });
  replaceChildren(
    body,
    el(
      "table",
      { class: "agents" },
      el(
        "thead",
        {},
        el("tr", {}, ...["Name", "Status", "Labels", "Version", ""].map((title) => el("th", { scope: "col" }, title))),
      ),
      el("tbody", {}, ...rows),
    ),
  );
}

function showError(message: string): void {
  replaceChildren(app, el("p", { class: "form-error", role: "alert" }, message));
}

void start();
