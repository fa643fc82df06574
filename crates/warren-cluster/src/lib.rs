//! Raft replication for Warren: the node's shared RocksDB storage and the per-group Raft log
//! stores built on it.
//!
//! - [`db`]: opens the one RocksDB instance of a node ([`Storage`]), its column families, key
//!   layout and value encoding;
//! - `journal`: what makes the node's writes durable in place of RocksDB's WAL, and replays
//!   them after a crash;
//! - [`flusher`]: group commit, one journal fsync shared by all groups' pending writes;
//! - [`log_store`]: [`LogStore`], openraft's `RaftLogStorage` for one group.
//!
//! - [`types`]: the openraft type configuration and the requests every group's log carries;
//! - [`meta_sm`] and [`queue_sm`]: the state machines of the metadata group and of a queue
//!   group, adapters around `warren-core`'s pure state machines;
//! - [`queue`]: [`QueueHandle`], how the server submits queue commands and receives
//!   deliveries, for replicated and for in-memory queues alike;
//! - [`node`]: [`Node`], which opens storage, runs the groups and keeps queue handles in step
//!   with the metadata;
//! - [`transport`]: node-to-node calls, independent of the wire; [`grpc`] carries them over
//!   tonic, [`mem_net`] in process for tests; [`network`] is openraft's network on top;
//! - `registry`, `proposer`, [`supervisor`], [`outbox`]: queue handles and groups, command
//!   routing to the serving node, failure detection and elections, remote deliveries;
//! - [`transaction`]: atomic commits across queues, and their recovery.

pub mod admin;
pub mod db;
mod dead_letter;
pub mod flusher;
pub mod grpc;
mod journal;
pub mod log_store;
pub mod mem_net;
pub mod meta_sm;
pub mod network;
pub mod node;
pub mod outbox;
mod proposer;
pub mod queue;
pub mod queue_sm;
mod registry;
pub mod resources;
pub mod supervisor;
pub mod transaction;
pub mod transport;
pub mod types;

pub use node::{
    DEFAULT_ELECTION_FALLBACK_MS, DEFAULT_PAGE_WINDOW, Node, NodeConfig, NodeError, NodeHandler,
    NodeService, NodeSlot, ServiceFuture,
};
pub use queue::{ClusterError, Completion, Delivery, DeliverySink, QueueHandle, ReplyTo, Traffic};
pub use types::{GroupRequest, GroupResponse, QueueOutcome, QueueRequest, TypeConfig};

pub use db::DEFAULT_JOURNAL_BYTES;
pub use db::DbError;
pub use db::GroupId;
pub use db::Storage;
pub use db::StorageOptions;
pub use flusher::FlushStats;
pub use log_store::LogStore;
