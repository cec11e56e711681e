//! Signed agent releases: the ed25519 release key (generation, PEM files), detached signatures,
//! the signed manifest (`{version, target, sha256, size}`) and the releases directory the
//! control plane serves agent binaries from.
//!
//! Formats (also in the README, "Signed releases"):
//! - private key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), file mode 0600;
//! - public key: SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), what
//!   `openssl pkeyutl -verify -pubin -rawin` reads;
//! - `FILE.sig`: the raw 64-byte ed25519 signature over the file's bytes (no hashing first);
//! - `FILE.manifest.json`: pretty JSON, one field per line (the installer reads it with `sed`),
//!   and `FILE.manifest.json.sig`, the raw signature over the manifest's bytes.
//!
//! Layout of a releases dir: `release-key.pub` and `<version>/<target>/cronium-agent` with its
//! `.sig`, `.manifest.json` and `.manifest.json.sig`. Nothing private is ever written there.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

// What the agent's self-updater checks is checked the same way here: the public key's format
// and the version order come from `cronium_agent::update::verify`.
pub use cronium_agent::update::verify::compare_versions;
use cronium_agent::update::verify::{self as agent_verify, SPKI_PREFIX, pem_body};

/// DER prefix of an ed25519 PKCS#8 v1 private key (RFC 8410); the 32 seed bytes follow.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The file name of the agent binary in a release.
pub const AGENT_FILE: &str = "cronium-agent";

/// The public key's file name in a releases dir.
pub const PUBLIC_KEY_FILE: &str = "release-key.pub";

/// File names `cronium release keygen` writes.
pub const KEYGEN_PRIVATE: &str = "release.key";
pub const KEYGEN_PUBLIC: &str = "release.pub";

/// The files of one release, relative to `<version>/<target>/`.
pub const RELEASE_FILES: [&str; 4] = [
    AGENT_FILE,
    "cronium-agent.sig",
    "cronium-agent.manifest.json",
    "cronium-agent.manifest.json.sig",
];

/// Where the control plane finds releases and the key that verifies them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseConfig {
    /// The releases dir; `<data dir>/releases` when `None`.
    pub dir: Option<PathBuf>,
    /// A PEM file with the release PUBLIC key; `<releases dir>/release-key.pub` when `None`.
    pub public_key_file: Option<PathBuf>,
}

/// The release signing key (private). Never logged, never served.
pub struct ReleaseKey(SigningKey);

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ReleaseKey(..)")
    }
}

impl ReleaseKey {
    /// A fresh key from the OS's random generator.
    pub fn generate() -> ReleaseKey {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        ReleaseKey(SigningKey::from_bytes(&seed))
    }

    /// Parses a PKCS#8 PEM private key.
    pub fn from_pem(text: &str) -> anyhow::Result<ReleaseKey> {
        let der = pem_body(text, "PRIVATE KEY")
            .context("not a PEM private key (-----BEGIN PRIVATE KEY-----)")?;
        let seed = der
            .strip_prefix(&PKCS8_PREFIX[..])
            .filter(|seed| seed.len() == 32)
            .context("not an ed25519 private key (PKCS#8)")?;
        let seed: [u8; 32] = seed.try_into().context("ed25519 seed length")?;
        Ok(ReleaseKey(SigningKey::from_bytes(&seed)))
    }

