//! `GET /changes` through the real router: a job's state change arrives (a bare log-append
//! notification does not), a real agent coming online and going offline arrives, a USER never
//! hears of another user's objects (an admin does), a stream that falls behind gets `resync`,
//! and a stream the client dropped lets go of its subscription.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{Api, SseStream, api};
use crate::changes::{Audience, BUFFER, Kind};
use crate::store::users::Role;

/// A `GET /changes` stream.
struct Changes {
    stream: SseStream,
}

impl Changes {
    /// Opens the stream and reads its `ready` event (the subscription exists).
    async fn open(api: &Api, token: &str) -> Self {
        let mut changes = Changes {
            stream: SseStream::open(api, "/api/v1/changes", token).await,
        };
        assert_eq!(changes.next().await, ("ready".to_string(), json!({})));
        changes
    }

    /// The next event's name and data. Fails after 30 s (a stream that stalls or closed).
    async fn next(&mut self) -> (String, Value) {
        self.stream.next().await.expect("the changes stream closed")
    }

    /// Skips events until a `change` of `kind` and `id`; returns the events skipped.
    async fn until(&mut self, kind: &str, id: &str) -> Vec<(String, Value)> {
        let wanted = ("change".to_string(), json!({"kind": kind, "id": id}));
        let mut skipped = Vec::new();
        loop {
            let event = self.next().await;
            if event == wanted {
                return skipped;
            }
            skipped.push(event);
        }
    }
}

