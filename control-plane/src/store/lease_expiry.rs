//! The lease sweep: attempts whose lease ran out are queued again (while attempts remain and no
//! cancel was asked) or settled `lost` (`cancelled` after a cancel request).
//!
//! Correct with several writers on one database (replicas on PostgreSQL, issue 8). Between the
//! sweep's read of an expired attempt and its write, another writer may have changed the row: a
//! result of that attempt recorded, a heartbeat renewing the lease, another replica's sweep
//! settling it, a claim of the re-queued job starting the next attempt, a cancel request. So:
//!
//! - On PostgreSQL the read locks the rows it returns and skips rows another transaction holds
//!   (`FOR NO KEY UPDATE OF jobs SKIP LOCKED`): the sweep, which runs inside the writer's group
//!   commit, never waits there for a job row (the doc comment of `store::claim_pg` says why that
//!   matters); a skipped row is still expired at the next sweep if nobody settled it.
//! - Every `UPDATE` re-checks in its `WHERE` what the decision rested on (the attempt, a status
//!   that is still claimed or running, the lease still expired, the cancel flag, and for a final
//!   settlement the log length it appends its note at) and the sweep acts on the rows it really
//!   changed (`RETURNING`) only: the log is cleared or noted, the notification enqueued, the
//!   rollout stop checked, the expiry audited and reported to the caller for those rows alone.
//!   On SQLite every writer takes the file's write lock for its whole transaction, so nothing
//!   changes in between there; the checks hold trivially.

use sqlx::{AssertSqlSafe, Row};

use super::jobs::{ExpiredJob, LogChunk, Stream};
use super::{Store, StoreResult, audit_in, write_op};

/// Expired attempts, oldest lease first, locked on PostgreSQL (rows held elsewhere are skipped).
fn expired_rows(backend: super::Backend) -> String {
    format!(
        "SELECT id, runner AS agent_id, attempt, max_attempts, cancel_requested, log_len, pool FROM jobs
         WHERE status IN ('claimed', 'running') AND lease_expires_at < $1
         ORDER BY id{}",
        backend.lock_for_update_of("jobs", true)
    )
}

/// Queues job `$2` again at `$1` if it still is attempt `$3`, claimed or running, with its lease
/// expired before `$1` and no cancel requested.
fn requeue() -> String {
    format!(
        "UPDATE jobs SET status = 'queued', log_len = 0, lease_expires_at = NULL, claimed_at = NULL,
         started_at = NULL, queued_at = $1, {}
         WHERE id = $2 AND attempt = $3 AND status IN ('claimed', 'running') AND lease_expires_at < $1
           AND cancel_requested = 0
         RETURNING id",
        super::pool::UNBIND
    )
}

/// Settles job `$5` with status `$1` and reason `$2`, its log `$3` bytes long, at `$4`, if it
/// still is attempt `$6`, claimed or running, with its lease expired before `$4`, the cancel flag
/// `$7` and a log of `$8` bytes.
const SETTLE: &str = "UPDATE jobs SET status = $1, reason = $2, settled_by = 'lease', log_len = $3, lease_expires_at = NULL,
     finished_at = $4
     WHERE id = $5 AND attempt = $6 AND status IN ('claimed', 'running') AND lease_expires_at < $4
       AND cancel_requested = $7 AND log_len = $8
     RETURNING id";

impl Store {
    /// Settles jobs whose lease ran out before `now`: queued again while attempts remain (and
    /// no cancel was asked), else failed with reason `lost` (or cancelled). Returns the jobs
    /// this call changed, and only those (see the module's documentation).
    pub async fn expire_leases(&self, now: i64) -> StoreResult<Vec<ExpiredJob>> {
        let backend = self.backend();
        write_op!(self, |conn| async {
            let rows = sqlx::query(AssertSqlSafe(expired_rows(backend)))
                .bind(now)
                .fetch_all(&mut *conn)
                .await?;
            let requeue = requeue();
            let mut expired = Vec::with_capacity(rows.len());
            for row in rows {
                let job_id: String = row.try_get("id")?;
                let agent_id: String = row.try_get("agent_id")?;
                let attempt = row.try_get::<i64, _>("attempt")?;
                let cancel_requested = row.try_get::<i64, _>("cancel_requested")?;
                let requeued =
                    cancel_requested == 0 && attempt < row.try_get::<i64, _>("max_attempts")?;
                let mut notified = false;
                let mut candidates = Vec::new();
                if requeued {
                    let changed = sqlx::query(AssertSqlSafe(requeue.as_str()))
                        .bind(now)
                        .bind(&job_id)
                        .bind(attempt)
                        .fetch_optional(&mut *conn)
                        .await?;
                    if changed.is_none() {
                        continue;
                    }
                    sqlx::query("DELETE FROM job_logs WHERE job_id = $1")
                        .bind(&job_id)
                        .execute(&mut *conn)
                        .await?;
                    if row.try_get::<i64, _>("pool")? != 0 {
                        candidates = super::pool::candidates_in(conn, &job_id).await?;
                    }
                } else {
                    let log_len = row.try_get::<i64, _>("log_len")?;
                    let note = format!(
                        "\n[cronium: attempt {attempt} lost: the agent stopped renewing its lease]\n"
                    );
                    let chunk = LogChunk {
                        offset: log_len as u64,
                        stream: Stream::System,
                        data: note.into_bytes(),
                    };
                    let (status, reason) = if cancel_requested != 0 {
                        ("cancelled", "cancelled")
                    } else {
                        ("failed", "lost")
                    };
                    let changed = sqlx::query(SETTLE)
                        .bind(status)
                        .bind(reason)
                        .bind(log_len + chunk.data.len() as i64)
                        .bind(now)
                        .bind(&job_id)
                        .bind(attempt)
                        .bind(cancel_requested)
                        .bind(log_len)
                        .fetch_optional(&mut *conn)
                        .await?;
                    if changed.is_none() {
                        continue;
                    }
                    super::jobs::insert_chunks(
                        conn,
                        &job_id,
                        log_len as u64,
                        std::slice::from_ref(&chunk),
                    )
                    .await?;
                    notified = super::jobs::notify_settled_in(conn, &job_id).await?;
                    super::dispatch::settled_in(conn, &job_id).await?;
                }
                audit_in(
                    conn,
                    "lease_expired",
                    None,
                    serde_json::json!({"job_id": job_id, "attempt": attempt, "requeued": requeued}),
                )
                .await?;
                expired.push(ExpiredJob {
                    job_id,
                    agent_id,
                    requeued,
                    notified,
                    candidates,
                });
            }
            Ok(expired)
        })
        .await
    }
}

#[cfg(test)]
#[path = "lease_expiry_tests.rs"]
mod tests;
