//! `/events`: create, read, update, delete, and trigger runs.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{labels_field, timestamp};
use crate::AppState;
use crate::crypto::EncryptionKey;
use crate::schedule::{
    CompiledSchedule, DstPolicy, Misfire, Overlap, ScheduleSpec, fire_time_json,
};
use crate::store::StoreError;
use crate::store::events::{
    DockerSettings, Event, EventFields, EventKind, EventNotify, Network, Runtime, SecretEnvChange,
    Targets,
};
use crate::store::jobs::NewRun;

/// Largest script accepted, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;

/// Largest `input` accepted, serialized, in bytes.
const MAX_INPUT_BYTES: usize = 256 * 1024;

/// Default timeout of an event's jobs.
const DEFAULT_TIMEOUT_SECONDS: u32 = 3600;

/// Most secret environment variables an event may have.
pub const MAX_SECRET_ENV: usize = 32;

/// Largest value of a secret environment variable, in bytes.
pub const MAX_SECRET_VALUE_BYTES: usize = 8 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/events", get(list).post(create))
        .route("/events/{id}", get(show).patch(update).delete(remove))
        .route("/events/{id}/runs", post(trigger))
        .route("/events/{id}/schedule/preview", get(preview_event))
        .route("/events/{id}/schedule/fires", get(slot_records))
        .route("/schedules/preview", post(preview_unsaved))
}

/// Most fire times a preview returns.
const MAX_PREVIEW: usize = 100;

/// Distinguishes an absent field (`None`) from `null` (`Some(None)`).
fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// An event's `schedule`: a cron expression (5 or 6 fields) in an IANA zone, and its policies.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ScheduleRequest {
    cron: String,
    timezone: Option<String>,
    dst: Option<String>,
    misfire: Option<String>,
    overlap: Option<String>,
}

/// Validates a schedule; the error names the field (`schedule.cron`, `schedule.timezone`, …).
fn schedule_spec(request: &ScheduleRequest) -> ApiResult<(ScheduleSpec, CompiledSchedule)> {
    let policy =
        |field: &str, value: &Option<String>, parse: &dyn Fn(&str) -> bool, expected: &str| {
            match value {
                Some(value) if !parse(value) => Err(ApiError::field(
                    field,
                    format!("unknown policy {value:?}; expected {expected}"),
                )),
                _ => Ok(()),
            }
        };
    policy(
        "schedule.dst",
        &request.dst,
        &|v| DstPolicy::parse(v).is_some(),
        "skip, once or twice",
    )?;
    policy(
        "schedule.misfire",
        &request.misfire,
        &|v| Misfire::parse(v).is_some(),
        "skip or run_once",
    )?;
    policy(
        "schedule.overlap",
        &request.overlap,
        &|v| Overlap::parse(v).is_some(),
        "allow, forbid or queue",
    )?;
    if request.cron.len() > 256 {
        return Err(ApiError::field(
            "schedule.cron",
            "is longer than 256 characters",
        ));
    }
    let spec = ScheduleSpec {
        cron: request.cron.trim().to_string(),
        timezone: request.timezone.clone().unwrap_or_else(|| "UTC".into()),
        dst: request
            .dst
            .as_deref()
            .and_then(DstPolicy::parse)
            .unwrap_or_default(),
        misfire: request
            .misfire
            .as_deref()
            .and_then(Misfire::parse)
            .unwrap_or_default(),
        overlap: request
            .overlap
            .as_deref()
            .and_then(Overlap::parse)
            .unwrap_or_default(),
    };
    let compiled = CompiledSchedule::new(&spec.cron, &spec.timezone, spec.dst)
        .map_err(|error| ApiError::field(error.field, error.message))?;
    if compiled.next_after(crate::store::now_ms()).is_none() {
        return Err(ApiError::field(
            "schedule.cron",
            "never matches a future time",
        ));
    }
    Ok((spec, compiled))
}

fn schedule_json(schedule: &ScheduleSpec) -> Value {
    json!({
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "dst": schedule.dst.as_str(),
        "misfire": schedule.misfire.as_str(),
        "overlap": schedule.overlap.as_str(),
    })
}

