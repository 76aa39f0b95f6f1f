//! Encoder for simulators: builds CRC-free T1-style telegrams (CI 7A short header) in security
//! mode 0 or 5, as a USB receiver would log them.

use super::crypto;
use super::link::Address;

/// Identity of a simulated wireless meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WmbusMeter {
    /// Manufacturer, packed (see [`super::manufacturer_from_code`]).
    pub manufacturer: u16,
    /// Id as the little-endian wire field (`0x12345678` for meter `12345678`).
    pub id: u32,
    /// Version byte.
    pub version: u8,
    /// Device type (0x07 water).
    pub device_type: u8,
}

impl WmbusMeter {
    /// The meter's address fields.
    pub fn address(&self) -> Address {
        Address {
            manufacturer: self.manufacturer,
            id: self.id,
            version: self.version,
            device_type: self.device_type,
        }
    }

    /// The project's meter id, `mbus:<MAN><8 digits>`.
    pub fn meter_id(&self) -> String {
        self.address().meter_id()
    }
}

/// C field SND_NR (send/no reply), what meters send periodically.
const C_SND_NR: u8 = 0x44;
/// CI of a short TPL header followed by data records.
const CI_SHORT: u8 = 0x7A;

/// Builds a telegram carrying `records_payload` (EN 13757-3 data records). With a key the records
/// are prefixed with the `2F2F` check bytes, padded with `2F` fillers to whole AES blocks and
/// encrypted in security mode 5; without one they are sent in clear (mode 0). No CRCs.
///
/// Payloads longer than a telegram can carry (L ≤ 255) are truncated to fit.
pub fn telegram(
    meter: &WmbusMeter,
    records_payload: &[u8],
    access_no: u8,
    key: Option<[u8; 16]>,
) -> Vec<u8> {
    // L C M(2) A(6) CI ACC ST CW(2) = 15 bytes of header; L excludes itself.
    const HEADER: usize = 15;
    const MAX_PAYLOAD: usize = 256 - HEADER;
    let mut payload = Vec::with_capacity(records_payload.len().saturating_add(18));
    let config_word: u16 = match key {
        Some(_) => {
            payload.extend_from_slice(&[0x2F, 0x2F]);
            payload.extend_from_slice(records_payload);
            let max = MAX_PAYLOAD / crypto::BLOCK * crypto::BLOCK;
            payload.truncate(max);
            while payload.len() % crypto::BLOCK != 0 {
                payload.push(0x2F);
            }
            let blocks = u16::try_from(payload.len() / crypto::BLOCK).unwrap_or(0x0F) & 0x0F;
            0x0500 | (blocks << 4)
        }
        None => {
            payload.extend_from_slice(records_payload);
            payload.truncate(MAX_PAYLOAD);
            0
        }
    };
    let address = meter.address();
    if let Some(key) = key {
        let mut iv = [access_no; 16];
        for (slot, b) in iv.iter_mut().zip(address.to_wire()) {
            *slot = b;
        }
        crypto::cbc_encrypt(&crypto::cipher(&key), iv, &mut payload);
    }
    let len =
        u8::try_from(HEADER.saturating_add(payload.len()).saturating_sub(1)).unwrap_or(u8::MAX);
    let mut out = Vec::with_capacity(HEADER.saturating_add(payload.len()));
    out.push(len);
    out.push(C_SND_NR);
    out.extend_from_slice(&address.to_wire());
    out.push(CI_SHORT);
    out.push(access_no);
    out.push(0x00);
    out.extend_from_slice(&config_word.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// CI of a compact frame without a transport header (format signature, full-frame CRC, data).
const CI_COMPACT: u8 = 0x79;

/// Builds the compact (CI 79, plaintext) counterpart of a telegram carrying `records_payload`,
/// as meters send between full frames: the records' format signature, the CRC-16 of the full
/// record bytes and the data bytes only. A receiver decodes it only after a full frame with
/// the same format (see [`super::CompactHold`]). `None` when the records cannot be sent
/// compact (variable-length or manufacturer data, or malformed).
pub fn compact_telegram(meter: &WmbusMeter, records_payload: &[u8]) -> Option<Vec<u8>> {
    let (signature, full_crc, data) = super::compact::compact_of(records_payload)?;
    let mut out = Vec::with_capacity(data.len().saturating_add(15));
    out.push(0);
    out.push(C_SND_NR);
    out.extend_from_slice(&meter.address().to_wire());
    out.push(CI_COMPACT);
    out.extend_from_slice(&signature.to_le_bytes());
    out.extend_from_slice(&full_crc.to_le_bytes());
    out.extend_from_slice(&data);
    *out.first_mut()? = u8::try_from(out.len().checked_sub(1)?).ok()?;
    Some(out)
}

/// Splits an unfragmented CRC-free telegram (`L C M A` then the transport layer, no ELL or
/// AFL) into AFL fragments (EN 13757-7 §6) of at most `piece` message bytes each: fragment ids
/// 1, 2, ..., "more fragments" on all but the last, the message length (from the TPL CI to the
/// end) in the first. A message that fits one piece still goes out as fragment 1 of 1.
pub fn fragments(telegram: &[u8], piece: usize) -> Vec<Vec<u8>> {
    let (Some(header), Some(message)) = (telegram.get(1..10), telegram.get(10..)) else {
        return Vec::new();
    };
    let total = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let pieces: Vec<&[u8]> = message.chunks(piece.max(1)).collect();
    let last = pieces.len();
    let mut out = Vec::with_capacity(last);
    for (id, chunk) in (1u16..).zip(pieces) {
        let more = usize::from(id) < last;
        let mut fcl = id & 0xFF;
        if more {
            fcl |= 0x4000;
        }
        let mut afl = Vec::with_capacity(4);
        if id == 1 {
            fcl |= 0x1000;
            afl.extend_from_slice(&fcl.to_le_bytes());
            afl.extend_from_slice(&total.to_le_bytes());
        } else {
            afl.extend_from_slice(&fcl.to_le_bytes());
        }
        let mut frame = vec![0u8];
        frame.extend_from_slice(header);
        frame.push(0x90);
        frame.push(u8::try_from(afl.len()).unwrap_or(0));
        frame.extend_from_slice(&afl);
        frame.extend_from_slice(chunk);
        let l = u8::try_from(frame.len().saturating_sub(1)).unwrap_or(u8::MAX);
        if let Some(first) = frame.first_mut() {
            *first = l;
        }
        out.push(frame);
    }
    out
}
