-- Terminals: which users may open a terminal on which agent, the terminal sessions opened through
-- the control plane, and the per-agent opt-in for recording them.

-- USERs may open terminals only on agents granted to them (ADMINs on every agent).
CREATE TABLE agent_grants (
    agent_id   TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    granted_at INTEGER NOT NULL,
    granted_by TEXT REFERENCES users (id) ON DELETE SET NULL,
    PRIMARY KEY (agent_id, user_id)
);
CREATE INDEX agent_grants_user ON agent_grants (user_id);

-- One row per session; `id` is the agent's session id (128 random bits, hex). Open while
-- `closed_at` is NULL. `recording` is the asciicast file's path when the session is recorded.
CREATE TABLE terminal_sessions (
    id         TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    opened_at  INTEGER NOT NULL,
    closed_at  INTEGER,
    exit_code  INTEGER,
    recording  TEXT
);
CREATE INDEX terminal_sessions_open ON terminal_sessions (agent_id) WHERE closed_at IS NULL;
CREATE INDEX terminal_sessions_user ON terminal_sessions (user_id, opened_at);

-- Terminal sessions on this agent are recorded when the control plane runs with
-- --terminal-recording.
ALTER TABLE agents ADD COLUMN record_terminals INTEGER NOT NULL DEFAULT 0 CHECK (record_terminals IN (0, 1));
