//! The `cronium` command line: `serve`, `dev`, bootstrap commands that work on the data dir
//! directly (`user create`, `token create`), and API clients (`enroll-token create`, `run`,
//! `event`). Every flag's doc comment is its `--help` text.

mod agent_update;
mod backup;
pub(crate) mod client;
mod config;
mod dev;
mod keys;
mod release;
mod rollout;
mod server;
mod workflow;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cronium_agent::logging::LogFormat;

use crate::crypto::{EncryptionKey, random_token, sha256_hex};
use crate::store::users::Role;
use crate::{ServerConfig, open_store};

/// Cronium: run scripts on your servers, on a schedule, across a fleet.
#[derive(Parser, Debug)]
#[command(name = "cronium", version, about)]
pub struct Cli {
    /// Log lines on stderr: `text`, or `json` (one object per line with `timestamp`, `level`,
    /// `message`, `target` and the event's fields).
    #[arg(long, global = true, env = "CRONIUM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane alone (production).
    Serve(ServeArgs),
    /// Run everything on one box: control plane on SQLite plus a local agent, enrolled automatically.
    Dev(DevArgs),
    /// Copy the database to a file, consistently, also while the server runs (`VACUUM INTO`).
    /// ENCRYPTION_KEY and the CA files in the data dir are not in the copy: back them up too.
    Backup(backup::BackupArgs),
    /// Manage users (works on the database directly, also while the server runs).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens (works on the database directly, also while the server runs).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage enrollment tokens (through the API).
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(EnrollTokenCommand),
    /// Manage events (through the API).
    #[command(subcommand)]
    Event(EventCommand),
    /// Servers (through the API): list, and install the agent over SSH.
    #[command(subcommand)]
    Server(server::ServerCommand),
    /// Trigger an event (through the API); `--wait` follows its logs and exits with the job's exit code
    /// (several hosts: a live per-host table, then the grouped outputs).
    Run(RunArgs),
    /// Retry a run's failed hosts (through the API) in a new run linked to it.
    Retry(rollout::RetryArgs),
    /// Sign agent releases (ed25519): keygen, sign, publish into a releases dir.
    #[command(subcommand)]
    Release(release::ReleaseCommand),
    /// The agent version the fleet should run (through the API): set, show, clear.
    #[command(subcommand, name = "agent-update")]
    AgentUpdate(agent_update::AgentUpdateCommand),
    /// Manage ENCRYPTION_KEY: `rotate` re-encrypts every stored secret under a new key (works on
    /// the database directly; the control plane must be stopped).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Workflows (through the API): list, create from a JSON file, run.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
}

