//! All SQL lives here. Handlers, the QUIC sessions and the scheduler call the typed functions of
//! the submodules; nothing else in the crate writes a query.
//!
//! SQLite runs in WAL mode with `synchronous=FULL`: a commit that returned is on disk. Reads go
//! through a pool of several connections. Writes go through one writer task that owns the only
//! writing connection and commits in groups: every write is an operation sent to the task, which
//! runs whatever operations are waiting in one transaction (each inside its own savepoint, so one
//! failing operation does not undo the others), commits once, and only then answers each caller.
//! Concurrent requests share an fsync instead of queueing for one each, and an answer still
//! means "on disk".

pub mod actions;
pub mod agent_updates;
pub mod agents;
pub mod audit;
pub mod backup;
mod batch;
pub mod changes;
mod claim_batch;
mod claim_pg;
pub mod cluster;
#[cfg(test)]
mod connection_tests;
pub mod dispatch;
pub mod enrollment;
pub mod events;
pub mod health;
pub mod jobs;
mod lease_expiry;
pub mod observe;
pub mod pool;
pub mod replica_registry;
mod result_batch;
pub mod running;
pub mod schedules;
pub mod secrets;
pub mod servers;
pub mod terminals;
pub mod tools;
pub mod users;
pub mod variables;
pub mod workflows;
#[cfg(test)]
mod writer_tests;

use std::any::Any;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Any as AnyDb, AnyConnection, Executor as _};
use sqlx::{AnyPool, AssertSqlSafe};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Errors of the store, by what the caller can do about them.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The row does not exist (or is not visible to the caller).
    #[error("not found")]
    NotFound,
    /// A uniqueness or check constraint refused the write; the name says which.
    #[error("constraint violated: {0}")]
    Constraint(String),
    /// The database could not be reached or is busy beyond the timeout.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database's disk is full (SQLITE_FULL, PostgreSQL's disk_full): the write was rolled
    /// back, nothing changed.
    #[error("the database's disk is full: {0}")]
    Full(sqlx::Error),
    /// Anything else the database reported.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// A stored value could not be decoded (a bug or a hand-edited database).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        match &error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            // SQLite names the kind in its message ("UNIQUE constraint failed: …"), PostgreSQL
            // does not ("duplicate key value violates …"): callers look for "UNIQUE".
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                let message = db.message();
                StoreError::Constraint(if message.contains("UNIQUE") {
                    message.to_string()
                } else {
                    format!("UNIQUE constraint failed: {message}")
                })
            }
            sqlx::Error::Database(db) if db.is_check_violation() => {
                StoreError::Constraint(db.message().to_string())
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error),
            sqlx::Error::Database(db) if is_disk_full(db.as_ref()) => StoreError::Full(error),
            sqlx::Error::Database(db) if is_server_unavailable(db.as_ref()) => {
                StoreError::Unavailable(error)
            }
            _ => StoreError::Database(error),
        }
    }
}

/// Whether a database error code says the disk is full: SQLite's (extended) result code
/// SQLITE_FULL (13), or PostgreSQL's SQLSTATE `53100` (disk_full).
fn is_disk_full(error: &dyn sqlx::error::DatabaseError) -> bool {
    let code = error.code();
    if error
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return code.as_deref() == Some("53100");
    }
    code.and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == 13)
}

/// Whether a PostgreSQL error says the server is going away or not there yet rather than that
/// the statement is wrong: SQLSTATE class 08 (connection exception), 57P01 `admin_shutdown`
/// (`pg_ctl stop -m fast` ends every session with it), 57P02 `crash_shutdown` (another backend
/// crashed, e.g. a PANIC on a full WAL disk), 57P03 `cannot_connect_now` (starting up or shutting
/// down), 53300 `too_many_connections`. The caller may retry later: nothing was committed.
fn is_server_unavailable(error: &dyn sqlx::error::DatabaseError) -> bool {
    if error
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_none()
    {
        return false;
    }
    error.code().is_some_and(|code| {
        code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
    })
}

