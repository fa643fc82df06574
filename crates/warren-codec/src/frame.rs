//! The frame layer (spec 4.2.3): splitting a byte stream into method,
//! content-header, body and heartbeat frames, and writing them. It is the
//! entry point the connection code in `warren-server` uses; method payloads
//! go to `method`, header property bytes are kept raw and decoded on demand
//! by `properties`.
//!
//! Decoding is incremental and zero-copy: [`decode_frame`] takes a complete
//! frame off the front of the read buffer with `split_to`, freezes it, and
//! every string, property list and body in the result is a slice of that
//! one allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{CodecError, FrameError, ProtocolHeaderMismatch};
use crate::method::{Method, decode_method};
use crate::properties::BasicProperties;
use crate::wire::{self, Reader};
use crate::{FRAME_END, FRAME_OVERHEAD, PROTOCOL_HEADER, frame_type};

/// Frame header: type (1), channel (2), payload size (4).
const HEADER_LEN: usize = 7;

/// Content header payload before the property flags: class id (2), weight
/// (2), body size (8).
const CONTENT_HEADER_FIXED_LEN: usize = 12;

/// The protocol header of AMQP 0-9 (class 1, instance 1, version 0-9).
/// RabbitMQ accepts it and speaks 0-9-1 to such clients, whose wire format
/// is the same for everything they can send, so we do too.
const AMQP_0_9_HEADER: &[u8; 8] = b"AMQP\x01\x01\x00\x09";

/// A content header as received: `properties` is the raw property-flags and
/// property-list bytes, kept so the broker can forward them to consumers
/// byte for byte without re-encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: Bytes,
}

impl ContentHeader {
    /// Decodes `properties` as basic-class properties. The caller checks
    /// that `class_id` is basic (60): no other class has content in 0-9-1.
    pub fn basic_properties(&self) -> Result<BasicProperties, CodecError> {
        BasicProperties::decode(&self.properties)
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Method {
        channel: u16,
        method: Method,
    },
    Header {
        channel: u16,
        header: ContentHeader,
    },
    Body {
        channel: u16,
        payload: Bytes,
    },
    /// Keeps the channel so the server can reject heartbeats on a non-zero
    /// channel, which the spec forbids.
    Heartbeat {
        channel: u16,
    },
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. }
            | Frame::Heartbeat { channel } => *channel,
        }
    }
}

/// Takes the next complete frame off the front of `buf`.
///
/// `Ok(None)` means more bytes are needed, and nothing was consumed. The
/// 7-byte frame header is checked as soon as it is in: an unknown frame type,
/// or a declared payload larger than `frame_max - 8`, is an error before any
/// of the payload is buffered, so a peer cannot make us buffer more than
/// `frame_max` bytes. `frame_max` 0 means no limit, which a server should
/// never use: before connection.tune-ok it should pass
/// [`crate::FRAME_MIN_SIZE`], after it the negotiated value.
///
/// See [`FrameError`] for the reply codes and for which errors leave the
/// frame in `buf`.
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, FrameError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    if !matches!(
        kind,
        frame_type::METHOD | frame_type::HEADER | frame_type::BODY | frame_type::HEARTBEAT
    ) {
        return Err(FrameError::frame(0, format!("unknown frame type {kind}")));
    }
    let Some(Ok([_, c0, c1, s0, s1, s2, s3])) =
        buf.get(..HEADER_LEN).map(<[u8; HEADER_LEN]>::try_from)
    else {
        return Ok(None);
    };
    let channel = u16::from_be_bytes([c0, c1]);
    let size = u32::from_be_bytes([s0, s1, s2, s3]);
    if frame_max != 0 && u64::from(size) + FRAME_OVERHEAD as u64 > u64::from(frame_max) {
        return Err(FrameError::frame(
            channel,
            format!(
                "frame payload of {size} bytes exceeds the maximum of {} for frame-max {frame_max}",
                frame_max.saturating_sub(FRAME_OVERHEAD as u32)
            ),
        ));
    }
    let Some(total) = usize::try_from(size)
        .ok()
        .and_then(|size| size.checked_add(FRAME_OVERHEAD))
    else {
        return Err(FrameError::frame(
            channel,
            format!("frame payload of {size} bytes is too large"),
        ));
    };
    let end_octet = match buf.get(total - 1) {
        Some(&octet) => octet,
        None => return Ok(None),
    };
    if end_octet != FRAME_END {
        return Err(FrameError::frame(
            channel,
            format!("frame end octet {end_octet:#04x} instead of {FRAME_END:#04x}"),
        ));
    }
    let frame = buf.split_to(total).freeze();
    let payload = frame.slice(HEADER_LEN..total - 1);
    interpret(kind, channel, payload).map(Some)
}

fn interpret(kind: u8, channel: u16, payload: Bytes) -> Result<Frame, FrameError> {
    match kind {
        frame_type::METHOD => decode_method(&payload)
            .map(|method| Frame::Method { channel, method })
            .map_err(|err| err.on_channel(channel)),
        frame_type::HEADER => {
            if channel == 0 {
                return Err(FrameError::frame(0, "content header frame on channel 0"));
            }
            decode_content_header(&payload)
                .map(|header| Frame::Header { channel, header })
                .map_err(|text| FrameError::frame(channel, text))
        }
        frame_type::BODY => {
            if channel == 0 {
                return Err(FrameError::frame(0, "content body frame on channel 0"));
            }
            Ok(Frame::Body { channel, payload })
        }
        frame_type::HEARTBEAT => {
            if !payload.is_empty() {
                return Err(FrameError::frame(
                    channel,
                    format!("heartbeat frame with a {}-byte payload", payload.len()),
                ));
            }
            Ok(Frame::Heartbeat { channel })
        }
        other => Err(FrameError::frame(
            channel,
            format!("unknown frame type {other}"),
        )),
    }
}

