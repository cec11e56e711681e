//! The memory phase (`--memory-peer-only`, issue 8): the control plane's memory per agent
//! connection next to a bare quinn server's, measured in the same run.
//!
//! The peer is this benchmark's own binary in a hidden mode (`--quinn-peer-serve DIR`, see
//! [`serve`]), spawned as a child so its RSS is its own: a quinn endpoint on 127.0.0.1 with the
//! control plane's TLS and transport shape (`control-plane/src/agents/mod.rs`: rustls TLS 1.3,
//! client certificates required and verified against a CA, ALPN `cronium/1`, a server
//! certificate of ECDSA P-256 for the agents' server name with the CA in its chain, idle timeout
//! 20 s, keep-alive 5 s, 16 bidirectional and no unidirectional streams, lowered to 10 — what
//! the control plane allows an agent of capacity 1 — once the first stream is open), on a
//! multi-threaded tokio runtime like `cronium serve`. It has no database, no protocol and no
//! state beyond quinn's: every stream it accepts is echoed back as it arrives.
//!
//! `--memory-peer-agents` LIGHT simulated agents (`cronium_e2e::light`; default 500 and 10,000)
//! are enrolled once through a control plane (`cronium serve` on SQLite, a data dir of its own).
//! For each count, a fresh `cronium serve` on that data dir, then a fresh peer, get that many of
//! them connected, and the RSS of each is read before and with all connected, two heartbeat
//! periods later ([`crate::load::light_memory`], as the load phase reads it). The peer sees the
//! same client certificates and keys: each identity is copied with only its trusted CA (the
//! peer's; the peer trusts the control plane's CA for the client certificates) and address
//! changed; against the peer a light agent gets its hello echoed instead of a welcome and sends
//! its heartbeats every 5 s, the control plane's default interval. Printed: KiB per connection
//! for both and the ratio Cronium / peer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use cronium_agent::identity::{CA_FILE, CERT_FILE, Identity, IdentityFiles, KEY_FILE};
use cronium_e2e::light::LightServer;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cluster::{ControlPlane, Listen, enrollment_token};
use crate::load::{LightFigures, agents_connected, light_memory};
use crate::procs::{Binaries, ChildGuard};

/// Names of the phase's light agents.
const PREFIX: &str = "mem-";
/// The peer's files in its dir: the CA the light agents' copies trust, the server chain and key,
/// and the CA that verifies client certificates (the control plane's).
const PEER_CA: &str = "peer-ca.pem";
const SERVER_CHAIN: &str = "server-chain.pem";
const SERVER_KEY: &str = "server-key.pem";
const CLIENT_CA: &str = "client-ca.pem";
/// The ready line the peer prints, followed by its address.
const READY: &str = "quinn-peer ready ";
/// How long the peer may take to print it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The control plane's transport settings (`control-plane/src/agents/mod.rs`, `session.rs`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const INITIAL_STREAMS: u32 = 16;
/// What the control plane allows an agent of capacity 1 after its hello (two per job slot + 8
/// spares).
const STREAMS_AFTER_FIRST: u32 = 10;
/// The light agents' heartbeat interval against the peer: `cronium serve`'s default.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// One count of light agents on both servers.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    pub cronium: LightFigures,
    pub peer: LightFigures,
}

impl Comparison {
    /// Cronium's KiB per connection over the peer's.
    pub fn ratio(&self) -> f64 {
        self.cronium.per_connection_kib() / self.peer.per_connection_kib()
    }
}

/// The phase's figures.
#[derive(Debug, Clone)]
pub struct MemoryFigures {
    pub comparisons: Vec<Comparison>,
}

