//! Two control-plane replicas on one PostgreSQL database (issue 8), with real processes: the
//! test starts its own throwaway PostgreSQL cluster, so it runs in the SQLite pass of the suite
//! too.
//!
//! Replicas A and B (own data dirs and ports, one database, one `ENCRYPTION_KEY`) share one CA;
//! an agent enrolled through A and connected to A runs a job created through B's API at once (B's
//! wake-up reaches it through `NOTIFY`: agents never poll), its log followed on B and its result
//! readable on both; a rollout that skips offline hosts, created through B, runs on it (it is
//! connected to A, not offline); restarted pointing at B, the agent is trusted by B and runs a job created
//! through A; exactly one replica leads the scheduler (`cronium_scheduler_leader`), an
//! every-second schedule fires each slot once with both running, and when the leader is
//! SIGKILLed the other takes over and the slots go on, each still fired once.
//!
//! Failover: an agent enrolled through A (its `agent.json` names only A) is shown online with
//! A's `connected_at` through B's `GET /agents`, learns B's address from A, and when A is
//! SIGKILLed under a running job it connects to B by itself; the job's result and its whole log
//! (the part A stored and the part B stored, nothing lost or doubled) are read through B.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::{AgentOptions, ClusterOptions, EnrolledAgent, EventSpec};
use cronium_e2e::postgres::PgCluster;
use cronium_e2e::sse::follow_job_logs;
use serde_json::{Value, json};

/// How long a job may take from its creation to its result.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to come online, and a follower to take the scheduler over.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a few slots of an every-second schedule may take.
const SLOTS_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the replica's `/metrics` says it leads the scheduler.
async fn leads(cluster: &TestCluster) -> Result<bool> {
    let metrics = cluster.api().get("/metrics").await?;
    if metrics.status != 200 {
        bail!("GET /metrics: {} {}", metrics.status, metrics.text);
    }
    if metrics.text.contains("cronium_scheduler_leader 1\n") {
        Ok(true)
    } else if metrics.text.contains("cronium_scheduler_leader 0\n") {
        Ok(false)
    } else {
        bail!("no cronium_scheduler_leader gauge in {}", metrics.text)
    }
}

/// The CA fingerprint a replica hands enrolling agents.
async fn ca_sha256(cluster: &TestCluster) -> Result<String> {
    let token = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 60}))
        .await?;
    token["ca_sha256"]
        .as_str()
        .map(str::to_owned)
        .context("ca_sha256")
}

/// Stops `agent` under `from` and starts it again under `to`, its state dir pointing at `to`'s
/// addresses (an operator re-pointing an agent: the replicas it learned under other addresses
/// are set aside, so it dials `to`).
async fn move_agent(
    from: &mut TestCluster,
    to: &mut TestCluster,
    agent: &EnrolledAgent,
) -> Result<()> {
    from.kill_agent(&agent.id)?;
    let path = agent.state_dir.join("agent.json");
    let mut identity: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    identity["server_url"] = json!(to.http_url());
    identity["quic_addrs"] = json!([to.quic_addr().to_string()]);
    std::fs::write(&path, serde_json::to_vec_pretty(&identity)?)?;
    to.start_agent(agent, &AgentOptions::default()).await
}

/// Runs a bash job on `agent`, created through `through`; returns its id once it completed.
async fn run_through(through: &TestCluster, agent: &EnrolledAgent, script: &str) -> Result<String> {
    let job_id = through
        .run_single_job(&EventSpec::bash("cross-replica", script).target(&agent.id))
        .await?;
    let job = through.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    if job["status"] != "completed" {
        bail!("job {job_id} did not complete: {job}");
    }
    Ok(job_id)
}

