// Settings → Tools: the credentials notifications go out with (Slack, Discord, a webhook, SMTP
// email). Credentials are write-only: the form sends them and clears them, the list shows only
// where a tool sends (the API's `target_host`), and editing a tool leaves its credentials as
// they are unless new ones are typed. "Test" queues a notification and follows its delivery.

import { messageOf, request } from "../../api";
import { el, replaceChildren } from "../../dom";
import { type Tool, type ToolConfig, type ToolKind, createTool, deleteTool, listTools, testTool, updateTool } from "../../settings-api";
import type { PageContext } from "../context";
import { statusBadge, timeEl } from "../format";
import { empty, redrawIfChanged, section, table } from "../widgets";
import { actionButton, clearFieldErrors, field, polledList, showFormError } from "./settings";

const KINDS: Array<{ value: ToolKind; label: string }> = [
  { value: "slack", label: "Slack (incoming webhook)" },
  { value: "discord", label: "Discord (webhook)" },
  { value: "webhook", label: "Webhook (JSON POST)" },
  { value: "email", label: "Email (SMTP)" },
];

export function toolsTab(context: PageContext, region: HTMLElement): void {
  const editor = el("div", {});
  const { status, list: listRegion, refresh } = polledList(context.signal, 10_000, listTools, (list, tools, again) =>
    drawTools(list, tools, context, editor, again),
  );
  region.append(
    el("p", { class: "muted" }, "Tools are where notifications go: scripts call notify with a tool's name, and events notify on failure. Their credentials are stored sealed and never shown again."),
    section("tools", "Tools", status, listRegion),
    editor,
  );
  if (context.canWrite) {
    showEditor(editor, null, refresh);
  }
}

function drawTools(region: HTMLElement, tools: Tool[], context: PageContext, editor: HTMLElement, refresh: () => void): void {
  redrawIfChanged(region, JSON.stringify(tools), () => {
    if (tools.length === 0) {
      return [empty("No tools yet.", context.canWrite && "Add a Slack, Discord, webhook or email tool below.")];
    }
    return [
      table(
        ["Name", "Kind", "Sends to", "Updated", ""],
        tools.map((tool) => {
          const result = el("div", { class: "tool-test", "aria-live": "polite" });
          const actions = el("td", { class: "actions" });
          if (context.canWrite) {
            const test = el("button", { type: "button", "data-action": "test" }, "Test");
            test.addEventListener("click", () => runTest(tool, test, result, context.signal));
            const edit = el("button", { type: "button", "data-action": "edit" }, "Edit");
            edit.addEventListener("click", () => showEditor(editor, tool, refresh));
            actions.append(
              test,
              edit,
              actionButton("Delete", "danger", `Delete the tool ${tool.name}? Scripts and events that name it fail to notify.`, async () => {
                await deleteTool(tool.id);
                refresh();
              }),
            );
          }
          actions.append(result);
          return el(
            "tr",
            { "data-tool": tool.name },
            el("td", {}, tool.name),
            el("td", {}, tool.kind),
            el("td", { class: "muted" }, tool.target_host ?? "—"),
            el("td", {}, timeEl(tool.updated_at)),
            actions,
          );
        }),
        "tools",
      ),
    ];
  });
}

interface Notification {
  id: string;
  status: "pending" | "sent" | "failed";
  attempts: number;
  last_error: string | null;
}

/** Queues a test notification and follows it until it is sent or failed (or 60 s passed). */
function runTest(tool: Tool, button: HTMLButtonElement, result: HTMLElement, signal: AbortSignal): void {
  button.disabled = true;
  replaceChildren(result, el("span", { class: "muted" }, "Queuing a test…"));
  const deadline = Date.now() + 60_000;
  testTool(tool.id).then(
    async (queued) => {
      for (;;) {
        if (signal.aborted) {
          return;
        }
        const outbox = await request<Notification[]>("GET", "/notifications?limit=100");
        const found = outbox.find((notification) => notification.id === queued.id);
        const state = found?.status ?? "pending";
        replaceChildren(
          result,
          statusBadge(state),
          found?.last_error === null || found?.last_error === undefined ? "" : el("span", { class: "form-error" }, ` ${found.last_error}`),
        );
        result.dataset.status = state;
        if (state !== "pending" || Date.now() > deadline) {
          button.disabled = false;
          return;
        }
        await new Promise((resolve) => window.setTimeout(resolve, 1000));
      }
    },
  ).catch((error: unknown) => {
    button.disabled = false;
    replaceChildren(result, el("span", { class: "form-error" }, messageOf(error)));
  });
}

function input(id: string, type: string, extra: Record<string, string | boolean> = {}): HTMLInputElement {
  return el("input", { id, type, autocomplete: type === "password" ? "new-password" : "off", spellcheck: "false", ...extra });
}

