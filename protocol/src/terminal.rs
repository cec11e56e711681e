//! Terminal sessions: a PTY on the agent, relayed to a browser by the control plane.
//!
//! The control plane opens one bidirectional stream per viewer (QUIC lets the server open
//! streams on the connection the agent dialled, so nothing connects into the agent's host). Its
//! first message is [`TerminalOpen`]; the agent answers [`TerminalOpened`]. Then:
//! - control plane → agent: [`TerminalInput`], [`TerminalResize`], and [`Message::TerminalClose`]
//!   to end the session (the shell's process group is killed). Finishing or resetting the stream
//!   only detaches this viewer; the session lives on until its idle timeout.
//! - agent → control plane: first the session's recent output (scrollback replay, on attach),
//!   then live [`TerminalOutput`]; [`TerminalExit`] when the shell ended, after which the agent
//!   finishes the stream. After `Attached`, the replay is followed by one empty
//!   [`TerminalOutput`] that marks where live output begins (a `Started` session has no replay
//!   and no marker).
//!
//! A session also ends without any viewer (idle timeout, maximum age, the agent stopping); the
//! agent then reports [`TerminalEnded`] on its control stream, and lists the sessions still alive
//! in every `Hello`, so the control plane's view of open sessions stays right across reconnects.
//!
//! [`Message::TerminalClose`]: crate::Message::TerminalClose

use serde::{Deserialize, Serialize};

/// Largest `data` of one [`TerminalInput`] or [`TerminalOutput`]; senders split longer data.
pub const MAX_TERMINAL_CHUNK: usize = 32 * 1024;

/// Control plane → agent, first message of a terminal stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminalOpen {
    /// `None`: start a new session. `Some(id)`: attach to this live session (re-attach after a
    /// refresh or a reconnect, or a second viewer).
    pub session: Option<String>,
    pub cols: u16,
    pub rows: u16,
    /// Who opened it (user name), for the agent's log.
    pub opened_by: String,
    /// Idle timeout with no viewer attached, in milliseconds; 0: the agent's default.
    pub idle_timeout_ms: u64,
    /// Maximum age of the session, in milliseconds; 0: the agent's default.
    pub max_age_ms: u64,
}

/// Agent → control plane: the answer to [`TerminalOpen`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TerminalOpened {
    /// A new session started; `pid` is the shell's process id.
    Started { session: String, pid: u32 },
    /// Attached to the live session; its recent output follows.
    Attached { session: String },
    /// No session was opened or attached; `message` is meant for the operator.
    Refused {
        reason: TerminalRefusal,
        message: String,
    },
}

/// Why a terminal could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TerminalRefusal {
    /// The session to attach to does not exist (ended, reaped, or never existed).
    NoSuchSession,
    /// The agent runs as many sessions as it allows.
    Limit,
    /// The shell could not be started.
    Spawn,
    /// Terminals are turned off on this agent.
    Disabled,
}

/// Keystrokes (or pasted text) for the PTY.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminalInput {
    pub data: Vec<u8>,
}

/// Bytes the PTY produced (UTF-8 may be split anywhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminalOutput {
    pub data: Vec<u8>,
}

/// New window size (TIOCSWINSZ on the PTY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalResize {
    pub cols: u16,
    pub rows: u16,
}

/// The shell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalExit {
    /// The exit code, or `None` when it was killed by a signal.
    pub code: Option<i32>,
}

/// Agent → control plane, on the control stream: a session ended (for whatever reason, with or
/// without viewers attached).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalEnded {
    pub session: String,
    /// The shell's exit code, or `None` when it was killed (by a signal, or by the agent).
    pub code: Option<i32>,
}
