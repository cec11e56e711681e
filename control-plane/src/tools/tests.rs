//! Tests of tools and notifications: configuration checks, the API through the real router, and
//! delivery to a real HTTP endpoint on 127.0.0.1 (payloads, signature, retries, restarts).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::IntoResponse;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::*;
use crate::store::tools::{Notification, NotificationStatus};

mod smtp;
use crate::store::users::Role;
use crate::{Running, ServerConfig};

fn config(url: &str) -> ToolConfig {
    ToolConfig {
        url: url.into(),
        headers: BTreeMap::new(),
        secret: None,
    }
}

#[test]
fn urls_are_checked_per_kind() {
    let check = |kind, url: &str| config(url).validate(kind).map_err(|error| error.field);
    assert_eq!(
        check(ToolKind::Slack, "https://hooks.slack.com/services/T/B/x"),
        Ok("hooks.slack.com".into())
    );
    assert_eq!(
        check(ToolKind::Slack, "http://hooks.slack.com/services/T/B/x"),
        Err("url".into())
    );
    assert_eq!(
        check(ToolKind::Discord, "http://127.0.0.1:9/hook"),
        Ok("127.0.0.1:9".into())
    );
    assert_eq!(
        check(ToolKind::Discord, "http://[::1]:9/hook"),
        Ok("[::1]:9".into())
    );
    assert_eq!(
        check(ToolKind::Discord, "http://localhost/hook"),
        Ok("localhost".into())
    );
    assert_eq!(
        check(ToolKind::Webhook, "http://example.com/hook"),
        Ok("example.com".into())
    );
    for bad in [
        "ftp://example.com/",
        "/relative",
        "https://",
        "not a url",
        "",
    ] {
        assert_eq!(check(ToolKind::Webhook, bad), Err("url".into()), "{bad}");
    }
}

#[test]
fn headers_and_secrets_are_for_webhooks_only() {
    let mut with_header = config("https://example.com/");
    with_header
        .headers
        .insert("Authorization".into(), "Bearer x".into());
    assert!(with_header.validate(ToolKind::Webhook).is_ok());
    assert_eq!(
        with_header.validate(ToolKind::Slack).unwrap_err().field,
        "headers"
    );
    let mut reserved = config("https://example.com/");
    reserved
        .headers
        .insert("Content-Type".into(), "text/plain".into());
    assert_eq!(
        reserved.validate(ToolKind::Webhook).unwrap_err().field,
        "headers"
    );
    let mut bad_value = config("https://example.com/");
    bad_value.headers.insert("X-A".into(), "line\nbreak".into());
    assert_eq!(
        bad_value.validate(ToolKind::Webhook).unwrap_err().field,
        "headers"
    );
    let mut signed = config("https://example.com/");
    signed.secret = Some(String::new());
    assert_eq!(
        signed.validate(ToolKind::Webhook).unwrap_err().field,
        "secret"
    );
    signed.secret = Some("s".into());
    assert_eq!(
        signed.validate(ToolKind::Discord).unwrap_err().field,
        "secret"
    );
}

#[test]
fn a_sealed_configuration_opens_only_with_its_key_and_hides_everything() {
    let key = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
    let mut original = config("https://example.com/hook/canary-path");
    original
        .headers
        .insert("Authorization".into(), "Bearer canary-header".into());
    original.secret = Some("canary-secret".into());
    let sealed = original.seal(ToolKind::Webhook, &key).unwrap();
    assert_eq!(sealed.target_host, "example.com");
    for canary in ["canary-path", "canary-header", "canary-secret"] {
        assert!(
            !sealed
                .sealed
                .windows(canary.len())
                .any(|window| window == canary.as_bytes())
        );
        assert!(!format!("{original:?} {sealed:?}").contains(canary));
    }
    assert_eq!(ToolConfig::open(&sealed.sealed, &key).unwrap(), original);
    let other = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
    assert!(ToolConfig::open(&sealed.sealed, &other).is_err());
    assert!(
        original
            .secrets()
            .contains(&"/hook/canary-path".to_string())
    );
}

#[test]
fn unknown_or_mistyped_config_fields_are_named_without_their_values() {
    let check = |value: Value| ToolConfig::from_json(&value).unwrap_err();
    assert_eq!(check(json!("https://x")).field, "config");
    assert_eq!(check(json!({})).field, "url");
    assert_eq!(check(json!({"url": 1})).field, "url");
    let error = check(json!({"url": "https://x", "headers": "Bearer canary"}));
    assert_eq!(error.field, "headers");
    assert!(!error.message.contains("canary"));
    assert_eq!(
        check(json!({"url": "https://x", "token": "canary"})).field,
        "token"
    );
}

