//! SSH bootstrap: installs the agent on a server over SSH and switches the server to
//! `connection: agent` (`POST /servers/{id}/install-agent`, `cronium server install-agent`).
//!
//! The steps: connect with the server's sealed credentials (the host key checked against the pin,
//! or pinned on first use, exactly as for fallback jobs); ask the host for its system,
//! architecture and user id; pick the newest signed release this control plane has for that
//! target; upload the release's four files, the installer and a small wrapper into a fresh
//! private temp dir over SFTP (through `cat` on stdin when the server has no SFTP subsystem);
//! run the installer with `--from-dir`, which verifies the signatures and the sha256 on the host
//! before anything is moved into place, with a fresh single-use enrollment token; remove the temp
//! dir; wait until the agent is online (connected to any replica); switch the server. Every step
//! reports progress to the caller, and the install goes on to its end when the caller goes away.
//!
//! As for fallback jobs, nothing from the server or the request is interpolated into a remote
//! command line: the commands are fixed strings around the checked temp dir path, and the values
//! (the token, the name, the prefix) are single-quoted inside the wrapper, which travels as bytes.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use russh::ChannelMsg;
use russh::client::Handle;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::session::{Client, STEP_TIMEOUT, checked_dir, connect, exec_collect, single_quoted};
use crate::AppState;
use crate::http::enrollment::{CreateRequest, create_token};
use crate::release::{self, PublicKey, RELEASE_FILES};
use crate::store::servers::{Connection, Server, ServerFields};

/// How long the installer may run (it verifies a large binary with openssl on the host).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the new agent has to come online after the installer finished.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(90);
/// The enrollment token's lifetime: long enough for a slow upload and install.
const TOKEN_TTL_SECONDS: u64 = 30 * 60;
/// Upload chunk size (and progress granularity).
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Installer output forwarded to the caller; the rest is counted and dropped.
const MAX_OUTPUT_LINES: usize = 2000;
/// Progress messages waiting for a slow caller.
const PROGRESS_QUEUE: usize = 256;

/// How the agent is kept running on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceMode {
    /// A hardened systemd unit (needs root and systemd on the host).
    Systemd,
    /// In the background in its own session (`install.sh --no-service --detach`), for hosts
    /// without systemd.
    Detached,
}

impl ServiceMode {
    pub fn parse(text: &str) -> Option<ServiceMode> {
        match text {
            "systemd" => Some(ServiceMode::Systemd),
            "detached" => Some(ServiceMode::Detached),
            _ => None,
        }
    }
}

/// What the caller asked for.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    pub service: ServiceMode,
    /// `--prefix` for the installer (checked by the caller: absolute, plain characters).
    pub prefix: Option<String>,
    /// Who asked (for the enrollment token and the audit log).
    pub actor_id: String,
    pub actor_name: String,
}

/// One line of progress, sent to the caller as a JSON object per line.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Progress {
    /// A step started or moved on (`step`: connect, inspect, upload, install, wait, switch).
    Step { step: &'static str, message: String },
    /// A line the installer printed on the host.
    Output { stream: &'static str, line: String },
    /// The agent is online and the server uses it.
    Done {
        agent_id: String,
        agent_name: String,
    },
    /// The install failed; nothing was switched.
    Failed { message: String },
}

/// Sends progress; a caller that went away does not stop the install.
struct Reporter {
    tx: mpsc::Sender<Progress>,
}

impl Reporter {
    async fn send(&self, progress: Progress) {
        let _ = self.tx.send(progress).await;
    }

    async fn step(&self, step: &'static str, message: impl Into<String>) {
        self.send(Progress::Step {
            step,
            message: message.into(),
        })
        .await;
    }
}

/// Why an install cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("an agent install on this server is already running")]
    AlreadyRunning,
}

