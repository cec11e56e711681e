//! A small client of the HTTP API for the CLI's operator commands.
//!
//! The server URL and token come from `--server`/`--token` (or `CRONIUM_URL`/`CRONIUM_TOKEN`),
//! else from `cli.json` that `cronium dev` writes into its data directory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{RunArgs, default_data_dir, parse_labels};

/// Name of the file `cronium dev` writes with the URL and a token for the CLI.
pub const CLI_CONFIG_FILE: &str = "cli.json";

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// URL of the control plane.
    #[arg(long = "server", env = "CRONIUM_URL")]
    server: Option<String>,
    /// API token (see `cronium token create`).
    #[arg(long, env = "CRONIUM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory of a local `cronium dev`, whose cli.json supplies the URL and token when not given.
    #[arg(long, env = "CRONIUM_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
}

/// An authenticated API client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        let saved: Option<Value> = std::fs::read(self.data_dir.join(CLI_CONFIG_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let from_saved = |key: &str| {
            saved
                .as_ref()
                .and_then(|saved| saved[key].as_str().map(str::to_string))
        };
        let base = self.server.clone().or_else(|| from_saved("url")).context(
            "no control plane given: use --server URL (or CRONIUM_URL), or run `cronium dev` with the same --data-dir",
        )?;
        let token = self.token.clone().or_else(|| from_saved("token")).context(
            "no API token given: use --token (or CRONIUM_TOKEN); create one with `cronium token create --user NAME`",
        )?;
        Ok(Client {
            http: http_client()?,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }
}

/// A reqwest client on the ring TLS provider.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_client_config()?)
        .build()
        .context("building the HTTP client")
}

/// A TLS client configuration on the ring provider trusting the system's CA bundle.
pub fn tls_client_config() -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(certificates) = std::fs::read("/etc/ssl/certs/ca-certificates.crt") {
        use rustls_pki_types::pem::PemObject;
        for certificate in rustls_pki_types::CertificateDer::pem_slice_iter(&certificates).flatten()
        {
            let _ = roots.add(certificate);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tls)
}

/// The largest server-sent event [`Client::events`] accepts.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn decode(response: reqwest::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let body: Value = if status == reqwest::StatusCode::NO_CONTENT {
            Value::Null
        } else {
            response.json().await.unwrap_or(Value::Null)
        };
        if status.is_success() {
            return Ok(body);
        }
        match body["error"]["message"].as_str() {
            Some(message) => match body["error"]["field"].as_str() {
                Some(field) => bail!("{field}: {message} (HTTP {status})"),
                None => bail!("{message} (HTTP {status})"),
            },
            None => bail!("the server answered HTTP {status}"),
        }
    }

    /// Sends an authenticated request with an optional JSON body.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = self.url(path);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Client::decode(self.send(reqwest::Method::GET, path, None).await?).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Client::decode(self.send(reqwest::Method::POST, path, Some(body)).await?).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Client::decode(self.send(reqwest::Method::PUT, path, Some(body)).await?).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        Client::decode(self.send(reqwest::Method::DELETE, path, None).await?).await
    }

    /// POSTs `body` and hands each JSON line of a streamed answer (`application/x-ndjson`) to
    /// `on_line` as it arrives; an error answer becomes the error.
    pub async fn post_lines(
        &self,
        path: &str,
        body: &Value,
        mut on_line: impl FnMut(Value),
    ) -> anyhow::Result<()> {
        let response = self.send(reqwest::Method::POST, path, Some(body)).await?;
        if !response.status().is_success() {
            Client::decode(response).await?;
            bail!("the server refused the request");
        }
        let mut stream = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.context("reading the answer")?);
            while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(value) = serde_json::from_slice(&line[..end]) {
                    on_line(value);
                }
            }
        }
        Ok(())
    }

    /// GETs a server-sent event stream and hands each event (its name and JSON data) to
    /// `on_event` until that returns a value, which is returned; `None` when the stream ended
    /// first. An error answer becomes the error.
    pub async fn events<T>(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, Value) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<Option<T>> {
        let response = self.send(reqwest::Method::GET, path, None).await?;
        if !response.status().is_success() {
            Client::decode(response).await?;
            bail!("the server refused the request");
        }
        let mut body = response.bytes_stream();
        let mut buffer = Vec::new();
        while let Some(bytes) = body.next().await {
            buffer.extend_from_slice(&bytes.context("reading the event stream")?);
            while let Some(end) = buffer.windows(2).position(|window| window == b"\n\n") {
                let event: Vec<u8> = buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let mut kind = "message";
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        kind = value.trim();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                let Ok(value) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                if let Some(done) = on_event(kind, value)? {
                    return Ok(Some(done));
                }
            }
            // A log event carries at most a 1 MiB page (JSON-escaped): more is not an event.
            if buffer.len() > MAX_EVENT_BYTES {
                bail!("the event stream sent an oversized event");
            }
        }
        Ok(None)
    }

    /// Follows a job's logs, writing output as it arrives; returns the final job.
    pub async fn follow(&self, job_id: &str, prefix: Option<&str>) -> anyhow::Result<Value> {
        let mut at_line_start = true;
        let end = self
            .events(
                &format!("/jobs/{job_id}/logs?follow=true"),
                |kind, value| match kind {
                    "log" => {
                        let text = value["data"].as_str().unwrap_or_default();
                        let mut out = std::io::stdout().lock();
                        match prefix {
                            None => out.write_all(text.as_bytes())?,
                            Some(prefix) => {
                                for piece in text.split_inclusive('\n') {
                                    if at_line_start {
                                        write!(out, "[{prefix}] ")?;
                                    }
                                    out.write_all(piece.as_bytes())?;
                                    at_line_start = piece.ends_with('\n');
                                }
                            }
                        }
                        out.flush()?;
                        Ok(None)
                    }
                    "end" => Ok(Some(value)),
                    "error" => bail!(
                        "{}",
                        value["message"].as_str().unwrap_or("the log stream failed")
                    ),
                    _ => Ok(None),
                },
            )
            .await?;
        end.context("the log stream ended before the job did")
    }
}

