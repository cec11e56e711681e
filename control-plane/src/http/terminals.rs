//! Terminals: the WebSocket that opens one (`GET /agents/{id}/terminal`), the grants that let
//! USERs use an agent's terminal, and the sessions with their recordings.
//!
//! Everything is checked before the upgrade and before anything reaches the agent, in this
//! order: credentials (401), the `Origin` if there is one (403), the agent (404), the caller's
//! right to its terminal (403: ADMINs any agent, USERs agents granted to them, VIEWERs none), the
//! query (400), the session to attach to (404 unless it is a live session of this agent opened
//! by the caller, or the caller is an ADMIN), the agent being online (409), the limits of live
//! sessions per user and per agent (429), and last a missing `Origin` (403). A cross-site page
//! cannot open a terminal with the console's cookie: a cookie-authenticated request must carry an
//! allowed `Origin` (browsers always send one with a WebSocket); bearer-token clients (CLI,
//! tests) may omit it. The missing-`Origin` refusal comes last so that the console, whose plain
//! same-origin GET of this URL carries no `Origin`, learns why a socket was refused (no grant,
//! limit, …); such a GET never upgrades, so it opens nothing either way.
//!
//! With several replicas, an agent connected to another replica is online too: after the same
//! checks the viewer is relayed to that replica (`terminals::remote`), and a recording that
//! replica wrote is read through it.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult};
use super::timestamp;
use crate::AppState;
use crate::store::terminals::TerminalSession;
use crate::store::users::Role;
use crate::terminals::relay::Relay;
use crate::terminals::relay_token::Grant;
use crate::terminals::remote::{self, RemoteRelay};
use crate::terminals::{TerminalSettings, normalize_origin, valid_session_id};

/// Largest WebSocket message (and frame) accepted from a browser (and from a replica relaying
/// one, `http::terminal_relay`).
pub(super) const MAX_WS_MESSAGE: usize = 64 * 1024;

/// Sessions listed at most by `GET /terminal-sessions`.
const MAX_LISTED: u32 = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents/{id}/terminal", get(open))
        .route("/agents/{id}/grants", get(grants))
        .route(
            "/agents/{id}/grants/{user_id}",
            put(grant).delete(revoke_grant),
        )
        .route("/terminal-sessions", get(sessions))
        .route("/terminal-sessions/{id}/recording", get(recording))
}

/// Refuses a request whose `Origin` header is present and not allowed.
fn check_origin(settings: &TerminalSettings, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let refused = || {
        ApiError::Forbidden(
            "this page's origin may not open terminals (see --allowed-origin and --public-url)"
                .into(),
        )
    };
    let origin = origin
        .to_str()
        .ok()
        .and_then(normalize_origin)
        .ok_or_else(refused)?;
    if settings.allowed_origins.contains(&origin) {
        return Ok(());
    }
    if settings.same_host_origin {
        let scheme = origin.split("://").next().unwrap_or("http");
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .and_then(|host| normalize_origin(&format!("{scheme}://{host}")));
        if host.as_deref() == Some(origin.as_str()) {
            return Ok(());
        }
    }
    Err(refused())
}

/// Refuses a cookie-authenticated request without an `Origin` header (`bearer`: the caller
/// authenticated with an API token, which a browser does not add by itself).
fn check_origin_present(headers: &HeaderMap, bearer: bool) -> Result<(), ApiError> {
    if bearer || headers.contains_key(header::ORIGIN) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "a terminal opened with the console's cookie needs an Origin header".into(),
        ))
    }
}

/// Both Origin rules (for tests).
#[cfg(test)]
fn check_origin_rules(
    settings: &TerminalSettings,
    headers: &HeaderMap,
    bearer: bool,
) -> Result<(), ApiError> {
    check_origin(settings, headers)?;
    check_origin_present(headers, bearer)
}

/// May `user` use the terminal of `agent_id`?
async fn check_permission(state: &AppState, user: &CurrentUser, agent_id: &str) -> ApiResult<()> {
    match user.0.role {
        Role::Admin => Ok(()),
        Role::Viewer => Err(ApiError::Forbidden("viewers cannot open terminals".into())),
        Role::User => {
            if state.store.has_grant(agent_id, &user.0.id).await? {
                Ok(())
            } else {
                Err(ApiError::Forbidden(
                    "you have no grant for this agent's terminal; an admin can give you one".into(),
                ))
            }
        }
    }
}

