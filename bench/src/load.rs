//! The load phase (`--load-only`): many agent connections held by this process for minutes.
//!
//! A control plane (`cronium serve`, default heartbeat 5 s and lease 30 s) and `--load-agents`
//! agents (default 500) running the agent's own code in this process (`cronium_e2e::fleet`:
//! connection, reconnects, heartbeats, claims, spool, uploads), their jobs run by the SIMULATED
//! in-process executor (`echo hi` gets `hi`, no process). While they are held for
//! `--load-minutes`:
//! - every agent's state in `GET /agents` is read every second and compared with the first
//!   reading: an agent offline, or online on another connection (`connected_at` changed: it
//!   reconnected), is a failure, printed as it is seen;
//! - the control plane's own timing of heartbeat handling (`cronium_heartbeat_seconds` of
//!   `GET /metrics`, from the decoded heartbeat to the written acknowledgement) over the hold;
//! - dispatch under that load: `--load-jobs` single-host runs, each on a random agent, spread
//!   over the hold, timed from the trigger to the run's `end` event (`GET /runs/{id}/events`);
//! - the control plane's RSS (VmRSS) with no agent, with the identities enrolled, and with all
//!   connected, at the start and at the end of the hold.
//!
//! Then the control plane is stopped (SIGTERM, then SIGKILL) and started again on the same data
//! dir and ports; how the agents come back is read from their `connected_at`: the first and last
//! reconnect after the new process was ready, and the spread (distinct milliseconds, the most
//! within any 10 ms). Last, `--load-light` (default 10,000) LIGHT simulated agents
//! (`cronium_e2e::light`: real QUIC + mTLS + hello + heartbeats, no runner; the full agent code
//! 10,000 times does not fit this process's file-descriptor limit and two cores) connect to the
//! restarted control plane for its memory per connection at that scale.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use cronium_e2e::fleet::{self, Executor, Fleet, FleetOptions};
use cronium_e2e::light::{LightFleet, LightServer};
use cronium_e2e::load::{AgentState, Histogram, Spread, fleet_states};
use rand::{Rng, RngCore};
use serde_json::{Value, json};

use crate::api::Api;
use crate::cluster::{ControlPlane, Listen, enrollment_token};
use crate::procs::{Binaries, rss_kib};
use crate::stats::Summary;

/// Names of the load phase's agents.
const PREFIX: &str = "load-";
/// How long one dispatch sample may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long processes are left idle before their memory is read.
const SETTLE: Duration = Duration::from_secs(5);
/// The agents' reconnect ceiling: the agent's own default (`--reconnect-max-ms`).
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// What the load phase does.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub agents: usize,
    pub hold: Duration,
    pub jobs: usize,
    /// Restart the control plane with these signals, in order.
    pub restarts: Vec<Restart>,
    /// LIGHT simulated agents for the memory figure afterwards (0 skips it).
    pub light: usize,
}

/// The control plane's memory with many LIGHT simulated agents (`cronium_e2e::light`: real QUIC
/// + mTLS + hello + heartbeats, no runner, one shared UDP socket).
#[derive(Debug, Clone, Copy)]
pub struct LightFigures {
    pub agents: usize,
    /// RSS with their identities enrolled, before they connect, KiB.
    pub before_kib: u64,
    /// RSS with all of them connected and heartbeating, KiB.
    pub connected_kib: u64,
    /// From the first handshake to the last welcome.
    pub connect: Duration,
    /// Light agents whose connection ended while held.
    pub lost: usize,
}

impl LightFigures {
    /// (connected − before) / agents, KiB.
    pub fn per_connection_kib(&self) -> f64 {
        (self.connected_kib as f64 - self.before_kib as f64) / self.agents as f64
    }
}

/// How the control plane is stopped before it is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// SIGTERM: a graceful stop that closes every agent connection at once.
    Sigterm,
    /// SIGKILL: a crash; the agents find out from the new process (stateless resets).
    Sigkill,
}

impl Restart {
    fn name(self) -> &'static str {
        match self {
            Restart::Sigterm => "SIGTERM",
            Restart::Sigkill => "SIGKILL",
        }
    }

    fn signal(self) -> libc::c_int {
        match self {
            Restart::Sigterm => libc::SIGTERM,
            Restart::Sigkill => libc::SIGKILL,
        }
    }
}

