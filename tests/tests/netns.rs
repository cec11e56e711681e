//! The outbound-only claim, proven in network namespaces: a control plane in a namespace of its
//! own, two agents each in theirs behind an nftables firewall that drops every new inbound
//! connection, installed through the control plane's `/install.sh`. The agents come online, run
//! jobs and serve terminals, while TCP and UDP probes from the control plane's namespace into an
//! agent's are dropped (and got through before the firewall was loaded, so the probe can fail).
//! And a network partition: an agent cut off while its job prints keeps running, spools the output,
//! reconnects by itself when the link is back and delivers every line exactly once.
//!
//! The test process stays in the host's namespace and reaches the control plane through a
//! loopback port relayed into its namespace ([`cronium_e2e::netns::TcpForwarder`]); nothing else
//! of the host's network is used. These tests need root, `ip` (iproute2) and `nft` (nftables)
//! and fail, saying what to install, without them.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cronium_e2e::lab::{
    agent_status, control_plane_in, install_agent, installer_script, namespace_link,
};
use cronium_e2e::netns::{CONTROL_PLANE_IP, NetLab, ProbeListener, tcp_probe, udp_probe};
use cronium_e2e::terminal_client::Terminal;
use cronium_e2e::{ClusterOptions, EventSpec};
use serde_json::{Value, json};

