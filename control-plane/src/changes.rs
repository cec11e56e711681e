//! Change notices for the console's lists (`GET /changes`): "the job J changed", "the agent A
//! came online", each with the audience that may learn of it.
//!
//! Sources call [`Changes::notify`] (the owner is known: HTTP handlers that just wrote the
//! object, agents going on- or offline) or [`Changes::touch`] (the owner is looked up). Job
//! changes come from [`crate::queue::JobEvents`] as well. One task, [`run`], gathers what was
//! announced during a window of [`WINDOW`] (so each kind and id is sent at most once per
//! window), looks the owners up in one query per kind, drops job notices whose state did not
//! change (log appends), adds the run of every changed job, and broadcasts the notices. Each
//! stream filters them by its caller and turns a lag into a `resync`. While no stream is
//! subscribed, a window is only handed to the other replicas (below): nothing is looked up.
//!
//! Memory is bounded: at most [`MAX_PENDING`] notices wait for a window (more become one
//! resync), the broadcast keeps [`BUFFER`] notices, the job states remembered to filter log
//! appends are capped at [`MAX_REMEMBERED`].
//!
//! With several replicas (PostgreSQL), a console may be connected to another replica than the
//! one where a change happened (an agent connects to replica A, a console follows replica B).
//! At the end of each window the task hands what this replica's own sources announced (not job
//! notices from [`crate::queue::JobEvents`], which cross on their own as `Signal::Job`) to the
//! replicas' outbox as `Signal::Change` (kind, id, and the audience when the source knew it),
//! and a dropped local announcement as `Signal::ChangesResync`; the other replicas add them to
//! their own window ([`Changes::receive`]) and never send them on, so nothing loops and each
//! kind and id still crosses at most once per window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{Notify, broadcast::Receiver};
use tracing::{debug, warn};

use crate::AppState;
use crate::replicas::Signal;
use crate::store::changes::Owned;

/// How long announcements are gathered before they are sent: a kind and id is sent at most
/// once per window.
pub const WINDOW: Duration = Duration::from_millis(250);

/// Notices a slow stream may fall behind by before it gets a `resync`.
pub const BUFFER: usize = 1024;

/// Most distinct notices gathered in one window; more are replaced by one `resync`.
pub const MAX_PENDING: usize = 10_000;

/// Most job states remembered to tell a state change from a log append.
const MAX_REMEMBERED: usize = 50_000;

/// What a notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Job,
    Run,
    Agent,
    Server,
    Event,
    Workflow,
    WorkflowRun,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Job => "job",
            Kind::Run => "run",
            Kind::Agent => "agent",
            Kind::Server => "server",
            Kind::Event => "event",
            Kind::Workflow => "workflow",
            Kind::WorkflowRun => "workflow_run",
        }
    }

    /// The kind [`as_str`](Kind::as_str) names (`None` for anything else).
    pub fn parse(text: &str) -> Option<Kind> {
        [
            Kind::Job,
            Kind::Run,
            Kind::Agent,
            Kind::Server,
            Kind::Event,
            Kind::Workflow,
            Kind::WorkflowRun,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }

    /// How the owner of an object of this kind is looked up; `None`: everyone sees it (agents,
    /// like `GET /agents`) or it is looked up otherwise (jobs).
    fn owned(self) -> Option<Owned> {
        match self {
            Kind::Run => Some(Owned::Run),
            Kind::Server => Some(Owned::Server),
            Kind::Event => Some(Owned::Event),
            Kind::Workflow => Some(Owned::Workflow),
            Kind::WorkflowRun => Some(Owned::WorkflowRun),
            Kind::Job | Kind::Agent => None,
        }
    }
}

/// Who may learn of a notice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Audience {
    /// Every signed-in user (the fleet's agents).
    Everyone,
    /// The owner (and admins).
    Owner(Arc<str>),
    /// Admins only: the owner could not be found (the object is gone).
    Admins,
}

