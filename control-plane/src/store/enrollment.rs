//! Listing and revoking enrollment tokens (creating and spending them is in `agents.rs`). Only
//! the token's hash is stored, so a listed token is known by its id, never by its value.

use sqlx::Row;

use super::agents::{Labels, labels_from_json};
use super::{Store, StoreError, StoreResult, now_ms, write_op};

/// An enrollment token as the admins' list shows it.
#[derive(Debug, Clone)]
pub struct EnrollmentTokenRecord {
    pub id: String,
    pub labels: Labels,
    pub uses_left: u32,
    pub expires_at: i64,
    pub created_by: Option<String>,
    pub created_at: i64,
}

impl Store {
    /// The tokens that can still enroll an agent (uses left, not expired), newest first.
    pub async fn usable_enrollment_tokens(&self) -> StoreResult<Vec<EnrollmentTokenRecord>> {
        let rows = sqlx::query(
            "SELECT t.id, t.labels, t.uses_left, t.expires_at, u.username AS created_by, t.created_at
             FROM enrollment_tokens t LEFT JOIN users u ON u.id = t.created_by
             WHERE t.uses_left > 0 AND t.expires_at > $1 ORDER BY t.created_at DESC, t.id",
        )
        .bind(now_ms())
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let uses_left: i64 = row.try_get("uses_left")?;
                Ok(EnrollmentTokenRecord {
                    id: row.try_get("id")?,
                    labels: labels_from_json(&row.try_get::<String, _>("labels")?)?,
                    uses_left: u32::try_from(uses_left)
                        .map_err(|_| StoreError::Corrupt(format!("uses_left {uses_left}")))?,
                    expires_at: row.try_get("expires_at")?,
                    created_by: row.try_get("created_by")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Revokes a usable token: no use is left. A spent, expired or unknown one is `NotFound`.
    pub async fn revoke_enrollment_token(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let changed = sqlx::query(
                "UPDATE enrollment_tokens SET uses_left = 0 WHERE id = $1 AND uses_left > 0 AND expires_at > $2",
            )
            .bind(id)
            .bind(now_ms())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 1 {
                Ok(())
            } else {
                Err(StoreError::NotFound)
            }
        })
        .await
    }
}