// ---------------------------------------------------------------------------------------------
// Through the real router and a real local HTTP endpoint.

/// A control plane in a temp dir; stopped (and its tasks drained) by `stop` or on drop.
struct Plane {
    running: Option<Running>,
    shutdown: CancellationToken,
}

fn server_config(dir: &Path, key: &str, retry_delays: Vec<Duration>) -> ServerConfig {
    ServerConfig {
        delivery: DeliveryOptions {
            retry_delays,
            request_timeout: Duration::from_secs(10),
            extra_smtp_roots: Vec::new(),
            http_jobs_public_only: false,
        },
        ..ServerConfig::for_tests(dir, key)
    }
}

/// Fast retries so the tests do not wait for production backoff.
fn fast_retries(count: usize) -> Vec<Duration> {
    vec![Duration::from_millis(10); count]
}

impl Plane {
    async fn start(dir: &Path, key: &str, retry_delays: Vec<Duration>) -> Plane {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shutdown = CancellationToken::new();
        let running = crate::start(server_config(dir, key, retry_delays), shutdown.clone())
            .await
            .unwrap();
        Plane {
            running: Some(running),
            shutdown,
        }
    }

    fn state(&self) -> &AppState {
        &self.running.as_ref().unwrap().state
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        self.running.take().unwrap().wait().await;
    }

    async fn token(&self, username: &str, role: Role) -> String {
        let store = &self.state().store;
        if store.user_with_password(username).await.unwrap().is_none() {
            store.create_user(username, "unused", role).await.unwrap();
        }
        crate::cli::create_api_token(store, username, "test")
            .await
            .unwrap()
    }

    async fn user_id(&self, username: &str) -> String {
        let (user, _) = self
            .state()
            .store
            .user_with_password(username)
            .await
            .unwrap()
            .unwrap();
        user.id
    }

