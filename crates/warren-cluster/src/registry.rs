//! The queue handles of a node and the Raft groups behind the replicated queues it holds a
//! replica of, kept in step with the metadata.
//!
//! The metadata state machine (`meta_sm`) calls `MetaEffects` on every change, inside apply,
//! so a queue's handle exists before the declare's reply leaves. Every node gets a handle for
//! every queue; a node in a queue's replica set also runs the queue's group: its state
//! machine (`queue_sm`), its Raft instance, and a watcher that tracks leadership and, on
//! taking over, commits the queue's leader-recovery command.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use warren_core::ids::{NodeId, NodeRun};
use warren_core::meta::{MetaEffect, MetaState, Placement, QueueDef};
use warren_core::queue::QueueCmd;
use warren_core::{ConnectionRef, GroupId};

use crate::db::Storage;
use crate::meta_sm::MetaEffects;
use crate::network::GroupNetwork;
use crate::outbox::{Liveness, Outbox};
use crate::proposer::{self, ItemResult, ProposerContext};
use crate::queue::{Backend, DeadLetter, QueueHandle, UnusedHook};
use crate::queue_sm::{QueueMachine, destroy_state};
use crate::transport::Transport;
use crate::types::{Raft, TypeConfig};

pub(crate) struct GroupRunner {
    stop: oneshot::Sender<bool>,
    pub(crate) task: JoinHandle<()>,
}

