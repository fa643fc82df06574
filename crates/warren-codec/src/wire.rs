//! Bounds-checked reading of AMQP primitive types from a received payload, and
//! the matching writers. Everything above (`strings`, `table`, `properties`,
//! `method`, `frame`) reads input only through [`Reader`], which is what
//! makes "no input can panic the decoder" a local property of this file.
//!
//! The reader hands out sub-slices as [`Bytes`] sharing the payload's
//! allocation, which is how decoded strings and bodies stay zero-copy.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::CodecError;

/// A cursor over a received payload. All multi-byte integers are big-endian
/// (network order), as everywhere in AMQP.
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Fails with [`CodecError::TrailingBytes`] unless everything was read:
    /// RabbitMQ matches method arguments and property lists against the whole
    /// payload, so extra bytes are a malformed frame there too.
    pub(crate) fn finish(&self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(CodecError::TrailingBytes(extra)),
        }
    }

    fn claim(&mut self, len: usize) -> Result<std::ops::Range<usize>, CodecError> {
        let available = self.remaining();
        if len > available {
            return Err(CodecError::UnexpectedEnd {
                needed: len,
                available,
            });
        }
        let start = self.pos;
        self.pos = start + len;
        Ok(start..self.pos)
    }

    pub(crate) fn slice(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        let range = self.claim(len)?;
        let whole: &'a [u8] = self.buf;
        whole.get(range).ok_or(CodecError::UnexpectedEnd {
            needed: len,
            available: 0,
        })
    }

    /// A zero-copy sub-slice of the payload.
    pub(crate) fn bytes(&mut self, len: usize) -> Result<Bytes, CodecError> {
        let range = self.claim(len)?;
        // `claim` has checked the range against the buffer.
        Ok(self.buf.slice(range))
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let slice = self.slice(N)?;
        <[u8; N]>::try_from(slice).map_err(|_| CodecError::UnexpectedEnd {
            needed: N,
            available: slice.len(),
        })
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        let [octet] = self.array::<1>()?;
        Ok(octet)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A length-prefixed (u32) block, as used by long strings and tables.
    pub(crate) fn long_prefixed(&mut self) -> Result<Bytes, CodecError> {
        let len = self.u32()?;
        let len = usize::try_from(len).map_err(|_| CodecError::UnexpectedEnd {
            needed: usize::MAX,
            available: self.remaining(),
        })?;
        self.bytes(len)
    }

    /// A length-prefixed (u8) block, as used by short strings.
    pub(crate) fn short_prefixed(&mut self) -> Result<Bytes, CodecError> {
        let len = self.u8()?;
        self.bytes(usize::from(len))
    }
}

/// Length of a value as the u32 the wire format needs. Values over 4 GiB
/// cannot be framed at all (frame sizes are u32 and bounded by frame-max), so
/// nothing legitimate reaches the saturation; saturating keeps the encoder
/// total instead of panicking in the broker.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

pub(crate) fn put_long_prefixed(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(len_u32(bytes.len()));
    out.put_slice(bytes);
}

/// Writes a u32 placeholder and returns its position, for blocks whose
/// length is only known after writing them (tables, frame payloads).
pub(crate) fn begin_u32_length(out: &mut BytesMut) -> usize {
    let at = out.len();
    out.put_u32(0);
    at
}

/// Fills in the placeholder from [`begin_u32_length`] with the number of bytes
/// written since.
pub(crate) fn end_u32_length(out: &mut BytesMut, at: usize) {
    let len = len_u32(out.len().saturating_sub(at + 4));
    if let Some(slot) = out.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}