/// The body of `POST /events` and, with every field optional, `PATCH /events/{id}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    name: Option<String>,
    kind: Option<String>,
    script: Option<String>,
    runtime: Option<String>,
    targets: Option<TargetsRequest>,
    timeout_seconds: Option<u32>,
    retries: Option<u32>,
    env: Option<BTreeMap<String, String>>,
    /// Docker only; `""` resets to the control plane's default for the kind.
    image: Option<String>,
    /// Both runtimes (host: through the agent's cgroups).
    limits: Option<LimitsRequest>,
    network: Option<String>,
    read_only: Option<bool>,
    /// Both runtimes; `""` resets to the default (Docker: the image's user, host: the agent's
    /// own user).
    user: Option<String>,
    /// `null` removes the schedule.
    #[serde(default, deserialize_with = "double_option")]
    schedule: Option<Option<ScheduleRequest>>,
    /// `null` clears both; inside, a missing field keeps its value and `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    notify: Option<Option<NotifyRequest>>,
    /// Write-only: `{"NAME": "value"}` sets (or replaces) a secret environment variable,
    /// `{"NAME": null}` removes it; names not given are kept. Values are checked by
    /// [`secret_env_change`] (not by serde, whose errors would quote them).
    secret_env: Option<BTreeMap<String, Value>>,
    /// `http_request` events: the request (`event_actions.rs`).
    http: Option<super::event_actions::HttpRequest>,
    /// `tool_action` events: the tool and the message (`event_actions.rs`).
    tool_action: Option<super::event_actions::ToolActionRequest>,
    /// `http_request` events: `agent` (default) or `control_plane`.
    executor: Option<String>,
    /// Retry backoff (`http/dispatch.rs`); `null` restores the defaults.
    #[serde(default, deserialize_with = "double_option")]
    retry: Option<Option<Value>>,
    /// Jobs of the event claimed or running at once; `null`: unlimited.
    #[serde(default, deserialize_with = "double_option")]
    max_concurrency: Option<Option<u32>>,
    /// The fan-out rollout policy; `null`: every host at once.
    #[serde(default, deserialize_with = "double_option")]
    rollout: Option<Option<Value>>,
}

impl EventRequest {
    /// Takes the dispatch fields out (they are stored apart from the event's row).
    fn take_dispatch(&mut self) -> super::dispatch::DispatchRequest {
        super::dispatch::DispatchRequest {
            retry: self.retry.take(),
            max_concurrency: self.max_concurrency.take(),
            rollout: self.rollout.take(),
        }
    }
}

/// An event's `notify`: names of the owner's tools told when a job ends.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct NotifyRequest {
    #[serde(default, deserialize_with = "double_option")]
    on_failure: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    on_success: Option<Option<String>>,
}

/// Merges a request's `notify` over `base`'s.
fn merge_notify(request: &Option<Option<NotifyRequest>>, base: Option<&Event>) -> EventNotify {
    let mut notify = base.map(|event| event.notify.clone()).unwrap_or_default();
    match request {
        None => {}
        Some(None) => notify = EventNotify::default(),
        Some(Some(request)) => {
            if let Some(on_failure) = &request.on_failure {
                notify.on_failure = on_failure.clone();
            }
            if let Some(on_success) = &request.on_success {
                notify.on_success = on_success.clone();
            }
        }
    }
    notify
}

/// Checks that the tools `notify` names exist among `owner_id`'s tools. Names kept from `base`
/// are not checked again (a PATCH of other fields still works after a tool was deleted).
async fn check_notify(
    state: &AppState,
    owner_id: &str,
    notify: &EventNotify,
    base: Option<&EventNotify>,
) -> ApiResult<()> {
    let base = base.cloned().unwrap_or_default();
    let changed = [
        ("notify.on_failure", &notify.on_failure, &base.on_failure),
        ("notify.on_success", &notify.on_success, &base.on_success),
    ];
    if changed
        .iter()
        .all(|(_, name, before)| name.is_none() || name == before)
    {
        return Ok(());
    }
    let tools = state.store.tools(Some(owner_id)).await?;
    for (field, name, before) in changed {
        if let Some(name) = name
            && name != before.as_deref().unwrap_or_default()
            && !tools.iter().any(|tool| &tool.name == name)
        {
            return Err(ApiError::field(
                field,
                format!("you have no tool named {name:?}"),
            ));
        }
    }
    Ok(())
}

/// Job limits; a missing field means no limit (PIDs of Docker jobs: the default of 256).
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct LimitsRequest {
    memory_mb: Option<u32>,
    cpus: Option<f64>,
    pids: Option<u32>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct TargetsRequest {
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    servers: Vec<String>,
    /// One job run by any agent matching these labels (`pool.rs`).
    #[serde(default)]
    pool: Option<BTreeMap<String, String>>,
}

impl From<TargetsRequest> for Targets {
    fn from(request: TargetsRequest) -> Targets {
        Targets {
            agents: request.agents,
            labels: request.labels,
            servers: request.servers,
            pool: request.pool,
        }
    }
}

fn event_json(event: &Event) -> Value {
    let mut value = json!({
        "id": event.id,
        "owner_id": event.owner_id,
        "name": event.name,
        "kind": event.kind.as_str(),
        "script": event.script,
        "runtime": event.runtime.as_str(),
        "targets": {"agents": event.targets.agents, "labels": event.targets.labels, "servers": event.targets.servers, "pool": event.targets.pool},
        "timeout_seconds": event.timeout_seconds,
        "retries": event.retries,
        "env": event.env,
        "schedule": event.schedule.as_ref().map(schedule_json),
        "next_run_at": timestamp(event.next_run_at),
        "notify": {"on_failure": event.notify.on_failure, "on_success": event.notify.on_success},
        "secret_env_names": event.secret_env_names,
        "created_at": timestamp(Some(event.created_at)),
        "updated_at": timestamp(Some(event.updated_at)),
    });
    let docker = &event.docker;
    match event.runtime {
        Runtime::Docker => {
            value["image"] = json!(docker.image);
            value["limits"] = json!({
                "memory_mb": docker.memory_mb,
                "cpus": docker.cpus,
                "pids": docker.docker_pids(),
            });
            value["network"] = json!(docker.network.as_str());
            value["read_only"] = json!(docker.read_only);
        }
        Runtime::Host => {
            value["limits"] =
                json!({"memory_mb": docker.memory_mb, "cpus": docker.cpus, "pids": docker.pids});
        }
    }
    value["user"] = json!(docker.user);
    super::event_actions::add_json(&mut value, event);
    value
}

/// Whether `image` looks like an image reference (`[registry/]name[:tag][@digest]`).
fn valid_image(image: &str) -> bool {
    !image.is_empty()
        && image.len() <= 255
        && !image.starts_with(['-', '.', '/', ':', '@'])
        && !image.contains("..")
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
}

/// Whether `user` looks like `name`, `uid` or `uid:gid` (names allowed on either side): 1-64
/// characters from letters, digits and `._-@$` (so no whitespace, control characters or shell
/// syntax), not starting with `-`, with at most one `:` between two non-empty parts. Whether the
/// user exists is for the agent (or the image) to say.
fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('-')
        && user.split(':').count() <= 2
        && !user.split(':').any(str::is_empty)
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@$:".contains(c))
}

