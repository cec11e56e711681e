//! [`TestCluster`]: a control plane and its agents, started from the real binaries in a temp dir.
//!
//! Every process is owned by a [`ChildGuard`], so dropping the cluster (also while a test panics)
//! kills and reaps all of them. As a second line of defence the cluster puts a unique
//! `E2E_CRONIUM_CLUSTER=…` entry into the environment of the control plane, the agents and every
//! event it creates, and on drop kills any process still carrying it (e.g. a job orphaned by a
//! killed agent). The log tails of every process are printed on drop; the test runner only shows
//! them when the test fails.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::api::Api;
use crate::docker::DefaultImages;
use crate::process::{ChildGuard, kill_processes_with_env, live_processes_with_arg, log_tail};

/// The environment variable that tags every process belonging to one cluster.
pub const CLUSTER_MARKER_VAR: &str = "E2E_CRONIUM_CLUSTER";

/// How long the control plane may take to print its readiness line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a CLI command (`token create`, `enroll`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent may take to show up online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// The poll interval of [`TestCluster::wait_until`].
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of each log shown in failure messages.
const TAIL_LINES: usize = 40;

/// Settings of the control plane under test.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// `--lease-seconds`, the server default when `None`.
    pub lease_seconds: Option<u32>,
    /// `--heartbeat-seconds`, the server default when `None`.
    pub heartbeat_seconds: Option<u32>,
}

/// Where `cronium serve` runs: under a command prefix (e.g. `ip netns exec NS`, see
/// [`crate::netns`]) and on which address both listeners bind (on free ports); the public URL and
/// the QUIC address agents are told to dial follow from it.
#[derive(Clone, Debug)]
pub struct ServeIn {
    /// Program and arguments put before the `cronium` binary; empty for none.
    pub prefix: Vec<String>,
    pub ip: IpAddr,
}

