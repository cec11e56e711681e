//! All SQL lives here. Handlers, the QUIC sessions and the scheduler call the typed functions of
//! the submodules; nothing else in the crate writes a query.
//!
//! SQLite runs in WAL mode with `synchronous=FULL`: a commit that returned is on disk. Writes go
//! through a pool with a single connection (SQLite has one writer anyway; this turns lock
//! contention into queueing), reads through a separate pool of several connections.

pub mod agents;
pub mod events;
pub mod jobs;
pub mod users;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use thiserror::Error;

/// Errors of the store, by what the caller can do about them.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The row does not exist (or is not visible to the caller).
    #[error("not found")]
    NotFound,
    /// A uniqueness or check constraint refused the write; the name says which.
    #[error("constraint violated: {0}")]
    Constraint(String),
    /// The database could not be reached or is busy beyond the timeout.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// Anything else the database reported.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// A stored value could not be decoded (a bug or a hand-edited database).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        match &error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() || db.is_check_violation() => {
                StoreError::Constraint(db.message().to_string())
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(error)
            }
            _ => StoreError::Database(error),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Handle to the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// The single writing connection.
    writer: SqlitePool,
    /// Connections for reads.
    reader: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies the migrations.
    pub async fn open_sqlite(path: &Path) -> StoreResult<Store> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(StoreError::Database)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|error| StoreError::Database(error.into()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Store { writer, reader })
    }

    /// Closes both pools, waiting for connections in use.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// Records an audit entry.
    pub async fn audit(
        &self,
        kind: &str,
        actor: Option<&str>,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO audit_log (at, kind, actor, detail) VALUES (?, ?, ?, ?)")
            .bind(now_ms())
            .bind(kind)
            .bind(actor)
            .bind(detail.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Counts audit entries of one kind (for tests and metrics).
    pub async fn count_audit(&self, kind: &str) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE kind = ?")
                .bind(kind)
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// The stored key check, if the database has one.
    pub async fn key_check(&self) -> StoreResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM key_check WHERE id = 1")
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// Stores the key check on first start.
    pub async fn set_key_check(&self, sealed: &[u8]) -> StoreResult<()> {
        sqlx::query("INSERT INTO key_check (id, sealed, created_at) VALUES (1, ?, ?)")
            .bind(sealed)
            .bind(now_ms())
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A new time-ordered unique id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests;
