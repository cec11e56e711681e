//! Secret environment variables of events and jobs (values sealed with `ENCRYPTION_KEY`), and
//! the re-encryption of every sealed value under a new key (`cronium keys rotate`).
//!
//! [`SEALED_COLUMNS`] lists every column that holds a sealed value; a new one must be added
//! there, or rotation would leave it under the old key (the rotation test checks the list
//! against the schema: every BLOB column whose name says it is sealed).

use sqlx::{AssertSqlSafe, Row};
use thiserror::Error;

use super::{Store, StoreError, StoreResult, write_op};
use crate::crypto::EncryptionKey;

/// One column of sealed values: what it holds (for the rotation report), its table, the key
/// columns that name a row, and the column itself (NULL values are skipped).
#[derive(Debug, Clone, Copy)]
pub struct SealedColumn {
    pub kind: &'static str,
    pub table: &'static str,
    pub keys: &'static [&'static str],
    pub column: &'static str,
}

/// Every column holding values sealed with `ENCRYPTION_KEY`.
pub const SEALED_COLUMNS: &[SealedColumn] = &[
    SealedColumn {
        kind: "key check",
        table: "key_check",
        keys: &["id"],
        column: "sealed",
    },
    SealedColumn {
        kind: "server SSH secrets",
        table: "servers",
        keys: &["id"],
        column: "ssh_secrets",
    },
    SealedColumn {
        kind: "tool configurations",
        table: "tools",
        keys: &["id"],
        column: "config",
    },
    SealedColumn {
        kind: "variables",
        table: "variables",
        keys: &["owner_id", "name"],
        column: "sealed_value",
    },
    SealedColumn {
        kind: "event secret env vars",
        table: "event_secret_env",
        keys: &["event_id", "name"],
        column: "sealed_value",
    },
    SealedColumn {
        kind: "job secret env vars",
        table: "job_secret_env",
        keys: &["job_id", "name"],
        column: "sealed_value",
    },
    SealedColumn {
        kind: "workflow webhook secrets",
        table: "workflows",
        keys: &["id"],
        column: "webhook_secret_sealed",
    },
    SealedColumn {
        kind: "control plane CA and keys",
        table: "cluster_secrets",
        keys: &["name"],
        column: "sealed_value",
    },
];

/// Why a rotation was refused; nothing was changed.
#[derive(Debug, Error)]
pub enum RotateError {
    /// The database has no key check: it was never started with a key.
    #[error("the database has no key check yet; start the control plane once before rotating")]
    NoKeyCheck,
    /// The old key does not open the key check.
    #[error(
        "the current key does not match the key this database was created with; nothing was changed"
    )]
    WrongOldKey,
    /// The old key opens the key check but not a stored value.
    #[error(
        "a stored value ({kind}) does not open with the current key; nothing was changed (the database may be damaged)"
    )]
    Unreadable { kind: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A refusal of the rotation, or a database error.
type Checked<T> = Result<Result<T, RotateError>, StoreError>;

/// Re-encrypts every value of [`SEALED_COLUMNS`] from `old` to `new` on `conn` (inside the
/// caller's transaction). Every value is opened with `old` and sealed anew before anything is
/// written, so a refusal (the inner error) leaves the database untouched. Returns the count
/// per kind.
async fn reseal_all(
    conn: &mut sqlx::AnyConnection,
    old: &EncryptionKey,
    new: &EncryptionKey,
) -> Checked<Vec<(&'static str, u64)>> {
    let check: Option<Vec<u8>> = sqlx::query_scalar("SELECT sealed FROM key_check WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await?;
    let Some(check) = check else {
        return Ok(Err(RotateError::NoKeyCheck));
    };
    if old.verify_key_check(&check).is_err() {
        return Ok(Err(RotateError::WrongOldKey));
    }
    // Phase 1: read, open and seal anew everything; no write yet.
    let mut plan = Vec::new();
    for column in SEALED_COLUMNS {
        let keys = column
            .keys
            .iter()
            .map(|key| format!("CAST({key} AS TEXT) AS {key}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {keys}, {value} FROM {table} WHERE {value} IS NOT NULL",
            value = column.column,
            table = column.table,
        )))
        .fetch_all(&mut *conn)
        .await?;
        let mut resealed = Vec::with_capacity(rows.len());
        for row in &rows {
            let sealed: Vec<u8> = row.try_get(column.column)?;
            let Ok(plaintext) = old.open(&sealed) else {
                return Ok(Err(RotateError::Unreadable { kind: column.kind }));
            };
            let sealed = new.seal(&plaintext);
            // The new value must open to the same bytes before it replaces the old one.
            if new.open(&sealed).ok().as_deref() != Some(plaintext.as_slice()) {
                return Ok(Err(RotateError::Unreadable { kind: column.kind }));
            }
            let key_values = column
                .keys
                .iter()
                .map(|key| row.try_get::<String, _>(*key))
                .collect::<Result<Vec<_>, _>>()?;
            resealed.push((key_values, sealed));
        }
        plan.push((column, resealed));
    }
    // Phase 2: write.
    let mut counts = Vec::new();
    for (column, resealed) in plan {
        let condition = column
            .keys
            .iter()
            .enumerate()
            // Keys were read as text (`CAST(… AS TEXT)` above); compare them as text too, which
            // PostgreSQL needs for the integer key of `key_check`. `$1` is the sealed value.
            .map(|(index, key)| format!("CAST({key} AS TEXT) = ${}", index + 2))
            .collect::<Vec<_>>()
            .join(" AND ");
        let update = format!(
            "UPDATE {table} SET {value} = $1 WHERE {condition}",
            table = column.table,
            value = column.column,
        );
        let count = resealed.len() as u64;
        for (key_values, sealed) in resealed {
            let mut query = sqlx::query(AssertSqlSafe(update.clone())).bind(sealed);
            for value in key_values {
                query = query.bind(value);
            }
            if query.execute(&mut *conn).await?.rows_affected() != 1 {
                return Err(StoreError::Corrupt(format!(
                    "{}: a row changed while it was re-encrypted",
                    column.kind
                )));
            }
        }
        counts.push((column.kind, count));
    }
    Ok(Ok(counts))
}

impl Store {
    /// Re-encrypts every sealed value (and the key check) from `old` to `new` in one
    /// transaction: either all of them are under `new` afterwards, or (on any error) none.
    /// Returns how many values of each kind were re-encrypted.
    pub async fn rotate_key(
        &self,
        old: &EncryptionKey,
        new: &EncryptionKey,
    ) -> Result<Vec<(&'static str, u64)>, RotateError> {
        let (old, new) = (old.clone(), new.clone());
        write_op!(self, |conn| async { reseal_all(conn, &old, &new).await }).await?
    }

    /// The names of an event's secret environment variables, sorted.
    pub async fn event_secret_env_names(&self, event_id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM event_secret_env WHERE event_id = $1 ORDER BY name",
        )
        .bind(event_id)
        .fetch_all(&self.reader)
        .await?)
    }
}

