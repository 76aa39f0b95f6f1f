//! Compact frames (CI 79): the DIF/VIF "format" of a full frame is cached per meter under its
//! format signature (CRC-16/EN-13757 of the DIF/VIF bytes); a compact frame carries only the
//! signature, a CRC of the full record bytes and the data bytes.

use super::crc::{Crc16, crc16};

/// How many data bytes follow a record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataLen {
    /// A fixed number of bytes.
    Fixed(usize),
    /// LVAR: the first data byte gives the length (only 0x00–0xBF text/binary handled).
    Variable,
    /// Manufacturer data or global readout: everything to the end.
    ToEnd,
}

/// Data length implied by the DIF's data field (EN 13757-3 table 4).
fn data_len(dif: u8) -> DataLen {
    match dif & 0x0F {
        0x0 | 0x8 => DataLen::Fixed(0),
        0x1 | 0x9 => DataLen::Fixed(1),
        0x2 | 0xA => DataLen::Fixed(2),
        0x3 | 0xB => DataLen::Fixed(3),
        0x4 | 0x5 | 0xC => DataLen::Fixed(4),
        0x6 | 0xE => DataLen::Fixed(6),
        0x7 => DataLen::Fixed(8),
        0xD => DataLen::Variable,
        _ => DataLen::ToEnd,
    }
}

/// Length of the record header (DIF, DIFEs, VIF, VIFEs, plain-text unit) at the start of
/// `bytes`, or `None` if it runs past the end. `bytes[0]` must not be a filler or 0x?F DIF.
fn header_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 0usize;
    // DIF and DIFEs, chained by bit 7.
    loop {
        let b = *bytes.get(i)?;
        i = i.checked_add(1)?;
        if b & 0x80 == 0 {
            break;
        }
    }
    // VIF and VIFEs, chained by bit 7.
    let vif = *bytes.get(i)?;
    loop {
        let b = *bytes.get(i)?;
        i = i.checked_add(1)?;
        if b & 0x80 == 0 {
            break;
        }
    }
    if vif & 0x7F == 0x7C {
        // Plain-text VIF: length byte then the unit text belong to the header.
        let n = usize::from(*bytes.get(i)?);
        i = i.checked_add(1)?.checked_add(n)?;
        if i > bytes.len() {
            return None;
        }
    }
    Some(i)
}

/// Calls `f` with each record header (DIF/VIF bytes, fillers skipped) and its data bytes of
/// full-frame application data. `None` when the records use variable or to-the-end data,
/// which compact frames cannot express, or are malformed.
fn for_each_record<'a>(records: &'a [u8], mut f: impl FnMut(&'a [u8], &'a [u8])) -> Option<()> {
    let mut rest = records;
    let mut any = false;
    while let Some(&dif) = rest.first() {
        if dif == 0x2F {
            rest = rest.get(1..)?;
            continue;
        }
        if dif & 0x0F == 0x0F {
            return None;
        }
        let h = header_len(rest)?;
        let n = match data_len(dif) {
            DataLen::Fixed(n) => n,
            DataLen::Variable | DataLen::ToEnd => return None,
        };
        let end = h.checked_add(n)?;
        f(rest.get(..h)?, rest.get(h..end)?);
        any = true;
        rest = rest.get(end..)?;
    }
    any.then_some(())
}

/// Format signature (CRC-16 of the DIF/VIF bytes) of full-frame application data, without
/// allocating.
pub(crate) fn signature_of(records: &[u8]) -> Option<u16> {
    let mut crc = Crc16::default();
    for_each_record(records, |h, _| crc.update(h))?;
    Some(crc.finish())
}

/// The format (DIF/VIF bytes without fillers) of full-frame application data and its signature.
pub(crate) fn format_of(records: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut format = Vec::with_capacity(32);
    for_each_record(records, |h, _| format.extend_from_slice(h))?;
    Some((crc16(&format), format))
}

/// The compact form of full-frame application data: its format signature, the CRC-16 of the
/// full record bytes (fillers left out, as [`expand`] rebuilds them) and the data bytes.
pub(crate) fn compact_of(records: &[u8]) -> Option<(u16, u16, Vec<u8>)> {
    let mut format = Vec::with_capacity(32);
    let mut full = Vec::with_capacity(records.len());
    let mut data = Vec::with_capacity(records.len());
    for_each_record(records, |h, v| {
        format.extend_from_slice(h);
        full.extend_from_slice(h);
        full.extend_from_slice(v);
        data.extend_from_slice(v);
    })?;
    Some((crc16(&format), crc16(&full), data))
}

/// Rebuilds full record bytes from a cached format and compact data; `Err` says what did not fit.
pub(crate) fn expand(format: &[u8], data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(format.len().saturating_add(data.len()));
    let mut fmt = format;
    let mut values = data;
    while let Some(&dif) = fmt.first() {
        let h = header_len(fmt).ok_or("cached format is malformed")?;
        let n = match data_len(dif) {
            DataLen::Fixed(n) => n,
            DataLen::Variable | DataLen::ToEnd => return Err("cached format has variable data"),
        };
        let (header, fmt_rest) = fmt
            .split_at_checked(h)
            .ok_or("cached format is malformed")?;
        let (value, values_rest) = values
            .split_at_checked(n)
            .ok_or("compact data shorter than the format")?;
        out.extend_from_slice(header);
        out.extend_from_slice(value);
        fmt = fmt_rest;
        values = values_rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_expand_round_trip() {
        // 2F2F filler, 04 13 volume (4 bytes), 02 FD 17 error flags (2 bytes).
        let records = [0x2F, 0x2F, 0x04, 0x13, 1, 2, 3, 4, 0x02, 0xFD, 0x17, 0, 0];
        let (sig, format) = format_of(&records).unwrap();
        assert_eq!(format, [0x04, 0x13, 0x02, 0xFD, 0x17]);
        assert_eq!(sig, crc16(&format));
        let full = expand(&format, &[1, 2, 3, 4, 0, 0]).unwrap();
        assert_eq!(full, &records[2..]);
        assert!(expand(&format, &[1, 2]).is_err());
        let (csig, ccrc, data) = compact_of(&records).unwrap();
        assert_eq!(csig, sig);
        assert_eq!(data, [1, 2, 3, 4, 0, 0]);
        assert_eq!(ccrc, crc16(&records[2..]));
    }
}
