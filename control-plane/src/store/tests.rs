//! Unit tests of the queue's guarantees against a real SQLite file.

use std::collections::{BTreeMap, HashSet};

use sqlx::AssertSqlSafe;

use super::Store;
use super::agents::{Labels, NewAgent, TokenRefusal};
use super::events::{EventFields, EventKind, Runtime, Targets};
use super::jobs::{
    Attempt, AttemptResult, CancelOutcome, FinishOutcome, JobStatus, LogChunk, NewRun,
    OpenedAttempt, Reason, Stream,
};
use super::now_ms;
use super::users::Role;

/// A store in a temp dir with one user and one bash event (no targets). Shared with
/// `dispatch_tests.rs`.
pub(super) struct Fixture {
    _db: super::test_db::TestDatabase,
    pub(super) store: Store,
    pub(super) owner: String,
    pub(super) event: String,
}

async fn fixture() -> Fixture {
    // Retries here are queued again at once; the backoff has its own tests (dispatch_tests.rs).
    fixture_with(super::dispatch::DispatchPolicy {
        retry: super::dispatch::RetryPolicy {
            backoff_seconds: 0.0,
            factor: 1.0,
            max_backoff_seconds: 0.0,
        },
        ..Default::default()
    })
    .await
}

/// A manual run of `event` by `owner`, one `true` bash job per agent, one attempt each (also
/// used by the claim, lease and rollout tests).
pub(super) fn bash_run(event: &str, owner: &str, agents: &[String]) -> super::jobs::RunSpec {
    super::jobs::RunSpec {
        event_id: event.to_string(),
        kind: "bash".into(),
        script: "true".into(),
        env: "{}".into(),
        runtime_spec: None,
        input: None,
        timeout_seconds: 60,
        max_attempts: 1,
        created_by: owner.to_string(),
        agent_ids: agents.to_vec(),
        trigger: "manual",
        slot_at: None,
        missed_slots: 0,
        pool: false,
    }
}
/// [`fixture`] with the event's dispatch policy.
/// A bash event running `true` on the host, no targets, named `name`; shared with the claim
/// tests.
pub(super) fn bash_fields(
    name: &str,
    dispatch: Option<super::dispatch::DispatchPolicy>,
) -> EventFields {
    EventFields {
        name: name.into(),
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
        notify: Default::default(),
        reschedule: false,
        action: Default::default(),
        dispatch,
    }
}

pub(super) async fn fixture_with(policy: super::dispatch::DispatchPolicy) -> Fixture {
    let (db, store) = super::test_db::open_test_store().await;
    let owner = store
        .create_user("owner", "hash", Role::User)
        .await
        .unwrap()
        .id;
    let fields = bash_fields("e", Some(policy));
    let event = store.create_event(&owner, &fields).await.unwrap().id;
    Fixture {
        _db: db,
        store,
        owner,
        event,
    }
}

impl Fixture {
    async fn agent(&self, name: &str) -> String {
        self.store.enroll_test_agent(name).await.id
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
        FinishOutcome::Recorded { notified: false }
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
        FinishOutcome::Recorded { notified: false }
    );
    let job = fixture.store.job(&job).await.unwrap();
    assert_eq!(
        (job.status, job.attempt, job.exit_code),
        (JobStatus::Failed, 2, Some(1))
    );
}

/// The agents' job streams answer the first open of an attempt assigned on the same connection
/// with "resume at 0" without reading the row (`agents::job_stream::FreshAttempts`). That holds
/// only if every claimed attempt starts with an empty log, also after an earlier attempt of the
/// same job wrote output and was retried or lost its lease.
#[tokio::test]
async fn every_claimed_attempt_starts_with_an_empty_log() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let job = fixture.jobs(&agent, 1, 3).await.remove(0);
    let chunk = LogChunk {
        offset: 0,
        stream: Stream::Stdout,
        data: b"partial output".to_vec(),
    };
    // Claims attempt `number`, checks that it opens at 0 and writes output to it.
    let claim_and_write = async |number: u32, lease_until: i64| {
        let attempt = fixture.claim_one(&agent, lease_until).await;
        assert_eq!((&attempt.job_id, attempt.attempt), (&job, number));
        assert_eq!(
            fixture.store.open_attempt(&agent, &attempt).await.unwrap(),
            OpenedAttempt::Current { log_len: 0 },
            "attempt {number} opens at 0"
        );
        assert_eq!(
            fixture
                .store
                .append_logs(&agent, &attempt, true, std::slice::from_ref(&chunk))
                .await
                .unwrap(),
            Some(14)
        );
        attempt
    };

    // Attempt 1 fails after its output: retried.
    let attempt = claim_and_write(1, now_ms() + 60_000).await;
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &failed(1, 14))
            .await
            .unwrap(),
        FinishOutcome::Requeued
    );
    // Attempt 2 loses its lease after its output: re-queued by the sweep.
    claim_and_write(2, now_ms() - 1).await;
    assert!(fixture.store.expire_leases(now_ms()).await.unwrap()[0].requeued);
    // Attempt 3 starts empty again.
    claim_and_write(3, now_ms() + 60_000).await;
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

