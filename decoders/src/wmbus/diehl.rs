//! Diehl Metering quirks: which telegrams of the Diehl group (DME, EWT, HYD, SAP, SPL) put
//! version and type first in the A field (decided per telegram, never for a standard OMS
//! telegram), and the PRIOS LFSR scrambler used by Izar water meters (CI A0–A3) and by "real
//! data" telegrams (CI 7A, configuration bit 0x1000), whose default keys Diehl published.

use model::{Decimal, Unit};

use super::link::Address;
use crate::frame::{Function, Record, RecordValue};

/// Manufacturer codes of the Diehl group (DME, EWT, HYD, SAP, SPL) packed as in the M field.
const DME: u16 = 0x11A5;
const EWT: u16 = 0x16F4;
const HYD: u16 = 0x2324;
const SAP: u16 = 0x4C30;
const SPL: u16 = 0x4E0C;

/// TPL configuration word bit that marks Diehl "real data" (LFSR-scrambled, vendor security
/// mode 16–31) in a short-header telegram.
const REAL_DATA_BIT: u16 = 0x1000;

/// How a Diehl-group telegram is to be read, from its C field, manufacturer, CI and (CI 7A)
/// configuration word: the rule Diehl published and wmbusmeters applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interpretation {
    /// Not a Diehl-group SND_NR/SND_IR telegram: standard reading.
    NotDiehl,
    /// Standard OMS telegram from a Diehl-group meter: standard address.
    Oms,
    /// "Real data" (alarm CI 71, or CI 7A with configuration bit 0x1000): swapped address,
    /// payload LFSR-scrambled.
    RealData,
    /// PRIOS (CI A0–A7, not SAP): swapped address.
    Prios,
    /// SAP PRIOS (CI A0–A7): standard ID, version and type not sent (taken as 0 and water).
    SapPrios,
    /// SAP PRIOS standard (CI B0): layout not published; standard address.
    SapPriosStandard,
    /// Scrambled PRIOS (CI B1–B3): swapped address.
    PriosScrambled,
    /// Reserved manufacturer CIs (A8–AF, B0 other than SAP, B4–B7): standard address.
    Reserved,
}

impl Interpretation {
    /// Classifies a CRC-free telegram `frame` (`L C M M A A A A A A CI ...`).
    pub(crate) fn of(frame: &[u8]) -> Self {
        let (Some(&c), Some(&m0), Some(&m1), Some(&ci)) =
            (frame.get(1), frame.get(2), frame.get(3), frame.get(10))
        else {
            return Self::NotDiehl;
        };
        // Configuration word of a short header: CI ACC STS CFG(LE).
        let cfg = match (frame.get(13), frame.get(14)) {
            (Some(&lo), Some(&hi)) => Some(u16::from_le_bytes([lo, hi])),
            _ => None,
        };
        Self::classify(c, u16::from_le_bytes([m0, m1]), ci, cfg)
    }

    /// The rule itself, on the already-read fields.
    pub(crate) fn classify(c_field: u8, manufacturer: u16, ci: u8, cfg: Option<u16>) -> Self {
        if !matches!(manufacturer, DME | EWT | HYD | SAP | SPL) || !matches!(c_field, 0x44 | 0x46) {
            return Self::NotDiehl;
        }
        match ci {
            0x71 => Self::RealData,
            0x7A if cfg.is_some_and(|w| w & REAL_DATA_BIT != 0) => Self::RealData,
            0xA0..=0xA7 if manufacturer == SAP => Self::SapPrios,
            0xA0..=0xA7 => Self::Prios,
            0xB0 if manufacturer == SAP => Self::SapPriosStandard,
            0xB1..=0xB3 => Self::PriosScrambled,
            0xA8..=0xB7 => Self::Reserved,
            _ => Self::Oms,
        }
    }

    /// The DLL address as the meter's identity, from the A field `a` as sent.
    pub(crate) fn address(self, manufacturer: u16, a: [u8; 6]) -> Address {
        match self {
            // `V T I I I I`: version and type first, the ID after them.
            Self::RealData | Self::Prios | Self::PriosScrambled => {
                let [version, device_type, i0, i1, i2, i3] = a;
                Address::from_wire(manufacturer, [i0, i1, i2, i3, version, device_type])
            }
            // Izar uses the version byte as a fifth ID byte; the ID proper stays in place.
            Self::SapPrios => {
                let [i0, i1, i2, i3, _, _] = a;
                Address::from_wire(manufacturer, [i0, i1, i2, i3, 0x00, 0x07])
            }
            Self::NotDiehl | Self::Oms | Self::SapPriosStandard | Self::Reserved => {
                Address::from_wire(manufacturer, a)
            }
        }
    }
}

