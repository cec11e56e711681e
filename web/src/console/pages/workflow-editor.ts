// The workflow builder (`#/workflows/new`, `#/workflows/ID`): an SVG canvas of nodes (one of the
// caller's events each) and edges (on success, failure, always, or a condition true/false),
// coloured by kind. Nodes are added from a picker, dragged, connected by dragging from a node's
// handle to another node or with the Connect controls (every change has a keyboard path: the
// pickers, buttons, and arrow keys on a focused node). The node inspector sets a node's join
// and its own targets (agents, servers, labels: the event editor's picker, targets.ts). Name, schedule (with the server's
// preview) and webhook trigger are saved together; the API's field errors (a cycle, say) are
// shown and the node or edge they name is marked. A saved workflow can be run with JSON input;
// its recent runs are listed. Viewers get the same view without any control that changes.

import { type Agent, ApiError, type CronEvent, type Server, listAgents, listEvents, listServers, messageOf, previewSchedule } from "../../api";
import { el, replaceChildren } from "../../dom";
import {
  type Workflow,
  type WorkflowEdge,
  type WorkflowInput,
  type WorkflowNode,
  createWorkflow,
  deleteWorkflow,
  fetchWorkflow,
  listWorkflowRuns,
  rotateWebhookSecret,
  startWorkflowRun,
  updateWorkflow,
} from "../../workflows-api";
import type { Page, PageContext } from "../context";
import { ago, statusBadge, timeEl } from "../format";
import { poll } from "../live";
import { targetPicker } from "../targets";
import { copyButton, empty, errorLine, loading, redrawIfChanged, section, table } from "../widgets";
import {
  EDGE_STYLES,
  type EdgeStyle,
  NODE_H,
  NODE_W,
  type Point,
  autoLayout,
  drawGraph,
  edgeFields,
  edgeLabel,
  edgePath,
  edgeStyle,
  legend,
  nodeIdFor,
  positionsFor,
  savePositions,
  svg,
} from "../workflow-graph";

/** The localStorage key of a workflow not saved yet. */
const NEW_KEY = "new";
/** Pixels a pointer moves before a press on a node becomes a drag. */
const DRAG_THRESHOLD = 4;
/** Pixels an arrow key moves a focused node. */
const KEY_STEP = 16;

type Selection = { kind: "node"; id: string } | { kind: "edge"; index: number } | null;

export const workflowEditorPage: Page = async (context, params) => {
  const workflowIdParam = params.id;
  context.setTitle(workflowIdParam === undefined ? "New workflow" : "Workflow");
  if (workflowIdParam === undefined && !context.canWrite) {
    context.root.append(errorLine(new Error("Viewers cannot create workflows.")));
    return;
  }
  const wait = loading();
  context.root.append(wait);
  const [workflow, events, agents, servers] = await Promise.all([
    workflowIdParam === undefined ? Promise.resolve(null) : fetchWorkflow(workflowIdParam),
    listEvents().catch(() => [] as CronEvent[]),
    // For the node inspector's targets; without them it still shows the targets by name.
    listAgents().catch(() => [] as Agent[]),
    listServers().catch(() => [] as Server[]),
  ]);
  wait.remove();
  if (context.signal.aborted) {
    return;
  }
  new Builder(context, workflow, events, { agents, servers }).mount();
};

class Builder {
  private readonly context: PageContext;
  private readonly events: CronEvent[];
  /** The hosts the node inspector's targets picker offers. */
  private readonly hosts: { agents: Agent[]; servers: Server[] };
  /** Nodes whose targets' labels do not parse: node id → message (Save refuses). */
  private readonly invalidTargets = new Map<string, string>();
  private saved: Workflow | null;
  private nodes: WorkflowNode[];
  private edges: WorkflowEdge[];
  private positions: Map<string, Point>;
  private selection: Selection = null;
  /** The node an API error named (`nodes[2]…`), by id. */
  private invalidNode: string | null = null;
  /** The edges an API error named: `edges[3]…`, or those along the cycle it names. */
  private invalidEdges = new Set<number>();
  private dirty = false;
  private readonly canvas = svg("svg", { class: "wf-canvas", id: "workflow-canvas", role: "group", "aria-label": "Workflow graph" });

