//! The SSH peer: a throwaway sshd on 127.0.0.1 (started by the shared `sshd-throwaway` script)
//! and `ssh … true` timed with a fresh connection and over a ControlMaster connection.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procs::run_output;

/// How long one `ssh … true` may take.
const SSH_TIMEOUT: Duration = Duration::from_secs(20);

/// A running throwaway sshd, stopped (and its ControlMaster closed) on drop.
pub struct SshPeer {
    script: PathBuf,
    dir: PathBuf,
    /// `ssh` options from the script (key, port, host-key handling, batch mode).
    options: Vec<String>,
    /// `root@127.0.0.1`.
    destination: String,
    control_path: String,
    master_started: bool,
}

impl SshPeer {
    /// Starts sshd in `dir` with `script`. `Ok(None)` (after printing why) when the peer cannot
    /// run here because `/usr/sbin/sshd` or the script is missing.
    pub async fn start(script: &Path, dir: &Path) -> anyhow::Result<Option<SshPeer>> {
        if !Path::new("/usr/sbin/sshd").is_file() {
            eprintln!(
                "NOTE: /usr/sbin/sshd is missing (apt-get install openssh-server); skipping the SSH comparison"
            );
            return Ok(None);
        }
        if !script.is_file() {
            eprintln!(
                "NOTE: {} is missing; skipping the SSH comparison",
                script.display()
            );
            return Ok(None);
        }
        let mut command = tokio::process::Command::new(script);
        command.arg(dir).arg("start");
        let mut peer = SshPeer {
            script: script.to_owned(),
            dir: dir.to_owned(),
            options: Vec::new(),
            destination: String::new(),
            control_path: format!("{}/cm-%r@%h:%p", dir.display()),
            master_started: false,
        };
        // From here on the guard stops whatever the script started, also if it fails half-way.
        let printed = run_output("sshd-throwaway start", command, Duration::from_secs(30)).await?;
        let line = printed
            .lines()
            .find_map(|line| line.strip_prefix("SSH="))
            .context("sshd-throwaway printed no SSH= line")?;
        let words: Vec<String> = line
            .trim_matches('"')
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let Some((destination, options)) = words.split_last() else {
            bail!("cannot parse the SSH= line {line:?}");
        };
        if options.first().map(String::as_str) != Some("ssh")
            || !destination.ends_with("@127.0.0.1")
        {
            bail!("unexpected SSH= line {line:?}");
        }
        peer.options = options[1..].to_vec();
        peer.destination = destination.clone();
        Ok(Some(peer))
    }

    fn command(&self, extra: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(&self.options)
            .args(extra)
            .arg(&self.destination)
            .arg("true")
            // Null stdio: a ControlPersist master forks into the background and would otherwise
            // keep our pipes open.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn time(&self, mut command: tokio::process::Command, what: &str) -> anyhow::Result<f64> {
        let started = Instant::now();
        let status = tokio::time::timeout(SSH_TIMEOUT, command.status())
            .await
            .with_context(|| format!("{what} took longer than {SSH_TIMEOUT:?}"))?
            .with_context(|| format!("cannot run {what}"))?;
        let elapsed = started.elapsed();
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(elapsed.as_secs_f64() * 1e3)
    }

    /// `ssh … true` over a fresh connection; milliseconds.
    pub async fn fresh(&self) -> anyhow::Result<f64> {
        let command = self.command(&["-o", "ControlMaster=no", "-o", "ControlPath=none"]);
        self.time(command, "ssh (fresh connection) true").await
    }

    /// `ssh … true` over the ControlMaster connection (started by the first call); milliseconds.
    pub async fn multiplexed(&mut self) -> anyhow::Result<f64> {
        let control_path = format!("ControlPath={}", self.control_path);
        let command = self.command(&[
            "-o",
            "ControlMaster=auto",
            "-o",
            &control_path,
            "-o",
            "ControlPersist=60",
        ]);
        self.master_started = true;
        self.time(command, "ssh (ControlMaster) true").await
    }

    /// Closes the ControlMaster connection (`ssh -O exit`), if one was started.
    pub fn close_master(&mut self) {
        if !self.master_started {
            return;
        }
        self.master_started = false;
        let mut command = Command::new("ssh");
        command
            .args(&self.options)
            .args([
                "-o",
                &format!("ControlPath={}", self.control_path),
                "-O",
                "exit",
            ])
            .arg(&self.destination);
        run_bounded(command, Duration::from_secs(10));
    }
}

impl Drop for SshPeer {
    fn drop(&mut self) {
        self.close_master();
        let mut command = Command::new(&self.script);
        command.arg(&self.dir).arg("stop");
        run_bounded(command, Duration::from_secs(10));
    }
}

/// Runs `command` with null stdio, killing it if it takes longer than `timeout` (for Drop).
fn run_bounded(mut command: Command, timeout: Duration) {
    let Ok(mut child) = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
