//! The registry of the control-plane replicas sharing one database (`replicas`, migration 0025)
//! and what other replicas need to know about each agent's connection (`agent_presence`,
//! migrations 0024 and 0025).
//!
//! A replica announces itself ([`Store::announce_replica`], an upsert) at start and again with
//! every presence refresh (`replicas::presence::REFRESH`), and retires its row on a graceful
//! stop; a row whose `seen_at` is older than the caller's staleness bound belongs to a replica
//! that died and is left out of [`Store::live_replicas`]. Only `cronium serve` on PostgreSQL
//! writes here (`crate::replicas::membership`); on SQLite the tables stay empty.

use std::collections::HashMap;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, StoreResult, write_op};

/// One replica as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// `replicas::Replicas::id()`: random per start.
    pub id: String,
    /// The `host:port` addresses agents dial for this replica.
    pub quic_addrs: Vec<String>,
    /// Base URL (`http://host:port`) other replicas use to reach this replica's HTTP listener
    /// directly.
    pub relay_url: String,
    pub started_at: i64,
    pub seen_at: i64,
}

/// An agent's connection to a replica, from `agent_presence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPresence {
    pub replica_id: String,
    /// When the replica last confirmed the connection.
    pub seen_at: i64,
    /// When the connection was established (`None` in rows from before migration 0025, or
    /// written by a refresh that found no row).
    pub connected_at: Option<i64>,
}

fn replica_from_row(row: &AnyRow) -> StoreResult<ReplicaRecord> {
    let id: String = row.try_get("id")?;
    let quic_addrs: String = row.try_get("quic_addrs")?;
    let quic_addrs = serde_json::from_str(&quic_addrs).map_err(|error| {
        StoreError::Corrupt(format!(
            "replica {id}: quic_addrs is not a JSON array: {error}"
        ))
    })?;
    Ok(ReplicaRecord {
        quic_addrs,
        relay_url: row.try_get("relay_url")?,
        started_at: row.try_get("started_at")?,
        seen_at: row.try_get("seen_at")?,
        id,
    })
}

