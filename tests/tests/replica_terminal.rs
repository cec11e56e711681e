//! A terminal opened on replica B for an agent connected to replica A, relayed B → A (issue 8),
//! with real processes: the test starts its own throwaway PostgreSQL cluster, so it runs in the
//! SQLite pass of the suite too.
//!
//! Replicas A and B share one database and key; the agent is connected to A. Through B: a
//! command's output comes back, a resize reaches the PTY, the session counts once against the
//! per-user limit (a second terminal is refused on both replicas), a detached session is
//! re-attached through B and through A, `exit` ends it with the exit message; the recording is
//! written by A and downloaded through B. Forged relay tokens on A's internal route are refused
//! with 401 and open nothing. Last, A is SIGKILLed under a viewer on B, who is told the agent's
//! link is gone. Every wait polls with a deadline.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cronium_e2e::TestCluster;
use cronium_e2e::cluster::{AgentOptions, ClusterOptions};
use cronium_e2e::postgres::PgCluster;
use cronium_e2e::terminal_client::Terminal;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

/// How long B may take to learn where the agent is, and anything else to happen.
const DEADLINE: Duration = Duration::from_secs(60);

/// The header of the replicas' relay tokens.
const RELAY_HEADER: &str = "x-cronium-relay-token";

/// The HTTP status of a WebSocket handshake to `url` with `headers` that must be refused.
async fn refused_handshake(url: &str, headers: &[(&str, &str)]) -> Result<u16> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request)).await {
        Err(_) => bail!("the handshake to {url} did not finish"),
        Ok(Ok(_)) => bail!("the WebSocket to {url} was accepted"),
        Ok(Err(tungstenite::Error::Http(response))) => Ok(response.status().as_u16()),
        Ok(Err(error)) => Err(error).context("WebSocket handshake"),
    }
}

/// The status with which `cluster` refuses a new terminal on `agent` as the admin.
async fn refused_terminal(cluster: &TestCluster, agent: &str) -> Result<u16> {
    let url = format!(
        "{}/api/v1/agents/{agent}/terminal?cols=80&rows=24",
        cluster.http_url().replace("http://", "ws://")
    );
    let bearer = format!("Bearer {}", cluster.admin_token());
    refused_handshake(&url, &[("authorization", &bearer)]).await
}

