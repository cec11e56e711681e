//! The summary: a markdown table for the README and the same numbers as JSON.

use serde_json::{Value, json};

use crate::phases::{MemoryPerAgent, SyncCounts, Throughput};
use crate::stats::Summary;
use crate::terminal::TerminalFigures;

/// Targets the figures are compared with.
pub mod targets {
    /// Result latency p50 at most this fraction of a fresh `ssh … true`.
    pub const RESULT_P50_VS_FRESH_SSH: f64 = 0.05;
    /// Result latency p99, milliseconds.
    pub const RESULT_P99_MS: f64 = 25.0;
    /// Jobs per second (plain, no strace).
    pub const JOBS_PER_SECOND: f64 = 500.0;
    /// fsync + fdatasync calls per job.
    pub const COMMITS_PER_JOB: f64 = 3.0;
    /// Idle agent RSS, MiB.
    pub const AGENT_RSS_MIB: f64 = 10.0;
    /// Control-plane memory per connected idle agent, KiB.
    pub const KIB_PER_AGENT: f64 = 64.0;
    /// Docker job trigger → result at most this multiple of `docker run --rm` (p50 and p99).
    pub const DOCKER_VS_DOCKER_RUN: f64 = 1.1;
    /// Terminal keystroke echo p50, milliseconds.
    pub const TERMINAL_ECHO_P50_MS: f64 = 0.5;
    /// Terminal keystroke echo p50 at most this multiple of `ssh -tt` over a ControlMaster.
    pub const TERMINAL_ECHO_VS_CONTROLMASTER: f64 = 3.0;
    /// `cat` throughput (median) at least this multiple of a fresh `ssh -tt`.
    pub const TERMINAL_CAT_VS_FRESH_SSH: f64 = 1.0;
    /// Session open p50 at most this fraction of a fresh `ssh -tt`.
    pub const TERMINAL_OPEN_VS_FRESH_SSH: f64 = 0.1;
    /// Ctrl-C under a flood until the prompt, p99, milliseconds.
    pub const TERMINAL_INTERRUPT_MS: f64 = 100.0;
}

/// The terminal phase's outcome.
pub enum TerminalPhase {
    /// Not run, and why (`--terminal-echo 0`).
    Skipped(String),
    /// Measured.
    Measured(Box<TerminalFigures>),
}

impl TerminalPhase {
    /// The markdown section (a table, or why it was skipped).
    pub fn markdown(&self) -> String {
        match self {
            TerminalPhase::Measured(figures) => figures.markdown(),
            TerminalPhase::Skipped(reason) => format!("(terminal comparison skipped: {reason})"),
        }
    }

    /// The figures as JSON.
    pub fn json(&self) -> Value {
        match self {
            TerminalPhase::Measured(figures) => figures.json(),
            TerminalPhase::Skipped(reason) => json!({"skipped": reason}),
        }
    }
}

/// The Docker phase's outcome.
pub enum DockerPhase {
    /// Not run, and why (`--docker-runs 0`, no engine).
    Skipped(String),
    /// Measured.
    Measured(DockerComparison),
}

/// A Docker job's latency next to `docker run --rm` of the same image.
pub struct DockerComparison {
    /// The engine's version.
    pub engine_version: String,
    /// Where the engine listens (`DOCKER_HOST`, or the default socket).
    pub engine_address: String,
    /// The image both sides run.
    pub image: String,
    /// The peer's command line.
    pub docker_run_command: String,
    /// Untimed warm-up rounds.
    pub warmup: usize,
    /// Cronium Docker job: trigger → SSE `end`.
    pub cronium: Summary,
    /// `docker run --rm …` wall time.
    pub docker_run: Summary,
}

impl DockerComparison {
    /// cronium p50 / docker-run p50.
    pub fn ratio_p50(&self) -> f64 {
        self.cronium.p50 / self.docker_run.p50
    }

    /// cronium p99 / docker-run p99.
    pub fn ratio_p99(&self) -> f64 {
        self.cronium.p99 / self.docker_run.p99
    }
}

/// The helper round-trip phase's outcome.
pub enum HelperPhase {
    /// Not run (`--helper-calls 0`).
    Skipped(String),
    /// Measured, per language.
    Measured(Vec<HelperRoundTrip>),
}

