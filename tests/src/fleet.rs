//! Many agents in one process, each running the agent's own code (`cronium_agent::run`) over a
//! QUIC connection of its own: used by the load test (`tests/tests/load.rs`) and by the
//! benchmark's simulated fan-out and load phases (`bench/`).
//!
//! What runs a job is the fleet's [`Executor`]: the agent's real runner (a `bash` process per
//! job), or [`SimulatedEchoHi`], an in-process stand-in that writes the line `hi` without forking,
//! so a figure measures the control plane and the agents' protocol, not the host's fork rate.
//! Everything else (connection, reconnects, heartbeats, claims, spool, uploads) is the agent's own
//! code either way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cronium_agent::runner::{Runner, StopSignal};
use cronium_agent::spool::{AttemptSpool, Outcome};
use cronium_protocol::{FailReason, FinalStatus, JobSpec, LogStream, ScriptKind};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What runs the fleet's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// The agent's own runner: a real `bash` process per job.
    RealBash,
    /// [`SimulatedEchoHi`]: no process, the line `hi` written by the agent's task.
    SimulatedInProcess,
}

impl Executor {
    /// How output names it.
    pub fn label(self) -> &'static str {
        match self {
            Executor::RealBash => "real bash per job",
            Executor::SimulatedInProcess => {
                "SIMULATED in-process executor (no process: writes `hi`)"
            }
        }
    }

    /// The key in JSON output.
    pub fn key(self) -> &'static str {
        match self {
            Executor::RealBash => "real_bash",
            Executor::SimulatedInProcess => "simulated_in_process",
        }
    }
}

/// The SIMULATED executor: it runs nothing. A bash job whose script is exactly `echo hi` gets the
/// line `hi` on stdout and exit code 0, as `bash` would give it; any other job fails (exit code
/// 127, with a note in its log) rather than pretend. The output goes through the attempt's spool
/// like a real runner's, pid 0 marks the start.
pub struct SimulatedEchoHi;

/// The only script [`SimulatedEchoHi`] answers.
pub const SIMULATED_SCRIPT: &str = "echo hi";

impl Runner for SimulatedEchoHi {
    fn run<'a>(
        &'a self,
        spec: &'a JobSpec,
        spool: &'a AttemptSpool,
        _stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let recognised =
                spec.kind == ScriptKind::Bash && spec.script.trim() == SIMULATED_SCRIPT;
            let written = spool.record_pid(0).and_then(|()| {
                if recognised {
                    spool.append(LogStream::Stdout, b"hi\n")
                } else {
                    spool.append(
                        LogStream::System,
                        b"[cronium fleet: the simulated executor runs only `echo hi`]\n",
                    )
                }
            });
            match (recognised, written) {
                (true, Ok(())) => Outcome {
                    status: FinalStatus::Completed,
                    reason: None,
                    exit_code: Some(0),
                },
                (false, _) => Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::ExitCode),
                    exit_code: Some(127),
                },
                (true, Err(_)) => Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::Spawn),
                    exit_code: None,
                },
            }
        })
    }
}

/// One identity enrolled in this process.
#[derive(Debug, Clone)]
pub struct FleetIdentity {
    pub state_dir: PathBuf,
    pub name: String,
    pub agent_id: String,
}

