//! The parts of `/events` that belong to HTTP request and tool action events: the `http`,
//! `tool_action` and `executor` fields (request, validation, JSON), and what a run of such an
//! event queues (`runtime_spec` of its jobs, and who runs them).
//!
//! `http: {method, url, headers?: {name: value}, body?, timeout_seconds?, expected_status?:
//! [200 | "200-204" | "2xx", …], follow_redirects?}` is checked by
//! [`HttpSpec::validate`](cronium_protocol::HttpSpec::validate) (fixed method set, http/https
//! only, header names and values without CR/LF, sizes) plus a full URL parse; the
//! `{{secret:NAME}}` placeholders must name secret env vars of the event. `executor: agent`
//! (the default) runs one job per target agent, `control_plane` one job per run on the control
//! plane (`actions/`). `tool_action: {tool_id, title? (alias subject), message}` names a tool of
//! the event's owner; its jobs always run on the control plane.

use std::collections::BTreeMap;

use cronium_protocol::{HttpSpec, StatusRange};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiResult};
use crate::AppState;
use crate::store::events::{Event, EventAction, EventKind, Executor, SecretEnvChange, ToolAction};
use crate::store::jobs::CONTROL_PLANE_RUNNER;
use crate::store::tools::{MAX_MESSAGE_BYTES, MAX_TITLE_BYTES};

/// An event's `http` as a request gives it.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpRequest {
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<String>,
    timeout_seconds: Option<u32>,
    expected_status: Option<Vec<Value>>,
    follow_redirects: Option<bool>,
}

/// An event's `tool_action` as a request gives it.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct ToolActionRequest {
    tool_id: String,
    #[serde(alias = "subject")]
    title: Option<String>,
    message: String,
}

/// The action fields of a request (`None`: keep the stored value).
#[derive(Default)]
pub(super) struct ActionRequest {
    pub http: Option<HttpRequest>,
    pub tool_action: Option<ToolActionRequest>,
    pub executor: Option<String>,
}

/// The `http` spec of a request, validated; errors name `http.<field>` and never quote a value.
fn http_spec(request: &HttpRequest) -> ApiResult<HttpSpec> {
    let mut expected_status = Vec::new();
    for item in request.expected_status.iter().flatten() {
        let text = match item {
            Value::Number(number) => number.to_string(),
            Value::String(text) => text.clone(),
            _ => String::new(),
        };
        expected_status.push(StatusRange::parse(&text).ok_or_else(|| {
            ApiError::field(
                "http.expected_status",
                "items must be statuses (200), ranges (\"200-204\") or classes (\"2xx\") of 100-599",
            )
        })?);
    }
    let spec = HttpSpec {
        method: request.method.trim().to_ascii_uppercase(),
        url: request.url.trim().to_string(),
        headers: request
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        body: request.body.clone(),
        expected_status,
        timeout_seconds: request
            .timeout_seconds
            .unwrap_or(cronium_protocol::http::DEFAULT_HTTP_TIMEOUT_SECONDS),
        follow_redirects: request.follow_redirects.unwrap_or(false),
    };
    spec.validate()
        .map_err(|error| ApiError::field(&format!("http.{}", error.field), error.message))?;
    // Placeholders are checked above; the rest of the URL must parse (with placeholders as
    // plain text, they are in the path or the query).
    let url = reqwest::Url::parse(&spec.url.replace("{{", "%7B%7B").replace("}}", "%7D%7D"))
        .map_err(|_| ApiError::field("http.url", "is not a valid absolute URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(ApiError::field(
            "http.url",
            "must be an http:// or https:// URL with a host",
        ));
    }
    if url.host_str().is_some_and(|host| host.contains("%7B")) {
        return Err(ApiError::field(
            "http.url",
            "may not take its host from a secret",
        ));
    }
    Ok(spec)
}

