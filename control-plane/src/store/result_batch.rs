//! Results of many attempts recorded in one write operation (`batch` says how requests are
//! batched).
//!
//! The common case is the current attempt of a claimed or running job ending with its log
//! complete, for good (not a failure with attempts left). For a whole batch of those it takes one
//! read of every job (with its event's notification settings and its run's rollout; on
//! PostgreSQL the rows are locked, as the single writer serializes them on SQLite), one
//! multi-row `INSERT` of every last log chunk and one multi-row `UPDATE` (a `VALUES` list joined
//! to `jobs`) of every final state. The notification and
//! rollout-stop lookups run only for the jobs whose event notifies or whose run has stop
//! conditions. Everything else (a stale or duplicate result, a length mismatch, a retry, a second
//! result for the same job in one batch) takes the general path, `jobs::finish_one_in`, after
//! the common ones, one by one in arrival order.

use std::collections::{HashMap, HashSet};

use sqlx::{AssertSqlSafe, Row as _};

use super::jobs::{Attempt, AttemptResult, FinishOutcome, JobStatus, LogChunk, Reason};
use super::{Backend, StoreResult, now_ms};

/// Most jobs one read takes (bound parameters).
const JOBS_PER_READ: usize = 500;

/// Most log chunks one `INSERT` writes (four bound parameters each).
const CHUNKS_PER_INSERT: usize = 200;

/// Most jobs one `UPDATE` settles (seven bound parameters each).
const JOBS_PER_UPDATE: usize = 200;

/// A result waiting for its batch.
pub(crate) struct ResultRequest {
    pub agent_id: String,
    pub attempt: Attempt,
    pub chunks: Vec<LogChunk>,
    pub result: AttemptResult,
}

/// The results waiting for the writer.
pub(crate) type ResultBatches = super::batch::Batches<ResultRequest, FinishOutcome>;

impl super::Store {
    /// Records a result through the current batch.
    pub(super) async fn finish_batched(
        &self,
        request: ResultRequest,
    ) -> StoreResult<FinishOutcome> {
        let backend = self.backend();
        self.batched(
            &self.results,
            request,
            move |mut connection, requests| async move {
                let answers = finish_all_in(&mut connection, backend, &requests).await;
                (connection, answers)
            },
        )
        .await
    }
}

/// What the common path needs of a job, read before anything is written.
struct Current {
    runner: Option<String>,
    status: JobStatus,
    attempt: i64,
    max_attempts: i64,
    cancel_requested: bool,
    log_len: u64,
    notify_on_success: Option<String>,
    notify_on_failure: Option<String>,
    /// The run has a rollout and has not stopped: its stop conditions may have to be checked.
    rollout_open: bool,
}

impl Current {
    /// Whether `request` takes the common path: the current attempt, still claimed or running,
    /// ends for good, and its chunks continue the stored log up to the reported length.
    fn takes_common_path(&self, request: &ResultRequest) -> bool {
        if self.runner.as_deref() != Some(request.agent_id.as_str())
            || self.attempt != i64::from(request.attempt.attempt)
            || !matches!(self.status, JobStatus::Claimed | JobStatus::Running)
        {
            return false;
        }
        let retries = request.result.status == JobStatus::Failed
            && i64::from(request.attempt.attempt) < self.max_attempts
            && !self.cancel_requested;
        if retries {
            return false;
        }
        let mut log_len = self.log_len;
        for chunk in request.chunks.iter().filter(|chunk| !chunk.data.is_empty()) {
            if chunk.offset != log_len {
                return false;
            }
            log_len += chunk.data.len() as u64;
        }
        log_len == request.result.log_len
    }

    /// The tool the event notifies when a job ends with `status`.
    fn notifies(&self, status: JobStatus) -> bool {
        match status {
            JobStatus::Completed => self.notify_on_success.is_some(),
            JobStatus::Failed | JobStatus::Cancelled => self.notify_on_failure.is_some(),
            _ => false,
        }
    }
}

