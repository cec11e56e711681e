//! HTTP request events run by a real agent (`executor: agent`): the agent process makes the
//! request to a real HTTP server on 127.0.0.1 written in this test; what arrives (method,
//! headers with a secret filled in, body with the input), the result and the log with the secret
//! masked, an unexpected status, a timeout, and a cancel of a request in flight.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cronium_e2e::TestCluster;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// One request the server received.
#[derive(Debug)]
struct Received {
    /// The request line, e.g. `POST /echo HTTP/1.1`.
    line: String,
    /// Header lines, lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
}

/// A plain HTTP/1.1 server on 127.0.0.1 (one request per connection): `/echo` answers 200 with
/// the `authorization` header and the body; `/status/N` answers N; `/slow` never answers.
struct Server {
    base: String,
    received: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start() -> Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (sender, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, sender.clone()));
            }
        });
        Ok(Server {
            base,
            received,
            task,
        })
    }

    async fn next(&mut self) -> Result<Received> {
        tokio::time::timeout(Duration::from_secs(30), self.received.recv())
            .await
            .context("no request reached the server in time")?
            .context("the server stopped")
    }
}

async fn serve(mut stream: tokio::net::TcpStream, sender: mpsc::UnboundedSender<Received>) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 8192];
    let (head, body_start) = loop {
        let Ok(read) = stream.read(&mut buffer).await else {
            return;
        };
        if read == 0 || request.len() > 1 << 20 {
            return;
        }
        request.extend_from_slice(&buffer[..read]);
        if let Some(end) = request.windows(4).position(|window| window == b"\r\n\r\n") {
            break (
                String::from_utf8_lossy(&request[..end]).into_owned(),
                end + 4,
            );
        }
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = request[body_start..].to_vec();
    while body.len() < length {
        let Ok(read) = stream.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            break;
        }
        body.extend_from_slice(&buffer[..read]);
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let path = line.split(' ').nth(1).unwrap_or_default().to_string();
    let authorization = headers
        .iter()
        .find(|(name, _)| name == "authorization")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    let answer_body = format!("auth={authorization}\nbody={body}\n");
    let _ = sender.send(Received {
        line,
        headers,
        body,
    });
    let (status, answer_body) = if let Some(code) = path.strip_prefix("/status/") {
        (format!("{code} Whatever"), format!("answer {code}"))
    } else if path == "/slow" {
        // Holds the connection until the client goes away (or the test ends).
        let _ = stream.read(&mut buffer).await;
        return;
    } else {
        ("200 OK".to_string(), answer_body)
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\nx-reply: yes\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer_body}",
        answer_body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Creates an `http_request` event for `agent` and returns its id.
async fn http_event(
    cluster: &TestCluster,
    name: &str,
    agent: &str,
    http: Value,
    extra: Value,
) -> Result<String> {
    let mut body = json!({
        "name": format!("{name}-{}", cluster.marker()),
        "kind": "http_request",
        "executor": "agent",
        "targets": {"agents": [agent]},
        "http": http,
    });
    for (key, value) in extra.as_object().context("extra fields")? {
        body[key] = value.clone();
    }
    let event = cluster
        .api()
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, "create the http event")?;
    Ok(event["id"].as_str().context("event id")?.to_string())
}

fn result_of(job: &Value) -> Result<Value> {
    Ok(match &job["result"] {
        Value::String(text) => serde_json::from_str(text)?,
        other => other.clone(),
    })
}

#[tokio::test]
async fn an_agent_makes_the_request_fills_in_its_secret_and_masks_it() -> Result<()> {
    let canary = format!("canary-{}-token", std::process::id());
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("http-agent").await?;
    let mut server = Server::start().await?;

    let event = http_event(
        &cluster,
        "echo",
        &agent.id,
        json!({
            "method": "PUT",
            "url": format!("{}/echo", server.base),
            "headers": {"Authorization": "Bearer {{secret:API_TOKEN}}", "X-Job": "cronium"},
            "body": "{\"got\": {{input}}}",
        }),
        json!({"secret_env": {"API_TOKEN": canary}}),
    )
    .await?;
    let job_id = cluster
        .run_event(&event, Some(json!({"deploy": 42})))
        .await?
        .single_job()?;
    let received = server.next().await?;
    ensure!(received.line == "PUT /echo HTTP/1.1", "{received:?}");
    ensure!(
        received
            .headers
            .contains(&("authorization".into(), format!("Bearer {canary}")))
            && received
                .headers
                .contains(&("x-job".into(), "cronium".into())),
        "{received:?}"
    );
    ensure!(
        received.body == "{\"got\": {\"deploy\":42}}",
        "{received:?}"
    );

    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    let log = String::from_utf8(cluster.job_logs(&job_id).await?)?;
    ensure!(job["status"] == "completed", "job: {job}\nlog:\n{log}");
    ensure!(job["agent_id"] == agent.id.as_str(), "{job}");
    let result = result_of(&job)?;
    ensure!(
        result["status"] == 200 && result["headers"]["x-reply"] == "yes",
        "{result}"
    );
    let body = result["body"].as_str().context("result body")?;
    ensure!(body.contains("auth=Bearer ***"), "{body}");
    ensure!(log.contains("PUT ") && log.contains("HTTP 200 OK"), "{log}");
    ensure!(log.contains("auth=Bearer ***"), "{log}");
    for text in [job.to_string(), log.clone()] {
        ensure!(!text.contains(&canary), "the secret leaked: {text}");
    }
    ensure!(
        cluster.logs_containing(&canary).is_empty(),
        "a process log holds the secret"
    );

    // A status that is not expected fails the job, with the answer still in the result.
    let failing = http_event(
        &cluster,
        "status",
        &agent.id,
        json!({"method": "GET", "url": format!("{}/status/503", server.base)}),
        json!({}),
    )
    .await?;
    let job_id = cluster.run_event(&failing, None).await?.single_job()?;
    server.next().await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        job["status"] == "failed" && job["reason"] == "http_status",
        "{job}"
    );
    ensure!(result_of(&job)?["status"] == 503, "{job}");

    // The spec's timeout.
    let slow = http_event(
        &cluster,
        "slow",
        &agent.id,
        json!({"method": "GET", "url": format!("{}/slow", server.base), "timeout_seconds": 1}),
        json!({}),
    )
    .await?;
    let job_id = cluster.run_event(&slow, None).await?.single_job()?;
    server.next().await?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(
        job["status"] == "failed" && job["reason"] == "timeout",
        "{job}"
    );

    // A cancel stops a request in flight.
    let hanging = http_event(
        &cluster,
        "hanging",
        &agent.id,
        json!({"method": "GET", "url": format!("{}/slow", server.base), "timeout_seconds": 600}),
        json!({}),
    )
    .await?;
    let job_id = cluster.run_event(&hanging, None).await?.single_job()?;
    server.next().await?;
    cluster
        .api()
        .post(&format!("/api/v1/jobs/{job_id}/cancel"), &json!({}))
        .await?
        .expect_status(202, "cancel")?;
    let job = cluster.wait_job_final(&job_id, JOB_TIMEOUT).await?;
    ensure!(job["status"] == "cancelled", "{job}");
    Ok(())
}
