//! The scheduler: one background task that fires the due slots of every scheduled event.
//!
//! It sleeps until the earliest `next_run_at` of any event, or until an event's schedule changed
//! (`AppState::schedules`), or, while a slot is held by the overlap policy `queue`, until a job
//! changed. For each due event it handles one slot per transaction ([`Store::handle_slot`]):
//! the slot record (UNIQUE per event and slot), the run and the next fire time commit together,
//! so each slot fires at most once, also across restarts and with several schedulers on one
//! database.
//!
//! Misfires: a slot more than [`MISFIRE_GRACE_MS`] in the past when the scheduler gets to it was
//! missed (the control plane was down). With `skip` the missed slots are recorded as one
//! `missed` row and the schedule continues with the first slot within the grace; with `run_once`
//! one run (keyed by the first missed slot, `missed_slots` = how many) stands for them all. With
//! overlap `queue`, the oldest due slot is never a misfire: it is the queued run.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{Clock, CompiledSchedule, Misfire, Overlap};
use crate::AppState;
use crate::http::events::{BackgroundTrigger, background_run_spec};
use crate::store::StoreResult;
use crate::store::events::Event;
use crate::store::jobs::RunSpec;
use crate::store::schedules::{SlotAction, SlotOutcome, SlotPlan};

/// How late a slot may fire before it counts as missed.
pub const MISFIRE_GRACE_MS: i64 = 60_000;

/// Most missed slots counted for `missed_slots` (the count saturates there).
const MAX_MISSED_COUNT: i64 = 10_000;

/// Most slots of one event handled in one pass (the rest in the next pass).
const MAX_SLOTS_PER_PASS: usize = 1_000;

/// The longest sleep without a wake-up (re-reads the schedules, so a clock jump is noticed).
const MAX_SLEEP: Duration = Duration::from_secs(300);

/// What one pass over the due schedules found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Runs created.
    pub fired: Vec<String>,
    /// Some slot is held by overlap `queue` until a job finishes.
    pub held: bool,
    /// The earliest next slot after now of any event.
    pub next: Option<i64>,
}

/// The scheduler of one control plane.
pub struct Scheduler {
    state: AppState,
    clock: Arc<dyn Clock>,
}

impl Scheduler {
    pub fn new(state: AppState, clock: Arc<dyn Clock>) -> Scheduler {
        Scheduler { state, clock }
    }

    /// Fires due slots until the control plane shuts down, while this replica leads the
    /// scheduler (`replicas::leader`: always on SQLite; on PostgreSQL while it holds the leader
    /// lock, which another replica takes over when this one dies; `handle_slot` keeps every slot
    /// at most once anyway).
    pub async fn run(self) {
        while let Some(leadership) = crate::replicas::leader::acquire(&self.state).await {
            self.run_while_leading(leadership.lost()).await;
        }
    }

