//! The cross-replica phase (`--replicas-only`, issue 8): trigger → result of a job created on one
//! replica for an agent connected to another, next to the same job created on the agent's own
//! replica, interleaved in the same run.
//!
//! A throwaway PostgreSQL cluster (`cronium_e2e::postgres::PgCluster`, as [`crate::pg_claims`])
//! holds one database; two `cronium serve` replicas, A and B, run on it with the same
//! `ENCRYPTION_KEY` (own data dirs and ports on 127.0.0.1; each replica's relay URL is its own
//! HTTP address, the default on one host). Every agent is enrolled through A and connected to A:
//! `--replica-agents` in this process (`cronium_e2e::fleet`, the agent's own code, jobs by the
//! SIMULATED in-process executor: `echo hi` answered without a process) and
//! `--replica-real-agents` `cronium-agent run` processes (a real `bash` per job). A's
//! `cronium_agents_connected` must count all of them and B's none, before and after the samples,
//! and none may reconnect meanwhile (`connected_at` in `GET /agents`), or the phase fails.
//!
//! One single-host event per agent (`echo hi`). Each sample picks a random agent of each kind
//! and runs its event twice, in random order: through B's API (**cross**: B commits the job and
//! tells A over `LISTEN`/`NOTIFY`, A wakes the agent; the agent's result, committed by A, reaches
//! B's run stream over `NOTIFY` again) and through A's API (**same**, the peer). Both are timed
//! alike, from just before `POST /events/{id}/runs` to the `end` event of the run's event stream
//! (`GET /runs/{id}/events`) read from the replica that took the `POST`, as the load phase times
//! dispatch; the job's `claimed_at` and `finished_at` (server clock, ms) split that into the
//! wake-up and the way back. Printed: p50/p99 per side and kind, and the ratio cross / same.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use cronium_e2e::fleet::{self, Executor, Fleet, FleetOptions};
use cronium_e2e::load::fleet_states;
use cronium_e2e::postgres::PgCluster;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore};
use serde_json::{Value, json};

use crate::api::{Api, now_ns};
use crate::cluster::{ControlPlane, Listen, enrollment_token, start_agent_process, wait_online};
use crate::load::agents_connected;
use crate::phases::timestamp_ns;
use crate::procs::{Binaries, ChildGuard};
use crate::stats::Summary;

/// Names of the phase's agents (in-process, then processes).
const PREFIX: &str = "replica-";
/// How long one sample may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agents may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the phase does.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// In-process agents (SIMULATED executor).
    pub agents: usize,
    /// `cronium-agent run` processes (real bash).
    pub real_agents: usize,
    /// Timed runs per side and kind of agent.
    pub samples: usize,
    /// Untimed pairs before them.
    pub warmup: usize,
}

/// Which replica's API a run is created and followed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Replica B: the agent is connected to A.
    Cross,
    /// Replica A, the agent's own (the peer).
    Same,
}

/// Samples of one side, ms after just before the `POST`.
#[derive(Debug, Default, Clone)]
struct Samples {
    post: Vec<f64>,
    claimed: Vec<f64>,
    finished: Vec<f64>,
    end: Vec<f64>,
}

/// Summaries of one side.
#[derive(Debug, Clone, Copy)]
pub struct SideFigures {
    /// `POST` answered (run and job durable).
    pub post: Summary,
    /// The job's `claimed_at` (server clock, ms resolution).
    pub claimed: Summary,
    /// The job's `finished_at` (server clock, ms resolution).
    pub finished: Summary,
    /// The run's `end` event received.
    pub end: Summary,
}

impl SideFigures {
    fn of(samples: &Samples) -> SideFigures {
        SideFigures {
            post: Summary::of(&samples.post),
            claimed: Summary::of(&samples.claimed),
            finished: Summary::of(&samples.finished),
            end: Summary::of(&samples.end),
        }
    }

