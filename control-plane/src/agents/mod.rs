//! The agents' side of the control plane: the CA that identifies them, the QUIC listener with
//! one session task per connected agent, and the registry of who is online.

pub mod ca;
pub(crate) mod helper_stream;
mod job_stream;
pub mod registry;
pub(crate) mod session;
pub mod update;
pub(crate) mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::AppState;
use ca::CertificateAuthority;

/// Concurrent streams an agent may open before its hello raises the limit.
const INITIAL_STREAMS: u32 = 16;

/// The receive buffer asked for the QUIC socket. Every agent's packets arrive on this one
/// socket, and a fan-out makes them arrive together: 1,000 claims at once overflowed Linux's
/// default (208 KiB), and each dropped packet cost its agent a retransmission after QUIC's loss
/// timer. The kernel grants at most `net.core.rmem_max` (see [`grow_receive_buffer`]).
const RECEIVE_BUFFER: usize = 8 << 20;

/// The least time between two stateless resets the endpoint sends (to anyone). quinn's
/// default, 20 ms, allows 50 a second: after a restart by SIGKILL, 500 agents' heartbeats (one
/// each per 5 s) came twice as fast, so about half of them got no reset, and those agents
/// learned of the restart only from their next packets or from three silent heartbeat periods
/// (reconnects until 20 s after the restart). No limit is needed against abuse: a reset is
/// always smaller than the packet that incites it (quinn pads it to at most a byte less), so
/// it cannot amplify, and a reset loop between two endpoints shrinks until it stops.
const RESET_INTERVAL: Duration = Duration::ZERO;

/// Binds the QUIC endpoint: server certificate from the CA, client certificates required and
/// verified against the same CA, ALPN `cronium/1`.
///
/// `reset_key` keys the stateless resets. It is kept in the data dir, so after a restart the
/// control plane answers packets of connections it no longer knows with a reset the agents
/// accept, and they reconnect at once instead of waiting for a timeout.
pub fn bind_endpoint(
    address: SocketAddr,
    ca: &CertificateAuthority,
    reset_key: &[u8],
) -> anyhow::Result<quinn::Endpoint> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.ca_der().clone())
        .context("adding the CA to the client verifier")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .context("client verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(ca.server_chain.clone(), ca.server_key.clone_key())
        .context("server certificate")?;
    tls.alpn_protocols = vec![cronium_protocol::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(20).try_into().context("idle timeout")?,
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    // Streams an agent may open before its hello: the control stream and a few job streams.
    // quinn keeps state for every allowed stream up front, so the limit is raised per agent
    // after the hello, to what its declared capacity needs (see `session`).
    transport.max_concurrent_bidi_streams(INITIAL_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key,
    )));
    let cid_key = cid_key(reset_key)?;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    endpoint_config.min_reset_interval(RESET_INTERVAL);
    let socket =
        std::net::UdpSocket::bind(address).with_context(|| format!("binding QUIC on {address}"))?;
    grow_receive_buffer(&socket, RECEIVE_BUFFER);
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the QUIC endpoint")
}

/// The key of the endpoint's connection ids, which are validated with a keyed hash: derived
/// from the reset key, so a restarted control plane (or another replica) recognises the old
/// ids and answers them with a stateless reset.
fn cid_key(reset_key: &[u8]) -> anyhow::Result<u64> {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"cronium connection ids".as_slice(), reset_key].concat(),
    );
    Ok(u64::from_le_bytes(
        digest.as_ref()[..8]
            .try_into()
            .context("connection id key")?,
    ))
}

