//! The uploader: one task per attempt that streams its spool to the control plane.
//!
//! It waits for a connection, opens a job stream with `JobOpen`, and sends from the offset the
//! control plane asks for: `JobStarted`, the log as `LogChunk`s (following the spool as the job
//! writes it), then `JobFinished` once the result is stored and every byte was sent. A
//! `FinishAck` (whatever the verdict) or `JobOpened::Stale` ends the attempt and deletes its
//! spool. Helper writes the script made while the link was down (the attempt's journal) are sent
//! when a pass starts and, at the latest, before `JobFinished`, so the control plane applies them
//! while the attempt is still running in its view. Any stream or connection error only means "start over on the next connection": the
//! job keeps running and its output stays on disk meanwhile.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use cronium_protocol::{
    FinishVerdict, FrameDecoder, JobFinished, JobOpen, JobOpened, JobStarted, LogChunk,
    MAX_LOG_CHUNK, Message,
};
use quinn::{Connection, RecvStream, SendStream};
use thiserror::Error;

use super::backoff::Backoff;
use crate::frame_io::{FrameIoError, read_message, write_message};
use crate::helper::forward::{ForwardError, flush};
use crate::jobs::{Attempt, Jobs};
use crate::runner::StopReason;
use crate::spool::SpoolError;