/// Merges the isolation fields of a request over `base` and validates them: the Docker-only
/// `image`, `network`, `read_only`, and `limits` and `user`, which apply to both runtimes.
fn docker_settings(request: &EventRequest, base: Option<&Event>) -> ApiResult<DockerSettings> {
    let mut settings = base.map(|event| event.docker.clone()).unwrap_or_default();
    if let Some(image) = &request.image {
        if image.is_empty() {
            settings.image = None;
        } else if valid_image(image) {
            settings.image = Some(image.clone());
        } else {
            return Err(ApiError::field(
                "image",
                "is not a valid image reference ([registry/]name[:tag][@digest])",
            ));
        }
    }
    if let Some(limits) = &request.limits {
        if limits
            .memory_mb
            .is_some_and(|mb| !(4..=1 << 24).contains(&mb))
        {
            return Err(ApiError::field(
                "limits.memory_mb",
                "must be at least 4 (MiB)",
            ));
        }
        if limits
            .cpus
            .is_some_and(|cpus| !(cpus.is_finite() && cpus > 0.0 && cpus <= 64.0))
        {
            return Err(ApiError::field(
                "limits.cpus",
                "must be more than 0 and at most 64",
            ));
        }
        if limits
            .pids
            .is_some_and(|pids| !(1..=1 << 22).contains(&pids))
        {
            return Err(ApiError::field("limits.pids", "must be at least 1"));
        }
        settings.memory_mb = limits.memory_mb;
        settings.cpus = limits.cpus;
        settings.pids = limits.pids;
    }
    if let Some(network) = &request.network {
        settings.network = Network::parse(network).ok_or_else(|| {
            ApiError::field(
                "network",
                format!("unknown network {network:?}; expected none or bridge"),
            )
        })?;
    }
    if let Some(read_only) = request.read_only {
        settings.read_only = read_only;
    }
    if let Some(user) = &request.user {
        if user.is_empty() {
            settings.user = None;
        } else if valid_user(user) {
            settings.user = Some(user.clone());
        } else {
            return Err(ApiError::field(
                "user",
                "must be a user name, uid or uid:gid (at most 64 characters: letters, digits, \
                 '.', '_', '-', '@', '$')",
            ));
        }
    }
    Ok(settings)
}

/// Checks the name of an environment variable (plain or secret): letters, digits and `_`, not
/// starting with a digit, at most 128 characters, not `CRONIUM_…`.
fn check_env_name(field: &str, key: &str) -> ApiResult<()> {
    let valid_key = !key.is_empty()
        && key.len() <= 128
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !key.starts_with(|c: char| c.is_ascii_digit());
    if !valid_key {
        return Err(ApiError::field(
            field,
            format!("{key:?} is not a valid environment variable name"),
        ));
    }
    if key.starts_with("CRONIUM_") {
        return Err(ApiError::field(
            field,
            format!("{key} is reserved for Cronium"),
        ));
    }
    Ok(())
}

/// Validates a request's `secret_env` against the event's resulting `env` and the secret names
/// it has (`existing`), and seals the new values. Error messages name variables, never values.
fn secret_env_change(
    key: &EncryptionKey,
    request: Option<BTreeMap<String, Value>>,
    env: &BTreeMap<String, String>,
    existing: &[String],
) -> ApiResult<SecretEnvChange> {
    let mut change = SecretEnvChange::default();
    let mut names: std::collections::BTreeSet<String> = existing.iter().cloned().collect();
    for (name, value) in request.unwrap_or_default() {
        check_env_name("secret_env", &name)?;
        match value {
            Value::Null => {
                names.remove(&name);
                change.remove.push(name);
            }
            Value::String(value) => {
                if value.contains('\0') {
                    return Err(ApiError::field(
                        "secret_env",
                        format!("the value of {name} contains a NUL byte"),
                    ));
                }
                if value.len() > MAX_SECRET_VALUE_BYTES {
                    return Err(ApiError::field(
                        "secret_env",
                        format!(
                            "the value of {name} is larger than {MAX_SECRET_VALUE_BYTES} bytes"
                        ),
                    ));
                }
                names.insert(name.clone());
                change.set.push((name, key.seal(value.as_bytes())));
            }
            _ => {
                return Err(ApiError::field(
                    "secret_env",
                    format!("the value of {name} must be a string (or null to remove it)"),
                ));
            }
        }
    }
    if names.len() > MAX_SECRET_ENV {
        return Err(ApiError::field(
            "secret_env",
            format!("an event has at most {MAX_SECRET_ENV} secret environment variables"),
        ));
    }
    if let Some(name) = names.iter().find(|name| env.contains_key(*name)) {
        return Err(ApiError::field(
            "secret_env",
            format!(
                "{name} is in env too; a variable is either plain (env) or secret (secret_env)"
            ),
        ));
    }
    Ok(change)
}

