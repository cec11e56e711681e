// One run: its status, the per-host matrix (one job per agent or server) with cancel and
// "re-run failed hosts", and the selected job's log streamed live over server-sent events
// (`GET /jobs/{id}/logs?follow=true`: `log` events, then `end` with the job), ANSI colours
// and all, with a download of the full log. The run itself is pushed too (`GET
// /runs/{id}/events`), polled only when that stream is unavailable.

import {
  type Agent,
  type Job,
  type Run,
  type Server,
  cancelJob,
  fetchEvent,
  fetchRun,
  jobLogUrl,
  runEventsUrl,
  listAgents,
  listServers,
  messageOf,
  request,
  retryRun,
  triggerRun,
} from "../../api";
import { el, replaceChildren } from "../../dom";
import type { Page, PageContext } from "../context";
import { dateTime, duration, statusBadge, timeEl } from "../format";
import { type Poller, poll } from "../live";
import { LogView } from "../logview";
import { currentPath } from "../router";
import { errorLine, loading, redrawIfChanged, section, table } from "../widgets";

const FINAL = new Set(["completed", "failed", "cancelled"]);

export const runPage: Page = async (context, params) => {
  const runId = params.id ?? "";
  context.setTitle("Run");
  const summary = el("div", { class: "run-summary" }, loading());
  const matrix = el("div", {});
  const logArea = el("div", { id: "job-log" });
  const status = el("div", {});
  context.root.append(status, summary, section("hosts", "Hosts", matrix), logArea);

  const hosts = new Map<string, string>();
  const loadHosts = async (): Promise<void> => {
    const [agents, servers] = await Promise.all([listAgents(), listServers().catch((): Server[] => [])]);
    agents.forEach((agent: Agent) => hosts.set(agent.id, agent.name));
    servers.forEach((server) => hosts.set(server.id, server.name));
  };
  await loadHosts().catch(() => undefined);
  const hostName = (job: Job): string => {
    const id = job.agent_id ?? job.server_id ?? "";
    // A pool job (targets.pool) has no agent until one claims it.
    return id === "" ? "(pool: any matching agent)" : (hosts.get(id) ?? id);
  };

  let selected: string | null = currentPath().query.get("job");
  let shownJob: string | null = null;
  let stream: LogStream | null = null;
  let run: Run | null = null;
  let eventName: string | null = null;
  let refresh = (): void => undefined;

  const select = (jobId: string): void => {
    selected = jobId;
    window.history.replaceState(null, "", `#/runs/${encodeURIComponent(runId)}?job=${encodeURIComponent(jobId)}`);
    draw();
  };

  const draw = (): void => {
    if (run === null) {
      return;
    }
    const current = run;
    const job = current.jobs.find((candidate) => candidate.id === selected) ?? current.jobs[0];
    if (job !== undefined && shownJob !== job.id) {
      shownJob = job.id;
      selected = job.id;
      stream?.close();
      stream = showLog(context, logArea, job, hostName(job));
    }
    if (job !== undefined) {
      stream?.update(job);
    }
    const rollout = current.rollout ?? null;
    redrawIfChanged(summary, JSON.stringify([current.status, current.counts, eventName, rollout]) + Math.floor(Date.now() / 30_000), () => [
      el(
        "dl",
        { class: "facts" },
        el("dt", {}, "Status"),
        el("dd", { id: "run-status" }, statusBadge(current.status)),
        el("dt", {}, "Event"),
        el("dd", {}, el("a", { href: `#/events/${encodeURIComponent(current.event_id)}` }, eventName || "Open the event")),
        el("dt", {}, "Trigger"),
        el("dd", {}, current.trigger),
        el("dt", {}, "Created"),
        el("dd", { title: dateTime(current.created_at) }, timeEl(current.created_at)),
        current.input !== undefined && current.input !== null && el("dt", {}, "Input"),
        current.input !== undefined && current.input !== null && el("dd", {}, el("pre", { class: "input" }, JSON.stringify(current.input, null, 2))),
        rollout !== null && el("dt", {}, "Rollout"),
        rollout !== null && el("dd", { id: "run-rollout" }, rolloutText(rollout)),
        rollout !== null && rollout.stopped_reason !== null && el("dt", {}, "Stopped"),
        rollout !== null && rollout.stopped_reason !== null && el("dd", { id: "run-stopped" }, rollout.stopped_reason),
        typeof current.retry_of === "string" && el("dt", {}, "Retry of"),
        typeof current.retry_of === "string" && el("dd", {}, el("a", { href: `#/runs/${encodeURIComponent(current.retry_of)}` }, "the earlier run")),
      ),
      context.canWrite && runActions(context, current),
    ]);
    redrawIfChanged(
      matrix,
      JSON.stringify([current.jobs.map((candidate) => [candidate.id, candidate.status, candidate.exit_code, candidate.attempt, candidate.finished_at]), selected]),
      () => [
        table(
          ["Host", "Status", "Attempt", "Exit", "Reason", "Took", ""],
          current.jobs.map((candidate) => {
            const show = el("button", { type: "button", "aria-pressed": String(candidate.id === selected) }, "Show log");
            show.addEventListener("click", () => select(candidate.id));
            const cells = el("td", { class: "actions" }, show);
            if (context.canWrite && !FINAL.has(candidate.status)) {
              cells.append(cancelButton(candidate, () => refresh()));
            }
            return el(
              "tr",
              { "data-job-id": candidate.id, class: candidate.id === selected ? "selected" : "" },
              el("td", {}, hostName(candidate)),
              el("td", {}, statusBadge(candidate.status)),
              el("td", { class: "muted" }, `${candidate.attempt}/${candidate.max_attempts}`),
              el("td", {}, candidate.exit_code === null ? "—" : String(candidate.exit_code)),
              el("td", { class: "muted" }, candidate.reason ?? ""),
              el("td", { class: "muted" }, candidate.finished_at === null ? "" : duration(candidate.started_at, candidate.finished_at)),
              cells,
            );
          }),
          "matrix",
        ),
      ],
    );
  };

  // Shows a newer state of the run, loading what its summary lacks (the event's name, hosts
  // not seen yet).
  const show = async (next: Run): Promise<void> => {
    run = next;
    if (eventName === null) {
      eventName = await fetchEvent(next.event_id).then(
        (event) => event.name,
        () => "",
      );
      if (eventName !== "") {
        context.setTitle(`Run of ${eventName}`);
      }
    }
    if (next.jobs.some((job) => (job.agent_id ?? job.server_id) != null && !hosts.has(job.agent_id ?? job.server_id ?? ""))) {
      await loadHosts().catch(() => undefined);
    }
    status.replaceChildren();
    draw();
  };

  // Polling, when the run stream is unavailable.
  let poller: Poller | null = null;
  const startPolling = (): void => {
    if (poller !== null || context.signal.aborted) {
      return;
    }
    summary.dataset.updates = "poll";
    poller = poll(
      context.signal,
      2000,
      async () => {
        if (run !== null && FINAL.has(run.status) && run.jobs.every((job) => FINAL.has(job.status))) {
          // An ended run does not change any more (a re-run is a new run).
          return;
        }
        await show(await fetchRun(runId, false));
      },
      (error) => status.replaceChildren(errorLine(error)),
    );
  };
  // After a change the user made: a stream brings it by itself, a poller fetches now.
  refresh = () => poller?.refresh();
  watchRun(context.signal, runId, {
    summary: (next) => {
      summary.dataset.updates = "stream";
      void show(next);
    },
    job: (job) => {
      if (run === null) {
        return;
      }
      const jobs = run.jobs.map((candidate) => (candidate.id === job.id ? { ...candidate, ...job } : candidate));
      void show({ ...run, jobs, counts: countsOf(jobs), status: statusOf(jobs) });
    },
    failed: startPolling,
  });
  context.signal.addEventListener("abort", () => stream?.close());
};

