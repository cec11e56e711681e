//! Dispatch policies end to end, with real agent processes: a rollout over five agents in
//! batches of two that stops after two failed hosts, retrying the failed hosts, the live table
//! of `cronium run --wait`, offline hosts skipped, a retry that waits for its backoff and is
//! claimed without a new trigger, a concurrency limit of one across three agents, and a pool
//! target whose every run is one job on one of the two matching agents of three. Ordering is
//! proven by the times the control plane recorded, never by sleeping.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cronium_e2e::{AgentOptions, EventSpec, TestCluster};
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates an event from `spec` with `extra` fields merged in; returns its id.
async fn create_event(cluster: &TestCluster, spec: &EventSpec, extra: Value) -> Result<String> {
    let mut body = spec.to_json(cluster.marker());
    for (key, value) in extra.as_object().context("extra fields")? {
        body[key] = value.clone();
    }
    let event = cluster
        .api()
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, "create event")?;
    Ok(event["id"].as_str().context("event id")?.to_string())
}

async fn trigger(cluster: &TestCluster, event_id: &str, body: Value) -> Result<String> {
    let run = cluster
        .api()
        .post(&format!("/api/v1/events/{event_id}/runs"), &body)
        .await?
        .expect_status(201, "trigger")?;
    Ok(run["run_id"].as_str().context("run id")?.to_string())
}

/// Waits until the run has ended; returns it (with groups).
async fn wait_run_ended(cluster: &TestCluster, run_id: &str) -> Result<Value> {
    cluster
        .wait_until(RUN_TIMEOUT, &format!("run {run_id} ended"), || async {
            let run = cluster.run(run_id).await?;
            Ok((!matches!(run["status"].as_str(), Some("queued" | "running"))).then_some(run))
        })
        .await
}

/// The run's jobs by agent name.
fn jobs_by_host<'a>(
    run: &'a Value,
    names: &BTreeMap<String, String>,
) -> BTreeMap<String, &'a Value> {
    run["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|job| {
            let agent = job["agent_id"].as_str().unwrap_or_default();
            (names.get(agent).cloned().unwrap_or_default(), job)
        })
        .collect()
}

/// `POST /runs/{id}/retry` with `only`: the new run and the names of the hosts it retries.
async fn retry_hosts(
    cluster: &TestCluster,
    run_id: &str,
    only: &str,
    names: &BTreeMap<String, String>,
) -> Result<(Value, BTreeSet<String>)> {
    let retry = cluster
        .api()
        .post(
            &format!("/api/v1/runs/{run_id}/retry"),
            &json!({ "only": only }),
        )
        .await?
        .expect_status(201, &format!("retry {only} hosts"))?;
    let retried = retry["jobs"]
        .as_array()
        .context("jobs")?
        .iter()
        .map(|job| names[text(job, "agent_id")].clone())
        .collect();
    Ok((retry, retried))
}

fn text<'a>(job: &'a Value, field: &str) -> &'a str {
    job[field].as_str().unwrap_or_default()
}