/// A notice as streams receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Change {
        kind: Kind,
        id: Arc<str>,
        audience: Audience,
    },
    /// Notices were dropped: a client should re-read everything it shows.
    Resync,
}

/// What waits for the next window: per kind and id, the audience if the source knew it and
/// whether the other replicas are to hear of it.
#[derive(Default)]
struct Pending {
    items: HashMap<(Kind, Arc<str>), Slot>,
    overflowed: bool,
    /// An announcement of this replica's own sources was dropped: the other replicas' consoles
    /// must resync too.
    dropped_own: bool,
}

#[derive(Default)]
struct Slot {
    audience: Option<Audience>,
    /// Announced by a source of this replica (not a job notice, not another replica's).
    publish: bool,
}

/// The change hub. Cheap to clone.
#[derive(Clone)]
pub struct Changes {
    inner: Arc<Inner>,
}

struct Inner {
    pending: Mutex<Pending>,
    wake: Notify,
    sender: broadcast::Sender<Notice>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            inner: Arc::new(Inner {
                pending: Mutex::new(Pending::default()),
                wake: Notify::new(),
                sender: broadcast::channel(BUFFER).0,
            }),
        }
    }
}

impl Changes {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // The lock guards plain data; a panic while holding it leaves it usable.
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, kind: Kind, id: &str, audience: Option<Audience>, publish: bool) {
        self.insert(kind, id, audience, publish);
        self.inner.wake.notify_one();
    }

    /// Adds to the window without waking the task (the task itself, during a window).
    fn insert(&self, kind: Kind, id: &str, audience: Option<Audience>, publish: bool) {
        let mut pending = self.pending();
        let key = (kind, Arc::from(id));
        if pending.items.len() >= MAX_PENDING && !pending.items.contains_key(&key) {
            pending.overflowed = true;
            pending.dropped_own |= publish;
        } else {
            let slot = pending.items.entry(key).or_default();
            // A known audience wins over a lookup (a deleted object has nothing to look up).
            if audience.is_some() {
                slot.audience = audience;
            }
            slot.publish |= publish;
        }
    }

    /// Announces a change whose audience the caller knows.
    pub fn notify(&self, kind: Kind, id: &str, audience: Audience) {
        self.add(kind, id, Some(audience), true);
    }

    /// A change another replica announced (`Signal::Change`): added to this window like a
    /// local one, but never sent on to the other replicas.
    pub fn receive(&self, kind: Kind, id: &str, audience: Option<Audience>) {
        self.add(kind, id, audience, false);
    }

    /// Another replica dropped announcements (`Signal::ChangesResync`): this replica's streams
    /// get a `resync` at the end of the window (not sent on).
    pub fn receive_resync(&self) {
        self.pending().overflowed = true;
        self.inner.wake.notify_one();
    }

    /// Announces a change to an object owned by `owner_id`.
    pub fn notify_owned(&self, kind: Kind, id: &str, owner_id: &str) {
        self.notify(kind, id, Audience::Owner(Arc::from(owner_id)));
    }

    /// Announces a change whose audience is looked up (by the object's owner).
    pub fn touch(&self, kind: Kind, id: &str) {
        self.add(kind, id, None, true);
    }

    /// The notices from now on.
    pub fn subscribe(&self) -> Receiver<Notice> {
        self.inner.sender.subscribe()
    }

    /// How many streams are subscribed (tests check that a closed stream let go).
    pub fn subscribers(&self) -> usize {
        self.inner.sender.receiver_count()
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending())
    }

    fn send(&self, notice: Notice) {
        // No subscriber is fine: nobody watches.
        let _ = self.inner.sender.send(notice);
    }
}

