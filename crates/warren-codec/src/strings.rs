//! AMQP's two string types. [`ShortStr`] (names, routing keys, most property
//! values) is at most 255 bytes and, in this codebase, always valid UTF-8;
//! [`LongStr`] is arbitrary bytes (SASL responses, header values, bodies of
//! text). Both wrap [`Bytes`] so that decoding borrows the read buffer
//! (`wire` hands out the slices) and cloning is a reference-count bump.
//! `table`, `properties` and `method` use them for every string field.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::CodecError;
use crate::wire::Reader;

/// An AMQP short string: at most 255 bytes of valid UTF-8.
///
/// RabbitMQ rejects non-UTF-8 short strings in methods (`assert_utf8`), and
/// every consumer of names in the broker wants `&str`, so the check is done
/// once at construction and [`ShortStr::as_str`] is free afterwards.
///
/// Equality, ordering and hashing agree with `str`, so `HashMap<ShortStr, _>`
/// and `BTreeMap<ShortStr, _>` can be queried with a `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ShortStr(Bytes);

impl ShortStr {
    /// The longest short string the wire format can carry.
    pub const MAX_LEN: usize = 255;

    /// A short string from a literal, without copying.
    ///
    /// # Panics
    /// If `s` is longer than 255 bytes. Used with a literal in a `const`
    /// context this is a compile-time error instead.
    pub const fn from_static(s: &'static str) -> Self {
        assert!(
            s.len() <= Self::MAX_LEN,
            "short string longer than 255 bytes"
        );
        ShortStr(Bytes::from_static(s.as_bytes()))
    }

    /// Takes ownership of `s` without copying, or fails if it is too long.
    pub fn try_from_string(s: String) -> Result<Self, CodecError> {
        check_len(s.len())?;
        Ok(ShortStr(Bytes::from(s)))
    }

    /// Wraps bytes that must be valid UTF-8 of at most 255 bytes. Shares the
    /// allocation of `bytes`.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, CodecError> {
        check_len(bytes.len())?;
        if std::str::from_utf8(&bytes).is_err() {
            return Err(CodecError::InvalidUtf8);
        }
        Ok(ShortStr(bytes))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor either takes a `str`/`String` or checks the
        // bytes with `std::str::from_utf8`, and the bytes are never mutated.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying shared buffer.
    pub fn as_shared_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        ShortStr::try_from_bytes(reader.short_prefixed()?)
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        // The length was checked at construction, so it fits the octet.
        out.put_u8(self.0.len() as u8);
        out.put_slice(&self.0);
    }

    pub(crate) fn encoded_len(&self) -> usize {
        1 + self.0.len()
    }
}

fn check_len(len: usize) -> Result<(), CodecError> {
    if len > ShortStr::MAX_LEN {
        Err(CodecError::ShortStrTooLong(len))
    } else {
        Ok(())
    }
}

impl Hash for ShortStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly like `str` for the `Borrow<str>` lookups to work;
        // hashing the bytes as a slice would add a length prefix instead.
        self.as_str().hash(state)
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Deref for ShortStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ShortStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ShortStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl TryFrom<&str> for ShortStr {
    type Error = CodecError;
    fn try_from(s: &str) -> Result<Self, CodecError> {
        check_len(s.len())?;
        Ok(ShortStr(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl TryFrom<String> for ShortStr {
    type Error = CodecError;
    fn try_from(s: String) -> Result<Self, CodecError> {
        ShortStr::try_from_string(s)
    }
}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ShortStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<ShortStr> for str {
    fn eq(&self, other: &ShortStr) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<ShortStr> for &str {
    fn eq(&self, other: &ShortStr) -> bool {
        *self == other.as_str()
    }
}

impl From<ShortStr> for Bytes {
    fn from(s: ShortStr) -> Bytes {
        s.0
    }
}

impl From<ShortStr> for String {
    fn from(s: ShortStr) -> String {
        s.as_str().to_owned()
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ShortStr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ShortStr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ShortStr::try_from_string(s).map_err(serde::de::Error::custom)
    }
}

/// An AMQP long string: arbitrary bytes with a 32-bit length. Not
/// necessarily UTF-8 (SASL PLAIN responses contain NULs; clients put binary
/// data in header values), so it is not a `str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LongStr(Bytes);

impl LongStr {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying shared buffer.
    pub fn as_shared_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The contents as `str` if they are valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The contents as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn to_str_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, CodecError> {
        reader.long_prefixed().map(LongStr)
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        crate::wire::put_long_prefixed(out, &self.0);
    }

    pub(crate) fn encoded_len(&self) -> usize {
        4 + self.0.len()
    }
}

impl fmt::Debug for LongStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_str_lossy(), f)
    }
}

impl From<Bytes> for LongStr {
    fn from(b: Bytes) -> Self {
        LongStr(b)
    }
}

impl From<Vec<u8>> for LongStr {
    fn from(v: Vec<u8>) -> Self {
        LongStr(Bytes::from(v))
    }
}

impl From<&[u8]> for LongStr {
    fn from(v: &[u8]) -> Self {
        LongStr(Bytes::copy_from_slice(v))
    }
}

impl From<String> for LongStr {
    fn from(s: String) -> Self {
        LongStr(Bytes::from(s))
    }
}

impl From<&str> for LongStr {
    fn from(s: &str) -> Self {
        LongStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<ShortStr> for LongStr {
    fn from(s: ShortStr) -> Self {
        LongStr(s.0)
    }
}

impl AsRef<[u8]> for LongStr {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq<[u8]> for LongStr {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

impl PartialEq<str> for LongStr {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for LongStr {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn short_str_rejects_over_255_bytes() {
        assert!(ShortStr::try_from("x".repeat(255).as_str()).is_ok());
        assert_eq!(
            ShortStr::try_from("x".repeat(256).as_str()),
            Err(CodecError::ShortStrTooLong(256))
        );
        assert_eq!(
            ShortStr::try_from_string("é".repeat(128)),
            Err(CodecError::ShortStrTooLong(256))
        );
    }

    #[test]
    fn short_str_rejects_invalid_utf8() {
        assert_eq!(
            ShortStr::try_from_bytes(Bytes::from_static(b"a\xffb")),
            Err(CodecError::InvalidUtf8)
        );
    }

    #[test]
    fn short_str_is_usable_as_a_str_map_key() {
        let mut hashed = HashMap::new();
        hashed.insert(ShortStr::from_static("amq.direct"), 1);
        assert_eq!(hashed.get("amq.direct"), Some(&1));
        let mut ordered = BTreeMap::new();
        ordered.insert(ShortStr::from_static("b"), 2);
        ordered.insert(ShortStr::from_static("a"), 1);
        assert_eq!(ordered.get("b"), Some(&2));
        assert_eq!(ordered.keys().next().map(ShortStr::as_str), Some("a"));
    }

    #[test]
    fn short_str_compares_and_prints_as_text() {
        let s = ShortStr::from_static("q1");
        assert_eq!(s, "q1");
        assert!("q1" == s);
        assert_eq!(format!("{s:?} {s}"), "\"q1\" q1");
        assert_eq!(s.len(), 2);
        assert!(s.starts_with('q'));
    }

    #[test]
    fn long_str_keeps_arbitrary_bytes() {
        let l = LongStr::from(vec![0u8, b'u', 0, b'p', 0xff]);
        assert_eq!(l.as_str(), None);
        assert_eq!(l.to_str_lossy(), "\0u\0p\u{fffd}");
        assert_eq!(LongStr::from("PLAIN").as_str(), Some("PLAIN"));
    }
}
