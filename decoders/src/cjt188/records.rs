//! Mapping a parsed frame to `DecodedFrame` records (vendor status-bit layouts included).

use super::*;

/// Medium name of a meter type code.
pub fn medium_name(meter_type: u8) -> &'static str {
    match meter_type {
        0x10 => "cold_water",
        0x11 => "hot_water",
        0x12 => "drinking_water",
        0x13 => "reclaimed_water",
        0x14..=0x19 => "water",
        0x20 => "heat",
        0x21 => "cooling",
        0x22 => "heat_cooling",
        0x23..=0x29 => "heat",
        0x30..=0x39 => "gas",
        0x40..=0x49 => "custom",
        0xAA => "wildcard",
        _ => "unknown",
    }
}

pub(super) fn record(
    quantity: impl Into<RecordQuantity>,
    value: RecordValue,
    unit: Option<Unit>,
) -> Record {
    Record {
        quantity: quantity.into(),
        value,
        unit,
        storage: 0,
        tariff: 0,
        subunit: 0,
        function: Function::Instantaneous,
    }
}

pub(super) fn number(quantity: RecordQuantity, value: Decimal, unit: Option<Unit>) -> Record {
    record(quantity, RecordValue::Number(value), unit)
}

pub(super) fn clock_string(clock: PrimitiveDateTime) -> SmallString {
    crate::mbus::iso_date(
        clock.year(),
        u8::from(clock.month()),
        clock.day(),
        Some((clock.hour(), clock.minute(), Some(clock.second()))),
    )
}

/// Where a vendor puts the valve and battery bits in ST byte 0 (PROTOCOLS.md §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StatusBits {
    /// D1D0 valve (00 open, 01 closed, 11 abnormal), D2 battery low: the standard.
    #[default]
    Standard,
    /// Bit-mirrored reading of some vendors (sdqr): D7D6 valve (00 open, 01 closed, 11
    /// abnormal), D5 battery low.
    Mirrored,
}

impl StatusBits {
    /// Valve state: 0 open, 1 closed, 3 abnormal.
    pub fn valve_state(self, st: u16) -> u8 {
        let (closed, abnormal) = match self {
            Self::Standard => (st & ST_VALVE_CLOSED != 0, st & ST_VALVE_ABNORMAL != 0),
            Self::Mirrored => (st & 0x0040 != 0, st & 0x0080 != 0),
        };
        if abnormal { 3 } else { u8::from(closed) }
    }

    /// True when the battery-low bit is set.
    pub fn battery_low(self, st: u16) -> bool {
        match self {
            Self::Standard => st & ST_BATTERY_LOW != 0,
            Self::Mirrored => st & 0x0020 != 0,
        }
    }
}

pub(super) fn status_records(records: &mut Vec<Record>, st: u16, bits: StatusBits) {
    records.push(number(
        q!("valve_state"),
        Decimal::from(bits.valve_state(st)),
        None,
    ));
    records.push(number(
        q!("battery_low"),
        Decimal::from(u8::from(bits.battery_low(st))),
        None,
    ));
    records.push(number(q!("status_word"), Decimal::from(st), None));
}

pub(super) fn unit_record(quantity: RecordQuantity, v: &UnitValue) -> Option<Record> {
    let (unit, factor) = unit_of(v.unit)?;
    let value = v.value.checked_mul(factor)?.normalize();
    Some(number(quantity, value, Some(unit)))
}

/// Returns the records of a parsed frame (empty for requests), standard status bits.
pub fn records(frame: &Cjt188Frame) -> Vec<Record> {
    records_with(frame, StatusBits::Standard)
}

/// Returns the records of a parsed frame, reading ST with the vendor's bit layout.
pub fn records_with(frame: &Cjt188Frame, bits: StatusBits) -> Vec<Record> {
    let mut out = Vec::new();
    let volume = |q: RecordQuantity, v: Decimal| number(q, v.normalize(), Some(Unit::CubicMetre));
    match &frame.payload {
        Payload::Reading(r) => {
            out.push(volume(q!("volume"), r.current_m3));
            out.push(volume(q!("volume_settlement"), r.settlement_m3));
            out.push(record(
                q!("date_time"),
                RecordValue::Date(clock_string(r.clock)),
                None,
            ));
            status_records(&mut out, r.status, bits);
        }
        Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            status,
            ..
        } => {
            out.push(volume(q!("volume"), *current_m3));
            out.push(volume(q!("volume_settlement"), *settlement_m3));
            status_records(&mut out, *status, bits);
        }
        Payload::Heat(h) => {
            let pairs = [
                (q!("energy_settlement"), &h.settlement_heat),
                (q!("energy"), &h.current_heat),
                (q!("power"), &h.power),
                (q!("volume_flow"), &h.flow),
                (q!("volume"), &h.volume),
            ];
            out.extend(pairs.into_iter().filter_map(|(q, v)| unit_record(q, v)));
            out.push(number(
                q!("flow_temperature"),
                h.supply_c.normalize(),
                Some(Unit::DegreeCelsius),
            ));
            out.push(number(
                q!("return_temperature"),
                h.return_c.normalize(),
                Some(Unit::DegreeCelsius),
            ));
            out.push(number(
                q!("operating_time"),
                Decimal::from(h.working_hours),
                Some(Unit::Hour),
            ));
            if let Some(clock) = h.clock {
                out.push(record(
                    q!("date_time"),
                    RecordValue::Date(clock_string(clock)),
                    None,
                ));
            }
            status_records(&mut out, h.status, bits);
        }
        Payload::History { volume_m3, .. } => {
            let mut r = volume(q!("volume_settlement"), *volume_m3);
            r.storage = u32::from(frame.di.saturating_sub(DI_HISTORY_FIRST)).saturating_add(1);
            out.push(r);
        }
        Payload::Valve { open } => {
            out.push(number(
                q!("valve_command"),
                Decimal::from(u8::from(!*open)),
                None,
            ));
        }
        Payload::Status(st) => status_records(&mut out, *st, bits),
        Payload::Raw(bytes) => {
            out.push(record(
                format!("di_{:04x}", frame.di),
                RecordValue::Raw(crate::mbus::hex_lower(bytes)),
                None,
            ));
        }
        Payload::Empty => {}
    }
    out
}

