//! Prometheus metrics: `GET /metrics` at the root of the HTTP listener, in the text exposition
//! format 0.0.4, written by hand.
//!
//! Access: the metrics token (`--metrics-token-file`, a bearer token that opens nothing else, for
//! the scraper) or an admin's credentials; 401 without credentials, 403 for other roles. No
//! label carries a secret or user data: route templates (never concrete paths), methods, status
//! classes, job statuses and reasons.
//!
//! What is counted where:
//! - counters and the claim histogram live in [`Metrics`], held by the store: the store's
//!   writer task adds the jobs settled and claimed after each commit (`store::observe`), the
//!   HTTP middleware [`count_requests`] the answered requests;
//! - gauges are read at scrape time: the agents connected to this replica from the registry,
//!   the agents online on any replica from the registry and the other replicas' presence rows
//!   (`replicas::presence::online_count`), unfinished jobs per status with one indexed query.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::AppState;
use crate::crypto::sha256_hex;
use crate::http::auth::CurrentUser;
use crate::http::error::{ApiError, ApiResult};
use crate::store::observe::Observation;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the claim-latency histogram's buckets.
const CLAIM_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0,
];

/// Upper bounds (seconds) of the heartbeat-handling histogram's buckets.
const HEARTBEAT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The job statuses the queue-depth gauge always reports (0 when none).
const ACTIVE_STATUSES: [&str; 3] = ["queued", "claimed", "running"];

/// The process's counters and histograms. Cheap to update from any task.
pub struct Metrics {
    /// When the control plane started (seconds since the epoch).
    started: f64,
    claim_buckets: [AtomicU64; CLAIM_BUCKETS.len()],
    claim_count: AtomicU64,
    claim_sum_ms: AtomicU64,
    heartbeat_buckets: [AtomicU64; HEARTBEAT_BUCKETS.len()],
    heartbeat_count: AtomicU64,
    heartbeat_sum_us: AtomicU64,
    /// Jobs that reached a final status, by (status, reason).
    outcomes: Mutex<BTreeMap<(String, String), u64>>,
    /// Answered HTTP requests, by (route template, method, status class).
    requests: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs_f64())
                .unwrap_or(0.0),
            claim_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            claim_count: AtomicU64::new(0),
            claim_sum_ms: AtomicU64::new(0),
            heartbeat_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            heartbeat_count: AtomicU64::new(0),
            heartbeat_sum_us: AtomicU64::new(0),
            outcomes: Mutex::new(BTreeMap::new()),
            requests: Mutex::new(BTreeMap::new()),
        }
    }
}

/// What the scrape reads from the running control plane.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Agents connected to this control plane (replica).
    pub agents_connected: usize,
    /// Agents online on any replica (on SQLite, `agents_connected`).
    pub agents_online: usize,
    /// Whether this replica runs the scheduler (`replicas::leader`; always on SQLite).
    pub scheduler_leader: bool,
    /// Unfinished jobs per status; missing statuses count 0.
    pub jobs: Vec<(String, i64)>,
}

impl Metrics {
    /// Adds what one committed write group observed.
    pub fn record(&self, observations: &[Observation]) {
        for observation in observations {
            match observation {
                Observation::Settled {
                    status,
                    reason,
                    count,
                } => {
                    let key = (
                        status.clone(),
                        reason.clone().unwrap_or_else(|| "none".to_owned()),
                    );
                    *lock(&self.outcomes).entry(key).or_default() += count;
                }
                Observation::Claimed { waited_ms } => self.observe_claim(*waited_ms),
            }
        }
    }

