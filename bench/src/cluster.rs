//! Starting the system under test: the control plane and the agent as child processes, and
//! enrolled identities for in-process agents.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use rand::RngCore;
use serde_json::json;
use tokio::sync::mpsc;

use crate::api::Api;
use crate::procs::{Binaries, ChildGuard, run_output};

/// How long the control plane may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running control plane.
pub struct ControlPlane {
    /// The `cronium serve` process.
    pub process: ChildGuard,
    /// The authenticated API client.
    pub api: Api,
    /// The QUIC address it listens on.
    pub quic: String,
}

impl ControlPlane {
    /// Starts `cronium serve` on 127.0.0.1 with a fresh data dir under `data_dir`, waits for its
    /// ready line and creates an API token for the admin.
    pub async fn start(binaries: &Binaries, data_dir: &Path) -> anyhow::Result<ControlPlane> {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        Ok(
            ControlPlane::start_at(binaries, data_dir, &Listen::any(), &key, None)
                .await?
                .0,
        )
    }

    /// Starts `cronium serve` on `data_dir` with the encryption key `key` (base64), listening
    /// where `listen` says, and waits for its ready line; then creates an API token for the
    /// admin, or uses `token` (a token of this data dir, after a restart). Also returns the
    /// addresses it listens on, to start it again on the same ports.
    pub async fn start_at(
        binaries: &Binaries,
        data_dir: &Path,
        listen: &Listen,
        key: &str,
        token: Option<&str>,
    ) -> anyhow::Result<(ControlPlane, Listen)> {
        let (sender, mut lines) = mpsc::unbounded_channel();
        let mut command = Command::new(&binaries.cronium);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http", &listen.http, "--quic", &listen.quic])
            .args(&listen.extra)
            .envs(listen.env.iter().map(|(name, value)| (name, value)))
            .env("ENCRYPTION_KEY", key)
            .env("RUST_LOG", "warn");
        let mut process = ChildGuard::spawn(
            "the control plane (cronium serve)",
            &mut command,
            Some(sender),
        )?;

        let deadline = Instant::now() + READY_TIMEOUT;
        let (http, quic) = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix("cronium ready ") {
                        let field = |name: &str| {
                            rest.split_whitespace()
                                .find_map(|part| part.strip_prefix(name))
                                .map(str::to_owned)
                        };
                        match (field("http="), field("quic=")) {
                            (Some(http), Some(quic)) => break (http, quic),
                            _ => bail!("cannot parse the ready line {line:?}"),
                        }
                    }
                }
                Ok(None) => {
                    process.ensure_running()?;
                    bail!(
                        "the control plane closed its output before it was ready:\n{}",
                        process.tail()
                    );
                }
                Err(_) => bail!(
                    "the control plane was not ready within {READY_TIMEOUT:?}; its output:\n{}",
                    process.tail()
                ),
            }
        };
        // Later lines are still drained into the guard's tail; nobody needs them here.
        drop(lines);
        for address in [&http, &quic] {
            if !address.contains("127.0.0.1") {
                bail!("the control plane listens on {address}, not on 127.0.0.1");
            }
        }

        let token = match token {
            Some(token) => token.to_owned(),
            None => {
                let mut token_command = tokio::process::Command::new(&binaries.cronium);
                token_command
                    .args(["token", "create", "--user", "admin", "--data-dir"])
                    .arg(data_dir)
                    .envs(listen.env.iter().map(|(name, value)| (name, value)))
                    .env("ENCRYPTION_KEY", key)
                    .env("RUST_LOG", "warn");
                let token = run_output(
                    "cronium token create",
                    token_command,
                    Duration::from_secs(30),
                )
                .await?;
                let token = token.trim().to_owned();
                if token.is_empty() || token.contains(char::is_whitespace) {
                    bail!("cronium token create printed something unexpected");
                }
                token
            }
        };
        let api = Api::new(&http, &token)?;
        let bound = Listen {
            http: http.trim_start_matches("http://").to_owned(),
            quic: quic.clone(),
            extra: listen.extra.clone(),
            env: listen.env.clone(),
        };
        Ok((ControlPlane { process, api, quic }, bound))
    }

    /// The control plane's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Where `cronium serve` listens, and extra `serve` arguments.
#[derive(Debug, Clone)]
pub struct Listen {
    /// `--http`, `host:port`.
    pub http: String,
    /// `--quic`, `host:port`.
    pub quic: String,
    /// More `cronium serve` arguments.
    pub extra: Vec<String>,
    /// Environment of `cronium serve` and `cronium token create` (e.g. `CRONIUM_DATABASE_URL`).
    pub env: Vec<(String, String)>,
}

