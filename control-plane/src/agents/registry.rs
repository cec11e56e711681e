//! Who is connected right now: one entry per online agent, holding its QUIC connection and the
//! means to reach its session task (wake-ups and cancellations).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cronium_protocol::{AttemptRef, CloseCode};
use tokio::sync::{Notify, mpsc};

use crate::replicas::{Outbox, Signal};

/// A message for an agent's session task to send on the control stream.
#[derive(Debug)]
pub enum Outbound {
    Cancel(AttemptRef),
    /// The agent version this agent should run (`AgentUpdate`).
    AgentUpdate(Option<String>),
}

/// The live agents. Cheap to clone.
#[derive(Clone, Default)]
pub struct AgentRegistry {
    inner: Arc<Mutex<HashMap<String, Link>>>,
    next_session: Arc<AtomicU64>,
    /// Where wake-ups, cancels and update announcements for agents connected to another
    /// replica go (`crate::replicas::signals`).
    outbox: Outbox,
}

struct Link {
    session: u64,
    connection: quinn::Connection,
    /// Wakes the session task to send `WorkAvailable`; coalesces bursts of new jobs.
    wake: Arc<Notify>,
    outbound: mpsc::UnboundedSender<Outbound>,
    last_seen_at: i64,
    /// When this connection was established (its handshake completed).
    connected_at: i64,
}

/// What a session task receives when it registers.
pub struct Registration {
    pub session: u64,
    pub wake: Arc<Notify>,
    pub outbound: mpsc::UnboundedReceiver<Outbound>,
}

impl AgentRegistry {
    /// A registry that hands what concerns agents connected elsewhere to `outbox`.
    pub fn with_outbox(outbox: Outbox) -> AgentRegistry {
        AgentRegistry {
            outbox,
            ..AgentRegistry::default()
        }
    }

    /// Registers a connected agent whose connection was established at `now` (also its first
    /// last-seen time); an older connection of the same agent is closed.
    pub fn register(
        &self,
        agent_id: &str,
        connection: quinn::Connection,
        now: i64,
    ) -> Registration {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let (sender, outbound) = mpsc::unbounded_channel();
        let link = Link {
            session,
            connection,
            wake: wake.clone(),
            outbound: sender,
            last_seen_at: now,
            connected_at: now,
        };
        let previous = self.lock().insert(agent_id.to_string(), link);
        if let Some(previous) = previous {
            previous.connection.close(
                CloseCode::Replaced.to_u32().into(),
                b"replaced by a newer connection",
            );
        }
        Registration {
            session,
            wake,
            outbound,
        }
    }

    /// Removes the agent if `session` is still its current one; returns its last-seen time.
    pub fn unregister(&self, agent_id: &str, session: u64) -> Option<i64> {
        let mut links = self.lock();
        match links.get(agent_id) {
            Some(link) if link.session == session => {
                links.remove(agent_id).map(|link| link.last_seen_at)
            }
            _ => None,
        }
    }

    /// Tells an online agent that work is queued for it. Offline agents claim when they
    /// connect. With several replicas the wake-up also goes to the others, even when the agent
    /// is registered here: this link may be a dead connection not yet closed while the agent
    /// already connected to another replica.
    pub fn wake(&self, agent_id: &str) {
        self.wake_local(agent_id);
        self.outbox.send(Signal::Wake(agent_id.to_owned()));
    }

