//! Turns a [`DecodedFrame`] into normalised [`Reading`]s with provenance; wired M-Bus frames
//! go from bytes to readings directly ([`mbus_readings`]), without the `DecodedFrame`.

use decoders::mbus::{MbusError, NumericReading};
use decoders::{DecodedFrame, Function, MeterInfo, Protocol, RecordQuantity, RecordValue};
use model::{
    ClockSource, GatewayId, MeterId, MeterIdError, Provenance, Quality, Reading, SourceKind, Unit,
};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, PrimitiveDateTime};

/// Where and when a frame was received.
#[derive(Debug, Clone)]
pub struct FrameContext<'a> {
    /// This gateway.
    pub gateway: &'a GatewayId,
    /// Kind of source.
    pub source: SourceKind,
    /// Source instance id from the configuration.
    pub source_id: &'a str,
    /// Where on the source the frame came from ([`Provenance::channel`]): topic, peer, bus
    /// address.
    pub channel: Option<&'a str>,
    /// Receive time (UTC).
    pub received_at: OffsetDateTime,
    /// The raw frame, hashed into the provenance so the reading can be traced back to it.
    pub raw: &'a [u8],
}

/// SHA-256 of a raw frame as lowercase hex.
pub fn frame_hash(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}

/// The pipeline's meter id for a decoded frame (`cjt188:<14 digits>`, `mbus:<MAN><8 digits>`).
///
/// Modbus frames carry no identity; their meter id comes from the device configuration.
pub fn meter_id(frame: &DecodedFrame) -> Result<MeterId, MeterIdError> {
    meter_id_of(frame.protocol, &frame.meter)
}

/// [`meter_id`] from the protocol and the meter's identity.
fn meter_id_of(protocol: Protocol, meter: &MeterInfo) -> Result<MeterId, MeterIdError> {
    match protocol {
        Protocol::Cjt188 => MeterId::new(format!("cjt188:{}", meter.id)),
        Protocol::Mbus | Protocol::Wmbus => MeterId::new(format!(
            "mbus:{}{}",
            meter.manufacturer.as_deref().unwrap_or(""),
            meter.id
        )),
        Protocol::Modbus => MeterId::new(format!("modbus:{}", meter.id)),
    }
}

