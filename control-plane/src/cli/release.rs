//! `cronium release`: `keygen` (a new ed25519 release key), `sign` (detached signature and
//! signed manifest next to a file) and `publish` (copy an agent binary into a releases dir and
//! sign it there, as `cronium dev` does for the agent it was built with).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::release::{self, ReleaseKey};

#[derive(Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Generate a release key: `release.key` (private, PKCS#8 PEM, mode 0600) and `release.pub`
    /// (public, PEM) in DIR; prints the public key.
    Keygen {
        /// Where to write the two files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Sign FILE: writes FILE.sig (raw 64-byte ed25519 signature of the file), FILE.manifest.json
    /// ({version, target, sha256, size}) and FILE.manifest.json.sig.
    Sign {
        /// The file to sign (an agent binary).
        file: PathBuf,
        /// The private key file (from `cronium release keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The release's version (MAJOR.MINOR.PATCH[-PRE]).
        #[arg(long)]
        version: String,
        /// The target triple the binary runs on [default: this build's].
        #[arg(long, default_value = cronium_agent::TARGET)]
        target: String,
    },
    /// Copy an agent binary into a releases dir as <version>/<target>/cronium-agent and sign it
    /// there; writes the dir's release-key.pub on first use.
    Publish {
        /// The agent binary.
        file: PathBuf,
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
        /// The releases dir the control plane serves [default: <data dir>/releases].
        #[arg(long, env = "CRONIUM_RELEASES_DIR")]
        releases_dir: Option<PathBuf>,
        /// Data directory, for the default releases dir.
        #[arg(long, env = "CRONIUM_DATA_DIR", default_value_os_t = super::default_data_dir())]
        data_dir: PathBuf,
        /// The release's version [default: this build's].
        #[arg(long, default_value = cronium_agent::VERSION)]
        version: String,
        /// The target triple [default: this build's].
        #[arg(long, default_value = cronium_agent::TARGET)]
        target: String,
    },
}

pub fn run(command: ReleaseCommand) -> anyhow::Result<()> {
    match command {
        ReleaseCommand::Keygen { out } => {
            let public = release::keygen(&out)?;
            println!(
                "private key: {} (mode 0600; keep it offline, it signs releases)",
                out.join(release::KEYGEN_PRIVATE).display()
            );
            println!(
                "public key:  {}",
                out.join(release::KEYGEN_PUBLIC).display()
            );
            println!("public key (base64): {}", public.base64());
            println!("public key (hex):    {}", public.hex());
        }
        ReleaseCommand::Sign {
            file,
            key,
            version,
            target,
        } => {
            let key = ReleaseKey::load(&key)?;
            let signed = release::sign_file(&file, &key, &version, &target)?;
            println!("{}", signed.signature.display());
            println!("{}", signed.manifest.display());
            println!("{}", signed.manifest_signature.display());
        }
        ReleaseCommand::Publish {
            file,
            key,
            releases_dir,
            data_dir,
            version,
            target,
        } => {
            let key = ReleaseKey::load(&key)?;
            let releases = releases_dir.unwrap_or_else(|| data_dir.join("releases"));
            let placed = release::publish(&releases, &file, &key, &version, &target)
                .with_context(|| format!("publishing into {}", releases.display()))?;
            println!("{}", placed.display());
        }
    }
    Ok(())
}