impl MemoryFigures {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### Memory per agent connection: Cronium vs a bare quinn server\n\n\
             LIGHT simulated agents (real QUIC + mTLS + hello + heartbeats, no runner, one UDP \
             socket), the same certificates on both sides; each count on a fresh `cronium serve` \
             (SQLite) and a fresh bare quinn echo server with the same TLS and transport \
             settings; RSS before → with all connected (10 s later); {} CPUs.\n\n",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        out += "| light agents | Cronium KiB per connection (RSS KiB) | bare quinn KiB per connection (RSS KiB) | ratio Cronium / quinn |\n|---:|---:|---:|---:|\n";
        for comparison in &self.comparisons {
            let (cronium, peer) = (&comparison.cronium, &comparison.peer);
            out += &format!(
                "| {} | {:.1} ({} → {}) | {:.1} ({} → {}) | **{:.2}×** |\n",
                cronium.agents,
                cronium.per_connection_kib(),
                cronium.before_kib,
                cronium.connected_kib,
                peer.per_connection_kib(),
                peer.before_kib,
                peer.connected_kib,
                comparison.ratio()
            );
        }
        out
    }

    pub fn json(&self) -> Value {
        let light = |figures: &LightFigures| {
            json!({
                "agents": figures.agents,
                "before_kib": figures.before_kib,
                "connected_kib": figures.connected_kib,
                "per_connection_kib": figures.per_connection_kib(),
                "connect_seconds": figures.connect.as_secs_f64(),
                "lost": figures.lost,
            })
        };
        json!({
            "kind": "LIGHT simulated agents: real QUIC + mTLS + hello + heartbeats, no runner, one shared UDP socket",
            "comparisons": self.comparisons.iter().map(|comparison| json!({
                "cronium": light(&comparison.cronium),
                "quinn_peer": light(&comparison.peer),
                "ratio": comparison.ratio(),
            })).collect::<Vec<_>>(),
        })
    }
}

fn progress(message: &str) {
    eprintln!("[cronium-bench] memory: {message}");
}

