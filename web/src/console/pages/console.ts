// Console (`#/console`): terminals through the agent tunnel as tabs inside the console, the live
// sessions to re-attach (`#/console?agent=A&session=S` opens one on load), and recorded sessions
// to play back. Loaded on demand (with xterm.js) when the route is first opened.
//
// Each tab is one TerminalConnection (../../terminal/connection.ts, shared with the terminal
// page). Closing a tab only detaches: the shell lives on and stays in "Live sessions" until it
// ends or the idle timeout; "End session" hangs it up. Leaving the page detaches every tab.
//
// For tests: `window.croniumConsoleTerminal` is the selected tab's xterm.js Terminal; each tab
// panel carries `data-state` and `data-session-id`; the player carries `data-state`.

import "@xterm/xterm/css/xterm.css";

import type { FitAddon } from "@xterm/addon-fit";
import type { Terminal } from "@xterm/xterm";

import { type Agent, errorFrom, listAgents, messageOf } from "../../api";
import { el, replaceChildren } from "../../dom";
import { type TerminalSession, listTerminalSessions, recordingUrl } from "../../settings-api";
import { TerminalConnection, probeFailure, terminalUrl } from "../../terminal/connection";
import { openTerminal } from "../../terminal/xterm";
import type { Page, PageContext } from "../context";
import { duration, timeEl } from "../format";
import { poll } from "../live";
import { currentPath } from "../router";
import { empty, errorLine, loading, redrawIfChanged, section, table } from "../widgets";
import { RecordingPlayer } from "./console-player";

declare global {
  interface Window {
    /** The selected console tab's terminal, for tests and debugging. */
    croniumConsoleTerminal?: Terminal;
  }
}

type TabState = "connecting" | "connected" | "detached" | "exited" | "failed";

class TerminalTab {
  readonly agent: Agent;
  sessionId: string | null;
  readonly button: HTMLElement;
  readonly panel: HTMLElement;
  readonly terminal: Terminal;
  private readonly fit: FitAddon;
  private connection: TerminalConnection | null = null;
  private readonly status = el("span", { class: "tab-status", "aria-live": "polite" });
  private readonly endButton = el("button", { type: "button", class: "danger", "data-action": "end-session" }, "End session");
  private readonly reconnectButton = el("button", { type: "button", "data-action": "reattach", hidden: true }, "Re-attach");
  private exitCode: number | null | undefined;
  private closing = false;

  constructor(
    agent: Agent,
    sessionId: string | null,
    private readonly owner: TerminalTabs,
  ) {
    this.agent = agent;
    this.sessionId = sessionId;
    const label = el("span", { class: "tab-label" }, agent.name);
    const close = el("span", { class: "tab-close", role: "button", tabindex: "-1", "aria-label": `Close the tab of ${agent.name} (the session stays alive)`, title: "Close the tab (detach)" }, "×");
    this.button = el("button", { type: "button", role: "tab", class: "terminal-tab", "aria-selected": "false" }, label, close);
    this.button.addEventListener("click", (event) => {
      if (event.target === close) {
        this.owner.remove(this);
      } else {
        this.owner.select(this);
      }
    });
    this.button.addEventListener("keydown", (event) => {
      if (event.key === "Delete") {
        this.owner.remove(this);
      }
    });
    const screen = el("div", { class: "terminal console-terminal" });
    this.endButton.addEventListener("click", () => {
      if (this.connection?.isOpen === true) {
        this.closing = true;
        this.endButton.disabled = true;
        this.connection.closeSession();
      }
    });
    this.reconnectButton.addEventListener("click", () => {
      this.terminal.reset();
      this.connect();
    });
    this.panel = el(
      "div",
      { role: "tabpanel", class: "terminal-panel", hidden: true, "data-agent": agent.name },
      el("div", { class: "toolbar terminal-bar" }, el("strong", {}, agent.name), this.status, el("span", { class: "spacer" }), this.reconnectButton, this.endButton),
      screen,
    );
    owner.panels.append(this.panel);
    ({ terminal: this.terminal, fit: this.fit } = openTerminal(screen));
    this.terminal.onData((data) => this.connection?.sendText(data));
    this.terminal.onBinary((data) => this.connection?.sendBytes(Uint8Array.from(data, (char) => char.charCodeAt(0) & 0xff)));
    this.terminal.onResize(({ cols, rows }) => this.connection?.resize(cols, rows));
  }

