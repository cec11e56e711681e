// Settings tabs: users and roles (admins), the caller's API tokens (a new token is shown once,
// with a copy button), and the caller's variables (the values scripts read with get_variable).

import { el, replaceChildren } from "../../dom";
import {
  type ApiToken,
  type Role,
  type UserRecord,
  type Variable,
  createToken,
  createUser,
  deleteUser,
  deleteVariable,
  listTokens,
  listUsers,
  listVariables,
  putVariable,
  revokeToken,
  updateUser,
} from "../../settings-api";
import type { PageContext } from "../context";
import { timeEl } from "../format";
import { copyButton, empty, redrawIfChanged, section, table } from "../widgets";
import { actionButton, clearFieldErrors, field, polledList, showFormError } from "./settings";

const ROLES: Array<{ value: Role; label: string }> = [
  { value: "viewer", label: "viewer (read only)" },
  { value: "user", label: "user (their own events)" },
  { value: "admin", label: "admin (everything)" },
];

function roleSelect(id: string, selected: Role): HTMLSelectElement {
  return el("select", { id }, ...ROLES.map((role) => el("option", { value: role.value, selected: role.value === selected }, role.label)));
}

// ---- Users ----

export function usersTab(context: PageContext, region: HTMLElement): void {
  const { status, list: listRegion, refresh } = polledList(context.signal, 10_000, listUsers, (list, users, again) =>
    drawUsers(list, users, context, again),
  );
  region.append(section("users", "Users", status, listRegion), section("new-user", "Add a user", newUserForm(refresh)));
}

function drawUsers(region: HTMLElement, users: UserRecord[], context: PageContext, refresh: () => void): void {
  redrawIfChanged(region, JSON.stringify(users), () => [
    table(
      ["User", "Role", "Created", ""],
      users.map((user) => {
        const self = user.id === context.user.id;
        const role = roleSelect(`role-${user.id}`, user.role);
        role.setAttribute("aria-label", `Role of ${user.username}`);
        role.addEventListener("change", () => {
          role.disabled = true;
          updateUser(user.id, { role: role.value as Role }).then(
            () => {
              role.disabled = false;
              refresh();
            },
            (error: unknown) => {
              role.disabled = false;
              role.value = user.role;
              window.alert(error instanceof Error ? error.message : String(error));
            },
          );
        });
        const actions = el("td", { class: "actions" });
        const resetRegion = el("div", { class: "inline-form-region" });
        const reset = el("button", { type: "button", "data-action": "reset-password" }, "Reset password");
        reset.addEventListener("click", () => {
          reset.hidden = true;
          resetRegion.replaceChildren(resetPasswordForm(user, () => {
            reset.hidden = false;
            resetRegion.replaceChildren();
          }));
        });
        actions.append(reset);
        if (!self) {
          actions.append(
            actionButton("Delete", "danger", `Delete the user ${user.username}? Their tokens, tools, variables and servers go with them.`, async () => {
              await deleteUser(user.id);
              refresh();
            }),
          );
        }
        actions.append(resetRegion);
        return el(
          "tr",
          { "data-user": user.username },
          el("td", {}, user.username, self ? el("span", { class: "muted" }, " (you)") : ""),
          el("td", {}, self ? el("span", { class: `role role-${user.role}` }, user.role) : role),
          el("td", {}, timeEl(user.created_at)),
          actions,
        );
      }),
      "users",
    ),
  ]);
}

function resetPasswordForm(user: UserRecord, done: () => void): HTMLElement {
  const password = el("input", { type: "password", id: `password-${user.id}`, autocomplete: "new-password", minlength: "8", required: true });
  const save = el("button", { type: "submit", class: "primary" }, "Set password");
  const cancel = el("button", { type: "button" }, "Cancel");
  const error = el("div", {});
  const form = el("form", { class: "inline-form" }, field(`password-${user.id}`, `New password for ${user.username}`, password, "At least 8 characters. Their console sessions end.", "password"), el("div", { class: "toolbar" }, save, cancel), error);
  cancel.addEventListener("click", done);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    save.disabled = true;
    updateUser(user.id, { password: password.value }).then(
      () => {
        password.value = "";
        done();
      },
      (failure: unknown) => {
        save.disabled = false;
        showFormError(form, error, failure);
      },
    );
  });
  return form;
}

