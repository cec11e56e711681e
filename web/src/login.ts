// The login form shown by every page when nobody is logged in (`GET /auth/me` answered 401).

import { type User, login, messageOf } from "./api";
import { el, replaceChildren } from "./dom";

/**
 * Shows the login form inside `container` and resolves with the user once the API accepted the
 * credentials (the session cookie is then set). Wrong credentials show the API's message and
 * leave the form up.
 */
export function showLogin(container: HTMLElement): Promise<User> {
  return new Promise((resolve) => {
    const username = el("input", {
      id: "login-username",
      name: "username",
      type: "text",
      autocomplete: "username",
      required: true,
    });
    const password = el("input", {
      id: "login-password",
      name: "password",
      type: "password",
      autocomplete: "current-password",
      required: true,
    });
    const error = el("p", { class: "form-error", role: "alert", "aria-live": "assertive" });
    const submit = el("button", { type: "submit", class: "primary" }, "Log in");
    const form = el(
      "form",
      { class: "login", "aria-labelledby": "login-title" },
      el("h1", { id: "login-title" }, "Log in to Cronium"),
      el("label", { for: "login-username" }, "Username"),
      username,
      el("label", { for: "login-password" }, "Password"),
      password,
      submit,
      error,
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit.disabled = true;
      error.textContent = "";
      login(username.value, password.value).then(
        (user) => {
          form.remove();
          resolve(user);
        },
        (failure: unknown) => {
          submit.disabled = false;
          error.textContent = messageOf(failure);
          password.select();
          password.focus();
        },
      );
    });
    replaceChildren(container, form);
    username.focus();
  });
}