/// Changes an event's secret environment variables in the caller's transaction: `set` (name,
/// sealed value) replaces or adds, `remove` deletes (missing names are ignored).
pub(crate) async fn change_secret_env_in(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
    set: &[(String, Vec<u8>)],
    remove: &[String],
) -> StoreResult<()> {
    for name in remove {
        sqlx::query("DELETE FROM event_secret_env WHERE event_id = $1 AND name = $2")
            .bind(event_id)
            .bind(name)
            .execute(&mut *conn)
            .await?;
    }
    for (name, sealed) in set {
        sqlx::query(
            "INSERT INTO event_secret_env (event_id, name, sealed_value) VALUES ($1, $2, $3)
             ON CONFLICT (event_id, name) DO UPDATE SET sealed_value = excluded.sealed_value",
        )
        .bind(event_id)
        .bind(name)
        .bind(sealed)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Copies an event's secret environment (still sealed) into every job of a new run, in the
/// caller's transaction (one statement for the whole run).
pub(crate) async fn copy_secret_env_to_run_in(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
    run_id: &str,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO job_secret_env (job_id, name, sealed_value)
         SELECT j.id, s.name, s.sealed_value FROM jobs j JOIN event_secret_env s ON s.event_id = $1
         WHERE j.run_id = $2",
    )
    .bind(event_id)
    .bind(run_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
impl Store {
    /// Every value of a sealed column (tests check they open with the current key).
    pub(crate) async fn sealed_values_for_tests(
        &self,
        column: &SealedColumn,
    ) -> StoreResult<Vec<Vec<u8>>> {
        Ok(sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {value} FROM {table} WHERE {value} IS NOT NULL",
            value = column.column,
            table = column.table
        )))
        .fetch_all(&self.reader)
        .await?)
    }

    /// Every (table, column) of the schema declared BLOB.
    pub(crate) async fn blob_columns_for_tests(&self) -> StoreResult<Vec<(String, String)>> {
        let sql = match self.backend {
            super::Backend::Sqlite => {
                "SELECT m.name AS table_name, p.name AS column_name
                 FROM sqlite_master m JOIN pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND upper(p.type) = 'BLOB'"
            }
            super::Backend::Postgres => {
                "SELECT CAST(table_name AS TEXT) AS table_name, CAST(column_name AS TEXT) AS column_name
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND data_type = 'bytea'"
            }
        };
        let rows = sqlx::query(sql).fetch_all(&self.reader).await?;
        rows.iter()
            .map(|row| Ok((row.try_get("table_name")?, row.try_get("column_name")?)))
            .collect()
    }
}
