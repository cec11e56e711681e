//! What the control-plane replicas sharing one database need from it (`crate::replicas`):
//!
//! - which replica each agent is connected to (`agent_presence`, migration 0024);
//! - the shared secrets of migration 0024 (`cluster_secrets`: the CA, the QUIC reset key),
//!   sealed by the caller, inserted only when absent so that replicas starting at once keep the
//!   first value committed;
//! - `pg_notify` on the replicas' channel (PostgreSQL only; the listener is a `PgListener` of
//!   `crate::replicas::signals`);
//! - the scheduler's leader lock: a session advisory lock (another key than the running lock of
//!   `store::running`) on a connection of its own, released when the connection closes, also
//!   when the process dies.

use std::collections::HashSet;

use sqlx::Connection;

use super::{Backend, Store, StoreError, StoreResult, now_ms, write_op};

/// The scheduler leader's advisory lock key: the bytes "cron-sch" as a number.
const LEADER_KEY: i64 = 0x6372_6f6e_2d73_6368;

impl Store {
    /// The sealed value of the shared secret `name`, if one was stored.
    pub async fn cluster_secret(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT sealed_value FROM cluster_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// Stores `sealed` as the shared secret `name` unless one is stored already; returns the
    /// value stored afterwards (this one, or the one another replica committed first).
    pub async fn insert_cluster_secret(&self, name: &str, sealed: Vec<u8>) -> StoreResult<Vec<u8>> {
        let name = name.to_owned();
        write_op!(self, |conn| async {
            sqlx::query(
                "INSERT INTO cluster_secrets (name, sealed_value, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(&name)
            .bind(sealed)
            .bind(now_ms())
            .execute(&mut *conn)
            .await?;
            // Read in the same transaction: on PostgreSQL the insert above waited for a
            // concurrent one of the same name to commit, so this sees the winner.
            let stored: Vec<u8> =
                sqlx::query_scalar("SELECT sealed_value FROM cluster_secrets WHERE name = $1")
                    .bind(&name)
                    .fetch_one(&mut *conn)
                    .await?;
            Ok(stored)
        })
        .await
    }

    /// Records that `agent_ids` are connected to replica `replica` as of `now` (one upsert per
    /// agent, in one transaction).
    pub async fn record_presence(
        &self,
        replica: &str,
        agent_ids: &[String],
        now: i64,
    ) -> StoreResult<()> {
        if agent_ids.is_empty() {
            return Ok(());
        }
        let (replica, agent_ids) = (replica.to_owned(), agent_ids.to_vec());
        write_op!(self, |conn| async {
            for agent_id in &agent_ids {
                sqlx::query(
                    "INSERT INTO agent_presence (agent_id, replica_id, seen_at) VALUES ($1, $2, $3)
                     ON CONFLICT (agent_id) DO UPDATE
                     SET replica_id = excluded.replica_id, seen_at = excluded.seen_at",
                )
                .bind(agent_id)
                .bind(&replica)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets that `agent_id` is connected to replica `replica` (not a newer connection of it
    /// to another replica).
    pub async fn clear_presence(&self, replica: &str, agent_id: &str) -> StoreResult<()> {
        let (replica, agent_id) = (replica.to_owned(), agent_id.to_owned());
        write_op!(self, |conn| async {
            sqlx::query("DELETE FROM agent_presence WHERE agent_id = $1 AND replica_id = $2")
                .bind(&agent_id)
                .bind(&replica)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Those of `agent_ids` that another replica than `replica` recorded as connected at
    /// `since` or later.
    pub async fn present_elsewhere(
        &self,
        replica: &str,
        agent_ids: &[String],
        since: i64,
    ) -> StoreResult<HashSet<String>> {
        let mut present = HashSet::new();
        for chunk in agent_ids.chunks(500) {
            let sql = format!(
                "SELECT agent_id FROM agent_presence
                 WHERE replica_id <> $1 AND seen_at >= $2 AND agent_id IN ({})",
                super::dispatch::placeholders(3, chunk.len())
            );
            let sql = self.backend.positional(sql);
            let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                .bind(replica)
                .bind(since);
            for agent_id in chunk {
                query = query.bind(agent_id);
            }
            present.extend(query.fetch_all(&self.reader).await?);
        }
        Ok(present)
    }

    /// Sends `payload` on the notification channel `channel` (PostgreSQL only; a no-op on
    /// SQLite, which has no other replica). Outside a transaction: delivered at once.
    pub async fn notify_replicas(&self, channel: &str, payload: &str) -> StoreResult<()> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.reader)
            .await?;
        Ok(())
    }
}

/// The held scheduler leader lock; released when dropped (its connection closes).
#[derive(Debug)]
pub struct LeaderLock {
    connection: sqlx::AnyConnection,
}

impl LeaderLock {
    /// Tries to take the scheduler leader lock on the PostgreSQL database at `url`; `None` when
    /// another session (another replica) holds it.
    pub async fn try_take(url: &str) -> StoreResult<Option<LeaderLock>> {
        sqlx::any::install_default_drivers();
        let mut connection = sqlx::AnyConnection::connect(url)
            .await
            .map_err(StoreError::from)?;
        let taken: i64 =
            sqlx::query_scalar("SELECT CASE WHEN pg_try_advisory_lock($1) THEN 1 ELSE 0 END")
                .bind(LEADER_KEY)
                .fetch_one(&mut connection)
                .await?;
        if taken == 0 {
            connection.close().await?;
            return Ok(None);
        }
        Ok(Some(LeaderLock { connection }))
    }

    /// Checks that the lock's session is alive (so the lock is still held): an error means it
    /// is lost and another replica may take it.
    pub async fn check(&mut self) -> StoreResult<()> {
        let held: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND pid = pg_backend_pid() AND CAST(classid AS BIGINT) = ($1 >> 32)
             AND CAST(objid AS BIGINT) = ($1 & 4294967295) AND objsubid = 1",
        )
        .bind(LEADER_KEY)
        .fetch_one(&mut self.connection)
        .await?;
        if held == 0 {
            return Err(StoreError::Corrupt(
                "the scheduler leader lock is no longer held".into(),
            ));
        }
        Ok(())
    }
}