/// Records every result of a batch in the caller's transaction; the outcomes in the same order.
async fn finish_all_in(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    requests: &[ResultRequest],
) -> StoreResult<Vec<FinishOutcome>> {
    let mut ids: Vec<&str> = requests
        .iter()
        .map(|request| request.attempt.job_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // Locks (PostgreSQL) are taken in id order, as everywhere else.
    ids.sort_unstable();
    let current = read_current(conn, backend, &ids).await?;

    let mut seen = HashSet::new();
    let mut common = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        let first = seen.insert(request.attempt.job_id.as_str());
        if first
            && current
                .get(&request.attempt.job_id)
                .is_some_and(|job| job.takes_common_path(request))
        {
            common.push(index);
        }
    }

    let mut outcomes: Vec<Option<FinishOutcome>> = vec![None; requests.len()];
    insert_chunks(conn, common.iter().map(|&index| &requests[index])).await?;
    update_common(conn, requests, &common, now_ms()).await?;
    // After every final state is written, as after each one on the general path: what these
    // lookups count includes the whole batch.
    for &index in &common {
        let (request, result) = (&requests[index], &requests[index].result);
        let job = &current[&request.attempt.job_id];
        let notified = if job.notifies(result.status) {
            // Records the settlement in the metrics too.
            super::jobs::notify_settled_in(conn, &request.attempt.job_id).await?
        } else {
            if result.status.is_final() {
                super::observe::settled(
                    result.status.as_str(),
                    result.reason.map(Reason::as_str),
                    1,
                );
            }
            false
        };
        if job.rollout_open {
            super::dispatch::settled_in(conn, &request.attempt.job_id).await?;
        }
        outcomes[index] = Some(FinishOutcome::Recorded { notified });
    }
    for (index, request) in requests.iter().enumerate() {
        if outcomes[index].is_none() {
            outcomes[index] = Some(
                super::jobs::finish_one_in(
                    conn,
                    &request.agent_id,
                    &request.attempt,
                    &request.chunks,
                    &request.result,
                )
                .await?,
            );
        }
    }
    Ok(outcomes.into_iter().flatten().collect())
}

