//! The ingest journal: rollups and meter state written behind the ingest transaction.
//!
//! Upserting an hourly bucket, a daily bucket and a `meter_state` row for every reading in the
//! ingest transaction cost three row updates per inserted row (the ingest benchmark spent 70 %
//! of each transaction on them). Instead each ingest transaction appends one compact binary
//! record per partition to `ingest_journal` (the batch's consumption spans and new meter
//! states), in the same transaction as the readings, and the worker keeps them in memory
//! ([`Pending`]). Every few seconds the worker folds the spans it holds into `rollup_daily`
//! and marks their records `folded` (hourly consumption is derived from `readings` on read,
//! see [`super::rollups`]); every half minute, when idle and at
//! shutdown it also checkpoints the meter states into `meter_state` and deletes the records.
//! Each fold is one transaction ([`flush`]), so a span is added to the rollups exactly once
//! whether the worker crashes before, during or after it. On start a worker reads the records
//! of its partitions back ([`recover`]): their states replace the older `meter_state` rows in
//! memory, and the spans not yet folded are folded before it consumes anything.
//!
//! A rollup recomputed from `readings` (an edit, an out-of-order read) already contains every
//! committed read, including those whose spans are still in the journal. The recompute
//! records a reset (`rollup_resets`: meter, span, and the highest journal id it has seen), and
//! a flush skips the journalled spans of that meter and those days up to that id. Writers that
//! recompute outside an ingest transaction take [`lock_out_ingest`] first, so no ingest
//! transaction can commit between the recompute and its reset.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use model::MeterId;
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection, Row};
use time::{Date, OffsetDateTime};

use super::StoreOptions;
use super::error::{StoreError, stage};
use super::{meter_state, rollups};
use crate::detect::MeterDetect;
use crate::vee::{MeterState, Usage};

/// First byte of every journal record: the format version. Version 1 holds meter states and
/// spans; version 2 adds the detectors' states after the spans.
const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;

/// Why a journal record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The record ended inside a field.
    #[error("journal record truncated at byte {offset} reading {field}")]
    Truncated {
        /// Byte offset where more bytes were expected.
        offset: usize,
        /// Field being read.
        field: &'static str,
    },
    /// A field holds a value it cannot hold.
    #[error("journal record has a bad {field} at byte {offset}")]
    Invalid {
        /// Byte offset of the field.
        offset: usize,
        /// Field name.
        field: &'static str,
    },
    /// The first byte is not a known format version.
    #[error("journal record format {0} is unknown (expected {FORMAT_V1} or {FORMAT_V2})")]
    Version(u8),
}

/// The part of one ingest batch that belongs to one partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalEntry {
    /// Partition of every meter in it.
    pub partition: u16,
    /// Consumption spans for the rollups.
    pub usage: Vec<Usage>,
    /// Meter states after the batch.
    pub states: Vec<(Box<str>, MeterState)>,
    /// Detector states after the batch (`crate::detect`), checkpointed to `detector_state`.
    pub detect: Vec<(Box<str>, MeterDetect)>,
}

/// Splits a batch's spans, meter states and detector states by the partition of their meter.
pub fn split(
    usage: Vec<Usage>,
    states: crate::vee::StateMap,
    detect: Vec<(Box<str>, MeterDetect)>,
    partitions: u16,
) -> Vec<JournalEntry> {
    let mut by_partition: HashMap<u16, JournalEntry> = HashMap::new();
    for u in usage {
        let p = model::partition_of(u.meter.as_str(), partitions);
        by_partition
            .entry(p)
            .or_insert_with(|| JournalEntry {
                partition: p,
                ..JournalEntry::default()
            })
            .usage
            .push(u);
    }
    for (m, s) in states {
        let p = model::partition_of(&m, partitions);
        by_partition
            .entry(p)
            .or_insert_with(|| JournalEntry {
                partition: p,
                ..JournalEntry::default()
            })
            .states
            .push((m, s));
    }
    for (m, s) in detect {
        let p = model::partition_of(&m, partitions);
        by_partition
            .entry(p)
            .or_insert_with(|| JournalEntry {
                partition: p,
                ..JournalEntry::default()
            })
            .detect
            .push((m, s));
    }
    let mut out: Vec<JournalEntry> = by_partition.into_values().collect();
    out.sort_unstable_by_key(|e| e.partition);
    out
}

