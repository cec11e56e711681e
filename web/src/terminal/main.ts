// The terminal page: /ui/terminal?agent=<id>[&session=<id>].
//
// Logs in if needed, looks the agent up, then runs an xterm.js terminal over the terminal
// WebSocket. The session id goes into the address bar as soon as the server names it, so a reload
// re-attaches to the same shell (the server replays its recent output).
//
// For tests and debugging the page exposes:
// - `window.croniumTerminal`: the xterm.js `Terminal` (e.g. `croniumTerminal.buffer.active`);
// - on `<body>`: `data-state` (`loading`, `login`, `connecting`, `connected`, `detached`,
//   `disconnected`, `exited`, `failed`) and `data-session-id` once known.

import "@xterm/xterm/css/xterm.css";
import "../styles.css";

import type { FitAddon } from "@xterm/addon-fit";
import type { Terminal } from "@xterm/xterm";

import { type Agent, ApiError, currentUser, fetchAgent, messageOf } from "../api";
import { el, replaceChildren } from "../dom";
import { showLogin } from "../login";
import { TerminalConnection, probeFailure, terminalUrl } from "./connection";
import { openTerminal } from "./xterm";

declare global {
  interface Window {
    /** The page's xterm.js terminal, for tests and debugging. */
    croniumTerminal?: Terminal;
  }
}

type PageState = "loading" | "login" | "connecting" | "connected" | "detached" | "disconnected" | "exited" | "failed";

const STATE_LABELS: Record<PageState, string> = {
  loading: "loading",
  login: "logging in",
  connecting: "connecting…",
  connected: "connected",
  detached: "detached",
  disconnected: "disconnected",
  exited: "session ended",
  failed: "error",
};


const app = document.getElementById("app") as HTMLElement;

function setState(state: PageState): void {
  document.body.dataset.state = state;
  const label = document.getElementById("status-state");
  if (label !== null) {
    label.textContent = STATE_LABELS[state];
    label.className = `state state-${state}`;
  }
}

async function start(): Promise<void> {
  setState("loading");
  const params = new URLSearchParams(window.location.search);
  const agentId = params.get("agent");
  if (agentId === null || agentId === "") {
    fail("No agent given: open a terminal from the agents list.");
    return;
  }
  try {
    if ((await currentUser()) === null) {
      setState("login");
      await showLogin(app);
    }
    const agent = await fetchAgent(agentId);
    new TerminalPage(agent, params.get("session")).connect();
  } catch (error) {
    fail(error instanceof ApiError && error.status === 404 ? `Agent ${agentId} not found.` : messageOf(error));
  }
}

/** A page that could not get as far as a terminal: the message and a way back. */
function fail(message: string): void {
  setState("failed");
  replaceChildren(
    app,
    el(
      "div",
      { class: "page" },
      el("p", { class: "form-error", role: "alert" }, message),
      el("p", {}, el("a", { href: "./#/servers" }, "Back to the agents")),
    ),
  );
}

class TerminalPage {
  private readonly agent: Agent;
  private sessionId: string | null;
  private readonly terminal: Terminal;
  private readonly fit: FitAddon;
  private connection: TerminalConnection | null = null;
  /** What the current socket told us before it closed; decides what its close means. */
  private ending: { exitCode?: number | null; detached?: string; error?: string; closeRequested?: boolean } = {};
  private readonly sessionLabel = el("code", { id: "status-session" }, "—");
  private readonly closeButton = el("button", { type: "button", id: "close-session", title: "End the shell on the agent" }, "Close session");
  private readonly banner = el("div", { id: "banner", class: "banner", role: "alert", hidden: true });
  private readonly screen = el("div", { id: "terminal", class: "terminal" });

  constructor(agent: Agent, sessionId: string | null) {
    this.agent = agent;
    this.sessionId = sessionId;
    document.title = `${agent.name} · Cronium terminal`;
    this.closeButton.disabled = true;
    this.closeButton.addEventListener("click", () => this.closeSession());
    const bar = el(
      "header",
      { class: "statusbar", "aria-label": "Terminal status" },
      el("a", { href: "./#/servers", class: "brand", title: "Back to the agents" }, "Cronium"),
      el("span", { class: "field" }, el("span", { class: "muted" }, "agent "), el("strong", { id: "status-agent" }, agent.name)),
      el("span", { class: "field" }, el("span", { class: "muted" }, "session "), this.sessionLabel),
      el("span", { class: "field" }, el("span", { id: "status-state", class: "state", "aria-live": "polite" })),
      el("span", { class: "spacer" }),
      this.closeButton,
    );
    replaceChildren(app, el("div", { class: "terminal-page" }, bar, this.banner, this.screen));
    app.classList.add("full");

    ({ terminal: this.terminal, fit: this.fit } = openTerminal(this.screen));
    window.croniumTerminal = this.terminal;

    this.terminal.onData((data) => this.connection?.sendText(data));
    this.terminal.onBinary((data) => this.connection?.sendBytes(Uint8Array.from(data, (char) => char.charCodeAt(0) & 0xff)));
    this.terminal.onResize(({ cols, rows }) => this.connection?.resize(cols, rows));
    this.terminal.onTitleChange((title) => {
      document.title = title === "" ? `${agent.name} · Cronium terminal` : `${title} · ${agent.name}`;
    });
    this.showSession();
  }

