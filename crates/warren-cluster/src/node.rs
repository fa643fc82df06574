//! A Warren node's replication runtime: opens storage, runs the metadata group and the groups
//! of the queues it replicates, answers its peers, and gives the server metadata reads,
//! metadata writes (forwarded to the metadata leader when needed) and queue handles.
//!
//! Each node start is a new "run" with a higher incarnation number, persisted before anything
//! else, so commands can tell state left by earlier runs (consumers, exclusive and transient
//! queues) and clean it up. Neighbours: `registry` (queue handles and groups), `supervisor`
//! (failure detection, elections), `proposer` (queue command routing), `transport`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::sync::mpsc;
use tracing::{info, warn};
use warren_core::ids::{METADATA_GROUP, NodeId, NodeRun};
use warren_core::meta::{MetaCmd, MetaReply, MetaState};
use warren_core::queue::QueueCmd;
use warren_core::{GroupId, MsgId};

use crate::db::{CF_META, DbError, Storage, StorageOptions, decode, encode, keys};
use crate::meta_sm::MetaMachine;
use crate::network::{GroupNetwork, WireSnapshot};
use crate::outbox::{Liveness, Outbox, RemoteItem};
use crate::proposer::{ItemResult, write_local};
use crate::queue::{ClusterError, Delivery, QueueHandle, ReplyTo};
use crate::registry::{EffectsSink, Registry};
use crate::supervisor::{self, LivenessTable};
use crate::transport::{Forwarded, PeerHandler, PeerRequest, PeerResponse, RaftRpc, Transport};
use crate::types::{GroupRequest, GroupResponse, QueueRequest, Raft, TypeConfig};

use crate::db::keys::NODE_KEYS;
const META_FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
const META_WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a metadata write waits for the other members to apply it.
const PEER_APPLY_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// How peers reach this node (host:port of its cluster listener).
    pub advertise: String,
    /// The cluster's initial members with their addresses, this node included. A node that
    /// is not in it starts empty and waits to be added (`warrenctl add-node`).
    pub members: BTreeMap<NodeId, String>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Log entries between snapshots of a group.
    pub snapshot_every: u64,
    /// A peer that has not answered pings for this long is down.
    pub failure_timeout_ms: u64,
    /// Ready messages each replicated queue keeps in memory; the rest wait on disk
    /// ([`DEFAULT_PAGE_WINDOW`] unless a test wants paging sooner).
    pub page_window: u32,
    /// How long a replica ranked behind a live one lets it try to win a leaderless queue
    /// before standing itself, unless that one showed its log is behind
    /// ([`DEFAULT_ELECTION_FALLBACK_MS`]).
    pub election_fallback_ms: u64,
    /// Size of the node's journal ([`crate::db::DEFAULT_JOURNAL_BYTES`] unless configured).
    pub journal_bytes: u64,
}

/// Long enough that the replica ranked first wins first however many queues it must elect
/// at once; a candidate whose log is behind is noticed by the replica it asks, which stands at
/// once, so this bounds only the rarer case of a candidate nobody hears.
pub const DEFAULT_ELECTION_FALLBACK_MS: u64 = 3000;

/// A queue's page window: about 1 MB of index per deep queue, and enough ready messages in
/// memory that consumers never wait for a page-in at full speed.
pub const DEFAULT_PAGE_WINDOW: u32 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage: {0}")]
    Storage(#[from] DbError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Config(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

fn raft_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Raft(e.to_string())
}

/// What the program hosting a node answers to other nodes' `Service` requests (the AMQP
/// server lists and closes its client connections this way); the cluster layer only
/// carries the bytes.
pub trait NodeService: Send + Sync {
    fn handle(&self, payload: Vec<u8>) -> ServiceFuture;
}

/// A `NodeService`'s answer: boxed, since the trait is used as an object.
pub type ServiceFuture = BoxFuture<'static, Result<Vec<u8>, String>>;

