//! A small client for the control plane's HTTP API, including the server-sent-events log follower.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// How long an ordinary API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long following one job's log may take (the benchmark's jobs are no-ops).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest SSE buffer accepted before the stream is considered broken.
const MAX_SSE_BUFFER: usize = 4 * 1024 * 1024;

/// Nanoseconds since the Unix epoch (wall clock, comparable with `date +%s%N`).
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i128)
        .unwrap_or_default()
}

/// An authenticated API client.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// What following a job's log produced.
pub struct Followed {
    /// The log's text, concatenated from the `log` events.
    pub log: String,
    /// The job as sent with the `end` event.
    pub job: Value,
    /// When the first `log` event arrived (wall clock, ns).
    pub first_log_ns: Option<i128>,
    /// When the `end` event arrived (wall clock, ns).
    pub end_ns: i128,
}

/// What following a run's events produced.
pub struct FollowedRun {
    /// The run's summary sent with the `end` event.
    pub end: Value,
    /// When each job was first seen final (wall clock, ns): in the first summary, or in a `job`
    /// event.
    pub final_seen_ns: Vec<i128>,
    /// Events received (`run`, `job`, `end`).
    pub events: usize,
}

/// A triggered run's first job.
pub struct Triggered {
    /// The job's id.
    pub job_id: String,
    /// When the POST's response arrived (wall clock, ns).
    pub answered_ns: i128,
}

impl Api {
    /// A client for the control plane at `base` (e.g. `http://127.0.0.1:1234`) acting with the
    /// API token `token`. Only plain HTTP is used; rustls (ring) is configured because the
    /// workspace's reqwest has no default TLS provider.
    pub fn new(base: &str, token: &str) -> anyhow::Result<Api> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("cannot configure rustls")?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api {
            client,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// The control plane's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API token (for clients other than this one, e.g. the terminal WebSocket).
    pub fn token(&self) -> &str {
        &self.token
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("{what}: request failed"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("{what}: cannot read the response"))?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice(&body).with_context(|| format!("{what}: the response is not JSON"))
    }

    /// `GET {base}/api/v1{path}`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        self.send(self.client.get(&url), &format!("GET {path}"))
            .await
    }

