//! Data link layer (EN 13757-4): frame format A/B detection, block-CRC verification and removal,
//! and the address fields.

use std::borrow::Cow;

use serde::Serialize;

use super::WmbusError;
use super::crc::crc16;

/// How the telegram arrived on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameFormat {
    /// Frame format A with its block CRCs (verified and removed).
    A,
    /// Frame format B with its block CRCs (verified and removed).
    B,
    /// CRCs already removed by the receiver (format A layout, `L` = length − 1).
    Stripped,
}

/// Bytes in the first DLL block (L C M M A A A A A A).
const FIRST_BLOCK: usize = 10;
/// Data bytes per following format-A block.
const A_BLOCK: usize = 16;
/// Format B: the first CRC covers at most this many bytes (block 1 + block 2).
const B_FIRST_SPAN: usize = 126;

fn be_u16_at(raw: &[u8], at: usize) -> Option<u16> {
    let end = at.checked_add(2)?;
    let bytes: [u8; 2] = raw.get(at..end)?.try_into().ok()?;
    Some(u16::from_be_bytes(bytes))
}

/// The readings of a received datagram worth trying, most likely first, and the CRC error to
/// report if none of them parses.
#[derive(Debug)]
pub(crate) struct Readings<'a> {
    /// CRC-free telegrams (exactly `L + 1` bytes, `L` rewritten for format B) with the format
    /// each was read in; never empty.
    pub(crate) frames: Vec<(Cow<'a, [u8]>, FrameFormat)>,
    /// A format-B CRC that verified for the first block but not the last one.
    pub(crate) crc_error: Option<WmbusError>,
}

/// Returns the ways `raw` can be read. Trailing bytes after the frame (receiver RSSI) are
/// dropped.
///
/// Format A needs `L + 1` bytes plus two per block, and every block CRC must verify (a good first
/// CRC with a bad later one is an error, never silently accepted): a CRC-less telegram is only
/// mistaken for it if it carries trailing bytes *and* every CRC matches by chance.
///
/// Format B and CRC-less telegrams have the same length (`L` counts format B's CRCs), so the
/// CRCs alone decide. A format-B frame with two CRCs (over 128 bytes) is only taken when both
/// verify (one in 2^32 by chance); one with a good first and a bad last CRC is read as CRC-less,
/// its CRC error kept for when that reading fails too. A short format-B frame has a single CRC,
/// which a CRC-less telegram's last two bytes match once in 65 536: both readings are returned,
/// format B first, and [`super::parse`] keeps the one whose records decode cleanly.
pub(crate) fn readings(raw: &[u8]) -> Result<Readings<'_>, WmbusError> {
    let Some(&l) = raw.first() else {
        return Err(WmbusError::Truncated {
            field: "L field",
            offset: 0,
            needed: 1,
        });
    };
    let l = usize::from(l);
    if let Some(stripped) = try_format_a(raw, l)? {
        return Ok(Readings {
            frames: vec![(Cow::Owned(stripped), FrameFormat::A)],
            crc_error: None,
        });
    }
    let total = l.saturating_add(1);
    let Some(crc_less) = raw.get(..total) else {
        return Err(WmbusError::LengthMismatch {
            declared: l,
            available: raw.len().saturating_sub(1),
        });
    };
    let mut frames = Vec::with_capacity(2);
    let mut crc_error = None;
    match try_format_b(raw, l) {
        Ok(Some((stripped, crcs))) => {
            frames.push((Cow::Owned(stripped), FrameFormat::B));
            if crcs == 2 {
                return Ok(Readings { frames, crc_error });
            }
        }
        Ok(None) => {}
        Err(e) => crc_error = Some(e),
    }
    frames.push((Cow::Borrowed(crc_less), FrameFormat::Stripped));
    Ok(Readings { frames, crc_error })
}

/// Returns the most likely reading of `raw` (see [`readings`]) and its frame format.
#[cfg(test)]
pub(crate) fn strip_crcs(raw: &[u8]) -> Result<(Cow<'_, [u8]>, FrameFormat), WmbusError> {
    let mut r = readings(raw)?;
    match r.frames.drain(..).next() {
        Some(first) => Ok(first),
        None => Err(r.crc_error.unwrap_or(WmbusError::LengthMismatch {
            declared: 0,
            available: 0,
        })),
    }
}