    fn json(&self) -> Value {
        json!({
            "post": self.post.to_json(),
            "claimed_at": self.claimed.to_json(),
            "finished_at": self.finished.to_json(),
            "end": self.end.to_json(),
        })
    }
}

/// One kind of agent's figures.
#[derive(Debug, Clone)]
pub struct KindFigures {
    pub executor: Executor,
    pub agents: usize,
    pub cross: SideFigures,
    pub same: SideFigures,
}

impl KindFigures {
    /// Cross / same of the run's `end`, p50 and p99.
    pub fn ratios(&self) -> (f64, f64) {
        (
            self.cross.end.p50 / self.same.end.p50,
            self.cross.end.p99 / self.same.end.p99,
        )
    }
}

/// The phase's figures.
#[derive(Debug, Clone)]
pub struct ReplicaFigures {
    pub options: ReplicaOptions,
    pub server_version: String,
    pub kinds: Vec<KindFigures>,
}

impl ReplicaFigures {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### Cronium replicas: trigger → result across replicas\n\n\
             Two `cronium serve` replicas on one {} database (throwaway cluster, fsync off); every \
             agent connected to replica A; each sample runs a random agent's `echo hi` event \
             through B (cross) and through A (same), in random order; {} warm-up pairs, {} timed \
             runs per side; {} CPUs. Times in ms from just before the `POST`; `claimed_at` and \
             `finished_at` are the server's clock (ms resolution).\n\n",
            self.server_version,
            self.options.warmup,
            self.options.samples,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        out += "| agents | created and followed through | `POST` answered p50 / p99 | `claimed_at` p50 / p99 | `finished_at` p50 / p99 | run `end` p50 / p99 |\n|---|---|---:|---:|---:|---:|\n";
        for kind in &self.kinds {
            for (label, side) in [
                ("B (cross-replica)", &kind.cross),
                ("A (same replica, the peer)", &kind.same),
            ] {
                out += &format!(
                    "| {} × {} | {label} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |\n",
                    kind.agents,
                    kind.executor.label(),
                    side.post.p50,
                    side.post.p99,
                    side.claimed.p50,
                    side.claimed.p99,
                    side.finished.p50,
                    side.finished.p99,
                    side.end.p50,
                    side.end.p99,
                );
            }
        }
        out += "\n";
        for kind in &self.kinds {
            let (p50, p99) = kind.ratios();
            out += &format!(
                "Ratio cross / same, run `end` ({}): **{p50:.2}×** p50, **{p99:.2}×** p99.\n",
                kind.executor.label()
            );
        }
        out
    }

    pub fn json(&self) -> Value {
        json!({
            "server_version": self.server_version,
            "options": {
                "agents": self.options.agents,
                "real_agents": self.options.real_agents,
                "samples": self.options.samples,
                "warmup": self.options.warmup,
            },
            "kinds": self.kinds.iter().map(|kind| {
                let (p50, p99) = kind.ratios();
                json!({
                    "executor": kind.executor.key(),
                    "agents": kind.agents,
                    "cross": kind.cross.json(),
                    "same": kind.same.json(),
                    "ratio_end_p50": p50,
                    "ratio_end_p99": p99,
                })
            }).collect::<Vec<_>>(),
        })
    }
}

fn progress(message: &str) {
    eprintln!("[cronium-bench] replicas: {message}");
}

/// Fails unless A counts `count` connected agents and B none.
async fn ensure_all_on_a(a: &Api, b: &Api, count: usize) -> anyhow::Result<()> {
    let (on_a, on_b) = (agents_connected(a).await?, agents_connected(b).await?);
    if on_a != count || on_b != 0 {
        bail!(
            "the agents must all be connected to replica A: A counts {on_a}, B counts {on_b}, of {count}"
        );
    }
    Ok(())
}