/// Starts installing the agent on `server` in a task owned by the control plane; the receiver
/// gets its progress and ends with `Done` or `Failed`.
pub fn start(
    state: &AppState,
    server: Server,
    options: InstallOptions,
) -> Result<mpsc::Receiver<Progress>, StartError> {
    let Some(installing) = state.ssh.begin_install(&server.id) else {
        return Err(StartError::AlreadyRunning);
    };
    let (tx, rx) = mpsc::channel(PROGRESS_QUEUE);
    let state = state.clone();
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let reporter = Reporter { tx };
        let server_id = server.id.clone();
        let outcome = tokio::select! {
            outcome = install(&state, &server, &options, &reporter) => outcome,
            _ = state.shutdown.cancelled() => Err(anyhow!("the control plane is shutting down")),
        };
        let audit = match &outcome {
            Ok((agent_id, agent_name)) => {
                info!(server = %server.name, agent = %agent_id, "agent installed over SSH");
                reporter
                    .send(Progress::Done {
                        agent_id: agent_id.clone(),
                        agent_name: agent_name.clone(),
                    })
                    .await;
                serde_json::json!({"server_id": server_id, "agent_id": agent_id})
            }
            Err(error) => {
                let message = format!("{error:#}");
                warn!(server = %server.name, error = %message, "agent install over SSH failed");
                reporter
                    .send(Progress::Failed {
                        message: message.clone(),
                    })
                    .await;
                serde_json::json!({"server_id": server_id, "error": message})
            }
        };
        let kind = if outcome.is_ok() {
            "agent_installed_over_ssh"
        } else {
            "agent_install_over_ssh_failed"
        };
        if let Err(error) = state
            .store
            .audit(kind, Some(&options.actor_name), &audit)
            .await
        {
            warn!(%error, "could not audit an agent install");
        }
        drop(installing);
    });
    Ok(rx)
}

/// The Rust target triple of a Linux machine name (`uname -m`), as the installer maps it.
pub fn target_of_machine(machine: &str) -> Option<&'static str> {
    match machine {
        "x86_64" | "amd64" => Some("x86_64-unknown-linux-gnu"),
        "aarch64" | "arm64" => Some("aarch64-unknown-linux-gnu"),
        _ => None,
    }
}

/// What the host said about itself.
struct Host {
    target: &'static str,
    root: bool,
}

/// Parses the output of `uname -s; uname -m; id -u`.
fn parse_host(output: &[u8]) -> anyhow::Result<Host> {
    let text = String::from_utf8_lossy(output);
    let mut lines = text.lines().map(str::trim);
    let (system, machine, uid) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    if system != "Linux" {
        bail!("the host runs {system:?}; the agent runs on Linux");
    }
    let target = target_of_machine(machine).ok_or_else(|| {
        anyhow!("the host's architecture {machine:?} has no agent build (x86_64 and aarch64 do)")
    })?;
    let uid: u32 = uid
        .parse()
        .map_err(|_| anyhow!("`id -u` printed {uid:?}"))?;
    Ok(Host {
        target,
        root: uid == 0,
    })
}

/// The whole install; returns the agent's id and name.
async fn install(
    state: &AppState,
    server: &Server,
    options: &InstallOptions,
    reporter: &Reporter,
) -> anyhow::Result<(String, String)> {
    let ssh = server
        .ssh
        .clone()
        .ok_or_else(|| anyhow!("the server has no SSH settings"))?;
    // An agent of another host with this name would pass for ours.
    let existing = state
        .store
        .agents()
        .await?
        .into_iter()
        .find(|agent| agent.revoked_at.is_none() && agent.name == server.name);
    if let Some(agent) = &existing
        && server.agent_id.as_deref() != Some(agent.id.as_str())
    {
        bail!(
            "an agent named {:?} is enrolled already (id {}); revoke it or rename the server first",
            agent.name,
            agent.id
        );
    }

    reporter
        .step(
            "connect",
            format!("connecting to {}@{}:{}", ssh.username, ssh.host, ssh.port),
        )
        .await;
    let mut notes = Vec::new();
    let connected = connect(state, &server.id, &ssh, &mut |note| notes.push(note)).await;
    for note in notes {
        reporter.step("connect", note).await;
    }
    let session = connected?;
    let outcome = install_over(state, server, options, reporter, &session).await;
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    let agent_name = outcome?;

    reporter
        .step("wait", "waiting for the agent to come online")
        .await;
    let agent_id = wait_online(state, &agent_name).await?;
    reporter
        .step(
            "switch",
            format!("agent {agent_id} is online; the server now runs its jobs through it"),
        )
        .await;
    let fields = ServerFields {
        name: server.name.clone(),
        address: server.address.clone(),
        labels: server.labels.clone(),
        connection: Connection::Agent,
        agent_id: Some(agent_id.clone()),
        ssh: server.ssh.clone(),
    };
    state.store.update_server(&server.id, &fields).await?;
    state
        .changes
        .notify_owned(crate::changes::Kind::Server, &server.id, &server.owner_id);
    Ok((agent_id, agent_name))
}

