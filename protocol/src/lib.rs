//! The Cronium wire protocol, shared by the control plane and the agent.
//!
//! This crate is *sans-IO*: it defines the messages exchanged over QUIC, their framing and the
//! version negotiation, and nothing else. It opens no socket and depends on no runtime, so both
//! sides and the tests can drive it with plain byte slices.
//!
//! Every stream starts with one message that says what the stream is for:
//! [`Message::Hello`] opens the agent's long-lived control stream and [`Message::JobOpen`] opens
//! the stream that carries one job attempt (logs with byte offsets, then the final result);
//! [`Message::HelperCall`] opens a stream that carries one runtime-helper call. The control plane
//! opens one stream per terminal viewer, starting with [`Message::TerminalOpen`].
//! See `docs/protocol.md` for the sequence diagrams and the stability policy.

pub mod close;
pub mod frame;
pub mod hello;
pub mod helper;
pub mod http;
pub mod job;
pub mod mask;
pub mod replicas;
pub mod terminal;
pub mod update;

pub use close::CloseCode;
pub use frame::{FrameDecoder, FrameError, decode, encode};
pub use hello::{Capabilities, HostInfo, Reject, RejectCode, Welcome, negotiate};
pub use helper::{
    HelperCall, HelperRefusal, HelperReply, HelperRequest, MAX_HELPER_NAME, MAX_HELPER_VALUE,
};
pub use http::{HttpSpec, HttpSpecError, StatusRange};
pub use job::{
    AttemptRef, Cancel, Claim, ClaimDone, DockerNetwork, DockerSpec, FailReason, FinalStatus,
    FinishAck, FinishVerdict, Heartbeat, HeartbeatAck, HostSpec, JobFinished, JobOpen, JobOpened,
    JobSpec, JobStarted, LogAck, LogChunk, LogStream, RuntimeSpec, ScriptKind, SecretEnv,
};
pub use mask::{MASK, MIN_SECRET_LEN, Masker, StreamMasker};
pub use replicas::{MAX_REPLICA_ADDRS, REPLICA_ADDRS_VERSION, ReplicaAddrs};
pub use terminal::{
    MAX_TERMINAL_CHUNK, TerminalEnded, TerminalExit, TerminalInput, TerminalOpen, TerminalOpened,
    TerminalOutput, TerminalRefusal, TerminalResize,
};
pub use update::{AgentUpdate, MAX_UPDATE_REASON, UpdateState, UpdateStatus};

use serde::{Deserialize, Serialize};

/// ALPN identifier of the agent ⇄ control plane QUIC protocol.
pub const ALPN: &[u8] = b"cronium/1";

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The newest protocol version this build speaks (2: [`Message::ReplicaAddrs`]).
pub const PROTOCOL_VERSION: u16 = 2;

/// Hard upper bound of one frame's payload, checked before any buffer is allocated.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Largest `data` a [`LogChunk`] may carry; senders split longer output.
pub const MAX_LOG_CHUNK: usize = 64 * 1024;

/// The name the control plane's QUIC certificate is issued for. Agents pin the CA, so a fixed
/// name works for every address the control plane is reached at.
pub const SERVER_NAME: &str = "cronium-control-plane";

