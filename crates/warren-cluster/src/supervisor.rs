//! The node-level failure detector and election driver that replaces per-group timers.
//!
//! Queue groups run without ticks: an idle group sends no heartbeats and costs nothing. In
//! their place, every node pings every other member a few times a second (`Hello`). When a
//! member stops answering for `failure_timeout`, or at once when its address refuses the
//! connection (its process is gone), it is down: for each queue this node leads,
//! the down node's consumers and unsettled messages are released (`QueueCmd::NodeDown`); for
//! each queue whose leader is down, the first live replica in the queue's preference order
//! starts an election, so exactly one candidate stands and no split vote delays the
//! take-over. A queue whose group has no leader at all (new, or its preferred leader never
//! came up) is handled the same way. The metadata group keeps openraft's own timers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tracing::{info, warn};
use warren_core::NodeId;
use warren_core::meta::MetaCmd;
use warren_core::queue::QueueCmd;

use crate::node::Node;
use crate::outbox::Liveness;
use crate::queue::QueueHandle;
use crate::registry::write_while_leading;
use crate::transport::{PeerRequest, PeerResponse, TransportError};
use crate::types::QueueRequest;

#[derive(Debug, Clone)]
struct PeerState {
    last_ok: Instant,
    down: bool,
    incarnation: u64,
    /// Whether the peer ever answered or said hello. One that never did is declared down only
    /// after `NEVER_HEARD_GRACE`: it may still be starting, and declaring it down at once
    /// would make every replica stand for election together. Without any limit, a peer that
    /// crashed before this node's first ping reached it would stay up forever, and so would
    /// every queue it led.
    heard: bool,
    /// When this node started watching the peer.
    since: Instant,
    /// The peer came back as the same run (cut off or paused): what it sent meanwhile may
    /// arrive late, until then.
    doubt_until: Option<Instant>,
}

impl PeerState {
    fn new(now: Instant) -> Self {
        PeerState {
            last_ok: now,
            down: false,
            incarnation: 0,
            heard: false,
            since: now,
            doubt_until: None,
        }
    }
}

/// How long a peer that never answered may stay silent before it is declared down.
const NEVER_HEARD_GRACE: Duration = Duration::from_secs(5);

/// Who is up, as this node sees it.
pub struct LivenessTable {
    peers: RwLock<HashMap<NodeId, PeerState>>,
    failure_timeout: Duration,
    /// Until when this node doubts what arrives from any peer: it found it was itself
    /// stalled (paused, starved) long enough to have been declared down by others.
    self_doubt_until: RwLock<Option<Instant>>,
    /// The supervisor's last round; a long gap means this node was stalled.
    last_round: RwLock<Instant>,
    /// The other members as of the last round; None before the first.
    members: RwLock<Option<HashSet<NodeId>>>,
}

impl LivenessTable {
    pub fn new(failure_timeout: Duration) -> Self {
        LivenessTable {
            peers: RwLock::new(HashMap::new()),
            failure_timeout,
            self_doubt_until: RwLock::new(None),
            last_round: RwLock::new(Instant::now()),
            members: RwLock::new(None),
        }
    }

