// The event editor (#/events/new, #/events/ID): name and kind, the script in CodeMirror, targets
// (agents and servers to tick, labels with a live preview of the matching hosts), runtime (host
// or Docker with image, network, read-only root) and limits, schedule (cron + time zone with the
// server's preview of the next runs), environment variables, secret environment variables
// (write-only: only their names come back, values are never shown), timeout and retries. Save
// shows the API's field errors next to their fields; "Run now" takes optional JSON input and
// opens the run. Viewers get the same form read-only, without any button that changes things.

import {
  type Agent,
  ApiError,
  type CronEvent,
  type EventInput,
  type Rollout,
  type ScriptKind,
  type Server,
  createEvent,
  deleteEvent,
  fetchEvent,
  listAgents,
  listServers,
  messageOf,
  previewSchedule,
  triggerRun,
  updateEvent,
} from "../../api";
import { el, replaceChildren } from "../../dom";
import type { ScriptEditor } from "../code-editor";
import type { Page, PageContext } from "../context";
import { ago } from "../format";
import { targetPicker } from "../targets";
import { errorLine, loading } from "../widgets";

const TEMPLATES: Record<ScriptKind, string> = {
  bash: '#!/usr/bin/env bash\nset -euo pipefail\n\necho "Hello from $(hostname)"\n',
  python: 'import socket\n\nprint(f"Hello from {socket.gethostname()}")\n',
  nodejs: 'const os = require("node:os");\n\nconsole.log(`Hello from ${os.hostname()}`);\n',
};

/** A message shown once on the next render (e.g. "Saved" after a save re-renders the page). */
let flash: string | null = null;

interface FieldSlot {
  element: HTMLElement;
  error: HTMLElement;
}

export const eventEditorPage: Page = async (context, params) => {
  const eventId = params.id;
  context.setTitle(eventId === undefined ? "New event" : "Event");
  const wait = loading();
  context.root.append(wait);
  const [event, agents, servers] = await Promise.all([
    eventId === undefined ? Promise.resolve(null) : fetchEvent(eventId),
    listAgents(),
    listServers().catch((): Server[] => []),
  ]);
  wait.remove();
  if (context.signal.aborted) {
    return;
  }
  if (event !== null) {
    context.setTitle(event.name);
  }
  if (eventId === undefined && !context.canWrite) {
    context.root.append(errorLine(new Error("Viewers cannot create events.")));
    return;
  }
  if (event !== null && !(event.kind in TEMPLATES)) {
    drawActionEvent(context, event);
    return;
  }
  drawEditor(context, event, agents, servers);
};

/**
 * HTTP request and tool action events: shown read-only (what they do, as the API returns it),
 * since this form edits scripts; saving one here would turn it into a script. They are created
 * and changed through the API (`POST`/`PATCH /events`) or `cronium event create`.
 */
function drawActionEvent(context: PageContext, event: CronEvent): void {
  const fields = event as unknown as Record<string, unknown>;
  const what = { kind: fields.kind, executor: fields.executor, http: fields.http, tool_action: fields.tool_action };
  const shown = Object.fromEntries(Object.entries(what).filter(([, value]) => value !== undefined && value !== null));
  context.root.append(
    el(
      "section",
      { class: "panel", id: "action-event" },
      el("h2", {}, event.name),
      el(
        "p",
        { class: "hint" },
        "HTTP request and tool action events are edited through the API (PATCH /api/v1/events/ID) or the cronium CLI; this page shows them read-only.",
      ),
      el("pre", { class: "json" }, JSON.stringify(shown, null, 2)),
    ),
  );
}

