//! The attempts the agent holds: running ones and finished ones whose result is not yet
//! acknowledged by the control plane.
//!
//! [`Jobs`] is a cheap handle shared by the connection loop (which starts, cancels and abandons
//! attempts and reports them in hellos and heartbeats) and the per-attempt tasks. Every attempt
//! has two tasks, both on the handle's [`TaskTracker`]: the job task runs the script through the
//! [`Runner`] and stores the result in the spool, and the uploader (see `conn::upload`) streams
//! the spool to the control plane and deletes it once the result is acknowledged. An attempt
//! leaves the table only when its uploader is done.

use std::collections::BTreeMap;
use std::sync::Arc;

use cronium_protocol::{AttemptRef, JobSpec};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::runner::{Runner, StopReason};
use crate::spool::{AttemptSpool, Spool, SpoolSpec};

/// Shared handle on the agent's attempts.
#[derive(Clone)]
pub(crate) struct Jobs {
    inner: Arc<JobsInner>,
}

struct JobsInner {
    spool: Spool,
    runner: Arc<dyn Runner>,
    capacity: u32,
    max_log_bytes: u64,
    table: watch::Sender<Table>,
    /// Owns every job and uploader task; `lib::run` waits for it before returning.
    tracker: TaskTracker,
    /// Cancelled when the agent exits: uploaders stop waiting for a connection and end.
    exit: CancellationToken,
    /// The current connection (`None` while disconnected), published by the connection loop.
    connection: watch::Receiver<Option<quinn::Connection>>,
    /// Notified (one permit) whenever a job's process ends or an attempt is forgotten: a slot
    /// may be free again.
    slot_freed: Notify,
}

#[derive(Default)]
struct Table {
    attempts: BTreeMap<AttemptRef, Arc<Attempt>>,
    /// Attempts whose job task has not finished yet (they occupy a slot).
    active: usize,
}

/// One attempt held by the agent.
pub(crate) struct Attempt {
    pub(crate) spool: AttemptSpool,
    /// Asks the runner to stop the process; the value says why.
    stop: watch::Sender<Option<StopReason>>,
    /// Cancelled when the control plane no longer wants the attempt: its uploader stops the
    /// process, deletes the spool and ends.
    pub(crate) discard: CancellationToken,
    /// Assigned to this process, which has sent none of its output yet: the control plane
    /// holds none of it, so the first upload pass sends from the start without waiting to be
    /// told the offset. False for an attempt recovered from the spool after a restart.
    pub(crate) fresh: bool,
}

impl Attempt {
    /// An attempt and the receiving end of its stop requests (for its runner).
    pub(crate) fn new(
        spool: AttemptSpool,
        fresh: bool,
    ) -> (Attempt, watch::Receiver<Option<StopReason>>) {
        let (stop, stop_receiver) = watch::channel(None);
        let attempt = Attempt {
            spool,
            stop,
            discard: CancellationToken::new(),
            fresh,
        };
        (attempt, stop_receiver)
    }
}

/// Settings of [`Jobs`].
pub(crate) struct JobsOptions {
    pub(crate) spool: Spool,
    pub(crate) runner: Arc<dyn Runner>,
    pub(crate) capacity: u32,
    pub(crate) max_log_bytes: u64,
    pub(crate) tracker: TaskTracker,
    pub(crate) exit: CancellationToken,
    pub(crate) connection: watch::Receiver<Option<quinn::Connection>>,
}

impl Jobs {
    pub(crate) fn new(options: JobsOptions) -> Jobs {
        Jobs {
            inner: Arc::new(JobsInner {
                spool: options.spool,
                runner: options.runner,
                capacity: options.capacity,
                max_log_bytes: options.max_log_bytes,
                table: watch::Sender::new(Table::default()),
                tracker: options.tracker,
                exit: options.exit,
                connection: options.connection,
                slot_freed: Notify::new(),
            }),
        }
    }

    /// Takes over an attempt recovered from the spool (it already has its result) and uploads it.
    pub(crate) fn adopt(&self, spool: AttemptSpool) {
        let (attempt, _) = Attempt::new(spool, false);
        let attempt = Arc::new(attempt);
        let reference = attempt.spool.attempt().clone();
        self.inner.table.send_modify(|table| {
            table.attempts.insert(reference, attempt.clone());
        });
        self.spawn_uploader(attempt);
    }

