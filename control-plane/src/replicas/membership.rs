//! This replica in the replica registry (`replicas`, migration 0025; PostgreSQL only), and the
//! QUIC addresses agents are told to fail over to.
//!
//! [`start`] first removes the earlier runs of this replica (rows with its relay URL, and the
//! agent presence they recorded: their agents are not connected until they reconnect, and a
//! terminal must not be relayed to a process that is gone), then announces the replica (its id,
//! `quic_public_addrs`, relay URL) before the control plane accepts its first agent and reads the live replicas once; then a task re-announces it
//! every [`REFRESH`] (which keeps `seen_at` fresh), re-reads the live replicas (those seen within
//! [`STALE_AFTER`]) and publishes their addresses, this replica's first, to the agent sessions
//! (`Replicas::agent_addrs`; each session sends a change as `Message::ReplicaAddrs`). On a
//! graceful stop the task retires the row; a replica that died drops out once its row is stale.

use anyhow::Context;
use cronium_protocol::MAX_REPLICA_ADDRS;
use tracing::{info, warn};

use super::presence::{REFRESH, STALE_AFTER};
use crate::AppState;
use crate::store::now_ms;
use crate::store::replica_registry::ReplicaRecord;

/// Announces this replica and publishes the live replicas' addresses, then keeps both fresh in
/// a task of the control plane until shutdown (nothing on SQLite).
pub async fn start(state: &AppState) -> anyhow::Result<()> {
    if !state.replicas.is_shared() {
        return Ok(());
    }
    let started_at = now_ms();
    let superseded = state
        .store
        .supersede_replicas_at(
            &state.config.relay_url,
            state.replicas.id(),
            started_at,
            STALE_AFTER.as_millis() as i64,
        )
        .await
        .context("removing earlier runs of this replica from the replica registry")?;
    if superseded > 0 {
        warn!(
            relay_url = %state.config.relay_url,
            "replaced a replica registered at this relay URL and seen moments ago: a restart of this one, or another replica given the same --relay-url by mistake (each replica needs its own)"
        );
    }
    state
        .store
        .announce_replica(&record(state, started_at, started_at))
        .await
        .context("announcing this replica in the replica registry")?;
    refresh_addrs(state).await;
    info!(
        replica = %state.replicas.id(),
        relay_url = %state.config.relay_url,
        "joined the replica registry"
    );
    state.tasks.spawn(run(state.clone(), started_at));
    Ok(())
}

fn record(state: &AppState, started_at: i64, now: i64) -> ReplicaRecord {
    ReplicaRecord {
        id: state.replicas.id().to_owned(),
        quic_addrs: state.config.quic_public_addrs.clone(),
        relay_url: state.config.relay_url.clone(),
        started_at,
        seen_at: now,
    }
}

async fn run(state: AppState, started_at: i64) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => break,
        }
        if let Err(error) = state
            .store
            .announce_replica(&record(&state, started_at, now_ms()))
            .await
        {
            warn!(%error, "could not refresh this replica in the replica registry");
        }
        refresh_addrs(&state).await;
    }
    match state.store.retire_replica(state.replicas.id()).await {
        Ok(()) => info!("left the replica registry"),
        Err(error) => warn!(%error, "could not leave the replica registry"),
    }
}

/// Reads the live replicas and publishes their addresses (the previous ones stay when the
/// database does not answer).
async fn refresh_addrs(state: &AppState) {
    match state
        .store
        .live_replicas(now_ms(), STALE_AFTER.as_millis() as i64)
        .await
    {
        Ok(live) => state.replicas.set_agent_addrs(agent_addrs(
            state.replicas.id(),
            &state.config.quic_public_addrs,
            &live,
        )),
        Err(error) => warn!(%error, "could not read the live replicas"),
    }
}

/// What agents are told: `own_addrs` (this replica's) first, then the other live replicas'
/// addresses in the registry's order, each once, at most [`MAX_REPLICA_ADDRS`].
pub fn agent_addrs(own_id: &str, own_addrs: &[String], live: &[ReplicaRecord]) -> Vec<String> {
    let others = live
        .iter()
        .filter(|replica| replica.id != own_id)
        .flat_map(|replica| replica.quic_addrs.iter());
    let mut addresses: Vec<String> = Vec::new();
    for address in own_addrs.iter().chain(others) {
        if addresses.len() == MAX_REPLICA_ADDRS {
            break;
        }
        if !addresses.contains(address) {
            addresses.push(address.clone());
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, addresses: &[&str]) -> ReplicaRecord {
        ReplicaRecord {
            id: id.to_owned(),
            quic_addrs: addresses
                .iter()
                .map(|address| (*address).to_owned())
                .collect(),
            relay_url: format!("http://{id}:8080"),
            started_at: 0,
            seen_at: 0,
        }
    }

    #[test]
    fn agents_are_told_this_replica_first_then_the_others_once_and_bounded() {
        let own = ["b:7443".to_owned()];
        let live = [
            replica("a", &["a:7443", "shared:7443"]),
            replica("b", &["b:7443"]),
            replica("c", &["c:7443", "shared:7443", "b:7443"]),
        ];
        assert_eq!(
            agent_addrs("b", &own, &live),
            ["b:7443", "a:7443", "shared:7443", "c:7443"]
        );
        // Before this replica's own row is read back (or when it went stale) it is still first.
        assert_eq!(
            agent_addrs("b", &own, &live[..1]),
            ["b:7443", "a:7443", "shared:7443"]
        );
        let many: Vec<ReplicaRecord> = (0..100)
            .map(|index| replica(&format!("r{index}"), &[&format!("r{index}:7443")]))
            .collect();
        let told = agent_addrs("b", &own, &many);
        assert_eq!(told.len(), MAX_REPLICA_ADDRS);
        assert_eq!(told[0], "b:7443");
    }
}
