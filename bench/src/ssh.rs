//! The SSH peer: a throwaway sshd on 127.0.0.1 (started by the shared `sshd-throwaway` script)
//! and `ssh … true` timed with a fresh connection and over a ControlMaster connection; for the
//! terminal phase, `ssh -tt` commands of both kinds ([`SshPeer::terminal_command`]).

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
    /// The ControlMaster's pid (from `ssh -O check`), to stop it should `ssh -O exit` not.
    master_pid: Option<libc::pid_t>,
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
            master_pid: None,
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

    /// The value after `flag` in the peer's ssh options (`-i` key file, `-p` port).
    fn option(&self, flag: &str) -> Option<&str> {
        let at = self.options.iter().position(|option| option == flag)?;
        self.options.get(at + 1).map(String::as_str)
    }

    /// The private key root logs in with, and the port: what a Cronium SSH server needs.
    pub fn login(&self) -> anyhow::Result<(String, u16)> {
        let key = self
            .option("-i")
            .context("the peer's ssh options name no key")?;
        let port = self
            .option("-p")
            .and_then(|port| port.parse().ok())
            .context("the peer's ssh options name no port")?;
        let key = std::fs::read_to_string(key).with_context(|| format!("cannot read {key}"))?;
        Ok((key, port))
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
        let elapsed = self.time(command, "ssh (ControlMaster) true").await?;
        if self.master_pid.is_none() {
            self.master_pid = self.master_pid().await;
        }
        Ok(elapsed)
    }

    /// The ControlMaster's pid, as `ssh -O check` reports it (`Master running (pid=N)`).
    async fn master_pid(&self) -> Option<libc::pid_t> {
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(&self.options)
            .args(["-o", &format!("ControlPath={}", self.control_path)])
            .args(["-O", "check"])
            .arg(&self.destination)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(10), command.output())
            .await
            .ok()?
            .ok()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let (_, rest) = stderr.split_once("(pid=")?;
        rest.split_once(')')?.0.parse().ok()
    }

    /// `ssh -tt -e none … REMOTE` (a remote PTY, no escape character), over a connection of its
    /// own or through the ControlMaster ([`SshPeer::ensure_master`] first), with
    /// `TERM=xterm-256color` like a Cronium terminal. Stdio is left to the caller.
    pub fn terminal_command(&self, multiplexed: bool, remote: &str) -> tokio::process::Command {
        let control_path = if multiplexed {
            format!("ControlPath={}", self.control_path)
        } else {
            "ControlPath=none".to_owned()
        };
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(&self.options)
            .args(["-tt", "-e", "none", "-o", "ControlMaster=no", "-o"])
            .arg(control_path)
            .arg(&self.destination)
            .arg(remote)
            .env("TERM", "xterm-256color")
            .kill_on_drop(true);
        command
    }

    /// Starts the ControlMaster connection if needed and checks that it answers (`ssh -O
    /// check`), so multiplexed commands cannot silently fall back to connections of their own.
    pub async fn ensure_master(&mut self) -> anyhow::Result<()> {
        self.multiplexed().await?;
        if self.master_pid().await.is_none() {
            bail!("the ControlMaster does not answer `ssh -O check`");
        }
        Ok(())
    }

    /// Closes the ControlMaster connection (`ssh -O exit`), if one was started, and stops the
    /// master process if it is still there afterwards.
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
        if let Some(pid) = self.master_pid.take() {
            stop_master(pid, &self.dir);
        }
    }
}

/// Stops the ControlMaster `pid` should `ssh -O exit` not have (a master interrupted together
/// with its clients may miss it): waits for it to go, then sends SIGTERM, then SIGKILL, each
/// only while its command line still names `dir`, so a recycled pid is never signalled. The
/// master is not our child (it detached), so it cannot be waited for otherwise.
fn stop_master(pid: libc::pid_t, dir: &Path) {
    let dir = dir.to_string_lossy().into_owned();
    let still_there = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&dir))
    };
    for signal in [None, Some(libc::SIGTERM), Some(libc::SIGKILL)] {
        if let Some(signal) = signal {
            if !still_there() {
                return;
            }
            // SAFETY: kill(2) on a pid whose command line named our control path just now.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !still_there() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("the ssh ControlMaster (pid {pid}) did not stop");
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
