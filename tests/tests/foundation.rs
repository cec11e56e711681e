//! Foundation end-to-end tests: real control plane, real agents, real jobs.
//!
//! Each test starts its own [`TestCluster`] (temp dir, free ports) so the tests are independent and
//! can run in parallel. Every wait is a poll with a deadline; no sleep is used to synchronize.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::cluster::json_str;
use cronium_e2e::quic::connect_as_agent;
use cronium_e2e::{
    AgentOptions, ClusterOptions, EnrollRequest, EventSpec, TestCluster, follow_job_logs,
    live_processes_with_arg, random_bytes, sha256_hex, unique_sleep_seconds,
};
use reqwest::Method;
use serde_json::{Value, json};

/// How long an ordinary job may take from trigger to final status.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the processes of a killed job may take to disappear.
const PROCESS_GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// Collects every mismatch of a test so one run reports all of them.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, condition: bool, message: impl FnOnce() -> String) {
        if !condition {
            self.0.push(message());
        }
    }

    fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        bail!(
            "{} check(s) failed:\n- {}\n(the log tails follow)",
            self.0.len(),
            self.0.join("\n- ")
        )
    }
}

/// Checks that no secret (the admin API token, the encryption key, and `extra`) appears in any
/// log of the cluster.
fn check_no_secrets_in_logs(
    cluster: &TestCluster,
    failures: &mut Failures,
    extra: &[(&str, &str)],
) {
    let mut secrets = vec![
        ("the admin API token", cluster.admin_token()),
        ("the encryption key", cluster.encryption_key()),
    ];
    secrets.extend_from_slice(extra);
    // The search itself must work, or the checks below would pass for nothing.
    failures.check(!cluster.logs_containing("cronium ready").is_empty(), || {
        "the log search does not even find the readiness line".into()
    });
    for (what, secret) in secrets {
        let found = cluster.logs_containing(secret);
        failures.check(found.is_empty(), || format!("{what} appears in {found:?}"));
    }
}

/// What one job must look like when it is over.
struct Expected {
    status: &'static str,
    exit_code: i64,
    reason: Option<&'static str>,
    contains: Vec<String>,
    absent: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_run_bash_python_and_node_jobs() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let alpha = cluster
        .enroll_agent("alpha", &[("role", "e2e"), ("zone", "a")])
        .await?;
    let beta = cluster.enroll_agent("beta", &[("role", "e2e")]).await?;
    // The agent's own environment must not reach the jobs.
    let options = AgentOptions {
        env: vec![("CRONIUM_TEST_LEAK".into(), "1".into())],
        ..AgentOptions::default()
    };
    cluster.start_agent(&alpha, &options).await?;
    cluster.start_agent(&beta, &options).await?;

    let mut failures = Failures::default();
    let agents = cluster.api().get_ok("/api/v1/agents").await?;
    let listed = agents.as_array().context("GET /agents is not an array")?;
    for agent in [&alpha, &beta] {
        let entry = listed.iter().find(|entry| entry["id"] == agent.id.as_str());
        failures.check(entry.is_some(), || {
            format!(
                "agent {} ({}) missing from GET /agents: {agents}",
                agent.name, agent.id
            )
        });
        if let Some(entry) = entry {
            failures.check(entry["name"] == agent.name.as_str(), || {
                format!("agent {} listed as {entry}", agent.name)
            });
            failures.check(entry["status"] == "online", || {
                format!("agent {} not online: {entry}", agent.name)
            });
            failures.check(entry["labels"]["role"] == "e2e", || {
                format!("agent {} lost its labels: {entry}", agent.name)
            });
            failures.check(
                entry["version"]
                    .as_str()
                    .is_some_and(|version| !version.is_empty())
                    && entry["last_seen_at"].is_string()
                    && entry.get("server_id").is_some(),
                || {
                    format!(
                        "agent {} lacks version, last_seen_at or server_id: {entry}",
                        agent.name
                    )
                },
            );
        }
    }

    let greeting = "hello-from-the-event-env";
    let leak_absent = vec!["leak=1".to_owned()];
    let cases = vec![
        (
            EventSpec::bash(
                "bash-ok",
                "echo \"bash stdout $GREETING\"\necho \"bash stderr\" >&2\necho \"leak=${CRONIUM_TEST_LEAK:-unset}\"\n",
            )
            .target(&alpha.id)
            .target(&beta.id),
            Expected {
                status: "completed",
                exit_code: 0,
                reason: None,
                contains: vec![format!("bash stdout {greeting}"), "bash stderr".into(), "leak=unset".into()],
                absent: leak_absent.clone(),
            },
        ),
        (
            EventSpec::python(
                "python-ok",
                "import os, sys\nprint(\"python stdout\", os.environ.get(\"GREETING\"))\nprint(\"python stderr\", file=sys.stderr)\nprint(\"leak=\" + os.environ.get(\"CRONIUM_TEST_LEAK\", \"unset\"))\n",
            )
            .target(&alpha.id)
            .target(&beta.id),
            Expected {
                status: "completed",
                exit_code: 0,
                reason: None,
                contains: vec![format!("python stdout {greeting}"), "python stderr".into(), "leak=unset".into()],
                absent: leak_absent.clone(),
            },
        ),
        (
            EventSpec::nodejs(
                "node-ok",
                "console.log(\"node stdout \" + process.env.GREETING);\nconsole.error(\"node stderr\");\nconsole.log(\"leak=\" + (process.env.CRONIUM_TEST_LEAK || \"unset\"));\n",
            )
            .target(&alpha.id)
            .target(&beta.id),
            Expected {
                status: "completed",
                exit_code: 0,
                reason: None,
                contains: vec![format!("node stdout {greeting}"), "node stderr".into(), "leak=unset".into()],
                absent: leak_absent.clone(),
            },
        ),
        (
            // Targets by name, to cover that form of `targets.agents`.
            EventSpec::bash("bash-exit-3", "echo \"about to fail\"\necho \"failing on stderr\" >&2\nexit 3\n")
                .target(&alpha.name)
                .target(&beta.name),
            Expected {
                status: "failed",
                exit_code: 3,
                reason: Some("exit_code"),
                contains: vec!["about to fail".into(), "failing on stderr".into()],
                absent: Vec::new(),
            },
        ),
    ];

