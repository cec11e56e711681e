//! The "a control plane runs on this database" lock on PostgreSQL: a session-level advisory lock
//! on a connection of its own. Every running control plane holds it shared, `cronium keys
//! rotate` exclusively, so a rotation never runs under a control plane that keeps the old key in
//! memory, and a control plane never starts during one. PostgreSQL releases it when the
//! connection closes, also when the process dies. (On SQLite the same lock is a file next to the
//! database: `crate::running_lock_path`.)

use sqlx::Connection;

use super::{StoreError, StoreResult};

/// The advisory lock key: the bytes "cronium" as a number, one per database.
const KEY: i64 = 0x0063_726f_6e69_756d;

/// A held advisory lock; released when dropped (its connection closes).
#[derive(Debug)]
pub struct AdvisoryLock {
    _connection: sqlx::AnyConnection,
}

/// Which way the lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A running control plane: any number at once.
    Shared,
    /// `cronium keys rotate`: alone.
    Exclusive,
}

/// Tries to take the lock on the PostgreSQL database at `url`; `None` when it is held the other
/// way (or, exclusive, at all).
pub async fn try_advisory_lock(url: &str, mode: LockMode) -> StoreResult<Option<AdvisoryLock>> {
    sqlx::any::install_default_drivers();
    let mut connection = sqlx::AnyConnection::connect(url)
        .await
        .map_err(StoreError::from)?;
    let statement = match mode {
        LockMode::Shared => "SELECT CASE WHEN pg_try_advisory_lock_shared($1) THEN 1 ELSE 0 END",
        LockMode::Exclusive => "SELECT CASE WHEN pg_try_advisory_lock($1) THEN 1 ELSE 0 END",
    };
    let taken: i64 = sqlx::query_scalar(statement)
        .bind(KEY)
        .fetch_one(&mut connection)
        .await?;
    if taken == 0 {
        connection.close().await?;
        return Ok(None);
    }
    Ok(Some(AdvisoryLock {
        _connection: connection,
    }))
}
