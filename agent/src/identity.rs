//! The agent's identity in its state dir and the QUIC client configuration built from it.
//!
//! Layout of the state dir (mode 0700):
//! - `key.pem`: the agent's ed25519 private key, PKCS#8 PEM, mode 0600;
//! - `cert.pem`: the client certificate the control plane issued at enrollment;
//! - `ca.pem`: the control plane's CA certificate, the only trust root of the QUIC connection;
//! - `agent.json`: `{agent_id, name, server_url, quic_addrs, server_name, ca_sha256}`, written
//!   last, so its presence means the identity is complete.
//! - `replicas.json` (optional): the control-plane replicas' addresses the agent learned
//!   (`conn::replicas`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// File names inside the state dir.
pub const KEY_FILE: &str = "key.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const CA_FILE: &str = "ca.pem";
pub const AGENT_FILE: &str = "agent.json";

/// QUIC keep-alive interval: well below the idle timeout, and frequent enough to keep NAT
/// bindings open.
const KEEP_ALIVE: Duration = Duration::from_secs(4);

/// A connection that hears nothing for this long is considered dead.
const MAX_IDLE: Duration = Duration::from_secs(20);

/// Streams the control plane may have open at once on the agent's connection: terminal viewers.
const MAX_SERVER_STREAMS: u32 = 64;

/// Why an identity could not be loaded, stored or used.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// The state dir holds no identity.
    #[error("no agent identity in {0} (run `cronium-agent enroll` first)")]
    Missing(PathBuf),
    /// A file of the identity could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A file of the identity is malformed.
    #[error("invalid {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    /// `ca.pem` does not match the pinned fingerprint in `agent.json`.
    #[error("{path} does not match the pinned CA fingerprint {expected}")]
    CaMismatch { path: PathBuf, expected: String },
    /// TLS could not be configured with these certificates.
    #[error("cannot configure TLS: {0}")]
    Tls(String),
}

/// What enrollment established, stored in `agent.json`, plus where it was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    pub name: String,
    pub server_url: String,
    /// The control plane's QUIC addresses, `host:port`, tried in order.
    pub quic_addrs: Vec<String>,
    /// The name the control plane's QUIC certificate is issued for.
    pub server_name: String,
    /// Lower-case hex SHA-256 of the CA certificate's DER.
    pub ca_sha256: String,
    /// The state dir the identity lives in.
    pub state_dir: PathBuf,
}

/// The PEM files of an identity, as written at enrollment.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

#[derive(Serialize, Deserialize)]
struct AgentFile {
    agent_id: String,
    name: String,
    server_url: String,
    quic_addrs: Vec<String>,
    server_name: String,
    ca_sha256: String,
}

impl Identity {
    /// Whether the state dir already holds (part of) an identity.
    pub fn exists(state_dir: &Path) -> bool {
        [KEY_FILE, CERT_FILE, CA_FILE, AGENT_FILE]
            .iter()
            .any(|name| state_dir.join(name).exists())
    }

