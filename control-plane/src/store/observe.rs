//! What the write operations tell the metrics (`crate::metrics`): jobs settled and jobs claimed.
//!
//! An operation records an observation where it makes the change (`settled`, `claimed`); the
//! writer task (`commit_groups`) collects an operation's observations while it runs, drops them
//! when its savepoint is rolled back or the group's commit fails, and hands them to the metrics
//! only after the commit. So a counter never counts a change that is not on disk, and the
//! settling paths need no handle to the metrics: they only call these functions. Outside the
//! writer task (no scope) the functions do nothing.
//!
//! Every path that gives a job its final status records it: the ones that call
//! `jobs::notify_settled_in` (a result, a lease, a cancel, a revocation, a server deletion)
//! through it, the rollout's stop (`dispatch::settled_in`) and the offline skip directly.

use std::cell::RefCell;
use std::future::Future;

use sqlx::Row as _;

use super::{Store, StoreResult};

/// One change the metrics count.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A job reached a final status; `reason` is its reason (the skip reason of a skipped job),
    /// `None` for a completed job.
    Settled {
        status: String,
        reason: Option<String>,
        count: u64,
    },
    /// A job was claimed `waited_ms` after it was queued.
    Claimed { waited_ms: i64 },
}

tokio::task_local! {
    /// The observations of the write operation running now.
    static OBSERVED: RefCell<Vec<Observation>>;
}

fn record(observation: Observation) {
    // Outside a scope (a test calling a `_in` function directly) there is nothing to count.
    let _ = OBSERVED.try_with(|observed| observed.borrow_mut().push(observation));
}

/// `count` jobs reached the final `status` with `reason`.
pub(crate) fn settled(status: &str, reason: Option<&str>, count: u64) {
    if count > 0 {
        record(Observation::Settled {
            status: status.to_owned(),
            reason: reason.map(str::to_owned),
            count,
        });
    }
}

/// A job was claimed `waited_ms` after it was queued.
pub(crate) fn claimed(waited_ms: i64) {
    record(Observation::Claimed { waited_ms });
}

/// Runs `operation` and returns its output with what it observed.
pub(super) async fn observing<F: Future>(operation: F) -> (F::Output, Vec<Observation>) {
    OBSERVED
        .scope(RefCell::new(Vec::new()), async move {
            let output = operation.await;
            (output, OBSERVED.with(RefCell::take))
        })
        .await
}

impl Store {
    /// How many jobs are `queued`, `claimed` and `running` now (statuses with none are left out).
    /// One query on the `(status, …)` index, so its cost follows the number of unfinished jobs.
    pub async fn active_job_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS jobs FROM jobs
             WHERE status IN ('queued', 'claimed', 'running') GROUP BY status",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("status")?, row.try_get("jobs")?)))
            .collect()
    }
}
