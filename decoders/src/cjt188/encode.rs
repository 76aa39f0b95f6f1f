//! Encoding: frames and their payloads back to bytes (the simulators' replies, the gateway's requests).

use super::*;

/// Encodes `value` (scaled by `scale` decimals) as `n` BCD bytes, low byte first.
///
/// Negative values encode as 0; values too large for the field keep their low digits, the
/// way a meter register rolls over.
pub(super) fn push_bcd(out: &mut Vec<u8>, value: Decimal, scale: u32, n: usize) {
    let mut scaled = value.round_dp(scale);
    scaled.rescale(scale);
    let mut raw = u128::try_from(scaled.mantissa()).unwrap_or(0);
    for _ in 0..n {
        let two = (raw % 100) as u8;
        out.push(((two / 10) << 4) | (two % 10));
        raw /= 100;
    }
}

pub(super) fn push_clock(out: &mut Vec<u8>, clock: Option<PrimitiveDateTime>) {
    let Some(c) = clock else {
        out.extend_from_slice(&[0; 7]);
        return;
    };
    let year = u16::try_from(c.year()).unwrap_or(0);
    let fields = [
        c.second(),
        c.minute(),
        c.hour(),
        c.day(),
        u8::from(c.month()),
        (year % 100) as u8,
        (year / 100 % 100) as u8,
    ];
    for f in fields {
        out.push(((f / 10) << 4) | (f % 10));
    }
}

/// Volume unit codes, smallest first.
pub(super) const VOLUME_UNITS: [u8; 6] = [0x29, 0x2A, 0x2B, 0x2C, 0x2D, 0x2E];

/// Writes `m3` as XXXXXX.XX in `unit`, or, when it does not fit that unit exactly (a settlement
/// volume a meter sent in another unit than its current volume: fuzz find, `cjt188_roundtrip`),
/// in the first unit that holds it exactly, so no digit is silently dropped.
pub(super) fn push_volume(out: &mut Vec<u8>, m3: Decimal, unit: u8) {
    let limit = Decimal::new(1_000_000, 0);
    let fits = |u: u8| {
        let wire = m3.checked_div(volume_factor(u)?)?;
        (!wire.is_sign_negative() && wire.round_dp(2) == wire && wire < limit).then_some((wire, u))
    };
    let (wire, unit) = fits(unit)
        .or_else(|| VOLUME_UNITS.iter().find_map(|&u| fits(u)))
        .unwrap_or_else(|| {
            let factor = volume_factor(unit).unwrap_or(Decimal::ONE);
            (m3.checked_div(factor).unwrap_or(m3), unit)
        });
    push_bcd(out, wire, 2, 4);
    out.push(unit);
}

pub(super) fn push_water(out: &mut Vec<u8>, current: Decimal, settlement: Decimal, unit: u8) {
    push_volume(out, current, unit);
    push_volume(out, settlement, unit);
}

pub(super) fn push_heat_value(out: &mut Vec<u8>, v: &UnitValue, scale: u32, unit_first: bool) {
    if unit_first {
        out.push(v.unit);
        push_bcd(out, v.value, scale, 4);
    } else {
        push_bcd(out, v.value, scale, 4);
        out.push(v.unit);
    }
}

pub(super) fn push_payload(out: &mut Vec<u8>, payload: &Payload) {
    match payload {
        Payload::Empty => {}
        Payload::Reading(r) => {
            push_water(out, r.current_m3, r.settlement_m3, r.unit);
            push_clock(out, Some(r.clock));
            out.extend_from_slice(&r.status.to_le_bytes());
        }
        Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            unit,
            status,
        } => {
            push_water(out, *current_m3, *settlement_m3, *unit);
            push_clock(out, None);
            out.extend_from_slice(&status.to_le_bytes());
        }
        Payload::Heat(h) => {
            push_heat_value(out, &h.settlement_heat, 2, h.unit_first);
            push_heat_value(out, &h.current_heat, 2, h.unit_first);
            push_heat_value(out, &h.power, 2, h.unit_first);
            push_heat_value(out, &h.flow, 4, h.unit_first);
            push_heat_value(out, &h.volume, 2, h.unit_first);
            push_bcd(out, h.supply_c, 2, 3);
            push_bcd(out, h.return_c, 2, 3);
            push_bcd(out, Decimal::from(h.working_hours), 0, 3);
            push_clock(out, h.clock);
            out.extend_from_slice(&h.status.to_le_bytes());
        }
        Payload::History { volume_m3, unit } => push_volume(out, *volume_m3, *unit),
        Payload::Valve { open } => out.push(if *open { VALVE_OPEN } else { VALVE_CLOSE }),
        Payload::Status(st) => out.extend_from_slice(&st.to_le_bytes()),
        Payload::Raw(bytes) => out.extend_from_slice(bytes),
    }
}

/// Encodes a frame without preamble (`68 .. CS 16`).
///
/// Raw payloads longer than 252 bytes are cut so that L fits in one byte.
pub fn encode(frame: &Cjt188Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(frame, &mut out);
    out
}

/// Encodes a frame preceded by `preamble` FE wake-up bytes (serial links use 2 to 4).
pub fn encode_with_preamble(frame: &Cjt188Frame, preamble: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(preamble.saturating_add(64));
    out.resize(preamble, PREAMBLE);
    encode_into(frame, &mut out);
    out
}

/// Appends the encoded frame to `out` (lets callers reuse a buffer).
pub fn encode_into(frame: &Cjt188Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(START);
    out.push(frame.meter_type);
    out.extend_from_slice(&frame.address);
    out.push(frame.control);
    let len_pos = out.len();
    out.push(0);
    let di = match frame.di_order {
        DiOrder::HighFirst => frame.di.to_be_bytes(),
        DiOrder::LowFirst => frame.di.to_le_bytes(),
    };
    out.extend_from_slice(&di);
    out.push(frame.ser);
    push_payload(out, &frame.payload);
    let data_len = out.len().saturating_sub(len_pos.saturating_add(1));
    if data_len > 255 {
        out.truncate(len_pos.saturating_add(256));
    }
    let len = u8::try_from(data_len).unwrap_or(u8::MAX);
    if let Some(l) = out.get_mut(len_pos) {
        *l = len;
    }
    let cs = checksum(out.get(start..).unwrap_or(&[]));
    out.push(cs);
    out.push(END);
}
