//! Behaviour of `LogStore` beyond openraft's suite: restarts, group isolation, truncate and
//! purge edge cases, group commit across groups, closing.

mod common;

use std::time::Duration;

use common::TestConfig;
use common::append;
use common::append_nowait;
use common::blank;
use common::log_id;
use common::normal;
use openraft::LogState;
use openraft::RaftLogReader;
use openraft::alias::VoteOf;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use warren_cluster::LogStore;
use warren_cluster::Storage;

fn vote(term: u64, node: u64, committed: bool) -> VoteOf<TestConfig> {
    if committed {
        VoteOf::<TestConfig>::new_committed(term, node)
    } else {
        VoteOf::<TestConfig>::new(term, node)
    }
}

async fn indexes(store: &mut LogStore<TestConfig>) -> Vec<u64> {
    store
        .try_get_log_entries(..)
        .await
        .unwrap()
        .iter()
        .map(|e| e.index())
        .collect()
}

#[tokio::test]
async fn restart_keeps_vote_committed_entries_and_purge_point() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
        let mut store = storage.log_store::<TestConfig>(3);
        store.save_vote(&vote(2, 1, true)).await.unwrap();
        append(
            &mut store,
            (1..=10).map(|i| normal(2, i, &format!("m{i}"))).collect(),
        )
        .await;
        store.save_committed(Some(log_id(2, 8))).await.unwrap();
        store.purge(log_id(2, 4)).await.unwrap();
        store.truncate_after(Some(log_id(2, 9))).await.unwrap();
        // Make the last unsynced writes (committed, purge, truncate) durable the way the next
        // append would.
        storage.sync().await.unwrap();
        storage.close();
    }
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let mut store = storage.log_store::<TestConfig>(3);
    assert_eq!(store.read_vote().await.unwrap(), Some(vote(2, 1, true)));
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(2, 8)));
    assert_eq!(
        store.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(2, 4)),
            last_log_id: Some(log_id(2, 9)),
        }
    );
    let entries = store.try_get_log_entries(..).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.index()).collect::<Vec<_>>(),
        (5..=9).collect::<Vec<_>>()
    );
    assert_eq!(entries[0], normal(2, 5, "m5"));
}

#[tokio::test]
async fn restart_after_purging_everything_reports_the_purge_point_as_last() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
        let mut store = storage.log_store::<TestConfig>(1);
        append(&mut store, (0..5).map(|i| blank(1, i)).collect()).await;
        store.purge(log_id(1, 4)).await.unwrap();
        storage.sync().await.unwrap();
    }
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let mut store = storage.log_store::<TestConfig>(1);
    let want = LogState {
        last_purged_log_id: Some(log_id(1, 4)),
        last_log_id: Some(log_id(1, 4)),
    };
    assert_eq!(store.get_log_state().await.unwrap(), want);
    assert!(store.try_get_log_entries(..).await.unwrap().is_empty());
    // The log goes on after the purge point.
    append(&mut store, vec![blank(2, 5)]).await;
    assert_eq!(
        store.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2, 5))
    );
}

#[tokio::test]
async fn groups_do_not_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let groups = [0, 1, 2, u64::MAX - 1, u64::MAX];
    for &g in &groups {
        let mut store = storage.log_store::<TestConfig>(g);
        // Same indexes in every group, told apart by their payload.
        append(
            &mut store,
            (1..=5)
                .map(|i| normal(1, i, &format!("g{g}-{i}")))
                .collect(),
        )
        .await;
        store.save_vote(&vote(g % 7 + 1, 1, false)).await.unwrap();
    }

    let mut one = storage.log_store::<TestConfig>(1);
    one.truncate_after(Some(log_id(1, 2))).await.unwrap();
    one.purge(log_id(1, 1)).await.unwrap();
    let mut last = storage.log_store::<TestConfig>(u64::MAX);
    last.truncate_after(None).await.unwrap();

    for &g in &groups {
        let mut store = storage.log_store::<TestConfig>(g);
        let entries = store.try_get_log_entries(..).await.unwrap();
        let want: Vec<_> = match g {
            1 => vec![normal(1, 2, "g1-2")],
            u64::MAX => vec![],
            _ => (1..=5)
                .map(|i| normal(1, i, &format!("g{g}-{i}")))
                .collect(),
        };
        assert_eq!(entries, want, "group {g}");
        assert_eq!(
            store.read_vote().await.unwrap(),
            Some(vote(g % 7 + 1, 1, false)),
            "group {g}"
        );
        let st = store.get_log_state().await.unwrap();
        let want_purged = (g == 1).then(|| log_id(1, 1));
        assert_eq!(st.last_purged_log_id, want_purged, "group {g}");
    }
    // A group never written to is empty even with neighbours on both sides.
    let mut empty = storage.log_store::<TestConfig>(5);
    assert_eq!(empty.get_log_state().await.unwrap(), LogState::default());
    assert_eq!(empty.read_vote().await.unwrap(), None);
}

