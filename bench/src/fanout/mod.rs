//! The fan-out phase (`--fanout-only` runs just this): `echo hi` on every host of a label, from
//! the trigger until every host's result is visible, next to Salt doing the same in the same run.
//!
//! - **Real agents** (3 and 10 by default): `cronium-agent` processes enrolled with the label
//!   `bench-fanout=real`; one bash event targets the label. A sample is `POST
//!   /events/{id}/runs` → the SSE `end` event of every job, each job followed over
//!   `GET /jobs/{id}/logs?follow=true` at once, which is what `cronium run EVENT --labels … --wait`
//!   does (push, no polling). Every job must have completed with exit code 0 and printed `hi`.
//! - **Salt** ([`salt`]): a master and as many minions on 127.0.0.1, timed round by round
//!   interleaved with Cronium, as `salt -L IDS cmd.run 'echo hi'` in a fresh process and as
//!   `LocalClient().cmd(…)` in a long-lived one. When Salt cannot be installed or started, the
//!   phase reports why and measures Cronium alone.
//! - **Simulated agents** (1,000 by default, [`simulated`]): one process (this one) holding that
//!   many agent connections with the agent's own code (connection, claims, spool, uploads), each
//!   claiming and running its job. Twice, with a fleet each: the jobs run by the SIMULATED
//!   in-process executor (`cronium_e2e::fleet::SimulatedEchoHi`: no process, it writes `hi`), which
//!   measures the control plane's fan-out, and by the agent's real runner (a `bash` process per
//!   job) next to the floor of as many bare `bash` spawns from this process. A sample waits on
//!   the run's own event stream (`GET /runs/{id}/events`, what `cronium run --wait` uses) for
//!   its `end`; the outputs are checked afterwards. Each sample is broken into phases: the
//!   first and last job's `claimed_at`, `started_at` and `finished_at` (the control plane's
//!   clock), and the first and last final job state pushed to the client.

pub mod salt;
pub mod simulated;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::api::{Api, now_ns};
use crate::cluster::{start_labeled_agent_process, wait_online};
use crate::phases::{ensure_completed, timestamp_ns};
use crate::procs::{Binaries, ChildGuard};
use crate::report::at_most;
use crate::stats::Summary;

use self::salt::{SaltFleet, SaltInstall};
use self::simulated::{Executor, InProcessFleet};

/// Target: Cronium's fan-out time at most this fraction of Salt's (p50).
pub const VS_SALT: f64 = 0.1;

/// Target: all results of the simulated fan-out within this many milliseconds (p99).
pub const SIMULATED_MS: f64 = 1000.0;

/// How long one fan-out may take before the phase fails.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long real agents get to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The label every benchmarked host carries (value `real` or `simulated`).
const LABEL: &str = "bench-fanout";

/// Where and how Salt is installed.
pub struct SaltSettings {
    /// The virtualenv, created on the first run and reused.
    pub venv: PathBuf,
    /// The interpreter that creates it.
    pub python: String,
    /// What `pip install` gets.
    pub spec: String,
}

/// What the phase measures.
pub struct FanoutOptions {
    /// Fleet sizes of the real-agent comparison, ascending.
    pub sizes: Vec<usize>,
    /// Untimed rounds per size and side.
    pub warmup: usize,
    /// Timed rounds per size and side (0 skips the real agents and Salt).
    pub runs: usize,
    /// In-process agents of the simulated fan-out (0 skips it).
    pub simulated: usize,
    /// Timed rounds of the simulated fan-out (after 2 untimed), per executor.
    pub simulated_runs: usize,
    /// The executors of the simulated fan-out, a fleet each, in this order.
    pub simulated_executors: Vec<simulated::Executor>,
    /// Where the simulated agents' state dirs (identities, spools, work dirs) go, in a temp dir
    /// of their own.
    pub simulated_dir: PathBuf,
    /// Salt, or why it is not compared.
    pub salt: Result<SaltSettings, String>,
}

