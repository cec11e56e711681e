//! The lease sweep with several writers: two stores on one database (as two replicas) sweep at
//! the same time, and results race the sweeps. Each expired attempt is settled exactly once, and
//! a result the sweep did not settle first is never overwritten. On PostgreSQL this exercises the
//! locked read and the re-checked `UPDATE`s of `store::lease_expiry`; on SQLite the two stores'
//! writers take turns on the file's write lock.

use std::collections::{BTreeMap, BTreeSet};

use super::super::jobs::{Attempt, ExpiredJob, FinishOutcome, Reason, RunSpec};
use super::super::users::Role;
use super::super::{Store, now_ms};

/// One user, one bash event, one agent; `count` jobs of that agent with `max_attempts` each,
/// then every one of them claimed with a lease that has already run out. Returns the agent
/// and the jobs.
async fn expired_jobs(store: &Store, count: usize, max_attempts: &[u32]) -> (String, Vec<String>) {
    let owner = store
        .create_user("owner", "hash", Role::User)
        .await
        .unwrap()
        .id;
    let fields = super::super::tests::bash_fields("e", None);
    let event = store.create_event(&owner, &fields).await.unwrap().id;
    let agent = store.enroll_test_agent("a").await.id;
    let mut jobs = Vec::new();
    for index in 0..count {
        let spec = RunSpec {
            max_attempts: max_attempts[index % max_attempts.len()],
            ..super::super::tests::bash_run(&event, &owner, std::slice::from_ref(&agent))
        };
        let (_, pairs) = store.create_run_dispatched(spec, None, None).await.unwrap();
        jobs.extend(pairs.into_iter().map(|(job, _)| job));
    }
    let mut claimed = BTreeSet::new();
    loop {
        let batch = store.claim_jobs(&agent, 500, now_ms() - 1).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for job in batch {
            assert_eq!(job.attempt, 1);
            assert!(claimed.insert(job.id));
        }
    }
    assert_eq!(claimed.len(), count, "every job claimed once");
    (agent, jobs)
}

/// `(status, reason, settled_by, attempt, log)` of a job, from the database.
async fn settled(
    store: &Store,
    job: &str,
) -> (String, Option<String>, Option<String>, i64, String) {
    let (status, reason, settled_by, attempt): (String, Option<String>, Option<String>, i64) =
        sqlx::query_as("SELECT status, reason, settled_by, attempt FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&store.reader)
            .await
            .unwrap();
    let chunks: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT data FROM job_logs WHERE job_id = $1 ORDER BY \"offset\"")
            .bind(job)
            .fetch_all(&store.reader)
            .await
            .unwrap();
    let log = String::from_utf8(chunks.concat()).unwrap();
    (status, reason, settled_by, attempt, log)
}