    /// Reads a private key file.
    pub fn load(path: &Path) -> anyhow::Result<ReleaseKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the release key {}", path.display()))?;
        ReleaseKey::from_pem(&text).with_context(|| format!("{}", path.display()))
    }

    /// PKCS#8 PEM.
    pub fn to_pem(&self) -> String {
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(self.0.as_bytes());
        pem("PRIVATE KEY", &der)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The raw 64-byte signature over `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

/// The release public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo PEM, or the raw 32 bytes as base64 or hex.
    pub fn parse(text: &str) -> anyhow::Result<PublicKey> {
        if text.contains("PRIVATE KEY") {
            bail!(
                "this is a PRIVATE key; the control plane needs only the public key (cronium release keygen writes it as {KEYGEN_PUBLIC})"
            );
        }
        let key =
            agent_verify::ReleaseKey::parse(text).map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(PublicKey(*key.verifying_key()))
    }

    /// Reads a public key file.
    pub fn load(path: &Path) -> anyhow::Result<PublicKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the release public key {}", path.display()))?;
        PublicKey::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.0.as_bytes());
        pem("PUBLIC KEY", &der)
    }

    /// The raw 32 bytes, base64.
    pub fn base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// The raw 32 bytes, hex.
    pub fn hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// Checks a raw detached signature over `message` (strict: no malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> anyhow::Result<()> {
        let bytes: [u8; 64] = signature.try_into().map_err(|_| {
            anyhow::anyhow!("a signature has 64 bytes, this one {}", signature.len())
        })?;
        self.0
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .map_err(|_| anyhow::anyhow!("the signature does not verify with the release key"))
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What a release manifest says about one binary; signed next to it.
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
    /// Describes `bytes`.
    pub fn new(version: &str, target: &str, bytes: &[u8]) -> anyhow::Result<Manifest> {
        check_version(version)?;
        check_target(target)?;
        Ok(Manifest {
            version: version.to_owned(),
            target: target.to_owned(),
            sha256: crate::crypto::sha256_hex(bytes),
            size: bytes.len() as u64,
        })
    }

    /// Parses and checks a manifest.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Manifest> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).context("the manifest is not valid JSON")?;
        check_version(&manifest.version)?;
        check_target(&manifest.target)?;
        if manifest.sha256.len() != 64
            || !manifest
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            bail!("the manifest's sha256 is not 64 lower-case hex digits");
        }
        Ok(manifest)
    }

    /// The signed bytes: pretty JSON, one field per line, with a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Checks that `binary` is the file this manifest describes.
    pub fn check_binary(&self, binary: &[u8]) -> anyhow::Result<()> {
        if binary.len() as u64 != self.size {
            bail!(
                "the binary has {} bytes, the manifest says {}",
                binary.len(),
                self.size
            );
        }
        if crate::crypto::sha256_hex(binary) != self.sha256 {
            bail!("the binary's sha256 differs from the manifest's");
        }
        Ok(())
    }
}

/// A version: `MAJOR.MINOR.PATCH` with an optional `-pre` and `+build` of `[0-9A-Za-z.-]`.
pub fn check_version(version: &str) -> anyhow::Result<()> {
    if !agent_verify::is_version(version) {
        bail!("{version:?} is not a version of the form MAJOR.MINOR.PATCH[-PRE][+BUILD]");
    }
    Ok(())
}

/// A target triple: 1–64 of `[0-9A-Za-z_.-]`, not starting with a dot.
pub fn check_target(target: &str) -> anyhow::Result<()> {
    let valid = !target.is_empty()
        && target.len() <= 64
        && !target.starts_with('.')
        && target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        bail!("{target:?} is not a target triple");
    }
    Ok(())
}

/// Writes `path` through a temp file and a rename, with `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .context("a file name")?;
    let temporary = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// Appends `suffix` to a path's file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `cronium release keygen`: writes `release.key` (0600) and `release.pub` into `out`; refuses
/// to replace an existing private key.
pub fn keygen(out: &Path) -> anyhow::Result<PublicKey> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let private = out.join(KEYGEN_PRIVATE);
    if private.exists() {
        bail!(
            "{} exists already; move it away first (it signs every release its public key verifies)",
            private.display()
        );
    }
    let key = ReleaseKey::generate();
    write_file(&private, key.to_pem().as_bytes(), 0o600)?;
    let public = key.public();
    write_file(&out.join(KEYGEN_PUBLIC), public.to_pem().as_bytes(), 0o644)?;
    Ok(public)
}

/// The files `sign_file` wrote.
#[derive(Debug)]
pub struct Signed {
    pub signature: PathBuf,
    pub manifest: PathBuf,
    pub manifest_signature: PathBuf,
    pub manifest_contents: Manifest,
}

/// `cronium release sign`: writes `FILE.sig`, `FILE.manifest.json` and `FILE.manifest.json.sig`.
pub fn sign_file(
    file: &Path,
    key: &ReleaseKey,
    version: &str,
    target: &str,
) -> anyhow::Result<Signed> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let manifest = Manifest::new(version, target, &bytes)?;
    let manifest_bytes = manifest.to_bytes();
    let signed = Signed {
        signature: with_suffix(file, ".sig"),
        manifest: with_suffix(file, ".manifest.json"),
        manifest_signature: with_suffix(file, ".manifest.json.sig"),
        manifest_contents: manifest,
    };
    write_file(&signed.signature, &key.sign(&bytes), 0o644)?;
    write_file(&signed.manifest, &manifest_bytes, 0o644)?;
    write_file(
        &signed.manifest_signature,
        &key.sign(&manifest_bytes),
        0o644,
    )?;
    Ok(signed)
}

