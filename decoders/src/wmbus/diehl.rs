//! Diehl Metering quirks: PRIOS / "real data" address layout and the PRIOS LFSR scrambler used
//! by Izar water meters (CI A0–A3), whose default keys the manufacturer published.

use model::{Decimal, Unit};

use super::link::Address;
use crate::frame::{Function, Record, RecordValue};

/// Manufacturer codes of the Diehl group (DME, HYD, SAP) packed as in the M field.
const DME: u16 = 0x11A5;
const HYD: u16 = 0x2324;
const SAP: u16 = 0x4C30;

/// Whether this frame puts version and type first in the A field and the ID after them
/// (Hydrometer frames, and Diehl PRIOS frames with CI A0–A3).
pub(crate) fn has_prios_address(manufacturer: u16, ci: u8) -> bool {
    match manufacturer {
        HYD => true,
        DME => (0xA0..=0xA3).contains(&ci),
        _ => false,
    }
}

/// Re-reads the A field `V T I I I I` as version, type and ID.
pub(crate) fn prios_address(manufacturer: u16, a: [u8; 6]) -> Address {
    let [version, device_type, i0, i1, i2, i3] = a;
    Address::from_wire(manufacturer, [i0, i1, i2, i3, version, device_type])
}

/// Whether a manufacturer-specific CI carries an Izar/PRIOS scrambled payload.
pub(crate) fn is_prios(manufacturer: u16, ci: u8) -> bool {
    matches!(manufacturer, DME | HYD | SAP) && (0xA0..=0xA3).contains(&ci)
}

/// Default PRIOS keys published by Diehl (8 bytes each, folded to 32 bits by XOR of halves).
const DEFAULT_KEYS: [[u8; 8]; 2] = [
    [0x39, 0xBC, 0x8A, 0x10, 0xE6, 0x6D, 0x83, 0xF8],
    [0x51, 0x72, 0x89, 0x10, 0xE6, 0x6D, 0x83, 0xF8],
];

/// First byte of a correctly descrambled PRIOS payload.
const PRIOS_CHECK: u8 = 0x4B;
/// Scrambled data starts after `L C M M A A A A A A CI H1 H2 H3 H4`.
const SCRAMBLED_FROM: usize = 15;

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_be_bytes(bytes.get(at..end)?.try_into().ok()?))
}

/// Descrambles a PRIOS payload (CRC-free telegram `frame`) with the published default keys.
/// Returns `None` when no key yields the check byte.
pub(crate) fn descramble(frame: &[u8]) -> Option<Vec<u8>> {
    let data = frame.get(SCRAMBLED_FROM..)?;
    let seed = be_u32(frame, 2)? ^ be_u32(frame, 6)? ^ be_u32(frame, 10)?;
    DEFAULT_KEYS.iter().find_map(|k| {
        let (hi, lo) = k.split_at(4);
        let key = u32::from_be_bytes(hi.try_into().ok()?) ^ u32::from_be_bytes(lo.try_into().ok()?);
        let mut state = key ^ seed;
        let out: Vec<u8> = data
            .iter()
            .map(|&b| {
                for _ in 0..8 {
                    // Taps at bits 1, 2, 11 and 31 (Fibonacci LFSR shifting left).
                    let bit = ((state >> 1) ^ (state >> 2) ^ (state >> 11) ^ (state >> 31)) & 1;
                    state = (state << 1) | bit;
                }
                b ^ u8::try_from(state & 0xFF).unwrap_or(0)
            })
            .collect();
        (out.first() == Some(&PRIOS_CHECK)).then_some(out)
    })
}

fn record(quantity: &str, value: Decimal, unit: Option<Unit>, storage: u32) -> Record {
    Record {
        quantity: quantity.to_owned(),
        value: RecordValue::Number(value),
        unit,
        storage,
        tariff: 0,
        subunit: 0,
        function: Function::Instantaneous,
    }
}

/// Records of an Izar PRIOS payload (`H1 H2 H3 H4` clear header then the descrambled bytes,
/// check byte first): current and last-period volume (litres, LE u32), remaining battery life
/// and transmission period from the clear header.
pub(crate) fn izar_records(payload: &[u8]) -> Option<Vec<Record>> {
    let u32_at = |at: usize| -> Option<u32> {
        let end = at.checked_add(4)?;
        Some(u32::from_le_bytes(payload.get(at..end)?.try_into().ok()?))
    };
    let total = u32_at(5)?;
    let last = u32_at(9)?;
    let h1 = *payload.first()?;
    let h2 = *payload.get(1)?;
    let mut out = vec![
        record(
            "volume",
            Decimal::new(i64::from(total), 3),
            Some(Unit::CubicMetre),
            0,
        ),
        record(
            "volume",
            Decimal::new(i64::from(last), 3),
            Some(Unit::CubicMetre),
            1,
        ),
    ];
    // Half-years of battery left in bits 4..0 of the second header byte.
    out.push(record(
        "battery_remaining_years",
        Decimal::new(i64::from(h2 & 0x1F).saturating_mul(5), 1),
        None,
        0,
    ));
    // Transmission period 2^(n+2) seconds, n = low nibble of the first header byte.
    let period = 1u64.checked_shl(u32::from(h1 & 0x0F).saturating_add(2))?;
    out.push(record(
        "transmit_period",
        Decimal::from(period),
        Some(Unit::Second),
        0,
    ));
    Some(out)
}