/// One fan-out's milestones from just before the trigger, milliseconds.
struct Sample {
    /// Every job's result visible to the client.
    total: f64,
    /// The trigger's response (the jobs are durable).
    post: f64,
    /// The earliest `claimed_at`, `started_at` and `finished_at` of the run's jobs (the control
    /// plane's clock, ms resolution), in [`MILESTONES`] order.
    first: [Option<f64>; 3],
    /// The latest of the same.
    last: [Option<f64>; 3],
    /// The first and the last job's final state received by the client (the simulated
    /// fan-out's run event stream).
    seen: Option<(f64, f64)>,
    /// Events the client received while waiting (the simulated fan-out's run event stream).
    events: usize,
}

/// The job timestamps whose latest value per run is reported.
const MILESTONES: [&str; 3] = ["claimed_at", "started_at", "finished_at"];

/// Samples of one side, summarised.
pub struct Side {
    pub total: Summary,
    pub post: Summary,
    /// Per [`MILESTONES`] entry: the earliest of the run's jobs, from the trigger.
    pub first: Vec<(&'static str, Summary)>,
    /// Per [`MILESTONES`] entry: the latest of the run's jobs, from the trigger.
    pub last: Vec<(&'static str, Summary)>,
    /// The first and the last final job state received by the client, when streamed.
    pub seen: Option<(Summary, Summary)>,
}

impl Side {
    fn of(samples: &[Sample]) -> Side {
        let per_milestone = |pick: fn(&Sample) -> &[Option<f64>; 3]| {
            MILESTONES
                .iter()
                .enumerate()
                .filter_map(|(index, name)| {
                    let values: Vec<f64> = samples.iter().filter_map(|s| pick(s)[index]).collect();
                    (!values.is_empty()).then(|| (*name, Summary::of(&values)))
                })
                .collect::<Vec<_>>()
        };
        let seen: Vec<(f64, f64)> = samples.iter().filter_map(|s| s.seen).collect();
        Side {
            total: Summary::of(&samples.iter().map(|s| s.total).collect::<Vec<_>>()),
            post: Summary::of(&samples.iter().map(|s| s.post).collect::<Vec<_>>()),
            first: per_milestone(|s| &s.first),
            last: per_milestone(|s| &s.last),
            seen: (!seen.is_empty()).then(|| {
                (
                    Summary::of(&seen.iter().map(|s| s.0).collect::<Vec<_>>()),
                    Summary::of(&seen.iter().map(|s| s.1).collect::<Vec<_>>()),
                )
            }),
        }
    }

    fn json(&self) -> Value {
        let mut clock: serde_json::Map<String, Value> = self
            .last
            .iter()
            .map(|(name, summary)| (format!("last_{name}"), summary.to_json()))
            .collect();
        clock.extend(
            self.first
                .iter()
                .map(|(name, summary)| (format!("first_{name}"), summary.to_json())),
        );
        json!({
            "trigger_to_all_results": self.total.to_json(),
            "post_answered": self.post.to_json(),
            "server_clock": clock,
            "client_first_result_seen": self.seen.as_ref().map(|seen| seen.0.to_json()),
            "client_last_result_seen": self.seen.as_ref().map(|seen| seen.1.to_json()),
        })
    }

    /// Markdown rows of the milestones (`extra` closes rows of wider tables).
    fn milestone_rows(&self, what: &str, extra: &str) -> Vec<String> {
        let mut rows = vec![format!(
            "{}{extra}",
            row(
                &format!("… `POST` answered (jobs durable){what}"),
                &self.post
            )
        )];
        for (name, summary) in &self.last {
            rows.push(format!(
                "{}{extra}",
                row(
                    &format!(
                        "… last job's `{name}`{} (server clock, ms resolution){what}",
                        match *name {
                            "claimed_at" => ", claim committed",
                            "started_at" => ", the agent's upload began",
                            _ => ", result committed",
                        }
                    ),
                    summary
                )
            ));
        }
        rows
    }
}

/// Salt's times for one fleet size.
pub struct SaltSide {
    /// `salt -L … cmd.run 'echo hi'`, a fresh process each time (wall time).
    pub cli: Summary,
    /// `LocalClient().cmd(…)` in a long-lived process (timed around the call).
    pub api: Summary,
}

/// One fleet size's figures.
pub struct SizeFigures {
    pub hosts: usize,
    pub cronium: Side,
    pub salt: Option<SaltSide>,
}

impl SizeFigures {
    fn ratio(&self, salt: &Summary) -> (f64, f64) {
        (
            self.cronium.total.p50 / salt.p50,
            self.cronium.total.p99 / salt.p99,
        )
    }
}

/// One fleet of the simulated fan-out: what ran its jobs, and its figures.
pub struct FleetFigures {
    pub executor: Executor,
    pub side: Side,
    /// Events of the run's stream per sample (p50).
    pub events_p50: f64,
    /// Until all of them were online.
    pub online_after: Duration,
    /// Agents that stopped with an error at the end.
    pub agent_errors: usize,
    /// With the real runner: the floor, as many `bash` runs of the same script started by this
    /// process, as many at a time as there are CPUs, until all exited (ms), measured after each
    /// round.
    pub spawn_floor: Option<Summary>,
}

/// The simulated fan-out's figures.
pub struct SimulatedFigures {
    pub agents: usize,
    /// One per executor, in the order measured.
    pub fleets: Vec<FleetFigures>,
    /// Where their state dirs were, and that file system's type.
    pub state_dir: String,
    /// How many at a time the floor ran.
    pub floor_parallelism: usize,
}

/// Everything the phase measured.
pub struct FanoutFigures {
    pub warmup: usize,
    pub sizes: Vec<SizeFigures>,
    /// The Salt and Python versions, or why Salt was not compared.
    pub salt: Result<SaltInstall, String>,
    pub simulated: Option<SimulatedFigures>,
}

/// Runs the phase against the control plane behind `api`; `root` holds the agents' state dirs
/// and the Salt fleet.
pub async fn measure(
    binaries: &Binaries,
    api: &Api,
    root: &Path,
    options: FanoutOptions,
) -> anyhow::Result<FanoutFigures> {
    std::fs::create_dir_all(root)?;
    let salt_install = match &options.salt {
        _ if options.runs == 0 => Err("--fanout-runs 0".to_owned()),
        Err(reason) => Err(reason.clone()),
        Ok(settings) => {
            crate::progress(&format!(
                "fanout: Salt from the virtualenv {} (`pip install {}` if it is missing)",
                settings.venv.display(),
                settings.spec
            ));
            match salt::ensure_installed(&settings.venv, &settings.python, &settings.spec).await {
                Ok(install) => Ok(install),
                Err(error) => {
                    eprintln!("NOTE: not comparing with Salt: {error:#}");
                    Err(format!("{error:#}"))
                }
            }
        }
    };
    let mut fleet = match &salt_install {
        Ok(install) => {
            crate::progress(&format!(
                "fanout: Salt {} on Python {}: starting a master",
                install.version, install.python
            ));
            Some(SaltFleet::start(install, &root.join("salt")).await?)
        }
        Err(_) => None,
    };

    let event = create_event(api, "bench-fanout", "real").await?;
    let mut agents: Vec<ChildGuard> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut sizes = Vec::new();
    let real_sizes = if options.runs == 0 {
        &[][..]
    } else {
        &options.sizes[..]
    };
    for &hosts in real_sizes {
        while agents.len() < hosts {
            let name = format!("bench-fanout-{:02}", agents.len() + 1);
            let agent = start_labeled_agent_process(
                binaries,
                api,
                &name,
                &format!("{LABEL}=real"),
                &root.join(&name),
                8,
                Path::new("/bin/sh"),
            )
            .await?;
            agents.push(agent);
            names.push(name);
        }
        wait_online(api, &names, ONLINE_TIMEOUT).await?;
        if let Some(fleet) = &mut fleet {
            crate::progress(&format!(
                "fanout: {hosts} salt minions: starting, waiting for test.ping"
            ));
            fleet.grow_to(hosts).await?;
        }
        let ids = fleet
            .as_ref()
            .map(|fleet| fleet.ids(hosts))
            .unwrap_or_default();
        crate::progress(&format!(
            "fanout: {hosts} hosts: {} warm-up + {} rounds of Cronium{}",
            options.warmup,
            options.runs,
            if fleet.is_some() {
                ", the salt CLI and LocalClient, interleaved"
            } else {
                ""
            }
        ));
        let (mut cronium, mut cli, mut local) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..options.warmup + options.runs {
            let sample = followed_round(api, &event, hosts).await.with_context(|| {
                format!(
                    "a fan-out to {hosts} agents failed; the last agent's output:\n{}",
                    agents.last().map(ChildGuard::tail).unwrap_or_default()
                )
            })?;
            let salt_times = match &mut fleet {
                Some(fleet) => Some((fleet.cli_run(&ids).await?, fleet.api_run(&ids).await?)),
                None => None,
            };
            if round < options.warmup {
                continue;
            }
            cronium.push(sample);
            if let Some((cli_ms, api_ms)) = salt_times {
                cli.push(cli_ms);
                local.push(api_ms);
            }
        }
        for agent in &mut agents {
            agent.ensure_running()?;
        }
        if let Some(fleet) = &mut fleet {
            fleet.ensure_running()?;
        }
        let figures = SizeFigures {
            hosts,
            cronium: Side::of(&cronium),
            salt: (!cli.is_empty()).then(|| SaltSide {
                cli: Summary::of(&cli),
                api: Summary::of(&local),
            }),
        };
        crate::progress(&figures.line());
        sizes.push(figures);
    }
    // The simulated fan-out gets the machine to itself.
    drop(fleet);
    drop(agents);

    let simulated = if options.simulated == 0 || options.simulated_executors.is_empty() {
        None
    } else {
        let count = options.simulated;
        let parallelism = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let mut fleets = Vec::new();
        let mut state_dir = String::new();
        for (index, &executor) in options.simulated_executors.iter().enumerate() {
            // Each fleet has its own agents and label value, so the other fleet's (offline)
            // agents are not targeted.
            let value = format!("simulated-{}", executor.key());
            crate::progress(&format!(
                "fanout: enrolling and connecting {count} in-process agents, jobs run by the {}",
                executor.label()
            ));
            let labels = BTreeMap::from([(LABEL.to_owned(), value.clone())]);
            // Declared before the fleet, so removed after it stopped.
            let state =
                crate::scratch::temp_dir_in(&options.simulated_dir, "cronium-bench-simulated-")?;
            state_dir = format!(
                "{} ({})",
                options.simulated_dir.display(),
                crate::scratch::file_system(state.path())
            );
            let prefix = format!("bench-sim{index}-");
            let mut fleet =
                InProcessFleet::start(api, state.path(), &prefix, count, &labels, executor).await?;
            crate::progress(&format!(
                "fanout: {count} agents ({}) online after {:.1} s; 2 warm-up + {} fan-outs",
                executor.label(),
                fleet.online_after.as_secs_f64(),
                options.simulated_runs
            ));
            let event = create_event(api, &format!("bench-fanout-{value}"), &value).await?;
            let script = state.path().join("floor.sh");
            std::fs::write(&script, "echo hi\n")?;
            let (mut samples, mut floor) = (Vec::new(), Vec::new());
            for round in 0..2 + options.simulated_runs {
                let sample = simulated::streamed_round(api, &event, count).await?;
                fleet.ensure_running()?;
                let spawned = match executor {
                    Executor::RealBash => Some(spawn_floor(&script, count, parallelism).await?),
                    Executor::SimulatedInProcess => None,
                };
                if round >= 2 {
                    samples.push(sample);
                    floor.extend(spawned);
                }
            }
            let online_after = fleet.online_after;
            let agent_errors = fleet.stop().await;
            drop(state);
            let figures = FleetFigures {
                executor,
                side: Side::of(&samples),
                events_p50: Summary::of(
                    &samples.iter().map(|s| s.events as f64).collect::<Vec<_>>(),
                )
                .p50,
                online_after,
                agent_errors,
                spawn_floor: (!floor.is_empty()).then(|| Summary::of(&floor)),
            };
            crate::progress(&format!(
                "fanout: {count} simulated agents, {}: p50 {:.0} ms, p99 {:.0} ms to all results{}",
                executor.label(),
                figures.side.total.p50,
                figures.side.total.p99,
                figures
                    .spawn_floor
                    .as_ref()
                    .map(|floor| format!(" (floor: {count} bash spawns p50 {:.0} ms)", floor.p50))
                    .unwrap_or_default()
            ));
            fleets.push(figures);
        }
        Some(SimulatedFigures {
            agents: count,
            fleets,
            state_dir,
            floor_parallelism: parallelism,
        })
    };
    Ok(FanoutFigures {
        warmup: options.warmup,
        sizes,
        salt: salt_install,
        simulated,
    })
}

/// Runs `bash script` `count` times from this process, `parallelism` at a time, checking each
/// printed `hi`; the wall time in ms. What the simulated agents' jobs cost the host at least.
async fn spawn_floor(script: &Path, count: usize, parallelism: usize) -> anyhow::Result<f64> {
    use futures_util::{StreamExt, TryStreamExt};
    let started = Instant::now();
    futures_util::stream::iter(0..count)
        .map(|_| async {
            let output = tokio::process::Command::new("bash")
                .arg(script)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .context("cannot run bash")?;
            if !output.status.success() || output.stdout != b"hi\n" {
                bail!("bash {} printed {:?}", script.display(), output);
            }
            anyhow::Ok(())
        })
        .buffer_unordered(parallelism)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// Creates the bash event `echo hi` targeting the hosts labelled `bench-fanout=value`.
async fn create_event(api: &Api, name: &str, value: &str) -> anyhow::Result<String> {
    let event = api
        .post(
            "/events",
            &json!({
                "name": name,
                "kind": "bash",
                "script": "echo hi",
                "targets": {"labels": {LABEL: value}},
                "timeout_seconds": 60,
            }),
        )
        .await?;
    event["id"]
        .as_str()
        .map(str::to_owned)
        .context("POST /events: no id in the response")
}

/// Triggers `event_id`; returns the run's id and job ids after checking there are `hosts` jobs.
async fn trigger(api: &Api, event_id: &str, hosts: usize) -> anyhow::Result<(String, Vec<String>)> {
    let run = api
        .post(&format!("/events/{event_id}/runs"), &json!({}))
        .await?;
    let jobs: Vec<String> = run["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|job| job["id"].as_str().map(str::to_owned))
        .collect();
    if jobs.len() != hosts {
        bail!(
            "the run has {} jobs, not one per host ({hosts})",
            jobs.len()
        );
    }
    let run_id = run["run_id"]
        .as_str()
        .context("POST /events/{id}/runs: no run_id")?;
    Ok((run_id.to_owned(), jobs))
}

/// Fails unless `job` completed with exit code 0 and its output is `hi`.
fn ensure_said_hi(job: &Value, log: Option<&str>) -> anyhow::Result<()> {
    ensure_completed(job)?;
    let output = log
        .filter(|log| !log.is_empty())
        .or_else(|| job["output"].as_str())
        .unwrap_or_default();
    if output.trim() != "hi" {
        bail!("job {} printed {output:?}, not hi", job["id"]);
    }
    Ok(())
}

/// Per [`MILESTONES`] entry: the latest of `jobs` in ms after `t0_ns`.
fn last_milestones(jobs: &[&Value], t0_ns: i128) -> [Option<f64>; 3] {
    milestones(jobs, t0_ns, Iterator::max)
}

/// Per [`MILESTONES`] entry: the earliest of `jobs` in ms after `t0_ns`.
fn first_milestones(jobs: &[&Value], t0_ns: i128) -> [Option<f64>; 3] {
    milestones(jobs, t0_ns, Iterator::min)
}

/// Per [`MILESTONES`] entry: `pick` of `jobs` in ms after `t0_ns`; `None` unless every job
/// has it.
fn milestones(
    jobs: &[&Value],
    t0_ns: i128,
    pick: fn(std::vec::IntoIter<i128>) -> Option<i128>,
) -> [Option<f64>; 3] {
    MILESTONES.map(|field| {
        let times = jobs
            .iter()
            .map(|job| timestamp_ns(&job[field]))
            .collect::<Option<Vec<_>>>()?;
        pick(times.into_iter()).map(|at| (at - t0_ns) as f64 / 1e6)
    })
}

/// One fan-out followed like `cronium run --wait` does: every job's log over SSE at once, until
/// each has sent its `end` event.
async fn followed_round(api: &Api, event_id: &str, hosts: usize) -> anyhow::Result<Sample> {
    let t0_ns = now_ns();
    let t0 = Instant::now();
    let (_, jobs) = trigger(api, event_id, hosts).await?;
    let post = t0.elapsed();
    let followed = tokio::time::timeout(
        ROUND_TIMEOUT,
        futures_util::future::try_join_all(jobs.iter().map(|job| api.follow(job))),
    )
    .await
    .with_context(|| format!("the fan-out took longer than {ROUND_TIMEOUT:?}"))??;
    let total = t0.elapsed();
    for job in &followed {
        ensure_said_hi(&job.job, Some(&job.log))?;
    }
    let ends: Vec<&Value> = followed.iter().map(|job| &job.job).collect();
    Ok(Sample {
        total: total.as_secs_f64() * 1e3,
        post: post.as_secs_f64() * 1e3,
        first: first_milestones(&ends, t0_ns),
        last: last_milestones(&ends, t0_ns),
        seen: None,
        events: 0,
    })
}

impl SizeFigures {
    /// One progress line.
    fn line(&self) -> String {
        let mut line = format!(
            "fanout: {} hosts: cronium p50 {:.1} ms p99 {:.1} ms",
            self.hosts, self.cronium.total.p50, self.cronium.total.p99
        );
        if let Some(salt) = &self.salt {
            line.push_str(&format!(
                "; salt CLI p50 {:.0} ms, LocalClient p50 {:.0} ms ({:.3}× / {:.3}×)",
                salt.cli.p50,
                salt.api.p50,
                self.ratio(&salt.cli).0,
                self.ratio(&salt.api).0
            ));
        }
        line
    }
}

fn row(name: &str, summary: &Summary) -> String {
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        summary.count, summary.mean, summary.p50, summary.p99
    )
}

impl SimulatedFigures {
    /// The markdown of the simulated fan-out: the totals against the target, then the phases.
    fn markdown(&self) -> Vec<String> {
        let agents = self.agents;
        let mut out = vec![
            format!(
                "| {agents} simulated agents in one process (agent code: connection, claims, spool, uploads), ms | n | mean | p50 | p99 | target | verdict |"
            ),
            "|---|---:|---:|---:|---:|---|---|".to_owned(),
        ];
        for fleet in &self.fleets {
            let total = &fleet.side.total;
            out.push(format!(
                "| {}: trigger → run `end` on `GET /runs/{{id}}/events` (all {agents} results) | {} | {:.1} | {:.1} | {:.1} | p99 ≤ {SIMULATED_MS} ms | p99 {} |",
                fleet.executor.label(),
                total.count,
                total.mean,
                total.p50,
                total.p99,
                at_most(total.p99, SIMULATED_MS, " ms")
            ));
            if let Some(floor) = &fleet.spawn_floor {
                out.push(format!(
                    "{} | |",
                    row(
                        &format!(
                            "floor: {agents} × `bash script` (`echo hi`) spawned by the same process, {} at a time, after each round above",
                            self.floor_parallelism
                        ),
                        floor
                    )
                ));
            }
        }
        out.push(String::new());
        // The phases, side by side per executor.
        let mut header = "| phase, ms after the trigger |".to_owned();
        let mut rule = "|---|".to_owned();
        for fleet in &self.fleets {
            let name = match fleet.executor {
                Executor::SimulatedInProcess => "simulated executor",
                Executor::RealBash => "real bash",
            };
            header.push_str(&format!(
                " {name}: first job p50 | last job p50 | last job p99 |"
            ));
            rule.push_str("---:|---:|---:|");
        }
        out.push(header);
        out.push(rule);
        let cells = |pick: &dyn Fn(&Side) -> Option<(f64, Summary)>| -> String {
            self.fleets
                .iter()
                .map(|fleet| match pick(&fleet.side) {
                    Some((first, last)) => {
                        format!(" {first:.1} | {:.1} | {:.1} |", last.p50, last.p99)
                    }
                    None => " | | |".to_owned(),
                })
                .collect()
        };
        let post = |side: &Side| Some((side.post.p50, side.post));
        out.push(format!(
            "| `POST /events/{{id}}/runs` answered (run and {agents} jobs durable) |{}",
            cells(&post)
        ));
        for (name, what) in [
            ("claimed_at", "claim committed"),
            (
                "started_at",
                "the start recorded: first output batch or the result",
            ),
            (
                "finished_at",
                "result written by the store's writer; durable at that group's commit",
            ),
        ] {
            let pick = move |side: &Side| {
                let first = side.first.iter().find(|(n, _)| *n == name)?;
                let last = side.last.iter().find(|(n, _)| *n == name)?;
                Some((first.1.p50, last.1))
            };
            out.push(format!(
                "| job `{name}`: {what} (server clock, ms resolution) |{}",
                cells(&pick)
            ));
        }
        let seen = |side: &Side| side.seen.as_ref().map(|(first, last)| (first.p50, *last));
        out.push(format!(
            "| a job's final state received on the run's event stream (client) |{}",
            cells(&seen)
        ));
        let end = |side: &Side| Some((side.total.p50, side.total));
        out.push(format!(
            "| the run's `end` event received (client) |{}",
            cells(&end)
        ));
        out.push(String::new());
        let fleets: Vec<String> = self
            .fleets
            .iter()
            .map(|fleet| {
                format!(
                    "{}: online {:.1} s after they started, {:.0} stream events per round (p50), {} stopped with an error",
                    fleet.executor.label(),
                    fleet.online_after.as_secs_f64(),
                    fleet.events_p50,
                    fleet.agent_errors
                )
            })
            .collect();
        out.push(format!(
            "({agents} agents per fleet, a fleet per executor; {}; their state dirs (spools, work dirs) in {}. The first job column is the p50 of the round's earliest job.)",
            fleets.join("; "),
            self.state_dir
        ));
        out.push(String::new());
        out
    }

    fn json(&self) -> Value {
        json!({
            "agents": self.agents,
            "state_dir": self.state_dir,
            "floor_parallelism": self.floor_parallelism,
            "fleets": self.fleets.iter().map(|fleet| json!({
                "executor": fleet.executor.key(),
                "executor_label": fleet.executor.label(),
                "cronium": fleet.side.json(),
                "run_stream_events_p50": fleet.events_p50,
                "online_after_seconds": fleet.online_after.as_secs_f64(),
                "agent_errors": fleet.agent_errors,
                "spawn_floor": fleet.spawn_floor.map(|floor| floor.to_json()),
                "met_p99": fleet.side.total.p99 <= SIMULATED_MS,
            })).collect::<Vec<_>>(),
        })
    }
}

impl FanoutFigures {
    /// The markdown section.
    pub fn markdown(&self) -> String {
        let mut out = vec![
            format!(
                "### Fan-out of `echo hi` ({} CPUs, {}; {} untimed rounds first)",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                std::env::consts::ARCH,
                self.warmup
            ),
            String::new(),
        ];
        match &self.salt {
            Ok(install) => out.push(format!(
                "Peer: Salt {} (PyPI `salt`, Python {}), a master and N minions on 127.0.0.1, measured round by round interleaved with Cronium.",
                install.version, install.python
            )),
            Err(reason) => out.push(format!("(Salt comparison skipped: {reason})")),
        }
        out.push(String::new());
        if !self.sizes.is_empty() {
            out.push("| trigger → every host's result (ms) | n | mean | p50 | p99 |".to_owned());
            out.push("|---|---:|---:|---:|---:|".to_owned());
            for size in &self.sizes {
                let hosts = size.hosts;
                out.push(row(
                    &format!(
                        "Cronium, {hosts} agents: `POST /events/{{id}}/runs` → SSE `end` of every job"
                    ),
                    &size.cronium.total,
                ));
                out.extend(
                    size.cronium
                        .milestone_rows(&format!(", {hosts} agents"), ""),
                );
                if let Some(salt) = &size.salt {
                    out.push(row(
                        &format!(
                            "peer: `salt -L … cmd.run 'echo hi'` (CLI, fresh process), {hosts} minions"
                        ),
                        &salt.cli,
                    ));
                    out.push(row(
                        &format!(
                            "peer: `LocalClient().cmd(…, 'cmd.run', ['echo hi'])` (long-lived process), {hosts} minions"
                        ),
                        &salt.api,
                    ));
                }
            }
            out.push(String::new());
            if self.sizes.iter().any(|size| size.salt.is_some()) {
                out.push("| ratio: Cronium / Salt | p50 | p99 | target | verdict |".to_owned());
                out.push("|---|---:|---:|---|---|".to_owned());
                for size in &self.sizes {
                    let Some(salt) = &size.salt else { continue };
                    for (peer, summary) in [("salt CLI", &salt.cli), ("LocalClient", &salt.api)] {
                        let (p50, p99) = size.ratio(summary);
                        out.push(format!(
                            "| {} hosts vs {peer} | {p50:.3} | {p99:.3} | p50 ≤ {VS_SALT} | p50 {} |",
                            size.hosts,
                            at_most(p50, VS_SALT, "")
                        ));
                    }
                }
                out.push(String::new());
            }
        }
        if let Some(simulated) = &self.simulated {
            out.extend(simulated.markdown());
        }
        out.join("\n")
    }

    /// Every number as JSON.
    pub fn json(&self) -> Value {
        json!({
            "warmup": self.warmup,
            "salt": match &self.salt {
                Ok(install) => json!({"version": install.version, "python": install.python}),
                Err(reason) => json!({"skipped": reason}),
            },
            "sizes": self.sizes.iter().map(|size| {
                let salt = size.salt.as_ref().map(|salt| json!({
                    "cli": salt.cli.to_json(),
                    "local_client": salt.api.to_json(),
                    "ratio_vs_cli_p50": size.ratio(&salt.cli).0,
                    "ratio_vs_cli_p99": size.ratio(&salt.cli).1,
                    "ratio_vs_local_client_p50": size.ratio(&salt.api).0,
                    "ratio_vs_local_client_p99": size.ratio(&salt.api).1,
                    "met_vs_cli_p50": size.ratio(&salt.cli).0 <= VS_SALT,
                    "met_vs_local_client_p50": size.ratio(&salt.api).0 <= VS_SALT,
                }));
                json!({
                    "hosts": size.hosts,
                    "cronium": size.cronium.json(),
                    "salt": salt,
                })
            }).collect::<Vec<_>>(),
            "simulated": self.simulated.as_ref().map(SimulatedFigures::json),
            "targets": {"vs_salt_p50": VS_SALT, "simulated_p99_ms": SIMULATED_MS},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_must_have_completed_and_said_hi() {
        let done = json!({"id": "j", "status": "completed", "exit_code": 0, "output": "hi\n"});
        ensure_said_hi(&done, None).unwrap();
        ensure_said_hi(&done, Some("")).unwrap();
        ensure_said_hi(&done, Some("hi\n")).unwrap();
        assert!(ensure_said_hi(&done, Some("ho\n")).is_err());
        let silent = json!({"id": "j", "status": "completed", "exit_code": 0, "output": ""});
        assert!(ensure_said_hi(&silent, None).is_err());
        let failed = json!({"id": "j", "status": "failed", "exit_code": 1, "output": "hi\n"});
        assert!(ensure_said_hi(&failed, None).is_err());
    }

    #[test]
    fn milestones_are_the_latest_job_and_need_every_job() {
        let t0_ns = timestamp_ns(&json!("2026-01-01T00:00:00.000Z")).unwrap();
        let a = json!({"claimed_at": "2026-01-01T00:00:00.010Z", "started_at": "2026-01-01T00:00:00.020Z", "finished_at": "2026-01-01T00:00:00.030Z"});
        let b = json!({"claimed_at": "2026-01-01T00:00:00.005Z", "started_at": "2026-01-01T00:00:00.040Z", "finished_at": null});
        assert_eq!(
            last_milestones(&[&a], t0_ns),
            [Some(10.0), Some(20.0), Some(30.0)]
        );
        assert_eq!(
            last_milestones(&[&a, &b], t0_ns),
            [Some(10.0), Some(40.0), None]
        );
        assert_eq!(
            first_milestones(&[&a, &b], t0_ns),
            [Some(5.0), Some(20.0), None]
        );
    }

    #[test]
    fn sides_summarise_only_the_milestones_they_have() {
        let sample = |total: f64, finished: Option<f64>| Sample {
            total,
            post: 1.0,
            first: [None, None, finished],
            last: [None, None, finished],
            seen: None,
            events: 0,
        };
        let side = Side::of(&[sample(10.0, Some(9.0)), sample(20.0, None)]);
        assert_eq!(side.total.p50, 10.0);
        assert_eq!(side.total.count, 2);
        assert_eq!(side.last.len(), 1);
        assert_eq!(side.last[0].0, "finished_at");
        assert_eq!(side.last[0].1.count, 1);
    }
}