/// Opens a job's sealed secret environment (name, sealed value) for the runner.
pub(crate) fn open_secret_env(
    key: &EncryptionKey,
    sealed: &[(String, Vec<u8>)],
) -> anyhow::Result<Vec<(String, String)>> {
    sealed
        .iter()
        .map(|(name, sealed)| {
            let value = key.open(sealed).map_err(|_| {
                anyhow::anyhow!("the secret env var {name} does not open with ENCRYPTION_KEY")
            })?;
            let value = String::from_utf8(value)
                .map_err(|_| anyhow::anyhow!("the secret env var {name} is not UTF-8"))?;
            Ok((name.clone(), value))
        })
        .collect()
}

/// Merges a request over `base` (for PATCH) or over nothing (for POST) and validates the result.
fn event_fields(mut request: EventRequest, base: Option<&Event>) -> ApiResult<EventFields> {
    let action_request = super::event_actions::ActionRequest {
        http: request.http.take(),
        tool_action: request.tool_action.take(),
        executor: request.executor.take(),
    };
    let docker = docker_settings(&request, base)?;
    let notify = merge_notify(&request.notify, base);
    let (schedule, next_run_at, reschedule) = match &request.schedule {
        None => (
            base.and_then(|event| event.schedule.clone()),
            base.and_then(|event| event.next_run_at),
            false,
        ),
        Some(None) => (None, None, true),
        Some(Some(schedule)) => {
            let (spec, compiled) = schedule_spec(schedule)?;
            let unchanged = base.is_some_and(|event| event.schedule.as_ref() == Some(&spec));
            if unchanged {
                (Some(spec), base.and_then(|event| event.next_run_at), false)
            } else {
                let next = compiled.next_after(crate::store::now_ms());
                (Some(spec), next, true)
            }
        }
    };
    let name = request
        .name
        .or_else(|| base.map(|event| event.name.clone()))
        .ok_or_else(|| ApiError::field("name", "is required"))?;
    if name.trim().is_empty() || name.len() > 128 {
        return Err(ApiError::field("name", "must be 1-128 characters"));
    }
    let kind = match request.kind {
        Some(kind) => EventKind::parse(&kind).ok_or_else(|| {
            ApiError::field(
                "kind",
                format!(
                    "unknown kind {kind:?}; expected bash, python, nodejs, http_request or tool_action"
                ),
            )
        })?,
        None => base
            .map(|event| event.kind)
            .ok_or_else(|| ApiError::field("kind", "is required"))?,
    };
    let action = super::event_actions::merge(action_request, kind, base)?;
    let is_script = matches!(
        kind,
        EventKind::Bash | EventKind::Python | EventKind::Nodejs
    );
    let script = match request
        .script
        .or_else(|| base.map(|event| event.script.clone()))
    {
        Some(script) if is_script => script,
        None if is_script => return Err(ApiError::field("script", "is required")),
        Some(script) if !script.is_empty() && base.is_none_or(|base| base.kind == kind) => {
            return Err(ApiError::field(
                "script",
                format!("{} events have no script", kind.as_str()),
            ));
        }
        _ => String::new(),
    };
    if script.len() > MAX_SCRIPT_BYTES {
        return Err(ApiError::field(
            "script",
            format!("is larger than {MAX_SCRIPT_BYTES} bytes"),
        ));
    }
    if script.contains('\0') {
        return Err(ApiError::field("script", "must not contain NUL bytes"));
    }
    let runtime = match request.runtime {
        Some(runtime) => Runtime::parse(&runtime).ok_or_else(|| {
            ApiError::field(
                "runtime",
                format!("unknown runtime {runtime:?}; expected host or docker"),
            )
        })?,
        None => base.map(|event| event.runtime).unwrap_or(Runtime::Host),
    };
    if !is_script && runtime == Runtime::Docker {
        return Err(ApiError::field(
            "runtime",
            format!("{} events have no container; use host", kind.as_str()),
        ));
    }
    let targets: Targets = match request.targets {
        Some(targets) => targets.into(),
        None => base.map(|event| event.targets.clone()).unwrap_or_default(),
    };
    if targets.agents.len() > 10_000 {
        return Err(ApiError::field("targets.agents", "lists too many agents"));
    }
    if targets.servers.len() > 10_000 {
        return Err(ApiError::field("targets.servers", "lists too many servers"));
    }
    labels_field("targets.labels", &targets.labels)?;
    super::pool::check("targets", &targets)?;
    let env = request
        .env
        .or_else(|| base.map(|event| event.env.clone()))
        .unwrap_or_default();
    for (key, value) in &env {
        check_env_name("env", key)?;
        if value.contains('\0') || value.len() > 64 * 1024 {
            return Err(ApiError::field(
                "env",
                format!("the value of {key} is invalid (NUL byte or over 64 KiB)"),
            ));
        }
    }
    let timeout_seconds = request
        .timeout_seconds
        .or_else(|| base.map(|event| event.timeout_seconds))
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    if timeout_seconds > 7 * 24 * 3600 {
        return Err(ApiError::field(
            "timeout_seconds",
            "must be at most 604800 (7 days); 0 means no timeout",
        ));
    }
    let retries = request
        .retries
        .or_else(|| base.map(|event| event.retries))
        .unwrap_or(0);
    if retries > 100 {
        return Err(ApiError::field("retries", "must be at most 100"));
    }
    Ok(EventFields {
        name: name.trim().to_string(),
        kind,
        script,
        runtime,
        targets,
        timeout_seconds,
        retries,
        env,
        docker,
        schedule,
        notify,
        next_run_at,
        reschedule,
        action,
        dispatch: None,
    })
}

