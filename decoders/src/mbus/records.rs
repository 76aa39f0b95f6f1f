//! The data-record parser: DIF/DIFE/VIF/VIFE chains and data lengths, the allocation-free `RecordIter`.

use super::*;

/// One data record, borrowed from the frame (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Offset of the DIF in the input.
    pub offset: usize,
    /// DIF.
    pub dif: u8,
    /// DIFE chain.
    pub dife: &'a [u8],
    /// VIF (0 for DIF 0F/1F records, which have none).
    pub vif: u8,
    /// Plain-text VIF (7C/FC): the unit text as sent (reversed ASCII).
    pub plain_text: &'a [u8],
    /// VIFE chain.
    pub vife: &'a [u8],
    /// Data bytes (for LVAR records without the LVAR byte).
    pub data: &'a [u8],
    /// LVAR byte of variable-length records.
    pub lvar: Option<u8>,
    /// Data sent most significant byte first (CI 76).
    pub msb_first: bool,
}

/// Iterator over the data records of a payload; see [`records`].
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    rest: &'a [u8],
    offset: usize,
    msb_first: bool,
    done: bool,
}

/// Iterates the data records of `payload` (the bytes after the header) without allocating.
///
/// Idle fillers (2F) are skipped; a 0F/1F record takes the rest of the payload.
pub fn records(payload: &[u8]) -> RecordIter<'_> {
    RecordIter::with_offset(payload, 0, false)
}

impl<'a> RecordIter<'a> {
    pub(super) fn with_offset(rest: &'a [u8], offset: usize, msb_first: bool) -> Self {
        Self {
            rest,
            offset,
            msb_first,
            done: false,
        }
    }

    #[inline(always)]
    pub(super) fn next_record(&mut self) -> Result<Option<RawRecord<'a>>, MbusError> {
        // Idle fillers (2F) are skipped.
        let fillers = self.rest.iter().take_while(|b| **b == 0x2F).count();
        let mut r = RecordReader {
            bytes: self.rest,
            pos: fillers,
            base: self.offset,
        };
        let offset = r.offset();
        let Some(&dif) = self.rest.get(fillers) else {
            return Ok(None);
        };
        r.pos = r.pos.wrapping_add(1);
        let msb_first = self.msb_first;
        let record = if dif == 0x0F || dif == 0x1F {
            // Manufacturer data: the rest of the payload.
            let data = r.rest();
            r.pos = r.bytes.len();
            RawRecord {
                offset,
                dif,
                dife: &[],
                vif: 0,
                plain_text: &[],
                vife: &[],
                data,
                lvar: None,
                msb_first,
            }
        } else {
            let dife = r.chain(dif, MAX_DIFE, "DIFE", || MbusError::TooManyDife { offset })?;
            // Two tariff bits per DIFE: the 9th and 10th would go beyond the 16 bits a
            // reading's tariff has, so refuse rather than cut them.
            if dife.iter().skip(8).any(|d| d & 0x30 != 0) {
                return Err(MbusError::TariffTooWide { offset });
            }
            let vif = r.byte("VIF")?;
            let plain_text = if vif & 0x7F == 0x7C {
                // libmbus and the old ELV/Itron devices put the text right after the VIF.
                let len = r.byte("plain-text VIF length")?;
                r.take(usize::from(len), "plain-text VIF")?
            } else {
                &[]
            };
            let vife = r.chain(vif, MAX_VIFE, "VIFE", || MbusError::TooManyVife { offset })?;
            let (data, lvar) = match dif & 0x0F {
                0x0D => {
                    let lvar_offset = r.offset();
                    let lvar = r.byte("LVAR")?;
                    let len = lvar_len(lvar).ok_or(MbusError::UnsupportedLvar {
                        offset: lvar_offset,
                        lvar,
                    })?;
                    (r.take(len, "variable-length data")?, Some(lvar))
                }
                coding => (r.take(data_len(coding), "data")?, None),
            };
            RawRecord {
                offset,
                dif,
                dife,
                vif,
                plain_text,
                vife,
                data,
                lvar,
                msb_first,
            }
        };
        self.rest = r.rest();
        self.offset = r.offset();
        Ok(Some(record))
    }
}

