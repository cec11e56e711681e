// A workflow run (`#/workflows/ID/runs/RUN`): the workflow's graph with each node coloured by
// its state (pending, running, completed, failed, skipped), fetched again on workflow run
// change notices (polled while the notice stream is down) until the run ends; a node
// links to its own run (`#/runs/ID`). Cancel while it runs; the workflow's recent runs below.
// The run records its nodes but not its edges: the edges drawn are the workflow's current ones
// between those nodes.

import { type CronEvent, listEvents } from "../../api";
import { el } from "../../dom";
import { type Workflow, type WorkflowRun, type WorkflowRunNode, cancelWorkflowRun, fetchWorkflow, fetchWorkflowRun, listWorkflowRuns } from "../../workflows-api";
import type { Page } from "../context";
import { duration, statusBadge, timeEl } from "../format";
import { poll } from "../live";
import { drawGraph, legend, positionsFor, svg } from "../workflow-graph";
import { errorLine, loading, redrawIfChanged, section, table } from "../widgets";
import { runsTable } from "./workflow-editor";

export const workflowRunPage: Page = async (context, params) => {
  const workflowId = params.id ?? "";
  const runId = params.run ?? "";
  context.setTitle("Workflow run");
  const wait = loading();
  context.root.append(wait);
  const [workflow, events] = await Promise.all([fetchWorkflow(workflowId), listEvents().catch(() => [] as CronEvent[])]);
  wait.remove();
  if (context.signal.aborted) {
    return;
  }
  context.setTitle(`Workflow ${workflow.name} · run`);
  const eventName = (id: string): string => events.find((event) => event.id === id)?.name ?? id;

  const header = el("div", { id: "workflow-run-header" });
  const cancel = el("button", { type: "button", class: "danger", id: "workflow-run-cancel", hidden: true }, "Cancel run");
  const status = el("div", {});
  const canvas = svg("svg", { class: "wf-canvas", id: "workflow-run-canvas", role: "group", "aria-label": "Workflow run graph" });
  const nodesRegion = el("div", { id: "workflow-run-nodes" });
  const runsRegion = el("div", { id: "workflow-run-history" }, loading());
  const states = el("ul", { class: "wf-legend wf-state-legend", "aria-label": "Node states" }, ...["pending", "running", "completed", "failed", "skipped"].map((state) => el("li", {}, el("span", { class: `wf-state-swatch state-${state}`, "aria-hidden": "true" }), ` ${state}`)));
  context.root.append(
    el("div", { class: "toolbar" }, el("a", { href: `#/workflows/${encodeURIComponent(workflow.id)}` }, "← Workflow"), el("span", { class: "spacer" }), context.canWrite && cancel),
    status,
    header,
    section("workflow-run-graph", "Graph", el("div", { class: "wf-legends" }, states, legend()), el("div", { class: "wf-scroll" }, canvas), el("p", { class: "hint" }, "Select a node that ran to open its run and logs.")),
    section("workflow-run-steps", "Nodes", nodesRegion),
    section("workflow-run-recent", "Recent runs of this workflow", runsRegion),
  );

  // Stops polling the run once it ended (the page's signal stops it when the page is left).
  const stop = new AbortController();
  context.signal.addEventListener("abort", () => {
    stop.abort();
    delete document.body.dataset.workflowRunStatus;
  });
  cancel.addEventListener("click", () => {
    if (!window.confirm("Cancel this workflow run? Pending nodes are skipped and running ones cancelled.")) {
      return;
    }
    cancel.disabled = true;
    cancelWorkflowRun(runId).then(
      (answer) => {
        show(answer);
        runs.refresh();
      },
      (error: unknown) => {
        cancel.disabled = false;
        status.replaceChildren(errorLine(error));
      },
    );
  });

  const show = (current: WorkflowRun): void => {
    document.body.dataset.workflowRunStatus = current.status;
    cancel.hidden = current.status !== "running";
    redrawIfChanged(header, JSON.stringify([current.status, current.finished_at]), () => [
      el(
        "p",
        { class: "run-summary" },
        statusBadge(current.status),
        ` ${current.trigger} run, started `,
        timeEl(current.created_at),
        current.finished_at !== null && ` · took ${duration(current.created_at, current.finished_at)}`,
      ),
    ]);
    // Redrawn only when a node changed, so polling keeps the keyboard focus on a node's link.
    const graphKey = JSON.stringify(current.nodes.map((node) => [node.id, node.state, node.run_id]));
    if (canvas.dataset.key !== graphKey) {
      canvas.dataset.key = graphKey;
      drawRun(canvas, workflow, current, eventName);
    }
    redrawIfChanged(nodesRegion, JSON.stringify(current.nodes), () => [nodeTable(current.nodes, eventName)]);
  };

  const runs = poll(
    context.signal,
    10_000,
    async () => {
      const list = await listWorkflowRuns(workflow.id, 10);
      redrawIfChanged(runsRegion, JSON.stringify(list.map((item) => [item.id, item.status])) + Math.floor(Date.now() / 30_000), () => [runsTable(workflow.id, list, runId)]);
    },
    (error) => runsRegion.replaceChildren(errorLine(error)),
    ["workflow_run"],
  );
  poll(
    stop.signal,
    1_500,
    async () => {
      const run = await fetchWorkflowRun(runId);
      status.replaceChildren();
      show(run);
      if (run.status !== "running") {
        stop.abort();
        runs.refresh();
      }
    },
    (error) => status.replaceChildren(errorLine(error)),
    ["workflow_run"],
  );
};