async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    let owner = if user.is_admin() {
        None
    } else {
        Some(user.0.id.as_str())
    };
    let events = state.store.events(owner).await?;
    let policies = state.store.dispatch_policies().await?;
    Ok(Json(Value::Array(
        events
            .iter()
            .map(|event| {
                let mut value = event_json(event);
                super::dispatch::add_policy_json(
                    &mut value,
                    &policies.get(&event.id).cloned().unwrap_or_default(),
                );
                value
            })
            .collect(),
    )))
}

async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<EventRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let mut request = request;
    let secret_env = request.secret_env.take();
    let dispatch = request.take_dispatch();
    let mut fields = event_fields(request, None)?;
    let policy = super::dispatch::dispatch_policy(&dispatch, &Default::default())?;
    fields.dispatch = (!dispatch.is_empty()).then(|| policy.clone());
    let secrets = secret_env_change(&state.key, secret_env, &fields.env, &[])?;
    super::event_actions::check_secret_names(&fields.action, &[], &secrets)?;
    super::event_actions::check_tool(&state, &user, &user.0.id, &fields.action, None).await?;
    check_notify(&state, &user.0.id, &fields.notify, None).await?;
    let event = state
        .store
        .create_event_with_secrets(&user.0.id, &fields, secrets)
        .await
        .map_err(|error| match error {
            StoreError::Constraint(_) => {
                ApiError::Conflict(format!("you already have an event named {:?}", fields.name))
            }
            other => other.into(),
        })?;
    state.schedules.notify_one();
    state
        .changes
        .notify_owned(crate::changes::Kind::Event, &event.id, &event.owner_id);
    let mut body = event_json(&event);
    super::dispatch::add_policy_json(&mut body, &policy);
    Ok((StatusCode::CREATED, Json(body)))
}

/// Loads an event the caller may see.
async fn visible_event(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<Event> {
    user.visible(
        state.store.event(id).await,
        |event| &event.owner_id,
        "event",
    )
}

async fn show(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let event = visible_event(&state, &user, &id).await?;
    let mut body = event_json(&event);
    super::dispatch::add_policy_json(&mut body, &state.store.dispatch_policy(&event.id).await?);
    Ok(Json(body))
}

async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<EventRequest>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    let event = visible_event(&state, &user, &id).await?;
    let mut request = request;
    let secret_env = request.secret_env.take();
    let dispatch = request.take_dispatch();
    let mut fields = event_fields(request, Some(&event))?;
    let policy = super::dispatch::dispatch_policy(
        &dispatch,
        &state.store.dispatch_policy(&event.id).await?,
    )?;
    fields.dispatch = (!dispatch.is_empty()).then(|| policy.clone());
    let secrets = secret_env_change(&state.key, secret_env, &fields.env, &event.secret_env_names)?;
    super::event_actions::check_secret_names(&fields.action, &event.secret_env_names, &secrets)?;
    super::event_actions::check_tool(
        &state,
        &user,
        &event.owner_id,
        &fields.action,
        Some(&event.action),
    )
    .await?;
    check_notify(&state, &event.owner_id, &fields.notify, Some(&event.notify)).await?;
    let event = state
        .store
        .update_event_with_secrets(&id, &fields, secrets)
        .await
        .map_err(|error| match error {
            StoreError::Constraint(_) => {
                ApiError::Conflict(format!("you already have an event named {:?}", fields.name))
            }
            other => other.into(),
        })?;
    state.schedules.notify_one();
    state
        .changes
        .notify_owned(crate::changes::Kind::Event, &event.id, &event.owner_id);
    let mut body = event_json(&event);
    super::dispatch::add_policy_json(&mut body, &policy);
    Ok(Json(body))
}

