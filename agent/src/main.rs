//! The `cronium-agent` binary: parses the command line, sets up logging and signals, and calls
//! the library's [`cronium_agent::enroll`] or [`cronium_agent::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cronium_agent::logging::LogFormat;
use cronium_agent::{AgentOptions, EnrollOptions, SelfUpdateOptions, TerminalOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// The Cronium agent: connects out to the control plane and runs jobs.
#[derive(Debug, Parser)]
#[command(name = "cronium-agent", version)]
struct Cli {
    /// Log lines on stderr: `text`, or `json` (one object per line with `timestamp`, `level`,
    /// `message`, `target` and the event's fields).
    #[arg(long, global = true, env = "CRONIUM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trades an enrollment token for an identity (key and client certificate) in the state dir.
    Enroll(EnrollArgs),
    /// Connects to the control plane over QUIC and runs jobs until stopped.
    Run(RunArgs),
    /// Prints the version, the target triple and the protocol version.
    Version,
    /// Guards a new binary on trial after a self-update (started by the agent itself).
    #[command(hide = true)]
    UpdateWatchdog {
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// The control plane's public HTTP(S) URL.
    #[arg(long, env = "CRONIUM_SERVER_URL")]
    server: String,
    /// The enrollment token (prefer the environment variable, so it stays out of process listings).
    #[arg(long, env = "CRONIUM_ENROLL_TOKEN", hide_env_values = true)]
    token: String,
    /// SHA-256 (hex) of the control plane's CA certificate; enrollment is refused if it differs.
    #[arg(long, env = "CRONIUM_CA_SHA256")]
    ca_sha256: String,
    /// The agent's name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Labels, as `key=value,key2=value2`.
    #[arg(long, value_parser = cronium_agent::parse_labels, default_value = "")]
    labels: std::collections::BTreeMap<String, String>,
    /// Where the identity, the spool and the work dirs live.
    #[arg(
        long,
        env = "CRONIUM_AGENT_STATE_DIR",
        default_value = "/var/lib/cronium-agent"
    )]
    state_dir: PathBuf,
    /// Replace an existing identity in the state dir.
    #[arg(long)]
    force: bool,
    /// The release PUBLIC key (PEM) to pin for self-updates: copied to the state dir as
    /// `release-key.pub` (an agent without a pinned key refuses every update).
    #[arg(long, value_name = "FILE")]
    release_key: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where the identity, the spool and the work dirs live.
    #[arg(
        long,
        env = "CRONIUM_AGENT_STATE_DIR",
        default_value = "/var/lib/cronium-agent"
    )]
    state_dir: PathBuf,
    /// How many jobs run at once.
    #[arg(long, env = "CRONIUM_AGENT_CAPACITY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    capacity: u32,
    /// Output kept per job attempt, in bytes; the rest is replaced by a truncation marker.
    #[arg(long, env = "CRONIUM_AGENT_MAX_LOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_log_bytes: u64,
    /// Ceiling of the jittered reconnect backoff, in milliseconds.
    #[arg(long, env = "CRONIUM_AGENT_RECONNECT_MAX_MS", default_value_t = 30_000)]
    reconnect_max_ms: u64,
    /// On SIGINT/SIGTERM, how long running jobs may finish before they are killed (a second
    /// signal kills them at once).
    #[arg(
        long,
        env = "CRONIUM_AGENT_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 30
    )]
    shutdown_grace_seconds: u64,
    /// Users (names or uids, comma-separated) that host jobs may run as besides the agent's own
    /// user, through an event's `user`. Needs the agent to run as root; makes the state dir and
    /// its work dir searchable (0711) so these users can reach their jobs' work dirs. Jobs asking
    /// for any other user fail with reason `spawn`.
    #[arg(
        long,
        env = "CRONIUM_AGENT_ALLOW_RUN_AS",
        value_delimiter = ',',
        value_name = "USER[,USER...]"
    )]
    allow_run_as: Vec<String>,
    /// Refuse every terminal session (the console's "open terminal" on this server).
    #[arg(long, env = "CRONIUM_AGENT_NO_TERMINALS")]
    no_terminals: bool,
    /// The shell of terminal sessions, started as a login shell [default: the agent user's
    /// login shell from the user database, else /bin/sh].
    #[arg(long, env = "CRONIUM_AGENT_TERMINAL_SHELL")]
    terminal_shell: Option<PathBuf>,
    /// Output kept per terminal session (KiB) and replayed to a viewer that attaches.
    #[arg(long, env = "CRONIUM_AGENT_TERMINAL_SCROLLBACK_KIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    terminal_scrollback_kib: u32,
    /// A terminal session without any viewer for this long is ended (e.g. 600, 90s, 10m, 1h;
    /// the control plane may ask for another value per session).
    #[arg(long, env = "CRONIUM_AGENT_TERMINAL_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    terminal_idle_timeout: Duration,
    /// A terminal session older than this is ended (the control plane may ask for another
    /// value per session).
    #[arg(long, env = "CRONIUM_AGENT_TERMINAL_MAX_AGE", default_value = "30m", value_parser = parse_duration)]
    terminal_max_age: Duration,
    /// Terminal sessions this agent runs at once; more are refused.
    #[arg(long, env = "CRONIUM_AGENT_TERMINAL_MAX_SESSIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    terminal_max_sessions: u32,
    /// After a self-update, how long the new binary has to connect to the control plane before
    /// the previous one is started again (rolled back).
    #[arg(long, env = "CRONIUM_AGENT_UPDATE_DEADLINE", default_value = "2m", value_parser = parse_duration)]
    update_deadline: Duration,
}