pub(crate) struct Registry {
    pub node_id: NodeId,
    pub run: NodeRun,
    pub storage: Storage,
    pub queue_config: Arc<openraft::Config>,
    pub transport: Arc<dyn Transport>,
    pub outbox: Arc<Outbox>,
    pub liveness: Arc<dyn Liveness>,
    pub proposer: Arc<ProposerContext>,
    /// Ready messages a replicated queue keeps in memory; the rest are paged to disk.
    pub page_window: u32,
    queues: RwLock<HashMap<(String, String), Arc<QueueHandle>>>,
    by_id: RwLock<HashMap<u64, Arc<QueueHandle>>>,
    pub(crate) groups: Mutex<HashMap<GroupId, GroupRunner>>,
    /// False until the metadata replay at start-up is over (see `start_groups`).
    groups_started: std::sync::atomic::AtomicBool,
    /// Addresses of the cluster's members, from the metadata group's membership.
    members: RwLock<BTreeMap<NodeId, String>>,
    /// Members removed since this node started (see `removed_members`).
    removed: Mutex<std::collections::BTreeSet<NodeId>>,
    /// Auto-delete requests, executed by a task that owns a weak reference to the node.
    unused_tx: mpsc::UnboundedSender<(String, String, Option<ConnectionRef>)>,
    /// Dead-letters of the queues this node leads, for the node's dead-letter service.
    dead_letter_tx: mpsc::UnboundedSender<DeadLetter>,
    /// Bumped whenever a queue, its replica set, a group or the membership changes here: the
    /// supervisor looks at every group after a change and only at a slice of them otherwise.
    generation: std::sync::atomic::AtomicU64,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        run: NodeRun,
        storage: Storage,
        queue_config: Arc<openraft::Config>,
        transport: Arc<dyn Transport>,
        outbox: Arc<Outbox>,
        liveness: Arc<dyn Liveness>,
        unused_tx: mpsc::UnboundedSender<(String, String, Option<ConnectionRef>)>,
        dead_letter_tx: mpsc::UnboundedSender<DeadLetter>,
        page_window: u32,
    ) -> Self {
        let proposer = Arc::new(ProposerContext {
            node: node_id,
            run,
            transport: transport.clone(),
            liveness: liveness.clone(),
            serials: AtomicU64::new(0),
        });
        Registry {
            node_id,
            run,
            storage,
            queue_config,
            transport,
            outbox,
            liveness,
            proposer,
            page_window,
            queues: RwLock::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            groups_started: std::sync::atomic::AtomicBool::new(false),
            members: RwLock::new(BTreeMap::new()),
            removed: Mutex::new(std::collections::BTreeSet::new()),
            unused_tx,
            dead_letter_tx,
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Changes whenever queues, replica sets, groups or members change (see `generation`).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump_generation(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn set_members(&self, members: BTreeMap<NodeId, String>) {
        for (id, addr) in &members {
            if *id != self.node_id && !addr.is_empty() {
                self.transport.set_address(*id, addr);
            }
        }
        let mut current = write(&self.members);
        {
            let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            removed.extend(current.keys().filter(|id| !members.contains_key(id)));
            removed.retain(|id| !members.contains_key(id));
        }
        *current = members;
        self.bump_generation();
    }

    /// Nodes that left the membership while this node ran: as good as down for good. What
    /// their connections held must come back, wherever and whenever a queue learns of it.
    pub fn removed_members(&self) -> std::collections::BTreeSet<NodeId> {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn members(&self) -> BTreeMap<NodeId, String> {
        read(&self.members).clone()
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<Arc<QueueHandle>> {
        read(&self.queues)
            .get(&(vhost.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn by_id(&self, id: u64) -> Option<Arc<QueueHandle>> {
        read(&self.by_id).get(&id).cloned()
    }

    pub fn handles(&self) -> Vec<Arc<QueueHandle>> {
        read(&self.by_id).values().cloned().collect()
    }

    /// The queues whose id falls into `slot` of `slots` (id modulo `slots`), chosen by the
    /// map's keys so the other queues' handles are not touched at all.
    pub(crate) fn handles_in_slot(&self, slot: u64, slots: u64) -> Vec<Arc<QueueHandle>> {
        read(&self.by_id)
            .iter()
            .filter(|(id, _)| **id % slots == slot)
            .map(|(_, h)| h.clone())
            .collect()
    }

    fn unused_hook(&self) -> UnusedHook {
        let tx = self.unused_tx.clone();
        Arc::new(move |h: &QueueHandle| {
            let def = h.def();
            let _ = tx.send((h.vhost().to_owned(), def.name, def.exclusive_owner));
        })
    }

    /// `fresh`: the queue was just declared (not a replica change), so its first replicas may
    /// create its group.
    fn create(self: &Arc<Self>, vhost: &str, def: &QueueDef, fresh: bool) {
        if let Some(existing) = self.by_id(def.id) {
            existing.set_def(def.clone());
            self.reconcile_group(&existing);
            self.bump_generation();
            return;
        }
        // Every queue gets the hook: auto-delete queues use it when their last consumer
        // goes, queues with `x-expires` when they expire.
        let hook = Some(self.unused_hook());
        let handle = match &def.placement {
            Placement::Local { run } if *run == self.run => QueueHandle::new_local(
                self.node_id,
                vhost.to_owned(),
                def.clone(),
                hook,
                self.outbox.clone(),
            ),
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                let handle = QueueHandle::new(
                    self.node_id,
                    vhost.to_owned(),
                    def.clone(),
                    Backend::Proposer { tx },
                    hook,
                    self.outbox.clone(),
                );
                tokio::spawn(proposer::run(
                    Arc::downgrade(&handle),
                    rx,
                    self.proposer.clone(),
                ));
                handle
            }
        };
        let tx = self.dead_letter_tx.clone();
        handle.set_dead_letter_hook(Arc::new(move |dl| {
            let _ = tx.send(dl);
        }));
        // Only a member of the replica set the queue was declared with may create its group:
        // a node that joined later replays old declarations, but the groups exist already.
        let original_replica = match &def.placement {
            Placement::Replicated { replicas, .. } => replicas.contains(&self.node_id),
            Placement::Local { .. } => false,
        };
        handle.set_may_initialize(fresh && original_replica);
        write(&self.queues).insert((vhost.to_owned(), def.name.clone()), handle.clone());
        write(&self.by_id).insert(def.id, handle.clone());
        self.reconcile_group(&handle);
        self.bump_generation();
    }

    /// Runs the queue's group here if this node is one of its replicas.
    fn reconcile_group(self: &Arc<Self>, handle: &Arc<QueueHandle>) {
        // While the node replays its metadata at start-up, replica sets are not final yet: a
        // node taken out of a queue while it was down must not bring its old replica back.
        if !self
            .groups_started
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let def = handle.def();
        let Placement::Replicated { group, replicas } = &def.placement else {
            return;
        };
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if replicas.contains(&self.node_id) && !groups.contains_key(group) {
            let (stop_tx, stop_rx) = oneshot::channel();
            let task = tokio::spawn(run_group(
                Arc::downgrade(self),
                *group,
                handle.clone(),
                stop_rx,
            ));
            groups.insert(
                *group,
                GroupRunner {
                    stop: stop_tx,
                    task,
                },
            );
        }
    }

    fn remove(&self, vhost: &str, def: &QueueDef) {
        let handle = write(&self.queues).remove(&(vhost.to_owned(), def.name.clone()));
        write(&self.by_id).remove(&def.id);
        self.bump_generation();
        if let Some(handle) = handle {
            handle.close();
            handle.set_raft(None);
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

    /// This node left a queue's replica set and the group's membership: stop its replica and
    /// delete what it stored.
    pub fn retire_group(&self, group: GroupId) {
        let runner = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        self.bump_generation();
        if let Some(runner) = runner {
            info!(group, "leaving queue group");
            if let Some(h) = self.by_id(group) {
                h.set_raft(None);
                h.set_leader(false);
                h.set_leader_hint(None);
                // What this replica last applied is not the queue any more.
                h.set_stats(warren_core::queue::QueueStats::default());
            }
            let _ = runner.stop.send(true);
        }
    }

    /// After the metadata replay at start-up: runs the groups of the queues this node is a
    /// replica of, and deletes what it stored for groups it no longer belongs to (queues
    /// deleted, or moved off this node, while it was down). Its copy of those can never be
    /// used again: this node will not run a replica of them.
    pub fn start_groups(self: &Arc<Self>) {
        // Listed before any group starts, so a group created meanwhile is never mistaken for
        // a stale one.
        let stored = self.storage.stored_groups();
        self.groups_started
            .store(true, std::sync::atomic::Ordering::Release);
        let mut wanted = std::collections::HashSet::new();
        for handle in self.handles() {
            if let Placement::Replicated { group, replicas } = handle.def().placement
                && replicas.contains(&self.node_id)
            {
                wanted.insert(group);
            }
            self.reconcile_group(&handle);
        }
        match stored {
            Ok(stored) => {
                for group in stored {
                    if group != warren_core::METADATA_GROUP && !wanted.contains(&group) {
                        info!(group, "deleting the copy of a group this node left");
                        let log = self.storage.log_store::<TypeConfig>(group);
                        if let Err(e) = log
                            .destroy()
                            .and_then(|_| destroy_state(&self.storage, group))
                        {
                            warn!(group, error = %e, "could not delete a stale group");
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "could not list stored groups"),
        }
    }

    /// Stops every group this node runs (node shutdown).
    pub async fn stop_all(&self) {
        let runners: Vec<GroupRunner> = self
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
        for h in self.handles() {
            h.set_raft(None);
        }
    }

    pub(crate) fn basic_nodes(&self, ids: &[NodeId]) -> BTreeMap<NodeId, BasicNode> {
        let members = read(&self.members);
        ids.iter()
            .map(|id| {
                let addr = members.get(id).cloned().unwrap_or_default();
                (*id, BasicNode { addr })
            })
            .collect()
    }
}

/// Hands registry changes from metadata apply to the registry; holds it weakly so that the
/// registry (which owns the groups) is not kept alive by the metadata group it feeds.
pub(crate) struct EffectsSink(pub Weak<Registry>);

impl MetaEffects for EffectsSink {
    fn on_effect(&self, effect: MetaEffect) {
        let Some(registry) = self.0.upgrade() else {
            return;
        };
        match effect {
            MetaEffect::QueueCreated { vhost, queue } => registry.create(&vhost, &queue, true),
            MetaEffect::ReplicasChanged { vhost, queue } => registry.create(&vhost, &queue, false),
            MetaEffect::QueueDeleted { vhost, queue } => registry.remove(&vhost, &queue),
            MetaEffect::QueueArguments {
                vhost,
                name,
                arguments,
                version,
            } => {
                if let Some(h) = registry.queue(&vhost, &name) {
                    h.set_policy_arguments(arguments, version);
                }
            }
        }
    }

    fn reset(&self, state: &MetaState) {
        let Some(registry) = self.0.upgrade() else {
            return;
        };
        let wanted: HashMap<u64, (String, QueueDef)> = state
            .queues()
            .map(|(v, q)| (q.id, (v.to_owned(), q.clone())))
            .collect();
        let stale: Vec<(String, QueueDef)> = registry
            .handles()
            .into_iter()
            .filter(|h| !wanted.contains_key(&h.id()))
            .map(|h| (h.vhost().to_owned(), h.def()))
            .collect();
        for (vhost, def) in stale {
            registry.remove(&vhost, &def);
        }
        // Queues restored from a snapshot existed before: their groups exist somewhere.
        for (_, (vhost, def)) in wanted {
            registry.create(&vhost, &def, false);
            // The snapshot holds the policies but not the log entries that announced them:
            // the arguments in force are taken from it (the dead-letter service and a new
            // leader read them from the handle).
            if let Some(h) = registry.queue(&vhost, &def.name)
                && (state.policy_for(&vhost, &def.name).is_some() || h.has_policy())
            {
                h.set_policy_arguments(
                    state.effective_arguments(&vhost, &def),
                    state.policy_version(),
                );
            }
        }
    }
}

/// One queue group on this node, from start to stop. The first replica initializes a new
/// group with the whole replica set; the others start empty and get the log from the leader.
async fn run_group(
    registry: Weak<Registry>,
    group: GroupId,
    handle: Arc<QueueHandle>,
    mut stop: oneshot::Receiver<bool>,
) {
    let Some(reg) = registry.upgrade() else {
        return;
    };
    let (node_id, storage, config, transport) = (
        reg.node_id,
        reg.storage.clone(),
        reg.queue_config.clone(),
        reg.transport.clone(),
    );
    let log_store = storage.log_store::<TypeConfig>(group);
    let replay_until = {
        use openraft::storage::RaftLogStorage;
        let mut probe = log_store.clone();
        match probe.get_log_state().await {
            Ok(state) => state.last_log_id.map_or(0, |l| l.index),
            Err(e) => {
                error!(group, error = %e, "cannot read the queue's log");
                return;
            }
        }
    };
    let page_window = reg.page_window;
    let snapshot_every = match config.snapshot_policy {
        openraft::SnapshotPolicy::LogsSinceLast(n) => n,
        openraft::SnapshotPolicy::Never => u64::MAX,
    };
    let machine = match QueueMachine::open(
        storage.clone(),
        group,
        &handle,
        replay_until,
        page_window,
        snapshot_every,
    ) {
        Ok(m) => m,
        Err(e) => {
            error!(group, queue = %handle.name(), error = %e, "cannot open queue state");
            return;
        }
    };
    let network = GroupNetwork::new(group, transport, storage.clone());
    let raft = match Raft::new(node_id, config, network, log_store, machine).await {
        Ok(r) => r,
        Err(e) => {
            error!(group, queue = %handle.name(), error = %e, "cannot start queue group");
            return;
        }
    };
    let replicas = handle.replicas();
    let initialized = raft.is_initialized().await.unwrap_or(false);
    if !initialized && handle.may_initialize() && replicas.first() == Some(&node_id) {
        let members = reg.basic_nodes(&replicas);
        if let Err(e) = raft.initialize(members).await {
            debug!(group, error = %e, "initialize refused");
        }
    }
    if replicas.first() == Some(&node_id) {
        // The preferred leader stands at once rather than waiting for the supervisor's round.
        let state = raft.metrics().borrow_watched().state;
        if state != ServerState::Leader {
            let _ = raft.trigger().elect(false).await;
        }
    }
    handle.set_raft(Some(raft.clone()));
    drop(reg);
    let watcher = tokio::spawn(watch_leadership(
        raft.clone(),
        Arc::downgrade(&handle),
        registry.clone(),
        node_id,
    ));
    drop(handle);
    let destroy = (&mut stop).await.unwrap_or(false);
    watcher.abort();
    if !destroy {
        snapshot_before_stop(&raft, group).await;
    }
    if let Err(e) = raft.shutdown().await {
        warn!(group, error = %e, "queue group did not shut down cleanly");
    }
    if destroy {
        drop(raft);
        let log = storage.log_store::<TypeConfig>(group);
        if let Err(e) = log.destroy().and_then(|_| destroy_state(&storage, group)) {
            warn!(group, error = %e, "could not delete the storage of a deleted queue");
        }
    }
}

/// Entries applied since the last snapshot above which a graceful stop takes a snapshot.
const SNAPSHOT_ON_STOP_MIN_ENTRIES: u64 = 256;
/// How long a graceful stop waits for that snapshot.
const SNAPSHOT_ON_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A graceful stop snapshots what the group applied since its last snapshot, so the next start
/// loads it instead of applying up to `snapshot_every` entries again: with 49 queues of a few
/// thousand entries each, that replay was most of a restart (0.92 s against 0.31 s with a few
/// entries each). Groups with little to replay skip it, so stopping a node with thousands of
/// idle queues does not write thousands of snapshots. A crash still replays, as before.
async fn snapshot_before_stop(raft: &Raft<QueueMachine>, group: GroupId) {
    let metrics = raft.metrics();
    let (applied, snapshot) = {
        let m = metrics.borrow_watched();
        (
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map_or(0, |l| l.index),
        )
    };
    if applied < snapshot + SNAPSHOT_ON_STOP_MIN_ENTRIES {
        return;
    }
    if let Err(e) = raft.trigger().snapshot().await {
        debug!(group, error = %e, "no snapshot before stopping");
        return;
    }
    let taken = raft
        .wait(Some(SNAPSHOT_ON_STOP_TIMEOUT))
        .metrics(
            |m| m.snapshot.map_or(0, |l| l.index) >= applied,
            "snapshot before stopping",
        )
        .await;
    if let Err(e) = taken {
        debug!(group, error = %e, "snapshot before stopping not confirmed");
    }
}

/// Keeps the handle's leader flag and hint current. On becoming leader, commits the queue's
/// leader-recovery command: channels of down nodes give back what they held, and deliveries
/// still out with live consumers are sent again (the old leader may not have sent them).
async fn watch_leadership(
    raft: Raft<QueueMachine>,
    handle: Weak<QueueHandle>,
    registry: Weak<Registry>,
    node_id: NodeId,
) {
    let mut metrics = raft.metrics();
    let mut was_leader = false;
    let mut known_leader = None;
    // The term recovery was last started for: each term this node leads needs its own (the
    // watch may show two terms in a row as leader, never the step-down between).
    let mut recovery_term = 0;
    loop {
        let (leading, leader, term) = {
            let m = metrics.borrow_watched();
            (
                m.state == ServerState::Leader && m.current_leader == Some(node_id),
                m.current_leader,
                m.current_term,
            )
        };
        let Some(h) = handle.upgrade() else { return };
        // The term first: entries of this term apply with their effects from then on.
        h.set_leader_term(if leading { term } else { 0 });
        h.set_leader(leading);
        if let Some(l) = leader {
            h.set_leader_hint(Some(l));
        }
        if leading && term != recovery_term {
            recovery_term = term;
            let down: Vec<NodeId> = registry
                .upgrade()
                .map(|r| {
                    let mut down: Vec<NodeId> = r
                        .members()
                        .keys()
                        .copied()
                        .filter(|n| *n != node_id && r.liveness.is_down(*n))
                        .collect();
                    down.extend(r.removed_members());
                    down
                })
                .unwrap_or_default();
            info!(queue = %h.name(), ?down, "leading queue");
            // Written here, not through the proposer: if this node turns out not to lead (a
            // leadership restored at start-up from an old term), the command is dropped
            // rather than forwarded, and the real leader has run its own recovery.
            let mut requests = vec![crate::types::QueueRequest::new(QueueCmd::LeaderRecovery {
                down,
            })];
            if h.has_policy() {
                requests.push(crate::types::QueueRequest::new(h.configure_cmd()));
            }
            // Deliveries of this term wait for the recovery (`set_recovered_term`), so it is
            // tried again for as long as this node leads the term.
            tokio::spawn(write_while_leading(
                raft.clone(),
                std::sync::Arc::downgrade(&h),
                term,
                requests,
            ));
        }
        if leading != was_leader || leader != known_leader {
            // The supervisor's next round looks at every group (see `Registry::generation`).
            if let Some(r) = registry.upgrade() {
                r.bump_generation();
            }
        }
        known_leader = leader;
        was_leader = leading;
        drop(h);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Writes `requests`, which carry this leader's own judgement (who is down, what to resend),
/// to the queue's log as long as this node leads `term`, trying again after a failure. They
/// never go through the proposer: a node that turns out not to lead (cut off and not yet
/// told, or a leadership restored at start-up from an old term) would forward them to the
/// real leader, which would apply a judgement it did not make, such as releasing the
/// consumers of a node it reaches well. The real leader makes its own.
pub(crate) async fn write_while_leading(
    raft: Raft<QueueMachine>,
    queue: Weak<QueueHandle>,
    term: u64,
    requests: Vec<crate::types::QueueRequest>,
) {
    let mut wait = LEADER_WRITE_RETRY;
    for attempt in 0u32.. {
        let out = proposer::write_local(&raft, &requests).await;
        let applied = out.iter().all(|r| matches!(r, ItemResult::Ok(_)));
        let Some(h) = queue.upgrade() else { return };
        if applied || h.leader_term() != term || !h.is_leader() {
            return;
        }
        // A leader cut off keeps taking itself for leader, with every queue it leads trying
        // here: one warning each, and the retries slow down.
        if attempt == 0 {
            warn!(queue = %h.name(), ?out, "leader's command not applied; trying again");
        } else {
            debug!(queue = %h.name(), ?out, attempt, "leader's command not applied; trying again");
        }
        drop(h);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(LEADER_WRITE_RETRY_MAX);
    }
}

/// How long a leader waits before writing its own command again after a first failure; the
/// wait doubles up to `LEADER_WRITE_RETRY_MAX`.
const LEADER_WRITE_RETRY: Duration = Duration::from_millis(100);
const LEADER_WRITE_RETRY_MAX: Duration = Duration::from_secs(1);

/// How long an election attempt by the supervisor is given before it may try again.
pub(crate) const ELECTION_RETRY: Duration = Duration::from_millis(300);
