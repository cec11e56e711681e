//! `/tools` and `/notifications`: tool credentials (write-only: the configuration is sealed and
//! never returned; lists show the URL's host, or an email tool's SMTP `host:port`, at most) and
//! the caller's notification outbox.
//! Ownership works as for events: users see and use their own tools, admins everyone's.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{object_name, timestamp};
use crate::AppState;
use crate::store::StoreError;
use crate::store::tools::{
    Notification, NotificationStatus, NotifyRefused, SealedConfig, Tool, ToolChange, ToolKind,
};
use crate::tools::email::EmailConfig;
use crate::tools::{InvalidConfig, ToolConfig};

/// Default and largest `limit` of `GET /notifications`.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tools", get(list).post(create))
        .route("/tools/{id}", get(show).patch(update).delete(remove))
        .route("/tools/{id}/test", post(send_test))
        .route("/notifications", get(notifications))
}

/// The body of `POST /tools` and, with every field optional, `PATCH /tools/{id}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ToolRequest {
    name: Option<String>,
    kind: Option<String>,
    /// Read by hand so that no error message can repeat a secret value.
    config: Option<Value>,
}

/// The optional body of `POST /tools/{id}/test`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    title: Option<String>,
    message: Option<String>,
}

fn tool_json(tool: &Tool) -> Value {
    json!({
        "id": tool.id,
        "owner_id": tool.owner_id,
        "name": tool.name,
        "kind": tool.kind.as_str(),
        "target_host": tool.target_host,
        "created_at": timestamp(Some(tool.created_at)),
        "updated_at": timestamp(Some(tool.updated_at)),
    })
}

fn notification_json(notification: &Notification) -> Value {
    json!({
        "id": notification.id,
        "owner_id": notification.owner_id,
        "tool_id": notification.tool_id,
        "tool": notification.tool_name,
        "title": notification.title,
        "message": notification.message,
        "job_id": notification.source_job_id,
        "status": notification.status.as_str(),
        "attempts": notification.attempts,
        "next_attempt_at": if notification.status == NotificationStatus::Pending {
            timestamp(Some(notification.next_attempt_at))
        } else {
            Value::Null
        },
        "last_error": notification.last_error,
        "created_at": timestamp(Some(notification.created_at)),
        "sent_at": timestamp(notification.sent_at),
    })
}

fn tool_kind(kind: &str) -> ApiResult<ToolKind> {
    ToolKind::parse(kind).ok_or_else(|| {
        ApiError::field(
            "kind",
            format!("unknown kind {kind:?}; expected slack, discord, webhook or email"),
        )
    })
}

fn config_error(error: InvalidConfig) -> ApiError {
    let field = if error.field == "config" {
        "config".to_string()
    } else {
        format!("config.{}", error.field)
    };
    ApiError::field(&field, error.message)
}

/// Validates and seals a configuration for `kind`.
fn sealed_config(state: &AppState, kind: ToolKind, config: &Value) -> ApiResult<SealedConfig> {
    if kind == ToolKind::Email {
        return EmailConfig::from_json(config)
            .and_then(|config| config.seal(&state.key))
            .map_err(config_error);
    }
    ToolConfig::from_json(config)
        .and_then(|config| config.seal(kind, &state.key))
        .map_err(config_error)
}

fn name_conflict(name: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |error| match error {
        StoreError::Constraint(_) => {
            ApiError::Conflict(format!("you already have a tool named {name:?}"))
        }
        other => other.into(),
    }
}

async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    let owner = (!user.is_admin()).then_some(user.0.id.as_str());
    let tools = state.store.tools(owner).await?;
    Ok(Json(Value::Array(tools.iter().map(tool_json).collect())))
}

async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<ToolRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let name = object_name(
        request
            .name
            .as_deref()
            .ok_or_else(|| ApiError::field("name", "is required"))?,
    )?;
    let kind = tool_kind(
        request
            .kind
            .as_deref()
            .ok_or_else(|| ApiError::field("kind", "is required"))?,
    )?;
    let config = request
        .config
        .ok_or_else(|| ApiError::field("config", "is required"))?;
    let config = sealed_config(&state, kind, &config)?;
    let tool = state
        .store
        .create_tool(&user.0.id, &name, kind, config)
        .await
        .map_err(name_conflict(&name))?;
    Ok((StatusCode::CREATED, Json(tool_json(&tool))))
}

/// Loads a tool the caller may see.
async fn visible_tool(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<Tool> {
    user.visible(state.store.tool(id).await, |tool| &tool.owner_id, "tool")
}

async fn show(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(tool_json(&visible_tool(&state, &user, &id).await?)))
}

async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ToolRequest>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    let tool = visible_tool(&state, &user, &id).await?;
    if let Some(kind) = &request.kind
        && tool_kind(kind)? != tool.kind
    {
        return Err(ApiError::field(
            "kind",
            "cannot be changed; create a new tool instead",
        ));
    }
    let name = request.name.as_deref().map(object_name).transpose()?;
    let config = request
        .config
        .as_ref()
        .map(|config| sealed_config(&state, tool.kind, config))
        .transpose()?;
    let shown_name = name.clone().unwrap_or_else(|| tool.name.clone());
    let tool = state
        .store
        .update_tool(&id, ToolChange { name, config })
        .await
        .map_err(name_conflict(&shown_name))?;
    Ok(Json(tool_json(&tool)))
}

async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_writer()?;
    visible_tool(&state, &user, &id).await?;
    state.store.delete_tool(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn send_test(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let tool = visible_tool(&state, &user, &id).await?;
    let request: TestRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TestRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::bad_request(format!("malformed body: {error}")))?
    };
    let title = request
        .title
        .unwrap_or_else(|| "Cronium test notification".into());
    let message = request.message.unwrap_or_else(|| {
        format!(
            "This is a test of the tool {:?}, sent by {}.",
            tool.name, user.0.username
        )
    });
    let enqueued = crate::tools::notify(
        &state,
        &tool.owner_id,
        &tool.name,
        Some(&title),
        &message,
        None,
    )
    .await?;
    match enqueued {
        Ok(id) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": NotificationStatus::Pending.as_str()})),
        )),
        // Renamed or deleted since it was loaded.
        Err(NotifyRefused::UnknownTool(_)) => Err(ApiError::NotFound("tool")),
        Err(NotifyRefused::Invalid { field, message }) => Err(ApiError::field(field, message)),
    }
}

async fn notifications(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    if let Some(unknown) = query
        .keys()
        .find(|key| !matches!(key.as_str(), "status" | "limit"))
    {
        return Err(ApiError::BadRequest {
            field: Some(unknown.clone()),
            message: format!("unknown query parameter {unknown:?} (status, limit)"),
        });
    }
    let status = query
        .get("status")
        .map(|status| {
            NotificationStatus::parse(status)
                .ok_or_else(|| ApiError::field("status", "must be pending, sent or failed"))
        })
        .transpose()?;
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(limit) => limit
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                ApiError::field("limit", format!("must be a number from 1 to {MAX_LIMIT}"))
            })?,
    };
    let owner = (!user.is_admin()).then_some(user.0.id.as_str());
    let notifications = state.store.notifications(owner, status, limit).await?;
    Ok(Json(Value::Array(
        notifications.iter().map(notification_json).collect(),
    )))
}
