//! Runs, jobs and their logs: the durable queue.
//!
//! A job belongs to one agent. Its lifecycle is `queued → claimed → running → completed |
//! failed | cancelled`; every claim starts a new attempt with a lease that heartbeats renew.
//! Only the current attempt of the agent it was claimed by can move a job forward; anything
//! else is stale and refused.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Backend, Store, StoreError, StoreResult, audit_in, new_id, now_ms, write_op};

/// Where a job is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Claimed,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Claimed => "claimed",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        Some(match text {
            "queued" => JobStatus::Queued,
            "claimed" => JobStatus::Claimed,
            "running" => JobStatus::Running,
            "completed" => JobStatus::Completed,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    /// Whether the job has ended for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Why a job failed (or, for `Cancelled`, that it was cancelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    ExitCode,
    Timeout,
    Lost,
    Spawn,
    Signal,
    Oom,
    Cancelled,
    Revoked,
    /// An HTTP request job's answer had a status that is not an expected one.
    HttpStatus,
    /// An HTTP request job got no answer (DNS, connection, TLS, reading the answer).
    HttpError,
    /// A tool action job's message was not delivered.
    Delivery,
    /// Not started: the run's rollout stopped (a stop condition tripped). Status `cancelled`.
    RolloutStopped,
    /// Skipped: the agent was offline when the job's batch started (and stayed offline for the
    /// rollout's `deadline_seconds`). Status `cancelled`.
    Offline,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ExitCode => "exit_code",
            Reason::Timeout => "timeout",
            Reason::Lost => "lost",
            Reason::Spawn => "spawn",
            Reason::Signal => "signal",
            Reason::Oom => "oom",
            Reason::Cancelled => "cancelled",
            Reason::Revoked => "revoked",
            Reason::HttpStatus => "http_status",
            Reason::HttpError => "http_error",
            Reason::Delivery => "delivery",
            Reason::RolloutStopped => "rollout_stopped",
            Reason::Offline => "offline",
        }
    }

    pub fn parse(text: &str) -> Option<Reason> {
        Some(match text {
            "exit_code" => Reason::ExitCode,
            "timeout" => Reason::Timeout,
            "lost" => Reason::Lost,
            "spawn" => Reason::Spawn,
            "signal" => Reason::Signal,
            "oom" => Reason::Oom,
            "cancelled" => Reason::Cancelled,
            "revoked" => Reason::Revoked,
            "http_status" => Reason::HttpStatus,
            "http_error" => Reason::HttpError,
            "delivery" => Reason::Delivery,
            "rollout_stopped" => Reason::RolloutStopped,
            "offline" => Reason::Offline,
            _ => return None,
        })
    }
}

/// Which output a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    System,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::System => "system",
        }
    }

    fn parse(text: &str) -> Option<Stream> {
        match text {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            "system" => Some(Stream::System),
            _ => None,
        }
    }
}

/// A piece of a job's log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogChunk {
    pub offset: u64,
    pub stream: Stream,
    pub data: Vec<u8>,
}

/// A stored job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub run_id: String,
    pub event_id: String,
    /// The agent that runs it; `None` for an SSH fallback job.
    pub agent_id: Option<String>,
    /// The SSH server the control plane runs it on (SSH fallback), if any.
    pub server_id: Option<String>,
    pub status: JobStatus,
    pub reason: Option<Reason>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub exit_code: Option<i32>,
    pub result: Option<String>,
    /// The condition the script set with the `set_condition` helper.
    pub condition: Option<bool>,
    pub log_len: u64,
    pub cancel_requested: bool,
    pub queued_at: i64,
    pub claimed_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// A queued job is not claimed before this time (a retry's backoff).
    pub not_before: Option<i64>,
    /// Its batch in the run's rollout (0: the first).
    pub batch: u32,
    /// JSON of the previous failed attempt (`attempt`, `reason`, `exit_code`, `finished_at`,
    /// `output_tail`), whose log the next attempt replaced.
    pub last_failure: Option<String>,
    /// The one job of a pool target (`store::pool`): `agent_id` is the agent that claimed the
    /// current attempt, `None` while the job waits in the pool.
    pub pool: bool,
}

/// A job as handed to an agent by a claim. Its `Debug` shows neither script nor environment.
#[derive(Clone)]
pub struct ClaimedJob {
    pub id: String,
    pub attempt: u32,
    pub run_id: String,
    pub event_id: String,
    /// `bash`, `python` or `nodejs`.
    pub kind: String,
    pub script: String,
    pub env: BTreeMap<String, String>,
    pub input: Option<String>,
    pub timeout_seconds: u32,
    /// JSON of the container settings (`cronium_protocol::DockerSpec`); `None`: a host job.
    pub runtime_spec: Option<String>,
    /// The secret environment copied from the event: (name, value sealed with the key).
    pub secret_env: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ClaimedJob {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClaimedJob")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A run: one trigger of an event, with one job per target agent.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub event_id: String,
    pub input: Option<String>,
    pub created_at: i64,
    /// `manual` (the API) or `schedule`.
    pub trigger: String,
    /// The schedule slot the run was created for.
    pub slot_at: Option<i64>,
    /// Slots missed during downtime this run stands for (misfire policy `run_once`).
    pub missed_slots: i64,
    pub jobs: Vec<Job>,
}

/// A run's status, derived from its jobs' statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        Some(match text {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }

    /// The status of a run with these jobs: running while any job is (or some are still
    /// queued while others ended), queued while all are, then failed if any failed, cancelled
    /// if jobs were cancelled and none completed, else completed.
    pub fn of(jobs: &[Job]) -> RunStatus {
        let count = |statuses: &[JobStatus]| {
            jobs.iter()
                .filter(|job| statuses.contains(&job.status))
                .count()
        };
        let queued = count(&[JobStatus::Queued]);
        let running = count(&[JobStatus::Claimed, JobStatus::Running]);
        let completed = count(&[JobStatus::Completed]);
        let failed = count(&[JobStatus::Failed]);
        let cancelled = count(&[JobStatus::Cancelled]);
        if running > 0 || (queued > 0 && queued < jobs.len()) {
            RunStatus::Running
        } else if queued > 0 {
            RunStatus::Queued
        } else if failed > 0 {
            RunStatus::Failed
        } else if cancelled > 0 && completed == 0 {
            RunStatus::Cancelled
        } else {
            RunStatus::Completed
        }
    }

