//! Enrollment: trading a one-time token for the agent's identity.
//!
//! The agent generates an ed25519 key and a certificate signing request, posts them with the
//! token to `POST {server}/api/v1/agents/enroll`, checks that the CA certificate it gets back
//! matches the fingerprint the operator gave (`--ca-sha256`), and only then writes the key, the
//! issued certificate, the CA and `agent.json` into the state dir. The token is never logged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::{Identity, IdentityError, IdentityFiles, ca_fingerprint};

/// How long the enrollment request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What `cronium-agent enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// The control plane's public HTTP(S) URL.
    pub server_url: String,
    /// The enrollment token. Secret: never logged.
    pub token: String,
    /// Expected SHA-256 (hex) of the control plane's CA certificate.
    pub ca_sha256: String,
    /// The agent's name; the host name when `None`.
    pub name: Option<String>,
    /// Labels to enroll with.
    pub labels: BTreeMap<String, String>,
    /// Where the identity is written.
    pub state_dir: PathBuf,
    /// Replace an existing identity.
    pub force: bool,
}

/// Why enrollment failed. Nothing is written to the state dir in any of these cases.
#[derive(Debug, Error)]
pub enum EnrollError {
    /// The state dir already holds an identity and `force` was not given.
    #[error("an agent identity already exists in {0} (use --force to replace it)")]
    AlreadyEnrolled(PathBuf),
    /// The expected CA fingerprint is not 64 hex digits.
    #[error("--ca-sha256 must be 64 hex digits (a SHA-256 fingerprint)")]
    BadFingerprint,
    /// The server URL is not an http(s) URL.
    #[error("the server URL must start with http:// or https://, got {0:?}")]
    BadUrl(String),
    /// The key or the signing request could not be generated.
    #[error("cannot generate the agent key: {0}")]
    Key(#[from] rcgen::Error),
    /// The HTTP request failed before an answer came.
    #[error("cannot reach the control plane: {0}")]
    Http(#[from] reqwest::Error),
    /// The control plane answered with an error.
    #[error("enrollment refused: {0}")]
    Refused(String),
    /// The control plane's answer is not what the protocol promises.
    #[error("invalid enrollment response: {0}")]
    BadResponse(String),
    /// The CA certificate that came back is not the one the operator pinned.
    #[error(
        "the control plane's CA fingerprint is {actual}, expected {expected}; refusing to enroll"
    )]
    CaMismatch { expected: String, actual: String },
    /// The identity could not be written.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Why a `--labels` value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LabelError {
    /// An item has no `=`.
    #[error("label {0:?} is not of the form key=value")]
    MissingEquals(String),
    /// An item has an empty key.
    #[error("label {0:?} has an empty key")]
    EmptyKey(String),
    /// A key contains characters outside `A-Z a-z 0-9 . _ - /`.
    #[error("label key {0:?} may only contain letters, digits, '.', '_', '-' and '/'")]
    BadKey(String),
    /// A key appears twice.
    #[error("label key {0:?} is given twice")]
    Duplicate(String),
}

#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    name: &'a str,
    labels: &'a BTreeMap<String, String>,
    csr_pem: &'a str,
    host: HostBody,
}

#[derive(Serialize)]
struct HostBody {
    hostname: String,
    os: String,
    arch: String,
}

#[derive(Deserialize)]
struct EnrollResponse {
    agent_id: String,
    name: String,
    certificate_pem: String,
    ca_certificate_pem: String,
    quic_addrs: Vec<String>,
    server_name: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: String,
}

/// Parses `k=v,k2=v2` (spaces around items are ignored; an empty string is no labels).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let mut labels = BTreeMap::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| LabelError::MissingEquals(item.to_owned()))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(LabelError::EmptyKey(item.to_owned()));
        }
        if !key
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._-/".contains(&byte))
        {
            return Err(LabelError::BadKey(key.to_owned()));
        }
        if labels
            .insert(key.to_owned(), value.trim().to_owned())
            .is_some()
        {
            return Err(LabelError::Duplicate(key.to_owned()));
        }
    }
    Ok(labels)
}

