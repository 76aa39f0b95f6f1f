//! Monthly partitions of `readings` (`reading_rows`' `readings_YYYYMM`) and their upkeep:
//! creating months ahead, retention and archiving, compacting closed months' primary keys and
//! packing closed months into `reading_packs`/`frame_packs` (migration 0120). The scheduler's
//! `reading-retention` job calls these.

use sqlx::PgPool;
use time::OffsetDateTime;

use super::error::{StoreError, stage};

/// Creates monthly partitions of `readings` from last month to `months_ahead` months ahead
/// (no-op under TimescaleDB). Returns how many it created.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the database refuses.
pub async fn ensure_partitions(pool: &PgPool, months_ahead: i32) -> Result<i32, StoreError> {
    let created: i32 = sqlx::query_scalar(
        "SELECT wm_ensure_reading_partitions(
             (date_trunc('month', now()) - interval '1 month')::date, $1 + 2)",
    )
    .bind(months_ahead)
    .fetch_one(pool)
    .await
    .map_err(stage("creating reading partitions"))?;
    Ok(created)
}

/// A retention policy as `wm_reading_retention` takes it (migration 0081; checked there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Months of readings kept online (older whole months are archived).
    pub keep_months: i32,
    /// Months after which an archived month is dropped (≥ `keep_months`).
    pub drop_months: i32,
    /// Months of partitions created ahead.
    pub months_ahead: i32,
    /// Report the plan only; change nothing.
    pub dry_run: bool,
}

/// One step of a retention run: (month `YYYY-MM`, `create` | `archive` | `drop`, rows).
pub type RetentionStep = (String, String, i64);

/// Runs `wm_reading_retention` (migration 0081) at `at`: creates partitions ahead, archives
/// months older than the policy keeps to schema `wm_archive` (partition, its frames and
/// details), drops archived months past `drop_months`. Returns the steps, in order.
///
/// # Errors
/// [`StoreError::Stage`] when the database refuses (a bad policy is refused too).
pub async fn run_retention(
    pool: &PgPool,
    policy: Retention,
    at: OffsetDateTime,
) -> Result<Vec<RetentionStep>, StoreError> {
    sqlx::query_as("SELECT month, action, row_count FROM wm_reading_retention($1, $2, $3, $4, $5)")
        .bind(policy.keep_months)
        .bind(policy.drop_months)
        .bind(policy.months_ahead)
        .bind(policy.dry_run)
        .bind(at)
        .fetch_all(pool)
        .await
        .map_err(stage("running reading retention"))
}

/// One compacted month: (month `YYYY-MM`, primary-key index bytes before, after; after =
/// before in a dry run).
pub type Compaction = (String, i64, i64);

/// Compacts the primary-key index of every non-empty `readings_YYYYMM` partition whose month
/// ended at least a whole month before `at` (late reads are then rare), once: the index gets
/// `fillfactor = 100` and is rebuilt with `REINDEX INDEX CONCURRENTLY` (reads and writes go on).
/// Round-major ingest leaves that index about 63 % full (44 bytes per reading); rebuilt it
/// holds about 28.6 (docs/storage.md). Oldest month first; a dry run only lists them.
///
/// # Errors
/// [`StoreError::Stage`] when the database refuses.
pub async fn compact_closed_months(
    pool: &PgPool,
    at: OffsetDateTime,
    dry_run: bool,
) -> Result<Vec<Compaction>, StoreError> {
    let candidates: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT to_char(to_date(substring(c.relname from 10), 'YYYYMM'), 'YYYY-MM'),
                x.indexrelid::regclass::text, pg_relation_size(x.indexrelid)
         FROM pg_inherits i
         JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
         JOIN pg_index x ON x.indrelid = c.oid AND x.indisprimary
         JOIN pg_class ic ON ic.oid = x.indexrelid
         WHERE i.inhparent = 'reading_rows'::regclass AND c.relname ~ '^readings_[0-9]{6}$'
           AND to_date(substring(c.relname from 10), 'YYYYMM') + interval '2 months'
               <= date_trunc('month', $1::timestamptz)
           AND pg_relation_size(c.oid) > 0
           AND NOT coalesce(ic.reloptions @> ARRAY['fillfactor=100'], false)
         ORDER BY 1",
    )
    .bind(at)
    .fetch_all(pool)
    .await
    .map_err(stage("listing closed reading months"))?;
    let mut done = Vec::with_capacity(candidates.len());
    for (month, index, before) in candidates {
        if dry_run {
            done.push((month, before, before));
            continue;
        }
        // REINDEX CONCURRENTLY cannot run in a transaction block: each statement on its own.
        sqlx::raw_sql(&format!("ALTER INDEX {index} SET (fillfactor = 100)"))
            .execute(pool)
            .await
            .map_err(stage("setting a closed month's index fillfactor"))?;
        sqlx::raw_sql(&format!("REINDEX INDEX CONCURRENTLY {index}"))
            .execute(pool)
            .await
            .map_err(stage("rebuilding a closed month's index"))?;
        let after: i64 = sqlx::query_scalar("SELECT pg_relation_size($1::regclass)")
            .bind(&index)
            .fetch_one(pool)
            .await
            .map_err(stage("measuring a rebuilt index"))?;
        tracing::info!(%month, %index, before, after, "closed reading month compacted");
        done.push((month, before, after));
    }
    Ok(done)
}

