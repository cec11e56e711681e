//! `/workflows`: create, read, update, delete, trigger and cancel workflow runs; and the
//! unauthenticated webhook trigger `POST /hooks/workflows/{id}`, authorised by an HMAC-SHA256
//! signature of the body with the workflow's secret (sealed at rest, shown once).
//!
//! The rules the engine follows are documented in `crate::workflows`.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::auth::CurrentUser;
use super::error::{ApiError, ApiJson, ApiResult};
use super::{object_name, timestamp};
use crate::AppState;
use crate::schedule::{CompiledSchedule, DstPolicy};
use crate::store::StoreError;
use crate::store::workflows::{WebhookSecret, Workflow, WorkflowFields, WorkflowRun};
use crate::workflows::engine::{self, Trigger};
use crate::workflows::{Definition, Edge, Node};

/// Largest webhook body (and manual `input`) accepted, in bytes.
pub const MAX_HOOK_BODY_BYTES: usize = 256 * 1024;

/// The header that carries a webhook's signature: `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "x-cronium-signature";

/// Most runs `GET /workflows/{id}/runs` returns.
const MAX_LISTED_RUNS: u32 = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/workflows", get(list).post(create))
        .route("/workflows/{id}", get(show).patch(update).delete(remove))
        .route("/workflows/{id}/runs", get(runs).post(trigger))
        .route("/workflows/{id}/webhook-secret", post(rotate_secret))
        .route("/workflow-runs/{id}", get(show_run))
        .route("/workflow-runs/{id}/cancel", post(cancel_run))
        .route(
            "/hooks/workflows/{id}",
            post(hook).layer(DefaultBodyLimit::max(MAX_HOOK_BODY_BYTES)),
        )
}

/// Distinguishes an absent field (`None`) from `null` (`Some(None)`).
fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ScheduleRequest {
    cron: String,
    timezone: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    manual: Option<bool>,
    /// `null` removes the schedule.
    #[serde(default, deserialize_with = "double_option")]
    schedule: Option<Option<ScheduleRequest>>,
    webhook: Option<bool>,
}

/// The body of `POST /workflows` and, with every field optional, `PATCH /workflows/{id}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WorkflowRequest {
    name: Option<String>,
    nodes: Option<Vec<Node>>,
    edges: Option<Vec<Edge>>,
    trigger: Option<TriggerRequest>,
}

fn workflow_json(state: &AppState, workflow: &Workflow) -> Value {
    let definition: Definition = serde_json::from_str(&workflow.definition).unwrap_or_default();
    let schedule = workflow.schedule_cron.as_ref().map(|cron| {
        json!({"cron": cron, "timezone": workflow.schedule_timezone.as_deref().unwrap_or("UTC")})
    });
    json!({
        "id": workflow.id,
        "owner_id": workflow.owner_id,
        "name": workflow.name,
        "nodes": definition.nodes,
        "edges": definition.edges,
        "trigger": {"manual": workflow.trigger_manual, "schedule": schedule, "webhook": workflow.webhook},
        "webhook_url": workflow.webhook.then(|| webhook_url(state, &workflow.id)),
        "next_run_at": timestamp(workflow.next_run_at),
        "created_at": timestamp(Some(workflow.created_at)),
        "updated_at": timestamp(Some(workflow.updated_at)),
    })
}

fn webhook_url(state: &AppState, id: &str) -> String {
    format!("{}/api/v1/hooks/workflows/{id}", state.config.public_url)
}

