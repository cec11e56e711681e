//! Child processes of a test and a look at the machine's process table.
//!
//! [`ChildGuard`] spawns a binary with its stdout and stderr drained by two threads into a log
//! file (so the pipes never fill up), optionally reports the first stdout line that starts with a
//! readiness prefix, and on drop kills the process with SIGKILL and reaps it. The child stays in
//! the test's process group (so a test runner that kills the group on timeout reaches it) and
//! gets SIGKILL from the kernel if the spawning thread dies without running `Drop`. [`live_processes_with_arg`] and [`kill_processes_with_env`] read `/proc`
//! to find processes a test caused to exist indirectly (the jobs an agent ran).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

/// A running child process that is killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `command` with stdin closed and stdout/stderr appended to `log_path`.
    ///
    /// When `ready_prefix` is given, the returned receiver gets the first stdout line starting with
    /// it; the receiver fails if the process closes stdout first.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log_path: &Path,
        ready_prefix: Option<&str>,
    ) -> Result<(ChildGuard, oneshot::Receiver<String>)> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log file {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(log));
        // Only the program and its arguments: the environment holds secrets (ENCRYPTION_KEY).
        let args: Vec<String> = command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let program = command.get_program().to_string_lossy().into_owned();
        append_line(
            &log,
            format!("==== {name}: {program} {}", args.join(" ")).as_bytes(),
        );
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only makes an async-signal-safe
        // syscall. The death signal fires when the spawning thread exits; the harness spawns from
        // the test's own thread, which outlives every guard.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawn {name}: {program}"))?;
        let (ready_sender, ready_receiver) = oneshot::channel();
        // `spawn` was asked for piped stdout and stderr, so both handles are present.
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let prefix = ready_prefix.map(str::to_owned);
        let stdout_log = Arc::clone(&log);
        std::thread::spawn(move || {
            drain(stdout, &stdout_log, prefix.as_deref(), Some(ready_sender))
        });
        std::thread::spawn(move || drain(stderr, &log, None, None));
        Ok((
            ChildGuard {
                name: name.to_owned(),
                child,
                log_path: log_path.to_path_buf(),
                exit_status: None,
            },
            ready_receiver,
        ))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file holding the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Kills only this process (not its group) with SIGKILL and reaps it, like the OOM killer or a
    /// power cut would: the children it spawned are left to fend for themselves.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit_status {
            return Ok(status);
        }
        // SAFETY: plain syscall on a pid we own and have not reaped yet (so it cannot be reused).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("wait for {}", self.name))?;
        self.exit_status = Some(status);
        Ok(status)
    }

    /// The exit status if the process has exited (it is reaped then), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.exit_status {
            return Ok(Some(status));
        }
        let status = self
            .child
            .try_wait()
            .with_context(|| format!("poll {}", self.name))?;
        self.exit_status = status;
        Ok(status)
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            // SAFETY: plain syscall on a pid we own and have not reaped yet.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// The last `lines` lines of a log file (lossy UTF-8), or a note when it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// A process found in `/proc`.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub pid: i32,
    /// The one-letter state from `/proc/PID/stat` (`R`, `S`, `Z`, …).
    pub state: char,
    /// The arguments joined with spaces.
    pub cmdline: String,
}

/// Every live (not zombie) process other than this one whose command line contains `marker`.
pub fn live_processes_with_arg(marker: &str) -> Vec<ProcessInfo> {
    let own_pid = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|pid| *pid != own_pid)
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.contains(marker) {
                return None;
            }
            let state = process_state(pid)?;
            (state != 'Z' && state != 'X').then(|| ProcessInfo {
                pid,
                state,
                cmdline: cmdline.trim_end().to_owned(),
            })
        })
        .collect()
}

/// Sends SIGKILL to every process other than this one whose environment holds exactly the entry
/// `entry` (`NAME=value`); returns how many were signalled.
pub fn kill_processes_with_env(entry: &str) -> usize {
    let own_pid = std::process::id() as i32;
    let mut killed = 0;
    for pid in all_pids() {
        if pid == own_pid {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|byte| *byte == 0)
            .any(|item| item == entry.as_bytes())
        {
            // SAFETY: plain syscall; at worst the pid has just exited and the signal is lost.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (second field) is in parentheses and may itself contain ") ".
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.trim_start().chars().next()
}

fn drain(
    pipe: impl Read,
    log: &Mutex<File>,
    ready_prefix: Option<&str>,
    mut ready: Option<oneshot::Sender<String>>,
) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        append_line(log, &line);
        if let Some(prefix) = ready_prefix {
            let text = String::from_utf8_lossy(&line);
            if text.starts_with(prefix)
                && let Some(sender) = ready.take()
            {
                let _ = sender.send(text.trim_end().to_owned());
            }
        }
    }
}

fn append_line(log: &Mutex<File>, line: &[u8]) {
    // A poisoned lock only means another drain thread panicked mid-write; keep logging.
    let mut file = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let _ = file.write_all(line);
    if !line.ends_with(b"\n") {
        let _ = file.write_all(b"\n");
    }
}
