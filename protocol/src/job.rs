//! Heartbeats, claims and everything that travels on a job attempt's stream.

use serde::{Deserialize, Serialize};

/// Names one attempt of one job. Attempt numbers start at 1 and grow with every claim, so an
/// attempt reference is the idempotency key of a result.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttemptRef {
    pub job_id: String,
    pub attempt: u32,
}

/// Liveness, sent by the agent every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    /// Attempts still running (or with results not yet acknowledged); their leases are renewed.
    pub running: Vec<AttemptRef>,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub seq: u64,
    /// Attempts from the heartbeat whose lease the control plane did not renew (they were
    /// settled meanwhile); the agent stops them.
    pub abandon: Vec<AttemptRef>,
}

/// The agent asks for up to `slots` jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub slots: u32,
}

/// Ends the answer to a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimDone {
    /// How many [`JobSpec`]s were sent for this claim.
    pub claimed: u32,
}

/// The interpreter a script runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScriptKind {
    Bash,
    Python,
    Node,
    /// Not a script: an HTTP request (the runtime is [`RuntimeSpec::Http`], `script` is empty).
    Http,
}

/// Everything the agent needs to run one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: String,
    pub attempt: u32,
    pub run_id: String,
    pub event_id: String,
    pub kind: ScriptKind,
    pub script: String,
    /// Extra environment for the script, on top of the agent's scrubbed base environment.
    pub env: Vec<(String, String)>,
    /// The attempt is killed after this long; 0 means no limit.
    pub timeout_ms: u64,
    /// JSON text given when the run was triggered, if any.
    pub input: Option<String>,
    /// Where the script runs: directly on the host or in a Docker container.
    pub runtime: RuntimeSpec,
    /// The event's secret environment variables, given to the script like `env`; the agent
    /// masks their values in the attempt's output and helper values. Never logged.
    #[serde(default)]
    pub secret_env: SecretEnv,
}

/// Secret environment variables (name, value). Its `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretEnv(pub Vec<(String, String)>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("{name}=***")))
            .finish()
    }
}

impl SecretEnv {
    /// A masker for the values.
    pub fn masker(&self) -> crate::mask::Masker {
        crate::mask::Masker::new(self.0.iter().map(|(_, value)| value.as_bytes()))
    }
}

/// Where an attempt runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RuntimeSpec {
    /// A process on the agent's host.
    Host(HostSpec),
    /// A throwaway Docker container on the agent's host.
    Docker(DockerSpec),
    /// An HTTP request made by the agent (no process; the answer is the output and the result).
    Http(crate::http::HttpSpec),
}

impl Default for RuntimeSpec {
    /// A host process as the agent's own user, without limits.
    fn default() -> RuntimeSpec {
        RuntimeSpec::Host(HostSpec::default())
    }
}

/// How a host attempt's process is started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    /// The user the script runs as (`name`, `uid` or `uid:gid`); `None`: the agent's own user.
    /// The agent only accepts its own user and the users it was started with
    /// (`--allow-run-as`).
    pub user: Option<String>,
    /// Memory limit in MiB (swap included where the host can limit it), through a cgroup;
    /// `None`: no limit.
    pub memory_mb: Option<u64>,
    /// CPU limit in cores (fractions allowed), through a cgroup; `None`: no limit.
    pub cpus: Option<f64>,
    /// Maximum number of processes of the attempt, through a cgroup; `None`: no limit.
    pub pids: Option<u32>,
}

/// How a Docker attempt's container is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DockerSpec {
    /// The image reference (pulled when the engine does not have it).
    pub image: String,
    /// Memory limit in MiB (swap is limited to the same value); `None`: no limit.
    pub memory_mb: Option<u64>,
    /// CPU limit in cores (fractions allowed); `None`: no limit.
    pub cpus: Option<f64>,
    /// Maximum number of processes in the container; `None`: no limit.
    pub pids: Option<u32>,
    /// The container's network.
    pub network: DockerNetwork,
    /// Mount the root file system read-only (a tmpfs is mounted at `/tmp`).
    pub read_only: bool,
    /// The user the script runs as (`name`, `uid` or `uid:gid`); `None`: the image's default.
    pub user: Option<String>,
}

/// The network a container is attached to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DockerNetwork {
    /// No network at all (only loopback).
    #[default]
    None,
    /// The engine's default bridge.
    Bridge,
}

/// Stop an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    pub job: AttemptRef,
}

/// First message of a job stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOpen {
    pub job: AttemptRef,
}

/// Answer to [`JobOpen`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobOpened {
    /// Continue: the control plane has the log up to `next_offset` (exclusive).
    Resume { next_offset: u64 },
    /// The attempt was settled or superseded; the agent stops it and discards its output.
    Stale,
}

/// The attempt's process started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStarted {
    pub pid: u32,
}

/// Which output a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Written by the agent itself (e.g. the truncation marker).
    System,
}

/// A contiguous piece of the attempt's combined output, starting at byte `offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    pub offset: u64,
    pub stream: LogStream,
    pub data: Vec<u8>,
}

/// The control plane has durably stored output up to `next_offset` (exclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogAck {
    pub next_offset: u64,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinalStatus {
    Completed,
    Failed,
    Cancelled,
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// The script exited with a non-zero code.
    ExitCode,
    /// The script ran past its timeout and was killed.
    Timeout,
    /// The process could not be started.
    Spawn,
    /// The script was killed by a signal it did not ask for.
    Signal,
    /// The agent lost track of the attempt (e.g. it restarted while the job ran).
    Lost,
    /// The script ran out of memory.
    Oom,
    /// An HTTP request job got an answer whose status is not one of the expected ones.
    HttpStatus,
    /// An HTTP request job got no answer (DNS, connection, TLS, reading the answer).
    HttpError,
}

/// The attempt ended. Sent once the whole log (`log_len` bytes) was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    pub status: FinalStatus,
    pub reason: Option<FailReason>,
    pub exit_code: Option<i32>,
    /// Total length of the attempt's log; the control plane checks it has all of it.
    pub log_len: u64,
    /// JSON text the script set with the `output` helper, if any.
    pub result: Option<String>,
    /// The condition the script set with the `set_condition` helper, if any.
    pub condition: Option<bool>,
}

/// What the control plane did with a [`JobFinished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishVerdict {
    /// The result is recorded.
    Recorded,
    /// The same result was recorded before (a replay after a reconnect); nothing changed.
    Duplicate,
    /// The attempt was settled or superseded; the result was refused and audited.
    Stale,
}

/// Answer to [`JobFinished`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishAck {
    pub verdict: FinishVerdict,
}
