//! Self-update: the control plane announces a version (`AgentUpdate`); the agent downloads that
//! release from the control plane's HTTP URL, verifies it with the release key pinned at install
//! time, tries it, and restarts into it, rolling back when it does not connect in time.
//!
//! The steps, each reported with `UpdateStatus`:
//! 1. `downloading`/`verifying`: the signed manifest first (signature with the pinned key, the
//!    version asked for, this agent's target, strictly newer than the installed version), then the
//!    binary, streamed into a file next to the installed one (same file system, mode 0600, never
//!    larger than the manifest's size) while it is hashed; its size, sha256 and signature are
//!    checked before it is made executable. A refused file is deleted; it is never executed or
//!    moved into place.
//! 2. The verified binary must answer `version` with this agent's target (a sanity check that it
//!    runs on this host at all).
//! 3. `restarting`: the agent drains (claims nothing more, lets running jobs finish within the
//!    shutdown grace; the spool keeps the rest), writes `update-pending.json`, starts the
//!    [`watchdog`] and executes the new binary from its staged path with the same arguments (same
//!    pid, so it works under systemd and in the foreground). The installed binary is untouched.
//! 4. The new binary, after its first welcome, renames itself over the installed binary (the old
//!    one is kept as `<bin>.prev`), installs its manifest and reports `succeeded`. If it does not
//!    connect before the deadline, or dies, the watchdog (old code) restores the old binary's run
//!    and it reports `rolled_back`; the rolled-back version is not tried again.
//!
//! The agent's version is what the signed manifest of its binary says
//! (`installed.manifest.json`, checked against the pinned key and the running binary's sha256),
//! else the version it was built as. `cronium dev`'s in-process agent does not update itself and
//! says so.

pub mod files;
pub mod verify;
pub mod watchdog;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cronium_protocol::{UpdateState, UpdateStatus};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::files::{Outcome, Pending, PendingState};
use self::verify::{Manifest, ReleaseKey, VerifyError, sha256_hex};

/// Largest agent binary downloaded.
pub const MAX_BINARY_BYTES: u64 = 512 * 1024 * 1024;

/// Largest signature file downloaded (a real one has 64 bytes).
const MAX_SIGNATURE_BYTES: usize = 1024;

/// How long one download request may take to answer (the body has its own budget).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the whole binary download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the new binary's `version` may take.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(20);

/// Default time the new binary has to connect.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// Settings of a self-updating agent (the `cronium-agent run` binary).
#[derive(Debug, Clone)]
pub struct SelfUpdateOptions {
    /// How long a new binary has, from its start, to connect before it is rolled back.
    pub deadline: Duration,
}

/// A verified new binary, waiting for the agent to drain.
#[derive(Debug, Clone)]
struct Staged {
    to_version: String,
    staged: PathBuf,
    manifest: Vec<u8>,
    manifest_signature: Vec<u8>,
}

struct Enabled {
    state_dir: PathBuf,
    /// The installed binary (the running one, unless it runs on trial from a staged path).
    bin: PathBuf,
    server_url: String,
    options: SelfUpdateOptions,
    key: Option<ReleaseKey>,
}

struct Inner {
    /// `None`: `cronium dev`'s in-process agent.
    enabled: Option<Enabled>,
    installed_version: String,
    status: watch::Sender<Option<UpdateStatus>>,
    announced: watch::Sender<Option<String>>,
    /// Set while this process is a new binary on trial.
    trial: Mutex<Option<Pending>>,
    staged: Mutex<Option<Staged>>,
    /// Versions that must not be tried again (refused or rolled back).
    refused: Mutex<Option<Outcome>>,
    /// Cancelled to drain the agent for the restart.
    restart: CancellationToken,
}

/// The updater's handle, shared by the connection loop (announcements in, statuses out) and the
/// agent's run loop (drain and restart).
#[derive(Clone)]
pub(crate) struct Updater {
    inner: Arc<Inner>,
}

impl Updater {
    /// The in-process agent of `cronium dev`: reports that it does not update itself.
    pub(crate) fn disabled(version: &str) -> Updater {
        Updater::new(None, version.to_owned(), None, None)
    }

