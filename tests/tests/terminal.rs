//! Browser terminals end to end: a WebSocket to the real control plane, relayed over QUIC to a
//! real agent running a real login shell on a PTY.
//!
//! Covered: typing and reading back, resize, a UTF-8 character split across frames, re-attach
//! with replay and a second live viewer, the idle timeout reaping the shell, Origin /
//! credential / grant checks before any shell starts, the per-user and per-agent limits, a
//! killed agent detaching the browser, Ctrl-C through a `yes` flood with the agent's memory
//! bounded, explicit close, and asciicast recordings. Every wait is a poll with a deadline.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cronium_e2e::cluster::json_str;
use cronium_e2e::{AgentOptions, ClusterOptions, TestCluster};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous bound of every wait (shared, slow CI machines).
const DEADLINE: Duration = Duration::from_secs(60);

/// How a test authenticates the WebSocket request.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    Cookie(&'a str),
}

/// Why a WebSocket could not be opened: the HTTP answer.
#[derive(Debug)]
struct Refused {
    status: u16,
    body: Value,
}

/// One terminal viewer.
struct Terminal {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Terminal bytes received so far (not yet consumed by `read_until`).
    output: Vec<u8>,
    session: String,
}

/// Opens `GET /api/v1/agents/{agent}/terminal?{query}` as a WebSocket.
async fn connect(
    cluster: &TestCluster,
    agent_id: &str,
    query: &str,
    auth: Auth<'_>,
    origin: Option<&str>,
) -> Result<std::result::Result<WebSocketStream<MaybeTlsStream<TcpStream>>, Refused>> {
    let url = format!(
        "{}/api/v1/agents/{agent_id}/terminal?{query}",
        cluster.http_url().replace("http://", "ws://")
    );
    let mut request = url.into_client_request()?;
    let headers = request.headers_mut();
    match auth {
        Auth::None => {}
        Auth::Bearer(token) => {
            headers.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            );
        }
        Auth::Cookie(cookie) => {
            headers.insert("cookie", HeaderValue::from_str(cookie)?);
        }
    }
    if let Some(origin) = origin {
        headers.insert("origin", HeaderValue::from_str(origin)?);
    }
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request)).await {
        Err(_) => bail!("the WebSocket handshake did not finish within {DEADLINE:?}"),
        Ok(Ok((ws, _))) => Ok(Ok(ws)),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice(body).ok())
                .unwrap_or(Value::Null);
            Ok(Err(Refused { status, body }))
        }
        Ok(Err(error)) => Err(error).context("WebSocket handshake"),
    }
}

impl Terminal {
    /// Opens a terminal as the admin (bearer token, no Origin) and waits for its session id.
    async fn open(cluster: &TestCluster, agent_id: &str, query: &str) -> Result<Terminal> {
        Terminal::open_as(
            cluster,
            agent_id,
            query,
            Auth::Bearer(cluster.admin_token()),
            None,
        )
        .await
    }

    async fn open_as(
        cluster: &TestCluster,
        agent_id: &str,
        query: &str,
        auth: Auth<'_>,
        origin: Option<&str>,
    ) -> Result<Terminal> {
        let ws = match connect(cluster, agent_id, query, auth, origin).await? {
            Ok(ws) => ws,
            Err(refused) => bail!(
                "the terminal was refused: HTTP {} {}",
                refused.status,
                refused.body
            ),
        };
        let mut terminal = Terminal {
            ws,
            output: Vec::new(),
            session: String::new(),
        };
        let first = terminal.next_control().await?;
        if first["type"] != "session" {
            bail!("the first control message is not the session: {first}");
        }
        terminal.session = json_str(&first, "id")?;
        Ok(terminal)
    }

