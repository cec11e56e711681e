//! SSH fallback: jobs of servers with `connection: ssh` are run by the control plane itself over
//! SSH (russh, pure Rust). One worker task (owned by `AppState::tasks`) claims queued SSH jobs
//! with the same lease as an agent's claim and runs each in its own task (`job.rs`); the lease
//! is renewed while it runs, so a control plane that dies mid-job leaves the job to the lease
//! sweeper (re-queued or failed with reason `lost`). Output and results go through the same
//! store functions as agent jobs, with the runner key `ssh:<server id>`.
//!
//! Nothing from an event or a server is interpolated into a remote command line: the commands
//! are fixed strings; the script and the environment travel as bytes on the channel's stdin.

pub mod bootstrap;
mod helper;
mod job;
mod pool;
mod session;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::AppState;
use crate::crypto::EncryptionKey;
use crate::store::jobs::SSH_RUNNER_PREFIX;
use crate::store::now_ms;

/// How often the worker looks for queued SSH jobs without being woken (jobs re-queued by the
/// lease sweeper or created by the scheduler).
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// SSH jobs running at once, over all servers.
const MAX_RUNNING: usize = 16;

/// The runner key of a server's SSH jobs.
pub fn runner_of_server(server_id: &str) -> String {
    format!("{SSH_RUNNER_PREFIX}{server_id}")
}

/// The server id in a runner key, if it names an SSH server.
pub fn server_of_runner(runner: &str) -> Option<&str> {
    runner.strip_prefix(SSH_RUNNER_PREFIX)
}

/// The sealed part of a server's SSH settings.
#[derive(Default, Serialize, Deserialize)]
pub struct SshSecrets {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl SshSecrets {
    pub fn seal(&self, key: &EncryptionKey) -> Vec<u8> {
        key.seal(&serde_json::to_vec(self).expect("secrets serialize"))
    }

    pub fn open(key: &EncryptionKey, sealed: &[u8]) -> anyhow::Result<SshSecrets> {
        let plain = key
            .open(sealed)
            .map_err(|error| anyhow::anyhow!("cannot open: {error}"))?;
        Ok(serde_json::from_slice(&plain)?)
    }
}

/// An OpenSSH public key line (`type base64 [comment]`) without its comment, or `None` when it
/// does not parse.
pub fn normalize_host_key(line: &str) -> Option<String> {
    let mut key = russh::keys::PublicKey::from_openssh(line.trim()).ok()?;
    key.set_comment("");
    key.to_openssh().ok()
}

/// The control plane's SSH fallback: wake-ups for the worker and the running jobs' cancel
/// switches.
#[derive(Clone, Default)]
pub struct SshRunner {
    wake: Arc<Notify>,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// Servers with an agent install (`bootstrap.rs`) in progress.
    installing: Arc<Mutex<HashSet<String>>>,
    /// Connections kept open for the servers' next jobs.
    pool: pool::SessionPool,
}

impl SshRunner {
    /// Tells the worker that SSH jobs may be queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Marks an agent install on `server_id` as running until the returned guard drops (also
    /// when the install's task panics); `None` when one runs already.
    fn begin_install(&self, server_id: &str) -> Option<InstallGuard> {
        let fresh = self
            .installing
            .lock()
            .expect("installs")
            .insert(server_id.to_string());
        fresh.then(|| InstallGuard {
            installing: self.installing.clone(),
            server_id: server_id.to_string(),
        })
    }

    /// Asks the running attempt of `job_id` (if this control plane runs it) to stop.
    pub fn cancel(&self, job_id: &str) {
        if let Some(token) = self.running.lock().expect("ssh jobs").get(job_id) {
            token.cancel();
        }
    }
}

/// An agent install in progress on one server (see [`SshRunner::begin_install`]).
struct InstallGuard {
    installing: Arc<Mutex<HashSet<String>>>,
    server_id: String,
}

impl Drop for InstallGuard {
    fn drop(&mut self) {
        if let Ok(mut installing) = self.installing.lock() {
            installing.remove(&self.server_id);
        }
    }
}

/// The worker: claims queued SSH jobs and runs each in its own task until shutdown.
pub async fn run_worker(state: AppState) {
    let runner = state.ssh.clone();
    let jobs = tokio_util::task::TaskTracker::new();
    let mut last_sweep = std::time::Instant::now();
    loop {
        // Claim while there is room and there are jobs.
        loop {
            if runner.running.lock().expect("ssh jobs").len() >= MAX_RUNNING {
                break;
            }
            let lease_until = now_ms() + state.config.lease.as_millis() as i64;
            match state.store.claim_ssh_job(lease_until).await {
                Ok(Some((claimed, runner_key))) => {
                    let cancel = state.shutdown.child_token();
                    runner
                        .running
                        .lock()
                        .expect("ssh jobs")
                        .insert(claimed.id.clone(), cancel.clone());
                    state.job_events.notify(&claimed.id);
                    let (state, runner) = (state.clone(), runner.clone());
                    jobs.spawn(async move {
                        let job_id = claimed.id.clone();
                        job::run_attempt(&state, claimed, &runner_key, cancel).await;
                        runner.running.lock().expect("ssh jobs").remove(&job_id);
                        runner.wake();
                    });
                }
                Ok(None) => break,
                Err(error) => {
                    warn!(%error, "could not claim SSH jobs");
                    break;
                }
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = runner.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_CHECK) => {}
        }
        if last_sweep.elapsed() >= IDLE_CHECK {
            runner.pool.sweep().await;
            last_sweep = std::time::Instant::now();
        }
    }
    // Running attempts see the shutdown (their tokens are children of it), kill their remote
    // process groups and clean up; whatever they cannot settle, the lease settles.
    jobs.close();
    jobs.wait().await;
    runner.pool.clear();
    info!("SSH worker stopped");
}