/// Format A: CRC after the first 10 bytes, then after every 16 data bytes (last block shorter).
fn try_format_a(raw: &[u8], l: usize) -> Result<Option<Vec<u8>>, WmbusError> {
    if l < FIRST_BLOCK {
        return Ok(None);
    }
    let data_len = l.saturating_add(1);
    let rest = data_len.saturating_sub(FIRST_BLOCK);
    let blocks = 1usize.saturating_add(rest.div_ceil(A_BLOCK));
    let wire_len = data_len.saturating_add(blocks.saturating_mul(2));
    if raw.len() < wire_len {
        return Ok(None);
    }
    let (Some(first), Some(crc)) = (raw.get(..FIRST_BLOCK), be_u16_at(raw, FIRST_BLOCK)) else {
        return Ok(None);
    };
    if crc16(first) != crc {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(data_len);
    out.extend_from_slice(first);
    let mut pos = FIRST_BLOCK.saturating_add(2);
    let mut remaining = rest;
    let mut block = 1usize;
    while remaining > 0 {
        let n = remaining.min(A_BLOCK);
        let end = pos.saturating_add(n);
        let (Some(data), Some(actual)) = (raw.get(pos..end), be_u16_at(raw, end)) else {
            return Ok(None);
        };
        let expected = crc16(data);
        if expected != actual {
            return Err(WmbusError::BadCrc {
                format: 'A',
                block,
                offset: end,
                expected,
                actual,
            });
        }
        out.extend_from_slice(data);
        pos = end.saturating_add(2);
        remaining = remaining.saturating_sub(n);
        block = block.saturating_add(1);
    }
    Ok(Some(out))
}

/// Format B: `L` counts every byte after it including the CRCs; one CRC closes blocks 1+2
/// (at most 126 bytes), an optional block 3 has its own CRC. Returns the CRC-free telegram and
/// how many CRCs verified (1 or 2).
fn try_format_b(raw: &[u8], l: usize) -> Result<Option<(Vec<u8>, usize)>, WmbusError> {
    let wire_len = l.saturating_add(1);
    if l < FIRST_BLOCK.saturating_add(2) || raw.len() < wire_len {
        return Ok(None);
    }
    let first_span = wire_len.saturating_sub(2).min(B_FIRST_SPAN);
    let (Some(first), Some(crc)) = (raw.get(..first_span), be_u16_at(raw, first_span)) else {
        return Ok(None);
    };
    if crc16(first) != crc {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(wire_len);
    out.extend_from_slice(first);
    let third_start = first_span.saturating_add(2);
    let mut crcs = 1;
    if third_start < wire_len {
        let third_end = wire_len.saturating_sub(2);
        let (Some(third), Some(actual)) =
            (raw.get(third_start..third_end), be_u16_at(raw, third_end))
        else {
            return Ok(None);
        };
        let expected = crc16(third);
        if expected != actual {
            return Err(WmbusError::BadCrc {
                format: 'B',
                block: 2,
                offset: third_end,
                expected,
                actual,
            });
        }
        out.extend_from_slice(third);
        crcs = 2;
    }
    // Rewrite L to the CRC-free layout so the later layers see one convention.
    let new_l = u8::try_from(out.len().saturating_sub(1)).unwrap_or(u8::MAX);
    if let Some(first_byte) = out.first_mut() {
        *first_byte = new_l;
    }
    Ok(Some((out, crcs)))
}

/// Manufacturer, identification number, version and device type of a meter (DLL A field,
/// long TPL header or ELL-III/IV address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Address {
    /// Manufacturer code (EN 62056-21 flag id packed in 15 bits).
    pub manufacturer: u16,
    /// Identification number as the 4 wire bytes read little-endian (`0x12345678` prints as
    /// `12345678`).
    pub id: u32,
    /// Version.
    pub version: u8,
    /// Device type (medium).
    pub device_type: u8,
}

impl Address {
    /// Builds it from the 8 wire bytes `M M A A A A V T`.
    pub(crate) fn from_wire(m: u16, a: [u8; 6]) -> Self {
        let [a0, a1, a2, a3, version, device_type] = a;
        Self {
            manufacturer: m,
            id: u32::from_le_bytes([a0, a1, a2, a3]),
            version,
            device_type,
        }
    }

    /// The 8 wire bytes `M M A A A A V T` (used in IVs).
    pub(crate) fn to_wire(self) -> [u8; 8] {
        let [m0, m1] = self.manufacturer.to_le_bytes();
        let [a0, a1, a2, a3] = self.id.to_le_bytes();
        [m0, m1, a0, a1, a2, a3, self.version, self.device_type]
    }

    /// Three-letter manufacturer code (`KAM`).
    pub fn manufacturer_code(self) -> String {
        manufacturer_code(self.manufacturer)
    }

    /// The id as printed on the meter: 8 hex digits of the little-endian field.
    pub fn id_string(self) -> String {
        format!("{:08x}", self.id)
    }

    /// The project's meter id, `mbus:<MAN><8 digits>`.
    pub fn meter_id(self) -> String {
        format!("mbus:{}{}", self.manufacturer_code(), self.id_string())
    }
}

/// Decodes a packed manufacturer code into its three letters.
pub fn manufacturer_code(m: u16) -> String {
    [(m >> 10) & 0x1F, (m >> 5) & 0x1F, m & 0x1F]
        .iter()
        .map(|&c| char::from(u8::try_from(c).unwrap_or(0).saturating_add(64)))
        .collect()
}

/// Packs a three-letter manufacturer code (`KAM`); `None` unless three letters A–Z.
pub fn manufacturer_from_code(code: &str) -> Option<u16> {
    let bytes = code.as_bytes();
    let [a, b, c] = <[u8; 3]>::try_from(bytes).ok()?;
    let mut out: u16 = 0;
    for ch in [a, b, c] {
        let ch = ch.to_ascii_uppercase();
        if !ch.is_ascii_uppercase() {
            return None;
        }
        out = (out << 5) | u16::from(ch.saturating_sub(64));
    }
    Some(out)
}

/// EN 13757-3 / OMS device type (medium) names.
pub(crate) fn medium_name(device_type: u8) -> &'static str {
    match device_type {
        0x00 => "other",
        0x01 => "oil",
        0x02 => "electricity",
        0x03 => "gas",
        0x04 => "heat",
        0x05 => "steam",
        0x06 => "warm_water",
        0x07 => "water",
        0x08 => "heat_cost_allocator",
        0x09 => "compressed_air",
        0x0A | 0x0B => "cooling",
        0x0C => "heat",
        0x0D => "heat_cooling",
        0x0E => "bus_system",
        0x0F => "unknown",
        0x15 => "hot_water",
        0x16 => "cold_water",
        0x17 => "dual_water",
        0x18 => "pressure",
        0x19 => "ad_converter",
        0x1A => "smoke_detector",
        0x1B => "room_sensor",
        0x1C => "gas_detector",
        0x20 => "breaker",
        0x21 => "valve",
        0x25 => "customer_unit",
        0x28 => "waste_water",
        0x29 => "garbage",
        0x31 => "communication_controller",
        0x32 => "unidirectional_repeater",
        0x33 => "bidirectional_repeater",
        0x36 => "radio_converter_system_side",
        0x37 => "radio_converter_meter_side",
        _ => "reserved",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manufacturer_codes_round_trip() {
        assert_eq!(manufacturer_code(0x2C2D), "KAM");
        assert_eq!(manufacturer_from_code("KAM"), Some(0x2C2D));
        assert_eq!(manufacturer_from_code("K4M"), None);
    }

    #[test]
    fn stripped_frame_drops_trailing_rssi() {
        let raw = [0x03, 0x44, 0x01, 0x02, 0xAA];
        let (frame, format) = strip_crcs(&raw).unwrap();
        assert_eq!(format, FrameFormat::Stripped);
        assert_eq!(&*frame, &raw[..4]);
    }

    #[test]
    fn short_frame_is_length_mismatch() {
        assert_eq!(
            strip_crcs(&[0x10, 0x44]).unwrap_err(),
            WmbusError::LengthMismatch {
                declared: 16,
                available: 1
            }
        );
    }
}