/// Encodes spans and states as one journal record (varints; about 20 bytes per span and 75
/// per state for 20-character meter ids, plus about 60 per detector state). A record without
/// detector states is written in format 1, which older workers read.
pub fn encode(
    usage: &[Usage],
    states: &[(Box<str>, MeterState)],
    detect: &[(Box<str>, MeterDetect)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + usage.len() * 64 + states.len() * 80 + detect.len() * 64);
    out.push(if detect.is_empty() {
        FORMAT_V1
    } else {
        FORMAT_V2
    });
    put_uvarint(&mut out, states.len() as u128);
    for (m, s) in states {
        put_str(&mut out, m);
        put_ivarint(&mut out, i128::from(s.last_ts));
        put_decimal(&mut out, s.last_value);
        put_ivarint(&mut out, i128::from(s.received_lag_s));
        put_uvarint(&mut out, u128::from(s.zero_s));
        out.extend_from_slice(&s.adu.to_bits().to_le_bytes());
        put_uvarint(&mut out, u128::from(s.interval_s));
        put_uvarint(&mut out, u128::from(s.capacity_m3));
        put_uvarint(&mut out, u128::from(s.q3_lph));
        for h in s.hour_profile {
            put_uvarint(&mut out, u128::from(h));
        }
        put_uvarint(&mut out, u128::from(s.reads));
    }
    // A span's meter nearly always has its state in the same record: refer to it by index
    // (1-based; 0 = the id follows inline) instead of repeating the id.
    let index: HashMap<&str, usize, foldhash::fast::RandomState> = states
        .iter()
        .enumerate()
        .map(|(i, (m, _))| (&**m, i + 1))
        .collect();
    put_uvarint(&mut out, usage.len() as u128);
    for u in usage {
        match index.get(u.meter.as_str()) {
            Some(i) => put_uvarint(&mut out, *i as u128),
            None => {
                put_uvarint(&mut out, 0);
                put_str(&mut out, u.meter.as_str());
            }
        }
        put_ivarint(&mut out, i128::from(u.ts.unix_timestamp()));
        put_uvarint(&mut out, u128::from(u.ts.nanosecond()));
        put_decimal(&mut out, u.value);
        put_decimal(&mut out, u.delta);
        out.push(u8::from(u.estimated));
    }
    if !detect.is_empty() {
        put_uvarint(&mut out, detect.len() as u128);
        for (m, d) in detect {
            match index.get(&**m) {
                Some(i) => put_uvarint(&mut out, *i as u128),
                None => {
                    put_uvarint(&mut out, 0);
                    put_str(&mut out, m);
                }
            }
            for v in d.words() {
                put_ivarint(&mut out, v);
            }
        }
    }
    out
}

/// Reads the version byte and the meter states at the start of a record.
fn decode_states(r: &mut Reader<'_>) -> Result<Vec<(Box<str>, MeterState)>, JournalError> {
    let version = r.byte("format version")?;
    if version != FORMAT_V1 && version != FORMAT_V2 {
        return Err(JournalError::Version(version));
    }
    let n_states = r.count("state count")?;
    let mut states = Vec::with_capacity(n_states.min(1 << 16));
    for _ in 0..n_states {
        let meter: Box<str> = r.str("state meter")?.into();
        let last_ts = r.int::<i64>("last_ts")?;
        let last_value = r.decimal("last_value")?;
        let received_lag_s = r.int::<i32>("received_lag_s")?;
        let zero_s = r.uint::<u32>("zero_s")?;
        let adu = f32::from_bits(u32::from_le_bytes(r.array::<4>("adu")?));
        let interval_s = r.uint::<u32>("interval_s")?;
        let capacity_m3 = r.uint::<u32>("capacity_m3")?;
        let q3_lph = r.uint::<u32>("q3_lph")?;
        let mut hour_profile = [0u16; 24];
        for h in &mut hour_profile {
            *h = r.uint::<u16>("hour_profile")?;
        }
        let reads = r.uint::<u16>("reads")?;
        states.push((
            meter,
            MeterState {
                last_ts,
                last_value,
                received_lag_s,
                zero_s,
                adu,
                interval_s,
                capacity_m3,
                q3_lph,
                hour_profile,
                reads,
                detect_slot: crate::vee::NO_SLOT,
            },
        ));
    }
    Ok(states)
}