/// Runs the phase: the control plane's data dir under `root`, the light agents' identities under
/// `identities` (a tmpfs, when there is one: 10,000 identities are 40,000 small files written
/// with fsync).
pub async fn measure(
    binaries: &Binaries,
    root: &Path,
    identities: &Path,
    counts: &[usize],
) -> anyhow::Result<MemoryFigures> {
    let most = counts
        .iter()
        .copied()
        .max()
        .context("no counts of agents")?;
    let data_dir = root.join("control-plane");
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let (control_plane, _) =
        ControlPlane::start_at(binaries, &data_dir, &Listen::any(), &key, None).await?;
    let token = control_plane.api.token().to_owned();
    progress(&format!("enrolling {most} light agents"));
    let started = Instant::now();
    let enrollment = enrollment_token(&control_plane.api, most).await?;
    let enrolled = cronium_e2e::fleet::enroll(
        control_plane.api.base(),
        &enrollment.token,
        &enrollment.ca_sha256,
        &identities.join("cronium"),
        PREFIX,
        most,
        &BTreeMap::new(),
    )
    .await?;
    progress(&format!(
        "enrolled in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    // Every measurement starts on a fresh process: one that has held connections before keeps
    // freed memory the next ones would reuse.
    drop(control_plane);
    let state_dirs: Vec<PathBuf> = enrolled
        .into_iter()
        .map(|identity| identity.state_dir)
        .collect();

    let first = Identity::load(&state_dirs[0])?;
    let peer_dir = root.join("quinn-peer");
    let peer_ca = PeerPki::write(
        &peer_dir,
        &first.server_name,
        &std::fs::read_to_string(state_dirs[0].join(CA_FILE))?,
    )?;

    let mut comparisons = Vec::new();
    for &count in counts {
        let dirs = state_dirs[..count].to_vec();
        let (control_plane, _) =
            ControlPlane::start_at(binaries, &data_dir, &Listen::any(), &key, Some(&token)).await?;
        let server: SocketAddr = control_plane
            .quic
            .parse()
            .with_context(|| format!("the QUIC address {}", control_plane.quic))?;
        progress(&format!("Cronium, pid {}", control_plane.pid()));
        let (cronium, light) =
            light_memory(control_plane.pid(), dirs, server, LightServer::Cronium).await?;
        let counted = agents_connected(&control_plane.api).await?;
        light.stop().await;
        drop(control_plane);
        if counted != count || cronium.lost > 0 {
            bail!(
                "Cronium counts {counted} connected agents of {count} ({} lost)",
                cronium.lost
            );
        }
        progress(&format!(
            "Cronium: {count} light agents welcomed in {:.1} s; RSS {} → {} KiB: {:.1} KiB per connection",
            cronium.connect.as_secs_f64(),
            cronium.before_kib,
            cronium.connected_kib,
            cronium.per_connection_kib()
        ));

        let mut peer = PeerProcess::start(&peer_dir).await?;
        progress(&format!(
            "bare quinn peer at {}, pid {}",
            peer.addr,
            peer.process.pid()
        ));
        let copies = copy_identities(
            &state_dirs[..count],
            &identities.join("peer"),
            peer.addr,
            &peer_ca,
        )?;
        let (quinn, light) = light_memory(
            peer.process.pid(),
            copies,
            peer.addr,
            LightServer::Echo {
                heartbeat: HEARTBEAT,
            },
        )
        .await?;
        peer.process.ensure_running()?;
        light.stop().await;
        drop(peer);
        if quinn.lost > 0 {
            bail!(
                "{} light agents lost their connection to the peer",
                quinn.lost
            );
        }
        let comparison = Comparison {
            cronium,
            peer: quinn,
        };
        progress(&format!(
            "bare quinn: {count} light agents connected in {:.1} s; RSS {} → {} KiB: {:.1} KiB per connection; Cronium / quinn {:.2}×",
            quinn.connect.as_secs_f64(),
            quinn.before_kib,
            quinn.connected_kib,
            quinn.per_connection_kib(),
            comparison.ratio()
        ));
        comparisons.push(comparison);
    }
    Ok(MemoryFigures { comparisons })
}

/// The peer's CA certificate (PEM) and its SHA-256, which the identity copies pin.
struct PeerCa {
    pem: String,
    sha256: String,
}

/// The peer's certificates, made like the control plane's (`control-plane/src/agents/ca.rs`).
struct PeerPki;

impl PeerPki {
    /// Writes into `dir` a new CA, a server certificate it issued for `server_name` and its key,
    /// and `client_ca_pem`, the CA that issued the agents' client certificates.
    fn write(dir: &Path, server_name: &str, client_ca_pem: &str) -> anyhow::Result<PeerCa> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ca_key = KeyPair::generate().context("generating the peer's CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "cronium-bench quinn peer CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let server_key = KeyPair::generate().context("generating the peer's server key")?;
        let mut params = CertificateParams::new(vec![server_name.to_owned()])?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &issuer)?;
        for (file, text) in [
            (PEER_CA, ca_pem.clone()),
            (SERVER_CHAIN, format!("{}{ca_pem}", server_cert.pem())),
            (SERVER_KEY, server_key.serialize_pem()),
            (CLIENT_CA, client_ca_pem.to_owned()),
        ] {
            std::fs::write(dir.join(file), text)
                .with_context(|| format!("cannot write {file} in {}", dir.display()))?;
        }
        let sha256 = cronium_agent::identity::ca_fingerprint(&ca_pem)
            .map_err(|error| anyhow::anyhow!("the peer's CA: {error}"))?;
        Ok(PeerCa {
            pem: ca_pem,
            sha256,
        })
    }
}

/// Copies each identity in `state_dirs` under `root` (same name) with the same key and client
/// certificate, trusting the peer's CA and naming `addr`; returns the copies' state dirs.
fn copy_identities(
    state_dirs: &[PathBuf],
    root: &Path,
    addr: SocketAddr,
    ca: &PeerCa,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut copies = Vec::with_capacity(state_dirs.len());
    for state_dir in state_dirs {
        let identity = Identity::load(state_dir)?;
        let name = state_dir
            .file_name()
            .with_context(|| format!("{} has no name", state_dir.display()))?;
        let copy = Identity {
            quic_addrs: vec![addr.to_string()],
            ca_sha256: ca.sha256.clone(),
            state_dir: root.join(name),
            ..identity
        };
        let read = |file: &str| {
            std::fs::read_to_string(state_dir.join(file))
                .with_context(|| format!("cannot read {file} in {}", state_dir.display()))
        };
        copy.save(&IdentityFiles {
            key_pem: read(KEY_FILE)?,
            cert_pem: read(CERT_FILE)?,
            ca_pem: ca.pem.clone(),
        })?;
        copies.push(copy.state_dir);
    }
    Ok(copies)
}

/// The peer as a child process of the benchmark, stopped when dropped.
struct PeerProcess {
    process: ChildGuard,
    addr: SocketAddr,
}

impl PeerProcess {
    /// Starts `cronium-bench --quinn-peer-serve DIR` and waits for its ready line.
    async fn start(dir: &Path) -> anyhow::Result<PeerProcess> {
        let me = std::env::current_exe().context("cannot find the benchmark's own executable")?;
        let (sender, mut lines) = mpsc::unbounded_channel();
        let mut command = Command::new(me);
        command.arg("--quinn-peer-serve").arg(dir);
        let mut process = ChildGuard::spawn("the bare quinn peer", &mut command, Some(sender))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(addr) = line.strip_prefix(READY) {
                        break addr
                            .trim()
                            .parse()
                            .with_context(|| format!("the peer's ready line {line:?}"))?;
                    }
                }
                Ok(None) => {
                    process.ensure_running()?;
                    bail!("the peer closed its output:\n{}", process.tail());
                }
                Err(_) => bail!(
                    "the peer was not ready within {READY_TIMEOUT:?}:\n{}",
                    process.tail()
                ),
            }
        };
        Ok(PeerProcess { process, addr })
    }
}