  /** Opens a socket: re-attaches to `sessionId` when there is one, else starts a new shell. */
  connect(): void {
    this.hideBanner();
    this.ending = {};
    setState("connecting");
    const url = terminalUrl(this.agent.id, this.terminal.cols, this.terminal.rows, this.sessionId);
    const connection = new TerminalConnection(url, {
      open: () => {
        setState("connected");
        this.closeButton.disabled = false;
        this.terminal.focus();
      },
      output: (bytes) => this.terminal.write(bytes),
      session: (id) => {
        this.sessionId = id;
        this.showSession();
        // A re-attached session keeps the size it had; make it fit this window.
        connection.resize(this.terminal.cols, this.terminal.rows);
      },
      exit: (code) => {
        this.ending.exitCode = code;
      },
      detached: (reason) => {
        // Reasons are codes such as `agent_disconnected`.
        this.ending.detached = reason.replaceAll("_", " ");
        setState("detached");
        this.showBanner(`Detached: ${this.ending.detached}.`, "reattach");
      },
      error: (message) => {
        this.ending.error = message;
        this.showBanner(message, "reattach");
      },
      closed: (details) => {
        if (this.connection === connection) {
          this.connection = null;
          void this.closed(url, details);
        }
      },
    });
    this.connection = connection;
  }

  private async closed(url: URL, details: { opened: boolean; code: number; reason: string }): Promise<void> {
    this.closeButton.disabled = true;
    const ending = this.ending;
    if (ending.exitCode !== undefined || ending.closeRequested === true) {
      setState("exited");
      let how: string;
      if (typeof ending.exitCode === "number") {
        how = `ended with exit code ${ending.exitCode}`;
      } else if (ending.closeRequested === true) {
        how = "was closed";
      } else {
        how = "ended (the shell was killed)";
      }
      this.terminal.write(`\r\n\x1b[2m[the session ${how}]\x1b[0m\r\n`);
      this.forgetSession();
      this.showBanner(`The session ${how}.`, "new");
      return;
    }
    if (ending.detached !== undefined) {
      setState("detached");
      this.showBanner(`Detached: ${ending.detached}.`, "reattach");
      return;
    }
    if (ending.error !== undefined) {
      setState("failed");
      this.showBanner(ending.error, "reattach");
      return;
    }
    if (!details.opened) {
      setState("failed");
      const reason = (await probeFailure(url)) ?? (await this.diagnose());
      this.showBanner(`The terminal could not be opened${reason === null ? "." : `: ${reason}`}`, "reattach");
      return;
    }
    setState("disconnected");
    const why = details.reason === "" ? `code ${details.code}` : details.reason;
    this.showBanner(`The connection closed unexpectedly (${why}).`, "reattach");
  }

  /** What the API says about why a socket may have failed, when the probe could not tell. */
  private async diagnose(): Promise<string | null> {
    try {
      const agent = await fetchAgent(this.agent.id);
      if (agent.status !== "online") {
        return `the agent ${agent.name} is offline`;
      }
    } catch (error) {
      return messageOf(error);
    }
    return this.sessionId === null ? null : `session ${this.sessionId} cannot be re-attached (it may have ended)`;
  }

  private closeSession(): void {
    if (this.connection?.isOpen === true) {
      this.ending.closeRequested = true;
      this.closeButton.disabled = true;
      this.connection.closeSession();
    }
  }

  /** Drops the current session (it ended): a new connection starts a new shell. */
  private forgetSession(): void {
    this.sessionId = null;
    this.showSession();
  }

  /** Shows the session id in the status bar and in the address bar (so a reload re-attaches). */
  private showSession(): void {
    this.sessionLabel.textContent = this.sessionId ?? "—";
    const url = new URL(window.location.href);
    if (this.sessionId === null) {
      delete document.body.dataset.sessionId;
      url.searchParams.delete("session");
    } else {
      document.body.dataset.sessionId = this.sessionId;
      url.searchParams.set("session", this.sessionId);
    }
    if (url.href !== window.location.href) {
      history.replaceState(history.state, "", url);
    }
  }

  /**
   * Shows a message above the terminal with what can be done next: re-attach to the session
   * (when there is one; the terminal is cleared and the server replays the recent output) or
   * start a new one.
   */
  private showBanner(message: string, offer: "reattach" | "new"): void {
    const buttons: HTMLButtonElement[] = [];
    if (offer === "reattach" && this.sessionId !== null) {
      const reattach = el("button", { type: "button", id: "reattach", class: "primary" }, "Re-attach");
      reattach.addEventListener("click", () => {
        this.terminal.reset();
        this.connect();
      });
      buttons.push(reattach);
    }
    const fresh = el("button", { type: "button", id: "new-session", class: buttons.length === 0 ? "primary" : "" }, "New session");
    fresh.addEventListener("click", () => {
      this.forgetSession();
      this.terminal.reset();
      this.connect();
    });
    buttons.push(fresh);
    replaceChildren(this.banner, el("span", { class: "message" }, message), ...buttons);
    this.banner.hidden = false;
    this.fit.fit();
    buttons[0]?.focus();
  }

  private hideBanner(): void {
    this.banner.hidden = true;
    replaceChildren(this.banner);
    this.fit.fit();
  }
}

void start();