/// The control plane's RSS at each step, KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub idle_kib: u64,
    pub enrolled_kib: u64,
    pub connected_kib: u64,
    pub end_of_hold_kib: u64,
}

/// One restart and how the agents came back.
#[derive(Debug, Clone)]
pub struct RestartFigures {
    pub kind: Restart,
    /// From the signal to the old process's exit.
    pub exit_ms: f64,
    /// From the signal to the new process's ready line.
    pub ready_ms: f64,
    /// Every agent's reconnect (its new `connected_at`).
    pub spread: Spread,
    /// First and last reconnect, ms after the new process's ready line (server clock vs this
    /// process's clock, both on this host).
    pub first_after_ready_ms: i64,
    pub last_after_ready_ms: i64,
}

/// Everything the load phase measured.
#[derive(Debug, Clone)]
pub struct LoadFigures {
    pub agents: usize,
    pub hold: Duration,
    pub online_after: Duration,
    /// Agents seen offline or reconnected during the hold (each printed when seen).
    pub wrongly_offline: Vec<String>,
    /// Readings of every agent's state during the hold.
    pub polls: usize,
    /// Heartbeats handled during the hold, by the control plane's histogram.
    pub heartbeats: Histogram,
    /// Trigger → run's `end` event, ms.
    pub dispatch: Summary,
    /// Trigger → the `POST`'s answer (run and job durable), ms.
    pub dispatch_post: Summary,
    pub memory: Memory,
    pub restarts: Vec<RestartFigures>,
    /// In-process agents that ended with an error when stopped.
    pub agent_errors: usize,
    pub light: Option<LightFigures>,
}