/// Decodes a record written by [`encode`].
///
/// # Errors
/// Returns [`JournalError`] with the byte offset of the first bad or missing field.
pub fn decode(bytes: &[u8]) -> Result<JournalEntry, JournalError> {
    let mut r = Reader { bytes, at: 0 };
    let states = decode_states(&mut r)?;
    let n_usage = r.count("span count")?;
    let mut usage = Vec::with_capacity(n_usage.min(1 << 16));
    for _ in 0..n_usage {
        let at = r.at;
        let meter = match r.uint::<usize>("span meter")? {
            0 => r.str("span meter")?,
            i => states
                .get(i - 1)
                .map(|(m, _)| &**m)
                .ok_or(JournalError::Invalid {
                    offset: at,
                    field: "span meter",
                })?,
        };
        let meter = MeterId::new(meter).map_err(|_| JournalError::Invalid {
            offset: at,
            field: "span meter",
        })?;
        let at = r.at;
        let secs = r.int::<i64>("span ts")?;
        let nanos = r.uint::<u32>("span ts")?;
        let ts = OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| t.replace_nanosecond(nanos).ok())
            .ok_or(JournalError::Invalid {
                offset: at,
                field: "span ts",
            })?;
        let value = r.decimal("span value")?;
        let delta = r.decimal("span delta")?;
        let estimated = match r.byte("span estimated")? {
            0 => false,
            1 => true,
            _ => {
                return Err(JournalError::Invalid {
                    offset: r.at - 1,
                    field: "span estimated",
                });
            }
        };
        usage.push(Usage {
            meter,
            ts,
            value,
            delta,
            estimated,
        });
    }
    let mut detect = Vec::new();
    if bytes.first() == Some(&FORMAT_V2) {
        let n = r.count("detector state count")?;
        detect.reserve(n.min(1 << 16));
        for _ in 0..n {
            let at = r.at;
            let meter: Box<str> = match r.uint::<usize>("detector meter")? {
                0 => r.str("detector meter")?.into(),
                i => states
                    .get(i - 1)
                    .map(|(m, _)| m.clone())
                    .ok_or(JournalError::Invalid {
                        offset: at,
                        field: "detector meter",
                    })?,
            };
            let at = r.at;
            let mut words = [0i128; MeterDetect::WORDS];
            for w in &mut words {
                *w = r.ivarint("detector state")?;
            }
            let d = MeterDetect::from_words(&words).ok_or(JournalError::Invalid {
                offset: at,
                field: "detector state",
            })?;
            detect.push((meter, d));
        }
    }
    if r.at != bytes.len() {
        return Err(JournalError::Invalid {
            offset: r.at,
            field: "end of record",
        });
    }
    Ok(JournalEntry {
        partition: 0,
        usage,
        states,
        detect,
    })
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_ivarint(out: &mut Vec<u8>, v: i128) {
    put_uvarint(out, ((v << 1) ^ (v >> 127)) as u128);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uvarint(out, s.len() as u128);
    out.extend_from_slice(s.as_bytes());
}

