//! Which replica each agent is connected to, so a replica can tell an agent connected to another
//! one from an offline agent (PostgreSQL only; on SQLite the registry is the whole truth).
//!
//! A replica records an agent in `agent_presence` (migrations 0024, 0025: with the time its
//! connection was established) when it connects, refreshes
//! the rows of its agents every [`REFRESH`], and deletes the row when the agent disconnects (only
//! its own row: the agent may already be connected to another replica). A row not refreshed for
//! [`STALE_AFTER`] belongs to a replica that died and counts for nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tracing::warn;

use crate::AppState;
use crate::store::replica_registry::AgentPresence;
use crate::store::{StoreResult, now_ms};

/// How often a replica refreshes the presence of its agents.
pub const REFRESH: Duration = Duration::from_secs(10);

/// How old a presence row may be and still count.
pub const STALE_AFTER: Duration = Duration::from_secs(35);

/// Records that `agent_id` just connected to this replica, its connection established at
/// `connected_at`.
pub async fn connected(state: &AppState, agent_id: &str, connected_at: i64) {
    if !state.replicas.is_shared() {
        return;
    }
    if let Err(error) = state
        .store
        .record_connection(state.replicas.id(), agent_id, connected_at, now_ms())
        .await
    {
        warn!(%error, "could not record the agent's presence");
    }
}

/// Records that `agent_id` disconnected from this replica.
pub async fn disconnected(state: &AppState, agent_id: &str) {
    if !state.replicas.is_shared() {
        return;
    }
    if let Err(error) = state
        .store
        .clear_presence(state.replicas.id(), agent_id)
        .await
    {
        warn!(%error, "could not clear the agent's presence");
    }
}

/// Refreshes the presence of this replica's agents every [`REFRESH`] until shutdown.
pub async fn run(state: AppState) {
    if !state.replicas.is_shared() {
        return;
    }
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let agents: Vec<String> = state
            .registry
            .snapshot()
            .into_iter()
            .map(|(agent_id, _)| agent_id)
            .collect();
        if let Err(error) = state
            .store
            .record_presence(state.replicas.id(), &agents, now_ms())
            .await
        {
            warn!(%error, "could not refresh the agents' presence");
        }
    }
}

/// The agents connected to another replica, by id, with their connections (none on SQLite).
pub async fn elsewhere(state: &AppState) -> StoreResult<HashMap<String, AgentPresence>> {
    if !state.replicas.is_shared() {
        return Ok(HashMap::new());
    }
    state
        .store
        .presence_elsewhere(state.replicas.id(), fresh_since())
        .await
}

/// The connection of `agent_id` to another replica, if it has one (none on SQLite).
pub async fn elsewhere_of(state: &AppState, agent_id: &str) -> StoreResult<Option<AgentPresence>> {
    if !state.replicas.is_shared() {
        return Ok(None);
    }
    state
        .store
        .presence_of_elsewhere(state.replicas.id(), agent_id, fresh_since())
        .await
}

/// Whether `agent_id` is connected to this replica or (PostgreSQL) to another live one, by the
/// rule of `GET /agents` (`cronium server install-agent` waits for this: the installed agent
/// may connect to any replica).
pub async fn is_online(state: &AppState, agent_id: &str) -> StoreResult<bool> {
    if state.registry.connection(agent_id).is_some() {
        return Ok(true);
    }
    Ok(elsewhere_of(state, agent_id).await?.is_some())
}

/// How many agents not revoked are connected to any replica (`cronium_agents_online`): this
/// replica's agents and those with a fresh presence row of another replica, each once. On
/// SQLite, this control plane's agents.
pub async fn online_count(state: &AppState) -> StoreResult<usize> {
    let here = state.registry.snapshot();
    if !state.replicas.is_shared() {
        return Ok(here.len());
    }
    let mut online: HashSet<String> = state
        .store
        .agents_online_elsewhere(state.replicas.id(), fresh_since())
        .await?
        .into_iter()
        .collect();
    online.extend(here.into_iter().map(|(agent_id, _)| agent_id));
    Ok(online.len())
}

/// The oldest `seen_at` of a presence row that still counts.
fn fresh_since() -> i64 {
    now_ms() - STALE_AFTER.as_millis() as i64
}

/// Those of `agent_ids` connected to another replica (none on SQLite).
pub async fn connected_elsewhere(state: &AppState, agent_ids: &[String]) -> HashSet<String> {
    if !state.replicas.is_shared() || agent_ids.is_empty() {
        return HashSet::new();
    }
    let since = now_ms() - STALE_AFTER.as_millis() as i64;
    match state
        .store
        .present_elsewhere(state.replicas.id(), agent_ids, since)
        .await
    {
        Ok(present) => present,
        Err(error) => {
            warn!(%error, "could not read which agents other replicas serve");
            // Unknown: count them all as connected elsewhere rather than skip their jobs.
            agent_ids.iter().cloned().collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_db::open_test_store;

    #[tokio::test]
    async fn presence_is_per_replica_and_goes_stale() {
        let (_db, store) = open_test_store().await;
        let ids = ["x".to_owned(), "y".to_owned(), "z".to_owned()];
        store
            .record_presence("replica-a", &ids[..2], 1_000)
            .await
            .unwrap();
        let mut seen: Vec<String> = store
            .present_elsewhere("replica-b", &ids, 1_000)
            .await
            .unwrap()
            .into_iter()
            .collect();
        seen.sort();
        assert_eq!(seen, ["x", "y"]);
        // Its own agents are not "elsewhere" for replica A.
        assert!(
            store
                .present_elsewhere("replica-a", &ids, 0)
                .await
                .unwrap()
                .is_empty()
        );
        // Stale rows count for nothing.
        assert!(
            store
                .present_elsewhere("replica-b", &ids, 1_001)
                .await
                .unwrap()
                .is_empty()
        );
        // Another replica's disconnect does not clear A's row; A's does. An agent that moved
        // to B belongs to B.
        store.clear_presence("replica-b", "x").await.unwrap();
        store
            .record_presence("replica-b", &ids[1..2], 2_000)
            .await
            .unwrap();
        store.clear_presence("replica-a", "y").await.unwrap();
        let elsewhere_for_c = store.present_elsewhere("replica-c", &ids, 0).await.unwrap();
        assert_eq!(elsewhere_for_c.len(), 2);
        store.clear_presence("replica-a", "x").await.unwrap();
        let elsewhere_for_a: Vec<String> = store
            .present_elsewhere("replica-a", &ids, 0)
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(elsewhere_for_a, ["y"]);
    }
}
