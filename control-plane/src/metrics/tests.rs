//! `GET /metrics` of a real control plane over its real HTTP listener, with a real in-process
//! agent running the jobs: who may scrape, that the exposition parses (a small parser of the
//! text format below), and that the values follow jobs through the queue.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::crypto::EncryptionKey;
use crate::store::users::Role;
use crate::{Running, ServerConfig};

/// One parsed exposition: every sample by `name{label="value",…}` (labels sorted), and every
/// family's declared type.
#[derive(Debug)]
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// The sample `name` with exactly `labels`, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// The sample, which must be present.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {} in {:#?}", key(name, labels), self.samples))
    }

    /// Every label value of every sample.
    fn label_values(&self) -> Vec<String> {
        let mut values = Vec::new();
        for sample in self.samples.keys() {
            if let Some((_, labels)) = sample.split_once('{') {
                for pair in labels.trim_end_matches('}').split("\",") {
                    if let Some((_, value)) = pair.split_once("=\"") {
                        values.push(value.trim_end_matches('"').to_owned());
                    }
                }
            }
        }
        values
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut labels: Vec<String> = labels
        .iter()
        .map(|(label, value)| format!("{label}=\"{value}\""))
        .collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the text exposition format 0.0.4: `# HELP`/`# TYPE` lines, then samples
/// `name{label="value",…} value` whose family (the name, or a histogram's name without
/// `_bucket`/`_sum`/`_count`) was typed before; label values with `\\`, `\"`, `\n` escapes.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
            if !valid_name(name)
                || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
            {
                return Err(format!("bad TYPE: {line}"));
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(format!("family typed twice: {line}"));
            }
            continue;
        }
        if line.starts_with('#') {
            if !line.starts_with("# HELP ") {
                return Err(format!("unknown comment: {line}"));
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or(format!("no value: {line}"))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(format!("bad metric name: {line}"));
        }
        let mut rest = &line[name_end..];
        let mut labels: Vec<(String, String)> = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let mut end = None;
            while let Some((start, c)) = chars.next() {
                if c == '}' {
                    end = Some(start + 1);
                    break;
                }
                if c == ',' {
                    continue;
                }
                let mut label = String::from(c);
                loop {
                    match chars.next() {
                        Some((_, '=')) => break,
                        Some((_, c)) => label.push(c),
                        None => return Err(format!("unterminated label: {line}")),
                    }
                }
                if !valid_name(&label) || chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(format!("bad label {label:?}: {line}"));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return Err(format!("bad escape: {line}")),
                        },
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("unterminated value: {line}")),
                    }
                }
                labels.push((label, value));
            }
            let end = end.ok_or(format!("unterminated labels: {line}"))?;
            rest = &after[end..];
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or(format!("no space before the value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            number => number
                .parse()
                .map_err(|_| format!("bad value {number:?}: {line}"))?,
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(format!("sample before its TYPE: {line}"));
        }
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(label, value)| (label.as_str(), value.as_str()))
            .collect();
        if samples.insert(key(name, &labels), value).is_some() {
            return Err(format!("duplicate sample: {line}"));
        }
    }
    Ok(Exposition { samples, types })
}

#[test]
fn the_parser_refuses_what_is_not_the_format() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\n\",y=\"2\"} 3\n";
    let parsed = parse(good).unwrap();
    assert_eq!(parsed.value("a_total", &[("y", "2"), ("x", "q\"\n")]), 3.0);
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na{x=\"1\" 2\n",
        "# TYPE a counter\na{x=1} 2\n",
        "# TYPE a counter\na two\n",
        "# TYPE a counter\na 1\na 2\n",
        "# TYPE a gauge\n# TYPE a gauge\n",
        "# TYPE 1a gauge\n",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} parsed");
    }
}

struct Harness {
    dir: tempfile::TempDir,
    running: Running,
    client: reqwest::Client,
    base: String,
    admin: String,
    metrics_token: String,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.running.state.shutdown.cancel();
    }
}

