//! The control plane's own certificate authority.
//!
//! Generated on first start into the data dir (`ca.pem`, `ca-key.pem` with mode 0600). It signs
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

/// A client certificate issued to an agent.
pub struct IssuedCertificate {
    pub pem: String,
    pub sha256: String,
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, generating it on first start.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<CertificateAuthority> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let (ca_pem, key_pem) = if cert_path.exists() {
            (
                std::fs::read_to_string(&cert_path)
                    .with_context(|| format!("reading {}", cert_path.display()))?,
                std::fs::read_to_string(&key_path)
                    .with_context(|| format!("reading {}", key_path.display()))?,
            )
        } else {
            let key = KeyPair::generate().context("generating the CA key")?;
            let mut params =
                CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
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
            let key_pem = key.serialize_pem();
            crate::write_private_file(&key_path, key_pem.as_bytes())?;
            std::fs::write(&cert_path, cert.pem())
                .with_context(|| format!("writing {}", cert_path.display()))?;
            (cert.pem(), key_pem)
        };
        let key = KeyPair::from_pem(&key_pem).context("parsing the CA key")?;
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