    /// The same rule over the counts [`Store::recent_runs`] computes, as an SQL condition.
    fn sql_condition(self) -> &'static str {
        match self {
            RunStatus::Running => "running > 0 OR (queued > 0 AND queued < total)",
            RunStatus::Queued => "running = 0 AND queued > 0 AND queued = total",
            RunStatus::Failed => "running = 0 AND queued = 0 AND failed > 0",
            RunStatus::Cancelled => {
                "running = 0 AND queued = 0 AND failed = 0 AND cancelled > 0 AND completed = 0"
            }
            RunStatus::Completed => {
                "running = 0 AND queued = 0 AND failed = 0 AND NOT (cancelled > 0 AND completed = 0)"
            }
        }
    }
}

/// An owned run to create inside a caller's transaction (see [`create_run_in`]).
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub event_id: String,
    pub kind: String,
    pub script: String,
    /// JSON of the environment.
    pub env: String,
    pub runtime_spec: Option<String>,
    pub input: Option<String>,
    pub timeout_seconds: u32,
    pub max_attempts: u32,
    pub created_by: String,
    pub agent_ids: Vec<String>,
    /// `manual` or `schedule`.
    pub trigger: &'static str,
    pub slot_at: Option<i64>,
    pub missed_slots: i64,
    /// One pool job (`store::pool`) whose candidates are `agent_ids`, instead of a job each.
    pub pool: bool,
}

impl RunSpec {
    /// The owned form of `new_run`, triggered manually.
    pub fn manual(new_run: &NewRun<'_>) -> StoreResult<RunSpec> {
        Ok(RunSpec {
            event_id: new_run.event_id.to_string(),
            kind: new_run.kind.to_string(),
            script: new_run.script.to_string(),
            env: serde_json::to_string(new_run.env)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?,
            runtime_spec: new_run.runtime_spec.map(str::to_string),
            input: new_run.input.map(str::to_string),
            timeout_seconds: new_run.timeout_seconds,
            max_attempts: new_run.max_attempts,
            created_by: new_run.created_by.to_string(),
            agent_ids: new_run.agent_ids.to_vec(),
            trigger: "manual",
            slot_at: None,
            missed_slots: 0,
            pool: false,
        })
    }
}

/// The runner key of an SSH fallback job: `ssh:` followed by the server's id. Agent ids are
/// UUIDs, so the two never collide. The store functions that check "the current attempt of this
/// agent" take a runner key, so SSH jobs move forward through the same functions as agent jobs.
pub const SSH_RUNNER_PREFIX: &str = "ssh:";

/// The runner key of jobs the control plane runs itself (HTTP requests with executor
/// `control_plane`, tool actions; `actions/`). Such a job has neither an agent nor a server.
pub const CONTROL_PLANE_RUNNER: &str = "control-plane";

/// Jobs inserted per statement by [`create_run_over_in`] ([`JOB_INSERT_BINDS`] values each,
/// far below the limits of bound parameters).
const JOB_INSERT_ROWS: usize = 50;

/// Values bound per job row by [`create_run_over_in`].
const JOB_INSERT_BINDS: usize = 18;

/// Writes a run and one queued job per runner (agent id, or `ssh:<server id>`) in the caller's
/// transaction; returns the run id and `(job id, runner)` pairs. A pool run (`spec.pool`) gets
/// one job and a pair per candidate agent (the runners to wake; `store::pool`). The event's
/// dispatch policy applies (`store::dispatch`).
pub(crate) async fn create_run_in(
    conn: &mut sqlx::AnyConnection,
    spec: &RunSpec,
) -> StoreResult<(String, Vec<(String, String)>)> {
    create_run_over_in(conn, spec, None).await
}

