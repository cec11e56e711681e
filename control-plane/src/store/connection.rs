//! Per-connection SQLite setup, run on every connection the store opens (writer and readers).
//!
//! [`configure`] turns on the query planner stability guarantee (`SQLITE_DBCONFIG_ENABLE_QPSG`).
//! Without it SQLite lets the value bound to a parameter shape the plan where it can (a bound
//! `LIMIT ?`, the right-hand side of `LIKE ?`, STAT4 range estimates), and marks the statement
//! so that binding that parameter again, to any value, expires it: the next `sqlite3_step`
//! compiles the statement again (`sqlite3Reprepare`). sqlx binds every parameter on every
//! execution, so each claim (`… LIMIT ?`) was compiled anew. With the guarantee, a statement is
//! planned once from its text and stays prepared in sqlx's statement cache.
//!
//! [`statement_stats`] reads SQLite's own counters of the statements a connection holds, so a
//! test can prove that none is re-prepared.

use sqlx::SqliteConnection;

/// Configures one freshly opened connection (`after_connect` of both pools).
pub(crate) async fn configure(connection: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    let mut now_enabled: std::ffi::c_int = 0;
    // SAFETY: `db` is the open connection held locked by `handle` for this call; the option
    // takes an int (1: enable) and a pointer to an int that receives the new setting.
    let code = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::ffi::c_int,
            &mut now_enabled as *mut std::ffi::c_int,
        )
    };
    if code != libsqlite3_sys::SQLITE_OK || now_enabled != 1 {
        return Err(sqlx::Error::Configuration(
            format!("SQLite refused the query planner stability guarantee (code {code})").into(),
        ));
    }
    Ok(())
}

/// One prepared statement a connection holds, with SQLite's counters.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct StatementStats {
    pub sql: String,
    /// How often it ran (`SQLITE_STMTSTATUS_RUN`).
    pub runs: i64,
    /// How often it was compiled again (`SQLITE_STMTSTATUS_REPREPARE`).
    pub reprepares: i64,
}