fn run_json(run: &WorkflowRun) -> Value {
    let definition: Definition = serde_json::from_str(&run.definition).unwrap_or_default();
    let parse = |text: &Option<String>| {
        text.as_deref()
            .map(|text| serde_json::from_str(text).unwrap_or_else(|_| json!(text)))
            .unwrap_or(Value::Null)
    };
    // Nodes in the definition's order.
    let nodes: Vec<Value> = definition
        .nodes
        .iter()
        .filter_map(|node| {
            let stored = run.nodes.iter().find(|stored| stored.node_id == node.id)?;
            Some(json!({
                "id": node.id,
                "event_id": node.event_id,
                "state": stored.state,
                "run_id": stored.run_id,
                "input": parse(&stored.input),
                "result": parse(&stored.result),
                "condition": stored.condition,
                "reason": stored.reason,
                "started_at": timestamp(stored.started_at),
                "finished_at": timestamp(stored.finished_at),
            }))
        })
        .collect();
    json!({
        "id": run.id,
        "workflow_id": run.workflow_id,
        "status": run.status,
        "trigger": run.trigger,
        "slot_at": timestamp(run.slot_at),
        "input": parse(&run.input),
        "created_by": run.created_by,
        "created_at": timestamp(Some(run.created_at)),
        "finished_at": timestamp(run.finished_at),
        "nodes": nodes,
    })
}

/// Validates a request over `base` (for a PATCH) into the fields to store; the nodes' events
/// must be visible to the caller (by id, or by the name of one of the caller's events).
/// Returns the fields and whether the webhook trigger is wanted.
async fn workflow_fields(
    state: &AppState,
    user: &CurrentUser,
    request: WorkflowRequest,
    base: Option<&Workflow>,
) -> ApiResult<(WorkflowFields, bool)> {
    let name = match (request.name, base) {
        (Some(name), _) => object_name(&name)?,
        (None, Some(base)) => base.name.clone(),
        (None, None) => return Err(ApiError::field("name", "is required")),
    };
    let base_definition: Definition = base
        .map(|base| serde_json::from_str(&base.definition))
        .transpose()
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("stored workflow: {error}")))?
        .unwrap_or_default();
    let mut definition = Definition {
        nodes: request.nodes.unwrap_or(base_definition.nodes),
        edges: request.edges.unwrap_or(base_definition.edges),
    };
    definition
        .validate()
        .map_err(|error| ApiError::field(&error.field, error.message))?;
    let mine = state.store.events(Some(&user.0.id)).await?;
    for (index, node) in definition.nodes.iter_mut().enumerate() {
        let event = match state.store.event(&node.event_id).await {
            Ok(event) if user.may_access(&event.owner_id) => Some(event),
            Ok(_) | Err(StoreError::NotFound) => mine
                .iter()
                .find(|event| event.name == node.event_id)
                .cloned(),
            Err(error) => return Err(error.into()),
        };
        let Some(event) = event else {
            return Err(ApiError::field(
                &format!("nodes[{index}].event_id"),
                format!("no event {:?} that you can use", node.event_id),
            ));
        };
        node.event_id = event.id;
    }
    let trigger = request.trigger.unwrap_or_default();
    let trigger_manual = trigger
        .manual
        .unwrap_or_else(|| base.is_none_or(|base| base.trigger_manual));
    let schedule = match trigger.schedule {
        Some(schedule) => schedule,
        None => base.and_then(|base| {
            base.schedule_cron.clone().map(|cron| ScheduleRequest {
                cron,
                timezone: base.schedule_timezone.clone(),
            })
        }),
    };
    let (schedule_cron, schedule_timezone, next_run_at) = match schedule {
        None => (None, None, None),
        Some(schedule) => {
            if schedule.cron.len() > 256 {
                return Err(ApiError::field(
                    "trigger.schedule.cron",
                    "is longer than 256 characters",
                ));
            }
            let cron = schedule.cron.trim().to_string();
            let timezone = schedule.timezone.unwrap_or_else(|| "UTC".into());
            let compiled =
                CompiledSchedule::new(&cron, &timezone, DstPolicy::default()).map_err(|error| {
                    ApiError::field(&format!("trigger.{}", error.field), error.message)
                })?;
            let next = compiled.next_after(crate::store::now_ms()).ok_or_else(|| {
                ApiError::field("trigger.schedule.cron", "never matches a future time")
            })?;
            (Some(cron), Some(timezone), Some(next))
        }
    };
    let webhook = trigger
        .webhook
        .unwrap_or_else(|| base.is_some_and(|base| base.webhook));
    let definition = serde_json::to_string(&definition)
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("definition: {error}")))?;
    Ok((
        WorkflowFields {
            name,
            definition,
            trigger_manual,
            schedule_cron,
            schedule_timezone,
            next_run_at,
        },
        webhook,
    ))
}

