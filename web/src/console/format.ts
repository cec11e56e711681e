// Small formatting helpers shared by the pages: times, durations, statuses, labels.

import { el } from "../dom";

const absolute = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

/** "3 minutes ago", "in 2 hours"; empty for null. */
export function ago(iso: string | null | undefined, now = Date.now()): string {
  if (iso === null || iso === undefined) {
    return "";
  }
  const seconds = Math.round((Date.parse(iso) - now) / 1000);
  const abs = Math.abs(seconds);
  if (abs < 60) {
    return relative.format(seconds, "second");
  }
  if (abs < 3600) {
    return relative.format(Math.round(seconds / 60), "minute");
  }
  if (abs < 86_400) {
    return relative.format(Math.round(seconds / 3600), "hour");
  }
  return relative.format(Math.round(seconds / 86_400), "day");
}

export function dateTime(iso: string | null | undefined): string {
  return iso === null || iso === undefined ? "" : absolute.format(new Date(iso));
}

/** A <time> element showing a relative time, with the exact time as its title. */
export function timeEl(iso: string | null | undefined, fallback = "—"): HTMLElement {
  if (iso === null || iso === undefined) {
    return el("span", { class: "muted" }, fallback);
  }
  return el("time", { datetime: iso, title: dateTime(iso) }, ago(iso));
}

/** "1.2 s", "3 min 4 s". */
export function duration(fromIso: string | null | undefined, toIso: string | null | undefined): string {
  if (fromIso === null || fromIso === undefined) {
    return "";
  }
  const end = toIso === null || toIso === undefined ? Date.now() : Date.parse(toIso);
  const ms = Math.max(0, end - Date.parse(fromIso));
  if (ms < 10_000) {
    return `${(ms / 1000).toFixed(1)} s`;
  }
  const seconds = Math.round(ms / 1000);
  if (seconds < 3600) {
    return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  }
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

/** A coloured status word (job, run or agent status). */
export function statusBadge(status: string): HTMLElement {
  return el("span", { class: `badge badge-${status}`, "data-status": status }, status);
}

export function labelList(labels: Record<string, string>): HTMLElement {
  const entries = Object.entries(labels);
  if (entries.length === 0) {
    return el("span", { class: "muted" }, "—");
  }
  return el("span", { class: "labels" }, ...entries.map(([key, value]) => el("span", { class: "label" }, `${key}=${value}`)));
}

/** Parses "a=b, c=d" into labels; throws with a readable message on a malformed pair. */
export function parseLabels(text: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const part of text.split(/[,\n]/)) {
    const pair = part.trim();
    if (pair === "") {
      continue;
    }
    const equals = pair.indexOf("=");
    if (equals <= 0) {
      throw new Error(`"${pair}" is not key=value`);
    }
    labels[pair.slice(0, equals).trim()] = pair.slice(equals + 1).trim();
  }
  return labels;
}

export function formatLabels(labels: Record<string, string>): string {
  return Object.entries(labels)
    .map(([key, value]) => `${key}=${value}`)
    .join(", ");
}
