//! The uploader: one task per attempt that streams its spool to the control plane.
//!
//! It waits for a connection, opens a job stream with `JobOpen`, and sends from the offset the
//! control plane asks for: `JobStarted`, the log as `LogChunk`s (following the spool as the job
//! writes it), then `JobFinished` once the result is stored and every byte was sent. The first
//! pass of an attempt assigned to this process sends from offset 0 right after `JobOpen`, without
//! waiting for `JobOpened`: the control plane holds none of its output yet, and reads `JobOpened`'s
//! answer with the others (a no-op job's whole upload is then one flight each way). A
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
use quinn::{Connection, RecvStream, SendStream, WriteError};
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
    // Until a pass has run, the control plane holds none of a fresh attempt's output.
    let mut nothing_sent = attempt.fresh;

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

        let from_start = std::mem::take(&mut nothing_sent);
        let pass = tokio::select! {
            pass = upload_once(&current, &attempt, from_start) => pass,
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

/// One pass over a fresh job stream. With `from_start` (the control plane holds none of the
/// attempt's output) the log is sent from offset 0 at once and `JobOpened` is read with the other
/// answers; otherwise the pass waits for `JobOpened` and sends from the offset it names.
async fn upload_once(
    connection: &Connection,
    attempt: &Attempt,
    from_start: bool,
) -> Result<UploadEnd, UploadError> {
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
    let next_offset = if from_start {
        0
    } else {
        match read_opened(&mut recv, &mut decoder).await? {
            Some(next_offset) => next_offset,
            None => {
                let _ = send.finish();
                return Ok(UploadEnd::Stale);
            }
        }
    };

    let sender = pin!(send_from(connection, &mut send, attempt, next_offset));
    let mut receiver = pin!(receive_answers(&mut recv, &mut decoder, from_start));
    tokio::select! {
        sent = sender => match sent {
            // Everything is sent; the answer to `JobFinished` decides.
            Ok(()) => receiver.await,
            // The control plane stopped reading before `JobOpened` was read: a stale attempt's
            // stream is closed that way, and the answer says so.
            Err(UploadError::Frame(FrameIoError::Write(WriteError::Stopped(_)))) if from_start => {
                receiver.await
            }
            Err(error) => Err(error),
        },
        // A `FinishAck` can only answer our `JobFinished`, so the sender is done too; `Stale`
        // ends the pass whatever is left to send.
        received = &mut receiver => received,
    }
}

/// Reads `JobOpened`: the offset to send from, or None when the attempt is stale.
async fn read_opened(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<u64>, UploadError> {
    match read_message(recv, decoder).await? {
        Some(Message::JobOpened(JobOpened::Resume { next_offset })) => Ok(Some(next_offset)),
        Some(Message::JobOpened(JobOpened::Stale)) => Ok(None),
        Some(other) => Err(UploadError::Unexpected(other.name())),
        None => Err(UploadError::Closed),
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

/// Reads the control plane's answers until the `FinishAck`, starting with `JobOpened` when
/// `opened_unread` (the pass sent without waiting for it).
async fn receive_answers(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
    opened_unread: bool,
) -> Result<UploadEnd, UploadError> {
    // Whatever offset it names, the control plane skips the bytes it already holds.
    if opened_unread && read_opened(recv, decoder).await?.is_none() {
        return Ok(UploadEnd::Stale);
    }
    loop {
        match read_message(recv, decoder).await? {
            Some(Message::LogAck(_)) => {}
            Some(Message::FinishAck(ack)) => return Ok(UploadEnd::Acknowledged(ack.verdict)),
            Some(other) => return Err(UploadError::Unexpected(other.name())),
            None => return Err(UploadError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use cronium_protocol::{FinalStatus, FinishAck, LogStream};

    use super::*;
    use crate::spool::{AttemptSpool, Outcome, Spool, SpoolSpec};

    /// A QUIC server on loopback that accepts one connection, and a client connected to it.
    struct Link {
        server: quinn::Endpoint,
        client: quinn::Endpoint,
        connection: Connection,
        accepted: Connection,
    }

    async fn link() -> Link {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = key.cert.der().clone();
        let private =
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
        let tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], private)
            .unwrap();
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        )));
        let connecting = client
            .connect(server.local_addr().unwrap(), "localhost")
            .unwrap();
        let accepting = async { server.accept().await.unwrap().await.unwrap() };
        let (connection, accepted) = tokio::join!(connecting, accepting);
        Link {
            server,
            client,
            connection: connection.unwrap(),
            accepted,
        }
    }

    impl Drop for Link {
        fn drop(&mut self) {
            self.client.close(0u32.into(), b"");
            self.server.close(0u32.into(), b"");
        }
    }

    /// An attempt that wrote `hello` and exited 0.
    fn ended_attempt(dir: &std::path::Path, fresh: bool) -> Attempt {
        let spool = Spool::open(dir.to_path_buf()).unwrap();
        let attempt: AttemptSpool = spool
            .create(
                &SpoolSpec {
                    job_id: "job-1".into(),
                    attempt: 1,
                    run_id: "run".into(),
                    event_id: "event".into(),
                },
                1024,
            )
            .unwrap();
        attempt.append(LogStream::Stdout, b"hello").unwrap();
        attempt
            .finish(Outcome {
                status: FinalStatus::Completed,
                reason: None,
                exit_code: Some(0),
            })
            .unwrap();
        Attempt::new(attempt, fresh).0
    }

    /// Reads messages until `JobFinished`, returning what came.
    async fn read_until_finished(
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            let message = read_message(recv, decoder).await.unwrap().unwrap();
            let finished = matches!(message, Message::JobFinished(_));
            messages.push(message);
            if finished {
                return messages;
            }
        }
    }

    fn chunks(messages: &[Message]) -> Vec<(u64, Vec<u8>)> {
        messages
            .iter()
            .filter_map(|message| match message {
                Message::LogChunk(chunk) => Some((chunk.offset, chunk.data.clone())),
                _ => None,
            })
            .collect()
    }

    /// Runs one upload pass of `attempt` over a fresh link, with `peer` serving the control
    /// plane's end of the job stream; both must end within 20 s.
    async fn pass<T, F>(
        attempt: &Attempt,
        from_start: bool,
        peer: impl FnOnce(SendStream, RecvStream) -> F,
    ) -> (Result<UploadEnd, UploadError>, T)
    where
        F: Future<Output = T>,
    {
        let link = link().await;
        let control_plane = async {
            let (send, recv) = link.accepted.accept_bi().await.unwrap();
            peer(send, recv).await
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                upload_once(&link.connection, attempt, from_start),
                control_plane
            )
        })
        .await
        .expect("the pass ended: neither side waited for an answer that never comes")
    }

    /// Reads the stream's first message, which must be `JobOpen`.
    async fn read_open(recv: &mut RecvStream, decoder: &mut FrameDecoder) {
        let open = read_message(recv, decoder).await.unwrap().unwrap();
        assert!(matches!(open, Message::JobOpen(_)), "{open:?}");
    }

    /// The first pass of an attempt assigned to this process sends its whole upload before any
    /// answer: a control plane that answers only once it has read `JobFinished` still gets it.
    #[tokio::test]
    async fn a_fresh_attempt_is_sent_whole_without_waiting_for_job_opened() {
        let dir = tempfile::tempdir().unwrap();
        let attempt = ended_attempt(dir.path(), true);
        let (end, messages) = pass(&attempt, true, |mut send, mut recv| async move {
            let mut decoder = FrameDecoder::new();
            let messages = read_until_finished(&mut recv, &mut decoder).await;
            for answer in [
                Message::JobOpened(JobOpened::Resume { next_offset: 0 }),
                Message::FinishAck(FinishAck {
                    verdict: FinishVerdict::Recorded,
                }),
            ] {
                write_message(&mut send, &answer).await.unwrap();
            }
            let _ = send.finish();
            messages
        })
        .await;
        assert!(matches!(
            end.unwrap(),
            UploadEnd::Acknowledged(FinishVerdict::Recorded)
        ));
        assert!(matches!(messages.first(), Some(Message::JobOpen(_))));
        assert_eq!(chunks(&messages), vec![(0, b"hello".to_vec())]);
    }

    /// A pass that may not start from 0 sends from the offset `JobOpened` names.
    #[tokio::test]
    async fn a_recovered_attempt_is_sent_from_the_offset_the_control_plane_holds() {
        let dir = tempfile::tempdir().unwrap();
        let attempt = ended_attempt(dir.path(), false);
        let (end, messages) = pass(&attempt, false, |mut send, mut recv| async move {
            let mut decoder = FrameDecoder::new();
            read_open(&mut recv, &mut decoder).await;
            let resume = Message::JobOpened(JobOpened::Resume { next_offset: 3 });
            write_message(&mut send, &resume).await.unwrap();
            let messages = read_until_finished(&mut recv, &mut decoder).await;
            let ack = Message::FinishAck(FinishAck {
                verdict: FinishVerdict::Duplicate,
            });
            write_message(&mut send, &ack).await.unwrap();
            let _ = send.finish();
            messages
        })
        .await;
        assert!(matches!(
            end.unwrap(),
            UploadEnd::Acknowledged(FinishVerdict::Duplicate)
        ));
        assert_eq!(chunks(&messages), vec![(3, b"lo".to_vec())]);
    }

    /// A control plane that no longer wants the attempt answers `Stale` and stops reading; the
    /// first pass, which sent without waiting, ends as stale rather than as an error.
    #[tokio::test]
    async fn a_fresh_attempt_answered_stale_ends_as_stale() {
        let dir = tempfile::tempdir().unwrap();
        let attempt = ended_attempt(dir.path(), true);
        let (end, ()) = pass(&attempt, true, |mut send, mut recv| async move {
            let mut decoder = FrameDecoder::new();
            read_open(&mut recv, &mut decoder).await;
            let stale = Message::JobOpened(JobOpened::Stale);
            write_message(&mut send, &stale).await.unwrap();
            let _ = send.finish();
            let _ = recv.stop(0u32.into());
        })
        .await;
        assert!(matches!(end.unwrap(), UploadEnd::Stale));
    }
}
