//! Whether the database answers: [`watch`] asks it every second and keeps the answer in
//! [`DatabaseHealth`], which `GET /healthz` reports (so the unauthenticated probe never queries
//! the database itself) and which logs each change once (down, then back).
//!
//! Nothing waits on this state: every request still finds out on its own (a store error, HTTP
//! 503), and the pools replace dead connections by themselves when the database is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Store, StoreResult};

/// How often [`watch`] asks the database.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// An answer slower than this counts as none.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The last answer of [`watch`]: whether the database answered a query.
#[derive(Debug)]
pub struct DatabaseHealth {
    reachable: AtomicBool,
}

impl Default for DatabaseHealth {
    /// Reachable: the control plane starts only after it opened its database.
    fn default() -> DatabaseHealth {
        DatabaseHealth {
            reachable: AtomicBool::new(true),
        }
    }
}

impl DatabaseHealth {
    /// Whether the database answered the last check.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Records a check's outcome; returns whether it changed.
    fn set(&self, reachable: bool) -> bool {
        self.reachable.swap(reachable, Ordering::Relaxed) != reachable
    }
}

impl Store {
    /// Runs `SELECT 1` on a reading connection.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// Asks the database every second until `shutdown` and records the answer in `health`; logs
/// when the database stops answering and when it answers again.
pub async fn watch(
    store: Store,
    health: std::sync::Arc<DatabaseHealth>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let answered = tokio::select! {
            answered = tokio::time::timeout(CHECK_TIMEOUT, store.ping()) => answered,
            _ = shutdown.cancelled() => return,
        };
        match answered {
            Ok(Ok(())) => {
                if health.set(true) {
                    tracing::info!("the database answers again");
                }
            }
            Ok(Err(error)) => {
                if health.set(false) {
                    tracing::warn!(%error, "the database does not answer");
                }
            }
            Err(_) => {
                if health.set(false) {
                    tracing::warn!(timeout = ?CHECK_TIMEOUT, "the database does not answer");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once() {
        let health = DatabaseHealth::default();
        assert!(health.reachable());
        assert!(!health.set(true));
        assert!(health.set(false));
        assert!(!health.reachable());
        assert!(!health.set(false));
        assert!(health.set(true));
    }
}
