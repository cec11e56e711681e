//! Dispatch policies in the API: an event's `retry`, `max_concurrency` and `rollout` (read from
//! and merged into event requests by `events.rs`), a trigger's rollout override, a run's rollout
//! state and grouped outputs (`GET /runs/{id}`), and `POST /runs/{id}/retry`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::timestamp;
use crate::AppState;
use crate::store::StoreError;
use crate::store::dispatch::{DispatchPolicy, RetryPolicy, Rollout, RolloutFields, RunDispatch};
use crate::store::events::Targets;
use crate::store::jobs::{NewRun, RunSpec};

pub fn router() -> Router<AppState> {
    Router::new().route("/runs/{id}/retry", post(retry_run))
}

/// The dispatch fields of an event request; `Some(None)` is an explicit `null` (back to the
/// default).
#[derive(Default)]
pub(crate) struct DispatchRequest {
    pub retry: Option<Option<Value>>,
    pub max_concurrency: Option<Option<u32>>,
    pub rollout: Option<Option<Value>>,
}

impl DispatchRequest {
    pub fn is_empty(&self) -> bool {
        self.retry.is_none() && self.max_concurrency.is_none() && self.rollout.is_none()
    }
}

fn number(object: &Map<String, Value>, key: &str, field: &str) -> ApiResult<Option<f64>> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::field(field, "must be a number")),
    }
}

/// An event's `retry` merged over `base`: a missing field keeps its value, `null` (the whole
/// object) restores the defaults.
fn retry_policy(request: &Option<Option<Value>>, base: &RetryPolicy) -> ApiResult<RetryPolicy> {
    let value = match request {
        None => return Ok(*base),
        Some(None) => return Ok(RetryPolicy::default()),
        Some(Some(value)) => value,
    };
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::field("retry", "must be an object"))?;
    for key in object.keys() {
        if !["backoff_seconds", "factor", "max_backoff_seconds"].contains(&key.as_str()) {
            return Err(ApiError::field(
                &format!("retry.{key}"),
                "unknown field; expected backoff_seconds, factor, max_backoff_seconds",
            ));
        }
    }
    let mut policy = *base;
    if let Some(value) = number(object, "backoff_seconds", "retry.backoff_seconds")? {
        policy.backoff_seconds = value;
        // A smaller initial delay alone keeps the maximum; a larger one lifts it.
        if policy.max_backoff_seconds < value && !object.contains_key("max_backoff_seconds") {
            policy.max_backoff_seconds = value;
        }
    }
    if let Some(value) = number(object, "factor", "retry.factor")? {
        policy.factor = value;
    }
    if let Some(value) = number(object, "max_backoff_seconds", "retry.max_backoff_seconds")? {
        policy.max_backoff_seconds = value;
    }
    policy
        .validate()
        .map_err(|(field, message)| ApiError::field(field, message))?;
    Ok(policy)
}

/// The fields of a rollout object.
const ROLLOUT_FIELDS: [&str; 6] = [
    "batch_size",
    "batch_percent",
    "max_failures",
    "min_success_percent",
    "offline",
    "deadline_seconds",
];

/// A rollout object (whole or partial) and which of its fields were given, validated as a
/// whole once merged by the caller.
pub(crate) fn rollout_request(value: &Value, prefix: &str) -> ApiResult<(Rollout, RolloutFields)> {
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::field(prefix, "must be an object"))?;
    // Each field alone first, so an error names the field it is about.
    for (key, field_value) in object {
        if !ROLLOUT_FIELDS.contains(&key.as_str()) {
            return Err(ApiError::field(
                &format!("{prefix}.{key}"),
                format!(
                    "unknown field; expected one of {}",
                    ROLLOUT_FIELDS.join(", ")
                ),
            ));
        }
        let mut single = Map::new();
        single.insert(key.clone(), field_value.clone());
        serde_json::from_value::<Rollout>(Value::Object(single))
            .map_err(|error| ApiError::field(&format!("{prefix}.{key}"), error.to_string()))?;
    }
    let rollout: Rollout = serde_json::from_value(value.clone())
        .map_err(|error| ApiError::field(prefix, error.to_string()))?;
    let given = RolloutFields {
        batch_size: object.contains_key("batch_size"),
        batch_percent: object.contains_key("batch_percent"),
        max_failures: object.contains_key("max_failures"),
        min_success_percent: object.contains_key("min_success_percent"),
        offline: object.contains_key("offline"),
        deadline_seconds: object.contains_key("deadline_seconds"),
    };
    Ok((rollout, given))
}

/// Most jobs of one event claimed or running at once that an event may set.
const MAX_CONCURRENCY: u32 = 100_000;

/// The dispatch policy of an event request merged over `base` (the stored one, or the defaults
/// for a new event). A given `rollout` replaces the stored one whole.
pub(crate) fn dispatch_policy(
    request: &DispatchRequest,
    base: &DispatchPolicy,
) -> ApiResult<DispatchPolicy> {
    let retry = retry_policy(&request.retry, &base.retry)?;
    let max_concurrency = match request.max_concurrency {
        None => base.max_concurrency,
        Some(None) => None,
        Some(Some(cap)) if (1..=MAX_CONCURRENCY).contains(&cap) => Some(cap),
        Some(Some(_)) => {
            return Err(ApiError::field(
                "max_concurrency",
                format!("must be between 1 and {MAX_CONCURRENCY}, or null for no limit"),
            ));
        }
    };
    let rollout = match &request.rollout {
        None => base.rollout.clone(),
        Some(None) => Rollout::default(),
        Some(Some(value)) => rollout_request(value, "rollout")?.0,
    };
    rollout
        .validate("rollout")
        .map_err(|(field, message)| ApiError::field(&field, message))?;
    Ok(DispatchPolicy {
        retry,
        max_concurrency,
        rollout,
    })
}

