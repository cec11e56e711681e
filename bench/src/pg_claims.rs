//! The PostgreSQL phase (`--postgres-only`, issue 8): Cronium's throughput of no-op jobs on
//! PostgreSQL next to the raw `FOR UPDATE SKIP LOCKED` claim rate of the same server, measured
//! in the same run.
//!
//! A throwaway cluster (`cronium_e2e::postgres::PgCluster`: Debian's PostgreSQL 15, `initdb` in
//! a temp dir, a free 127.0.0.1 port, `fsync=off` as for the tests; removed at the end) holds two
//! databases:
//! - **raw**: a plain table of `--pg-raw-jobs` queued rows; `--pg-connections` connections each
//!   loop `UPDATE … SET state = 'claimed' WHERE id = (SELECT id … WHERE state = 'queued' ORDER BY
//!   id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id`, then the completion `UPDATE … SET state =
//!   'done'`, each statement its own transaction, until the table is drained. Jobs/s = rows /
//!   wall time; per job (claim + completion) p50/p99.
//! - **Cronium**: `cronium serve --database-url postgres://…` (the binary next to this one) and
//!   `--pg-agents` agents in this process (the agent's own code: connection, claims, spool,
//!   uploads; the SIMULATED in-process executor answers `echo hi` without a process), one pool
//!   event (`targets.pool`) all of them may claim. `--pg-clients` tasks create `--pg-jobs` runs
//!   through the API (`POST /events/{id}/runs`, one job each); the agents claim them
//!   (`store::claim_pg`), run them and upload the results. The round ends when the database holds
//!   every job completed (read every 20 ms). Jobs/s = jobs / (first `POST` → last completed);
//!   per job `queued_at` → `finished_at` p50/p99 from the jobs table.
//!
//! - **Cronium, draining a queue** (`--pg-drain-jobs`, the raw side's shape): the agents are
//!   stopped, the same clients create that many runs of a new pool event (timed apart: the API's
//!   rate of run creation with nothing claiming), then the agents start again and drain the
//!   queue (the database vacuumed and analyzed first, as the raw table is before each raw round,
//!   so both sides are planned with statistics that know their queue). Jobs/s = jobs / (first
//!   `claimed_at` → last `finished_at`, the server's timestamps,
//!   so the agents' reconnects are not counted; the wall time from their start to the last
//!   completion read is shown next to it); per job `claimed_at` → `finished_at` p50/p99.
//!
//! The rounds alternate raw, Cronium and Cronium draining; the figures are the medians over the
//! rounds and the ratios of the median rates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use cronium_e2e::fleet::{self, Executor, Fleet, FleetOptions};
use cronium_e2e::postgres::PgCluster;
use rand::RngCore;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::task::JoinSet;

use crate::api::Api;
use crate::cluster::{ControlPlane, Listen, enrollment_token, wait_online};
use crate::cpu::CpuUse;
use crate::procs::Binaries;
use crate::stats::Summary;

/// Names of the phase's agents.
const PREFIX: &str = "pg-";
/// Longest a round may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the Cronium round reads its progress from the database.
const POLL: Duration = Duration::from_millis(20);

/// What the phase does.
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub rounds: usize,
    pub raw_jobs: usize,
    pub connections: usize,
    pub jobs: usize,
    pub clients: usize,
    pub agents: usize,
    pub capacity: u32,
    /// Runs per draining round (0: none).
    pub drain_jobs: usize,
    /// Where the agents' state dirs are made (a temp dir inside it).
    pub agent_dir: PathBuf,
    /// PostgreSQL on the first half of the cores, everything else on the rest ([`crate::pin`]).
    pub split_cores: bool,
}

/// One round of either side.
#[derive(Debug, Clone)]
pub struct Round {
    pub jobs: usize,
    pub elapsed: Duration,
    /// Per job, milliseconds (raw: claim + completion; Cronium: queued → finished).
    pub latency: Summary,
    /// Cronium: jobs that needed more than one attempt (a claimed attempt that never reached
    /// its agent comes back after its lease); raw: 0.
    pub reattempted: usize,
    /// CPU time of the processes that did the round's work.
    pub cpu: CpuUse,
}

