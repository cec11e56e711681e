//! The security sweeps through the real router, over every route it serves.
//!
//! The route list is not written down here: [`discover`] reads every `.route("…", …)` of the
//! control plane's non-test sources (and refuses a route whose path is not a string literal,
//! `route_service`, `nest_service` and any `nest` but `/api/v1`, which it could not follow),
//! then asks the router itself which methods each path answers, at the root and under
//! `/api/v1` (an unregistered method answers 405, an unknown path the fallback's 404). A path in
//! the source that the router does not serve fails the sweep, and so does a served operation
//! missing from `openapi.json` (or documented and not served). So a new route is swept from the
//! moment it is registered: anonymous callers get 401 unless it is on the commented allowlist,
//! viewers get 403 on anything that changes state, a session cookie without its CSRF token gets
//! 403, and a USER gets 403/404 on another user's or an admin's objects, with no secret value
//! (a canary set as a secret env var, a tool's credentials and an SSH password) in any body.
//! Placeholders of a new path must be taught to [`Fixture::value`], which fails naming them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::super::auth::{CSRF_HEADER, SESSION_COOKIE};
use super::{Api, api};
use crate::store::users::Role;

/// The secret value planted everywhere a secret can be set.
const CANARY: &str = "canary-9d2f71c04be8a3e6";

/// The methods every registered path is probed with (HEAD follows GET in axum).
const METHODS: [Method; 6] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Operations that answer without the API's credentials, and why.
const PUBLIC: &[(&str, &str, Public)] = &[
    // Load balancers and `cronium dev` probe it; it says nothing but "ok".
    ("GET", "/healthz", Public::Open),
    // How credentials are obtained in the first place: the username and password in the body
    // are its credential (401 without them).
    ("POST", "/auth/login", Public::OwnCredential),
    // Agents enroll before they have any credential: the single-use enrollment token in the
    // body is the credential, checked by the handler.
    ("POST", "/agents/enroll", Public::Open),
    // The CA certificate is public by nature; the installer pins its fingerprint.
    ("GET", "/agents/ca", Public::Open),
    // The API's public description.
    ("GET", "/openapi.json", Public::Open),
    // The installer and the signed agent releases (public key, binaries, signed manifests):
    // hosts fetch them before they are enrolled; nothing secret is in them.
    ("GET", "/install.sh", Public::Open),
    ("GET", "/downloads/release-key", Public::Open),
    (
        "GET",
        "/downloads/agent/{version}/{target}/{file}",
        Public::Open,
    ),
    // The web console's static files (no secret in them, by the console's invariant); the
    // console logs in through the API.
    ("GET", "/", Public::Open),
    ("GET", "/ui", Public::Open),
    ("GET", "/ui/", Public::Open),
    ("GET", "/ui/{*path}", Public::Open),
    // Webhook triggers carry their own credential: an HMAC of the body with the workflow's
    // webhook secret, so without it the answer is 401 too.
    ("POST", "/hooks/workflows/{id}", Public::OwnCredential),
    // Internal, replica to replica (`http::terminal_relay`): a terminal relayed from the replica
    // a viewer reached, and a recording read from the replica that wrote it. The API's
    // credentials are no use there; the credential is a relay token in `X-Cronium-Relay-Token`
    // (HMAC with the replicas' shared key, seconds long, used once), so without one: 401.
    ("GET", "/internal/terminals/relay", Public::OwnCredential),
    (
        "GET",
        "/internal/terminals/recording",
        Public::OwnCredential,
    ),
];

/// Served but, by design, not part of the API's description.
const UNDOCUMENTED: &[&str] = &["/", "/ui", "/ui/", "/ui/{*path}"];

/// State-changing operations a viewer may make, and why.
const VIEWER_MAY: &[(&str, &str)] = &[
    // Ending one's own session changes nothing of anybody else's.
    ("POST", "/auth/logout"),
    // A pure computation over the body (the next instants of a cron expression): no state.
    ("POST", "/schedules/preview"),
];

