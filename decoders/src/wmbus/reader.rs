//! A byte cursor over a CRC-free telegram built on `nom` primitives: every read checks the
//! remaining length and reports the field and byte offset when it falls short.

use nom::Parser;
use nom::bytes::complete::take;

use super::WmbusError;

/// Cursor over `input`, remembering the absolute offset of its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    input: &'a [u8],
    /// Absolute offset of `input[0]` in the telegram.
    offset: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading `input`, whose first byte sits at `offset` in the telegram.
    pub(crate) fn new(input: &'a [u8], offset: usize) -> Self {
        Self { input, offset }
    }

    /// Absolute offset of the next byte.
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    /// The unread bytes.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.input
    }

    /// Reads `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WmbusError> {
        let res: nom::IResult<&'a [u8], &'a [u8], nom::error::Error<&'a [u8]>> =
            take(n).parse(self.input);
        match res {
            Ok((rest, taken)) => {
                self.input = rest;
                self.offset = self.offset.saturating_add(n);
                Ok(taken)
            }
            Err(_) => Err(WmbusError::Truncated {
                field,
                offset: self.offset,
                needed: n.saturating_sub(self.input.len()),
            }),
        }
    }

    /// Reads `N` bytes into an array.
    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WmbusError> {
        let offset = self.offset;
        let taken = self.bytes(N, field)?;
        <[u8; N]>::try_from(taken).map_err(|_| WmbusError::Truncated {
            field,
            offset,
            needed: N,
        })
    }

    /// Reads one byte.
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WmbusError> {
        let [b] = self.array::<1>(field)?;
        Ok(b)
    }

    /// Reads a little-endian u16.
    pub(crate) fn le_u16(&mut self, field: &'static str) -> Result<u16, WmbusError> {
        Ok(u16::from_le_bytes(self.array::<2>(field)?))
    }

    /// Reads a little-endian u32.
    pub(crate) fn le_u32(&mut self, field: &'static str) -> Result<u32, WmbusError> {
        Ok(u32::from_le_bytes(self.array::<4>(field)?))
    }
}