/// Verifies a release the way the installer does: the manifest's signature, the binary's
/// signature, then the binary against the manifest. Returns the manifest.
pub fn verify_release(
    key: &PublicKey,
    binary: &[u8],
    signature: &[u8],
    manifest: &[u8],
    manifest_signature: &[u8],
) -> anyhow::Result<Manifest> {
    key.verify(manifest, manifest_signature)
        .context("the manifest")?;
    let parsed = Manifest::parse(manifest)?;
    key.verify(binary, signature).context("the binary")?;
    parsed.check_binary(binary)?;
    Ok(parsed)
}

/// Copies `binary` into `<releases>/<version>/<target>/cronium-agent`, signs it there, and
/// writes `<releases>/release-key.pub` (refusing a releases dir whose public key is another).
pub fn publish(
    releases: &Path,
    binary: &Path,
    key: &ReleaseKey,
    version: &str,
    target: &str,
) -> anyhow::Result<PathBuf> {
    check_version(version)?;
    check_target(target)?;
    std::fs::create_dir_all(releases)
        .with_context(|| format!("creating {}", releases.display()))?;
    let public_path = releases.join(PUBLIC_KEY_FILE);
    match std::fs::read_to_string(&public_path) {
        Ok(text) => {
            if PublicKey::parse(&text)? != key.public() {
                bail!(
                    "{} holds another release key; publish with that key, or move the releases dir away",
                    public_path.display()
                );
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            write_file(&public_path, key.public().to_pem().as_bytes(), 0o644)?;
        }
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", public_path.display()));
        }
    }
    let dir = releases.join(version).join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let destination = dir.join(AGENT_FILE);
    write_file(&destination, &bytes, 0o755)?;
    sign_file(&destination, key, version, target)?;
    Ok(destination)
}