function newUserForm(refresh: () => void): HTMLElement {
  // Checked by the API, whose message is shown next to the field.
  const username = el("input", { id: "new-user-name", type: "text", required: true, autocomplete: "off" });
  const password = el("input", { id: "new-user-password", type: "password", required: true, autocomplete: "new-password", minlength: "8" });
  const role = roleSelect("new-user-role", "user");
  const submit = el("button", { type: "submit", class: "primary", id: "create-user" }, "Add user");
  const result = el("div", { "aria-live": "polite" });
  const form = el(
    "form",
    { autocomplete: "off" },
    el(
      "div",
      { class: "row" },
      field("new-user-name", "Username", username, undefined, "username"),
      field("new-user-password", "Password", password, "At least 8 characters; tell it to them yourself.", "password"),
      field("new-user-role", "Role", role, undefined, "role"),
    ),
    el("div", { class: "toolbar" }, submit),
    result,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit.disabled = true;
    createUser({ username: username.value.trim(), password: password.value, role: role.value as Role }).then(
      (created) => {
        submit.disabled = false;
        password.value = "";
        username.value = "";
        clearFieldErrors(form);
        replaceChildren(result, el("p", { class: "ok" }, `Added ${created.username} as ${created.role}.`));
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

// ---- API tokens ----

export function tokensTab(context: PageContext, region: HTMLElement): void {
  const { status, list: listRegion, refresh } = polledList(context.signal, 15_000, listTokens, (list, tokens, again) =>
    drawTokens(list, tokens, context, again),
  );
  region.append(
    el("p", { class: "muted" }, "API tokens let scripts and the cronium CLI call the API as you (Authorization: Bearer …). A token can do whatever you can."),
    section("tokens", "Your API tokens", status, listRegion),
  );
  if (context.canWrite) {
    region.append(section("new-token", "Create a token", newTokenForm(refresh)));
  }
}

function drawTokens(region: HTMLElement, tokens: ApiToken[], context: PageContext, refresh: () => void): void {
  redrawIfChanged(region, JSON.stringify(tokens) + Math.floor(Date.now() / 30_000), () => {
    if (tokens.length === 0) {
      return [empty("You have no API tokens.", context.canWrite && "Create one below; it is shown only once.")];
    }
    return [
      table(
        ["Name", "Created", "Last used", ""],
        tokens.map((token) =>
          el(
            "tr",
            { "data-token-name": token.name },
            el("td", {}, token.name),
            el("td", {}, timeEl(token.created_at)),
            el("td", {}, timeEl(token.last_used_at, "never")),
            el(
              "td",
              { class: "actions" },
              context.canWrite &&
                actionButton("Revoke", "danger", `Revoke the token “${token.name}”? Anything using it stops working.`, async () => {
                  await revokeToken(token.id);
                  refresh();
                }),
            ),
          ),
        ),
        "tokens",
      ),
    ];
  });
}

function newTokenForm(refresh: () => void): HTMLElement {
  const name = el("input", { id: "new-token-name", type: "text", required: true, maxlength: "100", placeholder: "ci deploys", autocomplete: "off" });
  const submit = el("button", { type: "submit", class: "primary", id: "create-token" }, "Create token");
  const result = el("div", { "aria-live": "polite" });
  const form = el("form", {}, field("new-token-name", "Name (what uses it)", name, undefined, "name"), el("div", { class: "toolbar" }, submit), result);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit.disabled = true;
    createToken(name.value.trim()).then(
      (created) => {
        submit.disabled = false;
        name.value = "";
        clearFieldErrors(form);
        // Shown this once: the control plane keeps only its hash. Leaving the page forgets it.
        replaceChildren(
          result,
          el("p", { class: "ok" }, `Created “${created.name}”. Copy it now: it is not shown again.`),
          el("pre", { class: "command" }, el("code", { id: "new-token-value" }, created.token)),
          el("div", { class: "toolbar" }, copyButton(() => created.token, "Copy token")),
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

// ---- Variables ----

export function variablesTab(context: PageContext, region: HTMLElement): void {
  const { status, list: listRegion, refresh } = polledList(context.signal, 10_000, listVariables, (list, variables, again) =>
    drawVariables(list, variables, context, again),
  );
  region.append(
    el("p", { class: "muted" }, "Variables are JSON values your scripts share: get_variable / set_variable read and write them. They are yours: every event you own sees them. Do not keep secrets here; use an event's secret environment variables."),
    section("variables", "Your variables", status, listRegion),
  );
  if (context.canWrite) {
    region.append(section("set-variable", "Set a variable", variableForm(refresh)));
  }
}

/** A value as compact JSON, cut to a readable length. */
function shownValue(value: unknown): string {
  const text = JSON.stringify(value);
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

function drawVariables(region: HTMLElement, variables: Variable[], context: PageContext, refresh: () => void): void {
  redrawIfChanged(region, JSON.stringify(variables), () => {
    if (variables.length === 0) {
      return [empty("No variables yet.", context.canWrite ? "Set one below, or from a script with set_variable." : "Scripts create them with set_variable.")];
    }
    return [
      table(
        ["Name", "Value", "Updated", ""],
        variables.map((variable) =>
          el(
            "tr",
            { "data-variable": variable.name },
            el("td", {}, el("code", {}, variable.name)),
            el("td", {}, el("code", { class: "value" }, shownValue(variable.value))),
            el("td", {}, timeEl(variable.updated_at), variable.updated_by_job === null ? "" : el("span", { class: "muted" }, " by a job")),
            el(
              "td",
              { class: "actions" },
              context.canWrite &&
                actionButton("Delete", "danger", `Delete the variable ${variable.name}?`, async () => {
                  await deleteVariable(variable.name);
                  refresh();
                }),
            ),
          ),
        ),
        "variables",
      ),
    ];
  });
}

function variableForm(refresh: () => void): HTMLElement {
  const name = el("input", { id: "variable-name", type: "text", required: true, pattern: "[A-Za-z0-9_.\\-]{1,128}", autocomplete: "off" });
  const value = el("textarea", { id: "variable-value", rows: "3", spellcheck: "false", placeholder: '{"release": "1.4.2"}' });
  const submit = el("button", { type: "submit", class: "primary", id: "set-variable-submit" }, "Set");
  const result = el("div", { "aria-live": "polite" });
  const form = el(
    "form",
    {},
    el("div", { class: "row" }, field("variable-name", "Name", name, undefined, "name"), field("variable-value", "Value", value, "JSON (a number, true, \"text\", an object…); anything else is stored as a string.", "value")),
    el("div", { class: "toolbar" }, submit),
    result,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    let parsed: unknown;
    try {
      parsed = JSON.parse(value.value);
    } catch {
      parsed = value.value;
    }
    submit.disabled = true;
    putVariable(name.value.trim(), parsed).then(
      (stored) => {
        submit.disabled = false;
        replaceChildren(result, el("p", { class: "ok" }, `Set ${stored.name}.`));
        name.value = "";
        value.value = "";
        clearFieldErrors(form);
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
