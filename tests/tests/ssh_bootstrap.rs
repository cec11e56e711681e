//! SSH bootstrap end to end with the real binaries: a `cronium serve` with a signed release, a
//! real sshd the test starts, and `cronium server install-agent NAME` (the CLI streams the
//! progress): the agent is uploaded over SFTP, verified and installed by `install.sh` on the
//! "host", enrolls with a single-use token, comes online, and the server's jobs then run through
//! it. The detached agent is killed when the test ends.

use std::time::Duration;

use anyhow::{Result, ensure};
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::json_str;
use cronium_e2e::sshd::Sshd;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronium_server_install_agent_bootstraps_a_server_over_ssh() -> Result<()> {
    let cluster = TestCluster::start().await?;
    cluster.publish_agent_release(None, None).await?;
    let sshd = Sshd::start()?;
    let server = cluster
        .add_ssh_server("bootstrapped", json!({"site": "lab"}), &sshd)
        .await?;
    let server_id = json_str(&server, "id")?;
    let (output, _agent) = cluster.install_agent_detached("bootstrapped").await?;
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