/// Every message of the protocol. New variants are only ever appended (the encoding uses the
/// variant index); changing an existing variant's fields requires a new protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Agent → control plane, first message of the control stream.
    Hello(hello::Hello),
    /// Control plane → agent: the session is accepted.
    Welcome(Welcome),
    /// Control plane → agent: the session is refused; the connection closes after it.
    Reject(Reject),
    /// Agent → control plane, periodically: liveness plus the attempts it is running (renews leases).
    Heartbeat(Heartbeat),
    /// Control plane → agent: answer to a heartbeat.
    HeartbeatAck(HeartbeatAck),
    /// Control plane → agent: new work is queued for you; send a [`Claim`].
    WorkAvailable,
    /// Agent → control plane: claim up to `slots` jobs.
    Claim(Claim),
    /// Control plane → agent: one claimed job (zero or more follow a claim).
    Assign(JobSpec),
    /// Control plane → agent: the claim is complete.
    ClaimDone(ClaimDone),
    /// Control plane → agent: stop this attempt.
    Cancel(Cancel),
    /// Agent → control plane, first message of a job stream.
    JobOpen(JobOpen),
    /// Control plane → agent: where to resume the log upload, or that the attempt is stale.
    JobOpened(JobOpened),
    /// Agent → control plane: the process started.
    JobStarted(JobStarted),
    /// Agent → control plane: a piece of output at a byte offset.
    LogChunk(LogChunk),
    /// Control plane → agent: output durable up to an offset.
    LogAck(LogAck),
    /// Agent → control plane: the attempt ended.
    JobFinished(JobFinished),
    /// Control plane → agent: the result was recorded (or refused).
    FinishAck(FinishAck),
    /// Agent → control plane, first message of a helper stream: one runtime-helper call.
    HelperCall(HelperCall),
    /// Control plane → agent: the answer to the helper call.
    HelperReply(HelperReply),
    /// Control plane → agent, first message of a terminal stream: open or attach a session.
    TerminalOpen(TerminalOpen),
    /// Agent → control plane: the session was opened, attached, or refused.
    TerminalOpened(TerminalOpened),
    /// Control plane → agent: keystrokes.
    TerminalInput(TerminalInput),
    /// Agent → control plane: output of the PTY.
    TerminalOutput(TerminalOutput),
    /// Control plane → agent: the viewer's window size changed.
    TerminalResize(TerminalResize),
    /// Control plane → agent: end the session (kill the shell's process group).
    TerminalClose,
    /// Agent → control plane: the shell ended; the stream finishes after it.
    TerminalExit(TerminalExit),
    /// Agent → control plane, on the control stream: a terminal session ended.
    TerminalEnded(TerminalEnded),
    /// Control plane → agent, on the control stream: the agent version wanted for this agent.
    AgentUpdate(AgentUpdate),
    /// Agent → control plane, on the control stream: progress or outcome of a self-update.
    UpdateStatus(UpdateStatus),
    /// Control plane → agent, on the control stream (version 2 and later): the QUIC addresses
    /// of every live control-plane replica, after the welcome and when they change.
    ReplicaAddrs(ReplicaAddrs),
}

impl Message {
    /// A short name for logs; never includes payload data.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Reject(_) => "reject",
            Message::Heartbeat(_) => "heartbeat",
            Message::HeartbeatAck(_) => "heartbeat_ack",
            Message::WorkAvailable => "work_available",
            Message::Claim(_) => "claim",
            Message::Assign(_) => "assign",
            Message::ClaimDone(_) => "claim_done",
            Message::Cancel(_) => "cancel",
            Message::JobOpen(_) => "job_open",
            Message::JobOpened(_) => "job_opened",
            Message::JobStarted(_) => "job_started",
            Message::LogChunk(_) => "log_chunk",
            Message::LogAck(_) => "log_ack",
            Message::JobFinished(_) => "job_finished",
            Message::FinishAck(_) => "finish_ack",
            Message::HelperCall(_) => "helper_call",
            Message::HelperReply(_) => "helper_reply",
            Message::TerminalOpen(_) => "terminal_open",
            Message::TerminalOpened(_) => "terminal_opened",
            Message::TerminalInput(_) => "terminal_input",
            Message::TerminalOutput(_) => "terminal_output",
            Message::TerminalResize(_) => "terminal_resize",
            Message::TerminalClose => "terminal_close",
            Message::TerminalExit(_) => "terminal_exit",
            Message::TerminalEnded(_) => "terminal_ended",
            Message::AgentUpdate(_) => "agent_update",
            Message::UpdateStatus(_) => "update_status",
            Message::ReplicaAddrs(_) => "replica_addrs",
        }
    }
}
