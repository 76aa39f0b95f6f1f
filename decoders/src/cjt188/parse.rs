//! Parsing: framing, checksum, address, and the payload of each DI (readings, heat, history, valve, status), with the register-only fast path for the common 901F reply.

use super::*;

pub(super) type Cursor<'a> = crate::cursor::Cursor<'a, Cjt188Error>;

impl From<crate::cursor::Truncated> for Cjt188Error {
    fn from(t: crate::cursor::Truncated) -> Self {
        Self::Truncated {
            offset: t.offset,
            field: t.field,
            needed: t.needed,
        }
    }
}

pub(super) fn is_known_di(di: u16) -> bool {
    matches!(
        di,
        0x901F
            | 0x903F..=0x907F
            | 0xD120..=0xD12B
            | 0xD200..=0xD4FF
            | 0x8102..=0x8106
            | 0x810A
            | 0xA010..=0xA019
            | 0xA101..=0xA107
    )
}

/// Resolves the wire DI bytes into the logical DI and the order it was sent in.
pub(super) fn resolve_di(di0: u8, di1: u8) -> (u16, DiOrder) {
    let high_first = u16::from_be_bytes([di0, di1]);
    let low_first = u16::from_le_bytes([di0, di1]);
    if !is_known_di(high_first) && is_known_di(low_first) {
        (low_first, DiOrder::LowFirst)
    } else {
        (high_first, DiOrder::HighFirst)
    }
}

/// Parses one frame (with optional FE preamble); bytes after the end byte are an error.
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn parse(bytes: &[u8]) -> Result<Cjt188Frame, Cjt188Error> {
    let (frame, used) = parse_prefix(bytes)?;
    if used < bytes.len() {
        return Err(Cjt188Error::TrailingBytes {
            offset: used,
            count: bytes.len().saturating_sub(used),
        });
    }
    Ok(frame)
}

/// Why a payload of concatenated frames was refused: the first frame that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "frame {index} of the payload (from byte {start}; offsets below count from there): {source}"
)]
pub struct ConcatenatedError {
    /// Position of the bad frame in the payload (0 = first).
    pub index: usize,
    /// Payload offset where the bad frame (its preamble, if any) starts.
    pub start: usize,
    /// What was wrong with it; its offsets count from `start`.
    #[source]
    pub source: Cjt188Error,
}

impl ConcatenatedError {
    /// The stable code of the underlying frame error (metrics label).
    pub fn code(&self) -> &'static str {
        self.source.code()
    }
}

/// Parses a payload made of one or more whole frames back to back, each with its own optional
/// FE preamble, as NB-IoT meters send their history (one 901F reply per reading). Returns
/// every frame with the byte range it occupies in `bytes` (preamble included).
///
/// All or nothing: an empty payload, a bad frame anywhere or bytes that do not form a whole
/// frame at the end refuse the whole payload.
///
/// # Errors
/// [`ConcatenatedError`] naming the first frame that did not parse.
pub fn parse_concatenated(
    bytes: &[u8],
) -> Result<Vec<(Cjt188Frame, std::ops::Range<usize>)>, ConcatenatedError> {
    let mut frames = Vec::new();
    let mut start = 0usize;
    loop {
        let rest = bytes.get(start..).unwrap_or(&[]);
        let (frame, used) = parse_prefix(rest).map_err(|source| ConcatenatedError {
            index: frames.len(),
            start,
            source,
        })?;
        let end = start.saturating_add(used);
        frames.push((frame, start..end));
        start = end;
        if start >= bytes.len() {
            return Ok(frames);
        }
    }
}