/// One round of Cronium draining a queue.
#[derive(Debug, Clone)]
pub struct DrainRound {
    /// Jobs / (first claim → last result), per job claimed → finished.
    pub round: Round,
    /// From the agents' start to the last completion read (reconnects and polling included).
    pub wall: Duration,
    /// How long the API clients took to create the runs, nothing claiming them.
    pub created_in: Duration,
}

impl Round {
    fn per_second(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU microseconds per job: the database's, the control plane's and this process's.
    fn cpu_per_job(&self) -> [f64; 3] {
        let per_job = |time: Duration| time.as_secs_f64() * 1e6 / self.jobs as f64;
        [
            per_job(self.cpu.database),
            per_job(self.cpu.control_plane),
            per_job(self.cpu.bench),
        ]
    }
}

/// The phase's figures.
#[derive(Debug, Clone)]
pub struct PgFigures {
    pub options: PgOptions,
    /// The file system of the agents' state dirs.
    pub agent_file_system: String,
    pub server_version: String,
    pub raw: Vec<Round>,
    pub cronium: Vec<Round>,
    pub drain: Vec<DrainRound>,
    /// With `--pg-split-cores`: the cores of PostgreSQL, and of everything else.
    pub cores: Option<(Vec<usize>, Vec<usize>)>,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

impl PgFigures {
    fn median_rate(rounds: &[Round]) -> f64 {
        median(&mut rounds.iter().map(Round::per_second).collect::<Vec<_>>())
    }

    fn median_of(rounds: &[Round], pick: impl Fn(&Summary) -> f64) -> f64 {
        median(
            &mut rounds
                .iter()
                .map(|round| pick(&round.latency))
                .collect::<Vec<_>>(),
        )
    }

    /// Cronium's median rate over the raw median rate.
    pub fn ratio(&self) -> f64 {
        PgFigures::median_rate(&self.cronium) / PgFigures::median_rate(&self.raw)
    }

    fn drained(&self) -> Vec<Round> {
        self.drain.iter().map(|drain| drain.round.clone()).collect()
    }

    /// Median CPU microseconds per job of `rounds`: the database's, the control plane's, this
    /// process's.
    fn median_cpu(rounds: &[Round]) -> [f64; 3] {
        let pick = |index: usize| {
            median(
                &mut rounds
                    .iter()
                    .map(|round| round.cpu_per_job()[index])
                    .collect::<Vec<_>>(),
            )
        };
        [pick(0), pick(1), pick(2)]
    }

    /// The raw side's median database CPU per job over Cronium's draining one: the share of the
    /// raw claim rate a database server doing nothing else could give Cronium (None without
    /// draining rounds).
    pub fn drain_database_ratio(&self) -> Option<f64> {
        (!self.drain.is_empty()).then(|| {
            PgFigures::median_cpu(&self.raw)[0] / PgFigures::median_cpu(&self.drained())[0]
        })
    }

    /// Cronium's median draining rate over the raw median rate (None without draining rounds).
    pub fn drain_ratio(&self) -> Option<f64> {
        (!self.drain.is_empty())
            .then(|| PgFigures::median_rate(&self.drained()) / PgFigures::median_rate(&self.raw))
    }

