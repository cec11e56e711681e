//! `GET /jobs/{id}/audit`: what the control plane recorded about a job besides its status and
//! log — a lease that ran out, a stale attempt or result refused, a stale helper write, a skipped
//! notification — for whoever may see the job (its event's owner and admins).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::ApiResult;
use super::jobs::visible_job;
use super::timestamp;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/jobs/{id}/audit", get(job_audit))
}

async fn job_audit(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = visible_job(&state, &user, &id).await?;
    let entries = state.store.job_audit(&job.id).await?;
    Ok(Json(Value::Array(
        entries
            .into_iter()
            .map(|entry| {
                json!({
                    "id": entry.id,
                    "at": timestamp(Some(entry.at)),
                    "kind": entry.kind,
                    "actor": entry.actor,
                    "detail": entry.detail,
                })
            })
            .collect(),
    )))
}