/// Everything done on the host, in a temp dir that is always removed; returns the agent name.
async fn install_over(
    state: &AppState,
    server: &Server,
    options: &InstallOptions,
    reporter: &Reporter,
    session: &Handle<Client>,
) -> anyhow::Result<String> {
    let (status, output) = exec_collect(session, "uname -s; uname -m; id -u", b"").await?;
    if status != 0 {
        bail!("could not inspect the host (uname/id exited with {status})");
    }
    let host = parse_host(&output)?;
    let releases = state.config.releases_dir.clone();
    let target = host.target;
    let version = tokio::task::spawn_blocking({
        let releases = releases.clone();
        move || release::latest_version(&releases, target)
    })
    .await?
    .ok_or_else(|| {
        anyhow!(
            "this control plane has no signed agent release for {target} (publish one with `cronium release publish`)"
        )
    })?;
    let use_sudo =
        !host.root && (options.service == ServiceMode::Systemd || options.prefix.is_none());
    reporter
        .step(
            "inspect",
            format!(
                "the host is {target}{}; installing cronium-agent {version}",
                if use_sudo {
                    ", the SSH user is not root: the installer runs with `sudo -n`"
                } else {
                    ""
                }
            ),
        )
        .await;

    let key_path = crate::http::downloads::release_key_path(state);
    let key = PublicKey::load(&key_path).context("the release public key")?;
    let installer = crate::http::downloads::render_install_script(state, &key);
    let dir_of_release = releases.join(&version).join(target);
    let mut files = Vec::new();
    for name in RELEASE_FILES {
        let path = dir_of_release.join(name);
        let bytes = tokio::fs::read(&path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        files.push((name.to_string(), bytes));
    }
    // The control plane checks its own release before shipping it.
    release::verify_release(&key, &files[0].1, &files[1].1, &files[2].1, &files[3].1)
        .context("the release on this control plane does not verify")?;
    files.push(("install.sh".into(), installer.into_bytes()));

    let (status, output) = exec_collect(
        session,
        "umask 077 && mktemp -d \"${TMPDIR:-/tmp}/cronium-bootstrap.XXXXXXXXXX\"",
        b"",
    )
    .await?;
    let dir = match (status, checked_dir(&output)) {
        (0, Some(dir)) => dir,
        _ => bail!("could not make a temp dir on the host (mktemp exited with {status})"),
    };
    let outcome = upload_and_run(
        state, server, options, reporter, session, &dir, files, use_sudo,
    )
    .await;
    // The user owns the dir and everything in it (with sudo, the installer only read from it).
    if let Err(error) = exec_collect(session, &format!("rm -rf -- {dir}"), b"").await {
        reporter
            .step(
                "install",
                format!("could not remove the temp dir {dir}: {error:#}"),
            )
            .await;
    }
    outcome.map(|()| server.name.clone())
}

#[allow(clippy::too_many_arguments)]
async fn upload_and_run(
    state: &AppState,
    server: &Server,
    options: &InstallOptions,
    reporter: &Reporter,
    session: &Handle<Client>,
    dir: &str,
    files: Vec<(String, Vec<u8>)>,
    use_sudo: bool,
) -> anyhow::Result<()> {
    upload(reporter, session, dir, &files).await?;

    let token = create_token(
        state,
        &CreateRequest {
            labels: server.labels.clone(),
            uses: Some(1),
            ttl_seconds: Some(TOKEN_TTL_SECONDS),
        },
        Some(&options.actor_id),
    )
    .await
    .map_err(|error| anyhow!("could not create an enrollment token: {error:?}"))?;
    let mut wrapper = format!(
        "export CRONIUM_ENROLL_TOKEN={}\nexec sh ./install.sh --from-dir {dir} --name {}",
        single_quoted(&token.token),
        single_quoted(&server.name)
    );
    if let Some(prefix) = &options.prefix {
        wrapper.push_str(&format!(" --prefix {}", single_quoted(prefix)));
    }
    if options.service == ServiceMode::Detached {
        wrapper.push_str(" --no-service --detach");
    }
    wrapper.push('\n');
    put_with_cat(session, dir, "run.sh", wrapper.as_bytes()).await?;

    reporter
        .step("install", "running the installer on the host")
        .await;
    let command = if use_sudo {
        format!("cd {dir} && sudo -n sh ./run.sh")
    } else {
        format!("cd {dir} && sh ./run.sh")
    };
    let mut channel = session.channel_open_session().await?;
    channel.exec(true, command).await?;
    channel.eof().await?;
    let mut lines = LineSplitter::default();
    let mut status = None;
    let run = async {
        while let Some(message) = channel.wait().await {
            let (stream, data) = match message {
                ChannelMsg::Data { data } => ("stdout", data),
                ChannelMsg::ExtendedData { data, ext: 1 } => ("stderr", data),
                ChannelMsg::ExitStatus { exit_status } => {
                    status = Some(exit_status);
                    continue;
                }
                _ => continue,
            };
            for line in lines.push(stream, &data) {
                reporter.send(line).await;
            }
        }
        for line in lines.finish() {
            reporter.send(line).await;
        }
    };
    tokio::time::timeout(INSTALL_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow!(
                "the installer did not finish within {} s",
                INSTALL_TIMEOUT.as_secs()
            )
        })?;
    match status {
        Some(0) => Ok(()),
        Some(code) if use_sudo && lines.saw_sudo_refusal => bail!(
            "the installer needs root and `sudo -n` was refused (exit {code}): give the SSH user passwordless sudo, connect as root, or use service \"detached\" with a prefix the user can write"
        ),
        Some(code) => bail!("the installer failed on the host (exit {code}; its output is above)"),
        None => bail!("the installer's SSH channel closed without an exit status"),
    }
}

