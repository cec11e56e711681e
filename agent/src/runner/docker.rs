//! The Docker runner: a script run in a throwaway container of the local Docker engine.
//!
//! Every attempt gets the same private work dir as on the host (`<work_root>/<job_id>-<attempt>/`),
//! bind-mounted at `/job` (the container's working dir). The container carries the labels
//! `cronium.agent`, `cronium.job` and `cronium.attempt`, gets the spec's limits (memory with equal
//! swap so a hog is OOM-killed, CPUs, PIDs), network, read-only root (with a tmpfs `/tmp`) and
//! user, and is always force-removed at the end; containers a crashed agent left behind are found
//! by the agent label and removed at start ([`DockerRunner::remove_leftovers`]).
//!
//! The image is pulled when the engine lacks it, with progress lines in the job log. Timeout and
//! cancel kill the container (SIGKILL: PID 1 of a container ignores SIGTERM unless it handles it).
//! A container the kernel OOM-killed ends the attempt `failed`, reason `oom`.
//!
//! Secrets: the event's environment and the helper token (`CRONIUM_JOB_TOKEN`) are not passed as
//! container environment (which `docker inspect` shows) but written to `/job/.cronium-env` (mode 0600, or 0644 when a
//! non-root `user` is set; the work root itself is private to the agent), which `/bin/sh`
//! sources and deletes before it `exec`s the interpreter. What `docker inspect` still shows: the
//! image, the command (`/bin/sh -c … <interpreter> <script file>`), the labels, the limits and
//! the `CRONIUM_*` ids. The image therefore needs `/bin/sh` and the interpreter on its PATH.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, KillContainerOptions,
    ListContainersOptions, RemoveContainerOptions,
};
use cronium_protocol::{DockerNetwork, DockerSpec, FailReason, FinalStatus, JobSpec, LogStream};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::process::{
    LogSink, prepare_work_dir, sleep_until_some, spawn_failure, start_helper, wait_for_stop,
};
use super::{Runner, StopReason, StopSignal};
use crate::helper::forward::HelperLink;
use crate::helper::{HELPER_DIR, SOCKET_NAME};
use crate::spool::{AttemptSpool, Outcome, attempt_dir_name};

/// Label naming the agent that made a container.
pub const LABEL_AGENT: &str = "cronium.agent";
/// Label naming the job a container runs.
pub const LABEL_JOB: &str = "cronium.job";
/// Label naming the attempt a container runs.
pub const LABEL_ATTEMPT: &str = "cronium.attempt";

/// Where the attempt's work dir is mounted in the container.
const JOB_DIR: &str = "/job";

/// The file in the work dir holding the event's environment until the shell sourced it.
const ENV_FILE: &str = ".cronium-env";

/// How long Docker API calls other than the attempt's own streams may take.
const API_TIMEOUT_SECS: u64 = 60;

/// Settings of the Docker runner.
#[derive(Debug, Clone)]
pub struct DockerRunnerOptions {
    /// Parent of the per-attempt work dirs (`<state>/work`).
    pub work_root: PathBuf,
    /// The agent's id, written into the `cronium.agent` label.
    pub agent_id: String,
    /// Where the helper endpoints send the calls that need the control plane.
    pub helper_link: HelperLink,
}

/// Runs scripts in Docker containers. Without an engine (`docker` is `None`) every Docker
/// attempt fails at once with reason `spawn`.
#[derive(Debug, Clone)]
pub struct DockerRunner {
    options: DockerRunnerOptions,
    docker: Option<Docker>,
}

/// Connects to the local engine (honouring `DOCKER_HOST=unix://…`), negotiates the API version
/// and pings it. `Err` says why there is no usable engine.
pub async fn connect() -> Result<Docker, String> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|error| format!("cannot connect to Docker: {error}"))?
        .with_timeout(Duration::from_secs(API_TIMEOUT_SECS));
    let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
        .await
        .map_err(|_| "the Docker engine did not answer in time".to_owned())?
        .map_err(|error| format!("the Docker engine is not reachable: {error}"))?;
    tokio::time::timeout(Duration::from_secs(10), docker.ping())
        .await
        .map_err(|_| "the Docker engine did not answer in time".to_owned())?
        .map_err(|error| format!("the Docker engine is not reachable: {error}"))?;
    Ok(docker)
}

