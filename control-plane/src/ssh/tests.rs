//! SSH fallback against a real OpenSSH server: the test starts its own `/usr/sbin/sshd` with a
//! temp config and host key on a free 127.0.0.1 port (killed on drop), lets the test's own user
//! log in with a generated key (`AuthorizedKeysFile` in the temp dir), and drives a real control
//! plane through its router. Password auth is not exercised: it would need a user with a known
//! password, and the tests add no system users.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::crypto::EncryptionKey;
use crate::store::users::Role;
use crate::{Running, ServerConfig};

const DEADLINE: Duration = Duration::from_secs(60);

/// A throwaway sshd; killed (and reaped) on drop.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
    user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen (openssh-client) is needed");
    assert!(status.success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    fn start() -> Sshd {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "these tests need Debian's openssh-server (/usr/sbin/sshd)"
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("host"));
        keygen(&dir.path().join("client"));
        std::fs::copy(
            dir.path().join("client.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("sshd_config"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let sshd = Sshd {
            dir,
            port,
            child,
            user,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < DEADLINE, "sshd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        sshd
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn private_key(&self) -> String {
        std::fs::read_to_string(self.file("client")).unwrap()
    }
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
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database_url: None,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        public_url: None,
        quic_public_addrs: Vec::new(),
        encryption_key: EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap(),
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(5),
        docker_images: crate::DockerImages::default(),
        delivery: crate::tools::DeliveryOptions::default(),
        terminals: crate::terminals::TerminalConfig::default(),
        releases: crate::release::ReleaseConfig::default(),
    };
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

    /// Creates an event on `server` and triggers it; returns the job id.
    async fn run(
        &self,
        server: &Value,
        kind: &str,
        script: &str,
        timeout: u32,
        env: Value,
    ) -> String {
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
        let run = self
            .ok(
                Method::POST,
                &format!("/events/{}/runs", event["id"].as_str().unwrap()),
                Some(json!({})),
            )
            .await;
        assert_eq!(run["jobs"][0]["server_id"], server["id"]);
        assert!(run["jobs"][0].get("agent_id").is_none());
        run["jobs"][0]["id"].as_str().unwrap().to_string()
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
    let sshd = Sshd::start();
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
    let sshd = Sshd::start();
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
    let sshd = Sshd::start();
    let api = api().await;
    let server = api.add_server(&sshd, json!({})).await;

    let marker = format!("cronium-timeout-{}", crate::store::new_id());
    let script = format!(
        "echo \"DIR=$PWD\"\nbash -c 'sleep 1000; : {marker}' &\nbash -c 'sleep 1000; : {marker}'\n"
    );
    let job_id = api.run(&server, "bash", &script, 1, json!({})).await;
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
    let sshd = Sshd::start();
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
    let sshd = Sshd::start();
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
    let sshd = Sshd::start();
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