  // Fields.
  private readonly name: HTMLInputElement;
  private readonly manual: HTMLInputElement;
  private readonly scheduled: HTMLInputElement;
  private readonly cron: HTMLInputElement;
  private readonly timezone: HTMLInputElement;
  private readonly webhook: HTMLInputElement;
  private readonly schedulePreview = el("div", { id: "workflow-schedule-preview", class: "schedule-preview", "aria-live": "polite" });
  private readonly webhookInfo = el("div", { id: "workflow-webhook-info" });
  private readonly secretBox = el("div", { id: "workflow-webhook-secret-box" });
  // Builder controls.
  private readonly addEvent = el("select", { id: "workflow-add-event", "aria-label": "Event of the new node" });
  private readonly connectFrom = el("select", { id: "workflow-connect-from", "aria-label": "Edge from" });
  private readonly connectTo = el("select", { id: "workflow-connect-to", "aria-label": "Edge to" });
  private readonly connectKind = el("select", { id: "workflow-connect-kind", "aria-label": "Edge kind" });
  private readonly inspector = el("div", { id: "workflow-inspector", class: "wf-inspector", "aria-live": "polite" });
  private readonly edgeList = el("div", { id: "workflow-edges" });
  private readonly dirtyNote = el("span", { id: "workflow-dirty", class: "muted small", role: "status" });
  private readonly saveError = el("div", { id: "workflow-save-error" });
  private readonly saveButton = el("button", { type: "button", class: "primary", id: "workflow-save" }, "Save");
  private readonly runButton = el("button", { type: "button", class: "primary", id: "workflow-run" }, "Run");
  private readonly runInput = el("textarea", { id: "workflow-run-input", rows: "4", spellcheck: "false", placeholder: '{"key": "value"}  (optional)' });
  private readonly runError = el("div", { id: "workflow-run-error" });
  private readonly runHint = el("p", { class: "hint", id: "workflow-run-hint" });
  private readonly runsRegion = el("div", { id: "workflow-runs" });
  private runsPolling = false;

  constructor(context: PageContext, workflow: Workflow | null, events: CronEvent[], hosts: { agents: Agent[]; servers: Server[] }) {
    this.context = context;
    this.hosts = hosts;
    this.events = [...events].sort((a, b) => a.name.localeCompare(b.name));
    this.saved = workflow;
    this.nodes = workflow?.nodes.map((node) => ({ ...node })) ?? [];
    this.edges = workflow?.edges.map((edge) => ({ ...edge })) ?? [];
    this.positions = positionsFor(workflow?.id ?? NEW_KEY, this.nodes, this.edges);
    const readOnly = !context.canWrite;
    const schedule = workflow?.trigger.schedule ?? null;
    this.name = el("input", { id: "workflow-name", type: "text", value: workflow?.name ?? "", autocomplete: "off", required: true, disabled: readOnly, pattern: "[A-Za-z0-9._-]{1,64}" });
    this.manual = el("input", { id: "workflow-manual", type: "checkbox", checked: workflow?.trigger.manual ?? true, disabled: readOnly });
    this.scheduled = el("input", { id: "workflow-scheduled", type: "checkbox", checked: schedule !== null, disabled: readOnly });
    this.cron = el("input", { id: "workflow-cron", type: "text", value: schedule?.cron ?? "0 * * * *", autocomplete: "off", spellcheck: "false", disabled: readOnly });
    this.timezone = el("input", { id: "workflow-timezone", type: "text", list: "workflow-timezones", value: schedule?.timezone ?? localZone(), autocomplete: "off", disabled: readOnly });
    this.webhook = el("input", { id: "workflow-webhook", type: "checkbox", checked: workflow?.trigger.webhook ?? false, disabled: readOnly });
  }

  private get key(): string {
    return this.saved?.id ?? NEW_KEY;
  }

  private get readOnly(): boolean {
    return !this.context.canWrite;
  }

  mount(): void {
    const { context } = this;
    context.setTitle(this.saved === null ? "New workflow" : `Workflow ${this.saved.name}`);
    const top = el("div", { class: "toolbar" }, el("a", { href: "#/workflows" }, "← All workflows"), el("span", { class: "spacer" }));
    if (!this.readOnly) {
      top.append(this.dirtyNote, this.saveButton);
      if (this.saved !== null) {
        const remove = el("button", { type: "button", class: "danger", id: "workflow-delete" }, "Delete");
        remove.addEventListener("click", () => this.remove(remove));
        top.append(remove);
      }
    }
    this.saveButton.addEventListener("click", () => void this.save());

    const details = section(
      "workflow-details",
      "Name and trigger",
      field("workflow-name", "Name", this.name, "letters, digits, '.', '_' or '-'", "name"),
      el("div", { class: "field check", "data-field": "trigger.manual" }, el("label", {}, this.manual, " Manual runs (Run button, API, CLI)")),
      el("div", { class: "field check", "data-field": "trigger.schedule" }, el("label", {}, this.scheduled, " On a schedule")),
      el(
        "div",
        { class: "row", id: "workflow-schedule-fields" },
        field("workflow-cron", "Cron expression", this.cron, "minute hour day month weekday", "trigger.schedule.cron"),
        field("workflow-timezone", "Time zone", this.timezone, undefined, "trigger.schedule.timezone"),
        el("datalist", { id: "workflow-timezones" }, ...zones().map((zone) => el("option", { value: zone }))),
      ),
      this.schedulePreview,
      el("div", { class: "field check", "data-field": "trigger.webhook" }, el("label", {}, this.webhook, " Webhook (POST with an HMAC-SHA256 signature starts a run)")),
      this.webhookInfo,
      this.secretBox,
    );

    const graph = section("workflow-graph", "Graph");
    if (!this.readOnly) {
      graph.append(this.toolbar());
    }
    graph.append(
      legend(),
      el("div", { class: "wf-scroll" }, this.canvas),
      el("div", { class: "wf-side" }, this.inspector, this.edgeList),
    );
    context.root.append(top, this.saveError, details, graph);

    if (this.saved !== null) {
      context.root.append(this.runSection(), section("workflow-recent-runs", "Recent runs", this.runsRegion));
      this.startRunsPolling();
    }

    for (const input of [this.name, this.cron, this.timezone]) {
      input.addEventListener("input", () => this.changed());
    }
    for (const box of [this.manual, this.scheduled, this.webhook]) {
      box.addEventListener("change", () => {
        this.changed();
        this.showTrigger();
      });
    }
    let previewTimer: number | undefined;
    const schedulePreview = (): void => {
      window.clearTimeout(previewTimer);
      previewTimer = window.setTimeout(() => void this.preview(), 300);
    };
    this.cron.addEventListener("input", schedulePreview);
    this.timezone.addEventListener("input", schedulePreview);
    this.scheduled.addEventListener("change", schedulePreview);
    this.wireCanvas();
    this.showTrigger();
    void this.preview();
    this.redraw();
    if (this.saved === null) {
      this.name.focus();
    }
  }

