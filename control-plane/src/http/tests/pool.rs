//! `targets.pool` through the real router: validation with a field, the stored and shown
//! targets, a trigger's one job with its candidates, and a workflow node on a pool.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Api, api};
use crate::store::users::Role;

async fn send(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    body: Value,
) -> (StatusCode, Value) {
    let body = (!body.is_null()).then(|| body.to_string());
    api.send(method, path, Some(token), body.as_deref()).await
}

/// An enrolled agent (certificate set) carrying `labels`.
async fn agent(api: &Api, name: &str, labels: Value) -> String {
    let store = &api.state().store;
    let labels: crate::store::agents::Labels = serde_json::from_value(labels).unwrap();
    let secret = format!("token-{name}");
    store
        .create_enrollment_token(&secret, &labels, 1, crate::store::now_ms() + 60_000, None)
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
    agent.id
}

fn field(answer: &Value) -> &Value {
    &answer["error"]["field"]
}

#[tokio::test]
async fn pool_targets_are_validated_stored_shown_and_run_as_one_job() {
    let api = api().await;
    let token = api.token("ops", Role::User).await;
    let mut web = vec![
        agent(&api, "web-1", json!({"role": "web"})).await,
        agent(&api, "web-2", json!({"role": "web", "zone": "b"})).await,
    ];
    web.sort();
    let db = agent(&api, "db-1", json!({"role": "db"})).await;

    let event = |targets: Value| json!({"name": "pooled", "kind": "bash", "script": "true", "targets": targets});
    for (targets, why) in [
        (json!({"pool": {}}), "an empty pool"),
        (
            json!({"pool": {"role": "web"}, "agents": ["web-1"]}),
            "a pool with agents",
        ),
        (
            json!({"pool": {"role": "web"}, "labels": {"role": "web"}}),
            "a pool with labels",
        ),
        (
            json!({"pool": {"role": "web"}, "servers": ["s"]}),
            "a pool with servers",
        ),
        (json!({"pool": {"role": "no spaces"}}), "a bad label"),
    ] {
        let (status, answer) =
            send(&api, Method::POST, "/api/v1/events", &token, event(targets)).await;
        assert_eq!(
            (status, field(&answer)),
            (StatusCode::UNPROCESSABLE_ENTITY, &json!("targets.pool")),
            "{why}: {answer}"
        );
    }
    let (status, answer) = send(
        &api,
        Method::POST,
        "/api/v1/events",
        &token,
        event(json!({"pool": ["role"]})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a pool that is no object: {answer}"
    );

    let (status, created) = send(
        &api,
        Method::POST,
        "/api/v1/events",
        &token,
        event(json!({"pool": {"role": "web"}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["targets"]["pool"], json!({"role": "web"}));
    let id = created["id"].as_str().unwrap().to_string();
    let (_, listed) = send(&api, Method::GET, "/api/v1/events", &token, Value::Null).await;
    assert_eq!(listed[0]["targets"]["pool"], json!({"role": "web"}));
    let (_, shown) = send(
        &api,
        Method::GET,
        &format!("/api/v1/events/{id}"),
        &token,
        Value::Null,
    )
    .await;
    assert_eq!(shown["targets"]["pool"], json!({"role": "web"}));
    assert_eq!(shown["targets"]["agents"], json!([]));

    // A trigger: one job, bound to no agent yet, with the two web agents as candidates.
    let runs = format!("/api/v1/events/{id}/runs");
    let (status, triggered) = send(&api, Method::POST, &runs, &token, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{triggered}");
    assert_eq!(
        triggered["jobs"].as_array().unwrap().len(),
        1,
        "{triggered}"
    );
    assert_eq!(triggered["jobs"][0]["pool"], json!(true));
    assert!(triggered["jobs"][0].get("agent_id").is_none());
    let job_id = triggered["jobs"][0]["id"].as_str().unwrap().to_string();
    let store = &api.state().store;
    assert_eq!(store.job_candidates(&job_id).await.unwrap(), web);
    let (_, run) = send(
        &api,
        Method::GET,
        &format!("/api/v1/runs/{}", triggered["run_id"].as_str().unwrap()),
        &token,
        Value::Null,
    )
    .await;
    assert_eq!(run["jobs"].as_array().unwrap().len(), 1, "{run}");
    assert_eq!(run["jobs"][0]["agent_id"], Value::Null);
    assert_eq!(run["jobs"][0]["pool"], json!(true));
    assert_eq!(run["jobs"][0]["status"], json!("queued"));

    // A trigger's override: another pool, a pool nobody matches, a pool with agents.
    let (status, triggered) = send(
        &api,
        Method::POST,
        &runs,
        &token,
        json!({"targets": {"pool": {"role": "db"}}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{triggered}");
    let job_id = triggered["jobs"][0]["id"].as_str().unwrap();
    assert_eq!(
        store.job_candidates(job_id).await.unwrap(),
        vec![db.clone()]
    );
    for (targets, why) in [
        (json!({"pool": {"role": "nobody"}}), "no agent matches"),
        (
            json!({"pool": {"role": "db"}, "agents": [db]}),
            "a pool with agents",
        ),
        (json!({"pool": {}}), "an empty pool"),
    ] {
        let (status, answer) = send(
            &api,
            Method::POST,
            &runs,
            &token,
            json!({"targets": targets}),
        )
        .await;
        assert_eq!(
            (status, field(&answer)),
            (StatusCode::UNPROCESSABLE_ENTITY, &json!("targets.pool")),
            "{why}: {answer}"
        );
    }

    // A workflow node on a pool (its own targets) starts a run of one pool job.
    let (status, answer) = send(
        &api,
        Method::POST,
        "/api/v1/workflows",
        &token,
        json!({"name": "bad", "nodes": [{"id": "only", "event_id": id, "targets": {"pool": {}}}], "edges": []}),
    )
    .await;
    assert_eq!(
        (status, field(&answer)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!("nodes[0].targets.pool")
        ),
        "{answer}"
    );
    let (status, workflow) = send(
        &api,
        Method::POST,
        "/api/v1/workflows",
        &token,
        json!({"name": "pooled-flow", "nodes": [{"id": "only", "event_id": id, "targets": {"pool": {"zone": "b"}}}], "edges": []}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{workflow}");
    let (status, started) = send(
        &api,
        Method::POST,
        &format!(
            "/api/v1/workflows/{}/runs",
            workflow["id"].as_str().unwrap()
        ),
        &token,
        json!({}),
    )
    .await;
    assert!(status.is_success(), "{started}");
    let node_run = started["nodes"][0]["run_id"]
        .as_str()
        .expect("the node's run");
    let run = store.run(node_run).await.unwrap();
    assert_eq!(run.jobs.len(), 1);
    let zone_b = candidates_with_zone(&api, "b").await;
    assert_eq!(zone_b.len(), 1);
    assert_eq!(store.job_candidates(&run.jobs[0].id).await.unwrap(), zone_b);

    // PATCH to agents replaces the pool.
    let (status, patched) = send(
        &api,
        Method::PATCH,
        &format!("/api/v1/events/{id}"),
        &token,
        json!({"targets": {"agents": ["db-1"]}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["targets"]["pool"], Value::Null);
}

/// The ids of the enrolled agents labelled `zone`.
async fn candidates_with_zone(api: &Api, zone: &str) -> Vec<String> {
    let mut ids: Vec<String> = api
        .state()
        .store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .filter(|agent| agent.labels.get("zone").map(String::as_str) == Some(zone))
        .map(|agent| agent.id)
        .collect();
    ids.sort();
    ids
}