/// Parses a frame and maps it to records (the address must be BCD digits or the all-AA wildcard).
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn decode(bytes: &[u8]) -> Result<DecodedFrame, Cjt188Error> {
    decode_with(bytes, StatusBits::Standard)
}

/// Like [`decode`], reading the status word with the vendor's bit layout.
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn decode_with(bytes: &[u8], bits: StatusBits) -> Result<DecodedFrame, Cjt188Error> {
    let frame = parse(bytes)?;
    let preamble = bytes.iter().take_while(|b| **b == PREAMBLE).count();
    let address_offset = preamble.saturating_add(2);
    if frame.address != [0xAA; 7] {
        bcd_le(&frame.address, address_offset, "address")?;
    }
    Ok(to_decoded_with(&frame, bits))
}

/// Maps a parsed frame to the protocol-neutral form (standard status bits).
pub fn to_decoded(frame: &Cjt188Frame) -> DecodedFrame {
    to_decoded_with(frame, StatusBits::Standard)
}

/// Maps a parsed frame to the protocol-neutral form with the vendor's status bit layout.
pub fn to_decoded_with(frame: &Cjt188Frame, bits: StatusBits) -> DecodedFrame {
    DecodedFrame {
        protocol: Protocol::Cjt188,
        meter: MeterInfo {
            id: address_text(&frame.address),
            manufacturer: None,
            version: None,
            medium: Some(SmallString::from_static(medium_name(frame.meter_type))),
        },
        records: records_with(frame, bits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn concatenated_frames_parse_all_or_nothing() {
        let addr = [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78];
        let reply = |hour: u8, cents: i64| {
            let r = Cjt188Reading {
                current_m3: Decimal::new(cents, 2),
                settlement_m3: Decimal::new(0, 2),
                unit: UNIT_M3,
                clock: PrimitiveDateTime::new(
                    Date::from_calendar_date(2026, Month::November, 24).unwrap(),
                    Time::from_hms(hour, 0, 0).unwrap(),
                ),
                status: 0,
            };
            encode(&Cjt188Frame::read_data_reply(0x10, addr, hour, &r))
        };
        let mut payload = reply(0, 100);
        let first_len = payload.len();
        payload.extend(encode_with_preamble(
            &Cjt188Frame::read_data_request(0x10, addr),
            2,
        ));
        payload.extend(reply(1, 105));
        let frames = parse_concatenated(&payload).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].1, 0..first_len);
        assert_eq!(frames[2].1.end, payload.len());
        assert_eq!(frames[2].0.ser, 1);
        // One frame alone is a payload too.
        assert_eq!(parse_concatenated(&reply(5, 1)).unwrap().len(), 1);
        // A bad checksum in the last frame refuses the whole payload and names the frame.
        let mut bad = payload.clone();
        let cs = bad.len() - 2;
        bad[cs] ^= 0xFF;
        let e = parse_concatenated(&bad).unwrap_err();
        assert_eq!((e.index, e.code()), (2, "bad_checksum"));
        assert_eq!(e.start, frames[2].1.start);
        // A partial frame at the end is refused, and so is an empty payload.
        let e = parse_concatenated(&payload[..payload.len() - 3]).unwrap_err();
        assert_eq!((e.index, e.code()), (2, "truncated"));
        assert_eq!(parse_concatenated(&[]).unwrap_err().index, 0);
    }

    fn near_valid_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            8 => (0u8..10, 0u8..10).prop_map(|(h, l)| (h << 4) | l),
            1 => Just(UNIT_M3),
            1 => any::<u8>(),
        ]
    }

    fn to_bcd(v: u8) -> u8 {
        ((v / 10) << 4) | (v % 10)
    }

    proptest! {
        /// The fast path accepts only what the detailed parser accepts, with the same result.
        #[test]
        fn fast_path_agrees_with_detailed_parser(
            volumes in proptest::collection::vec(near_valid_byte(), 8),
            clock in (0u8..61, 0u8..61, 0u8..25, 0u8..32, 0u8..14, 0u8..100, 19u8..22),
            status in any::<u16>(),
            corrupt in proptest::option::of((0usize..19, any::<u8>())),
            units in prop_oneof![3 => Just(UNIT_M3), 1 => any::<u8>()],
        ) {
            let (ss, mi, hh, dd, mo, yy, cc) = clock;
            let mut data = volumes[..4].to_vec();
            data.push(units);
            data.extend_from_slice(&volumes[4..]);
            data.push(UNIT_M3);
            data.extend([ss, mi, hh, dd, mo, yy, cc].map(to_bcd));
            data.extend_from_slice(&status.to_le_bytes());
            if let Some((i, b)) = corrupt {
                data[i] = b;
            }
            let detailed = parse_water_detailed(&mut Cursor::new(&data, 0));
            match fast_water(&data) {
                Some(fast) => prop_assert_eq!(detailed, Ok(fast)),
                // When the fast path declines, only non-m3 units may still parse.
                None => prop_assert!(detailed.is_err() || data[4] != UNIT_M3 || data[9] != UNIT_M3),
            }
        }
    }
}
