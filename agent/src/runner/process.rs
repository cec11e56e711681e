//! The process runner: a script run directly on the host, in its own process group.
//!
//! Every attempt gets a private work dir `<work_root>/<job_id>-<attempt>/` holding the script,
//! a scrubbed environment and its own process group. Timeouts and cancellation signal the whole
//! group (SIGTERM, then SIGKILL after a grace period), and when the main process exits the group
//! is killed so background leftovers cannot outlive the attempt. The child is always waited for.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use cronium_protocol::{FailReason, FinalStatus, JobSpec, LogStream};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

use super::{Runner, StopReason, StopSignal};
use crate::helper::HelperServer;
use crate::spool::{AttemptSpool, Outcome, attempt_dir_name};

/// The PATH given to jobs when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the pipes may stay open after the main process exited and its group was killed.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Bytes read from a pipe at once.
const READ_BUFFER: usize = 64 * 1024;

/// Settings of the process runner.
#[derive(Debug, Clone)]
pub struct ProcessRunnerOptions {
    /// Parent of the per-attempt work dirs (`<state>/work`).
    pub work_root: PathBuf,
    /// The environment every job starts from (see [`base_environment`]).
    pub base_env: Vec<(String, String)>,
    /// Time between SIGTERM and SIGKILL when a job is timed out or cancelled.
    pub kill_grace: Duration,
    /// Absolute paths of the interpreters found at start (see [`resolve_interpreters`]), so a
    /// spawn does not search PATH every time; one missing here is still looked up by name.
    pub interpreters: Vec<(String, PathBuf)>,
}

/// Finds `bash`, `python3` and `node` on `path` (a PATH value): their names and absolute paths.
pub fn resolve_interpreters(path: &str) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    ["bash", "python3", "node"]
        .into_iter()
        .filter_map(|name| {
            path.split(':')
                .filter(|dir| !dir.is_empty())
                .map(|dir| Path::new(dir).join(name))
                .find(|candidate| {
                    std::fs::metadata(candidate).is_ok_and(|metadata| {
                        metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
                    })
                })
                .map(|found| (name.to_owned(), found))
        })
        .collect()
}

/// Runs scripts as local processes.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    options: ProcessRunnerOptions,
}

/// Why the runner signalled the process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillCause {
    Timeout,
    Stop(StopReason),
}

/// Builds the base environment of jobs from the agent's own variables (looked up through
/// `agent_env`): PATH (or [`DEFAULT_PATH`]), HOME, USER, LOGNAME, SHELL, LANG (default
/// `C.UTF-8`) and TZ. Nothing else of the agent's environment reaches a job.
pub fn base_environment(agent_env: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_owned(),
            agent_env("PATH").unwrap_or_else(|| DEFAULT_PATH.to_owned()),
        ),
        (
            "HOME".to_owned(),
            agent_env("HOME").unwrap_or_else(|| "/".to_owned()),
        ),
        (
            "SHELL".to_owned(),
            agent_env("SHELL").unwrap_or_else(|| "/bin/sh".to_owned()),
        ),
        (
            "LANG".to_owned(),
            agent_env("LANG").unwrap_or_else(|| "C.UTF-8".to_owned()),
        ),
    ];
    for name in ["USER", "LOGNAME", "TZ"] {
        if let Some(value) = agent_env(name) {
            env.push((name.to_owned(), value));
        }
    }
    env
}

impl ProcessRunner {
    /// A runner with these options.
    pub fn new(options: ProcessRunnerOptions) -> ProcessRunner {
        ProcessRunner { options }
    }

