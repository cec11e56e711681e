//! Pool jobs against a real SQLite file: one claimer among concurrent candidates, never a
//! non-candidate, and back to the pool when an attempt is re-queued.

use super::super::dispatch::{DispatchPolicy, OfflinePolicy, RetryPolicy, Rollout};
use super::super::jobs::{Attempt, AttemptResult, FinishOutcome, JobStatus, RunSpec};
use super::super::now_ms;
use super::super::tests::{Fixture, fixture_with};

/// Retries at once; `offline` as given.
async fn fixture(offline: OfflinePolicy) -> Fixture {
    fixture_with(DispatchPolicy {
        retry: RetryPolicy {
            backoff_seconds: 0.0,
            factor: 1.0,
            max_backoff_seconds: 0.0,
        },
        rollout: Rollout {
            offline,
            ..Rollout::default()
        },
        ..Default::default()
    })
    .await
}

/// Creates a pool run of the fixture's event; returns the job id and the pairs returned.
async fn pool_run(
    fixture: &Fixture,
    candidates: &[String],
    max_attempts: u32,
) -> (String, Vec<(String, String)>) {
    let spec = RunSpec {
        max_attempts,
        pool: true,
        ..super::super::tests::bash_run(&fixture.event, &fixture.owner, candidates)
    };
    let (run_id, pairs) = fixture
        .store
        .create_run_dispatched(spec, None, None)
        .await
        .unwrap();
    let run = fixture.store.run(&run_id).await.unwrap();
    assert_eq!(run.jobs.len(), 1, "a pool run has one job");
    (run.jobs[0].id.clone(), pairs)
}

fn result(status: JobStatus, exit_code: i32) -> AttemptResult {
    AttemptResult {
        status,
        reason: (status == JobStatus::Failed).then_some(super::super::jobs::Reason::ExitCode),
        exit_code: Some(exit_code),
        log_len: 0,
        result: None,
        condition: None,
    }
}

async fn agents(fixture: &Fixture, names: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for name in names {
        ids.push(fixture.store.enroll_test_agent(name).await.id);
    }
    ids
}

