//! Cross-replica wake-ups over PostgreSQL `LISTEN`/`NOTIFY`.
//!
//! The local wake-ups stay what they were (`AgentRegistry::wake`, `JobEvents::notify`, …) and
//! also hand what may concern another replica to the [`Outbox`](super::Outbox): every agent
//! wake-up, cancel, update announcement and disconnect (the agent may be connected elsewhere, also while a
//! dead connection of it is still registered here), every job change (a follower may watch it on
//! another replica), a schedule change on a follower (the leader is elsewhere). The [`publish`] task gathers what is waiting, drops
//! repeats, and sends it with `pg_notify` on [`CHANNEL`] after the commit that caused it (the
//! callers wake only after their commit). Every replica runs one [`listen`] task, a
//! `PgListener` on a connection of its own, that replays the other replicas' signals through the
//! same local wake-ups. A listener that lost its connection connects again and then wakes every
//! local runner once, so a notification missed meanwhile strands nothing (followers re-read on
//! their own within `queue::FOLLOW_REREAD`).
//!
//! A notification's payload is text: the sending replica's id on the first line, then one signal
//! per line (`w<TAB>agent`, `c<TAB>agent<TAB>job<TAB>attempt`, `u<TAB>agent<TAB>version`,
//! `j<TAB>job`, `s`, `d<TAB>agent<TAB>close code<TAB>reason`, `n<TAB>kind<TAB>id<TAB>audience`
//! with the audience `-` (look the owner up), `*` (everyone), `!` (admins) or `=owner`, and `r`
//! for a change resync), at most [`MAX_PAYLOAD`] bytes (PostgreSQL allows 8000). Lines that do not
//! parse (unknown close codes and kinds, a reason over [`MAX_REASON`] bytes) are ignored.
//!
//! Received change notices (`n`, `r`) go into the local change hub's window without being sent
//! on ([`crate::changes::Changes::receive`]): a replica publishes only what its own sources
//! announced, so nothing loops between replicas.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cronium_protocol::CloseCode;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Signal;
use crate::AppState;
use crate::changes::{Audience, Kind};

/// The notification channel of the replicas.
pub const CHANNEL: &str = "cronium_replicas";

/// Most bytes of one payload.
pub const MAX_PAYLOAD: usize = 7_000;

/// Most bytes of a disconnect's reason (QUIC close reasons are short text for a log).
pub const MAX_REASON: usize = 200;

/// Most signals gathered into one round of notifications.
const MAX_BATCH: usize = 10_000;

/// Wait before connecting the listener again after a failure.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

fn encode_line(signal: &Signal) -> Option<String> {
    let clean = |text: &str| !text.is_empty() && !text.contains(['\t', '\n']);
    let line = match signal {
        Signal::Wake(agent) if clean(agent) => format!("w\t{agent}"),
        Signal::Cancel {
            agent_id,
            job_id,
            attempt,
        } if clean(agent_id) && clean(job_id) => format!("c\t{agent_id}\t{job_id}\t{attempt}"),
        Signal::Update { agent_id, version }
            if clean(agent_id) && version.as_deref().is_none_or(clean) =>
        {
            format!("u\t{agent_id}\t{}", version.as_deref().unwrap_or(""))
        }
        Signal::Job(job) if clean(job) => format!("j\t{job}"),
        Signal::Schedules => "s".to_owned(),
        Signal::Disconnect {
            agent_id,
            code,
            reason,
        } if clean(agent_id)
            && CloseCode::from_u32((*code).into()).is_some()
            && reason.len() <= MAX_REASON
            && !reason.contains(['\t', '\n']) =>
        {
            format!("d\t{agent_id}\t{code}\t{reason}")
        }
        Signal::Change { kind, id, audience } if clean(id) => {
            let audience = match audience {
                None => "-".to_owned(),
                Some(Audience::Everyone) => "*".to_owned(),
                Some(Audience::Admins) => "!".to_owned(),
                Some(Audience::Owner(owner)) if clean(owner) => format!("={owner}"),
                Some(Audience::Owner(_)) => return None,
            };
            format!("n\t{}\t{id}\t{audience}", kind.as_str())
        }
        Signal::ChangesResync => "r".to_owned(),
        _ => return None,
    };
    // A line that alone would not fit is not sent (ids are far shorter).
    (line.len() < MAX_PAYLOAD / 2).then_some(line)
}

/// The payloads carrying `signals` from replica `sender`, each at most [`MAX_PAYLOAD`] bytes.
pub fn encode(sender: &str, signals: &[Signal]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current = String::new();
    for line in signals.iter().filter_map(encode_line) {
        if !current.is_empty() && current.len() + 1 + line.len() > MAX_PAYLOAD {
            payloads.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push_str(sender);
        }
        current.push('\n');
        current.push_str(&line);
    }
    if !current.is_empty() {
        payloads.push(current);
    }
    payloads
}

