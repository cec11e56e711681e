-- Workflows: a DAG of events (nodes joined by edges), its triggers, and its runs with the
-- durable state of every node.
--
-- A node's run is created at most once: a node row is keyed by (workflow run, node id), moves
-- from 'pending' to 'running' only in the transaction that creates its run, and its run_id is
-- UNIQUE.

CREATE TABLE workflows (
    id                    TEXT PRIMARY KEY,
    owner_id              TEXT NOT NULL REFERENCES users (id),
    name                  TEXT NOT NULL,
    -- JSON {"nodes": [...], "edges": [...]}, validated on save.
    definition            TEXT NOT NULL,
    trigger_manual        INTEGER NOT NULL DEFAULT 1,
    schedule_cron         TEXT,
    schedule_timezone     TEXT,
    -- The next schedule slot (ms since the epoch) not handled yet; NULL without a schedule.
    next_run_at           INTEGER,
    -- The webhook's HMAC key, sealed with ENCRYPTION_KEY; NULL: no webhook trigger.
    webhook_secret_sealed BLOB,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
);
CREATE UNIQUE INDEX workflows_owner_name ON workflows (owner_id, name);
CREATE INDEX workflows_next_run ON workflows (next_run_at) WHERE next_run_at IS NOT NULL;

CREATE TABLE workflow_runs (
    id          TEXT PRIMARY KEY,
    workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    -- The definition as it was when the run was triggered (later edits do not change a run).
    definition  TEXT NOT NULL,
    input       TEXT,
    trigger     TEXT NOT NULL CHECK (trigger IN ('manual', 'schedule', 'webhook')),
    slot_at     INTEGER,
    status      TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    created_by  TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX workflow_runs_workflow ON workflow_runs (workflow_id, created_at);
CREATE INDEX workflow_runs_active ON workflow_runs (status) WHERE status = 'running';

CREATE TABLE workflow_run_nodes (
    workflow_run_id TEXT NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    node_id         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'completed', 'failed', 'skipped')),
    run_id          TEXT UNIQUE REFERENCES runs (id) ON DELETE SET NULL,
    input           TEXT,
    result          TEXT,
    -- 1/0 when every job of the node's run set this condition (set_condition), else NULL.
    condition       INTEGER,
    reason          TEXT,
    started_at      INTEGER,
    finished_at     INTEGER,
    PRIMARY KEY (workflow_run_id, node_id)
);
CREATE INDEX workflow_run_nodes_running ON workflow_run_nodes (state) WHERE state = 'running';

-- One row per handled schedule slot of a workflow, written in the transaction that creates the
-- slot's workflow run: each slot fires at most once.
CREATE TABLE workflow_fires (
    workflow_id     TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    slot_at         INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('fired', 'missed')),
    workflow_run_id TEXT REFERENCES workflow_runs (id) ON DELETE SET NULL,
    handled_at      INTEGER NOT NULL,
    UNIQUE (workflow_id, slot_at)
);
