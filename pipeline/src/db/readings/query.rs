//! Reads of stored readings outside the ingest path: the bill run's boundary reads and
//! estimated share, the neighbours an estimate interpolates between, the reads a meter
//! replacement re-validates, and telemetry after a command. Every query reads the `readings`
//! view, so packed months (migration 0120) answer the same as row-form ones.

use rust_decimal::Decimal;
use sqlx::{Executor, Postgres};
use time::OffsetDateTime;

use crate::db::error::{StoreError, stage};

/// A billable volume read (tariff 0, subunit 0, storage 0): time, value and quality status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRead {
    /// Meter time of the read.
    pub ts: OffsetDateTime,
    /// Register value, m³.
    pub value: Decimal,
    /// Quality status (`validated`, `estimated` or `edited`).
    pub quality: String,
}

/// Returns the billable volume read of `meter` at or before `boundary` and after `after`: an
/// actual read wins over an estimate, then the latest wins (the bill run's boundary read).
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn boundary_read<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    boundary: OffsetDateTime,
    after: OffsetDateTime,
) -> Result<Option<VolumeRead>, StoreError> {
    let row: Option<(OffsetDateTime, Decimal, String)> = sqlx::query_as(
        "SELECT ts, value, quality FROM readings
         WHERE meter_id = $1 AND quantity = 'volume' AND tariff = 0 AND subunit = 0 AND storage = 0
           AND ts <= $2 AND ts > $3
           AND quality IN ('validated', 'estimated', 'edited')
           AND NOT ('superseded' = ANY (flags))
         ORDER BY (quality = 'estimated'), ts DESC
         LIMIT 1",
    )
    .bind(meter)
    .bind(boundary)
    .bind(after)
    .fetch_optional(executor)
    .await
    .map_err(stage("selecting a boundary read"))?;
    Ok(row.map(|(ts, value, quality)| VolumeRead { ts, value, quality }))
}

/// Returns `(billable, estimated or edited)`: how many billable volume reads of `meter` lie in
/// `(from, to]`, and how many of them are not actual reads.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn estimated_share<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<(i64, i64), StoreError> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE quality IN ('estimated', 'edited')) FROM readings
         WHERE meter_id = $1 AND quantity = 'volume' AND tariff = 0 AND subunit = 0 AND storage = 0
           AND ts > $2 AND ts <= $3 AND quality IN ('validated', 'estimated', 'edited')
           AND NOT ('superseded' = ANY (flags))",
    )
    .bind(meter)
    .bind(from)
    .bind(to)
    .fetch_one(executor)
    .await
    .map_err(stage("counting estimated reads"))
}

/// Which side of a time [`neighbour`] looks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The latest read before the time.
    Before,
    /// The earliest read after the time.
    After,
}

/// Returns the billable, not superseded volume read (tariff 0, subunit 0, any storage) of
/// `meter` nearest to `ts` on `side`, as `(ts, value)`: what an estimate interpolates between.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn neighbour<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    ts: OffsetDateTime,
    side: Side,
) -> Result<Option<(OffsetDateTime, Decimal)>, StoreError> {
    let sql = match side {
        Side::Before => {
            "SELECT ts, value FROM readings WHERE meter_id = $1 AND quantity = 'volume' AND tariff = 0
               AND subunit = 0 AND ts < $2 AND quality IN ('validated', 'edited', 'estimated')
               AND NOT ('superseded' = ANY (flags)) ORDER BY ts DESC LIMIT 1"
        }
        Side::After => {
            "SELECT ts, value FROM readings WHERE meter_id = $1 AND quantity = 'volume' AND tariff = 0
               AND subunit = 0 AND ts > $2 AND quality IN ('validated', 'edited', 'estimated')
               AND NOT ('superseded' = ANY (flags)) ORDER BY ts LIMIT 1"
        }
    };
    sqlx::query_as(sql)
        .bind(meter)
        .bind(ts)
        .fetch_optional(executor)
        .await
        .map_err(stage("finding the neighbouring reads"))
}

/// Returns the time of the first billable volume read (tariff 0, subunit 0, storage 0) of
/// `meter` after `ts`, superseded ones included: where a rollup recompute after an edit at
/// `ts` ends.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn next_volume_ts<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    ts: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, StoreError> {
    sqlx::query_scalar(
        "SELECT min(ts) FROM readings WHERE meter_id = $1 AND quantity = 'volume'
           AND tariff = 0 AND subunit = 0 AND storage = 0 AND ts > $2
           AND quality IN ('validated', 'edited', 'estimated')",
    )
    .bind(meter)
    .bind(ts)
    .fetch_one(executor)
    .await
    .map_err(stage("finding the next reading"))
}

/// Returns the value of the first `quantity` reading of `meter` received after `since` (meter
/// time within two days before it, so that old partitions are not scanned): the telemetry
/// that confirms a command.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn first_received_after<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    quantity: &str,
    since: OffsetDateTime,
) -> Result<Option<Decimal>, StoreError> {
    sqlx::query_scalar(
        "SELECT value FROM readings WHERE meter_id = $1 AND quantity = $2 \
           AND received_at > $3 AND ts > $3 - interval '2 days' \
         ORDER BY received_at, ts LIMIT 1",
    )
    .bind(meter)
    .bind(quantity)
    .bind(since)
    .fetch_optional(executor)
    .await
    .map_err(stage("reading telemetry after a command"))
}

/// A read held as `rejected` for a register decrease, with what is needed to validate it again.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HeldRead {
    /// Meter time.
    pub ts: OffsetDateTime,
    /// Clock source name.
    pub clock: String,
    /// Quantity name.
    pub quantity: String,
    /// Value as exact decimal text.
    pub value: String,
    /// Unit name.
    pub unit: String,
    /// Storage number.
    pub storage: i32,
    /// Tariff register.
    pub tariff: i16,
    /// Subunit.
    pub subunit: i16,
    /// Source kind name.
    pub source: String,
    /// Source id.
    pub source_id: String,
    /// Gateway (`unknown` when not recorded).
    pub gateway: String,
    /// Frame hash (empty when not recorded).
    pub frame_hash: String,
    /// When the pipeline received it.
    pub received_at: OffsetDateTime,
    /// Provenance channel.
    pub channel: Option<String>,
}

/// Returns the reads of `meter` after `since` held as `rejected register_decrease`, in time
/// order.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn held_register_decreases<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    since: OffsetDateTime,
) -> Result<Vec<HeldRead>, StoreError> {
    sqlx::query_as(
        "SELECT ts, clock, quantity, value::text AS value, unit, storage, tariff, subunit, source,
                source_id, coalesce(gateway_id, 'unknown') AS gateway,
                coalesce(frame_hash, '') AS frame_hash, received_at, channel
         FROM readings
         WHERE meter_id = $1 AND ts > $2 AND quality = 'rejected'
           AND quality_detail->>'reason' = 'register_decrease'
         ORDER BY ts",
    )
    .bind(meter)
    .bind(since)
    .fetch_all(executor)
    .await
    .map_err(stage("reading the held reads"))
}
