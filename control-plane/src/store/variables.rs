//! Variables (per owner, sealed values) and the runtime-helper calls agents forward.
//!
//! A helper call is checked against the job it names: it must be the current attempt of a job
//! this agent claimed and still running (`claimed` or `running`); anything else is `Stale` and
//! audited. Writes carry the attempt's sequence number; `jobs.helper_seq` remembers the highest
//! one applied, in the same transaction as the write, so a write the agent sends again after a
//! lost answer is recognised and not applied twice.

use sqlx::{AnyConnection, Row};

use super::tools::{NotifyRefused, enqueue_notification_in};
use super::{Store, StoreError, StoreResult, audit_in, now_ms, write_op};

/// A variable as stored: its value is sealed with the encryption key.
#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    pub name: String,
    pub sealed_value: Vec<u8>,
    pub updated_at: i64,
    pub updated_by_job: Option<String>,
}

/// The outcome of a forwarded `get_variable`.
#[derive(Debug, Clone, PartialEq)]
pub enum HelperRead {
    /// The attempt is not current or not running on this agent.
    Stale,
    /// The sealed value, `None` when the variable is not set.
    Value(Option<Vec<u8>>),
}

/// A forwarded write, already checked and (for variables) sealed.
#[derive(Debug, Clone, PartialEq)]
pub enum HelperWrite {
    SetVariable {
        name: String,
        sealed_value: Vec<u8>,
    },
    Notify {
        /// `None`: the owner's only tool.
        tool: Option<String>,
        title: Option<String>,
        message: String,
    },
}

/// The outcome of a forwarded write.
#[derive(Debug, Clone, PartialEq)]
pub enum HelperWriteOutcome {
    /// Applied now.
    Applied,
    /// Applied by an earlier delivery of the same sequence number.
    Duplicate,
    /// The attempt is not current or not running on this agent; nothing was written.
    Stale,
    /// A notification was queued with this id (the caller wakes the dispatcher).
    Notified(String),
    /// The notification names no tool the owner has (or none was named and the owner does not
    /// have exactly one); the message says which.
    NoTool(String),
    /// The notification was refused as malformed.
    Invalid(String),
}

