//! The self-updater's files in the state dir, all written atomically (temp file, fsync, rename):
//!
//! - `release-key.pub`: the release public key pinned at install time (the installer, or
//!   `cronium-agent enroll --release-key FILE`); the only key updates are verified with.
//! - `installed.manifest.json` (+ `.sig`): the signed manifest of the binary that runs; an
//!   agent's version is what this manifest says, if it verifies and describes the running binary.
//! - `update-pending.json`: written by the old binary right before it executes the new one:
//!   from/to versions, the paths, the arguments, the pid, the deadline and the new manifest. The
//!   new binary confirms it after its first welcome; the watchdog (old code) marks it rolled back
//!   when the deadline passes or the new process dies first.
//! - `update-result.json`: the last outcome, reported to the control plane after every welcome.
//! - `update.lock`: locked while the trial is confirmed or rolled back.
//! - `agent.pid` is not the updater's: `install.sh --no-service --detach` writes the detached
//!   agent's pid there. A rollback in the foreground runs the old binary in the watchdog's
//!   process, so the watchdog moves that pid on ([`move_detached_pid`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cronium_protocol::{UpdateState, UpdateStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// File names in the state dir.
pub const RELEASE_KEY_FILE: &str = "release-key.pub";
pub const INSTALLED_MANIFEST_FILE: &str = "installed.manifest.json";
pub const INSTALLED_MANIFEST_SIG_FILE: &str = "installed.manifest.json.sig";
pub const PENDING_FILE: &str = "update-pending.json";
pub const RESULT_FILE: &str = "update-result.json";
/// Serializes the decisions about a trial: confirming it (new binary) and rolling it back
/// (watchdog) each happen under an exclusive `flock` of this file.
pub const LOCK_FILE: &str = "update.lock";

/// The pid file of an agent started by `install.sh --no-service --detach` (read by the
/// installer's next run and by `--uninstall` to stop that agent).
pub const DETACHED_PID_FILE: &str = "agent.pid";

/// Largest state file read back (they are a few hundred bytes).
const MAX_STATE_FILE: u64 = 64 * 1024;

/// Where a pending update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingState {
    /// The new binary runs on trial and has not connected yet.
    Trial,
    /// The new binary connected and took the old one's place.
    Confirmed,
    /// The trial failed (`reason` says how); the old binary is to run again.
    RolledBack,
}

/// `update-pending.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub from_version: String,
    pub to_version: String,
    /// The installed binary (still the old one during the trial).
    pub bin: PathBuf,
    /// The verified new binary, next to `bin`, executed on trial.
    pub staged: PathBuf,
    /// The arguments the agent was started with (after the program name).
    pub args: Vec<String>,
    /// The agent's process (the same pid before and after the exec).
    pub pid: u32,
    /// Unix milliseconds by which the new binary must have connected.
    pub deadline_ms: i64,
    /// The new binary's signed manifest and its signature (hex), installed on confirmation.
    pub manifest: String,
    pub manifest_signature: String,
    pub state: PendingState,
    pub reason: Option<String>,
}

/// `update-result.json`: the last outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub target_version: String,
    pub state: UpdateState,
    pub reason: Option<String>,
    /// Whether the same version may be tried again at the next announcement (a failed download
    /// may; a refused release or a rolled-back binary may not).
    pub retry: bool,
}

impl Outcome {
    pub fn status(&self) -> UpdateStatus {
        UpdateStatus {
            target_version: self.target_version.clone(),
            state: self.state,
            reason: self.reason.clone(),
        }
    }
}

/// Writes `path` atomically with `mode`: a temp file next to it, fsync, rename, fsync of the dir.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// fsyncs the directory holding `path` (so a rename in it is durable).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Reads a small file; `None` if it does not exist.
pub fn read_small(path: &Path) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {MAX_STATE_FILE} bytes", path.display()),
        ));
    }
    Ok(Some(bytes))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match read_small(path)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {error}", path.display()),
            )
        }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes, 0o600)
}

