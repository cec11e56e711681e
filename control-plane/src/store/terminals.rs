//! Terminals: the agent grants that let USERs open terminals, the terminal sessions opened
//! through the control plane (live and past), and the per-agent recording opt-in.
//!
//! A session row is open while `closed_at` is NULL. It is closed when the agent reports the
//! shell's exit (on a viewer's stream or as `TerminalEnded`), when an attach finds the session
//! gone, on an explicit close, and when the agent's hello no longer lists it.

use sqlx::Row;

use super::{Store, StoreError, StoreResult, now_ms, write_op};

/// A user allowed to open terminals on an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user_id: String,
    pub username: String,
    pub role: String,
    pub granted_at: i64,
}

/// A terminal session as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalSession {
    pub id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub user_id: String,
    pub username: String,
    pub opened_at: i64,
    pub closed_at: Option<i64>,
    pub exit_code: Option<i32>,
    /// Path of the asciicast file, when the session is recorded.
    pub recording: Option<String>,
}

fn session_from_row(row: &sqlx::any::AnyRow) -> StoreResult<TerminalSession> {
    Ok(TerminalSession {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        agent_name: row.try_get("agent_name")?,
        user_id: row.try_get("user_id")?,
        username: row.try_get("username")?,
        opened_at: row.try_get("opened_at")?,
        closed_at: row.try_get("closed_at")?,
        exit_code: row
            .try_get::<Option<i64>, _>("exit_code")?
            .map(|code| code as i32),
        recording: row.try_get("recording")?,
    })
}

const SESSION_SELECT: &str = "SELECT t.id, t.agent_id, a.name AS agent_name, t.user_id, u.username, t.opened_at, t.closed_at, t.exit_code, t.recording
     FROM terminal_sessions t JOIN agents a ON a.id = t.agent_id JOIN users u ON u.id = t.user_id";

impl Store {
    /// Allows `user_id` to open terminals on `agent_id`; `NotFound` if either does not exist.
    pub async fn grant_agent(
        &self,
        agent_id: &str,
        user_id: &str,
        granted_by: &str,
    ) -> StoreResult<()> {
        let (agent_id, user_id, granted_by) = (
            agent_id.to_owned(),
            user_id.to_owned(),
            granted_by.to_owned(),
        );
        write_op!(self, |conn| async {
            let agent: Option<String> = sqlx::query_scalar(
                "SELECT id FROM agents WHERE id = $1 AND revoked_at IS NULL AND cert_sha256 NOT LIKE 'pending:%'",
            )
            .bind(&agent_id)
            .fetch_optional(&mut *conn)
            .await?;
            let user: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
                .bind(&user_id)
                .fetch_optional(&mut *conn)
                .await?;
            if agent.is_none() || user.is_none() {
                return Err(StoreError::NotFound);
            }
            sqlx::query(
                "INSERT INTO agent_grants (agent_id, user_id, granted_at, granted_by) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (agent_id, user_id) DO NOTHING",
            )
            .bind(&agent_id)
            .bind(&user_id)
            .bind(now_ms())
            .bind(&granted_by)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Takes a grant back; returns whether there was one.
    pub async fn revoke_grant(&self, agent_id: &str, user_id: &str) -> StoreResult<bool> {
        let (agent_id, user_id) = (agent_id.to_owned(), user_id.to_owned());
        write_op!(self, |conn| async {
            let done = sqlx::query("DELETE FROM agent_grants WHERE agent_id = $1 AND user_id = $2")
                .bind(agent_id)
                .bind(user_id)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected() > 0)
        })
        .await
    }

    /// The users granted an agent, by name.
    pub async fn agent_grants(&self, agent_id: &str) -> StoreResult<Vec<Grant>> {
        let rows = sqlx::query(
            "SELECT g.user_id, u.username, u.role, g.granted_at FROM agent_grants g JOIN users u ON u.id = g.user_id
             WHERE g.agent_id = $1 ORDER BY u.username",
        )
        .bind(agent_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Grant {
                    user_id: row.try_get("user_id")?,
                    username: row.try_get("username")?,
                    role: row.try_get("role")?,
                    granted_at: row.try_get("granted_at")?,
                })
            })
            .collect()
    }

