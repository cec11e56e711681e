//! `/servers`: the hosts jobs run on. A server is reached through its agent
//! (`connection: agent`) or by the control plane over SSH (`connection: ssh`, the SSH fallback).
//! The SSH secrets (`private_key`, `passphrase`, `password`) are write-only: sealed with
//! `ENCRYPTION_KEY` on the way in, never returned, never logged, never repeated in an error.
//! Ownership works as for events: users see and use their own servers, admins everyone's.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{object_name, timestamp};
use crate::AppState;
use crate::changes::Kind;
use crate::ssh::bootstrap::{self, InstallOptions, ServiceMode};
use crate::ssh::{SshSecrets, runner_of_server};
use crate::store::StoreError;
use crate::store::servers::{Connection, Server, ServerFields, SshAuth, SshSettings};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/servers", get(list).post(create))
        .route("/servers/{id}", get(show).patch(update).delete(remove))
        .route("/servers/{id}/install-agent", post(install_agent))
}

/// The body of `POST /servers` and, with every field optional, `PATCH /servers/{id}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerRequest {
    name: Option<String>,
    address: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    connection: Option<String>,
    agent_id: Option<String>,
    ssh: Option<SshRequest>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SshRequest {
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    auth: Option<String>,
    private_key: Option<String>,
    passphrase: Option<String>,
    password: Option<String>,
    /// An OpenSSH public key line; `""` forgets the pinned key (the next connection pins again).
    host_key: Option<String>,
    /// Keep the connection open for the next jobs (default true).
    reuse_connection: Option<bool>,
}

fn server_json(server: &Server) -> Value {
    json!({
        "id": server.id,
        "owner_id": server.owner_id,
        "name": server.name,
        "address": server.address,
        "labels": server.labels,
        "connection": server.connection.as_str(),
        "agent_id": server.agent_id,
        "ssh": server.ssh.as_ref().map(|ssh| json!({
            "host": ssh.host,
            "port": ssh.port,
            "username": ssh.username,
            "auth": ssh.auth.as_str(),
            "host_key": ssh.host_key,
            "reuse_connection": ssh.reuse_connection,
        })),
        "created_at": timestamp(Some(server.created_at)),
        "updated_at": timestamp(Some(server.updated_at)),
    })
}

/// A host name or IP address. Never starts with `-` (no option injection anywhere it might be
/// shown to a tool), no spaces or control characters.
fn ssh_host(host: &str) -> ApiResult<String> {
    let valid = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if valid {
        Ok(host.to_string())
    } else {
        Err(ApiError::field(
            "ssh.host",
            "must be a host name or IP address (letters, digits, '.', '-', ':', '_'; not starting with '-')",
        ))
    }
}

fn ssh_username(username: &str) -> ApiResult<String> {
    let valid = !username.is_empty()
        && username.len() <= 64
        && !username.starts_with('-')
        && !username
            .chars()
            .any(|c| c.is_control() || c.is_whitespace());
    if valid {
        Ok(username.to_string())
    } else {
        Err(ApiError::field(
            "ssh.username",
            "must be 1-64 characters without spaces or control characters, not starting with '-'",
        ))
    }
}

fn labels_field(labels: &BTreeMap<String, String>) -> ApiResult<()> {
    if labels.len() > 64 {
        return Err(ApiError::field("labels", "at most 64 labels"));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > 64 || value.len() > 256 {
            return Err(ApiError::field(
                "labels",
                "keys are 1-64 bytes, values at most 256 bytes",
            ));
        }
    }
    Ok(())
}