/// [`create_run_in`] with a rollout override merged over the event's. The policy is read first
/// and written with the run and its jobs, so a run over many hosts is a handful of statements:
/// the policy (with whether the event has a secret environment), the run, its jobs
/// ([`JOB_INSERT_ROWS`] per statement), their secret environment only when the event has one,
/// and the batch numbers only when the rollout has batches.
pub(crate) async fn create_run_over_in(
    conn: &mut sqlx::AnyConnection,
    spec: &RunSpec,
    over: Option<&(super::dispatch::Rollout, super::dispatch::RolloutFields)>,
) -> StoreResult<(String, Vec<(String, String)>)> {
    let run_id = new_id();
    let now = now_ms();
    let hosts = if spec.pool { 1 } else { spec.agent_ids.len() };
    let plan = super::dispatch::plan_in(conn, &spec.event_id, over, hosts).await?;
    sqlx::query(
        "INSERT INTO runs (id, event_id, input, created_by, created_at, trigger, slot_at, missed_slots, rollout, batch_size)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&run_id)
    .bind(&spec.event_id)
    .bind(&spec.input)
    .bind(&spec.created_by)
    .bind(now)
    .bind(spec.trigger)
    .bind(spec.slot_at)
    .bind(spec.missed_slots)
    .bind(&plan.rollout)
    .bind(plan.batch_size.map(|size| size as i64))
    .execute(&mut *conn)
    .await?;
    if spec.pool {
        let jobs = super::pool::insert_job_in(conn, &run_id, spec, &plan, now).await?;
        if plan.secret_env {
            super::secrets::copy_secret_env_to_run_in(conn, &spec.event_id, &run_id).await?;
        }
        return Ok((run_id, jobs));
    }
    let jobs: Vec<(String, String)> = spec
        .agent_ids
        .iter()
        .map(|agent_id| (new_id(), agent_id.clone()))
        .collect();
    // Many rows per statement: a fan-out to a thousand hosts is twenty statements, not a
    // thousand (the writer's time is shared by every claim and result).
    for chunk in jobs.chunks(JOB_INSERT_ROWS) {
        let rows = (0..chunk.len())
            .map(|row| {
                let first = row * JOB_INSERT_BINDS + 1;
                format!(
                    "({}, 'queued')",
                    super::dispatch::placeholders(first, JOB_INSERT_BINDS)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let statement = format!(
            "INSERT INTO jobs (id, run_id, event_id, agent_id, server_id, on_control_plane, max_attempts, kind, script, env, input, timeout_seconds, queued_at, runtime_spec,
                               backoff_ms, backoff_factor, max_backoff_ms, offline_wait_ms, status)
             VALUES {rows}"
        );
        let mut query = sqlx::query(AssertSqlSafe(Backend::of(conn).positional(statement)));
        for (job_id, agent_id) in chunk {
            // A runner key `ssh:<server id>` is a job the control plane runs over SSH.
            // The runner key `control-plane` is a job the control plane runs itself.
            let on_control_plane = agent_id == CONTROL_PLANE_RUNNER;
            let (agent, server) = match agent_id.strip_prefix(SSH_RUNNER_PREFIX) {
                _ if on_control_plane => (None, None),
                Some(server_id) => (None, Some(server_id)),
                None => (Some(agent_id.as_str()), None),
            };
            // Only agents go offline: an SSH or control-plane job never waits for one.
            let offline_wait_ms = agent.and(plan.offline_wait_ms);
            query = query
                .bind(job_id)
                .bind(&run_id)
                .bind(&spec.event_id)
                .bind(agent)
                .bind(server)
                .bind(i64::from(on_control_plane));
            query = bind_job_settings(query, spec, &plan, now).bind(offline_wait_ms);
        }
        query.execute(&mut *conn).await?;
    }
    if plan.secret_env {
        super::secrets::copy_secret_env_to_run_in(conn, &spec.event_id, &run_id).await?;
    }
    if let Some(size) = plan.batch_size {
        super::dispatch::number_batches_in(conn, &run_id, size).await?;
    }
    Ok((run_id, jobs))
}

/// Binds what a new job copies of its run (`spec`, `plan`), in this column order: `max_attempts,
/// kind, script, env, input, timeout_seconds, queued_at` (`now`)`, runtime_spec, backoff_ms,
/// backoff_factor, max_backoff_ms`.
pub(super) fn bind_job_settings<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    spec: &'q RunSpec,
    plan: &super::dispatch::RunPlan,
    now: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    query
        .bind(spec.max_attempts as i64)
        .bind(&spec.kind)
        .bind(&spec.script)
        .bind(&spec.env)
        .bind(&spec.input)
        .bind(spec.timeout_seconds as i64)
        .bind(now)
        .bind(&spec.runtime_spec)
        .bind(plan.backoff.0)
        .bind(plan.backoff.1)
        .bind(plan.backoff.2)
}

/// Input to [`Store::create_run`]: the event's settings are copied into each job, so editing
/// the event later does not change what an accepted job runs.
#[derive(Debug)]
pub struct NewRun<'a> {
    pub event_id: &'a str,
    pub kind: &'a str,
    pub script: &'a str,
    pub env: &'a BTreeMap<String, String>,
    /// JSON of the container settings (`cronium_protocol::DockerSpec`); `None`: a host job.
    pub runtime_spec: Option<&'a str>,
    pub input: Option<&'a str>,
    pub timeout_seconds: u32,
    pub max_attempts: u32,
    pub created_by: &'a str,
    pub agent_ids: &'a [String],
}

/// An attempt as named on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub job_id: String,
    pub attempt: u32,
}

/// What [`Store::open_attempt`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenedAttempt {
    /// The attempt is current; the log is stored up to `log_len`.
    Current { log_len: u64 },
    /// The attempt already delivered its result.
    Finished { log_len: u64 },
    /// The attempt is not current (audited).
    Stale,
}

/// The end of an attempt as reported by its agent.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub status: JobStatus,
    pub reason: Option<Reason>,
    pub exit_code: Option<i32>,
    pub log_len: u64,
    pub result: Option<String>,
    pub condition: Option<bool>,
}

/// What [`Store::finish_attempt`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishOutcome {
    /// Recorded as final; `notified`: the event's `notify` enqueued a notification in the same
    /// transaction (wake the dispatcher).
    Recorded { notified: bool },
    /// The attempt failed and the job was queued again for another attempt.
    Requeued,
    /// This attempt's result was already recorded.
    Duplicate,
    /// The attempt is not current; refused and audited.
    Stale,
    /// The stored log is not `log_len` bytes long; nothing was recorded.
    LengthMismatch { stored: u64 },
}

/// What [`Store::request_cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job had not been claimed; it is cancelled now.
    Cancelled,
    /// The job is running on an agent, which must be told.
    Requested { agent_id: String, attempt: u32 },
    /// The job had already ended.
    AlreadyFinal,
}

/// A job whose lease ran out.
#[derive(Debug, Clone)]
pub struct ExpiredJob {
    pub job_id: String,
    pub agent_id: String,
    /// Queued again for another attempt (as opposed to settled as lost or cancelled).
    pub requeued: bool,
    /// The settlement enqueued the event's `notify` notification (wake the dispatcher).
    pub notified: bool,
    /// A re-queued pool job's candidates (wake them, not `agent_id`); empty otherwise.
    pub candidates: Vec<String>,
}

const JOB_COLUMNS: &str = "id, run_id, event_id, agent_id, server_id, status, reason, attempt, max_attempts, exit_code, result, condition, log_len,
     cancel_requested, queued_at, claimed_at, started_at, finished_at, not_before, batch, skip_reason, last_failure, pool";

