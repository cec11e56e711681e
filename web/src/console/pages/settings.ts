// Settings (`#/settings/TAB`): a tab bar and one section per tab. Users and enrollment tokens are
// admin-only (the tabs are not offered to others, and the API refuses them); API tokens, tools
// and variables are the caller's own. Viewers see their lists without any change button.

import { ApiError, messageOf } from "../../api";
import { el, replaceChildren } from "../../dom";
import type { Page, PageContext } from "../context";
import { poll } from "../live";
import { errorLine, loading } from "../widgets";
import { enrollmentTab } from "./settings-enrollment";
import { toolsTab } from "./settings-tools";
import { tokensTab, usersTab, variablesTab } from "./settings-users";

interface Tab {
  id: string;
  label: string;
  adminOnly: boolean;
  draw: (context: PageContext, region: HTMLElement) => void;
}

const TABS: Tab[] = [
  { id: "tokens", label: "API tokens", adminOnly: false, draw: tokensTab },
  { id: "tools", label: "Tools", adminOnly: false, draw: toolsTab },
  { id: "variables", label: "Variables", adminOnly: false, draw: variablesTab },
  { id: "users", label: "Users", adminOnly: true, draw: usersTab },
  { id: "enrollment", label: "Enrollment tokens", adminOnly: true, draw: enrollmentTab },
];

export const settingsPage: Page = (context, params) => {
  const offered = TABS.filter((tab) => context.isAdmin || !tab.adminOnly);
  const tab = offered.find((candidate) => candidate.id === (params.tab ?? "tokens"));
  context.setTitle(tab === undefined ? "Settings" : `Settings · ${tab.label}`);
  const nav = el(
    "nav",
    { class: "subnav", "aria-label": "Settings" },
    ...offered.map((candidate) =>
      el(
        "a",
        {
          href: `#/settings/${candidate.id}`,
          id: `settings-tab-${candidate.id}`,
          "aria-current": candidate === tab ? "page" : undefined,
        },
        candidate.label,
      ),
    ),
  );
  const region = el("div", { class: "settings-body" });
  context.root.append(nav, region);
  if (tab === undefined) {
    region.append(el("p", { class: "form-error", role: "alert" }, "There is no such settings page, or it needs the admin role."));
    return;
  }
  tab.draw(context, region);
};

/** A labelled form field; `data-field` lets an API error with that `field` mark it. */
/** A list kept fresh by polling every `intervalMs`: `load` fetches, `draw` renders into `list`
 * (with `refresh` for after a change); a failed load is shown in `status`. */
export function polledList<T>(
  signal: AbortSignal,
  intervalMs: number,
  load: () => Promise<T>,
  draw: (list: HTMLElement, items: T, refresh: () => void) => void,
): { status: HTMLElement; list: HTMLElement; refresh: () => void } {
  const list = el("div", {}, loading());
  const status = el("div", {});
  const refresh = (): void => poller.refresh();
  const poller = poll(
    signal,
    intervalMs,
    async () => {
      const items = await load();
      status.replaceChildren();
      draw(list, items, refresh);
    },
    (error) => status.replaceChildren(errorLine(error)),
  );
  return { status, list, refresh };
}

export function field(id: string, label: string, input: HTMLElement, hint?: string, apiField?: string): HTMLElement {
  return el(
    "div",
    { class: "field", "data-field": apiField ?? id },
    el("label", { for: id }, label),
    input,
    hint !== undefined && el("p", { class: "hint" }, hint),
  );
}

/** Removes the marks `showFormError` put on fields. */
export function clearFieldErrors(form: HTMLElement): void {
  for (const marked of form.querySelectorAll(".field.invalid")) {
    marked.classList.remove("invalid");
  }
}

/** Shows an API error in `where`, marking the field it names inside `form` (if any). */
export function showFormError(form: HTMLElement, where: HTMLElement, failure: unknown): void {
  clearFieldErrors(form);
  let message = messageOf(failure);
  if (failure instanceof ApiError && failure.field !== null) {
    const target = form.querySelector(`[data-field="${CSS.escape(failure.field)}"]`);
    target?.classList.add("invalid");
    message = `${failure.field}: ${failure.message}`;
  } else if (failure instanceof ApiError && failure.status === 403) {
    message = `Not allowed: ${failure.message}`;
  }
  replaceChildren(where, el("p", { class: "form-error", role: "alert" }, message));
}

/** A button that asks `question`, then runs `action` (disabled meanwhile; errors alerted). */
export function actionButton(label: string, className: string, question: string | null, action: () => Promise<unknown>): HTMLButtonElement {
  const button = el("button", { type: "button", class: className }, label);
  button.addEventListener("click", () => {
    if (question !== null && !window.confirm(question)) {
      return;
    }
    button.disabled = true;
    action().then(
      () => {
        button.disabled = false;
      },
      (error: unknown) => {
        button.disabled = false;
        window.alert(messageOf(error));
      },
    );
  });
  return button;
}