/// Each host writes a start marker into the shared directory `DIR`; a host whose name ends in
/// `-badN` fails with exit code 3 once N hosts have started (so its batch partner is running
/// before the failure can stop the rollout), every other host prints the same line.
const FLEET_SCRIPT: &str = r#"
host=${PWD#*/agents/}
host=${host%%/*}
host=${host%-*}
: > "$DIR/$host.started"
case "$host" in
  *-bad*)
    want=${host##*-bad}
    while [ "$(ls "$DIR" | grep -c '\.started$')" -lt "$want" ]; do sleep 0.05; done
    echo "broken on purpose"
    exit 3
    ;;
esac
echo "hello fleet"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_in_batches_stops_after_two_failures_and_retries_exactly_the_failed_hosts()
-> Result<()> {
    let mut cluster = TestCluster::start().await?;
    // Name order is batch order: h1, h2 | h3, h4 | h5.
    let hosts = ["h1-bad2", "h2-ok", "h3-bad4", "h4-ok", "h5-ok"];
    let mut names = BTreeMap::new();
    for host in hosts {
        let agent = cluster.enroll_agent(host, &[("fleet", "rollout")]).await?;
        cluster
            .start_agent(&agent, &AgentOptions::default())
            .await?;
        names.insert(agent.id.clone(), host.to_string());
    }
    let marks = tempfile::tempdir()?;
    let spec = EventSpec::bash("fleet", FLEET_SCRIPT).env("DIR", marks.path().to_str().unwrap());
    let event_id = create_event(
        &cluster,
        &spec,
        json!({"targets": {"labels": {"fleet": "rollout"}},
               "rollout": {"batch_size": 2, "max_failures": 2}}),
    )
    .await?;
    let event = cluster
        .api()
        .get_ok(&format!("/api/v1/events/{event_id}"))
        .await?;
    ensure!(
        event["rollout"] == json!({"batch_size": 2, "max_failures": 2, "offline": "wait"}),
        "the event shows its rollout: {event}"
    );

    let run_id = trigger(&cluster, &event_id, json!({})).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    let jobs = jobs_by_host(&run, &names);
    let outcome: Vec<(String, String, Value, u64)> = hosts
        .iter()
        .map(|host| {
            let job = jobs[*host];
            (
                host.to_string(),
                text(job, "status").to_string(),
                job["exit_code"].clone(),
                job["batch"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    let expected = vec![
        ("h1-bad2".to_string(), "failed".to_string(), json!(3), 0),
        ("h2-ok".into(), "completed".into(), json!(0), 0),
        ("h3-bad4".into(), "failed".into(), json!(3), 1),
        ("h4-ok".into(), "completed".into(), json!(0), 1),
        ("h5-ok".into(), "cancelled".into(), Value::Null, 2),
    ];
    ensure!(outcome == expected, "statuses: {outcome:?}\nrun: {run:#}");
    ensure!(
        jobs["h5-ok"]["reason"] == "rollout_stopped",
        "h5 never started: {}",
        jobs["h5-ok"]
    );
    ensure!(
        jobs["h5-ok"]["claimed_at"].is_null() && jobs["h5-ok"]["attempt"] == 0,
        "h5 was never claimed: {}",
        jobs["h5-ok"]
    );
    // Batch 1 was claimed only after every job of batch 0 had ended (server-recorded times,
    // RFC 3339 in UTC with milliseconds, so they order as text).
    let batch0_end = ["h1-bad2", "h2-ok"]
        .iter()
        .map(|host| text(jobs[*host], "finished_at"))
        .max()
        .unwrap();
    for host in ["h3-bad4", "h4-ok"] {
        let claimed = text(jobs[host], "claimed_at");
        ensure!(
            !claimed.is_empty() && claimed >= batch0_end,
            "{host} claimed at {claimed}, before batch 0 ended at {batch0_end}"
        );
    }
    ensure!(run["status"] == "failed", "run status: {}", run["status"]);
    ensure!(
        run["rollout"]["stopped"] == true
            && run["rollout"]["stopped_reason"] == "max_failures: 2 host(s) failed (limit 2)"
            && run["rollout"]["batch_size"] == 2
            && run["rollout"]["batches"] == 3,
        "rollout state: {}",
        run["rollout"]
    );
    // Identical outputs grouped: two hosts said hello, two broke the same way.
    let groups: BTreeSet<(String, i64, u64, String)> = run["groups"]
        .as_array()
        .context("groups")?
        .iter()
        .map(|group| {
            (
                text(group, "status").to_string(),
                group["exit_code"].as_i64().unwrap_or(-1),
                group["count"].as_u64().unwrap_or(0),
                text(group, "sample_output").trim().to_string(),
            )
        })
        .collect();
    let expected_groups: BTreeSet<(String, i64, u64, String)> = [
        ("completed".to_string(), 0, 2, "hello fleet".to_string()),
        ("failed".into(), 3, 2, "broken on purpose".into()),
    ]
    .into();
    ensure!(groups == expected_groups, "groups: {groups:?}");

    // Retry the failed hosts: a new run linked to this one with exactly h1 and h3.
    let (retry, retried) = retry_hosts(&cluster, &run_id, "failed", &names).await?;
    ensure!(
        retried == BTreeSet::from(["h1-bad2".to_string(), "h3-bad4".to_string()]),
        "retried hosts: {retried:?}"
    );
    let retry_id = text(&retry, "run_id").to_string();
    let retry_run = wait_run_ended(&cluster, &retry_id).await?;
    ensure!(
        retry_run["retry_of"] == run_id.as_str(),
        "linked: {}",
        retry_run["retry_of"]
    );
    // With the not-started hosts: h1, h3 and h5.
    let (retry, retried) = retry_hosts(&cluster, &run_id, "failed_and_not_started", &names).await?;
    ensure!(
        retried
            == BTreeSet::from([
                "h1-bad2".to_string(),
                "h3-bad4".to_string(),
                "h5-ok".to_string()
            ]),
        "retried hosts: {retried:?}"
    );
    wait_run_ended(&cluster, text(&retry, "run_id")).await?;
    let refused = cluster
        .api()
        .post(
            &format!("/api/v1/runs/{run_id}/retry"),
            &json!({"only": "everything"}),
        )
        .await?;
    ensure!(
        refused.status == 422 || refused.status == 400,
        "bad `only`: {}",
        refused.status
    );

    // The CLI: a live table (plain lines: stdout is a pipe), the summary, exit code 1. The
    // flags override the event's rollout for this run only.
    std::fs::remove_dir_all(marks.path())?;
    std::fs::create_dir(marks.path())?;
    let output = cluster
        .cli(
            &[
                "run",
                "fleet",
                "--labels",
                "fleet=rollout",
                "--wait",
                "--batch-size",
                "5",
                "--max-failures",
                "5",
            ],
            RUN_TIMEOUT,
        )
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.code() == Some(1),
        "exit code {:?}\n{stdout}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        !stdout.contains('\x1b'),
        "no escape codes without a TTY: {stdout:?}"
    );
    for (host, status, exit) in [
        ("h1-bad2", "failed", "3"),
        ("h2-ok", "completed", "0"),
        ("h3-bad4", "failed", "3"),
        ("h4-ok", "completed", "0"),
        ("h5-ok", "completed", "0"),
    ] {
        ensure!(
            stdout.lines().any(|line| {
                let cells: Vec<&str> = line.split_whitespace().collect();
                cells.len() >= 3 && cells[0] == host && cells[1] == status && cells[2] == exit
            }),
            "no final row for {host}: {stdout}"
        );
    }
    ensure!(
        stdout.contains("3 completed, 2 failed, 0 not run, of 5 host(s)"),
        "summary: {stdout}"
    );
    ensure!(
        stdout.contains("3 host(s): completed exit 0") && stdout.contains("| hello fleet"),
        "grouped output: {stdout}"
    );
    ensure!(
        !stdout.contains("rollout stopped"),
        "five failures allowed: {stdout}"
    );

    // `cronium retry RUN_ID --wait`: the two failed hosts again, which fail again.
    let output = cluster
        .cli(&["retry", &run_id, "--wait"], RUN_TIMEOUT)
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.code() == Some(1)
            && stdout.contains(&format!("retries 2 host(s) of run {run_id}"))
            && stdout.contains("0 completed, 2 failed, 0 not run, of 2 host(s)"),
        "exit code {:?}: {stdout}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );

    // An event that succeeds everywhere exits 0.
    let fine = EventSpec::bash("fine", "echo fine");
    create_event(
        &cluster,
        &fine,
        json!({"targets": {"labels": {"fleet": "rollout"}}}),
    )
    .await?;
    let output = cluster
        .cli(
            &["run", "fine", "--labels", "fleet=rollout", "--wait"],
            RUN_TIMEOUT,
        )
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.contains("5 host(s): completed exit 0"),
        "exit code {:?}: {stdout}",
        output.status.code()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_host_is_skipped_and_the_others_run() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let up = cluster.enroll_agent("up", &[("fleet", "offline")]).await?;
    let down = cluster
        .enroll_agent("down", &[("fleet", "offline")])
        .await?;
    cluster.start_agent(&up, &AgentOptions::default()).await?;
    cluster.start_agent(&down, &AgentOptions::default()).await?;
    cluster.kill_agent(&down.id)?;
    cluster
        .wait_until(RUN_TIMEOUT, "agent `down` offline", || async {
            let agent = cluster
                .api()
                .get_ok(&format!("/api/v1/agents/{}", down.id))
                .await?;
            Ok((agent["status"] != "online").then_some(()))
        })
        .await?;
    let event_id = create_event(
        &cluster,
        &EventSpec::bash("skip-offline", "echo here"),
        json!({"targets": {"labels": {"fleet": "offline"}}, "rollout": {"offline": "skip"}}),
    )
    .await?;
    let run_id = trigger(&cluster, &event_id, json!({})).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    let names = BTreeMap::from([
        (up.id.clone(), "up".to_string()),
        (down.id.clone(), "down".to_string()),
    ]);
    let jobs = jobs_by_host(&run, &names);
    ensure!(
        text(jobs["up"], "status") == "completed",
        "up: {}",
        jobs["up"]
    );
    ensure!(
        text(jobs["down"], "status") == "cancelled" && text(jobs["down"], "reason") == "offline",
        "down: {}",
        jobs["down"]
    );
    ensure!(
        jobs["down"]["attempt"] == 0,
        "down never ran: {}",
        jobs["down"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_attempt_is_retried_after_its_backoff_without_a_new_trigger() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("retrier").await?;
    let spec = EventSpec::bash(
        "flaky",
        r#"if [ "$CRONIUM_ATTEMPT" = 1 ]; then echo "first attempt fails"; exit 7; fi; echo recovered"#,
    )
    .target(&agent.id)
    .retries(2);
    let event_id = create_event(
        &cluster,
        &spec,
        json!({"retry": {"backoff_seconds": 1, "factor": 1, "max_backoff_seconds": 1}}),
    )
    .await?;
    let run_id = trigger(&cluster, &event_id, json!({})).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    let job = &run["jobs"][0];
    ensure!(
        job["status"] == "completed" && job["attempt"] == 2,
        "the second attempt ran and completed: {job}"
    );
    let last = &job["last_failure"];
    ensure!(
        last["attempt"] == 1
            && last["exit_code"] == 7
            && last["reason"] == "exit_code"
            && last["output_tail"] == "first attempt fails",
        "the first attempt is still visible: {last}"
    );
    // The second attempt was claimed no earlier than a second after the first one failed.
    let failed_at = chrono::DateTime::parse_from_rfc3339(text(last, "finished_at"))?;
    let claimed_at = chrono::DateTime::parse_from_rfc3339(text(job, "claimed_at"))?;
    ensure!(
        claimed_at - failed_at >= chrono::TimeDelta::milliseconds(1000),
        "claimed at {claimed_at}, failed at {failed_at}"
    );
    ensure!(
        String::from_utf8_lossy(&cluster.job_logs(text(job, "id")).await?).contains("recovered"),
        "the log is the second attempt's"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrency_limit_of_one_never_runs_two_jobs_at_once() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    for name in ["c1", "c2", "c3"] {
        let agent = cluster.enroll_agent(name, &[("fleet", "serial")]).await?;
        cluster
            .start_agent(&agent, &AgentOptions::default())
            .await?;
    }
    let event_id = create_event(
        &cluster,
        &EventSpec::bash("serial", "echo one at a time"),
        json!({"targets": {"labels": {"fleet": "serial"}}, "max_concurrency": 1}),
    )
    .await?;
    let run_id = trigger(&cluster, &event_id, json!({})).await?;
    let run = wait_run_ended(&cluster, &run_id).await?;
    let mut spans: Vec<(String, String)> = run["jobs"]
        .as_array()
        .context("jobs")?
        .iter()
        .map(|job| {
            (
                text(job, "claimed_at").to_string(),
                text(job, "finished_at").to_string(),
            )
        })
        .collect();
    ensure!(
        run["status"] == "completed" && spans.len() == 3,
        "run: {run:#}"
    );
    spans.sort();
    for pair in spans.windows(2) {
        ensure!(
            !pair[0].1.is_empty() && pair[1].0 >= pair[0].1,
            "two jobs ran at once: {spans:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_delay_survives_a_control_plane_restart() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("patient").await?;
    let spec = EventSpec::bash(
        "flaky-across-restart",
        r#"if [ "$CRONIUM_ATTEMPT" = 1 ]; then exit 9; fi; echo second"#,
    )
    .target(&agent.id)
    .retries(1);
    let event_id = create_event(
        &cluster,
        &spec,
        json!({"retry": {"backoff_seconds": 4, "factor": 1, "max_backoff_seconds": 4}}),
    )
    .await?;
    let run_id = trigger(&cluster, &event_id, json!({})).await?;
    // The first attempt failed and the job waits for its backoff.
    let job = cluster
        .wait_until(RUN_TIMEOUT, "the first attempt failed", || async {
            let run = cluster.run(&run_id).await?;
            let job = run["jobs"][0].clone();
            Ok((job["status"] == "queued" && job["last_failure"]["attempt"] == 1).then_some(job))
        })
        .await?;
    let not_before = chrono::DateTime::parse_from_rfc3339(text(&job, "not_before"))?;
    cluster.restart_control_plane().await?;
    // Nobody triggers anything: the restarted control plane keeps the delay and runs it.
    let run = wait_run_ended(&cluster, &run_id).await?;
    let job = &run["jobs"][0];
    ensure!(
        job["status"] == "completed" && job["attempt"] == 2,
        "the delayed attempt ran after the restart: {job}"
    );
    let claimed_at = chrono::DateTime::parse_from_rfc3339(text(job, "claimed_at"))?;
    ensure!(
        claimed_at >= not_before,
        "claimed at {claimed_at}, due at {not_before}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_target_runs_each_run_once_on_one_matching_agent_never_another() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let mut names = BTreeMap::new();
    for (name, fleet) in [("pool1", "pool"), ("pool2", "pool"), ("outside", "other")] {
        let agent = cluster.enroll_agent(name, &[("fleet", fleet)]).await?;
        cluster
            .start_agent(&agent, &AgentOptions::default())
            .await?;
        names.insert(agent.id.clone(), name.to_string());
    }
    // Each job prints the name of the agent whose work dir it runs in.
    let event_id = create_event(
        &cluster,
        &EventSpec::bash(
            "pooled",
            "host=${PWD#*/agents/}\nhost=${host%%/*}\necho \"ran on ${host%-*}\"",
        ),
        json!({"targets": {"pool": {"fleet": "pool"}}}),
    )
    .await?;
    let mut run_ids = Vec::new();
    for _ in 0..6 {
        run_ids.push(trigger(&cluster, &event_id, json!({})).await?);
    }
    let mut ran_on = BTreeSet::new();
    for run_id in &run_ids {
        let run = wait_run_ended(&cluster, run_id).await?;
        let jobs = run["jobs"].as_array().context("jobs")?;
        ensure!(
            run["status"] == "completed" && jobs.len() == 1,
            "one completed job per run: {run:#}"
        );
        let job = &jobs[0];
        let agent = names
            .get(text(job, "agent_id"))
            .with_context(|| format!("the job names a known agent: {job}"))?;
        ensure!(
            agent.starts_with("pool") && job["attempt"] == 1,
            "run by a matching agent, once: {job}"
        );
        let log = cluster.job_logs(text(job, "id")).await?;
        ensure!(
            String::from_utf8_lossy(&log).trim() == format!("ran on {agent}"),
            "the agent the job names ran it: {}",
            String::from_utf8_lossy(&log)
        );
        ran_on.insert(agent.clone());
    }
    ensure!(
        ran_on.iter().all(|agent| agent != "outside"),
        "the agent outside the pool never ran a job: {ran_on:?}"
    );
    Ok(())
}
