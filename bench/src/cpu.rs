//! CPU time of processes, read from `/proc` (Linux): what a round cost each side, so that a
//! comparison of throughput on one shared machine can also be read as cost per job.

use std::time::Duration;

/// CPU time (user + system) of the processes that did a round's work.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// The PostgreSQL server: the postmaster and every backend and helper process.
    pub database: Duration,
    /// `cronium serve` (zero on the raw side).
    pub control_plane: Duration,
    /// This process: the raw side's connections, or the in-process agents (and the clients'
    /// and the progress reads' share, small next to them).
    pub bench: Duration,
}

impl CpuUse {
    /// The CPU time used since `earlier`, a reading of the same processes.
    pub fn since(&self, earlier: &CpuUse) -> CpuUse {
        CpuUse {
            database: self.database.saturating_sub(earlier.database),
            control_plane: self.control_plane.saturating_sub(earlier.control_plane),
            bench: self.bench.saturating_sub(earlier.bench),
        }
    }

    /// Reads the current totals: the server whose postmaster is `database`, the control plane
    /// `control_plane` (if any), and this process.
    pub fn read(database: u32, control_plane: Option<u32>) -> anyhow::Result<CpuUse> {
        Ok(CpuUse {
            database: tree_time(database)?,
            control_plane: match control_plane {
                Some(pid) => process_time(pid, true)?,
                None => Duration::ZERO,
            },
            bench: process_time(std::process::id(), true)?,
        })
    }
}

/// The fields of `/proc/{pid}/stat` after the command name (which is in parentheses and may
/// itself contain spaces and parentheses): field 3 (the state) is index 0.
pub(crate) fn stat_fields(pid: u32) -> std::io::Result<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&stat).ok_or_else(|| std::io::Error::other(format!("unreadable /proc/{pid}/stat")))
}

/// [`stat_fields`] of a stat line; `None` without the name's closing parenthesis.
fn parse_stat(stat: &str) -> Option<Vec<u64>> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // The state is a letter; it is kept as 0 so that indexes stay those of the fields.
    Some(
        after_name
            .split_whitespace()
            .map(|field| field.parse().unwrap_or(0))
            .collect(),
    )
}

/// The names of `dir`'s entries that are numbers: the processes in `/proc`, the threads in
/// `/proc/<pid>/task`.
pub(crate) fn numbered_entries(dir: &str) -> anyhow::Result<Vec<u32>> {
    let mut numbers = Vec::new();
    // An entry that cannot be read (a process ending during the listing) is skipped.
    for entry in std::fs::read_dir(dir)
        .map_err(|error| anyhow::anyhow!("reading {dir}: {error}"))?
        .flatten()
    {
        if let Some(number) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            numbers.push(number);
        }
    }
    Ok(numbers)
}

/// Index (in [`stat_fields`]) of the parent's pid, then of utime, stime, cutime and cstime.
pub(crate) const PPID: usize = 1;
const UTIME: usize = 11;

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn ticks(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / ticks_per_second())
}

/// CPU time of `pid`, with that of the children it waited for when `reaped`.
fn process_time(pid: u32, reaped: bool) -> anyhow::Result<Duration> {
    let fields =
        stat_fields(pid).map_err(|error| anyhow::anyhow!("reading process {pid}: {error}"))?;
    time_in(&fields, reaped).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))
}

/// [`process_time`] from the process's [`stat_fields`]; `None` if they are too few.
fn time_in(fields: &[u64], reaped: bool) -> Option<Duration> {
    let counted = if reaped { 4 } else { 2 };
    Some(ticks(fields.get(UTIME..UTIME + counted)?.iter().sum()))
}

/// CPU time of `pid`, of the children it waited for, and of its live children: a server that
/// forks a process per connection, whose ended processes' time moves to the parent's.
fn tree_time(pid: u32) -> anyhow::Result<Duration> {
    let mut total = process_time(pid, true)?;
    for child in numbered_entries("/proc")? {
        // A process may end between the listing and the read: it is then counted in its
        // parent's reaped time instead.
        if let Ok(fields) = stat_fields(child)
            && fields.get(PPID) == Some(&u64::from(pid))
            && let Some(used) = time_in(&fields, false)
        {
            total += used;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_pid_is_read_past_a_name_with_spaces_and_parentheses() {
        let parent = |stat: &str| parse_stat(stat).map(|fields| fields[PPID]);
        assert_eq!(parent("42 (postgres) S 7 42 42 0"), Some(7));
        assert_eq!(parent("43 (a (b) c) R 1 43 43 0"), Some(1));
        assert_eq!(parent("garbage"), None);
    }

    /// The tree's time less the process's own (its children it waited for included). Each is
    /// counted in ticks and read at its own moment, so two readings may differ by a tick or two
    /// beyond the children's time: the checks below want at least half of a child's time.
    fn children_time() -> Duration {
        let pid = std::process::id();
        let own = process_time(pid, false).unwrap();
        tree_time(pid).unwrap().saturating_sub(own)
    }

    #[test]
    fn live_and_ended_children_are_counted_in_their_parents_tree() {
        let busy = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done";
        let before = children_time();
        let mut live = std::process::Command::new("sh")
            .args(["-c", &format!("{busy}; exec sleep 30")])
            .spawn()
            .unwrap();
        let mut child_time = Duration::ZERO;
        for _ in 0..600 {
            child_time = process_time(live.id(), false).unwrap_or_default();
            let sleeping = std::fs::read_to_string(format!("/proc/{}/cmdline", live.id()))
                .is_ok_and(|cmdline| cmdline.starts_with("sleep"));
            if sleeping {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let with_live = children_time();
        live.kill().unwrap();
        live.wait().unwrap();
        assert!(
            child_time >= Duration::from_millis(100),
            "the busy child used {child_time:?}: too little to tell"
        );
        assert!(
            with_live.saturating_sub(before) >= child_time / 2,
            "a live child's {child_time:?} was not counted: {before:?} then {with_live:?}"
        );

        let mut ended = std::process::Command::new("sh")
            .args(["-c", busy])
            .spawn()
            .unwrap();
        ended.wait().unwrap();
        let with_ended = children_time();
        assert!(
            with_ended.saturating_sub(with_live) >= child_time / 2,
            "an ended child's time was not counted: {with_live:?} then {with_ended:?}"
        );
    }
}
