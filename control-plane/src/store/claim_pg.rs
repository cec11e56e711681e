//! The claim on PostgreSQL, correct with any number of writers: several control planes
//! (replicas, issue 8) on one database each claim in their own transactions, at the same time.
//!
//! On SQLite every claim goes through the one writer (`write_op!`, `BEGIN IMMEDIATE`), so two
//! claims never overlap and the claim statement may read `status = 'queued'` and count the
//! event's active jobs without locking anything. On PostgreSQL two claims overlap, and that
//! statement would hand one job to two claimers (both read it queued; the second `UPDATE` waits
//! for the first's row lock and then takes the row again, because `id IN (…)` is not evaluated
//! anew) and let two claimers each fill the same free concurrency slots. So a claim here is
//! one short READ COMMITTED transaction of its own, on a connection of the store's pool (not in
//! the writer's group commit, whose transaction holds its locks until the whole group commits):
//!
//! 1. **Events with a `max_concurrency` are claimed for one at a time.** The claim first takes
//!    a transaction-level advisory lock per such event among its runner's claimable jobs
//!    (`pg_advisory_xact_lock(EVENT_LOCK_CLASS, hashtext(event_id))`), in ascending key order.
//!    Only claims change a job to `claimed`, so once the lock is held, the statements that
//!    follow (each with a new snapshot, READ COMMITTED) count every committed claim of that
//!    event; the lock is released by the commit that makes this claim's jobs visible. Jobs of a
//!    limited event that appeared after the locks were taken are left for the next claim (their
//!    run's creation wakes the runner). Claims wait for no lock but these, and take them in one
//!    global order before any row lock, so claims never deadlock with each other; nothing else
//!    takes these locks. Events without a limit take no lock and are claimed concurrently.
//! 2. **The rows are taken with `FOR UPDATE SKIP LOCKED`.** The candidates (the rules of
//!    `store::dispatch`: due, batch open, under the limit counting this claim's own, oldest
//!    first; pool jobs of which the runner is a candidate) are read first, with the window
//!    function that ranks them per event (PostgreSQL refuses `FOR UPDATE` in a query with a
//!    window function). Then one `UPDATE` takes those that are still claimable and not locked
//!    by another transaction (the rules are checked again on each row's latest version once its
//!    lock is held). A
//!    candidate skipped because another claim holds it is not read again; the claim reads the
//!    next candidates until it has `limit` jobs or there are none, so a claimer behind another
//!    on the same pool still gets the jobs after the ones the other holds. When the claim
//!    locked no event, the read itself locks its rows with `SKIP LOCKED`
//!    ([`oldest_claimable_locking`]): claimers of one pool walk past each other's rows instead
//!    of all reading the same oldest jobs and then finding them taken.
//!
//! 3. **Reading stays cheap with a backlog.** A pool job wakes every candidate, so with a pool
//!    backlog every claim used to rank the runner's whole backlog three times (a look before
//!    the transaction, the limited events, the candidates). Now the limited events are found
//!    from `event_dispatch` (few rows), and unless the claim locked one its candidates are read
//!    without the per-event ranking, oldest first. Those reads ([`oldest_claimable`]) walk the
//!    runner's own queued jobs and the queued pool jobs in the order of migration 0026's
//!    partial indexes (`jobs_queued_own`, `jobs_queued_pool`) and stop at the limit, so they
//!    cost the same with 5,000 jobs queued as with 5; id lists are unnested once and the
//!    `UPDATE` starts from them, so a plan made with stale statistics (a burst of jobs right
//!    after a quiet time) cannot turn a claim quadratic. Only a claim that locked a limited
//!    event still ranks the runner's whole backlog.
//! 4. **One statement in the common case.** Most jobs belong to events without a limit and to
//!    no later rollout batch, and those need neither the advisory locks, nor the ranking, nor a
//!    claim time read after the candidates. So a claim is first one autocommit statement
//!    ([`claim_at_once`]): it reads and locks the oldest claimable jobs as in point 2, claims
//!    those of events without a limit outside later batches, and returns them with their
//!    secret environments. Only when it left others (and the claim is not full) does the
//!    transaction above run, for the rest. A claim that finds nothing is that one statement too. Before, a
//!    claim was a look, `BEGIN`, the candidates, the `UPDATE`, the secrets and `COMMIT`: six
//!    round trips, each a wake-up of a PostgreSQL backend and of the claiming task.
//!
//! Jobs skipped because another transaction held their row and then did not change it (a claim
//! that failed and rolled back) are not claimed by this claim; as on SQLite, the runner claims
//! them when it is next woken.

