-- Foundation schema: users and credentials, agents and enrollment, events, runs, jobs, logs, audit.
-- Times are INTEGER milliseconds since the Unix epoch. Enumerations are TEXT with CHECK constraints.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'user', 'viewer')),
    created_at    INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_sha256 TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);

CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_sha256 TEXT NOT NULL UNIQUE,
    csrf_token   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);

-- A value encrypted with ENCRYPTION_KEY at first start; decrypting it proves the key is right.
CREATE TABLE key_check (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE enrollment_tokens (
    id           TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    labels       TEXT NOT NULL DEFAULT '{}',
    uses_left    INTEGER NOT NULL CHECK (uses_left >= 0),
    expires_at   INTEGER NOT NULL,
    created_by   TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at   INTEGER NOT NULL
);

CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '{}',
    cert_sha256  TEXT NOT NULL UNIQUE,
    version      TEXT,
    hostname     TEXT,
    os           TEXT,
    arch         TEXT,
    last_seen_at INTEGER,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE UNIQUE INDEX agents_active_name ON agents (name) WHERE revoked_at IS NULL;

CREATE TABLE events (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES users (id),
    name            TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('bash', 'python', 'nodejs', 'http_request', 'tool_action')),
    script          TEXT NOT NULL DEFAULT '',
    runtime         TEXT NOT NULL CHECK (runtime IN ('host', 'docker')),
    targets         TEXT NOT NULL DEFAULT '{}',
    timeout_seconds INTEGER NOT NULL CHECK (timeout_seconds >= 0),
    retries         INTEGER NOT NULL CHECK (retries >= 0),
    env             TEXT NOT NULL DEFAULT '{}',
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_owner_name ON events (owner_id, name);

CREATE TABLE runs (
    id         TEXT PRIMARY KEY,
    event_id   TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    input      TEXT,
    created_by TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX runs_event ON runs (event_id, created_at);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    event_id         TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    agent_id         TEXT NOT NULL REFERENCES agents (id),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'claimed', 'running', 'completed', 'failed', 'cancelled')),
    reason           TEXT CHECK (reason IN ('exit_code', 'timeout', 'lost', 'spawn', 'signal', 'oom', 'cancelled', 'revoked')),
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    kind             TEXT NOT NULL CHECK (kind IN ('bash', 'python', 'nodejs')),
    script           TEXT NOT NULL,
    env              TEXT NOT NULL DEFAULT '{}',
    input            TEXT,
    timeout_seconds  INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    -- Who set the final status: the agent's own result, lease expiry, revocation, or the API.
    settled_by       TEXT CHECK (settled_by IN ('agent', 'lease', 'revoke', 'api')),
    exit_code        INTEGER,
    result           TEXT,
    log_len          INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    queued_at        INTEGER NOT NULL,
    claimed_at       INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER
);
CREATE INDEX jobs_claim ON jobs (agent_id, status, queued_at);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_run ON jobs (run_id);

-- The combined output of a job's current attempt, in chunks at byte offsets.
CREATE TABLE job_logs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    offset INTEGER NOT NULL,
    stream TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    data   BLOB NOT NULL,
    PRIMARY KEY (job_id, offset)
) WITHOUT ROWID;

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    actor  TEXT,
    detail TEXT NOT NULL
);
