//! Dispatch policies: retries with backoff, a concurrency limit per event, and rolling fan-out
//! batches with stop conditions and an offline-host policy.
//!
//! The rules live in SQL so they hold inside the claim statement itself ([`claimable`]): a
//! queued job is claimable when it is due (`not_before`), when every job of a lower batch of its
//! run is final, and when fewer than its event's `max_concurrency` jobs are claimed or running.
//! All writes go through the single writer (see `write_op!`), so two claims never both see a free
//! slot. Whoever settles a job calls [`settled_in`] in the same transaction: the stop conditions
//! are checked there. The control plane's dispatcher task (`crate::dispatch`) wakes the runners
//! once delayed jobs are due or a batch or a concurrency slot opened, and skips offline hosts.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Row};

use super::jobs::{RunSpec, create_run_over_in};
use super::{Store, StoreError, StoreResult, audit_in, now_ms, write_op};

/// The condition, on a queued job aliased `j` with its event's policy aliased `d` (a LEFT JOIN
/// of `event_dispatch`), that it may be claimed at the time bound to placeholder `$first`.
/// `active` and `nth` are computed by [`claimable_select`].
pub(crate) fn claimable(first: usize) -> String {
    claimable_at(&format!("${first}"))
}

/// [`claimable`] at the time given by the SQL expression `now` (a placeholder or a column).
pub(crate) fn claimable_at(now: &str) -> String {
    format!("j.status = 'queued' AND {}", due_and_open(now))
}

/// The part of [`claimable_at`] after the status: the queued job `j` is due at `now` and no
/// lower batch of its run is still open.
pub(crate) fn due_and_open(now: &str) -> String {
    format!(
        "(j.not_before IS NULL OR j.not_before <= {now})
     AND (j.batch = 0 OR NOT EXISTS (SELECT 1 FROM jobs b WHERE b.run_id = j.run_id AND b.batch < j.batch
                                     AND b.status IN ('queued', 'claimed', 'running')))"
    )
}

/// The ids of up to `limit` claimable jobs of one runner, oldest first, at most as many per
/// event as its concurrency limit leaves free (a runner's own jobs and the pool jobs it is a
/// candidate for, `store::pool`). Binds from placeholder `$first` on: runner, now.
///
/// The limit is part of the text, not a bound parameter: SQLite plans a bound `LIMIT` with its
/// value and then expires the statement whenever that parameter is bound again (to any value;
/// sqlx binds on every execution), so every claim was compiled anew (~15% of the control
/// plane's CPU in `sqlite3Reprepare` under a 1,000-agent fan-out). A text per limit value is a
/// handful of cached statements that stay prepared.
pub(crate) fn claimable_select(backend: super::Backend, first: usize, limit: u32) -> String {
    let now = first + 1;
    format!(
        "SELECT id FROM (
           SELECT j.id, j.queued_at, d.max_concurrency AS cap,
                  ROW_NUMBER() OVER (PARTITION BY j.event_id ORDER BY j.queued_at, j.id) AS nth,
                  CASE WHEN d.max_concurrency IS NULL THEN 0 ELSE
                    (SELECT COUNT(*) FROM jobs a WHERE a.event_id = j.event_id AND a.status IN ('claimed', 'running'))
                  END AS active
           FROM {} {} jobs j ON j.id = m.id LEFT JOIN event_dispatch d ON d.event_id = j.event_id
           WHERE {}) AS candidates
         WHERE cap IS NULL OR active + nth <= cap
         ORDER BY queued_at, id LIMIT {limit}",
        super::pool::claimable_ids(first),
        backend.join_in_order(),
        claimable(now)
    )
}

/// How long a failed attempt waits before the next one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The delay after the first failed attempt (seconds).
    pub backoff_seconds: f64,
    /// Each further failed attempt multiplies the delay by this.
    pub factor: f64,
    /// The delay never exceeds this (seconds).
    pub max_backoff_seconds: f64,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            backoff_seconds: 5.0,
            factor: 2.0,
            max_backoff_seconds: 300.0,
        }
    }
}

/// Longest backoff accepted (a day).
pub const MAX_BACKOFF_SECONDS: f64 = 86_400.0;

impl RetryPolicy {
    /// Checks the bounds; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let finite = |value: f64| value.is_finite() && value >= 0.0;
        if !finite(self.backoff_seconds) || self.backoff_seconds > MAX_BACKOFF_SECONDS {
            return Err((
                "retry.backoff_seconds",
                format!("must be between 0 and {MAX_BACKOFF_SECONDS}"),
            ));
        }
        if !self.factor.is_finite() || !(1.0..=10.0).contains(&self.factor) {
            return Err(("retry.factor", "must be between 1 and 10".into()));
        }
        if !finite(self.max_backoff_seconds)
            || self.max_backoff_seconds > MAX_BACKOFF_SECONDS
            || self.max_backoff_seconds < self.backoff_seconds
        {
            return Err((
                "retry.max_backoff_seconds",
                format!("must be between backoff_seconds and {MAX_BACKOFF_SECONDS}"),
            ));
        }
        Ok(())
    }
}

