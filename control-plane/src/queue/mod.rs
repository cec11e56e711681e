//! The queue around the store: change notifications for live log followers, and the lease
//! sweeper that settles attempts whose agents went silent.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tracing::{debug, info, warn};

use crate::AppState;
use crate::store::now_ms;

/// Broadcasts the id of every job whose status or log changed. Followers filter by id and
/// re-read the store, so a lagging receiver only needs to re-read.
/// On PostgreSQL every change is also sent to the other replicas (`crate::replicas`), whose
/// followers may watch the job.
#[derive(Clone)]
pub struct JobEvents {
    sender: broadcast::Sender<Arc<str>>,
    outbox: crate::replicas::Outbox,
}

impl Default for JobEvents {
    fn default() -> Self {
        JobEvents::with_outbox(crate::replicas::Outbox::default())
    }
}

impl JobEvents {
    /// Job notifications that are also handed to `outbox` for the other replicas.
    pub fn with_outbox(outbox: crate::replicas::Outbox) -> JobEvents {
        JobEvents {
            sender: broadcast::channel(4096).0,
            outbox,
        }
    }

    pub fn notify(&self, job_id: &str) {
        self.notify_local(job_id);
        self.outbox
            .send(crate::replicas::Signal::Job(job_id.to_owned()));
    }

    /// Announces a change to this replica's followers only (a change another replica made).
    pub fn notify_local(&self, job_id: &str) {
        // No receiver is fine: nobody follows this job.
        let _ = self.sender.send(Arc::from(job_id));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }
}

/// How long a live follower (a job's log, a run's events) waits for a change before it re-reads
/// the store regardless: the safety net for changes nobody announced.
pub const FOLLOW_REREAD: Duration = Duration::from_secs(5);

/// Why a follower woke up.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// A job it watches changed.
    Job(Arc<str>),
    /// Changes were missed (the receiver lagged) or none came for [`FOLLOW_REREAD`]: re-read all.
    Reread,
}

/// Waits for a change to a job `wanted` accepts, at most [`FOLLOW_REREAD`].
pub async fn next_change(
    changes: &mut broadcast::Receiver<Arc<str>>,
    mut wanted: impl FnMut(&str) -> bool,
) -> Wake {
    let wait = async {
        loop {
            match changes.recv().await {
                Ok(changed) if wanted(&changed) => return Wake::Job(changed),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => return Wake::Reread,
                // The sender lives as long as the state: only the timer is left.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    };
    tokio::time::timeout(FOLLOW_REREAD, wait)
        .await
        .unwrap_or(Wake::Reread)
}

/// Settles expired leases: every second, or at once when `wake` is notified. Re-queued jobs
/// wake their agent; settled ones wake their followers.
pub async fn sweep_leases(state: AppState, wake: Arc<Notify>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set while the database is unreachable or stalled: no heartbeat could renew a lease
    // meanwhile.
    let mut outage = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
            _ = state.shutdown.cancelled() => return,
        }
        if outage {
            // The database is back (or this fails like the sweep did): as after a restart,
            // running attempts get a full lease for their agents' heartbeats to reach the
            // store again before any of them counts as lost.
            let lease_ms = state.config.lease.as_millis() as i64;
            let lease_until = now_ms() + lease_ms;
            match state.store.extend_active_leases(lease_until).await {
                // A write that waited for the database to come back may have used up much of
                // the new lease: give it again from now.
                Ok(_) if lease_until - now_ms() < lease_ms / 2 => continue,
                Ok(extended) => {
                    outage = false;
                    info!(
                        jobs = extended,
                        "the database answers again: extended the leases of running jobs"
                    );
                }
                Err(error) => {
                    debug!(%error, "the database is still unavailable");
                    continue;
                }
            }
        }
        let sweep_started = tokio::time::Instant::now();
        let swept = state.store.expire_leases(now_ms()).await;
        // A sweep that waited longer than a heartbeat period for the database (it was
        // restarting: the write waited for a connection) means heartbeats could not renew
        // leases meanwhile either. This sweep compared with the time it started, so it settled
        // nothing that expired while it waited; the next one extends the leases first.
        if sweep_started.elapsed() > state.config.heartbeat && !outage {
            warn!(
                waited = ?sweep_started.elapsed(),
                "the lease sweep waited for the database; extending leases before the next one"
            );
            outage = true;
        }
        match swept {
            Ok(expired) => {
                for job in expired {
                    info!(job_id = %job.job_id, agent_id = %job.agent_id, requeued = job.requeued, "lease expired");
                    if job.requeued && job.candidates.is_empty() {
                        // Its runner: an agent, or the SSH or control-plane worker.
                        crate::dispatch::wake_runner(&state, &job.agent_id);
                    } else if job.requeued {
                        // A pool job is back in the pool: any candidate may claim it.
                        for agent_id in &job.candidates {
                            state.registry.wake(agent_id);
                        }
                    }
                    if job.notified {
                        state.notifier.notify_one();
                    }
                    state.job_events.notify(&job.job_id);
                }
            }
            Err(error @ crate::store::StoreError::Unavailable(_)) => {
                if !outage {
                    warn!(%error, "lease sweep failed: the database is unavailable");
                }
                outage = true;
            }
            Err(error) => warn!(%error, "lease sweep failed"),
        }
    }
}

/// Persists the last-seen times of connected agents every `period`.
pub async fn record_last_seen(state: AppState, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => break,
        }
        if let Err(error) = state
            .store
            .record_last_seen(&state.registry.snapshot())
            .await
        {
            warn!(%error, "could not record last-seen times");
        }
    }
}
