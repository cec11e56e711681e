//! What holds across replicas beyond jobs (issue 8), with real processes: the test starts its own
//! throwaway PostgreSQL cluster, so it runs in the SQLite pass of the suite too.
//!
//! Replicas A and B share one database and key; an agent is connected to A. A console's change
//! stream opened on B hears the agent come online, go offline (killed) and come back; B's
//! `/metrics` counts it in `cronium_agents_online` but not in `cronium_agents_connected` (this
//! replica's); revoking it through B's API closes its connection to A at once (the agent exits,
//! reporting the revocation), both replicas show it revoked and offline (and no longer list it),
//! and it cannot reconnect to either. And `cronium server install-agent` run through B, whose
//! agents are told to dial A, returns once the installed agent is connected to A (a real sshd,
//! `tests/src/sshd.rs`). Every wait polls or reads with a deadline.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::{AgentOptions, ClusterOptions, EnrolledAgent, json_str};
use cronium_e2e::postgres::PgCluster;
use cronium_e2e::sse::EventStream;
use cronium_e2e::sshd::Sshd;
use serde_json::{Value, json};

/// How long anything these tests wait for may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// What the agent logs when the control plane closes its connection as revoked.
const REVOKED_LOG: &str = "the control plane closed the connection (Revoked)";

fn options() -> ClusterOptions {
    ClusterOptions {
        lease_seconds: None,
        heartbeat_seconds: Some(1),
    }
}

/// The value of the unlabelled gauge `name` in `cluster`'s `/metrics`.
async fn gauge(cluster: &TestCluster, name: &str) -> Result<f64> {
    let metrics = cluster.api().get("/metrics").await?;
    ensure!(
        metrics.status == 200,
        "GET /metrics: {} {}",
        metrics.status,
        metrics.text
    );
    let prefix = format!("{name} ");
    let line = metrics
        .text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .with_context(|| format!("no {name} in {}", metrics.text))?;
    line.parse()
        .with_context(|| format!("{name} is not a number: {line}"))
}

/// Waits until `cluster`'s gauges `cronium_agents_connected` and `cronium_agents_online` are
/// `connected` and `online`.
async fn wait_gauges(cluster: &TestCluster, what: &str, connected: f64, online: f64) -> Result<()> {
    cluster
        .wait_until(DEADLINE, what, || async {
            let now = (
                gauge(cluster, "cronium_agents_connected").await?,
                gauge(cluster, "cronium_agents_online").await?,
            );
            Ok((now == (connected, online)).then_some(()))
        })
        .await
}

/// Reads `changes` until a `change` event about agent `id` (other notices are skipped; a
/// `resync` fails: it would hide whether the notice crossed).
async fn agent_notice(changes: &mut EventStream, id: &str, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (name, data) = changes
            .next(left)
            .await
            .with_context(|| format!("waiting for {what}"))?;
        match name.as_str() {
            "change" => {
                let change: Value = serde_json::from_str(&data)?;
                if change == json!({"kind": "agent", "id": id}) {
                    return Ok(());
                }
            }
            "resync" => bail!("the change stream asked for a resync while waiting for {what}"),
            _ => {}
        }
    }
}

/// Checks that `cluster` shows agent `id` revoked and offline: `GET /agents/{id}` says so, and
/// `GET /agents` (the agents not revoked) leaves it out.
async fn shown_revoked(cluster: &TestCluster, id: &str) -> Result<()> {
    let shown = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{id}"))
        .await?;
    ensure!(shown["status"] == "offline", "{shown}");
    ensure!(shown["revoked_at"].is_string(), "{shown}");
    let agents = cluster.api().get_ok("/api/v1/agents").await?;
    let listed = agents.as_array().context("the agents list")?;
    ensure!(
        !listed.iter().any(|agent| agent["id"] == id),
        "the revoked agent is listed: {agents}"
    );
    Ok(())
}

