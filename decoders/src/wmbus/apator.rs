//! Apator AT-WMBUS-16-2 water meters (manufacturer APA, version 0x05, device type 0x07): after
//! the 2F2F check bytes the whole payload is one manufacturer-specific block (DIF 0F) holding a
//! 4-byte header, 3 status bytes and then registers, each a code byte followed by a fixed
//! number of bytes. Register 0x10 is the total volume in litres.
//!
//! Register sizes were checked against every corpus telegram of this meter; decoding stops at
//! the first code whose size is not known, rather than guess an alignment.

use model::{Decimal, Unit};

use super::link::Address;
use crate::frame::{Function, Record, RecordValue};

/// Manufacturer code APA packed as in the M field.
const APA: u16 = 0x0601;

/// Whether the telegram comes from the meter model this module decodes.
pub(crate) fn is_apator162(meter: Address) -> bool {
    meter.manufacturer == APA && meter.version == 0x05 && meter.device_type == 0x07
}

/// Bytes after the code byte, for the register codes seen before the volume register.
fn register_size(code: u8) -> Option<usize> {
    Some(match code {
        0x40 | 0x41 | 0x43 => 2,
        0x42 => 4,
        0x44 => 3,
        0x71 => 9,
        0x80..=0x87 => 10,
        0xA0 => 4,
        0xB4 => 3,
        0xF0 => 4,
        _ => return None,
    })
}

/// Register holding the total volume (u32 LE, litres).
const TOTAL_VOLUME: u8 = 0x10;
/// Manufacturer block header (4 bytes) and status (3 bytes) before the first register.
const FIRST_REGISTER: usize = 7;

/// The total-volume record of a decrypted payload (fillers, then `0F` and the block), or
/// `None` when the block does not have the expected shape.
pub(crate) fn records(payload: &[u8]) -> Option<Vec<Record>> {
    let start = payload.iter().position(|&b| b != 0x2F)?;
    let (&dif, block) = payload.get(start..)?.split_first()?;
    if dif != 0x0F {
        return None;
    }
    let mut at = FIRST_REGISTER;
    loop {
        let code = *block.get(at)?;
        at = at.checked_add(1)?;
        if code == TOTAL_VOLUME {
            let bytes: [u8; 4] = block.get(at..at.checked_add(4)?)?.try_into().ok()?;
            let litres = u32::from_le_bytes(bytes);
            return Some(vec![Record {
                quantity: crate::frame::RecordQuantity::Volume,
                value: RecordValue::Number(Decimal::new(i64::from(litres), 3)),
                unit: Some(Unit::CubicMetre),
                storage: 0,
                tariff: 0,
                subunit: 0,
                function: Function::Instantaneous,
            }]);
        }
        at = at.checked_add(register_size(code)?)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_registers_to_the_total_volume() {
        // Synthetic: 2F2F, 0F, header, status, 43 (2 bytes), 84 (10 bytes), 10 = 12 345 L.
        let mut payload = vec![0x2F, 0x2F, 0x0F, 1, 2, 3, 4, 0, 0, 0, 0x43, 9, 9, 0x84];
        payload.extend_from_slice(&[7; 10]);
        payload.extend_from_slice(&[0x10, 0x39, 0x30, 0x00, 0x00, 0xFF, 0xFF]);
        let r = records(&payload).unwrap();
        assert_eq!(r[0].value, RecordValue::Number(Decimal::new(12_345, 3)));
        // An unknown register before the volume stops decoding.
        payload[10] = 0x55;
        assert!(records(&payload).is_none());
        // Not a manufacturer block.
        assert!(records(&[0x2F, 0x2F, 0x04, 0x13]).is_none());
    }
}
