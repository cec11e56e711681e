//! The claim statement stays prepared: SQLite plans a bound `LIMIT` with its value and expires
//! the statement whenever that parameter is bound again, which made every claim compile anew
//! (`sqlite3Reprepare`); `dispatch::claimable_select` writes the limit into the text instead.
//! Counted with SQLite's own per-statement counters on a plain connection (no planner
//! stability guarantee), so a bound limit coming back fails this test.

use sqlx::{AssertSqlSafe, Connection, SqliteConnection};

use super::Store;
use super::now_ms;

/// One prepared statement a connection holds, with SQLite's counters.
#[derive(Debug, Clone)]
struct StatementStats {
    sql: String,
    /// How often it ran (`SQLITE_STMTSTATUS_RUN`).
    runs: i64,
    /// How often it was compiled again (`SQLITE_STMTSTATUS_REPREPARE`).
    reprepares: i64,
}

/// The statements `connection` holds prepared (sqlx's statement cache), with their counters.
async fn statement_stats(connection: &mut SqliteConnection) -> Vec<StatementStats> {
    let mut handle = connection.lock_handle().await.unwrap();
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
    stats
}

/// The claim's statement (the read that checks for work and the selection inside the claim's
/// `UPDATE`), executed three times per limit with the binds changing: never compiled again.
/// The same statement with a bound `LIMIT` is, on every execution: the counters can tell.
#[tokio::test]
async fn the_claim_statement_is_not_compiled_again_when_its_binds_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.db");
    Store::open_sqlite(&path).await.unwrap().close().await;
    let options: sqlx::sqlite::SqliteConnectOptions =
        format!("sqlite://{}", path.display()).parse().unwrap();
    let mut connection = SqliteConnection::connect_with(&options).await.unwrap();
    let backend = super::Backend::Sqlite;
    let limits = [1_u32, 5];
    for &limit in &limits {
        let claim = super::dispatch::claimable_select(backend, 1, limit);
        for (agent, now) in [("a", now_ms()), ("b", now_ms() + 1), ("a", now_ms() + 2)] {
            let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(claim.clone()))
                .bind(agent)
                .bind(now)
                .fetch_optional(&mut connection)
                .await
                .unwrap();
            assert_eq!(found, None);
        }
    }
    // The control: the same statement with its limit bound is compiled again on every run.
    let bound = super::dispatch::claimable_select(backend, 1, 1).replace("LIMIT 1", "LIMIT $3");
    assert_ne!(bound, super::dispatch::claimable_select(backend, 1, 1));
    for limit in [1_i64, 1, 5] {
        let _: Option<String> = sqlx::query_scalar(AssertSqlSafe(bound.clone()))
            .bind("a")
            .bind(now_ms())
            .bind(limit)
            .fetch_optional(&mut connection)
            .await
            .unwrap();
    }
    let stats = statement_stats(&mut connection).await;
    for &limit in &limits {
        let claim = super::dispatch::claimable_select(backend, 1, limit);
        let found = stats.iter().find(|stats| stats.sql == claim);
        assert_eq!(
            found.map(|stats| (stats.runs, stats.reprepares)),
            Some((3, 0)),
            "limit {limit}: {stats:#?}"
        );
    }
    let control = stats.iter().find(|stats| stats.sql == bound);
    assert_eq!(
        control.map(|stats| (stats.runs, stats.reprepares)),
        Some((3, 3)),
        "{stats:#?}"
    );
}
