//! The runtime helper endpoint of one attempt: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! Every attempt gets its own server on `<work dir>/.cronium/helper.sock` and its own token (32
//! random bytes, hex); requests carry `Authorization: Bearer <token>`, anything else is answered
//! 401. The server lives exactly as long as the attempt's process: dropping the
//! [`HelperServer`] stops it and removes the socket, so a call after the job ended finds nothing
//! to connect to. The helper libraries (`cronium.sh`, `cronium.py`, `cronium.js`) are written
//! into the work dir next to the script ([`write_libraries`]).
//!
//! The HTTP protocol itself (paths, bodies, caps, token check, answers) is [`endpoint`], shared
//! with the control plane's SSH fallback; this module is its agent backend ([`AgentBackend`]).
//!
//! Calls answered here: `GET /v1/input`, `POST /v1/output`, `POST /v1/condition`,
//! `GET /v1/event`. Output and condition go to the attempt's spool and travel to the control
//! plane in `JobFinished`.
//!
//! Calls forwarded to the control plane ([`forward`]): `POST /v1/variables/get` (a variable of
//! the event's owner; a value the script set that is still on its way is answered from the
//! journal), `POST /v1/variables/set` and `POST /v1/notify`. Writes go to the attempt's
//! [`journal`] first: the call answers 200 once the control plane applied it, or 202
//! `{"queued": true}` when the link is down, and the write is sent when it is back (before the
//! attempt's result).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cronium_protocol::JobSpec;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::endpoint::{Endpoint, HelperBackend, HelperError, WriteOutcome};
use self::forward::{ForwardError, HelperLink};
use crate::spool::AttemptSpool;
use cronium_protocol::{AttemptRef, HelperReply, HelperRequest};

pub mod endpoint;
pub mod forward;
pub mod journal;

pub use endpoint::{LIBRARIES, MAX_BODY, value_from_text};

/// How long a write call waits for the control plane's answer before answering "queued" (it
/// does not wait for a connection: while the link is down writes are queued at once).
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// How long `get_variable` waits for a connection, and then for the answer, before giving up.
const READ_WAIT: Duration = Duration::from_secs(10);

/// The helper dir inside the work dir.
pub const HELPER_DIR: &str = ".cronium";

/// The socket's file name inside [`HELPER_DIR`].
pub const SOCKET_NAME: &str = "helper.sock";

/// Longest socket path bound directly (`sun_path` holds 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// The agent's backend of one attempt: reads and values from the spool, variables and
/// notifications through the journal and the link to the control plane.
#[derive(Debug)]
pub struct AgentBackend {
    input: Value,
    event: Value,
    spool: AttemptSpool,
    job: AttemptRef,
    link: HelperLink,
}

/// A running helper endpoint; dropping it stops the server and removes the socket.
#[derive(Debug)]
pub struct HelperServer {
    token: String,
    socket: PathBuf,
    client_path: String,
    stop: CancellationToken,
}

impl HelperServer {
    /// Starts the endpoint of `spec`'s attempt in `work_dir` (which must exist). `shared`: the
    /// script runs as another user (a Docker job with a `user`), so the socket must be
    /// reachable by it. Calls that need the control plane go through `link`.
    pub fn start(
        work_dir: &Path,
        spec: &JobSpec,
        spool: AttemptSpool,
        shared: bool,
        link: HelperLink,
    ) -> io::Result<HelperServer> {
        let dir = work_dir.join(HELPER_DIR);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        if shared {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        }
        let socket = dir.join(SOCKET_NAME);
        let (listener, client_path) = bind(&dir, &socket)?;
        let mode = if shared { 0o666 } else { 0o600 };
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))?;

        let input = spec
            .input
            .as_deref()
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
            .unwrap_or(Value::Null);
        let endpoint = Endpoint::new(AgentBackend {
            input,
            event: json!({
                "job_id": spec.job_id,
                "run_id": spec.run_id,
                "event_id": spec.event_id,
                "attempt": spec.attempt,
            }),
            job: spool.attempt().clone(),
            spool,
            link,
        });
        let token = endpoint.token().to_owned();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, endpoint, stop.clone()));
        Ok(HelperServer {
            token,
            socket,
            client_path,
            stop,
        })
    }

    /// The attempt's token (`CRONIUM_JOB_TOKEN`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The socket path a process on the host connects to (`CRONIUM_HELPER_SOCKET`): absolute,
    /// or relative to the work dir when the absolute path is too long for a Unix socket.
    pub fn client_path(&self) -> &str {
        &self.client_path
    }
}

impl Drop for HelperServer {
    fn drop(&mut self) {
        self.stop.cancel();
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(socket = %self.socket.display(), %error, "could not remove a helper socket")
            }
        }
    }
}

