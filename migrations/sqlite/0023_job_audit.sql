-- A job's audit trail: `GET /jobs/{id}/audit` lists the audit entries whose detail names the job
-- (leases that ran out, stale results and attempts refused, stale helper writes, notifications
-- skipped). The entries are written as before; this index finds them by `detail`'s `job_id`
-- without reading the whole log. Only entries that name a job are indexed.

CREATE INDEX audit_log_job ON audit_log (json_extract(detail, '$.job_id'), id)
    WHERE json_extract(detail, '$.job_id') IS NOT NULL;
