//! API tests through the real router (no socket): authentication on every documented route,
//! bad input, CSRF and roles.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::crypto::EncryptionKey;
use crate::store::users::Role;
use crate::{AppState, Running, ServerConfig};

struct Api {
    _dir: tempfile::TempDir,
    running: Running,
}

/// A configuration for a control plane in `dir` on free loopback ports.
fn config(dir: &std::path::Path, key: &str) -> ServerConfig {
    ServerConfig::for_tests(dir, key)
}

async fn api() -> Api {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let running = crate::start(
        config(dir.path(), &EncryptionKey::generate_base64()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    Api { _dir: dir, running }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.running.state.shutdown.cancel();
    }
}

/// A server-sent-events response of the real router, read event by event (the streaming routes'
/// tests).
struct SseStream {
    body: axum::body::BodyDataStream,
    buffer: Vec<u8>,
}

impl SseStream {
    /// `GET uri` with `token`; the answer must be a 200 event stream.
    async fn open(api: &Api, uri: &str, token: &str) -> SseStream {
        let request = Request::builder()
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let response = crate::http::router(api.state().clone())
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {uri}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        SseStream {
            body: response.into_body().into_data_stream(),
            buffer: Vec::new(),
        }
    }

    /// The next event's name and data; `None` when the stream closed. Fails after 30 s (a
    /// stream that stalls). Comments (keep-alives) are skipped.
    async fn next(&mut self) -> Option<(String, Value)> {
        use futures_util::StreamExt as _;
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                    let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                    let text = String::from_utf8(block).unwrap();
                    let (mut name, mut data) = (None, String::new());
                    for line in text.lines() {
                        if let Some(value) = line.strip_prefix("event:") {
                            name = Some(value.trim().to_string());
                        } else if let Some(value) = line.strip_prefix("data:") {
                            data.push_str(value.trim_start());
                        }
                    }
                    if let Some(name) = name {
                        return Some((name, serde_json::from_str(&data).unwrap()));
                    }
                    continue;
                }
                match self.body.next().await {
                    Some(bytes) => self.buffer.extend_from_slice(&bytes.unwrap()),
                    None => return None,
                }
            }
        })
        .await
        .expect("the event stream stalled")
    }
}

impl Api {
    fn state(&self) -> &AppState {
        &self.running.state
    }

    async fn token(&self, username: &str, role: Role) -> String {
        if self
            .state()
            .store
            .user_with_password(username)
            .await
            .unwrap()
            .is_none()
        {
            self.state()
                .store
                .create_user(username, "unused", role)
                .await
                .unwrap();
        }
        crate::cli::create_api_token(&self.state().store, username, "test")
            .await
            .unwrap()
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = super::router(self.state().clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 4 * 1024 * 1024)
            .await
            .unwrap();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        let (status, _, body) = self.call(request.unwrap()).await;
        (status, body)
    }
}

fn assert_error_shape(body: &Value) {
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "error shape: {body}"
    );
}

/// Routes that answer without credentials, by design.
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("post", "/auth/login"),
    ("post", "/agents/enroll"),
    ("get", "/agents/ca"),
    ("get", "/openapi.json"),
    ("get", "/install.sh"),
    ("get", "/downloads/release-key"),
    ("get", "/downloads/agent/{version}/{target}/{file}"),
    ("post", "/hooks/workflows/{id}"),
];

#[tokio::test]
async fn every_documented_route_exists_and_refuses_anonymous_callers() {
    let api = api().await;
    let document: Value = serde_json::from_str(super::OPENAPI).unwrap();
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "post", "patch", "delete", "put"] {
            if item.get(method).is_none() {
                continue;
            }
            let concrete = path
                .replace("{id}", "00000000000000000000000000000000")
                .replace("{version}", "latest")
                .replace("{target}", cronium_agent::TARGET)
                .replace("{file}", "cronium-agent");
            // Operations served at the root say so with `"servers": [{"url": "/"}]`.
            let at_root = item[method]["servers"][0]["url"] == "/";
            let full = if at_root {
                concrete.clone()
            } else {
                format!("/api/v1{concrete}")
            };
            let method_value = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = api
                .send(method_value.clone(), &full, None, Some("{}"))
                .await;
            if PUBLIC.contains(&(method, path.as_str())) {
                // A public route may answer 404 for what it serves (no release yet), never
                // for the route itself.
                assert!(
                    status != StatusCode::NOT_FOUND
                        || body["error"]["message"] != "route not found",
                    "{method} {full} is documented but missing"
                );
                assert_ne!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {full} is public"
                );
                continue;
            }
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {full} without credentials"
            );
            assert_error_shape(&body);
            let (status, _) = api
                .send(
                    method_value,
                    &full,
                    Some("crt_not-a-real-token"),
                    Some("{}"),
                )
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {full} with a bad token"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 12,
        "only {checked} protected operations found in the document"
    );
}