/// Parses `cols`, `rows` and `session` of the terminal URL.
fn terminal_query(query: Option<&str>) -> ApiResult<(u16, u16, Option<String>)> {
    let pairs: HashMap<String, String> =
        serde_urlencoded_pairs(query.unwrap_or_default()).collect();
    let size = |name: &str| -> ApiResult<u16> {
        let value = pairs.get(name).ok_or_else(|| ApiError::BadRequest {
            field: Some(name.to_owned()),
            message: format!("`{name}` is required (the terminal's size in characters)"),
        })?;
        value
            .parse::<u16>()
            .ok()
            .filter(|size| (1..=1000).contains(size))
            .ok_or_else(|| ApiError::BadRequest {
                field: Some(name.to_owned()),
                message: format!("`{name}` must be a number from 1 to 1000"),
            })
    };
    let (cols, rows) = (size("cols")?, size("rows")?);
    let session = match pairs.get("session") {
        None => None,
        Some(session) if valid_session_id(session) => Some(session.clone()),
        Some(_) => return Err(ApiError::NotFound("terminal session")),
    };
    Ok((cols, rows, session))
}

/// `key=value` pairs of a query string, percent-decoded.
fn serde_urlencoded_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    reqwest::Url::parse(&format!("http://query.invalid/?{query}"))
        .map(|url| {
            url.query_pairs()
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
}

/// `GET /agents/{id}/terminal?cols=C&rows=R[&session=S]`, upgraded to a WebSocket.
async fn open(
    State(state): State<AppState>,
    Path(agent_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    user: Result<CurrentUser, ApiError>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let user = user?;
    let settings = &state.config.terminals;
    check_origin(settings, &headers)?;
    let agent = state
        .store
        .agent(&agent_id)
        .await
        .map_err(|_| ApiError::NotFound("agent"))?;
    if agent.revoked_at.is_some() {
        return Err(ApiError::NotFound("agent"));
    }
    check_permission(&state, &user, &agent_id).await?;
    let (cols, rows, session) = terminal_query(query.as_deref())?;
    let mut recording = None;
    if let Some(session) = &session {
        let found = state.store.terminal_session(session).await?;
        let Some(found) = found.filter(|found| {
            found.agent_id == agent_id
                && found.closed_at.is_none()
                && (user.is_admin() || found.user_id == user.0.id)
        }) else {
            return Err(ApiError::NotFound("terminal session"));
        };
        recording = found.recording.map(Into::into);
    }
    // Connected here, or to another replica (then relayed there), or offline.
    let link = match state.registry.connection(&agent_id) {
        Some(connection) => Link::Local(connection),
        None => match remote::locate(&state, &agent_id).await? {
            Some(target) => Link::Remote(target),
            None => {
                return Err(ApiError::Conflict(format!(
                    "agent {} is offline: a terminal needs its connection to the control plane",
                    agent.name
                )));
            }
        },
    };
    let reservation = if session.is_none() {
        let (reservation, pending_user, pending_agent) =
            state.terminals.reserve(&user.0.id, &agent_id);
        let open_by_agent = state.store.open_terminal_sessions_by_agent(None).await?;
        let open_by_user = state
            .store
            .open_terminal_sessions_by_agent(Some(&user.0.id))
            .await?;
        // Sessions on offline agents cannot be used now and do not count; agents connected
        // to another replica are online.
        let not_here: Vec<String> = open_by_user
            .iter()
            .filter(|(agent, _)| state.registry.last_seen(agent).is_none())
            .map(|(agent, _)| agent.clone())
            .collect();
        let elsewhere = crate::replicas::presence::connected_elsewhere(&state, &not_here).await;
        let user_open: u32 = open_by_user
            .iter()
            .filter(|(agent, _)| {
                state.registry.last_seen(agent).is_some() || elsewhere.contains(agent)
            })
            .map(|(_, count)| count)
            .sum();
        let agent_open: u32 = open_by_agent
            .iter()
            .filter(|(agent, _)| *agent == agent_id)
            .map(|(_, count)| count)
            .sum();
        if user_open + pending_user > settings.max_per_user {
            return Err(ApiError::TooManyRequests(format!(
                "you have {user_open} open terminal sessions; the limit per user is {} (--terminal-max-per-user): close one first",
                settings.max_per_user
            )));
        }
        if agent_open + pending_agent > settings.max_per_agent {
            return Err(ApiError::TooManyRequests(format!(
                "agent {} has {agent_open} open terminal sessions; the limit per agent is {} (--terminal-max-per-agent)",
                agent.name, settings.max_per_agent
            )));
        }
        Some(reservation)
    } else {
        None
    };
    check_origin_present(&headers, headers.contains_key(header::AUTHORIZATION))?;
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let tasks = state.tasks.clone();
    let upgrade = upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE);
    let connection = match link {
        Link::Local(connection) => connection,
        Link::Remote(target) => {
            // The other replica opens the stream, records and writes the session row.
            let relay = RemoteRelay {
                state: state.clone(),
                target,
                grant: Grant::Terminal {
                    agent: agent_id,
                    user: user.0.id,
                    session,
                    cols,
                    rows,
                },
                reservation,
            };
            return Ok(upgrade.on_upgrade(move |socket| tasks.track_future(relay.run(socket))));
        }
    };
    let relay = Relay {
        state: state.clone(),
        connection,
        agent_id,
        user: user.0,
        cols,
        rows,
        session,
        recording,
        record: settings.recording && agent.record_terminals,
        reservation,
    };
    Ok(upgrade.on_upgrade(move |socket| tasks.track_future(relay.run(socket))))
}

/// Where an online agent's terminal stream is opened.
enum Link {
    /// On its connection to this replica.
    Local(quinn::Connection),
    /// By the replica it is connected to.
    Remote(remote::Target),
}

/// `GET /agents/{id}/grants` (admins): who may use this agent's terminal.
async fn grants(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(agent_id): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    state
        .store
        .agent(&agent_id)
        .await
        .map_err(|_| ApiError::NotFound("agent"))?;
    let grants = state.store.agent_grants(&agent_id).await?;
    Ok(Json(Value::Array(
        grants
            .iter()
            .map(|grant| {
                json!({
                    "user_id": grant.user_id,
                    "username": grant.username,
                    "role": grant.role,
                    "granted_at": timestamp(Some(grant.granted_at)),
                })
            })
            .collect(),
    )))
}

/// `PUT /agents/{id}/grants/{user_id}` (admins): lets a user open this agent's terminal.
async fn grant(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((agent_id, user_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    user.require_admin()?;
    match state
        .store
        .grant_agent(&agent_id, &user_id, &user.0.id)
        .await
    {
        Ok(()) => {}
        Err(crate::store::StoreError::NotFound) => {
            return Err(ApiError::NotFound("agent or user"));
        }
        Err(error) => return Err(error.into()),
    }
    state
        .store
        .audit(
            "agent_granted",
            Some(&user.0.username),
            &json!({"agent_id": agent_id, "user_id": user_id}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /agents/{id}/grants/{user_id}` (admins). Live sessions stay open until they end.
async fn revoke_grant(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((agent_id, user_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    user.require_admin()?;
    if !state.store.revoke_grant(&agent_id, &user_id).await? {
        return Err(ApiError::NotFound("grant"));
    }
    state
        .store
        .audit(
            "agent_grant_revoked",
            Some(&user.0.username),
            &json!({"agent_id": agent_id, "user_id": user_id}),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn session_json(session: &TerminalSession) -> Value {
    json!({
        "id": session.id,
        "agent_id": session.agent_id,
        "agent_name": session.agent_name,
        "user_id": session.user_id,
        "username": session.username,
        "opened_at": timestamp(Some(session.opened_at)),
        "closed_at": timestamp(session.closed_at),
        "live": session.closed_at.is_none(),
        "exit_code": session.exit_code,
        "has_recording": session.recording.is_some(),
    })
}

/// `GET /terminal-sessions`: the caller's sessions (an admin's: everyone's), newest first.
async fn sessions(
    State(state): State<AppState>,
    user: CurrentUser,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let pairs: HashMap<String, String> =
        serde_urlencoded_pairs(query.as_deref().unwrap_or_default()).collect();
    let limit = match pairs.get("limit") {
        None => 100,
        Some(limit) => limit.parse::<u32>().map_err(|_| ApiError::BadRequest {
            field: Some("limit".into()),
            message: format!("`limit` must be a number from 1 to {MAX_LISTED}"),
        })?,
    }
    .clamp(1, MAX_LISTED);
    let owner = (!user.is_admin()).then_some(user.0.id.as_str());
    let sessions = state.store.terminal_sessions(owner, limit).await?;
    Ok(Json(Value::Array(
        sessions.iter().map(session_json).collect(),
    )))
}

/// `GET /terminal-sessions/{id}/recording`: the asciicast file, streamed.
async fn recording(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let session = state
        .store
        .terminal_session(&id)
        .await?
        .filter(|session| user.may_access(&session.user_id))
        .ok_or(ApiError::NotFound("terminal session"))?;
    if session.recording.is_none() || !valid_session_id(&session.id) {
        return Err(ApiError::NotFound("recording"));
    }
    if let Some(response) = recording_file(&state, &session.id).await? {
        return Ok(response);
    }
    // Written by another replica (the one that held the agent's stream)?
    remote::fetch_recording(&state, &session.id, &user.0.id)
        .await?
        .ok_or(ApiError::NotFound("recording"))
}

/// The recording file of session `id` in this replica's data dir, streamed; `None` if it is
/// not here.
pub(super) async fn recording_file(state: &AppState, id: &str) -> ApiResult<Option<Response>> {
    if !valid_session_id(id) {
        return Ok(None);
    }
    // The path is derived from the (validated) id, never taken from elsewhere.
    let path = state
        .config
        .terminals
        .recordings_dir
        .join(format!("{id}.cast"));
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(anyhow::Error::new(error).into()),
    };
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(bytes::Bytes::from(buffer)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    });
    Ok(Some(
        (
            [
                (header::CONTENT_TYPE, "application/x-asciicast".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{id}.cast\""),
                ),
            ],
            Body::from_stream(chunks),
        )
            .into_response(),
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use axum::http::HeaderValue;

    use super::*;
    use crate::terminals::TerminalConfig;

    fn settings(public_url: Option<&str>, extra: &[&str]) -> TerminalSettings {
        TerminalSettings::new(
            &TerminalConfig {
                allowed_origins: extra.iter().map(|origin| origin.to_string()).collect(),
                ..TerminalConfig::default()
            },
            public_url,
            &PathBuf::from("/data"),
        )
        .unwrap()
    }

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    #[test]
    fn only_allowed_origins_may_open_terminals() {
        let public = settings(
            Some("https://cronium.example.com"),
            &["http://localhost:5173"],
        );
        let host = "cronium.example.com";
        for allowed in [
            "https://cronium.example.com",
            "https://cronium.example.com:443",
            "http://localhost:5173",
        ] {
            assert!(
                check_origin_rules(&public, &headers(Some(allowed), host), false).is_ok(),
                "{allowed}"
            );
        }
        for refused in [
            "https://evil.example",
            "http://cronium.example.com",
            "https://cronium.example.com.evil.example",
            "null",
            "",
        ] {
            assert!(
                check_origin_rules(&public, &headers(Some(refused), host), true).is_err(),
                "{refused}"
            );
        }
        // A cookie without an Origin: refused; a bearer token without one: allowed.
        assert!(check_origin_rules(&public, &headers(None, host), false).is_err());
        assert!(check_origin_rules(&public, &headers(None, host), true).is_ok());

        // No public URL: the request's own host is allowed, nothing else.
        let local = settings(None, &[]);
        assert!(
            check_origin_rules(
                &local,
                &headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"),
                false
            )
            .is_ok()
        );
        assert!(
            check_origin_rules(
                &local,
                &headers(Some("http://127.0.0.1:9999"), "127.0.0.1:8080"),
                false
            )
            .is_err()
        );
        assert!(
            check_origin_rules(
                &local,
                &headers(Some("http://evil.example"), "127.0.0.1:8080"),
                false
            )
            .is_err()
        );
        assert!(
            TerminalSettings::new(
                &TerminalConfig {
                    allowed_origins: vec!["not an origin".into()],
                    ..TerminalConfig::default()
                },
                None,
                &PathBuf::from("/data")
            )
            .is_err()
        );
    }

    #[test]
    fn the_query_names_a_size_and_maybe_a_session() {
        assert_eq!(
            terminal_query(Some("cols=80&rows=24")).unwrap(),
            (80, 24, None)
        );
        let session = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            terminal_query(Some(&format!("rows=1&cols=1000&session={session}"))).unwrap(),
            (1000, 1, Some(session.to_owned()))
        );
        for bad in [
            None,
            Some("cols=80"),
            Some("cols=0&rows=24"),
            Some("cols=80&rows=1001"),
            Some("cols=x&rows=24"),
            Some("cols=80&rows=24&session=../../etc"),
        ] {
            assert!(terminal_query(bad).is_err(), "{bad:?}");
        }
    }
}