  // ---- Controls ----

  private toolbar(): HTMLElement {
    for (const event of this.events) {
      this.addEvent.append(el("option", { value: event.id }, event.name));
    }
    const addButton = el("button", { type: "button", id: "workflow-add-node" }, "Add node");
    addButton.addEventListener("click", () => this.addNode());
    if (this.events.length === 0) {
      addButton.disabled = true;
      this.addEvent.disabled = true;
    }
    for (const { style, label } of EDGE_STYLES) {
      this.connectKind.append(el("option", { value: style }, label));
    }
    const connectButton = el("button", { type: "button", id: "workflow-connect" }, "Add edge");
    connectButton.addEventListener("click", () => this.connect(this.connectFrom.value, this.connectTo.value));
    const layoutButton = el("button", { type: "button", id: "workflow-layout" }, "Auto layout");
    layoutButton.addEventListener("click", () => {
      this.positions = autoLayout(this.nodes, this.edges);
      savePositions(this.key, this.positions);
      this.redraw();
    });
    return el(
      "div",
      { class: "wf-toolbar" },
      el("div", { class: "wf-tool" }, el("label", { for: "workflow-add-event" }, "Event"), this.addEvent, addButton),
      el(
        "div",
        { class: "wf-tool" },
        el("label", { for: "workflow-connect-from" }, "Connect"),
        this.connectFrom,
        el("span", { "aria-hidden": "true" }, "→"),
        this.connectTo,
        this.connectKind,
        connectButton,
      ),
      layoutButton,
      this.events.length === 0
        ? el("p", { class: "hint" }, "You have no events yet: ", el("a", { href: "#/events/new" }, "create one"), ", then add it here as a node.")
        : el("p", { class: "hint" }, "Drag nodes to arrange them; drag from a node's round handle onto another node to connect them with the kind chosen above. Arrow keys move a focused node, Delete removes it."),
    );
  }

  private runSection(): HTMLElement {
    this.runButton.addEventListener("click", () => void this.run());
    if (this.readOnly) {
      return section("workflow-run-section", "Run", el("p", { class: "muted" }, "Viewers cannot start runs."));
    }
    return section(
      "workflow-run-section",
      "Run",
      field("workflow-run-input", "Input (JSON, optional): the entry nodes get it as their input", this.runInput),
      el("div", { class: "toolbar" }, this.runButton),
      this.runHint,
      this.runError,
    );
  }

  private showTrigger(): void {
    const scheduleFields = this.context.root.querySelector<HTMLElement>("#workflow-schedule-fields");
    if (scheduleFields !== null) {
      scheduleFields.hidden = !this.scheduled.checked;
    }
    this.schedulePreview.hidden = !this.scheduled.checked;
    const url = this.saved?.webhook_url ?? null;
    if (this.webhook.checked && url !== null && this.saved?.trigger.webhook === true) {
      const children: Array<Node | string> = [el("p", { class: "muted" }, "Webhook URL: ", el("code", { id: "workflow-webhook-url" }, url), " ", copyButton(() => url, "Copy URL"))];
      if (!this.readOnly) {
        const rotate = el("button", { type: "button", id: "workflow-rotate-secret" }, "New secret");
        rotate.addEventListener("click", () => {
          if (!window.confirm("Make a new webhook secret? The current one stops working at once.")) {
            return;
          }
          rotate.disabled = true;
          rotateWebhookSecret(this.saved?.id ?? "").then(
            (answer) => {
              rotate.disabled = false;
              this.showSecret(answer.webhook_secret);
            },
            (error: unknown) => {
              rotate.disabled = false;
              replaceChildren(this.secretBox, errorLine(error));
            },
          );
        });
        children.push(rotate);
      }
      replaceChildren(this.webhookInfo, ...children);
    } else if (this.webhook.checked) {
      replaceChildren(this.webhookInfo, el("p", { class: "hint" }, "Save to get the webhook URL and its signing secret (shown once)."));
    } else {
      replaceChildren(this.webhookInfo);
    }
  }

