//! A Warren node's replication runtime: opens storage, runs the metadata Raft group and one
//! Raft group per replicated queue, and keeps a registry of queue handles in step with the
//! metadata.
//!
//! The server crate talks to `Node` only: metadata reads (`meta`), metadata writes
//! (`meta_write`), queue lookups (`queue`) and shutdown. Each node start is a new "run" with a
//! higher incarnation number, persisted before anything else, so commands can tell state left
//! by earlier runs (consumers, exclusive and transient queues) and clean it up.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use warren_core::ids::{METADATA_GROUP, NodeId, NodeRun};
use warren_core::meta::{MetaCmd, MetaEffect, MetaReply, MetaState, Placement, QueueDef};
use warren_core::queue::QueueCmd;
use warren_core::{ConnectionRef, GroupId};

use crate::db::keys;
use crate::db::{CF_META, DbError, Storage};
use crate::meta_sm::{MetaEffects, MetaMachine};
use crate::network::NoPeers;
use crate::queue::{Backend, ClusterError, QueueHandle, Submission, UnusedHook};
use crate::queue_sm::{QueueMachine, destroy_state};
use crate::types::{GroupRequest, GroupResponse, Raft};

/// Keys in the `meta` column family that belong to the node, not to a group.
const NODE_KEYS: GroupId = u64::MAX;
/// Commands one proposer hands to Raft at once; more wait for the next batch.
const PROPOSE_BATCH: usize = 1024;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Log entries between snapshots of a group.
    pub snapshot_every: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage: {0}")]
    Storage(#[from] DbError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Config(String),
}

pub struct Node {
    id: NodeId,
    run: NodeRun,
    storage: Storage,
    meta_state: Arc<RwLock<MetaState>>,
    meta_raft: Raft<MetaMachine>,
    registry: Arc<Registry>,
}

/// Queue handles of this node and the Raft groups behind the replicated ones.
struct Registry {
    node_id: NodeId,
    run: NodeRun,
    storage: Storage,
    raft_config: Arc<openraft::Config>,
    queues: RwLock<HashMap<(String, String), Arc<QueueHandle>>>,
    groups: Mutex<HashMap<GroupId, GroupRunner>>,
    /// Auto-delete requests, executed by a task that owns a weak reference to the node.
    unused_tx: mpsc::UnboundedSender<(String, String, Option<ConnectionRef>)>,
}

struct GroupRunner {
    stop: oneshot::Sender<bool>,
    task: JoinHandle<()>,
}

fn raft_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Raft(e.to_string())
}

impl Registry {
    fn unused_hook(&self) -> UnusedHook {
        let tx = self.unused_tx.clone();
        Arc::new(move |h: &QueueHandle| {
            let _ = tx.send((
                h.vhost().to_owned(),
                h.name().to_owned(),
                h.def().exclusive_owner,
            ));
        })
    }

    fn create(&self, vhost: &str, def: &QueueDef) {
        let key = (vhost.to_owned(), def.name.clone());
        if self
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key)
        {
            return;
        }
        let hook = def.auto_delete.then(|| self.unused_hook());
        let handle = match &def.placement {
            Placement::Local { run } if *run == self.run => {
                QueueHandle::new_local(vhost.to_owned(), def.clone(), hook)
            }
            Placement::Replicated { group, replicas } if replicas.contains(&self.node_id) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let handle =
                    QueueHandle::new(vhost.to_owned(), def.clone(), Backend::Raft { tx }, hook);
                let (stop_tx, stop_rx) = oneshot::channel();
                let task = tokio::spawn(run_queue_group(
                    *group,
                    handle.clone(),
                    rx,
                    stop_rx,
                    self.storage.clone(),
                    self.raft_config.clone(),
                    self.node_id,
                    replicas.clone(),
                ));
                self.groups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        *group,
                        GroupRunner {
                            stop: stop_tx,
                            task,
                        },
                    );
                handle
            }
            // Held by another node (or an earlier run of this one, about to be cleaned up).
            _ => return,
        };
        self.queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, handle);
    }

    fn remove(&self, vhost: &str, def: &QueueDef) {
        let handle = self
            .queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(vhost.to_owned(), def.name.clone()));
        if let Some(handle) = handle {
            handle.close();
        }
        if let Some(group) = def.group()
            && let Some(runner) = self
                .groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&group)
        {
            // `true`: the queue is gone for good, so its group deletes its storage.
            let _ = runner.stop.send(true);
        }
    }
}