    fn new(
        enabled: Option<Enabled>,
        installed_version: String,
        trial: Option<Pending>,
        last: Option<Outcome>,
    ) -> Updater {
        let refused = last.clone().filter(|outcome| !outcome.retry);
        Updater {
            inner: Arc::new(Inner {
                enabled,
                installed_version,
                status: watch::channel(last.map(|outcome| outcome.status())).0,
                announced: watch::channel(None).0,
                trial: Mutex::new(trial),
                staged: Mutex::new(None),
                refused: Mutex::new(refused),
                restart: CancellationToken::new(),
            }),
        }
    }

    /// Loads the update state of a self-updating agent: the pinned key, the installed version,
    /// and what a previous update left (a trial of this very process, or a rollback to report).
    pub(crate) async fn start(
        state_dir: &Path,
        server_url: &str,
        options: SelfUpdateOptions,
    ) -> anyhow::Result<Updater> {
        let state_dir = state_dir.to_path_buf();
        let server_url = server_url.trim_end_matches('/').to_owned();
        tokio::task::spawn_blocking(move || load(state_dir, server_url, options)).await?
    }

    /// The version this agent reports in its hello (on trial: the new binary's signed version).
    pub(crate) fn installed_version(&self) -> String {
        self.inner.installed_version.clone()
    }

    /// Cancelled when a verified update waits for the agent to drain.
    pub(crate) fn restart_requested(&self) -> CancellationToken {
        self.inner.restart.clone()
    }

    /// The statuses to send on the control stream (the latest one after every welcome).
    pub(crate) fn statuses(&self) -> watch::Receiver<Option<UpdateStatus>> {
        self.inner.status.subscribe()
    }

    /// The control plane announced the version this agent should run.
    pub(crate) fn announce(&self, version: Option<String>) {
        self.inner.announced.send_replace(version);
    }

    fn report(&self, target: &str, state: UpdateState, reason: Option<String>) {
        match &reason {
            Some(reason) => {
                tracing::warn!(target_version = %target, state = state.as_str(), %reason, "agent update")
            }
            None => {
                tracing::info!(target_version = %target, state = state.as_str(), "agent update")
            }
        }
        self.inner.status.send_replace(Some(UpdateStatus {
            target_version: target.to_owned(),
            state,
            reason,
        }));
    }

    /// Records and reports an outcome (kept in `update-result.json`).
    fn conclude(&self, outcome: Outcome) {
        if let Some(enabled) = &self.inner.enabled
            && let Err(error) = files::write_outcome(&enabled.state_dir, &outcome)
        {
            tracing::warn!(%error, "cannot record the update outcome");
        }
        if !outcome.retry {
            *lock(&self.inner.refused) = Some(outcome.clone());
        }
        self.report(&outcome.target_version, outcome.state, outcome.reason);
    }

    fn fail(&self, target: &str, reason: String, retry: bool) {
        self.conclude(Outcome {
            target_version: target.to_owned(),
            state: UpdateState::Failed,
            reason: Some(reason),
            retry,
        });
    }