fn put_decimal(out: &mut Vec<u8>, d: Decimal) {
    // rust_decimal's scale is at most 28: one byte.
    out.push(d.scale() as u8);
    put_ivarint(out, d.mantissa());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self, field: &'static str) -> Result<u8, JournalError> {
        let b = *self.bytes.get(self.at).ok_or(JournalError::Truncated {
            offset: self.at,
            field,
        })?;
        self.at += 1;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], JournalError> {
        let slice = self
            .bytes
            .get(self.at..self.at + N)
            .ok_or(JournalError::Truncated {
                offset: self.at,
                field,
            })?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn uvarint(&mut self, field: &'static str) -> Result<u128, JournalError> {
        let start = self.at;
        let mut v: u128 = 0;
        for shift in (0..128).step_by(7) {
            let b = self.byte(field)?;
            v |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(JournalError::Invalid {
            offset: start,
            field,
        })
    }

    fn ivarint(&mut self, field: &'static str) -> Result<i128, JournalError> {
        let u = self.uvarint(field)?;
        Ok(((u >> 1) as i128) ^ -((u & 1) as i128))
    }

    fn uint<T: TryFrom<u128>>(&mut self, field: &'static str) -> Result<T, JournalError> {
        let offset = self.at;
        T::try_from(self.uvarint(field)?).map_err(|_| JournalError::Invalid { offset, field })
    }

    fn int<T: TryFrom<i128>>(&mut self, field: &'static str) -> Result<T, JournalError> {
        let offset = self.at;
        T::try_from(self.ivarint(field)?).map_err(|_| JournalError::Invalid { offset, field })
    }

    fn count(&mut self, field: &'static str) -> Result<usize, JournalError> {
        let offset = self.at;
        let n = self.uint::<usize>(field)?;
        // Every item takes at least one byte: a count beyond the rest is corrupt.
        if n > self.bytes.len() - self.at {
            return Err(JournalError::Invalid { offset, field });
        }
        Ok(n)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, JournalError> {
        let offset = self.at;
        let len = self.count(field)?;
        let slice = &self.bytes[self.at..self.at + len];
        self.at += len;
        std::str::from_utf8(slice).map_err(|_| JournalError::Invalid { offset, field })
    }

    fn decimal(&mut self, field: &'static str) -> Result<Decimal, JournalError> {
        let offset = self.at;
        let scale = u32::from(self.byte(field)?);
        let mantissa = self.ivarint(field)?;
        Decimal::try_from_i128_with_scale(mantissa, scale)
            .map_err(|_| JournalError::Invalid { offset, field })
    }
}

/// Journal records committed by this worker and not yet folded, or folded into the rollups
/// but still holding meter states that no checkpoint has written yet.
#[derive(Debug, Default)]
pub struct Pending {
    /// Spans of each record not yet folded into the rollups, by journal id.
    records: Vec<(i64, Vec<Usage>)>,
    /// Records whose spans are in the rollups, kept for their meter states.
    folded: Vec<i64>,
    /// Latest state of every meter touched since the last checkpoint.
    states: crate::vee::StateMap,
    /// Latest detector state of every meter touched since the last checkpoint.
    detect: HashMap<Box<str>, MeterDetect, foldhash::fast::RandomState>,
    spans: usize,
    since: Option<Instant>,
    states_since: Option<Instant>,
}

impl Pending {
    /// Takes in the entries of a committed batch with their journal ids.
    pub fn add(&mut self, entries: Vec<(i64, JournalEntry)>) {
        for (id, e) in entries {
            self.spans += e.usage.len();
            self.states.extend(e.states);
            self.detect.extend(e.detect);
            self.records.push((id, e.usage));
        }
        let now = Instant::now();
        if !self.records.is_empty() {
            self.since.get_or_insert(now);
        }
        if !self.states.is_empty() || !self.detect.is_empty() {
            self.states_since.get_or_insert(now);
        }
    }

    /// Takes in a record read back whose spans were already folded into the rollups.
    fn add_folded(
        &mut self,
        id: i64,
        states: Vec<(Box<str>, MeterState)>,
        detect: Vec<(Box<str>, MeterDetect)>,
    ) {
        self.states.extend(states);
        self.detect.extend(detect);
        self.folded.push(id);
        self.states_since.get_or_insert_with(Instant::now);
    }

    /// Returns true when nothing waits: no spans and no unwritten states.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.folded.is_empty()
    }

    /// The latest journalled state of every meter waiting for a checkpoint.
    pub fn states(&self) -> impl Iterator<Item = (&str, &MeterState)> {
        self.states.iter().map(|(m, s)| (&**m, s))
    }

    /// The latest journalled detector state of every meter waiting for a checkpoint.
    pub fn detector_states(&self) -> impl Iterator<Item = (&str, &MeterDetect)> {
        self.detect.iter().map(|(m, s)| (&**m, s))
    }

    /// Spans waiting for the rollups.
    pub fn spans(&self) -> usize {
        self.spans
    }

    /// Returns true when spans have waited `interval`, or more than `max_spans` wait.
    pub fn due(&self, interval: Duration, max_spans: usize) -> bool {
        self.spans >= max_spans || self.since.is_some_and(|t| t.elapsed() >= interval)
    }

    /// Returns true when meter states have waited `interval` for a checkpoint.
    pub fn states_due(&self, interval: Duration) -> bool {
        self.states_since.is_some_and(|t| t.elapsed() >= interval)
    }
}

/// What a flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Journal records whose spans were folded into the rollups.
    pub records: usize,
    /// Journal records deleted (a checkpoint deletes every record it covers).
    pub deleted: usize,
    /// Spans added to the rollups.
    pub spans: usize,
    /// Spans skipped because a recompute already counted them.
    pub skipped: usize,
    /// Meter states written (only by a checkpoint).
    pub states: usize,
    /// Detector states written (only by a checkpoint).
    pub detector_states: usize,
    /// Milliseconds spent upserting the rollups.
    pub rollups_ms: u64,
    /// Milliseconds spent writing states and deleting or marking the records.
    pub records_ms: u64,
}

