//! Signed agent releases for a [`TestCluster`] and runs of its `/install.sh`.
//!
//! [`TestCluster::publish_agent_release`] does what `cronium dev` does: a release key
//! (`cronium release keygen`) and the built `cronium-agent` signed into the control plane's
//! releases dir (`cronium release publish`), which the control plane serves at once.
//! [`run_installer`] runs the downloaded script to completion with a deadline (killed on
//! timeout or drop); [`spawn_installer`] starts it as a long-lived child under a [`ChildGuard`]
//! (with `--no-service` the script ends by exec'ing the agent).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{ChildGuard, TestCluster};

/// How long one installer run may take (it downloads a debug agent of ~60 MB over loopback).
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A cluster's release key files.
#[derive(Clone, Debug)]
pub struct ReleaseKeys {
    /// The private key (mode 0600).
    pub private: PathBuf,
    /// The public key (PEM).
    pub public: PathBuf,
}

/// Runs `cronium release ARGS…` and returns its stdout; fails with its stderr.
pub async fn cronium_release(args: &[&std::ffi::OsStr]) -> Result<String> {
    let mut command = tokio::process::Command::new(crate::binary("cronium")?);
    command
        .arg("release")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("cronium release timed out")?
        .context("run cronium release")?;
    if !output.status.success() {
        bail!(
            "cronium release {:?} failed: {}",
            args,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Generates a release key into `dir` (`release.key`, `release.pub`).
pub async fn keygen(dir: &Path) -> Result<ReleaseKeys> {
    cronium_release(&["keygen".as_ref(), "--out".as_ref(), dir.as_os_str()]).await?;
    Ok(ReleaseKeys {
        private: dir.join("release.key"),
        public: dir.join("release.pub"),
    })
}

/// Signs `file` as `version` for `target` with `key` (writes the `.sig` and the manifest).
pub async fn sign(file: &Path, key: &Path, version: &str, target: &str) -> Result<()> {
    cronium_release(&[
        "sign".as_ref(),
        file.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--version".as_ref(),
        version.as_ref(),
        "--target".as_ref(),
        target.as_ref(),
    ])
    .await
    .map(drop)
}

impl TestCluster {
    /// The releases dir the control plane serves (`<data dir>/releases`).
    pub fn releases_dir(&self) -> PathBuf {
        self.data_dir().join("releases")
    }

    /// Makes a release key in the cluster's dir and publishes the built `cronium-agent` with it
    /// as `version` for `target` (the agent's own when `None`).
    pub async fn publish_agent_release(
        &self,
        version: Option<&str>,
        target: Option<&str>,
    ) -> Result<ReleaseKeys> {
        let key_dir = self.dir().join("release-keys");
        let keys = if key_dir.join("release.key").exists() {
            ReleaseKeys {
                private: key_dir.join("release.key"),
                public: key_dir.join("release.pub"),
            }
        } else {
            keygen(&key_dir).await?
        };
        let agent = crate::binary("cronium-agent")?;
        let releases = self.releases_dir();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "publish".as_ref(),
            agent.as_os_str(),
            "--key".as_ref(),
            keys.private.as_os_str(),
            "--releases-dir".as_ref(),
            releases.as_os_str(),
        ];
        if let Some(version) = version {
            args.extend([
                std::ffi::OsStr::new("--version"),
                std::ffi::OsStr::new(version),
            ]);
        }
        if let Some(target) = target {
            args.extend([
                std::ffi::OsStr::new("--target"),
                std::ffi::OsStr::new(target),
            ]);
        }
        cronium_release(&args).await?;
        Ok(keys)
    }

    /// Downloads `/install.sh` (unauthenticated) into the cluster's dir and returns its path.
    pub async fn download_install_script(&self) -> Result<PathBuf> {
        let response = reqwest::get(self.api().url("/install.sh"))
            .await
            .context("GET /install.sh")?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET /install.sh answered {status}: {text}");
        }
        let path = self.dir().join("install.sh");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// The host's target triple as the agent names it (`cronium-agent version`).
pub fn agent_target() -> Result<String> {
    let output = Command::new(crate::binary("cronium-agent")?)
        .arg("version")
        .output()
        .context("cronium-agent version")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "cronium-agent 0.1.0 (x86_64-unknown-linux-gnu), protocol …"
    text.split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(target, _)| target.to_owned())
        .with_context(|| format!("unexpected `cronium-agent version` output: {text}"))
}

impl TestCluster {
    /// The installer's command: `shell script args…`, with `env` added, `CRONIUM_*` removed and
    /// the cluster's marker set (so the agent it starts, and its jobs, are found on drop).
    pub fn installer_command(
        &self,
        shell: &str,
        script: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Command {
        let mut command = Command::new(shell);
        command.arg(script).args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CRONIUM_") {
                command.env_remove(&name);
            }
        }
        command.env(crate::cluster::CLUSTER_MARKER_VAR, self.marker());
        for (name, value) in env {
            command.env(name, value);
        }
        command
    }
}

/// Runs the installer to completion (killed after [`INSTALL_TIMEOUT`] or when dropped).
pub async fn run_installer(command: Command) -> Result<Output> {
    let mut command = tokio::process::Command::from(command);
    command.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(INSTALL_TIMEOUT, command.output())
        .await
        .context("the installer did not finish in time")?
        .context("run the installer")
}

/// Starts the installer as a guarded child logging into `log`.
pub fn spawn_installer(name: &str, command: Command, log: &Path) -> Result<ChildGuard> {
    let (guard, _ready) = ChildGuard::spawn(name, command, log, None)?;
    Ok(guard)
}
