-- no-transaction
-- HTTP request and tool action events.
--
-- Events: `http` is the JSON of an `http_request` event's request (method, url, headers, body,
-- expected statuses, timeout, redirects; header values and the body may hold `{{secret:NAME}}`
-- placeholders, resolved from the event's secret env when a job runs, never stored resolved);
-- `tool_action` the JSON of a `tool_action` event's action (tool id, title, message);
-- `executor` who runs an `http_request` event's jobs: its target agents (`agent`) or the control
-- plane itself (`control_plane`); `tool_action` jobs are always run by the control plane.
--
-- Jobs: `kind` may now be 'http_request' or 'tool_action'; new failure reasons `http_status`
-- (the answer's status was not an expected one), `http_error` (the request failed: DNS, connect,
-- TLS, reading the answer) and `delivery` (a tool action was not delivered); `on_control_plane`
-- marks jobs the control plane claims and runs itself: their runner key is 'control-plane'
-- (agent ids are UUIDs and SSH runners start with 'ssh:', so the keys never collide). A job run
-- by the control plane has neither an agent nor a server. A job's `runtime_spec` holds what it
-- does: for `http_request` the JSON of the wire's `RuntimeSpec::Http`, for `tool_action` the
-- event's `tool_action` JSON (copied at trigger time, like the script of a script job).
--
-- SQLite cannot alter a CHECK constraint or a generated column: `jobs` is rebuilt (the
-- documented 12-step procedure, hence `no-transaction` above: foreign keys must be off while the
-- old table is dropped, or the drop would cascade to `job_logs` and `job_secret_env`).
-- A later migration that rebuilds `jobs` again must carry these columns and checks forward.

PRAGMA foreign_keys = OFF;

BEGIN;

ALTER TABLE events ADD COLUMN http TEXT;
ALTER TABLE events ADD COLUMN tool_action TEXT;
ALTER TABLE events ADD COLUMN executor TEXT NOT NULL DEFAULT 'agent' CHECK (executor IN ('agent', 'control_plane'));

CREATE TABLE jobs_new (
    id               TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    event_id         TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    agent_id         TEXT REFERENCES agents (id),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'claimed', 'running', 'completed', 'failed', 'cancelled')),
    reason           TEXT CHECK (reason IN ('exit_code', 'timeout', 'lost', 'spawn', 'signal', 'oom', 'cancelled', 'revoked',
                                            'http_status', 'http_error', 'delivery')),
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    kind             TEXT NOT NULL CHECK (kind IN ('bash', 'python', 'nodejs', 'http_request', 'tool_action')),
    script           TEXT NOT NULL,
    env              TEXT NOT NULL DEFAULT '{}',
    input            TEXT,
    timeout_seconds  INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    settled_by       TEXT CHECK (settled_by IN ('agent', 'lease', 'revoke', 'api')),
    exit_code        INTEGER,
    result           TEXT,
    log_len          INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    queued_at        INTEGER NOT NULL,
    claimed_at       INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER,
    runtime_spec     TEXT,
    condition        INTEGER CHECK (condition IS NULL OR condition IN (0, 1)),
    helper_seq       INTEGER NOT NULL DEFAULT 0,
    server_id        TEXT REFERENCES servers (id) ON DELETE SET NULL,
    on_control_plane INTEGER NOT NULL DEFAULT 0 CHECK (on_control_plane IN (0, 1)),
    runner           TEXT GENERATED ALWAYS AS (
                         CASE WHEN on_control_plane = 1 THEN 'control-plane'
                              ELSE COALESCE(agent_id, 'ssh:' || server_id) END) VIRTUAL,
    CHECK (agent_id IS NULL OR server_id IS NULL),
    CHECK (on_control_plane = 0 OR (agent_id IS NULL AND server_id IS NULL))
);

INSERT INTO jobs_new (id, run_id, event_id, agent_id, status, reason, attempt, max_attempts, kind, script, env, input,
                      timeout_seconds, cancel_requested, settled_by, exit_code, result, log_len, lease_expires_at,
                      queued_at, claimed_at, started_at, finished_at, runtime_spec, condition, helper_seq, server_id)
SELECT id, run_id, event_id, agent_id, status, reason, attempt, max_attempts, kind, script, env, input,
       timeout_seconds, cancel_requested, settled_by, exit_code, result, log_len, lease_expires_at,
       queued_at, claimed_at, started_at, finished_at, runtime_spec, condition, helper_seq, server_id
FROM jobs;

DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;

CREATE INDEX jobs_claim ON jobs (runner, status, queued_at);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_run ON jobs (run_id);

COMMIT;

PRAGMA foreign_keys = ON;