use std::sync::LazyLock;

use sqlx::{AssertSqlSafe, Row};

use super::jobs::ClaimedJob;
use super::observe::Observation;
use super::{Backend, Store, StoreResult, now_ms};

/// The advisory lock class of the per-event claim lock (the two-key form, whose key space is
/// apart from the one-key form of the running lock, `store::running`): "cron" in ASCII.
const EVENT_LOCK_CLASS: i64 = 0x6372_6f6e;

/// Up to `limit` (an SQL expression) ids of claimable jobs of runner `$1` at time `$2` that
/// also pass `filter` (on `j`), oldest first, with their `queued_at`: the runner's own jobs and
/// the pool jobs it is a candidate for, each read in the order of its partial index of queued
/// jobs (migration 0026: `jobs_queued_own`, `jobs_queued_pool`) and stopped at `limit`, then
/// merged. The work grows with
/// `limit` (and the jobs passed over), not with the queue: a pool backlog of thousands of jobs
/// costs a claim no more than a short one. Every id list of a claim statement is unnested once
/// (a `MATERIALIZED` CTE), never evaluated per row: with statistics taken while the table was
/// small, PostgreSQL chose nested loops that rebuilt `string_to_array($n)` for every pair of
/// rows, and four claims burnt a minute of CPU each on a backlog of 5,000 pool jobs.
fn oldest_claimable(filter: &str, limit: &str) -> String {
    let (own, pooled) = claimable_arms(filter, limit, "");
    format!(
        "SELECT id, queued_at FROM (({own}) UNION ALL ({pooled})) AS oldest
         ORDER BY queued_at, id LIMIT {limit}"
    )
}

/// [`oldest_claimable`] that locks what it returns, skipping rows another transaction holds
/// (`FOR UPDATE SKIP LOCKED`, checked row by row as each index is walked, so claimers of one
/// pool walk past each other's rows instead of all reading the same oldest ones and then finding
/// them taken). Each arm locks up to `limit` rows; those the merge leaves out stay locked until
/// the claim commits and are left to the next claim. (PostgreSQL allows no lock in the arms of
/// a `UNION`, so each arm is a `CTE` of its own.)
fn oldest_claimable_locking(filter: &str, limit: &str) -> String {
    let (own, pooled) = claimable_arms(filter, limit, "FOR UPDATE OF j SKIP LOCKED");
    format!(
        "WITH own AS MATERIALIZED ({own}), pooled AS MATERIALIZED ({pooled})
         SELECT id, queued_at FROM (SELECT id, queued_at FROM own UNION ALL SELECT id, queued_at FROM pooled) AS oldest
         ORDER BY queued_at, id LIMIT {limit}"
    )
}

/// The two walks of [`oldest_claimable`], each with `lock` (a locking clause, or nothing): the
/// runner's own queued jobs and the queued pool jobs it is a candidate for.
fn claimable_arms(filter: &str, limit: &str, lock: &str) -> (String, String) {
    let claimable = super::dispatch::claimable(2);
    (
        format!(
            "SELECT j.id, j.queued_at FROM jobs j
             WHERE j.runner = $1 AND {claimable} AND {filter}
             ORDER BY j.queued_at, j.id LIMIT {limit} {lock}"
        ),
        format!(
            "SELECT j.id, j.queued_at FROM jobs j
             WHERE j.runner IS NULL AND j.pool = 1 AND {claimable} AND {filter}
               AND EXISTS (SELECT 1 FROM job_candidates c WHERE c.job_id = j.id AND c.agent_id = $1)
             ORDER BY j.queued_at, j.id LIMIT {limit} {lock}"
        ),
    )
}

