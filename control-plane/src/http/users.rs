//! `/users` (admins only: list, create with a role, change a role or reset a password, delete;
//! the last admin can be neither demoted nor deleted, and nobody deletes themselves) and
//! `/tokens` (the caller's own API tokens: list, create (the token is in the answer once and only
//! its SHA-256 is stored), revoke). Passwords are hashed with argon2id as for login.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, patch};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{CurrentUser, hash_password};
use super::error::{ApiError, ApiJson, ApiResult};
use super::timestamp;
use crate::AppState;
use crate::crypto::{random_token, sha256_hex};
use crate::store::StoreError;
use crate::store::users::{ApiTokenRecord, Role, UserChange, UserRecord};

/// Shortest and longest password accepted.
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 1024;

/// Most live API tokens one user may have.
const MAX_TOKENS: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(list_users).post(create_user))
        .route("/users/{id}", patch(update_user).delete(delete_user))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", axum::routing::delete(revoke_token))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUserRequest {
    username: Option<String>,
    password: Option<String>,
    role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUserRequest {
    role: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTokenRequest {
    name: Option<String>,
}

fn user_json(record: &UserRecord) -> Value {
    json!({
        "id": record.user.id,
        "username": record.user.username,
        "role": record.user.role.as_str(),
        "created_at": timestamp(Some(record.created_at)),
    })
}

fn token_json(token: &ApiTokenRecord) -> Value {
    json!({
        "id": token.id,
        "name": token.name,
        "created_at": timestamp(Some(token.created_at)),
        "last_used_at": timestamp(token.last_used_at),
    })
}

/// A username: 1-64 letters, digits, `.`, `_`, `-` or `@`.
fn check_username(username: &str) -> ApiResult<()> {
    let valid = !username.is_empty()
        && username.len() <= 64
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::field(
            "username",
            "must be 1-64 letters, digits, '.', '_', '-' or '@'",
        ))
    }
}

/// A password: 8 to 1024 characters. Never repeated in a message.
fn check_password(password: &str) -> ApiResult<()> {
    let length = password.chars().count();
    if (MIN_PASSWORD..=MAX_PASSWORD).contains(&length) {
        Ok(())
    } else {
        Err(ApiError::field(
            "password",
            format!("must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"),
        ))
    }
}

fn parse_role(role: &str) -> ApiResult<Role> {
    Role::parse(role).ok_or_else(|| ApiError::field("role", "must be admin, user or viewer"))
}

/// `GET /users`.
async fn list_users(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let users = state.store.users().await?;
    Ok(Json(Value::Array(users.iter().map(user_json).collect())))
}

/// `POST /users` `{username, password, role}`.
async fn create_user(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<CreateUserRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_admin()?;
    let username = request
        .username
        .as_deref()
        .map(str::trim)
        .ok_or_else(|| ApiError::field("username", "is required"))?
        .to_string();
    check_username(&username)?;
    let password = request
        .password
        .ok_or_else(|| ApiError::field("password", "is required"))?;
    check_password(&password)?;
    let role = parse_role(
        request
            .role
            .as_deref()
            .ok_or_else(|| ApiError::field("role", "is required"))?,
    )?;
    let hash = hash_password(password).await?;
    let created = match state.store.create_user(&username, &hash, role).await {
        Ok(created) => created,
        Err(StoreError::Constraint(_)) => {
            return Err(ApiError::Conflict(format!(
                "a user named {username:?} already exists"
            )));
        }
        Err(error) => return Err(error.into()),
    };
    state
        .store
        .audit(
            "user_created",
            Some(&user.0.username),
            &json!({"user": created.username, "role": role.as_str()}),
        )
        .await?;
    let record = state.store.user(&created.id).await?;
    Ok((StatusCode::CREATED, Json(user_json(&record))))
}

