//! HTTP request events with `executor: control_plane` and tool action events, through the real
//! router and the real worker, against a real HTTP server on 127.0.0.1 that records what it
//! received; and the validation of their fields.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::crypto::EncryptionKey;
use crate::store::users::Role;
use crate::{AppState, Running, ServerConfig};

/// The secret a test puts in an event's secret env; it must never come back unmasked.
const CANARY: &str = "canary-7f3a9c1e";

struct Plane {
    _dir: tempfile::TempDir,
    running: Running,
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.running.state.shutdown.cancel();
    }
}

async fn plane() -> Plane {
    plane_with(false).await
}

/// A control plane whose HTTP request jobs reach public addresses only, or any.
async fn plane_with(http_jobs_public_only: bool) -> Plane {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        delivery: crate::tools::DeliveryOptions {
            retry_delays: Vec::new(),
            request_timeout: Duration::from_secs(5),
            http_jobs_public_only,
            ..Default::default()
        },
        ..ServerConfig::for_tests(dir.path(), &EncryptionKey::generate_base64())
    };
    let running = crate::start(config, CancellationToken::new())
        .await
        .unwrap();
    Plane { _dir: dir, running }
}

impl Plane {
    fn state(&self) -> &AppState {
        &self.running.state
    }

    async fn token(&self, username: &str) -> String {
        let store = &self.state().store;
        if store.user_with_password(username).await.unwrap().is_none() {
            store
                .create_user(username, "unused", Role::User)
                .await
                .unwrap();
        }
        crate::cli::create_api_token(store, username, "test")
            .await
            .unwrap()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
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
        let bytes = axum::body::to_bytes(response.into_body(), 8 * 1024 * 1024)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Creates an event (201 expected) and returns its id.
    async fn event(&self, token: &str, body: Value) -> String {
        let (status, event) = self.send(Method::POST, "/events", token, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{event}");
        event["id"].as_str().unwrap().to_string()
    }

    /// Triggers a run of `event` and returns its one job's id.
    async fn trigger(&self, token: &str, event: &str, input: Option<Value>) -> String {
        let body = match input {
            Some(input) => json!({"input": input}),
            None => json!({}),
        };
        let (status, run) = self
            .send(
                Method::POST,
                &format!("/events/{event}/runs"),
                token,
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{run}");
        let jobs = run["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 1, "{run}");
        assert_eq!(jobs[0]["executor"], "control_plane", "{run}");
        jobs[0]["id"].as_str().unwrap().to_string()
    }

    /// Polls the job until it ended (or panics after 30 s); returns `GET /jobs/{id}`.
    async fn ended(&self, token: &str, job: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self
                .send(Method::GET, &format!("/jobs/{job}"), token, None)
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if matches!(
                body["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return body;
            }
            assert!(Instant::now() < deadline, "job did not end: {body}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// One request the endpoint received.
#[derive(Debug)]
struct Received {
    method: String,
    path: String,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

/// A real HTTP server on 127.0.0.1 recording every request. Paths: `/echo` answers 200 with
/// the request's `authorization` header and body, and an `x-reply` header; `/status/N` answers
/// N; `/big` answers 300 KiB of text; `/binary` a few non-text bytes; `/slow` never answers
/// (until the endpoint stops); `/redirect` a 302 to `/echo`.
struct Endpoint {
    base: String,
    received: mpsc::UnboundedReceiver<Received>,
    stop: CancellationToken,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct EndpointState {
    received: mpsc::UnboundedSender<Received>,
    stop: CancellationToken,
}

async fn endpoint_handler(
    axum::extract::State(state): axum::extract::State<EndpointState>,
    method: Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let path = uri.path().to_string();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).into_owned();
    let _ = state.received.send(Received {
        method: method.to_string(),
        path: path.clone(),
        headers,
        body: body.to_vec(),
    });
    if let Some(code) = path.strip_prefix("/status/") {
        let code = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        return (code, format!("answer {}", code.as_u16())).into_response();
    }
    match path.as_str() {
        "/echo" => (
            [("x-reply", "yes"), ("content-type", "text/plain")],
            format!("auth={authorization}\nbody={text}\n"),
        )
            .into_response(),
        "/big" => "x".repeat(300 * 1024).into_response(),
        "/binary" => (
            [("content-type", "application/octet-stream")],
            vec![0u8, 159, 146, 150, 1, 2],
        )
            .into_response(),
        "/slow" => {
            state.stop.cancelled().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        "/redirect" => (StatusCode::FOUND, [(header::LOCATION, "/echo")]).into_response(),
        _ => StatusCode::OK.into_response(),
    }
}

impl Endpoint {
    async fn start() -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (sender, received) = mpsc::unbounded_channel();
        let state = EndpointState {
            received: sender,
            stop: CancellationToken::new(),
        };
        let stop = state.stop.clone();
        let router = axum::Router::new()
            .fallback(endpoint_handler)
            .with_state(state);
        let served = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { served.cancelled().await })
                .await
                .unwrap();
        });
        Endpoint {
            base,
            received,
            stop,
        }
    }

    /// The next request (or panics after 20 s).
    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .expect("no request reached the endpoint within 20 s")
            .unwrap()
    }
}

/// The job's whole log, through the API.
async fn log_text(plane: &Plane, token: &str, job: &str) -> String {
    let (status, body) = plane
        .send(Method::GET, &format!("/jobs/{job}"), token, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    body["output"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_control_plane_http_job_sends_what_the_event_says_and_masks_its_secret() {
    let plane = plane().await;
    let token = plane.token("alice").await;
    let mut endpoint = Endpoint::start().await;
    let event = plane
        .event(
            &token,
            json!({
                "name": "ping",
                "kind": "http_request",
                "executor": "control_plane",
                "secret_env": {"TOKEN": CANARY},
                "http": {
                    "method": "post",
                    "url": format!("{}/echo?from=cronium", endpoint.base),
                    "headers": {"Authorization": "Bearer {{secret:TOKEN}}", "X-Trace": "t-1"},
                    "body": "{\"input\": {{input}}}",
                    "expected_status": [200, "201-204"],
                },
            }),
        )
        .await;
    let (_, shown) = plane
        .send(Method::GET, &format!("/events/{event}"), &token, None)
        .await;
    assert_eq!(shown["http"]["method"], "POST");
    assert_eq!(
        shown["http"]["headers"]["Authorization"],
        "Bearer {{secret:TOKEN}}"
    );
    assert_eq!(shown["http"]["expected_status"], json!([200, "201-204"]));
    assert_eq!(shown["executor"], "control_plane");
    assert!(!shown.to_string().contains(CANARY));

    let job = plane.trigger(&token, &event, Some(json!({"n": 7}))).await;
    let received = endpoint.next().await;
    assert_eq!(received.method, "POST");
    assert_eq!(received.path, "/echo");
    assert_eq!(
        received.headers[header::AUTHORIZATION],
        format!("Bearer {CANARY}").as_str()
    );
    assert_eq!(received.headers["x-trace"], "t-1");
    assert_eq!(
        String::from_utf8(received.body).unwrap(),
        "{\"input\": {\"n\":7}}"
    );

    let job = plane.ended(&token, &job).await;
    assert_eq!(job["status"], "completed", "{job}");
    let result: Value = job["result"].clone();
    let result = match result {
        Value::String(text) => serde_json::from_str(&text).unwrap(),
        other => other,
    };
    assert_eq!(result["status"], 200, "{result}");
    assert_eq!(result["headers"]["x-reply"], "yes");
    assert_eq!(result["encoding"], "text");
    assert_eq!(result["truncated"], false);
    let body = result["body"].as_str().unwrap();
    assert!(body.contains("auth=Bearer ***"), "{body}");
    assert!(body.contains("body={\"input\": {\"n\":7}}"), "{body}");
    let log = log_text(&plane, &token, job["id"].as_str().unwrap()).await;
    assert!(
        log.contains("POST ") && log.contains("/echo?from=cronium"),
        "{log}"
    );
    assert!(log.contains("HTTP 200 OK"), "{log}");
    assert!(log.contains("auth=Bearer ***"), "{log}");
    for text in [job.to_string(), log] {
        assert!(!text.contains(CANARY), "the secret leaked: {text}");
    }
}

#[tokio::test]
async fn unexpected_statuses_timeouts_and_big_or_binary_bodies() {
    let plane = plane().await;
    let token = plane.token("bob").await;
    let endpoint = Endpoint::start().await;
    let run = |path: &str, extra: Value| {
        let mut http = json!({"method": "GET", "url": format!("{}{path}", endpoint.base)});
        for (key, value) in extra.as_object().unwrap() {
            http[key] = value.clone();
        }
        http
    };
    let cases = [
        ("status-500", run("/status/500", json!({}))),
        (
            "status-404-expected",
            run("/status/404", json!({"expected_status": ["4xx"]})),
        ),
        ("slow", run("/slow", json!({"timeout_seconds": 1}))),
        ("big", run("/big", json!({}))),
        ("binary", run("/binary", json!({}))),
        ("redirect-not-followed", run("/redirect", json!({}))),
        (
            "redirect-followed",
            run("/redirect", json!({"follow_redirects": true})),
        ),
        (
            "refused",
            json!({"method": "GET", "url": "http://127.0.0.1:9/nothing-listens"}),
        ),
    ];
    let mut jobs = Vec::new();
    for (name, http) in cases {
        let event = plane
            .event(
                &token,
                json!({"name": name, "kind": "http_request", "executor": "control_plane", "http": http}),
            )
            .await;
        jobs.push((name, plane.trigger(&token, &event, None).await));
    }
    for (name, job) in jobs {
        let job = plane.ended(&token, &job).await;
        let result: Option<Value> = match &job["result"] {
            Value::Null => None,
            Value::String(text) => Some(serde_json::from_str(text).unwrap()),
            other => Some(other.clone()),
        };
        let log = log_text(&plane, &token, job["id"].as_str().unwrap()).await;
        match name {
            "status-500" => {
                assert_eq!(job["status"], "failed", "{job}");
                assert_eq!(job["reason"], "http_status", "{job}");
                assert_eq!(result.unwrap()["status"], 500);
                assert!(
                    log.contains("status 500 is not an expected one (200-299)"),
                    "{log}"
                );
            }
            "status-404-expected" => {
                assert_eq!(job["status"], "completed", "{job}");
                assert_eq!(result.unwrap()["status"], 404);
            }
            "slow" => {
                assert_eq!(job["status"], "failed", "{job}");
                assert_eq!(job["reason"], "timeout", "{job}");
                assert!(log.contains("timed out after 1 s"), "{log}");
            }
            "big" => {
                assert_eq!(job["status"], "completed", "{job}");
                let result = result.unwrap();
                assert_eq!(result["truncated"], true);
                assert_eq!(
                    result["body"].as_str().unwrap().len(),
                    cronium_protocol::http::MAX_HTTP_RESPONSE_BODY
                );
                assert!(log.contains("body truncated after 262144 bytes"), "{log}");
            }
            "binary" => {
                let result = result.unwrap();
                assert_eq!(result["encoding"], "base64");
                assert_eq!(result["body"], "AJ+SlgEC");
                assert!(log.contains("6 bytes of binary data"), "{log}");
            }
            "redirect-not-followed" => {
                assert_eq!(job["reason"], "http_status", "{job}");
                assert_eq!(result.unwrap()["status"], 302);
            }
            "redirect-followed" => {
                assert_eq!(job["status"], "completed", "{job}");
                assert!(
                    result.unwrap()["body"]
                        .as_str()
                        .unwrap()
                        .starts_with("auth=")
                );
            }
            "refused" => {
                assert_eq!(job["status"], "failed", "{job}");
                assert_eq!(job["reason"], "http_error", "{job}");
                assert!(log.contains("the request failed"), "{log}");
            }
            _ => unreachable!(),
        }
    }
}

#[tokio::test]
async fn tool_actions_deliver_through_the_tool_and_fail_after_their_retries() {
    let plane = plane().await;
    let token = plane.token("carol").await;
    let mut endpoint = Endpoint::start().await;
    let (status, slack) = plane
        .send(
            Method::POST,
            "/tools",
            &token,
            Some(json!({"name": "team-slack", "kind": "slack", "config": {"url": format!("{}/slack/canary-path", endpoint.base)}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{slack}");
    let (_, broken) = plane
        .send(
            Method::POST,
            "/tools",
            &token,
            Some(json!({"name": "broken", "kind": "webhook", "config": {"url": format!("{}/status/500", endpoint.base)}})),
        )
        .await;
    let event = plane
        .event(
            &token,
            json!({
                "name": "announce",
                "kind": "tool_action",
                "tool_action": {"tool_id": slack["id"], "title": "Deploy", "message": "v1.2 is <live>"},
            }),
        )
        .await;
    let job = plane.trigger(&token, &event, None).await;
    let received = endpoint.next().await;
    assert_eq!(received.path, "/slack/canary-path");
    let payload: Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(payload, json!({"text": "*Deploy*\nv1.2 is &lt;live&gt;"}));
    let job = plane.ended(&token, &job).await;
    assert_eq!(job["status"], "completed", "{job}");
    let log = log_text(&plane, &token, job["id"].as_str().unwrap()).await;
    assert!(
        log.contains("sending through the slack tool \"team-slack\""),
        "{log}"
    );
    assert!(!log.contains("canary-path") && !job.to_string().contains("canary-path"));

    let failing = plane
        .event(
            &token,
            json!({
                "name": "announce-broken",
                "kind": "tool_action",
                "retries": 1,
                "retry": {"backoff_seconds": 0},
                "tool_action": {"tool_id": broken["id"], "message": "hello"},
            }),
        )
        .await;
    let job = plane.trigger(&token, &failing, None).await;
    let first = endpoint.next().await;
    let second = endpoint.next().await;
    assert_eq!(
        (first.path.as_str(), second.path.as_str()),
        ("/status/500", "/status/500")
    );
    let webhook: Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(webhook["message"], "hello");
    assert_eq!(webhook["notification_id"], job.as_str());
    let job = plane.ended(&token, &job).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason"], "delivery", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let log = log_text(&plane, &token, job["id"].as_str().unwrap()).await;
    assert!(log.contains("not delivered: HTTP 500"), "{log}");
}

#[tokio::test]
async fn bad_http_and_tool_action_fields_are_refused_with_their_field() {
    let plane = plane().await;
    let token = plane.token("dave").await;
    let other = plane.token("erin").await;
    let (_, foreign_tool) = plane
        .send(
            Method::POST,
            "/tools",
            &other,
            Some(json!({"name": "erins", "kind": "webhook", "config": {"url": "http://127.0.0.1:9/x"}})),
        )
        .await;
    let http = |http: Value| json!({"name": "h", "kind": "http_request", "executor": "control_plane", "http": http});
    let cases = [
        (
            http(json!({"method": "GET", "url": "ftp://example.com/"})),
            "http.url",
        ),
        (
            http(json!({"method": "GET", "url": "file:///etc/passwd"})),
            "http.url",
        ),
        (
            http(json!({"method": "GET", "url": "not a url"})),
            "http.url",
        ),
        (
            http(json!({"method": "TRACE", "url": "http://example.com/"})),
            "http.method",
        ),
        (
            http(
                json!({"method": "GET", "url": "http://example.com/", "headers": {"X-A": "a\r\nX-Injected: 1"}}),
            ),
            "http.headers",
        ),
        (
            http(
                json!({"method": "GET", "url": "http://example.com/", "headers": {"Bad Name": "x"}}),
            ),
            "http.headers",
        ),
        (
            http(
                json!({"method": "GET", "url": "http://example.com/", "headers": {"Authorization": "{{secret:MISSING}}"}}),
            ),
            "http",
        ),
        (
            http(
                json!({"method": "GET", "url": "http://example.com/", "expected_status": ["9xx"]}),
            ),
            "http.expected_status",
        ),
        (
            http(json!({"method": "GET", "url": "http://example.com/", "timeout_seconds": 0})),
            "http.timeout_seconds",
        ),
        (json!({"name": "h", "kind": "http_request"}), "http"),
        (
            json!({"name": "h", "kind": "http_request", "executor": "elsewhere", "http": {"method": "GET", "url": "http://example.com/"}}),
            "executor",
        ),
        (
            json!({"name": "h", "kind": "http_request", "runtime": "docker", "http": {"method": "GET", "url": "http://example.com/"}}),
            "runtime",
        ),
        (
            json!({"name": "t", "kind": "tool_action", "tool_action": {"tool_id": "no-such-tool", "message": "m"}}),
            "tool_action.tool_id",
        ),
        (
            json!({"name": "t", "kind": "tool_action", "tool_action": {"tool_id": foreign_tool["id"], "message": "m"}}),
            "tool_action.tool_id",
        ),
        (
            json!({"name": "t", "kind": "tool_action", "tool_action": {"tool_id": foreign_tool["id"], "message": " "}}),
            "tool_action.message",
        ),
        (
            json!({"name": "s", "kind": "bash", "script": "true", "executor": "control_plane"}),
            "executor",
        ),
    ];
    for (body, field) in cases {
        let (status, error) = plane
            .send(Method::POST, "/events", &token, Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {error}");
        assert_eq!(error["error"]["field"], field, "{body} → {error}");
        assert!(!error.to_string().contains("X-Injected"), "{error}");
    }
    let (_, events) = plane.send(Method::GET, "/events", &token, None).await;
    assert_eq!(events, json!([]), "nothing was stored");
}

#[tokio::test]
async fn a_cancelled_control_plane_job_stops_its_request() {
    let plane = plane().await;
    let token = plane.token("frank").await;
    let mut endpoint = Endpoint::start().await;
    let event = plane
        .event(
            &token,
            json!({"name": "hang", "kind": "http_request", "executor": "control_plane",
                   "http": {"method": "GET", "url": format!("{}/slow", endpoint.base), "timeout_seconds": 600}}),
        )
        .await;
    let job = plane.trigger(&token, &event, None).await;
    endpoint.next().await;
    let (status, body) = plane
        .send(Method::POST, &format!("/jobs/{job}/cancel"), &token, None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = plane.ended(&token, &job).await;
    assert_eq!(job["status"], "cancelled", "{job}");
}

#[tokio::test]
async fn public_only_refuses_loopback_by_address_and_by_name() {
    let plane = plane_with(true).await;
    let token = plane.token("grace").await;
    let mut endpoint = Endpoint::start().await;
    let port = endpoint.base.rsplit(':').next().unwrap().to_string();
    let cases = [
        (
            "literal",
            format!("http://127.0.0.1:{port}/echo"),
            "not a public address",
        ),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{port}/echo"),
            "not a public address",
        ),
        (
            "name",
            format!("http://localhost:{port}/echo"),
            "resolves to no public address",
        ),
    ];
    for (name, url, why) in cases {
        let event = plane
            .event(
                &token,
                json!({"name": name, "kind": "http_request", "executor": "control_plane",
                       "http": {"method": "GET", "url": url}}),
            )
            .await;
        let job = plane.trigger(&token, &event, None).await;
        let job = plane.ended(&token, &job).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["reason"], "http_error", "{job}");
        let log = log_text(&plane, &token, job["id"].as_str().unwrap()).await;
        assert!(log.contains(why), "{name}: {log}");
    }
    assert!(
        endpoint.received.try_recv().is_err(),
        "a refused request reached the endpoint"
    );
}