/// Operations on a path naming an object that a USER may make whoever "owns" the name, and why.
const NOT_OWNED: &[(&str, &str)] = &[
    // The fleet is shared: every user sees the agents (what they may do with one is checked
    // per operation: terminals need a grant, changes need an admin).
    ("GET", "/agents/{id}"),
    // Variables are per user: the same name is another variable in the caller's own namespace
    // (checked by `a_users_variable_namespace_is_their_own`).
    ("GET", "/variables/{name}"),
    ("PUT", "/variables/{name}"),
    ("DELETE", "/variables/{name}"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Public {
    /// Anybody gets an answer.
    Open,
    /// Refused with 401 without the route's own credential (in the body, or a signature).
    OwnCredential,
}

/// One operation the router serves.
#[derive(Debug, Clone)]
struct Route {
    method: Method,
    template: String,
    /// Served at the root rather than under `/api/v1`.
    root: bool,
}

impl Route {
    fn is(&self, list: &[(&str, &str)]) -> bool {
        list.iter()
            .any(|(method, template)| self.method == *method && self.template == *template)
    }

    fn public(&self) -> Option<Public> {
        PUBLIC
            .iter()
            .find(|(method, template, _)| self.method == *method && self.template == *template)
            .map(|(_, _, public)| *public)
    }

    fn changes_state(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS)
    }

    fn has_params(&self) -> bool {
        self.template.contains('{')
    }

    fn uri(&self, fixture: &Fixture, owner: Owner) -> String {
        let path = fixture.concrete(&self.template, owner);
        if self.root {
            path
        } else {
            format!("/api/v1{path}")
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = if self.root { "" } else { "/api/v1" };
        write!(formatter, "{} {prefix}{}", self.method, self.template)
    }
}

/// The `.rs` files of `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            out.push(path);
        }
    }
}

/// Every path registered with `.route("…")` in the control plane's non-test sources.
fn source_templates() -> BTreeSet<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut templates = BTreeSet::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().to_path_buf();
        let name = relative.file_name().unwrap().to_string_lossy().to_string();
        let in_tests_dir = relative
            .components()
            .any(|part| part.as_os_str() == "tests");
        if name == "tests.rs" || name.ends_with("_tests.rs") || in_tests_dir {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        if let Err(error) = scan_source(&text, &mut templates) {
            panic!("{}: {error}", relative.display());
        }
    }
    assert!(templates.len() > 20, "found only {templates:?}");
    templates
}

/// Adds the route paths registered in one source file; refuses what the sweep could not follow.
fn scan_source(text: &str, templates: &mut BTreeSet<String>) -> Result<(), String> {
    // An inline test module ends the product code of a file.
    let text = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or_default();
    let routing = text.contains("Router");
    for (at, _) in text.match_indices(".route(") {
        let rest = text[at + ".route(".len()..].trim_start();
        match rest
            .strip_prefix('"')
            .and_then(|literal| literal.split_once('"'))
        {
            Some((literal, _)) => {
                templates.insert(literal.to_string());
            }
            None if routing => {
                return Err(format!(
                    "a route whose path is not a string literal cannot be swept: {}",
                    rest.chars().take(60).collect::<String>()
                ));
            }
            None => {}
        }
    }
    for call in [".route_service(", ".nest_service(", ".fallback_service("] {
        if text.contains(call) {
            return Err(format!(
                "`{call}` hides routes from the security sweep; use `.route`"
            ));
        }
    }
    for (at, _) in text.match_indices(".nest(") {
        if !text[at + ".nest(".len()..]
            .trim_start()
            .starts_with("\"/api/v1\"")
        {
            return Err(
                "only `/api/v1` is nested (the sweep probes the root and `/api/v1`)".into(),
            );
        }
    }
    Ok(())
}

/// The scanner itself: it finds literal paths, also split over lines, and refuses what it
/// cannot follow, so a route cannot slip past it by its spelling.
#[test]
fn the_route_scanner_finds_literal_paths_and_refuses_the_rest() {
    let mut found = BTreeSet::new();
    let text = "use axum::Router;\nRouter::new()\n    .route(\"/a/{id}\", get(a))\n    .route(\n        \"/b\",\n        post(b),\n    )\n    .nest(\"/api/v1\", api);\n#[cfg(test)]\nmod tests {\n    Router::new().route(\"/test-only\", get(t));\n}\n";
    scan_source(text, &mut found).unwrap();
    assert_eq!(
        found,
        BTreeSet::from(["/a/{id}".to_string(), "/b".to_string()])
    );
    for refused in [
        "Router::new().route(PATH, get(a))",
        "Router::new().route_service(\"/x\", service)",
        "Router::new().nest_service(\"/x\", service)",
        "Router::new().nest(\"/other\", api)",
    ] {
        assert!(scan_source(refused, &mut found).is_err(), "{refused}");
    }
    // A `.route(` on something that is no router (no `Router` in the file) is not a route.
    scan_source("self.forwards.route(socket_path)", &mut found).unwrap();
}

