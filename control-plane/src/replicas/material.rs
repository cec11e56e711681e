//! The CA and the QUIC stateless-reset key, shared by every replica through the database.
//!
//! Both are stored sealed with `ENCRYPTION_KEY` in `cluster_secrets` (migration 0024). At start
//! a replica reads them; if absent it takes them from the data dir files of older versions
//! (`ca.pem` + `ca-key.pem`, `quic-reset.key`: an existing install keeps its CA, so its agents
//! keep trusting it) or makes new ones, inserts them only if still absent and uses what the
//! database holds afterwards, so replicas starting at once agree on one value.

use std::path::Path;

use anyhow::{Context, bail};

use crate::agents::ca::{CaPems, CertificateAuthority};
use crate::crypto::EncryptionKey;
use crate::store::Store;

/// The `cluster_secrets` row of the CA (JSON of [`CaPems`]).
pub const CA_SECRET: &str = "ca";
/// The `cluster_secrets` row of the QUIC stateless-reset key (32 bytes).
pub const RESET_KEY_SECRET: &str = "quic_reset_key";
/// The reset key file of data dirs from before the key moved into the database.
pub const RESET_KEY_FILE: &str = "quic-reset.key";

/// The shared secret `name`: the stored one, else `candidate()`'s, inserted if still absent
/// (also the terminal relay key, `terminals::relay_token`).
pub(crate) async fn shared_secret(
    store: &Store,
    key: &EncryptionKey,
    name: &str,
    candidate: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let sealed = match store.cluster_secret(name).await? {
        Some(sealed) => sealed,
        None => {
            let candidate = candidate()?;
            store
                .insert_cluster_secret(name, key.seal(&candidate))
                .await?
        }
    };
    key.open(&sealed)
        .with_context(|| format!("opening the stored {name} with ENCRYPTION_KEY"))
}

/// The CA every replica shares.
pub async fn load_ca(
    store: &Store,
    key: &EncryptionKey,
    data_dir: &Path,
) -> anyhow::Result<CertificateAuthority> {
    let from_files = CertificateAuthority::read_files(data_dir)?;
    let plain = shared_secret(store, key, CA_SECRET, || {
        let pems = match &from_files {
            Some(pems) => pems.clone(),
            None => CertificateAuthority::generate()?,
        };
        Ok(serde_json::to_vec(&pems)?)
    })
    .await?;
    let pems: CaPems = serde_json::from_slice(&plain).context("the stored CA")?;
    if let Some(files) = &from_files
        && files.cert_pem != pems.cert_pem
    {
        tracing::warn!(
            dir = %data_dir.display(),
            "the data dir's ca.pem is not the CA in the database; the database's is used (agents enrolled with the file's CA will not connect)"
        );
    }
    CertificateAuthority::from_pems(&pems)
}

/// The QUIC stateless-reset (and connection-id) key every replica shares, so a replica answers
/// packets of a connection it does not know with a reset the agent accepts.
pub async fn load_reset_key(
    store: &Store,
    key: &EncryptionKey,
    data_dir: &Path,
) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(RESET_KEY_FILE);
    let secret = shared_secret(store, key, RESET_KEY_SECRET, || {
        match std::fs::read(&path) {
            Ok(secret) if secret.len() == 32 => return Ok(secret),
            Ok(_) => tracing::warn!(
                file = %path.display(),
                "not a 32-byte secret; a new reset key is made"
            ),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", path.display()));
            }
        }
        let mut secret = vec![0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
        Ok(secret)
    })
    .await?;
    if secret.len() != 32 {
        bail!("the stored QUIC reset key is not 32 bytes");
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::open_test_store;

    #[tokio::test]
    async fn replicas_agree_on_one_ca_and_reset_key() {
        let (_db, store) = open_test_store().await;
        let key = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        // Two replicas starting at once, each with its own (empty) data dir.
        let (a, b) = tokio::join!(
            load_ca(&store, &key, dirs[0].path()),
            load_ca(&store, &key, dirs[1].path())
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.fingerprint(), b.fingerprint());
        let (ra, rb) = tokio::join!(
            load_reset_key(&store, &key, dirs[0].path()),
            load_reset_key(&store, &key, dirs[1].path())
        );
        assert_eq!(ra.unwrap(), rb.unwrap());
        // Stored sealed: neither the private key nor the reset key is in the rows.
        let sealed = store.cluster_secret(CA_SECRET).await.unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"));
        // Nothing is written into the data dirs.
        assert_eq!(std::fs::read_dir(dirs[0].path()).unwrap().count(), 0);
        // Another key cannot open them.
        let other = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        assert!(load_ca(&store, &other, dirs[0].path()).await.is_err());
    }

    #[tokio::test]
    async fn an_existing_install_keeps_its_ca_and_reset_key() {
        let (_db, store) = open_test_store().await;
        let key = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let old = CertificateAuthority::generate().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &old.cert_pem).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), &old.key_pem).unwrap();
        std::fs::write(dir.path().join(RESET_KEY_FILE), [7u8; 32]).unwrap();
        let old_fingerprint = CertificateAuthority::from_pems(&old).unwrap().fingerprint();

        let ca = load_ca(&store, &key, dir.path()).await.unwrap();
        assert_eq!(ca.fingerprint(), old_fingerprint);
        assert_eq!(
            load_reset_key(&store, &key, dir.path()).await.unwrap(),
            [7u8; 32]
        );
        // A second replica with an empty data dir gets the same ones from the database.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            load_ca(&store, &key, empty.path())
                .await
                .unwrap()
                .fingerprint(),
            old_fingerprint
        );
        assert_eq!(
            load_reset_key(&store, &key, empty.path()).await.unwrap(),
            [7u8; 32]
        );
    }
}