  /** The webhook secret, shown this once; leaving the page forgets it. */
  private showSecret(secret: string): void {
    const code = el("code", { id: "workflow-webhook-secret" }, secret);
    replaceChildren(
      this.secretBox,
      el(
        "div",
        { class: "secret-once", role: "status" },
        el("p", {}, "The webhook's signing secret, shown only now: sign each request body with HMAC-SHA256 and send ", el("code", {}, "X-Cronium-Signature: sha256=<hex>"), "."),
        el("p", {}, code, " ", copyButton(() => secret)),
      ),
    );
  }

  private async preview(): Promise<void> {
    if (!this.scheduled.checked) {
      return;
    }
    const cron = this.cron.value.trim();
    const timezone = this.timezone.value.trim() || "UTC";
    if (cron === "") {
      replaceChildren(this.schedulePreview, el("p", { class: "hint" }, "Type a cron expression to see its next runs."));
      return;
    }
    try {
      const answer = await previewSchedule({ cron, timezone, count: 5 });
      if (this.cron.value.trim() !== cron || (this.timezone.value.trim() || "UTC") !== timezone) {
        return;
      }
      replaceChildren(
        this.schedulePreview,
        el("p", { class: "muted small" }, "Next runs:"),
        el("ul", { class: "fire-times" }, ...answer.fire_times.map((fire) => el("li", {}, el("time", { datetime: fire.utc }, zoned(fire.utc, timezone)), el("span", { class: "muted" }, ` (${ago(fire.utc)})`)))),
      );
    } catch (error) {
      const message = error instanceof ApiError && error.field !== null ? `${error.field}: ${error.message}` : messageOf(error);
      replaceChildren(this.schedulePreview, el("p", { class: "form-error" }, message));
    }
  }

  // ---- Graph edits ----

  private changed(): void {
    this.dirty = true;
    this.dirtyNote.textContent = "Unsaved changes";
    this.updateRunButton();
  }

  private addNode(): void {
    const event = this.events.find((candidate) => candidate.id === this.addEvent.value);
    if (event === undefined) {
      return;
    }
    const id = nodeIdFor(event.name, new Set(this.nodes.map((node) => node.id)));
    this.nodes.push({ id, event_id: event.id, join: "all" });
    // To the right of the selected node, or below the others.
    const anchor = this.selection?.kind === "node" ? this.positions.get(this.selection.id) : undefined;
    let at: Point;
    if (anchor !== undefined) {
      at = { x: anchor.x + NODE_W + 88, y: anchor.y };
    } else {
      const bottom = Math.max(-NODE_H - 12, ...[...this.positions.values()].map((point) => point.y));
      at = { x: 24, y: bottom + NODE_H + 36 };
    }
    this.positions.set(id, at);
    savePositions(this.key, this.positions);
    this.selection = { kind: "node", id };
    this.changed();
    this.redraw(id);
  }

  private removeNode(id: string): void {
    this.nodes = this.nodes.filter((node) => node.id !== id);
    this.edges = this.edges.filter((edge) => edge.from !== id && edge.to !== id);
    this.positions.delete(id);
    savePositions(this.key, this.positions);
    this.selection = null;
    this.clearInvalid();
    this.changed();
    this.redraw();
  }

  private clearInvalid(): void {
    this.invalidNode = null;
    this.invalidEdges.clear();
  }

  /** Adds an edge of the chosen kind, or changes the kind of the edge already there. */
  private connect(from: string, to: string): void {
    if (from === "" || to === "") {
      return;
    }
    const fields = edgeFields(this.connectKind.value as EdgeStyle);
    const existing = this.edges.findIndex((edge) => edge.from === from && edge.to === to);
    const edge: WorkflowEdge = { from, to, ...fields };
    if (existing >= 0) {
      this.edges[existing] = edge;
      this.selection = { kind: "edge", index: existing };
    } else {
      this.edges.push(edge);
      this.selection = { kind: "edge", index: this.edges.length - 1 };
    }
    this.changed();
    this.redraw();
  }

  private removeEdge(index: number): void {
    this.edges.splice(index, 1);
    this.selection = null;
    this.clearInvalid();
    this.changed();
    this.redraw();
  }

  // ---- Drawing ----

  private eventName(eventId: string): string {
    return this.events.find((event) => event.id === eventId)?.name ?? eventId;
  }

