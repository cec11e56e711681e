//! Unit tests of the queue's guarantees against a real SQLite file.

use std::collections::{BTreeMap, HashSet};

use super::Store;
use super::agents::{Labels, NewAgent, TokenRefusal};
use super::events::{EventFields, EventKind, Runtime, Targets};
use super::jobs::{
    Attempt, AttemptResult, CancelOutcome, FinishOutcome, JobStatus, LogChunk, NewRun,
    OpenedAttempt, Reason, Stream,
};
use super::now_ms;
use super::users::Role;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    owner: String,
    event: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("test.db"))
        .await
        .unwrap();
    let owner = store
        .create_user("owner", "hash", Role::User)
        .await
        .unwrap()
        .id;
    let fields = EventFields {
        name: "e".into(),
        kind: EventKind::Bash,
        script: "true".into(),
        runtime: Runtime::Host,
        targets: Targets::default(),
        timeout_seconds: 60,
        retries: 0,
        env: BTreeMap::new(),
        docker: Default::default(),
        schedule: None,
        next_run_at: None,
        reschedule: false,
    };
    let event = store.create_event(&owner, &fields).await.unwrap().id;
    Fixture {
        _dir: dir,
        store,
        owner,
        event,
    }
}

impl Fixture {
    async fn agent(&self, name: &str) -> String {
        let token = format!("token-{name}");
        self.store
            .create_enrollment_token(&token, &Labels::new(), 1, now_ms() + 60_000, None)
            .await
            .unwrap();
        let new_agent = NewAgent {
            token_sha256: &token,
            name,
            extra_labels: &Labels::new(),
            hostname: "h",
            os: "linux",
            arch: "x86_64",
        };
        let (agent, _) = self.store.enroll_agent(new_agent).await.unwrap().unwrap();
        self.store
            .set_agent_certificate(&agent.id, &format!("cert-{name}"))
            .await
            .unwrap();
        agent.id
    }

    async fn jobs(&self, agent_id: &str, count: usize, max_attempts: u32) -> Vec<String> {
        let agents = vec![agent_id.to_string()];
        let mut ids = Vec::new();
        for _ in 0..count {
            let (_, jobs) = self
                .store
                .create_run(NewRun {
                    event_id: &self.event,
                    kind: "bash",
                    script: "true",
                    env: &BTreeMap::new(),
                    runtime_spec: None,
                    input: None,
                    timeout_seconds: 60,
                    max_attempts,
                    created_by: &self.owner,
                    agent_ids: &agents,
                })
                .await
                .unwrap();
            ids.extend(jobs.into_iter().map(|(id, _)| id));
        }
        ids
    }
}

fn completed(log_len: u64) -> AttemptResult {
    AttemptResult {
        status: JobStatus::Completed,
        reason: None,
        exit_code: Some(0),
        log_len,
        result: None,
        condition: None,
    }
}

#[tokio::test]
async fn concurrent_claims_hand_out_every_job_exactly_once() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let created: HashSet<String> = fixture.jobs(&agent, 60, 1).await.into_iter().collect();
    let lease = now_ms() + 60_000;
    let claims = (0..8).map(|_| fixture.store.claim_jobs(&agent, 5, lease));
    let mut claimed = Vec::new();
    for batch in futures_util::future::join_all(claims).await {
        claimed.extend(batch.unwrap());
    }
    while let Ok(batch) = fixture.store.claim_jobs(&agent, 7, lease).await {
        if batch.is_empty() {
            break;
        }
        claimed.extend(batch);
    }
    let ids: Vec<String> = claimed.iter().map(|job| job.id.clone()).collect();
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), 60, "every job is claimed once");
    assert_eq!(unique, created);
    assert!(claimed.iter().all(|job| job.attempt == 1));
}