/// The delay (ms) before the attempt after failed attempt number `failed_attempt` (1-based),
/// before jitter.
pub fn backoff_ms(initial_ms: i64, factor: f64, max_ms: i64, failed_attempt: u32) -> i64 {
    let exponent = failed_attempt.saturating_sub(1).min(64) as i32;
    let delay = initial_ms as f64 * factor.powi(exponent);
    if !delay.is_finite() || delay >= max_ms as f64 {
        max_ms
    } else {
        delay as i64
    }
}

/// What happens to a job whose agent is offline when its batch starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflinePolicy {
    /// Stay queued (until `deadline_seconds`, if set, then skipped).
    #[default]
    Wait,
    /// Skipped at once.
    Skip,
}

/// How a run's jobs are rolled out over its hosts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Hosts per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Hosts per batch as a percentage of the run's hosts (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_percent: Option<u32>,
    /// Stop once this many hosts failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// Stop when, after a batch, fewer than this percentage of the finished hosts succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_percent: Option<u32>,
    #[serde(default)]
    pub offline: OfflinePolicy,
    /// With `offline: wait`: how long a job waits for its agent once its batch started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_seconds: Option<u32>,
}

impl Rollout {
    /// Checks the bounds; the error names the field (under `prefix`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let field = |name: &str| format!("{prefix}.{name}");
        if self.batch_size.is_some() && self.batch_percent.is_some() {
            return Err((
                field("batch_size"),
                "give batch_size or batch_percent, not both".into(),
            ));
        }
        if let Some(size) = self.batch_size
            && !(1..=100_000).contains(&size)
        {
            return Err((field("batch_size"), "must be between 1 and 100000".into()));
        }
        if let Some(percent) = self.batch_percent
            && !(1..=100).contains(&percent)
        {
            return Err((field("batch_percent"), "must be between 1 and 100".into()));
        }
        if self.max_failures == Some(0) {
            return Err((field("max_failures"), "must be at least 1".into()));
        }
        if let Some(percent) = self.min_success_percent
            && !(1..=100).contains(&percent)
        {
            return Err((
                field("min_success_percent"),
                "must be between 1 and 100".into(),
            ));
        }
        if let Some(deadline) = self.deadline_seconds {
            if self.offline != OfflinePolicy::Wait {
                return Err((
                    field("deadline_seconds"),
                    "applies to offline: wait only".into(),
                ));
            }
            if deadline > 7 * 86_400 {
                return Err((
                    field("deadline_seconds"),
                    "must be at most 604800 (7 days)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether this is the default (every host at once, never stopped, offline hosts wait).
    pub fn is_default(&self) -> bool {
        self == &Rollout::default()
    }

    /// Hosts per batch for a run of `hosts` hosts (`None`: one batch).
    pub fn batch_size_for(&self, hosts: usize) -> Option<usize> {
        match (self.batch_size, self.batch_percent) {
            (Some(size), _) => Some(size as usize),
            (None, Some(percent)) => Some((hosts * percent as usize).div_ceil(100).max(1)),
            (None, None) => None,
        }
    }

    /// `over`'s fields replace these (a batch size replaces a percentage and back).
    pub fn merged(&self, over: &Rollout, given: &RolloutFields) -> Rollout {
        let mut merged = self.clone();
        if given.batch_size {
            merged.batch_size = over.batch_size;
            merged.batch_percent = None;
        }
        if given.batch_percent {
            merged.batch_percent = over.batch_percent;
            merged.batch_size = None;
        }
        if given.max_failures {
            merged.max_failures = over.max_failures;
        }
        if given.min_success_percent {
            merged.min_success_percent = over.min_success_percent;
        }
        if given.offline {
            merged.offline = over.offline;
            if over.offline == OfflinePolicy::Skip {
                merged.deadline_seconds = None;
            }
        }
        if given.deadline_seconds {
            merged.deadline_seconds = over.deadline_seconds;
        }
        merged
    }
}

/// Which fields of a partial [`Rollout`] were given (a trigger's override).
#[derive(Debug, Clone, Copy, Default)]
pub struct RolloutFields {
    pub batch_size: bool,
    pub batch_percent: bool,
    pub max_failures: bool,
    pub min_success_percent: bool,
    pub offline: bool,
    pub deadline_seconds: bool,
}

/// An event's dispatch policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DispatchPolicy {
    pub retry: RetryPolicy,
    /// At most this many jobs of the event claimed or running at once (`None`: unlimited).
    pub max_concurrency: Option<u32>,
    pub rollout: Rollout,
}

/// The rollout state of a run, for `GET /runs/{id}`.
#[derive(Debug, Clone)]
pub struct RunDispatch {
    pub rollout: Option<Rollout>,
    pub batch_size: Option<u32>,
    pub batches: u32,
    /// The lowest batch with a job that is not final (`None`: all final).
    pub current_batch: Option<u32>,
    pub stopped_reason: Option<String>,
    pub stopped_at: Option<i64>,
    pub retry_of: Option<String>,
}

/// Jobs whose stored logs are identical, with the same status and exit code.
#[derive(Debug, Clone)]
pub struct OutputGroup {
    pub output_sha256: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub job_ids: Vec<String>,
    /// The end of the output (at most [`GROUP_SAMPLE_BYTES`]), decoded lossily.
    pub sample_output: String,
    pub sample_truncated: bool,
}

/// Most bytes of a group's `sample_output`.
pub const GROUP_SAMPLE_BYTES: usize = 2048;

fn policy_from_row(row: &sqlx::any::AnyRow) -> StoreResult<DispatchPolicy> {
    let rollout: Option<String> = row.try_get("rollout")?;
    Ok(DispatchPolicy {
        retry: RetryPolicy {
            backoff_seconds: row.try_get::<i64, _>("backoff_ms")? as f64 / 1000.0,
            factor: row.try_get("backoff_factor")?,
            max_backoff_seconds: row.try_get::<i64, _>("max_backoff_ms")? as f64 / 1000.0,
        },
        max_concurrency: row
            .try_get::<Option<i64>, _>("max_concurrency")?
            .map(|cap| cap as u32),
        rollout: match rollout {
            Some(text) => serde_json::from_str(&text)
                .map_err(|error| StoreError::Corrupt(format!("rollout: {error}")))?,
            None => Rollout::default(),
        },
    })
}

/// The dispatch policy of `event_id`, and whether the event may have a secret environment to
/// copy into a run's jobs (read in the same statement; true when the event has no policy row,
/// so that the copy is never skipped on a guess).
async fn policy_in(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
) -> StoreResult<(DispatchPolicy, bool)> {
    let row = sqlx::query(
        "SELECT backoff_ms, backoff_factor, max_backoff_ms, max_concurrency, rollout,
                CASE WHEN EXISTS (SELECT 1 FROM event_secret_env s WHERE s.event_id = $2) THEN 1 ELSE 0 END AS secrets
         FROM event_dispatch WHERE event_id = $1",
    )
    .bind(event_id)
    .bind(event_id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok((
            policy_from_row(&row)?,
            row.try_get::<i64, _>("secrets")? != 0,
        )),
        None => Ok((DispatchPolicy::default(), true)),
    }
}

fn seconds_to_ms(seconds: f64) -> i64 {
    (seconds * 1000.0).round() as i64
}

fn rollout_json(rollout: &Rollout) -> StoreResult<Option<String>> {
    if rollout.is_default() {
        return Ok(None);
    }
    serde_json::to_string(rollout)
        .map(Some)
        .map_err(|error| StoreError::Corrupt(error.to_string()))
}

/// What the event's dispatch policy (with a rollout override merged in) gives a run about to be
/// created: read before anything is inserted, so the run and its jobs are inserted with it.
#[derive(Debug, Clone)]
pub(crate) struct RunPlan {
    /// `jobs.backoff_ms`, `backoff_factor`, `max_backoff_ms` of every job.
    pub backoff: (i64, f64, i64),
    /// `jobs.offline_wait_ms` of every agent or pool job (SSH and control-plane jobs: NULL).
    pub offline_wait_ms: Option<i64>,
    /// `runs.rollout` (JSON; `None` for the default rollout).
    pub rollout: Option<String>,
    /// `runs.batch_size`: jobs per rollout batch, `None` for one batch.
    pub batch_size: Option<usize>,
    /// Whether the event may have a secret environment (false: there is none to copy).
    pub secret_env: bool,
}

/// The [`RunPlan`] of a run of `event_id` over `hosts` jobs (one query), in the caller's
/// transaction.
pub(crate) async fn plan_in(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
    over: Option<&(Rollout, RolloutFields)>,
    hosts: usize,
) -> StoreResult<RunPlan> {
    let (policy, secret_env) = policy_in(conn, event_id).await?;
    let rollout = match over {
        Some((over, given)) => policy.rollout.merged(over, given),
        None => policy.rollout.clone(),
    };
    let offline_wait_ms: Option<i64> = match rollout.offline {
        OfflinePolicy::Skip => Some(0),
        OfflinePolicy::Wait => rollout
            .deadline_seconds
            .map(|seconds| i64::from(seconds) * 1000),
    };
    Ok(RunPlan {
        backoff: (
            seconds_to_ms(policy.retry.backoff_seconds),
            policy.retry.factor,
            seconds_to_ms(policy.retry.max_backoff_seconds),
        ),
        offline_wait_ms,
        rollout: rollout_json(&rollout)?,
        batch_size: rollout.batch_size_for(hosts),
        secret_env,
    })
}

/// Numbers the rollout batches of a run just inserted with batches of `size` jobs, in the order
/// of the hosts' names (the first batch is 0, the jobs' default), in the caller's transaction.
pub(crate) async fn number_batches_in(
    conn: &mut sqlx::AnyConnection,
    run_id: &str,
    size: usize,
) -> StoreResult<()> {
    let runners: Vec<String> = sqlx::query_scalar(
        "SELECT j.id FROM jobs j LEFT JOIN agents a ON a.id = j.agent_id LEFT JOIN servers s ON s.id = j.server_id
         WHERE j.run_id = $1 ORDER BY COALESCE(a.name, s.name, j.runner), j.runner, j.id",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    for (index, job_id) in runners.iter().enumerate() {
        let batch = index / size.max(1);
        if batch > 0 {
            sqlx::query("UPDATE jobs SET batch = $1 WHERE id = $2")
                .bind(batch as i64)
                .bind(job_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// The `not_before` of a job whose attempt number `failed_attempt` just failed, at `now`: its
/// backoff with up to 10 % jitter added.
pub(crate) async fn retry_at_in(
    conn: &mut sqlx::AnyConnection,
    job_id: &str,
    failed_attempt: u32,
    now: i64,
) -> StoreResult<i64> {
    let (initial, factor, max): (i64, f64, i64) =
        sqlx::query_as("SELECT backoff_ms, backoff_factor, max_backoff_ms FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&mut *conn)
            .await?;
    let delay = backoff_ms(initial, factor, max, failed_attempt);
    let jitter = if delay > 0 {
        rand::Rng::gen_range(&mut rand::thread_rng(), 0..=delay / 10)
    } else {
        0
    };
    Ok(now + delay + jitter)
}

/// Checks the stop conditions of the run of `job_id`, which was just settled, in the caller's
/// transaction; when one trips, the run's jobs that have not started are cancelled
/// (`skip_reason = 'rollout_stopped'`) and the run records why. Returns whether it stopped.
///
/// With several writers (replicas on PostgreSQL) two transactions may settle jobs of one run
/// at once, and each would count the run's jobs without the other's settlement: the stop would
/// come a batch late or never. So a run with stop conditions is locked (its `runs` row, `FOR
/// NO KEY UPDATE`) before it is counted: the settlements of one run check in turn, and each counts,
/// in a snapshot taken after the lock was granted (READ COMMITTED), every settlement committed
/// before it; the last one sees them all. On SQLite the single writer serializes them already.
pub(crate) async fn settled_in(conn: &mut sqlx::AnyConnection, job_id: &str) -> StoreResult<bool> {
    let row = sqlx::query(
        "SELECT j.run_id, j.batch, r.rollout, r.stopped_at FROM jobs j JOIN runs r ON r.id = j.run_id WHERE j.id = $1",
    )
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let (Some(rollout), None) = (
        row.try_get::<Option<String>, _>("rollout")?,
        row.try_get::<Option<i64>, _>("stopped_at")?,
    ) else {
        return Ok(false);
    };
    let rollout: Rollout = serde_json::from_str(&rollout)
        .map_err(|error| StoreError::Corrupt(format!("rollout: {error}")))?;
    if rollout.max_failures.is_none() && rollout.min_success_percent.is_none() {
        return Ok(false);
    }
    let run_id: String = row.try_get("run_id")?;
    let batch: i64 = row.try_get("batch")?;
    let stopped: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT stopped_at FROM runs r WHERE id = $1{}",
        super::Backend::of(conn).lock_for_update_of("r", false)
    )))
    .bind(&run_id)
    .fetch_one(&mut *conn)
    .await?;
    if stopped.is_some() {
        // Another writer stopped it while this one waited for the lock.
        return Ok(false);
    }
    let (failed, completed, open_up_to_batch, queued): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE status = 'failed'), COUNT(*) FILTER (WHERE status = 'completed'),
                COUNT(*) FILTER (WHERE batch <= $1 AND status IN ('queued', 'claimed', 'running')),
                COUNT(*) FILTER (WHERE status = 'queued')
         FROM jobs WHERE run_id = $2",
    )
    .bind(batch)
    .bind(&run_id)
    .fetch_one(&mut *conn)
    .await?;
    let mut reason = None;
    if let Some(max) = rollout.max_failures
        && failed >= i64::from(max)
    {
        reason = Some(format!(
            "max_failures: {failed} host(s) failed (limit {max})"
        ));
    }
    if reason.is_none()
        && let Some(min) = rollout.min_success_percent
        && open_up_to_batch == 0
        && completed + failed > 0
        && completed * 100 < i64::from(min) * (completed + failed)
    {
        reason = Some(format!(
            "min_success_percent: {}% of the finished hosts succeeded (minimum {min}%)",
            completed * 100 / (completed + failed)
        ));
    }
    let Some(reason) = reason else {
        return Ok(false);
    };
    if queued == 0 {
        // Nothing left to stop: the run ends as it is.
        return Ok(false);
    }
    let now = now_ms();
    let cancelled = sqlx::query(
        "UPDATE jobs SET status = 'cancelled', reason = 'cancelled', skip_reason = 'rollout_stopped', settled_by = 'api',
         not_before = NULL, finished_at = $1 WHERE run_id = $2 AND status = 'queued'",
    )
    .bind(now)
    .bind(&run_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    super::observe::settled("cancelled", Some("rollout_stopped"), cancelled);
    sqlx::query("UPDATE runs SET stopped_reason = $1, stopped_at = $2 WHERE id = $3")
        .bind(&reason)
        .bind(now)
        .bind(&run_id)
        .execute(&mut *conn)
        .await?;
    audit_in(
        conn,
        "rollout_stopped",
        None,
        serde_json::json!({"run_id": run_id, "reason": reason, "cancelled": cancelled}),
    )
    .await?;
    Ok(true)
}

/// Placeholders `$first, $first+1, …` for `count` values.
/// The length a list of `count` ids or rows (1 ≤ `count` ≤ `max`) is written with in a
/// statement's text: the next power of two, at most `max`. Each length is a text of its own:
/// prepared anew on every connection, and on PostgreSQL planned anew for its first five runs
/// (until the plan cache settles on a generic plan). Batches of results and changes come in
/// every length, and planning those statements took ~15% of PostgreSQL's time while agents
/// drained a queue; rounded, a kind of statement has at most a handful of texts. The list is
/// filled up with copies of its last entry ([`padded`]), which the statements ignore: `IN`
/// and `DISTINCT` drop them, an `UPDATE … FROM` changes a row once.
pub(crate) fn padded_len(count: usize, max: usize) -> usize {
    count.next_power_of_two().min(max).max(count)
}

/// `items` (not empty) filled up to [`padded_len`] with copies of the last one.
pub(crate) fn padded<T: Clone>(items: &[T], max: usize) -> impl Iterator<Item = T> + '_ {
    let last = items.len().saturating_sub(1);
    (0..padded_len(items.len(), max)).map(move |index| items[index.min(last)].clone())
}

pub(crate) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Stores an event's dispatch policy in the caller's transaction.
pub(crate) async fn set_dispatch_policy_in(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
    policy: &DispatchPolicy,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO event_dispatch (event_id, backoff_ms, backoff_factor, max_backoff_ms, max_concurrency, rollout)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (event_id) DO UPDATE SET backoff_ms = excluded.backoff_ms, backoff_factor = excluded.backoff_factor,
         max_backoff_ms = excluded.max_backoff_ms, max_concurrency = excluded.max_concurrency, rollout = excluded.rollout",
    )
    .bind(event_id)
    .bind(seconds_to_ms(policy.retry.backoff_seconds))
    .bind(policy.retry.factor)
    .bind(seconds_to_ms(policy.retry.max_backoff_seconds))
    .bind(policy.max_concurrency.map(i64::from))
    .bind(rollout_json(&policy.rollout)?)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// The dispatch policy of an event (the defaults when it has none stored).
    pub async fn dispatch_policy(&self, event_id: &str) -> StoreResult<DispatchPolicy> {
        let row = sqlx::query(
            "SELECT backoff_ms, backoff_factor, max_backoff_ms, max_concurrency, rollout FROM event_dispatch WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref()
            .map_or_else(|| Ok(DispatchPolicy::default()), policy_from_row)
    }

    /// The stored dispatch policies by event id (events without one are missing).
    pub async fn dispatch_policies(&self) -> StoreResult<HashMap<String, DispatchPolicy>> {
        let rows = sqlx::query(
            "SELECT event_id, backoff_ms, backoff_factor, max_backoff_ms, max_concurrency, rollout FROM event_dispatch",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("event_id")?, policy_from_row(row)?)))
            .collect()
    }

    /// Stores an event's dispatch policy.
    pub async fn set_dispatch_policy(
        &self,
        event_id: &str,
        policy: &DispatchPolicy,
    ) -> StoreResult<()> {
        let (event_id, policy) = (event_id.to_string(), policy.clone());
        write_op!(self, |conn| async {
            set_dispatch_policy_in(conn, &event_id, &policy).await
        })
        .await
    }

    /// Creates a run like [`Store::create_run`], with a rollout override merged over the
    /// event's and, for `POST /runs/{id}/retry`, the run it retries. One transaction.
    pub async fn create_run_dispatched(
        &self,
        spec: RunSpec,
        over: Option<(Rollout, RolloutFields)>,
        retry_of: Option<String>,
    ) -> StoreResult<(String, Vec<(String, String)>)> {
        write_op!(self, |conn| async {
            let (run_id, jobs) = create_run_over_in(conn, &spec, over.as_ref()).await?;
            if let Some(retry_of) = &retry_of {
                sqlx::query("UPDATE runs SET retry_of = $1 WHERE id = $2")
                    .bind(retry_of)
                    .bind(&run_id)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok((run_id, jobs))
        })
        .await
    }

    /// The rollout (as recorded) of a run, for [`Store::create_run_dispatched`] on a retry.
    pub async fn run_dispatch(&self, run_id: &str) -> StoreResult<RunDispatch> {
        let row = sqlx::query(
            "SELECT r.rollout, r.batch_size, r.stopped_reason, r.stopped_at, r.retry_of,
                    (SELECT COALESCE(MAX(batch), 0) + 1 FROM jobs WHERE run_id = r.id) AS batches,
                    (SELECT MIN(batch) FROM jobs WHERE run_id = r.id AND status IN ('queued', 'claimed', 'running')) AS current
             FROM runs r WHERE r.id = $1",
        )
        .bind(run_id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        let rollout: Option<String> = row.try_get("rollout")?;
        Ok(RunDispatch {
            rollout: rollout
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|error| StoreError::Corrupt(format!("rollout: {error}")))?,
            batch_size: row
                .try_get::<Option<i64>, _>("batch_size")?
                .map(|size| size as u32),
            batches: row.try_get::<i64, _>("batches")? as u32,
            current_batch: row
                .try_get::<Option<i64>, _>("current")?
                .map(|batch| batch as u32),
            stopped_reason: row.try_get("stopped_reason")?,
            stopped_at: row.try_get("stopped_at")?,
            retry_of: row.try_get("retry_of")?,
        })
    }

    /// Runners with a queued job that became due in `(after, up_to]`.
    pub async fn runners_due(&self, after: i64, up_to: i64) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT COALESCE(j.runner, c.agent_id) AS runner FROM jobs j
               LEFT JOIN job_candidates c ON j.runner IS NULL AND c.job_id = j.id
             WHERE j.status = 'queued' AND j.not_before > $1 AND j.not_before <= $2 AND COALESCE(j.runner, c.agent_id) IS NOT NULL",
        )
        .bind(after)
        .bind(up_to)
        .fetch_all(&self.reader)
        .await?)
    }

    /// The earliest `not_before` of a queued job after `after`.
    pub async fn next_due(&self, after: i64) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(not_before) FROM jobs WHERE status = 'queued' AND not_before > $1",
        )
        .bind(after)
        .fetch_one(&self.reader)
        .await?)
    }

    /// Runners that may be able to claim now that the jobs `job_ids` changed: those with a
    /// queued, due job held back by a batch of the same run or by the concurrency limit of the
    /// same event. The queued jobs are looked up from the changed jobs' runs and their events
    /// that have a limit (each once), never the events' whole queues: this runs after every
    /// batch of results, and with a pool event of thousands of queued jobs (none held back) it
    /// cost ~50 ms each time, and up to 13 s when PostgreSQL joined every changed run to its
    /// event's queue before it looked at the limit (see [`wake_query`]).
    pub async fn runners_to_wake(&self, job_ids: &[String], now: i64) -> StoreResult<Vec<String>> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.backend().positional(wake_query(
            self.backend(),
            padded_len(job_ids.len(), usize::MAX),
        ));
        let mut query = sqlx::query_scalar(AssertSqlSafe(sql));
        for id in padded(job_ids, usize::MAX) {
            query = query.bind(id);
        }
        Ok(query.bind(now).fetch_all(&self.hot).await?)
    }

    /// Every runner with a claimable job held back by a batch or a concurrency limit (after
    /// missed change notifications).
    pub async fn runners_held_back(&self, now: i64) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT COALESCE(q.runner, c.agent_id) FROM jobs q LEFT JOIN event_dispatch d ON d.event_id = q.event_id
               LEFT JOIN job_candidates c ON q.runner IS NULL AND c.job_id = q.id
             WHERE q.status = 'queued' AND (q.not_before IS NULL OR q.not_before <= $1)
               AND (q.batch > 0 OR d.max_concurrency IS NOT NULL) AND COALESCE(q.runner, c.agent_id) IS NOT NULL",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await?)
    }

    /// Whether any queued agent job has an offline deadline (the dispatcher then checks every
    /// second).
    pub async fn any_offline_wait(&self) -> StoreResult<bool> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE status = 'queued' AND offline_wait_ms IS NOT NULL LIMIT 1) AS waiting",
        )
        .fetch_one(&self.reader)
        .await?
            > 0)
    }

    /// Queued agent jobs whose batch started at least their offline wait ago: `(job, agent)`, a
    /// pair per candidate for a pool job. The caller skips those whose agents are all offline
    /// ([`Store::skip_offline`]).
    pub async fn offline_candidates(&self, now: i64) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT j.id, COALESCE(j.agent_id, c.agent_id) FROM jobs j JOIN runs r ON r.id = j.run_id
               LEFT JOIN job_candidates c ON j.agent_id IS NULL AND c.job_id = j.id
             WHERE j.status = 'queued' AND j.offline_wait_ms IS NOT NULL AND COALESCE(j.agent_id, c.agent_id) IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM jobs b WHERE b.run_id = j.run_id AND b.batch < j.batch
                               AND b.status IN ('queued', 'claimed', 'running'))
               AND COALESCE((SELECT MAX(finished_at) FROM jobs b WHERE b.run_id = j.run_id AND b.batch < j.batch),
                            r.created_at) + j.offline_wait_ms <= $1",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await?)
    }

    /// Marks queued jobs skipped because their agent is offline (`cancelled`, `skip_reason =
    /// 'offline'`); returns the ids it changed (jobs claimed meanwhile are left alone).
    pub async fn skip_offline(&self, job_ids: &[String]) -> StoreResult<Vec<String>> {
        let job_ids = job_ids.to_vec();
        write_op!(self, |conn| async {
            let now = now_ms();
            let mut skipped = Vec::new();
            for job_id in &job_ids {
                let changed = sqlx::query(
                    "UPDATE jobs SET status = 'cancelled', reason = 'cancelled', skip_reason = 'offline', settled_by = 'api',
                     not_before = NULL, finished_at = $1 WHERE id = $2 AND status = 'queued'",
                )
                .bind(now)
                .bind(job_id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if changed > 0 {
                    super::observe::settled("cancelled", Some("offline"), 1);
                    settled_in(conn, job_id).await?;
                    skipped.push(job_id.clone());
                }
            }
            Ok(skipped)
        })
        .await
    }

    /// The ids of a run's jobs for a retry: failed ones, and with `not_started` also those
    /// cancelled before any attempt (skipped, stopped rollout, cancelled while queued).
    pub async fn retry_runners(&self, run_id: &str, not_started: bool) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT runner FROM jobs WHERE run_id = $1 AND runner IS NOT NULL
               AND (status = 'failed' OR ($2 AND status = 'cancelled' AND attempt = 0))
             ORDER BY runner",
        )
        .bind(run_id)
        .bind(not_started)
        .fetch_all(&self.reader)
        .await?)
    }

    /// A run's final jobs grouped by identical output, status and exit code, biggest group
    /// first.
    pub async fn run_output_groups(&self, run_id: &str) -> StoreResult<Vec<OutputGroup>> {
        let jobs: Vec<(String, String, Option<i64>, i64)> = sqlx::query_as(
            "SELECT id, status, exit_code, log_len FROM jobs WHERE run_id = $1
               AND status IN ('completed', 'failed', 'cancelled') AND skip_reason IS NULL ORDER BY id",
        )
        .bind(run_id)
        .fetch_all(&self.reader)
        .await?;
        let mut groups: BTreeMap<(String, String, Option<i64>), OutputGroup> = BTreeMap::new();
        for (job_id, status, exit_code, log_len) in jobs {
            let mut hasher = Sha256::new();
            let mut tail: Vec<u8> = Vec::new();
            let tail_from = (log_len as u64).saturating_sub(GROUP_SAMPLE_BYTES as u64);
            {
                let mut rows = sqlx::query_as::<_, (i64, Vec<u8>)>(
                    "SELECT \"offset\", data FROM job_logs WHERE job_id = $1 ORDER BY \"offset\"",
                )
                .bind(&job_id)
                .fetch(&self.reader);
                while let Some((offset, data)) =
                    futures_util::TryStreamExt::try_next(&mut rows).await?
                {
                    hasher.update(&data);
                    let end = offset as u64 + data.len() as u64;
                    if end > tail_from {
                        let skip = tail_from.saturating_sub(offset as u64) as usize;
                        tail.extend_from_slice(&data[skip.min(data.len())..]);
                    }
                }
            }
            let digest = hex::encode(hasher.finalize());
            let key = (digest.clone(), status.clone(), exit_code);
            let group = groups.entry(key).or_insert_with(|| OutputGroup {
                output_sha256: digest,
                status,
                exit_code: exit_code.map(|code| code as i32),
                job_ids: Vec::new(),
                sample_output: String::from_utf8_lossy(&tail).into_owned(),
                sample_truncated: tail_from > 0,
            });
            group.job_ids.push(job_id);
        }
        let mut groups: Vec<OutputGroup> = groups.into_values().collect();
        groups.sort_by(|a, b| {
            b.job_ids
                .len()
                .cmp(&a.job_ids.len())
                .then_with(|| a.job_ids.cmp(&b.job_ids))
        });
        Ok(groups)
    }
}

