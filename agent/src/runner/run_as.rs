//! Host jobs as another user: resolving the event's `user`, the agent's allow list, handing the
//! work dir over, and the switch between fork and exec.
//!
//! A job's `user` is `name`, `uid` or `uid:gid` and must exist in the host's user database
//! (`getpwnam_r`/`getpwuid_r`); an explicit group must be one of the user's own groups. The agent
//! runs a job as another user only when that user is in its `--allow-run-as` list and the agent
//! is root; its own user is always allowed (and needs no switch). Everything is resolved before
//! the fork, including the supplementary groups (`getgrouplist`), because between fork and exec
//! only async-signal-safe calls are allowed: [`Switch::apply`] calls `setgroups`, `setgid`,
//! `setuid` and `chdir`, nothing else.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An entry of the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub home: PathBuf,
}

/// The user a host job runs as, resolved before the fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUser {
    pub name: String,
    pub uid: libc::uid_t,
    /// The primary group the job gets (the user's, or the one named in `uid:gid`).
    pub gid: libc::gid_t,
    /// The user's supplementary groups (what `initgroups` would set).
    pub groups: Vec<libc::gid_t>,
    pub home: PathBuf,
}

/// The user the agent runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentUser {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

impl AgentUser {
    /// The agent process's effective user and group.
    pub fn current() -> AgentUser {
        // SAFETY: geteuid and getegid cannot fail and have no preconditions.
        unsafe {
            AgentUser {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }
}

/// The user `user` names (`name`, `uid` or `uid:gid`) if a job may run as it here.
///
/// `Ok(None)`: it is the agent's own user and group, so nothing needs to change. `Err` is the
/// message for the job log: the user or group does not exist, the user is not in `allowed` (the
/// `--allow-run-as` list; entries are names or uids), or the agent is not root.
pub fn resolve(
    user: &str,
    allowed: &[String],
    agent: AgentUser,
) -> Result<Option<TargetUser>, String> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((user_part, group_part)) => (user_part, Some(group_part)),
        None => (user, None),
    };
    let lookup_error = |error: io::Error| format!("could not look up user {user}: {error}");
    let account = match parse_id(user_part) {
        Some(uid) => user_by_uid(uid)
            .map_err(lookup_error)?
            .ok_or_else(|| format!("no user with uid {uid} exists on this host"))?,
        None => user_by_name(user_part)
            .map_err(lookup_error)?
            .ok_or_else(|| format!("no user named {user_part:?} exists on this host"))?,
    };
    let groups = groups_of(&account).map_err(lookup_error)?;
    let gid = match group_part {
        None => account.gid,
        Some(group) => {
            let gid = match parse_id(group) {
                Some(gid) => gid,
                None => group_by_name(group)
                    .map_err(|error| format!("could not look up group {group}: {error}"))?
                    .ok_or_else(|| format!("no group named {group:?} exists on this host"))?,
            };
            if gid != account.gid && !groups.contains(&gid) {
                return Err(format!(
                    "group {group} is not one of the groups of user {}; a job may only pick one \
                     of its user's own groups",
                    account.name
                ));
            }
            gid
        }
    };
    if account.uid == agent.uid && gid == agent.gid {
        return Ok(None);
    }
    if account.uid != agent.uid && !is_allowed(&account, allowed) {
        let listed = if allowed.is_empty() {
            "none are listed".to_owned()
        } else {
            format!("listed: {}", allowed.join(", "))
        };
        return Err(format!(
            "user {} is not allowed on this agent: jobs run as the agent's own user or a user \
             listed in its --allow-run-as option (CRONIUM_AGENT_ALLOW_RUN_AS; {listed})",
            account.name
        ));
    }
    if agent.uid != 0 {
        return Err(format!(
            "the agent runs as uid {}, not as root, so it cannot run jobs as user {} (uid {}, \
             gid {gid})",
            agent.uid, account.name, account.uid
        ));
    }
    Ok(Some(TargetUser {
        name: account.name,
        uid: account.uid,
        gid,
        groups,
        home: account.home,
    }))
}

/// Whether `account` is in the allow list (by name or uid).
fn is_allowed(account: &Account, allowed: &[String]) -> bool {
    allowed.iter().any(|entry| match parse_id(entry) {
        Some(uid) => uid == account.uid,
        None => {
            *entry == account.name
                || user_by_name(entry)
                    .ok()
                    .flatten()
                    .is_some_and(|listed| listed.uid == account.uid)
        }
    })
}

/// Checks the `--allow-run-as` entries; returns a warning per entry that names no user here.
pub fn check_allow_list(allowed: &[String]) -> Vec<String> {
    allowed
        .iter()
        .filter(|entry| match parse_id(entry) {
            Some(uid) => !matches!(user_by_uid(uid), Ok(Some(_))),
            None => !matches!(user_by_name(entry), Ok(Some(_))),
        })
        .map(|entry| format!("--allow-run-as lists {entry:?}, which is no user on this host"))
        .collect()
}