    let expected_agents: BTreeSet<String> = [alpha.id.clone(), beta.id.clone()].into();
    let mut started = Vec::new();
    for (spec, expected) in cases {
        let spec = spec.env("GREETING", greeting);
        let event_id = cluster.create_event(&spec).await?;
        let run = cluster.run_event(&event_id, None).await?;
        let agents: BTreeSet<String> = run
            .jobs
            .iter()
            .map(|(_, agent_id)| agent_id.clone())
            .collect();
        failures.check(run.jobs.len() == 2 && agents == expected_agents, || {
            format!(
                "event {} should fan out to one job per agent {expected_agents:?}, got {:?}",
                spec.name, run.jobs
            )
        });
        started.push((spec.name.clone(), run, expected));
    }

    for (name, run, expected) in &started {
        for (job_id, agent_id) in &run.jobs {
            let job = cluster.wait_job_final(job_id, JOB_TIMEOUT).await?;
            let what = format!("{name} on agent {agent_id} (job {job_id})");
            failures.check(job["status"] == expected.status, || {
                format!(
                    "{what}: status {} != {}: {job}",
                    job["status"], expected.status
                )
            });
            failures.check(
                job["exit_code"].as_i64() == Some(expected.exit_code),
                || {
                    format!(
                        "{what}: exit_code {} != {}",
                        job["exit_code"], expected.exit_code
                    )
                },
            );
            let reason_ok = match expected.reason {
                Some(reason) => job["reason"] == reason,
                None => job["reason"].is_null(),
            };
            failures.check(reason_ok, || {
                format!("{what}: reason {} != {:?}", job["reason"], expected.reason)
            });
            failures.check(job["attempt"].as_u64() == Some(1), || {
                format!("{what}: attempt {} != 1", job["attempt"])
            });
            failures.check(job["run_id"] == run.run_id.as_str(), || {
                format!("{what}: run_id {} != {}", job["run_id"], run.run_id)
            });
            let output = job["output"].as_str().unwrap_or_default();
            for needle in &expected.contains {
                failures.check(output.contains(needle.as_str()), || {
                    format!("{what}: output lacks {needle:?}: {output:?}")
                });
            }
            for needle in &expected.absent {
                failures.check(!output.contains(needle.as_str()), || {
                    format!("{what}: output has {needle:?}: {output:?}")
                });
            }
            let logs = String::from_utf8_lossy(&cluster.job_logs(job_id).await?).into_owned();
            failures.check(logs == output, || {
                format!("{what}: GET /logs {logs:?} differs from output {output:?}")
            });
        }
        let run_json = cluster.run(&run.run_id).await?;
        let counter = if expected.status == "completed" {
            "completed"
        } else {
            "failed"
        };
        failures.check(run_json["counts"][counter].as_u64() == Some(2), || {
            format!("{name}: run counts {run_json}")
        });
    }
    check_no_secrets_in_logs(&cluster, &mut failures, &[]);
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_whole_process_tree() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("timeout").await?;
    let marker = unique_sleep_seconds();
    let script = format!("echo started\nsleep {marker} &\nsleep {marker}\necho not-reached\n");
    let job_id = cluster
        .run_single_job(
            &EventSpec::bash("timeout", &script)
                .target(&agent.id)
                .timeout_seconds(2),
        )
        .await?;

    // Make sure the check below can fail: both sleeps are seen while the job runs.
    cluster
        .wait_until(
            Duration::from_secs(20),
            "both sleeps of the job running",
            || async {
                Ok((live_processes_with_arg(&marker)
                    .iter()
                    .filter(|process| process.cmdline.starts_with("sleep"))
                    .count()
                    >= 2)
                    .then_some(()))
            },
        )
        .await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let mut failures = Failures::default();
    failures.check(job["status"] == "failed", || {
        format!("status should be failed: {job}")
    });
    failures.check(job["reason"] == "timeout", || {
        format!("reason should be timeout: {job}")
    });
    let output = job["output"].as_str().unwrap_or_default();
    failures.check(output.contains("started"), || {
        format!("output lacks `started`: {output:?}")
    });
    failures.check(!output.contains("not-reached"), || {
        format!("the script went on after the timeout: {output:?}")
    });
    if let Err(error) = cluster
        .wait_no_process_with_arg(&marker, PROCESS_GONE_TIMEOUT)
        .await
    {
        failures.check(false, || {
            format!("the timed-out job left processes behind: {error:#}")
        });
    }
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_job_and_its_children() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("cancel").await?;
    let marker = unique_sleep_seconds();
    let script = format!("echo started\nsleep {marker} &\nsleep {marker}\necho not-reached\n");
    let job_id = cluster
        .run_single_job(
            &EventSpec::bash("cancel", &script)
                .target(&agent.id)
                .timeout_seconds(600),
        )
        .await?;

