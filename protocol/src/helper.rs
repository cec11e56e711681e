//! Runtime-helper calls the agent forwards to the control plane: variables and notifications.
//!
//! One bidirectional stream per call: the agent sends [`HelperCall`] and the control plane
//! answers one [`HelperReply`]. Writes carry a per-attempt sequence number (`seq` ≥ 1, in the
//! order the script made them); the control plane applies each sequence number at most once, so
//! a write replayed after a reconnect is answered [`HelperReply::Done`] without being applied
//! twice. Reads use `seq` 0.

use serde::{Deserialize, Serialize};

use crate::job::AttemptRef;

/// Largest JSON text of a variable value or a notification message, in bytes. Larger values
/// are refused by the agent before anything is sent.
pub const MAX_HELPER_VALUE: usize = 512 * 1024;

/// Longest variable or tool name, in bytes.
pub const MAX_HELPER_NAME: usize = 128;

/// Agent → control plane, first and only message of a helper stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelperCall {
    /// The attempt whose script made the call.
    pub job: AttemptRef,
    /// 0 for reads; for writes the attempt's write sequence number, starting at 1.
    pub seq: u64,
    pub request: HelperRequest,
}

/// What the script asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelperRequest {
    /// Read a variable of the event's owner.
    GetVariable { name: String },
    /// Set a variable of the event's owner to a JSON value (given as JSON text).
    SetVariable { name: String, value_json: String },
    /// Send a notification through one of the owner's tools (`None`: the owner's only tool).
    Notify {
        tool: Option<String>,
        title: Option<String>,
        message: String,
    },
}

impl HelperRequest {
    /// Whether the request changes something (and so needs a sequence number).
    pub fn is_write(&self) -> bool {
        !matches!(self, HelperRequest::GetVariable { .. })
    }
}

/// Control plane → agent: the answer to a [`HelperCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelperReply {
    /// The write was applied (or had been applied before).
    Done,
    /// The variable's value as JSON text; `None` when it is not set.
    Value { value_json: Option<String> },
    /// The call was refused; `message` is meant for the script's author.
    Refused {
        reason: HelperRefusal,
        message: String,
    },
}

/// Why a helper call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelperRefusal {
    /// The attempt is not (or no longer) running on this agent.
    Stale,
    /// Something the call names does not exist (e.g. a tool).
    NotFound,
    /// The call is malformed (bad name, oversized value, …).
    Invalid,
    /// The control plane could not serve the call right now; the agent may retry.
    Unavailable,
}