/// Asks for a receive buffer of `wanted` bytes on the QUIC socket and returns what the kernel
/// granted (Linux reports twice the size it accounts for), saying so when it is less: the
/// kernel caps the request at `net.core.rmem_max`, which a large fleet should raise.
fn grow_receive_buffer(socket: &std::net::UdpSocket, wanted: usize) -> Option<usize> {
    let socket = socket2::SockRef::from(socket);
    if let Err(error) = socket.set_recv_buffer_size(wanted) {
        warn!(%error, wanted, "could not set the QUIC socket's receive buffer");
    }
    let granted = match socket.recv_buffer_size() {
        Ok(granted) => granted,
        Err(error) => {
            warn!(%error, "could not read the QUIC socket's receive buffer size");
            return None;
        }
    };
    if granted < wanted {
        info!(
            granted,
            wanted,
            "the QUIC socket's receive buffer is smaller than asked: the kernel caps it at \
             net.core.rmem_max; with many agents raise it (sysctl -w net.core.rmem_max={wanted}), \
             or bursts of their packets may be dropped and resent"
        );
    } else {
        debug!(granted, "QUIC socket receive buffer");
    }
    Some(granted)
}

/// Accepts connections until shutdown; each agent gets its own task.
pub async fn serve(endpoint: quinn::Endpoint, state: AppState) {
    let span = info_span!("quic", address = ?endpoint.local_addr().ok());
    async {
        loop {
            let incoming = tokio::select! {
                incoming = endpoint.accept() => incoming,
                _ = state.shutdown.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let state_for_task = state.clone();
            state
                .tasks
                .spawn(session::handle_incoming(incoming, state_for_task).in_current_span());
        }
        state
            .registry
            .disconnect_all(cronium_protocol::CloseCode::Shutdown);
        endpoint.close(
            cronium_protocol::CloseCode::Shutdown.to_u32().into(),
            b"shutdown",
        );
        info!("QUIC listener stopped");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use quinn_proto::ConnectionIdGenerator;

    /// After a restart every agent's next packet is answered by a stateless reset, however many
    /// arrive at once: short-header packets for connection ids the endpoint's key made but that
    /// it does not know (as after a restart), sent back to back from one socket, get one reset
    /// each. With quinn's default of one reset per 20 ms (see `RESET_INTERVAL`) this got 1.
    #[tokio::test]
    async fn every_packet_of_an_unknown_connection_is_answered_with_a_reset() {
        let ca = super::CertificateAuthority::from_pems(
            &super::CertificateAuthority::generate().unwrap(),
        )
        .unwrap();
        let reset_key = [7u8; 32];
        let endpoint =
            super::bind_endpoint("127.0.0.1:0".parse().unwrap(), &ca, &reset_key).unwrap();
        let address = endpoint.local_addr().unwrap();
        let mut ids =
            quinn_proto::HashedConnectionIdGenerator::from_key(super::cid_key(&reset_key).unwrap());
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        const PACKETS: usize = 20;
        const PACKET_LEN: usize = 64;
        for _ in 0..PACKETS {
            // Fixed bit set, short header; then the id; then what would be a packet number and
            // an encrypted payload.
            let mut packet = vec![0x40];
            packet.extend_from_slice(&ids.generate_cid());
            packet.resize(PACKET_LEN, 0xa5);
            socket.send_to(&packet, address).await.unwrap();
        }
        let mut resets = 0;
        let mut buffer = [0u8; 1500];
        while resets < PACKETS {
            let Ok(received) =
                tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer)).await
            else {
                break;
            };
            let (len, from) = received.unwrap();
            assert_eq!(from, address);
            assert!(
                len < PACKET_LEN && buffer[0] & 0xc0 == 0x40,
                "a reset looks like a shorter short-header packet: {len} bytes, first {:#x}",
                buffer[0]
            );
            resets += 1;
        }
        assert_eq!(resets, PACKETS, "packets answered with a stateless reset");
        endpoint.close(0u32.into(), b"");
    }

    /// Linux grants `min(asked, net.core.rmem_max)` and reports twice that.
    #[test]
    fn the_quic_socket_gets_the_receive_buffer_the_kernel_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let wanted = super::RECEIVE_BUFFER;
        let granted = super::grow_receive_buffer(&socket, wanted).unwrap();
        assert_eq!(granted, 2 * wanted.min(cap));
        assert!(
            cap <= default / 2 || granted > default,
            "{granted} bytes granted, {default} by default, rmem_max {cap}"
        );
    }
}