impl Default for ServeIn {
    fn default() -> Self {
        ServeIn {
            prefix: Vec::new(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Settings of one agent process.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// `--capacity`.
    pub capacity: u32,
    /// `--reconnect-max-ms`: small, so reconnects after a control plane restart are quick.
    pub reconnect_max_ms: u64,
    /// Extra environment of the agent process.
    pub env: Vec<(String, String)>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            capacity: 4,
            reconnect_max_ms: 1000,
            env: Vec::new(),
        }
    }
}

/// An agent identity created by `cronium-agent enroll`.
#[derive(Clone, Debug)]
pub struct EnrolledAgent {
    pub name: String,
    /// `agent_id` from the state dir's `agent.json`.
    pub id: String,
    pub state_dir: PathBuf,
}

/// Arguments of one `cronium-agent enroll` invocation.
#[derive(Clone, Debug)]
pub struct EnrollRequest {
    pub name: String,
    pub token: String,
    pub ca_sha256: String,
    pub labels: Vec<(String, String)>,
    /// Pass the token as `CRONIUM_ENROLL_TOKEN` instead of `--token` (keeps it out of `ps`).
    pub token_via_env: bool,
}

/// What `cronium-agent enroll` did.
#[derive(Debug)]
pub struct EnrollOutcome {
    pub output: Output,
    pub state_dir: PathBuf,
}

impl EnrollOutcome {
    /// stdout and stderr, lossily decoded, for messages and assertions.
    pub fn combined_output(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

/// An event to create with `POST /api/v1/events`.
#[derive(Clone, Debug)]
pub struct EventSpec {
    pub name: String,
    /// `bash`, `python` or `nodejs` (or anything else, to test refusals).
    pub kind: String,
    pub script: String,
    /// Agent ids or names.
    pub targets: Vec<String>,
    pub timeout_seconds: u64,
    pub retries: u32,
    pub env: Vec<(String, String)>,
    /// `Some`: `runtime: docker` with these extra fields (`image`, `limits`, `network`, …).
    pub docker: Option<Value>,
}

impl EventSpec {
    /// An event of `kind` with a 60 s timeout, no retries and no targets yet.
    pub fn new(kind: &str, name: &str, script: &str) -> EventSpec {
        EventSpec {
            name: name.to_owned(),
            kind: kind.to_owned(),
            script: script.to_owned(),
            targets: Vec::new(),
            timeout_seconds: 60,
            retries: 0,
            env: Vec::new(),
            docker: None,
        }
    }

    pub fn bash(name: &str, script: &str) -> EventSpec {
        EventSpec::new("bash", name, script)
    }

    pub fn python(name: &str, script: &str) -> EventSpec {
        EventSpec::new("python", name, script)
    }

    pub fn nodejs(name: &str, script: &str) -> EventSpec {
        EventSpec::new("nodejs", name, script)
    }

    /// Adds a target agent (id or name).
    pub fn target(mut self, agent: &str) -> EventSpec {
        self.targets.push(agent.to_owned());
        self
    }

    pub fn timeout_seconds(mut self, seconds: u64) -> EventSpec {
        self.timeout_seconds = seconds;
        self
    }

    pub fn retries(mut self, retries: u32) -> EventSpec {
        self.retries = retries;
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> EventSpec {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Runs the event in Docker; `fields` (an object) is merged into the request body.
    pub fn docker(mut self, fields: Value) -> EventSpec {
        self.docker = Some(fields);
        self
    }

    /// The request body; `marker` is added to the env so the cluster can find the job's processes.
    pub fn to_json(&self, marker: &str) -> Value {
        let mut env: BTreeMap<&str, &str> = self
            .env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        env.insert(CLUSTER_MARKER_VAR, marker);
        let mut body = json!({
            "name": self.name,
            "kind": self.kind,
            "script": self.script,
            "runtime": "host",
            "targets": {"agents": self.targets},
            "timeout_seconds": self.timeout_seconds,
            "retries": self.retries,
            "env": env,
        });
        if let Some(docker) = &self.docker {
            body["runtime"] = json!("docker");
            if let (Some(body), Some(fields)) = (body.as_object_mut(), docker.as_object()) {
                body.extend(fields.clone());
            }
        }
        body
    }
}

/// The answer to `POST /api/v1/events/{id}/runs`.
#[derive(Clone, Debug)]
pub struct RunStarted {
    pub run_id: String,
    /// `(job id, agent id)` pairs.
    pub jobs: Vec<(String, String)>,
}

impl RunStarted {
    /// The id of the only job of the run; fails when the run has another number of jobs.
    pub fn single_job(&self) -> Result<String> {
        match self.jobs.as_slice() {
            [(job_id, _)] => Ok(job_id.clone()),
            jobs => bail!(
                "expected exactly one job in run {}, got {jobs:?}",
                self.run_id
            ),
        }
    }
}

/// A running control plane process.
#[derive(Debug)]
struct ControlPlane {
    guard: ChildGuard,
}

/// A running agent process.
#[derive(Debug)]
struct RunningAgent {
    agent: EnrolledAgent,
    guard: ChildGuard,
}

/// A control plane and its agents, all killed when this drops.
pub struct TestCluster {
    /// `None` only after the directory was kept for a failed test.
    dir: Option<TempDir>,
    dir_path: PathBuf,
    /// Unique value of [`CLUSTER_MARKER_VAR`] for this cluster.
    marker: String,
    encryption_key: String,
    /// The control plane's PostgreSQL database when the tests run on PostgreSQL
    /// (`crate::postgres::test_database_url`); SQLite in the data dir otherwise.
    database_url: Option<String>,
    options: ClusterOptions,
    /// The control plane's default Docker images (`--docker-image-*`); its own defaults if `None`.
    docker_images: Option<DefaultImages>,
    /// More arguments of `cronium serve` (e.g. terminal settings).
    extra_args: Vec<String>,
    serve_in: ServeIn,
    /// Where the harness sends its own API requests when that is not the control plane's address
    /// (see [`TestCluster::set_api_base`]).
    api_base: Option<String>,
    control_plane: Option<ControlPlane>,
    http_addr: String,
    quic_addr: SocketAddr,
    admin_token: String,
    api: Api,
    agents: Vec<RunningAgent>,
    /// Log files of processes that are gone but whose tails are still useful.
    old_logs: Vec<(String, PathBuf)>,
    agent_log_counter: usize,
}

impl TestCluster {
    /// Starts a control plane with default settings.
    pub async fn start() -> Result<TestCluster> {
        TestCluster::start_with(ClusterOptions::default()).await
    }

    /// Starts a control plane on free ports in a new temp dir and creates an admin API token.
    pub async fn start_with(options: ClusterOptions) -> Result<TestCluster> {
        TestCluster::start_inner(options, None, Vec::new()).await
    }

    /// Like [`TestCluster::start_with`], with more arguments for `cronium serve` (e.g.
    /// `--terminal-idle-timeout 2s`); they are kept for restarts.
    pub async fn start_with_args(options: ClusterOptions, args: &[&str]) -> Result<TestCluster> {
        let args = args.iter().map(|arg| (*arg).to_owned()).collect();
        TestCluster::start_inner(options, None, args).await
    }

    /// Like [`TestCluster::start_with`], with `images` as the control plane's default Docker
    /// images (e.g. [`DefaultImages::test_images`]), so Docker events may leave `image` out.
    pub async fn start_with_docker_images(
        options: ClusterOptions,
        images: DefaultImages,
    ) -> Result<TestCluster> {
        TestCluster::start_inner(options, Some(images), Vec::new()).await
    }

    /// Like [`TestCluster::start_with`], with the control plane started as `serve_in` says
    /// (e.g. inside a network namespace, bound to its address).
    pub async fn start_in(options: ClusterOptions, serve_in: ServeIn) -> Result<TestCluster> {
        TestCluster::start_configured(options, None, Vec::new(), serve_in).await
    }

    /// [`TestCluster::start_in`] with more arguments for `cronium serve`, kept for restarts.
    pub async fn start_in_with_args(
        options: ClusterOptions,
        serve_in: ServeIn,
        args: &[&str],
    ) -> Result<TestCluster> {
        let args = args.iter().map(|arg| (*arg).to_owned()).collect();
        TestCluster::start_configured(options, None, args, serve_in).await
    }

    async fn start_inner(
        options: ClusterOptions,
        docker_images: Option<DefaultImages>,
        extra_args: Vec<String>,
    ) -> Result<TestCluster> {
        TestCluster::start_configured(options, docker_images, extra_args, ServeIn::default()).await
    }

    /// Like [`TestCluster::start_with`], on the PostgreSQL database at `database_url` (on a
    /// cluster the test owns, to stop or fill it) whichever database the suite runs on.
    pub async fn start_on_database(
        options: ClusterOptions,
        database_url: &str,
    ) -> Result<TestCluster> {
        TestCluster::start_on(
            options,
            None,
            Vec::new(),
            ServeIn::default(),
            Some(database_url.to_owned()),
            None,
        )
        .await
    }

    /// [`TestCluster::start_on_database`] with more arguments for `cronium serve` (kept for
    /// restarts and handed to [`TestCluster::start_replica_of`]'s replicas).
    pub async fn start_on_database_with_args(
        options: ClusterOptions,
        database_url: &str,
        args: &[&str],
    ) -> Result<TestCluster> {
        TestCluster::start_on(
            options,
            None,
            args.iter().map(|arg| (*arg).to_owned()).collect(),
            ServeIn::default(),
            Some(database_url.to_owned()),
            None,
        )
        .await
    }

    /// Another replica of `primary`'s control plane: `cronium serve` with a data dir and ports of
    /// its own on the same PostgreSQL database with the same `ENCRYPTION_KEY`, the same settings,
    /// and `primary`'s admin token (tokens live in the database).
    pub async fn start_replica_of(primary: &TestCluster) -> Result<TestCluster> {
        let Some(database_url) = primary.database_url.clone() else {
            bail!("replicas share a PostgreSQL database; this cluster runs on SQLite");
        };
        TestCluster::start_on(
            primary.options.clone(),
            primary.docker_images.clone(),
            primary.extra_args.clone(),
            primary.serve_in.clone(),
            Some(database_url),
            Some((primary.encryption_key.clone(), primary.admin_token.clone())),
        )
        .await
    }

    /// [`TestCluster::start_replica_of`] with `args` for `cronium serve` instead of `primary`'s
    /// own extra arguments (e.g. a `--quic-public-addrs` of its own), kept for restarts.
    pub async fn start_replica_of_with_args(
        primary: &TestCluster,
        args: &[&str],
    ) -> Result<TestCluster> {
        let Some(database_url) = primary.database_url.clone() else {
            bail!("replicas share a PostgreSQL database; this cluster runs on SQLite");
        };
        TestCluster::start_on(
            primary.options.clone(),
            primary.docker_images.clone(),
            args.iter().map(|arg| (*arg).to_owned()).collect(),
            primary.serve_in.clone(),
            Some(database_url),
            Some((primary.encryption_key.clone(), primary.admin_token.clone())),
        )
        .await
    }

    async fn start_configured(
        options: ClusterOptions,
        docker_images: Option<DefaultImages>,
        extra_args: Vec<String>,
        serve_in: ServeIn,
    ) -> Result<TestCluster> {
        let database_url = crate::postgres::test_database_url()?;
        TestCluster::start_on(
            options,
            docker_images,
            extra_args,
            serve_in,
            database_url,
            None,
        )
        .await
    }

    async fn start_on(
        options: ClusterOptions,
        docker_images: Option<DefaultImages>,
        extra_args: Vec<String>,
        serve_in: ServeIn,
        database_url: Option<String>,
        // The key and admin token of the control plane this one is a replica of.
        replica_of: Option<(String, String)>,
    ) -> Result<TestCluster> {
        crate::init_crypto();
        let dir = tempfile::Builder::new()
            .prefix("cronium-e2e-")
            .tempdir()
            .context("create the temp dir")?;
        let dir_path = dir.path().to_path_buf();
        std::fs::create_dir_all(dir_path.join("data"))?;
        std::fs::create_dir_all(dir_path.join("agents"))?;
        let (encryption_key, shared_token) = match replica_of {
            Some((key, token)) => (key, Some(token)),
            None => (
                base64::engine::general_purpose::STANDARD.encode(crate::random_bytes(32)),
                None,
            ),
        };
        let marker = crate::unique_marker("cluster");
        let mut cluster = TestCluster {
            database_url,
            dir: Some(dir),
            dir_path,
            marker,
            encryption_key,
            options,
            docker_images,
            extra_args,
            serve_in,
            api_base: None,
            control_plane: None,
            http_addr: String::new(),
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: String::new(),
            api: Api::new("http://127.0.0.1:1", None)?,
            agents: Vec::new(),
            old_logs: Vec::new(),
            agent_log_counter: 0,
        };
        let any_port = SocketAddr::new(cluster.serve_in.ip, 0).to_string();
        cluster.spawn_control_plane(&any_port, &any_port).await?;
        let token = match shared_token {
            Some(token) => token,
            None => cluster.cli_token_create().await?,
        };
        cluster.api = cluster.api.with_token(Some(&token));
        cluster.admin_token = token;
        Ok(cluster)
    }

    /// The admin API client.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Sends the harness's own API requests (and [`TestCluster::api`]'s) to `base_url` instead of
    /// the control plane's address, also after restarts: for a control plane the test process
    /// cannot reach directly, e.g. through a [`crate::netns::TcpForwarder`].
    pub fn set_api_base(&mut self, base_url: &str) -> Result<()> {
        let base_url = base_url.trim_end_matches('/').to_owned();
        self.api = Api::new(
            &base_url,
            (!self.admin_token.is_empty()).then_some(self.admin_token.as_str()),
        )?;
        self.api_base = Some(base_url);
        Ok(())
    }

    /// The admin API token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The `ENCRYPTION_KEY` the control plane runs with (base64).
    pub fn encryption_key(&self) -> &str {
        &self.encryption_key
    }

    /// Sets the `ENCRYPTION_KEY` the control plane is started with from now on (after
    /// `cronium keys rotate`).
    pub fn set_encryption_key(&mut self, key: &str) {
        self.encryption_key = key.to_owned();
    }

    /// The log files of this cluster (control plane and agents, also stopped ones) that contain
    /// `needle`, for checks that secrets never reach a log.
    pub fn logs_containing(&self, needle: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir_path) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| Some(entry.ok()?.path()))
            .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
            .filter(|path| {
                std::fs::read(path).is_ok_and(|bytes| {
                    bytes
                        .windows(needle.len().max(1))
                        .any(|window| window == needle.as_bytes())
                })
            })
            .collect()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The UDP address of the QUIC listener.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The control plane's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir_path.join("data")
    }

    /// The temp dir of this cluster.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The cluster's marker value (see [`CLUSTER_MARKER_VAR`]).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Runs `cronium token create --user admin` and returns the token it prints.
    pub async fn cli_token_create(&self) -> Result<String> {
        let mut command = self.cronium_command()?;
        command
            .args(["token", "create", "--user", "admin", "--data-dir"])
            .arg(self.data_dir());
        let output = run_with_timeout(command, COMMAND_TIMEOUT).await?;
        if !output.status.success() {
            bail!(
                "cronium token create failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8(output.stdout).context("token create printed non-UTF-8")?;
        let lines: Vec<&str> = stdout
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect();
        match lines.as_slice() {
            [token] => Ok((*token).to_owned()),
            _ => bail!(
                "cronium token create must print the token alone on stdout, printed {stdout:?}"
            ),
        }
    }

    /// Runs `cronium ARGS…` as an API client of this cluster (`CRONIUM_URL` and `CRONIUM_TOKEN`
    /// name it and the admin token), stdout and stderr captured, killed after `timeout`.
    pub async fn cli(&self, args: &[&str], timeout: Duration) -> Result<std::process::Output> {
        self.cli_with_env(args, &[], timeout).await
    }

    /// [`TestCluster::cli`] with extra environment variables for the command.
    pub async fn cli_with_env(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<std::process::Output> {
        let mut command = self.cronium_command()?;
        command
            .args(args)
            .envs(env.iter().copied())
            .env("CRONIUM_URL", self.http_url())
            .env("CRONIUM_TOKEN", &self.admin_token);
        run_with_timeout(command, timeout).await
    }

    /// Runs `cronium user create NAME --role ROLE` and returns the password it generated (for
    /// tests that log in like a person, e.g. through the web console).
    pub async fn cli_user_create(&self, name: &str, role: &str) -> Result<String> {
        let mut command = self.cronium_command()?;
        command
            .args(["user", "create", name, "--role", role, "--data-dir"])
            .arg(self.data_dir());
        let output = run_with_timeout(command, COMMAND_TIMEOUT).await?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "cronium user create failed ({}): {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        stdout
            .lines()
            .find_map(|line| line.split_once("with password: "))
            .map(|(_, password)| password.trim().to_owned())
            .with_context(|| format!("cronium user create printed no password: {stdout:?}"))
    }

    /// Creates a user with `role` (`admin`, `user` or `viewer`) through the CLI and an API token
    /// for them; returns `(password, token)`.
    pub async fn create_user(&self, name: &str, role: &str) -> Result<(String, String)> {
        let mut command = self.cronium_command()?;
        command
            .args(["user", "create", name, "--role", role, "--data-dir"])
            .arg(self.data_dir());
        let output = run_with_timeout(command, COMMAND_TIMEOUT).await?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "cronium user create {name} failed ({}): {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let password = stdout
            .rsplit("password:")
            .next()
            .map(str::trim)
            .filter(|password| !password.is_empty() && !password.contains(' '))
            .with_context(|| format!("no password in {stdout:?}"))?
            .to_owned();
        let mut command = self.cronium_command()?;
        command
            .args(["token", "create", "--user", name, "--data-dir"])
            .arg(self.data_dir());
        let output = run_with_timeout(command, COMMAND_TIMEOUT).await?;
        if !output.status.success() {
            bail!(
                "cronium token create --user {name} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let token = String::from_utf8(output.stdout)
            .context("token create printed non-UTF-8")?
            .trim()
            .to_owned();
        Ok((password, token))
    }

    /// The pid of the running control plane process, if one runs.
    pub fn control_plane_pid(&self) -> Option<u32> {
        self.control_plane
            .as_ref()
            .map(|control_plane| control_plane.guard.pid())
    }

    /// SIGKILLs the control plane and reaps it.
    pub fn kill_control_plane(&mut self) -> Result<()> {
        if let Some(mut control_plane) = self.control_plane.take() {
            control_plane.guard.kill()?;
        }
        Ok(())
    }

    /// Stops the control plane gracefully (SIGTERM) and reaps it; fails if it has not exited
    /// within `timeout` (it is SIGKILLed then).
    pub async fn stop_control_plane(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(mut control_plane) = self.control_plane.take() else {
            bail!("the control plane is not running");
        };
        // SAFETY: plain syscall on a pid the guard owns and has not reaped yet.
        unsafe {
            libc::kill(control_plane.guard.pid() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = control_plane.guard.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                control_plane.guard.kill()?;
                bail!("the control plane did not exit within {timeout:?} of SIGTERM");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Starts the control plane again with the same data dir, key and ports.
    pub async fn start_control_plane_again(&mut self) -> Result<()> {
        if self.control_plane.is_some() {
            bail!("the control plane is still running");
        }
        let http = self.http_addr.clone();
        let quic = self.quic_addr.to_string();
        self.spawn_control_plane(&http, &quic).await
    }

    /// SIGKILLs the control plane and starts it again on the same ports.
    pub async fn restart_control_plane(&mut self) -> Result<()> {
        self.kill_control_plane()?;
        self.start_control_plane_again().await
    }

    /// Creates an enrollment token (`POST /api/v1/enrollment-tokens`) and returns the answer.
    pub async fn create_enrollment_token(&self, body: &Value) -> Result<Value> {
        let token = self
            .api
            .post("/api/v1/enrollment-tokens", body)
            .await?
            .expect_status(201, "create an enrollment token")?;
        for field in ["token", "ca_sha256", "expires_at"] {
            if token.get(field).is_none() {
                bail!("enrollment token answer lacks `{field}`: {token}");
            }
        }
        Ok(token)
    }

    /// Runs `cronium-agent enroll` into a fresh state dir and returns what happened, success or not.
    pub async fn run_enroll(&self, request: &EnrollRequest) -> Result<EnrollOutcome> {
        let state_dir = self.fresh_agent_dir(&request.name)?;
        let mut command = Command::new(crate::binary("cronium-agent")?);
        command
            .arg("enroll")
            .args(["--server", &self.http_url()])
            .args(["--ca-sha256", &request.ca_sha256])
            .args(["--name", &request.name])
            .arg("--state-dir")
            .arg(&state_dir);
        if !request.labels.is_empty() {
            let labels: Vec<String> = request
                .labels
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            command.args(["--labels", &labels.join(",")]);
        }
        if request.token_via_env {
            command.env("CRONIUM_ENROLL_TOKEN", &request.token);
        } else {
            command
                .env_remove("CRONIUM_ENROLL_TOKEN")
                .args(["--token", &request.token]);
        }
        self.tag_environment(&mut command);
        let output = run_with_timeout(command, COMMAND_TIMEOUT).await?;
        Ok(EnrollOutcome { output, state_dir })
    }

    /// Creates a one-use token and enrolls an agent called `name` with it.
    pub async fn enroll_agent(&self, name: &str, labels: &[(&str, &str)]) -> Result<EnrolledAgent> {
        let label_map: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let token = self
            .create_enrollment_token(&json!({"labels": label_map, "uses": 1, "ttl_seconds": 600}))
            .await?;
        let request = EnrollRequest {
            name: name.to_owned(),
            token: json_str(&token, "token")?,
            ca_sha256: json_str(&token, "ca_sha256")?,
            labels: labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            token_via_env: true,
        };
        let outcome = self.run_enroll(&request).await?;
        if !outcome.output.status.success() {
            bail!(
                "cronium-agent enroll {name} failed ({}): {}",
                outcome.output.status,
                outcome.combined_output()
            );
        }
        for file in ["key.pem", "cert.pem", "ca.pem", "agent.json"] {
            if !outcome.state_dir.join(file).is_file() {
                bail!(
                    "enroll {name} succeeded but did not write {file} in {}",
                    outcome.state_dir.display()
                );
            }
        }
        let agent_json: Value =
            serde_json::from_slice(&std::fs::read(outcome.state_dir.join("agent.json"))?)
                .context("agent.json is not JSON")?;
        let id = json_str(&agent_json, "agent_id")?;
        Ok(EnrolledAgent {
            name: name.to_owned(),
            id,
            state_dir: outcome.state_dir,
        })
    }

    /// Starts `cronium-agent run` for `agent` without waiting for it to come online.
    pub fn spawn_agent(&mut self, agent: &EnrolledAgent, options: &AgentOptions) -> Result<()> {
        if self
            .agents
            .iter()
            .any(|running| running.agent.id == agent.id)
        {
            bail!("agent {} is already running", agent.name);
        }
        let mut command = Command::new(crate::binary("cronium-agent")?);
        command
            .arg("run")
            .arg("--state-dir")
            .arg(&agent.state_dir)
            .args(["--capacity", &options.capacity.to_string()])
            .args(["--reconnect-max-ms", &options.reconnect_max_ms.to_string()]);
        self.tag_environment(&mut command);
        for (name, value) in &options.env {
            command.env(name, value);
        }
        self.agent_log_counter += 1;
        let log_path = self.dir_path.join(format!(
            "agent-{}-{}.log",
            agent.name, self.agent_log_counter
        ));
        let (guard, _ready) =
            ChildGuard::spawn(&format!("agent {}", agent.name), command, &log_path, None)?;
        self.agents.push(RunningAgent {
            agent: agent.clone(),
            guard,
        });
        Ok(())
    }

    /// Starts `cronium-agent run` for `agent` and waits until the API shows it online.
    pub async fn start_agent(
        &mut self,
        agent: &EnrolledAgent,
        options: &AgentOptions,
    ) -> Result<()> {
        self.spawn_agent(agent, options)?;
        self.wait_agent_online(&agent.id, ONLINE_TIMEOUT).await
    }

    /// Enrolls and starts an agent with default options.
    pub async fn add_agent(&mut self, name: &str) -> Result<EnrolledAgent> {
        let agent = self.enroll_agent(name, &[]).await?;
        self.start_agent(&agent, &AgentOptions::default()).await?;
        Ok(agent)
    }

    /// Waits until `GET /api/v1/agents/{id}` says `online`.
    pub async fn wait_agent_online(&self, agent_id: &str, timeout: Duration) -> Result<()> {
        self.wait_until(timeout, &format!("agent {agent_id} online"), || async {
            let agent = self
                .api
                .get_ok(&format!("/api/v1/agents/{agent_id}"))
                .await?;
            Ok((agent["status"] == "online").then_some(()))
        })
        .await
    }

    /// SIGKILLs the agent process (only the agent, not the jobs it spawned) and reaps it.
    pub fn kill_agent(&mut self, agent_id: &str) -> Result<ExitStatus> {
        let index = self.running_agent_index(agent_id)?;
        let mut running = self.agents.remove(index);
        let status = running.guard.kill()?;
        self.old_logs.push((
            running.guard.name().to_owned(),
            running.guard.log_path().to_path_buf(),
        ));
        Ok(status)
    }

    /// The exit status of the agent process if it has exited, `None` while it runs.
    pub fn agent_exit_status(&mut self, agent_id: &str) -> Result<Option<ExitStatus>> {
        let index = self.running_agent_index(agent_id)?;
        self.agents[index].guard.try_wait()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to a running agent process.
    pub fn signal_agent(&self, agent_id: &str, signal: i32) -> Result<()> {
        let pid = self.agent_pid(agent_id)?;
        // SAFETY: plain syscall on a child we own and have not reaped (its pid cannot be reused).
        let result = unsafe { libc::kill(pid as libc::pid_t, signal) };
        if result != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the agent process exits by itself; returns its exit status.
    pub async fn wait_agent_exit(
        &mut self,
        agent_id: &str,
        timeout: Duration,
    ) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.agent_exit_status(agent_id)? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("agent {agent_id} did not exit within {timeout:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The process id of a running agent.
    pub fn agent_pid(&self, agent_id: &str) -> Result<u32> {
        Ok(self.agents[self.running_agent_index(agent_id)?].guard.pid())
    }

    /// Creates an event and returns its id.
    pub async fn create_event(&self, spec: &EventSpec) -> Result<String> {
        let event = self
            .api
            .post("/api/v1/events", &spec.to_json(&self.marker))
            .await?
            .expect_status(201, &format!("create event {}", spec.name))?;
        json_str(&event, "id")
    }

    /// Creates a webhook tool (`POST /api/v1/tools`) for the admin, pointing at `url`.
    pub async fn create_webhook_tool(&self, name: &str, url: &str) -> Result<()> {
        self.api
            .post(
                "/api/v1/tools",
                &json!({"name": name, "kind": "webhook", "config": {"url": url}}),
            )
            .await?
            .expect_status(201, &format!("create tool {name}"))?;
        Ok(())
    }

    /// Triggers a run of an event.
    pub async fn run_event(&self, event_id: &str, input: Option<Value>) -> Result<RunStarted> {
        let body = match input {
            Some(input) => json!({"input": input}),
            None => json!({}),
        };
        let run = self
            .api
            .post(&format!("/api/v1/events/{event_id}/runs"), &body)
            .await?
            .expect_status(201, &format!("run event {event_id}"))?;
        let run_id = json_str(&run, "run_id")?;
        let jobs = run["jobs"]
            .as_array()
            .with_context(|| format!("run answer has no `jobs` array: {run}"))?
            .iter()
            .map(|job| {
                Ok((
                    json_str(job, "id")?,
                    job["agent_id"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RunStarted { run_id, jobs })
    }

    /// Creates an event and runs it once; returns the single job's id.
    pub async fn run_single_job(&self, spec: &EventSpec) -> Result<String> {
        let event_id = self.create_event(spec).await?;
        self.run_event(&event_id, None).await?.single_job()
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, job_id: &str) -> Result<Value> {
        self.api.get_ok(&format!("/api/v1/jobs/{job_id}")).await
    }

    /// `GET /api/v1/runs/{id}`.
    pub async fn run(&self, run_id: &str) -> Result<Value> {
        self.api.get_ok(&format!("/api/v1/runs/{run_id}")).await
    }

    /// The whole raw log of a job (`GET /api/v1/jobs/{id}/logs`).
    pub async fn job_logs(&self, job_id: &str) -> Result<Vec<u8>> {
        let path = format!("/api/v1/jobs/{job_id}/logs");
        let response = self
            .api
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        let bytes = response.bytes().await.context("read the log body")?;
        if status != reqwest::StatusCode::OK {
            bail!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(bytes.to_vec())
    }

    /// `POST /api/v1/jobs/{id}/cancel`, which must answer 202.
    pub async fn cancel_job(&self, job_id: &str) -> Result<()> {
        self.api
            .post(&format!("/api/v1/jobs/{job_id}/cancel"), &json!({}))
            .await?
            .expect_status(202, &format!("cancel job {job_id}"))?;
        Ok(())
    }

    /// Waits until the job's status is one of `statuses`; returns the job.
    pub async fn wait_job_status(
        &self,
        job_id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_until(
            timeout,
            &format!("job {job_id} in status {statuses:?}"),
            || async {
                let job = self.job(job_id).await?;
                let status = job["status"].as_str().unwrap_or_default();
                Ok(statuses.contains(&status).then_some(job))
            },
        )
        .await
    }

    /// Waits until the job is `completed`, `failed` or `cancelled`; returns the job.
    pub async fn wait_job_final(&self, job_id: &str, timeout: Duration) -> Result<Value> {
        self.wait_job_status(job_id, &["completed", "failed", "cancelled"], timeout)
            .await
    }

    /// Waits until no live process has `marker` in its command line.
    pub async fn wait_no_process_with_arg(&self, marker: &str, timeout: Duration) -> Result<()> {
        self.wait_until(
            timeout,
            &format!("no process with `{marker}` in its arguments"),
            || async {
                let left = live_processes_with_arg(marker);
                if left.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("still running: {left:?}"))
                }
            },
        )
        .await
    }

    /// Polls `condition` every 100 ms until it returns `Ok(Some(value))`.
    ///
    /// `Ok(None)` and errors mean "not yet" (errors are expected while a process restarts). On
    /// timeout the error names `description` and the last error; the log tails follow when the
    /// cluster drops.
    pub async fn wait_until<T, F, Fut>(
        &self,
        timeout: Duration,
        description: &str,
        mut condition: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_error: Option<anyhow::Error>;
        loop {
            match condition().await {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => last_error = None,
                Err(error) => last_error = Some(error),
            }
            if Instant::now() >= deadline {
                let last = last_error
                    .map(|error| format!("\nlast error: {error:#}"))
                    .unwrap_or_default();
                // The log tails are printed when the cluster drops.
                bail!("timed out after {timeout:?} waiting for {description}{last}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The last lines of the control plane's and every agent's log.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let cp_log = self.dir_path.join("control-plane.log");
        out.push_str(&format!(
            "---- control plane ({}) ----\n{}\n",
            cp_log.display(),
            log_tail(&cp_log, TAIL_LINES)
        ));
        for (name, path) in &self.old_logs {
            out.push_str(&format!(
                "---- {name}, stopped ({}) ----\n{}\n",
                path.display(),
                log_tail(path, TAIL_LINES)
            ));
        }
        for running in &self.agents {
            out.push_str(&format!(
                "---- {} ({}) ----\n{}\n",
                running.guard.name(),
                running.guard.log_path().display(),
                running.guard.log_tail(TAIL_LINES)
            ));
        }
        out
    }

    async fn spawn_control_plane(&mut self, http: &str, quic: &str) -> Result<()> {
        let mut command = match self.serve_in.prefix.split_first() {
            None => self.cronium_command()?,
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(crate::binary("cronium")?);
                self.tag_environment(&mut command);
                self.database_environment(&mut command);
                command
            }
        };
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--http", http, "--quic", quic]);
        if let Some(seconds) = self.options.lease_seconds {
            command.args(["--lease-seconds", &seconds.to_string()]);
        }
        if let Some(seconds) = self.options.heartbeat_seconds {
            command.args(["--heartbeat-seconds", &seconds.to_string()]);
        }
        if let Some(images) = &self.docker_images {
            command.args(images.flags());
        }
        command.args(&self.extra_args);
        let log_path = self.dir_path.join("control-plane.log");
        let (guard, ready) =
            ChildGuard::spawn("control plane", command, &log_path, Some("cronium ready "))?;
        let control_plane = ControlPlane { guard };
        let line = match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => bail!(
                "the control plane closed stdout before it was ready\n{}",
                log_tail(&log_path, TAIL_LINES)
            ),
            Err(_) => bail!(
                "the control plane was not ready after {READY_TIMEOUT:?}\n{}",
                log_tail(&log_path, TAIL_LINES)
            ),
        };
        let (http_addr, quic_addr) = parse_ready_line(&line)?;
        if !http.ends_with(":0") && http_addr != http {
            bail!("the control plane was asked for --http {http} but listens on {http_addr}");
        }
        self.http_addr = http_addr;
        self.quic_addr = quic_addr;
        self.api = Api::new(
            self.api_base.as_deref().unwrap_or(&self.http_url()),
            (!self.admin_token.is_empty()).then_some(self.admin_token.as_str()),
        )?;
        self.control_plane = Some(control_plane);
        Ok(())
    }

    fn cronium_command(&self) -> Result<Command> {
        let mut command = Command::new(crate::binary("cronium")?);
        self.tag_environment(&mut command);
        self.database_environment(&mut command);
        Ok(command)
    }

    /// What every `cronium` command of this cluster needs to open its database: the key, and
    /// the PostgreSQL URL when there is one.
    fn database_environment(&self, command: &mut Command) {
        command.env("ENCRYPTION_KEY", &self.encryption_key);
        if let Some(url) = &self.database_url {
            command.env("CRONIUM_DATABASE_URL", url);
        }
    }

    /// The control plane's PostgreSQL database, when the tests run on PostgreSQL.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// Removes inherited `CRONIUM_*` settings, adds the cluster marker and a useful log filter.
    fn tag_environment(&self, command: &mut Command) {
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CRONIUM_") {
                command.env_remove(&name);
            }
        }
        command.env(CLUSTER_MARKER_VAR, &self.marker);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env(
                "RUST_LOG",
                "info,cronium=debug,cronium_control_plane=debug,cronium_agent=debug",
            );
        }
    }

    fn fresh_agent_dir(&self, name: &str) -> Result<PathBuf> {
        let base = self.dir_path.join("agents");
        for index in 0.. {
            let candidate = base.join(format!("{name}-{index}"));
            if !candidate.exists() {
                std::fs::create_dir_all(&candidate)?;
                return Ok(candidate);
            }
        }
        unreachable!("an unbounded range always yields a free name")
    }

    fn running_agent_index(&self, agent_id: &str) -> Result<usize> {
        self.agents
            .iter()
            .position(|running| running.agent.id == agent_id)
            .with_context(|| format!("agent {agent_id} is not running under this cluster"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Agents first, so they cannot start anything new, then the control plane.
        for mut running in self.agents.drain(..) {
            let _ = running.guard.kill();
            self.old_logs.push((
                running.guard.name().to_owned(),
                running.guard.log_path().to_path_buf(),
            ));
        }
        if let Some(mut control_plane) = self.control_plane.take() {
            let _ = control_plane.guard.kill();
        }
        let stray = kill_processes_with_env(&format!("{CLUSTER_MARKER_VAR}={}", self.marker));
        let panicking = std::thread::panicking();
        // Captured by the test runner; shown only when the test fails.
        eprintln!(
            "==== cronium e2e cluster {} (killed {stray} stray processes)\n{}",
            self.marker,
            self.log_tails()
        );
        if panicking && let Some(dir) = self.dir.take() {
            eprintln!("==== keeping {} for inspection", dir.keep().display());
        }
    }
}

/// Parses `cronium ready http=http://127.0.0.1:PORT quic=127.0.0.1:PORT`.
fn parse_ready_line(line: &str) -> Result<(String, SocketAddr)> {
    let mut http = None;
    let mut quic = None;
    for word in line.split_whitespace() {
        if let Some(value) = word.strip_prefix("http=") {
            http = Some(
                value
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned(),
            );
        } else if let Some(value) = word.strip_prefix("quic=") {
            quic = Some(
                value
                    .parse::<SocketAddr>()
                    .with_context(|| format!("bad quic address in {line:?}"))?,
            );
        }
    }
    match (http, quic) {
        (Some(http), Some(quic)) => Ok((http, quic)),
        _ => bail!("cannot parse the readiness line {line:?}"),
    }
}

/// Runs a command to completion (stdout and stderr captured), killing it after `timeout`.
async fn run_with_timeout(command: Command, timeout: Duration) -> Result<Output> {
    let mut command = tokio::process::Command::from(command);
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // Only the program and its arguments: the environment may hold secrets.
    let std_command = command.as_std();
    let description = format!(
        "{} {}",
        std_command.get_program().to_string_lossy(),
        std_command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    match tokio::time::timeout(timeout, command.output()).await {
        Ok(output) => output.with_context(|| format!("run {description}")),
        Err(_) => bail!("{description} did not finish within {timeout:?}"),
    }
}

/// A string field of a JSON object, or an error showing the object.
pub fn json_str(value: &Value, field: &str) -> Result<String> {
    value
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("expected a string field `{field}` in {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readiness_line_is_parsed() {
        let (http, quic) =
            parse_ready_line("cronium ready http=http://127.0.0.1:4321 quic=127.0.0.1:4322")
                .unwrap();
        assert_eq!(http, "127.0.0.1:4321");
        assert_eq!(quic, "127.0.0.1:4322".parse().unwrap());
        assert!(parse_ready_line("cronium ready http=http://127.0.0.1:1").is_err());
    }
}