    cluster
        .wait_job_status(&job_id, &["running"], JOB_TIMEOUT)
        .await?;
    cluster
        .wait_until(
            Duration::from_secs(20),
            "both sleeps of the job running",
            || async {
                Ok((live_processes_with_arg(&marker)
                    .iter()
                    .filter(|process| process.cmdline.starts_with("sleep"))
                    .count()
                    >= 2)
                    .then_some(()))
            },
        )
        .await?;
    cluster.cancel_job(&job_id).await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let mut failures = Failures::default();
    failures.check(job["status"] == "cancelled", || {
        format!("status should be cancelled: {job}")
    });
    failures.check(
        job["reason"].is_null() || job["reason"] == "cancelled",
        || format!("unexpected reason: {job}"),
    );
    failures.check(
        !job["output"]
            .as_str()
            .unwrap_or_default()
            .contains("not-reached"),
        || format!("the script went on: {job}"),
    );
    if let Err(error) = cluster
        .wait_no_process_with_arg(&marker, PROCESS_GONE_TIMEOUT)
        .await
    {
        failures.check(false, || {
            format!("the cancelled job left processes behind: {error:#}")
        });
    }
    // A cancelled job stays cancelled: cancelling again changes nothing.
    let again = cluster
        .api()
        .post(&format!("/api/v1/jobs/{job_id}/cancel"), &json!({}))
        .await?;
    failures.check(again.status < 500, || {
        format!("a second cancel answered {} {}", again.status, again.text)
    });
    let job = cluster.job(&job_id).await?;
    failures.check(job["status"] == "cancelled", || {
        format!("status changed after a second cancel: {job}")
    });
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_job_fails_the_job_as_lost_and_leaves_no_orphan() -> Result<()> {
    let mut cluster = TestCluster::start_with(ClusterOptions {
        lease_seconds: Some(3),
        heartbeat_seconds: Some(1),
    })
    .await?;
    let agent = cluster.add_agent("doomed").await?;
    let marker = unique_sleep_seconds();
    let script = format!("echo started\nsleep {marker}\n");
    let spec = EventSpec::bash("lost", &script)
        .target(&agent.id)
        .timeout_seconds(600)
        .retries(0);
    let job_id = cluster.run_single_job(&spec).await?;
    cluster
        .wait_job_status(&job_id, &["running"], JOB_TIMEOUT)
        .await?;
    cluster
        .wait_until(
            Duration::from_secs(20),
            "the job's sleep running",
            || async { Ok((!live_processes_with_arg(&marker).is_empty()).then_some(())) },
        )
        .await?;

    cluster.kill_agent(&agent.id)?;
    let killed_at = std::time::Instant::now();
    // Lease 3 s, heartbeat 1 s: the job must be settled well within 30 s.
    let job = cluster
        .wait_job_final(&job_id, Duration::from_secs(30))
        .await?;
    let mut failures = Failures::default();
    failures.check(job["status"] == "failed", || {
        format!("status should be failed: {job}")
    });
    failures.check(job["reason"] == "lost", || {
        format!("reason should be lost: {job}")
    });
    failures.check(job["attempt"].as_u64() == Some(1), || {
        format!("retries 0 means one attempt: {job}")
    });
    // With a 1 s heartbeat and a 3 s lease, the dead agent must not look online for long.
    cluster
        .wait_until(
            Duration::from_secs(60),
            "the killed agent shown offline",
            || async {
                let agent = cluster
                    .api()
                    .get_ok(&format!("/api/v1/agents/{}", agent.id))
                    .await?;
                Ok((agent["status"] == "offline").then_some(()))
            },
        )
        .await?;
    let offline_after = killed_at.elapsed();
    failures.check(offline_after <= Duration::from_secs(15), || {
        format!("the killed agent was still shown online {offline_after:?} after SIGKILL (heartbeat 1 s, lease 3 s)")
    });

    // The restarted agent settles its old attempt: no process of that job may survive.
    cluster
        .start_agent(&agent, &AgentOptions::default())
        .await?;
    if let Err(error) = cluster
        .wait_no_process_with_arg(&marker, Duration::from_secs(30))
        .await
    {
        failures.check(false, || {
            format!("the job of the killed agent survived the agent's restart: {error:#}")
        });
    }
    let job = cluster.job(&job_id).await?;
    failures.check(job["status"] == "failed" && job["reason"] == "lost", || {
        format!("the settled job changed: {job}")
    });
    // The restarted agent is healthy: it runs the next job.
    let next = cluster
        .run_single_job(&EventSpec::bash("after-restart", "echo alive-again").target(&agent.id))
        .await?;
    let next = cluster.wait_job_final(&next, JOB_TIMEOUT).await?;
    failures.check(next["status"] == "completed", || {
        format!("the next job on the restarted agent: {next}")
    });
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_agent_finishes_its_job_and_claims_nothing_new() -> Result<()> {
    // A short lease: if heartbeats stopped while the agent drains, the running job would be lost.
    let mut cluster = TestCluster::start_with(ClusterOptions {
        lease_seconds: Some(3),
        heartbeat_seconds: Some(1),
    })
    .await?;
    let agent = cluster.add_agent("graceful").await?;
    let script = "echo begin\nsleep 6\necho finished\n";
    let running = cluster
        .run_single_job(
            &EventSpec::bash("drain", script)
                .target(&agent.id)
                .timeout_seconds(120),
        )
        .await?;
    cluster
        .wait_until(
            JOB_TIMEOUT,
            "the job running with its first line stored",
            || async {
                let job = cluster.job(&running).await?;
                Ok((job["status"] == "running"
                    && job["output"].as_str().unwrap_or_default().contains("begin"))
                .then_some(()))
            },
        )
        .await?;

    cluster.signal_agent(&agent.id, libc::SIGTERM)?;
    // Work queued while the agent drains must wait for another agent (or this one's return).
    let waiting = cluster
        .run_single_job(&EventSpec::bash("queued", "echo later").target(&agent.id))
        .await?;
    let status = cluster
        .wait_agent_exit(&agent.id, Duration::from_secs(60))
        .await?;
    let mut failures = Failures::default();
    failures.check(status.success(), || {
        format!("a graceful stop should exit 0, got {status}")
    });
    let job = cluster
        .wait_job_final(&running, Duration::from_secs(20))
        .await?;
    failures.check(job["status"] == "completed", || {
        format!("the running job should complete during the drain: {job}")
    });
    failures.check(
        job["output"]
            .as_str()
            .unwrap_or_default()
            .contains("finished"),
        || format!("job output: {job}"),
    );
    let queued = cluster.job(&waiting).await?;
    failures.check(queued["status"] == "queued", || {
        format!("the draining agent claimed new work: {queued}")
    });

    // Back again, the agent picks the queued job up.
    cluster.kill_agent(&agent.id)?;
    cluster
        .start_agent(&agent, &AgentOptions::default())
        .await?;
    let later = cluster.wait_job_final(&waiting, JOB_TIMEOUT).await?;
    failures.check(later["status"] == "completed", || {
        format!("the queued job after the restart: {later}")
    });
    failures.finish()
}

/// The deterministic output of [`CONTROL_PLANE_RESTART_SCRIPT`].
fn control_plane_restart_expected_log() -> Vec<u8> {
    (1..=3000)
        .map(|index| format!("line {index} {index:080}\n"))
        .collect::<String>()
        .into_bytes()
}

const CONTROL_PLANE_RESTART_SCRIPT: &str = "for i in $(seq 1 3000); do echo \"line $i $(printf '%080d' $i)\"; [ $((i % 500)) = 0 ] && sleep 1; done\nexit 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_job_loses_nothing() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.enroll_agent("survivor", &[]).await?;
    cluster
        .start_agent(
            &agent,
            &AgentOptions {
                reconnect_max_ms: 500,
                ..AgentOptions::default()
            },
        )
        .await?;
    let spec = EventSpec::bash("restart", CONTROL_PLANE_RESTART_SCRIPT)
        .target(&agent.id)
        .timeout_seconds(300);
    let event_id = cluster.create_event(&spec).await?;
    let run = cluster.run_event(&event_id, None).await?;
    let job_id = run.single_job()?;
    cluster
        .wait_job_status(&job_id, &["running"], JOB_TIMEOUT)
        .await?;
    // Preferably some output is already stored, so the agent must resume mid-log after the
    // restart; the job runs for about 6 s, so this wait is short and its timeout is not an error.
    let stored_before_kill = cluster
        .wait_until(
            Duration::from_secs(3),
            "the first log bytes stored",
            || async {
                let logs = cluster.job_logs(&job_id).await?;
                Ok((!logs.is_empty()).then_some(logs.len()))
            },
        )
        .await
        .unwrap_or(0);
    eprintln!("{stored_before_kill} log bytes were stored before the control plane was killed");

    cluster.kill_control_plane()?;
    // The outage itself (not a synchronization): the job keeps printing while nobody listens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_control_plane_again().await?;

    let job = cluster
        .wait_job_final(&job_id, Duration::from_secs(120))
        .await?;
    let mut failures = Failures::default();
    failures.check(job["status"] == "completed", || {
        format!("status should be completed: {job}")
    });
    failures.check(job["exit_code"].as_i64() == Some(0), || {
        format!("exit_code should be 0: {job}")
    });
    failures.check(job["attempt"].as_u64() == Some(1), || {
        format!("attempt should be 1: {job}")
    });
    let expected = control_plane_restart_expected_log();
    let logs = cluster.job_logs(&job_id).await?;
    failures.check(sha256_hex(&logs) == sha256_hex(&expected), || {
        let first_difference = logs.iter().zip(&expected).position(|(got, want)| got != want).unwrap_or(logs.len().min(expected.len()));
        format!(
            "log checksum mismatch: got {} bytes, expected {} bytes, first difference at byte {first_difference}: {:?}",
            logs.len(),
            expected.len(),
            String::from_utf8_lossy(&logs[first_difference.saturating_sub(40)..(first_difference + 80).min(logs.len())])
        )
    });
    let output = job["output"].as_str().unwrap_or_default().as_bytes();
    failures.check(
        !output.is_empty() && output.len() <= 64 * 1024 && expected.ends_with(output),
        || {
            format!(
                "output must be a tail (≤ 64 KiB) of the log; got {} bytes",
                output.len()
            )
        },
    );
    let run = cluster.run(&run.run_id).await?;
    let counts = &run["counts"];
    failures.check(
        counts["completed"].as_u64() == Some(1)
            && ["queued", "running", "failed", "cancelled"]
                .iter()
                .all(|counter| counts[counter].as_u64() == Some(0)),
        || format!("the run should count exactly one completed job: {run}"),
    );
    failures.check(run["jobs"].as_array().map(Vec::len) == Some(1), || {
        format!("the run should have one job: {run}")
    });
    failures.check(run["status"] == "completed", || {
        format!("run status should be completed: {run}")
    });
    // The agent came back by itself.
    if let Err(error) = cluster
        .wait_agent_online(&agent.id, Duration::from_secs(30))
        .await
    {
        failures.check(false, || format!("the agent did not reconnect: {error:#}"));
    }
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_logs_streams_events_in_order_until_the_end() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("follow").await?;
    let script = "for i in $(seq 1 30); do echo \"tick $i\"; sleep 0.1; done\necho \"to stderr\" >&2\necho done\n";
    let job_id = cluster
        .run_single_job(&EventSpec::bash("follow", script).target(&agent.id))
        .await?;

    let followed = follow_job_logs(cluster.api(), &job_id, JOB_TIMEOUT).await?;
    let mut failures = Failures::default();
    failures.check(followed.logs.len() >= 2, || {
        format!(
            "expected the log in several events, got {:?}",
            followed.logs
        )
    });
    let mut next_offset = 0u64;
    for event in &followed.logs {
        failures.check(event.offset == next_offset, || {
            format!(
                "log event at offset {} but {next_offset} bytes came before it: {:?}",
                event.offset, followed.logs
            )
        });
        failures.check(
            ["stdout", "stderr", "system"].contains(&event.stream.as_str()),
            || format!("bad stream in {event:?}"),
        );
        next_offset = event.offset + event.data.len() as u64;
    }
    failures.check(followed.other_events.is_empty(), || {
        format!("unexpected events {:?}", followed.other_events)
    });
    let text = followed.text();
    let end = &followed.end;
    failures.check(end["id"] == job_id.as_str(), || {
        format!("the end event should carry the job: {end}")
    });
    failures.check(end["status"] == "completed", || {
        format!("the end event should say completed: {end}")
    });
    let job = cluster.job(&job_id).await?;
    failures.check(job["status"] == "completed", || {
        format!("the job should be completed: {job}")
    });
    failures.check(job["output"].as_str() == Some(text.as_str()), || {
        format!(
            "the streamed text {text:?} differs from the job output {}",
            job["output"]
        )
    });
    let expected_lines: Vec<String> = (1..=30).map(|index| format!("tick {index}")).collect();
    let stdout_lines: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("tick "))
        .collect();
    failures.check(stdout_lines == expected_lines, || {
        format!("ticks out of order or missing: {stdout_lines:?}")
    });
    failures.check(
        followed
            .logs
            .iter()
            .any(|event| event.stream == "stderr" && event.data.contains("to stderr")),
        || format!("no stderr event with `to stderr`: {:?}", followed.logs),
    );

