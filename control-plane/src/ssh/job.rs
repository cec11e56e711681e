//! One attempt of an SSH fallback job: connect, check the host key against the pinned one (or
//! pin it on first use), authenticate, upload the script and a wrapper into a fresh temp dir,
//! run the wrapper under `setsid -w` (its own process group, recorded in the temp dir), stream
//! the output into the job's log, and always remove the temp dir. Timeout and cancel kill the
//! remote process group.
//!
//! The remote commands are fixed strings; the only value placed in them is the temp dir path
//! `mktemp` printed, checked against a strict character set first. The script and the
//! environment travel on stdin: the wrapper (`run.sh`) holds one `export NAME='value'` per
//! variable, each value single-quoted (a `'` becomes `'\''`), so nothing in a value is ever
//! expanded, and it ends with `exec <interpreter> ./script`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use russh::ChannelMsg;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::SshSecrets;
use crate::AppState;
use crate::store::jobs::{
    Attempt, AttemptResult, ClaimedJob, FinishOutcome, JobStatus, LogChunk, Reason, Stream,
};
use crate::store::now_ms;
use crate::store::servers::{Connection, SshAuth, SshSettings};

/// Connecting, key exchange and authentication together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Output is committed when this much is pending, or after `FLUSH_EVERY`.
const FLUSH_BYTES: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Output kept per attempt (stdout and stderr; like the agent's default `--max-log-bytes`): the
/// rest is dropped after one marker, and the script keeps running. (Small in unit tests.)
#[cfg(not(test))]
const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
#[cfg(test)]
pub(super) const MAX_LOG_BYTES: u64 = 64 * 1024;
/// The setup and cleanup commands.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an attempt could not run or how it ended, before it becomes an `AttemptResult`.
struct Ending {
    status: JobStatus,
    reason: Option<Reason>,
    exit_code: Option<i32>,
}

impl Ending {
    fn failed(reason: Reason) -> Ending {
        Ending {
            status: JobStatus::Failed,
            reason: Some(reason),
            exit_code: None,
        }
    }
}

/// The attempt's log: chunks at offsets, committed in batches with `append_logs`.
struct Log<'a> {
    state: &'a AppState,
    runner: &'a str,
    attempt: Attempt,
    len: u64,
    pending: Vec<LogChunk>,
    pending_bytes: usize,
    /// Still the current attempt (an append was refused: the lease was lost).
    current: bool,
    /// Output past [`MAX_LOG_BYTES`] was dropped (after one marker).
    truncated: bool,
}

impl Log<'_> {
    fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if stream != Stream::System {
            if self.truncated {
                return;
            }
            let room = MAX_LOG_BYTES.saturating_sub(self.len + self.pending_bytes as u64);
            if data.len() as u64 > room {
                // `room` is smaller than `data.len()`, so it fits in usize.
                self.push_chunk(stream, &data[..room as usize]);
                self.truncated = true;
                self.system(&format!("output truncated after {MAX_LOG_BYTES} bytes"));
                return;
            }
        }
        self.push_chunk(stream, data);
    }

    fn push_chunk(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let offset = self.len + self.pending_bytes as u64;
        self.pending.push(LogChunk {
            offset,
            stream,
            data: data.to_vec(),
        });
        self.pending_bytes += data.len();
    }

    fn system(&mut self, line: &str) {
        self.push(Stream::System, format!("[cronium: {line}]\n").as_bytes());
    }

    async fn flush(&mut self) {
        if self.pending.is_empty() || !self.current {
            return;
        }
        match self
            .state
            .store
            .append_logs(self.runner, &self.attempt, true, &self.pending)
            .await
        {
            Ok(Some(len)) => {
                self.len = len;
                self.pending.clear();
                self.pending_bytes = 0;
                self.state.job_events.notify(&self.attempt.job_id);
            }
            Ok(None) => self.current = false,
            // Kept pending: the next flush or the result carries it.
            Err(error) => {
                warn!(%error, job = %self.attempt.job_id, "could not commit SSH job output")
            }
        }
    }
}

/// Checks the server's host key against the pinned one; remembers what the server showed.
struct Client {
    pinned: Option<PublicKey>,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Certificates are not trusted: only a pinned plain key is.
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        *self.seen.lock().expect("seen key") = Some(key.clone());
        Ok(match &self.pinned {
            Some(pinned) => pinned.key_data() == key.key_data(),
            // Pinned after the connection succeeded (first use).
            None => true,
        })
    }
}