/**
 * Follows `GET /runs/{id}/events`: `summary` with the whole run (at the start, again after a
 * reconnect, and at the end), `job` with each job whose state changed. `failed` when the stream
 * cannot be used (no EventSource, refused, an `error` event, or dropping again and again); the
 * caller then polls.
 */
function watchRun(
  signal: AbortSignal,
  runId: string,
  handlers: { summary: (run: Run) => void; job: (job: Job) => void; failed: () => void },
): void {
  if (typeof EventSource === "undefined") {
    handlers.failed();
    return;
  }
  const source = new EventSource(runEventsUrl(runId));
  let drops = 0;
  const data = <T,>(event: Event): T => JSON.parse((event as MessageEvent<string>).data) as T;
  source.addEventListener("run", (event) => {
    drops = 0;
    handlers.summary(data<Run>(event));
  });
  source.addEventListener("job", (event) => handlers.job(data<Job>(event)));
  source.addEventListener("end", (event) => {
    // The stream closes after its end: no reconnect.
    source.close();
    handlers.summary(data<Run>(event));
  });
  source.addEventListener("error", (event) => {
    // The browser reconnects by itself (the new stream starts with the whole run); a refused
    // stream, a server-side error or repeated drops fall back to polling.
    drops += 1;
    const serverError = event instanceof MessageEvent;
    if (serverError || source.readyState === EventSource.CLOSED || drops >= 3) {
      source.close();
      if (!signal.aborted) {
        handlers.failed();
      }
    }
  });
  signal.addEventListener("abort", () => source.close());
}

