//! Release verification on the agent: the pinned ed25519 release public key, the signed manifest
//! (`{version, target, sha256, size}`) and semver precedence.
//!
//! The signed bytes are exactly the ones the installer (`openssl pkeyutl -verify -rawin`) and
//! `cronium release sign` use: the raw 64-byte ed25519 signature over the manifest file's bytes,
//! and over the binary's bytes (no hashing first). Verification is strict (no malleable
//! signatures). Nothing here touches the file system or the network.

use std::cmp::Ordering;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
pub const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Largest manifest accepted (a real one is about 200 bytes).
pub const MAX_MANIFEST_BYTES: usize = 4096;

/// Why a release was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the release public key is unusable: {0}")]
    Key(String),
    #[error(
        "the signature of {0} does not verify with the pinned release key (tampered, unsigned or signed with another key)"
    )]
    Signature(&'static str),
    #[error("the release manifest is invalid: {0}")]
    Manifest(String),
    #[error("the binary has {actual} bytes, the signed manifest says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("the binary's sha256 differs from the signed manifest's")]
    Sha256,
    #[error("the signed manifest is for {actual}, this agent runs on {expected}")]
    Target { expected: String, actual: String },
    #[error("asked for version {asked} but the signed manifest says {signed}")]
    Version { asked: String, signed: String },
    #[error(
        "refusing {offered}: it is not newer than the installed {installed} (downgrades are refused)"
    )]
    NotNewer { offered: String, installed: String },
}

/// The pinned release public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseKey(VerifyingKey);

impl ReleaseKey {
    /// Parses a SubjectPublicKeyInfo PEM (what `cronium release keygen` and the installer write),
    /// or the raw 32 bytes as base64 or hex.
    pub fn parse(text: &str) -> Result<ReleaseKey, VerifyError> {
        let text = text.trim();
        if text.contains("PRIVATE KEY") {
            return Err(VerifyError::Key(
                "this is a PRIVATE key; the agent needs only the public key".into(),
            ));
        }
        let raw = if text.starts_with("-----") {
            let der = pem_body(text, "PUBLIC KEY").ok_or_else(|| {
                VerifyError::Key("not a PEM public key (-----BEGIN PUBLIC KEY-----)".into())
            })?;
            der.strip_prefix(&SPKI_PREFIX[..])
                .map(<[u8]>::to_vec)
                .ok_or_else(|| VerifyError::Key("not an ed25519 public key".into()))?
        } else if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|error| VerifyError::Key(error.to_string()))?
        } else {
            STANDARD
                .decode(text)
                .map_err(|_| VerifyError::Key("not a PEM, hex or base64 public key".into()))?
        };
        let raw: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| VerifyError::Key("an ed25519 public key has 32 bytes".into()))?;
        VerifyingKey::from_bytes(&raw)
            .map(ReleaseKey)
            .map_err(|_| VerifyError::Key("not a valid ed25519 public key".into()))
    }

    /// The key itself.
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }

    /// Checks a raw detached signature over `message`.
    pub fn verify(
        &self,
        message: &[u8],
        signature: &[u8],
        what: &'static str,
    ) -> Result<(), VerifyError> {
        let bytes: [u8; 64] = signature
            .try_into()
            .map_err(|_| VerifyError::Signature(what))?;
        self.0
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .map_err(|_| VerifyError::Signature(what))
    }
}

/// The DER inside a PEM block labelled `label`.
pub fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    STANDARD.decode(body).ok()
}

/// What a signed manifest says about one binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    pub target: String,
    /// SHA-256 of the binary, lower-case hex.
    pub sha256: String,
    /// The binary's size in bytes.
    pub size: u64,
}

impl Manifest {
    /// Verifies the manifest's signature, then parses and checks it.
    pub fn verify(
        key: &ReleaseKey,
        bytes: &[u8],
        signature: &[u8],
    ) -> Result<Manifest, VerifyError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(VerifyError::Manifest(format!(
                "{} bytes, more than {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        key.verify(bytes, signature, "the release manifest")?;
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|error| VerifyError::Manifest(error.to_string()))?;
        if parse_version(&manifest.version).is_none() {
            return Err(VerifyError::Manifest(format!(
                "{:?} is not a version",
                manifest.version
            )));
        }
        if manifest.sha256.len() != 64
            || !manifest
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(VerifyError::Manifest(
                "sha256 is not 64 lower-case hex digits".into(),
            ));
        }
        Ok(manifest)
    }