/// Creates a server through the API; returns its id.
async fn create_server(api: &Api, token: &str, name: &str) -> String {
    let body = json!({"name": name, "address": "10.0.0.1", "connection": "ssh",
        "ssh": {"host": "10.0.0.1", "username": "root", "auth": "password", "password": "pw"}})
    .to_string();
    let (status, server) = api
        .send(Method::POST, "/api/v1/servers", Some(token), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{server}");
    server["id"].as_str().unwrap().to_string()
}

/// An event of the token's user on one agent and one run of it: (event id, run id, job id).
async fn run_once(api: &Api, token: &str, agent: &str) -> (String, String, String) {
    let body = json!({"name": format!("job-on-{agent}"), "kind": "bash", "script": "true",
        "targets": {"agents": [agent]}})
    .to_string();
    let (status, event) = api
        .send(Method::POST, "/api/v1/events", Some(token), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let event_id = event["id"].as_str().unwrap().to_string();
    let (status, run) = api
        .send(
            Method::POST,
            &format!("/api/v1/events/{event_id}/runs"),
            Some(token),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let run_id = run["run_id"].as_str().unwrap().to_string();
    let job_id = run["jobs"][0]["id"].as_str().unwrap().to_string();
    (event_id, run_id, job_id)
}

async fn cancel(api: &Api, token: &str, job_id: &str) {
    let (status, body) = api
        .send(
            Method::POST,
            &format!("/api/v1/jobs/{job_id}/cancel"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// Waits until `count` streams are subscribed.
async fn wait_subscribers(api: &Api, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.state().changes.subscribers() != count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} subscribers, expected {count}",
            api.state().changes.subscribers()
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn job_changes_arrive_for_their_owner_and_admins_only() {
    let api = api().await;
    let admin = api.token("root", Role::Admin).await;
    let alice = api.token("alice", Role::User).await;
    let bob = api.token("bob", Role::User).await;
    api.state().store.enroll_test_agent("web-1").await;
    let base = api.state().changes.subscribers();
    let mut admin_stream = Changes::open(&api, &admin).await;
    let mut alice_stream = Changes::open(&api, &alice).await;
    let mut bob_stream = Changes::open(&api, &bob).await;
    assert_eq!(api.state().changes.subscribers(), base + 3);

    // alice's event, run and job: announced to her and the admin.
    // (The event's own notice may come before or after them: another window, or sorted.)
    let (_event_id, run_id, job_id) = run_once(&api, &alice, "web-1").await;
    alice_stream.until("job", &job_id).await;
    let (name, run) = alice_stream.next().await;
    assert_eq!(
        (name.as_str(), run),
        ("change", json!({"kind": "run", "id": run_id}))
    );
    admin_stream.until("job", &job_id).await;

    // A notification without a state change (a log append) is not announced; the cancel is.
    api.state().job_events.notify(&job_id);
    let marker = create_server(&api, &alice, "marker").await;
    let skipped = alice_stream.until("server", &marker).await;
    assert!(
        skipped.iter().all(|(_, data)| data["kind"] != "job"),
        "a job without a state change was announced: {skipped:?}"
    );
    cancel(&api, &alice, &job_id).await;
    alice_stream.until("job", &job_id).await;
    admin_stream.until("job", &job_id).await;

    // bob's first notice is about his own server: nothing of alice's reached him, although
    // every notice of hers above was sent before it.
    let own = create_server(&api, &bob, "own").await;
    admin_stream.until("server", &own).await;
    assert_eq!(
        bob_stream.next().await,
        ("change".to_string(), json!({"kind": "server", "id": own}))
    );

    // A deleted object's notice (its owner still known) reaches the owner only.
    let (status, _) = api
        .send(
            Method::DELETE,
            &format!("/api/v1/servers/{marker}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    alice_stream.until("server", &marker).await;
    let other = create_server(&api, &bob, "other").await;
    assert_eq!(
        bob_stream.next().await,
        ("change".to_string(), json!({"kind": "server", "id": other}))
    );

    // Streams the clients dropped let go of their subscriptions (no task outlives them).
    drop((admin_stream, alice_stream, bob_stream));
    wait_subscribers(&api, base).await;
}

#[tokio::test]
async fn an_agent_coming_online_and_going_offline_arrives() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let mut stream = Changes::open(&api, &alice).await;

    let agent_dir = tempfile::tempdir().unwrap();
    let created = crate::http::enrollment::create_token(
        api.state(),
        &crate::http::enrollment::CreateRequest::default(),
        None,
    )
    .await
    .map_err(|error| format!("{error:?}"))
    .unwrap();
    let url = api.running.local_url();
    let mut identity = cronium_agent::enroll(cronium_agent::EnrollOptions {
        server_url: url.clone(),
        token: created.token,
        ca_sha256: api.running.ca_sha256(),
        name: Some("pushed".into()),
        labels: Default::default(),
        state_dir: agent_dir.path().to_path_buf(),
        force: true,
    })
    .await
    .unwrap();
    identity.quic_addrs = vec![api.running.quic_addr.to_string()];
    identity.server_url = url;
    identity.save_settings().unwrap();
    let agent_id = identity.agent_id.clone();

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(cronium_agent::run(
        cronium_agent::AgentOptions {
            state_dir: agent_dir.path().to_path_buf(),
            capacity: 1,
            max_log_bytes: 1024 * 1024,
            reconnect_max: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            force_stop: CancellationToken::new(),
            allow_run_as: Vec::new(),
        },
        shutdown.clone(),
    ));
    stream.until("agent", &agent_id).await;
    let (status, shown) = api
        .send(
            Method::GET,
            &format!("/api/v1/agents/{agent_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["status"], "online", "{shown}");

    shutdown.cancel();
    agent.await.unwrap().unwrap();
    stream.until("agent", &agent_id).await;
    let (_, shown) = api
        .send(
            Method::GET,
            &format!("/api/v1/agents/{agent_id}"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(shown["status"], "offline", "{shown}");
}

#[tokio::test]
async fn a_stream_that_falls_behind_gets_resync() {
    let api = api().await;
    let admin = api.token("root", Role::Admin).await;
    let mut stream = Changes::open(&api, &admin).await;

    // More notices than a stream may fall behind by, while this stream is not read; a probe
    // subscribed alongside sees the broadcast overrun its buffer too.
    let mut probe = api.state().changes.subscribe();
    for index in 0..BUFFER + 10 {
        api.state().changes.notify(
            Kind::Server,
            &format!("server-{index:05}"),
            Audience::Admins,
        );
    }
    loop {
        match probe.recv().await {
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => break,
            Err(RecvError::Closed) => panic!("the hub stopped"),
        }
    }
    assert_eq!(stream.next().await, ("resync".to_string(), json!({})));
    // The stream goes on with what is still buffered: the newest notices.
    let (name, data) = stream.next().await;
    assert_eq!(name, "change");
    assert_eq!(data["kind"], "server");
    stream
        .until("server", &format!("server-{:05}", BUFFER + 9))
        .await;
}