/// The peer's own process (`--quinn-peer-serve DIR`): serves until it is signalled, or its
/// parent, the benchmark, is gone.
pub async fn serve(dir: &Path) -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets this process's own parent-death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    let read = |file: &str| {
        std::fs::read(dir.join(file))
            .with_context(|| format!("cannot read {file} in {}", dir.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&read(CLIENT_CA)?) {
        roots.add(certificate.context("the client CA")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .context("client verifier")?;
    let chain = CertificateDer::pem_slice_iter(&read(SERVER_CHAIN)?)
        .collect::<Result<Vec<_>, _>>()
        .context("the server chain")?;
    let key = PrivateKeyDer::from_pem_slice(&read(SERVER_KEY)?).context("the server key")?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("server certificate")?;
    tls.alpn_protocols = vec![cronium_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?));
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_concurrent_bidi_streams(INITIAL_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("binding the peer's endpoint")?;
    println!("{READY}{}", endpoint.local_addr()?);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    connections.spawn(echo_connection(incoming));
                }
                None => break,
            },
            Some(_) = connections.join_next() => {}
        }
    }
    Ok(())
}

/// Echoes every stream of one connection until it ends.
async fn echo_connection(incoming: quinn::Incoming) {
    let Ok(connection) = incoming.await else {
        return;
    };
    let mut streams = JoinSet::new();
    let mut first = true;
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => {
                let Ok((send, recv)) = accepted else { break };
                if first {
                    connection.set_max_concurrent_bi_streams(STREAMS_AFTER_FIRST.into());
                    first = false;
                }
                streams.spawn(echo(send, recv));
            }
            Some(_) = streams.join_next() => {}
        }
    }
}

/// Writes back every chunk read from `recv`, as it arrives.
async fn echo(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
        if send.write_chunk(chunk.bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
