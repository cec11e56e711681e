//! `cronium keys rotate`: re-encrypts every sealed value of the database under a new
//! `ENCRYPTION_KEY` in one transaction, then replaces the data dir's key file.
//!
//! The control plane must be stopped: a running one keeps the old key in memory and would seal
//! new values with it. Every running control plane holds a shared lock on
//! `<database>.running.lock`; the rotation takes it exclusively and refuses when it cannot.
//!
//! Order of the steps, so that no crash leaves data under a key nobody has:
//! 1. the current key must open the key check and every stored value (else nothing changes);
//! 2. the new key is written to `<key file>.new` (0600, fsynced) when it is to replace a key
//!    file, or when it was generated and the current key came from the environment;
//! 3. one transaction re-encrypts everything;
//! 4. the old key file is kept as `<key file>.before-rotation-<UTC time>` and `.new` is renamed
//!    over the key file (then the directory is fsynced).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::DataArgs;
use crate::crypto::EncryptionKey;
use crate::store::running::LockMode;
use crate::store::secrets::RotateError;

/// Name of the key file in the data dir (`cronium dev` creates it; `serve` may use it through
/// `ENCRYPTION_KEY`'s value).
pub const KEY_FILE: &str = "encryption.key";

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Re-encrypt every stored secret under a new ENCRYPTION_KEY (the control plane must be
    /// stopped). The current key comes from --current-key-file, ENCRYPTION_KEY or
    /// <data dir>/encryption.key; the new one from --new-key-file or is generated.
    Rotate(RotateArgs),
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    data: DataArgs,
    /// File holding the current key (base64 of 32 bytes) [default: ENCRYPTION_KEY, else
    /// <data dir>/encryption.key].
    #[arg(long)]
    current_key_file: Option<PathBuf>,
    /// File holding the new key (base64 of 32 bytes); generated when absent.
    #[arg(long)]
    new_key_file: Option<PathBuf>,
}

/// Where the current key came from.
enum KeySource {
    /// A key file that is replaced by the new key afterwards.
    File(PathBuf),
    /// The `ENCRYPTION_KEY` environment variable: the operator replaces it.
    Environment,
}

fn read_key(path: &Path) -> anyhow::Result<(String, EncryptionKey)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let key = EncryptionKey::from_base64(&text)
        .with_context(|| format!("the key in {}", path.display()))?;
    Ok((text.trim().to_owned(), key))
}

/// Writes `contents` to `path` (mode 0600) and fsyncs it; fails if it exists.
fn write_new_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (left over from an interrupted rotation? check which key the database uses, then remove it)",
                path.display()
            )
        })?;
    file.write_all(contents)?;
    file.sync_all()
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `cronium keys rotate`.
pub async fn run(command: KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::Rotate(args) = command;
    let data_dir = &args.data.data_dir;
    let postgres = args
        .data
        .database_url
        .as_deref()
        .filter(|url| crate::is_postgres_url(url));
    // The SQLite file, or None on PostgreSQL.
    let database = match postgres {
        Some(_) => None,
        None => {
            let database = crate::database_path(data_dir, args.data.database_url.as_deref())?;
            if !database.exists() {
                bail!(
                    "no database at {} (give --data-dir or --database-url)",
                    database.display()
                );
            }
            Some(database)
        }
    };
    // What the messages call the database (never the URL: it may hold a password).
    let database_name = match &database {
        Some(path) => path.display().to_string(),
        None => "the PostgreSQL database".to_string(),
    };

    let (old_key, source) = match (&args.current_key_file, std::env::var("ENCRYPTION_KEY")) {
        (Some(path), _) => (read_key(path)?.1, KeySource::File(path.clone())),
        (None, Ok(text)) => (
            EncryptionKey::from_base64(&text).context("ENCRYPTION_KEY")?,
            KeySource::Environment,
        ),
        (None, Err(_)) => {
            let path = data_dir.join(KEY_FILE);
            if !path.exists() {
                bail!(
                    "no current key: set ENCRYPTION_KEY, give --current-key-file, or keep it in {}",
                    path.display()
                );
            }
            (read_key(&path)?.1, KeySource::File(path))
        }
    };
    let (new_text, new_key) = match &args.new_key_file {
        Some(path) => read_key(path)?,
        None => {
            let text = EncryptionKey::generate_base64();
            let key = EncryptionKey::from_base64(&text)?;
            (text, key)
        }
    };
    if old_key.open(&new_key.seal(b"probe")).is_ok() {
        bail!("the new key is the current key; nothing to do");
    }

    // Refuse while a control plane runs on this database (held until the end of this function).
    let lock = crate::RunningLock::take(
        data_dir,
        args.data.database_url.as_deref(),
        LockMode::Exclusive,
    )
    .await?;

    // Released on every way out, errors included: a lock merely dropped is held until
    // PostgreSQL notices its session ended, and a command run right after (the rotation
    // retried with the right key) found it still held.
    let outcome: anyhow::Result<()> = async {
        // Where the new key goes before the database changes.
        let staged = match (&source, &args.new_key_file) {
            (KeySource::File(path), _) => Some(with_suffix(path, ".new")),
            (KeySource::Environment, None) => Some(data_dir.join(format!("{KEY_FILE}.new"))),
            (KeySource::Environment, Some(_)) => None,
        };

        let store = crate::open_store(data_dir, args.data.database_url.as_deref()).await?;
        // Check first (no write): a wrong current key must not leave a staged file behind.
        if let Some(sealed) = store.key_check().await?
            && old_key.verify_key_check(&sealed).is_err()
        {
            store.close().await;
            bail!(RotateError::WrongOldKey);
        }
        if let Some(staged) = &staged {
            write_new_private_file(staged, format!("{new_text}\n").as_bytes())?;
            sync_dir(staged)?;
        }
        let rotated = store.rotate_key(&old_key, &new_key).await;
        store.close().await;
        let counts = match rotated {
            Ok(counts) => counts,
            Err(error) => {
                if let Some(staged) = &staged {
                    let _ = std::fs::remove_file(staged);
                }
                return Err(error.into());
            }
        };

        println!("re-encrypted every stored secret of {database_name} under the new key:");
        for (kind, count) in &counts {
            println!("  {kind}: {count}");
        }
        match &source {
            KeySource::File(path) => {
                let staged = with_suffix(path, ".new");
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
                let backup = with_suffix(path, &format!(".before-rotation-{stamp}"));
                std::fs::copy(path, &backup)
                    .with_context(|| format!("keeping the old key as {}", backup.display()))?;
                std::fs::rename(&staged, path).with_context(|| {
                    format!(
                        "replacing {} with {} (the database already uses the key in {})",
                        path.display(),
                        staged.display(),
                        staged.display()
                    )
                })?;
                sync_dir(path)?;
                println!("replaced the key file {}", path.display());
                println!(
                    "the old key is kept in {} (delete it once backups made with it are gone)",
                    backup.display()
                );
            }
            KeySource::Environment => {
                if let Some(staged) = &staged {
                    println!("the new key is in {}", staged.display());
                }
                println!(
                    "set ENCRYPTION_KEY to the new key wherever the control plane is started, then start it"
                );
            }
        }
        Ok(())
    }
    .await;
    let released = lock.release().await;
    outcome.and(released)
}
