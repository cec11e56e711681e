//! The scheduler's leader: on PostgreSQL the scheduler runs only on the replica holding the
//! leader advisory lock (`store::cluster::LeaderLock`, a session lock on a connection of its
//! own, another key than the running lock). The others try to take it every
//! [`RETRY_INTERVAL`] and take over when the leader's session ends (the process died, or its
//! connection was lost). The leader checks its session every [`CHECK_INTERVAL`] and stops
//! scheduling when it is gone. Two schedulers overlapping for a moment fire no slot twice:
//! `Store::handle_slot` records each slot at most once. On SQLite the one control plane always
//! leads.
//!
//! A schedule changed on a follower (`AppState::schedules`) is sent on to the leader
//! (`Signal::Schedules`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Signal;
use crate::AppState;
use crate::store::cluster::LeaderLock;

/// How often a follower tries to take the leader lock.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// How often the leader checks that its lock's session is alive.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Leadership of the scheduler, held until [`Leadership::lost`] is cancelled (lost lock or
/// shutdown).
pub struct Leadership {
    lost: CancellationToken,
}

impl Leadership {
    /// Cancelled when this replica no longer leads (or shuts down).
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Releases the lock (the watcher task drops it).
        self.lost.cancel();
    }
}

/// Waits until this replica leads the scheduler; `None` at shutdown.
pub async fn acquire(state: &AppState) -> Option<Leadership> {
    let Some(url) = state.replicas.postgres_url().map(str::to_owned) else {
        // SQLite: the only control plane.
        state.replicas.set_leader(true);
        return (!state.shutdown.is_cancelled()).then(|| Leadership {
            lost: state.shutdown.child_token(),
        });
    };
    let mut warned = false;
    loop {
        // After shutdown a fresh lock would make a leadership that is lost at once (its token is
        // a child of the cancelled shutdown): the scheduler would take it again and again.
        if state.shutdown.is_cancelled() {
            return None;
        }
        match LeaderLock::try_take(&url).await {
            Ok(Some(lock)) => {
                let lost = state.shutdown.child_token();
                state.replicas.set_leader(true);
                info!(replica = %state.replicas.id(), "this replica leads the scheduler");
                state.tasks.spawn(watch(state.clone(), lock, lost.clone()));
                return Some(Leadership { lost });
            }
            Ok(None) => warned = false,
            Err(error) => {
                if !warned {
                    warn!(%error, "could not try the scheduler leader lock; retrying");
                }
                warned = true;
            }
        }
        let retry = tokio::time::sleep(RETRY_INTERVAL);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return None,
                _ = &mut retry => break,
                // A schedule changed here: the leader (elsewhere) must re-read.
                _ = state.schedules.notified() => state.replicas.outbox().send(Signal::Schedules),
            }
        }
    }
}

/// Holds the lock while `lost` is not cancelled; cancels it when the lock's session is gone.
async fn watch(state: AppState, mut lock: LeaderLock, lost: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = lost.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(error) = lock.check().await {
            warn!(%error, "lost the scheduler leader lock; scheduling stops here");
            break;
        }
    }
    state.replicas.set_leader(false);
    lost.cancel();
    drop(lock);
}
