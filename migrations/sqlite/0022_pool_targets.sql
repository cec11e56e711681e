-- Pool targets: an event's `targets.pool` (a label selector) runs ONE job per run that any
-- agent matching the labels may claim.
--
-- `jobs.pool` marks such a job. While it is queued it has no agent (so its generated `runner`
-- is NULL and no runner's claim selects it by runner); `job_candidates` lists the agents whose
-- labels matched when the run was created (online or not), and any of them may claim it. The
-- claim binds the job to the claiming agent (`agent_id` set, so output, results and leases work
-- as for any agent job); when the attempt is re-queued (lease expired, or a failed attempt with
-- attempts left) `agent_id` is cleared again and the job is back in the pool.
--
-- A column and a table are added; `jobs` is not rebuilt.

ALTER TABLE jobs ADD COLUMN pool INTEGER NOT NULL DEFAULT 0 CHECK (pool IN (0, 1));

CREATE TABLE job_candidates (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, agent_id)
) WITHOUT ROWID;

-- A claim looks up the pool jobs an agent is a candidate for.
CREATE INDEX job_candidates_agent ON job_candidates (agent_id, job_id);
