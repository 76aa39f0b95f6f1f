//! Crash-safe, bounded, segmented append-only spool of readings (see docs/reliability.md).
//!
//! Layout: a directory of segment files `<first seq, 20 digits>.seg`. Each record is
//! `[len u32 LE][crc32 u32 LE][payload]` with payload `[seq u64 LE][meter len u16 LE][meter
//! id][BatchEntry JSON]`. The meter id is stored beside the JSON so the uplink can partition
//! and splice entries into batches without parsing them again.
//!
//! - The writer ([`SpoolWriter`]) appends a group of readings, then `fsync`s, then publishes the
//!   new durable length; only then are the submitters answered (group commit).
//! - On open every segment is scanned; the first record whose length or CRC does not check
//!   (a torn write after a crash) is cut off together with everything after it.
//! - The uplink reads durable records through a [`Cursor`] and acknowledges sequence numbers
//!   after the broker's PUBACK; a segment whose records are all acknowledged is deleted.
//!   Acknowledgements are tracked per record in memory; the *watermark* (every seq below it
//!   acknowledged) is persisted in `acked.watermark` (written at most once a second and when
//!   everything is acknowledged, atomically by rename, not fsynced). On open the records below
//!   it count as acknowledged, so after a restart only what was acknowledged out of order
//!   above the watermark, or after its last save, is sent again (at-least-once; the pipeline
//!   deduplicates by `seq`).
//! - Past `max_bytes` the oldest segments are evicted even if unacknowledged, counted in
//!   [`SpoolStats::evicted`] and logged as an error.
//! - Identity (issue 25): sequence numbers are unique per *incarnation*, a random id kept in
//!   `incarnation` and created with a fresh spool directory (or replaced by
//!   [`Spool::rotate_incarnation`]). Numbers handed out are reserved ahead in `seq.reserve`
//!   (fsynced before use), so when recovery had to drop records (a torn or corrupt tail)
//!   numbering resumes above every number ever issued instead of reusing the dropped ones,
//!   which the pipeline may already have committed. A corrupt record in the middle of a
//!   segment costs only itself: recovery resynchronises on the next intact record, rewrites
//!   the segment without the bad bytes and counts the gap as acknowledged.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use model::Reading;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::sink::{SinkError, SubmitRequest};

/// Bytes of the record header (`len` and `crc32`).
const HEADER: usize = 8;
/// Largest payload accepted when scanning; anything larger is treated as corruption.
const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Fixed part of a payload before the meter id (`seq` and meter id length).
const PAYLOAD_PREFIX: usize = 10;

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool I/O on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A reading could not be serialised (should not happen for valid readings).
    #[error("spool could not serialise a reading: {0}")]
    Serialise(#[from] serde_json::Error),
    /// A meter id longer than the record format allows.
    #[error("meter id of {0} bytes is longer than the spool record allows")]
    MeterIdTooLong(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Spool settings.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the segment files (created if missing).
    pub dir: PathBuf,
    /// Bound on the total size of all segments; past it the oldest segments are evicted.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
}

impl SpoolConfig {
    /// Settings with a segment size derived from the bound (1/8 of it, 64 KiB..64 MiB).
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        let segment_bytes = (max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024);
        Self {
            dir: dir.into(),
            max_bytes,
            segment_bytes,
        }
    }
}

/// Counters and gauges of the spool, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Durable records not yet acknowledged by the uplink.
    pub depth: u64,
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Number of segment files.
    pub segments: usize,
    /// Unacknowledged records evicted because the spool exceeded its bound.
    pub evicted: u64,
    /// Torn or corrupt records cut off when the spool was opened.
    pub truncated: u64,
    /// Next sequence number to be assigned.
    pub next_seq: u64,
    /// Records acknowledged by the uplink since start.
    pub acked: u64,
    /// Intact records found after a corrupt one (and kept) when the spool was opened.
    pub resynced: u64,
    /// Group commits that failed (disk full, I/O error) since start; their submitters were
    /// refused, so their devices keep the readings and send them again.
    pub write_errors: u64,
}

/// One durable record as the uplink reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledEntry {
    /// Spool sequence number.
    pub seq: u64,
    /// Meter id of the reading (for partitioning).
    pub meter: String,
    /// `model::BatchEntry` JSON.
    pub json: Vec<u8>,
}

/// Read position of the uplink in the spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    segment: u64,
    offset: u64,
}

