//! Claims of many agents in one write operation (SQLite; `batch` says how requests are batched).
//!
//! The operation first asks, in one query, which of the waiting runners have anything queued
//! beyond their own jobs of events without a concurrency limit (a pool job they are a candidate
//! for, or a job of an event with `max_concurrency`). The others, "plain" runners (a fan-out's
//! agents, typically all of them), claim together in one `UPDATE … RETURNING` per
//! [`PLAIN_PER_STATEMENT`] runners: each its oldest claimable own jobs up to its limit, at its own
//! time and lease. The plain runners' jobs are theirs alone and unlimited, so claiming them
//! together gives exactly what claiming them one after another would. The rest claim one after
//! another in arrival order (one `UPDATE … RETURNING` each, so `max_concurrency` and pool jobs
//! behave exactly as for single claims); a runner that appears twice in a batch does too. Last,
//! the secret environment of every claimed job is read in one query.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row as _};

use super::jobs::ClaimedJob;
use super::{Backend, StoreResult, now_ms};

/// Most jobs whose secret environment one query reads (bound parameters).
const SECRETS_PER_QUERY: usize = 500;

/// Most runners one claim statement serves (four bound parameters each), and one look for
/// plain runners asks about.
const PLAIN_PER_STATEMENT: usize = 500;

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
    // The time is read when the claims run, after every write queued before them: a claim that
    // a settlement made possible is never recorded as earlier than that settlement.
    let plain = plain_claims(conn, backend, claims).await?;
    let mut answers: Vec<Vec<ClaimedJob>> = vec![Vec::new(); claims.len()];
    for group in plain.chunks(PLAIN_PER_STATEMENT) {
        claim_plain_in(conn, backend, claims, group, &mut answers).await?;
    }
    for (index, (agent_id, limit, lease_until, now)) in claims.iter().enumerate() {
        if plain.binary_search(&index).is_err() {
            let now = now.unwrap_or_else(now_ms);
            answers[index] = claim_in(conn, backend, agent_id, *limit, *lease_until, now).await?;
        }
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
        let mut query = sqlx::query(AssertSqlSafe(backend.positional(sql)));
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

/// The indices (ascending) of the claims whose runner is plain: it appears once in `claims` and
/// has nothing queued but its own jobs of events without a concurrency limit.
async fn plain_claims(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    claims: &[ClaimRequest],
) -> StoreResult<Vec<usize>> {
    let mut seen = HashMap::with_capacity(claims.len());
    for (index, (runner, ..)) in claims.iter().enumerate() {
        // A runner claiming twice in one batch: both claims take the one-by-one path.
        seen.entry(runner.as_str())
            .and_modify(|first: &mut Option<usize>| *first = None)
            .or_insert(Some(index));
    }
    let runners: Vec<&str> = seen.keys().copied().collect();
    for chunk in runners.chunks(PLAIN_PER_STATEMENT) {
        // The runners are bound twice, once per list, so that the placeholders stay in order.
        let sql = format!(
            "SELECT q.runner AS runner FROM jobs q JOIN event_dispatch d ON d.event_id = q.event_id
             WHERE q.runner IN ({}) AND q.status = 'queued' AND d.max_concurrency IS NOT NULL
             UNION
             SELECT c.agent_id FROM job_candidates c JOIN jobs q ON q.id = c.job_id
             WHERE c.agent_id IN ({}) AND q.status = 'queued' AND q.pool = 1 AND q.runner IS NULL",
            super::dispatch::placeholders(1, chunk.len()),
            super::dispatch::placeholders(chunk.len() + 1, chunk.len()),
        );
        let mut query = sqlx::query(AssertSqlSafe(backend.positional(sql)));
        for runner in chunk.iter().chain(chunk) {
            query = query.bind(*runner);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let runner: String = row.try_get("runner")?;
            if let Some(first) = seen.get_mut(runner.as_str()) {
                *first = None;
            }
        }
    }
    let mut plain: Vec<usize> = seen.into_values().flatten().collect();
    plain.sort_unstable();
    Ok(plain)
}

/// Claims for the plain runners of `claims[group]` in one statement: each its oldest claimable
/// own jobs, up to its limit, at its time (the writer's clock unless the claim fixes it) and
/// with its lease. Their answers go to `answers`, each sorted by job id.
async fn claim_plain_in(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    claims: &[ClaimRequest],
    group: &[usize],
    answers: &mut [Vec<ClaimedJob>],
) -> StoreResult<()> {
    let now = now_ms();
    let values = (0..group.len())
        .map(|row| format!("({})", super::dispatch::placeholders(row * 4 + 1, 4)))
        .collect::<Vec<_>>()
        .join(", ");
    // `w` is the waiting claims; `j` a queued job (the alias `claimable_at` expects).
    let sql = format!(
        "WITH w (runner, lim, lease, now) AS (VALUES {values}),
         picked AS (
           SELECT id FROM (
             SELECT j.id, w.lim,
                    ROW_NUMBER() OVER (PARTITION BY j.runner ORDER BY j.queued_at, j.id) AS nth
             FROM w CROSS JOIN jobs j ON j.runner = w.runner
             WHERE {})
           WHERE nth <= lim)
         UPDATE jobs SET status = 'claimed', attempt = attempt + 1, helper_seq = 0, claimed_at = w.now,
                lease_expires_at = w.lease, not_before = NULL
         FROM w
         WHERE jobs.runner = w.runner AND jobs.id IN (SELECT id FROM picked)
         RETURNING jobs.runner AS runner, id, attempt, run_id, event_id, kind, script, env, input,
                   timeout_seconds, runtime_spec, queued_at, claimed_at",
        super::dispatch::claimable_at("w.now")
    );
    let mut query = sqlx::query(AssertSqlSafe(backend.positional(sql)));
    let mut by_runner = HashMap::with_capacity(group.len());
    for &index in group {
        let (runner, limit, lease_until, at) = &claims[index];
        by_runner.insert(runner.as_str(), index);
        query = query
            .bind(runner.as_str())
            .bind(i64::from(*limit))
            .bind(*lease_until)
            .bind(at.unwrap_or(now));
    }
    for row in query.fetch_all(&mut *conn).await? {
        let runner: String = row.try_get("runner")?;
        let Some(&index) = by_runner.get(runner.as_str()) else {
            return Err(super::StoreError::Corrupt(format!(
                "a plain claim returned a job of runner {runner}, which did not claim"
            )));
        };
        let claimed_at: i64 = row.try_get("claimed_at")?;
        super::observe::claimed(claimed_at - row.try_get::<i64, _>("queued_at")?);
        answers[index].push(super::jobs::claimed_job(&row)?);
    }
    for &index in group {
        answers[index].sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(())
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