/// Sweeps through every store with `rounds` concurrent sweeps each; every job a sweep reported.
async fn sweep_concurrently(stores: &[Store], rounds: usize) -> Vec<ExpiredJob> {
    let mut sweeps = Vec::new();
    for store in stores {
        for _ in 0..rounds {
            let store = store.clone();
            sweeps.push(tokio::spawn(async move {
                let mut expired = Vec::new();
                for _ in 0..3 {
                    expired.extend(store.expire_leases(now_ms()).await.unwrap());
                    tokio::task::yield_now().await;
                }
                expired
            }));
        }
    }
    let mut expired = Vec::new();
    for sweep in sweeps {
        expired.extend(sweep.await.unwrap());
    }
    expired
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_sweeping_at_once_settle_each_expired_attempt_exactly_once() {
    let (_db, stores) = super::super::test_db::open_test_stores(2).await;
    // Half will be queued again (a second attempt left), half settled `lost`.
    let (_, jobs) = expired_jobs(&stores[0], 120, &[1, 2]).await;
    let expired = sweep_concurrently(&stores, 4).await;

    let mut by_job: BTreeMap<&str, Vec<&ExpiredJob>> = BTreeMap::new();
    for job in &expired {
        by_job.entry(job.job_id.as_str()).or_default().push(job);
    }
    for (job, reports) in &by_job {
        assert_eq!(
            reports.len(),
            1,
            "job {job} was settled by {} sweeps",
            reports.len()
        );
    }
    assert_eq!(
        by_job.keys().copied().collect::<BTreeSet<_>>(),
        jobs.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "every expired attempt is settled"
    );
    for (index, job) in jobs.iter().enumerate() {
        let (status, reason, settled_by, attempt, log) = settled(&stores[0], job).await;
        assert_eq!(attempt, 1);
        if index % 2 == 1 {
            assert!(by_job[job.as_str()][0].requeued);
            assert_eq!((status.as_str(), log.as_str()), ("queued", ""));
        } else {
            assert!(!by_job[job.as_str()][0].requeued);
            assert_eq!(
                (status.as_str(), reason.as_deref(), settled_by.as_deref()),
                ("failed", Some("lost"), Some("lease"))
            );
            assert_eq!(
                log.matches("[cronium: attempt 1 lost").count(),
                1,
                "one note in {log:?}"
            );
        }
    }
    assert_eq!(
        stores[0].count_audit("lease_expired").await.unwrap(),
        jobs.len() as i64,
        "one audit entry per settled attempt"
    );
    // Nothing is left to sweep.
    assert!(stores[1].expire_leases(now_ms()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_racing_sweeps_of_two_stores_are_either_recorded_or_stale_never_both() {
    let (_db, stores) = super::super::test_db::open_test_stores(2).await;
    let (agent, jobs) = expired_jobs(&stores[0], 160, &[1, 2]).await;

    // Results of every attempt through both stores while both sweep.
    let mut results = Vec::new();
    for (index, job) in jobs.iter().enumerate() {
        let store = stores[index % 2].clone();
        let (agent, job) = (agent.clone(), job.clone());
        results.push(tokio::spawn(async move {
            let attempt = Attempt {
                job_id: job.clone(),
                attempt: 1,
            };
            let (_, result) = super::super::dispatch::tests::ended(0, "");
            let outcome = store
                .finish_attempt(&agent, &attempt, &[], &result)
                .await
                .unwrap();
            (job, outcome)
        }));
    }
    let mut expired = sweep_concurrently(&stores, 2).await;
    let mut outcomes = BTreeMap::new();
    for result in results {
        let (job, outcome) = result.await.unwrap();
        outcomes.insert(job, outcome);
    }
    // Whatever the results left expired is swept now.
    expired.extend(stores[1].expire_leases(now_ms()).await.unwrap());

    let mut swept: BTreeMap<&str, &ExpiredJob> = BTreeMap::new();
    for job in &expired {
        assert!(
            swept.insert(job.job_id.as_str(), job).is_none(),
            "job {} was settled by two sweeps",
            job.job_id
        );
    }
    let mut stale = 0;
    for job in &jobs {
        let (status, reason, settled_by, attempt, _) = settled(&stores[0], job).await;
        assert_eq!(attempt, 1, "nothing claimed job {job} again");
        match (&outcomes[job], swept.get(job.as_str())) {
            (FinishOutcome::Recorded { .. }, None) => assert_eq!(
                (status.as_str(), settled_by.as_deref()),
                ("completed", Some("agent")),
                "job {job}: its recorded result was overwritten"
            ),
            (FinishOutcome::Stale, Some(expiry)) => {
                stale += 1;
                if expiry.requeued {
                    assert_eq!(status, "queued", "job {job}");
                } else {
                    assert_eq!(
                        (status.as_str(), reason.as_deref(), settled_by.as_deref()),
                        ("failed", Some(Reason::Lost.as_str()), Some("lease")),
                        "job {job}"
                    );
                }
            }
            (outcome, expiry) => panic!(
                "job {job}: result {outcome:?} and sweep {:?} (status {status})",
                expiry.map(|job| job.requeued)
            ),
        }
    }
    assert_eq!(
        stores[0].count_audit("stale_result").await.unwrap(),
        stale,
        "every refused result is audited"
    );
    assert_eq!(
        stores[0].count_audit("lease_expired").await.unwrap(),
        swept.len() as i64
    );
}
