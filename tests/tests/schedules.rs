//! Schedules end to end: an every-second schedule on a real agent produces runs whose jobs
//! complete, and across a SIGKILL and restart of the control plane no slot runs twice and none
//! is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::TestCluster;
use reqwest::Method;
use serde_json::{Value, json};

/// How long the runs of a few slots may take to appear and complete.
const SLOTS_TIMEOUT: Duration = Duration::from_secs(60);

/// The handled slots of an event (newest first, as the API answers).
async fn slots(cluster: &TestCluster, event: &str) -> Result<Vec<Value>> {
    let slots = cluster
        .api()
        .get_ok(&format!("/api/v1/events/{event}/schedule/fires"))
        .await?;
    slots
        .as_array()
        .cloned()
        .context("the slots are not an array")
}

/// How many runs of `slots` have completed (every job `completed`).
async fn completed_runs(cluster: &TestCluster, slots: &[Value]) -> Result<usize> {
    let mut completed = 0;
    for slot in slots {
        let Some(run_id) = slot["run_id"].as_str() else {
            continue;
        };
        let run = cluster
            .api()
            .get_ok(&format!("/api/v1/runs/{run_id}"))
            .await?;
        if run["status"] == "completed" {
            completed += 1;
        }
    }
    Ok(completed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_schedule_runs_on_a_real_agent_and_survives_a_restart() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("scheduled").await?;
    let event = cluster
        .api()
        .post(
            "/api/v1/events",
            &json!({
                "name": "every-second",
                "kind": "bash",
                "script": "echo tick",
                "targets": {"agents": [agent.id]},
                "schedule": {"cron": "* * * * * *", "timezone": "Europe/Berlin"},
            }),
        )
        .await?
        .expect_status(201, "create the scheduled event")?;
    let event_id = event["id"].as_str().context("event id")?.to_string();
    if !event["next_run_at"].is_string() {
        bail!("a scheduled event has no next_run_at: {event}");
    }

    // Three slots fire and their jobs complete on the agent.
    cluster
        .wait_until(SLOTS_TIMEOUT, "three completed scheduled runs", || async {
            let slots = slots(&cluster, &event_id).await?;
            Ok((completed_runs(&cluster, &slots).await? >= 3).then_some(()))
        })
        .await?;
    let first_run = slots(&cluster, &event_id).await?[0]["run_id"]
        .as_str()
        .context("a fired slot without a run")?
        .to_string();
    let run = cluster
        .api()
        .get_ok(&format!("/api/v1/runs/{first_run}"))
        .await?;
    if run["trigger"] != "schedule" || !run["slot_at"].is_string() {
        bail!("a scheduled run does not say so: {run}");
    }

    // SIGKILL the control plane mid-schedule and start it again on the same database.
    cluster.restart_control_plane().await?;
    let before = slots(&cluster, &event_id).await?.len();
    cluster
        .wait_until(
            SLOTS_TIMEOUT,
            "three more slots after the restart",
            || async {
                let slots = slots(&cluster, &event_id).await?;
                Ok((slots.len() >= before + 3).then_some(()))
            },
        )
        .await?;

    // Stop the schedule, then check the record.
    let stopped = cluster
        .api()
        .send(
            Method::PATCH,
            &format!("/api/v1/events/{event_id}"),
            Some(&json!({"schedule": null})),
        )
        .await?
        .expect_status(200, "remove the schedule")?;
    if !stopped["next_run_at"].is_null() {
        bail!("an unscheduled event still has next_run_at: {stopped}");
    }
    let slots = slots(&cluster, &event_id).await?;
    let mut slot_keys = BTreeSet::new();
    let mut run_ids = BTreeSet::new();
    for slot in &slots {
        let key = slot["slot_at"].as_str().context("slot_at")?.to_string();
        if !slot_keys.insert(key.clone()) {
            bail!("slot {key} was handled twice: {slots:?}");
        }
        if slot["outcome"] != "fired" {
            bail!("a slot did not fire (the downtime is within the misfire grace): {slot}");
        }
        let run_id = slot["run_id"].as_str().context("run_id")?;
        if !run_ids.insert(run_id.to_string()) {
            bail!("run {run_id} stands for two slots");
        }
        let run = cluster
            .api()
            .get_ok(&format!("/api/v1/runs/{run_id}"))
            .await?;
        if run["slot_at"].as_str() != Some(key.as_str()) {
            bail!("run {run_id} is for slot {} not {key}", run["slot_at"]);
        }
    }
    // No slot was lost: the slots are consecutive seconds.
    let seconds: Vec<i64> = slot_keys
        .iter()
        .map(|key| {
            chrono::DateTime::parse_from_rfc3339(key)
                .map(|time| time.timestamp())
                .with_context(|| format!("slot_at {key:?}"))
        })
        .collect::<Result<_>>()?;
    for pair in seconds.windows(2) {
        if pair[1] - pair[0] != 1 {
            bail!("slots between {} and {} are missing", pair[0], pair[1]);
        }
    }
    // The runs after the restart complete too.
    cluster
        .wait_until(SLOTS_TIMEOUT, "every scheduled run completed", || async {
            Ok((completed_runs(&cluster, &slots).await? == slots.len()).then_some(()))
        })
        .await?;
    Ok(())
}
