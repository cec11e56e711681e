//! One attempt of an SSH fallback job, on one channel of a connection (kept in the pool for the
//! server's next jobs, or opened for this attempt alone): the host key was checked against the
//! pinned one (or pinned on first use) when the connection was made. The channel runs one fixed
//! command ([`REMOTE_COMMAND`]) that makes a private temp dir, prints its path, runs the wrapper
//! it reads from stdin under `setsid -w` (its own process group, recorded in the temp dir), and
//! then kills what is left of the group and removes the dir. Output streams
//! into the job's log; timeout and cancel kill the remote process group from another channel.
//!
//! Nothing from an event or a server is interpolated into a remote command line: the command
//! is a constant, and the only value ever placed in the kill command is the temp dir path,
//! checked against a strict character set first. The script and the environment travel on
//! stdin inside the wrapper (run by `sh -s`): the script as a base64 here-document (its exact bytes),
//! one `export NAME='value'` per variable, each value single-quoted (a `'` becomes `'\''`), so
//! nothing in a value is ever expanded, and it ends with `exec <interpreter> ./script`. The
//! event's secret environment variables travel the same way; their values are masked in the
//! job's log (see `cronium_protocol::mask`), split across chunks or not.
//!
//! Runtime helpers (`helper.rs`): the wrapper is sent only after the remote command printed its
//! temp dir and sshd answered the forwarding request for the helper socket in it, so the script
//! finds the socket (or `CRONIUM_HELPER_UNAVAILABLE`) from its first line; the libraries travel
//! in the wrapper too. The helpers stop before the attempt's result (which carries their
//! `output` and condition) is recorded.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cronium_protocol::{Masker, StreamMasker};
use russh::ChannelMsg;
use russh::client::Handle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::helper::{self, Forwards, SshBackend};
use super::pool;
use super::session::{
    Client, STEP_TIMEOUT, checked_dir, connect_with_forwards, exec_collect, single_quoted,
};
use crate::AppState;
use crate::store::jobs::{
    Attempt, AttemptResult, ClaimedJob, FinishOutcome, JobStatus, LogChunk, Reason, Stream,
};
use crate::store::now_ms;
use crate::store::servers::Connection;

