//! One job attempt's stream: resume offset, log chunks, and the final result.
//!
//! Output is batched in memory and committed at most every [`FLUSH_INTERVAL`] or
//! [`FLUSH_BYTES`], and the last batch is committed together with the result, so a short job
//! costs one commit here. A `LogAck` is sent only after a commit, so the agent keeps its
//! on-disk copy of anything not yet durable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use cronium_protocol::{
    CloseCode, FailReason, FinalStatus, FinishAck, FinishVerdict, FrameDecoder, JobFinished,
    JobOpened, LogAck, LogStream, Message,
};
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use super::wire::{read_message, write_message};
use crate::AppState;
use crate::store::jobs::{
    Attempt, AttemptResult, FinishOutcome, JobStatus, LogChunk, OpenedAttempt, Reason, Stream,
};

/// Longest time output waits in memory before it is committed.
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Output committed as soon as this much is pending.
const FLUSH_BYTES: usize = 256 * 1024;

/// Most attempts one connection remembers as assigned and not yet opened.
const MAX_FRESH: usize = 4096;

/// The attempts assigned on one agent connection whose stream has not opened yet. Their rows
/// were claimed by this agent moments ago (status `claimed`, log empty: a claim takes only queued
/// jobs, and every re-queue empties the log), so the first stream of each is answered "resume at
/// 0" without reading the row. If the job was settled elsewhere in between (its lease ran out),
/// the writes that follow refuse it: `append_logs` and `finish_attempt` check the agent and the
/// attempt in their own transaction, and the late result is audited as `stale_result`.
#[derive(Clone, Default)]
pub struct FreshAttempts(Arc<Mutex<HashSet<(String, u32)>>>);

impl FreshAttempts {
    /// Remembers an attempt just assigned on this connection (forgotten when full: its stream
    /// then reads the row).
    pub fn assigned(&self, job_id: &str, attempt: u32) {
        let mut fresh = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if fresh.len() < MAX_FRESH {
            fresh.insert((job_id.to_owned(), attempt));
        }
    }

    /// Whether this is the first stream of an attempt assigned on this connection (once).
    fn take(&self, attempt: &Attempt) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(attempt.job_id.clone(), attempt.attempt))
    }
}

/// Serves one stream opened by an agent. The first message says what it is: `JobOpen` (a job
/// attempt's stream, served here) or `HelperCall` (one runtime-helper call, see
/// [`helper_stream`](super::helper_stream)).
pub async fn serve(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    agent_id: String,
    state: AppState,
    fresh: FreshAttempts,
) {
    let mut decoder = FrameDecoder::new();
    let open = match read_message(&mut recv, &mut decoder).await {
        Ok(Some(Message::JobOpen(open))) => open,
        Ok(Some(Message::HelperCall(call))) => {
            let span = info_span!("helper", job = %call.job.job_id, attempt = call.job.attempt);
            super::helper_stream::serve(send, call, &agent_id, &state)
                .instrument(span)
                .await;
            return;
        }
        Ok(Some(other)) => {
            debug!(
                message = other.name(),
                "unexpected first message on a stream"
            );
            let _ = send.reset(CloseCode::ProtocolError.to_u32().into());
            let _ = recv.stop(CloseCode::ProtocolError.to_u32().into());
            return;
        }
        Ok(None) => return,
        Err(error) => {
            debug!(%error, "bad frame at the start of a stream");
            let _ = send.reset(CloseCode::ProtocolError.to_u32().into());
            let _ = recv.stop(CloseCode::ProtocolError.to_u32().into());
            return;
        }
    };
    let attempt = Attempt {
        job_id: open.job.job_id.clone(),
        attempt: open.job.attempt,
    };
    let span = info_span!("job", id = %attempt.job_id, attempt = attempt.attempt);
    async {
        let fresh = fresh.take(&attempt);
        let mut stream = JobStream {
            state: &state,
            agent_id: &agent_id,
            attempt: &attempt,
            send: &mut send,
            pending: Vec::new(),
            pending_bytes: 0,
            stored_len: 0,
            started: false,
            started_stored: false,
        };
        if let Err(error) = stream.run(&mut recv, &mut decoder, fresh).await {
            warn!(error = %format!("{error:#}"), "job stream failed");
            let _ = stream.send.reset(CloseCode::ProtocolError.to_u32().into());
            let _ = recv.stop(CloseCode::ProtocolError.to_u32().into());
        }
    }
    .instrument(span)
    .await;
}

struct JobStream<'a> {
    state: &'a AppState,
    agent_id: &'a str,
    attempt: &'a Attempt,
    send: &'a mut quinn::SendStream,
    /// Output received but not yet committed, contiguous from `stored_len`.
    pending: Vec<LogChunk>,
    pending_bytes: usize,
    stored_len: u64,
    started: bool,
    started_stored: bool,
}