/// Inserts a batch's journal entries (one record each); returns their journal ids in order.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the insert fails.
pub async fn append(
    conn: &mut PgConnection,
    entries: &[JournalEntry],
) -> Result<Vec<i64>, StoreError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let partitions: Vec<i32> = entries.iter().map(|e| i32::from(e.partition)).collect();
    let payloads: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| encode(&e.usage, &e.states, &e.detect))
        .collect();
    let rows = sqlx::query(
        "INSERT INTO ingest_journal (partition, payload)
         SELECT p, b FROM UNNEST($1::int4[], $2::bytea[]) WITH ORDINALITY AS u(p, b, n)
         ORDER BY n
         RETURNING journal_id, partition",
    )
    .bind(&partitions)
    .bind(payloads)
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("appending to the ingest journal"))?;
    // Partitions are unique within a batch: map the returned ids back by partition.
    let mut by_partition = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get(0).map_err(stage("reading journal ids back"))?;
        let p: i32 = row.try_get(1).map_err(stage("reading journal ids back"))?;
        by_partition.insert(p, id);
    }
    Ok(partitions
        .iter()
        .map(|p| by_partition.get(p).copied().unwrap_or_default())
        .collect())
}

/// Blocks ingest transactions (and flushes) until the caller's transaction ends, so that a
/// rollup recompute and its reset see the same journal. Call it first in the transaction,
/// before any row is locked.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the lock cannot be taken.
pub async fn lock_out_ingest(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("LOCK TABLE ingest_journal IN SHARE MODE")
        .execute(&mut *conn)
        .await
        .map_err(stage("locking the ingest journal"))?;
    Ok(())
}

/// A recompute a flush must respect.
struct Reset {
    from_day: Date,
    to_day: Date,
    upto: i64,
}

