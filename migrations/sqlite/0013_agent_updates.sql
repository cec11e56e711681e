-- Agent self-update: the desired agent version (one policy for the fleet, optionally narrowed
-- to agents carrying every one of `labels`, staged to `percentage` of them by a stable hash of
-- the agent id), and per agent the last update announced to it and what the agent reported.

CREATE TABLE agent_update_policy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    percentage INTEGER NOT NULL CHECK (percentage BETWEEN 0 AND 100),
    updated_by TEXT,
    updated_at INTEGER NOT NULL
);

ALTER TABLE agents ADD COLUMN update_target TEXT;
ALTER TABLE agents ADD COLUMN update_state TEXT CHECK (update_state IN
    ('pending', 'downloading', 'verifying', 'restarting', 'succeeded', 'failed', 'rolled_back'));
ALTER TABLE agents ADD COLUMN update_reason TEXT;
ALTER TABLE agents ADD COLUMN update_at INTEGER;
