//! Tools (Slack, Discord, generic webhooks, email) and the notification outbox.
//!
//! A tool's configuration is stored only sealed: the caller hands in the bytes made by
//! `EncryptionKey::seal` and gets them back only through [`Store::claim_notifications`], for the
//! dispatcher. Notifications are rows in an outbox: `pending` until a delivery succeeded (`sent`)
//! or was given up (`failed`). A claim counts the attempt and pushes `next_attempt_at` forward by
//! a lease, so a delivery interrupted by a crash is retried once the lease ends: delivery is at
//! least once, never at most once.

use std::fmt;

use sqlx::{AnyConnection, Row};

use super::{Store, StoreError, StoreResult, new_id, now_ms, write_op};

/// Longest notification title accepted, in bytes.
pub const MAX_TITLE_BYTES: usize = 256;

/// Longest notification message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// Longest `last_error` kept, in characters.
const MAX_ERROR_CHARS: usize = 500;

/// Where a tool delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// A Slack (or Slack-compatible) incoming webhook.
    Slack,
    /// A Discord channel webhook.
    Discord,
    /// Any HTTP endpoint, with optional headers and an HMAC signature.
    Webhook,
    /// Email over SMTP (`tools/email.rs`).
    Email,
}

impl ToolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolKind::Slack => "slack",
            ToolKind::Discord => "discord",
            ToolKind::Webhook => "webhook",
            ToolKind::Email => "email",
        }
    }

    pub fn parse(text: &str) -> Option<ToolKind> {
        match text {
            "slack" => Some(ToolKind::Slack),
            "discord" => Some(ToolKind::Discord),
            "webhook" => Some(ToolKind::Webhook),
            "email" => Some(ToolKind::Email),
            _ => None,
        }
    }
}

/// A stored tool, without its configuration.
#[derive(Debug, Clone)]
pub struct Tool {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub kind: ToolKind,
    /// The host of the configured URL, or `host:port` of an email tool's SMTP server (not a
    /// secret; shown in lists).
    pub target_host: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A tool's configuration as stored: the sealed JSON and the host shown in lists.
#[derive(Clone)]
pub struct SealedConfig {
    pub sealed: Vec<u8>,
    pub target_host: String,
}

impl fmt::Debug for SealedConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SealedConfig")
            .field("target_host", &self.target_host)
            .finish_non_exhaustive()
    }
}

/// What `PATCH` changes: `None` keeps the stored value.
#[derive(Debug, Clone, Default)]
pub struct ToolChange {
    pub name: Option<String>,
    pub config: Option<SealedConfig>,
}

/// Where a notification is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationStatus {
    /// Not delivered yet; retried until it is or attempts run out.
    Pending,
    /// Delivered (the endpoint answered 2xx).
    Sent,
    /// Given up; `last_error` says why.
    Failed,
}

impl NotificationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Pending => "pending",
            NotificationStatus::Sent => "sent",
            NotificationStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<NotificationStatus> {
        match text {
            "pending" => Some(NotificationStatus::Pending),
            "sent" => Some(NotificationStatus::Sent),
            "failed" => Some(NotificationStatus::Failed),
            _ => None,
        }
    }
}

/// A notification in the outbox.
#[derive(Debug, Clone)]
pub struct Notification {
    pub id: String,
    pub owner_id: String,
    /// `None` once the tool was deleted.
    pub tool_id: Option<String>,
    pub tool_name: String,
    pub title: Option<String>,
    pub message: String,
    pub source_job_id: Option<String>,
    pub status: NotificationStatus,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

/// Why a notification was not enqueued. The `Display` text is meant for the script (or API
/// caller) that asked; it never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyRefused {
    /// The owner has no tool of this name.
    UnknownTool(String),
    /// The title or the message is empty where required, or too long.
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl fmt::Display for NotifyRefused {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyRefused::UnknownTool(name) => write!(formatter, "no tool named {name:?}"),
            NotifyRefused::Invalid { field, message } => write!(formatter, "{field} {message}"),
        }
    }
}

impl std::error::Error for NotifyRefused {}

