//! Several control-plane replicas on one PostgreSQL database (issue 8).
//!
//! `cronium serve` processes that share `CRONIUM_DATABASE_URL` and `ENCRYPTION_KEY` act as one
//! control plane:
//!
//! - [`material`]: what a replica needs to serve any agent (the CA, the QUIC stateless-reset
//!   key) lives in the database, sealed, inserted only when absent, so all replicas agree;
//! - [`signals`]: the in-process wake-ups that may concern another replica (an agent connected
//!   there, a job a follower there watches, a schedule change for the leader, an agent to
//!   disconnect, a change notice for a console there) are sent with
//!   `pg_notify` and replayed by one `PgListener` task on every replica;
//! - [`leader`]: the scheduler runs only on the replica holding the leader advisory lock;
//! - [`presence`]: which replica each agent is connected to, so that an agent connected to
//!   another replica does not count as offline (the dispatcher's offline skip, `GET /agents`);
//! - [`membership`]: the replica registry (`replicas`, migration 0025): each replica's QUIC
//!   addresses and relay URL, announced at start, refreshed, retired on a graceful stop; the
//!   QUIC addresses of every live replica are what agents are told to fail over to.
//!
//! On SQLite there is one control plane: nothing is sent, and it is always the leader.

pub mod leader;
pub mod material;
pub mod membership;
pub mod presence;
pub mod signals;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, watch};

/// Something another replica may have to act on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Work may be queued for this agent (`AgentRegistry::wake`).
    Wake(String),
    /// Stop an attempt (`AgentRegistry::cancel`).
    Cancel {
        agent_id: String,
        job_id: String,
        attempt: u32,
    },
    /// The version this agent should run (`AgentRegistry::announce_update`).
    Update {
        agent_id: String,
        version: Option<String>,
    },
    /// A job's status or log changed (`JobEvents::notify`).
    Job(String),
    /// An event's schedule changed: the scheduler leader re-reads the schedules.
    Schedules,
    /// Close this agent's connection (`AgentRegistry::disconnect`), e.g. it was revoked on
    /// another replica. `code` is a `cronium_protocol::CloseCode` as on the wire; `reason` is
    /// short text for the agent's log.
    Disconnect {
        agent_id: String,
        code: u32,
        reason: String,
    },
    /// A change notice for the consoles (`changes::Changes::receive`); `audience` is `None`
    /// when the receiving replica looks the owner up itself.
    Change {
        kind: crate::changes::Kind,
        id: String,
        audience: Option<crate::changes::Audience>,
    },
    /// Change notices were dropped on another replica: this replica's consoles resync.
    ChangesResync,
}

/// Where the local wake-ups hand what concerns other replicas. Unconnected (SQLite, tests) it
/// drops everything. Cheap to clone.
#[derive(Clone, Default)]
pub struct Outbox {
    sender: Arc<OnceLock<mpsc::UnboundedSender<Signal>>>,
}

impl Outbox {
    /// Hands `signal` to the publisher task, if there is one.
    pub fn send(&self, signal: Signal) {
        if let Some(sender) = self.sender.get() {
            // The publisher stopped only at shutdown: nothing left to tell.
            let _ = sender.send(signal);
        }
    }

    /// Whether a publisher takes signals (several replicas may run).
    pub fn is_connected(&self) -> bool {
        self.sender.get().is_some()
    }

    /// Connects the publisher; `None` if one is connected already.
    fn connect(&self) -> Option<mpsc::UnboundedReceiver<Signal>> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.sender.set(sender).ok().map(|()| receiver)
    }
}

/// This replica: its id, whether it leads the scheduler, and the outbox of its signals.
/// Cheap to clone.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    /// The PostgreSQL URL (never logged: it may hold a password); `None` on SQLite.
    postgres_url: Option<String>,
    leader: AtomicBool,
    outbox: Outbox,
    /// The QUIC addresses of every live replica, this one's first (`membership`); empty on
    /// SQLite and until the first announce.
    agent_addrs: watch::Sender<Vec<String>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Replicas")
            .field("id", &self.inner.id)
            .field("postgres", &self.inner.postgres_url.is_some())
            .field("leader", &self.is_leader())
            .finish()
    }
}

impl Replicas {
    /// A replica on the database `database_url` names (`None` or SQLite: the only one).
    pub fn new(database_url: Option<&str>) -> Replicas {
        let postgres_url = database_url
            .filter(|url| crate::is_postgres_url(url))
            .map(str::to_owned);
        Replicas {
            inner: Arc::new(Inner {
                id: crate::crypto::random_token("replica-")[..24].to_owned(),
                leader: AtomicBool::new(postgres_url.is_none()),
                postgres_url,
                outbox: Outbox::default(),
                agent_addrs: watch::Sender::new(Vec::new()),
            }),
        }
    }

    /// This process's replica id (random per start; in notifications, to skip its own).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Whether this replica shares its database with others (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.inner.postgres_url.is_some()
    }

    /// Whether this replica runs the scheduler now.
    pub fn is_leader(&self) -> bool {
        self.inner.leader.load(Ordering::SeqCst)
    }

    fn set_leader(&self, leader: bool) {
        self.inner.leader.store(leader, Ordering::SeqCst);
    }

    /// The outbox the registry and the job notifications hand other replicas' signals to.
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// The QUIC addresses of every live replica, this one's first, as agents are told them
    /// (`Message::ReplicaAddrs`); empty when there is nothing to tell (SQLite).
    pub fn agent_addrs(&self) -> watch::Receiver<Vec<String>> {
        self.inner.agent_addrs.subscribe()
    }

    /// Replaces the addresses agents are told; connected agents hear of a change.
    fn set_agent_addrs(&self, addresses: Vec<String>) {
        self.inner.agent_addrs.send_if_modified(|current| {
            let changed = *current != addresses;
            if changed {
                *current = addresses;
            }
            changed
        });
    }

    fn postgres_url(&self) -> Option<&str> {
        self.inner.postgres_url.as_deref()
    }
}

#[cfg(test)]
mod tests;
