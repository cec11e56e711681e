//! `/runs` (the newest runs), `/runs/{id}` and `/jobs/{id}`: status, logs (whole or followed live over server-sent
//! events) and cancellation.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cronium_protocol::AttemptRef;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult};
use super::timestamp;
use crate::AppState;
use crate::store::StoreError;
use crate::store::jobs::{
    CancelOutcome, Job, JobStatus, LogChunk, Run, RunStatus, Stream as LogStream,
};

/// How much of the log's end `GET /jobs/{id}` includes as `output`.
const OUTPUT_TAIL_BYTES: u64 = 64 * 1024;

/// How much log one read from the store fetches.
const LOG_PAGE_BYTES: u64 = 1024 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(show_run))
        .route("/jobs/{id}", get(show_job))
        .route("/jobs/{id}/logs", get(logs))
        .route("/jobs/{id}/cancel", post(cancel))
}

/// Cuts chunks overlapping `from` so the result starts exactly at `from`.
fn trim_chunks(chunks: Vec<LogChunk>, from: u64) -> Vec<LogChunk> {
    chunks
        .into_iter()
        .filter_map(|mut chunk| {
            if chunk.offset < from {
                let skip = (from - chunk.offset) as usize;
                if skip >= chunk.data.len() {
                    return None;
                }
                chunk.data.drain(..skip);
                chunk.offset = from;
            }
            Some(chunk)
        })
        .collect()
}

async fn job_json(state: &AppState, job: &Job) -> ApiResult<Value> {
    let from = job.log_len.saturating_sub(OUTPUT_TAIL_BYTES);
    let chunks = trim_chunks(
        state.store.logs(&job.id, from, OUTPUT_TAIL_BYTES).await?,
        from,
    );
    let output: Vec<u8> = chunks.into_iter().flat_map(|chunk| chunk.data).collect();
    let result = job
        .result
        .as_deref()
        .and_then(|result| serde_json::from_str::<Value>(result).ok());
    Ok(json!({
        "id": job.id,
        "run_id": job.run_id,
        "event_id": job.event_id,
        "agent_id": job.agent_id,
        "server_id": job.server_id,
        "pool": job.pool,
        "status": job.status.as_str(),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "exit_code": job.exit_code,
        "reason": job.reason.map(|reason| reason.as_str()),
        "output": String::from_utf8_lossy(&output),
        "output_truncated": from > 0,
        "log_bytes": job.log_len,
        "result": result,
        "condition": job.condition,
        "cancel_requested": job.cancel_requested,
        "queued_at": timestamp(Some(job.queued_at)),
        "claimed_at": timestamp(job.claimed_at),
        "started_at": timestamp(job.started_at),
        "finished_at": timestamp(job.finished_at),
        "not_before": timestamp(job.not_before),
        "batch": job.batch,
        "last_failure": last_failure_json(job),
    }))
}

/// A job without its output: what listings and status pollers need.
pub(super) fn job_summary_json(job: &Job) -> Value {
    json!({
        "id": job.id,
        "run_id": job.run_id,
        "event_id": job.event_id,
        "agent_id": job.agent_id,
        "server_id": job.server_id,
        "pool": job.pool,
        "status": job.status.as_str(),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "exit_code": job.exit_code,
        "reason": job.reason.map(|reason| reason.as_str()),
        "log_bytes": job.log_len,
        "cancel_requested": job.cancel_requested,
        "queued_at": timestamp(Some(job.queued_at)),
        "claimed_at": timestamp(job.claimed_at),
        "started_at": timestamp(job.started_at),
        "finished_at": timestamp(job.finished_at),
        "not_before": timestamp(job.not_before),
        "batch": job.batch,
        "last_failure": last_failure_json(job),
    })
}

/// The previous failed attempt of a retried job (its log was replaced by the next attempt's).
fn last_failure_json(job: &Job) -> Value {
    let Some(stored) = job
        .last_failure
        .as_deref()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
    else {
        return Value::Null;
    };
    json!({
        "attempt": stored["attempt"],
        "reason": stored["reason"],
        "exit_code": stored["exit_code"],
        "finished_at": timestamp(stored["finished_at"].as_i64()),
        "output_tail": stored["output_tail"],
    })
}

