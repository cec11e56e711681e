//! The PTY of one terminal session and the threads that bridge its blocking I/O (portable-pty).
//!
//! [`spawn`] opens a PTY of the requested size and starts the shell on it as a login shell (its
//! `argv[0]` is `-<name>`), in its own session (`setsid`, so its pid is also its process group
//! and session id) with the PTY as its controlling terminal. The agent keeps the master and two
//! duplicates of it, each owned by one thread:
//! - the reader ([`start_reader`]) polls the master (so it notices a stop request within
//!   [`POLL_INTERVAL`]), reads chunks of at most `MAX_TERMINAL_CHUNK` and hands each to the
//!   session, which may block it for backpressure;
//! - the writer ([`start_writer`]) writes keystrokes from a bounded channel; it ends when the
//!   channel closes or the PTY is gone;
//! - the waiter ([`start_waiter`]) blocks in `wait` for the shell and so reaps it (no zombie).
//!
//! [`signal_session`] signals the shell's process group and every other process of its session
//! (background jobs have groups of their own), found through `/proc`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use cronium_protocol::MAX_TERMINAL_CHUNK;
use portable_pty::{Child, CommandBuilder, MasterPty, PtySize, native_pty_system};
use tokio::sync::{mpsc, oneshot};

/// How often a reader blocked in `poll` (or waiting for viewer room) checks its stop flag.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What a session's shell is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Launch {
    /// The shell (absolute path); started as a login shell.
    pub(crate) shell: PathBuf,
    /// The whole environment of the shell; nothing of the agent's own environment is inherited.
    pub(crate) env: Vec<(String, String)>,
    /// The working directory (the user's home).
    pub(crate) cwd: PathBuf,
}

/// A started shell on a fresh PTY, before its threads run.
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) master: Box<dyn MasterPty + Send>,
    /// A duplicate of the master for the reader thread.
    pub(crate) reader: File,
    /// A duplicate of the master for the writer thread.
    pub(crate) writer: File,
    pub(crate) child: Box<dyn Child + Send + Sync>,
}

/// Whether `path` is an absolute path to an executable file.
pub(crate) fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.is_absolute()
        && std::fs::metadata(path)
            .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// A PTY size from the viewer's columns and rows (zero means "unknown": 80×24).
pub(crate) fn size(cols: u16, rows: u16) -> PtySize {
    PtySize {
        rows: if rows == 0 { 24 } else { rows },
        cols: if cols == 0 { 80 } else { cols },
        pixel_width: 0,
        pixel_height: 0,
    }
}

/// Opens a PTY of `cols`×`rows` and starts the shell of `launch` on it.
pub(crate) fn spawn(launch: &Launch, cols: u16, rows: u16) -> anyhow::Result<Spawned> {
    // portable-pty would fall back to another shell; a wrong one is an error here.
    if !is_executable(&launch.shell) {
        anyhow::bail!("{} is not an executable file", launch.shell.display());
    }
    let pair = native_pty_system().openpty(size(cols, rows))?;
    // The default program is `$SHELL` as a login shell (`argv[0]` = `-name`).
    let mut command = CommandBuilder::new_default_prog();
    command.env_clear();
    for (name, value) in &launch.env {
        command.env(name, value);
    }
    command.env("SHELL", &launch.shell);
    command.cwd(&launch.cwd);
    let child = pair.slave.spawn_command(command)?;
    // The shell holds the slave now; the agent keeps only the master side.
    drop(pair.slave);
    let pid = child
        .process_id()
        .ok_or_else(|| anyhow::anyhow!("the shell has no process id"))?;
    let master = pair.master;
    let duplicate = || -> anyhow::Result<File> {
        let fd = master
            .as_raw_fd()
            .ok_or_else(|| anyhow::anyhow!("the PTY master has no file descriptor"))?;
        // SAFETY: `fd` is the master's descriptor, open for as long as `master` lives, which
        // outlives this borrow; the duplicate is a new descriptor owned by the returned File.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        Ok(File::from(owned))
    };
    let files = (|| Ok::<_, anyhow::Error>((duplicate()?, duplicate()?)))();
    match files {
        Ok((reader, writer)) => Ok(Spawned {
            pid,
            master,
            reader,
            writer,
            child,
        }),
        Err(error) => {
            // Nothing will supervise this shell: end it and reap it here.
            let mut child = child;
            signal_session(pid, libc::SIGKILL);
            let _ = child.wait();
            Err(error)
        }
    }
}