/// Why the runner killed the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillCause {
    Timeout,
    Stop(StopReason),
}

impl DockerRunner {
    /// A runner using `docker` (`None`: no engine is available).
    pub fn new(options: DockerRunnerOptions, docker: Option<Docker>) -> DockerRunner {
        DockerRunner { options, docker }
    }

    /// Whether an engine answered when the runner was made.
    pub fn available(&self) -> bool {
        self.docker.is_some()
    }

    /// Force-removes every container labelled with this agent's id (left by a crashed agent);
    /// returns how many were removed.
    pub async fn remove_leftovers(&self) -> usize {
        let Some(docker) = &self.docker else {
            return 0;
        };
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_AGENT}={}", self.options.agent_id)],
        )]);
        let containers = match docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
        {
            Ok(containers) => containers,
            Err(error) => {
                tracing::warn!(%error, "could not list leftover containers");
                return 0;
            }
        };
        let mut removed = 0;
        for container in containers {
            let Some(id) = container.id else { continue };
            match remove(docker, &id).await {
                Ok(()) => removed += 1,
                Err(error) => {
                    tracing::warn!(container = %id, %error, "could not remove a leftover container")
                }
            }
        }
        removed
    }

    async fn run_attempt(&self, spec: &JobSpec, spool: &AttemptSpool, stop: StopSignal) -> Outcome {
        let mut log = LogSink::new(spool);
        let cronium_protocol::RuntimeSpec::Docker(docker_spec) = &spec.runtime else {
            log.system("[cronium: the Docker runner was given a host job]\n");
            return spawn_failure();
        };
        let Some(docker) = &self.docker else {
            log.system("[cronium: this agent has no reachable Docker engine]\n");
            return spawn_failure();
        };
        let work_dir = self
            .options
            .work_root
            .join(attempt_dir_name(spool.attempt()));
        let mut container = None;
        let outcome = self
            .run_in(
                docker,
                spec,
                docker_spec,
                spool,
                &mut log,
                stop,
                &work_dir,
                &mut container,
            )
            .await;
        if let Some(id) = container
            && let Err(error) = remove(docker, &id).await
        {
            tracing::warn!(container = %id, %error, "could not remove a job container");
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

    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &self,
        docker: &Docker,
        spec: &JobSpec,
        docker_spec: &DockerSpec,
        spool: &AttemptSpool,
        log: &mut LogSink<'_>,
        mut stop: StopSignal,
        work_dir: &Path,
        container: &mut Option<String>,
    ) -> Outcome {
        let (program, script_name) = super::interpreter(spec.kind);
        let shared = docker_spec.user.is_some();
        if let Err(error) = prepare_docker_work_dir(work_dir, script_name, spec, shared) {
            log.system(&format!(
                "[cronium: could not prepare the work dir: {error}]\n"
            ));
            return spawn_failure();
        }
        // Lives until the end of this function: the endpoint goes away with the attempt.
        let helper = match start_helper(work_dir, spec, spool, shared, &self.options.helper_link) {
            Ok(helper) => helper,
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not start the runtime helpers: {error}]\n"
                ));
                return spawn_failure();
            }
        };
        if let Err(error) = write_env_file(work_dir, spec, shared, helper.token(), log) {
            log.system(&format!(
                "[cronium: could not prepare the work dir: {error}]\n"
            ));
            return spawn_failure();
        }
        if let Err(message) = ensure_image(docker, &docker_spec.image, log).await {
            log.system(&format!("[cronium: {message}]\n"));
            return spawn_failure();
        }

        let config = container_config(
            spec,
            docker_spec,
            &self.options.agent_id,
            work_dir,
            program,
            script_name,
        );
        let id = match docker
            .create_container(None::<CreateContainerOptions>, config)
            .await
        {
            Ok(created) => created.id,
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not create the container: {error}]\n"
                ));
                return spawn_failure();
            }
        };
        *container = Some(id.clone());
        let mut output = match docker
            .attach_container(
                &id,
                Some(AttachContainerOptions {
                    stream: true,
                    stdout: true,
                    stderr: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(attached) => attached.output,
            Err(error) => {
                log.system(&format!(
                    "[cronium: could not attach to the container: {error}]\n"
                ));
                return spawn_failure();
            }
        };
        if let Err(error) = docker.start_container(&id, None).await {
            log.system(&format!(
                "[cronium: could not start the container: {error}]\n"
            ));
            return spawn_failure();
        }
        match docker.inspect_container(&id, None).await {
            Ok(inspect) => {
                if let Some(pid) = inspect
                    .state
                    .and_then(|state| state.pid)
                    .and_then(|pid| u32::try_from(pid).ok())
                    .filter(|pid| *pid > 0)
                    && let Err(error) = spool.record_pid(pid)
                {
                    tracing::warn!(%error, "could not record the pid of a job");
                }
            }
            Err(error) => tracing::warn!(%error, "could not inspect a job container"),
        }

        let timeout_at =
            (spec.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(spec.timeout_ms));
        let mut kill_cause: Option<KillCause> = None;
        let mut stop_closed = false;
        loop {
            tokio::select! {
                item = output.next() => match item {
                    Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                        log.append(LogStream::Stdout, &message)
                    }
                    Some(Ok(LogOutput::StdErr { message })) => log.append(LogStream::Stderr, &message),
                    Some(Ok(LogOutput::StdIn { .. })) => {}
                    Some(Err(error)) => {
                        tracing::warn!(%error, "lost the output stream of a job container");
                        break;
                    }
                    None => break,
                },
                _ = sleep_until_some(timeout_at), if kill_cause.is_none() => {
                    kill_cause = Some(KillCause::Timeout);
                    log.system(&format!("\n[cronium: timed out after {} ms]\n", spec.timeout_ms));
                    kill(docker, &id).await;
                },
                reason = wait_for_stop(&mut stop), if kill_cause.is_none() && !stop_closed => {
                    let Some(reason) = reason else {
                        stop_closed = true;
                        continue;
                    };
                    kill_cause = Some(KillCause::Stop(reason));
                    match reason {
                        StopReason::Cancel => log.system("\n[cronium: cancelled]\n"),
                        StopReason::Abandon => {}
                        StopReason::Shutdown => {
                            log.system("\n[cronium: killed because the agent is stopping]\n")
                        }
                    }
                    kill(docker, &id).await;
                },
            }
        }

        // The output stream ends when the container stops; wait for its final state.
        let mut waits = docker.wait_container(&id, None);
        let _ = tokio::time::timeout(Duration::from_secs(API_TIMEOUT_SECS), waits.next()).await;
        let state = match docker.inspect_container(&id, None).await {
            Ok(inspect) => inspect.state.unwrap_or_default(),
            Err(error) => {
                log.system(&format!(
                    "\n[cronium: could not inspect the container: {error}]\n"
                ));
                return Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::Lost),
                    exit_code: None,
                };
            }
        };
        if state.running == Some(true) {
            // The output stream broke while the script still ran.
            kill(docker, &id).await;
            log.system("\n[cronium: lost the container's output; killed it]\n");
            return Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Lost),
                exit_code: None,
            };
        }
        let exit_code = state.exit_code.and_then(|code| i32::try_from(code).ok());
        match kill_cause {
            Some(KillCause::Timeout) => Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Timeout),
                exit_code,
            },
            Some(KillCause::Stop(StopReason::Cancel | StopReason::Abandon)) => Outcome {
                status: FinalStatus::Cancelled,
                reason: None,
                exit_code,
            },
            Some(KillCause::Stop(StopReason::Shutdown)) => Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Lost),
                exit_code,
            },
            None if state.oom_killed == Some(true) => {
                log.system("\n[cronium: the container ran out of memory and was killed]\n");
                Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::Oom),
                    exit_code,
                }
            }
            None => match exit_code {
                Some(0) => Outcome {
                    status: FinalStatus::Completed,
                    reason: None,
                    exit_code: Some(0),
                },
                _ => Outcome {
                    status: FinalStatus::Failed,
                    reason: Some(FailReason::ExitCode),
                    exit_code,
                },
            },
        }
    }
}

