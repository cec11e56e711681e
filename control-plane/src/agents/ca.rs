//! The control plane's own certificate authority.
//!
//! Generated on first start and kept in the database, sealed with `ENCRYPTION_KEY`, so every
//! replica has the same one (`crate::replicas::material`; data dirs of older versions hold it in
//! `ca.pem` and `ca-key.pem`, which the first start of this version moves into the database). It signs
//! the QUIC server certificate (for [`cronium_protocol::SERVER_NAME`], re-issued at every start)
//! and one client certificate per enrolled agent, issued from the agent's certificate signing
//! request so the agent's private key never leaves the agent.

use std::path::Path;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::crypto::sha256_hex;

/// The CA and the server identity derived from it.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    /// The QUIC server certificate chain and key.
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
}

/// The CA's certificate and private key in PEM (the private key never leaves the control
/// plane: it is stored sealed in the database, `crate::replicas::material`).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct CaPems {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaPems {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("CaPems(..)")
    }
}

/// The CA certificate file of data dirs from before the CA moved into the database.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key file of data dirs from before the CA moved into the database.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// A client certificate issued to an agent.
pub struct IssuedCertificate {
    pub pem: String,
    pub sha256: String,
}

impl CertificateAuthority {
    /// A new CA: its certificate and private key, both in PEM.
    pub fn generate() -> anyhow::Result<CaPems> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Cronium control plane CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        Ok(CaPems {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA files of a data dir written by control planes before the CA moved into the
    /// database (`ca.pem`, `ca-key.pem`), if they are there.
    pub fn read_files(dir: &Path) -> anyhow::Result<Option<CaPems>> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() {
            return Ok(None);
        }
        Ok(Some(CaPems {
            cert_pem: std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?,
            key_pem: std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
        }))
    }

    /// The CA of `pems`, with a server certificate issued by it for this start.
    pub fn from_pems(pems: &CaPems) -> anyhow::Result<CertificateAuthority> {
        let (ca_pem, key_pem) = (pems.cert_pem.clone(), &pems.key_pem);
        let key = KeyPair::from_pem(key_pem).context("parsing the CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, key).context("parsing the CA certificate")?;
        let ca_der =
            <CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(ca_pem.as_bytes())
                .context("decoding the CA certificate")?;

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut params = CertificateParams::new(vec![cronium_protocol::SERVER_NAME.to_string()])
            .context("server parameters")?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let server_cert = params
            .signed_by(&server_key, &issuer)
            .context("issuing the server certificate")?;
        Ok(CertificateAuthority {
            issuer,
            ca_pem,
            ca_der: ca_der.clone(),
            server_chain: vec![server_cert.der().clone(), ca_der],
            server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        })
    }

    /// The CA certificate in PEM, as handed to enrolling agents.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// SHA-256 of the CA certificate's DER, the fingerprint agents pin.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.ca_der)
    }

    /// Issues a client certificate for `agent_id` from a PEM certificate signing request.
    /// Only the public key of the request is used; the subject is set here.
    pub fn issue_agent_certificate(
        &self,
        csr_pem: &str,
        agent_id: &str,
    ) -> anyhow::Result<IssuedCertificate> {
        if csr_pem.len() > 16 * 1024 {
            bail!("certificate signing request is too large");
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("invalid certificate signing request")?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, agent_id);
        csr.params.distinguished_name = name;
        csr.params.subject_alt_names = Vec::new();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        csr.params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = csr
            .signed_by(&self.issuer)
            .context("signing the agent certificate")?;
        Ok(IssuedCertificate {
            pem: cert.pem(),
            sha256: sha256_hex(cert.der()),
        })
    }
}