    pub fn markdown(&self) -> String {
        let options = &self.options;
        let mut out = String::new();
        out.push_str(&format!(
            "## PostgreSQL: no-op job throughput vs the raw SKIP LOCKED claim rate\n\n\
             Same server, same run ({}; throwaway cluster, fsync off), {} alternated rounds.\n\n",
            self.server_version, options.rounds
        ));
        if let Some((database, rest)) = &self.cores {
            out.push_str(&format!(
                "Cores split (`--pg-split-cores`): PostgreSQL's processes on {database:?}, the control plane \
                 and the benchmark process (the raw side's connections; Cronium's agents and API clients) on {rest:?}.\n\n"
            ));
        }
        out.push_str("| Side | Setup | Jobs per round | Jobs/s (median; rounds) | Per job p50 / p99 ms (median of rounds) |\n|---|---|---|---|---|\n");
        let rates = |rounds: &[Round]| {
            rounds
                .iter()
                .map(|round| format!("{:.0}", round.per_second()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| raw `FOR UPDATE SKIP LOCKED` | {} connections, claim + completion `UPDATE`s, autocommit | {} | {:.0} ({}) | {:.3} / {:.3} (claim + completion) |\n",
            options.connections,
            options.raw_jobs,
            PgFigures::median_rate(&self.raw),
            rates(&self.raw),
            PgFigures::median_of(&self.raw, |summary| summary.p50),
            PgFigures::median_of(&self.raw, |summary| summary.p99),
        ));
        out.push_str(&format!(
            "| Cronium (`cronium serve` on PostgreSQL) | {} API clients, {} in-process agents × capacity {} (SIMULATED executor; state dirs on {}), one pool event | {} | {:.0} ({}) | {:.1} / {:.1} (queued → finished) |\n",
            options.clients,
            options.agents,
            options.capacity,
            self.agent_file_system,
            options.jobs,
            PgFigures::median_rate(&self.cronium),
            rates(&self.cronium),
            PgFigures::median_of(&self.cronium, |summary| summary.p50),
            PgFigures::median_of(&self.cronium, |summary| summary.p99),
        ));
        let drained = self.drained();
        if !drained.is_empty() {
            let walls: Vec<String> = self
                .drain
                .iter()
                .map(|drain| format!("{:.0}", drain.wall.as_secs_f64() * 1e3))
                .collect();
            let creation: Vec<String> = self
                .drain
                .iter()
                .map(|drain| {
                    format!(
                        "{:.0}",
                        drain.round.jobs as f64 / drain.created_in.as_secs_f64()
                    )
                })
                .collect();
            out.push_str(&format!(
                "| Cronium draining a queue | {} runs created first by the same clients with the agents stopped (creation: {} runs/s), then the agents started; timed first claim → last result (wall from the agents' start, ms: {}) | {} | {:.0} ({}) | {:.1} / {:.1} (claimed → finished) |\n",
                options.drain_jobs,
                creation.join(", "),
                walls.join(", "),
                options.drain_jobs,
                PgFigures::median_rate(&drained),
                rates(&drained),
                PgFigures::median_of(&drained, |summary| summary.p50),
                PgFigures::median_of(&drained, |summary| summary.p99),
            ));
        }
        out.push_str(
            "\nCPU time per job, µs (median of rounds; from `/proc`: the PostgreSQL server's processes, \
             `cronium serve`, and the benchmark process, which holds the raw side's connections or \
             Cronium's agents and API clients; a draining round's count starts with the agents' start):\n\n\
             | Side | PostgreSQL | Control plane | Benchmark process | Total |\n|---|---|---|---|---|\n",
        );
        let mut sides = vec![("raw", self.raw.clone()), ("Cronium", self.cronium.clone())];
        if !drained.is_empty() {
            sides.push(("Cronium draining", drained.clone()));
        }
        for (side, rounds) in sides {
            let [database, control_plane, bench] = PgFigures::median_cpu(&rounds);
            out.push_str(&format!(
                "| {side} | {database:.0} | {control_plane:.0} | {bench:.0} | {:.0} |\n",
                database + control_plane + bench
            ));
        }
        let reattempted: usize = self
            .cronium
            .iter()
            .chain(&drained)
            .map(|round| round.reattempted)
            .sum();
        out.push_str(&format!(
            "\nCronium jobs that needed a second attempt (over all rounds): {reattempted}.\n"
        ));
        out.push_str(&format!(
            "\nRatio Cronium / raw (median rates): **{:.3}×** end to end (runs created through the API while the agents claim)",
            self.ratio()
        ));
        if let Some(ratio) = self.drain_ratio() {
            out.push_str(&format!(", **{ratio:.3}×** draining a queue"));
        }
        out.push_str(" (target ≥ 0.5×).\n");
        if let Some(ratio) = self.drain_database_ratio() {
            out.push_str(&format!(
                "PostgreSQL CPU per job, raw / Cronium draining: **{ratio:.3}×** (the jobs per second a \
                 database server with nothing else on its cores would give Cronium, as a share of its raw rate).\n"
            ));
        }
        out
    }

    pub fn json(&self) -> Value {
        let rounds = |rounds: &[Round]| {
            rounds
                .iter()
                .map(|round| {
                    json!({
                        "jobs": round.jobs,
                        "elapsed_ms": round.elapsed.as_secs_f64() * 1e3,
                        "jobs_per_second": round.per_second(),
                        "latency_ms": round.latency.to_json(),
                        "reattempted": round.reattempted,
                        "cpu_us_per_job": {
                            "database": round.cpu_per_job()[0],
                            "control_plane": round.cpu_per_job()[1],
                            "bench": round.cpu_per_job()[2],
                        },
                    })
                })
                .collect::<Vec<_>>()
        };
        json!({
            "server_version": self.server_version,
            "options": {
                "rounds": self.options.rounds,
                "raw_jobs": self.options.raw_jobs,
                "connections": self.options.connections,
                "jobs": self.options.jobs,
                "clients": self.options.clients,
                "agents": self.options.agents,
                "capacity": self.options.capacity,
                "drain_jobs": self.options.drain_jobs,
                "split_cores": self.cores.as_ref().map(|(database, rest)| json!({"database": database, "rest": rest})),
                "executor": Executor::SimulatedInProcess.key(),
                "agent_dir": self.options.agent_dir,
                "agent_file_system": self.agent_file_system,
            },
            "raw": rounds(&self.raw),
            "cronium": rounds(&self.cronium),
            "drain": rounds(&self.drained()),
            "drain_wall_ms": self.drain.iter().map(|drain| drain.wall.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "drain_created_in_ms": self.drain.iter().map(|drain| drain.created_in.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            "raw_median_jobs_per_second": PgFigures::median_rate(&self.raw),
            "cronium_median_jobs_per_second": PgFigures::median_rate(&self.cronium),
            "drain_median_jobs_per_second": (!self.drain.is_empty()).then(|| PgFigures::median_rate(&self.drained())),
            "ratio": self.ratio(),
            "drain_ratio": self.drain_ratio(),
            "drain_database_cpu_ratio": self.drain_database_ratio(),
        })
    }
}

fn progress(message: &str) {
    eprintln!("[cronium-bench] postgres: {message}");
}

/// Runs the phase: the control plane's data dir under `root`, the agents' state dirs in a temp
/// dir inside `options.agent_dir`.
pub async fn measure(
    binaries: &Binaries,
    root: &Path,
    options: &PgOptions,
) -> anyhow::Result<PgFigures> {
    progress("starting a throwaway PostgreSQL cluster");
    let cluster = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .context("starting the cluster")??;
    let (raw_url, cronium_url) = (cluster.create_database()?, cluster.create_database()?);
    let raw = PgPoolOptions::new()
        .max_connections(options.connections as u32 + 1)
        .connect(&raw_url)
        .await
        .context("connecting to the raw database")?;
    let server_version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&raw)
        .await?;
    let server_version = server_version
        .split(" on ")
        .next()
        .unwrap_or(&server_version)
        .to_owned();
    sqlx::raw_sql(
        "CREATE TABLE raw_jobs (id BIGSERIAL PRIMARY KEY, state TEXT NOT NULL, payload TEXT NOT NULL,
                                claimed_at TIMESTAMPTZ, done_at TIMESTAMPTZ);
         CREATE INDEX raw_jobs_queued ON raw_jobs (id) WHERE state = 'queued';",
    )
    .execute(&raw)
    .await?;

    let data_dir = root.join("control-plane");
    std::fs::create_dir_all(&data_dir)?;
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let listen = Listen {
        env: vec![("CRONIUM_DATABASE_URL".into(), cronium_url.clone())],
        ..Listen::any()
    };
    let (control_plane, _) = ControlPlane::start_at(binaries, &data_dir, &listen, &key, None)
        .await
        .context("starting cronium serve on PostgreSQL")?;
    let api = control_plane.api.clone();
    progress(&format!(
        "control plane at {} on PostgreSQL, pid {}",
        api.base(),
        control_plane.pid()
    ));
    let labels: BTreeMap<String, String> = [("bench".to_owned(), "postgres".to_owned())].into();
    let enrollment = enrollment_token(&api, options.agents).await?;
    let agent_root = crate::scratch::temp_dir_in(&options.agent_dir, "cronium-bench-pg-agents-")?;
    let agent_file_system = crate::scratch::file_system(agent_root.path());
    let identities = fleet::enroll(
        api.base(),
        &enrollment.token,
        &enrollment.ca_sha256,
        agent_root.path(),
        PREFIX,
        options.agents,
        &labels,
    )
    .await?;
    let names: Vec<String> = identities
        .iter()
        .map(|identity| identity.name.clone())
        .collect();
    let state_dirs: Vec<_> = identities
        .into_iter()
        .map(|identity| identity.state_dir)
        .collect();
    let fleet_options = FleetOptions {
        executor: Executor::SimulatedInProcess,
        capacity: options.capacity,
        ..FleetOptions::default()
    };
    let mut agents = Fleet::spawn(state_dirs.clone(), fleet_options);
    wait_online(&api, &names, Duration::from_secs(60)).await?;
    let database_pid = cluster.server_pid()?;
    let cores = if options.split_cores {
        let (database, rest) = crate::pin::split(&crate::pin::allowed_cores()?)?;
        // The backends already connected are the postmaster's children; later ones inherit.
        crate::pin::bind_tree(database_pid, &database).context("binding PostgreSQL")?;
        crate::pin::bind_process(control_plane.pid(), &rest)
            .context("binding the control plane")?;
        crate::pin::bind_process(std::process::id(), &rest).context("binding this process")?;
        progress(&format!(
            "cores split: PostgreSQL on {database:?}, the rest on {rest:?}"
        ));
        Some((database, rest))
    } else {
        None
    };
    let control_plane_pid = Some(control_plane.pid());
    let cpu_now = || CpuUse::read(database_pid, control_plane_pid);
    let cronium = PgPoolOptions::new()
        .max_connections(1)
        .connect(&cronium_url)
        .await
        .context("connecting to Cronium's database")?;

    let mut figures = PgFigures {
        options: options.clone(),
        agent_file_system,
        server_version,
        raw: Vec::new(),
        cronium: Vec::new(),
        drain: Vec::new(),
        cores,
    };
    // A short warm-up of both sides (connections, statement caches), not counted.
    raw_round(&raw, 200.min(options.raw_jobs), options.connections).await?;
    cronium_round(
        &api,
        &cronium,
        "pg-warmup",
        50.min(options.jobs),
        options.clients,
    )
    .await?;
    for round in 0..options.rounds {
        let before = cpu_now()?;
        let mut measured = raw_round(&raw, options.raw_jobs, options.connections).await?;
        measured.cpu = cpu_now()?.since(&before);
        progress(&format!(
            "round {}: raw {:.0} jobs/s",
            round + 1,
            measured.per_second()
        ));
        figures.raw.push(measured);
        agents.ensure_running()?;
        let before = cpu_now()?;
        let mut measured = cronium_round(
            &api,
            &cronium,
            &format!("pg-round-{round}"),
            options.jobs,
            options.clients,
        )
        .await
        .with_context(|| {
            format!(
                "the control plane's last output:\n{}",
                control_plane.process.tail()
            )
        })?;
        measured.cpu = cpu_now()?.since(&before);
        progress(&format!(
            "round {}: Cronium {:.0} jobs/s, {} jobs needed a second attempt",
            round + 1,
            measured.per_second(),
            measured.reattempted
        ));
        if measured.reattempted > 0 {
            progress(&format!(
                "the control plane's last output:\n{}",
                control_plane.process.tail()
            ));
        }
        figures.cronium.push(measured);
        if options.drain_jobs == 0 {
            continue;
        }
        let stopped_with_errors = agents.stop().await;
        if stopped_with_errors > 0 {
            bail!("{stopped_with_errors} agents stopped with an error before a draining round");
        }
        let name = format!("pg-drain-{round}");
        let event_id = create_event(&api, &name).await?;
        let created_in = create_runs(&api, &event_id, options.drain_jobs, options.clients).await?;
        let claimed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE event_id = $1 AND status <> 'queued'",
        )
        .bind(&event_id)
        .fetch_one(&cronium)
        .await?;
        if claimed > 0 {
            bail!("{claimed} jobs of {name} left the queue while every agent was stopped");
        }
        // As the raw table before each raw round: statistics that know the queue, as
        // autovacuum has them in a deployment a minute after a burst.
        sqlx::query("VACUUM ANALYZE").execute(&cronium).await?;
        let before = cpu_now()?;
        let started = Instant::now();
        agents = Fleet::spawn(state_dirs.clone(), fleet_options);
        tokio::time::timeout(
            ROUND_TIMEOUT,
            wait_completed(&cronium, &event_id, options.drain_jobs, &name),
        )
        .await
        .with_context(|| format!("the draining round {name} took too long"))?
        .with_context(|| {
            format!(
                "the control plane's last output:\n{}",
                control_plane.process.tail()
            )
        })?;
        let wall = started.elapsed();
        let cpu = cpu_now()?.since(&before);
        let (first_claim, last_result): (i64, i64) = sqlx::query_as(
            "SELECT MIN(claimed_at), MAX(finished_at) FROM jobs WHERE event_id = $1",
        )
        .bind(&event_id)
        .fetch_one(&cronium)
        .await?;
        let span = Duration::from_millis(u64::try_from(last_result - first_claim)?.max(1));
        let mut drained = job_figures(
            &cronium,
            &event_id,
            options.drain_jobs,
            span,
            Since::Claimed,
        )
        .await?;
        drained.cpu = cpu;
        let measured = DrainRound {
            round: drained,
            wall,
            created_in,
        };
        progress(&format!(
            "round {}: Cronium draining {:.0} jobs/s (created at {:.0} runs/s), {} jobs needed a second attempt",
            round + 1,
            measured.round.per_second(),
            options.drain_jobs as f64 / created_in.as_secs_f64(),
            measured.round.reattempted
        ));
        figures.drain.push(measured);
    }
    agents.stop().await;
    drop(control_plane);
    raw.close().await;
    cronium.close().await;
    drop(cluster);
    Ok(figures)
}

/// One raw round: `jobs` queued rows drained by `connections` connections.
async fn raw_round(pool: &PgPool, jobs: usize, connections: usize) -> anyhow::Result<Round> {
    sqlx::query("TRUNCATE raw_jobs").execute(pool).await?;
    sqlx::query(
        "INSERT INTO raw_jobs (state, payload) SELECT 'queued', 'echo hi' FROM generate_series(1, $1)",
    )
    .bind(jobs as i64)
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE raw_jobs").execute(pool).await?;
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..connections {
        let mut connection = pool.acquire().await?;
        tasks.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let begun = Instant::now();
                let claimed: Option<i64> = sqlx::query_scalar(
                    "UPDATE raw_jobs SET state = 'claimed', claimed_at = now()
                     WHERE id = (SELECT id FROM raw_jobs WHERE state = 'queued' ORDER BY id LIMIT 1
                                 FOR UPDATE SKIP LOCKED)
                     RETURNING id",
                )
                .fetch_optional(&mut *connection)
                .await?;
                let Some(id) = claimed else {
                    break;
                };
                sqlx::query("UPDATE raw_jobs SET state = 'done', done_at = now() WHERE id = $1")
                    .bind(id)
                    .execute(&mut *connection)
                    .await?;
                samples.push(begun.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(samples)
        });
    }
    let mut samples = Vec::with_capacity(jobs);
    let collect = async {
        while let Some(result) = tasks.join_next().await {
            samples.extend(result.context("a raw claimer panicked")??);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(ROUND_TIMEOUT, collect)
        .await
        .context("the raw round took too long")??;
    let elapsed = started.elapsed();
    let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM raw_jobs WHERE state = 'done'")
        .fetch_one(pool)
        .await?;
    if done as usize != jobs || samples.len() != jobs {
        bail!(
            "the raw round finished {done} rows and timed {} claims, not {jobs}",
            samples.len()
        );
    }
    Ok(Round {
        jobs,
        elapsed,
        latency: Summary::of(&samples),
        reattempted: 0,
        cpu: CpuUse::default(),
    })
}

/// A new pool event of the phase's agents named `name`; its id.
async fn create_event(api: &Api, name: &str) -> anyhow::Result<String> {
    let event = api
        .post(
            "/events",
            &json!({
                "name": name,
                "kind": "bash",
                "script": fleet::SIMULATED_SCRIPT,
                "targets": {"pool": {"bench": "postgres"}},
                "timeout_seconds": 60,
            }),
        )
        .await?;
    Ok(event["id"]
        .as_str()
        .context("POST /events: no id")?
        .to_owned())
}

/// `jobs` runs of `event_id` created by `clients` API clients, each sending its next `POST`
/// once the last one was answered; how long that took.
async fn create_runs(
    api: &Api,
    event_id: &str,
    jobs: usize,
    clients: usize,
) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..clients {
        let (api, event_id, next) = (api.clone(), event_id.to_owned(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                api.post(&format!("/events/{event_id}/runs"), &json!({}))
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("an API client panicked")??;
    }
    Ok(started.elapsed())
}

/// Waits until the database holds the `jobs` jobs of `event_id` completed (read every
/// [`POLL`]); fails if any of them ended failed or cancelled. Called once every job exists.
/// Polling must cost the server being measured next to nothing: it first waits for the newest
/// job (claims take the oldest first, so it is among the last to end) by its primary key, then
/// looks for any other unfinished job, and counts the jobs once none is left. Looking for an
/// unfinished job on every poll cost ~2 ms each in a 20,000-job drain: on fresh statistics
/// PostgreSQL reads `jobs` from its start, past every job that already ended (8% of a core).
async fn wait_completed(
    database: &PgPool,
    event_id: &str,
    jobs: usize,
    name: &str,
) -> anyhow::Result<()> {
    let newest: Option<String> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE event_id = $1 ORDER BY queued_at DESC, id DESC LIMIT 1",
    )
    .bind(event_id)
    .fetch_optional(database)
    .await?;
    if let Some(newest) = newest {
        while sqlx::query_scalar::<_, bool>(
            "SELECT status IN ('queued', 'claimed', 'running') FROM jobs WHERE id = $1",
        )
        .bind(&newest)
        .fetch_one(database)
        .await?
        {
            tokio::time::sleep(POLL).await;
        }
    }
    loop {
        let unfinished: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE event_id = $1 AND status IN ('queued', 'claimed', 'running'))",
        )
        .bind(event_id)
        .fetch_one(database)
        .await?;
        if unfinished {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let row = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE status = 'completed') AS completed,
                    COUNT(*) FILTER (WHERE status IN ('failed', 'cancelled')) AS failed
             FROM jobs WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_one(database)
        .await?;
        let (completed, failed): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if failed > 0 {
            let reasons: Vec<(String, Option<String>, i64)> = sqlx::query_as(
                "SELECT status, reason, attempt FROM jobs
                 WHERE event_id = $1 AND status IN ('failed', 'cancelled') ORDER BY id LIMIT 5",
            )
            .bind(event_id)
            .fetch_all(database)
            .await?;
            bail!(
                "{failed} jobs of {name} failed or were cancelled (status, reason, attempt: {reasons:?})"
            );
        }
        if completed as usize == jobs {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Where a job's time in [`job_figures`] starts.
#[derive(Debug, Clone, Copy)]
enum Since {
    Queued,
    Claimed,
}

/// A round's figures from the jobs table: per job `since` → `finished_at`, and the jobs that
/// needed another attempt.
async fn job_figures(
    database: &PgPool,
    event_id: &str,
    jobs: usize,
    elapsed: Duration,
    since: Since,
) -> anyhow::Result<Round> {
    let since = match since {
        Since::Queued => "queued_at",
        Since::Claimed => "claimed_at",
    };
    let latencies: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT finished_at - {since} FROM jobs WHERE event_id = $1 AND status = 'completed'"
    )))
    .bind(event_id)
    .fetch_all(database)
    .await?;
    let samples: Vec<f64> = latencies.into_iter().map(|ms| ms as f64).collect();
    let reattempted: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE event_id = $1 AND attempt > 1")
            .bind(event_id)
            .fetch_one(database)
            .await?;
    Ok(Round {
        jobs,
        elapsed,
        latency: Summary::of(&samples),
        reattempted: reattempted as usize,
        cpu: CpuUse::default(),
    })
}

/// One Cronium round: a new pool event, `jobs` runs of it created by `clients` API clients
/// while the agents claim them, until the database holds all of them completed.
async fn cronium_round(
    api: &Api,
    database: &PgPool,
    name: &str,
    jobs: usize,
    clients: usize,
) -> anyhow::Result<Round> {
    let event_id = create_event(api, name).await?;
    let started = Instant::now();
    let run = async {
        create_runs(api, &event_id, jobs, clients).await?;
        wait_completed(database, &event_id, jobs, name).await
    };
    tokio::time::timeout(ROUND_TIMEOUT, run)
        .await
        .with_context(|| format!("the Cronium round {name} took too long"))??;
    job_figures(database, &event_id, jobs, started.elapsed(), Since::Queued).await
}
