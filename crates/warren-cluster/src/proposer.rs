//! Getting a queue's commands to where the queue is served, in order, without losing or
//! doubling any: the proposer task behind every `QueueHandle` that is not an in-memory queue
//! of this node.
//!
//! It takes the commands submitted so far as one batch and writes them to this node's Raft
//! group if this node leads, or forwards them to the node that does (`PeerRequest::Submit`,
//! answered by `Node::handle_submit` with `write_local`). Up to `MAX_IN_FLIGHT` batches are on
//! their way at once, in this node's log or forwarded; every command carries its number from
//! this proposer and the queue refuses one that arrives after a gap, which keeps submission
//! order when an earlier batch is refused unlogged, lost or overtaken. A command
//! whose outcome is unknown (timeout, leader change) is sent again to the next leader:
//! enqueues carry their publisher's sequence number and every other queue command is idempotent, so a resend is
//! applied at most once. A Raft batch fails as a suffix — once an entry is rejected or
//! discarded, every later one is too — so resends never skip over a gap.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, ForwardReason};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::debug;
use warren_core::meta::Placement;
use warren_core::queue::QueueCmd;
use warren_core::submission_order::{Origin, ProposerId};
use warren_core::{ChannelRef, NodeId, NodeRun};

use crate::db::{decode, encode};
use crate::outbox::Liveness;
use crate::queue::{ClusterError, QueueHandle, ReplyTo, Submission};
use crate::queue_sm::QueueMachine;
use crate::transport::{Forwarded, PeerRequest, PeerResponse, Transport};
use crate::types::{GroupRequest, GroupResponse, QueueOutcome, QueueRequest, Raft};

/// The result of one command sent to a leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum ItemResult {
    Ok(QueueOutcome),
    /// Not applied: the receiver does not lead (it names who does, if it knows).
    NotLeader(Option<NodeId>),
    /// Outcome unknown or transient failure: send again.
    Retry(String),
}

const BATCH: usize = 1024;
/// Batches on their way and not yet answered: in this node's Raft log, or forwarded to the
/// leader. A batch can be refused unlogged (an expired lease, a lost leadership, a forward
/// lost or overtaken on the way) while the batch behind it is taken a moment later; the queue
/// then refuses the later one's commands as arriving after a gap (every command carries its
/// number from this proposer, see `warren_core::submission_order`), and both go again in
/// order. Without that check, resending the refused batch reordered the queue's commands and
/// its publishes, numbered below ones already taken, were dropped as resends after being
/// confirmed (lost messages, found by the chaos partition nemesis).
///
/// Forwards were one at a time until the same rule covered them: a publisher on a follower
/// sends its whole confirm window in a burst, the first few publishes left alone and the rest
/// waited a whole forward round trip behind them, so the producer-on-a-follower scenario ran
/// at two round trips per window (1.4x with several on their way, `docs/benchmarks.md`).
///
/// Sixteen: a publisher's confirm window is only refilled as confirms come back, so one
/// queue's rate is its window over the confirm latency, and a batch that waits for a slot adds
/// a whole round to it. With one queue on 3 nodes, four batches gave 1.28x the throughput of
/// two, eight 1.10x that of four and sixteen 1.05x that of eight (ten queues 1.03x, a single
/// node unchanged; thirty-two no more than sixteen; `docs/benchmarks.md`). An earlier
/// measurement that found no gain and a doubled end-to-end p99 with 10 queues was bounded by
/// the load generator's CPU.
const MAX_IN_FLIGHT: usize = 16;

/// A batch on its way: once answered, its commands, their outcomes in order, and the node
/// that was asked.
type InFlight = std::pin::Pin<
    Box<dyn Future<Output = (VecDeque<Submission>, Vec<ItemResult>, Option<NodeId>)> + Send>,
>;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How often a forward in flight checks whether its target was declared down.
const DOWN_POLL: Duration = Duration::from_millis(50);