/// Where the data lives; shared by the commands that open the database directly.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data directory (database, CA, keys).
    #[arg(long, env = "CRONIUM_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Database URL (`sqlite://PATH`); default: `cronium.db` in the data directory.
    #[arg(long, env = "CRONIUM_DATABASE_URL")]
    pub database_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Address of the HTTP API and console.
    #[arg(
        long = "http",
        env = "CRONIUM_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    http_addr: SocketAddr,
    /// UDP address agents connect to over QUIC.
    #[arg(
        long = "quic",
        env = "CRONIUM_QUIC_ADDR",
        default_value = "0.0.0.0:7443"
    )]
    quic_addr: SocketAddr,
    /// URL of this control plane as agents and browsers reach it (e.g. https://cronium.example.com).
    #[arg(long, env = "CRONIUM_PUBLIC_URL")]
    public_url: Option<String>,
    /// QUIC address(es) agents are told to dial (comma-separated host:port); default: derived from --quic and --public-url.
    #[arg(long, env = "CRONIUM_QUIC_PUBLIC_ADDRS", value_delimiter = ',')]
    quic_public_addrs: Vec<String>,
    /// With several replicas on one PostgreSQL database: the base URL (http://host:port) at which
    /// the other replicas reach THIS replica's HTTP listener directly, not through a load
    /// balancer (terminals are relayed to the replica an agent is connected to); plain HTTP, so a
    /// private network address. Default: http://<the --http address> (127.0.0.1 for 0.0.0.0),
    /// enough when every replica runs on one host.
    #[arg(long, env = "CRONIUM_RELAY_URL", value_parser = parse_relay_url)]
    relay_url: Option<reqwest::Url>,
    /// Base64 of 32 bytes that encrypts stored secrets. Required; never logged.
    #[arg(long, env = "ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
    /// Seconds a running job's lease lasts without a heartbeat from its agent.
    #[arg(long, env = "CRONIUM_LEASE_SECONDS", default_value_t = 30)]
    lease_seconds: u64,
    /// Seconds between agent heartbeats.
    #[arg(long, env = "CRONIUM_HEARTBEAT_SECONDS", default_value_t = 5)]
    heartbeat_seconds: u64,
    // Boxed: `Command::Serve` stays near the size of the other commands.
    #[command(flatten)]
    docker_images: Box<DockerImageArgs>,
    #[command(flatten)]
    terminals: Box<TerminalArgs>,
    /// Signed agent releases served at /downloads/agent/ [default: <data dir>/releases].
    #[arg(long, env = "CRONIUM_RELEASES_DIR")]
    releases_dir: Option<PathBuf>,
    /// The release PUBLIC key (PEM) /install.sh verifies agents with [default: release-key.pub
    /// in the releases dir]. The private key is never needed here.
    #[arg(long, env = "CRONIUM_RELEASE_KEY")]
    release_key: Option<PathBuf>,
    /// HTTP request jobs the control plane runs itself (`executor: control_plane`) may reach
    /// public addresses only: loopback, private, link-local (cloud metadata) and other
    /// non-public addresses are refused, for names (every address they resolve to) and for IP
    /// addresses in URLs and redirects. Without it they reach whatever this host can reach.
    #[arg(long, env = "CRONIUM_HTTP_JOBS_PUBLIC_ONLY")]
    http_jobs_public_only: bool,
    /// A file whose first line is a bearer token (32+ characters) that may read `GET /metrics`
    /// and nothing else, for Prometheus (`authorization: {credentials_file: …}`); admins' API
    /// tokens work too.
    #[arg(long, env = "CRONIUM_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// A file of `KEY=VALUE` lines, each a setting named by its environment variable: any of
    /// the `[env: …]` names above (and CRONIUM_LOG_FORMAT), e.g. `CRONIUM_HTTP_ADDR=0.0.0.0:8080`.
    /// Blank lines and lines starting with `#` are skipped; one pair of quotes around a value is
    /// removed. A value from the file is used only where neither the flag nor the environment
    /// variable is given: flags, then the environment, then the file, then the default. An
    /// unknown key, a key given twice, a malformed line or an invalid value stops the start.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Data directory (database, CA, keys, the local agent's state).
    #[arg(long, env = "CRONIUM_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Address of the HTTP API and console.
    #[arg(
        long = "http",
        env = "CRONIUM_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    http_addr: SocketAddr,
    /// UDP address agents connect to over QUIC.
    #[arg(
        long = "quic",
        env = "CRONIUM_QUIC_ADDR",
        default_value = "127.0.0.1:7443"
    )]
    quic_addr: SocketAddr,
    /// How many jobs the local agent runs at once.
    #[arg(long, default_value_t = 8)]
    agent_capacity: u32,
    #[command(flatten)]
    docker_images: DockerImageArgs,
    #[command(flatten)]
    terminals: TerminalArgs,
}

/// Browser terminals (`GET /api/v1/agents/{id}/terminal`).
#[derive(Args, Debug, Clone)]
pub struct TerminalArgs {
    /// Another origin (scheme://host[:port]) browsers may open terminals from, besides the
    /// public URL's; repeatable. Without --public-url, the origin of the Host the request was
    /// sent to is allowed too.
    #[arg(
        long = "allowed-origin",
        env = "CRONIUM_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    allowed_origins: Vec<String>,
    /// Live terminal sessions one user may have at once.
    #[arg(long, env = "CRONIUM_TERMINAL_MAX_PER_USER", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    terminal_max_per_user: u32,
    /// Live terminal sessions one agent may have at once.
    #[arg(long, env = "CRONIUM_TERMINAL_MAX_PER_AGENT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    terminal_max_per_agent: u32,
    /// Idle timeout of terminal sessions without a viewer, asked of the agents (e.g. 90s, 10m);
    /// 0: each agent's own (default 10m).
    #[arg(long, env = "CRONIUM_TERMINAL_IDLE_TIMEOUT", default_value = "0", value_parser = parse_duration)]
    terminal_idle_timeout: Duration,
    /// Maximum age of terminal sessions, asked of the agents (e.g. 30m, 2h); 0: each agent's own
    /// (default 30m).
    #[arg(long, env = "CRONIUM_TERMINAL_MAX_AGE", default_value = "0", value_parser = parse_duration)]
    terminal_max_age: Duration,
    /// Record terminal sessions (asciicast v2, in <data dir>/recordings) of the agents that
    /// opted in (`PATCH /api/v1/agents/{id}` with `{"record_terminals": true}`).
    #[arg(long, env = "CRONIUM_TERMINAL_RECORDING")]
    terminal_recording: bool,
}

