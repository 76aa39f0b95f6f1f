//! Decoding of uplink batches and the counters of the ingest stage.
//!
//! A batch on `{root}/readings/{partition}` is a [`model::ReadingBatch`]. This module turns a
//! payload into a batch or a refusal ([`Decoded`]), drops entries whose gateway spool sequence is
//! already committed ([`Progress`]), and counts what happened ([`IngestMetrics`], Prometheus text).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use model::{BatchEntry, ReadingBatch, WIRE_VERSION};

/// Returns the readings topic of one partition under `root` (`{root}/readings/{partition}`).
pub fn readings_topic(root: &str, partition: u16) -> String {
    model::topic::readings(root, partition)
}

/// Returns the end-to-end acknowledgement topic of a gateway (`{root}/{gateway}/ingest-ack`).
pub fn ack_topic(root: &str, gateway: &str) -> String {
    model::topic::ingest_ack(root, gateway)
}

/// Returns the partitions owned by worker `worker` of `workers`: those with `p % workers == worker`.
pub fn owned_partitions(worker: u16, workers: u16, partitions: u16) -> Vec<u16> {
    (0..partitions)
        .filter(|p| workers != 0 && p % workers == worker)
        .collect()
}

/// Returns true when worker `worker` of `workers` owns `meter` (by its partition).
pub fn owns_meter(meter: &str, worker: u16, workers: u16, partitions: u16) -> bool {
    workers != 0 && model::partition_of(meter, partitions) % workers == worker
}

/// What a payload turned out to be.
#[derive(Debug)]
pub enum Decoded {
    /// A batch this pipeline understands.
    Batch(ReadingBatch),
    /// A batch of a wire version this pipeline does not know.
    UnknownVersion {
        /// The version found in the payload.
        version: u64,
    },
    /// Not a reading batch at all.
    Malformed {
        /// What the JSON parser said.
        error: String,
    },
}

/// Decodes one MQTT payload. A batch of another wire version is refused as such, not
/// reported as malformed, even when its structure no longer parses as this version's.
///
/// The payload is parsed once when it is a batch of this version (every message on the
/// ingest path); only a payload that does not parse is read again for its version alone.
pub fn decode_payload(payload: &[u8]) -> Decoded {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        v: u64,
    }
    let error = match serde_json::from_slice::<ReadingBatch>(payload) {
        Ok(batch) if batch.v == WIRE_VERSION => return Decoded::Batch(batch),
        Ok(batch) => {
            return Decoded::UnknownVersion {
                version: u64::from(batch.v),
            };
        }
        Err(e) => e,
    };
    match serde_json::from_slice::<VersionOnly>(payload) {
        Ok(VersionOnly { v }) if v != u64::from(WIRE_VERSION) => {
            Decoded::UnknownVersion { version: v }
        }
        Ok(_) => Decoded::Malformed {
            error: error.to_string(),
        },
        Err(e) => Decoded::Malformed {
            error: e.to_string(),
        },
    }
}

/// Longest `source_id` and `channel` stored (bytes); longer ones are refused, not truncated.
pub const MAX_TEXT_BYTES: usize = 256;
/// Longest `frame_hash` stored (bytes; a SHA-256 in hex is 64).
pub const MAX_HASH_BYTES: usize = 128;
/// Longest edit user or reason inside `quality_detail` (bytes).
pub const MAX_DETAIL_BYTES: usize = 4096;
/// Readings dated further ahead than this are refused at ingest: they would land in
/// `readings_default` (beyond the prepared monthly partitions) and are clock faults anyway.
pub const MAX_FUTURE: time::Duration = time::Duration::days(31);
/// Readings dated before this (Unix seconds; 1990-01-01) are refused: a meter clock reset to
/// its epoch, not a measurement.
pub const MIN_TS_UNIX: i64 = 631_152_000;