    fn observe_claim(&self, waited_ms: i64) {
        // A clock step backwards must not make a negative observation.
        let waited_ms = waited_ms.max(0) as u64;
        let seconds = waited_ms as f64 / 1000.0;
        for (bound, bucket) in CLAIM_BUCKETS.iter().zip(&self.claim_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.claim_sum_ms.fetch_add(waited_ms, Ordering::Relaxed);
        self.claim_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observes the handling of one agent heartbeat (`agents::session`: from the decoded
    /// message to the written acknowledgement).
    pub fn observe_heartbeat(&self, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        for (bound, bucket) in HEARTBEAT_BUCKETS.iter().zip(&self.heartbeat_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.heartbeat_sum_us.fetch_add(micros, Ordering::Relaxed);
        self.heartbeat_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answered request.
    pub fn count_request(&self, route: &str, method: &str, status: StatusCode) {
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        *lock(&self.requests)
            .entry((route.to_owned(), method.to_owned(), class))
            .or_default() += 1;
    }

    /// The whole exposition.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs_f64())
            .unwrap_or(self.started);

        family(
            &mut out,
            "cronium_build_info",
            "gauge",
            "Always 1; the labels name the running build.",
        );
        let _ = writeln!(
            out,
            "cronium_build_info{{version=\"{}\",target=\"{}\",protocol=\"{}\"}} 1",
            escape(env!("CARGO_PKG_VERSION")),
            escape(cronium_agent::TARGET),
            cronium_protocol::PROTOCOL_VERSION
        );
        family(
            &mut out,
            "cronium_start_time_seconds",
            "gauge",
            "When this control plane started, in seconds since the Unix epoch.",
        );
        let _ = writeln!(out, "cronium_start_time_seconds {}", self.started);
        family(
            &mut out,
            "cronium_uptime_seconds",
            "gauge",
            "Seconds since this control plane started.",
        );
        let _ = writeln!(
            out,
            "cronium_uptime_seconds {}",
            (now - self.started).max(0.0)
        );

        family(
            &mut out,
            "cronium_agents_connected",
            "gauge",
            "Agents connected to this control plane (this replica) over QUIC now.",
        );
        let _ = writeln!(out, "cronium_agents_connected {}", gauges.agents_connected);

        family(
            &mut out,
            "cronium_agents_online",
            "gauge",
            "Agents online now, not revoked, connected to any replica of this control plane (read from the database at each scrape; with one control plane, the same as cronium_agents_connected).",
        );
        let _ = writeln!(out, "cronium_agents_online {}", gauges.agents_online);

        family(
            &mut out,
            "cronium_scheduler_leader",
            "gauge",
            "1 if this control plane (replica) runs the scheduler now, else 0.",
        );
        let _ = writeln!(
            out,
            "cronium_scheduler_leader {}",
            u8::from(gauges.scheduler_leader)
        );

        family(
            &mut out,
            "cronium_jobs",
            "gauge",
            "Unfinished jobs by status (queued: waiting for a claim; claimed and running: an attempt holds a lease).",
        );
        for status in ACTIVE_STATUSES {
            let jobs = gauges
                .jobs
                .iter()
                .find(|(name, _)| name == status)
                .map_or(0, |(_, jobs)| *jobs);
            let _ = writeln!(out, "cronium_jobs{{status=\"{status}\"}} {jobs}");
        }

        family(
            &mut out,
            "cronium_job_claim_wait_seconds",
            "histogram",
            "Time from a job being queued (created, or re-queued for another attempt) to its claim, observed at each claim; includes deliberate delays (retry backoff, rollout batches, concurrency limits, offline agents).",
        );
        for (bound, bucket) in CLAIM_BUCKETS.iter().zip(&self.claim_buckets) {
            let _ = writeln!(
                out,
                "cronium_job_claim_wait_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.claim_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "cronium_job_claim_wait_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "cronium_job_claim_wait_seconds_sum {}",
            self.claim_sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "cronium_job_claim_wait_seconds_count {count}");

        family(
            &mut out,
            "cronium_heartbeat_seconds",
            "histogram",
            "The control plane's handling of one agent heartbeat: from the decoded message to the written acknowledgement (the agent's leases renewed in between).",
        );
        for (bound, bucket) in HEARTBEAT_BUCKETS.iter().zip(&self.heartbeat_buckets) {
            let _ = writeln!(
                out,
                "cronium_heartbeat_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.heartbeat_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "cronium_heartbeat_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "cronium_heartbeat_seconds_sum {}",
            self.heartbeat_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "cronium_heartbeat_seconds_count {count}");

        family(
            &mut out,
            "cronium_jobs_finished_total",
            "counter",
            "Jobs that reached a final status since this control plane started, by status and reason (none for completed jobs; rollout_stopped and offline for skipped ones).",
        );
        for ((status, reason), jobs) in lock(&self.outcomes).iter() {
            let _ = writeln!(
                out,
                "cronium_jobs_finished_total{{status=\"{}\",reason=\"{}\"}} {jobs}",
                escape(status),
                escape(reason)
            );
        }

        family(
            &mut out,
            "cronium_http_requests_total",
            "counter",
            "HTTP requests answered, by route template (unmatched: no route), method and status class.",
        );
        for ((route, method, class), requests) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "cronium_http_requests_total{{route=\"{}\",method=\"{}\",class=\"{class}\"}} {requests}",
                escape(route),
                escape(method)
            );
        }
        out
    }
}

/// A poisoned lock only means a panic elsewhere while counting; the counts are still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\"));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, double quote, line feed).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware of the API router: counts every answered request by its route template.
pub async fn count_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    // A nested router's fallback matches a wildcard axum names itself: no route either.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .filter(|path| !path.contains("__private__"))
        .unwrap_or("unmatched")
        .to_owned();
    // Any token is a valid method: only the standard ones become labels, so no client can grow
    // the counter's label set.
    let method = match *request.method() {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => request.method().as_str(),
        _ => "other",
    }
    .to_owned();
    let response = next.run(request).await;
    state
        .store
        .metrics()
        .count_request(&route, &method, response.status());
    response
}

/// `GET /metrics`: for the metrics token (`--metrics-token-file`) or an admin's credentials.
async fn scrape(State(state): State<AppState>, _caller: Scraper) -> ApiResult<Response> {
    let jobs = state.store.active_job_counts().await?;
    let agents_online = crate::replicas::presence::online_count(&state).await?;
    let gauges = Gauges {
        agents_connected: state.registry.len(),
        agents_online,
        scheduler_leader: state.replicas.is_leader(),
        jobs,
    };
    Ok((
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.store.metrics().render(&gauges),
    )
        .into_response())
}

/// A caller allowed to scrape: the metrics token (compared by its SHA-256, in constant time),
/// else the API's own credentials with the admin role (401 without credentials, 403 for other
/// roles).
struct Scraper;

impl FromRequestParts<AppState> for Scraper {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Scraper> {
        authorize(parts, state).await.map(|()| Scraper)
    }
}

async fn authorize(parts: &mut Parts, state: &AppState) -> ApiResult<()> {
    if let Some(expected) = &state.config.metrics_token_sha256 {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|token| sha256_hex(token.trim().as_bytes()));
        if let Some(presented) = presented
            && constant_time_eq(presented.as_bytes(), expected.as_bytes())
        {
            return Ok(());
        }
    }
    let user = CurrentUser::from_request_parts(parts, state).await?;
    user.require_admin()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the metrics token from `path`: its first line, at least 32 characters; the SHA-256
/// (hex) is what the control plane keeps.
pub fn load_token_sha256(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the metrics token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 32 {
        bail!(
            "the metrics token in {} must be at least 32 characters (e.g. `openssl rand -hex 32`)",
            path.display()
        );
    }
    Ok(sha256_hex(token.as_bytes()))
}

/// `GET /metrics`, merged at the root of the HTTP API's router.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

#[cfg(test)]
mod tests;
