//! Wire frames of simulated devices, built with `decoders`' encoders from engine emissions.
//!
//! Each protocol has its own resolution: CJ/T 188 sends m³ with 2 decimals (10 L steps),
//! M-Bus and wM-Bus send litres (VIF 0x13), Modbus flow meters litres (scale 0.001 m³).
//! Registers are truncated to that resolution, as a meter display would.

use decoders::cjt188::{Cjt188Frame, Cjt188Reading};
use decoders::mbus::{DataRecord, RspUdHeader};
use decoders::wmbus::encode::WmbusMeter;
use model::MeterAddress;
use rust_decimal::Decimal;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::engine::{Emission, MeterSpec, unix};
use crate::profile::mix;

/// CJ/T 188 unit code for m³ (volumes with 2 decimals).
pub const CJT188_UNIT_M3: u8 = 0x2C;
/// ST bit D0: valve closed (D1D0 = 01).
pub const ST_VALVE_CLOSED: u16 = 0x0001;
/// ST bit D2: battery low.
pub const ST_BATTERY_LOW: u16 = 0x0004;
/// ST bit D5: magnetic interference. Vendor-specific in CJ/T 188 (the simulated meter model
/// uses it like several vendors' "strong magnetic" bit); gateways map it per meter model.
pub const ST_MAGNETIC: u16 = 0x0020;
/// ST bit D6: reverse flow seen (vendor-specific, as [`ST_MAGNETIC`]).
pub const ST_REVERSE: u16 = 0x0040;
/// EN 13757-3 VIF 0x13: volume in litres.
pub const VIF_VOLUME_LITRES: u8 = 0x13;
/// EN 13757-3 status byte bit 2: power low.
pub const MBUS_STATUS_POWER_LOW: u8 = 0x04;

/// Returns a register in millilitres as m³ with 2 decimals, truncated (CJ/T 188 display).
pub fn m3_2dp(ml: u64) -> Decimal {
    Decimal::new(i64::try_from(ml / 10_000).unwrap_or(i64::MAX), 2)
}

/// Returns the CJ/T 188 status word of an emission.
pub fn cjt188_status(e: &Emission) -> u16 {
    let mut st = 0;
    if e.status.valve_closed {
        st |= ST_VALVE_CLOSED;
    }
    if e.status.battery_low {
        st |= ST_BATTERY_LOW;
    }
    if e.status.tamper {
        st |= ST_MAGNETIC;
    }
    if e.status.reverse_flow {
        st |= ST_REVERSE;
    }
    st
}

/// Returns the meter's local wall-clock time for an emission (meters keep local time).
pub fn meter_local_time(e: &Emission, utc_offset_hours: i8) -> PrimitiveDateTime {
    let offset = UtcOffset::from_hms(utc_offset_hours, 0, 0).unwrap_or(UtcOffset::UTC);
    let t: OffsetDateTime = unix(e.meter_ts).to_offset(offset);
    PrimitiveDateTime::new(t.date(), t.time())
}

/// Builds the CJ/T 188 read-data reply (C=81, DI 901F) an NB-IoT meter sends as its uplink.
/// Returns `None` for a meter that is not CJ/T 188 addressed.
pub fn cjt188_reply(
    spec: &MeterSpec,
    e: &Emission,
    ser: u8,
    utc_offset_hours: i8,
) -> Option<Vec<u8>> {
    let MeterAddress::Cjt188 {
        meter_type,
        address,
    } = &spec.address
    else {
        return None;
    };
    let reading = Cjt188Reading {
        current_m3: m3_2dp(e.register_ml),
        settlement_m3: m3_2dp(e.settlement_ml),
        unit: CJT188_UNIT_M3,
        clock: meter_local_time(e, utc_offset_hours),
        status: cjt188_status(e),
    };
    Some(decoders::cjt188::encode(&Cjt188Frame::read_data_reply(
        *meter_type,
        *address,
        ser,
        &reading,
    )))
}

/// Encodes an 8-digit number as the BCD-coded u32 M-Bus uses on the wire (12345678 → 0x12345678).
pub fn bcd_u32(n: u32) -> u32 {
    let mut out = 0u32;
    let mut rest = n % 100_000_000;
    for i in 0..8 {
        out |= (rest % 10) << (4 * i);
        rest /= 10;
    }
    out
}

/// Returns the M-Bus long header of a simulated M-Bus meter, or `None` for other addresses.
pub fn mbus_header(spec: &MeterSpec, access_number: u8, e: &Emission) -> Option<RspUdHeader> {
    let MeterAddress::Mbus {
        id,
        manufacturer,
        version,
        medium,
    } = &spec.address
    else {
        return None;
    };
    Some(RspUdHeader {
        id: bcd_u32(*id),
        manufacturer: decoders::mbus::manufacturer_id(manufacturer)?,
        version: *version,
        medium: *medium,
        access_number,
        status: if e.status.battery_low {
            MBUS_STATUS_POWER_LOW
        } else {
            0
        },
        signature: 0,
    })
}