/// Moves a trial marker on to `next` if, under the lock, it is still on trial for `pid`;
/// returns whether it did (otherwise the other side decided first).
pub fn settle_trial(state_dir: &Path, pid: u32, next: &Pending) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let lock = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(state_dir.join(LOCK_FILE))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    match read_pending(state_dir)? {
        Some(current) if current.pid == pid && current.state == PendingState::Trial => {
            write_pending(state_dir, next)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

pub fn read_pending(state_dir: &Path) -> io::Result<Option<Pending>> {
    read_json(&state_dir.join(PENDING_FILE))
}

pub fn write_pending(state_dir: &Path, pending: &Pending) -> io::Result<()> {
    write_json(&state_dir.join(PENDING_FILE), pending)
}

pub fn remove_pending(state_dir: &Path) -> io::Result<()> {
    match fs::remove_file(state_dir.join(PENDING_FILE)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

pub fn read_outcome(state_dir: &Path) -> io::Result<Option<Outcome>> {
    read_json(&state_dir.join(RESULT_FILE))
}

pub fn write_outcome(state_dir: &Path, outcome: &Outcome) -> io::Result<()> {
    write_json(&state_dir.join(RESULT_FILE), outcome)
}

/// If `agent.pid` names `from` (the agent's process that a rollback replaced), makes it name `to`
/// (the process that runs the agent now); any other content is left alone. Returns whether it
/// changed the file.
pub fn move_detached_pid(state_dir: &Path, from: u32, to: u32) -> io::Result<bool> {
    let path = state_dir.join(DETACHED_PID_FILE);
    match read_small(&path)? {
        Some(bytes) if String::from_utf8_lossy(&bytes).trim() == from.to_string() => {
            write_atomic(&path, format!("{to}\n").as_bytes(), 0o644)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `<dir>/<name of bin>.prev`: the binary an update replaced, kept for a manual rollback.
pub fn previous_path(bin: &Path) -> PathBuf {
    let name = bin
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cronium-agent".into());
    bin.with_file_name(format!("{name}.prev"))
}

/// The new binary is installed: the old one is kept as `.prev`, the staged one is renamed over
/// `bin` (atomic; the running process keeps its inode), then its manifest becomes the installed
/// one. Called by the new binary after its first welcome.
pub fn install_staged(state_dir: &Path, pending: &Pending) -> io::Result<()> {
    let previous = previous_path(&pending.bin);
    let previous_temporary = previous.with_extension(format!("prev.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&previous_temporary);
    if fs::hard_link(&pending.bin, &previous_temporary).is_err() {
        fs::copy(&pending.bin, &previous_temporary)?;
    }
    fs::rename(&previous_temporary, &previous)?;
    fs::rename(&pending.staged, &pending.bin)?;
    sync_dir(&pending.bin)?;
    let signature = hex::decode(&pending.manifest_signature)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    write_atomic(
        &state_dir.join(INSTALLED_MANIFEST_FILE),
        pending.manifest.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &state_dir.join(INSTALLED_MANIFEST_SIG_FILE),
        &signature,
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(dir: &Path) -> Pending {
        Pending {
            from_version: "0.1.0".into(),
            to_version: "0.2.0".into(),
            bin: dir.join("bin/cronium-agent"),
            staged: dir.join("bin/.cronium-agent.update-0.2.0"),
            args: vec!["run".into()],
            pid: 42,
            deadline_ms: 1,
            manifest: "{\"version\":\"0.2.0\"}\n".into(),
            manifest_signature: hex::encode([7u8; 64]),
            state: PendingState::Trial,
            reason: None,
        }
    }

    #[test]
    fn state_files_round_trip_and_installing_keeps_the_previous_binary() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir_all(&state).unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        assert_eq!(read_pending(&state).unwrap(), None);
        let pending = pending(dir.path());
        write_pending(&state, &pending).unwrap();
        assert_eq!(read_pending(&state).unwrap(), Some(pending.clone()));

        fs::write(&pending.bin, b"old").unwrap();
        fs::write(&pending.staged, b"new").unwrap();
        install_staged(&state, &pending).unwrap();
        assert_eq!(fs::read(&pending.bin).unwrap(), b"new");
        assert_eq!(fs::read(previous_path(&pending.bin)).unwrap(), b"old");
        assert!(!pending.staged.exists());
        assert_eq!(
            fs::read(state.join(INSTALLED_MANIFEST_SIG_FILE)).unwrap(),
            [7u8; 64]
        );
        remove_pending(&state).unwrap();
        remove_pending(&state).unwrap();
        assert_eq!(read_pending(&state).unwrap(), None);

        let outcome = Outcome {
            target_version: "0.2.0".into(),
            state: UpdateState::RolledBack,
            reason: Some("did not connect".into()),
            retry: false,
        };
        write_outcome(&state, &outcome).unwrap();
        assert_eq!(read_outcome(&state).unwrap(), Some(outcome));
        // Garbage and oversized files are errors, not panics.
        fs::write(state.join(RESULT_FILE), b"{").unwrap();
        assert!(read_outcome(&state).is_err());
        fs::write(state.join(PENDING_FILE), vec![b' '; 70 * 1024]).unwrap();
        assert!(read_pending(&state).is_err());
    }

    #[test]
    fn the_detached_pid_file_moves_only_from_the_replaced_pid() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join(DETACHED_PID_FILE);
        // No pid file (systemd, foreground): nothing is created.
        assert!(!move_detached_pid(dir.path(), 41, 42).unwrap());
        assert!(!pid_file.exists());
        // Another agent's pid (a second install restarted it meanwhile): left alone.
        fs::write(&pid_file, "7\n").unwrap();
        assert!(!move_detached_pid(dir.path(), 41, 42).unwrap());
        assert_eq!(fs::read_to_string(&pid_file).unwrap(), "7\n");
        // The replaced agent's pid: now the new process's.
        fs::write(&pid_file, "41\n").unwrap();
        assert!(move_detached_pid(dir.path(), 41, 42).unwrap());
        assert_eq!(fs::read_to_string(&pid_file).unwrap(), "42\n");
    }
}