impl Runner for DockerRunner {
    fn run<'a>(
        &'a self,
        spec: &'a JobSpec,
        spool: &'a AttemptSpool,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run_attempt(spec, spool, stop))
    }
}

/// The container for one attempt.
fn container_config(
    spec: &JobSpec,
    docker_spec: &DockerSpec,
    agent_id: &str,
    work_dir: &Path,
    program: &str,
    script_name: &str,
) -> ContainerCreateBody {
    let labels = HashMap::from([
        (LABEL_AGENT.to_owned(), agent_id.to_owned()),
        (LABEL_JOB.to_owned(), spec.job_id.clone()),
        (LABEL_ATTEMPT.to_owned(), spec.attempt.to_string()),
    ]);
    let memory = docker_spec
        .memory_mb
        .map(|mb| i64::try_from(mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        binds: Some(vec![format!("{}:{JOB_DIR}", work_dir.display())]),
        memory,
        // Swap equal to memory: no swap, so a memory hog is OOM-killed instead of swapping.
        memory_swap: memory,
        nano_cpus: docker_spec.cpus.map(|cpus| (cpus * 1e9).round() as i64),
        pids_limit: docker_spec.pids.map(i64::from),
        network_mode: Some(
            match docker_spec.network {
                DockerNetwork::None => "none",
                DockerNetwork::Bridge => "bridge",
            }
            .to_owned(),
        ),
        readonly_rootfs: Some(docker_spec.read_only),
        tmpfs: docker_spec
            .read_only
            .then(|| HashMap::from([("/tmp".to_owned(), "rw,nosuid,nodev".to_owned())])),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        ..Default::default()
    };
    let env_file = format!("{JOB_DIR}/{ENV_FILE}");
    let command = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!(
            "if [ -f {env_file} ]; then set -a; . {env_file}; set +a; rm -f {env_file}; fi; exec \"$0\" \"$@\""
        ),
        program.to_owned(),
        script_name.to_owned(),
    ];
    ContainerCreateBody {
        image: Some(docker_spec.image.clone()),
        entrypoint: Some(Vec::new()),
        cmd: Some(command),
        working_dir: Some(JOB_DIR.to_owned()),
        user: docker_spec.user.clone(),
        env: Some(vec![
            format!("CRONIUM_JOB_ID={}", spec.job_id),
            format!("CRONIUM_RUN_ID={}", spec.run_id),
            format!("CRONIUM_EVENT_ID={}", spec.event_id),
            format!("CRONIUM_ATTEMPT={}", spec.attempt),
            format!("CRONIUM_HELPER_SOCKET={JOB_DIR}/{HELPER_DIR}/{SOCKET_NAME}"),
            format!(
                "TMPDIR={}",
                if docker_spec.read_only {
                    "/tmp"
                } else {
                    JOB_DIR
                }
            ),
        ]),
        labels: Some(labels),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        tty: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Writes the script and the environment file; `shared` opens the dir to a non-root container
/// user (the work root above it stays private to the agent).
fn prepare_docker_work_dir(
    work_dir: &Path,
    script_name: &str,
    spec: &JobSpec,
    shared: bool,
) -> io::Result<()> {
    prepare_work_dir(work_dir, script_name, &spec.script)?;
    if shared {
        std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o777))?;
        std::fs::set_permissions(
            work_dir.join(script_name),
            std::fs::Permissions::from_mode(0o644),
        )?;
    }
    Ok(())
}