    /// Checks that `binary` is the file this manifest describes and that `signature` is the
    /// release key's signature of it.
    pub fn check_binary(
        &self,
        key: &ReleaseKey,
        binary: &[u8],
        signature: &[u8],
    ) -> Result<(), VerifyError> {
        if binary.len() as u64 != self.size {
            return Err(VerifyError::Size {
                expected: self.size,
                actual: binary.len() as u64,
            });
        }
        if sha256_hex(binary) != self.sha256 {
            return Err(VerifyError::Sha256);
        }
        key.verify(binary, signature, "the agent binary")
    }

    /// Checks that this release is what was asked for, for this host, and strictly newer than
    /// what runs.
    pub fn check_offer(
        &self,
        asked: &str,
        target: &str,
        installed: &str,
    ) -> Result<(), VerifyError> {
        if self.version != asked {
            return Err(VerifyError::Version {
                asked: asked.to_owned(),
                signed: self.version.clone(),
            });
        }
        if self.target != target {
            return Err(VerifyError::Target {
                expected: target.to_owned(),
                actual: self.target.clone(),
            });
        }
        check_newer(&self.version, installed)
    }
}

/// Refuses `offered` unless it is strictly newer than `installed` (semver precedence).
pub fn check_newer(offered: &str, installed: &str) -> Result<(), VerifyError> {
    if compare_versions(offered, installed) == Some(Ordering::Greater) {
        Ok(())
    } else {
        Err(VerifyError::NotNewer {
            offered: offered.to_owned(),
            installed: installed.to_owned(),
        })
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

type ParsedVersion<'a> = ([u64; 3], Option<&'a str>);

/// `MAJOR.MINOR.PATCH[-PRE][+BUILD]`, with `[0-9A-Za-z.-]` in the optional parts.
fn parse_version(version: &str) -> Option<ParsedVersion<'_>> {
    if version.is_empty() || version.len() > 64 {
        return None;
    }
    let allowed = |text: &str| {
        !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    };
    let (rest, build) = match version.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (version, None),
    };
    if build.is_some_and(|build| !allowed(build)) {
        return None;
    }
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    if pre.is_some_and(|pre| !allowed(pre)) {
        return None;
    }
    let mut numbers = [0u64; 3];
    let mut parts = core.split('.');
    for number in &mut numbers {
        let part = parts.next()?;
        if part.is_empty() || !part.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *number = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((numbers, pre))
}

/// Whether `version` is a valid version string (safe to put in a URL path segment).
pub fn is_version(version: &str) -> bool {
    parse_version(version).is_some()
}