impl TerminalArgs {
    /// The control plane's terminal configuration.
    pub fn config(&self) -> anyhow::Result<crate::terminals::TerminalConfig> {
        Ok(crate::terminals::TerminalConfig {
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|origin| origin.trim().to_owned())
                .filter(|origin| !origin.is_empty())
                .collect(),
            max_per_user: self.terminal_max_per_user,
            max_per_agent: self.terminal_max_per_agent,
            idle_timeout: self.terminal_idle_timeout,
            max_age: self.terminal_max_age,
            recording: self.terminal_recording,
        })
    }
}

/// Parses `--relay-url`: an `http` URL with a host and nothing after the port but an optional
/// `/` (no credentials, path, query or fragment). Replicas relay to each other over plain HTTP
/// (`terminals::remote`).
fn parse_relay_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text.trim())
        .map_err(|error| format!("{text:?} is not a URL ({error}); e.g. http://10.0.0.5:8080"))?;
    if url.scheme() != "http" || url.host_str().is_none() {
        return Err(format!(
            "{text:?} must be an http:// URL with a host, e.g. http://10.0.0.5:8080 (replicas relay to each other over plain HTTP)"
        ));
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(format!(
            "{text:?} must be a base URL (scheme, host, port) without credentials, path or query"
        ));
    }
    Ok(url)
}

/// Parses a duration: seconds (`90`) or a number with a unit (`500ms`, `90s`, `10m`, `1h`);
/// `0` is allowed (it means "the default").
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 90, 90s, 10m, 1h)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "m" => Ok(Duration::from_secs(number.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(number.saturating_mul(3600))),
        _ => Err(format!(
            "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
        )),
    }
}

/// Default images of Docker events that name none.
#[derive(Args, Debug, Clone)]
pub struct DockerImageArgs {
    /// Image of Docker bash events without an `image`.
    #[arg(
        long,
        env = "CRONIUM_DOCKER_IMAGE_BASH",
        default_value = "debian:12-slim"
    )]
    docker_image_bash: String,
    /// Image of Docker python events without an `image`.
    #[arg(
        long,
        env = "CRONIUM_DOCKER_IMAGE_PYTHON",
        default_value = "python:3-slim"
    )]
    docker_image_python: String,
    /// Image of Docker nodejs events without an `image`.
    #[arg(
        long,
        env = "CRONIUM_DOCKER_IMAGE_NODEJS",
        default_value = "node:20-slim"
    )]
    docker_image_nodejs: String,
}

