//! Error types of the codec. [`CodecError`] describes why a value (string,
//! table, property list, method arguments) could not be read or built; the
//! frame layer (`frame`, `method`) turns it into a [`FrameError`], which is
//! what the connection code in `warren-server` acts on. Protocol-header
//! negotiation has its own [`ProtocolHeaderMismatch`] because its remedy is
//! different: answer with our header and close, no connection.close.

use crate::reply_code;

/// Why a value could not be decoded or constructed.
///
/// Every variant is a malformed-field problem, so on the wire each one maps to
/// [`reply_code::SYNTAX_ERROR`] (see [`CodecError::reply_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("truncated: needed {needed} more bytes, {available} available")]
    UnexpectedEnd { needed: usize, available: usize },
    #[error("short string of {0} bytes exceeds the 255-byte limit")]
    ShortStrTooLong(usize),
    #[error("short string is not valid UTF-8")]
    InvalidUtf8,
    #[error("unknown field value type {}", describe_octet(*.0))]
    UnknownFieldType(u8),
    #[error("field tables and arrays nested deeper than {0} levels")]
    NestingTooDeep(usize),
    #[error("{0} unexpected bytes after the last field")]
    TrailingBytes(usize),
    #[error("property flags {0:#06x} name properties the class does not have")]
    UnknownPropertyFlags(u16),
}

impl CodecError {
    /// The reply code a peer sending this malformed value is closed with.
    pub fn reply_code(&self) -> u16 {
        reply_code::SYNTAX_ERROR
    }
}

fn describe_octet(octet: u8) -> String {
    if octet.is_ascii_graphic() {
        format!("'{}'", octet as char)
    } else {
        format!("{octet:#04x}")
    }
}

/// An error decoding a frame. In AMQP 0-9-1 every such error is a
/// connection-level exception: the server answers with connection.close
/// carrying these fields and stops processing the peer's frames.
///
/// `reply_code` is [`reply_code::FRAME_ERROR`] (501) for framing problems:
/// oversized frame, bad frame-end octet, unknown frame type, a content or
/// heartbeat frame that is malformed or on the wrong channel.
/// It is also 501 for a method whose arguments do not parse (truncated,
/// trailing bytes, invalid UTF-8 in a short string, bad field table): that is
/// what RabbitMQ answers ("cannot decode"), and clients written against it
/// expect that code. It is [`reply_code::NOT_IMPLEMENTED`] (540) for a class or
/// method id this protocol does not define. `class_id` and `method_id` name
/// the offending method when there is one, so they can go straight into
/// connection.close.
///
/// Whether the offending frame was consumed from the read buffer: if the
/// error was found after the frame's end octet had been checked, yes, so a
/// server that has sent connection.close can keep reading until close-ok;
/// errors found earlier (oversized frame, bad end octet, unknown frame type)
/// leave the stream out of sync, and the buffer untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct FrameError {
    pub reply_code: u16,
    pub text: String,
    pub channel: u16,
    pub class_id: u16,
    pub method_id: u16,
}

impl FrameError {
    /// A framing error (501) on `channel`, not tied to a method.
    pub fn frame(channel: u16, text: impl Into<String>) -> Self {
        FrameError {
            reply_code: reply_code::FRAME_ERROR,
            text: text.into(),
            channel,
            class_id: 0,
            method_id: 0,
        }
    }

    /// Arguments of the given method that cannot be decoded: 501, as RabbitMQ answers.
    pub fn undecodable(
        channel: u16,
        class_id: u16,
        method_id: u16,
        text: impl Into<String>,
    ) -> Self {
        FrameError {
            reply_code: reply_code::FRAME_ERROR,
            text: text.into(),
            channel,
            class_id,
            method_id,
        }
    }

    /// Returns the same error attributed to `channel`.
    pub fn on_channel(mut self, channel: u16) -> Self {
        self.channel = channel;
        self
    }
}

/// The peer opened with something other than an AMQP 0-9-1 protocol header.
///
/// Spec 4.2.2: the server must answer with the header it does support
/// ([`ProtocolHeaderMismatch::reply`]) and then close the socket, without
/// any connection.close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported protocol header {received:?}")]
pub struct ProtocolHeaderMismatch {
    /// The bytes received so far (at most 8): enough to log what the peer
    /// speaks (HTTP, TLS, AMQP 1.0 ...).
    pub received: Vec<u8>,
}

impl ProtocolHeaderMismatch {
    /// What to write back before closing.
    pub fn reply(&self) -> &'static [u8; 8] {
        crate::PROTOCOL_HEADER
    }
}