fn job_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Job> {
    let status: String = row.try_get("status")?;
    // A skipped or not-started job is `cancelled`; its reason says why.
    let reason: Option<String> = row
        .try_get::<Option<String>, _>("skip_reason")?
        .or(row.try_get("reason")?);
    Ok(Job {
        id: row.try_get("id")?,
        run_id: row.try_get("run_id")?,
        event_id: row.try_get("event_id")?,
        agent_id: row.try_get("agent_id")?,
        server_id: row.try_get("server_id")?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?,
        reason: match reason {
            Some(reason) => Some(
                Reason::parse(&reason)
                    .ok_or_else(|| StoreError::Corrupt(format!("reason {reason:?}")))?,
            ),
            None => None,
        },
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        exit_code: row
            .try_get::<Option<i64>, _>("exit_code")?
            .map(|code| code as i32),
        result: row.try_get("result")?,
        condition: row
            .try_get::<Option<i64>, _>("condition")?
            .map(|condition| condition != 0),
        log_len: row.try_get::<i64, _>("log_len")? as u64,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        queued_at: row.try_get("queued_at")?,
        claimed_at: row.try_get("claimed_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        not_before: row.try_get("not_before")?,
        batch: row.try_get::<i64, _>("batch")? as u32,
        last_failure: row.try_get("last_failure")?,
        pool: row.try_get::<i64, _>("pool")? != 0,
    })
}

/// Inserts log chunks that continue a log of `log_len` bytes; returns the new length.
/// Chunks must be contiguous; the caller checked that.
pub(super) async fn insert_chunks(
    tx: &mut sqlx::AnyConnection,
    job_id: &str,
    mut log_len: u64,
    chunks: &[LogChunk],
) -> StoreResult<u64> {
    for chunk in chunks {
        if chunk.data.is_empty() {
            continue;
        }
        if chunk.offset != log_len {
            return Err(StoreError::Corrupt(format!(
                "log chunk at {} does not continue a log of {log_len} bytes",
                chunk.offset
            )));
        }
        sqlx::query(
            "INSERT INTO job_logs (job_id, \"offset\", stream, data) VALUES ($1, $2, $3, $4)",
        )
        .bind(job_id)
        .bind(chunk.offset as i64)
        .bind(chunk.stream.as_str())
        .bind(&chunk.data)
        .execute(&mut *tx)
        .await?;
        log_len += chunk.data.len() as u64;
    }
    Ok(log_len)
}

/// Most lines of a job's output a settlement notification quotes.
pub const NOTIFY_OUTPUT_LINES: usize = 20;

/// Most bytes of a job's output a settlement notification quotes.
pub const NOTIFY_OUTPUT_BYTES: usize = 2048;

/// Cuts `text` to at most `max` bytes on a character boundary.
fn clip_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Records the end of one attempt with its last log chunks, in the caller's transaction: the
/// general path of [`Store::finish_attempt`], right for every case (`result_batch` takes a
/// shorter one for the common case and comes here for the others).
pub(super) async fn finish_one_in(
    conn: &mut sqlx::AnyConnection,
    agent_id: &str,
    attempt: &Attempt,
    chunks: &[LogChunk],
    result: &AttemptResult,
) -> StoreResult<FinishOutcome> {
    let now = now_ms();
    let row = sqlx::query(
            "SELECT runner AS agent_id, status, attempt, max_attempts, cancel_requested, settled_by, log_len FROM jobs WHERE id = $1",
        )
        .bind(&attempt.job_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(FinishOutcome::Stale);
    };
    let status =
        JobStatus::parse(&row.try_get::<String, _>("status")?).unwrap_or(JobStatus::Failed);
    let same_attempt = row.try_get::<i64, _>("attempt")? as u32 == attempt.attempt
        && row.try_get::<String, _>("agent_id")? == agent_id;
    if !(same_attempt && matches!(status, JobStatus::Claimed | JobStatus::Running)) {
        if same_attempt
            && status.is_final()
            && row.try_get::<Option<String>, _>("settled_by")?.as_deref() == Some("agent")
        {
            return Ok(FinishOutcome::Duplicate);
        }
        audit_in(
                conn,
                "stale_result",
                Some(agent_id),
                serde_json::json!({"job_id": attempt.job_id, "attempt": attempt.attempt, "status": result.status.as_str()}),
            )
            .await?;
        return Ok(FinishOutcome::Stale);
    }
    // Check before writing anything: a refused result must leave no trace.
    let stored_len = row.try_get::<i64, _>("log_len")? as u64;
    let complete_len = stored_len
        + chunks
            .iter()
            .map(|chunk| chunk.data.len() as u64)
            .sum::<u64>();
    if complete_len != result.log_len {
        return Ok(FinishOutcome::LengthMismatch {
            stored: complete_len,
        });
    }
    let log_len = insert_chunks(conn, &attempt.job_id, stored_len, chunks).await?;
    let attempts_left = (attempt.attempt as i64) < row.try_get::<i64, _>("max_attempts")?;
    let cancel_requested = row.try_get::<i64, _>("cancel_requested")? != 0;
    if result.status == JobStatus::Failed && attempts_left && !cancel_requested {
        // The next attempt's log replaces this one's: keep what failed and how it ended.
        let last_failure = serde_json::json!({
            "attempt": attempt.attempt,
            "reason": result.reason.map(Reason::as_str),
            "exit_code": result.exit_code,
            "finished_at": now,
            "output_tail": output_tail(conn, &attempt.job_id, log_len).await?,
        });
        let not_before =
            super::dispatch::retry_at_in(conn, &attempt.job_id, attempt.attempt, now).await?;
        sqlx::query("DELETE FROM job_logs WHERE job_id = $1")
            .bind(&attempt.job_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
                "UPDATE jobs SET status = 'queued', log_len = 0, lease_expires_at = NULL, claimed_at = NULL, started_at = NULL,
                 queued_at = $1, not_before = $2, last_failure = $3, {} WHERE id = $4",
                super::pool::UNBIND
            )))
            .bind(now)
            .bind(not_before)
            .bind(last_failure.to_string())
            .bind(&attempt.job_id)
            .execute(&mut *conn)
            .await?;
        return Ok(FinishOutcome::Requeued);
    }
    sqlx::query(
            "UPDATE jobs SET status = $1, reason = $2, exit_code = $3, result = $4, condition = $5, log_len = $6, settled_by = 'agent',
             lease_expires_at = NULL, started_at = COALESCE(started_at, $7), finished_at = $8 WHERE id = $9",
        )
        .bind(result.status.as_str())
        .bind(result.reason.map(Reason::as_str))
        .bind(result.exit_code)
        .bind(&result.result)
        .bind(result.condition.map(i64::from))
        .bind(log_len as i64)
        .bind(now)
        .bind(now)
        .bind(&attempt.job_id)
        .execute(&mut *conn)
        .await?;
    let notified = notify_settled_in(conn, &attempt.job_id).await?;
    super::dispatch::settled_in(conn, &attempt.job_id).await?;
    Ok(FinishOutcome::Recorded { notified })
}