/// The handled slots of an event (newest first).
async fn slots(cluster: &TestCluster, event: &str) -> Result<Vec<Value>> {
    cluster
        .api()
        .get_ok(&format!("/api/v1/events/{event}/schedule/fires"))
        .await?
        .as_array()
        .cloned()
        .context("the slots are not an array")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_one_fleet_and_one_scheduler_leads() -> Result<()> {
    // Declared first, dropped last: the control planes stop before their database.
    let postgres = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = postgres.create_database()?;
    let options = ClusterOptions {
        lease_seconds: None,
        heartbeat_seconds: Some(1),
    };
    let mut a = TestCluster::start_on_database(options, &url).await?;
    let mut b = TestCluster::start_replica_of(&a).await?;
    let fingerprint = ca_sha256(&a).await?;
    assert_eq!(
        fingerprint,
        ca_sha256(&b).await?,
        "the replicas have different CAs"
    );

    // An agent enrolled through A, connected to A.
    let agent = a.enroll_agent("replicated", &[]).await?;
    a.start_agent(&agent, &AgentOptions::default()).await?;

    // A job created through B runs on it: B's wake-up reaches the agent on A. The script waits
    // for a file so a follower on B is attached while A records the output.
    let gate = a.dir().join("gate");
    let script = format!(
        "echo first-line; while [ ! -e '{}' ]; do sleep 0.05; done; echo second-line",
        gate.display()
    );
    let job_id = b
        .run_single_job(&EventSpec::bash("created-on-b", &script).target(&agent.id))
        .await?;
    a.wait_job_status(&job_id, &["running"], JOB_TIMEOUT)
        .await?;
    let follower = {
        let api = b.api().clone();
        let job_id = job_id.clone();
        tokio::spawn(async move { follow_job_logs(&api, &job_id, JOB_TIMEOUT).await })
    };
    b.wait_until(JOB_TIMEOUT, "the first line on B", || async {
        let logs = b.job_logs(&job_id).await?;
        Ok(String::from_utf8_lossy(&logs)
            .contains("first-line")
            .then_some(()))
    })
    .await?;
    std::fs::write(&gate, b"")?;
    let followed = follower.await??;
    assert_eq!(followed.text(), "first-line\nsecond-line\n");
    assert_eq!(followed.end["status"], "completed", "{}", followed.end);
    for replica in [&a, &b] {
        let job = replica.wait_job_final(&job_id, JOB_TIMEOUT).await?;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["agent_id"], json!(agent.id), "{job}");
        assert_eq!(
            String::from_utf8_lossy(&replica.job_logs(&job_id).await?),
            "first-line\nsecond-line\n"
        );
    }

    // A rollout that skips offline hosts, created through B: the agent connected to A is not
    // offline for B (`agent_presence`), so its job runs.
    let event = b
        .api()
        .post(
            "/api/v1/events",
            &json!({
                "name": "skip-offline", "kind": "bash", "script": "echo not-skipped",
                "targets": {"agents": [agent.id]}, "rollout": {"offline": "skip"},
            }),
        )
        .await?
        .expect_status(201, "create the skip-offline event")?;
    let event_id = event["id"].as_str().context("event id")?;
    let run = b
        .api()
        .post(&format!("/api/v1/events/{event_id}/runs"), &json!({}))
        .await?
        .expect_status(201, "run the skip-offline event")?;
    let skip_job = run["jobs"][0]["id"].as_str().context("job id")?;
    let job = b.wait_job_final(skip_job, JOB_TIMEOUT).await?;
    assert_eq!(job["status"], "completed", "{job}");

    // Restarted pointing at B, the agent is trusted by B (same CA) and runs a job created
    // through A.
    move_agent(&mut a, &mut b, &agent).await?;
    let job_id = run_through(&a, &agent, "echo created-on-a").await?;
    assert_eq!(
        String::from_utf8_lossy(&b.job_logs(&job_id).await?),
        "created-on-a\n"
    );

    // Exactly one replica leads the scheduler.
    let (a_leads, b_leads) = (leads(&a).await?, leads(&b).await?);
    assert!(a_leads != b_leads, "A leads: {a_leads}, B leads: {b_leads}");

    // An every-second schedule, created through the follower: the leader hears of it.
    let follower_api = if a_leads { b.api() } else { a.api() };
    let event = follower_api
        .post(
            "/api/v1/events",
            &json!({
                "name": "every-second",
                "kind": "bash",
                "script": "echo tick",
                "targets": {"agents": [agent.id]},
                "schedule": {"cron": "* * * * * *", "timezone": "UTC"},
            }),
        )
        .await?
        .expect_status(201, "create the scheduled event")?;
    let event_id = event["id"].as_str().context("event id")?.to_owned();
    a.wait_until(SLOTS_TIMEOUT, "three fired slots", || async {
        Ok((slots(&a, &event_id).await?.len() >= 3).then_some(()))
    })
    .await?;

    // SIGKILL the leader: the other takes over and the slots go on.
    let (leader, survivor) = if a_leads {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    leader.kill_control_plane()?;
    if !a_leads {
        // The agent was connected to the killed leader (B): it goes back to A.
        move_agent(leader, survivor, &agent).await?;
    }
    survivor
        .wait_until(
            SWITCH_TIMEOUT,
            "the survivor to lead the scheduler",
            || async { Ok(leads(survivor).await?.then_some(())) },
        )
        .await?;
    let before = slots(survivor, &event_id).await?.len();
    survivor
        .wait_until(SLOTS_TIMEOUT, "three more completed slots", || async {
            let slots = slots(survivor, &event_id).await?;
            let mut completed = 0;
            for slot in slots.iter().take(slots.len().saturating_sub(before)) {
                if let Some(run_id) = slot["run_id"].as_str() {
                    let run = survivor
                        .api()
                        .get_ok(&format!("/api/v1/runs/{run_id}"))
                        .await?;
                    completed += usize::from(run["status"] == "completed");
                }
            }
            Ok((completed >= 3).then_some(()))
        })
        .await?;

    // Each slot fired once, by one run.
    survivor
        .api()
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/events/{event_id}"),
            Some(&json!({"schedule": null})),
        )
        .await?
        .expect_status(200, "remove the schedule")?;
    let slots = slots(survivor, &event_id).await?;
    let mut slot_keys = BTreeSet::new();
    let mut run_ids = BTreeSet::new();
    for slot in &slots {
        let key = slot["slot_at"].as_str().context("slot_at")?.to_owned();
        assert!(slot_keys.insert(key.clone()), "slot {key} handled twice");
        if let Some(run_id) = slot["run_id"].as_str() {
            assert!(run_ids.insert(run_id.to_owned()), "run {run_id} twice");
        }
    }
    let runs = survivor
        .api()
        .get_ok(&format!("/api/v1/runs?event_id={event_id}&limit=200"))
        .await?;
    let runs = runs.as_array().context("the runs list")?;
    assert!(runs.len() < 200, "too many runs to check them all");
    let listed: BTreeSet<String> = runs
        .iter()
        .filter_map(|run| run["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, run_ids, "runs of the event that no slot stands for");
    Ok(())
}

/// The agent as `GET /api/v1/agents` lists it through `replica`.
async fn listed_agent(replica: &TestCluster, agent_id: &str) -> Result<Value> {
    let agents = replica.api().get_ok("/api/v1/agents").await?;
    agents
        .as_array()
        .context("the agents list")?
        .iter()
        .find(|agent| agent["id"] == agent_id)
        .cloned()
        .with_context(|| format!("agent {agent_id} is not listed: {agents}"))
}

/// The replica addresses the agent learned (its state dir's `replicas.json`), if any.
fn learned_replicas(agent: &EnrolledAgent) -> Result<Option<Vec<String>>> {
    let path = agent.state_dir.join("replicas.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let file: Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            Ok(Some(serde_json::from_value(file["quic_addrs"].clone())?))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_another_replica_and_its_job_log_resumes() -> Result<()> {
    // Declared first, dropped last: the control planes stop before their database.
    let postgres = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = postgres.create_database()?;
    let options = ClusterOptions {
        lease_seconds: None,
        heartbeat_seconds: Some(1),
    };
    let mut a = TestCluster::start_on_database(options, &url).await?;
    let b = TestCluster::start_replica_of(&a).await?;
    let (a_addr, b_addr) = (a.quic_addr().to_string(), b.quic_addr().to_string());

    // Enrolled through A, the agent knows A's address only.
    let agent = a.enroll_agent("failover", &[]).await?;
    let identity: Value =
        serde_json::from_slice(&std::fs::read(agent.state_dir.join("agent.json"))?)?;
    assert_eq!(identity["quic_addrs"], json!([a_addr]), "{identity}");
    a.start_agent(&agent, &AgentOptions::default()).await?;

    // With both up, B lists the agent connected to A as online, with A's connection time.
    let on_a = listed_agent(&a, &agent.id).await?;
    assert_eq!(on_a["status"], "online", "{on_a}");
    assert!(on_a["connected_at"].is_string(), "{on_a}");
    let through_b = b
        .wait_until(SWITCH_TIMEOUT, "the agent online through B", || async {
            let listed = listed_agent(&b, &agent.id).await?;
            Ok((listed["status"] == "online").then_some(listed))
        })
        .await?;
    assert_eq!(
        through_b["connected_at"], on_a["connected_at"],
        "{through_b}"
    );
    let shown = b
        .api()
        .get_ok(&format!("/api/v1/agents/{}", agent.id))
        .await?;
    assert_eq!(shown["status"], "online", "{shown}");
    assert_eq!(shown["connected_at"], on_a["connected_at"], "{shown}");

    // A tells the agent every live replica, itself first; the agent keeps them in its state dir.
    let learned = a
        .wait_until(SWITCH_TIMEOUT, "the agent to learn B's address", || async {
            Ok(learned_replicas(&agent)?.filter(|learned| learned.contains(&b_addr)))
        })
        .await?;
    assert_eq!(learned, [a_addr.clone(), b_addr.clone()]);

    // A job that prints, waits for a release file, and prints again: its first line is stored
    // through A.
    let gate = a.dir().join("release");
    let script = format!(
        "echo before-failover; while [ ! -e '{}' ]; do sleep 0.05; done; echo after-failover",
        gate.display()
    );
    let job_id = a
        .run_single_job(&EventSpec::bash("long-job", &script).target(&agent.id))
        .await?;
    a.wait_until(JOB_TIMEOUT, "the first line stored through A", || async {
        let logs = a.job_logs(&job_id).await?;
        Ok((logs == b"before-failover\n").then_some(()))
    })
    .await?;

    // A dies. Nobody tells the agent anything: it connects to B by itself (a new connection,
    // so a new `connected_at`).
    a.kill_control_plane()?;
    b.wait_until(SWITCH_TIMEOUT, "the agent connected to B", || async {
        let shown = b
            .api()
            .get_ok(&format!("/api/v1/agents/{}", agent.id))
            .await?;
        Ok(
            (shown["status"] == "online" && shown["connected_at"] != on_a["connected_at"])
                .then_some(()),
        )
    })
    .await?;
    let listed = listed_agent(&b, &agent.id).await?;
    assert_eq!(listed["status"], "online", "{listed}");
    assert_ne!(listed["connected_at"], on_a["connected_at"], "{listed}");
    // B told it the replicas with B first.
    b.wait_until(
        SWITCH_TIMEOUT,
        "B first in the learned replicas",
        || async {
            Ok(learned_replicas(&agent)?.filter(|learned| learned.first() == Some(&b_addr)))
        },
    )
    .await?;

    // The job kept running: released now, it ends through B with its whole log, each line once,
    // in its first attempt.
    std::fs::write(&gate, b"")?;
    let job = b.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    assert_eq!(job["agent_id"], json!(agent.id), "{job}");
    assert_eq!(
        String::from_utf8_lossy(&b.job_logs(&job_id).await?),
        "before-failover\nafter-failover\n"
    );

    // And it takes new work through B.
    let job_id = run_through(&b, &agent, "echo after-the-switch").await?;
    assert_eq!(
        String::from_utf8_lossy(&b.job_logs(&job_id).await?),
        "after-the-switch\n"
    );
    Ok(())
}
