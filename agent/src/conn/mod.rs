//! The agent's side of the QUIC session: connecting out, the control stream, reconnecting.
//!
//! [`run`] dials the control plane's addresses in order and serves one session at a time:
//! `Hello` (with every attempt the agent still holds), then `Welcome` or `Reject`, then
//! heartbeats, claims, assignments and cancellations on the control stream. The live connection
//! is published on a watch channel for the per-attempt uploaders (`upload`). The control plane
//! opens a stream on the connection for every terminal viewer; they are accepted here and served
//! by [`Terminals`], and terminal sessions that end are reported on the control stream
//! (`TerminalEnded`), the live ones in every hello. When a connection is lost the agent
//! reconnects with jittered exponential backoff; jobs and terminal sessions keep running
//! meanwhile.
//! A `Reject` or a fatal close code (revoked, unknown agent, unsupported version) ends [`run`]
//! with a [`FatalError`].
//! With several control-plane replicas the agent is told every replica's address
//! (`ReplicaAddrs`) and, when its connection is lost, dials the others first ([`replicas`]);
//! its jobs keep running and their uploads resume on the new connection.

pub(crate) mod backoff;
pub(crate) mod replicas;
pub(crate) mod upload;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use cronium_protocol::hello::Hello;
use cronium_protocol::{
    Capabilities, Claim, CloseCode, FrameDecoder, Heartbeat, HostInfo, MIN_PROTOCOL_VERSION,
    Message, PROTOCOL_VERSION,
};
use quinn::{Connection, Endpoint, SendStream, VarInt};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use self::backoff::Backoff;
use crate::frame_io::{FrameIoError, read_message, write_message};
use crate::identity::Identity;
use crate::jobs::Jobs;
use crate::terminal::Terminals;
use crate::update::Updater;

/// First reconnect delay ceiling; it doubles up to `reconnect_max`.
const RECONNECT_BASE: Duration = Duration::from_millis(100);

/// How long a QUIC handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the control plane may take to answer the hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Heartbeat periods without any message from the control plane after which the connection is
/// considered dead.
const SILENT_PERIODS: u32 = 3;

/// The shortest heartbeat interval the agent accepts from a welcome.
const MIN_HEARTBEAT: Duration = Duration::from_millis(200);

/// The control plane will never accept this agent again; the agent must stop.
#[derive(Debug, Error)]
pub enum FatalError {
    /// The control plane answered the hello with a reject.
    #[error("the control plane refused this agent ({code}): {message}")]
    Rejected { code: String, message: String },
    /// The control plane closed the connection with a fatal close code.
    #[error("the control plane closed the connection ({code}): {reason}")]
    Closed { code: String, reason: String },
    /// The control plane chose a protocol version this agent does not speak.
    #[error("the control plane chose protocol version {0}, which this agent does not speak")]
    Version(u16),
}

/// Everything the connection loop needs besides the job table.
pub(crate) struct ConnOptions {
    pub(crate) identity: Identity,
    pub(crate) client_config: quinn::ClientConfig,
    pub(crate) agent_version: String,
    pub(crate) capacity: u32,
    pub(crate) capabilities: Capabilities,
    pub(crate) host: HostInfo,
    pub(crate) reconnect_max: Duration,
    /// Publishes the live connection (or `None`) to the uploaders.
    pub(crate) connection: watch::Sender<Option<Connection>>,
    /// Cancelled on graceful shutdown: the session stays up but claims nothing more.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the agent exits: the connection is closed and [`run`] returns.
    pub(crate) exit: CancellationToken,
    /// The terminal sessions, served on streams the control plane opens.
    pub(crate) terminals: Terminals,
    /// Self-update: announcements in, statuses out.
    pub(crate) updater: Updater,
}

/// How a session ended.
enum SessionEnd {
    /// The connection is gone; reconnect. `welcomed` resets the backoff.
    Lost { welcomed: bool, reason: String },
    /// Stop the agent.
    Fatal(FatalError),
    /// The agent is exiting.
    Exit,
}

/// The claim bookkeeping of one session (see `docs/protocol.md`).
struct Claims {
    /// Slots asked for by the claim in flight, if any.
    outstanding: Option<u32>,
    /// The control plane may have queued work for us.
    maybe_more: bool,
    /// A `WorkAvailable` arrived while a claim was in flight.
    woken_during_claim: bool,
}

