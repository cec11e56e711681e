//! The internal routes other replicas use (issue 8), not part of the public API:
//!
//! - `GET /internal/terminals/relay` (WebSocket): a terminal a viewer opened on another replica
//!   for an agent connected to this one (`terminals::remote`). That replica did every check of
//!   `http::terminals`; this one runs the usual relay (`terminals::relay::Relay`) for the socket,
//!   which then speaks the public terminal protocol. Limits are not counted again: the session
//!   is the other replica's to count.
//! - `GET /internal/terminals/recording`: a recording this replica wrote, for another replica
//!   serving `GET /terminal-sessions/{id}/recording`.
//!
//! Neither takes the API's credentials. The only credential is a relay token in the
//! `X-Cronium-Relay-Token` header (`terminals::relay_token`): minted by a replica with the
//! replicas' shared key for this replica, seconds old, used once. Anything else is 401 before
//! anything is looked up or any agent is reached, and a plain GET never upgrades.

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::debug;

use super::error::{ApiError, ApiResult};
use super::terminals::{MAX_WS_MESSAGE, recording_file};
use crate::AppState;
use crate::store::now_ms;
use crate::terminals::relay::Relay;
use crate::terminals::relay_token::{Grant, HEADER};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/internal/terminals/relay", get(relay))
        .route("/internal/terminals/recording", get(recording))
}

/// The grant of the request's relay token; 401 without a valid one.
fn verified(state: &AppState, headers: &HeaderMap) -> ApiResult<Grant> {
    let token = headers
        .get(HEADER)
        .and_then(|value| value.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    state
        .terminals
        .relay_auth()
        .verify(token, state.replicas.id(), now_ms())
        .map_err(|error| {
            // The token itself is never logged.
            debug!(%error, "refused a relay token");
            ApiError::Unauthorized
        })
}

/// `GET /internal/terminals/relay`, upgraded to a WebSocket: a relayed terminal viewer.
async fn relay(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Grant::Terminal {
        agent: agent_id,
        user,
        session,
        cols,
        rows,
    } = verified(&state, &headers)?
    else {
        return Err(ApiError::Unauthorized);
    };
    let agent = state
        .store
        .agent(&agent_id)
        .await
        .ok()
        .filter(|agent| agent.revoked_at.is_none())
        .ok_or(ApiError::NotFound("agent"))?;
    let user = state
        .store
        .user(&user)
        .await
        .map_err(|_| ApiError::NotFound("user"))?
        .user;
    let mut recording = None;
    if let Some(session) = &session {
        let found = state
            .store
            .terminal_session(session)
            .await?
            .filter(|found| found.agent_id == agent_id && found.closed_at.is_none())
            .ok_or(ApiError::NotFound("terminal session"))?;
        recording = found.recording.map(Into::into);
    }
    let Some(connection) = state.registry.connection(&agent_id) else {
        return Err(ApiError::Conflict(format!(
            "agent {} is not connected to this replica",
            agent.name
        )));
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let relay = Relay {
        record: state.config.terminals.recording && agent.record_terminals,
        state: state.clone(),
        connection,
        agent_id,
        user,
        cols,
        rows,
        session,
        recording,
        reservation: None,
    };
    let tasks = state.tasks.clone();
    Ok(upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| tasks.track_future(relay.run(socket))))
}

/// `GET /internal/terminals/recording`: a recording in this replica's data dir, streamed.
async fn recording(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let Grant::Recording { session, user } = verified(&state, &headers)? else {
        return Err(ApiError::Unauthorized);
    };
    let found = state
        .store
        .terminal_session(&session)
        .await?
        .ok_or(ApiError::NotFound("terminal session"))?;
    // The other replica checked the user; the grant must name this session's user or an admin.
    let reader = state
        .store
        .user(&user)
        .await
        .map_err(|_| ApiError::NotFound("terminal session"))?
        .user;
    if reader.id != found.user_id && reader.role != crate::store::users::Role::Admin {
        return Err(ApiError::NotFound("terminal session"));
    }
    if found.recording.is_none() {
        return Err(ApiError::NotFound("recording"));
    }
    recording_file(&state, &found.id)
        .await?
        .ok_or(ApiError::NotFound("recording"))
}
