//! The canary secret sweep, end to end (the in-process sweeps of every route are in
//! `control-plane/src/http/tests/security.rs`; masking of job output in all its forms is
//! `secrets.rs`).
//!
//! One canary value is set as an event's secret env var, as a webhook tool's URL, header and
//! signing secret, and as an SSH server's password. While a job holding it runs on a real agent
//! it is in no process's command line and in the environment of the job's processes only (not
//! the agent's, not the control plane's); a recorded terminal opened on the same agent meanwhile
//! never sees it; after the job, a failed SSH connection and a failed notification delivery, no
//! API answer (every GET of `openapi.json` with the ids made here), no recording and no log of
//! the control plane or the agent (both at debug level) contains it. With Docker, the job's
//! container's `docker inspect` and the `docker` processes do not show it either.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use cronium_e2e::cluster::json_str;
use cronium_e2e::docker::{TEST_IMAGE, containers_of_job, docker_cli, require_engine};
use cronium_e2e::{AgentOptions, ClusterOptions, EventSpec, TestCluster};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const DEADLINE: Duration = Duration::from_secs(60);

/// A fresh canary per test.
fn canary() -> String {
    format!("canary-{}", hex::encode(cronium_e2e::random_bytes(12)))
}

/// Every process's pid.
fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may contain spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn descends_from(mut pid: i32, ancestor: i32) -> bool {
    while let Some(parent) = parent_of(pid) {
        if parent == ancestor {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

/// The processes whose command line holds `canary`, with those command lines.
fn command_lines_with(canary: &str) -> Vec<(i32, String)> {
    pids()
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            contains(&cmdline, canary)
                .then(|| (pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .collect()
}

/// The processes (other than this test) whose environment holds `canary`.
fn environments_with(canary: &str) -> Vec<i32> {
    let own = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|pid| *pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| contains(&environ, canary))
        })
        .collect()
}

/// Polls the job's stored log until it contains `needle`.
async fn wait_log(cluster: &TestCluster, job_id: &str, needle: &str) -> Result<String> {
    cluster
        .wait_until(
            DEADLINE,
            &format!("{needle:?} in the log of {job_id}"),
            || async {
                let log = String::from_utf8_lossy(&cluster.job_logs(job_id).await?).into_owned();
                Ok(log.contains(needle).then_some(log))
            },
        )
        .await
}

/// A recorded terminal on `agent` as the admin: runs `env` and `ps` and exits; returns the
/// session id and everything the terminal showed.
async fn terminal_session(cluster: &TestCluster, agent: &str) -> Result<(String, String)> {
    let url = format!(
        "{}/api/v1/agents/{agent}/terminal?cols=200&rows=50",
        cluster.http_url().replace("http://", "ws://")
    );
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", cluster.admin_token()))?,
    );
    let (mut ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
        .await
        .context("terminal handshake")??;
    let deadline = Instant::now() + DEADLINE;
    let mut session = None;
    let mut output = Vec::new();
    let mut sent = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, ws.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "the terminal did not finish; output: {}",
                    String::from_utf8_lossy(&output)
                )
            })?
            .context("the terminal closed before it exited")??;
        match message {
            Message::Text(text) => {
                let control: Value = serde_json::from_str(text.as_str())?;
                match control["type"].as_str() {
                    Some("session") => session = Some(json_str(&control, "id")?),
                    Some("exit") => break,
                    _ => bail!("unexpected control message {control}"),
                }
            }
            Message::Binary(bytes) => output.extend_from_slice(&bytes),
            Message::Close(_) => bail!("closed without an exit"),
            _ => {}
        }
        if session.is_some() && !sent {
            // `$((6*7))` makes the marker appear only in the output, never in the typed line.
            ws.send(Message::Binary(
                b"env; ps -eo args; echo terminal-done-$((6*7)); exit\r"
                    .to_vec()
                    .into(),
            ))
            .await?;
            sent = true;
        }
    }
    let output = String::from_utf8_lossy(&output).into_owned();
    ensure!(
        output.contains("terminal-done-42") && output.contains("PATH="),
        "the terminal did not run the commands: {output}"
    );
    Ok((session.context("no session id")?, output))
}