    /// Starts an assigned attempt: writes its spool, then spawns the job and its uploader.
    pub(crate) fn start(&self, spec: JobSpec) {
        let reference = AttemptRef {
            job_id: spec.job_id.clone(),
            attempt: spec.attempt,
        };
        if self.inner.table.borrow().attempts.contains_key(&reference) {
            tracing::warn!(job = %spec.job_id, attempt = spec.attempt, "ignoring a second assignment of the same attempt");
            return;
        }
        let spool_spec = SpoolSpec {
            job_id: spec.job_id.clone(),
            attempt: spec.attempt,
            run_id: spec.run_id.clone(),
            event_id: spec.event_id.clone(),
        };
        let spool = match self
            .inner
            .spool
            .create(&spool_spec, self.inner.max_log_bytes)
        {
            Ok(spool) => spool,
            Err(error) => {
                // Without a spool the script is not run; the attempt is reported failed from
                // memory, with the reason in its log. (A job id that cannot name a directory is
                // not reported: its lease runs out and the control plane settles it.)
                tracing::error!(job = %spec.job_id, attempt = spec.attempt, %error, "cannot write the spool of an assigned job; reporting it failed");
                match self.inner.spool.unstored(&spool_spec, &error) {
                    Ok(spool) => self.adopt(spool),
                    Err(error) => {
                        tracing::error!(job = %spec.job_id, attempt = spec.attempt, %error, "cannot report an assigned job")
                    }
                }
                return;
            }
        };
        spool.set_masker(spec.secret_env.masker());
        let (attempt, stop_receiver) = Attempt::new(spool.clone(), true);
        let attempt = Arc::new(attempt);
        self.inner.table.send_modify(|table| {
            table.attempts.insert(reference.clone(), attempt.clone());
            table.active += 1;
        });
        tracing::info!(job = %spec.job_id, attempt = spec.attempt, kind = ?spec.kind, "starting job");

        let jobs = self.clone();
        let span = tracing::info_span!("job", job = %spec.job_id, attempt = spec.attempt);
        self.inner.tracker.spawn(async move {
            let outcome = jobs.inner.runner.run(&spec, &spool, stop_receiver).await;
            if let Err(error) = spool.finish(outcome) {
                tracing::error!(job = %spec.job_id, attempt = spec.attempt, %error, "could not store a job result");
            }
            tracing::info!(job = %spec.job_id, attempt = spec.attempt, status = ?outcome.status, reason = ?outcome.reason, exit_code = ?outcome.exit_code, "job ended");
            jobs.inner.table.send_modify(|table| table.active = table.active.saturating_sub(1));
            jobs.inner.slot_freed.notify_one();
        }
        .instrument(span));
        self.spawn_uploader(attempt);
    }

    /// Every attempt held (running or with an unacknowledged result), for hellos and heartbeats.
    pub(crate) fn held(&self) -> Vec<AttemptRef> {
        self.inner.table.borrow().attempts.keys().cloned().collect()
    }

    /// How many more jobs may be claimed now: no more than `capacity` run at once, and no more
    /// than `capacity` others wait for their results' acknowledgment. Without the second bound
    /// an agent whose uploads fell behind (a control plane slow to record results) kept
    /// claiming as fast as its jobs ended: agents draining a queue held hundreds of finished
    /// attempts each, all renewed by every heartbeat and waiting for upload streams, while
    /// their jobs' results reached the database seconds after they ended.
    pub(crate) fn free_slots(&self) -> u32 {
        let table = self.inner.table.borrow();
        let active = u32::try_from(table.active).unwrap_or(u32::MAX);
        let held = u32::try_from(table.attempts.len()).unwrap_or(u32::MAX);
        let capacity = self.inner.capacity;
        capacity
            .saturating_sub(active)
            .min(capacity.saturating_mul(2).saturating_sub(held))
    }

    /// How many jobs to claim now: the [free slots](Self::free_slots), or none while they are
    /// fewer than the capacity and some finished attempts still await their results'
    /// acknowledgment. The log streams while a job runs, so an acknowledgment comes a few
    /// milliseconds after the end; claiming for every slot as it freed made one-job claims 40%
    /// of all claims while four agents of capacity 8 drained a queue (2,340 of 5,808), and a
    /// claim costs the control plane and its database about as much for one job as for eight.
    /// Waiting for the acknowledgments, those agents claimed 7.4 jobs at a time. With nothing
    /// awaiting acknowledgment, a free slot is claimed at once, whatever runs.
    pub(crate) fn slots_to_claim(&self) -> u32 {
        let free = self.free_slots();
        let table = self.inner.table.borrow();
        let awaiting = table.attempts.len().saturating_sub(table.active);
        if awaiting > 0 && free < self.inner.capacity {
            0
        } else {
            free
        }
    }

    /// How many job processes are running.
    pub(crate) fn active(&self) -> usize {
        self.inner.table.borrow().active
    }