/// The highest version in `releases` that has a manifest for `target`.
pub fn latest_version(releases: &Path, target: &str) -> Option<String> {
    let entries = std::fs::read_dir(releases).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|version| check_version(version).is_ok())
        .filter(|version| {
            releases
                .join(version)
                .join(target)
                .join(RELEASE_FILES[2])
                .is_file()
        })
        .max_by(|a, b| compare_versions(a, b).unwrap_or(Ordering::Equal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_files_and_openssl_formats() {
        let dir = tempfile::tempdir().unwrap();
        let public = keygen(dir.path()).unwrap();
        let private_path = dir.path().join(KEYGEN_PRIVATE);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&private_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = ReleaseKey::load(&private_path).unwrap();
        assert_eq!(key.public(), public);
        assert_eq!(
            PublicKey::load(&dir.path().join(KEYGEN_PUBLIC)).unwrap(),
            public
        );
        assert_eq!(PublicKey::parse(&public.base64()).unwrap(), public);
        assert_eq!(PublicKey::parse(&public.hex()).unwrap(), public);
        assert!(keygen(dir.path()).is_err(), "an existing key is kept");
        let private_text = std::fs::read_to_string(&private_path).unwrap();
        let refused = PublicKey::parse(&private_text).unwrap_err().to_string();
        assert!(refused.contains("PRIVATE key"), "{refused}");
        assert!(
            PublicKey::parse("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err()
        );
        assert!(ReleaseKey::from_pem(&public.to_pem()).is_err());
        assert!(
            format!("{key:?}")
                .find(&hex::encode(key.0.as_bytes()))
                .is_none()
        );
    }

    #[test]
    fn a_signed_release_verifies_and_every_tampering_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = ReleaseKey::generate();
        let file = dir.path().join("agent");
        std::fs::write(&file, b"#!/bin/sh\necho agent\n").unwrap();
        let signed = sign_file(&file, &key, "1.2.3", "x86_64-unknown-linux-gnu").unwrap();
        let binary = std::fs::read(&file).unwrap();
        let signature = std::fs::read(&signed.signature).unwrap();
        let manifest = std::fs::read(&signed.manifest).unwrap();
        let manifest_signature = std::fs::read(&signed.manifest_signature).unwrap();
        assert_eq!(signature.len(), 64);
        let verified = verify_release(
            &key.public(),
            &binary,
            &signature,
            &manifest,
            &manifest_signature,
        )
        .unwrap();
        assert_eq!(verified, signed.manifest_contents);
        assert_eq!(verified.version, "1.2.3");
        assert_eq!(verified.size, binary.len() as u64);

        let mut tampered = binary.clone();
        tampered[0] ^= 1;
        let mut bad_manifest = manifest.clone();
        let position = bad_manifest.iter().position(|b| *b == b'3').unwrap();
        bad_manifest[position] = b'4';
        let other = ReleaseKey::generate();
        type Case<'a> = (&'a str, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, PublicKey);
        let cases: Vec<Case> = vec![
            (
                "binary",
                tampered,
                signature.clone(),
                manifest.clone(),
                manifest_signature.clone(),
                key.public(),
            ),
            (
                "signature",
                binary.clone(),
                b"garbage".to_vec(),
                manifest.clone(),
                manifest_signature.clone(),
                key.public(),
            ),
            (
                "empty",
                binary.clone(),
                Vec::new(),
                manifest.clone(),
                manifest_signature.clone(),
                key.public(),
            ),
            (
                "manifest",
                binary.clone(),
                signature.clone(),
                bad_manifest,
                manifest_signature.clone(),
                key.public(),
            ),
            (
                "key",
                binary.clone(),
                signature.clone(),
                manifest.clone(),
                manifest_signature.clone(),
                other.public(),
            ),
        ];
        for (name, binary, signature, manifest, manifest_signature, public) in cases {
            assert!(
                verify_release(&public, &binary, &signature, &manifest, &manifest_signature)
                    .is_err(),
                "{name} tampering was accepted"
            );
        }
    }

    #[test]
    fn manifests_parse_strictly() {
        let manifest = Manifest::new("0.1.0", "aarch64-unknown-linux-gnu", b"x").unwrap();
        let text = String::from_utf8(manifest.to_bytes()).unwrap();
        assert!(
            text.contains("\n  \"sha256\": \""),
            "one field per line: {text}"
        );
        assert_eq!(Manifest::parse(text.as_bytes()).unwrap(), manifest);
        for bad in [
            "{}",
            "not json",
            r#"{"version":"1","target":"t","sha256":"00","size":1}"#,
            r#"{"version":"1.0.0","target":"../x","sha256":"00","size":1}"#,
            r#"{"version":"1.0.0","target":"t","sha256":"00","size":1}"#,
            r#"{"version":"1.0.0","target":"t","sha256":"00","size":1,"extra":true}"#,
        ] {
            assert!(Manifest::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_compare_by_semver_and_bad_ones_are_refused() {
        assert_eq!(compare_versions("0.10.0", "0.9.9"), Some(Ordering::Greater));
        assert_eq!(
            compare_versions("1.0.0-rc.1", "1.0.0"),
            Some(Ordering::Less)
        );
        assert_eq!(compare_versions("1.0.0+b1", "1.0.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("1.0", "1.0.0"), None);
        for bad in [
            "",
            "latest",
            "1.0.0/../x",
            "../1.0.0",
            "1.0.0-",
            "1..0",
            "1.0.0 ",
            "01a.0.0",
        ] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
        for bad in ["", ".", "..", "a/b", "x y"] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn publish_lays_out_a_release_and_keeps_one_key_per_dir() {
        let dir = tempfile::tempdir().unwrap();
        let releases = dir.path().join("releases");
        let binary = dir.path().join("bin");
        std::fs::write(&binary, b"agent bytes").unwrap();
        let key = ReleaseKey::generate();
        publish(&releases, &binary, &key, "0.1.0", "t1").unwrap();
        publish(&releases, &binary, &key, "0.10.0", "t1").unwrap();
        publish(&releases, &binary, &key, "0.9.0", "t2").unwrap();
        for name in RELEASE_FILES {
            assert!(releases.join("0.1.0/t1").join(name).is_file(), "{name}");
        }
        assert_eq!(latest_version(&releases, "t1").as_deref(), Some("0.10.0"));
        assert_eq!(latest_version(&releases, "t2").as_deref(), Some("0.9.0"));
        assert_eq!(latest_version(&releases, "t3"), None);
        assert_eq!(
            PublicKey::load(&releases.join(PUBLIC_KEY_FILE)).unwrap(),
            key.public()
        );
        let refused = publish(&releases, &binary, &ReleaseKey::generate(), "0.2.0", "t1")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("another release key"), "{refused}");
    }
}
