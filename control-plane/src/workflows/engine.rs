//! The workflow engine: applies the rules of `workflows/mod.rs` to the durable state.
//!
//! One task ([`run`], owned by the control plane's task tracker and stopped by its shutdown
//! token) advances workflow runs when a job of a node's run ends (the job-change broadcast of
//! `queue/`), and at start-up and every [`SCAN_PERIOD`] scans every active workflow run, which
//! also covers a broadcast that lagged or a restart between a job's end and the decision.
//! Advancing a run reads its nodes, decides, prepares the runs of the nodes that start (the
//! API's `prepare_run`), and commits everything as one step ([`Store::apply_workflow_step`]):
//! if anything moved meanwhile the step is refused as a whole and the engine reads again.
//! The API (manual runs, cancel), the webhook and the scheduler call the same functions.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{debug, info, warn};

use super::{Decision, Definition, NodeState, NodeView, decide, final_status};
use crate::AppState;
use crate::http::events::BackgroundTrigger;
use crate::store::events::Targets;
use crate::store::jobs::{JobStatus, RunSpec};
use crate::store::workflows::{
    NewWorkflowRun, NodeChange, SlotFire, Step, StepOutcome, Workflow, WorkflowRun,
};
use crate::store::{StoreError, StoreResult, new_id};

/// How often every active workflow run is looked at even without a job change.
pub const SCAN_PERIOD: Duration = Duration::from_secs(10);

/// Most job changes looked up in one query.
const MAX_CHANGES_PER_LOOKUP: usize = 500;

/// How often a step is read and decided again when it raced with another change.
const MAX_STEP_TRIES: usize = 8;

/// Largest input a node gets, serialized, in bytes (a larger one fails the node).
pub const MAX_NODE_INPUT_BYTES: usize = 1024 * 1024;

