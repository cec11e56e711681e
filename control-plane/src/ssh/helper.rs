//! Runtime helpers for SSH fallback jobs: the same HTTP endpoint as an agent's
//! (`cronium_agent::helper::endpoint`), reached through a Unix socket sshd forwards.
//!
//! Once the attempt's remote temp dir exists, the control plane asks sshd for
//! `streamlocal-forward@openssh.com` of `<temp dir>/.cronium/helper.sock`. Every connection the
//! script makes to that socket arrives as a `forwarded-streamlocal@openssh.com` channel on the
//! SSH connection; the client handler (`session.rs`) routes it by socket path to this attempt
//! ([`Forwards`]: connections are pooled and shared by several jobs), and the channel is served
//! as HTTP/1.1 with the attempt's random token, checked in constant time.
//!
//! The backend answers from the store through the same function as a forwarded agent call
//! (`agents::helper_stream::answer`, with the runner key `ssh:<server id>`): variables of the
//! event's owner (sealed), notifications into the outbox. Each write gets the attempt's next
//! sequence number under a lock, so the store applies it at most once and in order; `output`
//! and `set_condition` are kept here and become part of the attempt's result. [`Helpers::finish`]
//! stops serving (requests in flight are finished first) and cancels the forward before the
//! result is recorded, so every write is applied before the result, or not at all.
//!
//! A server that refuses the forward (sshd `AllowStreamLocalForwarding no`, `DisableForwarding
//! yes`) still runs the job: the log gets one line saying why helpers are unavailable, and the
//! libraries, told through `CRONIUM_HELPER_UNAVAILABLE`, fail every call with that reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cronium_agent::helper::endpoint::{
    Endpoint, HelperBackend, HelperError, UNAVAILABLE_ENV, WriteOutcome, serve_connection,
};
use cronium_agent::spool::mask_json;
use cronium_protocol::{AttemptRef, HelperCall, HelperRefusal, HelperReply, HelperRequest, Masker};
use russh::Channel;
use russh::client::{Handle, Msg};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::session::{Client, STEP_TIMEOUT};
use crate::AppState;
use crate::agents::helper_stream;
use crate::store::jobs::ClaimedJob;

/// The socket inside the attempt's temp dir (the dir is made by the remote command).
pub(super) const SOCKET: &str = ".cronium/helper.sock";

/// Longest socket path asked for (`sun_path` holds 104 to 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// Connections served at once for one attempt; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Forwarded sockets of one SSH connection: socket path → the attempt serving it.
#[derive(Clone, Default)]
pub(super) struct Forwards {
    routes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Channel<Msg>>>>>,
}

impl Forwards {
    /// Where a channel sshd opened for `socket_path` goes; `None`: no attempt serves it.
    pub(super) fn route(&self, socket_path: &str) -> Option<mpsc::UnboundedSender<Channel<Msg>>> {
        self.routes
            .lock()
            .expect("ssh forwards")
            .get(socket_path)
            .cloned()
    }

    fn insert(&self, socket_path: &str) -> mpsc::UnboundedReceiver<Channel<Msg>> {
        let (send, receive) = mpsc::unbounded_channel();
        self.routes
            .lock()
            .expect("ssh forwards")
            .insert(socket_path.to_string(), send);
        receive
    }

    fn remove(&self, socket_path: &str) {
        self.routes
            .lock()
            .expect("ssh forwards")
            .remove(socket_path);
    }

    /// Routes in use (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.routes.lock().expect("ssh forwards").len()
    }
}

/// What the script set through the helpers that belongs to the attempt's result.
#[derive(Debug, Default, Clone)]
pub(super) struct Values {
    /// The `output` value, JSON text (masked).
    pub result: Option<String>,
    pub condition: Option<bool>,
}

/// The control plane's backend of one SSH attempt.
pub(super) struct SshBackend {
    state: AppState,
    runner: String,
    job: AttemptRef,
    input: Value,
    event: Value,
    masker: Masker,
    /// The last write's sequence number; held while a write is applied, so writes are applied
    /// in order and each number is used once.
    seq: tokio::sync::Mutex<u64>,
    values: Mutex<Values>,
}

impl SshBackend {
    pub(super) fn new(
        state: &AppState,
        runner: &str,
        claimed: &ClaimedJob,
        masker: Masker,
    ) -> SshBackend {
        SshBackend {
            state: state.clone(),
            runner: runner.to_string(),
            job: AttemptRef {
                job_id: claimed.id.clone(),
                attempt: claimed.attempt,
            },
            input: claimed
                .input
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or(Value::Null),
            event: json!({
                "job_id": claimed.id,
                "run_id": claimed.run_id,
                "event_id": claimed.event_id,
                "attempt": claimed.attempt,
            }),
            masker,
            seq: tokio::sync::Mutex::new(0),
            values: Mutex::new(Values::default()),
        }
    }

    async fn call(&self, seq: u64, request: HelperRequest) -> HelperReply {
        let call = HelperCall {
            job: self.job.clone(),
            seq,
            request,
        };
        helper_stream::answer(&self.state, &self.runner, call).await
    }
}

impl HelperBackend for SshBackend {
    fn input(&self) -> &Value {
        &self.input
    }

    fn event(&self) -> &Value {
        &self.event
    }

    async fn set_output(&self, value: Value) -> Result<(), HelperError> {
        let json = mask_json(&self.masker, &value.to_string());
        self.values.lock().expect("helper values").result = Some(json);
        Ok(())
    }

    async fn set_condition(&self, condition: bool) -> Result<(), HelperError> {
        self.values.lock().expect("helper values").condition = Some(condition);
        Ok(())
    }

