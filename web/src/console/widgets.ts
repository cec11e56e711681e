// Pieces the pages share: sections, tables, empty states, error lines, and a helper that redraws
// a region only when its data changed (so polling does not steal the keyboard focus).

import { ApiError, messageOf } from "../api";
import { el, replaceChildren } from "../dom";

type Child = Node | string | null | undefined | false;

export function section(id: string, title: string, ...children: Child[]): HTMLElement {
  return el("section", { class: "card", "aria-labelledby": `${id}-title`, id }, el("h2", { id: `${id}-title` }, title), ...children);
}

export function table(headers: string[], rows: HTMLTableRowElement[], className = ""): HTMLTableElement {
  return el(
    "table",
    { class: `data ${className}`.trim() },
    el("thead", {}, el("tr", {}, ...headers.map((header) => el("th", { scope: "col" }, header)))),
    el("tbody", {}, ...rows),
  );
}

/** An empty state that says what to do next. */
export function empty(message: string, ...next: Child[]): HTMLElement {
  return el("div", { class: "empty" }, el("p", {}, message), ...next);
}

export function errorLine(error: unknown): HTMLElement {
  const message = error instanceof ApiError && error.status === 403 ? `Not allowed: ${error.message}` : messageOf(error);
  return el("p", { class: "form-error", role: "alert" }, message);
}

export function loading(text = "Loading…"): HTMLElement {
  return el("p", { class: "muted loading", role: "status" }, el("span", { class: "spinner", "aria-hidden": "true" }), text);
}

/** Redraws `region` with `draw()` when `key` differs from the last time. */
export function redrawIfChanged(region: HTMLElement, key: string, draw: () => Child[]): void {
  if (region.dataset.key === key) {
    return;
  }
  region.dataset.key = key;
  replaceChildren(region, ...draw());
}

/** A button that copies `text()` to the clipboard and says so. */
export function copyButton(text: () => string, label = "Copy"): HTMLButtonElement {
  const button = el("button", { type: "button", class: "copy" }, label);
  button.addEventListener("click", () => {
    const value = text();
    const done = (): void => {
      button.textContent = "Copied";
      window.setTimeout(() => {
        button.textContent = label;
      }, 2000);
    };
    if (navigator.clipboard !== undefined && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(done, () => fallbackCopy(value, done));
    } else {
      fallbackCopy(value, done);
    }
  });
  return button;
}

function fallbackCopy(value: string, done: () => void): void {
  // Plain HTTP (no Clipboard API): select a hidden textarea and copy it.
  const area = el("textarea", { class: "offscreen", readonly: true });
  area.value = value;
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (ok) {
    done();
  }
}
