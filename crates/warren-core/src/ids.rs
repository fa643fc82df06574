//! Identifiers shared by the state machines: nodes, node incarnations, connections, channels
//! and consumers.
//!
//! They are plain ordered values so that every replica orders them the same way: replicated
//! state keys its maps by them and the order of effects depends on it.

use serde::{Deserialize, Serialize};

pub type NodeId = u64;
/// A Raft group: 0 is the metadata group, every replicated queue gets its own.
pub type GroupId = u64;
/// A message's identity inside one queue, assigned by the queue state machine in enqueue order.
pub type MsgId = u64;

pub const METADATA_GROUP: GroupId = 0;

/// One run of a node's process. It grows at every start, so state owned by an earlier run
/// (exclusive queues, consumers, channels) can be recognised and cleaned up deterministically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeRun {
    pub node: NodeId,
    pub incarnation: u64,
}

/// An AMQP connection, unique across the cluster and across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnectionRef {
    pub run: NodeRun,
    pub conn: u64,
}

/// One opening of a channel: acknowledgements and delivery tags are scoped to it.
///
/// `opened` counts channel opens on the connection, so a channel number reused after a close
/// is a different channel: a late clean-up command for the old one cannot touch the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChannelRef {
    pub conn: ConnectionRef,
    pub channel: u16,
    pub opened: u32,
}

/// A consumer: its tag is unique within its channel only.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConsumerKey {
    pub channel: ChannelRef,
    pub tag: String,
}

/// A transaction's commit: the channel that committed and which of its commits. The channel
/// names the node run whose connection coordinates the commit, so a queue holding staged work
/// can tell when that coordinator is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxId {
    pub channel: ChannelRef,
    pub commit: u64,
}
