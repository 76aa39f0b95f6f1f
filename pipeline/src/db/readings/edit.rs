//! Changes to single stored readings outside the ingest path: an edit or estimate replaces a
//! value (old row kept in `reading_history`), a review rejects a held read, a meter
//! replacement moves held reads to history before validating them again. Callers hold the
//! ingest-journal lock where rollups are recomputed afterwards
//! ([`crate::db::journal::lock_out_ingest`]).

use model::{Quality, Quantity};
use rust_decimal::Decimal;
use sqlx::{Executor, PgConnection, Postgres};
use time::OffsetDateTime;

use crate::db::error::{StoreError, stage};

/// Returns the packed month (migration 0120) of `meter` at `ts` to row form, so its row can be
/// locked and changed; the next retention run packs it again. Nothing happens for a month in
/// row form or an unknown meter.
///
/// # Errors
/// [`StoreError::Stage`] when the statement fails.
pub async fn unpack_month(
    conn: &mut PgConnection,
    meter: &str,
    ts: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT wm_unpack_readings(ARRAY[k.meter_key], ARRAY[$2::timestamptz])
         FROM meter_keys k WHERE k.meter_id = $1",
    )
    .bind(meter)
    .bind(ts)
    .execute(conn)
    .await
    .map_err(stage("unpacking the reading's month"))?;
    Ok(())
}

/// Locks the stored `quantity` reading (tariff 0, subunit 0) of `meter` at `ts` for the rest of
/// the transaction and returns its value and quality status; `None` when there is none (or its
/// month is still packed: call [`unpack_month`] first).
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn lock_for_edit(
    conn: &mut PgConnection,
    meter: &str,
    ts: OffsetDateTime,
    quantity: Quantity,
) -> Result<Option<(Decimal, String)>, StoreError> {
    sqlx::query_as(
        // The narrow row itself: `FOR UPDATE` cannot lock through the view's outer joins.
        "SELECT r.value, wm_quality_text(r.quality) FROM reading_rows r
         JOIN meter_keys k ON k.meter_key = r.meter_key
         JOIN reading_series s ON s.series_id = r.series_id
         WHERE k.meter_id = $1 AND r.ts = $2 AND s.quantity = $3 AND s.tariff = 0
           AND s.subunit = 0
         FOR UPDATE OF r",
    )
    .bind(meter)
    .bind(ts)
    .bind(quantity.as_str())
    .fetch_optional(conn)
    .await
    .map_err(stage("reading the reading to edit"))
}

/// Copies the stored `quantity` reading (tariff 0, subunit 0) of `meter` at `ts` to
/// `reading_history`, marked as replaced by `replaced_by` for `reason`.
///
/// # Errors
/// [`StoreError::Stage`] when the statement fails.
pub async fn keep_history(
    conn: &mut PgConnection,
    meter: &str,
    ts: OffsetDateTime,
    quantity: Quantity,
    replaced_by: &str,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO reading_history (meter_id, ts, quantity, tariff, subunit, value, unit,
             quality, quality_detail, flags, replaced_by, reason)
         SELECT meter_id, ts, quantity, tariff, subunit, value, unit, quality, quality_detail,
                flags, $4, $5
         FROM readings
         WHERE meter_id = $1 AND ts = $2 AND quantity = $3 AND tariff = 0 AND subunit = 0",
    )
    .bind(meter)
    .bind(ts)
    .bind(quantity.as_str())
    .bind(replaced_by)
    .bind(reason)
    .execute(conn)
    .await
    .map_err(stage("keeping the edited reading's history"))?;
    Ok(())
}

/// Sets the value and quality of the stored `quantity` reading (tariff 0, subunit 0) of
/// `meter` at `ts` and clears its `superseded` flag (through the view's trigger).
///
/// # Errors
/// [`StoreError::Stage`] when the statement fails.
pub async fn set_value(
    conn: &mut PgConnection,
    meter: &str,
    ts: OffsetDateTime,
    quantity: Quantity,
    value: Decimal,
    quality: &Quality,
) -> Result<(), StoreError> {
    let detail = serde_json::to_value(quality).unwrap_or_default();
    sqlx::query(
        "UPDATE readings SET value = $4, quality = $6, quality_detail = $5,
             flags = array_remove(flags, 'superseded')
         WHERE meter_id = $1 AND ts = $2 AND quantity = $3 AND tariff = 0 AND subunit = 0",
    )
    .bind(meter)
    .bind(ts)
    .bind(quantity.as_str())
    .bind(value)
    .bind(&detail)
    .bind(quality.status())
    .execute(conn)
    .await
    .map_err(stage("editing the reading"))?;
    Ok(())
}

/// Marks the stored `quantity` reading (tariff 0, subunit 0) of `meter` at `ts` `rejected`
/// with reason `review` by `by` (a held read a person refused).
///
/// # Errors
/// [`StoreError::Stage`] when the statement fails.
pub async fn reject_reviewed<'e, E: Executor<'e, Database = Postgres>>(
    executor: E,
    meter: &str,
    ts: OffsetDateTime,
    quantity: Quantity,
    by: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE readings SET quality = 'rejected',
             quality_detail = jsonb_build_object('status', 'rejected', 'reason', 'review', 'by', $4::text)
         WHERE meter_id = $1 AND ts = $2 AND quantity = $3 AND tariff = 0 AND subunit = 0",
    )
    .bind(meter)
    .bind(ts)
    .bind(quantity.as_str())
    .bind(by)
    .execute(executor)
    .await
    .map_err(stage("rejecting the read"))?;
    Ok(())
}

/// Moves the reads of `meter` after `since` held as `rejected register_decrease` from
/// `readings` to `reading_history` (replaced by `revalidation`), before they are validated
/// again with the meter's replacement.
///
/// # Errors
/// [`StoreError::Stage`] when the statement fails.
pub async fn move_held_to_history(
    conn: &mut PgConnection,
    meter: &str,
    since: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH moved AS (
             DELETE FROM readings WHERE meter_id = $1 AND ts > $2 AND quality = 'rejected'
               AND quality_detail->>'reason' = 'register_decrease'
             RETURNING *)
         INSERT INTO reading_history (meter_id, ts, quantity, tariff, subunit, value, unit,
             quality, quality_detail, flags, replaced_by, reason)
         SELECT meter_id, ts, quantity, tariff, subunit, value, unit, quality, quality_detail,
                flags, 'revalidation', 'meter replacement recorded'
         FROM moved",
    )
    .bind(meter)
    .bind(since)
    .execute(conn)
    .await
    .map_err(stage("moving the held reads to history"))?;
    Ok(())
}