/// Semver precedence (a pre-release sorts before its release; `+build` is ignored); `None` if
/// either is not a version.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let (a_core, a_pre) = parse_version(a)?;
    let (b_core, b_pre) = parse_version(b)?;
    Some(a_core.cmp(&b_core).then_with(|| match (a_pre, b_pre) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => a.cmp(b),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const TARGET: &str = "x86_64-unknown-linux-gnu";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn spki_pem(key: &SigningKey) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(key.verifying_key().as_bytes());
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }

    /// The manifest bytes exactly as `cronium release sign` writes them.
    fn manifest_bytes(version: &str, binary: &[u8]) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(&Manifest {
            version: version.into(),
            target: TARGET.into(),
            sha256: sha256_hex(binary),
            size: binary.len() as u64,
        })
        .unwrap();
        bytes.push(b'\n');
        bytes
    }

    #[test]
    fn keys_parse_from_pem_hex_and_base64_and_private_keys_are_refused() {
        let signing = key(7);
        let pinned = ReleaseKey::parse(&spki_pem(&signing)).unwrap();
        let raw = signing.verifying_key().to_bytes();
        assert_eq!(ReleaseKey::parse(&hex::encode(raw)).unwrap(), pinned);
        assert_eq!(ReleaseKey::parse(&STANDARD.encode(raw)).unwrap(), pinned);
        for bad in [
            "",
            "garbage",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        ] {
            assert!(ReleaseKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_signed_release_verifies_and_tampering_another_key_or_a_downgrade_are_refused() {
        let signing = key(1);
        let pinned = ReleaseKey::parse(&spki_pem(&signing)).unwrap();
        let binary = b"\x7fELF pretend agent".to_vec();
        let manifest = manifest_bytes("0.2.0", &binary);
        let manifest_signature = signing.sign(&manifest).to_bytes();
        let binary_signature = signing.sign(&binary).to_bytes();

        let verified = Manifest::verify(&pinned, &manifest, &manifest_signature).unwrap();
        verified
            .check_binary(&pinned, &binary, &binary_signature)
            .unwrap();
        verified.check_offer("0.2.0", TARGET, "0.1.0").unwrap();

        // A tampered binary: same size, another byte.
        let mut tampered = binary.clone();
        tampered[3] ^= 1;
        assert_eq!(
            verified.check_binary(&pinned, &tampered, &binary_signature),
            Err(VerifyError::Sha256)
        );
        // A longer one.
        let mut longer = binary.clone();
        longer.push(0);
        assert!(matches!(
            verified.check_binary(&pinned, &longer, &binary_signature),
            Err(VerifyError::Size { .. })
        ));
        // Unsigned (empty or garbage signatures).
        for signature in [&[][..], b"garbage", &[0u8; 64]] {
            assert!(matches!(
                Manifest::verify(&pinned, &manifest, signature),
                Err(VerifyError::Signature(_))
            ));
            assert!(matches!(
                verified.check_binary(&pinned, &binary, signature),
                Err(VerifyError::Signature(_))
            ));
        }
        // A modified manifest.
        let edited = String::from_utf8(manifest.clone())
            .unwrap()
            .replace("0.2.0", "0.3.0");
        assert!(matches!(
            Manifest::verify(&pinned, edited.as_bytes(), &manifest_signature),
            Err(VerifyError::Signature(_))
        ));
        // Everything signed with another key.
        let other = key(2);
        assert!(matches!(
            Manifest::verify(&pinned, &manifest, &other.sign(&manifest).to_bytes()),
            Err(VerifyError::Signature(_))
        ));
        assert!(matches!(
            verified.check_binary(&pinned, &binary, &other.sign(&binary).to_bytes()),
            Err(VerifyError::Signature(_))
        ));
        // A binary signed but not the one the manifest describes.
        let another = b"\x7fELF another build".to_vec();
        assert!(
            verified
                .check_binary(&pinned, &another, &signing.sign(&another).to_bytes())
                .is_err()
        );
        // Downgrades, the same version, another version than asked, another target.
        for installed in ["0.2.0", "0.3.0", "1.0.0"] {
            assert!(matches!(
                verified.check_offer("0.2.0", TARGET, installed),
                Err(VerifyError::NotNewer { .. })
            ));
        }
        assert!(matches!(
            verified.check_offer("0.2.1", TARGET, "0.1.0"),
            Err(VerifyError::Version { .. })
        ));
        assert!(matches!(
            verified.check_offer("0.2.0", "aarch64-unknown-linux-gnu", "0.1.0"),
            Err(VerifyError::Target { .. })
        ));
        // Oversized and malformed manifests.
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            Manifest::verify(&pinned, &huge, &signing.sign(&huge).to_bytes()),
            Err(VerifyError::Manifest(_))
        ));
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"version":"latest","target":"t","sha256":"00","size":1}"#,
            br#"{"version":"1.0.0","target":"t","sha256":"00","size":1,"extra":1}"#,
        ] {
            assert!(matches!(
                Manifest::verify(&pinned, bad, &signing.sign(bad).to_bytes()),
                Err(VerifyError::Manifest(_))
            ));
        }
    }

    #[test]
    fn versions_compare_by_semver() {
        assert_eq!(compare_versions("0.10.0", "0.9.9"), Some(Ordering::Greater));
        assert_eq!(
            compare_versions("1.0.0-rc.1", "1.0.0"),
            Some(Ordering::Less)
        );
        assert_eq!(compare_versions("1.0.0+b1", "1.0.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("1.0", "1.0.0"), None);
        assert!(check_newer("0.2.0", "0.1.0").is_ok());
        assert!(check_newer("0.1.0", "0.1.0").is_err());
        assert!(check_newer("0.1.0+b2", "0.1.0").is_err());
        assert!(check_newer("garbage", "0.1.0").is_err());
        for bad in ["", "latest", "../1.0.0", "1.0.0/x", "1..0"] {
            assert!(!is_version(bad), "{bad}");
        }
    }
}