/// Folds the spans `pending` holds into the rollups and marks their records folded, in one
/// transaction with the resets it applied; with `checkpoint`, also writes the meter states to
/// `meter_state` and deletes every record they came from. Rollups are folded often (they are
/// what dashboards read); states, one row per meter touched, only at checkpoints. `pending`
/// changes only when the transaction commits; on error it is kept for the next attempt.
///
/// # Errors
/// Returns [`StoreError::Stage`] naming the statement that failed.
pub async fn flush(
    conn: &mut PgConnection,
    pending: &mut Pending,
    options: StoreOptions,
    owns: impl Fn(&str) -> bool,
    checkpoint: bool,
) -> Result<FlushStats, StoreError> {
    let states_to_write = checkpoint && !pending.folded.is_empty();
    if pending.records.is_empty() && !states_to_write {
        return Ok(FlushStats::default());
    }
    let mut tx = conn.begin().await.map_err(stage("beginning a flush"))?;
    // Waits for edits holding SHARE (see lock_out_ingest) before any rollup row is touched.
    sqlx::query("LOCK TABLE ingest_journal IN ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(stage("locking the ingest journal"))?;
    let rows =
        sqlx::query("SELECT reset_id, meter_id, from_ts, to_ts, journal_upto FROM rollup_resets")
            .fetch_all(&mut *tx)
            .await
            .map_err(stage("loading rollup resets"))?;
    let mut reset_ids = Vec::new();
    let mut resets: HashMap<String, Vec<Reset>> = HashMap::new();
    for row in rows {
        let meter: String = row.try_get(1).map_err(stage("reading rollup resets"))?;
        if !owns(&meter) {
            continue;
        }
        reset_ids.push(
            row.try_get::<i64, _>(0)
                .map_err(stage("reading rollup resets"))?,
        );
        let from: OffsetDateTime = row.try_get(2).map_err(stage("reading rollup resets"))?;
        let to: OffsetDateTime = row.try_get(3).map_err(stage("reading rollup resets"))?;
        resets.entry(meter).or_default().push(Reset {
            from_day: from.to_offset(options.day_offset).date(),
            to_day: to.to_offset(options.day_offset).date(),
            upto: row.try_get(4).map_err(stage("reading rollup resets"))?,
        });
    }
    let mut stats = FlushStats {
        records: pending.records.len(),
        ..FlushStats::default()
    };
    let counted: Vec<&Usage> = pending
        .records
        .iter()
        .flat_map(|(id, usage)| {
            let resets = &resets;
            usage.iter().filter(move |u| {
                resets.get(u.meter.as_str()).is_none_or(|rs| {
                    let day = u.ts.to_offset(options.day_offset).date();
                    !rs.iter()
                        .any(|r| *id <= r.upto && r.from_day <= day && day <= r.to_day)
                })
            })
        })
        .collect();
    let started = Instant::now();
    let spans = rollups::write_rollups(&mut tx, &counted, options).await?;
    stats.rollups_ms = started.elapsed().as_millis() as u64;
    stats.spans = spans;
    stats.skipped = pending.spans - spans;
    let ids: Vec<i64> = pending.records.iter().map(|(id, _)| *id).collect();
    if checkpoint {
        meter_state::write_states(&mut tx, &pending.states).await?;
        stats.states = pending.states.len();
        stats.detector_states =
            crate::detect::store::write_states(&mut tx, pending.detector_states()).await?;
        let all: Vec<i64> = ids.iter().chain(&pending.folded).copied().collect();
        sqlx::query("DELETE FROM ingest_journal WHERE journal_id = ANY($1)")
            .bind(&all)
            .execute(&mut *tx)
            .await
            .map_err(stage("deleting checkpointed journal records"))?;
        stats.deleted = all.len();
    } else {
        sqlx::query("UPDATE ingest_journal SET folded = true WHERE journal_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(stage("marking journal records folded"))?;
    }
    stats.records_ms = (started.elapsed().as_millis() as u64).saturating_sub(stats.rollups_ms);
    if !reset_ids.is_empty() {
        sqlx::query("DELETE FROM rollup_resets WHERE reset_id = ANY($1)")
            .bind(&reset_ids)
            .execute(&mut *tx)
            .await
            .map_err(stage("deleting applied rollup resets"))?;
    }
    tx.commit().await.map_err(stage("committing a flush"))?;
    if checkpoint {
        *pending = Pending::default();
    } else {
        pending.folded.extend(ids);
        pending.records.clear();
        pending.spans = 0;
        pending.since = None;
    }
    Ok(stats)
}

/// The newest state of `meter` still in the journal (not yet checkpointed to `meter_state`),
/// for writers outside the worker (manual reads). Call it after [`lock_out_ingest`] so no
/// record commits meanwhile. Reads records newest first and stops at the first that has the
/// meter; only their state sections are decoded.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the query fails, [`StoreError::Journal`] for a record
/// that cannot be decoded.
pub async fn latest_state(
    conn: &mut PgConnection,
    meter: &str,
) -> Result<Option<MeterState>, StoreError> {
    use futures::TryStreamExt;
    let mut rows =
        sqlx::query("SELECT journal_id, payload FROM ingest_journal ORDER BY journal_id DESC")
            .fetch(&mut *conn);
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(stage("reading the ingest journal"))?
    {
        let id: i64 = row
            .try_get(0)
            .map_err(stage("reading the ingest journal"))?;
        let payload: Vec<u8> = row
            .try_get(1)
            .map_err(stage("reading the ingest journal"))?;
        let states = decode_states(&mut Reader {
            bytes: &payload,
            at: 0,
        })
        .map_err(|source| StoreError::Journal { id, source })?;
        if let Some((_, s)) = states.into_iter().find(|(m, _)| &**m == meter) {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Reads back the journal records of `partitions` left by a stopped or crashed worker, in
/// commit order, for [`flush`]; their meter states are returned too, to apply over the ones
/// loaded from `meter_state`.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the query fails, [`StoreError::Journal`] for a record
/// that cannot be decoded (it is left in place).
pub async fn recover(conn: &mut PgConnection, partitions: &[u16]) -> Result<Pending, StoreError> {
    let partitions: Vec<i32> = partitions.iter().map(|p| i32::from(*p)).collect();
    let rows = sqlx::query(
        "SELECT journal_id, partition, folded, payload FROM ingest_journal
         WHERE partition = ANY($1) ORDER BY journal_id",
    )
    .bind(&partitions)
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("reading the ingest journal"))?;
    let mut pending = Pending::default();
    for row in rows {
        let id: i64 = row
            .try_get(0)
            .map_err(stage("reading the ingest journal"))?;
        let partition: i32 = row
            .try_get(1)
            .map_err(stage("reading the ingest journal"))?;
        let folded: bool = row
            .try_get(2)
            .map_err(stage("reading the ingest journal"))?;
        let payload: Vec<u8> = row
            .try_get(3)
            .map_err(stage("reading the ingest journal"))?;
        let mut entry = decode(&payload).map_err(|source| StoreError::Journal { id, source })?;
        entry.partition = u16::try_from(partition).unwrap_or_default();
        if folded {
            pending.add_folded(id, entry.states, entry.detect);
        } else {
            pending.add(vec![(id, entry)]);
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_state(rng: &mut impl Rng) -> MeterState {
        let mut s = MeterState::new(rng.random(), rng.random());
        s.last_ts = rng.random();
        s.last_value = Decimal::new(rng.random::<i64>(), rng.random_range(0..=28));
        s.received_lag_s = rng.random();
        s.zero_s = rng.random();
        s.adu = rng.random::<f32>() * 10.0;
        s.interval_s = rng.random();
        for h in &mut s.hour_profile {
            *h = rng.random();
        }
        s.reads = rng.random();
        s
    }

    fn random_usage(rng: &mut impl Rng) -> Usage {
        Usage {
            meter: MeterId::new(format!("cjt188:{:014}", rng.random_range(0..1_000_000u64)))
                .unwrap(),
            ts: OffsetDateTime::from_unix_timestamp(rng.random_range(0..4_000_000_000i64))
                .unwrap()
                .replace_nanosecond(rng.random_range(0..1_000_000_000))
                .unwrap(),
            value: Decimal::new(rng.random_range(0..100_000_000_000i64), 6),
            delta: Decimal::new(rng.random_range(-1_000_000i64..1_000_000_000), 6),
            estimated: rng.random(),
        }
    }

    #[test]
    fn records_round_trip_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [0usize, 1, 2, 17, 300] {
            let usage: Vec<Usage> = (0..n).map(|_| random_usage(&mut rng)).collect();
            // Half the spans' meters have a state in the record (referenced by index), the
            // others not (id inline), plus states without spans.
            let mut states: Vec<(Box<str>, MeterState)> = usage
                .iter()
                .step_by(2)
                .map(|u| (u.meter.as_str().into(), random_state(&mut rng)))
                .collect();
            states.sort_by(|a, b| a.0.cmp(&b.0));
            states.dedup_by(|a, b| a.0 == b.0);
            states.extend((0..n / 3).map(|i| (format!("m{i}").into(), random_state(&mut rng))));
            let bytes = encode(&usage, &states, &[]);
            assert_eq!(bytes[0], FORMAT_V1, "no detector states: the older format");
            let back = decode(&bytes).unwrap();
            assert_eq!(back.usage, usage);
            assert_eq!(back.states, states);
            // With detector states: of meters with a state (by index) and without (inline).
            let detect: Vec<(Box<str>, MeterDetect)> = states
                .iter()
                .map(|(m, _)| m.clone())
                .chain((0..n / 4).map(|i| format!("d{i}").into()))
                .map(|m| (m, MeterDetect::random(&mut rng)))
                .collect();
            let bytes = encode(&usage, &states, &detect);
            let back = decode(&bytes).unwrap();
            assert_eq!(back.usage, usage);
            assert_eq!(back.states, states);
            assert_eq!(back.detect, detect);
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_a_typed_error() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let usage: Vec<Usage> = (0..5).map(|_| random_usage(&mut rng)).collect();
        let states = vec![("m1".into(), random_state(&mut rng))];
        let detect = vec![
            ("m1".into(), MeterDetect::random(&mut rng)),
            ("m2".into(), MeterDetect::random(&mut rng)),
        ];
        let bytes = encode(&usage, &states, &detect);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(JournalError::Invalid {
                offset: bytes.len(),
                field: "end of record"
            })
        );
        assert_eq!(decode(&[3]), Err(JournalError::Version(3)));
        // Random bytes never panic.
        for _ in 0..2000 {
            let mut b = bytes.clone();
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
            if let Ok(e) = decode(&b) {
                assert!(e.usage.len() + e.states.len() <= b.len());
            }
        }
    }

    #[test]
    fn split_groups_by_meter_partition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let usage: Vec<Usage> = (0..200).map(|_| random_usage(&mut rng)).collect();
        let states: crate::vee::StateMap = usage
            .iter()
            .map(|u| (u.meter.as_str().into(), MeterState::new(1, 1)))
            .collect();
        let detect: Vec<(Box<str>, MeterDetect)> = states
            .keys()
            .map(|m| (m.clone(), MeterDetect::random(&mut rng)))
            .collect();
        let entries = split(usage.clone(), states.clone(), detect.clone(), 16);
        let mut spans = 0;
        let mut seen_states = 0;
        let mut seen_detect = 0;
        for e in &entries {
            seen_detect += e.detect.len();
            assert!(
                e.detect
                    .iter()
                    .all(|(m, _)| model::partition_of(m, 16) == e.partition)
            );
            spans += e.usage.len();
            seen_states += e.states.len();
            assert!(
                e.usage
                    .iter()
                    .all(|u| model::partition_of(u.meter.as_str(), 16) == e.partition)
            );
            assert!(
                e.states
                    .iter()
                    .all(|(m, _)| model::partition_of(m, 16) == e.partition)
            );
        }
        assert_eq!(spans, usage.len());
        assert_eq!(seen_states, states.len());
        assert_eq!(seen_detect, detect.len());
    }
}
