//! One connected agent: authenticate its certificate, handle the hello, then serve the control
//! stream (heartbeats, claims, wake-ups, cancellations, ended terminal sessions) and accept its
//! job streams. Terminal sessions the hello does not list any more are marked closed.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cronium_protocol::hello::Hello;
use cronium_protocol::{
    AttemptRef, ClaimDone, CloseCode, DockerSpec, FrameDecoder, HeartbeatAck, JobSpec,
    MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, REPLICA_ADDRS_VERSION, Reject, RejectCode,
    ReplicaAddrs, RuntimeSpec, ScriptKind, Welcome, negotiate,
};
use rustls_pki_types::CertificateDer;
use tracing::{Instrument, debug, info, info_span, warn};

use super::job_stream;
use super::registry::Outbound;
use super::wire::{read_message, write_message};
use crate::AppState;
use crate::crypto::sha256_hex;
use crate::store::jobs::{Attempt, ClaimedJob};
use crate::store::now_ms;

/// How long a new connection may take to finish the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Heartbeat intervals without a message after which an agent's connection is closed.
const SILENT_HEARTBEATS: u32 = 3;

/// The largest capacity an agent is granted streams for.
const MAX_CAPACITY: u32 = 1024;

/// Streams granted beyond an agent's capacity.
const STREAM_SPARES: u32 = 8;

/// Most jobs handed out by one claim.
const MAX_CLAIM: u32 = 256;

/// Serves one incoming connection until it closes.
pub async fn handle_incoming(incoming: quinn::Incoming, state: AppState) {
    let remote = incoming.remote_address();
    let connection = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            debug!(%remote, %error, "handshake failed");
            return;
        }
        Err(_) => {
            debug!(%remote, "handshake timed out");
            return;
        }
    };
    if let Err(error) = serve_connection(connection.clone(), state).await {
        warn!(%remote, error = %format!("{error:#}"), "agent session ended with an error");
        connection.close(CloseCode::ProtocolError.to_u32().into(), b"protocol error");
    }
}

fn to_attempt(attempt: &AttemptRef) -> Attempt {
    Attempt {
        job_id: attempt.job_id.clone(),
        attempt: attempt.attempt,
    }
}

fn to_ref(attempt: &Attempt) -> AttemptRef {
    AttemptRef {
        job_id: attempt.job_id.clone(),
        attempt: attempt.attempt,
    }
}

fn job_spec(job: ClaimedJob, key: &crate::crypto::EncryptionKey) -> anyhow::Result<JobSpec> {
    let kind = match job.kind.as_str() {
        "bash" => ScriptKind::Bash,
        "python" => ScriptKind::Python,
        "nodejs" => ScriptKind::Node,
        "http_request" => ScriptKind::Http,
        other => bail!("job {} has kind {other:?}, which agents do not run", job.id),
    };
    let runtime = runtime_spec(job.runtime_spec.as_deref())
        .with_context(|| format!("job {} has an unreadable runtime_spec", job.id))?;
    let secret_env = crate::http::events::open_secret_env(key, &job.secret_env)
        .with_context(|| format!("job {}", job.id))?;
    Ok(JobSpec {
        job_id: job.id,
        attempt: job.attempt,
        run_id: job.run_id,
        event_id: job.event_id,
        kind,
        script: job.script,
        env: job.env.into_iter().collect(),
        timeout_ms: job.timeout_seconds as u64 * 1000,
        input: job.input,
        runtime,
        secret_env: cronium_protocol::SecretEnv(secret_env),
    })
}

/// A job row's `runtime_spec`: JSON of the wire's [`RuntimeSpec`]; in rows written before host
/// jobs had settings, NULL (a host job as the agent's user, without limits) or the bare JSON of a
/// `DockerSpec`.
pub(crate) fn runtime_spec(text: Option<&str>) -> serde_json::Result<RuntimeSpec> {
    let Some(text) = text else {
        return Ok(RuntimeSpec::default());
    };
    serde_json::from_str::<RuntimeSpec>(text).or_else(|error| {
        serde_json::from_str::<DockerSpec>(text)
            .map(RuntimeSpec::Docker)
            .map_err(|_| error)
    })
}

