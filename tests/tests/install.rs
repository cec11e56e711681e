//! The one-line installer end to end: `/install.sh` from a real control plane with a signed
//! release, run with `sh` (dash) and bash into a temp `--prefix` with `--no-service`; the agent
//! it starts comes online and runs a job. And the refusals: a tampered binary, a missing or
//! garbage signature, a modified manifest, another key, a binary that does not match its signed
//! manifest, an older version than the installed one, no openssl, a reused token; each with a
//! clear message, a non-zero exit, and nothing placed under the prefix or executed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::cluster::json_str;
use cronium_e2e::release::{agent_target, keygen, run_installer, sign, spawn_installer};
use cronium_e2e::{EventSpec, TestCluster};
use serde_json::json;

/// Both shells the installer must work with (dash is Debian's `sh`).
const SHELLS: [&str; 2] = ["/bin/dash", "/bin/bash"];

/// Waits until an agent called `name` is online and returns its id.
async fn wait_agent_named(cluster: &TestCluster, name: &str) -> Result<String> {
    cluster
        .wait_until(
            Duration::from_secs(120),
            &format!("agent {name} online"),
            || async {
                let agents = cluster.api().get_ok("/api/v1/agents").await?;
                Ok(agents
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|agent| agent["name"] == name && agent["status"] == "online")
                    .and_then(|agent| agent["id"].as_str().map(str::to_owned)))
            },
        )
        .await
}

async fn one_use_token(cluster: &TestCluster) -> Result<String> {
    let created = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    let command = json_str(&created, "install_command")?;
    ensure!(
        command.starts_with(&format!(
            "curl -fsSL {}/install.sh | sudo sh -s -- --token ",
            cluster.http_url()
        )),
        "install_command: {command}"
    );
    json_str(&created, "token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_installs_a_verified_agent_that_comes_online_and_runs_a_job() -> Result<()> {
    let cluster = TestCluster::start().await?;
    cluster.publish_agent_release(None, None).await?;
    let script = cluster.download_install_script().await?;
    for (index, shell) in SHELLS.iter().enumerate() {
        let token = one_use_token(&cluster).await?;
        let prefix = cluster.dir().join(format!("prefix-{index}"));
        let name = format!("installed-{index}");
        let command = cluster.installer_command(
            shell,
            &script,
            &[
                "--token",
                &token,
                "--name",
                &name,
                "--labels",
                "via=install",
                "--prefix",
                prefix.to_str().context("utf-8 path")?,
                "--no-service",
            ],
            &[],
        );
        let log = cluster.dir().join(format!("install-{index}.log"));
        let mut installer = spawn_installer(&name, command, &log)?;
        let agent_id = match wait_agent_named(&cluster, &name).await {
            Ok(id) => id,
            Err(error) => bail!("{error:#}\ninstaller log:\n{}", installer.log_tail(40)),
        };
        let binary = prefix.join("bin/cronium-agent");
        ensure!(binary.is_file(), "{} was not installed", binary.display());
        ensure!(
            prefix.join("var/lib/cronium-agent/agent.json").is_file(),
            "the state dir is under the prefix"
        );
        let marker = cronium_e2e::unique_marker("installed");
        let job = cluster
            .run_single_job(
                &EventSpec::bash(&format!("hello-{index}"), &format!("echo {marker}"))
                    .target(&agent_id),
            )
            .await?;
        let finished = cluster
            .wait_job_final(&job, Duration::from_secs(60))
            .await?;
        ensure!(finished["status"] == "completed", "job: {finished}");
        ensure!(
            finished["output"]
                .as_str()
                .unwrap_or_default()
                .contains(&marker),
            "job output: {finished}"
        );

        // Running it again is safe: same version kept, enrollment skipped (no token needed).
        installer.kill()?;
        let again = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                prefix.to_str().context("utf-8 path")?,
                "--no-service",
                "--version",
                "0.0.0-does-not-exist",
            ],
            &[],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&again.stderr);
        ensure!(
            !again.status.success() && stderr.contains("cannot download"),
            "a missing version is refused: {stderr}"
        );
        let rerun_log = cluster.dir().join(format!("install-{index}-again.log"));
        let mut rerun = spawn_installer(
            &format!("{name} again"),
            cluster.installer_command(
                shell,
                &script,
                &[
                    "--prefix",
                    prefix.to_str().context("utf-8 path")?,
                    "--no-service",
                ],
                &[],
            ),
            &rerun_log,
        )?;
        let text = cluster
            .wait_until(
                Duration::from_secs(60),
                "the second run to start the agent",
                || async {
                    let text = std::fs::read_to_string(&rerun_log)?;
                    Ok(text
                        .contains("starting the agent in the foreground")
                        .then_some(text))
                },
            )
            .await?;
        ensure!(
            text.contains("is installed already: keeping it") && text.contains("already enrolled"),
            "second run: {text}"
        );
        ensure!(
            rerun.try_wait()?.is_none(),
            "the second run's agent exited: {text}"
        );
        rerun.kill()?;
    }
    Ok(())
}