    // Following a finished job replays the whole log and ends at once.
    let replay = follow_job_logs(cluster.api(), &job_id, Duration::from_secs(20)).await?;
    failures.check(replay.text() == text, || {
        format!(
            "the replay {:?} differs from the live stream {text:?}",
            replay.text()
        )
    });
    failures.check(replay.end["status"] == "completed", || {
        format!("the replay's end event: {}", replay.end)
    });
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_tokens_are_single_use_and_expire() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let mut failures = Failures::default();

    let token = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    for field in ["install_command", "enroll_command"] {
        failures.check(
            token[field].as_str().is_some_and(|text| !text.is_empty()),
            || format!("token answer lacks {field}: {token}"),
        );
    }
    let mut request = EnrollRequest {
        name: "first".into(),
        token: json_str(&token, "token")?,
        ca_sha256: json_str(&token, "ca_sha256")?,
        labels: vec![("team".into(), "e2e".into())],
        token_via_env: false,
    };
    let first = cluster.run_enroll(&request).await?;
    failures.check(first.output.status.success(), || {
        format!("the first enrollment failed: {}", first.combined_output())
    });
    failures.check(first.state_dir.join("agent.json").is_file(), || {
        "the first enrollment wrote no agent.json".into()
    });

    request.name = "second".into();
    request.token_via_env = true;
    let second = cluster.run_enroll(&request).await?;
    failures.check(!second.output.status.success(), || {
        format!(
            "a reused one-use token was accepted: {}",
            second.combined_output()
        )
    });
    failures.check(
        second.combined_output().to_lowercase().contains("token"),
        || {
            format!(
                "the refusal should mention the token: {:?}",
                second.combined_output()
            )
        },
    );
    failures.check(!second.state_dir.join("agent.json").exists(), || {
        "a refused enrollment wrote agent.json".into()
    });