/// Uploads the files into `dir`: over SFTP when the server offers it, else through `cat`.
async fn upload(
    reporter: &Reporter,
    session: &Handle<Client>,
    dir: &str,
    files: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let total: usize = files.iter().map(|(_, bytes)| bytes.len()).sum();
    let sftp = async {
        let channel = session.channel_open_session().await?;
        channel.request_subsystem(true, "sftp").await?;
        let sftp = russh_sftp::client::SftpSession::new(channel.into_stream()).await?;
        anyhow::Ok(sftp)
    };
    let sftp = match tokio::time::timeout(STEP_TIMEOUT, sftp).await {
        Ok(Ok(sftp)) => Some(sftp),
        Ok(Err(error)) => {
            reporter
                .step(
                    "upload",
                    format!("no SFTP on the host ({error}); uploading through `cat` instead"),
                )
                .await;
            None
        }
        Err(_) => {
            reporter
                .step(
                    "upload",
                    "the host's SFTP subsystem did not answer; uploading through `cat` instead",
                )
                .await;
            None
        }
    };
    reporter
        .step(
            "upload",
            format!(
                "uploading the signed agent and the installer ({:.1} MiB) to {dir}",
                total as f64 / (1024.0 * 1024.0)
            ),
        )
        .await;
    let mut sent = 0usize;
    let mut next_report = total / 4;
    for (name, bytes) in files {
        match &sftp {
            Some(sftp) => {
                let path = format!("{dir}/{name}");
                let mut file = sftp
                    .create(path.clone())
                    .await
                    .with_context(|| format!("creating {path} over SFTP"))?;
                for chunk in bytes.chunks(UPLOAD_CHUNK) {
                    tokio::time::timeout(STEP_TIMEOUT, file.write_all(chunk))
                        .await
                        .map_err(|_| anyhow!("the upload of {name} stalled"))?
                        .with_context(|| format!("writing {path} over SFTP"))?;
                    sent += chunk.len();
                    if sent >= next_report && sent < total {
                        reporter
                            .step(
                                "upload",
                                format!("{} % uploaded", sent * 100 / total.max(1)),
                            )
                            .await;
                        next_report += total / 4;
                    }
                }
                file.close()
                    .await
                    .with_context(|| format!("closing {path} over SFTP"))?;
            }
            None => {
                put_with_cat(session, dir, name, bytes).await?;
                sent += bytes.len();
            }
        }
    }
    if let Some(sftp) = sftp {
        let _ = sftp.close().await;
    }
    reporter.step("upload", "uploaded").await;
    Ok(())
}