/// The hub's task: windows of announcements resolved and broadcast, until shutdown.
pub async fn run(state: AppState) {
    let changes = state.changes.clone();
    let mut jobs = state.job_events.subscribe();
    let mut remembered: HashMap<Arc<str>, (String, i64, bool)> = HashMap::new();
    loop {
        // Wait for the first announcement.
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = changes.inner.wake.notified() => {}
            job = jobs.recv() => match job {
                Ok(id) => changes.insert(Kind::Job, &id, None, false),
                Err(RecvError::Lagged(_)) => changes.pending().overflowed = true,
                Err(RecvError::Closed) => return,
            },
        }
        // Gather the rest of the window.
        let deadline = tokio::time::sleep(WINDOW);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = &mut deadline => break,
                job = jobs.recv() => match job {
                    Ok(id) => changes.insert(Kind::Job, &id, None, false),
                    Err(RecvError::Lagged(_)) => changes.pending().overflowed = true,
                    Err(RecvError::Closed) => return,
                },
            }
        }
        let pending = changes.take();
        publish(&state, &pending);
        if pending.overflowed {
            debug!("too many changes at once; asking clients to resync");
            remembered.clear();
            changes.send(Notice::Resync);
            continue;
        }
        if changes.subscribers() == 0 {
            // Nobody watches: no owner to look up (a query per window, of up to thousands of
            // jobs while agents drain a queue). A stream that subscribes later reads its lists
            // afresh; the states remembered to filter log appends would be stale by then.
            remembered.clear();
            continue;
        }
        match resolve(&state, pending.items, &mut remembered).await {
            Ok(notices) => {
                for notice in notices {
                    changes.send(notice);
                }
            }
            Err(error) => {
                warn!(%error, "change notices: looking up owners failed; asking clients to resync");
                changes.send(Notice::Resync);
            }
        }
    }
}

/// Hands this window's own announcements to the other replicas (nothing on SQLite).
fn publish(state: &AppState, pending: &Pending) {
    let outbox = state.replicas.outbox();
    if outbox.is_connected() {
        for signal in outgoing(pending) {
            outbox.send(signal);
        }
    }
}

/// What the other replicas hear of a window: this replica's own announcements (not job notices
/// of `JobEvents`, which cross as `Signal::Job`, and not what other replicas announced), and a
/// resync if any of them was dropped.
fn outgoing(pending: &Pending) -> Vec<Signal> {
    let resync = pending.dropped_own.then_some(Signal::ChangesResync);
    resync
        .into_iter()
        .chain(
            pending
                .items
                .iter()
                .filter(|(_, slot)| slot.publish)
                .map(|((kind, id), slot)| Signal::Change {
                    kind: *kind,
                    id: id.to_string(),
                    audience: slot.audience.clone(),
                }),
        )
        .collect()
}