async fn serve_connection(connection: quinn::Connection, state: AppState) -> anyhow::Result<()> {
    // The handshake has completed: the connection's time (`connected_at`), taken before the
    // hello's database writes so that a burst of them committed together keeps its spread.
    let established_at = now_ms();
    let certificate = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned())
        .ok_or_else(|| anyhow!("connection without a client certificate"))?;
    let fingerprint = sha256_hex(&certificate);
    let Some(agent) = state.store.agent_by_certificate(&fingerprint).await? else {
        connection.close(
            CloseCode::UnknownAgent.to_u32().into(),
            b"unknown agent certificate",
        );
        return Ok(());
    };
    if agent.revoked_at.is_some() {
        connection.close(CloseCode::Revoked.to_u32().into(), b"agent revoked");
        return Ok(());
    }
    let span = info_span!("agent", id = %agent.id, name = %agent.name);
    async move {
        let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
            .await
            .context("no control stream in time")?
            .context("accepting the control stream")?;
        let mut decoder = FrameDecoder::new();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_message(&mut recv, &mut decoder)).await {
            Ok(Ok(Some(Message::Hello(hello)))) => hello,
            Ok(Ok(Some(other))) => bail!("expected hello, got {}", other.name()),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => bail!("no hello in time"),
        };
        let version = match negotiate(hello.min_version, hello.max_version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION) {
            Ok(version) => version,
            Err(error) => {
                let reject = Reject { code: RejectCode::UnsupportedVersion, message: error.to_string() };
                write_message(&mut send, &Message::Reject(reject)).await?;
                let _ = send.finish();
                connection.close(CloseCode::UnsupportedVersion.to_u32().into(), b"unsupported protocol version");
                return Ok(());
            }
        };
        let abandon = settle_hello(&state, &agent.id, &hello).await?;
        // Two streams per job the agent may run at once (a running job's upload and one of a
        // finished job whose result awaits its acknowledgment: agents hold at most as many of
        // those as they run), plus the control stream and spares for reconnecting uploads.
        connection.set_max_concurrent_bi_streams((hello.capacity.clamp(1, MAX_CAPACITY) * 2 + STREAM_SPARES).into());
        let mut registration = state.registry.register(&agent.id, connection.clone(), established_at);
        crate::replicas::presence::connected(&state, &agent.id, established_at).await;
        state.changes.notify(crate::changes::Kind::Agent, &agent.id, crate::changes::Audience::Everyone);
        info!(version = %hello.agent_version, running = hello.running.len(), "agent connected");
        let welcome = Welcome {
            version,
            agent_id: agent.id.clone(),
            heartbeat_interval_ms: state.config.heartbeat.as_millis() as u32,
            lease_ms: state.config.lease.as_millis() as u32,
            abandon: abandon.abandoned,
        };
        write_message(&mut send, &Message::Welcome(welcome)).await?;
        for attempt in abandon.cancel {
            write_message(&mut send, &Message::Cancel(cronium_protocol::Cancel { job: attempt })).await?;
        }
        // The version this agent should run (the agent checks and refuses what it must).
        let agent_now = state.store.agent(&agent.id).await.unwrap_or_else(|_| agent.clone());
        // Read after the registration: a revocation committed since the check above either shows
        // here or its `Signal::Disconnect` finds this connection registered.
        let revoked_meanwhile = agent_now.revoked_at.is_some();
        let announcement = super::update::announcement_for(&state, &agent_now).await?;
        if announcement.version.is_some() {
            write_message(&mut send, &Message::AgentUpdate(announcement)).await?;
        }
        // The replicas it may fail over to (PostgreSQL; agents of protocol version 2 and later),
        // now and whenever they change.
        let tells_replicas = version >= REPLICA_ADDRS_VERSION;
        let mut replica_addrs = state.replicas.agent_addrs();
        if tells_replicas {
            send_replica_addrs(&mut send, &mut replica_addrs).await?;
        }

        let fresh = job_stream::FreshAttempts::default();
        let streams = {
            let connection = connection.clone();
            let state = state.clone();
            let agent_id = agent.id.clone();
            let fresh = fresh.clone();
            state.tasks.clone().spawn(
                async move {
                    while let Ok((send, recv)) = connection.accept_bi().await {
                        let state = state.clone();
                        let agent_id = agent_id.clone();
                        state.tasks.clone().spawn(job_stream::serve(send, recv, agent_id, state, fresh.clone()).in_current_span());
                    }
                }
                .in_current_span(),
            )
        };

        // An agent that stops talking (killed, partitioned) is cut off after a few missed
        // heartbeats, so it shows as offline long before QUIC's idle timeout.
        let silence_limit = state.config.heartbeat * SILENT_HEARTBEATS;
        let mut last_heard = tokio::time::Instant::now();
        let mut watchdog = tokio::time::interval(state.config.heartbeat);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = async {
            if revoked_meanwhile {
                info!("revoked while connecting; closing the connection");
                connection.close(CloseCode::Revoked.to_u32().into(), b"agent revoked");
                return Ok(());
            }
            loop {
                tokio::select! {
                    message = read_message(&mut recv, &mut decoder) => {
                        let message = match message {
                            Ok(Some(message)) => message,
                            Ok(None) => return Ok(()),
                            Err(error) => match error.connection_lost() {
                                Some(reason) => {
                                    info!(%reason, "connection closed");
                                    return Ok(());
                                }
                                None => return Err(error.into()),
                            },
                        };
                        last_heard = tokio::time::Instant::now();
                        handle_control_message(&state, &agent.id, &mut send, &fresh, message).await?;
                    }
                    _ = watchdog.tick() => {
                        if last_heard.elapsed() > silence_limit {
                            info!(silent_for = ?last_heard.elapsed(), "no heartbeat; closing the connection");
                            connection.close(CloseCode::Normal.to_u32().into(), b"no heartbeat");
                            return Ok(());
                        }
                    }
                    Ok(()) = replica_addrs.changed(), if tells_replicas => {
                        send_replica_addrs(&mut send, &mut replica_addrs).await?;
                    }
                    _ = registration.wake.notified() => {
                        write_message(&mut send, &Message::WorkAvailable).await?;
                    }
                    Some(outbound) = registration.outbound.recv() => match outbound {
                        Outbound::Cancel(job) => write_message(&mut send, &Message::Cancel(cronium_protocol::Cancel { job })).await?,
                        Outbound::AgentUpdate(version) => write_message(&mut send, &Message::AgentUpdate(cronium_protocol::AgentUpdate { version })).await?,
                    },
                    _ = state.shutdown.cancelled() => {
                        connection.close(CloseCode::Shutdown.to_u32().into(), b"control plane shutting down");
                        return Ok(());
                    }
                }
            }
        }
        .await;
        streams.abort();
        if let Some(last_seen) = state.registry.unregister(&agent.id, registration.session) {
            if let Err(error) = state.store.record_last_seen(&[(agent.id.clone(), last_seen)]).await {
                warn!(%error, "could not record last-seen time");
            }
            crate::replicas::presence::disconnected(&state, &agent.id).await;
            state.changes.notify(crate::changes::Kind::Agent, &agent.id, crate::changes::Audience::Everyone);
        }
        info!("agent disconnected");
        result
    }
    .instrument(span)
    .await
}

