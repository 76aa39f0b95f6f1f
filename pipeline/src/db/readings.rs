//! Readings: the narrow encoding (dictionary keys, frames, rows), binary COPY into
//! `reading_rows`, the conflict-tolerant merge through a staging table, and the probe that
//! isolates readings the database refuses. Outside the ingest path, the reads other modules
//! make of stored readings (`query`: billing, estimates, re-validation, command telemetry) and
//! the changes to single readings (`edit`: edits, review rejections, `reading_history`) are
//! here too, so `readings`, `reading_rows` and `reading_history` have one owner.

use std::collections::HashMap;

use model::Reading;
use sqlx::{Connection, PgConnection, PgPool};
use time::OffsetDateTime;

use super::copy::{self, CopyBuffer};
use super::error::{StoreError, stage};

mod edit;
mod query;

pub use edit::{
    keep_history, lock_for_edit, move_held_to_history, reject_reviewed, set_value, unpack_month,
};
pub use query::{
    HeldRead, Side, VolumeRead, boundary_read, estimated_share, first_received_after,
    held_register_decreases, neighbour, next_volume_ts,
};

/// Inserts readings; rows already stored (same meter, ts, quantity, tariff, subunit) are left
/// untouched. Returns how many rows were new.
///
/// # Errors
/// Returns [`StoreError`] when the database refuses the batch; nothing is written then.
pub async fn insert_readings(pool: &PgPool, readings: &[Reading]) -> Result<u64, StoreError> {
    if readings.is_empty() {
        return Ok(0);
    }
    let mut conn = pool
        .acquire()
        .await
        .map_err(stage("acquiring a connection"))?;
    let mut tx = conn.begin().await.map_err(stage("beginning"))?;
    for r in readings {
        narrow_ranges(r)?;
    }
    let merged = merge_readings(&mut tx, readings, false).await?;
    tx.commit().await.map_err(stage("committing"))?;
    Ok(merged.inserted)
}

/// Refuses a reading whose small integers do not fit their `smallint` columns.
fn narrow_ranges(r: &Reading) -> Result<(), StoreError> {
    let encode = |field| StoreError::Encode {
        field,
        meter: r.meter.to_string(),
    };
    i16::try_from(r.tariff).map_err(|_| encode("tariff"))?;
    i16::try_from(r.subunit).map_err(|_| encode("subunit"))?;
    i16::try_from(r.storage).map_err(|_| encode("storage"))?;
    Ok(())
}

/// Seeded fast hashing: these maps are filled and probed once per reading.
type Fast = foldhash::fast::RandomState;

/// The dictionary keys of one batch (migration 0080): meters, series, units, frame sources.
/// Series and units are a handful per batch (a linear search beats hashing); the others are
/// looked up with keys borrowed from the readings, so no lookup allocates.
#[derive(Debug, Default)]
struct Keys<'r> {
    meters: HashMap<&'r str, i32, Fast>,
    series: Vec<((&'static str, i16, i16), i16)>,
    units: Vec<(&'static str, i16)>,
    sources: HashMap<SourceTuple<'r>, i32, Fast>,
}

impl Keys<'_> {
    fn series(&self, quantity: &str, tariff: i16, subunit: i16) -> Option<i16> {
        self.series
            .iter()
            .find(|((q, t, s), _)| *q == quantity && *t == tariff && *s == subunit)
            .map(|(_, id)| *id)
    }

    fn unit(&self, unit: &str) -> Option<i16> {
        self.units
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, id)| *id)
    }
}

/// (gateway, source, source id, channel, clock) of a frame, borrowed.
type SourceTuple<'r> = (Option<&'r str>, &'r str, &'r str, Option<&'r str>, &'r str);

fn source_tuple(r: &Reading) -> SourceTuple<'_> {
    (
        Some(r.provenance.gateway.as_str()),
        copy::source_name(r.provenance.source),
        &r.provenance.source_id,
        r.provenance.channel.as_deref(),
        copy::clock_name(r.clock),
    )
}