    // A wrong CA fingerprint is refused by the agent itself, even with a fresh token.
    let fresh = cluster.create_enrollment_token(&json!({"uses": 1})).await?;
    let wrong_ca = EnrollRequest {
        name: "wrong-ca".into(),
        token: json_str(&fresh, "token")?,
        ca_sha256: "00".repeat(32),
        labels: Vec::new(),
        token_via_env: true,
    };
    let refused = cluster.run_enroll(&wrong_ca).await?;
    failures.check(!refused.output.status.success(), || {
        format!(
            "a wrong --ca-sha256 was accepted: {}",
            refused.combined_output()
        )
    });
    // The agent checks the CA before the token leaves the host, so the token is not used up.
    let retry = EnrollRequest {
        name: "after-wrong-ca".into(),
        ca_sha256: json_str(&fresh, "ca_sha256")?,
        ..wrong_ca
    };
    let retried = cluster.run_enroll(&retry).await?;
    failures.check(retried.output.status.success(), || {
        format!(
            "the token was used up by an enrollment refused for its CA: {}",
            retried.combined_output()
        )
    });

    let short = cluster
        .create_enrollment_token(&json!({"uses": 5, "ttl_seconds": 1}))
        .await?;
    let expires_at = chrono::DateTime::parse_from_rfc3339(&json_str(&short, "expires_at")?)
        .with_context(|| format!("expires_at is not RFC 3339: {short}"))?;
    let now = chrono::Utc::now();
    failures.check(
        expires_at > now - chrono::Duration::seconds(5)
            && expires_at < now + chrono::Duration::seconds(10),
        || format!("expires_at {expires_at} is not about one second from now ({now})"),
    );
    cluster
        .wait_until(
            Duration::from_secs(15),
            "the short token's expiry to pass",
            || async {
                Ok(
                    (chrono::Utc::now() > expires_at + chrono::Duration::milliseconds(500))
                        .then_some(()),
                )
            },
        )
        .await?;
    let expired = EnrollRequest {
        name: "late".into(),
        token: json_str(&short, "token")?,
        ca_sha256: json_str(&short, "ca_sha256")?,
        labels: Vec::new(),
        token_via_env: true,
    };
    let late = cluster.run_enroll(&expired).await?;
    failures.check(!late.output.status.success(), || {
        format!("an expired token was accepted: {}", late.combined_output())
    });
    failures.check(!late.combined_output().trim().is_empty(), || {
        "the expired-token refusal printed no message".into()
    });