/// Binds the socket; a path too long for `sun_path` is bound through `/proc/self/fd`.
fn bind(dir: &Path, socket: &Path) -> io::Result<(UnixListener, String)> {
    let absolute = socket.to_string_lossy().into_owned();
    let listener = if absolute.len() <= MAX_SOCKET_PATH {
        std::os::unix::net::UnixListener::bind(socket)?
    } else {
        let handle = std::fs::File::open(dir)?;
        let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", handle.as_raw_fd());
        let listener = std::os::unix::net::UnixListener::bind(&short)?;
        drop(handle);
        listener
    };
    listener.set_nonblocking(true)?;
    let client_path = if absolute.len() <= MAX_SOCKET_PATH {
        absolute
    } else {
        format!("{HELPER_DIR}/{SOCKET_NAME}")
    };
    Ok((UnixListener::from_std(listener)?, client_path))
}

/// Writes `cronium.sh`, `cronium.py` and `cronium.js` into the work dir.
pub fn write_libraries(work_dir: &Path, shared: bool) -> io::Result<()> {
    let mode = if shared { 0o644 } else { 0o600 };
    for (name, text) in LIBRARIES {
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(work_dir.join(name))?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        std::fs::set_permissions(work_dir.join(name), std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

async fn serve(
    listener: UnixListener,
    endpoint: Arc<Endpoint<AgentBackend>>,
    stop: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "helper accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        connections.spawn(endpoint::serve_connection(
            stream,
            endpoint.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
}

/// The answer to a refusal from the control plane.
fn refusal(reply: HelperReply) -> HelperError {
    match reply {
        HelperReply::Refused { reason, message } => HelperError::refused(reason, message),
        HelperReply::Done | HelperReply::Value { .. } => {
            HelperError::bad_gateway("the control plane gave an unexpected answer")
        }
    }
}

fn unreachable_answer(failure: &ForwardError) -> HelperError {
    tracing::debug!(error = %failure, "a forwarded helper read failed");
    HelperError::unavailable(format!(
        "the control plane is unreachable right now ({failure}); try again"
    ))
}

impl HelperBackend for AgentBackend {
    fn input(&self) -> &Value {
        &self.input
    }

    fn event(&self) -> &Value {
        &self.event
    }

    async fn set_output(&self, value: Value) -> Result<(), HelperError> {
        self.spool
            .set_output(&value.to_string())
            .map_err(|failure| {
                tracing::warn!(error = %failure, "could not store a job's output value");
                HelperError::internal("the agent could not store the value")
            })
    }

    async fn set_condition(&self, condition: bool) -> Result<(), HelperError> {
        self.spool.set_condition(condition).map_err(|failure| {
            tracing::warn!(error = %failure, "could not store a job's condition");
            HelperError::internal("the agent could not store the condition")
        })
    }

    /// A value the script set that is still on its way is answered from the journal.
    async fn get_variable(&self, name: String) -> Result<Option<String>, HelperError> {
        if let Some(pending) = self.spool.journal().pending_value(&name) {
            return Ok(Some(pending));
        }
        let reply = tokio::time::timeout(
            READ_WAIT * 2,
            self.link
                .read(&self.job, HelperRequest::GetVariable { name }, READ_WAIT),
        )
        .await
        .unwrap_or(Err(ForwardError::Timeout(READ_WAIT * 2)));
        match reply {
            Ok(HelperReply::Value { value_json }) => Ok(value_json),
            Ok(other) => Err(refusal(other)),
            Err(failure) => Err(unreachable_answer(&failure)),
        }
    }

    /// Journals a write, then tries to deliver it: applied once the control plane applied it,
    /// queued while the link is down, the refusal when it was refused.
    async fn write(&self, request: HelperRequest) -> Result<WriteOutcome, HelperError> {
        // Notifications leave the system: secret values in them are masked like the log.
        let request = match request {
            HelperRequest::Notify {
                tool,
                title,
                message,
            } => {
                let masker = self.spool.masker();
                HelperRequest::Notify {
                    tool,
                    title: title.map(|title| masker.mask_str(&title)),
                    message: masker.mask_str(&message),
                }
            }
            other => other,
        };
        let journal = self.spool.journal();
        let seq = journal.append(request).map_err(|failure| {
            tracing::warn!(error = %failure, "could not journal a helper write");
            HelperError::internal("the agent could not store the call")
        })?;
        let flushed = tokio::time::timeout(
            WRITE_WAIT,
            self.link.flush(journal, &self.job, Duration::ZERO),
        )
        .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => tracing::debug!(error = %failure, "helper write queued"),
            Err(_) => tracing::debug!("no answer to a helper write in time; it stays queued"),
        }
        if !journal.is_settled(seq) {
            return Ok(WriteOutcome::Queued);
        }
        match journal.take_refusal(seq) {
            Some((reason, message)) => Err(HelperError::refused(reason, message)),
            None => Ok(WriteOutcome::Applied),
        }
    }
}

#[cfg(test)]
mod tests;