/// The end of a job's stored log: at most [`NOTIFY_OUTPUT_BYTES`] bytes and
/// [`NOTIFY_OUTPUT_LINES`] lines, decoded lossily.
async fn output_tail(
    conn: &mut sqlx::AnyConnection,
    job_id: &str,
    log_len: u64,
) -> StoreResult<String> {
    let from = log_len.saturating_sub(NOTIFY_OUTPUT_BYTES as u64);
    let chunks: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT \"offset\", data FROM job_logs WHERE job_id = $1 AND \"offset\" + length(data) > $2 ORDER BY \"offset\"",
    )
    .bind(job_id)
    .bind(from as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut bytes = Vec::with_capacity(NOTIFY_OUTPUT_BYTES);
    for (offset, data) in chunks {
        let skip = (from.saturating_sub(offset as u64) as usize).min(data.len());
        bytes.extend_from_slice(&data[skip..]);
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim_end_matches('\n');
    let lines: Vec<&str> = text.split('\n').collect();
    let start = lines.len().saturating_sub(NOTIFY_OUTPUT_LINES);
    Ok(lines[start..].join("\n"))
}

/// Enqueues the notification an event asks for when one of its jobs ends (`notify.on_failure`
/// for a failed or cancelled job, `notify.on_success` for a completed one), in the caller's
/// transaction: the one that settled the job, so the notification exists exactly when the final
/// status does. Call it once per settlement, after the job row holds its final status. Returns
/// whether a notification was enqueued (the caller then wakes the dispatcher after the commit).
/// A tool that no longer exists (deleted or renamed) is skipped and audited; it never fails the
/// settlement.
pub(crate) async fn notify_settled_in(
    conn: &mut sqlx::AnyConnection,
    job_id: &str,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "SELECT j.status, j.reason, j.exit_code, j.attempt, j.run_id, j.log_len, j.agent_id, j.server_id, j.on_control_plane, j.pool,
                e.id AS event_id, e.owner_id, e.name AS event_name, e.notify_on_failure, e.notify_on_success,
                a.name AS agent_name, s.name AS server_name
         FROM jobs j JOIN events e ON e.id = j.event_id
         LEFT JOIN agents a ON a.id = j.agent_id
         LEFT JOIN servers s ON s.id = j.server_id
         WHERE j.id = $1",
    )
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let status =
        JobStatus::parse(&row.try_get::<String, _>("status")?).unwrap_or(JobStatus::Failed);
    if status.is_final() {
        super::observe::settled(
            status.as_str(),
            row.try_get::<Option<String>, _>("reason")?.as_deref(),
            1,
        );
    }
    let tool: Option<String> = match status {
        JobStatus::Completed => row.try_get("notify_on_success")?,
        JobStatus::Failed | JobStatus::Cancelled => row.try_get("notify_on_failure")?,
        _ => return Ok(false),
    };
    let Some(tool) = tool else {
        return Ok(false);
    };
    let owner_id: String = row.try_get("owner_id")?;
    let event_id: String = row.try_get("event_id")?;
    let event_name: String = row.try_get("event_name")?;
    let reason: Option<String> = row.try_get("reason")?;
    let exit_code: Option<i64> = row.try_get("exit_code")?;
    let runner = match (
        row.try_get::<Option<String>, _>("agent_name")?,
        row.try_get::<Option<String>, _>("server_name")?,
    ) {
        (Some(agent), _) => agent,
        (None, Some(server)) => server,
        (None, None) => match row.try_get::<Option<String>, _>("agent_id")? {
            Some(agent_id) => format!("agent {agent_id}"),
            None if row.try_get::<i64, _>("on_control_plane")? != 0 => {
                "the control plane".to_string()
            }
            None if row.try_get::<i64, _>("pool")? != 0 => {
                "its pool (no agent took it)".to_string()
            }
            None => "a deleted server".to_string(),
        },
    };
    let verb = match status {
        JobStatus::Completed => "succeeded",
        JobStatus::Cancelled => "was cancelled",
        _ => "failed",
    };
    let title = format!("cronium: {event_name} {verb} on {runner}");
    let title = clip_bytes(&title, super::tools::MAX_TITLE_BYTES);
    let log_len = row.try_get::<i64, _>("log_len")? as u64;
    let tail = output_tail(conn, job_id, log_len).await?;
    let mut message = format!(
        "job: {job_id}\nrun: {}\nattempt: {}\nstatus: {}\nreason: {}\nexit code: {}\n",
        row.try_get::<String, _>("run_id")?,
        row.try_get::<i64, _>("attempt")?,
        status.as_str(),
        reason.as_deref().unwrap_or("-"),
        exit_code.map_or_else(|| "-".to_string(), |code| code.to_string()),
    );
    if tail.trim().is_empty() {
        message.push_str("output: (none)");
    } else {
        message.push_str("last output:\n");
        message.push_str(&tail);
    }
    let outcome = super::tools::enqueue_notification_in(
        conn,
        &owner_id,
        &tool,
        Some(title),
        &message,
        Some(job_id),
    )
    .await?;
    match outcome {
        Ok(_) => Ok(true),
        Err(refused) => {
            audit_in(
                conn,
                "event_notify_skipped",
                None,
                serde_json::json!({
                    "job_id": job_id,
                    "event_id": event_id,
                    "tool": tool,
                    "status": status.as_str(),
                    "why": refused.to_string(),
                }),
            )
            .await?;
            Ok(false)
        }
    }
}