    async fn get_variable(&self, name: String) -> Result<Option<String>, HelperError> {
        match self.call(0, HelperRequest::GetVariable { name }).await {
            HelperReply::Value { value_json } => Ok(value_json),
            HelperReply::Refused { reason, message } => Err(HelperError::refused(reason, message)),
            HelperReply::Done => Err(HelperError::bad_gateway(
                "the control plane gave an unexpected answer",
            )),
        }
    }

    async fn write(&self, request: HelperRequest) -> Result<WriteOutcome, HelperError> {
        // Notifications leave the system: secret values in them are masked like the log.
        let request = match request {
            HelperRequest::Notify {
                tool,
                title,
                message,
            } => HelperRequest::Notify {
                tool,
                title: title.map(|title| self.masker.mask_str(&title)),
                message: self.masker.mask_str(&message),
            },
            other => other,
        };
        let mut last = self.seq.lock().await;
        *last += 1;
        match self.call(*last, request).await {
            HelperReply::Done => Ok(WriteOutcome::Applied),
            HelperReply::Refused {
                reason: HelperRefusal::Unavailable,
                message,
            } => Err(HelperError::unavailable(format!("{message}; try again"))),
            HelperReply::Refused { reason, message } => Err(HelperError::refused(reason, message)),
            HelperReply::Value { .. } => Err(HelperError::bad_gateway(
                "the control plane gave an unexpected answer",
            )),
        }
    }
}

/// The helpers of one attempt: served, or unavailable with the reason.
pub(super) enum Helpers {
    Serving(Serving),
    Unavailable {
        reason: String,
        backend: Box<SshBackend>,
    },
}

/// A forwarded socket being served.
pub(super) struct Serving {
    socket: String,
    endpoint: Arc<Endpoint<SshBackend>>,
    forwards: Forwards,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Asks sshd to forward `<dir>/.cronium/helper.sock` and serves it; a refusal (or any failure
/// of the request) makes the helpers unavailable, never the job.
pub(super) async fn start(
    session: &Handle<Client>,
    forwards: &Forwards,
    dir: &str,
    backend: SshBackend,
) -> Helpers {
    let socket = format!("{dir}/{SOCKET}");
    if socket.len() > MAX_SOCKET_PATH {
        return Helpers::Unavailable {
            reason: format!(
                "the helper socket's path ({} bytes, under the server's TMPDIR) is too long for a Unix socket",
                socket.len()
            ),
            backend: Box::new(backend),
        };
    }
    // The route exists before sshd can open a channel for the socket.
    let mut channels = forwards.insert(&socket);
    let requested = tokio::time::timeout(STEP_TIMEOUT, session.streamlocal_forward(&socket)).await;
    let reason = match requested {
        Ok(Ok(())) => None,
        Ok(Err(russh::Error::RequestDenied)) => Some(
            "the SSH server refused to forward the helper socket (streamlocal-forward@openssh.com): \
             its sshd_config has AllowStreamLocalForwarding no or DisableForwarding yes, or sshd \
             could not create the socket"
                .to_string(),
        ),
        Ok(Err(error)) => Some(format!(
            "the SSH server did not forward the helper socket ({error})"
        )),
        Err(_) => Some("the SSH server did not answer the socket forwarding request".to_string()),
    };
    if let Some(reason) = reason {
        forwards.remove(&socket);
        return Helpers::Unavailable {
            reason,
            backend: Box::new(backend),
        };
    }
    let endpoint = Endpoint::new(backend);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let serving = tasks.clone();
    let (accept_endpoint, accept_stop) = (endpoint.clone(), stop.clone());
    tasks.spawn(async move {
        loop {
            let channel = tokio::select! {
                channel = channels.recv() => match channel {
                    Some(channel) => channel,
                    None => break,
                },
                () = accept_stop.cancelled() => break,
            };
            // The acceptor itself is one of the tasks.
            if serving.len() > MAX_CONNECTIONS {
                debug!("too many helper connections; one closed");
                continue;
            }
            serving.spawn(serve_connection(
                channel.into_stream(),
                accept_endpoint.clone(),
                accept_stop.clone(),
            ));
        }
    });
    Helpers::Serving(Serving {
        socket,
        endpoint,
        forwards: forwards.clone(),
        stop,
        tasks,
    })
}

impl Helpers {
    /// The environment the script gets for its helpers.
    pub(super) fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Helpers::Serving(serving) => vec![
                ("CRONIUM_HELPER_SOCKET", serving.socket.clone()),
                ("CRONIUM_JOB_TOKEN", serving.endpoint.token().to_string()),
            ],
            Helpers::Unavailable { reason, .. } => vec![(UNAVAILABLE_ENV, reason.clone())],
        }
    }

    /// Why the helpers are unavailable, if they are.
    pub(super) fn unavailable(&self) -> Option<&str> {
        match self {
            Helpers::Serving(_) => None,
            Helpers::Unavailable { reason, .. } => Some(reason),
        }
    }

    /// Stops serving (requests in flight are answered first), cancels the forward and returns
    /// what the script set.
    pub(super) async fn finish(self, session: &Handle<Client>) -> Values {
        match self {
            Helpers::Unavailable { backend, .. } => backend.values.into_inner().unwrap_or_default(),
            Helpers::Serving(serving) => {
                serving.stop.cancel();
                serving.tasks.close();
                serving.tasks.wait().await;
                serving.forwards.remove(&serving.socket);
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    session.cancel_streamlocal_forward(&serving.socket),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => debug!(%error, "could not cancel a helper socket forward"),
                    Err(_) => debug!("no answer to cancelling a helper socket forward"),
                }
                let values = serving.endpoint.backend().values.lock();
                values.expect("helper values").clone()
            }
        }
    }
}
