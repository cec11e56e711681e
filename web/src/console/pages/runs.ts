// All runs, newest first (GET /runs), with a status filter and a text filter on the event's
// name; fetched again on run (and event) change notices (every 5 s while the notice stream
// is down).

import { type RunStatus, type RunSummary, listRuns } from "../../api";
import { el } from "../../dom";
import type { Page } from "../context";
import { duration, statusBadge, timeEl } from "../format";
import { poll } from "../live";
import { currentPath } from "../router";
import { empty, errorLine, loading, redrawIfChanged, table } from "../widgets";

const STATUSES: RunStatus[] = ["queued", "running", "completed", "failed", "cancelled"];

export const runsPage: Page = (context) => {
  context.setTitle("Runs");
  const query = currentPath().query;
  const initialStatus = STATUSES.find((status) => status === query.get("status"));
  const statusFilter = el(
    "select",
    { id: "runs-status", "aria-label": "Status" },
    el("option", { value: "" }, "Any status"),
    ...STATUSES.map((status) => el("option", { value: status, selected: status === initialStatus }, status)),
  );
  const text = el("input", { id: "runs-filter", type: "search", placeholder: "Filter by event", "aria-label": "Filter by event", value: query.get("q") ?? "" });
  const status = el("div", {});
  const list = el("div", {}, loading());
  context.root.append(el("div", { class: "toolbar" }, text, statusFilter), status, list);
  let runs: RunSummary[] | null = null;

  const draw = (): void => {
    if (runs === null) {
      return;
    }
    const needle = text.value.trim().toLowerCase();
    const shown = runs.filter((run) => needle === "" || run.event_name.toLowerCase().includes(needle));
    redrawIfChanged(list, JSON.stringify([needle, shown]) + Math.floor(Date.now() / 30_000), () =>
      shown.length === 0
        ? [
            empty(
              runs?.length === 0 ? "No runs match." : `No run of an event matching “${text.value}”.`,
              context.canWrite && el("a", { href: "#/events" }, "Run an event"),
            ),
          ]
        : [
            table(
              ["Event", "Status", "Hosts", "Trigger", "Started", "Took"],
              shown.map((run) =>
                el(
                  "tr",
                  { "data-run-id": run.id },
                  el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.event_name)),
                  el("td", {}, statusBadge(run.status)),
                  el("td", { class: "muted" }, hostCounts(run)),
                  el("td", { class: "muted" }, run.trigger),
                  el("td", {}, timeEl(run.created_at)),
                  el("td", { class: "muted" }, duration(run.created_at, run.finished_at)),
                ),
              ),
              "runs",
            ),
          ],
    );
  };
  const updateAddress = (): void => {
    const params = new URLSearchParams();
    if (statusFilter.value !== "") params.set("status", statusFilter.value);
    if (text.value.trim() !== "") params.set("q", text.value.trim());
    const suffix = params.toString();
    window.history.replaceState(null, "", suffix === "" ? "#/runs" : `#/runs?${suffix}`);
  };
  const poller = poll(
    context.signal,
    5000,
    async () => {
      const wanted = STATUSES.find((value) => value === statusFilter.value);
      runs = await listRuns({ limit: 100, ...(wanted === undefined ? {} : { status: wanted }) });
      status.replaceChildren();
      draw();
    },
    (error) => status.replaceChildren(errorLine(error)),
    // An event's deletion takes its runs with it.
    ["run", "event"],
  );
  statusFilter.addEventListener("change", () => {
    updateAddress();
    list.replaceChildren(loading());
    delete list.dataset.key;
    poller.refresh();
  });
  text.addEventListener("input", () => {
    updateAddress();
    draw();
  });
};

function hostCounts(run: RunSummary): string {
  const parts = Object.entries(run.counts)
    .filter(([, count]) => count > 0)
    .map(([name, count]) => `${count} ${name}`);
  return parts.length === 0 ? "no hosts" : parts.join(", ");
}