async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_writer()?;
    let event = visible_event(&state, &user, &id).await?;
    state.store.delete_event(&id).await?;
    state.schedules.notify_one();
    state
        .changes
        .notify_owned(crate::changes::Kind::Event, &event.id, &event.owner_id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    input: Option<Value>,
    targets: Option<TargetsRequest>,
    /// Rollout fields that replace the event's for this run only.
    rollout: Option<Value>,
}

/// Resolves targets to agent ids: named agents (by id or name) must exist; labels select every
/// agent carrying all of them.
async fn resolve_targets(state: &AppState, targets: &Targets) -> ApiResult<Vec<String>> {
    let agents = state.store.agents().await?;
    let mut chosen = Vec::new();
    for wanted in &targets.agents {
        let agent = agents
            .iter()
            .find(|agent| &agent.id == wanted || &agent.name == wanted)
            .ok_or_else(|| {
                ApiError::field(
                    "targets.agents",
                    format!("no enrolled agent is called {wanted:?}"),
                )
            })?;
        chosen.push(agent.id.clone());
    }
    if !targets.labels.is_empty() {
        for agent in &agents {
            if targets
                .labels
                .iter()
                .all(|(key, value)| agent.labels.get(key) == Some(value))
            {
                chosen.push(agent.id.clone());
            }
        }
    }
    chosen.sort();
    chosen.dedup();
    Ok(chosen)
}

async fn trigger(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<TriggerRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let event = visible_event(&state, &user, &id).await?;
    let targets: Targets = match request.targets {
        Some(targets) => targets.into(),
        None => event.targets.clone(),
    };
    super::pool::check("targets", &targets)?;
    if targets.is_empty() && !event.action.on_control_plane(event.kind) {
        return Err(ApiError::field(
            "targets",
            "the event has no targets; give agents, labels, servers or a pool",
        ));
    }
    let input = request.input.map(|input| input.to_string());
    if input
        .as_ref()
        .is_some_and(|input| input.len() > MAX_INPUT_BYTES)
    {
        return Err(ApiError::field(
            "input",
            format!("is larger than {MAX_INPUT_BYTES} bytes"),
        ));
    }
    // A rollout override is merged over the event's policy and checked as a whole.
    let over = match &request.rollout {
        None => None,
        Some(value) => {
            let (over, given) = super::dispatch::rollout_request(value, "rollout")?;
            state
                .store
                .dispatch_policy(&event.id)
                .await?
                .rollout
                .merged(&over, &given)
                .validate("rollout")
                .map_err(|(field, message)| ApiError::field(&field, message))?;
            Some((over, given))
        }
    };
    let prepared = prepare_run(&state, &event, &targets).await?;
    let mut spec = crate::store::jobs::RunSpec::manual(&NewRun {
        event_id: &event.id,
        kind: event.kind.as_str(),
        script: &event.script,
        env: &event.env,
        runtime_spec: Some(&prepared.runtime_spec),
        input: input.as_deref(),
        timeout_seconds: event.timeout_seconds,
        max_attempts: event.retries + 1,
        created_by: &user.0.id,
        agent_ids: &prepared.agent_ids,
    })?;
    spec.pool = prepared.pool;
    let (run_id, jobs) = state.store.create_run_dispatched(spec, over, None).await?;
    // The jobs are durable; now wake their runners (no agent polls; the SSH worker and the
    // control plane's own worker only for jobs of theirs: each wake-up costs them a look at
    // the queue), and tell the dispatcher (offline hosts of a rollout).
    for (job_id, runner) in &jobs {
        crate::dispatch::wake_runner(&state, runner);
        state.job_events.notify(job_id);
    }
    if prepared.pool {
        // One job; the pairs name its candidates, woken above.
        let mut ids: Vec<&String> = jobs.iter().map(|(job_id, _)| job_id).collect();
        ids.dedup();
        let jobs: Vec<Value> = ids
            .into_iter()
            .map(|job_id| json!({"id": job_id, "pool": true}))
            .collect();
        return Ok((
            StatusCode::CREATED,
            Json(json!({"run_id": run_id, "jobs": jobs})),
        ));
    }
    let jobs: Vec<Value> = jobs
        .iter()
        .map(
            |(job_id, runner)| match crate::ssh::server_of_runner(runner) {
                Some(server_id) => json!({"id": job_id, "server_id": server_id}),
                None if runner == crate::store::jobs::CONTROL_PLANE_RUNNER => {
                    json!({"id": job_id, "executor": "control_plane"})
                }
                None => json!({"id": job_id, "agent_id": runner}),
            },
        )
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"run_id": run_id, "jobs": jobs})),
    ))
}

/// What a run of an event needs besides the event: its agents and runtime settings.
pub(crate) struct PreparedRun {
    /// With `pool`: the candidates of the run's one job.
    pub agent_ids: Vec<String>,
    /// One pool job (`targets.pool`) instead of a job per agent.
    pub pool: bool,
    /// JSON of the wire's `RuntimeSpec`.
    pub runtime_spec: String,
}

