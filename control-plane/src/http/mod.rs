//! The HTTP API (axum). Each resource lives in its own module exporting `router()`; this file
//! only merges them under `/api/v1`, adds the unauthenticated routes (health, the console's
//! static files from `ui.rs`, the installer and agent downloads from `downloads.rs`) and the
//! shared limits.

pub mod agent_update;
pub mod agents;
pub mod auth;
pub mod changes;
pub mod dispatch;
pub mod downloads;
pub mod enrollment;
pub mod error;
mod event_actions;
pub mod events;
pub mod job_audit;
pub mod jobs;
pub(crate) mod pool;
pub mod run_events;
pub mod servers;
pub mod terminal_relay;
pub mod terminals;
pub mod tools;
pub mod ui;
pub mod users;
pub mod variables;
pub mod workflows;

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::routing::get;
use serde_json::json;

use crate::AppState;
use error::{ApiError, ApiResult};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The OpenAPI document, served at `/api/v1/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(auth::router())
        .merge(agents::router())
        .merge(agent_update::router())
        .merge(changes::router())
        .merge(enrollment::router())
        .merge(events::router())
        .merge(dispatch::router())
        .merge(jobs::router())
        .merge(job_audit::router())
        .merge(run_events::router())
        .merge(servers::router())
        .merge(terminals::router())
        .merge(terminal_relay::router())
        .merge(tools::router())
        .merge(users::router())
        .merge(variables::router())
        .merge(workflows::router())
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .fallback(|| async { ApiError::NotFound("route") });
    Router::new()
        .route("/healthz", get(healthz))
        .merge(ui::router())
        .merge(downloads::router())
        .merge(crate::metrics::router())
        .nest("/api/v1", api)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": {"code": "not_found", "message": "route not found"}})),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::count_requests,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// `GET /healthz`: the process is alive (always 200, `status` `ok`: restarting it would not
/// bring a database back), and whether the database answered its last check, a second ago at
/// most (`database`: `ok` or `unavailable`; `store::health`).
async fn healthz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<serde_json::Value> {
    let database = if state.database.reachable() {
        "ok"
    } else {
        "unavailable"
    };
    axum::Json(json!({"status": "ok", "database": database}))
}

/// The name of a server or a tool: 1-64 letters, digits, `.`, `_` or `-` (field `name`).
pub(crate) fn object_name(name: &str) -> error::ApiResult<String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(name.to_string())
    } else {
        Err(error::ApiError::field(
            "name",
            "must be 1-64 letters, digits, '.', '_' or '-'",
        ))
    }
}

/// Formats a stored millisecond timestamp as RFC 3339 (UTC), or null.
pub fn timestamp(millis: Option<i64>) -> serde_json::Value {
    millis
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|time| json!(time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(serde_json::Value::Null)
}

/// Validates a label map: at most 64 labels, keys and values of 1–128 safe characters.
pub fn labels_field(field: &str, labels: &BTreeMap<String, String>) -> ApiResult<()> {
    if labels.len() > 64 {
        return Err(ApiError::field(field, "at most 64 labels"));
    }
    let valid = |text: &str| {
        !text.is_empty()
            && text.len() <= 128
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    };
    for (key, value) in labels {
        if !valid(key) || !valid(value) {
            return Err(ApiError::field(
                field,
                format!(
                    "label {key:?}={value:?} must use 1-128 letters, digits, '.', '_', '-' or '/'"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
