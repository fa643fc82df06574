//! Atomic transaction commits across queues (ADR 0005): the coordinator a committing
//! connection runs, and the recovery that resolves transactions whose coordinator is gone.
//!
//! Each queue is its own Raft group, so a commit touching several queues cannot be one log
//! entry. The coordinator stages the work in every queue (`QueueCmd::TxStage`), has the
//! metadata group decide (`MetaCmd::TxDecide`: the first decision for a transaction stands),
//! then resolves every queue (`QueueCmd::TxResolve`) and lets the metadata forget the
//! decision. A queue's leader that holds staged work whose coordinator's node went down or
//! restarted, or that waited too long, asks the metadata itself: a decision there is applied,
//! and with none it decides an abort, which a commit decided just before outvotes. Neighbours:
//! the queue state machine keeps the staged work (`warren_core::queue`), the metadata state
//! the decisions (`warren_core::meta`), the server's connection is the coordinator's caller,
//! and the supervisor drives [`Recovery`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};
use warren_core::meta::{MetaCmd, MetaReply};
use warren_core::queue::{QueueCmd, QueueReply, TxWork};
use warren_core::{AmqpError, MessageContent, TxId};

use crate::node::Node;
use crate::queue::{ClusterError, QueueHandle, ReplyTo};
use crate::types::{QueueOutcome, QueueRequest, now_ms};

/// How long the coordinator waits for every queue to stage its part.
const STAGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the coordinator waits for the queues to apply the decision; a queue that does
/// not answer in time applies it later through recovery.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);
/// Staged work older than this (by the leader's clock) is resolved by the queue's leader even
/// if its coordinator's node looks alive: the coordinator gave up or lost its answers.
const PATIENCE_MS: u64 = 20_000;
/// How long recovery leaves a transaction alone after trying to resolve it.
const RETRY_AFTER: Duration = Duration::from_secs(10);

type Answer = oneshot::Receiver<Result<QueueOutcome, ClusterError>>;

/// A commit's stages, submitted to their queues and waiting for their answers.
pub struct Staging {
    tx: TxId,
    queues: BTreeMap<u64, Arc<QueueHandle>>,
    answers: Vec<(Arc<QueueHandle>, Answer)>,
}

/// Why a commit did not take effect (the transaction was aborted everywhere), or why its
/// outcome is unknown to the coordinator (queues resolve it later, all the same way).
#[derive(Debug)]
pub struct TxFailure {
    pub error: AmqpError,
}

impl Staging {
    /// Submits one stage per piece of work at once, in order: a command the connection sends
    /// after this (a channel's close) reaches each queue after its stages.
    pub fn submit(
        tx: TxId,
        work: impl IntoIterator<Item = (Arc<QueueHandle>, TxWork, Option<MessageContent>)>,
    ) -> Staging {
        let mut staging = Staging {
            tx,
            queues: BTreeMap::new(),
            answers: Vec::new(),
        };
        for (part, (handle, work, content)) in work.into_iter().enumerate() {
            let cmd = QueueCmd::TxStage {
                tx,
                part: part as u32,
                work,
            };
            let request = match content {
                Some(content) => QueueRequest::with_content(cmd, content),
                None => QueueRequest::new(cmd),
            };
            let (reply, answer) = oneshot::channel();
            handle.submit(request, ReplyTo::Oneshot(reply));
            staging.queues.insert(handle.id(), handle.clone());
            staging.answers.push((handle, answer));
        }
        staging
    }