    /// Called after every welcome: a new binary on trial has now connected, so it takes the old
    /// one's place.
    pub(crate) fn welcomed(&self) {
        let Some(pending) = lock(&self.inner.trial).take() else {
            return;
        };
        let Some(enabled) = &self.inner.enabled else {
            return;
        };
        let mut confirmed = pending.clone();
        confirmed.state = PendingState::Confirmed;
        // Confirm first (under the lock the watchdog takes too), then install.
        match files::settle_trial(&enabled.state_dir, pending.pid, &confirmed) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("the update watchdog rolled this binary back before it connected");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot confirm the update; the watchdog will roll it back");
                return;
            }
        }
        let result = files::install_staged(&enabled.state_dir, &pending);
        match result {
            Ok(()) => {
                let _ = files::remove_pending(&enabled.state_dir);
                tracing::info!(from = %pending.from_version, to = %pending.to_version, bin = %pending.bin.display(), "update installed");
                self.conclude(Outcome {
                    target_version: pending.to_version.clone(),
                    state: UpdateState::Succeeded,
                    reason: None,
                    retry: false,
                });
            }
            Err(error) => {
                // The installed binary is still the old one; this process keeps running from the
                // staged path until it restarts, and the old binary runs after that.
                let _ = files::remove_pending(&enabled.state_dir);
                self.fail(
                    &pending.to_version,
                    format!(
                        "cannot install the new binary at {}: {error}",
                        pending.bin.display()
                    ),
                    false,
                );
            }
        }
    }

    /// The updater task: acts on announcements until a verified update is staged (then it asks
    /// the agent to drain) or `exit` is cancelled.
    pub(crate) async fn serve(self, exit: CancellationToken) {
        let mut announced = self.inner.announced.subscribe();
        loop {
            tokio::select! {
                changed = announced.changed() => if changed.is_err() { return },
                () = exit.cancelled() => return,
            }
            let Some(version) = announced.borrow_and_update().clone() else {
                continue;
            };
            if lock(&self.inner.trial).is_some() {
                // A new binary on trial installs itself first.
                continue;
            }
            let staged = tokio::select! {
                staged = self.consider(&version) => staged,
                () = exit.cancelled() => return,
            };
            if let Some(staged) = staged {
                *lock(&self.inner.staged) = Some(staged);
                self.inner.restart.cancel();
                return;
            }
        }
    }

    /// Decides about an announced version; downloads, verifies and tries it when it is due.
    async fn consider(&self, version: &str) -> Option<Staged> {
        let Some(enabled) = &self.inner.enabled else {
            self.report(
                version,
                UpdateState::Failed,
                Some(
                    "this is the in-process agent of `cronium dev`, which does not update itself"
                        .into(),
                ),
            );
            return None;
        };
        let installed = self.inner.installed_version.clone();
        if version == installed {
            return None;
        }
        if let Some(refused) = lock(&self.inner.refused).clone()
            && refused.target_version == version
        {
            // Refused or rolled back before: said again, not retried.
            self.report(&refused.target_version, refused.state, refused.reason);
            return None;
        }
        if !verify::is_version(version) {
            self.fail(version, format!("{version:?} is not a version"), false);
            return None;
        }
        if let Err(error) = verify::check_newer(version, &installed) {
            self.fail(version, error.to_string(), false);
            return None;
        }
        let Some(key) = enabled.key else {
            self.fail(
                version,
                format!(
                    "no release key is pinned in {} ({}); install with the control plane's install.sh or `cronium-agent enroll --release-key FILE` to allow updates",
                    enabled.state_dir.display(),
                    files::RELEASE_KEY_FILE
                ),
                true,
            );
            return None;
        };
        match self.fetch(enabled, &key, version, &installed).await {
            Ok(staged) => Some(staged),
            Err(Refusal { reason, retry }) => {
                self.fail(version, reason, retry);
                None
            }
        }
    }

    async fn fetch(
        &self,
        enabled: &Enabled,
        key: &ReleaseKey,
        version: &str,
        installed: &str,
    ) -> Result<Staged, Refusal> {
        self.report(version, UpdateState::Downloading, None);
        let base = format!(
            "{}/downloads/agent/{version}/{}",
            enabled.server_url,
            crate::TARGET
        );
        let client = reqwest::Client::builder()
            .connect_timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|error| Refusal::retry(format!("cannot create an HTTP client: {error}")))?;
        let manifest = get_small(
            &client,
            &format!("{base}/cronium-agent.manifest.json"),
            verify::MAX_MANIFEST_BYTES,
        )
        .await?;
        let manifest_signature = get_small(
            &client,
            &format!("{base}/cronium-agent.manifest.json.sig"),
            MAX_SIGNATURE_BYTES,
        )
        .await?;
        self.report(version, UpdateState::Verifying, None);
        let parsed =
            Manifest::verify(key, &manifest, &manifest_signature).map_err(Refusal::refused)?;
        parsed
            .check_offer(version, crate::TARGET, installed)
            .map_err(Refusal::refused)?;
        if parsed.size > MAX_BINARY_BYTES {
            return Err(Refusal::refused(format!(
                "the signed manifest says {} bytes, more than the {MAX_BINARY_BYTES} an agent binary may have",
                parsed.size
            )));
        }

        self.report(version, UpdateState::Downloading, None);
        let dir = enabled
            .bin
            .parent()
            .ok_or_else(|| Refusal::refused("the agent binary has no directory"))?;
        let staged = dir.join(format!(".cronium-agent.update-{version}"));
        let download = dir.join(format!(".cronium-agent.download-{}", std::process::id()));
        let guard = RemoveOnDrop(Some(download.clone()));
        let binary = tokio::time::timeout(
            DOWNLOAD_TIMEOUT,
            download_to(
                &client,
                &format!("{base}/cronium-agent"),
                &download,
                parsed.size,
            ),
        )
        .await
        .map_err(|_| Refusal::retry("the download of the binary timed out".into()))??;
        let signature = get_small(
            &client,
            &format!("{base}/cronium-agent.sig"),
            MAX_SIGNATURE_BYTES,
        )
        .await?;
        self.report(version, UpdateState::Verifying, None);
        parsed
            .check_binary(key, &binary, &signature)
            .map_err(Refusal::refused)?;
        drop(binary);
        // Verified: only now does the file become executable and get its staged name.
        std::fs::set_permissions(&download, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::fs::rename(&download, &staged))
            .map_err(|error| {
                Refusal::retry(format!(
                    "cannot stage the new binary in {}: {error}",
                    dir.display()
                ))
            })?;
        guard.disarm();
        let staged_guard = RemoveOnDrop(Some(staged.clone()));
        trial_version(&staged).await.map_err(Refusal::refused)?;
        staged_guard.disarm();
        self.report(version, UpdateState::Restarting, None);
        Ok(Staged {
            to_version: version.to_owned(),
            staged,
            manifest,
            manifest_signature,
        })
    }

    /// After the agent drained: hands over to the staged binary (see the module docs). Returns
    /// only if nothing was staged or the exec failed.
    pub(crate) fn restart(&self) -> Option<anyhow::Error> {
        let staged = lock(&self.inner.staged).take()?;
        let enabled = self.inner.enabled.as_ref()?;
        let args: Option<Vec<String>> = std::env::args_os()
            .skip(1)
            .map(|arg| arg.into_string().ok())
            .collect();
        let Some(args) = args else {
            let _ = std::fs::remove_file(&staged.staged);
            self.fail(
                &staged.to_version,
                "the agent's arguments are not UTF-8".into(),
                false,
            );
            return Some(anyhow::anyhow!(
                "cannot restart: the agent's arguments are not UTF-8"
            ));
        };
        let deadline_ms = chrono_now_ms() + enabled.options.deadline.as_millis() as i64;
        let pending = Pending {
            from_version: self.inner.installed_version.clone(),
            to_version: staged.to_version.clone(),
            bin: enabled.bin.clone(),
            staged: staged.staged.clone(),
            args: args.clone(),
            pid: std::process::id(),
            deadline_ms,
            manifest: String::from_utf8_lossy(&staged.manifest).into_owned(),
            manifest_signature: hex::encode(&staged.manifest_signature),
            state: PendingState::Trial,
            reason: None,
        };
        if let Err(error) = files::write_pending(&enabled.state_dir, &pending) {
            let _ = std::fs::remove_file(&staged.staged);
            self.fail(
                &staged.to_version,
                format!("cannot write {}: {error}", files::PENDING_FILE),
                true,
            );
            return Some(anyhow::anyhow!("cannot record the pending update: {error}"));
        }
        let watchdog = std::process::Command::new(&enabled.bin)
            .arg("update-watchdog")
            .arg("--state-dir")
            .arg(&enabled.state_dir)
            .stdin(std::process::Stdio::null())
            .status();
        if !matches!(&watchdog, Ok(status) if status.success()) {
            let _ = files::remove_pending(&enabled.state_dir);
            let _ = std::fs::remove_file(&staged.staged);
            self.fail(
                &staged.to_version,
                format!("cannot start the update watchdog: {watchdog:?}"),
                true,
            );
            return Some(anyhow::anyhow!("cannot start the update watchdog"));
        }
        tracing::info!(from = %pending.from_version, to = %pending.to_version, "starting the new agent binary on trial");
        let _ = std::io::stderr().flush();
        let error = std::process::Command::new(&staged.staged)
            .args(&args)
            .exec();
        // Still the old binary: record the rollback (the watchdog stands down) and run it again.
        let reason = format!("cannot execute the new binary: {error}");
        let mut rolled_back = pending;
        rolled_back.state = PendingState::RolledBack;
        rolled_back.reason = Some(reason.clone());
        let _ = files::write_pending(&enabled.state_dir, &rolled_back);
        tracing::error!(%reason, "starting the installed binary again");
        let again = std::process::Command::new(&enabled.bin).args(&args).exec();
        Some(anyhow::anyhow!(
            "{reason}; and cannot execute {} again: {again}",
            enabled.bin.display()
        ))
    }
}