/// Why a wired M-Bus frame gave no readings ([`mbus_readings`]).
#[derive(Debug, thiserror::Error)]
pub enum MbusFrameError {
    /// The frame did not decode.
    #[error(transparent)]
    Decode(#[from] MbusError),
    /// The frame's identity is not a valid meter id.
    #[error(transparent)]
    MeterId(#[from] MeterIdError),
}

impl crate::sources::ErrorCode for MbusFrameError {
    fn code(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.code(),
            Self::MeterId(_) => "meter_id",
        }
    }
}

/// The wired M-Bus intake from bytes (`ctx.raw`): the meter id and the readings, the same as
/// [`decoders::mbus::decode`] then [`meter_id`] and [`to_readings`] give, without building the
/// [`DecodedFrame`] and its per-record texts ([`decoders::mbus::readings`]).
///
/// # Errors
/// The decoder's error, or the meter id's.
pub fn mbus_readings(
    ctx: &FrameContext<'_>,
    meter_ts: Option<OffsetDateTime>,
) -> Result<(MeterId, Vec<Reading>), MbusFrameError> {
    let mut numeric = Vec::new();
    let meter = decoders::mbus::readings(ctx.raw, &mut numeric)?;
    let meter = meter_id_of(Protocol::Mbus, &meter)?;
    let readings = build_readings(numeric, &meter, meter_ts, ctx);
    Ok((meter, readings))
}

/// Readings of the frame's numeric records that the pipeline stores.
///
/// `meter_ts` is the meter's own clock converted to UTC, when the frame had one; otherwise the
/// receive time is used and marked [`ClockSource::Gateway`]. Maximum/minimum/error-state
/// records and records without a pipeline quantity are left out: they stay visible in the raw
/// frame, which the provenance hash identifies.
pub fn to_readings(
    frame: &DecodedFrame,
    meter: &MeterId,
    meter_ts: Option<OffsetDateTime>,
    ctx: &FrameContext<'_>,
) -> Vec<Reading> {
    build_readings(
        frame.records.iter().filter_map(NumericReading::of_record),
        meter,
        meter_ts,
        ctx,
    )
}

/// The readings of `numeric` (the records the pipeline stores) with their time and provenance.
fn build_readings(
    numeric: impl IntoIterator<Item = NumericReading>,
    meter: &MeterId,
    meter_ts: Option<OffsetDateTime>,
    ctx: &FrameContext<'_>,
) -> Vec<Reading> {
    let (ts, clock) = match meter_ts {
        Some(ts) => (ts, ClockSource::Meter),
        None => (ctx.received_at, ClockSource::Gateway),
    };
    let provenance = Provenance {
        gateway: ctx.gateway.clone(),
        source: ctx.source,
        source_id: ctx.source_id.to_owned(),
        frame_hash: frame_hash(ctx.raw),
        received_at: ctx.received_at,
        channel: ctx.channel.map(str::to_owned),
    };
    numeric
        .into_iter()
        .map(|r| Reading {
            meter: meter.clone(),
            ts,
            clock,
            quantity: r.quantity,
            value: r.value,
            unit: r.unit.unwrap_or(Unit::Dimensionless),
            storage: r.storage,
            tariff: r.tariff,
            subunit: r.subunit,
            quality: Quality::Actual,
            flags: Vec::new(),
            provenance: provenance.clone(),
        })
        .collect()
}

/// The meter's own clock in an M-Bus / wM-Bus frame: the current (storage 0, tariff 0, sub-unit
/// 0, instantaneous) `date_time` record of type F or I (`YYYY-MM-DDTHH:MM[:SS]`, meter local
/// time). A date without a time (type G), a clock the meter marked invalid (kept raw by the
/// decoder) or an impossible date gives `None`.
pub fn frame_clock(frame: &DecodedFrame) -> Option<PrimitiveDateTime> {
    let record = frame.records.iter().find(|r| {
        r.quantity == RecordQuantity::DateTime
            && r.storage == 0
            && r.tariff == 0
            && r.subunit == 0
            && r.function == Function::Instantaneous
    })?;
    let RecordValue::Date(text) = &record.value else {
        return None;
    };
    parse_local_date_time(text)
}

/// `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` as a local date-time.
fn parse_local_date_time(text: &str) -> Option<PrimitiveDateTime> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u16> {
        let digits = b.get(from..from.checked_add(len)?)?;
        digits.iter().try_fold(0u16, |acc, d| {
            d.is_ascii_digit()
                .then(|| acc.wrapping_mul(10).wrapping_add(u16::from(d - b'0')))
        })
    };
    if !matches!(b.len(), 16 | 19) || b.get(10) != Some(&b'T') {
        return None;
    }
    let second = if b.len() == 19 { num(17, 2)? } else { 0 };
    let date = time::Date::from_calendar_date(
        i32::from(num(0, 4)?),
        time::Month::try_from(u8::try_from(num(5, 2)?).ok()?).ok()?,
        u8::try_from(num(8, 2)?).ok()?,
    )
    .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(num(11, 2)?).ok()?,
        u8::try_from(num(14, 2)?).ok()?,
        u8::try_from(second).ok()?,
    )
    .ok()?;
    Some(PrimitiveDateTime::new(date, t))
}