function drawEditor(context: PageContext, event: CronEvent | null, agents: Agent[], servers: Server[]): void {
  const readOnly = !context.canWrite;
  const slots = new Map<string, FieldSlot>();
  let dirty = false;
  const slot = (name: string, label: string, input: HTMLElement, hint?: string, id?: string): HTMLElement => {
    const error = el("p", { class: "field-error", id: `error-${name.replace(/\./g, "-")}`, "data-field": name, role: "alert" });
    const inputId = id ?? input.id;
    if (input instanceof HTMLInputElement || input instanceof HTMLSelectElement || input instanceof HTMLTextAreaElement) {
      input.setAttribute("aria-describedby", error.id);
    }
    const element = el(
      "div",
      { class: "field", "data-field": name },
      el("label", { for: inputId }, label),
      input,
      hint !== undefined && el("p", { class: "hint" }, hint),
      error,
    );
    slots.set(name, { element, error });
    return element;
  };

  // ---- Name and kind.
  const name = el("input", { id: "event-name", type: "text", required: true, maxlength: "128", value: event?.name ?? "", autocomplete: "off" });
  const kind = el(
    "select",
    { id: "event-kind" },
    ...(["bash", "python", "nodejs"] as const).map((value) =>
      el("option", { value, selected: (event?.kind ?? "bash") === value }, value === "nodejs" ? "Node.js" : value === "python" ? "Python" : "Bash"),
    ),
  );

  // ---- Script (CodeMirror, loaded on demand).
  const scriptHost = el("div", { class: "script-editor", id: "event-script" }, loading("Loading the editor…"));
  let editor: ScriptEditor | null = null;
  let fallback: HTMLTextAreaElement | null = null;
  const initialScript = event?.script ?? TEMPLATES.bash;
  import("../code-editor").then(
    ({ createScriptEditor }) => {
      if (context.signal.aborted) {
        return;
      }
      scriptHost.replaceChildren();
      editor = createScriptEditor(scriptHost, initialScript, kind.value as ScriptKind, "Script");
      editor.setReadOnly(readOnly);
      editor.view.dom.addEventListener("input", () => {
        dirty = true;
      });
      scriptHost.dataset.ready = "true";
    },
    (error: unknown) => {
      // The editor's chunk failed to load: a plain text area still edits the script.
      fallback = el("textarea", { id: "event-script-text", rows: "14", spellcheck: "false", disabled: readOnly });
      fallback.value = initialScript;
      replaceChildren(scriptHost, errorLine(error), fallback);
      scriptHost.dataset.ready = "true";
    },
  );
  const scriptValue = (): string => editor?.value() ?? fallback?.value ?? initialScript;
  kind.addEventListener("change", () => {
    const next = kind.value as ScriptKind;
    editor?.setKind(next);
    // A new event still showing another kind's template gets this kind's.
    const current = scriptValue();
    if (event === null && Object.values(TEMPLATES).includes(current) && editor !== null) {
      editor.view.dispatch({ changes: { from: 0, to: editor.view.state.doc.length, insert: TEMPLATES[next] } });
    }
  });

  // ---- Targets.
  const targets = targetPicker({ idPrefix: "target-", agents, servers, initial: event?.targets });
  const { agentList, serverList, labels, preview, mode } = targets;

  // ---- Runtime and limits.
  const runtimeHost = el("input", { type: "radio", name: "runtime", id: "runtime-host", value: "host", checked: (event?.runtime ?? "host") === "host" });
  const runtimeDocker = el("input", { type: "radio", name: "runtime", id: "runtime-docker", value: "docker", checked: event?.runtime === "docker" });
  const image = el("input", { id: "event-image", type: "text", placeholder: "the control plane's default for the kind", value: event?.image ?? "" });
  const network = el(
    "select",
    { id: "event-network" },
    el("option", { value: "none", selected: (event?.network ?? "none") === "none" }, "none (no network)"),
    el("option", { value: "bridge", selected: event?.network === "bridge" }, "bridge"),
  );
  const readOnlyRoot = el("input", { type: "checkbox", id: "event-read-only", checked: event?.read_only === true });
  const numberValue = (value: number | null | undefined): string => (value === null || value === undefined ? "" : String(value));
  const memory = el("input", { id: "limit-memory", type: "number", min: "4", placeholder: "no limit", value: numberValue(event?.limits?.memory_mb) });
  const cpus = el("input", { id: "limit-cpus", type: "number", min: "0.01", max: "64", step: "0.01", placeholder: "no limit", value: numberValue(event?.limits?.cpus) });
  const pids = el("input", { id: "limit-pids", type: "number", min: "1", placeholder: "default", value: numberValue(event?.limits?.pids) });
  const runAs = el("input", { id: "event-user", type: "text", placeholder: "the agent's user", value: event?.user ?? "" });
  const dockerFields = el(
    "div",
    { class: "row", id: "docker-fields" },
    slot("image", "Image", image),
    slot("network", "Network", network),
    el("label", { class: "check" }, readOnlyRoot, " Read-only root file system"),
  );
  const showRuntime = (): void => {
    dockerFields.hidden = !runtimeDocker.checked;
  };
  runtimeHost.addEventListener("change", showRuntime);
  runtimeDocker.addEventListener("change", showRuntime);
  showRuntime();

  // ---- Schedule.
  const scheduled = el("input", { type: "checkbox", id: "schedule-enabled", checked: event?.schedule !== null && event?.schedule !== undefined });
  const cron = el("input", { id: "schedule-cron", type: "text", placeholder: "*/5 * * * *", value: event?.schedule?.cron ?? "", autocomplete: "off", spellcheck: "false" });
  const localZone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const timezone = el("input", { id: "schedule-timezone", type: "text", list: "timezones", value: event?.schedule?.timezone ?? (localZone || "UTC"), autocomplete: "off" });
  const zones = el("datalist", { id: "timezones" }, ...supportedZones().map((zone) => el("option", { value: zone })));
  const schedulePreview = el("div", { class: "schedule-preview", id: "schedule-preview", "aria-live": "polite" });
  const scheduleFields = el(
    "div",
    {},
    el("div", { class: "row" }, slot("schedule.cron", "Cron expression", cron, "minute hour day month weekday (a 6th field first means seconds)"), slot("schedule.timezone", "Time zone", timezone), zones),
    schedulePreview,
  );
  let previewTimer: number | undefined;
  let previewSeq = 0;
  const refreshSchedule = (): void => {
    scheduleFields.hidden = !scheduled.checked;
    window.clearTimeout(previewTimer);
    if (!scheduled.checked) {
      return;
    }
    // What the preview shows is for the previous expression until the new answer arrives.
    schedulePreview.classList.add("stale");
    if (cron.value.trim() === "") {
      replaceChildren(schedulePreview, el("span", { class: "muted" }, "Type a cron expression to see the next runs."));
      return;
    }
    previewTimer = window.setTimeout(() => {
      const seq = ++previewSeq;
      previewSchedule({ cron: cron.value.trim(), timezone: timezone.value.trim() || "UTC", count: 5 }).then(
        (answer) => {
          if (seq !== previewSeq) {
            return;
          }
          setFieldError("schedule.cron", null);
          schedulePreview.classList.remove("stale");
          replaceChildren(
            schedulePreview,
            el("p", { class: "muted" }, "Next runs:"),
            el(
              "ol",
              {},
              ...answer.fire_times.map((fire) =>
                el("li", {}, el("time", { datetime: fire.utc }, formatZoned(fire.local, timezone.value.trim() || "UTC")), el("span", { class: "muted" }, ` (${ago(fire.utc)})`)),
              ),
            ),
          );
        },
        (error: unknown) => {
          if (seq !== previewSeq) {
            return;
          }
          replaceChildren(schedulePreview);
          schedulePreview.classList.remove("stale");
          if (error instanceof ApiError && error.field !== null) {
            setFieldError(error.field, error.message);
          } else {
            replaceChildren(schedulePreview, errorLine(error));
          }
        },
      );
    }, 300);
  };
  scheduled.addEventListener("change", refreshSchedule);
  cron.addEventListener("input", refreshSchedule);
  timezone.addEventListener("input", refreshSchedule);

  // ---- Environment variables and secrets.
  const envRows = el("div", { class: "kv-rows", id: "env-rows" });
  const addEnvRow = (key = "", value = ""): void => {
    const keyInput = el("input", { type: "text", class: "env-key", placeholder: "NAME", value: key, "aria-label": "Variable name", spellcheck: "false", disabled: readOnly });
    const valueInput = el("input", { type: "text", class: "env-value", placeholder: "value", value, "aria-label": "Variable value", spellcheck: "false", disabled: readOnly });
    const row = el("div", { class: "kv-row" }, keyInput, valueInput);
    if (!readOnly) {
      const remove = el("button", { type: "button", "aria-label": `Remove ${key || "this variable"}` }, "Remove");
      remove.addEventListener("click", () => row.remove());
      row.append(remove);
    }
    envRows.append(row);
  };
  Object.entries(event?.env ?? {}).forEach(([key, value]) => addEnvRow(key, value));
  const addEnv = el("button", { type: "button", id: "add-env" }, "Add variable");
  addEnv.addEventListener("click", () => {
    addEnvRow();
    envRows.querySelector<HTMLInputElement>(".kv-row:last-child .env-key")?.focus();
  });

  const secretChanges = new Map<string, string | null>();
  const secretRows = el("div", { class: "kv-rows", id: "secret-rows" });
  for (const secretName of event?.secret_env_names ?? []) {
    const state = el("span", { class: "muted secret-state" }, "set (value hidden)");
    const row = el("div", { class: "kv-row", "data-secret": secretName }, el("code", {}, secretName), state);
    if (!readOnly) {
      const replace = el("button", { type: "button" }, "Replace");
      const remove = el("button", { type: "button" }, "Remove");
      replace.addEventListener("click", () => {
        const input = el("input", { type: "password", autocomplete: "new-password", "aria-label": `New value of ${secretName}` });
        input.addEventListener("input", () => secretChanges.set(secretName, input.value));
        state.replaceWith(input);
        replace.remove();
        input.focus();
      });
      remove.addEventListener("click", () => {
        const removed = secretChanges.get(secretName) === null;
        if (removed) {
          secretChanges.delete(secretName);
        } else {
          secretChanges.set(secretName, null);
        }
        row.classList.toggle("removed", !removed);
        remove.textContent = removed ? "Remove" : "Keep";
      });
      row.append(replace, remove);
    }
    secretRows.append(row);
  }
  const newSecrets = el("div", { class: "kv-rows" });
  const addSecret = el("button", { type: "button", id: "add-secret" }, "Add secret");
  addSecret.addEventListener("click", () => {
    const key = el("input", { type: "text", class: "secret-key", placeholder: "NAME", "aria-label": "Secret name", spellcheck: "false" });
    const value = el("input", { type: "password", class: "secret-value", autocomplete: "new-password", "aria-label": "Secret value" });
    const remove = el("button", { type: "button" }, "Remove");
    const row = el("div", { class: "kv-row" }, key, value, remove);
    remove.addEventListener("click", () => row.remove());
    newSecrets.append(row);
    key.focus();
  });

  // ---- Timeout and retries.
  const timeout = el("input", { id: "event-timeout", type: "number", min: "0", max: "604800", value: String(event?.timeout_seconds ?? 3600) });
  const retries = el("input", { id: "event-retries", type: "number", min: "0", max: "100", value: String(event?.retries ?? 0) });
  // ---- Dispatch: retry backoff, concurrency limit, fan-out rollout (other rollout fields set
  // through the API are kept as they are).
  const backoff = el("input", { id: "event-backoff", type: "number", min: "0", max: "86400", step: "any", value: String(event?.retry?.backoff_seconds ?? 5) });
  const concurrency = el("input", { id: "event-max-concurrency", type: "number", min: "1", placeholder: "unlimited", value: event?.max_concurrency == null ? "" : String(event.max_concurrency) });
  const batchSize = el("input", { id: "event-batch-size", type: "number", min: "1", placeholder: "all at once", value: event?.rollout?.batch_size === undefined ? "" : String(event.rollout.batch_size) });
  const maxFailures = el("input", { id: "event-max-failures", type: "number", min: "1", placeholder: "never stop", value: event?.rollout?.max_failures === undefined ? "" : String(event.rollout.max_failures) });
  const offline = el("select", { id: "event-offline" }, el("option", { value: "wait" }, "wait for it"), el("option", { value: "skip" }, "skip it"));
  offline.value = event?.rollout?.offline ?? "wait";

  // ---- Buttons and messages.
  const formError = el("div", { id: "form-error", role: "alert" });
  const saved = el("p", { class: "ok", id: "saved", role: "status" }, flash ?? "");
  flash = null;
  const buttons = el("div", { class: "toolbar sticky-actions" });
  const save = el("button", { type: "submit", class: "primary", id: "save-event" }, event === null ? "Create event" : "Save");
  if (!readOnly) {
    buttons.append(save);
    if (event !== null) {
      const runNow = el("button", { type: "button", id: "run-now" }, "Run now…");
      runNow.addEventListener("click", () => {
        if (dirty && !window.confirm("The event has unsaved changes; Run now runs the saved version. Continue?")) {
          return;
        }
        openRunDialog(context, event);
      });
      const remove = el("button", { type: "button", class: "danger", id: "delete-event" }, "Delete");
      remove.addEventListener("click", () => {
        if (!window.confirm(`Delete ${event.name} with all its runs?`)) {
          return;
        }
        deleteEvent(event.id).then(
          () => context.navigate("#/events"),
          (error: unknown) => formError.replaceChildren(errorLine(error)),
        );
      });
      buttons.append(runNow, el("a", { href: `#/runs?q=${encodeURIComponent(event.name)}`, class: "button" }, "Runs"), el("span", { class: "spacer" }), remove);
    }
  } else {
    buttons.append(el("p", { class: "muted", id: "read-only" }, "Read-only: viewers cannot change or run events."));
    if (event !== null) {
      buttons.append(el("a", { href: `#/runs?q=${encodeURIComponent(event.name)}`, class: "button" }, "Runs"));
    }
  }

  const fieldset = el(
    "fieldset",
    { disabled: readOnly, class: "plain" },
    el(
      "section",
      { class: "card" },
      el("div", { class: "row" }, slot("name", "Name", name), slot("kind", "Kind", kind)),
      slot("script", "Script", scriptHost, "Tab indents; press Escape then Tab to leave the editor.", "script-editor"),
    ),
    el(
      "section",
      { class: "card", "aria-labelledby": "targets-title" },
      el("h2", { id: "targets-title" }, "Targets"),
      slot("targets.pool", "How a run uses them", mode, "pool labels: key=value pairs, comma separated; matched when the run starts", "target-pool"),
      slot("targets.agents", "Agents", agentList, undefined, "target-agents"),
      serverList !== null && slot("targets.servers", "Servers", serverList, undefined, "target-servers"),
      slot("targets.labels", "Every agent with these labels", labels, "key=value pairs, comma separated; matched when the run starts"),
      preview,
      el("p", { class: "field-error", "data-field": "targets", id: "error-targets", role: "alert" }),
    ),
    el(
      "section",
      { class: "card", "aria-labelledby": "runtime-title" },
      el("h2", { id: "runtime-title" }, "Runtime"),
      el(
        "div",
        { class: "field", role: "radiogroup", "aria-label": "Runtime", "data-field": "runtime" },
        el("label", { class: "check" }, runtimeHost, " On the host"),
        el("label", { class: "check" }, runtimeDocker, " In a Docker container"),
        el("p", { class: "field-error", id: "error-runtime", role: "alert" }),
      ),
      dockerFields,
      el("div", { class: "row" }, slot("limits.memory_mb", "Memory (MiB)", memory), slot("limits.cpus", "CPUs", cpus), slot("limits.pids", "Processes", pids), slot("user", "Run as", runAs)),
      el("div", { class: "row" }, slot("timeout_seconds", "Timeout (seconds, 0 = none)", timeout), slot("retries", "Retries", retries), slot("retry.backoff_seconds", "First retry after (seconds)", backoff)),
      el(
        "div",
        { class: "row" },
        slot("max_concurrency", "Max. running at once", concurrency),
        slot("rollout.batch_size", "Hosts per batch", batchSize),
        slot("rollout.max_failures", "Stop after failed hosts", maxFailures),
        slot("rollout.offline", "Offline host", offline),
      ),
    ),
    el(
      "section",
      { class: "card", "aria-labelledby": "schedule-title" },
      el("h2", { id: "schedule-title" }, "Schedule"),
      el("label", { class: "check" }, scheduled, " Run on a schedule"),
      scheduleFields,
      event?.next_run_at !== null && event?.next_run_at !== undefined && el("p", { class: "muted" }, `Next run ${ago(event.next_run_at)}.`),
    ),
    el(
      "section",
      { class: "card", "aria-labelledby": "env-title" },
      el("h2", { id: "env-title" }, "Environment"),
      slot("env", "Variables", envRows, undefined, "env-rows"),
      !readOnly && addEnv,
      slot("secret_env", "Secrets", el("div", { id: "secret-env" }, secretRows, newSecrets), "Write-only: stored sealed, given to the script as environment variables, never shown again.", "secret-env"),
      !readOnly && addSecret,
    ),
  );
  buttons.append(formError);
  const form = el("form", { class: "event-form", id: "event-form", novalidate: true }, saved, fieldset, buttons);
  form.addEventListener("input", () => {
    dirty = true;
  });
  context.root.append(form);
  refreshSchedule();

  function setFieldError(field: string, message: string | null): boolean {
    // The most specific slot: "schedule.cron", else "schedule", else nothing.
    let key = field;
    let target: HTMLElement | null = null;
    for (;;) {
      target = slots.get(key)?.error ?? form.querySelector<HTMLElement>(`.field-error[data-field="${CSS.escape(key)}"], #error-${CSS.escape(key.replace(/\./g, "-"))}`);
      if (target !== null || !key.includes(".")) {
        break;
      }
      key = key.slice(0, key.lastIndexOf("."));
    }
    if (target === null) {
      return false;
    }
    target.textContent = message ?? "";
    target.closest(".field")?.classList.toggle("invalid", message !== null);
    return true;
  }

  const clearErrors = (): void => {
    for (const error of form.querySelectorAll<HTMLElement>(".field-error")) {
      error.textContent = "";
    }
    for (const field of form.querySelectorAll(".field.invalid")) {
      field.classList.remove("invalid");
    }
    formError.replaceChildren();
    saved.textContent = "";
  };

  const build = (): EventInput => {
    const env: Record<string, string> = {};
    for (const row of envRows.querySelectorAll(".kv-row")) {
      const key = row.querySelector<HTMLInputElement>(".env-key")?.value.trim() ?? "";
      const value = row.querySelector<HTMLInputElement>(".env-value")?.value ?? "";
      if (key !== "") {
        env[key] = value;
      }
    }
    const secretEnv: Record<string, string | null> = Object.fromEntries(secretChanges);
    for (const row of newSecrets.querySelectorAll(".kv-row")) {
      const key = row.querySelector<HTMLInputElement>(".secret-key")?.value.trim() ?? "";
      const value = row.querySelector<HTMLInputElement>(".secret-value")?.value ?? "";
      if (key !== "") {
        secretEnv[key] = value;
      }
    }
    const number = (input: HTMLInputElement): number | null => (input.value.trim() === "" ? null : Number(input.value));
    let chosenTargets: ReturnType<typeof targets.value>;
    try {
      chosenTargets = targets.value();
    } catch (error) {
      throw new ApiError(422, "invalid", messageOf(error), "targets.labels");
    }
    const docker = runtimeDocker.checked;
    const body: EventInput = {
      name: name.value.trim(),
      kind: kind.value as ScriptKind,
      script: scriptValue(),
      runtime: docker ? "docker" : "host",
      targets: chosenTargets,
      limits: { memory_mb: number(memory), cpus: number(cpus), pids: number(pids) },
      user: runAs.value.trim(),
      timeout_seconds: Number(timeout.value || "0"),
      retries: Number(retries.value || "0"),
      retry: { backoff_seconds: Number(backoff.value || "0") },
      max_concurrency: number(concurrency),
      rollout: rolloutOf(event?.rollout, number(batchSize), number(maxFailures), offline.value === "skip" ? "skip" : "wait"),
      env,
      schedule: scheduled.checked ? { cron: cron.value.trim(), timezone: timezone.value.trim() || "UTC" } : null,
      ...(docker ? { image: image.value.trim(), network: network.value === "bridge" ? "bridge" : "none", read_only: readOnlyRoot.checked } : {}),
    };
    if (Object.keys(secretEnv).length > 0) {
      body.secret_env = secretEnv;
    }
    return body;
  };

  form.addEventListener("submit", (submitEvent) => {
    submitEvent.preventDefault();
    if (readOnly) {
      return;
    }
    clearErrors();
    let body: EventInput;
    try {
      body = build();
    } catch (error) {
      showSaveError(error);
      return;
    }
    save.disabled = true;
    save.textContent = "Saving…";
    const request = event === null ? createEvent(body) : updateEvent(event.id, body);
    request.then(
      (stored) => {
        dirty = false;
        flash = event === null ? "Created." : "Saved.";
        context.navigate(`#/events/${encodeURIComponent(stored.id)}`);
      },
      (error: unknown) => {
        save.disabled = false;
        save.textContent = event === null ? "Create event" : "Save";
        showSaveError(error);
      },
    );
  });

  function showSaveError(error: unknown): void {
    if (error instanceof ApiError && error.field !== null && setFieldError(error.field, error.message)) {
      formError.replaceChildren(el("p", { class: "form-error" }, `Not saved: ${error.field}: ${error.message}`));
      const field = form.querySelector<HTMLElement>(".field.invalid input, .field.invalid select, .field.invalid textarea, .field.invalid .cm-content");
      field?.focus();
      return;
    }
    formError.replaceChildren(errorLine(error));
  }
}