/// Returns the data records of an M-Bus / wM-Bus water meter: volume (litres), reverse
/// volume (litres, VIFE 0x3C "backward flow"), and the meter's date-time.
pub fn mbus_records(e: &Emission, utc_offset_hours: i8) -> Vec<DataRecord> {
    let litres = |ml: u64| i32::try_from(ml / 1000).unwrap_or(i32::MAX);
    let mut reverse = DataRecord::int32(VIF_VOLUME_LITRES, litres(e.reverse_ml));
    reverse.vife = vec![0x3C];
    vec![
        DataRecord::int32(VIF_VOLUME_LITRES, litres(e.register_ml)),
        reverse,
        DataRecord::date_time(meter_local_time(e, utc_offset_hours)),
    ]
}

/// Builds the RSP_UD long frame an M-Bus slave answers REQ_UD2 with.
pub fn mbus_rsp_ud(
    spec: &MeterSpec,
    primary: u8,
    access_number: u8,
    e: &Emission,
    utc_offset_hours: i8,
) -> Option<Vec<u8>> {
    let header = mbus_header(spec, access_number, e)?;
    Some(decoders::mbus::encode::rsp_ud(
        primary,
        &header,
        &mbus_records(e, utc_offset_hours),
    ))
}

/// Returns the wM-Bus identity of a simulated M-Bus-addressed meter.
pub fn wmbus_meter(spec: &MeterSpec) -> Option<WmbusMeter> {
    let MeterAddress::Mbus {
        id,
        manufacturer,
        version,
        medium,
    } = &spec.address
    else {
        return None;
    };
    Some(WmbusMeter {
        manufacturer: decoders::wmbus::manufacturer_from_code(manufacturer)?,
        id: bcd_u32(*id),
        version: *version,
        device_type: *medium,
    })
}

/// Returns the AES-128 key of simulated wireless meter `index` (deterministic from the seed,
/// so a gateway config can be generated for the same fleet).
pub fn wmbus_key(seed: u64, index: u32) -> [u8; 16] {
    let a = mix(seed ^ mix(u64::from(index) ^ 0x0077_6d62_7573));
    let b = mix(a);
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..].copy_from_slice(&b.to_le_bytes());
    key
}

/// Builds a wM-Bus telegram (mode 5 when `key` is given), starting with the L field, no CRCs.
pub fn wmbus_telegram(
    spec: &MeterSpec,
    access_no: u8,
    key: Option<[u8; 16]>,
    e: &Emission,
    utc_offset_hours: i8,
) -> Option<Vec<u8>> {
    let meter = wmbus_meter(spec)?;
    let mut payload = Vec::with_capacity(32);
    for r in mbus_records(e, utc_offset_hours) {
        r.encode_into(&mut payload);
    }
    Some(decoders::wmbus::encode::telegram(
        &meter, &payload, access_no, key,
    ))
}

/// Corrupts a frame that ends `.. CS 16` (CJ/T 188, M-Bus long frame): flips the last data
/// byte so the checksum no longer matches, as line noise would.
pub fn corrupt_checksummed(frame: &mut [u8]) {
    let n = frame.len();
    if n >= 3
        && let Some(b) = frame.get_mut(n - 3)
    {
        *b ^= 0x5A;
    }
}

/// Corrupts a wM-Bus telegram: flips the first encrypted byte (the `2F2F` check then fails)
/// or, for a telegram in clear, drops its last two bytes (the L field no longer matches).
pub fn corrupt_wmbus(frame: &mut Vec<u8>, encrypted: bool) {
    // L C M(2) A(6) CI ACC ST CW(2): payload starts at byte 15.
    if encrypted && let Some(b) = frame.get_mut(15) {
        *b ^= 0xFF;
        return;
    }
    let n = frame.len().saturating_sub(2);
    frame.truncate(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_encoding() {
        assert_eq!(bcd_u32(12_345_678), 0x1234_5678);
        assert_eq!(bcd_u32(10_000_042), 0x1000_0042);
    }

    #[test]
    fn register_truncates_to_ten_litres() {
        assert_eq!(m3_2dp(123_456_789).to_string(), "123.45");
    }

    #[test]
    fn keys_differ_per_meter_and_are_stable() {
        assert_eq!(wmbus_key(1, 2), wmbus_key(1, 2));
        assert_ne!(wmbus_key(1, 2), wmbus_key(1, 3));
    }
}