  private setState(state: TabState, message: string): void {
    this.panel.dataset.state = state;
    this.button.dataset.state = state;
    this.status.textContent = message;
    this.status.className = `tab-status state-${state}`;
    this.endButton.disabled = state !== "connected";
    this.reconnectButton.hidden = state === "connected" || state === "connecting";
    this.reconnectButton.textContent = this.sessionId === null ? "New session" : "Re-attach";
  }

  connect(): void {
    this.exitCode = undefined;
    this.closing = false;
    this.setState("connecting", "connecting…");
    const url = terminalUrl(this.agent.id, this.terminal.cols, this.terminal.rows, this.sessionId);
    const connection = new TerminalConnection(url, {
      open: () => {
        this.setState("connected", "connected");
        if (this.owner.selected === this) {
          this.terminal.focus();
        }
      },
      output: (bytes) => this.terminal.write(bytes),
      session: (id) => {
        this.sessionId = id;
        this.panel.dataset.sessionId = id;
        this.button.title = `${this.agent.name} · session ${id}`;
        connection.resize(this.terminal.cols, this.terminal.rows);
        this.owner.changed();
      },
      exit: (code) => {
        this.exitCode = code;
      },
      detached: (reason) => this.setState("detached", `detached: ${reason.replaceAll("_", " ")}`),
      error: (message) => this.setState("failed", message),
      closed: (details) => {
        if (this.connection !== connection) {
          return;
        }
        this.connection = null;
        if (this.exitCode !== undefined || this.closing) {
          const how = typeof this.exitCode === "number" ? `ended with exit code ${this.exitCode}` : "was closed";
          this.terminal.write(`\r\n\x1b[2m[the session ${how}]\x1b[0m\r\n`);
          this.sessionId = null;
          delete this.panel.dataset.sessionId;
          this.setState("exited", `the session ${how}`);
          this.owner.changed();
        } else if (!details.opened) {
          this.setState("failed", "could not open the terminal…");
          void probeFailure(url).then((reason) => {
            this.setState("failed", `could not open the terminal${reason === null ? "" : `: ${reason}`}`);
          });
        } else if (this.panel.dataset.state !== "detached" && this.panel.dataset.state !== "failed") {
          this.setState("detached", `the connection closed (${details.reason === "" ? `code ${details.code}` : details.reason})`);
        }
      },
    });
    this.connection = connection;
  }

  show(selected: boolean): void {
    this.button.setAttribute("aria-selected", String(selected));
    this.button.tabIndex = selected ? 0 : -1;
    this.panel.hidden = !selected;
    if (selected) {
      requestAnimationFrame(() => {
        this.fit.fit();
        this.terminal.focus();
      });
    }
  }

  /** Detaches (the session lives on) and frees the terminal. */
  dispose(): void {
    const connection = this.connection;
    this.connection = null;
    connection?.disconnect();
    this.terminal.dispose();
    this.panel.remove();
    this.button.remove();
  }
}

class TerminalTabs {
  readonly bar = el("div", { class: "tabs terminal-tabs", role: "tablist", "aria-label": "Terminals" });
  readonly panels = el("div", { class: "terminal-panels" });
  readonly tabs: TerminalTab[] = [];
  selected: TerminalTab | null = null;
  private readonly placeholder = el("div", {});

