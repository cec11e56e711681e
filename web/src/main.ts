// The console (/ui/): log in if needed, then the app shell with its pages (console/shell.ts).
// The terminal has a page of its own (terminal.html).

import "./styles.css";
import "./console/console.css";
import { type User, currentUser, messageOf, whenSessionLost } from "./api";
import { startShell } from "./console/shell";
import { applyTheme } from "./console/theme";
import { el, replaceChildren } from "./dom";
import { showLogin } from "./login";

applyTheme();
const app = document.getElementById("app") as HTMLElement;

async function start(): Promise<void> {
  let user: User | null;
  try {
    user = await currentUser();
  } catch (error) {
    replaceChildren(app, el("p", { class: "form-error", role: "alert" }, messageOf(error)));
    return;
  }
  if (user === null) {
    user = await showLogin(app);
  }
  // The session expired or was ended elsewhere: back to the login form, on the same page.
  whenSessionLost(() => window.location.reload());
  startShell(app, user);
}

void start();