/// One packed month: (month `YYYY-MM`, segments, readings, frames); a dry run gives what it
/// would pack.
pub type Packing = (String, i64, i64, i64);

/// Packs every non-empty `readings_YYYYMM` partition whose month ended at least `after_days`
/// days before `at` (migration 0120, `wm_pack_month`): its rows move to one row per
/// (meter, series, month) of `reading_packs`, their frames to one row per (meter, month) of
/// `frame_packs`, the partition is truncated. The pack horizon is raised first in its own
/// transaction, so every writer of an older reading unpacks its (meter, month) before the
/// unique key judges it (docs/storage.md, "Packed months"). A month unpacked by late reads
/// since is packed again. Oldest first; a dry run counts and changes nothing.
///
/// The caller checks `after_days` (0 or more).
///
/// # Errors
/// [`StoreError::Stage`] when the database refuses.
pub async fn pack_closed_months(
    pool: &PgPool,
    at: OffsetDateTime,
    after_days: i32,
    dry_run: bool,
) -> Result<Vec<Packing>, StoreError> {
    let months: Vec<(time::Date, time::OffsetDateTime)> = sqlx::query_as(
        "SELECT m, (m + interval '1 month')::timestamp AT TIME ZONE 'UTC'
         FROM (SELECT to_date(substring(c.relname from 10), 'YYYYMM') AS m
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
               WHERE i.inhparent = 'reading_rows'::regclass
                 AND c.relname ~ '^readings_[0-9]{6}$'
                 AND pg_relation_size(c.oid) > 0) p
         WHERE (m + interval '1 month')::timestamp AT TIME ZONE 'UTC'
               + make_interval(days => $2) <= $1
         ORDER BY m",
    )
    .bind(at)
    .bind(after_days)
    .fetch_all(pool)
    .await
    .map_err(stage("listing closed reading months to pack"))?;
    let Some(&(_, horizon)) = months.last() else {
        return Ok(Vec::new());
    };
    if !dry_run {
        // Its own transaction: it waits for writers that read the old horizon to commit.
        sqlx::query("SELECT wm_pack_raise_horizon($1)")
            .bind(horizon)
            .execute(pool)
            .await
            .map_err(stage("raising the pack horizon"))?;
    }
    let mut done = Vec::with_capacity(months.len());
    for (month, _) in months {
        let (segments, rows, frames): (i64, i64, i64) =
            sqlx::query_as("SELECT * FROM wm_pack_month($1, $2)")
                .bind(month)
                .bind(dry_run)
                .fetch_one(pool)
                .await
                .map_err(stage("packing a closed reading month"))?;
        let label = format!("{:04}-{:02}", month.year(), u8::from(month.month()));
        if rows == 0 {
            continue;
        }
        if !dry_run {
            tracing::info!(month = %label, segments, rows, frames, "closed reading month packed");
        }
        done.push((label, segments, rows, frames));
    }
    Ok(done)
}
