//! The database of a store test: a SQLite file in a temp dir, or, with
//! `CRONIUM_TEST_DATABASE=postgres`, a fresh database on PostgreSQL: on the server named by
//! `CRONIUM_TEST_POSTGRES_URL` (`cargo xtask test`), else on a throwaway cluster
//! (`cronium_e2e::postgres`) that tests running at the same time share; it is stopped and removed
//! when the last of them drops its handle.

use std::sync::{Arc, Mutex, Weak};

use cronium_e2e::postgres::{PgCluster, SERVER_URL_VAR, create_database_on, postgres_selected};

use super::Store;

/// Keeps a test's database alive (the temp dir, or a share of the cluster).
pub(crate) enum TestDatabase {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] Option<Arc<PgCluster>>),
}

fn shared_cluster() -> Arc<PgCluster> {
    static CLUSTER: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());
    let mut slot = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(cluster) = slot.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(PgCluster::start().expect("a throwaway PostgreSQL cluster"));
    *slot = Arc::downgrade(&cluster);
    cluster
}

/// Opens a store on a new, empty database of the selected backend.
pub(crate) async fn open_test_store() -> (TestDatabase, Store) {
    if postgres_selected() {
        if let Ok(server) = std::env::var(SERVER_URL_VAR) {
            let url = create_database_on(&server).expect("a test database");
            let store = Store::open_postgres(&url).await.unwrap();
            return (TestDatabase::Postgres(None), store);
        }
        let cluster = tokio::task::spawn_blocking(shared_cluster)
            .await
            .expect("starting the cluster");
        let url = cluster.create_database().expect("a test database");
        let store = Store::open_postgres(&url).await.unwrap();
        (TestDatabase::Postgres(Some(cluster)), store)
    } else {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("test.db"))
            .await
            .unwrap();
        (TestDatabase::Sqlite(dir), store)
    }
}

/// Opens `count` stores on one new, empty database of the selected backend, as `count` control
/// planes sharing it (each store has its own writer task and connections).
pub(crate) async fn open_test_stores(count: usize) -> (TestDatabase, Vec<Store>) {
    let mut stores = Vec::with_capacity(count);
    if postgres_selected() {
        let (cluster, url) = if let Ok(server) = std::env::var(SERVER_URL_VAR) {
            (None, create_database_on(&server).expect("a test database"))
        } else {
            let cluster = tokio::task::spawn_blocking(shared_cluster)
                .await
                .expect("starting the cluster");
            let url = cluster.create_database().expect("a test database");
            (Some(cluster), url)
        };
        for _ in 0..count {
            stores.push(Store::open_postgres(&url).await.unwrap());
        }
        (TestDatabase::Postgres(cluster), stores)
    } else {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..count {
            stores.push(
                Store::open_sqlite(&dir.path().join("test.db"))
                    .await
                    .unwrap(),
            );
        }
        (TestDatabase::Sqlite(dir), stores)
    }
}