    /// `DELETE {base}/api/v1{path}` (the answer has no body).
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let url = format!("{}/api/v1{path}", self.base);
        let response = self
            .client
            .delete(&url)
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("DELETE {path}: request failed"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("DELETE {path}: HTTP {status}: {body}");
        }
        Ok(())
    }

    /// The HTTP client (for unauthenticated downloads from the same control plane).
    pub fn http(&self) -> &reqwest::Client {
        &self.client
    }

    /// `POST {base}/api/v1{path}` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        self.send(self.client.post(&url).json(body), &format!("POST {path}"))
            .await
    }

    /// Creates a bash event targeting the agent named `agent` and returns its id.
    pub async fn create_event(
        &self,
        name: &str,
        script: &str,
        agent: &str,
    ) -> anyhow::Result<String> {
        let event = self
            .post(
                "/events",
                &json!({
                    "name": name,
                    "kind": "bash",
                    "script": script,
                    "targets": {"agents": [agent]},
                    "timeout_seconds": 60,
                }),
            )
            .await?;
        event["id"]
            .as_str()
            .map(str::to_owned)
            .context("POST /events: no id in the response")
    }

    /// Creates a host event of `kind` (`bash`, `python`, `nodejs`) with the environment `env`
    /// and a timeout of `timeout_seconds`, targeting the agent named `agent`; returns its id.
    pub async fn create_host_event(
        &self,
        name: &str,
        kind: &str,
        script: &str,
        env: &[(&str, String)],
        timeout_seconds: u64,
        agent: &str,
    ) -> anyhow::Result<String> {
        let env: serde_json::Map<String, Value> = env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), json!(value)))
            .collect();
        let event = self
            .post(
                "/events",
                &json!({
                    "name": name,
                    "kind": kind,
                    "script": script,
                    "env": env,
                    "targets": {"agents": [agent]},
                    "timeout_seconds": timeout_seconds,
                }),
            )
            .await?;
        event["id"]
            .as_str()
            .map(str::to_owned)
            .context("POST /events: no id in the response")
    }

    /// Creates a bash event running `script` in a Docker container of `image` (memory and PID
    /// limits, no network) on the agent named `agent`, and returns its id.
    pub async fn create_docker_event(
        &self,
        name: &str,
        script: &str,
        image: &str,
        memory_mb: u32,
        pids: u32,
        agent: &str,
    ) -> anyhow::Result<String> {
        let event = self
            .post(
                "/events",
                &json!({
                    "name": name,
                    "kind": "bash",
                    "script": script,
                    "runtime": "docker",
                    "image": image,
                    "limits": {"memory_mb": memory_mb, "pids": pids},
                    "network": "none",
                    "targets": {"agents": [agent]},
                    "timeout_seconds": 60,
                }),
            )
            .await?;
        event["id"]
            .as_str()
            .map(str::to_owned)
            .context("POST /events: no id in the response")
    }

    /// Triggers a run of `event_id` and returns its (only) job.
    pub async fn trigger(&self, event_id: &str) -> anyhow::Result<Triggered> {
        let run = self
            .post(&format!("/events/{event_id}/runs"), &json!({}))
            .await?;
        let answered_ns = now_ns();
        let job_id = run["jobs"][0]["id"]
            .as_str()
            .with_context(|| format!("POST /events/{{id}}/runs: no job in {run}"))?
            .to_owned();
        Ok(Triggered {
            job_id,
            answered_ns,
        })
    }

    /// Follows a job's log over server-sent events until the `end` event.
    pub async fn follow(&self, job_id: &str) -> anyhow::Result<Followed> {
        self.follow_for(job_id, FOLLOW_TIMEOUT).await
    }

    /// [`Api::follow`] for jobs that may take up to `timeout`.
    pub async fn follow_for(&self, job_id: &str, timeout: Duration) -> anyhow::Result<Followed> {
        let mut log = String::new();
        let mut first_log_ns = None;
        let path = format!("/api/v1/jobs/{job_id}/logs?follow=true");
        let work = self.follow_events(&path, "the log stream", |event, data| match event {
            "log" => {
                first_log_ns.get_or_insert_with(now_ns);
                let chunk: Value = serde_json::from_str(data)
                    .with_context(|| format!("a log event is not JSON: {data}"))?;
                log.push_str(chunk["data"].as_str().unwrap_or_default());
                Ok(None)
            }
            "end" => {
                let end_ns = now_ns();
                let job = serde_json::from_str(data)
                    .with_context(|| format!("the end event is not JSON: {data}"))?;
                Ok(Some(Followed {
                    log: std::mem::take(&mut log),
                    job,
                    first_log_ns,
                    end_ns,
                }))
            }
            _ => Ok(None),
        });
        tokio::time::timeout(timeout, work)
            .await
            .with_context(|| format!("following job {job_id} took longer than {timeout:?}"))?
    }

    /// Follows a run's changes over server-sent events (`GET /runs/{id}/events`) until the `end`
    /// event, noting when each job was first seen in a final state.
    pub async fn follow_run(&self, run_id: &str, timeout: Duration) -> anyhow::Result<FollowedRun> {
        let mut final_seen = std::collections::HashMap::new();
        let mut events = 0;
        // When each job was first seen in a final state.
        let note_final = |seen: &mut std::collections::HashMap<String, i128>, job: &Value, at| {
            let final_status = matches!(
                job["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            );
            if final_status && let Some(id) = job["id"].as_str() {
                seen.entry(id.to_owned()).or_insert(at);
            }
        };
        let path = format!("/api/v1/runs/{run_id}/events");
        let work = self.follow_events(&path, "the run's event stream", |event, data| {
            events += 1;
            let at = now_ns();
            let value: Value = serde_json::from_str(data)
                .with_context(|| format!("a {event} event is not JSON: {data}"))?;
            match event {
                "run" => {
                    for job in value["jobs"].as_array().into_iter().flatten() {
                        note_final(&mut final_seen, job, at);
                    }
                }
                "job" => note_final(&mut final_seen, &value, at),
                "end" => {
                    for job in value["jobs"].as_array().into_iter().flatten() {
                        note_final(&mut final_seen, job, at);
                    }
                    return Ok(Some(FollowedRun {
                        end: value,
                        final_seen_ns: std::mem::take(&mut final_seen).into_values().collect(),
                        events,
                    }));
                }
                _ => {}
            }
            Ok(None)
        });
        tokio::time::timeout(timeout, work)
            .await
            .with_context(|| format!("following run {run_id} took longer than {timeout:?}"))?
    }

    /// Reads the server-sent events of `GET path` (named `what` in errors), giving each named
    /// event's name and data to `on_event` until it returns a value. An `error` event, a broken
    /// or oversized stream, or its end before that are errors.
    async fn follow_events<T>(
        &self,
        path: &str,
        what: &str,
        mut on_event: impl FnMut(&str, &str) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("GET {path}: request failed"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("GET {path}: HTTP {status}: {body}");
        }
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(bytes) = body.next().await {
            buffer.extend_from_slice(&bytes.with_context(|| format!("{what} broke"))?);
            let mut consumed = 0;
            while let Some(end) = find_event_end(&buffer[consumed..]) {
                let block = &buffer[consumed..consumed + end];
                consumed += end;
                let (event, data) = parse_event(block);
                match event.as_deref() {
                    None => {}
                    Some("error") => bail!("{what} reported an error: {data}"),
                    Some(event) => {
                        if let Some(done) = on_event(event, &data)? {
                            return Ok(done);
                        }
                    }
                }
            }
            buffer.drain(..consumed);
            if buffer.len() > MAX_SSE_BUFFER {
                bail!("{what} sent an oversized event");
            }
        }
        bail!("{what} ended without an end event")
    }
}

/// The length up to and including the blank line that ends the first complete event in `buffer`.
/// One pass that stops at the first blank line: a burst of events in one read costs time in
/// proportion to its size (searching the whole buffer for each event would be quadratic, and
/// would show up in the fan-out's measured times).
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    (0..buffer.len()).find_map(|at| {
        let rest = &buffer[at..];
        if rest.starts_with(b"\n\n") {
            Some(at + 2)
        } else if rest.starts_with(b"\r\n\r\n") {
            Some(at + 4)
        } else {
            None
        }
    })
}

/// The event name and the (joined) data of one SSE event block.
fn parse_event(block: &[u8]) -> (Option<String>, String) {
    let text = String::from_utf8_lossy(block);
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            event = Some(value.trim_start().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    (event, data.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sse_events() {
        let buffer =
            b"event: log\ndata: {\"data\":\"1\\n\"}\n\n: keep-alive\n\nevent: end\ndata: {}\n\n";
        let end = find_event_end(buffer).unwrap();
        let (event, data) = parse_event(&buffer[..end]);
        assert_eq!(event.as_deref(), Some("log"));
        assert_eq!(data, "{\"data\":\"1\\n\"}");
        let rest = &buffer[end..];
        let end2 = find_event_end(rest).unwrap();
        assert_eq!(parse_event(&rest[..end2]).0, None);
        assert_eq!(parse_event(&rest[end2..]).0.as_deref(), Some("end"));
    }
}
