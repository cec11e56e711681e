//! The runners' shared test harness: run a spec to its end through a spool and read the log
//! back, per stream and in arrival order.

use std::time::Duration;

use cronium_protocol::{JobSpec, LogStream};
use tokio::sync::watch;

use super::{Runner, StopSignal};
use crate::spool::{Outcome, Spool, SpoolSpec};

/// An attempt's log as the spool holds it.
#[derive(Debug, Default)]
pub(crate) struct Log {
    /// Consecutive output of one stream merged into one piece, in arrival order.
    pub pieces: Vec<(LogStream, String)>,
    pub stdout: String,
    pub stderr: String,
    pub system: String,
}

/// A stop signal that never fires.
pub(crate) fn no_stop() -> StopSignal {
    watch::channel(None).1
}

/// Runs `spec` with `runner` in a fresh attempt spool of `spool` until it ends (failing the test
/// after `limit`), and returns the outcome and the log.
pub(crate) async fn run_to_end(
    runner: &impl Runner,
    spool: &Spool,
    spec: &JobSpec,
    stop: StopSignal,
    limit: Duration,
) -> (Outcome, Log) {
    let attempt = spool
        .create(
            &SpoolSpec {
                job_id: spec.job_id.clone(),
                attempt: spec.attempt,
                run_id: spec.run_id.clone(),
                event_id: spec.event_id.clone(),
            },
            1 << 20,
        )
        .unwrap();
    let outcome = tokio::time::timeout(limit, runner.run(spec, &attempt, stop))
        .await
        .expect("the runner finished in time");
    let mut reader = attempt.reader(0).unwrap();
    let file_len = attempt.progress().file_len;
    let mut log = Log::default();
    while let Some(piece) = reader.next_piece(file_len, 1 << 20).unwrap() {
        let text = String::from_utf8_lossy(&piece.data).into_owned();
        match piece.stream {
            LogStream::Stdout => log.stdout.push_str(&text),
            LogStream::Stderr => log.stderr.push_str(&text),
            LogStream::System => log.system.push_str(&text),
        }
        match log.pieces.last_mut() {
            Some((stream, existing)) if *stream == piece.stream => existing.push_str(&text),
            _ => log.pieces.push((piece.stream, text)),
        }
    }
    (outcome, log)
}

/// Whether a process is gone (or a zombie waiting for a reaper that is not us).
pub(crate) fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}