  constructor(
    private readonly onChange: () => void,
    canOpen: boolean,
  ) {
    replaceChildren(
      this.placeholder,
      empty(
        "No terminal is open.",
        canOpen ? "Pick an online agent above and press “Open terminal”, or re-attach to a live session below." : "Viewers cannot open terminals.",
      ),
    );
    this.panels.append(this.placeholder);
    this.bar.addEventListener("keydown", (event) => {
      const index = this.selected === null ? -1 : this.tabs.indexOf(this.selected);
      if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
        const next = this.tabs[(index + (event.key === "ArrowRight" ? 1 : this.tabs.length - 1)) % this.tabs.length];
        if (next !== undefined) {
          this.select(next);
          next.button.focus();
        }
      }
    });
  }

  open(agent: Agent, sessionId: string | null): void {
    const existing = sessionId === null ? undefined : this.tabs.find((tab) => tab.sessionId === sessionId);
    if (existing !== undefined) {
      this.select(existing);
      return;
    }
    const tab = new TerminalTab(agent, sessionId, this);
    this.tabs.push(tab);
    this.bar.append(tab.button);
    this.select(tab);
    tab.connect();
  }

  select(tab: TerminalTab): void {
    this.selected = tab;
    for (const candidate of this.tabs) {
      candidate.show(candidate === tab);
    }
    this.placeholder.hidden = true;
    window.croniumConsoleTerminal = tab.terminal;
  }

  remove(tab: TerminalTab): void {
    const index = this.tabs.indexOf(tab);
    if (index < 0) {
      return;
    }
    this.tabs.splice(index, 1);
    tab.dispose();
    const next = this.tabs[Math.min(index, this.tabs.length - 1)];
    if (next !== undefined) {
      this.select(next);
    } else {
      this.selected = null;
      this.placeholder.hidden = false;
      delete window.croniumConsoleTerminal;
    }
    this.changed();
  }

  changed(): void {
    this.onChange();
  }

  disposeAll(): void {
    for (const tab of this.tabs.splice(0)) {
      tab.dispose();
    }
    delete window.croniumConsoleTerminal;
  }
}

export const consolePage: Page = (context) => {
  context.setTitle("Console");
  const agentSelect = el("select", { id: "console-agent", "aria-label": "Agent" });
  const openButton = el("button", { type: "button", class: "primary", id: "console-open" }, "Open terminal");
  const status = el("div", {});
  const sessionsRegion = el("div", {}, loading());
  const recordingsRegion = el("div", {}, loading());
  const playerRegion = el("div", { id: "player-region" });
  let agents: Agent[] = [];
  let poller: { refresh(): void } | null = null;
  const tabs = new TerminalTabs(() => poller?.refresh(), context.canWrite);
  context.signal.addEventListener("abort", () => tabs.disposeAll());

  openButton.addEventListener("click", () => {
    const agent = agents.find((candidate) => candidate.id === agentSelect.value);
    if (agent !== undefined) {
      tabs.open(agent, null);
    }
  });
  if (context.canWrite) {
    context.root.append(el("div", { class: "toolbar" }, el("label", { for: "console-agent" }, "Agent "), agentSelect, openButton));
  } else {
    context.root.append(el("p", { class: "muted" }, "Viewers cannot open terminals; you can see your sessions and play their recordings."));
  }
  context.root.append(
    status,
    el("div", { class: "card terminal-card" }, tabs.bar, tabs.panels),
    section("live-sessions", "Live sessions", sessionsRegion),
    section("recordings", "Recordings", recordingsRegion, playerRegion),
  );

  const attach = (session: TerminalSession): void => {
    const agent = agents.find((candidate) => candidate.id === session.agent_id);
    if (agent === undefined) {
      window.alert(`The agent of session ${session.id} is not known any more.`);
      return;
    }
    tabs.open(agent, session.id);
  };

  let first = true;
  poller = poll(
    context.signal,
    5000,
    async () => {
      const [listed, sessions] = await Promise.all([listAgents(), listTerminalSessions()]);
      agents = listed;
      status.replaceChildren();
      drawAgentChoice(agentSelect, openButton, agents);
      drawSessions(sessionsRegion, sessions, tabs, context, attach);
      drawRecordings(recordingsRegion, sessions, (session) => {
        void playRecording(playerRegion, session, context);
      });
      if (first) {
        first = false;
        const { query } = currentPath();
        const agent = agents.find((candidate) => candidate.id === query.get("agent"));
        if (agent !== undefined && context.canWrite) {
          tabs.open(agent, query.get("session"));
        }
      }
    },
    (error) => status.replaceChildren(errorLine(error)),
  );
};

