// Settings → Enrollment tokens (admins): create a token for new hosts (labels, uses, lifetime)
// and get the one-line install command with a copy button (the token is shown only then); list
// the tokens that can still enroll an agent and revoke them.

import { type EnrollmentToken, createEnrollmentToken } from "../../api";
import { el, replaceChildren } from "../../dom";
import { type EnrollmentTokenRecord, listEnrollmentTokens, revokeEnrollmentToken } from "../../settings-api";
import type { PageContext } from "../context";
import { labelList, parseLabels, timeEl } from "../format";
import { copyButton, empty, redrawIfChanged, section, table } from "../widgets";
import { actionButton, clearFieldErrors, field, polledList, showFormError } from "./settings";

const LIFETIMES: Array<{ seconds: number; label: string }> = [
  { seconds: 3600, label: "1 hour" },
  { seconds: 24 * 3600, label: "1 day" },
  { seconds: 7 * 24 * 3600, label: "7 days" },
  { seconds: 30 * 24 * 3600, label: "30 days" },
];

export function enrollmentTab(context: PageContext, region: HTMLElement): void {
  const { status, list: listRegion, refresh } = polledList(context.signal, 10_000, listEnrollmentTokens, (list, tokens, again) =>
    drawTokens(list, tokens, again),
  );
  region.append(
    section("new-enrollment", "Create an install command", createForm(refresh)),
    section("enrollment-tokens", "Usable enrollment tokens", status, listRegion),
  );
}

function drawTokens(region: HTMLElement, tokens: EnrollmentTokenRecord[], refresh: () => void): void {
  redrawIfChanged(region, JSON.stringify(tokens) + Math.floor(Date.now() / 30_000), () => {
    if (tokens.length === 0) {
      return [empty("No token can enroll an agent right now.", "Create an install command above when you add a host.")];
    }
    return [
      table(
        ["Token", "Labels", "Uses left", "Expires", "Created by", ""],
        tokens.map((token) =>
          el(
            "tr",
            { "data-enrollment-token": token.id },
            el("td", {}, el("code", { title: token.id }, token.id.slice(0, 8))),
            el("td", {}, labelList(token.labels)),
            el("td", {}, String(token.uses_left)),
            el("td", {}, timeEl(token.expires_at)),
            el("td", { class: "muted" }, token.created_by ?? "—"),
            el(
              "td",
              { class: "actions" },
              actionButton("Revoke", "danger", "Revoke this enrollment token? Hosts not yet enrolled with it cannot use it.", async () => {
                await revokeEnrollmentToken(token.id);
                refresh();
              }),
            ),
          ),
        ),
        "enrollment-tokens",
      ),
    ];
  });
}

function createForm(refresh: () => void): HTMLElement {
  const labels = el("input", { id: "enrollment-labels", type: "text", placeholder: "env=prod, role=web", autocomplete: "off" });
  const uses = el("input", { id: "enrollment-uses", type: "number", min: "1", max: "10000", value: "1" });
  const ttl = el("select", { id: "enrollment-ttl" }, ...LIFETIMES.map((lifetime) => el("option", { value: String(lifetime.seconds) }, lifetime.label)));
  const submit = el("button", { type: "submit", class: "primary", id: "create-enrollment" }, "Create install command");
  const result = el("div", { "aria-live": "polite" });
  const form = el(
    "form",
    {},
    el(
      "div",
      { class: "row" },
      field("enrollment-labels", "Labels (optional)", labels, "key=value pairs the agents get", "labels"),
      field("enrollment-uses", "Hosts it may enroll", uses, undefined, "uses"),
      field("enrollment-ttl", "Valid for", ttl, undefined, "ttl_seconds"),
    ),
    el("div", { class: "toolbar" }, submit),
    result,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let parsed: Record<string, string>;
    try {
      parsed = parseLabels(labels.value);
    } catch (failure) {
      showFormError(form, result, failure);
      return;
    }
    submit.disabled = true;
    createEnrollmentToken({ labels: parsed, uses: Number(uses.value) || 1, ttl_seconds: Number(ttl.value) }).then(
      (token: EnrollmentToken) => {
        submit.disabled = false;
        clearFieldErrors(form);
        replaceChildren(
          result,
          el("p", {}, "Run this as root on each new host. The token is shown only now."),
          el("pre", { class: "command", id: "enrollment-command" }, el("code", {}, token.install_command)),
          el("div", { class: "toolbar" }, copyButton(() => token.install_command, "Copy command")),
          token.enroll_command !== undefined && el("details", {}, el("summary", {}, "Agent already installed? Enroll it with"), el("pre", { class: "command" }, el("code", {}, token.enroll_command))),
        );
        refresh();
      },
      (failure: unknown) => {
        submit.disabled = false;
        showFormError(form, result, failure);
      },
    );
  });
  return form;
}