  /** Redraws the canvas, the inspector and the edge list; keeps the focus on `focusNode`. */
  private redraw(focusNode?: string): void {
    const focused = focusNode ?? (document.activeElement instanceof SVGElement ? document.activeElement.closest<SVGElement>("[data-node]")?.dataset.node : undefined);
    const selected = this.selection;
    drawGraph(this.canvas, {
      nodes: this.nodes,
      edges: this.edges,
      positions: this.positions,
      handles: !this.readOnly,
      subtitle: (node) => this.eventName(node.event_id),
      nodeLabel: (node) => `Node ${node.id}: event ${this.eventName(node.event_id)}, join ${node.join ?? "all"}`,
      nodeClass: (node) =>
        [
          selected?.kind === "node" && selected.id === node.id ? "selected" : "",
          this.invalidNode === node.id ? "invalid" : "",
        ].join(" "),
      edgeClass: (_edge, index) =>
        [selected?.kind === "edge" && selected.index === index ? "selected" : "", this.invalidEdges.has(index) ? "invalid" : ""].join(" "),
    });
    if (!this.readOnly) {
      for (const group of this.canvas.querySelectorAll<SVGGElement>("g.wf-node")) {
        group.setAttribute("tabindex", "0");
        group.setAttribute("role", "button");
      }
    }
    if (this.nodes.length === 0) {
      const hint = this.readOnly ? "This workflow has no nodes." : "Pick an event above and press Add node: each node runs one event.";
      this.canvas.append(svg("text", { x: 24, y: 40, class: "wf-empty" }, hint));
    }
    this.fillNodeSelects();
    this.drawInspector();
    this.drawEdgeList();
    this.updateRunButton();
    if (focused !== undefined && focused !== null) {
      this.canvas.querySelector<SVGGElement>(`g.wf-node[data-node="${CSS.escape(focused)}"]`)?.focus();
    }
  }

  private fillNodeSelects(): void {
    for (const select of [this.connectFrom, this.connectTo]) {
      const keep = select.value;
      select.replaceChildren(...this.nodes.map((node) => el("option", { value: node.id }, node.id)));
      if (this.nodes.some((node) => node.id === keep)) {
        select.value = keep;
      }
    }
    // A sensible default pair: the last two nodes, in order.
    if (this.connectFrom.value === this.connectTo.value && this.nodes.length >= 2) {
      this.connectFrom.value = this.nodes[this.nodes.length - 2]?.id ?? "";
      this.connectTo.value = this.nodes[this.nodes.length - 1]?.id ?? "";
    }
  }

  private drawInspector(): void {
    const selection = this.selection;
    if (selection?.kind === "node") {
      const node = this.nodes.find((candidate) => candidate.id === selection.id);
      if (node !== undefined) {
        const join = el(
          "select",
          { id: "workflow-node-join", disabled: this.readOnly },
          el("option", { value: "all" }, "all: wait for every incoming edge"),
          el("option", { value: "any" }, "any: start on the first edge taken"),
        );
        join.value = node.join ?? "all";
        join.addEventListener("change", () => {
          node.join = join.value === "any" ? "any" : "all";
          this.changed();
          this.redraw();
          this.inspector.querySelector<HTMLSelectElement>("#workflow-node-join")?.focus();
        });
        const remove = el("button", { type: "button", class: "danger", id: "workflow-node-remove" }, "Remove node");
        remove.addEventListener("click", () => this.removeNode(node.id));
        replaceChildren(
          this.inspector,
          el("h3", {}, `Node ${node.id}`),
          el("p", {}, "Event: ", el("a", { href: `#/events/${encodeURIComponent(node.event_id)}` }, this.eventName(node.event_id))),
          field("workflow-node-join", "Join", join, "for a node with several incoming edges"),
          this.nodeTargets(node),
          !this.readOnly && remove,
        );
        return;
      }
    }
    if (selection?.kind === "edge") {
      const edge = this.edges[selection.index];
      if (edge !== undefined) {
        const kind = el("select", { id: "workflow-edge-kind", disabled: this.readOnly }, ...EDGE_STYLES.map(({ style, label }) => el("option", { value: style }, label)));
        kind.value = edgeStyle(edge);
        kind.addEventListener("change", () => {
          this.edges[selection.index] = { from: edge.from, to: edge.to, ...edgeFields(kind.value as EdgeStyle) };
          this.changed();
          this.redraw();
          this.inspector.querySelector<HTMLSelectElement>("#workflow-edge-kind")?.focus();
        });
        replaceChildren(
          this.inspector,
          el("h3", {}, `Edge ${edge.from} → ${edge.to}`),
          field("workflow-edge-kind", "Taken", kind),
          !this.readOnly && this.edgeRemoveButton(selection.index, "workflow-edge-remove"),
        );
        return;
      }
    }
    replaceChildren(
      this.inspector,
      el("p", { class: "muted small" }, this.readOnly ? "The graph as saved." : "Select a node to set its join or remove it; select an edge to remove it."),
    );
  }