impl JobStream<'_> {
    async fn run(
        &mut self,
        recv: &mut quinn::RecvStream,
        decoder: &mut FrameDecoder,
        fresh: bool,
    ) -> anyhow::Result<()> {
        let opened = if fresh {
            OpenedAttempt::Current { log_len: 0 }
        } else {
            self.state
                .store
                .open_attempt(self.agent_id, self.attempt)
                .await?
        };
        match opened {
            OpenedAttempt::Stale => {
                self.state
                    .store
                    .audit("stale_attempt", Some(self.agent_id), &serde_json::json!({"job_id": self.attempt.job_id, "attempt": self.attempt.attempt}))
                    .await?;
                write_message(self.send, &Message::JobOpened(JobOpened::Stale)).await?;
                let _ = self.send.finish();
                return Ok(());
            }
            OpenedAttempt::Current { log_len } | OpenedAttempt::Finished { log_len } => {
                self.stored_len = log_len;
                write_message(
                    self.send,
                    &Message::JobOpened(JobOpened::Resume {
                        next_offset: log_len,
                    }),
                )
                .await?;
            }
        }
        let mut flush_at: Option<Instant> = None;
        loop {
            let message = tokio::select! {
                message = read_message(recv, decoder) => message?,
                _ = sleep_until(flush_at) => {
                    flush_at = None;
                    if !self.flush().await? {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                self.flush().await?;
                return Ok(());
            };
            match message {
                Message::JobStarted(_) => {
                    if !self.started {
                        self.started = true;
                        flush_at.get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
                    }
                }
                Message::LogChunk(chunk) => {
                    self.accept_chunk(chunk)?;
                    if self.pending_bytes >= FLUSH_BYTES {
                        flush_at = None;
                        if !self.flush().await? {
                            return Ok(());
                        }
                    } else if self.pending_bytes > 0 {
                        flush_at.get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
                    }
                }
                Message::JobFinished(finished) => {
                    self.finish(finished).await?;
                    let _ = self.send.finish();
                    return Ok(());
                }
                other => bail!("unexpected {} on a job stream", other.name()),
            }
        }
    }

    /// Appends a chunk to the pending batch, skipping bytes already received (a replay after
    /// a reconnect). A gap means the agent lost output: a protocol error.
    fn accept_chunk(&mut self, chunk: cronium_protocol::LogChunk) -> anyhow::Result<()> {
        let expected = self.stored_len + self.pending_bytes as u64;
        let end = chunk.offset + chunk.data.len() as u64;
        if chunk.offset > expected {
            bail!(
                "log chunk at offset {} leaves a gap after {expected}",
                chunk.offset
            );
        }
        if end <= expected {
            return Ok(());
        }
        let skip = (expected - chunk.offset) as usize;
        let stream = match chunk.stream {
            LogStream::Stdout => Stream::Stdout,
            LogStream::Stderr => Stream::Stderr,
            LogStream::System => Stream::System,
        };
        let data = chunk.data[skip..].to_vec();
        self.pending_bytes += data.len();
        self.pending.push(LogChunk {
            offset: expected,
            stream,
            data,
        });
        Ok(())
    }

    /// Commits pending output; returns false when the attempt turned out to be stale.
    async fn flush(&mut self) -> anyhow::Result<bool> {
        if self.pending.is_empty() && self.started == self.started_stored {
            return Ok(true);
        }
        let stored = self
            .state
            .store
            .append_logs(self.agent_id, self.attempt, self.started, &self.pending)
            .await?;
        let Some(stored_len) = stored else {
            debug!("attempt became stale while streaming");
            let _ = self.send.reset(CloseCode::Normal.to_u32().into());
            return Ok(false);
        };
        self.stored_len = stored_len;
        self.pending.clear();
        self.pending_bytes = 0;
        self.started_stored = self.started;
        self.state.job_events.notify(&self.attempt.job_id);
        write_message(
            self.send,
            &Message::LogAck(LogAck {
                next_offset: stored_len,
            }),
        )
        .await?;
        Ok(true)
    }

    async fn finish(&mut self, finished: JobFinished) -> anyhow::Result<()> {
        let status = match finished.status {
            FinalStatus::Completed => JobStatus::Completed,
            FinalStatus::Failed => JobStatus::Failed,
            FinalStatus::Cancelled => JobStatus::Cancelled,
        };
        let reason = match (finished.status, finished.reason) {
            (FinalStatus::Cancelled, _) => Some(Reason::Cancelled),
            (FinalStatus::Completed, _) => None,
            (FinalStatus::Failed, reason) => Some(match reason {
                Some(FailReason::ExitCode) | None => Reason::ExitCode,
                Some(FailReason::Timeout) => Reason::Timeout,
                Some(FailReason::Spawn) => Reason::Spawn,
                Some(FailReason::Signal) => Reason::Signal,
                Some(FailReason::Lost) => Reason::Lost,
                Some(FailReason::Oom) => Reason::Oom,
                Some(FailReason::HttpStatus) => Reason::HttpStatus,
                Some(FailReason::HttpError) => Reason::HttpError,
            }),
        };
        if let Some(result) = &finished.result {
            serde_json::from_str::<serde_json::Value>(result).context("result is not JSON")?;
        }
        let result = AttemptResult {
            status,
            reason,
            exit_code: finished.exit_code,
            log_len: finished.log_len,
            result: finished.result,
            condition: finished.condition,
        };
        let outcome = self
            .state
            .store
            .finish_attempt(self.agent_id, self.attempt, &self.pending, &result)
            .await?;
        self.pending.clear();
        self.pending_bytes = 0;
        let verdict = match outcome {
            FinishOutcome::Recorded { notified } => {
                if notified {
                    self.state.notifier.notify_one();
                }
                FinishVerdict::Recorded
            }
            FinishOutcome::Requeued => {
                self.state.registry.wake(self.agent_id);
                FinishVerdict::Recorded
            }
            FinishOutcome::Duplicate => FinishVerdict::Duplicate,
            FinishOutcome::Stale => FinishVerdict::Stale,
            FinishOutcome::LengthMismatch { stored } => {
                bail!(
                    "agent reported {} bytes of output, {stored} are stored",
                    finished.log_len
                )
            }
        };
        self.state.job_events.notify(&self.attempt.job_id);
        write_message(self.send, &Message::FinishAck(FinishAck { verdict })).await?;
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
