//! `cronium-bench`: measures Cronium against an SSH peer in the same run.
//!
//! It starts a control plane (`cronium serve`) and an agent (`cronium-agent run`, capacity 8) as
//! child processes on 127.0.0.1, then measures the no-op job latency (trigger → process started,
//! trigger → result visible over SSE) next to `ssh … true` (fresh and ControlMaster), the job
//! throughput from 16 concurrent clients, the control plane's durable commits per job (fsync and
//! fdatasync counted with strace), the idle agent's RSS and the control plane's memory per
//! connected agent (agents run in this process), and a Docker job's trigger → result latency next
//! to `docker run --rm` of the same locally built image against the same engine (`DOCKER_HOST`,
//! skipped when no engine answers), and per language the round trip of a runtime helper call
//! timed inside the script next to a bare HTTP/1.1 request over a Unix socket to a trivial server
//! of its own ([`helpers`]), and a browser terminal's keystroke echo, `cat` throughput, Ctrl-C
//! under a flood and session open next to `ssh -tt`, fresh and over a ControlMaster
//! ([`terminal`]; `--terminal-only` runs just that), SSH fallback jobs next to `ssh … true`
//! ([`ssh_fallback`]; `--ssh-fallback-only`), and `install.sh` start → agent online next to a
//! download of the binary alone ([`install`]; `--install-only`), and the fan-out of `echo hi` to
//! 3 and 10 agent processes next to a Salt master with as many minions, and to 1,000 agents
//! held by this process ([`fanout`]; `--fanout-only`); with `--postgres-only`, only the no-op
//! job throughput of `cronium serve` on PostgreSQL next to the raw `FOR UPDATE SKIP LOCKED` claim
//! rate of the same server ([`pg_claims`]); with `--replicas-only`, only trigger → result of
//! jobs created on one replica for agents connected to another, next to the same on their own
//! replica ([`replica_dispatch`]); with `--memory-peer-only`, only the control plane's memory per
//! agent connection next to a bare quinn server's ([`quinn_peer`]). It prints a markdown summary and optionally
//! writes the numbers as JSON. Everything it starts is stopped and removed when it ends, also on
//! errors, panics, Ctrl-C, SIGTERM and SIGHUP. Benchmarks are not tests: run it on purpose
//! (see `/work/shared/design/TESTING.md`).

mod api;
mod cluster;
mod cpu;
mod docker;
mod fanout;
mod helpers;
mod install;
mod load;
mod pg_claims;
mod phases;
mod pin;
mod procs;
mod quinn_peer;
mod replica_dispatch;
mod report;
mod scratch;
mod ssh;
mod ssh_fallback;
mod stats;
mod terminal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use crate::cluster::{ControlPlane, start_agent_process, wait_online};
use crate::procs::{Binaries, rss_kib};
use crate::report::{
    DockerComparison, DockerPhase, HelperPhase, HelperRoundTrip, Results, TerminalPhase,
};
use crate::ssh::SshPeer;
use crate::stats::Summary;

