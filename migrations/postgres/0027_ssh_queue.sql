-- The SSH fallback jobs by status, oldest first, for the SSH worker's look at its queue
-- (`Store::claim_ssh_job`). Without it the look walked every queued job, the agents' backlog
-- included, to find the few with a server and no agent: ~1.5 ms with 5,000 pool jobs queued on
-- PostgreSQL, at every run created. Keyed by status rather than partial on it, so that the
-- look walks it in order even when stale statistics say no job is queued. The same index on
-- both databases.
CREATE INDEX jobs_ssh ON jobs (status, queued_at, id) WHERE server_id IS NOT NULL;
