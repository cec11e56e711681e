-- The order a claim reads its candidates in (`store::claim_pg`): the runner's own queued jobs
-- and the queued pool jobs, each oldest first, as two small indexes holding the queued jobs
-- only. A claim walks them in order and stops at its limit, and the planner takes that walk even
-- with stale statistics: after a quiet time they say no job is queued, and for the burst of jobs
-- that followed PostgreSQL read every queued job through `jobs_lease` and sorted them, for every
-- claim, until autovacuum analyzed the table again.
CREATE INDEX jobs_queued_own ON jobs (runner, queued_at, id) WHERE status = 'queued';
CREATE INDEX jobs_queued_pool ON jobs (queued_at, id) WHERE status = 'queued' AND runner IS NULL AND pool = 1;