/// Writes commands to this node's Raft group. A leader whose lease ran out while the group
/// was idle (no heartbeats flow between idle groups) renews it with one heartbeat round and
/// tries again.
pub(crate) async fn write_local(
    raft: &Raft<QueueMachine>,
    requests: &[QueueRequest],
) -> Vec<ItemResult> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (out, lease_expired) = match submit_local(raft, requests).await {
            Ok(submitted) => collect_local(submitted).await,
            Err(retry) => return vec![retry; requests.len()],
        };
        if !(lease_expired && attempts < 5) {
            return out;
        }
        let _ = raft.trigger().heartbeat().await;
        tokio::time::sleep(Duration::from_millis(5 * attempts)).await;
    }
}

type LocalResults = futures::stream::BoxStream<
    'static,
    Result<
        openraft::raft::WriteResult<crate::types::TypeConfig>,
        openraft::errors::Fatal<crate::types::TypeConfig>,
    >,
>;

/// A batch handed to the Raft group: the outcome of each of its log entries arrives on
/// `results`, and entry `i` carries `commands[i]` of the batch's commands.
struct Submitted {
    results: LocalResults,
    commands: Vec<usize>,
}

/// Most commands one log entry carries, and most message bytes: an entry is replicated
/// whole, and up to `max_payload_entries` of them travel in one message to a follower.
const ENTRY_COMMANDS: usize = 128;
const ENTRY_BYTES: usize = 64 * 1024;

/// Groups consecutive commands into log entries: one command alone as `Queue`, several as
/// a `QueueBatch` (applied in order, as separate entries would be; what the log and the
/// replication cost per entry is paid once for all). Returns the entries and how many
/// commands each carries.
fn entries_of<'a>(
    requests: impl IntoIterator<Item = &'a QueueRequest>,
    at_ms: u64,
) -> (Vec<GroupRequest>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut commands = Vec::new();
    let mut current: Vec<QueueRequest> = Vec::new();
    let mut bytes = 0;
    let mut close = |current: &mut Vec<QueueRequest>| {
        commands.push(current.len());
        entries.push(if current.len() == 1 {
            GroupRequest::Queue(current.pop().expect("one command"))
        } else {
            GroupRequest::QueueBatch(std::mem::take(current))
        });
    };
    for request in requests {
        let size = request
            .content
            .as_ref()
            .map_or(0, |c| c.body.len() + c.properties.len());
        if !current.is_empty() && (current.len() >= ENTRY_COMMANDS || bytes + size > ENTRY_BYTES) {
            close(&mut current);
            bytes = 0;
        }
        let mut request = request.clone();
        // The leader's clock decides when messages expire; replicas read it from the entry.
        request.at_ms = at_ms;
        current.push(request);
        bytes += size;
    }
    if !current.is_empty() {
        close(&mut current);
    }
    (entries, commands)
}

/// Hands a batch to this node's Raft group and returns as soon as it is queued for the log:
/// the outcomes arrive on the returned stream, in order, once the entries are applied.
async fn submit_local<'a>(
    raft: &Raft<QueueMachine>,
    requests: impl IntoIterator<Item = &'a QueueRequest>,
) -> Result<Submitted, ItemResult> {
    let (entries, commands) = entries_of(requests, crate::types::now_ms());
    let results = raft
        .client_write_many(entries)
        .await
        .map_err(|fatal| ItemResult::Retry(fatal.to_string()))?;
    Ok(Submitted { results, commands })
}

/// The outcome of one queue command as its entry's response gives it.
fn command_result(response: GroupResponse) -> ItemResult {
    match response {
        GroupResponse::Queue(outcome) => ItemResult::Ok(outcome),
        GroupResponse::OutOfOrder => {
            ItemResult::Retry("an earlier command of its proposer was not taken".into())
        }
        other => ItemResult::Retry(format!("unexpected response {other:?}")),
    }
}

