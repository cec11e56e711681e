//! A LIGHT simulated agent: the real protocol without the agent's runner, for holding more
//! connections in one process than the full agent code fits (the benchmark's 10,000-agent
//! memory figure).
//!
//! Each light agent uses an enrolled identity and the agent's own QUIC client configuration
//! (`Identity::quic_client_config`: TLS 1.3, its client certificate, ALPN, keep-alives, idle
//! timeout), opens the control stream, says `Hello` (capacity 1, nothing running), waits for the
//! `Welcome` and then sends a `Heartbeat` every interval the welcome names, reading every message
//! the control plane sends (`HeartbeatAck` and anything else is read and dropped). It claims
//! nothing, runs nothing, has no spool and does not reconnect: a lost connection ends it and is
//! counted. All of them share one UDP socket (one quinn endpoint), unlike real agents.
//!
//! They can also be pointed at the benchmark's bare quinn peer ([`LightServer::Echo`]: same TLS
//! and transport configuration, a server that echoes every stream), which sends the hello back
//! instead of a welcome; the heartbeat interval is then the caller's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_agent::frame_io::{read_message, write_message};
use cronium_protocol::hello::Hello;
use cronium_protocol::{
    Capabilities, FrameDecoder, Heartbeat, HostInfo, MIN_PROTOCOL_VERSION, Message,
    PROTOCOL_VERSION,
};
use futures_util::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long one light agent may take from the handshake to the welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(60);

/// What the light agents are connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LightServer {
    /// A control plane: it answers the hello with a welcome that names the heartbeat interval.
    Cronium,
    /// A bare echo server: the hello comes back as sent; heartbeats every `heartbeat`.
    Echo { heartbeat: Duration },
}

/// Light agents connected over one endpoint; dropping it closes them.
pub struct LightFleet {
    endpoint: quinn::Endpoint,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    /// Light agents that were welcomed.
    pub welcomed: usize,
    /// Light agents whose connection ended before they were stopped.
    lost: Arc<AtomicUsize>,
}

impl LightFleet {
    /// Connects one light agent per state dir to `server`, `parallel` handshakes at a time, and
    /// returns once every one was welcomed (or fails with the first error).
    pub async fn connect(
        state_dirs: Vec<PathBuf>,
        server: SocketAddr,
        parallel: usize,
    ) -> Result<LightFleet> {
        LightFleet::connect_to(state_dirs, server, parallel, LightServer::Cronium).await
    }

    /// [`LightFleet::connect`] to a server of the kind `kind`.
    pub async fn connect_to(
        state_dirs: Vec<PathBuf>,
        server: SocketAddr,
        parallel: usize,
        kind: LightServer,
    ) -> Result<LightFleet> {
        crate::init_crypto();
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("bind the light agents' UDP socket")?;
        let stop = CancellationToken::new();
        let lost = Arc::new(AtomicUsize::new(0));
        let mut fleet = LightFleet {
            endpoint: endpoint.clone(),
            stop: stop.clone(),
            tasks: JoinSet::new(),
            welcomed: 0,
            lost: lost.clone(),
        };
        let mut handshakes = futures_util::stream::iter(state_dirs)
            .map(|state_dir| {
                let endpoint = endpoint.clone();
                async move {
                    let identity = cronium_agent::identity::Identity::load(&state_dir)
                        .with_context(|| format!("load {}", state_dir.display()))?;
                    let config = identity.quic_client_config()?;
                    let connection = endpoint
                        .connect_with(config, server, &identity.server_name)?
                        .await
                        .context("QUIC handshake")?;
                    let (mut send, mut recv) = connection.open_bi().await?;
                    let hello = Hello {
                        min_version: MIN_PROTOCOL_VERSION,
                        max_version: PROTOCOL_VERSION,
                        agent_version: "light".into(),
                        capacity: 1,
                        running: Vec::new(),
                        capabilities: Capabilities::default(),
                        host: HostInfo {
                            hostname: identity.name.clone(),
                            os: std::env::consts::OS.into(),
                            arch: std::env::consts::ARCH.into(),
                        },
                        terminals: Vec::new(),
                    };
                    write_message(&mut send, &Message::Hello(hello)).await?;
                    let mut decoder = FrameDecoder::new();
                    let welcome = tokio::time::timeout(
                        WELCOME_TIMEOUT,
                        read_message(&mut recv, &mut decoder),
                    )
                    .await
                    .context("no welcome in time")??;
                    let interval = match (kind, welcome) {
                        (LightServer::Cronium, Some(Message::Welcome(welcome))) => {
                            Duration::from_millis(welcome.heartbeat_interval_ms.into())
                        }
                        (LightServer::Echo { heartbeat }, Some(Message::Hello(_))) => heartbeat,
                        (LightServer::Cronium, other) => {
                            bail!("expected a welcome, got {other:?}")
                        }
                        (LightServer::Echo { .. }, other) => {
                            bail!("expected the hello echoed, got {other:?}")
                        }
                    };
                    anyhow::Ok((connection, send, recv, decoder, interval))
                }
            })
            .buffer_unordered(parallel.max(1));
        while let Some(connected) = handshakes.next().await {
            let (connection, mut send, mut recv, mut decoder, interval) = connected?;
            fleet.welcomed += 1;
            let stop = stop.clone();
            let lost = lost.clone();
            fleet.tasks.spawn(async move {
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                let mut seq = 0;
                let ended = loop {
                    tokio::select! {
                        () = stop.cancelled() => break false,
                        _ = ticker.tick() => {
                            seq += 1;
                            let beat = Heartbeat { seq, running: Vec::new() };
                            if write_message(&mut send, &Message::Heartbeat(beat)).await.is_err() {
                                break true;
                            }
                        }
                        message = read_message(&mut recv, &mut decoder) => match message {
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => break true,
                        },
                    }
                };
                if ended {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
                connection.close(0u32.into(), b"light agent done");
            });
        }
        Ok(fleet)
    }

    /// Light agents whose connection ended while they should be running.
    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::Relaxed)
    }

    /// Closes every connection and waits (at most 10 s) for the endpoint to be idle.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(10), self.endpoint.wait_idle()).await;
    }
}

impl Drop for LightFleet {
    fn drop(&mut self) {
        self.stop.cancel();
        self.endpoint.close(0u32.into(), b"light fleet dropped");
    }
}