/// The events with a concurrency limit among the claimable jobs of runner `$1` at time `$2`,
/// with their lock keys, in lock order. It starts from the limited events (few, often none) and
/// looks for one claimable job of each, rather than going through all of the runner's claimable
/// jobs (a pool's whole backlog). The look is a `LATERAL` subquery with a `LIMIT`, which the
/// planner cannot turn into a join: it runs once per limited event and not at all when there is
/// none. (Written as `EXISTS`, the planner was free to make it a semi-join that read the runner's
/// whole backlog first: 2–3 ms per claim with a pool backlog and no limited event at all.)
fn limited_events() -> String {
    format!(
        "SELECT d.event_id, CAST(hashtext(d.event_id) AS BIGINT) AS lock_key
         FROM event_dispatch d
         CROSS JOIN LATERAL ({}) AS one
         WHERE d.max_concurrency IS NOT NULL
         ORDER BY lock_key, d.event_id",
        oldest_claimable("j.event_id = d.event_id", "1")
    )
}

/// The ids of up to `$5` claimable jobs of runner `$1` at time `$2`, oldest first, at most as
/// many per event as its limit leaves free; jobs of limited events only for the events in `$3`
/// (comma-separated ids, locked by this claim), never the ids in `$4` (comma-separated).
/// `dispatch::claimable_select`'s rules, without a lock.
fn candidates() -> String {
    format!(
        "WITH locked_events AS MATERIALIZED (SELECT unnest(string_to_array($3, ',')) AS id),
              skipped AS MATERIALIZED (SELECT unnest(string_to_array($4, ',')) AS id)
         SELECT id FROM (
           SELECT j.id, j.queued_at, d.max_concurrency AS cap,
                  ROW_NUMBER() OVER (PARTITION BY j.event_id ORDER BY j.queued_at, j.id) AS nth,
                  CASE WHEN d.max_concurrency IS NULL THEN 0 ELSE
                    (SELECT COUNT(*) FROM jobs a WHERE a.event_id = j.event_id AND a.status IN ('claimed', 'running'))
                  END AS active
           FROM {} JOIN jobs j ON j.id = m.id LEFT JOIN event_dispatch d ON d.event_id = j.event_id
           WHERE {}
             AND (d.max_concurrency IS NULL OR j.event_id IN (SELECT id FROM locked_events))
             AND j.id NOT IN (SELECT id FROM skipped)) AS candidates
         WHERE cap IS NULL OR active + nth <= cap
         ORDER BY queued_at, id LIMIT $5",
        super::pool::claimable_ids(1),
        super::dispatch::claimable(2)
    )
}

/// [`candidates`] when the claim locked no event (`$3` would be empty): the oldest `$4`
/// claimable jobs never in `$3` (the ids never to take) that no other transaction holds, read
/// and locked as [`oldest_claimable_locking`] (O(limit), whatever the backlog), each with
/// `limited`: whether its event has a concurrency limit (such
/// a job appeared after the claim looked for limited events, and is left to the next claim).
/// The limit is looked up for those few rows only, after the `LIMIT`: as a filter inside the
/// walk, PostgreSQL estimated from `event_dispatch`'s guessed statistics that hardly any job
/// would pass it, and sorted the whole backlog instead of stopping at the limit. The look-up is
/// a `LATERAL` subquery with `LIMIT 1`, run per row through the primary key: an `EXISTS` may be
/// planned as a hash of the whole table when PostgreSQL guesses many rows above it (see
/// [`claim_at_once`]).
fn unlimited_candidates() -> String {
    format!(
        "WITH skipped AS MATERIALIZED (SELECT unnest(string_to_array($3, ',')) AS id)
         SELECT o.id, CASE WHEN x.hit IS NULL THEN 0 ELSE 1 END AS limited
         FROM ({}) AS o
         LEFT JOIN LATERAL (SELECT 1 AS hit FROM jobs e JOIN event_dispatch d ON d.event_id = e.event_id
                            WHERE e.id = o.id AND d.max_concurrency IS NOT NULL LIMIT 1) AS x ON TRUE",
        oldest_claimable_locking("j.id NOT IN (SELECT id FROM skipped)", "$4")
    )
}