    async fn run_attempt(&self, spec: &JobSpec, spool: &AttemptSpool, stop: StopSignal) -> Outcome {
        let work_dir = self
            .options
            .work_root
            .join(attempt_dir_name(spool.attempt()));
        let outcome = self.run_in(spec, spool, stop, &work_dir).await;
        match tokio::fs::remove_dir_all(&work_dir).await {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(dir = %work_dir.display(), %error, "could not remove a work dir")
            }
        }
        outcome
    }

    async fn run_in(
        &self,
        spec: &JobSpec,
        spool: &AttemptSpool,
        mut stop: StopSignal,
        work_dir: &Path,
    ) -> Outcome {
        let mut log = LogSink::new(spool);
        let (program, script_name) = super::interpreter(spec.kind);
        if let Err(error) = prepare_work_dir(work_dir, script_name, &spec.script) {
            log.system(&format!(
                "[cronium: could not prepare the work dir: {error}]\n"
            ));
            return spawn_failure();
        }
        // Lives until the end of this function: the endpoint goes away with the attempt.
        let helper = match start_helper(work_dir, spec, spool, false) {
            Ok(helper) => helper,
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not start the runtime helpers: {error}]\n"
                ));
                return spawn_failure();
            }
        };

        let program = self
            .options
            .interpreters
            .iter()
            .find(|(name, _)| name == program)
            .map_or_else(|| PathBuf::from(program), |(_, path)| path.clone());
        let mut command = Command::new(&program);
        command
            .arg(script_name)
            .current_dir(work_dir)
            .env_clear()
            .envs(
                self.options
                    .base_env
                    .iter()
                    .map(|(name, value)| (name, value)),
            )
            .env("TMPDIR", work_dir)
            .env("CRONIUM_JOB_ID", &spec.job_id)
            .env("CRONIUM_RUN_ID", &spec.run_id)
            .env("CRONIUM_EVENT_ID", &spec.event_id)
            .env("CRONIUM_ATTEMPT", spec.attempt.to_string())
            .env("CRONIUM_HELPER_SOCKET", helper.client_path())
            .env("CRONIUM_JOB_TOKEN", helper.token())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        let mut ignored = Vec::new();
        for (name, value) in &spec.env {
            let valid_name = !name.is_empty() && !name.contains(['=', '\0']);
            if name.starts_with("CRONIUM_") || !valid_name {
                ignored.push(name.escape_debug().to_string());
            } else {
                command.env(name, value);
            }
        }
        if !ignored.is_empty() {
            log.system(&format!(
                "[cronium: ignored reserved or invalid environment variables: {}]\n",
                ignored.join(", ")
            ));
        }

        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not start {}: {error}]\n",
                    program.display()
                ));
                return spawn_failure();
            }
        };
        // A freshly spawned child that was not waited for yet always has an id.
        let Some(pid) = child.id() else {
            log.system("[cronium: the process vanished before it could be tracked]\n");
            let _ = child.wait().await;
            return spawn_failure();
        };
        if let Err(error) = spool.record_pid(pid) {
            tracing::warn!(%error, "could not record the pid of a job");
        }

        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let mut stdout_buffer = vec![0u8; READ_BUFFER];
        let mut stderr_buffer = vec![0u8; READ_BUFFER];
        let timeout_at =
            (spec.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(spec.timeout_ms));
        let mut kill_cause: Option<KillCause> = None;
        let mut sigkill_at: Option<Instant> = None;
        let mut exited: Option<io::Result<ExitStatus>> = None;
        let mut drain_until: Option<Instant> = None;
        let mut stop_closed = false;

        while exited.is_none() || stdout.is_some() || stderr.is_some() {
            tokio::select! {
                read = read_pipe(&mut stdout, &mut stdout_buffer), if stdout.is_some() => match read {
                    Ok(0) | Err(_) => stdout = None,
                    Ok(len) => log.append(LogStream::Stdout, &stdout_buffer[..len]),
                },
                read = read_pipe(&mut stderr, &mut stderr_buffer), if stderr.is_some() => match read {
                    Ok(0) | Err(_) => stderr = None,
                    Ok(len) => log.append(LogStream::Stderr, &stderr_buffer[..len]),
                },
                status = child.wait(), if exited.is_none() => {
                    exited = Some(status);
                    // Background processes left in the group would keep the pipes open.
                    signal_group(pid, libc::SIGKILL);
                    drain_until = Some(Instant::now() + DRAIN_WAIT);
                },
                _ = sleep_until_some(timeout_at), if kill_cause.is_none() && exited.is_none() => {
                    kill_cause = Some(KillCause::Timeout);
                    log.system(&format!("\n[cronium: timed out after {} ms]\n", spec.timeout_ms));
                    signal_group(pid, libc::SIGTERM);
                    sigkill_at = Some(Instant::now() + self.options.kill_grace);
                },
                reason = wait_for_stop(&mut stop), if kill_cause.is_none() && exited.is_none() && !stop_closed => {
                    let Some(reason) = reason else {
                        stop_closed = true;
                        continue;
                    };
                    kill_cause = Some(KillCause::Stop(reason));
                    match reason {
                        StopReason::Cancel => {
                            log.system("\n[cronium: cancelled]\n");
                            signal_group(pid, libc::SIGTERM);
                            sigkill_at = Some(Instant::now() + self.options.kill_grace);
                        }
                        StopReason::Abandon => signal_group(pid, libc::SIGKILL),
                        StopReason::Shutdown => {
                            log.system("\n[cronium: killed because the agent is stopping]\n");
                            signal_group(pid, libc::SIGKILL);
                        }
                    }
                },
                _ = sleep_until_some(sigkill_at), if sigkill_at.is_some() && exited.is_none() => {
                    signal_group(pid, libc::SIGKILL);
                    sigkill_at = None;
                },
                _ = sleep_until_some(drain_until), if drain_until.is_some() => {
                    tracing::warn!(pid, "a job's output pipes stayed open after its process group was killed");
                    stdout = None;
                    stderr = None;
                },
            }
        }

        let status = match exited {
            Some(Ok(status)) => status,
            Some(Err(error)) => {
                log.system(&format!(
                    "\n[cronium: could not wait for the process: {error}]\n"
                ));
                return Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::Lost),
                    exit_code: None,
                };
            }
            // The loop above only ends once the process exited.
            None => {
                return Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::Lost),
                    exit_code: None,
                };
            }
        };
        match kill_cause {
            Some(KillCause::Timeout) => Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Timeout),
                exit_code: status.code(),
            },
            Some(KillCause::Stop(StopReason::Cancel | StopReason::Abandon)) => Outcome {
                status: FinalStatus::Cancelled,
                reason: None,
                exit_code: status.code(),
            },
            Some(KillCause::Stop(StopReason::Shutdown)) => Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Lost),
                exit_code: status.code(),
            },
            None => match status.code() {
                Some(0) => Outcome {
                    status: FinalStatus::Completed,
                    reason: None,
                    exit_code: Some(0),
                },
                Some(code) => Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::ExitCode),
                    exit_code: Some(code),
                },
                None => {
                    let signal = status.signal().unwrap_or_default();
                    log.system(&format!("\n[cronium: killed by signal {signal}]\n"));
                    Outcome {
                        status: FinalStatus::Failed,
                        reason: Some(FailReason::Signal),
                        exit_code: None,
                    }
                }
            },
        }
    }
}