/// Runs one claimed attempt to its end and records the result.
pub(super) async fn run_attempt(
    state: &AppState,
    claimed: ClaimedJob,
    runner: &str,
    cancel: CancellationToken,
) {
    let attempt = Attempt {
        job_id: claimed.id.clone(),
        attempt: claimed.attempt,
    };
    let mut log = Log {
        state,
        runner,
        attempt: attempt.clone(),
        len: 0,
        pending: Vec::new(),
        pending_bytes: 0,
        truncated: false,
        current: true,
    };
    let ending = match attempt_on_server(state, &claimed, runner, &cancel, &mut log).await {
        Ok(ending) => ending,
        Err(error) => {
            // The message names the step; it never contains a secret.
            log.system(&format!("SSH: {error:#}"));
            Ending::failed(Reason::Spawn)
        }
    };
    if !log.current {
        info!(job = %claimed.id, "SSH attempt no longer current; its result is dropped");
        return;
    }
    if state.shutdown.is_cancelled() && ending.reason == Some(Reason::Cancelled) {
        // Stopped by a shutdown, not by a user: leave the job to its lease.
        log.flush().await;
        return;
    }
    let result = AttemptResult {
        status: ending.status,
        reason: ending.reason,
        exit_code: ending.exit_code,
        log_len: log.len + log.pending_bytes as u64,
        result: None,
        condition: None,
    };
    match state
        .store
        .finish_attempt(runner, &attempt, &log.pending, &result)
        .await
    {
        Ok(outcome) => {
            if outcome == (FinishOutcome::Recorded { notified: true }) {
                state.notifier.notify_one();
            }
            info!(job = %claimed.id, attempt = claimed.attempt, ?outcome, status = result.status.as_str(), "SSH attempt finished")
        }
        Err(error) => warn!(%error, job = %claimed.id, "could not record the SSH job's result"),
    }
    state.job_events.notify(&claimed.id);
}

async fn attempt_on_server(
    state: &AppState,
    claimed: &ClaimedJob,
    runner: &str,
    cancel: &CancellationToken,
    log: &mut Log<'_>,
) -> anyhow::Result<Ending> {
    let server_id = super::server_of_runner(runner).ok_or_else(|| anyhow!("not an SSH job"))?;
    let server = state
        .store
        .server(server_id)
        .await
        .context("the server no longer exists")?;
    let ssh = match (&server.connection, &server.ssh) {
        (Connection::Ssh, Some(ssh)) => ssh.clone(),
        _ => bail!("server {:?} is not an SSH server any more", server.name),
    };
    let interpreter = match claimed.kind.as_str() {
        "bash" => "bash",
        "python" => "python3",
        "nodejs" => "node",
        other => bail!("{other} jobs cannot run over SSH"),
    };
    log.system(&format!(
        "running over SSH on {}@{}:{} (attempt {})",
        ssh.username, ssh.host, ssh.port, claimed.attempt
    ));
    let session = tokio::time::timeout(CONNECT_TIMEOUT, connect(state, server_id, &ssh, log))
        .await
        .map_err(|_| anyhow!("connecting to {}:{} timed out", ssh.host, ssh.port))??;
    let outcome = run_in_temp_dir(state, claimed, runner, interpreter, cancel, &session, log).await;
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    outcome
}

