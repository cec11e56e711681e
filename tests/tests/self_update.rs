//! Agent self-update end to end: an agent installed with `/install.sh` (so the release key is
//! pinned the real way) into a temp prefix, running in the foreground; the control plane's update
//! policy (`PUT /api/v1/agent-update`) announces a version over QUIC; the agent downloads it over
//! HTTP, verifies it with its pinned key and restarts into it in place (same pid), or refuses it,
//! or rolls back. Real binaries, real QUIC, real processes.
//!
//! "Newer" versions are the same built agent signed with a higher manifest version (the agent's
//! version is what the signed manifest of its binary says). Bad releases are shell scripts that
//! would leave a trace if they were ever executed.
//!
//! Also: an agent enrolled by hand with `cronium-agent enroll --release-key`, and the pid file of
//! an `install.sh --detach` agent across a rollback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::process::ChildGuard;
use cronium_e2e::release::{agent_target, keygen, sign, spawn_installer};
use cronium_e2e::{EventSpec, TestCluster};
use reqwest::Method;
use serde_json::{Value, json};

/// How long an update (download of a ~60 MB debug binary over loopback, verification, drain,
/// restart, reconnect) may take.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(120);

/// One agent installed by `/install.sh --no-service` under `prefix`.
struct Installed {
    id: String,
    prefix: PathBuf,
    installer: ChildGuard,
}

impl Installed {
    fn bin(&self) -> PathBuf {
        self.prefix.join("bin/cronium-agent")
    }

    fn state_dir(&self) -> PathBuf {
        self.prefix.join("var/lib/cronium-agent")
    }

    /// Files in the bin dir other than the installed binary (and, when allowed, its `.prev`).
    fn bin_leftovers(&self, allow_prev: bool) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.prefix.join("bin"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name == "cronium-agent" || (allow_prev && name == "cronium-agent.prev") {
                continue;
            }
            names.push(name);
        }
        Ok(names)
    }
}

/// Installs an agent named `name` with `install.sh` (dash) and waits until it is online.
async fn install_agent(
    cluster: &TestCluster,
    name: &str,
    labels: &str,
    env: &[(&str, &str)],
) -> Result<Installed> {
    let script = cluster.download_install_script().await?;
    let created = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    let token = cronium_e2e::cluster::json_str(&created, "token")?;
    let prefix = cluster.dir().join(format!("prefix-{name}"));
    let prefix_text = prefix.to_str().context("utf-8 path")?.to_owned();
    let mut all_env = vec![("CRONIUM_ENROLL_TOKEN", token.as_str())];
    all_env.extend_from_slice(env);
    let command = cluster.installer_command(
        "/bin/dash",
        &script,
        &[
            "--name",
            name,
            "--labels",
            labels,
            "--prefix",
            &prefix_text,
            "--no-service",
        ],
        &all_env,
    );
    let log = cluster.dir().join(format!("install-{name}.log"));
    let installer = spawn_installer(name, command, &log)?;
    let id = match wait_agent(cluster, name, |agent| agent["status"] == "online").await {
        Ok(agent) => agent["id"].as_str().context("agent id")?.to_owned(),
        Err(error) => bail!("{error:#}\ninstaller log:\n{}", installer.log_tail(60)),
    };
    Ok(Installed {
        id,
        prefix,
        installer,
    })
}

/// Waits until the agent called `name` satisfies `condition`; returns its JSON.
async fn wait_agent(
    cluster: &TestCluster,
    name: &str,
    condition: impl Fn(&Value) -> bool,
) -> Result<Value> {
    cluster
        .wait_until(UPDATE_TIMEOUT, &format!("agent {name}"), || async {
            let agents = cluster.api().get_ok("/api/v1/agents").await?;
            Ok(agents
                .as_array()
                .into_iter()
                .flatten()
                .find(|agent| agent["name"] == name && condition(agent))
                .cloned())
        })
        .await
}

