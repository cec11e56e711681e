//! Agent self-update: the fleet's update policy (one row) and each agent's update state.

use sqlx::Row;

use super::agents::{Labels, labels_from_json, labels_to_json};
use super::{Store, StoreError, StoreResult, audit_in, now_ms, write_op};

/// The desired agent version: for agents carrying every one of `labels` (all agents when empty),
/// staged to `percentage` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePolicy {
    pub version: String,
    pub labels: Labels,
    pub percentage: u8,
    pub updated_by: Option<String>,
    pub updated_at: i64,
}

/// Where an agent's update stands; the states of the `update_state` CHECK constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStateKind {
    Pending,
    Downloading,
    Verifying,
    Restarting,
    Succeeded,
    Failed,
    RolledBack,
}

impl UpdateStateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStateKind::Pending => "pending",
            UpdateStateKind::Downloading => "downloading",
            UpdateStateKind::Verifying => "verifying",
            UpdateStateKind::Restarting => "restarting",
            UpdateStateKind::Succeeded => "succeeded",
            UpdateStateKind::Failed => "failed",
            UpdateStateKind::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<UpdateStateKind> {
        Some(match text {
            "pending" => UpdateStateKind::Pending,
            "downloading" => UpdateStateKind::Downloading,
            "verifying" => UpdateStateKind::Verifying,
            "restarting" => UpdateStateKind::Restarting,
            "succeeded" => UpdateStateKind::Succeeded,
            "failed" => UpdateStateKind::Failed,
            "rolled_back" => UpdateStateKind::RolledBack,
            _ => return None,
        })
    }

    /// The state an agent reported on the wire.
    pub fn from_wire(state: cronium_protocol::UpdateState) -> UpdateStateKind {
        use cronium_protocol::UpdateState;
        match state {
            UpdateState::Downloading => UpdateStateKind::Downloading,
            UpdateState::Verifying => UpdateStateKind::Verifying,
            UpdateState::Restarting => UpdateStateKind::Restarting,
            UpdateState::Succeeded => UpdateStateKind::Succeeded,
            UpdateState::Failed => UpdateStateKind::Failed,
            UpdateState::RolledBack => UpdateStateKind::RolledBack,
        }
    }
}

/// One agent's update: the version it was asked for, the state, why (failures), and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUpdateState {
    pub target_version: String,
    pub state: UpdateStateKind,
    pub reason: Option<String>,
    pub at: i64,
}

pub(crate) fn update_state_from_row(
    row: &sqlx::any::AnyRow,
) -> StoreResult<Option<AgentUpdateState>> {
    let Some(target_version) = row.try_get::<Option<String>, _>("update_target")? else {
        return Ok(None);
    };
    let state: String = row.try_get("update_state")?;
    let state = UpdateStateKind::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("update_state {state:?}")))?;
    Ok(Some(AgentUpdateState {
        target_version,
        state,
        reason: row.try_get("update_reason")?,
        at: row.try_get::<Option<i64>, _>("update_at")?.unwrap_or(0),
    }))
}

