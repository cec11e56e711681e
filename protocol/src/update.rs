//! Agent self-update on the control stream: the control plane announces the agent version it
//! wants ([`AgentUpdate`]), the agent reports what it did about it ([`UpdateStatus`]).
//!
//! The announcement carries only a version string. The agent downloads that release itself,
//! verifies it with the release key it pinned at install time (never one the control plane hands
//! it), refuses anything that is not strictly newer than what it runs, and reports each step.

use serde::{Deserialize, Serialize};

/// Longest `reason` an agent sends; receivers truncate longer ones.
pub const MAX_UPDATE_REASON: usize = 1000;

/// Control plane → agent, on the control stream after the welcome and whenever the update policy
/// changes: the version this agent should run (`None`: no update is wanted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdate {
    pub version: Option<String>,
}

/// Agent → control plane, on the control stream: progress or outcome of an update to
/// `target_version`. Sent when the state changes, and the last one again after every welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub target_version: String,
    pub state: UpdateState,
    /// Why it failed or was rolled back; meant for the operator.
    pub reason: Option<String>,
}

/// Where an update stands on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    /// Fetching the signed manifest and the binary.
    Downloading,
    /// Checking signatures, hash, size, target and version.
    Verifying,
    /// Verified; draining jobs and starting the new binary.
    Restarting,
    /// The new binary connected and was installed in place of the old one.
    Succeeded,
    /// Refused or could not be done; the old binary keeps running untouched.
    Failed,
    /// The new binary did not connect in time (or exited); the old one runs again.
    RolledBack,
}

impl UpdateState {
    /// The name used by the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Downloading => "downloading",
            UpdateState::Verifying => "verifying",
            UpdateState::Restarting => "restarting",
            UpdateState::Succeeded => "succeeded",
            UpdateState::Failed => "failed",
            UpdateState::RolledBack => "rolled_back",
        }
    }
}
