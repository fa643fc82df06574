//! Test support shared by the integration tests of the log store: a Raft type config, a tiny
//! in-memory state machine (openraft's storage suite and a real `Raft` need one; the real state
//! machines live elsewhere), and helpers to append and await durability.

#![allow(dead_code)]

use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use futures::StreamExt;
use openraft::EntryPayload;
use openraft::RaftSnapshotBuilder;
use openraft::StoredMembership;
use openraft::alias::LogIdOf;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::SnapshotOf;
use openraft::alias::StoredMembershipOf;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;
use openraft::type_config::TypeConfigExt;
use warren_cluster::LogStore;

openraft::declare_raft_types!(
    /// Raft types of the tests: string commands, the index they were applied at as response.
    pub TestConfig:
        D = String,
        R = u64,
);

/// Storage with a small journal: a new journal is written whole, and the tests create many.
pub fn storage_options() -> warren_cluster::StorageOptions {
    warren_cluster::StorageOptions {
        journal_bytes: 1 << 20,
    }
}

pub type Entry = openraft::alias::EntryOf<TestConfig>;
pub type LogId = LogIdOf<TestConfig>;

pub fn log_id(term: u64, index: u64) -> LogId {
    openraft::testing::log_id::<TestConfig>(term, 1, index)
}

pub fn blank(term: u64, index: u64) -> Entry {
    openraft::testing::blank_ent::<TestConfig>(term, 1, index)
}

pub fn normal(term: u64, index: u64, data: &str) -> Entry {
    Entry::new_normal(log_id(term, index), data.to_string())
}

/// Appends and returns a receiver that resolves once the flusher reports the entries durable.
pub async fn append_nowait(
    store: &mut LogStore<TestConfig>,
    entries: Vec<Entry>,
) -> tokio::sync::oneshot::Receiver<io::Result<()>> {
    let (tx, rx) = TestConfig::oneshot();
    store
        .append(entries, IOFlushed::signal(tx))
        .await
        .expect("append");
    rx
}

/// Appends and waits until the entries are durable.
pub async fn append(store: &mut LogStore<TestConfig>, entries: Vec<Entry>) {
    append_nowait(store, entries)
        .await
        .await
        .expect("callback dropped")
        .expect("fsync");
}

#[derive(Default)]
struct SmState {
    last_applied: Option<LogId>,
    membership: StoredMembershipOf<TestConfig>,
    applied: Vec<String>,
    snapshot: Option<(SnapshotMetaOf<TestConfig>, Vec<u8>)>,
}

/// An in-memory state machine: records applied commands and the Raft bookkeeping, snapshots
/// as postcard bytes. Clones share state.
#[derive(Clone, Default)]
pub struct MemStateMachine {
    state: Arc<Mutex<SmState>>,
}

type SnapshotBody = (Option<LogId>, StoredMembershipOf<TestConfig>, Vec<String>);

impl MemStateMachine {
    pub fn applied(&self) -> Vec<String> {
        self.state.lock().unwrap().applied.clone()
    }
}

impl RaftSnapshotBuilder<TestConfig> for MemStateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TestConfig, Vec<u8>>, io::Error> {
        let mut st = self.state.lock().unwrap();
        let body: SnapshotBody = (st.last_applied, st.membership.clone(), st.applied.clone());
        let data = warren_cluster::db::encode(&body)?;
        let meta = SnapshotMetaOf::<TestConfig> {
            last_log_id: st.last_applied,
            last_membership: st.membership.clone(),
        };
        st.snapshot = Some((meta.clone(), data.clone()));
        Ok(SnapshotOf::<TestConfig, Vec<u8>> {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<TestConfig> for MemStateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembershipOf<TestConfig>), io::Error> {
        let st = self.state.lock().unwrap();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: futures::Stream<Item = Result<EntryResponder<TestConfig>, io::Error>> + Unpin + Send,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let index = entry.index();
            {
                let mut st = self.state.lock().unwrap();
                st.last_applied = Some(entry.log_id());
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(cmd) => st.applied.push(cmd),
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m);
                    }
                }
            }
            if let Some(responder) = responder {
                responder.send(index);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TestConfig>,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let (last_applied, membership, applied): SnapshotBody =
            warren_cluster::db::decode(&snapshot)?;
        let mut st = self.state.lock().unwrap();
        st.last_applied = last_applied;
        st.membership = membership;
        st.applied = applied;
        st.snapshot = Some((meta.clone(), snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TestConfig, Vec<u8>>>, io::Error> {
        let st = self.state.lock().unwrap();
        Ok(st
            .snapshot
            .clone()
            .map(|(meta, snapshot)| SnapshotOf::<TestConfig, Vec<u8>> { meta, snapshot }))
    }
}