impl StoreError {
    /// The same error for another caller (one failure answering several requests: a group
    /// commit, a claim batch). The kind is kept; a database error keeps its message.
    pub(crate) fn duplicate(&self) -> StoreError {
        let again = |error: &sqlx::Error| sqlx::Error::Protocol(error.to_string());
        match self {
            StoreError::NotFound => StoreError::NotFound,
            StoreError::Constraint(message) => StoreError::Constraint(message.clone()),
            StoreError::Unavailable(error) => StoreError::Unavailable(again(error)),
            StoreError::Full(error) => StoreError::Full(again(error)),
            StoreError::Database(error) => StoreError::Database(again(error)),
            StoreError::Corrupt(message) => StoreError::Corrupt(message.clone()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Which database engine the store talks to. The SQL is the same for both (`$N` placeholders,
/// 0/1 BIGINT flags, portable spellings: docs/postgres.md); the few fragments that differ come
/// from methods of this type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The engine behind a connection (for code that gets a connection, not the `Store`).
    pub(crate) fn of(conn: &AnyConnection) -> Backend {
        if conn.backend_name() == "PostgreSQL" {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// The statement that opens the writer's transaction: SQLite takes the write lock at once.
    fn begin(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// An inner join whose left side the plan must start from (`… ON …` follows): SQLite's
    /// `CROSS JOIN` fixes the join order; PostgreSQL has no such hint (and no `CROSS JOIN … ON`)
    /// and plans a plain `JOIN` well from the estimates.
    pub(crate) fn join_in_order(self) -> &'static str {
        match self {
            Backend::Sqlite => "CROSS JOIN",
            Backend::Postgres => "JOIN",
        }
    }

    /// The text value of the top-level `key` of the JSON text in `column` (NULL when absent).
    /// The spelling matches the expression of migration 0023's `audit_log_job` index on each
    /// backend, so the index serves it.
    pub(crate) fn json_text(self, column: &str, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Backend::Postgres => format!("(({column})::jsonb ->> '{key}')"),
        }
    }

    /// What ends a `SELECT` that locks the rows of `table` it returns until the transaction
    /// ends, as an `UPDATE` of them would (`FOR NO KEY UPDATE`: rows referencing them, log chunks
    /// and audit entries, can still be inserted), and with `skip_locked` leaves out the rows
    /// another transaction holds: on PostgreSQL, where other replicas write too; nothing on
    /// SQLite, where the single writer serializes every write.
    pub(crate) fn lock_for_update_of(self, table: &str, skip_locked: bool) -> String {
        match (self, skip_locked) {
            (Backend::Sqlite, _) => String::new(),
            (Backend::Postgres, false) => format!(" FOR NO KEY UPDATE OF {table}"),
            (Backend::Postgres, true) => format!(" FOR NO KEY UPDATE OF {table} SKIP LOCKED"),
        }
    }

    /// The integer value of the top-level `key` of the JSON text in `column`.
    pub(crate) fn json_integer(self, column: &str, key: &str) -> String {
        match self {
            Backend::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Backend::Postgres => format!("CAST(({column})::jsonb ->> '{key}' AS BIGINT)"),
        }
    }

    /// `sql`, a statement whose placeholders are `$1, $2, …` each used once and in that order
    /// in the text, written for this engine: unchanged on PostgreSQL; with anonymous `?`s on
    /// SQLite. SQLite keeps the names of `$N` parameters in a list it searches from the start
    /// for each one, when it parses the statement and again when sqlx asks each parameter's
    /// name to bind it, so a batch statement of n parameters costs O(n²) there; anonymous
    /// parameters have no names. The batch statements (claims, results, run creation) use this.
    ///
    /// Placeholders inside quoted literals or identifiers are left alone. A statement whose
    /// placeholders are not in order is returned unchanged (still correct, only slower), and
    /// fails a debug assertion so that tests catch it.
    pub(crate) fn positional(self, sql: String) -> String {
        if self == Backend::Postgres {
            return sql;
        }
        match anonymous_placeholders(&sql) {
            Some(anonymous) => anonymous,
            None => {
                debug_assert!(false, "placeholders out of order in {sql}");
                sql
            }
        }
    }
}

/// `sql` with its `$N` placeholders (outside quotes) replaced by `?`, if they are `$1, $2, …`
/// in text order with none repeated; `None` otherwise.
fn anonymous_placeholders(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<u8> = None;
    let mut next = 1u64;
    let mut copied = 0;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(open) if byte == open => quote = None,
            Some(_) => {}
            None if byte == b'\'' || byte == b'"' => quote = Some(byte),
            None if byte == b'$' => {
                let digits = bytes[index + 1..]
                    .iter()
                    .take_while(|digit| digit.is_ascii_digit())
                    .count();
                if digits > 0 {
                    let number: u64 = sql[index + 1..index + 1 + digits].parse().ok()?;
                    if number != next {
                        return None;
                    }
                    next += 1;
                    out.push_str(&sql[copied..index]);
                    out.push('?');
                    index += 1 + digits;
                    copied = index;
                    continue;
                }
            }
            None => {}
        }
        index += 1;
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

/// Handle to the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// The database engine.
    backend: Backend,
    /// The pool holding the single writing connection; only the writer task uses it.
    writer: AnyPool,
    /// Operations for the writer task; closing every sender stops the task.
    writes: mpsc::UnboundedSender<WriteRequest>,
    /// Connections for reads.
    reader: AnyPool,
    /// Connections for the statements run on every claim and dispatcher pass (`claim_pg`,
    /// `runners_to_wake`). On PostgreSQL they always use generic plans
    /// ([`force_generic_plans`]); on SQLite this is `reader`.
    hot: AnyPool,
    /// The process's metrics; the writer task adds what committed operations observed.
    metrics: Arc<crate::metrics::Metrics>,
    /// Claims waiting to be made together (`claim_batch`).
    claims: claim_batch::ClaimBatches,
    /// Results waiting to be recorded together (`result_batch`).
    results: result_batch::ResultBatches,
}

/// The writing connection, owned while an operation runs.
type WriteConnection = PoolConnection<AnyDb>;

/// An answer of the writer task, type-erased.
type WriteAnswer = StoreResult<Box<dyn Any + Send>>;

/// A type-erased write operation: runs on the connection and gives it back.
type WriteOperation = Box<
    dyn FnOnce(
            WriteConnection,
        ) -> Pin<Box<dyn Future<Output = (WriteConnection, WriteAnswer)> + Send>>
        + Send,
>;

struct WriteRequest {
    operation: WriteOperation,
    reply: oneshot::Sender<WriteAnswer>,
}

impl std::fmt::Debug for WriteRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("WriteRequest")
    }
}

/// Most operations committed together.
const MAX_GROUP: usize = 128;

/// How long a PostgreSQL request waits for a connection (the server may be restarting) before it
/// fails `Unavailable`.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes a PostgreSQL session plan every prepared statement once, generically, and keep that
/// plan (`plan_cache_mode = force_generic_plan`), for the store's hot statements (`Store::hot`).
///
/// By default PostgreSQL keeps a statement's generic plan after five runs only if it does not
/// look costlier than the custom plans made for the actual parameters. It estimates a bound
/// `LIMIT $n` at a tenth of the rows below it, so once the statistics knew a backlog (as they do
/// a minute after a burst, when autovacuum has analyzed the table) the claim's generic plan
/// looked far costlier than its custom plans for a limit of 8, and the claim was planned anew on
/// every call: 1.8 ms of planning per claim, more than the claim itself, and so was the
/// dispatcher's wake look. The hot statements are written so that their generic plans are good
/// whatever the statistics say (`claim_pg_tests.rs` checks them on a backlog the statistics do
/// not know, and that a claim keeps its generic plan with statistics that do).
///
/// It also turns JIT compilation off there: a generic plan's cost is estimated without the
/// parameters' values, and these statements each touch a few rows. A claim statement for several
/// agents at once (tried, not kept: see the README's PostgreSQL figures) was estimated over
/// `jit_above_cost`, and every run compiled 262 functions: 210 ms for a statement of 5 ms.
async fn force_generic_plans(connection: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan; SET jit = off")
        .execute(connection)
        .await?;
    Ok(())
}

/// Runs a write operation through the writer task: `write_op!(store, |conn| async { … })`
/// where the block uses `conn: &mut AnyConnection` and evaluates to a `StoreResult`.
/// Everything the block uses must be owned (it runs on another task).
macro_rules! write_op {
    ($store:expr, |$conn:ident| $body:expr) => {
        $store.write(move |mut owned| async move {
            let result = {
                let $conn: &mut sqlx::AnyConnection = &mut owned;
                $body.await
            };
            (owned, result)
        })
    };
}
pub(crate) use write_op;

impl Store {
    /// Opens the database a URL names: `postgres://…`/`postgresql://…` (PostgreSQL) or
    /// `sqlite://PATH` (SQLite); applies the migrations.
    pub async fn open_url(url: &str) -> StoreResult<Store> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Store::open_postgres(url).await
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Store::open_sqlite(Path::new(path)).await
        } else {
            Err(StoreError::Database(sqlx::Error::Configuration(
                "the database URL must start with postgres://, postgresql:// or sqlite://".into(),
            )))
        }
    }

