//! Child processes the benchmark starts: the control plane, the agents, strace, Salt's daemons.
//!
//! Every child is wrapped in a [`ChildGuard`] that stops it when dropped (SIGTERM, then SIGKILL
//! after a grace period, then reaps it), so nothing outlives the benchmark, also on errors and
//! panics. Their output is drained by threads; the last lines are kept for error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;

/// How many trailing output lines a guard keeps for error messages.
const KEPT_LINES: usize = 40;

/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running child process, stopped and reaped on drop.
pub struct ChildGuard {
    name: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// The child leads a process group of its own, and signals go to the whole group (for
    /// programs that fork workers, like Salt's master and minions).
    group: bool,
}

impl ChildGuard {
    /// Spawns `command` with piped stdout/stderr. Every output line is kept in a short tail and,
    /// if `lines` is given, sent there too.
    pub fn spawn(
        name: &str,
        command: &mut Command,
        lines: Option<mpsc::UnboundedSender<String>>,
    ) -> anyhow::Result<ChildGuard> {
        ChildGuard::spawn_inner(name, command, lines, false)
    }

    /// [`ChildGuard::spawn`] in a new process group: stopping the guard signals every process of
    /// that group, so the workers the child forked are stopped with it.
    pub fn spawn_group(
        name: &str,
        command: &mut Command,
        lines: Option<mpsc::UnboundedSender<String>>,
    ) -> anyhow::Result<ChildGuard> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        ChildGuard::spawn_inner(name, command, lines, true)
    }

    fn spawn_inner(
        name: &str,
        command: &mut Command,
        lines: Option<mpsc::UnboundedSender<String>>,
        group: bool,
    ) -> anyhow::Result<ChildGuard> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        drain(stdout, tail.clone(), lines.clone());
        drain(stderr, tail.clone(), lines);
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            tail,
            group,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's last output lines, for error messages.
    pub fn tail(&self) -> String {
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Fails if the child has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); its last output:\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }

    /// Sends `signal` to the child (if it still runs), or to its process group.
    pub fn signal(&mut self, signal: libc::c_int) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) with the pid of our own unreaped child (or the group it leads); it
            // cannot be recycled yet.
            unsafe {
                libc::kill(if self.group { -pid } else { pid }, signal);
            }
        }
    }

    /// SIGKILLs what is left of the child's process group once the child itself has exited (a
    /// group's id is not reused while any member lives, so this reaches only its stragglers).
    fn kill_group_stragglers(&self) {
        if self.group {
            // SAFETY: kill(2) of a process group this guard created.
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
            }
        }
    }

    /// Waits (polling, bounded by `timeout`) for the child to exit; true if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group_stragglers();
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                self.kill_group_stragglers();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop after SIGTERM; killing it", self.name);
        self.signal(libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.kill_group_stragglers();
    }
}

/// Reads `reader` line by line on a thread until EOF.
fn drain(
    reader: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    lines: Option<mpsc::UnboundedSender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(lines) = &lines {
                let _ = lines.send(line.clone());
            }
            let mut tail = tail.lock().unwrap_or_else(|poison| poison.into_inner());
            if tail.len() == KEPT_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

/// A process's resident set size (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// The benchmarked binaries, found next to this executable.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The control plane, `cronium`.
    pub cronium: PathBuf,
    /// The agent, `cronium-agent`.
    pub agent: PathBuf,
}

impl Binaries {
    /// Finds `cronium` and `cronium-agent` in the directory of the running executable.
    pub fn next_to_self() -> anyhow::Result<Binaries> {
        let me = std::env::current_exe().context("cannot find the benchmark's own executable")?;
        let dir = me.parent().unwrap_or(Path::new("."));
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} not found; build everything first: \
                     cargo build --release -p cronium-control-plane -p cronium-agent -p cronium-bench",
                    path.display()
                );
            }
            Ok(path)
        };
        Ok(Binaries {
            cronium: find("cronium")?,
            agent: find("cronium-agent")?,
        })
    }
}

/// Runs a short command to completion (bounded by `timeout`; killed if it takes longer) and
/// returns its stdout.
pub async fn run_output(
    what: &str,
    mut command: tokio::process::Command,
    timeout: Duration,
) -> anyhow::Result<String> {
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .with_context(|| format!("{what} took longer than {timeout:?}"))?
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
