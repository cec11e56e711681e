//! The Cronium agent: dials out to the control plane over QUIC and runs jobs.
//!
//! [`enroll`] trades a one-time token for the agent's identity (key and client certificate in the
//! state dir). [`run`] connects with that identity and serves jobs until the shutdown token is
//! cancelled: it claims work, runs each attempt through a [`runner::Runner`], buffers the output
//! in the on-disk [`spool`] and uploads it over a stream per attempt, resuming after reconnects
//! and restarts; it also serves the browser terminals the control plane relays ([`terminal`]).
//! Both functions are used in-process by `cronium dev`, so neither exits the process nor
//! installs a global tracing subscriber.

mod conn;
pub mod enroll;
pub mod frame_io;
pub mod helper;
pub mod identity;
mod jobs;
pub mod logging;
pub mod runner;
pub mod spool;
pub mod terminal;
pub mod update;

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cronium_protocol::{Capabilities, HostInfo};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use conn::FatalError;
pub use enroll::{EnrollError, EnrollOptions, LabelError, parse_labels};
pub use identity::Identity;
pub use terminal::{TerminalOptions, Terminals};
pub use update::SelfUpdateOptions;

use crate::conn::ConnOptions;
use crate::helper::forward::HelperLink;
use crate::jobs::{Jobs, JobsOptions};
use crate::runner::cgroup::Cgroups;
use crate::runner::docker::{DockerRunner, DockerRunnerOptions};
use crate::runner::process::{
    ProcessRunner, ProcessRunnerOptions, base_environment, resolve_interpreters,
};
use crate::runner::{Dispatch, StopReason};
use crate::spool::Spool;

/// The agent's release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The target triple the agent was built for.
pub const TARGET: &str = env!("CRONIUM_AGENT_TARGET");

/// Time between SIGTERM and SIGKILL when a job is timed out or cancelled.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long killed jobs may take to be reaped during shutdown.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long a graceful shutdown waits for results to be uploaded after the jobs ended.
const UPLOAD_WAIT: Duration = Duration::from_secs(15);

/// How long a forced shutdown waits for results to be uploaded.
const FORCED_UPLOAD_WAIT: Duration = Duration::from_secs(2);

/// How long the terminal sessions may take to end when the agent stops.
const TERMINAL_STOP_WAIT: Duration = Duration::from_secs(10);

/// What `cronium-agent run` needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The state dir holding the identity, the spool and the work dirs.
    pub state_dir: PathBuf,
    /// How many jobs run at once.
    pub capacity: u32,
    /// Output kept per attempt; the rest is dropped after a marker.
    pub max_log_bytes: u64,
    /// Ceiling of the reconnect backoff.
    pub reconnect_max: Duration,
    /// After the shutdown token is cancelled, how long running jobs may take before they are
    /// killed.
    pub shutdown_grace: Duration,
    /// Cancelled (after the shutdown token) to kill running jobs at once instead of waiting for
    /// the grace period, e.g. on a second SIGINT/SIGTERM.
    pub force_stop: CancellationToken,
    /// Users (names or uids) host jobs may run as besides the agent's own (`--allow-run-as`).
    /// Non-empty makes the state dir and the work root searchable (0711) so those users can
    /// reach their work dirs.
    pub allow_run_as: Vec<String>,
}

/// Installs ring as rustls' process-wide crypto provider, unless one is installed already (the
/// control plane may run the agent in-process).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Enrolls the agent (see [`enroll::enroll`]) and returns the stored identity.
pub async fn enroll(options: EnrollOptions) -> anyhow::Result<Identity> {
    Ok(enroll::enroll(options).await?)
}

/// Runs the agent until `shutdown` is cancelled (then it claims nothing more, lets running jobs
/// finish within the grace period, uploads their results and returns), or until the control
/// plane refuses the agent for good (an error naming the reason). Terminals have their default
/// settings; see [`run_with_terminals`].
pub async fn run(options: AgentOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_terminals(options, TerminalOptions::default(), shutdown).await
}

/// [`run`] with these terminal settings. A stop ends every terminal session (their viewers
/// are told the exit) while the running jobs drain.
pub async fn run_with_terminals(
    options: AgentOptions,
    terminal_options: TerminalOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_agent(options, terminal_options, None, None, shutdown).await
}

/// [`run`] with every job executed by `runner` instead of the agent's own runners (host
/// processes, Docker, HTTP requests): the connection, claims, spool and uploads are the agent's
/// own. For a benchmark that holds many agents in one process and must not measure the host's
/// fork rate; the runner says what it does in place of the real work.
pub async fn run_with_runner(
    options: AgentOptions,
    runner: Arc<dyn runner::Runner>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_agent(
        options,
        TerminalOptions::default(),
        None,
        Some(runner),
        shutdown,
    )
    .await
}