/// Writes the event's environment and the helper token into the env file the shell sources.
fn write_env_file(
    work_dir: &Path,
    spec: &JobSpec,
    shared: bool,
    token: &str,
    log: &mut LogSink<'_>,
) -> io::Result<()> {
    let file_mode = if shared { 0o644 } else { 0o600 };
    let mut ignored = Vec::new();
    // The token is hex, so it needs no quoting beyond the plain single quotes.
    let mut text = format!("CRONIUM_JOB_TOKEN='{token}'\n");
    for (name, value) in spec.env.iter().chain(&spec.secret_env.0) {
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
            && name
                .chars()
                .all(|char| char.is_ascii_alphanumeric() || char == '_');
        if name.starts_with("CRONIUM_") || !valid_name || value.contains('\0') {
            ignored.push(name.escape_debug().to_string());
            continue;
        }
        text.push_str(name);
        text.push_str("='");
        text.push_str(&value.replace('\'', "'\\''"));
        text.push_str("'\n");
    }
    if !ignored.is_empty() {
        log.system(&format!(
            "[cronium: ignored reserved or invalid environment variables: {}]\n",
            ignored.join(", ")
        ));
    }
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(file_mode)
        .open(work_dir.join(ENV_FILE))?;
    io::Write::write_all(&mut file, text.as_bytes())
}