  /** The node's targets: its event's (no `targets`), or its own, picked like the event editor's. */
  private nodeTargets(node: WorkflowNode): HTMLElement {
    const own = el("input", { type: "checkbox", id: "workflow-node-own-targets", checked: node.targets !== undefined, disabled: this.readOnly });
    const region = el("div", { id: "workflow-node-targets" });
    const error = el("p", { class: "field-error", id: "workflow-node-targets-error", role: "alert" });
    const drawPicker = (): void => {
      if (node.targets === undefined) {
        replaceChildren(region, el("p", { class: "muted small" }, "Runs where its event runs."));
        return;
      }
      const picker = targetPicker({
        idPrefix: "workflow-node-target-",
        agents: this.hosts.agents,
        servers: this.hosts.servers,
        initial: node.targets,
        disabled: this.readOnly,
        onChange: () => {
          try {
            node.targets = picker.value();
            this.invalidTargets.delete(node.id);
            error.textContent = "";
          } catch (failure) {
            this.invalidTargets.set(node.id, messageOf(failure));
            error.textContent = messageOf(failure);
          }
          this.changed();
        },
      });
      replaceChildren(
        region,
        field("workflow-node-target-pool", "How a run uses them", picker.mode, "pool labels: key=value pairs, comma separated"),
        field("workflow-node-target-agents", "Agents", picker.agentList),
        picker.serverList !== null && field("workflow-node-target-servers", "Servers", picker.serverList),
        field("workflow-node-target-labels", "Every agent with these labels", picker.labels, "key=value pairs, comma separated"),
        picker.preview,
      );
    };
    own.addEventListener("change", () => {
      if (own.checked) {
        node.targets = { agents: [], labels: {}, servers: [] };
      } else {
        delete node.targets;
        this.invalidTargets.delete(node.id);
        error.textContent = "";
      }
      this.changed();
      drawPicker();
    });
    drawPicker();
    error.textContent = this.invalidTargets.get(node.id) ?? "";
    return el(
      "fieldset",
      { class: "wf-targets" },
      el("legend", {}, "Targets"),
      el("label", { class: "check" }, own, " Own targets instead of the event's"),
      region,
      error,
    );
  }

  private edgeRemoveButton(index: number, id?: string): HTMLButtonElement {
    const edge = this.edges[index];
    const button = el("button", { type: "button", class: "danger small", id, "aria-label": `Remove edge ${edge?.from ?? ""} → ${edge?.to ?? ""}` }, "Remove edge");
    button.addEventListener("click", () => this.removeEdge(index));
    return button;
  }

  private drawEdgeList(): void {
    if (this.edges.length === 0) {
      replaceChildren(this.edgeList, el("p", { class: "muted small" }, this.nodes.length < 2 ? "Add two nodes, then connect them." : "No edges: every node starts with the run."));
      return;
    }
    const rows = this.edges.map((edge, index) =>
      el(
        "tr",
        { "data-edge": String(index), class: this.invalidEdges.has(index) ? "invalid" : undefined },
        el("td", {}, edge.from),
        el("td", {}, edge.to),
        el("td", {}, el("span", { class: `wf-kind wf-edge-${edgeStyle(edge)}` }, edgeLabel(edge))),
        !this.readOnly && el("td", {}, this.edgeRemoveButton(index)),
      ),
    );
    replaceChildren(this.edgeList, table(this.readOnly ? ["From", "To", "When"] : ["From", "To", "When", ""], rows, "wf-edge-table"));
  }

  // ---- Pointer and keyboard on the canvas ----

