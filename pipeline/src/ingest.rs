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
    format!("{root}/readings/{partition}")
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

/// Decodes one MQTT payload, checking the wire version before the full structure so that a
/// newer gateway's batch is refused as such and not reported as malformed.
pub fn decode_payload(payload: &[u8]) -> Decoded {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        v: u64,
    }
    match serde_json::from_slice::<VersionOnly>(payload) {
        Ok(VersionOnly { v }) if v != u64::from(WIRE_VERSION) => {
            return Decoded::UnknownVersion { version: v };
        }
        Ok(_) => {}
        Err(e) => {
            return Decoded::Malformed {
                error: e.to_string(),
            };
        }
    }
    match serde_json::from_slice::<ReadingBatch>(payload) {
        Ok(batch) => Decoded::Batch(batch),
        Err(e) => Decoded::Malformed {
            error: e.to_string(),
        },
    }
}

/// Highest committed spool sequence per (gateway, partition), as in table `ingest_progress`.
///
/// The worker keeps the committed view and works on a copy per database transaction, so a
/// failed transaction leaves the committed view untouched.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    max_seq: HashMap<(String, u16), i64>,
}

impl Progress {
    /// Returns the highest committed sequence, if known.
    pub fn get(&self, gateway: &str, partition: u16) -> Option<i64> {
        self.max_seq.get(&(gateway.to_owned(), partition)).copied()
    }

    /// Returns true when the pair has been loaded or written.
    pub fn knows(&self, gateway: &str, partition: u16) -> bool {
        self.max_seq.contains_key(&(gateway.to_owned(), partition))
    }

    /// Records a loaded or committed value (a missing row is recorded as -1).
    pub fn set(&mut self, gateway: &str, partition: u16, seq: i64) {
        self.max_seq.insert((gateway.to_owned(), partition), seq);
    }

    /// Removes entries already committed (sequence at or below the recorded maximum) and entries
    /// out of sequence order within the batch; advances the maximum. Returns the entries to
    /// process and how many were dropped.
    pub fn filter(&mut self, batch: ReadingBatch) -> (Vec<BatchEntry>, u64) {
        let key = (batch.gateway.as_str().to_owned(), batch.partition);
        let mut max = self.max_seq.get(&key).copied().unwrap_or(-1);
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
        (keep, dropped)
    }

    /// Iterates over (gateway, partition, max_seq).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u16, i64)> {
        self.max_seq.iter().map(|((g, p), s)| (g.as_str(), *p, *s))
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
            (metric::CONFLICTS, &self.conflicts),
            (metric::STORED, &self.stored),
            (metric::ESTIMATED, &self.estimated),
            (metric::REJECTED, &self.rejected),
            (metric::COMMITS, &self.commits),
            (metric::COMMIT_FAILURES, &self.commit_failures),
            (metric::FLUSHES, &self.flushes),
            (metric::FLUSH_FAILURES, &self.flush_failures),
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
        let (keep, dropped) = p.filter(batch(&[1, 2, 3]));
        assert_eq!((keep.len(), dropped), (3, 0));
        assert_eq!(p.get("gw", 2), Some(3));
        let (keep, dropped) = p.filter(batch(&[2, 3, 4, 4, 5]));
        assert_eq!(keep.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(dropped, 3);
        assert_eq!(p.get("gw", 1), None);
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
