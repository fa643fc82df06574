//! Field tables and arrays: the typed key/value maps that carry queue and
//! exchange arguments, client capabilities and message headers. Built on the
//! string types of `strings` and the `wire` reader; used by `method` (the
//! `arguments`, `server-properties`, `client-properties` fields) and
//! `properties` (the `headers` property).
//!
//! The type letters are RabbitMQ's, not the 0-9-1 spec's: the spec's table
//! assigns 's' to short strings and 'U'/'L' to signed integers, but RabbitMQ
//! (and so every client that talks to it) uses 's' for a signed 16-bit
//! integer and 'l' for a signed 64-bit one, and has no short-string value.
//! We encode exactly RabbitMQ's letters and accept on decode exactly what
//! RabbitMQ's parser accepts, which adds 'L' as a second spelling of a signed
//! 64-bit integer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::CodecError;
use crate::strings::{LongStr, ShortStr};
use crate::wire::{self, Reader};

/// How deeply tables and arrays may nest on decode. Decoding is recursive,
/// so without a bound a hostile peer could exhaust the stack with a frame of
/// nested empty tables; no real application comes near this depth.
pub const MAX_NESTING_DEPTH: usize = 64;

/// One typed value in a field table or array. Each variant notes its type
/// letter on the wire.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum FieldValue {
    /// 't'
    Bool(bool),
    /// 'b'
    I8(i8),
    /// 'B'
    U8(u8),
    /// 's' (RabbitMQ's letter; the spec's 'U' is not accepted by RabbitMQ)
    I16(i16),
    /// 'u'
    U16(u16),
    /// 'I'
    I32(i32),
    /// 'i'
    U32(u32),
    /// 'l' (RabbitMQ also reads 'L' as this)
    I64(i64),
    /// 'f'
    F32(f32),
    /// 'd'
    F64(f64),
    /// 'D': `value` × 10^-`scale`
    Decimal { scale: u8, value: u32 },
    /// 'S'
    LongStr(LongStr),
    /// 'A'
    Array(Vec<FieldValue>),
    /// 'T': seconds since the Unix epoch
    Timestamp(u64),
    /// 'F'
    Table(FieldTable),
    /// 'V': no value
    Void,
    /// 'x': a byte array
    Bytes(Bytes),
}

