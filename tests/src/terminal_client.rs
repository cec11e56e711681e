//! [`Terminal`]: one viewer of a terminal session over the real WebSocket
//! (`GET /api/v1/agents/{id}/terminal`), authenticated with the cluster's admin token, sent to
//! wherever the harness's API requests go (e.g. through a [`crate::netns::TcpForwarder`]).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::TestCluster;

/// Bound of every wait of a [`Terminal`] unless the caller gives one.
const DEADLINE: Duration = Duration::from_secs(60);

/// One terminal viewer; the terminal bytes it received are kept in order.
pub struct Terminal {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    output: Vec<u8>,
    session: String,
}

impl Terminal {
    /// Opens `GET /api/v1/agents/{id}/terminal` and waits for the session id.
    pub async fn open(cluster: &TestCluster, agent_id: &str) -> Result<Terminal> {
        Terminal::open_query(cluster, agent_id, "cols=100&rows=30").await
    }

    /// Opens `GET /api/v1/agents/{id}/terminal?{query}` (e.g. `cols=80&rows=24&session=S` to
    /// re-attach) and waits for the session id.
    pub async fn open_query(
        cluster: &TestCluster,
        agent_id: &str,
        query: &str,
    ) -> Result<Terminal> {
        let url = format!(
            "{}/api/v1/agents/{agent_id}/terminal?{query}",
            cluster.api().base_url().replace("http://", "ws://")
        );
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {}", cluster.admin_token()))?,
        );
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
            .await
            .context("the WebSocket handshake timed out")?
            .context("open the terminal WebSocket")?;
        let mut terminal = Terminal {
            ws,
            output: Vec::new(),
            session: String::new(),
        };
        let first = terminal.next_control().await?;
        ensure!(
            first["type"] == "session",
            "the first control message is not the session: {first}"
        );
        terminal.session = first["id"]
            .as_str()
            .with_context(|| format!("the session message has no id: {first}"))?
            .to_owned();
        Ok(terminal)
    }

    /// The session id the control plane announced.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Sends terminal input (a binary frame).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .await
            .context("send terminal input")
    }

    /// The next message before `deadline`; terminal bytes are collected. `None`: closed (a close
    /// frame is returned as a message first).
    pub async fn next_message(&mut self, deadline: Instant) -> Result<Option<Message>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.ws.next()).await {
            Err(_) => bail!(
                "nothing arrived in time; output so far: {:?}",
                String::from_utf8_lossy(&self.output)
            ),
            Ok(None)
            | Ok(Some(Err(tungstenite::Error::ConnectionClosed)))
            | Ok(Some(Err(tungstenite::Error::AlreadyClosed))) => Ok(None),
            Ok(Some(Err(error))) => Err(error).context("read the WebSocket"),
            Ok(Some(Ok(message))) => {
                if let Message::Binary(data) = &message {
                    self.output.extend_from_slice(data);
                }
                Ok(Some(message))
            }
        }
    }

    /// The next JSON control message (text frame), skipping terminal bytes.
    pub async fn next_control(&mut self) -> Result<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.next_message(deadline).await? {
                None => bail!("the WebSocket closed before a control message"),
                Some(Message::Text(text)) => {
                    return serde_json::from_str(text.as_str())
                        .with_context(|| format!("control message {text:?} is not JSON"));
                }
                Some(_) => {}
            }
        }
    }

    /// Reads until the output holds `needle`; returns the output up to it (lossy UTF-8).
    pub async fn read_until(&mut self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = String::from_utf8_lossy(&self.output);
            if let Some(position) = text.find(needle) {
                return Ok(text[..position + needle.len()].to_owned());
            }
            match self.next_message(deadline).await? {
                Some(Message::Text(text)) => bail!("control message {text} while reading"),
                Some(_) => {}
                None => bail!(
                    "the WebSocket closed while waiting for {needle:?}; output: {:?}",
                    String::from_utf8_lossy(&self.output)
                ),
            }
        }
    }

    /// Sends a JSON control message (a text frame), e.g. a resize.
    pub async fn control(&mut self, message: Value) -> Result<()> {
        self.ws
            .send(Message::text(message.to_string()))
            .await
            .context("send a control message")
    }

    /// Ends the session and waits for its exit message.
    pub async fn close(mut self) -> Result<()> {
        self.ws
            .send(Message::text(json!({"type": "close"}).to_string()))
            .await?;
        let control = self.next_control().await?;
        ensure!(
            control["type"] == "exit",
            "expected the exit, got {control}"
        );
        Ok(())
    }
}