impl From<DockerImageArgs> for crate::DockerImages {
    fn from(args: DockerImageArgs) -> crate::DockerImages {
        crate::DockerImages {
            bash: args.docker_image_bash,
            python: args.docker_image_python,
            nodejs: args.docker_image_nodejs,
        }
    }
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create a user and print their generated password.
    Create {
        /// The new user's name.
        name: String,
        /// admin, user or viewer.
        #[arg(long, default_value = "user")]
        role: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create an API token for a user; prints the token alone on stdout.
    Create {
        /// The user the token acts as.
        #[arg(long)]
        user: String,
        /// A name to recognise the token by.
        #[arg(long, default_value = "cli")]
        name: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Subcommand, Debug)]
enum EnrollTokenCommand {
    /// Create an enrollment token and print it with the commands that use it.
    Create {
        /// Labels the enrolled agent gets (k=v,k2=v2).
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Lifetime, e.g. 30m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        api: client::ApiArgs,
    },
}

/// Where and how an event's jobs run.
#[derive(clap::Args, Debug)]
struct RuntimeArgs {
    /// host (a process on the agent's host) or docker (a throwaway container).
    #[arg(long, default_value = "host")]
    runtime: String,
    /// Docker image (default: the control plane's image for the kind).
    #[arg(long)]
    image: Option<String>,
    /// Memory limit in MiB (host jobs: through the agent's cgroups).
    #[arg(long)]
    memory_mb: Option<u32>,
    /// CPU limit in cores, fractions allowed.
    #[arg(long)]
    cpus: Option<f64>,
    /// Maximum number of processes (Docker default: 256; host: no limit).
    #[arg(long)]
    pids: Option<u32>,
    /// Docker network: none or bridge.
    #[arg(long)]
    network: Option<String>,
    /// Docker: mount the container's root file system read-only.
    #[arg(long)]
    read_only: bool,
    /// The user the script runs as (Docker: name or uid[:gid]; host: must be allowed by the
    /// agent's --allow-run-as).
    #[arg(long)]
    user: Option<String>,
}

impl RuntimeArgs {
    /// Adds the runtime fields to an event body.
    fn fill(&self, body: &mut serde_json::Value) {
        body["runtime"] = serde_json::json!(self.runtime);
        if let Some(image) = &self.image {
            body["image"] = serde_json::json!(image);
        }
        let mut limits = serde_json::Map::new();
        if let Some(memory_mb) = self.memory_mb {
            limits.insert("memory_mb".into(), serde_json::json!(memory_mb));
        }
        if let Some(cpus) = self.cpus {
            limits.insert("cpus".into(), serde_json::json!(cpus));
        }
        if let Some(pids) = self.pids {
            limits.insert("pids".into(), serde_json::json!(pids));
        }
        if !limits.is_empty() {
            body["limits"] = serde_json::Value::Object(limits);
        }
        if let Some(network) = &self.network {
            body["network"] = serde_json::json!(network);
        }
        if self.read_only {
            body["read_only"] = serde_json::json!(true);
        }
        if let Some(user) = &self.user {
            body["user"] = serde_json::json!(user);
        }
    }
}

/// Parses NAME=VALUE pairs.
fn parse_env(pairs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
            _ => bail!("--env takes NAME=VALUE, got {pair:?}"),
        })
        .collect()
}

/// The values of `--secret-env NAME`s, read from this process's environment.
fn secret_env_from_environment(
    names: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    names
        .iter()
        .map(|name| match std::env::var(name) {
            Ok(value) => Ok((name.clone(), value)),
            Err(_) => bail!(
                "--secret-env {name}: set the environment variable {name} to the secret's value (it is read from there so that it never appears in a command line)"
            ),
        })
        .collect()
}

/// What an `http_request` or `tool_action` event does.
#[derive(Args, Debug)]
struct ActionArgs {
    /// http_request: a JSON file with the request: {"method", "url", "headers"?, "body"?,
    /// "timeout_seconds"?, "expected_status"?, "follow_redirects"?}.
    #[arg(long)]
    http_file: Option<PathBuf>,
    /// http_request: who makes the request, agent (the targets) or control_plane.
    #[arg(long)]
    executor: Option<String>,
    /// tool_action: the id of the tool to send through.
    #[arg(long)]
    tool: Option<String>,
    /// tool_action: the title (an email's subject).
    #[arg(long)]
    title: Option<String>,
    /// tool_action: the message.
    #[arg(long)]
    message: Option<String>,
}

