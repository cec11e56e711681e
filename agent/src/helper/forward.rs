//! Sending helper calls to the control plane: one QUIC stream per call.
//!
//! [`HelperLink`] follows the agent's current connection (published by the connection loop).
//! Reads (`get_variable`) go out directly; writes go through the attempt's [`HelperJournal`]
//! and [`flush`] sends every pending write in order, settling each with the control plane's
//! answer. A flush stops at the first failure (no connection, a broken stream, the control
//! plane unable to serve) and leaves the rest pending for the next one.

use std::time::Duration;

use cronium_protocol::{AttemptRef, FrameDecoder, HelperCall, HelperRefusal, HelperReply, Message};
use quinn::Connection;
use thiserror::Error;
use tokio::sync::watch;

use super::journal::HelperJournal;
use crate::frame_io::{FrameIoError, read_message, write_message};
use crate::spool::SpoolError;

/// Longest wait for the control plane's answer to one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call or a flush did not complete.
#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("the agent is not connected to the control plane")]
    Offline,
    #[error("cannot open a helper stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameIoError),
    #[error("the control plane closed the helper stream without an answer")]
    Closed,
    #[error("unexpected {0} message on a helper stream")]
    Unexpected(&'static str),
    #[error("the control plane did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the control plane cannot serve the call right now: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The agent's current connection, as seen by helper endpoints.
#[derive(Debug, Clone)]
pub struct HelperLink {
    connection: watch::Receiver<Option<Connection>>,
}

impl HelperLink {
    /// Follows the connection the connection loop publishes.
    pub fn new(connection: watch::Receiver<Option<Connection>>) -> HelperLink {
        HelperLink { connection }
    }

    /// A link that is never connected (runner tests): reads fail, writes stay queued.
    pub fn offline() -> HelperLink {
        let (_, connection) = watch::channel(None);
        HelperLink { connection }
    }

    /// The live connection, waiting up to `within` for one.
    pub async fn connection(&self, within: Duration) -> Option<Connection> {
        let mut connection = self.connection.clone();
        let wait = connection.wait_for(|current| {
            current
                .as_ref()
                .is_some_and(|live| live.close_reason().is_none())
        });
        match tokio::time::timeout(within, wait).await {
            Ok(Ok(current)) => current.clone(),
            _ => None,
        }
    }

    /// Sends one read (`seq` 0), waiting up to `within` for a connection.
    pub async fn read(
        &self,
        job: &AttemptRef,
        request: cronium_protocol::HelperRequest,
        within: Duration,
    ) -> Result<HelperReply, ForwardError> {
        let connection = self.connection(within).await.ok_or(ForwardError::Offline)?;
        call(
            &connection,
            HelperCall {
                job: job.clone(),
                seq: 0,
                request,
            },
        )
        .await
    }

    /// Flushes the journal, waiting up to `within` for a connection.
    pub async fn flush(
        &self,
        journal: &HelperJournal,
        job: &AttemptRef,
        within: Duration,
    ) -> Result<(), ForwardError> {
        if !journal.has_pending() {
            return Ok(());
        }
        let connection = self.connection(within).await.ok_or(ForwardError::Offline)?;
        flush(&connection, journal, job).await
    }
}

/// Sends every pending write of `journal` in order and settles it with the answer.
pub async fn flush(
    connection: &Connection,
    journal: &HelperJournal,
    job: &AttemptRef,
) -> Result<(), ForwardError> {
    let _turn = journal.flushing().lock().await;
    while let Some((seq, request)) = journal.next_pending() {
        let reply = call(
            connection,
            HelperCall {
                job: job.clone(),
                seq,
                request,
            },
        )
        .await?;
        if let HelperReply::Refused { reason, message } = &reply {
            if *reason == HelperRefusal::Unavailable {
                return Err(ForwardError::Unavailable(message.clone()));
            }
            tracing::info!(job = %job.job_id, attempt = job.attempt, seq, ?reason, %message, "the control plane refused a helper write");
        }
        journal.settle(seq, &reply)?;
    }
    Ok(())
}

/// One call on its own stream.
pub async fn call(connection: &Connection, call: HelperCall) -> Result<HelperReply, ForwardError> {
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        write_message(&mut send, &Message::HelperCall(call)).await?;
        let _ = send.finish();
        let mut decoder = FrameDecoder::new();
        match read_message(&mut recv, &mut decoder).await? {
            Some(Message::HelperReply(reply)) => Ok(reply),
            Some(other) => Err(ForwardError::Unexpected(other.name())),
            None => Err(ForwardError::Closed),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| ForwardError::Timeout(CALL_TIMEOUT))?
}