/// How a run that no API request asked for (a cron slot, a workflow node) was triggered.
pub(crate) struct BackgroundTrigger<'a> {
    pub input: Option<&'a str>,
    pub created_by: &'a str,
    /// `manual` or `schedule`.
    pub trigger: &'static str,
    pub slot_at: Option<i64>,
    pub missed_slots: i64,
}

/// The run a background trigger creates for `event` on `targets`, through the API's
/// run-creation path ([`prepare_run`]). The error is a text for the record of why no run was
/// created (the details of an internal error go to the log).
pub(crate) async fn background_run_spec(
    state: &AppState,
    event: &Event,
    targets: &Targets,
    how: BackgroundTrigger<'_>,
) -> Result<crate::store::jobs::RunSpec, String> {
    let prepared = prepare_run(state, event, targets)
        .await
        .map_err(|error| match error {
            ApiError::Unprocessable { message, .. }
            | ApiError::BadRequest { message, .. }
            | ApiError::Conflict(message) => message,
            other => {
                tracing::warn!(event_id = %event.id, trigger = how.trigger, error = ?other, "could not prepare a run");
                "internal error (see the control plane's log)".into()
            }
        })?;
    Ok(crate::store::jobs::RunSpec {
        event_id: event.id.clone(),
        kind: event.kind.as_str().to_string(),
        script: event.script.clone(),
        env: serde_json::to_string(&event.env).unwrap_or_else(|_| "{}".into()),
        runtime_spec: Some(prepared.runtime_spec),
        input: how.input.map(str::to_string),
        timeout_seconds: event.timeout_seconds,
        max_attempts: event.retries + 1,
        created_by: how.created_by.to_string(),
        agent_ids: prepared.agent_ids,
        trigger: how.trigger,
        slot_at: how.slot_at,
        missed_slots: how.missed_slots,
        pool: prepared.pool,
    })
}

/// Resolves `targets` to agents and the event's runtime settings: the run-creation path shared
/// by the API trigger and the scheduler.
pub(crate) async fn prepare_run(
    state: &AppState,
    event: &Event,
    targets: &Targets,
) -> ApiResult<PreparedRun> {
    // Tool actions and HTTP requests the control plane makes: one job, no targets.
    if let Some((agent_ids, runtime_spec)) = super::event_actions::control_plane_run(event)? {
        return Ok(PreparedRun {
            agent_ids,
            runtime_spec,
            pool: false,
        });
    }
    if let Some(pool) = &targets.pool {
        return prepare_pool_run(state, event, pool).await;
    }
    let mut agent_ids = resolve_targets(state, targets).await?;
    let servers = super::servers::resolve_servers(state, &event.owner_id, &targets.servers).await?;
    if event.kind == EventKind::HttpRequest
        && servers
            .iter()
            .any(|runner| crate::ssh::server_of_runner(runner).is_some())
    {
        return Err(ApiError::field(
            "targets.servers",
            "SSH servers run scripts only; an HTTP request runs on agents or on the control plane (executor: control_plane)",
        ));
    }
    if event.runtime == Runtime::Docker
        && servers
            .iter()
            .any(|runner| crate::ssh::server_of_runner(runner).is_some())
    {
        return Err(ApiError::field(
            "runtime",
            "SSH servers run host jobs only; target an agent for Docker",
        ));
    }
    agent_ids.extend(servers);
    agent_ids.sort();
    agent_ids.dedup();
    if agent_ids.is_empty() {
        return Err(ApiError::field(
            "targets.labels",
            "no enrolled agent matches these labels",
        ));
    }
    if let Some(runtime_spec) = super::event_actions::agent_runtime_spec(event)? {
        return Ok(PreparedRun {
            agent_ids,
            runtime_spec,
            pool: false,
        });
    }
    let runtime_spec = match event.runtime {
        Runtime::Host => host_runtime_spec(event),
        Runtime::Docker => docker_runtime_spec(state, event, &agent_ids).await?,
    };
    let runtime_spec = serde_json::to_string(&runtime_spec)
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("runtime spec: {error}")))?;
    Ok(PreparedRun {
        agent_ids,
        runtime_spec,
        pool: false,
    })
}

