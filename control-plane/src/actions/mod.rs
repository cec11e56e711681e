//! Jobs the control plane runs itself: HTTP requests of events with `executor: control_plane`
//! (`http.rs`, through the agent's own HTTP runner code, `cronium_agent::runner::http`) and tool
//! actions (`tool.rs`, through the notification delivery code, `tools::delivery` and
//! `tools::email`).
//!
//! Such a job has the runner key [`CONTROL_PLANE_RUNNER`] and follows the queue's rules like any
//! other: one worker task (owned by `AppState::tasks`) claims queued jobs with a lease, runs each
//! in a task of its own, renews the lease while it runs, and records the result through the same
//! store functions as agents and the SSH fallback. A control plane that dies mid-job leaves the
//! job to the lease sweeper (re-queued, or failed with reason `lost`); a graceful shutdown stops
//! the running attempts and leaves them to their lease as well. Output is masked with the job's
//! secret values before it is stored.
//!
//! The control plane's network is not the agents': an HTTP request it makes can reach whatever
//! the control plane can reach, including its own loopback and private networks. `cronium serve
//! --http-jobs-public-only` makes it refuse loopback, private, link-local and other non-public
//! addresses (checked on every address a name resolves to, and on redirects).

mod http;
#[cfg(test)]
mod tests;
mod tool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cronium_protocol::{Masker, StreamMasker};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::AppState;
use crate::store::jobs::{
    Attempt, AttemptResult, CONTROL_PLANE_RUNNER, ClaimedJob, FinishOutcome, JobStatus, LogChunk,
    Reason, Stream,
};
use crate::store::now_ms;

pub use http::PublicOnlyResolver;

/// How often the worker looks for queued jobs without being woken (jobs re-queued by the lease
/// sweeper or a retry's backoff).
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// Jobs running at once.
const MAX_RUNNING: usize = 32;

/// Most output bytes kept per attempt (an HTTP answer is capped well below this).
const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// The worker's handle: wake-ups and the running jobs' cancel switches.
#[derive(Clone, Default)]
pub struct ActionRunner {
    wake: Arc<Notify>,
    /// Cancel tokens of the running attempts by job id (children of the shutdown token).
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl ActionRunner {
    /// Tells the worker that jobs may be queued for it.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Asks the running attempt of `job_id` (if this control plane runs it) to stop.
    pub fn cancel(&self, job_id: &str) {
        if let Some(token) = self.running.lock().expect("action jobs").get(job_id) {
            token.cancel();
        }
    }
}

/// The worker: claims the control plane's queued jobs and runs each in its own task until
/// shutdown, then waits for them.
pub async fn run_worker(state: AppState) {
    let runner = state.actions.clone();
    let clients = match Clients::new(&state) {
        Ok(clients) => Arc::new(clients),
        Err(error) => {
            warn!(error = %format!("{error:#}"), "HTTP request and tool action jobs cannot run: no HTTP client");
            return;
        }
    };
    let jobs = tokio_util::task::TaskTracker::new();
    loop {
        loop {
            let free =
                MAX_RUNNING.saturating_sub(runner.running.lock().expect("action jobs").len());
            if free == 0 {
                break;
            }
            let lease_until = now_ms() + state.config.lease.as_millis() as i64;
            let claimed = match state
                .store
                .claim_jobs(CONTROL_PLANE_RUNNER, free as u32, lease_until)
                .await
            {
                Ok(claimed) => claimed,
                Err(error) => {
                    warn!(%error, "could not claim the control plane's jobs");
                    break;
                }
            };
            if claimed.is_empty() {
                break;
            }
            for job in claimed {
                let cancel = state.shutdown.child_token();
                runner
                    .running
                    .lock()
                    .expect("action jobs")
                    .insert(job.id.clone(), cancel.clone());
                state.job_events.notify(&job.id);
                let (state, runner, clients) = (state.clone(), runner.clone(), clients.clone());
                jobs.spawn(async move {
                    let job_id = job.id.clone();
                    run_attempt(&state, &clients, job, cancel).await;
                    runner.running.lock().expect("action jobs").remove(&job_id);
                    runner.wake();
                });
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = runner.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_CHECK) => {}
        }
    }
    jobs.close();
    jobs.wait().await;
    info!("control plane job worker stopped");
}

/// The clients the jobs share.
struct Clients {
    /// Configures the client of each HTTP request job (TLS roots, the address policy).
    http: cronium_agent::runner::http::ConfigureClient,
    /// Delivers tool actions over HTTP (Slack, Discord, webhooks).
    delivery: reqwest::Client,
    /// Delivers tool actions by email.
    mailer: crate::tools::email::Mailer,
    /// `--http-jobs-public-only`: HTTP request jobs reach public addresses only.
    public_only: bool,
}

impl Clients {
    fn new(state: &AppState) -> anyhow::Result<Clients> {
        let tls = crate::cli::client::tls_client_config()?;
        let public_only = state.config.delivery.http_jobs_public_only;
        let http: cronium_agent::runner::http::ConfigureClient = Arc::new(move |builder| {
            let builder = builder.tls_backend_preconfigured(tls.clone());
            if public_only {
                builder.dns_resolver(Arc::new(PublicOnlyResolver))
            } else {
                builder
            }
        });
        Ok(Clients {
            http,
            delivery: crate::tools::delivery::client(&state.config.delivery)?,
            mailer: crate::tools::email::Mailer::new(
                &state.config.delivery,
                &state.config.public_url,
            )?,
            public_only,
        })
    }
}

/// How an attempt ended, before it becomes an `AttemptResult`.
struct Ending {
    status: JobStatus,
    reason: Option<Reason>,
    /// The result JSON.
    result: Option<String>,
}

impl Ending {
    fn failed(reason: Reason) -> Ending {
        Ending {
            status: JobStatus::Failed,
            reason: Some(reason),
            result: None,
        }
    }
}

/// Why an attempt was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// A user cancelled the job.
    Cancelled,
    /// The attempt is no longer current (its lease was settled elsewhere).
    Superseded,
    /// The control plane is shutting down: the lease settles the job.
    Shutdown,
}