/// Loads a job the caller may see.
pub(super) async fn visible_job(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<Job> {
    let owner = match state.store.job_owner(id).await {
        Ok(owner) => owner,
        Err(StoreError::NotFound) => return Err(ApiError::NotFound("job")),
        Err(error) => return Err(error.into()),
    };
    if !user.may_access(&owner) {
        return Err(ApiError::NotFound("job"));
    }
    Ok(state.store.job(id).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunQuery {
    /// `false`: the jobs without `output` (a poller that only wants statuses).
    output: Option<bool>,
}

/// Loads a run the caller may see (another user's run is not found).
pub(super) async fn visible_run(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<Run> {
    let run = state.store.run(id).await.map_err(|error| match error {
        StoreError::NotFound => ApiError::NotFound("run"),
        other => other.into(),
    })?;
    let event = state.store.event(&run.event_id).await?;
    if !user.may_access(&event.owner_id) {
        return Err(ApiError::NotFound("run"));
    }
    Ok(run)
}

async fn show_run(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(query): Query<RunQuery>,
) -> ApiResult<Json<Value>> {
    let run = visible_run(&state, &user, &id).await?;
    let mut jobs = Vec::with_capacity(run.jobs.len());
    for job in &run.jobs {
        jobs.push(if query.output == Some(false) {
            job_summary_json(job)
        } else {
            job_json(&state, job).await?
        });
    }
    let mut body = run_json(&run);
    body["jobs"] = Value::Array(jobs);
    super::dispatch::add_run_json(&mut body, &state.store.run_dispatch(&run.id).await?);
    if query.output != Some(false) {
        super::dispatch::add_groups_json(&state, &run.id, &mut body).await?;
    }
    Ok(Json(body))
}

/// A run without its jobs: status and counts derived from its jobs.
pub(super) fn run_json(run: &Run) -> Value {
    let count = |statuses: &[JobStatus]| {
        run.jobs
            .iter()
            .filter(|job| statuses.contains(&job.status))
            .count()
    };
    json!({
        "id": run.id,
        "event_id": run.event_id,
        "status": RunStatus::of(&run.jobs).as_str(),
        "input": run.input.as_deref().and_then(|input| serde_json::from_str::<Value>(input).ok()),
        "created_at": timestamp(Some(run.created_at)),
        "trigger": run.trigger,
        "slot_at": timestamp(run.slot_at),
        "missed_slots": run.missed_slots,
        "counts": {
            "queued": count(&[JobStatus::Queued]),
            "running": count(&[JobStatus::Claimed, JobStatus::Running]),
            "completed": count(&[JobStatus::Completed]),
            "failed": count(&[JobStatus::Failed]),
            "cancelled": count(&[JobStatus::Cancelled]),
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    event_id: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

/// Most runs one `GET /runs` lists.
const MAX_RUNS_LISTED: u32 = 200;

/// The newest runs the caller may see (admins: all; others: of their own events), with their
/// jobs' statuses but not their output.
async fn list_runs(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(query): Query<RunsQuery>,
) -> ApiResult<Json<Value>> {
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(text) => Some(RunStatus::parse(text).ok_or_else(|| {
            ApiError::field(
                "status",
                "must be queued, running, completed, failed or cancelled",
            )
        })?),
    };
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_RUNS_LISTED {
        return Err(ApiError::field(
            "limit",
            format!("must be 1-{MAX_RUNS_LISTED}"),
        ));
    }
    let owner = (!user.is_admin()).then(|| user.0.id.clone());
    let runs = state
        .store
        .recent_runs(
            owner.as_deref(),
            query.event_id.as_deref().filter(|id| !id.is_empty()),
            status,
            limit,
        )
        .await?;
    Ok(Json(Value::Array(
        runs.iter()
            .map(|(run, event_name)| {
                let mut body = run_json(run);
                body["event_name"] = json!(event_name);
                body["finished_at"] = timestamp(
                    run.jobs
                        .iter()
                        .all(|job| job.status.is_final())
                        .then(|| run.jobs.iter().filter_map(|job| job.finished_at).max())
                        .flatten(),
                );
                body["jobs"] = run.jobs.iter().map(job_summary_json).collect();
                body
            })
            .collect(),
    )))
}
async fn show_job(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = visible_job(&state, &user, &id).await?;
    Ok(Json(job_json(&state, &job).await?))
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// Start at this byte offset (followers resuming after a reconnect).
    #[serde(default)]
    from: u64,
}

async fn logs(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
) -> ApiResult<Response> {
    let job = visible_job(&state, &user, &id).await?;
    if query.follow {
        let events = follow(state, job.id, query.from);
        return Ok(sse_response(events));
    }
    // Stream the stored log page by page; the whole log never sits in memory.
    let pages = stream::unfold(
        (state, job.id, query.from),
        |(state, job_id, offset)| async move {
            match state.store.logs(&job_id, offset, LOG_PAGE_BYTES).await {
                Ok(chunks) => {
                    let chunks = trim_chunks(chunks, offset);
                    if chunks.is_empty() {
                        return None;
                    }
                    let bytes: Vec<u8> = chunks.into_iter().flat_map(|chunk| chunk.data).collect();
                    let next = offset + bytes.len() as u64;
                    Some((
                        Ok::<Bytes, std::io::Error>(Bytes::from(bytes)),
                        (state, job_id, next),
                    ))
                }
                Err(error) => Some((
                    Err(std::io::Error::other(error.to_string())),
                    (state, job_id, u64::MAX),
                )),
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(pages),
    )
        .into_response())
}

/// Server-sent events with a keep-alive comment every 15 s (proxies drop silent connections).
pub(super) fn sse_response(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// State of one follower.
struct Follower {
    state: AppState,
    job_id: String,
    offset: u64,
    changes: broadcast::Receiver<std::sync::Arc<str>>,
    ended: bool,
}

/// Server-sent events of a job's log from `from`: `log` events as output arrives, then one
/// `end` event with the job when it has ended and every byte was sent.
fn follow(
    state: AppState,
    job_id: String,
    from: u64,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let changes = state.job_events.subscribe();
    let follower = Follower {
        state,
        job_id,
        offset: from,
        changes,
        ended: false,
    };
    stream::unfold(follower, |mut follower| async move {
        if follower.ended {
            return None;
        }
        loop {
            // Read the status before the log: if the job is final here, the log read after it is complete.
            let job = match follower.state.store.job(&follower.job_id).await {
                Ok(job) => job,
                Err(error) => {
                    return Some((
                        Ok(error_event(&error.to_string())),
                        Follower {
                            ended: true,
                            ..follower
                        },
                    ));
                }
            };
            let chunks = match follower
                .state
                .store
                .logs(&follower.job_id, follower.offset, LOG_PAGE_BYTES)
                .await
            {
                Ok(chunks) => trim_chunks(chunks, follower.offset),
                Err(error) => {
                    return Some((
                        Ok(error_event(&error.to_string())),
                        Follower {
                            ended: true,
                            ..follower
                        },
                    ));
                }
            };
            let complete = job.status.is_final();
            if let Some((stream, text, consumed)) = next_text(&chunks, complete) {
                let event = SseEvent::default().event("log").data(
                    json!({"offset": follower.offset, "stream": stream.as_str(), "data": text})
                        .to_string(),
                );
                follower.offset += consumed;
                return Some((Ok(event), follower));
            }
            if job.status.is_final() && follower.offset >= job.log_len {
                let body = job_json(&follower.state, &job)
                    .await
                    .unwrap_or_else(|_| json!({"id": job.id, "status": job.status.as_str()}));
                return Some((
                    Ok(SseEvent::default().event("end").data(body.to_string())),
                    Follower {
                        ended: true,
                        ..follower
                    },
                ));
            }
            // Wait for a change to this job; re-read on lag or after a while regardless.
            let job_id = &follower.job_id;
            crate::queue::next_change(&mut follower.changes, |changed| changed == job_id).await;
        }
    })
}

/// The text of the next log event: consecutive chunks of one stream joined, cut before an
/// incomplete UTF-8 sequence at the end of what is stored (its bytes may still come), unless
/// the log is `complete`. Returns the stream, the text and how many bytes it consumed; `None` when there is
/// nothing to send yet.
fn next_text(chunks: &[LogChunk], complete: bool) -> Option<(LogStream, String, u64)> {
    let first = chunks.first()?;
    let mut bytes = Vec::new();
    let mut all_read = true;
    for (index, chunk) in chunks.iter().enumerate() {
        if chunk.stream != first.stream {
            all_read = false;
            break;
        }
        bytes.extend_from_slice(&chunk.data);
        all_read = index + 1 == chunks.len();
    }
    let cut = match std::str::from_utf8(&bytes) {
        Ok(_) => bytes.len(),
        // Invalid bytes in the middle are sent (replaced); only a sequence cut off at the very
        // end waits for its continuation, which can only come from the same stream.
        // If another stream's output follows, or the job has ended, the rest never comes.
        Err(error) if error.error_len().is_none() && all_read && !complete => error.valid_up_to(),
        Err(_) => bytes.len(),
    };
    if cut == 0 {
        return None;
    }
    Some((
        first.stream,
        String::from_utf8_lossy(&bytes[..cut]).into_owned(),
        cut as u64,
    ))
}

fn error_event(message: &str) -> SseEvent {
    SseEvent::default()
        .event("error")
        .data(json!({"message": message}).to_string())
}

async fn cancel(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    visible_job(&state, &user, &id).await?;
    match state.store.request_cancel(&id).await? {
        CancelOutcome::Cancelled => {
            state.job_events.notify(&id);
            // The event's `notify.on_failure`, if any, was enqueued with the cancel.
            state.notifier.notify_one();
        }
        CancelOutcome::Requested { agent_id, attempt } => {
            // An SSH job run by this control plane stops at once (else at its next lease renewal),
            // so does an HTTP request or tool action the control plane runs.
            state.ssh.cancel(&id);
            state.actions.cancel(&id);
            // An offline agent hears about it when it reconnects, or its lease settles the job.
            state.registry.cancel(
                &agent_id,
                AttemptRef {
                    job_id: id.clone(),
                    attempt,
                },
            );
        }
        CancelOutcome::AlreadyFinal => {
            return Err(ApiError::Conflict("the job has already ended".into()));
        }
    }
    let job = state.store.job(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(job_json(&state, &job).await?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, stream: LogStream, data: &[u8]) -> LogChunk {
        LogChunk {
            offset,
            stream,
            data: data.to_vec(),
        }
    }

    #[test]
    fn live_log_text_never_splits_a_character() {
        let euro = "€".as_bytes();
        // The character is split across two chunks of the same stream: one event carries it whole.
        let chunks = [
            chunk(0, LogStream::Stdout, &[b'a', euro[0]]),
            chunk(2, LogStream::Stdout, &euro[1..]),
        ];
        assert_eq!(
            next_text(&chunks, false),
            Some((LogStream::Stdout, "a€".into(), 4))
        );
        // Only the first half has arrived: send what is complete, keep the rest for later.
        assert_eq!(
            next_text(&chunks[..1], false),
            Some((LogStream::Stdout, "a".into(), 1))
        );
        assert_eq!(
            next_text(&[chunk(1, LogStream::Stdout, &[euro[0]])], false),
            None
        );
        // The job ended with a truncated character: it is sent, replaced.
        assert_eq!(
            next_text(&[chunk(1, LogStream::Stdout, &[euro[0]])], true),
            Some((LogStream::Stdout, "\u{fffd}".into(), 1))
        );
        // Another stream is a separate event.
        let mixed = [
            chunk(0, LogStream::Stdout, b"out"),
            chunk(3, LogStream::Stderr, b"err"),
        ];
        assert_eq!(
            next_text(&mixed, false),
            Some((LogStream::Stdout, "out".into(), 3))
        );
        // A cut-off character followed by the other stream's output is sent, replaced.
        let switched = [
            chunk(0, LogStream::Stdout, &[euro[0]]),
            chunk(1, LogStream::Stderr, b"e"),
        ];
        assert_eq!(
            next_text(&switched, false),
            Some((LogStream::Stdout, "\u{fffd}".into(), 1))
        );
        // Invalid bytes in the middle do not stall the stream.
        assert_eq!(
            next_text(&[chunk(0, LogStream::Stderr, &[0xff, b'x'])], false),
            Some((LogStream::Stderr, "\u{fffd}x".into(), 2))
        );
    }
}
