//! `cronium backup --out FILE`: an online, consistent copy of the database (also while the
//! control plane runs). `ENCRYPTION_KEY` and the CA in the data dir are not in it: they are
//! backed up separately (see the README's "Backup").

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::DataArgs;
use crate::database_path;

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Where the copy goes; must not exist yet (created with mode 0600).
    #[arg(long)]
    out: PathBuf,
}

pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    if let Some(url) = args.data.database_url.as_deref()
        && crate::is_postgres_url(url)
    {
        anyhow::bail!(
            "cronium backup copies the SQLite database; on PostgreSQL back up with the server's own tools (pg_dump, or a base backup), see the README's \"PostgreSQL\""
        );
    }
    let database = database_path(&args.data.data_dir, args.data.database_url.as_deref())?;
    if args.out.exists() {
        anyhow::bail!(
            "{} exists already; choose a new file name",
            args.out.display()
        );
    }
    crate::store::backup::backup_sqlite(&database, &args.out)
        .await
        .with_context(|| {
            format!(
                "backing up {} to {}",
                database.display(),
                args.out.display()
            )
        })?;
    let size = std::fs::metadata(&args.out)
        .map(|meta| meta.len())
        .unwrap_or(0);
    println!(
        "backed up {} to {} ({size} bytes, integrity checked)",
        database.display(),
        args.out.display()
    );
    println!(
        "not in it: ENCRYPTION_KEY (without it the sealed secrets cannot be opened) and the CA \
         (ca.pem, ca-key.pem in the data dir); back them up separately"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::users::Role;

    /// A backup taken while the store is open and writing holds what was committed, passes its
    /// integrity check, and opens with every migration applied; an existing file is never
    /// overwritten.
    #[tokio::test]
    async fn an_online_backup_is_a_consistent_private_copy() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("cronium.db");
        let store = crate::store::Store::open_sqlite(&database).await.unwrap();
        store
            .create_user("kept", "hash", Role::Viewer)
            .await
            .unwrap();
        let out = dir.path().join("backup.db");
        let args = BackupArgs {
            data: DataArgs {
                data_dir: dir.path().to_path_buf(),
                database_url: None,
            },
            out: out.clone(),
        };
        run(args).await.unwrap();
        // Written after the backup: not in it.
        store
            .create_user("later", "hash", Role::Viewer)
            .await
            .unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let copy = crate::store::Store::open_sqlite(&out).await.unwrap();
        assert!(copy.user_with_password("kept").await.unwrap().is_some());
        assert!(copy.user_with_password("later").await.unwrap().is_none());
        copy.close().await;

        let again = BackupArgs {
            data: DataArgs {
                data_dir: dir.path().to_path_buf(),
                database_url: None,
            },
            out: out.clone(),
        };
        let error = run(again).await.unwrap_err();
        assert!(error.to_string().contains("exists already"), "{error}");
        let missing = crate::store::backup::backup_sqlite(
            &dir.path().join("nothing.db"),
            &dir.path().join("never.db"),
        )
        .await;
        assert!(missing.is_err());
        assert!(!dir.path().join("never.db").exists());
        store.close().await;
    }
}
