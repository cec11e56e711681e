//! Where in-process agents keep their state dirs: on a tmpfs (`/dev/shm`) unless told
//! otherwise. Many simulated agents' spools on the benchmark machine's one disk would measure
//! that disk's inode allocator (on ext4 without a journal, each file created after many
//! deletions scans the recently deleted inodes), not the control plane; each real agent has a
//! disk of its own.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// `/dev/shm` when it exists, else `fallback`.
pub fn tmpfs_or(fallback: PathBuf) -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() { shm } else { fallback }
}

/// A new temp dir named `prefix…` inside `dir`, removed when dropped.
pub fn temp_dir_in(dir: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a temp dir in {}", dir.display()))
}

/// The type of the file system `path` is on (`tmpfs`, `ext4`, … or its magic number).
pub fn file_system(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".to_owned();
    };
    // SAFETY: statfs(2) with a NUL-terminated path and a zeroed struct it fills.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return "unknown".to_owned();
    }
    match stat.f_type as u64 {
        0x0102_1994 => "tmpfs".to_owned(),
        0xEF53 => "ext4".to_owned(),
        0x9123_683E => "btrfs".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x794C_7630 => "overlayfs".to_owned(),
        other => format!("file system type {other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_is_recognised() {
        if Path::new("/dev/shm").is_dir() {
            assert_eq!(file_system(Path::new("/dev/shm")), "tmpfs");
        }
        assert_eq!(file_system(Path::new("/no/such/dir")), "unknown");
    }
}