/// Makes sure the engine has `image`, pulling it (with progress lines in the log) when missing.
async fn ensure_image(docker: &Docker, image: &str, log: &mut LogSink<'_>) -> Result<(), String> {
    match docker.inspect_image(image).await {
        Ok(_) => return Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(error) => return Err(format!("the Docker engine is not usable: {error}")),
    }
    log.system(&format!("[cronium: pulling image {image}]\n"));
    let mut pull = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        }),
        None,
        None,
    );
    // Progress updates repeat the same status many times per layer; log each change once.
    let mut last_status: HashMap<String, String> = HashMap::new();
    while let Some(item) = pull.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail.and_then(|detail| detail.message) {
                    return Err(format!("could not pull image {image}: {detail}"));
                }
                let Some(status) = info.status else { continue };
                let id = info.id.unwrap_or_default();
                if last_status.get(&id) != Some(&status) {
                    if id.is_empty() {
                        log.system(&format!("[cronium: {status}]\n"));
                    } else {
                        log.system(&format!("[cronium: {id}: {status}]\n"));
                    }
                    last_status.insert(id, status);
                }
            }
            Err(error) => return Err(format!("could not pull image {image}: {error}")),
        }
    }
    Ok(())
}

async fn kill(docker: &Docker, id: &str) {
    if let Err(error) = docker
        .kill_container(
            id,
            Some(KillContainerOptions {
                signal: "KILL".to_owned(),
            }),
        )
        .await
    {
        // It may have exited meanwhile (409 / 404).
        tracing::debug!(container = %id, %error, "could not kill a job container");
    }
}