#[tokio::test]
async fn exactly_one_of_many_concurrent_candidates_claims_a_pool_job_and_no_outsider_does() {
    let fixture = fixture(OfflinePolicy::Wait).await;
    let all = agents(&fixture, &["a", "b", "c", "d", "outsider"]).await;
    let (candidates, outsider) = (all[..4].to_vec(), all[4].clone());
    for _ in 0..10 {
        let (job, pairs) = pool_run(&fixture, &candidates, 1).await;
        // The pairs name every candidate to wake, all for the one job.
        let mut woken: Vec<String> = pairs.iter().map(|(_, agent)| agent.clone()).collect();
        woken.sort();
        let mut expected = candidates.clone();
        expected.sort();
        assert_eq!(woken, expected);
        assert!(pairs.iter().all(|(id, _)| id == &job));
        assert_eq!(fixture.store.job(&job).await.unwrap().agent_id, None);

        let lease = now_ms() + 60_000;
        assert!(
            fixture
                .store
                .claim_jobs(&outsider, 10, lease)
                .await
                .unwrap()
                .is_empty(),
            "an agent that is not a candidate never gets a pool job"
        );
        let claims = candidates
            .iter()
            .map(|agent| fixture.store.claim_jobs(agent, 4, lease));
        let results = futures_util::future::join_all(claims).await;
        let winners: Vec<&String> = candidates
            .iter()
            .zip(&results)
            .filter(|(_, claimed)| !claimed.as_ref().unwrap().is_empty())
            .map(|(agent, _)| agent)
            .collect();
        assert_eq!(winners.len(), 1, "exactly one candidate claims the job");
        let claimed = &results
            .iter()
            .find(|claimed| !claimed.as_ref().unwrap().is_empty())
            .unwrap()
            .as_ref()
            .unwrap()[0];
        assert_eq!((claimed.id.as_str(), claimed.attempt), (job.as_str(), 1));
        let stored = fixture.store.job(&job).await.unwrap();
        assert_eq!(stored.agent_id.as_deref(), Some(winners[0].as_str()));
        assert_eq!(stored.status, JobStatus::Claimed);
        // Bound: the winner runs and finishes it like any agent job; nobody else gets it.
        for agent in &all {
            assert!(
                fixture
                    .store
                    .claim_jobs(agent, 10, lease)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
        let attempt = Attempt {
            job_id: job.clone(),
            attempt: 1,
        };
        for loser in candidates.iter().filter(|agent| *agent != winners[0]) {
            assert_eq!(
                fixture
                    .store
                    .finish_attempt(loser, &attempt, &[], &result(JobStatus::Completed, 0))
                    .await
                    .unwrap(),
                FinishOutcome::Stale
            );
        }
        assert_eq!(
            fixture
                .store
                .finish_attempt(winners[0], &attempt, &[], &result(JobStatus::Completed, 0))
                .await
                .unwrap(),
            FinishOutcome::Recorded { notified: false }
        );
    }
}

#[tokio::test]
async fn an_expired_lease_returns_a_pool_job_to_the_pool_for_another_candidate() {
    let fixture = fixture(OfflinePolicy::Wait).await;
    let all = agents(&fixture, &["a", "b"]).await;
    let (job, _) = pool_run(&fixture, &all, 2).await;
    // The first claimer dies: its lease runs out.
    let first = fixture
        .store
        .claim_jobs(&all[0], 1, now_ms() - 1)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let expired = fixture.store.expire_leases(now_ms()).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert!(expired[0].requeued);
    assert_eq!(expired[0].candidates, all, "every candidate is to be woken");
    let stored = fixture.store.job(&job).await.unwrap();
    assert_eq!((stored.status, stored.agent_id), (JobStatus::Queued, None));

    // The other candidate takes it as attempt 2 and finishes it; the first one's late result is
    // stale.
    let second = fixture
        .store
        .claim_jobs(&all[1], 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        (second[0].id.as_str(), second[0].attempt),
        (job.as_str(), 2)
    );
    assert_eq!(
        fixture
            .store
            .finish_attempt(
                &all[0],
                &Attempt {
                    job_id: job.clone(),
                    attempt: 1
                },
                &[],
                &result(JobStatus::Completed, 0)
            )
            .await
            .unwrap(),
        FinishOutcome::Stale
    );
    assert_eq!(
        fixture
            .store
            .finish_attempt(
                &all[1],
                &Attempt {
                    job_id: job.clone(),
                    attempt: 2
                },
                &[],
                &result(JobStatus::Completed, 0)
            )
            .await
            .unwrap(),
        FinishOutcome::Recorded { notified: false }
    );
    let stored = fixture.store.job(&job).await.unwrap();
    assert_eq!(
        (stored.status, stored.attempt, stored.agent_id.as_deref()),
        (JobStatus::Completed, 2, Some(all[1].as_str()))
    );
}

#[tokio::test]
async fn a_failed_attempt_goes_back_to_the_pool_and_the_dispatcher_wakes_every_candidate() {
    let fixture = fixture(OfflinePolicy::Wait).await;
    let all = agents(&fixture, &["a", "b", "c"]).await;
    let candidates = all[..2].to_vec();
    let (job, _) = pool_run(&fixture, &candidates, 2).await;
    let before = now_ms() - 1;
    let claimed = fixture
        .store
        .claim_jobs(&candidates[0], 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let outcome = fixture
        .store
        .finish_attempt(
            &candidates[0],
            &Attempt {
                job_id: job.clone(),
                attempt: 1,
            },
            &[],
            &result(JobStatus::Failed, 1),
        )
        .await
        .unwrap();
    assert_eq!(outcome, FinishOutcome::Requeued);
    assert_eq!(fixture.store.job(&job).await.unwrap().agent_id, None);
    // The retry is due: the dispatcher's query names the candidates (not a NULL runner).
    let mut due = fixture
        .store
        .runners_due(before, now_ms() + 1000)
        .await
        .unwrap();
    due.sort();
    assert_eq!(due, candidates);
    let retried = fixture
        .store
        .claim_jobs(&candidates[1], 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        (retried[0].id.as_str(), retried[0].attempt),
        (job.as_str(), 2)
    );
    assert!(
        fixture
            .store
            .claim_jobs(&all[2], 1, now_ms() + 60_000)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_offline_policy_sees_a_pool_job_once_per_candidate() {
    let fixture = fixture(OfflinePolicy::Skip).await;
    let all = agents(&fixture, &["a", "b"]).await;
    let (job, _) = pool_run(&fixture, &all, 1).await;
    let mut pairs = fixture
        .store
        .offline_candidates(now_ms() + 1)
        .await
        .unwrap();
    pairs.sort();
    let expected: Vec<(String, String)> = all
        .iter()
        .map(|agent| (job.clone(), agent.clone()))
        .collect();
    assert_eq!(pairs, expected);
    assert_eq!(
        fixture
            .store
            .skip_offline(std::slice::from_ref(&job))
            .await
            .unwrap(),
        vec![job.clone()]
    );
    assert_eq!(
        fixture.store.job(&job).await.unwrap().status,
        JobStatus::Cancelled
    );
}
