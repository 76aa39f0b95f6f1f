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

    /// The next record, walked on a shrinking slice: a field is a pattern match or a
    /// `split_at_checked`, and offsets (for errors and [`RawRecord::offset`]) are computed
    /// from the length left, not kept as a running index beside the slice (that index and
    /// the slices rebuilt from it with bound checks cost about 300 instructions a frame
    /// more, 4 % of `decode`).
    #[inline(always)]
    pub(super) fn next_record(&mut self) -> Result<Option<RawRecord<'a>>, MbusError> {
        let whole = self.rest;
        let base = self.offset;
        // Offset in the input of the first byte of `rest`, a suffix of `whole`.
        let at = |rest: &[u8]| base.wrapping_add(whole.len().wrapping_sub(rest.len()));
        let mut rest = whole;
        // Idle fillers (2F) are skipped.
        let dif = loop {
            match rest {
                [] => return Ok(None),
                [0x2F, tail @ ..] => rest = tail,
                [dif, tail @ ..] => {
                    rest = tail;
                    break *dif;
                }
            }
        };
        let offset = at(rest).wrapping_sub(1);
        let msb_first = self.msb_first;
        let record = if dif == 0x0F || dif == 0x1F {
            // Manufacturer data: the rest of the payload.
            let data = rest;
            rest = &[];
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
            let dife = chain(&mut rest, dif, MAX_DIFE, "DIFE", &at, || {
                MbusError::TooManyDife { offset }
            })?;
            // Two tariff bits per DIFE: the 9th and 10th would go beyond the 16 bits a
            // reading's tariff has, so refuse rather than cut them.
            if dife.iter().skip(8).any(|d| d & 0x30 != 0) {
                return Err(MbusError::TariffTooWide { offset });
            }
            let vif = byte(&mut rest, "VIF", &at)?;
            let plain_text = if vif & 0x7F == 0x7C {
                // libmbus and the old ELV/Itron devices put the text right after the VIF.
                let len = byte(&mut rest, "plain-text VIF length", &at)?;
                take(&mut rest, usize::from(len), "plain-text VIF", &at)?
            } else {
                &[]
            };
            let vife = chain(&mut rest, vif, MAX_VIFE, "VIFE", &at, || {
                MbusError::TooManyVife { offset }
            })?;
            let (data, lvar) = match dif & 0x0F {
                0x0D => {
                    let lvar_offset = at(rest);
                    let lvar = byte(&mut rest, "LVAR", &at)?;
                    let len = lvar_len(lvar).ok_or(MbusError::UnsupportedLvar {
                        offset: lvar_offset,
                        lvar,
                    })?;
                    (
                        take(&mut rest, len, "variable-length data", &at)?,
                        Some(lvar),
                    )
                }
                coding => (take(&mut rest, data_len(coding), "data", &at)?, None),
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
        self.offset = at(rest);
        self.rest = rest;
        Ok(Some(record))
    }
}

/// One byte off the front of `rest`; errors name the field at its offset (`at`).
#[inline(always)]
fn byte<'a>(
    rest: &mut &'a [u8],
    field: &'static str,
    at: &impl Fn(&[u8]) -> usize,
) -> Result<u8, MbusError> {
    let all: &'a [u8] = rest;
    match all.split_first() {
        Some((b, tail)) => {
            *rest = tail;
            Ok(*b)
        }
        None => Err(MbusError::Truncated {
            offset: at(all),
            field,
            needed: 1,
        }),
    }
}

/// `n` bytes off the front of `rest`.
#[inline(always)]
fn take<'a>(
    rest: &mut &'a [u8],
    n: usize,
    field: &'static str,
    at: &impl Fn(&[u8]) -> usize,
) -> Result<&'a [u8], MbusError> {
    let all: &'a [u8] = rest;
    match all.split_at_checked(n) {
        Some((taken, tail)) => {
            *rest = tail;
            Ok(taken)
        }
        None => Err(MbusError::Truncated {
            offset: at(all),
            field,
            needed: n.saturating_sub(all.len()),
        }),
    }
}

/// An extension chain (DIFEs or VIFEs) after `first`, while the extension bit is set; at
/// most `max` bytes, else `too_many`.
#[inline(always)]
fn chain<'a>(
    rest: &mut &'a [u8],
    first: u8,
    max: usize,
    field: &'static str,
    at: &impl Fn(&[u8]) -> usize,
    too_many: impl FnOnce() -> MbusError,
) -> Result<&'a [u8], MbusError> {
    let start = *rest;
    let mut n = 0usize;
    let mut ext = first & 0x80 != 0;
    while ext {
        if n >= max {
            return Err(too_many());
        }
        ext = byte(rest, field, at)? & 0x80 != 0;
        n = n.wrapping_add(1);
    }
    Ok(start.get(..n).unwrap_or(&[]))
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