impl FieldValue {
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value of any integer variant (not timestamps, which are points in
    /// time rather than numbers).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v,
            _ => return None,
        })
    }

    /// The text of a long-string value, if it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongStr(s) => s.as_str(),
            _ => None,
        }
    }

    pub fn as_table(&self) -> Option<&FieldTable> {
        match self {
            FieldValue::Table(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[FieldValue]> {
        match self {
            FieldValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The type letter this value is encoded with.
    pub fn type_letter(&self) -> u8 {
        match self {
            FieldValue::Bool(_) => b't',
            FieldValue::I8(_) => b'b',
            FieldValue::U8(_) => b'B',
            FieldValue::I16(_) => b's',
            FieldValue::U16(_) => b'u',
            FieldValue::I32(_) => b'I',
            FieldValue::U32(_) => b'i',
            FieldValue::I64(_) => b'l',
            FieldValue::F32(_) => b'f',
            FieldValue::F64(_) => b'd',
            FieldValue::Decimal { .. } => b'D',
            FieldValue::LongStr(_) => b'S',
            FieldValue::Array(_) => b'A',
            FieldValue::Timestamp(_) => b'T',
            FieldValue::Table(_) => b'F',
            FieldValue::Void => b'V',
            FieldValue::Bytes(_) => b'x',
        }
    }

    /// Bytes [`FieldValue::encode`] writes, type letter included.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            FieldValue::Bool(_) | FieldValue::I8(_) | FieldValue::U8(_) => 1,
            FieldValue::I16(_) | FieldValue::U16(_) => 2,
            FieldValue::I32(_) | FieldValue::U32(_) | FieldValue::F32(_) => 4,
            FieldValue::I64(_) | FieldValue::F64(_) | FieldValue::Timestamp(_) => 8,
            FieldValue::Decimal { .. } => 5,
            FieldValue::LongStr(s) => s.encoded_len(),
            FieldValue::Array(values) => {
                4 + values.iter().map(FieldValue::encoded_len).sum::<usize>()
            }
            FieldValue::Table(t) => t.encoded_len(),
            FieldValue::Void => 0,
            FieldValue::Bytes(b) => 4 + b.len(),
        }
    }

    /// Writes the type letter and the value.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(self.type_letter());
        match self {
            FieldValue::Bool(b) => out.put_u8(u8::from(*b)),
            FieldValue::I8(v) => out.put_i8(*v),
            FieldValue::U8(v) => out.put_u8(*v),
            FieldValue::I16(v) => out.put_i16(*v),
            FieldValue::U16(v) => out.put_u16(*v),
            FieldValue::I32(v) => out.put_i32(*v),
            FieldValue::U32(v) => out.put_u32(*v),
            FieldValue::I64(v) => out.put_i64(*v),
            FieldValue::F32(v) => out.put_f32(*v),
            FieldValue::F64(v) => out.put_f64(*v),
            FieldValue::Decimal { scale, value } => {
                out.put_u8(*scale);
                out.put_u32(*value);
            }
            FieldValue::LongStr(s) => s.encode(out),
            FieldValue::Array(values) => {
                let at = wire::begin_u32_length(out);
                for value in values {
                    value.encode(out);
                }
                wire::end_u32_length(out, at);
            }
            FieldValue::Timestamp(t) => out.put_u64(*t),
            FieldValue::Table(t) => t.encode(out),
            FieldValue::Void => {}
            FieldValue::Bytes(b) => wire::put_long_prefixed(out, b),
        }
    }

    /// Reads a type letter and its value. `depth` is the nesting level of the
    /// table or array this value sits in (1 for a top-level table).
    fn decode(reader: &mut Reader<'_>, depth: usize) -> Result<Self, CodecError> {
        let letter = reader.u8()?;
        Ok(match letter {
            b't' => FieldValue::Bool(reader.u8()? != 0),
            b'b' => FieldValue::I8(i8::from_be_bytes(reader.array()?)),
            b'B' => FieldValue::U8(reader.u8()?),
            b's' => FieldValue::I16(i16::from_be_bytes(reader.array()?)),
            b'u' => FieldValue::U16(reader.u16()?),
            b'I' => FieldValue::I32(i32::from_be_bytes(reader.array()?)),
            b'i' => FieldValue::U32(reader.u32()?),
            b'l' | b'L' => FieldValue::I64(i64::from_be_bytes(reader.array()?)),
            b'f' => FieldValue::F32(f32::from_be_bytes(reader.array()?)),
            b'd' => FieldValue::F64(f64::from_be_bytes(reader.array()?)),
            b'D' => FieldValue::Decimal {
                scale: reader.u8()?,
                value: reader.u32()?,
            },
            b'S' => FieldValue::LongStr(LongStr::decode(reader)?),
            b'A' => FieldValue::Array(decode_array(reader, depth + 1)?),
            b'T' => FieldValue::Timestamp(reader.u64()?),
            b'F' => FieldValue::Table(FieldTable::decode_nested(reader, depth + 1)?),
            b'V' => FieldValue::Void,
            b'x' => FieldValue::Bytes(reader.long_prefixed()?),
            other => return Err(CodecError::UnknownFieldType(other)),
        })
    }
}

fn decode_array(reader: &mut Reader<'_>, depth: usize) -> Result<Vec<FieldValue>, CodecError> {
    if depth > MAX_NESTING_DEPTH {
        return Err(CodecError::NestingTooDeep(MAX_NESTING_DEPTH));
    }
    let block = reader.long_prefixed()?;
    let mut inner = Reader::new(&block);
    let mut values = Vec::new();
    while inner.remaining() > 0 {
        values.push(FieldValue::decode(&mut inner, depth)?);
    }
    Ok(values)
}

impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        FieldValue::Bool(v)
    }
}

impl From<i32> for FieldValue {
    fn from(v: i32) -> Self {
        FieldValue::I32(v)
    }
}

impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        FieldValue::I64(v)
    }
}

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        FieldValue::LongStr(LongStr::from(v))
    }
}

impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        FieldValue::LongStr(LongStr::from(v))
    }
}

impl From<LongStr> for FieldValue {
    fn from(v: LongStr) -> Self {
        FieldValue::LongStr(v)
    }
}

impl From<FieldTable> for FieldValue {
    fn from(v: FieldTable) -> Self {
        FieldValue::Table(v)
    }
}

impl From<Vec<FieldValue>> for FieldValue {
    fn from(v: Vec<FieldValue>) -> Self {
        FieldValue::Array(v)
    }
}

/// An AMQP field table: an ordered list of (key, value) pairs.
///
/// Order (and any duplicate key a peer sent) is preserved, so a decoded table
/// re-encodes byte for byte; lookups are linear, which is the fast option for
/// the handful of entries real tables hold. [`FieldTable::get`] returns the
/// first entry with the key, as RabbitMQ's `table_lookup` does.
#[derive(Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FieldTable(pub Vec<(ShortStr, FieldValue)>);

