//! SSH bootstrap end to end with the real binaries: a `cronium serve` with a signed release, a
//! real sshd the test starts, and `cronium server install-agent NAME` (the CLI streams the
//! progress): the agent is uploaded over SFTP, verified and installed by `install.sh` on the
//! "host", enrolls with a single-use token, comes online, and the server's jobs then run through
//! it. The detached agent is killed when the test ends.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::json_str;
use cronium_e2e::sshd::Sshd;
use serde_json::json;

/// Kills the agent the install started in the background (its pid file names it).
struct DetachedAgent(PathBuf);

impl Drop for DetachedAgent {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the pid the installer recorded.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronium_server_install_agent_bootstraps_a_server_over_ssh() -> Result<()> {
    let cluster = TestCluster::start().await?;
    cluster.publish_agent_release(None, None).await?;
    let sshd = Sshd::start()?;
    let server = cluster
        .api()
        .post(
            "/api/v1/servers",
            &json!({"name": "bootstrapped", "connection": "ssh", "labels": {"site": "lab"}, "ssh": {
                "host": "127.0.0.1", "port": sshd.port, "username": sshd.user,
                "auth": "key", "private_key": sshd.private_key(), "host_key": sshd.host_key(),
            }}),
        )
        .await?
        .expect_status(201, "create the server")?;
    let server_id = json_str(&server, "id")?;
    let prefix = cluster.dir().join("remote-prefix");
    let _agent = DetachedAgent(prefix.join("var/lib/cronium-agent/agent.pid"));

    let prefix_arg = prefix.to_str().context("prefix")?.to_owned();
    let output = cluster
        .cli(
            &[
                "server",
                "install-agent",
                "bootstrapped",
                "--service",
                "detached",
                "--prefix",
                &prefix_arg,
            ],
            Duration::from_secs(300),
        )
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(output.status.success(), "install-agent failed: {stderr}");
    for expected in [
        "[connect]",
        "[upload] uploading the signed agent",
        "signature verified",
        "[wait]",
        "now runs its jobs through it",
    ] {
        ensure!(stderr.contains(expected), "no {expected:?} in {stderr}");
    }
    ensure!(
        !stderr.contains("pinned host key"),
        "the host key was given up front: {stderr}"
    );
    let agent_id = stdout.trim().to_owned();

    let server = cluster
        .api()
        .get_ok(&format!("/api/v1/servers/{server_id}"))
        .await?;
    ensure!(server["connection"] == "agent", "{server}");
    ensure!(
        server["agent_id"] == agent_id.as_str(),
        "{server} vs {agent_id}"
    );
    let agent = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{agent_id}"))
        .await?;
    ensure!(agent["status"] == "online", "{agent}");
    ensure!(agent["name"] == "bootstrapped", "{agent}");
    ensure!(
        agent["labels"]["site"] == "lab",
        "the token carried the labels: {agent}"
    );

    // A job for the server runs on its new agent.
    let event = cluster
        .api()
        .post(
            "/api/v1/events",
            &json!({"name": "on-bootstrapped", "kind": "bash", "script": "echo bootstrapped-ok",
                    "targets": {"servers": ["bootstrapped"]}}),
        )
        .await?
        .expect_status(201, "create the event")?;
    let run = cluster.run_event(&json_str(&event, "id")?, None).await?;
    let job_id = run.single_job()?;
    let job = cluster
        .wait_job_final(&job_id, Duration::from_secs(60))
        .await?;
    ensure!(job["status"] == "completed", "{job}");
    ensure!(job["agent_id"] == agent_id.as_str(), "{job}");
    let logs = String::from_utf8_lossy(&cluster.job_logs(&job_id).await?).into_owned();
    ensure!(logs.contains("bootstrapped-ok"), "{logs}");

    // An unknown server is a clear CLI error.
    let output = cluster
        .cli(
            &["server", "install-agent", "nope"],
            Duration::from_secs(60),
        )
        .await?;
    ensure!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.contains("no server named \"nope\""), "{stderr}");
    Ok(())
}