  private wireCanvas(): void {
    if (this.readOnly) {
      return;
    }
    const canvas = this.canvas;
    const toCanvas = (event: PointerEvent): Point => {
      const box = canvas.getBoundingClientRect();
      return { x: event.clientX - box.left, y: event.clientY - box.top };
    };
    type Gesture =
      | { kind: "node"; id: string; start: Point; origin: Point; moved: boolean }
      | { kind: "handle"; from: string; draft: SVGPathElement }
      | null;
    let gesture: Gesture = null;

    canvas.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) {
        return;
      }
      const target = event.target as Element;
      const handle = target.closest<SVGElement>("[data-handle]");
      const node = target.closest<SVGElement>("[data-node]");
      const edge = target.closest<SVGElement>("[data-edge]");
      if (handle !== null) {
        const from = handle.dataset.handle ?? "";
        const draft = svg("path", { class: "wf-draft", d: "" });
        canvas.append(draft);
        gesture = { kind: "handle", from, draft };
      } else if (node !== null) {
        const id = node.dataset.node ?? "";
        const origin = this.positions.get(id);
        if (origin === undefined) {
          return;
        }
        gesture = { kind: "node", id, start: toCanvas(event), origin: { ...origin }, moved: false };
      } else if (edge !== null) {
        this.selection = { kind: "edge", index: Number(edge.dataset.edge) };
        this.redraw();
        return;
      } else {
        this.selection = null;
        this.redraw();
        return;
      }
      canvas.setPointerCapture(event.pointerId);
      event.preventDefault();
    });
    canvas.addEventListener("pointermove", (event) => {
      if (gesture === null) {
        return;
      }
      const at = toCanvas(event);
      if (gesture.kind === "handle") {
        const from = this.positions.get(gesture.from);
        if (from !== undefined) {
          gesture.draft.setAttribute("d", edgePath(from, { x: at.x, y: at.y - NODE_H / 2 }));
        }
        return;
      }
      const dx = at.x - gesture.start.x;
      const dy = at.y - gesture.start.y;
      if (!gesture.moved && Math.hypot(dx, dy) < DRAG_THRESHOLD) {
        return;
      }
      gesture.moved = true;
      this.positions.set(gesture.id, { x: Math.max(0, Math.round(gesture.origin.x + dx)), y: Math.max(0, Math.round(gesture.origin.y + dy)) });
      this.redraw();
    });
    const finish = (event: PointerEvent): void => {
      const done = gesture;
      gesture = null;
      if (done === null) {
        return;
      }
      if (canvas.hasPointerCapture(event.pointerId)) {
        canvas.releasePointerCapture(event.pointerId);
      }
      if (done.kind === "handle") {
        done.draft.remove();
        const under = document.elementFromPoint(event.clientX, event.clientY)?.closest<SVGElement>("[data-node]");
        const to = under?.dataset.node;
        if (event.type === "pointerup" && to !== undefined && to !== done.from) {
          this.connect(done.from, to);
        }
        return;
      }
      if (done.moved) {
        savePositions(this.key, this.positions);
      } else {
        this.selection = { kind: "node", id: done.id };
      }
      this.redraw(done.id);
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
    canvas.addEventListener("keydown", (event) => {
      const node = (event.target as Element).closest<SVGElement>("[data-node]");
      const id = node?.dataset.node;
      if (id === undefined) {
        return;
      }
      const at = this.positions.get(id);
      const moves: Record<string, [number, number]> = { ArrowLeft: [-KEY_STEP, 0], ArrowRight: [KEY_STEP, 0], ArrowUp: [0, -KEY_STEP], ArrowDown: [0, KEY_STEP] };
      const move = moves[event.key];
      if (event.key === "Enter" || event.key === " ") {
        this.selection = { kind: "node", id };
        this.redraw(id);
      } else if (event.key === "Delete" || event.key === "Backspace") {
        this.removeNode(id);
      } else if (move !== undefined && at !== undefined) {
        this.positions.set(id, { x: Math.max(0, at.x + move[0]), y: Math.max(0, at.y + move[1]) });
        savePositions(this.key, this.positions);
        this.redraw(id);
      } else {
        return;
      }
      event.preventDefault();
    });
  }

  // ---- Save, delete, run ----

  private body(): WorkflowInput {
    return {
      name: this.name.value.trim(),
      nodes: this.nodes,
      edges: this.edges,
      trigger: {
        manual: this.manual.checked,
        schedule: this.scheduled.checked ? { cron: this.cron.value.trim(), timezone: this.timezone.value.trim() || "UTC" } : null,
        webhook: this.webhook.checked,
      },
    };
  }

  private async save(): Promise<void> {
    this.saveButton.disabled = true;
    this.saveError.replaceChildren();
    for (const marked of this.context.root.querySelectorAll(".field.invalid")) {
      marked.classList.remove("invalid");
    }
    this.clearInvalid();
    const wasNew = this.saved === null;
    const [badTargets] = [...this.invalidTargets].filter(([id]) => this.nodes.some((node) => node.id === id));
    if (badTargets !== undefined) {
      const [nodeId, message] = badTargets;
      this.invalidNode = nodeId;
      this.saveError.replaceChildren(errorLine(new Error(`Not saved: the targets' labels of node ${nodeId}: ${message}`)));
      this.saveButton.disabled = false;
      this.redraw();
      return;
    }
    try {
      const answer = wasNew ? await createWorkflow(this.body()) : await updateWorkflow(this.saved?.id ?? "", this.body());
      if (this.context.signal.aborted) {
        return;
      }
      this.saved = answer;
      this.dirty = false;
      this.dirtyNote.textContent = "Saved";
      if (wasNew) {
        savePositions(answer.id, this.positions);
        savePositions(NEW_KEY, new Map());
        // The address becomes the workflow's without a navigation (the secret stays shown).
        window.history.replaceState(null, "", `#/workflows/${encodeURIComponent(answer.id)}`);
        this.context.root.append(this.runSection(), section("workflow-recent-runs", "Recent runs", this.runsRegion));
        this.startRunsPolling();
        const top = this.context.root.querySelector(".toolbar");
        const remove = el("button", { type: "button", class: "danger", id: "workflow-delete" }, "Delete");
        remove.addEventListener("click", () => this.remove(remove));
        top?.append(remove);
      }
      this.context.setTitle(`Workflow ${answer.name}`);
      this.secretBox.replaceChildren();
      if (answer.webhook_secret !== undefined) {
        this.showSecret(answer.webhook_secret);
      }
      this.showTrigger();
      this.redraw();
    } catch (error) {
      this.showSaveError(error);
    } finally {
      this.saveButton.disabled = false;
    }
  }

  private showSaveError(error: unknown): void {
    let message = messageOf(error);
    if (error instanceof ApiError && error.field !== null) {
      message = `Not saved: ${error.field}: ${error.message}`;
      const field = error.field;
      const indexed = /^(nodes|edges)\[(\d+)\]/.exec(field);
      const cycle = field === "edges" ? /cycles are not allowed: (.+)$/.exec(error.message) : null;
      if (indexed !== null) {
        const index = Number(indexed[2]);
        const node = this.nodes[index];
        if (indexed[1] === "nodes") {
          this.invalidNode = node?.id ?? null;
          this.selection = node === undefined ? null : { kind: "node", id: node.id };
        } else {
          this.invalidEdges.add(index);
          this.selection = { kind: "edge", index };
        }
        this.redraw();
      } else if (cycle?.[1] !== undefined) {
        // "a → b → a": mark the edges along it.
        const along = cycle[1].split(" → ");
        for (let step = 0; step + 1 < along.length; step += 1) {
          const index = this.edges.findIndex((edge) => edge.from === along[step] && edge.to === along[step + 1]);
          if (index >= 0) {
            this.invalidEdges.add(index);
          }
        }
        this.redraw();
      } else {
        const holder = [...this.context.root.querySelectorAll<HTMLElement>("[data-field]")].find((candidate) => candidate.dataset.field === field);
        holder?.classList.add("invalid");
        holder?.querySelector<HTMLElement>("input, select")?.focus();
      }
    } else if (error instanceof ApiError && error.status === 403) {
      message = `Not allowed: ${error.message}`;
    }
    replaceChildren(this.saveError, el("p", { class: "form-error", role: "alert", id: "workflow-error" }, message));
  }

  private remove(button: HTMLButtonElement): void {
    const saved = this.saved;
    if (saved === null || !window.confirm(`Delete the workflow ${saved.name}? Its runs are deleted with it.`)) {
      return;
    }
    button.disabled = true;
    deleteWorkflow(saved.id).then(
      () => {
        savePositions(saved.id, new Map());
        this.context.navigate("#/workflows");
      },
      (error: unknown) => {
        button.disabled = false;
        replaceChildren(this.saveError, errorLine(error));
      },
    );
  }

  private updateRunButton(): void {
    const saved = this.saved;
    let hint = "";
    if (saved === null) {
      hint = "Save the workflow to run it.";
    } else if (this.dirty) {
      hint = "Save your changes first: a run uses the saved workflow.";
    } else if (!saved.trigger.manual) {
      hint = "Manual runs are off for this workflow.";
    }
    this.runButton.disabled = hint !== "";
    this.runHint.textContent = hint;
  }

  private async run(): Promise<void> {
    const saved = this.saved;
    if (saved === null) {
      return;
    }
    this.runError.replaceChildren();
    let input: unknown;
    const text = this.runInput.value.trim();
    if (text !== "") {
      try {
        input = JSON.parse(text);
      } catch (error) {
        replaceChildren(this.runError, el("p", { class: "form-error", role: "alert" }, `The input is not JSON: ${messageOf(error)}`));
        return;
      }
    }
    this.runButton.disabled = true;
    try {
      const run = await startWorkflowRun(saved.id, input);
      this.context.navigate(`#/workflows/${encodeURIComponent(saved.id)}/runs/${encodeURIComponent(run.id)}`);
    } catch (error) {
      replaceChildren(this.runError, errorLine(error));
      this.updateRunButton();
    }
  }

  private startRunsPolling(): void {
    if (this.runsPolling || this.saved === null) {
      return;
    }
    this.runsPolling = true;
    const workflowId = this.saved.id;
    this.runsRegion.replaceChildren(loading());
    poll(
      this.context.signal,
      5_000,
      async () => {
        const runs = await listWorkflowRuns(workflowId, 10);
        redrawIfChanged(this.runsRegion, JSON.stringify(runs.map((run) => [run.id, run.status, run.finished_at])) + Math.floor(Date.now() / 30_000), () => [
          runsTable(workflowId, runs.map((run) => ({ id: run.id, status: run.status, trigger: run.trigger, created_at: run.created_at, finished_at: run.finished_at }))),
        ]);
      },
      (error) => this.runsRegion.replaceChildren(errorLine(error)),
      ["workflow_run"],
    );
  }
}