/// Parses one frame at the start of `bytes` and returns it with the number of bytes used.
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn parse_prefix(bytes: &[u8]) -> Result<(Cjt188Frame, usize), Cjt188Error> {
    let preamble = bytes.iter().take_while(|b| **b == PREAMBLE).count();
    let mut cur = Cursor::new(bytes, 0);
    cur.take(preamble, "preamble")?;
    let frame_start = cur.rest;
    let start_offset = cur.offset;
    let start = cur.byte("start byte")?;
    if start != START {
        return Err(Cjt188Error::BadStart {
            offset: start_offset,
            found: start,
        });
    }
    let meter_type = cur.byte("meter type")?;
    let address = cur.array::<7>("address")?;
    let control = cur.byte("control code")?;
    let len_offset = cur.offset;
    let length = cur.byte("length")?;
    if length < 3 {
        return Err(Cjt188Error::BadLength {
            offset: len_offset,
            length,
        });
    }
    let body_offset = cur.offset;
    let body = cur.take(usize::from(length), "data")?;
    let cs_offset = cur.offset;
    let cs = cur.byte("checksum")?;
    let end_offset = cur.offset;
    let end = cur.byte("end byte")?;
    // The checksum covers 68 through the last data byte: 11 header bytes + L.
    let summed = frame_start
        .get(..usize::from(length).saturating_add(11))
        .unwrap_or(&[]);
    let expected = checksum(summed);
    if cs != expected {
        return Err(Cjt188Error::BadChecksum {
            offset: cs_offset,
            expected,
            found: cs,
        });
    }
    if end != END {
        return Err(Cjt188Error::BadEnd {
            offset: end_offset,
            found: end,
        });
    }
    let used = cur.offset;

    let mut body_cur = Cursor::new(body, body_offset);
    let [di0, di1] = body_cur.array::<2>("DI")?;
    let (di, di_order) = resolve_di(di0, di1);
    let ser = body_cur.byte("SER")?;
    let payload = parse_payload(meter_type, control, di, body_cur)?;
    let frame = Cjt188Frame {
        meter_type,
        address,
        control,
        di,
        di_order,
        ser,
        payload,
    };
    Ok((frame, used))
}

pub(super) fn parse_payload(
    meter_type: u8,
    control: u8,
    di: u16,
    mut cur: Cursor<'_>,
) -> Result<Payload, Cjt188Error> {
    let data_offset = cur.offset;
    let data = cur.rest;
    if data.is_empty() {
        return Ok(Payload::Empty);
    }
    let reply = control & C_REPLY != 0;
    let abnormal = control & C_ABNORMAL != 0;
    let function = control & 0x3F;
    let expect_len = |expected: usize| {
        if data.len() == expected {
            Ok(())
        } else {
            Err(Cjt188Error::BadDataLength {
                offset: data_offset,
                di,
                expected,
                found: data.len(),
            })
        }
    };
    if abnormal {
        if let [lo, hi] = data {
            return Ok(Payload::Status(u16::from_le_bytes([*lo, *hi])));
        }
        return Ok(Payload::Raw(data.to_vec()));
    }
    match (reply, function, di) {
        (true, C_READ_DATA, DI_CURRENT) if is_heat(meter_type) => {
            expect_len(43)?;
            parse_heat(&mut cur).map(|h| Payload::Heat(Box::new(h)))
        }
        (true, C_READ_DATA, DI_CURRENT) => {
            expect_len(19)?;
            parse_water(&mut cur)
        }
        (true, C_READ_DATA, DI_HISTORY_FIRST..=DI_HISTORY_LAST) => {
            expect_len(5)?;
            let (volume_m3, unit) = volume_m3(&mut cur, "settlement history volume")?;
            Ok(Payload::History { volume_m3, unit })
        }
        (false, C_WRITE_DATA | C_VENDOR_VALVE, DI_VALVE) => {
            expect_len(1)?;
            match cur.byte("valve command")? {
                VALVE_OPEN => Ok(Payload::Valve { open: true }),
                VALVE_CLOSE => Ok(Payload::Valve { open: false }),
                other => Err(Cjt188Error::BadValveCommand {
                    offset: data_offset,
                    byte: other,
                }),
            }
        }
        (true, C_WRITE_DATA | C_VENDOR_VALVE, DI_VALVE) => {
            expect_len(2)?;
            let st = cur.array::<2>("status")?;
            Ok(Payload::Status(u16::from_le_bytes(st)))
        }
        _ => Ok(Payload::Raw(data.to_vec())),
    }
}

