//! A control plane and its agents inside a [`NetLab`]: the control plane in the lab's
//! control-plane namespace (reached by the harness through a [`TcpForwarder`]), each agent
//! installed by the control plane's own `/install.sh` inside its agent namespace. Used by the
//! network tests (`tests/tests/netns.rs`) and the fault tests (`tests/tests/faults.rs`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use crate::cluster::json_str;
use crate::netns::{CONTROL_PLANE_IP, NetLab, TcpForwarder};
use crate::release::spawn_installer;
use crate::{ChildGuard, ClusterOptions, ServeIn, TestCluster};

/// How long an installed agent may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a control plane inside the lab's control-plane namespace, bound to its service address
/// (with `args` added to `cronium serve`), and routes the harness's API requests through a
/// forwarder; checks that what the control plane tells agents (public URL, QUIC address) is the
/// namespace address. Keep the forwarder as long as the cluster.
pub async fn control_plane_in(
    lab: &NetLab,
    options: ClusterOptions,
    args: &[&str],
) -> Result<(TestCluster, TcpForwarder)> {
    let mut cluster = TestCluster::start_in_with_args(
        options,
        ServeIn {
            prefix: lab.control_plane().exec_prefix(),
            ip: IpAddr::V4(CONTROL_PLANE_IP),
        },
        args,
    )
    .await?;
    ensure!(
        cluster.quic_addr().ip() == IpAddr::V4(CONTROL_PLANE_IP),
        "QUIC listens on {}",
        cluster.quic_addr()
    );
    let http: SocketAddr = cluster
        .http_url()
        .trim_start_matches("http://")
        .parse()
        .context("the control plane's HTTP address")?;
    ensure!(
        http.ip() == IpAddr::V4(CONTROL_PLANE_IP),
        "HTTP listens on {http}"
    );
    let forwarder = lab.control_plane().forward_tcp(http)?;
    cluster.set_api_base(&forwarder.url())?;
    Ok((cluster, forwarder))
}

/// Publishes the built agent as a signed release and downloads `/install.sh`; checks that the
/// script points agents at the namespace address.
pub async fn installer_script(cluster: &TestCluster) -> Result<PathBuf> {
    cluster.publish_agent_release(None, None).await?;
    let script = cluster.download_install_script().await?;
    let text = std::fs::read_to_string(&script)?;
    ensure!(
        text.contains(&cluster.http_url()),
        "/install.sh does not name the public URL {}",
        cluster.http_url()
    );
    Ok(script)
}

/// An agent installed by `install.sh` inside its namespace (`--no-service`: the installer execs
/// the agent, so the guard is the agent process). Its log tail is printed when it drops.
pub struct InstalledAgent {
    pub id: String,
    pub prefix: PathBuf,
    pub process: ChildGuard,
}

impl InstalledAgent {
    /// The agent's state dir under its prefix.
    pub fn state_dir(&self) -> PathBuf {
        self.prefix.join("var/lib/cronium-agent")
    }
}

/// Runs `sh install.sh --token … --name NAME --prefix … --no-service` inside agent `index`'s
/// namespace and waits until the agent is online.
pub async fn install_agent(
    cluster: &TestCluster,
    lab: &NetLab,
    index: usize,
    script: &Path,
    name: &str,
) -> Result<InstalledAgent> {
    let created = cluster
        .create_enrollment_token(&json!({"uses": 1, "ttl_seconds": 600}))
        .await?;
    let token = json_str(&created, "token")?;
    let prefix = cluster.dir().join(format!("prefix-{name}"));
    let command = cluster.installer_command(
        "/bin/sh",
        script,
        &[
            "--token",
            &token,
            "--name",
            name,
            "--prefix",
            prefix.to_str().context("utf-8 path")?,
            "--no-service",
        ],
        &[],
    );
    let log = cluster.dir().join(format!("install-{name}.log"));
    let mut process = spawn_installer(name, lab.agent(index).wrap(&command), &log)?;
    let waited = cluster
        .wait_until(ONLINE_TIMEOUT, &format!("agent {name} online"), || {
            let exited = process.try_wait();
            async move {
                if let Some(status) = exited? {
                    bail!("the installer exited ({status})");
                }
                let agents = cluster.api().get_ok("/api/v1/agents").await?;
                Ok(agents
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|agent| agent["name"] == name && agent["status"] == "online")
                    .and_then(|agent| agent["id"].as_str().map(str::to_owned)))
            }
        })
        .await;
    match waited {
        Ok(id) => Ok(InstalledAgent {
            id,
            prefix,
            process,
        }),
        Err(error) => bail!("{error:#}\ninstaller log:\n{}", process.log_tail(40)),
    }
}

impl Drop for InstalledAgent {
    fn drop(&mut self) {
        // Captured by the test runner; shown only when the test fails.
        eprintln!(
            "---- agent {} ({}) ----\n{}",
            self.id,
            self.process.log_path().display(),
            self.process.log_tail(40)
        );
    }
}

/// `GET /api/v1/agents/{id}`'s status.
pub async fn agent_status(cluster: &TestCluster, agent_id: &str) -> Result<String> {
    let agent = cluster
        .api()
        .get_ok(&format!("/api/v1/agents/{agent_id}"))
        .await?;
    json_str(&agent, "status")
}

/// What `readlink /proc/PID/ns/net` shows for a process inside agent `index`'s namespace.
pub fn namespace_link(lab: &NetLab, index: usize) -> Result<String> {
    Ok(format!("net:[{}]", lab.agent(index).inode()?))
}

/// The pids of every process inside agent `index`'s network namespace (from `/proc`; processes
/// that end while it looks are skipped).
pub fn processes_in_agent_namespace(lab: &NetLab, index: usize) -> Result<Vec<u32>> {
    let link = namespace_link(lab, index)?;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path().join("ns/net"))
            && target.to_string_lossy() == link
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}