/// Keeps the agent connected until it exits or is refused for good.
pub(crate) async fn run(options: ConnOptions, jobs: Jobs) -> Result<(), FatalError> {
    let addresses = std::sync::Mutex::new(replicas::Addresses::load(&options.identity));
    let mut session = Session {
        options,
        jobs,
        ipv4: None,
        ipv6: None,
        addresses,
    };
    let mut backoff = Backoff::new(RECONNECT_BASE, session.options.reconnect_max);
    let result = loop {
        if session.options.exit.is_cancelled() {
            break Ok(());
        }
        let end = match session.connect().await {
            Ok((connection, address)) => {
                let end = session.serve(&connection).await;
                if matches!(end, SessionEnd::Lost { .. }) {
                    session.addresses().lost(&address);
                }
                end
            }
            Err(end) => end,
        };
        session.options.connection.send_replace(None);
        match end {
            SessionEnd::Exit => break Ok(()),
            SessionEnd::Fatal(error) => break Err(error),
            SessionEnd::Lost { welcomed, reason } => {
                if welcomed {
                    backoff.reset();
                    tracing::warn!(%reason, "lost the connection to the control plane; reconnecting");
                } else {
                    tracing::warn!(%reason, "cannot connect to the control plane; retrying");
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = session.options.exit.cancelled() => break Ok(()),
        }
    };
    // Give the close frames a moment to leave.
    for endpoint in [session.ipv4.take(), session.ipv6.take()]
        .into_iter()
        .flatten()
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
    result
}

struct Session {
    options: ConnOptions,
    jobs: Jobs,
    ipv4: Option<Endpoint>,
    ipv6: Option<Endpoint>,
    /// The configured and learned control-plane addresses, in dial order.
    addresses: std::sync::Mutex<replicas::Addresses>,
}

impl Session {
    fn addresses(&self) -> std::sync::MutexGuard<'_, replicas::Addresses> {
        // Every method leaves the addresses consistent, so a poisoned lock is still usable.
        self.addresses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tries every address of every known `host:port` (learned replicas, then the configured
    /// ones), in order; returns the connection and the `host:port` it was dialled at.
    async fn connect(&mut self) -> Result<(Connection, String), SessionEnd> {
        let mut last_error = "no QUIC address configured".to_owned();
        let addresses = self.addresses().dial_order();
        for address in &addresses {
            let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(address.as_str()).await {
                Ok(resolved) => resolved.collect(),
                Err(error) => {
                    last_error = format!("cannot resolve {address}: {error}");
                    continue;
                }
            };
            for socket in resolved {
                let endpoint = match self.endpoint_for(socket) {
                    Ok(endpoint) => endpoint,
                    Err(error) => {
                        last_error = format!("cannot open a UDP socket for {socket}: {error}");
                        continue;
                    }
                };
                let connecting = match endpoint.connect_with(
                    self.options.client_config.clone(),
                    socket,
                    &self.options.identity.server_name,
                ) {
                    Ok(connecting) => connecting,
                    Err(error) => {
                        last_error = format!("cannot connect to {socket}: {error}");
                        continue;
                    }
                };
                let attempt = tokio::select! {
                    attempt = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => attempt,
                    () = self.options.exit.cancelled() => return Err(SessionEnd::Exit),
                };
                match attempt {
                    Ok(Ok(connection)) => return Ok((connection, address.clone())),
                    Ok(Err(error)) => {
                        if let Some(fatal) = fatal_close(&error) {
                            return Err(SessionEnd::Fatal(fatal));
                        }
                        last_error = format!("{socket}: {error}");
                    }
                    Err(_) => last_error = format!("{socket}: handshake timed out"),
                }
            }
        }
        Err(SessionEnd::Lost {
            welcomed: false,
            reason: last_error,
        })
    }

    fn endpoint_for(&mut self, socket: SocketAddr) -> std::io::Result<Endpoint> {
        let (slot, bind) = if socket.is_ipv4() {
            (&mut self.ipv4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        } else {
            (&mut self.ipv6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint = Endpoint::client(bind)?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Runs one session on a fresh connection.
    async fn serve(&self, connection: &Connection) -> SessionEnd {
        let (mut send, mut recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(error) => return lost(connection, false, error.to_string()),
        };
        // The hello lists the live terminal sessions, which covers every earlier report.
        self.options.terminals.clear_ended();
        let hello = Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent_version: self.options.agent_version.clone(),
            capacity: self.options.capacity,
            running: self.jobs.held(),
            capabilities: self.options.capabilities.clone(),
            host: self.options.host.clone(),
            terminals: self.options.terminals.live_sessions(),
        };
        if let Err(error) = write_message(&mut send, &Message::Hello(hello)).await {
            return lost(connection, false, error.to_string());
        }

        let mut decoder = FrameDecoder::new();
        let answer = tokio::select! {
            answer = tokio::time::timeout(WELCOME_TIMEOUT, read_message(&mut recv, &mut decoder)) => answer,
            () = self.options.exit.cancelled() => {
                close(connection, CloseCode::Normal, "agent stopping");
                return SessionEnd::Exit;
            }
        };
        let welcome = match answer {
            Err(_) => {
                close(connection, CloseCode::ProtocolError, "no welcome");
                return lost(connection, false, "no answer to the hello".into());
            }
            Ok(Err(error)) => return self.stream_failed(connection, false, error),
            Ok(Ok(None)) => {
                return lost(
                    connection,
                    false,
                    "the control stream ended before the welcome".into(),
                );
            }
            Ok(Ok(Some(Message::Welcome(welcome)))) => welcome,
            Ok(Ok(Some(Message::Reject(reject)))) => {
                return SessionEnd::Fatal(FatalError::Rejected {
                    code: format!("{:?}", reject.code),
                    message: printable(reject.message.as_bytes()),
                });
            }
            Ok(Ok(Some(other))) => {
                close(connection, CloseCode::ProtocolError, "expected a welcome");
                return lost(
                    connection,
                    false,
                    format!("unexpected {} instead of a welcome", other.name()),
                );
            }
        };
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&welcome.version) {
            close(
                connection,
                CloseCode::UnsupportedVersion,
                "unsupported version",
            );
            return SessionEnd::Fatal(FatalError::Version(welcome.version));
        }
        if welcome.agent_id != self.options.identity.agent_id {
            tracing::warn!(expected = %self.options.identity.agent_id, welcomed = %welcome.agent_id, "the control plane knows this agent under another id");
        }
        for attempt in &welcome.abandon {
            self.jobs.abandon(attempt);
        }
        self.addresses().connected();
        tracing::info!(
            agent_id = %welcome.agent_id,
            remote = %connection.remote_address(),
            held = self.jobs.held().len(),
            "connected to the control plane"
        );
        self.options
            .connection
            .send_replace(Some(connection.clone()));
        // A new binary on trial has connected: it installs itself now.
        self.options.updater.welcomed();
        let mut update_statuses = self.options.updater.statuses();
        let last_status = update_statuses.borrow_and_update().clone();
        if let Some(status) = last_status
            && let Err(error) = write_message(&mut send, &Message::UpdateStatus(status)).await
        {
            return self.stream_failed(connection, true, error);
        }

        let period =
            Duration::from_millis(u64::from(welcome.heartbeat_interval_ms)).max(MIN_HEARTBEAT);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        let mut claims = Claims {
            outstanding: None,
            maybe_more: true,
            woken_during_claim: false,
        };
        if let Err(error) = self.try_claim(&mut send, &mut claims).await {
            return self.stream_failed(connection, true, error);
        }
        let mut draining_logged = false;
        // Every heartbeat is answered; silence for several periods means the control plane is
        // gone (e.g. killed without closing), long before QUIC's idle timeout would say so.
        let mut last_heard = Instant::now();

        loop {
            tokio::select! {
                message = read_message(&mut recv, &mut decoder) => {
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => return lost(connection, true, "the control plane ended the control stream".into()),
                        Err(error) => return self.stream_failed(connection, true, error),
                    };
                    last_heard = Instant::now();
                    if let Err(error) = self.handle(message, &mut send, &mut claims).await {
                        return self.stream_failed(connection, true, error);
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > period * SILENT_PERIODS {
                        let reason = format!("no answer from the control plane for {:?}", last_heard.elapsed());
                        close(connection, CloseCode::Normal, "no heartbeat answer");
                        return lost(connection, true, reason);
                    }
                    sequence += 1;
                    let beat = Heartbeat { seq: sequence, running: self.jobs.held() };
                    if let Err(error) = write_message(&mut send, &Message::Heartbeat(beat)).await {
                        return self.stream_failed(connection, true, error);
                    }
                }
                () = self.jobs.slot_freed() => {
                    if let Err(error) = self.try_claim(&mut send, &mut claims).await {
                        return self.stream_failed(connection, true, error);
                    }
                }
                () = self.options.shutdown.cancelled(), if !draining_logged => {
                    draining_logged = true;
                    tracing::info!("shutting down: claiming no new jobs");
                }
                () = self.options.exit.cancelled() => {
                    close(connection, CloseCode::Normal, "agent stopping");
                    return SessionEnd::Exit;
                }
                accepted = connection.accept_bi() => match accepted {
                    // Only terminal streams are opened by the control plane.
                    Ok((send, recv)) => self.options.terminals.serve_stream(send, recv),
                    Err(error) => return lost(connection, true, error.to_string()),
                },
                Ok(()) = update_statuses.changed() => {
                    let status = update_statuses.borrow_and_update().clone();
                    if let Some(status) = status
                        && let Err(error) = write_message(&mut send, &Message::UpdateStatus(status)).await
                    {
                        return self.stream_failed(connection, true, error);
                    }
                }
                ended = self.options.terminals.next_ended() => {
                    if let Err(error) = write_message(&mut send, &Message::TerminalEnded(ended)).await {
                        return self.stream_failed(connection, true, error);
                    }
                }
                error = connection.closed() => {
                    if let Some(fatal) = fatal_close(&error) {
                        return SessionEnd::Fatal(fatal);
                    }
                    return SessionEnd::Lost { welcomed: true, reason: error.to_string() };
                }
            }
        }
    }

    /// Handles one message of the control stream after the welcome.
    async fn handle(
        &self,
        message: Message,
        send: &mut SendStream,
        claims: &mut Claims,
    ) -> Result<(), SessionError> {
        match message {
            Message::WorkAvailable => {
                claims.maybe_more = true;
                if claims.outstanding.is_some() {
                    claims.woken_during_claim = true;
                }
                self.try_claim(send, claims).await?;
            }
            Message::Assign(spec) => self.jobs.start(spec),
            Message::ClaimDone(done) => {
                let Some(requested) = claims.outstanding.take() else {
                    return Err(SessionError::Protocol("claim_done without a claim"));
                };
                claims.maybe_more = done.claimed >= requested || claims.woken_during_claim;
                claims.woken_during_claim = false;
                self.try_claim(send, claims).await?;
            }
            Message::Cancel(cancel) => self.jobs.cancel(&cancel.job),
            Message::HeartbeatAck(ack) => {
                for attempt in &ack.abandon {
                    self.jobs.abandon(attempt);
                }
            }
            Message::AgentUpdate(update) => self.options.updater.announce(update.version),
            Message::ReplicaAddrs(replicas) => self.learn_replicas(&replicas.quic_addrs),
            other => return Err(SessionError::Protocol(other.name())),
        }
        Ok(())
    }

    /// Keeps the replica addresses the control plane told (bounded and validated: network
    /// input), stored in the state dir when they changed.
    fn learn_replicas(&self, offered: &[String]) {
        let mut addresses = self.addresses();
        match addresses.learn(offered) {
            Ok(dropped) => {
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        "ignored invalid or repeated replica addresses from the control plane"
                    );
                }
                tracing::debug!(replicas = ?addresses.learned(), "control-plane replicas");
            }
            Err(error) => {
                tracing::warn!(%error, "could not store the control-plane replicas' addresses")
            }
        }
    }

    /// Sends a claim when slots are free, work may be waiting, none is in flight and the agent is
    /// not shutting down.
    async fn try_claim(
        &self,
        send: &mut SendStream,
        claims: &mut Claims,
    ) -> Result<(), SessionError> {
        if self.options.shutdown.is_cancelled()
            || claims.outstanding.is_some()
            || !claims.maybe_more
        {
            return Ok(());
        }
        let slots = self.jobs.slots_to_claim();
        if slots == 0 {
            return Ok(());
        }
        write_message(send, &Message::Claim(Claim { slots })).await?;
        claims.outstanding = Some(slots);
        claims.woken_during_claim = false;
        Ok(())
    }

    /// Turns a control stream failure into the end of the session, closing the connection with
    /// `ProtocolError` when the peer broke the protocol.
    fn stream_failed(
        &self,
        connection: &Connection,
        welcomed: bool,
        error: impl Into<SessionError>,
    ) -> SessionEnd {
        let error = error.into();
        if matches!(
            error,
            SessionError::Protocol(_) | SessionError::Frame(FrameIoError::Frame(_))
        ) {
            close(connection, CloseCode::ProtocolError, "protocol error");
        }
        lost(connection, welcomed, error.to_string())
    }
}

/// Why the control stream failed.
#[derive(Debug, Error)]
enum SessionError {
    #[error(transparent)]
    Frame(#[from] FrameIoError),
    #[error("unexpected {0} message on the control stream")]
    Protocol(&'static str),
}

/// The session ended because of `reason`, unless the connection carries a fatal close code.
fn lost(connection: &Connection, welcomed: bool, reason: String) -> SessionEnd {
    if let Some(error) = connection.close_reason()
        && let Some(fatal) = fatal_close(&error)
    {
        return SessionEnd::Fatal(fatal);
    }
    SessionEnd::Lost { welcomed, reason }
}

/// A fatal application close from the control plane, if `error` is one.
fn fatal_close(error: &quinn::ConnectionError) -> Option<FatalError> {
    let quinn::ConnectionError::ApplicationClosed(close) = error else {
        return None;
    };
    let code = CloseCode::from_u32(close.error_code.into_inner())?;
    code.is_fatal().then(|| FatalError::Closed {
        code: format!("{code:?}"),
        reason: printable(&close.reason),
    })
}

fn close(connection: &Connection, code: CloseCode, reason: &str) {
    connection.close(VarInt::from_u32(code.to_u32()), reason.as_bytes());
}

/// Text from the network, made safe to log: lossy UTF-8, no control characters, bounded length.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|character| !character.is_control())
        .take(200)
        .collect()
}