pub(super) fn is_heat(meter_type: u8) -> bool {
    (0x20..=0x2F).contains(&meter_type)
}

/// Decodes `digits`-digit BCD, low byte first, into an integer.
pub(super) fn bcd_le(bytes: &[u8], offset: usize, field: &'static str) -> Result<u64, Cjt188Error> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate().rev() {
        let (hi, lo) = (b >> 4, b & 0x0F);
        if hi > 9 || lo > 9 {
            return Err(Cjt188Error::BadBcd {
                offset: offset.saturating_add(i),
                field,
                byte: *b,
            });
        }
        // At most 7 bytes (14 digits) are ever read, far below u64::MAX.
        value = value
            .wrapping_mul(100)
            .wrapping_add(u64::from(hi.wrapping_mul(10).wrapping_add(lo)));
    }
    Ok(value)
}

pub(super) fn bcd_field(
    cur: &mut Cursor<'_>,
    n: usize,
    scale: u32,
    field: &'static str,
) -> Result<Decimal, Cjt188Error> {
    let offset = cur.offset;
    let bytes = cur.take(n, field)?;
    let raw = bcd_le(bytes, offset, field)?;
    let raw = i64::try_from(raw).unwrap_or(i64::MAX);
    Ok(Decimal::new(raw, scale))
}

/// Volume unit codes and their factor to m³ as (mantissa, scale).
pub(super) fn volume_factor(unit: u8) -> Option<Decimal> {
    Some(match unit {
        0x29 => Decimal::new(1, 3),
        0x2A => Decimal::new(1, 2),
        0x2B => Decimal::new(1, 1),
        0x2C => Decimal::ONE,
        0x2D => Decimal::TEN,
        0x2E => Decimal::ONE_HUNDRED,
        _ => return None,
    })
}

/// Reads a 4-byte BCD XXXXXX.XX volume followed by its unit and returns it in m³.
pub(super) fn volume_m3(
    cur: &mut Cursor<'_>,
    field: &'static str,
) -> Result<(Decimal, u8), Cjt188Error> {
    let value = bcd_field(cur, 4, 2, field)?;
    let unit_offset = cur.offset;
    let unit = cur.byte("unit")?;
    if unit == UNIT_M3 {
        return Ok((value, unit));
    }
    let factor = volume_factor(unit).ok_or(Cjt188Error::BadUnit {
        offset: unit_offset,
        code: unit,
        expected: "volume",
    })?;
    let m3 = value.checked_mul(factor).ok_or(Cjt188Error::BadUnit {
        offset: unit_offset,
        code: unit,
        expected: "volume",
    })?;
    Ok((m3, unit))
}

/// Reads the 7-byte clock `ss mm hh DD MM YYlo YYhi`; all zeros = not set.
pub(super) fn clock(cur: &mut Cursor<'_>) -> Result<Option<PrimitiveDateTime>, Cjt188Error> {
    let offset = cur.offset;
    let bytes = cur.array::<7>("real-time clock")?;
    if bytes == [0; 7] {
        return Ok(None);
    }
    let mut digits = [0u8; 7];
    for ((d, b), i) in digits.iter_mut().zip(bytes).zip(0usize..) {
        let (hi, lo) = (b >> 4, b & 0x0F);
        if hi > 9 || lo > 9 {
            let offset = offset.saturating_add(i);
            return Err(Cjt188Error::BadBcd {
                offset,
                field: "real-time clock",
                byte: b,
            });
        }
        *d = hi.wrapping_mul(10).wrapping_add(lo);
    }
    let [ss, mi, hh, dd, mo, ylo, yhi] = digits;
    let year = i32::from(yhi)
        .wrapping_mul(100)
        .wrapping_add(i32::from(ylo));
    let bad = Cjt188Error::BadClock { offset };
    let month = Month::try_from(mo).map_err(|_| bad.clone())?;
    let date = Date::from_calendar_date(year, month, dd).map_err(|_| bad.clone())?;
    let time = Time::from_hms(hh, mi, ss).map_err(|_| bad)?;
    Ok(Some(PrimitiveDateTime::new(date, time)))
}

