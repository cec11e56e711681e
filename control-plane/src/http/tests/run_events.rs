//! `GET /runs/{id}/events` through the real router: the `run` summary first, one `job` event
//! per state change (a bare notification without a change sends nothing), changes nobody
//! announced found by the re-read, the `end` summary and the stream's close; another user's run
//! is not found, as with `GET /runs/{id}`.

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Api, SseStream, api};
use crate::store::users::Role;

/// Opens a run's event stream.
async fn run_events(api: &Api, run_id: &str, token: &str) -> SseStream {
    SseStream::open(api, &format!("/api/v1/runs/{run_id}/events"), token).await
}

/// An event of alice's on three agents and one run of it: (run id, job ids).
async fn run_on_three_agents(api: &Api, token: &str) -> (String, Vec<String>) {
    for name in ["web-1", "web-2", "web-3"] {
        api.state().store.enroll_test_agent(name).await;
    }
    let body = json!({"name": "fan", "kind": "bash", "script": "true",
        "targets": {"agents": ["web-1", "web-2", "web-3"]}})
    .to_string();
    let (status, event) = api
        .send(Method::POST, "/api/v1/events", Some(token), Some(&body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let event_id = event["id"].as_str().unwrap();
    let (status, run) = api
        .send(
            Method::POST,
            &format!("/api/v1/events/{event_id}/runs"),
            Some(token),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    let jobs = run["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(jobs.len(), 3);
    (run["run_id"].as_str().unwrap().to_string(), jobs)
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

#[tokio::test]
async fn a_run_stream_sends_the_summary_each_state_change_and_the_end() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let (run_id, jobs) = run_on_three_agents(&api, &alice).await;

    let mut events = run_events(&api, &run_id, &alice).await;
    let (name, run) = events.next().await.unwrap();
    assert_eq!(name, "run");
    let (_, shown) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{run_id}?output=false"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(run, shown, "the first event is the run's summary");
    assert_eq!(run["status"], "queued");

    // A notification without a state change (as a log append sends) is not announced: the
    // next event is the cancellation that follows it.
    api.state().job_events.notify(&jobs[0]);
    cancel(&api, &alice, &jobs[0]).await;
    let (name, job) = events.next().await.unwrap();
    assert_eq!(name, "job");
    assert_eq!(job["id"], json!(jobs[0]));
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["reason"], "cancelled");
    assert!(job["finished_at"].is_string(), "{job}");
    assert!(job.get("log_bytes").is_none(), "{job}");

    // A change nobody announces is found by the safety-net re-read.
    api.state().store.request_cancel(&jobs[1]).await.unwrap();
    let (name, job) = events.next().await.unwrap();
    assert_eq!((name.as_str(), &job["id"]), ("job", &json!(jobs[1])));
    assert_eq!(job["status"], "cancelled");

    cancel(&api, &alice, &jobs[2]).await;
    let (name, job) = events.next().await.unwrap();
    assert_eq!((name.as_str(), &job["id"]), ("job", &json!(jobs[2])));
    let (name, end) = events.next().await.unwrap();
    assert_eq!(name, "end");
    assert_eq!(end["status"], "cancelled");
    assert_eq!(end["counts"]["cancelled"], 3);
    assert_eq!(end["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(events.next().await, None, "the stream closes after the end");

    // A finished run: its summary, then the end at once.
    let mut events = run_events(&api, &run_id, &alice).await;
    assert_eq!(events.next().await.unwrap().0, "run");
    assert_eq!(events.next().await.unwrap().0, "end");
    assert_eq!(events.next().await, None);
}

#[tokio::test]
async fn another_users_run_stream_is_not_found_like_the_run() {
    let api = api().await;
    let alice = api.token("alice", Role::User).await;
    let bob = api.token("bob", Role::User).await;
    let (run_id, _) = run_on_three_agents(&api, &alice).await;

    let (status, _) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{run_id}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{run_id}/events"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    super::assert_error_shape(&body);
    let (status, _) = api
        .send(Method::GET, "/api/v1/runs/nope/events", Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .send(
            Method::GET,
            &format!("/api/v1/runs/{run_id}/events"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
