-- Secret environment variables of events: write-only, each value sealed with ENCRYPTION_KEY
-- (AES-256-GCM, nonce || ciphertext+tag). The API shows the names only.
CREATE TABLE event_secret_env (
    event_id     TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    sealed_value BLOB NOT NULL,
    PRIMARY KEY (event_id, name)
) WITHOUT ROWID;

-- The event's secret environment copied (still sealed) into each job when its run is created,
-- like `jobs.env`, so editing the event later does not change what an accepted job runs.
CREATE TABLE job_secret_env (
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    sealed_value BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
