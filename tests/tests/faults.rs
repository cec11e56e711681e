//! The fault scenarios of `../shared/design/TESTING.md` that the other suites do not cover, with
//! real processes: (the agent killed mid-job, stopped gracefully and the control plane killed
//! mid-job are in `foundation.rs`, a Docker agent killed mid-job in `docker.rs`, a partition
//! shorter than the lease in `netns.rs`, PostgreSQL restarted under load and PostgreSQL's disk
//! full in `pg_faults.rs`).
//!
//! - A partition longer than the lease: the agent is marked offline, the job is settled (failed,
//!   reason `lost`), and the result the agent still has when the link heals is refused and
//!   audited (`GET /jobs/{id}/audit`); the job and its log stay as the lease settled them.
//! - A terminal session cut off by a partition: the viewer is told (`detached`,
//!   `agent_disconnected`) and no shell is left in the agent's namespace after the idle timeout.
//! - A full disk under the agent's spool: the job fails at once (reason `spawn`, the log says
//!   why), not when its lease runs out; once space is freed the next job runs.
//! - A full disk under the control plane's data dir: writes answer 507 with a message, nothing
//!   partial is stored, the control plane stays up, and once space is freed the next job runs.
//! - The control plane SIGKILLed during a burst of concurrent run creation (SQLite): after a
//!   restart every run that got a 201 exists with its input and job; nothing else appeared but
//!   requests that never got an answer.
//!
//! The namespace tests need root, `ip` and `nft` (like `netns.rs`); the disk tests need root to
//! mount a tmpfs. Every namespace, mount and process has a guard that removes it also when the
//! test fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cronium_agent::spool;
use cronium_e2e::cluster::json_str;
use cronium_e2e::lab::{
    agent_status, control_plane_in, install_agent, installer_script, processes_in_agent_namespace,
};
use cronium_e2e::mount::TmpfsMount;
use cronium_e2e::netns::NetLab;
use cronium_e2e::terminal_client::Terminal;
use cronium_e2e::{AgentOptions, ClusterOptions, EventSpec, TestCluster};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Bound of every wait for something that should happen.
const DEADLINE: Duration = Duration::from_secs(60);

