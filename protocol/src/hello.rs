//! Session opening: the agent's hello, the control plane's welcome or reject, and version negotiation.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::job::AttemptRef;

/// First message of the control stream. The agent's identity is not here: it is the client
/// certificate of the connection, and nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub min_version: u16,
    /// Newest protocol version the agent speaks.
    pub max_version: u16,
    /// The agent's release version (e.g. `0.1.0`).
    pub agent_version: String,
    /// How many jobs the agent runs at once.
    pub capacity: u32,
    /// Attempts the agent is still running or still has results for (after a reconnect or restart).
    pub running: Vec<AttemptRef>,
    /// What the agent can run.
    pub capabilities: Capabilities,
    /// Facts about the host, shown in the console.
    pub host: HostInfo,
    /// Terminal sessions still alive on the agent (they survive reconnects); the control plane
    /// marks every other session it believes open on this agent as closed.
    pub terminals: Vec<String>,
}

/// What an agent can run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Interpreters found on the host, by name (`bash`, `python3`, `node`).
    pub interpreters: Vec<String>,
    /// Whether a Docker engine answered when the agent started.
    pub docker: bool,
}

/// Facts about the agent's host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub arch: String,
}

/// The control plane accepts the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The negotiated protocol version.
    pub version: u16,
    /// The agent's id, as recorded at enrollment.
    pub agent_id: String,
    /// How often the agent must send a heartbeat.
    pub heartbeat_interval_ms: u32,
    /// How long a lease lasts without a heartbeat.
    pub lease_ms: u32,
    /// Attempts from the hello that the control plane no longer expects (settled or reassigned);
    /// the agent stops them and discards their buffered output.
    pub abandon: Vec<AttemptRef>,
}

/// The control plane refuses the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub code: RejectCode,
    /// Human-readable reason, safe to log.
    pub message: String,
}

/// Why a session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    UnsupportedVersion,
    Revoked,
    UnknownAgent,
}

/// No protocol version is spoken by both sides.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {ours_min}..={ours_max}"
)]
pub struct VersionError {
    pub peer_min: u16,
    pub peer_max: u16,
    pub ours_min: u16,
    pub ours_max: u16,
}

/// Picks the newest version both ranges contain.
pub fn negotiate(
    peer_min: u16,
    peer_max: u16,
    ours_min: u16,
    ours_max: u16,
) -> Result<u16, VersionError> {
    let low = peer_min.max(ours_min);
    let high = peer_max.min(ours_max);
    if low <= high && peer_min <= peer_max {
        Ok(high)
    } else {
        Err(VersionError {
            peer_min,
            peer_max,
            ours_min,
            ours_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_newest_common_version() {
        assert_eq!(negotiate(1, 1, 1, 1), Ok(1));
        assert_eq!(negotiate(1, 5, 2, 3), Ok(3));
        assert_eq!(negotiate(3, 7, 1, 4), Ok(4));
        assert!(negotiate(5, 6, 1, 4).is_err());
        assert!(negotiate(1, 2, 3, 4).is_err());
        // An inverted range from a confused peer is refused, not interpreted.
        assert!(negotiate(4, 1, 1, 4).is_err());
    }
}