/// The outcomes of a submitted batch, one per command, and whether the leader refused it for
/// an expired lease.
async fn collect_local(submitted: Submitted) -> (Vec<ItemResult>, bool) {
    let Submitted {
        mut results,
        commands,
    } = submitted;
    let expected: usize = commands.iter().sum();
    let mut out = Vec::with_capacity(expected);
    let mut lease_expired = false;
    let mut sizes = commands.into_iter();
    while let Some(result) = results.next().await {
        let Some(size) = sizes.next() else { break };
        let whole = |r: ItemResult| vec![r; size];
        let mut items = match result {
            Ok(Ok(resp)) => match resp.response {
                GroupResponse::QueueBatch(responses) => {
                    responses.into_iter().map(command_result).collect()
                }
                single => vec![command_result(single)],
            },
            Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                if f.reason == ForwardReason::LeaseExpired {
                    lease_expired = true;
                    whole(ItemResult::Retry("leader lease expired".into()))
                } else {
                    whole(ItemResult::NotLeader(f.leader_id))
                }
            }
            Ok(Err(e)) => whole(ItemResult::Retry(e.to_string())),
            Err(fatal) => whole(ItemResult::Retry(fatal.to_string())),
        };
        // Built only when missing: this runs for every entry of every batch.
        items.resize_with(size, || ItemResult::Retry("missing result".into()));
        out.extend(items);
    }
    out.resize_with(expected, || {
        ItemResult::Retry("write was not answered".into())
    });
    (out, lease_expired)
}

pub(crate) struct ProposerContext {
    pub node: NodeId,
    pub run: NodeRun,
    pub transport: Arc<dyn Transport>,
    pub liveness: Arc<dyn Liveness>,
    /// Numbers the proposers of this run, so each has its own command numbering.
    pub serials: AtomicU64,
}

/// Numbers the commands of one proposer, 1, 2, 3, … in the order it first sends them.
struct Numbering {
    proposer: ProposerId,
    next: u64,
}

impl Numbering {
    fn new(ctx: &ProposerContext) -> Self {
        Numbering {
            proposer: ProposerId {
                run: ctx.run,
                serial: ctx.serials.fetch_add(1, Ordering::Relaxed) + 1,
            },
            next: 1,
        }
    }

    /// Stamps commands not sent before; a resend keeps its number.
    fn stamp(&mut self, batch: &mut VecDeque<Submission>) {
        for (request, _) in batch.iter_mut() {
            if request.origin.is_none() {
                request.origin = Some(Origin {
                    proposer: self.proposer,
                    seq: self.next,
                });
                self.next += 1;
            }
        }
    }
}

enum Target {
    Local(Raft<QueueMachine>),
    Remote(NodeId),
    Unknown,
    /// The queue lives only on a node that is down: nothing can take the command.
    Unavailable,
}

fn target(handle: &QueueHandle, ctx: &ProposerContext) -> Target {
    if let Some(raft) = handle.raft() {
        let leader = raft.metrics().borrow_watched().current_leader;
        return match leader {
            Some(n) if n == ctx.node => Target::Local(raft),
            Some(n) => Target::Remote(n),
            None => Target::Unknown,
        };
    }
    match handle.def().placement {
        Placement::Local { run } => {
            if ctx.liveness.is_down(run.node) {
                Target::Unavailable
            } else {
                Target::Remote(run.node)
            }
        }
        Placement::Replicated { replicas, .. } => match handle.leader_hint() {
            // Without a running replica this node cannot lead: a hint naming it is left over
            // from before it left the group (or restarted), and asking itself would loop.
            Some(n) if n == ctx.node => {
                handle.set_leader_hint(None);
                target(handle, ctx)
            }
            Some(n) => Target::Remote(n),
            None => {
                // Ask the replicas in turn, skipping down ones; the one asked answers with
                // the leader it knows.
                let alive: Vec<NodeId> = replicas
                    .iter()
                    .copied()
                    .filter(|n| !ctx.liveness.is_down(*n))
                    .collect();
                if alive.is_empty() {
                    Target::Unknown
                } else {
                    let pick = alive[rand_index(alive.len())];
                    Target::Remote(pick)
                }
            }
        },
    }
}

fn rand_index(n: usize) -> usize {
    // Spreading retries over replicas needs no strong randomness: the clock's low bits do.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0);
    nanos % n.max(1)
}

