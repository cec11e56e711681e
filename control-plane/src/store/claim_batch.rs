//! Claims of many agents in one write operation (SQLite).
//!
//! When a fan-out wakes a thousand agents at once, each asks to claim. One write operation per
//! claim costs a savepoint, the claim, a read of the job's secret environment and a release:
//! four statements, each a round trip to the writing connection's thread, all in the single
//! writer's sequence. Here a claim joins the batch that is waiting for the writer: the first
//! claim of a batch submits one operation, later claims only join it, and the operation takes
//! every claim waiting when the writer runs it. It then claims for each agent in arrival order
//! (one `UPDATE … RETURNING` each, so `max_concurrency`, batches and pool jobs behave exactly as
//! before: the claims still run one after another inside the one writer) and reads the secret
//! environment of every claimed job in one query.
//!
//! Answers are given only after the group commit that holds the batch: the claims of a batch
//! are committed, or fail, together. A failure answers every claim of the batch with the error.

use std::sync::{Arc, Mutex};

use sqlx::{AssertSqlSafe, Row as _};
use tokio::sync::oneshot;

use super::jobs::ClaimedJob;
use super::{Backend, StoreError, StoreResult, now_ms, write_op};

/// Most jobs whose secret environment one query reads (bound parameters).
const SECRETS_PER_QUERY: usize = 500;

/// A claim waiting for its batch.
struct ClaimRequest {
    agent_id: String,
    limit: u32,
    lease_until: i64,
    /// The claim's time, if the caller fixes it (tests); the writer's clock otherwise.
    now: Option<i64>,
    reply: oneshot::Sender<StoreResult<Vec<ClaimedJob>>>,
}

#[derive(Default)]
struct Waiting {
    requests: Vec<ClaimRequest>,
    /// A submitted operation has not taken the waiting claims yet.
    submitted: bool,
}

/// The claims waiting for the writer; shared by every clone of a store.
#[derive(Default, Clone)]
pub(crate) struct ClaimBatches {
    waiting: Arc<Mutex<Waiting>>,
}

impl std::fmt::Debug for ClaimBatches {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ClaimBatches")
    }
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl super::Store {
    /// Claims through the current batch (see the module). `limit` is at least 1.
    pub(super) async fn claim_batched(
        &self,
        agent_id: &str,
        limit: u32,
        lease_until: i64,
        now: Option<i64>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let (reply, answer) = oneshot::channel();
        let submit = {
            let mut waiting = lock(&self.claims.waiting);
            waiting.requests.push(ClaimRequest {
                agent_id: agent_id.to_string(),
                limit,
                lease_until,
                now,
                reply,
            });
            !std::mem::replace(&mut waiting.submitted, true)
        };
        if submit {
            // Its own task: the answers of every claim in the batch must be given even if this
            // caller stops waiting (its agent disconnected). It ends with the write.
            tokio::spawn(self.clone().submit_claim_batch());
        }
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }

    /// Submits the operation that takes the waiting claims, waits for its commit and answers
    /// each claim it took.
    async fn submit_claim_batch(self) {
        let batches = self.claims.clone();
        let taken: Arc<Mutex<Vec<ClaimRequest>>> = Arc::default();
        let backend = self.backend();
        let taken_by_operation = taken.clone();
        let result = write_op!(self, |conn| async {
            let requests = {
                let mut waiting = lock(&batches.waiting);
                waiting.submitted = false;
                std::mem::take(&mut waiting.requests)
            };
            let mut claims = Vec::with_capacity(requests.len());
            for request in &requests {
                claims.push((
                    request.agent_id.clone(),
                    request.limit,
                    request.lease_until,
                    request.now,
                ));
            }
            *taken_by_operation
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = requests;
            claim_all_in(conn, backend, &claims).await
        })
        .await;
        let mut requests = std::mem::take(&mut *taken.lock().unwrap_or_else(|p| p.into_inner()));
        if result.is_err() && requests.is_empty() {
            // The operation never ran (the writer could not begin, or is gone): the claims are
            // still waiting, and no other operation was submitted for them.
            let mut waiting = lock(&self.claims.waiting);
            waiting.submitted = false;
            requests = std::mem::take(&mut waiting.requests);
        }
        match result {
            Ok(answers) => {
                for (request, claimed) in requests.into_iter().zip(answers) {
                    let _ = request.reply.send(Ok(claimed));
                }
            }
            Err(error) => {
                for request in requests {
                    let _ = request.reply.send(Err(error.duplicate()));
                }
            }
        }
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