/// Why a fetch did not produce a staged binary.
struct Refusal {
    reason: String,
    retry: bool,
}

impl Refusal {
    fn retry(reason: String) -> Refusal {
        Refusal {
            reason,
            retry: true,
        }
    }

    fn refused(reason: impl ToString) -> Refusal {
        Refusal {
            reason: reason.to_string(),
            retry: false,
        }
    }
}

impl From<VerifyError> for Refusal {
    fn from(error: VerifyError) -> Refusal {
        Refusal::refused(error)
    }
}

/// Deletes a file when dropped (an unverified download must not stay behind).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    /// Keeps the file.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// GETs a small file, refusing more than `max` bytes.
async fn get_small(client: &reqwest::Client, url: &str, max: usize) -> Result<Vec<u8>, Refusal> {
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.get(url).send())
        .await
        .map_err(|_| Refusal::retry(format!("GET {url} timed out")))?
        .map_err(|error| Refusal::retry(format!("cannot download {url}: {error}")))?;
    let status = response.status();
    if !status.is_success() {
        return Err(Refusal {
            reason: format!("cannot download {url}: HTTP {status}"),
            // A release that is not published (yet) may be tried again later.
            retry: true,
        });
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|error| Refusal::retry(format!("cannot download {url}: {error}")))?;
            if body.len() + chunk.len() > max {
                return Err(Refusal::refused(format!(
                    "{url} is larger than {max} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| Refusal::retry(format!("GET {url} timed out")))??;
    Ok(body)
}

/// Streams the binary into `path` (created 0600, never executable here), at most `size` bytes,
/// fsynced; returns the bytes for verification.
async fn download_to(
    client: &reqwest::Client,
    url: &str,
    path: &Path,
    size: u64,
) -> Result<Vec<u8>, Refusal> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|error| Refusal::retry(format!("cannot download {url}: {error}")))?;
    let status = response.status();
    if !status.is_success() {
        return Err(Refusal::retry(format!(
            "cannot download {url}: HTTP {status}"
        )));
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| Refusal::retry(format!("cannot create {}: {error}", path.display())))?;
    let mut bytes = Vec::with_capacity(size.min(MAX_BINARY_BYTES) as usize);
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|error| Refusal::retry(format!("cannot download {url}: {error}")))?;
        if (bytes.len() + chunk.len()) as u64 > size {
            return Err(Refusal::refused(format!(
                "the binary is larger than the {size} bytes its signed manifest says"
            )));
        }
        file.write_all(&chunk)
            .map_err(|error| Refusal::retry(format!("cannot write {}: {error}", path.display())))?;
        bytes.extend_from_slice(&chunk);
    }
    file.sync_all()
        .map_err(|error| Refusal::retry(format!("cannot write {}: {error}", path.display())))?;
    Ok(bytes)
}