async fn forward(
    ctx: &ProposerContext,
    node: NodeId,
    queue: u64,
    requests: &[QueueRequest],
) -> Vec<ItemResult> {
    let encoded: Result<Vec<Vec<u8>>, _> = requests.iter().map(encode).collect();
    let encoded = match encoded {
        Ok(e) => e,
        Err(e) => return vec![ItemResult::Retry(e.to_string()); requests.len()],
    };
    let call = ctx.transport.call(
        node,
        PeerRequest::Submit {
            queue,
            requests: encoded,
        },
        FORWARD_TIMEOUT,
    );
    let all = |r: ItemResult| vec![r; requests.len()];
    // A node that dies or is cut off mid-call would hold the batch for the whole timeout;
    // once the failure detector says so, the outcome is unknown and the batch goes to the
    // next leader (resends are applied at most once).
    let watch_down = async {
        loop {
            tokio::time::sleep(DOWN_POLL).await;
            if ctx.liveness.is_down(node) {
                return;
            }
        }
    };
    let answer = tokio::select! {
        answer = call => answer,
        () = watch_down => return all(ItemResult::Retry(format!("node {node} went down"))),
    };
    match answer {
        Ok(PeerResponse::Submit(Forwarded::Ok(items))) => {
            let mut out: Vec<ItemResult> = items
                .iter()
                .map(|b| {
                    decode::<ItemResult>(b).unwrap_or_else(|e| ItemResult::Retry(e.to_string()))
                })
                .collect();
            out.resize(requests.len(), ItemResult::Retry("missing result".into()));
            out
        }
        Ok(PeerResponse::Submit(Forwarded::NotLeader(hint))) => all(ItemResult::NotLeader(hint)),
        Ok(PeerResponse::Submit(Forwarded::Error(e))) => all(ItemResult::Retry(e)),
        Ok(other) => all(ItemResult::Retry(format!("unexpected response {other:?}"))),
        Err(e) => all(ItemResult::Retry(e.to_string())),
    }
}

/// The proposer task of one queue handle on this node.
///
/// Up to `MAX_IN_FLIGHT` batches are on their way at once — in the Raft log while this node
/// leads the queue, forwarded to the leader otherwise — answered in submission order, while
/// the next batch gathers (what arrives meanwhile shares the next commit's fsync). Any other
/// case (no leader known, a failed batch) goes one batch at a time through `settle`, after
/// everything on its way has been answered, which keeps submission order across resends.
pub(crate) async fn run(
    handle: Weak<QueueHandle>,
    mut rx: mpsc::UnboundedReceiver<Submission>,
    ctx: Arc<ProposerContext>,
) {
    let mut numbering = Numbering::new(&ctx);
    let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    loop {
        let batch = tokio::select! {
            biased;
            Some((pending, results, asked)) = in_flight.next(), if !in_flight.is_empty() => {
                let Some(h) = handle.upgrade() else {
                    let mut pending = pending;
                    fail_all(&mut pending, &mut rx, ClusterError::ShuttingDown);
                    return;
                };
                let (mut retry, _) = answer(&h, ctx.node, pending, results, asked);
                if retry.is_empty() {
                    continue;
                }
                // A failed batch: whatever was submitted after it is answered first (in
                // order), then every command still unanswered is resent one batch at a time.
                drop(h);
                while let Some((pending, results, asked)) = in_flight.next().await {
                    let Some(h) = handle.upgrade() else { break };
                    let (more, _) = answer(&h, ctx.node, pending, results, asked);
                    retry.extend(more);
                }
                retry
            }
            first = rx.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = first else { break };
                let mut pending: VecDeque<Submission> = VecDeque::from([first]);
                while pending.len() < BATCH {
                    match rx.try_recv() {
                        Ok(s) => pending.push_back(s),
                        Err(_) => break,
                    }
                }
                let mut pending = coalesce_acks(pending);
                numbering.stamp(&mut pending);
                // A queue that is gone is answered by the slow path.
                let target = handle
                    .upgrade()
                    .filter(|h| !h.is_closed())
                    .map(|h| (target(&h, &ctx), h.id()));
                match target {
                    Some((Target::Local(raft), _)) => {
                        // `entries_of` copies each command into its entry, once.
                        match submit_local(&raft, pending.iter().map(|(r, _)| r)).await {
                            Ok(submitted) => {
                                let asked = Some(ctx.node);
                                in_flight.push_back(Box::pin(async move {
                                    let (out, _) = collect_local(submitted).await;
                                    (pending, out, asked)
                                }));
                                continue;
                            }
                            Err(_) => pending,
                        }
                    }
                    Some((Target::Remote(node), queue)) => {
                        let requests: Vec<QueueRequest> =
                            pending.iter().map(|(r, _)| r.clone()).collect();
                        let ctx = ctx.clone();
                        in_flight.push_back(Box::pin(async move {
                            let out = forward(&ctx, node, queue, &requests).await;
                            (pending, out, Some(node))
                        }));
                        continue;
                    }
                    _ => pending,
                }
            }
            else => break,
        };
        // The slow path keeps order: what is still in flight was submitted before `batch`, so
        // whatever of it must be sent again goes first.
        let mut earlier = VecDeque::new();
        while let Some((pending, results, asked)) = in_flight.next().await {
            let Some(h) = handle.upgrade() else { break };
            earlier.extend(answer(&h, ctx.node, pending, results, asked).0);
        }
        earlier.extend(batch);
        if !settle(&handle, &mut rx, &ctx, earlier).await {
            return;
        }
    }
    while let Some((pending, results, asked)) = in_flight.next().await {
        let Some(h) = handle.upgrade() else { break };
        answer(&h, ctx.node, pending, results, asked);
    }
}