impl FieldTable {
    pub fn new() -> Self {
        FieldTable(Vec::new())
    }

    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut FieldValue> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`: replaces the value in place if the key is
    /// present (keeping its position), appends otherwise.
    pub fn insert(&mut self, key: ShortStr, value: FieldValue) {
        match self.get_mut(&key) {
            Some(slot) => *slot = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes every entry with `key` and returns the first one's value.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let position = self.0.iter().position(|(k, _)| k == key)?;
        let (_, value) = self.0.remove(position);
        self.0.retain(|(k, _)| k != key);
        Some(value)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&ShortStr, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes [`FieldTable::encode`] writes, including the 4-byte length
    /// prefix.
    pub fn encoded_len(&self) -> usize {
        4 + self
            .0
            .iter()
            .map(|(k, v)| k.encoded_len() + v.encoded_len())
            .sum::<usize>()
    }

    /// Writes the table as it appears in a method argument or property: a
    /// 32-bit byte length, then each key and value.
    pub fn encode(&self, out: &mut BytesMut) {
        let at = wire::begin_u32_length(out);
        for (key, value) in &self.0 {
            key.encode(out);
            value.encode(out);
        }
        wire::end_u32_length(out, at);
    }

    /// The encoding as a buffer of its own.
    pub fn encoded(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Reads a table in the form [`FieldTable::encode`] writes (length prefix
    /// included), requiring that `encoded` holds exactly one table. Keys and
    /// string values share `encoded`'s allocation.
    pub fn decode(encoded: &Bytes) -> Result<Self, CodecError> {
        let mut reader = Reader::new(encoded);
        let table = FieldTable::decode_from(&mut reader)?;
        reader.finish()?;
        Ok(table)
    }

    pub(crate) fn decode_from(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        FieldTable::decode_nested(reader, 1)
    }

    fn decode_nested(reader: &mut Reader<'_>, depth: usize) -> Result<Self, CodecError> {
        if depth > MAX_NESTING_DEPTH {
            return Err(CodecError::NestingTooDeep(MAX_NESTING_DEPTH));
        }
        let block = reader.long_prefixed()?;
        let mut inner = Reader::new(&block);
        let mut entries = Vec::new();
        while inner.remaining() > 0 {
            let key = ShortStr::decode(&mut inner)?;
            let value = FieldValue::decode(&mut inner, depth)?;
            entries.push((key, value));
        }
        Ok(FieldTable(entries))
    }
}

impl From<Vec<(ShortStr, FieldValue)>> for FieldTable {
    fn from(entries: Vec<(ShortStr, FieldValue)>) -> Self {
        FieldTable(entries)
    }
}

impl FromIterator<(ShortStr, FieldValue)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (ShortStr, FieldValue)>>(iter: I) -> Self {
        FieldTable(iter.into_iter().collect())
    }
}

impl IntoIterator for FieldTable {
    type Item = (ShortStr, FieldValue);
    type IntoIter = std::vec::IntoIter<(ShortStr, FieldValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a FieldTable {
    type Item = &'a (ShortStr, FieldValue);
    type IntoIter = std::slice::Iter<'a, (ShortStr, FieldValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &'static str) -> ShortStr {
        ShortStr::from_static(s)
    }

    #[test]
    fn every_type_letter_is_rabbitmqs() {
        let cases: Vec<(FieldValue, &[u8])> = vec![
            (FieldValue::Bool(true), b"t\x01"),
            (FieldValue::I8(-2), b"b\xfe"),
            (FieldValue::U8(200), b"B\xc8"),
            (FieldValue::I16(-2), b"s\xff\xfe"),
            (FieldValue::U16(513), b"u\x02\x01"),
            (FieldValue::I32(-1), b"I\xff\xff\xff\xff"),
            (FieldValue::U32(1), b"i\x00\x00\x00\x01"),
            (FieldValue::I64(1), b"l\x00\x00\x00\x00\x00\x00\x00\x01"),
            (FieldValue::F32(1.0), b"f\x3f\x80\x00\x00"),
            (FieldValue::F64(-2.0), b"d\xc0\x00\x00\x00\x00\x00\x00\x00"),
            (
                FieldValue::Decimal {
                    scale: 2,
                    value: 314,
                },
                b"D\x02\x00\x00\x01\x3a",
            ),
            (FieldValue::from("hi"), b"S\x00\x00\x00\x02hi"),
            (
                FieldValue::Array(vec![FieldValue::Void, FieldValue::U8(7)]),
                b"A\x00\x00\x00\x03VB\x07",
            ),
            (
                FieldValue::Timestamp(5),
                b"T\x00\x00\x00\x00\x00\x00\x00\x05",
            ),
            (
                FieldValue::Table(FieldTable(vec![(key("k"), FieldValue::Void)])),
                b"F\x00\x00\x00\x03\x01kV",
            ),
            (FieldValue::Void, b"V"),
            (
                FieldValue::Bytes(Bytes::from_static(b"\x00\x01")),
                b"x\x00\x00\x00\x02\x00\x01",
            ),
        ];
        for (value, expected) in cases {
            let mut out = BytesMut::new();
            value.encode(&mut out);
            assert_eq!(&out[..], expected, "{value:?}");
            assert_eq!(value.encoded_len(), expected.len(), "{value:?}");
            let encoded = out.freeze();
            let mut reader = Reader::new(&encoded);
            assert_eq!(FieldValue::decode(&mut reader, 1).as_ref(), Ok(&value));
            assert_eq!(reader.remaining(), 0);
        }
    }

    #[test]
    fn capital_l_reads_as_signed_64_bit() {
        let encoded = Bytes::from_static(b"L\xff\xff\xff\xff\xff\xff\xff\xfe");
        let mut reader = Reader::new(&encoded);
        assert_eq!(FieldValue::decode(&mut reader, 1), Ok(FieldValue::I64(-2)));
    }

    #[test]
    fn letters_rabbitmq_rejects_are_syntax_errors() {
        for letter in [b'U', b'c', b'\0'] {
            let encoded = Bytes::from(vec![letter, 0, 0]);
            let mut reader = Reader::new(&encoded);
            assert_eq!(
                FieldValue::decode(&mut reader, 1),
                Err(CodecError::UnknownFieldType(letter))
            );
        }
    }

    #[test]
    fn table_keeps_order_and_duplicates() {
        let table = FieldTable(vec![
            (key("z"), FieldValue::I32(1)),
            (key("a"), FieldValue::I32(2)),
            (key("z"), FieldValue::I32(3)),
        ]);
        let decoded = FieldTable::decode(&table.encoded()).unwrap();
        assert_eq!(decoded, table);
        assert_eq!(decoded.get("z"), Some(&FieldValue::I32(1)));
    }

    #[test]
    fn insert_replaces_in_place_and_remove_drops_all_copies() {
        let mut table = FieldTable::new();
        table.insert(key("a"), FieldValue::I32(1));
        table.insert(key("b"), FieldValue::I32(2));
        table.insert(key("a"), FieldValue::I32(3));
        assert_eq!(
            table
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_i64()))
                .collect::<Vec<_>>(),
            vec![("a", Some(3)), ("b", Some(2))]
        );
        table.0.push((key("b"), FieldValue::Void));
        assert_eq!(table.remove("b"), Some(FieldValue::I32(2)));
        assert_eq!(table.get("b"), None);
        assert_eq!(table.len(), 1);
        assert_eq!(table.remove("b"), None);
    }

    #[test]
    fn helpers_read_the_obvious_variants() {
        assert_eq!(
            FieldValue::U32(u32::MAX).as_i64(),
            Some(i64::from(u32::MAX))
        );
        assert_eq!(FieldValue::Timestamp(1).as_i64(), None);
        assert_eq!(FieldValue::from("all").as_str(), Some("all"));
        assert_eq!(
            FieldValue::LongStr(LongStr::from(vec![0xff])).as_str(),
            None
        );
        assert_eq!(FieldValue::Bool(true).as_bool(), Some(true));
        assert!(FieldValue::Table(FieldTable::new()).as_table().is_some());
    }

    /// `depth` tables, each the value of key "k" in the one around it.
    fn nested_tables(depth: usize) -> Bytes {
        let mut out = Vec::with_capacity(7 * depth);
        for level in (2..=depth).rev() {
            // A level's body: the key (2 bytes), the 'F' and the level inside,
            // which takes 4 + 7 * (level - 2) bytes.
            let body_len = 7 * (level - 1);
            out.extend_from_slice(&(body_len as u32).to_be_bytes());
            out.extend_from_slice(b"\x01kF");
        }
        out.extend_from_slice(&[0, 0, 0, 0]);
        Bytes::from(out)
    }

    #[test]
    fn nesting_is_bounded() {
        assert!(FieldTable::decode(&nested_tables(MAX_NESTING_DEPTH)).is_ok());
        assert_eq!(
            FieldTable::decode(&nested_tables(MAX_NESTING_DEPTH + 1)),
            Err(CodecError::NestingTooDeep(MAX_NESTING_DEPTH))
        );
        // Far beyond the bound: must fail cleanly, not overflow the stack.
        assert!(FieldTable::decode(&nested_tables(100_000)).is_err());
    }

    #[test]
    fn truncated_and_overlong_blocks_are_errors() {
        let table = FieldTable(vec![(key("a"), FieldValue::from("value"))]).encoded();
        for cut in 0..table.len() {
            assert!(
                FieldTable::decode(&table.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        let mut padded = table.to_vec();
        padded.push(0);
        assert_eq!(
            FieldTable::decode(&Bytes::from(padded)),
            Err(CodecError::TrailingBytes(1))
        );
    }
}