/// Writes `bytes` to `dir/name` on the host through `cat` on stdin (the name is one of ours).
async fn put_with_cat(
    session: &Handle<Client>,
    dir: &str,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let (status, _) = exec_collect(session, &format!("cat > {dir}/{name}"), bytes).await?;
    if status != 0 {
        bail!("could not upload {name} (cat exited with {status})");
    }
    Ok(())
}

/// Splits the installer's output into lines per stream, with a cap.
#[derive(Default)]
struct LineSplitter {
    partial: [Vec<u8>; 2],
    forwarded: usize,
    dropped: usize,
    saw_sudo_refusal: bool,
}

impl LineSplitter {
    const MAX_LINE: usize = 4096;

    fn push(&mut self, stream: &'static str, data: &[u8]) -> Vec<Progress> {
        let index = usize::from(stream == "stderr");
        let mut out = Vec::new();
        for &byte in data {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.partial[index]);
                out.extend(self.line(stream, line));
            } else if self.partial[index].len() < Self::MAX_LINE {
                self.partial[index].push(byte);
            }
        }
        out
    }

    fn line(&mut self, stream: &'static str, line: Vec<u8>) -> Option<Progress> {
        let line = String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_string();
        if line.starts_with("sudo:") {
            self.saw_sudo_refusal = true;
        }
        if self.forwarded >= MAX_OUTPUT_LINES {
            self.dropped += 1;
            return None;
        }
        self.forwarded += 1;
        Some(Progress::Output { stream, line })
    }

    fn finish(&mut self) -> Vec<Progress> {
        let mut out = Vec::new();
        for (index, stream) in [(0, "stdout"), (1, "stderr")] {
            let line = std::mem::take(&mut self.partial[index]);
            if !line.is_empty() {
                out.extend(self.line(stream, line));
            }
        }
        if self.dropped > 0 {
            out.push(Progress::Step {
                step: "install",
                message: format!(
                    "{} more lines of installer output were dropped",
                    self.dropped
                ),
            });
        }
        out
    }
}

/// Waits until the active agent called `name` is connected, to this replica or (PostgreSQL) to
/// another one (`replicas::presence::is_online`); returns its id.
async fn wait_online(state: &AppState, name: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + ONLINE_TIMEOUT;
    loop {
        let agent = state
            .store
            .agents()
            .await?
            .into_iter()
            .find(|agent| agent.revoked_at.is_none() && agent.name == name);
        if let Some(agent) = agent
            && crate::replicas::presence::is_online(state, &agent.id).await?
        {
            return Ok(agent.id);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the agent did not come online within {} s of the install (check its log on the host: journalctl -u cronium-agent, or STATE_DIR/agent.log when detached)",
                ONLINE_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn hosts_are_parsed_and_odd_ones_refused() {
        let host = parse_host(b"Linux\nx86_64\n0\n").unwrap();
        assert_eq!(host.target, "x86_64-unknown-linux-gnu");
        assert!(host.root);
        assert!(!parse_host(b"Linux\naarch64\n1000\n").unwrap().root);
        assert!(parse_host(b"Darwin\narm64\n0\n").is_err());
        assert!(parse_host(b"Linux\nmips\n0\n").is_err());
        assert!(parse_host(b"Linux\nx86_64\n").is_err());
        assert!(parse_host(b"").is_err());
    }

    #[test]
    fn installer_output_is_split_into_capped_lines() {
        let mut lines = LineSplitter::default();
        let mut out = lines.push("stderr", b"cronium-install: one\ncronium-inst");
        out.extend(lines.push("stderr", b"all: two\nsudo: a password is required"));
        out.extend(lines.finish());
        let texts: Vec<_> = out
            .iter()
            .map(|progress| match progress {
                Progress::Output { line, .. } => line.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(
            texts,
            [
                "cronium-install: one",
                "cronium-install: two",
                "sudo: a password is required"
            ]
        );
        assert!(lines.saw_sudo_refusal);

        let mut lines = LineSplitter::default();
        let many = "x\n".repeat(MAX_OUTPUT_LINES + 5);
        let out = lines.push("stdout", many.as_bytes());
        assert_eq!(out.len(), MAX_OUTPUT_LINES);
        assert!(matches!(lines.finish().as_slice(), [Progress::Step { .. }]));
    }
}
