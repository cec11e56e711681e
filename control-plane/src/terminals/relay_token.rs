//! The short-lived tokens with which one replica asks another for a terminal or a recording
//! (issue 8: a terminal opened on replica B for an agent connected to replica A is relayed
//! B → A; see `terminals::remote`).
//!
//! The replica the user reached (B) does every user-facing check; then it mints a token naming
//! exactly what it checked and sends it in [`HEADER`] to the internal route of the replica that
//! serves the agent (A, `http::terminal_relay`). A token is
//! `base64url(JSON claims) "." base64url(HMAC-SHA256(key, base64url(JSON claims)))` with the
//! claims: the target replica's id, an expiry ([`TTL`] after minting), a random one-use nonce and
//! the [`Grant`] (agent, user, session to attach to and size; or the session whose recording is
//! read). The key is 32 random bytes shared by every replica through `cluster_secrets`, sealed
//! with `ENCRYPTION_KEY` and inserted only when absent ([`load_key`]), so it is never on disk in
//! the clear and `cronium keys rotate` re-seals it with everything else.
//!
//! Verification ([`RelayAuth::verify`]) checks the MAC in constant time (`ring::hmac::verify`)
//! before it parses anything, then the replica (a token for A is worthless on C), the expiry (at
//! most [`TTL`] plus [`CLOCK_SKEW`] ahead, not past) and the nonce: every nonce seen is
//! remembered until its token expires, so a token opens one terminal at most. The memory is
//! bounded ([`MAX_REMEMBERED`] unexpired nonces; beyond it tokens are refused until some expire).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use ring::hmac;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::EncryptionKey;
use crate::store::Store;

/// The request header that carries a relay token.
pub const HEADER: &str = "x-cronium-relay-token";

/// The `cluster_secrets` row of the relay tokens' key (32 bytes).
pub const KEY_SECRET: &str = "terminal_relay_key";

/// How long a token is valid after it was minted.
pub const TTL: Duration = Duration::from_secs(10);

/// How far ahead of the verifying replica's clock the minting replica's may be.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Longest token accepted (a real one is a few hundred bytes).
const MAX_TOKEN_LEN: usize = 2048;

/// Unexpired nonces remembered at most.
pub const MAX_REMEMBERED: usize = 65_536;

/// What a token lets its bearer do on the replica it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "purpose", rename_all = "snake_case")]
pub enum Grant {
    /// Open (or attach to `session`) a terminal of `agent` for `user` (ids), `cols`×`rows`.
    Terminal {
        agent: String,
        user: String,
        session: Option<String>,
        cols: u16,
        rows: u16,
    },
    /// Read the recording of terminal session `session` for `user`.
    Recording { session: String, user: String },
}

/// The signed claims.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The replica the token is for.
    replica: String,
    /// Expiry, milliseconds since the epoch.
    exp: i64,
    /// 128 random bits, hex.
    nonce: String,
    grant: Grant,
}

/// Why a token was refused. None of them says more than "401" to the caller.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed relay token")]
    Malformed,
    #[error("relay token signature does not verify")]
    BadSignature,
    #[error("relay token is for another replica")]
    WrongReplica,
    #[error("relay token expired (or its replica's clock is off)")]
    Expired,
    #[error("relay token was used already")]
    Replayed,
    #[error("too many relay tokens in flight")]
    Busy,
}

/// The shared key and the nonces this replica has seen.
pub struct RelayAuth {
    key: hmac::Key,
    /// Nonce → expiry of its token.
    seen: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for RelayAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RelayAuth(..)")
    }
}