/// The read of [`read_current`] for `ids` ids (`$1…$ids`).
///
/// On PostgreSQL each job, its event and its run are looked up by their keys in `LATERAL`
/// subqueries, in the order of the list (the ids sorted: locks in id order, as everywhere
/// else), and the list's length is rounded up ([`super::dispatch::padded_len`]; the copies of the
/// last id find the row it already locked). A join of `jobs`, `events` and `runs` on an `IN`
/// list was planned on whatever statistics the table had when its text was first run: made on
/// a small table and cached, its plan read the whole of `jobs` and `runs` in one sampled batch
/// (33 ms, on the writer's connection, which every write waits for). Look-ups by key keep
/// their indexes on such statistics too (`claim_pg_tests.rs` counts this read's rows on them),
/// and a handful of texts are planned a handful of times.
pub(super) fn read_current_query(backend: Backend, ids: usize) -> String {
    const COLUMNS: &str =
        "j.id, j.runner, j.status, j.attempt, j.max_attempts, j.cancel_requested, j.log_len,
                           e.notify_on_success, e.notify_on_failure, r.rollout, r.stopped_at";
    match backend {
        Backend::Postgres => format!(
            "SELECT {COLUMNS}
             FROM (VALUES {}) AS w (id)
             CROSS JOIN LATERAL (SELECT id, runner, status, attempt, max_attempts, cancel_requested, log_len,
                                        event_id, run_id
                                 FROM jobs WHERE id = w.id FOR NO KEY UPDATE) AS j
             LEFT JOIN LATERAL (SELECT notify_on_success, notify_on_failure FROM events
                                WHERE id = j.event_id OFFSET 0) AS e ON TRUE
             LEFT JOIN LATERAL (SELECT rollout, stopped_at FROM runs WHERE id = j.run_id OFFSET 0) AS r ON TRUE",
            (1..=ids)
                .map(|n| format!("(${n})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Backend::Sqlite => backend.positional(format!(
            "SELECT {COLUMNS}
             FROM jobs j LEFT JOIN events e ON e.id = j.event_id LEFT JOIN runs r ON r.id = j.run_id
             WHERE j.id IN ({}) ORDER BY j.id",
            super::dispatch::placeholders(1, ids),
        )),
    }
}

/// Reads what the common path needs of each job in `ids` (sorted), locking the rows on
/// PostgreSQL.
async fn read_current(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    ids: &[&str],
) -> StoreResult<HashMap<String, Current>> {
    let mut current = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(JOBS_PER_READ) {
        let listed: Vec<&str> = match backend {
            Backend::Postgres => super::dispatch::padded(chunk, JOBS_PER_READ).collect(),
            Backend::Sqlite => chunk.to_vec(),
        };
        let sql = read_current_query(backend, listed.len());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in listed {
            query = query.bind(id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let status =
                JobStatus::parse(&row.try_get::<String, _>("status")?).unwrap_or(JobStatus::Failed);
            current.insert(
                row.try_get("id")?,
                Current {
                    runner: row.try_get("runner")?,
                    status,
                    attempt: row.try_get("attempt")?,
                    max_attempts: row.try_get("max_attempts")?,
                    cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
                    log_len: row.try_get::<i64, _>("log_len")? as u64,
                    notify_on_success: row.try_get("notify_on_success")?,
                    notify_on_failure: row.try_get("notify_on_failure")?,
                    rollout_open: row.try_get::<Option<String>, _>("rollout")?.is_some()
                        && row.try_get::<Option<i64>, _>("stopped_at")?.is_none(),
                },
            );
        }
    }
    Ok(current)
}

/// Writes the final state of every job of `requests[common]` (at most one result per job),
/// [`JOBS_PER_UPDATE`] jobs per statement.
async fn update_common(
    conn: &mut sqlx::AnyConnection,
    requests: &[ResultRequest],
    common: &[usize],
    now: i64,
) -> StoreResult<()> {
    let backend = Backend::of(conn);
    for group in common.chunks(JOBS_PER_UPDATE) {
        let values = (0..group.len())
            .map(|row| format!("({})", super::dispatch::placeholders(row * 7 + 2, 7)))
            .collect::<Vec<_>>()
            .join(", ");
        // `t` holds the time once, so that every placeholder is used once, in order.
        let sql = format!(
            "WITH t (now) AS (VALUES ($1)),
             v (id, status, reason, exit_code, result, condition, log_len) AS (VALUES {values})
             UPDATE jobs SET status = v.status, reason = v.reason, exit_code = v.exit_code, result = v.result,
                    condition = v.condition, log_len = v.log_len, settled_by = 'agent', lease_expires_at = NULL,
                    started_at = COALESCE(jobs.started_at, t.now), finished_at = t.now
             FROM v, t WHERE jobs.id = v.id"
        );
        let mut query = sqlx::query(AssertSqlSafe(backend.positional(sql))).bind(now);
        for &index in group {
            let (request, result) = (&requests[index], &requests[index].result);
            query = query
                .bind(request.attempt.job_id.as_str())
                .bind(result.status.as_str())
                .bind(result.reason.map(Reason::as_str))
                .bind(result.exit_code)
                .bind(result.result.as_deref())
                .bind(result.condition.map(i64::from))
                .bind(result.log_len as i64);
        }
        let updated = query.execute(&mut *conn).await?.rows_affected();
        if updated != group.len() as u64 {
            return Err(super::StoreError::Corrupt(format!(
                "{updated} of {} results written: a job read moments ago is missing",
                group.len()
            )));
        }
    }
    Ok(())
}

/// Writes the non-empty log chunks of `requests` (already checked to continue their logs),
/// several rows per statement.
async fn insert_chunks<'a>(
    conn: &mut sqlx::AnyConnection,
    requests: impl Iterator<Item = &'a ResultRequest>,
) -> StoreResult<()> {
    let rows: Vec<(&str, &LogChunk)> = requests
        .flat_map(|request| {
            request
                .chunks
                .iter()
                .filter(|chunk| !chunk.data.is_empty())
                .map(|chunk| (request.attempt.job_id.as_str(), chunk))
        })
        .collect();
    for group in rows.chunks(CHUNKS_PER_INSERT) {
        let values = (0..group.len())
            .map(|row| format!("({})", super::dispatch::placeholders(row * 4 + 1, 4)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql =
            format!("INSERT INTO job_logs (job_id, \"offset\", stream, data) VALUES {values}");
        let mut query = sqlx::query(AssertSqlSafe(Backend::of(conn).positional(sql)));
        for (job_id, chunk) in group {
            query = query
                .bind(*job_id)
                .bind(chunk.offset as i64)
                .bind(chunk.stream.as_str())
                .bind(&chunk.data);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "result_batch_tests.rs"]
mod tests;
