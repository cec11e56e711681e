-- The PostgreSQL twin of migrations/sqlite/0023_job_audit.sql: a job's audit trail found by
-- the `job_id` of the entries' JSON detail (kept as text, as on SQLite). The expression is the
-- one `store::Backend::json_text` writes for PostgreSQL, so the index serves the lookup.

CREATE INDEX audit_log_job ON audit_log (((detail)::jsonb ->> 'job_id'), id)
    WHERE ((detail)::jsonb ->> 'job_id') IS NOT NULL;
