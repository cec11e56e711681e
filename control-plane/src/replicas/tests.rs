//! In-process replicas on one PostgreSQL database (a throwaway cluster of the test's own, or a
//! database on the suite's server in the PostgreSQL pass), so these run in both passes: job
//! changes cross to the other replica, the scheduler has one leader and another replica takes
//! over when it stops, and a listener that lost its connection wakes its agents after it
//! reconnected (a job whose notification nobody heard is not stranded); replicas register in the
//! replica registry, tell their agents each other's addresses and retire when stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cronium_e2e::postgres::{PgCluster, SERVER_URL_VAR, create_database_on};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::crypto::EncryptionKey;
use crate::store::jobs::NewRun;
use crate::{Running, ServerConfig};

/// How long anything these tests wait for may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// A fresh PostgreSQL database, and the cluster it is on when the test started one.
async fn database() -> (Option<PgCluster>, String) {
    if let Ok(server) = std::env::var(SERVER_URL_VAR) {
        return (None, create_database_on(&server).expect("a test database"));
    }
    let cluster = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .unwrap()
        .expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database().expect("a test database");
    (Some(cluster), url)
}

/// A replica on `url` with its own data dir.
async fn replica(dir: &Path, url: &str, key: &str) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ServerConfig {
        database_url: Some(url.to_owned()),
        ..ServerConfig::for_tests(dir, key)
    };
    crate::start(config, CancellationToken::new())
        .await
        .unwrap()
}

/// Polls `check` until it holds or [`DEADLINE`] passes.
async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `receiver` gets `job_id` (other ids are skipped), at most `within`.
async fn received(
    receiver: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<str>>,
    job_id: &str,
    within: Duration,
) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match receiver.recv().await {
                Ok(id) if &*id == job_id => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await
                }
            }
        }
    })
    .await
    .is_ok()
}