/// Starts the revoked `agent` under `cluster` and checks that it is refused: it exits non-zero
/// with the revocation in its log, and `cluster` never shows it online meanwhile.
async fn refused_again(cluster: &mut TestCluster, agent: &EnrolledAgent) -> Result<()> {
    let revoked_logs = cluster.logs_containing(REVOKED_LOG).len();
    cluster.spawn_agent(agent, &AgentOptions::default())?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = cluster.agent_exit_status(&agent.id)? {
            break status;
        }
        let shown = cluster
            .api()
            .get_ok(&format!("/api/v1/agents/{}", agent.id))
            .await?;
        ensure!(
            shown["status"] == "offline",
            "the revoked agent came back: {shown}"
        );
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the revoked agent neither exited nor came online within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(!status.success(), "the revoked agent exited with {status}");
    ensure!(
        cluster.logs_containing(REVOKED_LOG).len() > revoked_logs,
        "the restarted agent did not report its revocation:\n{}",
        cluster.log_tails()
    );
    cluster.kill_agent(&agent.id)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_is_announced_counted_and_revoked_through_b() -> Result<()> {
    // Declared first, dropped last: the control planes stop before their database.
    let postgres = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = postgres.create_database()?;
    let mut a = TestCluster::start_on_database(options(), &url).await?;
    let mut b = TestCluster::start_replica_of(&a).await?;

    // A console on B, subscribed before the agent connects to A.
    let mut changes = EventStream::open(b.api(), "/api/v1/changes").await?;
    let (first, _) = changes.next(DEADLINE).await?;
    ensure!(first == "ready", "the change stream began with {first}");

    let agent = a.enroll_agent("on-a", &[]).await?;
    a.start_agent(&agent, &AgentOptions::default()).await?;
    agent_notice(
        &mut changes,
        &agent.id,
        "B's notice of the agent online on A",
    )
    .await?;
    b.wait_agent_online(&agent.id, DEADLINE).await?;

    // This replica's connections, and the agents online on any replica.
    wait_gauges(&b, "B to count the agent on A as online only", 0.0, 1.0).await?;
    wait_gauges(&a, "A to count its agent", 1.0, 1.0).await?;

    // Killed, it goes offline on A: B's console hears that too; then it comes back.
    a.kill_agent(&agent.id)?;
    agent_notice(
        &mut changes,
        &agent.id,
        "B's notice of the agent offline on A",
    )
    .await?;
    wait_gauges(&b, "B to count no agent", 0.0, 0.0).await?;
    a.start_agent(&agent, &AgentOptions::default()).await?;
    agent_notice(&mut changes, &agent.id, "B's notice of the agent back on A").await?;
    wait_gauges(&b, "B to count the agent on A again", 0.0, 1.0).await?;

    // Revoked through B: A closes the agent's connection at once, and the agent (revocation is
    // fatal for it) exits saying why.
    b.api()
        .delete(&format!("/api/v1/agents/{}", agent.id))
        .await?
        .expect_status(204, "revoke the agent through B")?;
    let status = a.wait_agent_exit(&agent.id, DEADLINE).await?;
    ensure!(!status.success(), "the revoked agent exited with {status}");
    ensure!(
        !a.logs_containing(REVOKED_LOG).is_empty(),
        "the agent did not report its revocation:\n{}",
        a.log_tails()
    );
    // (Announced by B's revocation, and by A when the connection ended.)
    agent_notice(&mut changes, &agent.id, "B's notice of the revoked agent").await?;
    for replica in [&a, &b] {
        shown_revoked(replica, &agent.id).await?;
    }
    wait_gauges(&a, "A to count no agent", 0.0, 0.0).await?;
    wait_gauges(&b, "B to count no agent", 0.0, 0.0).await?;

    // It cannot reconnect to A, nor, pointed at B, to B.
    a.kill_agent(&agent.id)?;
    refused_again(&mut a, &agent).await?;
    let path = agent.state_dir.join("agent.json");
    let mut identity: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    identity["server_url"] = json!(b.http_url());
    identity["quic_addrs"] = json!([b.quic_addr().to_string()]);
    std::fs::write(&path, serde_json::to_vec_pretty(&identity)?)?;
    refused_again(&mut b, &agent).await?;
    for replica in [&a, &b] {
        shown_revoked(replica, &agent.id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_agent_through_b_returns_once_the_agent_is_online_on_a() -> Result<()> {
    let postgres = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = postgres.create_database()?;
    let a = TestCluster::start_on_database(options(), &url).await?;
    // B tells the agents it enrolls to dial A (as a load balancer in front of the replicas may).
    let a_quic = a.quic_addr().to_string();
    let b = TestCluster::start_replica_of_with_args(&a, &["--quic-public-addrs", &a_quic]).await?;
    b.publish_agent_release(None, None).await?;
    let sshd = Sshd::start()?;
    let server = b
        .add_ssh_server("installed-via-b", json!({}), &sshd)
        .await?;
    let server_id = json_str(&server, "id")?;
    let (output, _agent) = b.install_agent_detached("installed-via-b").await?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "install-agent through B failed: {stderr}"
    );
    ensure!(
        stderr.contains("now runs its jobs through it"),
        "no switch in {stderr}"
    );
    let agent_id = String::from_utf8_lossy(&output.stdout).trim().to_owned();

    // The agent is connected to A, not to B; B switched the server to it.
    wait_gauges(&a, "A to hold the installed agent", 1.0, 1.0).await?;
    ensure!(gauge(&b, "cronium_agents_connected").await? == 0.0);
    let shown = b
        .api()
        .get_ok(&format!("/api/v1/agents/{agent_id}"))
        .await?;
    ensure!(shown["status"] == "online", "{shown}");
    let server = b
        .api()
        .get_ok(&format!("/api/v1/servers/{server_id}"))
        .await?;
    ensure!(server["connection"] == "agent", "{server}");
    ensure!(server["agent_id"] == agent_id.as_str(), "{server}");
    Ok(())
}