/// Connects, checks or pins the host key and authenticates.
async fn connect(
    state: &AppState,
    server_id: &str,
    ssh: &SshSettings,
    log: &mut Log<'_>,
) -> anyhow::Result<Handle<Client>> {
    let pinned = match &ssh.host_key {
        Some(line) => Some(
            PublicKey::from_openssh(line)
                .map_err(|_| anyhow!("the pinned host key is unreadable"))?,
        ),
        None => None,
    };
    let seen = Arc::new(Mutex::new(None));
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let handler = Client {
        pinned: pinned.clone(),
        seen: seen.clone(),
    };
    let connected = client::connect(config, (ssh.host.as_str(), ssh.port), handler).await;
    let shown = seen.lock().expect("seen key").clone();
    let mut session = match connected {
        Ok(session) => session,
        Err(error) => {
            if let (Some(_), Some(shown)) = (&pinned, &shown)
                && pinned.as_ref().map(PublicKey::key_data) != Some(shown.key_data())
            {
                let fingerprint = shown.fingerprint(Default::default());
                bail!(
                    "host key changed: {}:{} showed {} {fingerprint}, which is not the pinned key; refused (if the change is expected, set the server's ssh.host_key)",
                    ssh.host,
                    ssh.port,
                    shown.algorithm().as_str()
                );
            }
            bail!("could not connect to {}:{}: {error}", ssh.host, ssh.port);
        }
    };
    let shown = shown.ok_or_else(|| anyhow!("the server showed no host key"))?;
    if pinned.is_none() {
        let line = super::normalize_host_key(
            &shown
                .to_openssh()
                .map_err(|error| anyhow!("host key: {error}"))?,
        )
        .ok_or_else(|| anyhow!("host key cannot be encoded"))?;
        let now_pinned = state.store.pin_host_key(server_id, &line).await?;
        if now_pinned != line {
            bail!("host key changed while it was being pinned; refused");
        }
        log.system(&format!(
            "pinned host key {} on first use",
            shown.fingerprint(Default::default())
        ));
    }
    let secrets = SshSecrets::open(&state.key, &ssh.secrets)?;
    let auth = match ssh.auth {
        SshAuth::Key => {
            let text = secrets
                .private_key
                .as_deref()
                .ok_or_else(|| anyhow!("no private key is stored"))?;
            let key = russh::keys::decode_secret_key(text, secrets.passphrase.as_deref())
                .map_err(|_| anyhow!("the stored private key cannot be read"))?;
            let hash = session.best_supported_rsa_hash().await?.flatten();
            session
                .authenticate_publickey(
                    &ssh.username,
                    PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                )
                .await?
        }
        SshAuth::Password => {
            let password = secrets
                .password
                .ok_or_else(|| anyhow!("no password is stored"))?;
            session
                .authenticate_password(&ssh.username, password)
                .await?
        }
    };
    if !matches!(auth, AuthResult::Success) {
        bail!(
            "authentication as {:?} with a {} was refused",
            ssh.username,
            ssh.auth.as_str()
        );
    }
    Ok(session)
}

/// Runs `command` on a new channel, with `stdin` sent and closed; returns the exit status and
/// stdout (stderr is dropped).
async fn exec_collect(
    session: &Handle<Client>,
    command: &str,
    stdin: &[u8],
) -> anyhow::Result<(u32, Vec<u8>)> {
    let step = async {
        let mut channel = session.channel_open_session().await?;
        channel.exec(true, command).await?;
        if !stdin.is_empty() {
            channel
                .data_bytes(bytes::Bytes::copy_from_slice(stdin))
                .await?;
        }
        channel.eof().await?;
        let (mut status, mut stdout) = (None, Vec::new());
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Failure => bail!("the server refused to run a command"),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>((status.unwrap_or(255), stdout))
    };
    tokio::time::timeout(STEP_TIMEOUT, step)
        .await
        .map_err(|_| anyhow!("a setup step timed out"))?
}

/// A temp dir path as printed by `mktemp -d`: absolute, and only characters that need no
/// quoting in a POSIX shell.
fn checked_dir(output: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(output).ok()?.trim_end_matches('\n');
    let fine = text.starts_with('/')
        && text.len() < 512
        && !text.contains("..")
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
    fine.then(|| text.to_string())
}

/// A value single-quoted for a POSIX shell: nothing inside is expanded.
fn single_quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The wrapper the remote shell runs: records its process group, exports the environment and
/// replaces itself with the interpreter.
fn wrapper(claimed: &ClaimedJob, interpreter: &str) -> String {
    let mut env: BTreeMap<&str, &str> = claimed
        .env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    env.insert("CRONIUM_JOB_ID", &claimed.id);
    env.insert("CRONIUM_RUN_ID", &claimed.run_id);
    env.insert("CRONIUM_EVENT_ID", &claimed.event_id);
    let mut text = String::from("echo $$ > ./pgid\n");
    for (key, value) in env {
        // Names were checked when the event was saved; a bad one is skipped, never interpolated.
        let valid = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if valid && !value.contains('\0') {
            text.push_str(&format!("export {key}={}\n", single_quoted(value)));
        }
    }
    text.push_str(&format!("exec {interpreter} ./script\n"));
    text
}

