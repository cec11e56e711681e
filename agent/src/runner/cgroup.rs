//! Cgroup limits for host jobs: memory (swap included where the host can limit it), CPU and PIDs.
//!
//! [`Cgroups::probe`] runs once at agent start and finds, per controller, a directory under which
//! the agent may create cgroups:
//!
//! - **cgroup v2** (preferred): the agent's own cgroup (`0::/path` in `/proc/self/cgroup`, under
//!   the `cgroup2` mount) must offer the controller in `cgroup.controllers`, and the agent enables
//!   it for its children in `cgroup.subtree_control`. The v2 "no internal processes" rule refuses
//!   that (`EBUSY`) while processes live in the agent's cgroup itself; then the agent moves itself
//!   into a leaf child `agent/` and tries again. It moves only its own process: when other
//!   processes share its cgroup (e.g. a shell in a container) it gives up rather than move
//!   strangers, and v2 limits are unavailable. Under systemd, `Delegate=yes` gives the agent a
//!   cgroup of its own.
//! - **cgroup v1**, for controllers v2 does not offer: the agent's own cgroup in the mounted
//!   `memory`, `pids` and `cpu` hierarchies, if it may create children there (root, usually).
//!
//! Each candidate is checked by creating and removing a probe child, so "available" means
//! "writable". Per attempt with limits, [`Cgroups::create`] makes `cronium-<job>-<attempt>` under
//! each directory involved and writes the limits: v2 `memory.max` + `memory.swap.max = 0`,
//! `pids.max`, `cpu.max`; v1 `memory.limit_in_bytes` + `memory.memsw.limit_in_bytes` (or
//! `memory.swappiness = 0` without swap accounting), `pids.max`, `cpu.cfs_quota_us`.
//!
//! **Invariant:** no process of an attempt with limits runs outside its cgroup. The runner opens
//! each `cgroup.procs` before it forks, and the child writes `0` ("the writing process") to them
//! between fork and exec ([`join_self`]), so the script and everything it starts are inside
//! before the first instruction of the interpreter runs. When the attempt ends, every process
//! left in the cgroup is killed (`cgroup.kill` on v2, else SIGKILL to each pid listed) and the
//! cgroup removed ([`JobCgroup::remove`]); this also catches processes that left the job's
//! process group. An OOM kill is read from `memory.events` (v2) or `memory.oom_control` (v1).
//!
//! Limits the host cannot apply are not an error: the job runs and its log says which limits
//! were not applied ([`not_applied_message`]). Every path is injectable ([`Cgroups::new`]), so
//! the tests check the files written against a fake tree.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cronium_protocol::HostSpec;

/// CFS period used for CPU limits, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Smallest CFS quota the kernel accepts, in microseconds.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// How long [`JobCgroup::remove`] keeps killing and retrying before it leaves a cgroup behind.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// Poll interval while a cgroup empties.
const REMOVE_POLL: Duration = Duration::from_millis(20);

/// The leaf the agent moves itself into on cgroup v2 when its own cgroup holds processes.
pub const AGENT_LEAF: &str = "agent";

/// The cgroup of one attempt: `cronium-<job_id>-<attempt>`.
pub fn cgroup_name(attempt_dir: &str) -> String {
    format!("cronium-{attempt_dir}")
}

/// A resource controller the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// The kernel's name of the controller.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// Which cgroup interface a directory speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where the cgroups of one controller are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub version: Version,
    /// The parent of the job cgroups (the agent's own cgroup in that hierarchy).
    pub parent: PathBuf,
}

/// What this host offers for job limits, per controller (`None`: not available).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroups {
    pub memory: Option<Place>,
    pub pids: Option<Place>,
    pub cpu: Option<Place>,
    /// Why controllers are missing, for the start-up log.
    pub notes: Vec<String>,
}

impl Cgroups {
    /// No controller at all: every limit is reported as not applied.
    pub fn none() -> Cgroups {
        Cgroups::default()
    }

    /// Explicit places (tests use a fake tree).
    pub fn new(memory: Option<Place>, pids: Option<Place>, cpu: Option<Place>) -> Cgroups {
        Cgroups {
            memory,
            pids,
            cpu,
            notes: Vec::new(),
        }
    }