/// The statements `connection` holds prepared (sqlx's statement cache), with their counters.
#[cfg(test)]
pub(crate) async fn statement_stats(
    connection: &mut SqliteConnection,
) -> Result<Vec<StatementStats>, sqlx::Error> {
    let mut handle = connection.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    let mut stats = Vec::new();
    // SAFETY: the connection is locked by `handle` for the whole walk, so no statement is
    // prepared or finalized meanwhile; `sqlite3_sql` returns a NUL-terminated string owned by
    // its statement, copied before the next step of the walk.
    unsafe {
        let mut statement = libsqlite3_sys::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !statement.is_null() {
            let text = libsqlite3_sys::sqlite3_sql(statement);
            let sql = if text.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(text)
                    .to_string_lossy()
                    .into_owned()
            };
            stats.push(StatementStats {
                sql,
                runs: libsqlite3_sys::sqlite3_stmt_status(
                    statement,
                    libsqlite3_sys::SQLITE_STMTSTATUS_RUN,
                    0,
                )
                .into(),
                reprepares: libsqlite3_sys::sqlite3_stmt_status(
                    statement,
                    libsqlite3_sys::SQLITE_STMTSTATUS_REPREPARE,
                    0,
                )
                .into(),
            });
            statement = libsqlite3_sys::sqlite3_next_stmt(db, statement);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Store;
    use super::super::jobs::{Attempt, AttemptResult, JobStatus, LogChunk, NewRun, Stream};
    use super::super::now_ms;
    use super::*;

    /// Every statement of every connection the store has open, with its connection's name.
    async fn all_statements(store: &Store) -> Vec<(&'static str, StatementStats)> {
        let mut found = Vec::new();
        let mut writer = store.writer.acquire().await.unwrap();
        for stats in statement_stats(&mut writer).await.unwrap() {
            found.push(("writer", stats));
        }
        drop(writer);
        // Hold every open reader at once, so each is inspected exactly once.
        let mut readers = Vec::new();
        for _ in 0..store.reader.size() {
            readers.push(store.reader.acquire().await.unwrap());
        }
        for reader in &mut readers {
            for stats in statement_stats(reader).await.unwrap() {
                found.push(("reader", stats));
            }
        }
        found
    }

    /// The claim's statement, executed three times on a connection of its own: compiled again
    /// on every execution without [`configure`], never with it.
    #[tokio::test]
    async fn a_bound_limit_re_prepares_the_claim_unless_the_plan_is_stable() {
        use sqlx::{AssertSqlSafe, Connection};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.db");
        Store::open_sqlite(&path).await.unwrap();
        let options: sqlx::sqlite::SqliteConnectOptions =
            format!("sqlite://{}", path.display()).parse().unwrap();
        let claim = super::super::dispatch::claimable_select();
        let reprepares = |stats: Vec<StatementStats>| {
            stats
                .into_iter()
                .find(|stats| stats.sql == claim)
                .map(|stats| (stats.runs, stats.reprepares))
        };
        for stable in [false, true] {
            let mut connection = SqliteConnection::connect_with(&options).await.unwrap();
            if stable {
                configure(&mut connection).await.unwrap();
            }
            for limit in [1_i64, 1, 5] {
                let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(claim.clone()))
                    .bind("agent")
                    .bind(now_ms())
                    .bind(limit)
                    .fetch_optional(&mut connection)
                    .await
                    .unwrap();
                assert_eq!(found, None);
            }
            let counted = reprepares(statement_stats(&mut connection).await.unwrap());
            let expected = if stable { (3, 0) } else { (3, 3) };
            assert_eq!(counted, Some(expected), "planner stability {stable}");
        }
    }

    /// A fan-out's statements (the run, each agent's claim, upload and result, the run's jobs
    /// re-read, a claim that finds nothing), twice over: none of them is compiled again. Without
    /// the planner guarantee of [`configure`], the claim's `LIMIT ?` alone re-prepares it on
    /// every execution.
    #[tokio::test]
    async fn the_fan_out_path_never_re_prepares_a_statement() {
        let fixture = super::super::tests::fixture_with(Default::default()).await;
        let store = &fixture.store;
        let mut agents = Vec::new();
        for index in 0..4 {
            agents.push(store.enroll_test_agent(&format!("host-{index}")).await.id);
        }
        for round in 0..3 {
            let (run_id, jobs) = store
                .create_run(NewRun {
                    event_id: &fixture.event,
                    kind: "bash",
                    script: "echo hi",
                    env: &BTreeMap::new(),
                    runtime_spec: None,
                    input: None,
                    timeout_seconds: 60,
                    max_attempts: 1,
                    created_by: &fixture.owner,
                    agent_ids: &agents,
                })
                .await
                .unwrap();
            for (index, (job_id, agent)) in jobs.iter().enumerate() {
                // Claims of several sizes: the bound limit changes between executions.
                let limit = 1 + (index as u32 + round) % 3;
                let claimed = store
                    .claim_jobs(agent, limit, now_ms() + 60_000)
                    .await
                    .unwrap();
                assert_eq!(claimed.len(), 1);
                let attempt = Attempt {
                    job_id: job_id.clone(),
                    attempt: 1,
                };
                store.open_attempt(agent, &attempt).await.unwrap();
                let chunk = LogChunk {
                    offset: 0,
                    stream: Stream::Stdout,
                    data: b"hi\n".to_vec(),
                };
                let result = AttemptResult {
                    status: JobStatus::Completed,
                    reason: None,
                    exit_code: Some(0),
                    log_len: 3,
                    result: None,
                    condition: None,
                };
                store
                    .finish_attempt(agent, &attempt, &[chunk], &result)
                    .await
                    .unwrap();
                let ids: Vec<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
                assert!(!store.jobs_of_run(&run_id, &ids).await.unwrap().is_empty());
                assert!(
                    store
                        .claim_jobs(agent, limit, now_ms() + 60_000)
                        .await
                        .unwrap()
                        .is_empty()
                );
            }
            let run = store.run(&run_id).await.unwrap();
            assert!(
                run.jobs
                    .iter()
                    .all(|job| job.status == JobStatus::Completed)
            );
        }
        let statements = all_statements(store).await;
        assert!(
            statements
                .iter()
                .any(|(_, stats)| stats.sql.contains("LIMIT ?") && stats.runs >= 12),
            "the claim statements are among those inspected: {statements:#?}"
        );
        // The migrator's own statements run while its migrations change the schema, which
        // expires every prepared statement: once, at start-up.
        let reprepared: Vec<_> = statements
            .iter()
            .filter(|(_, stats)| stats.reprepares > 0 && !stats.sql.contains("_sqlx_migrations"))
            .collect();
        assert!(
            reprepared.is_empty(),
            "statements compiled again: {reprepared:#?}"
        );
    }
}