/// [`run_with_terminals`] for the `cronium-agent` binary, which also updates itself when the
/// control plane announces a newer version (see [`update`]): after a verified update it drains
/// like a stop and then executes the new binary in place of this process; this function returns
/// only if that fails.
pub async fn run_self_updating(
    options: AgentOptions,
    terminal_options: TerminalOptions,
    self_update: SelfUpdateOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_agent(options, terminal_options, Some(self_update), None, shutdown).await
}

async fn run_agent(
    options: AgentOptions,
    terminal_options: TerminalOptions,
    self_update: Option<SelfUpdateOptions>,
    runner: Option<Arc<dyn runner::Runner>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    install_crypto_provider();
    anyhow::ensure!(options.capacity > 0, "the capacity must be at least 1");
    let state_dir = std::path::absolute(&options.state_dir)
        .with_context(|| format!("invalid state dir {}", options.state_dir.display()))?;
    let identity = Identity::load(&state_dir)?;
    let client_config = identity.quic_client_config()?;
    let updater = match self_update {
        Some(self_update) => {
            update::Updater::start(&state_dir, &identity.server_url, self_update).await?
        }
        None => update::Updater::disabled(VERSION),
    };
    let agent_version = updater.installed_version();
    // A stop: the caller's shutdown, or a verified update waiting for the agent to drain.
    let caller_shutdown = shutdown;
    let shutdown = caller_shutdown.child_token();

    let work_root = state_dir.join("work");
    spool::create_private_dir(&work_root)?;
    if !options.allow_run_as.is_empty() {
        open_for_run_as(&state_dir, &work_root)?;
        for warning in runner::run_as::check_allow_list(&options.allow_run_as) {
            tracing::warn!("{warning}");
        }
    }
    let spool = Spool::open(state_dir.join("spool"))?;
    let recovered = spool.recover(options.max_log_bytes, &work_root)?;
    let cgroups = Cgroups::probe();
    if cgroups.memory.is_none() || cgroups.pids.is_none() || cgroups.cpu.is_none() {
        tracing::info!(notes = ?cgroups.notes, "cgroup limits for host jobs: {}", cgroups.describe());
    } else {
        tracing::info!("cgroup limits for host jobs: {}", cgroups.describe());
    }
    remove_leftover_work_dirs(&work_root, &cgroups);

    let base_env = base_environment(|name| std::env::var(name).ok());
    let path = base_env
        .iter()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    let interpreters = resolve_interpreters(&path);
    let terminals = Terminals::new(
        terminal_options,
        &path,
        std::env::var("LANG").ok().as_deref(),
    );
    let docker = match runner::docker::connect().await {
        Ok(docker) => Some(docker),
        Err(reason) => {
            tracing::info!(%reason, "Docker jobs are not available on this agent");
            None
        }
    };
    let capabilities = Capabilities {
        interpreters: interpreters.iter().map(|(name, _)| name.clone()).collect(),
        docker: docker.is_some(),
    };
    let (connection_sender, connection_receiver) = watch::channel(None);
    let helper_link = HelperLink::new(connection_receiver.clone());
    let docker_runner = DockerRunner::new(
        DockerRunnerOptions {
            work_root: work_root.clone(),
            agent_id: identity.agent_id.clone(),
            helper_link: helper_link.clone(),
        },
        docker,
    );
    let leftovers = docker_runner.remove_leftovers().await;
    if leftovers > 0 {
        tracing::info!(
            count = leftovers,
            "removed containers a previous run of this agent left"
        );
    }
    let runner: Arc<dyn runner::Runner> = match runner {
        Some(runner) => runner,
        None => Arc::new(Dispatch {
            host: ProcessRunner::new(ProcessRunnerOptions {
                work_root,
                base_env,
                kill_grace: KILL_GRACE,
                interpreters,
                helper_link,
                allow_run_as: options.allow_run_as.clone(),
                cgroups,
            }),
            docker: docker_runner,
            http: crate::runner::http::HttpRunner::new(),
        }),
    };

    let tracker = TaskTracker::new();
    let exit = CancellationToken::new();
    let jobs = Jobs::new(JobsOptions {
        spool,
        runner,
        capacity: options.capacity,
        max_log_bytes: options.max_log_bytes,
        tracker: tracker.clone(),
        exit: exit.clone(),
        connection: connection_receiver,
    });
    if !recovered.is_empty() {
        tracing::info!(
            count = recovered.len(),
            "resuming the upload of attempts from the spool"
        );
    }
    for attempt in recovered {
        jobs.adopt(attempt);
    }
    {
        let restart = updater.restart_requested();
        let (shutdown, exit) = (shutdown.clone(), exit.clone());
        tracker.spawn(async move {
            tokio::select! {
                () = restart.cancelled() => {
                    tracing::info!("a verified update is ready: stopping to restart into it");
                    shutdown.cancel();
                }
                () = exit.cancelled() => {}
            }
        });
    }
    tracker.spawn(updater.clone().serve(exit.clone()));
    tracing::info!(
        agent_id = %identity.agent_id,
        version = %agent_version,
        capacity = options.capacity,
        interpreters = ?capabilities.interpreters,
        docker = capabilities.docker,
        "agent starting"
    );

    let mut connection_loop = pin!(conn::run(
        ConnOptions {
            identity,
            client_config,
            agent_version: agent_version.clone(),
            capacity: options.capacity,
            capabilities,
            host: host_info(),
            reconnect_max: options.reconnect_max,
            connection: connection_sender,
            shutdown: shutdown.clone(),
            exit: exit.clone(),
            terminals: terminals.clone(),
            updater: updater.clone(),
        },
        jobs.clone(),
    ));
    let drained = pin!(async {
        tokio::join!(drain(&jobs, &shutdown, &options), async {
            shutdown.cancelled().await;
            terminals.stop(TERMINAL_STOP_WAIT).await;
        });
    });
    let result = tokio::select! {
        result = &mut connection_loop => match result {
            Ok(()) => Ok(()),
            Err(fatal) => {
                tracing::error!(%fatal, "stopping the agent");
                terminals.stop(TERMINAL_STOP_WAIT).await;
                jobs.stop_all(StopReason::Shutdown);
                let _ = tokio::time::timeout(KILL_WAIT, jobs.wait_idle()).await;
                Err(anyhow::Error::new(fatal))
            }
        },
        () = drained => {
            exit.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut connection_loop).await;
            Ok(())
        }
    };
    exit.cancel();
    terminals.stop(TERMINAL_STOP_WAIT).await;
    tracker.close();
    if tokio::time::timeout(KILL_WAIT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some job tasks did not end in time");
    }
    tracing::info!("agent stopped");
    if result.is_ok()
        && !caller_shutdown.is_cancelled()
        && let Some(error) = updater.restart()
    {
        return Err(error);
    }
    result
}

