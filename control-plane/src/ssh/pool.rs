//! Connection reuse for the SSH fallback: authenticated sessions kept per server and shared by
//! its jobs (one channel per job), so a job on a busy server costs one channel, not a key
//! exchange and an authentication.
//!
//! A session is reused only for the exact settings it was opened with (host, port, user, auth,
//! sealed secrets, pinned host key: a PATCH of any of them opens a new session, and the host key
//! is checked at every connect). At most [`CHANNELS_PER_SESSION`] jobs share a session (OpenSSH's
//! `MaxSessions` is 10 by default); a session idle for [`IDLE_TIMEOUT`] is closed by the worker's
//! sweep, and every session is dropped (disconnected) with the pool at shutdown. A session that
//! died is noticed when it is taken (`is_closed`) or when a channel cannot be opened on it; the
//! caller then asks for a fresh one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::Handle;
use sha2::{Digest, Sha256};

use super::helper::Forwards;
use super::session::Client;
use crate::store::servers::SshSettings;

/// Jobs sharing one SSH connection at most.
pub(super) const CHANNELS_PER_SESSION: usize = 8;
/// An unused connection is closed after this long.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One pooled connection.
struct Pooled {
    id: u64,
    settings: [u8; 32],
    handle: Arc<Handle<Client>>,
    forwards: Forwards,
    in_use: usize,
    idle_since: Instant,
}

/// The pool: connections per server id.
#[derive(Clone, Default)]
pub struct SessionPool {
    inner: Arc<Mutex<PoolInner>>,
}

#[derive(Default)]
struct PoolInner {
    next_id: u64,
    servers: HashMap<String, Vec<Pooled>>,
}

/// A connection taken from the pool; give it back with [`SessionPool::put`].
pub(super) struct Lease {
    pub server_id: String,
    pub id: u64,
    pub handle: Arc<Handle<Client>>,
    /// Routes the connection's forwarded helper sockets.
    pub forwards: Forwards,
    /// Reused rather than freshly opened.
    pub reused: bool,
}

/// What a connection is valid for.
pub(super) fn settings_key(ssh: &SshSettings) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [
        ssh.host.as_bytes(),
        &ssh.port.to_be_bytes(),
        ssh.username.as_bytes(),
        ssh.auth.as_str().as_bytes(),
        &ssh.secrets,
        ssh.host_key.as_deref().unwrap_or_default().as_bytes(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

impl SessionPool {
    /// A live pooled connection to `server_id` opened with `settings` that has room for one more
    /// job, if there is one.
    pub(super) fn take(&self, server_id: &str, settings: &[u8; 32]) -> Option<Lease> {
        let mut inner = self.inner.lock().expect("ssh pool");
        let sessions = inner.servers.get_mut(server_id)?;
        // Forget dead connections and those opened with other settings (once unused).
        sessions.retain(|pooled| {
            !pooled.handle.is_closed() && (pooled.settings == *settings || pooled.in_use > 0)
        });
        let pooled = sessions
            .iter_mut()
            .filter(|pooled| pooled.settings == *settings && pooled.in_use < CHANNELS_PER_SESSION)
            .min_by_key(|pooled| pooled.in_use)?;
        pooled.in_use += 1;
        Some(Lease {
            server_id: server_id.to_string(),
            id: pooled.id,
            handle: pooled.handle.clone(),
            forwards: pooled.forwards.clone(),
            reused: true,
        })
    }

    /// Adds a freshly opened connection, taken once by the caller.
    pub(super) fn insert(
        &self,
        server_id: &str,
        settings: [u8; 32],
        handle: Handle<Client>,
        forwards: Forwards,
    ) -> Lease {
        let mut inner = self.inner.lock().expect("ssh pool");
        inner.next_id += 1;
        let id = inner.next_id;
        let handle = Arc::new(handle);
        inner
            .servers
            .entry(server_id.to_string())
            .or_default()
            .push(Pooled {
                id,
                settings,
                handle: handle.clone(),
                forwards: forwards.clone(),
                in_use: 1,
                idle_since: Instant::now(),
            });
        Lease {
            server_id: server_id.to_string(),
            id,
            handle,
            forwards,
            reused: false,
        }
    }

    /// Gives a connection back; `broken` ones (a channel could not be opened) are dropped.
    pub(super) fn put(&self, lease: Lease, broken: bool) {
        let mut inner = self.inner.lock().expect("ssh pool");
        if let Some(sessions) = inner.servers.get_mut(&lease.server_id) {
            if let Some(pooled) = sessions.iter_mut().find(|pooled| pooled.id == lease.id) {
                pooled.in_use = pooled.in_use.saturating_sub(1);
                pooled.idle_since = Instant::now();
            }
            if broken {
                sessions.retain(|pooled| pooled.id != lease.id);
            }
            if sessions.is_empty() {
                inner.servers.remove(&lease.server_id);
            }
        }
    }

    /// Closes connections unused for [`IDLE_TIMEOUT`] (and dead ones); the worker calls it.
    pub(super) async fn sweep(&self) {
        let now = Instant::now();
        let mut closing = Vec::new();
        {
            let mut inner = self.inner.lock().expect("ssh pool");
            for sessions in inner.servers.values_mut() {
                sessions.retain(|pooled| {
                    let idle =
                        pooled.in_use == 0 && now.duration_since(pooled.idle_since) >= IDLE_TIMEOUT;
                    if idle || pooled.handle.is_closed() {
                        closing.push(pooled.handle.clone());
                        false
                    } else {
                        true
                    }
                });
            }
            inner.servers.retain(|_, sessions| !sessions.is_empty());
        }
        for handle in closing {
            // Dropping the last handle ends the session task as well; say goodbye first.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                handle.disconnect(russh::Disconnect::ByApplication, "", "en"),
            )
            .await;
        }
    }

    /// Drops every connection (shutdown).
    pub(super) fn clear(&self) {
        self.inner.lock().expect("ssh pool").servers.clear();
    }

    /// Forwarded helper sockets still routed on the pooled connections, for tests.
    #[cfg(test)]
    pub(super) fn forwards(&self) -> usize {
        self.inner
            .lock()
            .expect("ssh pool")
            .servers
            .values()
            .flatten()
            .map(|pooled| pooled.forwards.len())
            .sum()
    }

    /// Open connections, for tests.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("ssh pool")
            .servers
            .values()
            .map(Vec::len)
            .sum()
    }
}
