//! The dispatcher: wakes runners when jobs the claim rules held back become claimable, and
//! skips jobs whose agent is offline when their batch starts.
//!
//! Agents claim only when woken (`WorkAvailable`), and the claim rules (`store::dispatch`) hold
//! jobs back: a retry waits for its `not_before`, a batch for the one before it, a job for a
//! free slot under its event's concurrency limit. This task owns the wake-ups those need: it
//! sleeps until the earliest `not_before` (read from the store, so a restart keeps every delay)
//! and follows the jobs' change notifications to wake the runners of held-back jobs when a job
//! of the same event ends. Extra wake-ups are harmless: a claim that finds nothing returns
//! nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{info, warn};

use crate::AppState;
use crate::store::jobs::SSH_RUNNER_PREFIX;
use crate::store::now_ms;

/// Longest sleep without a check (a safety net; every change also wakes the task).
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How often jobs waiting for an offline agent are looked for and checked against their
/// deadline (not at every read of the timers: while agents work through a queue, the timers are
/// read ten times a second).
const OFFLINE_CHECK: Duration = Duration::from_secs(1);

/// Most change notifications handled in one pass.
const MAX_CHANGES: usize = 4096;

/// Shortest time between two passes woken by changes: a fan-out announces thousands of job
/// changes one by one, and a pass costs several queries; changes that arrive sooner are
/// gathered into the next pass. A change after a quiet moment is handled at once.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(5);

/// Longest a change waits for the timers to be read again: a pass woken by job changes reads
/// the due retries, the next due time and the offline waits only when they were last read at
/// least this long ago (otherwise the next pass is due by then), so that a stream of changes
/// (every few milliseconds while agents work through a queue) costs one query per pass rather
/// than four. A retry queued by a change is thus found up to this much later than its
/// `not_before`.
const TIMER_READ_INTERVAL: Duration = Duration::from_millis(100);

/// Tells a runner that it may have work: an agent through its control stream, the SSH worker
/// for `ssh:` runners, the control plane's own worker (`actions/`) for `control-plane`.
pub fn wake_runner(state: &AppState, runner: &str) {
    if runner.starts_with(SSH_RUNNER_PREFIX) {
        state.ssh.wake();
    } else if runner == crate::store::jobs::CONTROL_PLANE_RUNNER {
        state.actions.wake();
    } else {
        state.registry.wake(runner);
    }
}

fn wake_all(state: &AppState, runners: Vec<String>) {
    for runner in runners.iter().collect::<BTreeSet<_>>() {
        wake_runner(state, runner);
    }
}

