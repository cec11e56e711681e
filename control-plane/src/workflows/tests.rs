//! The workflow rules without a database: validation (cycles named, unknown nodes,
//! duplicates, entry nodes) and the decisions (edges, joins, skips, data passing).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;

fn definition(value: Value) -> Definition {
    serde_json::from_value(value).unwrap()
}

fn node(id: &str) -> Value {
    json!({"id": id, "event_id": format!("event-{id}")})
}

fn view(state: NodeState, result: Value, condition: Option<bool>) -> NodeView {
    NodeView {
        state,
        result,
        condition,
    }
}

fn views(entries: &[(&str, NodeView)]) -> BTreeMap<String, NodeView> {
    entries
        .iter()
        .map(|(id, view)| (id.to_string(), view.clone()))
        .collect()
}

#[test]
fn cycles_are_refused_naming_the_cycle() {
    let graph = definition(json!({
        "nodes": [node("start"), node("a"), node("b"), node("c")],
        "edges": [
            {"from": "start", "to": "a"},
            {"from": "a", "to": "b"},
            {"from": "b", "to": "c"},
            {"from": "c", "to": "a", "on": "failure"},
        ],
    }));
    let error = graph.validate().unwrap_err();
    assert_eq!(error.field, "edges");
    assert_eq!(error.message, "cycles are not allowed: a → b → c → a");

    let self_loop = definition(json!({
        "nodes": [node("start"), node("a")],
        "edges": [{"from": "start", "to": "a"}, {"from": "a", "to": "a"}],
    }));
    assert_eq!(
        self_loop.validate().unwrap_err().message,
        "cycles are not allowed: a → a"
    );
}

#[test]
fn a_graph_without_an_entry_node_is_refused() {
    let graph = definition(json!({
        "nodes": [node("a"), node("b")],
        "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}],
    }));
    let error = graph.validate().unwrap_err();
    assert_eq!(error.field, "edges");
    assert!(error.message.contains("no entry node"), "{error:?}");
}

#[test]
fn unknown_and_duplicate_nodes_and_edges_are_refused_with_their_field() {
    let cases = [
        (
            json!({"nodes": [node("a"), node("a")], "edges": []}),
            "nodes[1].id",
        ),
        (
            json!({"nodes": [node("a")], "edges": [{"from": "a", "to": "ghost"}]}),
            "edges[0].to",
        ),
        (
            json!({"nodes": [node("a")], "edges": [{"from": "ghost", "to": "a"}]}),
            "edges[0].from",
        ),
        (
            json!({"nodes": [node("a"), node("b")], "edges": [
                {"from": "a", "to": "b"}, {"from": "a", "to": "b", "on": "success"}]}),
            "edges[1]",
        ),
        (
            json!({"nodes": [node("a"), node("b")], "edges": [
                {"from": "a", "to": "b", "condition": false}]}),
            "edges[0].condition",
        ),
        (json!({"nodes": [], "edges": []}), "nodes"),
        (
            json!({"nodes": [{"id": "bad id", "event_id": "x"}], "edges": []}),
            "nodes[0].id",
        ),
    ];
    for (graph, field) in cases {
        let error = definition(graph.clone()).validate().unwrap_err();
        assert_eq!(error.field, field, "{graph}: {error:?}");
    }
    // Two condition edges with different values between the same nodes are fine.
    definition(json!({"nodes": [node("a"), node("b")], "edges": [
        {"from": "a", "to": "b", "on": "condition", "condition": true},
        {"from": "a", "to": "b", "on": "condition", "condition": false}]}))
    .validate()
    .unwrap();
}

