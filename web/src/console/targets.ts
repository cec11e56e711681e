// The targets picker the event editor and the workflow builder's node inspector share: agents
// and servers to tick, labels ("role=web, env=prod") and a live preview of the hosts a run
// would reach now; or, chosen instead, a pool ("run on one matching agent": one job per run
// that any agent carrying the pool's labels may run). Targets it is given that are not (or no
// longer) known here are kept as ticked boxes, not dropped. Element ids start with the caller's
// prefix.

import type { Agent, Server, Targets } from "../api";
import { el, replaceChildren } from "../dom";
import { formatLabels, parseLabels, statusBadge } from "./format";

export interface TargetPicker {
  /** The agents' checklist (`<prefix>agents`). */
  agentList: HTMLElement;
  /** The servers' checklist (`<prefix>servers`); null when the caller has no servers. */
  serverList: HTMLElement | null;
  /** The labels field (`<prefix>labels`). */
  labels: HTMLInputElement;
  /** The hosts targeted now (`<prefix>preview`). */
  preview: HTMLElement;
  /** Every chosen host, or one matching agent: the radios (`<prefix>mode-fanout`,
   * `<prefix>mode-pool`) and the pool's labels field (`<prefix>pool`). */
  mode: HTMLElement;
  /** The chosen targets; throws when the labels cannot be parsed. */
  value(): Required<Targets>;
}

export interface TargetPickerOptions {
  idPrefix: string;
  agents: Agent[];
  servers: Server[];
  initial: Targets | undefined;
  disabled?: boolean;
  /** Called after every change the user makes. */
  onChange?: () => void;
}