pub struct Node {
    /// Memory and disk alarms, when the server runs them (set once after start).
    resources: std::sync::OnceLock<Arc<crate::resources::ResourceMonitor>>,
    /// The hosting program's answers to `Service` requests (set once after start).
    service: std::sync::OnceLock<Arc<dyn NodeService>>,
    id: NodeId,
    run: NodeRun,
    advertise: String,
    storage: Storage,
    transport: Arc<dyn Transport>,
    meta_state: Arc<RwLock<MetaState>>,
    meta_raft: Raft<MetaMachine>,
    registry: Arc<Registry>,
    liveness: Arc<LivenessTable>,
    ready: AtomicBool,
}

fn meta_config(cfg: &NodeConfig) -> Result<Arc<openraft::Config>, NodeError> {
    openraft::Config {
        cluster_name: "warren".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_min_ms,
        election_timeout_max: cfg.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        // Entries kept behind a snapshot let a briefly lagging replica catch up from the log
        // instead of a snapshot transfer.
        max_in_snapshot_log_to_keep: cfg.snapshot_every.min(256),
        ..Default::default()
    }
    .validate()
    .map(Arc::new)
    .map_err(|e| NodeError::Config(e.to_string()))
}

/// Queue groups run without ticks (see `supervisor`): no heartbeats and no election timers.
/// The election timeout still sets the leader lease, which bounds how soon a replica may
/// replace a leader that stopped answering: keep it short.
fn queue_config(cfg: &NodeConfig) -> Result<Arc<openraft::Config>, NodeError> {
    // Shorter than the failure timeout, so a leader declared down has lost its lease and the
    // replicas grant the first election the supervisor starts.
    let lease_max = (cfg.failure_timeout_ms / 2).max(100);
    openraft::Config {
        cluster_name: "warren".into(),
        heartbeat_interval: lease_max / 4,
        election_timeout_min: lease_max / 2,
        election_timeout_max: lease_max,
        enable_tick: false,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        // Entries kept behind a snapshot let a briefly lagging replica catch up from the log
        // instead of a snapshot transfer.
        max_in_snapshot_log_to_keep: cfg.snapshot_every.min(256),
        // An entry may carry a batch of commands (up to 64 KiB of messages, `proposer`): at
        // most 16 MiB in one message to a follower.
        max_payload_entries: 256,
        ..Default::default()
    }
    .validate()
    .map(Arc::new)
    .map_err(|e| NodeError::Config(e.to_string()))
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
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf, &id_key, node_id.to_be_bytes());
    batch.put_cf(cf, &inc_key, incarnation.to_be_bytes());
    storage.write_durably(batch).map_err(NodeError::Storage)?;
    Ok(NodeRun {
        node: node_id,
        incarnation,
    })
}