pub(super) fn status(cur: &mut Cursor<'_>) -> Result<u16, Cjt188Error> {
    Ok(u16::from_le_bytes(cur.array::<2>("status")?))
}

/// Two BCD digits, `None` if a nibble is above 9.
pub(super) fn bcd2(b: u8) -> Option<u8> {
    let (hi, lo) = (b >> 4, b & 0x0F);
    (hi <= 9 && lo <= 9).then(|| hi.wrapping_mul(10).wrapping_add(lo))
}

/// The common case in registers: m³ units, valid BCD and clock. `None` sends the frame to
/// [`parse_water`], which finds and reports the exact problem.
pub(super) fn fast_water(data: &[u8]) -> Option<Payload> {
    let [
        c0,
        c1,
        c2,
        c3,
        cu,
        s0,
        s1,
        s2,
        s3,
        su,
        t0,
        t1,
        t2,
        t3,
        t4,
        t5,
        t6,
        st0,
        st1,
    ] = <[u8; 19]>::try_from(data).ok()?;
    if cu != UNIT_M3 || su != UNIT_M3 {
        return None;
    }
    let volume = |b: [u8; 4]| -> Option<Decimal> {
        let mut v: i64 = 0;
        for x in b.iter().rev() {
            v = v.wrapping_mul(100).wrapping_add(i64::from(bcd2(*x)?));
        }
        Some(Decimal::new(v, 2))
    };
    let current_m3 = volume([c0, c1, c2, c3])?;
    let settlement_m3 = volume([s0, s1, s2, s3])?;
    let status = u16::from_le_bytes([st0, st1]);
    if [t0, t1, t2, t3, t4, t5, t6] == [0; 7] {
        return Some(Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            unit: UNIT_M3,
            status,
        });
    }
    let year = i32::from(bcd2(t6)?)
        .wrapping_mul(100)
        .wrapping_add(i32::from(bcd2(t5)?));
    let month = Month::try_from(bcd2(t4)?).ok()?;
    let date = Date::from_calendar_date(year, month, bcd2(t3)?).ok()?;
    let time = Time::from_hms(bcd2(t2)?, bcd2(t1)?, bcd2(t0)?).ok()?;
    let clock = PrimitiveDateTime::new(date, time);
    Some(Payload::Reading(Cjt188Reading {
        current_m3,
        settlement_m3,
        unit: UNIT_M3,
        clock,
        status,
    }))
}

pub(super) fn parse_water(cur: &mut Cursor<'_>) -> Result<Payload, Cjt188Error> {
    match fast_water(cur.rest) {
        Some(payload) => Ok(payload),
        None => parse_water_detailed(cur),
    }
}

pub(super) fn parse_water_detailed(cur: &mut Cursor<'_>) -> Result<Payload, Cjt188Error> {
    let (current_m3, unit) = volume_m3(cur, "current cumulative volume")?;
    let (settlement_m3, _) = volume_m3(cur, "settlement-date cumulative volume")?;
    let clock = clock(cur)?;
    let status = status(cur)?;
    Ok(match clock {
        Some(clock) => Payload::Reading(Cjt188Reading {
            current_m3,
            settlement_m3,
            unit,
            clock,
            status,
        }),
        None => Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            unit,
            status,
        },
    })
}

