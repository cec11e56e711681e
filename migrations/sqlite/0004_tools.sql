-- Tools (Slack, Discord, generic webhooks) and the notification outbox.
-- A tool's whole configuration (URL, headers, signing secret) is one JSON document sealed with
-- ENCRYPTION_KEY (AES-256-GCM); only the URL's host is kept in the clear, as a hint for lists.

CREATE TABLE tools (
    id          TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('slack', 'discord', 'webhook')),
    config      BLOB NOT NULL,
    target_host TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (owner_id, name)
);

-- The outbox: a row stays 'pending' until a delivery succeeded ('sent') or was given up
-- ('failed'). A claim by the dispatcher counts the attempt and pushes next_attempt_at forward by
-- a lease, so a delivery interrupted by a crash is retried once the lease ends (at least once).
CREATE TABLE notifications (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- NULL once the tool is deleted; tool_name keeps what it was called.
    tool_id         TEXT REFERENCES tools (id) ON DELETE SET NULL,
    tool_name       TEXT NOT NULL,
    title           TEXT,
    message         TEXT NOT NULL,
    -- The job whose script sent it, if any (informational: jobs may be deleted).
    source_job_id   TEXT,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);
CREATE INDEX notifications_owner ON notifications (owner_id, created_at);