impl Store {
    /// Creates a run with one queued job per agent, in one transaction. When this returns the
    /// jobs are durable.
    pub async fn create_run(
        &self,
        new_run: NewRun<'_>,
    ) -> StoreResult<(String, Vec<(String, String)>)> {
        let spec = RunSpec::manual(&new_run)?;
        write_op!(self, |conn| async { create_run_in(conn, &spec).await }).await
    }

    /// Atomically claims up to `limit` queued jobs of one agent, starting a new attempt of each
    /// with a lease until `lease_until`. One statement, one commit. Only claimable jobs are
    /// taken (see [`super::dispatch`]): due, their batch open, their event under its
    /// concurrency limit.
    pub async fn claim_jobs(
        &self,
        agent_id: &str,
        limit: u32,
        lease_until: i64,
    ) -> StoreResult<Vec<ClaimedJob>> {
        self.claim_jobs_when(agent_id, limit, lease_until, None)
            .await
    }

    /// [`Store::claim_jobs`] as if the time were `now` (ms).
    pub async fn claim_jobs_at(
        &self,
        agent_id: &str,
        limit: u32,
        lease_until: i64,
        now: i64,
    ) -> StoreResult<Vec<ClaimedJob>> {
        self.claim_jobs_when(agent_id, limit, lease_until, Some(now))
            .await
    }