fn decode_content_header(payload: &Bytes) -> Result<ContentHeader, String> {
    let mut reader = Reader::new(payload);
    let fixed = (reader.u16(), reader.u16(), reader.u64());
    let (Ok(class_id), Ok(weight), Ok(body_size)) = fixed else {
        return Err(format!(
            "content header frame of {} bytes is truncated",
            payload.len()
        ));
    };
    if weight != 0 {
        return Err(format!("content header weight {weight}, must be 0"));
    }
    // The property flags word is always present, even with no properties.
    if reader.remaining() < 2 {
        return Err("content header frame has no property flags".to_owned());
    }
    let properties = payload.slice(CONTENT_HEADER_FIXED_LEN..);
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
    })
}

/// Checks the 8-byte protocol header a connection starts with and consumes
/// it. `Ok(None)` means more bytes are needed; a mismatch is reported as soon
/// as the bytes so far cannot start a valid header (an HTTP request or a TLS
/// hello fails on its first bytes), and must be answered per
/// [`ProtocolHeaderMismatch`]. The AMQP 0-9 header is accepted too, as
/// RabbitMQ does.
pub fn decode_protocol_header(buf: &mut BytesMut) -> Result<Option<()>, ProtocolHeaderMismatch> {
    let seen = buf
        .get(..buf.len().min(PROTOCOL_HEADER.len()))
        .unwrap_or_default();
    let plausible = [PROTOCOL_HEADER, AMQP_0_9_HEADER]
        .iter()
        .any(|header| header.starts_with(seen));
    if !plausible {
        return Err(ProtocolHeaderMismatch {
            received: seen.to_vec(),
        });
    }
    if seen.len() < PROTOCOL_HEADER.len() {
        return Ok(None);
    }
    buf.advance(PROTOCOL_HEADER.len());
    Ok(Some(()))
}

/// Writes a method frame.
pub fn encode_method(channel: u16, method: &Method, out: &mut BytesMut) {
    out.put_u8(frame_type::METHOD);
    out.put_u16(channel);
    let at = wire::begin_u32_length(out);
    method.encode_payload(out);
    wire::end_u32_length(out, at);
    out.put_u8(FRAME_END);
}

/// Writes a content header frame around already-encoded property bytes (as
/// received in [`ContentHeader::properties`] or from
/// [`BasicProperties::encoded`]).
pub fn encode_content_header(
    channel: u16,
    class_id: u16,
    body_size: u64,
    properties: &[u8],
    out: &mut BytesMut,
) {
    let payload_len = CONTENT_HEADER_FIXED_LEN + properties.len();
    out.reserve(payload_len + FRAME_OVERHEAD);
    out.put_u8(frame_type::HEADER);
    out.put_u16(channel);
    out.put_u32(wire::len_u32(payload_len));
    out.put_u16(class_id);
    out.put_u16(0); // weight, unused
    out.put_u64(body_size);
    out.put_slice(properties);
    out.put_u8(FRAME_END);
}

/// Writes `body` as body frames of at most `frame_max - 8` payload bytes each
/// (`frame_max` 0 = no limit). An empty body writes no frame, as the spec
/// requires: the content header's body size of 0 already says it all.
pub fn encode_body(channel: u16, body: &[u8], frame_max: u32, out: &mut BytesMut) {
    let max_payload = match frame_max {
        0 => u32::MAX,
        // A frame-max below the overhead is meaningless (the spec minimum is
        // 4096); still make progress rather than loop or panic.
        limit => limit.saturating_sub(FRAME_OVERHEAD as u32).max(1),
    };
    let max_payload = usize::try_from(max_payload).unwrap_or(usize::MAX);
    out.reserve(body.len() + body.len().div_ceil(max_payload) * FRAME_OVERHEAD);
    for chunk in body.chunks(max_payload) {
        write_body_frame(channel, chunk, out);
    }
}

fn write_body_frame(channel: u16, chunk: &[u8], out: &mut BytesMut) {
    out.put_u8(frame_type::BODY);
    out.put_u16(channel);
    out.put_u32(wire::len_u32(chunk.len()));
    out.put_slice(chunk);
    out.put_u8(FRAME_END);
}

/// Writes a heartbeat frame (always on channel 0).
pub fn encode_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[frame_type::HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Writes any frame as-is: a body frame is written whole, not split (use
/// [`encode_body`] for that), and a heartbeat keeps its channel.
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Method { channel, method } => encode_method(*channel, method, out),
        Frame::Header { channel, header } => encode_content_header(
            *channel,
            header.class_id,
            header.body_size,
            &header.properties,
            out,
        ),
        Frame::Body { channel, payload } => write_body_frame(*channel, payload, out),
        Frame::Heartbeat { channel } => {
            out.put_u8(frame_type::HEARTBEAT);
            out.put_u16(*channel);
            out.put_u32(0);
            out.put_u8(FRAME_END);
        }
    }
}
