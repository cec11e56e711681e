// Servers and agents: live status (fetched again on agent and server change notices, every 5 s
// while the notice stream is down), labels, version, last seen, "Open
// terminal" for online agents; "Add server" with the one-line install command (an enrollment
// token) or SSH credentials (the server is created, then `install-agent` streams its progress
// here). SSH secrets are write-only: the form is cleared once sent and nothing shows them again.

import {
  type Agent,
  type InstallOptions,
  type InstallProgress,
  type Server,
  type ServerInput,
  ApiError,
  createEnrollmentToken,
  createServer,
  deleteServer,
  installAgent,
  listAgents,
  listServers,
  messageOf,
} from "../../api";
import { el, replaceChildren } from "../../dom";
import type { Page, PageContext } from "../context";
import { labelList, parseLabels, statusBadge, timeEl } from "../format";
import { poll } from "../live";
import { copyButton, empty, errorLine, loading, redrawIfChanged, section, table } from "../widgets";

export const serversPage: Page = (context) => {
  context.setTitle("Servers");
  const agentsRegion = el("div", {}, loading());
  const serversRegion = el("div", {}, loading());
  const status = el("div", {});
  const actions = el("div", { class: "toolbar" });
  let poller: { refresh(): void } | null = null;
  if (context.canWrite) {
    const add = el("button", { type: "button", class: "primary", id: "add-server" }, "Add server");
    add.addEventListener("click", () => openAddServer(context, () => poller?.refresh()));
    actions.append(add);
  }
  context.root.append(
    actions,
    status,
    section("agents", "Agents", agentsRegion),
    section("servers", "Servers", serversRegion),
  );
  poller = poll(
    context.signal,
    5000,
    async () => {
      const [agents, servers] = await Promise.all([listAgents(), listServers()]);
      status.replaceChildren();
      drawAgents(agentsRegion, agents, context);
      drawServers(serversRegion, servers, agents, context, () => poller?.refresh());
    },
    (error) => status.replaceChildren(errorLine(error)),
    ["agent", "server"],
  );
};

function drawAgents(region: HTMLElement, agents: Agent[], context: PageContext): void {
  const sorted = [...agents].sort(
    (a, b) => Number(b.status === "online") - Number(a.status === "online") || a.name.localeCompare(b.name),
  );
  redrawIfChanged(region, JSON.stringify(sorted) + Math.floor(Date.now() / 30_000), () => {
    if (sorted.length === 0) {
      return [
        empty(
          "No agents are enrolled yet. An agent is the small program that runs your scripts on a host.",
          context.canWrite ? "Press “Add server” to get a one-line install command, or install over SSH." : "An admin can add servers.",
        ),
      ];
    }
    return [
      table(
        ["Name", "Status", "Labels", "Version", "Host", "Last seen", ""],
        sorted.map((agent) =>
          el(
            "tr",
            { "data-agent-id": agent.id },
            el("td", {}, agent.name),
            el("td", {}, statusBadge(agent.status)),
            el("td", {}, labelList(agent.labels)),
            el("td", { class: "muted" }, agent.version ?? "—"),
            el("td", { class: "muted" }, agent.hostname ?? "—"),
            el("td", {}, agent.status === "online" ? el("span", { class: "muted" }, "now") : timeEl(agent.last_seen_at, "never")),
            el(
              "td",
              {},
              terminalLink(agent, context),
            ),
          ),
        ),
        "agents",
      ),
    ];
  });
}

/** "Open terminal" for an online agent. Viewers cannot open terminals (the API refuses them);
 * users need a grant, which the terminal page says when it is missing. */
function terminalLink(agent: Agent, context: PageContext): Node | string {
  if (!context.canWrite) {
    return "";
  }
  if (agent.status !== "online") {
    return el("span", { class: "muted" }, "offline");
  }
  return el("a", { href: `terminal?agent=${encodeURIComponent(agent.id)}`, class: "button", target: "_blank", rel: "noopener" }, "Open terminal");
}