/// Waits until the agent's update for `version` reached `state`; returns the agent's JSON.
async fn wait_update(
    cluster: &TestCluster,
    name: &str,
    version: &str,
    state: &str,
) -> Result<Value> {
    let result = wait_agent(cluster, name, |agent| {
        agent["update"]["target_version"] == version && agent["update"]["state"] == state
    })
    .await;
    match result {
        Ok(agent) => Ok(agent),
        Err(error) => {
            let agents = cluster.api().get_ok("/api/v1/agents").await?;
            bail!("{error:#}\nagents: {agents:#}")
        }
    }
}

async fn set_policy(cluster: &TestCluster, body: Value) -> Result<Value> {
    cluster
        .api()
        .send(Method::PUT, "/api/v1/agent-update", Some(&body))
        .await?
        .expect_status(200, "PUT /api/v1/agent-update")
}

/// The version of the built agent (`cronium-agent version`).
fn built_version() -> Result<String> {
    let output = std::process::Command::new(cronium_e2e::binary("cronium-agent")?)
        .arg("version")
        .output()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("cronium-agent version output")
}

async fn run_job(cluster: &TestCluster, agent_id: &str, name: &str) -> Result<()> {
    let marker = cronium_e2e::unique_marker(name);
    let job = cluster
        .run_single_job(&EventSpec::bash(name, &format!("echo {marker}")).target(agent_id))
        .await?;
    let finished = cluster
        .wait_job_final(&job, Duration::from_secs(60))
        .await?;
    ensure!(
        finished["status"] == "completed"
            && finished["output"]
                .as_str()
                .unwrap_or_default()
                .contains(&marker),
        "job on the agent: {finished}"
    );
    Ok(())
}

fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_newer_release_is_verified_installed_in_place_and_keeps_running_jobs()
-> Result<()> {
    let cluster = TestCluster::start().await?;
    let current = built_version()?;
    cluster.publish_agent_release(Some(&current), None).await?;
    let mut agent = install_agent(&cluster, "updating", "ring=canary", &[]).await?;
    // The installer pinned the release key and recorded the signed manifest it installed from.
    for file in [
        "release-key.pub",
        "installed.manifest.json",
        "installed.manifest.json.sig",
    ] {
        ensure!(
            agent.state_dir().join(file).is_file(),
            "the installer did not write {file}"
        );
    }
    let shown = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{}", agent.id))
        .await?;
    ensure!(shown["version"] == current.as_str(), "agent: {shown}");
    ensure!(shown["update"].is_null(), "no update yet: {shown}");
    let binary_before = cronium_e2e::sha256_hex(&std::fs::read(agent.bin())?);

    // Policy validation and admin-only access.
    let refused = cluster
        .api()
        .send(
            Method::PUT,
            "/api/v1/agent-update",
            Some(&json!({"version": "latest", "percentage": 100})),
        )
        .await?;
    ensure!(refused.status == 422, "bad version: {}", refused.text);
    ensure!(refused.expect_error_shape("bad version")? == "invalid");
    let refused = cluster
        .api()
        .send(
            Method::PUT,
            "/api/v1/agent-update",
            Some(&json!({"version": "1.0.0", "percentage": 101})),
        )
        .await?;
    ensure!(refused.status == 422, "bad percentage: {}", refused.text);
    let shown = cluster.api().get_ok("/api/v1/agent-update").await?;
    ensure!(shown["policy"].is_null(), "no policy yet: {shown}");
    let (_, user_token) = cluster.create_user("operator", "user").await?;
    let as_user = cluster.api().with_token(Some(&user_token));
    for (method, body) in [
        (Method::GET, None),
        (Method::PUT, Some(json!({"version": "50.0.0"}))),
        (Method::DELETE, None),
    ] {
        let refused = as_user
            .send(method.clone(), "/api/v1/agent-update", body.as_ref())
            .await?;
        ensure!(
            refused.status == 403,
            "{method} as a user: {}",
            refused.text
        );
    }

    // A job that runs while the update is announced finishes (the agent drains first).
    let marker = cronium_e2e::unique_marker("drained");
    let running_job = cluster
        .run_single_job(
            &EventSpec::bash("during-update", &format!("sleep 3; echo {marker}")).target(&agent.id),
        )
        .await?;
    cluster
        .wait_job_status(&running_job, &["running"], Duration::from_secs(60))
        .await?;

    let newer = "50.0.0";
    cluster.publish_agent_release(Some(newer), None).await?;
    let policy = set_policy(
        &cluster,
        json!({"version": newer, "labels": {"ring": "canary"}, "percentage": 100}),
    )
    .await?;
    ensure!(
        policy["policy"]["version"] == newer
            && policy["policy"]["available_targets"]
                .as_array()
                .is_some_and(|targets| targets.contains(&json!(agent_target().unwrap_or_default()))),
        "policy: {policy}"
    );
    let updated = wait_update(&cluster, "updating", newer, "succeeded").await?;
    let updated = wait_agent(&cluster, "updating", |agent| {
        agent["status"] == "online" && agent["version"] == newer
    })
    .await
    .with_context(|| format!("after the update: {updated}"))?;
    ensure!(updated["update"]["reason"].is_null(), "agent: {updated}");

    let finished = cluster
        .wait_job_final(&running_job, Duration::from_secs(60))
        .await?;
    ensure!(
        finished["status"] == "completed"
            && finished["output"]
                .as_str()
                .unwrap_or_default()
                .contains(&marker),
        "the job running during the update: {finished}"
    );
    // The same process (exec in place), the new binary installed, the old one kept as .prev,
    // nothing else left next to it.
    ensure!(
        agent.installer.try_wait()?.is_none(),
        "the agent process exited instead of executing the new binary in place"
    );
    ensure!(
        cronium_e2e::sha256_hex(&std::fs::read(agent.bin())?) == binary_before,
        "the installed binary is not the signed one"
    );
    ensure!(
        agent.prefix.join("bin/cronium-agent.prev").is_file(),
        "the previous binary is kept"
    );
    let leftovers = agent.bin_leftovers(true)?;
    ensure!(leftovers.is_empty(), "left in bin: {leftovers:?}");
    let manifest = std::fs::read_to_string(agent.state_dir().join("installed.manifest.json"))?;
    ensure!(
        manifest.contains(&format!("\"version\": \"{newer}\"")),
        "installed manifest: {manifest}"
    );
    ensure!(
        !agent.state_dir().join("update-pending.json").exists(),
        "the pending marker is removed"
    );
    run_job(&cluster, &agent.id, "after-update").await?;

    // The update is not repeated (same version) when the policy is set again (by the CLI).
    let set = cronium_cli(&cluster, &["set", newer, "--percentage", "100"]).await?;
    ensure!(
        set.contains(&format!("version:     {newer}")) && set.contains("(all agents)"),
        "cronium agent-update set: {set}"
    );
    run_job(&cluster, &agent.id, "after-policy-again").await?;
    let shown = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{}", agent.id))
        .await?;
    ensure!(
        shown["version"] == newer && shown["update"]["state"] == "succeeded",
        "agent: {shown}"
    );
    ensure!(
        agent.installer.try_wait()?.is_none(),
        "the agent still runs"
    );
    let show = cronium_cli(&cluster, &["show"]).await?;
    let line = show
        .lines()
        .find(|line| line.starts_with("updating "))
        .with_context(|| format!("cronium agent-update show: {show}"))?;
    ensure!(
        line.contains(newer) && line.contains("succeeded") && line.contains("online"),
        "cronium agent-update show: {show}"
    );
    let cleared = cluster.api().delete("/api/v1/agent-update").await?;
    ensure!(cleared.status == 204, "DELETE: {}", cleared.text);
    let show = cronium_cli(&cluster, &["show"]).await?;
    ensure!(
        show.contains("no agent update policy"),
        "after DELETE: {show}"
    );
    Ok(())
}