    pub fn down_nodes(&self) -> Vec<NodeId> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| s.down)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Records a ping its peer's address refused: its process is not running, so a peer that
    /// answered before is down at once (as a crashed node's peers notice its closed
    /// connections) instead of after `failure_timeout` of silence. One never heard from may
    /// still be starting and gets its grace period as before.
    pub(crate) fn record_refused(&self, node: NodeId, now: Instant) -> Option<bool> {
        {
            let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
            let state = peers.entry(node).or_insert_with(|| PeerState::new(now));
            if state.heard && !state.down {
                state.down = true;
                return Some(true);
            }
        }
        self.record(node, None, now)
    }

    /// Records a ping result; returns Some(true) when the node just went down, Some(false)
    /// when it just came back (answering again, or answering as a new run).
    fn record(&self, node: NodeId, ok: Option<u64>, now: Instant) -> Option<bool> {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let state = peers.entry(node).or_insert_with(|| PeerState::new(now));
        match ok {
            Some(incarnation) => {
                state.heard = true;
                state.last_ok = now;
                let restarted = state.incarnation != 0 && state.incarnation != incarnation;
                state.incarnation = incarnation;
                if state.down || restarted {
                    if state.down && !restarted {
                        state.doubt_until = Some(now + self.failure_timeout * 2);
                    }
                    state.down = false;
                    return Some(false);
                }
            }
            None => {
                let silent_for = if state.heard {
                    self.failure_timeout
                } else {
                    NEVER_HEARD_GRACE.max(self.failure_timeout)
                };
                let silent_since = if state.heard {
                    state.last_ok
                } else {
                    state.since
                };
                if !state.down && now.duration_since(silent_since) >= silent_for {
                    state.down = true;
                    return Some(true);
                }
            }
        }
        None
    }

    /// Whether what `peer` sends may be stale: it is down or came back lately as the same
    /// run, or this node itself was stalled long enough for its peers to declare it down.
    /// A restarted peer brings no doubt: its old connections died with it.
    pub fn in_doubt(&self, peer: NodeId) -> bool {
        let now = Instant::now();
        let last_round = *self.last_round.read().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(last_round) > self.failure_timeout {
            return true;
        }
        if self
            .self_doubt_until
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until)
        {
            return true;
        }
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .is_some_and(|s| s.down || s.doubt_until.is_some_and(|until| now < until))
    }

    /// How long doubt lasts after a peer comes back or this node recovers from a stall:
    /// twice the failure timeout covers a batch sent just before one side was declared down
    /// and delivered just after.
    fn doubt_window(&self) -> Duration {
        self.failure_timeout * 2
    }

    /// The supervisor's round began at `now`; a gap longer than the failure timeout since the
    /// previous one means this node was stalled.
    fn round(&self, now: Instant) {
        let mut last = self.last_round.write().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(*last) > self.failure_timeout {
            *self
                .self_doubt_until
                .write()
                .unwrap_or_else(|p| p.into_inner()) = Some(now + self.doubt_window());
        }
        *last = now;
    }

    /// A hello from `node` arrived: it ran at some point, so the normal failure timeout
    /// applies to it. Its pings being answered is still what keeps it up: an incoming hello
    /// says nothing about the link in the other direction.
    pub(crate) fn note_hello(&self, node: NodeId) {
        let now = Instant::now();
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let state = peers.entry(node).or_insert_with(|| PeerState::new(now));
        if !state.heard {
            state.heard = true;
            state.last_ok = now;
        }
    }

    fn forget_except(&self, members: HashSet<NodeId>) {
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n, _| members.contains(n));
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = Some(members);
    }
}

impl Liveness for LivenessTable {
    fn is_down(&self, node: NodeId) -> bool {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .is_some_and(|s| s.down)
    }

    fn has_left(&self, node: NodeId) -> bool {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|m| !m.contains(&node))
    }
}

/// How a peer met this round's ping.
enum Ping {
    Answered(u64),
    /// Nothing listens at its address (`TransportError::Refused`).
    Refused,
    /// No answer in time, or another error.
    Silent,
}

pub(crate) const TICK: Duration = Duration::from_millis(200);
/// A quiet round looks at one group in SLICES (so each every SLICES × TICK).
const SLICES: u64 = 5;
/// Elections one node starts per supervisor round, at most.
const ELECTIONS_PER_ROUND: usize = 64;
/// How long after refusing a candidate whose log is behind its own a replica stands at once.
const STAND_AFTER_REFUSAL: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How long after a refused ping the peer is asked again before it counts as refused.
const REFUSAL_RECHECK: Duration = Duration::from_millis(50);

