//! The AMQP 0-9-1 wire format as RabbitMQ speaks it: frames, the methods of
//! every class, field tables and the basic-class content properties.
//!
//! This crate is the bottom of Warren's stack and depends on nothing else in
//! the workspace. The connection layer in `warren-server` feeds socket bytes
//! to [`decode_frame`] and writes replies with the `encode_*` functions;
//! `warren-core` works with the value types ([`FieldTable`], [`ShortStr`],
//! [`BasicProperties`]) when routing and storing messages.
//!
//! Two properties drive the design (see `docs/adr/0001-codec.md`):
//! - decoding never panics, whatever the peer sends, and every failure maps to
//!   the reply code a connection must close with ([`FrameError`]);
//! - the publish path is zero-copy: strings and bodies are [`bytes::Bytes`]
//!   slices of the socket read buffer, so decoding a `basic.publish`, its
//!   content header and its body frames allocates nothing.
//!
//! Module map: `wire`-level reading and writing sits under everything;
//! `strings` and `table` build the value types on it; `properties` and
//! `method` build on those; `frame` ties methods, headers and bodies to the
//! frame layer.

mod error;
mod frame;
mod method;
mod properties;
pub mod reply_code;
mod strings;
mod table;
#[cfg(test)]
mod tests;
mod wire;

pub use error::{CodecError, FrameError, ProtocolHeaderMismatch};
pub use frame::{
    ContentHeader, Frame, decode_frame, decode_protocol_header, encode_body, encode_content_header,
    encode_frame, encode_heartbeat, encode_method,
};
pub use method::*;
pub use properties::BasicProperties;
pub use strings::{LongStr, ShortStr};
pub use table::{FieldTable, FieldValue, MAX_NESTING_DEPTH};

/// The 8 bytes a 0-9-1 client sends first, and that a server answers a wrong
/// header with before closing (spec 4.2.2).
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Octet that terminates every frame.
pub const FRAME_END: u8 = 0xCE;

/// The smallest frame-max a peer may negotiate; frames up to this size are
/// always acceptable, even before connection.tune.
pub const FRAME_MIN_SIZE: u32 = 4096;

/// Bytes a frame adds around its payload: the 7-byte header and the frame-end
/// octet. The largest payload under a negotiated frame-max is
/// `frame_max - FRAME_OVERHEAD`.
pub const FRAME_OVERHEAD: usize = 8;

/// Frame type octets (spec 4.2.3).
pub mod frame_type {
    pub const METHOD: u8 = 1;
    pub const HEADER: u8 = 2;
    pub const BODY: u8 = 3;
    pub const HEARTBEAT: u8 = 8;
}

/// Class ids, for code that builds content headers or inspects errors.
pub mod class_id {
    pub const CONNECTION: u16 = 10;
    pub const CHANNEL: u16 = 20;
    pub const ACCESS: u16 = 30;
    pub const EXCHANGE: u16 = 40;
    pub const QUEUE: u16 = 50;
    pub const BASIC: u16 = 60;
    pub const CONFIRM: u16 = 85;
    pub const TX: u16 = 90;
}