/// The sender and the signals of a payload (`None` if it is not one of ours).
pub fn decode(payload: &str) -> Option<(&str, Vec<Signal>)> {
    if payload.len() > 8_000 {
        return None;
    }
    let mut lines = payload.split('\n');
    let sender = lines.next().filter(|sender| !sender.is_empty())?;
    let signals = lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let nonempty = |field: &&str| !field.is_empty();
            match fields.as_slice() {
                ["w", agent] if nonempty(agent) => Some(Signal::Wake((*agent).to_owned())),
                ["c", agent, job, attempt] if nonempty(agent) && nonempty(job) => {
                    Some(Signal::Cancel {
                        agent_id: (*agent).to_owned(),
                        job_id: (*job).to_owned(),
                        attempt: attempt.parse().ok()?,
                    })
                }
                ["u", agent, version] if nonempty(agent) => Some(Signal::Update {
                    agent_id: (*agent).to_owned(),
                    version: nonempty(version).then(|| (*version).to_owned()),
                }),
                ["j", job] if nonempty(job) => Some(Signal::Job((*job).to_owned())),
                ["s"] => Some(Signal::Schedules),
                ["d", agent, code, reason] if nonempty(agent) && reason.len() <= MAX_REASON => {
                    let code: u32 = code.parse().ok()?;
                    CloseCode::from_u32(code.into())?;
                    Some(Signal::Disconnect {
                        agent_id: (*agent).to_owned(),
                        code,
                        reason: (*reason).to_owned(),
                    })
                }
                ["n", kind, id, audience] if nonempty(id) => Some(Signal::Change {
                    kind: Kind::parse(kind)?,
                    id: (*id).to_owned(),
                    audience: match *audience {
                        "-" => None,
                        "*" => Some(Audience::Everyone),
                        "!" => Some(Audience::Admins),
                        owner => Some(Audience::Owner(Arc::from(
                            owner.strip_prefix('=').filter(|owner| !owner.is_empty())?,
                        ))),
                    },
                }),
                ["r"] => Some(Signal::ChangesResync),
                _ => None,
            }
        })
        .collect();
    Some((sender, signals))
}

/// Starts the publisher and the listener of this replica when it shares its database; a no-op
/// on SQLite.
pub fn start(state: &AppState) {
    if !state.replicas.is_shared() {
        return;
    }
    if let Some(receiver) = state.replicas.outbox().connect() {
        state.tasks.spawn(publish(state.clone(), receiver));
    }
    state.tasks.spawn(listen(state.clone()));
}

/// Sends the outbox's signals until shutdown.
async fn publish(state: AppState, mut receiver: mpsc::UnboundedReceiver<Signal>) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            received = receiver.recv() => match received {
                Some(signal) => signal,
                None => return,
            },
        };
        batch.clear();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(signal) => batch.push(signal),
                Err(_) => break,
            }
        }
        let mut seen = HashSet::new();
        batch.retain(|signal| seen.insert(signal.clone()));
        for payload in encode(state.replicas.id(), &batch) {
            if let Err(error) = state.store.notify_replicas(CHANNEL, &payload).await {
                // The other replicas' listeners wake everything when they reconnect; a lost
                // notification with the database up is covered by the runners' own safety nets.
                warn!(%error, "could not notify the other replicas");
            }
        }
    }
}

/// Replays the other replicas' signals here until shutdown.
async fn listen(state: AppState) {
    let Some(url) = state.replicas.postgres_url().map(str::to_owned) else {
        return;
    };
    let mut connected = false;
    loop {
        let mut listener = match connect(&url).await {
            Ok(listener) => listener,
            Err(error) => {
                warn!(%error, "could not listen for the other replicas' notifications; retrying");
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_DELAY) => continue,
                }
            }
        };
        if connected {
            info!("listening for the other replicas' notifications again");
        }
        connected = true;
        // Whatever was notified while nobody listened: every local runner claims once.
        wake_everything(&state);
        loop {
            let received = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => apply(&state, notification.payload()),
                Ok(None) => {
                    warn!("lost the connection that listens for the other replicas");
                    break;
                }
                Err(error) => {
                    warn!(%error, "listening for the other replicas failed");
                    break;
                }
            }
        }
    }
}