    let agents = cluster.api().get_ok("/api/v1/agents").await?;
    let names: Vec<&str> = agents
        .as_array()
        .context("GET /agents is not an array")?
        .iter()
        .filter_map(|agent| agent["name"].as_str())
        .collect();
    let mut names = names;
    names.sort_unstable();
    failures.check(names == ["after-wrong-ca", "first"], || {
        format!(
            "exactly `first` and `after-wrong-ca` must be enrolled; GET /agents lists {names:?}"
        )
    });
    // No token reaches a log or the enroll command's own output.
    let tokens = [
        ("the one-use enrollment token", json_str(&token, "token")?),
        ("the fresh enrollment token", json_str(&fresh, "token")?),
        (
            "the short-lived enrollment token",
            json_str(&short, "token")?,
        ),
    ];
    let token_refs: Vec<(&str, &str)> = tokens
        .iter()
        .map(|(what, secret)| (*what, secret.as_str()))
        .collect();
    check_no_secrets_in_logs(&cluster, &mut failures, &token_refs);
    for (what, secret) in &token_refs {
        for outcome in [&first, &second, &refused, &retried, &late] {
            failures.check(!outcome.combined_output().contains(secret), || {
                format!(
                    "{what} appears in the output of an enroll command: {}",
                    outcome.combined_output()
                )
            });
        }
    }
    failures.finish()
}

