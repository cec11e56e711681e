//! Secrets at rest: AES-256-GCM under `ENCRYPTION_KEY`, plus the hashing of random tokens.
//!
//! A sealed value is `nonce (12 bytes) || ciphertext+tag`. At first start the control plane
//! seals a known value into the database; at every later start it must open it again, so a
//! missing or wrong key stops the control plane instead of silently producing garbage.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;

const NONCE_LEN: usize = 12;
const KEY_CHECK_PLAINTEXT: &[u8] = b"cronium key check v1";

/// Why a key could not be used.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("ENCRYPTION_KEY must be base64 of exactly 32 bytes")]
    Malformed,
    #[error("ENCRYPTION_KEY does not match the key this database was created with")]
    Mismatch,
}

/// The key that encrypts every stored secret. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct EncryptionKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("EncryptionKey(..)")
    }
}

impl EncryptionKey {
    /// Parses a base64 (standard alphabet) 32-byte key.
    pub fn from_base64(text: &str) -> Result<EncryptionKey, KeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::Malformed)?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| KeyError::Malformed)?;
        Ok(EncryptionKey { cipher })
    }

    /// A fresh random key, base64-encoded.
    pub fn generate_base64() -> String {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        STANDARD.encode(bytes)
    }

    /// Encrypts `plaintext` under a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        // AES-GCM encryption into a Vec cannot fail for inputs far below 64 GiB.
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext)
            .expect("aes-gcm encryption");
        let mut sealed = nonce.to_vec();
        sealed.extend(ciphertext);
        sealed
    }

    /// Decrypts a value made by [`seal`](EncryptionKey::seal).
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Mismatch);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| KeyError::Mismatch)
    }

    /// The value stored at first start.
    pub fn key_check(&self) -> Vec<u8> {
        self.seal(KEY_CHECK_PLAINTEXT)
    }

    /// Whether `sealed` is the key check of this key.
    pub fn verify_key_check(&self, sealed: &[u8]) -> Result<(), KeyError> {
        match self.open(sealed) {
            Ok(plaintext) if plaintext == KEY_CHECK_PLAINTEXT => Ok(()),
            _ => Err(KeyError::Mismatch),
        }
    }
}

/// A new random token: 32 bytes, URL-safe base64, with a readable prefix.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Lower-case hex SHA-256 of `data`; how random tokens are stored.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key() {
        let key = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        let other = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        let sealed = key.seal(b"secret");
        assert_eq!(key.open(&sealed).unwrap(), b"secret");
        assert!(other.open(&sealed).is_err());
        assert!(key.open(&sealed[..5]).is_err());
        key.verify_key_check(&key.key_check()).unwrap();
        assert!(other.verify_key_check(&key.key_check()).is_err());
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(EncryptionKey::from_base64("not base64!").is_err());
        assert!(EncryptionKey::from_base64(&STANDARD.encode([0u8; 16])).is_err());
        assert!(
            !format!(
                "{:?}",
                EncryptionKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap()
            )
            .contains('7')
        );
    }
}
