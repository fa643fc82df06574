//! The basic class's content properties (content-type, headers,
//! delivery-mode, ...): the property-flags word(s) and property list that
//! follow the body size in a content header frame.
//!
//! `frame` keeps a received header's property bytes raw (so the broker can
//! forward them untouched); this module is what decodes them when the broker
//! needs to look inside (expiry, priority, user-id checks, header exchanges)
//! and encodes properties the broker makes up itself. Values use the types of
//! `strings` and `table`.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::CodecError;
use crate::strings::ShortStr;
use crate::table::FieldTable;
use crate::wire::Reader;

/// A property value type: how it is read, written and sized.
trait Property: Sized {
    fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError>;
    fn encode(&self, out: &mut BytesMut);
    fn encoded_len(&self) -> usize;
}

impl Property for ShortStr {
    fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        ShortStr::decode(reader)
    }
    fn encode(&self, out: &mut BytesMut) {
        ShortStr::encode(self, out)
    }
    fn encoded_len(&self) -> usize {
        ShortStr::encoded_len(self)
    }
}

impl Property for FieldTable {
    fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        FieldTable::decode_from(reader)
    }
    fn encode(&self, out: &mut BytesMut) {
        FieldTable::encode(self, out)
    }
    fn encoded_len(&self) -> usize {
        FieldTable::encoded_len(self)
    }
}

impl Property for u8 {
    fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        reader.u8()
    }
    fn encode(&self, out: &mut BytesMut) {
        out.put_u8(*self)
    }
    fn encoded_len(&self) -> usize {
        1
    }
}

impl Property for u64 {
    fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        reader.u64()
    }
    fn encode(&self, out: &mut BytesMut) {
        out.put_u64(*self)
    }
    fn encoded_len(&self) -> usize {
        8
    }
}

/// Bit 0 of a property-flags word: another flags word follows.
const CONTINUATION: u16 = 1;

macro_rules! basic_properties {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty = bit $bit:literal, )*) => {
        /// The 14 properties of the basic class; `None` is an absent property
        /// (its flag bit clear).
        #[derive(Clone, Debug, PartialEq, Default)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub struct BasicProperties {
            $( $(#[$doc])* pub $field: Option<$ty>, )*
        }

        /// Every flag bit the basic class defines.
        const KNOWN_FLAGS: u16 = 0 $( | (1 << $bit) )*;

        impl BasicProperties {
            /// Decodes property flags and list, as found after the body size
            /// of a content header. String values share `raw`'s allocation.
            ///
            /// Fails on truncation, trailing bytes, invalid UTF-8 in a short
            /// string, a malformed headers table, or a flag bit for a
            /// property the basic class does not have (whose length we could
            /// not know). A continuation word that sets no further property
            /// is accepted.
            pub fn decode(raw: &Bytes) -> Result<Self, CodecError> {
                let mut reader = Reader::new(raw);
                let flags = reader.u16()?;
                if flags & !(KNOWN_FLAGS | CONTINUATION) != 0 {
                    return Err(CodecError::UnknownPropertyFlags(flags));
                }
                let mut word = flags;
                while word & CONTINUATION != 0 {
                    word = reader.u16()?;
                    if word & !CONTINUATION != 0 {
                        return Err(CodecError::UnknownPropertyFlags(word));
                    }
                }
                let properties = BasicProperties {
                    $( $field: if flags & (1 << $bit) != 0 {
                        Some(<$ty as Property>::decode(&mut reader)?)
                    } else {
                        None
                    }, )*
                };
                reader.finish()?;
                Ok(properties)
            }

            /// Writes the flags word and the present properties.
            pub fn encode(&self, out: &mut BytesMut) {
                let mut flags = 0u16;
                $( if self.$field.is_some() { flags |= 1 << $bit; } )*
                out.put_u16(flags);
                $( if let Some(value) = &self.$field { value.encode(out); } )*
            }

            /// Bytes [`BasicProperties::encode`] writes.
            pub fn encoded_len(&self) -> usize {
                2 $( + self.$field.as_ref().map_or(0, Property::encoded_len) )*
            }
        }
    };
}

