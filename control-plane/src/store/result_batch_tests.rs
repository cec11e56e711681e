//! Results recorded together (`result_batch`): one batch mixing the common path (completions
//! and failures with their logs, a rollout stop they trip) with every case of the general path
//! (a length mismatch, a stale attempt, a retry, the same result twice) answers and stores each
//! exactly as one result at a time would.

use super::super::dispatch::{DispatchPolicy, Rollout};
use super::super::jobs::{Attempt, AttemptResult, FinishOutcome, JobStatus, LogChunk};
use super::super::now_ms;
use super::super::tests::{Fixture, fixture_with};

/// The result of an attempt that printed `output` and exited with `exit_code`, with a
/// `result` of its own.
fn ended(exit_code: i32, output: &str) -> (Vec<LogChunk>, AttemptResult) {
    let (chunks, mut result) = super::super::dispatch::tests::ended(exit_code, output);
    result.result = Some(format!("result of {output}"));
    (chunks, result)
}

async fn log_of(fixture: &Fixture, job: &str) -> String {
    let chunks = fixture.store.logs(job, 0, 1 << 20).await.unwrap();
    chunks
        .into_iter()
        .map(|chunk| String::from_utf8(chunk.data).unwrap())
        .collect()
}

#[tokio::test]
async fn one_batch_records_every_kind_of_result_as_one_at_a_time_would() {
    // Stop after two failures; every host in one rollout batch.
    let fixture = fixture_with(DispatchPolicy {
        rollout: Rollout {
            max_failures: Some(2),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let store = &fixture.store;
    let mut agents = Vec::new();
    for index in 0..12 {
        agents.push(
            store
                .enroll_test_agent(&format!("host-{index:02}"))
                .await
                .id,
        );
    }
    // host-00..09 and host-11 run the run that stops; host-11 never claims (its job is
    // cancelled by the stop). host-10 runs a job with two attempts.
    let mut stopping: Vec<String> = agents[..10].to_vec();
    stopping.push(agents[11].clone());
    let (run_id, jobs) = fixture.run(&stopping, 1, None).await;
    let (_, retried) = fixture.run(&agents[10..11], 2, None).await;
    let now = now_ms();
    for agent in &agents[..11] {
        store
            .claim_jobs_at(agent, 10, now + 60_000, now)
            .await
            .unwrap();
    }
    let attempt = |job: &str, attempt: u32| Attempt {
        job_id: job.to_string(),
        attempt,
    };
    let mut reports: Vec<(String, Attempt, Vec<LogChunk>, AttemptResult)> = Vec::new();
    for (index, agent) in agents[..6].iter().enumerate() {
        let (chunks, result) = ended(0, &format!("ok {index}\n"));
        reports.push((agent.clone(), attempt(&jobs[index], 1), chunks, result));
    }
    for index in 6..8 {
        let (chunks, result) = ended(1, &format!("bad {index}\n"));
        reports.push((
            agents[index].clone(),
            attempt(&jobs[index], 1),
            chunks,
            result,
        ));
    }
    // A length the chunks do not make.
    let (chunks, mut result) = ended(0, "short\n");
    result.log_len += 1;
    reports.push((agents[8].clone(), attempt(&jobs[8], 1), chunks, result));
    // An attempt that is not the current one.
    let (chunks, result) = ended(0, "stale\n");
    reports.push((agents[9].clone(), attempt(&jobs[9], 2), chunks, result));
    // A failure with an attempt left.
    let (chunks, result) = ended(3, "again\n");
    reports.push((agents[10].clone(), attempt(&retried[0], 1), chunks, result));
    // host-00's result delivered twice.
    let first = reports[0].clone();
    reports.push(first);

    // Hold the writer so that every result joins one batch.
    let (holder, release) = super::super::writer_tests::hold_writer(store).await;
    let mut finishing = Vec::new();
    for (agent, attempt, chunks, result) in &reports {
        let mut future = Box::pin(store.finish_attempt(agent, attempt, chunks, result));
        // A result joins the waiting batch at its first poll.
        assert!(futures_util::poll!(future.as_mut()).is_pending());
        finishing.push(future);
    }
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    let outcomes: Vec<FinishOutcome> = futures_util::future::join_all(finishing)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let recorded = FinishOutcome::Recorded { notified: false };
    assert_eq!(
        outcomes,
        vec![
            recorded.clone(),
            recorded.clone(),
            recorded.clone(),
            recorded.clone(),
            recorded.clone(),
            recorded.clone(),
            recorded.clone(),
            recorded,
            FinishOutcome::LengthMismatch { stored: 6 },
            FinishOutcome::Stale,
            FinishOutcome::Requeued,
            FinishOutcome::Duplicate,
        ]
    );
    for (index, job_id) in jobs.iter().enumerate().take(8) {
        let job = store.job(job_id).await.unwrap();
        let (status, output) = if index < 6 {
            (JobStatus::Completed, format!("ok {index}\n"))
        } else {
            (JobStatus::Failed, format!("bad {index}\n"))
        };
        assert_eq!((job.status, job.attempt), (status, 1), "host-{index:02}");
        assert_eq!(job.log_len, output.len() as u64);
        assert_eq!(log_of(&fixture, job_id).await, output);
        assert_eq!(
            job.result.as_deref(),
            Some(format!("result of {output}").as_str())
        );
    }
    // Refused results leave no trace.
    for index in [8, 9] {
        let job = store.job(&jobs[index]).await.unwrap();
        assert_eq!((job.status, job.log_len), (JobStatus::Claimed, 0));
        assert_eq!(log_of(&fixture, &jobs[index]).await, "");
    }
    assert_eq!(store.count_audit("stale_result").await.unwrap(), 1);
    // The retried job is queued again, its failure kept, its log cleared.
    let job = store.job(&retried[0]).await.unwrap();
    assert_eq!(
        (job.status, job.attempt, job.log_len),
        (JobStatus::Queued, 1, 0)
    );
    // Two failures stopped the rollout: the job nobody claimed is cancelled.
    let dispatch = store.run_dispatch(&run_id).await.unwrap();
    assert_eq!(
        dispatch.stopped_reason.as_deref(),
        Some("max_failures: 2 host(s) failed (limit 2)")
    );
    assert_eq!(
        store.job(&jobs[10]).await.unwrap().status,
        JobStatus::Cancelled
    );
}
