//! Unit tests of the dispatch rules against a real SQLite file: backoff (with the claim's clock
//! given explicitly), the concurrency limit inside the claim, batches, stop conditions, offline
//! skips, retry hosts and grouped outputs.

use std::collections::BTreeMap;

use crate::store::dispatch::{DispatchPolicy, OfflinePolicy, RetryPolicy, Rollout, RolloutFields};
use crate::store::jobs::{
    Attempt, AttemptResult, FinishOutcome, JobStatus, LogChunk, NewRun, Reason, RunSpec, Stream,
};
use crate::store::now_ms;
use crate::store::tests::{Fixture, fixture_with as fixture};

impl Fixture {
    async fn agents(&self, names: &[&str]) -> Vec<String> {
        let mut ids = Vec::new();
        for name in names {
            ids.push(self.store.enroll_test_agent(name).await.id);
        }
        ids
    }

    /// One run over `agents`; returns the run id and the job of each agent, in `agents`' order.
    /// (Also used by `result_batch_tests.rs`.)
    pub(in crate::store) async fn run(
        &self,
        agents: &[String],
        max_attempts: u32,
        over: Option<(Rollout, RolloutFields)>,
    ) -> (String, Vec<String>) {
        let spec = RunSpec::manual(&NewRun {
            event_id: &self.event,
            kind: "bash",
            script: "true",
            env: &BTreeMap::new(),
            runtime_spec: None,
            input: None,
            timeout_seconds: 60,
            max_attempts,
            created_by: &self.owner,
            agent_ids: agents,
        })
        .unwrap();
        let (run_id, jobs) = self
            .store
            .create_run_dispatched(spec, over, None)
            .await
            .unwrap();
        let by_agent: BTreeMap<String, String> =
            jobs.into_iter().map(|(job, agent)| (agent, job)).collect();
        (
            run_id,
            agents.iter().map(|agent| by_agent[agent].clone()).collect(),
        )
    }

    async fn claim(&self, agent: &str, now: i64) -> Vec<String> {
        self.store
            .claim_jobs_at(agent, 10, now + 60_000, now)
            .await
            .unwrap()
            .into_iter()
            .map(|job| job.id)
            .collect()
    }

    async fn finish(&self, agent: &str, job: &str, exit_code: i32, output: &str) -> FinishOutcome {
        let attempt = self.store.job(job).await.unwrap().attempt;
        let (chunks, result) = ended(exit_code, output);
        self.store
            .finish_attempt(
                agent,
                &Attempt {
                    job_id: job.to_string(),
                    attempt,
                },
                &chunks,
                &result,
            )
            .await
            .unwrap()
    }

    async fn status(&self, job: &str) -> (JobStatus, Option<Reason>) {
        let job = self.store.job(job).await.unwrap();
        (job.status, job.reason)
    }
}

/// The last chunk and the result of an attempt that printed `output` and exited with
/// `exit_code` (also used by `result_batch_tests.rs`).
pub(in crate::store) fn ended(exit_code: i32, output: &str) -> (Vec<LogChunk>, AttemptResult) {
    let chunks = vec![LogChunk {
        offset: 0,
        stream: Stream::Stdout,
        data: output.as_bytes().to_vec(),
    }];
    let result = AttemptResult {
        status: if exit_code == 0 {
            JobStatus::Completed
        } else {
            JobStatus::Failed
        },
        reason: (exit_code != 0).then_some(Reason::ExitCode),
        exit_code: Some(exit_code),
        log_len: output.len() as u64,
        result: None,
        condition: None,
    };
    (chunks, result)
}

