//! Schedules: due events, handling one slot (the slot record, the run it creates and the next
//! fire time, all in one transaction) and the record of handled slots.
//!
//! Each slot fires at most once: `schedule_fires` is UNIQUE per (event, slot) and its row is
//! written in the transaction that creates the slot's run, and `events.next_run_at` only moves
//! forward from the value the scheduler read (compare and set). A scheduler that crashed before
//! its commit left nothing behind; one that read a stale `next_run_at` finds it moved.

use sqlx::{AssertSqlSafe, Row};

use super::events::{EVENT_COLUMNS, Event, event_from_row};
use super::jobs::{RunSpec, create_run_in};
use super::{Store, StoreResult, now_ms, write_op};
use crate::schedule::Overlap;

/// What to do with one slot.
#[derive(Debug, Clone)]
pub enum SlotAction {
    /// Create the run (subject to the overlap policy).
    Fire { run: Box<RunSpec>, overlap: Overlap },
    /// Record the slot without a run: `outcome` is `skipped` or `missed`.
    Record {
        outcome: &'static str,
        reason: String,
    },
}

/// One slot of one event, as the scheduler decided it.
#[derive(Debug, Clone)]
pub struct SlotPlan {
    pub event_id: String,
    /// The `next_run_at` the decision was based on.
    pub expected_next: i64,
    /// The slot's key (with the event id).
    pub slot_at: i64,
    /// The next fire time after this slot (`None`: the expression never matches again).
    pub new_next: Option<i64>,
    pub missed_slots: i64,
    pub action: SlotAction,
}

/// What [`Store::handle_slot`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotOutcome {
    /// The run was created: its id and `(job id, agent id)` pairs.
    Fired {
        run_id: String,
        jobs: Vec<(String, String)>,
    },
    /// The slot was recorded without a run (a skip, a miss, or the overlap policy `forbid`).
    Recorded { reason: String },
    /// Overlap policy `queue`: the previous run is unfinished; nothing was written.
    Held,
    /// `next_run_at` is no longer `expected_next` (another scheduler handled the slot, or the
    /// schedule changed); nothing was written.
    Stale,
    /// The slot was already recorded; `next_run_at` moved past it, nothing else was written.
    AlreadyHandled,
}

/// A handled slot as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    pub slot_at: i64,
    pub outcome: String,
    pub reason: Option<String>,
    pub run_id: Option<String>,
    pub missed_slots: i64,
    pub handled_at: i64,
}

impl Store {
    /// Events with a schedule whose next slot is at or before `now`.
    pub async fn due_schedules(&self, now: i64) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE next_run_at IS NOT NULL AND next_run_at <= $1 ORDER BY next_run_at"
        )))
        .bind(now)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// The earliest next slot after `now` of any event.
    pub async fn earliest_next_run(&self, now: i64) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(next_run_at) FROM events WHERE next_run_at > $1")
                .bind(now)
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// Handles one slot in one transaction: moves `next_run_at` from `expected_next` to
    /// `new_next`, records the slot and creates its run.
    pub async fn handle_slot(&self, plan: SlotPlan) -> StoreResult<SlotOutcome> {
        write_op!(self, |conn| async {
            let (action, reason) = match &plan.action {
                SlotAction::Fire { overlap, .. } if *overlap != Overlap::Allow => {
                    let busy: i64 = sqlx::query_scalar(
                        "SELECT CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE run_id =
                           (SELECT id FROM runs WHERE event_id = $1 AND trigger = 'schedule' ORDER BY created_at DESC, id DESC LIMIT 1)
                         AND status IN ('queued', 'claimed', 'running')) THEN 1 ELSE 0 END",
                    )
                    .bind(&plan.event_id)
                    .fetch_one(&mut *conn)
                    .await?;
                    match (busy != 0, overlap) {
                        (false, _) => ("fired", None),
                        (true, Overlap::Queue) => {
                            let current: Option<i64> =
                                sqlx::query_scalar("SELECT next_run_at FROM events WHERE id = $1")
                                    .bind(&plan.event_id)
                                    .fetch_optional(&mut *conn)
                                    .await?
                                    .flatten();
                            return Ok(if current == Some(plan.expected_next) {
                                SlotOutcome::Held
                            } else {
                                SlotOutcome::Stale
                            });
                        }
                        (true, _) => (
                            "skipped",
                            Some("overlap: the previous scheduled run is unfinished".to_string()),
                        ),
                    }
                }
                SlotAction::Fire { .. } => ("fired", None),
                SlotAction::Record { outcome, reason } => (*outcome, Some(reason.clone())),
            };
            let moved = sqlx::query(
                "UPDATE events SET next_run_at = $1 WHERE id = $2 AND next_run_at = $3",
            )
            .bind(plan.new_next)
            .bind(&plan.event_id)
            .bind(plan.expected_next)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if moved == 0 {
                return Ok(SlotOutcome::Stale);
            }
            let recorded = sqlx::query(
                "INSERT INTO schedule_fires (event_id, slot_at, outcome, reason, missed_slots, handled_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id, slot_at) DO NOTHING",
            )
            .bind(&plan.event_id)
            .bind(plan.slot_at)
            .bind(action)
            .bind(&reason)
            .bind(plan.missed_slots)
            .bind(now_ms())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if recorded == 0 {
                return Ok(SlotOutcome::AlreadyHandled);
            }
            match (&plan.action, action) {
                (SlotAction::Fire { run, .. }, "fired") => {
                    let (run_id, jobs) = create_run_in(conn, run).await?;
                    sqlx::query(
                        "UPDATE schedule_fires SET run_id = $1 WHERE event_id = $2 AND slot_at = $3",
                    )
                    .bind(&run_id)
                    .bind(&plan.event_id)
                    .bind(plan.slot_at)
                    .execute(&mut *conn)
                    .await?;
                    Ok(SlotOutcome::Fired { run_id, jobs })
                }
                _ => Ok(SlotOutcome::Recorded {
                    reason: reason.unwrap_or_default(),
                }),
            }
        })
        .await
    }

    /// The most recent handled slots of an event, newest first.
    pub async fn slot_records(&self, event_id: &str, limit: i64) -> StoreResult<Vec<SlotRecord>> {
        let rows = sqlx::query(
            "SELECT slot_at, outcome, reason, run_id, missed_slots, handled_at FROM schedule_fires
             WHERE event_id = $1 ORDER BY slot_at DESC LIMIT $2",
        )
        .bind(event_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SlotRecord {
                    slot_at: row.try_get("slot_at")?,
                    outcome: row.try_get("outcome")?,
                    reason: row.try_get("reason")?,
                    run_id: row.try_get("run_id")?,
                    missed_slots: row.try_get("missed_slots")?,
                    handled_at: row.try_get("handled_at")?,
                })
            })
            .collect()
    }
}
