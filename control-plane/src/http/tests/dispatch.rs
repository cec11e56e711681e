//! Dispatch policies through the real router: an event's `retry`, `max_concurrency` and
//! `rollout` are stored, shown, merged on PATCH and refused with a field when out of bounds;
//! a trigger's rollout override is checked merged over the event's; `POST /runs/{id}/retry`
//! refuses a run without failed hosts.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Api, api, assert_error_shape};
use crate::store::users::Role;

async fn send(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    body: Value,
) -> (StatusCode, Value) {
    api.send(method, path, Some(token), Some(&body.to_string()))
        .await
}

#[tokio::test]
async fn event_dispatch_policies_are_stored_merged_and_validated() {
    let api = api().await;
    let token = api.token("ops", Role::User).await;
    let agent = api.state().store.enroll_test_agent("web-1").await;

    // Defaults: 5 s ×2 up to 300 s, no limit, every host at once.
    let (status, event) = send(
        &api,
        Method::POST,
        "/api/v1/events",
        &token,
        json!({"name": "plain", "kind": "bash", "script": "true", "targets": {"agents": [agent.id]}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    assert_eq!(
        event["retry"],
        json!({"backoff_seconds": 5.0, "factor": 2.0, "max_backoff_seconds": 300.0})
    );
    assert_eq!(event["max_concurrency"], Value::Null);
    assert_eq!(event["rollout"], json!({"offline": "wait"}));

    let (status, event) = send(
        &api,
        Method::POST,
        "/api/v1/events",
        &token,
        json!({"name": "rolling", "kind": "bash", "script": "true", "targets": {"agents": [agent.id]},
               "retry": {"backoff_seconds": 2, "factor": 3, "max_backoff_seconds": 60},
               "max_concurrency": 4,
               "rollout": {"batch_percent": 25, "max_failures": 3, "offline": "wait", "deadline_seconds": 30}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let id = event["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/events/{id}");
    let (_, shown) = send(&api, Method::GET, &path, &token, Value::Null).await;
    assert_eq!(
        shown["retry"],
        json!({"backoff_seconds": 2.0, "factor": 3.0, "max_backoff_seconds": 60.0})
    );
    assert_eq!(shown["max_concurrency"], 4);
    assert_eq!(
        shown["rollout"],
        json!({"batch_percent": 25, "max_failures": 3, "offline": "wait", "deadline_seconds": 30})
    );
    let (_, listed) = send(&api, Method::GET, "/api/v1/events", &token, Value::Null).await;
    let listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["id"] == id.as_str())
        .unwrap();
    assert_eq!(listed["max_concurrency"], 4);

    // PATCH: one retry field merges, `null` clears the limit, other fields keep the policy.
    let (status, patched) = send(
        &api,
        Method::PATCH,
        &path,
        &token,
        json!({"retry": {"factor": 1.5}, "max_concurrency": null}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(
        patched["retry"],
        json!({"backoff_seconds": 2.0, "factor": 1.5, "max_backoff_seconds": 60.0})
    );
    assert_eq!(patched["max_concurrency"], Value::Null);
    assert_eq!(patched["rollout"]["batch_percent"], 25);
    let (_, renamed) = send(
        &api,
        Method::PATCH,
        &path,
        &token,
        json!({"name": "rolling-2"}),
    )
    .await;
    assert_eq!(renamed["rollout"]["max_failures"], 3);
    assert_eq!(renamed["retry"]["factor"], 1.5);

    // Out of bounds: 422 with the field, and nothing changes.
    for (body, field) in [
        (
            json!({"retry": {"backoff_seconds": -1}}),
            "retry.backoff_seconds",
        ),
        (json!({"retry": {"factor": 0.5}}), "retry.factor"),
        (
            json!({"retry": {"max_backoff_seconds": 1}}),
            "retry.max_backoff_seconds",
        ),
        (json!({"retry": {"jitter": 1}}), "retry.jitter"),
        (json!({"retry": "fast"}), "retry"),
        (json!({"max_concurrency": 0}), "max_concurrency"),
        (
            json!({"rollout": {"batch_size": 2, "batch_percent": 10}}),
            "rollout.batch_size",
        ),
        (
            json!({"rollout": {"batch_percent": 101}}),
            "rollout.batch_percent",
        ),
        (
            json!({"rollout": {"max_failures": 0}}),
            "rollout.max_failures",
        ),
        (
            json!({"rollout": {"min_success_percent": 0}}),
            "rollout.min_success_percent",
        ),
        (
            json!({"rollout": {"offline": "skip", "deadline_seconds": 5}}),
            "rollout.deadline_seconds",
        ),
        (json!({"rollout": {"offline": "maybe"}}), "rollout.offline"),
        (json!({"rollout": {"batches": 2}}), "rollout.batches"),
    ] {
        let (status, error) = send(&api, Method::PATCH, &path, &token, body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {error}");
        assert_error_shape(&error);
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
    }
    let (_, unchanged) = send(&api, Method::GET, &path, &token, Value::Null).await;
    assert_eq!(unchanged["retry"], renamed["retry"]);
    assert_eq!(unchanged["rollout"], renamed["rollout"]);

    // A trigger's override is checked merged over the event's rollout: a batch size replaces
    // the event's percentage, a bad value is refused before anything is created.
    let runs = format!("{path}/runs");
    let (status, error) = send(
        &api,
        Method::POST,
        &runs,
        &token,
        json!({"rollout": {"max_failures": 0}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["field"], "rollout.max_failures");
    let (status, started) = send(
        &api,
        Method::POST,
        &runs,
        &token,
        json!({"rollout": {"batch_size": 1}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let run_id = started["run_id"].as_str().unwrap();
    let (_, run) = send(
        &api,
        Method::GET,
        &format!("/api/v1/runs/{run_id}"),
        &token,
        Value::Null,
    )
    .await;
    assert_eq!(
        run["rollout"]["policy"],
        json!({"batch_size": 1, "max_failures": 3, "offline": "wait", "deadline_seconds": 30})
    );
    assert_eq!(run["rollout"]["batch_size"], 1);
    assert_eq!(run["rollout"]["stopped"], false);
    assert_eq!(run["retry_of"], Value::Null);
    assert_eq!(run["groups"], json!([]));
    assert_eq!(run["jobs"][0]["batch"], 0);

    // Nothing failed: nothing to retry.
    let (status, error) = send(
        &api,
        Method::POST,
        &format!("/api/v1/runs/{run_id}/retry"),
        &token,
        json!({"only": "failed"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["field"], "only");
    // Another user's run is not found.
    let other = api.token("eve", Role::User).await;
    let (status, _) = send(
        &api,
        Method::POST,
        &format!("/api/v1/runs/{run_id}/retry"),
        &other,
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