/// Sends the replicas' current QUIC addresses (`ReplicaAddrs`), if there are any.
async fn send_replica_addrs(
    send: &mut quinn::SendStream,
    addresses: &mut tokio::sync::watch::Receiver<Vec<String>>,
) -> anyhow::Result<()> {
    let quic_addrs = addresses.borrow_and_update().clone();
    if !quic_addrs.is_empty() {
        write_message(send, &Message::ReplicaAddrs(ReplicaAddrs { quic_addrs })).await?;
    }
    Ok(())
}

/// What the hello changes: attempts the agent must drop, and attempts it must cancel.
struct HelloSettlement {
    abandoned: Vec<AttemptRef>,
    cancel: Vec<AttemptRef>,
}

async fn settle_hello(
    state: &AppState,
    agent_id: &str,
    hello: &Hello,
) -> anyhow::Result<HelloSettlement> {
    state
        .store
        .record_agent_hello(
            agent_id,
            &hello.agent_version,
            &hello.host.hostname,
            &hello.host.os,
            &hello.host.arch,
            hello.capabilities.docker,
        )
        .await?;
    let closed = state
        .store
        .close_terminal_sessions_except(agent_id, &hello.terminals)
        .await?;
    if closed > 0 {
        info!(closed, "closed terminal sessions the agent no longer runs");
    }
    let reported: Vec<Attempt> = hello.running.iter().map(to_attempt).collect();
    let (abandoned, cancel) = state
        .store
        .renew_leases(
            agent_id,
            &reported,
            now_ms() + state.config.lease.as_millis() as i64,
        )
        .await?;
    // Attempts we handed to this agent that it no longer knows (it restarted and lost them, or
    // never received the claim) are settled now instead of waiting for their lease.
    let forgotten: Vec<Attempt> = state
        .store
        .active_attempts(agent_id)
        .await?
        .into_iter()
        .filter(|attempt| !reported.contains(attempt))
        .collect();
    if !forgotten.is_empty() {
        state
            .store
            .expire_attempts_now(agent_id, &forgotten)
            .await?;
        state.lease_reaper.notify_one();
    }
    Ok(HelloSettlement {
        abandoned: abandoned.iter().map(to_ref).collect(),
        cancel: cancel.iter().map(to_ref).collect(),
    })
}