/// One language's `input` helper calls next to its bare HTTP/1.1 round trips, timed inside the
/// same job.
pub struct HelperRoundTrip {
    /// `bash`, `python` or `node`.
    pub language: String,
    /// What the bare side does.
    pub peer: String,
    /// Untimed calls of each kind before the samples.
    pub warmup: usize,
    /// `input` helper calls.
    pub helper: Summary,
    /// Bare round trips.
    pub bare: Summary,
}

impl HelperRoundTrip {
    /// helper p50 / bare p50.
    pub fn ratio_p50(&self) -> f64 {
        self.helper.p50 / self.bare.p50
    }

    /// helper p99 / bare p99.
    pub fn ratio_p99(&self) -> f64 {
        self.helper.p99 / self.bare.p99
    }

    /// `helper round trip <lang>: p50 X µs p99 Y µs (bare socket p50 Z µs, ratio R×)`.
    pub fn line(&self) -> String {
        format!(
            "helper round trip {}: p50 {:.0} µs p99 {:.0} µs (bare socket p50 {:.0} µs, ratio {:.2}×)",
            self.language,
            self.helper.p50 * 1e3,
            self.helper.p99 * 1e3,
            self.bare.p50 * 1e3,
            self.ratio_p50()
        )
    }
}

/// Everything measured.
pub struct Results {
    /// The command line's settings and the machine, as JSON.
    pub config: Value,
    /// `POST …/runs` round trip.
    pub post: Summary,
    /// Trigger → the job's process printed its start time.
    pub started: Summary,
    /// Trigger → SSE `end` arrived.
    pub result: Summary,
    /// Where the result latency goes: milestones from the trigger, (name, summary).
    pub breakdown: Vec<(String, Summary)>,
    /// `ssh … true` with a fresh connection and over a ControlMaster, if sshd was available.
    pub ssh: Option<(Summary, Summary)>,
    /// Throughput without strace.
    pub throughput: Throughput,
    /// Throughput under strace and the sync calls it counted, if strace was available.
    pub traced: Option<(Throughput, SyncCounts)>,
    /// Concurrent client tasks of the throughput phases.
    pub clients: usize,
    /// The separate agent process's RSS, idle after connecting, KiB.
    pub agent_rss_idle_kib: u64,
    /// The same after the load phases and ~3 s of idleness, KiB.
    pub agent_rss_after_load_kib: u64,
    /// The control plane's memory per connected agent, if measured (`--agents` > 0).
    pub memory: Option<MemoryPerAgent>,
    /// The Docker job vs `docker run --rm` comparison.
    pub docker: DockerPhase,
    /// Helper calls vs bare Unix-socket round trips, per language.
    pub helpers: HelperPhase,
    /// Terminals vs `ssh -tt`.
    pub terminal: TerminalPhase,
}

/// "met", or by how much the figure missed an upper-bound target.
pub(crate) fn at_most(value: f64, target: f64, unit: &str) -> String {
    if value <= target {
        format!("met ({:.0}% of the target)", value / target * 100.0)
    } else {
        format!(
            "MISSED by {:.3}{unit} ({:.2}× the target)",
            value - target,
            value / target
        )
    }
}

/// "met", or by how much the figure missed a lower-bound target.
pub(crate) fn at_least(value: f64, target: f64, unit: &str) -> String {
    if value >= target {
        format!("met ({:.2}× the target)", value / target)
    } else {
        format!(
            "MISSED by {:.1}{unit} ({:.0}% of the target)",
            target - value,
            value / target * 100.0
        )
    }
}

fn row(name: &str, summary: &Summary, target: &str, verdict: &str) -> String {
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {target} | {verdict} |",
        summary.count, summary.mean, summary.p50, summary.p99
    )
}