/// A `wm_source_keys` row: gateway, source, source id, channel, clock and the assigned key.
type SourceKeyRow = (Option<String>, String, String, Option<String>, String, i32);

/// Looks up (and adds what is missing to) the dictionaries of a batch: four statements.
async fn resolve_keys<'r>(
    conn: &mut PgConnection,
    readings: &[&'r Reading],
) -> Result<Keys<'r>, sqlx::Error> {
    let mut keys = Keys::default();
    let mut meters: Vec<&str> = readings.iter().map(|r| r.meter.as_str()).collect();
    meters.sort_unstable();
    meters.dedup();
    // One int4[] aligned with `meters` (migration 0150): no text comes back.
    let found: Option<Vec<Option<i32>>> = sqlx::query_scalar("SELECT wm_meter_key_list($1)")
        .bind(&meters)
        .fetch_one(&mut *conn)
        .await?;
    let found = found.unwrap_or_default();
    keys.meters.reserve(meters.len());
    for (m, k) in meters.iter().zip(found) {
        // A key still missing (cannot happen after the insert) leaves the meter out: the
        // encoder then refuses its reading by name.
        if let Some(k) = k {
            keys.meters.insert(*m, k);
        }
    }
    let mut series: Vec<(&'static str, i16, i16)> = readings
        .iter()
        .map(|r| {
            (
                r.quantity.as_str(),
                i16::try_from(r.tariff).unwrap_or(i16::MAX),
                i16::try_from(r.subunit).unwrap_or(i16::MAX),
            )
        })
        .collect();
    series.sort_unstable();
    series.dedup();
    let rows: Vec<(String, i16, i16, i16)> = sqlx::query_as(
        "SELECT quantity, tariff, subunit, series_id FROM wm_series_keys($1, $2, $3)",
    )
    .bind(series.iter().map(|s| s.0).collect::<Vec<_>>())
    .bind(series.iter().map(|s| s.1).collect::<Vec<_>>())
    .bind(series.iter().map(|s| s.2).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    for (q, t, s, id) in rows {
        if let Some(k) = series.iter().find(|k| k.0 == q && k.1 == t && k.2 == s) {
            keys.series.push((*k, id));
        }
    }
    let mut units: Vec<&'static str> = readings.iter().map(|r| r.unit.symbol()).collect();
    units.sort_unstable();
    units.dedup();
    let rows: Vec<(String, i16)> = sqlx::query_as("SELECT unit, unit_id FROM wm_unit_keys($1)")
        .bind(&units)
        .fetch_all(&mut *conn)
        .await?;
    for (u, id) in rows {
        if let Some(k) = units.iter().find(|k| **k == u) {
            keys.units.push((k, id));
        }
    }
    let mut sources: Vec<SourceTuple<'r>> = readings.iter().map(|r| source_tuple(r)).collect();
    sources.sort_unstable();
    sources.dedup();
    let rows: Vec<SourceKeyRow> = sqlx::query_as(
        "SELECT gateway_id, source, source_id, channel, clock, source_key
             FROM wm_source_keys($1, $2, $3, $4, $5)",
    )
    .bind(sources.iter().map(|s| s.0).collect::<Vec<_>>())
    .bind(sources.iter().map(|s| s.1).collect::<Vec<_>>())
    .bind(sources.iter().map(|s| s.2).collect::<Vec<_>>())
    .bind(sources.iter().map(|s| s.3).collect::<Vec<_>>())
    .bind(sources.iter().map(|s| s.4).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    // By hash, not by a search per row: a batch of NB-IoT meters has a source (channel =
    // the meter's own address) per meter.
    let index: HashMap<SourceTuple<'r>, usize, Fast> =
        sources.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    keys.sources.reserve(rows.len());
    for (g, src, sid, ch, clk, key) in rows {
        let found = index
            .get(&(
                g.as_deref(),
                src.as_str(),
                sid.as_str(),
                ch.as_deref(),
                clk.as_str(),
            ))
            .and_then(|i| sources.get(*i));
        if let Some(t) = found {
            keys.sources.insert(*t, key);
        }
    }
    Ok(keys)
}

/// A batch encoded for the narrow tables.
#[derive(Debug, Default)]
pub(super) struct Narrow {
    /// Binary COPY data of `frames`.
    pub(super) frames: Vec<u8>,
    /// The frame ids written, in order.
    pub(super) frame_ids: Vec<i64>,
    /// One row per reading, in the order given.
    pub(super) rows: Vec<copy::NarrowRow>,
    /// `quality_detail` of the rows that have one: (row index, JSON).
    pub(super) details: Vec<(usize, String)>,
}

impl Narrow {
    /// Sorts the rows by the primary key of `reading_rows`, (meter key, series, ts), each
    /// detail staying with its row: the index is then filled page by page instead of at
    /// random places across all meters (measured about 1.5x faster on the index). Sorting
    /// the encoded integers is cheaper than sorting the readings by their meter id text,
    /// and it is the index's own order.
    pub(super) fn sort_by_key(&mut self) {
        let key = |r: &copy::NarrowRow| (r.meter_key, r.series_id, r.ts);
        if self.details.is_empty() {
            self.rows.sort_by_key(key);
            return;
        }
        let mut detail_of: Vec<Option<String>> = vec![None; self.rows.len()];
        for (i, d) in self.details.drain(..) {
            if let Some(slot) = detail_of.get_mut(i) {
                *slot = Some(d);
            }
        }
        let mut paired: Vec<(copy::NarrowRow, Option<String>)> =
            self.rows.drain(..).zip(detail_of).collect();
        paired.sort_by_key(|(r, _)| key(r));
        for (i, (r, d)) in paired.into_iter().enumerate() {
            self.rows.push(r);
            if let Some(d) = d {
                self.details.push((i, d));
            }
        }
    }
}

/// Frames of one block (frame_id = block << 20 | index).
const FRAMES_PER_BLOCK: usize = 1 << 20;

/// Resolves the keys of `readings` and encodes their frames (one per distinct provenance) and
/// rows. Frame ids come from one `wm_frame_block_seq` call per 2^20 frames.
pub(super) async fn encode_narrow(
    conn: &mut PgConnection,
    readings: &[&Reading],
) -> Result<Narrow, StoreError> {
    let keys = resolve_keys(conn, readings)
        .await
        .map_err(stage("resolving reading keys"))?;
    let missing = |field: &'static str, r: &Reading| StoreError::Encode {
        field,
        meter: r.meter.to_string(),
    };
    let mut out = Narrow::default();
    out.rows.reserve(readings.len());
    let mut frames = CopyBuffer::new();
    type FrameKey<'a> = (i32, OffsetDateTime, &'a str);
    let mut frame_of: HashMap<FrameKey<'_>, i64, Fast> =
        HashMap::with_capacity_and_hasher(readings.len(), Fast::default());
    let mut block: i64 = 0;
    let mut in_block = FRAMES_PER_BLOCK;
    for (i, r) in readings.iter().enumerate() {
        let source_key = *keys
            .sources
            .get(&source_tuple(r))
            .ok_or_else(|| missing("provenance", r))?;
        let fkey = (
            source_key,
            r.provenance.received_at,
            r.provenance.frame_hash.as_str(),
        );
        let frame_id = match frame_of.get(&fkey) {
            Some(id) => *id,
            None => {
                if in_block == FRAMES_PER_BLOCK {
                    block = sqlx::query_scalar("SELECT nextval('wm_frame_block_seq')")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(stage("allocating frame ids"))?;
                    in_block = 0;
                }
                let id = (block << 20) | i64::try_from(in_block).unwrap_or(0);
                in_block += 1;
                frames.encode_frame(
                    id,
                    r.provenance.received_at,
                    None,
                    source_key,
                    &r.provenance.frame_hash,
                );
                out.frame_ids.push(id);
                frame_of.insert(fkey, id);
                id
            }
        };
        let tariff = i16::try_from(r.tariff).map_err(|_| missing("tariff", r))?;
        let subunit = i16::try_from(r.subunit).map_err(|_| missing("subunit", r))?;
        out.rows.push(copy::NarrowRow {
            ts: r.ts,
            frame_id,
            meter_key: *keys
                .meters
                .get(r.meter.as_str())
                .ok_or_else(|| missing("meter", r))?,
            series_id: keys
                .series(r.quantity.as_str(), tariff, subunit)
                .ok_or_else(|| missing("quantity", r))?,
            unit_id: keys
                .unit(r.unit.symbol())
                .ok_or_else(|| missing("unit", r))?,
            storage: i16::try_from(r.storage).map_err(|_| missing("storage", r))?,
            quality: copy::quality_code(&r.quality),
            flags: copy::flag_bits(&r.flags),
            value: r.value,
        });
        if let Some(json) = copy::quality_detail(&r.quality) {
            out.details.push((i, json));
        }
    }
    out.frames = frames.finish();
    Ok(out)
}

