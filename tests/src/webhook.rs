//! A webhook endpoint on loopback standing in for Slack, Discord or any webhook receiver: it
//! answers every request 200 and hands the request bodies to the test, in arrival order.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Largest request accepted (headers and body).
const MAX_REQUEST: usize = 1 << 20;

/// The listener; dropping it stops accepting.
pub struct WebhookListener {
    url: String,
    bodies: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookListener {
    /// Binds 127.0.0.1 on a free port; the URL's path is `/hook`.
    pub async fn start() -> Result<WebhookListener> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let (sender, bodies) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sender = sender.clone();
                tokio::spawn(async move {
                    if let Some(body) = serve(stream).await {
                        let _ = sender.send(body);
                    }
                });
            }
        });
        Ok(WebhookListener { url, bodies, task })
    }

    /// The URL to configure as the tool's endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next request body, waiting up to `timeout`.
    pub async fn next_body(&mut self, timeout: Duration) -> Result<String> {
        tokio::time::timeout(timeout, self.bodies.recv())
            .await
            .context("no webhook request arrived in time")?
            .context("the webhook listener stopped")
    }
}

impl Drop for WebhookListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (Content-Length framing), answers 200 and returns its body.
async fn serve(mut stream: tokio::net::TcpStream) -> Option<String> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 8192];
    let body = loop {
        let read = stream.read(&mut buffer).await.ok()?;
        if read == 0 || request.len() > MAX_REQUEST {
            return None;
        }
        request.extend_from_slice(&buffer[..read]);
        let Some(end) = request.windows(4).position(|window| window == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&request[..end]).into_owned();
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let body = &request[end + 4..];
        if body.len() >= length {
            break String::from_utf8_lossy(&body[..length]).into_owned();
        }
    };
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    Some(body)
}
