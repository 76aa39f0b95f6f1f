//! Turns a [`DecodedFrame`] into normalised [`Reading`]s with provenance.

use decoders::{DecodedFrame, Function, Protocol, RecordQuantity, RecordValue};
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
    match frame.protocol {
        Protocol::Cjt188 => MeterId::new(format!("cjt188:{}", frame.meter.id)),
        Protocol::Mbus | Protocol::Wmbus => MeterId::new(format!(
            "mbus:{}{}",
            frame.meter.manufacturer.as_deref().unwrap_or(""),
            frame.meter.id
        )),
        Protocol::Modbus => MeterId::new(format!("modbus:{}", frame.meter.id)),
    }
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
    frame
        .records
        .iter()
        .filter(|r| r.function == Function::Instantaneous)
        .filter_map(|record| {
            let quantity = record.reading_quantity()?;
            let RecordValue::Number(value) = &record.value else {
                return None;
            };
            Some(Reading {
                meter: meter.clone(),
                ts,
                clock,
                quantity,
                value: *value,
                unit: record.unit.unwrap_or(Unit::Dimensionless),
                storage: record.storage,
                tariff: record.tariff,
                subunit: record.subunit,
                quality: Quality::Actual,
                flags: Vec::new(),
                provenance: provenance.clone(),
            })
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
}
