//! Normalised readings, their quality and provenance, and the uplink batch.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{GatewayId, MeterId, Quantity, Unit};

/// Version of the JSON wire form of [`ReadingBatch`] (and of the types it embeds).
///
/// Bump it on any breaking change; consumers refuse batches with a version they do not know.
pub const WIRE_VERSION: u16 = 1;

/// Which clock a reading's timestamp comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockSource {
    /// The meter's own real-time clock (converted to UTC with the meter's configured zone).
    Meter,
    /// The gateway's receive time (the frame had no usable clock).
    Gateway,
    /// A carrier IoT platform's timestamp.
    Platform,
    /// Entered by a person (manual read, edit).
    Manual,
    /// Computed by the pipeline (estimates).
    Pipeline,
}

/// The kind of source a frame arrived through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// MQTT subscription (concentrators).
    Mqtt,
    /// Modbus TCP poll.
    ModbusTcp,
    /// Modbus RTU poll over a serial line.
    ModbusRtu,
    /// Wired M-Bus master over a serial line.
    MbusSerial,
    /// Wireless M-Bus receiver.
    Wmbus,
    /// NB-IoT meter over CoAP/UDP.
    Coap,
    /// IoT-platform HTTP push.
    HttpPush,
    /// The HTTP API (manual reads, IF-REV-004).
    Api,
    /// Produced inside the pipeline (estimates).
    Pipeline,
}

/// Where a reading came from: enough to find and re-decode the raw frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Gateway that received the frame.
    pub gateway: GatewayId,
    /// Kind of source.
    pub source: SourceKind,
    /// Source instance id from the gateway configuration (`mqtt-north`, `bus1`...).
    pub source_id: String,
    /// SHA-256 of the raw frame bytes, hex (64 characters).
    pub frame_hash: String,
    /// When the gateway received the frame (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// Where on the source the frame came from; `None` if nowhere (estimates, older gateways).
    ///
    /// The MQTT topic (concentrator, hydrant), the peer `ip:port` (CoAP, wM-Bus UDP, HTTP
    /// push), `<tty> primary <n>` / `<tty> secondary <8 digits>` (serial M-Bus),
    /// `<host:port> unit <n>` / `<tty> unit <n>` (Modbus). Optional on the wire (v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

/// How an estimate was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimationMethod {
    /// Linear interpolation between actual reads on both sides of a short gap.
    Linear,
    /// Scaled like-day profile for longer gaps.
    Profile,
    /// Average daily usage times elapsed days.
    AverageDailyUsage,
    /// Average of the previous N months (billing practice for unreadable meters).
    HistoricalAverage,
}

/// Why a reading was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Same meter, time and quantity already stored with a different value.
    DuplicateConflict,
    /// Timestamp too far in the future or too far from the receive time.
    ImplausibleTimestamp,
    /// The register decreased and neither rollover nor replacement explains it.
    RegisterDecrease,
    /// Usage above what the meter can physically pass in the elapsed time.
    PhysicallyImpossible,
    /// Unit cannot be converted to the meter's configured unit.
    UnitMismatch,
    /// Data from a meter that is not installed or is retired.
    InactiveMeter,
    /// The meter is unknown to the pipeline.
    UnknownMeter,
    /// The meter is flagged as tampered and no longer valid for billing.
    Tampered,
}

/// The standing of a reading for billing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Quality {
    /// As received, not yet validated.
    Actual,
    /// Passed every validation rule.
    Validated,
    /// Computed by estimation.
    Estimated {
        /// Method used.
        method: EstimationMethod,
    },
    /// Replaced by a person; who and why are audited.
    Edited {
        /// User who edited.
        by: String,
        /// Reason given.
        reason: String,
    },
    /// Expected but not received (a gap placeholder).
    Missing,
    /// Refused by validation; kept for audit, never billed.
    Rejected {
        /// Why.
        reason: RejectReason,
    },
}

impl Quality {
    /// Returns the status name (`actual`, `validated`, `estimated`, `edited`, `missing`, `rejected`).
    pub fn status(&self) -> &'static str {
        match self {
            Self::Actual => "actual",
            Self::Validated => "validated",
            Self::Estimated { .. } => "estimated",
            Self::Edited { .. } => "edited",
            Self::Missing => "missing",
            Self::Rejected { .. } => "rejected",
        }
    }

    /// Returns true when the reading may be used for billing.
    pub fn is_billable(&self) -> bool {
        matches!(
            self,
            Self::Validated | Self::Estimated { .. } | Self::Edited { .. }
        )
    }
}

