//! What the control plane's own jobs (`actions/`) read besides the job: the tool of a tool
//! action, sealed.

use sqlx::Row;

use super::tools::ToolKind;
use super::{Store, StoreError, StoreResult};

/// The tool a tool action job sends through, with its configuration still sealed. Its `Debug`
/// shows no configuration.
pub struct ActionTool {
    pub id: String,
    pub name: String,
    pub kind: ToolKind,
    pub sealed_config: Vec<u8>,
    /// The user name of the tool's (and the event's) owner.
    pub owner_name: String,
}

impl std::fmt::Debug for ActionTool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ActionTool")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The tool `tool_id` if it belongs to the owner of event `event_id`; `None` when it was
    /// deleted (or never was that owner's).
    pub async fn action_tool(
        &self,
        tool_id: &str,
        event_id: &str,
    ) -> StoreResult<Option<ActionTool>> {
        let row = sqlx::query(
            "SELECT t.id, t.name, t.kind, t.config, u.username
             FROM tools t JOIN events e ON e.owner_id = t.owner_id JOIN users u ON u.id = t.owner_id
             WHERE t.id = $1 AND e.id = $2",
        )
        .bind(tool_id)
        .bind(event_id)
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: String = row.try_get("kind")?;
        Ok(Some(ActionTool {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            kind: ToolKind::parse(&kind)
                .ok_or_else(|| StoreError::Corrupt(format!("tool kind {kind:?}")))?,
            sealed_config: row.try_get("config")?,
            owner_name: row.try_get("username")?,
        }))
    }
}