    /// Fires due slots until `lost` is cancelled.
    async fn run_while_leading(&self, lost: &tokio_util::sync::CancellationToken) {
        let mut job_changes = self.state.job_events.subscribe();
        loop {
            while job_changes.try_recv().is_ok() {}
            let pass = match self.run_due().await {
                Ok(pass) => pass,
                Err(error) => {
                    warn!(%error, "scheduler pass failed");
                    Pass {
                        next: Some(self.clock.now_ms() + 1_000),
                        ..Pass::default()
                    }
                }
            };
            let sleep = pass
                .next
                .map(|next| {
                    Duration::from_millis(u64::try_from(next - self.clock.now_ms()).unwrap_or(0))
                })
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.state.schedules.notified() => {}
                _ = job_changes.recv(), if pass.held => {}
                _ = lost.cancelled() => return,
            }
        }
    }

    /// Handles every due slot as of the clock's now.
    pub async fn run_due(&self) -> StoreResult<Pass> {
        let now = self.clock.now_ms();
        let mut pass = Pass::default();
        for event in self.state.store.due_schedules(now).await? {
            let mut event = event;
            for round in 0..MAX_SLOTS_PER_PASS {
                let Some(plan) = self.plan(&event, now, round == 0).await else {
                    break;
                };
                let new_next = plan.new_next;
                match self.apply(plan).await? {
                    SlotOutcome::Fired { run_id, .. } => pass.fired.push(run_id),
                    SlotOutcome::Recorded { .. } | SlotOutcome::AlreadyHandled => {}
                    SlotOutcome::Held => {
                        pass.held = true;
                        break;
                    }
                    SlotOutcome::Stale => break,
                }
                event.next_run_at = new_next;
            }
        }
        pass.next = self.state.store.earliest_next_run(now).await?;
        // Workflows with a schedule: the same pass, clock and wake-ups (`workflows/engine.rs`).
        let workflows_next = crate::workflows::engine::run_due_schedules(&self.state, now).await?;
        pass.next = match (pass.next, workflows_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(pass)
    }

    /// Decides what to do with the event's next slot, if it is due at `now`. `oldest`: the
    /// slot is the first one due in this pass (with overlap `queue` it is never a misfire).
    pub async fn plan(&self, event: &Event, now: i64, oldest: bool) -> Option<SlotPlan> {
        let spec = event.schedule.as_ref()?;
        let slot = event.next_run_at.filter(|slot| *slot <= now)?;
        let compiled = match CompiledSchedule::new(&spec.cron, &spec.timezone, spec.dst) {
            Ok(compiled) => compiled,
            Err(error) => {
                warn!(event_id = %event.id, %error, "stored schedule is invalid");
                return None;
            }
        };
        let missed = slot < now - MISFIRE_GRACE_MS && !(oldest && spec.overlap == Overlap::Queue);
        let (new_next, missed_slots) = if missed {
            let first_recent = compiled.next_after(now - MISFIRE_GRACE_MS - 1);
            let mut count = 1;
            let mut cursor = slot;
            while count < MAX_MISSED_COUNT {
                match compiled.next_after(cursor) {
                    Some(next) if first_recent.is_none_or(|recent| next < recent) => {
                        count += 1;
                        cursor = next;
                    }
                    _ => break,
                }
            }
            (first_recent, count)
        } else {
            (compiled.next_after(slot), 0)
        };
        let action = if missed && spec.misfire == Misfire::Skip {
            SlotAction::Record {
                outcome: "missed",
                reason: format!(
                    "misfire: {missed_slots} slot(s) missed while the scheduler was not running"
                ),
            }
        } else {
            match self.run_spec(event, slot, missed_slots).await {
                Ok(run) => SlotAction::Fire {
                    run: Box::new(run),
                    overlap: spec.overlap,
                },
                Err(reason) => SlotAction::Record {
                    outcome: "skipped",
                    reason,
                },
            }
        };
        Some(SlotPlan {
            event_id: event.id.clone(),
            expected_next: slot,
            slot_at: slot,
            new_next,
            missed_slots,
            action,
        })
    }

    /// Commits a plan and wakes the runners of the jobs it created.
    pub async fn apply(&self, plan: SlotPlan) -> StoreResult<SlotOutcome> {
        let (event_id, slot_at) = (plan.event_id.clone(), plan.slot_at);
        let outcome = self.state.store.handle_slot(plan).await?;
        match &outcome {
            SlotOutcome::Fired { run_id, jobs } => {
                info!(%event_id, slot_at, %run_id, "scheduled run created");
                for (job_id, runner) in jobs {
                    crate::dispatch::wake_runner(&self.state, runner);
                    // The new run and its next fire time, for the console's lists.
                    self.state.changes.touch(crate::changes::Kind::Job, job_id);
                }
                self.state
                    .changes
                    .touch(crate::changes::Kind::Event, &event_id);
            }
            SlotOutcome::Recorded { reason } => {
                info!(%event_id, slot_at, %reason, "slot recorded without a run")
            }
            other => debug!(%event_id, slot_at, ?other, "slot not fired"),
        }
        Ok(outcome)
    }

    /// The run of a slot, through the API's run-creation path; the error text is the reason
    /// the slot is recorded as skipped.
    async fn run_spec(
        &self,
        event: &Event,
        slot: i64,
        missed_slots: i64,
    ) -> Result<RunSpec, String> {
        if event.targets.is_empty() && !event.action.on_control_plane(event.kind) {
            return Err("the event has no targets".into());
        }
        background_run_spec(
            &self.state,
            event,
            &event.targets,
            BackgroundTrigger {
                input: None,
                created_by: &event.owner_id,
                trigger: "schedule",
                slot_at: Some(slot),
                missed_slots,
            },
        )
        .await
    }
}
