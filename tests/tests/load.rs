//! Load: 500 agents running the agent's own code in this process (`cronium_e2e::fleet`, jobs run
//! by the SIMULATED in-process executor) connected over real QUIC + mTLS to a real control plane
//! process with short heartbeat and lease periods (1 s and 2 s, so an agent silent for 3 s is cut
//! off). Over a window spanning several of those periods none is marked offline and none
//! reconnects (its `connected_at` never changes), while pool runs wake all 500 at once for each
//! job: every attempt is claimed exactly once. Then the control plane is stopped (SIGTERM) and
//! started again on the same data dir and ports: all 500 come back, and their reconnects are
//! spread (many distinct times, no window of 10 ms holding most of them), not a thundering herd.
//! No assertion is about speed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::fleet::{self, Executor, Fleet, FleetOptions};
use cronium_e2e::load::{AgentState, Histogram, Spread, fleet_states};
use cronium_e2e::{ClusterOptions, EventSpec, TestCluster, init_crypto};
use serde_json::{Value, json};

const AGENTS: usize = 500;
const PREFIX: &str = "load-";
const HEARTBEAT_SECONDS: u32 = 1;
const LEASE_SECONDS: u32 = 2;
/// The control plane closes an agent silent for 3 heartbeats; the window spans several of those.
const HOLD: Duration = Duration::from_secs(12);
/// Pool runs triggered while all agents are connected; each wakes all 500.
const POOL_RUNS: usize = 10;
/// Generous deadlines for a loaded 2-core machine; none of them is asserted as a speed.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(90);
const RUNS_TIMEOUT: Duration = Duration::from_secs(90);

async fn states(cluster: &TestCluster) -> Result<BTreeMap<String, AgentState>> {
    fleet_states(&cluster.api().get_ok("/api/v1/agents").await?, PREFIX)
}

/// Waits until all agents are online with a connection registered after `after_ms`; returns
/// their states.
async fn wait_all_online(
    cluster: &TestCluster,
    after_ms: i64,
    what: &str,
) -> Result<BTreeMap<String, AgentState>> {
    cluster
        .wait_until(ONLINE_TIMEOUT, what, || async {
            let states = states(cluster).await?;
            let back = states
                .values()
                .filter(|state| {
                    state.online && state.connected_at_ms.is_some_and(|at| at > after_ms)
                })
                .count();
            if states.len() == AGENTS && back == AGENTS {
                Ok(Some(states))
            } else {
                bail!("{back} of {AGENTS} online")
            }
        })
        .await
}

async fn scrape(cluster: &TestCluster) -> Result<String> {
    let response = cluster.api().get("/metrics").await?;
    ensure!(response.status == 200, "GET /metrics: {}", response.status);
    Ok(response.text)
}