#[tokio::test]
async fn a_claim_takes_only_the_agents_own_jobs() {
    let fixture = fixture().await;
    let first = fixture.agent("a").await;
    let second = fixture.agent("b").await;
    fixture.jobs(&first, 3, 1).await;
    assert!(
        fixture
            .store
            .claim_jobs(&second, 10, now_ms() + 1000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        fixture
            .store
            .claim_jobs(&first, 10, now_ms() + 1000)
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn an_expired_lease_requeues_while_attempts_remain_then_fails_as_lost() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let job = fixture.jobs(&agent, 1, 2).await.remove(0);
    let claimed = fixture
        .store
        .claim_jobs(&agent, 1, now_ms() - 1)
        .await
        .unwrap();
    assert_eq!(claimed[0].attempt, 1);
    let expired = fixture.store.expire_leases(now_ms()).await.unwrap();
    assert!(expired[0].requeued);
    assert_eq!(
        fixture.store.job(&job).await.unwrap().status,
        JobStatus::Queued
    );

    let claimed = fixture
        .store
        .claim_jobs(&agent, 1, now_ms() - 1)
        .await
        .unwrap();
    assert_eq!(claimed[0].attempt, 2);
    let expired = fixture.store.expire_leases(now_ms()).await.unwrap();
    assert!(!expired[0].requeued);
    let settled = fixture.store.job(&job).await.unwrap();
    assert_eq!(
        (settled.status, settled.reason),
        (JobStatus::Failed, Some(Reason::Lost))
    );

    // The first attempt's agent comes back with a result: refused and audited.
    let first = Attempt {
        job_id: job.clone(),
        attempt: 1,
    };
    assert_eq!(
        fixture.store.open_attempt(&agent, &first).await.unwrap(),
        OpenedAttempt::Stale
    );
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &first, &[], &completed(0))
            .await
            .unwrap(),
        FinishOutcome::Stale
    );
    // So is the second one's, since the lease settled it.
    let second = Attempt {
        job_id: job.clone(),
        attempt: 2,
    };
    let outcome = fixture
        .store
        .finish_attempt(&agent, &second, &[], &completed(settled.log_len))
        .await
        .unwrap();
    assert_eq!(outcome, FinishOutcome::Stale);
    assert_eq!(fixture.store.count_audit("stale_result").await.unwrap(), 2);
    assert_eq!(
        fixture.store.job(&job).await.unwrap().status,
        JobStatus::Failed
    );
}

#[tokio::test]
async fn a_result_is_recorded_once_and_a_replay_is_a_duplicate() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let job = fixture.jobs(&agent, 1, 1).await.remove(0);
    fixture
        .store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    let attempt = Attempt {
        job_id: job.clone(),
        attempt: 1,
    };
    let first = LogChunk {
        offset: 0,
        stream: Stream::Stdout,
        data: b"hello ".to_vec(),
    };
    assert_eq!(
        fixture
            .store
            .append_logs(&agent, &attempt, true, &[first])
            .await
            .unwrap(),
        Some(6)
    );
    assert_eq!(
        fixture.store.job(&job).await.unwrap().status,
        JobStatus::Running
    );

    // A result claiming more output than stored changes nothing.
    let outcome = fixture
        .store
        .finish_attempt(&agent, &attempt, &[], &completed(99))
        .await
        .unwrap();
    assert_eq!(outcome, FinishOutcome::LengthMismatch { stored: 6 });

    let last = LogChunk {
        offset: 6,
        stream: Stream::Stderr,
        data: b"world".to_vec(),
    };
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[last], &completed(11))
            .await
            .unwrap(),
        FinishOutcome::Recorded
    );
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &completed(11))
            .await
            .unwrap(),
        FinishOutcome::Duplicate
    );
    assert_eq!(
        fixture.store.open_attempt(&agent, &attempt).await.unwrap(),
        OpenedAttempt::Finished { log_len: 11 }
    );
    let job = fixture.store.job(&job).await.unwrap();
    assert_eq!(
        (job.status, job.exit_code, job.log_len),
        (JobStatus::Completed, Some(0), 11)
    );
    let log: Vec<u8> = fixture
        .store
        .logs(&job.id, 0, 1024)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|chunk| chunk.data)
        .collect();
    assert_eq!(log, b"hello world");
}

#[tokio::test]
async fn another_agent_cannot_report_for_an_attempt() {
    let fixture = fixture().await;
    let owner = fixture.agent("a").await;
    let intruder = fixture.agent("b").await;
    let job = fixture.jobs(&owner, 1, 1).await.remove(0);
    fixture
        .store
        .claim_jobs(&owner, 1, now_ms() + 60_000)
        .await
        .unwrap();
    let attempt = Attempt {
        job_id: job.clone(),
        attempt: 1,
    };
    assert_eq!(
        fixture
            .store
            .open_attempt(&intruder, &attempt)
            .await
            .unwrap(),
        OpenedAttempt::Stale
    );
    assert_eq!(
        fixture
            .store
            .append_logs(&intruder, &attempt, true, &[])
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        fixture
            .store
            .finish_attempt(&intruder, &attempt, &[], &completed(0))
            .await
            .unwrap(),
        FinishOutcome::Stale
    );
    assert_eq!(
        fixture.store.job(&job).await.unwrap().status,
        JobStatus::Claimed
    );
}

#[tokio::test]
async fn a_failed_attempt_is_retried_while_attempts_remain() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let job = fixture.jobs(&agent, 1, 2).await.remove(0);
    fixture
        .store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    let failed = AttemptResult {
        status: JobStatus::Failed,
        reason: Some(Reason::ExitCode),
        exit_code: Some(1),
        log_len: 0,
        result: None,
        condition: None,
    };
    let attempt = Attempt {
        job_id: job.clone(),
        attempt: 1,
    };
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &failed)
            .await
            .unwrap(),
        FinishOutcome::Requeued
    );
    let claimed = fixture
        .store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(claimed[0].attempt, 2);
    let attempt = Attempt {
        job_id: job.clone(),
        attempt: 2,
    };
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &failed)
            .await
            .unwrap(),
        FinishOutcome::Recorded
    );
    let job = fixture.store.job(&job).await.unwrap();
    assert_eq!(
        (job.status, job.attempt, job.exit_code),
        (JobStatus::Failed, 2, Some(1))
    );
}