impl ActionArgs {
    /// Adds `http`, `executor` and `tool_action` to an event body when given.
    fn fill(&self, body: &mut serde_json::Value) -> anyhow::Result<()> {
        if let Some(path) = &self.http_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            body["http"] = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
        }
        if let Some(executor) = &self.executor {
            body["executor"] = serde_json::Value::String(executor.clone());
        }
        if let Some(tool) = &self.tool {
            body["tool_action"] = serde_json::json!({
                "tool_id": tool,
                "title": self.title,
                "message": self.message.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }
}

/// An event's targets on the command line.
#[derive(Args, Debug)]
struct TargetArgs {
    /// Agents (ids or names) to run on, comma-separated.
    #[arg(long, value_delimiter = ',')]
    agents: Vec<String>,
    /// Run on every agent with these labels (k=v,…).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Run each run ONCE, on any one agent with these labels (k=v,…; the first to claim it).
    /// Instead of --agents and --labels.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["agents", "labels"])]
    pool: Vec<String>,
}

impl TargetArgs {
    /// The event's `targets`.
    fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(if self.pool.is_empty() {
            serde_json::json!({"agents": self.agents, "labels": parse_labels(&self.labels)?})
        } else {
            serde_json::json!({"pool": parse_labels(&self.pool)?})
        })
    }
}

#[derive(Subcommand, Debug)]
enum EventCommand {
    /// Create an event.
    Create {
        /// Unique name (per owner).
        name: String,
        /// bash, python, nodejs, http_request or tool_action.
        #[arg(long, default_value = "bash")]
        kind: String,
        /// The script itself.
        #[arg(long, conflicts_with = "script_file")]
        script: Option<String>,
        /// Read the script from this file.
        #[arg(long)]
        script_file: Option<PathBuf>,
        #[command(flatten)]
        targets: Box<TargetArgs>,
        /// Seconds before a run is killed (0: no limit).
        #[arg(long, default_value_t = 3600)]
        timeout: u32,
        /// Extra attempts after a failure.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        #[command(flatten)]
        env: Box<EnvArgs>,
        #[command(flatten)]
        schedule: Box<ScheduleArgs>,
        #[command(flatten)]
        runtime: Box<RuntimeArgs>,
        #[command(flatten)]
        action: Box<ActionArgs>,
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// List events.
    List {
        #[command(flatten)]
        api: client::ApiArgs,
    },
}

/// An event's environment.
#[derive(Args, Debug)]
struct EnvArgs {
    /// Environment of the script, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// A secret environment variable (repeatable): its value is read from this command's own
    /// environment variable NAME, so it never appears in a command line; sealed by the control
    /// plane, masked in output, never shown again.
    #[arg(long = "secret-env", value_name = "NAME")]
    secret_env: Vec<String>,
}

/// An event's schedule (see the README's "Schedules").
#[derive(Args, Debug)]
struct ScheduleArgs {
    /// Run on this cron schedule: 5 fields (minute first) or 6 (second first).
    #[arg(long)]
    cron: Option<String>,
    /// IANA time zone of the schedule (default UTC).
    #[arg(long, requires = "cron")]
    timezone: Option<String>,
    /// Daylight-saving policy: skip, once or twice.
    #[arg(long, requires = "cron")]
    dst: Option<String>,
    /// After downtime: skip or run_once.
    #[arg(long, requires = "cron")]
    misfire: Option<String>,
    /// While the previous scheduled run is unfinished: allow, forbid or queue.
    #[arg(long, requires = "cron")]
    overlap: Option<String>,
}

impl ScheduleArgs {
    /// Sets `schedule` in an event body when `--cron` was given.
    fn fill(&self, body: &mut serde_json::Value) {
        let Some(cron) = &self.cron else { return };
        let mut schedule = serde_json::json!({
            "cron": cron,
            "timezone": self.timezone.as_deref().unwrap_or("UTC"),
        });
        for (key, value) in [
            ("dst", &self.dst),
            ("misfire", &self.misfire),
            ("overlap", &self.overlap),
        ] {
            if let Some(value) = value {
                schedule[key] = serde_json::json!(value);
            }
        }
        body["schedule"] = schedule;
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The event, by id or name.
    event: String,
    /// Run on this target instead of the event's (agent:ID_OR_NAME).
    #[arg(long, conflicts_with = "labels")]
    target: Option<String>,
    /// Run on every agent with these labels instead of the event's targets (k=v,…).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// JSON input for the script.
    #[arg(long)]
    input: Option<String>,
    /// Follow the logs until the run ends and exit with the job's exit code (several hosts: a
    /// live per-host table, then the grouped outputs; non-zero unless every host completed).
    #[arg(long)]
    wait: bool,
    /// Roll out over batches of this many hosts (overrides the event's rollout for this run).
    #[arg(long, conflicts_with = "batch_percent")]
    batch_size: Option<u32>,
    /// Roll out over batches of this percentage of the hosts (overrides the event's rollout).
    #[arg(long)]
    batch_percent: Option<u32>,
    /// Stop the rollout after this many failed hosts (overrides the event's rollout).
    #[arg(long)]
    max_failures: Option<u32>,
    #[command(flatten)]
    api: client::ApiArgs,
}

/// `~/.local/share/cronium` (or `./cronium-data` without a home directory).
fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/cronium"),
        None => PathBuf::from("cronium-data"),
    }
}

/// Parses `k=v` pairs.
pub fn parse_labels(
    pairs: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => bail!("label {pair:?} is not of the form key=value"),
        })
        .collect()
}