/// The graceful shutdown sequence; completes when the agent may exit.
async fn drain(jobs: &Jobs, shutdown: &CancellationToken, options: &AgentOptions) {
    shutdown.cancelled().await;
    let force = &options.force_stop;
    tracing::info!(running = jobs.active(), grace = ?options.shutdown_grace, "stopping: waiting for running jobs");
    tokio::select! {
        () = jobs.wait_idle() => {}
        () = tokio::time::sleep(options.shutdown_grace) => tracing::warn!("the shutdown grace period elapsed; killing running jobs"),
        () = force.cancelled() => tracing::warn!("stopping now; killing running jobs"),
    }
    if jobs.active() > 0 {
        jobs.stop_all(StopReason::Shutdown);
        let _ = tokio::time::timeout(KILL_WAIT, jobs.wait_idle()).await;
    }
    let upload_wait = if force.is_cancelled() {
        FORCED_UPLOAD_WAIT
    } else {
        UPLOAD_WAIT
    };
    tokio::select! {
        () = jobs.wait_empty() => {}
        () = tokio::time::sleep(upload_wait) => {
            tracing::warn!("some results are not uploaded yet; they stay in the spool for the next start");
        }
        () = force.cancelled(), if !force.is_cancelled() => {}
    }
}

/// Facts about this host for the hello and the enrollment.
pub(crate) fn host_info() -> HostInfo {
    HostInfo {
        hostname: hostname(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
    }
}

fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the pointer and length describe `buffer`, which outlives the call.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if status != 0 {
        return "localhost".to_owned();
    }
    // The last byte stays zero (gethostname truncates to len - 1 plus NUL on Linux), so a NUL exists.
    buffer[buffer.len() - 1] = 0;
    CStr::from_bytes_until_nul(&buffer)
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Lets the users of `--allow-run-as` reach their work dirs: the state dir and the work root
/// become searchable but not listable (0711); the spool, the key and every other attempt's work
/// dir stay private.
fn open_for_run_as(state_dir: &Path, work_root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [state_dir, work_root] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot make {} searchable (0711)", dir.display()))?;
    }
    Ok(())
}

/// Removes work dirs (and the cgroups of host jobs) left by an earlier agent process (their
/// process groups were killed by the spool recovery; the cgroups catch the rest).
fn remove_leftover_work_dirs(work_root: &Path, cgroups: &Cgroups) {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let cgroup = runner::cgroup::cgroup_name(&entry.file_name().to_string_lossy());
        if cgroups.remove_leftover(&cgroup) {
            tracing::info!(%cgroup, "removed a leftover job cgroup");
        }
        tracing::info!(dir = %path.display(), "removing a leftover work dir");
        if let Err(error) = std::fs::remove_dir_all(&path) {
            tracing::warn!(dir = %path.display(), %error, "could not remove a leftover work dir");
        }
    }
}