/// A condition noticed by validation that does not by itself reject the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityFlag {
    /// Meter clock differs from receive time beyond tolerance; both times kept.
    ClockSkew,
    /// Older than the last validated read.
    OutOfOrder,
    /// Register wrapped at its capacity.
    Rollover,
    /// Register decreased: reverse flow.
    ReverseFlow,
    /// First read after a recorded meter replacement.
    MeterReplaced,
    /// Usage above k × average daily usage.
    Spike,
    /// Zero consumption over a long span on a meter that used to consume.
    ZeroConsumption,
    /// Converted from the frame's unit to the meter's configured unit.
    UnitConverted,
    /// Superseded by a later actual read (for estimates).
    Superseded,
}

/// One normalised measurement of one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    /// The meter.
    pub meter: MeterId,
    /// Measurement time, UTC.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// Which clock `ts` comes from.
    pub clock: ClockSource,
    /// What is measured.
    pub quantity: Quantity,
    /// Exact value in `unit` (a JSON string, so no precision is lost on the wire).
    pub value: Decimal,
    /// Unit of `value`.
    pub unit: Unit,
    /// Storage number (0 = current value; M-Bus historic values have higher numbers).
    #[serde(default)]
    pub storage: u32,
    /// Tariff register (0 = total).
    #[serde(default)]
    pub tariff: u16,
    /// Sub-unit (device) number.
    #[serde(default)]
    pub subunit: u16,
    /// Standing for billing.
    pub quality: Quality,
    /// Conditions noticed by validation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<QualityFlag>,
    /// Where it came from.
    pub provenance: Provenance,
}

impl Reading {
    /// An actual reading of the current register (storage, tariff and subunit 0) without
    /// flags: the common case of one decoded value, for tools and benches that make readings.
    pub fn actual(
        meter: MeterId,
        ts: OffsetDateTime,
        clock: ClockSource,
        (quantity, value, unit): (Quantity, Decimal, Unit),
        provenance: Provenance,
    ) -> Self {
        Self {
            meter,
            ts,
            clock,
            quantity,
            value,
            unit,
            storage: 0,
            tariff: 0,
            subunit: 0,
            quality: Quality::Actual,
            flags: Vec::new(),
            provenance,
        }
    }
}

impl Provenance {
    /// Where a reading came from, without a channel.
    pub fn new(
        gateway: GatewayId,
        source: SourceKind,
        source_id: impl Into<String>,
        frame_hash: impl Into<String>,
        received_at: OffsetDateTime,
    ) -> Self {
        Self {
            gateway,
            source,
            source_id: source_id.into(),
            frame_hash: frame_hash.into(),
            received_at,
            channel: None,
        }
    }
}

/// A spooled reading with its gateway sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry {
    /// Gateway spool sequence number, strictly increasing per gateway.
    pub seq: u64,
    /// The reading.
    pub reading: Reading,
}

/// The uplink message on `wm/v1/readings/{partition}`: a batch of readings from one gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadingBatch {
    /// Wire version, [`WIRE_VERSION`].
    pub v: u16,
    /// Sending gateway.
    pub gateway: GatewayId,
    /// Partition of every reading in the batch.
    pub partition: u16,
    /// When the batch was published (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
    /// Entries in spool order.
    pub entries: Vec<BatchEntry>,
    /// Identity of the gateway spool that numbered the entries (a fresh spool directory, a
    /// cut tail or a refused acknowledgement start a new one). Sequence numbers are unique per
    /// (gateway, incarnation); absent from gateways that predate end-to-end acknowledgements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    /// Sequence number of the entry of this partition the gateway sent just before this
    /// batch's first entry; absent when the batch starts the gateway's unacknowledged window
    /// (everything older in this partition was acknowledged). The pipeline stores a batch
    /// only when `prev` is at or below what it has committed, so a batch lost between
    /// gateway and pipeline (a broker queue limit) can never be skipped over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
}