/// A notification claimed for delivery, with what the dispatcher needs to deliver it.
#[derive(Clone)]
pub struct ClaimedNotification {
    pub id: String,
    pub owner_name: String,
    pub tool_id: String,
    pub tool_name: String,
    pub kind: ToolKind,
    /// The tool's sealed configuration; open it with the encryption key.
    pub sealed_config: Vec<u8>,
    pub title: Option<String>,
    pub message: String,
    pub source_job_id: Option<String>,
    /// The run of that job, while the job exists (for links).
    pub source_run_id: Option<String>,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
}

impl fmt::Debug for ClaimedNotification {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ClaimedNotification")
            .field("id", &self.id)
            .field("tool_id", &self.tool_id)
            .field("tool_name", &self.tool_name)
            .field("kind", &self.kind)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

const TOOL_COLUMNS: &str = "id, owner_id, name, kind, target_host, created_at, updated_at";

const NOTIFICATION_COLUMNS: &str = "id, owner_id, tool_id, tool_name, title, message, source_job_id, status, attempts, next_attempt_at, last_error, created_at, sent_at";

fn tool_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Tool> {
    let kind: String = row.try_get("kind")?;
    Ok(Tool {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        name: row.try_get("name")?,
        kind: ToolKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("tool kind {kind:?}")))?,
        target_host: row.try_get("target_host")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn notification_from_row(row: &sqlx::any::AnyRow) -> StoreResult<Notification> {
    let status: String = row.try_get("status")?;
    Ok(Notification {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        tool_id: row.try_get("tool_id")?,
        tool_name: row.try_get("tool_name")?,
        title: row.try_get("title")?,
        message: row.try_get("message")?,
        source_job_id: row.try_get("source_job_id")?,
        status: NotificationStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("notification status {status:?}")))?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
    })
}

/// Cuts an error text to what `last_error` keeps.
fn clip_error(error: &str) -> String {
    if error.chars().count() <= MAX_ERROR_CHARS {
        error.to_string()
    } else {
        let mut clipped: String = error.chars().take(MAX_ERROR_CHARS).collect();
        clipped.push('…');
        clipped
    }
}

/// Enqueues a notification through the owner's tool named `tool_name`, inside the caller's
/// transaction (use it in a `write_op!`). The outer `Result` is the database; the inner one says
/// whether the notification was accepted (its id) or refused and why.
///
/// The caller wakes the dispatcher after the transaction committed
/// (`AppState::notifier.notify_one()`, or use [`crate::tools::notify`]); without a wake-up the
/// dispatcher still finds the notification on its next poll (at most a few seconds later).
pub(crate) async fn enqueue_notification_in(
    conn: &mut AnyConnection,
    owner_id: &str,
    tool_name: &str,
    title: Option<&str>,
    message: &str,
    source_job_id: Option<&str>,
) -> StoreResult<Result<String, NotifyRefused>> {
    let title = title.map(str::trim).filter(|title| !title.is_empty());
    if title.is_some_and(|title| title.len() > MAX_TITLE_BYTES) {
        return Ok(Err(NotifyRefused::Invalid {
            field: "title",
            message: format!("is longer than {MAX_TITLE_BYTES} bytes"),
        }));
    }
    if message.trim().is_empty() {
        return Ok(Err(NotifyRefused::Invalid {
            field: "message",
            message: "must not be empty".into(),
        }));
    }
    if message.len() > MAX_MESSAGE_BYTES {
        return Ok(Err(NotifyRefused::Invalid {
            field: "message",
            message: format!("is longer than {MAX_MESSAGE_BYTES} bytes"),
        }));
    }
    let tool: Option<(String, String)> =
        sqlx::query_as("SELECT id, name FROM tools WHERE owner_id = $1 AND name = $2")
            .bind(owner_id)
            .bind(tool_name)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((tool_id, tool_name)) = tool else {
        return Ok(Err(NotifyRefused::UnknownTool(tool_name.to_string())));
    };
    let id = new_id();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO notifications (id, owner_id, tool_id, tool_name, title, message, source_job_id, status, attempts, next_attempt_at, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $9)",
    )
    .bind(&id)
    .bind(owner_id)
    .bind(tool_id)
    .bind(tool_name)
    .bind(title)
    .bind(message)
    .bind(source_job_id)
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(Ok(id))
}

