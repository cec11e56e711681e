// The app shell: a sidebar (navigation, the live-updates indicator, theme toggle, the user and
// "Log out") and the page area. It opens the console's one change-notice stream (changes.ts).
// Routes live in the hash; each navigation aborts the previous page's signal, so its pollers
// and log streams stop, and draws the new page into a fresh area.

import { type User, logout, messageOf } from "../api";
import { el, replaceChildren } from "../dom";
import { type LiveState, liveState, onLiveState, startChanges } from "./changes";
import type { Page, PageContext } from "./context";
import { dashboardPage } from "./pages/dashboard";
import { eventEditorPage } from "./pages/event-editor";
import { eventsPage } from "./pages/events";
import { runPage } from "./pages/run";
import { runsPage } from "./pages/runs";
import { serversPage } from "./pages/servers";
import { settingsPage } from "./pages/settings";
import { workflowEditorPage } from "./pages/workflow-editor";
import { workflowRunPage } from "./pages/workflow-run";
import { workflowsPage } from "./pages/workflows";
import { type Route, currentPath, match } from "./router";
import { currentTheme, followSystemTheme, toggleTheme } from "./theme";

const routes: Route<Page>[] = [
  { pattern: "/", target: dashboardPage },
  { pattern: "/servers", target: serversPage },
  { pattern: "/events", target: eventsPage },
  { pattern: "/events/new", target: eventEditorPage },
  { pattern: "/events/:id", target: eventEditorPage },
  { pattern: "/runs", target: runsPage },
  { pattern: "/runs/:id", target: runPage },
  { pattern: "/workflows", target: workflowsPage },
  { pattern: "/workflows/new", target: workflowEditorPage },
  { pattern: "/workflows/:id", target: workflowEditorPage },
  { pattern: "/workflows/:id/runs/:run", target: workflowRunPage },
  // With xterm.js: a chunk of its own, loaded when the page is first opened.
  { pattern: "/console", target: (context, params) => import("./pages/console").then((page) => page.consolePage(context, params)) },
  { pattern: "/settings", target: settingsPage },
  { pattern: "/settings/:tab", target: settingsPage },
];

const LIVE_TEXT: Record<LiveState, [string, string]> = {
  connecting: ["Connecting…", "Opening the stream of live updates"],
  live: ["Live", "Lists update as soon as something changes"],
  reconnecting: ["Reconnecting…", "Live updates dropped; lists are polled until they are back"],
  off: ["Polling", "This browser cannot receive live updates; lists are polled"],
};

/** The sidebar's indicator of the change-notice stream. */
function liveIndicator(): HTMLElement {
  const indicator = el("span", { class: "live-indicator", id: "live-indicator", role: "status" });
  const show = (state: LiveState): void => {
    const [text, title] = LIVE_TEXT[state];
    indicator.dataset.state = state;
    indicator.textContent = text;
    indicator.title = title;
  };
  show(liveState());
  onLiveState(null, show);
  return indicator;
}

const NAV: Array<{ hash: string; label: string; section: string }> = [
  { hash: "#/", label: "Dashboard", section: "" },
  { hash: "#/servers", label: "Servers", section: "servers" },
  { hash: "#/events", label: "Events", section: "events" },
  { hash: "#/runs", label: "Runs", section: "runs" },
  { hash: "#/workflows", label: "Workflows", section: "workflows" },
  { hash: "#/console", label: "Console", section: "console" },
  { hash: "#/settings", label: "Settings", section: "settings" },
];

export function startShell(app: HTMLElement, user: User): void {
  const canWrite = user.role !== "viewer";
  const links = NAV.map((item) => el("a", { href: item.hash, class: "nav-link", "data-section": item.section }, item.label));
  const themeButton = el("button", { type: "button", class: "theme-toggle", id: "theme-toggle" });
  const showTheme = (): void => {
    const dark = currentTheme() === "dark";
    themeButton.textContent = dark ? "Light mode" : "Dark mode";
    themeButton.setAttribute("aria-pressed", String(dark));
    themeButton.title = dark ? "Switch to the light theme" : "Switch to the dark theme";
  };
  showTheme();
  themeButton.addEventListener("click", () => {
    toggleTheme();
    showTheme();
  });
  followSystemTheme(showTheme);
  const logoutButton = el("button", { type: "button", id: "logout" }, "Log out");
  logoutButton.addEventListener("click", () => {
    logoutButton.disabled = true;
    logout().then(
      () => window.location.assign(window.location.pathname),
      (error: unknown) => {
        logoutButton.disabled = false;
        window.alert(messageOf(error));
      },
    );
  });
  const sidebar = el(
    "nav",
    { class: "sidebar", "aria-label": "Console" },
    el("a", { href: "#/", class: "brand" }, "Cronium"),
    el("ul", { class: "nav" }, ...links.map((link) => el("li", {}, link))),
    el("span", { class: "spacer" }),
    liveIndicator(),
    themeButton,
    el(
      "div",
      { class: "whoami" },
      el("span", { id: "whoami-name" }, user.username),
      el("span", { class: `role role-${user.role}`, id: "whoami-role" }, user.role),
    ),
    !canWrite && el("p", { class: "muted small", id: "read-only-note" }, "Read-only: viewers see but cannot change anything."),
    logoutButton,
  );
  const main = el("main", { id: "content", class: "content", tabindex: "-1" });
  replaceChildren(app, el("a", { href: "#content", class: "skip-link" }, "Skip to content"), sidebar, main);
  app.className = "shell";
  startChanges();
  document.body.dataset.role = user.role;

  let controller: AbortController | null = null;
  const render = (): void => {
    controller?.abort();
    controller = new AbortController();
    const { path } = currentPath();
    const section = path.split("/")[1] ?? "";
    for (const link of links) {
      const current = link.dataset.section === section;
      if (current) {
        link.setAttribute("aria-current", "page");
      } else {
        link.removeAttribute("aria-current");
      }
    }
    const heading = el("h1", { id: "page-title" });
    const root = el("div", { class: "page-body" });
    replaceChildren(main, heading, root);
    const context: PageContext = {
      user,
      canWrite,
      isAdmin: user.role === "admin",
      root,
      signal: controller.signal,
      setTitle(title: string) {
        heading.textContent = title;
        document.title = `${title} · Cronium`;
      },
      navigate(hash: string) {
        if (window.location.hash === hash) {
          render();
        } else {
          window.location.hash = hash;
        }
      },
    };
    const found = match(routes, path);
    if (found === null) {
      context.setTitle("Not found");
      root.append(el("p", {}, "There is no such page. "), el("a", { href: "#/" }, "Go to the dashboard"));
      return;
    }
    document.body.dataset.page = path;
    const signal = controller.signal;
    Promise.resolve(found.target(context, found.params)).catch((error: unknown) => {
      if (!signal.aborted) {
        root.append(el("p", { class: "form-error", role: "alert" }, messageOf(error)));
      }
    });
  };
  window.addEventListener("hashchange", () => {
    render();
    main.focus({ preventScroll: true });
  });
  render();
}