/// Adds `retry`, `max_concurrency` and `rollout` to an event's JSON.
pub(crate) fn add_policy_json(event: &mut Value, policy: &DispatchPolicy) {
    event["retry"] = json!({
        "backoff_seconds": policy.retry.backoff_seconds,
        "factor": policy.retry.factor,
        "max_backoff_seconds": policy.retry.max_backoff_seconds,
    });
    event["max_concurrency"] = json!(policy.max_concurrency);
    event["rollout"] = json!(policy.rollout);
}

/// A run's `rollout` and `retry_of` for `GET /runs/{id}`.
pub(crate) fn add_run_json(run: &mut Value, dispatch: &RunDispatch) {
    run["retry_of"] = json!(dispatch.retry_of);
    run["rollout"] = match &dispatch.rollout {
        None => Value::Null,
        Some(policy) => json!({
            "policy": policy,
            "batch_size": dispatch.batch_size,
            "batches": dispatch.batches,
            "current_batch": dispatch.current_batch,
            "stopped": dispatch.stopped_at.is_some(),
            "stopped_reason": dispatch.stopped_reason,
            "stopped_at": timestamp(dispatch.stopped_at),
        }),
    };
}

/// Adds `groups` (identical outputs grouped) to a run's JSON.
pub(crate) async fn add_groups_json(
    state: &AppState,
    run_id: &str,
    run: &mut Value,
) -> ApiResult<()> {
    let groups = state.store.run_output_groups(run_id).await?;
    run["groups"] = Value::Array(
        groups
            .into_iter()
            .map(|group| {
                json!({
                    "output_sha256": group.output_sha256,
                    "status": group.status,
                    "exit_code": group.exit_code,
                    "count": group.job_ids.len(),
                    "sample_output": group.sample_output,
                    "sample_truncated": group.sample_truncated,
                    "job_ids": group.job_ids,
                })
            })
            .collect(),
    );
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    /// `failed` (default) or `failed_and_not_started`.
    only: Option<String>,
}

/// `POST /runs/{id}/retry`: a new run of the same event, linked to this one, on exactly its
/// failed hosts (and with `failed_and_not_started`, those that never started: skipped, stopped
/// rollout, cancelled while queued), with the same input and rollout.
async fn retry_run(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<RetryRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let not_started = match request.only.as_deref() {
        None | Some("failed") => false,
        Some("failed_and_not_started") => true,
        Some(other) => {
            return Err(ApiError::field(
                "only",
                format!("unknown value {other:?}; expected failed or failed_and_not_started"),
            ));
        }
    };
    let run = state.store.run(&id).await.map_err(|error| match error {
        StoreError::NotFound => ApiError::NotFound("run"),
        other => other.into(),
    })?;
    let event = state.store.event(&run.event_id).await?;
    if !user.may_access(&event.owner_id) {
        return Err(ApiError::NotFound("run"));
    }
    let runners = state.store.retry_runners(&id, not_started).await?;
    if runners.is_empty() {
        return Err(ApiError::field(
            "only",
            if not_started {
                "the run has no failed or not-started hosts"
            } else {
                "the run has no failed hosts"
            },
        ));
    }
    let mut targets = Targets::default();
    for runner in &runners {
        match crate::ssh::server_of_runner(runner) {
            Some(server_id) => targets.servers.push(server_id.to_string()),
            None => targets.agents.push(runner.clone()),
        }
    }
    let prepared = super::events::prepare_run(&state, &event, &targets).await?;
    let dispatch = state.store.run_dispatch(&id).await?;
    // The retry keeps the original run's rollout (every field given, so none comes from the
    // event's current policy).
    let over = dispatch.rollout.map(|rollout| {
        let all = RolloutFields {
            batch_size: true,
            batch_percent: true,
            max_failures: true,
            min_success_percent: true,
            offline: true,
            deadline_seconds: true,
        };
        let mut fields = all;
        // `merged` lets the later of batch_size/batch_percent win; give only the one in use.
        fields.batch_percent = rollout.batch_percent.is_some();
        fields.batch_size = !fields.batch_percent;
        (rollout, fields)
    });
    let spec = RunSpec::manual(&NewRun {
        event_id: &event.id,
        kind: event.kind.as_str(),
        script: &event.script,
        env: &event.env,
        runtime_spec: Some(&prepared.runtime_spec),
        input: run.input.as_deref(),
        timeout_seconds: event.timeout_seconds,
        max_attempts: event.retries + 1,
        created_by: &user.0.id,
        agent_ids: &prepared.agent_ids,
    })?;
    let (run_id, jobs) = state
        .store
        .create_run_dispatched(spec, over, Some(id.clone()))
        .await?;
    for (job_id, runner) in &jobs {
        super::super::dispatch::wake_runner(&state, runner);
        state.job_events.notify(job_id);
    }
    let jobs: Vec<Value> = jobs
        .iter()
        .map(
            |(job_id, runner)| match crate::ssh::server_of_runner(runner) {
                Some(server_id) => json!({"id": job_id, "server_id": server_id}),
                None => json!({"id": job_id, "agent_id": runner}),
            },
        )
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"run_id": run_id, "retry_of": id, "jobs": jobs})),
    ))
}
