//! Warren's pure core: exchange routing, the metadata state machine and the queue state
//! machine, with the commands that drive them and the effects they ask for.
//!
//! Nothing here does I/O, reads a clock or draws random numbers: the cluster crate replays
//! the same commands on every replica and must get the same answers. The codec crate supplies
//! the AMQP value types (field tables); the server and cluster crates are the adapters.

pub mod dead_letter;
pub mod error;
pub mod ids;
pub mod json;
pub mod meta;
pub mod queue;
pub mod routing;
pub mod submission_order;

pub use error::{AmqpError, AmqpResult};
pub use ids::{
    ChannelRef, ConnectionRef, ConsumerKey, GroupId, METADATA_GROUP, MsgId, NodeId, NodeRun, TxId,
};
pub mod message;
pub use message::MessageContent;