/// Whose objects a concrete path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Alice,
    Admin,
}

/// Objects of one owner, made through the API.
#[derive(Debug)]
struct Owned {
    username: &'static str,
    user_id: String,
    token: String,
    token_id: String,
    event: String,
    run: String,
    job: String,
    tool: String,
    server: String,
    workflow: String,
    workflow_run: String,
    session: String,
    variable: String,
}

impl Owned {
    /// The ids a USER who does not own them must never see.
    fn ids(&self) -> Vec<&str> {
        vec![
            &self.token_id,
            &self.event,
            &self.run,
            &self.job,
            &self.tool,
            &self.server,
            &self.workflow,
            &self.workflow_run,
            &self.session,
            &self.variable,
        ]
    }
}

/// The world the sweeps run against: an agent, two owners (a USER and an ADMIN) with one object
/// of every owned kind each, another USER and a VIEWER.
struct Fixture {
    agent: String,
    enrollment_token: String,
    alice: Owned,
    admin: Owned,
    bob: String,
    bob_id: String,
    viewer: String,
}

impl Fixture {
    fn owned(&self, owner: Owner) -> &Owned {
        match owner {
            Owner::Alice => &self.alice,
            Owner::Admin => &self.admin,
        }
    }

    /// The value of placeholder `param` after the literal segment `segment`.
    fn value(&self, segment: &str, param: &str, owner: Owner) -> String {
        let owned = self.owned(owner);
        let value = match (segment, param) {
            ("agents", "{id}") => &self.agent,
            ("grants", "{user_id}") | ("users", "{id}") => &owned.user_id,
            ("enrollment-tokens", "{id}") => &self.enrollment_token,
            ("events", "{id}") => &owned.event,
            ("runs", "{id}") => &owned.run,
            ("jobs", "{id}") => &owned.job,
            ("tools", "{id}") => &owned.tool,
            ("servers", "{id}") => &owned.server,
            ("workflows", "{id}") => &owned.workflow,
            ("workflow-runs", "{id}") => &owned.workflow_run,
            ("terminal-sessions", "{id}") => &owned.session,
            ("tokens", "{id}") => &owned.token_id,
            ("variables", "{name}") => &owned.variable,
            ("agent", "{version}") => "latest",
            ("{version}", "{target}") => cronium_agent::TARGET,
            ("{target}", "{file}") => "cronium-agent",
            ("ui", "{*path}") => "index.html",
            _ => panic!(
                "the security sweep does not know what {param} after /{segment}/ names: teach \
                 `Fixture::value` (and give the route a body in `body_for` if it takes one)"
            ),
        };
        value.to_string()
    }

    fn concrete(&self, template: &str, owner: Owner) -> String {
        let mut previous = "";
        let mut path = String::new();
        for segment in template.split('/').skip(1) {
            path.push('/');
            if segment.starts_with('{') {
                path.push_str(&self.value(previous, segment, owner));
            } else {
                path.push_str(segment);
            }
            previous = segment;
        }
        if template.ends_with('/') && !path.ends_with('/') {
            path.push('/');
        }
        path
    }

    /// A valid body for `route` (so a refusal is about who asks, never about the body).
    fn body_for(&self, route: &Route, owner: Owner) -> Option<Value> {
        let owned = self.owned(owner);
        let body = match (route.method.as_str(), route.template.as_str()) {
            ("POST", "/auth/login") => json!({"username": "nobody", "password": "not this"}),
            ("POST", "/agents/enroll") => {
                json!({"token": "not-a-token", "name": "swept", "csr_pem": "-"})
            }
            ("PATCH", "/agents/{id}") => json!({"record_terminals": true}),
            ("PUT", "/agent-update") => json!({"version": "9.9.9"}),
            ("POST", "/enrollment-tokens") => json!({"uses": 1}),
            ("POST", "/events") => json!({"name": "swept", "kind": "bash", "script": "true"}),
            ("PATCH", "/events/{id}") => json!({"name": "renamed-by-the-sweep"}),
            ("POST", "/schedules/preview") => json!({"cron": "0 0 * * *"}),
            ("POST", "/tools") => json!({"name": "swept", "kind": "webhook",
                "config": {"url": "http://127.0.0.1:9/swept"}}),
            ("PATCH", "/tools/{id}") => json!({"name": "renamed-by-the-sweep"}),
            ("POST", "/servers") => json!({"name": "swept", "connection": "ssh",
                "ssh": {"host": "127.0.0.1", "port": 9, "username": "u", "auth": "password",
                        "password": "swept-password"}}),
            ("PATCH", "/servers/{id}") => json!({"name": "renamed-by-the-sweep"}),
            ("PUT", "/variables/{name}") => json!({"value": "written-by-the-sweep"}),
            ("POST", "/users") => {
                json!({"username": "swept", "password": "a long enough password", "role": "user"})
            }
            ("PATCH", "/users/{id}") => json!({"role": "viewer"}),
            ("POST", "/tokens") => json!({"name": "swept"}),
            ("POST", "/workflows") => json!({"name": "swept",
                "nodes": [{"id": "only", "event_id": owned.event}], "edges": []}),
            ("PATCH", "/workflows/{id}") => json!({"name": "renamed-by-the-sweep"}),
            ("POST", "/workflows/{id}/runs") => json!({"input": {}}),
            ("POST", "/events/{id}/runs")
            | ("POST", "/runs/{id}/retry")
            | ("POST", "/tools/{id}/test")
            | ("POST", "/servers/{id}/install-agent")
            | ("POST", "/hooks/workflows/{id}") => json!({}),
            _ => return None,
        };
        Some(body)
    }
}

