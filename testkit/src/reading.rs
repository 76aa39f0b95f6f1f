//! A [`Reading`] builder: the defaults of a meter-clock volume read (m³, register 0) from an
//! NB-IoT meter through gateway `gw-test`, each field settable by name.

use model::{
    ClockSource, GatewayId, MeterId, Provenance, Quality, QualityFlag, Quantity, Reading,
    SourceKind, Unit,
};
use rust_decimal::Decimal;
use time::OffsetDateTime;

/// The default meter-clock timestamp of a built reading.
pub const DEFAULT_TS: OffsetDateTime = time::macros::datetime!(2026-11-24 10:43:00 UTC);

/// Starts a reading of `meter` (valid meter id, e.g. `cjt188:00000000000001`) with the defaults:
/// 0 m³ at [`DEFAULT_TS`], received 5 s later.
///
/// # Panics
/// When `meter` is not a valid meter id: the test is wrong.
pub fn reading(meter: &str) -> ReadingBuilder {
    ReadingBuilder {
        r: Reading {
            meter: MeterId::new(meter).expect("a valid test meter id"),
            ts: DEFAULT_TS,
            clock: ClockSource::Meter,
            quantity: Quantity::Volume,
            value: Decimal::ZERO,
            unit: Unit::CubicMetre,
            storage: 0,
            tariff: 0,
            subunit: 0,
            quality: Quality::Actual,
            flags: vec![],
            provenance: Provenance {
                gateway: GatewayId::new("gw-test").expect("a valid gateway id"),
                source: SourceKind::Coap,
                source_id: "test".into(),
                frame_hash: "00".repeat(32),
                received_at: DEFAULT_TS + time::Duration::seconds(5),
                channel: None,
            },
        },
    }
}

/// Builds a [`Reading`]; see [`reading`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ReadingBuilder {
    r: Reading,
}

impl ReadingBuilder {
    /// The meter's timestamp; the reception time moves with it (5 s later).
    pub fn ts(mut self, ts: OffsetDateTime) -> Self {
        let lag = self.r.provenance.received_at - self.r.ts;
        self.r.ts = ts;
        self.r.provenance.received_at = ts + lag;
        self
    }

    /// The value, in the reading's unit.
    pub fn value(mut self, value: Decimal) -> Self {
        self.r.value = value;
        self
    }

    /// The value in thousandths of the unit (litres for m³): `milli(1234)` is 1.234.
    pub fn milli(self, thousandths: i64) -> Self {
        self.value(Decimal::new(thousandths, 3))
    }

    /// Quantity and unit.
    pub fn quantity(mut self, quantity: Quantity, unit: Unit) -> Self {
        self.r.quantity = quantity;
        self.r.unit = unit;
        self
    }

    /// The clock the timestamp comes from.
    pub fn clock(mut self, clock: ClockSource) -> Self {
        self.r.clock = clock;
        self
    }

    /// Storage, tariff and subunit numbers of the record.
    pub fn register(mut self, storage: u32, tariff: u16, subunit: u16) -> Self {
        self.r.storage = storage;
        self.r.tariff = tariff;
        self.r.subunit = subunit;
        self
    }

    /// Quality and flags.
    pub fn quality(mut self, quality: Quality, flags: Vec<QualityFlag>) -> Self {
        self.r.quality = quality;
        self.r.flags = flags;
        self
    }

    /// The gateway that forwarded it.
    ///
    /// # Panics
    /// When `gateway` is not a valid gateway id.
    pub fn gateway(mut self, gateway: &str) -> Self {
        self.r.provenance.gateway = GatewayId::new(gateway).expect("a valid test gateway id");
        self
    }

    /// The source kind and the source's id in the gateway's configuration.
    pub fn source(mut self, source: SourceKind, source_id: &str) -> Self {
        self.r.provenance.source = source;
        self.r.provenance.source_id = source_id.into();
        self
    }

    /// The reception time at the gateway.
    pub fn received_at(mut self, at: OffsetDateTime) -> Self {
        self.r.provenance.received_at = at;
        self
    }

    /// The hex SHA-256 of the frame it came from.
    pub fn frame_hash(mut self, hash: impl Into<String>) -> Self {
        self.r.provenance.frame_hash = hash.into();
        self
    }

    /// The reading.
    pub fn build(self) -> Reading {
        self.r
    }
}

impl From<ReadingBuilder> for Reading {
    fn from(b: ReadingBuilder) -> Reading {
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_setters() {
        let r = reading("cjt188:00000000000001").milli(1234).build();
        assert_eq!(r.value, Decimal::new(1234, 3));
        assert_eq!(r.quantity, Quantity::Volume);
        assert_eq!(r.provenance.received_at - r.ts, time::Duration::seconds(5));
        let ts = time::macros::datetime!(2026-01-01 00:00 UTC);
        let r = reading("cjt188:00000000000001")
            .ts(ts)
            .gateway("gw-1")
            .register(1, 2, 3)
            .build();
        assert_eq!(r.ts, ts);
        assert_eq!(r.provenance.received_at, ts + time::Duration::seconds(5));
        assert_eq!(r.provenance.gateway.as_str(), "gw-1");
        assert_eq!((r.storage, r.tariff, r.subunit), (1, 2, 3));
    }
}