/// Binary COPY of raw bytes with `statement`.
async fn copy_in(
    conn: &mut PgConnection,
    statement: &str,
    bytes: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(bytes).await?;
    copy.finish().await
}

/// Moves the packed (meter, month)s of `rows` older than the pack horizon back to row form
/// (migration 0120, docs/storage.md "Packed months"), so the unique key of `reading_rows`
/// judges duplicates and late reads exactly as for rows never packed. A batch of current
/// reads pays one small query (the horizon, read under the shared lock that keeps the packing
/// job from moving it until this transaction ends).
async fn unpack_for(
    conn: &mut PgConnection,
    rows: &[super::copy::NarrowRow],
) -> Result<(), sqlx::Error> {
    let Some(oldest) = rows.iter().map(|r| r.ts).min() else {
        return Ok(());
    };
    let older: bool = sqlx::query_scalar("SELECT $1 < wm_pack_horizon()")
        .bind(oldest)
        .fetch_one(&mut *conn)
        .await?;
    if older {
        let keys: Vec<i32> = rows.iter().map(|r| r.meter_key).collect();
        let ts: Vec<OffsetDateTime> = rows.iter().map(|r| r.ts).collect();
        sqlx::query("SELECT wm_unpack_readings($1, $2)")
            .bind(keys)
            .bind(ts)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// COPYs the frames of `n`, then its rows into `table` (`reading_rows` or the staging table).
/// Before rows that will reach `reading_rows`, the packed months they fall in are unpacked.
pub(super) async fn copy_narrow(
    conn: &mut PgConnection,
    table: &str,
    n: &Narrow,
) -> Result<u64, sqlx::Error> {
    if table != "wm_probe" {
        unpack_for(conn, &n.rows).await?;
    }
    copy_in(
        conn,
        &format!(
            "COPY frames ({}) FROM STDIN (FORMAT binary)",
            copy::FRAME_COLUMNS
        ),
        &n.frames,
    )
    .await?;
    let mut buf = CopyBuffer::new();
    for r in &n.rows {
        buf.encode_row(r);
    }
    copy_in(
        conn,
        &format!(
            "COPY {table} ({}) FROM STDIN (FORMAT binary)",
            copy::ROW_COLUMNS
        ),
        &buf.finish(),
    )
    .await
}

/// Writes the `quality_detail` of `n`'s rows to `reading_details` (a detail already stored for
/// the key is replaced) or, `staging`, to `wm_stage_details` (keyed by frame too).
pub(super) async fn write_details(
    conn: &mut PgConnection,
    staging: bool,
    n: &Narrow,
) -> Result<(), sqlx::Error> {
    if n.details.is_empty() {
        return Ok(());
    }
    let mut mk = Vec::new();
    let mut sid = Vec::new();
    let mut ts = Vec::new();
    let mut fid = Vec::new();
    let mut json = Vec::new();
    for (i, d) in &n.details {
        if let Some(r) = n.rows.get(*i) {
            mk.push(r.meter_key);
            sid.push(r.series_id);
            ts.push(r.ts);
            fid.push(r.frame_id);
            json.push(d.as_str());
        }
    }
    let sql = if staging {
        "INSERT INTO wm_stage_details (meter_key, series_id, ts, frame_id, quality_detail)
         SELECT m, s, t, f, j::jsonb
         FROM UNNEST($1::int4[], $2::int2[], $3::timestamptz[], $4::int8[], $5::text[])
              AS u(m, s, t, f, j)
         ON CONFLICT DO NOTHING"
    } else {
        "INSERT INTO reading_details (meter_key, series_id, ts, quality_detail)
         SELECT DISTINCT ON (m, s, t) m, s, t, j::jsonb
         FROM UNNEST($1::int4[], $2::int2[], $3::timestamptz[], $4::int8[], $5::text[])
              AS u(m, s, t, f, j)
         ORDER BY m, s, t
         ON CONFLICT (meter_key, series_id, ts) DO UPDATE SET quality_detail = excluded.quality_detail"
    };
    sqlx::query(sql)
        .bind(mk)
        .bind(sid)
        .bind(ts)
        .bind(fid)
        .bind(json)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores readings with binary COPY into the narrow tables (`frames`, `reading_rows`,
/// `reading_details`), adding dictionary entries as needed: the raw path of the benchmark.
///
/// # Errors
/// Returns the database error (a unique violation when a row already exists).
pub async fn copy_readings(
    conn: &mut PgConnection,
    readings: &[Reading],
) -> Result<u64, StoreError> {
    let refs: Vec<&Reading> = readings.iter().collect();
    let n = encode_narrow(conn, &refs).await?;
    let rows = copy_narrow(conn, "reading_rows", &n)
        .await
        .map_err(stage("copying readings"))?;
    write_details(conn, false, &n)
        .await
        .map_err(stage("writing quality details"))?;
    Ok(rows)
}

/// What the conflict-tolerant merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeCounts {
    /// Rows added that were not there before.
    pub inserted: u64,
    /// Estimates replaced by an actual read at the same key (moved to `reading_history`).
    pub superseded: u64,
}

/// The conflict-tolerant path: staging table, conflicts recorded, estimates moved to
/// `reading_history` and replaced by actual reads (`supersede`; otherwise stored rows are left
/// untouched), everything else `ON CONFLICT DO NOTHING`. Frames no stored row refers to are
/// removed again.
pub(super) async fn merge_readings(
    conn: &mut PgConnection,
    readings: &[Reading],
    supersede: bool,
) -> Result<MergeCounts, StoreError> {
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS wm_stage (LIKE reading_rows INCLUDING DEFAULTS) \
         ON COMMIT DELETE ROWS",
    )
    .execute(&mut *conn)
    .await
    .map_err(stage("creating the staging table"))?;
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS wm_stage_details (
             meter_key integer, series_id smallint, ts timestamptz, frame_id bigint,
             quality_detail jsonb, PRIMARY KEY (meter_key, series_id, ts, frame_id))
         ON COMMIT DELETE ROWS",
    )
    .execute(&mut *conn)
    .await
    .map_err(stage("creating the staging table"))?;
    sqlx::query("TRUNCATE wm_stage, wm_stage_details")
        .execute(&mut *conn)
        .await
        .map_err(stage("clearing the staging table"))?;
    // A batch may itself repeat a key (non-register quantities are not deduplicated by VEE).
    let refs: Vec<&Reading> = readings.iter().collect();
    let narrow = encode_narrow(conn, &refs).await?;
    copy_narrow(conn, "wm_stage", &narrow)
        .await
        .map_err(stage("copying readings to the staging table"))?;
    write_details(conn, true, &narrow)
        .await
        .map_err(stage("staging quality details"))?;
    const KEY: &str = "r.meter_key = s.meter_key AND r.series_id = s.series_id AND r.ts = s.ts";
    let mut superseded = 0;
    if supersede {
        sqlx::query(&format!(
            "INSERT INTO ingest_rejects (kind, meter_id, ts, detail)
             SELECT 'duplicate_conflict', k.meter_id, s.ts,
                    jsonb_build_object('quantity', q.quantity, 'value', s.value::text,
                                       'stored_value', r.value::text, 'gateway', fs.gateway_id)
             FROM wm_stage s JOIN reading_rows r ON {KEY}
             JOIN meter_keys k ON k.meter_key = s.meter_key
             JOIN reading_series q ON q.series_id = s.series_id
             JOIN frames f ON f.frame_id = s.frame_id
             JOIN frame_sources fs ON fs.source_key = f.source_key
             WHERE r.value <> s.value AND r.quality <> 2"
        ))
        .execute(&mut *conn)
        .await
        .map_err(stage("recording conflicts"))?;
        superseded = sqlx::query(
            "INSERT INTO reading_history (meter_id, ts, quantity, tariff, subunit, value, unit,
                 quality, quality_detail, flags, replaced_by, reason)
             SELECT v.meter_id, v.ts, v.quantity, v.tariff, v.subunit, v.value, v.unit, v.quality,
                    v.quality_detail, v.flags, 'actual_read', 'superseded by an actual read'
             FROM (SELECT DISTINCT s.meter_key, s.series_id, s.ts FROM wm_stage s
                   WHERE s.quality <> 2) s
             JOIN meter_keys k ON k.meter_key = s.meter_key
             JOIN reading_series q ON q.series_id = s.series_id
             JOIN readings v ON v.meter_id = k.meter_id AND v.quantity = q.quantity
                  AND v.tariff = q.tariff AND v.subunit = q.subunit AND v.ts = s.ts
             WHERE v.quality = 'estimated'",
        )
        .execute(&mut *conn)
        .await
        .map_err(stage("keeping superseded estimates"))?
        .rows_affected();
    }
    let on_conflict = if supersede {
        "DO UPDATE SET value = excluded.value, unit_id = excluded.unit_id,
             storage = excluded.storage, quality = excluded.quality, flags = excluded.flags,
             frame_id = excluded.frame_id
         WHERE reading_rows.quality = 2 AND excluded.quality <> 2"
    } else {
        "DO NOTHING"
    };
    let cols = copy::ROW_COLUMNS;
    let merged: Vec<(i32, i16, OffsetDateTime, i64)> = sqlx::query_as(&format!(
        "INSERT INTO reading_rows ({cols})
         SELECT DISTINCT ON (meter_key, series_id, ts) {cols}
         FROM wm_stage ORDER BY meter_key, series_id, ts
         ON CONFLICT (meter_key, series_id, ts) {on_conflict}
         RETURNING meter_key, series_id, ts, frame_id"
    ))
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("merging readings"))?;
    // The merged rows' details: the staged one of the same frame, or none (an estimate's
    // detail does not outlive it).
    let mk: Vec<i32> = merged.iter().map(|m| m.0).collect();
    let sid: Vec<i16> = merged.iter().map(|m| m.1).collect();
    let ts: Vec<OffsetDateTime> = merged.iter().map(|m| m.2).collect();
    let fid: Vec<i64> = merged.iter().map(|m| m.3).collect();
    sqlx::query(
        "WITH m AS (SELECT * FROM UNNEST($1::int4[], $2::int2[], $3::timestamptz[], $4::int8[])
                    AS m(k, s, t, f))
         , del AS (DELETE FROM reading_details d USING m
                   WHERE d.meter_key = m.k AND d.series_id = m.s AND d.ts = m.t
                     AND NOT EXISTS (SELECT 1 FROM wm_stage_details x
                                     WHERE x.meter_key = m.k AND x.series_id = m.s
                                       AND x.ts = m.t AND x.frame_id = m.f))
         INSERT INTO reading_details (meter_key, series_id, ts, quality_detail)
         SELECT x.meter_key, x.series_id, x.ts, x.quality_detail
         FROM wm_stage_details x JOIN m
           ON x.meter_key = m.k AND x.series_id = m.s AND x.ts = m.t AND x.frame_id = m.f
         ON CONFLICT (meter_key, series_id, ts) DO UPDATE SET quality_detail = excluded.quality_detail",
    )
    .bind(&mk)
    .bind(&sid)
    .bind(&ts)
    .bind(&fid)
    .execute(&mut *conn)
    .await
    .map_err(stage("merging quality details"))?;
    // Frames of readings that were not stored (duplicates) would be provenance of nothing.
    let used: std::collections::HashSet<i64> = fid.iter().copied().collect();
    let orphans: Vec<i64> = narrow
        .frame_ids
        .iter()
        .copied()
        .filter(|f| !used.contains(f))
        .collect();
    if !orphans.is_empty() {
        sqlx::query("DELETE FROM frames WHERE frame_id = ANY($1)")
            .bind(&orphans)
            .execute(&mut *conn)
            .await
            .map_err(stage("removing unused frames"))?;
    }
    let inserted = merged.len() as u64;
    Ok(MergeCounts {
        inserted: inserted.saturating_sub(superseded),
        superseded,
    })
}