function drawAgentChoice(select: HTMLSelectElement, button: HTMLButtonElement, agents: Agent[]): void {
  const online = agents.filter((agent) => agent.status === "online").sort((a, b) => a.name.localeCompare(b.name));
  const key = JSON.stringify(online.map((agent) => agent.id));
  if (select.dataset.key === key) {
    return;
  }
  select.dataset.key = key;
  const previous = select.value;
  replaceChildren(select, ...online.map((agent) => el("option", { value: agent.id, selected: agent.id === previous }, agent.name)));
  if (online.length === 0) {
    select.append(el("option", { value: "" }, "no agent is online"));
  }
  button.disabled = online.length === 0;
}

function drawSessions(region: HTMLElement, sessions: TerminalSession[], tabs: TerminalTabs, context: PageContext, attach: (session: TerminalSession) => void): void {
  const live = sessions.filter((session) => session.live);
  const openHere = new Set(tabs.tabs.map((tab) => tab.sessionId));
  redrawIfChanged(region, JSON.stringify([live, [...openHere]]) + Math.floor(Date.now() / 30_000), () => {
    if (live.length === 0) {
      return [empty("No live sessions.", "A session stays alive after its tab is closed, until its shell exits or it is idle too long.")];
    }
    return [
      table(
        ["Agent", "User", "Session", "Opened", ""],
        live.map((session) => {
          const here = openHere.has(session.id);
          const cell = el("td", { class: "actions" });
          if (here) {
            cell.append(el("span", { class: "muted" }, "open in a tab"));
          } else if (context.canWrite && session.user_id === context.user.id) {
            const button = el("button", { type: "button", "data-action": "attach" }, "Re-attach");
            button.addEventListener("click", () => attach(session));
            cell.append(button);
          }
          return el(
            "tr",
            { "data-session-id": session.id },
            el("td", {}, session.agent_name ?? session.agent_id),
            el("td", {}, session.username ?? session.user_id),
            el("td", {}, el("code", {}, session.id.slice(0, 12))),
            el("td", {}, timeEl(session.opened_at)),
            cell,
          );
        }),
        "sessions",
      ),
    ];
  });
}

function drawRecordings(region: HTMLElement, sessions: TerminalSession[], play: (session: TerminalSession) => void): void {
  const recorded = sessions.filter((session) => session.has_recording);
  redrawIfChanged(region, JSON.stringify(recorded) + Math.floor(Date.now() / 30_000), () => {
    if (recorded.length === 0) {
      return [empty("No recordings.", "Sessions are recorded on agents whose “record terminals” setting is on (an admin turns it on with PATCH /agents/{id}).")];
    }
    return [
      table(
        ["Agent", "User", "Opened", "Length", "Exit", ""],
        recorded.map((session) => {
          const button = el("button", { type: "button", "data-action": "play" }, session.live ? "Play so far" : "Play");
          button.addEventListener("click", () => play(session));
          return el(
            "tr",
            { "data-recording": session.id },
            el("td", {}, session.agent_name ?? session.agent_id),
            el("td", {}, session.username ?? session.user_id),
            el("td", {}, timeEl(session.opened_at)),
            el("td", {}, session.live ? el("span", { class: "muted" }, "live") : duration(session.opened_at, session.closed_at)),
            el("td", {}, session.exit_code === null ? "—" : String(session.exit_code)),
            el("td", { class: "actions" }, button),
          );
        }),
        "recordings",
      ),
    ];
  });
}

let activePlayer: RecordingPlayer | null = null;

async function playRecording(region: HTMLElement, session: TerminalSession, context: PageContext): Promise<void> {
  activePlayer?.dispose();
  activePlayer = null;
  replaceChildren(region, loading("Loading the recording…"));
  try {
    const response = await fetch(recordingUrl(session.id), { credentials: "same-origin", signal: context.signal });
    if (!response.ok) {
      throw await errorFrom(response);
    }
    const text = await response.text();
    replaceChildren(region);
    activePlayer = new RecordingPlayer(region, text, `${session.agent_name ?? session.agent_id} · ${session.username ?? ""}`);
    context.signal.addEventListener("abort", () => activePlayer?.dispose());
    activePlayer.play();
  } catch (error) {
    if (!context.signal.aborted) {
      replaceChildren(region, el("p", { class: "form-error", role: "alert" }, `The recording could not be loaded: ${messageOf(error)}`));
    }
  }
}