/// The query of [`Store::runners_to_wake`] for `ids` changed jobs: `$1…$ids` the ids, then the
/// time.
///
/// On PostgreSQL the changed jobs are looked up one by one, the queued jobs per changed run
/// and per limited event, and each held job's runner or candidates, in `LATERAL` subqueries
/// kept apart from the joins (`OFFSET 0`), so
/// the plan has to start from the few changed jobs: with statistics that said nothing was queued, PostgreSQL otherwise read the
/// whole queue first and joined the changed runs to it. SQLite has no `LATERAL` and plans these
/// joins from the changed jobs by itself.
pub(crate) fn wake_query(backend: super::Backend, ids: usize) -> String {
    const SETTLED: &str = "status IN ('queued', 'completed', 'failed', 'cancelled')";
    let now = ids + 1;
    let (changed, per_run, per_limited_event, runners) = match backend {
        super::Backend::Postgres => (
            format!(
                "SELECT DISTINCT j.run_id, j.event_id FROM (VALUES {}) AS w (id)
                 CROSS JOIN LATERAL (SELECT run_id, event_id FROM jobs WHERE id = w.id AND {SETTLED} OFFSET 0) AS j",
                (1..=ids)
                    .map(|n| format!("(${n})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            // The status in a form no index answers: the jobs of a run are found through
            // `jobs_run`, never by reading every queued job.
            "changed s CROSS JOIN LATERAL (SELECT q.id FROM jobs q WHERE q.run_id = s.run_id
                                             AND (q.status = 'queued') IS TRUE AND q.batch > 0 OFFSET 0) AS q",
            "limited l CROSS JOIN LATERAL (SELECT q.id FROM jobs q WHERE q.event_id = l.event_id
                                             AND q.status = 'queued' OFFSET 0) AS q",
            // Each held job and its candidates looked up by key: joined, the generic plan made
            // on statistics that knew a backlog hashed all of `jobs` and `job_candidates`.
            format!(
                "held h CROSS JOIN LATERAL (SELECT j.id, j.runner FROM jobs j WHERE j.id = h.id
                                              AND (j.not_before IS NULL OR j.not_before <= ${now}) OFFSET 0) AS q
                 LEFT JOIN LATERAL (SELECT c.agent_id FROM job_candidates c
                                    WHERE q.runner IS NULL AND c.job_id = q.id OFFSET 0) AS c ON TRUE"
            ),
        ),
        super::Backend::Sqlite => (
            format!(
                "SELECT DISTINCT run_id, event_id FROM jobs WHERE id IN ({}) AND {SETTLED}",
                placeholders(1, ids)
            ),
            "changed s JOIN jobs q ON q.run_id = s.run_id AND q.status = 'queued' AND q.batch > 0",
            "limited l JOIN jobs q ON q.event_id = l.event_id AND q.status = 'queued'",
            format!(
                "held h JOIN jobs q ON q.id = h.id AND (q.not_before IS NULL OR q.not_before <= ${now})
                 LEFT JOIN job_candidates c ON q.runner IS NULL AND c.job_id = q.id"
            ),
        ),
    };
    format!(
        "WITH changed AS MATERIALIZED ({changed}),
         limited AS MATERIALIZED (
           SELECT d.event_id FROM event_dispatch d
           WHERE d.max_concurrency IS NOT NULL AND d.event_id IN (SELECT event_id FROM changed)),
         held AS (SELECT q.id FROM {per_run} UNION SELECT q.id FROM {per_limited_event})
         SELECT DISTINCT COALESCE(q.runner, c.agent_id) FROM {runners}
         WHERE COALESCE(q.runner, c.agent_id) IS NOT NULL"
    )
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
pub(super) mod tests;

#[cfg(test)]
#[path = "rollout_writers_tests.rs"]
mod writers_tests;
