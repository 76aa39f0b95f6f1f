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

/// XORs `data` with the PRIOS LFSR keystream for `key` and the header of `frame` (bytes 2..14).
/// Scrambling and descrambling are the same operation.
fn lfsr_xor(frame: &[u8], key: &[u8; 8], data: &mut [u8]) -> Option<()> {
    let seed = be_u32(frame, 2)? ^ be_u32(frame, 6)? ^ be_u32(frame, 10)?;
    let (hi, lo) = key.split_at(4);
    let key = u32::from_be_bytes(hi.try_into().ok()?) ^ u32::from_be_bytes(lo.try_into().ok()?);
    let mut state = key ^ seed;
    for b in data.iter_mut() {
        for _ in 0..8 {
            // Taps at bits 1, 2, 11 and 31 (Fibonacci LFSR shifting left).
            let bit = ((state >> 1) ^ (state >> 2) ^ (state >> 11) ^ (state >> 31)) & 1;
            state = (state << 1) | bit;
        }
        *b ^= u8::try_from(state & 0xFF).unwrap_or(0);
    }
    Some(())
}

/// Descrambles a PRIOS payload (CRC-free telegram `frame`) with the published default keys.
/// Returns `None` when no key yields the check byte.
pub(crate) fn descramble(frame: &[u8]) -> Option<Vec<u8>> {
    let data = frame.get(SCRAMBLED_FROM..)?;
    DEFAULT_KEYS.iter().find_map(|k| {
        let mut out = data.to_vec();
        lfsr_xor(frame, k, &mut out)?;
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
/// check byte first): current and (if present) last-period volume (litres, LE u32), remaining
/// battery life
/// and transmission period from the clear header.
pub(crate) fn izar_records(payload: &[u8]) -> Option<Vec<Record>> {
    let u32_at = |at: usize| -> Option<u32> {
        let end = at.checked_add(4)?;
        Some(u32::from_le_bytes(payload.get(at..end)?.try_into().ok()?))
    };
    let total = u32_at(5)?;
    let h1 = *payload.first()?;
    let h2 = *payload.get(1)?;
    let mut out = vec![record(
        "volume",
        Decimal::new(i64::from(total), 3),
        Some(Unit::CubicMetre),
        0,
    )];
    // Short PRIOS frames (CI A0) stop after the current volume.
    if let Some(last) = u32_at(9) {
        out.push(record(
            "volume",
            Decimal::new(i64::from(last), 3),
            Some(Unit::CubicMetre),
            1,
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn izar_payload_round_trips_through_the_scrambler() {
        // L C M(SAP) A(id 20896212, ver BC, type 01) CI A2, header 73 2A 03 13, then
        // check byte, total 1248.146 m³, last period 1200.000 m³ (litres, LE).
        let mut frame = vec![
            0x1C, 0x44, 0x30, 0x4C, 0x12, 0x62, 0x89, 0x20, 0xBC, 0x01, 0xA2, 0x73, 0x2A, 0x03,
            0x13,
        ];
        let mut plain = vec![PRIOS_CHECK];
        plain.extend_from_slice(&1_248_146u32.to_le_bytes());
        plain.extend_from_slice(&1_200_000u32.to_le_bytes());
        plain.extend_from_slice(&[0x7E, 0x29]);
        let mut scrambled = plain.clone();
        lfsr_xor(&frame, &DEFAULT_KEYS[0], &mut scrambled).unwrap();
        frame.extend_from_slice(&scrambled);
        assert_eq!(descramble(&frame).unwrap(), plain);

        let mut payload = frame[11..15].to_vec();
        payload.extend_from_slice(&plain);
        let records = izar_records(&payload).unwrap();
        let numbers: Vec<String> = records
            .iter()
            .map(|r| match &r.value {
                RecordValue::Number(d) => format!("{}:{d}", r.quantity),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            numbers,
            [
                "volume:1248.146",
                "volume:1200.000",
                "battery_remaining_years:5.0",
                "transmit_period:32"
            ]
        );
        // Scrambled for another header (so another seed): no default key gives the check byte.
        frame[13] ^= 0xFF;
        assert!(descramble(&frame).is_none());
    }
}
