-- The twin of migrations/postgres/0026_claim_order.sql, which adds two partial indexes for
-- PostgreSQL's claims (their candidates read in order even with stale statistics). SQLite's
-- claims (`store::claim_batch`, one writer) plan from `jobs_claim` and its own statistics,
-- and its schema keeps the version number only.
SELECT 1;