impl Cursor {
    /// The oldest record still in the spool (replay position after a reconnect).
    pub fn start() -> Self {
        Self::default()
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    /// Durable records in the file.
    count: u64,
    /// Durable length in bytes.
    len: u64,
    /// One bit per record: acknowledged by the uplink.
    acked: Vec<u64>,
    acked_count: u64,
}

impl Segment {
    fn is_acked(&self, seq: u64) -> bool {
        let i = seq - self.first_seq;
        let word = usize::try_from(i / 64).unwrap_or(usize::MAX);
        self.acked
            .get(word)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// Marks `seq` acknowledged; returns false when it already was or is not durable here.
    fn ack(&mut self, seq: u64) -> bool {
        if seq < self.first_seq || seq >= self.first_seq + self.count {
            return false;
        }
        let i = seq - self.first_seq;
        let word = usize::try_from(i / 64).unwrap_or(usize::MAX);
        if self.acked.len() <= word {
            self.acked.resize(word + 1, 0);
        }
        let Some(w) = self.acked.get_mut(word) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.acked_count += 1;
        true
    }
}

#[derive(Debug, Default)]
struct Index {
    /// Segments by first sequence number; the last one is the writer's active segment.
    segments: BTreeMap<u64, Segment>,
    stats: SpoolStats,
    /// Where the acknowledgement watermark is saved.
    watermark_path: PathBuf,
    watermark_saved: Option<std::time::Instant>,
    /// The spool's incarnation id (file [`INCARNATION_FILE`]).
    incarnation: String,
    /// Directory of the spool (for rotating the incarnation).
    dir: PathBuf,
}

/// File holding the spool's incarnation id.
const INCARNATION_FILE: &str = "incarnation";
/// File holding the sequence reservation: every number below it may have been handed out.
const RESERVE_FILE: &str = "seq.reserve";
/// Numbers reserved at a time (one small fsynced write per million readings).
const RESERVE_STEP: u64 = 1_000_000;

/// A new random incarnation id: 16 hex digits from the process's random hasher keys, the
/// clock and the process id (no RNG dependency needed for an id that only has to differ).
fn new_incarnation() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Writes `text` to `path` durably (temporary file, fsync, rename, directory fsync).
fn write_durable(dir: &Path, path: &Path, text: &str) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// File holding the acknowledgement watermark: every seq below it was PUBACKed.
const WATERMARK_FILE: &str = "acked.watermark";

impl Index {
    /// The lowest durable sequence number not yet acknowledged (or the next to be written).
    fn watermark(&self) -> u64 {
        for seg in self.segments.values() {
            if seg.acked_count == seg.count {
                continue;
            }
            return (seg.first_seq..seg.first_seq + seg.count)
                .find(|q| !seg.is_acked(*q))
                .unwrap_or(seg.first_seq + seg.count);
        }
        self.stats.next_seq
    }

    /// Saves the watermark at most once a second (and whenever everything is acknowledged).
    /// Not synced: a lost update only means a few batches are sent again after a restart.
    fn save_watermark(&mut self) {
        let due = self
            .watermark_saved
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if !due && self.stats.depth != 0 {
            return;
        }
        let tmp = self.watermark_path.with_extension("tmp");
        let result = fs::write(&tmp, self.watermark().to_string())
            .and_then(|()| fs::rename(&tmp, &self.watermark_path));
        if let Err(e) = result {
            tracing::warn!(path = %self.watermark_path.display(), error = %e, "could not save the spool ack watermark");
        }
        self.watermark_saved = Some(std::time::Instant::now());
    }

    fn active_key(&self) -> Option<u64> {
        self.segments.keys().next_back().copied()
    }

    fn refresh_gauges(&mut self) {
        self.stats.bytes = self.segments.values().map(|s| s.len).sum();
        self.stats.depth = self
            .segments
            .values()
            .map(|s| s.count - s.acked_count)
            .sum();
        self.stats.segments = self.segments.len();
    }

    /// Deletes closed segments whose records are all acknowledged.
    fn delete_acked(&mut self) {
        let active = self.active_key();
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(k, s)| Some(**k) != active && s.acked_count == s.count)
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            if let Some(seg) = self.segments.remove(&k)
                && let Err(e) = fs::remove_file(&seg.path)
            {
                tracing::warn!(path = %seg.path.display(), error = %e, "could not delete acknowledged spool segment");
            }
        }
    }

    /// Evicts the oldest closed segments until the total size is within `max_bytes`.
    fn evict(&mut self, max_bytes: u64) {
        let active = self.active_key();
        loop {
            let total: u64 = self.segments.values().map(|s| s.len).sum();
            if total <= max_bytes {
                break;
            }
            let Some(oldest) = self.segments.keys().next().copied() else {
                break;
            };
            if Some(oldest) == active {
                break;
            }
            if let Some(seg) = self.segments.remove(&oldest) {
                let lost = seg.count - seg.acked_count;
                self.stats.evicted += lost;
                tracing::error!(
                    alarm = "spool_overflow",
                    path = %seg.path.display(),
                    lost,
                    evicted_total = self.stats.evicted,
                    "spool over its size bound: evicted the oldest segment with unacknowledged readings"
                );
                if let Err(e) = fs::remove_file(&seg.path) {
                    tracing::warn!(path = %seg.path.display(), error = %e, "could not delete evicted spool segment");
                }
            }
        }
    }
}

/// Shared handle on the spool: reading and acknowledging (uplink), statistics (metrics).
#[derive(Debug, Clone)]
pub struct Spool {
    index: Arc<Mutex<Index>>,
    notify: Arc<Notify>,
}

/// The single writer of a spool; see [`spawn_writer`].
#[derive(Debug)]
pub struct SpoolWriter {
    config: SpoolConfig,
    file: BufWriter<File>,
    active_first: u64,
    active_len: u64,
    active_count: u64,
    next_seq: u64,
    /// Length of the active segment at the last successful sync (rollback point).
    durable_len: u64,
    spool: Spool,
    buf: Vec<u8>,
    /// Numbers below this are reserved in [`RESERVE_FILE`].
    reserved: u64,
}

#[derive(Serialize)]
struct EntryRef<'a> {
    seq: u64,
    reading: &'a Reading,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