function supportedZones(): string[] {
  const intl = Intl as unknown as { supportedValuesOf?: (key: string) => string[] };
  try {
    return ["UTC", ...(intl.supportedValuesOf?.("timeZone") ?? [])];
  } catch {
    return ["UTC"];
  }
}

/** A fire time in its zone's wall clock, e.g. "Mon, 3 Mar 2026, 14:05 (Europe/Paris)". */
function formatZoned(iso: string, zone: string): string {
  try {
    return `${new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short", timeZone: zone }).format(new Date(iso))} (${zone})`;
  } catch {
    return iso;
  }
}

/** "Run now" with optional JSON input; opens the run it created. */
function openRunDialog(context: PageContext, event: CronEvent): void {
  const input = el("textarea", { id: "run-input", rows: "6", spellcheck: "false", placeholder: '{"key": "value"}  (optional)' });
  const error = el("p", { class: "form-error", role: "alert" });
  const run = el("button", { type: "submit", class: "primary", id: "run-confirm" }, "Run");
  const cancel = el("button", { type: "button" }, "Cancel");
  const form = el(
    "form",
    { method: "dialog" },
    el("label", { for: "run-input" }, "Input (JSON, optional): the script reads it with the input helper"),
    input,
    error,
    el("div", { class: "toolbar" }, run, cancel),
  );
  const box = el("dialog", { class: "dialog", "aria-labelledby": "run-title" }, el("header", {}, el("h2", { id: "run-title" }, `Run ${event.name} now`)), form);
  cancel.addEventListener("click", () => box.close());
  box.addEventListener("close", () => box.remove());
  form.addEventListener("submit", (submitEvent) => {
    submitEvent.preventDefault();
    let value: unknown;
    if (input.value.trim() !== "") {
      try {
        value = JSON.parse(input.value);
      } catch (parseError) {
        error.textContent = `The input is not JSON: ${messageOf(parseError)}`;
        input.focus();
        return;
      }
    }
    run.disabled = true;
    run.textContent = "Starting…";
    triggerRun(event.id, value).then(
      (created) => {
        box.close();
        context.navigate(`#/runs/${encodeURIComponent(created.run_id)}`);
      },
      (failure: unknown) => {
        run.disabled = false;
        run.textContent = "Run";
        error.textContent = failure instanceof ApiError && failure.field !== null ? `${failure.field}: ${failure.message}` : messageOf(failure);
      },
    );
  });
  document.body.append(box);
  box.showModal();
  input.focus();
}

/** The stored rollout with the editor's fields replaced (a batch size replaces a percentage). */
function rolloutOf(stored: Rollout | undefined, batchSize: number | null, maxFailures: number | null, offline: "wait" | "skip"): Rollout {
  const rollout: Rollout = { ...(stored ?? {}) };
  if (batchSize === null) {
    delete rollout.batch_size;
  } else {
    rollout.batch_size = batchSize;
    delete rollout.batch_percent;
  }
  if (maxFailures === null) {
    delete rollout.max_failures;
  } else {
    rollout.max_failures = maxFailures;
  }
  rollout.offline = offline;
  if (offline === "skip") {
    delete rollout.deadline_seconds;
  }
  return rollout;
}