/// The current attempt's owner, if the call may act for it.
async fn current_attempt_owner(
    conn: &mut AnyConnection,
    agent_id: &str,
    job_id: &str,
    attempt: u32,
) -> StoreResult<Option<(String, u64)>> {
    let row = sqlx::query(
        "SELECT j.runner AS agent_id, j.attempt, j.status, j.helper_seq, e.owner_id
         FROM jobs j JOIN events e ON e.id = j.event_id WHERE j.id = $1",
    )
    .bind(job_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let current = row.try_get::<String, _>("agent_id")? == agent_id
        && row.try_get::<i64, _>("attempt")? == i64::from(attempt)
        && matches!(
            row.try_get::<String, _>("status")?.as_str(),
            "claimed" | "running"
        );
    if !current {
        return Ok(None);
    }
    Ok(Some((
        row.try_get("owner_id")?,
        row.try_get::<i64, _>("helper_seq")? as u64,
    )))
}

impl Store {
    /// Reads a variable for a script (forwarded `get_variable`).
    pub async fn helper_get_variable(
        &self,
        agent_id: &str,
        job_id: &str,
        attempt: u32,
        name: &str,
    ) -> StoreResult<HelperRead> {
        let mut conn = self.reader.acquire().await?;
        let Some((owner_id, _)) =
            current_attempt_owner(&mut conn, agent_id, job_id, attempt).await?
        else {
            return Ok(HelperRead::Stale);
        };
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT sealed_value FROM variables WHERE owner_id = $1 AND name = $2",
        )
        .bind(owner_id)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(HelperRead::Value(sealed))
    }

    /// Applies a forwarded write with sequence number `seq` (at most once per attempt).
    pub async fn helper_write(
        &self,
        agent_id: &str,
        job_id: &str,
        attempt: u32,
        seq: u64,
        write: HelperWrite,
    ) -> StoreResult<HelperWriteOutcome> {
        let agent_id = agent_id.to_string();
        let job_id = job_id.to_string();
        write_op!(self, |conn| async {
            let Some((owner_id, applied)) =
                current_attempt_owner(conn, &agent_id, &job_id, attempt).await?
            else {
                audit_in(
                    conn,
                    "helper_write_stale",
                    Some(&agent_id),
                    serde_json::json!({"job_id": job_id, "attempt": attempt, "seq": seq}),
                )
                .await?;
                return Ok(HelperWriteOutcome::Stale);
            };
            if seq <= applied {
                return Ok(HelperWriteOutcome::Duplicate);
            }
            let outcome = match &write {
                HelperWrite::SetVariable { name, sealed_value } => {
                    upsert_variable_in(conn, &owner_id, name, sealed_value, Some(&job_id)).await?;
                    HelperWriteOutcome::Applied
                }
                HelperWrite::Notify {
                    tool,
                    title,
                    message,
                } => {
                    let tool = match tool {
                        Some(tool) => Some(tool.clone()),
                        None => {
                            let names: Vec<String> =
                                sqlx::query_scalar("SELECT name FROM tools WHERE owner_id = $1 LIMIT 2")
                                    .bind(&owner_id)
                                    .fetch_all(&mut *conn)
                                    .await?;
                            match names.as_slice() {
                                [only] => Some(only.clone()),
                                [] => None,
                                _ => {
                                    return record_answered(conn, &job_id, seq, HelperWriteOutcome::NoTool(
                                        "the event's owner has several tools: name one (tool)".into(),
                                    ))
                                    .await;
                                }
                            }
                        }
                    };
                    let Some(tool) = tool else {
                        return record_answered(conn, &job_id, seq, HelperWriteOutcome::NoTool(
                            "the event's owner has no tool to notify through: add one (POST /api/v1/tools)".into(),
                        ))
                        .await;
                    };
                    match enqueue_notification_in(
                        conn,
                        &owner_id,
                        &tool,
                        title.as_deref(),
                        message,
                        Some(&job_id),
                    )
                    .await?
                    {
                        Ok(id) => HelperWriteOutcome::Notified(id),
                        Err(NotifyRefused::UnknownTool(name)) => HelperWriteOutcome::NoTool(format!(
                            "the event's owner has no tool named {name:?}"
                        )),
                        Err(refused @ NotifyRefused::Invalid { .. }) => {
                            HelperWriteOutcome::Invalid(refused.to_string())
                        }
                    }
                }
            };
            record_answered(conn, &job_id, seq, outcome).await
        })
        .await
    }

    /// The owner's variables, by name.
    pub async fn variables(&self, owner_id: &str) -> StoreResult<Vec<Variable>> {
        let rows = sqlx::query(
            "SELECT name, sealed_value, updated_at, updated_by_job FROM variables WHERE owner_id = $1 ORDER BY name",
        )
        .bind(owner_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(variable_from_row).collect()
    }

    /// One variable of the owner.
    pub async fn variable(&self, owner_id: &str, name: &str) -> StoreResult<Variable> {
        let row = sqlx::query(
            "SELECT name, sealed_value, updated_at, updated_by_job FROM variables WHERE owner_id = $1 AND name = $2",
        )
        .bind(owner_id)
        .bind(name)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        variable_from_row(&row)
    }

    /// Creates or replaces a variable (API).
    pub async fn put_variable(
        &self,
        owner_id: &str,
        name: &str,
        sealed_value: Vec<u8>,
    ) -> StoreResult<()> {
        let owner_id = owner_id.to_string();
        let name = name.to_string();
        write_op!(self, |conn| async {
            upsert_variable_in(conn, &owner_id, &name, &sealed_value, None).await
        })
        .await
    }

    /// Deletes a variable (API).
    pub async fn delete_variable(&self, owner_id: &str, name: &str) -> StoreResult<()> {
        let owner_id = owner_id.to_string();
        let name = name.to_string();
        write_op!(self, |conn| async {
            let deleted = sqlx::query("DELETE FROM variables WHERE owner_id = $1 AND name = $2")
                .bind(&owner_id)
                .bind(&name)
                .execute(&mut *conn)
                .await?;
            if deleted.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }
}

/// Records that write `seq` was answered, whatever the answer.
async fn record_answered(
    conn: &mut AnyConnection,
    job_id: &str,
    seq: u64,
    outcome: HelperWriteOutcome,
) -> StoreResult<HelperWriteOutcome> {
    sqlx::query("UPDATE jobs SET helper_seq = $1 WHERE id = $2")
        .bind(seq as i64)
        .bind(job_id)
        .execute(&mut *conn)
        .await?;
    Ok(outcome)
}

async fn upsert_variable_in(
    conn: &mut AnyConnection,
    owner_id: &str,
    name: &str,
    sealed_value: &[u8],
    job_id: Option<&str>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO variables (owner_id, name, sealed_value, updated_at, updated_by_job) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (owner_id, name) DO UPDATE SET sealed_value = excluded.sealed_value,
             updated_at = excluded.updated_at, updated_by_job = excluded.updated_by_job",
    )
    .bind(owner_id)
    .bind(name)
    .bind(sealed_value)
    .bind(now_ms())
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn variable_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Variable> {
    Ok(Variable {
        name: row.try_get("name")?,
        sealed_value: row.try_get("sealed_value")?,
        updated_at: row.try_get("updated_at")?,
        updated_by_job: row.try_get("updated_by_job")?,
    })
}