/// The dispatcher task; runs until shutdown.
pub async fn run(state: AppState) {
    let mut changes = state.job_events.subscribe();
    // The first pass wakes every runner with a delayed job that is already due (after a
    // restart) and every runner with held-back jobs.
    let mut watermark = i64::MIN;
    let mut lagged = true;
    let mut changed: Vec<Arc<str>> = Vec::new();
    // When the timers (due retries, next due time, offline waits) were last read, and when they
    // must be read next.
    let mut timers_read_at: Option<tokio::time::Instant> = None;
    let mut timers_due = tokio::time::Instant::now();
    let mut offline = OfflineCheck::default();
    loop {
        let last_pass = tokio::time::Instant::now();
        let now = now_ms();
        let read_timers = lagged
            || last_pass >= timers_due
            || timers_read_at.is_none_or(|read| last_pass >= read + TIMER_READ_INTERVAL);
        if read_timers {
            match state.store.runners_due(watermark, now).await {
                Ok(runners) => {
                    watermark = now;
                    wake_all(&state, runners);
                }
                Err(error) => warn!(%error, "could not read the due retries"),
            }
        }
        if lagged {
            match state.store.runners_held_back(now).await {
                Ok(runners) => {
                    lagged = false;
                    wake_all(&state, runners);
                }
                Err(error) => warn!(%error, "could not read the held-back jobs"),
            }
        }
        if !changed.is_empty() {
            let ids: Vec<String> = changed
                .drain(..)
                .map(|id| id.to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            match state.store.runners_to_wake(&ids, now).await {
                Ok(runners) => wake_all(&state, runners),
                Err(error) => {
                    warn!(%error, "could not read the runners to wake");
                    lagged = true;
                }
            }
        }
        if read_timers {
            timers_read_at = Some(last_pass);
            timers_due = last_pass + read_timers_once(&state, now, &mut offline).await;
        } else if let Some(read) = timers_read_at {
            // The changes may have queued a retry or a job that waits for an offline agent.
            timers_due = timers_due.min(read + TIMER_READ_INTERVAL);
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(timers_due) => {}
            received = changes.recv() => {
                match received {
                    Ok(id) => changed.push(id),
                    Err(RecvError::Lagged(_)) => lagged = true,
                    Err(RecvError::Closed) => return,
                }
                // Right after a pass, gather what else arrives until the interval is over.
                let gather_until = last_pass + MIN_PASS_INTERVAL;
                loop {
                    while changed.len() < MAX_CHANGES {
                        match changes.try_recv() {
                            Ok(id) => changed.push(id),
                            Err(TryRecvError::Lagged(_)) => lagged = true,
                            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                        }
                    }
                    if changed.len() >= MAX_CHANGES || tokio::time::Instant::now() >= gather_until {
                        break;
                    }
                    tokio::select! {
                        _ = state.shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(gather_until) => {}
                    }
                }
            }
        }
    }
}

/// When the jobs waiting for offline agents were last looked for, and whether there were any.
#[derive(Default)]
struct OfflineCheck {
    read_at: Option<tokio::time::Instant>,
    waiting: bool,
}

impl OfflineCheck {
    /// Whether a look is due at `now`: the first one, then every [`OFFLINE_CHECK`].
    fn due(&self, now: tokio::time::Instant) -> bool {
        self.read_at.is_none_or(|read| now >= read + OFFLINE_CHECK)
    }

    /// The longest sleep from `now` that does not delay the next look: until it is due while
    /// jobs wait or when the look was skipped at `now` (a job created since may wait), any
    /// length right after a look that found nothing waiting.
    fn sleep_cap(&self, now: tokio::time::Instant) -> Duration {
        match self.read_at {
            None => Duration::ZERO,
            Some(read) if self.waiting || read != now => {
                (read + OFFLINE_CHECK).saturating_duration_since(now)
            }
            Some(_) => Duration::MAX,
        }
    }
}

/// Skips the jobs of offline agents whose wait is over (looked for at most every
/// [`OFFLINE_CHECK`]), and returns how long the dispatcher may sleep before the timers are due
/// again: until the next due retry, at most [`IDLE_CHECK`], at most [`OFFLINE_CHECK`] while
/// jobs wait for offline agents, and no later than the next look when this one was skipped.
async fn read_timers_once(state: &AppState, now: i64, offline: &mut OfflineCheck) -> Duration {
    let started = tokio::time::Instant::now();
    if offline.due(started) {
        offline.read_at = Some(started);
        offline.waiting = match state.store.any_offline_wait().await {
            Ok(waiting) => waiting,
            Err(error) => {
                warn!(%error, "could not read the jobs waiting for offline agents");
                true
            }
        };
        if offline.waiting {
            skip_offline(state, now).await;
        }
    }
    let mut sleep = IDLE_CHECK.min(offline.sleep_cap(started));
    match state.store.next_due(now).await {
        Ok(Some(next)) => {
            sleep = sleep.min(Duration::from_millis((next - now).max(0) as u64));
        }
        Ok(None) => {}
        Err(error) => {
            warn!(%error, "could not read the next due retry");
            sleep = sleep.min(OFFLINE_CHECK);
        }
    }
    sleep
}

/// Skips the jobs whose batch started at least their offline wait ago while their agent (every
/// candidate of a pool job) is offline.
async fn skip_offline(state: &AppState, now: i64) {
    let candidates = match state.store.offline_candidates(now).await {
        Ok(candidates) => candidates,
        Err(error) => {
            warn!(%error, "could not read the jobs waiting for offline agents");
            return;
        }
    };
    // Agents connected to another replica (PostgreSQL) are online too.
    let remote: Vec<String> = candidates
        .iter()
        .filter(|(_, agent_id)| state.registry.connection(agent_id).is_none())
        .map(|(_, agent_id)| agent_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let elsewhere = crate::replicas::presence::connected_elsewhere(state, &remote).await;
    // A pool job has a pair per candidate: it waits while any of them is online.
    let online: BTreeSet<&str> = candidates
        .iter()
        .filter(|(_, agent_id)| {
            state.registry.connection(agent_id).is_some() || elsewhere.contains(agent_id)
        })
        .map(|(job_id, _)| job_id.as_str())
        .collect();
    let offline: Vec<String> = candidates
        .iter()
        .map(|(job_id, _)| job_id.as_str())
        .filter(|job_id| !online.contains(job_id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    if offline.is_empty() {
        return;
    }
    match state.store.skip_offline(&offline).await {
        Ok(skipped) => {
            for job_id in &skipped {
                info!(%job_id, "skipped: its agent is offline");
                // Followers see the end; this task sees it too and opens the next batch.
                state.job_events.notify(job_id);
            }
        }
        Err(error) => warn!(%error, "could not skip the jobs of offline agents"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_waiting_for_offline_agents_are_looked_for_at_most_every_offline_check() {
        let start = tokio::time::Instant::now();
        let mut check = OfflineCheck::default();
        assert!(check.due(start), "the first pass looks");
        assert_eq!(check.sleep_cap(start), Duration::ZERO);

        // A look that found nothing: the dispatcher may sleep as long as it likes.
        check.read_at = Some(start);
        check.waiting = false;
        assert_eq!(check.sleep_cap(start), Duration::MAX);

        // A pass soon after does not look again, and sleeps no longer than until the next look.
        let soon = start + Duration::from_millis(300);
        assert!(!check.due(soon));
        assert_eq!(check.sleep_cap(soon), Duration::from_millis(700));
        let later = start + OFFLINE_CHECK;
        assert!(check.due(later));

        // While jobs wait, every look is followed by the next one an OFFLINE_CHECK later.
        check.waiting = true;
        assert_eq!(check.sleep_cap(start), OFFLINE_CHECK);
        assert_eq!(check.sleep_cap(soon), Duration::from_millis(700));
        assert_eq!(check.sleep_cap(later + OFFLINE_CHECK), Duration::ZERO);
    }
}
