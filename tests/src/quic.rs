//! A raw QUIC client that speaks as an enrolled agent, for hostile-input tests.
//!
//! [`connect_as_agent`] loads an agent state dir's `ca.pem`, `cert.pem` and `key.pem` and opens a
//! mutually authenticated connection with ALPN `cronium/1` to the control plane, exactly like the
//! agent does; the test then writes whatever bytes it likes on the streams.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The name the control plane's certificate is issued for.
pub const SERVER_NAME: &str = "cronium-control-plane";

/// An open QUIC connection and the endpoint that owns it (dropping the endpoint closes it).
pub struct AgentConnection {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
}

/// Connects to `server` with the identity stored in an enrolled agent's `state_dir`.
pub async fn connect_as_agent(state_dir: &Path, server: SocketAddr) -> Result<AgentConnection> {
    crate::init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(state_dir.join("ca.pem")).context("read ca.pem")? {
        roots
            .add(cert.context("parse ca.pem")?)
            .context("add the CA certificate")?;
    }
    let chain = CertificateDer::pem_file_iter(state_dir.join("cert.pem"))
        .context("read cert.pem")?
        .collect::<Result<Vec<_>, _>>()
        .context("parse cert.pem")?;
    let key = PrivateKeyDer::from_pem_file(state_dir.join("key.pem")).context("read key.pem")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("use the agent's certificate")?;
    tls.alpn_protocols = vec![cronium_protocol::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC client crypto")?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().context("idle timeout")?,
    ));
    client_config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("bind a UDP socket")?;
    endpoint.set_default_client_config(client_config);
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint.connect(server, SERVER_NAME)?,
    )
    .await
    .context("QUIC handshake timed out")?
    .context("QUIC handshake")?;
    Ok(AgentConnection {
        endpoint,
        connection,
    })
}