/// Every GET of the API description with the ids this test made, as the admin: none answers
/// with `canary`. Returns how many were checked.
async fn sweep_gets(cluster: &TestCluster, ids: &[(&str, &str)], canary: &str) -> Result<usize> {
    let document = cluster.api().get_ok("/api/v1/openapi.json").await?;
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().context("paths")? {
        if item.get("get").is_none() || path.ends_with("/terminal") {
            continue;
        }
        // `/segment/{id}…`: the id of the object of that kind, when this test made one.
        let mut concrete = String::new();
        let mut previous = "";
        let mut known = true;
        for segment in path.split('/').skip(1) {
            concrete.push('/');
            if segment.starts_with('{') {
                match ids.iter().find(|(kind, _)| *kind == previous) {
                    Some((_, id)) => concrete.push_str(id),
                    None => known = false,
                }
            } else {
                concrete.push_str(segment);
            }
            previous = segment;
        }
        if !known {
            continue;
        }
        let root = item["get"]["servers"][0]["url"] == "/";
        let full = if root {
            concrete.clone()
        } else {
            format!("/api/v1{concrete}")
        };
        let mut response = cluster
            .api()
            .request(reqwest::Method::GET, &full)
            .send()
            .await
            .with_context(|| format!("GET {full}"))?;
        let streaming = response
            .headers()
            .get("content-type")
            .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
        let body = if streaming {
            // A live stream: its first event (what it shows before any change).
            response.chunk().await?.unwrap_or_default().to_vec()
        } else {
            response.bytes().await?.to_vec()
        };
        ensure!(
            !contains(&body, canary),
            "GET {full} answers with the canary: {}",
            String::from_utf8_lossy(&body)
        );
        checked += 1;
    }
    Ok(checked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_secret_appears_in_no_log_answer_recording_or_process_argument() -> Result<()> {
    let canary = canary();
    let mut cluster =
        TestCluster::start_with_args(ClusterOptions::default(), &["--terminal-recording"]).await?;
    let agent = cluster.enroll_agent("canary", &[]).await?;
    cluster
        .start_agent(&agent, &AgentOptions::default())
        .await?;
    let api = cluster.api();
    api.send(
        reqwest::Method::PATCH,
        &format!("/api/v1/agents/{}", agent.id),
        Some(&json!({"record_terminals": true})),
    )
    .await?
    .expect_status(200, "record the agent's terminals")?;

    // A tool with the canary in its URL, a header and its signing secret; its test delivery
    // fails (nothing listens on port 9), so its error is recorded.
    let tool = api
        .post(
            "/api/v1/tools",
            &json!({"name": "canary-hook", "kind": "webhook", "config": {
                "url": format!("http://127.0.0.1:9/{canary}?key={canary}"),
                "headers": {"Authorization": format!("Bearer {canary}")},
                "secret": canary,
            }}),
        )
        .await?
        .expect_status(201, "create the tool")?;
    let tool_id = json_str(&tool, "id")?;
    api.post(&format!("/api/v1/tools/{tool_id}/test"), &json!({}))
        .await?
        .expect_status(202, "test the tool")?;

    // An SSH server with the canary as its password; its job fails to connect.
    let server = api
        .post(
            "/api/v1/servers",
            &json!({"name": "canary-ssh", "connection": "ssh", "ssh": {
                "host": "127.0.0.1", "port": 1, "username": "nobody",
                "auth": "password", "password": canary,
            }}),
        )
        .await?
        .expect_status(201, "create the SSH server")?;
    let server_id = json_str(&server, "id")?;
    let ssh_event = api
        .post(
            "/api/v1/events",
            &json!({"name": "canary-over-ssh", "kind": "bash", "script": "true",
                    "targets": {"servers": [server_id]}, "timeout_seconds": 30}),
        )
        .await?
        .expect_status(201, "create the SSH event")?;
    let ssh_job = cluster
        .run_event(&json_str(&ssh_event, "id")?, None)
        .await?
        .single_job()?;

    // A job holding the canary in its environment, waiting for the test to let it finish.
    let release = cluster.dir().join("release-canary-job");
    let script = r#"echo "ready $$"
sh -c 'while [ ! -e "$RELEASE" ]; do sleep 0.05; done'
echo "the job had ${#CANARY_SECRET} characters"
"#;
    let mut body = EventSpec::bash("canary-on-host", script)
        .target(&agent.id)
        .env("RELEASE", &release.display().to_string())
        .to_json(cluster.marker());
    body["secret_env"] = json!({"CANARY_SECRET": canary});
    let event = api
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, "create the event")?;
    let event_id = json_str(&event, "id")?;
    let run = cluster.run_event(&event_id, None).await?;
    let job_id = run.single_job()?;
    wait_log(&cluster, &job_id, "ready ").await?;

    // While it runs: in no command line; in the environment of the job's processes only.
    let leaked = command_lines_with(&canary);
    ensure!(
        leaked.is_empty(),
        "command lines with the canary: {leaked:?}"
    );
    let agent_pid = cluster.agent_pid(&agent.id)? as i32;
    let holders = environments_with(&canary);
    ensure!(
        !holders.is_empty(),
        "no process has the canary in its environment: the check would prove nothing"
    );
    for pid in &holders {
        // The job's loop starts a `sleep` every 50 ms, each with the job's environment: one that
        // ended between the two reads has no parent left to check, and is no holder any more.
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        ensure!(
            *pid != agent_pid && (descends_from(*pid, agent_pid) || gone),
            "process {pid} ({:?}) holds the canary and is not one of the job's",
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()
        );
    }
    // A terminal on the same agent meanwhile: its shell's environment and the process list
    // (the job's own command lines included) show no canary.
    let (session, shown) = terminal_session(&cluster, &agent.id).await?;
    ensure!(
        !shown.contains(&canary),
        "the terminal showed the canary: {shown}"
    );

    std::fs::write(&release, b"")?;
    let job = cluster.wait_job_final(&job_id, DEADLINE).await?;
    let log = String::from_utf8(cluster.job_logs(&job_id).await?)?;
    ensure!(
        job["status"] == "completed"
            && log.contains(&format!("the job had {} characters", canary.len())),
        "the job did not get the canary: {job}\n{log}"
    );
    let ssh = cluster.wait_job_final(&ssh_job, DEADLINE).await?;
    ensure!(ssh["status"] == "failed", "the SSH job: {ssh}");
    cluster
        .wait_until(DEADLINE, "the failed test notification", || async {
            let listed = api.get_ok("/api/v1/notifications").await?;
            Ok(listed
                .as_array()
                .into_iter()
                .flatten()
                .any(|notification| !notification["last_error"].is_null())
                .then_some(()))
        })
        .await?;

    // The recording: the session's commands are in it, the canary is not.
    let path = format!("/api/v1/terminal-sessions/{session}/recording");
    let recording = api.get(&path).await?;
    ensure!(
        recording.status == 200 && recording.text.contains("terminal-done-42"),
        "the recording: {} {}",
        recording.status,
        recording.text
    );
    let file = std::fs::read(
        cluster
            .data_dir()
            .join("recordings")
            .join(format!("{session}.cast")),
    )?;
    ensure!(
        !recording.text.contains(&canary) && !contains(&file, &canary),
        "the recording holds the canary"
    );

    // Every GET the API describes, with the ids made here.
    let run_id = run.run_id.clone();
    let ids = [
        ("events", event_id.as_str()),
        ("runs", run_id.as_str()),
        ("jobs", job_id.as_str()),
        ("tools", tool_id.as_str()),
        ("servers", server_id.as_str()),
        ("agents", agent.id.as_str()),
        ("terminal-sessions", session.as_str()),
    ];
    let checked = sweep_gets(&cluster, &ids, &canary).await?;
    ensure!(checked >= 20, "only {checked} GETs swept");
    // The SSH job's log and reason name the failure, not the password.
    let ssh_log = String::from_utf8(cluster.job_logs(&ssh_job).await?)?;
    ensure!(!ssh_log.contains(&canary), "SSH job log: {ssh_log}");

    // The processes' own logs (debug level), with everything above in them.
    let leaking = cluster.logs_containing(&canary);
    ensure!(leaking.is_empty(), "logs with the canary: {leaking:?}");
    // …which did record the failures that handled the canary (so the check is not vacuous).
    let control_plane_log = std::fs::read_to_string(cluster.dir().join("control-plane.log"))?;
    ensure!(
        control_plane_log.contains(&ssh_job) && control_plane_log.contains(&tool_id),
        "the control plane's log names neither the SSH job nor the tool: the check proves \
         nothing:\n{control_plane_log}"
    );
    Ok(())
}

/// A Docker job's secret is not in its container's configuration (`docker inspect`), in the
/// command lines of `docker` or the agent's children, nor in the agent's environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_jobs_secret_is_not_in_docker_inspect_nor_any_command_line() -> Result<()> {
    tokio::task::spawn_blocking(require_engine).await??;
    let canary = canary();
    let mut cluster = TestCluster::start().await?;
    let agent = cluster.add_agent("docker-canary").await?;
    let script = "echo \"in docker with ${#CANARY_SECRET} characters\"; exec sleep 300";
    let mut body = EventSpec::bash("canary-in-docker", script)
        .target(&agent.id)
        .env("VISIBLE_SETTING", "plain-value")
        .docker(json!({"image": TEST_IMAGE}))
        .to_json(cluster.marker());
    body["secret_env"] = json!({"CANARY_SECRET": canary});
    let event = cluster
        .api()
        .post("/api/v1/events", &body)
        .await?
        .expect_status(201, "create the Docker event")?;
    let job_id = cluster
        .run_event(&json_str(&event, "id")?, None)
        .await?
        .single_job()?;
    wait_log(
        &cluster,
        &job_id,
        &format!("in docker with {} characters", canary.len()),
    )
    .await?;

    let containers = containers_of_job(&job_id)?;
    ensure!(
        containers.len() == 1,
        "containers of the job: {containers:?}"
    );
    let inspected = docker_cli(&["inspect", &containers[0]])?;
    ensure!(
        inspected.contains(&job_id),
        "`docker inspect` is not about the job's container: {inspected}"
    );
    ensure!(
        !inspected.contains(&canary),
        "`docker inspect` shows the secret: {inspected}"
    );
    let leaked = command_lines_with(&canary);
    ensure!(
        leaked.is_empty(),
        "command lines with the canary: {leaked:?}"
    );
    let agent_pid = cluster.agent_pid(&agent.id)? as i32;
    let environ = std::fs::read(format!("/proc/{agent_pid}/environ"))?;
    ensure!(
        !contains(&environ, &canary),
        "the agent's environment holds the canary"
    );

    cluster.cancel_job(&job_id).await?;
    let job = cluster.wait_job_final(&job_id, DEADLINE).await?;
    ensure!(job["status"] == "cancelled", "{job}");
    cluster
        .wait_until(DEADLINE, "the job's container removed", || async {
            Ok(containers_of_job(&job_id)?.is_empty().then_some(()))
        })
        .await?;
    let leaking = cluster.logs_containing(&canary);
    ensure!(leaking.is_empty(), "logs with the canary: {leaking:?}");
    Ok(())
}