// ---------------------------------------------------------------------------------------------
// Per-event notifications (`notify.on_failure` / `notify.on_success`) enqueued by settlements.

use super::tools::{Notification, SealedConfig, ToolKind};

impl Fixture {
    async fn tool(&self, name: &str) -> String {
        let config = SealedConfig {
            sealed: b"sealed".to_vec(),
            target_host: "example.com".into(),
        };
        self.store
            .create_tool(&self.owner, name, ToolKind::Webhook, config)
            .await
            .unwrap()
            .id
    }

    async fn set_notify(&self, on_failure: Option<&str>, on_success: Option<&str>) {
        let event = self.store.event(&self.event).await.unwrap();
        let fields = EventFields {
            name: event.name,
            kind: event.kind,
            script: event.script,
            runtime: event.runtime,
            targets: event.targets,
            timeout_seconds: event.timeout_seconds,
            retries: event.retries,
            env: event.env,
            docker: event.docker,
            schedule: event.schedule,
            notify: super::events::EventNotify {
                on_failure: on_failure.map(str::to_string),
                on_success: on_success.map(str::to_string),
            },
            next_run_at: event.next_run_at,
            reschedule: false,
            action: Default::default(),
            dispatch: None,
        };
        self.store.update_event(&self.event, &fields).await.unwrap();
    }

    /// The notifications whose source is `job_id`.
    async fn notifications_of(&self, job_id: &str) -> Vec<Notification> {
        self.store
            .notifications(None, None, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|notification| notification.source_job_id.as_deref() == Some(job_id))
            .collect()
    }

    async fn claim_one(&self, agent: &str, lease_until: i64) -> Attempt {
        let claimed = self.store.claim_jobs(agent, 1, lease_until).await.unwrap();
        Attempt {
            job_id: claimed[0].id.clone(),
            attempt: claimed[0].attempt,
        }
    }
}

fn failed(exit_code: i32, log_len: u64) -> AttemptResult {
    AttemptResult {
        status: JobStatus::Failed,
        reason: Some(Reason::ExitCode),
        exit_code: Some(exit_code),
        log_len,
        result: None,
        condition: None,
    }
}

#[tokio::test]
async fn a_settled_job_enqueues_its_events_notification_exactly_once() {
    let fixture = fixture().await;
    let agent = fixture.agent("web-1").await;
    fixture.tool("ops").await;
    fixture.tool("done").await;
    fixture.set_notify(Some("ops"), Some("done")).await;

    // A failed attempt with attempts left is requeued: nothing yet.
    let job = fixture.jobs(&agent, 1, 2).await.remove(0);
    let attempt = fixture.claim_one(&agent, now_ms() + 60_000).await;
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &failed(1, 0))
            .await
            .unwrap(),
        FinishOutcome::Requeued
    );
    assert!(fixture.notifications_of(&job).await.is_empty());

    // The last attempt fails with 30 lines of output: one notification, the last 20 lines.
    let attempt = fixture.claim_one(&agent, now_ms() + 60_000).await;
    let output: String = (1..=30).map(|line| format!("line {line}\n")).collect();
    let chunks = [LogChunk {
        offset: 0,
        stream: Stream::Stdout,
        data: output.clone().into_bytes(),
    }];
    let result = failed(3, output.len() as u64);
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &chunks, &result)
            .await
            .unwrap(),
        FinishOutcome::Recorded { notified: true }
    );
    // A replayed result is a duplicate and enqueues nothing more.
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &result)
            .await
            .unwrap(),
        FinishOutcome::Duplicate
    );
    let sent = fixture.notifications_of(&job).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let notification = &sent[0];
    assert_eq!(notification.tool_name, "ops");
    assert_eq!(notification.owner_id, fixture.owner);
    assert_eq!(
        notification.title.as_deref(),
        Some("cronium: e failed on web-1")
    );
    let message = &notification.message;
    for expected in [
        format!("job: {job}"),
        "attempt: 2".to_string(),
        "status: failed".to_string(),
        "reason: exit_code".to_string(),
        "exit code: 3".to_string(),
        "line 11\n".to_string(),
    ] {
        assert!(message.contains(&expected), "{expected:?} in {message}");
    }
    assert!(message.ends_with("line 30"), "{message}");
    assert!(!message.contains("line 10\n"), "{message}");

    // A completed job tells `on_success`.
    let job = fixture.jobs(&agent, 1, 1).await.remove(0);
    let attempt = fixture.claim_one(&agent, now_ms() + 60_000).await;
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &completed(0))
            .await
            .unwrap(),
        FinishOutcome::Recorded { notified: true }
    );
    let sent = fixture.notifications_of(&job).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].tool_name, "done");
    assert_eq!(
        sent[0].title.as_deref(),
        Some("cronium: e succeeded on web-1")
    );
    assert!(sent[0].message.contains("output: (none)"));

    // A queued job cancelled through the API tells `on_failure`.
    let job = fixture.jobs(&agent, 1, 1).await.remove(0);
    assert_eq!(
        fixture.store.request_cancel(&job).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let sent = fixture.notifications_of(&job).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].tool_name.as_str(), sent[0].title.as_deref()),
        ("ops", Some("cronium: e was cancelled on web-1"))
    );
}