#[tokio::test]
async fn cancelling_a_queued_job_ends_it_and_a_running_one_asks_its_agent() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let jobs = fixture.jobs(&agent, 2, 1).await;
    assert_eq!(
        fixture.store.request_cancel(&jobs[0]).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let claimed = fixture
        .store
        .claim_jobs(&agent, 5, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "a cancelled job is never claimed");
    assert_eq!(
        fixture.store.request_cancel(&jobs[1]).await.unwrap(),
        CancelOutcome::Requested {
            agent_id: agent.clone(),
            attempt: 1
        }
    );
    // The heartbeat reports the pending cancel until the agent settles the attempt.
    let attempt = Attempt {
        job_id: jobs[1].clone(),
        attempt: 1,
    };
    let (abandoned, cancel) = fixture
        .store
        .renew_leases(&agent, std::slice::from_ref(&attempt), now_ms() + 60_000)
        .await
        .unwrap();
    assert!(abandoned.is_empty());
    assert_eq!(cancel, vec![attempt]);
    assert_eq!(
        fixture.store.request_cancel(&jobs[0]).await.unwrap(),
        CancelOutcome::AlreadyFinal
    );
}

#[tokio::test]
async fn a_one_use_enrollment_token_enrolls_exactly_one_of_many_concurrent_agents() {
    let fixture = fixture().await;
    fixture
        .store
        .create_enrollment_token("once", &Labels::new(), 1, now_ms() + 60_000, None)
        .await
        .unwrap();
    let names: Vec<String> = (0..10).map(|index| format!("host-{index}")).collect();
    let no_labels = Labels::new();
    let attempts = names.iter().map(|name| {
        fixture.store.enroll_agent(NewAgent {
            token_sha256: "once",
            name,
            extra_labels: &no_labels,
            hostname: "h",
            os: "linux",
            arch: "x86_64",
        })
    });
    let results = futures_util::future::join_all(attempts).await;
    let enrolled = results
        .iter()
        .filter(|result| matches!(result, Ok(Ok(_))))
        .count();
    let refused = results
        .iter()
        .filter(|result| matches!(result, Ok(Err(TokenRefusal::UsedUp))))
        .count();
    assert_eq!((enrolled, refused), (1, 9));

    fixture
        .store
        .create_enrollment_token("old", &Labels::new(), 5, now_ms() - 1, None)
        .await
        .unwrap();
    let expired = fixture
        .store
        .enroll_agent(NewAgent {
            token_sha256: "old",
            name: "late",
            extra_labels: &Labels::new(),
            hostname: "h",
            os: "",
            arch: "",
        })
        .await
        .unwrap();
    assert!(matches!(expired, Err(TokenRefusal::Expired)));
}

