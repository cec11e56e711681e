// Client-side routes in the address's hash (/ui/#/events/ID), so the static file server needs
// no fallback for deep links and a reload stays on the same page.

export interface Route<T> {
  /** A path with `:name` parameters, e.g. "/events/:id". */
  pattern: string;
  target: T;
}

export interface Match<T> {
  target: T;
  params: Record<string, string>;
}

/** The path and query of the current hash: "#/runs/ID?job=J" → ["/runs/ID", {job: "J"}]. */
export function currentPath(): { path: string; query: URLSearchParams } {
  const hash = window.location.hash.replace(/^#/, "");
  const [path = "", query = ""] = hash.split("?", 2);
  return { path: path === "" ? "/" : path, query: new URLSearchParams(query) };
}

export function match<T>(routes: Route<T>[], path: string): Match<T> | null {
  const parts = path.split("/").filter((part) => part !== "");
  for (const route of routes) {
    const wanted = route.pattern.split("/").filter((part) => part !== "");
    if (wanted.length !== parts.length) {
      continue;
    }
    const params: Record<string, string> = {};
    let ok = true;
    wanted.forEach((segment, index) => {
      const actual = parts[index] ?? "";
      if (segment.startsWith(":")) {
        params[segment.slice(1)] = decodeURIComponent(actual);
      } else if (segment !== actual) {
        ok = false;
      }
    });
    if (ok) {
      return { target: route.target, params };
    }
  }
  return null;
}