fn progress(message: &str) {
    eprintln!("[cronium-bench] load: {message}");
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn states(api: &Api) -> anyhow::Result<BTreeMap<String, AgentState>> {
    fleet_states(&api.get("/agents").await?, PREFIX)
}

/// `GET /metrics` as text (the admin's token reads it).
async fn scrape(api: &Api) -> anyhow::Result<String> {
    let response = api
        .http()
        .get(format!("{}/metrics", api.base()))
        .bearer_auth(api.token())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .context("GET /metrics")?;
    if !response.status().is_success() {
        bail!("GET /metrics: HTTP {}", response.status());
    }
    response.text().await.context("GET /metrics: the body")
}

/// `cronium_agents_connected` of `GET /metrics`: the agents connected to this control plane.
pub async fn agents_connected(api: &Api) -> anyhow::Result<usize> {
    scrape(api)
        .await?
        .lines()
        .find_map(|line| {
            line.strip_prefix("cronium_agents_connected ")?
                .parse::<usize>()
                .ok()
        })
        .context("no cronium_agents_connected in GET /metrics")
}

/// The memory per connection of the server process `pid` (a control plane, or the bare quinn
/// peer with [`LightServer::Echo`]) with one LIGHT simulated agent per state dir connected to
/// `server`: its RSS after [`SETTLE`] with none connected, then every agent connected (64
/// handshakes at a time) and two heartbeat periods later. Returns the still-connected fleet too:
/// the caller checks the server's own count and stops it.
pub async fn light_memory(
    pid: u32,
    state_dirs: Vec<PathBuf>,
    server: SocketAddr,
    kind: LightServer,
) -> anyhow::Result<(LightFigures, LightFleet)> {
    let agents = state_dirs.len();
    tokio::time::sleep(SETTLE).await;
    let before_kib = rss_kib(pid)?;
    progress(&format!("connecting {agents} light agents to {server}"));
    let started = Instant::now();
    let light = LightFleet::connect_to(state_dirs, server, 64, kind).await?;
    let connect = started.elapsed();
    // Two heartbeat periods (5 s each by default), so every connection has sent some.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let connected_kib = rss_kib(pid)?;
    let figures = LightFigures {
        agents,
        before_kib,
        connected_kib,
        connect,
        lost: light.lost(),
    };
    Ok((figures, light))
}

/// Waits until `count` agents are online on a connection registered after `after_ms`.
async fn wait_all_online(
    api: &Api,
    count: usize,
    after_ms: i64,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, AgentState>> {
    let deadline = Instant::now() + timeout;
    loop {
        // Errors are expected while the control plane restarts.
        let mut back = 0;
        if let Ok(states) = states(api).await {
            back = states
                .values()
                .filter(|state| {
                    state.online && state.connected_at_ms.is_some_and(|at| at > after_ms)
                })
                .count();
            if states.len() == count && back == count {
                return Ok(states);
            }
        }
        if Instant::now() > deadline {
            bail!("only {back} of {count} agents were online within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the load phase in `root` (data dir and agent state dirs).
pub async fn measure(
    binaries: &Binaries,
    root: &Path,
    options: &LoadOptions,
) -> anyhow::Result<LoadFigures> {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let data_dir = root.join("data");
    let (mut control_plane, listen) =
        ControlPlane::start_at(binaries, &data_dir, &Listen::any(), &key, None).await?;
    let token = control_plane.api.token().to_owned();
    let api = control_plane.api.clone();
    progress(&format!(
        "control plane at {} (quic {}), pid {}",
        api.base(),
        control_plane.quic,
        control_plane.pid()
    ));
    tokio::time::sleep(SETTLE).await;
    let idle_kib = rss_kib(control_plane.pid())?;

    progress(&format!("enrolling {} agents", options.agents));
    let enrollment = enrollment_token(&api, options.agents).await?;
    let identities = fleet::enroll(
        api.base(),
        &enrollment.token,
        &enrollment.ca_sha256,
        &root.join("agents"),
        PREFIX,
        options.agents,
        &BTreeMap::new(),
    )
    .await?;
    let agent_ids: Vec<String> = identities.iter().map(|id| id.agent_id.clone()).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let enrolled_kib = rss_kib(control_plane.pid())?;

    let started = Instant::now();
    let mut fleet = Fleet::spawn(
        identities.into_iter().map(|identity| identity.state_dir),
        FleetOptions {
            executor: Executor::SimulatedInProcess,
            capacity: 1,
            reconnect_max: RECONNECT_MAX,
        },
    );
    let connected = wait_all_online(&api, options.agents, 0, Duration::from_secs(600)).await?;
    let online_after = started.elapsed();
    progress(&format!(
        "{} agents online after {:.1} s",
        options.agents,
        online_after.as_secs_f64()
    ));
    tokio::time::sleep(SETTLE).await;
    let connected_kib = rss_kib(control_plane.pid())?;

    // One event per dispatch sample, each targeting a random agent, created before the hold.
    let mut events = Vec::with_capacity(options.jobs);
    for index in 0..options.jobs {
        let agent = &agent_ids[rand::thread_rng().gen_range(0..agent_ids.len())];
        let event = api
            .post(
                "/events",
                &json!({
                    "name": format!("load-dispatch-{index}"),
                    "kind": "bash",
                    "script": fleet::SIMULATED_SCRIPT,
                    "targets": {"agents": [agent]},
                    "timeout_seconds": 60,
                }),
            )
            .await?;
        events.push(
            event["id"]
                .as_str()
                .context("POST /events: no id")?
                .to_owned(),
        );
    }

    progress(&format!(
        "holding {} agents for {:.0} s: every agent's state read each second, {} jobs dispatched ({})",
        options.agents,
        options.hold.as_secs_f64(),
        options.jobs,
        Executor::SimulatedInProcess.label()
    ));
    let before = Histogram::parse(&scrape(&api).await?, "cronium_heartbeat_seconds")?;
    let hold_started = Instant::now();
    let hold_until = hold_started + options.hold;
    let watch = async {
        let mut wrongly_offline = Vec::new();
        let mut polls = 0;
        let mut last: BTreeMap<String, AgentState> = connected.clone();
        while Instant::now() < hold_until {
            let now = states(&api).await?;
            polls += 1;
            for (name, state) in &now {
                let previous = &last[name];
                if state != previous {
                    let what = if !state.online {
                        "OFFLINE"
                    } else {
                        "RECONNECTED"
                    };
                    let line = format!(
                        "{what}: {name} at {:.1} s into the hold ({previous:?} → {state:?})",
                        hold_started.elapsed().as_secs_f64()
                    );
                    eprintln!("[cronium-bench] load: FAILURE {line}");
                    wrongly_offline.push(line);
                }
            }
            if now.len() != options.agents {
                bail!("{} load agents listed, not {}", now.len(), options.agents);
            }
            last = now;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        anyhow::Ok((wrongly_offline, polls))
    };
    let dispatch = async {
        let mut totals = Vec::with_capacity(events.len());
        let mut posts = Vec::with_capacity(events.len());
        let interval = options.hold / (events.len() as u32 + 1);
        for (index, event) in events.iter().enumerate() {
            tokio::time::sleep_until((hold_started + interval * (index as u32 + 1)).into()).await;
            let t0 = Instant::now();
            let run = api
                .post(&format!("/events/{event}/runs"), &json!({}))
                .await?;
            let post = t0.elapsed();
            let run_id = run["run_id"].as_str().context("no run_id")?;
            let followed = api.follow_run(run_id, JOB_TIMEOUT).await?;
            let total = t0.elapsed();
            if followed.end["counts"]["completed"] != 1 {
                bail!(
                    "dispatch run {run_id} ended with {}",
                    followed.end["counts"]
                );
            }
            totals.push(total.as_secs_f64() * 1e3);
            posts.push(post.as_secs_f64() * 1e3);
        }
        anyhow::Ok((totals, posts))
    };
    let (watched, dispatched) = tokio::join!(watch, dispatch);
    let ((wrongly_offline, polls), (totals, posts)) = (watched?, dispatched?);
    fleet.ensure_running()?;
    let after = Histogram::parse(&scrape(&api).await?, "cronium_heartbeat_seconds")?;
    let heartbeats = after.since(&before);
    let end_of_hold_kib = rss_kib(control_plane.pid())?;
    if totals.is_empty() {
        bail!("--load-jobs must be at least 1");
    }
    let dispatch = Summary::of(&totals);
    let dispatch_post = Summary::of(&posts);
    progress(&format!(
        "hold done: {} wrongly offline; heartbeat handling p50 {:.3} ms p99 {:.3} ms ({} heartbeats); dispatch p50 {:.1} ms p99 {:.1} ms",
        wrongly_offline.len(),
        heartbeats.quantile(0.5).unwrap_or(f64::NAN) * 1e3,
        heartbeats.quantile(0.99).unwrap_or(f64::NAN) * 1e3,
        heartbeats.count,
        dispatch.p50,
        dispatch.p99
    ));

    let mut restarts = Vec::new();
    for &kind in &options.restarts {
        progress(&format!(
            "restarting the control plane with {}",
            kind.name()
        ));
        let signalled_ms = now_ms();
        let signalled = Instant::now();
        control_plane.process.signal(kind.signal());
        if !control_plane
            .process
            .wait_exit(Duration::from_secs(60))
            .await
        {
            bail!(
                "the control plane did not exit within 60 s of {}",
                kind.name()
            );
        }
        let exit_ms = signalled.elapsed().as_secs_f64() * 1e3;
        let (restarted, _) =
            ControlPlane::start_at(binaries, &data_dir, &listen, &key, Some(&token)).await?;
        let ready_ms = signalled.elapsed().as_secs_f64() * 1e3;
        let ready_at_ms = now_ms();
        drop(std::mem::replace(&mut control_plane, restarted));
        let back =
            wait_all_online(&api, options.agents, signalled_ms, Duration::from_secs(600)).await?;
        let times: Vec<i64> = back
            .values()
            .filter_map(|state| state.connected_at_ms)
            .collect();
        let spread = Spread::of(&times).context("no reconnect times")?;
        let figures = RestartFigures {
            kind,
            exit_ms,
            ready_ms,
            spread,
            first_after_ready_ms: spread.first_ms - ready_at_ms,
            last_after_ready_ms: spread.last_ms - ready_at_ms,
        };
        progress(&format!(
            "{}: exited after {:.0} ms, ready after {:.0} ms; reconnects {} ms .. {} ms after ready, {} distinct ms, at most {} within 10 ms",
            kind.name(),
            figures.exit_ms,
            figures.ready_ms,
            figures.first_after_ready_ms,
            figures.last_after_ready_ms,
            spread.distinct_ms,
            spread.busiest_10ms
        ));
        restarts.push(figures);
        fleet.ensure_running()?;
    }

    let agent_errors = fleet.stop().await;

    let light = if options.light == 0 {
        None
    } else {
        progress(&format!(
            "memory with {} LIGHT simulated agents (real QUIC + mTLS + hello + heartbeats, no runner): enrolling",
            options.light
        ));
        let enrollment = enrollment_token(&api, options.light).await?;
        let identities = fleet::enroll(
            api.base(),
            &enrollment.token,
            &enrollment.ca_sha256,
            &root.join("light"),
            "light-",
            options.light,
            &BTreeMap::new(),
        )
        .await?;
        let server: std::net::SocketAddr = control_plane
            .quic
            .parse()
            .with_context(|| format!("the QUIC address {}", control_plane.quic))?;
        let (figures, light) = light_memory(
            control_plane.pid(),
            identities
                .into_iter()
                .map(|identity| identity.state_dir)
                .collect(),
            server,
            LightServer::Cronium,
        )
        .await?;
        let connected_now = agents_connected(&api).await?;
        light.stop().await;
        progress(&format!(
            "{} light agents welcomed in {:.1} s, {connected_now} connected by the control plane's count, {} lost; RSS {} → {} KiB: {:.1} KiB per connection",
            options.light,
            figures.connect.as_secs_f64(),
            figures.lost,
            figures.before_kib,
            figures.connected_kib,
            figures.per_connection_kib()
        ));
        if connected_now != options.light {
            bail!(
                "the control plane counts {connected_now} connected agents, not the {} light ones",
                options.light
            );
        }
        Some(figures)
    };
    drop(control_plane);
    Ok(LoadFigures {
        agents: options.agents,
        hold: options.hold,
        online_after,
        wrongly_offline,
        polls,
        heartbeats,
        dispatch,
        dispatch_post,
        memory: Memory {
            idle_kib,
            enrolled_kib,
            connected_kib,
            end_of_hold_kib,
        },
        restarts,
        agent_errors,
        light,
    })
}

impl LoadFigures {
    /// Control-plane memory per connected agent, KiB: (connected − enrolled) / agents, the
    /// connections alone.
    pub fn per_connection_kib(&self) -> f64 {
        (self.memory.connected_kib as f64 - self.memory.enrolled_kib as f64) / self.agents as f64
    }

    /// (connected − idle) / agents: connections and their agents' rows and caches.
    pub fn per_agent_kib(&self) -> f64 {
        (self.memory.connected_kib as f64 - self.memory.idle_kib as f64) / self.agents as f64
    }

    /// The summary as markdown.
    pub fn markdown(&self) -> String {
        let ms = |seconds: Option<f64>| {
            seconds.map_or_else(|| "n/a".to_owned(), |s| format!("{:.3} ms", s * 1e3))
        };
        let mut out = format!(
            "### Cronium load ({} agents in one process, agent's own code, jobs by the {}; {:.0} s hold; {} CPUs)\n\n",
            self.agents,
            Executor::SimulatedInProcess.label(),
            self.hold.as_secs_f64(),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        out += "| measure | value |\n|---|---|\n";
        out += &format!(
            "| all online after start | {:.1} s |\n",
            self.online_after.as_secs_f64()
        );
        out += &format!(
            "| wrongly offline or reconnected during the hold ({} readings of all agents) | {} |\n",
            self.polls,
            self.wrongly_offline.len()
        );
        out += &format!(
            "| heartbeat handling on the control plane ({} heartbeats; histogram estimate) | p50 {} · p99 {} · mean {} |\n",
            self.heartbeats.count,
            ms(self.heartbeats.quantile(0.5)),
            ms(self.heartbeats.quantile(0.99)),
            ms(self.heartbeats.mean())
        );
        out += &format!(
            "| dispatch under load: trigger → run `end` ({} single-host runs on random agents) | p50 {:.1} ms · p99 {:.1} ms |\n",
            self.dispatch.count, self.dispatch.p50, self.dispatch.p99
        );
        out += &format!(
            "| dispatch: trigger → `POST` answered | p50 {:.1} ms · p99 {:.1} ms |\n",
            self.dispatch_post.p50, self.dispatch_post.p99
        );
        out += &format!(
            "| control-plane RSS: idle · enrolled · {} connected · end of hold | {} · {} · {} · {} KiB |\n",
            self.agents,
            self.memory.idle_kib,
            self.memory.enrolled_kib,
            self.memory.connected_kib,
            self.memory.end_of_hold_kib
        );
        out += &format!(
            "| control-plane memory per connected agent: connections alone · with enrollment | {:.1} · {:.1} KiB |\n",
            self.per_connection_kib(),
            self.per_agent_kib()
        );
        for restart in &self.restarts {
            out += &format!(
                "| restart ({}): old process exited · new one ready | {:.0} ms · {:.0} ms |\n",
                restart.kind.name(),
                restart.exit_ms,
                restart.ready_ms
            );
            out += &format!(
                "| restart ({}): reconnects after ready: first · last · distinct ms · most within 10 ms | {} ms · {} ms · {} · {} |\n",
                restart.kind.name(),
                restart.first_after_ready_ms,
                restart.last_after_ready_ms,
                restart.spread.distinct_ms,
                restart.spread.busiest_10ms
            );
        }
        if let Some(light) = &self.light {
            out += &format!(
                "| control-plane memory per connected agent, {} LIGHT simulated agents (real QUIC + mTLS + hello + heartbeats, no runner) | {:.1} KiB ({} → {} KiB; connected in {:.1} s; {} lost) |\n",
                light.agents,
                light.per_connection_kib(),
                light.before_kib,
                light.connected_kib,
                light.connect.as_secs_f64(),
                light.lost
            );
        }
        for line in &self.wrongly_offline {
            out += &format!("\nFAILURE: {line}");
        }
        out
    }

    /// The figures as JSON.
    pub fn json(&self) -> Value {
        json!({
            "agents": self.agents,
            "executor": Executor::SimulatedInProcess.key(),
            "hold_seconds": self.hold.as_secs_f64(),
            "online_after_seconds": self.online_after.as_secs_f64(),
            "wrongly_offline": self.wrongly_offline,
            "polls": self.polls,
            "heartbeat_seconds": {
                "count": self.heartbeats.count,
                "p50": self.heartbeats.quantile(0.5),
                "p99": self.heartbeats.quantile(0.99),
                "mean": self.heartbeats.mean(),
                "estimate": "histogram buckets, interpolated",
            },
            "dispatch": self.dispatch.to_json(),
            "dispatch_post": self.dispatch_post.to_json(),
            "memory_kib": {
                "idle": self.memory.idle_kib,
                "enrolled": self.memory.enrolled_kib,
                "connected": self.memory.connected_kib,
                "end_of_hold": self.memory.end_of_hold_kib,
                "per_connection": self.per_connection_kib(),
                "per_agent": self.per_agent_kib(),
            },
            "restarts": self.restarts.iter().map(|restart| json!({
                "signal": restart.kind.name(),
                "exit_ms": restart.exit_ms,
                "ready_ms": restart.ready_ms,
                "first_after_ready_ms": restart.first_after_ready_ms,
                "last_after_ready_ms": restart.last_after_ready_ms,
                "reconnects": restart.spread.count,
                "distinct_ms": restart.spread.distinct_ms,
                "busiest_10ms": restart.spread.busiest_10ms,
            })).collect::<Vec<_>>(),
            "agent_errors": self.agent_errors,
            "light": self.light.map(|light| json!({
                "kind": "LIGHT simulated agents: real QUIC + mTLS + hello + heartbeats, no runner, one shared UDP socket",
                "agents": light.agents,
                "before_kib": light.before_kib,
                "connected_kib": light.connected_kib,
                "per_connection_kib": light.per_connection_kib(),
                "connect_seconds": light.connect.as_secs_f64(),
                "lost": light.lost,
            })),
        })
    }
}