async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Wakes every runner of this replica: its agents, its SSH and action workers, and (when it
/// leads) the scheduler.
fn wake_everything(state: &AppState) {
    state.registry.wake_all_local();
    state.ssh.wake();
    state.actions.wake();
    if state.replicas.is_leader() {
        state.schedules.notify_one();
    }
}

/// Applies a notification's signals (not this replica's own).
fn apply(state: &AppState, payload: &str) {
    let Some((sender, signals)) = decode(payload) else {
        return;
    };
    if sender == state.replicas.id() {
        return;
    }
    for signal in signals {
        match signal {
            Signal::Wake(agent_id) => {
                state.registry.wake_local(&agent_id);
            }
            Signal::Cancel {
                agent_id,
                job_id,
                attempt,
            } => {
                state
                    .registry
                    .cancel_local(&agent_id, cronium_protocol::AttemptRef { job_id, attempt });
            }
            Signal::Update { agent_id, version } => {
                state.registry.announce_update_local(&agent_id, version);
            }
            Signal::Job(job_id) => state.job_events.notify_local(&job_id),
            Signal::Disconnect {
                agent_id,
                code,
                reason,
            } => {
                if let Some(code) = CloseCode::from_u32(code.into()) {
                    state.registry.disconnect_local(&agent_id, code, &reason);
                }
            }
            Signal::Change { kind, id, audience } => state.changes.receive(kind, &id, audience),
            Signal::ChangesResync => state.changes.receive_resync(),
            // Only the leader's scheduler reads them (a follower would only send it on).
            Signal::Schedules if state.replicas.is_leader() => state.schedules.notify_one(),
            Signal::Schedules => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_and_split_into_bounded_payloads() {
        let signals: Vec<Signal> = (0..500)
            .flat_map(|index| {
                [
                    Signal::Wake(format!("agent-{index:04}")),
                    Signal::Job(format!("job-{index:04}")),
                ]
            })
            .chain([
                Signal::Cancel {
                    agent_id: "a".into(),
                    job_id: "j".into(),
                    attempt: 3,
                },
                Signal::Update {
                    agent_id: "a".into(),
                    version: Some("1.2.3".into()),
                },
                Signal::Update {
                    agent_id: "b".into(),
                    version: None,
                },
                Signal::Schedules,
                Signal::Disconnect {
                    agent_id: "a".into(),
                    code: CloseCode::Revoked.to_u32(),
                    reason: "agent revoked".into(),
                },
                Signal::Disconnect {
                    agent_id: "b".into(),
                    code: CloseCode::Normal.to_u32(),
                    reason: String::new(),
                },
                Signal::Change {
                    kind: Kind::Agent,
                    id: "a".into(),
                    audience: Some(Audience::Everyone),
                },
                Signal::Change {
                    kind: Kind::WorkflowRun,
                    id: "wr".into(),
                    audience: Some(Audience::Owner(Arc::from("user-1"))),
                },
                Signal::Change {
                    kind: Kind::Server,
                    id: "s".into(),
                    audience: Some(Audience::Admins),
                },
                Signal::Change {
                    kind: Kind::Event,
                    id: "e".into(),
                    audience: None,
                },
                Signal::ChangesResync,
            ])
            .collect();
        let payloads = encode("replica-x", &signals);
        assert!(payloads.len() > 1);
        let mut decoded = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD);
            let (sender, signals) = decode(payload).unwrap();
            assert_eq!(sender, "replica-x");
            decoded.extend(signals);
        }
        assert_eq!(decoded, signals);
    }

    #[test]
    fn malformed_payloads_and_lines_are_ignored() {
        assert!(decode("").is_none());
        assert!(decode(&"x".repeat(9_000)).is_none());
        let (_, signals) =
            decode("r\nw\t\nc\ta\tj\tnot-a-number\nq\tx\nj\tjob\textra\nw\tok\n\n").unwrap();
        assert_eq!(signals, [Signal::Wake("ok".into())]);
        // Ids with separators are never sent.
        assert!(encode("r", &[Signal::Wake("a\nb".into())]).is_empty());

        // Disconnects: unknown codes, missing or extra fields and long reasons are dropped.
        let long = "x".repeat(MAX_REASON + 1);
        let payload = format!(
            "r\nd\ta\t99\tx\nd\ta\t-1\tx\nd\t\t2\tx\nd\ta\t2\nd\ta\t2\tx\ty\nd\ta\t2\t{long}\nd\tok\t2\tagent revoked"
        );
        let (_, signals) = decode(&payload).unwrap();
        assert_eq!(
            signals,
            [Signal::Disconnect {
                agent_id: "ok".into(),
                code: CloseCode::Revoked.to_u32(),
                reason: "agent revoked".into(),
            }]
        );
        for unsendable in [
            Signal::Disconnect {
                agent_id: "a".into(),
                code: 99,
                reason: String::new(),
            },
            Signal::Disconnect {
                agent_id: "a".into(),
                code: 2,
                reason: long.clone(),
            },
            Signal::Disconnect {
                agent_id: "a".into(),
                code: 2,
                reason: "two\nlines".into(),
            },
            Signal::Change {
                kind: Kind::Server,
                id: "s".into(),
                audience: Some(Audience::Owner(Arc::from(""))),
            },
            Signal::Change {
                kind: Kind::Server,
                id: "a\tb".into(),
                audience: None,
            },
        ] {
            assert!(encode("r", &[unsendable]).is_empty());
        }

        // Change notices: unknown kinds and audiences, empty ids and owners are dropped.
        let (_, signals) = decode(
            "r\nn\tplanet\tx\t*\nn\tagent\t\t*\nn\tagent\tx\t?\nn\tevent\tx\t=\nn\tagent\tx\nr\tx\nn\tagent\tok\t*\nr",
        )
        .unwrap();
        assert_eq!(
            signals,
            [
                Signal::Change {
                    kind: Kind::Agent,
                    id: "ok".into(),
                    audience: Some(Audience::Everyone),
                },
                Signal::ChangesResync,
            ]
        );
    }
}