    /// Completes when a job's process ended or an attempt was forgotten since the last call.
    pub(crate) async fn slot_freed(&self) {
        self.inner.slot_freed.notified().await;
    }

    /// Stops an attempt because the control plane cancelled it.
    pub(crate) fn cancel(&self, reference: &AttemptRef) {
        match self.lookup(reference) {
            Some(attempt) => {
                tracing::info!(job = %reference.job_id, attempt = reference.attempt, "cancelling job");
                attempt
                    .stop
                    .send_if_modified(|stop| set_once(stop, StopReason::Cancel));
            }
            None => {
                tracing::debug!(job = %reference.job_id, "cancel for an attempt this agent does not hold")
            }
        }
    }

    /// Stops an attempt and drops its output because the control plane settled it elsewhere.
    pub(crate) fn abandon(&self, reference: &AttemptRef) {
        if let Some(attempt) = self.lookup(reference) {
            tracing::info!(job = %reference.job_id, attempt = reference.attempt, "abandoning job");
            attempt.discard.cancel();
        }
    }

    /// Stops every running attempt.
    pub(crate) fn stop_all(&self, reason: StopReason) {
        let attempts: Vec<Arc<Attempt>> = self
            .inner
            .table
            .borrow()
            .attempts
            .values()
            .cloned()
            .collect();
        for attempt in attempts {
            attempt.stop.send_if_modified(|stop| set_once(stop, reason));
        }
    }

    /// Completes when no job process is running.
    pub(crate) async fn wait_idle(&self) {
        let mut table = self.inner.table.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = table.wait_for(|table| table.active == 0).await;
    }

    /// Completes when every attempt was reported (or discarded).
    pub(crate) async fn wait_empty(&self) {
        let mut table = self.inner.table.subscribe();
        let _ = table.wait_for(|table| table.attempts.is_empty()).await;
    }

    pub(crate) fn connection(&self) -> watch::Receiver<Option<quinn::Connection>> {
        self.inner.connection.clone()
    }

    pub(crate) fn exit_token(&self) -> &CancellationToken {
        &self.inner.exit
    }

    /// Asks an attempt's runner to stop (used by the uploader for discarded attempts).
    pub(crate) fn stop(&self, attempt: &Attempt, reason: StopReason) {
        attempt.stop.send_if_modified(|stop| set_once(stop, reason));
    }

    /// Forgets an attempt whose uploader is done (which may free a slot: [`Jobs::free_slots`]).
    pub(crate) fn remove(&self, reference: &AttemptRef) {
        self.inner.table.send_modify(|table| {
            table.attempts.remove(reference);
        });
        self.inner.slot_freed.notify_one();
    }

    fn lookup(&self, reference: &AttemptRef) -> Option<Arc<Attempt>> {
        self.inner.table.borrow().attempts.get(reference).cloned()
    }

    fn spawn_uploader(&self, attempt: Arc<Attempt>) {
        let reference = attempt.spool.attempt();
        let span =
            tracing::info_span!("upload", job = %reference.job_id, attempt = reference.attempt);
        let jobs = self.clone();
        self.inner
            .tracker
            .spawn(crate::conn::upload::upload_attempt(jobs, attempt).instrument(span));
    }
}