/// The audit trail of a job (`GET /api/v1/jobs/{id}/audit`).
async fn job_audit(cluster: &TestCluster, job_id: &str) -> Result<Vec<Value>> {
    let trail = cluster
        .api()
        .get_ok(&format!("/api/v1/jobs/{job_id}/audit"))
        .await?;
    trail
        .as_array()
        .cloned()
        .with_context(|| format!("the audit trail is not a list: {trail}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_longer_than_the_lease_settles_the_job_and_refuses_and_audits_the_late_result()
-> Result<()> {
    let lab = NetLab::create(1).await?;
    // One-second heartbeats: both sides notice the silence after about three seconds; the lease
    // runs out after four.
    let options = ClusterOptions {
        lease_seconds: Some(4),
        heartbeat_seconds: Some(1),
    };
    let (cluster, _forwarder) = control_plane_in(&lab, options, &[]).await?;
    let script = installer_script(&cluster).await?;
    let mut agent = install_agent(&cluster, &lab, 0, &script, "cut-off").await?;

    // A job that runs until the test creates the release file, then prints its last line.
    let release = cluster.dir().join("release");
    let late_line = cronium_e2e::unique_marker("late-result");
    let body = format!(
        "echo started\n\
         while [ ! -e '{release}' ]; do sleep 0.1; done\n\
         echo {late_line}\n",
        release = release.display(),
    );
    let job = cluster
        .run_single_job(
            &EventSpec::bash("outlives-its-lease", &body)
                .target(&agent.id)
                .timeout_seconds(300),
        )
        .await?;
    cluster
        .wait_until(DEADLINE, "the job's first line", || async {
            let log = cluster.job_logs(&job).await?;
            Ok(String::from_utf8_lossy(&log)
                .contains("started\n")
                .then_some(()))
        })
        .await?;

    lab.partition(0).await?;
    cluster
        .wait_until(DEADLINE, "the agent marked offline", || async {
            Ok((agent_status(&cluster, &agent.id).await? == "offline").then_some(()))
        })
        .await?;
    let settled = cluster.wait_job_final(&job, DEADLINE).await?;
    ensure!(
        settled["status"] == "failed" && settled["reason"] == "lost" && settled["attempt"] == 1,
        "the lease did not settle the job as lost: {settled}"
    );
    let settled_log = cluster.job_logs(&job).await?;

    // The job finishes on the cut-off agent: its result waits in the agent's spool.
    std::fs::write(&release, b"")?;
    let spool_dir = agent.state_dir().join("spool").join(format!("{job}-1"));
    cluster
        .wait_until(DEADLINE, "the result in the agent's spool", || async {
            Ok(spool::stored_result(&spool_dir).ok().flatten().map(|_| ()))
        })
        .await?;
    ensure!(
        cluster.job(&job).await?["status"] == "failed",
        "the result reached the control plane through the partition"
    );

    lab.heal(0).await?;
    cluster.wait_agent_online(&agent.id, DEADLINE).await?;
    // Refused: the agent drops the attempt (its spool goes) and the refusal is in the job's
    // audit trail, next to the lease that ran out.
    let trail = cluster
        .wait_until(DEADLINE, "the refusal in the job's audit trail", || async {
            let trail = job_audit(&cluster, &job).await?;
            Ok(trail
                .iter()
                .any(|entry| {
                    ["stale_attempt", "stale_result"]
                        .contains(&entry["kind"].as_str().unwrap_or(""))
                        && entry["actor"] == agent.id.as_str()
                        && entry["detail"]["attempt"] == 1
                })
                .then_some(trail))
        })
        .await?;
    ensure!(
        trail.iter().any(|entry| entry["kind"] == "lease_expired"
            && entry["detail"]["attempt"] == 1
            && entry["detail"]["requeued"] == false),
        "no lease_expired entry in the audit trail: {trail:?}"
    );
    cluster
        .wait_until(
            DEADLINE,
            "the agent to drop the refused attempt",
            || async { Ok((!spool_dir.exists()).then_some(())) },
        )
        .await?;

    // Nothing of the late result was recorded.
    let after = cluster.job(&job).await?;
    ensure!(
        after["status"] == "failed"
            && after["reason"] == "lost"
            && after["attempt"] == 1
            && after["exit_code"].is_null(),
        "the late result changed the job: {after}"
    );
    let log = cluster.job_logs(&job).await?;
    ensure!(
        log == settled_log && !String::from_utf8_lossy(&log).contains(&late_line),
        "the late result's output reached the job's log: {:?}",
        String::from_utf8_lossy(&log)
    );
    ensure!(
        agent.process.try_wait()?.is_none(),
        "the agent process exited"
    );
    // The agent is healthy: the next job runs there.
    let next = cluster
        .run_single_job(&EventSpec::bash("after-the-partition", "echo next").target(&agent.id))
        .await?;
    let finished = cluster.wait_job_final(&next, DEADLINE).await?;
    ensure!(finished["status"] == "completed", "next job: {finished}");
    Ok(())
}

/// Reads the shell's pid from a terminal: `echo` of `$$` followed by a computed marker, so the
/// echoed command line (which shows `$$` and the arithmetic) cannot match. The marker ends in
/// a `.`, which no pid contains: `-42` alone also matched the start of a pid such as 4217 when
/// the output arrived split after it.
async fn shell_pid(terminal: &mut Terminal) -> Result<u32> {
    const END: &str = "-42.";
    terminal.send(b"echo \"shell-$$-$((6*7)).\"\r").await?;
    let output = terminal.read_until(END).await?;
    let end = output
        .rfind(END)
        .with_context(|| format!("no marker in {output:?}"))?;
    let start = output[..end]
        .rfind("shell-")
        .with_context(|| format!("no shell pid in {output:?}"))?;
    output[start + "shell-".len()..end]
        .parse()
        .with_context(|| format!("no shell pid in {output:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_cut_off_by_a_partition_tells_the_viewer_and_leaves_no_shell() -> Result<()> {
    let lab = NetLab::create(1).await?;
    let options = ClusterOptions {
        lease_seconds: None,
        heartbeat_seconds: Some(1),
    };
    // A detached session ends after two seconds without a viewer.
    let (cluster, _forwarder) =
        control_plane_in(&lab, options, &["--terminal-idle-timeout", "2s"]).await?;
    let script = installer_script(&cluster).await?;
    let mut agent = install_agent(&cluster, &lab, 0, &script, "terminal-cut-off").await?;
    let agent_pid = agent.process.pid();

    let mut terminal = Terminal::open(&cluster, &agent.id).await?;
    let shell = shell_pid(&mut terminal).await?;
    let inside = processes_in_agent_namespace(&lab, 0)?;
    ensure!(
        inside.contains(&shell) && inside.contains(&agent_pid),
        "the shell {shell} and the agent {agent_pid} are not both in the agent's namespace: \
         {inside:?}"
    );

    lab.partition(0).await?;
    // The viewer is told, then the WebSocket closes.
    let deadline = Instant::now() + DEADLINE;
    let told = loop {
        match terminal.next_message(deadline).await? {
            Some(Message::Text(text)) => {
                break serde_json::from_str::<Value>(text.as_str())
                    .with_context(|| format!("control message {text:?}"))?;
            }
            Some(Message::Close(frame)) => bail!("closed without a message: {frame:?}"),
            Some(_) => {}
            None => bail!("the WebSocket closed without a message"),
        }
    };
    ensure!(
        told == json!({"type": "detached", "reason": "agent_disconnected"}),
        "the viewer was told {told}"
    );

    // On the agent's side the session lost its viewer: after the idle timeout its shell is
    // hung up and killed, and nothing but the agent is left in the namespace.
    cluster
        .wait_until(DEADLINE, "only the agent left in its namespace", || async {
            let inside = processes_in_agent_namespace(&lab, 0)?;
            Ok((inside == [agent_pid]).then_some(()))
        })
        .await?;
    ensure!(
        !std::path::Path::new(&format!("/proc/{shell}")).exists(),
        "the shell {shell} is still running"
    );

    // After the link heals the agent reconnects and the session is known to be over.
    lab.heal(0).await?;
    cluster.wait_agent_online(&agent.id, DEADLINE).await?;
    let session = terminal.session().to_owned();
    cluster
        .wait_until(DEADLINE, "the session closed in the API", || async {
            let sessions = cluster.api().get_ok("/api/v1/terminal-sessions").await?;
            let found = sessions
                .as_array()
                .into_iter()
                .flatten()
                .find(|listed| listed["id"] == session.as_str())
                .cloned()
                .with_context(|| format!("session {session} not listed: {sessions}"))?;
            Ok((!found["closed_at"].is_null()).then_some(()))
        })
        .await?;
    ensure!(
        agent.process.try_wait()?.is_none(),
        "the agent process exited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_fails_the_job_at_once_and_the_next_job_runs() -> Result<()> {
    // A lease far longer than any wait here: a job settled by its lease would time the test out.
    let mut cluster = TestCluster::start_with(ClusterOptions {
        lease_seconds: Some(600),
        heartbeat_seconds: None,
    })
    .await?;
    let agent = cluster.enroll_agent("full-spool", &[]).await?;
    let spool = agent.state_dir.join("spool");
    std::fs::create_dir_all(&spool)?;
    let mount = TmpfsMount::mount(&spool, 1024 * 1024)?;
    cluster
        .start_agent(&agent, &AgentOptions::default())
        .await?;
    let filled = mount.fill()?;
    ensure!(filled > 0, "nothing could be written to the spool's tmpfs");

    let marker = cronium_e2e::unique_marker("never-printed");
    let job = cluster
        .run_single_job(&EventSpec::bash("no-room", &format!("echo {marker}")).target(&agent.id))
        .await?;
    let failed = cluster.wait_job_final(&job, DEADLINE).await?;
    ensure!(
        failed["status"] == "failed" && failed["reason"] == "spawn" && failed["attempt"] == 1,
        "job on a full spool: {failed}"
    );
    let log = String::from_utf8_lossy(&cluster.job_logs(&job).await?).into_owned();
    ensure!(
        log.contains("the job was not started")
            && log.contains("No space left on device")
            && !log.contains(&marker),
        "the log does not say why: {log:?}"
    );
    ensure!(
        cluster.agent_exit_status(&agent.id)?.is_none(),
        "the agent exited"
    );

    mount.free()?;
    let job = cluster
        .run_single_job(&EventSpec::bash("room-again", &format!("echo {marker}")).target(&agent.id))
        .await?;
    let finished = cluster.wait_job_final(&job, DEADLINE).await?;
    ensure!(
        finished["status"] == "completed"
            && finished["output"]
                .as_str()
                .is_some_and(|output| output.contains(&marker)),
        "the job after freeing space: {finished}"
    );
    drop(cluster);
    drop(mount);
    Ok(())
}

/// Moves the stopped control plane's data dir onto a tmpfs of `size_bytes` mounted in its place.
fn data_dir_onto_tmpfs(cluster: &TestCluster, size_bytes: u64) -> Result<TmpfsMount> {
    let data = cluster.data_dir();
    let aside = cluster.dir().join("data-before-tmpfs");
    std::fs::rename(&data, &aside)?;
    std::fs::create_dir(&data)?;
    let mount = TmpfsMount::mount(&data, size_bytes)?;
    let output = std::process::Command::new("cp")
        .arg("-a")
        .arg(aside.join("."))
        .arg(&data)
        .output()
        .context("run cp")?;
    ensure!(
        output.status.success(),
        "cp -a of the data dir failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::remove_dir_all(&aside)?;
    Ok(mount)
}

/// The runs of `event_id` the API lists (at most 200).
async fn runs_of(cluster: &TestCluster, event_id: &str) -> Result<Vec<Value>> {
    let runs = cluster
        .api()
        .get_ok(&format!("/api/v1/runs?event_id={event_id}&limit=200"))
        .await?;
    let runs = runs
        .as_array()
        .cloned()
        .with_context(|| format!("the runs list is not a list: {runs}"))?;
    ensure!(runs.len() < 200, "too many runs to count them");
    Ok(runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_control_plane_disk_answers_507_stores_nothing_partial_and_recovers() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("worker").await?;
    // Runs of this event stay queued: its agent is enrolled but never started.
    let idle = cluster.enroll_agent("never-started", &[]).await?;
    let queued_event = cluster
        .create_event(&EventSpec::bash("stays-queued", "true").target(&idle.id))
        .await?;
    let live_event = cluster
        .create_event(&EventSpec::bash("runs", "echo ran-after-freeing").target(&agent.id))
        .await?;

    cluster.kill_control_plane()?;
    let mount = data_dir_onto_tmpfs(&cluster, 64 * 1024 * 1024)?;
    cluster.start_control_plane_again().await?;
    cluster.wait_agent_online(&agent.id, DEADLINE).await?;
    mount.fill()?;

    // Runs with a 200 KiB input until the disk refuses one (the database may first reuse room it
    // already has); every answer is a 201 or a 507.
    let input = "x".repeat(200 * 1024);
    let mut accepted = Vec::new();
    let refusal = loop {
        ensure!(
            accepted.len() < 150,
            "150 runs of 200 KiB were accepted on a full disk"
        );
        let answer = cluster
            .api()
            .post(
                &format!("/api/v1/events/{queued_event}/runs"),
                &json!({"input": {"n": accepted.len(), "pad": input}}),
            )
            .await?;
        match answer.status {
            201 => accepted.push(json_str(&answer.json, "run_id")?),
            507 => break answer,
            _ => bail!(
                "a run on a full disk: HTTP {}: {}",
                answer.status,
                answer.text
            ),
        }
    };
    eprintln!(
        "{} runs of 200 KiB accepted before the full disk refused one",
        accepted.len()
    );
    ensure!(
        refusal.json["error"]["code"] == "insufficient_storage"
            && refusal.json["error"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("disk is full")),
        "the refusal does not say why: {}",
        refusal.text
    );
    // Other writes are refused the same way, reads still work, and the process is up.
    let event = cluster
        .api()
        .post(
            "/api/v1/events",
            &EventSpec::bash("no-room-for-me", "true")
                .target(&agent.id)
                .to_json(cluster.marker()),
        )
        .await?;
    ensure!(
        event.status == 507,
        "an event on a full disk: {} {}",
        event.status,
        event.text
    );
    let health = cluster.api().get("/healthz").await?;
    ensure!(
        health.status == 200,
        "/healthz on a full disk: {}",
        health.text
    );
    // Nothing partial: exactly the accepted runs exist, each whole.
    let runs = runs_of(&cluster, &queued_event).await?;
    ensure!(
        runs.len() == accepted.len(),
        "{} runs stored, {} accepted",
        runs.len(),
        accepted.len()
    );
    let events = cluster.api().get_ok("/api/v1/events").await?;
    ensure!(
        !events.to_string().contains("no-room-for-me"),
        "the refused event was stored"
    );

    mount.free()?;
    for run_id in &accepted {
        let run = cluster.run(run_id).await?;
        ensure!(
            run["input"]["pad"].as_str().map(str::len) == Some(input.len())
                && run["jobs"].as_array().map(Vec::len) == Some(1),
            "run {run_id} is not whole"
        );
    }
    let started = cluster.run_event(&live_event, None).await?;
    let finished = cluster
        .wait_job_final(&started.single_job()?, DEADLINE)
        .await?;
    ensure!(
        finished["status"] == "completed"
            && finished["output"]
                .as_str()
                .is_some_and(|output| output.contains("ran-after-freeing")),
        "the job after freeing space: {finished}"
    );
    cluster.run_event(&queued_event, None).await?;
    drop(cluster);
    drop(mount);
    Ok(())
}

/// What one creator got back for one request.
#[derive(Debug)]
enum Answer {
    /// 201: the run and its job, with the input that was sent.
    Created {
        run_id: String,
        job_id: String,
        tag: String,
    },
    /// No HTTP answer (the control plane died with the request in flight).
    NoAnswer,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_during_a_burst_of_job_creation_keeps_every_accepted_run()
-> Result<()> {
    const CREATORS: usize = 8;
    const KILL_AFTER: usize = 40;
    let mut cluster = TestCluster::start().await?;
    // The jobs stay queued: their agent is enrolled but never started.
    let agent = cluster.enroll_agent("never-started", &[]).await?;
    let event = cluster
        .create_event(&EventSpec::bash("burst", "true").target(&agent.id))
        .await?;

    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let mut creators = Vec::new();
    for creator in 0..CREATORS {
        let api = cluster.api().clone();
        let answers = Arc::clone(&answers);
        let path = format!("/api/v1/events/{event}/runs");
        creators.push(tokio::spawn(async move {
            for n in 0.. {
                let tag = format!("creator-{creator}-{n}");
                match api.post(&path, &json!({"input": {"tag": tag}})).await {
                    Ok(answer) if answer.status == 201 => {
                        let run_id = json_str(&answer.json, "run_id")?;
                        let job_id = answer.json["jobs"][0]["id"]
                            .as_str()
                            .with_context(|| format!("no job in {}", answer.text))?
                            .to_owned();
                        answers.lock().unwrap().push(Answer::Created {
                            run_id,
                            job_id,
                            tag,
                        });
                    }
                    Ok(answer) => {
                        bail!("creator {creator}: HTTP {}: {}", answer.status, answer.text)
                    }
                    Err(_) => {
                        // The control plane is gone: this request may or may not have been
                        // stored; the creator stops.
                        answers.lock().unwrap().push(Answer::NoAnswer);
                        return Ok::<(), anyhow::Error>(());
                    }
                }
            }
            Ok(())
        }));
    }
    cluster
        .wait_until(DEADLINE, &format!("{KILL_AFTER} runs created"), || async {
            Ok((answers.lock().unwrap().len() >= KILL_AFTER).then_some(()))
        })
        .await?;
    cluster.kill_control_plane()?;
    for creator in creators {
        tokio::time::timeout(DEADLINE, creator)
            .await
            .context("a creator did not stop after the kill")???;
    }
    cluster.start_control_plane_again().await?;

    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let created: Vec<(&String, &String, &String)> = answers
        .iter()
        .filter_map(|answer| match answer {
            Answer::Created {
                run_id,
                job_id,
                tag,
            } => Some((run_id, job_id, tag)),
            Answer::NoAnswer => None,
        })
        .collect();
    let unanswered = answers.len() - created.len();
    ensure!(
        created.len() >= KILL_AFTER - CREATORS && unanswered == CREATORS,
        "{} created, {unanswered} unanswered",
        created.len()
    );
    // Every 201 survived the kill, whole.
    for (run_id, job_id, tag) in &created {
        let run = cluster.run(run_id).await?;
        ensure!(
            run["input"]["tag"] == tag.as_str(),
            "run {run_id} lost its input: {run}"
        );
        let jobs = run["jobs"].as_array().cloned().unwrap_or_default();
        ensure!(
            jobs.len() == 1 && jobs[0]["id"] == job_id.as_str() && jobs[0]["status"] == "queued",
            "run {run_id} lost its job: {run}"
        );
    }
    // Nothing else appeared, but requests that never got an answer may have been stored.
    let stored = runs_of(&cluster, &event).await?.len();
    ensure!(
        stored >= created.len() && stored <= created.len() + unanswered,
        "{stored} runs stored for {} accepted and {unanswered} unanswered requests",
        created.len()
    );
    eprintln!(
        "{} runs accepted, {unanswered} requests cut off, {stored} runs stored",
        created.len()
    );
    Ok(())
}