/// Runs `cronium agent-update ARGS…` against the cluster; returns its stdout.
async fn cronium_cli(cluster: &TestCluster, args: &[&str]) -> Result<String> {
    let mut command = tokio::process::Command::new(cronium_e2e::binary("cronium")?);
    command
        .arg("agent-update")
        .args(args)
        .args(["--server", &cluster.http_url()])
        .env("CRONIUM_TOKEN", cluster.admin_token())
        .env_remove("CRONIUM_URL")
        .env("CRONIUM_DATA_DIR", cluster.dir().join("no-cli-config"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("cronium agent-update timed out")??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "cronium agent-update {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_unsigned_foreign_and_older_releases_are_refused_and_never_run() -> Result<()> {
    let mut cluster = TestCluster::start().await?;
    let current = built_version()?;
    let keys = cluster.publish_agent_release(Some(&current), None).await?;
    let target = agent_target()?;
    let releases = cluster.releases_dir();
    let other_key = keygen(&cluster.dir().join("other-key")).await?;
    let mut agent = install_agent(&cluster, "guarded", "ring=all", &[]).await?;
    let binary_before = cronium_e2e::sha256_hex(&std::fs::read(agent.bin())?);
    // An agent enrolled without the installer has no pinned key: it refuses every update.
    let unpinned = cluster.add_agent("unpinned").await?;

    let ran = cluster.dir().join("unverified-binary-ran");
    let evil = unverified_binary(&ran, &target);
    let make = |version: &str| place_release(&releases, version, &target, &evil);
    // 60.0.1: binary modified after signing.
    let file = make("60.0.1")?;
    sign(&file, &keys.private, "60.0.1", &target).await?;
    std::fs::write(&file, format!("{evil}# tampered\n"))?;
    // 60.0.2: no signature at all.
    let file = make("60.0.2")?;
    sign(&file, &keys.private, "60.0.2", &target).await?;
    std::fs::remove_file(with_suffix(&file, ".sig"))?;
    // 60.0.3: garbage signature of the binary.
    let file = make("60.0.3")?;
    sign(&file, &keys.private, "60.0.3", &target).await?;
    std::fs::write(with_suffix(&file, ".sig"), b"garbage")?;
    // 60.0.4: manifest modified after signing.
    let file = make("60.0.4")?;
    sign(&file, &keys.private, "60.0.4", &target).await?;
    let manifest_path = with_suffix(&file, ".manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    std::fs::write(
        &manifest_path,
        manifest.replace(
            &cronium_e2e::sha256_hex(evil.as_bytes()),
            &cronium_e2e::sha256_hex(b"something else"),
        ),
    )?;
    // 60.0.5: everything signed with another key.
    let file = make("60.0.5")?;
    sign(&file, &other_key.private, "60.0.5", &target).await?;
    // 60.0.6: binary modified after signing, same size.
    let file = make("60.0.6")?;
    sign(&file, &keys.private, "60.0.6", &target).await?;
    std::fs::write(&file, evil.replacen("touch", "TOUCH", 1))?;
    // 0.0.1: correctly signed, but older than the installed version.
    let file = make("0.0.1")?;
    sign(&file, &keys.private, "0.0.1", &target).await?;

    let cases = [
        ("60.0.1", "larger than the"),
        ("60.0.6", "sha256 differs from the signed manifest"),
        ("60.0.2", "cannot download"),
        (
            "60.0.3",
            "the signature of the agent binary does not verify with the pinned release key",
        ),
        (
            "60.0.4",
            "the signature of the release manifest does not verify with the pinned release key",
        ),
        (
            "60.0.5",
            "the signature of the release manifest does not verify with the pinned release key",
        ),
        ("0.0.1", "downgrades are refused"),
    ];
    for (version, expected) in cases {
        set_policy(&cluster, json!({"version": version, "percentage": 100})).await?;
        let refused = wait_update(&cluster, "guarded", version, "failed").await?;
        let reason = refused["update"]["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains(expected),
            "release {version}: expected {expected:?} in the reason, got: {refused}"
        );
        ensure!(
            refused["status"] == "online" && refused["version"] == current.as_str(),
            "release {version}: the agent must keep running its version: {refused}"
        );
        ensure!(
            agent.installer.try_wait()?.is_none(),
            "release {version}: the agent process exited"
        );
        ensure!(
            cronium_e2e::sha256_hex(&std::fs::read(agent.bin())?) == binary_before,
            "release {version}: the installed binary changed"
        );
        let leftovers = agent.bin_leftovers(false)?;
        ensure!(
            leftovers.is_empty(),
            "release {version}: the unverified file was left: {leftovers:?}"
        );
        ensure!(
            !ran.exists(),
            "release {version}: the unverified binary was executed"
        );
        let unpinned_state = wait_update(&cluster, "unpinned", version, "failed").await?;
        let reason = unpinned_state["update"]["reason"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            reason.contains("no release key is pinned") || reason.contains("downgrades"),
            "an agent without a pinned key: {unpinned_state}"
        );
    }
    run_job(&cluster, &agent.id, "after-refusals").await?;
    cluster.kill_agent(&unpinned.id)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_exits_or_never_connects_is_rolled_back() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let current = built_version()?;
    let keys = cluster.publish_agent_release(Some(&current), None).await?;
    let target = agent_target()?;
    let releases = cluster.releases_dir();
    let mut agent = install_agent(
        &cluster,
        "rollback",
        "ring=all",
        &[("CRONIUM_AGENT_UPDATE_DEADLINE", "8s")],
    )
    .await?;
    let binary_before = cronium_e2e::sha256_hex(&std::fs::read(agent.bin())?);

    // Both are properly signed and pass the `version` check, but one exits at once when run and
    // the other starts and never connects.
    let releases_of = |version: &str, run: &str| -> Result<PathBuf> {
        let dir = releases.join(version).join(&target);
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("cronium-agent");
        std::fs::write(
            &file,
            format!(
                "#!/bin/sh\nif [ \"$1\" = version ]; then echo 'cronium-agent {version} ({target}), protocol 1..=1'; exit 0; fi\n{run}\n"
            ),
        )?;
        Ok(file)
    };
    let exits = releases_of("70.0.0", "exit 3")?;
    sign(&exits, &keys.private, "70.0.0", &target).await?;
    let hangs = releases_of("71.0.0", "exec sleep 600")?;
    sign(&hangs, &keys.private, "71.0.0", &target).await?;

    for (version, expected) in [
        ("70.0.0", "exited before it connected"),
        (
            "71.0.0",
            "did not connect to the control plane before the deadline",
        ),
    ] {
        set_policy(&cluster, json!({"version": version, "percentage": 100})).await?;
        let rolled_back = wait_update(&cluster, "rollback", version, "rolled_back").await?;
        let reason = rolled_back["update"]["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains(expected),
            "release {version}: expected {expected:?}, got: {rolled_back}"
        );
        let online = wait_agent(&cluster, "rollback", |agent| {
            agent["status"] == "online" && agent["version"] == current.as_str()
        })
        .await?;
        ensure!(
            online["update"]["state"] == "rolled_back",
            "release {version}: {online}"
        );
        ensure!(
            cronium_e2e::sha256_hex(&std::fs::read(agent.bin())?) == binary_before,
            "release {version}: the installed binary changed"
        );
        let leftovers = agent.bin_leftovers(false)?;
        ensure!(
            leftovers.is_empty(),
            "release {version}: left in bin: {leftovers:?}"
        );
        run_job(&cluster, &agent.id, &format!("after-rollback-{version}")).await?;
    }
    // The first rollback replaced the installer's process (the watchdog started the old binary
    // again); the cluster finds and kills that one on drop through its marker.
    ensure!(
        agent.installer.try_wait()?.is_some(),
        "the process that ran the exiting binary is gone"
    );
    Ok(())
}

/// `cronium-agent` and its arguments, with the cluster's marker (found and killed on drop) and
/// no inherited `CRONIUM_*` settings.
fn agent_command(cluster: &TestCluster, bin: &Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(bin);
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CRONIUM_") {
            command.env_remove(&name);
        }
    }
    command.env(cronium_e2e::cluster::CLUSTER_MARKER_VAR, cluster.marker());
    command
}