/// Why a decoded reading cannot be stored. Each makes the database refuse the whole COPY (or
/// lands the row where it blocks partition maintenance), so it is caught before the COPY and
/// recorded in `ingest_rejects` under [`Unstorable::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unstorable {
    /// `value` does not fit `numeric(20, 6)` (|value| < 10^14).
    #[error("value {value} does not fit numeric(20, 6)")]
    ValueOutOfRange {
        /// The value, as text.
        value: String,
    },
    /// A text field holds a NUL byte (PostgreSQL text cannot).
    #[error("field {field} holds a NUL byte")]
    NulByte {
        /// Which field.
        field: &'static str,
    },
    /// A text field is longer than stored text may be.
    #[error("field {field} is {len} bytes, more than {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `ts` (or `received_at`) outside 1990-01-01 ..= now + 31 days.
    #[error("field {field} = {ts} is outside the storable range")]
    TimestampOutOfRange {
        /// Which field.
        field: &'static str,
        /// The timestamp, RFC 3339.
        ts: String,
    },
    /// An integer column overflows (tariff, subunit and storage are `smallint`).
    #[error("field {field} = {value} overflows its column")]
    FieldOutOfRange {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

impl Unstorable {
    /// Stable name, the `ingest_rejects.kind` of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ValueOutOfRange { .. } => "value_out_of_range",
            Self::NulByte { .. } => "nul_byte",
            Self::TooLong { .. } => "text_too_long",
            Self::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            Self::FieldOutOfRange { .. } => "field_out_of_range",
        }
    }
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), Unstorable> {
    if s.contains('\0') {
        return Err(Unstorable::NulByte { field });
    }
    if s.len() > max {
        return Err(Unstorable::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn check_ts(
    field: &'static str,
    ts: time::OffsetDateTime,
    now: time::OffsetDateTime,
) -> Result<(), Unstorable> {
    if ts.unix_timestamp() < MIN_TS_UNIX || ts > now + MAX_FUTURE {
        return Err(Unstorable::TimestampOutOfRange {
            field,
            ts: ts
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        });
    }
    Ok(())
}

/// Checks everything about one reading that would make PostgreSQL refuse its row (and with
/// it the whole batch): numeric range, NUL bytes, text lengths, timestamps, integer columns.
///
/// # Errors
/// The first problem found, as [`Unstorable`].
pub fn check_storable(r: &model::Reading, now: time::OffsetDateTime) -> Result<(), Unstorable> {
    // numeric(20, 6): at most 14 digits before the point; more decimals are rounded, not refused.
    let limit = rust_decimal::Decimal::from(100_000_000_000_000i64);
    if r.value.abs() >= limit {
        return Err(Unstorable::ValueOutOfRange {
            value: r.value.to_string(),
        });
    }
    check_ts("ts", r.ts, now)?;
    check_ts("received_at", r.provenance.received_at, now)?;
    check_text("meter", r.meter.as_str(), MAX_TEXT_BYTES)?;
    check_text("source_id", &r.provenance.source_id, MAX_TEXT_BYTES)?;
    check_text("frame_hash", &r.provenance.frame_hash, MAX_HASH_BYTES)?;
    if let Some(channel) = &r.provenance.channel {
        check_text("channel", channel, MAX_TEXT_BYTES)?;
    }
    if let model::Quality::Edited { by, reason } = &r.quality {
        check_text("quality.by", by, MAX_DETAIL_BYTES)?;
        check_text("quality.reason", reason, MAX_DETAIL_BYTES)?;
    }
    for (field, value, max) in [
        ("tariff", u64::from(r.tariff), i16::MAX as u64),
        ("subunit", u64::from(r.subunit), i16::MAX as u64),
        ("storage", u64::from(r.storage), i16::MAX as u64),
    ] {
        if value > max {
            return Err(Unstorable::FieldOutOfRange { field, value });
        }
    }
    Ok(())
}

/// Identifies one sequence of spool numbers: (gateway, spool incarnation, partition).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProgressKey {
    /// Gateway id.
    pub gateway: String,
    /// Spool incarnation (`""` for gateways that predate incarnations).
    pub incarnation: String,
    /// Partition.
    pub partition: u16,
}

impl ProgressKey {
    /// The key of a batch.
    pub fn of(batch: &ReadingBatch) -> Self {
        Self {
            gateway: batch.gateway.as_str().to_owned(),
            incarnation: batch.incarnation.clone().unwrap_or_default(),
            partition: batch.partition,
        }
    }
}

/// What [`Progress::filter`] kept of a batch.
#[derive(Debug)]
pub struct Filtered {
    /// Entries to process.
    pub entries: Vec<BatchEntry>,
    /// Entries dropped as already committed or out of order.
    pub dropped: u64,
    /// True when the batch was dropped whole because its `prev` lies beyond what is committed:
    /// an earlier batch never arrived (a broker dropped it), so storing this one would let the
    /// acknowledgement skip over it. The gateway sends the missing one again.
    pub gap: bool,
}

/// Highest committed spool sequence per (gateway, incarnation, partition), as in table
/// `ingest_progress`.
///
/// The worker keeps the committed view and works on a copy per database transaction, so a
/// failed transaction leaves the committed view untouched.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    max_seq: HashMap<ProgressKey, i64>,
}

impl Progress {
    /// Returns the highest committed sequence, if known.
    pub fn get(&self, key: &ProgressKey) -> Option<i64> {
        self.max_seq.get(key).copied()
    }

    /// Returns true when the key has been loaded or written.
    pub fn knows(&self, key: &ProgressKey) -> bool {
        self.max_seq.contains_key(key)
    }

    /// Records a loaded or committed value (a missing row is recorded as -1).
    pub fn set(&mut self, key: ProgressKey, seq: i64) {
        self.max_seq.insert(key, seq);
    }

    /// Removes entries already committed (sequence at or below the recorded maximum) and entries
    /// out of sequence order within the batch, or the whole batch when it does not continue
    /// what is committed (see [`Filtered::gap`]); advances the maximum.
    pub fn filter(&mut self, batch: ReadingBatch) -> Filtered {
        let key = ProgressKey::of(&batch);
        let mut max = self.max_seq.get(&key).copied().unwrap_or(-1);
        if let Some(prev) = batch.prev
            && i64::try_from(prev).unwrap_or(i64::MAX) > max
        {
            return Filtered {
                dropped: batch.entries.len() as u64,
                entries: Vec::new(),
                gap: true,
            };
        }
        let mut dropped = 0;
        let mut keep = Vec::with_capacity(batch.entries.len());
        for entry in batch.entries {
            let seq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
            if seq <= max {
                dropped += 1;
            } else {
                max = seq;
                keep.push(entry);
            }
        }
        self.max_seq.insert(key, max);
        Filtered {
            entries: keep,
            dropped,
            gap: false,
        }
    }

    /// Iterates over (key, max_seq).
    pub fn iter(&self) -> impl Iterator<Item = (&ProgressKey, i64)> {
        self.max_seq.iter().map(|(k, s)| (k, *s))
    }
}

/// Counter names, exported in Prometheus text format.
pub mod metric {
    /// MQTT messages received.
    pub const MESSAGES: &str = "pipeline_messages_received_total";
    /// Batches refused for an unknown wire version.
    pub const UNKNOWN_VERSION: &str = "pipeline_batches_unknown_version_total";
    /// Payloads that are not reading batches.
    pub const MALFORMED: &str = "pipeline_batches_malformed_total";
    /// Readings of meters another worker owns (gateway partition count differs), refused.
    pub const WRONG_PARTITION: &str = "pipeline_readings_wrong_partition_total";
    /// Entries dropped because their spool sequence was already committed.
    pub const SEQ_DUPLICATES: &str = "pipeline_entries_seq_duplicate_total";
    /// Readings dropped as exact duplicates by VEE.
    pub const DUPLICATES: &str = "pipeline_readings_duplicate_total";
    /// Validated readings the store's merge dropped because a row with their key was already
    /// stored (or came twice in one batch): the duplicates VEE's memory did not see.
    pub const ALREADY_STORED: &str = "pipeline_readings_already_stored_total";
    /// Readings refused because a different value is stored at the same key.
    pub const CONFLICTS: &str = "pipeline_readings_conflict_total";
    /// Readings written (actual, validated, rejected kept for audit).
    pub const STORED: &str = "pipeline_readings_stored_total";
    /// Estimates written.
    pub const ESTIMATED: &str = "pipeline_readings_estimated_total";
    /// Readings rejected by validation (stored with quality `rejected`).
    pub const REJECTED: &str = "pipeline_readings_rejected_total";
    /// Database transactions committed.
    pub const COMMITS: &str = "pipeline_commits_total";
    /// Database transactions that failed and were retried.
    pub const COMMIT_FAILURES: &str = "pipeline_commit_failures_total";
    /// Journal folds committed (rollups and meter state brought up to date).
    pub const FLUSHES: &str = "pipeline_journal_flushes_total";
    /// Journal folds that failed and were retried.
    pub const FLUSH_FAILURES: &str = "pipeline_journal_flush_failures_total";
    /// Consumption spans committed to the journal and not yet folded into the rollups (gauge).
    pub const PENDING_SPANS: &str = "pipeline_journal_pending_spans";
    /// Readings refused before the COPY because the database could not store them.
    pub const UNSTORABLE: &str = "pipeline_readings_unstorable_total";
    /// Readings the database refused that were isolated from their batch (split and retried).
    pub const ISOLATED: &str = "pipeline_readings_isolated_total";
    /// Batches dropped whole because an earlier batch of their partition never arrived.
    pub const GAPS: &str = "pipeline_batches_gap_total";
    /// End-to-end acknowledgements published to gateways.
    pub const ACKS_PUBLISHED: &str = "pipeline_ingest_acks_published_total";
    /// 1 while the worker cannot commit or fold its journal (retrying), else 0 (gauge).
    pub const STUCK: &str = "pipeline_worker_stuck";
    /// Readings stored by the priority lane (included in [`STORED`]).
    pub const LANE_STORED: &str = "pipeline_lane_readings_stored_total";
}

/// Counters of one worker. Cheap to update from the hot path.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// [`metric::MESSAGES`].
    pub messages: AtomicU64,
    /// [`metric::UNKNOWN_VERSION`].
    pub unknown_version: AtomicU64,
    /// [`metric::MALFORMED`].
    pub malformed: AtomicU64,
    /// [`metric::WRONG_PARTITION`].
    pub wrong_partition: AtomicU64,
    /// [`metric::SEQ_DUPLICATES`].
    pub seq_duplicates: AtomicU64,
    /// [`metric::DUPLICATES`].
    pub duplicates: AtomicU64,
    /// [`metric::ALREADY_STORED`].
    pub already_stored: AtomicU64,
    /// [`metric::CONFLICTS`].
    pub conflicts: AtomicU64,
    /// [`metric::STORED`].
    pub stored: AtomicU64,
    /// [`metric::ESTIMATED`].
    pub estimated: AtomicU64,
    /// [`metric::REJECTED`].
    pub rejected: AtomicU64,
    /// [`metric::COMMITS`].
    pub commits: AtomicU64,
    /// [`metric::COMMIT_FAILURES`].
    pub commit_failures: AtomicU64,
    /// [`metric::FLUSHES`].
    pub flushes: AtomicU64,
    /// [`metric::FLUSH_FAILURES`].
    pub flush_failures: AtomicU64,
    /// [`metric::PENDING_SPANS`] (a gauge: workers sharing these metrics add and subtract).
    pub pending_spans: AtomicU64,
    /// [`metric::UNSTORABLE`].
    pub unstorable: AtomicU64,
    /// [`metric::ISOLATED`].
    pub isolated: AtomicU64,
    /// [`metric::GAPS`].
    pub gaps: AtomicU64,
    /// [`metric::ACKS_PUBLISHED`].
    pub acks_published: AtomicU64,
    /// [`metric::STUCK`] (a gauge).
    pub stuck: AtomicU64,
    /// [`metric::LANE_STORED`].
    pub lane_stored: AtomicU64,
}

