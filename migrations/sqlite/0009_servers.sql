-- no-transaction
-- Servers (hosts) and SSH fallback jobs.
--
-- A server is reached either through its agent (`connection = 'agent'`) or by the control plane
-- itself over SSH (`connection = 'ssh'`). The SSH credentials (private key, passphrase, password)
-- are one JSON document sealed with ENCRYPTION_KEY (AES-256-GCM), never returned by the API.
-- `host_key` is the pinned OpenSSH public key line of the server: given up front or recorded on
-- first use; a different key is refused afterwards.
--
-- A job now runs either on an agent (`agent_id`) or on an SSH server (`server_id`), so
-- `jobs.agent_id` becomes nullable. SQLite cannot drop a NOT NULL constraint in place: the table
-- is rebuilt (the documented 12-step procedure, hence `no-transaction` above: foreign keys must
-- be off while the old table is dropped, or the drop would cascade to `job_logs`).
-- `runner` names who may move a job forward: the agent's id, or `ssh:<server id>`.

PRAGMA foreign_keys = OFF;

BEGIN;

CREATE TABLE servers (
    id          TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    address     TEXT NOT NULL,
    labels      TEXT NOT NULL DEFAULT '{}',
    connection  TEXT NOT NULL CHECK (connection IN ('agent', 'ssh')),
    agent_id    TEXT REFERENCES agents (id) ON DELETE SET NULL,
    ssh_host    TEXT,
    ssh_port    INTEGER CHECK (ssh_port IS NULL OR (ssh_port >= 1 AND ssh_port <= 65535)),
    ssh_user    TEXT,
    ssh_auth    TEXT CHECK (ssh_auth IS NULL OR ssh_auth IN ('key', 'password')),
    ssh_secrets BLOB,
    host_key    TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CHECK (connection = 'agent' OR (ssh_host IS NOT NULL AND ssh_port IS NOT NULL AND ssh_user IS NOT NULL
                                    AND ssh_auth IS NOT NULL AND ssh_secrets IS NOT NULL))
);
CREATE UNIQUE INDEX servers_owner_name ON servers (owner_id, name);

CREATE TABLE jobs_new (
    id               TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    event_id         TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    agent_id         TEXT REFERENCES agents (id),
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
    -- Deleting a server leaves its past jobs (and their logs) in place.
    server_id        TEXT REFERENCES servers (id) ON DELETE SET NULL,
    runner           TEXT GENERATED ALWAYS AS (COALESCE(agent_id, 'ssh:' || server_id)) VIRTUAL,
    CHECK (agent_id IS NULL OR server_id IS NULL)
);

INSERT INTO jobs_new (id, run_id, event_id, agent_id, status, reason, attempt, max_attempts, kind, script, env, input,
                      timeout_seconds, cancel_requested, settled_by, exit_code, result, log_len, lease_expires_at,
                      queued_at, claimed_at, started_at, finished_at, runtime_spec, condition, helper_seq)
SELECT id, run_id, event_id, agent_id, status, reason, attempt, max_attempts, kind, script, env, input,
       timeout_seconds, cancel_requested, settled_by, exit_code, result, log_len, lease_expires_at,
       queued_at, claimed_at, started_at, finished_at, runtime_spec, condition, helper_seq
FROM jobs;

DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;

CREATE INDEX jobs_claim ON jobs (runner, status, queued_at);
CREATE INDEX jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_run ON jobs (run_id);

COMMIT;

PRAGMA foreign_keys = ON;