/// Merges each channel's acks in a batch into one command: a consumer acking every message
/// would otherwise cost a log entry (a write, a read, an apply) per message. An ack joins an
/// earlier one of its channel only across publishes and other channels' acks, which it does
/// not depend on; any other command of the queue ends the merging, so nothing of the same
/// channel, and nothing queue-wide, changes order. Only acks nobody waits on are merged.
fn coalesce_acks(pending: VecDeque<Submission>) -> VecDeque<Submission> {
    let mut out: VecDeque<Submission> = VecDeque::with_capacity(pending.len());
    let mut open: HashMap<ChannelRef, usize> = HashMap::new();
    for (request, reply) in pending {
        match (&request.cmd, &reply) {
            (QueueCmd::Settle { channel, msgs }, ReplyTo::None) => {
                if let Some(&at) = open.get(channel)
                    && let QueueCmd::Settle { msgs: into, .. } = &mut out[at].0.cmd
                {
                    into.extend_from_slice(msgs);
                    continue;
                }
                open.insert(*channel, out.len());
            }
            (QueueCmd::Enqueue { .. }, _) => {}
            (QueueCmd::Settle { channel, .. }, _) => {
                open.remove(channel);
            }
            _ => open.clear(),
        }
        out.push_back((request, reply));
    }
    out
}