/// The pipeline's end-to-end acknowledgement on `{root}/{gateway}/ingest-ack` (QoS 1): every
/// entry of `partition` from spool `incarnation` with a sequence number up to `seq` is
/// committed to the database (or refused for good and recorded in `ingest_rejects`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestAck {
    /// Wire version, [`WIRE_VERSION`].
    pub v: u16,
    /// The spool incarnation the batches carried.
    pub incarnation: String,
    /// The partition.
    pub partition: u16,
    /// Highest sequence committed in this partition, with no batch skipped before it.
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use time::macros::datetime;

    fn sample() -> Reading {
        Reading::actual(
            MeterId::new("cjt188:78330011223344").unwrap(),
            datetime!(2026-11-24 10:43:00 UTC),
            ClockSource::Meter,
            (Quantity::Volume, dec!(556677.00), Unit::CubicMetre),
            Provenance::new(
                GatewayId::new("gw-1").unwrap(),
                SourceKind::Coap,
                "nbiot",
                "00".repeat(32),
                datetime!(2026-11-24 10:43:05 UTC),
            ),
        )
    }

    /// Pins the documented v1 JSON form (docs/wire-format.md).
    #[test]
    fn batch_json_form_is_stable() {
        let batch = ReadingBatch {
            v: WIRE_VERSION,
            gateway: GatewayId::new("gw-1").unwrap(),
            partition: 3,
            sent_at: datetime!(2026-11-24 10:43:06 UTC),
            entries: vec![
                BatchEntry {
                    seq: 42,
                    reading: sample(),
                },
                BatchEntry {
                    seq: 43,
                    reading: {
                        let mut r = sample();
                        r.provenance.channel = Some("192.0.2.7:5683".into());
                        r
                    },
                },
            ],
            incarnation: None,
            prev: None,
        };
        let json = serde_json::to_value(&batch).unwrap();
        let expected = serde_json::json!({
            "v": 1, "gateway": "gw-1", "partition": 3, "sent_at": "2026-11-24T10:43:06Z",
            "entries": [{"seq": 42, "reading": {
                "meter": "cjt188:78330011223344", "ts": "2026-11-24T10:43:00Z", "clock": "meter",
                "quantity": "volume", "value": "556677.00", "unit": "m3",
                "storage": 0, "tariff": 0, "subunit": 0, "quality": {"status": "actual"},
                "provenance": {"gateway": "gw-1", "source": "coap", "source_id": "nbiot",
                    "frame_hash": "00".repeat(32), "received_at": "2026-11-24T10:43:05Z"}
            }}, {"seq": 43, "reading": {
                "meter": "cjt188:78330011223344", "ts": "2026-11-24T10:43:00Z", "clock": "meter",
                "quantity": "volume", "value": "556677.00", "unit": "m3",
                "storage": 0, "tariff": 0, "subunit": 0, "quality": {"status": "actual"},
                "provenance": {"gateway": "gw-1", "source": "coap", "source_id": "nbiot",
                    "frame_hash": "00".repeat(32), "received_at": "2026-11-24T10:43:05Z",
                    "channel": "192.0.2.7:5683"}
            }}]
        });
        assert_eq!(json, expected);
        let back: ReadingBatch = serde_json::from_value(json).unwrap();
        assert_eq!(back, batch);
    }

    /// `channel` is optional in wire v1: omitted when `None`, and batches from gateways that
    /// predate it (no key) still decode.
    #[test]
    fn provenance_channel_is_optional_on_the_wire() {
        let mut with = sample();
        with.provenance.channel = Some("wm/site-1/conc-7/up".into());
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(
            json["provenance"]["channel"],
            serde_json::json!("wm/site-1/conc-7/up")
        );
        assert_eq!(serde_json::from_value::<Reading>(json).unwrap(), with);

        let without = sample();
        let json = serde_json::to_value(&without).unwrap();
        assert!(json["provenance"].get("channel").is_none());
        assert_eq!(serde_json::from_value::<Reading>(json).unwrap(), without);

        // An old gateway's reading, written by hand without the key.
        let old = r#"{"meter": "cjt188:78330011223344", "ts": "2026-11-24T10:43:00Z",
            "clock": "meter", "quantity": "volume", "value": "556677.00", "unit": "m3",
            "storage": 0, "tariff": 0, "subunit": 0, "quality": {"status": "actual"},
            "provenance": {"gateway": "gw-1", "source": "coap", "source_id": "nbiot",
                "frame_hash": "0000000000000000000000000000000000000000000000000000000000000000",
                "received_at": "2026-11-24T10:43:05Z"}}"#;
        let back: Reading = serde_json::from_str(old).unwrap();
        assert_eq!(back, without);
        assert_eq!(back.provenance.channel, None);
    }

    #[test]
    fn quality_tags() {
        let q = Quality::Estimated {
            method: EstimationMethod::Linear,
        };
        assert_eq!(
            serde_json::to_string(&q).unwrap(),
            r#"{"status":"estimated","method":"linear"}"#
        );
        assert!(q.is_billable());
        assert!(
            !Quality::Rejected {
                reason: RejectReason::Tampered
            }
            .is_billable()
        );
        assert_eq!(Quality::Actual.status(), "actual");
    }

    #[test]
    fn bad_meter_id_in_json_is_refused() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["meter"] = serde_json::json!("bad/id");
        assert!(serde_json::from_value::<Reading>(json).is_err());
    }
}
