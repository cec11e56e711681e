//! `/variables`: the caller's variables, the values scripts read and write with the
//! `get_variable` / `set_variable` runtime helpers. Values are JSON, sealed at rest.
//!
//! Variables belong to a user and are shared by all of that user's events; every caller sees and
//! changes only their own (an admin too: an admin's scripts have their own variables).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use cronium_protocol::{MAX_HELPER_NAME, MAX_HELPER_VALUE};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::timestamp;
use crate::AppState;
use crate::store::StoreError;
use crate::store::variables::Variable;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/variables", get(list))
        .route("/variables/{name}", get(show).put(put).delete(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutRequest {
    value: Value,
}

fn check_name(name: &str) -> ApiResult<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_HELPER_NAME
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            format!("must be 1 to {MAX_HELPER_NAME} of A-Z a-z 0-9 _ . -"),
        ))
    }
}

fn variable_json(state: &AppState, variable: &Variable) -> ApiResult<Value> {
    let plain = state
        .key
        .open(&variable.sealed_value)
        .map_err(|_| anyhow::anyhow!("variable {:?} cannot be decrypted", variable.name))?;
    let value: Value = serde_json::from_slice(&plain)
        .map_err(|error| anyhow::anyhow!("variable {:?} is not JSON: {error}", variable.name))?;
    Ok(json!({
        "name": variable.name,
        "value": value,
        "updated_at": timestamp(Some(variable.updated_at)),
        "updated_by_job": variable.updated_by_job,
    }))
}

async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    let variables = state.store.variables(&user.0.id).await?;
    let listed = variables
        .iter()
        .map(|variable| variable_json(&state, variable))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(Value::Array(listed)))
}

async fn show(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    check_name(&name)?;
    match state.store.variable(&user.0.id, &name).await {
        Ok(variable) => Ok(Json(variable_json(&state, &variable)?)),
        Err(StoreError::NotFound) => Err(ApiError::NotFound("variable")),
        Err(error) => Err(error.into()),
    }
}

async fn put(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<PutRequest>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    check_name(&name)?;
    let text = request.value.to_string();
    if text.len() > MAX_HELPER_VALUE {
        return Err(ApiError::field(
            "value",
            format!("must be at most {MAX_HELPER_VALUE} bytes of JSON"),
        ));
    }
    state
        .store
        .put_variable(&user.0.id, &name, state.key.seal(text.as_bytes()))
        .await?;
    let variable = state.store.variable(&user.0.id, &name).await?;
    Ok(Json(variable_json(&state, &variable)?))
}

async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_writer()?;
    check_name(&name)?;
    match state.store.delete_variable(&user.0.id, &name).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::NotFound) => Err(ApiError::NotFound("variable")),
        Err(error) => Err(error.into()),
    }
}