fn parse_id(text: &str) -> Option<u32> {
    (!text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// Calls a `get*_r` function with a growing buffer until it fits.
fn with_buffer<T>(
    mut call: impl FnMut(&mut [u8]) -> Result<Option<T>, i32>,
) -> io::Result<Option<T>> {
    let mut size = 1024;
    loop {
        let mut buffer = vec![0u8; size];
        match call(&mut buffer) {
            Ok(found) => return Ok(found),
            Err(libc::ERANGE) if size < 1 << 20 => size *= 4,
            Err(code) => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

/// Copies a `passwd` entry (pointing into the caller's buffer) into an [`Account`].
///
/// # Safety
/// `entry` must be a valid `passwd` filled by `getpw*_r`, whose strings are alive.
unsafe fn account_from(entry: &libc::passwd) -> Account {
    // SAFETY: guaranteed by the caller: the strings are NUL-terminated and alive.
    unsafe {
        Account {
            name: CStr::from_ptr(entry.pw_name).to_string_lossy().into_owned(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
            home: PathBuf::from(std::ffi::OsStr::from_bytes(
                CStr::from_ptr(entry.pw_dir).to_bytes(),
            )),
        }
    }
}

/// The user called `name`, if any.
pub fn user_by_name(name: &str) -> io::Result<Option<Account>> {
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buffer| {
        // SAFETY: all-zero is a valid `passwd` (integers and null pointers).
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let code = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut result,
            )
        };
        match code {
            // SAFETY: a non-null result points at `entry`, filled from `buffer`, both alive.
            0 if !result.is_null() => Ok(Some(unsafe { account_from(&entry) })),
            0 => Ok(None),
            code => Err(code),
        }
    })
}

/// The user with `uid`, if any.
pub fn user_by_uid(uid: libc::uid_t) -> io::Result<Option<Account>> {
    with_buffer(|buffer| {
        // SAFETY: all-zero is a valid `passwd` (integers and null pointers).
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let code = unsafe {
            libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut result,
            )
        };
        match code {
            // SAFETY: a non-null result points at `entry`, filled from `buffer`, both alive.
            0 if !result.is_null() => Ok(Some(unsafe { account_from(&entry) })),
            0 => Ok(None),
            code => Err(code),
        }
    })
}

/// The id of the group called `name`, if any.
pub fn group_by_name(name: &str) -> io::Result<Option<libc::gid_t>> {
    let Ok(c_name) = CString::new(name) else {
        return Ok(None);
    };
    with_buffer(|buffer| {
        // SAFETY: all-zero is a valid `group` (integers and null pointers).
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let code = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut result,
            )
        };
        match code {
            0 if !result.is_null() => Ok(Some(entry.gr_gid)),
            0 => Ok(None),
            code => Err(code),
        }
    })
}

/// The supplementary groups of `account` (its primary group included).
fn groups_of(account: &Account) -> io::Result<Vec<libc::gid_t>> {
    let name = CString::new(account.name.as_str())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name with a NUL byte"))?;
    let mut capacity: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; capacity as usize];
        let mut count = capacity;
        // SAFETY: `groups` holds `count` elements; the name is NUL-terminated.
        let status = unsafe {
            libc::getgrouplist(name.as_ptr(), account.gid, groups.as_mut_ptr(), &mut count)
        };
        if status >= 0 {
            groups.truncate(count.max(0) as usize);
            return Ok(groups);
        }
        if capacity >= 65_536 {
            return Err(io::Error::other("the user is in too many groups"));
        }
        // `count` now holds the number needed (glibc); grow at least fourfold otherwise.
        capacity = count.max(capacity * 4);
    }
}