fn conflict_on_name(name: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |error| match error {
        StoreError::Constraint(_) => {
            ApiError::Conflict(format!("you already have a workflow named {name:?}"))
        }
        other => other.into(),
    }
}

async fn list(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Json<Value>> {
    let owner = (!user.is_admin()).then_some(user.0.id.as_str());
    let workflows = state.store.workflows(owner).await?;
    Ok(Json(Value::Array(
        workflows
            .iter()
            .map(|workflow| workflow_json(&state, workflow))
            .collect(),
    )))
}

async fn create(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiJson(request): ApiJson<WorkflowRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let (fields, webhook) = workflow_fields(&state, &user, request, None).await?;
    let secret = webhook.then(|| crate::crypto::random_token("whsec_"));
    let sealed = secret
        .as_ref()
        .map(|secret| state.key.seal(secret.as_bytes()));
    let workflow = state
        .store
        .create_workflow(&user.0.id, &fields, sealed)
        .await
        .map_err(conflict_on_name(&fields.name))?;
    state.schedules.notify_one();
    state.changes.notify_owned(
        crate::changes::Kind::Workflow,
        &workflow.id,
        &workflow.owner_id,
    );
    let mut body = workflow_json(&state, &workflow);
    if let Some(secret) = secret {
        // Shown this once; only its sealed form is stored.
        body["webhook_secret"] = json!(secret);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// Loads a workflow the caller may see.
async fn visible_workflow(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<Workflow> {
    user.visible(
        state.store.workflow(id).await,
        |workflow| &workflow.owner_id,
        "workflow",
    )
}

async fn show(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let workflow = visible_workflow(&state, &user, &id).await?;
    Ok(Json(workflow_json(&state, &workflow)))
}

async fn update(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<WorkflowRequest>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    let workflow = visible_workflow(&state, &user, &id).await?;
    let (fields, webhook) = workflow_fields(&state, &user, request, Some(&workflow)).await?;
    let secret = (webhook && !workflow.webhook).then(|| crate::crypto::random_token("whsec_"));
    let change = match (&secret, webhook) {
        (Some(secret), _) => WebhookSecret::Set(state.key.seal(secret.as_bytes())),
        (None, true) => WebhookSecret::Keep,
        (None, false) => WebhookSecret::Clear,
    };
    let updated = state
        .store
        .update_workflow(&id, &fields, change)
        .await
        .map_err(conflict_on_name(&fields.name))?;
    state.schedules.notify_one();
    state.changes.notify_owned(
        crate::changes::Kind::Workflow,
        &updated.id,
        &updated.owner_id,
    );
    let mut body = workflow_json(&state, &updated);
    if let Some(secret) = secret {
        body["webhook_secret"] = json!(secret);
    }
    Ok(Json(body))
}

async fn remove(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_writer()?;
    let workflow = visible_workflow(&state, &user, &id).await?;
    state.store.delete_workflow(&id).await?;
    state.schedules.notify_one();
    state.changes.notify_owned(
        crate::changes::Kind::Workflow,
        &workflow.id,
        &workflow.owner_id,
    );
    Ok(StatusCode::NO_CONTENT)
}

/// A new webhook secret (the old one stops working at once), shown once.
async fn rotate_secret(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    let workflow = visible_workflow(&state, &user, &id).await?;
    let secret = crate::crypto::random_token("whsec_");
    let fields = WorkflowFields {
        name: workflow.name.clone(),
        definition: workflow.definition.clone(),
        trigger_manual: workflow.trigger_manual,
        schedule_cron: workflow.schedule_cron.clone(),
        schedule_timezone: workflow.schedule_timezone.clone(),
        next_run_at: workflow.next_run_at,
    };
    state
        .store
        .update_workflow(
            &id,
            &fields,
            WebhookSecret::Set(state.key.seal(secret.as_bytes())),
        )
        .await?;
    Ok(Json(json!({
        "webhook_secret": secret,
        "webhook_url": webhook_url(&state, &id),
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    input: Option<Value>,
}

/// Starts a run and answers with it (entry nodes already started).
async fn start_run(
    state: &AppState,
    workflow: &Workflow,
    trigger: Trigger,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let started = engine::start(state, workflow, trigger)
        .await
        .map_err(|error| ApiError::Internal(error.into()))?;
    let id = started.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("run not created")))?;
    let run = state.store.workflow_run(&id).await?;
    Ok((StatusCode::CREATED, Json(run_json(&run))))
}

async fn trigger(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<RunRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_writer()?;
    let workflow = visible_workflow(&state, &user, &id).await?;
    if !workflow.trigger_manual {
        return Err(ApiError::Conflict(
            "manual runs of this workflow are off (trigger.manual is false)".into(),
        ));
    }
    if request
        .input
        .as_ref()
        .is_some_and(|input| input.to_string().len() > MAX_HOOK_BODY_BYTES)
    {
        return Err(ApiError::field(
            "input",
            format!("is larger than {MAX_HOOK_BODY_BYTES} bytes"),
        ));
    }
    start_run(
        &state,
        &workflow,
        Trigger {
            kind: "manual",
            input: request.input,
            created_by: user.0.id.clone(),
            fire: None,
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    limit: Option<u32>,
}

async fn runs(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
    Query(query): Query<RunsQuery>,
) -> ApiResult<Json<Value>> {
    let workflow = visible_workflow(&state, &user, &id).await?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=MAX_LISTED_RUNS).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1-{MAX_LISTED_RUNS}"),
        ));
    }
    let runs = state.store.workflow_runs(&workflow.id, limit).await?;
    Ok(Json(Value::Array(runs.iter().map(run_json).collect())))
}

/// Loads a workflow run whose workflow the caller may see.
async fn visible_run(state: &AppState, user: &CurrentUser, id: &str) -> ApiResult<WorkflowRun> {
    let run = match state.store.workflow_run(id).await {
        Ok(run) => run,
        Err(StoreError::NotFound) => return Err(ApiError::NotFound("workflow run")),
        Err(error) => return Err(error.into()),
    };
    visible_workflow(state, user, &run.workflow_id)
        .await
        .map_err(|error| match error {
            ApiError::NotFound(_) => ApiError::NotFound("workflow run"),
            other => other,
        })?;
    Ok(run)
}

async fn show_run(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(run_json(&visible_run(&state, &user, &id).await?)))
}

async fn cancel_run(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_writer()?;
    visible_run(&state, &user, &id).await?;
    if !engine::cancel(&state, &id).await? {
        return Err(ApiError::Conflict(
            "the workflow run has already ended".into(),
        ));
    }
    Ok(Json(run_json(&state.store.workflow_run(&id).await?)))
}

/// Whether `header` is `sha256=<hex>` of HMAC-SHA256(`secret`, `body`); compared in constant
/// time.
pub fn signature_matches(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_tag) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = hex::decode(hex_tag) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).is_ok()
}

/// The webhook trigger: unauthenticated, authorised by the signature. A missing or wrong
/// signature answers 401; an unknown workflow and one without a webhook trigger 404 (ids are
/// not secrets; the signature is).
async fn hook(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let sealed = match state.store.workflow_webhook_secret(&id).await {
        Ok(Some(sealed)) => sealed,
        Ok(None) | Err(StoreError::NotFound) => return Err(ApiError::NotFound("workflow webhook")),
        Err(error) => return Err(error.into()),
    };
    let secret = state
        .key
        .open(&sealed)
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("webhook secret: {error}")))?;
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|value| value.to_str().ok());
    if !signature.is_some_and(|signature| signature_matches(&secret, &body, signature)) {
        tracing::info!(workflow_id = %id, "webhook refused: missing or wrong signature");
        return Err(ApiError::Unauthorized);
    }
    let input = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice::<Value>(&body).map_err(|error| ApiError::BadRequest {
                field: Some("body".into()),
                message: format!("the body is not JSON: {error}"),
            })?,
        )
    };
    let workflow = state.store.workflow(&id).await?;
    start_run(
        &state,
        &workflow,
        Trigger {
            kind: "webhook",
            input,
            created_by: workflow.owner_id.clone(),
            fire: None,
        },
    )
    .await
}
