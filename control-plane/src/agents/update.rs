//! Which agent version each agent should run, and telling the agents.
//!
//! The policy (`PUT /api/v1/agent-update`) names a version, optionally labels (an agent must
//! carry every one of them) and a percentage. Staging is deterministic: an agent's bucket is
//! derived from a SHA-256 of its id (0..100), and it is selected when its bucket is below the
//! percentage, so raising the percentage only ever adds agents and every control plane (and every
//! restart) picks the same ones. The version is announced with `AgentUpdate` on the control
//! stream after each welcome and to every online agent when the policy changes; the agent itself
//! decides whether it may install it (signature with its pinned key, strictly newer version).

use cronium_protocol::AgentUpdate;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::AppState;
use crate::store::agent_updates::UpdatePolicy;
use crate::store::agents::{Agent, Labels};

/// The agent's stable staging bucket, 0..100.
pub fn bucket(agent_id: &str) -> u8 {
    let digest = Sha256::digest(format!("cronium-agent-update:{agent_id}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 100) as u8
}

/// Whether the policy applies to an agent with this id and these labels.
pub fn selects(policy: &UpdatePolicy, agent_id: &str, labels: &Labels) -> bool {
    let labels_match = policy
        .labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value));
    labels_match && bucket(agent_id) < policy.percentage
}

/// The version `agent` should run under `policy`, if any.
pub fn desired_version(policy: Option<&UpdatePolicy>, agent: &Agent) -> Option<String> {
    policy
        .filter(|policy| selects(policy, &agent.id, &agent.labels))
        .map(|policy| policy.version.clone())
}

/// What to send a freshly welcomed agent; marks the update `pending` when it is new to the
/// agent.
pub async fn announcement_for(state: &AppState, agent: &Agent) -> anyhow::Result<AgentUpdate> {
    let policy = state.store.update_policy().await?;
    let version = desired_version(policy.as_ref(), agent);
    if let Some(version) = &version
        && agent.version.as_deref() != Some(version.as_str())
    {
        state.store.mark_update_pending(&agent.id, version).await?;
    }
    Ok(AgentUpdate { version })
}

/// After a policy change: marks the newly selected agents `pending` and tells every online agent
/// its desired version (`None` to those no longer selected that were told one before).
pub async fn announce_all(state: &AppState) -> anyhow::Result<()> {
    let policy = state.store.update_policy().await?;
    for agent in state.store.agents().await? {
        let version = desired_version(policy.as_ref(), &agent);
        if let Some(version) = &version
            && agent.version.as_deref() != Some(version.as_str())
            && let Err(error) = state.store.mark_update_pending(&agent.id, version).await
        {
            warn!(agent_id = %agent.id, %error, "could not mark the update pending");
        }
        // `None` only to agents that were told a version before.
        if version.is_some() || agent.update.is_some() {
            state.registry.announce_update(&agent.id, version);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(percentage: u8, labels: &[(&str, &str)]) -> UpdatePolicy {
        UpdatePolicy {
            version: "0.2.0".into(),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            percentage,
            updated_by: None,
            updated_at: 0,
        }
    }

    fn ids() -> Vec<String> {
        (0..2000).map(|index| format!("agent-{index:04}")).collect()
    }

    #[test]
    fn staging_is_deterministic_monotonic_and_proportional() {
        let ids = ids();
        let none = Labels::new();
        for id in &ids {
            assert_eq!(bucket(id), bucket(id), "stable");
            assert!(bucket(id) < 100);
            assert!(!selects(&policy(0, &[]), id, &none), "0% selects nobody");
            assert!(selects(&policy(100, &[]), id, &none), "100% selects all");
        }
        let mut previous = 0;
        for percentage in [1u8, 10, 25, 50, 75, 99] {
            let chosen: Vec<&String> = ids
                .iter()
                .filter(|id| selects(&policy(percentage, &[]), id, &none))
                .collect();
            // Raising the percentage only adds agents.
            for id in ids
                .iter()
                .filter(|id| bucket(id) < percentage.saturating_sub(1))
            {
                assert!(chosen.contains(&id));
            }
            assert!(chosen.len() >= previous, "monotonic at {percentage}%");
            previous = chosen.len();
            // Roughly the share asked for (2000 ids: within 4 percentage points).
            let share = chosen.len() as f64 * 100.0 / ids.len() as f64;
            assert!(
                (share - f64::from(percentage)).abs() < 4.0,
                "{percentage}% selected {share:.1}%"
            );
        }
    }

    #[test]
    fn labels_narrow_the_policy_to_agents_carrying_all_of_them() {
        let web: Labels = [("role".to_string(), "web".to_string())].into();
        let web_eu: Labels = [
            ("role".to_string(), "web".to_string()),
            ("region".to_string(), "eu".to_string()),
        ]
        .into();
        let db: Labels = [("role".to_string(), "db".to_string())].into();
        let only_web = policy(100, &[("role", "web")]);
        assert!(selects(&only_web, "a", &web));
        assert!(selects(&only_web, "a", &web_eu));
        assert!(!selects(&only_web, "a", &db));
        assert!(!selects(&only_web, "a", &Labels::new()));
        let web_in_eu = policy(100, &[("role", "web"), ("region", "eu")]);
        assert!(!selects(&web_in_eu, "a", &web));
        assert!(selects(&web_in_eu, "a", &web_eu));
        // Labels and percentage combine.
        let id = ids()
            .into_iter()
            .find(|id| bucket(id) >= 50)
            .expect("an id in the upper half");
        assert!(!selects(&policy(50, &[("role", "web")]), &id, &web));
        assert!(selects(&policy(100, &[("role", "web")]), &id, &web));
    }

    #[test]
    fn desired_version_follows_the_policy() {
        let agent = Agent {
            id: "agent-1".into(),
            name: "a".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            version: Some("0.1.0".into()),
            hostname: None,
            last_seen_at: None,
            created_at: 0,
            revoked_at: None,
            docker: None,
            record_terminals: false,
            update: None,
        };
        assert_eq!(desired_version(None, &agent), None);
        assert_eq!(
            desired_version(Some(&policy(100, &[("role", "web")])), &agent).as_deref(),
            Some("0.2.0")
        );
        assert_eq!(
            desired_version(Some(&policy(100, &[("role", "db")])), &agent),
            None
        );
        assert_eq!(desired_version(Some(&policy(0, &[])), &agent), None);
    }
}
