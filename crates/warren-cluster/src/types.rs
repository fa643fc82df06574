//! The openraft type configuration shared by every Raft group of a node, and the requests and
//! responses its log carries.
//!
//! One configuration serves the metadata group and all queue groups, so one network service
//! and one log-store implementation carry them all; the state machines (`meta_sm`,
//! `queue_sm`) each accept only their own kind of request.

use std::fmt;

use serde::{Deserialize, Serialize};
use warren_core::MessageContent;
use warren_core::meta::{MetaCmd, MetaReply};
use warren_core::queue::{QueueCmd, QueueReply};
use warren_core::submission_order::Origin;

openraft::declare_raft_types!(
    /// Raft types of Warren's groups: u64 node ids, default entries and vote.
    pub TypeConfig:
        D = GroupRequest,
        R = GroupResponse,
);

pub type Raft<SM> = openraft::Raft<TypeConfig, SM>;

/// A command for a queue, with the message content when it is an enqueue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueRequest {
    pub cmd: QueueCmd,
    pub content: Option<MessageContent>,
    /// The time the command takes effect (ms since the epoch), stamped by the queue's leader
    /// as it writes the command to the log, so every replica expires the same messages.
    /// Zero until then.
    #[serde(default)]
    pub at_ms: u64,
    /// The proposer that sent it and the command's number among its commands, stamped as the
    /// proposer first sends it; the queue refuses a command that arrives after a gap
    /// (`warren_core::submission_order`). None for commands written outside a proposer.
    #[serde(default)]
    pub origin: Option<Origin>,
}

impl QueueRequest {
    pub fn new(cmd: QueueCmd) -> Self {
        QueueRequest {
            cmd,
            content: None,
            at_ms: 0,
            origin: None,
        }
    }

    pub fn with_content(cmd: QueueCmd, content: MessageContent) -> Self {
        QueueRequest {
            cmd,
            content: Some(content),
            at_ms: 0,
            origin: None,
        }
    }
}

/// The wall clock in ms since the epoch, as queue leaders stamp it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A queue command's result; `content` carries the message of a basic.get.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueOutcome {
    pub reply: QueueReply,
    pub content: Option<MessageContent>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GroupRequest {
    Meta(MetaCmd),
    Queue(QueueRequest),
    /// Several commands of one proposer in one log entry, applied in order as if each had
    /// its own: what openraft, the log store and replication cost per entry is paid once
    /// for the batch. A batch is written, replicated and committed whole, so it never
    /// splits the way a run of entries can fail as a suffix.
    QueueBatch(Vec<QueueRequest>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GroupResponse {
    /// For blank and membership entries, and for requests sent to the wrong kind of group.
    Empty,
    Meta(MetaReply),
    Queue(QueueOutcome),
    /// A queue command refused unapplied: an earlier command of its proposer was not taken
    /// yet. The proposer sends it again after that one.
    OutOfOrder,
    /// One response (`Queue` or `OutOfOrder`) per command of a `QueueBatch`, in order.
    QueueBatch(Vec<GroupResponse>),
}

impl fmt::Display for GroupRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupRequest::Meta(cmd) => write!(f, "meta:{}", meta_name(cmd)),
            GroupRequest::Queue(req) => write!(f, "queue:{}", queue_name(&req.cmd)),
            GroupRequest::QueueBatch(reqs) => write!(f, "queue-batch:{}", reqs.len()),
        }
    }
}

fn meta_name(cmd: &MetaCmd) -> &'static str {
    match cmd {
        MetaCmd::DeclareExchange(_) => "declare-exchange",
        MetaCmd::DeleteExchange { .. } => "delete-exchange",
        MetaCmd::DeclareQueue(_) => "declare-queue",
        MetaCmd::DeleteQueue { .. } => "delete-queue",
        MetaCmd::Bind(_) => "bind",
        MetaCmd::Unbind(_) => "unbind",
        MetaCmd::ConnectionClosed { .. } => "connection-closed",
        MetaCmd::NodeRestarted { .. } => "node-restarted",
        MetaCmd::SetReplicas { .. } => "set-replicas",
        MetaCmd::AddVhost { .. } => "add-vhost",
        MetaCmd::DeleteVhost { .. } => "delete-vhost",
        MetaCmd::PutUser { .. } => "put-user",
        MetaCmd::DeleteUser { .. } => "delete-user",
        MetaCmd::SetPermissions { .. } => "set-permissions",
        MetaCmd::ClearPermissions { .. } => "clear-permissions",
        MetaCmd::SetPolicy { .. } => "set-policy",
        MetaCmd::ClearPolicy { .. } => "clear-policy",
        MetaCmd::NodeDown { .. } => "node-down",
        MetaCmd::TxDecide { .. } => "tx-decide",
        MetaCmd::TxForget { .. } => "tx-forget",
    }
}

fn queue_name(cmd: &QueueCmd) -> &'static str {
    match cmd {
        QueueCmd::Enqueue { .. } => "enqueue",
        QueueCmd::Consume { .. } => "consume",
        QueueCmd::Cancel { .. } => "cancel",
        QueueCmd::Settle { .. } => "settle",
        QueueCmd::Requeue { .. } => "requeue",
        QueueCmd::Discard { .. } => "discard",
        QueueCmd::Get { .. } => "get",
        QueueCmd::Purge => "purge",
        QueueCmd::Stats => "stats",
        QueueCmd::ChannelDown { .. } => "channel-down",
        QueueCmd::NodeRestarted { .. } => "node-restarted",
        QueueCmd::NodeDown { .. } => "node-down",
        QueueCmd::LeaderRecovery { .. } => "leader-recovery",
        QueueCmd::Configure { .. } => "configure",
        QueueCmd::Tick => "tick",
        QueueCmd::Touch => "touch",
        QueueCmd::DeadLettered { .. } => "dead-lettered",
        QueueCmd::TxStage { .. } => "tx-stage",
        QueueCmd::TxResolve { .. } => "tx-resolve",
        QueueCmd::PageIn { .. } => "page-in",
    }
}
