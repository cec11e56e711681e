-- Variables: JSON values that belong to a user and are shared by all of that user's events
-- (runtime helpers `get_variable` / `set_variable`, and the API). Values are sealed with
-- ENCRYPTION_KEY (AES-256-GCM).
CREATE TABLE variables (
    owner_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name           TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    sealed_value   BLOB NOT NULL,
    updated_at     INTEGER NOT NULL,
    -- The job whose script set it last (NULL: set through the API).
    updated_by_job TEXT,
    PRIMARY KEY (owner_id, name)
);

-- The highest helper write sequence number of the current attempt that was applied, so a write
-- the agent sends again after a reconnect is applied once. Reset when a new attempt is claimed.
ALTER TABLE jobs ADD COLUMN helper_seq INTEGER NOT NULL DEFAULT 0;