fn lock(m: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // The index is updated in small steps that keep it consistent; a panic elsewhere must not
    // stop the uplink from draining the spool.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A record parsed out of a byte buffer.
struct Parsed<'a> {
    seq: u64,
    meter: &'a [u8],
    json: &'a [u8],
    /// Bytes consumed (header + payload).
    size: usize,
}

/// Parses one record at the start of `buf`; `None` when incomplete, torn or corrupt.
fn parse_record(buf: &[u8]) -> Option<Parsed<'_>> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    if len > MAX_PAYLOAD || (len as usize) < PAYLOAD_PREFIX {
        return None;
    }
    let size = HEADER + len as usize;
    let payload = buf.get(HEADER..size)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let mlen = u16::from_le_bytes(payload.get(8..10)?.try_into().ok()?) as usize;
    let meter = payload.get(PAYLOAD_PREFIX..PAYLOAD_PREFIX + mlen)?;
    let json = payload.get(PAYLOAD_PREFIX + mlen..)?;
    Some(Parsed {
        seq,
        meter,
        json,
        size,
    })
}

/// Most records a corrupt region may hide before resynchronisation gives up on a candidate.
const RESYNC_SEQ_WINDOW: u64 = 1 << 24;

/// True when `buf` could start a record numbered in `next..next + RESYNC_SEQ_WINDOW` that fits.
fn plausible(buf: &[u8], next: u64) -> bool {
    let (Some(len), Some(seq)) = (buf.get(0..4), buf.get(8..16)) else {
        return false;
    };
    let len = u32::from_le_bytes(len.try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(seq.try_into().unwrap_or_default());
    len <= MAX_PAYLOAD
        && len as usize >= PAYLOAD_PREFIX
        && HEADER + len as usize <= buf.len()
        && seq >= next
        && seq - next < RESYNC_SEQ_WINDOW
}

/// What recovery found in one segment file.
#[derive(Debug, Default, PartialEq, Eq)]
struct Recovered {
    /// Sequence span: last intact seq + 1 - first seq (0 when empty).
    span: u64,
    /// Bytes of intact records kept.
    len: u64,
    /// Sequence numbers inside the span whose records were lost (counted as acknowledged).
    holes: Vec<u64>,
    /// True when bytes were dropped (torn tail or corrupt records).
    cut: bool,
    /// Intact records kept after a corrupt one.
    resynced: u64,
}

/// Scans a segment file. A torn or corrupt tail is cut; a corrupt record followed by intact
/// ones is skipped by resynchronising on the next position where a record checks (length,
/// CRC and a sequence number above the last one), and the file is rewritten without it.
fn recover_segment(path: &Path, first_seq: u64) -> Result<Recovered, SpoolError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let mut pos = 0usize;
    let mut next = first_seq;
    let mut out = Recovered::default();
    // Byte ranges of intact records, to rewrite the file when something in between is bad.
    let mut keep: Vec<(usize, usize)> = Vec::new();
    let mut corrupt_at: Option<usize> = None;
    let mut after_bad = false;
    while pos < data.len() {
        let rest = data.get(pos..).unwrap_or_default();
        // While resynchronising, only positions whose length and sequence number are
        // plausible are CRC-checked, so a large corrupt region costs linear time.
        if corrupt_at.is_some() && !plausible(rest, next) {
            pos += 1;
            continue;
        }
        match parse_record(rest) {
            Some(rec) if rec.seq >= next && (corrupt_at.is_some() || rec.seq == next) => {
                if corrupt_at.take().is_some() {
                    out.holes.extend(next..rec.seq);
                }
                if after_bad {
                    out.resynced += 1;
                }
                keep.push((pos, pos + rec.size));
                pos += rec.size;
                next = rec.seq + 1;
            }
            _ => {
                // Not a record here: from now on, look for the next one byte by byte.
                corrupt_at.get_or_insert(pos);
                after_bad = true;
                pos += 1;
            }
        }
    }
    out.span = next - first_seq;
    out.len = keep.iter().map(|(a, b)| (b - a) as u64).sum();
    out.cut = out.len < data.len() as u64;
    if out.cut {
        tracing::warn!(
            path = %path.display(),
            kept_bytes = out.len,
            dropped_bytes = data.len() as u64 - out.len,
            lost_records = out.holes.len(),
            resynced_records = out.resynced,
            "spool segment has torn or corrupt records; keeping every intact one"
        );
        let mut clean = Vec::with_capacity(usize::try_from(out.len).unwrap_or(0));
        for (a, b) in &keep {
            clean.extend_from_slice(data.get(*a..*b).unwrap_or_default());
        }
        let tmp = path.with_extension("recover");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&clean).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
    }
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    // Makes a created or deleted segment file itself durable, not only its contents.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Spool {
    /// Opens (or creates) the spool in `config.dir`, recovering from a crash.
    pub fn open(config: SpoolConfig) -> Result<(Spool, SpoolWriter), SpoolError> {
        fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
        let mut firsts: Vec<u64> = Vec::new();
        for entry in fs::read_dir(&config.dir).map_err(io_err(&config.dir))? {
            let entry = entry.map_err(io_err(&config.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".seg")
                && let Ok(first) = stem.parse::<u64>()
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let incarnation_path = config.dir.join(INCARNATION_FILE);
        let reserve_path = config.dir.join(RESERVE_FILE);
        let stored_incarnation = fs::read_to_string(&incarnation_path)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| {
                !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        let reserved = fs::read_to_string(&reserve_path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        let mut index = Index {
            watermark_path: config.dir.join(WATERMARK_FILE),
            dir: config.dir.clone(),
            ..Index::default()
        };
        let mut truncated = 0u64;
        let mut resynced = 0u64;
        let mut holes: Vec<u64> = Vec::new();
        for first in firsts {
            let path = segment_path(&config.dir, first);
            let rec = recover_segment(&path, first)?;
            truncated += u64::from(rec.cut);
            resynced += rec.resynced;
            holes.extend(&rec.holes);
            index.segments.insert(
                first,
                Segment {
                    path,
                    first_seq: first,
                    count: rec.span,
                    len: rec.len,
                    acked: Vec::new(),
                    acked_count: 0,
                },
            );
        }
        let recovered_next = index
            .segments
            .values()
            .next_back()
            .map_or(1, |s| s.first_seq + s.count);
        // Where numbering resumes. After a clean stop the next number follows the last
        // record. When recovery dropped records, numbers up to the reservation may have
        // been sent already, so numbering resumes above it; without a trustworthy
        // reservation (or identity) the spool starts a new incarnation instead.
        let (incarnation, next_seq) = match (stored_incarnation, reserved) {
            (Some(inc), Some(_)) if truncated == 0 => (inc, recovered_next.max(1)),
            (Some(inc), Some(r)) => (inc, recovered_next.max(r)),
            (Some(inc), None) if truncated == 0 && index.segments.is_empty() => (inc, 1),
            (prev, _) => {
                let inc = new_incarnation();
                if prev.is_some() || !index.segments.is_empty() {
                    tracing::warn!(incarnation = %inc, "spool identity cannot be trusted (no reservation or identity file); numbering under a new incarnation");
                }
                write_durable(&config.dir, &incarnation_path, &inc)?;
                (inc, recovered_next)
            }
        };
        index.incarnation = incarnation;
        let reserve_to = next_seq + RESERVE_STEP;
        write_durable(&config.dir, &reserve_path, &reserve_to.to_string())?;
        // The writer appends to the last segment only when numbering continues it; after a
        // jump it starts a new one (segments hold consecutive numbers).
        let continues = index
            .segments
            .values()
            .next_back()
            .is_some_and(|s| s.first_seq + s.count == next_seq);
        if !continues {
            let path = segment_path(&config.dir, next_seq);
            File::create(&path).map_err(io_err(&path))?;
            sync_dir(&config.dir)?;
            index.segments.insert(
                next_seq,
                Segment {
                    path,
                    first_seq: next_seq,
                    count: 0,
                    len: 0,
                    acked: Vec::new(),
                    acked_count: 0,
                },
            );
        }
        let (active_first, active_count, active_len) = index
            .segments
            .values()
            .next_back()
            .map_or((next_seq, 0, 0), |s| (s.first_seq, s.count, s.len));
        index.stats.truncated = truncated;
        index.stats.resynced = resynced;
        index.stats.next_seq = next_seq;
        // Records below the saved watermark were acknowledged before the restart: not sent
        // again. Lost records (holes) count as acknowledged: there is nothing to send.
        let watermark = fs::read_to_string(&index.watermark_path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        for seg in index.segments.values_mut() {
            for seq in seg.first_seq..(seg.first_seq + seg.count).min(watermark) {
                seg.ack(seq);
            }
        }
        for seq in holes {
            if let Some((_, seg)) = index.segments.range_mut(..=seq).next_back() {
                seg.ack(seq);
            }
        }
        index.delete_acked();
        index.refresh_gauges();
        let path = segment_path(&config.dir, active_first);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let spool = Spool {
            index: Arc::new(Mutex::new(index)),
            notify: Arc::new(Notify::new()),
        };
        let writer = SpoolWriter {
            reserved: reserve_to,
            config,
            file: BufWriter::with_capacity(256 * 1024, file),
            active_first,
            active_len,
            active_count,
            next_seq,
            durable_len: active_len,
            spool: spool.clone(),
            buf: Vec::with_capacity(1024),
        };
        Ok((spool, writer))
    }

    /// The incarnation id the uplink sends with every batch.
    pub fn incarnation(&self) -> String {
        lock(&self.index).incarnation.clone()
    }

    /// Starts a new incarnation: everything still in the spool is sent again under it. Used
    /// when the pipeline acknowledges a number this spool never issued (its progress record
    /// is corrupt or forged), which would otherwise make it discard new readings as old.
    ///
    /// # Errors
    /// The id file cannot be written.
    pub fn rotate_incarnation(&self) -> Result<String, SpoolError> {
        let mut index = lock(&self.index);
        let inc = new_incarnation();
        let dir = index.dir.clone();
        write_durable(&dir, &dir.join(INCARNATION_FILE), &inc)?;
        tracing::warn!(old = %index.incarnation, new = %inc, "spool incarnation rotated");
        index.incarnation = inc.clone();
        Ok(inc)
    }

    /// Current statistics.
    pub fn stats(&self) -> SpoolStats {
        lock(&self.index).stats.clone()
    }

    /// Waits until new records become durable (or a spurious wake-up).
    pub async fn wait_for_data(&self) {
        self.notify.notified().await;
    }

    /// Reads up to `max` unacknowledged durable records from `cursor` on, advancing it.
    ///
    /// Returns an empty vector when the uplink has caught up with the writer.
    pub fn read(&self, cursor: &mut Cursor, max: usize) -> Result<Vec<SpooledEntry>, SpoolError> {
        let mut out = Vec::new();
        while out.len() < max {
            // Locate the segment and its durable length under the lock; read without it.
            let (path, first_seq, durable, is_active) = {
                let index = lock(&self.index);
                let active = index.active_key();
                let Some((&first, seg)) = index.segments.range(cursor.segment..).next() else {
                    break;
                };
                if first != cursor.segment {
                    // Segment gone (acknowledged, evicted) or cursor at start: move on.
                    cursor.segment = first;
                    cursor.offset = 0;
                }
                (seg.path.clone(), first, seg.len, Some(first) == active)
            };
            if cursor.offset >= durable {
                if is_active {
                    break;
                }
                cursor.segment = first_seq + 1;
                cursor.offset = 0;
                continue;
            }
            let want = (durable - cursor.offset).min(4 * 1024 * 1024);
            let mut data = vec![0u8; usize::try_from(want).unwrap_or(usize::MAX)];
            let mut f = match File::open(&path) {
                Ok(f) => f,
                // Deleted between the lock and the open: re-resolve on the next round.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            f.seek(SeekFrom::Start(cursor.offset))
                .map_err(io_err(&path))?;
            f.read_exact(&mut data).map_err(io_err(&path))?;
            let mut pos = 0usize;
            let mut parsed = Vec::new();
            while out.len() + parsed.len() < max {
                let Some(rest) = data.get(pos..) else { break };
                let Some(rec) = parse_record(rest) else { break };
                pos += rec.size;
                parsed.push(SpooledEntry {
                    seq: rec.seq,
                    meter: String::from_utf8_lossy(rec.meter).into_owned(),
                    json: rec.json.to_vec(),
                });
            }
            if pos == 0 {
                // The durable region always holds whole records; a failure to parse one
                // means the file changed under us. Skip the segment rather than spin.
                tracing::error!(path = %path.display(), offset = cursor.offset, "unreadable record in durable spool region; skipping segment");
                cursor.segment = first_seq + 1;
                cursor.offset = 0;
                continue;
            }
            cursor.offset += pos as u64;
            let index = lock(&self.index);
            if let Some(seg) = index.segments.get(&first_seq) {
                out.extend(parsed.into_iter().filter(|e| !seg.is_acked(e.seq)));
            }
        }
        Ok(out)
    }

    /// Acknowledges records (the broker or the pipeline has them); fully acknowledged segments
    /// are deleted. Returns how many were not acknowledged before (a re-sent record the
    /// pipeline acknowledges twice counts once).
    pub fn ack(&self, seqs: &[u64]) -> u64 {
        let mut index = lock(&self.index);
        let mut n = 0u64;
        for &seq in seqs {
            let Some((_, seg)) = index.segments.range_mut(..=seq).next_back() else {
                continue;
            };
            if seg.ack(seq) {
                n += 1;
            }
        }
        index.stats.acked += n;
        index.delete_acked();
        index.refresh_gauges();
        index.save_watermark();
        n
    }
}

impl SpoolWriter {
    /// A handle on the spool this writer appends to.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Appends readings (not yet durable; call [`SpoolWriter::sync`]). Returns the first seq.
    pub fn append(&mut self, readings: &[Reading]) -> Result<u64, SpoolError> {
        let first = self.next_seq;
        let last = self.next_seq + readings.len() as u64;
        if last >= self.reserved {
            let reserve_to = last + RESERVE_STEP;
            let dir = self.config.dir.clone();
            write_durable(&dir, &dir.join(RESERVE_FILE), &reserve_to.to_string())?;
            self.reserved = reserve_to;
        }
        for reading in readings {
            let meter = reading.meter.as_str().as_bytes();
            let mlen =
                u16::try_from(meter.len()).map_err(|_| SpoolError::MeterIdTooLong(meter.len()))?;
            self.buf.clear();
            self.buf.extend_from_slice(&self.next_seq.to_le_bytes());
            self.buf.extend_from_slice(&mlen.to_le_bytes());
            self.buf.extend_from_slice(meter);
            serde_json::to_writer(
                &mut self.buf,
                &EntryRef {
                    seq: self.next_seq,
                    reading,
                },
            )?;
            let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
            let path = segment_path(&self.config.dir, self.active_first);
            self.file
                .write_all(&len.to_le_bytes())
                .and_then(|()| {
                    self.file
                        .write_all(&crc32fast::hash(&self.buf).to_le_bytes())
                })
                .and_then(|()| self.file.write_all(&self.buf))
                .map_err(io_err(&path))?;
            self.active_len += (HEADER + self.buf.len()) as u64;
            self.active_count += 1;
            self.next_seq += 1;
        }
        Ok(first)
    }

    /// Makes everything appended so far durable (`fsync`), publishes it to readers, rotates
    /// the segment when full and enforces the size bound.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let path = segment_path(&self.config.dir, self.active_first);
        self.file.flush().map_err(io_err(&path))?;
        self.file.get_ref().sync_data().map_err(io_err(&path))?;
        let rotate = self.active_len >= self.config.segment_bytes;
        let mut new_file = None;
        if rotate {
            let new_path = segment_path(&self.config.dir, self.next_seq);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&new_path)
                .map_err(io_err(&new_path))?;
            sync_dir(&self.config.dir)?;
            new_file = Some((new_path, f));
        }
        {
            let mut index = lock(&self.spool.index);
            if let Some(seg) = index.segments.get_mut(&self.active_first) {
                seg.count = self.active_count;
                seg.len = self.active_len;
            }
            index.stats.next_seq = self.next_seq;
            if let Some((new_path, _)) = &new_file {
                index.segments.insert(
                    self.next_seq,
                    Segment {
                        path: new_path.clone(),
                        first_seq: self.next_seq,
                        count: 0,
                        len: 0,
                        acked: Vec::new(),
                        acked_count: 0,
                    },
                );
                index.delete_acked();
            }
            index.evict(self.config.max_bytes);
            index.refresh_gauges();
        }
        self.durable_len = self.active_len;
        if let Some((_, f)) = new_file {
            self.file = BufWriter::with_capacity(256 * 1024, f);
            self.active_first = self.next_seq;
            self.active_len = 0;
            self.active_count = 0;
            self.durable_len = 0;
        }
        self.spool.notify.notify_waiters();
        self.spool.notify.notify_one();
        Ok(())
    }
}

impl SpoolWriter {
    /// After a failed append or sync (disk full, I/O error): drops what was not made durable
    /// and cuts the file back to its last durable length, so a half-written group can never
    /// sit in front of later records (recovery would cut those off with it).
    pub fn rollback(&mut self) -> Result<(), SpoolError> {
        let path = segment_path(&self.config.dir, self.active_first);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // The old buffer is discarded with the old writer (not flushed).
        let old = std::mem::replace(&mut self.file, BufWriter::with_capacity(256 * 1024, file));
        let (_file, _unflushed) = old.into_parts();
        self.file
            .get_ref()
            .set_len(self.durable_len)
            .map_err(io_err(&path))?;
        let lost = self.active_len.saturating_sub(self.durable_len);
        let durable_count = {
            let index = lock(&self.spool.index);
            index
                .segments
                .get(&self.active_first)
                .map_or(0, |s| s.count)
        };
        self.active_len = self.durable_len;
        self.active_count = durable_count;
        self.next_seq = self.active_first + durable_count;
        tracing::warn!(path = %path.display(), bytes = lost, "rolled back an unsynced spool group");
        Ok(())
    }
}

/// Most readings put into one group commit.
const GROUP_MAX_READINGS: usize = 8192;

/// Runs the writer on a dedicated thread: drains [`SubmitRequest`]s, appends them as one
/// group, `fsync`s once and then answers every request of the group.
///
/// The thread ends when every sender of `rx` is gone.
pub fn spawn_writer(
    mut writer: SpoolWriter,
    mut rx: mpsc::Receiver<SubmitRequest>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                let mut n = group.iter().map(|r| r.readings.len()).sum::<usize>();
                while n < GROUP_MAX_READINGS {
                    match rx.try_recv() {
                        Ok(req) => {
                            n += req.readings.len();
                            group.push(req);
                        }
                        Err(_) => break,
                    }
                }
                // A submitter that has gone (its connection or session ended) will not
                // acknowledge its device, which sends the readings again: not written now.
                // Nor is the rest of a session in which a write failed (see `Epoch`).
                let (stale, mut group): (Vec<_>, Vec<_>) = group
                    .into_iter()
                    .partition(|req| req.epoch.as_ref().is_some_and(|e| e.is_stale()));
                for req in stale {
                    let _unused = req.done.send(Err(SinkError::Spool(
                        "an earlier write of this session failed; not written, to keep the order"
                            .into(),
                    )));
                }
                group.retain(|req| !req.done.is_closed());
                if group.is_empty() {
                    continue;
                }
                let result = group
                    .iter()
                    .try_for_each(|req| writer.append(&req.readings).map(|_| ()))
                    .and_then(|()| writer.sync());
                let answer = result.map_err(|e| {
                    lock(&writer.spool.index).stats.write_errors += 1;
                    tracing::error!(alarm = "spool_write_failed", error = %e, "spool write failed; submitters get an error");
                    if let Err(e) = writer.rollback() {
                        tracing::error!(error = %e, "spool rollback failed");
                    }
                    SinkError::Spool(e.to_string())
                });
                if answer.is_err() {
                    // What was queued behind a failed group fails with it: written now, it
                    // could land before the re-sent readings of the failed group and put a
                    // meter's reads out of order. Pipelining sessions learn of it through
                    // their epoch, before they notice the error themselves.
                    while let Ok(req) = rx.try_recv() {
                        group.push(req);
                    }
                    if let Some(epoch) = group.iter().find_map(|req| req.epoch.as_ref()) {
                        epoch.count_failure();
                    }
                }
                for req in group {
                    // A submitter that gave up waiting is not an error of the spool.
                    let _unused = req.done.send(answer.clone());
                }
            }
        })
        .expect("spawning the spool writer thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::SourceKind;
    use rust_decimal::Decimal;

    pub(crate) fn reading(meter: &str, value: i64) -> Reading {
        testkit::reading(meter)
            .milli(value)
            .gateway("gw-1")
            .source(SourceKind::Coap, "nbiot")
            .build()
    }

    fn values(spool: &Spool) -> Vec<(u64, Decimal)> {
        let mut cursor = Cursor::start();
        spool
            .read(&mut cursor, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| {
                let entry: model::BatchEntry = serde_json::from_slice(&e.json).unwrap();
                assert_eq!(entry.seq, e.seq);
                assert_eq!(entry.reading.meter.as_str(), e.meter);
                (e.seq, entry.reading.value)
            })
            .collect()
    }

    #[test]
    fn append_sync_read_ack_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            dir: dir.path().into(),
            max_bytes: 1 << 30,
            segment_bytes: 4096,
        };
        let (spool, mut w) = Spool::open(config.clone()).unwrap();
        for i in 0..100 {
            assert_eq!(w.append(&[reading("m:1", i)]).unwrap(), (i + 1) as u64);
            w.sync().unwrap();
        }
        let all = values(&spool);
        assert_eq!(all.len(), 100);
        assert_eq!(all[0], (1, Decimal::new(0, 3)));
        assert_eq!(all[99], (100, Decimal::new(99, 3)));
        let stats = spool.stats();
        assert!(stats.segments > 3, "small segments rotate: {stats:?}");
        assert_eq!(stats.depth, 100);
        // Acknowledge the first 60: full segments disappear, reads skip acked ones.
        assert_eq!(spool.ack(&(1..=60).collect::<Vec<_>>()), 60);
        // A re-sent record acknowledged again (and one never written) counts nothing.
        assert_eq!(spool.ack(&[59, 60, 500]), 0);
        assert_eq!(spool.stats().acked, 60);
        let rest = values(&spool);
        assert_eq!(rest.first().unwrap().0, 61);
        assert_eq!(rest.len(), 40);
        assert!(spool.stats().segments < stats.segments);
        assert_eq!(spool.stats().depth, 40);
        drop((spool, w));
        // After a restart exactly the unacknowledged records are there (the watermark
        // remembers the acknowledged ones) and numbering continues.
        let (spool, mut w) = Spool::open(config).unwrap();
        let again = values(&spool);
        assert_eq!(again.first().unwrap().0, 61);
        assert_eq!(again.len(), 40);
        assert_eq!(spool.stats().depth, 40);
        assert_eq!(w.append(&[reading("m:1", 1000)]).unwrap(), 101);
    }

    #[test]
    fn torn_and_corrupt_tails_are_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig::new(dir.path(), 1 << 30);
        let (spool, mut w) = Spool::open(config.clone()).unwrap();
        for i in 0..10 {
            w.append(&[reading("m:1", i)]).unwrap();
        }
        w.sync().unwrap();
        drop((spool, w));
        let path = segment_path(dir.path(), 1);
        let full = fs::metadata(&path).unwrap().len();
        // Torn: the last record lost its last 5 bytes.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 5).unwrap();
        drop(f);
        let (spool, w) = Spool::open(config.clone()).unwrap();
        let got = values(&spool);
        assert_eq!(got.len(), 9);
        assert_eq!(got[8], (9, Decimal::new(8, 3)));
        assert_eq!(spool.stats().truncated, 1);
        assert!(fs::metadata(&path).unwrap().len() < full - 5);
        drop((spool, w));
        // Corrupt: flip a byte inside the last record's payload.
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 3] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let (spool, mut w) = Spool::open(config).unwrap();
        let got = values(&spool);
        assert_eq!(got.len(), 8);
        assert_eq!(got[7].0, 8);
        // Numbering never reuses a number that was handed out (9 and 10 may have reached the
        // pipeline before they were damaged): it resumes above the reservation.
        let next = w.append(&[reading("m:1", 77)]).unwrap();
        assert!(next > 10, "{next}");
        w.sync().unwrap();
        assert_eq!(values(&spool).last().unwrap().0, next);
    }

    /// Flips a byte inside record `index` (0-based) of a segment file.
    fn corrupt_record(path: &Path, index: usize) {
        let mut data = fs::read(path).unwrap();
        let mut pos = 0usize;
        for _ in 0..index {
            let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
            pos += HEADER + len;
        }
        data[pos + HEADER + 20] ^= 0x55;
        fs::write(path, &data).unwrap();
    }

    #[test]
    fn intact_records_after_a_corrupt_one_are_kept_in_closed_and_active_segments() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            dir: dir.path().into(),
            max_bytes: 1 << 30,
            segment_bytes: 40_000,
        };
        let (spool, mut w) = Spool::open(config.clone()).unwrap();
        for i in 1..=200 {
            w.append(&[reading("m:1", i)]).unwrap();
            w.sync().unwrap();
        }
        let before = spool.stats();
        assert!(before.segments >= 2, "{before:?}");
        drop((spool, w));
        // One bad record in the middle of the first (closed) segment and one in the active.
        let mut segs: Vec<PathBuf> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        corrupt_record(&segs[0], 10);
        corrupt_record(segs.last().unwrap(), 3);
        let active_first: u64 = segs
            .last()
            .unwrap()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .parse()
            .unwrap();
        let (spool, mut w) = Spool::open(config.clone()).unwrap();
        let got: Vec<u64> = values(&spool).into_iter().map(|v| v.0).collect();
        let lost = [11, active_first + 3];
        let want: Vec<u64> = (1..=200).filter(|s| !lost.contains(s)).collect();
        assert_eq!(got, want);
        let stats = spool.stats();
        assert_eq!(stats.depth, 198);
        assert_eq!(stats.truncated, 2);
        assert!(stats.resynced >= 197 - active_first, "{stats:?}");
        // The damage cut records, so numbering jumps past everything ever issued.
        let next = w.append(&[reading("m:1", 999)]).unwrap();
        assert!(next > 200, "{next}");
        w.sync().unwrap();
        // Acknowledging everything empties the spool even with the holes.
        let mut all = want.clone();
        all.push(next);
        spool.ack(&all);
        assert_eq!(spool.stats().depth, 0);
        drop((spool, w));
        // A second open finds clean files: nothing more is cut.
        let (spool, _w) = Spool::open(config).unwrap();
        assert_eq!(spool.stats().truncated, 0);
        assert_eq!(spool.stats().depth, 0);
    }

    #[test]
    fn a_new_directory_is_a_new_incarnation_and_rotation_persists() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (sa, _wa) = Spool::open(SpoolConfig::new(a.path(), 1 << 30)).unwrap();
        let (sb, _wb) = Spool::open(SpoolConfig::new(b.path(), 1 << 30)).unwrap();
        let inc_a = sa.incarnation();
        assert_eq!(inc_a.len(), 16);
        assert_ne!(inc_a, sb.incarnation());
        drop((sa, _wa));
        let (sa, _wa) = Spool::open(SpoolConfig::new(a.path(), 1 << 30)).unwrap();
        assert_eq!(sa.incarnation(), inc_a, "a restart keeps the identity");
        let rotated = sa.rotate_incarnation().unwrap();
        assert_ne!(rotated, inc_a);
        drop((sa, _wa));
        let (sa, _wa) = Spool::open(SpoolConfig::new(a.path(), 1 << 30)).unwrap();
        assert_eq!(sa.incarnation(), rotated);
        // A lost reservation file cannot be trusted: new incarnation.
        drop((sa, _wa));
        fs::remove_file(a.path().join(RESERVE_FILE)).unwrap();
        let (sa, _wa) = Spool::open(SpoolConfig::new(a.path(), 1 << 30)).unwrap();
        assert_ne!(sa.incarnation(), rotated);
    }

    #[test]
    fn rollback_discards_an_unsynced_group() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig::new(dir.path(), 1 << 30);
        let (spool, mut w) = Spool::open(config.clone()).unwrap();
        w.append(&[reading("m:1", 1), reading("m:1", 2)]).unwrap();
        w.sync().unwrap();
        // A group that fails before its sync is cut back, even if partly flushed.
        w.append(
            &(0..2000)
                .map(|i| reading("m:1", 100 + i))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        w.rollback().unwrap();
        assert_eq!(w.append(&[reading("m:1", 3)]).unwrap(), 3);
        w.sync().unwrap();
        let got = values(&spool);
        assert_eq!(
            got,
            vec![
                (1, Decimal::new(1, 3)),
                (2, Decimal::new(2, 3)),
                (3, Decimal::new(3, 3))
            ]
        );
        drop((spool, w));
        let (spool, _w) = Spool::open(config).unwrap();
        assert_eq!(values(&spool).len(), 3);
        assert_eq!(spool.stats().truncated, 0);
    }

    #[test]
    fn eviction_only_past_the_bound_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            dir: dir.path().into(),
            max_bytes: 20_000,
            segment_bytes: 4_000,
        };
        let (spool, mut w) = Spool::open(config).unwrap();
        // About 450 bytes per record: 40 records fit, 200 do not.
        for i in 0..40 {
            w.append(&[reading("m:1", i)]).unwrap();
            w.sync().unwrap();
        }
        assert_eq!(spool.stats().evicted, 0);
        for i in 40..200 {
            w.append(&[reading("m:1", i)]).unwrap();
            w.sync().unwrap();
        }
        let stats = spool.stats();
        assert!(stats.evicted > 0);
        assert!(stats.bytes <= 20_000 + 4_000, "{stats:?}");
        let got = values(&spool);
        // Oldest-first: what is left is the newest, contiguous, ending at 200.
        assert_eq!(got.last().unwrap().0, 200);
        assert_eq!(got.len() as u64 + stats.evicted, 200);
        let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_answers_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
        let (sink, rx) = crate::IngestSink::new(64);
        let handle = spawn_writer(writer, rx);
        let mut tasks = Vec::new();
        for i in 0..50 {
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                sink.submit(vec![
                    reading(&format!("m:{i}"), i),
                    reading(&format!("m:{i}"), i + 1),
                ])
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(spool.stats().depth, 100);
        let got = values(&spool);
        // Per meter, the two readings of a submit stay in order.
        for i in 0..50i64 {
            let meter_vals: Vec<Decimal> = spool
                .read(&mut Cursor::start(), usize::MAX)
                .unwrap()
                .into_iter()
                .filter(|e| e.meter == format!("m:{i}"))
                .map(|e| {
                    serde_json::from_slice::<model::BatchEntry>(&e.json)
                        .unwrap()
                        .reading
                        .value
                })
                .collect();
            assert_eq!(meter_vals, vec![Decimal::new(i, 3), Decimal::new(i + 1, 3)]);
        }
        assert_eq!(got.len(), 100);
        drop(sink);
        handle.join().unwrap();
    }
}