    /// Sends a request through the real router; returns the status and the raw body.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        let response = crate::http::router(self.state().clone())
            .oneshot(request.unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 4 * 1024 * 1024)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|body| body.to_string());
        let (status, text) = self.send_raw(method, path, token, body.as_deref()).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Polls the outbox until the notification has `status` (or panics after 20 s).
    async fn settled(&self, id: &str, status: NotificationStatus) -> Notification {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let notification = self.state().store.notification(id).await.unwrap();
            if notification.status == status {
                return notification;
            }
            assert!(
                Instant::now() < deadline,
                "notification still {:?} (attempts {}, last error {:?}), expected {status:?}",
                notification.status,
                notification.attempts,
                notification.last_error
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the test endpoint answers.
#[derive(Clone, Debug)]
enum Answer {
    Status(u16),
    /// 400 with the request's headers and body in the response body (an echoing endpoint).
    Echo,
    /// Never answers (until the endpoint stops): a delivery in flight.
    Hold,
}

/// One request the endpoint received.
#[derive(Debug)]
struct Received {
    path: String,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A real HTTP server on 127.0.0.1 recording every request and answering from a script
/// (`Status(200)` once the script is empty).
struct Endpoint {
    base: String,
    script: Arc<Mutex<VecDeque<Answer>>>,
    received: mpsc::UnboundedReceiver<Received>,
    /// Cancelled on drop: stops the server and releases held requests.
    stop: CancellationToken,
}

#[derive(Clone)]
struct EndpointState {
    script: Arc<Mutex<VecDeque<Answer>>>,
    received: mpsc::UnboundedSender<Received>,
    stop: CancellationToken,
}

async fn endpoint_handler(
    State(state): State<EndpointState>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let answer = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Answer::Status(200));
    let echo = format!("{headers:?} {}", String::from_utf8_lossy(&body));
    let _ = state.received.send(Received {
        path: uri.path().to_string(),
        headers,
        body: body.to_vec(),
    });
    match answer {
        Answer::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            let mut response = (status, format!("answer {code}")).into_response();
            if code == 429 {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, "0".parse().unwrap());
            }
            response
        }
        Answer::Echo => (StatusCode::BAD_REQUEST, echo).into_response(),
        Answer::Hold => {
            state.stop.cancelled().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

impl Endpoint {
    async fn start(script: Vec<Answer>) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (sender, received) = mpsc::unbounded_channel();
        let state = EndpointState {
            script: Arc::new(Mutex::new(script.into())),
            received: sender,
            stop: CancellationToken::new(),
        };
        let stop = state.stop.clone();
        let router = axum::Router::new()
            .fallback(endpoint_handler)
            .with_state(state.clone());
        let served = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { served.cancelled().await })
                .await
                .unwrap();
        });
        Endpoint {
            base,
            script: state.script,
            received,
            stop,
        }
    }

    fn answer(&self, answers: Vec<Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    /// The next request (or panics after 20 s).
    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .expect("no request reached the endpoint within 20 s")
            .unwrap()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// HMAC-SHA256 written out from RFC 2104 over `sha2`, independent of the `ring` code under test.
fn reference_hmac_sha256(key: &[u8], data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(data)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

/// A test log sink: every event of the control plane at TRACE level, for the test's thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

fn contains_bytes(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test]
async fn tools_are_created_listed_renamed_and_deleted_and_never_show_their_configuration() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(5),
    )
    .await;
    let mut endpoint = Endpoint::start(vec![Answer::Echo]).await;
    let token = plane.token("alice", Role::User).await;
    let canary = format!(
        "canary{}",
        crate::crypto::random_token("").replace(['-', '_'], "")
    );

    let mut bodies = Vec::new();
    let mut send = async |method: Method, path: &str, body: Option<Value>| {
        let body = body.map(|body| body.to_string());
        let (status, text) = plane.send_raw(method, path, &token, body.as_deref()).await;
        bodies.push(text.clone());
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };

    let webhook = json!({
        "name": "ops-hook",
        "kind": "webhook",
        "config": {
            "url": format!("{}/hook/{canary}?key={canary}", endpoint.base),
            "headers": {"Authorization": format!("Bearer {canary}"), "X-Team": "ops"},
            "secret": format!("{canary}-signing"),
        },
    });
    let (status, tool) = send(Method::POST, "/api/v1/tools", Some(webhook.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{tool}");
    assert_eq!(tool["name"], "ops-hook");
    assert_eq!(tool["kind"], "webhook");
    assert_eq!(
        tool["target_host"],
        endpoint.base.trim_start_matches("http://")
    );
    assert!(tool.get("config").is_none(), "{tool}");
    let id = tool["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/tools/{id}");

    let (status, _) = send(Method::POST, "/api/v1/tools", Some(webhook)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let slack = json!({"name": "alerts", "kind": "slack",
        "config": {"url": format!("https://hooks.slack.example/services/{canary}")}});
    let (status, _) = send(Method::POST, "/api/v1/tools", Some(slack)).await;
    assert_eq!(status, StatusCode::CREATED);

    let (status, listed) = send(Method::GET, "/api/v1/tools", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|tool| tool["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alerts", "ops-hook"]);
    let (status, shown) = send(Method::GET, &path, None).await;
    assert_eq!((status, &shown["id"]), (StatusCode::OK, &json!(id)));

    // Rename, then replace the configuration (still with the canary in it).
    let (status, renamed) = send(Method::PATCH, &path, Some(json!({"name": "ops"}))).await;
    assert_eq!((status, &renamed["name"]), (StatusCode::OK, &json!("ops")));
    let replaced = json!({"config": {
        "url": format!("{}/hook2/{canary}", endpoint.base),
        "headers": {"Authorization": format!("Bearer {canary}")},
    }});
    let (status, patched) = send(Method::PATCH, &path, Some(replaced)).await;
    assert_eq!((status, &patched["name"]), (StatusCode::OK, &json!("ops")));
    let (status, answer) = send(Method::PATCH, &path, Some(json!({"kind": "slack"}))).await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("kind"))
    );

    // A delivery whose endpoint echoes the request back: the failure is recorded without it.
    let (status, queued) = send(Method::POST, &format!("{path}/test"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let notification_id = queued["id"].as_str().unwrap().to_string();
    let received = endpoint.next().await;
    assert_eq!(received.path, format!("/hook2/{canary}"));
    assert_eq!(
        received.headers["authorization"],
        format!("Bearer {canary}").as_str()
    );
    let failed = plane
        .settled(&notification_id, NotificationStatus::Failed)
        .await;
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("HTTP 400"),
        "{:?}",
        failed.last_error
    );
    let (status, outbox) = send(Method::GET, "/api/v1/notifications", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outbox[0]["id"], json!(notification_id));
    assert_eq!(outbox[0]["tool"], "ops");
    assert_eq!(outbox[0]["status"], "failed");
    assert_eq!(outbox[0]["attempts"], 1);
    let (_, failed_only) = send(
        Method::GET,
        "/api/v1/notifications?status=failed&limit=1",
        None,
    )
    .await;
    assert_eq!(failed_only.as_array().map(Vec::len), Some(1));
    let (_, none_sent) = send(Method::GET, "/api/v1/notifications?status=sent", None).await;
    assert_eq!(none_sent, json!([]));

    // The stored configuration is sealed: neither its column nor the database files show it.
    let sealed = plane.state().store.sealed_tool_config(&id).await.unwrap();
    assert!(!contains_bytes(&sealed, &canary));
    assert!(crate::tools::ToolConfig::open(&sealed, &plane.state().key).is_ok());
    for file in ["cronium.db", "cronium.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        assert!(!contains_bytes(&bytes, &canary), "{file} holds the canary");
    }

    let (status, _) = send(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = send(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, outbox) = send(Method::GET, "/api/v1/notifications", None).await;
    assert_eq!(
        outbox[0]["tool"], "ops",
        "the outbox keeps the deleted tool's name"
    );
    assert_eq!(outbox[0]["tool_id"], Value::Null);

    for body in &bodies {
        assert!(
            !body.contains(&canary),
            "a response shows the canary: {body}"
        );
    }
    drop(endpoint);
    plane.stop().await;
    let logs = logs.text();
    assert!(
        logs.contains("notification failed"),
        "logs were not captured: {logs}"
    );
    assert!(!logs.contains(&canary), "the logs show the canary");
}

#[tokio::test]
async fn bad_tool_input_is_refused_with_a_field_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(5),
    )
    .await;
    let token = plane.token("alice", Role::User).await;
    let url = "https://hooks.slack.example/services/x";
    let cases: Vec<(Value, StatusCode, Option<&str>)> = vec![
        (
            json!({"kind": "slack", "config": {"url": url}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            json!({"name": "", "kind": "slack", "config": {"url": url}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            json!({"name": "a b", "kind": "slack", "config": {"url": url}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            json!({"name": "x".repeat(65), "kind": "slack", "config": {"url": url}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            json!({"name": "a", "config": {"url": url}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("kind"),
        ),
        (
            json!({"name": "a", "kind": "sms", "config": {"url": url}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("kind"),
        ),
        (
            json!({"name": "a", "kind": "slack"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config"),
        ),
        (
            json!({"name": "a", "kind": "slack", "config": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config"),
        ),
        (
            json!({"name": "a", "kind": "slack", "config": {}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.url"),
        ),
        (
            json!({"name": "a", "kind": "slack", "config": {"url": "hooks.slack.example/x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.url"),
        ),
        (
            json!({"name": "a", "kind": "slack", "config": {"url": "ftp://hooks.slack.example/x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.url"),
        ),
        (
            json!({"name": "a", "kind": "slack", "config": {"url": "http://hooks.slack.example/x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.url"),
        ),
        (
            json!({"name": "a", "kind": "discord", "config": {"url": "http://10.0.0.1/x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.url"),
        ),
        (
            json!({"name": "a", "kind": "slack", "config": {"url": url, "headers": {"A": "b"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.headers"),
        ),
        (
            json!({"name": "a", "kind": "webhook", "config": {"url": url, "headers": {"Content-Type": "text/plain"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.headers"),
        ),
        (
            json!({"name": "a", "kind": "webhook", "config": {"url": url, "headers": {"bad header": "x"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.headers"),
        ),
        (
            json!({"name": "a", "kind": "webhook", "config": {"url": url, "secret": ""}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.secret"),
        ),
        (
            json!({"name": "a", "kind": "webhook", "config": {"url": url, "password": "x"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("config.password"),
        ),
        (
            json!({"name": "a", "kind": "webhook", "config": {"url": url}, "colour": "red"}),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (body, expected, field) in &cases {
        let (status, answer) = plane
            .send(Method::POST, "/api/v1/tools", &token, Some(body.clone()))
            .await;
        assert_eq!(status, *expected, "{body} → {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], *field, "{body} → {answer}");
        }
    }
    let (_, tools) = plane.send(Method::GET, "/api/v1/tools", &token, None).await;
    assert_eq!(tools, json!([]));
    for query in ["status=lost", "limit=0", "limit=x", "limit=501"] {
        let (status, answer) = plane
            .send(
                Method::GET,
                &format!("/api/v1/notifications?{query}"),
                &token,
                None,
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query} → {answer}"
        );
    }
    let (status, _) = plane
        .send(
            Method::GET,
            "/api/v1/notifications?colour=red",
            &token,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn users_cannot_see_use_or_delete_other_users_tools() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(5),
    )
    .await;
    let alice = plane.token("alice", Role::User).await;
    let bob = plane.token("bob", Role::User).await;
    let viewer = plane.token("vera", Role::Viewer).await;
    let admin = plane.token("root", Role::Admin).await;
    let (_, tool) = plane
        .send(
            Method::POST,
            "/api/v1/tools",
            &alice,
            Some(json!({"name": "mine", "kind": "discord",
                "config": {"url": "https://discord.example/api/webhooks/1/x"}})),
        )
        .await;
    let path = format!("/api/v1/tools/{}", tool["id"].as_str().unwrap());

    for (method, suffix, body) in [
        (Method::GET, "", None),
        (Method::PATCH, "", Some(json!({"name": "stolen"}))),
        (Method::DELETE, "", None),
        (Method::POST, "/test", None),
    ] {
        let (status, _) = plane
            .send(method.clone(), &format!("{path}{suffix}"), &bob, body)
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {suffix} by another user"
        );
    }
    assert_eq!(
        plane.send(Method::GET, "/api/v1/tools", &bob, None).await.1,
        json!([])
    );
    // Bob's scripts cannot send through Alice's tool either: names are per owner.
    let bob_id = plane.user_id("bob").await;
    let refused = plane
        .state()
        .store
        .enqueue_notification(&bob_id, "mine", None, "hello", None)
        .await
        .unwrap();
    assert_eq!(refused, Err(NotifyRefused::UnknownTool("mine".into())));
    assert_eq!(refused.unwrap_err().to_string(), "no tool named \"mine\"");

    let (status, _) = plane
        .send(Method::POST, &format!("{path}/test"), &viewer, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = plane
        .send(
            Method::POST,
            "/api/v1/tools",
            &viewer,
            Some(json!({"name": "v", "kind": "discord",
                "config": {"url": "https://discord.example/api/webhooks/1/x"}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Admins see everyone's tools and outboxes; a test notification goes out as the owner's.
    assert_eq!(
        plane.send(Method::GET, &path, &admin, None).await.0,
        StatusCode::OK
    );
    let (status, queued) = plane
        .send(
            Method::POST,
            &format!("{path}/test"),
            &admin,
            Some(json!({"message": "from root"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let alice_id = plane.user_id("alice").await;
    let queued = plane
        .state()
        .store
        .notification(queued["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(queued.owner_id, alice_id);
    assert_eq!(
        plane
            .send(Method::GET, "/api/v1/notifications", &bob, None)
            .await
            .1,
        json!([])
    );
    let (_, outbox) = plane
        .send(Method::GET, "/api/v1/notifications", &alice, None)
        .await;
    assert_eq!(outbox.as_array().map(Vec::len), Some(1));
    let (status, _) = plane.send(Method::DELETE, &path, &admin, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn slack_discord_and_signed_webhook_payloads_reach_a_real_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(5),
    )
    .await;
    let mut endpoint = Endpoint::start(Vec::new()).await;
    let token = plane.token("alice", Role::User).await;
    let owner = plane.user_id("alice").await;
    let secret = "shared-signing-secret";
    for (name, kind, config) in [
        (
            "slack",
            "slack",
            json!({"url": format!("{}/slack", endpoint.base)}),
        ),
        (
            "discord",
            "discord",
            json!({"url": format!("{}/discord", endpoint.base)}),
        ),
        (
            "hook",
            "webhook",
            json!({"url": format!("{}/hook", endpoint.base),
            "headers": {"X-Api-Key": "k-123"}, "secret": secret}),
        ),
        (
            "plain-hook",
            "webhook",
            json!({"url": format!("{}/plain", endpoint.base)}),
        ),
    ] {
        let (status, answer) = plane
            .send(
                Method::POST,
                "/api/v1/tools",
                &token,
                Some(json!({"name": name, "kind": kind, "config": config})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }

    let notify = async |tool: &str, title: Option<&str>, message: &str, job: Option<&str>| {
        let id = crate::tools::notify(plane.state(), &owner, tool, title, message, job)
            .await
            .unwrap()
            .unwrap();
        plane.settled(&id, NotificationStatus::Sent).await
    };

    let sent = notify("slack", Some("Backup"), "finished in 3 s", None).await;
    assert_eq!((sent.attempts, sent.last_error), (1, None));
    assert!(sent.sent_at.is_some());
    let slack = endpoint.next().await;
    assert_eq!(slack.path, "/slack");
    assert_eq!(slack.headers["content-type"], "application/json");
    assert_eq!(slack.json(), json!({"text": "*Backup*\nfinished in 3 s"}));

    let long = "x".repeat(2500);
    notify("discord", Some("Report"), &long, None).await;
    let discord = endpoint.next().await;
    assert_eq!(discord.path, "/discord");
    let content = discord.json()["content"].as_str().unwrap().to_string();
    assert_eq!(content.chars().count(), 2000);
    assert!(content.starts_with("**Report**\nxxx") && content.ends_with('…'));
    notify("discord", None, "short", None).await;
    assert_eq!(endpoint.next().await.json()["content"], "short");

    let sent = notify("hook", Some("Deploy"), "v1.2 is live", Some("job-42")).await;
    let hook = endpoint.next().await;
    assert_eq!(hook.path, "/hook");
    assert_eq!(hook.headers["x-api-key"], "k-123");
    let body = hook.json();
    assert_eq!(body["title"], "Deploy");
    assert_eq!(body["message"], "v1.2 is live");
    assert_eq!(body["owner"], "alice");
    assert_eq!(body["job_id"], "job-42");
    assert_eq!(body["notification_id"], json!(sent.id));
    let sent_at = body["sent_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(sent_at).is_ok(),
        "{sent_at}"
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        6,
        "exactly the documented fields: {body}"
    );
    let signature = hook.headers["x-cronium-signature"].to_str().unwrap();
    assert_eq!(
        signature,
        format!(
            "sha256={}",
            reference_hmac_sha256(secret.as_bytes(), &hook.body)
        )
    );

    notify("plain-hook", None, "unsigned", None).await;
    let plain = endpoint.next().await;
    assert!(plain.headers.get("x-cronium-signature").is_none());
    assert_eq!(plain.json()["title"], Value::Null);
    assert_eq!(plain.json()["job_id"], Value::Null);

    // Refusals the helper passes on to the script.
    let store = &plane.state().store;
    assert_eq!(
        store
            .enqueue_notification(&owner, "nope", None, "x", None)
            .await
            .unwrap(),
        Err(NotifyRefused::UnknownTool("nope".into()))
    );
    assert!(matches!(
        store
            .enqueue_notification(&owner, "hook", None, " ", None)
            .await
            .unwrap(),
        Err(NotifyRefused::Invalid {
            field: "message",
            ..
        })
    ));
    assert!(matches!(
        store
            .enqueue_notification(&owner, "hook", Some(&"t".repeat(300)), "x", None)
            .await
            .unwrap(),
        Err(NotifyRefused::Invalid { field: "title", .. })
    ));
    drop(endpoint);
    plane.stop().await;
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_and_client_errors_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(3),
    )
    .await;
    let mut endpoint = Endpoint::start(Vec::new()).await;
    plane.token("alice", Role::User).await;
    let owner = plane.user_id("alice").await;
    plane
        .state()
        .store
        .create_tool(
            &owner,
            "hook",
            ToolKind::Webhook,
            ToolConfig {
                url: format!("{}/hook", endpoint.base),
                headers: Default::default(),
                secret: None,
            }
            .seal(ToolKind::Webhook, &plane.state().key)
            .unwrap(),
        )
        .await
        .unwrap();
    let notify = async |message: &str| {
        crate::tools::notify(plane.state(), &owner, "hook", None, message, None)
            .await
            .unwrap()
            .unwrap()
    };

    // 500, 429 (Retry-After: 0), 500, then 200: delivered on the fourth attempt.
    endpoint.answer(vec![
        Answer::Status(500),
        Answer::Status(429),
        Answer::Status(500),
        Answer::Status(200),
    ]);
    let id = notify("eventually").await;
    let sent = plane.settled(&id, NotificationStatus::Sent).await;
    assert_eq!(sent.attempts, 4);
    for _ in 0..4 {
        assert_eq!(endpoint.next().await.json()["notification_id"], json!(id));
    }

    // 400: failed after one attempt, with the answer in last_error.
    endpoint.answer(vec![Answer::Status(400)]);
    let id = notify("rejected").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        failed.last_error.as_deref(),
        Some("HTTP 400 Bad Request: answer 400")
    );
    endpoint.next().await;

    // Always 503: given up after the first attempt and three retries.
    endpoint.answer(vec![Answer::Status(503); 4]);
    let id = notify("never").await;
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 4);
    assert_eq!(
        failed.last_error.as_deref(),
        Some("gave up after 4 attempts: HTTP 503 Service Unavailable: answer 503")
    );

    // Nobody listening: connection errors are retried too, then given up.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    plane
        .state()
        .store
        .create_tool(
            &owner,
            "gone",
            ToolKind::Slack,
            ToolConfig {
                url: format!("http://{closed}/services/secret-path"),
                headers: Default::default(),
                secret: None,
            }
            .seal(ToolKind::Slack, &plane.state().key)
            .unwrap(),
        )
        .await
        .unwrap();
    let id = crate::tools::notify(plane.state(), &owner, "gone", None, "x", None)
        .await
        .unwrap()
        .unwrap();
    let failed = plane.settled(&id, NotificationStatus::Failed).await;
    assert_eq!(failed.attempts, 4);
    let error = failed.last_error.unwrap();
    assert!(error.starts_with("gave up after 4 attempts: "), "{error}");
    assert!(!error.contains("secret-path"), "{error}");
    drop(endpoint);
    plane.stop().await;
}

#[tokio::test]
async fn a_pending_notification_survives_a_restart_and_is_delivered_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let key = EncryptionKey::generate_base64();
    // The endpoint holds the first request: the delivery is in flight when the plane stops.
    let mut endpoint = Endpoint::start(vec![Answer::Hold]).await;
    let plane = Plane::start(dir.path(), &key, fast_retries(5)).await;
    let token = plane.token("alice", Role::User).await;
    let (status, tool) = plane
        .send(
            Method::POST,
            "/api/v1/tools",
            &token,
            Some(json!({"name": "hook", "kind": "webhook",
                "config": {"url": format!("{}/hook", endpoint.base)}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{tool}");
    let (status, queued) = plane
        .send(
            Method::POST,
            &format!("/api/v1/tools/{}/test", tool["id"].as_str().unwrap()),
            &token,
            Some(json!({"title": "T", "message": "survives"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = queued["id"].as_str().unwrap().to_string();
    let first = endpoint.next().await;
    assert_eq!(first.json()["notification_id"], json!(id));
    plane.stop().await;

    // Stopped: still pending, the interrupted attempt handed back and due at once.
    let store = crate::ServerConfig::reopen_test_store(dir.path()).await;
    let pending = store.notification(&id).await.unwrap();
    assert_eq!(pending.status, NotificationStatus::Pending);
    assert_eq!(pending.attempts, 0);
    assert!(pending.next_attempt_at <= crate::store::now_ms());
    // Enqueued while the control plane is down (through the store): delivered after the start.
    let owner = pending.owner_id.clone();
    let offline = store
        .enqueue_notification(&owner, "hook", None, "queued while stopped", None)
        .await
        .unwrap()
        .unwrap();
    store.close().await;

    let plane = Plane::start(dir.path(), &key, fast_retries(5)).await;
    let sent = plane.settled(&id, NotificationStatus::Sent).await;
    assert_eq!(sent.attempts, 1);
    let sent = plane.settled(&offline, NotificationStatus::Sent).await;
    assert_eq!(sent.attempts, 1);
    let mut delivered = vec![
        endpoint.next().await.json()["message"].clone(),
        endpoint.next().await.json()["message"].clone(),
    ];
    delivered.sort_by_key(|message| message.to_string());
    assert_eq!(
        delivered,
        [json!("queued while stopped"), json!("survives")]
    );
    drop(endpoint);
    plane.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Per-event notifications: `notify` on events, enqueued when a job settles, really delivered.

/// Enrolls an agent named `name` directly in the store (no process: the tests settle its jobs).
async fn enrolled_agent(plane: &Plane, name: &str) -> String {
    plane.state().store.enroll_test_agent(name).await.id
}

#[tokio::test]
async fn event_notify_names_the_owners_tools_and_null_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(1),
    )
    .await;
    let alice = plane.token("alice", Role::User).await;
    let bob = plane.token("bob", Role::User).await;
    for (token, name) in [(&alice, "ops"), (&alice, "wins"), (&bob, "bobs")] {
        let (status, answer) = plane
            .send(
                Method::POST,
                "/api/v1/tools",
                token,
                Some(json!({"name": name, "kind": "webhook", "config": {"url": "http://127.0.0.1:9/x"}})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let event = |notify: Value| json!({"name": "nightly", "kind": "bash", "script": "true", "notify": notify});
    for (notify, field) in [
        (json!({"on_failure": "nope"}), "notify.on_failure"),
        (json!({"on_success": "nope"}), "notify.on_success"),
        // Another user's tool is not the caller's.
        (json!({"on_failure": "bobs"}), "notify.on_failure"),
        (json!({"on_failure": 7}), ""),
        (json!({"on_error": "ops"}), ""),
    ] {
        let (status, answer) = plane
            .send(
                Method::POST,
                "/api/v1/events",
                &alice,
                Some(event(notify.clone())),
            )
            .await;
        if field.is_empty() {
            assert!(status.is_client_error(), "{notify}: {status} {answer}");
        } else {
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{notify}: {answer}"
            );
            assert_eq!(answer["error"]["field"], field, "{answer}");
        }
    }
    let (status, answer) = plane
        .send(Method::GET, "/api/v1/events", &alice, None)
        .await;
    assert_eq!(
        (status, answer),
        (StatusCode::OK, json!([])),
        "nothing stored"
    );

    let (status, created) = plane
        .send(
            Method::POST,
            "/api/v1/events",
            &alice,
            Some(event(json!({"on_failure": "ops"}))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["notify"],
        json!({"on_failure": "ops", "on_success": null})
    );
    let path = format!("/api/v1/events/{}", created["id"].as_str().unwrap());
    let patch = async |body: Value| plane.send(Method::PATCH, &path, &alice, Some(body)).await;
    // A missing field keeps its value.
    let (status, answer) = patch(json!({"notify": {"on_success": "wins"}})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["notify"],
        json!({"on_failure": "ops", "on_success": "wins"})
    );
    let (status, answer) = patch(json!({"notify": {"on_success": "gone"}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "notify.on_success");
    let (_, answer) = plane.send(Method::GET, &path, &alice, None).await;
    assert_eq!(answer["notify"]["on_success"], "wins", "unchanged");
    // `null` inside clears one; other fields leave `notify` alone.
    let (status, answer) = patch(json!({"notify": {"on_failure": null}})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["notify"],
        json!({"on_failure": null, "on_success": "wins"})
    );
    let (_, answer) = patch(json!({"script": "false"})).await;
    assert_eq!(
        answer["notify"],
        json!({"on_failure": null, "on_success": "wins"})
    );
    // `notify: null` clears both.
    let (status, answer) = patch(json!({"notify": null})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["notify"],
        json!({"on_failure": null, "on_success": null})
    );
    plane.stop().await;
}

#[tokio::test]
async fn a_failed_job_of_an_event_with_notify_reaches_the_webhook_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(
        dir.path(),
        &EncryptionKey::generate_base64(),
        fast_retries(5),
    )
    .await;
    let mut endpoint = Endpoint::start(Vec::new()).await;
    let token = plane.token("alice", Role::User).await;
    let agent = enrolled_agent(&plane, "web-1").await;
    let (status, answer) = plane
        .send(
            Method::POST,
            "/api/v1/tools",
            &token,
            Some(json!({"name": "ops", "kind": "webhook",
                        "config": {"url": format!("{}/ops", endpoint.base)}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, event) = plane
        .send(
            Method::POST,
            "/api/v1/events",
            &token,
            Some(
                json!({"name": "nightly", "kind": "bash", "script": "exit 3",
                        "targets": {"agents": ["web-1"]}, "notify": {"on_failure": "ops"}}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let runs = format!("/api/v1/events/{}/runs", event["id"].as_str().unwrap());
    let store = &plane.state().store;

    // The agent claims the job and disappears: the real lease sweeper fails it as lost, and the
    // settlement's notification reaches the endpoint.
    let (status, run) = plane
        .send(Method::POST, &runs, &token, Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let job = run["jobs"][0]["id"].as_str().unwrap().to_string();
    let claimed = store.claim_jobs(&agent, 1, now_ms() - 1).await.unwrap();
    assert_eq!(claimed[0].id, job);
    let delivered = endpoint.next().await;
    assert_eq!(delivered.path, "/ops");
    let body = delivered.json();
    assert_eq!(body["title"], "cronium: nightly failed on web-1");
    assert_eq!(body["job_id"], json!(job));
    assert_eq!(body["owner"], "alice");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("status: failed") && message.contains("reason: lost"),
        "{message}"
    );
    let id = body["notification_id"].as_str().unwrap().to_string();
    let sent = plane.settled(&id, NotificationStatus::Sent).await;
    assert_eq!(sent.attempts, 1);
    let of_job = |job: String| async move {
        store
            .notifications(None, None, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|notification| notification.source_job_id.as_deref() == Some(job.as_str()))
            .count()
    };
    assert_eq!(of_job(job.clone()).await, 1);
    assert_eq!(
        store.job(&job).await.unwrap().status,
        crate::store::jobs::JobStatus::Failed
    );

    // A queued job cancelled through the API: `on_failure` too, one delivery.
    let (_, run) = plane
        .send(Method::POST, &runs, &token, Some(json!({})))
        .await;
    let cancelled = run["jobs"][0]["id"].as_str().unwrap().to_string();
    let (status, answer) = plane
        .send(
            Method::POST,
            &format!("/api/v1/jobs/{cancelled}/cancel"),
            &token,
            None,
        )
        .await;
    assert!(status.is_success(), "{status} {answer}");
    let delivered = endpoint.next().await;
    let body = delivered.json();
    assert_eq!(body["title"], "cronium: nightly was cancelled on web-1");
    assert_eq!(body["job_id"], json!(cancelled));
    plane
        .settled(
            body["notification_id"].as_str().unwrap(),
            NotificationStatus::Sent,
        )
        .await;
    assert_eq!(of_job(cancelled).await, 1);
    // Every notification is sent, and the endpoint saw exactly the two deliveries.
    assert!(
        store
            .notifications(None, Some(NotificationStatus::Pending), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(endpoint.received.try_recv().is_err(), "no other delivery");
    drop(endpoint);
    plane.stop().await;
}