/// Claims the jobs among `$4` (comma-separated ids) that are still claimable at time `$5` and
/// not locked by another transaction: a new attempt with a lease until `$2`, claimed at `$1`,
/// a pool job bound to runner `$3`. The rows are found by their ids (unnested once) and locked
/// in the subquery, whose conditions PostgreSQL checks again on the row's latest version once
/// it holds the lock; the `UPDATE` itself joins on the id only. The status is tested as
/// `(…) IS TRUE`, which no index can answer: the plan has to find the rows by their ids and
/// cannot read the queue through an index on `status` instead, let alone run the locking
/// subquery once per queued job (both seen with stale statistics).
fn take() -> String {
    format!(
        "WITH wanted AS MATERIALIZED (SELECT unnest(string_to_array($4, ',')) AS id)
         UPDATE jobs SET status = 'claimed', attempt = attempt + 1, helper_seq = 0, claimed_at = $1, lease_expires_at = $2,
         not_before = NULL, {}
         FROM (SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM wanted)
                 AND (j.status = 'queued') IS TRUE AND {}
               FOR UPDATE OF j SKIP LOCKED) AS locked
         WHERE jobs.id = locked.id
         RETURNING {CLAIMED_COLUMNS}",
        super::pool::bind_claimer(3),
        super::dispatch::due_and_open("$5")
    )
}

/// The whole claim in one statement, for the common case in which no job it finds waited for
/// other jobs to end: up to `$3` of the oldest claimable jobs of runner `$1` at time `$2` that
/// no other transaction holds are read and locked as [`oldest_claimable_locking`] (O(limit),
/// whatever the backlog), each flagged `deferred` when its event has a concurrency limit or it
/// belongs to a rollout batch after the first (looked up per row in a `LATERAL` subquery with
/// `LIMIT 1`: as an `EXISTS`, the generic plan made on statistics that knew a 20,000-job
/// backlog hashed all of `jobs` for it, 41 ms per claim, since PostgreSQL guesses a bound
/// `LIMIT` at a tenth of the rows below it), and those not flagged are claimed (claimed at `$2`, leased until `$4`, a pool job bound to `$1`). It returns
/// one row per claimed job and secret (the job's columns repeated, `secret_name` and
/// `secret_value` of one of its secrets, or NULL without any), and at least one row: with
/// nothing claimed, one whose job columns are NULL. Every row carries `deferred`, the number of
/// flagged jobs left alone; the caller claims those through the transaction of
/// [`Store::claim_with_limits_pg`], which reads the claim's time after its candidates: a job
/// made claimable by another's end is never recorded as claimed before that end (`$2` is read
/// before this statement, and a batch's last result may commit in between).
///
/// One autocommit statement reads one snapshot: an event given a limit after it began is
/// treated as having none, as a claim that committed just before the limit was set would be.
///
/// Every claim runs it: its text is made once.
fn claim_at_once() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(claim_at_once_text);
    &TEXT
}