/// Runs the verified binary's `version`: it must start on this host and name this target.
async fn trial_version(binary: &Path) -> Result<(), String> {
    let mut command = tokio::process::Command::new(binary);
    command
        .arg("version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(TRIAL_TIMEOUT, command.output())
        .await
        .map_err(|_| "the new binary's `version` did not answer in time".to_owned())?
        .map_err(|error| format!("the new binary does not start on this host: {error}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let expected = format!("({})", crate::TARGET);
    if !output.status.success() || !text.starts_with("cronium-agent ") || !text.contains(&expected)
    {
        return Err(format!(
            "the new binary's `version` failed ({}) or does not name this agent's target {}",
            output.status,
            crate::TARGET
        ));
    }
    Ok(())
}

/// Start-up (blocking): the pinned key, the installed version, and a previous update's traces.
fn load(
    state_dir: PathBuf,
    server_url: String,
    options: SelfUpdateOptions,
) -> anyhow::Result<Updater> {
    let exe = std::env::current_exe()?;
    let key = match files::read_small(&state_dir.join(files::RELEASE_KEY_FILE))? {
        None => None,
        Some(bytes) => match ReleaseKey::parse(&String::from_utf8_lossy(&bytes)) {
            Ok(key) => Some(key),
            Err(error) => {
                tracing::warn!(%error, "the pinned release key is unusable; updates are refused");
                None
            }
        },
    };
    let own_sha256 = || -> anyhow::Result<String> { Ok(sha256_hex(&std::fs::read(&exe)?)) };
    let mut trial = None;
    let mut bin = exe.clone();
    let mut last = files::read_outcome(&state_dir).unwrap_or_else(|error| {
        tracing::warn!(%error, "ignoring an unreadable update result");
        None
    });
    match files::read_pending(&state_dir) {
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(%error, "removing an unreadable update marker");
            let _ = files::remove_pending(&state_dir);
        }
        Ok(Some(pending)) => {
            let on_trial = pending.state == PendingState::Trial
                && pending.pid == std::process::id()
                && same_file(&exe, &pending.staged);
            if on_trial {
                // This process is the new binary, on trial until its first welcome.
                bin = pending.bin.clone();
                trial = Some(pending);
            } else {
                if pending.state != PendingState::Confirmed {
                    let reason = pending.reason.clone().unwrap_or_else(|| {
                        format!(
                            "the new binary {} stopped before it connected to the control plane",
                            pending.to_version
                        )
                    });
                    tracing::warn!(to = %pending.to_version, %reason, "the update was rolled back");
                    let outcome = Outcome {
                        target_version: pending.to_version.clone(),
                        state: UpdateState::RolledBack,
                        reason: Some(reason),
                        retry: false,
                    };
                    if let Err(error) = files::write_outcome(&state_dir, &outcome) {
                        tracing::warn!(%error, "cannot record the update outcome");
                    }
                    last = Some(outcome);
                    let _ = std::fs::remove_file(&pending.staged);
                }
                let _ = files::remove_pending(&state_dir);
            }
        }
    }
    remove_leftovers(&bin, trial.as_ref().map(|pending| pending.staged.as_path()));
    // The version: the signed manifest of the running binary (the trial's, or the installed one).
    let mut version = crate::VERSION.to_owned();
    let manifest = match &trial {
        Some(pending) => Some((
            pending.manifest.as_bytes().to_vec(),
            hex::decode(&pending.manifest_signature).unwrap_or_default(),
        )),
        None => match (
            files::read_small(&state_dir.join(files::INSTALLED_MANIFEST_FILE))?,
            files::read_small(&state_dir.join(files::INSTALLED_MANIFEST_SIG_FILE))?,
        ) {
            (Some(manifest), Some(signature)) => Some((manifest, signature)),
            _ => None,
        },
    };
    if let (Some(key), Some((manifest, signature))) = (&key, manifest) {
        match Manifest::verify(key, &manifest, &signature) {
            Ok(manifest)
                if manifest.target == crate::TARGET && manifest.sha256 == own_sha256()? =>
            {
                version = manifest.version;
            }
            Ok(_) => tracing::info!(
                "the installed manifest does not describe this binary; reporting the built-in version"
            ),
            Err(error) => {
                tracing::warn!(%error, "the installed manifest does not verify; reporting the built-in version")
            }
        }
    }
    if trial
        .as_ref()
        .is_some_and(|pending| pending.to_version != version)
    {
        // Not the binary that was verified: never confirm it; the watchdog rolls it back.
        tracing::warn!("this binary does not match the pending update's signed manifest");
        trial = None;
    }
    Ok(Updater::new(
        Some(Enabled {
            state_dir,
            bin,
            server_url,
            options,
            key,
        }),
        version,
        trial,
        last,
    ))
}

/// Reads a release public key file for `enroll --release-key`, checking that it is one.
pub fn pinned_key_text(path: &Path) -> anyhow::Result<String> {
    let bytes = files::read_small(path)
        .map_err(|error| anyhow::anyhow!("reading the release key {}: {error}", path.display()))?
        .ok_or_else(|| anyhow::anyhow!("the release key {} does not exist", path.display()))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    ReleaseKey::parse(&text).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
    Ok(text)
}

/// Pins the release public key in the state dir (`release-key.pub`); an existing, different
/// pinned key is never replaced.
pub fn pin_release_key(state_dir: &Path, text: &str) -> anyhow::Result<()> {
    let path = state_dir.join(files::RELEASE_KEY_FILE);
    let wanted = ReleaseKey::parse(text)?;
    if let Some(existing) = files::read_small(&path)? {
        match ReleaseKey::parse(&String::from_utf8_lossy(&existing)) {
            Ok(pinned) if pinned == wanted => return Ok(()),
            _ => anyhow::bail!(
                "{} pins another release key; remove it first if the release key really changed",
                path.display()
            ),
        }
    }
    files::write_atomic(&path, text.as_bytes(), 0o644)
        .map_err(|error| anyhow::anyhow!("writing {}: {error}", path.display()))
}

/// Removes downloads and staged binaries an interrupted update left next to `bin` (e.g. the agent
/// was stopped while it drained for an update), except the one running on trial.
fn remove_leftovers(bin: &Path, keep: Option<&Path>) {
    let Some(dir) = bin.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(".cronium-agent.update-")
            || name.starts_with(".cronium-agent.download-");
        let path = entry.path();
        if ours && keep.is_none_or(|keep| !same_file(&path, keep)) {
            tracing::info!(path = %path.display(), "removing what an interrupted update left");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Whether two paths name the same file (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public_hex(seed: u8) -> String {
        hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .as_bytes(),
        )
    }

    #[test]
    fn a_pinned_release_key_is_kept_and_never_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("release.pub");
        let key_a = public_hex(1);
        std::fs::write(&file, &key_a).unwrap();
        let text = pinned_key_text(&file).unwrap();
        pin_release_key(dir.path(), &text).unwrap();
        // The same key again is fine.
        pin_release_key(dir.path(), &text).unwrap();
        let pinned = dir.path().join(files::RELEASE_KEY_FILE);
        assert_eq!(std::fs::read_to_string(&pinned).unwrap(), key_a);
        // Another key is refused and the pinned one stays.
        let other = public_hex(2);
        let refused = pin_release_key(dir.path(), &other).unwrap_err().to_string();
        assert!(refused.contains("pins another release key"), "{refused}");
        assert_eq!(std::fs::read_to_string(&pinned).unwrap(), key_a);
        // Not a public key at all.
        std::fs::write(
            &file,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(pinned_key_text(&file).is_err());
        assert!(pinned_key_text(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn leftovers_of_an_interrupted_update_are_removed_but_the_trial_binary_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("cronium-agent");
        std::fs::write(&bin, b"agent").unwrap();
        let download = dir.path().join(".cronium-agent.download-17");
        let staged = dir.path().join(".cronium-agent.update-0.2.0");
        let trial = dir.path().join(".cronium-agent.update-0.3.0");
        let unrelated = dir.path().join("other-tool");
        for path in [&download, &staged, &trial, &unrelated] {
            std::fs::write(path, b"x").unwrap();
        }
        remove_leftovers(&bin, Some(&trial));
        assert!(!download.exists() && !staged.exists());
        assert!(trial.exists() && unrelated.exists() && bin.exists());
        remove_leftovers(&bin, None);
        assert!(!trial.exists());
    }
}