/// Everything under `dir`, for "nothing was placed here" checks.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_refuses_tampered_unsigned_foreign_and_older_releases() -> Result<()> {
    let cluster = TestCluster::start().await?;
    let keys = cluster.publish_agent_release(None, None).await?;
    let target = agent_target()?;
    let releases = cluster.releases_dir();
    let script = cluster.download_install_script().await?;
    let other_key = keygen(&cluster.dir().join("other-key")).await?;

    // Each bad release is a script that would leave a trace if it were ever executed.
    let ran = cluster.dir().join("unverified-binary-ran");
    let evil = format!("#!/bin/sh\ntouch {}\n", ran.display());
    let make = |version: &str| -> Result<PathBuf> {
        let dir = releases.join(version).join(&target);
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("cronium-agent");
        std::fs::write(&file, &evil)?;
        Ok(file)
    };
    let with = |file: &Path, suffix: &str| {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };

    // 0.3.1: binary modified after signing.
    let file = make("0.3.1")?;
    sign(&file, &keys.private, "0.3.1", &target).await?;
    std::fs::write(&file, format!("{evil}# tampered\n"))?;
    // 0.3.2: signature missing.
    let file = make("0.3.2")?;
    sign(&file, &keys.private, "0.3.2", &target).await?;
    std::fs::remove_file(with(&file, ".sig"))?;
    // 0.3.3: signature garbage.
    let file = make("0.3.3")?;
    sign(&file, &keys.private, "0.3.3", &target).await?;
    std::fs::write(with(&file, ".sig"), b"garbage")?;
    // 0.3.4: manifest modified after signing (another sha256).
    let file = make("0.3.4")?;
    sign(&file, &keys.private, "0.3.4", &target).await?;
    let manifest_path = with(&file, ".manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    let sha = cronium_e2e::sha256_hex(evil.as_bytes());
    std::fs::write(
        &manifest_path,
        manifest.replace(&sha, &cronium_e2e::sha256_hex(b"something else")),
    )?;
    // 0.3.5: everything signed with another key.
    let file = make("0.3.5")?;
    sign(&file, &other_key.private, "0.3.5", &target).await?;
    // 0.3.6: both signatures valid, but the binary is not the one the manifest describes.
    let file = make("0.3.6")?;
    sign(&file, &keys.private, "0.3.6", &target).await?;
    let other_binary = cluster.dir().join("other-binary");
    std::fs::write(&other_binary, format!("{evil}# another build\n"))?;
    sign(&other_binary, &keys.private, "0.3.6", &target).await?;
    std::fs::copy(&other_binary, &file)?;
    std::fs::copy(with(&other_binary, ".sig"), with(&file, ".sig"))?;

    let cases = [
        ("0.3.1", "the signature of the agent binary does not verify"),
        ("0.3.2", "cannot download"),
        ("0.3.3", "the signature of the agent binary does not verify"),
        (
            "0.3.4",
            "the signature of the release manifest does not verify",
        ),
        (
            "0.3.5",
            "the signature of the release manifest does not verify",
        ),
        ("0.3.6", "sha256 differs from the signed manifest"),
    ];
    for shell in SHELLS {
        for (version, expected) in cases {
            let prefix = cluster
                .dir()
                .join(format!("bad-{version}-{}", shell.replace('/', "_")));
            let output = run_installer(cluster.installer_command(
                shell,
                &script,
                &[
                    "--prefix",
                    prefix.to_str().context("utf-8 path")?,
                    "--no-service",
                    "--version",
                    version,
                ],
                &[("CRONIUM_ENROLL_TOKEN", "cre_never-used")],
            ))
            .await?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            ensure!(
                !output.status.success(),
                "{shell}: release {version} was accepted: {stderr}"
            );
            ensure!(
                stderr.contains(expected) && stderr.contains("error:"),
                "{shell}: release {version}: expected {expected:?}, got: {stderr}"
            );
            let placed = files_under(&prefix);
            ensure!(
                placed.is_empty(),
                "{shell}: release {version} left files under the prefix: {placed:?}"
            );
            ensure!(
                !ran.exists(),
                "{shell}: the unverified binary of {version} was executed"
            );
        }

        // No openssl on the PATH: a clear refusal before anything is downloaded.
        let empty_path = cluster.dir().join("empty-path");
        std::fs::create_dir_all(&empty_path)?;
        let prefix = cluster.dir().join("no-openssl");
        let output = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                prefix.to_str().context("utf-8 path")?,
                "--no-service",
            ],
            &[
                ("CRONIUM_ENROLL_TOKEN", "cre_never-used"),
                ("PATH", empty_path.to_str().context("utf-8 path")?),
            ],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("openssl not found"),
            "{shell} without openssl: {stderr}"
        );
        ensure!(
            files_under(&prefix).is_empty(),
            "nothing placed without openssl"
        );
    }

    // A real install of the current version, then: an older signed version is refused, and a
    // used-up token is refused with nothing left behind.
    let token = one_use_token(&cluster).await?;
    let prefix = cluster.dir().join("installed");
    let prefix_text = prefix.to_str().context("utf-8 path")?.to_owned();
    let log = cluster.dir().join("install-real.log");
    let current = cronium_e2e_version(&cronium_e2e::binary("cronium-agent")?)?;
    let mut installer = spawn_installer(
        "installer",
        cluster.installer_command(
            SHELLS[0],
            &script,
            &[
                "--name",
                "real",
                "--prefix",
                &prefix_text,
                "--no-service",
                "--version",
                &current,
            ],
            &[("CRONIUM_ENROLL_TOKEN", &token)],
        ),
        &log,
    )?;
    if let Err(error) = wait_agent_named(&cluster, "real").await {
        bail!("{error:#}\ninstaller log:\n{}", installer.log_tail(40));
    }
    installer.kill()?;
    let binary = prefix.join("bin/cronium-agent");
    let before = cronium_e2e::sha256_hex(&std::fs::read(&binary)?);
    let older = releases.join("0.0.1").join(&target);
    std::fs::create_dir_all(&older)?;
    std::fs::write(older.join("cronium-agent"), &evil)?;
    sign(
        &older.join("cronium-agent"),
        &keys.private,
        "0.0.1",
        &target,
    )
    .await?;
    for shell in SHELLS {
        let output = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                &prefix_text,
                "--no-service",
                "--version",
                "0.0.1",
            ],
            &[],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("downgrades are refused"),
            "{shell}: downgrade: {stderr}"
        );
        ensure!(
            cronium_e2e::sha256_hex(&std::fs::read(&binary)?) == before,
            "the installed binary changed"
        );
        ensure!(!ran.exists(), "the older binary was executed");
        let leftovers: Vec<_> = files_under(&prefix.join("bin"))
            .into_iter()
            .filter(|path| path != &binary)
            .collect();
        ensure!(leftovers.is_empty(), "left in bin: {leftovers:?}");

        let reused = cluster
            .dir()
            .join(format!("reused-{}", shell.replace('/', "_")));
        let output = run_installer(cluster.installer_command(
            shell,
            &script,
            &[
                "--prefix",
                reused.to_str().context("utf-8 path")?,
                "--no-service",
                "--version",
                &current,
            ],
            &[("CRONIUM_ENROLL_TOKEN", &token)],
        ))
        .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success()
                && stderr.contains("already been used")
                && stderr.contains("enrollment was refused"),
            "{shell}: reused token: {stderr}"
        );
        ensure!(
            !reused.join("bin/cronium-agent").exists(),
            "{shell}: a refused enrollment left the binary installed"
        );
    }
    Ok(())
}

/// The version an installed agent reports.
fn cronium_e2e_version(binary: &Path) -> Result<String> {
    let output = std::process::Command::new(binary).arg("version").output()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("cronium-agent version output")
}