async fn run_in_temp_dir(
    state: &AppState,
    claimed: &ClaimedJob,
    runner: &str,
    interpreter: &str,
    cancel: &CancellationToken,
    session: &Handle<Client>,
    log: &mut Log<'_>,
) -> anyhow::Result<Ending> {
    let (status, output) = exec_collect(
        session,
        "umask 077 && mktemp -d \"${TMPDIR:-/tmp}/cronium.XXXXXXXXXX\"",
        b"",
    )
    .await?;
    let dir = match (status, checked_dir(&output)) {
        (0, Some(dir)) => dir,
        _ => bail!("could not make a temp dir on the server (mktemp exited with {status})"),
    };
    let outcome = run_script(
        state,
        claimed,
        runner,
        interpreter,
        cancel,
        session,
        log,
        &dir,
    )
    .await;
    // Always clean up: kill what may be left of the process group, then remove the dir.
    let cleanup = format!(
        "cd {dir} && {{ [ -s ./pgid ] && kill -KILL -- -\"$(cat ./pgid)\" 2>/dev/null; cd / && rm -rf -- {dir}; }}"
    );
    if let Err(error) = exec_collect(session, &cleanup, b"").await {
        log.system(&format!("could not remove the temp dir {dir}: {error:#}"));
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn run_script(
    state: &AppState,
    claimed: &ClaimedJob,
    runner: &str,
    interpreter: &str,
    cancel: &CancellationToken,
    session: &Handle<Client>,
    log: &mut Log<'_>,
    dir: &str,
) -> anyhow::Result<Ending> {
    for (file, bytes) in [
        ("script", claimed.script.as_bytes().to_vec()),
        ("run.sh", wrapper(claimed, interpreter).into_bytes()),
    ] {
        let (status, _) = exec_collect(session, &format!("cat > {dir}/{file}"), &bytes).await?;
        if status != 0 {
            bail!("could not upload the {file} (cat exited with {status})");
        }
    }
    let mut channel = session.channel_open_session().await?;
    channel
        .exec(true, format!("cd {dir} && exec setsid -w sh ./run.sh"))
        .await?;
    channel.eof().await?;
    log.flush().await;
    let deadline = (claimed.timeout_seconds > 0)
        .then(|| Instant::now() + Duration::from_secs(claimed.timeout_seconds as u64));
    let lease_every = state.config.lease / 3;
    let mut renew = tokio::time::interval_at(Instant::now() + lease_every, lease_every);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut exit: Option<Ending> = None;
    let stop = loop {
        tokio::select! {
            message = channel.wait() => match message {
                Some(ChannelMsg::Data { data }) => log.push(Stream::Stdout, &data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => log.push(Stream::Stderr, &data),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    let code = exit_status as i32;
                    exit = Some(Ending {
                        status: if code == 0 { JobStatus::Completed } else { JobStatus::Failed },
                        reason: (code != 0).then_some(Reason::ExitCode),
                        exit_code: Some(code),
                    });
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    log.system(&format!("killed by signal {signal_name:?}"));
                    exit = Some(Ending::failed(Reason::Signal));
                }
                Some(_) => {}
                None => break None,
            },
            _ = async { sleep_until(deadline.expect("deadline")).await }, if deadline.is_some() => {
                break Some((Reason::Timeout, format!("timed out after {} s; killing the remote process group", claimed.timeout_seconds)));
            }
            _ = cancel.cancelled() => {
                break Some((Reason::Cancelled, "cancelled; killing the remote process group".to_string()));
            }
            _ = renew.tick() => {
                let lease_until = now_ms() + state.config.lease.as_millis() as i64;
                match state.store.renew_leases(runner, std::slice::from_ref(&log.attempt), lease_until).await {
                    Ok((abandoned, _)) if !abandoned.is_empty() => {
                        log.current = false;
                        break Some((Reason::Lost, "the attempt is no longer current".to_string()));
                    }
                    Ok((_, cancels)) if !cancels.is_empty() => {
                        break Some((Reason::Cancelled, "cancelled; killing the remote process group".to_string()));
                    }
                    Ok(_) => {}
                    Err(error) => warn!(%error, "could not renew an SSH job's lease"),
                }
            }
            _ = flush.tick() => {
                if log.pending_bytes > 0 {
                    log.flush().await;
                }
            }
        }
        if log.pending_bytes >= FLUSH_BYTES {
            log.flush().await;
        }
    };
    if let Some((reason, line)) = stop {
        log.system(&line);
        let kill = format!("cd {dir} && kill -KILL -- -\"$(cat ./pgid)\"");
        if let Err(error) = exec_collect(session, &kill, b"").await {
            log.system(&format!(
                "could not kill the remote process group: {error:#}"
            ));
        }
        let _ = channel.close().await;
        return Ok(match reason {
            Reason::Cancelled => Ending {
                status: JobStatus::Cancelled,
                reason: Some(Reason::Cancelled),
                exit_code: None,
            },
            reason => Ending::failed(reason),
        });
    }
    Ok(exit.unwrap_or_else(|| {
        log.system("the SSH channel closed without an exit status");
        Ending::failed(Reason::Lost)
    }))
}