impl IngestMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Renders every counter in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, counter) in [
            (metric::MESSAGES, &self.messages),
            (metric::UNKNOWN_VERSION, &self.unknown_version),
            (metric::MALFORMED, &self.malformed),
            (metric::WRONG_PARTITION, &self.wrong_partition),
            (metric::SEQ_DUPLICATES, &self.seq_duplicates),
            (metric::DUPLICATES, &self.duplicates),
            (metric::ALREADY_STORED, &self.already_stored),
            (metric::CONFLICTS, &self.conflicts),
            (metric::STORED, &self.stored),
            (metric::ESTIMATED, &self.estimated),
            (metric::REJECTED, &self.rejected),
            (metric::COMMITS, &self.commits),
            (metric::COMMIT_FAILURES, &self.commit_failures),
            (metric::FLUSHES, &self.flushes),
            (metric::FLUSH_FAILURES, &self.flush_failures),
            (metric::UNSTORABLE, &self.unstorable),
            (metric::ISOLATED, &self.isolated),
            (metric::GAPS, &self.gaps),
            (metric::ACKS_PUBLISHED, &self.acks_published),
            (metric::LANE_STORED, &self.lane_stored),
        ] {
            out.push_str(&format!(
                "# TYPE {name} counter\n{name} {}\n",
                Self::get(counter)
            ));
        }
        out.push_str(&format!(
            "# TYPE {name} gauge\n{name} {}\n",
            Self::get(&self.pending_spans),
            name = metric::PENDING_SPANS
        ));
        out.push_str(&format!(
            "# TYPE {name} gauge\n{name} {}\n",
            Self::get(&self.stuck),
            name = metric::STUCK
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{
        ClockSource, GatewayId, MeterId, Provenance, Quality, Quantity, Reading, SourceKind, Unit,
    };
    use rust_decimal_macros::dec;
    use time::macros::datetime;

    fn entry(seq: u64) -> BatchEntry {
        BatchEntry {
            seq,
            reading: Reading {
                meter: MeterId::new("m1").unwrap(),
                ts: datetime!(2026-11-24 10:00 UTC),
                clock: ClockSource::Meter,
                quantity: Quantity::Volume,
                value: dec!(1),
                unit: Unit::CubicMetre,
                storage: 0,
                tariff: 0,
                subunit: 0,
                quality: Quality::Actual,
                flags: vec![],
                provenance: Provenance {
                    gateway: GatewayId::new("gw").unwrap(),
                    source: SourceKind::Coap,
                    source_id: "s".into(),
                    frame_hash: String::new(),
                    received_at: datetime!(2026-11-24 10:00 UTC),
                    channel: None,
                },
            },
        }
    }

    fn batch(seqs: &[u64]) -> ReadingBatch {
        ReadingBatch {
            v: WIRE_VERSION,
            gateway: GatewayId::new("gw").unwrap(),
            partition: 2,
            sent_at: datetime!(2026-11-24 10:00 UTC),
            incarnation: None,
            prev: None,
            entries: seqs.iter().map(|s| entry(*s)).collect(),
        }
    }

    #[test]
    fn worker_owns_every_partition_exactly_once() {
        let mut all: Vec<u16> = (0..3).flat_map(|w| owned_partitions(w, 3, 16)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert_eq!(owned_partitions(1, 2, 6), vec![1, 3, 5]);
    }

    #[test]
    fn progress_drops_committed_and_reordered_sequences() {
        let mut p = Progress::default();
        let key = ProgressKey::of(&batch(&[]));
        let f = p.filter(batch(&[1, 2, 3]));
        assert_eq!((f.entries.len(), f.dropped, f.gap), (3, 0, false));
        assert_eq!(p.get(&key), Some(3));
        let f = p.filter(batch(&[2, 3, 4, 4, 5]));
        assert_eq!(
            f.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(f.dropped, 3);
        let other = ProgressKey {
            partition: 1,
            ..key.clone()
        };
        assert_eq!(p.get(&other), None);
    }

    #[test]
    fn a_batch_after_a_lost_one_is_held_back_and_incarnations_are_apart() {
        let mut p = Progress::default();
        let mut b = batch(&[10, 11]);
        b.prev = None;
        assert_eq!(p.filter(b).entries.len(), 2);
        // 12..=19 went missing in the broker: 20 claims 19 came before it.
        let mut b = batch(&[20, 21]);
        b.prev = Some(19);
        let f = p.filter(b);
        assert!(f.gap);
        assert_eq!((f.entries.len(), f.dropped), (0, 2));
        assert_eq!(p.get(&ProgressKey::of(&batch(&[]))), Some(11));
        // The gateway resends from its window's start; the chain then holds.
        let mut b = batch(&[12, 19]);
        b.prev = Some(11);
        assert_eq!(p.filter(b).entries.len(), 2);
        let mut b = batch(&[20, 21]);
        b.prev = Some(19);
        assert_eq!(p.filter(b).entries.len(), 2);
        // A new spool incarnation starts its own numbering at 1.
        let mut b = batch(&[1, 2]);
        b.incarnation = Some("b7".into());
        assert_eq!(p.filter(b).entries.len(), 2);
    }

    #[test]
    fn unstorable_readings_are_named() {
        let now = datetime!(2026-11-24 12:00 UTC);
        let ok = entry(1).reading;
        assert_eq!(check_storable(&ok, now), Ok(()));
        let mut r = ok.clone();
        r.value = dec!(100000000000000);
        assert_eq!(
            check_storable(&r, now).unwrap_err().code(),
            "value_out_of_range"
        );
        r.value = dec!(-99999999999999.999999);
        assert_eq!(check_storable(&r, now), Ok(()));
        let mut r = ok.clone();
        r.provenance.source_id = "a\0b".into();
        assert_eq!(
            check_storable(&r, now),
            Err(Unstorable::NulByte { field: "source_id" })
        );
        let mut r = ok.clone();
        r.provenance.channel = Some("x".repeat(MAX_TEXT_BYTES + 1));
        assert_eq!(check_storable(&r, now).unwrap_err().code(), "text_too_long");
        let mut r = ok.clone();
        r.ts = datetime!(2099-01-01 00:00 UTC);
        assert_eq!(
            check_storable(&r, now).unwrap_err().code(),
            "timestamp_out_of_range"
        );
        r.ts = now + time::Duration::days(30);
        assert_eq!(check_storable(&r, now), Ok(()));
        r.ts = datetime!(1970-01-01 00:00 UTC);
        assert!(check_storable(&r, now).is_err());
        let mut r = ok;
        r.tariff = 40_000;
        assert_eq!(
            check_storable(&r, now),
            Err(Unstorable::FieldOutOfRange {
                field: "tariff",
                value: 40_000
            })
        );
    }

    #[test]
    fn decode_refuses_unknown_versions_and_garbage() {
        let mut json = serde_json::to_value(batch(&[1])).unwrap();
        assert!(matches!(
            decode_payload(json.to_string().as_bytes()),
            Decoded::Batch(_)
        ));
        json["v"] = serde_json::json!(2);
        assert!(matches!(
            decode_payload(json.to_string().as_bytes()),
            Decoded::UnknownVersion { version: 2 }
        ));
        assert!(matches!(
            decode_payload(b"not json"),
            Decoded::Malformed { .. }
        ));
        assert!(matches!(
            decode_payload(br#"{"v":1}"#),
            Decoded::Malformed { .. }
        ));
        // A later version whose batch no longer parses as this one's is still that version.
        assert!(matches!(
            decode_payload(br#"{"v":3,"readings":[]}"#),
            Decoded::UnknownVersion { version: 3 }
        ));
        assert!(matches!(
            decode_payload(br#"{"v":70000}"#),
            Decoded::UnknownVersion { version: 70000 }
        ));
        // Not JSON: the parser's own words.
        match decode_payload(b"not json") {
            Decoded::Malformed { error } => assert!(error.contains("expected"), "{error}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metrics_render_prometheus_text() {
        let m = IngestMetrics::default();
        IngestMetrics::add(&m.unknown_version, 2);
        assert!(
            m.render()
                .contains("pipeline_batches_unknown_version_total 2\n")
        );
    }
}
