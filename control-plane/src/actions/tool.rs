//! Tool action jobs: one message through one of the event owner's tools, with the same delivery
//! code as notifications (`tools::delivery` for Slack, Discord and webhooks, `tools::email`
//! for SMTP). The job completes when the endpoint accepted the message and fails with reason
//! `delivery` otherwise (retried per the event's `retries`, like any job). The message's id is
//! the job's id on every attempt, so a receiver can tell a repeated delivery. The tool's
//! configuration is opened only here, in memory; delivery errors are redacted by the delivery
//! code and never contain a URL, header value or password.

use std::future::Future;

use serde_json::json;

use super::{Clients, Ending, Output, Stopped};
use crate::AppState;
use crate::store::events::ToolAction;
use crate::store::jobs::{ClaimedJob, JobStatus, Reason};
use crate::store::tools::{ClaimedNotification, ToolKind};
use crate::tools::ToolConfig;
use crate::tools::delivery::Outcome;

/// Sends the message of `job` (its `runtime_spec` is the event's tool action JSON).
pub(super) async fn run(
    state: &AppState,
    clients: &Clients,
    job: &ClaimedJob,
    output: &mut Output,
    stop: impl Future<Output = Stopped>,
) -> Result<Ending, Stopped> {
    let Some(action) = job
        .runtime_spec
        .as_deref()
        .and_then(|text| ToolAction::from_json(text).ok())
    else {
        output.system("the job has no readable tool action");
        return Ok(Ending::failed(Reason::Spawn));
    };
    let tool = match state
        .store
        .action_tool(&action.tool_id, &job.event_id)
        .await
    {
        Ok(Some(tool)) => tool,
        Ok(None) => {
            output.system(&format!(
                "the tool {} no longer exists (or no longer belongs to the event's owner)",
                action.tool_id
            ));
            return Ok(Ending::failed(Reason::Delivery));
        }
        Err(error) => {
            output.system(&format!("could not read the tool: {error}"));
            return Ok(Ending::failed(Reason::Delivery));
        }
    };
    output.system(&format!(
        "sending through the {} tool {:?} (attempt {})",
        tool.kind.as_str(),
        tool.name,
        job.attempt
    ));
    let message = ClaimedNotification {
        id: job.id.clone(),
        owner_name: tool.owner_name.clone(),
        tool_id: tool.id.clone(),
        tool_name: tool.name.clone(),
        kind: tool.kind,
        sealed_config: tool.sealed_config.clone(),
        title: action.title.clone(),
        message: action.message.clone(),
        source_job_id: Some(job.id.clone()),
        source_run_id: Some(job.run_id.clone()),
        attempt: job.attempt,
    };
    let delivery = async {
        if tool.kind == ToolKind::Email {
            match crate::tools::email::EmailConfig::open(&tool.sealed_config, &state.key) {
                Ok(config) => {
                    crate::tools::email::deliver(&clients.mailer, &config, &message).await
                }
                Err(error) => Outcome::Fail(error.to_string()),
            }
        } else {
            match ToolConfig::open(&tool.sealed_config, &state.key) {
                Ok(config) => {
                    crate::tools::delivery::deliver(&clients.delivery, &config, &message).await
                }
                Err(error) => Outcome::Fail(error.to_string()),
            }
        }
    };
    let outcome = tokio::select! {
        stopped = stop => return Err(stopped),
        outcome = delivery => outcome,
    };
    let result = |delivered: bool, error: Option<&str>| {
        json!({
            "tool_id": tool.id,
            "tool": tool.name,
            "kind": tool.kind.as_str(),
            "delivered": delivered,
            "error": error,
        })
        .to_string()
    };
    Ok(match outcome {
        Outcome::Delivered => {
            output.system("delivered");
            Ending {
                status: JobStatus::Completed,
                reason: None,
                result: Some(result(true, None)),
            }
        }
        Outcome::Retry { error, .. } | Outcome::Fail(error) => {
            output.system(&format!("not delivered: {error}"));
            Ending {
                status: JobStatus::Failed,
                reason: Some(Reason::Delivery),
                result: Some(result(false, Some(&error))),
            }
        }
    })
}
