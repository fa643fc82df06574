//! How nodes talk to each other, independent of the wire: a request/response `Transport` that
//! the node uses to reach a peer, and the `PeerHandler` a node implements to answer.
//!
//! Everything between nodes is a call with one reply — Raft RPCs of every group (tagged with
//! the group id), forwarded queue commands, forwarded metadata writes, deliveries for consumers
//! on another node, and liveness pings. Ordering, where it matters, comes from the caller
//! waiting for one call before making the next. `grpc` carries these calls over tonic (the
//! frequent ones on one stream per peer); `mem_net` carries them in process, with partition,
//! drop and delay filters, for cluster tests.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use warren_core::{GroupId, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    PreVote,
    TransferLeader,
    InstallSnapshot,
}

#[derive(Clone, Debug)]
pub enum PeerRequest {
    /// A Raft message of one group; the payload is the storage encoding of openraft's request.
    Raft {
        group: GroupId,
        rpc: RaftRpc,
        payload: Vec<u8>,
    },
    /// Queue commands (encoded `QueueRequest`s) for a queue this node is believed to lead.
    Submit {
        queue: GroupId,
        requests: Vec<Vec<u8>>,
    },
    /// An encoded `MetaCmd` for the metadata group's leader.
    MetaWrite { cmd: Vec<u8> },
    /// The metadata group's committed index, for read barriers.
    MetaIndex,
    /// Answer once the metadata is applied up to `index` here (or `timeout` passed).
    MetaWait { index: u64, timeout: Duration },
    /// Encoded `RemoteDelivery` items for consumers attached on this node.
    Deliver { from: NodeId, items: Vec<Vec<u8>> },
    Hello {
        from: NodeId,
        incarnation: u64,
        advertise: String,
    },
    /// A queue group's voters as the receiver's replica sees them.
    GroupVoters { group: GroupId },
    /// For the program hosting the receiver (`node::NodeService`), carried unread.
    Service { payload: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forwarded<T> {
    Ok(T),
    /// The receiver does not lead; it believes this node does (None: unknown).
    NotLeader(Option<NodeId>),
    Error(String),
}

#[derive(Clone, Debug)]
pub enum PeerResponse {
    Raft(Result<Vec<u8>, String>),
    Submit(Forwarded<Vec<Vec<u8>>>),
    MetaWrite(Forwarded<Vec<u8>>),
    MetaIndex(u64),
    /// None: the receiver runs no replica of the group; else (leads it, voters).
    GroupVoters(Option<(bool, Vec<NodeId>)>),
    Service(Result<Vec<u8>, String>),
    Delivered,
    Hello {
        node: NodeId,
        incarnation: u64,
        advertise: String,
    },
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum TransportError {
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    /// Nothing listens at the node's address: its process is not running (it crashed or
    /// stopped). Unlike silence, which a partition or a paused process also causes.
    #[error("node {node} refused the connection: it is not running")]
    Refused { node: NodeId },
    #[error("call to node {node} timed out after {after:?}")]
    Timeout { node: NodeId, after: Duration },
    #[error("protocol error talking to node {node}: {reason}")]
    Protocol { node: NodeId, reason: String },
}

/// The client side: reach a peer by id.
pub trait Transport: Send + Sync + 'static {
    fn call(
        &self,
        target: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportError>>;

    /// Where `node` can be reached (from configuration or the cluster membership).
    fn set_address(&self, node: NodeId, address: &str);
}

/// The server side: what a node does with a peer's request.
pub trait PeerHandler: Send + Sync + 'static {
    fn handle(&self, request: PeerRequest) -> BoxFuture<'static, PeerResponse>;
}