/// `fallback`: how long a lower-ranked replica lets a live higher-ranked one try before
/// standing itself.
pub(crate) async fn run(node: Weak<Node>, liveness: Arc<LivenessTable>, fallback: Duration) {
    let mut last_elect: HashMap<u64, Instant> = HashMap::new();
    let mut changes: Changes = HashMap::new();
    let mut leaderless_since: HashMap<u64, Instant> = HashMap::new();
    let mut gone_handled: BTreeSet<NodeId> = BTreeSet::new();
    let mut seen_generation = None;
    let mut seen_down: BTreeSet<NodeId> = BTreeSet::new();
    let mut look_at_all = true;
    let mut round: u64 = 0;
    let mut transactions = crate::transaction::Recovery::default();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        liveness.round(Instant::now());
        let Some(node) = node.upgrade() else { return };
        let members: BTreeMap<NodeId, String> = node.registry().members();
        let others: Vec<NodeId> = members
            .keys()
            .copied()
            .filter(|n| *n != node.id())
            .collect();
        liveness.forget_except(others.iter().copied().collect());
        // A removed member never answers again and is no longer pinged, so it is never
        // declared down: release what its connections held here, once.
        let removed = node.registry().removed_members();
        for gone in removed.difference(&gone_handled) {
            warn!(
                node = gone,
                "member removed: releasing what its connections held"
            );
            node_gone(&node, *gone);
        }
        gone_handled = removed;

        let pings = others.iter().map(|peer| {
            let peer = *peer;
            let transport = node.transport().clone();
            let hello = PeerRequest::Hello {
                from: node.id(),
                incarnation: node.run().incarnation,
                advertise: node.advertise().to_owned(),
            };
            async move {
                let ping = || async {
                    match transport.call(peer, hello.clone(), PING_TIMEOUT).await {
                        Ok(PeerResponse::Hello { incarnation, .. }) => Ping::Answered(incarnation),
                        Err(TransportError::Refused { .. }) => Ping::Refused,
                        _ => Ping::Silent,
                    }
                };
                let first = ping().await;
                if !matches!(first, Ping::Refused) {
                    return (peer, first);
                }
                // A refusal takes a peer down at once, so one alone is not trusted: a process
                // that crashed still refuses a moment later, a passing hiccup does not.
                tokio::time::sleep(REFUSAL_RECHECK).await;
                (peer, ping().await)
            }
        });
        let now = Instant::now();
        for (peer, result) in futures::future::join_all(pings).await {
            let refused = matches!(result, Ping::Refused);
            let change = match result {
                Ping::Answered(incarnation) => liveness.record(peer, Some(incarnation), now),
                Ping::Silent => liveness.record(peer, None, now),
                Ping::Refused => liveness.record_refused(peer, now),
            };
            match change {
                Some(true) => {
                    let why = if refused {
                        "its address refused the connection"
                    } else {
                        "no answer"
                    };
                    warn!(node = peer, why, "peer is down");
                    node_gone(&node, peer);
                }
                Some(false) => {
                    info!(node = peer, "peer is back");
                    announce_leadership(&node, peer).await;
                }
                None => {}
            }
        }
        // Every group is looked at after anything that can give one of them work (a queue,
        // replica set, leader or member changed, a peer went down or came back, elections
        // were left for the next round); otherwise a slice of them, so each is still seen
        // every SLICES rounds, plus the groups with work under way. With thousands of idle
        // queues this is most of an idle node's CPU.
        let generation = node.registry().generation();
        let down: BTreeSet<NodeId> = others
            .iter()
            .copied()
            .filter(|n| liveness.is_down(*n))
            .collect();
        look_at_all |= seen_generation != Some(generation) || down != seen_down;
        seen_generation = Some(generation);
        seen_down = down;
        round += 1;
        let handles = if std::mem::take(&mut look_at_all) {
            node.registry().handles()
        } else {
            let slot = round % SLICES;
            let mut handles = node.registry().handles_in_slot(slot, SLICES);
            let busy: BTreeSet<u64> = leaderless_since
                .keys()
                .chain(changes.keys())
                .copied()
                .filter(|g| g % SLICES != slot)
                .collect();
            handles.extend(busy.into_iter().filter_map(|g| node.registry().by_id(g)));
            handles
        };
        look_at_all = drive_elections(
            &node,
            &handles,
            &liveness,
            fallback,
            &mut last_elect,
            &mut leaderless_since,
        )
        .await;
        reconcile(&node, &handles, &liveness, &mut changes);
        transactions.round(&node, &handles);
    }
}

