//! The SSH fallback phase: a job on a server with `connection: ssh` (the control plane runs it
//! over SSH, no agent) against the throwaway sshd of the [`SshPeer`], trigger → result visible
//! (SSE `end`), next to `ssh … true` to the same sshd, interleaved round by round: a server that
//! opens a connection per job against a fresh `ssh`, and a server that keeps its connection
//! (`reuse_connection`) against `ssh` over a ControlMaster. Both jobs run `true`.

use anyhow::Context;
use serde_json::{Value, json};

use crate::api::{Api, now_ns};
use crate::phases::ensure_completed;
use crate::report::at_most;
use crate::ssh::SshPeer;
use crate::stats::Summary;

/// Targets: a fresh-connection job at most this multiple of a fresh `ssh … true` (p50)…
pub const FRESH_VS_FRESH_SSH: f64 = 1.1;
/// …and a job on a kept connection at most this multiple of `ssh` over a ControlMaster (p50).
pub const REUSED_VS_CONTROLMASTER: f64 = 2.0;

/// The phase's samples, summarised.
pub struct SshFallbackFigures {
    pub warmup: usize,
    /// A job with a connection of its own: trigger → SSE `end`.
    pub fresh: Summary,
    /// A job on a kept connection.
    pub reused: Summary,
    /// `ssh … true`, fresh connection.
    pub ssh_fresh: Summary,
    /// `ssh … true` over a ControlMaster.
    pub ssh_master: Summary,
}

/// Creates a server named `name` for the peer (root, its key) and a `true` event on it.
async fn event_on_peer(
    api: &Api,
    peer: &SshPeer,
    name: &str,
    reuse: bool,
) -> anyhow::Result<String> {
    let (key, port) = peer.login()?;
    let server = api
        .post(
            "/servers",
            &json!({"name": name, "connection": "ssh", "ssh": {
                "host": "127.0.0.1", "port": port, "username": "root", "auth": "key",
                "private_key": key, "reuse_connection": reuse,
            }}),
        )
        .await?;
    let server_id = server["id"].as_str().context("POST /servers: no id")?;
    let event = api
        .post(
            "/events",
            &json!({"name": name, "kind": "bash", "script": "true",
                    "targets": {"servers": [server_id]}, "timeout_seconds": 60}),
        )
        .await?;
    event["id"]
        .as_str()
        .map(str::to_owned)
        .context("POST /events: no id")
}

/// One job of `event_id`: trigger → SSE `end`, milliseconds.
async fn one_job(api: &Api, event_id: &str) -> anyhow::Result<f64> {
    let t0 = now_ns();
    let triggered = api.trigger(event_id).await?;
    let followed = api.follow(&triggered.job_id).await?;
    ensure_completed(&followed.job)?;
    Ok((followed.end_ns - t0) as f64 / 1e6)
}

/// Runs `warmup` untimed and `runs` timed rounds of the four measurements.
pub async fn measure(
    api: &Api,
    peer: &mut SshPeer,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<SshFallbackFigures> {
    let fresh_event = event_on_peer(api, peer, "bench-ssh-fresh", false).await?;
    let reused_event = event_on_peer(api, peer, "bench-ssh-reused", true).await?;
    let (mut fresh, mut reused, mut ssh_fresh, mut ssh_master) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..warmup + runs {
        let samples = [
            one_job(api, &fresh_event).await?,
            peer.fresh().await?,
            one_job(api, &reused_event).await?,
            peer.multiplexed().await?,
        ];
        if round >= warmup {
            fresh.push(samples[0]);
            ssh_fresh.push(samples[1]);
            reused.push(samples[2]);
            ssh_master.push(samples[3]);
        }
    }
    peer.close_master();
    Ok(SshFallbackFigures {
        warmup,
        fresh: Summary::of(&fresh),
        reused: Summary::of(&reused),
        ssh_fresh: Summary::of(&ssh_fresh),
        ssh_master: Summary::of(&ssh_master),
    })
}

impl SshFallbackFigures {
    /// The markdown section.
    pub fn markdown(&self) -> String {
        let row = |name: &str, summary: &Summary| {
            format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} |",
                summary.count, summary.mean, summary.p50, summary.p99
            )
        };
        let fresh_ratio = self.fresh.p50 / self.ssh_fresh.p50;
        let reused_ratio = self.reused.p50 / self.ssh_master.p50;
        [
            format!(
                "| SSH fallback latency (ms), `true`, {} warm-up rounds | n | mean | p50 | p99 |",
                self.warmup
            ),
            "|---|---:|---:|---:|---:|".to_owned(),
            row("job, connection per job: trigger → result visible", &self.fresh),
            row("peer: `ssh 127.0.0.1 true`, fresh connection", &self.ssh_fresh),
            row("job, kept connection: trigger → result visible", &self.reused),
            row("peer: `ssh 127.0.0.1 true`, ControlMaster", &self.ssh_master),
            String::new(),
            "| ratio | p50 | p99 | target | verdict |".to_owned(),
            "|---|---:|---:|---|---|".to_owned(),
            format!(
                "| connection per job / fresh ssh | {:.3} | {:.3} | ≤ {FRESH_VS_FRESH_SSH}× (p50) | {} |",
                fresh_ratio,
                self.fresh.p99 / self.ssh_fresh.p99,
                at_most(fresh_ratio, FRESH_VS_FRESH_SSH, "×")
            ),
            format!(
                "| kept connection / ssh ControlMaster | {:.3} | {:.3} | ≤ {REUSED_VS_CONTROLMASTER}× (p50) | {} |",
                reused_ratio,
                self.reused.p99 / self.ssh_master.p99,
                at_most(reused_ratio, REUSED_VS_CONTROLMASTER, "×")
            ),
            String::new(),
        ]
        .join("\n")
    }

    pub fn json(&self) -> Value {
        json!({
            "warmup": self.warmup,
            "fresh": self.fresh.to_json(),
            "reused": self.reused.to_json(),
            "ssh_fresh": self.ssh_fresh.to_json(),
            "ssh_master": self.ssh_master.to_json(),
            "fresh_vs_fresh_ssh_p50": self.fresh.p50 / self.ssh_fresh.p50,
            "reused_vs_controlmaster_p50": self.reused.p50 / self.ssh_master.p50,
        })
    }
}