/// An attempt's output, masked, held in memory (it is small) and committed with the result.
struct Output {
    masker: Masker,
    stdout: StreamMasker,
    chunks: Vec<LogChunk>,
    len: usize,
    truncated: bool,
}

impl Output {
    fn new(masker: Masker) -> Output {
        Output {
            stdout: masker.stream(),
            masker,
            chunks: Vec::new(),
            len: 0,
            truncated: false,
        }
    }

    fn system(&mut self, line: &str) {
        let data = self.masker.mask(format!("[cronium: {line}]\n").as_bytes());
        self.push(Stream::System, data);
    }

    fn push(&mut self, stream: Stream, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let data = if stream != Stream::System && self.len + data.len() > MAX_OUTPUT_BYTES {
            if self.truncated {
                return;
            }
            self.truncated = true;
            data[..MAX_OUTPUT_BYTES.saturating_sub(self.len)].to_vec()
        } else {
            data
        };
        let offset = self.len as u64;
        self.len += data.len();
        self.chunks.push(LogChunk {
            offset,
            stream,
            data,
        });
    }

    /// The chunks, with what the stream masker still held back.
    fn finish(mut self) -> Vec<LogChunk> {
        let tail = self.stdout.finish();
        self.push(Stream::Stdout, tail);
        self.chunks
    }
}

impl cronium_agent::runner::http::HttpOutput for Output {
    fn write(&mut self, stream: cronium_protocol::LogStream, data: &[u8]) {
        match stream {
            cronium_protocol::LogStream::System => {
                let data = self.masker.mask(data);
                self.push(Stream::System, data);
            }
            // The answer is all stdout: the masker holds back a tail that could start a secret.
            _ => {
                let data = self.stdout.push(data);
                self.push(Stream::Stdout, data);
            }
        }
    }
}