/// Runs the phase under `root` (the replicas' data dirs and the agents' state dirs).
pub async fn measure(
    binaries: &Binaries,
    root: &Path,
    options: &ReplicaOptions,
) -> anyhow::Result<ReplicaFigures> {
    progress("starting a throwaway PostgreSQL cluster");
    let cluster = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .context("starting the cluster")??;
    let database_url = cluster.create_database()?;
    let server_version = {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url)
            .await
            .context("connecting to the database")?;
        let version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        version.split(" on ").next().unwrap_or(&version).to_owned()
    };

    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let listen = Listen {
        env: vec![("CRONIUM_DATABASE_URL".into(), database_url)],
        ..Listen::any()
    };
    // Dropped in reverse order: the agents, then B, then A, then the cluster.
    let (mut replica_a, _) =
        ControlPlane::start_at(binaries, &root.join("replica-a"), &listen, &key, None)
            .await
            .context("starting replica A")?;
    let token = replica_a.api.token().to_owned();
    let (mut replica_b, _) = ControlPlane::start_at(
        binaries,
        &root.join("replica-b"),
        &listen,
        &key,
        Some(&token),
    )
    .await
    .context("starting replica B")?;
    let (a, b) = (replica_a.api.clone(), replica_b.api.clone());
    progress(&format!(
        "replica A at {} (quic {}), replica B at {} (quic {})",
        a.base(),
        replica_a.quic,
        b.base(),
        replica_b.quic
    ));

    progress(&format!(
        "enrolling {} in-process agents and {} agent processes through A",
        options.agents, options.real_agents
    ));
    let enrollment = enrollment_token(&a, options.agents).await?;
    let identities = fleet::enroll(
        a.base(),
        &enrollment.token,
        &enrollment.ca_sha256,
        &root.join("agents"),
        &format!("{PREFIX}sim-"),
        options.agents,
        &BTreeMap::new(),
    )
    .await?;
    let simulated: Vec<String> = identities.iter().map(|id| id.name.clone()).collect();
    let mut fleet = Fleet::spawn(
        identities.into_iter().map(|identity| identity.state_dir),
        FleetOptions {
            executor: Executor::SimulatedInProcess,
            capacity: 1,
            ..FleetOptions::default()
        },
    );
    let mut processes: Vec<ChildGuard> = Vec::new();
    let mut real: Vec<String> = Vec::new();
    for index in 0..options.real_agents {
        let name = format!("{PREFIX}real-{index:02}");
        processes.push(
            start_agent_process(
                binaries,
                &a,
                &name,
                &root.join("processes").join(&name),
                1,
                Path::new("/bin/bash"),
            )
            .await?,
        );
        real.push(name);
    }
    let all: Vec<String> = simulated.iter().chain(&real).cloned().collect();
    wait_online(&a, &all, ONLINE_TIMEOUT).await?;
    ensure_all_on_a(&a, &b, all.len()).await?;
    let connected = fleet_states(&a.get("/agents").await?, PREFIX)?;

    let mut kinds: Vec<(Executor, Vec<String>)> = vec![(Executor::SimulatedInProcess, Vec::new())];
    for name in &simulated {
        let event = a
            .create_event(&format!("replica-{name}"), fleet::SIMULATED_SCRIPT, name)
            .await?;
        kinds[0].1.push(event);
    }
    if !real.is_empty() {
        let mut events = Vec::new();
        for name in &real {
            events.push(
                a.create_event(&format!("replica-{name}"), "echo hi", name)
                    .await?,
            );
        }
        kinds.push((Executor::RealBash, events));
    }

    progress(&format!(
        "{} warm-up pairs, then {} timed runs per side through B and through A, interleaved",
        options.warmup, options.samples
    ));
    let mut samples: Vec<(Samples, Samples)> = vec![Default::default(); kinds.len()];
    let started = Instant::now();
    for index in 0..options.warmup + options.samples {
        for ((_, events), (cross, same)) in kinds.iter().zip(&mut samples) {
            let event = &events[rand::thread_rng().gen_range(0..events.len())];
            let mut order = [Side::Cross, Side::Same];
            order.shuffle(&mut rand::thread_rng());
            for side in order {
                let (api, into) = match side {
                    Side::Cross => (&b, &mut *cross),
                    Side::Same => (&a, &mut *same),
                };
                let sample = one_run(api, event).await.with_context(|| {
                    format!(
                        "a run through {}; replica A's last output:\n{}\nreplica B's:\n{}",
                        if side == Side::Cross { "B" } else { "A" },
                        replica_a.process.tail(),
                        replica_b.process.tail()
                    )
                })?;
                if index >= options.warmup {
                    into.post.push(sample.0);
                    into.claimed.push(sample.1);
                    into.finished.push(sample.2);
                    into.end.push(sample.3);
                }
            }
        }
        if (index + 1) % 100 == 0 {
            progress(&format!(
                "{} rounds in {:.0} s",
                index + 1,
                started.elapsed().as_secs_f64()
            ));
        }
    }

    fleet.ensure_running()?;
    for process in &mut processes {
        process.ensure_running()?;
    }
    replica_a.process.ensure_running()?;
    replica_b.process.ensure_running()?;
    ensure_all_on_a(&a, &b, all.len()).await?;
    let after = fleet_states(&a.get("/agents").await?, PREFIX)?;
    let moved: Vec<&String> = connected
        .iter()
        .filter(|(name, state)| after.get(*name) != Some(state))
        .map(|(name, _)| name)
        .collect();
    if !moved.is_empty() {
        bail!("agents went offline or reconnected during the samples: {moved:?}");
    }

    let figures = ReplicaFigures {
        options: options.clone(),
        server_version,
        kinds: kinds
            .iter()
            .zip(&samples)
            .map(|((executor, events), (cross, same))| KindFigures {
                executor: *executor,
                agents: events.len(),
                cross: SideFigures::of(cross),
                same: SideFigures::of(same),
            })
            .collect(),
    };
    for kind in &figures.kinds {
        let (p50, p99) = kind.ratios();
        progress(&format!(
            "{}: run `end` through B p50 {:.1} ms p99 {:.1} ms, through A p50 {:.1} ms p99 {:.1} ms: cross / same {p50:.2}× p50, {p99:.2}× p99",
            kind.executor.label(),
            kind.cross.end.p50,
            kind.cross.end.p99,
            kind.same.end.p50,
            kind.same.end.p99,
        ));
    }
    let errors = fleet.stop().await;
    if errors > 0 {
        progress(&format!(
            "{errors} in-process agents ended with an error when stopped"
        ));
    }
    drop(processes);
    drop(replica_b);
    drop(replica_a);
    drop(cluster);
    Ok(figures)
}