/// Enrolls the agent and writes its identity into `options.state_dir`.
pub async fn enroll(options: EnrollOptions) -> Result<Identity, EnrollError> {
    crate::install_crypto_provider();
    let expected = normalize_fingerprint(&options.ca_sha256).ok_or(EnrollError::BadFingerprint)?;
    let server_url = options.server_url.trim_end_matches('/').to_owned();
    if !(server_url.starts_with("http://") || server_url.starts_with("https://")) {
        return Err(EnrollError::BadUrl(options.server_url));
    }
    if Identity::exists(&options.state_dir) && !options.force {
        return Err(EnrollError::AlreadyEnrolled(options.state_dir));
    }

    let host = crate::host_info();
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| host.hostname.clone());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.clone());
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    // Check the CA before the token leaves the host: a control plane that is not the pinned one
    // never sees the token.
    let ca_url = format!("{server_url}/api/v1/agents/ca");
    let response = client.get(&ca_url).send().await?;
    if !response.status().is_success() {
        return Err(EnrollError::BadResponse(format!(
            "GET {ca_url} answered HTTP {}",
            response.status()
        )));
    }
    let offered_ca = response.text().await?;
    let offered = ca_fingerprint(&offered_ca).map_err(EnrollError::BadResponse)?;
    if offered != expected {
        return Err(EnrollError::CaMismatch {
            expected,
            actual: offered,
        });
    }
    let url = format!("{server_url}/api/v1/agents/enroll");
    tracing::info!(%url, %name, "enrolling with the control plane");
    let request = EnrollRequest {
        token: &options.token,
        name: &name,
        labels: &options.labels,
        csr_pem: &csr_pem,
        host: HostBody {
            hostname: host.hostname,
            os: host.os,
            arch: host.arch,
        },
    };
    let response = client.post(&url).json(&request).send().await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.bytes().await.unwrap_or_default();
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(error) => error.error.message,
            Err(_) => format!("HTTP {status}"),
        };
        return Err(EnrollError::Refused(message));
    }
    let body = response.bytes().await?;
    let enrolled: EnrollResponse = serde_json::from_slice(&body)
        .map_err(|error| EnrollError::BadResponse(error.to_string()))?;

    let actual = ca_fingerprint(&enrolled.ca_certificate_pem).map_err(EnrollError::BadResponse)?;
    if actual != expected {
        return Err(EnrollError::CaMismatch { expected, actual });
    }
    if enrolled.quic_addrs.is_empty() {
        return Err(EnrollError::BadResponse("no QUIC address".into()));
    }
    if ca_fingerprint(&enrolled.certificate_pem).is_err() {
        return Err(EnrollError::BadResponse(
            "the issued certificate is not PEM".into(),
        ));
    }

    let identity = Identity {
        agent_id: enrolled.agent_id,
        name: enrolled.name,
        server_url,
        quic_addrs: enrolled.quic_addrs,
        server_name: enrolled.server_name,
        ca_sha256: actual,
        state_dir: options.state_dir,
    };
    identity.save(&IdentityFiles {
        key_pem: key.serialize_pem(),
        cert_pem: enrolled.certificate_pem,
        ca_pem: enrolled.ca_certificate_pem,
    })?;
    // Replicas learned under an earlier identity are not this one's.
    crate::conn::replicas::forget(&identity.state_dir).map_err(|source| IdentityError::Io {
        path: identity
            .state_dir
            .join(crate::conn::replicas::REPLICAS_FILE),
        source,
    })?;
    tracing::info!(agent_id = %identity.agent_id, state_dir = %identity.state_dir.display(), "enrolled");
    Ok(identity)
}

/// Lower-cases a hex fingerprint, dropping `:` separators; `None` unless it is 64 hex digits.
fn normalize_fingerprint(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .chars()
        .filter(|character| *character != ':')
        .collect();
    (hex.len() == 64 && hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_with_clear_errors() {
        let labels = parse_labels("env=prod, role=web,empty=").unwrap();
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(labels.get("role").map(String::as_str), Some("web"));
        assert_eq!(labels.get("empty").map(String::as_str), Some(""));
        assert!(parse_labels("").unwrap().is_empty());
        assert_eq!(
            parse_labels("env"),
            Err(LabelError::MissingEquals("env".into()))
        );
        assert_eq!(parse_labels("=x"), Err(LabelError::EmptyKey("=x".into())));
        assert_eq!(parse_labels("a b=x"), Err(LabelError::BadKey("a b".into())));
        assert_eq!(
            parse_labels("a=1,a=2"),
            Err(LabelError::Duplicate("a".into()))
        );
    }

    #[test]
    fn fingerprints_are_normalized() {
        let hex = "AB".repeat(32);
        assert_eq!(normalize_fingerprint(&hex), Some("ab".repeat(32)));
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(normalize_fingerprint(&colons), Some("ab".repeat(32)));
        assert_eq!(normalize_fingerprint("abc"), None);
        assert_eq!(normalize_fingerprint(&"zz".repeat(32)), None);
    }

    /// A tiny one-shot HTTP server offering a CA whose fingerprint does not match: the token is
    /// never sent and nothing is written.
    #[tokio::test]
    async fn a_ca_mismatch_writes_nothing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ca = rcgen::CertificateParams::new(vec![])
            .unwrap()
            .self_signed(&ca_key)
            .unwrap();
        let body = ca.pem();
        let server = async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            // Read until the end of the request head (a GET has no body).
            while !request.ends_with(b"\r\n\r\n") {
                let len = socket.read(&mut buffer).await.unwrap();
                assert!(len > 0);
                request.extend_from_slice(&buffer[..len]);
            }
            let text = String::from_utf8_lossy(&request).into_owned();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-pem-file\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            text
        };
        let temp = tempfile::tempdir().unwrap();
        let state_dir = temp.path().join("state");
        let options = EnrollOptions {
            server_url: format!("http://{address}/"),
            token: "secret-token".into(),
            ca_sha256: "00".repeat(32),
            name: Some("web-1".into()),
            labels: parse_labels("env=test").unwrap(),
            state_dir: state_dir.clone(),
            force: false,
        };
        let (result, request) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(enroll(options), server)
        })
        .await
        .unwrap();
        assert!(
            matches!(result, Err(EnrollError::CaMismatch { .. })),
            "{result:?}"
        );
        // The CA was checked first, so the token never left the host.
        assert!(request.starts_with("GET /api/v1/agents/ca "), "{request}");
        assert!(!request.contains("secret-token"));
        assert!(!state_dir.exists());
    }
}