basic_properties! {
    /// MIME type of the body.
    content_type: ShortStr = bit 15,
    /// MIME content encoding of the body.
    content_encoding: ShortStr = bit 14,
    /// Application headers; what header exchanges match on.
    headers: FieldTable = bit 13,
    /// 1 = transient, 2 = persistent.
    delivery_mode: u8 = bit 12,
    /// 0 to 9.
    priority: u8 = bit 11,
    correlation_id: ShortStr = bit 10,
    reply_to: ShortStr = bit 9,
    /// Per-message TTL in milliseconds, as decimal text (RabbitMQ's
    /// convention).
    expiration: ShortStr = bit 8,
    message_id: ShortStr = bit 7,
    /// Seconds since the Unix epoch.
    timestamp: u64 = bit 6,
    /// The spec's "type" property.
    kind: ShortStr = bit 5,
    /// If set, RabbitMQ requires it to equal the connection's user name.
    user_id: ShortStr = bit 4,
    app_id: ShortStr = bit 3,
    /// Deprecated in 0-9-1 but still carried.
    cluster_id: ShortStr = bit 2,
}

impl BasicProperties {
    /// The encoding as a buffer of its own, ready for
    /// [`crate::encode_content_header`].
    pub fn encoded(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Whether delivery-mode asks for persistence (2).
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::FieldValue;

    #[test]
    fn empty_properties_are_a_zero_flags_word() {
        assert_eq!(&BasicProperties::default().encoded()[..], b"\x00\x00");
        assert_eq!(
            BasicProperties::decode(&Bytes::from_static(b"\x00\x00")),
            Ok(BasicProperties::default())
        );
    }

    #[test]
    fn flag_bits_follow_the_spec_order() {
        let props = BasicProperties {
            content_type: Some(ShortStr::from_static("t")),
            cluster_id: Some(ShortStr::from_static("c")),
            ..Default::default()
        };
        assert_eq!(&props.encoded()[..], b"\x80\x04\x01t\x01c");
        let props = BasicProperties {
            delivery_mode: Some(2),
            timestamp: Some(1),
            ..Default::default()
        };
        assert_eq!(
            &props.encoded()[..],
            b"\x10\x40\x02\x00\x00\x00\x00\x00\x00\x00\x01"
        );
        assert!(props.is_persistent());
    }

    #[test]
    fn continuation_words_are_read_past() {
        // delivery-mode set, continuation bit set, then an empty second word.
        let raw = Bytes::from_static(b"\x10\x01\x00\x00\x02");
        assert_eq!(
            BasicProperties::decode(&raw),
            Ok(BasicProperties {
                delivery_mode: Some(2),
                ..Default::default()
            })
        );
        // A second word that sets a property the class does not have.
        let raw = Bytes::from_static(b"\x00\x01\x80\x00");
        assert_eq!(
            BasicProperties::decode(&raw),
            Err(CodecError::UnknownPropertyFlags(0x8000))
        );
        // A continuation bit with nothing after it.
        assert!(BasicProperties::decode(&Bytes::from_static(b"\x00\x01")).is_err());
    }

    #[test]
    fn the_unused_fifteenth_flag_is_rejected() {
        assert_eq!(
            BasicProperties::decode(&Bytes::from_static(b"\x00\x02")),
            Err(CodecError::UnknownPropertyFlags(0x0002))
        );
    }

    #[test]
    fn malformed_lists_are_errors() {
        // priority flagged but missing
        assert!(BasicProperties::decode(&Bytes::from_static(b"\x08\x00")).is_err());
        // trailing byte
        assert_eq!(
            BasicProperties::decode(&Bytes::from_static(b"\x00\x00\x00")),
            Err(CodecError::TrailingBytes(1))
        );
        // content-type that is not UTF-8
        assert_eq!(
            BasicProperties::decode(&Bytes::from_static(b"\x80\x00\x01\xff")),
            Err(CodecError::InvalidUtf8)
        );
    }

    #[test]
    fn all_properties_round_trip() {
        let mut headers = FieldTable::new();
        headers.insert(ShortStr::from_static("x-retries"), FieldValue::I32(3));
        let props = BasicProperties {
            content_type: Some(ShortStr::from_static("application/json")),
            content_encoding: Some(ShortStr::from_static("gzip")),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(9),
            correlation_id: Some(ShortStr::from_static("c-1")),
            reply_to: Some(ShortStr::from_static("amq.rabbitmq.reply-to")),
            expiration: Some(ShortStr::from_static("60000")),
            message_id: Some(ShortStr::from_static("m-1")),
            timestamp: Some(1_700_000_000),
            kind: Some(ShortStr::from_static("order.created")),
            user_id: Some(ShortStr::from_static("guest")),
            app_id: Some(ShortStr::from_static("shop")),
            cluster_id: Some(ShortStr::from_static("")),
        };
        let encoded = props.encoded();
        assert_eq!(encoded.len(), props.encoded_len());
        assert_eq!(&encoded[..2], b"\xff\xfc");
        assert_eq!(BasicProperties::decode(&encoded), Ok(props));
    }
}