function drawServers(region: HTMLElement, servers: Server[], agents: Agent[], context: PageContext, refresh: () => void): void {
  const byId = new Map(agents.map((agent) => [agent.id, agent]));
  redrawIfChanged(region, JSON.stringify([servers, agents.map((agent) => [agent.id, agent.status])]), () => {
    if (servers.length === 0) {
      return [
        empty(
          "No servers yet. A server is a host you run events on: through its agent, or over SSH until it has one.",
          context.canWrite && "“Add server” → “Over SSH” installs the agent for you.",
        ),
      ];
    }
    return [
      table(
        ["Name", "Address", "Connection", "Labels", "Agent", ""],
        servers.map((server) => {
          const agent = server.agent_id === null ? undefined : byId.get(server.agent_id);
          const buttons = el("td", { class: "actions" });
          if (context.isAdmin && server.connection === "ssh") {
            const install = el("button", { type: "button" }, "Install agent");
            install.addEventListener("click", () => openInstall(server, refresh));
            buttons.append(install);
          }
          if (context.canWrite) {
            const remove = el("button", { type: "button", class: "danger" }, "Delete");
            remove.addEventListener("click", () => {
              if (!window.confirm(`Delete the server ${server.name}? Its past jobs stay.`)) {
                return;
              }
              remove.disabled = true;
              deleteServer(server.id).then(refresh, (error: unknown) => {
                remove.disabled = false;
                window.alert(messageOf(error));
              });
            });
            buttons.append(remove);
          }
          return el(
            "tr",
            { "data-server-id": server.id },
            el("td", {}, server.name),
            el("td", { class: "muted" }, server.address),
            el(
              "td",
              {},
              server.connection,
              server.ssh === null ? "" : el("span", { class: "muted" }, ` ${server.ssh.username}@${server.ssh.host}:${server.ssh.port}`),
            ),
            el("td", {}, labelList(server.labels)),
            el("td", {}, agent === undefined ? el("span", { class: "muted" }, "—") : el("span", {}, `${agent.name} `, statusBadge(agent.status))),
            buttons,
          );
        }),
      ),
    ];
  });
}

/** A modal <dialog> (Escape closes it; focus stays inside) removed when closed. */
function dialog(title: string, ...children: Array<Node | string>): HTMLDialogElement {
  const close = el("button", { type: "button", class: "close", "aria-label": "Close" }, "×");
  const box = el("dialog", { class: "dialog", "aria-labelledby": "dialog-title" }, el("header", {}, el("h2", { id: "dialog-title" }, title), close), ...children);
  close.addEventListener("click", () => box.close());
  box.addEventListener("close", () => box.remove());
  document.body.append(box);
  box.showModal();
  return box;
}

function openAddServer(context: PageContext, refresh: () => void): void {
  const commandTab = el("button", { type: "button", role: "tab", id: "tab-command", "aria-selected": "true", "aria-controls": "panel-command" }, "Install command");
  const sshTab = el("button", { type: "button", role: "tab", id: "tab-ssh", "aria-selected": "false", "aria-controls": "panel-ssh" }, "Over SSH");
  const commandPanel = installCommandPanel(context);
  const sshPanel = sshPanelFor(context, refresh);
  sshPanel.hidden = true;
  const select = (ssh: boolean): void => {
    commandTab.setAttribute("aria-selected", String(!ssh));
    sshTab.setAttribute("aria-selected", String(ssh));
    commandPanel.hidden = ssh;
    sshPanel.hidden = !ssh;
  };
  commandTab.addEventListener("click", () => select(false));
  sshTab.addEventListener("click", () => select(true));
  const box = dialog("Add server", el("div", { class: "tabs", role: "tablist" }, commandTab, sshTab), commandPanel, sshPanel);
  box.addEventListener("close", refresh);
}

function field(id: string, label: string, input: HTMLElement, hint?: string): HTMLElement {
  return el("div", { class: "field" }, el("label", { for: id }, label), input, hint !== undefined && el("p", { class: "hint" }, hint));
}

