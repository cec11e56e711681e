//! Reading the audit log: the entries about one job, for `GET /jobs/{id}/audit` (migration 0023
//! indexes them by the `job_id` of their detail). Entries are written by [`super::audit_in`] in
//! the transaction of what they record.

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::jobs::Attempt;
use super::{Store, StoreError, StoreResult, audit_in};

/// The kinds of audit entries that are about one job and shown with it. Other kinds never are,
/// even if their detail happens to name a job.
pub const JOB_AUDIT_KINDS: [&str; 5] = [
    "lease_expired",
    "stale_attempt",
    "stale_result",
    "helper_write_stale",
    "event_notify_skipped",
];

/// At most this many entries are returned for one job (the oldest first).
pub const JOB_AUDIT_LIMIT: i64 = 1000;

/// One audit entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub kind: String,
    /// Who did it (an agent id, a user name), when known.
    pub actor: Option<String>,
    pub detail: serde_json::Value,
}

impl Store {
    /// The audit entries about `job_id` of the [`JOB_AUDIT_KINDS`], oldest first.
    pub async fn job_audit(&self, job_id: &str) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, at, kind, actor, detail FROM audit_log
             WHERE {} = $1
               AND kind IN ($2, $3, $4, $5, $6)
             ORDER BY id LIMIT $7",
            self.backend().json_text("detail", "job_id")
        )))
        .bind(job_id)
        .bind(JOB_AUDIT_KINDS[0])
        .bind(JOB_AUDIT_KINDS[1])
        .bind(JOB_AUDIT_KINDS[2])
        .bind(JOB_AUDIT_KINDS[3])
        .bind(JOB_AUDIT_KINDS[4])
        .bind(JOB_AUDIT_LIMIT)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|row| {
                let detail: String = row.try_get("detail")?;
                Ok(AuditEntry {
                    id: row.try_get("id")?,
                    at: row.try_get("at")?,
                    kind: row.try_get("kind")?,
                    actor: row.try_get("actor")?,
                    detail: serde_json::from_str(&detail)
                        .map_err(|error| StoreError::Corrupt(format!("audit detail: {error}")))?,
                })
            })
            .collect()
    }
}

/// Audits, inside the caller's transaction, that `agent_id` still holds `attempt` although it is
/// no longer current (the lease settled it, it was re-queued, another attempt or agent took
/// over): the agent is told to drop it and whatever it did is refused. Written at most once per
/// attempt (an agent lists what it holds in every heartbeat until it has dropped it), and not
/// when the attempt is merely finished by this agent's own result (an agent still lists an
/// attempt it reported until the acknowledgement arrives).
pub(crate) async fn audit_stale_holder_in(
    conn: &mut AnyConnection,
    backend: super::Backend,
    agent_id: &str,
    attempt: &Attempt,
) -> StoreResult<()> {
    let row = sqlx::query("SELECT attempt, runner, status, settled_by FROM jobs WHERE id = $1")
        .bind(&attempt.job_id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = &row {
        let own_result = row.try_get::<i64, _>("attempt")? == i64::from(attempt.attempt)
            && row.try_get::<Option<String>, _>("runner")?.as_deref() == Some(agent_id)
            && row.try_get::<Option<String>, _>("settled_by")?.as_deref() == Some("agent");
        if own_result {
            return Ok(());
        }
    }
    let audited: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM audit_log
                                  WHERE {} = $1 AND kind = 'stale_attempt'
                                    AND {} = $2 AND actor = $3) THEN 1 ELSE 0 END",
        backend.json_text("detail", "job_id"),
        backend.json_integer("detail", "attempt"),
    )))
    .bind(&attempt.job_id)
    .bind(i64::from(attempt.attempt))
    .bind(agent_id)
    .fetch_one(&mut *conn)
    .await?;
    if audited != 0 {
        return Ok(());
    }
    let (current_attempt, status) = match &row {
        Some(row) => (
            Some(row.try_get::<i64, _>("attempt")?),
            Some(row.try_get::<String, _>("status")?),
        ),
        None => (None, None),
    };
    audit_in(
        conn,
        "stale_attempt",
        Some(agent_id),
        serde_json::json!({
            "job_id": attempt.job_id,
            "attempt": attempt.attempt,
            "current_attempt": current_attempt,
            "job_status": status,
            "via": "lease_renewal",
        }),
    )
    .await
}