    async fn claim_jobs_when(
        &self,
        agent_id: &str,
        limit: u32,
        lease_until: i64,
        now: Option<i64>,
    ) -> StoreResult<Vec<ClaimedJob>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        if self.backend() == super::Backend::Postgres {
            // Several writers (replicas) may claim at once there: `store::claim_pg`.
            return self.claim_jobs_pg(agent_id, limit, lease_until, now).await;
        }
        // Claims of many agents share one write operation (`claim_batch`). An agent claims when
        // it was woken for a job, when its last claim was full, and once when it connects, so
        // most claims find something; one that finds nothing costs a row in its batch's
        // statements, not a read of its own ahead of the batch.
        self.claim_batched(agent_id, limit, lease_until, now).await
    }

    /// Renews the leases of an agent's attempts. Returns the attempts that are no longer
    /// current (the agent should drop them) and those with a pending cancel request.
    pub async fn renew_leases(
        &self,
        agent_id: &str,
        attempts: &[Attempt],
        lease_until: i64,
    ) -> StoreResult<(Vec<Attempt>, Vec<Attempt>)> {
        let (agent_id, attempts) = (agent_id.to_string(), attempts.to_vec());
        if attempts.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let backend = self.backend();
        write_op!(self, |conn| async {
            let mut abandoned = Vec::new();
            let mut cancel = Vec::new();
            for attempt in &attempts {
                let renewed = sqlx::query(
                "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND attempt = $3 AND runner = $4
                 AND status IN ('claimed', 'running') RETURNING cancel_requested",
            )
            .bind(lease_until)
            .bind(&attempt.job_id)
            .bind(attempt.attempt as i64)
            .bind(&agent_id)
            .fetch_optional(&mut *conn)
            .await?;
                match renewed {
                    None => {
                        super::audit::audit_stale_holder_in(conn, backend, &agent_id, attempt)
                            .await?;
                        abandoned.push(attempt.clone())
                    }
                    Some(row) if row.try_get::<i64, _>("cancel_requested")? != 0 => {
                        cancel.push(attempt.clone())
                    }
                    Some(_) => {}
                }
            }
            Ok((abandoned, cancel))
        })
        .await
    }

    /// Attempts the control plane believes an agent runs.
    pub async fn active_attempts(&self, agent_id: &str) -> StoreResult<Vec<Attempt>> {
        let rows = sqlx::query(
            "SELECT id, attempt FROM jobs WHERE runner = $1 AND status IN ('claimed', 'running')",
        )
        .bind(agent_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Attempt {
                    job_id: row.try_get("id")?,
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                })
            })
            .collect()
    }

    /// Gives every active lease at least `lease_until`: after a control-plane restart, agents
    /// get a full lease to reconnect before their jobs are declared lost.
    pub async fn extend_active_leases(&self, lease_until: i64) -> StoreResult<u64> {
        write_op!(self, |conn| async {
        Ok(sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1 WHERE status IN ('claimed', 'running') AND lease_expires_at < $2",
        )
        .bind(lease_until)
        .bind(lease_until)
        .execute(&mut *conn)
        .await?
        .rows_affected())
        })
        .await
    }

    // `expire_leases` (the lease sweep) is in `store::lease_expiry`.

    /// Looks up an attempt an agent opens a job stream for.
    pub async fn open_attempt(
        &self,
        agent_id: &str,
        attempt: &Attempt,
    ) -> StoreResult<OpenedAttempt> {
        let row = sqlx::query(
            "SELECT runner AS agent_id, status, attempt, settled_by, log_len FROM jobs WHERE id = $1",
        )
        .bind(&attempt.job_id)
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else {
            return Ok(OpenedAttempt::Stale);
        };
        let owner: String = row.try_get("agent_id")?;
        let current =
            row.try_get::<i64, _>("attempt")? as u32 == attempt.attempt && owner == agent_id;
        let status =
            JobStatus::parse(&row.try_get::<String, _>("status")?).unwrap_or(JobStatus::Failed);
        let settled_by: Option<String> = row.try_get("settled_by")?;
        let log_len = row.try_get::<i64, _>("log_len")? as u64;
        Ok(match (current, status) {
            (true, JobStatus::Claimed | JobStatus::Running) => OpenedAttempt::Current { log_len },
            (true, _) if status.is_final() && settled_by.as_deref() == Some("agent") => {
                OpenedAttempt::Finished { log_len }
            }
            _ => OpenedAttempt::Stale,
        })
    }

    /// Appends log chunks of the current attempt (and marks it running when `started`).
    /// Returns the new log length, or `None` when the attempt is no longer current.
    pub async fn append_logs(
        &self,
        agent_id: &str,
        attempt: &Attempt,
        started: bool,
        chunks: &[LogChunk],
    ) -> StoreResult<Option<u64>> {
        let (agent_id, attempt, chunks) = (agent_id.to_string(), attempt.clone(), chunks.to_vec());
        write_op!(self, |conn| async {
                let row = sqlx::query(
            "SELECT log_len FROM jobs WHERE id = $1 AND attempt = $2 AND runner = $3 AND status IN ('claimed', 'running')",
        )
        .bind(&attempt.job_id)
        .bind(attempt.attempt as i64)
        .bind(&agent_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let log_len = insert_chunks(
            conn,
            &attempt.job_id,
            row.try_get::<i64, _>("log_len")? as u64,
            &chunks,
        )
        .await?;
        let status = if started { "running" } else { "claimed" };
        sqlx::query(
            "UPDATE jobs SET log_len = $1, status = CASE WHEN $2 = 'running' THEN 'running' ELSE status END,
             started_at = CASE WHEN $3 = 'running' THEN COALESCE(started_at, $4) ELSE started_at END WHERE id = $5",
        )
        .bind(log_len as i64)
        .bind(status)
        .bind(status)
        .bind(now_ms())
        .bind(&attempt.job_id)
        .execute(&mut *conn)
        .await?;
        Ok(Some(log_len))
        })
        .await
    }

    /// Records the end of an attempt together with its last log chunks, in one transaction
    /// (with the other results waiting for the writer: `result_batch`).
    pub async fn finish_attempt(
        &self,
        agent_id: &str,
        attempt: &Attempt,
        chunks: &[LogChunk],
        result: &AttemptResult,
    ) -> StoreResult<FinishOutcome> {
        self.finish_batched(super::result_batch::ResultRequest {
            agent_id: agent_id.to_string(),
            attempt: attempt.clone(),
            chunks: chunks.to_vec(),
            result: result.clone(),
        })
        .await
    }

    /// Cancels a queued job at once, or flags a claimed or running one for its agent to stop.
    pub async fn request_cancel(&self, job_id: &str) -> StoreResult<CancelOutcome> {
        let job_id = job_id.to_string();
        write_op!(self, |conn| async {
        let now = now_ms();
                let row = sqlx::query("SELECT status, runner AS agent_id, attempt FROM jobs WHERE id = $1")
            .bind(&job_id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(StoreError::NotFound)?;
        let status =
            JobStatus::parse(&row.try_get::<String, _>("status")?).unwrap_or(JobStatus::Failed);
        let outcome = match status {
            JobStatus::Queued => {
                sqlx::query(
                    "UPDATE jobs SET status = 'cancelled', reason = 'cancelled', settled_by = 'api', cancel_requested = 1,
                     finished_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(&job_id)
                .execute(&mut *conn)
                .await?;
                notify_settled_in(conn, &job_id).await?;
                super::dispatch::settled_in(conn, &job_id).await?;
                CancelOutcome::Cancelled
            }
            JobStatus::Claimed | JobStatus::Running => {
                sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1")
                    .bind(&job_id)
                    .execute(&mut *conn)
                    .await?;
                CancelOutcome::Requested {
                    agent_id: row.try_get("agent_id")?,
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                }
            }
            _ => CancelOutcome::AlreadyFinal,
        };
        Ok(outcome)
        })
        .await
    }

    /// One job by id.
    pub async fn job(&self, id: &str) -> StoreResult<Job> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        job_from_row(&row)
    }

    /// The jobs of run `run_id` among `ids` (others are left out), in one query; at most 500
    /// ids per call.
    pub async fn jobs_of_run(&self, run_id: &str, ids: &[&str]) -> StoreResult<Vec<Job>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = &ids[..ids.len().min(500)];
        let placeholders = super::dispatch::placeholders(2, ids.len());
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE run_id = $1 AND id IN ({placeholders}) ORDER BY id"
        );
        let mut query = sqlx::query(AssertSqlSafe(self.backend().positional(sql))).bind(run_id);
        for id in ids {
            query = query.bind(*id);
        }
        let rows = query.fetch_all(&self.reader).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The owner of the event a job belongs to (for permission checks).
    pub async fn job_owner(&self, job_id: &str) -> StoreResult<String> {
        sqlx::query_scalar(
            "SELECT e.owner_id FROM jobs j JOIN events e ON e.id = j.event_id WHERE j.id = $1",
        )
        .bind(job_id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)
    }

    /// One run with its jobs.
    pub async fn run(&self, id: &str) -> StoreResult<Run> {
        let row = sqlx::query("SELECT id, event_id, input, created_at, trigger, slot_at, missed_slots FROM runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or(StoreError::NotFound)?;
        let jobs = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE run_id = $1 ORDER BY id"
        )))
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        Ok(Run {
            id: row.try_get("id")?,
            event_id: row.try_get("event_id")?,
            input: row.try_get("input")?,
            created_at: row.try_get("created_at")?,
            trigger: row.try_get("trigger")?,
            slot_at: row.try_get("slot_at")?,
            missed_slots: row.try_get("missed_slots")?,
            jobs: jobs.iter().map(job_from_row).collect::<StoreResult<_>>()?,
        })
    }

    /// The newest runs, newest first, with their jobs and their event's name: of events owned by
    /// `owner` (every event when `None`), of one event, and/or whose status (as
    /// [`RunStatus::of`] derives it) is `status`.
    pub async fn recent_runs(
        &self,
        owner: Option<&str>,
        event_id: Option<&str>,
        status: Option<RunStatus>,
        limit: u32,
    ) -> StoreResult<Vec<(Run, String)>> {
        let condition = status.map_or("TRUE", RunStatus::sql_condition);
        // Without a status filter the newest runs are picked before their jobs are counted;
        // with one, every run of the selection is counted, then filtered. (The counts are
        // filtered in an outer query: PostgreSQL does not see output names in HAVING.)
        let inner_limit = if status.is_none() { "LIMIT $5" } else { "" };
        let query = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM (
             SELECT r.id, r.event_id, e.name AS event_name, r.input, r.created_at, r.trigger, r.slot_at,
                    r.missed_slots, COUNT(j.id) AS total,
                    COUNT(*) FILTER (WHERE j.status = 'queued') AS queued,
                    COUNT(*) FILTER (WHERE j.status IN ('claimed', 'running')) AS running,
                    COUNT(*) FILTER (WHERE j.status = 'completed') AS completed,
                    COUNT(*) FILTER (WHERE j.status = 'failed') AS failed,
                    COUNT(*) FILTER (WHERE j.status = 'cancelled') AS cancelled
             FROM (SELECT r.* FROM runs r JOIN events e ON e.id = r.event_id
                   WHERE ($1 IS NULL OR e.owner_id = $2) AND ($3 IS NULL OR r.event_id = $4)
                   ORDER BY r.created_at DESC, r.id DESC {inner_limit}) r
             JOIN events e ON e.id = r.event_id LEFT JOIN jobs j ON j.run_id = r.id
             GROUP BY r.id, r.event_id, e.name, r.input, r.created_at, r.trigger, r.slot_at, r.missed_slots
             ) counted
             WHERE {condition}
             ORDER BY created_at DESC, id DESC LIMIT $5"
        )))
        .bind(owner)
        .bind(owner)
        .bind(event_id)
        .bind(event_id);
        let rows = query.bind(i64::from(limit)).fetch_all(&self.reader).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = super::dispatch::placeholders(1, rows.len());
        let query =
            format!("SELECT {JOB_COLUMNS} FROM jobs WHERE run_id IN ({placeholders}) ORDER BY id");
        let mut jobs_query = sqlx::query(AssertSqlSafe(self.backend().positional(query)));
        for row in &rows {
            jobs_query = jobs_query.bind(row.try_get::<String, _>("id")?);
        }
        let mut jobs: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        for row in jobs_query.fetch_all(&self.reader).await? {
            let job = job_from_row(&row)?;
            jobs.entry(job.run_id.clone()).or_default().push(job);
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let run = Run {
                    jobs: jobs.remove(&id).unwrap_or_default(),
                    id,
                    event_id: row.try_get("event_id")?,
                    input: row.try_get("input")?,
                    created_at: row.try_get("created_at")?,
                    trigger: row.try_get("trigger")?,
                    slot_at: row.try_get("slot_at")?,
                    missed_slots: row.try_get("missed_slots")?,
                };
                Ok((run, row.try_get("event_name")?))
            })
            .collect()
    }

    /// Log chunks of a job overlapping `[from, from + max_bytes)`, in order.
    pub async fn logs(
        &self,
        job_id: &str,
        from: u64,
        max_bytes: u64,
    ) -> StoreResult<Vec<LogChunk>> {
        let rows = sqlx::query(
            "SELECT \"offset\", stream, data FROM job_logs WHERE job_id = $1 AND \"offset\" + length(data) > $2 AND \"offset\" < $3
             ORDER BY \"offset\"",
        )
        .bind(job_id)
        .bind(from as i64)
        .bind(from.saturating_add(max_bytes).min(i64::MAX as u64) as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let stream: String = row.try_get("stream")?;
                Ok(LogChunk {
                    offset: row.try_get::<i64, _>("offset")? as u64,
                    stream: Stream::parse(&stream)
                        .ok_or_else(|| StoreError::Corrupt(format!("stream {stream:?}")))?,
                    data: row.try_get("data")?,
                })
            })
            .collect()
    }
}

