//! A real one-member `Raft` group on `LogStore`: initialize, pipelined writes, restart from the
//! same database, and the group electing itself again and re-applying its committed log.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::MemStateMachine;
use common::TestConfig;
use openraft::BasicNode;
use openraft::Config;
use openraft::Raft;
use openraft::RaftNetworkFactory;
use openraft::RaftNetworkV2;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::impls::ProgressResponder;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use warren_cluster::Storage;

/// A one-member group never sends RPCs; if it ever tries, the peer is unreachable.
struct NoNetwork;

impl RaftNetworkFactory<TestConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoNetwork {
        NoNetwork
    }
}

fn unreachable() -> Unreachable<TestConfig> {
    Unreachable::from_string("single-member group has no peers")
}

impl RaftNetworkV2<TestConfig> for NoNetwork {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TestConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TestConfig>, RPCError<TestConfig>> {
        Err(unreachable().into())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TestConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TestConfig>, RPCError<TestConfig>> {
        Err(unreachable().into())
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<TestConfig>,
        _snapshot: SnapshotOf<TestConfig, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TestConfig>, StreamingError<TestConfig>> {
        Err(unreachable().into())
    }
}

/// Opens the database again after a `Raft` on it was shut down. `Raft::shutdown` returns before
/// every task it spawned has dropped its handle (the state-machine worker holds a log reader),
/// so the previous instance may hold RocksDB's lock for a moment.
async fn reopen(path: &Path) -> Storage {
    for _ in 0..100 {
        match Storage::open(path, &common::storage_options()) {
            Ok(storage) => return storage,
            Err(e) if e.to_string().contains("lock") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
    panic!("database still locked 5s after shutdown")
}

fn config(leader_restore: bool, tick: bool) -> Arc<Config> {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        enable_leader_restore: Some(leader_restore),
        enable_tick: tick,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

async fn start_with(
    storage: &Storage,
    sm: MemStateMachine,
    leader_restore: bool,
    tick: bool,
) -> Raft<TestConfig, MemStateMachine> {
    let store = storage.log_store::<TestConfig>(42);
    let config = config(leader_restore, tick);
    Raft::new(1, config, NoNetwork, store, sm).await.unwrap()
}

async fn start(
    storage: &Storage,
    sm: MemStateMachine,
    leader_restore: bool,
) -> Raft<TestConfig, MemStateMachine> {
    start_with(storage, sm, leader_restore, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_group_writes_restarts_and_reapplies() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Some(Duration::from_secs(10));

    let first_term;
    {
        let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
        let sm = MemStateMachine::default();
        let raft = start(&storage, sm.clone(), true).await;
        raft.initialize(BTreeMap::from([(1u64, BasicNode::default())]))
            .await
            .unwrap();
        let m = raft
            .wait(timeout)
            .current_leader(1, "elected")
            .await
            .unwrap();
        first_term = m.current_term;

        // Pipelined writes from one task: submit all, then collect the responses.
        let mut pending = Vec::new();
        for i in 0..50 {
            let (responder, rx) = ProgressResponder::complete_only();
            raft.client_write_ff(format!("c{i}"), Some(responder))
                .await
                .unwrap();
            pending.push(rx);
        }
        let mut last = 0;
        for rx in pending {
            let resp = rx.await.unwrap().unwrap();
            assert!(
                resp.log_id.index > last,
                "responses come back in submission order"
            );
            assert_eq!(
                resp.data, resp.log_id.index,
                "the state machine answers its apply index"
            );
            last = resp.log_id.index;
        }
        let resp = raft.client_write("last".to_string()).await.unwrap();
        assert_eq!(resp.log_id.index, last + 1);
        assert_eq!(sm.applied().len(), 51);

        // Lets openraft persist the committed id it has.
        raft.wait(timeout)
            .applied_index_at_least(Some(last + 1), "applied")
            .await
            .unwrap();
        raft.shutdown().await.unwrap();
        drop(raft);
        assert!(storage.flush_stats().fsyncs > 0);
    }

    // Restart with an empty in-memory state machine: the log store's saved `committed` makes
    // openraft re-apply the log on startup. With leader restore (openraft's default) the
    // committed vote of the last leader is taken up again at once, in the same term.
    let second_term;
    {
        let storage = reopen(dir.path()).await;
        let sm = MemStateMachine::default();
        let raft = start(&storage, sm.clone(), true).await;
        let m = raft
            .wait(timeout)
            .current_leader(1, "restored")
            .await
            .unwrap();
        assert_eq!(
            m.current_term, first_term,
            "leadership restored without an election"
        );
        raft.wait(timeout)
            .applied_index_at_least(Some(52), "re-applied")
            .await
            .unwrap();
        let applied = sm.applied();
        assert_eq!(applied.len(), 51);
        assert_eq!(applied[0], "c0");
        assert_eq!(applied[50], "last");
        let resp = raft
            .client_write("after-restart".to_string())
            .await
            .unwrap();
        assert_eq!(resp.log_id.index, 53);
        second_term = m.current_term;
        raft.shutdown().await.unwrap();
    }

    // Without leader restore, the single voter elects itself in a new term.
    let storage = reopen(dir.path()).await;
    let sm = MemStateMachine::default();
    let raft = start(&storage, sm.clone(), false).await;
    let m = raft
        .wait(timeout)
        .current_leader(1, "re-elected")
        .await
        .unwrap();
    assert!(m.current_term > second_term, "a new term after an election");
    raft.wait(timeout)
        .applied_index_at_least(Some(53), "re-applied")
        .await
        .unwrap();
    assert_eq!(sm.applied().len(), 52);
    raft.shutdown().await.unwrap();
}

/// Hundreds of one-member groups need not tick: `initialize` elects at once, leader restore
/// brings leadership back after a restart, and without it `trigger().elect()` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_group_works_without_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Some(Duration::from_secs(10));
    {
        let storage = Storage::open(dir.path(), &common::storage_options()).unwrap();
        let raft = start_with(&storage, MemStateMachine::default(), true, false).await;
        raft.initialize(BTreeMap::from([(1u64, BasicNode::default())]))
            .await
            .unwrap();
        raft.wait(timeout)
            .current_leader(1, "elected")
            .await
            .unwrap();
        raft.client_write("a".to_string()).await.unwrap();
        raft.shutdown().await.unwrap();
    }
    {
        let storage = reopen(dir.path()).await;
        let raft = start_with(&storage, MemStateMachine::default(), true, false).await;
        raft.wait(timeout)
            .current_leader(1, "restored")
            .await
            .unwrap();
        raft.client_write("b".to_string()).await.unwrap();
        raft.shutdown().await.unwrap();
    }
    let storage = reopen(dir.path()).await;
    let sm = MemStateMachine::default();
    let raft = start_with(&storage, sm.clone(), false, false).await;
    let short = Some(Duration::from_millis(600));
    assert!(
        raft.wait(short)
            .current_leader(1, "no tick, no election")
            .await
            .is_err(),
        "without ticks and leader restore nobody starts an election"
    );
    raft.trigger().elect(false).await.unwrap();
    raft.wait(timeout)
        .current_leader(1, "elected on demand")
        .await
        .unwrap();
    raft.client_write("c".to_string()).await.unwrap();
    assert_eq!(sm.applied(), vec!["a", "b", "c"]);
    raft.shutdown().await.unwrap();
}