/// `PATCH /users/{id}` `{role?, password?}`.
async fn update_user(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<UpdateUserRequest>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    if request.role.is_none() && request.password.is_none() {
        return Err(ApiError::field(
            "role",
            "give a role or a password to change",
        ));
    }
    let role = request.role.as_deref().map(parse_role).transpose()?;
    if let Some(password) = &request.password {
        check_password(password)?;
    }
    let before = match state.store.user(&id).await {
        Ok(record) => record,
        Err(StoreError::NotFound) => return Err(ApiError::NotFound("user")),
        Err(error) => return Err(error.into()),
    };
    if let Some(role) = role {
        match state.store.set_user_role(&id, role).await? {
            UserChange::Done => {}
            UserChange::NotFound => return Err(ApiError::NotFound("user")),
            UserChange::LastAdmin | UserChange::StillOwns => {
                return Err(ApiError::field(
                    "role",
                    "this is the last admin; make another user admin first",
                ));
            }
        }
        if role != before.user.role {
            state
                .store
                .audit(
                    "user_role_changed",
                    Some(&user.0.username),
                    &json!({"user": before.user.username, "from": before.user.role.as_str(), "to": role.as_str()}),
                )
                .await?;
        }
    }
    if let Some(password) = request.password {
        let hash = hash_password(password).await?;
        match state.store.set_user_password(&id, &hash).await {
            Ok(()) => {}
            Err(StoreError::NotFound) => return Err(ApiError::NotFound("user")),
            Err(error) => return Err(error.into()),
        }
        state
            .store
            .audit(
                "user_password_reset",
                Some(&user.0.username),
                &json!({"user": before.user.username}),
            )
            .await?;
    }
    let record = state.store.user(&id).await?;
    Ok(Json(user_json(&record)))
}

/// `DELETE /users/{id}`.
async fn delete_user(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_admin()?;
    if id == user.0.id {
        return Err(ApiError::field("id", "you cannot delete yourself"));
    }
    let before = match state.store.user(&id).await {
        Ok(record) => record,
        Err(StoreError::NotFound) => return Err(ApiError::NotFound("user")),
        Err(error) => return Err(error.into()),
    };
    match state.store.delete_user(&id).await? {
        UserChange::Done => {}
        UserChange::NotFound => return Err(ApiError::NotFound("user")),
        UserChange::LastAdmin => {
            return Err(ApiError::field(
                "id",
                "this is the last admin; make another user admin first",
            ));
        }
        UserChange::StillOwns => {
            return Err(ApiError::Conflict(format!(
                "{} still owns events; delete them first",
                before.user.username
            )));
        }
    }
    state
        .store
        .audit(
            "user_deleted",
            Some(&user.0.username),
            &json!({"user": before.user.username}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /tokens`: the caller's live API tokens (never their values).
async fn list_tokens(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    let tokens = state.store.api_tokens(&user.0.id).await?;
    Ok(Json(Value::Array(tokens.iter().map(token_json).collect())))
}

/// `POST /tokens` `{name}`: a new token for the caller, in the answer this once.
async fn create_token(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<CreateTokenRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let name = request
        .name
        .as_deref()
        .map(str::trim)
        .ok_or_else(|| ApiError::field("name", "is required"))?
        .to_string();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::field(
            "name",
            "must be 1-100 characters without control characters",
        ));
    }
    if state.store.api_tokens(&user.0.id).await?.len() >= MAX_TOKENS {
        return Err(ApiError::field(
            "name",
            format!("you already have {MAX_TOKENS} tokens; revoke some first"),
        ));
    }
    let token = random_token("crt_");
    let id = state
        .store
        .create_api_token(&user.0.id, &sha256_hex(token.as_bytes()), &name)
        .await?;
    state
        .store
        .audit(
            "api_token_created",
            Some(&user.0.username),
            &json!({"id": id, "name": name}),
        )
        .await?;
    let record = state.store.api_token(&user.0.id, &id).await?;
    let mut body = token_json(&record);
    body["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `DELETE /tokens/{id}`: revokes one of the caller's tokens; another user's is not found.
async fn revoke_token(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_writer()?;
    match state.store.revoke_api_token(&user.0.id, &id).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => return Err(ApiError::NotFound("token")),
        Err(error) => return Err(error.into()),
    }
    state
        .store
        .audit(
            "api_token_revoked",
            Some(&user.0.username),
            &json!({"id": id}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
