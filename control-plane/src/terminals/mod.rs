//! Browser terminals relayed to agents: the settings, the in-memory bookkeeping of live relays,
//! the relay itself (`relay`) and asciicast recordings (`recording`).
//!
//! A terminal is opened by `GET /api/v1/agents/{id}/terminal` (see `http::terminals`, which does
//! every check before the WebSocket upgrade). The relay then opens a QUIC stream on the agent's
//! own connection, so nothing ever connects into the agent's host:
//! browser ⇄ WebSocket ⇄ control plane ⇄ QUIC stream ⇄ agent ⇄ PTY.
//!
//! [`TerminalHub`] holds what only this process needs to know: sessions being opened (they count
//! against the limits before the agent answered), which relay writes a session's recording
//! (exactly one at a time: the first attached relay, then whichever relay takes over when it
//! leaves), and the key and seen nonces of the relay tokens between replicas (`relay_token`).
//!
//! With several replicas (issue 8), a viewer may reach a replica the agent is not connected to;
//! that replica checks everything and relays the viewer's WebSocket to the one that serves the
//! agent (`remote`), which runs the usual relay for it.

pub mod recording;
pub mod relay;
pub mod relay_token;
pub mod remote;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;

/// Terminal settings of `cronium serve` / `cronium dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalConfig {
    /// Extra origins (`scheme://host[:port]`) browsers may open terminals from, besides the
    /// public URL's (`--allowed-origin`).
    pub allowed_origins: Vec<String>,
    /// Live sessions one user may have at once (on online agents).
    pub max_per_user: u32,
    /// Live sessions an agent may have at once through this control plane.
    pub max_per_agent: u32,
    /// Idle timeout asked of the agent (no viewer attached); zero: the agent's own default.
    pub idle_timeout: Duration,
    /// Maximum session age asked of the agent; zero: the agent's own default.
    pub max_age: Duration,
    /// Record sessions (asciicast v2) of agents that opted in.
    pub recording: bool,
}

impl Default for TerminalConfig {
    fn default() -> TerminalConfig {
        TerminalConfig {
            allowed_origins: Vec::new(),
            max_per_user: 5,
            max_per_agent: 10,
            idle_timeout: Duration::ZERO,
            max_age: Duration::ZERO,
            recording: false,
        }
    }
}

/// The terminal settings the handlers read.
#[derive(Debug, Clone)]
pub struct TerminalSettings {
    /// Normalized origins (`scheme://host:port`) allowed to open terminals.
    pub allowed_origins: Vec<String>,
    /// No public URL is configured: an Origin naming the request's own Host is allowed too.
    pub same_host_origin: bool,
    pub max_per_user: u32,
    pub max_per_agent: u32,
    pub idle_timeout: Duration,
    pub max_age: Duration,
    pub recording: bool,
    /// Where recordings go: `<data dir>/recordings`.
    pub recordings_dir: PathBuf,
}

impl TerminalSettings {
    /// Validates the configuration: every origin must be an `http(s)://host[:port]` URL.
    pub fn new(
        config: &TerminalConfig,
        public_url: Option<&str>,
        data_dir: &Path,
    ) -> anyhow::Result<TerminalSettings> {
        let mut allowed_origins = Vec::new();
        if let Some(public_url) = public_url {
            allowed_origins.push(
                normalize_origin(public_url).with_context(|| {
                    format!("the public URL {public_url:?} is not an http(s) URL")
                })?,
            );
        }
        for origin in &config.allowed_origins {
            let origin = origin.trim();
            if origin.is_empty() {
                continue;
            }
            allowed_origins.push(normalize_origin(origin).with_context(|| {
                format!(
                    "--allowed-origin {origin:?} is not an origin like https://console.example.com"
                )
            })?);
        }
        Ok(TerminalSettings {
            allowed_origins,
            same_host_origin: public_url.is_none(),
            max_per_user: config.max_per_user.max(1),
            max_per_agent: config.max_per_agent.max(1),
            idle_timeout: config.idle_timeout,
            max_age: config.max_age,
            recording: config.recording,
            recordings_dir: data_dir.join("recordings"),
        })
    }
}