    /// Loads `agent.json` and checks `ca.pem` against the pinned fingerprint.
    pub fn load(state_dir: &Path) -> Result<Identity, IdentityError> {
        let agent_path = state_dir.join(AGENT_FILE);
        let bytes = match fs::read(&agent_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing(state_dir.to_path_buf()));
            }
            Err(source) => {
                return Err(IdentityError::Io {
                    path: agent_path,
                    source,
                });
            }
        };
        let file: AgentFile =
            serde_json::from_slice(&bytes).map_err(|error| IdentityError::Invalid {
                path: agent_path.clone(),
                detail: error.to_string(),
            })?;
        if file.quic_addrs.is_empty() {
            return Err(IdentityError::Invalid {
                path: agent_path,
                detail: "no QUIC address".into(),
            });
        }
        let ca_path = state_dir.join(CA_FILE);
        let ca_pem = read_text(&ca_path)?;
        let actual = ca_fingerprint(&ca_pem).map_err(|detail| IdentityError::Invalid {
            path: ca_path.clone(),
            detail,
        })?;
        if !actual.eq_ignore_ascii_case(&file.ca_sha256) {
            return Err(IdentityError::CaMismatch {
                path: ca_path,
                expected: file.ca_sha256,
            });
        }
        Ok(Identity {
            agent_id: file.agent_id,
            name: file.name,
            server_url: file.server_url,
            quic_addrs: file.quic_addrs,
            server_name: file.server_name,
            ca_sha256: file.ca_sha256.to_ascii_lowercase(),
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Writes the identity: the state dir (0700), the PEM files (the key 0600) and `agent.json`
    /// last. Every file is written through a temporary file and renamed into place.
    pub fn save(&self, files: &IdentityFiles) -> Result<(), IdentityError> {
        let dir_error = |source| IdentityError::Io {
            path: self.state_dir.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state_dir)
            .map_err(dir_error)?;
        fs::set_permissions(&self.state_dir, fs::Permissions::from_mode(0o700))
            .map_err(dir_error)?;
        write_private(&self.state_dir.join(KEY_FILE), files.key_pem.as_bytes())?;
        write_private(&self.state_dir.join(CERT_FILE), files.cert_pem.as_bytes())?;
        write_private(&self.state_dir.join(CA_FILE), files.ca_pem.as_bytes())?;
        self.save_settings()
    }

    /// Rewrites only `agent.json` (e.g. when the control plane's addresses changed); the key and
    /// certificates stay as they are.
    pub fn save_settings(&self) -> Result<(), IdentityError> {
        let agent = AgentFile {
            agent_id: self.agent_id.clone(),
            name: self.name.clone(),
            server_url: self.server_url.clone(),
            quic_addrs: self.quic_addrs.clone(),
            server_name: self.server_name.clone(),
            ca_sha256: self.ca_sha256.clone(),
        };
        let json = serde_json::to_vec_pretty(&agent).map_err(|error| IdentityError::Invalid {
            path: self.state_dir.join(AGENT_FILE),
            detail: error.to_string(),
        })?;
        write_private(&self.state_dir.join(AGENT_FILE), &json)
    }

    /// Builds the QUIC client configuration: TLS 1.3 trusting only `ca.pem`, the client
    /// certificate `cert.pem` with `key.pem`, ALPN `cronium/1`, keep-alives and an idle timeout.
    pub fn quic_client_config(&self) -> Result<quinn::ClientConfig, IdentityError> {
        let ca_path = self.state_dir.join(CA_FILE);
        let cert_path = self.state_dir.join(CERT_FILE);
        let key_path = self.state_dir.join(KEY_FILE);

        let mut roots = rustls::RootCertStore::empty();
        for certificate in parse_certificates(&read_text(&ca_path)?, &ca_path)? {
            roots
                .add(certificate)
                .map_err(|error| IdentityError::Invalid {
                    path: ca_path.clone(),
                    detail: error.to_string(),
                })?;
        }
        let chain = parse_certificates(&read_text(&cert_path)?, &cert_path)?;
        let key =
            PrivateKeyDer::from_pem_slice(read_text(&key_path)?.as_bytes()).map_err(|error| {
                IdentityError::Invalid {
                    path: key_path.clone(),
                    detail: error.to_string(),
                }
            })?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| IdentityError::Tls(error.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|error| IdentityError::Tls(error.to_string()))?;
        tls.alpn_protocols = vec![cronium_protocol::ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls)
            .map_err(|error| IdentityError::Tls(error.to_string()))?;

        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        // 20 s fits easily in a QUIC idle timeout (a 62-bit count of milliseconds).
        let idle = quinn::IdleTimeout::try_from(MAX_IDLE)
            .map_err(|error| IdentityError::Tls(error.to_string()))?;
        transport.max_idle_timeout(Some(idle));
        // The control plane opens one bidirectional stream per terminal viewer on this
        // connection (the agent never listens); nothing else may be opened by the server.
        transport.max_concurrent_bidi_streams(MAX_SERVER_STREAMS.into());
        transport.max_concurrent_uni_streams(0u32.into());
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// The lower-case hex SHA-256 of the DER of the first certificate in `pem`.
pub fn ca_fingerprint(pem: &str) -> Result<String, String> {
    let certificate = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no certificate in PEM".to_owned())?
        .map_err(|error| error.to_string())?;
    Ok(hex::encode(Sha256::digest(certificate.as_ref())))
}

fn parse_certificates(
    pem: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| IdentityError::Invalid {
            path: path.to_path_buf(),
            detail: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(IdentityError::Invalid {
            path: path.to_path_buf(),
            detail: "no certificate in PEM".into(),
        });
    }
    Ok(certificates)
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a 0600 file through a temporary sibling, fsyncs it and renames it into place.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let temporary = path.with_extension("tmp");
    let io_error = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    fs::rename(&temporary, path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway CA and a client certificate it signed, as the control plane would issue them.
    fn issue() -> (IdentityFiles, String) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let ca_issuer = rcgen::Issuer::new(ca_params, ca_key);
        let agent_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .signed_by(&agent_key, &ca_issuer)
            .unwrap();
        let fingerprint = hex::encode(Sha256::digest(ca.der()));
        (
            IdentityFiles {
                key_pem: agent_key.serialize_pem(),
                cert_pem: cert.pem(),
                ca_pem: ca.pem(),
            },
            fingerprint,
        )
    }

    #[test]
    fn an_identity_round_trips_and_builds_a_client_config() {
        let temp = tempfile::tempdir().unwrap();
        let state_dir = temp.path().join("state");
        let (files, fingerprint) = issue();
        let identity = Identity {
            agent_id: "agent-1".into(),
            name: "host".into(),
            server_url: "http://127.0.0.1:8080".into(),
            quic_addrs: vec!["127.0.0.1:7443".into()],
            server_name: cronium_protocol::SERVER_NAME.into(),
            ca_sha256: fingerprint.clone(),
            state_dir: state_dir.clone(),
        };
        assert!(!Identity::exists(&state_dir));
        identity.save(&files).unwrap();
        assert!(Identity::exists(&state_dir));
        assert_eq!(
            fs::metadata(&state_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::metadata(state_dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(ca_fingerprint(&files.ca_pem).unwrap(), fingerprint);

        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let loaded = Identity::load(&state_dir).unwrap();
        assert_eq!(loaded, identity);
        loaded.quic_client_config().unwrap();

        // A replaced CA file no longer matches the pinned fingerprint.
        let (other, _) = issue();
        fs::write(state_dir.join(CA_FILE), other.ca_pem).unwrap();
        assert!(matches!(
            Identity::load(&state_dir),
            Err(IdentityError::CaMismatch { .. })
        ));
    }
}
