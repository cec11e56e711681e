//! Network namespaces for tests that need a real network between the control plane and its agents.
//!
//! [`NetLab`] makes one namespace for the control plane and one per agent, each agent linked to
//! the control plane's namespace by its own veth pair (created straight into the two namespaces,
//! so the host's own network is never touched), with private addresses that exist only inside
//! them: the control plane's service address `10.231.0.1` on its loopback, agent *n* (1-based) at
//! `10.231.n.2/24` with its default route through `10.231.n.1`. The agents cannot reach each
//! other (the control plane's namespace does not forward).
//! [`NetLab::outbound_only`] loads an nftables ruleset into an agent's namespace that drops every
//! new inbound connection; [`NetLab::partition`] and [`NetLab::heal`] black-hole and restore the
//! link between an agent and the control plane.
//!
//! The test process itself stays in the host's namespace. [`Netns::enter`] runs a closure on a
//! fresh thread that has joined a namespace (sockets keep the namespace they were created in), so a
//! test can listen and probe from inside; [`TcpForwarder`] relays a loopback port of the host
//! into a namespace, which is how the harness's HTTP client and WebSockets reach a control plane
//! that only listens inside one. [`Netns::wrap`] runs a command inside a namespace with
//! `ip netns exec`.
//!
//! Everything is removed on drop, also when a test panics: namespaces are deleted (which destroys
//! their veths and rulesets); namespaces left behind by a test process that was killed are deleted
//! by the next [`NetLab::create`]. [`require_root_and_tools`] fails, saying what to install, when
//! the test cannot do this at all.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

/// Every namespace a test makes is called `cronium-e2e-<pid>-<n>-<role>`.
pub const NAMESPACE_PREFIX: &str = "cronium-e2e-";
/// The control plane's service address, on the loopback of its namespace.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// The nftables table of the outbound-only firewall in an agent's namespace.
pub const OUTBOUND_ONLY_TABLE: &str = "cronium_outbound_only";
/// How long one `ip` or `nft` invocation may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// What a [`ProbeListener`] answers on TCP before it closes the connection.
const PROBE_GREETING: &[u8] = b"cronium-probe\n";

/// Fails unless this process is root and `ip` (iproute2) and `nft` (nftables) run; the message
/// says what to install. Tests call it first, so they fail clearly instead of skipping.
pub fn require_root_and_tools() -> Result<()> {
    // SAFETY: plain syscall without arguments.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the network namespace tests must run as root (they create network namespaces, veth \
             pairs and nftables rules); this process runs as uid {euid}"
        );
    }
    for (tool, flag, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        match Command::new(tool).arg(flag).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => bail!(
                "`{tool} {flag}` failed ({}): {}; reinstall the Debian package {package}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => bail!(
                "cannot run `{tool}` ({error}): the network namespace tests need it; install the \
                 Debian package {package} (`apt-get install {package}`)"
            ),
        }
    }
    Ok(())
}

/// A network namespace this test made (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME`, with its loopback up.
    pub async fn add(name: &str) -> Result<Netns> {
        let mut command = Command::new("ip");
        command.args(["netns", "add", name]);
        run(command, None).await?;
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"]).await?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's inode: what `readlink /proc/PID/ns/net` shows as `net:[INODE]` for a
    /// process inside it.
    pub fn inode(&self) -> Result<u64> {
        Ok(std::fs::metadata(self.path())
            .with_context(|| format!("stat {}", self.path().display()))?
            .ino())
    }

    /// `ip netns exec NAME`, the prefix that runs a program inside this namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(str::to_owned)
            .to_vec()
    }

    /// `command` run inside this namespace: its program and arguments after `ip netns exec NAME`,
    /// with the same environment changes and working directory. `ip` execs the program, so the
    /// child's pid is the program's.
    pub fn wrap(&self, command: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.name])
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(name, value),
                None => wrapped.env_remove(name),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Runs `ip -n NAME ARGS…` and fails with its stderr.
    pub async fn ip(&self, args: &[&str]) -> Result<()> {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]).args(args);
        run(command, None).await.map(drop)
    }

    /// Loads `script` (nft syntax) with `nft -f -` inside this namespace.
    pub async fn nft(&self, script: &str) -> Result<()> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, "nft", "-f", "-"]);
        run(command, Some(script)).await.map(drop)
    }

    /// `nft list ruleset` inside this namespace.
    pub async fn nft_ruleset(&self) -> Result<String> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, "nft", "list", "ruleset"]);
        let output = run(command, None).await?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `work` on a fresh thread that has joined this namespace (only that thread, which then
    /// ends); sockets it creates stay in the namespace wherever they are used afterwards.
    pub async fn enter<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let namespace = self.open()?;
        let (sender, receiver) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("in {}", self.name))
            .spawn(move || {
                let _ = sender.send(join_namespace(&namespace).map(|()| work()));
            })
            .context("spawn a thread")?;
        receiver
            .await
            .context("the thread inside the namespace panicked")?
            .with_context(|| format!("join network namespace {}", self.name))
    }

    /// Relays connections to a new port on the host's 127.0.0.1 to `target`, connected from
    /// inside this namespace.
    pub fn forward_tcp(&self, target: SocketAddr) -> Result<TcpForwarder> {
        TcpForwarder::start(self, target)
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("open {}", self.path().display()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "==== ip netns delete {} failed: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!("==== ip netns delete {}: {error}", self.name),
        }
    }
}

