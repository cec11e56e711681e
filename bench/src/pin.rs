//! CPU affinity for the PostgreSQL phase's `--pg-split-cores`: the database server on one set of
//! cores, the control plane and this process (the raw side's connections, or the agents and API
//! clients) on the others, so both sides of the comparison get the same database server, one
//! that shares its cores with nothing the benchmark runs.
//!
//! Affinity is set per thread (`sched_setaffinity` on each id under `/proc/<pid>/task`);
//! threads and processes started afterwards inherit their creator's, so PostgreSQL's new
//! backends (forked by the postmaster) and this process's new threads stay on their side.

use std::collections::BTreeSet;

use anyhow::{Context, bail, ensure};

use crate::cpu::{PPID, numbered_entries, stat_fields};

/// The cores this process may run on now, ascending.
pub fn allowed_cores() -> anyhow::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let result = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if result != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `core` is below CPU_SETSIZE.
        .filter(|&core| unsafe { libc::CPU_ISSET(core, &set) })
        .collect())
}

/// Splits `cores` in two non-empty halves: the first (the smaller when odd) for the database.
pub fn split(cores: &[usize]) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
    ensure!(
        cores.len() >= 2,
        "--pg-split-cores needs at least 2 cores, this process may use {}",
        cores.len()
    );
    let (database, rest) = cores.split_at(cores.len() / 2);
    Ok((database.to_vec(), rest.to_vec()))
}

/// Binds every thread of process `pid` to `cores`.
pub fn bind_process(pid: u32, cores: &[usize]) -> anyhow::Result<()> {
    let mut bound = 0;
    for tid in numbered_entries(&format!("/proc/{pid}/task"))? {
        match bind_thread(tid as i32, cores) {
            Ok(()) => bound += 1,
            // A thread that ended since the listing.
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {}
            Err(error) => return Err(error).with_context(|| format!("binding thread {tid}")),
        }
    }
    if bound == 0 {
        bail!("process {pid} has no thread left to bind");
    }
    Ok(())
}

/// Binds `root` and every process below it (by parent pid, read from `/proc`) to `cores`.
pub fn bind_tree(root: u32, cores: &[usize]) -> anyhow::Result<()> {
    let mut tree = BTreeSet::from([root]);
    // Parents come before children only by chance of pid order, so repeat until nothing joins.
    let parents = parent_pids()?;
    loop {
        let before = tree.len();
        for &(pid, parent) in &parents {
            if tree.contains(&parent) {
                tree.insert(pid);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    for pid in tree {
        bind_process(pid, cores)?;
    }
    Ok(())
}

/// Every (pid, parent pid) in `/proc`.
fn parent_pids() -> anyhow::Result<Vec<(u32, u32)>> {
    let mut pairs = Vec::new();
    for pid in numbered_entries("/proc")? {
        // A process that ended since the listing has no stat.
        if let Ok(fields) = stat_fields(pid)
            && let Some(&parent) = fields.get(PPID)
        {
            pairs.push((pid, parent as u32));
        }
    }
    Ok(pairs)
}

fn bind_thread(tid: i32, cores: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &core in cores {
        // SAFETY: the cores come from sched_getaffinity, below CPU_SETSIZE.
        unsafe { libc::CPU_SET(core, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let result = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_split_in_two_non_empty_halves() {
        assert_eq!(split(&[0, 1]).unwrap(), (vec![0], vec![1]));
        assert_eq!(split(&[0, 1, 2]).unwrap(), (vec![0], vec![1, 2]));
        assert_eq!(split(&[2, 3, 4, 5]).unwrap(), (vec![2, 3], vec![4, 5]));
        assert!(split(&[0]).is_err());
    }

    /// The `Cpus_allowed_list` of process `pid`.
    fn allowed_list(pid: u32) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with("Cpus_allowed_list:"))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().to_owned()
    }

    #[test]
    fn a_tree_is_bound_down_to_its_grandchildren() {
        let cores = allowed_cores().unwrap();
        let last = *cores.last().unwrap();
        // A shell (child) waiting for a sleep (grandchild).
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(shell.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        bind_tree(shell.id(), &[last]).unwrap();
        let (child_list, grandchild_list) = (allowed_list(shell.id()), allowed_list(grandchild));
        // SAFETY: kill has no memory preconditions; the pids are this test's processes.
        unsafe {
            libc::kill(grandchild as i32, libc::SIGKILL);
        }
        shell.wait().unwrap();
        assert_eq!(child_list, last.to_string());
        assert_eq!(grandchild_list, last.to_string());
    }

    #[test]
    fn a_thread_bound_to_one_core_runs_only_there() {
        let cores = allowed_cores().unwrap();
        let last = *cores.last().unwrap();
        let seen = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            bind_thread(tid, &[last]).unwrap();
            allowed_cores().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![last]);
    }
}
