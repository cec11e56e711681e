// The events list with a text filter (name, kind, targets, schedule), fetched again on event
// and run change notices (every 10 s while the notice stream is down).

import { type CronEvent, listEvents } from "../../api";
import { el } from "../../dom";
import type { Page } from "../context";
import { formatLabels, timeEl } from "../format";
import { poll } from "../live";
import { currentPath } from "../router";
import { empty, errorLine, loading, redrawIfChanged, table } from "../widgets";

export function targetsText(event: CronEvent): string {
  const parts: string[] = [];
  if (event.targets.agents.length > 0) {
    parts.push(`agents: ${event.targets.agents.join(", ")}`);
  }
  if (event.targets.servers.length > 0) {
    parts.push(`servers: ${event.targets.servers.join(", ")}`);
  }
  if (Object.keys(event.targets.labels).length > 0) {
    parts.push(`labels: ${formatLabels(event.targets.labels)}`);
  }
  return parts.join("; ");
}

export const eventsPage: Page = (context) => {
  context.setTitle("Events");
  const filter = el("input", {
    id: "events-filter",
    type: "search",
    placeholder: "Filter by name, kind, target or schedule",
    "aria-label": "Filter events",
    value: currentPath().query.get("q") ?? "",
  });
  const toolbar = el("div", { class: "toolbar" }, filter);
  if (context.canWrite) {
    toolbar.append(el("a", { href: "#/events/new", class: "button primary", id: "new-event" }, "New event"));
  }
  const status = el("div", {});
  const list = el("div", {}, loading());
  context.root.append(toolbar, status, list);
  let events: CronEvent[] | null = null;

  const draw = (): void => {
    if (events === null) {
      return;
    }
    const needle = filter.value.trim().toLowerCase();
    const shown = events
      .filter((event) =>
        needle === ""
          ? true
          : [event.name, event.kind, event.runtime, targetsText(event), event.schedule?.cron ?? ""].some((text) => text.toLowerCase().includes(needle)),
      )
      .sort((a, b) => a.name.localeCompare(b.name));
    redrawIfChanged(list, JSON.stringify([needle, shown]) + Math.floor(Date.now() / 30_000), () => {
      if (events?.length === 0) {
        return [
          empty(
            "No events yet. An event is a script (bash, Python or Node.js) with its targets, runtime and an optional schedule.",
            context.canWrite
              ? el("a", { href: "#/events/new", class: "button" }, "Create your first event")
              : el("span", { class: "muted" }, "Viewers see events they own; there are none."),
          ),
        ];
      }
      if (shown.length === 0) {
        return [empty(`No event matches “${filter.value}”.`)];
      }
      return [
        table(
          ["Name", "Kind", "Runtime", "Targets", "Schedule", "Next run"],
          shown.map((event) =>
            el(
              "tr",
              { "data-event-id": event.id },
              el("td", {}, el("a", { href: `#/events/${encodeURIComponent(event.id)}` }, event.name)),
              el("td", {}, event.kind),
              el("td", { class: "muted" }, event.runtime === "docker" ? `docker ${event.image ?? "(default image)"}` : "host"),
              el("td", { class: "muted" }, targetsText(event) || "—"),
              el("td", {}, event.schedule === null ? el("span", { class: "muted" }, "manual") : el("code", {}, event.schedule.cron)),
              el("td", {}, timeEl(event.next_run_at)),
            ),
          ),
          "events",
        ),
      ];
    });
  };
  filter.addEventListener("input", () => {
    const q = filter.value.trim();
    window.history.replaceState(null, "", q === "" ? "#/events" : `#/events?q=${encodeURIComponent(q)}`);
    draw();
  });
  poll(
    context.signal,
    10_000,
    async () => {
      events = await listEvents();
      status.replaceChildren();
      draw();
    },
    (error) => status.replaceChildren(errorLine(error)),
    ["event", "run"],
  );
  filter.focus();
};