/// The session `id` as `GET /terminal-sessions` on `cluster` lists it.
async fn session_entry(cluster: &TestCluster, id: &str) -> Result<Value> {
    let sessions = cluster.api().get_ok("/api/v1/terminal-sessions").await?;
    sessions
        .as_array()
        .context("the sessions list")?
        .iter()
        .find(|session| session["id"] == id)
        .cloned()
        .with_context(|| format!("session {id} is not listed: {sessions}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_opened_on_b_is_relayed_to_the_agent_on_a() -> Result<()> {
    // Declared first, dropped last: the control planes stop before their database.
    let postgres = tokio::task::spawn_blocking(PgCluster::start).await??;
    let url = postgres.create_database()?;
    let options = ClusterOptions {
        lease_seconds: None,
        heartbeat_seconds: Some(1),
    };
    let mut a = TestCluster::start_on_database_with_args(
        options,
        &url,
        &["--terminal-recording", "--terminal-max-per-user", "1"],
    )
    .await?;
    let b = TestCluster::start_replica_of(&a).await?;
    let agent = a.enroll_agent("relayed", &[]).await?;
    a.start_agent(&agent, &AgentOptions::default()).await?;
    b.api()
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/agents/{}", agent.id),
            Some(&json!({"record_terminals": true})),
        )
        .await?
        .expect_status(200, "opt the agent into recordings")?;

    // Through B, as soon as B sees the agent on A (until then B answers 409: offline).
    let mut terminal = b
        .wait_until(DEADLINE, "a terminal through B", || async {
            Terminal::open(&b, &agent.id).await.map(Some)
        })
        .await?;
    let session = terminal.session().to_owned();
    terminal.send(b"echo relay-$((6*7))\r").await?;
    terminal.read_until("relay-42").await?;
    terminal
        .control(json!({"type": "resize", "cols": 91, "rows": 17}))
        .await?;
    terminal.send(b"stty size\r").await?;
    terminal.read_until("17 91").await?;

    // One session, in the shared database, counted once: the per-user limit (1) refuses a
    // second terminal on both replicas.
    let entry = session_entry(&b, &session).await?;
    ensure!(entry["live"] == true, "{entry}");
    ensure!(entry["agent_id"] == json!(agent.id), "{entry}");
    for (name, replica) in [("A", &a), ("B", &b)] {
        let status = refused_terminal(replica, &agent.id).await?;
        ensure!(status == 429, "a second terminal on {name}: {status}");
    }

    // Detached (the socket dropped), then re-attached through B and through A: one session.
    drop(terminal);
    let query = format!("cols=91&rows=17&session={session}");
    let mut again = Terminal::open_query(&b, &agent.id, &query).await?;
    ensure!(
        again.session() == session,
        "re-attached to {}",
        again.session()
    );
    again.send(b"echo again-$((2*3))\r").await?;
    again.read_until("again-6").await?;
    drop(again);
    let mut direct = Terminal::open_query(&a, &agent.id, &query).await?;
    ensure!(
        direct.session() == session,
        "attached on A to {}",
        direct.session()
    );
    direct.send(b"echo direct-$((3*3))\r").await?;
    direct.read_until("direct-9").await?;
    drop(direct);

    // `exit` through B ends it: the exit message, and the session closed for both replicas.
    let mut last = Terminal::open_query(&b, &agent.id, &query).await?;
    last.send(b"exit 3\r").await?;
    let control = last.next_control().await?;
    ensure!(
        control == json!({"type": "exit", "code": 3}),
        "expected the exit, got {control}"
    );
    for replica in [&a, &b] {
        replica
            .wait_until(DEADLINE, "the session closed", || async {
                let entry = session_entry(replica, &session).await?;
                Ok((entry["live"] == false && entry["exit_code"] == 3).then_some(()))
            })
            .await?;
    }

    // The recording: written by A (which held the agent's stream), downloaded through B.
    let file = format!("recordings/{session}.cast");
    ensure!(a.data_dir().join(&file).exists(), "A has no {file}");
    ensure!(!b.data_dir().join(&file).exists(), "B wrote {file}");
    let recording = b
        .api()
        .get(&format!("/api/v1/terminal-sessions/{session}/recording"))
        .await?;
    ensure!(
        recording.status == 200,
        "the recording through B: {} {}",
        recording.status,
        recording.text
    );
    let mut lines = recording.text.lines();
    let header: Value = serde_json::from_str(lines.next().context("an empty recording")?)?;
    ensure!(header["version"] == 2, "{header}");
    let events = lines.collect::<Vec<_>>().join("\n");
    for needle in ["relay-42", "again-6", "direct-9", "\"r\",\"91x17\""] {
        ensure!(
            events.contains(needle),
            "{needle} not in the recording: {events}"
        );
    }

    // Nothing but a genuine relay token opens a terminal on A's internal route: a forged one
    // is refused before the upgrade, and no session is recorded.
    let before = b
        .api()
        .get_ok("/api/v1/terminal-sessions")
        .await?
        .as_array()
        .map(Vec::len);
    let claims = json!({
        "replica": "replica-guessed", "exp": chrono::Utc::now().timestamp_millis() + 5_000,
        "nonce": "0".repeat(32),
        "grant": {"purpose": "terminal", "agent": agent.id, "user": "admin", "session": null,
                  "cols": 80, "rows": 24},
    });
    let forged = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(cronium_e2e::random_bytes(32))
    );
    let internal = format!(
        "{}/api/v1/internal/terminals/relay",
        a.http_url().replace("http://", "ws://")
    );
    let bearer = format!("Bearer {}", a.admin_token());
    for headers in [
        vec![],
        vec![(RELAY_HEADER, "not-a-token")],
        vec![(RELAY_HEADER, forged.as_str())],
        // The API's credentials are no use there.
        vec![("authorization", bearer.as_str())],
    ] {
        let status = refused_handshake(&internal, &headers).await?;
        ensure!(status == 401, "{headers:?}: {status}");
    }
    let plain = a
        .api()
        .request(reqwest::Method::GET, "/api/v1/internal/terminals/recording")
        .header(RELAY_HEADER, forged.as_str())
        .send()
        .await?;
    ensure!(plain.status() == 401, "a recording with a forged token");
    let after = b
        .api()
        .get_ok("/api/v1/terminal-sessions")
        .await?
        .as_array()
        .map(Vec::len);
    ensure!(
        before == after,
        "sessions before {before:?}, after {after:?}"
    );

    // A dies under a viewer on B: the viewer is told the agent's link is gone.
    let mut viewer = Terminal::open(&b, &agent.id).await?;
    viewer.send(b"echo alive-$((4*4))\r").await?;
    viewer.read_until("alive-16").await?;
    a.kill_control_plane()?;
    let control = viewer.next_control().await?;
    ensure!(
        control == json!({"type": "detached", "reason": "agent_disconnected"}),
        "expected the detach, got {control}"
    );
    Ok(())
}