/// Whether a manufacturer-specific CI carries an Izar/PRIOS scrambled payload.
pub(crate) fn is_prios(manufacturer: u16, ci: u8) -> bool {
    matches!(manufacturer, DME | EWT | HYD | SAP | SPL) && (0xA0..=0xA3).contains(&ci)
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

/// Scrambled "real data" starts after `L C M M A A A A A A CI ACC STS CFG CFG`.
pub(crate) const REAL_DATA_FROM: usize = 15;

/// Descrambles a Diehl "real data" payload (CI 7A with configuration bit 0x1000) of the
/// CRC-free telegram `frame`, with the meter's key (its first 8 bytes, as Diehl keys are 8
/// bytes) or, without one, the published default keys. The check Diehl defined: the byte sum
/// of the plaintext, masked with 0xEF, equals the second configuration byte masked alike.
/// Returns `None` when no key passes the check.
pub(crate) fn descramble_real_data(frame: &[u8], key: Option<[u8; 16]>) -> Option<Vec<u8>> {
    let data = frame.get(REAL_DATA_FROM..)?;
    let check = frame.get(14)? & 0xEF;
    let configured = key.and_then(|k| <[u8; 8]>::try_from(k.get(..8)?).ok());
    let candidates: &[[u8; 8]] = match &configured {
        Some(k) => std::slice::from_ref(k),
        None => &DEFAULT_KEYS,
    };
    candidates.iter().find_map(|k| {
        let mut out = data.to_vec();
        lfsr_xor(frame, k, &mut out)?;
        (masked_sum(&out) == check).then_some(out)
    })
}

/// Whether the real-data payload of `frame` as received already passes the plaintext check
/// (a log replayed after descrambling).
pub(crate) fn real_data_in_clear(frame: &[u8]) -> bool {
    match (frame.get(REAL_DATA_FROM..), frame.get(14)) {
        (Some(data), Some(&cfg_hi)) => masked_sum(data) == cfg_hi & 0xEF,
        _ => false,
    }
}

fn masked_sum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)) & 0xEF
}