/// Runs one claimed attempt to its end and records the result.
async fn run_attempt(
    state: &AppState,
    clients: &Clients,
    job: ClaimedJob,
    cancel: CancellationToken,
) {
    let attempt = Attempt {
        job_id: job.id.clone(),
        attempt: job.attempt,
    };
    // Marks the job running (an empty batch with `started`).
    if let Err(error) = state
        .store
        .append_logs(CONTROL_PLANE_RUNNER, &attempt, true, &[])
        .await
    {
        warn!(%error, job = %job.id, "could not mark a control plane job running");
    }
    state.job_events.notify(&job.id);
    let secret_env = crate::http::events::open_secret_env(&state.key, &job.secret_env);
    let masker = match &secret_env {
        Ok(secret_env) => Masker::new(secret_env.iter().map(|(_, value)| value.as_bytes())),
        Err(_) => Masker::default(),
    };
    let mut output = Output::new(masker.clone());
    let stop = watch_lease(state, &attempt, &cancel);
    let ended = match (&secret_env, job.kind.as_str()) {
        (Err(error), _) => {
            output.system(&format!("cannot run: {error:#}"));
            Ok(Ending::failed(Reason::Spawn))
        }
        (Ok(secret_env), "http_request") => {
            http::run(clients, &job, secret_env, &masker, &mut output, stop).await
        }
        (Ok(_), "tool_action") => tool::run(state, clients, &job, &mut output, stop).await,
        (Ok(_), other) => {
            output.system(&format!("{other} jobs are not run by the control plane"));
            Ok(Ending::failed(Reason::Spawn))
        }
    };
    let ending = match ended {
        Ok(ending) => ending,
        Err(Stopped::Cancelled) => {
            output.system("cancelled");
            Ending {
                status: JobStatus::Cancelled,
                reason: Some(Reason::Cancelled),
                result: None,
            }
        }
        Err(Stopped::Superseded) => {
            info!(job = %job.id, "attempt no longer current; its result is dropped");
            return;
        }
        Err(Stopped::Shutdown) => {
            info!(job = %job.id, "control plane stopping; the attempt is left to its lease");
            return;
        }
    };
    let result = ending.result.map(|result| mask_json(&masker, &result));
    let chunks = output.finish();
    let log_len = chunks.iter().map(|chunk| chunk.data.len() as u64).sum();
    let result = AttemptResult {
        status: ending.status,
        reason: ending.reason,
        exit_code: None,
        log_len,
        result,
        condition: None,
    };
    match state
        .store
        .finish_attempt(CONTROL_PLANE_RUNNER, &attempt, &chunks, &result)
        .await
    {
        Ok(outcome) => {
            if outcome == (FinishOutcome::Recorded { notified: true }) {
                state.notifier.notify_one();
            }
            info!(job = %job.id, attempt = job.attempt, ?outcome, status = result.status.as_str(), "control plane job finished");
        }
        Err(error) => warn!(%error, job = %job.id, "could not record a control plane job's result"),
    }
    state.job_events.notify(&job.id);
}

/// Completes when the attempt must stop: a cancel (from the API, or seen when renewing the
/// lease), a lost lease, or the shutdown. Renews the lease every third of its length meanwhile.
async fn watch_lease(state: &AppState, attempt: &Attempt, cancel: &CancellationToken) -> Stopped {
    let every = state.config.lease / 3;
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                return if state.shutdown.is_cancelled() { Stopped::Shutdown } else { Stopped::Cancelled };
            }
            _ = renew.tick() => {
                let lease_until = now_ms() + state.config.lease.as_millis() as i64;
                match state
                    .store
                    .renew_leases(CONTROL_PLANE_RUNNER, std::slice::from_ref(attempt), lease_until)
                    .await
                {
                    Ok((abandoned, _)) if !abandoned.is_empty() => return Stopped::Superseded,
                    Ok((_, cancels)) if !cancels.is_empty() => return Stopped::Cancelled,
                    Ok(_) => {}
                    Err(error) => warn!(%error, "could not renew a control plane job's lease"),
                }
            }
        }
    }
}

/// Masks secret values in a result JSON (values inside strings; if one is still found, the
/// whole text becomes a masked JSON string).
fn mask_json(masker: &Masker, json: &str) -> String {
    if masker.is_empty() || !masker.contains_secret(json.as_bytes()) {
        return json.to_string();
    }
    fn walk(masker: &Masker, value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(text) => Value::String(masker.mask_str(&text)),
            Value::Array(items) => items.into_iter().map(|item| walk(masker, item)).collect(),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(key, item)| (masker.mask_str(&key), walk(masker, item)))
                    .collect(),
            ),
            other => other,
        }
    }
    let masked = match serde_json::from_str::<serde_json::Value>(json) {
        Ok(value) => walk(masker, value).to_string(),
        Err(_) => json.to_string(),
    };
    if masker.contains_secret(masked.as_bytes()) {
        serde_json::Value::String(masker.mask_str(&masked)).to_string()
    } else {
        masked
    }
}