#[tokio::test]
async fn bad_event_input_is_refused_with_a_field_and_nothing_is_stored() {
    let api = api().await;
    let token = api.token("admin", Role::Admin).await;
    let cases: &[(&str, StatusCode, Option<&str>)] = &[
        ("{not json", StatusCode::BAD_REQUEST, None),
        (
            r#"{"name":"a","kind":"perl","script":"x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("kind"),
        ),
        (
            r#"{"kind":"bash","script":"x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            r#"{"name":"a","kind":"bash"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("script"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","colour":"red"}"#,
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","timeout_seconds":-1}"#,
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","env":{"CRONIUM_JOB_ID":"1"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("env"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","env":{"1BAD":"1"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("env"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"vm"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("runtime"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","image":"bad image"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("image"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","image":"-x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("image"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","limits":{"memory_mb":3}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.memory_mb"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","limits":{"cpus":0}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.cpus"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","limits":{"cpus":65}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.cpus"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","limits":{"pids":0}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.pids"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","limits":{"disk":1}}"#,
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","network":"host"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("network"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"docker","user":"root;id"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("user"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"host","user":"no body"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("user"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","user":"nobody\n"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("user"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","user":"1000:"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("user"),
        ),
        (
            &format!(
                r#"{{"name":"a","kind":"bash","script":"x","user":"{}"}}"#,
                "u".repeat(65)
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("user"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"host","limits":{"memory_mb":0}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.memory_mb"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"host","limits":{"cpus":-1}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.cpus"),
        ),
        (
            r#"{"name":"a","kind":"bash","script":"x","runtime":"host","limits":{"pids":0}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("limits.pids"),
        ),
    ];
    for (body, expected, field) in cases {
        let (status, answer) = api
            .send(Method::POST, "/api/v1/events", Some(&token), Some(body))
            .await;
        assert_eq!(status, *expected, "{body} → {answer}");
        assert_error_shape(&answer);
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], *field, "{body} → {answer}");
        }
    }
    let oversized =
        json!({"name": "big", "kind": "bash", "script": "x".repeat(2 * 1024 * 1024)}).to_string();
    let (status, answer) = api
        .send(
            Method::POST,
            "/api/v1/events",
            Some(&token),
            Some(&oversized),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    let large_script =
        json!({"name": "big", "kind": "bash", "script": "x".repeat(300 * 1024)}).to_string();
    let (status, answer) = api
        .send(
            Method::POST,
            "/api/v1/events",
            Some(&token),
            Some(&large_script),
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("script"))
    );

    let (status, events) = api
        .send(Method::GET, "/api/v1/events", Some(&token), None)
        .await;
    assert_eq!((status, events), (StatusCode::OK, json!([])));

    let (status, created) = api
        .send(
            Method::POST,
            "/api/v1/events",
            Some(&token),
            Some(r#"{"name":"ok","kind":"bash","script":"true"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let path = format!("/api/v1/events/{}/runs", created["id"].as_str().unwrap());
    let (status, answer) = api
        .send(Method::POST, &path, Some(&token), Some("{}"))
        .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("targets"))
    );
    let (status, answer) = api
        .send(
            Method::POST,
            &path,
            Some(&token),
            Some(r#"{"targets":{"agents":["nobody"]}}"#),
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["field"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("targets.agents"))
    );
}

#[tokio::test]
async fn console_sessions_need_the_csrf_token_to_change_anything() {
    let api = api().await;
    let hash = super::auth::hash_password("correct horse".into())
        .await
        .unwrap();
    api.state()
        .store
        .create_user("carol", &hash, Role::User)
        .await
        .unwrap();

    let login = |password: &str| {
        Request::post("/api/v1/auth/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"username": "carol", "password": password}).to_string(),
            ))
            .unwrap()
    };
    let (status, _, _) = api.call(login("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, headers, body) = api.call(login("correct horse")).await;
    assert_eq!(status, StatusCode::OK);
    let cookie = headers[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let csrf = body["csrf_token"].as_str().unwrap().to_string();

    let create = |csrf: Option<&str>| {
        let mut request = Request::post("/api/v1/events")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(csrf) = csrf {
            request = request.header(super::auth::CSRF_HEADER, csrf);
        }
        request
            .body(Body::from(
                r#"{"name":"mine","kind":"bash","script":"true"}"#,
            ))
            .unwrap()
    };
    let (status, _, _) = api.call(create(None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = api.call(create(Some("forged"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = api.call(create(Some(&csrf))).await;
    assert_eq!(status, StatusCode::CREATED);
    let list = Request::get("/api/v1/events")
        .header(header::COOKIE, &session)
        .body(Body::empty())
        .unwrap();
    let (status, _, events) = api.call(list).await;
    assert_eq!(
        (status, events.as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );
}

#[tokio::test]
async fn users_see_only_their_own_events_and_viewers_change_nothing() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let bob = api.token("bob", Role::User).await;
    let viewer = api.token("vera", Role::Viewer).await;
    let admin = api.token("root", Role::Admin).await;
    let (_, event) = api
        .send(
            Method::POST,
            "/api/v1/events",
            Some(&alice),
            Some(r#"{"name":"a","kind":"bash","script":"true"}"#),
        )
        .await;
    let path = format!("/api/v1/events/{}", event["id"].as_str().unwrap());

    assert_eq!(
        api.send(Method::GET, &path, Some(&bob), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.send(Method::DELETE, &path, Some(&bob), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.send(
            Method::POST,
            &format!("{path}/runs"),
            Some(&bob),
            Some("{}")
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.send(Method::GET, "/api/v1/events", Some(&bob), None)
            .await
            .1,
        json!([])
    );
    assert_eq!(
        api.send(Method::GET, &path, Some(&admin), None).await.0,
        StatusCode::OK
    );

    let (status, _) = api
        .send(
            Method::POST,
            "/api/v1/events",
            Some(&viewer),
            Some(r#"{"name":"v","kind":"bash","script":"true"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        api.send(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&alice),
            Some("{}")
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api.send(Method::DELETE, "/api/v1/agents/x", Some(&alice), None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (status, created) = api
        .send(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&admin),
            Some(r#"{"uses":2}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["ca_sha256"].as_str().map(str::len), Some(64));
}

#[tokio::test]
async fn a_wrong_encryption_key_stops_the_control_plane() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let config = |key: &str| config(dir.path(), key);
    let first = EncryptionKey::generate_base64();
    let shutdown = CancellationToken::new();
    let running = crate::start(config(&first), shutdown.clone())
        .await
        .unwrap();
    shutdown.cancel();
    running.wait().await;
    let error = crate::start(
        config(&EncryptionKey::generate_base64()),
        CancellationToken::new(),
    )
    .await
    .err()
    .unwrap();
    assert!(
        format!("{error:#}").contains("ENCRYPTION_KEY does not match"),
        "{error:#}"
    );
}

#[tokio::test]
async fn docker_events_store_their_settings_and_refuse_agents_without_docker() {
    let api = api().await;
    let token = api.token("admin", Role::Admin).await;
    let store = &api.state().store;
    let mut agents = Vec::new();
    for (name, docker) in [("with-docker", true), ("without-docker", false)] {
        let secret = format!("token-{name}");
        store
            .create_enrollment_token(
                &secret,
                &Default::default(),
                1,
                crate::store::now_ms() + 60_000,
                None,
            )
            .await
            .unwrap();
        let (agent, _) = store
            .enroll_agent(crate::store::agents::NewAgent {
                token_sha256: &secret,
                name,
                extra_labels: &Default::default(),
                hostname: "h",
                os: "linux",
                arch: "x86_64",
            })
            .await
            .unwrap()
            .unwrap();
        store
            .set_agent_certificate(&agent.id, &format!("cert-{name}"))
            .await
            .unwrap();
        store
            .record_agent_hello(&agent.id, "0", "h", "linux", "x86_64", docker)
            .await
            .unwrap();
        agents.push(agent.id);
    }

    let body = json!({
        "name": "in-docker", "kind": "python", "script": "print(1)", "runtime": "docker",
        "limits": {"memory_mb": 64, "cpus": 0.5}, "read_only": true, "user": "1000:1000",
        "env": {"SECRET": "s"},
    })
    .to_string();
    let (status, event) = api
        .send(Method::POST, "/api/v1/events", Some(&token), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    assert_eq!(event["runtime"], "docker");
    assert_eq!(event["image"], Value::Null);
    assert_eq!(
        event["limits"],
        json!({"memory_mb": 64, "cpus": 0.5, "pids": 256})
    );
    assert_eq!(event["network"], "none");
    assert_eq!(event["read_only"], true);
    assert_eq!(event["user"], "1000:1000");
    let id = event["id"].as_str().unwrap();

    let runs = format!("/api/v1/events/{id}/runs");
    let (status, answer) = api
        .send(
            Method::POST,
            &runs,
            Some(&token),
            Some(&json!({"targets": {"agents": ["without-docker"]}}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "runtime");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("without-docker")
    );

    let (status, answer) = api
        .send(
            Method::POST,
            &runs,
            Some(&token),
            Some(&json!({"targets": {"agents": ["with-docker"]}}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (_, listed) = api
        .send(Method::GET, "/api/v1/agents", Some(&token), None)
        .await;
    let docker_of = |name: &str| {
        listed
            .as_array()
            .and_then(|agents| agents.iter().find(|agent| agent["name"] == name))
            .map(|agent| agent["docker"].clone())
    };
    assert_eq!(docker_of("with-docker"), Some(json!(true)), "{listed}");
    assert_eq!(docker_of("without-docker"), Some(json!(false)), "{listed}");

    // The job carries a snapshot of the settings with the default image for its kind.
    let claimed = store.claim_jobs(&agents[0], 10, i64::MAX).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let spec: cronium_protocol::RuntimeSpec =
        serde_json::from_str(claimed[0].runtime_spec.as_deref().unwrap()).unwrap();
    assert_eq!(
        spec,
        cronium_protocol::RuntimeSpec::Docker(cronium_protocol::DockerSpec {
            image: "python:3-slim".into(),
            memory_mb: Some(64),
            cpus: Some(0.5),
            pids: Some(256),
            network: cronium_protocol::DockerNetwork::None,
            read_only: true,
            user: Some("1000:1000".into()),
        })
    );

    // PATCH changes only what it names; "" resets the image to the default.
    let (status, event) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/events/{id}"),
            Some(&token),
            Some(r#"{"image":"registry.example:5000/team/py:3.12@sha256:abc","network":"bridge"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{event}");
    assert_eq!(
        event["image"],
        "registry.example:5000/team/py:3.12@sha256:abc"
    );
    assert_eq!(event["network"], "bridge");
    assert_eq!(event["read_only"], true);
    let (_, event) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/events/{id}"),
            Some(&token),
            Some(r#"{"image":""}"#),
        )
        .await;
    assert_eq!(event["image"], Value::Null);
}

#[tokio::test]
async fn host_events_carry_user_and_limits_without_the_docker_pids_default() {
    let api = api().await;
    let token = api.token("admin", Role::Admin).await;
    let store = &api.state().store;
    let agent = store.enroll_test_agent("host-agent").await;

    // No limits: host jobs get none (not the Docker PIDs default), and no user.
    let body = json!({
        "name": "plain", "kind": "bash", "script": "id -u", "runtime": "host",
        "targets": {"agents": ["host-agent"]},
    })
    .to_string();
    let (status, event) = api
        .send(Method::POST, "/api/v1/events", Some(&token), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    assert_eq!(
        event["limits"],
        json!({"memory_mb": null, "cpus": null, "pids": null})
    );
    assert_eq!(event["user"], Value::Null);
    assert!(event.get("image").is_none(), "{event}");
    let plain = event["id"].as_str().unwrap().to_owned();

    let body = json!({
        "name": "limited", "kind": "bash", "script": "id -u", "runtime": "host",
        "targets": {"agents": ["host-agent"]}, "user": "nobody",
        "limits": {"memory_mb": 32, "cpus": 0.5, "pids": 20},
    })
    .to_string();
    let (status, event) = api
        .send(Method::POST, "/api/v1/events", Some(&token), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    assert_eq!(
        event["limits"],
        json!({"memory_mb": 32, "cpus": 0.5, "pids": 20})
    );
    assert_eq!(event["user"], "nobody");
    let limited = event["id"].as_str().unwrap().to_owned();

    // Switching the plain event to Docker shows the container default.
    let (status, docker) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/events/{plain}"),
            Some(&token),
            Some(r#"{"runtime":"docker"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{docker}");
    assert_eq!(docker["limits"]["pids"], 256);
    let (status, host) = api
        .send(
            Method::PATCH,
            &format!("/api/v1/events/{plain}"),
            Some(&token),
            Some(r#"{"runtime":"host"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{host}");
    assert_eq!(host["limits"]["pids"], Value::Null);

    for id in [&plain, &limited] {
        let (status, answer) = api
            .send(
                Method::POST,
                &format!("/api/v1/events/{id}/runs"),
                Some(&token),
                Some("{}"),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let claimed = store.claim_jobs(&agent.id, 10, i64::MAX).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let mut specs: Vec<cronium_protocol::RuntimeSpec> = claimed
        .iter()
        .map(|job| serde_json::from_str(job.runtime_spec.as_deref().unwrap()).unwrap())
        .collect();
    specs.sort_by_key(|spec| format!("{spec:?}"));
    assert_eq!(
        specs,
        [
            cronium_protocol::RuntimeSpec::Host(cronium_protocol::HostSpec::default()),
            cronium_protocol::RuntimeSpec::Host(cronium_protocol::HostSpec {
                user: Some("nobody".into()),
                memory_mb: Some(32),
                cpus: Some(0.5),
                pids: Some(20),
            }),
        ]
    );
}

#[tokio::test]
async fn variables_belong_to_their_owner_and_are_sealed_at_rest() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let bob = api.token("bob", Role::User).await;
    let viewer = api.token("vera", Role::Viewer).await;
    let canary = "canary-variable-value-4711";
    let body = format!(r#"{{"value": {{"token": "{canary}", "n": [1, 2]}}}}"#);
    let (status, stored) = api
        .send(
            Method::PUT,
            "/api/v1/variables/deploy.key",
            Some(&alice),
            Some(&body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!(stored["value"]["token"], canary);
    assert_eq!(stored["updated_by_job"], Value::Null);

    let (status, listed) = api
        .send(Method::GET, "/api/v1/variables", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["name"], "deploy.key");
    assert_eq!(listed[0]["value"]["n"], serde_json::json!([1, 2]));

    // Bob has his own (empty) set; he can neither read nor delete Alice's.
    let (_, listed) = api
        .send(Method::GET, "/api/v1/variables", Some(&bob), None)
        .await;
    assert_eq!(listed, serde_json::json!([]));
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = api
            .send(
                method.clone(),
                "/api/v1/variables/deploy.key",
                Some(&bob),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {body}");
    }
    // Viewers cannot change anything.
    let (status, _) = api
        .send(
            Method::PUT,
            "/api/v1/variables/x",
            Some(&viewer),
            Some(r#"{"value": 1}"#),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Bad names and bodies.
    for (path, body) in [
        ("/api/v1/variables/has%20space", r#"{"value": 1}"#),
        ("/api/v1/variables/x", r#"{"other": 1}"#),
        ("/api/v1/variables/x", "not json"),
    ] {
        let (status, answer) = api.send(Method::PUT, path, Some(&alice), Some(body)).await;
        assert!(status.is_client_error(), "{path} {body}: {status}");
        assert_error_shape(&answer);
    }
    let long_name = format!("/api/v1/variables/{}", "n".repeat(129));
    let (status, answer) = api.send(Method::GET, &long_name, Some(&alice), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["error"]["field"], "name");
    let huge = format!(
        r#"{{"value": "{}"}}"#,
        "x".repeat(cronium_protocol::MAX_HELPER_VALUE)
    );
    let (status, answer) = api
        .send(
            Method::PUT,
            "/api/v1/variables/huge",
            Some(&alice),
            Some(&huge),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");

    // At rest the value is sealed: the canary is nowhere in the database files.
    api.state().store.close().await;
    for entry in std::fs::read_dir(api._dir.path()).unwrap().flatten() {
        if entry.file_name().to_string_lossy().contains("db") {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes
                    .windows(canary.len())
                    .any(|window| window == canary.as_bytes()),
                "{} holds the variable in the clear",
                entry.path().display()
            );
        }
    }
}

#[tokio::test]
async fn me_names_the_caller_and_gives_a_console_session_its_csrf_token_again() {
    let api = api().await;
    let hash = super::auth::hash_password("correct horse".into())
        .await
        .unwrap();
    api.state()
        .store
        .create_user("dora", &hash, Role::Viewer)
        .await
        .unwrap();
    let login = Request::post("/api/v1/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"username": "dora", "password": "correct horse"}).to_string(),
        ))
        .unwrap();
    let (status, headers, body) = api.call(login).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cookie = headers[header::SET_COOKIE].to_str().unwrap();
    let session = cookie.split(';').next().unwrap().to_string();

    let me = Request::get("/api/v1/auth/me")
        .header(header::COOKIE, &session)
        .body(Body::empty())
        .unwrap();
    let (status, _, answer) = api.call(me).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["username"], "dora");
    assert_eq!(answer["role"], "viewer");
    assert_eq!(answer["id"], body["user"]["id"]);
    assert_eq!(answer["csrf_token"], body["csrf_token"]);

    // A bearer token has no session, hence no CSRF token.
    let token = api.token("dora", Role::Viewer).await;
    let (status, answer) = api
        .send(Method::GET, "/api/v1/auth/me", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["username"], "dora");
    assert!(answer["csrf_token"].is_null(), "{answer}");

    // After logout the cookie names nobody.
    let csrf = body["csrf_token"].as_str().unwrap();
    let logout = Request::post("/api/v1/auth/logout")
        .header(header::COOKIE, &session)
        .header(super::auth::CSRF_HEADER, csrf)
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.call(logout).await.0, StatusCode::NO_CONTENT);
    let me = Request::get("/api/v1/auth/me")
        .header(header::COOKIE, &session)
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.call(me).await.0, StatusCode::UNAUTHORIZED);
}

/// A GET without credentials: status, headers and the raw body.
async fn fetch_raw(
    api: &Api,
    path: &str,
    if_none_match: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut request = Request::get(path);
    if let Some(etag) = if_none_match {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let response = super::router(api.state().clone())
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap();
    (status, headers, bytes.to_vec())
}

fn assert_console_security_headers(path: &str, headers: &axum::http::HeaderMap) {
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(
            csp.contains(directive),
            "{path}: CSP {csp:?} lacks {directive:?}"
        );
    }
    assert!(!csp.contains("script-src 'self' 'unsafe"), "{path}: {csp}");
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer", "{path}");
}

#[tokio::test]
async fn the_console_is_served_without_credentials_with_security_headers_and_caching() {
    let api = api().await;
    for path in ["/", "/ui"] {
        let (status, headers, _) = fetch_raw(&api, path, None).await;
        assert!(status.is_redirection(), "{path}: {status}");
        assert_eq!(headers[header::LOCATION], "/ui/", "{path}");
    }

    let mut assets = std::collections::BTreeSet::new();
    for (path, needle) in [
        ("/ui/", "/ui/assets/index-"),
        ("/ui/terminal", "/ui/assets/terminal-"),
        ("/ui/terminal.html", "/ui/assets/terminal-"),
    ] {
        let (status, headers, body) = fetch_raw(&api, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/html; charset=utf-8",
            "{path}"
        );
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        assert_console_security_headers(path, &headers);
        let page = String::from_utf8(body).unwrap();
        assert!(
            page.contains(needle),
            "{path} does not load {needle}…: {page}"
        );
        // Every script and style the page loads, from `src="…"` and `href="…"`.
        for attribute in ["src=\"", "href=\""] {
            for piece in page.split(attribute).skip(1) {
                let url = piece.split('"').next().unwrap();
                assert!(url.starts_with("/ui/"), "{path} loads {url}");
                assets.insert(url.to_string());
            }
        }

        // The ETag lets the browser revalidate a page without downloading it again.
        let etag = headers[header::ETAG].to_str().unwrap().to_string();
        let (status, headers, body) = fetch_raw(&api, path, Some(&etag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(body.is_empty());
        assert_console_security_headers(path, &headers);
    }
    assert!(
        assets.iter().any(|asset| asset.ends_with(".js"))
            && assets.iter().any(|asset| asset.ends_with(".css")),
        "{assets:?}"
    );
    for asset in &assets {
        let (status, headers, body) = fetch_raw(&api, asset, None).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
        assert!(!body.is_empty(), "{asset}");
        let expected = match asset.rsplit_once('.').map(|(_, extension)| extension) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            _ => panic!("unexpected file {asset}"),
        };
        assert_eq!(headers[header::CONTENT_TYPE], expected, "{asset}");
        // Vite names what it builds after the contents; other files keep their names.
        let cache = if asset.starts_with("/ui/assets/") {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        };
        assert_eq!(headers[header::CACHE_CONTROL], cache, "{asset}");
        assert_console_security_headers(asset, &headers);
    }

    for path in [
        "/ui/nothing-here",
        "/ui/assets/missing.js",
        "/ui/../Cargo.toml",
        "/ui/%2e%2e/Cargo.toml",
        "/ui//etc/passwd",
    ] {
        let (status, headers, body) = fetch_raw(&api, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_console_security_headers(path, &headers);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_error_shape(&body);
    }
}

/// `GET` of a path with the raw answer.
async fn get_raw(api: &Api, path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = super::router(api.state().clone())
        .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap();
    (status, headers, bytes.to_vec())
}

#[tokio::test]
async fn install_script_and_agent_downloads_are_served_from_the_releases_dir_only() {
    let api = api().await;
    let (status, _, body) = get_raw(&api, "/install.sh").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no release key yet"
    );
    assert!(String::from_utf8_lossy(&body).contains("no_release_key"));

    let data_dir = api._dir.path();
    let releases = data_dir.join("releases");
    let key = crate::release::ReleaseKey::generate();
    std::fs::write(data_dir.join("release-signing.key"), key.to_pem()).unwrap();
    let binary = data_dir.join("agent-build");
    std::fs::write(&binary, b"agent bytes").unwrap();
    let target = cronium_agent::TARGET;
    crate::release::publish(&releases, &binary, &key, "0.9.0", target).unwrap();
    crate::release::publish(&releases, &binary, &key, "0.10.0", target).unwrap();

    let (status, headers, body) = get_raw(&api, "/install.sh").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/x-shellscript")
    );
    let script = String::from_utf8(body).unwrap();
    assert!(script.starts_with("#!/bin/sh\n"));
    assert!(script.contains(&format!("CRONIUM_URL='{}'", api.state().config.public_url)));
    assert!(script.contains(&format!(
        "CRONIUM_CA_SHA256='{}'",
        api.state().ca.fingerprint()
    )));
    assert!(script.contains(key.public().to_pem().trim_end()));
    assert!(
        script.contains("NoNewPrivileges=yes"),
        "the unit is embedded"
    );
    assert!(!script.contains("@CRONIUM_"), "every placeholder is filled");
    assert!(!script.contains("PRIVATE KEY"));

    let (status, _, body) = get_raw(&api, "/downloads/release-key").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, key.public().to_pem().into_bytes());

    let base = format!("/downloads/agent/latest/{target}");
    let (status, headers, manifest) =
        get_raw(&api, &format!("{base}/cronium-agent.manifest.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-cronium-release-version"], "0.10.0");
    let (_, _, manifest_signature) =
        get_raw(&api, &format!("{base}/cronium-agent.manifest.json.sig")).await;
    let (_, _, agent) = get_raw(&api, &format!("{base}/cronium-agent")).await;
    let (_, _, signature) = get_raw(&api, &format!("{base}/cronium-agent.sig")).await;
    let verified = crate::release::verify_release(
        &key.public(),
        &agent,
        &signature,
        &manifest,
        &manifest_signature,
    )
    .unwrap();
    assert_eq!(verified.version, "0.10.0");
    let (status, _, _) = get_raw(
        &api,
        &format!("/downloads/agent/0.9.0/{target}/cronium-agent.sig"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    for path in [
        format!("/downloads/agent/latest/{target}/release-key.pub"),
        format!("/downloads/agent/latest/{target}/..%2F..%2Frelease-signing.key"),
        format!("/downloads/agent/..%2F..%2F/{target}/cronium-agent"),
        "/downloads/agent/0.9.0/..%2F..%2F..%2F/cronium-agent".to_owned(),
        format!("/downloads/agent/0.9.0/{target}/..%2Fcronium-agent"),
        format!("/downloads/agent/0.9.0/{target}%00/cronium-agent"),
        format!("/downloads/agent/1.0.0/{target}/cronium-agent"),
        "/downloads/agent/latest/no-such-target/cronium-agent".to_owned(),
        "/downloads/release-signing.key".to_owned(),
    ] {
        let (status, _, body) = get_raw(&api, &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            !String::from_utf8_lossy(&body).contains("PRIVATE"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn runs_list_newest_first_per_owner_with_status_filters() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let bob = api.token("bob", Role::User).await;
    let admin = api.token("root", Role::Admin).await;
    let store = &api.state().store;
    let agent = store.enroll_test_agent("runner").await;

    // Each user's event, and runs of them: two of alice's, one of bob's.
    let mut run_ids = Vec::new();
    for (token, name) in [(&alice, "alices"), (&bob, "bobs"), (&alice, "alices")] {
        let (status, events) = api
            .send(Method::GET, "/api/v1/events", Some(token), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        let id = match events.as_array().unwrap().first() {
            Some(event) => event["id"].as_str().unwrap().to_string(),
            None => {
                let body = json!({"name": name, "kind": "bash", "script": "true",
                    "targets": {"agents": ["runner"]}})
                .to_string();
                let (status, event) = api
                    .send(Method::POST, "/api/v1/events", Some(token), Some(&body))
                    .await;
                assert_eq!(status, StatusCode::CREATED, "{event}");
                event["id"].as_str().unwrap().to_string()
            }
        };
        let (status, run) = api
            .send(
                Method::POST,
                &format!("/api/v1/events/{id}/runs"),
                Some(token),
                Some("{}"),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{run}");
        run_ids.push((
            run["run_id"].as_str().unwrap().to_string(),
            run["jobs"][0]["id"].as_str().unwrap().to_string(),
        ));
    }
    let ids = |runs: &Value| -> Vec<String> {
        runs.as_array()
            .unwrap()
            .iter()
            .map(|run| run["id"].as_str().unwrap().to_string())
            .collect()
    };

    let (status, runs) = api
        .send(Method::GET, "/api/v1/runs", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{runs}");
    assert_eq!(ids(&runs), vec![run_ids[2].0.clone(), run_ids[0].0.clone()]);
    assert_eq!(runs[0]["event_name"], "alices");
    assert_eq!(runs[0]["status"], "queued");
    assert_eq!(runs[0]["counts"]["queued"], 1);
    assert_eq!(runs[0]["jobs"][0]["id"], json!(run_ids[2].1));
    assert_eq!(runs[0]["jobs"][0]["agent_id"], json!(agent.id));
    assert!(
        runs[0]["jobs"][0].get("output").is_none(),
        "no output in a listing"
    );

    let (_, runs) = api
        .send(Method::GET, "/api/v1/runs", Some(&admin), None)
        .await;
    assert_eq!(
        ids(&runs),
        vec![
            run_ids[2].0.clone(),
            run_ids[1].0.clone(),
            run_ids[0].0.clone()
        ]
    );
    let (_, runs) = api
        .send(Method::GET, "/api/v1/runs?limit=1", Some(&admin), None)
        .await;
    assert_eq!(ids(&runs), vec![run_ids[2].0.clone()]);

    // Cancelling a queued job ends it at once: its run is cancelled, the others stay queued.
    let (status, _) = api
        .send(
            Method::POST,
            &format!("/api/v1/jobs/{}/cancel", run_ids[0].1),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, runs) = api
        .send(
            Method::GET,
            "/api/v1/runs?status=cancelled",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(ids(&runs), vec![run_ids[0].0.clone()]);
    assert_eq!(runs[0]["status"], "cancelled");
    assert!(runs[0]["finished_at"].is_string(), "{runs}");
    let (_, runs) = api
        .send(
            Method::GET,
            "/api/v1/runs?status=queued",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(ids(&runs), vec![run_ids[2].0.clone()]);
    assert_eq!(runs[0]["finished_at"], Value::Null);
    let (_, runs) = api
        .send(
            Method::GET,
            "/api/v1/runs?status=failed",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(runs, json!([]));
    // A status poller can leave the jobs' output out.
    let (status, run) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{}?output=false", run_ids[0].0),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["jobs"][0]["status"], "cancelled");
    assert!(run["jobs"][0].get("output").is_none(), "{run}");
    let (_, run) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{}", run_ids[0].0),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(run["jobs"][0]["output"], "");
    let event_id = runs_event_id(&api, &admin, &run_ids[1].0).await;
    let (_, runs) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs?event_id={event_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(ids(&runs), vec![run_ids[1].0.clone()]);

    for (query, field) in [
        ("status=bogus", "status"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
    ] {
        let (status, answer) = api
            .send(
                Method::GET,
                &format!("/api/v1/runs?{query}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(
            (status, &answer["error"]["field"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &json!(field)),
            "{query}"
        );
    }
}

async fn runs_event_id(api: &Api, token: &str, run_id: &str) -> String {
    let (status, run) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{run_id}"),
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    run["event_id"].as_str().unwrap().to_string()
}

mod changes;
mod contract;
mod dispatch;
mod pool;
mod run_events;
mod security;
mod terminal_relay;
mod users;