fn record(
    quantity: crate::frame::RecordQuantity,
    value: Decimal,
    unit: Option<Unit>,
    storage: u32,
) -> Record {
    Record {
        quantity,
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
        crate::frame::q!("volume"),
        Decimal::new(i64::from(total), 3),
        Some(Unit::CubicMetre),
        0,
    )];
    // Short PRIOS frames (CI A0) stop after the current volume.
    if let Some(last) = u32_at(9) {
        out.push(record(
            crate::frame::q!("volume"),
            Decimal::new(i64::from(last), 3),
            Some(Unit::CubicMetre),
            1,
        ));
    }
    // Half-years of battery left in bits 4..0 of the second header byte.
    out.push(record(
        crate::frame::q!("battery_remaining_years"),
        Decimal::new(i64::from(h2 & 0x1F).saturating_mul(5), 1),
        None,
        0,
    ));
    // Transmission period 2^(n+2) seconds, n = low nibble of the first header byte.
    let period = 1u64.checked_shl(u32::from(h1 & 0x0F).saturating_add(2))?;
    out.push(record(
        crate::frame::q!("transmit_period"),
        Decimal::from(period),
        Some(Unit::Second),
        0,
    ));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wmbus::{FormatCache, Protection, parse};

    /// A field as sent: ID 12345678 (LE) then version 1B, type 07.
    const A_STD: [u8; 6] = [0x78, 0x56, 0x34, 0x12, 0x1B, 0x07];
    /// The same meter with version and type first (Diehl "swapped" layout).
    const A_SWAPPED: [u8; 6] = [0x1B, 0x07, 0x78, 0x56, 0x34, 0x12];
    /// 04 13: volume 12.345 m³; 02 FD 17: error flags 0.
    const RECORDS: [u8; 11] = [
        0x04, 0x13, 0x39, 0x30, 0x00, 0x00, 0x02, 0xFD, 0x17, 0x00, 0x00,
    ];

    fn id_of(i: Interpretation, m: u16, a: [u8; 6]) -> (String, u8, u8) {
        let addr = i.address(m, a);
        (addr.id_string(), addr.version, addr.device_type)
    }

    /// A CRC-free short-header telegram `L C M A CI ACC STS CFG payload`.
    fn short_frame(c: u8, m: u16, a: [u8; 6], ci: u8, cfg: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, c];
        f.extend_from_slice(&m.to_le_bytes());
        f.extend_from_slice(&a);
        f.extend_from_slice(&[ci, 0x2A, 0x00]);
        f.extend_from_slice(&cfg.to_le_bytes());
        f.extend_from_slice(payload);
        f[0] = u8::try_from(f.len() - 1).unwrap();
        f
    }

    #[test]
    fn standard_oms_telegram_of_a_hydrometer_keeps_its_address() {
        // The reported bug: HYD, CI 7A, mode 0, no real-data bit. Read as 071b1234 before.
        let f = short_frame(0x44, HYD, A_STD, 0x7A, 0x0000, &RECORDS);
        assert_eq!(Interpretation::of(&f), Interpretation::Oms);
        let t = parse(&f, &None, &mut FormatCache::new()).unwrap();
        assert_eq!(t.meter.meter_id(), "mbus:HYD12345678");
        assert_eq!((t.meter.version, t.meter.device_type), (0x1B, 0x07));
        // Mode 5 with the real-data bit clear is OMS too (CFG 0x0510).
        let f = short_frame(0x44, HYD, A_STD, 0x7A, 0x0510, &[0; 16]);
        assert_eq!(Interpretation::of(&f), Interpretation::Oms);
    }

    #[test]
    fn real_data_telegram_swaps_and_descrambles() {
        // CFG 0x1D10: real-data bit 0x1000 set (vendor "mode 29").
        let cfg = 0x1D10;
        let f = short_frame(0x44, HYD, A_SWAPPED, 0x7A, cfg, &RECORDS);
        assert_eq!(Interpretation::of(&f), Interpretation::RealData);
        // The check byte (CFG high byte masked with 0xEF, which leaves out the real-data bit)
        // must equal the plaintext byte sum masked alike: not so here, so neither a
        // descrambled nor an in-clear reading is accepted.
        assert!(matches!(
            parse(&f, &None, &mut FormatCache::new()),
            Err(crate::wmbus::WmbusError::WrongKey { .. })
        ));

        let sum = RECORDS.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        let cfg = (u16::from((sum & 0xEF) | 0x10) << 8) | 0x10;
        // Replayed in clear (as wmbusmeters logs carry it): decodes without a key.
        let mut f = short_frame(0x44, HYD, A_SWAPPED, 0x7A, cfg, &RECORDS);
        let t = parse(&f, &None, &mut FormatCache::new()).unwrap();
        assert_eq!(t.meter.meter_id(), "mbus:HYD12345678");
        assert_eq!(t.protection, Protection::AlreadyDecrypted);
        assert_eq!(t.payload, RECORDS);

        // Scrambled with the first default key.
        f = short_frame(0x44, HYD, A_SWAPPED, 0x7A, cfg, &RECORDS);
        let mut scrambled = RECORDS.to_vec();
        lfsr_xor(&f, &DEFAULT_KEYS[0], &mut scrambled).unwrap();
        f.truncate(REAL_DATA_FROM);
        f.extend_from_slice(&scrambled);
        assert_eq!(descramble_real_data(&f, None).unwrap(), RECORDS);
        let t = parse(&f, &None, &mut FormatCache::new()).unwrap();
        assert_eq!(t.protection, Protection::Decrypted);
        assert_eq!(t.payload, RECORDS);
        assert_eq!(t.meter.id_string(), "12345678");
        // A configured key replaces the defaults: a wrong one is a typed error.
        let err = parse(&f, &Some([0x11; 16]), &mut FormatCache::new()).unwrap_err();
        assert!(
            matches!(err, crate::wmbus::WmbusError::WrongKey { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn every_branch_of_the_diehl_rule() {
        use Interpretation::*;
        let cases: [(u8, u16, u8, Option<u16>, Interpretation); 16] = [
            (0x44, HYD, 0x71, None, RealData),
            (0x46, DME, 0x7A, Some(0x1510), RealData),
            (0x44, EWT, 0x7A, Some(0x0510), Oms),
            (0x44, SPL, 0x72, Some(0x1000), Oms),
            (0x44, DME, 0xA1, None, Prios),
            (0x44, HYD, 0xA7, None, Prios),
            (0x44, SAP, 0xA2, None, SapPrios),
            (0x44, SAP, 0xB0, None, SapPriosStandard),
            (0x44, DME, 0xB0, None, Reserved),
            (0x44, HYD, 0xB1, None, PriosScrambled),
            (0x44, SAP, 0xB3, None, PriosScrambled),
            (0x44, HYD, 0xA8, None, Reserved),
            (0x44, HYD, 0xB7, None, Reserved),
            (0x44, HYD, 0x8C, None, Oms),
            // RSP_UD and other C fields, and other manufacturers, are never Diehl layouts.
            (0x08, HYD, 0x7A, Some(0x1D10), NotDiehl),
            (0x44, 0x2C2D, 0xA1, Some(0x1D10), NotDiehl),
        ];
        for (c, m, ci, cfg, want) in cases {
            assert_eq!(
                Interpretation::classify(c, m, ci, cfg),
                want,
                "C {c:02X} M {m:04X} CI {ci:02X}"
            );
        }
        let swapped = ("12345678".to_owned(), 0x1B, 0x07);
        for i in [RealData, Prios, PriosScrambled] {
            assert_eq!(id_of(i, HYD, A_SWAPPED), swapped, "{i:?}");
        }
        for i in [NotDiehl, Oms, SapPriosStandard, Reserved] {
            assert_eq!(id_of(i, HYD, A_STD), swapped, "{i:?}");
        }
        // SAP PRIOS: the ID stays in place, version/type are not sent (0 and water).
        assert_eq!(
            id_of(SapPrios, SAP, [0x72, 0x24, 0x24, 0x21, 0xD4, 0x01]),
            ("21242472".to_owned(), 0x00, 0x07)
        );
    }

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