function installCommandPanel(context: PageContext): HTMLElement {
  const labels = el("input", { id: "enroll-labels", type: "text", placeholder: "env=prod, role=web" });
  const uses = el("input", { id: "enroll-uses", type: "number", min: "1", max: "10000", value: "1" });
  const create = el("button", { type: "submit", class: "primary" }, "Create install command");
  const result = el("div", { class: "install-command", "aria-live": "polite" });
  const form = el(
    "form",
    { id: "panel-command", role: "tabpanel", "aria-labelledby": "tab-command" },
    el("p", {}, "Run this command as root on the new host: it downloads and verifies the agent, enrolls it and starts it. The host only connects out."),
    field("enroll-labels", "Labels (optional)", labels, "key=value pairs the agent gets, for targeting events"),
    field("enroll-uses", "Hosts this command may enroll", uses),
    create,
    result,
  );
  if (!context.isAdmin) {
    create.disabled = true;
    form.append(el("p", { class: "muted" }, "Only admins can create install commands."));
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let parsed: Record<string, string>;
    try {
      parsed = parseLabels(labels.value);
    } catch (error) {
      replaceChildren(result, errorLine(error));
      return;
    }
    create.disabled = true;
    replaceChildren(result, loading("Creating a token…"));
    createEnrollmentToken({ labels: parsed, uses: Number(uses.value) || 1 }).then(
      (token) => {
        create.disabled = false;
        const command = el("pre", { class: "command", id: "install-command" }, el("code", {}, token.install_command));
        replaceChildren(
          result,
          command,
          el("div", { class: "toolbar" }, copyButton(() => token.install_command, "Copy command")),
          el("p", { class: "hint" }, token.expires_at === null ? "The token does not expire." : `The token expires at ${new Date(token.expires_at).toLocaleString()}. It is shown only now.`),
        );
      },
      (error: unknown) => {
        create.disabled = false;
        replaceChildren(result, errorLine(error));
      },
    );
  });
  return form;
}

function sshPanelFor(context: PageContext, refresh: () => void): HTMLElement {
  const name = el("input", { id: "ssh-name", type: "text", required: true, pattern: "[A-Za-z0-9._\\-]{1,64}", autocomplete: "off" });
  const host = el("input", { id: "ssh-host", type: "text", required: true, autocomplete: "off" });
  const port = el("input", { id: "ssh-port", type: "number", min: "1", max: "65535", value: "22" });
  const username = el("input", { id: "ssh-username", type: "text", required: true, value: "root", autocomplete: "off" });
  const auth = el("select", { id: "ssh-auth" }, el("option", { value: "key" }, "Private key"), el("option", { value: "password" }, "Password"));
  const privateKey = el("textarea", { id: "ssh-private-key", rows: "5", spellcheck: "false", autocomplete: "off", placeholder: "-----BEGIN OPENSSH PRIVATE KEY-----" });
  const passphrase = el("input", { id: "ssh-passphrase", type: "password", autocomplete: "new-password" });
  const password = el("input", { id: "ssh-password", type: "password", autocomplete: "new-password" });
  const labels = el("input", { id: "ssh-labels", type: "text", placeholder: "env=prod" });
  const install = el("input", { id: "ssh-install", type: "checkbox", checked: context.isAdmin, disabled: !context.isAdmin });
  const options = installOptionsFields();
  const keyFields = el("div", {}, field("ssh-private-key", "Private key", privateKey, "Sent once, stored sealed, never shown again."), field("ssh-passphrase", "Key passphrase (if any)", passphrase));
  const passwordFields = el("div", { hidden: true }, field("ssh-password", "Password", password, "Sent once, stored sealed, never shown again."));
  install.addEventListener("change", () => {
    options.element.hidden = !install.checked;
  });
  auth.addEventListener("change", () => {
    keyFields.hidden = auth.value !== "key";
    passwordFields.hidden = auth.value !== "password";
  });
  const submit = el("button", { type: "submit", class: "primary", id: "ssh-submit" }, "Add server");
  const error = el("div", { role: "alert" });
  const progress = el("div", { class: "install-progress", id: "install-progress" });
  const form = el(
    "form",
    { id: "panel-ssh", role: "tabpanel", "aria-labelledby": "tab-ssh", autocomplete: "off" },
    el("div", { class: "row" }, field("ssh-name", "Name", name), field("ssh-host", "Host", host), field("ssh-port", "Port", port)),
    el("div", { class: "row" }, field("ssh-username", "User", username), field("ssh-auth", "Authentication", auth)),
    keyFields,
    passwordFields,
    field("ssh-labels", "Labels (optional)", labels),
    el("label", { class: "check" }, install, context.isAdmin ? " Install the agent now (the server then runs jobs through it)" : " Installing the agent needs an admin"),
    context.isAdmin && options.element,
    el("div", { class: "toolbar" }, submit),
    error,
    progress,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.replaceChildren();
    let body: ServerInput;
    try {
      body = {
        name: name.value.trim(),
        labels: parseLabels(labels.value),
        connection: "ssh",
        ssh: {
          host: host.value.trim(),
          port: Number(port.value) || 22,
          username: username.value.trim(),
          auth: auth.value === "password" ? "password" : "key",
          ...(auth.value === "password" ? { password: password.value } : { private_key: privateKey.value, ...(passphrase.value === "" ? {} : { passphrase: passphrase.value }) }),
        },
      };
    } catch (failure) {
      error.replaceChildren(errorLine(failure));
      return;
    }
    submit.disabled = true;
    createServer(body).then(
      (server) => {
        // Write-only: the secrets leave the page with the request.
        privateKey.value = "";
        passphrase.value = "";
        password.value = "";
        refresh();
        if (install.checked) {
          runInstall(server, options.value(), progress, refresh);
        } else {
          progress.replaceChildren(el("p", {}, `Added ${server.name}. Install its agent later with “Install agent”.`));
        }
      },
      (failure: unknown) => {
        submit.disabled = false;
        const message = failure instanceof ApiError && failure.field !== null ? `${failure.field}: ${failure.message}` : messageOf(failure);
        error.replaceChildren(el("p", { class: "form-error" }, message));
      },
    );
  });
  return form;
}