#[test]
fn entry_nodes_start_with_the_input_and_condition_edges_pick_a_branch() {
    let graph = definition(json!({
        "nodes": [node("check"), node("yes"), node("no")],
        "edges": [
            {"from": "check", "to": "yes", "on": "condition"},
            {"from": "check", "to": "no", "on": "condition", "condition": false},
        ],
    }));
    graph.validate().unwrap();
    let input = json!({"x": 1});
    assert_eq!(
        decide(&graph, &BTreeMap::new(), &input),
        [Decision::Start {
            node: "check".into(),
            input: input.clone()
        }]
    );
    let ended = views(&[
        (
            "check",
            view(NodeState::Completed, json!({"v": 2}), Some(false)),
        ),
        ("yes", NodeView::pending()),
        ("no", NodeView::pending()),
    ]);
    assert_eq!(
        decide(&graph, &ended, &input),
        [
            Decision::Skip { node: "yes".into() },
            Decision::Start {
                node: "no".into(),
                input: json!({"v": 2})
            },
        ]
    );
    // A node that set no condition takes neither condition edge; a failed one neither.
    for (state, condition) in [
        (NodeState::Completed, None),
        (NodeState::Failed, Some(true)),
    ] {
        let ended = views(&[("check", view(state, Value::Null, condition))]);
        assert_eq!(
            decide(&graph, &ended, &input),
            [
                Decision::Skip { node: "yes".into() },
                Decision::Skip { node: "no".into() },
            ]
        );
    }
}

#[test]
fn success_failure_and_always_edges_follow_the_outcome() {
    let graph = definition(json!({
        "nodes": [node("a"), node("ok"), node("bad"), node("both")],
        "edges": [
            {"from": "a", "to": "ok"},
            {"from": "a", "to": "bad", "on": "failure"},
            {"from": "a", "to": "both", "on": "always"},
        ],
    }));
    let failed = views(&[("a", view(NodeState::Failed, json!("r"), None))]);
    assert_eq!(
        decide(&graph, &failed, &Value::Null),
        [
            Decision::Skip { node: "ok".into() },
            Decision::Start {
                node: "bad".into(),
                input: json!("r")
            },
            Decision::Start {
                node: "both".into(),
                input: json!("r")
            },
        ]
    );
    // Still running: nothing is decided downstream.
    let running = views(&[("a", view(NodeState::Running, Value::Null, None))]);
    assert!(decide(&graph, &running, &Value::Null).is_empty());
}

#[test]
fn join_all_waits_for_every_edge_and_gets_the_results_by_node() {
    let graph = definition(json!({
        "nodes": [node("root"), node("left"), node("right"), node("join")],
        "edges": [
            {"from": "root", "to": "left"},
            {"from": "root", "to": "right"},
            {"from": "left", "to": "join"},
            {"from": "right", "to": "join"},
        ],
    }));
    let mut state = views(&[
        ("root", view(NodeState::Completed, json!(1), None)),
        ("left", view(NodeState::Completed, json!("L"), None)),
        ("right", view(NodeState::Running, Value::Null, None)),
    ]);
    assert!(decide(&graph, &state, &Value::Null).is_empty());
    state.insert(
        "right".into(),
        view(NodeState::Completed, json!({"r": true}), None),
    );
    assert_eq!(
        decide(&graph, &state, &Value::Null),
        [Decision::Start {
            node: "join".into(),
            input: json!({"left": "L", "right": {"r": true}})
        }]
    );
    // One branch failed: the join starts with the taken edge only.
    state.insert("right".into(), view(NodeState::Failed, json!("x"), None));
    assert_eq!(
        decide(&graph, &state, &Value::Null),
        [Decision::Start {
            node: "join".into(),
            input: json!({"left": "L"})
        }]
    );
    // Both branches skipped: the join is skipped.
    state.insert("left".into(), view(NodeState::Skipped, Value::Null, None));
    state.insert("right".into(), view(NodeState::Skipped, Value::Null, None));
    assert_eq!(
        decide(&graph, &state, &Value::Null),
        [Decision::Skip {
            node: "join".into()
        }]
    );
}