/// Bound of every wait for something that should happen.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long a probe that should be dropped is given before it counts as refused (and how long
/// one that should get through may take).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// From the control plane's namespace (its service address), TCP and UDP probes to listeners
/// inside each agent's namespace are dropped and never reach the listener, which still answers
/// from inside.
async fn assert_inbound_refused(lab: &NetLab, probes: &[ProbeListener]) -> Result<()> {
    for (index, probe) in probes.iter().enumerate() {
        let (tcp_before, udp_before) = (probe.tcp_accepted(), probe.udp_received());
        let tcp = tcp_probe(lab.control_plane(), probe.tcp_addr(), PROBE_TIMEOUT).await?;
        ensure!(
            tcp.is_err(),
            "a TCP connection from the control plane's namespace reached agent {index}'s listener \
             {} through the firewall",
            probe.tcp_addr()
        );
        let udp = udp_probe(
            lab.control_plane(),
            CONTROL_PLANE_IP,
            probe.udp_addr(),
            PROBE_TIMEOUT,
        )
        .await?;
        ensure!(
            udp.is_err(),
            "a UDP datagram from the control plane's namespace was echoed by agent {index}'s \
             listener {} through the firewall",
            probe.udp_addr()
        );
        ensure!(
            probe.tcp_accepted() == tcp_before && probe.udp_received() == udp_before,
            "agent {index}'s listener saw inbound traffic: {} → {} connections, {} → {} datagrams",
            tcp_before,
            probe.tcp_accepted(),
            udp_before,
            probe.udp_received()
        );
        // The listener is alive: from inside the agent's own namespace it answers.
        tcp_probe(lab.agent(index), probe.tcp_addr(), PROBE_TIMEOUT)
            .await?
            .with_context(|| format!("TCP probe of agent {index}'s listener from inside"))?;
        udp_probe(
            lab.agent(index),
            lab.agent_ip(index),
            probe.udp_addr(),
            PROBE_TIMEOUT,
        )
        .await?
        .with_context(|| format!("UDP probe of agent {index}'s listener from inside"))?;
        let (tcp, udp) = (tcp.unwrap_err(), udp.unwrap_err());
        eprintln!("agent {index}: inbound TCP refused ({tcp}), inbound UDP refused ({udp})");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_behind_an_outbound_only_firewall_install_run_jobs_and_serve_terminals() -> Result<()>
{
    const AGENTS: usize = 2;
    let lab = NetLab::create(AGENTS).await?;

    // Listeners inside each agent's namespace; before the firewall, the control plane's
    // namespace reaches them (so the refusals below are the firewall's doing).
    let mut probes = Vec::new();
    for index in 0..AGENTS {
        let probe = ProbeListener::start(lab.agent(index), lab.agent_ip(index)).await?;
        tcp_probe(lab.control_plane(), probe.tcp_addr(), PROBE_TIMEOUT)
            .await?
            .with_context(|| {
                format!("without a firewall, a TCP connect into agent {index}'s namespace")
            })?;
        // From the link address: the refused probes come from another address, so they cannot
        // match this flow's conntrack entry.
        udp_probe(
            lab.control_plane(),
            lab.link_ip(index),
            probe.udp_addr(),
            PROBE_TIMEOUT,
        )
        .await?
        .with_context(|| {
            format!("without a firewall, a UDP echo from agent {index}'s namespace")
        })?;
        ensure!(probe.tcp_accepted() == 1 && probe.udp_received() >= 1);
        probes.push(probe);
    }
    for index in 0..AGENTS {
        lab.outbound_only(index).await?;
    }
    assert_inbound_refused(&lab, &probes).await?;

    let (cluster, _forwarder) = control_plane_in(&lab, ClusterOptions::default(), &[]).await?;
    let script = installer_script(&cluster).await?;
    let mut agents = Vec::new();
    for index in 0..AGENTS {
        let name = format!("outbound-only-{}", index + 1);
        let agent = install_agent(&cluster, &lab, index, &script, &name).await?;
        // Enrollment told the agent to dial the namespace address.
        let state: Value = serde_json::from_slice(&std::fs::read(
            agent.prefix.join("var/lib/cronium-agent/agent.json"),
        )?)?;
        ensure!(
            state["quic_addrs"] == json!([cluster.quic_addr().to_string()])
                && state["server_url"] == json!(cluster.http_url()),
            "agent.json of {name}: {state}"
        );
        agents.push(agent);
    }

    // A job on each agent: it runs there, inside the agent's namespace.
    for (index, agent) in agents.iter().enumerate() {
        let marker = cronium_e2e::unique_marker("behind-firewall");
        let job = cluster
            .run_single_job(
                &EventSpec::bash(
                    &format!("job-on-{}", index + 1),
                    &format!("echo {marker}; readlink /proc/self/ns/net"),
                )
                .target(&agent.id),
            )
            .await?;
        let finished = cluster.wait_job_final(&job, DEADLINE).await?;
        let output = finished["output"].as_str().unwrap_or_default();
        ensure!(finished["status"] == "completed", "job: {finished}");
        ensure!(
            output.contains(&marker) && output.contains(&namespace_link(&lab, index)?),
            "job on agent {} ran elsewhere or lost its output: {finished}",
            index + 1
        );
    }

    // A terminal on each agent: a stream the control plane opens on the agent's own connection.
    for (index, agent) in agents.iter().enumerate() {
        let mut terminal = Terminal::open(&cluster, &agent.id).await?;
        // Only the shell's output has `ns-2`: the typed line shows `ns-$((1+1))`.
        terminal
            .send(b"readlink /proc/$$/ns/net; echo ns-$((1+1))\r")
            .await?;
        let output = terminal.read_until("ns-2").await?;
        ensure!(
            output.contains(&namespace_link(&lab, index)?),
            "the terminal of agent {} does not run in its namespace: {output:?}",
            index + 1
        );
        terminal.close().await?;
    }

    // The firewall held all along.
    assert_inbound_refused(&lab, &probes).await?;
    for agent in &mut agents {
        ensure!(
            agent.process.try_wait()?.is_none(),
            "agent {} exited",
            agent.id
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_spooled_during_a_network_partition_arrives_once_after_the_agent_reconnects()
-> Result<()> {
    let lab = NetLab::create(1).await?;
    lab.outbound_only(0).await?;
    // One-second heartbeats: both sides notice the silence after about three seconds; the lease
    // is long enough that the partition does not cost the attempt.
    let options = ClusterOptions {
        lease_seconds: Some(60),
        heartbeat_seconds: Some(1),
    };
    let (cluster, _forwarder) = control_plane_in(&lab, options, &[]).await?;
    let script = installer_script(&cluster).await?;
    let mut agent = install_agent(&cluster, &lab, 0, &script, "partitioned").await?;

    // A job that prints a numbered line every 200 ms and records the last number in a file of
    // the test's dir, until the test creates the release file.
    let progress = cluster.dir().join("progress");
    let release = cluster.dir().join("release");
    let body = format!(
        "i=0\n\
         while [ ! -e '{release}' ]; do\n\
         \ti=$((i+1))\n\
         \techo \"tick $i\"\n\
         \techo \"$i\" > '{progress}.tmp' && mv '{progress}.tmp' '{progress}'\n\
         \tsleep 0.2\n\
         done\n\
         echo \"done after $i ticks\"\n",
        release = release.display(),
        progress = progress.display(),
    );
    let job = cluster
        .run_single_job(
            &EventSpec::bash("ticker", &body)
                .target(&agent.id)
                .timeout_seconds(300),
        )
        .await?;
    let ticks = || -> Result<Option<u64>> {
        match std::fs::read_to_string(&progress) {
            Ok(text) => Ok(Some(text.trim().parse().context("the progress file")?)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    };

    // Output flows while the link is up.
    cluster
        .wait_until(DEADLINE, "tick 3 in the job's log", || async {
            let log = cluster.job_logs(&job).await?;
            Ok(String::from_utf8_lossy(&log)
                .contains("tick 3\n")
                .then_some(()))
        })
        .await?;

    lab.partition(0).await?;
    cluster
        .wait_until(
            DEADLINE,
            "the control plane to see the agent offline",
            || async { Ok((agent_status(&cluster, &agent.id).await? == "offline").then_some(())) },
        )
        .await?;
    // The job keeps printing while the agent is cut off: five more lines go to its spool.
    let cut_at = ticks()?.context("the job printed no tick")?;
    let spooled = cluster
        .wait_until(DEADLINE, "five more ticks during the partition", || async {
            Ok(ticks()?.filter(|ticks| *ticks >= cut_at + 5))
        })
        .await?;
    let delivered = String::from_utf8_lossy(&cluster.job_logs(&job).await?).into_owned();
    ensure!(
        !delivered.contains(&format!("tick {spooled}\n")),
        "tick {spooled}, printed during the partition, reached the control plane: the partition \
         did not cut the agent off"
    );

    lab.heal(0).await?;
    // The agent reconnects by itself: the test does nothing to it.
    cluster.wait_agent_online(&agent.id, DEADLINE).await?;
    ensure!(
        agent.process.try_wait()?.is_none(),
        "the agent process exited instead of reconnecting"
    );
    std::fs::write(&release, b"")?;
    let finished = cluster.wait_job_final(&job, DEADLINE).await?;
    ensure!(finished["status"] == "completed", "job: {finished}");
    ensure!(
        finished["attempt"] == 1,
        "the job was run again instead of resumed: {finished}"
    );

    // Every line exactly once, in order.
    let log = String::from_utf8(cluster.job_logs(&job).await?).context("the log is not UTF-8")?;
    let lines: Vec<&str> = log.lines().collect();
    let last = lines
        .last()
        .and_then(|line| line.strip_prefix("done after "))
        .and_then(|rest| rest.strip_suffix(" ticks"))
        .and_then(|count| count.parse::<u64>().ok())
        .with_context(|| format!("the log does not end with the final line: {log:?}"))?;
    ensure!(
        last >= spooled,
        "the job stopped at tick {last}, before {spooled}"
    );
    let expected: Vec<String> = (1..=last)
        .map(|tick| format!("tick {tick}"))
        .chain([format!("done after {last} ticks")])
        .collect();
    if lines != expected {
        let duplicated: Vec<&&str> = lines
            .iter()
            .filter(|line| lines.iter().filter(|other| other == line).count() > 1)
            .collect();
        bail!("the log is not ticks 1..={last} once each (duplicated: {duplicated:?}):\n{log}");
    }
    Ok(())
}