fn claim_at_once_text() -> String {
    format!(
        "WITH picked AS MATERIALIZED (
           SELECT o.id, x.hit IS NOT NULL AS deferred
           FROM ({}) AS o
           LEFT JOIN LATERAL (SELECT 1 AS hit FROM jobs e LEFT JOIN event_dispatch d ON d.event_id = e.event_id
                              WHERE e.id = o.id AND (e.batch > 0 OR d.max_concurrency IS NOT NULL) LIMIT 1) AS x ON TRUE),
         taken AS (
           UPDATE jobs SET status = 'claimed', attempt = attempt + 1, helper_seq = 0, claimed_at = $2,
                  lease_expires_at = $4, not_before = NULL, {}
           FROM picked WHERE jobs.id = picked.id AND NOT picked.deferred
           RETURNING {CLAIMED_COLUMNS})
         SELECT l.deferred, t.*, s.name AS secret_name, s.sealed_value AS secret_value
         FROM (SELECT COUNT(*) FILTER (WHERE deferred) AS deferred FROM picked) AS l
         LEFT JOIN taken t ON TRUE
         LEFT JOIN job_secret_env s ON s.job_id = t.id
         ORDER BY t.id, s.name",
        oldest_claimable_locking("TRUE", "$3"),
        super::pool::bind_claimer(1),
    )
}

/// What a claim returns of each job it takes (`jobs::claimed_job` reads them).
const CLAIMED_COLUMNS: &str =
    "jobs.id, jobs.attempt, jobs.run_id, jobs.event_id, jobs.kind, jobs.script, jobs.env,
    jobs.input, jobs.timeout_seconds, jobs.runtime_spec, jobs.queued_at";