/// Merges a request's action fields over `base`'s and checks them against the event's kind
/// and secret env names (`secret_names`); the tool is checked by [`check_tool`].
pub(super) fn merge(
    request: ActionRequest,
    kind: EventKind,
    base: Option<&Event>,
) -> ApiResult<EventAction> {
    let mut action = base.map(|event| event.action.clone()).unwrap_or_default();
    if let Some(http) = &request.http {
        action.http = Some(http_spec(http)?);
    }
    let gave_tool_action = request.tool_action.is_some();
    if let Some(tool_action) = request.tool_action {
        let title = tool_action
            .title
            .map(|title| title.trim().to_string())
            .filter(|title| !title.is_empty());
        if title
            .as_ref()
            .is_some_and(|title| title.len() > MAX_TITLE_BYTES)
        {
            return Err(ApiError::field(
                "tool_action.title",
                format!("is longer than {MAX_TITLE_BYTES} bytes"),
            ));
        }
        if tool_action.message.trim().is_empty() {
            return Err(ApiError::field("tool_action.message", "must not be empty"));
        }
        if tool_action.message.len() > MAX_MESSAGE_BYTES {
            return Err(ApiError::field(
                "tool_action.message",
                format!("is longer than {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        action.tool_action = Some(ToolAction {
            tool_id: tool_action.tool_id,
            title,
            message: tool_action.message,
        });
    }
    if let Some(executor) = &request.executor {
        action.executor = Executor::parse(executor).ok_or_else(|| {
            ApiError::field(
                "executor",
                format!("unknown executor {executor:?}; expected agent or control_plane"),
            )
        })?;
    }
    match kind {
        EventKind::HttpRequest => {
            if action.http.is_none() {
                return Err(ApiError::field(
                    "http",
                    "is required for http_request events",
                ));
            }
            action.tool_action = None;
        }
        EventKind::ToolAction => {
            if action.tool_action.is_none() {
                return Err(ApiError::field(
                    "tool_action",
                    "is required for tool_action events",
                ));
            }
            if request.executor.as_deref() == Some("agent") {
                return Err(ApiError::field(
                    "executor",
                    "tool actions are run by the control plane (the tool's credentials never leave it)",
                ));
            }
            action.http = None;
            action.executor = Executor::ControlPlane;
        }
        EventKind::Bash | EventKind::Python | EventKind::Nodejs => {
            if request.http.is_some() {
                return Err(ApiError::field(
                    "http",
                    "only http_request events take http",
                ));
            }
            if gave_tool_action {
                return Err(ApiError::field(
                    "tool_action",
                    "only tool_action events take tool_action",
                ));
            }
            if request.executor.as_deref() == Some("control_plane") {
                return Err(ApiError::field(
                    "executor",
                    "scripts run on agents or SSH servers; only http_request events may use control_plane",
                ));
            }
            action = EventAction::default();
        }
    }
    Ok(action)
}

/// Checks that the placeholders of `http` name secret env vars the event has once `change`
/// is applied to the `existing` names.
pub(super) fn check_secret_names(
    action: &EventAction,
    existing: &[String],
    change: &SecretEnvChange,
) -> ApiResult<()> {
    let mut names: std::collections::BTreeSet<&str> = existing.iter().map(String::as_str).collect();
    for name in &change.remove {
        names.remove(name.as_str());
    }
    names.extend(change.set.iter().map(|(name, _)| name.as_str()));
    if let Some(http) = &action.http
        && let Some(missing) = http
            .secret_names()
            .into_iter()
            .find(|name| !names.contains(name.as_str()))
    {
        return Err(ApiError::field(
            "http",
            format!("names the secret {missing}, which is not in the event's secret_env"),
        ));
    }
    Ok(())
}

/// Checks that a changed `tool_action` names a tool the caller may see that belongs to the
/// event's owner. A kept one is not checked again (a PATCH of other fields still works after the
/// tool was deleted; its jobs then fail with a clear reason).
pub(super) async fn check_tool(
    state: &AppState,
    user: &CurrentUser,
    owner_id: &str,
    action: &EventAction,
    base: Option<&EventAction>,
) -> ApiResult<()> {
    let Some(tool_action) = &action.tool_action else {
        return Ok(());
    };
    if base
        .and_then(|base| base.tool_action.as_ref())
        .is_some_and(|before| before.tool_id == tool_action.tool_id)
    {
        return Ok(());
    }
    let unknown = || ApiError::field("tool_action.tool_id", "names no tool of the event's owner");
    let tool = user
        .visible(
            state.store.tool(&tool_action.tool_id).await,
            |tool| &tool.owner_id,
            "tool",
        )
        .map_err(|error| match error {
            ApiError::NotFound(_) => unknown(),
            other => other,
        })?;
    if tool.owner_id != owner_id {
        return Err(unknown());
    }
    Ok(())
}

/// The action fields of an event's JSON.
pub(super) fn add_json(value: &mut Value, event: &Event) {
    match event.kind {
        EventKind::HttpRequest => {
            if let Some(http) = &event.action.http {
                let headers: serde_json::Map<String, Value> = http
                    .headers
                    .iter()
                    .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                    .collect();
                let expected: Vec<Value> = http
                    .expected_status
                    .iter()
                    .map(|range| {
                        if range.from == range.to {
                            json!(range.from)
                        } else {
                            json!(range.to_text())
                        }
                    })
                    .collect();
                value["http"] = json!({
                    "method": http.method,
                    "url": http.url,
                    "headers": headers,
                    "body": http.body,
                    "timeout_seconds": http.timeout_seconds,
                    "expected_status": expected,
                    "follow_redirects": http.follow_redirects,
                });
            }
            value["executor"] = json!(event.action.executor.as_str());
        }
        EventKind::ToolAction => {
            if let Some(tool_action) = &event.action.tool_action {
                value["tool_action"] = json!({
                    "tool_id": tool_action.tool_id,
                    "title": tool_action.title,
                    "message": tool_action.message,
                });
            }
            value["executor"] = json!(Executor::ControlPlane.as_str());
        }
        _ => {}
    }
}

/// What a run of an event the control plane runs itself queues: one job for the control
/// plane's runner and the `runtime_spec` JSON of that job (`None`: the event's jobs run on
/// agents or servers, prepared by the caller).
pub(crate) fn control_plane_run(event: &Event) -> ApiResult<Option<(Vec<String>, String)>> {
    if !event.action.on_control_plane(event.kind) {
        return Ok(None);
    }
    let runtime_spec = match event.kind {
        EventKind::ToolAction => event
            .action
            .tool_action
            .as_ref()
            .map(ToolAction::to_json)
            .ok_or_else(|| ApiError::field("tool_action", "the event has no tool_action"))?,
        _ => agent_runtime_spec(event)?.ok_or_else(|| ApiError::field("http", "is missing"))?,
    };
    Ok(Some((vec![CONTROL_PLANE_RUNNER.to_string()], runtime_spec)))
}

/// The `runtime_spec` JSON of an `http_request` event's jobs (the wire's
/// `RuntimeSpec::Http`); `None` for other kinds.
pub(crate) fn agent_runtime_spec(event: &Event) -> ApiResult<Option<String>> {
    if event.kind != EventKind::HttpRequest {
        return Ok(None);
    }
    let http = event
        .action
        .http
        .clone()
        .ok_or_else(|| ApiError::field("http", "the event has no http request"))?;
    serde_json::to_string(&cronium_protocol::RuntimeSpec::Http(http))
        .map(Some)
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("runtime spec: {error}")))
}