/// Records the first stop reason; later ones do not change it.
fn set_once(stop: &mut Option<StopReason>, reason: StopReason) -> bool {
    if stop.is_none() {
        *stop = Some(reason);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cronium_protocol::{FinalStatus, ScriptKind};
    use futures_util::future::BoxFuture;

    use super::*;
    use crate::runner::StopSignal;
    use crate::spool::Outcome;

    /// Ends every job at once, completed, with no output.
    struct Instant;

    impl Runner for Instant {
        fn run<'a>(
            &'a self,
            _spec: &'a JobSpec,
            _spool: &'a AttemptSpool,
            _stop: StopSignal,
        ) -> BoxFuture<'a, Outcome> {
            Box::pin(async {
                Outcome {
                    status: FinalStatus::Completed,
                    reason: None,
                    exit_code: Some(0),
                }
            })
        }
    }

    /// Runs every job until it is asked to stop.
    struct UntilStopped;

    impl Runner for UntilStopped {
        fn run<'a>(
            &'a self,
            _spec: &'a JobSpec,
            _spool: &'a AttemptSpool,
            mut stop: StopSignal,
        ) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                let _ = stop.wait_for(Option::is_some).await;
                Outcome {
                    status: FinalStatus::Failed,
                    reason: None,
                    exit_code: None,
                }
            })
        }
    }

    /// Jobs of `capacity` with `runner`, spooled in `dir`, and the tracker and exit token that
    /// end their tasks.
    fn jobs_with(
        runner: Arc<dyn Runner>,
        capacity: u32,
        dir: &std::path::Path,
    ) -> (Jobs, TaskTracker, CancellationToken) {
        let (_connection, receiver) = watch::channel(None);
        let (tracker, exit) = (TaskTracker::new(), CancellationToken::new());
        let jobs = Jobs::new(JobsOptions {
            spool: Spool::open(dir.join("spool")).unwrap(),
            runner,
            capacity,
            max_log_bytes: 1024,
            tracker: tracker.clone(),
            exit: exit.clone(),
            connection: receiver,
        });
        (jobs, tracker, exit)
    }

    /// Stops every job and uploader of `jobs` and waits for their tasks to end.
    async fn end(jobs: &Jobs, tracker: TaskTracker, exit: CancellationToken) {
        for reference in jobs.held() {
            jobs.cancel(&reference);
        }
        exit.cancel();
        tracker.close();
        tracker.wait().await;
    }

    fn forget(jobs: &Jobs, job_id: &str) {
        jobs.remove(&AttemptRef {
            job_id: job_id.to_string(),
            attempt: 1,
        });
    }

    /// While results await acknowledgment a claim waits for the whole capacity; with none
    /// awaiting, a slot is claimed as soon as it is free, however many jobs run.
    #[tokio::test]
    async fn claims_wait_for_acknowledgments_but_not_for_running_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, tracker, exit) = jobs_with(Arc::new(Instant), 4, dir.path());
        assert_eq!(jobs.slots_to_claim(), 4, "nothing held");
        for id in ["a", "b", "c", "d", "e", "f", "g"] {
            jobs.start(spec(id));
        }
        jobs.wait_idle().await;
        // Seven results await acknowledgment: one slot free, four once three are acknowledged.
        assert_eq!(jobs.free_slots(), 1);
        assert_eq!(jobs.slots_to_claim(), 0);
        forget(&jobs, "a");
        forget(&jobs, "b");
        assert_eq!(jobs.free_slots(), 3);
        assert_eq!(jobs.slots_to_claim(), 0);
        forget(&jobs, "c");
        assert_eq!(jobs.slots_to_claim(), 4);
        end(&jobs, tracker, exit).await;

        // Three jobs that run on and nothing awaiting acknowledgment: the last slot is claimed
        // at once.
        let dir = tempfile::tempdir().unwrap();
        let (running, tracker, exit) = jobs_with(Arc::new(UntilStopped), 4, dir.path());
        for id in ["a", "b", "c"] {
            running.start(spec(id));
        }
        assert_eq!(running.active(), 3);
        assert_eq!(running.slots_to_claim(), 1);
        end(&running, tracker, exit).await;
    }

    fn spec(job_id: &str) -> JobSpec {
        JobSpec {
            job_id: job_id.to_string(),
            attempt: 1,
            run_id: "run".to_string(),
            event_id: "event".to_string(),
            kind: ScriptKind::Bash,
            script: "true".to_string(),
            env: Vec::new(),
            timeout_ms: 0,
            input: None,
            runtime: Default::default(),
            secret_env: Default::default(),
        }
    }

    /// Finished attempts whose results nobody acknowledges (no connection: their uploaders
    /// wait) hold slots too, up to the capacity; forgetting one frees a slot and says so.
    #[tokio::test]
    async fn unacknowledged_results_hold_back_claims_beyond_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let (jobs, tracker, exit) = jobs_with(Arc::new(Instant), 2, dir.path());
        assert_eq!(jobs.free_slots(), 2);
        for id in ["a", "b"] {
            jobs.start(spec(id));
        }
        jobs.wait_idle().await;
        // Both ended, neither acknowledged: two more may run.
        assert_eq!(jobs.free_slots(), 2);
        for id in ["c", "d"] {
            jobs.start(spec(id));
        }
        jobs.wait_idle().await;
        assert_eq!(jobs.held().len(), 4);
        assert_eq!(
            jobs.free_slots(),
            0,
            "nothing runs, but 4 results await acknowledgment"
        );
        // Drain the permits the ends left, then forget one attempt.
        while tokio::time::timeout(Duration::from_millis(10), jobs.slot_freed())
            .await
            .is_ok()
        {}
        forget(&jobs, "a");
        tokio::time::timeout(Duration::from_secs(5), jobs.slot_freed())
            .await
            .expect("forgetting an attempt wakes the claimer");
        assert_eq!(jobs.free_slots(), 1);
        end(&jobs, tracker, exit).await;
    }
}
