//! A rollout's stop conditions with several writers: two stores on one database (as two
//! replicas) settle failures of one run at the same moment. Each settlement alone sees one
//! failure fewer than the limit; the stop must still trip when the limit is reached, never
//! before. On PostgreSQL this exercises the run lock of `dispatch::settled_in`; on SQLite the two
//! stores' writers take turns on the file's write lock.

use super::super::dispatch::{DispatchPolicy, Rollout};
use super::super::jobs::{Attempt, AttemptResult, FinishOutcome, JobStatus, Reason};
use super::super::users::Role;
use super::super::{Store, now_ms};

/// The run's `max_failures`.
const LIMIT: usize = 3;
/// Runs checked, one after another.
const ROUNDS: usize = 12;

fn failed() -> AttemptResult {
    AttemptResult {
        status: JobStatus::Failed,
        reason: Some(Reason::ExitCode),
        exit_code: Some(1),
        log_len: 0,
        result: None,
        condition: None,
    }
}

/// Settles the failures of `jobs[i]` (run by `agents[i]`) at once, `jobs[i]` through store
/// `i % 2`.
async fn fail_at_once(stores: &[Store], agents: &[String], jobs: &[String]) {
    let mut settling = Vec::new();
    for (index, (agent, job)) in agents.iter().zip(jobs).enumerate() {
        let store = stores[index % 2].clone();
        let (agent, attempt) = (
            agent.clone(),
            Attempt {
                job_id: job.clone(),
                attempt: 1,
            },
        );
        settling.push(tokio::spawn(async move {
            store.finish_attempt(&agent, &attempt, &[], &failed()).await
        }));
    }
    for outcome in settling {
        assert!(matches!(
            outcome.await.unwrap().unwrap(),
            FinishOutcome::Recorded { .. }
        ));
    }
}

async fn status(store: &Store, job: &str) -> (JobStatus, Option<Reason>) {
    let job = store.job(job).await.unwrap();
    (job.status, job.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_settled_at_once_through_two_stores_stop_the_rollout_exactly_at_max_failures() {
    let (_db, stores) = super::super::test_db::open_test_stores(2).await;
    let first = &stores[0];
    let owner = first
        .create_user("owner", "hash", Role::User)
        .await
        .unwrap()
        .id;
    let fields = super::super::tests::bash_fields(
        "rollout",
        Some(DispatchPolicy {
            rollout: Rollout {
                max_failures: Some(LIMIT as u32),
                ..Default::default()
            },
            ..Default::default()
        }),
    );
    let event = first.create_event(&owner, &fields).await.unwrap().id;
    // LIMIT - 2 failures first, then two at once: each of those two alone sees LIMIT - 1, the
    // later sees LIMIT. Two more hosts run meanwhile and two never start.
    let hosts = LIMIT + 2 + 2;
    let mut agents = Vec::new();
    for index in 0..hosts {
        agents.push(first.enroll_test_agent(&format!("h{index}")).await.id);
    }
    for round in 0..ROUNDS {
        let spec = super::super::tests::bash_run(&event, &owner, &agents);
        let (run_id, pairs) = first.create_run_dispatched(spec, None, None).await.unwrap();
        let job_of = |agent: &String| {
            pairs
                .iter()
                .find(|(_, runner)| runner == agent)
                .map(|(job, _)| job.clone())
                .unwrap()
        };
        let jobs: Vec<String> = agents.iter().map(job_of).collect();
        let started = hosts - 2;
        for (index, agent) in agents[..started].iter().enumerate() {
            let claimed = stores[index % 2]
                .claim_jobs(agent, 1, now_ms() + 600_000)
                .await
                .unwrap();
            assert_eq!(claimed.len(), 1, "round {round}: host {index} starts");
        }
        fail_at_once(&stores, &agents[..LIMIT - 2], &jobs[..LIMIT - 2]).await;
        let dispatch = first.run_dispatch(&run_id).await.unwrap();
        assert_eq!(
            dispatch.stopped_reason, None,
            "round {round}: stopped before the limit"
        );
        assert_eq!(status(first, &jobs[hosts - 1]).await.0, JobStatus::Queued);

        fail_at_once(&stores, &agents[LIMIT - 2..LIMIT], &jobs[LIMIT - 2..LIMIT]).await;
        let dispatch = first.run_dispatch(&run_id).await.unwrap();
        let reason = dispatch
            .stopped_reason
            .unwrap_or_else(|| panic!("round {round}: {LIMIT} failures did not stop the run"));
        assert_eq!(
            reason,
            format!("max_failures: {LIMIT} host(s) failed (limit {LIMIT})"),
            "round {round}"
        );
        for job in &jobs[started..] {
            assert_eq!(
                status(first, job).await,
                (JobStatus::Cancelled, Some(Reason::RolloutStopped)),
                "round {round}: a host that had not started"
            );
        }
        for job in &jobs[LIMIT..started] {
            assert_eq!(
                status(first, job).await.0,
                JobStatus::Claimed,
                "round {round}: a running host is left alone"
            );
        }
        assert_eq!(
            first.count_audit("rollout_stopped").await.unwrap(),
            round as i64 + 1,
            "round {round}: one stop per run"
        );
    }
}