/// How a request authenticates.
enum Auth<'a> {
    None,
    Bearer(&'a str),
    /// A session cookie, with the `X-CSRF-Token` header when given.
    Cookie(&'a str, Option<&'a str>),
    Raw(&'a str),
}

/// One request through the real router. A server-sent event stream is read up to its first
/// chunk (it never ends by itself).
async fn send(
    api: &Api,
    method: Method,
    uri: &str,
    auth: Auth<'_>,
    body: Option<&Value>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri);
    match auth {
        Auth::None => {}
        Auth::Bearer(token) => {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        Auth::Raw(value) => request = request.header(header::AUTHORIZATION, value),
        Auth::Cookie(session, csrf) => {
            request = request.header(header::COOKIE, format!("{SESSION_COOKIE}={session}"));
            if let Some(csrf) = csrf {
                request = request.header(CSRF_HEADER, csrf);
            }
        }
    }
    let request = match body {
        Some(body) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    };
    let response = super::super::router(api.state().clone())
        .oneshot(request.unwrap())
        .await
        .unwrap();
    let status = response.status();
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    let bytes = if streaming {
        let mut stream = response.into_body().into_data_stream();
        stream.next().await.map(Result::unwrap).unwrap_or_default()
    } else {
        axum::body::to_bytes(response.into_body(), 8 * 1024 * 1024)
            .await
            .unwrap()
    };
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The answer of a fallback: no route at this path.
fn route_missing(status: StatusCode, body: &str) -> bool {
    status == StatusCode::NOT_FOUND && body.contains("route not found")
}

async fn ok(api: &Api, method: Method, uri: &str, token: &str, body: Value) -> Value {
    let (status, text) = send(api, method, uri, Auth::Bearer(token), Some(&body)).await;
    assert!(status.is_success(), "{uri}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn get(api: &Api, uri: &str, token: &str) -> Value {
    let (status, text) = send(api, Method::GET, uri, Auth::Bearer(token), None).await;
    assert!(status.is_success(), "{uri}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

async fn logged_in(api: &Api, username: &str, password: &str) -> (String, String) {
    let body = json!({"username": username, "password": password});
    let request = Request::post("/api/v1/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, headers, body) = api.call(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cookie = headers[header::SET_COOKIE].to_str().unwrap();
    let session = cookie
        .split(';')
        .next()
        .unwrap()
        .strip_prefix(&format!("{SESSION_COOKIE}="))
        .unwrap()
        .to_string();
    (session, body["csrf_token"].as_str().unwrap().to_string())
}

/// A user with a password (so they can log in) and an API token.
async fn user(api: &Api, username: &str, role: Role) -> (String, String) {
    let hash = super::super::auth::hash_password(format!("{username} password"))
        .await
        .unwrap();
    let id = api
        .state()
        .store
        .create_user(username, &hash, role)
        .await
        .unwrap();
    let token = crate::cli::create_api_token(&api.state().store, username, "test")
        .await
        .unwrap();
    (id.id, token)
}

async fn owned(api: &Api, username: &'static str, role: Role, agent: &str) -> Owned {
    let (user_id, token) = user(api, username, role).await;
    let token_id = get(api, "/api/v1/tokens", &token).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let event = ok(
        api,
        Method::POST,
        "/api/v1/events",
        &token,
        json!({
            "name": format!("{username}-event"), "kind": "bash", "script": "echo hi",
            "targets": {"agents": [agent]},
            "secret_env": {"SWEEP_SECRET": CANARY},
            "schedule": {"cron": "0 0 1 1 *"},
        }),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let run = ok(
        api,
        Method::POST,
        &format!("/api/v1/events/{event}/runs"),
        &token,
        json!({}),
    )
    .await["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let job = get(api, &format!("/api/v1/runs/{run}"), &token).await["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let tool = ok(
        api,
        Method::POST,
        "/api/v1/tools",
        &token,
        json!({
            "name": format!("{username}-hook"), "kind": "webhook",
            "config": {"url": format!("http://127.0.0.1:9/{CANARY}"),
                       "headers": {"Authorization": format!("Bearer {CANARY}")},
                       "secret": CANARY},
        }),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let server = ok(
        api,
        Method::POST,
        "/api/v1/servers",
        &token,
        json!({
            "name": format!("{username}-ssh"), "connection": "ssh",
            "ssh": {"host": "127.0.0.1", "port": 9, "username": "u", "auth": "password",
                    "password": CANARY},
        }),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let workflow = ok(
        api,
        Method::POST,
        "/api/v1/workflows",
        &token,
        json!({
            "name": format!("{username}-flow"),
            "nodes": [{"id": "only", "event_id": event}], "edges": [],
            "trigger": {"webhook": true},
        }),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let workflow_run = ok(
        api,
        Method::POST,
        &format!("/api/v1/workflows/{workflow}/runs"),
        &token,
        json!({"input": {}}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let variable = format!("{username}_var");
    ok(
        api,
        Method::PUT,
        &format!("/api/v1/variables/{variable}"),
        &token,
        json!({"value": format!("{username}-value")}),
    )
    .await;
    // A recorded terminal session, as a relay records one.
    let session = crate::store::new_id();
    let recordings = &api.state().config.terminals.recordings_dir;
    std::fs::create_dir_all(recordings).unwrap();
    std::fs::write(
        recordings.join(format!("{session}.cast")),
        "{\"version\": 2}\n",
    )
    .unwrap();
    api.state()
        .store
        .open_terminal_session(&session, agent, &user_id, Some("recorded"))
        .await
        .unwrap();
    Owned {
        username,
        user_id,
        token,
        token_id,
        event,
        run,
        job,
        tool,
        server,
        workflow,
        workflow_run,
        session,
        variable,
    }
}

async fn fixture(api: &Api) -> Fixture {
    let store = &api.state().store;
    let secret = crate::crypto::sha256_hex(b"sweep enrollment");
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
            name: "swept-agent",
            extra_labels: &Default::default(),
            hostname: "h",
            os: "linux",
            arch: "x86_64",
        })
        .await
        .unwrap()
        .unwrap();
    store
        .set_agent_certificate(&agent.id, "sweep-cert")
        .await
        .unwrap();
    let admin = owned(api, "root", Role::Admin, &agent.id).await;
    let alice = owned(api, "alice", Role::User, &agent.id).await;
    let (bob_id, bob) = user(api, "bob", Role::User).await;
    let (_, viewer) = user(api, "vera", Role::Viewer).await;
    let enrollment_token = ok(
        api,
        Method::POST,
        "/api/v1/enrollment-tokens",
        &admin.token,
        json!({"uses": 1}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    Fixture {
        agent: agent.id,
        enrollment_token,
        alice,
        admin,
        bob,
        bob_id,
        viewer,
    }
}

/// Every operation the router serves, found from the source's route paths and the router's own
/// answers (see the module documentation).
async fn discover(api: &Api, fixture: &Fixture) -> Vec<Route> {
    let mut routes = Vec::new();
    for template in source_templates() {
        let mut served = false;
        for root in [false, true] {
            for method in METHODS {
                let route = Route {
                    method: method.clone(),
                    template: template.clone(),
                    root,
                };
                let body = fixture.body_for(&route, Owner::Alice);
                let (status, text) = send(
                    api,
                    method,
                    &route.uri(fixture, Owner::Alice),
                    Auth::None,
                    body.as_ref(),
                )
                .await;
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    served = true;
                } else if !route_missing(status, &text) {
                    served = true;
                    routes.push(route);
                }
            }
        }
        assert!(
            served,
            "{template} is registered in the source but the router serves it neither at the \
             root nor under /api/v1"
        );
    }
    routes
}

/// Every route is documented in `openapi.json` (with its place: root or `/api/v1`), and every
/// documented operation is served.
#[tokio::test]
async fn every_route_the_router_serves_is_documented_and_swept() {
    let api = api().await;
    let fixture = fixture(&api).await;
    let routes = discover(&api, &fixture).await;
    let document: Value = serde_json::from_str(super::super::OPENAPI).unwrap();
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if ["get", "post", "put", "patch", "delete", "options"].contains(&method.as_str()) {
                let root = operation["servers"][0]["url"] == "/";
                documented.insert((method.to_uppercase(), path.clone(), root));
            }
        }
    }
    let mut served = BTreeSet::new();
    for route in &routes {
        let key = (route.method.to_string(), route.template.clone(), route.root);
        if !UNDOCUMENTED.contains(&route.template.as_str()) {
            assert!(
                documented.contains(&key),
                "{route} is served but not in openapi.json (or documented at the wrong place)"
            );
        }
        served.insert(key);
    }
    for key in &documented {
        assert!(served.contains(key), "{key:?} is documented but not served");
    }
    // The allowlists name only what exists, so none of them can go stale silently.
    let exists = |method: &str, template: &str| {
        routes
            .iter()
            .any(|route| route.method == method && route.template == template)
    };
    for (method, template, _) in PUBLIC {
        assert!(exists(method, template), "PUBLIC lists {method} {template}");
    }
    for (method, template) in VIEWER_MAY.iter().chain(NOT_OWNED) {
        assert!(exists(method, template), "a list names {method} {template}");
    }
    assert!(routes.len() >= 60, "only {} operations found", routes.len());
    // Paths nothing registered reach only the fallbacks, whatever the method: no catch-all
    // serves anything the sweep did not see.
    for path in [
        "/not-a-route",
        "/api/v1/not-a-route",
        "/api/v1/events/x/not-a-route",
    ] {
        for method in METHODS {
            let (status, text) = send(&api, method.clone(), path, Auth::None, None).await;
            assert!(
                route_missing(status, &text),
                "{method} {path}: {status} {text}"
            );
        }
    }
}

/// No credentials, a bad token, another scheme or an unknown session: 401 on every route but
/// the allowlist; the allowlisted webhook trigger still wants its own signature.
#[tokio::test]
async fn anonymous_callers_get_401_everywhere_but_the_allowlist() {
    let api = api().await;
    let fixture = fixture(&api).await;
    let routes = discover(&api, &fixture).await;
    let mut checked = 0;
    for route in &routes {
        let uri = route.uri(&fixture, Owner::Alice);
        let body = fixture.body_for(route, Owner::Alice);
        let (status, text) =
            send(&api, route.method.clone(), &uri, Auth::None, body.as_ref()).await;
        match route.public() {
            Some(Public::Open) => {
                assert_ne!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{route} is public: {text}"
                );
                continue;
            }
            Some(Public::OwnCredential) => {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{route} unsigned: {text}");
                continue;
            }
            None => {}
        }
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{route} without credentials: {text}"
        );
        let shape: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(shape["error"]["code"], "unauthorized", "{route}: {text}");
        let session = "0".repeat(43);
        for auth in [
            Auth::Bearer("crt_not-a-real-token"),
            Auth::Raw("Basic cm9vdDpyb290"),
            Auth::Raw("Bearer"),
            Auth::Cookie(&session, Some("forged")),
        ] {
            let (status, text) = send(&api, route.method.clone(), &uri, auth, body.as_ref()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{route} with bad credentials: {text}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} protected operations");
    fixture_is_intact(&api, &fixture).await;
}

/// A viewer changes nothing: 403 on every state-changing route (with a valid body), and every
/// object is as it was.
#[tokio::test]
async fn viewers_get_403_on_every_state_changing_route() {
    let api = api().await;
    let fixture = fixture(&api).await;
    let routes = discover(&api, &fixture).await;
    let mut checked = 0;
    for route in routes.iter().filter(|route| route.changes_state()) {
        if route.public().is_some() || route.is(VIEWER_MAY) {
            continue;
        }
        for owner in [Owner::Alice, Owner::Admin] {
            let body = fixture.body_for(route, owner);
            let (status, text) = send(
                &api,
                route.method.clone(),
                &route.uri(&fixture, owner),
                Auth::Bearer(&fixture.viewer),
                body.as_ref(),
            )
            .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{route} as a viewer: {text}");
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} state-changing operations");
    fixture_is_intact(&api, &fixture).await;
}

/// A session cookie (an admin's, so only the CSRF token can be the reason) without its CSRF
/// token, with a forged one or with another session's: 403 on every state-changing route.
#[tokio::test]
async fn a_session_without_its_csrf_token_changes_nothing() {
    let api = api().await;
    let fixture = fixture(&api).await;
    let routes = discover(&api, &fixture).await;
    let (session, csrf) = logged_in(&api, "root", "root password").await;
    let (_, bobs_csrf) = logged_in(&api, "bob", "bob password").await;
    let truncated = &csrf[..csrf.len() - 1];
    let mut checked = 0;
    for route in routes.iter().filter(|route| route.changes_state()) {
        if route.public().is_some() {
            continue;
        }
        let uri = route.uri(&fixture, Owner::Alice);
        let body = fixture.body_for(route, Owner::Alice);
        for presented in [
            None,
            Some(""),
            Some("forged"),
            Some(truncated),
            Some(&bobs_csrf),
        ] {
            let (status, text) = send(
                &api,
                route.method.clone(),
                &uri,
                Auth::Cookie(&session, presented),
                body.as_ref(),
            )
            .await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{route} with CSRF {presented:?}: {text}"
            );
            assert!(text.contains("CSRF"), "{route}: {text}");
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} state-changing operations");
    // The session itself still works (it was never the reason).
    let (status, _) = send(
        &api,
        Method::GET,
        "/api/v1/auth/me",
        Auth::Cookie(&session, None),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    fixture_is_intact(&api, &fixture).await;
}

/// A USER on another USER's and an ADMIN's objects: 403 or 404 on every route that names one,
/// never their ids in a list, never a secret in any body; the owners read their own objects
/// without any secret value either.
#[tokio::test]
async fn users_never_reach_other_users_objects_nor_any_secret() {
    let api = api().await;
    let fixture = fixture(&api).await;
    let routes = discover(&api, &fixture).await;
    let mut forbidden: Vec<String> = vec![CANARY.to_string()];
    for owner in [&fixture.alice, &fixture.admin] {
        forbidden.push(owner.token.clone());
    }
    let assert_clean = |route: &Route, who: &str, text: &str| {
        for secret in &forbidden {
            assert!(
                !text.contains(secret.as_str()),
                "{route} as {who} returned a secret value: {text}"
            );
        }
    };
    let mut checked = 0;
    // Mutations last, so reads see the objects they name.
    let mut ordered: Vec<&Route> = routes
        .iter()
        .filter(|route| !route.changes_state())
        .collect();
    ordered.extend(routes.iter().filter(|route| route.changes_state()));
    for route in ordered {
        if route.public().is_some() || route.is(NOT_OWNED) {
            continue;
        }
        for owner in [Owner::Alice, Owner::Admin] {
            let owned = fixture.owned(owner);
            let body = fixture.body_for(route, owner);
            // Reads also as a viewer, who owns nothing (its writes are the viewer sweep's).
            let mut callers = vec![("bob", fixture.bob.as_str())];
            if !route.changes_state() {
                callers.push(("vera", fixture.viewer.as_str()));
            }
            for (who, token) in callers {
                let (status, text) = send(
                    &api,
                    route.method.clone(),
                    &route.uri(&fixture, owner),
                    Auth::Bearer(token),
                    body.as_ref(),
                )
                .await;
                assert_clean(route, who, &text);
                if route.has_params() {
                    assert!(
                        status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
                        "{route} on {}'s object as {who}: {status} {text}",
                        owned.username
                    );
                } else if !route.changes_state() {
                    // A list: none of the owner's objects in it.
                    for id in owned.ids() {
                        assert!(
                            !text.contains(id),
                            "{route} as {who} lists {}'s {id}: {text}",
                            owned.username
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} cross-user requests");

    // The owners themselves: every read of their own objects is free of secret values.
    for owner in [Owner::Alice, Owner::Admin] {
        let owned = fixture.owned(owner);
        for route in routes.iter().filter(|route| route.method == Method::GET) {
            let (status, text) = send(
                &api,
                Method::GET,
                &route.uri(&fixture, owner),
                Auth::Bearer(&owned.token),
                None,
            )
            .await;
            assert_clean(route, owned.username, &text);
            // The admin reads every object the sweep names: the concrete paths are right, so a
            // 404 above was the ownership check. (A terminal is a WebSocket: a plain GET is
            // refused before the upgrade.)
            if owner == Owner::Admin
                && route.public().is_none()
                && route.template != "/agents/{id}/terminal"
            {
                assert!(
                    status.is_success() || status.is_redirection(),
                    "{route} as its owner: {status} {text}"
                );
            }
        }
    }
    fixture_is_intact(&api, &fixture).await;
}

/// Variable names are per user: another user's `PUT`/`DELETE` of the same name is their own
/// variable and leaves the owner's alone.
#[tokio::test]
async fn a_users_variable_namespace_is_their_own() {
    let api = api().await;
    let fixture = fixture(&api).await;
    for owner in [Owner::Alice, Owner::Admin] {
        let uri = format!("/api/v1/variables/{}", fixture.owned(owner).variable);
        let (status, _) = send(&api, Method::GET, &uri, Auth::Bearer(&fixture.bob), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = send(&api, Method::DELETE, &uri, Auth::Bearer(&fixture.bob), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        ok(
            &api,
            Method::PUT,
            &uri,
            &fixture.bob,
            json!({"value": "bobs"}),
        )
        .await;
        assert_eq!(get(&api, &uri, &fixture.bob).await["value"], "bobs");
        let (status, _) = send(&api, Method::DELETE, &uri, Auth::Bearer(&fixture.bob), None).await;
        assert!(status.is_success());
    }
    fixture_is_intact(&api, &fixture).await;
    // GET /agents/{id} is the shared fleet: bob sees the agent, but changes nothing of it.
    let agent = format!("/api/v1/agents/{}", fixture.agent);
    assert_eq!(
        get(&api, &agent, &fixture.bob).await["id"],
        fixture.agent.as_str()
    );
    let body = json!({"record_terminals": true});
    let (status, _) = send(
        &api,
        Method::PATCH,
        &agent,
        Auth::Bearer(&fixture.bob),
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Every object of the fixture is still there, unchanged, for its owner; roles are unchanged.
async fn fixture_is_intact(api: &Api, fixture: &Fixture) {
    for owned in [&fixture.alice, &fixture.admin] {
        let token = &owned.token;
        for (path, name) in [
            (
                format!("/events/{}", owned.event),
                format!("{}-event", owned.username),
            ),
            (
                format!("/tools/{}", owned.tool),
                format!("{}-hook", owned.username),
            ),
            (
                format!("/servers/{}", owned.server),
                format!("{}-ssh", owned.username),
            ),
            (
                format!("/workflows/{}", owned.workflow),
                format!("{}-flow", owned.username),
            ),
        ] {
            let object = get(api, &format!("/api/v1{path}"), token).await;
            assert_eq!(object["name"], name.as_str(), "{path}: {object}");
        }
        let variable = get(api, &format!("/api/v1/variables/{}", owned.variable), token).await;
        assert_eq!(variable["value"], format!("{}-value", owned.username));
        let job = get(api, &format!("/api/v1/jobs/{}", owned.job), token).await;
        assert_eq!(job["status"], "queued", "{job}");
        let tokens = get(api, "/api/v1/tokens", token).await;
        assert_eq!(tokens.as_array().unwrap().len(), 1, "{tokens}");
        let sessions = get(api, "/api/v1/terminal-sessions", token).await;
        assert!(sessions.to_string().contains(&owned.session), "{sessions}");
    }
    let users = get(api, "/api/v1/users", &fixture.admin.token).await;
    let users = users.as_array().unwrap();
    assert!(
        users.iter().all(|user| user["username"] != "swept"),
        "{users:?}"
    );
    for (id, role) in [
        (&fixture.alice.user_id, "user"),
        (&fixture.admin.user_id, "admin"),
        (&fixture.bob_id, "user"),
    ] {
        let user = users.iter().find(|user| user["id"] == id.as_str()).unwrap();
        assert_eq!(user["role"], role);
    }
    let agent = get(
        api,
        &format!("/api/v1/agents/{}", fixture.agent),
        &fixture.admin.token,
    )
    .await;
    assert_eq!(agent["record_terminals"], false, "{agent}");
    assert!(agent["revoked_at"].is_null(), "{agent}");
    let policy = send(
        api,
        Method::GET,
        "/api/v1/agent-update",
        Auth::Bearer(&fixture.admin.token),
        None,
    )
    .await;
    assert!(!policy.1.contains("9.9.9"), "{policy:?}");
    let enrollment = get(api, "/api/v1/enrollment-tokens", &fixture.admin.token).await;
    assert_eq!(enrollment.as_array().unwrap().len(), 1, "{enrollment}");
}
