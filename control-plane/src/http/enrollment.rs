//! `/enrollment-tokens`: short-lived tokens that let a host enroll an agent; admins create,
//! list (the usable ones, by id: the token itself is shown once) and revoke them.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{labels_field, timestamp};
use crate::AppState;
use crate::crypto::{random_token, sha256_hex};
use crate::store::now_ms;

/// Default lifetime of an enrollment token.
const DEFAULT_TTL_SECONDS: u64 = 3600;

/// Longest lifetime of an enrollment token.
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/enrollment-tokens", get(list).post(create))
        .route("/enrollment-tokens/{id}", delete(revoke))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub uses: Option<u32>,
    pub ttl_seconds: Option<u64>,
}

/// A created token and the commands that use it.
pub struct CreatedToken {
    /// The token's id (for `DELETE /enrollment-tokens/{id}`); the token itself is never stored.
    pub id: String,
    pub token: String,
    pub expires_at: i64,
}

/// Creates a token; shared by the API and `cronium dev`.
pub async fn create_token(
    state: &AppState,
    request: &CreateRequest,
    created_by: Option<&str>,
) -> ApiResult<CreatedToken> {
    labels_field("labels", &request.labels)?;
    let uses = request.uses.unwrap_or(1);
    if !(1..=10_000).contains(&uses) {
        return Err(ApiError::field("uses", "must be between 1 and 10000"));
    }
    let ttl = request.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
    if !(1..=MAX_TTL_SECONDS).contains(&ttl) {
        return Err(ApiError::field(
            "ttl_seconds",
            format!("must be between 1 and {MAX_TTL_SECONDS}"),
        ));
    }
    let token = random_token("cre_");
    let expires_at = now_ms() + ttl as i64 * 1000;
    let id = state
        .store
        .create_enrollment_token(
            &sha256_hex(token.as_bytes()),
            &request.labels,
            uses,
            expires_at,
            created_by,
        )
        .await?;
    Ok(CreatedToken {
        id,
        token,
        expires_at,
    })
}

/// The command that enrolls an agent with `token` against this control plane.
pub fn enroll_command(state: &AppState, token: &str) -> String {
    format!(
        "CRONIUM_ENROLL_TOKEN={token} cronium-agent enroll --server {} --ca-sha256 {}",
        state.config.public_url,
        state.ca.fingerprint()
    )
}

async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<CreateRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_admin()?;
    let created = create_token(&state, &request, Some(&user.0.id)).await?;
    state
        .store
        .audit(
            "enrollment_token_created",
            Some(&user.0.username),
            &json!({"uses": request.uses.unwrap_or(1)}),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": created.id,
            "token": created.token,
            "install_command": format!("curl -fsSL {}/install.sh | sudo sh -s -- --token {}", state.config.public_url, created.token),
            "enroll_command": enroll_command(&state, &created.token),
            "ca_sha256": state.ca.fingerprint(),
            "expires_at": timestamp(Some(created.expires_at)),
        })),
    ))
}

/// `GET /enrollment-tokens`: the tokens that can still enroll an agent (admins only).
async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let tokens = state.store.usable_enrollment_tokens().await?;
    Ok(Json(Value::Array(
        tokens
            .iter()
            .map(|token| {
                json!({
                    "id": token.id,
                    "labels": token.labels,
                    "uses_left": token.uses_left,
                    "expires_at": timestamp(Some(token.expires_at)),
                    "created_by": token.created_by,
                    "created_at": timestamp(Some(token.created_at)),
                })
            })
            .collect(),
    )))
}

/// `DELETE /enrollment-tokens/{id}`: no host can enroll with the token any more (admins only).
async fn revoke(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_admin()?;
    match state.store.revoke_enrollment_token(&id).await {
        Ok(()) => {}
        Err(crate::store::StoreError::NotFound) => {
            return Err(ApiError::NotFound("enrollment token"));
        }
        Err(error) => return Err(error.into()),
    }
    state
        .store
        .audit(
            "enrollment_token_revoked",
            Some(&user.0.username),
            &json!({"id": id}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
