//! Host jobs with a `user` and cgroup limits, end to end: an event created through the API runs
//! on a real agent started with `--allow-run-as` (through `CRONIUM_AGENT_ALLOW_RUN_AS`).
//!
//! These tests switch users and write cgroups, so they need root (CI runs as root); they fail
//! with a message saying so otherwise. The limits are checked for real where the host has cgroup
//! v1 hierarchies or a delegatable cgroup v2 (as on CI); elsewhere the job log must name the
//! limits that were not applied.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cronium_e2e::cluster::json_str;
use cronium_e2e::{AgentOptions, EventSpec, TestCluster};
use serde_json::{Value, json};

/// How long a job may take from trigger to final status.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "this test runs jobs as user nobody and writes cgroups, so it needs root (CI runs as root); \
         it runs as uid {euid}"
    );
    Ok(())
}

/// Whether this host has a writable cgroup controller `name` for the agent: a v1 hierarchy, or
/// the controller offered to the agent's cgroup v2.
fn host_offers(name: &str) -> bool {
    if Path::new("/sys/fs/cgroup")
        .join(name)
        .join("cgroup.procs")
        .exists()
    {
        return true;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    own.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(|path| {
            std::fs::read_to_string(
                Path::new("/sys/fs/cgroup")
                    .join(path.trim_start_matches('/'))
                    .join("cgroup.controllers"),
            )
            .ok()
        })
        .is_some_and(|controllers| controllers.split_whitespace().any(|c| c == name))
}

/// Cgroup directories named after `job_id` anywhere under /sys/fs/cgroup (a few levels deep).
fn cgroups_of_job(job_id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, needle: &str, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            if entry.file_name().to_string_lossy().contains(needle) {
                found.push(path);
            } else if depth > 0 {
                walk(&path, depth - 1, needle, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        6,
        &format!("cronium-{job_id}-"),
        &mut found,
    );
    found
}

/// A cluster with one agent allowed to run jobs as `nobody`, its state dir reachable for that
/// user.
async fn cluster_with_agent(name: &str) -> Result<(TestCluster, String)> {
    require_root()?;
    let mut cluster = TestCluster::start().await?;
    // The cluster's temp dir is private (0700); the agent opens its own state dir (0711), the
    // directories above it are the operator's business: here the test's.
    std::fs::set_permissions(cluster.dir(), std::fs::Permissions::from_mode(0o711))
        .context("open the cluster dir to other users")?;
    let agent = cluster.enroll_agent(name, &[]).await?;
    cluster
        .start_agent(
            &agent,
            &AgentOptions {
                env: vec![("CRONIUM_AGENT_ALLOW_RUN_AS".into(), "nobody".into())],
                ..AgentOptions::default()
            },
        )
        .await?;
    Ok((cluster, agent.id))
}

/// Creates a host event from `spec` plus `fields` (user, limits) and runs it once; returns the
/// final job.
async fn run_host_job(cluster: &TestCluster, spec: &EventSpec, fields: Value) -> Result<Value> {
    let mut body = spec.to_json(cluster.marker());
    if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
        body.extend(fields.clone());
    }
    let event = cluster
        .api()
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, &format!("create event {}", spec.name))?;
    ensure!(event["runtime"] == "host", "{event}");
    let job_id = cluster
        .run_event(&json_str(&event, "id")?, None)
        .await?
        .single_job()?;
    cluster.wait_job_final(&job_id, JOB_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_job_runs_as_nobody_within_its_limits() -> Result<()> {
    let (cluster, agent) = cluster_with_agent("host-limits").await?;

    // As nobody, in a cgroup, with the work dir and the helper socket usable.
    let spec = EventSpec::bash(
        "as-nobody",
        "id -u; grep -c 'cronium-' /proc/self/cgroup; echo kept > file && cat file; \
         . ./cronium.sh && cronium_output '{\"as\": \"nobody\"}'",
    )
    .target(&agent);
    let job = run_host_job(
        &cluster,
        &spec,
        json!({"user": "nobody", "limits": {"memory_mb": 64, "pids": 50}}),
    )
    .await?;
    let job_id = json_str(&job, "id")?;
    ensure!(job["status"] == "completed", "unexpected result: {job}");
    let output = job["output"].as_str().unwrap_or_default();
    let mut lines = output.lines();
    ensure!(lines.next() == Some("65534"), "output: {output:?}");
    let in_cgroups: usize = lines.next().unwrap_or_default().parse().unwrap_or(0);
    if host_offers("memory") && host_offers("pids") {
        ensure!(
            in_cgroups >= 1,
            "the job ran outside its cgroup: {output:?}"
        );
        ensure!(
            !output.contains("not applied"),
            "the limits were applied: {output:?}"
        );
    } else {
        ensure!(output.contains("not applied"), "output: {output:?}");
    }
    ensure!(lines.next() == Some("kept"), "output: {output:?}");
    ensure!(job["result"] == json!({"as": "nobody"}), "result: {job}");
    ensure!(
        cgroups_of_job(&job_id).is_empty(),
        "the job's cgroup is removed: {:?}",
        cgroups_of_job(&job_id)
    );

    // A memory hog as nobody ends failed, reason oom.
    let hog = EventSpec::bash(
        "hog",
        "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'",
    )
    .target(&agent);
    let job = run_host_job(
        &cluster,
        &hog,
        json!({"user": "nobody", "limits": {"memory_mb": 32}}),
    )
    .await?;
    let output = job["output"].as_str().unwrap_or_default();
    if host_offers("memory") {
        ensure!(
            job["status"] == "failed" && job["reason"] == "oom",
            "the hog should fail with reason oom: {job}"
        );
        ensure!(
            output.contains("ran out of memory (limit 32 MiB)"),
            "{output:?}"
        );
        let job_id = json_str(&job, "id")?;
        ensure!(
            cgroups_of_job(&job_id).is_empty(),
            "{:?}",
            cgroups_of_job(&job_id)
        );
    } else {
        ensure!(output.contains("memory limit not applied"), "{output:?}");
    }

    // A user the agent does not allow: refused with the option's name.
    let refused = EventSpec::bash("as-daemon", "echo never").target(&agent);
    let job = run_host_job(&cluster, &refused, json!({"user": "daemon"})).await?;
    let output = job["output"].as_str().unwrap_or_default();
    ensure!(
        job["status"] == "failed" && job["reason"] == "spawn",
        "unexpected result: {job}"
    );
    ensure!(
        output.contains("user daemon is not allowed on this agent")
            && output.contains("--allow-run-as"),
        "{output:?}"
    );
    ensure!(!output.contains("never"), "{output:?}");
    Ok(())
}