/// An agent enrolled by hand (`cronium-agent enroll --release-key`, no installer) pins the key it
/// is given: a malformed key (or a private key, or a missing file) is refused before the token
/// is sent; with the control plane's key, a release signed by another key is refused (whole
/// release, and only the binary's signature) and never run, and a correctly signed one is
/// installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolled_with_release_key_accepts_only_releases_signed_by_that_key() -> Result<()>
{
    let cluster = TestCluster::start().await?;
    let current = built_version()?;
    let keys = cluster.publish_agent_release(Some(&current), None).await?;
    let target = agent_target()?;
    let releases = cluster.releases_dir();
    let other_key = keygen(&cluster.dir().join("other-key")).await?;

    // The key an operator fetches from the control plane.
    let response = reqwest::get(cluster.api().url("/downloads/release-key")).await?;
    ensure!(response.status() == 200, "GET /downloads/release-key");
    let release_key = response.text().await?;
    ensure!(
        release_key.trim() == std::fs::read_to_string(&keys.public)?.trim(),
        "the served key is the cluster's release key: {release_key}"
    );
    let key_file = cluster.dir().join("release-key.pem");
    std::fs::write(&key_file, &release_key)?;

    // The agent runs from a copy of its own (a self-update writes next to the binary).
    let home = cluster.dir().join("manual");
    let bin = home.join("bin/cronium-agent");
    std::fs::create_dir_all(home.join("bin"))?;
    std::fs::copy(cronium_e2e::binary("cronium-agent")?, &bin)?;
    let state_dir = home.join("state");
    let state_text = state_dir.to_str().context("utf-8 path")?.to_owned();
    let created = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    let token = cronium_e2e::cluster::json_str(&created, "token")?;
    let ca_sha256 = cronium_e2e::cluster::json_str(&created, "ca_sha256")?;
    let enroll = |key: &Path| {
        let mut command = agent_command(
            &cluster,
            &bin,
            &[
                "enroll",
                "--server",
                &cluster.http_url(),
                "--ca-sha256",
                &ca_sha256,
                "--name",
                "manual",
                "--state-dir",
                &state_text,
                "--release-key",
                key.to_str().unwrap_or_default(),
            ],
        );
        command.env("CRONIUM_ENROLL_TOKEN", &token);
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(Duration::from_secs(60), command.output())
                .await
                .context("cronium-agent enroll timed out")?
                .context("run cronium-agent enroll")
        }
    };

    // Malformed keys: a clear message, a non-zero exit, nothing written, the token not used.
    let garbage = cluster.dir().join("garbage-key.pem");
    std::fs::write(&garbage, "this is not a key\n")?;
    let not_ed25519 = cluster.dir().join("not-ed25519.pem");
    std::fs::write(
        &not_ed25519,
        "-----BEGIN PUBLIC KEY-----\nbm90IGFuIGVkMjU1MTkga2V5\n-----END PUBLIC KEY-----\n",
    )?;
    let missing = cluster.dir().join("no-such-key.pem");
    for (file, expected) in [
        (&garbage, "not a PEM, hex or base64 public key"),
        (&not_ed25519, "not an ed25519 public key"),
        (
            &keys.private,
            "this is a PRIVATE key; the agent needs only the public key",
        ),
        (&missing, "does not exist"),
    ] {
        let output = enroll(file).await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success()
                && stderr.contains(expected)
                && stderr.contains(file.to_str().unwrap_or_default()),
            "--release-key {}: expected {expected:?}, got: {stderr}",
            file.display()
        );
        ensure!(
            !state_dir.join("agent.json").exists() && !state_dir.join("release-key.pub").exists(),
            "--release-key {}: something was written in the state dir",
            file.display()
        );
    }
    // The one-use token was never sent: it enrolls now, with the control plane's key pinned.
    let output = enroll(&key_file).await?;
    ensure!(
        output.status.success(),
        "enroll --release-key: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        std::fs::read_to_string(state_dir.join("release-key.pub"))?.trim() == release_key.trim(),
        "the pinned key is the one given"
    );

    let (mut agent, _) = ChildGuard::spawn(
        "manual",
        agent_command(&cluster, &bin, &["run", "--state-dir", &state_text]),
        &home.join("agent.log"),
        None,
    )?;
    let online = match wait_agent(&cluster, "manual", |agent| agent["status"] == "online").await {
        Ok(online) => online,
        Err(error) => bail!("{error:#}\nagent log:\n{}", agent.log_tail(40)),
    };
    ensure!(online["version"] == current.as_str(), "agent: {online}");
    let agent_id = online["id"].as_str().context("agent id")?.to_owned();
    let binary_before = cronium_e2e::sha256_hex(&std::fs::read(&bin)?);

    // Signed by another key: the whole release, or only the binary (its manifest is genuine).
    let ran = cluster.dir().join("foreign-binary-ran");
    let evil = unverified_binary(&ran, &target);
    let make = |version: &str| place_release(&releases, version, &target, &evil);
    let file = make("60.0.5")?;
    sign(&file, &other_key.private, "60.0.5", &target).await?;
    let file = make("60.0.7")?;
    sign(&file, &keys.private, "60.0.7", &target).await?;
    let foreign = cluster.dir().join("foreign-binary");
    std::fs::write(&foreign, &evil)?;
    sign(&foreign, &other_key.private, "60.0.7", &target).await?;
    std::fs::copy(with_suffix(&foreign, ".sig"), with_suffix(&file, ".sig"))?;
    for (version, expected) in [
        (
            "60.0.5",
            "the signature of the release manifest does not verify with the pinned release key",
        ),
        (
            "60.0.7",
            "the signature of the agent binary does not verify with the pinned release key",
        ),
    ] {
        set_policy(&cluster, json!({"version": version, "percentage": 100})).await?;
        let refused = wait_update(&cluster, "manual", version, "failed").await?;
        let reason = refused["update"]["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains(expected),
            "release {version}: expected {expected:?}, got: {refused}"
        );
        ensure!(
            refused["status"] == "online" && refused["version"] == current.as_str(),
            "release {version}: {refused}"
        );
        ensure!(
            agent.try_wait()?.is_none(),
            "release {version}: the agent exited"
        );
        ensure!(
            cronium_e2e::sha256_hex(&std::fs::read(&bin)?) == binary_before,
            "release {version}: the binary changed"
        );
        let leftovers: Vec<_> = std::fs::read_dir(home.join("bin"))?
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name != "cronium-agent")
            .collect();
        ensure!(
            leftovers.is_empty(),
            "release {version}: left next to the binary: {leftovers:?}"
        );
        ensure!(!ran.exists(), "release {version}: the foreign binary ran");
    }

    // Signed with the pinned key: verified, executed in place (same process), installed.
    let newer = "50.0.0";
    cluster.publish_agent_release(Some(newer), None).await?;
    set_policy(&cluster, json!({"version": newer, "percentage": 100})).await?;
    let updated = wait_update(&cluster, "manual", newer, "succeeded").await?;
    wait_agent(&cluster, "manual", |agent| {
        agent["status"] == "online" && agent["version"] == newer
    })
    .await
    .with_context(|| format!("after the update: {updated}"))?;
    ensure!(
        agent.try_wait()?.is_none(),
        "the agent process exited instead of executing the new binary in place"
    );
    ensure!(
        home.join("bin/cronium-agent.prev").is_file(),
        "the previous binary is kept"
    );
    let manifest = std::fs::read_to_string(state_dir.join("installed.manifest.json"))?;
    ensure!(
        manifest.contains(&format!("\"version\": \"{newer}\"")),
        "installed manifest: {manifest}"
    );
    run_job(&cluster, &agent_id, "after-pinned-update").await?;
    Ok(())
}

