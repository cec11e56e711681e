//! SSH fallback and bootstrap against a real OpenSSH server: the test starts its own
//! `/usr/sbin/sshd` (`cronium_e2e::sshd`: temp config and host key on a free 127.0.0.1 port,
//! killed on drop), lets the test's own user log in with a generated key, or a user the harness
//! creates (and deletes) with a password, and drives a real control plane through its router.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use cronium_e2e::sshd::{Sshd, SshdOptions, ssh_keygen};

use crate::crypto::EncryptionKey;
use crate::store::users::Role;
use crate::{Running, ServerConfig};

const DEADLINE: Duration = Duration::from_secs(60);

fn keygen(path: &Path) {
    ssh_keygen(path).unwrap();
}

struct Api {
    _dir: tempfile::TempDir,
    running: Running,
    token: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.running.state.shutdown.cancel();
    }
}

async fn api() -> Api {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::for_tests(dir.path(), &EncryptionKey::generate_base64());
    let running = crate::start(config, CancellationToken::new())
        .await
        .unwrap();
    running
        .state
        .store
        .create_user("ssh-tester", "unused", Role::Admin)
        .await
        .unwrap();
    let token = crate::cli::create_api_token(&running.state.store, "ssh-tester", "test")
        .await
        .unwrap();
    Api {
        _dir: dir,
        running,
        token,
    }
}