#[test]
fn join_any_starts_on_the_first_taken_edge() {
    let graph = definition(json!({
        "nodes": [node("root"), node("left"), node("right"),
                  {"id": "join", "event_id": "e", "join": "any"}],
        "edges": [
            {"from": "root", "to": "left"},
            {"from": "root", "to": "right"},
            {"from": "left", "to": "join"},
            {"from": "right", "to": "join"},
        ],
    }));
    let state = views(&[
        ("root", view(NodeState::Completed, json!(1), None)),
        ("left", view(NodeState::Running, Value::Null, None)),
        ("right", view(NodeState::Completed, json!("R"), None)),
    ]);
    assert_eq!(
        decide(&graph, &state, &Value::Null),
        [Decision::Start {
            node: "join".into(),
            input: json!("R")
        }]
    );
}

#[test]
fn a_run_ends_failed_if_any_node_failed_else_completed() {
    let done = views(&[
        ("a", view(NodeState::Completed, Value::Null, None)),
        ("b", view(NodeState::Skipped, Value::Null, None)),
    ]);
    assert_eq!(final_status(&done), Some("completed"));
    let failed = views(&[
        ("a", view(NodeState::Failed, Value::Null, None)),
        ("b", view(NodeState::Completed, Value::Null, None)),
    ]);
    assert_eq!(final_status(&failed), Some("failed"));
    let open = views(&[("a", view(NodeState::Running, Value::Null, None))]);
    assert_eq!(final_status(&open), None);
}

#[test]
fn webhook_signatures_are_hmac_sha256_in_hex() {
    use crate::http::workflows::signature_matches;
    // RFC 4231, test case 2.
    let (key, body) = (b"Jefe", b"what do ya want for nothing?");
    let tag = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
    assert!(signature_matches(key, body, &format!("sha256={tag}")));
    assert!(!signature_matches(key, body, tag), "the prefix is required");
    assert!(!signature_matches(
        key,
        b"what do ya want for nothing!",
        &format!("sha256={tag}")
    ));
    assert!(!signature_matches(b"jefe", body, &format!("sha256={tag}")));
    assert!(!signature_matches(
        key,
        body,
        &format!("sha256={}", &tag[..62])
    ));
    assert!(!signature_matches(key, body, "sha256=not-hex"));
    assert!(!signature_matches(key, body, ""));
}

mod durable {
    //! The engine against a real database and control plane (no agent: the test claims and
    //! settles the jobs through the store, as an agent's session would).

    use std::time::{Duration, Instant};

    use axum::body::Body;
    use axum::http::{Method, Request, header};
    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use crate::crypto::EncryptionKey;
    use crate::store::jobs::{Attempt, AttemptResult, FinishOutcome, JobStatus};
    use crate::store::users::Role;
    use crate::store::{Store, now_ms};
    use crate::{AppState, Running, ServerConfig};

    fn config(dir: &std::path::Path, key: &str) -> ServerConfig {
        ServerConfig::for_tests(dir, key)
    }

    async fn start(dir: &std::path::Path, key: &str) -> Running {
        let _ = rustls::crypto::ring::default_provider().install_default();
        crate::start(config(dir, key), CancellationToken::new())
            .await
            .unwrap()
    }

    async fn stop(running: Running) {
        running.state.shutdown.cancel();
        running.wait().await;
    }