    /// Sends terminal bytes as one binary frame.
    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .await
            .context("send a binary frame")
    }

    /// Sends a JSON control message.
    async fn control(&mut self, value: Value) -> Result<()> {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .context("send a text frame")
    }

    /// The next message; binary data is collected into `output`. `None`: the socket ended.
    async fn next_message(&mut self, deadline: Instant) -> Result<Option<Message>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.ws.next()).await {
            Err(_) => bail!("nothing arrived in time"),
            Ok(None) => Ok(None),
            Ok(Some(Err(tungstenite::Error::ConnectionClosed)))
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

    /// The next control (text) message, collecting terminal bytes meanwhile.
    async fn next_control(&mut self) -> Result<Value> {
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

    /// Reads until the output holds `needle`; consumes the output up to and including it.
    async fn read_until(&mut self, needle: &str) -> Result<Vec<u8>> {
        self.read_until_within(needle, DEADLINE).await
    }

    async fn read_until_within(&mut self, needle: &str, within: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + within;
        let needle = needle.as_bytes();
        let mut searched = 0;
        loop {
            if let Some(position) = find(&self.output[searched..], needle) {
                let end = searched + position + needle.len();
                return Ok(self.output.drain(..end).collect());
            }
            searched = self.output.len().saturating_sub(needle.len());
            match self.next_message(deadline).await {
                Ok(Some(Message::Text(text))) => bail!(
                    "control message {text} while waiting for {:?}; output ends with {:?}",
                    String::from_utf8_lossy(needle),
                    tail(&self.output)
                ),
                Ok(Some(_)) => {}
                Ok(None) => bail!(
                    "the WebSocket closed while waiting for {:?}; output ends with {:?}",
                    String::from_utf8_lossy(needle),
                    tail(&self.output)
                ),
                Err(error) => {
                    return Err(error.context(format!(
                        "waiting for {:?}; output ends with {:?}",
                        String::from_utf8_lossy(needle),
                        tail(&self.output)
                    )));
                }
            }
        }
    }

    /// Runs `command` and returns the line the shell printed for `echo MARK:$(...)`-style
    /// commands: types `command; echo <tag>-$((1+1))` and waits for `<tag>-2`.
    async fn run(&mut self, command: &str, tag: &str) -> Result<String> {
        self.send(format!("{command}; echo {tag}-$((1+1))\r").as_bytes())
            .await?;
        let output = self.read_until(&format!("{tag}-2")).await?;
        Ok(String::from_utf8_lossy(&output).into_owned())
    }

    /// The shell's pid (`echo $$`).
    async fn shell_pid(&mut self) -> Result<i32> {
        // The typed line echoes `pid-$((0+0))-`; only the shell's output has `pid-0-`.
        self.send(b"echo pid-$((0+0))-$$-end\r").await?;
        self.read_until("pid-0-").await?;
        let output = self.read_until("-end").await?;
        let text = String::from_utf8_lossy(&output);
        text.trim_end_matches("-end")
            .trim()
            .parse()
            .with_context(|| format!("no pid in {text:?}"))
    }

    /// Waits for `{"type":"exit"}` and the close; returns the exit code.
    async fn wait_exit(&mut self) -> Result<Value> {
        let control = self.next_control().await?;
        if control["type"] != "exit" {
            bail!("expected the exit, got {control}");
        }
        Ok(control["code"].clone())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn tail(output: &[u8]) -> String {
    String::from_utf8_lossy(&output[output.len().saturating_sub(300)..]).into_owned()
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Children of `parent` (from /proc).
fn children_of(parent: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
                    let state = fields.next()?;
                    let ppid: u32 = fields.next()?.parse().ok()?;
                    Some(ppid == parent && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Kills the shells a test saw when it ends, in case one outlived the test (they do not carry
/// the cluster's marker: their environment is clean).
#[derive(Default)]
struct Shells(Vec<i32>);

impl Drop for Shells {
    fn drop(&mut self) {
        for pid in &self.0 {
            // Only a login shell (argv[0] starts with '-') we started is killed.
            let is_login_shell = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.first() == Some(&b'-'));
            if is_login_shell && process_alive(*pid) {
                // SAFETY: plain syscall on a pid checked a moment ago.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
    }
}

async fn wait_process_gone(cluster: &TestCluster, pid: i32) -> Result<()> {
    cluster
        .wait_until(DEADLINE, &format!("process {pid} gone"), || async move {
            Ok((!process_alive(pid)).then_some(()))
        })
        .await
}

/// A cluster with one agent; `args` go to `cronium serve`.
async fn cluster_with_agent(args: &[&str]) -> Result<(TestCluster, String)> {
    let mut cluster = TestCluster::start_with_args(ClusterOptions::default(), args).await?;
    let agent = cluster.enroll_agent("term", &[]).await?;
    cluster
        .start_agent(&agent, &AgentOptions::default())
        .await?;
    Ok((cluster, agent.id))
}

/// `GET /api/v1/terminal-sessions` as the admin; the entry for `session`.
async fn session_entry(cluster: &TestCluster, session: &str) -> Result<Value> {
    let sessions = cluster.api().get_ok("/api/v1/terminal-sessions").await?;
    sessions
        .as_array()
        .into_iter()
        .flatten()
        .find(|entry| entry["id"] == session)
        .cloned()
        .ok_or_else(|| anyhow!("session {session} is not listed in {sessions}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_runs_commands_resizes_passes_split_utf8_and_closes() -> Result<()> {
    let (cluster, agent) = cluster_with_agent(&[]).await?;
    let mut shells = Shells::default();
    let mut terminal = Terminal::open(&cluster, &agent, "cols=100&rows=30").await?;
    assert_eq!(terminal.session.len(), 32, "{}", terminal.session);
    let pid = terminal.shell_pid().await?;
    shells.0.push(pid);

    let output = terminal.run("echo hello-$((6*7))", "typed").await?;
    assert!(output.contains("hello-42"), "{output}");
    let output = terminal.run("stty size", "size1").await?;
    assert!(output.contains("30 100"), "{output}");

    terminal
        .control(json!({"type": "resize", "cols": 120, "rows": 40}))
        .await?;
    // Unknown and malformed control messages are ignored.
    terminal
        .control(json!({"type": "paste", "data": "x"}))
        .await?;
    terminal.ws.send(Message::text("not json at all")).await?;
    let output = terminal.run("stty size", "size2").await?;
    assert!(output.contains("40 120"), "{output}");

    // "€" (E2 82 AC) split across two frames reaches the shell whole.
    let euro = "€".as_bytes();
    terminal.send(b"echo \"u-").await?;
    terminal.send(&euro[..1]).await?;
    terminal.send(&euro[1..]).await?;
    terminal.send(b"-$((1+1))\"\r").await?;
    let output = terminal.read_until("-2").await?;
    let text = String::from_utf8(output).context("the output is not UTF-8")?;
    assert!(text.contains("u-€-2"), "{text:?}");

    // An explicit close ends the session and kills the shell.
    terminal.control(json!({"type": "close"})).await?;
    let code = terminal.wait_exit().await?;
    assert!(code.is_null(), "a killed shell has no exit code: {code}");
    wait_process_gone(&cluster, pid).await?;
    let entry = session_entry(&cluster, &terminal.session).await?;
    assert_eq!(entry["live"], false, "{entry}");
    assert!(entry["closed_at"].is_string(), "{entry}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattaching_replays_recent_output_and_viewers_share_live_output() -> Result<()> {
    let (cluster, agent) = cluster_with_agent(&[]).await?;
    let mut shells = Shells::default();
    let mut first = Terminal::open(&cluster, &agent, "cols=80&rows=24").await?;
    shells.0.push(first.shell_pid().await?);
    first.run("echo before-$((10+1))", "one").await?;

    // A second viewer of the same session: the replay, then live output for both.
    let query = format!("cols=80&rows=24&session={}", first.session);
    let mut second = Terminal::open(&cluster, &agent, &query).await?;
    assert_eq!(second.session, first.session);
    second.read_until("before-11").await?;
    first.run("echo live-$((20+2))", "two").await?;
    second.read_until("live-22").await?;

    // Closing a WebSocket only detaches that viewer.
    drop(second);
    first.run("echo still-$((30+3))", "three").await?;
    drop(first);
    let mut third = Terminal::open(&cluster, &agent, &query).await?;
    let replay = third.read_until("still-33").await?;
    assert!(
        String::from_utf8_lossy(&replay).contains("live-22"),
        "the replay holds the recent output"
    );
    third.send(b"exit 3\r").await?;
    let code = third.wait_exit().await?;
    assert_eq!(code, json!(3));
    let entry = session_entry(&cluster, &third.session).await?;
    assert_eq!(entry["exit_code"], json!(3), "{entry}");

    // The session is gone: attaching again is refused before the upgrade.
    let refused = connect(
        &cluster,
        &agent,
        &query,
        Auth::Bearer(cluster.admin_token()),
        None,
    )
    .await?
    .err()
    .context("attached to an ended session")?;
    assert_eq!(refused.status, 404, "{:?}", refused.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_reaped_and_leaves_no_shell() -> Result<()> {
    let (cluster, agent) = cluster_with_agent(&["--terminal-idle-timeout", "2s"]).await?;
    let mut shells = Shells::default();
    let mut terminal = Terminal::open(&cluster, &agent, "cols=80&rows=24").await?;
    let pid = terminal.shell_pid().await?;
    shells.0.push(pid);
    // A background job of the shell goes with it.
    let output = terminal.run("sleep 1000 & true", "bg").await?;
    assert!(output.contains("bg-2"));
    let session = terminal.session.clone();
    drop(terminal);
    wait_process_gone(&cluster, pid).await?;
    cluster
        .wait_until(DEADLINE, "the session recorded as closed", || async {
            let entry = session_entry(&cluster, &session).await?;
            Ok((entry["live"] == false).then_some(()))
        })
        .await?;
    // Nothing of the session is left under the agent.
    let agent_pid = cluster.agent_pid(&agent)?;
    cluster
        .wait_until(DEADLINE, "no child process of the agent", || async move {
            let children = children_of(agent_pid);
            if children.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow!("children left: {children:?}"))
            }
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_credentials_and_grants_are_checked_before_a_shell_starts() -> Result<()> {
    let (cluster, agent) =
        cluster_with_agent(&["--allowed-origin", "https://console.example"]).await?;
    let mut shells = Shells::default();
    let agent_pid = cluster.agent_pid(&agent)?;
    let query = "cols=80&rows=24";
    let admin = cluster.admin_token().to_owned();
    let (password, user_token) = cluster.create_user("ann", "user").await?;
    let (_, viewer_token) = cluster.create_user("vic", "viewer").await?;
    let login = cluster
        .api()
        .with_token(None)
        .request(reqwest::Method::POST, "/api/v1/auth/login")
        .json(&json!({"username": "ann", "password": password}))
        .send()
        .await?;
    assert_eq!(login.status(), 200);
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .context("no session cookie")?
        .to_owned();
    let user_id = json_str(
        &cluster
            .api()
            .with_token(Some(&user_token))
            .get_ok("/api/v1/auth/me")
            .await?,
        "id",
    )?;

    let own_origin = cluster.http_url();
    let cases: Vec<(&str, Auth, Option<&str>, u16)> = vec![
        ("no credentials", Auth::None, None, 401),
        ("a bad token", Auth::Bearer("crt_nope"), None, 401),
        (
            "a foreign origin",
            Auth::Bearer(&admin),
            Some("https://evil.example"),
            403,
        ),
        ("a null origin", Auth::Bearer(&admin), Some("null"), 403),
        (
            "a cookie without an origin",
            Auth::Cookie(&cookie),
            None,
            403,
        ),
        (
            "a cookie from a foreign origin",
            Auth::Cookie(&cookie),
            Some("https://evil.example"),
            403,
        ),
        ("a viewer", Auth::Bearer(&viewer_token), None, 403),
        (
            "a user without a grant",
            Auth::Bearer(&user_token),
            None,
            403,
        ),
        (
            "a user without a grant, by cookie",
            Auth::Cookie(&cookie),
            Some(&own_origin),
            403,
        ),
    ];
    for (what, auth, origin, status) in cases {
        let refused = connect(&cluster, &agent, query, auth, origin)
            .await?
            .err()
            .with_context(|| format!("{what}: the terminal was opened"))?;
        assert_eq!(refused.status, status, "{what}: {:?}", refused.body);
        let message = refused
            .body
            .pointer("/error/message")
            .and_then(Value::as_str);
        assert!(
            message.is_some_and(|message| !message.is_empty()),
            "{what}: no error message in {:?}",
            refused.body
        );
    }
    // Other bad requests are refused before the upgrade too.
    for (query, status) in [
        ("cols=0&rows=24", 400),
        ("rows=24", 400),
        (
            "cols=80&rows=24&session=00000000000000000000000000000000",
            404,
        ),
    ] {
        let refused = connect(&cluster, &agent, query, Auth::Bearer(&admin), None)
            .await?
            .err()
            .with_context(|| format!("{query}: the terminal was opened"))?;
        assert_eq!(refused.status, status, "{query}: {:?}", refused.body);
    }
    let refused = connect(&cluster, "no-such-agent", query, Auth::Bearer(&admin), None)
        .await?
        .err()
        .context("a terminal on a missing agent")?;
    assert_eq!(refused.status, 404);
    // No shell was started by any of these, and nothing was recorded.
    assert!(
        children_of(agent_pid).is_empty(),
        "the agent has children: {:?}",
        children_of(agent_pid)
    );
    let sessions = cluster.api().get_ok("/api/v1/terminal-sessions").await?;
    assert_eq!(sessions, json!([]), "refused terminals left sessions");

    // Grants are admin business.
    let user_api = cluster.api().with_token(Some(&user_token));
    let grant_path = format!("/api/v1/agents/{agent}/grants/{user_id}");
    let attempt = user_api
        .send(reqwest::Method::PUT, &grant_path, None)
        .await?;
    assert_eq!(attempt.status, 403, "{}", attempt.text);
    assert_eq!(
        user_api
            .get(&format!("/api/v1/agents/{agent}/grants"))
            .await?
            .status,
        403
    );
    cluster
        .api()
        .send(reqwest::Method::PUT, &grant_path, None)
        .await?
        .expect_status(204, "grant the agent")?;
    let grants = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{agent}/grants"))
        .await?;
    assert_eq!(grants[0]["username"], "ann", "{grants}");

    // With the grant, the cookie still needs an Origin.
    let refused = connect(&cluster, &agent, query, Auth::Cookie(&cookie), None)
        .await?
        .err()
        .context("a cookie without an Origin opened a terminal")?;
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    let message = refused
        .body
        .pointer("/error/message")
        .and_then(Value::as_str);
    assert!(
        message.is_some_and(|message| message.contains("Origin")),
        "{:?}",
        refused.body
    );

    // With the grant: by token, and by cookie from the console's own origin.
    let mut by_token =
        Terminal::open_as(&cluster, &agent, query, Auth::Bearer(&user_token), None).await?;
    shells.0.push(by_token.shell_pid().await?);
    let mut by_cookie = Terminal::open_as(
        &cluster,
        &agent,
        query,
        Auth::Cookie(&cookie),
        Some(&own_origin),
    )
    .await?;
    shells.0.push(by_cookie.shell_pid().await?);
    let mut configured = Terminal::open_as(
        &cluster,
        &agent,
        query,
        Auth::Bearer(&user_token),
        Some("https://console.example"),
    )
    .await?;
    shells.0.push(configured.shell_pid().await?);
    by_token.run("echo granted-$((1+2))", "g").await?;

    // A user sees only their own sessions and cannot attach to the admin's.
    let mut admins = Terminal::open(&cluster, &agent, query).await?;
    shells.0.push(admins.shell_pid().await?);
    let listed = user_api.get_ok("/api/v1/terminal-sessions").await?;
    let listed = listed.as_array().context("not an array")?;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|entry| entry["username"] == "ann"));
    let foreign = format!("{query}&session={}", admins.session);
    let refused = connect(&cluster, &agent, &foreign, Auth::Bearer(&user_token), None)
        .await?
        .err()
        .context("a user attached to the admin's session")?;
    assert_eq!(refused.status, 404);
    // The admin may attach to the user's.
    let theirs = format!("{query}&session={}", by_token.session);
    let mut watching = Terminal::open(&cluster, &agent, &theirs).await?;
    watching.read_until("granted-3").await?;

    // Taking the grant back refuses new terminals.
    cluster
        .api()
        .delete(&grant_path)
        .await?
        .expect_status(204, "revoke the grant")?;
    let refused = connect(&cluster, &agent, query, Auth::Bearer(&user_token), None)
        .await?
        .err()
        .context("opened a terminal after the grant was revoked")?;
    assert_eq!(refused.status, 403);
    for terminal in [&mut by_token, &mut by_cookie, &mut configured, &mut admins] {
        terminal.control(json!({"type": "close"})).await?;
        terminal.wait_exit().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_per_user_and_per_agent_refuse_with_a_clear_message() -> Result<()> {
    let (cluster, agent) = cluster_with_agent(&[
        "--terminal-max-per-user",
        "2",
        "--terminal-max-per-agent",
        "3",
    ])
    .await?;
    let mut shells = Shells::default();
    let query = "cols=80&rows=24";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut terminal = Terminal::open(&cluster, &agent, query).await?;
        shells.0.push(terminal.shell_pid().await?);
        open.push(terminal);
    }
    let refused = connect(
        &cluster,
        &agent,
        query,
        Auth::Bearer(cluster.admin_token()),
        None,
    )
    .await?
    .err()
    .context("a third session for one user")?;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    let message = refused
        .body
        .pointer("/error/message")
        .and_then(Value::as_str);
    assert!(
        message.is_some_and(|message| message.contains("--terminal-max-per-user")),
        "{:?}",
        refused.body
    );

    // Another user fills the agent up to its limit.
    let (_, token) = cluster.create_user("bob", "admin").await?;
    let mut third = Terminal::open_as(&cluster, &agent, query, Auth::Bearer(&token), None).await?;
    shells.0.push(third.shell_pid().await?);
    let refused = connect(&cluster, &agent, query, Auth::Bearer(&token), None)
        .await?
        .err()
        .context("a fourth session on the agent")?;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    let message = refused
        .body
        .pointer("/error/message")
        .and_then(Value::as_str);
    assert!(
        message.is_some_and(|message| message.contains("--terminal-max-per-agent")),
        "{:?}",
        refused.body
    );

    // Ending a session frees its place.
    let mut first = open.remove(0);
    first.control(json!({"type": "close"})).await?;
    first.wait_exit().await?;
    let mut again = Terminal::open(&cluster, &agent, query).await?;
    shells.0.push(again.shell_pid().await?);
    for terminal in [&mut open[0], &mut third, &mut again] {
        terminal.control(json!({"type": "close"})).await?;
        terminal.wait_exit().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_detaches_the_browser_and_leaves_no_shell() -> Result<()> {
    let mut cluster = TestCluster::start_with_args(
        ClusterOptions {
            lease_seconds: Some(3),
            heartbeat_seconds: Some(1),
        },
        &[],
    )
    .await?;
    let agent = cluster.add_agent("doomed").await?;
    let mut shells = Shells::default();
    let mut terminal = Terminal::open(&cluster, &agent.id, "cols=80&rows=24").await?;
    let pid = terminal.shell_pid().await?;
    shells.0.push(pid);
    cluster.kill_agent(&agent.id)?;
    let control = terminal.next_control().await?;
    assert_eq!(
        control,
        json!({"type": "detached", "reason": "agent_disconnected"})
    );
    // The PTY died with the agent: the shell got its hangup.
    wait_process_gone(&cluster, pid).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_a_control_plane_restart_and_is_reattached() -> Result<()> {
    let (mut cluster, agent) = cluster_with_agent(&[]).await?;
    let mut shells = Shells::default();
    let mut terminal = Terminal::open(&cluster, &agent, "cols=80&rows=24").await?;
    let pid = terminal.shell_pid().await?;
    shells.0.push(pid);
    terminal.run("echo survivor-$((9*9))", "s").await?;
    let session = terminal.session.clone();
    cluster.restart_control_plane().await?;
    cluster.wait_agent_online(&agent, DEADLINE).await?;
    drop(terminal);
    // The agent's hello listed the session, so it is still open and can be re-attached.
    let query = format!("cols=80&rows=24&session={session}");
    let mut again = Terminal::open(&cluster, &agent, &query).await?;
    again.read_until("survivor-81").await?;
    assert_eq!(again.shell_pid().await?, pid);
    again.control(json!({"type": "close"})).await?;
    again.wait_exit().await?;
    wait_process_gone(&cluster, pid).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_agent_stop_ends_its_sessions() -> Result<()> {
    let (mut cluster, agent) = cluster_with_agent(&[]).await?;
    let mut shells = Shells::default();
    let mut terminal = Terminal::open(&cluster, &agent, "cols=80&rows=24").await?;
    let pid = terminal.shell_pid().await?;
    shells.0.push(pid);
    cluster.signal_agent(&agent, libc::SIGTERM)?;
    let code = terminal.wait_exit().await?;
    assert!(code.is_null(), "{code}");
    wait_process_gone(&cluster, pid).await?;
    let status = cluster.wait_agent_exit(&agent, DEADLINE).await?;
    assert!(status.success(), "the agent exited with {status}");
    let entry = session_entry(&cluster, &terminal.session).await?;
    assert_eq!(entry["live"], false, "{entry}");
    Ok(())
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_yes_flood_and_the_agent_stays_small() -> Result<()> {
    let (cluster, agent) = cluster_with_agent(&[]).await?;
    let mut shells = Shells::default();
    let agent_pid = cluster.agent_pid(&agent)?;
    let mut terminal = Terminal::open(&cluster, &agent, "cols=80&rows=24").await?;
    shells.0.push(terminal.shell_pid().await?);
    terminal.send(b"yes flood-line\r").await?;
    // Read a good amount of the flood, watching the agent's memory.
    let deadline = Instant::now() + DEADLINE;
    let mut received = 0usize;
    let mut max_rss = 0;
    while received < 8 * 1024 * 1024 {
        let before = terminal.output.len();
        if terminal.next_message(deadline).await?.is_none() {
            bail!("the WebSocket closed during the flood");
        }
        received += terminal.output.len() - before;
        // Keep only a tail: the flood is not interesting.
        let keep = terminal.output.len().saturating_sub(64);
        terminal.output.drain(..keep);
        max_rss = max_rss.max(rss_kib(agent_pid)?);
    }
    eprintln!("the agent's RSS during the flood: at most {max_rss} KiB");
    assert!(
        max_rss < 64 * 1024,
        "the agent's RSS reached {max_rss} KiB during the flood"
    );
    // Ctrl-C reaches the PTY through the flood, and the shell answers again.
    terminal.send(&[0x03]).await?;
    let prompt_deadline = Instant::now() + DEADLINE;
    loop {
        terminal.send(b"echo back-$((20+22))\r").await?;
        match terminal
            .read_until_within("back-42", Duration::from_secs(5))
            .await
        {
            Ok(_) => break,
            Err(error) if Instant::now() < prompt_deadline => {
                eprintln!("not back yet: {error:#}");
                terminal.send(&[0x03]).await?;
            }
            Err(error) => return Err(error.context("the shell did not come back after Ctrl-C")),
        }
    }
    max_rss = max_rss.max(rss_kib(agent_pid)?);
    assert!(max_rss < 64 * 1024, "the agent's RSS reached {max_rss} KiB");
    terminal.control(json!({"type": "close"})).await?;
    // The rest of the flood may still be in flight before the exit.
    terminal.wait_exit().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_sessions_are_asciicast_files_downloadable_through_the_api() -> Result<()> {
    let (cluster, agent) = cluster_with_agent(&["--terminal-recording"]).await?;
    let mut shells = Shells::default();
    // Recording is off for agents that did not opt in.
    let mut unrecorded = Terminal::open(&cluster, &agent, "cols=80&rows=24").await?;
    shells.0.push(unrecorded.shell_pid().await?);
    unrecorded.control(json!({"type": "close"})).await?;
    unrecorded.wait_exit().await?;
    let entry = session_entry(&cluster, &unrecorded.session).await?;
    assert_eq!(entry["has_recording"], false);

    let updated = cluster
        .api()
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/agents/{agent}"),
            Some(&json!({"record_terminals": true})),
        )
        .await?
        .expect_status(200, "opt the agent in")?;
    assert_eq!(updated["record_terminals"], true);

    let mut terminal = Terminal::open(&cluster, &agent, "cols=90&rows=20").await?;
    shells.0.push(terminal.shell_pid().await?);
    terminal.run("echo recorded-$((5*5))", "rec").await?;
    terminal
        .control(json!({"type": "resize", "cols": 100, "rows": 30}))
        .await?;
    terminal.run("echo après-$((2+2))", "utf").await?;
    terminal.control(json!({"type": "close"})).await?;
    terminal.wait_exit().await?;

    let entry = session_entry(&cluster, &terminal.session).await?;
    assert_eq!(entry["has_recording"], true, "{entry}");
    let path = format!("/api/v1/terminal-sessions/{}/recording", terminal.session);
    let response = cluster
        .api()
        .request(reqwest::Method::GET, &path)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok()),
        Some("application/x-asciicast")
    );
    let text = response.text().await?;
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().context("empty recording")?)?;
    assert_eq!(header["version"], 2, "{header}");
    assert_eq!(header["width"], 90);
    assert_eq!(header["height"], 20);
    assert_eq!(header["env"]["TERM"], "xterm-256color");
    let mut output = String::new();
    let mut resized = false;
    let mut last_time = 0.0;
    for line in lines {
        let event: Value =
            serde_json::from_str(line).with_context(|| format!("event {line:?} is not JSON"))?;
        let time = event[0].as_f64().context("no time")?;
        assert!(time >= last_time, "times go forward: {line}");
        last_time = time;
        match event[1].as_str() {
            Some("o") => output.push_str(event[2].as_str().context("no text")?),
            Some("r") => {
                assert_eq!(event[2], "100x30");
                resized = true;
            }
            other => bail!("unexpected event kind {other:?}"),
        }
    }
    assert!(output.contains("recorded-25"), "{output}");
    assert!(output.contains("après-4"), "{output}");
    assert!(resized, "the resize is recorded");
    assert!(
        cluster
            .data_dir()
            .join("recordings")
            .join(format!("{}.cast", terminal.session))
            .is_file()
    );

    // Another user cannot download it.
    let (_, token) = cluster.create_user("eve", "user").await?;
    let other = cluster.api().with_token(Some(&token)).get(&path).await?;
    assert_eq!(other.status, 404);
    Ok(())
}
