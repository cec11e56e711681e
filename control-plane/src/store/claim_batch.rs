//! Claims of many agents in one write operation (SQLite; `batch` says how requests are batched).
//!
//! The operation claims for each waiting agent in arrival order (one `UPDATE … RETURNING` each,
//! so `max_concurrency`, rollout batches and pool jobs behave exactly as for single claims: the
//! claims still run one after another inside the one writer) and then reads the secret
//! environment of every claimed job in one query.

use sqlx::{AssertSqlSafe, Row as _};

use super::jobs::ClaimedJob;
use super::{Backend, StoreResult, now_ms};

/// Most jobs whose secret environment one query reads (bound parameters).
const SECRETS_PER_QUERY: usize = 500;

/// A claim waiting for its batch: `(agent, limit, lease_until, now)`; `now` is the claim's time
/// if the caller fixes it (tests), the writer's clock otherwise.
pub(crate) type ClaimRequest = (String, u32, i64, Option<i64>);

/// The claims waiting for the writer.
pub(crate) type ClaimBatches = super::batch::Batches<ClaimRequest, Vec<ClaimedJob>>;

impl super::Store {
    /// Claims through the current batch. `limit` is at least 1.
    pub(super) async fn claim_batched(
        &self,
        agent_id: &str,
        limit: u32,
        lease_until: i64,
        now: Option<i64>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let backend = self.backend();
        let request = (agent_id.to_string(), limit, lease_until, now);
        self.batched(
            &self.claims,
            request,
            move |mut connection, claims| async move {
                let answers = claim_all_in(&mut connection, backend, &claims).await;
                (connection, answers)
            },
        )
        .await
    }
}

/// Claims for each `(agent, limit, lease_until, now)` in order, in the caller's transaction;
/// the answers in the same order, each sorted by job id.
async fn claim_all_in(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    claims: &[(String, u32, i64, Option<i64>)],
) -> StoreResult<Vec<Vec<ClaimedJob>>> {
    let mut answers = Vec::with_capacity(claims.len());
    for (agent_id, limit, lease_until, now) in claims {
        // The time is read when the claim runs, after every write queued before it: a claim
        // that a settlement made possible is never recorded as earlier than that settlement.
        let now = now.unwrap_or_else(now_ms);
        answers.push(claim_in(conn, backend, agent_id, *limit, *lease_until, now).await?);
    }
    let ids: Vec<&str> = answers
        .iter()
        .flatten()
        .map(|job| job.id.as_str())
        .collect();
    let mut secrets: std::collections::HashMap<String, Vec<(String, Vec<u8>)>> =
        std::collections::HashMap::new();
    for chunk in ids.chunks(SECRETS_PER_QUERY) {
        let sql = format!(
            "SELECT job_id, name, sealed_value FROM job_secret_env WHERE job_id IN ({}) ORDER BY job_id, name",
            super::dispatch::placeholders(1, chunk.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            secrets
                .entry(row.try_get("job_id")?)
                .or_default()
                .push((row.try_get("name")?, row.try_get("sealed_value")?));
        }
    }
    for job in answers.iter_mut().flatten() {
        job.secret_env = secrets.remove(&job.id).unwrap_or_default();
    }
    Ok(answers)
}

/// Claims up to `limit` claimable jobs for one agent at `now` (one statement), in the caller's
/// transaction; sorted by job id, their secret environment not read yet.
async fn claim_in(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    agent_id: &str,
    limit: u32,
    lease_until: i64,
    now: i64,
) -> StoreResult<Vec<ClaimedJob>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "UPDATE jobs SET status = 'claimed', attempt = attempt + 1, helper_seq = 0, claimed_at = $1, lease_expires_at = $2,
         not_before = NULL, {}
         WHERE id IN ({})
         RETURNING id, attempt, run_id, event_id, kind, script, env, input, timeout_seconds, runtime_spec, queued_at",
        super::pool::bind_claimer(3),
        super::dispatch::claimable_select(backend, 4, limit)
    )))
    .bind(now)
    .bind(lease_until)
    .bind(agent_id)
    .bind(agent_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut claimed = rows
        .iter()
        .map(|row| {
            super::observe::claimed(now - row.try_get::<i64, _>("queued_at")?);
            super::jobs::claimed_job(row)
        })
        .collect::<StoreResult<Vec<_>>>()?;
    claimed.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(claimed)
}

#[cfg(test)]
#[path = "claim_batch_tests.rs"]
mod tests;
