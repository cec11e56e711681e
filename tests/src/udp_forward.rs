//! [`UdpForwarder`]: a UDP relay on 127.0.0.1 in front of a control plane's QUIC port, which a
//! test uses to cut chosen agents off (drop every datagram from and to them) and heal them: a
//! network partition of agent↔control-plane paths without root, namespaces or firewall rules.
//!
//! The control plane advertises the forwarder's address (`--quic-public-addrs`), so agents dial it
//! whether they enrolled there or learned it as another replica's. QUIC checks the server's
//! certificate by name, not by address, so nothing else changes. An agent process sends all its
//! QUIC traffic from one UDP socket, so a cut names the agent by that socket's port
//! ([`udp_ports_of`]); [`Cuts`] can be shared by the forwarders of several replicas to cut an
//! agent off from all of them at once. Each client address gets a socket of its own towards the
//! upstream, so answers find their way back. Everything runs on one task owned by the forwarder:
//! dropping it stops the relay and closes every socket.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};

/// Largest datagram relayed (QUIC's are far smaller; a bigger one is cut by the kernel).
const MAX_DATAGRAM: usize = 65_535;

/// Most client addresses remembered: each agent process has one. Past this the oldest relays are
/// dropped (their agents were restarted long ago).
const MAX_CLIENTS: usize = 256;

/// The client ports (on 127.0.0.1) whose datagrams are dropped, both ways.
#[derive(Clone, Debug, Default)]
pub struct Cuts(Arc<Mutex<HashSet<u16>>>);

impl Cuts {
    /// Drops everything from and to the clients on `ports` from now on.
    pub fn cut(&self, ports: &[u16]) {
        self.0.lock().unwrap().extend(ports);
    }

    /// Relays the clients on `ports` again.
    pub fn heal(&self, ports: &[u16]) {
        let mut cut = self.0.lock().unwrap();
        for port in ports {
            cut.remove(port);
        }
    }

    fn contains(&self, client: SocketAddr) -> bool {
        self.0.lock().unwrap().contains(&client.port())
    }
}

/// A running relay; see the module documentation.
#[derive(Debug)]
pub struct UdpForwarder {
    addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl UdpForwarder {
    /// Starts listening on a new port of 127.0.0.1, dropping the datagrams of the clients in
    /// `cuts`. Datagrams are dropped until [`UdpForwarder::set_upstream`] says where they go (so
    /// the forwarder's address can be given to the control plane it forwards to, before it
    /// starts).
    pub async fn start(cuts: Cuts) -> Result<UdpForwarder> {
        let front = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .context("bind the forwarder's socket")?,
        );
        let addr = front.local_addr()?;
        let upstream = Arc::new(Mutex::new(None));
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(relay(front, upstream.clone(), cuts, dropped.clone()));
        Ok(UdpForwarder {
            addr,
            upstream,
            dropped,
            task,
        })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where datagrams of new clients go from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = Some(upstream);
    }

    /// Datagrams dropped because their client was cut, both directions.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for UdpForwarder {
    fn drop(&mut self) {
        // Aborting the task drops its JoinSet, which aborts every per-client relay.
        self.task.abort();
    }
}

/// Client → upstream on `front`; each client's answers come back through a task of `backs`.
async fn relay(
    front: Arc<UdpSocket>,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    cuts: Cuts,
    dropped: Arc<AtomicU64>,
) {
    let mut clients: HashMap<SocketAddr, (u64, Arc<UdpSocket>)> = HashMap::new();
    let mut backs = JoinSet::new();
    let mut next = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // A datagram refused by the kernel (e.g. ICMP errors reported on the socket) is skipped.
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if cuts.contains(client) {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let back = match clients.get(&client) {
            Some((_, back)) => back.clone(),
            None => {
                let Some(target) = *upstream.lock().unwrap() else {
                    continue;
                };
                let Ok(back) = open_back(target).await else {
                    continue;
                };
                if clients.len() >= MAX_CLIENTS
                    && let Some(oldest) = clients
                        .iter()
                        .min_by_key(|(_, (serial, _))| *serial)
                        .map(|(addr, _)| *addr)
                {
                    // Its task ends with the forwarder.
                    clients.remove(&oldest);
                }
                next += 1;
                clients.insert(client, (next, back.clone()));
                backs.spawn(answers(
                    back.clone(),
                    front.clone(),
                    client,
                    cuts.clone(),
                    dropped.clone(),
                ));
                back
            }
        };
        let _ = back.send(&buf[..len]).await;
        // Reap finished answer tasks so the set does not grow.
        while backs.try_join_next().is_some() {}
    }
}