#[tokio::test]
async fn a_lost_lease_enqueues_on_failure_and_a_requeue_does_not() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    fixture.tool("ops").await;
    fixture.set_notify(Some("ops"), None).await;
    let job = fixture.jobs(&agent, 1, 2).await.remove(0);

    fixture.claim_one(&agent, now_ms() - 1).await;
    let expired = fixture.store.expire_leases(now_ms()).await.unwrap();
    assert!(expired[0].requeued && !expired[0].notified);
    assert!(fixture.notifications_of(&job).await.is_empty());

    fixture.claim_one(&agent, now_ms() - 1).await;
    let expired = fixture.store.expire_leases(now_ms()).await.unwrap();
    assert!(!expired[0].requeued && expired[0].notified);
    let sent = fixture.notifications_of(&job).await;
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].message.contains("reason: lost"),
        "{}",
        sent[0].message
    );
    assert!(
        sent[0].message.contains("attempt 2 lost"),
        "the lease's log note is quoted: {}",
        sent[0].message
    );
    // A second sweep finds nothing to settle and enqueues nothing.
    assert!(
        fixture
            .store
            .expire_leases(now_ms())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(fixture.notifications_of(&job).await.len(), 1);
}

#[tokio::test]
async fn without_notify_or_with_a_deleted_tool_nothing_is_enqueued_and_the_job_settles() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;

    // No `notify`: nothing, on any path.
    let job = fixture.jobs(&agent, 1, 1).await.remove(0);
    let attempt = fixture.claim_one(&agent, now_ms() + 60_000).await;
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &failed(1, 0))
            .await
            .unwrap(),
        FinishOutcome::Recorded { notified: false }
    );
    let cancelled = fixture.jobs(&agent, 1, 1).await.remove(0);
    fixture.store.request_cancel(&cancelled).await.unwrap();
    assert!(
        fixture
            .store
            .notifications(None, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        fixture.store.job(&job).await.unwrap().status,
        JobStatus::Failed
    );

    // The tool was deleted after the event named it: skipped and audited, the job still settles.
    let tool = fixture.tool("ops").await;
    fixture.set_notify(Some("ops"), None).await;
    fixture.store.delete_tool(&tool).await.unwrap();
    let job = fixture.jobs(&agent, 1, 1).await.remove(0);
    let attempt = fixture.claim_one(&agent, now_ms() + 60_000).await;
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &attempt, &[], &failed(2, 0))
            .await
            .unwrap(),
        FinishOutcome::Recorded { notified: false }
    );
    let settled = fixture.store.job(&job).await.unwrap();
    assert_eq!(
        (settled.status, settled.exit_code),
        (JobStatus::Failed, Some(2))
    );
    assert!(fixture.notifications_of(&job).await.is_empty());
    assert_eq!(
        fixture
            .store
            .count_audit("event_notify_skipped")
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn a_run_over_many_agents_has_one_job_each_claimed_once_by_its_agent() {
    let fixture = fixture().await;
    // More than two statements' worth of rows (50 per insert), the last one partial.
    let mut agents = Vec::new();
    for index in 0..123 {
        agents.push(fixture.agent(&format!("host-{index:03}")).await);
    }
    let (run_id, jobs) = fixture
        .store
        .create_run(NewRun {
            event_id: &fixture.event,
            kind: "bash",
            script: "true",
            env: &BTreeMap::new(),
            runtime_spec: None,
            input: None,
            timeout_seconds: 60,
            max_attempts: 1,
            created_by: &fixture.owner,
            agent_ids: &agents,
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), agents.len());
    let ids: HashSet<&String> = jobs.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), agents.len(), "job ids are unique");
    let runners: HashSet<&String> = jobs.iter().map(|(_, runner)| runner).collect();
    assert_eq!(runners.len(), agents.len(), "one job per agent");
    let run = fixture.store.run(&run_id).await.unwrap();
    assert_eq!(run.jobs.len(), agents.len());
    assert!(run.jobs.iter().all(|job| job.status == JobStatus::Queued));
    let lease = now_ms() + 60_000;
    for (job_id, agent) in &jobs {
        let claimed = fixture.store.claim_jobs(agent, 5, lease).await.unwrap();
        assert_eq!(claimed.len(), 1, "agent {agent} claims its one job");
        assert_eq!(&claimed[0].id, job_id);
        assert_eq!(claimed[0].run_id, run_id);
        // Nothing left: the claim is answered empty (from a read connection).
        assert!(
            fixture
                .store
                .claim_jobs(agent, 5, lease)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_jobs_audit_trail_lists_its_expired_lease_and_the_refused_stale_result_and_holder() {
    let fixture = fixture().await;
    let agent = fixture.agent("a").await;
    let mut jobs = fixture.jobs(&agent, 2, 1).await;
    let (job, other) = (jobs.remove(0), jobs.remove(0));
    fixture
        .store
        .claim_jobs(&agent, 2, now_ms() - 1)
        .await
        .unwrap();
    let expired = fixture.store.expire_leases(now_ms()).await.unwrap();
    assert_eq!(expired.len(), 2);
    let first = Attempt {
        job_id: job.clone(),
        attempt: 1,
    };
    assert_eq!(
        fixture
            .store
            .finish_attempt(&agent, &first, &[], &completed(0))
            .await
            .unwrap(),
        FinishOutcome::Stale
    );
    // The agent comes back still holding the attempt: told to drop it, and audited once however
    // often it lists it.
    for _ in 0..2 {
        let (abandoned, _) = fixture
            .store
            .renew_leases(&agent, std::slice::from_ref(&first), now_ms() + 1000)
            .await
            .unwrap();
        assert_eq!(abandoned, std::slice::from_ref(&first));
    }
    // An entry of another kind that names the job is not part of its trail.
    fixture
        .store
        .audit("agent_revoked", None, &serde_json::json!({"job_id": job}))
        .await
        .unwrap();

    let trail = fixture.store.job_audit(&job).await.unwrap();
    let kinds: Vec<&str> = trail.iter().map(|entry| entry.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["lease_expired", "stale_result", "stale_attempt"],
        "{trail:?}"
    );
    assert_eq!(trail[0].detail["attempt"], 1);
    assert_eq!(trail[0].detail["requeued"], false);
    assert_eq!(trail[1].actor.as_deref(), Some(agent.as_str()));
    assert_eq!(trail[1].detail["status"], "completed");
    assert!(trail[0].id < trail[1].id && trail[0].at <= trail[1].at);
    assert_eq!(trail[2].actor.as_deref(), Some(agent.as_str()));
    assert_eq!(trail[2].detail["attempt"], 1);
    assert_eq!(trail[2].detail["job_status"], "failed");

    // An attempt the agent finished itself and still lists until the acknowledgement arrives is
    // dropped without an audit entry.
    let done = fixture.jobs(&agent, 1, 1).await.remove(0);
    fixture
        .store
        .claim_jobs(&agent, 1, now_ms() + 60_000)
        .await
        .unwrap();
    let done_attempt = Attempt {
        job_id: done.clone(),
        attempt: 1,
    };
    assert!(matches!(
        fixture
            .store
            .finish_attempt(&agent, &done_attempt, &[], &completed(0))
            .await
            .unwrap(),
        FinishOutcome::Recorded { .. }
    ));
    let (abandoned, _) = fixture
        .store
        .renew_leases(&agent, std::slice::from_ref(&done_attempt), now_ms() + 1000)
        .await
        .unwrap();
    assert_eq!(abandoned, [done_attempt]);
    assert!(fixture.store.job_audit(&done).await.unwrap().is_empty());

    let other_trail = fixture.store.job_audit(&other).await.unwrap();
    assert_eq!(other_trail.len(), 1, "{other_trail:?}");
    assert_eq!(other_trail[0].detail["job_id"], other.as_str());
    assert!(
        fixture
            .store
            .job_audit("no-such-job")
            .await
            .unwrap()
            .is_empty()
    );

    // Found through migration 0023's index, not by reading the whole log (on PostgreSQL with
    // sequential scans switched off for the question: its planner prefers them on a table this
    // small, whatever the indexes).
    let backend = fixture.store.backend();
    let (explain, column) = match backend {
        super::Backend::Sqlite => ("EXPLAIN QUERY PLAN", "detail"),
        super::Backend::Postgres => ("EXPLAIN", "QUERY PLAN"),
    };
    let mut conn = fixture.store.reader.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    if backend == super::Backend::Postgres {
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{explain} SELECT id FROM audit_log WHERE {} = $1 AND kind IN ('a', 'b') ORDER BY id",
        backend.json_text("detail", "job_id")
    )))
    .bind(&job)
    .fetch_all(&mut *conn)
    .await
    .unwrap()
    .iter()
    .map(|row| sqlx::Row::get::<String, _>(row, column))
    .collect();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    assert!(
        plan.iter().any(|step| step.contains("audit_log_job")),
        "{plan:?}"
    );
}