/// The number of items in a list answer (a bare array or an object with an `items` array).
fn count_items(list: &Value) -> Result<usize> {
    list.as_array()
        .or_else(|| list["items"].as_array())
        .or_else(|| list["events"].as_array())
        .map(Vec::len)
        .with_context(|| format!("not a list: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_requires_credentials_and_refuses_bad_input() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let mut failures = Failures::default();

    let anonymous = cluster.api().with_token(None);
    let health = anonymous.get("/healthz").await?;
    failures.check(
        health.status == 200 && health.json == json!({"status": "ok", "database": "ok"}),
        || format!("GET /healthz: {health:?}"),
    );

    let routes: [(Method, &str); 11] = [
        (Method::GET, "/api/v1/agents"),
        (Method::GET, "/api/v1/agents/some-agent"),
        (Method::DELETE, "/api/v1/agents/some-agent"),
        (Method::POST, "/api/v1/enrollment-tokens"),
        (Method::GET, "/api/v1/events"),
        (Method::POST, "/api/v1/events"),
        (Method::POST, "/api/v1/events/some-event/runs"),
        (Method::GET, "/api/v1/runs/some-run"),
        (Method::GET, "/api/v1/jobs/some-job"),
        (Method::GET, "/api/v1/jobs/some-job/logs"),
        (Method::POST, "/api/v1/jobs/some-job/cancel"),
    ];
    let bad_token = cluster.api().with_token(Some("not-a-real-token"));
    for (client, who) in [
        (&anonymous, "without credentials"),
        (&bad_token, "with a bad token"),
    ] {
        for (method, path) in &routes {
            let body = (*method == Method::POST).then(|| json!({}));
            let response = client.send(method.clone(), path, body.as_ref()).await?;
            failures.check(response.status == 401, || {
                format!(
                    "{method} {path} {who}: HTTP {} {}",
                    response.status, response.text
                )
            });
            if let Err(error) = response.expect_error_shape(&format!("{method} {path} {who}")) {
                failures.check(false, || format!("{error:#}"));
            }
        }
    }

    let agent = cluster.enroll_agent("target", &[]).await?;
    let count_before = count_items(&cluster.api().get_ok("/api/v1/events").await?)?;
    let valid = EventSpec::bash("valid", "echo ok")
        .target(&agent.id)
        .to_json(cluster.marker());
    let mut without_script = valid.clone();
    without_script
        .as_object_mut()
        .context("event body is an object")?
        .remove("script");
    let mut without_name = valid.clone();
    without_name
        .as_object_mut()
        .context("event body is an object")?
        .remove("name");
    let mut without_kind = valid.clone();
    without_kind
        .as_object_mut()
        .context("event body is an object")?
        .remove("kind");
    let mut bad_timeout = valid.clone();
    bad_timeout["timeout_seconds"] = json!("soon");
    let mut unknown_kind = valid.clone();
    unknown_kind["kind"] = json!("cobol");

    let malformed = cluster
        .api()
        .send_raw(
            Method::POST,
            "/api/v1/events",
            "application/json",
            b"{\"name\": \"broken\", \"kind\": ".to_vec(),
        )
        .await?;
    failures.check((400..500).contains(&malformed.status), || {
        format!(
            "malformed JSON: HTTP {} {}",
            malformed.status, malformed.text
        )
    });
    if let Err(error) = malformed.expect_error_shape("malformed JSON") {
        failures.check(false, || format!("{error:#}"));
    }
    let unknown = cluster.api().post("/api/v1/events", &unknown_kind).await?;
    failures.check(unknown.status == 422, || {
        format!(
            "unknown kind: expected 422, got HTTP {} {}",
            unknown.status, unknown.text
        )
    });
    if let Err(error) = unknown.expect_error_shape("unknown kind") {
        failures.check(false, || format!("{error:#}"));
    }
    for (what, body) in [
        ("missing script", &without_script),
        ("missing name", &without_name),
        ("missing kind", &without_kind),
        ("string timeout", &bad_timeout),
    ] {
        let response = cluster.api().post("/api/v1/events", body).await?;
        failures.check((400..500).contains(&response.status), || {
            format!("{what}: HTTP {} {}", response.status, response.text)
        });
        if let Err(error) = response.expect_error_shape(what) {
            failures.check(false, || format!("{error:#}"));
        }
    }
    let count_after = count_items(&cluster.api().get_ok("/api/v1/events").await?)?;
    failures.check(count_after == count_before, || {
        format!("refused events were stored: {count_before} before, {count_after} after")
    });

    // The same body with everything in place is accepted, so the refusals above were about the input.
    cluster
        .api()
        .post("/api/v1/events", &valid)
        .await?
        .expect_status(201, "create the valid event")?;
    let count_valid = count_items(&cluster.api().get_ok("/api/v1/events").await?)?;
    failures.check(count_valid == count_before + 1, || {
        format!("the valid event was not listed: {count_before} → {count_valid}")
    });
    failures.finish()
}

/// Waits until the server ends a hostile stream: it finishes or resets our receive side, stops our
/// send side, or closes the whole connection. Returns a description of what happened.
async fn wait_stream_closed(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    receive: &mut quinn::RecvStream,
) -> Result<String> {
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::select! {
            read = receive.read_to_end(1024 * 1024) => format!("receive side ended: {:?}", read.map(|bytes| bytes.len())),
            stopped = send.stopped() => format!("send side stopped: {stopped:?}"),
            closed = connection.closed() => format!("connection closed: {closed}"),
        }
    })
    .await;
    outcome.context("the server neither closed the stream nor the connection within 15 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_quic_port_does_not_hurt_a_connected_agent() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let worker = cluster.add_agent("worker").await?;
    let intruder = cluster.enroll_agent("intruder", &[]).await?;
    let server = cluster.quic_addr();

    // (a) Random datagrams, some shaped like QUIC long-header packets.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a UDP socket")?;
    for index in 0..300usize {
        let size = match index % 3 {
            0 => 1 + random_bytes(1)[0] as usize,
            1 => 1200,
            _ => 1 + (u16::from_be_bytes([random_bytes(1)[0], random_bytes(1)[0]]) as usize % 1400),
        };
        let mut datagram = random_bytes(size);
        if index % 3 == 1 {
            // Long header, Initial packet, QUIC version 1, then random connection ids and payload.
            datagram[0] = 0xc0 | (datagram[0] & 0x0f);
            datagram[1..5].copy_from_slice(&[0, 0, 0, 1]);
        }
        socket
            .send_to(&datagram, server)
            .context("send a datagram")?;
    }

    // (b) A real mutual-TLS connection with a valid identity, then a 4 GiB length prefix.
    let first = connect_as_agent(&intruder.state_dir, server).await?;
    let (mut send, mut receive) = first.connection.open_bi().await.context("open a stream")?;
    let mut frame = u32::MAX.to_be_bytes().to_vec();
    frame.extend(random_bytes(4096));
    // The server may close the stream before all of it is written; that is a fine answer too.
    if let Err(error) = send.write_all(&frame).await {
        eprintln!("writing the oversized prefix ended early: {error}");
    }
    let huge = wait_stream_closed(&first.connection, &mut send, &mut receive).await?;
    eprintln!("4 GiB prefix: {huge}");

    // A frame of random bytes with a plausible length on a new connection. The stream is not
    // finished, so only the server can end this: by stopping or resetting the stream, or by
    // closing the connection.
    let second = connect_as_agent(&intruder.state_dir, server).await?;
    let (mut send, mut receive) = second.connection.open_bi().await.context("open a stream")?;
    let payload = random_bytes(8188);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend(payload);
    if let Err(error) = send.write_all(&frame).await {
        eprintln!("writing random bytes ended early: {error}");
    }
    let random = wait_stream_closed(&second.connection, &mut send, &mut receive).await?;
    eprintln!("random bytes: {random}");

    // A valid Hello opens a control stream; an oversized frame on it must close the connection.
    let third = connect_as_agent(&intruder.state_dir, server).await?;
    let (mut send, _receive) = third
        .connection
        .open_bi()
        .await
        .context("open the control stream")?;
    let hello = cronium_protocol::Message::Hello(cronium_protocol::hello::Hello {
        min_version: cronium_protocol::MIN_PROTOCOL_VERSION,
        max_version: cronium_protocol::PROTOCOL_VERSION,
        agent_version: "0.0.0-e2e".into(),
        capacity: 1,
        running: Vec::new(),
        capabilities: cronium_protocol::Capabilities::default(),
        host: cronium_protocol::HostInfo::default(),
        terminals: Vec::new(),
    });
    send.write_all(&cronium_protocol::encode(&hello)?)
        .await
        .context("write the hello")?;
    let mut garbage = u32::MAX.to_be_bytes().to_vec();
    garbage.extend(random_bytes(1024));
    if let Err(error) = send.write_all(&garbage).await {
        eprintln!("writing the oversized frame ended early: {error}");
    }
    let closed = tokio::time::timeout(Duration::from_secs(15), third.connection.closed())
        .await
        .context(
            "an oversized frame on the control stream did not close the connection within 15 s",
        )?;
    let mut failures = Failures::default();
    if let quinn::ConnectionError::ApplicationClosed(close) = &closed {
        let protocol_error = u64::from(cronium_protocol::CloseCode::ProtocolError.to_u32());
        failures.check(close.error_code.into_inner() == protocol_error, || {
            format!("expected close code ProtocolError: {closed}")
        });
    } else {
        failures.check(false, || {
            format!("expected an application close with ProtocolError, got {closed}")
        });
    }
    drop((first, second, third));

    // The real agent is unaffected: still online, and it runs a job.
    let agent = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{}", worker.id))
        .await?;
    failures.check(agent["status"] == "online", || {
        format!("the worker went offline: {agent}")
    });
    let job_id = cluster
        .run_single_job(&EventSpec::bash("after-garbage", "echo still-working").target(&worker.id))
        .await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    failures.check(job["status"] == "completed", || {
        format!("the job after the garbage: {job}")
    });
    failures.check(
        job["output"]
            .as_str()
            .unwrap_or_default()
            .contains("still-working"),
        || format!("job output: {job}"),
    );
    failures.check(cluster.agent_exit_status(&worker.id)?.is_none(), || {
        "the worker agent exited".into()
    });
    failures.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_and_stays_off() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("revoked").await?;
    let path = format!("/api/v1/agents/{}", agent.id);
    cluster
        .api()
        .delete(&path)
        .await?
        .expect_status(204, "revoke the agent")?;

    cluster
        .wait_until(
            Duration::from_secs(15),
            "the revoked agent offline (or gone)",
            || async {
                let response = cluster.api().get(&path).await?;
                Ok((response.status == 404
                    || (response.status == 200 && response.json["status"] == "offline"))
                    .then_some(()))
            },
        )
        .await?;

    // Revocation is fatal for the agent: it exits non-zero. If it keeps running, it must at least
    // never come back online during the observation window.
    let mut failures = Failures::default();
    let mut exit_status = None;
    let mut came_back: Option<Value> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = cluster.agent_exit_status(&agent.id)? {
            exit_status = Some(status);
            break;
        }
        let response = cluster.api().get(&path).await?;
        if response.status == 200 && response.json["status"] == "online" {
            came_back = Some(response.json);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    failures.check(came_back.is_none(), || {
        format!("the revoked agent came back online: {came_back:?}")
    });
    match exit_status {
        Some(status) => failures.check(!status.success(), || {
            format!("the revoked agent exited with success: {status}")
        }),
        None => eprintln!("note: the revoked agent kept running for 20 s (but stayed offline)"),
    }

    // Starting it again with the revoked identity does not bring it back.
    cluster.kill_agent(&agent.id)?;
    cluster.spawn_agent(&agent, &AgentOptions::default())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut exited = None;
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = cluster.agent_exit_status(&agent.id)? {
            exited = Some(status);
            break;
        }
        let response = cluster.api().get(&path).await?;
        if response.status == 200 && response.json["status"] == "online" {
            failures.check(false, || {
                format!("the restarted revoked agent came online: {}", response.json)
            });
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(status) = exited {
        failures.check(!status.success(), || {
            format!("the restarted revoked agent exited with success: {status}")
        });
    }

    failures.finish()
}