    /// Whether `user_id` was granted `agent_id`.
    pub async fn has_grant(&self, agent_id: &str, user_id: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM agent_grants WHERE agent_id = $1 AND user_id = $2")
                .bind(agent_id)
                .bind(user_id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(found.is_some())
    }

    /// Sets whether an agent's terminal sessions are recorded; returns whether the agent exists.
    pub async fn set_agent_record_terminals(
        &self,
        agent_id: &str,
        record: bool,
    ) -> StoreResult<bool> {
        let agent_id = agent_id.to_owned();
        write_op!(self, |conn| async {
            let done = sqlx::query(
                "UPDATE agents SET record_terminals = $1 WHERE id = $2 AND revoked_at IS NULL AND cert_sha256 NOT LIKE 'pending:%'",
            )
            .bind(i64::from(record))
            .bind(agent_id)
            .execute(&mut *conn)
            .await?;
            Ok(done.rows_affected() > 0)
        })
        .await
    }

    /// Records a session the agent just started.
    pub async fn open_terminal_session(
        &self,
        id: &str,
        agent_id: &str,
        user_id: &str,
        recording: Option<&str>,
    ) -> StoreResult<()> {
        let (id, agent_id, user_id, recording) = (
            id.to_owned(),
            agent_id.to_owned(),
            user_id.to_owned(),
            recording.map(str::to_owned),
        );
        write_op!(self, |conn| async {
            sqlx::query(
                "INSERT INTO terminal_sessions (id, agent_id, user_id, opened_at, recording) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(agent_id)
            .bind(user_id)
            .bind(now_ms())
            .bind(recording)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// Marks a session of `agent_id` closed (once); returns whether it was open.
    pub async fn close_terminal_session(
        &self,
        id: &str,
        agent_id: &str,
        exit_code: Option<i32>,
    ) -> StoreResult<bool> {
        let (id, agent_id) = (id.to_owned(), agent_id.to_owned());
        write_op!(self, |conn| async {
            let done = sqlx::query(
                "UPDATE terminal_sessions SET closed_at = $1, exit_code = $2 WHERE id = $3 AND agent_id = $4 AND closed_at IS NULL",
            )
            .bind(now_ms())
            .bind(exit_code.map(i64::from))
            .bind(id)
            .bind(agent_id)
            .execute(&mut *conn)
            .await?;
            Ok(done.rows_affected() > 0)
        })
        .await
    }

    /// Closes every open session of `agent_id` that is not in `live` (the agent's hello lists
    /// the sessions it still runs); returns how many were closed.
    pub async fn close_terminal_sessions_except(
        &self,
        agent_id: &str,
        live: &[String],
    ) -> StoreResult<u64> {
        let (agent_id, live) = (agent_id.to_owned(), live.to_vec());
        write_op!(self, |conn| async {
            let open: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM terminal_sessions WHERE agent_id = $1 AND closed_at IS NULL",
            )
            .bind(&agent_id)
            .fetch_all(&mut *conn)
            .await?;
            let now = now_ms();
            let mut closed = 0;
            for id in open.iter().filter(|id| !live.contains(id)) {
                closed += sqlx::query(
                    "UPDATE terminal_sessions SET closed_at = $1 WHERE id = $2 AND closed_at IS NULL",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            }
            Ok(closed)
        })
        .await
    }

    /// One session by id.
    pub async fn terminal_session(&self, id: &str) -> StoreResult<Option<TerminalSession>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SESSION_SELECT} WHERE t.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    /// The newest sessions, at most `limit`: of one user, or everyone's.
    pub async fn terminal_sessions(
        &self,
        user_id: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<TerminalSession>> {
        let rows =
            match user_id {
                Some(user_id) => sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{SESSION_SELECT} WHERE t.user_id = $1 ORDER BY t.opened_at DESC, t.id LIMIT $2"
                )))
                .bind(user_id)
                .bind(i64::from(limit))
                .fetch_all(&self.reader)
                .await?,
                None => {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "{SESSION_SELECT} ORDER BY t.opened_at DESC, t.id LIMIT $1"
                    )))
                    .bind(i64::from(limit))
                    .fetch_all(&self.reader)
                    .await?
                }
            };
        rows.iter().map(session_from_row).collect()
    }

    /// Open sessions per agent: of one user, or of everyone.
    pub async fn open_terminal_sessions_by_agent(
        &self,
        user_id: Option<&str>,
    ) -> StoreResult<Vec<(String, u32)>> {
        let rows = sqlx::query(
            "SELECT agent_id, COUNT(*) AS open FROM terminal_sessions
             WHERE closed_at IS NULL AND ($1 IS NULL OR user_id = $2) GROUP BY agent_id",
        )
        .bind(user_id)
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("agent_id")?,
                    row.try_get::<i64, _>("open")? as u32,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::users::Role;
    use super::*;

    async fn agent(store: &Store, name: &str) -> String {
        store.enroll_test_agent(name).await.id
    }

    #[tokio::test]
    async fn grants_and_sessions_are_recorded_and_reconciled() {
        let (_db, store) = crate::store::test_db::open_test_store().await;
        let admin = store.create_user("root", "h", Role::Admin).await.unwrap();
        let user = store.create_user("ann", "h", Role::User).await.unwrap();
        let alpha = agent(&store, "alpha").await;
        let beta = agent(&store, "beta").await;

        assert!(!store.has_grant(&alpha, &user.id).await.unwrap());
        store
            .grant_agent(&alpha, &user.id, &admin.id)
            .await
            .unwrap();
        // Idempotent.
        store
            .grant_agent(&alpha, &user.id, &admin.id)
            .await
            .unwrap();
        assert!(store.has_grant(&alpha, &user.id).await.unwrap());
        assert!(!store.has_grant(&beta, &user.id).await.unwrap());
        let grants = store.agent_grants(&alpha).await.unwrap();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].username, "ann");
        assert!(matches!(
            store.grant_agent(&alpha, "nobody", &admin.id).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.grant_agent("no-agent", &user.id, &admin.id).await,
            Err(StoreError::NotFound)
        ));
        assert!(store.revoke_grant(&alpha, &user.id).await.unwrap());
        assert!(!store.revoke_grant(&alpha, &user.id).await.unwrap());

        let (one, two, three) = ("1".repeat(32), "2".repeat(32), "3".repeat(32));
        store
            .open_terminal_session(&one, &alpha, &user.id, Some("/r/1.cast"))
            .await
            .unwrap();
        store
            .open_terminal_session(&two, &alpha, &admin.id, None)
            .await
            .unwrap();
        store
            .open_terminal_session(&three, &beta, &user.id, None)
            .await
            .unwrap();
        let mut by_agent = store.open_terminal_sessions_by_agent(None).await.unwrap();
        by_agent.sort();
        assert_eq!(by_agent, vec![(alpha.clone(), 2), (beta.clone(), 1)]);
        let mut by_agent = store
            .open_terminal_sessions_by_agent(Some(&user.id))
            .await
            .unwrap();
        by_agent.sort();
        assert_eq!(by_agent, vec![(alpha.clone(), 1), (beta.clone(), 1)]);

        // Only the session's own agent can close it, once.
        assert!(
            !store
                .close_terminal_session(&one, &beta, Some(0))
                .await
                .unwrap()
        );
        assert!(
            store
                .close_terminal_session(&one, &alpha, Some(3))
                .await
                .unwrap()
        );
        assert!(
            !store
                .close_terminal_session(&one, &alpha, None)
                .await
                .unwrap()
        );
        let closed = store.terminal_session(&one).await.unwrap().unwrap();
        assert_eq!(closed.exit_code, Some(3));
        assert!(closed.closed_at.is_some());
        assert_eq!(closed.recording.as_deref(), Some("/r/1.cast"));
        assert_eq!(closed.agent_name, "alpha");

        // A hello that no longer lists a session closes it; listed ones stay open.
        assert_eq!(
            store
                .close_terminal_sessions_except(&beta, std::slice::from_ref(&three))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .close_terminal_sessions_except(&alpha, &[])
                .await
                .unwrap(),
            1
        );
        assert!(
            store
                .terminal_session(&two)
                .await
                .unwrap()
                .unwrap()
                .closed_at
                .is_some()
        );

        let mine = store.terminal_sessions(Some(&user.id), 10).await.unwrap();
        assert_eq!(mine.len(), 2);
        assert!(mine.iter().all(|session| session.user_id == user.id));
        assert_eq!(store.terminal_sessions(None, 10).await.unwrap().len(), 3);
        assert_eq!(store.terminal_sessions(None, 1).await.unwrap().len(), 1);

        assert!(
            store
                .set_agent_record_terminals(&alpha, true)
                .await
                .unwrap()
        );
        assert!(store.agent(&alpha).await.unwrap().record_terminals);
        assert!(
            !store
                .set_agent_record_terminals("nope", true)
                .await
                .unwrap()
        );
    }
}
