//! `targets.pool`: checking a pool target and finding its candidate agents.
//!
//! A pool is a label selector like `targets.labels`, but a run gets ONE job that whichever
//! matching agent claims first runs (`store::pool`). It stands alone: an event (or a trigger's
//! override, or a workflow node) targets either a pool or agents, labels and servers.

use super::error::{ApiError, ApiResult};
use crate::store::agents::Agent;
use crate::store::events::Targets;

/// Checks the pool of `targets` (under `prefix`, e.g. `targets`): not empty, valid labels, and
/// alone. The error's field is `{prefix}.pool`.
pub(crate) fn check(prefix: &str, targets: &Targets) -> ApiResult<()> {
    let Some(pool) = &targets.pool else {
        return Ok(());
    };
    let field = format!("{prefix}.pool");
    if pool.is_empty() {
        return Err(ApiError::field(
            &field,
            "give at least one label (the agents that may run the job must carry them all)",
        ));
    }
    if !targets.agents.is_empty() || !targets.labels.is_empty() || !targets.servers.is_empty() {
        return Err(ApiError::field(
            &field,
            "a pool stands alone: give pool, or agents, labels and servers, not both",
        ));
    }
    super::labels_field(&field, pool)
}

/// The ids of the agents carrying every label of `pool` (online or not, revoked ones left out),
/// sorted.
pub(crate) fn candidates(agents: &[Agent], pool: &crate::store::agents::Labels) -> Vec<String> {
    let mut ids: Vec<String> = agents
        .iter()
        .filter(|agent| agent.revoked_at.is_none())
        .filter(|agent| {
            pool.iter()
                .all(|(key, value)| agent.labels.get(key) == Some(value))
        })
        .map(|agent| agent.id.clone())
        .collect();
    ids.sort();
    ids
}
