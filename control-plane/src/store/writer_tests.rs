//! The writer task's group commit: an acknowledged write is on disk, whatever the other
//! operations of its group did.

use tokio::sync::oneshot;

use super::test_db::open_test_store;
use super::{Store, StoreResult, audit_in, write_op};

/// Holds the writer with an operation that waits: whatever is written until `release` is sent
/// waits behind it, and is taken in the writer's next group. The task ends with the holder.
pub(super) async fn hold_writer(
    store: &Store,
) -> (
    tokio::task::JoinHandle<StoreResult<()>>,
    oneshot::Sender<()>,
) {
    let (held, hold) = oneshot::channel::<()>();
    let (release, released) = oneshot::channel::<()>();
    let holder = {
        let store = store.clone();
        tokio::spawn(async move {
            write_op!(store, |_conn| async {
                let _ = held.send(());
                let _ = released.await;
                StoreResult::Ok(())
            })
            .await
        })
    };
    hold.await.unwrap();
    (holder, release)
}

#[tokio::test]
async fn an_operation_that_swallows_a_failed_statement_never_costs_another_its_acknowledged_write()
{
    let (_db, store) = open_test_store().await;
    // Hold the writer so that the next two operations are taken as one group.
    let (holder, release) = hold_writer(&store).await;
    let first = write_op!(store, |conn| async {
        audit_in(conn, "writer_test_kept", None, serde_json::json!({})).await
    });
    let second = write_op!(store, |conn| async {
        // A statement that fails (a missing table), its error answered as a value. On
        // PostgreSQL this spoils the transaction until it is rolled back.
        let failed = sqlx::query("INSERT INTO no_such_table (x) VALUES (1)")
            .execute(&mut *conn)
            .await
            .is_err();
        StoreResult::Ok(failed)
    });
    tokio::pin!(first, second);
    // A write is sent to the writer at its first poll: both wait behind the holder, so the
    // writer takes them as one group once it is let go.
    assert!(futures_util::poll!(first.as_mut()).is_pending());
    assert!(futures_util::poll!(second.as_mut()).is_pending());
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    let (first, second) = tokio::join!(first, second);
    if let Ok(failed) = second {
        assert!(failed, "the statement was meant to fail");
    }
    let kept = store.count_audit("writer_test_kept").await.unwrap();
    match first {
        Ok(()) => assert_eq!(kept, 1, "an acknowledged write is missing"),
        Err(_) => assert_eq!(kept, 0, "a write answered failed is stored"),
    }
}