/// Output is committed when this much is pending, or after `FLUSH_EVERY`.
const FLUSH_BYTES: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Output kept per attempt (stdout and stderr; like the agent's default `--max-log-bytes`): the
/// rest is dropped after one marker, and the script keeps running. (Small in unit tests.)
#[cfg(not(test))]
const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
#[cfg(test)]
pub(super) const MAX_LOG_BYTES: u64 = 64 * 1024;

/// Why an attempt could not run or how it ended, before it becomes an `AttemptResult`.
struct Ending {
    status: JobStatus,
    reason: Option<Reason>,
    exit_code: Option<i32>,
    /// What the script set through the runtime helpers.
    values: helper::Values,
}

impl Ending {
    fn failed(reason: Reason) -> Ending {
        Ending {
            status: JobStatus::Failed,
            reason: Some(reason),
            exit_code: None,
            values: helper::Values::default(),
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
    /// Masks the values of the job's secret environment variables.
    masker: Masker,
    stdout: StreamMasker,
    stderr: StreamMasker,
}

impl Log<'_> {
    /// Adds output, masked: stdout and stderr chunk by chunk (a tail that could start a secret
    /// value waits for the next chunk), system lines whole.
    fn push(&mut self, stream: Stream, data: &[u8]) {
        let masked = match stream {
            Stream::Stdout => self.stdout.push(data),
            Stream::Stderr => self.stderr.push(data),
            Stream::System => self.masker.mask(data),
        };
        self.push_masked(stream, &masked);
    }

    /// Writes out what the stream maskers still hold back (at the end of the attempt).
    fn finish_masking(&mut self) {
        let stdout = self.stdout.finish();
        self.push_masked(Stream::Stdout, &stdout);
        let stderr = self.stderr.finish();
        self.push_masked(Stream::Stderr, &stderr);
    }

    fn push_masked(&mut self, stream: Stream, data: &[u8]) {
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
    let secret_env = crate::http::events::open_secret_env(&state.key, &claimed.secret_env);
    let masker = match &secret_env {
        Ok(secret_env) => Masker::new(secret_env.iter().map(|(_, value)| value.as_bytes())),
        Err(_) => Masker::default(),
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
        stdout: masker.stream(),
        stderr: masker.stream(),
        masker,
    };
    let outcome = match &secret_env {
        Ok(secret_env) => {
            attempt_on_server(state, &claimed, runner, secret_env, &cancel, &mut log).await
        }
        Err(error) => Err(anyhow!("{error:#}")),
    };
    let ending = match outcome {
        Ok(ending) => ending,
        Err(error) => {
            // The message names the step; it never contains a secret.
            log.system(&format!("SSH: {error:#}"));
            Ending::failed(Reason::Spawn)
        }
    };
    log.finish_masking();
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
        result: ending.values.result,
        condition: ending.values.condition,
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
    secret_env: &[(String, String)],
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
    check_runtime(claimed, &ssh, log)?;
    let pool = &state.ssh.pool;
    let settings = pool::settings_key(&ssh);
    let mut pooled = if ssh.reuse_connection {
        pool.take(server_id, &settings)
    } else {
        None
    };
    log.system(&format!(
        "running over SSH on {}@{}:{} (attempt {}{})",
        ssh.username,
        ssh.host,
        ssh.port,
        claimed.attempt,
        if pooled.is_some() {
            ", on a kept connection"
        } else {
            ""
        }
    ));
    let script = Script {
        claimed,
        secret_env,
        interpreter,
        masker: log.masker.clone(),
    };
    loop {
        let connection = match pooled.take() {
            Some(lease) => Link::Pooled(lease),
            None => {
                let mut notes = Vec::new();
                let forwards = Forwards::default();
                let connected =
                    connect_with_forwards(state, server_id, &ssh, forwards.clone(), &mut |note| {
                        notes.push(note)
                    })
                    .await;
                for note in notes {
                    log.system(&note);
                }
                let handle = connected?;
                if ssh.reuse_connection {
                    // Filed under the settings as they are now: a first connection pinned the
                    // host key, and the next job reads the server with that pin.
                    let settings = match state.store.server(server_id).await {
                        Ok(server) => server.ssh.as_ref().map_or(settings, pool::settings_key),
                        Err(_) => settings,
                    };
                    Link::Pooled(pool.insert(server_id, settings, handle, forwards))
                } else {
                    Link::Own(handle, forwards)
                }
            }
        };
        let outcome = run_script(
            state,
            &script,
            runner,
            cancel,
            connection.handle(),
            connection.forwards(),
            log,
        )
        .await;
        match connection {
            Link::Own(handle, _) => {
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
            }
            Link::Pooled(lease) => {
                let reused = lease.reused;
                let broken = matches!(outcome, Err(RunError::NoChannel(_)));
                pool.put(lease, broken);
                if broken && reused {
                    // The kept connection died since its last job: once more on a new one.
                    continue;
                }
            }
        }
        return outcome.map_err(|error| match error {
            RunError::NoChannel(error) | RunError::Other(error) => error,
        });
    }
}

/// What of the event's runtime settings the SSH fallback can honour: a Docker job and a job for
/// another user are refused (both need the agent); limits are named in the log as not applied
/// (like an agent on a host without cgroups does), and the job runs.
fn check_runtime(
    claimed: &ClaimedJob,
    ssh: &crate::store::servers::SshSettings,
    log: &mut Log<'_>,
) -> anyhow::Result<()> {
    use cronium_protocol::RuntimeSpec;
    let spec = crate::agents::session::runtime_spec(claimed.runtime_spec.as_deref())
        .context("the job's runtime settings are unreadable")?;
    let host = match spec {
        RuntimeSpec::Docker(_) => bail!(
            "Docker jobs cannot run over SSH: install the agent on this server (cronium server install-agent)"
        ),
        RuntimeSpec::Http(_) => bail!("HTTP request jobs are not run over SSH"),
        RuntimeSpec::Host(host) => host,
    };
    if let Some(user) = host.user.as_deref()
        && user != ssh.username
    {
        bail!(
            "the job asks to run as {user:?}, but over SSH it would run as the SSH user {:?}; running as another user needs the agent",
            ssh.username
        );
    }
    let unapplied: Vec<&str> = [
        ("memory_mb", host.memory_mb.is_some()),
        ("cpus", host.cpus.is_some()),
        ("pids", host.pids.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if !unapplied.is_empty() {
        log.system(&format!(
            "limits not applied over SSH (they need the agent's cgroups): {}",
            unapplied.join(", ")
        ));
    }
    Ok(())
}

/// A connection an attempt runs on: shared through the pool, or its own.
enum Link {
    Pooled(pool::Lease),
    Own(Handle<Client>, Forwards),
}

impl Link {
    fn handle(&self) -> &Handle<Client> {
        match self {
            Link::Pooled(lease) => &lease.handle,
            Link::Own(handle, _) => handle,
        }
    }

    fn forwards(&self) -> &Forwards {
        match self {
            Link::Pooled(lease) => &lease.forwards,
            Link::Own(_, forwards) => forwards,
        }
    }
}

/// What an attempt runs: the job, its opened secret environment, the interpreter, and the
/// masker of the secret values (for the helpers' output and notifications).
struct Script<'a> {
    claimed: &'a ClaimedJob,
    secret_env: &'a [(String, String)],
    interpreter: &'a str,
    masker: Masker,
}

/// Why [`run_script`] failed: no channel could be opened (a kept connection may have died; the
/// caller retries once on a new one), or anything later.
enum RunError {
    NoChannel(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    fn from(error: anyhow::Error) -> RunError {
        RunError::Other(error)
    }
}

/// The one command an attempt runs, a fixed string: make a private temp dir with the helper
/// dir in it, print its path as the first line of stdout, run the wrapper it reads from stdin
/// (`sh -s`) in its own session and process group, then kill whatever is left of the group,
/// remove the dir and exit with the script's status. Only builtins besides `mktemp`, `mkdir`,
/// `setsid`, `sh` and `rm`: every process the host starts is time on a short job's clock. The
/// script's stdin is the channel's, at its end. The wrapper is sent only once the path is known
/// and the helper socket in it is forwarded (or refused).
const REMOTE_COMMAND: &str = concat!(
    "umask 077 && d=$(mktemp -d \"${TMPDIR:-/tmp}/cronium.XXXXXXXXXX\") && cd \"$d\" && ",
    "mkdir .cronium && printf '%s\\n' \"$d\" && ",
    "{ setsid -w sh -s; code=$?; ",
    "read -r pg 2>/dev/null < ./pgid && kill -KILL -- \"-$pg\" 2>/dev/null; ",
    "cd / && rm -rf -- \"$d\"; exit \"$code\"; }"
);

/// The delimiter of the script's here-document in the wrapper: never a line of base64.
const SCRIPT_END: &str = "CRONIUM_SCRIPT_END";

/// The wrapper the remote shell runs: records its process group, writes the script from a
/// base64 here-document (exact bytes, nothing expanded) and the helper libraries (single-quoted
/// `printf` arguments: a builtin, no process), exports the environment (the secret variables
/// and the helpers' too) and replaces itself with the interpreter.
///
/// The `CRONIUM_*` variables are the agent's (`agent/src/runner/process.rs`), with the same
/// meanings: `CRONIUM_JOB_ID`, `CRONIUM_RUN_ID`, `CRONIUM_EVENT_ID`, `CRONIUM_ATTEMPT` (the
/// attempt number, 1 for the first, as the `event` helper's `attempt`), and the helpers'
/// `CRONIUM_HELPER_SOCKET` and `CRONIUM_JOB_TOKEN` (or `CRONIUM_HELPER_UNAVAILABLE`). The
/// event's own variables never set a `CRONIUM_` name (the API refuses them; one found here is
/// skipped, as the agent does).
fn wrapper(script: &Script<'_>, helper_env: &[(&str, String)]) -> String {
    use base64::Engine;
    let claimed = script.claimed;
    let attempt = claimed.attempt.to_string();
    let mut env: BTreeMap<&str, &str> = claimed
        .env
        .iter()
        .chain(script.secret_env.iter().map(|(key, value)| (key, value)))
        .filter(|(key, _)| !key.starts_with("CRONIUM_"))
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    env.insert("CRONIUM_JOB_ID", &claimed.id);
    env.insert("CRONIUM_RUN_ID", &claimed.run_id);
    env.insert("CRONIUM_EVENT_ID", &claimed.event_id);
    env.insert("CRONIUM_ATTEMPT", &attempt);
    for (key, value) in helper_env {
        env.insert(key, value);
    }
    let mut text = String::from("echo $$ > ./pgid\n");
    text.push_str(&format!(
        "base64 -d > ./script <<'{SCRIPT_END}' || {{ echo 'cronium: base64 is needed on the server' >&2; exit 127; }}\n"
    ));
    let encoded = base64::engine::general_purpose::STANDARD.encode(claimed.script.as_bytes());
    for line in encoded.as_bytes().chunks(76) {
        // Base64 is ASCII.
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(SCRIPT_END);
    text.push('\n');
    for (name, library) in cronium_agent::helper::LIBRARIES {
        text.push_str(&format!(
            "printf '%s' {} > ./{name}\n",
            single_quoted(library)
        ));
    }
    for (key, value) in env {
        // Names were checked when the event was saved; a bad one is skipped, never interpolated.
        let valid = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if valid && !value.contains('\0') {
            text.push_str(&format!("export {key}={}\n", single_quoted(value)));
        }
    }
    text.push_str(&format!("exec {} ./script\n", script.interpreter));
    text
}

/// The longest first line (the temp dir path) accepted.
const MAX_DIR_LINE: usize = 600;
/// How long the remote command gets to clean up after its process group was killed.
const CLEANUP_WAIT: Duration = Duration::from_secs(10);

/// Runs the attempt on one channel of `session`: the temp dir, the helpers, the script; the
/// helpers stop (and their writes are applied) before this returns.
async fn run_script(
    state: &AppState,
    script: &Script<'_>,
    runner: &str,
    cancel: &CancellationToken,
    session: &Handle<Client>,
    forwards: &Forwards,
    log: &mut Log<'_>,
) -> Result<Ending, RunError> {
    let claimed = script.claimed;
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(|error| RunError::NoChannel(error.into()))?;
    channel
        .exec(true, REMOTE_COMMAND)
        .await
        .map_err(|error| RunError::NoChannel(error.into()))?;
    // The first stdout line names the temp dir; the remote shell then waits for the wrapper.
    let mut first_line = Vec::new();
    let mut early_exit = None;
    let dir_deadline = Instant::now() + STEP_TIMEOUT;
    let dir = loop {
        tokio::select! {
            message = channel.wait() => match message {
                Some(ChannelMsg::Data { data }) => {
                    first_line.extend_from_slice(&data);
                    if let Some(end) = first_line.iter().position(|&byte| byte == b'\n') {
                        let named = checked_dir(&first_line[..end]).ok_or_else(|| {
                            anyhow!("the server printed an unexpected temp dir line")
                        })?;
                        let rest = first_line.split_off(end + 1);
                        log.push(Stream::Stdout, &rest);
                        break Some(named);
                    } else if first_line.len() > MAX_DIR_LINE {
                        return Err(anyhow!("the server printed an unexpected temp dir line").into());
                    }
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => log.push(Stream::Stderr, &data),
                Some(ChannelMsg::ExitStatus { exit_status }) => early_exit = Some(exit_status),
                Some(_) => {}
                None => break None,
            },
            _ = cancel.cancelled() => {
                let _ = channel.close().await;
                log.system("cancelled before the script started");
                return Ok(Ending {
                    status: JobStatus::Cancelled,
                    reason: Some(Reason::Cancelled),
                    exit_code: None,
                    values: helper::Values::default(),
                });
            }
            _ = sleep_until(dir_deadline) => {
                let _ = channel.close().await;
                return Err(anyhow!("the server did not make the temp dir in time").into());
            }
        }
    };
    let Some(dir) = dir else {
        return Err(anyhow!(
            "could not make a temp dir on the server and start the script (exit status {})",
            early_exit.map_or_else(|| "none".to_string(), |code| code.to_string())
        )
        .into());
    };
    let backend = SshBackend::new(state, runner, claimed, script.masker.clone());
    let helpers = helper::start(session, forwards, &dir, backend).await;
    if let Some(reason) = helpers.unavailable() {
        log.system(&format!(
            "runtime helpers are unavailable on this server: {reason}; helper calls in the script will fail"
        ));
    }
    let wrapper = wrapper(script, &helpers.env());
    let outcome = drive(
        state, claimed, runner, &wrapper, &dir, cancel, session, channel, log,
    )
    .await;
    // Writes in flight are answered before the result is recorded; none is accepted after.
    let values = helpers.finish(session).await;
    outcome.map(|ending| Ending { values, ..ending })
}

/// Sends the wrapper and follows the script to its end (or kills it on timeout, cancel or a
/// lost lease).
#[allow(clippy::too_many_arguments)]
async fn drive(
    state: &AppState,
    claimed: &ClaimedJob,
    runner: &str,
    wrapper: &str,
    dir: &str,
    cancel: &CancellationToken,
    session: &Handle<Client>,
    mut channel: russh::Channel<russh::client::Msg>,
    log: &mut Log<'_>,
) -> Result<Ending, RunError> {
    channel
        .data_bytes(bytes::Bytes::copy_from_slice(wrapper.as_bytes()))
        .await
        .map_err(anyhow::Error::from)?;
    channel.eof().await.map_err(anyhow::Error::from)?;
    // The "running over SSH" line is committed with the first output or the result (or by the
    // flush timer): no commit before the script runs.
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
                        values: helper::Values::default(),
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
        // The remote command now removes the dir and exits; if it does not, remove it.
        let ended = tokio::time::timeout(CLEANUP_WAIT, async {
            while channel.wait().await.is_some() {}
        })
        .await
        .is_ok();
        if !ended {
            let _ = channel.close().await;
            let remove = format!("rm -rf -- {dir}");
            if let Err(error) = exec_collect(session, &remove, b"").await {
                log.system(&format!("could not remove the temp dir {dir}: {error:#}"));
            }
        }
        return Ok(match reason {
            Reason::Cancelled => Ending {
                status: JobStatus::Cancelled,
                reason: Some(Reason::Cancelled),
                exit_code: None,
                values: helper::Values::default(),
            },
            reason => Ending::failed(reason),
        });
    }
    Ok(exit.unwrap_or_else(|| {
        log.system("the SSH channel closed without an exit status");
        Ending::failed(Reason::Lost)
    }))
}