/// A rollback replaces the agent's process (the watchdog runs the old binary): for an agent
/// installed with `--no-service --detach`, `agent.pid` follows it, so the installer's
/// `--uninstall` still stops the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_agent_rolled_back_keeps_a_true_pid_file_and_uninstalls() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let current = built_version()?;
    let keys = cluster.publish_agent_release(Some(&current), None).await?;
    let target = agent_target()?;
    let script = cluster.download_install_script().await?;
    let created = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    let token = cronium_e2e::cluster::json_str(&created, "token")?;
    let prefix = cluster.dir().join("prefix-detached");
    let prefix_text = prefix.to_str().context("utf-8 path")?.to_owned();
    let state_dir = prefix.join("var/lib/cronium-agent");
    let bin = prefix.join("bin/cronium-agent");
    let bin_text = bin.to_str().context("utf-8 path")?.to_owned();
    let output = cronium_e2e::release::run_installer(cluster.installer_command(
        "/bin/dash",
        &script,
        &[
            "--name",
            "detached",
            "--prefix",
            &prefix_text,
            "--no-service",
            "--detach",
        ],
        &[("CRONIUM_ENROLL_TOKEN", &token)],
    ))
    .await?;
    ensure!(
        output.status.success(),
        "install --detach: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read_pid = || -> Result<i32> {
        Ok(std::fs::read_to_string(state_dir.join("agent.pid"))?
            .trim()
            .parse()?)
    };
    let first_pid = read_pid()?;
    if let Err(error) = wait_agent(&cluster, "detached", |agent| agent["status"] == "online").await
    {
        bail!(
            "{error:#}\nagent log:\n{}",
            cronium_e2e::process::log_tail(&state_dir.join("agent.log"), 40)
        );
    }

    // Properly signed, but it exits at once when run: rolled back by the watchdog.
    let dir = cluster.releases_dir().join("70.0.0").join(&target);
    std::fs::create_dir_all(&dir)?;
    let exits = dir.join("cronium-agent");
    std::fs::write(
        &exits,
        format!(
            "#!/bin/sh\nif [ \"$1\" = version ]; then echo 'cronium-agent 70.0.0 ({target}), protocol 1..=1'; exit 0; fi\nexit 3\n"
        ),
    )?;
    sign(&exits, &keys.private, "70.0.0", &target).await?;
    set_policy(&cluster, json!({"version": "70.0.0", "percentage": 100})).await?;
    wait_update(&cluster, "detached", "70.0.0", "rolled_back").await?;
    wait_agent(&cluster, "detached", |agent| {
        agent["status"] == "online" && agent["version"] == current.as_str()
    })
    .await?;

    // The agent now runs in another process, and the pid file names it.
    let running: Vec<i32> = cronium_e2e::process::live_processes_with_arg(&bin_text)
        .into_iter()
        .filter(|process| process.cmdline.contains(" run --state-dir "))
        .map(|process| process.pid)
        .collect();
    let pid = read_pid()?;
    ensure!(
        running == [pid] && pid != first_pid,
        "agent.pid says {pid} (first {first_pid}); agent processes: {running:?}"
    );

    // So --uninstall stops it.
    let output = cronium_e2e::release::run_installer(cluster.installer_command(
        "/bin/dash",
        &script,
        &["--uninstall", "--prefix", &prefix_text],
        &[],
    ))
    .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success()
            && stderr.contains(&format!("stopped the detached agent (pid {pid})")),
        "uninstall: {stderr}"
    );
    ensure!(
        cronium_e2e::process::live_processes_with_arg(&bin_text).is_empty(),
        "an agent process is left after --uninstall"
    );
    ensure!(
        !bin.exists() && !state_dir.join("agent.pid").exists(),
        "uninstall left files"
    );
    wait_agent(&cluster, "detached", |agent| agent["status"] != "online").await?;
    Ok(())
}

/// A script posing as an agent binary that touches `ran` if anything ever executes it.
fn unverified_binary(ran: &Path, target: &str) -> String {
    format!(
        "#!/bin/sh\ntouch {}\necho 'cronium-agent 9.9.9 ({target}), protocol 1..=1'\n",
        ran.display()
    )
}

/// Writes `contents` as `version`'s agent binary for `target` in the releases dir (unsigned).
fn place_release(releases: &Path, version: &str, target: &str, contents: &str) -> Result<PathBuf> {
    let dir = releases.join(version).join(target);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("cronium-agent");
    std::fs::write(&file, contents)?;
    Ok(file)
}