/// Parses a duration: seconds (`90`) or a number with a unit (`500ms`, `90s`, `10m`, `1h`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 90, 90s, 10m, 1h)"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if duration.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(duration)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::UpdateWatchdog { state_dir } = &cli.command {
        // Before any thread exists: the watchdog forks.
        return cronium_agent::update::watchdog::run(state_dir);
    }
    if let Command::Version = cli.command {
        println!(
            "cronium-agent {} ({}), protocol {}..={}",
            cronium_agent::VERSION,
            cronium_agent::TARGET,
            cronium_protocol::MIN_PROTOCOL_VERSION,
            cronium_protocol::PROTOCOL_VERSION
        );
        return ExitCode::SUCCESS;
    }
    cronium_agent::logging::init(
        cli.log_format,
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    );
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(dispatch(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            cronium_agent::logging::report_fatal(cli.log_format, "cronium-agent", &error);
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Enroll(args) => {
            // Checked before enrolling, so a bad key file leaves nothing behind.
            let release_key = match &args.release_key {
                Some(path) => Some(cronium_agent::update::pinned_key_text(path)?),
                None => None,
            };
            let identity = cronium_agent::enroll(EnrollOptions {
                server_url: args.server,
                token: args.token,
                ca_sha256: args.ca_sha256,
                name: args.name,
                labels: args.labels,
                state_dir: args.state_dir,
                force: args.force,
            })
            .await?;
            if let Some(text) = release_key {
                cronium_agent::update::pin_release_key(&identity.state_dir, &text)?;
            }
            println!(
                "enrolled as {} ({}) in {}",
                identity.name,
                identity.agent_id,
                identity.state_dir.display()
            );
            Ok(())
        }
        Command::Run(args) => {
            let shutdown = CancellationToken::new();
            let force_stop = CancellationToken::new();
            let options = AgentOptions {
                state_dir: args.state_dir,
                capacity: args.capacity,
                max_log_bytes: args.max_log_bytes,
                reconnect_max: Duration::from_millis(args.reconnect_max_ms),
                shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
                force_stop: force_stop.clone(),
                allow_run_as: args
                    .allow_run_as
                    .into_iter()
                    .map(|user| user.trim().to_owned())
                    .filter(|user| !user.is_empty())
                    .collect(),
            };
            let terminals = TerminalOptions {
                enabled: !args.no_terminals,
                shell: args.terminal_shell,
                scrollback_bytes: args.terminal_scrollback_kib as usize * 1024,
                idle_timeout: args.terminal_idle_timeout,
                max_age: args.terminal_max_age,
                max_sessions: args.terminal_max_sessions as usize,
            };
            let signals = watch_signals(shutdown.clone(), force_stop);
            tokio::select! {
                result = cronium_agent::run_self_updating(
                    options,
                    terminals,
                    SelfUpdateOptions { deadline: args.update_deadline },
                    shutdown,
                ) => result,
                error = signals => Err(error),
            }
        }
        Command::Version | Command::UpdateWatchdog { .. } => Ok(()),
    }
}

/// The first SIGINT/SIGTERM cancels `shutdown` (graceful stop), the second `force_stop`.
/// Completes only if the signal handlers cannot be installed.
async fn watch_signals(
    shutdown: CancellationToken,
    force_stop: CancellationToken,
) -> anyhow::Error {
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
        (Err(error), _) | (_, Err(error)) => {
            return anyhow::Error::new(error).context("cannot install signal handlers");
        }
    };
    loop {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        if shutdown.is_cancelled() {
            tracing::warn!("second stop signal: killing running jobs");
            force_stop.cancel();
        } else {
            tracing::info!("stop signal: finishing running jobs (send it again to kill them)");
            shutdown.cancel();
        }
    }
}