impl TargetUser {
    /// What the child does between fork and exec to become this user; `work_dir` is checked to
    /// be reachable as the user.
    pub fn switch(&self, work_dir: &Path) -> io::Result<Switch> {
        Ok(Switch {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            work_dir: CString::new(work_dir.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the work dir"))?,
        })
    }

    /// Gives the work dir and everything in it (script, helper libraries, the helper dir and
    /// its socket) to this user, so the job can use it and connect to the helper endpoint.
    pub fn take_over(&self, work_dir: &Path) -> io::Result<()> {
        chown_tree(work_dir, self.uid, self.gid)
    }

    /// The first directory above `work_dir` this user cannot search (by its mode bits), with
    /// that mode: the likely reason a spawn failed with "permission denied".
    pub fn unreachable_parent(&self, work_dir: &Path) -> Option<(PathBuf, u32)> {
        let mut ancestors: Vec<&Path> = work_dir.ancestors().skip(1).collect();
        ancestors.reverse();
        ancestors.into_iter().find_map(|dir| {
            let metadata = std::fs::metadata(dir).ok()?;
            let mode = metadata.mode();
            let searchable = if metadata.uid() == self.uid {
                mode & 0o100 != 0
            } else if metadata.gid() == self.gid || self.groups.contains(&metadata.gid()) {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            (!searchable).then(|| (dir.to_owned(), mode & 0o7777))
        })
    }
}

fn chown_tree(path: &Path, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The user switch of one child, prepared before the fork.
#[derive(Debug)]
pub struct Switch {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    work_dir: CString,
}

impl Switch {
    /// Becomes the user: supplementary groups, group, user (in that order: after `setuid` the
    /// others are no longer allowed), then enters the work dir as that user, which fails with
    /// `EACCES` when the user cannot reach it. Only async-signal-safe calls, no allocation.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: plain system calls; the pointers (groups, work dir) outlive them.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
                || libc::chdir(self.work_dir.as_ptr()) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: AgentUser = AgentUser { uid: 0, gid: 0 };

    fn nobody() -> Account {
        user_by_name("nobody")
            .unwrap()
            .expect("these tests need the user nobody")
    }

    #[test]
    fn users_are_resolved_by_name_uid_and_uid_gid() {
        let nobody = nobody();
        let allowed = vec!["nobody".to_owned()];
        let by_name = resolve("nobody", &allowed, ROOT).unwrap().unwrap();
        assert_eq!((by_name.uid, by_name.gid), (nobody.uid, nobody.gid));
        assert_eq!(by_name.name, "nobody");
        assert!(by_name.groups.contains(&nobody.gid));
        let by_uid = resolve(&nobody.uid.to_string(), &allowed, ROOT)
            .unwrap()
            .unwrap();
        assert_eq!(by_uid, by_name);
        let with_group = resolve(&format!("{}:{}", nobody.uid, nobody.gid), &allowed, ROOT)
            .unwrap()
            .unwrap();
        assert_eq!(with_group, by_name);
        // Allowed by uid as well.
        assert!(resolve("nobody", &[nobody.uid.to_string()], ROOT).is_ok());
    }

    #[test]
    fn refusals_say_why() {
        let allowed = vec!["nobody".to_owned()];
        let error = resolve("no-such-user-cronium", &allowed, ROOT).unwrap_err();
        assert!(
            error.contains("no user named \"no-such-user-cronium\""),
            "{error}"
        );
        let error = resolve("4000000000", &allowed, ROOT).unwrap_err();
        assert!(error.contains("no user with uid 4000000000"), "{error}");
        let error = resolve("nobody", &[], ROOT).unwrap_err();
        assert!(error.contains("--allow-run-as"), "{error}");
        assert!(error.contains("none are listed"), "{error}");
        let error = resolve("nobody:0", &allowed, ROOT).unwrap_err();
        assert!(
            error.contains("not one of the groups of user nobody"),
            "{error}"
        );
        let error = resolve("nobody:no-such-group-cronium", &allowed, ROOT).unwrap_err();
        assert!(error.contains("no group named"), "{error}");
        let not_root = AgentUser {
            uid: 1000,
            gid: 1000,
        };
        let error = resolve("nobody", &allowed, not_root).unwrap_err();
        assert!(error.contains("not as root"), "{error}");
    }

    #[test]
    fn the_agents_own_user_needs_no_switch_and_no_listing() {
        let nobody = nobody();
        let as_nobody = AgentUser {
            uid: nobody.uid,
            gid: nobody.gid,
        };
        assert_eq!(resolve("nobody", &[], as_nobody), Ok(None));
        let root = user_by_uid(0).unwrap().unwrap();
        assert_eq!(resolve(&root.name, &[], ROOT), Ok(None));
        assert_eq!(resolve("0", &[], ROOT), Ok(None));
    }

    #[test]
    fn the_allow_list_is_checked_against_the_user_database() {
        assert!(check_allow_list(&["nobody".to_owned(), "0".to_owned()]).is_empty());
        let warnings = check_allow_list(&["no-such-user-cronium".to_owned()]);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("no-such-user-cronium"));
    }

    #[test]
    fn an_unsearchable_parent_is_found() {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().unwrap();
        let work = temp.path().join("state/work/job-1");
        std::fs::create_dir_all(&work).unwrap();
        for dir in [temp.path(), &temp.path().join("state/work")] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        std::fs::set_permissions(
            temp.path().join("state"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let target = TargetUser {
            name: "nobody".into(),
            uid: 4_000_000,
            gid: 4_000_000,
            groups: vec![],
            home: "/".into(),
        };
        assert_eq!(
            target.unreachable_parent(&work),
            Some((temp.path().join("state"), 0o700))
        );
        std::fs::set_permissions(
            temp.path().join("state"),
            std::fs::Permissions::from_mode(0o711),
        )
        .unwrap();
        assert_eq!(target.unreachable_parent(&work), None);
    }
}