/** A run's counts from its jobs (as the API derives them). */
function countsOf(jobs: Job[]): Run["counts"] {
  const count = (...statuses: string[]): number => jobs.filter((job) => statuses.includes(job.status)).length;
  return {
    queued: count("queued"),
    running: count("claimed", "running"),
    completed: count("completed"),
    failed: count("failed"),
    cancelled: count("cancelled"),
  };
}

/** A run's status from its jobs, as the API derives it (`RunStatus::of`). */
function statusOf(jobs: Job[]): Run["status"] {
  const counts = countsOf(jobs);
  if (counts.running > 0 || (counts.queued > 0 && counts.queued < jobs.length)) {
    return "running";
  }
  if (counts.queued > 0) {
    return "queued";
  }
  if (counts.failed > 0) {
    return "failed";
  }
  if (counts.cancelled > 0 && counts.completed === 0) {
    return "cancelled";
  }
  return "completed";
}

function cancelButton(job: Job, after: () => void): HTMLButtonElement {
  const button = el("button", { type: "button", class: "danger", "data-action": "cancel" }, job.cancel_requested ? "Cancelling…" : "Cancel");
  button.disabled = job.cancel_requested;
  button.addEventListener("click", () => {
    button.disabled = true;
    button.textContent = "Cancelling…";
    cancelJob(job.id).then(after, (error: unknown) => {
      button.disabled = false;
      button.textContent = "Cancel";
      window.alert(messageOf(error));
    });
  });
  return button;
}

/** "batch 2 of 3 (2 hosts each)", or how the rollout ended. */
function rolloutText(rollout: NonNullable<Run["rollout"]>): string {
  const size = rollout.batch_size === null ? "one batch" : `${rollout.batch_size} host${rollout.batch_size === 1 ? "" : "s"} each`;
  if (rollout.current_batch === null) {
    return `${rollout.batches} batch${rollout.batches === 1 ? "" : "es"} (${size}), ended`;
  }
  return `batch ${rollout.current_batch + 1} of ${rollout.batches} (${size})`;
}

function runActions(context: PageContext, run: Run): HTMLElement {
  const bar = el("div", { class: "toolbar" });
  const failed = run.jobs.filter((job) => job.status === "failed" || job.status === "cancelled");
  // Failed hosts and hosts that never started (skipped, stopped rollout) are retried through
  // the API's retry, a run linked to this one with its rollout; hosts cancelled while running
  // are not "not started", so then the failed hosts are triggered again as targets.
  const retryable = failed.every((job) => job.status === "failed" || job.attempt === 0);
  const again = (label: string, jobs: Job[] | null, id: string): HTMLButtonElement => {
    const button = el("button", { type: "button", id }, label);
    button.addEventListener("click", () => {
      button.disabled = true;
      const targets =
        jobs === null
          ? undefined
          : {
              agents: jobs.flatMap((job) => (job.agent_id === null ? [] : [job.agent_id])),
              servers: jobs.flatMap((job) => (job.server_id === null ? [] : [job.server_id])),
            };
      const created =
        jobs !== null && retryable ? retryRun(run.id, "failed_and_not_started") : triggerRunWith(run.event_id, run.input, targets);
      created.then(
        (created) => context.navigate(`#/runs/${encodeURIComponent(created.run_id)}`),
        (error: unknown) => {
          button.disabled = false;
          bar.append(errorLine(error));
        },
      );
    });
    return button;
  };
  if (failed.length > 0 && FINAL.has(run.status)) {
    bar.append(again(`Re-run ${failed.length} failed host${failed.length === 1 ? "" : "s"}`, failed, "rerun-failed"));
  }
  if (FINAL.has(run.status)) {
    bar.append(again("Run again", null, "run-again"));
  }
  return bar;
}