export function targetPicker(options: TargetPickerOptions): TargetPicker {
  const { idPrefix, agents, servers, initial } = options;
  const disabled = options.disabled ?? false;
  const wantedAgents = new Set(initial?.agents ?? []);
  const agentBoxes = agents
    .slice()
    .sort((a, b) => a.name.localeCompare(b.name))
    .map((agent) => {
      const box = el("input", { type: "checkbox", value: agent.name, "data-agent-id": agent.id, checked: wantedAgents.has(agent.id) || wantedAgents.has(agent.name), disabled });
      return { agent, box };
    });
  const unknownAgentBoxes = [...wantedAgents]
    .filter((wanted) => !agents.some((agent) => agent.id === wanted || agent.name === wanted))
    .map((name) => ({ name, box: el("input", { type: "checkbox", value: name, checked: true, disabled }) }));
  const wantedServers = new Set(initial?.servers ?? []);
  const serverBoxes = servers
    .slice()
    .sort((a, b) => a.name.localeCompare(b.name))
    .map((server) => ({ server, box: el("input", { type: "checkbox", value: server.name, checked: wantedServers.has(server.id) || wantedServers.has(server.name), disabled }) }));
  const unknownServerBoxes = [...wantedServers]
    .filter((wanted) => !servers.some((server) => server.id === wanted || server.name === wanted))
    .map((name) => ({ name, box: el("input", { type: "checkbox", value: name, checked: true, disabled }) }));
  const labels = el("input", {
    id: `${idPrefix}labels`,
    type: "text",
    placeholder: "role=web, env=prod",
    value: formatLabels(initial?.labels ?? {}),
    autocomplete: "off",
    disabled,
  });
  const preview = el("div", { class: "target-preview", id: `${idPrefix}preview`, "aria-live": "polite" });
  const poolWanted = initial?.pool !== undefined && initial.pool !== null;
  const fanOut = el("input", { type: "radio", name: `${idPrefix}mode`, id: `${idPrefix}mode-fanout`, value: "fanout", checked: !poolWanted, disabled });
  const poolMode = el("input", { type: "radio", name: `${idPrefix}mode`, id: `${idPrefix}mode-pool`, value: "pool", checked: poolWanted, disabled });
  const pool = el("input", {
    id: `${idPrefix}pool`,
    type: "text",
    placeholder: "role=worker",
    value: formatLabels(initial?.pool ?? {}),
    autocomplete: "off",
    "aria-label": "Pool labels",
    disabled,
  });
  const mode = el(
    "div",
    { class: "target-mode", role: "radiogroup", "aria-label": "How a run uses its targets" },
    el("label", { class: "check" }, fanOut, " Every chosen host (one job each)"),
    el("label", { class: "check" }, poolMode, " Run on one matching agent (pool)"),
    el("div", { class: "muted small" }, "Pool: one job per run, run by whichever agent with all these labels takes it first; it moves to another if its agent dies."),
    pool,
  );
  const syncMode = (): void => {
    const pooled = poolMode.checked;
    pool.disabled = disabled || !pooled;
    labels.disabled = disabled || pooled;
    for (const { box } of [...agentBoxes, ...serverBoxes, ...unknownAgentBoxes, ...unknownServerBoxes]) {
      box.disabled = disabled || pooled;
    }
  };
  const agentList = el(
    "div",
    { class: "checklist", id: `${idPrefix}agents`, role: "group", "aria-label": "Agents" },
    ...(agentBoxes.length + unknownAgentBoxes.length === 0
      ? [el("p", { class: "muted" }, "No agents yet. ", el("a", { href: "#/servers" }, "Add a server"), " to get one.")]
      : [
          ...agentBoxes.map(({ agent, box }) =>
            el("label", { class: "check" }, box, ` ${agent.name} `, statusBadge(agent.status), el("span", { class: "muted" }, ` ${formatLabels(agent.labels)}`)),
          ),
          ...unknownAgentBoxes.map(({ name, box }) => el("label", { class: "check" }, box, ` ${name} `, el("span", { class: "warn" }, "not an enrolled agent"))),
        ]),
  );
  const serverList =
    serverBoxes.length + unknownServerBoxes.length === 0
      ? null
      : el(
          "div",
          { class: "checklist", id: `${idPrefix}servers`, role: "group", "aria-label": "Servers" },
          ...serverBoxes.map(({ server, box }) => el("label", { class: "check" }, box, ` ${server.name} `, el("span", { class: "muted" }, `${server.connection} ${server.address}`))),
          ...unknownServerBoxes.map(({ name, box }) => el("label", { class: "check" }, box, ` ${name} `, el("span", { class: "warn" }, "not one of your servers"))),
        );

  const updatePool = (): void => {
    let wanted: Record<string, string> = {};
    try {
      wanted = parseLabels(pool.value);
    } catch (error) {
      replaceChildren(preview, el("span", { class: "form-error" }, error instanceof Error ? error.message : String(error)));
      return;
    }
    const entries = Object.entries(wanted);
    const matching = entries.length === 0 ? [] : agents.filter((agent) => entries.every(([key, value]) => agent.labels[key] === value));
    const online = matching.filter((agent) => agent.status !== "offline").length;
    replaceChildren(
      preview,
      entries.length === 0
        ? el("span", { class: "muted" }, "Give the pool at least one label.")
        : matching.length === 0
          ? el("span", { class: "warn" }, "No agent matches the pool's labels now: a run would be refused.")
          : el(
              "span",
              {},
              `Runs once per run on one of ${matching.length} agent${matching.length === 1 ? "" : "s"}: ${matching
                .map((agent) => agent.name)
                .sort()
                .join(", ")}`,
              online === 0 ? el("span", { class: "warn" }, " (all offline: the job waits)") : "",
            ),
    );
  };
  const updatePreview = (): void => {
    if (poolMode.checked) {
      updatePool();
      return;
    }
    let wantedLabels: Record<string, string> = {};
    try {
      wantedLabels = parseLabels(labels.value);
    } catch (error) {
      replaceChildren(preview, el("span", { class: "form-error" }, error instanceof Error ? error.message : String(error)));
      return;
    }
    const names = new Set<string>();
    for (const { agent, box } of agentBoxes) {
      if (box.checked) {
        names.add(agent.name);
      }
    }
    const labelEntries = Object.entries(wantedLabels);
    const byLabel = labelEntries.length === 0 ? [] : agents.filter((agent) => labelEntries.every(([key, value]) => agent.labels[key] === value));
    byLabel.forEach((agent) => names.add(agent.name));
    serverBoxes.forEach(({ server, box }) => box.checked && names.add(server.name));
    unknownAgentBoxes.forEach(({ name, box }) => box.checked && names.add(name));
    unknownServerBoxes.forEach(({ name, box }) => box.checked && names.add(name));
    const offline = agents.filter((agent) => names.has(agent.name) && agent.status === "offline").length;
    replaceChildren(
      preview,
      names.size === 0
        ? el("span", { class: "muted" }, "No host is targeted: a run needs at least one.")
        : el(
            "span",
            {},
            `Runs on ${names.size} host${names.size === 1 ? "" : "s"}: ${[...names].sort().join(", ")}`,
            offline > 0 ? el("span", { class: "warn" }, ` (${offline} offline: their jobs wait)`) : "",
          ),
      labelEntries.length > 0 && el("span", { class: "muted" }, ` — labels match ${byLabel.length} agent${byLabel.length === 1 ? "" : "s"} now.`),
    );
  };
  const changed = (): void => {
    updatePreview();
    options.onChange?.();
  };
  for (const { box } of [...agentBoxes, ...serverBoxes, ...unknownAgentBoxes, ...unknownServerBoxes]) {
    box.addEventListener("change", changed);
  }
  labels.addEventListener("input", changed);
  pool.addEventListener("input", changed);
  for (const radio of [fanOut, poolMode]) {
    radio.addEventListener("change", () => {
      syncMode();
      changed();
    });
  }
  syncMode();
  updatePreview();

  return {
    agentList,
    serverList,
    labels,
    preview,
    mode,
    value: () =>
      poolMode.checked
        ? { agents: [], labels: {}, servers: [], pool: parseLabels(pool.value) }
        : {
            agents: [
              ...agentBoxes.filter(({ box }) => box.checked).map(({ agent }) => agent.name),
              ...unknownAgentBoxes.filter(({ box }) => box.checked).map(({ name }) => name),
            ],
            labels: parseLabels(labels.value),
            servers: [
              ...serverBoxes.filter(({ box }) => box.checked).map(({ server }) => server.name),
              ...unknownServerBoxes.filter(({ box }) => box.checked).map(({ name }) => name),
            ],
            pool: null,
          },
  };
}
