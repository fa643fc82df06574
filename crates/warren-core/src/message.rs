//! A message's content as the broker keeps it between publish and delivery.
//!
//! The properties stay in their encoded wire form so a delivery forwards them byte-for-byte
//! without decoding and re-encoding; the queue state machine (`queue`) never sees any of this,
//! only the adapters that store bodies and write frames do.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use warren_codec::{BasicProperties, ShortStr};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageContent {
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    /// The content header's property flags and list, exactly as the publisher sent them.
    pub properties: Bytes,
    pub body: Bytes,
}

impl MessageContent {
    /// Decodes the properties; only needed off the fast path (headers routing, expiry, DLX).
    pub fn decode_properties(&self) -> Result<BasicProperties, warren_codec::CodecError> {
        BasicProperties::decode(&self.properties)
    }
}