#[tokio::test]
async fn a_restart_extends_leases_so_agents_can_reconnect() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    fixture.jobs(&agent, 1, 1).await;
    fixture
        .store
        .claim_jobs(&agent, 1, now_ms() - 10)
        .await
        .unwrap();
    assert_eq!(
        fixture
            .store
            .extend_active_leases(now_ms() + 60_000)
            .await
            .unwrap(),
        1
    );
    assert!(
        fixture
            .store
            .expire_leases(now_ms())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_failing_write_in_a_group_commit_does_not_undo_the_others() {
    let fixture = fixture().await;
    // Many concurrent writes land in shared commits; the duplicates fail on their own.
    let names: Vec<String> = (0..40)
        .map(|index| format!("user-{}", index % 20))
        .collect();
    let writes = names
        .iter()
        .map(|name| fixture.store.create_user(name, "hash", Role::Viewer));
    let results = futures_util::future::join_all(writes).await;
    let created = results.iter().filter(|result| result.is_ok()).count();
    let refused = results
        .iter()
        .filter(|result| matches!(result, Err(super::StoreError::Constraint(_))))
        .count();
    assert_eq!((created, refused), (20, 20));
    for index in 0..20 {
        assert!(
            fixture
                .store
                .user_with_password(&format!("user-{index}"))
                .await
                .unwrap()
                .is_some()
        );
    }
}

#[tokio::test]
async fn helper_writes_apply_once_per_sequence_number_and_only_for_the_current_attempt() {
    use super::tools::{SealedConfig, ToolKind};
    use super::variables::{HelperRead, HelperWrite, HelperWriteOutcome};

    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let other_agent = fixture.agent("b").await;
    let job = fixture.jobs(&agent, 1, 2).await.remove(0);
    let set = |value: &str| HelperWrite::SetVariable {
        name: "counter".into(),
        sealed_value: value.as_bytes().to_vec(),
    };
    let store = &fixture.store;

    // Not claimed yet: stale, and audited.
    assert_eq!(
        store
            .helper_write(&agent, &job, 1, 1, set("0"))
            .await
            .unwrap(),
        HelperWriteOutcome::Stale
    );
    store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        store
            .helper_write(&agent, &job, 1, 1, set("1"))
            .await
            .unwrap(),
        HelperWriteOutcome::Applied
    );
    // A replay of the same sequence number changes nothing.
    assert_eq!(
        store
            .helper_write(&agent, &job, 1, 1, set("replayed"))
            .await
            .unwrap(),
        HelperWriteOutcome::Duplicate
    );
    assert_eq!(
        store
            .helper_write(&agent, &job, 1, 2, set("2"))
            .await
            .unwrap(),
        HelperWriteOutcome::Applied
    );
    // Another agent, or an old attempt, cannot write for the job.
    assert_eq!(
        store
            .helper_write(&other_agent, &job, 1, 3, set("x"))
            .await
            .unwrap(),
        HelperWriteOutcome::Stale
    );
    assert_eq!(
        store
            .helper_write(&agent, &job, 2, 3, set("x"))
            .await
            .unwrap(),
        HelperWriteOutcome::Stale
    );
    assert_eq!(
        store
            .helper_get_variable(&other_agent, &job, 1, "counter")
            .await
            .unwrap(),
        HelperRead::Stale
    );
    assert_eq!(
        store
            .helper_get_variable(&agent, &job, 1, "counter")
            .await
            .unwrap(),
        HelperRead::Value(Some(b"2".to_vec()))
    );
    assert_eq!(
        store
            .helper_get_variable(&agent, &job, 1, "missing")
            .await
            .unwrap(),
        HelperRead::Value(None)
    );
    let variable = store.variable(&fixture.owner, "counter").await.unwrap();
    assert_eq!(variable.sealed_value, b"2");
    assert_eq!(variable.updated_by_job.as_deref(), Some(job.as_str()));
    assert_eq!(store.count_audit("helper_write_stale").await.unwrap(), 3);

    // Notifications: no tool, then the only tool by default, a named one, an unknown one.
    let notify = |tool: Option<&str>| HelperWrite::Notify {
        tool: tool.map(str::to_owned),
        title: None,
        message: "hello".into(),
    };
    assert!(matches!(
        store.helper_write(&agent, &job, 1, 3, notify(None)).await.unwrap(),
        HelperWriteOutcome::NoTool(message) if message.contains("no tool")
    ));
    let sealed = || SealedConfig {
        sealed: b"sealed".to_vec(),
        target_host: "127.0.0.1".into(),
    };
    store
        .create_tool(&fixture.owner, "ops", ToolKind::Webhook, sealed())
        .await
        .unwrap();
    assert!(matches!(
        store
            .helper_write(&agent, &job, 1, 4, notify(None))
            .await
            .unwrap(),
        HelperWriteOutcome::Notified(_)
    ));
    store
        .create_tool(&fixture.owner, "dev", ToolKind::Slack, sealed())
        .await
        .unwrap();
    assert!(matches!(
        store.helper_write(&agent, &job, 1, 5, notify(None)).await.unwrap(),
        HelperWriteOutcome::NoTool(message) if message.contains("several tools")
    ));
    assert!(matches!(
        store
            .helper_write(&agent, &job, 1, 6, notify(Some("dev")))
            .await
            .unwrap(),
        HelperWriteOutcome::Notified(_)
    ));
    assert!(matches!(
        store.helper_write(&agent, &job, 1, 7, notify(Some("nope"))).await.unwrap(),
        HelperWriteOutcome::NoTool(message) if message.contains("\"nope\"")
    ));
    // A replayed notification is not sent twice.
    assert_eq!(
        store
            .helper_write(&agent, &job, 1, 6, notify(Some("dev")))
            .await
            .unwrap(),
        HelperWriteOutcome::Duplicate
    );
    assert_eq!(
        store
            .notifications(Some(&fixture.owner), None, 100)
            .await
            .unwrap()
            .len(),
        2
    );

    // A new attempt starts its sequence numbers again.
    store
        .expire_attempts_now(
            &agent,
            &[Attempt {
                job_id: job.clone(),
                attempt: 1,
            }],
        )
        .await
        .unwrap();
    store.expire_leases(now_ms()).await.unwrap();
    store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(
        store
            .helper_write(&agent, &job, 2, 1, set("3"))
            .await
            .unwrap(),
        HelperWriteOutcome::Applied
    );
}
