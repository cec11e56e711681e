// The console's client of the public HTTP API (under /api/v1). It uses the session cookie set by
// `POST /auth/login`; state-changing requests carry the session's CSRF token, which login and
// `GET /auth/me` hand out.

export const API_BASE = "/api/v1";

/** The caller, as `GET /auth/me` and `POST /auth/login` describe them. */
export interface User {
  id: string;
  username: string;
  role: "admin" | "user" | "viewer";
}

/** An agent, as `GET /agents` lists them. */
export interface Agent {
  id: string;
  name: string;
  labels: Record<string, string>;
  status: "online" | "offline";
  version: string | null;
  hostname: string | null;
  last_seen_at: string | null;
}

/** An error answer of the API: its status and the message the API gave. */
export class ApiError extends Error {
  readonly status: number;
  readonly code: string;

  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

let csrfToken: string | null = null;

/**
 * Calls the API and returns the decoded JSON body (null for an empty one).
 * Throws an ApiError carrying the API's message for any non-2xx answer.
 */
export async function request<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  if (method !== "GET" && method !== "HEAD" && csrfToken !== null) {
    headers["X-CSRF-Token"] = csrfToken;
  }
  let response: Response;
  try {
    response = await fetch(API_BASE + path, {
      method,
      headers,
      credentials: "same-origin",
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
  } catch (error) {
    throw new ApiError(0, "network", `the control plane cannot be reached (${String(error)})`);
  }
  if (!response.ok) {
    throw await errorFrom(response);
  }
  const text = await response.text();
  return (text === "" ? null : JSON.parse(text)) as T;
}

/** Turns an error answer into an ApiError with the API's own message when it has one. */
export async function errorFrom(response: Response): Promise<ApiError> {
  const text = await response.text().catch(() => "");
  try {
    const parsed = JSON.parse(text) as { error?: { code?: string; message?: string } };
    if (parsed.error?.message !== undefined) {
      return new ApiError(response.status, parsed.error.code ?? "error", parsed.error.message);
    }
  } catch {
    // Not JSON: fall through to a message made from the status.
  }
  const detail = text.trim().slice(0, 200);
  return new ApiError(
    response.status,
    "http",
    `HTTP ${response.status} ${response.statusText}${detail === "" ? "" : `: ${detail}`}`,
  );
}

/** The caller, or null when nobody is logged in. */
export async function currentUser(): Promise<User | null> {
  try {
    const me = await request<User & { csrf_token?: string | null }>("GET", "/auth/me");
    csrfToken = me.csrf_token ?? null;
    return { id: me.id, username: me.username, role: me.role };
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      return null;
    }
    throw error;
  }
}

export async function login(username: string, password: string): Promise<User> {
  const answer = await request<{ csrf_token: string; user: User }>("POST", "/auth/login", {
    username,
    password,
  });
  csrfToken = answer.csrf_token;
  return answer.user;
}

export async function logout(): Promise<void> {
  await request<null>("POST", "/auth/logout");
  csrfToken = null;
}

export function listAgents(): Promise<Agent[]> {
  return request<Agent[]>("GET", "/agents");
}

export function fetchAgent(id: string): Promise<Agent> {
  return request<Agent>("GET", `/agents/${encodeURIComponent(id)}`);
}

/** A readable message for anything thrown. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
