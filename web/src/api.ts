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

/** An error answer of the API: its status, the message the API gave and the field at fault. */
export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly field: string | null;

  constructor(status: number, code: string, message: string, field: string | null = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

let csrfToken: string | null = null;
let onSessionLost: (() => void) | null = null;

/** Called when a request of a logged-in page is refused with 401 (the session ended). */
export function whenSessionLost(handler: () => void): void {
  onSessionLost = handler;
}

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
    if (response.status === 401 && !path.startsWith("/auth/")) {
      onSessionLost?.();
    }
    throw await errorFrom(response);
  }
  const text = await response.text();
  return (text === "" ? null : JSON.parse(text)) as T;
}

/** Turns an error answer into an ApiError with the API's own message when it has one. */
export async function errorFrom(response: Response): Promise<ApiError> {
  const text = await response.text().catch(() => "");
  try {
    const parsed = JSON.parse(text) as { error?: { code?: string; message?: string; field?: string } };
    if (parsed.error?.message !== undefined) {
      return new ApiError(response.status, parsed.error.code ?? "error", parsed.error.message, parsed.error.field ?? null);
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

/** The session's CSRF token, for requests made without `request` (streamed answers). */
export function csrfHeader(): Record<string, string> {
  return csrfToken === null ? {} : { "X-CSRF-Token": csrfToken };
}

/** A readable message for anything thrown. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

// ---- The console's resources (see control-plane/src/http/openapi.json) ----

export type Labels = Record<string, string>;
export type JobStatus = "queued" | "claimed" | "running" | "completed" | "failed" | "cancelled";
export type RunStatus = "queued" | "running" | "completed" | "failed" | "cancelled";
export type ScriptKind = "bash" | "python" | "nodejs";

export interface Targets {
  agents?: string[];
  labels?: Labels;
  servers?: string[];
  /** One job per run, run by any one agent carrying all these labels (alone: no agents, labels or servers). */
  pool?: Labels | null;
}

export interface Schedule {
  cron: string;
  timezone?: string;
  dst?: "skip" | "once" | "twice";
  misfire?: "skip" | "run_once";
  overlap?: "allow" | "forbid" | "queue";
}

export interface Limits {
  memory_mb?: number | null;
  cpus?: number | null;
  pids?: number | null;
}

/** The writable fields of an event (the body of POST /events and PATCH /events/{id}). */
export interface EventInput {
  name?: string;
  kind?: ScriptKind;
  script?: string;
  runtime?: "host" | "docker";
  image?: string | null;
  limits?: Limits;
  network?: "none" | "bridge";
  read_only?: boolean;
  user?: string | null;
  schedule?: Schedule | null;
  targets?: Targets;
  timeout_seconds?: number;
  retries?: number;
  /** Retry backoff; a PATCH merges the given fields. */
  retry?: Partial<RetryPolicy>;
  /** Jobs of the event claimed or running at once; null: unlimited. */
  max_concurrency?: number | null;
  /** The fan-out rollout; replaces the stored one whole. */
  rollout?: Rollout;
  env?: Record<string, string>;
  /** Write-only: a value sets or replaces a secret, null removes it. */
  secret_env?: Record<string, string | null>;
}

export interface CronEvent {
  id: string;
  owner_id: string;
  name: string;
  kind: ScriptKind;
  script: string;
  runtime: "host" | "docker";
  image?: string | null;
  limits?: Limits;
  network?: "none" | "bridge";
  read_only?: boolean;
  user?: string | null;
  targets: { agents: string[]; labels: Labels; servers: string[] };
  timeout_seconds: number;
  retries: number;
  retry?: RetryPolicy;
  max_concurrency?: number | null;
  rollout?: Rollout;
  env: Record<string, string>;
  secret_env_names?: string[];
  schedule: Schedule | null;
  next_run_at: string | null;
  created_at: string | null;
  updated_at: string | null;
}

export interface RetryPolicy {
  backoff_seconds: number;
  factor: number;
  max_backoff_seconds: number;
}

export interface Rollout {
  batch_size?: number;
  batch_percent?: number;
  max_failures?: number;
  min_success_percent?: number;
  offline?: "wait" | "skip";
  deadline_seconds?: number;
}

export interface FireTime {
  local: string;
  utc: string;
}

export interface Job {
  id: string;
  run_id: string;
  event_id: string;
  agent_id: string | null;
  server_id: string | null;
  status: JobStatus;
  attempt: number;
  max_attempts: number;
  exit_code: number | null;
  reason: string | null;
  /** The log's last 64 KiB (absent when asked without output). */
  output?: string;
  output_truncated?: boolean;
  log_bytes: number;
  result?: unknown;
  cancel_requested: boolean;
  queued_at: string | null;
  started_at: string | null;
  finished_at: string | null;
  /** Its batch in the run's rollout (0: the first). */
  batch?: number;
  /** A queued retry is not claimed before this time. */
  not_before?: string | null;
  /** The previous failed attempt of a retried job. */
  last_failure?: { attempt: number; reason: string | null; exit_code: number | null; finished_at: string; output_tail: string } | null;
}

/** Where a run's rollout is (`GET /runs/{id}`). */
export interface RunRollout {
  policy: Record<string, unknown>;
  batch_size: number | null;
  batches: number;
  current_batch: number | null;
  stopped: boolean;
  stopped_reason: string | null;
  stopped_at: string | null;
}

export interface RunCounts {
  queued: number;
  running: number;
  completed: number;
  failed: number;
  cancelled: number;
}

export interface Run {
  id: string;
  event_id: string;
  status: RunStatus;
  input?: unknown;
  created_at: string | null;
  trigger: "manual" | "schedule";
  counts: RunCounts;
  jobs: Job[];
  rollout?: RunRollout | null;
  retry_of?: string | null;
}

/** `POST /runs/{id}/retry`: a new run, linked to this one, on its failed (and not started) hosts. */
export function retryRun(runId: string, only: "failed" | "failed_and_not_started"): Promise<{ run_id: string }> {
  return request("POST", `/runs/${encodeURIComponent(runId)}/retry`, { only });
}

/** A run as `GET /runs` lists it: its jobs without their output. */
export interface RunSummary {
  id: string;
  event_id: string;
  event_name: string;
  status: RunStatus;
  created_at: string | null;
  finished_at: string | null;
  trigger: "manual" | "schedule";
  counts: RunCounts;
  jobs: Array<Pick<Job, "id" | "agent_id" | "server_id" | "status" | "attempt" | "exit_code" | "reason" | "started_at" | "finished_at">>;
}

export interface Server {
  id: string;
  owner_id: string;
  name: string;
  address: string;
  labels: Labels;
  connection: "agent" | "ssh";
  agent_id: string | null;
  ssh: { host: string; port: number; username: string; auth: "key" | "password"; host_key: string | null } | null;
  created_at: string;
}

export interface ServerInput {
  name: string;
  address?: string;
  labels?: Labels;
  connection: "agent" | "ssh";
  agent_id?: string;
  ssh?: {
    host: string;
    port?: number;
    username: string;
    auth: "key" | "password";
    private_key?: string;
    passphrase?: string;
    password?: string;
  };
}

export interface EnrollmentToken {
  token: string;
  install_command: string;
  enroll_command?: string;
  ca_sha256: string;
  expires_at: string | null;
}

/** One line of `POST /servers/{id}/install-agent`'s progress. */
export interface InstallProgress {
  type: "step" | "output" | "done" | "failed";
  step?: string;
  message?: string;
  stream?: string;
  line?: string;
  agent_id?: string;
  agent_name?: string;
}

const id = encodeURIComponent;

export const listEvents = (): Promise<CronEvent[]> => request("GET", "/events");
export const fetchEvent = (eventId: string): Promise<CronEvent> => request("GET", `/events/${id(eventId)}`);
export const createEvent = (body: EventInput): Promise<CronEvent> => request("POST", "/events", body);
export const updateEvent = (eventId: string, body: EventInput): Promise<CronEvent> =>
  request("PATCH", `/events/${id(eventId)}`, body);
export const deleteEvent = (eventId: string): Promise<null> => request("DELETE", `/events/${id(eventId)}`);
export const triggerRun = (
  eventId: string,
  input: unknown,
): Promise<{ run_id: string; jobs: Array<{ id: string; agent_id?: string | null }> }> =>
  request("POST", `/events/${id(eventId)}/runs`, input === undefined ? {} : { input });
export const previewSchedule = (schedule: { cron: string; timezone: string; count: number }): Promise<{
  fire_times: FireTime[];
}> => request("POST", "/schedules/preview", schedule);

export function listRuns(filters: { status?: RunStatus; event_id?: string; limit?: number } = {}): Promise<RunSummary[]> {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) {
    if (value !== undefined && value !== "") {
      query.set(key, String(value));
    }
  }
  const text = query.toString();
  return request("GET", `/runs${text === "" ? "" : `?${text}`}`);
}
/** A run; `withOutput: false` leaves the jobs' output out (for polling statuses). */
export const fetchRun = (runId: string, withOutput = true): Promise<Run> =>
  request("GET", `/runs/${id(runId)}${withOutput ? "" : "?output=false"}`);
export const fetchJob = (jobId: string): Promise<Job> => request("GET", `/jobs/${id(jobId)}`);
export const cancelJob = (jobId: string): Promise<Job> => request("POST", `/jobs/${id(jobId)}/cancel`);
/** `GET /runs/{id}/events`: the run's summary (`run`), each job's state change (`job`), then `end`. */
export const runEventsUrl = (runId: string): string => `${API_BASE}/runs/${id(runId)}/events`;
export const jobLogUrl = (jobId: string, follow: boolean, from = 0): string =>
  `${API_BASE}/jobs/${id(jobId)}/logs${follow ? `?follow=true&from=${from}` : ""}`;

export const listServers = (): Promise<Server[]> => request("GET", "/servers");
export const createServer = (body: ServerInput): Promise<Server> => request("POST", "/servers", body);
export const deleteServer = (serverId: string): Promise<null> => request("DELETE", `/servers/${id(serverId)}`);
export const createEnrollmentToken = (body: { labels?: Labels; uses?: number; ttl_seconds?: number }): Promise<EnrollmentToken> =>
  request("POST", "/enrollment-tokens", body);

/**
 * Installs the agent on an SSH server: calls `onLine` with each progress line as it arrives and
 * resolves with the last one (`done` or `failed`).
 */
export interface InstallOptions {
  /** systemd (a hardened unit; needs root or passwordless sudo) or detached (no systemd). */
  service?: "systemd" | "detached";
  /** Install under this absolute path instead of /usr/local. */
  prefix?: string;
}

export async function installAgent(
  serverId: string,
  options: InstallOptions,
  onLine: (line: InstallProgress) => void,
): Promise<InstallProgress> {
  let response: Response;
  try {
    response = await fetch(`${API_BASE}/servers/${id(serverId)}/install-agent`, {
      method: "POST",
      headers: { Accept: "application/x-ndjson", "Content-Type": "application/json", ...csrfHeader() },
      credentials: "same-origin",
      body: JSON.stringify(options),
    });
  } catch (error) {
    throw new ApiError(0, "network", `the control plane cannot be reached (${String(error)})`);
  }
  if (!response.ok || response.body === null) {
    throw await errorFrom(response);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  let last: InstallProgress = { type: "failed", message: "the install stream ended without a result" };
  for (;;) {
    const { value, done } = await reader.read();
    if (value !== undefined) {
      buffered += value;
    }
    let newline = buffered.indexOf("\n");
    while (newline >= 0 || (done && buffered.trim() !== "")) {
      const line = newline >= 0 ? buffered.slice(0, newline) : buffered;
      buffered = newline >= 0 ? buffered.slice(newline + 1) : "";
      if (line.trim() !== "") {
        const parsed = JSON.parse(line) as InstallProgress;
        onLine(parsed);
        if (parsed.type === "done" || parsed.type === "failed") {
          last = parsed;
        }
      }
      newline = buffered.indexOf("\n");
    }
    if (done) {
      return last;
    }
  }
}