/// Benchmarks Cronium (latency vs ssh, throughput, durable commits, memory, Docker jobs vs
/// `docker run`, helper calls vs a bare Unix socket, terminals vs `ssh -tt`, fan-out vs Salt) on
/// 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "cronium-bench", version)]
struct Cli {
    /// Samples per latency measurement (cronium and each ssh variant).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    runs: u64,
    /// Untimed warm-up runs before the latency samples.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    warmup: u64,
    /// Jobs per throughput phase (the phase runs twice: plain and under strace).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    jobs: u64,
    /// Concurrent client tasks in the throughput phases.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    clients: u64,
    /// In-process agents for the control-plane memory measurement (0 skips it).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    agents: u64,
    /// Timed rounds of the Docker phase (a Docker job vs `docker run --rm`; 0 skips it).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    docker_runs: u64,
    /// Untimed warm-up rounds before the Docker samples.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    docker_warmup: u64,
    /// Timed `input` helper calls per language (and as many bare Unix-socket round trips), in
    /// one host job each (0 skips the phase).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    helper_calls: u64,
    /// Keystroke echo samples per side of the terminal phase (Cronium, fresh `ssh -tt`, `ssh -tt`
    /// over a ControlMaster), after 20 untimed ones (0 skips the terminal phase).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    terminal_echo: u64,
    /// Session-open samples per side of the terminal phase.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    terminal_opens: u64,
    /// Ctrl-C-under-a-flood samples per side of the terminal phase.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    terminal_interrupts: u64,
    /// Size of the file the terminal phase `cat`s, MiB.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=4096))]
    terminal_cat_mib: u64,
    /// `cat` runs per side of the terminal phase.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    terminal_cat_runs: u64,
    /// Run only the terminal phase (with the control plane and one agent), none of the others.
    #[arg(long)]
    terminal_only: bool,
    /// Timed rounds of the SSH fallback phase (a job over SSH with a connection per job and
    /// with a kept connection, next to fresh and ControlMaster `ssh … true`; 0 skips it).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    ssh_fallback_runs: u64,
    /// Run only the SSH fallback phase (with the control plane alone), none of the others.
    #[arg(long)]
    ssh_fallback_only: bool,
    /// Timed rounds of the install phase (`install.sh` start → agent online, next to a download
    /// of the agent binary alone; 0 skips it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=1000))]
    install_runs: u64,
    /// Run only the install phase (with the control plane alone), none of the others.
    #[arg(long)]
    install_only: bool,
    /// Timed rounds per fleet size of the fan-out phase (`echo hi` on every agent process of a
    /// label, next to Salt's `cmd.run` on as many minions; 0 skips that part, and the phase
    /// when `--fanout-simulated` is 0 too).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    fanout_runs: u64,
    /// Untimed rounds per fleet size before the fan-out samples.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    fanout_warmup: u64,
    /// Fleet sizes (agent processes, and Salt minions) of the fan-out comparison.
    #[arg(long, value_delimiter = ',', default_value = "3,10")]
    fanout_sizes: Vec<usize>,
    /// In-process agents of the simulated fan-out (0 skips it).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    fanout_simulated: u64,
    /// Timed rounds of the simulated fan-out per executor, after 2 untimed ones.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    fanout_simulated_runs: u64,
    /// What runs the simulated fleet's jobs, a fleet each: `simulated` (the SIMULATED
    /// in-process executor: no process, it writes `hi`; measures the control plane's fan-out),
    /// `bash` (the agent's real runner, a `bash` process per job, next to the floor of as many
    /// bare `bash` spawns), or both (the default), in the order given.
    #[arg(long, value_delimiter = ',', default_value = "simulated,bash")]
    fanout_simulated_executors: Vec<SimulatedExecutorArg>,
    /// Run only the simulated fan-out (no real agent processes, no Salt): the same as
    /// `--fanout-only --fanout-runs 0`.
    #[arg(long)]
    fanout_simulated_only: bool,
    /// Where the simulated agents keep their state dirs (default: /dev/shm when it exists, so
    /// 1,000 agents' spools and work dirs on one disk do not measure that disk's inode
    /// allocator; each real agent has a disk of its own).
    #[arg(long)]
    fanout_simulated_dir: Option<PathBuf>,
    /// Do not compare the fan-out with Salt.
    #[arg(long)]
    no_salt: bool,
    /// The virtualenv Salt is installed into on the first run and reused from then on
    /// (default: `salt-venv` in the cargo target dir).
    #[arg(long)]
    salt_venv: Option<PathBuf>,
    /// What `pip install` installs into that virtualenv.
    #[arg(long, default_value = "salt")]
    salt_spec: String,
    /// The Python that creates the virtualenv.
    #[arg(long, default_value = "python3")]
    salt_python: String,
    /// Run only the fan-out phase (with the control plane and its own agents), none of the
    /// others.
    #[arg(long)]
    fanout_only: bool,
    /// Run only the load phase ([`load`]): `--load-agents` agent connections held by this
    /// process for `--load-minutes` against a control plane of its own (none wrongly offline,
    /// heartbeat handling, dispatch under load, memory per agent, restarts), none of the others.
    #[arg(long)]
    load_only: bool,
    /// In-process agents of the load phase (the agent's own code; SIMULATED executor).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    load_agents: u64,
    /// How long the load phase holds the agents, minutes.
    #[arg(long, default_value_t = 3.0)]
    load_minutes: f64,
    /// Single-host runs on random agents timed during the hold (trigger → result).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    load_jobs: u64,
    /// How the control plane is stopped before each restart of the load phase, in order.
    #[arg(long, value_delimiter = ',', default_value = "sigterm,sigkill")]
    load_restarts: Vec<LoadRestartArg>,
    /// LIGHT simulated agents (real QUIC + mTLS + hello + heartbeats, no runner) connected at
    /// the end of the load phase for the memory figure at that scale (0 skips it).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    load_light: u64,
    /// Run only the PostgreSQL phase ([`pg_claims`]): no-op job throughput of `cronium serve` on
    /// a throwaway PostgreSQL next to the raw `FOR UPDATE SKIP LOCKED` claim rate of the same
    /// server, none of the others.
    #[arg(long)]
    postgres_only: bool,
    /// Alternated rounds (raw, then Cronium) of the PostgreSQL phase.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pg_rounds: u64,
    /// Queued rows per raw round of the PostgreSQL phase.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pg_raw_jobs: u64,
    /// Connections claiming in the raw rounds (default: the writer and four readers of one
    /// control plane's store; it also has four connections for its claims).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=256))]
    pg_connections: u64,
    /// Runs (one no-op job each) per Cronium round of the PostgreSQL phase.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pg_jobs: u64,
    /// API clients creating the runs of a Cronium round.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pg_clients: u64,
    /// In-process agents (the agent's own code; SIMULATED executor) of the PostgreSQL phase.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pg_agents: u64,
    /// Jobs each of those agents runs at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pg_capacity: u32,
    /// Runs per "draining" round of the PostgreSQL phase: created with the agents stopped, then
    /// drained by them, as the raw side drains its table (0 skips these rounds).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pg_drain_jobs: u64,
    /// Where the PostgreSQL phase's agents keep their state dirs (default: /dev/shm when it
    /// exists; see `scratch.rs`).
    #[arg(long)]
    pg_agent_dir: Option<PathBuf>,
    /// Run PostgreSQL's processes on the first half of the cores and the control plane and
    /// this process (the raw side's connections, the agents and API clients) on the rest, so
    /// that both sides get the same database server with cores of its own.
    #[arg(long)]
    pg_split_cores: bool,
    /// Run only the cross-replica phase ([`replica_dispatch`]): two `cronium serve` replicas
    /// on a throwaway PostgreSQL, every agent connected to A, runs created and followed through
    /// B next to the same through A, none of the others.
    #[arg(long)]
    replicas_only: bool,
    /// In-process agents (the agent's own code; SIMULATED executor) of the replica phase.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=2_000))]
    replica_agents: u64,
    /// `cronium-agent run` processes (a real `bash` per job) of the replica phase (0: none).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=20))]
    replica_real_agents: u64,
    /// Timed runs per side (through B, through A) and kind of agent in the replica phase.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    replica_samples: u64,
    /// Untimed pairs before them.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    replica_warmup: u64,
    /// Run only the memory comparison ([`quinn_peer`]): the control plane's memory per LIGHT
    /// agent connection next to a bare quinn server's, none of the others.
    #[arg(long)]
    memory_peer_only: bool,
    /// Counts of LIGHT agents of the memory comparison, each on a fresh control plane and a
    /// fresh bare quinn server.
    #[arg(long, value_delimiter = ',', default_value = "500,10000")]
    memory_peer_agents: Vec<usize>,
    /// Where the memory comparison keeps its agents' identities (default: /dev/shm when it
    /// exists).
    #[arg(long)]
    memory_peer_dir: Option<PathBuf>,
    /// Internal: serve as the memory comparison's bare quinn peer with the files in this dir.
    #[arg(long, hide = true)]
    quinn_peer_serve: Option<PathBuf>,
    /// Write every number to this file as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The throwaway-sshd script used for the SSH peer.
    #[arg(long, default_value = "/work/shared/peers/sshd-throwaway")]
    sshd_script: PathBuf,
    /// strace, used to count the control plane's fsync/fdatasync calls.
    #[arg(long, default_value = "/usr/bin/strace")]
    strace: PathBuf,
}