function drawRun(canvas: SVGSVGElement, workflow: Workflow, run: WorkflowRun, eventName: (id: string) => string): void {
  const byId = new Map(run.nodes.map((node) => [node.id, node]));
  const nodes = run.nodes.map((node) => ({ id: node.id, event_id: node.event_id, join: workflow.nodes.find((candidate) => candidate.id === node.id)?.join ?? "all" }));
  const edges = workflow.edges.filter((edge) => byId.has(edge.from) && byId.has(edge.to));
  drawGraph(canvas, {
    nodes,
    edges,
    positions: positionsFor(workflow.id, nodes, edges),
    handles: false,
    subtitle: (node) => `${eventName(node.event_id)} · ${byId.get(node.id)?.state ?? "?"}`,
    nodeLabel: (node) => `Node ${node.id} (${eventName(node.event_id)}): ${byId.get(node.id)?.state ?? "unknown"}${byId.get(node.id)?.run_id ? ", open its run" : ""}`,
    nodeClass: (node) => `state-${byId.get(node.id)?.state ?? "pending"}`,
    nodeHref: (node) => {
      const runId = byId.get(node.id)?.run_id ?? null;
      return runId === null ? null : `#/runs/${encodeURIComponent(runId)}`;
    },
  });
  for (const group of canvas.querySelectorAll<SVGGElement>("g.wf-node")) {
    const state = byId.get(group.dataset.node ?? "")?.state;
    if (state !== undefined) {
      group.dataset.state = state;
    }
  }
}

function nodeTable(nodes: WorkflowRunNode[], eventName: (id: string) => string): HTMLElement {
  return table(
    ["Node", "Event", "State", "Started", "Took", "Result or reason"],
    nodes.map((node) =>
      el(
        "tr",
        { "data-node": node.id, "data-state": node.state },
        el("td", {}, node.run_id === null ? node.id : el("a", { href: `#/runs/${encodeURIComponent(node.run_id)}` }, node.id)),
        el("td", {}, el("a", { href: `#/events/${encodeURIComponent(node.event_id)}` }, eventName(node.event_id))),
        el("td", {}, statusBadge(node.state)),
        el("td", {}, timeEl(node.started_at)),
        el("td", {}, node.started_at === null ? "—" : duration(node.started_at, node.finished_at)),
        el("td", { class: "muted" }, resultText(node)),
      ),
    ),
    "workflow-run-nodes",
  );
}

function resultText(node: WorkflowRunNode): string {
  if (node.reason !== null) {
    return node.reason;
  }
  if (node.result === null || node.result === undefined) {
    return node.condition === null ? "—" : `condition ${String(node.condition)}`;
  }
  const text = JSON.stringify(node.result);
  const shown = text.length > 120 ? `${text.slice(0, 119)}…` : text;
  return node.condition === null ? shown : `${shown} · condition ${String(node.condition)}`;
}
