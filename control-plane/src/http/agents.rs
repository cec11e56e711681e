//! `/agents`: the fleet, revocation, the per-agent terminal recording opt-in, and enrollment
//! (trading a token and a CSR for a certificate).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use cronium_protocol::CloseCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{labels_field, timestamp};
use crate::AppState;
use crate::crypto::sha256_hex;
use crate::store::agents::{Agent, NewAgent, TokenRefusal};
use crate::store::now_ms;
use crate::store::replica_registry::AgentPresence;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list))
        .route("/agents/enroll", post(enroll))
        .route("/agents/ca", get(ca_certificate))
        .route("/agents/{id}", get(show).delete(revoke).patch(update))
}

/// The API view of an agent; `elsewhere` is its connection to another replica, if it has one
/// (`replicas::presence`): an agent connected to this replica or to another one is online.
pub fn agent_json(state: &AppState, agent: &Agent, elsewhere: Option<&AgentPresence>) -> Value {
    let (live, connected_at) = match state.registry.last_seen(&agent.id) {
        Some(seen) => (Some(seen), state.registry.connected_at(&agent.id)),
        None => match elsewhere {
            Some(presence) => (
                Some(presence.seen_at.max(agent.last_seen_at.unwrap_or(0))),
                presence.connected_at,
            ),
            None => (None, None),
        },
    };
    json!({
        "id": agent.id,
        "name": agent.name,
        "labels": agent.labels,
        "status": if live.is_some() && agent.revoked_at.is_none() { "online" } else { "offline" },
        "version": agent.version,
        "hostname": agent.hostname,
        "last_seen_at": timestamp(live.or(agent.last_seen_at)),
        "connected_at": timestamp(live.and(connected_at)),
        "created_at": timestamp(Some(agent.created_at)),
        "revoked_at": timestamp(agent.revoked_at),
        "docker": agent.docker,
        "record_terminals": agent.record_terminals,
        "server_id": Value::Null,
        "update": agent.update.as_ref().map(|update| json!({
            "target_version": update.target_version,
            "state": update.state.as_str(),
            "reason": update.reason,
            "at": timestamp(Some(update.at)),
        })),
    })
}

/// The CA certificate (public): enrolling agents check its fingerprint before they send a token.
async fn ca_certificate(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.ca_pem().to_string(),
    )
}

async fn list(State(state): State<AppState>, _user: CurrentUser) -> ApiResult<Json<Value>> {
    let agents = state.store.agents().await?;
    let elsewhere = crate::replicas::presence::elsewhere(&state).await?;
    Ok(Json(Value::Array(
        agents
            .iter()
            .map(|agent| agent_json(&state, agent, elsewhere.get(&agent.id)))
            .collect(),
    )))
}

async fn show(
    State(state): State<AppState>,
    _user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let agent = state
        .store
        .agent(&id)
        .await
        .map_err(|_| ApiError::NotFound("agent"))?;
    let elsewhere = crate::replicas::presence::elsewhere_of(&state, &agent.id).await?;
    Ok(Json(agent_json(&state, &agent, elsewhere.as_ref())))
}

async fn revoke(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_admin()?;
    if !state.store.revoke_agent(&id).await? {
        return Err(ApiError::NotFound("agent"));
    }
    // The failed jobs' `notify.on_failure` notifications were enqueued with the revocation.
    state.notifier.notify_one();
    // Closed wherever it is connected (other replicas hear `Signal::Disconnect`).
    state
        .registry
        .disconnect(&id, CloseCode::Revoked, "agent revoked");
    // Consoles drop it from their lists, also when it was offline.
    state.changes.notify(
        crate::changes::Kind::Agent,
        &id,
        crate::changes::Audience::Everyone,
    );
    // Its terminal sessions cannot be reached any more (and die with the agent).
    state.store.close_terminal_sessions_except(&id, &[]).await?;
    state
        .store
        .audit(
            "agent_revoked",
            Some(&user.0.username),
            &json!({"agent_id": id}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    /// Record this agent's terminal sessions (when the control plane runs with
    /// `--terminal-recording`).
    record_terminals: Option<bool>,
}

/// Changes an agent's settings (admins only).
async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<UpdateRequest>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    if let Some(record) = request.record_terminals {
        if !state.store.set_agent_record_terminals(&id, record).await? {
            return Err(ApiError::NotFound("agent"));
        }
        state
            .store
            .audit(
                "agent_record_terminals",
                Some(&user.0.username),
                &json!({"agent_id": id, "record_terminals": record}),
            )
            .await?;
    }
    let agent = state
        .store
        .agent(&id)
        .await
        .map_err(|_| ApiError::NotFound("agent"))?;
    let elsewhere = crate::replicas::presence::elsewhere_of(&state, &agent.id).await?;
    Ok(Json(agent_json(&state, &agent, elsewhere.as_ref())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    token: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    csr_pem: String,
    #[serde(default)]
    host: HostRequest,
}

#[derive(Deserialize, Default)]
struct HostRequest {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    arch: String,
}

/// Validates an agent name: 1–64 characters of letters, digits, `.`, `_` and `-`.
pub fn validate_name(field: &str, name: &str) -> ApiResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::field(
            field,
            "must be 1-64 characters of letters, digits, '.', '_' or '-'",
        ))
    }
}

async fn enroll(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    validate_name("name", &request.name)?;
    labels_field("labels", &request.labels)?;
    let token_sha256 = sha256_hex(request.token.as_bytes());
    let new_agent = NewAgent {
        token_sha256: &token_sha256,
        name: &request.name,
        extra_labels: &request.labels,
        hostname: truncate(&request.host.hostname, 255),
        os: truncate(&request.host.os, 64),
        arch: truncate(&request.host.arch, 64),
    };
    let (agent, _grant) = match state.store.enroll_agent(new_agent).await {
        Ok(Ok(enrolled)) => enrolled,
        Ok(Err(refusal)) => {
            let message = match refusal {
                TokenRefusal::Unknown => "the enrollment token is not valid",
                TokenRefusal::Expired => "the enrollment token has expired",
                TokenRefusal::UsedUp => "the enrollment token has already been used",
            };
            state
                .store
                .audit(
                    "enrollment_refused",
                    None,
                    &json!({"name": request.name, "reason": message}),
                )
                .await?;
            return Err(ApiError::Forbidden(message.into()));
        }
        Err(crate::store::StoreError::Constraint(_)) => {
            return Err(ApiError::Conflict(format!(
                "an agent named {:?} is already enrolled; revoke it or pick another name",
                request.name
            )));
        }
        Err(error) => return Err(error.into()),
    };
    let issued = match state
        .ca
        .issue_agent_certificate(&request.csr_pem, &agent.id)
    {
        Ok(issued) => issued,
        Err(error) => {
            state.store.delete_pending_agent(&agent.id).await?;
            return Err(ApiError::field("csr_pem", format!("{error:#}")));
        }
    };
    state
        .store
        .set_agent_certificate(&agent.id, &issued.sha256)
        .await?;
    state
        .store
        .audit(
            "agent_enrolled",
            None,
            &json!({"agent_id": agent.id, "name": agent.name}),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "agent_id": agent.id,
            "name": agent.name,
            "labels": agent.labels,
            "certificate_pem": issued.pem,
            "ca_certificate_pem": state.ca.ca_pem(),
            "quic_addrs": state.config.quic_public_addrs,
            "server_name": cronium_protocol::SERVER_NAME,
            "enrolled_at": super::timestamp(Some(now_ms())),
        })),
    ))
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}
