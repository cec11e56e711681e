//! The install phase: from `sh install.sh --token …` started to the agent online, the
//! one-line installer against the control plane under test with a signed release of the agent
//! being benchmarked (a release key made for the run, `cronium release publish`). Each round
//! installs into a fresh `--prefix` with `--no-service` (the installer then runs the agent in
//! the foreground, a child of the benchmark), waits until `GET /agents` shows it online, and
//! stops and revokes it. The peer is the part of the same round that is not Cronium's own work
//! on the host: the installer's download of the agent binary alone (`curl` of the same URL).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::api::Api;
use crate::cluster::enrollment_token;
use crate::procs::{Binaries, ChildGuard, run_output};
use crate::stats::Summary;

/// How long one install may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The phase's samples, summarised.
pub struct InstallFigures {
    /// `install.sh` start → the agent online.
    pub online: Summary,
    /// `curl` of the agent binary from the same control plane.
    pub download: Summary,
    pub binary_mib: f64,
}

/// Publishes the agent as a signed release into the control plane's releases dir.
pub async fn publish(binaries: &Binaries, releases: &Path, keys: &Path) -> anyhow::Result<()> {
    let mut keygen = tokio::process::Command::new(&binaries.cronium);
    keygen.args(["release", "keygen", "--out"]).arg(keys);
    run_output("cronium release keygen", keygen, Duration::from_secs(30)).await?;
    let mut publish = tokio::process::Command::new(&binaries.cronium);
    publish
        .args(["release", "publish"])
        .arg(&binaries.agent)
        .arg("--key")
        .arg(keys.join("release.key"))
        .arg("--releases-dir")
        .arg(releases);
    run_output("cronium release publish", publish, Duration::from_secs(60)).await?;
    Ok(())
}

/// The id of the online agent called `name`, if there is one.
fn online_agent(agents: &Value, name: &str) -> Option<String> {
    agents.as_array()?.iter().find_map(|agent| {
        (agent["name"] == name && agent["status"] == "online")
            .then(|| agent["id"].as_str().map(str::to_owned))
            .flatten()
    })
}

/// Runs `rounds` installs (after one untimed) and as many downloads, interleaved.
pub async fn measure(api: &Api, root: &Path, rounds: usize) -> anyhow::Result<InstallFigures> {
    std::fs::create_dir_all(root)?;
    let script = root.join("install.sh");
    let text = api
        .http()
        .get(format!("{}/install.sh", api.base()))
        .send()
        .await
        .context("GET /install.sh")?
        .error_for_status()
        .context("GET /install.sh")?
        .text()
        .await?;
    std::fs::write(&script, text)?;
    let binary_url = format!(
        "{}/downloads/agent/latest/{}/cronium-agent",
        api.base(),
        cronium_agent::TARGET
    );
    let (mut online, mut download) = (Vec::new(), Vec::new());
    let mut binary_bytes = 0u64;
    for round in 0..=rounds {
        let name = format!("bench-install-{round}");
        let prefix = root.join(&name);
        let token = enrollment_token(api, 1).await?.token;
        let started = Instant::now();
        let mut installer = Command::new("sh");
        installer
            .arg(&script)
            .args(["--name", &name, "--no-service", "--prefix"])
            .arg(&prefix)
            .env("CRONIUM_ENROLL_TOKEN", &token)
            .env("RUST_LOG", "warn");
        let mut child = ChildGuard::spawn("install.sh", &mut installer, None)?;
        let agent_id = loop {
            if let Some(id) = online_agent(&api.get("/agents").await?, &name) {
                break id;
            }
            child
                .ensure_running()
                .with_context(|| format!("the installer's output:\n{}", child.tail()))?;
            if started.elapsed() > ONLINE_TIMEOUT {
                bail!(
                    "the installed agent did not come online within {ONLINE_TIMEOUT:?}:\n{}",
                    child.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let elapsed = started.elapsed();
        drop(child);
        api.delete(&format!("/agents/{agent_id}")).await?;
        let _ = std::fs::remove_dir_all(&prefix);

        let fetch_started = Instant::now();
        let bytes = api
            .http()
            .get(&binary_url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let fetched = fetch_started.elapsed();
        binary_bytes = bytes.len() as u64;
        if round > 0 {
            online.push(elapsed.as_secs_f64() * 1e3);
            download.push(fetched.as_secs_f64() * 1e3);
        }
    }
    Ok(InstallFigures {
        online: Summary::of(&online),
        download: Summary::of(&download),
        binary_mib: binary_bytes as f64 / (1024.0 * 1024.0),
    })
}

impl InstallFigures {
    pub fn markdown(&self) -> String {
        let ratio = self.online.p50 / self.download.p50;
        [
            "| install (ms) | n | mean | p50 | p99 |".to_owned(),
            "|---|---:|---:|---:|---:|".to_owned(),
            format!(
                "| `sh install.sh --token … --no-service` started → agent online | {} | {:.1} | {:.1} | {:.1} |",
                self.online.count, self.online.mean, self.online.p50, self.online.p99
            ),
            format!(
                "| peer: download of the agent binary alone ({:.1} MiB) | {} | {:.1} | {:.1} | {:.1} |",
                self.binary_mib,
                self.download.count,
                self.download.mean,
                self.download.p50,
                self.download.p99
            ),
            format!("| ratio (p50) | | | {ratio:.2}× | |"),
            String::new(),
        ]
        .join("\n")
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "online": self.online.to_json(),
            "download": self.download.to_json(),
            "binary_mib": self.binary_mib,
            "online_vs_download_p50": self.online.p50 / self.download.p50,
        })
    }
}