/// The notices of one window: audiences looked up, unchanged jobs dropped, runs of changed jobs
/// added. Sorted by kind and id (a stable order for clients and tests).
async fn resolve(
    state: &AppState,
    items: HashMap<(Kind, Arc<str>), Slot>,
    remembered: &mut HashMap<Arc<str>, (String, i64, bool)>,
) -> crate::store::StoreResult<Vec<Notice>> {
    let mut known: HashMap<(Kind, Arc<str>), Audience> = HashMap::with_capacity(items.len());
    let mut lookups: HashMap<Kind, Vec<Arc<str>>> = HashMap::new();
    for ((kind, id), slot) in items {
        match (slot.audience, kind) {
            (Some(audience), _) => {
                known.insert((kind, id), audience);
            }
            (None, Kind::Agent) => {
                known.insert((kind, id), Audience::Everyone);
            }
            (None, _) => lookups.entry(kind).or_default().push(id),
        }
    }
    for (kind, ids) in lookups {
        let texts: Vec<&str> = ids.iter().map(|id| &**id).collect();
        if kind == Kind::Job {
            let found = state.store.job_changes(&texts).await?;
            if remembered.len() > MAX_REMEMBERED {
                remembered.clear();
            }
            for job in found {
                let owner: Arc<str> = Arc::from(job.owner_id.as_str());
                let now = (job.status.clone(), job.attempt, job.cancel_requested);
                let final_status =
                    matches!(job.status.as_str(), "completed" | "failed" | "cancelled");
                let id: Arc<str> = Arc::from(job.id.as_str());
                let unchanged = remembered.get(&id) == Some(&now);
                if final_status {
                    remembered.remove(&id);
                } else {
                    remembered.insert(id.clone(), now);
                }
                if unchanged {
                    continue;
                }
                known.insert((Kind::Job, id), Audience::Owner(owner.clone()));
                known.insert(
                    (Kind::Run, Arc::from(job.run_id.as_str())),
                    Audience::Owner(owner),
                );
            }
            // A job that is gone (its run deleted) is not announced: nothing shows it.
            continue;
        }
        let Some(owned) = kind.owned() else { continue };
        let owners: HashMap<String, String> = state
            .store
            .owners_of(owned, &texts)
            .await?
            .into_iter()
            .collect();
        for id in ids {
            let audience = match owners.get(&*id) {
                Some(owner) => Audience::Owner(Arc::from(owner.as_str())),
                None => Audience::Admins,
            };
            known.entry((kind, id)).or_insert(audience);
        }
    }
    let mut notices: Vec<((Kind, Arc<str>), Audience)> = known.into_iter().collect();
    notices.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(notices
        .into_iter()
        .map(|((kind, id), audience)| Notice::Change { kind, id, audience })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut signals: Vec<Signal>) -> Vec<Signal> {
        signals.sort_by_key(|signal| format!("{signal:?}"));
        signals
    }

    #[test]
    fn only_this_replicas_own_announcements_go_to_the_other_replicas() {
        let changes = Changes::default();
        changes.notify(Kind::Agent, "agent-1", Audience::Everyone);
        changes.touch(Kind::Event, "event-1");
        changes.notify_owned(Kind::Server, "server-1", "user-1");
        // Job notices of `JobEvents` cross on their own; another replica's notices are not sent
        // back (no loop), also when they name what a local source announced too.
        changes.insert(Kind::Job, "job-1", None, false);
        changes.receive(Kind::Agent, "agent-2", Some(Audience::Everyone));
        changes.receive(Kind::Workflow, "workflow-1", None);
        changes.receive(Kind::Event, "event-1", Some(Audience::Admins));
        changes.touch(Kind::Job, "job-2");
        let pending = changes.take();
        assert!(!pending.overflowed);
        assert_eq!(pending.items.len(), 7);
        assert_eq!(
            sorted(outgoing(&pending)),
            sorted(vec![
                Signal::Change {
                    kind: Kind::Agent,
                    id: "agent-1".into(),
                    audience: Some(Audience::Everyone),
                },
                // The received audience is carried with the local announcement.
                Signal::Change {
                    kind: Kind::Event,
                    id: "event-1".into(),
                    audience: Some(Audience::Admins),
                },
                Signal::Change {
                    kind: Kind::Server,
                    id: "server-1".into(),
                    audience: Some(Audience::Owner(Arc::from("user-1"))),
                },
                Signal::Change {
                    kind: Kind::Job,
                    id: "job-2".into(),
                    audience: None,
                },
            ])
        );
        // The next window starts empty.
        assert!(outgoing(&changes.take()).is_empty());
    }

    #[test]
    fn a_dropped_own_announcement_makes_the_other_replicas_resync_a_received_one_does_not() {
        let changes = Changes::default();
        for index in 0..MAX_PENDING {
            changes.receive(Kind::Server, &format!("server-{index}"), None);
        }
        // Full: another replica's notice is dropped (a local resync only).
        changes.receive(Kind::Server, "one-more", None);
        changes.receive_resync();
        let pending = changes.take();
        assert!(pending.overflowed);
        assert!(outgoing(&pending).is_empty());

        for index in 0..MAX_PENDING {
            changes.receive(Kind::Server, &format!("server-{index}"), None);
        }
        changes.notify(Kind::Agent, "dropped", Audience::Everyone);
        let pending = changes.take();
        assert!(pending.overflowed);
        assert_eq!(outgoing(&pending), [Signal::ChangesResync]);
    }
}