async fn handle_control_message(
    state: &AppState,
    agent_id: &str,
    send: &mut quinn::SendStream,
    fresh: &job_stream::FreshAttempts,
    message: Message,
) -> anyhow::Result<()> {
    match message {
        Message::Heartbeat(heartbeat) => {
            let handling = std::time::Instant::now();
            let now = now_ms();
            state.registry.touch(agent_id, now);
            let running: Vec<Attempt> = heartbeat.running.iter().map(to_attempt).collect();
            let (abandoned, cancel) = state
                .store
                .renew_leases(
                    agent_id,
                    &running,
                    now + state.config.lease.as_millis() as i64,
                )
                .await?;
            let ack = HeartbeatAck {
                seq: heartbeat.seq,
                abandon: abandoned.iter().map(to_ref).collect(),
            };
            write_message(send, &Message::HeartbeatAck(ack)).await?;
            state.store.metrics().observe_heartbeat(handling.elapsed());
            for attempt in cancel {
                write_message(
                    send,
                    &Message::Cancel(cronium_protocol::Cancel {
                        job: to_ref(&attempt),
                    }),
                )
                .await?;
            }
        }
        Message::Claim(claim) => {
            let lease_until = now_ms() + state.config.lease.as_millis() as i64;
            let claimed = state
                .store
                .claim_jobs(agent_id, claim.slots.min(MAX_CLAIM), lease_until)
                .await?;
            let count = claimed.len() as u32;
            for job in claimed {
                let job_id = job.id.clone();
                match job_spec(job, &state.key) {
                    Ok(spec) => {
                        fresh.assigned(&spec.job_id, spec.attempt);
                        write_message(send, &Message::Assign(spec)).await?
                    }
                    Err(error) => warn!(%job_id, %error, "claimed a job the agent cannot run"),
                }
                state.job_events.notify(&job_id);
            }
            write_message(send, &Message::ClaimDone(ClaimDone { claimed: count })).await?;
        }
        Message::TerminalEnded(ended) => {
            if state
                .store
                .close_terminal_session(&ended.session, agent_id, ended.code)
                .await?
            {
                info!(session = %ended.session, code = ?ended.code, "terminal session ended");
            }
        }
        Message::UpdateStatus(status) => record_update_status(state, agent_id, status).await?,
        other => bail!("unexpected {} on the control stream", other.name()),
    }
    Ok(())
}

/// Records an agent's self-update report (version checked, reason made printable and bounded).
async fn record_update_status(
    state: &AppState,
    agent_id: &str,
    status: cronium_protocol::UpdateStatus,
) -> anyhow::Result<()> {
    if crate::release::check_version(&status.target_version).is_err() {
        bail!("update_status with an invalid version");
    }
    let reason = status.reason.map(|reason| {
        reason
            .chars()
            .filter(|character| !character.is_control())
            .take(cronium_protocol::MAX_UPDATE_REASON)
            .collect::<String>()
    });
    let kind = crate::store::agent_updates::UpdateStateKind::from_wire(status.state);
    info!(target_version = %status.target_version, state = kind.as_str(), reason = reason.as_deref().unwrap_or(""), "agent update");
    state
        .store
        .record_update_status(agent_id, &status.target_version, kind, reason.as_deref())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use cronium_protocol::{DockerNetwork, HostSpec};

    use super::*;

    #[test]
    fn runtime_specs_of_old_and_new_rows_are_read() {
        assert_eq!(
            runtime_spec(None).unwrap(),
            RuntimeSpec::Host(HostSpec::default())
        );
        let host = RuntimeSpec::Host(HostSpec {
            user: Some("nobody".into()),
            memory_mb: Some(32),
            cpus: None,
            pids: Some(20),
        });
        assert_eq!(
            runtime_spec(Some(&serde_json::to_string(&host).unwrap())).unwrap(),
            host
        );
        let docker = DockerSpec {
            image: "debian:12-slim".into(),
            memory_mb: Some(64),
            cpus: Some(0.5),
            pids: Some(256),
            network: DockerNetwork::None,
            read_only: false,
            user: None,
        };
        // Rows written before host jobs had settings hold a bare DockerSpec.
        assert_eq!(
            runtime_spec(Some(&serde_json::to_string(&docker).unwrap())).unwrap(),
            RuntimeSpec::Docker(docker.clone())
        );
        assert_eq!(
            runtime_spec(Some(
                &serde_json::to_string(&RuntimeSpec::Docker(docker.clone())).unwrap()
            ))
            .unwrap(),
            RuntimeSpec::Docker(docker)
        );
        assert!(runtime_spec(Some("{\"Vm\":{}}")).is_err());
    }
}