impl Store {
    /// Creates a tool owned by `owner_id` with an already sealed configuration.
    pub async fn create_tool(
        &self,
        owner_id: &str,
        name: &str,
        kind: ToolKind,
        config: SealedConfig,
    ) -> StoreResult<Tool> {
        let (owner_id, name) = (owner_id.to_string(), name.to_string());
        let id = write_op!(self, |conn| async {
            let id = new_id();
            let now = now_ms();
            sqlx::query(
                "INSERT INTO tools (id, owner_id, name, kind, config, target_host, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&id)
            .bind(owner_id)
            .bind(name)
            .bind(kind.as_str())
            .bind(config.sealed)
            .bind(config.target_host)
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(id)
        })
        .await?;
        self.tool(&id).await
    }

    /// Renames a tool and/or replaces its configuration.
    pub async fn update_tool(&self, id: &str, change: ToolChange) -> StoreResult<Tool> {
        let tool_id = id.to_string();
        let id = tool_id.clone();
        write_op!(self, |conn| async {
            let (sealed, target_host) = match change.config {
                Some(config) => (Some(config.sealed), Some(config.target_host)),
                None => (None, None),
            };
            let changed = sqlx::query(
                "UPDATE tools SET name = COALESCE($1, name), config = COALESCE($2, config),
                 target_host = COALESCE($3, target_host), updated_at = $4 WHERE id = $5",
            )
            .bind(change.name)
            .bind(sealed)
            .bind(target_host)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await?;
        self.tool(&tool_id).await
    }

    /// Deletes a tool. Its pending notifications fail ("the tool was deleted"); the outbox keeps
    /// every notification with the tool's name.
    pub async fn delete_tool(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            sqlx::query(
                "UPDATE notifications SET status = 'failed', last_error = 'the tool was deleted'
                 WHERE tool_id = $1 AND status = 'pending'",
            )
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            let changed = sqlx::query("DELETE FROM tools WHERE id = $1")
                .bind(&id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    /// One tool by id.
    pub async fn tool(&self, id: &str) -> StoreResult<Tool> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOOL_COLUMNS} FROM tools WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        tool_from_row(&row)
    }

    /// Tools, all of them or only one owner's, by name.
    pub async fn tools(&self, owner_id: Option<&str>) -> StoreResult<Vec<Tool>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOOL_COLUMNS} FROM tools WHERE $1 IS NULL OR owner_id = $1 ORDER BY name, id"
        )))
        .bind(owner_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(tool_from_row).collect()
    }

    /// Enqueues a notification in its own transaction; see [`enqueue_notification_in`].
    pub async fn enqueue_notification(
        &self,
        owner_id: &str,
        tool_name: &str,
        title: Option<&str>,
        message: &str,
        source_job_id: Option<&str>,
    ) -> StoreResult<Result<String, NotifyRefused>> {
        let (owner_id, tool_name, title, message, source_job_id) = (
            owner_id.to_string(),
            tool_name.to_string(),
            title.map(str::to_string),
            message.to_string(),
            source_job_id.map(str::to_string),
        );
        write_op!(self, |conn| async {
            enqueue_notification_in(
                conn,
                &owner_id,
                &tool_name,
                title.as_deref(),
                &message,
                source_job_id.as_deref(),
            )
            .await
        })
        .await
    }

    /// One notification by id.
    pub async fn notification(&self, id: &str) -> StoreResult<Notification> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        notification_from_row(&row)
    }

    /// The newest notifications, all or one owner's, optionally of one status.
    pub async fn notifications(
        &self,
        owner_id: Option<&str>,
        status: Option<NotificationStatus>,
        limit: u32,
    ) -> StoreResult<Vec<Notification>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {NOTIFICATION_COLUMNS} FROM notifications
             WHERE ($1 IS NULL OR owner_id = $1) AND ($2 IS NULL OR status = $2)
             ORDER BY created_at DESC, id DESC LIMIT $3"
        )))
        .bind(owner_id)
        .bind(status.map(NotificationStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(notification_from_row).collect()
    }

    /// Claims up to `limit` pending notifications due at `now`: counts the attempt and moves
    /// `next_attempt_at` to `lease_until`, so a crash during delivery retries them afterwards.
    /// Notifications whose tool is gone fail here.
    pub async fn claim_notifications(
        &self,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> StoreResult<Vec<ClaimedNotification>> {
        write_op!(self, |conn| async {
            let ids: Vec<String> = sqlx::query_scalar(
                "UPDATE notifications SET attempts = attempts + 1, next_attempt_at = $1
                 WHERE id IN (SELECT id FROM notifications WHERE status = 'pending' AND next_attempt_at <= $2
                              ORDER BY next_attempt_at, id LIMIT $3)
                 RETURNING id",
            )
            .bind(lease_until)
            .bind(now)
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await?;
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                let row = sqlx::query(
                    "SELECT n.id, n.title, n.message, n.source_job_id, n.attempts, n.tool_id, n.tool_name,
                            t.kind, t.config, u.username, j.run_id
                     FROM notifications n JOIN users u ON u.id = n.owner_id
                     LEFT JOIN tools t ON t.id = n.tool_id
                     LEFT JOIN jobs j ON j.id = n.source_job_id
                     WHERE n.id = $1",
                )
                .bind(&id)
                .fetch_one(&mut *conn)
                .await?;
                let kind: Option<String> = row.try_get("kind")?;
                let tool_id: Option<String> = row.try_get("tool_id")?;
                let (Some(kind), Some(tool_id)) = (kind, tool_id) else {
                    sqlx::query(
                        "UPDATE notifications SET status = 'failed', last_error = 'the tool was deleted' WHERE id = $1",
                    )
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
                    continue;
                };
                claimed.push(ClaimedNotification {
                    id,
                    owner_name: row.try_get("username")?,
                    tool_id,
                    tool_name: row.try_get("tool_name")?,
                    kind: ToolKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("tool kind {kind:?}")))?,
                    sealed_config: row.try_get("config")?,
                    title: row.try_get("title")?,
                    message: row.try_get("message")?,
                    source_job_id: row.try_get("source_job_id")?,
                    source_run_id: row.try_get("run_id")?,
                    attempt: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                });
            }
            Ok(claimed)
        })
        .await
    }

    /// When the next pending notification is due (or its claim ends), if any is pending.
    pub async fn next_notification_due(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM notifications WHERE status = 'pending'",
        )
        .fetch_one(&self.reader)
        .await?)
    }

    /// Records a successful delivery.
    pub async fn mark_notification_sent(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            sqlx::query(
                "UPDATE notifications SET status = 'sent', sent_at = $1, last_error = NULL
                 WHERE id = $2 AND status = 'pending'",
            )
            .bind(now_ms())
            .bind(id)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Records a failed attempt that will be retried at `next_attempt_at`.
    pub async fn retry_notification(
        &self,
        id: &str,
        next_attempt_at: i64,
        error: &str,
    ) -> StoreResult<()> {
        let (id, error) = (id.to_string(), clip_error(error));
        write_op!(self, |conn| async {
            sqlx::query(
                "UPDATE notifications SET next_attempt_at = $1, last_error = $2
                 WHERE id = $3 AND status = 'pending'",
            )
            .bind(next_attempt_at)
            .bind(error)
            .bind(id)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Gives a notification up.
    pub async fn fail_notification(&self, id: &str, error: &str) -> StoreResult<()> {
        let (id, error) = (id.to_string(), clip_error(error));
        write_op!(self, |conn| async {
            sqlx::query(
                "UPDATE notifications SET status = 'failed', last_error = $1
                 WHERE id = $2 AND status = 'pending'",
            )
            .bind(error)
            .bind(id)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Hands back claims whose delivery was interrupted by a shutdown: the attempt does not
    /// count and the notifications are due at once (on the next start).
    pub async fn release_notifications(&self, ids: &[String]) -> StoreResult<()> {
        let ids = ids.to_vec();
        write_op!(self, |conn| async {
            let now = now_ms();
            for id in ids {
                sqlx::query(
                    "UPDATE notifications SET attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, next_attempt_at = $1
                     WHERE id = $2 AND status = 'pending'",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            }
            Ok(())
        })
        .await
    }

    /// The sealed configuration column of a tool, as stored (tests check it holds no plaintext).
    #[cfg(test)]
    pub(crate) async fn sealed_tool_config(&self, id: &str) -> StoreResult<Vec<u8>> {
        Ok(sqlx::query_scalar("SELECT config FROM tools WHERE id = $1")
            .bind(id)
            .fetch_one(&self.reader)
            .await?)
    }
}