/// One run of `event_id` created through `api` and followed there to its `end`: ms to the
/// `POST`'s answer, the job's `claimed_at` and `finished_at`, and the `end` event.
async fn one_run(api: &Api, event_id: &str) -> anyhow::Result<(f64, f64, f64, f64)> {
    let t0_ns = now_ns();
    let t0 = Instant::now();
    let run = api
        .post(&format!("/events/{event_id}/runs"), &json!({}))
        .await?;
    let post = t0.elapsed();
    let run_id = run["run_id"].as_str().context("no run_id")?;
    let followed = api.follow_run(run_id, JOB_TIMEOUT).await?;
    let end = t0.elapsed();
    if followed.end["counts"]["completed"] != 1 {
        bail!("run {run_id} ended with {}", followed.end["counts"]);
    }
    let job = &followed.end["jobs"][0];
    let at = |field: &str| -> anyhow::Result<f64> {
        let ns = timestamp_ns(&job[field])
            .with_context(|| format!("run {run_id}: the job has no {field}: {job}"))?;
        Ok((ns - t0_ns) as f64 / 1e6)
    };
    let ms = |elapsed: Duration| elapsed.as_secs_f64() * 1e3;
    Ok((ms(post), at("claimed_at")?, at("finished_at")?, ms(end)))
}