/// Parses durations like `90s`, `30m`, `1h`, `2d`.
fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .with_context(|| format!("invalid duration {text:?}"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("invalid duration unit in {text:?}; use s, m, h or d"),
    };
    Ok(number * factor)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = config::parse(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let level = if matches!(cli.command, Command::Serve(_) | Command::Dev(_)) {
            "info"
        } else {
            "warn"
        };
        tracing_subscriber::EnvFilter::new(format!("{level},sqlx=warn,quinn=warn,rustls=warn"))
    });
    cronium_agent::logging::init(cli.log_format, filter);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            match cli.log_format {
                LogFormat::Text => eprintln!("error: {error:#}"),
                LogFormat::Json => {
                    cronium_agent::logging::report_fatal(LogFormat::Json, "cronium", &error)
                }
            }
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args).await.map(|()| ExitCode::SUCCESS),
        Command::Dev(args) => dev::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::User(UserCommand::Create { name, role, data }) => {
            let role = Role::parse(&role)
                .with_context(|| format!("unknown role {role:?}; use admin, user or viewer"))?;
            let store = open_store(&data.data_dir, data.database_url.as_deref()).await?;
            let password = random_token("");
            let hash = crate::http::auth::hash_password(password.clone()).await?;
            store
                .create_user(&name, &hash, role)
                .await
                .map_err(|error| match error {
                    crate::store::StoreError::Constraint(_) => {
                        anyhow::anyhow!("a user named {name:?} already exists")
                    }
                    other => other.into(),
                })?;
            println!(
                "created {} user {name} with password: {password}",
                role.as_str()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Create { user, name, data }) => {
            let store = open_store(&data.data_dir, data.database_url.as_deref()).await?;
            println!("{}", create_api_token(&store, &user, &name).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::EnrollToken(EnrollTokenCommand::Create {
            labels,
            uses,
            ttl,
            api,
        }) => {
            let client = api.client()?;
            let body = serde_json::json!({"labels": parse_labels(&labels)?, "uses": uses, "ttl_seconds": parse_ttl(&ttl)?});
            let created = client.post("/enrollment-tokens", &body).await?;
            println!("token:   {}", created["token"].as_str().unwrap_or_default());
            println!(
                "expires: {}",
                created["expires_at"].as_str().unwrap_or_default()
            );
            println!();
            println!("Enroll a host that has the cronium-agent binary:");
            println!(
                "  {}",
                created["enroll_command"].as_str().unwrap_or_default()
            );
            println!("  cronium-agent run");
            println!();
            println!("Or install, enroll and start the agent on a host in one line:");
            println!(
                "  {}",
                created["install_command"].as_str().unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Event(EventCommand::Create {
            name,
            kind,
            script,
            script_file,
            targets,
            timeout,
            retries,
            env,
            schedule,
            runtime,
            action,
            api,
        }) => {
            let script = match (script, script_file) {
                (Some(script), _) => script,
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, None) if matches!(kind.as_str(), "http_request" | "tool_action") => {
                    String::new()
                }
                (None, None) => bail!("give the script with --script or --script-file"),
            };
            let mut body = serde_json::json!({
                "name": name, "kind": kind, "script": script,
                "targets": targets.json()?,
                "timeout_seconds": timeout, "retries": retries, "env": parse_env(&env.env)?,
            });
            if !env.secret_env.is_empty() {
                body["secret_env"] =
                    serde_json::to_value(secret_env_from_environment(&env.secret_env)?)?;
            }
            runtime.fill(&mut body);
            schedule.fill(&mut body);
            action.fill(&mut body)?;
            let event = api.client()?.post("/events", &body).await?;
            println!("{}", event["id"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Event(EventCommand::List { api }) => {
            let events = api.client()?.get("/events").await?;
            println!(
                "{:<34} {:<24} {:<8} {:<24} TARGETS",
                "ID", "NAME", "KIND", "NEXT RUN"
            );
            for event in events.as_array().into_iter().flatten() {
                println!(
                    "{:<34} {:<24} {:<8} {:<24} {}",
                    event["id"].as_str().unwrap_or_default(),
                    event["name"].as_str().unwrap_or_default(),
                    event["kind"].as_str().unwrap_or_default(),
                    event["next_run_at"].as_str().unwrap_or("-"),
                    event["targets"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => client::run_event(args).await,
        Command::Retry(args) => rollout::retry(args).await,
        Command::Server(command) => server::run(command).await,
        Command::Release(command) => release::run(command).map(|()| ExitCode::SUCCESS),
        Command::AgentUpdate(command) => agent_update::run(command).await,
        Command::Keys(command) => keys::run(command).await.map(|()| ExitCode::SUCCESS),
        Command::Workflow(command) => workflow::run(command).await,
        Command::Backup(args) => backup::run(args).await.map(|()| ExitCode::SUCCESS),
    }
}

/// Runs a parsed command line (tests of commands that work on the database directly).
#[cfg(test)]
pub(crate) async fn dispatch_for_tests(cli: Cli) -> anyhow::Result<()> {
    dispatch(cli.command).await.map(|_| ())
}

/// Creates an API token for `username` and returns it (shown once, stored hashed).
pub async fn create_api_token(
    store: &crate::store::Store,
    username: &str,
    name: &str,
) -> anyhow::Result<String> {
    let (user, _) = store
        .user_with_password(username)
        .await?
        .with_context(|| format!("no user named {username:?}"))?;
    let token = random_token("crt_");
    store
        .create_api_token(&user.id, &sha256_hex(token.as_bytes()), name)
        .await?;
    Ok(token)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.config {
        tracing::info!(config = %path.display(), "settings not given by flags or the environment come from the config file");
    }
    let config = server_config(args)?;
    let shutdown = CancellationToken::new();
    let running = crate::start(config, shutdown.clone()).await?;
    if let Some(password) = &running.admin_password {
        println!("first start: created user admin with password {password}");
    }
    println!(
        "cronium ready http={} quic={}",
        running.local_url(),
        running.quic_addr
    );
    tokio::spawn(watch_signals(shutdown));
    running.wait().await;
    Ok(())
}

/// The control plane's configuration from `serve`'s settings (the config file already applied
/// by [`config::parse`]), checked.
fn server_config(args: ServeArgs) -> anyhow::Result<ServerConfig> {
    let Some(key) = args.encryption_key.as_deref() else {
        bail!(
            "ENCRYPTION_KEY is not set; generate one with `openssl rand -base64 32`, keep it safe, and set it in the environment or the --config file \
             (cronium never falls back to storing secrets in plaintext)"
        );
    };
    let config = ServerConfig {
        data_dir: args.data.data_dir,
        database_url: args.data.database_url,
        http_addr: args.http_addr,
        quic_addr: args.quic_addr,
        public_url: args.public_url,
        quic_public_addrs: args.quic_public_addrs,
        relay_url: args.relay_url.map(|url| url.to_string()),
        encryption_key: EncryptionKey::from_base64(key)?,
        lease: Duration::from_secs(args.lease_seconds.max(1)),
        heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
        docker_images: (*args.docker_images).into(),
        delivery: crate::tools::DeliveryOptions {
            http_jobs_public_only: args.http_jobs_public_only,
            ..Default::default()
        },
        terminals: args.terminals.config()?,
        releases: crate::release::ReleaseConfig {
            dir: args.releases_dir,
            public_key_file: args.release_key,
        },
        metrics_token_sha256: args
            .metrics_token_file
            .as_deref()
            .map(crate::metrics::load_token_sha256)
            .transpose()?,
    };
    if config.heartbeat * 2 > config.lease {
        bail!(
            "--lease-seconds (CRONIUM_LEASE_SECONDS, {} s) must be at least twice --heartbeat-seconds (CRONIUM_HEARTBEAT_SECONDS, {} s)",
            config.lease.as_secs(),
            config.heartbeat.as_secs()
        );
    }
    Ok(config)
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
pub async fn watch_signals(shutdown: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        _ = shutdown.cancelled() => return,
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

#[cfg(test)]
mod runtime_args_tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn runtime_flags_become_event_fields() {
        let cli = Cli::try_parse_from([
            "cronium",
            "event",
            "create",
            "e",
            "--script",
            "true",
            "--runtime",
            "docker",
            "--image",
            "alpine:3",
            "--memory-mb",
            "64",
            "--cpus",
            "0.5",
            "--pids",
            "32",
            "--network",
            "bridge",
            "--read-only",
            "--user",
            "1000:1000",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
        ])
        .unwrap();
        let Command::Event(EventCommand::Create { runtime, env, .. }) = cli.command else {
            panic!("parsed as something else");
        };
        let mut body = serde_json::json!({});
        runtime.fill(&mut body);
        assert_eq!(
            body,
            serde_json::json!({
                "runtime": "docker", "image": "alpine:3",
                "limits": {"memory_mb": 64, "cpus": 0.5, "pids": 32},
                "network": "bridge", "read_only": true, "user": "1000:1000",
            })
        );
        let env = parse_env(&env.env).unwrap();
        assert_eq!(env["B"], "x=y");
        assert!(parse_env(&["novalue".into()]).is_err());
        assert!(parse_env(&["=1".into()]).is_err());
    }

    #[test]
    fn schedule_flags_become_the_event_schedule() {
        let cli = Cli::try_parse_from([
            "cronium",
            "event",
            "create",
            "e",
            "--script",
            "true",
            "--cron",
            "*/5 * * * *",
            "--timezone",
            "Europe/Berlin",
            "--dst",
            "twice",
            "--overlap",
            "forbid",
        ])
        .unwrap();
        let Command::Event(EventCommand::Create { schedule, .. }) = cli.command else {
            panic!("parsed as something else");
        };
        let mut body = serde_json::json!({});
        schedule.fill(&mut body);
        assert_eq!(
            body,
            serde_json::json!({"schedule": {
                "cron": "*/5 * * * *", "timezone": "Europe/Berlin", "dst": "twice", "overlap": "forbid",
            }})
        );
        assert!(
            Cli::try_parse_from(["cronium", "event", "create", "e", "--timezone", "UTC"]).is_err(),
            "--timezone needs --cron"
        );
    }

    #[test]
    fn event_create_takes_a_pool_instead_of_agents_and_labels() {
        let argv = "cronium event create e --script true --pool role=web,zone=b";
        let cli = Cli::try_parse_from(argv.split(' ')).unwrap();
        let Command::Event(EventCommand::Create { targets, .. }) = cli.command else {
            panic!("parsed as something else");
        };
        assert_eq!(
            targets.json().unwrap(),
            serde_json::json!({"pool": {"role": "web", "zone": "b"}})
        );
        for other in ["--agents", "--labels"] {
            let argv = format!("cronium event create e --pool role=web {other} x=y");
            assert!(
                Cli::try_parse_from(argv.split(' ')).is_err(),
                "--pool with {other}"
            );
        }
    }

    #[test]
    fn terminal_flags_become_the_terminal_config() {
        let cli = Cli::try_parse_from([
            "cronium",
            "serve",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
            "--terminal-idle-timeout",
            "2s",
            "--terminal-max-age",
            "1h",
            "--terminal-max-per-user",
            "3",
            "--terminal-recording",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("parsed as something else");
        };
        let config = args.terminals.config().unwrap();
        assert_eq!(
            config.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(config.idle_timeout, Duration::from_secs(2));
        assert_eq!(config.max_age, Duration::from_secs(3600));
        assert_eq!(config.max_per_user, 3);
        assert_eq!(config.max_per_agent, 10);
        assert!(config.recording);
        let defaults = Cli::try_parse_from(["cronium", "serve"]).unwrap();
        let Command::Serve(args) = defaults.command else {
            panic!("parsed as something else");
        };
        assert_eq!(
            args.terminals.config().unwrap(),
            crate::terminals::TerminalConfig::default()
        );
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-1").is_err());
    }
}

#[cfg(test)]
mod relay_url_tests {
    use clap::Parser;

    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["cronium", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(serve) => Ok(serve),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_relay_url_is_an_http_base_url() {
        assert_eq!(serve(&[]).unwrap().relay_url, None);
        for (given, stored) in [
            ("http://10.0.0.5:8080", "http://10.0.0.5:8080/"),
            ("http://a.internal:8080/", "http://a.internal:8080/"),
            ("http://[fd00::5]:8080", "http://[fd00::5]:8080/"),
        ] {
            let parsed = serve(&["--relay-url", given]).unwrap().relay_url.unwrap();
            assert_eq!(parsed.as_str(), stored);
        }
        for refused in [
            "",
            "10.0.0.5:8080",
            "https://a.internal:8080",
            "ftp://a.internal",
            "http://user:secret@a.internal:8080",
            "http://a.internal:8080/api",
            "http://a.internal:8080/?x=1",
            "http://a.internal:8080/#top",
        ] {
            let error = serve(&["--relay-url", refused]).unwrap_err();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{refused:?}: {error}"
            );
        }
    }
}