#[tokio::test]
async fn truncate_and_purge_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let mut store = storage.log_store::<TestConfig>(9);
    append(&mut store, (1..=10).map(|i| blank(1, i)).collect()).await;

    // Truncating after the last entry, or far beyond, removes nothing.
    store.truncate_after(Some(log_id(1, 10))).await.unwrap();
    store
        .truncate_after(Some(log_id(1, u64::MAX)))
        .await
        .unwrap();
    assert_eq!(indexes(&mut store).await, (1..=10).collect::<Vec<_>>());

    // A conflicting suffix is replaced by a new leader's entries.
    store.truncate_after(Some(log_id(1, 6))).await.unwrap();
    append(&mut store, vec![blank(3, 7), blank(3, 8)]).await;
    assert_eq!(
        store.get_log_state().await.unwrap().last_log_id,
        Some(log_id(3, 8))
    );
    assert_eq!(
        store.try_get_log_entries(6..=7).await.unwrap(),
        vec![blank(1, 6), blank(3, 7)]
    );

    // Range reads of every shape.
    assert_eq!(store.try_get_log_entries(3..3).await.unwrap(), vec![]);
    assert_eq!(
        store.try_get_log_entries(8..100).await.unwrap(),
        vec![blank(3, 8)]
    );
    assert_eq!(store.try_get_log_entries(9..).await.unwrap(), vec![]);
    assert_eq!(indexes(&mut store).await.len(), 8);

    // Purging is idempotent, and purging to the last entry empties the log but keeps its id.
    store.purge(log_id(1, 3)).await.unwrap();
    store.purge(log_id(1, 3)).await.unwrap();
    assert_eq!(indexes(&mut store).await, vec![4, 5, 6, 7, 8]);
    store.purge(log_id(3, 8)).await.unwrap();
    assert_eq!(
        store.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(3, 8)),
            last_log_id: Some(log_id(3, 8)),
        }
    );

    // Truncating everything after a purge leaves the purge point as the last log id.
    append(&mut store, vec![blank(3, 9)]).await;
    store.truncate_after(None).await.unwrap();
    assert_eq!(
        store.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(3, 8)),
            last_log_id: Some(log_id(3, 8)),
        }
    );

    // Committed can be cleared again.
    store.save_committed(Some(log_id(3, 8))).await.unwrap();
    store.save_committed(None).await.unwrap();
    assert_eq!(store.read_committed().await.unwrap(), None);

    // destroy() forgets the group entirely.
    append(&mut store, vec![blank(3, 9)]).await;
    store.save_vote(&vote(3, 1, true)).await.unwrap();
    store.destroy().unwrap();
    assert_eq!(store.get_log_state().await.unwrap(), LogState::default());
    assert_eq!(store.read_vote().await.unwrap(), None);
}

#[tokio::test]
async fn limited_reads_stop_at_the_byte_budget_but_never_return_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let mut store = storage.log_store::<TestConfig>(4);
    let big = "x".repeat(300 * 1024);
    append(&mut store, (1..=8).map(|i| normal(1, i, &big)).collect()).await;
    let got = store.limited_get_log_entries(1, 9).await.unwrap();
    // 300 KiB each against a 1 MiB budget: the fourth entry crosses it and is the last.
    assert_eq!(
        got.iter().map(|e| e.index()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let huge = "y".repeat(2 << 20);
    append(&mut store, vec![normal(1, 9, &huge)]).await;
    assert_eq!(store.limited_get_log_entries(9, 10).await.unwrap().len(), 1);
}

/// Appends issued by many groups at once, the way openraft issues them (without waiting for
/// the previous flush), share fsyncs: far fewer fsyncs than appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_many_groups_share_fsyncs() {
    const GROUPS: u64 = 8;
    const PER_GROUP: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let before = storage.flush_stats();

    let mut tasks = Vec::new();
    for g in 0..GROUPS {
        let mut store = storage.log_store::<TestConfig>(g);
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for i in 1..=PER_GROUP {
                pending
                    .push(append_nowait(&mut store, vec![normal(1, i, &format!("{g}/{i}"))]).await);
            }
            for rx in pending {
                rx.await.expect("callback dropped").expect("fsync");
            }
            store
        }));
    }
    for t in tasks {
        let mut store = t.await.unwrap();
        assert_eq!(
            indexes(&mut store).await,
            (1..=PER_GROUP).collect::<Vec<_>>()
        );
    }

    let stats = storage.flush_stats();
    let appends = GROUPS * PER_GROUP;
    let fsyncs = stats.fsyncs - before.fsyncs;
    eprintln!("{appends} appends from {GROUPS} groups: {fsyncs} fsyncs, {stats:?}");
    assert_eq!(
        stats.callbacks_completed - before.callbacks_completed,
        appends
    );
    assert!(fsyncs < appends, "{fsyncs} fsyncs for {appends} appends");
    assert!(stats.largest_batch > 1, "{stats:?}");
    assert_eq!(stats.fsync_errors, 0);
}

#[tokio::test]
async fn close_drains_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let mut store = storage.log_store::<TestConfig>(1);
    let rx = append_nowait(&mut store, vec![blank(1, 1)]).await;
    storage.close();
    // Queued before close: completed, successfully.
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // After close: writes that need durability fail, and say so through the callback too.
    let (tx, rx) = <TestConfig as openraft::type_config::TypeConfigExt>::oneshot();
    assert!(
        store
            .append(vec![blank(1, 2)], IOFlushed::signal(tx))
            .await
            .is_err()
    );
    assert!(rx.await.unwrap().is_err());
    assert!(store.save_vote(&vote(1, 1, false)).await.is_err());
    assert!(storage.sync().await.is_err());
    assert!(store.purge(log_id(1, 1)).await.is_err());
    assert!(store.truncate_after(None).await.is_err());
    assert!(store.save_committed(Some(log_id(1, 1))).await.is_err());
    // Nothing was written by the refused append; reads still work.
    assert_eq!(
        store.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 1))
    );
    storage.close();
}

#[tokio::test]
async fn a_reader_taken_before_appends_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    let mut store = storage.log_store::<TestConfig>(1);
    let mut reader = store.get_log_reader().await;
    // Readable as soon as append returns, before the flush callback has fired.
    storage.flush_stats();
    let rx = append_nowait(&mut store, vec![blank(1, 1), blank(1, 2)]).await;
    assert_eq!(reader.try_get_log_entries(..).await.unwrap().len(), 2);
    rx.await.unwrap().unwrap();
}