/// Moves the calling thread (only it) into the network namespace `namespace` refers to.
fn join_namespace(namespace: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor we hold open; it changes only the calling thread.
    let result = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A control plane's namespace and its agents' namespaces, linked point to point (see the module
/// docs for the addresses). Dropping it deletes them all.
#[derive(Debug)]
pub struct NetLab {
    control_plane: Netns,
    agents: Vec<Netns>,
}

impl NetLab {
    /// Checks root and the tools, deletes namespaces left by killed test processes, and makes the
    /// namespaces, links and addresses for `agents` agents.
    pub async fn create(agents: usize) -> Result<NetLab> {
        require_root_and_tools()?;
        if agents == 0 || agents > 250 {
            bail!("a NetLab has 1 to 250 agents, not {agents}");
        }
        remove_stale_namespaces().await;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "{NAMESPACE_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = NetLab {
            control_plane: Netns::add(&format!("{id}-cp")).await?,
            agents: Vec::new(),
        };
        lab.control_plane
            .ip(&[
                "addr",
                "add",
                &format!("{CONTROL_PLANE_IP}/32"),
                "dev",
                "lo",
            ])
            .await?;
        for index in 0..agents {
            // Pushed before it is configured, so a failure below still deletes it.
            lab.agents
                .push(Netns::add(&format!("{id}-a{}", index + 1)).await?);
            let agent = &lab.agents[index];
            let link = Self::link_name(index);
            let subnet = index + 1;
            lab.control_plane
                .ip(&[
                    "link",
                    "add",
                    "name",
                    &link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "uplink",
                    "netns",
                    agent.name(),
                ])
                .await?;
            lab.control_plane
                .ip(&[
                    "addr",
                    "add",
                    &format!("10.231.{subnet}.1/24"),
                    "dev",
                    &link,
                ])
                .await?;
            lab.control_plane.ip(&["link", "set", &link, "up"]).await?;
            agent
                .ip(&[
                    "addr",
                    "add",
                    &format!("10.231.{subnet}.2/24"),
                    "dev",
                    "uplink",
                ])
                .await?;
            agent.ip(&["link", "set", "uplink", "up"]).await?;
            agent
                .ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.231.{subnet}.1"),
                ])
                .await?;
        }
        Ok(lab)
    }

    pub fn control_plane(&self) -> &Netns {
        &self.control_plane
    }

    /// The namespace of agent `index` (0-based).
    pub fn agent(&self, index: usize) -> &Netns {
        &self.agents[index]
    }

    /// The control plane's end of agent `index`'s link: `10.231.<index+1>.1`.
    pub fn link_ip(&self, index: usize) -> Ipv4Addr {
        assert!(index < self.agents.len(), "no agent {index} in this lab");
        Ipv4Addr::new(10, 231, (index + 1) as u8, 1)
    }

    /// The address of agent `index` (0-based): `10.231.<index+1>.2`.
    pub fn agent_ip(&self, index: usize) -> Ipv4Addr {
        assert!(index < self.agents.len(), "no agent {index} in this lab");
        Ipv4Addr::new(10, 231, (index + 1) as u8, 2)
    }

    /// Loads the outbound-only firewall into agent `index`'s namespace: loopback and replies to
    /// connections the agent opened (established, related) are accepted, every new inbound
    /// connection (TCP, UDP, anything) is dropped. Outbound traffic is not filtered.
    pub async fn outbound_only(&self, index: usize) -> Result<()> {
        let agent = self.agent(index);
        agent
            .nft(&format!(
                "table inet {OUTBOUND_ONLY_TABLE} {{
                    chain input {{
                        type filter hook input priority filter; policy drop;
                        iifname \"lo\" accept
                        ct state established,related accept
                        meta l4proto {{ tcp, udp }} ct state new counter drop
                    }}
                }}\n"
            ))
            .await?;
        let ruleset = agent.nft_ruleset().await?;
        if !ruleset.contains(OUTBOUND_ONLY_TABLE) || !ruleset.contains("policy drop") {
            bail!("the firewall is not loaded in {}: {ruleset}", agent.name());
        }
        Ok(())
    }

    /// Cuts agent `index` off: everything arriving from the other side is dropped in both
    /// namespaces (on input, so neither side's sends fail locally: packets vanish as they would
    /// on a broken network path). [`NetLab::heal`] restores it.
    pub async fn partition(&self, index: usize) -> Result<()> {
        self.agent(index)
            .nft(
                "table inet cronium_partition {
                    chain input {
                        type filter hook input priority filter - 10; policy accept;
                        iifname != \"lo\" drop
                    }
                }\n",
            )
            .await?;
        self.control_plane
            .nft(&format!(
                "table inet cronium_partition_{index} {{
                    chain input {{
                        type filter hook input priority filter - 10; policy accept;
                        iifname \"{}\" drop
                    }}
                }}\n",
                Self::link_name(index)
            ))
            .await
    }

    /// Undoes [`NetLab::partition`].
    pub async fn heal(&self, index: usize) -> Result<()> {
        self.agent(index)
            .nft("delete table inet cronium_partition\n")
            .await?;
        self.control_plane
            .nft(&format!("delete table inet cronium_partition_{index}\n"))
            .await
    }

    /// The control plane's end of agent `index`'s link.
    fn link_name(index: usize) -> String {
        format!("to-agent{}", index + 1)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // The namespaces delete themselves (`Netns::drop`); say what is gone in the test output.
        let names: Vec<&str> = std::iter::once(&self.control_plane)
            .chain(&self.agents)
            .map(Netns::name)
            .collect();
        eprintln!("==== deleting network namespaces {names:?}");
    }
}

