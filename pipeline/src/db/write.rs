//! The ingest transaction: one batch's readings, rollups or journal records, meter states,
//! spool progress, rejects, out-of-order repairs and alarms, written together. It composes the
//! other `db` modules; none of them imports it.

use model::{MeterId, Reading};
use sqlx::{Connection, PgConnection, Row};
use time::OffsetDateTime;

use super::StoreOptions;
use super::error::{StoreError, is_unique_violation, stage};
use super::journal::{self, JournalEntry};
use super::rejects::RejectRecord;
use super::{meter_state, progress, readings, rejects, rollups};
use crate::vee::Usage;

/// Everything one ingest transaction writes.
#[derive(Debug, Default)]
pub struct WriteSet<'a> {
    /// Readings after VEE (and estimates).
    pub readings: &'a [Reading],
    /// Where the batch's rollups and meter states go.
    pub mode: WriteMode<'a>,
    /// Spool progress to record: (gateway, spool incarnation, partition, max seq).
    pub progress: &'a [(String, String, u16, i64)],
    /// Refused payloads and reads.
    pub rejects: &'a [RejectRecord],
    /// Out-of-order reads: supersede estimates around them, recompute their rollups.
    pub out_of_order: &'a [(MeterId, OffsetDateTime)],
    /// Alarm events and detector states of this batch (`crate::detect::store`).
    pub alarms: Option<&'a crate::detect::store::AlarmWrite>,
}

/// The two ways an ingest transaction writes rollups and meter states.
#[derive(Debug, Clone, Copy)]
pub enum WriteMode<'a> {
    /// Upserted in this transaction (edits, manual reads, the registry, tests).
    Direct {
        /// Consumption per billable read, for the rollups.
        usage: &'a [Usage],
        /// New meter states (`None`: none to write).
        states: Option<&'a crate::vee::StateMap>,
    },
    /// Appended to the ingest journal as these records, one per partition; the worker folds
    /// them into the rollups and `meter_state` later (see [`super::journal`]).
    Journal(&'a [JournalEntry]),
}