async fn remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    match docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
    {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    //! These tests need a Docker engine (`DOCKER_HOST`; `cargo xtask test` starts one).
    //! They run in the tiny image the end-to-end harness builds locally, so nothing is pulled.

    use cronium_e2e::docker::{TEST_IMAGE, require_engine};
    use cronium_protocol::{RuntimeSpec, ScriptKind};
    use tokio::sync::watch;

    use super::*;
    use crate::runner::test_support::{Log, no_stop, run_to_end};
    use crate::spool::Spool;

    /// Runs the docker CLI and returns its stdout; panics with its stderr on failure.
    fn docker_cli(args: &[&str]) -> String {
        cronium_e2e::docker::docker_cli(args).unwrap()
    }

    struct Fixture {
        _temp: tempfile::TempDir,
        spool: Spool,
        runner: DockerRunner,
        agent_id: String,
    }

    async fn fixture() -> Fixture {
        tokio::task::spawn_blocking(require_engine)
            .await
            .unwrap()
            .unwrap_or_else(|error| panic!("{error:#}"));
        let docker = connect().await.unwrap_or_else(|reason| {
            panic!("the Docker tests need a reachable Docker engine: {reason}")
        });
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let agent_id = format!("test-agent-{}", rand::random::<u64>());
        let runner = DockerRunner::new(
            DockerRunnerOptions {
                work_root: temp.path().join("work"),
                agent_id: agent_id.clone(),
                helper_link: HelperLink::offline(),
            },
            Some(docker),
        );
        Fixture {
            _temp: temp,
            spool,
            runner,
            agent_id,
        }
    }

    fn docker_spec() -> DockerSpec {
        DockerSpec {
            image: TEST_IMAGE.into(),
            memory_mb: Some(256),
            cpus: Some(1.0),
            pids: Some(256),
            network: DockerNetwork::None,
            read_only: false,
            user: None,
        }
    }

    fn spec(script: &str) -> JobSpec {
        JobSpec {
            job_id: format!("job-{}", rand::random::<u64>()),
            attempt: 1,
            run_id: "run-1".into(),
            event_id: "event-1".into(),
            kind: ScriptKind::Bash,
            script: script.into(),
            env: vec![],
            timeout_ms: 0,
            input: None,
            runtime: RuntimeSpec::Docker(docker_spec()),
            secret_env: Default::default(),
        }
    }

    fn with_docker(mut spec: JobSpec, change: impl FnOnce(&mut DockerSpec)) -> JobSpec {
        if let RuntimeSpec::Docker(docker) = &mut spec.runtime {
            change(docker);
        }
        spec
    }

    /// Runs a spec to its end and returns the outcome and the log per stream.
    async fn run(fixture: &Fixture, spec: &JobSpec, stop: StopSignal) -> (Outcome, Log) {
        run_to_end(
            &fixture.runner,
            &fixture.spool,
            spec,
            stop,
            Duration::from_secs(60),
        )
        .await
    }

    /// The containers labelled with this job id (running or not).
    fn containers_of(job_id: &str) -> String {
        docker_cli(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label={LABEL_JOB}={job_id}"),
        ])
    }

    #[tokio::test]
    async fn output_and_exit_codes() {
        let fixture = fixture().await;
        let job = spec("echo out; echo err >&2; pwd; exit 3");
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::ExitCode),
                exit_code: Some(3)
            },
            "{log:?}"
        );
        assert_eq!(log.stdout, "out\n/job\n");
        assert_eq!(log.stderr, "err\n");
        assert_eq!(containers_of(&job.job_id), "", "the container is removed");

        let (outcome, log) = run(&fixture, &spec("echo fine"), no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        assert_eq!(outcome.exit_code, Some(0));
    }

    #[tokio::test]
    async fn a_memory_hog_is_reported_as_oom() {
        let fixture = fixture().await;
        let job = with_docker(
            spec("x=aaaaaaaaaaaaaaaa; while true; do x=\"$x$x\"; done"),
            |docker| docker.memory_mb = Some(32),
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Failed, "{log:?}");
        assert_eq!(outcome.reason, Some(FailReason::Oom), "{log:?}");
        assert!(log.system.contains("out of memory"));
        assert_eq!(containers_of(&job.job_id), "");
    }

    #[tokio::test]
    async fn a_fork_bomb_is_bounded_by_the_pids_limit() {
        let fixture = fixture().await;
        let mut job = with_docker(
            spec(
                "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max; bomb() { bomb | bomb & }; bomb; sleep 1000",
            ),
            |docker| docker.pids = Some(16),
        );
        job.timeout_ms = 3000;
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        // The bomb hits the limit (bash keeps retrying its forks) until the timeout kills it all.
        assert_eq!(outcome.status, FinalStatus::Failed, "{log:?}");
        assert_eq!(outcome.reason, Some(FailReason::Timeout), "{log:?}");
        assert!(log.stdout.starts_with("16\n"), "{log:?}");
        assert_eq!(containers_of(&job.job_id), "");
        let (outcome, _) = run(&fixture, &spec("echo next"), no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed);
    }

    #[tokio::test]
    async fn network_none_cannot_reach_the_host() {
        let fixture = fixture().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let job = spec(&format!(
            "if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo connected; else echo refused; fi"
        ));
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        assert_eq!(log.stdout, "refused\n");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "nothing connected");
    }

    #[tokio::test]
    async fn timeout_and_cancel_leave_no_container() {
        let fixture = fixture().await;
        let mut job = spec("echo started; sleep 1000");
        job.timeout_ms = 1500;
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Failed, "{log:?}");
        assert_eq!(outcome.reason, Some(FailReason::Timeout));
        assert_eq!(log.stdout, "started\n");
        assert_eq!(containers_of(&job.job_id), "");

        let job = spec("sleep 1000");
        let (stop_sender, stop) = watch::channel(None);
        stop_sender.send_replace(Some(StopReason::Cancel));
        let (outcome, log) = run(&fixture, &job, stop).await;
        assert_eq!(outcome.status, FinalStatus::Cancelled, "{log:?}");
        assert!(log.system.contains("cancelled"));
        assert_eq!(containers_of(&job.job_id), "");
    }

    #[tokio::test]
    async fn env_values_reach_the_script_but_not_docker_inspect() {
        let fixture = fixture().await;
        let canary = format!("canary-{}", rand::random::<u64>());
        let mut job = spec(
            "echo \"secret=$SECRET quote=$QUOTED\"; ls -A /job; \
             docker_id=$CRONIUM_JOB_ID; echo \"job=$docker_id\"; \
             echo \"token=${#CRONIUM_JOB_TOKEN} socket=$CRONIUM_HELPER_SOCKET\"; sleep 2",
        );
        job.env = vec![
            ("SECRET".into(), canary.clone()),
            ("QUOTED".into(), "it's $(not run)".into()),
            ("CRONIUM_JOB_ID".into(), "forged".into()),
        ];
        let job_id = job.job_id.clone();
        let inspector = tokio::task::spawn_blocking(move || {
            // Inspect the container while it runs.
            for _ in 0..100 {
                let ids = containers_of(&job_id);
                if let Some(id) = ids.lines().next() {
                    return Some(docker_cli(&["inspect", id]));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        });
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        assert!(
            log.stdout
                .starts_with(&format!("secret={canary} quote=it's $(not run)\n")),
            "{log:?}"
        );
        assert!(
            !log.stdout.contains(ENV_FILE),
            "the env file is deleted once read"
        );
        assert!(log.stdout.contains(&format!("job={}\n", job.job_id)));
        assert!(log.system.contains("CRONIUM_JOB_ID"));
        let inspect = inspector.await.unwrap().expect("the container was seen");
        assert!(inspect.contains(&job.job_id));
        assert!(!inspect.contains(&canary), "{inspect}");
        // The helper token reaches the script through the env file only.
        assert!(
            log.stdout
                .contains("token=64 socket=/job/.cronium/helper.sock\n"),
            "{log:?}"
        );
        assert!(!inspect.contains("CRONIUM_JOB_TOKEN"), "{inspect}");
    }

    #[tokio::test]
    async fn read_only_root_and_user() {
        let fixture = fixture().await;
        let job = with_docker(
            spec(
                "id -u; touch /x 2>/dev/null && echo root-writable; echo t > /tmp/t && cat /tmp/t; echo j > /job/j && cat /job/j",
            ),
            |docker| {
                docker.read_only = true;
                docker.user = Some("1234:1234".into());
            },
        );
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(outcome.status, FinalStatus::Completed, "{log:?}");
        assert_eq!(log.stdout, "1234\nt\nj\n");
    }

    #[tokio::test]
    async fn leftover_containers_of_this_agent_are_removed() {
        let fixture = fixture().await;
        let job_id = format!("job-{}", rand::random::<u64>());
        docker_cli(&[
            "create",
            "--label",
            &format!("{LABEL_AGENT}={}", fixture.agent_id),
            "--label",
            &format!("{LABEL_JOB}={job_id}"),
            TEST_IMAGE,
            "sleep",
            "1000",
        ]);
        let other_job = format!("job-{}", rand::random::<u64>());
        let other = docker_cli(&[
            "create",
            "--label",
            &format!("{LABEL_AGENT}=another-agent-{}", rand::random::<u64>()),
            "--label",
            &format!("{LABEL_JOB}={other_job}"),
            TEST_IMAGE,
            "true",
        ]);
        assert_ne!(containers_of(&job_id), "");
        assert_eq!(fixture.runner.remove_leftovers().await, 1);
        assert_eq!(containers_of(&job_id), "");
        assert_ne!(
            containers_of(&other_job),
            "",
            "other agents' containers stay"
        );
        docker_cli(&["rm", "-f", other.trim()]);
    }

    #[tokio::test]
    async fn a_missing_image_is_pulled_and_a_failed_pull_is_a_spawn_failure() {
        let fixture = fixture().await;
        // A registry on a closed loopback port: the pull is attempted and fails at once.
        let job = with_docker(spec("echo never"), |docker| {
            docker.image = format!("127.0.0.1:1/cronium-missing-{}:1", rand::random::<u32>());
        });
        let (outcome, log) = run(&fixture, &job, no_stop()).await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Spawn),
                exit_code: None
            },
            "{log:?}"
        );
        assert!(log.system.contains("pulling image 127.0.0.1:1/"), "{log:?}");
        assert!(log.system.contains("could not pull image"), "{log:?}");
        assert_eq!(containers_of(&job.job_id), "");
    }

    #[tokio::test]
    async fn without_an_engine_docker_jobs_fail_fast() {
        let temp = tempfile::tempdir().unwrap();
        let spool = Spool::open(temp.path().join("spool")).unwrap();
        let fixture = Fixture {
            runner: DockerRunner::new(
                DockerRunnerOptions {
                    work_root: temp.path().join("work"),
                    agent_id: "no-engine".into(),
                    helper_link: HelperLink::offline(),
                },
                None,
            ),
            spool,
            agent_id: "no-engine".into(),
            _temp: temp,
        };
        let (outcome, log) = run(&fixture, &spec("echo never"), no_stop()).await;
        assert_eq!(
            outcome,
            Outcome {
                status: FinalStatus::Failed,
                reason: Some(FailReason::Spawn),
                exit_code: None
            }
        );
        assert!(log.system.contains("no reachable Docker engine"));
    }
}