    /// [`wake`](AgentRegistry::wake) for an agent connected to this replica only; returns
    /// whether it is.
    pub fn wake_local(&self, agent_id: &str) -> bool {
        match self.lock().get(agent_id) {
            Some(link) => {
                link.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wakes every agent connected to this replica.
    pub fn wake_all_local(&self) {
        for link in self.lock().values() {
            link.wake.notify_one();
        }
    }

    /// Asks an online agent to stop an attempt; returns whether the agent is connected to this
    /// replica. With several replicas the others are asked too (see [`wake`](Self::wake)).
    pub fn cancel(&self, agent_id: &str, attempt: AttemptRef) -> bool {
        let here = self.cancel_local(agent_id, attempt.clone());
        self.outbox.send(Signal::Cancel {
            agent_id: agent_id.to_owned(),
            job_id: attempt.job_id,
            attempt: attempt.attempt,
        });
        here
    }

    /// [`cancel`](AgentRegistry::cancel) for an agent connected to this replica only.
    pub fn cancel_local(&self, agent_id: &str, attempt: AttemptRef) -> bool {
        match self.lock().get(agent_id) {
            Some(link) => link.outbound.send(Outbound::Cancel(attempt)).is_ok(),
            None => false,
        }
    }

    /// Tells an online agent which version it should run; offline agents hear it when they
    /// connect. With several replicas the others are told too (see [`wake`](Self::wake)).
    pub fn announce_update(&self, agent_id: &str, version: Option<String>) {
        self.announce_update_local(agent_id, version.clone());
        self.outbox.send(Signal::Update {
            agent_id: agent_id.to_owned(),
            version,
        });
    }

    /// [`announce_update`](AgentRegistry::announce_update) for an agent connected to this
    /// replica only; returns whether it is.
    pub fn announce_update_local(&self, agent_id: &str, version: Option<String>) -> bool {
        match self.lock().get(agent_id) {
            Some(link) => {
                let _ = link.outbound.send(Outbound::AgentUpdate(version));
                true
            }
            None => false,
        }
    }

    /// Closes an agent's connection with `code`, wherever it is connected: with several
    /// replicas the others are told too (`Signal::Disconnect`), so a revocation on one replica
    /// cuts the agent off on the replica that holds its connection.
    pub fn disconnect(&self, agent_id: &str, code: CloseCode, reason: &str) {
        self.disconnect_local(agent_id, code, reason);
        self.outbox.send(Signal::Disconnect {
            agent_id: agent_id.to_owned(),
            code: code.to_u32(),
            reason: reason.to_owned(),
        });
    }

    /// [`disconnect`](AgentRegistry::disconnect) for an agent connected to this replica only;
    /// returns whether it is. The link stays registered until its session task, which sees the
    /// connection closed at once, unregisters it (and records the last-seen time, clears the
    /// agent's presence and announces it offline, as for any disconnect).
    pub fn disconnect_local(&self, agent_id: &str, code: CloseCode, reason: &str) -> bool {
        match self.lock().get(agent_id) {
            Some(link) => {
                link.connection
                    .close(code.to_u32().into(), reason.as_bytes());
                true
            }
            None => false,
        }
    }

    /// Closes every connection (shutdown).
    pub fn disconnect_all(&self, code: CloseCode) {
        for (_, link) in self.lock().drain() {
            link.connection
                .close(code.to_u32().into(), b"control plane shutting down");
        }
    }

    /// Notes that an agent was heard from.
    pub fn touch(&self, agent_id: &str, now: i64) {
        if let Some(link) = self.lock().get_mut(agent_id) {
            link.last_seen_at = now;
        }
    }

    /// The live QUIC connection of an online agent (the control plane opens terminal streams on
    /// it); `None` if it is offline.
    pub fn connection(&self, agent_id: &str) -> Option<quinn::Connection> {
        self.lock()
            .get(agent_id)
            .map(|link| link.connection.clone())
    }

    /// When an online agent was last heard from; `None` if it is offline.
    pub fn last_seen(&self, agent_id: &str) -> Option<i64> {
        self.lock().get(agent_id).map(|link| link.last_seen_at)
    }

    /// When an online agent's current connection was established; `None` if it is offline.
    pub fn connected_at(&self, agent_id: &str) -> Option<i64> {
        self.lock().get(agent_id).map(|link| link.connected_at)
    }

    /// Last-seen times of every online agent.
    pub fn snapshot(&self) -> Vec<(String, i64)> {
        self.lock()
            .iter()
            .map(|(id, link)| (id.clone(), link.last_seen_at))
            .collect()
    }

    /// How many agents are online.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Link>> {
        // A panic while holding this lock leaves the map consistent (every operation is a
        // single map call), so a poisoned lock is still safe to use.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