/// Finds the readings the database refuses to store, by bisection: each probe writes a slice
/// the way [`super::write::write_batch`] does (dictionary keys, frames, rows into a temporary copy of
/// `reading_rows` without keys, so only the values are judged) inside a savepoint that is
/// rolled back. Nothing is written. Returns (index, database message) of each refused
/// reading; about 2·log2(n) probes per refused one.
///
/// # Errors
/// [`StoreError::Stage`] when the probing itself fails (connection lost).
pub async fn find_refused(
    conn: &mut PgConnection,
    readings: &[Reading],
) -> Result<Vec<(usize, String)>, StoreError> {
    let mut tx = conn.begin().await.map_err(stage("beginning a probe"))?;
    sqlx::query("CREATE TEMP TABLE wm_probe (LIKE reading_rows INCLUDING DEFAULTS) ON COMMIT DROP")
        .execute(&mut *tx)
        .await
        .map_err(stage("creating the probe table"))?;
    let mut refused = Vec::new();
    let mut todo = vec![(0usize, readings.len())];
    while let Some((from, to)) = todo.pop() {
        if from >= to {
            continue;
        }
        sqlx::query("SAVEPOINT wm_probe_sp")
            .execute(&mut *tx)
            .await
            .map_err(stage("setting a probe savepoint"))?;
        let slice: Vec<&Reading> = readings.get(from..to).unwrap_or_default().iter().collect();
        let result = match encode_narrow(&mut tx, &slice).await {
            Ok(n) => copy_narrow(&mut tx, "wm_probe", &n)
                .await
                .map_err(stage("probing")),
            Err(e) => Err(e),
        };
        sqlx::query("ROLLBACK TO SAVEPOINT wm_probe_sp")
            .execute(&mut *tx)
            .await
            .map_err(stage("rolling back a probe"))?;
        match result {
            Ok(_) => {}
            Err(StoreError::Stage { source, .. }) if source.as_database_error().is_some() => {
                if to - from == 1 {
                    refused.push((from, source.to_string()));
                } else {
                    let mid = from + (to - from) / 2;
                    todo.push((mid, to));
                    todo.push((from, mid));
                }
            }
            Err(StoreError::Encode { .. }) if to - from == 1 => {
                refused.push((from, "a small integer overflows its column".to_owned()));
            }
            Err(StoreError::Encode { .. }) => {
                let mid = from + (to - from) / 2;
                todo.push((mid, to));
                todo.push((from, mid));
            }
            Err(e) => return Err(e),
        }
    }
    tx.rollback().await.map_err(stage("ending a probe"))?;
    refused.sort_unstable_by_key(|r| r.0);
    Ok(refused)
}