/// Gets one batch applied wherever the queue is served, resending what is not known to be
/// applied until it is. False when the queue or the node is gone (everything was answered).
async fn settle(
    handle: &Weak<QueueHandle>,
    rx: &mut mpsc::UnboundedReceiver<Submission>,
    ctx: &ProposerContext,
    mut pending: VecDeque<Submission>,
) -> bool {
    let mut backoff = Duration::from_millis(5);
    while !pending.is_empty() {
        let Some(h) = handle.upgrade() else {
            fail_all(&mut pending, rx, ClusterError::ShuttingDown);
            return false;
        };
        if h.is_closed() {
            fail_all(&mut pending, rx, ClusterError::QueueGone(h.name()));
            return false;
        }
        let requests: Vec<QueueRequest> = pending.iter().map(|(r, _)| r.clone()).collect();
        let (results, asked) = match target(&h, ctx) {
            Target::Local(raft) => (write_local(&raft, &requests).await, Some(ctx.node)),
            Target::Remote(node) => (forward(ctx, node, h.id(), &requests).await, Some(node)),
            Target::Unknown => (
                vec![ItemResult::Retry("no leader known".into()); requests.len()],
                None,
            ),
            Target::Unavailable => {
                let e = ClusterError::QueueUnavailable(h.name());
                for (_, reply) in pending.drain(..) {
                    reply.send(Err(e.clone()));
                }
                break;
            }
        };
        let (retry, redirect) = answer(&h, ctx.node, pending, results, asked);
        pending = retry;
        if !pending.is_empty() && !redirect {
            // A replica goes again as soon as its group knows another leader than the one
            // that failed (or any, if none was known) rather than when the backoff ends:
            // after a start or a leader's death the doubling sleeps overshot the election
            // by up to half its length.
            let raft = h.raft();
            drop(h);
            match raft {
                Some(raft) => {
                    let _ = raft
                        .wait(Some(backoff))
                        .metrics(
                            |m| m.current_leader.is_some() && m.current_leader != asked,
                            "another leader is known",
                        )
                        .await;
                }
                None => tokio::time::sleep(backoff).await,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    true
}

/// Answers the commands of a batch that were applied and returns, in order, those to send
/// again, and whether the node asked named another leader to ask.
fn answer(
    h: &QueueHandle,
    node: NodeId,
    pending: VecDeque<Submission>,
    results: Vec<ItemResult>,
    asked: Option<NodeId>,
) -> (VecDeque<Submission>, bool) {
    let mut retry = VecDeque::new();
    let mut redirect = false;
    for ((request, reply), result) in pending.into_iter().zip(results) {
        match result {
            ItemResult::Ok(outcome) if retry.is_empty() => reply.send(Ok(outcome)),
            ItemResult::Ok(outcome) => {
                // Cannot happen for a Raft batch (failures form a suffix); answering it is
                // still right, the command was applied.
                debug!(queue = h.id(), "success after a failure in one batch");
                reply.send(Ok(outcome));
            }
            ItemResult::NotLeader(hint) => {
                // A hint naming the node asked, or this one without a replica, is stale: ask
                // around instead.
                let hint = hint.filter(|n| Some(*n) != asked);
                if hint.is_some() {
                    redirect = true;
                }
                h.set_leader_hint(hint);
                retry.push_back((request, reply));
            }
            ItemResult::Retry(reason) => {
                debug!(queue = h.id(), ?asked, %reason, "queue command will be retried");
                if asked.is_some() && asked != Some(node) {
                    h.set_leader_hint(None);
                }
                retry.push_back((request, reply));
            }
        }
    }
    (retry, redirect)
}

fn fail_all(
    pending: &mut VecDeque<Submission>,
    rx: &mut mpsc::UnboundedReceiver<Submission>,
    error: ClusterError,
) {
    for (_, reply) in pending.drain(..) {
        reply.send(Err(error.clone()));
    }
    rx.close();
    while let Ok((_, reply)) = rx.try_recv() {
        reply.send(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::{ConnectionRef, NodeRun};

    fn channel(n: u16) -> ChannelRef {
        ChannelRef {
            conn: ConnectionRef {
                run: NodeRun {
                    node: 1,
                    incarnation: 1,
                },
                conn: 1,
            },
            channel: n,
            opened: 1,
        }
    }

    fn ack(ch: u16, msgs: &[u64]) -> Submission {
        let cmd = QueueCmd::Settle {
            channel: channel(ch),
            msgs: msgs.to_vec(),
        };
        (QueueRequest::new(cmd), ReplyTo::None)
    }

    fn cmds(batch: VecDeque<Submission>) -> Vec<QueueCmd> {
        batch.into_iter().map(|(r, _)| r.cmd).collect()
    }

    fn settle(ch: u16, msgs: &[u64]) -> QueueCmd {
        QueueCmd::Settle {
            channel: channel(ch),
            msgs: msgs.to_vec(),
        }
    }

    #[test]
    fn acks_of_one_channel_merge_across_other_channels_acks() {
        let batch = VecDeque::from([ack(1, &[1]), ack(2, &[2]), ack(1, &[3]), ack(2, &[4])]);
        assert_eq!(
            cmds(coalesce_acks(batch)),
            vec![settle(1, &[1, 3]), settle(2, &[2, 4])]
        );
    }

    #[test]
    fn another_command_ends_the_merging() {
        let requeue = QueueCmd::Requeue {
            channel: channel(1),
            msgs: vec![9],
        };
        let batch = VecDeque::from([
            ack(1, &[1]),
            (QueueRequest::new(requeue.clone()), ReplyTo::None),
            ack(1, &[2]),
            ack(2, &[3]),
            (QueueRequest::new(QueueCmd::Purge), ReplyTo::None),
            ack(2, &[4]),
        ]);
        assert_eq!(
            cmds(coalesce_acks(batch)),
            vec![
                settle(1, &[1]),
                requeue,
                settle(1, &[2]),
                settle(2, &[3]),
                QueueCmd::Purge,
                settle(2, &[4]),
            ]
        );
    }

    #[test]
    fn an_ack_someone_waits_on_is_not_merged() {
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let waited = (QueueRequest::new(settle(1, &[2])), ReplyTo::Oneshot(tx));
        let batch = VecDeque::from([ack(1, &[1]), waited, ack(1, &[3])]);
        assert_eq!(
            cmds(coalesce_acks(batch)),
            vec![settle(1, &[1]), settle(1, &[2]), settle(1, &[3])]
        );
    }

    fn publish(body_len: usize) -> QueueRequest {
        QueueRequest::with_content(
            QueueCmd::Enqueue {
                meta: warren_core::queue::MessageMeta {
                    size: body_len as u64,
                    ..Default::default()
                },
                publisher: None,
            },
            warren_core::message::MessageContent {
                exchange: Default::default(),
                routing_key: Default::default(),
                properties: bytes::Bytes::new(),
                body: bytes::Bytes::from(vec![b'x'; body_len]),
            },
        )
    }

    /// The commands of the entries, in log order, with the time each carries.
    fn flatten(entries: Vec<GroupRequest>) -> Vec<(QueueCmd, u64)> {
        entries
            .into_iter()
            .flat_map(|e| match e {
                GroupRequest::Queue(r) => vec![r],
                GroupRequest::QueueBatch(rs) => {
                    assert!(rs.len() > 1, "a batch entry of one command");
                    rs
                }
                GroupRequest::Meta(_) => panic!("a metadata entry"),
            })
            .map(|r| (r.cmd, r.at_ms))
            .collect()
    }

    #[test]
    fn one_command_is_a_plain_entry() {
        let (entries, commands) = entries_of(&[QueueRequest::new(QueueCmd::Purge)], 7);
        assert_eq!(commands, vec![1]);
        assert!(matches!(&entries[..], [GroupRequest::Queue(r)] if r.at_ms == 7));
    }

    #[test]
    fn commands_share_entries_up_to_the_count_limit_in_order() {
        let requests: Vec<QueueRequest> = (0..ENTRY_COMMANDS as u64 * 2 + 3)
            .map(|n| QueueRequest::new(settle(1, &[n])))
            .collect();
        let (entries, commands) = entries_of(&requests, 42);
        assert_eq!(commands, vec![ENTRY_COMMANDS, ENTRY_COMMANDS, 3]);
        let expected: Vec<(QueueCmd, u64)> = requests.into_iter().map(|r| (r.cmd, 42)).collect();
        assert_eq!(flatten(entries), expected);
    }

    #[test]
    fn message_bytes_close_an_entry() {
        // Three quarters of the limit each: every entry holds one message.
        let big = ENTRY_BYTES * 3 / 4;
        let requests = vec![publish(big), publish(big), publish(10), publish(10)];
        let (entries, commands) = entries_of(&requests, 1);
        assert_eq!(commands, vec![1, 3]);
        assert!(
            matches!(&entries[..], [GroupRequest::Queue(_), GroupRequest::QueueBatch(b)] if b.len() == 3)
        );
        // A message larger than the limit still gets an entry, of its own.
        let (_, commands) = entries_of(&[publish(10), publish(ENTRY_BYTES * 2), publish(10)], 1);
        assert_eq!(commands, vec![1, 1, 1]);
    }
}