/// `scheme://host:port` of an http(s) URL (the port made explicit), or `None`.
pub fn normalize_origin(text: &str) -> Option<String> {
    let url = reqwest::Url::parse(text.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = url.host_str()?.to_ascii_lowercase();
    let port = url.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", url.scheme()))
}

/// Whether `id` looks like an agent's session id: 32 lower-case hex digits (128 random bits).
pub fn valid_session_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// What only this process knows about terminals. Cheap to clone.
#[derive(Clone)]
pub struct TerminalHub {
    inner: Arc<Mutex<HubInner>>,
    relay: Arc<relay_token::RelayAuth>,
}

impl Default for TerminalHub {
    /// A hub whose relay tokens only this process can verify (nothing shared).
    fn default() -> TerminalHub {
        TerminalHub::new(relay_token::RelayAuth::random())
    }
}

#[derive(Default)]
struct HubInner {
    pending_by_user: HashMap<String, u32>,
    pending_by_agent: HashMap<String, u32>,
    /// Session → the relay writing its recording.
    recorders: HashMap<String, u64>,
    next_relay: u64,
}

impl TerminalHub {
    /// A hub minting and verifying relay tokens with `relay` (the replicas' shared key).
    pub fn new(relay: relay_token::RelayAuth) -> TerminalHub {
        TerminalHub {
            inner: Arc::default(),
            relay: Arc::new(relay),
        }
    }

    /// The relay tokens between replicas.
    pub fn relay_auth(&self) -> &relay_token::RelayAuth {
        &self.relay
    }

    fn lock(&self) -> MutexGuard<'_, HubInner> {
        // Every critical section is a few map operations; a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a session being opened against the limits until the reservation drops.
    /// Returns the reservation and the pending opens of this user and this agent, itself
    /// included.
    pub fn reserve(&self, user_id: &str, agent_id: &str) -> (Reservation, u32, u32) {
        let mut inner = self.lock();
        let by_user = inner.pending_by_user.entry(user_id.to_owned()).or_default();
        *by_user += 1;
        let by_user = *by_user;
        let by_agent = inner
            .pending_by_agent
            .entry(agent_id.to_owned())
            .or_default();
        *by_agent += 1;
        let by_agent = *by_agent;
        (
            Reservation {
                hub: self.clone(),
                user_id: user_id.to_owned(),
                agent_id: agent_id.to_owned(),
            },
            by_user,
            by_agent,
        )
    }

    /// A new relay id.
    pub fn relay_id(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_relay += 1;
        inner.next_relay
    }

    /// Makes `relay` the recorder of `session` unless another relay is; returns whether
    /// `relay` records it now.
    pub fn claim_recorder(&self, session: &str, relay: u64) -> bool {
        let mut inner = self.lock();
        *inner.recorders.entry(session.to_owned()).or_insert(relay) == relay
    }

    /// `relay` stops recording `session` (the next relay that has output takes over).
    pub fn release_recorder(&self, session: &str, relay: u64) {
        let mut inner = self.lock();
        if inner.recorders.get(session) == Some(&relay) {
            inner.recorders.remove(session);
        }
    }
}

/// A session being opened, counted against the limits until dropped.
pub struct Reservation {
    hub: TerminalHub,
    user_id: String,
    agent_id: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut guard = self.hub.lock();
        let inner = &mut *guard;
        for (map, key) in [
            (&mut inner.pending_by_user, &self.user_id),
            (&mut inner.pending_by_agent, &self.agent_id),
        ] {
            if let Some(count) = map.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalized_with_explicit_ports() {
        assert_eq!(
            normalize_origin("https://Console.Example.com").as_deref(),
            Some("https://console.example.com:443")
        );
        assert_eq!(
            normalize_origin("http://127.0.0.1:8080/").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            normalize_origin("http://[::1]:9").as_deref(),
            Some("http://[::1]:9")
        );
        assert_eq!(normalize_origin("null"), None);
        assert_eq!(normalize_origin("file:///etc/passwd"), None);
        assert_eq!(normalize_origin("ws://example.com"), None);
    }

    #[test]
    fn session_ids_are_128_bits_of_hex() {
        assert!(valid_session_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_session_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_session_id("../../../../etc/passwd0000000000"));
        assert!(!valid_session_id("0123"));
    }

    #[test]
    fn reservations_count_until_dropped_and_one_relay_records() {
        let hub = TerminalHub::default();
        let (first, user, agent) = hub.reserve("u", "a");
        assert_eq!((user, agent), (1, 1));
        let (second, user, agent) = hub.reserve("u", "b");
        assert_eq!((user, agent), (2, 1));
        drop(first);
        drop(second);
        let (_third, user, agent) = hub.reserve("u", "a");
        assert_eq!((user, agent), (1, 1));

        assert!(hub.claim_recorder("s", 1));
        assert!(!hub.claim_recorder("s", 2));
        hub.release_recorder("s", 2);
        assert!(!hub.claim_recorder("s", 2));
        hub.release_recorder("s", 1);
        assert!(hub.claim_recorder("s", 2));
    }
}