    /// Finds the usable controllers of this host from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup` (on cgroup v2 this may move the agent into a leaf cgroup, see the
    /// module docs).
    pub fn probe() -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        probe_from(&mountinfo, &own, &real_write, std::process::id())
    }

    /// The place of `controller`, if available.
    pub fn place(&self, controller: Controller) -> Option<&Place> {
        match controller {
            Controller::Memory => self.memory.as_ref(),
            Controller::Pids => self.pids.as_ref(),
            Controller::Cpu => self.cpu.as_ref(),
        }
    }

    fn place_mut(&mut self, controller: Controller) -> &mut Option<Place> {
        match controller {
            Controller::Memory => &mut self.memory,
            Controller::Pids => &mut self.pids,
            Controller::Cpu => &mut self.cpu,
        }
    }

    /// One line for the start-up log: what is available where.
    pub fn describe(&self) -> String {
        Controller::ALL
            .iter()
            .map(|controller| match self.place(*controller) {
                Some(place) => format!(
                    "{} {} ({})",
                    controller.name(),
                    match place.version {
                        Version::V1 => "v1",
                        Version::V2 => "v2",
                    },
                    place.parent.display()
                ),
                None => format!("{} unavailable", controller.name()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The distinct parent directories in use.
    fn parents(&self) -> Vec<(Version, PathBuf)> {
        let mut parents: Vec<(Version, PathBuf)> = Vec::new();
        for controller in Controller::ALL {
            if let Some(place) = self.place(controller)
                && !parents.iter().any(|(_, parent)| *parent == place.parent)
            {
                parents.push((place.version, place.parent.clone()));
            }
        }
        parents
    }

    /// Creates the attempt's cgroup `name` for the limits of `spec` that this host supports.
    /// Returns the cgroup (`None` when no limit applies) and the limits that could not be
    /// applied because the host lacks their controller.
    pub fn create(
        &self,
        name: &str,
        spec: &HostSpec,
    ) -> io::Result<(Option<JobCgroup>, Vec<Controller>)> {
        let requested: Vec<Controller> = [
            (Controller::Memory, spec.memory_mb.is_some()),
            (Controller::Pids, spec.pids.is_some()),
            (Controller::Cpu, spec.cpus.is_some()),
        ]
        .into_iter()
        .filter_map(|(controller, wanted)| wanted.then_some(controller))
        .collect();
        let (usable, missing): (Vec<Controller>, Vec<Controller>) = requested
            .into_iter()
            .partition(|controller| self.place(*controller).is_some());
        if usable.is_empty() {
            return Ok((None, missing));
        }
        let mut cgroup = JobCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            memory: None,
            removed: false,
        };
        for controller in &usable {
            let Some(place) = self.place(*controller) else {
                continue;
            };
            let dir = place.parent.join(name);
            if !cgroup.dirs.iter().any(|(_, known)| *known == dir) {
                make_fresh_dir(&dir)?;
                cgroup.dirs.push((place.version, dir.clone()));
            }
            let written = match controller {
                Controller::Memory => {
                    cgroup.memory = Some((place.version, dir.clone()));
                    write_memory_limit(place.version, &dir, spec.memory_mb.unwrap_or_default())
                }
                Controller::Pids => {
                    write_control(&dir.join("pids.max"), &spec.pids.unwrap_or(1).to_string())
                }
                Controller::Cpu => write_cpu_limit(place.version, &dir, spec.cpus.unwrap_or(1.0)),
            };
            if let Err(error) = written {
                let error = io::Error::new(
                    error.kind(),
                    format!(
                        "could not set the {} limit in {}: {error}",
                        controller.name(),
                        dir.display()
                    ),
                );
                cgroup.remove_now();
                return Err(error);
            }
        }
        for (_, dir) in &cgroup.dirs {
            let path = dir.join("cgroup.procs");
            match OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
            {
                Ok(file) => cgroup.procs.push(file),
                Err(error) => {
                    let error = io::Error::new(
                        error.kind(),
                        format!("could not open {}: {error}", path.display()),
                    );
                    cgroup.remove_now();
                    return Err(error);
                }
            }
        }
        Ok((Some(cgroup), missing))
    }

    /// Kills what is left in cgroup `name` (from an agent that crashed while an attempt ran)
    /// and removes it. Returns whether anything was found.
    pub fn remove_leftover(&self, name: &str) -> bool {
        let dirs: Vec<(Version, PathBuf)> = self
            .parents()
            .into_iter()
            .map(|(version, parent)| (version, parent.join(name)))
            .filter(|(_, dir)| dir.is_dir())
            .collect();
        if dirs.is_empty() {
            return false;
        }
        let mut cgroup = JobCgroup {
            dirs,
            procs: Vec::new(),
            memory: None,
            removed: false,
        };
        let deadline = std::time::Instant::now() + REMOVE_WAIT;
        while !cgroup.try_remove() && std::time::Instant::now() < deadline {
            std::thread::sleep(REMOVE_POLL);
        }
        if !cgroup.removed {
            cgroup.warn_left();
            cgroup.removed = true;
        }
        true
    }
}

/// The job log line for limits the host could not apply.
pub fn not_applied_message(missing: &[Controller]) -> String {
    let names: Vec<&str> = missing.iter().map(|controller| controller.name()).collect();
    let (limits, noun) = match names.as_slice() {
        [one] => (format!("{one} limit"), "controller"),
        [init @ .., last] => (
            format!("{} and {last} limits", init.join(", ")),
            "controllers",
        ),
        [] => return String::new(),
    };
    let list = names.join("/");
    format!(
        "[cronium: {limits} not applied: this host offers no writable cgroup {list} {noun} \
         (cgroup v2 with delegation, or the cgroup v1 {list} hierarchy)]\n"
    )
}

/// The cgroup(s) of one attempt: one directory per hierarchy involved (one on v2).
#[derive(Debug)]
pub struct JobCgroup {
    dirs: Vec<(Version, PathBuf)>,
    /// `cgroup.procs` of every dir, opened before the fork for [`join_self`].
    procs: Vec<File>,
    /// Where the memory controller's counters are read.
    memory: Option<(Version, PathBuf)>,
    removed: bool,
}

impl JobCgroup {
    /// The directories of the cgroup (tests check they are gone afterwards).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, dir)| dir.clone()).collect()
    }

    /// The descriptors the child writes `0` to before exec (see [`join_self`]); valid as long as
    /// `self` lives.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The pids in the cgroup (never the agent itself or pid 0/1).
    pub fn pids(&self) -> Vec<i32> {
        let own = std::process::id() as i32;
        let mut pids = BTreeSet::new();
        for (_, dir) in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|pid| pid.parse::<i32>().ok())
                        .filter(|pid| *pid > 1 && *pid != own),
                );
            }
        }
        pids.into_iter().collect()
    }

    /// Sends `signal` to every process in the cgroup.
    pub fn signal_all(&self, signal: libc::c_int) {
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions; the pid was listed in the job's
            // cgroup, which only the job's processes can be in.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Whether the kernel OOM-killed a process of the cgroup. `main_sigkilled`: the main
    /// process died of SIGKILL (used when the kernel keeps no OOM-kill counter).
    pub fn oom_killed(&self, main_sigkilled: bool) -> bool {
        let Some((version, dir)) = &self.memory else {
            return false;
        };
        let counter = |file: &str| {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|text| keyed_value(&text, "oom_kill"))
        };
        match version {
            Version::V2 => counter("memory.events").is_some_and(|kills| kills > 0),
            Version::V1 => match counter("memory.oom_control") {
                Some(kills) => kills > 0,
                // Kernels before 4.13 count no kills: hitting the limit and dying of SIGKILL is
                // the next best sign.
                None => {
                    main_sigkilled
                        && std::fs::read_to_string(dir.join("memory.failcnt"))
                            .ok()
                            .and_then(|text| text.trim().parse::<u64>().ok())
                            .is_some_and(|count| count > 0)
                }
            },
        }
    }

    /// Kills every process left in the cgroup and removes it, retrying while the kernel still
    /// counts dying processes; warns and leaves it when that takes too long (the next agent
    /// start removes it).
    pub async fn remove(mut self) {
        let deadline = tokio::time::Instant::now() + REMOVE_WAIT;
        while !self.try_remove() {
            if tokio::time::Instant::now() >= deadline {
                self.warn_left();
                self.removed = true;
                return;
            }
            tokio::time::sleep(REMOVE_POLL).await;
        }
    }

    /// One round: kill what is inside, then try to remove every dir. True when all are gone.
    fn try_remove(&mut self) -> bool {
        self.procs.clear();
        for (version, dir) in &self.dirs {
            let kill_file = dir.join("cgroup.kill");
            if *version == Version::V2 && kill_file.exists() {
                let _ = write_control(&kill_file, "1");
            }
        }
        self.signal_all(libc::SIGKILL);
        let mut all_gone = true;
        for (_, dir) in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(_) => all_gone = false,
            }
        }
        self.removed = all_gone;
        all_gone
    }

    /// A single attempt at removal, for error paths where nothing ran in the cgroup.
    fn remove_now(&mut self) {
        if !self.try_remove() {
            self.warn_left();
        }
        self.removed = true;
    }

    fn warn_left(&self) {
        for (_, dir) in &self.dirs {
            if dir.exists() {
                tracing::warn!(cgroup = %dir.display(), "could not remove a job cgroup; the next agent start retries");
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if !self.removed {
            // Only reached when the attempt's future was dropped before it ended.
            self.remove_now();
        }
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` are open as `fds`.
///
/// Meant for `pre_exec`: it only calls `write(2)`, which is async-signal-safe, and allocates
/// nothing. Writing `0` to `cgroup.procs` means "the writing process" on v1 and v2.
pub fn join_self(fds: &[RawFd]) -> io::Result<()> {
    for fd in fds {
        // SAFETY: the buffer is a static byte string; `fd` is open for as long as the parent's
        // JobCgroup lives, which spans the fork.
        let written = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
        if written != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Creates `dir`, removing a leftover of the same name first.
fn make_fresh_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_dir(dir);
            std::fs::create_dir(dir)
        }
        other => other,
    }
    .map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("could not create the cgroup {}: {error}", dir.display()),
        )
    })
}

fn write_memory_limit(version: Version, dir: &Path, memory_mb: u64) -> io::Result<()> {
    let bytes = memory_mb.saturating_mul(1 << 20).to_string();
    match version {
        Version::V2 => {
            write_control(&dir.join("memory.max"), &bytes)?;
            // Missing without swap accounting (or swap): then there is nothing to limit.
            let _ = write_control(&dir.join("memory.swap.max"), "0");
        }
        Version::V1 => {
            write_control(&dir.join("memory.limit_in_bytes"), &bytes)?;
            // Memory plus swap equal to memory: no swap. Without swap accounting the file does
            // not exist; keep the job out of swap as far as the kernel allows instead.
            if write_control(&dir.join("memory.memsw.limit_in_bytes"), &bytes).is_err() {
                let _ = write_control(&dir.join("memory.swappiness"), "0");
            }
        }
    }
    Ok(())
}

fn write_cpu_limit(version: Version, dir: &Path, cpus: f64) -> io::Result<()> {
    let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(MIN_CPU_QUOTA_US);
    match version {
        Version::V2 => write_control(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}")),
        Version::V1 => {
            write_control(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write_control(&dir.join("cpu.cfs_quota_us"), &quota.to_string())
        }
    }
}

/// Writes one value to a control file (a single `write`, as the kernel expects).
fn write_control(path: &Path, value: &str) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(value.as_bytes())
}

fn real_write(path: &Path, value: &str) -> io::Result<()> {
    write_control(path, value)
}

/// The number after `key` in a `key value` per line file (`memory.events`, `memory.oom_control`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

/// One line of `/proc/self/mountinfo` that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The path inside the file system that is mounted (`/` unless a subtree is bind-mounted).
    root: String,
    mount_point: PathBuf,
    fs_type: String,
    super_options: Vec<String>,
}

/// The cgroup mounts in `/proc/self/mountinfo`.
fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            let fs_type = after.next()?.to_owned();
            let _source = after.next()?;
            let super_options = after
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned)
                .collect();
            if fs_type != "cgroup" && fs_type != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(fields.get(3)?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type,
                super_options,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && index + 3 < bytes.len()
            && let Ok(digits) = std::str::from_utf8(&bytes[index + 1..index + 4])
            && let Ok(value) = u8::from_str_radix(digits, 8)
        {
            out.push(value);
            index += 4;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (as `/proc/self/cgroup` shows it) under `mount`.
fn cgroup_dir(mount: &Mount, path: &str) -> PathBuf {
    let relative = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str()).unwrap_or(path)
    };
    mount.mount_point.join(relative.trim_start_matches('/'))
}

/// The agent's cgroup paths from `/proc/self/cgroup`: `(controllers, path)` per line; v2's line
/// has no controllers.
fn own_cgroups(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((
                controllers
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path.to_owned(),
            ))
        })
        .collect()
}

/// Type of the injectable control-file writer.
type Writer<'a> = &'a dyn Fn(&Path, &str) -> io::Result<()>;

/// The probe behind [`Cgroups::probe`], on given file contents; `write` writes control files and
/// `own_pid` is the agent's pid (moved into a leaf on v2 when needed).
fn probe_from(mountinfo: &str, own: &str, write: Writer<'_>, own_pid: u32) -> Cgroups {
    let mounts = cgroup_mounts(mountinfo);
    let own = own_cgroups(own);
    let mut cgroups = Cgroups::none();

    // cgroup v2 first: a controller can be bound to one hierarchy only, so what v2 offers is not
    // in v1.
    let v2_path = own
        .iter()
        .find(|(controllers, _)| controllers.is_empty())
        .map(|(_, path)| path.clone());
    let v2_mount = mounts.iter().find(|mount| mount.fs_type == "cgroup2");
    if let (Some(path), Some(mount)) = (v2_path, v2_mount) {
        let dir = cgroup_dir(mount, &path);
        let offered: BTreeSet<String> = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let wanted: Vec<Controller> = Controller::ALL
            .into_iter()
            .filter(|controller| offered.contains(controller.name()))
            .collect();
        if wanted.is_empty() {
            cgroups.notes.push(format!(
                "cgroup v2 ({}) offers none of memory, pids, cpu",
                dir.display()
            ));
        } else {
            match delegate_v2(&dir, &wanted, write, own_pid)
                .and_then(|enabled| check_writable(&dir, own_pid).map(|()| enabled))
            {
                Ok(enabled) => {
                    for controller in enabled {
                        *cgroups.place_mut(controller) = Some(Place {
                            version: Version::V2,
                            parent: dir.clone(),
                        });
                    }
                }
                Err(error) => cgroups
                    .notes
                    .push(format!("cgroup v2 ({}): {error}", dir.display())),
            }
        }
    }

    for controller in Controller::ALL {
        if cgroups.place(controller).is_some() {
            continue;
        }
        let mount = mounts.iter().find(|mount| {
            mount.fs_type == "cgroup"
                && mount
                    .super_options
                    .iter()
                    .any(|option| option == controller.name())
        });
        let path = own
            .iter()
            .find(|(controllers, _)| controllers.iter().any(|name| name == controller.name()));
        let (Some(mount), Some((_, path))) = (mount, path) else {
            cgroups.notes.push(format!(
                "no cgroup v1 {} hierarchy is mounted",
                controller.name()
            ));
            continue;
        };
        let dir = cgroup_dir(mount, path);
        match check_writable(&dir, own_pid) {
            Ok(()) => {
                *cgroups.place_mut(controller) = Some(Place {
                    version: Version::V1,
                    parent: dir,
                })
            }
            Err(error) => cgroups.notes.push(format!(
                "cgroup v1 {} ({}): {error}",
                controller.name(),
                dir.display()
            )),
        }
    }
    cgroups
}

/// Enables `wanted` for the children of the v2 cgroup `dir`; returns the controllers enabled.
/// When the kernel refuses because processes live in `dir` itself and the agent (`own_pid`) is
/// the only one, moves it into the leaf [`AGENT_LEAF`] and tries once more; other processes are
/// never moved (nor is the agent, then).
fn delegate_v2(
    dir: &Path,
    wanted: &[Controller],
    write: Writer<'_>,
    own_pid: u32,
) -> io::Result<Vec<Controller>> {
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = |controller: Controller| {
        std::fs::read_to_string(&subtree)
            .unwrap_or_default()
            .split_whitespace()
            .any(|name| name == controller.name())
    };
    let enable_all = || -> io::Result<()> {
        for controller in wanted {
            if !enabled(*controller) {
                write(&subtree, &format!("+{}", controller.name()))?;
            }
        }
        Ok(())
    };
    match enable_all() {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
            let others = || {
                std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|pid| pid != own_pid.to_string())
            };
            let shared = || {
                io::Error::other(
                    "other processes share the agent's cgroup, so it cannot delegate \
                     controllers to job cgroups (give the agent a cgroup of its own, e.g. \
                     Delegate=yes in its systemd unit)",
                )
            };
            if others() {
                return Err(shared());
            }
            let leaf = dir.join(AGENT_LEAF);
            match std::fs::create_dir(&leaf) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
            write(&leaf.join("cgroup.procs"), &own_pid.to_string())?;
            // A process may have been started in between.
            if others() {
                return Err(shared());
            }
            tracing::info!(leaf = %leaf.display(), "moved the agent into a leaf cgroup so job cgroups can get controllers");
            enable_all()?;
        }
        Err(error) => return Err(error),
    }
    Ok(wanted
        .iter()
        .copied()
        .filter(|controller| enabled(*controller))
        .collect())
}

/// Creates and removes a probe child in `dir`.
fn check_writable(dir: &Path, own_pid: u32) -> io::Result<()> {
    let probe = dir.join(format!("cronium-probe-{own_pid}"));
    let _ = std::fs::remove_dir(&probe);
    std::fs::create_dir(&probe)?;
    std::fs::remove_dir(&probe)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn spec(memory_mb: Option<u64>, cpus: Option<f64>, pids: Option<u32>) -> HostSpec {
        HostSpec {
            user: None,
            memory_mb,
            cpus,
            pids,
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    /// The "kernel" removes the control files of a cgroup dir; here the test does.
    fn empty_fake_dir(dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const CGROUP_V1: &str = "\
8:pids:/
4:memory:/process_api/cd6f
1:cpu,cpuacct:/
0::/
";

    #[test]
    fn mounts_and_own_cgroups_are_parsed() {
        let mounts = cgroup_mounts(MOUNTINFO_V1);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[0].mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(mounts[0].super_options, ["rw", "cpu", "cpuacct"]);
        assert_eq!(mounts[3].fs_type, "cgroup2");
        let own = own_cgroups(CGROUP_V1);
        assert_eq!(
            own[1],
            (vec!["memory".to_owned()], "/process_api/cd6f".to_owned())
        );
        assert_eq!(own[3], (Vec::<String>::new(), "/".to_owned()));
        assert_eq!(
            cgroup_dir(&mounts[1], "/process_api/cd6f"),
            Path::new("/sys/fs/cgroup/memory/process_api/cd6f")
        );
        let bound = Mount {
            root: "/system.slice/agent.service".into(),
            mount_point: "/sys/fs/cgroup".into(),
            fs_type: "cgroup2".into(),
            super_options: vec![],
        };
        assert_eq!(
            cgroup_dir(&bound, "/system.slice/agent.service/sub"),
            Path::new("/sys/fs/cgroup/sub")
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn the_probe_finds_writable_v1_hierarchies_and_skips_a_v2_without_controllers() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path();
        for dir in ["cpu/job", "memory/own", "pids", "unified"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        let mountinfo = format!(
            "32 31 0:29 / {root}/cpu rw - cgroup cgroup rw,cpu\n\
             35 31 0:32 / {root}/memory rw - cgroup cgroup rw,memory\n\
             41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw\n",
            root = root.display()
        );
        let own = "4:memory:/own\n1:cpu:/job\n8:pids:/\n0::/\n";
        let cgroups = probe_from(&mountinfo, own, &real_write, 42);
        assert_eq!(
            cgroups.memory,
            Some(Place {
                version: Version::V1,
                parent: root.join("memory/own")
            })
        );
        assert_eq!(
            cgroups.cpu,
            Some(Place {
                version: Version::V1,
                parent: root.join("cpu/job")
            })
        );
        assert_eq!(cgroups.pids, None, "no pids hierarchy is mounted");
        assert!(
            cgroups
                .notes
                .iter()
                .any(|note| note.contains("offers none")),
            "{:?}",
            cgroups.notes
        );
        assert!(!root.join("memory/own/cronium-probe-42").exists());
    }

    #[test]
    fn the_v2_probe_delegates_and_moves_the_agent_into_a_leaf_when_its_cgroup_is_busy() {
        let temp = tempfile::tempdir().unwrap();
        let own_dir = temp.path().join("unified/agent.service");
        std::fs::create_dir_all(&own_dir).unwrap();
        std::fs::write(
            own_dir.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(own_dir.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(own_dir.join("cgroup.procs"), "42\n").unwrap();
        let mountinfo = format!(
            "41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n",
            temp.path().join("unified").display()
        );
        // A fake kernel: enabling controllers fails while `cgroup.procs` of the dir is not empty;
        // writing a pid to a child's `cgroup.procs` moves it there.
        let writes = RefCell::new(Vec::new());
        let kernel = |path: &Path, value: &str| -> io::Result<()> {
            writes.borrow_mut().push((
                path.strip_prefix(&own_dir).unwrap().to_owned(),
                value.to_owned(),
            ));
            let name = path.file_name().unwrap().to_str().unwrap();
            match name {
                "cgroup.subtree_control" => {
                    if !read(&own_dir.join("cgroup.procs")).trim().is_empty() {
                        return Err(io::Error::from_raw_os_error(libc::EBUSY));
                    }
                    let mut enabled = read(path);
                    enabled.push_str(value.trim_start_matches('+'));
                    enabled.push(' ');
                    std::fs::write(path, enabled)
                }
                "cgroup.procs" => {
                    std::fs::write(own_dir.join("cgroup.procs"), "")?;
                    std::fs::write(path, value)
                }
                _ => std::fs::write(path, value),
            }
        };
        let cgroups = probe_from(&mountinfo, "0::/agent.service\n", &kernel, 42);
        let v2 = Some(Place {
            version: Version::V2,
            parent: own_dir.clone(),
        });
        assert_eq!(
            (&cgroups.memory, &cgroups.pids, &cgroups.cpu),
            (&v2, &v2, &v2)
        );
        assert_eq!(read(&own_dir.join("agent/cgroup.procs")), "42");
        assert_eq!(
            read(&own_dir.join("cgroup.subtree_control"))
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["memory", "pids", "cpu"]
        );
        assert_eq!(
            writes.borrow()[..2],
            [
                (
                    PathBuf::from("cgroup.subtree_control"),
                    "+memory".to_owned()
                ),
                (PathBuf::from("agent/cgroup.procs"), "42".to_owned()),
            ]
        );

        // Another process in the agent's cgroup: neither it nor the agent is moved, and nothing
        // is taken from v2.
        std::fs::write(own_dir.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(own_dir.join("cgroup.procs"), "42\n77\n").unwrap();
        let stranger_writes = RefCell::new(Vec::new());
        let stranger = |path: &Path, value: &str| -> io::Result<()> {
            stranger_writes.borrow_mut().push(path.to_owned());
            if path.ends_with("cgroup.subtree_control") {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            std::fs::write(path, value)
        };
        let cgroups = probe_from(&mountinfo, "0::/agent.service\n", &stranger, 42);
        assert_eq!(cgroups.memory, None);
        assert_eq!(
            *stranger_writes.borrow(),
            [own_dir.join("cgroup.subtree_control")],
            "nothing was moved"
        );
        assert!(
            cgroups
                .notes
                .iter()
                .any(|note| note.contains("other processes share")),
            "{:?}",
            cgroups.notes
        );
    }

    #[test]
    fn v1_limits_are_written_per_hierarchy() {
        let temp = tempfile::tempdir().unwrap();
        let place = |name: &str| {
            let parent = temp.path().join(name);
            std::fs::create_dir_all(&parent).unwrap();
            Some(Place {
                version: Version::V1,
                parent,
            })
        };
        let cgroups = Cgroups::new(place("memory"), place("pids"), place("cpu"));
        let (cgroup, missing) = cgroups
            .create("cronium-job-1", &spec(Some(32), Some(0.5), Some(20)))
            .unwrap();
        assert!(missing.is_empty());
        let cgroup = cgroup.unwrap();
        let memory = temp.path().join("memory/cronium-job-1");
        let pids = temp.path().join("pids/cronium-job-1");
        let cpu = temp.path().join("cpu/cronium-job-1");
        assert_eq!(read(&memory.join("memory.limit_in_bytes")), "33554432");
        assert_eq!(
            read(&memory.join("memory.memsw.limit_in_bytes")),
            "33554432"
        );
        assert_eq!(read(&pids.join("pids.max")), "20");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(cgroup.procs_fds().len(), 3);
        assert_eq!(cgroup.dirs(), [memory.clone(), pids.clone(), cpu.clone()]);

        // The counters the kernel would keep.
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .unwrap();
        assert!(!cgroup.oom_killed(true));
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(cgroup.oom_killed(false));

        for dir in [&memory, &pids, &cpu] {
            empty_fake_dir(dir);
        }
        futures_util::FutureExt::now_or_never(cgroup.remove())
            .expect("an empty cgroup is removed at once");
        for dir in [&memory, &pids, &cpu] {
            assert!(!dir.exists(), "{} is removed", dir.display());
        }
    }

    #[test]
    fn v2_limits_go_into_one_cgroup() {
        let temp = tempfile::tempdir().unwrap();
        let v2 = Some(Place {
            version: Version::V2,
            parent: temp.path().to_owned(),
        });
        let cgroups = Cgroups::new(v2.clone(), v2.clone(), v2);
        let (cgroup, missing) = cgroups
            .create("cronium-job-2", &spec(Some(64), Some(1.5), Some(100)))
            .unwrap();
        assert!(missing.is_empty());
        let cgroup = cgroup.unwrap();
        let dir = temp.path().join("cronium-job-2");
        assert_eq!(cgroup.dirs(), std::slice::from_ref(&dir));
        assert_eq!(cgroup.procs_fds().len(), 1);
        assert_eq!(read(&dir.join("memory.max")), "67108864");
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("pids.max")), "100");
        assert_eq!(read(&dir.join("cpu.max")), "150000 100000");
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert!(cgroup.oom_killed(false));
        empty_fake_dir(&dir);
        futures_util::FutureExt::now_or_never(cgroup.remove()).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn only_the_requested_limits_make_cgroups_and_missing_ones_are_named() {
        let temp = tempfile::tempdir().unwrap();
        let memory = Some(Place {
            version: Version::V1,
            parent: temp.path().to_owned(),
        });
        let cgroups = Cgroups::new(memory, None, None);
        let (cgroup, missing) = cgroups
            .create("cronium-job-3", &spec(None, None, None))
            .unwrap();
        assert!(cgroup.is_none() && missing.is_empty());
        assert!(!temp.path().join("cronium-job-3").exists());

        let (cgroup, missing) = cgroups
            .create("cronium-job-3", &spec(None, Some(1.0), Some(5)))
            .unwrap();
        assert!(
            cgroup.is_none(),
            "only memory is available, and not requested"
        );
        assert_eq!(missing, [Controller::Pids, Controller::Cpu]);
        assert_eq!(
            not_applied_message(&missing),
            "[cronium: pids and cpu limits not applied: this host offers no writable cgroup \
             pids/cpu controllers (cgroup v2 with delegation, or the cgroup v1 pids/cpu \
             hierarchy)]\n"
        );
        assert_eq!(
            not_applied_message(&[Controller::Memory]),
            "[cronium: memory limit not applied: this host offers no writable cgroup memory \
             controller (cgroup v2 with delegation, or the cgroup v1 memory hierarchy)]\n"
        );
        assert_eq!(not_applied_message(&[]), "");
    }

    #[test]
    fn join_self_writes_zero_to_each_descriptor() {
        let temp = tempfile::tempdir().unwrap();
        let files: Vec<File> = ["a", "b"]
            .iter()
            .map(|name| File::create(temp.path().join(name)).unwrap())
            .collect();
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        join_self(&fds).unwrap();
        assert_eq!(read(&temp.path().join("a")), "0");
        assert_eq!(read(&temp.path().join("b")), "0");
    }

    #[test]
    fn leftovers_are_removed_by_name() {
        let temp = tempfile::tempdir().unwrap();
        let place = Some(Place {
            version: Version::V1,
            parent: temp.path().to_owned(),
        });
        let cgroups = Cgroups::new(place, None, None);
        assert!(!cgroups.remove_leftover("cronium-job-9-1"));
        std::fs::create_dir(temp.path().join("cronium-job-9-1")).unwrap();
        assert!(cgroups.remove_leftover("cronium-job-9-1"));
        assert!(!temp.path().join("cronium-job-9-1").exists());
    }
}