impl Listen {
    /// Free ports on 127.0.0.1, default settings.
    pub fn any() -> Listen {
        Listen {
            http: "127.0.0.1:0".into(),
            quic: "127.0.0.1:0".into(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// An enrollment token and the CA fingerprint agents pin.
pub struct Enrollment {
    /// The one-time (or N-time) token.
    pub token: String,
    /// SHA-256 of the control plane's CA certificate.
    pub ca_sha256: String,
}

/// Creates an enrollment token usable `uses` times.
pub async fn enrollment_token(api: &Api, uses: usize) -> anyhow::Result<Enrollment> {
    let created = api
        .post(
            "/enrollment-tokens",
            &json!({"uses": uses, "ttl_seconds": 3600}),
        )
        .await?;
    Ok(Enrollment {
        token: created["token"]
            .as_str()
            .context("no token in the enrollment-token response")?
            .to_owned(),
        ca_sha256: created["ca_sha256"]
            .as_str()
            .context("no ca_sha256 in the enrollment-token response")?
            .to_owned(),
    })
}

/// Enrolls with the `cronium-agent enroll` binary (the token is passed in the environment, so it
/// stays out of process listings) and starts `cronium-agent run` as a child process whose
/// terminals run `terminal_shell`.
pub async fn start_agent_process(
    binaries: &Binaries,
    api: &Api,
    name: &str,
    state_dir: &Path,
    capacity: u32,
    terminal_shell: &Path,
) -> anyhow::Result<ChildGuard> {
    start_labeled_agent_process(binaries, api, name, "", state_dir, capacity, terminal_shell).await
}

/// [`start_agent_process`] for an agent enrolled with `labels` (`k=v,…`, may be empty).
pub async fn start_labeled_agent_process(
    binaries: &Binaries,
    api: &Api,
    name: &str,
    labels: &str,
    state_dir: &Path,
    capacity: u32,
    terminal_shell: &Path,
) -> anyhow::Result<ChildGuard> {
    let enrollment = enrollment_token(api, 1).await?;
    let mut enroll = tokio::process::Command::new(&binaries.agent);
    enroll
        .arg("enroll")
        .args([
            "--server",
            api.base(),
            "--ca-sha256",
            &enrollment.ca_sha256,
            "--name",
            name,
        ])
        .args(if labels.is_empty() {
            Vec::new()
        } else {
            vec!["--labels", labels]
        })
        .arg("--state-dir")
        .arg(state_dir)
        .env("CRONIUM_ENROLL_TOKEN", &enrollment.token)
        .env("RUST_LOG", "warn");
    run_output("cronium-agent enroll", enroll, Duration::from_secs(60)).await?;

    let mut run = Command::new(&binaries.agent);
    run.arg("run")
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--capacity", &capacity.to_string()])
        .arg("--terminal-shell")
        .arg(terminal_shell)
        .env("RUST_LOG", "warn");
    // The agent finds the Docker engine through DOCKER_HOST (or the default socket); pass it on
    // explicitly so the Docker phase's jobs use the engine this process measures.
    if let Some(docker_host) = std::env::var_os("DOCKER_HOST") {
        run.env("DOCKER_HOST", docker_host);
    }
    ChildGuard::spawn("the agent (cronium-agent run)", &mut run, None)
}

/// Polls `GET /agents` until every agent named in `names` is online, or fails at `timeout`.
pub async fn wait_online(
    api: &Api,
    names: &[String],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let wanted: std::collections::BTreeSet<&str> = names.iter().map(String::as_str).collect();
    loop {
        let agents = api.get("/agents").await?;
        let online = agents
            .as_array()
            .map(|agents| {
                agents
                    .iter()
                    .filter(|agent| agent["status"] == "online")
                    .filter(|agent| {
                        agent["name"]
                            .as_str()
                            .is_some_and(|name| wanted.contains(name))
                    })
                    .count()
            })
            .unwrap_or(0);
        if online == wanted.len() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "only {online} of {} agents came online within {timeout:?}",
                wanted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Enrolls `count` identities in-process under `root/NNNN` with `labels`, a few at a time
/// (`cronium_e2e::fleet::enroll`), and returns their state dirs and names.
pub async fn enroll_in_process(
    api: &Api,
    root: &Path,
    prefix: &str,
    count: usize,
    labels: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let enrollment = enrollment_token(api, count).await?;
    let identities = cronium_e2e::fleet::enroll(
        api.base(),
        &enrollment.token,
        &enrollment.ca_sha256,
        root,
        prefix,
        count,
        labels,
    )
    .await?;
    Ok(identities
        .into_iter()
        .map(|identity| (identity.state_dir, identity.name))
        .collect())
}
