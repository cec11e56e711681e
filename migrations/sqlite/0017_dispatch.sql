-- Dispatch policies (issue 7, items 2 and 6): retries with backoff, a concurrency limit per
-- event, and rolling fan-out batches with stop conditions and an offline-host policy.
--
-- The policy of an event lives in a table of its own (one row per event; no row: the defaults,
-- 5 s initial backoff ×2 up to 300 s, no concurrency limit, every host at once). A run copies
-- the rollout it was created with (the event's, merged with the trigger's override) and each job
-- copies its backoff, so editing the event later does not change an accepted run.
--
-- Job statuses are unchanged: a host skipped because it was offline, or not started because the
-- rollout stopped, is `cancelled` (reason `cancelled`) and `skip_reason` says why; the API shows
-- `skip_reason` as the job's reason.

CREATE TABLE event_dispatch (
    event_id        TEXT PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    backoff_ms      INTEGER NOT NULL CHECK (backoff_ms >= 0),
    backoff_factor  REAL NOT NULL CHECK (backoff_factor >= 1),
    max_backoff_ms  INTEGER NOT NULL CHECK (max_backoff_ms >= backoff_ms),
    -- NULL: unlimited.
    max_concurrency INTEGER CHECK (max_concurrency IS NULL OR max_concurrency >= 1),
    -- JSON of the rollout policy; NULL: every host at once, never stopped, offline hosts wait.
    rollout         TEXT
);

-- The run this one retries (`POST /runs/{id}/retry`).
ALTER TABLE runs ADD COLUMN retry_of TEXT REFERENCES runs (id) ON DELETE SET NULL;
-- JSON of the rollout the run was created with (NULL: none).
ALTER TABLE runs ADD COLUMN rollout TEXT;
-- Hosts per batch (NULL: one batch).
ALTER TABLE runs ADD COLUMN batch_size INTEGER;
-- Set once when a stop condition tripped: why, and when.
ALTER TABLE runs ADD COLUMN stopped_reason TEXT;
ALTER TABLE runs ADD COLUMN stopped_at INTEGER;

-- A queued job is not claimed before `not_before` (ms; NULL: at once).
ALTER TABLE jobs ADD COLUMN not_before INTEGER;
-- The job's batch in its run's rollout: claimable once every job of a lower batch is final.
ALTER TABLE jobs ADD COLUMN batch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN skip_reason TEXT CHECK (skip_reason IS NULL OR skip_reason IN ('rollout_stopped', 'offline'));
-- The backoff copied from the event when the run was created.
ALTER TABLE jobs ADD COLUMN backoff_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN backoff_factor REAL NOT NULL DEFAULT 2;
ALTER TABLE jobs ADD COLUMN max_backoff_ms INTEGER NOT NULL DEFAULT 0;
-- JSON of the previous failed attempt (attempt, reason, exit code, finish time, output tail):
-- its log is replaced by the next attempt's.
ALTER TABLE jobs ADD COLUMN last_failure TEXT;
-- How long (ms) the job waits for its offline agent once its batch started before it is skipped
-- (0: skipped at once; NULL: waits for ever).
ALTER TABLE jobs ADD COLUMN offline_wait_ms INTEGER;

CREATE INDEX jobs_due ON jobs (not_before) WHERE status = 'queued' AND not_before IS NOT NULL;
CREATE INDEX jobs_event_status ON jobs (event_id, status);
CREATE INDEX jobs_offline_wait ON jobs (run_id) WHERE status = 'queued' AND offline_wait_ms IS NOT NULL;