function triggerRunWith(
  eventId: string,
  input: unknown,
  targets: { agents: string[]; servers: string[] } | undefined,
): Promise<{ run_id: string }> {
  if (targets === undefined) {
    return triggerRun(eventId, input ?? undefined);
  }
  const body: Record<string, unknown> = { targets };
  if (input !== undefined && input !== null) {
    body.input = input;
  }
  return request("POST", `/events/${encodeURIComponent(eventId)}/runs`, body);
}

interface LogStream {
  update(job: Job): void;
  close(): void;
}

/** Shows one job's log: a header with its status, exit code and actions, and the live log. */
function showLog(context: PageContext, area: HTMLElement, job: Job, host: string): LogStream {
  const view = new LogView(jobLogUrl(job.id, false), `job-${job.id}.log`);
  const state = el("span", { class: "muted", id: "log-state", role: "status" }, "Connecting…");
  const facts = el("span", { id: "job-facts" });
  const download = el("a", { href: jobLogUrl(job.id, false), download: `job-${job.id}.log`, class: "button", id: "download-log" }, "Download log");
  const search = el("input", { type: "search", id: "log-search", placeholder: "Show lines containing…", "aria-label": "Filter the log's lines" });
  const matches = el("span", { class: "muted", id: "log-matches", "aria-live": "polite" });
  search.addEventListener("input", () => {
    const count = view.setFilter(search.value);
    matches.textContent = search.value === "" ? "" : `${count} matching line${count === 1 ? "" : "s"} on screen`;
  });
  replaceChildren(
    area,
    section(
      "log",
      `Log of ${host}`,
      el("div", { class: "toolbar" }, facts, el("span", { class: "spacer" }), state, download),
      el("div", { class: "toolbar log-tools" }, search, matches),
      view.element,
    ),
  );
  area.dataset.jobId = job.id;
  delete area.dataset.ended;
  let offset = 0;
  let ended = false;
  let source: EventSource | null = null;
  let retry = 1000;
  let timer: number | undefined;
  const encoder = new TextEncoder();

  const connect = (): void => {
    source = new EventSource(jobLogUrl(job.id, true, offset));
    source.addEventListener("open", () => {
      retry = 1000;
      state.textContent = "Live";
      state.className = "live";
    });
    source.addEventListener("log", (event) => {
      const data = JSON.parse((event as MessageEvent<string>).data) as { offset: number; stream: string; data: string };
      if (data.offset < offset) {
        return;
      }
      view.append(data.data, data.stream);
      offset = data.offset + encoder.encode(data.data).length;
    });
    source.addEventListener("end", (event) => {
      ended = true;
      source?.close();
      view.flush();
      const final = JSON.parse((event as MessageEvent<string>).data) as Job;
      state.textContent = "Ended";
      state.className = "muted";
      area.dataset.ended = "true";
      if (view.empty) {
        view.append("(no output)\n", "note");
        view.flush();
      }
      update(final);
    });
    source.addEventListener("error", (event) => {
      source?.close();
      if (ended || context.signal.aborted) {
        return;
      }
      const message = event instanceof MessageEvent && typeof event.data === "string" ? (JSON.parse(event.data) as { message?: string }).message : undefined;
      state.textContent = message === undefined ? "Connection lost; reconnecting…" : `${message}; retrying…`;
      state.className = "warn";
      timer = window.setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30_000);
    });
  };

  const update = (current: Job): void => {
    redrawIfChanged(facts, JSON.stringify([current.status, current.exit_code, current.reason, current.attempt]), () => [
      statusBadge(current.status),
      current.exit_code !== null && el("span", { class: "exit" }, ` exit code ${current.exit_code}`),
      current.reason !== null && current.reason !== "exit_code" && el("span", { class: "muted" }, ` (${current.reason})`),
      el("span", { class: "muted" }, ` attempt ${current.attempt}/${current.max_attempts}`),
      context.canWrite && !FINAL.has(current.status) && " ",
      context.canWrite && !FINAL.has(current.status) && cancelButton(current, () => undefined),
    ]);
  };
  update(job);
  connect();
  return {
    update,
    close: () => {
      ended = true;
      window.clearTimeout(timer);
      source?.close();
    },
  };
}