impl RelayAuth {
    /// Tokens under `secret` (the shared key of [`load_key`]).
    pub fn new(secret: &[u8]) -> RelayAuth {
        RelayAuth {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Tokens under a random key of this process only (a control plane that shares nothing).
    pub fn random() -> RelayAuth {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        RelayAuth::new(&secret)
    }

    /// A token for `replica` granting `grant`, valid for [`TTL`] from `now` (ms).
    pub fn mint(&self, replica: &str, grant: Grant, now: i64) -> String {
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        self.mint_with(
            replica,
            grant,
            now + TTL.as_millis() as i64,
            &hex::encode(nonce),
        )
    }

    fn mint_with(&self, replica: &str, grant: Grant, exp: i64, nonce: &str) -> String {
        let claims = Claims {
            replica: replica.to_owned(),
            exp,
            nonce: nonce.to_owned(),
            grant,
        };
        // Serializing plain strings and integers cannot fail.
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The grant of `token` if it is genuine, for `replica` (this one), unexpired at `now` (ms)
    /// and not seen before; its nonce is then remembered until it expires.
    pub fn verify(&self, token: &str, replica: &str, now: i64) -> Result<Grant, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        // The MAC first, in constant time: nothing of a forged token is parsed.
        hmac::verify(&self.key, payload.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenError::Malformed)?;
        if claims.replica != replica {
            return Err(TokenError::WrongReplica);
        }
        let latest = now + (TTL + CLOCK_SKEW).as_millis() as i64;
        if claims.exp < now || claims.exp > latest {
            return Err(TokenError::Expired);
        }
        if claims.nonce.len() != 32 {
            return Err(TokenError::Malformed);
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains_key(&claims.nonce) {
            return Err(TokenError::Replayed);
        }
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, exp| *exp >= now);
            if seen.len() >= MAX_REMEMBERED {
                return Err(TokenError::Busy);
            }
        }
        seen.insert(claims.nonce, claims.exp);
        Ok(claims.grant)
    }
}

/// The relay tokens' key every replica shares: the stored one, else a new random one inserted if
/// still absent (replicas starting at once agree on the first committed).
pub async fn load_key(store: &Store, key: &EncryptionKey) -> anyhow::Result<Vec<u8>> {
    let secret = crate::replicas::material::shared_secret(store, key, KEY_SECRET, || {
        let mut secret = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Ok(secret)
    })
    .await?;
    if secret.len() != 32 {
        anyhow::bail!("the stored terminal relay key is not 32 bytes");
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminal(session: Option<&str>) -> Grant {
        Grant::Terminal {
            agent: "agent-1".into(),
            user: "user-1".into(),
            session: session.map(str::to_owned),
            cols: 80,
            rows: 24,
        }
    }

    #[test]
    fn a_token_opens_once_on_its_replica_before_it_expires() {
        let auth = RelayAuth::new(&[7u8; 32]);
        let now = 1_000_000;
        let token = auth.mint("replica-a", terminal(None), now);
        // Another replica with the same key: not its token.
        assert_eq!(
            auth.verify(&token, "replica-c", now),
            Err(TokenError::WrongReplica)
        );
        assert_eq!(auth.verify(&token, "replica-a", now), Ok(terminal(None)));
        // Once only.
        assert_eq!(
            auth.verify(&token, "replica-a", now + 1),
            Err(TokenError::Replayed)
        );
        // Expired, by the verifier's clock.
        let late = auth.mint("replica-a", terminal(None), now);
        assert_eq!(
            auth.verify(&late, "replica-a", now + TTL.as_millis() as i64 + 1),
            Err(TokenError::Expired)
        );
        // Minted by a clock far ahead: refused too (it would live too long here).
        let ahead = auth.mint("replica-a", terminal(None), now + 60_000);
        assert_eq!(
            auth.verify(&ahead, "replica-a", now),
            Err(TokenError::Expired)
        );
        // A little skew is fine.
        let skewed = auth.mint(
            "replica-a",
            terminal(Some(&"a".repeat(32))),
            now + CLOCK_SKEW.as_millis() as i64,
        );
        assert!(auth.verify(&skewed, "replica-a", now).is_ok());
    }

    #[test]
    fn forged_and_tampered_tokens_are_refused() {
        let auth = RelayAuth::new(&[7u8; 32]);
        let other = RelayAuth::new(&[8u8; 32]);
        let now = 5_000;
        let forged = other.mint("replica-a", terminal(None), now);
        assert_eq!(
            auth.verify(&forged, "replica-a", now),
            Err(TokenError::BadSignature)
        );
        // The claims changed under a genuine tag: another agent, the same signature.
        let genuine = auth.mint("replica-a", terminal(None), now);
        let (payload, tag) = genuine.split_once('.').unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["grant"]["agent"] = "agent-2".into();
        let tampered = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert_eq!(
            auth.verify(&tampered, "replica-a", now),
            Err(TokenError::BadSignature)
        );
        for malformed in [
            String::new(),
            "no-dot".into(),
            "a.b".into(),
            ".".into(),
            format!("{payload}.!!!"),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                auth.verify(&malformed, "replica-a", now).is_err(),
                "{malformed:?}"
            );
        }
        // A genuine signature over something that is not claims.
        let junk = URL_SAFE_NO_PAD.encode(b"[1,2,3]");
        let tag = hmac::sign(&auth.key, junk.as_bytes());
        let signed_junk = format!("{junk}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        assert_eq!(
            auth.verify(&signed_junk, "replica-a", now),
            Err(TokenError::Malformed)
        );
        // The refusals above consumed nothing: the genuine token still opens.
        assert!(auth.verify(&genuine, "replica-a", now).is_ok());
    }

    #[test]
    fn the_nonce_memory_is_bounded_and_forgets_expired_tokens() {
        let auth = RelayAuth::new(&[1u8; 32]);
        let now = 10_000;
        {
            let mut seen = auth.seen.lock().unwrap();
            for index in 0..MAX_REMEMBERED {
                seen.insert(format!("{index:032x}"), now + 1_000);
            }
        }
        let token = auth.mint("r", terminal(None), now);
        assert_eq!(auth.verify(&token, "r", now), Err(TokenError::Busy));
        // Once those tokens expired, their nonces are forgotten and new tokens pass.
        let later = now + 2_000;
        let token = auth.mint("r", terminal(None), later);
        assert!(auth.verify(&token, "r", later).is_ok());
        assert_eq!(auth.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn recording_grants_round_trip() {
        let auth = RelayAuth::new(&[3u8; 32]);
        let grant = Grant::Recording {
            session: "b".repeat(32),
            user: "u".into(),
        };
        let token = auth.mint("r", grant.clone(), 0);
        assert_eq!(auth.verify(&token, "r", 0), Ok(grant));
        let nonce = "c".repeat(32);
        let fixed = auth.mint_with("r", terminal(None), 100, &nonce);
        assert_eq!(auth.verify(&fixed, "r", 50), Ok(terminal(None)));
    }
}