/// Starts the reader thread: reads the PTY until it reports end of file (every process holding
/// the slave side is gone) or `stop` is set, handing every chunk to `on_output`.
pub(crate) fn start_reader(
    name: String,
    file: File,
    stop: Arc<AtomicBool>,
    mut on_output: impl FnMut(&[u8]) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let mut file = file;
        let mut buffer = vec![0u8; MAX_TERMINAL_CHUNK];
        while !stop.load(Ordering::Acquire) {
            let mut poll = libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, POLL_INTERVAL.as_millis() as i32) };
            if ready < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if ready == 0 {
                continue;
            }
            match file.read(&mut buffer) {
                // EIO: the slave side is closed (every process of the session is gone).
                Ok(0) => break,
                Err(error) if error.raw_os_error() == Some(libc::EIO) => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    tracing::debug!(%error, "reading the PTY failed");
                    break;
                }
                Ok(read) => on_output(&buffer[..read]),
            }
        }
    })
}

/// Starts the writer thread: writes every piece of input to the PTY, in order, until the
/// channel closes or a write fails (the PTY is gone).
pub(crate) fn start_writer(
    name: String,
    file: File,
    mut input: mpsc::Receiver<Vec<u8>>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let mut file = file;
        while let Some(data) = input.blocking_recv() {
            if let Err(error) = file.write_all(&data) {
                tracing::debug!(%error, "writing to the PTY failed");
                break;
            }
        }
    })
}

/// Starts the waiter thread: waits for the shell (reaping it) and sends its exit code, `None`
/// when a signal killed it.
pub(crate) fn start_waiter(
    name: String,
    mut child: Box<dyn Child + Send + Sync>,
    exited: oneshot::Sender<Option<i32>>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let code = match child.wait() {
            Ok(status) if status.signal().is_none() => Some(status.exit_code() as i32),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, "waiting for a terminal's shell failed");
                None
            }
        };
        let _ = exited.send(code);
    })
}

/// Sends `signal` to the process group `session` and to every process whose session id is
/// `session` (the shell's pid); returns how many processes were signalled besides the group.
/// Also sends SIGCONT after SIGHUP, so stopped jobs see the hangup.
pub(crate) fn signal_session(session: u32, signal: libc::c_int) -> usize {
    let Ok(session_id) = libc::pid_t::try_from(session) else {
        return 0;
    };
    if session_id <= 1 {
        return 0;
    }
    // SAFETY: plain syscalls; a negative pid addresses the process group.
    unsafe {
        libc::kill(-session_id, signal);
        if signal == libc::SIGHUP {
            libc::kill(-session_id, libc::SIGCONT);
        }
    }
    let members = session_members(session_id);
    for pid in &members {
        // SAFETY: plain syscalls on pids read from /proc a moment ago.
        unsafe {
            libc::kill(*pid, signal);
            if signal == libc::SIGHUP {
                libc::kill(*pid, libc::SIGCONT);
            }
        }
    }
    members.len()
}

/// The live processes (not zombies) whose session id is `session`.
pub(crate) fn session_members(session: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(state, sid)| sid == session && state != 'Z' && state != 'X')
        })
        .collect()
}

/// The state and the session id from a `/proc/<pid>/stat` line. The command name may contain
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, libc::pid_t)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let _pgrp = fields.next()?;
    let session = fields.next()?.parse().ok()?;
    Some((state, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_are_parsed() {
        assert_eq!(
            parse_stat("42 (a) b (c)) S 1 42 42 34816 42 4194560"),
            Some(('S', 42))
        );
        assert_eq!(parse_stat("7 (bash) Z 1 7 9 0"), Some(('Z', 9)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }
}
