//! Schedule tests against a controllable clock: a table of daylight-saving cases in several
//! zones, at-most-once per slot across two schedulers and a crash, misfire and overlap policies,
//! and the schedule API (field errors, preview, `next_run_at`, the run's trigger).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use chrono::DateTime;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::scheduler::Scheduler;
use super::{Clock, CompiledSchedule, DstPolicy, Misfire, Overlap, ScheduleSpec};
use crate::crypto::EncryptionKey;

use crate::store::events::{EventFields, EventKind, Runtime, Targets};
use crate::store::schedules::SlotOutcome;
use crate::store::users::Role;
use crate::{Running, ServerConfig};

fn ms(text: &str) -> i64 {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{text}: {error}"))
        .timestamp_millis()
}

fn utc(instant: i64) -> String {
    DateTime::from_timestamp_millis(instant)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn daylight_saving_cases_follow_the_policy_in_every_zone() {
    use DstPolicy::{Once, Skip, Twice};
    // (zone, cron, policy, start, expected fire times in UTC)
    let cases: &[(&str, &str, DstPolicy, &str, &[&str])] = &[
        // Berlin springs forward on 2026-03-29 at 02:00 CET (01:00Z) to 03:00 CEST.
        (
            "Europe/Berlin",
            "30 2 * * *",
            Skip,
            "2026-03-28T00:00:00Z",
            &["2026-03-28T01:30:00Z", "2026-03-30T00:30:00Z"],
        ),
        (
            "Europe/Berlin",
            "30 2 * * *",
            Once,
            "2026-03-28T00:00:00Z",
            &[
                "2026-03-28T01:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z",
            ],
        ),
        (
            "Europe/Berlin",
            "30 2 * * *",
            Twice,
            "2026-03-28T00:00:00Z",
            &[
                "2026-03-28T01:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z",
            ],
        ),
        // Four slots in the gap fire once at its end (01:00Z is also 03:00 CEST itself).
        (
            "Europe/Berlin",
            "*/15 * * * *",
            Once,
            "2026-03-29T00:40:00Z",
            &[
                "2026-03-29T00:45:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-29T01:15:00Z",
            ],
        ),
        // Berlin falls back on 2026-10-25 at 03:00 CEST (01:00Z) to 02:00 CET.
        (
            "Europe/Berlin",
            "30 2 * * *",
            Skip,
            "2026-10-24T00:00:00Z",
            &[
                "2026-10-24T00:30:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-26T01:30:00Z",
            ],
        ),
        (
            "Europe/Berlin",
            "30 2 * * *",
            Once,
            "2026-10-24T00:00:00Z",
            &[
                "2026-10-24T00:30:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-26T01:30:00Z",
            ],
        ),
        (
            "Europe/Berlin",
            "30 2 * * *",
            Twice,
            "2026-10-24T00:00:00Z",
            &[
                "2026-10-24T00:30:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-26T01:30:00Z",
            ],
        ),
        // New York springs forward on 2026-03-08 at 02:00 EST (07:00Z).
        (
            "America/New_York",
            "30 2 * * *",
            Skip,
            "2026-03-07T00:00:00Z",
            &["2026-03-07T07:30:00Z", "2026-03-09T06:30:00Z"],
        ),
        (
            "America/New_York",
            "30 2 * * *",
            Once,
            "2026-03-07T00:00:00Z",
            &[
                "2026-03-07T07:30:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-09T06:30:00Z",
            ],
        ),
        // New York falls back on 2026-11-01 at 02:00 EDT (06:00Z) to 01:00 EST.
        (
            "America/New_York",
            "30 1 * * *",
            Once,
            "2026-10-31T00:00:00Z",
            &[
                "2026-10-31T05:30:00Z",
                "2026-11-01T05:30:00Z",
                "2026-11-02T06:30:00Z",
            ],
        ),
        (
            "America/New_York",
            "30 1 * * *",
            Twice,
            "2026-10-31T00:00:00Z",
            &[
                "2026-10-31T05:30:00Z",
                "2026-11-01T05:30:00Z",
                "2026-11-01T06:30:00Z",
                "2026-11-02T06:30:00Z",
            ],
        ),
        // Lord Howe moves by 30 minutes: 02:00 +10:30 → 02:30 +11:00 on 2026-10-04 (15:30Z).
        (
            "Australia/Lord_Howe",
            "15 2 * * *",
            Skip,
            "2026-10-02T16:00:00Z",
            &["2026-10-04T15:15:00Z", "2026-10-05T15:15:00Z"],
        ),
        (
            "Australia/Lord_Howe",
            "15 2 * * *",
            Once,
            "2026-10-02T16:00:00Z",
            &["2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"],
        ),
        // …and back: 02:00 +11:00 → 01:30 +10:30 on 2026-04-05 (15:00Z); 01:45 happens twice.
        (
            "Australia/Lord_Howe",
            "45 1 * * *",
            Once,
            "2026-04-03T00:00:00Z",
            &[
                "2026-04-03T14:45:00Z",
                "2026-04-04T14:45:00Z",
                "2026-04-05T15:15:00Z",
            ],
        ),
        (
            "Australia/Lord_Howe",
            "45 1 * * *",
            Twice,
            "2026-04-03T00:00:00Z",
            &[
                "2026-04-03T14:45:00Z",
                "2026-04-04T14:45:00Z",
                "2026-04-04T15:15:00Z",
                "2026-04-05T15:15:00Z",
            ],
        ),
        // No daylight saving: every policy gives the same times.
        (
            "Asia/Tokyo",
            "0 9 * * *",
            Twice,
            "2026-03-28T00:00:00Z",
            &["2026-03-29T00:00:00Z", "2026-03-30T00:00:00Z"],
        ),
        (
            "UTC",
            "0 0 12 * * MON",
            Skip,
            "2026-03-28T00:00:00Z",
            &["2026-03-30T12:00:00Z", "2026-04-06T12:00:00Z"],
        ),
        // Six fields, every second: with `once` the repeated hour's second pass does not fire.
        (
            "Europe/Berlin",
            "* * * * * *",
            Once,
            "2026-10-25T00:59:58Z",
            &["2026-10-25T00:59:59Z", "2026-10-25T02:00:00Z"],
        ),
        (
            "Europe/Berlin",
            "* * * * * *",
            Twice,
            "2026-10-25T00:59:58Z",
            &["2026-10-25T00:59:59Z", "2026-10-25T01:00:00Z"],
        ),
    ];
    for (zone, cron, policy, start, expected) in cases {
        let schedule = CompiledSchedule::new(cron, zone, *policy).unwrap();
        let got: Vec<String> = schedule
            .upcoming(ms(start), expected.len())
            .into_iter()
            .map(utc)
            .collect();
        assert_eq!(&got, expected, "{zone} {cron:?} dst={}", policy.as_str());
    }
}

#[test]
fn invalid_expressions_and_zones_name_their_field() {
    for (cron, zone, field) in [
        ("61 * * * *", "UTC", "schedule.cron"),
        ("* * *", "UTC", "schedule.cron"),
        ("* * * * * * *", "UTC", "schedule.cron"),
        ("* * * * *", "Mars/Olympus", "schedule.timezone"),
    ] {
        let error = CompiledSchedule::new(cron, zone, DstPolicy::Once)
            .err()
            .unwrap_or_else(|| panic!("{cron:?} in {zone} was accepted"));
        assert_eq!(error.field, field, "{cron:?} {zone}");
    }
}

/// A clock the test sets.
#[derive(Default)]
struct ManualClock(AtomicI64);

impl ManualClock {
    fn set(&self, instant: i64) {
        self.0.store(instant, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A control plane whose events are scheduled far in the future (2100), so its own scheduler,
/// on the system clock, never fires them; the tests drive their own schedulers.
struct Harness {
    _dir: tempfile::TempDir,
    running: Running,
    owner: String,
    agent: String,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.running.state.shutdown.cancel();
    }
}

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig::for_tests(dir, &EncryptionKey::generate_base64())
}

async fn harness() -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let running = crate::start(config(dir.path()), CancellationToken::new())
        .await
        .unwrap();
    let store = &running.state.store;
    let owner = store
        .create_user("owner", "unused", Role::User)
        .await
        .unwrap()
        .id;
    let agent = store.enroll_test_agent("a").await;
    Harness {
        _dir: dir,
        running,
        owner,
        agent: agent.id,
    }
}

impl Harness {
    fn scheduler(&self, clock: &Arc<ManualClock>) -> Scheduler {
        Scheduler::new(self.running.state.clone(), clock.clone())
    }

    /// An event every minute (UTC) whose next slot is `first`.
    async fn event(&self, name: &str, misfire: Misfire, overlap: Overlap, first: i64) -> String {
        let fields = EventFields {
            name: name.into(),
            kind: EventKind::Bash,
            script: "true".into(),
            runtime: Runtime::Host,
            targets: Targets {
                agents: vec![self.agent.clone()],
                ..Targets::default()
            },
            timeout_seconds: 60,
            retries: 0,
            env: BTreeMap::new(),
            docker: Default::default(),
            schedule: Some(ScheduleSpec {
                cron: "* * * * *".into(),
                timezone: "UTC".into(),
                dst: DstPolicy::Once,
                misfire,
                overlap,
            }),
            next_run_at: Some(first),
            notify: Default::default(),
            reschedule: true,
            action: Default::default(),
            dispatch: None,
        };
        self.running
            .state
            .store
            .create_event(&self.owner, &fields)
            .await
            .unwrap()
            .id
    }

    /// `(slot, outcome, missed_slots, run trigger and slot)` of every handled slot, oldest first.
    async fn slots(&self, event: &str) -> Vec<(i64, String, i64)> {
        let store = &self.running.state.store;
        let mut records = store.slot_records(event, 10_000).await.unwrap();
        records.reverse();
        let mut slots = Vec::new();
        for record in records {
            if let Some(run_id) = &record.run_id {
                let run = store.run(run_id).await.unwrap();
                assert_eq!(run.trigger, "schedule");
                assert_eq!(run.slot_at, Some(record.slot_at));
                assert_eq!(run.missed_slots, record.missed_slots);
            }
            slots.push((record.slot_at, record.outcome, record.missed_slots));
        }
        slots
    }

    /// Cancels the queued jobs of a run, so it is finished.
    async fn finish(&self, run_id: &str) {
        let store = &self.running.state.store;
        for job in store.run(run_id).await.unwrap().jobs {
            store.request_cancel(&job.id).await.unwrap();
        }
    }
}

/// 2100-01-01T00:00:00Z plus `minutes`.
fn minute(minutes: i64) -> i64 {
    ms("2100-01-01T00:00:00Z") + minutes * 60_000
}

#[tokio::test]
async fn each_slot_fires_once_across_two_schedulers_and_a_crash() {
    let harness = harness().await;
    let event = harness
        .event("e", Misfire::Skip, Overlap::Allow, minute(0))
        .await;
    let clock = Arc::new(ManualClock::default());
    let (first, second) = (harness.scheduler(&clock), harness.scheduler(&clock));

    // Nothing is due before the slot.
    clock.set(minute(0) - 1);
    assert!(first.run_due().await.unwrap().fired.is_empty());

    // Both schedulers see the slot; the first commits, the second's plan is stale.
    clock.set(minute(0) + 10);
    let store = &harness.running.state.store;
    let seen = store.event(&event).await.unwrap();
    let stale_plan = second.plan(&seen, clock.now_ms(), true).await.unwrap();
    let pass = first.run_due().await.unwrap();
    assert_eq!(pass.fired.len(), 1);
    assert_eq!(pass.next, Some(minute(1)));
    assert_eq!(second.apply(stale_plan).await.unwrap(), SlotOutcome::Stale);
    assert!(second.run_due().await.unwrap().fired.is_empty());

    // A scheduler that crashed between planning and committing left nothing: the next one
    // (a restart on the same database) fires the slot once.
    clock.set(minute(1) + 10);
    let seen = store.event(&event).await.unwrap();
    drop(first.plan(&seen, clock.now_ms(), true).await.unwrap());
    drop(first);
    let restarted = harness.scheduler(&clock);
    assert_eq!(restarted.run_due().await.unwrap().fired.len(), 1);
    assert!(second.run_due().await.unwrap().fired.is_empty());

    // Replaying an old plan is refused.
    let replay = second.plan(&seen, clock.now_ms(), true).await.unwrap();
    assert_eq!(second.apply(replay).await.unwrap(), SlotOutcome::Stale);

    assert_eq!(
        harness.slots(&event).await,
        vec![
            (minute(0), "fired".to_string(), 0),
            (minute(1), "fired".to_string(), 0)
        ]
    );
    assert_eq!(
        store.event(&event).await.unwrap().next_run_at,
        Some(minute(2))
    );
}

#[tokio::test]
async fn misfires_after_downtime_are_skipped_or_run_once() {
    let harness = harness().await;
    let skip = harness
        .event("skip", Misfire::Skip, Overlap::Allow, minute(0))
        .await;
    let once = harness
        .event("once", Misfire::RunOnce, Overlap::Allow, minute(0))
        .await;
    let queued = harness
        .event("queued", Misfire::Skip, Overlap::Queue, minute(0))
        .await;
    let clock = Arc::new(ManualClock::default());
    let scheduler = harness.scheduler(&clock);

    // Down for ten minutes: slots 0..=9 are older than the grace (60 s), 10 is within it.
    clock.set(minute(10) + 10);
    let pass = scheduler.run_due().await.unwrap();
    // skip: only slot 10 runs; run_once: one run for 0..=9 (keyed by slot 0), then 10.
    // queue: the oldest slot is the queued run, never a misfire; 1..=9 are missed; 10 waits
    // for the run of slot 0.
    assert_eq!(pass.fired.len(), 4);
    assert!(pass.held);
    assert_eq!(
        harness.slots(&queued).await,
        vec![
            (minute(0), "fired".to_string(), 0),
            (minute(1), "missed".to_string(), 9),
        ]
    );
    assert_eq!(
        harness
            .running
            .state
            .store
            .event(&queued)
            .await
            .unwrap()
            .next_run_at,
        Some(minute(10))
    );
    assert_eq!(
        harness.slots(&skip).await,
        vec![
            (minute(0), "missed".to_string(), 10),
            (minute(10), "fired".to_string(), 0),
        ]
    );
    assert_eq!(
        harness.slots(&once).await,
        vec![
            (minute(0), "fired".to_string(), 10),
            (minute(10), "fired".to_string(), 0),
        ]
    );
    assert_eq!(pass.next, Some(minute(11)));
}

#[tokio::test]
async fn overlap_forbid_skips_and_queue_waits_for_the_previous_run() {
    let harness = harness().await;
    let forbid = harness
        .event("forbid", Misfire::Skip, Overlap::Forbid, minute(0))
        .await;
    let queue = harness
        .event("queue", Misfire::Skip, Overlap::Queue, minute(0))
        .await;
    let clock = Arc::new(ManualClock::default());
    let scheduler = harness.scheduler(&clock);
    let store = &harness.running.state.store;

    // Slot 0 fires for both; their jobs stay queued (no agent is connected).
    clock.set(minute(0) + 10);
    assert_eq!(scheduler.run_due().await.unwrap().fired.len(), 2);

    // Slot 1: forbid records a skip, queue holds the slot.
    clock.set(minute(1) + 10);
    let pass = scheduler.run_due().await.unwrap();
    assert!(pass.fired.is_empty());
    assert!(pass.held);
    assert_eq!(
        store.event(&queue).await.unwrap().next_run_at,
        Some(minute(1))
    );
    let forbidden = store.slot_records(&forbid, 10).await.unwrap();
    assert_eq!(forbidden[0].slot_at, minute(1));
    assert_eq!(forbidden[0].outcome, "skipped");
    assert!(forbidden[0].reason.as_deref().unwrap().contains("overlap"));

    // The previous runs finish; the held slot fires (late, but it is the queued run), forbid
    // fires its next slot.
    for record in store.slot_records(&queue, 10).await.unwrap() {
        harness.finish(record.run_id.as_deref().unwrap()).await;
    }
    for record in store.slot_records(&forbid, 10).await.unwrap() {
        if let Some(run_id) = &record.run_id {
            harness.finish(run_id).await;
        }
    }
    clock.set(minute(2) + 10);
    let pass = scheduler.run_due().await.unwrap();
    assert!(pass.held, "queue holds slot 2 behind the run of slot 1");
    assert_eq!(pass.fired.len(), 2);
    assert_eq!(
        harness.slots(&queue).await,
        vec![
            (minute(0), "fired".to_string(), 0),
            (minute(1), "fired".to_string(), 0),
        ]
    );
    assert_eq!(
        harness.slots(&forbid).await,
        vec![
            (minute(0), "fired".to_string(), 0),
            (minute(1), "skipped".to_string(), 0),
            (minute(2), "fired".to_string(), 0),
        ]
    );
}

/// Calls the API as `token`.
async fn call(
    harness: &Harness,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = crate::http::router(harness.running.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_api_validates_previews_and_shows_schedules() {
    let harness = harness().await;
    let token = crate::cli::create_api_token(&harness.running.state.store, "owner", "test")
        .await
        .unwrap();
    let event = |schedule: Value| json!({"name": "s", "kind": "bash", "script": "true", "targets": {"agents": ["a"]}, "schedule": schedule});
    for (schedule, field) in [
        (
            json!({"cron": "not cron", "timezone": "UTC"}),
            "schedule.cron",
        ),
        (
            json!({"cron": "0 0 30 2 *", "timezone": "UTC"}),
            "schedule.cron",
        ),
        (
            json!({"cron": "* * * * *", "timezone": "Nowhere/City"}),
            "schedule.timezone",
        ),
        (
            json!({"cron": "* * * * *", "timezone": "UTC", "dst": "thrice"}),
            "schedule.dst",
        ),
        (
            json!({"cron": "* * * * *", "timezone": "UTC", "misfire": "later"}),
            "schedule.misfire",
        ),
        (
            json!({"cron": "* * * * *", "timezone": "UTC", "overlap": "maybe"}),
            "schedule.overlap",
        ),
    ] {
        let (status, body) = call(
            &harness,
            Method::POST,
            "/api/v1/events",
            &token,
            Some(event(schedule)),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }

    let (status, created) = call(
        &harness,
        Method::POST,
        "/api/v1/events",
        &token,
        Some(event(
            json!({"cron": "0 3 * * *", "timezone": "Europe/Berlin", "overlap": "forbid"}),
        )),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["schedule"],
        json!({"cron": "0 3 * * *", "timezone": "Europe/Berlin", "dst": "once", "misfire": "skip", "overlap": "forbid"})
    );
    assert!(created["next_run_at"].is_string(), "{created}");
    let id = created["id"].as_str().unwrap();

    let (status, preview) = call(
        &harness,
        Method::GET,
        &format!("/api/v1/events/{id}/schedule/preview?count=3"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    let times = preview["fire_times"].as_array().unwrap();
    assert_eq!(times.len(), 3);
    assert!(
        times[0]["local"].as_str().unwrap().contains("T03:00:00+0"),
        "{preview}"
    );
    assert!(
        times[0]["utc"].as_str().unwrap().ends_with('Z'),
        "{preview}"
    );

    let (status, preview) = call(
        &harness,
        Method::POST,
        "/api/v1/schedules/preview",
        &token,
        Some(json!({"cron": "0 0 1 1 *", "timezone": "Asia/Tokyo", "count": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert!(
        preview["fire_times"][0]["local"]
            .as_str()
            .unwrap()
            .ends_with("-01-01T00:00:00+09:00")
    );
    let (status, body) = call(
        &harness,
        Method::POST,
        "/api/v1/schedules/preview",
        &token,
        Some(json!({"cron": "* * * * *", "count": 0})),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("count"))
    );

    // Removing the schedule clears next_run_at.
    let (status, updated) = call(
        &harness,
        Method::PATCH,
        &format!("/api/v1/events/{id}"),
        &token,
        Some(json!({"schedule": null})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["schedule"], Value::Null);
    assert_eq!(updated["next_run_at"], Value::Null);
}

#[test]
fn an_expression_that_never_matches_has_no_fire_time() {
    let schedule = CompiledSchedule::new("0 0 30 2 *", "UTC", DstPolicy::Once).unwrap();
    assert_eq!(schedule.next_after(ms("2026-01-01T00:00:00Z")), None);
}