/** How the installer sets the agent up: as a systemd service or a detached process, and where. */
function installOptionsFields(): { element: HTMLElement; value: () => InstallOptions } {
  const service = el(
    "select",
    { id: "install-service" },
    el("option", { value: "systemd" }, "systemd service (needs root or passwordless sudo)"),
    el("option", { value: "detached" }, "detached process (hosts without systemd)"),
  );
  const prefix = el("input", { id: "install-prefix", type: "text", placeholder: "/usr/local", autocomplete: "off", spellcheck: "false" });
  const element = el(
    "div",
    { class: "row" },
    field("install-service", "Run the agent as", service),
    field("install-prefix", "Install under (optional)", prefix, "an absolute path; the binary goes to PREFIX/bin"),
  );
  return {
    element,
    value: () => ({
      service: service.value === "detached" ? "detached" : "systemd",
      ...(prefix.value.trim() === "" ? {} : { prefix: prefix.value.trim() }),
    }),
  };
}

function openInstall(server: Server, refresh: () => void): void {
  const options = installOptionsFields();
  const start = el("button", { type: "submit", class: "primary", id: "install-start" }, "Install");
  const progress = el("div", { class: "install-progress", id: "install-progress" });
  const form = el(
    "form",
    {},
    el("p", {}, `Installs the signed agent on ${server.name} over SSH with its stored credentials, enrolls it and switches the server to it. Safe to run again.`),
    options.element,
    el("div", { class: "toolbar" }, start),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    start.disabled = true;
    runInstall(server, options.value(), progress, refresh);
  });
  const box = dialog(`Install the agent on ${server.name}`, form, progress);
  box.addEventListener("close", refresh);
}

/** Runs `install-agent` and shows each progress line as it arrives. */
function runInstall(server: Server, options: InstallOptions, region: HTMLElement, refresh: () => void): void {
  const steps = el("ol", { class: "steps", "aria-live": "polite" });
  const output = el("pre", { class: "install-output", "aria-label": "Installer output" });
  const result = el("div", { role: "status" }, loading("Installing…"));
  replaceChildren(region, el("h3", {}, `Installing the agent on ${server.name}`), steps, output, result);
  region.dataset.state = "running";
  const onLine = (line: InstallProgress): void => {
    if (line.type === "step") {
      for (const item of steps.querySelectorAll("li.current")) {
        item.className = "done";
      }
      const item = el("li", { class: "current", "data-step": line.step ?? "" }, el("strong", {}, line.step ?? ""), ` ${line.message ?? ""}`);
      steps.append(item);
      item.scrollIntoView({ block: "nearest" });
    } else if (line.type === "output") {
      output.append(el("span", { class: line.stream === "stderr" ? "stderr" : "" }, `${line.line ?? ""}\n`));
      output.scrollTop = output.scrollHeight;
    }
  };
  installAgent(server.id, options, onLine).then(
    (last) => {
      for (const item of steps.querySelectorAll("li.current")) {
        item.className = last.type === "done" ? "done" : "failed";
      }
      region.dataset.state = last.type;
      replaceChildren(
        result,
        last.type === "done"
          ? el("p", { class: "ok" }, `The agent ${last.agent_name ?? ""} is online; the server now runs jobs through it.`)
          : el("p", { class: "form-error" }, `The install failed: ${last.message ?? "no reason given"}`),
      );
      refresh();
    },
    (error: unknown) => {
      region.dataset.state = "failed";
      replaceChildren(result, errorLine(error));
    },
  );
}
