//! Operations with the real binaries: `--log-format json` / `CRONIUM_LOG_FORMAT=json` make every
//! log line of `cronium serve` and `cronium-agent run` one JSON object, and `GET /metrics`
//! answers over the real HTTP listener.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cronium_e2e::{AgentOptions, ClusterOptions, EventSpec, TestCluster};
use serde_json::Value;

/// Lines the harness writes into a process log itself (its command line).
const HARNESS_PREFIX: &str = "==== ";

/// The lines `cronium serve` prints on stdout (the harness logs stdout and stderr to one file):
/// what it prints for humans, not log lines.
const SERVE_STDOUT: [&str; 2] = ["cronium ready ", "first start: created user admin"];

/// Checks that every log line of `path` (all but the harness's and `stdout_lines`) is a JSON
/// object with a level, a message, a timestamp and a target; returns the parsed lines.
fn json_lines(path: &Path, stdout_lines: &[&str]) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.starts_with(HARNESS_PREFIX)
            || stdout_lines.iter().any(|prefix| line.starts_with(prefix))
        {
            continue;
        }
        let parsed: Value = serde_json::from_str(line)
            .with_context(|| format!("a line of {} is not JSON: {line:?}", path.display()))?;
        let level = parsed["level"].as_str().unwrap_or("");
        if !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level)
            || !parsed["message"].is_string()
            || !parsed["timestamp"].is_string()
            || !parsed["target"].is_string()
        {
            bail!(
                "a line of {} lacks level/message/timestamp/target: {line}",
                path.display()
            );
        }
        lines.push(parsed);
    }
    Ok(lines)
}

fn has_message(lines: &[Value], message: &str) -> bool {
    lines.iter().any(|line| line["message"] == message)
}

#[tokio::test]
async fn json_logs_of_serve_and_the_agent_are_one_object_per_line() -> Result<()> {
    let mut cluster =
        TestCluster::start_with_args(ClusterOptions::default(), &["--log-format", "json"]).await?;
    let agent = cluster.enroll_agent("json-logs", &[]).await?;
    let options = AgentOptions {
        env: vec![("CRONIUM_LOG_FORMAT".to_owned(), "json".to_owned())],
        ..AgentOptions::default()
    };
    cluster.start_agent(&agent, &options).await?;
    let job = cluster
        .run_single_job(&EventSpec::bash("logged", "echo logged").target("json-logs"))
        .await?;
    let done = cluster
        .wait_job_final(&job, Duration::from_secs(60))
        .await?;
    assert_eq!(done["status"], "completed", "{done}");

    // The metrics of the real listener (the harness's token is an admin's).
    let metrics = cluster.api().get("/metrics").await?;
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    assert!(
        metrics.text.contains("cronium_agents_connected 1\n"),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("cronium_jobs_finished_total{status=\"completed\",reason=\"none\"} 1\n"),
        "{}",
        metrics.text
    );

    // A graceful stop logs too, and exits cleanly.
    cluster.signal_agent(&agent.id, libc::SIGTERM)?;
    let status = cluster
        .wait_agent_exit(&agent.id, Duration::from_secs(30))
        .await?;
    assert!(status.success(), "the agent exited with {status}");

    let control_plane = json_lines(&cluster.dir().join("control-plane.log"), &SERVE_STDOUT)?;
    assert!(
        has_message(&control_plane, "control plane started"),
        "{control_plane:#?}"
    );
    let agent_log = cluster.dir().join("agent-json-logs-1.log");
    let agent_lines = json_lines(&agent_log, &[])?;
    assert!(
        has_message(&agent_lines, "agent stopped"),
        "{agent_lines:#?}"
    );

    // A failing start reports its error as a JSON line too.
    let data_dir = cluster.dir().join("refused");
    let data_dir = data_dir.to_string_lossy();
    let output = cluster
        .cli_with_env(
            &[
                "serve",
                "--log-format",
                "json",
                "--data-dir",
                &data_dir,
                "--http",
                "127.0.0.1:0",
                "--quic",
                "127.0.0.1:0",
            ],
            &[("ENCRYPTION_KEY", "not-base64")],
            Duration::from_secs(30),
        )
        .await?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().context("serve printed nothing")?;
    let error: Value = serde_json::from_str(last).with_context(|| format!("{stderr}"))?;
    assert_eq!(error["level"], "ERROR", "{stderr}");
    assert_eq!(error["message"], "cronium stopped", "{stderr}");
    assert!(
        !stderr.contains("not-base64"),
        "the key appeared in the output: {stderr}"
    );
    Ok(())
}