impl Default for WriteMode<'_> {
    fn default() -> Self {
        Self::Direct {
            usage: &[],
            states: None,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Rows added to `readings`.
    pub inserted: u64,
    /// Estimates replaced by an actual read at the same key.
    pub superseded: u64,
    /// True when the batch had to take the conflict-tolerant path.
    pub slow_path: bool,
    /// Journal ids of the [`WriteMode::Journal`] records, in order.
    pub journal_ids: Vec<i64>,
}

/// Writes one ingest batch in a single transaction: readings (binary COPY straight into
/// `readings`; when a key already exists, COPY into a staging table and merge, replacing
/// estimates by actual reads and recording conflicts), rollups, meter state, spool progress
/// and rejects. Nothing is written when it fails.
///
/// # Errors
/// Returns [`StoreError::Stage`] naming the statement that failed.
pub async fn write_batch(
    conn: &mut PgConnection,
    set: &WriteSet<'_>,
    options: StoreOptions,
) -> Result<WriteStats, StoreError> {
    let mut tx = conn.begin().await.map_err(stage("beginning"))?;
    let mut stats = WriteStats::default();
    let t0 = std::time::Instant::now();
    // First, so the journal lock (which edits wait on) is taken before any row lock.
    if let WriteMode::Journal(entries) = set.mode {
        stats.journal_ids = journal::append(&mut tx, entries).await?;
    }
    let t_journal = t0.elapsed();
    if !set.readings.is_empty() {
        sqlx::query("SAVEPOINT wm_fast")
            .execute(&mut *tx)
            .await
            .map_err(stage("setting a savepoint"))?;
        let refs: Vec<&Reading> = set.readings.iter().collect();
        let mut narrow = readings::encode_narrow(&mut tx, &refs).await?;
        // In the primary key's order (see `Narrow::sort_by_key`).
        narrow.sort_by_key();
        let copied = match readings::copy_narrow(&mut tx, "reading_rows", &narrow).await {
            Ok(n) => readings::write_details(&mut tx, false, &narrow)
                .await
                .map(|()| n),
            Err(e) => Err(e),
        };
        match copied {
            Ok(n) => stats.inserted = n,
            Err(e) if is_unique_violation(&e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT wm_fast")
                    .execute(&mut *tx)
                    .await
                    .map_err(stage("rolling back to the savepoint"))?;
                stats.slow_path = true;
                let merged = readings::merge_readings(&mut tx, set.readings, true).await?;
                stats.inserted = merged.inserted;
                stats.superseded = merged.superseded;
            }
            Err(e) => return Err(stage("copying readings")(e)),
        }
    }
    let t_readings = t0.elapsed();
    if let WriteMode::Direct { usage, .. } = set.mode {
        let usage: Vec<&Usage> = usage.iter().collect();
        rollups::write_rollups(&mut tx, &usage, options).await?;
    }
    let t_rollups = t0.elapsed();
    if let WriteMode::Direct {
        states: Some(states),
        ..
    } = set.mode
    {
        meter_state::write_states(&mut tx, states).await?;
    }
    let t_states = t0.elapsed();
    progress::write_progress(&mut tx, set.progress).await?;
    rejects::write_rejects(&mut tx, set.rejects).await?;
    for (meter, ts) in set.out_of_order {
        resolve_out_of_order(&mut tx, meter.as_str(), *ts, options).await?;
    }
    if let Some(alarms) = set.alarms.filter(|a| !a.is_empty()) {
        crate::detect::store::write(&mut tx, alarms).await?;
    }
    tx.commit().await.map_err(stage("committing"))?;
    tracing::debug!(
        rows = set.readings.len(),
        journal_ms = t_journal.as_millis() as u64,
        readings_ms = (t_readings - t_journal).as_millis() as u64,
        rollups_ms = (t_rollups - t_readings).as_millis() as u64,
        states_ms = (t_states - t_rollups).as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        "ingest batch written"
    );
    Ok(stats)
}

/// An actual read older than the last validated one: estimates between its validated
/// neighbours are flagged `superseded`, and the rollups of that span are recomputed.
async fn resolve_out_of_order(
    conn: &mut PgConnection,
    meter: &str,
    ts: OffsetDateTime,
    options: StoreOptions,
) -> Result<(), StoreError> {
    let row = sqlx::query(
        "WITH bounds AS (
             SELECT
               (SELECT max(ts) FROM readings WHERE meter_id = $1 AND quantity = 'volume'
                  AND tariff = 0 AND subunit = 0 AND storage = 0
                  AND quality IN ('validated', 'edited') AND ts < $2) AS lo,
               (SELECT min(ts) FROM readings WHERE meter_id = $1 AND quantity = 'volume'
                  AND tariff = 0 AND subunit = 0 AND storage = 0
                  AND quality IN ('validated', 'edited') AND ts > $2) AS hi)
         , upd AS (
             UPDATE readings r SET flags = array_append(r.flags, 'superseded')
             FROM bounds b
             WHERE r.meter_id = $1 AND r.quantity = 'volume' AND r.quality = 'estimated'
               AND NOT ('superseded' = ANY (r.flags))
               AND r.ts > coalesce(b.lo, '-infinity') AND r.ts < coalesce(b.hi, 'infinity')
             RETURNING r.ts)
         SELECT (SELECT count(*) FROM upd) AS n, lo, hi FROM bounds",
    )
    .bind(meter)
    .bind(ts)
    .fetch_one(&mut *conn)
    .await
    .map_err(stage("superseding estimates"))?;
    let n: i64 = row.try_get("n").unwrap_or(0);
    if n > 0 {
        let lo: Option<OffsetDateTime> = row.try_get("lo").ok().flatten();
        let hi: Option<OffsetDateTime> = row.try_get("hi").ok().flatten();
        rollups::recompute_rollups(conn, meter, lo.unwrap_or(ts), hi.unwrap_or(ts), options)
            .await?;
    }
    Ok(())
}