    /// Opens (creating if needed) the SQLite database at `path` and applies the migrations.
    pub async fn open_sqlite(path: &Path) -> StoreResult<Store> {
        sqlx::any::install_default_drivers();
        // Create the file and switch it to WAL (a property of the file) with the native driver;
        // the Any driver's URL cannot carry these settings.
        let url = format!("sqlite://{}", path.display());
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(StoreError::Database)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        sqlx::SqliteConnection::connect_with(&options)
            .await?
            .close()
            .await?;
        let writer = sqlite_pool(&format!("{url}?mode=rw"), 1).await?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|error| StoreError::Database(error.into()))?;
        let reader = sqlite_pool(&format!("{url}?mode=ro"), 4).await?;
        let hot = reader.clone();
        Ok(Store::with_pools(Backend::Sqlite, writer, reader, hot))
    }

    /// Connects to the PostgreSQL database at `url` and applies the migrations.
    ///
    /// Both pools check a connection before handing it out and replace a dead one, so they
    /// recover by themselves when the server restarts. While the server is away, a request
    /// waits at most [`POSTGRES_ACQUIRE_TIMEOUT`] for a connection and then fails
    /// `Unavailable` (HTTP 503), instead of holding the caller for half a minute.
    pub async fn open_postgres(url: &str) -> StoreResult<Store> {
        sqlx::any::install_default_drivers();
        let writer = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        sqlx::migrate!("../migrations/postgres")
            .run(&writer)
            .await
            .map_err(|error| StoreError::Database(error.into()))?;
        let reader = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        let hot = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .after_connect(|connection, _| Box::pin(force_generic_plans(connection)))
            .connect(url)
            .await?;
        Ok(Store::with_pools(Backend::Postgres, writer, reader, hot))
    }

    fn with_pools(backend: Backend, writer: AnyPool, reader: AnyPool, hot: AnyPool) -> Store {
        let (writes, requests) = mpsc::unbounded_channel();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        // The task ends when the last `Store` (and so the last sender) is dropped.
        tokio::spawn(commit_groups(
            backend,
            writer.clone(),
            requests,
            metrics.clone(),
        ));
        Store {
            backend,
            writer,
            writes,
            reader,
            hot,
            metrics,
            claims: claim_batch::ClaimBatches::default(),
            results: result_batch::ResultBatches::default(),
        }
    }

    /// The database engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The process's metrics (`GET /metrics`).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Runs `operation` in the next group commit and returns its result once it is on disk.
    pub(crate) async fn write<T, F, Fut>(&self, operation: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(WriteConnection) -> Fut + Send + 'static,
        Fut: Future<Output = (WriteConnection, StoreResult<T>)> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let operation: WriteOperation = Box::new(move |connection| {
            Box::pin(async move {
                let (connection, result) = operation(connection).await;
                (
                    connection,
                    result.map(|value| Box::new(value) as Box<dyn Any + Send>),
                )
            })
        });
        self.writes
            .send(WriteRequest { operation, reply })
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        let answer = answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))??;
        // The operation above produced a `T`; the box holds exactly that type.
        answer
            .downcast::<T>()
            .map(|value| *value)
            .map_err(|_| StoreError::Corrupt("write answer of the wrong type".into()))
    }

    /// Closes both pools, waiting for connections in use.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// Records an audit entry.
    pub async fn audit(
        &self,
        kind: &str,
        actor: Option<&str>,
        detail: &serde_json::Value,
    ) -> StoreResult<()> {
        let (kind, actor, detail) = (kind.to_string(), actor.map(str::to_string), detail.clone());
        write_op!(self, |conn| async {
            audit_in(conn, &kind, actor.as_deref(), detail).await
        })
        .await
    }

    /// Counts audit entries of one kind (for tests and metrics).
    pub async fn count_audit(&self, kind: &str) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE kind = $1")
                .bind(kind)
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// The stored key check, if the database has one.
    pub async fn key_check(&self) -> StoreResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM key_check WHERE id = 1")
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// Stores the key check on first start.
    pub async fn set_key_check(&self, sealed: &[u8]) -> StoreResult<()> {
        let sealed = sealed.to_vec();
        write_op!(self, |conn| async {
            sqlx::query("INSERT INTO key_check (id, sealed, created_at) VALUES (1, $1, $2)")
                .bind(sealed)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }
}

/// The writer task: takes the waiting operations, runs them in one transaction with a savepoint
/// each, commits, then answers. If the commit fails, every operation of the group fails. What the
/// successful operations observed (`observe`) goes to `metrics` after the commit.
async fn commit_groups(
    backend: Backend,
    pool: AnyPool,
    mut requests: mpsc::UnboundedReceiver<WriteRequest>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    while let Some(first) = requests.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let mut connection =
            match pool.acquire().await {
                Ok(connection) => connection,
                Err(error) => {
                    let message = error.to_string();
                    for request in group {
                        let _ = request.reply.send(Err(StoreError::Unavailable(
                            sqlx::Error::Protocol(message.clone()),
                        )));
                    }
                    continue;
                }
            };
        if let Err(error) = sqlx::query(backend.begin()).execute(&mut *connection).await {
            // Nothing of the group ran. A BEGIN fails when the connection or the server is
            // gone (PostgreSQL restarted: the pool replaces the connection on the next
            // acquire), or SQLite is busy beyond its timeout: the caller may retry.
            let full = matches!(&error, sqlx::Error::Database(db) if is_disk_full(db.as_ref()));
            tracing::warn!(%error, "the writer could not begin a transaction");
            let message = error.to_string();
            for request in group {
                let error = sqlx::Error::Protocol(message.clone());
                let _ = request.reply.send(Err(if full {
                    StoreError::Full(error)
                } else {
                    StoreError::Unavailable(error)
                }));
            }
            continue;
        }
        let mut answers = Vec::with_capacity(group.len());
        let mut observed = Vec::new();
        // Each statement is a round trip to the connection (SQLite: its thread), and the
        // writer's round trips are the control plane's sequence: an operation's savepoint is
        // ended in the same call that opens the next one, the last one with the COMMIT.
        let mut end = "";
        for request in group {
            let savepoint = sqlx::raw_sql(AssertSqlSafe(format!("{end}SAVEPOINT operation")))
                .execute(&mut *connection)
                .await;
            let ((returned, answer), observations) = match savepoint {
                Ok(_) => observe::observing((request.operation)(connection)).await,
                Err(error) => {
                    // Neither the savepoint nor, possibly, the previous operation's end ran:
                    // the commit below fails then, and every answer with it.
                    ((connection, Err(StoreError::from(error))), Vec::new())
                }
            };
            connection = returned;
            if answer.is_ok() {
                observed.extend(observations);
            }
            end = if answer.is_ok() {
                "RELEASE operation; "
            } else {
                "ROLLBACK TO operation; RELEASE operation; "
            };
            answers.push((request.reply, answer));
        }
        match sqlx::raw_sql(AssertSqlSafe(format!("{end}COMMIT")))
            .execute(&mut *connection)
            .await
        {
            Ok(_) => {
                metrics.record(&observed);
                for (reply, answer) in answers {
                    let _ = reply.send(answer);
                }
            }
            Err(error) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
                // In WAL mode the pages reach the disk at COMMIT: that is where a full disk shows.
                let full = matches!(&error, sqlx::Error::Database(db) if is_disk_full(db.as_ref()));
                let message = error.to_string();
                for (reply, _) in answers {
                    let error = sqlx::Error::Protocol(message.clone());
                    let _ = reply.send(Err(if full {
                        StoreError::Full(error)
                    } else {
                        StoreError::Unavailable(error)
                    }));
                }
            }
        }
        // Keep the connection usable even if a statement left it in a transaction.
        let _ = connection.ping().await;
    }
}

/// A pool of SQLite connections through the Any driver, each set up for durability: the file is
/// already in WAL mode; `synchronous=FULL`, foreign keys and the busy timeout are per connection.
async fn sqlite_pool(url: &str, connections: u32) -> StoreResult<AnyPool> {
    Ok(AnyPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                )
                .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?)
}

/// Writes an audit entry inside the caller's transaction.
pub(crate) async fn audit_in(
    conn: &mut AnyConnection,
    kind: &str,
    actor: Option<&str>,
    detail: serde_json::Value,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO audit_log (at, kind, actor, detail) VALUES ($1, $2, $3, $4)")
        .bind(now_ms())
        .bind(kind)
        .bind(actor)
        .bind(detail.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A new time-ordered unique id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
pub(crate) mod test_db;
#[cfg(test)]
mod tests;