async fn open_back(upstream: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let back = UdpSocket::bind("127.0.0.1:0").await?;
    back.connect(upstream).await?;
    Ok(Arc::new(back))
}

/// Upstream → `client` for one client.
async fn answers(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    cuts: Cuts,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = match back.recv(&mut buf).await {
            Ok(len) => len,
            // The upstream was not listening (ICMP port unreachable, reported once per datagram):
            // the next datagram is still relayed.
            Err(_) => continue,
        };
        if cuts.contains(client) {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let _ = front.send_to(&buf[..len], client).await;
    }
}

/// The local ports of the UDP sockets process `pid` holds (IPv4 and IPv6), from `/proc`: the
/// socket inodes of its file descriptors, looked up in `/proc/<pid>/net/udp{,6}`.
pub fn udp_ports_of(pid: u32) -> Result<Vec<u16>> {
    let mut inodes = HashSet::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("list the descriptors of process {pid}"))?;
    for fd in fds.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|target| target.strip_prefix("socket:["))
                .and_then(|rest| rest.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut ports = Vec::new();
    for table in ["udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl, local_address, rem_address, st, tx_queue:rx_queue, tr:tm->when, retrnsmt,
            // uid, timeout, inode, …
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || !inodes.contains(fields[9]) {
                continue;
            }
            let port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok())
                .with_context(|| format!("a {table} line of process {pid}: {line}"))?;
            ports.push(port);
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> Result<(usize, SocketAddr)> {
        Ok(tokio::time::timeout(Duration::from_secs(5), socket.recv_from(buf)).await??)
    }

    #[tokio::test]
    async fn relays_both_ways_and_drops_everything_of_a_cut_client() -> Result<()> {
        let server = UdpSocket::bind("127.0.0.1:0").await?;
        let cuts = Cuts::default();
        let forwarder = UdpForwarder::start(cuts.clone()).await?;
        forwarder.set_upstream(server.local_addr()?);
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.connect(forwarder.addr()).await?;
        let other = UdpSocket::bind("127.0.0.1:0").await?;
        other.connect(forwarder.addr()).await?;
        let mut buf = [0u8; 16];

        client.send(b"ping").await?;
        let (len, from) = recv_from(&server, &mut buf).await?;
        assert_eq!(&buf[..len], b"ping");
        server.send_to(b"pong", from).await?;
        let (len, _) = recv_from(&client, &mut buf).await?;
        assert_eq!(&buf[..len], b"pong");

        let port = client.local_addr()?.port();
        assert!(udp_ports_of(std::process::id())?.contains(&port));
        cuts.cut(&[port]);
        client.send(b"lost").await?;
        server.send_to(b"lost", from).await?;
        // Both were counted as dropped (polled: the relay runs on its own task).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while forwarder.dropped() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Another client still gets through.
        other.send(b"other").await?;
        let (len, _) = recv_from(&server, &mut buf).await?;
        assert_eq!(&buf[..len], b"other");

        cuts.heal(&[port]);
        client.send(b"again").await?;
        let (len, _) = recv_from(&server, &mut buf).await?;
        assert_eq!(&buf[..len], b"again", "nothing of the cut arrived late");
        server.send_to(b"back", from).await?;
        let (len, _) = recv_from(&client, &mut buf).await?;
        assert_eq!(&buf[..len], b"back");
        Ok(())
    }
}