/// Timestamps for the frames of one uplink when the meters' clocks cannot be converted to UTC
/// (no zone configured): the newest clock gets `anchor` (the receive or platform time) and
/// every older frame `anchor` minus how far its clock is behind the newest. Differences of
/// local clock times are zone-free (this assumes no daylight-saving jump inside the history,
/// true for China Standard Time). Frames without a clock, and a single frame, get `anchor`.
pub fn relative_timestamps(
    clocks: &[Option<PrimitiveDateTime>],
    anchor: OffsetDateTime,
) -> Vec<OffsetDateTime> {
    let newest = clocks.iter().flatten().max().copied();
    clocks
        .iter()
        .map(|c| match (c, newest) {
            (Some(c), Some(newest)) => anchor.checked_sub(newest - *c).unwrap_or(anchor),
            _ => anchor,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use decoders::{MeterInfo, Record};
    use model::Quantity;
    use rust_decimal::Decimal;
    use time::macros::datetime;

    fn record(
        quantity: &str,
        value: RecordValue,
        unit: Option<Unit>,
        function: Function,
    ) -> Record {
        Record {
            quantity: quantity.to_owned().into(),
            value,
            unit,
            storage: 0,
            tariff: 0,
            subunit: 0,
            function,
        }
    }

    #[test]
    fn the_current_date_time_record_is_the_frame_clock() {
        let frame = |records: Vec<Record>| DecodedFrame {
            protocol: Protocol::Wmbus,
            meter: MeterInfo {
                id: "12345678".into(),
                manufacturer: Some("KAM".into()),
                version: None,
                medium: None,
            },
            records,
        };
        let clock = |text: &str| {
            record(
                "date_time",
                RecordValue::Date(text.into()),
                None,
                Function::Instantaneous,
            )
        };
        assert_eq!(
            frame_clock(&frame(vec![clock("2026-11-24T10:43")])),
            Some(datetime!(2026-11-24 10:43:00))
        );
        assert_eq!(
            frame_clock(&frame(vec![clock("2026-11-24T10:43:59")])),
            Some(datetime!(2026-11-24 10:43:59))
        );
        // A historic (storage 1) clock is not the frame's; the current one after it is.
        let mut old = clock("2026-10-31T00:00");
        old.storage = 1;
        assert_eq!(
            frame_clock(&frame(vec![old.clone(), clock("2026-11-24T10:43")])),
            Some(datetime!(2026-11-24 10:43:00))
        );
        for bad in [
            "2026-11-24",
            "2026-02-30T10:43",
            "2026-11-24T24:00",
            "2026-11-24 10:43",
            "x",
        ] {
            assert_eq!(frame_clock(&frame(vec![clock(bad)])), None, "{bad}");
        }
        assert_eq!(frame_clock(&frame(vec![old])), None);
        let raw = record(
            "date_time",
            RecordValue::Raw("ffffffff".into()),
            None,
            Function::Instantaneous,
        );
        assert_eq!(frame_clock(&frame(vec![raw])), None);
    }

    #[test]
    fn history_timestamps_are_relative_to_the_newest_clock() {
        let anchor = datetime!(2026-11-24 16:00:07 UTC);
        let ts = relative_timestamps(
            &[
                Some(datetime!(2026-11-24 22:00:00)),
                None,
                Some(datetime!(2026-11-24 23:59:30)),
                Some(datetime!(2026-11-25 00:00:00)),
            ],
            anchor,
        );
        assert_eq!(
            ts,
            vec![
                datetime!(2026-11-24 14:00:07 UTC),
                anchor,
                datetime!(2026-11-24 15:59:37 UTC),
                anchor
            ]
        );
        assert_eq!(relative_timestamps(&[None], anchor), vec![anchor]);
    }

    #[test]
    fn numeric_instantaneous_records_become_readings() {
        let frame = DecodedFrame {
            protocol: Protocol::Mbus,
            meter: MeterInfo {
                id: "12345678".into(),
                manufacturer: Some("KAM".into()),
                version: Some(1),
                medium: Some("water".into()),
            },
            records: vec![
                record(
                    "volume",
                    RecordValue::Number(Decimal::new(12345678, 3)),
                    Some(Unit::CubicMetre),
                    Function::Instantaneous,
                ),
                record(
                    "volume_flow",
                    RecordValue::Number(Decimal::new(15, 1)),
                    Some(Unit::CubicMetrePerHour),
                    Function::Maximum,
                ),
                record(
                    "date_time",
                    RecordValue::Date("2026-11-24T10:43".into()),
                    None,
                    Function::Instantaneous,
                ),
            ],
        };
        let gateway = GatewayId::new("gw-1").unwrap();
        let ctx = FrameContext {
            gateway: &gateway,
            source: SourceKind::MbusSerial,
            source_id: "bus1",
            channel: Some("/dev/ttyUSB0 primary 5"),
            received_at: datetime!(2026-11-24 10:43:05 UTC),
            raw: b"abc",
        };
        let id = meter_id(&frame).unwrap();
        assert_eq!(id.as_str(), "mbus:KAM12345678");
        let readings = to_readings(&frame, &id, None, &ctx);
        assert_eq!(readings.len(), 1);
        let r = &readings[0];
        assert_eq!(r.quantity, Quantity::Volume);
        assert_eq!(r.value, Decimal::new(12345678, 3));
        assert_eq!(r.clock, ClockSource::Gateway);
        assert_eq!(r.ts, ctx.received_at);
        assert_eq!(
            r.provenance.frame_hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            r.provenance.channel.as_deref(),
            Some("/dev/ttyUSB0 primary 5")
        );
    }

    /// The libmbus corpus (`conformance/mbus/libmbus_cases.jsonl` in the shared directory:
    /// `WM_SHARED_DIR`, `<workspace>/../shared`, `/work/shared`).
    fn libmbus_frames() -> Vec<Vec<u8>> {
        let mut dirs: Vec<std::path::PathBuf> = Vec::new();
        if let Ok(dir) = std::env::var("WM_SHARED_DIR") {
            dirs.push(dir.into());
        }
        dirs.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        dirs.push("/work/shared".into());
        let path = dirs
            .iter()
            .map(|d| d.join("conformance/mbus/libmbus_cases.jsonl"))
            .find(|p| p.is_file())
            .expect("libmbus corpus (set WM_SHARED_DIR to the shared/ directory)");
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let case: serde_json::Value = serde_json::from_str(l).unwrap();
                case["frame_hex"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .filter_map(|t| u8::from_str_radix(t, 16).ok())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn mbus_bytes_to_readings_equal_decode_then_normalise_on_the_corpus() {
        let gateway = GatewayId::new("gw-1").unwrap();
        let frames = libmbus_frames();
        assert!(frames.len() >= 100, "corpus too small: {}", frames.len());
        let mut with_readings = 0;
        for (i, raw) in frames.iter().enumerate() {
            let ctx = FrameContext {
                gateway: &gateway,
                source: SourceKind::MbusSerial,
                source_id: "bus1",
                channel: Some("/dev/ttyUSB0 primary 5"),
                received_at: datetime!(2026-11-24 10:43:05 UTC),
                raw,
            };
            let old = decoders::mbus::decode(raw)
                .map_err(MbusFrameError::from)
                .and_then(|frame| {
                    let meter = meter_id(&frame)?;
                    let readings = to_readings(&frame, &meter, None, &ctx);
                    Ok((meter, readings))
                });
            let new = mbus_readings(&ctx, None);
            // `Debug`, so that each value's scale is compared too.
            match (old, new) {
                (Ok(old), Ok(new)) => {
                    with_readings += usize::from(!new.1.is_empty());
                    assert_eq!(format!("{old:?}"), format!("{new:?}"), "frame {i}");
                }
                (Err(old), Err(new)) => {
                    assert_eq!(old.to_string(), new.to_string(), "frame {i}");
                }
                (old, new) => panic!("frame {i}: {old:?} vs {new:?}"),
            }
        }
        assert!(
            with_readings >= 50,
            "only {with_readings} frames with readings"
        );
    }
}
