//! The "a control plane runs on this database" lock on PostgreSQL: a session-level advisory lock
//! on a connection of its own. Every running control plane holds it shared, `cronium keys
//! rotate` exclusively, so a rotation never runs under a control plane that keeps the old key in
//! memory, and a control plane never starts during one. PostgreSQL releases it when the
//! connection closes, also when the process dies. (On SQLite the same lock is a file next to the
//! database: `crate::running_lock_path`.)
//!
//! The session ends too when PostgreSQL restarts or the connection is cut, and with it the lock:
//! [`keep_shared`] checks the session every second and takes the lock again on a new one as soon
//! as the database answers, so `keys rotate` stays refused while the control plane serves.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{StoreError, StoreResult};

/// The advisory lock key: the bytes "cronium" as a number, one per database.
const KEY: i64 = 0x0063_726f_6e69_756d;

/// How often [`keep_shared`] checks that the lock's session is alive.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Bound of one check or one attempt to take the lock again.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A held advisory lock; released when the last clone is dropped (its connection closes).
/// Clones share the one session: [`keep_shared`] replaces it when it dies.
#[derive(Debug, Clone)]
pub struct AdvisoryLock {
    url: Arc<str>,
    mode: LockMode,
    /// The session holding the lock; `None` while it is lost and not taken again yet.
    connection: Arc<Mutex<Option<sqlx::AnyConnection>>>,
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
    Ok(lock_session(url, mode)
        .await?
        .map(|connection| AdvisoryLock {
            url: Arc::from(url),
            mode,
            connection: Arc::new(Mutex::new(Some(connection))),
        }))
}

/// A new session that holds the lock, or `None` when it is held the other way.
async fn lock_session(url: &str, mode: LockMode) -> StoreResult<Option<sqlx::AnyConnection>> {
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
    Ok(Some(connection))
}

impl AdvisoryLock {
    /// Releases the lock before returning: unlocked on its session, then the session closed.
    /// (Dropping the last clone only closes the socket; the server releases the lock when it
    /// notices, which may be after the next command already tried to take it.)
    pub async fn release(self) -> StoreResult<()> {
        let connection = self.connection.lock().await.take();
        if let Some(mut connection) = connection {
            let unlock = match self.mode {
                LockMode::Shared => {
                    "SELECT CASE WHEN pg_advisory_unlock_shared($1) THEN 1 ELSE 0 END"
                }
                LockMode::Exclusive => "SELECT CASE WHEN pg_advisory_unlock($1) THEN 1 ELSE 0 END",
            };
            let _: i64 = sqlx::query_scalar(unlock)
                .bind(KEY)
                .fetch_one(&mut connection)
                .await?;
            connection.close().await?;
        }
        Ok(())
    }

    /// Whether a live session holds the lock right now (a query on it answered).
    pub async fn is_held(&self) -> bool {
        let mut connection = self.connection.lock().await;
        match connection.as_mut() {
            Some(connection) => tokio::time::timeout(CHECK_TIMEOUT, connection.ping())
                .await
                .is_ok_and(|pinged| pinged.is_ok()),
            None => false,
        }
    }

    /// Checks the session; when it died, takes the lock again on a new one. Returns what
    /// happened, for [`keep_shared`] to log.
    async fn check(&self) -> Check {
        if self.is_held().await {
            return Check::Held;
        }
        let mut connection = self.connection.lock().await;
        let lost_now = connection.take().is_some();
        match tokio::time::timeout(CHECK_TIMEOUT, lock_session(&self.url, self.mode)).await {
            Ok(Ok(Some(session))) => {
                *connection = Some(session);
                Check::Retaken
            }
            Ok(Ok(None)) => Check::HeldTheOtherWay { lost_now },
            Ok(Err(error)) => Check::Unreachable {
                lost_now,
                error: error.to_string(),
            },
            Err(_) => Check::Unreachable {
                lost_now,
                error: "no answer in time".into(),
            },
        }
    }
}

/// The outcome of one [`AdvisoryLock::check`].
enum Check {
    Held,
    Retaken,
    HeldTheOtherWay { lost_now: bool },
    Unreachable { lost_now: bool, error: String },
}

/// Keeps a control plane's shared lock held until `shutdown`: checks its session every second
/// and, once it died (PostgreSQL restarted, the connection was cut), takes the lock again as
/// soon as the database answers, logging both. If `cronium keys rotate` took the lock in
/// between, the lock cannot be taken again; that is logged as an error (this process keeps the
/// old key in memory: it must be restarted with the new one) and retried every second.
pub async fn keep_shared(lock: AdvisoryLock, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_logged = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let check = tokio::select! {
            check = lock.check() => check,
            _ = shutdown.cancelled() => return,
        };
        match check {
            Check::Held => {}
            Check::Retaken => {
                refused_logged = false;
                tracing::info!("took the running lock on PostgreSQL again");
            }
            Check::HeldTheOtherWay { lost_now } => {
                if lost_now {
                    tracing::warn!("the PostgreSQL session holding the running lock ended");
                }
                if !refused_logged {
                    refused_logged = true;
                    tracing::error!(
                        "cannot take the running lock on PostgreSQL again: `cronium keys rotate` \
                         holds it; restart this control plane with the new key once it is done"
                    );
                }
            }
            Check::Unreachable { lost_now, error } => {
                if lost_now {
                    tracing::warn!(
                        %error,
                        "the PostgreSQL session holding the running lock ended; taking it again \
                         once the database answers"
                    );
                } else {
                    tracing::debug!(%error, "the database does not answer yet");
                }
            }
        }
    }
}
