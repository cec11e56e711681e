//! The Docker phase: a Docker job's trigger → result latency next to `docker run --rm` of the
//! same image with the same limits, measured against the same engine in the same run.
//!
//! The engine is the one `DOCKER_HOST` names (or the default socket); the image is the tiny
//! busybox + bash image the end-to-end harness builds locally (`cronium_e2e::docker`), since no
//! registry need be reachable.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::api::{Api, now_ns};
use crate::phases::ensure_completed;

/// The image both sides run: built locally by the end-to-end harness's builder.
pub const IMAGE: &str = cronium_e2e::docker::TEST_IMAGE;

/// The container limits both sides use.
pub const MEMORY_MB: u32 = 64;
/// See [`MEMORY_MB`].
pub const PIDS: u32 = 64;

/// How long one `docker` CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// How long building (importing) the image may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// The engine the phase runs against.
#[derive(Debug, Clone)]
pub struct Engine {
    /// `DOCKER_HOST` as this process sees it (`None`: the CLI's default socket).
    pub docker_host: Option<String>,
    /// The engine's version, as `docker version` reports it.
    pub version: String,
}

impl Engine {
    /// Where the engine listens, for messages.
    pub fn address(&self) -> String {
        self.docker_host
            .clone()
            .unwrap_or_else(|| "the default socket".to_owned())
    }
}

/// Asks the engine at `DOCKER_HOST` (or the default socket) for its version; `Err` says why no
/// engine answered.
pub async fn probe() -> Result<Engine, String> {
    let docker_host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|value| !value.is_empty());
    let where_ = docker_host
        .clone()
        .map(|host| format!("DOCKER_HOST={host}"))
        .unwrap_or_else(|| "the default socket (DOCKER_HOST is unset)".to_owned());
    let mut command = tokio::process::Command::new("docker");
    command
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(Duration::from_secs(15), command.output()).await {
        Err(_) => return Err(format!("no Docker engine answered at {where_} within 15 s")),
        Ok(Err(error)) => return Err(format!("cannot run the docker CLI: {error}")),
        Ok(Ok(output)) => output,
    };
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || version.is_empty() {
        return Err(format!(
            "no Docker engine answered at {where_}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(Engine {
        docker_host,
        version,
    })
}

/// Builds [`IMAGE`] with the end-to-end harness's builder unless the engine has it already.
pub async fn ensure_image() -> anyhow::Result<()> {
    let build = tokio::task::spawn_blocking(cronium_e2e::docker::require_engine);
    tokio::time::timeout(BUILD_TIMEOUT, build)
        .await
        .with_context(|| format!("building {IMAGE} took longer than {BUILD_TIMEOUT:?}"))?
        .context("the image builder panicked")?
        .with_context(|| format!("cannot build the local image {IMAGE}"))
}

/// The peer's command line: `docker run --rm` with the limits the Docker event sets.
pub fn docker_run_args() -> Vec<String> {
    [
        "run",
        "--rm",
        "--network",
        "none",
        "--memory",
        &format!("{MEMORY_MB}m"),
        "--pids-limit",
        &PIDS.to_string(),
        IMAGE,
        "bash",
        "-c",
        "true",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// One `docker run --rm … bash -c true`: its wall time in milliseconds (spawn → exit).
async fn docker_run_once(args: &[String]) -> anyhow::Result<f64> {
    let mut command = tokio::process::Command::new("docker");
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(CLI_TIMEOUT, command.output())
        .await
        .with_context(|| format!("`docker run` took longer than {CLI_TIMEOUT:?}"))?
        .context("cannot run the docker CLI")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!(
            "`docker {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(elapsed.as_secs_f64() * 1e3)
}

/// One run of the Docker event: trigger → SSE `end`, in milliseconds.
async fn cronium_once(api: &Api, event_id: &str) -> anyhow::Result<f64> {
    let t0 = now_ns();
    let triggered = api.trigger(event_id).await?;
    let followed = api.follow(&triggered.job_id).await?;
    ensure_completed(&followed.job).with_context(|| {
        format!(
            "the Docker job failed; its log: {:?} (does the agent see the engine? it uses DOCKER_HOST)",
            followed.log
        )
    })?;
    Ok((followed.end_ns - t0) as f64 / 1e6)
}

/// Samples of both sides, in milliseconds.
pub struct DockerSamples {
    /// Cronium Docker job: trigger → SSE `end`.
    pub cronium: Vec<f64>,
    /// `docker run --rm …`: spawn → exit of the CLI.
    pub docker_run: Vec<f64>,
}

/// Runs `warmup` untimed rounds and then `runs` timed rounds; each round runs the Docker event
/// once (trigger → result) and `docker run --rm` once, alternating which goes first, so both see
/// the same engine state and any drift over the phase.
pub async fn compare(
    api: &Api,
    event_id: &str,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<DockerSamples> {
    let args = docker_run_args();
    let mut samples = DockerSamples {
        cronium: Vec::with_capacity(runs),
        docker_run: Vec::with_capacity(runs),
    };
    for round in 0..warmup + runs {
        let (cronium, docker_run) = if round % 2 == 0 {
            let cronium = cronium_once(api, event_id).await?;
            (cronium, docker_run_once(&args).await?)
        } else {
            let docker_run = docker_run_once(&args).await?;
            (cronium_once(api, event_id).await?, docker_run)
        };
        if round >= warmup {
            samples.cronium.push(cronium);
            samples.docker_run.push(docker_run);
        }
    }
    Ok(samples)
}