impl Store {
    /// `Store::claim_jobs_when` on PostgreSQL (see the module's documentation): one statement
    /// ([`claim_at_once`]) unless it leaves jobs of limited events or later rollout batches,
    /// which the transaction of [`Store::claim_with_limits_pg`] then claims.
    pub(super) async fn claim_jobs_pg(
        &self,
        runner: &str,
        limit: u32,
        lease_until: i64,
        now: Option<i64>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        debug_assert_eq!(self.backend(), Backend::Postgres);
        let claimed_at = now.unwrap_or_else(now_ms);
        let rows = sqlx::query(AssertSqlSafe(claim_at_once()))
            .bind(runner)
            .bind(claimed_at)
            .bind(i64::from(limit))
            .bind(lease_until)
            .fetch_all(&self.hot)
            .await?;
        let mut claimed: Vec<ClaimedJob> = Vec::new();
        let mut observed = Vec::new();
        let mut deferred = 0;
        for row in &rows {
            deferred = row.try_get::<i64, _>("deferred")?;
            let Some(id) = row.try_get::<Option<String>, _>("id")? else {
                continue;
            };
            if claimed.last().is_none_or(|job| job.id != id) {
                observed.push(Observation::Claimed {
                    waited_ms: claimed_at - row.try_get::<i64, _>("queued_at")?,
                });
                claimed.push(super::jobs::claimed_job(row)?);
            }
            if let Some(name) = row.try_get::<Option<String>, _>("secret_name")? {
                let value: Vec<u8> = row.try_get("secret_value")?;
                if let Some(job) = claimed.last_mut() {
                    job.secret_env.push((name, value));
                }
            }
        }
        self.metrics.record(&observed);
        let left = limit - claimed.len() as u32;
        if deferred > 0 && left > 0 {
            claimed.extend(
                self.claim_with_limits_pg(runner, left, lease_until, now)
                    .await?,
            );
            claimed.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(claimed)
    }

    /// A claim that may take jobs of events with a concurrency limit, in a transaction (see the
    /// module's documentation).
    async fn claim_with_limits_pg(
        &self,
        runner: &str,
        limit: u32,
        lease_until: i64,
        now: Option<i64>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        // Dropped before the commit (an error, or the caller gone), the transaction rolls back.
        // The locks below only work if each statement sees what committed before it began.
        let mut tx = self
            .hot
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        let fixed_now = now;
        let now = now.unwrap_or_else(now_ms);
        let events = sqlx::query(AssertSqlSafe(limited_events()))
            .bind(runner)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let mut locked = Vec::with_capacity(events.len());
        let mut last_key = None;
        for row in &events {
            let key: i64 = row.try_get("lock_key")?;
            if last_key != Some(key) {
                sqlx::query(
                    "SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock(CAST($1 AS INTEGER), CAST($2 AS INTEGER))) AS l",
                )
                .bind(EVENT_LOCK_CLASS)
                .bind(key)
                .fetch_one(&mut *tx)
                .await?;
                last_key = Some(key);
            }
            locked.push(row.try_get::<String, _>("event_id")?);
        }
        let locked = locked.join(",");
        let (candidates, unlimited, take) = (candidates(), unlimited_candidates(), take());
        let mut skipped: Vec<String> = Vec::new();
        let mut claimed = Vec::new();
        let mut observed = Vec::new();
        while claimed.len() < limit as usize {
            let wanted = (limit as usize - claimed.len()) as i64;
            let ids: Vec<String> = if locked.is_empty() {
                let rows = sqlx::query(AssertSqlSafe(unlimited.as_str()))
                    .bind(runner)
                    .bind(now)
                    .bind(skipped.join(","))
                    .bind(wanted)
                    .fetch_all(&mut *tx)
                    .await?;
                if rows.is_empty() {
                    break;
                }
                let mut free = Vec::with_capacity(rows.len());
                for row in &rows {
                    let id: String = row.try_get("id")?;
                    if row.try_get::<i64, _>("limited")? == 1 {
                        skipped.push(id);
                    } else {
                        free.push(id);
                    }
                }
                if free.is_empty() {
                    continue;
                }
                free
            } else {
                sqlx::query_scalar(AssertSqlSafe(candidates.as_str()))
                    .bind(runner)
                    .bind(now)
                    .bind(&locked)
                    .bind(skipped.join(","))
                    .bind(wanted)
                    .fetch_all(&mut *tx)
                    .await?
            };
            if ids.is_empty() {
                break;
            }
            // The claim's time is read now, after the candidates were read: a job whose end
            // freed the slot this claim takes was committed before that read, so it is never
            // recorded as claimed before that end (its `finished_at` is read before its commit).
            let claimed_at = fixed_now.unwrap_or_else(now_ms).max(now);
            let rows = sqlx::query(AssertSqlSafe(take.as_str()))
                .bind(claimed_at)
                .bind(lease_until)
                .bind(runner)
                .bind(ids.join(","))
                .bind(claimed_at)
                .fetch_all(&mut *tx)
                .await?;
            let mut taken = Vec::with_capacity(rows.len());
            for row in &rows {
                observed.push(Observation::Claimed {
                    waited_ms: claimed_at - row.try_get::<i64, _>("queued_at")?,
                });
                taken.push(super::jobs::claimed_job(row)?);
            }
            skipped.extend(
                ids.into_iter()
                    .filter(|id| !taken.iter().any(|job: &ClaimedJob| &job.id == id)),
            );
            claimed.extend(taken);
        }
        if !claimed.is_empty() {
            // Every claimed job's secret environment in one read.
            let ids: Vec<&str> = claimed.iter().map(|job| job.id.as_str()).collect();
            let rows = sqlx::query(
                "WITH claimed AS MATERIALIZED (SELECT unnest(string_to_array($1, ',')) AS id)
                 SELECT s.job_id, s.name, s.sealed_value FROM job_secret_env s
                 WHERE s.job_id IN (SELECT id FROM claimed) ORDER BY s.job_id, s.name",
            )
            .bind(ids.join(","))
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                let job_id: String = row.try_get("job_id")?;
                if let Some(job) = claimed.iter_mut().find(|job| job.id == job_id) {
                    job.secret_env
                        .push((row.try_get("name")?, row.try_get("sealed_value")?));
                }
            }
        }
        tx.commit().await?;
        self.metrics.record(&observed);
        claimed.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(claimed)
    }
}

#[cfg(test)]
#[path = "claim_pg_tests.rs"]
mod tests;