impl Store {
    /// Ends the leases of attempts at once, so the next lease sweep settles them.
    pub async fn expire_attempts_now(
        &self,
        agent_id: &str,
        attempts: &[Attempt],
    ) -> StoreResult<()> {
        let (agent_id, attempts) = (agent_id.to_string(), attempts.to_vec());
        write_op!(self, |conn| async {
            for attempt in &attempts {
                sqlx::query(
                "UPDATE jobs SET lease_expires_at = 0 WHERE id = $1 AND attempt = $2 AND agent_id = $3
                 AND status IN ('claimed', 'running')",
            )
            .bind(&attempt.job_id)
            .bind(attempt.attempt as i64)
            .bind(&agent_id)
            .execute(&mut *conn)
            .await?;
            }
            Ok(())
        })
        .await
    }
}

/// A row of the claim's `RETURNING` (without the secret environment, read afterwards).
pub(super) fn claimed_job(row: &sqlx::any::AnyRow) -> StoreResult<ClaimedJob> {
    let env: String = row.try_get("env")?;
    Ok(ClaimedJob {
        id: row.try_get("id")?,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        run_id: row.try_get("run_id")?,
        event_id: row.try_get("event_id")?,
        kind: row.try_get("kind")?,
        script: row.try_get("script")?,
        env: serde_json::from_str(&env)
            .map_err(|error| StoreError::Corrupt(format!("env: {error}")))?,
        input: row.try_get("input")?,
        timeout_seconds: row.try_get::<i64, _>("timeout_seconds")? as u32,
        runtime_spec: row.try_get("runtime_spec")?,
        secret_env: Vec::new(),
    })
}
