//! Pool jobs: the one job of a run whose event targets `pool` (a label selector), claimable by
//! any of its candidate agents (migration 0022).
//!
//! A pool job is inserted with no agent (`pool = 1`, `agent_id` NULL, so its generated `runner`
//! is NULL) and one `job_candidates` row per agent whose labels matched when the run was created.
//! A claim by a candidate selects it ([`claimable_ids`]) and binds it to that agent (`agent_id`
//! set in the claim statement), so the attempt's output, result and lease go through the same
//! checks as any agent job. Re-queuing an attempt ([`UNBIND`]) clears `agent_id` again: the job
//! is back in the pool for every candidate. Every write goes through the single writer, so of two
//! candidates claiming at once exactly one gets the job.

use super::jobs::RunSpec;
use super::{Store, StoreResult};

/// A derived table `m` of the ids of the queued jobs the runner bound to placeholder `$runner`
/// may claim: the runner's own, and the pool jobs not bound to an agent that list the runner (an
/// agent id) as a candidate. [`super::dispatch::claimable_select`] joins `jobs` to it (`CROSS JOIN` on SQLite, so the
/// plan starts from these ids through the `jobs_claim` index rather than every queued job).
pub(crate) fn claimable_ids(runner: usize) -> String {
    format!(
        "(
       WITH me (runner) AS (SELECT CAST(${runner} AS TEXT))
       SELECT q.id FROM me JOIN jobs q ON q.runner = me.runner AND q.status = 'queued'
       UNION ALL
       SELECT q.id FROM me JOIN jobs q ON q.runner IS NULL AND q.status = 'queued' AND q.pool = 1
                         JOIN job_candidates c ON c.job_id = q.id AND c.agent_id = me.runner) m"
    )
}

/// Candidates inserted per statement by [`insert_job_in`].
const CANDIDATES_PER_INSERT: usize = 500;

/// `SET` clause fragment of a claim: binds a pool job to the claiming agent (placeholder
/// `$agent`).
pub(crate) fn bind_claimer(agent: usize) -> String {
    format!("agent_id = CASE WHEN pool = 1 THEN CAST(${agent} AS TEXT) ELSE agent_id END")
}

/// `SET` clause fragment of a re-queue: a pool job goes back to the pool.
pub(crate) const UNBIND: &str = "agent_id = CASE WHEN pool = 1 THEN NULL ELSE agent_id END";

/// Inserts the one queued job of a pool run (`spec.agent_ids` are its candidates) with the
/// run's `plan`, in the caller's transaction. Returns `(job id, candidate)` pairs: the runners
/// to wake.
pub(crate) async fn insert_job_in(
    conn: &mut sqlx::AnyConnection,
    run_id: &str,
    spec: &RunSpec,
    plan: &super::dispatch::RunPlan,
    now: i64,
) -> StoreResult<Vec<(String, String)>> {
    let job_id = super::new_id();
    let query = sqlx::query(
        "INSERT INTO jobs (id, run_id, event_id, status, max_attempts, kind, script, env, input, timeout_seconds, queued_at, runtime_spec,
                           backoff_ms, backoff_factor, max_backoff_ms, offline_wait_ms, pool)
         VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 1)",
    )
    .bind(&job_id)
    .bind(run_id)
    .bind(&spec.event_id);
    super::jobs::bind_job_settings(query, spec, plan, now)
        .bind(plan.offline_wait_ms)
        .execute(&mut *conn)
        .await?;
    let mut candidates = spec.agent_ids.clone();
    candidates.sort();
    candidates.dedup();
    // Many candidates per statement (two bound parameters each).
    for chunk in candidates.chunks(CANDIDATES_PER_INSERT) {
        let values = (0..chunk.len())
            .map(|row| format!("({})", super::dispatch::placeholders(row * 2 + 1, 2)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("INSERT INTO job_candidates (job_id, agent_id) VALUES {values}");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(
            super::Backend::of(conn).positional(sql),
        ));
        for agent_id in chunk {
            query = query.bind(&job_id).bind(agent_id);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(candidates
        .into_iter()
        .map(|agent_id| (job_id.clone(), agent_id))
        .collect())
}

/// The candidates of a pool job (none for any other job), in the caller's transaction.
pub(crate) async fn candidates_in(
    conn: &mut sqlx::AnyConnection,
    job_id: &str,
) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT agent_id FROM job_candidates WHERE job_id = $1 ORDER BY agent_id",
    )
    .bind(job_id)
    .fetch_all(&mut *conn)
    .await?)
}

impl Store {
    /// The agents that may claim a pool job (empty for any other job).
    pub async fn job_candidates(&self, job_id: &str) -> StoreResult<Vec<String>> {
        let mut conn = self.reader.acquire().await?;
        candidates_in(&mut conn, job_id).await
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