/** The recent runs of a workflow, each linking to its run view. */
export function runsTable(
  workflowId: string,
  runs: Array<{ id: string; status: string; trigger: string; created_at: string; finished_at: string | null }>,
  current?: string,
): HTMLElement {
  if (runs.length === 0) {
    return empty("No runs yet. Press Run to start one and watch each node light up as it runs.");
  }
  return table(
    ["Started", "Status", "Trigger", "Finished"],
    runs.map((run) =>
      el(
        "tr",
        { "data-workflow-run": run.id, class: run.id === current ? "current" : undefined },
        el("td", {}, el("a", { href: `#/workflows/${encodeURIComponent(workflowId)}/runs/${encodeURIComponent(run.id)}` }, timeEl(run.created_at))),
        el("td", {}, statusBadge(run.status)),
        el("td", {}, run.trigger),
        el("td", {}, timeEl(run.finished_at)),
      ),
    ),
    "workflow-runs",
  );
}

function field(id: string, label: string, input: HTMLElement, hint?: string, apiField?: string): HTMLElement {
  return el("div", { class: "field", "data-field": apiField ?? id }, el("label", { for: id }, label), input, hint !== undefined && el("p", { class: "hint" }, hint));
}

function localZone(): string {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  } catch {
    return "UTC";
  }
}

function zones(): string[] {
  const intl = Intl as unknown as { supportedValuesOf?: (key: string) => string[] };
  try {
    return ["UTC", ...(intl.supportedValuesOf?.("timeZone") ?? [])];
  } catch {
    return ["UTC"];
  }
}

/** A fire time on the zone's wall clock. */
function zoned(iso: string, zone: string): string {
  try {
    return `${new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short", timeZone: zone }).format(new Date(iso))} (${zone})`;
  } catch {
    return iso;
  }
}
