//! One interactive shell as the terminal phase drives it, the same way on every side: bytes are
//! written as they would be typed and the output is read as a byte stream, scanned for markers.
//!
//! A [`Shell`] talks either to Cronium's terminal WebSocket (binary frames both ways, the JSON
//! control messages handled here; the TCP socket has `TCP_NODELAY`, as browsers set it) or to an
//! `ssh -tt` child through its stdin and stdout pipes (the remote side gets a PTY; the local pipes
//! pass bytes untouched, so Ctrl-C is the byte 0x03 for the remote line discipline on both sides).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The prompt every measured shell is given (`PS1`). Typed as `'CRB''PROMPT> '`, so the echo of
/// the command that sets it does not contain it.
pub const PROMPT: &str = "CRBPROMPT> ";

/// How long ending a shell may take before it is dropped (the WebSocket) or killed (ssh).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of an ssh child's stderr is kept for error messages.
const STDERR_KEPT: usize = 4096;

/// Where a shell's bytes go.
enum Link {
    Web(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Ssh(Box<SshPipes>),
}

/// An `ssh -tt` child and its pipes.
struct SshPipes {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// The start of its stderr, for error messages.
    stderr: Arc<Mutex<String>>,
    buffer: Box<[u8]>,
}

/// An interactive shell: what was read and not consumed yet, and the link.
pub struct Shell {
    link: Link,
    /// Output read but not consumed by a `read_until` yet (bounded: see `read_until`).
    pending: Vec<u8>,
    /// Every terminal byte read so far.
    pub received: u64,
}

impl Shell {
    /// Opens `url` (a `ws://…/terminal?…` URL) with a bearer token. Returns once the WebSocket
    /// handshake is done; the session message is skipped by the reads.
    pub async fn websocket(url: &str, token: &str) -> anyhow::Result<Shell> {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        let connected = tokio_tungstenite::connect_async_with_config(request, None, true);
        let (ws, _) = tokio::time::timeout(Duration::from_secs(30), connected)
            .await
            .context("the terminal WebSocket handshake took longer than 30 s")?
            .context("cannot open the terminal WebSocket")?;
        Ok(Shell::new(Link::Web(Box::new(ws))))
    }