/// Why a workflow run could not be created.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the stored workflow is invalid: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The engine's task: advances workflow runs until the control plane shuts down.
pub async fn run(state: AppState) {
    let mut job_changes = state.job_events.subscribe();
    let mut scan = tokio::time::interval(SCAN_PERIOD);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            // The first tick is immediate: the start-up scan.
            _ = scan.tick() => scan_all(&state).await,
            changed = job_changes.recv() => match changed {
                Ok(job_id) => {
                    // A fan-out changes thousands of jobs at once: the ids already waiting are
                    // looked up together, one query per wake-up instead of one per change.
                    let mut ids = vec![job_id];
                    let mut lagged = false;
                    while ids.len() < MAX_CHANGES_PER_LOOKUP {
                        match job_changes.try_recv() {
                            Ok(id) => ids.push(id),
                            Err(TryRecvError::Lagged(_)) => lagged = true,
                            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                        }
                    }
                    ids.sort_unstable();
                    ids.dedup();
                    let ids: Vec<&str> = ids.iter().map(|id| &**id).collect();
                    match state.store.workflow_runs_of_ended_jobs(&ids).await {
                        Ok(runs) => {
                            for workflow_run_id in runs {
                                advance_logged(&state, &workflow_run_id).await;
                            }
                        }
                        Err(error) => warn!(%error, "workflow engine: looking up jobs failed"),
                    }
                    if lagged {
                        debug!("workflow engine lagged behind job changes; scanning");
                        scan_all(&state).await;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    debug!(missed, "workflow engine lagged behind job changes; scanning");
                    scan_all(&state).await;
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

async fn scan_all(state: &AppState) {
    match state.store.active_workflow_runs().await {
        Ok(ids) => {
            for id in ids {
                if state.shutdown.is_cancelled() {
                    return;
                }
                advance_logged(state, &id).await;
            }
        }
        Err(error) => warn!(%error, "workflow engine: listing active runs failed"),
    }
}

async fn advance_logged(state: &AppState, workflow_run_id: &str) {
    if let Err(error) = advance(state, workflow_run_id).await {
        warn!(%workflow_run_id, %error, "workflow engine: advancing a run failed");
    }
}

/// The JSON of a stored value (`null` when absent; a string when it is not JSON).
fn parse_json(text: Option<&str>) -> Value {
    match text {
        None => Value::Null,
        Some(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
    }
}

fn parse_definition(text: &str) -> Result<Definition, StartError> {
    serde_json::from_str(text).map_err(|error| StartError::Corrupt(error.to_string()))
}

/// Who the node runs of a workflow run are created by.
struct RunContext<'a> {
    definition: &'a Definition,
    input: Value,
    created_by: String,
}

/// The decisions for the pending nodes, applied to `views` until nothing changes, as node
/// changes: starts with their prepared runs, skips, and starts that failed (a node whose
/// run cannot be created fails, with the reason).
async fn plan_pending(
    state: &AppState,
    context: &RunContext<'_>,
    views: &mut BTreeMap<String, NodeView>,
) -> Vec<NodeChange> {
    let mut changes = Vec::new();
    loop {
        let decisions = decide(context.definition, views, &context.input);
        if decisions.is_empty() {
            return changes;
        }
        for decision in decisions {
            match decision {
                Decision::Skip { node } => {
                    views.insert(
                        node.clone(),
                        NodeView {
                            state: NodeState::Skipped,
                            ..NodeView::pending()
                        },
                    );
                    changes.push(NodeChange {
                        node_id: node,
                        from: "pending",
                        to: "skipped",
                        input: None,
                        result: None,
                        condition: None,
                        reason: Some("no incoming edge was taken".into()),
                        run: None,
                    });
                }
                Decision::Start { node, input } => {
                    let input_text = (!input.is_null()).then(|| input.to_string());
                    let prepared = match context.definition.node(&node) {
                        Some(definition) => {
                            node_run(state, context, definition, input_text.as_deref()).await
                        }
                        None => Err("the node is not in the definition".to_string()),
                    };
                    let (to, run, reason, view_state) = match prepared {
                        Ok(run) => ("running", Some(Box::new(run)), None, NodeState::Running),
                        Err(reason) => ("failed", None, Some(reason), NodeState::Failed),
                    };
                    views.insert(
                        node.clone(),
                        NodeView {
                            state: view_state,
                            ..NodeView::pending()
                        },
                    );
                    changes.push(NodeChange {
                        node_id: node,
                        from: "pending",
                        to,
                        input: input_text,
                        result: None,
                        condition: None,
                        reason,
                        run,
                    });
                }
            }
        }
    }
}

/// The run a node starts: its event with the node's targets (or the event's), through the
/// API's run-creation path. The error is the reason the node fails.
async fn node_run(
    state: &AppState,
    context: &RunContext<'_>,
    node: &super::Node,
    input: Option<&str>,
) -> Result<RunSpec, String> {
    if input.is_some_and(|input| input.len() > MAX_NODE_INPUT_BYTES) {
        return Err(format!(
            "its input is larger than {MAX_NODE_INPUT_BYTES} bytes"
        ));
    }
    let event = match state.store.event(&node.event_id).await {
        Ok(event) => event,
        Err(StoreError::NotFound) => return Err("its event no longer exists".into()),
        Err(error) => {
            warn!(%error, "workflow engine: loading an event failed");
            return Err("internal error (see the control plane's log)".into());
        }
    };
    let targets: Targets = match &node.targets {
        Some(targets) => targets.into(),
        None => event.targets.clone(),
    };
    if targets.is_empty() && !event.action.on_control_plane(event.kind) {
        return Err("the event has no targets and the node sets none".into());
    }
    crate::http::events::background_run_spec(
        state,
        &event,
        &targets,
        BackgroundTrigger {
            input,
            created_by: &context.created_by,
            trigger: "manual",
            slot_at: None,
            missed_slots: 0,
        },
    )
    .await
}

/// Wakes the runners of the jobs a step created: agents, the SSH worker and the control
/// plane's own executor (HTTP requests, tool actions).
fn wake(state: &AppState, jobs: &[(String, String)]) {
    for (job_id, runner) in jobs {
        crate::dispatch::wake_runner(state, runner);
        // The node runs' new jobs, for the console's lists.
        state.changes.touch(crate::changes::Kind::Job, job_id);
    }
}

/// How a workflow run is triggered.
pub struct Trigger {
    /// `manual`, `schedule` or `webhook`.
    pub kind: &'static str,
    pub input: Option<Value>,
    /// The user who triggered it (the workflow's owner for schedules and webhooks).
    pub created_by: String,
    /// The schedule slot it is for.
    pub fire: Option<SlotFire>,
}

/// Creates a workflow run and starts its entry nodes in one transaction. `None`: the schedule
/// slot of `trigger.fire` was already handled (nothing was written).
pub async fn start(
    state: &AppState,
    workflow: &Workflow,
    trigger: Trigger,
) -> Result<Option<String>, StartError> {
    let missed = trigger
        .fire
        .as_ref()
        .is_some_and(|fire| fire.outcome != "fired");
    let definition = if missed {
        Definition::default()
    } else {
        parse_definition(&workflow.definition)?
    };
    let input = trigger.input.unwrap_or(Value::Null);
    let context = RunContext {
        definition: &definition,
        input: input.clone(),
        created_by: trigger.created_by.clone(),
    };
    let mut views: BTreeMap<String, NodeView> = definition
        .nodes
        .iter()
        .map(|node| (node.id.clone(), NodeView::pending()))
        .collect();
    let changes = if missed {
        Vec::new()
    } else {
        plan_pending(state, &context, &mut views).await
    };
    let workflow_run_id = new_id();
    let step = Step {
        workflow_run_id: workflow_run_id.clone(),
        create: Some(NewWorkflowRun {
            workflow_id: workflow.id.clone(),
            definition: workflow.definition.clone(),
            input: (!input.is_null()).then(|| input.to_string()),
            trigger: trigger.kind,
            slot_at: trigger.fire.as_ref().map(|fire| fire.slot_at),
            created_by: Some(trigger.created_by.clone()),
            node_ids: definition
                .nodes
                .iter()
                .map(|node| node.id.clone())
                .collect(),
        }),
        fire: trigger.fire,
        changes,
        finish: final_status(&views),
    };
    match state.store.apply_workflow_step(step).await? {
        StepOutcome::Applied { jobs } => {
            if missed {
                return Ok(None);
            }
            info!(workflow_id = %workflow.id, %workflow_run_id, trigger = trigger.kind, "workflow run started");
            wake(state, &jobs);
            state.changes.notify_owned(
                crate::changes::Kind::WorkflowRun,
                &workflow_run_id,
                &workflow.owner_id,
            );
            Ok(Some(workflow_run_id))
        }
        StepOutcome::Stale => Ok(None),
    }
}

/// The view of a node that ended, from its run's jobs: `None` while some job has not ended.
/// Returns the view and the reason of a failure.
fn ended_view(jobs: &[crate::store::workflows::NodeJob]) -> Option<(NodeView, Option<String>)> {
    if jobs.iter().any(|job| !job.status.is_final()) {
        return None;
    }
    if jobs.is_empty() {
        return Some((
            NodeView {
                state: NodeState::Failed,
                ..NodeView::pending()
            },
            Some("its run has no jobs".into()),
        ));
    }
    let not_completed = jobs
        .iter()
        .filter(|job| job.status != JobStatus::Completed)
        .count();
    let result = if jobs.len() == 1 {
        parse_json(jobs[0].result.as_deref())
    } else {
        Value::Object(
            jobs.iter()
                .map(|job| (job.runner.clone(), parse_json(job.result.as_deref())))
                .collect(),
        )
    };
    let condition = match jobs[0].condition {
        Some(first) if jobs.iter().all(|job| job.condition == Some(first)) => Some(first),
        _ => None,
    };
    let (state, reason) = if not_completed == 0 {
        (NodeState::Completed, None)
    } else {
        (
            NodeState::Failed,
            Some(format!(
                "{not_completed} of {} job(s) did not complete",
                jobs.len()
            )),
        )
    };
    Some((
        NodeView {
            state,
            result,
            condition,
        },
        reason,
    ))
}

/// Reads a workflow run, records the nodes whose runs ended, starts or skips what that decides
/// and ends the run when nothing can start any more; one transaction, retried when it raced.
pub async fn advance(state: &AppState, workflow_run_id: &str) -> StoreResult<()> {
    for _ in 0..MAX_STEP_TRIES {
        let run = match state.store.workflow_run(workflow_run_id).await {
            Ok(run) => run,
            // Deleted with its workflow.
            Err(StoreError::NotFound) => return Ok(()),
            Err(error) => return Err(error),
        };
        let Some(step) = plan_advance(state, &run).await? else {
            return Ok(());
        };
        match state.store.apply_workflow_step(step).await? {
            StepOutcome::Applied { jobs } => {
                wake(state, &jobs);
                state
                    .changes
                    .touch(crate::changes::Kind::WorkflowRun, workflow_run_id);
                return Ok(());
            }
            StepOutcome::Stale => continue,
        }
    }
    warn!(%workflow_run_id, "workflow engine: the run kept changing; trying again later");
    Ok(())
}

/// The step that advances `run`, if anything changes.
async fn plan_advance(state: &AppState, run: &WorkflowRun) -> StoreResult<Option<Step>> {
    if run.finished_at.is_some() {
        return Ok(None);
    }
    let definition = match parse_definition(&run.definition) {
        Ok(definition) => definition,
        Err(error) => {
            warn!(workflow_run_id = %run.id, %error, "workflow engine: a stored run is unreadable");
            return Ok(None);
        }
    };
    let mut views = BTreeMap::new();
    let mut changes = Vec::new();
    for node in &run.nodes {
        let node_state = NodeState::parse(&node.state)
            .ok_or_else(|| StoreError::Corrupt(format!("node state {:?}", node.state)))?;
        let mut view = NodeView {
            state: node_state,
            result: parse_json(node.result.as_deref()),
            condition: node.condition,
        };
        if node_state == NodeState::Running {
            let ended = match &node.run_id {
                Some(run_id) => ended_view(&state.store.node_jobs(run_id).await?),
                None => Some((
                    NodeView {
                        state: NodeState::Failed,
                        ..NodeView::pending()
                    },
                    Some("its run was deleted".into()),
                )),
            };
            if let Some((ended, reason)) = ended {
                changes.push(NodeChange {
                    node_id: node.node_id.clone(),
                    from: "running",
                    to: ended.state.as_str(),
                    input: None,
                    result: (!ended.result.is_null()).then(|| ended.result.to_string()),
                    condition: ended.condition,
                    reason,
                    run: None,
                });
                view = ended;
            }
        }
        views.insert(node.node_id.clone(), view);
    }
    if run.status == "running" {
        let context = RunContext {
            definition: &definition,
            input: parse_json(run.input.as_deref()),
            created_by: run.created_by.clone().unwrap_or_default(),
        };
        let created_by = if context.created_by.is_empty() {
            // The user who triggered it was deleted: the workflow's owner stands in.
            state.store.workflow(&run.workflow_id).await?.owner_id
        } else {
            context.created_by.clone()
        };
        let context = RunContext {
            created_by,
            ..context
        };
        changes.extend(plan_pending(state, &context, &mut views).await);
    }
    let finish = if run.status == "running" {
        final_status(&views)
    } else if views.values().all(|view| view.state != NodeState::Running) {
        // Cancelled: it ends once its last running node ended.
        Some("cancelled")
    } else {
        None
    };
    if changes.is_empty() && finish.is_none() {
        return Ok(None);
    }
    Ok(Some(Step {
        workflow_run_id: run.id.clone(),
        create: None,
        fire: None,
        changes,
        finish,
    }))
}

/// Cancels a workflow run: no node starts any more, pending nodes are skipped and the jobs of
/// running nodes are cancelled (like `POST /jobs/{id}/cancel`). `false`: it was not running.
pub async fn cancel(state: &AppState, workflow_run_id: &str) -> StoreResult<bool> {
    let Some(run_ids) = state.store.cancel_workflow_run(workflow_run_id).await? else {
        return Ok(false);
    };
    for run_id in run_ids {
        let run = match state.store.run(&run_id).await {
            Ok(run) => run,
            Err(StoreError::NotFound) => continue,
            Err(error) => return Err(error),
        };
        for job in run.jobs.iter().filter(|job| !job.status.is_final()) {
            cancel_job(state, &job.id).await?;
        }
    }
    advance(state, workflow_run_id).await?;
    Ok(true)
}

/// Cancels one job as `POST /jobs/{id}/cancel` does: a queued one at once, a running one by
/// telling its runner.
async fn cancel_job(state: &AppState, job_id: &str) -> StoreResult<()> {
    use crate::store::jobs::CancelOutcome;
    match state.store.request_cancel(job_id).await? {
        CancelOutcome::Cancelled => {
            state.job_events.notify(job_id);
            state.notifier.notify_one();
        }
        CancelOutcome::Requested { agent_id, attempt } => {
            state.ssh.cancel(job_id);
            state.registry.cancel(
                &agent_id,
                cronium_protocol::AttemptRef {
                    job_id: job_id.to_string(),
                    attempt,
                },
            );
        }
        CancelOutcome::AlreadyFinal => {}
    }
    Ok(())
}

/// Most slots of one workflow handled in one scheduler pass.
const MAX_SLOTS_PER_PASS: usize = 1_000;

/// Fires the due schedule slots of every workflow as of `now`, each at most once (the slot
/// record, the workflow run and the next fire time commit together); called by the
/// scheduler's pass. A slot more than the scheduler's misfire grace in the past (the control
/// plane was down) is recorded as `missed` and the schedule continues with the first slot
/// within the grace. Returns the earliest next slot after `now` of any workflow.
pub async fn run_due_schedules(state: &AppState, now: i64) -> StoreResult<Option<i64>> {
    use crate::schedule::scheduler::MISFIRE_GRACE_MS;
    use crate::schedule::{CompiledSchedule, DstPolicy};
    for workflow in state.store.due_workflow_schedules(now).await? {
        let Some(cron) = &workflow.schedule_cron else {
            continue;
        };
        let timezone = workflow.schedule_timezone.as_deref().unwrap_or("UTC");
        let compiled = match CompiledSchedule::new(cron, timezone, DstPolicy::default()) {
            Ok(compiled) => compiled,
            Err(error) => {
                warn!(workflow_id = %workflow.id, %error, "stored workflow schedule is invalid");
                continue;
            }
        };
        let mut next = workflow.next_run_at;
        for _ in 0..MAX_SLOTS_PER_PASS {
            let Some(slot) = next.filter(|slot| *slot <= now) else {
                break;
            };
            // A stored definition that does not parse (a hand-edited database) cannot run: its
            // slots are recorded as missed so the schedule still moves on.
            let unreadable = serde_json::from_str::<Definition>(&workflow.definition).is_err();
            if unreadable {
                warn!(workflow_id = %workflow.id, "stored workflow definition is unreadable");
            }
            let missed = unreadable || slot < now - MISFIRE_GRACE_MS;
            let new_next = if missed {
                compiled.next_after(now - MISFIRE_GRACE_MS - 1)
            } else {
                compiled.next_after(slot)
            };
            let fire = SlotFire {
                expected_next: slot,
                new_next,
                slot_at: slot,
                outcome: if missed { "missed" } else { "fired" },
            };
            let trigger = Trigger {
                kind: "schedule",
                input: None,
                created_by: workflow.owner_id.clone(),
                fire: Some(fire),
            };
            match start(state, &workflow, trigger).await {
                Ok(Some(_)) => {}
                Ok(None) if missed => {
                    info!(workflow_id = %workflow.id, slot_at = slot, "workflow schedule slot missed")
                }
                // Another scheduler (or a schedule change) moved the slot: re-read next pass.
                Ok(None) => break,
                Err(StartError::Store(error)) => return Err(error),
                Err(error) => {
                    warn!(workflow_id = %workflow.id, %error, "scheduled workflow run not created");
                    break;
                }
            }
            next = new_next;
        }
    }
    state.store.earliest_next_workflow_run(now).await
}
