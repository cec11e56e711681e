// Dark mode: the system's preference (prefers-color-scheme) unless the user picked a theme with
// the toggle, which is remembered in localStorage. The choice is `data-theme` on <html>; the
// stylesheet has the colours of both.

export type Theme = "light" | "dark";

const KEY = "cronium.theme";
const system = window.matchMedia("(prefers-color-scheme: dark)");

function stored(): Theme | null {
  try {
    const value = window.localStorage.getItem(KEY);
    return value === "light" || value === "dark" ? value : null;
  } catch {
    return null;
  }
}

export function currentTheme(): Theme {
  return stored() ?? (system.matches ? "dark" : "light");
}

export function applyTheme(): void {
  document.documentElement.dataset.theme = currentTheme();
}

export function toggleTheme(): Theme {
  const next: Theme = currentTheme() === "dark" ? "light" : "dark";
  try {
    window.localStorage.setItem(KEY, next);
  } catch {
    // Private mode: the choice lasts for this page only.
  }
  document.documentElement.dataset.theme = next;
  return next;
}

/** Follows the system's preference while the user has not chosen. */
export function followSystemTheme(onChange: () => void): void {
  system.addEventListener("change", () => {
    if (stored() === null) {
      applyTheme();
      onChange();
    }
  });
}
