-- The PostgreSQL twin of migrations/sqlite/0022_pool_targets.sql (pool targets): `jobs.pool` marks the
-- one job of a `targets.pool` run, `job_candidates` lists the agents that may claim it. See the
-- SQLite migration for the meaning; the schema is the same on both backends.

ALTER TABLE jobs ADD COLUMN pool BIGINT NOT NULL DEFAULT 0 CHECK (pool IN (0, 1));

CREATE TABLE job_candidates (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, agent_id)
);

-- A claim looks up the pool jobs an agent is a candidate for.
CREATE INDEX job_candidates_agent ON job_candidates (agent_id, job_id);