    async fn call(state: &AppState, token: &str, method: Method, path: &str, body: Value) -> Value {
        let request = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = crate::http::router(state.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// Claims the agent's queued jobs and completes each with `result`, through the store only
    /// (nothing is announced on the job-change broadcast). Returns the job ids.
    async fn complete_queued(store: &Store, agent: &str, result: &Value) -> Vec<String> {
        let claimed = store
            .claim_jobs(agent, 10, now_ms() + 60_000)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for job in claimed {
            let attempt = Attempt {
                job_id: job.id.clone(),
                attempt: job.attempt,
            };
            let finished = AttemptResult {
                status: JobStatus::Completed,
                reason: None,
                exit_code: Some(0),
                log_len: 0,
                result: Some(result.to_string()),
                condition: None,
            };
            let outcome = store
                .finish_attempt(agent, &attempt, &[], &finished)
                .await
                .unwrap();
            assert!(
                matches!(outcome, FinishOutcome::Recorded { .. }),
                "{outcome:?}"
            );
            ids.push(job.id);
        }
        ids
    }

    async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn node_state(store: &Store, run: &str, node: &str) -> String {
        let run = store.workflow_run(run).await.unwrap();
        run.nodes
            .into_iter()
            .find(|stored| stored.node_id == node)
            .unwrap()
            .state
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_job_settled_while_the_control_plane_was_down_is_picked_up_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate_base64();
        let running = start(dir.path(), &key).await;
        let state = running.state.clone();
        state
            .store
            .create_user("alice", "unused", Role::User)
            .await
            .unwrap();
        let token = crate::cli::create_api_token(&state.store, "alice", "test")
            .await
            .unwrap();
        let agent = state.store.enroll_test_agent("a").await.id;
        let mut events = Vec::new();
        for name in ["first", "second"] {
            let event = call(
                &state,
                &token,
                Method::POST,
                "/events",
                json!({"name": name, "kind": "bash", "script": "true", "runtime": "host",
                       "targets": {"agents": [agent]}}),
            )
            .await;
            events.push(event["id"].as_str().unwrap().to_string());
        }
        let workflow = call(
            &state,
            &token,
            Method::POST,
            "/workflows",
            json!({"name": "durable",
                   "nodes": [{"id": "first", "event_id": events[0]}, {"id": "second", "event_id": events[1]}],
                   "edges": [{"from": "first", "to": "second"}]}),
        )
        .await;
        let id = workflow["id"].as_str().unwrap();
        let run = call(
            &state,
            &token,
            Method::POST,
            &format!("/workflows/{id}/runs"),
            json!({"input": {"start": true}}),
        )
        .await;
        let run_id = run["id"].as_str().unwrap().to_string();
        assert_eq!(run["nodes"][0]["state"], "running");
        assert_eq!(run["nodes"][1]["state"], "pending");
        stop(running).await;

        // While the control plane is down, the first node's job ends (as recorded by an
        // agent's session that died before the engine heard of it).
        let store = crate::ServerConfig::reopen_test_store(dir.path()).await;
        assert_eq!(
            complete_queued(&store, &agent, &json!({"x": 1}))
                .await
                .len(),
            1
        );
        assert_eq!(node_state(&store, &run_id, "first").await, "running");
        store.close().await;

        // The restarted engine's start-up scan and eight concurrent advances race to start
        // the second node: it starts once, with the first node's result as input.
        let running = start(dir.path(), &key).await;
        let state = running.state.clone();
        let advances: Vec<_> = (0..8)
            .map(|_| {
                let (state, run_id) = (state.clone(), run_id.clone());
                tokio::spawn(async move { super::super::engine::advance(&state, &run_id).await })
            })
            .collect();
        for advance in advances {
            advance.await.unwrap().unwrap();
        }
        let store = state.store.clone();
        wait_for("the second node running", || async {
            (node_state(&store, &run_id, "second").await == "running").then_some(())
        })
        .await;
        let second_runs = store
            .recent_runs(None, Some(&events[1]), None, 100)
            .await
            .unwrap();
        assert_eq!(second_runs.len(), 1, "the second node started once");
        let (second_run, _) = &second_runs[0];
        assert_eq!(second_run.input.as_deref(), Some(r#"{"x":1}"#));

        // Its job ends; the broadcast (as a session sends it) finishes the workflow run.
        for job_id in complete_queued(&store, &agent, &json!("done")).await {
            state.job_events.notify(&job_id);
        }
        let run = wait_for("the workflow run ended", || async {
            let run = store.workflow_run(&run_id).await.unwrap();
            run.finished_at.is_some().then_some(run)
        })
        .await;
        assert_eq!(run.status, "completed");
        assert_eq!(
            store
                .recent_runs(None, Some(&events[0]), None, 100)
                .await
                .unwrap()
                .len(),
            1
        );
        stop(running).await;
    }
}