impl Results {
    /// The summary as markdown.
    pub fn markdown(&self) -> String {
        let mut out = Vec::new();
        out.push(format!(
            "### Cronium benchmark ({})",
            self.config["description"].as_str().unwrap_or_default()
        ));
        out.push(String::new());
        out.push("| latency (ms) | n | mean | p50 | p99 | target | verdict |".to_owned());
        out.push("|---|---:|---:|---:|---:|---|---|".to_owned());
        out.push(row(
            "`POST /events/{id}/runs` (durable)",
            &self.post,
            "",
            "",
        ));
        out.push(row("trigger → process started", &self.started, "", ""));
        out.push(row(
            "trigger → result visible (SSE `end`)",
            &self.result,
            &format!("p99 ≤ {} ms", targets::RESULT_P99_MS),
            &format!(
                "p99 {}",
                at_most(self.result.p99, targets::RESULT_P99_MS, " ms")
            ),
        ));
        if let Some((fresh, multiplexed)) = &self.ssh {
            out.push(row("peer: `ssh … true`, fresh connection", fresh, "", ""));
            out.push(row(
                "peer: `ssh … true`, ControlMaster",
                multiplexed,
                "",
                "",
            ));
        }
        out.push(String::new());
        if !self.breakdown.is_empty() {
            out.push(
                "| where the latency goes: trigger → … (ms) | n | mean | p50 | p99 |".to_owned(),
            );
            out.push("|---|---:|---:|---:|---:|".to_owned());
            for (name, summary) in &self.breakdown {
                out.push(format!(
                    "| {name} | {} | {:.2} | {:.2} | {:.2} |",
                    summary.count, summary.mean, summary.p50, summary.p99
                ));
            }
            out.push(String::new());
        }
        if let Some((fresh, multiplexed)) = &self.ssh {
            out.push(
                "| ratio: cronium result latency / peer | p50 | p99 | target | verdict |"
                    .to_owned(),
            );
            out.push("|---|---:|---:|---|---|".to_owned());
            let p50 = self.result.p50 / fresh.p50;
            out.push(format!(
                "| vs fresh `ssh` | {:.3} | {:.3} | p50 ≤ {} | p50 {} |",
                p50,
                self.result.p99 / fresh.p99,
                targets::RESULT_P50_VS_FRESH_SSH,
                at_most(p50, targets::RESULT_P50_VS_FRESH_SSH, "")
            ));
            out.push(format!(
                "| vs `ssh` ControlMaster | {:.3} | {:.3} | | |",
                self.result.p50 / multiplexed.p50,
                self.result.p99 / multiplexed.p99
            ));
            out.push(String::new());
        } else {
            out.push("(SSH comparison skipped: no sshd)".to_owned());
            out.push(String::new());
        }
        match &self.docker {
            DockerPhase::Measured(docker) => {
                out.push(format!(
                    "| Docker latency (ms), image `{}`, engine {} | n | mean | p50 | p99 | target | verdict |",
                    docker.image, docker.engine_version
                ));
                out.push("|---|---:|---:|---:|---:|---|---|".to_owned());
                out.push(row(
                    "cronium Docker job: trigger → result visible (SSE `end`)",
                    &docker.cronium,
                    "",
                    "",
                ));
                out.push(row(
                    &format!("peer: `{}`", docker.docker_run_command),
                    &docker.docker_run,
                    "",
                    "",
                ));
                out.push(String::new());
                out.push(
                    "| ratio: cronium Docker job / `docker run --rm` | p50 | p99 | target | verdict |"
                        .to_owned(),
                );
                out.push("|---|---:|---:|---|---|".to_owned());
                out.push(format!(
                    "| trigger → result vs `docker run --rm` | {:.3} | {:.3} | ≤ {}× (p50 and p99) | p50 {}; p99 {} |",
                    docker.ratio_p50(),
                    docker.ratio_p99(),
                    targets::DOCKER_VS_DOCKER_RUN,
                    at_most(docker.ratio_p50(), targets::DOCKER_VS_DOCKER_RUN, "×"),
                    at_most(docker.ratio_p99(), targets::DOCKER_VS_DOCKER_RUN, "×")
                ));
                out.push(String::new());
            }
            DockerPhase::Skipped(reason) => {
                out.push(format!("(Docker comparison skipped: {reason})"));
                out.push(String::new());
            }
        }
        match &self.helpers {
            HelperPhase::Measured(languages) => {
                out.push(
                    "| helper round trip inside the script (µs) | n | mean | p50 | p99 | peer: bare HTTP/1.1 over a Unix socket | peer p50 | peer p99 | ratio p50 | ratio p99 |"
                        .to_owned(),
                );
                out.push("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|".to_owned());
                for language in languages {
                    out.push(format!(
                        "| `input`, {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
                        language.language,
                        language.helper.count,
                        language.helper.mean * 1e3,
                        language.helper.p50 * 1e3,
                        language.helper.p99 * 1e3,
                        language.peer,
                        language.bare.p50 * 1e3,
                        language.bare.p99 * 1e3,
                        language.ratio_p50(),
                        language.ratio_p99()
                    ));
                }
                out.push(String::new());
                for language in languages {
                    out.push(format!("- {}", language.line()));
                }
                out.push(String::new());
            }
            HelperPhase::Skipped(reason) => {
                out.push(format!("(helper round trips skipped: {reason})"));
                out.push(String::new());
            }
        }
        out.push(self.terminal.markdown());
        out.push(String::new());
        out.push("| figure | value | target | verdict |".to_owned());
        out.push("|---|---:|---|---|".to_owned());
        out.push(format!(
            "| throughput, {} clients, 1 agent × capacity 8 | {:.1} jobs/s ({} jobs in {:.2} s) | ≥ {} jobs/s | {} |",
            self.clients,
            self.throughput.per_second(),
            self.throughput.jobs,
            self.throughput.elapsed.as_secs_f64(),
            targets::JOBS_PER_SECOND,
            at_least(self.throughput.per_second(), targets::JOBS_PER_SECOND, " jobs/s")
        ));
        if let Some((traced, counts)) = &self.traced {
            let per_job = (counts.fsync + counts.fdatasync) as f64 / traced.jobs as f64;
            out.push(format!(
                "| throughput under strace | {:.1} jobs/s ({} jobs) | | (strace slows the control plane) |",
                traced.per_second(),
                traced.jobs
            ));
            out.push(format!(
                "| durable commits per job (control plane fsync+fdatasync / jobs) | {:.2} ({} fsync + {} fdatasync) | ≤ {} | {} |",
                per_job,
                counts.fsync,
                counts.fdatasync,
                targets::COMMITS_PER_JOB,
                at_most(per_job, targets::COMMITS_PER_JOB, "")
            ));
        } else {
            out.push("| durable commits per job | not measured (no strace) | | |".to_owned());
        }
        let idle_mib = self.agent_rss_idle_kib as f64 / 1024.0;
        out.push(format!(
            "| idle agent RSS (separate process, connected, idle 3 s) | {:.2} MiB | ≤ {} MiB | {} |",
            idle_mib,
            targets::AGENT_RSS_MIB,
            at_most(idle_mib, targets::AGENT_RSS_MIB, " MiB")
        ));
        out.push(format!(
            "| agent RSS after the load phases (idle 3 s) | {:.2} MiB | | |",
            self.agent_rss_after_load_kib as f64 / 1024.0
        ));
        if let Some(memory) = &self.memory {
            out.push(format!(
                "| control-plane memory per connected idle agent ({} agents) | {:.1} KiB | ≤ {} KiB | {} |",
                memory.agents,
                memory.per_agent_kib(),
                targets::KIB_PER_AGENT,
                at_most(memory.per_agent_kib(), targets::KIB_PER_AGENT, " KiB")
            ));
            out.push(format!(
                "| … of which the connections alone (after enrollment) | {:.1} KiB | | |",
                memory.per_connection_kib()
            ));
            out.push(format!(
                "| control-plane RSS: before / enrolled / all connected | {:.1} / {:.1} / {:.1} MiB | | all online after {:.1} s |",
                memory.rss_before_kib as f64 / 1024.0,
                memory.rss_enrolled_kib as f64 / 1024.0,
                memory.rss_connected_kib as f64 / 1024.0,
                memory.online_after.as_secs_f64()
            ));
        }
        out.join("\n")
    }

