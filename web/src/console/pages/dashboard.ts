// The dashboard: agents online/offline, recent runs, failures to look at and the next scheduled
// runs. Fetched again on the change notices of agents, runs and events (every 5 s while the
// notice stream is down).

import { type Agent, type CronEvent, type RunSummary, listAgents, listEvents, listRuns } from "../../api";
import { el } from "../../dom";
import type { Page } from "../context";
import { dateTime, duration, statusBadge, timeEl } from "../format";
import { poll } from "../live";
import { empty, errorLine, loading, redrawIfChanged, section, table } from "../widgets";

export const dashboardPage: Page = (context) => {
  context.setTitle("Dashboard");
  const stats = el("div", { class: "stats", id: "stats" }, loading());
  const recent = el("div", {}, loading());
  const failures = el("div", {}, loading());
  const upcoming = el("div", {}, loading());
  const status = el("div", {});
  context.root.append(
    status,
    stats,
    section("recent-runs", "Recent runs", recent),
    el("div", { class: "grid" }, section("failures", "Failures to look at", failures), section("upcoming", "Next scheduled runs", upcoming)),
  );

  // Each section shows its own error, so one failing call does not blank the others.
  const settle = <T>(result: PromiseSettledResult<T>, region: HTMLElement, draw: (value: T) => void): boolean => {
    if (result.status === "fulfilled") {
      draw(result.value);
      return true;
    }
    delete region.dataset.key;
    region.replaceChildren(errorLine(result.reason));
    return false;
  };
  poll(
    context.signal,
    5000,
    async () => {
      const [agents, runs, failed, events] = await Promise.allSettled([
        listAgents(),
        listRuns({ limit: 20 }),
        listRuns({ status: "failed", limit: 10 }),
        listEvents(),
      ]);
      const results = [
        settle(agents, stats, (value) => drawStats(stats, value, runs.status === "fulfilled" ? runs.value : [])),
        settle(runs, recent, (value) => drawRuns(recent, value, context.canWrite)),
        settle(failed, failures, (value) => drawFailures(failures, value)),
        settle(events, upcoming, (value) => drawUpcoming(upcoming, value, context.canWrite)),
      ];
      if (results.every((ok) => !ok) && agents.status === "rejected") {
        // Everything failed (the control plane is down?): back off.
        throw agents.reason;
      }
      status.replaceChildren();
    },
    (error) => {
      status.replaceChildren(errorLine(error));
    },
    ["agent", "run", "event"],
  );
};

function stat(label: string, value: number, className: string, href: string): HTMLElement {
  return el("a", { class: `stat ${className}`, href }, el("span", { class: "stat-value" }, String(value)), el("span", { class: "stat-label" }, label));
}

function drawStats(region: HTMLElement, agents: Agent[], runs: RunSummary[]): void {
  const online = agents.filter((agent) => agent.status === "online").length;
  const running = runs.filter((run) => run.status === "running" || run.status === "queued").length;
  const failed = runs.filter((run) => run.status === "failed").length;
  redrawIfChanged(region, JSON.stringify([online, agents.length, running, failed]), () => [
    stat("agents online", online, "stat-ok", "#/servers"),
    stat("agents offline", agents.length - online, agents.length - online > 0 ? "stat-warn" : "", "#/servers"),
    stat("runs in progress", running, "", "#/runs?status=running"),
    stat("failed of the last 20 runs", failed, failed > 0 ? "stat-bad" : "", "#/runs?status=failed"),
  ]);
}

function runRow(run: RunSummary): HTMLTableRowElement {
  return el(
    "tr",
    { "data-run-id": run.id },
    el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.event_name)),
    el("td", {}, statusBadge(run.status)),
    el("td", { class: "muted" }, run.trigger),
    el("td", {}, timeEl(run.created_at)),
    el("td", { class: "muted" }, duration(run.created_at, run.finished_at)),
    el("td", { class: "muted" }, `${run.jobs.length} host${run.jobs.length === 1 ? "" : "s"}`),
  );
}

function drawRuns(region: HTMLElement, runs: RunSummary[], canWrite: boolean): void {
  redrawIfChanged(region, JSON.stringify(runs) + Math.floor(Date.now() / 30_000), () =>
    runs.length === 0
      ? [
          empty(
            "No runs yet.",
            canWrite ? el("a", { href: "#/events" }, "Open an event and press Run now") : el("span", { class: "muted" }, "Runs appear here as events run."),
          ),
        ]
      : [table(["Event", "Status", "Trigger", "Started", "Took", "Hosts"], runs.slice(0, 10).map(runRow)), el("a", { href: "#/runs" }, "All runs")],
  );
}

function drawFailures(region: HTMLElement, runs: RunSummary[]): void {
  redrawIfChanged(region, JSON.stringify(runs) + Math.floor(Date.now() / 30_000), () =>
    runs.length === 0
      ? [empty("No failed runs. Nothing to look at.")]
      : [
          el(
            "ul",
            { class: "failures" },
            ...runs.map((run) => {
              const failed = run.jobs.filter((job) => job.status === "failed");
              const why = failed
                .map((job) => (job.reason === "exit_code" ? `exit ${job.exit_code ?? "?"}` : (job.reason ?? "failed")))
                .filter((reason, index, all) => all.indexOf(reason) === index)
                .join(", ");
              return el(
                "li",
                {},
                el("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.event_name),
                " ",
                el("span", { class: "muted" }, `${failed.length}/${run.jobs.length} failed (${why}) `),
                timeEl(run.finished_at ?? run.created_at),
              );
            }),
          ),
        ],
  );
}

function drawUpcoming(region: HTMLElement, events: CronEvent[], canWrite: boolean): void {
  const scheduled = events
    .filter((event) => event.next_run_at !== null)
    .sort((a, b) => Date.parse(a.next_run_at ?? "") - Date.parse(b.next_run_at ?? ""))
    .slice(0, 8);
  redrawIfChanged(region, JSON.stringify(scheduled.map((event) => [event.id, event.name, event.next_run_at])) + Math.floor(Date.now() / 30_000), () =>
    scheduled.length === 0
      ? [
          empty(
            "Nothing is scheduled.",
            canWrite && el("a", { href: "#/events/new" }, "Create an event with a schedule"),
          ),
        ]
      : [
          table(
            ["Event", "Next run", "Schedule"],
            scheduled.map((event) =>
              el(
                "tr",
                {},
                el("td", {}, el("a", { href: `#/events/${encodeURIComponent(event.id)}` }, event.name)),
                el("td", { title: dateTime(event.next_run_at) }, timeEl(event.next_run_at)),
                el("td", {}, el("code", {}, event.schedule?.cron ?? ""), el("span", { class: "muted" }, ` ${event.schedule?.timezone ?? "UTC"}`)),
              ),
            ),
          ),
        ],
  );
}