/// Enrolls `count` identities named `PREFIXNNNN` with `labels` under `root/PREFIXNNNN` through
/// the agent's own enrollment (`cronium_agent::enroll`), 8 at a time, with one enrollment token
/// usable `count` times.
pub async fn enroll(
    server_url: &str,
    token: &str,
    ca_sha256: &str,
    root: &Path,
    prefix: &str,
    count: usize,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<FleetIdentity>> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    futures_util::stream::iter(0..count)
        .map(|index| {
            let name = format!("{prefix}{index:04}");
            let state_dir = root.join(&name);
            let options = cronium_agent::EnrollOptions {
                server_url: server_url.to_owned(),
                token: token.to_owned(),
                ca_sha256: ca_sha256.to_owned(),
                name: Some(name.clone()),
                labels: labels.clone(),
                state_dir: state_dir.clone(),
                force: false,
            };
            async move {
                let identity = cronium_agent::enroll(options)
                    .await
                    .with_context(|| format!("cannot enroll {name}"))?;
                anyhow::Ok(FleetIdentity {
                    state_dir,
                    name,
                    agent_id: identity.agent_id,
                })
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await
}

/// Settings of every agent of a fleet.
#[derive(Debug, Clone, Copy)]
pub struct FleetOptions {
    pub executor: Executor,
    /// Jobs each agent runs at once.
    pub capacity: u32,
    /// Ceiling of each agent's reconnect backoff.
    pub reconnect_max: Duration,
}

impl Default for FleetOptions {
    fn default() -> FleetOptions {
        FleetOptions {
            executor: Executor::SimulatedInProcess,
            capacity: 1,
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// A fleet of in-process agents; dropping it stops them (cancelled, then aborted when the task
/// set drops).
pub struct Fleet {
    stop: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Fleet {
    /// Runs one agent per state dir on the current tokio runtime. It does not wait for them to
    /// come online: the caller watches the control plane for that.
    pub fn spawn(state_dirs: impl IntoIterator<Item = PathBuf>, options: FleetOptions) -> Fleet {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for state_dir in state_dirs {
            let agent = cronium_agent::AgentOptions {
                state_dir,
                capacity: options.capacity,
                max_log_bytes: 1024 * 1024,
                reconnect_max: options.reconnect_max,
                shutdown_grace: Duration::from_secs(5),
                force_stop: CancellationToken::new(),
                allow_run_as: Vec::new(),
            };
            match options.executor {
                Executor::RealBash => {
                    tasks.spawn(cronium_agent::run(agent, stop.child_token()));
                }
                Executor::SimulatedInProcess => {
                    let runner: Arc<dyn Runner> = Arc::new(SimulatedEchoHi);
                    tasks.spawn(cronium_agent::run_with_runner(
                        agent,
                        runner,
                        stop.child_token(),
                    ));
                }
            }
        }
        Fleet { stop, tasks }
    }

    /// Fails if an agent has stopped (it returned or panicked) while it should be running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(result) = self.tasks.try_join_next() {
            match result {
                Ok(Ok(())) => anyhow::bail!("an in-process agent stopped by itself"),
                Ok(Err(error)) => return Err(error.context("an in-process agent failed")),
                Err(error) => anyhow::bail!("an in-process agent task failed: {error}"),
            }
        }
        Ok(())
    }

    /// Stops every agent and waits for them (at most 30 s, then aborts the rest); returns how
    /// many stopped with an error.
    pub async fn stop(mut self) -> usize {
        self.stop.cancel();
        let mut errors = 0;
        let joined = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(result) = self.tasks.join_next().await {
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        errors += 1;
                        eprintln!("an in-process agent stopped with an error: {error:#}");
                    }
                    Err(error) => {
                        errors += 1;
                        eprintln!("an in-process agent task failed: {error}");
                    }
                }
            }
        })
        .await;
        if joined.is_err() {
            eprintln!("some in-process agents did not stop within 30 s; aborting them");
            self.tasks.abort_all();
        }
        errors
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // On an early return: the agents stop claiming and end their jobs; the JoinSet aborts
        // whatever is left when it is dropped right after.
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script` through the simulated executor on a real spool; the outcome, the stdout.
    async fn simulate(kind: ScriptKind, script: &str) -> (Outcome, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let spool = cronium_agent::spool::Spool::open(dir.path().join("spool")).unwrap();
        let attempt = spool
            .create(
                &cronium_agent::spool::SpoolSpec {
                    job_id: "job1".into(),
                    attempt: 1,
                    run_id: "run1".into(),
                    event_id: "event1".into(),
                },
                1024,
            )
            .unwrap();
        let spec = JobSpec {
            job_id: "job1".into(),
            attempt: 1,
            run_id: "run1".into(),
            event_id: "event1".into(),
            kind,
            script: script.into(),
            env: Vec::new(),
            timeout_ms: 0,
            input: None,
            runtime: Default::default(),
            secret_env: Default::default(),
        };
        let (_stop, stop) = tokio::sync::watch::channel(None);
        let outcome = SimulatedEchoHi.run(&spec, &attempt, stop).await;
        attempt.finish(outcome).unwrap();
        let progress = attempt.progress();
        assert_eq!(progress.pid, Some(0), "the start is recorded");
        let mut reader = attempt.reader(0).unwrap();
        let mut stdout = Vec::new();
        while let Some(piece) = reader.next_piece(progress.file_len, 4096).unwrap() {
            if piece.stream == LogStream::Stdout {
                stdout.extend(piece.data);
            }
        }
        (outcome, stdout)
    }

    #[tokio::test]
    async fn the_simulated_executor_answers_echo_hi_only() {
        let (outcome, stdout) = simulate(ScriptKind::Bash, "echo hi\n").await;
        assert_eq!(outcome.status, FinalStatus::Completed);
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(stdout, b"hi\n");
        let (outcome, stdout) = simulate(ScriptKind::Bash, "echo ho").await;
        assert_eq!(outcome.status, FinalStatus::Failed);
        assert_eq!(outcome.exit_code, Some(127));
        assert!(stdout.is_empty());
        let (outcome, _) = simulate(ScriptKind::Python, "echo hi").await;
        assert_eq!(outcome.status, FinalStatus::Failed);
    }

    #[test]
    fn executors_are_named_for_what_they_are() {
        assert!(Executor::SimulatedInProcess.label().contains("SIMULATED"));
        assert!(!Executor::RealBash.label().contains("SIMULATED"));
        assert_ne!(Executor::RealBash.key(), Executor::SimulatedInProcess.key());
    }
}
