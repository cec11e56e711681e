//! Many agents in this process, each running the agent's own code (`cronium_agent::run`) over a
//! QUIC connection of its own, enrolled with labels so one event can target all of them.
//!
//! What runs a job is the fleet's [`Executor`]: the agent's real runner (a `bash` process per
//! job), or `cronium_e2e::fleet::SimulatedEchoHi`, an in-process stand-in that writes the line
//! `hi` without forking, so the figure measures the control plane and the agents' protocol, not
//! the host's fork rate. Everything else (connection, claims, spool, uploads) is the agent's own
//! code either way. The fleet itself lives in `cronium_e2e::fleet`, shared with the load test.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub use cronium_e2e::fleet::Executor;
use cronium_e2e::fleet::{Fleet, FleetOptions};

use crate::api::Api;
use crate::cluster::{enroll_in_process, wait_online};

/// A fleet of in-process agents (`cronium_e2e::fleet`, shared with the load test); dropping it
/// stops them.
pub struct InProcessFleet {
    fleet: Fleet,
    /// How long it took until `GET /agents` showed all of them online.
    pub online_after: Duration,
}

impl InProcessFleet {
    /// Enrolls `count` agents named `PREFIXNNNN` with `labels` under `root`, runs them (capacity
    /// 1 each, their jobs run by `executor`) and waits until all are online.
    pub async fn start(
        api: &Api,
        root: &Path,
        prefix: &str,
        count: usize,
        labels: &BTreeMap<String, String>,
        executor: Executor,
    ) -> anyhow::Result<InProcessFleet> {
        let identities = enroll_in_process(api, root, prefix, count, labels).await?;
        let names: Vec<String> = identities.iter().map(|(_, name)| name.clone()).collect();
        let fleet = Fleet::spawn(
            identities.into_iter().map(|(state_dir, _)| state_dir),
            FleetOptions {
                executor,
                ..FleetOptions::default()
            },
        );
        let online_timeout = Duration::from_secs(60) + Duration::from_millis(100) * count as u32;
        let online_after = wait_online(api, &names, online_timeout).await?;
        Ok(InProcessFleet {
            fleet,
            online_after,
        })
    }

    /// Fails if an agent has stopped (it returned or panicked) while it should be running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.fleet.ensure_running()
    }

    /// Stops every agent and waits for them (at most 30 s, then aborts the rest); returns how
    /// many stopped with an error.
    pub async fn stop(self) -> usize {
        self.fleet.stop().await
    }
}

/// How long one simulated fan-out may take before the phase fails.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

/// One fan-out to the fleet waited for on the run's event stream (`GET /runs/{id}/events`, as
/// `cronium run --wait` does) until its `end`; the outputs are checked afterwards, outside the
/// timing, with one `GET /runs/{id}`.
pub(super) async fn streamed_round(
    api: &Api,
    event_id: &str,
    hosts: usize,
) -> anyhow::Result<super::Sample> {
    let t0_ns = crate::api::now_ns();
    let t0 = std::time::Instant::now();
    let (run_id, _) = super::trigger(api, event_id, hosts).await?;
    let post = t0.elapsed();
    let followed = api.follow_run(&run_id, ROUND_TIMEOUT).await?;
    let total = t0.elapsed();
    let counts = &followed.end["counts"];
    let completed = counts["completed"].as_u64().unwrap_or(0) as usize;
    if completed != hosts {
        anyhow::bail!(
            "the run ended with {completed} of {hosts} jobs completed: {}",
            followed.end["counts"]
        );
    }
    let run = api.get(&format!("/runs/{run_id}")).await?;
    let jobs: Vec<&serde_json::Value> = run["jobs"].as_array().into_iter().flatten().collect();
    if jobs.len() != hosts {
        anyhow::bail!("GET /runs/{{id}} lists {} jobs, not {hosts}", jobs.len());
    }
    for job in &jobs {
        super::ensure_said_hi(job, None)?;
    }
    if followed.final_seen_ns.len() != hosts {
        anyhow::bail!(
            "the run's event stream announced {} final jobs, not {hosts}",
            followed.final_seen_ns.len()
        );
    }
    let ms = |at: i128| (at - t0_ns) as f64 / 1e6;
    let seen = followed
        .final_seen_ns
        .iter()
        .min()
        .zip(followed.final_seen_ns.iter().max())
        .map(|(first, last)| (ms(*first), ms(*last)));
    Ok(super::Sample {
        total: total.as_secs_f64() * 1e3,
        post: post.as_secs_f64() * 1e3,
        first: super::first_milestones(&jobs, t0_ns),
        last: super::last_milestones(&jobs, t0_ns),
        seen,
        events: followed.events,
    })
}