/// Merges the SSH part of a request into the stored settings (if any) and validates it.
fn ssh_settings(
    state: &AppState,
    stored: Option<&SshSettings>,
    request: SshRequest,
) -> ApiResult<SshSettings> {
    let host = match request.host {
        Some(host) => ssh_host(&host)?,
        None => stored
            .map(|ssh| ssh.host.clone())
            .ok_or_else(|| ApiError::field("ssh.host", "is required"))?,
    };
    let port = request.port.or(stored.map(|ssh| ssh.port)).unwrap_or(22);
    if port == 0 {
        return Err(ApiError::field("ssh.port", "must be 1-65535"));
    }
    let username = match request.username {
        Some(username) => ssh_username(&username)?,
        None => stored
            .map(|ssh| ssh.username.clone())
            .ok_or_else(|| ApiError::field("ssh.username", "is required"))?,
    };
    let auth = match request.auth.as_deref() {
        Some(auth) => SshAuth::parse(auth).ok_or_else(|| {
            ApiError::field(
                "ssh.auth",
                format!("unknown auth {auth:?}; expected key or password"),
            )
        })?,
        None => stored
            .map(|ssh| ssh.auth)
            .ok_or_else(|| ApiError::field("ssh.auth", "is required (key or password)"))?,
    };
    // Secrets: the stored ones, replaced by whatever the request gives.
    let mut secrets = match stored {
        Some(ssh) => SshSecrets::open(&state.key, &ssh.secrets)
            .map_err(|error| ApiError::Internal(anyhow::anyhow!("stored SSH secrets: {error}")))?,
        None => SshSecrets::default(),
    };
    if let Some(private_key) = request.private_key {
        secrets.private_key = Some(private_key);
        secrets.passphrase = None;
    }
    if let Some(passphrase) = request.passphrase {
        secrets.passphrase = (!passphrase.is_empty()).then_some(passphrase);
    }
    if let Some(password) = request.password {
        secrets.password = Some(password);
    }
    match auth {
        SshAuth::Key => {
            let Some(private_key) = &secrets.private_key else {
                return Err(ApiError::field(
                    "ssh.private_key",
                    "is required for key auth",
                ));
            };
            // The error never repeats the key or the passphrase.
            if russh::keys::decode_secret_key(private_key, secrets.passphrase.as_deref()).is_err() {
                return Err(ApiError::field(
                    "ssh.private_key",
                    "is not an OpenSSH or PEM private key (or the passphrase is wrong)",
                ));
            }
        }
        SshAuth::Password => {
            if secrets.password.as_deref().is_none_or(str::is_empty) {
                return Err(ApiError::field(
                    "ssh.password",
                    "is required for password auth",
                ));
            }
        }
    }
    let moved = stored.is_some_and(|ssh| ssh.host != host || ssh.port != port);
    let host_key = match request.host_key {
        Some(line) if line.is_empty() => None,
        Some(line) => Some(crate::ssh::normalize_host_key(&line).ok_or_else(|| {
            ApiError::field(
                "ssh.host_key",
                "must be an OpenSSH public key line such as 'ssh-ed25519 AAAA…'",
            )
        })?),
        // A server that moved to another address must be pinned again.
        None if moved => None,
        None => stored.and_then(|ssh| ssh.host_key.clone()),
    };
    let reuse_connection = request
        .reuse_connection
        .or(stored.map(|ssh| ssh.reuse_connection))
        .unwrap_or(true);
    Ok(SshSettings {
        host,
        port,
        username,
        auth,
        secrets: secrets.seal(&state.key),
        host_key,
        reuse_connection,
    })
}

/// Validates a whole request against the stored server (for PATCH) and builds the fields.
async fn server_fields(
    state: &AppState,
    stored: Option<&Server>,
    request: ServerRequest,
) -> ApiResult<ServerFields> {
    let name = match &request.name {
        Some(name) => object_name(name)?,
        None => stored
            .map(|server| server.name.clone())
            .ok_or_else(|| ApiError::field("name", "is required"))?,
    };
    let connection = match request.connection.as_deref() {
        Some(connection) => Connection::parse(connection).ok_or_else(|| {
            ApiError::field(
                "connection",
                format!("unknown connection {connection:?}; expected agent or ssh"),
            )
        })?,
        None => stored
            .map(|server| server.connection)
            .ok_or_else(|| ApiError::field("connection", "is required (agent or ssh)"))?,
    };
    let labels = request
        .labels
        .or_else(|| stored.map(|server| server.labels.clone()))
        .unwrap_or_default();
    labels_field(&labels)?;
    let stored_ssh = stored.and_then(|server| server.ssh.as_ref());
    let ssh = match (request.ssh, stored_ssh) {
        (Some(request), stored) => Some(ssh_settings(state, stored, request)?),
        (None, Some(stored)) => Some(stored.clone()),
        (None, None) => None,
    };
    let agent_id = match request.agent_id {
        Some(agent_id) if agent_id.is_empty() => None,
        Some(agent_id) => match state.store.agent(&agent_id).await {
            Ok(agent) => Some(agent.id),
            Err(StoreError::NotFound) => {
                return Err(ApiError::field("agent_id", "no such agent"));
            }
            Err(error) => return Err(error.into()),
        },
        None => stored.and_then(|server| server.agent_id.clone()),
    };
    match connection {
        Connection::Ssh if ssh.is_none() => {
            return Err(ApiError::field("ssh", "is required for connection ssh"));
        }
        Connection::Agent if agent_id.is_none() => {
            return Err(ApiError::field(
                "agent_id",
                "is required for connection agent",
            ));
        }
        _ => {}
    }
    let address = match request.address {
        Some(address) => address,
        None => stored
            .map(|server| server.address.clone())
            .or_else(|| ssh.as_ref().map(|ssh| ssh.host.clone()))
            .unwrap_or_default(),
    };
    if address.len() > 255 || address.chars().any(char::is_control) {
        return Err(ApiError::field(
            "address",
            "must be at most 255 characters without control characters",
        ));
    }
    Ok(ServerFields {
        name,
        address,
        labels,
        connection,
        agent_id,
        ssh,
    })
}

fn name_conflict(name: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |error| match error {
        StoreError::Constraint(_) => {
            ApiError::Conflict(format!("you already have a server named {name:?}"))
        }
        other => other.into(),
    }
}

