//! The measurements: job latency, throughput, durable commits (via strace) and the control
//! plane's memory per connected agent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, now_ns};
use crate::cluster::{enroll_in_process, wait_online};
use crate::procs::{ChildGuard, rss_kib};

/// Samples of the no-op job latency, in milliseconds.
#[derive(Default)]
pub struct LatencySamples {
    /// The `POST /events/{id}/runs` round trip.
    pub post: Vec<f64>,
    /// From just before the POST to the time the job's process printed.
    pub started: Vec<f64>,
    /// From just before the POST to the arrival of the SSE `end` event.
    pub result: Vec<f64>,
    /// From just before the POST to the arrival of the first SSE `log` event.
    pub first_log: Vec<f64>,
    /// From just before the POST to the job's `claimed_at`, `started_at` and `finished_at` as
    /// the control plane recorded them (millisecond resolution).
    pub claimed: Vec<f64>,
    /// See `claimed`.
    pub server_started: Vec<f64>,
    /// See `claimed`.
    pub finished: Vec<f64>,
}

/// A job timestamp (RFC 3339) as wall-clock ns.
pub(crate) fn timestamp_ns(value: &Value) -> Option<i128> {
    let text = value.as_str()?;
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(i128::from(time.timestamp_nanos_opt()?))
}

/// Fails unless the job in an SSE `end` event completed with exit code 0.
pub fn ensure_completed(job: &Value) -> anyhow::Result<()> {
    if job["status"] != "completed" || job["exit_code"] != 0 {
        bail!(
            "job {} ended with status {} and exit code {} (output {:?})",
            job["id"],
            job["status"],
            job["exit_code"],
            job["output"]
        );
    }
    Ok(())
}

