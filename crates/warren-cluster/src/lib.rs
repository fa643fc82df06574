//! Raft replication for Warren: the node's shared RocksDB storage and the per-group Raft log
//! stores built on it.
//!
//! - [`db`]: opens the one RocksDB instance of a node ([`Storage`]), its column families, key
//!   layout and value encoding;
//! - [`flusher`]: group commit, one WAL fsync shared by all groups' pending writes;
//! - [`log_store`]: [`LogStore`], openraft's `RaftLogStorage` for one group.
//!
//! The state machines (metadata and queues) are written elsewhere and share the same
//! [`Storage`]: see its `db`, `cf` and `when_durable` methods.

pub mod db;
pub mod flusher;
pub mod log_store;

pub use db::DbError;
pub use db::GroupId;
pub use db::Storage;
pub use flusher::FlushStats;
pub use log_store::LogStore;