#[test]
fn sqlite_batch_statements_get_anonymous_placeholders_in_text_order() {
    use super::Backend;
    let sql = "SELECT '$1', \"a$2\" FROM t WHERE a = $1 AND b IN ($2, $3) AND c = $4".to_string();
    assert_eq!(
        Backend::Sqlite.positional(sql.clone()),
        "SELECT '$1', \"a$2\" FROM t WHERE a = ? AND b IN (?, ?) AND c = ?"
    );
    assert_eq!(Backend::Postgres.positional(sql.clone()), sql);
    // A lone `$` and a quote doubled inside a literal are text, not placeholders.
    assert_eq!(
        super::anonymous_placeholders("SELECT '$', 'it''s $9' || $1 FROM t WHERE x = $2"),
        Some("SELECT '$', 'it''s $9' || ? FROM t WHERE x = ?".to_string())
    );
    // Out of order or repeated: no rewrite (binding in order would put values in wrong places).
    assert_eq!(super::anonymous_placeholders("SELECT $2, $1"), None);
    assert_eq!(super::anonymous_placeholders("SELECT $1, $1"), None);
    assert_eq!(super::anonymous_placeholders("SELECT $1, $3"), None);
}

/// Every rule of a job row is the database's too, the same on both (the CHECKs of `jobs`): each
/// broken rule is refused as a check violation, and a row that keeps them all is written.
#[tokio::test]
async fn every_rule_of_a_job_row_is_enforced_by_the_database() {
    let fixture = fixture().await;
    let agent = fixture.agent("rules").await;
    let job = fixture.jobs(&agent, 1, 1).await.remove(0);
    // The writer's own connection (SQLite's others are read-only), taken while no write runs.
    let mut conn = fixture.store.writer.acquire().await.unwrap();
    let broken = [
        "status = 'paused'",
        "reason = 'bored'",
        "max_attempts = 0",
        "kind = 'ruby'",
        "settled_by = 'someone'",
        "condition = 2",
        "on_control_plane = 2",
        "pool = 2",
        "skip_reason = 'tired'",
        // The job has an agent: neither a server nor the control plane may run it too.
        "server_id = 'no-such-server'",
        "on_control_plane = 1",
    ];
    for assignment in broken {
        let error = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET {assignment} WHERE id = $1"
        )))
        .bind(&job)
        .execute(&mut *conn)
        .await
        .expect_err(assignment);
        let kind = error.as_database_error().map(|error| error.kind());
        assert_eq!(
            kind,
            Some(sqlx::error::ErrorKind::CheckViolation),
            "{assignment}: {error}"
        );
    }
    let kept = "status = 'failed', reason = 'delivery', settled_by = 'api', condition = 1, \
                skip_reason = 'offline', max_attempts = 3, kind = 'tool_action', pool = 1";
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE jobs SET {kept} WHERE id = $1"
    )))
    .bind(&job)
    .execute(&mut *conn)
    .await
    .unwrap();
}
