-- no-transaction
-- Email tools: `tools.kind` may now be 'email' (SMTP; the sealed configuration holds the host,
-- port, security, credentials and addresses, and `target_host` is the server's `host:port`).
--
-- SQLite cannot alter a CHECK constraint: the table is rebuilt (the documented 12-step
-- procedure, hence `no-transaction` above: foreign keys must be off while the old table is
-- dropped, or the drop would set `notifications.tool_id` to NULL through ON DELETE SET NULL).
-- `tools` has no index or trigger besides its UNIQUE (owner_id, name), which is recreated with
-- the table; `notifications.tool_id` refers to it by name and keeps pointing at the new table.

PRAGMA foreign_keys = OFF;

BEGIN;

CREATE TABLE tools_new (
    id          TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('slack', 'discord', 'webhook', 'email')),
    config      BLOB NOT NULL,
    target_host TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (owner_id, name)
);

INSERT INTO tools_new (id, owner_id, name, kind, config, target_host, created_at, updated_at)
SELECT id, owner_id, name, kind, config, target_host, created_at, updated_at
FROM tools;

DROP TABLE tools;
ALTER TABLE tools_new RENAME TO tools;

COMMIT;

PRAGMA foreign_keys = ON;