/// [`prepare_run`] for a pool target: the candidates are the enrolled agents carrying every
/// label of the pool, online or not (for a Docker event, those whose last hello did not report
/// a missing Docker engine).
async fn prepare_pool_run(
    state: &AppState,
    event: &Event,
    pool: &BTreeMap<String, String>,
) -> ApiResult<PreparedRun> {
    let agents = state.store.agents().await?;
    let mut agent_ids = super::pool::candidates(&agents, pool);
    if agent_ids.is_empty() {
        return Err(ApiError::field(
            "targets.pool",
            "no enrolled agent matches the pool's labels",
        ));
    }
    if let Some(runtime_spec) = super::event_actions::agent_runtime_spec(event)? {
        return Ok(PreparedRun {
            agent_ids,
            runtime_spec,
            pool: true,
        });
    }
    let runtime_spec = match event.runtime {
        Runtime::Host => host_runtime_spec(event),
        Runtime::Docker => {
            agent_ids.retain(|id| {
                agents
                    .iter()
                    .any(|agent| &agent.id == id && agent.docker != Some(false))
            });
            if agent_ids.is_empty() {
                return Err(ApiError::field(
                    "runtime",
                    "this docker event's pool has no agent with a reachable Docker engine",
                ));
            }
            docker_runtime_spec(state, event, &agent_ids).await?
        }
    };
    let runtime_spec = serde_json::to_string(&runtime_spec)
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("runtime spec: {error}")))?;
    Ok(PreparedRun {
        agent_ids,
        runtime_spec,
        pool: true,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewQuery {
    count: Option<usize>,
}

/// The next `count` fire times of a schedule after now.
fn preview_json(
    spec: &ScheduleSpec,
    compiled: &CompiledSchedule,
    count: Option<usize>,
) -> ApiResult<Value> {
    let count = count.unwrap_or(10);
    if !(1..=MAX_PREVIEW).contains(&count) {
        return Err(ApiError::field("count", format!("must be 1-{MAX_PREVIEW}")));
    }
    let times: Vec<Value> = compiled
        .upcoming(crate::store::now_ms(), count)
        .into_iter()
        .map(|instant| fire_time_json(instant, compiled.zone()))
        .collect();
    Ok(json!({"schedule": schedule_json(spec), "fire_times": times}))
}

async fn preview_event(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(query): Query<PreviewQuery>,
) -> ApiResult<Json<Value>> {
    let event = visible_event(&state, &user, &id).await?;
    let spec = event
        .schedule
        .ok_or_else(|| ApiError::Conflict("the event has no schedule".into()))?;
    let compiled = CompiledSchedule::new(&spec.cron, &spec.timezone, spec.dst)
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("stored schedule: {error}")))?;
    Ok(Json(preview_json(&spec, &compiled, query.count)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    cron: String,
    timezone: Option<String>,
    dst: Option<String>,
    count: Option<usize>,
}

async fn preview_unsaved(
    _user: CurrentUser,
    ApiJson(request): ApiJson<PreviewRequest>,
) -> ApiResult<Json<Value>> {
    let (spec, compiled) = schedule_spec(&ScheduleRequest {
        cron: request.cron,
        timezone: request.timezone,
        dst: request.dst,
        misfire: None,
        overlap: None,
    })?;
    Ok(Json(preview_json(&spec, &compiled, request.count)?))
}

/// The most recent handled slots of an event (the slot keys), newest first.
async fn slot_records(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let event = visible_event(&state, &user, &id).await?;
    let records = state.store.slot_records(&event.id, 1000).await?;
    Ok(Json(Value::Array(
        records
            .iter()
            .map(|record| {
                json!({
                    "slot_at": timestamp(Some(record.slot_at)),
                    "outcome": record.outcome,
                    "reason": record.reason,
                    "run_id": record.run_id,
                    "missed_slots": record.missed_slots,
                    "handled_at": timestamp(Some(record.handled_at)),
                })
            })
            .collect(),
    )))
}

/// The host settings copied into each job of a host event (stored as JSON of the wire's
/// `RuntimeSpec`). PIDs are limited only when the event sets a limit: the Docker default does
/// not apply to host jobs.
fn host_runtime_spec(event: &Event) -> cronium_protocol::RuntimeSpec {
    let settings = &event.docker;
    cronium_protocol::RuntimeSpec::Host(cronium_protocol::HostSpec {
        user: settings.user.clone(),
        memory_mb: settings.memory_mb.map(u64::from),
        cpus: settings.cpus,
        pids: settings.pids,
    })
}

/// The container settings copied into each job of a Docker event (stored as JSON of the wire's
/// `RuntimeSpec`, image resolved). Refuses targets whose last hello reported no Docker engine.
async fn docker_runtime_spec(
    state: &AppState,
    event: &Event,
    agent_ids: &[String],
) -> ApiResult<cronium_protocol::RuntimeSpec> {
    let agents = state.store.agents().await?;
    let without: Vec<&str> = agents
        .iter()
        .filter(|agent| agent_ids.contains(&agent.id) && agent.docker == Some(false))
        .map(|agent| agent.name.as_str())
        .collect();
    if !without.is_empty() {
        return Err(ApiError::field(
            "runtime",
            format!(
                "this docker event targets agents without a reachable Docker engine: {}",
                without.join(", ")
            ),
        ));
    }
    let docker = &event.docker;
    let defaults = &state.config.docker_images;
    let image = docker.image.clone().unwrap_or_else(|| {
        match event.kind {
            EventKind::Python => &defaults.python,
            EventKind::Nodejs => &defaults.nodejs,
            _ => &defaults.bash,
        }
        .clone()
    });
    let spec = cronium_protocol::DockerSpec {
        image,
        memory_mb: docker.memory_mb.map(u64::from),
        cpus: docker.cpus,
        pids: Some(docker.docker_pids()),
        network: match docker.network {
            Network::None => cronium_protocol::DockerNetwork::None,
            Network::Bridge => cronium_protocol::DockerNetwork::Bridge,
        },
        read_only: docker.read_only,
        user: docker.user.clone(),
    };
    Ok(cronium_protocol::RuntimeSpec::Docker(spec))
}