impl Runner for ProcessRunner {
    fn run<'a>(
        &'a self,
        spec: &'a JobSpec,
        spool: &'a AttemptSpool,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run_attempt(spec, spool, stop))
    }
}

/// Appends to the spool and reports the first write failure (e.g. a full disk) once.
pub(super) struct LogSink<'a> {
    spool: &'a AttemptSpool,
    failed: bool,
}

impl<'a> LogSink<'a> {
    pub(super) fn new(spool: &'a AttemptSpool) -> LogSink<'a> {
        LogSink {
            spool,
            failed: false,
        }
    }

    pub(super) fn append(&mut self, stream: LogStream, data: &[u8]) {
        if let Err(error) = self.spool.append(stream, data)
            && !self.failed
        {
            self.failed = true;
            tracing::warn!(job = %self.spool.attempt().job_id, %error, "could not store job output; dropping it");
        }
    }

    pub(super) fn system(&mut self, text: &str) {
        self.append(LogStream::System, text.as_bytes());
    }
}

pub(super) fn spawn_failure() -> Outcome {
    Outcome {
        status: FinalStatus::Failed,
        reason: Some(FailReason::Spawn),
        exit_code: None,
    }
}

/// Writes the helper libraries into the work dir and starts the attempt's helper endpoint.
pub(super) fn start_helper(
    work_dir: &Path,
    spec: &JobSpec,
    spool: &AttemptSpool,
    shared: bool,
) -> io::Result<HelperServer> {
    crate::helper::write_libraries(work_dir, shared)?;
    HelperServer::start(work_dir, spec, spool.clone(), shared)
}

pub(super) fn prepare_work_dir(work_dir: &Path, script_name: &str, script: &str) -> io::Result<()> {
    match std::fs::remove_dir_all(work_dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(work_dir)?;
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(work_dir.join(script_name))?;
    io::Write::write_all(&mut file, script.as_bytes())
}

async fn read_pipe(
    pipe: &mut Option<impl AsyncRead + Unpin>,
    buffer: &mut [u8],
) -> io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.read(buffer).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits for a stop request; `None` when the sender is gone (no stop can come any more).
pub(super) async fn wait_for_stop(stop: &mut StopSignal) -> Option<StopReason> {
    match stop.wait_for(Option::is_some).await {
        Ok(reason) => *reason,
        Err(_) => None,
    }
}

/// Sends `signal` to every process of the group led by `pid`.
fn signal_group(pid: u32, signal: libc::c_int) {
    let Ok(pgid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions. The group id is the pid of a child we
    // spawned with `process_group(0)`, so the group is the job's.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

#[cfg(test)]
mod tests {
    use cronium_protocol::ScriptKind;

    use std::collections::BTreeSet;

    use cronium_protocol::RuntimeSpec;
    use tokio::sync::watch;

    use super::*;
    use crate::spool::{Spool, SpoolSpec};

    struct Fixture {
        _temp: tempfile::TempDir,
        spool: Spool,
        runner: ProcessRunner,
        work_root: PathBuf,
    }

    fn fixture() -> Fixture {
        fixture_with_env(base_environment(|name| std::env::var(name).ok()))
    }

    fn fixture_with_env(base_env: Vec<(String, String)>) -> Fixture {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let work_root = temp.path().join("work");
        let runner = ProcessRunner::new(ProcessRunnerOptions {
            work_root: work_root.clone(),
            base_env,
            kill_grace: Duration::from_millis(300),
            interpreters: Vec::new(),
        });
        Fixture {
            _temp: temp,
            spool,
            runner,
            work_root,
        }
    }

    fn spec(kind: ScriptKind, script: &str) -> JobSpec {
        JobSpec {
            job_id: "job-1".into(),
            attempt: 2,
            run_id: "run-1".into(),
            event_id: "event-1".into(),
            kind,
            script: script.into(),
            env: vec![],
            timeout_ms: 0,
            input: None,
            runtime: RuntimeSpec::Host,
        }
    }

    /// Runs a spec to its end (with a generous safety timeout) and returns the outcome and the log.
    async fn run(
        fixture: &Fixture,
        spec: &JobSpec,
        stop: StopSignal,
    ) -> (Outcome, Vec<(LogStream, String)>) {
        let spool = fixture
            .spool
            .create(
                &SpoolSpec {
                    job_id: spec.job_id.clone(),
                    attempt: spec.attempt,
                    run_id: spec.run_id.clone(),
                    event_id: spec.event_id.clone(),
                },
                1 << 20,
            )
            .unwrap();
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            fixture.runner.run(spec, &spool, stop),
        )
        .await
        .expect("the runner finished in time");
        assert!(
            !fixture.work_root.join("job-1-2").exists(),
            "the work dir is removed"
        );
        let mut reader = spool.reader(0).unwrap();
        let file_len = spool.progress().file_len;
        let mut log: Vec<(LogStream, String)> = Vec::new();
        while let Some(piece) = reader.next_piece(file_len, 1 << 20).unwrap() {
            let text = String::from_utf8(piece.data).unwrap();
            match log.last_mut() {
                Some((stream, existing)) if *stream == piece.stream => existing.push_str(&text),
                _ => log.push((piece.stream, text)),
            }
        }
        (outcome, log)
    }

    fn no_stop() -> StopSignal {
        watch::channel(None).1
    }

    fn text_of(log: &[(LogStream, String)], wanted: LogStream) -> String {
        log.iter()
            .filter(|(stream, _)| *stream == wanted)
            .map(|(_, text)| text.as_str())
            .collect()
    }

    /// Whether a process is gone (or a zombie waiting for a reaper that is not us).
    fn is_gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn exit_codes_map_to_outcomes() {
        let fixture = fixture();
        let (outcome, _) = run(&fixture, &spec(ScriptKind::Bash, "true"), no_stop()).await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Completed,
                reason: None,
                exit_code: Some(0)
            }
        );
        let (outcome, _) = run(&fixture, &spec(ScriptKind::Bash, "exit 3"), no_stop()).await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::ExitCode),
                exit_code: Some(3)
            }
        );
        let (outcome, log) = run(
            &fixture,
            &spec(ScriptKind::Bash, "kill -KILL $$"),
            no_stop(),
        )
        .await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Signal),
                exit_code: None
            }
        );
        assert!(text_of(&log, LogStream::System).contains("killed by signal 9"));
    }

    #[tokio::test]
    async fn stdout_and_stderr_are_stored_in_arrival_order() {
        let fixture = fixture();
        // The pauses only spread the writes out so their order of arrival is unambiguous.
        let script =
            "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; printf err2 >&2";
        let (outcome, log) = run(&fixture, &spec(ScriptKind::Bash, script), no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed);
        assert_eq!(
            log,
            [
                (LogStream::Stdout, "out1\n".to_owned()),
                (LogStream::Stderr, "err1\n".to_owned()),
                (LogStream::Stdout, "out2\n".to_owned()),
                (LogStream::Stderr, "err2".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn the_environment_is_scrubbed() {
        let base_env = vec![
            (
                "PATH".to_owned(),
                std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
            ),
            ("HOME".to_owned(), "/".to_owned()),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ];
        let fixture = fixture_with_env(base_env);
        let mut job = spec(ScriptKind::Bash, "env -0; echo \"$CRONIUM_JOB_ID\" >&2");
        job.env = vec![
            ("EVENT_VAR".to_owned(), "from the event".to_owned()),
            ("CRONIUM_JOB_ID".to_owned(), "forged".to_owned()),
        ];
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed);
        let names: BTreeSet<String> = text_of(&log, LogStream::Stdout)
            .split('\0')
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .split_once('=')
                    .map(|(name, _)| name)
                    .unwrap_or(entry)
                    .to_owned()
            })
            .collect();
        let expected: BTreeSet<String> = [
            "PATH",
            "HOME",
            "LANG",
            "TMPDIR",
            "CRONIUM_JOB_ID",
            "CRONIUM_RUN_ID",
            "CRONIUM_EVENT_ID",
            "CRONIUM_ATTEMPT",
            "CRONIUM_HELPER_SOCKET",
            "CRONIUM_JOB_TOKEN",
            "EVENT_VAR",
            // Bash exports these itself.
            "PWD",
            "SHLVL",
            "_",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(names, expected);
        assert!(text_of(&log, LogStream::Stdout).contains("EVENT_VAR=from the event"));
        assert_eq!(text_of(&log, LogStream::Stderr), "job-1\n");
        assert!(text_of(&log, LogStream::System).contains("CRONIUM_JOB_ID"));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let fixture = fixture();
        // The script ignores SIGTERM (and so does its background child), so the runner has to
        // escalate to SIGKILL.
        let mut job = spec(
            ScriptKind::Bash,
            "trap '' TERM; sleep 1000 & echo \"bg=$!\"; sleep 1000",
        );
        job.timeout_ms = 300;
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Failed);
        assert_eq!(outcome.reason, Some(FailReason::Timeout));
        assert!(text_of(&log, LogStream::System).contains("timed out after 300 ms"));
        let stdout = text_of(&log, LogStream::Stdout);
        let background: u32 = stdout.trim().strip_prefix("bg=").unwrap().parse().unwrap();
        assert!(
            is_gone(background),
            "the background child {background} survived"
        );
    }

    #[tokio::test]
    async fn background_leftovers_are_killed_when_the_script_exits() {
        let fixture = fixture();
        let (outcome, log) = run(
            &fixture,
            &spec(ScriptKind::Bash, "sleep 1000 & echo \"bg=$!\""),
            no_stop(),
        )
        .await;
        assert_eq!(outcome.status, FinalStatus::Completed);
        let background: u32 = text_of(&log, LogStream::Stdout)
            .trim()
            .strip_prefix("bg=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            is_gone(background),
            "the background child {background} survived"
        );
    }

    #[tokio::test]
    async fn cancel_stops_the_job() {
        let fixture = fixture();
        let (stop_sender, stop) = watch::channel(None);
        stop_sender.send_replace(Some(StopReason::Cancel));
        let (outcome, log) = run(&fixture, &spec(ScriptKind::Bash, "sleep 1000"), stop).await;
        assert_eq!(outcome.status, FinalStatus::Cancelled);
        assert!(text_of(&log, LogStream::System).contains("cancelled"));
    }

    #[tokio::test]
    async fn a_missing_interpreter_is_a_spawn_failure() {
        let fixture = fixture_with_env(vec![("PATH".to_owned(), "/nonexistent".to_owned())]);
        let (outcome, log) = run(
            &fixture,
            &spec(ScriptKind::Node, "console.log(1)"),
            no_stop(),
        )
        .await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Spawn),
                exit_code: None
            }
        );
        assert!(text_of(&log, LogStream::System).contains("could not start node"));
    }
}