/// Length of variable-length data from its LVAR byte (EN 13757-3 §6.3.3); `None` if reserved.
pub(super) fn lvar_len(lvar: u8) -> Option<usize> {
    Some(match lvar {
        0x00..=0xBF => usize::from(lvar),
        0xC0..=0xCF => usize::from(lvar.wrapping_sub(0xC0)),
        0xD0..=0xDF => usize::from(lvar.wrapping_sub(0xD0)),
        0xE0..=0xEF => usize::from(lvar.wrapping_sub(0xE0)),
        // Binary numbers of 4 * (LVAR - EC) bytes, then 48 and 64 bytes.
        0xF0..=0xF4 => usize::from(lvar.wrapping_sub(0xEC)).wrapping_mul(4),
        0xF5 => 48,
        0xF6 => 64,
        _ => return None,
    })
}

/// The record parser's reader: an index into the payload instead of a re-sliced cursor, as
/// this runs for every byte of every record. Its arithmetic wraps instead of saturating (the
/// saturating forms cost a compare and a conditional move each, a tenth of the record walk):
/// `pos` never passes the payload's length, advances by at most a few hundred bytes, and
/// `base` is an offset into the same frame, so nothing comes near `usize::MAX`; a wrapped
/// `end` would be below `pos` and read as truncated, never out of bounds. Errors name the field and its offset exactly as
/// [`Cursor`] does.
pub(super) struct RecordReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Offset of `bytes[0]` in the input.
    base: usize,
}

impl<'a> RecordReader<'a> {
    fn offset(&self) -> usize {
        self.base.wrapping_add(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or(&[])
    }

    #[inline]
    fn byte(&mut self, field: &'static str) -> Result<u8, MbusError> {
        match self.bytes.get(self.pos) {
            Some(b) => {
                self.pos = self.pos.wrapping_add(1);
                Ok(*b)
            }
            None => Err(MbusError::Truncated {
                offset: self.offset(),
                field,
                needed: 1,
            }),
        }
    }

    #[inline]
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MbusError> {
        let end = self.pos.wrapping_add(n);
        match self.bytes.get(self.pos..end) {
            Some(taken) => {
                self.pos = end;
                Ok(taken)
            }
            None => Err(MbusError::Truncated {
                offset: self.offset(),
                field,
                needed: n.saturating_sub(self.bytes.len().saturating_sub(self.pos)),
            }),
        }
    }

    /// An extension chain (DIFEs or VIFEs) after `first`, while the extension bit is set; at
    /// most `max` bytes, else `too_many`.
    #[inline]
    fn chain(
        &mut self,
        first: u8,
        max: usize,
        field: &'static str,
        too_many: impl FnOnce() -> MbusError,
    ) -> Result<&'a [u8], MbusError> {
        let start = self.pos;
        let mut ext = first & 0x80 != 0;
        while ext {
            if self.pos.wrapping_sub(start) >= max {
                return Err(too_many());
            }
            ext = self.byte(field)? & 0x80 != 0;
        }
        Ok(self.bytes.get(start..self.pos).unwrap_or(&[]))
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RawRecord<'a>, MbusError>;

    // Inlined so that the record is built in the caller's frame: returned by value through
    // `Option<Result<..>>` it was copied twice and the copy stalled on store forwarding.
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Data length for DIF data-field codings other than LVAR (EN 13757-3 table 5).
pub(super) fn data_len(coding: u8) -> usize {
    match coding {
        0x01 | 0x09 => 1,
        0x02 | 0x0A => 2,
        0x03 | 0x0B => 3,
        0x04 | 0x05 | 0x0C => 4,
        0x06 | 0x0E => 6,
        0x07 => 8,
        _ => 0,
    }
}
