//! [`TmpfsMount`]: a small tmpfs a test mounts over one of its own directories (a data dir, a
//! spool) to run it out of space ([`TmpfsMount::fill`]) and give the space back
//! ([`TmpfsMount::free`]). Needs root.
//!
//! The mount is lazily unmounted on drop, also when the test panics (processes still using it
//! keep their files until they exit). Its source is named `cronium-e2e-<pid>-tmpfs`, so a mount
//! left by a test process that was killed is found and unmounted by the next [`TmpfsMount::mount`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The source name of every tmpfs a test mounts, followed by the test process's pid.
const SOURCE_PREFIX: &str = "cronium-e2e-";
/// The name of the file that fills a mount.
const FILLER: &str = "filler";

/// A tmpfs mounted over a directory, unmounted on drop.
#[derive(Debug)]
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size_bytes` with mode 0700 over `path` (an existing, empty
    /// directory). Fails, saying so, unless this process is root.
    pub fn mount(path: &Path, size_bytes: u64) -> Result<TmpfsMount> {
        // SAFETY: plain syscall without arguments.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            bail!("mounting a tmpfs needs root; this process runs as uid {euid}");
        }
        unmount_stale();
        let source = format!("{SOURCE_PREFIX}{}-tmpfs", std::process::id());
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0700"))
            .arg(&source)
            .arg(path)
            .output()
            .context("run mount (util-linux)")?;
        if !output.status.success() {
            bail!(
                "mount -t tmpfs on {} failed ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file of zeros until the file system has no space left (ENOSPC); returns how many
    /// bytes it took.
    pub fn fill(&self) -> Result<u64> {
        let path = self.path.join(FILLER);
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))?;
        let block = vec![0u8; 4096];
        let mut written = 0u64;
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(len) => written += len as u64,
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(error) => {
                    return Err(error).with_context(|| format!("fill {}", path.display()));
                }
            }
        }
        Ok(written)
    }

    /// Deletes what [`TmpfsMount::fill`] wrote.
    pub fn free(&self) -> Result<()> {
        let path = self.path.join(FILLER);
        std::fs::remove_file(&path).with_context(|| format!("delete {}", path.display()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        lazy_unmount(&self.path);
    }
}

fn lazy_unmount(path: &Path) {
    match Command::new("umount").arg("--lazy").arg(path).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "==== umount {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => eprintln!("==== umount {}: {error}", path.display()),
    }
}

/// Unmounts the tmpfs mounts of test processes that no longer exist. Best effort.
fn unmount_stale() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(pid) = source
            .strip_prefix(SOURCE_PREFIX)
            .and_then(|rest| rest.strip_suffix("-tmpfs"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // `/proc/self/mounts` escapes spaces and such as octal; test paths have none.
        eprintln!("==== unmounting the stale tmpfs {target} of test process {pid}");
        lazy_unmount(Path::new(target));
    }
}
