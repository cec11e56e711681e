//! `cronium-agent update-watchdog`: the old binary's guard over a new binary on trial.
//!
//! The old agent starts it right before it executes the new binary (the same pid continues with
//! the new program). The watchdog is old, trusted code: it detaches (forks, the parent exits at
//! once so nobody has to reap it) and then watches `update-pending.json` and the agent's pid:
//!
//! - the marker is confirmed or gone: the new binary connected; the watchdog exits;
//! - the deadline passes while the marker is still on trial: the marker is marked rolled back
//!   (with the reason), then the new process is killed (SIGKILL);
//! - the agent's process disappears (or turns zombie) while on trial: the same, without a kill.
//!
//! Confirming (the new binary) and rolling back (the watchdog) each move the marker on from
//! `trial` under an exclusive lock of `update.lock`, so exactly one of them wins a race at the
//! deadline.
//!
//! The installed binary was never replaced (the new one only runs from its staged path until it
//! confirms), so rolling back is starting the installed binary again: under systemd
//! (`INVOCATION_ID` set) the unit's `Restart=on-failure` does that; in the foreground the
//! watchdog itself executes it with the agent's arguments (and moves the pid in an
//! `install.sh --detach` pid file to its own). The old binary then reads the marker and reports
//! `rolled_back`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::files::{self, PendingState};

/// How often the marker and the process are looked at.
const POLL: Duration = Duration::from_millis(200);

/// How long a killed process may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The process's state letter and start time from `/proc/PID/stat`; `None` if it is gone.
fn process_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // starttime is field 22 overall; after the state (field 3) it is the 19th.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

fn alive(pid: u32, start: u64) -> bool {
    matches!(process_stat(pid), Some((state, started)) if started == start && state != 'Z' && state != 'X')
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the watchdog for the update pending in `state_dir`. Must be called before any thread is
/// started (it forks).
pub fn run(state_dir: &Path) -> ExitCode {
    let Ok(Some(pending)) = files::read_pending(state_dir) else {
        eprintln!(
            "cronium-agent update-watchdog: no pending update in {}",
            state_dir.display()
        );
        return ExitCode::FAILURE;
    };
    let Some((_, start)) = process_stat(pending.pid) else {
        eprintln!(
            "cronium-agent update-watchdog: the agent process {} is gone",
            pending.pid
        );
        return ExitCode::FAILURE;
    };
    // SAFETY: called from `main` before the async runtime or any other thread exists, so the
    // child is a complete copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!(
                "cronium-agent update-watchdog: fork failed: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::FAILURE;
        }
        0 => {}
        _ => return ExitCode::SUCCESS,
    }
    let reason = loop {
        std::thread::sleep(POLL);
        let current = match files::read_pending(state_dir) {
            Ok(Some(current)) if current.pid == pending.pid => current,
            _ => return ExitCode::SUCCESS,
        };
        if current.state != PendingState::Trial {
            return ExitCode::SUCCESS;
        }
        if !alive(pending.pid, start) {
            break format!(
                "the new binary {} exited before it connected to the control plane",
                pending.to_version
            );
        }
        if now_ms() > pending.deadline_ms {
            break format!(
                "the new binary {} did not connect to the control plane before the deadline",
                pending.to_version
            );
        }
    };
    let mut rolled_back = pending.clone();
    rolled_back.state = PendingState::RolledBack;
    rolled_back.reason = Some(reason.clone());
    match files::settle_trial(state_dir, pending.pid, &rolled_back) {
        Ok(true) => {}
        // The new binary confirmed first: it stays.
        Ok(false) => return ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cronium-agent update-watchdog: cannot record the rollback: {error}")
        }
    }
    if alive(pending.pid, start) {
        eprintln!(
            "cronium-agent update-watchdog: {reason}; stopping it and starting {} again",
            pending.bin.display()
        );
        // SAFETY: plain syscall on a pid we checked belongs to the agent (same start time).
        unsafe { libc::kill(pending.pid as libc::pid_t, libc::SIGKILL) };
        let waited = std::time::Instant::now();
        while alive(pending.pid, start) && waited.elapsed() < KILL_WAIT {
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        eprintln!(
            "cronium-agent update-watchdog: {reason}; starting {} again",
            pending.bin.display()
        );
    }
    if std::env::var_os("INVOCATION_ID").is_some() {
        // systemd restarts the unit, whose ExecStart is the installed (old) binary.
        return ExitCode::SUCCESS;
    }
    // This process becomes the agent: an `install.sh --detach` pid file must name it now, or the
    // installer's next run and `--uninstall` could not stop the agent.
    if let Err(error) = files::move_detached_pid(state_dir, pending.pid, std::process::id()) {
        eprintln!(
            "cronium-agent update-watchdog: cannot update {}: {error}",
            state_dir.join(files::DETACHED_PID_FILE).display()
        );
    }
    let error = std::process::Command::new(&pending.bin)
        .args(&pending.args)
        .exec();
    eprintln!(
        "cronium-agent update-watchdog: cannot start {}: {error}",
        pending.bin.display()
    );
    ExitCode::FAILURE
}