/// Waits until the two replicas' listeners hear each other (a replica's listener connects
/// after its start returned): `from`'s job notifications reach `to`.
async fn wait_connected(from: &Running, to: &Running) {
    let mut receiver = to.state.job_events.subscribe();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        from.state.job_events.notify("probe");
        if received(&mut receiver, "probe", Duration::from_millis(200)).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replicas do not hear each other"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_changes_cross_replicas_and_a_stopped_leader_is_replaced() {
    let (_cluster, url) = database().await;
    let key = EncryptionKey::generate_base64();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = replica(dirs[0].path(), &url, &key).await;
    let b = replica(dirs[1].path(), &url, &key).await;
    assert_eq!(a.ca_sha256(), b.ca_sha256());
    assert_ne!(a.state.replicas.id(), b.state.replicas.id());
    wait_connected(&a, &b).await;
    wait_connected(&b, &a).await;

    // A job change announced on A reaches B's followers, and the other way round.
    let mut on_b = b.state.job_events.subscribe();
    a.state.job_events.notify("job-from-a");
    assert!(received(&mut on_b, "job-from-a", DEADLINE).await);
    let mut on_a = a.state.job_events.subscribe();
    b.state.job_events.notify("job-from-b");
    assert!(received(&mut on_a, "job-from-b", DEADLINE).await);

    // One leader. It stops; the other takes over.
    wait_for("a scheduler leader", async || {
        a.state.replicas.is_leader() || b.state.replicas.is_leader()
    })
    .await;
    assert!(
        !(a.state.replicas.is_leader() && b.state.replicas.is_leader()),
        "two leaders"
    );
    let (leader, follower) = if a.state.replicas.is_leader() {
        (a, b)
    } else {
        (b, a)
    };
    leader.state.shutdown.cancel();
    leader.wait().await;
    wait_for("the follower to lead", async || {
        follower.state.replicas.is_leader()
    })
    .await;
    follower.state.shutdown.cancel();
    follower.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_register_tell_agents_of_each_other_and_retire_when_stopped() {
    let (_cluster, url) = database().await;
    let key = EncryptionKey::generate_base64();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = replica(dirs[0].path(), &url, &key).await;
    let b = replica(dirs[1].path(), &url, &key).await;
    let (a_quic, b_quic) = (a.quic_addr.to_string(), b.quic_addr.to_string());

    // Each announced itself at start, with its QUIC addresses and its HTTP listener as relay URL.
    let live = a
        .state
        .store
        .live_replicas(crate::store::now_ms(), 60_000)
        .await
        .unwrap();
    let mut seen: Vec<(String, Vec<String>, String)> = live
        .into_iter()
        .map(|replica| (replica.id, replica.quic_addrs, replica.relay_url))
        .collect();
    seen.sort();
    let mut expected = vec![
        (
            a.state.replicas.id().to_owned(),
            vec![a_quic.clone()],
            a.local_url(),
        ),
        (
            b.state.replicas.id().to_owned(),
            vec![b_quic.clone()],
            b.local_url(),
        ),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(a.state.config.relay_url, a.local_url());

    // B, started second, tells its agents both (itself first) from the start; A learns of B
    // at its next refresh.
    assert_eq!(
        *b.state.replicas.agent_addrs().borrow(),
        [b_quic.clone(), a_quic.clone()]
    );
    let on_a = a.state.replicas.agent_addrs();
    wait_for("A to learn B's address", async || {
        *on_a.borrow() == [a_quic.clone(), b_quic.clone()]
    })
    .await;

    // A graceful stop retires B's row at once; A stops telling its agents about B.
    let b_id = b.state.replicas.id().to_owned();
    b.state.shutdown.cancel();
    b.wait().await;
    assert_eq!(a.state.store.replica(&b_id).await.unwrap(), None);
    wait_for("A to forget B's address", async || {
        *on_a.borrow() == [a_quic.clone()]
    })
    .await;
    a.state.shutdown.cancel();
    a.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_reconnects_wakes_its_agents() {
    let (_cluster, url) = database().await;
    let key = EncryptionKey::generate_base64();
    let dir = tempfile::tempdir().unwrap();
    let running = replica(&dir.path().join("data"), &url, &key).await;
    let state = running.state.clone();
    let token = crate::cli::create_api_token(&state.store, "admin", "test")
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let base = running.local_url();
    let api = async |method: reqwest::Method, path: &str, body: Option<Value>| -> Value {
        let mut request = client
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    };

    // An in-process agent connected to this replica.
    let agent_dir = tempfile::tempdir().unwrap();
    let created = crate::http::enrollment::create_token(
        &state,
        &crate::http::enrollment::CreateRequest::default(),
        None,
    )
    .await
    .map_err(|error| format!("{error:?}"))
    .unwrap();
    let mut identity = cronium_agent::enroll(cronium_agent::EnrollOptions {
        server_url: base.clone(),
        token: created.token,
        ca_sha256: running.ca_sha256(),
        name: Some("woken".into()),
        labels: Default::default(),
        state_dir: agent_dir.path().to_path_buf(),
        force: true,
    })
    .await
    .unwrap();
    identity.quic_addrs = vec![running.quic_addr.to_string()];
    identity.save_settings().unwrap();
    let agent_id = identity.agent_id.clone();
    let agent_shutdown = CancellationToken::new();
    let agent = tokio::spawn(cronium_agent::run(
        cronium_agent::AgentOptions {
            state_dir: agent_dir.path().to_path_buf(),
            capacity: 2,
            max_log_bytes: 1024 * 1024,
            reconnect_max: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            force_stop: CancellationToken::new(),
            allow_run_as: Vec::new(),
        },
        agent_shutdown.clone(),
    ));

    // A first job through the API (woken as usual): afterwards the agent is idle and claims
    // again only when woken.
    let event = api(
        reqwest::Method::POST,
        "/api/v1/events",
        Some(json!({"name": "e", "kind": "bash", "script": "true",
            "targets": {"agents": ["woken"]}})),
    )
    .await;
    let event_id = event["id"].as_str().unwrap().to_owned();
    let run = api(
        reqwest::Method::POST,
        &format!("/api/v1/events/{event_id}/runs"),
        Some(json!({})),
    )
    .await;
    let first = run["jobs"][0]["id"].as_str().unwrap().to_owned();
    wait_for("the first job to complete", async || {
        state.store.job(&first).await.unwrap().status.as_str() == "completed"
    })
    .await;

    // A job written without any wake-up, as if its notification had been lost.
    let owner = state.store.event(&event_id).await.unwrap().owner_id;
    let (_, jobs) = state
        .store
        .create_run(NewRun {
            event_id: &event_id,
            kind: "bash",
            script: "true",
            env: &BTreeMap::new(),
            runtime_spec: None,
            input: None,
            timeout_seconds: 60,
            max_attempts: 1,
            created_by: &owner,
            agent_ids: std::slice::from_ref(&agent_id),
        })
        .await
        .unwrap();
    let (stranded, _) = jobs[0].clone();

    // The listener's connection is cut; it connects again and wakes every local agent.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let terminated: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
         AND query LIKE 'LISTEN %') AS terminated",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(terminated, 1, "one listener connection");
    wait_for("the stranded job to complete", async || {
        state.store.job(&stranded).await.unwrap().status.as_str() == "completed"
    })
    .await;

    agent_shutdown.cancel();
    let _ = agent.await;
    state.shutdown.cancel();
    running.wait().await;
}