/// `cronium run`.
pub async fn run_event(args: RunArgs) -> anyhow::Result<ExitCode> {
    let client = args.api.client()?;
    let event = match client.get(&format!("/events/{}", args.event)).await {
        Ok(event) => event,
        Err(_) => {
            let events = client.get("/events").await?;
            events
                .as_array()
                .and_then(|events| {
                    events
                        .iter()
                        .find(|event| event["name"] == args.event.as_str())
                        .cloned()
                })
                .with_context(|| format!("no event with id or name {:?}", args.event))?
        }
    };
    let event_id = event["id"].as_str().context("event without id")?;
    let mut body = json!({});
    if let Some(input) = &args.input {
        body["input"] = serde_json::from_str(input).context("--input is not valid JSON")?;
    }
    if let Some(target) = &args.target {
        let agent = target
            .strip_prefix("agent:")
            .with_context(|| format!("--target {target:?} must look like agent:ID_OR_NAME"))?;
        body["targets"] = json!({"agents": [agent]});
    } else if !args.labels.is_empty() {
        body["targets"] = json!({"labels": parse_labels(&args.labels)?});
    }
    let mut rollout = serde_json::Map::new();
    for (key, value) in [
        ("batch_size", args.batch_size),
        ("batch_percent", args.batch_percent),
        ("max_failures", args.max_failures),
    ] {
        if let Some(value) = value {
            rollout.insert(key.into(), json!(value));
        }
    }
    if !rollout.is_empty() {
        body["rollout"] = Value::Object(rollout);
    }
    let run = client
        .post(&format!("/events/{event_id}/runs"), &body)
        .await?;
    // Each job runs on an agent, a server over SSH, or the control plane (HTTP request and tool
    // action events with `executor: control_plane`).
    let jobs: Vec<(String, String)> = run["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|job| {
            let runner = match (job["agent_id"].as_str(), job["server_id"].as_str()) {
                (Some(agent), _) => format!("on agent {agent}"),
                (None, Some(server)) => format!("on server {server}"),
                (None, None) => "on the control plane".to_string(),
            };
            Some((job["id"].as_str()?.to_string(), runner))
        })
        .collect();
    let run_id = run["run_id"].as_str().unwrap_or_default().to_string();
    if !args.wait {
        println!("run {run_id}");
        for (job_id, runner) in &jobs {
            println!("job {job_id} {runner}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("run {run_id}: {} job(s)", jobs.len());
    if let [(job_id, _)] = jobs.as_slice() {
        let job = client.follow(job_id, None).await?;
        return Ok(job_exit_code(&job));
    }
    // Several hosts (or a server): a live per-host table, then the grouped outputs.
    super::rollout::watch(&client, &run_id).await
}

/// The exit code `cronium run --wait` ends with for one job.
fn job_exit_code(job: &Value) -> ExitCode {
    match (job["status"].as_str(), job["exit_code"].as_i64()) {
        (Some("completed"), _) => ExitCode::SUCCESS,
        (_, Some(code)) if (1..=255).contains(&code) => ExitCode::from(code as u8),
        (status, _) => {
            eprintln!(
                "job {}: {}",
                status.unwrap_or("ended"),
                job["reason"].as_str().unwrap_or("unknown reason")
            );
            ExitCode::FAILURE
        }
    }
}