fn sample(exposition: &str, key: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Triggers the pool runs, waits for each to end and checks every job ran once, on a fleet
/// agent, with attempt 1 and the simulated executor's `hi`; returns the job ids.
async fn pool_runs(cluster: &TestCluster, names: &BTreeSet<String>) -> Result<Vec<String>> {
    let by_id: BTreeMap<String, String> = cluster
        .api()
        .get_ok("/api/v1/agents")
        .await?
        .as_array()
        .context("agents")?
        .iter()
        .filter_map(|agent| {
            Some((
                agent["id"].as_str()?.to_owned(),
                agent["name"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let mut body = EventSpec::bash("pooled", fleet::SIMULATED_SCRIPT).to_json(cluster.marker());
    body["targets"] = json!({"pool": {"load": "fleet"}});
    let event = cluster
        .api()
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, "create the pool event")?;
    let event_id = event["id"].as_str().context("event id")?.to_owned();
    let mut runs = Vec::new();
    for _ in 0..POOL_RUNS {
        let run = cluster
            .api()
            .post(&format!("/api/v1/events/{event_id}/runs"), &json!({}))
            .await?
            .expect_status(201, "trigger the pool event")?;
        runs.push(run["run_id"].as_str().context("run id")?.to_owned());
    }
    let mut jobs = Vec::new();
    for run_id in &runs {
        let run: Value = cluster
            .wait_until(RUNS_TIMEOUT, &format!("run {run_id} ended"), || async {
                let run = cluster
                    .api()
                    .get_ok(&format!("/api/v1/runs/{run_id}"))
                    .await?;
                let ended = run["jobs"].as_array().is_some_and(|jobs| {
                    !jobs.is_empty()
                        && jobs.iter().all(|job| {
                            !matches!(
                                job["status"].as_str(),
                                Some("queued" | "claimed" | "running")
                            )
                        })
                });
                Ok(ended.then_some(run))
            })
            .await?;
        let run_jobs = run["jobs"].as_array().context("jobs")?;
        ensure!(run_jobs.len() == 1, "a pool run is one job: {run:#}");
        let job = &run_jobs[0];
        ensure!(
            job["status"] == "completed" && job["attempt"] == 1,
            "the pool job completed at its first attempt: {job}"
        );
        let agent = job["agent_id"].as_str().context("agent_id")?;
        ensure!(
            by_id.get(agent).is_some_and(|name| names.contains(name)),
            "a fleet agent ran it: {job}"
        );
        let job_id = job["id"].as_str().context("job id")?.to_owned();
        let log = cluster.job_logs(&job_id).await?;
        ensure!(
            String::from_utf8_lossy(&log).trim() == "hi",
            "the simulated executor's output: {:?}",
            String::from_utf8_lossy(&log)
        );
        jobs.push(job_id);
    }
    Ok(jobs)
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_agents_stay_online_claim_each_attempt_once_and_come_back_spread_after_a_restart()
-> Result<()> {
    init_crypto();
    let started = Instant::now();
    let mut cluster = TestCluster::start_with(ClusterOptions {
        lease_seconds: Some(LEASE_SECONDS),
        heartbeat_seconds: Some(HEARTBEAT_SECONDS),
    })
    .await?;
    let token = cluster
        .create_enrollment_token(&json!({"uses": AGENTS, "ttl_seconds": 3600}))
        .await?;
    let labels = BTreeMap::from([("load".to_owned(), "fleet".to_owned())]);
    let identities = fleet::enroll(
        &cluster.http_url(),
        token["token"].as_str().context("token")?,
        token["ca_sha256"].as_str().context("ca_sha256")?,
        &cluster.dir().join("fleet"),
        PREFIX,
        AGENTS,
        &labels,
    )
    .await?;
    let names: BTreeSet<String> = identities.iter().map(|id| id.name.clone()).collect();
    let enrolled = started.elapsed();
    let mut fleet = Fleet::spawn(
        identities.into_iter().map(|identity| identity.state_dir),
        FleetOptions {
            executor: Executor::SimulatedInProcess,
            capacity: 1,
            reconnect_max: Duration::from_secs(2),
        },
    );
    let connected = wait_all_online(&cluster, 0, "all 500 agents online").await?;
    let online = started.elapsed();

    // The hold: every agent stays online on the connection it had, across several heartbeat
    // and offline periods, while pool runs wake all of them for every job.
    let before = scrape(&cluster).await?;
    let pool_done = Arc::new(AtomicBool::new(false));
    let watch = async {
        let hold_until = Instant::now() + HOLD;
        let mut polls = 0;
        while Instant::now() < hold_until || !pool_done.load(Ordering::SeqCst) {
            let now = states(&cluster).await?;
            for (name, state) in &now {
                ensure!(
                    state == &connected[name],
                    "{name} changed during the hold: {:?} → {state:?} (offline or reconnected)",
                    connected[name]
                );
            }
            ensure!(now.len() == AGENTS, "{} agents listed", now.len());
            polls += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::Ok(polls)
    };
    let pool = async {
        let jobs = pool_runs(&cluster, &names).await;
        pool_done.store(true, Ordering::SeqCst);
        jobs
    };
    let (polls, jobs) = tokio::join!(watch, pool);
    let (polls, jobs) = (polls?, jobs?);
    fleet.ensure_running()?;
    let after = scrape(&cluster).await?;
    let claims = sample(&after, "cronium_job_claim_wait_seconds_count")
        - sample(&before, "cronium_job_claim_wait_seconds_count");
    ensure!(
        claims == POOL_RUNS as f64,
        "{claims} claims for {POOL_RUNS} pool jobs woken on {AGENTS} agents each: every attempt is claimed exactly once"
    );
    let unique: BTreeSet<&String> = jobs.iter().collect();
    ensure!(unique.len() == POOL_RUNS, "one job per run: {jobs:?}");
    let completed = "cronium_jobs_finished_total{status=\"completed\",reason=\"none\"}";
    ensure!(
        sample(&after, completed) - sample(&before, completed) == POOL_RUNS as f64,
        "each pool job finished once"
    );
    let heartbeats = Histogram::parse(&after, "cronium_heartbeat_seconds")?;
    ensure!(
        heartbeats.count >= AGENTS as f64,
        "the control plane timed the heartbeats: {heartbeats:?}"
    );
    let held = started.elapsed();

    // The restart: SIGTERM closes every connection at once; all come back, spread out.
    let stopped_at = chrono::Utc::now().timestamp_millis();
    cluster.stop_control_plane(Duration::from_secs(60)).await?;
    cluster.start_control_plane_again().await?;
    let back = wait_all_online(
        &cluster,
        stopped_at,
        "all 500 agents back after the restart",
    )
    .await?;
    let times: Vec<i64> = back
        .values()
        .filter_map(|state| state.connected_at_ms)
        .collect();
    let spread = Spread::of(&times).context("no reconnect times")?;
    eprintln!(
        "load: enrolled after {enrolled:?}, all online after {online:?}, held {polls} polls until {held:?}; heartbeat handling p50 {:?} s p99 {:?} s over {} heartbeats; reconnects after SIGTERM: {spread:?} ({} ms wide), test time {:?}",
        heartbeats.quantile(0.5),
        heartbeats.quantile(0.99),
        heartbeats.count,
        spread.width_ms(),
        started.elapsed()
    );
    ensure!(
        spread.count == AGENTS,
        "every agent reconnected: {spread:?}"
    );
    ensure!(
        spread.distinct_ms >= AGENTS / 5,
        "the reconnects are spread over many distinct times, not a herd: {spread:?}"
    );
    ensure!(
        spread.busiest_10ms <= AGENTS / 4,
        "no 10 ms window holds a quarter of the reconnects: {spread:?}"
    );
    let errors = fleet.stop().await;
    ensure!(
        errors == 0,
        "{errors} in-process agents stopped with an error"
    );
    Ok(())
}
