//! openraft's own storage test suite, run against `LogStore` (with the in-memory test state
//! machine for the state-machine half).
//!
//! Two builders: a fresh database per test case, and one database shared by every case with a
//! new group per case — the second shows that groups sharing a database do not see each other.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use common::MemStateMachine;
use common::TestConfig;
use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use tempfile::TempDir;
use warren_cluster::LogStore;
use warren_cluster::Storage;

/// A new database in a new temporary directory for each case; the directory is the guard.
struct FreshDb;

impl StoreBuilder<TestConfig, LogStore<TestConfig>, MemStateMachine, TempDir> for FreshDb {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<TestConfig>, MemStateMachine), StorageError<TestConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path(), &common::storage_options()).expect("open storage");
        Ok((dir, storage.log_store(7), MemStateMachine::default()))
    }
}

/// One database for all cases, a new group for each.
struct SharedDb {
    storage: Storage,
    next_group: Arc<AtomicU64>,
}

impl StoreBuilder<TestConfig, LogStore<TestConfig>, MemStateMachine> for SharedDb {
    async fn build(
        &self,
    ) -> Result<((), LogStore<TestConfig>, MemStateMachine), StorageError<TestConfig>> {
        let group = self.next_group.fetch_add(1, Ordering::Relaxed);
        Ok((
            (),
            self.storage.log_store(group),
            MemStateMachine::default(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_fresh_db_per_case() {
    Suite::test_all(FreshDb)
        .await
        .expect("openraft storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_groups_sharing_one_db() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
    // Start near the top of the id space so that the last group's key bounds are exercised.
    let builder = SharedDb {
        storage: storage.clone(),
        next_group: Arc::new(AtomicU64::new(u64::MAX - 60)),
    };
    // Noise in neighbouring groups, below and above the ones the suite uses.
    for group in [0, u64::MAX - 61] {
        let mut store = storage.log_store::<TestConfig>(group);
        common::append(&mut store, (0..20).map(|i| common::blank(9, i)).collect()).await;
    }
    Suite::test_all(builder)
        .await
        .expect("openraft storage suite");
    let stats = storage.flush_stats();
    assert!(
        stats.fsyncs > 0 && stats.callbacks_completed >= stats.fsyncs,
        "{stats:?}"
    );
}