impl Node {
    /// Opens storage and starts the groups. Peers can talk to the node as soon as this returns
    /// (register it with the transport's server), but it serves clients only after
    /// [`Node::wait_ready`].
    pub async fn start(
        cfg: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<Node>, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            NodeError::Config(format!(
                "data_dir: cannot create {}: {e}",
                cfg.data_dir.display()
            ))
        })?;
        let storage = Storage::open(
            &cfg.data_dir,
            &StorageOptions {
                journal_bytes: cfg.journal_bytes,
            },
        )?;
        let run = next_run(&storage, cfg.node_id)?;
        info!(
            node = cfg.node_id,
            incarnation = run.incarnation,
            "node starting"
        );
        for (id, addr) in &cfg.members {
            if *id != cfg.node_id {
                transport.set_address(*id, addr);
            }
        }
        let liveness = Arc::new(LivenessTable::new(Duration::from_millis(
            cfg.failure_timeout_ms,
        )));
        let outbox = Outbox::new(cfg.node_id, transport.clone());
        outbox.set_liveness(liveness.clone());
        let (unused_tx, mut unused_rx) = mpsc::unbounded_channel();
        let (dead_letter_tx, dead_letter_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry::new(
            cfg.node_id,
            run,
            storage.clone(),
            queue_config(&cfg)?,
            transport.clone(),
            outbox,
            liveness.clone(),
            unused_tx,
            dead_letter_tx,
            cfg.page_window,
        ));
        registry.set_members(cfg.members.clone());
        let meta_state = Arc::new(RwLock::new(MetaState::new()));
        let machine = MetaMachine::open(
            storage.clone(),
            METADATA_GROUP,
            meta_state.clone(),
            Arc::new(EffectsSink(Arc::downgrade(&registry))),
        )
        .map_err(raft_err)?;
        let meta_raft = Raft::new(
            cfg.node_id,
            meta_config(&cfg)?,
            GroupNetwork::new(METADATA_GROUP, transport.clone(), storage.clone()),
            storage.log_store(METADATA_GROUP),
            machine,
        )
        .await
        .map_err(raft_err)?;
        if !meta_raft.is_initialized().await.map_err(raft_err)?
            && cfg.members.contains_key(&cfg.node_id)
        {
            // Every initial member initializes with the same membership; they agree on it
            // because it comes from the same configuration.
            let members: BTreeMap<NodeId, BasicNode> = cfg
                .members
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            if let Err(e) = meta_raft.initialize(members).await {
                info!(error = %e, "metadata group already initialized");
            }
        }
        if cfg.members.len() == 1 && cfg.members.contains_key(&cfg.node_id) {
            // A single node need not wait out an election timeout.
            let state = meta_raft.metrics().borrow_watched().state;
            if state != ServerState::Leader {
                let _ = meta_raft.trigger().elect(false).await;
            }
        }

        let node = Arc::new(Node {
            resources: std::sync::OnceLock::new(),
            service: std::sync::OnceLock::new(),
            id: cfg.node_id,
            run,
            advertise: cfg.advertise.clone(),
            storage,
            transport,
            meta_state,
            meta_raft,
            registry,
            liveness: liveness.clone(),
            ready: AtomicBool::new(false),
        });
        tokio::spawn(track_membership(Arc::downgrade(&node)));
        tokio::spawn(supervisor::run(
            Arc::downgrade(&node),
            liveness,
            Duration::from_millis(cfg.election_fallback_ms),
        ));
        tokio::spawn(crate::dead_letter::run(
            Arc::downgrade(&node),
            dead_letter_rx,
        ));
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
        Ok(node)
    }

    /// Waits until the node can serve clients: the metadata group has a leader and this node
    /// has applied everything it committed, the new run is recorded (dropping what earlier
    /// runs held in memory), and every replicated queue heard of it (returning deliveries
    /// that were out with this node's old connections).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), NodeError> {
        let deadline = Instant::now() + timeout;
        self.meta_write_until(MetaCmd::NodeRestarted { run: self.run }, deadline, true)
            .await
            .map_err(|e| NodeError::Timeout(format!("joining the metadata group: {e}")))?;
        // Every earlier metadata entry is applied now: replica sets are final.
        self.registry.start_groups();
        let handles: Vec<Arc<QueueHandle>> = self
            .queue_handles()
            .into_iter()
            .filter(|h| h.is_replicated())
            .collect();
        let run = self.run;
        let restarts = handles.iter().map(|h| async move {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, h.call(QueueCmd::NodeRestarted { run }, None)).await
        });
        for (handle, result) in handles
            .iter()
            .zip(futures::future::join_all(restarts).await)
        {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(queue = %handle.name(), error = %e, "queue did not recover"),
                Err(_) => warn!(queue = %handle.name(), "queue has no leader yet"),
            }
        }
        self.ready.store(true, Ordering::Release);
        info!(node = self.id, queues = handles.len(), "node ready");
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// A queue group's voters as this node's replica sees them, and whether it leads.
    pub(crate) fn group_voters(&self, group: GroupId) -> Option<(bool, Vec<NodeId>)> {
        let raft = self.registry.by_id(group)?.raft()?;
        let m = raft.metrics().borrow_watched().clone();
        let leading = m.state == openraft::ServerState::Leader;
        let voters = m.membership_config.membership().voter_ids().collect();
        Some((leading, voters))
    }

    /// Hands the node its resource monitor (once), for the admin service.
    pub fn set_resource_monitor(&self, monitor: Arc<crate::resources::ResourceMonitor>) {
        let _ = self.resources.set(monitor);
    }

    pub fn resource_monitor(&self) -> Option<&Arc<crate::resources::ResourceMonitor>> {
        self.resources.get()
    }

    pub fn set_service(&self, service: Arc<dyn NodeService>) {
        let _ = self.service.set(service);
    }

    /// Asks the hosting program of node `to` (this one included) and returns its answer.
    pub async fn ask_service(
        &self,
        to: NodeId,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        if to == self.id {
            return self.answer_service(payload).await;
        }
        match self
            .transport
            .call(to, PeerRequest::Service { payload }, timeout)
            .await
        {
            Ok(PeerResponse::Service(answer)) => answer,
            Ok(other) => Err(format!("unexpected response {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn answer_service(&self, payload: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.service.get() {
            Some(service) => service.handle(payload).await,
            None => Err(format!("node {} serves no requests yet", self.id)),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn run(&self) -> NodeRun {
        self.run
    }

    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub(crate) fn registry_basic_nodes(&self, ids: &[NodeId]) -> BTreeMap<NodeId, BasicNode> {
        let members = self.registry.members();
        ids.iter()
            .map(|id| {
                (
                    *id,
                    BasicNode {
                        addr: members.get(id).cloned().unwrap_or_default(),
                    },
                )
            })
            .collect()
    }

    pub(crate) fn meta_raft(&self) -> &Raft<MetaMachine> {
        &self.meta_raft
    }

    /// The metadata group's leader as this node knows it.
    pub fn meta_leader(&self) -> Option<NodeId> {
        self.meta_raft.metrics().borrow_watched().current_leader
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The local replica of the metadata. Hold the guard briefly: metadata commits wait on it.
    pub fn meta(&self) -> RwLockReadGuard<'_, MetaState> {
        self.meta_state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Cluster members as the metadata group knows them, with their addresses.
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        self.registry.members()
    }

    pub fn down_nodes(&self) -> Vec<NodeId> {
        self.liveness.down_nodes()
    }

    /// Commits a metadata command (through the metadata leader, wherever it is) and waits
    /// until this node has applied it, so what it changed is visible here on return.
    pub async fn meta_write(&self, cmd: MetaCmd) -> Result<MetaReply, ClusterError> {
        self.meta_write_until(cmd, Instant::now() + META_WRITE_DEADLINE, true)
            .await
    }

    /// Commits a metadata command and waits until this node applied it, not the other
    /// members: for records no client looks up elsewhere right away (transaction
    /// decisions), where that wait would only add a round trip.
    pub async fn meta_commit(&self, cmd: MetaCmd) -> Result<MetaReply, ClusterError> {
        self.meta_write_until(cmd, Instant::now() + META_WRITE_DEADLINE, false)
            .await
    }

    async fn meta_write_until(
        &self,
        cmd: MetaCmd,
        deadline: Instant,
        wait_peers: bool,
    ) -> Result<MetaReply, ClusterError> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let leader = self.meta_raft.metrics().borrow_watched().current_leader;
            let attempt = match leader {
                Some(l) if l == self.id => match self.meta_write_local(cmd.clone()).await {
                    Forwarded::Ok((index, reply)) => {
                        self.wait_meta_applied(index, deadline).await?;
                        if wait_peers {
                            self.wait_peers_applied(index).await;
                        }
                        return Ok(reply);
                    }
                    other => other.describe(),
                },
                Some(l) => {
                    let call = self.transport.call(
                        l,
                        PeerRequest::MetaWrite {
                            cmd: encode(&cmd).map_err(|e| ClusterError::Raft(e.to_string()))?,
                        },
                        META_FORWARD_TIMEOUT,
                    );
                    match call.await {
                        Ok(PeerResponse::MetaWrite(Forwarded::Ok(bytes))) => {
                            let (index, reply): (u64, MetaReply) =
                                decode(&bytes).map_err(|e| ClusterError::Raft(e.to_string()))?;
                            self.wait_meta_applied(index, deadline).await?;
                            if wait_peers {
                                self.wait_peers_applied(index).await;
                            }
                            return Ok(reply);
                        }
                        Ok(PeerResponse::MetaWrite(other)) => other.describe(),
                        Ok(other) => format!("unexpected response {other:?}"),
                        Err(e) => e.to_string(),
                    }
                }
                None => "no metadata leader yet".to_owned(),
            };
            if Instant::now() + backoff > deadline {
                return Err(ClusterError::Raft(format!(
                    "metadata write failed: {attempt}"
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Commits on this node, which must lead the metadata group; returns the entry's index.
    async fn meta_write_local(&self, cmd: MetaCmd) -> Forwarded<(u64, MetaReply)> {
        match self.meta_raft.client_write(GroupRequest::Meta(cmd)).await {
            Ok(resp) => match resp.data {
                GroupResponse::Meta(reply) => Forwarded::Ok((resp.log_id.index, reply)),
                other => Forwarded::Error(format!("unexpected response {other:?}")),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Forwarded::NotLeader(f.leader_id)
            }
            Err(e) => Forwarded::Error(e.to_string()),
        }
    }

    async fn wait_meta_applied(&self, index: u64, deadline: Instant) -> Result<(), ClusterError> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.meta_raft
            .wait(Some(left.max(Duration::from_millis(1))))
            .applied_index_at_least(Some(index), "metadata applied here")
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Raft(e.to_string()))
    }

    fn meta_applied(&self) -> u64 {
        self.meta_raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// Waits (briefly) until every live member has applied the metadata up to `index`, so a
    /// client that got its declare-ok here can use the queue through any node at once. A
    /// member that is down, or too slow to answer in time, catches up on its own and checks
    /// again before answering "not found" (`meta_sync`).
    async fn wait_peers_applied(&self, index: u64) {
        let peers: Vec<NodeId> = self
            .members()
            .keys()
            .copied()
            .filter(|n| *n != self.id && !self.liveness.is_down(*n))
            .collect();
        let waits = peers.into_iter().map(|peer| {
            self.transport.call(
                peer,
                PeerRequest::MetaWait {
                    index,
                    timeout: PEER_APPLY_WAIT,
                },
                PEER_APPLY_WAIT + Duration::from_millis(200),
            )
        });
        futures::future::join_all(waits).await;
    }

    /// Waits until this node has applied every metadata change the leader had committed when
    /// called: a read barrier for "not found" answers that another node's write may explain.
    pub async fn meta_sync(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // Right after start-up, or during an election, no leader is known yet: wait for
            // one rather than answer from a copy that may be behind.
            let leader = self.meta_raft.metrics().borrow_watched().current_leader;
            let committed = match leader {
                Some(l) if l == self.id => Some(self.meta_applied()),
                Some(l) => match self
                    .transport
                    .call(l, PeerRequest::MetaIndex, Duration::from_secs(2))
                    .await
                {
                    Ok(PeerResponse::MetaIndex(i)) => Some(i),
                    _ => None,
                },
                None => None,
            };
            if let Some(committed) = committed {
                return self.wait_meta_applied(committed, deadline).await;
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NoMetaLeader);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<Arc<QueueHandle>> {
        self.registry.queue(vhost, name)
    }

    pub fn queue_handles(&self) -> Vec<Arc<QueueHandle>> {
        self.registry.handles()
    }

    /// Replicas for a new replicated queue: `count` members (all of them if fewer). The first
    /// is the preferred leader: with the default `client-local` locator this node (the
    /// declaring client's, as in RabbitMQ), with `balanced` the live member that leads the
    /// fewest queues. The rest are the members holding the fewest replicas, down nodes last.
    pub fn replica_set(&self, count: usize, balanced: bool) -> Vec<NodeId> {
        let members: Vec<NodeId> = self.members().keys().copied().collect();
        let counts = self.meta().replica_counts();
        let down: BTreeSet<NodeId> = self.down_nodes().into_iter().collect();
        let load = |n: &NodeId| counts.get(n).copied().unwrap_or((0, 0));
        let leader = if balanced {
            members
                .iter()
                .copied()
                .min_by_key(|n| (down.contains(n), load(n).1, load(n).0, *n))
                .unwrap_or(self.id)
        } else if members.contains(&self.id) || members.is_empty() {
            self.id
        } else {
            members.first().copied().unwrap_or(self.id)
        };
        let mut others: Vec<NodeId> = members.iter().copied().filter(|n| *n != leader).collect();
        others.sort_by_key(|n| (down.contains(n), load(n).0, *n));
        let mut replicas = Vec::with_capacity(count);
        replicas.push(leader);
        replicas.extend(others);
        replicas.truncate(count.max(1));
        replicas
    }

    /// Stops every group and makes all written data durable.
    pub async fn shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.registry.stop_all().await;
        if let Err(e) = self.meta_raft.shutdown().await {
            warn!(error = %e, "metadata group did not shut down cleanly");
        }
        if let Err(e) = self.storage.sync().await {
            warn!(error = %e, "final fsync failed");
        }
        self.storage.close();
    }

    // ---- answering peers ----------------------------------------------------------------

    async fn handle_raft(&self, group: GroupId, rpc: RaftRpc, payload: Vec<u8>) -> PeerResponse {
        let result = if group == METADATA_GROUP {
            // The metadata group elects with openraft's own timers.
            raft_rpc(&self.meta_raft, rpc, &payload, || {}).await
        } else {
            match self.registry.by_id(group) {
                Some(handle) if let Some(raft) = handle.raft() => {
                    raft_rpc(&raft, rpc, &payload, || {
                        handle.note_refused_candidate_behind();
                    })
                    .await
                }
                _ => Err(format!("group {group} is not running on node {}", self.id)),
            }
        };
        PeerResponse::Raft(result)
    }

    async fn handle_submit(&self, queue: u64, requests: Vec<Vec<u8>>) -> PeerResponse {
        let decoded: Result<Vec<QueueRequest>, _> = requests.iter().map(|b| decode(b)).collect();
        let requests = match decoded {
            Ok(r) => r,
            Err(e) => return PeerResponse::Submit(Forwarded::Error(e.to_string())),
        };
        let Some(handle) = self.registry.by_id(queue) else {
            return PeerResponse::Submit(Forwarded::Error(format!(
                "queue {queue} is unknown on node {}",
                self.id
            )));
        };
        let results: Vec<ItemResult> = if handle.is_local_queue() {
            requests
                .into_iter()
                .map(|r| ItemResult::Ok(handle.apply_local(r)))
                .collect()
        } else {
            match handle.raft() {
                Some(raft) => write_local(&raft, &requests).await,
                None => {
                    let hint = handle.leader_hint().filter(|n| *n != self.id);
                    return PeerResponse::Submit(Forwarded::NotLeader(hint));
                }
            }
        };
        let encoded: Result<Vec<Vec<u8>>, _> = results.iter().map(encode).collect();
        PeerResponse::Submit(match encoded {
            Ok(items) => Forwarded::Ok(items),
            Err(e) => Forwarded::Error(e.to_string()),
        })
    }

    fn handle_deliver(&self, from: NodeId, items: Vec<Vec<u8>>) -> PeerResponse {
        // Deliveries that may have waited in a socket while this node was stalled or cut
        // off could have been released by then (their queue declared this node down) and
        // given to someone else: flagged as repeats, so a client that already has one drops
        // it and no one sees a second copy without the redelivered flag.
        let suspect = self.liveness.in_doubt(from);
        for item in items {
            let Ok(item) = decode::<RemoteItem>(&item) else {
                continue;
            };
            match item {
                RemoteItem::Deliver {
                    queue,
                    consumer,
                    msg,
                    delivery_count,
                    no_ack,
                    resend,
                    content,
                } => {
                    let Some(handle) = self.registry.by_id(queue) else {
                        continue;
                    };
                    match handle.sink_of(&consumer) {
                        Some(sink) => sink.deliver(Delivery {
                            handle: handle.clone(),
                            consumer,
                            msg,
                            delivery_count,
                            no_ack,
                            resend: resend || suspect,
                            content,
                        }),
                        None if !no_ack => give_back(&handle, consumer.channel, msg),
                        None => {}
                    }
                }
                RemoteItem::ConsumerGone { queue, consumer } => {
                    if let Some(handle) = self.registry.by_id(queue)
                        && let Some(sink) = handle.sink_of(&consumer)
                    {
                        handle.detach(&consumer);
                        sink.consumer_gone(&consumer);
                    }
                }
            }
        }
        PeerResponse::Delivered
    }
}

/// A delivery for a consumer that no longer exists here goes back to its queue.
fn give_back(handle: &QueueHandle, channel: warren_core::ChannelRef, msg: MsgId) {
    handle.submit(
        QueueRequest::new(QueueCmd::Requeue {
            channel,
            msgs: vec![msg],
        }),
        ReplyTo::None,
    );
}

trait ForwardedExt {
    fn describe(self) -> String;
}

impl<T> ForwardedExt for Forwarded<T> {
    fn describe(self) -> String {
        match self {
            Forwarded::Ok(_) => "ok".into(),
            Forwarded::NotLeader(l) => format!("not the leader (leader: {l:?})"),
            Forwarded::Error(e) => e,
        }
    }
}

/// Answers one Raft message of a group. `on_candidate_behind` runs when this replica refuses a
/// (pre-)vote whose candidate has a shorter log than its own.
async fn raft_rpc<SM>(
    raft: &Raft<SM>,
    rpc: RaftRpc,
    payload: &[u8],
    on_candidate_behind: impl FnOnce(),
) -> Result<Vec<u8>, String>
where
    SM: openraft::storage::RaftStateMachine<TypeConfig, SnapshotData = std::io::Cursor<Vec<u8>>>,
{
    fn out<T: serde::Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Result<Vec<u8>, String> {
        r.map_err(|e| e.to_string())
            .and_then(|v| encode(&v).map_err(|e| e.to_string()))
    }
    match rpc {
        RaftRpc::AppendEntries => {
            let req = decode(payload).map_err(|e| e.to_string())?;
            out(raft.append_entries(req).await)
        }
        RaftRpc::Vote | RaftRpc::PreVote => {
            let req: openraft::raft::VoteRequest<TypeConfig> =
                decode(payload).map_err(|e| e.to_string())?;
            let candidate_log = req.last_log_id;
            let resp = if rpc == RaftRpc::Vote {
                raft.vote(req).await
            } else {
                raft.pre_vote(req).await
            };
            if let Ok(r) = &resp
                && !r.vote_granted
                && r.last_log_id > candidate_log
            {
                on_candidate_behind();
            }
            out(resp)
        }
        RaftRpc::TransferLeader => {
            let req = decode(payload).map_err(|e| e.to_string())?;
            out(raft.handle_transfer_leader(req).await)
        }
        RaftRpc::InstallSnapshot => {
            let wire: WireSnapshot = decode(payload).map_err(|e| e.to_string())?;
            let snapshot = openraft::alias::SnapshotOf::<TypeConfig, std::io::Cursor<Vec<u8>>> {
                meta: wire.meta,
                snapshot: std::io::Cursor::new(wire.data),
            };
            out(raft.install_full_snapshot(wire.vote, snapshot).await)
        }
    }
}

/// Where the peer-facing services find the node. The cluster listener starts before the node
/// (peers discovering each other must be able to say hello first), so the node is filled in
/// later; it is held weakly, so a transport's reference never keeps a stopped node alive.
#[derive(Default)]
pub struct NodeSlot(std::sync::OnceLock<std::sync::Weak<Node>>);

impl NodeSlot {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, node: &Arc<Node>) {
        let _ = self.0.set(Arc::downgrade(node));
    }

    pub fn get(&self) -> Option<Arc<Node>> {
        self.0.get().and_then(std::sync::Weak::upgrade)
    }
}

/// The `PeerHandler` of a node. Before the node exists it answers `Hello` only, with the
/// identity it was configured with.
pub struct NodeHandler {
    slot: Arc<NodeSlot>,
    id: NodeId,
    advertise: String,
}

impl NodeHandler {
    pub fn new(slot: Arc<NodeSlot>, id: NodeId, advertise: String) -> Self {
        NodeHandler {
            slot,
            id,
            advertise,
        }
    }

    /// A handler for a node that already exists.
    pub fn for_node(node: &Arc<Node>) -> Self {
        let slot = NodeSlot::new();
        slot.set(node);
        Self::new(slot, node.id, node.advertise.clone())
    }
}

impl PeerHandler for NodeHandler {
    fn handle(&self, request: PeerRequest) -> BoxFuture<'static, PeerResponse> {
        let node = self.slot.get();
        let (id, advertise) = (self.id, self.advertise.clone());
        Box::pin(async move {
            let Some(node) = node else {
                return match request {
                    PeerRequest::Hello { .. } => PeerResponse::Hello {
                        node: id,
                        incarnation: 0,
                        advertise,
                    },
                    _ => PeerResponse::Raft(Err("node is starting or stopped".into())),
                };
            };
            match request {
                PeerRequest::Raft {
                    group,
                    rpc,
                    payload,
                } => node.handle_raft(group, rpc, payload).await,
                PeerRequest::Submit { queue, requests } => {
                    node.handle_submit(queue, requests).await
                }
                PeerRequest::MetaWrite { cmd } => {
                    let cmd: MetaCmd = match decode(&cmd) {
                        Ok(c) => c,
                        Err(e) => return PeerResponse::MetaWrite(Forwarded::Error(e.to_string())),
                    };
                    PeerResponse::MetaWrite(match node.meta_write_local(cmd).await {
                        Forwarded::Ok(v) => match encode(&v) {
                            Ok(b) => Forwarded::Ok(b),
                            Err(e) => Forwarded::Error(e.to_string()),
                        },
                        Forwarded::NotLeader(l) => Forwarded::NotLeader(l),
                        Forwarded::Error(e) => Forwarded::Error(e),
                    })
                }
                PeerRequest::MetaWait { index, timeout } => {
                    let deadline = Instant::now() + timeout;
                    let _ = node.wait_meta_applied(index, deadline).await;
                    PeerResponse::MetaIndex(node.meta_applied())
                }
                PeerRequest::GroupVoters { group } => {
                    PeerResponse::GroupVoters(node.group_voters(group))
                }
                PeerRequest::Service { payload } => {
                    PeerResponse::Service(node.answer_service(payload).await)
                }
                PeerRequest::MetaIndex => PeerResponse::MetaIndex(
                    node.meta_raft
                        .metrics()
                        .borrow_watched()
                        .last_applied
                        .map_or(0, |l| l.index),
                ),
                PeerRequest::Deliver { from, items } => node.handle_deliver(from, items),
                PeerRequest::Hello { from, .. } => {
                    node.liveness.note_hello(from);
                    PeerResponse::Hello {
                        node: node.id,
                        incarnation: node.run.incarnation,
                        advertise: node.advertise.clone(),
                    }
                }
            }
        })
    }
}

/// Keeps the registry's member list (and so the transport's addresses) equal to the metadata
/// group's membership.
async fn track_membership(node: std::sync::Weak<Node>) {
    let Some(n) = node.upgrade() else { return };
    let mut metrics = n.meta_raft.metrics();
    drop(n);
    loop {
        let members: BTreeMap<NodeId, String> = {
            let m = metrics.borrow_watched();
            m.membership_config
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        let Some(n) = node.upgrade() else { return };
        if !members.is_empty() && members != n.registry.members() {
            info!(?members, "cluster members");
            n.registry.set_members(members);
        }
        drop(n);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