/// Triggers `event_id` (whose script is `date +%s%N`) `warmup` + `runs` times, one at a time,
/// following each job's log to its end; keeps the samples of the last `runs`.
pub async fn latency(
    api: &Api,
    event_id: &str,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<LatencySamples> {
    let mut samples = LatencySamples::default();
    for index in 0..warmup + runs {
        let t0 = now_ns();
        let triggered = api.trigger(event_id).await?;
        let followed = api.follow(&triggered.job_id).await?;
        ensure_completed(&followed.job)?;
        let printed = if followed.log.trim().is_empty() {
            followed.job["output"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        } else {
            followed.log
        };
        let started_ns: i128 = printed
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .parse()
            .with_context(|| format!("the job printed {printed:?}, not a timestamp"))?;
        if index < warmup {
            continue;
        }
        let ms = |ns: i128| ns as f64 / 1e6;
        samples.post.push(ms(triggered.answered_ns - t0));
        samples.started.push(ms(started_ns - t0));
        samples.result.push(ms(followed.end_ns - t0));
        if let Some(first_log_ns) = followed.first_log_ns {
            samples.first_log.push(ms(first_log_ns - t0));
        }
        for (field, into) in [
            ("claimed_at", &mut samples.claimed),
            ("started_at", &mut samples.server_started),
            ("finished_at", &mut samples.finished),
        ] {
            if let Some(at) = timestamp_ns(&followed.job[field]) {
                into.push(ms(at - t0));
            }
        }
    }
    Ok(samples)
}

/// The outcome of a throughput phase.
pub struct Throughput {
    /// Jobs that completed.
    pub jobs: usize,
    /// Wall time of the phase.
    pub elapsed: Duration,
}

impl Throughput {
    /// Completed jobs per second.
    pub fn per_second(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `jobs` runs of `event_id` from `clients` concurrent tasks, each looping trigger → follow
/// to the end. Fails if any job fails or the phase exceeds `timeout`.
pub async fn throughput(
    api: &Api,
    event_id: &str,
    jobs: usize,
    clients: usize,
    timeout: Duration,
) -> anyhow::Result<Throughput> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let api = api.clone();
        let event_id = event_id.to_owned();
        let next = next.clone();
        tasks.spawn(async move {
            let mut done = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let triggered = api.trigger(&event_id).await?;
                let followed = api.follow(&triggered.job_id).await?;
                ensure_completed(&followed.job)?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let collect = async {
        let mut total = 0;
        while let Some(result) = tasks.join_next().await {
            total += result.context("a client task panicked")??;
        }
        anyhow::Ok(total)
    };
    let total = tokio::time::timeout(timeout, collect)
        .await
        .with_context(|| format!("the throughput phase took longer than {timeout:?}"))??;
    Ok(Throughput {
        jobs: total,
        elapsed: started.elapsed(),
    })
}

/// strace attached to a process, counting fsync/fdatasync calls.
pub struct Strace {
    process: ChildGuard,
    output: PathBuf,
}

/// Counted durable-commit system calls.
#[derive(Debug, Clone, Copy)]
pub struct SyncCounts {
    /// `fsync` calls.
    pub fsync: u64,
    /// `fdatasync` calls.
    pub fdatasync: u64,
}

impl Strace {
    /// Attaches `strace -f -e trace=fsync,fdatasync -o output -p pid` and waits until it reports
    /// the attachment.
    pub async fn attach(strace: &Path, pid: u32, output: &Path) -> anyhow::Result<Strace> {
        let (sender, mut lines) = mpsc::unbounded_channel();
        let mut command = Command::new(strace);
        command
            .args(["-f", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(output)
            .args(["-p", &pid.to_string()]);
        let mut process = ChildGuard::spawn("strace", &mut command, Some(sender))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, lines.recv()).await {
                Ok(Some(line)) if line.contains("attached") => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    process.ensure_running()?;
                    bail!(
                        "strace did not report attaching within 10 s:\n{}",
                        process.tail()
                    );
                }
            }
        }
        // Threads are attached one after another; give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        process.ensure_running()?;
        Ok(Strace {
            process,
            output: output.to_owned(),
        })
    }

    /// Detaches (SIGINT) and counts the calls it saw.
    pub async fn finish(mut self) -> anyhow::Result<SyncCounts> {
        self.process.signal(libc::SIGINT);
        if !self.process.wait_exit(Duration::from_secs(15)).await {
            bail!("strace did not detach within 15 s");
        }
        let text = std::fs::read_to_string(&self.output)
            .with_context(|| format!("cannot read {}", self.output.display()))?;
        Ok(count_syncs(&text))
    }
}

/// Counts the calls in strace output (an interrupted call's `<... resumed>` line is not counted
/// again).
fn count_syncs(text: &str) -> SyncCounts {
    let mut counts = SyncCounts {
        fsync: 0,
        fdatasync: 0,
    };
    for line in text.lines() {
        if line.contains("fdatasync(") {
            counts.fdatasync += 1;
        } else if line.contains("fsync(") {
            counts.fsync += 1;
        }
    }
    counts
}

/// The control plane's memory before and after agents connected.
pub struct MemoryPerAgent {
    /// How many agents connected.
    pub agents: usize,
    /// Before enrolling them, KiB.
    pub rss_before_kib: u64,
    /// After enrolling them, before they connected, KiB.
    pub rss_enrolled_kib: u64,
    /// With all of them connected and idle, KiB.
    pub rss_connected_kib: u64,
    /// How long it took until `GET /agents` showed them all online.
    pub online_after: Duration,
    /// Agents whose `run` returned an error when stopped.
    pub agent_errors: usize,
}

impl MemoryPerAgent {
    /// (connected − before) / agents, KiB.
    pub fn per_agent_kib(&self) -> f64 {
        (self.rss_connected_kib as f64 - self.rss_before_kib as f64) / self.agents as f64
    }

    /// (connected − enrolled) / agents, KiB: the connections alone.
    pub fn per_connection_kib(&self) -> f64 {
        (self.rss_connected_kib as f64 - self.rss_enrolled_kib as f64) / self.agents as f64
    }
}

/// Enrolls `count` agents and runs them in this process (capacity 1 each), measuring the
/// control plane's RSS before, after enrollment and with all of them connected; then stops them.
pub async fn memory_per_agent(
    api: &Api,
    control_plane_pid: u32,
    root: &Path,
    count: usize,
    settle: Duration,
) -> anyhow::Result<MemoryPerAgent> {
    let rss_before_kib = rss_kib(control_plane_pid)?;
    let identities = enroll_in_process(api, root, "bench-mem-", count, &Default::default()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_enrolled_kib = rss_kib(control_plane_pid)?;

    let all = CancellationToken::new();
    // Stops every agent if this function returns early (error) or is dropped.
    let _stop_all = all.clone().drop_guard();
    let mut tasks = JoinSet::new();
    let mut names = Vec::with_capacity(count);
    for (state_dir, name) in identities {
        names.push(name);
        let shutdown = all.child_token();
        let options = cronium_agent::AgentOptions {
            state_dir,
            capacity: 1,
            max_log_bytes: 1024 * 1024,
            reconnect_max: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
            force_stop: CancellationToken::new(),
            allow_run_as: Vec::new(),
        };
        tasks.spawn(cronium_agent::run(options, shutdown));
    }
    let online_timeout = Duration::from_secs(60) + Duration::from_millis(100) * count as u32;
    let online_after = wait_online(api, &names, online_timeout).await?;
    tokio::time::sleep(settle).await;
    let rss_connected_kib = rss_kib(control_plane_pid)?;

    all.cancel();
    let mut agent_errors = 0;
    let joined = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    agent_errors += 1;
                    eprintln!("an in-process agent stopped with an error: {error:#}");
                }
                Err(error) => {
                    agent_errors += 1;
                    eprintln!("an in-process agent task failed: {error}");
                }
            }
        }
    })
    .await;
    if joined.is_err() {
        eprintln!("some in-process agents did not stop within 30 s; aborting them");
        tasks.abort_all();
    }
    Ok(MemoryPerAgent {
        agents: count,
        rss_before_kib,
        rss_enrolled_kib,
        rss_connected_kib,
        online_after,
        agent_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sync_calls_once() {
        let text = "12  fsync(5)  = 0\n13  fdatasync(7 <unfinished ...>\n12  fsync(5) = 0\n13  <... fdatasync resumed>) = 0\n";
        let counts = count_syncs(text);
        assert_eq!(counts.fsync, 2);
        assert_eq!(counts.fdatasync, 1);
    }
}