impl Store {
    /// Records `record` as a live replica (inserted, or every column but `started_at` replaced
    /// when its id is known already).
    pub async fn announce_replica(&self, record: &ReplicaRecord) -> StoreResult<()> {
        let record = record.clone();
        let quic_addrs = serde_json::to_string(&record.quic_addrs)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        write_op!(self, |conn| async {
            sqlx::query(
                "INSERT INTO replicas (id, quic_addrs, relay_url, started_at, seen_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE
                 SET quic_addrs = excluded.quic_addrs, relay_url = excluded.relay_url,
                     seen_at = excluded.seen_at",
            )
            .bind(&record.id)
            .bind(&quic_addrs)
            .bind(&record.relay_url)
            .bind(record.started_at)
            .bind(record.seen_at)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Removes the earlier runs of the replica `id` that listens at `relay_url`: the other rows
    /// of the registry with that relay URL, and the agent presence they recorded (only one
    /// process can listen at an address, so a replica starting there is their successor, and
    /// their agents are not connected to anything until they reconnect). Returns how many of
    /// those rows were still fresh at `now - stale_after_ms` (a replica that died a moment ago,
    /// or another replica given the same relay URL by mistake).
    pub async fn supersede_replicas_at(
        &self,
        relay_url: &str,
        id: &str,
        now: i64,
        stale_after_ms: i64,
    ) -> StoreResult<u64> {
        let (relay_url, id) = (relay_url.to_owned(), id.to_owned());
        write_op!(self, |conn| async {
            let fresh: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM replicas WHERE relay_url = $1 AND id <> $2 AND seen_at >= $3",
            )
            .bind(&relay_url)
            .bind(&id)
            .bind(now - stale_after_ms)
            .fetch_one(&mut *conn)
            .await?;
            sqlx::query(
                "DELETE FROM agent_presence
                 WHERE replica_id IN (SELECT r.id FROM replicas r WHERE r.relay_url = $1 AND r.id <> $2)",
            )
            .bind(&relay_url)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            sqlx::query("DELETE FROM replicas WHERE relay_url = $1 AND id <> $2")
                .bind(&relay_url)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
            Ok(fresh as u64)
        })
        .await
    }

    /// The replicas seen at `now - stale_after_ms` or later, the longest running first (ties by
    /// id, so every replica lists them in one order).
    pub async fn live_replicas(
        &self,
        now: i64,
        stale_after_ms: i64,
    ) -> StoreResult<Vec<ReplicaRecord>> {
        let rows = sqlx::query(
            "SELECT id, quic_addrs, relay_url, started_at, seen_at FROM replicas
             WHERE seen_at >= $1 ORDER BY started_at, id",
        )
        .bind(now - stale_after_ms)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(replica_from_row).collect()
    }

    /// The replica `id`, live or not, if it has a row.
    pub async fn replica(&self, id: &str) -> StoreResult<Option<ReplicaRecord>> {
        let row = sqlx::query(
            "SELECT id, quic_addrs, relay_url, started_at, seen_at FROM replicas WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(replica_from_row).transpose()
    }

    /// Removes the replica `id` from the registry (on its graceful stop).
    pub async fn retire_replica(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        write_op!(self, |conn| async {
            sqlx::query("DELETE FROM replicas WHERE id = $1")
                .bind(&id)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// The replica `agent_id` is connected to, if a row of it was refreshed at
    /// `now - stale_after_ms` or later.
    pub async fn agent_replica(
        &self,
        agent_id: &str,
        now: i64,
        stale_after_ms: i64,
    ) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT replica_id FROM agent_presence WHERE agent_id = $1 AND seen_at >= $2",
        )
        .bind(agent_id)
        .bind(now - stale_after_ms)
        .fetch_optional(&self.reader)
        .await?)
    }

    /// Records that `agent_id` connected to replica `replica` at `connected_at` (the row of its
    /// previous connection, to any replica, is replaced).
    pub async fn record_connection(
        &self,
        replica: &str,
        agent_id: &str,
        connected_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        let (replica, agent_id) = (replica.to_owned(), agent_id.to_owned());
        write_op!(self, |conn| async {
            sqlx::query(
                "INSERT INTO agent_presence (agent_id, replica_id, seen_at, connected_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (agent_id) DO UPDATE
                 SET replica_id = excluded.replica_id, seen_at = excluded.seen_at,
                     connected_at = excluded.connected_at",
            )
            .bind(&agent_id)
            .bind(&replica)
            .bind(now)
            .bind(connected_at)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// The connection of `agent_id` to a replica other than `replica`, if its row was refreshed
    /// at `since` or later.
    pub async fn presence_of_elsewhere(
        &self,
        replica: &str,
        agent_id: &str,
        since: i64,
    ) -> StoreResult<Option<AgentPresence>> {
        let row = sqlx::query(
            "SELECT replica_id, seen_at, connected_at FROM agent_presence
             WHERE agent_id = $1 AND replica_id <> $2 AND seen_at >= $3",
        )
        .bind(agent_id)
        .bind(replica)
        .bind(since)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| -> StoreResult<AgentPresence> {
            Ok(AgentPresence {
                replica_id: row.try_get("replica_id")?,
                seen_at: row.try_get("seen_at")?,
                connected_at: row.try_get("connected_at")?,
            })
        })
        .transpose()
    }

    /// The ids of the agents not revoked whose connection to a replica other than `replica`
    /// was refreshed at `since` or later (with those connected to `replica` itself: the agents
    /// online anywhere, as `GET /agents` counts them; `cronium_agents_online`).
    pub async fn agents_online_elsewhere(
        &self,
        replica: &str,
        since: i64,
    ) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT p.agent_id FROM agent_presence p JOIN agents a ON a.id = p.agent_id
             WHERE p.replica_id <> $1 AND p.seen_at >= $2 AND a.revoked_at IS NULL",
        )
        .bind(replica)
        .bind(since)
        .fetch_all(&self.reader)
        .await?)
    }

    /// The agents connected to a replica other than `replica`, by agent id, whose rows were
    /// refreshed at `since` or later.
    pub async fn presence_elsewhere(
        &self,
        replica: &str,
        since: i64,
    ) -> StoreResult<HashMap<String, AgentPresence>> {
        let rows = sqlx::query(
            "SELECT agent_id, replica_id, seen_at, connected_at FROM agent_presence
             WHERE replica_id <> $1 AND seen_at >= $2",
        )
        .bind(replica)
        .bind(since)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| -> StoreResult<(String, AgentPresence)> {
                Ok((
                    row.try_get("agent_id")?,
                    AgentPresence {
                        replica_id: row.try_get("replica_id")?,
                        seen_at: row.try_get("seen_at")?,
                        connected_at: row.try_get("connected_at")?,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::{open_test_store, open_test_stores};

    fn record(id: &str, started_at: i64, seen_at: i64) -> ReplicaRecord {
        ReplicaRecord {
            id: id.to_owned(),
            quic_addrs: vec![format!("{id}.example:7443"), "[::1]:7443".to_owned()],
            relay_url: format!("http://{id}.example:8080"),
            started_at,
            seen_at,
        }
    }

    #[tokio::test]
    async fn replicas_are_announced_refreshed_listed_while_fresh_and_retired() {
        // Two stores on one database: two control planes announcing themselves.
        let (_db, stores) = open_test_stores(2).await;
        let (a, b) = (&stores[0], &stores[1]);
        assert!(a.live_replicas(1_000, 500).await.unwrap().is_empty());
        assert_eq!(a.replica("replica-a").await.unwrap(), None);

        a.announce_replica(&record("replica-a", 100, 1_000))
            .await
            .unwrap();
        b.announce_replica(&record("replica-b", 50, 1_000))
            .await
            .unwrap();
        // Both stores see both, the longest running first.
        for store in [a, b] {
            let live = store.live_replicas(1_200, 500).await.unwrap();
            assert_eq!(
                live,
                vec![
                    record("replica-b", 50, 1_000),
                    record("replica-a", 100, 1_000)
                ]
            );
        }

        // A refresh (the same announce, later) keeps `started_at` and takes the new addresses.
        let mut refreshed = record("replica-a", 999, 2_000);
        refreshed.quic_addrs = vec!["10.0.0.1:7443".to_owned()];
        refreshed.relay_url = "http://10.0.0.1:8080".to_owned();
        a.announce_replica(&refreshed).await.unwrap();
        let stored = b.replica("replica-a").await.unwrap().unwrap();
        assert_eq!(stored.started_at, 100);
        assert_eq!(stored.seen_at, 2_000);
        assert_eq!(stored.quic_addrs, ["10.0.0.1:7443"]);
        assert_eq!(stored.relay_url, "http://10.0.0.1:8080");

        // B was not refreshed: stale at 1,600 with a 500 ms bound, fresh at exactly 1,500.
        let ids = |live: Vec<ReplicaRecord>| -> Vec<String> {
            live.into_iter().map(|replica| replica.id).collect()
        };
        assert_eq!(
            ids(a.live_replicas(1_600, 500).await.unwrap()),
            ["replica-a"]
        );
        assert_eq!(
            ids(a.live_replicas(1_500, 500).await.unwrap()),
            ["replica-b", "replica-a"]
        );
        // A stale replica is still found by id (its relay URL may be asked for).
        assert!(a.replica("replica-b").await.unwrap().is_some());

        // Retired: gone for everyone; retiring again or an unknown id is not an error.
        a.retire_replica("replica-a").await.unwrap();
        a.retire_replica("replica-a").await.unwrap();
        b.retire_replica("replica-unknown").await.unwrap();
        assert_eq!(b.replica("replica-a").await.unwrap(), None);
        assert_eq!(
            ids(b.live_replicas(1_000, 500).await.unwrap()),
            ["replica-b"]
        );
    }

    #[tokio::test]
    async fn a_replica_restarted_at_its_relay_url_supersedes_its_earlier_run_and_its_agents() {
        let (_db, store) = open_test_store().await;
        // The earlier run (killed, so never retired) with an agent, and another replica.
        store
            .announce_replica(&record("replica-old", 100, 1_000))
            .await
            .unwrap();
        store
            .announce_replica(&record("replica-other", 100, 1_000))
            .await
            .unwrap();
        for (replica, agent) in [("replica-old", "agent-x"), ("replica-other", "agent-y")] {
            store
                .record_connection(replica, agent, 900, 1_000)
                .await
                .unwrap();
        }
        // The new run listens where the old one did: the old row was fresh a moment ago.
        let relay_url = record("replica-old", 0, 0).relay_url;
        assert_eq!(
            store
                .supersede_replicas_at(&relay_url, "replica-new", 1_200, 500)
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.replica("replica-old").await.unwrap(), None);
        assert_eq!(
            store.agent_replica("agent-x", 1_200, 500).await.unwrap(),
            None,
            "the old run's agent is not connected anywhere until it reconnects"
        );
        // Another relay URL's replica and agents are untouched; the new run itself too.
        assert!(store.replica("replica-other").await.unwrap().is_some());
        assert_eq!(
            store.agent_replica("agent-y", 1_200, 500).await.unwrap(),
            Some("replica-other".to_owned())
        );
        let mut new = record("replica-new", 1_200, 1_200);
        new.relay_url = relay_url.clone();
        store.announce_replica(&new).await.unwrap();
        assert_eq!(
            store
                .supersede_replicas_at(&relay_url, "replica-new", 5_000, 500)
                .await
                .unwrap(),
            0
        );
        assert!(store.replica("replica-new").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn agents_online_elsewhere_are_fresh_on_another_replica_and_not_revoked() {
        let (_db, store) = open_test_store().await;
        let mut ids = Vec::new();
        for name in ["on-a", "on-b", "stale", "revoked", "nowhere"] {
            ids.push(store.enroll_test_agent(name).await.id);
        }
        let [on_a, on_b, stale, revoked, _nowhere] = &ids[..] else {
            unreachable!()
        };
        store
            .record_connection("replica-a", on_a, 900, 1_000)
            .await
            .unwrap();
        store
            .record_connection("replica-b", on_b, 900, 1_000)
            .await
            .unwrap();
        store
            .record_connection("replica-a", stale, 100, 200)
            .await
            .unwrap();
        store
            .record_connection("replica-a", revoked, 900, 1_000)
            .await
            .unwrap();
        assert!(store.revoke_agent(revoked).await.unwrap());
        let sorted = |mut ids: Vec<String>| {
            ids.sort();
            ids
        };
        // For a third replica: both live agents, not the stale or the revoked one.
        assert_eq!(
            sorted(
                store
                    .agents_online_elsewhere("replica-c", 500)
                    .await
                    .unwrap()
            ),
            sorted(vec![on_a.clone(), on_b.clone()])
        );
        // For A, its own agents are not "elsewhere" (its registry counts them).
        assert_eq!(
            store
                .agents_online_elsewhere("replica-a", 500)
                .await
                .unwrap(),
            [on_b.as_str()]
        );
        assert!(
            store
                .agents_online_elsewhere("replica-c", 1_001)
                .await
                .unwrap()
                .is_empty()
        );
        // A disconnect on B clears it.
        store.clear_presence("replica-b", on_b).await.unwrap();
        assert_eq!(
            store
                .agents_online_elsewhere("replica-c", 500)
                .await
                .unwrap(),
            [on_a.as_str()]
        );
    }

    #[tokio::test]
    async fn an_agent_replica_comes_from_fresh_presence_rows_only() {
        let (_db, store) = open_test_store().await;
        assert_eq!(
            store.agent_replica("agent-x", 1_000, 500).await.unwrap(),
            None
        );

        store
            .record_connection("replica-a", "agent-x", 900, 1_000)
            .await
            .unwrap();
        assert_eq!(
            store.agent_replica("agent-x", 1_400, 500).await.unwrap(),
            Some("replica-a".to_owned())
        );
        assert_eq!(
            store.agent_replica("agent-x", 1_501, 500).await.unwrap(),
            None
        );

        let elsewhere = store.presence_elsewhere("replica-b", 1_000).await.unwrap();
        assert_eq!(
            elsewhere.get("agent-x"),
            Some(&AgentPresence {
                replica_id: "replica-a".to_owned(),
                seen_at: 1_000,
                connected_at: Some(900),
            })
        );
        assert_eq!(
            store
                .presence_of_elsewhere("replica-b", "agent-x", 1_000)
                .await
                .unwrap()
                .as_ref(),
            elsewhere.get("agent-x")
        );
        // Its own agents are not "elsewhere"; stale rows count for nothing.
        assert!(
            store
                .presence_elsewhere("replica-a", 0)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .presence_elsewhere("replica-b", 1_001)
                .await
                .unwrap()
                .is_empty()
        );
        for (replica, since) in [("replica-a", 0), ("replica-b", 1_001)] {
            assert_eq!(
                store
                    .presence_of_elsewhere(replica, "agent-x", since)
                    .await
                    .unwrap(),
                None
            );
        }

        // A refresh keeps the connection time; the agent moving to B replaces the row.
        store
            .record_presence("replica-a", &["agent-x".to_owned()], 2_000)
            .await
            .unwrap();
        let row = store.presence_elsewhere("replica-b", 0).await.unwrap();
        assert_eq!(row["agent-x"].seen_at, 2_000);
        assert_eq!(row["agent-x"].connected_at, Some(900));
        store
            .record_connection("replica-b", "agent-x", 2_100, 2_200)
            .await
            .unwrap();
        assert_eq!(
            store.agent_replica("agent-x", 2_200, 500).await.unwrap(),
            Some("replica-b".to_owned())
        );
        let row = store.presence_elsewhere("replica-a", 0).await.unwrap();
        assert_eq!(row["agent-x"].connected_at, Some(2_100));
        // A's late disconnect does not clear B's row.
        store.clear_presence("replica-a", "agent-x").await.unwrap();
        assert_eq!(
            store.agent_replica("agent-x", 2_200, 500).await.unwrap(),
            Some("replica-b".to_owned())
        );

        // A row a refresh inserted (no connect seen) has no connection time.
        store
            .record_presence("replica-a", &["agent-y".to_owned()], 3_000)
            .await
            .unwrap();
        let row = store.presence_elsewhere("replica-b", 0).await.unwrap();
        assert_eq!(row["agent-y"].connected_at, None);
    }
}
