//! `GET /runs/{id}/events`: a run's changes pushed over server-sent events. First a `run` event
//! with the run's summary (as `GET /runs/{id}?output=false`), then a `job` event each time one
//! of its jobs changes state (log appends are not state: they are filtered out by comparing
//! with what was last sent), and an `end` event with the summary once every job is final.
//!
//! One `job_events` subscription per stream; the ids received in one wake-up are re-read with
//! one query; a lagging receiver, or a quiet while ([`crate::queue::FOLLOW_REREAD`]: the safety
//! net for changes nobody announced), re-reads the whole run.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use axum::routing::get;
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tokio::sync::broadcast::{self, error::TryRecvError};

use super::auth::CurrentUser;
use super::error::ApiResult;
use super::jobs::{job_summary_json, run_json, sse_response, visible_run};
use crate::AppState;
use crate::queue::{Wake, next_change};
use crate::store::StoreResult;
use crate::store::jobs::{Job, JobStatus, Reason, Run};

/// Most job ids gathered in one wake-up before they are re-read (one query).
const BATCH_IDS: usize = 500;

pub fn router() -> Router<AppState> {
    Router::new().route("/runs/{id}/events", get(events))
}

async fn events(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    // Subscribe before the first read: no change between the read and the subscription is lost.
    let changes = state.job_events.subscribe();
    let run = visible_run(&state, &user, &id).await?;
    let summary = run_summary(&state, &run).await?;
    let mut watcher = Watcher {
        state,
        run_id: run.id.clone(),
        changes,
        sent: HashMap::with_capacity(run.jobs.len()),
        pending: VecDeque::new(),
        ended: false,
    };
    for job in &run.jobs {
        watcher.sent.insert(job.id.clone(), JobState::of(job));
    }
    watcher
        .pending
        .push_back(SseEvent::default().event("run").data(summary.to_string()));
    if all_final(&run.jobs) {
        watcher.end(summary);
    }
    Ok(sse_response(watch(watcher)))
}

/// A run as `GET /runs/{id}?output=false` shows it.
async fn run_summary(state: &AppState, run: &Run) -> StoreResult<Value> {
    let mut body = run_json(run);
    body["jobs"] = run.jobs.iter().map(job_summary_json).collect();
    super::dispatch::add_run_json(&mut body, &state.store.run_dispatch(&run.id).await?);
    Ok(body)
}

fn all_final(jobs: &[Job]) -> bool {
    jobs.iter().all(|job| job.status.is_final())
}

/// What a `job` event reports; a job is announced again only when this changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobState {
    status: JobStatus,
    reason: Option<Reason>,
    attempt: u32,
    exit_code: Option<i32>,
    cancel_requested: bool,
    claimed_at: Option<i64>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    not_before: Option<i64>,
    agent_id: Option<String>,
    server_id: Option<String>,
    batch: u32,
}

impl JobState {
    fn of(job: &Job) -> Self {
        JobState {
            status: job.status,
            reason: job.reason,
            attempt: job.attempt,
            exit_code: job.exit_code,
            cancel_requested: job.cancel_requested,
            claimed_at: job.claimed_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            not_before: job.not_before,
            agent_id: job.agent_id.clone(),
            server_id: job.server_id.clone(),
            batch: job.batch,
        }
    }
}

/// State of one run stream. Its memory is bounded by the run's size.
struct Watcher {
    state: AppState,
    run_id: String,
    changes: broadcast::Receiver<Arc<str>>,
    /// The state last sent per job of the run.
    sent: HashMap<String, JobState>,
    /// Events ready to send.
    pending: VecDeque<SseEvent>,
    /// The `end` (or an error) is queued: nothing follows it.
    ended: bool,
}

impl Watcher {
    fn end(&mut self, summary: Value) {
        self.pending
            .push_back(SseEvent::default().event("end").data(summary.to_string()));
        self.ended = true;
    }

    fn fail(&mut self, message: &str) {
        self.pending.push_back(
            SseEvent::default()
                .event("error")
                .data(json!({"message": message}).to_string()),
        );
        self.ended = true;
    }

    /// Queues a `job` event for every job whose state differs from what was sent.
    fn compare(&mut self, jobs: &[Job]) {
        for job in jobs {
            let now = JobState::of(job);
            if self.sent.get(&job.id) == Some(&now) {
                continue;
            }
            let mut body = job_summary_json(job);
            // The log's length is not state: a stream does not follow it.
            if let Some(object) = body.as_object_mut() {
                object.remove("log_bytes");
            }
            self.pending
                .push_back(SseEvent::default().event("job").data(body.to_string()));
            self.sent.insert(job.id.clone(), now);
        }
    }

    /// Re-reads the whole run: announces what changed, and ends when every job is final.
    async fn reread_run(&mut self) {
        match self.state.store.run(&self.run_id).await {
            Ok(run) => {
                self.compare(&run.jobs);
                if all_final(&run.jobs) {
                    match run_summary(&self.state, &run).await {
                        Ok(summary) => self.end(summary),
                        Err(error) => self.fail(&error.to_string()),
                    }
                }
            }
            Err(error) => self.fail(&error.to_string()),
        }
    }

    /// Re-reads the jobs `ids` (of this run) in batches of one query each; the whole run once
    /// every job is final (for the `end` summary).
    async fn reread_jobs(&mut self, ids: &BTreeSet<Arc<str>>) {
        let ids: Vec<&str> = ids.iter().map(|id| &**id).collect();
        for batch in ids.chunks(BATCH_IDS) {
            match self.state.store.jobs_of_run(&self.run_id, batch).await {
                Ok(jobs) => self.compare(&jobs),
                Err(error) => return self.fail(&error.to_string()),
            }
        }
        if self.sent.values().all(|job| job.status.is_final()) {
            self.reread_run().await;
        }
    }

    /// Waits for changes to the run's jobs, then gathers the ids already waiting (up to
    /// [`BATCH_IDS`]). `None`: re-read the whole run.
    async fn wait(&mut self) -> Option<BTreeSet<Arc<str>>> {
        let sent = &self.sent;
        let first = match next_change(&mut self.changes, |id| sent.contains_key(id)).await {
            Wake::Job(id) => id,
            Wake::Reread => return None,
        };
        let mut ids = BTreeSet::from([first]);
        while ids.len() < BATCH_IDS {
            match self.changes.try_recv() {
                Ok(id) if self.sent.contains_key(&*id) => {
                    ids.insert(id);
                }
                Ok(_) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                Err(TryRecvError::Lagged(_)) => return None,
            }
        }
        Some(ids)
    }
}

fn watch(watcher: Watcher) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(watcher, |mut watcher| async move {
        loop {
            if let Some(event) = watcher.pending.pop_front() {
                return Some((Ok(event), watcher));
            }
            if watcher.ended {
                return None;
            }
            match watcher.wait().await {
                Some(ids) => watcher.reread_jobs(&ids).await,
                None => watcher.reread_run().await,
            }
        }
    })
}