/// Deletes `cronium-e2e-<pid>-…` namespaces whose test process no longer exists (it was killed
/// before its guards ran). Best effort: a failure only leaves them for the next run.
async fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let mut command = Command::new("ip");
        command.args(["netns", "delete", &name]);
        match run(command, None).await {
            Ok(_) => eprintln!("==== deleted the stale network namespace {name}"),
            Err(error) => {
                eprintln!("==== cannot delete the stale network namespace {name}: {error:#}")
            }
        }
    }
}

/// Runs `command` to completion with `stdin` (or nothing) as input; fails with its stderr.
async fn run(command: Command, stdin: Option<&str>) -> Result<Output> {
    let description = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut command = tokio::process::Command::from(command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .with_context(|| format!("run {description}"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .await
            .with_context(|| format!("write the input of {description}"))?;
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("{description} did not finish within {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("wait for {description}"))?;
    if !output.status.success() {
        bail!(
            "{description} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            stdin
                .map(|text| format!("\ninput:\n{text}"))
                .unwrap_or_default()
        );
    }
    Ok(output)
}

/// A loopback port on the host relayed into a namespace (see [`Netns::forward_tcp`]).
///
/// One thread joins the namespace and runs a current-thread runtime: it accepts on the host
/// listener (created before the thread moved) and connects to the target from inside, so every
/// byte stays on the host's loopback and inside the namespace. Dropping it stops the thread and
/// closes every relayed connection.
#[derive(Debug)]
pub struct TcpForwarder {
    local: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpForwarder {
    fn start(netns: &Netns, target: SocketAddr) -> Result<TcpForwarder> {
        // Bound here, in the calling thread's (the host's) namespace.
        let listener = std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .context("bind the forwarder's loopback port")?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let namespace = netns.open()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("forward into {}", netns.name()))
            .spawn(move || {
                let runtime = join_namespace(&namespace).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                });
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready_sender.send(Err(error));
                        return;
                    }
                };
                let _ = ready_sender.send(Ok(()));
                runtime.block_on(relay(listener, target, stopped));
                // Dropping the runtime drops every relay task and its sockets.
            })
            .context("spawn the forwarder thread")?;
        ready
            .recv()
            .context("the forwarder thread ended before it was ready")?
            .with_context(|| format!("enter network namespace {}", netns.name()))?;
        Ok(TcpForwarder {
            local,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The host side: `127.0.0.1:PORT`.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.local)
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn relay(
    listener: std::net::TcpListener,
    target: SocketAddr,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("==== forwarder to {target}: {error}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((mut inbound, _)) => {
                    // The task runs on this thread, so its socket is created inside the namespace.
                    tokio::spawn(async move {
                        match tokio::net::TcpStream::connect(target).await {
                            Ok(mut outbound) => {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                            Err(error) => eprintln!("==== forwarder: connect {target}: {error}"),
                        }
                    });
                }
                Err(error) => {
                    eprintln!("==== forwarder to {target}: accept: {error}");
                    return;
                }
            },
        }
    }
}

/// A TCP and a UDP listener inside a namespace, to probe what reaches it: TCP connections get
/// [`PROBE_GREETING`] and are closed, UDP datagrams are echoed; both are counted.
#[derive(Debug)]
pub struct ProbeListener {
    tcp: SocketAddr,
    udp: SocketAddr,
    tcp_accepted: Arc<AtomicUsize>,
    udp_received: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ProbeListener {
    /// Binds both on `ip` (free ports) inside `netns`; served by tasks of the caller's runtime.
    pub async fn start(netns: &Netns, ip: Ipv4Addr) -> Result<ProbeListener> {
        let (tcp, udp) = netns
            .enter(move || -> std::io::Result<_> {
                let tcp = std::net::TcpListener::bind((ip, 0))?;
                let udp = std::net::UdpSocket::bind((ip, 0))?;
                tcp.set_nonblocking(true)?;
                udp.set_nonblocking(true)?;
                Ok((tcp, udp))
            })
            .await?
            .context("bind the probe listeners")?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp_addr = tcp.local_addr()?;
        let udp_addr = udp.local_addr()?;
        let tcp_accepted = Arc::new(AtomicUsize::new(0));
        let udp_received = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::clone(&tcp_accepted);
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(PROBE_GREETING).await;
            }
        });
        let received = Arc::clone(&udp_received);
        let udp_task = tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            while let Ok((len, peer)) = udp.recv_from(&mut buffer).await {
                received.fetch_add(1, Ordering::SeqCst);
                let _ = udp.send_to(&buffer[..len], peer).await;
            }
        });
        Ok(ProbeListener {
            tcp: tcp_addr,
            udp: udp_addr,
            tcp_accepted,
            udp_received,
            tasks: vec![tcp_task, udp_task],
        })
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    /// TCP connections accepted so far.
    pub fn tcp_accepted(&self) -> usize {
        self.tcp_accepted.load(Ordering::SeqCst)
    }

    /// UDP datagrams received so far.
    pub fn udp_received(&self) -> usize {
        self.udp_received.load(Ordering::SeqCst)
    }
}

