//! `/agent-update` (admins only): the desired agent version for the fleet, optionally narrowed
//! to labels and staged by percentage (see `agents::update` for who is selected). Setting it
//! announces the version to every online agent at once; each agent's progress shows in
//! `GET /agents` as `update`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{labels_field, timestamp};
use crate::AppState;
use crate::store::agent_updates::UpdatePolicy;
use crate::store::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/agent-update", get(show).put(set).delete(clear))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRequest {
    version: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "all")]
    percentage: u32,
}

fn all() -> u32 {
    100
}

/// The targets the releases dir has `version` for (informational: agents of other targets will
/// report that they cannot download it).
fn available_targets(state: &AppState, version: &str) -> Vec<String> {
    let dir = state.config.releases_dir.join(version);
    let mut targets: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .path()
                .join(crate::release::RELEASE_FILES[2])
                .is_file()
        })
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    targets.sort();
    targets
}

fn policy_json(state: &AppState, policy: Option<&UpdatePolicy>) -> Value {
    match policy {
        None => json!({"policy": null}),
        Some(policy) => json!({
            "policy": {
                "version": policy.version,
                "labels": policy.labels,
                "percentage": policy.percentage,
                "updated_by": policy.updated_by,
                "updated_at": timestamp(Some(policy.updated_at)),
                "available_targets": available_targets(state, &policy.version),
            }
        }),
    }
}

async fn show(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let policy = state.store.update_policy().await?;
    Ok(Json(policy_json(&state, policy.as_ref())))
}

async fn set(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<PolicyRequest>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    if let Err(error) = crate::release::check_version(&request.version) {
        return Err(ApiError::field("version", format!("{error:#}")));
    }
    labels_field("labels", &request.labels)?;
    let percentage = u8::try_from(request.percentage)
        .ok()
        .filter(|percentage| *percentage <= 100)
        .ok_or_else(|| ApiError::field("percentage", "must be between 0 and 100"))?;
    let policy = UpdatePolicy {
        version: request.version,
        labels: request.labels,
        percentage,
        updated_by: Some(user.0.username.clone()),
        updated_at: now_ms(),
    };
    state
        .store
        .set_update_policy(Some(policy.clone()), &user.0.username)
        .await?;
    crate::agents::update::announce_all(&state)
        .await
        .map_err(ApiError::Internal)?;
    Ok(Json(policy_json(&state, Some(&policy))))
}

async fn clear(State(state): State<AppState>, user: CurrentUser) -> ApiResult<StatusCode> {
    user.require_admin()?;
    state
        .store
        .set_update_policy(None, &user.0.username)
        .await?;
    crate::agents::update::announce_all(&state)
        .await
        .map_err(ApiError::Internal)?;
    Ok(StatusCode::NO_CONTENT)
}