/// `--fanout-simulated-executors` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SimulatedExecutorArg {
    /// The SIMULATED in-process executor.
    Simulated,
    /// The agent's real runner: a `bash` process per job.
    Bash,
}

/// `--load-restarts` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LoadRestartArg {
    /// A graceful stop: every agent connection is closed at once.
    Sigterm,
    /// A crash.
    Sigkill,
}

/// How long the agent under test gets to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long processes are left idle before their memory is read.
const SETTLE: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if cli.fanout_simulated_only {
        cli.fanout_only = true;
        cli.fanout_runs = 0;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(dir) = &cli.quinn_peer_serve {
        return quinn_peer::serve(dir).await;
    }
    // Dropping the benchmark future (Ctrl-C, SIGTERM, SIGHUP) or unwinding out of it (panic)
    // drops every guard: the child processes are stopped and the temp dir removed.
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let stopped_by = tokio::select! {
        result = bench(cli) => return result,
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = terminate.recv() => "terminated",
        _ = hangup.recv() => "hung up",
    };
    eprintln!("{stopped_by}; cleaning up");
    anyhow::bail!("{stopped_by}")
}

fn progress(message: &str) {
    eprintln!("[cronium-bench] {message}");
}

async fn bench(cli: Cli) -> anyhow::Result<()> {
    let binaries = Binaries::next_to_self()?;
    let runs = cli.runs as usize;
    let jobs = cli.jobs as usize;
    let clients = cli.clients as usize;
    let agents = cli.agents as usize;
    // Declared first, dropped last: after every process that uses it has been stopped.
    let temp = tempfile::Builder::new()
        .prefix("cronium-bench-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let root = temp.path();

    if cli.postgres_only {
        let options = pg_claims::PgOptions {
            rounds: cli.pg_rounds as usize,
            raw_jobs: cli.pg_raw_jobs as usize,
            connections: cli.pg_connections as usize,
            jobs: cli.pg_jobs as usize,
            clients: cli.pg_clients as usize,
            agents: cli.pg_agents as usize,
            capacity: cli.pg_capacity,
            drain_jobs: cli.pg_drain_jobs as usize,
            agent_dir: cli
                .pg_agent_dir
                .clone()
                .unwrap_or_else(|| scratch::tmpfs_or(root.join("postgres"))),
            split_cores: cli.pg_split_cores,
        };
        let figures = pg_claims::measure(&binaries, &root.join("postgres"), &options).await?;
        println!("{}", figures.markdown());
        if let Some(path) = &cli.out {
            let text = serde_json::to_string_pretty(&json!({"postgres": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(&format!("wrote {}", path.display()));
        }
        drop(temp);
        return Ok(());
    }

    if cli.replicas_only {
        let options = replica_dispatch::ReplicaOptions {
            agents: cli.replica_agents as usize,
            real_agents: cli.replica_real_agents as usize,
            samples: cli.replica_samples as usize,
            warmup: cli.replica_warmup as usize,
        };
        let figures =
            replica_dispatch::measure(&binaries, &root.join("replicas"), &options).await?;
        println!("{}", figures.markdown());
        if let Some(path) = &cli.out {
            let text = serde_json::to_string_pretty(&json!({"replicas": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(&format!("wrote {}", path.display()));
        }
        drop(temp);
        return Ok(());
    }

    if cli.memory_peer_only {
        let counts = &cli.memory_peer_agents;
        if counts.is_empty() || counts.iter().any(|&count| count == 0 || count > 10_000) {
            anyhow::bail!("--memory-peer-agents must be numbers 1-10000, e.g. 500,10000");
        }
        let base = cli
            .memory_peer_dir
            .clone()
            .unwrap_or_else(|| scratch::tmpfs_or(root.to_path_buf()));
        let identities = scratch::temp_dir_in(&base, "cronium-bench-memory-")?;
        let figures =
            quinn_peer::measure(&binaries, &root.join("memory"), identities.path(), counts).await?;
        println!("{}", figures.markdown());
        if let Some(path) = &cli.out {
            let text = serde_json::to_string_pretty(&json!({"memory_peer": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(&format!("wrote {}", path.display()));
        }
        drop(identities);
        drop(temp);
        return Ok(());
    }

    if cli.load_only {
        if !(cli.load_minutes > 0.0 && cli.load_minutes <= 24.0 * 60.0) {
            anyhow::bail!("--load-minutes must be more than 0 and at most a day");
        }
        let options = load::LoadOptions {
            agents: cli.load_agents as usize,
            hold: Duration::from_secs_f64(cli.load_minutes * 60.0),
            jobs: cli.load_jobs as usize,
            restarts: cli
                .load_restarts
                .iter()
                .map(|restart| match restart {
                    LoadRestartArg::Sigterm => load::Restart::Sigterm,
                    LoadRestartArg::Sigkill => load::Restart::Sigkill,
                })
                .collect(),
            light: cli.load_light as usize,
        };
        let figures = load::measure(&binaries, &root.join("load"), &options).await?;
        println!("{}", figures.markdown());
        if let Some(path) = &cli.out {
            let text = serde_json::to_string_pretty(&json!({"load": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(&format!("wrote {}", path.display()));
        }
        let failures = figures.wrongly_offline.len();
        drop(temp);
        if failures > 0 {
            anyhow::bail!(
                "{failures} agents were wrongly marked offline or reconnected during the hold"
            );
        }
        return Ok(());
    }

    // Before the agent starts: it connects to the engine once, at start.
    let docker_runs = cli.docker_runs as usize;
    let docker_engine = if docker_runs == 0 {
        Err("--docker-runs 0".to_owned())
    } else {
        match docker::probe().await {
            Ok(engine) => {
                progress(&format!(
                    "docker: engine {} at {}; ensuring the local image {}",
                    engine.version,
                    engine.address(),
                    docker::IMAGE
                ));
                docker::ensure_image().await?;
                Ok(engine)
            }
            Err(reason) => {
                eprintln!(
                    "NOTE: skipping the Docker phase: {reason} (start dockerd and set DOCKER_HOST=unix:///path/to/docker.sock)"
                );
                Err(reason)
            }
        }
    };

    progress("starting the control plane");
    let mut control_plane = ControlPlane::start(&binaries, &root.join("data")).await?;
    let api = control_plane.api.clone();
    progress(&format!(
        "control plane ready at {} (quic {}), pid {}",
        api.base(),
        control_plane.quic,
        control_plane.pid()
    ));

    let run_ssh_fallback = async || -> anyhow::Result<Option<ssh_fallback::SshFallbackFigures>> {
        let rounds = cli.ssh_fallback_runs as usize;
        if rounds == 0 {
            return Ok(None);
        }
        let Some(mut peer) = SshPeer::start(&cli.sshd_script, &root.join("ssh-fallback")).await?
        else {
            return Ok(None);
        };
        progress(&format!(
            "ssh fallback: {} warm-up + {rounds} rounds of a job over SSH (connection per job, kept connection) and `ssh … true` (fresh, ControlMaster)",
            cli.warmup.min(10)
        ));
        let figures =
            ssh_fallback::measure(&api, &mut peer, cli.warmup.min(10) as usize, rounds).await?;
        progress(&format!(
            "ssh fallback: p50 {:.2} ms vs fresh ssh {:.2} ms; kept connection {:.2} ms vs ControlMaster {:.2} ms",
            figures.fresh.p50, figures.ssh_fresh.p50, figures.reused.p50, figures.ssh_master.p50
        ));
        Ok(Some(figures))
    };
    let run_install = async || -> anyhow::Result<Option<install::InstallFigures>> {
        if cli.install_runs == 0 {
            return Ok(None);
        }
        install::publish(
            &binaries,
            &root.join("data/releases"),
            &root.join("release-keys"),
        )
        .await?;
        progress(&format!(
            "install: 1 warm-up + {} rounds of install.sh → agent online",
            cli.install_runs
        ));
        let figures =
            install::measure(&api, &root.join("install"), cli.install_runs as usize).await?;
        progress(&format!(
            "install: p50 {:.1} ms to online; the binary's download alone {:.1} ms",
            figures.online.p50, figures.download.p50
        ));
        Ok(Some(figures))
    };
    let run_fanout = async || -> anyhow::Result<Option<fanout::FanoutFigures>> {
        if cli.fanout_runs == 0 && cli.fanout_simulated == 0 {
            return Ok(None);
        }
        let mut sizes = cli.fanout_sizes.clone();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.is_empty() || sizes.iter().any(|&size| size == 0 || size > 100) {
            anyhow::bail!("--fanout-sizes must be numbers 1-100, e.g. 3,10");
        }
        let salt = if cli.no_salt {
            Err("--no-salt".to_owned())
        } else {
            let venv = match &cli.salt_venv {
                Some(venv) => venv.clone(),
                None => binaries
                    .cronium
                    .parent()
                    .and_then(Path::parent)
                    .context("cannot find the target dir for the Salt virtualenv")?
                    .join("salt-venv"),
            };
            Ok(fanout::SaltSettings {
                venv,
                python: cli.salt_python.clone(),
                spec: cli.salt_spec.clone(),
            })
        };
        let options = fanout::FanoutOptions {
            sizes,
            warmup: cli.fanout_warmup as usize,
            runs: cli.fanout_runs as usize,
            simulated: cli.fanout_simulated as usize,
            simulated_runs: cli.fanout_simulated_runs as usize,
            simulated_executors: cli
                .fanout_simulated_executors
                .iter()
                .map(|executor| match executor {
                    SimulatedExecutorArg::Simulated => {
                        fanout::simulated::Executor::SimulatedInProcess
                    }
                    SimulatedExecutorArg::Bash => fanout::simulated::Executor::RealBash,
                })
                .collect(),
            simulated_dir: cli
                .fanout_simulated_dir
                .clone()
                .unwrap_or_else(|| scratch::tmpfs_or(root.join("fanout"))),
            salt,
        };
        let figures = fanout::measure(&binaries, &api, &root.join("fanout"), options).await?;
        let _ = std::fs::remove_dir_all(root.join("fanout"));
        Ok(Some(figures))
    };
    if cli.fanout_only {
        let figures = run_fanout().await?;
        control_plane.process.ensure_running()?;
        match &figures {
            Some(figures) => println!("{}", figures.markdown()),
            None => println!("(fan-out phase skipped: --fanout-runs 0 --fanout-simulated 0)"),
        }
        if let (Some(path), Some(figures)) = (&cli.out, &figures) {
            let text = serde_json::to_string_pretty(&json!({"fanout": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(&format!("wrote {}", path.display()));
        }
        drop(control_plane);
        drop(temp);
        return Ok(());
    }
    if cli.install_only {
        let figures = run_install().await?;
        control_plane.process.ensure_running()?;
        match &figures {
            Some(figures) => println!("### Cronium install benchmark\n\n{}", figures.markdown()),
            None => println!("(install phase skipped)"),
        }
        if let (Some(path), Some(figures)) = (&cli.out, &figures) {
            let text = serde_json::to_string_pretty(&json!({"install": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        drop(control_plane);
        drop(temp);
        return Ok(());
    }
    if cli.ssh_fallback_only {
        let figures = run_ssh_fallback().await?;
        control_plane.process.ensure_running()?;
        match &figures {
            Some(figures) => println!(
                "### Cronium SSH fallback benchmark ({} CPUs, {})\n\n{}",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                std::env::consts::ARCH,
                figures.markdown()
            ),
            None => println!("(SSH fallback phase skipped)"),
        }
        if let (Some(path), Some(figures)) = (&cli.out, &figures) {
            let text = serde_json::to_string_pretty(&json!({"ssh_fallback": figures.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        drop(control_plane);
        drop(temp);
        return Ok(());
    }

    progress("enrolling and starting the agent (capacity 8)");
    let agent_name = "bench-agent".to_owned();
    let terminal_shell = terminal::write_shell(&root.join("terminal"))?;
    let mut agent = start_agent_process(
        &binaries,
        &api,
        &agent_name,
        &root.join("agent"),
        8,
        &terminal_shell,
    )
    .await?;
    wait_online(&api, std::slice::from_ref(&agent_name), ONLINE_TIMEOUT)
        .await
        .with_context(|| format!("the agent's output:\n{}", agent.tail()))?;
    let terminal_options = terminal::TerminalOptions {
        echo: cli.terminal_echo as usize,
        echo_warmup: 20,
        opens: cli.terminal_opens as usize,
        interrupts: cli.terminal_interrupts as usize,
        cat_bytes: cli.terminal_cat_mib * 1024 * 1024,
        cat_runs: cli.terminal_cat_runs as usize,
    };
    let run_terminal = async |agent: &mut procs::ChildGuard| -> anyhow::Result<TerminalPhase> {
        if terminal_options.echo == 0 {
            return Ok(TerminalPhase::Skipped("--terminal-echo 0".to_owned()));
        }
        let figures = terminal::run(
            &api,
            &agent_name,
            &cli.sshd_script,
            &terminal_shell,
            &root.join("terminal"),
            terminal_options,
        )
        .await
        .with_context(|| format!("the agent's output:\n{}", agent.tail()))?;
        agent.ensure_running()?;
        Ok(TerminalPhase::Measured(Box::new(figures)))
    };
    if cli.terminal_only {
        let phase = run_terminal(&mut agent).await?;
        control_plane.process.ensure_running()?;
        println!(
            "### Cronium terminal benchmark ({} CPUs, {})\n\n{}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            std::env::consts::ARCH,
            phase.markdown()
        );
        if let Some(path) = &cli.out {
            let text = serde_json::to_string_pretty(&json!({"terminal": phase.json()}))?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress(&format!("wrote {}", path.display()));
        }
        drop(agent);
        drop(control_plane);
        drop(temp);
        return Ok(());
    }
    tokio::time::sleep(SETTLE).await;
    agent.ensure_running()?;
    let agent_rss_idle_kib = rss_kib(agent.pid())?;
    progress(&format!("idle agent RSS: {agent_rss_idle_kib} KiB"));

    // Measured before the load phases: afterwards the allocator holds freed memory that new
    // connections would reuse, which would understate their cost.
    let memory = if agents > 0 {
        progress(&format!(
            "control-plane memory: connecting {agents} in-process agents"
        ));
        let memory = phases::memory_per_agent(
            &api,
            control_plane.pid(),
            &root.join("mem-agents"),
            agents,
            SETTLE,
        )
        .await?;
        progress(&format!(
            "{:.1} KiB per agent ({} agents online after {:.1} s)",
            memory.per_agent_kib(),
            memory.agents,
            memory.online_after.as_secs_f64()
        ));
        // The memory agents' files are not needed any more.
        let _ = std::fs::remove_dir_all(root.join("mem-agents"));
        Some(memory)
    } else {
        None
    };
    control_plane.process.ensure_running()?;

    let latency_event = api
        .create_event("bench-latency", "date +%s%N", &agent_name)
        .await?;
    let noop_event = api.create_event("bench-noop", "true", &agent_name).await?;

    progress(&format!(
        "latency: {} warm-up + {runs} runs of `date +%s%N`",
        cli.warmup
    ));
    let latency = phases::latency(&api, &latency_event, cli.warmup as usize, runs).await?;
    let post = Summary::of(&latency.post);
    let started = Summary::of(&latency.started);
    let result = Summary::of(&latency.result);
    let breakdown: Vec<(String, Summary)> = [
        ("POST answered (job durable)", &latency.post),
        ("claimed_at (server clock, ms resolution)", &latency.claimed),
        (
            "started_at (server clock, ms resolution)",
            &latency.server_started,
        ),
        ("process printed `date +%s%N`", &latency.started),
        ("first SSE `log` event arrived", &latency.first_log),
        (
            "finished_at (server clock, ms resolution)",
            &latency.finished,
        ),
        ("SSE `end` arrived", &latency.result),
    ]
    .into_iter()
    .filter(|(_, samples)| !samples.is_empty())
    .map(|(name, samples)| (name.to_owned(), Summary::of(samples)))
    .collect();
    progress(&format!(
        "result latency p50 {:.2} ms, p99 {:.2} ms",
        result.p50, result.p99
    ));

    let ssh = match SshPeer::start(&cli.sshd_script, &root.join("ssh")).await? {
        Some(mut peer) => {
            progress(&format!("ssh: {runs} fresh connections"));
            for _ in 0..3 {
                peer.fresh().await?;
            }
            let mut fresh = Vec::with_capacity(runs);
            for _ in 0..runs {
                fresh.push(peer.fresh().await?);
            }
            progress(&format!("ssh: {runs} runs over a ControlMaster"));
            peer.multiplexed().await?;
            let mut multiplexed = Vec::with_capacity(runs);
            for _ in 0..runs {
                multiplexed.push(peer.multiplexed().await?);
            }
            peer.close_master();
            drop(peer);
            Some((Summary::of(&fresh), Summary::of(&multiplexed)))
        }
        None => None,
    };

    let phase_timeout = Duration::from_secs(60) + Duration::from_millis(100) * jobs as u32;
    progress("throughput: warm-up");
    phases::throughput(
        &api,
        &noop_event,
        (clients * 4).min(jobs),
        clients,
        phase_timeout,
    )
    .await?;
    progress(&format!("throughput: {jobs} jobs from {clients} clients"));
    let throughput = phases::throughput(&api, &noop_event, jobs, clients, phase_timeout).await?;
    progress(&format!("{:.1} jobs/s", throughput.per_second()));

    let traced = if cli.strace.is_file() {
        progress(&format!(
            "durable commits: {jobs} jobs with strace attached"
        ));
        let strace =
            phases::Strace::attach(&cli.strace, control_plane.pid(), &root.join("strace.txt"))
                .await?;
        let traced =
            phases::throughput(&api, &noop_event, jobs, clients, phase_timeout * 3).await?;
        let counts = strace.finish().await?;
        Some((traced, counts))
    } else {
        eprintln!(
            "NOTE: {} is missing; not counting durable commits",
            cli.strace.display()
        );
        None
    };

    tokio::time::sleep(SETTLE).await;
    agent.ensure_running()?;
    control_plane.process.ensure_running()?;
    let agent_rss_after_load_kib = rss_kib(agent.pid())?;

    let helper_calls = cli.helper_calls as usize;
    let helpers = if helper_calls == 0 {
        HelperPhase::Skipped("--helper-calls 0".to_owned())
    } else {
        let server = helpers::BareServer::start(&root.join("bare.sock"))?;
        let mut languages = Vec::new();
        for language in &helpers::LANGUAGES {
            progress(&format!(
                "helpers: {} + {helper_calls} `input` calls and bare round trips in one {} job",
                helpers::WARMUP,
                language.name
            ));
            let samples = helpers::measure(&api, &agent_name, &server, language, helper_calls)
                .await
                .with_context(|| format!("the agent's output:\n{}", agent.tail()))?;
            let round_trip = HelperRoundTrip {
                language: language.name.to_owned(),
                peer: language.peer.to_owned(),
                warmup: helpers::WARMUP,
                helper: Summary::of(&samples.helper),
                bare: Summary::of(&samples.bare),
            };
            progress(&round_trip.line());
            languages.push(round_trip);
        }
        agent.ensure_running()?;
        HelperPhase::Measured(languages)
    };

    let terminal = run_terminal(&mut agent).await?;
    let ssh_fallback = run_ssh_fallback().await?;
    let installs = run_install().await?;
    let fanouts = run_fanout().await?;
    control_plane.process.ensure_running()?;

    // Last, so the Docker runner does not change the figures above (the agent's RSS).
    let docker = match docker_engine {
        Err(reason) => DockerPhase::Skipped(reason),
        Ok(engine) => {
            let event = api
                .create_docker_event(
                    "bench-docker",
                    "true",
                    docker::IMAGE,
                    docker::MEMORY_MB,
                    docker::PIDS,
                    &agent_name,
                )
                .await?;
            progress(&format!(
                "docker: {} warm-up + {docker_runs} rounds of a Docker job and `docker run --rm`",
                cli.docker_warmup
            ));
            let samples = docker::compare(&api, &event, cli.docker_warmup as usize, docker_runs)
                .await
                .with_context(|| format!("the agent's output:\n{}", agent.tail()))?;
            let comparison = DockerComparison {
                engine_version: engine.version.clone(),
                engine_address: engine.address(),
                image: docker::IMAGE.to_owned(),
                docker_run_command: format!("docker {}", docker::docker_run_args().join(" ")),
                warmup: cli.docker_warmup as usize,
                cronium: Summary::of(&samples.cronium),
                docker_run: Summary::of(&samples.docker_run),
            };
            progress(&format!(
                "docker: cronium p50 {:.2} ms vs docker run p50 {:.2} ms ({:.3}×)",
                comparison.cronium.p50,
                comparison.docker_run.p50,
                comparison.ratio_p50()
            ));
            agent.ensure_running()?;
            DockerPhase::Measured(comparison)
        }
    };

    let results = Results {
        config: json!({
            "description": format!(
                "runs={runs}, jobs={jobs}, clients={clients}, agents={agents}, docker-runs={docker_runs}, helper-calls={helper_calls}, terminal-echo={}; {} CPUs, {}",
                terminal_options.echo,
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                std::env::consts::ARCH
            ),
            "runs": runs,
            "warmup": cli.warmup,
            "jobs": jobs,
            "clients": clients,
            "agents": agents,
            "docker_runs": docker_runs,
            "docker_warmup": cli.docker_warmup,
            "helper_calls": helper_calls,
            "terminal_echo": terminal_options.echo,
            "terminal_opens": terminal_options.opens,
            "terminal_interrupts": terminal_options.interrupts,
            "terminal_cat_mib": cli.terminal_cat_mib,
            "terminal_cat_runs": terminal_options.cat_runs,
            "agent_capacity": 8,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        }),
        post,
        started,
        result,
        breakdown,
        ssh,
        throughput,
        traced,
        clients,
        agent_rss_idle_kib,
        agent_rss_after_load_kib,
        memory,
        docker,
        helpers,
        terminal,
    };
    println!("{}", results.markdown());
    if let Some(figures) = &ssh_fallback {
        println!("{}", figures.markdown());
    }
    if let Some(figures) = &installs {
        println!("{}", figures.markdown());
    }
    if let Some(figures) = &fanouts {
        println!("{}", figures.markdown());
    }
    if let Some(path) = &cli.out {
        let mut all = results.json();
        if let Some(figures) = &ssh_fallback {
            all["ssh_fallback"] = figures.json();
        }
        if let Some(figures) = &installs {
            all["install"] = figures.json();
        }
        if let Some(figures) = &fanouts {
            all["fanout"] = figures.json();
        }
        let text = serde_json::to_string_pretty(&all)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        progress(&format!("wrote {}", path.display()));
    }
    // Stop the agent before the control plane (drop order is explicit here for clarity).
    drop(agent);
    drop(control_plane);
    drop(temp);
    Ok(())
}