/// Runs a membership change on a group's leader. An idle group's leader has let its lease
/// lapse (no heartbeats between idle groups); membership changes need it like any write, so a
/// refusal for that reason is met with a heartbeat round and another try.
async fn with_lease<T, F, Fut>(
    raft: &crate::types::Raft<crate::queue_sm::QueueMachine>,
    op: F,
) -> Result<
    T,
    openraft::errors::RaftError<
        crate::types::TypeConfig,
        openraft::errors::ClientWriteError<crate::types::TypeConfig>,
    >,
>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<
            Output = Result<
                T,
                openraft::errors::RaftError<
                    crate::types::TypeConfig,
                    openraft::errors::ClientWriteError<crate::types::TypeConfig>,
                >,
            >,
        >,
{
    use openraft::errors::{ClientWriteError, ForwardReason, RaftError};
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                if f.reason == ForwardReason::LeaseExpired && attempt < 10 =>
            {
                let _ = raft.trigger().heartbeat().await;
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// Membership work in flight per group, so a slow change is not started twice.
type Changes = HashMap<u64, (Instant, tokio::task::JoinHandle<()>)>;

const CHANGE_RETRY: Duration = Duration::from_secs(5);

/// How often a replica that is no longer wanted but still a voter in its own log asks the
/// leader whether it has been removed.
const LEAVE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Brings every group this node leads to its replica set from the metadata (add and catch up
/// new replicas, then switch the voters), hands leadership to the preferred replica when it
/// is up and has caught up, and retires replicas this node should no longer hold.
fn reconcile(
    node: &Arc<Node>,
    handles: &[Arc<QueueHandle>],
    liveness: &LivenessTable,
    changes: &mut Changes,
) {
    let me = node.id();
    changes.retain(|_, (started, task)| !task.is_finished() && started.elapsed() < CHANGE_RETRY);
    for handle in handles {
        let Some(raft) = handle.raft() else { continue };
        let group = handle.id();
        let metrics = raft.metrics();
        // Most groups need nothing: decide that under the borrows, allocating nothing (this
        // runs for every group several times a second).
        let nothing_to_do = {
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            handle.with_replicas(|desired| {
                let is_voter = |n: &NodeId| membership.voter_ids().any(|v| v == *n);
                if m.state == ServerState::Leader {
                    let in_sync = membership.voter_ids().count() == desired.len()
                        && desired.iter().all(is_voter);
                    in_sync && desired.first().is_none_or(|p| *p == me)
                } else {
                    // A follower has something to do only once it is no longer wanted (see
                    // below).
                    desired.contains(&me) || membership.voter_ids().next().is_none()
                }
            })
        };
        if nothing_to_do {
            continue;
        }
        let desired = handle.replicas();
        let desired_set: BTreeSet<NodeId> = desired.iter().copied().collect();
        let (leading, voters, learners) = {
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
            (m.state == ServerState::Leader, voters, learners)
        };
        if !leading {
            if desired_set.contains(&me) || voters.is_empty() {
                continue;
            }
            if !voters.contains(&me) {
                // No longer wanted and no longer a voter: it leaves.
                node.registry().retire_group(group);
            } else if let std::collections::hash_map::Entry::Vacant(slot) = changes.entry(group) {
                // Still a voter as far as this replica knows, but the leader may have removed
                // it already: the entry that does so is the first one a leader no longer
                // replicates to it, so a removed replica never learns it from its log. It
                // asks the leader (through the wanted replicas) instead, about once a second.
                let node = node.clone();
                let task = tokio::spawn(async move {
                    if node.group_left(group, &desired, me).await {
                        node.registry().retire_group(group);
                    } else {
                        tokio::time::sleep(LEAVE_CHECK_EVERY).await;
                    }
                });
                slot.insert((Instant::now(), task));
            }
            continue;
        }
        let m = metrics.borrow_watched().clone();
        if changes.contains_key(&group) {
            continue;
        }
        if voters != desired_set {
            let addrs = node.registry().basic_nodes(&desired);
            let raft = raft.clone();
            let missing: Vec<NodeId> = desired_set
                .iter()
                .copied()
                .filter(|n| !voters.contains(n) && !learners.contains(n))
                .collect();
            let name = handle.name();
            let task = tokio::spawn(async move {
                for n in missing {
                    let addr = addrs.get(&n).cloned().unwrap_or_default();
                    let added = with_lease(&raft, || raft.add_learner(n, addr.clone(), true)).await;
                    if let Err(e) = added {
                        warn!(queue = %name, node = n, error = %e, "adding a replica failed");
                        return;
                    }
                }
                let changed =
                    with_lease(&raft, || raft.change_membership(desired_set.clone(), false)).await;
                match changed {
                    Ok(_) => info!(queue = %name, "replica set changed"),
                    Err(e) => warn!(queue = %name, error = %e, "changing replicas failed"),
                }
            });
            changes.insert(group, (Instant::now(), task));
            continue;
        }
        // Leadership goes to the preferred replica once it is up and fully caught up, and not
        // while it is in doubt (back lately from a cut or a pause): its own view of who is down
        // is as old as the cut, and a leader commits that view in its recovery, releasing the
        // consumers of nodes it has not pinged since (see `LivenessTable::in_doubt`).
        if let Some(&preferred) = desired.first()
            && preferred != me
            && !liveness.is_down(preferred)
            && !liveness.in_doubt(preferred)
            && voters.contains(&preferred)
        {
            let last = m.last_log_index.unwrap_or(0);
            let caught_up = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&preferred).cloned().flatten())
                .is_some_and(|l| l.index >= last);
            if caught_up {
                let raft = raft.clone();
                let task = tokio::spawn(async move {
                    let _ = raft.trigger().transfer_leader(preferred).await;
                });
                changes.insert(group, (Instant::now(), task));
            }
        }
    }
}

/// A node is down or removed: its consumers and unsettled messages go from the queues this
/// node leads, and the metadata leader drops its exclusive queues, as if their connections
/// had closed.
fn node_gone(node: &Arc<Node>, gone: NodeId) {
    release_down_node(node, gone);
    if node.meta_leader() == Some(node.id()) {
        let n = node.clone();
        tokio::spawn(async move {
            let _ = n.meta_write(MetaCmd::NodeDown { node: gone }).await;
        });
    }
}

/// For every queue this node serves, the down node's consumers and unsettled messages go.
/// Only while this node leads: cut off from everyone, it would find every peer down, and the
/// command must not reach whoever leads once the cut heals (see `write_while_leading`).
fn release_down_node(node: &Node, down: NodeId) {
    for handle in node.registry().handles() {
        let term = handle.leader_term();
        if handle.is_leader()
            && term != 0
            && handle.is_replicated()
            && let Some(raft) = handle.raft()
        {
            tokio::spawn(write_while_leading(
                raft,
                Arc::downgrade(&handle),
                term,
                vec![QueueRequest::new(QueueCmd::NodeDown { node: down })],
            ));
        }
    }
}

/// A returning node's groups do not know their leaders (idle groups send no heartbeats):
/// every group this node leads and the returning node replicates gets one heartbeat round.
async fn announce_leadership(node: &Node, back: NodeId) {
    for handle in node.registry().handles() {
        if handle.is_leader()
            && handle.replicas().contains(&back)
            && let Some(raft) = handle.raft()
        {
            let _ = raft.trigger().heartbeat().await;
        }
    }
}

/// Returns true when it left elections for the next round (see ELECTIONS_PER_ROUND).
async fn drive_elections(
    node: &Node,
    handles: &[Arc<QueueHandle>],
    liveness: &LivenessTable,
    fallback: Duration,
    last_elect: &mut HashMap<u64, Instant>,
    leaderless_since: &mut HashMap<u64, Instant>,
) -> bool {
    let now = Instant::now();
    let me = node.id();
    let members = node.registry().members();
    let mut started = 0;
    for handle in handles {
        let Some(raft) = handle.raft() else { continue };
        let group = handle.id();
        let metrics = raft.metrics();
        let (state, leader) = {
            let m = metrics.borrow_watched();
            (m.state, m.current_leader)
        };
        if state == ServerState::Leader {
            leaderless_since.remove(&group);
            continue;
        }
        // A leader that left the cluster (removed by an operator) counts as down: its replicas
        // must not wait for it.
        let leader_ok =
            leader.is_some_and(|l| l != me && members.contains_key(&l) && !liveness.is_down(l));
        if leader_ok {
            leaderless_since.remove(&group);
            continue;
        }
        let initialized = raft.is_initialized().await.unwrap_or(true);
        if !initialized && !handle.may_initialize() {
            // A replica being added to an existing group waits for the leader's log.
            continue;
        }
        let voters: BTreeSet<NodeId> = if initialized {
            metrics
                .borrow_watched()
                .membership_config
                .membership()
                .voter_ids()
                .collect()
        } else {
            handle.replicas().into_iter().collect()
        };
        let since = *leaderless_since.entry(group).or_insert(now);
        // Candidates in preference order: the queue's replica list first, then any other
        // voter of the group (replicas being replaced still vote until the change commits).
        let mut order = handle.replicas();
        let extra: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|v| !order.contains(v))
            .collect();
        order.extend(extra);
        let alive: Vec<NodeId> = order
            .into_iter()
            .filter(|n| voters.contains(n))
            .filter(|n| *n == me || (members.contains_key(n) && !liveness.is_down(*n)))
            .collect();
        // The first live replica stands; if it has not managed within a few rounds (it may be
        // unreachable from here but not down), the others take their turn in order.
        let rank = alive.iter().position(|n| *n == me);
        let Some(rank) = rank else { continue };
        let waited = now.duration_since(since);
        // A replica ranked behind a live one stands only if that one has not managed for a
        // long while: the leader it elects, or a live leader it did not hear from yet (idle
        // groups are silent), announces itself long before that. The one exception is a
        // replica that just refused a candidate because the candidate's log is behind its own
        // (a leader dies with its followers at different points of its log) while the
        // candidate cannot win without this vote: it never will, so this replica stands at
        // once instead of leaving the queue without a leader for `fallback`. With enough other
        // live voters the candidate can still win, and a second one would only split the vote.
        let candidate_needs_me = alive.len() - 1 < voters.len() / 2 + 1;
        let turn = match rank {
            0 => Duration::ZERO,
            _ if candidate_needs_me
                && handle.refused_candidate_behind_within(STAND_AFTER_REFUSAL) =>
            {
                Duration::ZERO
            }
            r => fallback * u32::try_from(r).unwrap_or(u32::MAX),
        };
        if waited < turn {
            continue;
        }
        if last_elect
            .get(&group)
            .is_some_and(|t| now.duration_since(*t) < super::registry::ELECTION_RETRY)
        {
            continue;
        }
        // Elections are spread over rounds: after a full restart thousands of groups would
        // otherwise flood the peers with votes at once.
        if started >= ELECTIONS_PER_ROUND {
            return true;
        }
        started += 1;
        last_elect.insert(group, now);
        if !initialized {
            // The preferred leader never came up to initialize the group: the first live
            // replica does it, with the same replica set.
            let members = node.registry_basic_nodes(&handle.replicas());
            let _ = raft.initialize(members).await;
        }
        info!(queue = %handle.name(), ?leader, "starting an election");
        // Pre-vote first: a replica whose log is behind, or that is cut off from a leader the
        // others still follow, finds out without bumping the term and unseating anyone.
        let _ = raft.trigger().elect(true).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(1000);

    #[test]
    fn an_answering_peer_goes_down_after_the_failure_timeout_and_comes_back() {
        let table = LivenessTable::new(TIMEOUT);
        let t0 = Instant::now();
        assert_eq!(table.record(2, Some(1), t0), None);
        assert_eq!(table.record(2, None, t0 + TIMEOUT / 2), None);
        assert_eq!(table.record(2, None, t0 + TIMEOUT), Some(true));
        assert!(table.is_down(2));
        assert_eq!(table.record(2, None, t0 + TIMEOUT * 2), None);
        assert_eq!(table.record(2, Some(1), t0 + TIMEOUT * 3), Some(false));
        assert!(!table.is_down(2));
    }

    #[test]
    fn a_refused_ping_downs_a_peer_heard_before_at_once_but_one_never_heard_gets_its_grace() {
        let table = LivenessTable::new(TIMEOUT);
        let t0 = Instant::now();
        table.record(2, Some(1), t0);
        assert_eq!(table.record_refused(2, t0 + TIMEOUT / 10), Some(true));
        assert!(table.is_down(2));
        assert_eq!(
            table.record_refused(2, t0 + TIMEOUT / 5),
            None,
            "reported once"
        );
        assert_eq!(table.record(2, Some(2), t0 + TIMEOUT), Some(false));

        assert_eq!(table.record_refused(3, t0), None);
        assert!(!table.is_down(3), "may still be starting");
        assert_eq!(table.record_refused(3, t0 + NEVER_HEARD_GRACE), Some(true));
    }

    #[test]
    fn a_restarted_peer_is_reported_back_even_if_never_seen_down() {
        let table = LivenessTable::new(TIMEOUT);
        let t0 = Instant::now();
        table.record(2, Some(1), t0);
        assert_eq!(table.record(2, Some(2), t0), Some(false));
    }

    #[test]
    fn a_peer_never_heard_from_gets_a_grace_period_then_goes_down() {
        let table = LivenessTable::new(TIMEOUT);
        let t0 = Instant::now();
        assert_eq!(table.record(2, None, t0), None);
        assert_eq!(table.record(2, None, t0 + TIMEOUT * 2), None);
        assert_eq!(table.record(2, None, t0 + NEVER_HEARD_GRACE), Some(true));
    }

    #[test]
    fn peers_coming_back_as_the_same_run_and_stalls_raise_doubt() {
        let table = LivenessTable::new(TIMEOUT);
        let t0 = Instant::now();
        table.round(t0);
        assert!(!table.in_doubt(2));
        table.record(2, Some(1), t0);
        table.record(2, None, t0 + TIMEOUT);
        assert!(table.in_doubt(2), "a peer is down");
        assert!(!table.in_doubt(3), "only what that peer sends is in doubt");
        table.record(2, Some(1), Instant::now());
        assert!(table.in_doubt(2), "it came back as the same run");

        let table = LivenessTable::new(TIMEOUT);
        table.round(Instant::now());
        table.record(3, Some(1), t0);
        table.record(3, None, t0 + TIMEOUT);
        table.record(3, Some(2), Instant::now());
        assert!(
            !table.in_doubt(3),
            "a restarted peer sent nothing that is still on its way"
        );

        let table = LivenessTable::new(TIMEOUT);
        let later = Instant::now() + TIMEOUT * 3;
        table.round(later);
        assert!(
            table.in_doubt(2),
            "a round after a long gap: this node was stalled"
        );
    }

    #[test]
    fn a_hello_from_a_peer_that_never_answered_starts_its_failure_timeout() {
        let table = LivenessTable::new(TIMEOUT);
        let t0 = Instant::now();
        table.record(2, None, t0);
        table.note_hello(2);
        let after = Instant::now() + TIMEOUT;
        assert_eq!(table.record(2, None, after), Some(true));
        // A hello alone does not bring a down peer back: only its answers do.
        table.note_hello(2);
        assert!(table.is_down(2));
    }
}