impl Harness {
    async fn start() -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let metrics_token = crate::crypto::random_token("mt_");
        let token_file = dir.path().join("metrics.token");
        std::fs::write(&token_file, format!("{metrics_token}\n")).unwrap();
        let config = ServerConfig {
            metrics_token_sha256: Some(super::load_token_sha256(&token_file).unwrap()),
            ..ServerConfig::for_tests(&dir.path().join("data"), &EncryptionKey::generate_base64())
        };
        let running = crate::start(config, CancellationToken::new())
            .await
            .unwrap();
        let admin = crate::cli::create_api_token(&running.state.store, "admin", "test")
            .await
            .unwrap();
        Harness {
            base: running.local_url(),
            dir,
            running,
            client: reqwest::Client::new(),
            admin,
            metrics_token,
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, String) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, text) = self.request(method, path, Some(&self.admin), body).await;
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn scrape(&self) -> Exposition {
        let response = self
            .client
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.metrics_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = response.text().await.unwrap();
        parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
    }

    /// Creates an event on `agent` running `script` and returns its id.
    async fn event(&self, name: &str, script: &str, agent: &str) -> String {
        let event = self
            .api(
                reqwest::Method::POST,
                "/api/v1/events",
                Some(json!({"name": name, "kind": "bash", "script": script,
                    "targets": {"agents": [agent]}})),
            )
            .await;
        event["id"].as_str().unwrap().to_owned()
    }

    /// Triggers `event` and returns (run id, job id).
    async fn trigger(&self, event: &str) -> (String, String) {
        let run = self
            .api(
                reqwest::Method::POST,
                &format!("/api/v1/events/{event}/runs"),
                Some(json!({})),
            )
            .await;
        (
            run["run_id"].as_str().unwrap().to_owned(),
            run["jobs"][0]["id"].as_str().unwrap().to_owned(),
        )
    }

    /// Waits until every job of the run has a final status.
    async fn wait_run_ended(&self, run: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let shown = self
                .api(reqwest::Method::GET, &format!("/api/v1/runs/{run}"), None)
                .await;
            let ended = shown["jobs"].as_array().is_some_and(|jobs| {
                jobs.iter().all(|job| {
                    ["completed", "failed", "cancelled"]
                        .contains(&job["status"].as_str().unwrap_or(""))
                })
            });
            if ended {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run} did not end: {shown}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the run's only job has a final status and returns it.
    async fn final_status(&self, run: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let shown = self
                .api(reqwest::Method::GET, &format!("/api/v1/runs/{run}"), None)
                .await;
            let status = shown["jobs"][0]["status"].as_str().unwrap_or("").to_owned();
            if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run} did not end: {shown}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Enrolls an in-process agent called `name` (not started) into a fresh state dir.
async fn enroll(harness: &Harness, name: &str) -> (tempfile::TempDir, cronium_agent::Identity) {
    let agent_dir = tempfile::tempdir().unwrap();
    let created = crate::http::enrollment::create_token(
        &harness.running.state,
        &crate::http::enrollment::CreateRequest::default(),
        None,
    )
    .await
    .map_err(|error| format!("{error:?}"))
    .unwrap();
    let url = harness.running.local_url();
    let mut identity = cronium_agent::enroll(cronium_agent::EnrollOptions {
        server_url: url.clone(),
        token: created.token,
        ca_sha256: harness.running.ca_sha256(),
        name: Some(name.into()),
        labels: Default::default(),
        state_dir: agent_dir.path().to_path_buf(),
        force: true,
    })
    .await
    .unwrap();
    identity.quic_addrs = vec![harness.running.quic_addr.to_string()];
    identity.server_url = url;
    identity.save_settings().unwrap();
    (agent_dir, identity)
}

#[tokio::test]
async fn only_the_metrics_token_and_admins_may_scrape() {
    let harness = Harness::start().await;
    let store = &harness.running.state.store;
    store
        .create_user("watcher", "unused", Role::Viewer)
        .await
        .unwrap();
    let viewer = crate::cli::create_api_token(store, "watcher", "test")
        .await
        .unwrap();
    let get = reqwest::Method::GET;
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (Some("mt_not-the-token"), StatusCode::UNAUTHORIZED),
        (Some(viewer.as_str()), StatusCode::FORBIDDEN),
        (Some(harness.admin.as_str()), StatusCode::OK),
        (Some(harness.metrics_token.as_str()), StatusCode::OK),
    ];
    for (token, expected) in cases {
        let (status, body) = harness.request(get.clone(), "/metrics", token, None).await;
        assert_eq!(status, expected, "{token:?}: {body}");
        if expected != StatusCode::OK {
            let error: Value = serde_json::from_str(&body).unwrap();
            assert!(error["error"]["code"].is_string(), "{body}");
        }
    }
    // The metrics token opens nothing else.
    let (status, _) = harness
        .request(
            get,
            "/api/v1/events",
            Some(harness.metrics_token.as_str()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A short token file is refused at start-up.
    let short = harness.dir.path().join("short.token");
    std::fs::write(&short, "too-short\n").unwrap();
    let error = super::load_token_sha256(&short).unwrap_err();
    assert!(error.to_string().contains("at least 32"), "{error}");
}

#[tokio::test]
async fn metrics_follow_jobs_through_the_queue() {
    let harness = Harness::start().await;

    let before = harness.scrape().await;
    assert_eq!(before.types["cronium_jobs"], "gauge");
    assert_eq!(before.types["cronium_job_claim_wait_seconds"], "histogram");
    assert_eq!(before.types["cronium_jobs_finished_total"], "counter");
    assert_eq!(before.types["cronium_http_requests_total"], "counter");
    assert_eq!(before.value("cronium_agents_connected", &[]), 0.0);
    assert_eq!(before.types["cronium_agents_online"], "gauge");
    assert_eq!(before.value("cronium_agents_online", &[]), 0.0);
    for status in ["queued", "claimed", "running"] {
        assert_eq!(before.value("cronium_jobs", &[("status", status)]), 0.0);
    }
    assert_eq!(
        before.value("cronium_job_claim_wait_seconds_count", &[]),
        0.0
    );
    assert_eq!(
        before.value(
            "cronium_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("target", cronium_agent::TARGET),
                ("protocol", &cronium_protocol::PROTOCOL_VERSION.to_string()),
            ]
        ),
        1.0
    );
    assert!(before.value("cronium_uptime_seconds", &[]) >= 0.0);

    // An enrolled agent that is not running yet: its jobs wait in the queue. Another one never
    // runs at all.
    let (agent_dir, identity) = enroll(&harness, "metered").await;
    let (_offline_dir, offline) = enroll(&harness, "zz-offline").await;

    let ok = harness.event("ok", "true", "metered").await;
    let failing = harness.event("failing", "exit 3", "metered").await;
    let (cancelled_run, cancelled_job) = harness.trigger(&ok).await;
    let (ok_run, _) = harness.trigger(&ok).await;
    let queued = harness.scrape().await;
    assert_eq!(queued.value("cronium_jobs", &[("status", "queued")]), 2.0);
    harness
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/jobs/{cancelled_job}/cancel"),
            None,
        )
        .await;
    assert_eq!(harness.final_status(&cancelled_run).await, "cancelled");

    let shutdown = CancellationToken::new();
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
        shutdown.clone(),
    ));
    assert_eq!(harness.final_status(&ok_run).await, "completed");
    let (failing_run, _) = harness.trigger(&failing).await;
    assert_eq!(harness.final_status(&failing_run).await, "failed");
    // A rollout of one host per batch that stops at its first failure: the running agent's host
    // (first by name) fails, the offline one's job is cancelled unstarted.
    let rollout = harness
        .api(
            reqwest::Method::POST,
            "/api/v1/events",
            Some(
                json!({"name": "rollout", "kind": "bash", "script": "exit 3",
                "targets": {"agents": ["metered", "zz-offline"]},
                "rollout": {"batch_size": 1, "max_failures": 1}}),
            ),
        )
        .await;
    let (rollout_run, _) = harness.trigger(rollout["id"].as_str().unwrap()).await;
    // Skipped at once: its only host is offline.
    let skipping = harness
        .api(
            reqwest::Method::POST,
            "/api/v1/events",
            Some(json!({"name": "skipping", "kind": "bash", "script": "true",
                "targets": {"agents": ["zz-offline"]}, "rollout": {"offline": "skip"}})),
        )
        .await;
    let (skipped_run, _) = harness.trigger(skipping["id"].as_str().unwrap()).await;
    assert_eq!(harness.final_status(&skipped_run).await, "cancelled");
    harness.wait_run_ended(&rollout_run).await;
    let (status, _) = harness
        .request(reqwest::Method::GET, "/no-such-page", None, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = harness
        .request(reqwest::Method::GET, "/api/v1/no-such-thing", None, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A made-up method becomes `other`, never a label of its own.
    let (status, _) = harness
        .request(
            reqwest::Method::from_bytes(b"BREW").unwrap(),
            "/healthz",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    let after = harness.scrape().await;
    assert_eq!(after.value("cronium_agents_connected", &[]), 1.0);
    assert_eq!(after.value("cronium_agents_online", &[]), 1.0);
    for status in ["queued", "claimed", "running"] {
        assert_eq!(after.value("cronium_jobs", &[("status", status)]), 0.0);
    }
    // Three claims (the cancelled and skipped jobs never were one); the buckets are cumulative.
    let claims = after.value("cronium_job_claim_wait_seconds_count", &[]);
    assert_eq!(claims, 3.0);
    assert_eq!(
        after.value("cronium_job_claim_wait_seconds_bucket", &[("le", "+Inf")]),
        claims
    );
    let mut previous = 0.0;
    for bound in super::CLAIM_BUCKETS {
        let bucket = after.value(
            "cronium_job_claim_wait_seconds_bucket",
            &[("le", &bound.to_string())],
        );
        assert!(
            bucket >= previous && bucket <= claims,
            "le={bound}: {bucket}"
        );
        previous = bucket;
    }
    assert!(after.value("cronium_job_claim_wait_seconds_sum", &[]) >= 0.0);
    // Each settling path counts: a cancel, results, the rollout's stop, the offline skip.
    let finished = |status: &str, reason: &str| {
        after.value(
            "cronium_jobs_finished_total",
            &[("status", status), ("reason", reason)],
        )
    };
    assert_eq!(finished("completed", "none"), 1.0);
    assert_eq!(finished("failed", "exit_code"), 2.0);
    assert_eq!(finished("cancelled", "cancelled"), 1.0);
    assert_eq!(finished("cancelled", "rollout_stopped"), 1.0);
    assert_eq!(finished("cancelled", "offline"), 1.0);
    // Requests by route template and status class.
    let requests = |route: &str, method: &str, class: &str| {
        after
            .get(
                "cronium_http_requests_total",
                &[("route", route), ("method", method), ("class", class)],
            )
            .unwrap_or(0.0)
    };
    assert_eq!(requests("/api/v1/events/{id}/runs", "POST", "2xx"), 5.0);
    assert_eq!(requests("/api/v1/events", "POST", "2xx"), 4.0);
    assert_eq!(requests("/api/v1/jobs/{id}/cancel", "POST", "2xx"), 1.0);
    assert!(requests("/api/v1/runs/{id}", "GET", "2xx") >= 3.0);
    assert_eq!(requests("unmatched", "GET", "4xx"), 2.0);
    assert_eq!(requests("/healthz", "other", "4xx"), 1.0);
    assert!(!after.label_values().iter().any(|value| value == "BREW"));
    assert_eq!(requests("/metrics", "GET", "2xx"), 2.0);
    // No label carries an id, a token or a name a user chose.
    let secrets = [
        ok.as_str(),
        failing.as_str(),
        ok_run.as_str(),
        cancelled_job.as_str(),
        identity.agent_id.as_str(),
        offline.agent_id.as_str(),
        "metered",
        "zz-offline",
        harness.admin.as_str(),
        harness.metrics_token.as_str(),
    ];
    for value in after.label_values() {
        for secret in secrets {
            assert!(
                !value.contains(secret),
                "label value {value:?} carries {secret:?}"
            );
        }
    }

    shutdown.cancel();
    agent.await.unwrap().unwrap();
}

/// Observations reach the metrics only from operations that committed: a failed operation's
/// savepoint is rolled back and so is what it observed.
#[tokio::test]
async fn only_committed_operations_are_counted() {
    use crate::store::{StoreError, observe, write_op};

    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open_sqlite(&dir.path().join("db.sqlite"))
        .await
        .unwrap();
    let failed: Result<(), StoreError> = write_op!(store, |_conn| async {
        observe::settled("failed", Some("lost"), 5);
        observe::claimed(1);
        Err(StoreError::Corrupt("refused on purpose".into()))
    })
    .await;
    assert!(failed.is_err());
    write_op!(store, |_conn| async {
        observe::settled("completed", None, 2);
        observe::settled("cancelled", Some("rollout_stopped"), 0);
        observe::claimed(1500);
        Ok::<(), StoreError>(())
    })
    .await
    .unwrap();
    // Outside the writer nothing is recorded (and nothing breaks).
    observe::settled("failed", Some("spawn"), 1);

    let exposition = parse(&store.metrics().render(&super::Gauges::default())).unwrap();
    let finished = |status: &str, reason: &str| {
        exposition.get(
            "cronium_jobs_finished_total",
            &[("status", status), ("reason", reason)],
        )
    };
    assert_eq!(finished("completed", "none"), Some(2.0));
    assert_eq!(finished("failed", "lost"), None);
    assert_eq!(finished("failed", "spawn"), None);
    assert_eq!(finished("cancelled", "rollout_stopped"), None);
    assert_eq!(
        exposition.value("cronium_job_claim_wait_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        exposition.value("cronium_job_claim_wait_seconds_sum", &[]),
        1.5
    );
    assert_eq!(
        exposition.value("cronium_job_claim_wait_seconds_bucket", &[("le", "1")]),
        0.0
    );
    assert_eq!(
        exposition.value("cronium_job_claim_wait_seconds_bucket", &[("le", "2.5")]),
        1.0
    );
    store.close().await;
}

#[test]
fn heartbeat_handling_is_a_histogram_in_seconds() {
    let metrics = super::Metrics::default();
    let empty = parse(&metrics.render(&super::Gauges::default())).unwrap();
    assert_eq!(empty.types["cronium_heartbeat_seconds"], "histogram");
    assert_eq!(empty.value("cronium_heartbeat_seconds_count", &[]), 0.0);
    metrics.observe_heartbeat(Duration::from_micros(80));
    metrics.observe_heartbeat(Duration::from_micros(700));
    metrics.observe_heartbeat(Duration::from_millis(30));
    let exposition = parse(&metrics.render(&super::Gauges::default())).unwrap();
    let bucket = |le: &str| exposition.value("cronium_heartbeat_seconds_bucket", &[("le", le)]);
    assert_eq!(bucket("0.0001"), 1.0);
    assert_eq!(bucket("0.0005"), 1.0);
    assert_eq!(bucket("0.001"), 2.0);
    assert_eq!(bucket("0.025"), 2.0);
    assert_eq!(bucket("0.05"), 3.0);
    assert_eq!(bucket("+Inf"), 3.0);
    assert_eq!(
        exposition.value("cronium_heartbeat_seconds_count", &[]),
        3.0
    );
    let sum = exposition.value("cronium_heartbeat_seconds_sum", &[]);
    assert!((sum - 0.03078).abs() < 1e-9, "sum {sum}");
}
