//! An online backup of the SQLite database: `VACUUM INTO` on a read-only connection of its own,
//! so the running control plane keeps reading and writing meanwhile (WAL mode) and the copy is
//! one consistent snapshot, compacted, without the WAL.

use std::path::Path;
use std::time::Duration;

use sqlx::ConnectOptions as _;
use sqlx::Connection as _;
use sqlx::sqlite::SqliteConnectOptions;

use super::{StoreError, StoreResult};

/// Writes a consistent copy of the database at `database` to `out`, which must not exist yet
/// (it is created with mode 0600: the copy holds password hashes and sealed secrets), then
/// checks the copy with `PRAGMA integrity_check`. A failed backup removes what it wrote.
pub async fn backup_sqlite(database: &Path, out: &Path) -> StoreResult<()> {
    if !database.is_file() {
        return Err(StoreError::NotFound);
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        // `VACUUM INTO` accepts an empty file: create it first, private and refusing to
        // overwrite anything.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|error| StoreError::Database(sqlx::Error::Io(error)))?;
    }
    let result = copy(database, out).await;
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

async fn copy(database: &Path, out: &Path) -> StoreResult<()> {
    let mut source = SqliteConnectOptions::new()
        .filename(database)
        .read_only(true)
        .busy_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let target = out
        .to_str()
        .ok_or_else(|| StoreError::Corrupt(format!("{} is not UTF-8", out.display())))?;
    sqlx::query("VACUUM INTO ?")
        .bind(target)
        .execute(&mut source)
        .await?;
    source.close().await?;
    let mut copy = SqliteConnectOptions::new()
        .filename(out)
        .read_only(true)
        .connect()
        .await?;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await?;
    copy.close().await?;
    if check != "ok" {
        return Err(StoreError::Corrupt(format!(
            "the backup failed its integrity check: {check}"
        )));
    }
    Ok(())
}
