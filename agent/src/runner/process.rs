//! The process runner: a script run directly on the host, in its own process group.
//!
//! Every attempt gets a private work dir `<work_root>/<job_id>-<attempt>/` holding the script,
//! a scrubbed environment and its own process group. Timeouts and cancellation signal the whole
//! group (SIGTERM, then SIGKILL after a grace period), and when the main process exits the group
//! is killed so background leftovers cannot outlive the attempt. The child is always waited for.
//!
//! The spec's [`HostSpec`] may name a `user` and limits. The user is resolved and checked against
//! the agent's `--allow-run-as` list before anything starts ([`super::run_as`]); the work dir,
//! the helper dir and its socket are then handed to that user, and the child switches to it
//! between fork and exec, with HOME, USER and LOGNAME set for it. Limits go into a cgroup per
//! attempt ([`super::cgroup`]) which the child joins before exec, so no process of the attempt
//! ever runs outside it; at the end everything left in the cgroup is killed, and an OOM kill
//! ends the attempt `failed`, reason `oom`. Limits the host cannot apply are named in the job
//! log and the job runs without them.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use cronium_protocol::{FailReason, FinalStatus, HostSpec, JobSpec, LogStream, RuntimeSpec};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

use super::cgroup::{Cgroups, JobCgroup, cgroup_name, not_applied_message};
use super::run_as::{self, AgentUser, TargetUser};
use super::{Runner, StopReason, StopSignal};
use crate::helper::HelperServer;
use crate::helper::forward::HelperLink;
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
    /// Where the helper endpoints send the calls that need the control plane.
    pub helper_link: HelperLink,
    /// Users (names or uids) host jobs may run as besides the agent's own (`--allow-run-as`).
    pub allow_run_as: Vec<String>,
    /// The cgroup controllers host job limits can use (probed at start).
    pub cgroups: Cgroups,
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
        let mut cgroup = None;
        let outcome = self.run_in(spec, spool, stop, &work_dir, &mut cgroup).await;
        // Kill what is left in the cgroup before the work dir goes.
        if let Some(cgroup) = cgroup {
            cgroup.remove().await;
        }
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
        cgroup_slot: &mut Option<JobCgroup>,
    ) -> Outcome {
        let mut log = LogSink::new(spool);
        let (program, script_name) = super::interpreter(spec.kind);
        let default_host = HostSpec::default();
        let host = match &spec.runtime {
            RuntimeSpec::Host(host) => host,
            RuntimeSpec::Docker(_) | RuntimeSpec::Http(_) => &default_host,
        };
        let target = match &host.user {
            None => None,
            Some(user) => {
                match run_as::resolve(user, &self.options.allow_run_as, AgentUser::current()) {
                    Ok(target) => target,
                    Err(message) => {
                        log.system(&format!("[cronium: {message}]\n"));
                        return spawn_failure();
                    }
                }
            }
        };
        if let Err(error) = prepare_work_dir(work_dir, script_name, &spec.script) {
            log.system(&format!(
                "[cronium: could not prepare the work dir: {error}]\n"
            ));
            return spawn_failure();
        }
        // Lives until the end of this function: the endpoint goes away with the attempt.
        let helper = match start_helper(work_dir, spec, spool, false, &self.options.helper_link) {
            Ok(helper) => helper,
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not start the runtime helpers: {error}]\n"
                ));
                return spawn_failure();
            }
        };
        if let Some(target) = &target
            && let Err(error) = target.take_over(work_dir)
        {
            log.system(&format!(
                "[cronium: could not give the work dir to user {}: {error}]\n",
                target.name
            ));
            return spawn_failure();
        }
        match self
            .options
            .cgroups
            .create(&cgroup_name(&attempt_dir_name(spool.attempt())), host)
        {
            Ok((cgroup, missing)) => {
                if !missing.is_empty() {
                    log.system(&not_applied_message(&missing));
                }
                *cgroup_slot = cgroup;
            }
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not set up the job's cgroup for its limits: {error}]\n"
                ));
                return spawn_failure();
            }
        }
        let cgroup = cgroup_slot.as_ref();

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
        if let Some(target) = &target {
            command
                .env("HOME", &target.home)
                .env("USER", &target.name)
                .env("LOGNAME", &target.name);
        }
        if let Err(error) = install_pre_exec(&mut command, cgroup, target.as_ref(), work_dir) {
            log.system(&format!(
                "[cronium: could not prepare the process: {error}]\n"
            ));
            return spawn_failure();
        }
        let mut ignored = Vec::new();
        for (name, value) in spec.env.iter().chain(&spec.secret_env.0) {
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
                let as_user = target
                    .as_ref()
                    .map(|target| format!(" as user {}", target.name))
                    .unwrap_or_default();
                log.system(&format!(
                    "[cronium: could not start {}{as_user}: {error}]\n",
                    program.display()
                ));
                if let Some(target) = &target
                    && error.kind() == io::ErrorKind::PermissionDenied
                    && let Some((dir, mode)) = target.unreachable_parent(work_dir)
                {
                    log.system(&format!(
                        "[cronium: user {} cannot reach the work dir: {} (mode {mode:04o}) is not \
                         searchable for it; every parent of the agent's work dir needs search \
                         permission for other users (e.g. mode 0711)]\n",
                        target.name,
                        dir.display()
                    ));
                }
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
                    signal_job(pid, cgroup, libc::SIGKILL);
                    drain_until = Some(Instant::now() + DRAIN_WAIT);
                },
                _ = sleep_until_some(timeout_at), if kill_cause.is_none() && exited.is_none() => {
                    kill_cause = Some(KillCause::Timeout);
                    log.system(&format!("\n[cronium: timed out after {} ms]\n", spec.timeout_ms));
                    signal_job(pid, cgroup, libc::SIGTERM);
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
                            signal_job(pid, cgroup, libc::SIGTERM);
                            sigkill_at = Some(Instant::now() + self.options.kill_grace);
                        }
                        StopReason::Abandon => signal_job(pid, cgroup, libc::SIGKILL),
                        StopReason::Shutdown => {
                            log.system("\n[cronium: killed because the agent is stopping]\n");
                            signal_job(pid, cgroup, libc::SIGKILL);
                        }
                    }
                },
                _ = sleep_until_some(sigkill_at), if sigkill_at.is_some() && exited.is_none() => {
                    signal_job(pid, cgroup, libc::SIGKILL);
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
        let oom_killed =
            cgroup.is_some_and(|cgroup| cgroup.oom_killed(status.signal() == Some(libc::SIGKILL)));
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
            None if oom_killed && !status.success() => {
                log.system(&format!(
                    "\n[cronium: the job ran out of memory (limit {} MiB) and was killed]\n",
                    host.memory_mb.unwrap_or_default()
                ));
                Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::Oom),
                    exit_code: status.code(),
                }
            }
            None if oom_killed => {
                log.system("\n[cronium: a process of the job ran out of memory and was killed]\n");
                Outcome {
                    status: FinalStatus::Completed,
                    reason: None,
                    exit_code: Some(0),
                }
            }
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
    link: &HelperLink,
) -> io::Result<HelperServer> {
    crate::helper::write_libraries(work_dir, shared)?;
    HelperServer::start(work_dir, spec, spool.clone(), shared, link.clone())
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

/// Sends `signal` to the job's process group and to every process in its cgroup (which also
/// reaches processes that left the group).
fn signal_job(pid: u32, cgroup: Option<&JobCgroup>, signal: libc::c_int) {
    signal_group(pid, signal);
    if let Some(cgroup) = cgroup {
        cgroup.signal_all(signal);
    }
}

/// Makes the child join the attempt's cgroup and switch to its user between fork and exec (only
/// when needed: without a `pre_exec` hook the standard library can use the cheaper
/// `posix_spawn`).
fn install_pre_exec(
    command: &mut Command,
    cgroup: Option<&JobCgroup>,
    target: Option<&TargetUser>,
    work_dir: &Path,
) -> io::Result<()> {
    if cgroup.is_none() && target.is_none() {
        return Ok(());
    }
    // Everything is prepared here, before the fork; the hook only makes system calls.
    let procs = cgroup.map(JobCgroup::procs_fds).unwrap_or_default();
    let switch = target.map(|target| target.switch(work_dir)).transpose()?;
    // SAFETY: the hook runs in the child between fork and exec and only calls async-signal-safe
    // functions (write, setgroups, setgid, setuid, chdir) on data prepared above; the cgroup's
    // descriptors stay open in the parent until the spawn returned.
    unsafe {
        command.pre_exec(move || {
            super::cgroup::join_self(&procs)?;
            if let Some(switch) = &switch {
                switch.apply()?;
            }
            Ok(())
        });
    }
    Ok(())
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
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;

    use cronium_protocol::{RuntimeSpec, ScriptKind};
    use tokio::sync::watch;

    use super::*;
    use crate::runner::cgroup::Controller;
    use crate::runner::test_support::{Log, is_gone, no_stop, run_to_end};
    use crate::spool::Spool;

    struct Fixture {
        temp: tempfile::TempDir,
        spool: Spool,
        runner: ProcessRunner,
        work_root: PathBuf,
    }

    fn fixture() -> Fixture {
        fixture_with(
            base_environment(|name| std::env::var(name).ok()),
            Vec::new(),
            Cgroups::none(),
        )
    }

    fn fixture_with_env(base_env: Vec<(String, String)>) -> Fixture {
        fixture_with(base_env, Vec::new(), Cgroups::none())
    }

    fn fixture_with(
        base_env: Vec<(String, String)>,
        allow_run_as: Vec<String>,
        cgroups: Cgroups,
    ) -> Fixture {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let work_root = temp.path().join("work");
        let runner = ProcessRunner::new(ProcessRunnerOptions {
            work_root: work_root.clone(),
            base_env,
            kill_grace: Duration::from_millis(300),
            interpreters: Vec::new(),
            helper_link: HelperLink::offline(),
            allow_run_as,
            cgroups,
        });
        Fixture {
            temp,
            spool,
            runner,
            work_root,
        }
    }

    /// A fixture whose work dirs other users can reach (as the agent's state dir is with
    /// `--allow-run-as`), allowing jobs to run as `nobody`.
    fn run_as_fixture(allow: &[&str]) -> Fixture {
        require_root();
        let fixture = fixture_with(
            base_environment(|name| std::env::var(name).ok()),
            allow.iter().map(|user| (*user).to_owned()).collect(),
            Cgroups::none(),
        );
        std::fs::create_dir(&fixture.work_root).unwrap();
        for dir in [fixture.temp.path(), &fixture.work_root] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        fixture
    }

    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test runs jobs as another user and needs root (CI runs as root)"
        );
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
            runtime: RuntimeSpec::default(),
            secret_env: Default::default(),
        }
    }

    fn host_spec(job_id: &str, script: &str, host: HostSpec) -> JobSpec {
        JobSpec {
            job_id: job_id.into(),
            runtime: RuntimeSpec::Host(host),
            ..spec(ScriptKind::Bash, script)
        }
    }

    /// Runs a spec to its end (with a generous safety timeout) and returns the outcome and the
    /// log; the work dir must be gone afterwards.
    async fn run(fixture: &Fixture, spec: &JobSpec, stop: StopSignal) -> (Outcome, Log) {
        let result = run_to_end(
            &fixture.runner,
            &fixture.spool,
            spec,
            stop,
            Duration::from_secs(30),
        )
        .await;
        let work_dir = fixture
            .work_root
            .join(format!("{}-{}", spec.job_id, spec.attempt));
        assert!(!work_dir.exists(), "the work dir is removed");
        result
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
        assert!(log.system.contains("killed by signal 9"));
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
            log.pieces,
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
        let names: BTreeSet<String> = log
            .stdout
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
        assert!(log.stdout.contains("EVENT_VAR=from the event"));
        assert_eq!(log.stderr, "job-1\n");
        assert!(log.system.contains("CRONIUM_JOB_ID"));
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
        assert!(log.system.contains("timed out after 300 ms"));
        let background: u32 = log
            .stdout
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
    async fn background_leftovers_are_killed_when_the_script_exits() {
        let fixture = fixture();
        let (outcome, log) = run(
            &fixture,
            &spec(ScriptKind::Bash, "sleep 1000 & echo \"bg=$!\""),
            no_stop(),
        )
        .await;
        assert_eq!(outcome.status, FinalStatus::Completed);
        let background: u32 = log
            .stdout
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
        assert!(log.system.contains("cancelled"));
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
        assert!(log.system.contains("could not start node"));
    }

    fn limits(memory_mb: Option<u64>, pids: Option<u32>) -> HostSpec {
        HostSpec {
            user: None,
            memory_mb,
            cpus: None,
            pids,
        }
    }

    #[tokio::test]
    async fn limits_without_a_cgroup_controller_are_named_once_and_the_job_runs() {
        let fixture = fixture();
        let job = host_spec(
            "job-no-cgroups",
            "echo ran",
            HostSpec {
                cpus: Some(0.5),
                ..limits(Some(64), Some(50))
            },
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        assert_eq!(log.stdout, "ran\n");
        assert_eq!(
            log.system,
            "[cronium: memory, pids and cpu limits not applied: this host offers no writable \
             cgroup memory/pids/cpu controllers (cgroup v2 with delegation, or the cgroup v1 \
             memory/pids/cpu hierarchy)]\n"
        );
    }

    /// The probed cgroups; where this host has a cgroup v1 hierarchy for `controller` and the
    /// test runs as root, the probe must have found it (so a broken probe cannot pass as "this
    /// host has no cgroups").
    fn probed_cgroups(controller: Controller) -> Cgroups {
        let cgroups = Cgroups::probe();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let v1 = Path::new("/sys/fs/cgroup")
            .join(controller.name())
            .join("cgroup.procs")
            .exists();
        if root && v1 {
            assert!(
                cgroups.place(controller).is_some(),
                "this host has a cgroup v1 {} hierarchy and the test runs as root, but the probe \
                 found no usable place: {cgroups:?}",
                controller.name()
            );
        }
        cgroups
    }

    #[tokio::test]
    async fn a_memory_hog_ends_failed_oom_and_its_cgroup_goes() {
        let cgroups = probed_cgroups(Controller::Memory);
        let place = cgroups.memory.clone();
        let fixture = fixture_with(
            base_environment(|name| std::env::var(name).ok()),
            Vec::new(),
            cgroups,
        );
        let job = host_spec(
            "job-oom",
            "cat /proc/self/cgroup; python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'",
            limits(Some(32), None),
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        match place {
            Some(place) => {
                assert_eq!(outcome.status, FinalStatus::Failed, "{log:?}");
                assert_eq!(outcome.reason, Some(FailReason::Oom), "{log:?}");
                assert!(
                    log.system
                        .contains("ran out of memory (limit 32 MiB) and was killed"),
                    "{log:?}"
                );
                assert!(log.stdout.contains("/cronium-job-oom-2"), "{log:?}");
                assert!(!log.stdout.contains("209715200"), "{log:?}");
                assert!(
                    !place.parent.join("cronium-job-oom-2").exists(),
                    "the cgroup is removed"
                );
            }
            None => {
                assert!(log.system.contains("memory limit not applied"), "{log:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_fork_bomb_is_bounded_by_the_pids_limit_and_escapees_are_killed() {
        let cgroups = probed_cgroups(Controller::Pids);
        let place = cgroups.pids.clone();
        let fixture = fixture_with(
            base_environment(|name| std::env::var(name).ok()),
            Vec::new(),
            cgroups,
        );
        // Each child leaves the job's process group (setsid), so only the cgroup still finds it.
        let script = r#"python3 -c '
import os, time
started, refused = [], 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        os.setsid()
        time.sleep(1000)
        os._exit(0)
    started.append(pid)
print("started", len(started), "refused", refused)
print("pids", *started)
'"#;
        let job = host_spec("job-pids", script, limits(None, Some(20)));
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        let counts: Vec<usize> = log
            .stdout
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect();
        let started: Vec<u32> = log
            .stdout
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|pid| pid.parse().unwrap())
            .collect();
        match place {
            Some(place) => {
                assert!(counts[0] < 20 && counts[1] > 0, "{log:?}");
                assert!(
                    !place.parent.join("cronium-job-pids-2").exists(),
                    "the cgroup is removed"
                );
                for pid in &started {
                    assert!(is_gone(*pid), "the escaped child {pid} survived");
                }
            }
            None => {
                assert!(log.system.contains("pids limit not applied"), "{log:?}");
                // Without a cgroup nothing finds children that left the group: clean up.
                for pid in &started {
                    // SAFETY: kill has no memory-safety preconditions; these are our children's
                    // children, printed by the job.
                    unsafe {
                        libc::kill(*pid as i32, libc::SIGKILL);
                    }
                }
            }
        }
        // The agent is fine: the next job runs.
        let (outcome, log) = run(&fixture, &spec(ScriptKind::Bash, "echo next"), no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed);
        assert_eq!(log.stdout, "next\n");
    }

    #[tokio::test]
    async fn a_job_runs_as_an_allowed_user_and_can_use_its_work_dir_and_helpers() {
        let fixture = run_as_fixture(&["nobody"]);
        let nobody = run_as::user_by_name("nobody").unwrap().unwrap();
        let job = host_spec(
            "job-nobody",
            "id -u; id -g; echo \"$HOME $USER $LOGNAME\"; \
             echo written > file && cat file; echo temp > \"$TMPDIR/t\" && cat \"$TMPDIR/t\"; \
             . ./cronium.sh && cronium_event",
            HostSpec {
                user: Some("nobody".into()),
                ..HostSpec::default()
            },
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        let lines: Vec<&str> = log.stdout.lines().collect();
        assert_eq!(
            lines[..5],
            [
                nobody.uid.to_string().as_str(),
                nobody.gid.to_string().as_str(),
                format!("{} nobody nobody", nobody.home.display()).as_str(),
                "written",
                "temp",
            ],
            "{log:?}"
        );
        assert!(lines[5].contains("\"job_id\":\"job-nobody\""), "{log:?}");
    }

    #[tokio::test]
    async fn a_user_outside_the_allow_list_is_refused() {
        let fixture = run_as_fixture(&[]);
        let job = host_spec(
            "job-refused",
            "echo never",
            HostSpec {
                user: Some("nobody".into()),
                ..HostSpec::default()
            },
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Spawn),
                exit_code: None
            }
        );
        assert_eq!(log.stdout, "");
        assert!(
            log.system
                .contains("user nobody is not allowed on this agent")
                && log.system.contains("--allow-run-as"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_user_is_refused() {
        let fixture = run_as_fixture(&["no-such-user-cronium"]);
        let job = host_spec(
            "job-unknown",
            "echo never",
            HostSpec {
                user: Some("no-such-user-cronium".into()),
                ..HostSpec::default()
            },
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.reason, Some(FailReason::Spawn), "{log:?}");
        assert!(
            log.system
                .contains("no user named \"no-such-user-cronium\" exists on this host"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_work_dir_the_user_cannot_reach_is_explained() {
        let fixture = run_as_fixture(&["nobody"]);
        std::fs::set_permissions(fixture.temp.path(), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let job = host_spec(
            "job-unreachable",
            "echo never",
            HostSpec {
                user: Some("nobody".into()),
                ..HostSpec::default()
            },
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.reason, Some(FailReason::Spawn), "{log:?}");
        assert!(
            log.system.contains(&format!(
                "user nobody cannot reach the work dir: {} (mode 0700)",
                fixture.temp.path().display()
            )),
            "{log:?}"
        );
    }
}