/** The add form (`tool` null) or the edit form of one tool, drawn into `region`. */
function showEditor(region: HTMLElement, tool: Tool | null, refresh: () => void): void {
  const editing = tool !== null;
  const name = input("tool-name", "text", { required: true, pattern: "[A-Za-z0-9._\\-]{1,64}", value: tool?.name ?? "" });
  const kind = el("select", { id: "tool-kind", disabled: editing }, ...KINDS.map((option) => el("option", { value: option.value, selected: option.value === tool?.kind }, option.label)));
  // Webhook-like tools.
  const url = input("tool-url", "password", { placeholder: "https://hooks.example.com/…" });
  const secret = input("tool-secret", "password");
  const secretField = field("tool-secret", "Signing secret (optional)", secret, "Signs each request body (HMAC-SHA256) so the receiver can check it.", "config.secret");
  const urlFields = el("div", {}, field("tool-url", "Webhook URL", url, "A credential: stored sealed, never shown again.", "config.url"), secretField);
  // Email.
  const host = input("tool-smtp-host", "text", { placeholder: "smtp.example.com" });
  const port = input("tool-smtp-port", "number", { min: "1", max: "65535", placeholder: "587" });
  const security = el("select", { id: "tool-smtp-security" }, el("option", { value: "starttls" }, "STARTTLS"), el("option", { value: "tls" }, "TLS"), el("option", { value: "none" }, "none (plain text)"));
  const username = input("tool-smtp-username", "text");
  const password = input("tool-smtp-password", "password");
  const from = input("tool-smtp-from", "text", { placeholder: "cronium@example.com" });
  const to = input("tool-smtp-to", "text", { placeholder: "ops@example.com, oncall@example.com" });
  const emailFields = el(
    "div",
    {},
    el("div", { class: "row" }, field("tool-smtp-host", "SMTP host", host, undefined, "config.host"), field("tool-smtp-port", "Port", port, "587 for STARTTLS, 465 for TLS", "config.port"), field("tool-smtp-security", "Security", security, undefined, "config.security")),
    el("div", { class: "row" }, field("tool-smtp-username", "Username (optional)", username, undefined, "config.username"), field("tool-smtp-password", "Password (optional)", password, "Stored sealed, never shown again.", "config.password")),
    el("div", { class: "row" }, field("tool-smtp-from", "From", from, undefined, "config.from"), field("tool-smtp-to", "To", to, "One or more addresses, comma-separated", "config.to")),
  );
  const showKind = (): void => {
    emailFields.hidden = kind.value !== "email";
    urlFields.hidden = kind.value === "email";
    secretField.hidden = kind.value !== "webhook";
  };
  kind.addEventListener("change", showKind);
  showKind();
  const credentialInputs = [url, secret, host, port, username, password, from, to];
  const submit = el("button", { type: "submit", class: "primary", id: "save-tool" }, editing ? "Save tool" : "Add tool");
  const cancel = el("button", { type: "button" }, "Cancel");
  const result = el("div", { "aria-live": "polite" });
  const form = el(
    "form",
    { autocomplete: "off", id: "tool-form" },
    el("div", { class: "row" }, field("tool-name", "Name (scripts use it)", name, undefined, "name"), field("tool-kind", "Kind", kind, undefined, "kind")),
    editing && el("p", { class: "hint" }, "The stored credentials are not shown. Leave every field below empty to keep them; fill them in to replace them all."),
    urlFields,
    emailFields,
    el("div", { class: "toolbar" }, submit, editing && cancel),
    result,
  );
  cancel.addEventListener("click", () => showEditor(region, null, refresh));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = kind.value as ToolKind;
    const anyCredential = credentialInputs.some((candidate) => candidate.value.trim() !== "") || (editing && security.value !== "starttls");
    let config: ToolConfig | undefined;
    if (!editing || anyCredential) {
      if (chosen === "email") {
        config = {
          host: host.value.trim(),
          security: security.value as "starttls" | "tls" | "none",
          from: from.value.trim(),
          to: to.value.split(",").map((address) => address.trim()).filter((address) => address !== ""),
          ...(port.value.trim() === "" ? {} : { port: Number(port.value) }),
          ...(username.value === "" ? {} : { username: username.value }),
          ...(password.value === "" ? {} : { password: password.value }),
        };
      } else {
        config = { url: url.value.trim(), ...(chosen === "webhook" && secret.value !== "" ? { secret: secret.value } : {}) };
      }
    }
    submit.disabled = true;
    const saved = editing
      ? updateTool(tool.id, { name: name.value.trim(), ...(config === undefined ? {} : { config }) })
      : createTool({ name: name.value.trim(), kind: chosen, config: config as ToolConfig });
    saved.then(
      (stored) => {
        submit.disabled = false;
        clearFieldErrors(form);
        // Write-only: the credentials leave the page with the request.
        for (const credential of credentialInputs) {
          credential.value = "";
        }
        refresh();
        if (editing) {
          showEditor(region, null, refresh);
        } else {
          name.value = "";
        }
        region.querySelector(".tool-saved")?.remove();
        region.append(el("p", { class: "ok tool-saved" }, `${editing ? "Saved" : "Added"} the tool ${stored.name}.`));
      },
      (failure: unknown) => {
        submit.disabled = false;
        showFormError(form, result, failure);
      },
    );
  });
  replaceChildren(region, section("tool-editor", editing ? `Edit ${tool.name}` : "Add a tool", form));
  if (editing) {
    name.focus();
  }
}