impl Api {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.send_as(&self.token, method, path, body).await
    }

    async fn send_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        let response = crate::http::router(self.running.state.clone())
            .oneshot(request.unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, body) = self.send(method, path, body).await;
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    async fn add_server(&self, sshd: &Sshd, extra: Value) -> Value {
        let mut ssh = json!({
            "host": "127.0.0.1",
            "port": sshd.port,
            "username": sshd.user,
            "auth": "key",
            "private_key": sshd.private_key(),
        });
        for (key, value) in extra.as_object().unwrap() {
            ssh[key] = value.clone();
        }
        self.ok(
            Method::POST,
            "/servers",
            Some(json!({"name": format!("ssh-{}", crate::store::new_id()), "connection": "ssh", "ssh": ssh})),
        )
        .await
    }

    /// Creates an event on `server` and triggers it; returns the job id (an SSH job).
    async fn run(
        &self,
        server: &Value,
        kind: &str,
        script: &str,
        timeout: u32,
        env: Value,
    ) -> String {
        let run = self.trigger(server, kind, script, timeout, env).await;
        assert_eq!(run["jobs"][0]["server_id"], server["id"]);
        assert!(run["jobs"][0].get("agent_id").is_none());
        run["jobs"][0]["id"].as_str().unwrap().to_string()
    }

    /// Runs a bash script on a server with `connection: agent`; returns the job id.
    async fn run_on_agent(&self, server: &Value, script: &str) -> String {
        let run = self.trigger(server, "bash", script, 60, json!({})).await;
        assert_eq!(run["jobs"][0]["agent_id"], server["agent_id"]);
        run["jobs"][0]["id"].as_str().unwrap().to_string()
    }

    /// Creates an event on `server` and triggers it; returns the run.
    async fn trigger(
        &self,
        server: &Value,
        kind: &str,
        script: &str,
        timeout: u32,
        env: Value,
    ) -> Value {
        let event = self
            .ok(
                Method::POST,
                "/events",
                Some(json!({
                    "name": format!("e-{}", crate::store::new_id()),
                    "kind": kind,
                    "script": script,
                    "runtime": "host",
                    "targets": {"servers": [server["id"]]},
                    "timeout_seconds": timeout,
                    "retries": 0,
                    "env": env,
                })),
            )
            .await;
        self.ok(
            Method::POST,
            &format!("/events/{}/runs", event["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await
    }

    /// Polls the job until `done` holds for it (deadline).
    async fn wait_job(&self, job_id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let job = self.ok(Method::GET, &format!("/jobs/{job_id}"), None).await;
            if done(&job) {
                return job;
            }
            assert!(started.elapsed() < DEADLINE, "job never got there: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finished(&self, job_id: &str) -> Value {
        self.wait_job(job_id, |job| {
            matches!(
                job["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }
}

/// Processes on this host whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

async fn wait_no_process(marker: &str) {
    let started = Instant::now();
    while !processes_with(marker).is_empty() {
        assert!(
            started.elapsed() < DEADLINE,
            "processes with {marker} are still running: {:?}",
            processes_with(marker)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The temp dir a script printed on a line `DIR=<path>`.
fn temp_dir_of(output: &str) -> PathBuf {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("DIR="))
        .unwrap_or_else(|| panic!("no DIR= line in {output:?}"));
    PathBuf::from(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_jobs_run_with_output_exit_codes_and_literal_env() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    // A canary passphrase-less key is the secret: it must never come back.
    let server = api.add_server(&sshd, json!({})).await;
    let canary = sshd.private_key();
    assert!(server["ssh"]["host_key"].is_null());
    assert!(!server.to_string().contains("PRIVATE KEY"));

    let tricky = json!({
        "SEMI": "a; touch /tmp/cronium-pwned-semi",
        "SUBST": "$(touch /tmp/cronium-pwned-subst)",
        "TICKS": "`touch /tmp/cronium-pwned-ticks`",
        "QUOTES": "it's \"quoted\" \\ 'twice'",
        "NEWLINE": "line1\nline2",
    });
    let script = "echo \"DIR=$PWD\"\nprintf '%s|' \"$SEMI\" \"$SUBST\" \"$TICKS\" \"$QUOTES\" \"$NEWLINE\"\necho\necho to-stderr >&2\nexit 3\n";
    let job_id = api.run(&server, "bash", script, 60, tricky).await;
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason"], "exit_code");
    assert_eq!(job["exit_code"], 3);
    let output = job["output"].as_str().unwrap();
    assert!(
        output.contains(
            "a; touch /tmp/cronium-pwned-semi|$(touch /tmp/cronium-pwned-subst)|`touch /tmp/cronium-pwned-ticks`|it's \"quoted\" \\ 'twice'|line1\nline2|"
        ),
        "{output}"
    );
    assert!(output.contains("to-stderr"), "{output}");
    for name in ["semi", "subst", "ticks"] {
        assert!(!Path::new(&format!("/tmp/cronium-pwned-{name}")).exists());
    }
    // The temp dir is gone once the job is settled.
    assert!(!temp_dir_of(output).exists(), "temp dir left behind");

    // First use pinned the host key.
    let shown = api
        .ok(
            Method::GET,
            &format!("/servers/{}", server["id"].as_str().unwrap()),
            None,
        )
        .await;
    let host_pub = std::fs::read_to_string(sshd.file("host.pub")).unwrap();
    assert_eq!(
        shown["ssh"]["host_key"].as_str().unwrap().trim(),
        host_pub.trim(),
        "the pinned key is the server's"
    );

    let python = "import os, sys\nprint('py', os.environ['GREETING'])\nprint('DIR=' + os.getcwd())\nsys.exit(0)\n";
    let job_id = api
        .run(
            &server,
            "python",
            python,
            60,
            json!({"GREETING": "hello $USER"}),
        )
        .await;
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["exit_code"], 0);
    let output = job["output"].as_str().unwrap();
    assert!(output.contains("py hello $USER"), "{output}");
    assert!(!temp_dir_of(output).exists());

    // The secret is in no answer.
    let list = api.ok(Method::GET, "/servers", None).await;
    let logs = api
        .send(Method::GET, &format!("/jobs/{job_id}/logs"), None)
        .await
        .1;
    for answer in [&list, &shown, &job, &logs] {
        let text = answer.to_string();
        assert!(!text.contains(canary.trim()), "secret leaked: {text}");
        assert!(
            !text.contains("private_key\":\""),
            "secret field returned: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    keygen(&sshd.file("other"));
    let other = std::fs::read_to_string(sshd.file("other.pub")).unwrap();
    let server = api
        .add_server(&sshd, json!({"host_key": other.trim()}))
        .await;
    let job_id = api
        .run(&server, "bash", "echo should-not-run\n", 60, json!({}))
        .await;
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason"], "spawn");
    let output = job["output"].as_str().unwrap();
    assert!(output.contains("host key changed"), "{output}");
    assert!(!output.contains("should-not-run"), "{output}");
    // The pin was not replaced by the server's key.
    let shown = api
        .ok(
            Method::GET,
            &format!("/servers/{}", server["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(shown["ssh"]["host_key"].as_str().unwrap(), other.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_kill_the_remote_process_group() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;

    let marker = format!("cronium-timeout-{}", crate::store::new_id());
    let script = format!(
        "echo \"DIR=$PWD\"\nbash -c 'sleep 1000; : {marker}' &\nbash -c 'sleep 1000; : {marker}'\n"
    );
    // Long enough for the script to print its dir even on a loaded machine.
    let job_id = api.run(&server, "bash", &script, 5, json!({})).await;
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason"], "timeout");
    wait_no_process(&marker).await;
    assert!(!temp_dir_of(job["output"].as_str().unwrap()).exists());

    let marker = format!("cronium-cancel-{}", crate::store::new_id());
    let script = format!("echo \"DIR=$PWD\"\necho started\nbash -c 'sleep 1000; : {marker}'\n");
    let job_id = api.run(&server, "bash", &script, 600, json!({})).await;
    api.wait_job(&job_id, |job| {
        job["output"].as_str().unwrap_or("").contains("started")
    })
    .await;
    let (status, _) = api
        .send(Method::POST, &format!("/jobs/{job_id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    wait_no_process(&marker).await;
    assert!(!temp_dir_of(job["output"].as_str().unwrap()).exists());
}

#[tokio::test]
async fn bad_server_input_is_refused_with_a_field() {
    let api = api().await;
    let key = {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("k"));
        std::fs::read_to_string(dir.path().join("k")).unwrap()
    };
    let ssh = |extra: Value| {
        let mut ssh = json!({"host": "127.0.0.1", "port": 22, "username": "root", "auth": "key", "private_key": key});
        for (k, v) in extra.as_object().unwrap() {
            ssh[k] = v.clone();
        }
        ssh
    };
    let cases = [
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"host": "-oProxyCommand=touch /tmp/x"}))}),
            "ssh.host",
        ),
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"host": "a;b"}))}),
            "ssh.host",
        ),
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"username": "-oProxyCommand=x"}))}),
            "ssh.username",
        ),
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"port": 0}))}),
            "ssh.port",
        ),
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"private_key": "SECRET-CANARY-not-a-key"}))}),
            "ssh.private_key",
        ),
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"auth": "password"}))}),
            "ssh.password",
        ),
        (
            json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({"host_key": "ssh-ed25519 not-base64"}))}),
            "ssh.host_key",
        ),
        (
            json!({"name": "a b", "connection": "ssh", "ssh": ssh(json!({}))}),
            "name",
        ),
        (
            json!({"name": "a", "connection": "telnet", "ssh": ssh(json!({}))}),
            "connection",
        ),
        (json!({"name": "a", "connection": "ssh"}), "ssh"),
        (json!({"name": "a", "connection": "agent"}), "agent_id"),
    ];
    for (body, field) in cases {
        let (status, answer) = api.send(Method::POST, "/servers", Some(body.clone())).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} → {answer}"
        );
        assert_eq!(answer["error"]["field"], field, "{body} → {answer}");
        assert!(!answer.to_string().contains("SECRET-CANARY"), "{answer}");
    }
    let (status, _) = api
        .send(
            Method::POST,
            "/servers",
            Some(json!({"name": "a", "connection": "ssh", "ssh": ssh(json!({})), "bogus": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(api.ok(Method::GET, "/servers", None).await, json!([]));
}

#[tokio::test]
async fn users_cannot_see_change_or_target_other_users_servers() {
    let api = api().await;
    let key = {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("k"));
        std::fs::read_to_string(dir.path().join("k")).unwrap()
    };
    let server = api
        .ok(
            Method::POST,
            "/servers",
            Some(json!({"name": "admins", "connection": "ssh", "ssh": {"host": "127.0.0.1", "username": "root", "auth": "key", "private_key": key}})),
        )
        .await;
    let id = server["id"].as_str().unwrap();
    let state = &api.running.state;
    state
        .store
        .create_user("plain-user", "unused", Role::User)
        .await
        .unwrap();
    let user = crate::cli::create_api_token(&state.store, "plain-user", "test")
        .await
        .unwrap();
    let (status, list) = api.send_as(&user, Method::GET, "/servers", None).await;
    assert_eq!((status, list), (StatusCode::OK, json!([])));
    for method in [Method::GET, Method::PATCH, Method::DELETE] {
        let (status, _) = api
            .send_as(
                &user,
                method.clone(),
                &format!("/servers/{id}"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}");
    }
    let (status, event) = api
        .send_as(
            &user,
            Method::POST,
            "/events",
            Some(json!({"name": "e", "kind": "bash", "script": "true", "runtime": "host", "targets": {"servers": [id]}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{event}");
    let (status, answer) = api
        .send_as(
            &user,
            Method::POST,
            &format!("/events/{}/runs", event["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "targets.servers");
    // The admin's server is untouched.
    api.ok(Method::GET, &format!("/servers/{id}"), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_stopped_mid_job_leaves_the_job_to_its_lease() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let marker = format!("cronium-stop-{}", crate::store::new_id());
    let script = format!("echo started\nbash -c 'sleep 1000; : {marker}'\n");
    let job_id = api.run(&server, "bash", &script, 600, json!({})).await;
    api.wait_job(&job_id, |job| {
        job["output"].as_str().unwrap_or("").contains("started")
    })
    .await;
    // Stop the control plane; the worker stops with it and settles nothing itself.
    let state = api.running.state.clone();
    state.shutdown.cancel();
    state.tasks.close();
    tokio::time::timeout(DEADLINE, state.tasks.wait())
        .await
        .expect("tasks stop");
    wait_no_process(&marker).await;
    let job = state.store.job(&job_id).await.unwrap();
    assert_eq!(job.status.as_str(), "running");
    // The sweeper of the next control plane settles it once the lease ran out.
    let expired = state
        .store
        .expire_leases(crate::store::now_ms() + 31_000)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert!(!expired[0].requeued, "retries: 0");
    let job = state.store.job(&job_id).await.unwrap();
    assert_eq!(
        (
            job.status.as_str(),
            job.reason.map(|reason| reason.as_str())
        ),
        ("failed", Some("lost"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_protected_key_works_and_a_wrong_passphrase_is_refused() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let path = sshd.file("locked");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "pass; $(word)", "-C", "", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut authorized = std::fs::read_to_string(sshd.file("authorized_keys")).unwrap();
    authorized.push_str(&std::fs::read_to_string(sshd.file("locked.pub")).unwrap());
    std::fs::write(sshd.file("authorized_keys"), authorized).unwrap();
    let key = std::fs::read_to_string(&path).unwrap();

    let (status, answer) = api
        .send(
            Method::POST,
            "/servers",
            Some(json!({"name": "locked", "connection": "ssh", "ssh": {
                "host": "127.0.0.1", "port": sshd.port, "username": sshd.user, "auth": "key",
                "private_key": key, "passphrase": "wrong"}})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "ssh.private_key");

    let server = api
        .add_server(
            &sshd,
            json!({"private_key": key, "passphrase": "pass; $(word)"}),
        )
        .await;
    assert!(!server.to_string().contains("pass; $(word)"));
    let job_id = api
        .run(&server, "bash", "echo unlocked\n", 60, json!({}))
        .await;
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(job["output"].as_str().unwrap().contains("unlocked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cap_is_dropped_after_one_marker() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    // Four times the cap, then a line after it: the job still completes.
    let script = "head -c 262144 /dev/zero | tr '\\0' x\necho after-the-flood\n";
    let job_id = api.run(&server, "bash", script, 60, json!({})).await;
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    let logs = api
        .running
        .state
        .store
        .logs(&job_id, 0, u64::MAX)
        .await
        .unwrap();
    let text: String = logs
        .iter()
        .map(|chunk| String::from_utf8_lossy(&chunk.data).into_owned())
        .collect();
    let kept = text.bytes().filter(|byte| *byte == b'x').count() as u64;
    // The cap counts the whole log (the runner's own lines too), so a little less than the cap
    // is the script's.
    let cap = super::job::MAX_LOG_BYTES;
    assert!(
        kept <= cap && kept > cap - 4096,
        "kept {kept} of a {cap} byte cap"
    );
    assert_eq!(
        text.matches("output truncated after").count(),
        1,
        "{}",
        &text[text.len() - 200..]
    );
    assert!(!text.contains("after-the-flood"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_user_runs_jobs_and_a_wrong_password_is_refused() {
    let sshd = Sshd::start_with(SshdOptions {
        password_user: true,
        ..SshdOptions::default()
    })
    .unwrap();
    let user = sshd.password_user.as_ref().unwrap();
    let api = api().await;
    let server = api
        .ok(
            Method::POST,
            "/servers",
            Some(json!({"name": "by-password", "connection": "ssh", "ssh": {
                "host": "127.0.0.1", "port": sshd.port, "username": user.name,
                "auth": "password", "password": user.password,
            }})),
        )
        .await;
    assert!(!server.to_string().contains(&user.password));
    assert_eq!(server["ssh"]["auth"], "password");

    let job = api
        .run(
            &server,
            "bash",
            "id -un; echo \"home=$HOME\"",
            30,
            json!({}),
        )
        .await;
    let job = api.finished(&job).await;
    let output = job["output"].as_str().unwrap_or_default().to_string();
    assert_eq!(job["status"], "completed", "{job} {output}");
    assert!(output.contains(&format!("{}\n", user.name)), "{output}");
    assert!(
        output.contains(&format!("home={}", user.home().display())),
        "{output}"
    );
    assert!(!output.contains(&user.password));

    // A wrong password: the job fails saying so, and never repeats the password.
    let wrong = "not-the-password-7f3a";
    api.ok(
        Method::PATCH,
        &format!("/servers/{}", server["id"].as_str().unwrap()),
        Some(json!({"ssh": {"password": wrong}})),
    )
    .await;
    let job = api.run(&server, "bash", "echo never", 30, json!({})).await;
    let job = api.finished(&job).await;
    let output = job["output"].as_str().unwrap_or_default().to_string();
    assert_eq!(job["status"], "failed", "{job}");
    assert!(output.contains("with a password was refused"), "{output}");
    assert!(
        !output.contains(wrong) && !output.contains("never\n"),
        "{output}"
    );
}

/// Kills the agent an install started with `--detach` (its pid file names it) when dropped.
struct DetachedAgent {
    pid_file: PathBuf,
}

impl Drop for DetachedAgent {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from the file the installer wrote.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Api {
    /// `POST /servers/{id}/install-agent`; returns the status and the progress lines.
    async fn install_agent(&self, server_id: &str, body: Value) -> (StatusCode, Vec<Value>) {
        let response = self.start_install(server_id, body).await;
        progress_lines(response).await
    }

    /// `POST /servers/{id}/install-agent`, the answer's body not read yet.
    async fn start_install(
        &self,
        server_id: &str,
        body: Value,
    ) -> axum::http::Response<axum::body::Body> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/api/v1/servers/{server_id}/install-agent"))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        crate::http::router(self.running.state.clone())
            .oneshot(request)
            .await
            .unwrap()
    }

    /// Publishes the agent binary this workspace built as a signed release.
    fn publish_agent(&self) {
        let key = crate::release::ReleaseKey::generate();
        let agent = cronium_e2e::binary("cronium-agent").unwrap();
        crate::release::publish(
            &self.running.state.config.releases_dir,
            &agent,
            &key,
            env!("CARGO_PKG_VERSION"),
            cronium_agent::TARGET,
        )
        .unwrap();
    }
}

/// The status and the progress lines (one JSON object per line) of an install's answer.
async fn progress_lines(
    response: axum::http::Response<axum::body::Body>,
) -> (StatusCode, Vec<Value>) {
    let status = response.status();
    let bytes = tokio::time::timeout(
        Duration::from_secs(300),
        axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024),
    )
    .await
    .expect("the install ends")
    .unwrap();
    let lines = if status == StatusCode::OK {
        bytes
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("one JSON object per line"))
            .collect()
    } else {
        vec![serde_json::from_slice(&bytes).unwrap_or(Value::Null)]
    };
    (status, lines)
}

fn text_of(lines: &[Value]) -> String {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_agent_over_ssh_installs_a_verified_agent_and_switches_the_server() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    api.publish_agent();
    let server = api.add_server(&sshd, json!({})).await;
    let server_id = server["id"].as_str().unwrap();
    let prefix = tempfile::tempdir().unwrap();
    let _agent = DetachedAgent {
        pid_file: prefix.path().join("var/lib/cronium-agent/agent.pid"),
    };
    let body = json!({"service": "detached", "prefix": prefix.path()});

    let first = api.start_install(server_id, body.clone()).await;
    // One install per server at a time: this one waits for an agent that is seconds away.
    let (status, second) = api.install_agent(server_id, body.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{second:?}");
    let (status, lines) = progress_lines(first).await;
    let text = text_of(&lines);
    assert_eq!(status, StatusCode::OK, "{text}");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "done", "{text}");
    let agent_id = last["agent_id"].as_str().unwrap().to_string();
    assert_eq!(last["agent_name"], server["name"]);
    // Progress: every step, the host key pinned on first use, the upload over SFTP, the
    // installer's own lines (its signature check) streamed as they came.
    for step in ["connect", "inspect", "upload", "install", "wait", "switch"] {
        assert!(
            lines
                .iter()
                .any(|line| line["type"] == "step" && line["step"] == step),
            "no {step} step in {text}"
        );
    }
    assert!(text.contains("pinned host key"), "{text}");
    assert!(!text.contains("instead"), "SFTP was used: {text}");
    assert!(text.contains("signature verified"), "{text}");
    assert!(
        text.contains("started the agent in the background"),
        "{text}"
    );
    // The upload dir is gone again.
    let upload_dir = lines
        .iter()
        .filter_map(|line| line["message"].as_str())
        .find_map(|message| message.split(" to ").nth(1))
        .expect("the upload step names its dir");
    assert!(!Path::new(upload_dir).exists(), "{upload_dir} was left");

    // The server now runs its jobs through the agent, which is online.
    let server = api
        .ok(Method::GET, &format!("/servers/{server_id}"), None)
        .await;
    assert_eq!(server["connection"], "agent");
    assert_eq!(server["agent_id"], agent_id);
    let agent = api
        .ok(Method::GET, &format!("/agents/{agent_id}"), None)
        .await;
    assert_eq!(agent["status"], "online", "{agent}");
    let job = api.run_on_agent(&server, "echo via the agent").await;
    let job = api.finished(&job).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["agent_id"], agent_id);
    assert!(job["output"].as_str().unwrap().contains("via the agent"));
    assert!(
        prefix.path().join("bin/cronium-agent").is_file(),
        "installed under the prefix"
    );

    // Safe to run again: the same agent, not a second enrollment.
    let (status, lines) = api.install_agent(server_id, body).await;
    let text = text_of(&lines);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines.last().unwrap()["type"], "done", "{text}");
    assert_eq!(lines.last().unwrap()["agent_id"], agent_id, "{text}");
    assert!(text.contains("already enrolled"), "{text}");
    let agents = api.ok(Method::GET, "/agents", None).await;
    assert_eq!(
        agents
            .as_array()
            .unwrap()
            .iter()
            .filter(|agent| agent["name"] == server["name"])
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_agent_refuses_bad_input_a_changed_host_key_and_a_missing_release() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let server_id = server["id"].as_str().unwrap();
    for (body, field) in [
        (json!({"service": "cron"}), "service"),
        (json!({"prefix": "relative/path"}), "prefix"),
        (json!({"prefix": "/opt/x;touch /tmp/pwned"}), "prefix"),
        (json!({"prefix": "/opt/$(id)"}), "prefix"),
        (json!({"prefix": "/opt/../etc"}), "prefix"),
    ] {
        let (status, lines) = api.install_agent(server_id, body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(lines[0]["error"]["field"], field, "{body}");
    }
    let (status, _) = api.install_agent("no-such-server", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // No release for the host's target yet: a clear failure, nothing switched.
    let (status, lines) = api.install_agent(server_id, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "failed", "{}", text_of(&lines));
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("no signed agent release"),
        "{last}"
    );

    // A host that shows another key than the pinned one is refused before anything is sent.
    api.publish_agent();
    keygen(&sshd.file("other"));
    let other = std::fs::read_to_string(sshd.file("other.pub")).unwrap();
    api.ok(
        Method::PATCH,
        &format!("/servers/{server_id}"),
        Some(json!({"ssh": {"host_key": other}})),
    )
    .await;
    let (_, lines) = api.install_agent(server_id, json!({})).await;
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "failed");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("host key changed"),
        "{last}"
    );
    assert!(
        !text_of(&lines).contains("\"upload\""),
        "nothing was uploaded"
    );
    let server = api
        .ok(Method::GET, &format!("/servers/{server_id}"), None)
        .await;
    assert_eq!(server["connection"], "ssh");
    assert_eq!(
        crate::ssh::normalize_host_key(server["ssh"]["host_key"].as_str().unwrap()),
        crate::ssh::normalize_host_key(&other),
        "the pin was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_env_reaches_ssh_jobs_and_is_masked_in_their_log() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let canary = "ssh-canary-5e1d0b7a-secret";
    let event = api
        .ok(
            Method::POST,
            "/events",
            Some(json!({
                "name": "ssh-secret",
                "kind": "bash",
                // Whole, split across two writes with a pause (two SSH data messages), on
                // stderr, and its length to prove the job had it.
                "script": "echo \"plain: $TOKEN\"\nprintf 'split: %s' \"${TOKEN:0:8}\"\nsleep 1\nprintf '%s :end\\n' \"${TOKEN:8}\"\necho \"err: $TOKEN\" >&2\necho \"length: ${#TOKEN}\"\n. ./cronium.sh\ncronium_output \"{\\\"token\\\": \\\"$TOKEN\\\"}\"\n",
                "targets": {"servers": [server["id"]]},
                "secret_env": {"TOKEN": canary},
            })),
        )
        .await;
    let run = api
        .ok(
            Method::POST,
            &format!("/events/{}/runs", event["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    let job_id = run["jobs"][0]["id"].as_str().unwrap().to_owned();
    let job = api.finished(&job_id).await;
    assert_eq!(job["status"], "completed", "{job}");
    let output = job["output"].as_str().unwrap();
    for expected in [
        "plain: ***\n",
        "split: *** :end\n",
        "err: ***\n",
        &format!("length: {}\n", canary.len()),
    ] {
        assert!(output.contains(expected), "{expected:?} not in {output}");
    }
    // The value set through the runtime helpers is masked too.
    assert_eq!(job["result"], json!({"token": "***"}), "{job}");
    let logs = api
        .send(Method::GET, &format!("/jobs/{job_id}/logs"), None)
        .await
        .1;
    for answer in [&job, &logs, &event] {
        assert!(!answer.to_string().contains(canary), "leaked: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_reuse_a_kept_connection_unless_the_server_says_not_to() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let logins = || sshd.log().matches("Accepted publickey").count();
    let kept = api.add_server(&sshd, json!({})).await;
    assert_eq!(kept["ssh"]["reuse_connection"], true, "the default");
    for round in 0..3 {
        let job = api
            .run(&kept, "bash", &format!("echo round {round}"), 30, json!({}))
            .await;
        let job = api.finished(&job).await;
        assert_eq!(job["status"], "completed", "{job}");
        let output = job["output"].as_str().unwrap();
        assert!(output.contains(&format!("round {round}\n")), "{output}");
        assert_eq!(
            output.contains("on a kept connection"),
            round > 0,
            "round {round}: {output}"
        );
    }
    assert_eq!(logins(), 1, "three jobs, one login: {}", sshd.log());
    assert_eq!(api.running.state.ssh.pool.len(), 1);

    // Changing the server's settings retires the kept connection: the next job logs in again.
    let kept_id = kept["id"].as_str().unwrap();
    api.ok(
        Method::PATCH,
        &format!("/servers/{kept_id}"),
        Some(json!({"labels": {"changed": "yes"}, "ssh": {"reuse_connection": true, "private_key": sshd.private_key()}})),
    )
    .await;
    let job = api.run(&kept, "bash", "true", 30, json!({})).await;
    assert_eq!(api.finished(&job).await["status"], "completed");
    assert_eq!(logins(), 2, "{}", sshd.log());

    // A server that does not keep connections logs in for every job and keeps nothing.
    let own = api
        .add_server(&sshd, json!({"reuse_connection": false}))
        .await;
    assert_eq!(own["ssh"]["reuse_connection"], false);
    let pooled_before = api.running.state.ssh.pool.len();
    for _ in 0..2 {
        let job = api.run(&own, "bash", "true", 30, json!({})).await;
        let job = api.finished(&job).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert!(!job["output"].as_str().unwrap().contains("kept connection"));
    }
    assert_eq!(logins(), 4, "{}", sshd.log());
    assert_eq!(api.running.state.ssh.pool.len(), pooled_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_that_died_is_replaced_without_failing_the_job() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let job = api.run(&server, "bash", "echo first", 30, json!({})).await;
    assert_eq!(api.finished(&job).await["status"], "completed");
    // Kill the process serving the kept connection (the listener's child), not the listener:
    // the pool still holds the connection, now dead.
    let sessions = sshd.session_pids();
    assert_eq!(sessions.len(), 1, "one kept connection");
    for pid in sessions {
        // SAFETY: kill(2) on the process serving this test's own connection.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let job = api.run(&server, "bash", "echo second", 30, json!({})).await;
    let job = api.finished(&job).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(job["output"].as_str().unwrap().contains("second\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_other_user_jobs_are_refused_over_ssh_and_limits_are_named_in_the_log() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let server_id = server["id"].as_str().unwrap();
    let run_with = |fields: Value| {
        let api = &api;
        async move {
            let mut body = json!({
                "name": format!("e-{}", crate::store::new_id()),
                "kind": "bash",
                "script": "echo ran",
                "targets": {"servers": [server_id]},
                "timeout_seconds": 30,
            });
            for (key, value) in fields.as_object().unwrap() {
                body[key] = value.clone();
            }
            let event = api.ok(Method::POST, "/events", Some(body)).await;
            let run = api
                .ok(
                    Method::POST,
                    &format!("/events/{}/runs", event["id"].as_str().unwrap()),
                    Some(json!({})),
                )
                .await;
            api.finished(run["jobs"][0]["id"].as_str().unwrap()).await
        }
    };

    // A Docker event is refused when the run is created.
    let event = api
        .ok(
            Method::POST,
            "/events",
            Some(
                json!({"name": "docker-over-ssh", "kind": "bash", "script": "echo ran",
                        "runtime": "docker", "image": "busybox",
                        "targets": {"servers": [server_id]}}),
            ),
        )
        .await;
    let (status, body) = api
        .send(
            Method::POST,
            &format!("/events/{}/runs", event["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "runtime");

    let job = run_with(json!({"user": "nobody"})).await;
    assert_eq!(job["status"], "failed", "{job}");
    let output = job["output"].as_str().unwrap();
    assert!(
        output.contains("running as another user needs the agent"),
        "{output}"
    );
    assert!(!output.contains("ran\n"));

    // Its own user is fine; limits run without being applied, and the log says so.
    let job = run_with(json!({"user": sshd.user, "limits": {"memory_mb": 64, "pids": 32}})).await;
    assert_eq!(job["status"], "completed", "{job}");
    let output = job["output"].as_str().unwrap();
    assert!(
        output.contains(
            "limits not applied over SSH (they need the agent's cgroups): memory_mb, pids"
        ),
        "{output}"
    );
    assert!(output.contains("ran\n"));
}

/// Creates an event on `server` and triggers it with `input`; returns the job id.
async fn run_with_input(
    api: &Api,
    server: &Value,
    kind: &str,
    script: &str,
    input: Value,
) -> String {
    let event = api
        .ok(
            Method::POST,
            "/events",
            Some(json!({
                "name": format!("e-{}", crate::store::new_id()),
                "kind": kind,
                "script": script,
                "runtime": "host",
                "targets": {"servers": [server["id"]]},
                "timeout_seconds": 60,
                "retries": 0,
            })),
        )
        .await;
    let run = api
        .ok(
            Method::POST,
            &format!("/events/{}/runs", event["id"].as_str().unwrap()),
            Some(json!({ "input": input })),
        )
        .await;
    run["jobs"][0]["id"].as_str().unwrap().to_string()
}

/// Every runtime helper from a Bash job over SSH, through the forwarded socket: input and event,
/// a variable set and read back (and visible through the API), the result and the condition in
/// the job, a notification delivered to a real webhook; twice, the second time on the kept
/// connection, whose forwarded sockets are routed per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_jobs_over_ssh_use_every_runtime_helper() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let mut webhook = cronium_e2e::webhook::WebhookListener::start()
        .await
        .unwrap();
    api.ok(
        Method::POST,
        "/tools",
        Some(json!({"name": "hook", "kind": "webhook", "config": {"url": webhook.url()}})),
    )
    .await;
    let server = api.add_server(&sshd, json!({})).await;
    let script = r#". ./cronium.sh
set -e
echo "DIR=$PWD"
echo "input=$(cronium_input)"
echo "event=$(cronium_event)"
test -S "$CRONIUM_HELPER_SOCKET"
echo "names=$(env | sed -n 's/^\(CRONIUM_[A-Z_]*\)=.*/\1/p' | LC_ALL=C sort | tr '\n' ' ')"
echo "ids=$CRONIUM_JOB_ID $CRONIUM_RUN_ID $CRONIUM_EVENT_ID $CRONIUM_ATTEMPT"
n=$(cronium_input | sed 's/[^0-9]//g')
cronium_set_variable ssh_counter "{\"n\": $n}"
echo "got=$(cronium_get_variable ssh_counter)"
cronium_output "{\"sum\": $((n + 1)), \"from\": \"ssh\"}"
cronium_set_condition true
cronium_notify --tool hook --title "ssh $n" 'hello over ssh'
if cronium_get_variable 'bad name' 2>err; then exit 9; fi
echo "refused=$(cat err)"
"#;
    for n in [41, 42] {
        let job_id = run_with_input(&api, &server, "bash", script, json!({ "n": n })).await;
        let job = api.finished(&job_id).await;
        let output = job["output"].as_str().unwrap();
        assert_eq!(job["status"], "completed", "{job}");
        assert!(output.contains(&format!("input={{\"n\":{n}}}")), "{output}");
        assert!(
            output.contains(&format!("\"job_id\":\"{job_id}\""))
                && output.contains("\"attempt\":1"),
            "{output}"
        );
        // The same CRONIUM_* variables as a job on an agent (agent/src/runner/process.rs,
        // `the_environment_is_scrubbed`), with the same values.
        assert!(
            output.contains(
                "names=CRONIUM_ATTEMPT CRONIUM_EVENT_ID CRONIUM_HELPER_SOCKET CRONIUM_JOB_ID \
                 CRONIUM_JOB_TOKEN CRONIUM_RUN_ID \n"
            ),
            "{output}"
        );
        let ids = format!(
            "ids={job_id} {} {} 1\n",
            job["run_id"].as_str().unwrap(),
            job["event_id"].as_str().unwrap()
        );
        assert!(output.contains(&ids), "{ids} in {output}");
        assert!(output.contains(&format!("got={{\"n\":{n}}}")), "{output}");
        assert!(
            output.contains("refused=cronium: the variable name \"bad name\" is not valid"),
            "{output}"
        );
        assert!(
            !output.contains("runtime helpers are unavailable"),
            "{output}"
        );
        assert_eq!(job["result"], json!({"sum": n + 1, "from": "ssh"}), "{job}");
        assert_eq!(job["condition"], true, "{job}");
        assert!(!temp_dir_of(output).exists(), "temp dir left behind");

        let variable = api.ok(Method::GET, "/variables/ssh_counter", None).await;
        assert_eq!(variable["value"], json!({ "n": n }), "{variable}");
        assert_eq!(variable["updated_by_job"], job_id.as_str(), "{variable}");

        let body = webhook.next_body(DEADLINE).await.unwrap();
        let payload: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(payload["message"], "hello over ssh", "{payload}");
        assert_eq!(payload["title"], format!("ssh {n}"), "{payload}");
    }
    assert_eq!(api.running.state.ssh.pool.len(), 1, "one kept connection");

    // A retried job sees its attempt number in CRONIUM_ATTEMPT, the same as the `event`
    // helper's `attempt`: the first attempt fails, the second completes.
    let event = api
        .ok(
            Method::POST,
            "/events",
            Some(json!({
                "name": format!("e-{}", crate::store::new_id()),
                "kind": "bash",
                "script": ". ./cronium.sh\necho \"attempt=$CRONIUM_ATTEMPT event=$(cronium_event)\"\n[ \"$CRONIUM_ATTEMPT\" = 2 ]\n",
                "runtime": "host",
                "targets": {"servers": [server["id"]]},
                "timeout_seconds": 60,
                "retries": 1,
                "retry": {"backoff_seconds": 0},
            })),
        )
        .await;
    let run = api
        .ok(
            Method::POST,
            &format!("/events/{}/runs", event["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    let job = api.finished(run["jobs"][0]["id"].as_str().unwrap()).await;
    let output = job["output"].as_str().unwrap();
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert!(
        output.contains("attempt=2 event=") && output.contains("\"attempt\":2"),
        "{output}"
    );
    assert_eq!(
        api.running.state.ssh.pool.forwards(),
        0,
        "every route removed"
    );
}

/// A Python job over SSH uses `cronium.py`; a call with a wrong token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_jobs_over_ssh_use_the_helpers_and_need_the_token() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api
        .add_server(&sshd, json!({"reuse_connection": false}))
        .await;
    let script = r#"import http.client, json, os, socket
import cronium
n = cronium.input()["n"]
cronium.set_variable("py_var", {"list": [n, "x"]})
print("got", json.dumps(cronium.get_variable("py_var")))
print("unset", cronium.get_variable("py_unset"))
print("attempt", cronium.event()["attempt"])
cronium.output({"doubled": n * 2})
cronium.set_condition(False)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["CRONIUM_HELPER_SOCKET"])
conn = http.client.HTTPConnection("cronium")
conn.sock = sock
conn.request("GET", "/v1/input", headers={"Authorization": "Bearer " + "0" * 64})
answer = conn.getresponse()
print("wrong-token", answer.status, answer.read().decode())
"#;
    let job_id = run_with_input(&api, &server, "python", script, json!({"n": 21})).await;
    let job = api.finished(&job_id).await;
    let output = job["output"].as_str().unwrap();
    assert_eq!(job["status"], "completed", "{job}");
    assert!(output.contains("got {\"list\": [21, \"x\"]}"), "{output}");
    assert!(output.contains("unset None"), "{output}");
    assert!(output.contains("attempt 1"), "{output}");
    assert!(output.contains("wrong-token 401"), "{output}");
    assert_eq!(job["result"], json!({"doubled": 42}), "{job}");
    assert_eq!(job["condition"], false, "{job}");
    let variable = api.ok(Method::GET, "/variables/py_var", None).await;
    assert_eq!(variable["value"], json!({"list": [21, "x"]}), "{variable}");
}

/// A server that refuses socket forwarding still runs the job; its log says once why helpers
/// are unavailable, and a helper call fails with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_socket_forwarding_runs_jobs_without_helpers() {
    let sshd = Sshd::start_with(SshdOptions {
        streamlocal_forwarding: false,
        ..SshdOptions::default()
    })
    .unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let script = r#". ./cronium.sh
if cronium_output '{"a": 1}' 2>err; then echo 'the call succeeded'; exit 3; fi
echo "call failed: $(cat err)"
echo still-running
"#;
    for _ in 0..2 {
        let job_id = api.run(&server, "bash", script, 60, json!({})).await;
        let job = api.finished(&job_id).await;
        let output = job["output"].as_str().unwrap();
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(
            output
                .matches("runtime helpers are unavailable on this server")
                .count(),
            1,
            "{output}"
        );
        assert!(output.contains("AllowStreamLocalForwarding"), "{output}");
        assert!(
            output.contains(
                "call failed: cronium: runtime helpers are unavailable in this job: the SSH server refused to forward the helper socket"
            ),
            "{output}"
        );
        assert!(output.contains("still-running"), "{output}");
        assert!(job["result"].is_null(), "{job}");
    }
    assert_eq!(api.running.state.ssh.pool.forwards(), 0);
}

/// Jobs running at the same time on one server (so on one kept connection, where they fit)
/// each reach their own attempt's helpers: every forwarded socket is routed to its attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ssh_jobs_reach_their_own_helpers() {
    let sshd = Sshd::start().unwrap();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;
    let barrier = tempfile::tempdir().unwrap();
    // The jobs wait for each other (up to 30 s), so their helpers are live at the same time.
    let script = r#". ./cronium.sh
touch "$BARRIER/$CRONIUM_JOB_ID"
i=0
while [ "$(ls "$BARRIER" | wc -l)" -lt 3 ]; do
  i=$((i + 1)); [ "$i" -gt 600 ] && { echo 'the other jobs never came' >&2; exit 7; }
  sleep 0.05
done
cronium_output "$(cronium_input)"
"#;
    let event = api
        .ok(
            Method::POST,
            "/events",
            Some(json!({
                "name": "ssh-concurrent-helpers",
                "kind": "bash",
                "script": script,
                "runtime": "host",
                "targets": {"servers": [server["id"]]},
                "timeout_seconds": 60,
                "env": {"BARRIER": barrier.path().to_str().unwrap()},
            })),
        )
        .await;
    let mut jobs = Vec::new();
    for n in 0..3 {
        let run = api
            .ok(
                Method::POST,
                &format!("/events/{}/runs", event["id"].as_str().unwrap()),
                Some(json!({"input": {"n": n}})),
            )
            .await;
        jobs.push((n, run["jobs"][0]["id"].as_str().unwrap().to_string()));
    }
    for (n, job_id) in jobs {
        let job = api.finished(&job_id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["result"], json!({ "n": n }), "{job}");
    }
    assert_eq!(
        api.running.state.ssh.pool.forwards(),
        0,
        "every route removed"
    );
}