/// Map a CJ/T 188 unit code to a model unit and the factor from wire units to it.
pub(super) fn unit_of(code: u8) -> Option<(Unit, Decimal)> {
    let step = |base: u8| -> Decimal {
        match code.wrapping_sub(base) {
            0 => Decimal::ONE,
            1 => Decimal::TEN,
            _ => Decimal::ONE_HUNDRED,
        }
    };
    let thousand = Decimal::new(1000, 0);
    let milli = Decimal::new(1, 3);
    let (unit, base, factor) = match code {
        0x01 => (Unit::Joule, 0x01, Decimal::ONE),
        0x02..=0x04 => (Unit::WattHour, 0x02, Decimal::ONE),
        0x05..=0x07 => (Unit::KilowattHour, 0x05, Decimal::ONE),
        0x08..=0x0A => (Unit::MegawattHour, 0x08, Decimal::ONE),
        0x0B..=0x0D => (Unit::Joule, 0x0B, thousand),
        0x0E..=0x10 => (Unit::Gigajoule, 0x0E, milli),
        0x11..=0x13 => (Unit::Gigajoule, 0x11, Decimal::ONE),
        0x14..=0x16 => (Unit::Watt, 0x14, Decimal::ONE),
        0x17..=0x19 => (Unit::Kilowatt, 0x17, Decimal::ONE),
        0x1A..=0x1C => (Unit::Kilowatt, 0x1A, thousand),
        0x29..=0x2B => (Unit::Litre, 0x29, Decimal::ONE),
        0x2C..=0x2E => (Unit::CubicMetre, 0x2C, Decimal::ONE),
        0x32..=0x34 => (Unit::LitrePerHour, 0x32, Decimal::ONE),
        0x35..=0x37 => (Unit::CubicMetrePerHour, 0x35, Decimal::ONE),
        _ => return None,
    };
    factor.checked_mul(step(base)).map(|f| (unit, f))
}

pub(super) fn heat_value(
    cur: &mut Cursor<'_>,
    unit_first: bool,
    scale: u32,
    field: &'static str,
) -> Result<UnitValue, Cjt188Error> {
    let (unit_offset, unit, value) = if unit_first {
        let unit_offset = cur.offset;
        let unit = cur.byte("unit")?;
        (unit_offset, unit, bcd_field(cur, 4, scale, field)?)
    } else {
        let value = bcd_field(cur, 4, scale, field)?;
        (cur.offset, cur.byte("unit")?, value)
    };
    if unit_of(unit).is_none() {
        return Err(Cjt188Error::BadUnit {
            offset: unit_offset,
            code: unit,
            expected: field,
        });
    }
    Ok(UnitValue { value, unit })
}

pub(super) fn parse_heat(cur: &mut Cursor<'_>) -> Result<HeatReading, Cjt188Error> {
    // JY meters send the unit byte first: detect it when byte 4 is not a unit but byte 0 is.
    let unit_first = match cur.rest {
        [first, _, _, _, fifth, ..] => unit_of(*fifth).is_none() && unit_of(*first).is_some(),
        _ => false,
    };
    let settlement_heat = heat_value(cur, unit_first, 2, "settlement heat")?;
    let current_heat = heat_value(cur, unit_first, 2, "current heat")?;
    let power = heat_value(cur, unit_first, 2, "heat power")?;
    let flow = heat_value(cur, unit_first, 4, "flow")?;
    let volume = heat_value(cur, unit_first, 2, "cumulative volume")?;
    let supply_c = bcd_field(cur, 3, 2, "supply temperature")?;
    let return_c = bcd_field(cur, 3, 2, "return temperature")?;
    let hours = bcd_field(cur, 3, 0, "working time")?;
    let working_hours = u32::try_from(hours.mantissa()).unwrap_or(u32::MAX);
    let clock = clock(cur)?;
    let status = status(cur)?;
    Ok(HeatReading {
        settlement_heat,
        current_heat,
        power,
        flow,
        volume,
        supply_c,
        return_c,
        working_hours,
        clock,
        status,
        unit_first,
    })
}
