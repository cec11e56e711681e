//! One runtime-helper call an agent forwards: read `HelperCall`, answer one `HelperReply`.
//!
//! The agent already checked the call, but nothing it sends is trusted: names and sizes are
//! checked again here, and the store checks that the attempt is this agent's current one.
//! Variable values are sealed with the encryption key before they reach the store.

use cronium_protocol::{
    HelperCall, HelperRefusal, HelperReply, HelperRequest, MAX_HELPER_NAME, MAX_HELPER_VALUE,
    Message,
};
use tracing::{debug, warn};

use super::wire::write_message;
use crate::AppState;
use crate::store::StoreError;
use crate::store::variables::{HelperRead, HelperWrite, HelperWriteOutcome};

/// Answers `call` on `send` and finishes the stream.
pub async fn serve(
    mut send: quinn::SendStream,
    call: HelperCall,
    agent_id: &str,
    state: &AppState,
) {
    let reply = answer(state, agent_id, call).await;
    if let Err(error) = write_message(&mut send, &Message::HelperReply(reply)).await {
        debug!(%error, "could not answer a helper call");
        return;
    }
    let _ = send.finish();
}

fn refused(reason: HelperRefusal, message: impl Into<String>) -> HelperReply {
    HelperReply::Refused {
        reason,
        message: message.into(),
    }
}

fn stale() -> HelperReply {
    refused(
        HelperRefusal::Stale,
        "this job attempt is no longer running on this agent",
    )
}

fn unavailable(error: &StoreError) -> HelperReply {
    warn!(%error, "a helper call failed in the store");
    refused(
        HelperRefusal::Unavailable,
        "the control plane could not serve the call right now",
    )
}

/// Checks a variable or tool name the way the agent does.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HELPER_NAME
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'))
}

/// The answer to `call` made by an attempt of `agent_id` (a runner key: the SSH fallback's
/// helper endpoint calls this too, with `ssh:<server id>`).
pub(crate) async fn answer(state: &AppState, agent_id: &str, call: HelperCall) -> HelperReply {
    let HelperCall { job, seq, request } = call;
    if request.is_write() == (seq == 0) {
        return refused(
            HelperRefusal::Invalid,
            "writes need a sequence number and reads must not have one",
        );
    }
    let write = match request {
        HelperRequest::GetVariable { name } => {
            if !valid_name(&name) {
                return refused(HelperRefusal::Invalid, "invalid variable name");
            }
            return match state
                .store
                .helper_get_variable(agent_id, &job.job_id, job.attempt, &name)
                .await
            {
                Ok(HelperRead::Stale) => stale(),
                Ok(HelperRead::Value(None)) => HelperReply::Value { value_json: None },
                Ok(HelperRead::Value(Some(sealed))) => match state
                    .key
                    .open(&sealed)
                    .ok()
                    .and_then(|plain| String::from_utf8(plain).ok())
                {
                    Some(value_json) => HelperReply::Value {
                        value_json: Some(value_json),
                    },
                    None => {
                        warn!(variable = %name, "a stored variable cannot be decrypted");
                        refused(
                            HelperRefusal::Unavailable,
                            "the variable's stored value cannot be read",
                        )
                    }
                },
                Err(error) => unavailable(&error),
            };
        }
        HelperRequest::SetVariable { name, value_json } => {
            if !valid_name(&name) {
                return refused(HelperRefusal::Invalid, "invalid variable name");
            }
            if value_json.len() > MAX_HELPER_VALUE
                || serde_json::from_str::<serde_json::Value>(&value_json).is_err()
            {
                return refused(
                    HelperRefusal::Invalid,
                    format!("a variable's value must be JSON of at most {MAX_HELPER_VALUE} bytes"),
                );
            }
            HelperWrite::SetVariable {
                name,
                sealed_value: state.key.seal(value_json.as_bytes()),
            }
        }
        HelperRequest::Notify {
            tool,
            title,
            message,
        } => {
            if tool.as_deref().is_some_and(|tool| !valid_name(tool)) {
                return refused(HelperRefusal::Invalid, "invalid tool name");
            }
            HelperWrite::Notify {
                tool,
                title,
                message,
            }
        }
    };
    match state
        .store
        .helper_write(agent_id, &job.job_id, job.attempt, seq, write)
        .await
    {
        Ok(HelperWriteOutcome::Applied | HelperWriteOutcome::Duplicate) => HelperReply::Done,
        Ok(HelperWriteOutcome::Notified(_)) => {
            state.notifier.notify_one();
            HelperReply::Done
        }
        Ok(HelperWriteOutcome::Stale) => stale(),
        Ok(HelperWriteOutcome::NoTool(message)) => refused(HelperRefusal::NotFound, message),
        Ok(HelperWriteOutcome::Invalid(message)) => refused(HelperRefusal::Invalid, message),
        Err(error) => unavailable(&error),
    }
}
