// The workflows list: name, nodes, trigger, last run, next scheduled run; fetched again on
// workflow and workflow run change notices (every 10 s while the notice stream is down).
// The API's list has no last run, so each workflow's newest run is fetched with it.

import { el } from "../../dom";
import { type Workflow, type WorkflowRun, listWorkflowRuns, listWorkflows } from "../../workflows-api";
import type { Page } from "../context";
import { statusBadge, timeEl } from "../format";
import { poll } from "../live";
import { empty, errorLine, loading, redrawIfChanged, table } from "../widgets";

/** The most workflows whose last run is looked up per refresh. */
const LAST_RUN_LOOKUPS = 50;

export function triggerText(workflow: Workflow): string {
  const parts: string[] = [];
  if (workflow.trigger.manual) {
    parts.push("manual");
  }
  if (workflow.trigger.schedule !== null) {
    parts.push(`schedule ${workflow.trigger.schedule.cron} (${workflow.trigger.schedule.timezone ?? "UTC"})`);
  }
  if (workflow.trigger.webhook) {
    parts.push("webhook");
  }
  return parts.length === 0 ? "none" : parts.join(", ");
}

export const workflowsPage: Page = (context) => {
  context.setTitle("Workflows");
  const toolbar = el("div", { class: "toolbar" }, el("p", { class: "muted" }, "Events chained into a graph: each step starts when the ones before it end the way its edges say."));
  if (context.canWrite) {
    toolbar.append(el("span", { class: "spacer" }), el("a", { href: "#/workflows/new", class: "button primary", id: "new-workflow" }, "New workflow"));
  }
  const status = el("div", {});
  const list = el("div", {}, loading());
  context.root.append(toolbar, status, list);

  poll(
    context.signal,
    10_000,
    async () => {
      const workflows = (await listWorkflows()).sort((a, b) => a.name.localeCompare(b.name));
      const last = await Promise.all(
        workflows.map((workflow, index) =>
          index < LAST_RUN_LOOKUPS ? listWorkflowRuns(workflow.id, 1).then((runs) => runs[0] ?? null, () => null) : Promise.resolve(null),
        ),
      );
      status.replaceChildren();
      redrawIfChanged(list, JSON.stringify([workflows, last]) + Math.floor(Date.now() / 30_000), () => {
        if (workflows.length === 0) {
          return [
            empty(
              "No workflows yet. A workflow chains events: add a node per event, connect them with edges that fire on success, failure, always or a condition the script sets, then run it and watch each step light up.",
              context.canWrite
                ? el("a", { href: "#/workflows/new", class: "button" }, "Build your first workflow")
                : el("span", { class: "muted" }, "Viewers see the workflows they may see; there are none."),
            ),
          ];
        }
        return [table(["Name", "Nodes", "Trigger", "Last run", "Next run"], workflows.map((workflow, index) => row(workflow, last[index] ?? null)), "workflows")];
      });
    },
    (error) => status.replaceChildren(errorLine(error)),
    ["workflow", "workflow_run"],
  );
};

function row(workflow: Workflow, run: WorkflowRun | null): HTMLTableRowElement {
  const link = `#/workflows/${encodeURIComponent(workflow.id)}`;
  return el(
    "tr",
    { "data-workflow-id": workflow.id, "data-workflow": workflow.name },
    el("td", {}, el("a", { href: link }, workflow.name)),
    el("td", {}, String(workflow.nodes.length)),
    el("td", { class: "muted" }, triggerText(workflow)),
    el(
      "td",
      { class: "last-run" },
      run === null
        ? el("span", { class: "muted" }, "never")
        : el("a", { href: `${link}/runs/${encodeURIComponent(run.id)}` }, statusBadge(run.status), " ", timeEl(run.created_at)),
    ),
    el("td", {}, timeEl(workflow.next_run_at)),
  );
}
