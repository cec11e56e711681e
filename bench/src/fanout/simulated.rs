//! Many agents in this process, each running the agent's own code (`cronium_agent::run`) over a
//! QUIC connection of its own, enrolled with labels so one event can target all of them.
//!
//! What runs a job is the fleet's [`Executor`]: the agent's real runner (a `bash` process per
//! job), or [`SimulatedEchoHi`], an in-process stand-in that writes the line `hi` without forking,
//! so the figure measures the control plane and the agents' protocol, not the host's fork rate.
//! Everything else (connection, claims, spool, uploads) is the agent's own code either way.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cronium_agent::runner::{Runner, StopSignal};
use cronium_agent::spool::{AttemptSpool, Outcome};
use cronium_protocol::{FailReason, FinalStatus, JobSpec, LogStream, ScriptKind};
use futures_util::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::cluster::{enroll_in_process, wait_online};

/// What runs the fleet's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// The agent's own runner: a real `bash` process per job.
    RealBash,
    /// [`SimulatedEchoHi`]: no process, the line `hi` written by the agent's task.
    SimulatedInProcess,
}

impl Executor {
    /// How the bench output names it.
    pub fn label(self) -> &'static str {
        match self {
            Executor::RealBash => "real bash per job",
            Executor::SimulatedInProcess => {
                "SIMULATED in-process executor (no process: writes `hi`)"
            }
        }
    }

    /// The key in the JSON output.
    pub fn key(self) -> &'static str {
        match self {
            Executor::RealBash => "real_bash",
            Executor::SimulatedInProcess => "simulated_in_process",
        }
    }
}

/// The SIMULATED executor of the benchmark's fleet: it runs nothing. A bash job whose script is
/// exactly `echo hi` gets the line `hi` on stdout and exit code 0, as `bash` would give it; any
/// other job fails (exit code 127, with a note in its log) rather than pretend. The output goes
/// through the attempt's spool like a real runner's, pid 0 marks the start.
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
                        b"[cronium-bench: the simulated executor runs only `echo hi`]\n",
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

/// A fleet of in-process agents; dropping it stops them (cancelled, then aborted).
pub struct InProcessFleet {
    stop: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
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
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut names = Vec::with_capacity(count);
        for (state_dir, name) in identities {
            names.push(name);
            let options = cronium_agent::AgentOptions {
                state_dir,
                capacity: 1,
                max_log_bytes: 1024 * 1024,
                reconnect_max: Duration::from_secs(5),
                shutdown_grace: Duration::from_secs(5),
                force_stop: CancellationToken::new(),
                allow_run_as: Vec::new(),
            };
            match executor {
                Executor::RealBash => {
                    tasks.spawn(cronium_agent::run(options, stop.child_token()));
                }
                Executor::SimulatedInProcess => {
                    let runner: Arc<dyn Runner> = Arc::new(SimulatedEchoHi);
                    tasks.spawn(cronium_agent::run_with_runner(
                        options,
                        runner,
                        stop.child_token(),
                    ));
                }
            }
        }
        let mut fleet = InProcessFleet {
            stop,
            tasks,
            online_after: Duration::ZERO,
        };
        let online_timeout = Duration::from_secs(60) + Duration::from_millis(100) * count as u32;
        fleet.online_after = wait_online(api, &names, online_timeout).await?;
        Ok(fleet)
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

impl Drop for InProcessFleet {
    fn drop(&mut self) {
        // On an early return: the agents stop claiming and end their jobs; the JoinSet aborts
        // whatever is left when it is dropped right after.
        self.stop.cancel();
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