    /// Every number as JSON.
    pub fn json(&self) -> Value {
        let ratios = self.ssh.as_ref().map(|(fresh, multiplexed)| {
            json!({
                "result_vs_fresh_ssh_p50": self.result.p50 / fresh.p50,
                "result_vs_fresh_ssh_p99": self.result.p99 / fresh.p99,
                "result_vs_controlmaster_p50": self.result.p50 / multiplexed.p50,
                "result_vs_controlmaster_p99": self.result.p99 / multiplexed.p99,
            })
        });
        json!({
            "config": self.config,
            "latency": {
                "post_runs": self.post.to_json(),
                "trigger_to_process_started": self.started.to_json(),
                "trigger_to_result_visible": self.result.to_json(),
                "breakdown": self
                    .breakdown
                    .iter()
                    .map(|(name, summary)| json!({"milestone": name, "from_trigger": summary.to_json()}))
                    .collect::<Vec<_>>(),
            },
            "ssh": self.ssh.as_ref().map(|(fresh, multiplexed)| json!({
                "fresh": fresh.to_json(),
                "controlmaster": multiplexed.to_json(),
            })),
            "ratios": ratios,
            "throughput": {
                "clients": self.clients,
                "jobs": self.throughput.jobs,
                "seconds": self.throughput.elapsed.as_secs_f64(),
                "jobs_per_second": self.throughput.per_second(),
            },
            "durable_commits": self.traced.as_ref().map(|(traced, counts)| json!({
                "jobs": traced.jobs,
                "seconds": traced.elapsed.as_secs_f64(),
                "jobs_per_second_under_strace": traced.per_second(),
                "fsync": counts.fsync,
                "fdatasync": counts.fdatasync,
                "per_job": (counts.fsync + counts.fdatasync) as f64 / traced.jobs as f64,
            })),
            "agent_rss_kib": {
                "idle": self.agent_rss_idle_kib,
                "after_load": self.agent_rss_after_load_kib,
            },
            "control_plane_memory": self.memory.as_ref().map(|memory| json!({
                "agents": memory.agents,
                "rss_before_kib": memory.rss_before_kib,
                "rss_enrolled_kib": memory.rss_enrolled_kib,
                "rss_connected_kib": memory.rss_connected_kib,
                "per_agent_kib": memory.per_agent_kib(),
                "per_connection_kib": memory.per_connection_kib(),
                "online_after_seconds": memory.online_after.as_secs_f64(),
                "agent_errors": memory.agent_errors,
            })),
            "docker": match &self.docker {
                DockerPhase::Skipped(reason) => json!({"skipped": reason}),
                DockerPhase::Measured(docker) => json!({
                    "engine_version": docker.engine_version,
                    "engine_address": docker.engine_address,
                    "image": docker.image,
                    "docker_run_command": docker.docker_run_command,
                    "warmup": docker.warmup,
                    "cronium_trigger_to_result": docker.cronium.to_json(),
                    "docker_run": docker.docker_run.to_json(),
                    "ratio_p50": docker.ratio_p50(),
                    "ratio_p99": docker.ratio_p99(),
                    "target_ratio": targets::DOCKER_VS_DOCKER_RUN,
                    "met_p50": docker.ratio_p50() <= targets::DOCKER_VS_DOCKER_RUN,
                    "met_p99": docker.ratio_p99() <= targets::DOCKER_VS_DOCKER_RUN,
                }),
            },
            "helpers": match &self.helpers {
                HelperPhase::Skipped(reason) => json!({"skipped": reason}),
                HelperPhase::Measured(languages) => json!(languages
                    .iter()
                    .map(|language| json!({
                        "language": language.language,
                        "peer": language.peer,
                        "warmup": language.warmup,
                        "helper_input": language.helper.to_json(),
                        "bare_socket": language.bare.to_json(),
                        "ratio_p50": language.ratio_p50(),
                        "ratio_p99": language.ratio_p99(),
                    }))
                    .collect::<Vec<_>>()),
            },
            "terminal": self.terminal.json(),
            "targets": {
                "result_p50_vs_fresh_ssh": targets::RESULT_P50_VS_FRESH_SSH,
                "result_p99_ms": targets::RESULT_P99_MS,
                "jobs_per_second": targets::JOBS_PER_SECOND,
                "commits_per_job": targets::COMMITS_PER_JOB,
                "agent_rss_mib": targets::AGENT_RSS_MIB,
                "kib_per_agent": targets::KIB_PER_AGENT,
                "docker_vs_docker_run": targets::DOCKER_VS_DOCKER_RUN,
                "terminal_echo_p50_ms": targets::TERMINAL_ECHO_P50_MS,
                "terminal_echo_vs_controlmaster": targets::TERMINAL_ECHO_VS_CONTROLMASTER,
                "terminal_cat_vs_fresh_ssh": targets::TERMINAL_CAT_VS_FRESH_SSH,
                "terminal_open_vs_fresh_ssh": targets::TERMINAL_OPEN_VS_FRESH_SSH,
                "terminal_interrupt_p99_ms": targets::TERMINAL_INTERRUPT_MS,
            },
        })
    }
}