impl Drop for ProbeListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// From inside `netns`: connects to a [`ProbeListener`]'s TCP address and reads its greeting.
/// The inner result is the outcome (a timeout after `timeout` when the SYN is dropped).
pub async fn tcp_probe(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<()>> {
    netns
        .enter(move || {
            let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let mut greeting = Vec::new();
            stream.read_to_end(&mut greeting)?;
            if greeting == PROBE_GREETING {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "unexpected answer {:?}",
                    String::from_utf8_lossy(&greeting)
                )))
            }
        })
        .await
}

/// From inside `netns`, from `source` (a free port): sends a datagram to a [`ProbeListener`]'s
/// UDP address (again every 250 ms) until the echo comes back or `timeout` passes. The inner
/// result is the outcome.
///
/// Probes that must be refused should come from another `source` than the ones that got through
/// before a firewall was loaded: a reused port would match the earlier flow's conntrack entry,
/// which the firewall rightly lets through as established.
pub async fn udp_probe(
    netns: &Netns,
    source: Ipv4Addr,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<()>> {
    let payload = crate::unique_marker("udp-probe").into_bytes();
    netns
        .enter(move || {
            let socket = std::net::UdpSocket::bind((source, 0))?;
            socket.set_read_timeout(Some(Duration::from_millis(250)))?;
            let deadline = Instant::now() + timeout;
            let mut buffer = [0u8; 2048];
            while Instant::now() < deadline {
                socket.send_to(&payload, addr)?;
                match socket.recv_from(&mut buffer) {
                    Ok((len, peer)) if peer == addr && buffer[..len] == payload[..] => {
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(error)
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(error) => return Err(error),
                }
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no echo from {addr} within {timeout:?}"),
            ))
        })
        .await
}