async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    let owner = (!user.is_admin()).then_some(user.0.id.as_str());
    let servers = state.store.servers(owner).await?;
    Ok(Json(Value::Array(
        servers.iter().map(server_json).collect(),
    )))
}

async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<ServerRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let fields = server_fields(&state, None, request).await?;
    let server = state
        .store
        .create_server(&user.0.id, &fields)
        .await
        .map_err(name_conflict(&fields.name))?;
    state
        .changes
        .notify_owned(Kind::Server, &server.id, &server.owner_id);
    Ok((StatusCode::CREATED, Json(server_json(&server))))
}

/// Loads a server the caller may see.
async fn visible_server(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<Server> {
    user.visible(
        state.store.server(id).await,
        |server| &server.owner_id,
        "server",
    )
}

async fn show(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(server_json(
        &visible_server(&state, &user, &id).await?,
    )))
}

async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ServerRequest>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    let server = visible_server(&state, &user, &id).await?;
    let fields = server_fields(&state, Some(&server), request).await?;
    let server = state
        .store
        .update_server(&id, &fields)
        .await
        .map_err(name_conflict(&fields.name))?;
    state
        .changes
        .notify_owned(Kind::Server, &server.id, &server.owner_id);
    Ok(Json(server_json(&server)))
}

async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_writer()?;
    let server = visible_server(&state, &user, &id).await?;
    state.store.delete_server(&id).await?;
    state
        .changes
        .notify_owned(Kind::Server, &server.id, &server.owner_id);
    // The cancelled jobs' `notify.on_failure` notifications were enqueued with the deletion.
    state.notifier.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `POST /servers/{id}/install-agent`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InstallRequest {
    /// `systemd` (default) or `detached`.
    service: Option<String>,
    /// The installer's `--prefix`.
    prefix: Option<String>,
}

/// An absolute path of plain characters (the installer puts it into a systemd unit).
fn install_prefix(prefix: &str) -> ApiResult<String> {
    let valid = prefix.starts_with('/')
        && prefix.len() <= 255
        && !prefix.split('/').any(|part| part == "..")
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
    if valid {
        let trimmed = prefix.trim_end_matches('/');
        Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_string())
    } else {
        Err(ApiError::field(
            "prefix",
            "must be an absolute path of letters, digits and / . _ - (no ..)",
        ))
    }
}

/// SSH bootstrap: installs the agent over SSH and switches the server to it. The answer is a
/// stream of progress, one JSON object per line (`step`, `output`, then `done` or `failed`).
async fn install_agent(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    body: Option<ApiJson<InstallRequest>>,
) -> ApiResult<Response> {
    // It creates an enrollment token, which only admins may.
    user.require_admin()?;
    let request = body.map(|ApiJson(request)| request).unwrap_or_default();
    let server = visible_server(&state, &user, &id).await?;
    let service = match request.service.as_deref() {
        None => ServiceMode::Systemd,
        Some(text) => ServiceMode::parse(text).ok_or_else(|| {
            ApiError::field(
                "service",
                format!("unknown service {text:?}; expected systemd or detached"),
            )
        })?,
    };
    let prefix = request.prefix.as_deref().map(install_prefix).transpose()?;
    if server.ssh.is_none() {
        return Err(ApiError::field(
            "ssh",
            "the server has no SSH settings to install the agent with (PATCH its ssh first)",
        ));
    }
    let options = InstallOptions {
        service,
        prefix,
        actor_id: user.0.id.clone(),
        actor_name: user.0.username.clone(),
    };
    let mut progress = bootstrap::start(&state, server, options)
        .map_err(|error| ApiError::Conflict(error.to_string()))?;
    let lines = futures_util::stream::poll_fn(move |cx| progress.poll_recv(cx)).map(|item| {
        let mut line = serde_json::to_vec(&item).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    });
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/x-ndjson"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Resolves an event's `targets.servers` (ids or names of servers the event's owner may use) to
/// runner keys: the agent's id for `connection: agent`, `ssh:<server id>` for SSH.
pub(crate) async fn resolve_servers(
    state: &AppState,
    owner_id: &str,
    wanted: &[String],
) -> ApiResult<Vec<String>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let servers = state.store.servers_usable_by(owner_id).await?;
    let mut runners = Vec::with_capacity(wanted.len());
    for wanted in wanted {
        let server = servers
            .iter()
            .find(|server| &server.id == wanted || &server.name == wanted)
            .ok_or_else(|| {
                ApiError::field(
                    "targets.servers",
                    format!("no server of the event's owner is called {wanted:?}"),
                )
            })?;
        match server.connection {
            Connection::Ssh => runners.push(runner_of_server(&server.id)),
            Connection::Agent => match &server.agent_id {
                Some(agent_id) => runners.push(agent_id.clone()),
                None => {
                    return Err(ApiError::field(
                        "targets.servers",
                        format!("server {:?} has no agent", server.name),
                    ));
                }
            },
        }
    }
    Ok(runners)
}
