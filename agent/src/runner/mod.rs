//! Runners start an attempt's script and report how it ended.
//!
//! A runner writes the output into the attempt's spool as it arrives, records the pid, obeys the
//! stop signal and the spec's timeout, and returns an [`Outcome`]. It never talks to the network.
//! [`process::ProcessRunner`] runs scripts directly on the host (as another user through
//! [`run_as`], with limits through [`cgroup`]), [`docker::DockerRunner`] in Docker containers,
//! [`http::HttpRunner`] makes the request of an HTTP request job; [`Dispatch`] picks one by the
//! spec's runtime.

pub mod cgroup;
pub mod docker;
pub mod http;
pub mod process;
pub mod run_as;
#[cfg(test)]
mod test_support;

use cronium_protocol::{JobSpec, RuntimeSpec, ScriptKind};
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::spool::{AttemptSpool, Outcome};

/// Why the agent stops an attempt before it ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The control plane cancelled the job: the result is `cancelled`.
    Cancel,
    /// The control plane settled the attempt elsewhere: the output is discarded anyway.
    Abandon,
    /// The agent is stopping and cannot wait any longer: the result is `failed`, reason `lost`.
    Shutdown,
}

/// Receives the stop request of one attempt; `None` while it may run on.
pub type StopSignal = watch::Receiver<Option<StopReason>>;

/// Runs one attempt to its end.
pub trait Runner: Send + Sync {
    /// Runs `spec`, appending its output to `spool`, until it exits, times out or `stop` asks it
    /// to stop. Every process the attempt started is gone when the future completes.
    fn run<'a>(
        &'a self,
        spec: &'a JobSpec,
        spool: &'a AttemptSpool,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome>;
}

/// The interpreter a script kind runs with, and the file name its script is written to. An HTTP
/// request is not a script ([`Dispatch`] never gives one to a script runner); were it given, it
/// would run its (empty) script with `bash`.
pub fn interpreter(kind: ScriptKind) -> (&'static str, &'static str) {
    match kind {
        ScriptKind::Bash | ScriptKind::Http => ("bash", "script.sh"),
        ScriptKind::Python => ("python3", "script.py"),
        ScriptKind::Node => ("node", "script.js"),
    }
}

/// Sends host jobs to the process runner, Docker jobs to the Docker runner and HTTP request
/// jobs to the HTTP runner.
pub struct Dispatch {
    pub host: process::ProcessRunner,
    pub docker: docker::DockerRunner,
    pub http: http::HttpRunner,
}

impl Runner for Dispatch {
    fn run<'a>(
        &'a self,
        spec: &'a JobSpec,
        spool: &'a AttemptSpool,
        stop: StopSignal,
    ) -> BoxFuture<'a, Outcome> {
        match spec.runtime {
            RuntimeSpec::Host(_) => self.host.run(spec, spool, stop),
            RuntimeSpec::Docker(_) => self.docker.run(spec, spool, stop),
            RuntimeSpec::Http(_) => self.http.run(spec, spool, stop),
        }
    }
}