impl MetaEffects for Registry {
    fn on_effect(&self, effect: MetaEffect) {
        match effect {
            MetaEffect::QueueCreated { vhost, queue } => self.create(&vhost, &queue),
            MetaEffect::QueueDeleted { vhost, queue } => self.remove(&vhost, &queue),
        }
    }

    fn reset(&self, state: &MetaState) {
        let wanted: HashMap<(String, String), QueueDef> = state
            .queues()
            .map(|(v, q)| ((v.to_owned(), q.name.clone()), q.clone()))
            .collect();
        let stale: Vec<(String, QueueDef)> = self
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(k, _)| !wanted.contains_key(*k))
            .map(|((v, _), h)| (v.clone(), h.def().clone()))
            .collect();
        for (vhost, def) in stale {
            self.remove(&vhost, &def);
        }
        for ((vhost, _), def) in wanted {
            self.create(&vhost, &def);
        }
    }
}

fn raft_config(cfg: &NodeConfig) -> Result<Arc<openraft::Config>, NodeError> {
    let config = openraft::Config {
        cluster_name: "warren".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_min_ms,
        election_timeout_max: cfg.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: 256,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| NodeError::Config(e.to_string()))
}

/// Makes a group serve: initializes a new one with its members, and has this node elect
/// itself at once when it is the only voter (no need to wait out an election timeout).
async fn ensure_leader<SM>(
    raft: &Raft<SM>,
    node_id: NodeId,
    members: &[NodeId],
    timeout: Duration,
) -> Result<(), NodeError>
where
    SM: openraft::storage::RaftStateMachine<crate::types::TypeConfig>,
{
    if !raft.is_initialized().await.map_err(raft_err)? {
        let members: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|id| (*id, BasicNode::default()))
            .collect();
        if let Err(e) = raft.initialize(members).await {
            debug!(error = %e, "initialize refused; the group already has a log");
        }
    }
    if members == [node_id] {
        let state = raft.metrics().borrow_watched().state;
        if state != ServerState::Leader {
            raft.trigger().elect(false).await.map_err(raft_err)?;
        }
        raft.wait(Some(timeout))
            .state(ServerState::Leader, "single-member group elects itself")
            .await
            .map_err(raft_err)?;
    }
    Ok(())
}