    /// Runs the commit to its end: `Ok` once it is decided as committed (every queue applies
    /// it, now or through recovery), `Err` when it was aborted or its outcome is unknown.
    pub async fn commit(self, node: &Node) -> Result<(), TxFailure> {
        let Staging {
            tx,
            queues,
            answers,
        } = self;
        if queues.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + STAGE_TIMEOUT;
        let mut refusal = None;
        for (handle, answer) in answers {
            let error = match tokio::time::timeout_at(deadline, answer).await {
                // A duplicate is a resend of a stage the queue already holds.
                Ok(Ok(Ok(QueueOutcome {
                    reply: QueueReply::Staged { .. } | QueueReply::Duplicate,
                    ..
                }))) => continue,
                Ok(Ok(Ok(QueueOutcome {
                    reply: QueueReply::Error(e),
                    ..
                }))) => e,
                Ok(Ok(Ok(other))) => {
                    AmqpError::internal(format!("unexpected reply to a stage: {:?}", other.reply))
                }
                Ok(Ok(Err(ClusterError::QueueGone(name)))) => {
                    AmqpError::not_found(format!("queue '{name}' was deleted during the commit"))
                }
                Ok(Ok(Err(e))) => AmqpError::internal(format!("commit not staged: {e}")),
                Ok(Err(_)) | Err(_) => AmqpError::internal(format!(
                    "queue '{}' did not stage its part of the commit in time",
                    handle.name()
                )),
            };
            refusal.get_or_insert(error);
        }
        let commit = match node
            .meta_commit(MetaCmd::TxDecide {
                tx,
                commit: refusal.is_none(),
            })
            .await
        {
            Ok(MetaReply::TxDecided { commit }) => commit,
            Ok(other) => {
                return Err(TxFailure {
                    error: AmqpError::internal(format!("unexpected decision reply {other:?}")),
                });
            }
            // Undecided as far as this coordinator knows: the queues' leaders decide (an
            // abort, unless this decision did commit) once their patience runs out.
            Err(e) => {
                return Err(TxFailure {
                    error: AmqpError::internal(format!("commit outcome unknown: {e}")),
                });
            }
        };
        let resolves = queues.values().map(|h| {
            tokio::time::timeout(
                RESOLVE_TIMEOUT,
                h.call(QueueCmd::TxResolve { tx, commit }, None),
            )
        });
        let all_resolved = futures::future::join_all(resolves)
            .await
            .into_iter()
            .all(|r| matches!(r, Ok(Ok(_))));
        if all_resolved {
            // Every queue applied it: nobody needs the decision any more. If this write is
            // lost the decision stays, a few dozen bytes.
            let _ = node.meta_commit(MetaCmd::TxForget { tx }).await;
        }
        if commit {
            Ok(())
        } else {
            Err(TxFailure {
                error: refusal.unwrap_or_else(|| {
                    AmqpError::internal("the commit was aborted: its coordinator was presumed gone")
                }),
            })
        }
    }
}

/// Resolves transactions staged in queues this node leads whose coordinator is gone; run by
/// the supervisor over the queues it looks at each round.
#[derive(Default)]
pub(crate) struct Recovery {
    tried: HashMap<(u64, TxId), Instant>,
}

impl Recovery {
    pub(crate) fn round(&mut self, node: &Arc<Node>, handles: &[Arc<QueueHandle>]) {
        let now = Instant::now();
        self.tried
            .retain(|_, at| now.duration_since(*at) < RETRY_AFTER);
        let wall = now_ms();
        for handle in handles.iter().filter(|h| h.is_leader()) {
            for pending in handle.pending_txs() {
                let waited = wall.saturating_sub(pending.staged_at_ms) >= PATIENCE_MS;
                if !(pending.orphaned || waited) {
                    continue;
                }
                let key = (handle.id(), pending.tx);
                if self.tried.contains_key(&key) {
                    continue;
                }
                self.tried.insert(key, now);
                tokio::spawn(resolve_orphan(
                    Arc::downgrade(node),
                    handle.clone(),
                    pending.tx,
                ));
            }
        }
    }
}

async fn resolve_orphan(node: Weak<Node>, handle: Arc<QueueHandle>, tx: TxId) {
    let Some(node) = node.upgrade() else { return };
    let known = node.meta().tx_decision(&tx);
    let commit = match known {
        Some(commit) => commit,
        None => match node
            .meta_commit(MetaCmd::TxDecide { tx, commit: false })
            .await
        {
            Ok(MetaReply::TxDecided { commit }) => commit,
            other => {
                warn!(queue = %handle.name(), ?tx, ?other, "could not decide an orphaned transaction");
                return;
            }
        },
    };
    drop(node);
    info!(queue = %handle.name(), ?tx, commit, "resolving a transaction whose coordinator is gone");
    let resolve = handle.call(QueueCmd::TxResolve { tx, commit }, None);
    match tokio::time::timeout(RESOLVE_TIMEOUT, resolve).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(queue = %handle.name(), ?tx, error = %e, "could not resolve an orphaned transaction")
        }
        Err(_) => warn!(queue = %handle.name(), ?tx, "resolving an orphaned transaction timed out"),
    }
}