impl Store {
    /// The update policy, if one is set.
    pub async fn update_policy(&self) -> StoreResult<Option<UpdatePolicy>> {
        let row = sqlx::query(
            "SELECT version, labels, percentage, updated_by, updated_at FROM agent_update_policy WHERE id = 1",
        )
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok(UpdatePolicy {
                version: row.try_get("version")?,
                labels: labels_from_json(&row.try_get::<String, _>("labels")?)?,
                percentage: u8::try_from(row.try_get::<i64, _>("percentage")?)
                    .map_err(|_| StoreError::Corrupt("percentage".into()))?,
                updated_by: row.try_get("updated_by")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .transpose()
    }

    /// Sets (`Some`) or clears (`None`) the update policy, audited in the same transaction.
    pub async fn set_update_policy(
        &self,
        policy: Option<UpdatePolicy>,
        actor: &str,
    ) -> StoreResult<()> {
        let actor = actor.to_string();
        write_op!(self, |conn| async {
            match &policy {
                Some(policy) => {
                    sqlx::query(
                        "INSERT INTO agent_update_policy (id, version, labels, percentage, updated_by, updated_at)
                         VALUES (1, $1, $2, $3, $4, $5)
                         ON CONFLICT (id) DO UPDATE SET version = excluded.version, labels = excluded.labels,
                           percentage = excluded.percentage, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
                    )
                    .bind(&policy.version)
                    .bind(labels_to_json(&policy.labels))
                    .bind(i64::from(policy.percentage))
                    .bind(&actor)
                    .bind(policy.updated_at)
                    .execute(&mut *conn)
                    .await?;
                    audit_in(
                        conn,
                        "agent_update_policy_set",
                        Some(&actor),
                        serde_json::json!({
                            "version": policy.version,
                            "labels": policy.labels,
                            "percentage": policy.percentage,
                        }),
                    )
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM agent_update_policy WHERE id = 1")
                        .execute(&mut *conn)
                        .await?;
                    audit_in(
                        conn,
                        "agent_update_policy_cleared",
                        Some(&actor),
                        serde_json::json!({}),
                    )
                    .await?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Records that `target` was announced to the agent (state `pending`), unless the agent
    /// already has a state for that same target (announcements repeat on every connection).
    pub async fn mark_update_pending(&self, agent_id: &str, target: &str) -> StoreResult<()> {
        let (agent_id, target) = (agent_id.to_string(), target.to_string());
        write_op!(self, |conn| async {
            sqlx::query(
                "UPDATE agents SET update_target = $1, update_state = 'pending', update_reason = NULL, update_at = $2
                 WHERE id = $3 AND (update_target IS NULL OR update_target <> $4)",
            )
            .bind(&target)
            .bind(now_ms())
            .bind(&agent_id)
            .bind(&target)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Records what an agent reported about an update.
    pub async fn record_update_status(
        &self,
        agent_id: &str,
        target: &str,
        state: UpdateStateKind,
        reason: Option<&str>,
    ) -> StoreResult<()> {
        let (agent_id, target, reason) = (
            agent_id.to_string(),
            target.to_string(),
            reason.map(str::to_string),
        );
        write_op!(self, |conn| async {
            // An outcome about another version than a newer pending announcement is the agent
            // repeating its last report after a reconnect: it does not hide the announcement.
            let terminal = matches!(
                state,
                UpdateStateKind::Succeeded | UpdateStateKind::Failed | UpdateStateKind::RolledBack
            );
            let changed = sqlx::query(
                "UPDATE agents SET update_target = $1, update_state = $2, update_reason = $3, update_at = $4
                 WHERE id = $5 AND NOT ($6 AND update_state IS NOT DISTINCT FROM 'pending' AND update_target IS DISTINCT FROM $7)",
            )
            .bind(&target)
            .bind(state.as_str())
            .bind(&reason)
            .bind(now_ms())
            .bind(&agent_id)
            .bind(terminal)
            .bind(&target)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 0 {
                return Ok(());
            }
            if terminal {
                audit_in(
                    conn,
                    "agent_update",
                    None,
                    serde_json::json!({
                        "agent_id": agent_id,
                        "target_version": target,
                        "state": state.as_str(),
                        "reason": reason,
                    }),
                )
                .await?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_policy_round_trips_and_update_states_follow_announcements() {
        let (_db, store) = crate::store::test_db::open_test_store().await;
        assert_eq!(store.update_policy().await.unwrap(), None);
        let policy = UpdatePolicy {
            version: "0.2.0".into(),
            labels: [("ring".to_string(), "canary".to_string())].into(),
            percentage: 25,
            updated_by: Some("admin".into()),
            updated_at: 1234,
        };
        store
            .set_update_policy(Some(policy.clone()), "admin")
            .await
            .unwrap();
        assert_eq!(store.update_policy().await.unwrap(), Some(policy));
        store.set_update_policy(None, "admin").await.unwrap();
        assert_eq!(store.update_policy().await.unwrap(), None);
        assert_eq!(
            store.count_audit("agent_update_policy_set").await.unwrap(),
            1
        );

        let agent = store.enroll_test_agent("a").await;
        let state = |store: Store, id: String| async move {
            store
                .agent(&id)
                .await
                .unwrap()
                .update
                .map(|update| (update.target_version, update.state.as_str(), update.reason))
        };
        assert_eq!(state(store.clone(), agent.id.clone()).await, None);

        store.mark_update_pending(&agent.id, "0.2.0").await.unwrap();
        assert_eq!(
            state(store.clone(), agent.id.clone()).await,
            Some(("0.2.0".into(), "pending", None))
        );
        // The agent repeating an older outcome after a reconnect does not hide the announcement.
        store
            .record_update_status(&agent.id, "0.1.5", UpdateStateKind::Succeeded, None)
            .await
            .unwrap();
        assert_eq!(
            state(store.clone(), agent.id.clone()).await,
            Some(("0.2.0".into(), "pending", None))
        );
        store
            .record_update_status(&agent.id, "0.2.0", UpdateStateKind::Downloading, None)
            .await
            .unwrap();
        store
            .record_update_status(
                &agent.id,
                "0.2.0",
                UpdateStateKind::Failed,
                Some("the signature does not verify"),
            )
            .await
            .unwrap();
        let failed = Some((
            "0.2.0".to_string(),
            "failed",
            Some("the signature does not verify".to_string()),
        ));
        assert_eq!(state(store.clone(), agent.id.clone()).await, failed);
        // Announcing the same version again (every connection does) keeps the outcome.
        store.mark_update_pending(&agent.id, "0.2.0").await.unwrap();
        assert_eq!(state(store.clone(), agent.id.clone()).await, failed);
        store.mark_update_pending(&agent.id, "0.3.0").await.unwrap();
        assert_eq!(
            state(store.clone(), agent.id.clone()).await,
            Some(("0.3.0".into(), "pending", None))
        );
        assert_eq!(store.count_audit("agent_update").await.unwrap(), 1);
    }
}