/// Keeps `handle`'s leader flag equal to "this node leads the group".
fn watch_leadership<SM>(
    raft: &Raft<SM>,
    handle: Weak<QueueHandle>,
    node_id: NodeId,
) -> JoinHandle<()>
where
    SM: openraft::storage::RaftStateMachine<crate::types::TypeConfig>,
{
    let mut metrics = raft.metrics();
    tokio::spawn(async move {
        loop {
            let leading = {
                let m = metrics.borrow_watched();
                m.state == ServerState::Leader && m.current_leader == Some(node_id)
            };
            match handle.upgrade() {
                Some(h) => h.set_leader(leading),
                None => return,
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_queue_group(
    group: GroupId,
    handle: Arc<QueueHandle>,
    mut rx: mpsc::UnboundedReceiver<Submission>,
    mut stop: oneshot::Receiver<bool>,
    storage: Storage,
    config: Arc<openraft::Config>,
    node_id: NodeId,
    members: Vec<NodeId>,
) {
    let fail_all = |rx: &mut mpsc::UnboundedReceiver<Submission>, e: ClusterError| {
        rx.close();
        while let Ok((_, reply)) = rx.try_recv() {
            reply.send(Err(e.clone()));
        }
    };
    let machine = match QueueMachine::open(storage.clone(), group, &handle) {
        Ok(m) => m,
        Err(e) => {
            error!(group, queue = handle.name(), error = %e, "cannot open queue state");
            fail_all(&mut rx, ClusterError::Storage(e.to_string()));
            return;
        }
    };
    let raft = match Raft::new(
        node_id,
        config.clone(),
        NoPeers,
        storage.log_store(group),
        machine,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            error!(group, queue = handle.name(), error = %e, "cannot start queue group");
            fail_all(&mut rx, ClusterError::Raft(e.to_string()));
            return;
        }
    };
    let election_wait = Duration::from_millis(config.election_timeout_max * 4);
    if let Err(e) = ensure_leader(&raft, node_id, &members, election_wait).await {
        warn!(group, queue = handle.name(), error = %e, "queue group has no leader yet");
    }
    let watcher = watch_leadership(&raft, Arc::downgrade(&handle), node_id);
    drop(handle);

    let destroy = loop {
        let first = tokio::select! {
            biased;
            destroy = &mut stop => break destroy.unwrap_or(false),
            next = rx.recv() => match next {
                Some(s) => s,
                None => break false,
            },
        };
        let mut requests = Vec::with_capacity(16);
        let mut replies = Vec::with_capacity(16);
        let (req, reply) = first;
        requests.push(GroupRequest::Queue(req));
        replies.push(reply);
        while requests.len() < PROPOSE_BATCH {
            match rx.try_recv() {
                Ok((req, reply)) => {
                    requests.push(GroupRequest::Queue(req));
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        match raft.client_write_many(requests).await {
            Ok(mut results) => {
                // Results arrive in submission order; waiting for them on a task lets the
                // next batch be proposed while this one commits.
                tokio::spawn(async move {
                    let mut replies = replies.into_iter();
                    while let Some(result) = results.next().await {
                        let Some(reply) = replies.next() else { break };
                        reply.send(match result {
                            Ok(Ok(resp)) => match resp.response {
                                GroupResponse::Queue(outcome) => Ok(outcome),
                                other => Err(ClusterError::Raft(format!(
                                    "unexpected response {other:?}"
                                ))),
                            },
                            Ok(Err(e)) => Err(ClusterError::Raft(e.to_string())),
                            Err(e) => Err(ClusterError::Raft(e.to_string())),
                        });
                    }
                    for reply in replies {
                        reply.send(Err(ClusterError::Raft("write was not answered".into())));
                    }
                });
            }
            Err(e) => {
                for reply in replies {
                    reply.send(Err(ClusterError::Raft(e.to_string())));
                }
                fail_all(&mut rx, ClusterError::Raft(e.to_string()));
                break false;
            }
        }
    };
    fail_all(&mut rx, ClusterError::ShuttingDown);
    if let Err(e) = raft.shutdown().await {
        warn!(group, error = %e, "queue group did not shut down cleanly");
    }
    watcher.abort();
    if destroy {
        drop(raft);
        let log = storage.log_store::<crate::types::TypeConfig>(group);
        if let Err(e) = log.destroy().and_then(|_| destroy_state(&storage, group)) {
            warn!(group, error = %e, "could not delete the storage of a deleted queue");
        }
    }
}

/// Reads and bumps the node's incarnation, refusing a data directory of another node.
fn next_run(storage: &Storage, node_id: NodeId) -> Result<NodeRun, NodeError> {
    let db = storage.db();
    let cf = storage.cf(CF_META);
    let id_key = keys::group_key(NODE_KEYS, b"node_id");
    let inc_key = keys::group_key(NODE_KEYS, b"incarnation");
    let read_u64 = |key: &[u8]| -> Result<Option<u64>, NodeError> {
        match db
            .get_cf(cf, key)
            .map_err(|e| NodeError::Storage(DbError::from(e)))?
        {
            Some(v) => {
                let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                    NodeError::Config("corrupt node record in the data directory".into())
                })?;
                Ok(Some(u64::from_be_bytes(bytes)))
            }
            None => Ok(None),
        }
    };
    if let Some(stored) = read_u64(&id_key)?
        && stored != node_id
    {
        return Err(NodeError::Config(format!(
            "node_id: the data directory belongs to node {stored}, not node {node_id}"
        )));
    }
    let incarnation = read_u64(&inc_key)?.unwrap_or(0) + 1;
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf, &id_key, node_id.to_be_bytes());
    batch.put_cf(cf, &inc_key, incarnation.to_be_bytes());
    db.write_opt(batch, &opts)
        .map_err(|e| NodeError::Storage(DbError::from(e)))?;
    Ok(NodeRun {
        node: node_id,
        incarnation,
    })
}

impl Node {
    /// Opens the node's storage and brings every group it holds back to serving: the
    /// metadata group first (its replay recreates the queue handles), then each queue group,
    /// which is told about the new run so deliveries of the previous run come back.
    pub async fn open(cfg: NodeConfig) -> Result<Arc<Node>, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            NodeError::Config(format!(
                "data_dir: cannot create {}: {e}",
                cfg.data_dir.display()
            ))
        })?;
        let storage = Storage::open(&cfg.data_dir)?;
        let run = next_run(&storage, cfg.node_id)?;
        info!(
            node = cfg.node_id,
            incarnation = run.incarnation,
            "node starting"
        );
        let raft_config = raft_config(&cfg)?;
        let (unused_tx, mut unused_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry {
            node_id: cfg.node_id,
            run,
            storage: storage.clone(),
            raft_config: raft_config.clone(),
            queues: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            unused_tx,
        });
        let meta_state = Arc::new(RwLock::new(MetaState::new()));
        let machine = MetaMachine::open(
            storage.clone(),
            METADATA_GROUP,
            meta_state.clone(),
            registry.clone(),
        )
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let meta_raft = Raft::new(
            cfg.node_id,
            raft_config.clone(),
            NoPeers,
            storage.log_store(METADATA_GROUP),
            machine,
        )
        .await
        .map_err(raft_err)?;
        let election_wait = Duration::from_millis(cfg.election_timeout_max_ms * 4);
        ensure_leader(&meta_raft, cfg.node_id, &[cfg.node_id], election_wait).await?;

        let node = Arc::new(Node {
            id: cfg.node_id,
            run,
            storage,
            meta_state,
            meta_raft,
            registry,
        });
        // Committing this also means every earlier metadata entry has been applied, so the
        // registry holds a handle for every queue.
        node.meta_write(MetaCmd::NodeRestarted { run })
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let replicated: Vec<Arc<QueueHandle>> = node
            .queue_handles()
            .into_iter()
            .filter(|h| h.is_replicated())
            .collect();
        let restarts = replicated
            .iter()
            .map(|h| h.call(QueueCmd::NodeRestarted { run }, None));
        for (handle, result) in replicated
            .iter()
            .zip(futures::future::join_all(restarts).await)
        {
            if let Err(e) = result {
                return Err(NodeError::Raft(format!(
                    "queue '{}' did not recover: {e}",
                    handle.name()
                )));
            }
        }

        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            while let Some((vhost, name, owner)) = unused_rx.recv().await {
                let Some(node) = weak.upgrade() else { return };
                let cmd = MetaCmd::DeleteQueue {
                    vhost,
                    name,
                    by: owner,
                };
                if let Err(e) = node.meta_write(cmd).await {
                    warn!(error = %e, "auto-delete failed");
                }
            }
        });
        info!(
            node = node.id,
            queues = node.queue_handles().len(),
            "node ready"
        );
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn run(&self) -> NodeRun {
        self.run
    }

    /// The local replica of the metadata. Hold the guard briefly: metadata commits wait on it.
    pub fn meta(&self) -> RwLockReadGuard<'_, MetaState> {
        self.meta_state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits a metadata command and returns the state machine's reply.
    pub async fn meta_write(&self, cmd: MetaCmd) -> Result<MetaReply, ClusterError> {
        let resp = self
            .meta_raft
            .client_write(GroupRequest::Meta(cmd))
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        match resp.data {
            GroupResponse::Meta(reply) => Ok(reply),
            other => Err(ClusterError::Raft(format!("unexpected response {other:?}"))),
        }
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<Arc<QueueHandle>> {
        self.registry
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(vhost.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn queue_handles(&self) -> Vec<Arc<QueueHandle>> {
        self.registry
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Replicas for a new replicated queue. A single node holds them all.
    pub fn replica_set(&self) -> Vec<NodeId> {
        vec![self.id]
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Stops every group and makes all written data durable.
    pub async fn shutdown(&self) {
        let runners: Vec<GroupRunner> = self
            .registry
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        let mut tasks = Vec::with_capacity(runners.len());
        for runner in runners {
            let _ = runner.stop.send(false);
            tasks.push(runner.task);
        }
        for task in tasks {
            let _ = task.await;
        }
        if let Err(e) = self.meta_raft.shutdown().await {
            warn!(error = %e, "metadata group did not shut down cleanly");
        }
        if let Err(e) = self.storage.sync().await {
            error!(error = %e, "final fsync failed");
        }
        self.storage.close();
    }
}