    /// Spawns `command` (an `ssh -tt …`) with piped stdio; the child is killed when the shell is
    /// dropped.
    pub fn ssh(mut command: tokio::process::Command) -> anyhow::Result<Shell> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("cannot start ssh")?;
        let (Some(stdin), Some(stdout), Some(mut stderr_pipe)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("ssh was started without pipes");
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        let kept = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 1024];
            while let Ok(read) = stderr_pipe.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                let mut kept = kept.lock().unwrap_or_else(|poison| poison.into_inner());
                if kept.len() < STDERR_KEPT {
                    kept.push_str(&String::from_utf8_lossy(&buffer[..read]));
                }
            }
        });
        Ok(Shell::new(Link::Ssh(Box::new(SshPipes {
            child,
            stdin,
            stdout,
            stderr,
            buffer: vec![0u8; 64 * 1024].into_boxed_slice(),
        }))))
    }

    fn new(link: Link) -> Shell {
        Shell {
            link,
            pending: Vec::new(),
            received: 0,
        }
    }

    /// Types `bytes` (one binary frame, or one write to ssh's stdin).
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match &mut self.link {
            Link::Web(ws) => ws
                .send(Message::binary(bytes.to_vec()))
                .await
                .context("cannot send a binary frame"),
            Link::Ssh(ssh) => {
                let stdin = &mut ssh.stdin;
                stdin
                    .write_all(bytes)
                    .await
                    .context("cannot write to ssh's stdin")?;
                stdin.flush().await.context("cannot write to ssh's stdin")
            }
        }
    }

    /// Reads the next piece of output into `pending`.
    async fn receive(&mut self) -> anyhow::Result<()> {
        let read = match &mut self.link {
            Link::Web(ws) => loop {
                match ws.next().await {
                    None
                    | Some(Err(tungstenite::Error::ConnectionClosed))
                    | Some(Err(tungstenite::Error::AlreadyClosed)) => {
                        bail!("the terminal WebSocket closed")
                    }
                    Some(Err(error)) => {
                        return Err(error).context("cannot read the terminal WebSocket");
                    }
                    Some(Ok(Message::Binary(data))) => {
                        self.pending.extend_from_slice(&data);
                        break data.len();
                    }
                    Some(Ok(Message::Text(text))) => {
                        let control: Value = serde_json::from_str(text.as_str())
                            .with_context(|| format!("control message {text:?} is not JSON"))?;
                        if control["type"] != "session" {
                            bail!("unexpected control message {control}");
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        bail!("the server closed the terminal WebSocket ({frame:?})")
                    }
                    Some(Ok(_)) => {}
                }
            },
            Link::Ssh(ssh) => {
                let SshPipes {
                    stdout,
                    buffer,
                    stderr,
                    ..
                } = &mut **ssh;
                let read = stdout
                    .read(buffer)
                    .await
                    .context("cannot read ssh's stdout")?;
                if read == 0 {
                    let stderr = stderr.lock().unwrap_or_else(|poison| poison.into_inner());
                    bail!("ssh closed its output; its stderr: {:?}", stderr.trim());
                }
                self.pending.extend_from_slice(&buffer[..read]);
                read
            }
        };
        self.received += read as u64;
        Ok(())
    }

    /// Reads until the output holds `needle`, consuming it up to and including the needle.
    /// Output before a needle that has not arrived yet is dropped as it comes (the phase never
    /// needs it), so a flood does not grow `pending`.
    pub async fn read_until(&mut self, needle: &str, within: Duration) -> anyhow::Result<()> {
        let needle = needle.as_bytes();
        let finder = memchr::memmem::Finder::new(needle);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(position) = finder.find(&self.pending) {
                self.pending.drain(..position + needle.len());
                return Ok(());
            }
            let keep = needle.len().saturating_sub(1).min(self.pending.len());
            self.pending.drain(..self.pending.len() - keep);
            tokio::time::timeout_at(deadline, self.receive())
                .await
                .with_context(|| {
                    format!(
                        "{:?} did not arrive within {within:?}",
                        String::from_utf8_lossy(needle)
                    )
                })??;
        }
    }

    /// Reads and drops at least `bytes` bytes of output (a flood that must be flowing).
    pub async fn discard(&mut self, bytes: u64, within: Duration) -> anyhow::Result<()> {
        let target = self.received + bytes;
        let deadline = tokio::time::Instant::now() + within;
        while self.received < target {
            self.pending.clear();
            tokio::time::timeout_at(deadline, self.receive())
                .await
                .with_context(|| {
                    format!("{bytes} bytes of output did not arrive within {within:?}")
                })??;
        }
        self.pending.clear();
        Ok(())
    }

    /// Runs `echo TAG-$((1+1))` and waits for its output `TAG-2` and the prompt after it; from
    /// then on nothing earlier is pending.
    pub async fn sync(&mut self, tag: &str, within: Duration) -> anyhow::Result<()> {
        self.send(format!("echo {tag}-$((1+1))\r").as_bytes())
            .await?;
        self.read_until(&format!("{tag}-2"), within).await?;
        self.read_until(PROMPT, within).await
    }

    /// Ends the shell and waits for it: `{"type":"close"}` and the exit message on the
    /// WebSocket; `exit` typed to ssh and the child's exit (killed after [`CLOSE_TIMEOUT`]).
    pub async fn close(mut self) -> anyhow::Result<()> {
        match &mut self.link {
            Link::Web(ws) => {
                ws.send(Message::text(json!({"type": "close"}).to_string()))
                    .await
                    .context("cannot send the close message")?;
                let exited = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    while let Some(message) = ws.next().await {
                        if let Ok(Message::Text(text)) = message
                            && serde_json::from_str::<Value>(text.as_str())
                                .is_ok_and(|control| control["type"] == "exit")
                        {
                            return true;
                        }
                    }
                    false
                })
                .await;
                if !matches!(exited, Ok(true)) {
                    bail!("the terminal session did not report its exit within {CLOSE_TIMEOUT:?}");
                }
                Ok(())
            }
            Link::Ssh(ssh) => {
                let SshPipes { child, stdin, .. } = &mut **ssh;
                // A failed write means ssh is gone already; the wait below tells.
                let _ = stdin.write_all(b"exit\r").await;
                match tokio::time::timeout(CLOSE_TIMEOUT, child.wait()).await {
                    Ok(status) => {
                        status.context("cannot wait for ssh")?;
                        Ok(())
                    }
                    Err(_) => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        bail!("ssh did not exit within {CLOSE_TIMEOUT:?} of `exit`; killed it")
                    }
                }
            }
        }
    }
}