/// Why one upload pass failed; the uploader retries on the next connection.
#[derive(Debug, Error)]
enum UploadError {
    #[error("cannot open a job stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameIoError),
    #[error("the control plane closed the job stream")]
    Closed,
    #[error("unexpected {0} message on a job stream")]
    Unexpected(&'static str),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("sending queued helper writes: {0}")]
    Helper(#[from] ForwardError),
}

/// How an upload pass ended.
enum UploadEnd {
    /// The control plane answered the result.
    Acknowledged(FinishVerdict),
    /// The control plane no longer wants the attempt.
    Stale,
}

/// Uploads one attempt until the control plane acknowledged its result, it was discarded, or
/// the agent exits.
pub(crate) async fn upload_attempt(jobs: Jobs, attempt: Arc<Attempt>) {
    let reference = attempt.spool.attempt().clone();
    let mut connection = jobs.connection();
    let mut retry = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let exit = jobs.exit_token().clone();
    let discard = attempt.discard.clone();

    let end = loop {
        // Wait for a live connection.
        let current = tokio::select! {
            current = connection.wait_for(|current| current.as_ref().is_some_and(|c| c.close_reason().is_none())) => {
                match current {
                    Ok(current) => current.clone(),
                    // The connection loop is gone: the agent is exiting.
                    Err(_) => return,
                }
            }
            () = discard.cancelled() => break None,
            () = exit.cancelled() => return,
        };
        let Some(current) = current else { continue };

        let pass = tokio::select! {
            pass = upload_once(&current, &attempt) => pass,
            () = discard.cancelled() => break None,
            () = exit.cancelled() => return,
        };
        match pass {
            Ok(UploadEnd::Acknowledged(verdict)) => break Some(verdict),
            Ok(UploadEnd::Stale) => {
                tracing::info!(job = %reference.job_id, attempt = reference.attempt, "the control plane says the attempt is stale");
                break None;
            }
            Err(error) => {
                let delay = retry.next_delay();
                tracing::debug!(job = %reference.job_id, attempt = reference.attempt, %error, ?delay, "job upload interrupted; retrying");
                // Retry after the delay, or at once when a new connection comes up.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = connection.changed() => {}
                    () = discard.cancelled() => break None,
                    () = exit.cancelled() => return,
                }
            }
        }
    };

    match end {
        Some(verdict) => {
            tracing::info!(job = %reference.job_id, attempt = reference.attempt, ?verdict, "job result delivered");
        }
        None => {
            // Discarded: stop the process and wait for the runner to settle before deleting the
            // spool it writes to.
            jobs.stop(&attempt, StopReason::Abandon);
            loop {
                let changed = attempt.spool.changed().notified();
                let mut changed = pin!(changed);
                changed.as_mut().enable();
                if attempt.spool.progress().result.is_some() {
                    break;
                }
                tokio::select! {
                    () = changed => {}
                    () = exit.cancelled() => return,
                }
            }
        }
    }
    if let Err(error) = attempt.spool.remove() {
        tracing::warn!(job = %reference.job_id, %error, "could not delete a spool directory");
    }
    jobs.remove(&reference);
}

/// One pass over a fresh job stream.
async fn upload_once(connection: &Connection, attempt: &Attempt) -> Result<UploadEnd, UploadError> {
    flush(connection, attempt.spool.journal(), attempt.spool.attempt()).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut decoder = FrameDecoder::new();
    write_message(
        &mut send,
        &Message::JobOpen(JobOpen {
            job: attempt.spool.attempt().clone(),
        }),
    )
    .await?;
    let next_offset = match read_message(&mut recv, &mut decoder).await? {
        Some(Message::JobOpened(JobOpened::Resume { next_offset })) => next_offset,
        Some(Message::JobOpened(JobOpened::Stale)) => {
            let _ = send.finish();
            return Ok(UploadEnd::Stale);
        }
        Some(other) => return Err(UploadError::Unexpected(other.name())),
        None => return Err(UploadError::Closed),
    };

    let sender = pin!(send_from(connection, &mut send, attempt, next_offset));
    let mut receiver = pin!(receive_answers(&mut recv, &mut decoder));
    tokio::select! {
        sent = sender => {
            sent?;
            // Everything is sent; the answer to `JobFinished` decides.
            receiver.await.map(UploadEnd::Acknowledged)
        }
        received = &mut receiver => {
            // A `FinishAck` can only answer our `JobFinished`, so the sender is done too.
            received.map(UploadEnd::Acknowledged)
        }
    }
}

/// Sends `JobStarted`, the log from `offset` as it grows, the queued helper writes, and finally
/// `JobFinished`.
async fn send_from(
    connection: &Connection,
    send: &mut SendStream,
    attempt: &Attempt,
    offset: u64,
) -> Result<(), UploadError> {
    let spool = &attempt.spool;
    let mut reader = spool.reader(offset)?;
    let mut started_sent = false;
    loop {
        let changed = spool.changed().notified();
        let mut changed = pin!(changed);
        // Register interest before looking, so a change made after the look wakes us.
        changed.as_mut().enable();
        let progress = spool.progress();
        if !started_sent && let Some(pid) = progress.pid {
            write_message(send, &Message::JobStarted(JobStarted { pid })).await?;
            started_sent = true;
        }
        while let Some(piece) = reader.next_piece(progress.file_len, MAX_LOG_CHUNK)? {
            let chunk = LogChunk {
                offset: piece.offset,
                stream: piece.stream,
                data: piece.data,
            };
            write_message(send, &Message::LogChunk(chunk)).await?;
        }
        if let Some(result) = progress.result
            && reader.offset() >= result.log_len
        {
            // The script can make no more calls: send what it wrote before reporting the end.
            flush(connection, spool.journal(), spool.attempt()).await?;
            let helper = spool.helper_values();
            let finished = JobFinished {
                status: result.outcome.status,
                reason: result.outcome.reason,
                exit_code: result.outcome.exit_code,
                log_len: result.log_len,
                result: helper.output,
                condition: helper.condition,
            };
            write_message(send, &Message::JobFinished(finished)).await?;
            return Ok(());
        }
        changed.await;
    }
}

/// Reads the control plane's answers until the `FinishAck`.
async fn receive_answers(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<FinishVerdict, UploadError> {
    loop {
        match read_message(recv, decoder).await? {
            Some(Message::LogAck(_)) => {}
            Some(Message::FinishAck(ack)) => return Ok(ack.verdict),
            Some(other) => return Err(UploadError::Unexpected(other.name())),
            None => return Err(UploadError::Closed),
        }
    }
}
