//! QUIC application close codes shared by both sides.

/// Why a connection or stream was closed by the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// Orderly shutdown of either side.
    Normal,
    /// A peer sent a malformed, oversized or unexpected frame.
    ProtocolError,
    /// The agent was revoked; it must not reconnect with this identity.
    Revoked,
    /// No protocol version in common.
    UnsupportedVersion,
    /// The control plane is shutting down; reconnect later.
    Shutdown,
    /// The client certificate does not belong to a known agent.
    UnknownAgent,
    /// The same agent connected again; this older connection is replaced.
    Replaced,
}

impl CloseCode {
    /// The numeric code sent on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::ProtocolError => 1,
            CloseCode::Revoked => 2,
            CloseCode::UnsupportedVersion => 3,
            CloseCode::Shutdown => 4,
            CloseCode::UnknownAgent => 5,
            CloseCode::Replaced => 6,
        }
    }

    /// Parses a numeric code; unknown codes map to `None`.
    pub fn from_u32(code: u64) -> Option<CloseCode> {
        Some(match code {
            0 => CloseCode::Normal,
            1 => CloseCode::ProtocolError,
            2 => CloseCode::Revoked,
            3 => CloseCode::UnsupportedVersion,
            4 => CloseCode::Shutdown,
            5 => CloseCode::UnknownAgent,
            6 => CloseCode::Replaced,
            _ => return None,
        })
    }

    /// Whether the agent should stop reconnecting (its identity will never be accepted again).
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            CloseCode::Revoked | CloseCode::UnknownAgent | CloseCode::UnsupportedVersion
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [
            CloseCode::Normal,
            CloseCode::ProtocolError,
            CloseCode::Revoked,
            CloseCode::UnsupportedVersion,
            CloseCode::Shutdown,
            CloseCode::UnknownAgent,
            CloseCode::Replaced,
        ] {
            assert_eq!(CloseCode::from_u32(code.to_u32() as u64), Some(code));
        }
        assert_eq!(CloseCode::from_u32(999), None);
    }
}