fn rollout(rollout: Rollout) -> DispatchPolicy {
    DispatchPolicy {
        rollout,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_failed_attempt_waits_for_its_backoff_and_keeps_what_failed() {
    let fixture = fixture(DispatchPolicy {
        retry: RetryPolicy {
            backoff_seconds: 10.0,
            factor: 2.0,
            max_backoff_seconds: 15.0,
        },
        ..Default::default()
    })
    .await;
    let agent = fixture.agents(&["a"]).await.remove(0);
    let (_, jobs) = fixture.run(std::slice::from_ref(&agent), 3, None).await;
    let job = &jobs[0];
    assert_eq!(fixture.claim(&agent, now_ms()).await, vec![job.clone()]);
    let before = now_ms();
    assert_eq!(
        fixture.finish(&agent, job, 3, "first try broke\n").await,
        FinishOutcome::Requeued
    );
    let stored = fixture.store.job(job).await.unwrap();
    let not_before = stored.not_before.expect("a retry has a due time");
    // 10 s plus at most 10 % jitter, from the moment of the failure.
    assert!(
        (before + 10_000..=now_ms() + 11_000).contains(&not_before),
        "{not_before} vs {before}"
    );
    let last: serde_json::Value =
        serde_json::from_str(stored.last_failure.as_deref().unwrap()).unwrap();
    assert_eq!(last["attempt"], 1);
    assert_eq!(last["reason"], "exit_code");
    assert_eq!(last["exit_code"], 3);
    assert_eq!(last["output_tail"], "first try broke");

    // Not claimable a millisecond early, claimable at the due time, with nothing else changed.
    assert!(fixture.claim(&agent, not_before - 1).await.is_empty());
    assert_eq!(
        fixture.store.next_due(before).await.unwrap(),
        Some(not_before)
    );
    assert_eq!(
        fixture.store.runners_due(before, not_before).await.unwrap(),
        vec![agent.clone()]
    );
    assert!(
        fixture
            .store
            .runners_due(before, not_before - 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(fixture.claim(&agent, not_before).await, vec![job.clone()]);
    assert_eq!(fixture.store.job(job).await.unwrap().attempt, 2);

    // The second failure doubles the delay, capped at 15 s.
    let before = now_ms();
    assert_eq!(
        fixture.finish(&agent, job, 4, "again\n").await,
        FinishOutcome::Requeued
    );
    let not_before = fixture.store.job(job).await.unwrap().not_before.unwrap();
    assert!((before + 15_000..=now_ms() + 16_500).contains(&not_before));
    assert!(fixture.claim(&agent, not_before - 1).await.is_empty());
    assert_eq!(fixture.claim(&agent, not_before).await, vec![job.clone()]);
}

#[tokio::test]
async fn the_concurrency_limit_holds_across_runners_and_within_one_claim() {
    let fixture = fixture(DispatchPolicy {
        max_concurrency: Some(1),
        ..Default::default()
    })
    .await;
    let agents = fixture.agents(&["a", "b", "c"]).await;
    let (_, jobs) = fixture.run(&agents, 1, None).await;
    let now = now_ms();
    assert_eq!(fixture.claim(&agents[0], now).await, vec![jobs[0].clone()]);
    assert!(fixture.claim(&agents[1], now).await.is_empty());
    assert!(fixture.claim(&agents[2], now).await.is_empty());
    // The end of the running job frees the slot, and names the runners to wake.
    fixture.finish(&agents[0], &jobs[0], 0, "ok").await;
    let mut wake = fixture
        .store
        .runners_to_wake(std::slice::from_ref(&jobs[0]), now_ms())
        .await
        .unwrap();
    wake.sort();
    let mut waiting = vec![agents[1].clone(), agents[2].clone()];
    waiting.sort();
    assert_eq!(wake, waiting);
    assert_eq!(fixture.claim(&agents[1], now).await, vec![jobs[1].clone()]);
    assert!(fixture.claim(&agents[2], now).await.is_empty());

    // One agent asking for many slots still gets one job of the event at a time.
    fixture.finish(&agents[1], &jobs[1], 0, "ok").await;
    fixture.finish_pending(&agents[2], &jobs[2]).await;
    let (_, more) = fixture.run(&[agents[0].clone()], 1, None).await;
    let (_, even_more) = fixture.run(&[agents[0].clone()], 1, None).await;
    let claimed = fixture.claim(&agents[0], now_ms()).await;
    assert_eq!(claimed, vec![more[0].clone()]);
    assert!(fixture.claim(&agents[0], now_ms()).await.is_empty());
    fixture.finish(&agents[0], &more[0], 0, "ok").await;
    assert_eq!(
        fixture.claim(&agents[0], now_ms()).await,
        vec![even_more[0].clone()]
    );
}

impl Fixture {
    /// Claims and completes `job`, the only claimable job of `agent`.
    async fn finish_pending(&self, agent: &str, job: &str) {
        assert_eq!(self.claim(agent, now_ms()).await, vec![job.to_string()]);
        self.finish(agent, job, 0, "ok").await;
    }
}

#[tokio::test]
async fn batches_open_in_name_order_and_max_failures_stops_the_rest() {
    let fixture = fixture(rollout(Rollout {
        batch_size: Some(2),
        max_failures: Some(2),
        ..Default::default()
    }))
    .await;
    // Enrolled out of name order: batches follow the names.
    let agents = fixture.agents(&["h4", "h2", "h5", "h1", "h3"]).await;
    let (run_id, jobs) = fixture.run(&agents, 1, None).await;
    let batch_of = |index: usize| {
        let store = fixture.store.clone();
        let job = jobs[index].clone();
        async move { store.job(&job).await.unwrap().batch }
    };
    // h1, h2 | h3, h4 | h5
    assert_eq!(
        [
            batch_of(3).await,
            batch_of(1).await,
            batch_of(4).await,
            batch_of(0).await,
            batch_of(2).await
        ],
        [0, 0, 1, 1, 2]
    );
    let (h4, h2, h5, h1, h3) = (&agents[0], &agents[1], &agents[2], &agents[3], &agents[4]);
    let now = now_ms();
    assert!(fixture.claim(h3, now).await.is_empty(), "batch 1 waits");
    assert!(fixture.claim(h5, now).await.is_empty(), "batch 2 waits");
    assert_eq!(fixture.claim(h1, now).await, vec![jobs[3].clone()]);
    assert_eq!(fixture.claim(h2, now).await, vec![jobs[1].clone()]);
    fixture.finish(h1, &jobs[3], 0, "ok").await;
    assert!(fixture.claim(h3, now).await.is_empty(), "h2 still runs");
    fixture.finish(h2, &jobs[1], 1, "bad").await;
    // Batch 1 opens; its runners are the ones to wake.
    let mut wake = fixture
        .store
        .runners_to_wake(std::slice::from_ref(&jobs[1]), now_ms())
        .await
        .unwrap();
    wake.sort();
    let mut expected = vec![h3.clone(), h4.clone(), h5.clone()];
    expected.sort();
    assert_eq!(wake, expected, "held-back runners of the event");
    assert_eq!(fixture.claim(h3, now).await, vec![jobs[4].clone()]);
    assert_eq!(fixture.claim(h4, now).await, vec![jobs[0].clone()]);
    assert!(fixture.claim(h5, now).await.is_empty(), "batch 2 waits");
    // The second failure trips the stop: h5 never starts, h4 keeps running.
    fixture.finish(h3, &jobs[4], 1, "bad").await;
    assert_eq!(
        fixture.status(&jobs[2]).await,
        (JobStatus::Cancelled, Some(Reason::RolloutStopped))
    );
    assert_eq!(fixture.status(&jobs[0]).await.0, JobStatus::Claimed);
    let dispatch = fixture.store.run_dispatch(&run_id).await.unwrap();
    assert_eq!(
        dispatch.stopped_reason.as_deref(),
        Some("max_failures: 2 host(s) failed (limit 2)")
    );
    assert_eq!((dispatch.batches, dispatch.current_batch), (3, Some(1)));
    fixture.finish(h4, &jobs[0], 0, "ok").await;
    assert_eq!(
        fixture
            .store
            .run_dispatch(&run_id)
            .await
            .unwrap()
            .current_batch,
        None
    );

    // Retry hosts: the failed ones, or those and the one that never started.
    let mut failed = fixture.store.retry_runners(&run_id, false).await.unwrap();
    failed.sort();
    let mut expected = vec![h2.clone(), h3.clone()];
    expected.sort();
    assert_eq!(failed, expected);
    let mut all = fixture.store.retry_runners(&run_id, true).await.unwrap();
    all.sort();
    expected.push(h5.clone());
    expected.sort();
    assert_eq!(all, expected);

    // Outputs: two "ok" completions, two "bad" failures.
    let groups = fixture.store.run_output_groups(&run_id).await.unwrap();
    let summary: Vec<(String, Option<i32>, usize, String)> = groups
        .iter()
        .map(|group| {
            (
                group.status.clone(),
                group.exit_code,
                group.job_ids.len(),
                group.sample_output.clone(),
            )
        })
        .collect();
    assert_eq!(summary.len(), 2, "{summary:?}");
    assert!(summary.contains(&("completed".into(), Some(0), 2, "ok".into())));
    assert!(summary.contains(&("failed".into(), Some(1), 2, "bad".into())));
}

#[tokio::test]
async fn min_success_percent_is_checked_when_a_batch_ends_and_an_override_applies() {
    let fixture = fixture(rollout(Rollout {
        batch_size: Some(2),
        ..Default::default()
    }))
    .await;
    let agents = fixture.agents(&["a", "b", "c", "d"]).await;
    let over = Rollout {
        min_success_percent: Some(60),
        ..Default::default()
    };
    let given = RolloutFields {
        min_success_percent: true,
        ..Default::default()
    };
    let (run_id, jobs) = fixture.run(&agents, 1, Some((over, given))).await;
    let now = now_ms();
    fixture.claim(&agents[0], now).await;
    fixture.claim(&agents[1], now).await;
    fixture.finish(&agents[0], &jobs[0], 1, "bad").await;
    // 0 % so far, but the batch has not ended.
    assert_eq!(fixture.status(&jobs[2]).await.0, JobStatus::Queued);
    fixture.finish(&agents[1], &jobs[1], 0, "ok").await;
    assert_eq!(
        fixture.status(&jobs[2]).await,
        (JobStatus::Cancelled, Some(Reason::RolloutStopped))
    );
    let dispatch = fixture.store.run_dispatch(&run_id).await.unwrap();
    assert_eq!(
        dispatch.batch_size,
        Some(2),
        "the event's batch size is kept"
    );
    assert!(
        dispatch
            .stopped_reason
            .unwrap()
            .starts_with("min_success_percent: 50%")
    );
}

#[tokio::test]
async fn offline_hosts_are_candidates_only_once_their_batch_started() {
    let fixture = fixture(rollout(Rollout {
        batch_percent: Some(50),
        offline: OfflinePolicy::Skip,
        ..Default::default()
    }))
    .await;
    let agents = fixture.agents(&["a", "b", "c"]).await;
    let (_, jobs) = fixture.run(&agents, 1, None).await;
    // 50 % of 3 rounds up: a, b | c.
    let candidates = fixture.store.offline_candidates(now_ms()).await.unwrap();
    let ids: Vec<&String> = candidates.iter().map(|(job, _)| job).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&&jobs[0]) && ids.contains(&&jobs[1]));
    // b is offline: skipped; a runs.
    assert_eq!(
        fixture
            .store
            .skip_offline(&[jobs[1].clone()])
            .await
            .unwrap(),
        vec![jobs[1].clone()]
    );
    assert_eq!(
        fixture.status(&jobs[1]).await,
        (JobStatus::Cancelled, Some(Reason::Offline))
    );
    fixture.finish_pending(&agents[0], &jobs[0]).await;
    let candidates = fixture.store.offline_candidates(now_ms()).await.unwrap();
    assert_eq!(candidates, vec![(jobs[2].clone(), agents[2].clone())]);
    // A job claimed meanwhile is left alone.
    fixture.claim(&agents[2], now_ms()).await;
    assert!(
        fixture
            .store
            .skip_offline(&[jobs[2].clone()])
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn policies_are_validated() {
    assert!(RetryPolicy::default().validate().is_ok());
    let bad = RetryPolicy {
        backoff_seconds: 10.0,
        factor: 2.0,
        max_backoff_seconds: 5.0,
    };
    assert_eq!(bad.validate().unwrap_err().0, "retry.max_backoff_seconds");
    let both = Rollout {
        batch_size: Some(1),
        batch_percent: Some(10),
        ..Default::default()
    };
    assert_eq!(
        both.validate("rollout").unwrap_err().0,
        "rollout.batch_size"
    );
    let deadline = Rollout {
        offline: OfflinePolicy::Skip,
        deadline_seconds: Some(5),
        ..Default::default()
    };
    assert_eq!(
        deadline.validate("rollout").unwrap_err().0,
        "rollout.deadline_seconds"
    );
    assert_eq!(
        crate::store::dispatch::backoff_ms(5_000, 2.0, 300_000, 1),
        5_000
    );
    assert_eq!(
        crate::store::dispatch::backoff_ms(5_000, 2.0, 300_000, 3),
        20_000
    );
    assert_eq!(
        crate::store::dispatch::backoff_ms(5_000, 2.0, 300_000, 60),
        300_000
    );
}
